"""Why the remaining misses of the ``vqa2-*`` benchmark (issue 15) miss: measurements, not guesses.

    python bench/vqa2_diagnose.py                 # all parts: docs/results/vqa2_diagnosis.json
    python bench/vqa2_diagnose.py --parts cut     # only the image-cut accuracies

Parts:

* ``cut`` (text-informed pruning vs random and norm): the accuracy when the text stops seeing **every**
  image token from layer ``k`` on (decoder: an attention mask over the image columns for the text
  rows; BLIP: the cross-attention of text layers ``>= k`` skipped; ViLT: the text rows masked off the
  image columns), for every ``k``. Where pruning starts after the layer at which the cut costs nothing,
  no choice of kept tokens can beat random by 3 points: the answer has left the image tokens by then.
  Also which layers a ``layers=from:1`` plan prunes after (from the transformed graph's steps).
* ``towers``: each model's predicted FLOPs by tower (what no plan after the image tower can shrink).
* ``profile`` (measured / predicted on the decoder): for each PuMer plan and a random baseline,
  torch.profiler at one thread over the reduced graph: the time share of graphred's own ops
  (``graphred::*``: scoring, selection, gathers, merges) against their share of the predicted FLOPs
  (``Estimate.added_flops``), the node counts, and the fixed cost per call of the unreduced model
  (time at batch 1, extrapolated from batch sizes 10 and 50), which no FLOP count scales.
* ``finetune`` (the fine-tuned rows): the same plan's graph timed before and after a 2-step
  ``graphred.train``, and at the two batch sizes the sweep (50) and the fine-tune (40) time at.

bench/bench_vqa2.py renders the results into its section of docs/benchmarks.md.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
warnings.filterwarnings("ignore")

import graphred  # noqa: E402
from graphred.data import models, scenes2  # noqa: E402
from graphred.measure import median_times  # noqa: E402
from graphred.plans import parse_plan  # noqa: E402

OUT = ROOT / "docs" / "results" / "vqa2_diagnosis.json"


# --------------------------------------------------------------------------------------------
# The image cut: the text blind to every image token from layer k on
# --------------------------------------------------------------------------------------------


def text_layers(model, name: str) -> list:
    fam = models.family(name)
    if fam == "llava":
        return list(model.model.language_model.layers)
    if fam == "blip":
        return list(model.text_encoder.encoder.layer)
    return list(model.vilt.encoder.layer)


@contextlib.contextmanager
def image_cut(model, name: str, tok, kw: dict, k: int):
    """Within the block, text positions cannot read image tokens in layers ``>= k``."""
    fam = models.family(name)
    hooks = []
    layers = text_layers(model, name)
    if fam == "llava":
        img = kw["input_ids"] == tok.image_id  # (B, L)

        def pre(mod, args, kwargs):
            mask = kwargs.get("attention_mask")
            b, length = img.shape
            if mask is None:
                mask = torch.ones(length, length, dtype=torch.bool).tril()[None, None].expand(b, 1, -1, -1)
            cut = img[:, None, None, :] & ~torch.eye(length, dtype=torch.bool)[None, None]
            if mask.dtype == torch.bool:
                mask = mask & ~cut
            else:
                mask = mask.masked_fill(cut, torch.finfo(mask.dtype).min)
            kwargs["attention_mask"] = mask
            return args, kwargs

        for layer in layers[k:]:
            hooks.append(layer.register_forward_pre_hook(pre, with_kwargs=True))
    elif fam == "blip":
        def skip(mod, args, kwargs, output):  # no image tokens: the cross-attention block is the identity
            hidden = args[0] if args else kwargs["hidden_states"]
            return (hidden,) + tuple(output[1:]) if isinstance(output, tuple) else hidden

        for layer in layers[k:]:
            hooks.append(layer.crossattention.register_forward_hook(skip, with_kwargs=True))
    else:
        n_text = kw["input_ids"].shape[1]

        def pre(mod, args, kwargs):
            args = list(args)
            mask = args[1] if len(args) > 1 else kwargs.get("attention_mask")  # (B, 1, 1, L) additive
            length = mask.shape[-1]
            full = mask.expand(mask.shape[0], 1, length, length).clone()
            full[:, :, :n_text, n_text:] = torch.finfo(full.dtype).min
            if len(args) > 1:
                args[1] = full
            else:
                kwargs["attention_mask"] = full
            return tuple(args), kwargs

        for layer in layers[k:]:
            hooks.append(layer.register_forward_pre_hook(pre, with_kwargs=True))
    try:
        yield
    finally:
        for h in hooks:
            h.remove()


def blind(model, name: str, tok, k: int):
    """``model`` called as usual, its text blind to the image from layer ``k`` on."""
    def run(**kw):
        with image_cut(model, name, tok, kw, k):
            return model(**kw)
    return run


def by_kind(fn, name: str, tok, data, batch: int) -> dict[str, float]:
    """Accuracy by question kind, and ``count_bias``: the mean of (answered - true) count over the count
    questions (answers that are no number are left out)."""
    with torch.no_grad():
        pred = models.predict(fn, name, data, batch, tokenizer=tok)
    out = {k: round(v, 4) for k, v in models.accuracy_by_kind(data, pred, tok).items()}
    diffs = []
    for p, q in zip(pred.tolist(), data.questions):
        said = tok.answers[p]
        if q.kind == "count" and said in scenes2.NUMBERS:
            diffs.append(scenes2.NUMBERS.index(said) - scenes2.NUMBERS.index(q.answer))
    out["count_bias"] = round(statistics.mean(diffs), 3) if diffs else None
    return out


def part_cut(names: list[str], n_scenes: int, batch: int) -> dict:
    data = scenes2.generate("test", n_scenes)
    out = {}
    for name in names:
        model, tok = models.load_trained(name)
        n_layers = len(text_layers(model, name))
        base = by_kind(model, name, tok, data, batch)
        rows = {str(k): by_kind(blind(model, name, tok, k), name, tok, data, batch) for k in range(n_layers)}
        # where a `from:1` plan prunes (the transformed graph says), and PuMer / random / norm there by kind
        example = models.build_inputs(name, tok, data, data.questions[:batch])
        prog = graphred.capture(model, **example)
        starts = ["1", "0"] if models.family(name) == "llava" else ["1"]
        plans = {}
        where = None
        for start in starts:
            for text in (f"pumer:prune=0.5,merge=0,layers=from:{start}",
                         f"prune:ratio=0.5,scorer=random,layers=from:{start}",
                         f"prune:ratio=0.5,scorer=norm,layers=from:{start}"):
                fast = graphred.transform(prog, parse_plan(text))
                if where is None:
                    where = [{k: v for k, v in s.items() if isinstance(v, (int, str, float))} for s in fast.steps]
                plans[text] = by_kind(fast, name, tok, data, batch)
        out[name] = {"unreduced": base, "text_blind_to_image_from_layer": rows, "layers": n_layers,
                     "questions": len(data.questions), "from1_steps": where, "plans_at_0.5": plans}
        print(f"[{name}] unreduced {base}; text blind to the image from layer k: "
              + "; ".join(f"k={k} {v}" for k, v in rows.items()), flush=True)
        print(f"[{name}] pumer from:1 steps: {where}", flush=True)
        for t, v in plans.items():
            print(f"[{name}]   {t}: {v}", flush=True)
    return out


def part_towers(names: list[str], batch: int) -> dict:
    """Each model's predicted FLOPs by tower (graphred.estimate), at the sweep's batch."""
    data = scenes2.generate("test", batch // 4 + 1)
    out = {}
    for name in names:
        model, tok = models.load_trained(name)
        prog = graphred.capture(model, **models.build_inputs(name, tok, data, data.questions[:batch]))
        est = graphred.estimate(prog)
        out[name] = {"flops": int(est.flops),
                     "by_tower": {k or "<outside>": {"flops": int(v["flops"]), "share": round(v["flops"] / est.flops, 4),
                                                     "modalities": sorted(v["modalities"])}
                                  for k, v in est.towers().items()}}
        print(f"[{name}] {out[name]}", flush=True)
    return out


# --------------------------------------------------------------------------------------------
# Where the reduced decoder's time goes
# --------------------------------------------------------------------------------------------


def profile_ops(fn, kwargs: dict, reps: int = 3) -> tuple[float, float, dict, dict]:
    """(seconds per call in graphred::* ops, seconds per call in all ops, per graphred op seconds,
    per op self seconds)."""
    from torch.profiler import ProfilerActivity, profile

    with torch.no_grad():
        fn(**kwargs)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(reps):
                fn(**kwargs)
    per: dict[str, float] = {}
    self_s: dict[str, float] = {}
    for ev in prof.key_averages():
        if ev.key.startswith("graphred::"):
            per[ev.key] = ev.cpu_time_total / 1e6 / reps
        self_s[ev.key] = ev.self_cpu_time_total / 1e6 / reps
    return sum(per.values()), sum(self_s.values()), per, self_s


def fixed_cost(prog, name: str, tok, data) -> dict:
    """The unreduced model's time at batch 10 and 50, and its extrapolation to batch 0."""
    t = {}
    for b in (10, 50):
        kw = models.build_inputs(name, tok, data, data.questions[:b])
        t[b] = median_times(prog, prog, kw, 5)[0]
    per_q = (t[50] - t[10]) / 40
    return {"seconds_batch10": round(t[10], 4), "seconds_batch50": round(t[50], 4),
            "fixed_seconds": round(t[10] - 10 * per_q, 4), "fixed_share_at_50": round((t[10] - 10 * per_q) / t[50], 3)}


