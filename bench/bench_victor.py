"""Victor benchmark: registers after the image, the image dropped at decoder layer k.

On vqa-llava (graphred's own trained decoder VQA model): accuracy unreduced / Victor untrained
(pooled and random register init) / Victor after a short fine-tune (graphred.train: registers and
model, KL to the unreduced model + answer loss), predicted vs measured speedup, and training-step
time with and without Victor. On llava-bench: victor(registers=8, layer=2) predicted and measured
whole-model speedup. Writes docs/results/victor.json and a section of docs/benchmarks.md.

    python bench/bench_victor.py            # CPU, 1 thread, about 5 minutes

Needs the training scenes (Debian package dataset-fashion-mnist) for the fine-tune.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
warnings.filterwarnings("ignore")

import graphred  # noqa: E402
from graphred.analysis.cost.training import training_step_flops  # noqa: E402
from graphred.data import models, scenes  # noqa: E402
from graphred.measure import speedup  # noqa: E402
from graphred.plans import victor  # noqa: E402
from _common import publish  # noqa: E402

MARK = "bench_victor"
RESULTS = ROOT / "docs" / "results" / "victor.json"


def decoder_speedup(est) -> float:
    """Predicted speedup of the decoder alone (its layers, the final norm and the LM head)."""
    def dec(e):
        stacks = {g.stack for g in e.groups if g.kind == "layer" and any(b.kind == "cross_modal_self" for b in g.blocks)}
        tower = {g.tower for g in e.groups if g.stack in stacks}
        return sum(g.flops for g in e.groups if g.stack in stacks or g.tower in tower or g.name.startswith("lm_head"))
    return dec(est) / dec(est.after)


def step_time(module, inputs: dict, target: torch.Tensor, name: str, rounds: int) -> float:
    """Median seconds of one training step (forward, answer loss, backward) of ``module``."""
    params = [p for p in module.parameters() if p.requires_grad]
    times = []
    for i in range(rounds + 1):
        t0 = time.perf_counter()
        loss = F.cross_entropy(models.training_logits(name, module(**inputs)), target)
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        del grads
        if i:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def vqa(name: str, registers: int, layer: int, steps: int, batch: int, lr: float, reducer_lr: float, limit: int,
        rounds: int) -> dict:
    torch.manual_seed(0)
    teacher, tok = models.load_trained(name)
    teacher.eval()
    test = scenes.load_shipped()
    n = min(limit, len(test.questions))
    n -= n % batch
    example = models.build_inputs(name, tok, test, test.questions[:batch])
    prog = graphred.capture(teacher, **example)
    plan = victor(registers=registers, layer=layer)
    est = graphred.estimate(prog, plan)
    t0 = time.perf_counter()
    acc_unreduced = models.evaluate(prog, name, test, batch, tokenizer=tok, limit=n)
    fast = graphred.transform(prog, plan)
    acc_untrained = models.evaluate(fast, name, test, batch, tokenizer=tok, limit=n)
    fast_random = graphred.transform(prog, victor(registers=registers, layer=layer, init="random"))
    acc_random = models.evaluate(fast_random, name, test, batch, tokenizer=tok, limit=n)
    print(f"[{name}] unreduced {acc_unreduced:.3f}, victor untrained pool-init {acc_untrained:.3f} "
          f"random-init {acc_random:.3f} ({time.perf_counter() - t0:.0f}s)", flush=True)
    measured = speedup(prog, fast, example, rounds=rounds)

    train = scenes.load("train")
    qs = train.questions
    gen = torch.Generator().manual_seed(0)
    order = torch.randint(len(qs), (steps, batch), generator=gen).tolist()

    def data(step: int) -> dict:
        return models.build_inputs(name, tok, train, [qs[i] for i in order[step]])

    def task(out, b) -> torch.Tensor:
        step = data_index[0]
        return F.cross_entropy(models.training_logits(name, out), models.targets(name, tok, [qs[i] for i in order[step]]))

    data_index = [0]

    def data_tracked(step: int) -> dict:
        data_index[0] = step
        return data(step)

    res = graphred.train(fast, data_tracked, teacher=teacher, steps=steps, what="registers+model", lr=lr,
                         reducer_lr=reducer_lr, temperature=2.0, task_loss=task,
                         logits_fn=lambda out, b: models.training_logits(name, out), seed=0, log_every=50)
    acc_victor = models.evaluate(fast, name, test, batch, tokenizer=tok, limit=n)
    print(f"[{name}] victor fine-tuned {acc_victor:.3f} ({res.seconds:.0f}s for {steps} steps)", flush=True)

    # training-step time, unreduced vs Victor: the same answer loss, gradients of every weight
    student, _ = models.load_trained(name)
    prog_student = graphred.capture(student, **example)
    fast_step = graphred.transform(prog_student, plan)
    target = models.targets(name, tok, test.questions[:batch])
    t_full, t_victor = [], []
    for _ in range(rounds):  # alternate, so that drift on the shared machine hits both alike
        t_full.append(step_time(prog_student.graph_module, example, target, name, 1))
        t_victor.append(step_time(fast_step, example, target, name, 1))
    step_ratio = statistics.median(t_victor) / statistics.median(t_full)
    pred_step = training_step_flops(est, "registers+model")
    return {"model": name, "registers": registers, "layer": layer, "questions": n, "batch": batch, "steps": steps,
            "lr": lr, "reducer_lr": reducer_lr, "train_s": res.seconds,
            "acc_unreduced": acc_unreduced, "acc_victor_untrained": acc_untrained, "acc_victor_random_init": acc_random,
            "acc_victor": acc_victor, "predicted_speedup": float(est.speedup),
            "predicted_decoder_speedup": decoder_speedup(est), "measured_speedup": measured,
            "train_step_s_unreduced": statistics.median(t_full), "train_step_s_victor": statistics.median(t_victor),
            "train_step_ratio": step_ratio, "predicted_train_step_ratio": pred_step["ratio"],
            "final_loss": res.losses[-1] if res.losses else None}


def bench(name: str, registers: int, layer: int, rounds: int) -> dict:
    model, inputs = graphred.zoo.load(name)
    prog = graphred.capture(model, **inputs)
    plan = victor(registers=registers, layer=layer)
    est = graphred.estimate(prog, plan)
    fast = graphred.transform(prog, plan)
    measured = speedup(prog, fast, inputs, rounds=rounds)
    return {"model": name, "registers": registers, "layer": layer, "predicted_speedup": float(est.speedup),
            "measured_speedup": measured, "measured_over_predicted": measured / float(est.speedup),
            "kv_cache_bytes": [est.kv_cache_bytes, est.after.kv_cache_bytes],
            "flops": [int(est.flops), int(est.after.flops)]}


def probes(name: str, registers: int, specs: list[str], batch: int, limit: int) -> list[dict]:
    """Shorter fine-tunes at other settings (``layer:lr:steps``), for the accuracy/speed trade-off."""
    from graphred.training import finetune_shipped

    rows = []
    for spec in specs:
        layer, lr, steps = spec.split(":")
        plan = victor(registers=registers, layer=int(layer))
        r = finetune_shipped(name, plan, steps=int(steps), batch=batch, lr=float(lr), reducer_lr=1e-2, limit=limit)
        est = graphred.estimate(r["program"], plan)
        rows.append({"plan": str(plan), "lr": float(lr), "steps": int(steps), "unreduced": r["unreduced"],
                     "before": r["before"], "after": r["after"], "predicted_speedup": float(est.speedup),
                     "predicted_decoder_speedup": decoder_speedup(est), "train_s": r["train_s"]})
        print(f"[probe] {plan} lr {lr} {steps} steps: {r['before']:.3f} -> {r['after']:.3f}", flush=True)
    return rows


def to_markdown(v: dict, b: dict, threads: int, probe_rows: list[dict] | None = None) -> str:
    gap = 100 * (v["acc_unreduced"] - v["acc_victor"])
    ok = lambda c: "met" if c else "**missed**"  # noqa: E731
    r = b["measured_over_predicted"]
    rv = v["measured_speedup"] / v["predicted_speedup"]
    out = [f"<!-- {MARK}:start (written by bench/bench_victor.py; do not edit by hand) -->",
           "### Victor: visual tokens summarised into registers (CPU)", "",
           f"`victor:registers={v['registers']},layer={v['layer']}` on {v['model']} (graphred's own trained decoder, "
           f"{v['questions']} shipped test questions, batch {v['batch']}); CPU, {threads} thread(s), on a shared, "
           "loaded machine. Fine-tune: `graphred.train(..., what=\"registers+model\")`, "
           f"{v['steps']} steps of batch {v['batch']} ({v['train_s']:.0f} s), KL to the unreduced model + answer loss, "
           f"lr {v['lr']:g} (registers {v['reducer_lr']:g}).", "",
           "| | accuracy | gap to unreduced | target |", "|---|---:|---:|---|",
           f"| unreduced | {100 * v['acc_unreduced']:.1f}% | | |",
           f"| victor, untrained, random init | {100 * v['acc_victor_random_init']:.1f}% | "
           f"{100 * (v['acc_unreduced'] - v['acc_victor_random_init']):+.1f} | |",
           f"| victor, untrained, pooled init | {100 * v['acc_victor_untrained']:.1f}% | "
           f"{100 * (v['acc_unreduced'] - v['acc_victor_untrained']):+.1f} | |",
           f"| victor, fine-tuned | {100 * v['acc_victor']:.1f}% | {gap:+.1f} | within 4 points: {ok(gap <= 4)} |", "",
           "| model | predicted speedup (whole model) | predicted (decoder) | measured | measured/predicted | target |",
           "|---|---:|---:|---:|---:|---|",
           f"| {v['model']} | {v['predicted_speedup']:.2f}x | {v['predicted_decoder_speedup']:.2f}x | "
           f"{v['measured_speedup']:.2f}x | {rv:.2f} | decoder >= 3x: {ok(v['predicted_decoder_speedup'] >= 3)}; "
           f">= 0.85: {ok(rv >= 0.85)} |",
           f"| {b['model']} (registers={b['registers']}, layer={b['layer']}) | {b['predicted_speedup']:.2f}x | | "
           f"{b['measured_speedup']:.2f}x | {r:.2f} | >= 3x: {ok(b['predicted_speedup'] >= 3)}; >= 0.85: {ok(r >= 0.85)} |",
           "",
           f"Training step on {v['model']} (forward + answer loss + gradients of every weight, batch {v['batch']}): "
           f"{1000 * v['train_step_s_unreduced']:.0f} ms unreduced, {1000 * v['train_step_s_victor']:.0f} ms with Victor: "
           f"ratio {v['train_step_ratio']:.2f} measured, {v['predicted_train_step_ratio']:.2f} predicted from "
           f"training-step FLOPs ({100 * (1 - v['train_step_ratio']):.0f}% less time; the paper reports 43% less)."]
    if probe_rows:
        out += ["", "Shorter fine-tunes at other drop layers (same questions, same script; registers lr 0.01):", "",
                "| plan | lr | steps | untrained | fine-tuned | gap to unreduced | predicted speedup (whole / decoder) |",
                "|---|---:|---:|---:|---:|---:|---|"]
        for r in probe_rows:
            out.append(f"| `{r['plan']}` | {r['lr']:g} | {r['steps']} | {100 * r['before']:.1f}% | {100 * r['after']:.1f}% | "
                       f"{100 * (r['unreduced'] - r['after']):+.1f} | {r['predicted_speedup']:.2f}x / "
                       f"{r['predicted_decoder_speedup']:.2f}x |")
    out.append(f"<!-- {MARK}:end -->")
    return "\n".join(out)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="vqa-llava")
    ap.add_argument("--registers", type=int, default=8)
    ap.add_argument("--layer", type=int, default=1)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=50)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--reducer-lr", type=float, default=3e-3)
    ap.add_argument("--limit", type=int, default=1200)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--probes", nargs="*", default=["1:1e-3:150", "2:1e-3:150", "3:1e-3:150"],
                    help="extra shorter fine-tunes, layer:lr:steps")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    v = vqa(args.model, args.registers, args.layer, args.steps, args.batch, args.lr, args.reducer_lr, args.limit,
            args.rounds)
    b = bench("llava-bench", 8, 2, args.rounds)
    probe_rows = probes(args.model, args.registers, args.probes, args.batch, args.limit)
    keys = ("model", "registers", "layer", "acc_unreduced", "acc_victor_untrained", "acc_victor", "predicted_speedup",
            "measured_speedup", "train_step_ratio")
    result = {k: v[k] for k in keys}
    result["details"] = {"vqa": v, "llava_bench": b, "probes": probe_rows, "threads": args.threads}
    if not args.no_write:
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    publish(to_markdown(v, b, args.threads, probe_rows), MARK, result, "bench_victor.json", write=not args.no_write)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
