"""A short fine-tune of a ``vqa2-*`` model with a reduction plan in place (PuMer's recipe), with
``graphred.train``: the transformed graph itself is trained (answer loss + KL to the unreduced model),
on fresh training scenes of graphred.data.scenes2. Accuracy before and after on the same test questions
as bench/bench_vqa2.py; the rows go to docs/results/vqa.json (method ``<method> fine-tuned``) and the
section of docs/benchmarks.md is rewritten from that file.

    python bench/bench_vqa2_finetune.py --model vqa2-llava --plan "pumer:prune=0.7,merge=0.2,layers=from:1"
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
warnings.filterwarnings("ignore")

import graphred  # noqa: E402
from graphred.data import models, scenes2  # noqa: E402
from graphred.measure import median_times  # noqa: E402
from graphred.plans import parse_plan  # noqa: E402
from graphred.training import train  # noqa: E402

import bench_vqa2  # noqa: E402

FIRST_TRAIN_SCENE = 500_000  # far past every scene the models were trained on


def finetune(name: str, plan_text: str, steps: int, batch: int, lr: float, n_scenes: int, rounds: int) -> dict:
    torch.manual_seed(0)
    model, tok = models.load_trained(name)
    data = scenes2.generate("test", n_scenes)
    example = models.build_inputs(name, tok, data, data.questions[:batch])
    prog = graphred.capture(model, **example)
    plan = parse_plan(plan_text)
    fast = graphred.transform(prog, plan)
    base = models.evaluate(prog, name, data, batch, tokenizer=tok)
    before = models.evaluate(fast, name, data, batch, tokenizer=tok)
    print(f"[{name}] unreduced {100 * base:.1f}%, {plan_text} training-free {100 * before:.1f}%", flush=True)
    current = {}

    def batches(step: int) -> dict:
        per = batch // 4
        start = FIRST_TRAIN_SCENE + step * per
        sc = scenes2.generate("train", range(start, start + per))
        current["qs"], current["data"] = sc.questions, sc
        return models.build_inputs(name, tok, sc, sc.questions)

    def task(out, _batch):
        return F.cross_entropy(models.training_logits(name, out), models.targets(name, tok, current["qs"]))

    t0 = time.perf_counter()
    train(fast, batches, teacher=model, steps=steps, what="model", lr=lr, temperature=2.0, task_loss=task,
          logits_fn=lambda o, b: models.training_logits(name, o), seed=0, log_every=25)
    train_s = time.perf_counter() - t0
    after = models.evaluate(fast, name, data, batch, tokenizer=tok)
    tb, tf = median_times(prog, fast, example, rounds)
    est = graphred.estimate(prog, plan)
    img = [s.get("image_after") for s in fast.steps if s.get("image_after") is not None]
    method = "pumer+merge" if plan.steps[0].merge[0] > 0 else "pumer"
    print(f"[{name}] after {steps} steps ({train_s:.0f}s): {100 * after:.1f}% (unreduced {100 * base:.1f}%), "
          f"predicted {float(est.speedup):.2f}x, measured {tb / tf:.2f}x", flush=True)
    return {"model": name, "method": f"{method} fine-tuned", "plan": str(plan), "ratio": None,
            "image_tokens_left": img[-1] if img else None, "accuracy": round(after, 4),
            "measured_speedup": round(tb / tf, 3), "predicted_speedup": round(float(est.speedup), 3),
            "questions": len(data.questions), "training_free_accuracy": round(before, 4),
            "unreduced_accuracy": round(base, 4),
            "finetune": {"steps": steps, "batch": batch, "lr": lr, "what": "model", "temperature": 2.0,
                         "seconds": round(train_s, 1), "threads": torch.get_num_threads(),
                         "data": f"training scenes from {FIRST_TRAIN_SCENE} on (unseen in training)"}}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="vqa2-llava", choices=models.MODEL_NAMES_V2)
    ap.add_argument("--plan", default="pumer:prune=0.7,merge=0.2,layers=from:1")
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--batch", type=int, default=40)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--scenes", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.batch % 4:
        ap.error("--batch must be a multiple of 4 (a scene's four questions)")
    row = finetune(args.model, args.plan, args.steps, args.batch, args.lr, args.scenes, args.rounds)
    print(json.dumps(row, indent=1))
    if not args.no_write:
        rows = json.loads(bench_vqa2.RESULTS.read_text()) if bench_vqa2.RESULTS.exists() else []
        rows = [r for r in rows if not (r["model"] == row["model"] and r["method"] == row["method"]
                                        and r["plan"] == row["plan"])] + [row]
        rows.sort(key=lambda r: models.ALL_MODEL_NAMES.index(r["model"]))
        bench_vqa2.RESULTS.write_text(json.dumps(rows, indent=1) + "\n")
        bench_vqa2.write_section(bench_vqa2.to_markdown(rows, args.threads), bench_vqa2.MARK)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