def part_profile(name: str, plans: list[str], n_scenes: int, batch: int, rounds: int) -> dict:
    model, tok = models.load_trained(name)
    data = scenes2.generate("test", n_scenes)
    example = models.build_inputs(name, tok, data, data.questions[:batch])
    prog = graphred.capture(model, **example)
    n_base = sum(1 for n in prog.graph_module.graph.nodes if n.op == "call_function")
    rows = []
    _, _, _, base_ops = profile_ops(prog, example)
    for text in plans:
        plan = parse_plan(text)
        fast = graphred.transform(prog, plan)
        est = graphred.estimate(prog, plan)
        tb, tf = median_times(prog, fast, example, rounds)
        g_s, tot_s, per, _ = profile_ops(fast, example)
        flop_share = est.after.added_flops / est.after.flops
        pred = float(est.speedup)
        n_fast = sum(1 for n in fast.graph_module.graph.nodes if n.op == "call_function")
        # the reduced run if graphred's ops took their FLOP share of the predicted time
        t_ideal_ops = tf - g_s * tf / tot_s + flop_share * tb / pred
        rows.append({"plan": text, "predicted": round(pred, 3), "measured": round(tb / tf, 3),
                     "measured_over_predicted": round(tb / tf / pred, 3),
                     "graphred_ops_time_share": round(g_s / tot_s, 4), "graphred_ops_flop_share": round(flop_share, 4),
                     "graphred_ops": {k: round(v * 1e3, 2) for k, v in sorted(per.items(), key=lambda kv: -kv[1])},
                     "ratio_if_ops_at_flop_share": round(tb / t_ideal_ops / pred, 3),
                     "profiled_ms_unreduced": round(1e3 * sum(base_ops.values()), 1),
                     "profiled_ms_reduced": round(1e3 * tot_s, 1),
                     "nodes_unreduced": n_base, "nodes_reduced": n_fast,
                     "seconds_unreduced": round(tb, 4), "seconds_reduced": round(tf, 4)})
        r = rows[-1]
        print(f"[{name}] {text:45s} pred {pred:.2f}x meas {tb / tf:.2f}x ({tb / tf / pred:.2f}); graphred ops "
              f"{100 * r['graphred_ops_time_share']:.1f}% of time vs {100 * flop_share:.2f}% of FLOPs "
              f"{r['graphred_ops']}; ratio if at FLOP share {r['ratio_if_ops_at_flop_share']:.2f}; nodes "
              f"{n_base} -> {n_fast}", flush=True)
    return {"model": name, "batch": batch, "threads": torch.get_num_threads(), "rows": rows,
            "fixed_cost": fixed_cost(prog, name, tok, data)}


