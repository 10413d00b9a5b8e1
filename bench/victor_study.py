"""What limits Victor's accuracy on a trained VQA model: one fine-tune per call, a row per run.

Each run fine-tunes with ``graphred.train`` (answer loss + KL to the unreduced model at temperature
2, optional MSE between the last position's hidden states of every decoder layer, AdamW with a
warm-up and a cosine schedule) and scores the shipped test questions before and after, overall
and by question kind. ``--plan none`` fine-tunes the *unreduced* model with the same recipe and
budget (``what="model"``), so that a Victor row is compared with what the same extra training does
without Victor. Rows go to docs/results/victor_study.json (replacing a row of the same ``--name``);
bench/bench_victor.py prints them in docs/benchmarks.md.

    python bench/victor_study.py --name v1-r8 --plan victor:registers=8,layer=1 --steps 600
    python bench/victor_study.py --name ft-unreduced --plan none --steps 600

CPU, 1 thread; needs the training scenes (Debian package dataset-fashion-mnist).
"""
from __future__ import annotations

import argparse
import fcntl
import json
import sys
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
warnings.filterwarnings("ignore")

import graphred  # noqa: E402
from graphred.data import models, scenes  # noqa: E402
from graphred.plans import Plan, parse_plan  # noqa: E402

RESULTS = ROOT / "docs" / "results" / "victor_study.json"
TEST_SCENES_V2 = 300  # bench/train_models2.py's test split: 300 scenes, 1200 questions (the shipped file holds 50)


def decoder_speedup(est) -> float:
    """Predicted speedup of the decoder alone (its layers, the final norm and the LM head)."""
    def dec(e):
        stacks = {g.stack for g in e.groups if g.kind == "layer" and any(b.kind == "cross_modal_self" for b in g.blocks)}
        tower = {g.tower for g in e.groups if g.stack in stacks}
        return sum(g.flops for g in e.groups if g.stack in stacks or g.tower in tower or g.name.startswith("lm_head"))
    return dec(est) / dec(est.after)


def scene_sets(name: str):
    """``(train, test)`` for the trained model ``name``: the test scenes it ships with
    (``models.shipped_scenes(name)`` where graphred.data.models has it; for the ``vqa2-*`` models the
    300 test scenes they are scored on when trained), and its training scenes: a
    scene set to draw questions from, or for the ``vqa2-*`` models (whose scenes are generated on
    demand) a function ``(step, batch) -> SceneSet`` of fresh training scenes, four questions each."""
    test = models.shipped_scenes(name) if hasattr(models, "shipped_scenes") else scenes.load_shipped()
    if name.startswith("vqa2"):
        from graphred.data import scenes2

        test = scenes2.generate("test", TEST_SCENES_V2)  # the test split the vqa2 models are scored on

        def train(step: int, batch: int):
            per = -(-batch // 4)
            return scenes2.generate("train", range(step * per, (step + 1) * per))
        return train, test
    return scenes.load("train"), test


def scored(fast, name, test, tok, batch, n) -> dict:
    pred = models.predict(fast, name, test, batch, tokenizer=tok, limit=n)
    return models.accuracy_by_kind(test, pred, tokenizer=tok)


PROBES = ROOT / "docs" / "results" / "victor_probes.json"


def left_probe(module, name: str, tok, *, train_scenes: int = 1500, batch: int = 50, seed: int = 0) -> dict:
    """How well a linear probe reads the answer of the ``left`` questions ("what is left of the X ?")
    from states of ``module`` (the unreduced model or a Victor module): the question's class word (the
    last word before ``?``) at every hidden state, and the asked-about object's image token at the
    decoder's input and after layers 0 and 1 where the module still has it. Probes are fitted on
    ``train_scenes`` fresh training scenes (one left question each) and scored on the 300 test
    scenes; the answer prior (``nothing``) is given beside them."""
    from graphred.data import scenes2

    def feats(sset):
        qs = [q for q in sset.questions if q.kind == "left"]
        out: dict[str, list] = {}
        for i in range(0, len(qs), batch):
            b = qs[i:i + batch]
            inp = models.build_inputs(name, tok, sset, b)
            with torch.no_grad():
                hs = module(**inp, output_hidden_states=True).hidden_states
            for layer, h in enumerate(hs):
                out.setdefault(f"class word, hidden state {layer}", []).append(h[:, -2].float())
            first = (inp["input_ids"] == tok.image_id).float().argmax(1)
            cells = torch.tensor([int(np.flatnonzero(sset.layout[q.scene] == q.target)[0]) for q in b])
            for layer in (0, 1, 2):  # image tokens where the module still has them (Victor: the decoder's input)
                if layer == 0 or hs[layer].shape[1] == hs[0].shape[1]:
                    out.setdefault(f"object's image token, hidden state {layer}", []).append(
                        hs[layer][torch.arange(len(b)), first + cells].float())
        y = torch.tensor([tok.answer_index(q.answer) for q in qs])
        return {k: torch.cat(v) for k, v in out.items()}, y

    torch.manual_seed(seed)
    (xtr, ytr), (xte, yte) = feats(scenes2.generate("train", range(900_000, 900_000 + train_scenes))), \
        feats(scenes2.generate("test", TEST_SCENES_V2))
    res = {"prior": float((yte == torch.bincount(ytr).argmax()).float().mean()), "test_questions": len(yte)}
    for k in xtr:
        mu, sd = xtr[k].mean(0), xtr[k].std(0) + 1e-5
        a, b = (xtr[k] - mu) / sd, (xte[k] - mu) / sd
        lin = torch.nn.Linear(a.shape[1], len(tok.answers))
        opt = torch.optim.AdamW(lin.parameters(), lr=1e-2, weight_decay=1e-2)
        for _ in range(500):
            opt.zero_grad()
            F.cross_entropy(lin(a), ytr).backward()
            opt.step()
        with torch.no_grad():
            res[k] = float((lin(b).argmax(1) == yte).float().mean())
    return res


def finetune(name: str, plan_text: str, *, steps: int, batch: int = 50, lr: float = 5e-4, reducer_lr: float = 5e-3,
             schedule: str = "cosine", warmup: int = 30, kl: float = 1.0, hidden_mse: float = 0.0, seed: int = 0,
             limit: int = 1200, what: str | None = None, sets=None, label: str = "", hidden_at: str = "last",
             probe: bool = False) -> tuple[dict, object, object]:
    """Fine-tune the trained model ``name`` with ``plan_text`` in place (``"none"``: the unreduced
    model, ``what="model"``) by ``graphred.train``; accuracy by kind before and after. ``hidden_mse``
    weighs an MSE to the teacher's hidden states: ``hidden_at="last"``, the last position after every
    decoder layer; ``"kept"``, graphred's default pairing (:func:`graphred.training.kept_hidden`: every
    kept text position after every layer past the drop). ``probe``: the ``left`` answer probes of
    :func:`left_probe` on the fine-tuned module. Returns ``(row, fast, program)``."""
    torch.manual_seed(seed)
    teacher, tok = models.load_trained(name)
    teacher.eval()
    train, test = sets or scene_sets(name)
    n = min(limit, len(test.questions))
    n -= n % batch
    example = models.build_inputs(name, tok, test, test.questions[:batch])
    hidden = hidden_mse > 0
    if hidden_at not in ("last", "kept"):
        raise SystemExit(f"hidden_at={hidden_at!r}: choose last or kept")
    extra = {"output_hidden_states": True} if hidden else {}
    prog = graphred.capture(teacher, **example, **extra)
    plan = Plan() if plan_text == "none" else parse_plan(plan_text)
    est = graphred.estimate(prog, plan) if plan_text != "none" else None
    fast = graphred.transform(prog, plan)
    what = what or ("registers+model" if fast.reducer_parameters() else "model")
    before = scored(fast, name, test, tok, batch, n)
    print(f"[{label or plan_text}] before: {before}", flush=True)

    current = {}
    if callable(train):  # scenes generated per step
        def data(step: int) -> dict:
            sc = train(step, batch)
            current["qs"] = sc.questions[:batch]
            return {**models.build_inputs(name, tok, sc, current["qs"]), **extra}
    else:
        qs = train.questions
        gen = torch.Generator().manual_seed(seed)
        order = torch.randint(len(qs), (max(steps, 1), batch), generator=gen).tolist()

        def data(step: int) -> dict:
            current["qs"] = [qs[i] for i in order[step]]
            return {**models.build_inputs(name, tok, train, current["qs"]), **extra}

    def task(out, _b):
        return F.cross_entropy(models.training_logits(name, out), models.targets(name, tok, current["qs"]))

    def hidden_fn(out, _b):  # the last position (the question's last token) after every decoder layer
        return torch.stack([h[:, -1] for h in out.hidden_states[1:]], 1)

    res = graphred.train(fast, data, teacher=teacher, steps=steps, what=what, lr=lr, reducer_lr=reducer_lr,
                         temperature=2.0, kl_weight=kl, task_loss=task,
                         logits_fn=lambda out, b: models.training_logits(name, out), hidden_mse=hidden_mse,
                         hidden_fn=hidden_fn if hidden and hidden_at == "last" else None, seed=seed, schedule=schedule, warmup=warmup,
                         log_every=100, progress=False)
    after = scored(fast, name, test, tok, batch, n)
    print(f"[{label or plan_text}] after {steps} steps ({res.seconds:.0f} s): {after}", flush=True)
    row = {"name": label, "model": name, "plan": plan_text, "what": what, "steps": steps, "batch": batch, "lr": lr,
           "reducer_lr": reducer_lr, "schedule": schedule, "warmup": warmup, "kl": kl, "hidden_mse": hidden_mse,
           "seed": seed, "questions": n, "train_s": res.seconds, "threads": torch.get_num_threads(),
           "before": before, "after": after,
           "final_loss": sum(res.losses[-20:]) / max(len(res.losses[-20:]), 1),
           "predicted_speedup": float(est.speedup) if est is not None else 1.0,
           "predicted_decoder_speedup": decoder_speedup(est) if est is not None else 1.0}
    if hidden:
        row["hidden_at"] = hidden_at
    if probe:
        row["left_probe"] = left_probe(fast, name, tok, seed=seed)
        print(f"[{label or plan_text}] left probes: {row['left_probe']}", flush=True)
    return row, fast, prog


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--name", help="the row's name (required for a fine-tune)")
    ap.add_argument("--model", default="vqa-llava")
    ap.add_argument("--plan", default="victor:registers=8,layer=1", help="a plan, or 'none' (the unreduced model)")
    ap.add_argument("--what", default=None)
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--batch", type=int, default=50)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--reducer-lr", type=float, default=5e-3)
    ap.add_argument("--schedule", default="cosine")
    ap.add_argument("--warmup", type=int, default=30)
    ap.add_argument("--kl", type=float, default=1.0)
    ap.add_argument("--hidden-mse", type=float, default=0.0)
    ap.add_argument("--hidden-at", default="last", choices=("last", "kept"),
                    help="hidden-state MSE at the last position (every layer) or graphred's kept-position pairing")
    ap.add_argument("--probe", action="store_true", help="left-answer probes on the fine-tuned module (vqa2 models)")
    ap.add_argument("--probe-teacher", action="store_true",
                    help="only the left-answer probes of the unreduced model, to docs/results/victor_probes.json")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--limit", type=int, default=1200)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.probe_teacher:
        teacher, tok = models.load_trained(args.model)
        res = {"model": args.model, "module": "unreduced", **left_probe(teacher.eval(), args.model, tok, seed=args.seed)}
        print(res, flush=True)
        PROBES.write_text(json.dumps(res, indent=1) + "\n")
        return 0
    if not args.name:
        ap.error("--name is required for a fine-tune")
    row, _, _ = finetune(args.model, args.plan, steps=args.steps, batch=args.batch, lr=args.lr,
                         reducer_lr=args.reducer_lr, schedule=args.schedule, warmup=args.warmup, kl=args.kl,
                         hidden_mse=args.hidden_mse, seed=args.seed, limit=args.limit, what=args.what, label=args.name,
                         hidden_at=args.hidden_at, probe=args.probe)
    (ROOT / "bench" / "out").mkdir(exist_ok=True)
    with open(ROOT / "bench" / "out" / "victor_study.lock", "w") as lock:  # two runs may finish together
        fcntl.flock(lock, fcntl.LOCK_EX)
        rows = json.loads(RESULTS.read_text()) if RESULTS.exists() else []
        rows = [r for r in rows if r["name"] != row["name"]] + [row]
        RESULTS.write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