def part_finetune(name: str, plan_text: str, n_scenes: int, rounds: int) -> dict:
    """The plan's graph before and after a 2-step graphred.train, timed at batch 50 and 40."""
    import torch.nn.functional as F

    from graphred.training import train

    model, tok = models.load_trained(name)
    data = scenes2.generate("test", n_scenes)
    out = {"plan": plan_text}
    example = models.build_inputs(name, tok, data, data.questions[:50])
    prog = graphred.capture(model, **example)
    plan = parse_plan(plan_text)
    fast = graphred.transform(prog, plan)
    est = graphred.estimate(prog, plan)
    out["predicted"] = round(float(est.speedup), 3)
    for b in (50, 40):
        kw = models.build_inputs(name, tok, data, data.questions[:b])
        tb, tf = median_times(prog, fast, kw, rounds)
        out[f"training_free_batch{b}"] = round(tb / tf, 3)
    tuned = graphred.transform(prog, plan)
    cur = {}

    def batches(step):
        sc = scenes2.generate("train", range(500_000 + 10 * step, 500_000 + 10 * step + 10))
        cur["qs"] = sc.questions
        return models.build_inputs(name, tok, sc, sc.questions)

    def task(o, _b):
        return F.cross_entropy(models.training_logits(name, o), models.targets(name, tok, cur["qs"]))

    train(tuned, batches, teacher=model, steps=2, what="model", lr=1e-6, temperature=2.0, task_loss=task,
          logits_fn=lambda o, b: models.training_logits(name, o), seed=0, log_every=0)
    for b in (50, 40):
        kw = models.build_inputs(name, tok, data, data.questions[:b])
        tb, tf = median_times(prog, tuned, kw, rounds)
        out[f"after_train_batch{b}"] = round(tb / tf, 3)
    kw = models.build_inputs(name, tok, data, data.questions[:50])
    ta, tt = median_times(fast, tuned, kw, rounds)
    out["trained_over_training_free_seconds"] = round(tt / ta, 3)
    print(f"[{name}] {plan_text}: {out}", flush=True)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", nargs="+", default=["cut", "towers", "profile", "finetune"],
                    choices=["cut", "towers", "profile", "finetune"])
    ap.add_argument("--models", nargs="+", default=list(models.MODEL_NAMES_V2))
    ap.add_argument("--scenes", type=int, default=100)
    ap.add_argument("--batch", type=int, default=50)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    res = json.loads(OUT.read_text()) if OUT.exists() else {}
    t0 = time.perf_counter()
    if "cut" in args.parts:
        res.setdefault("cut", {}).update(part_cut(args.models, args.scenes, args.batch))
    if "towers" in args.parts:
        res.setdefault("towers", {}).update(part_towers(args.models, args.batch))
    if "profile" in args.parts:
        plans = ["pumer:prune=0.3,merge=0,layers=from:1", "pumer:prune=0.3,merge=0.2,layers=from:1",
                 "pumer:prune=0.5,merge=0.2,layers=from:1", "pumer:prune=0.7,merge=0.2,layers=from:1",
                 "pumer:prune=0.5,merge=0,layers=from:0", "pumer:prune=0.5,merge=0.2,layers=from:0",
                 "prune:ratio=0.5,scorer=random,layers=from:1"]
        res["profile"] = part_profile("vqa2-llava", plans, args.scenes, args.batch, args.rounds)
    if "finetune" in args.parts:
        res["finetune"] = part_finetune("vqa2-llava", "pumer:prune=0.5,merge=0.2,layers=from:0", args.scenes,
                                        args.rounds)
    res["note"] = f"bench/vqa2_diagnose.py, {args.threads} thread(s), CPU, on a shared, loaded 2-core machine"
    print(f"{time.perf_counter() - t0:.0f}s")
    if not args.no_write:
        OUT.write_text(json.dumps(res, indent=1) + "\n")
        print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
