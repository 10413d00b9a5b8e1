"""Throughput of reduced models against the unreduced one, measured in the same run, with the
cost model's predicted speedup beside it; the cost of graphred's own scoring/selection ops against
the layers they serve; and transform time per zoo model.

    python bench/bench_reduce.py                # writes its section of docs/benchmarks.md
    python bench/bench_reduce.py --threads 1 --rounds 9 --no-write

Model: the zoo's ``llava-bench`` (LLaVA-1.5 shaped at reduced width: 576 image tokens, 40 text
tokens, 8 decoder layers at width 384; random weights, so this measures speed, not accuracy), batch 4,
CPU; then three of the plans again on ``llava-bench-1024`` (the same at width 1024).
"""
from __future__ import annotations

import argparse
import platform
import re
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.fx as fx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
warnings.filterwarnings("ignore")

import graphred  # noqa: E402
from graphred.fx_utils import module_path  # noqa: E402
from graphred.measure import median_times  # noqa: E402
from graphred.plans import fastv, prune, pumer, tome  # noqa: E402
from _common import publish  # noqa: E402

PLANS = {
    "fastv(layer=2, keep=0.25)": fastv(layer=2, keep=0.25),
    "fastv(layer=2, keep=0.5)": fastv(layer=2, keep=0.5),
    "pumer(prune=0.5, merge=0.2, layers=[2])": pumer(prune=0.5, merge=0.2, layers=[2]),
    "pumer(prune=0.3, merge=0.2, layers=[2, 4, 6])": pumer(prune=0.3, merge=0.2, layers=[2, 4, 6]),
    "prune(ratio=0.5, scorer=random, layers=[2])": prune(ratio=0.5, scorer="random", layers=[2]),
}
TARGET_RATIO = 0.85  # measured speedup >= 0.85 x predicted
MARK = "bench_reduce"


class _NodeTimer(fx.Interpreter):
    """Per-node wall time (the interpreter's own overhead is the same for every node)."""

    def __init__(self, gm):
        super().__init__(gm)
        self.times: dict[fx.Node, float] = {}

    def run_node(self, n):
        t0 = time.perf_counter()
        out = super().run_node(n)
        self.times[n] = self.times.get(n, 0.0) + time.perf_counter() - t0
        return out


_MERGING = ("bipartite_match", "merge_tokens")


def _op_overhead(reduced, inputs, repeats: int = 5) -> dict:
    """ms in graphred's ops (scoring and selection, merging, gathers of the token axis) against ms in the
    layers after the first reduction, from per-node wall times (warm-up run excluded)."""
    gm = reduced.graph_module
    from graphred.fx_utils import SIDE, flat_inputs, recorded

    flat = flat_inputs(gm, *((), inputs))
    timer = _NodeTimer(gm)
    with torch.no_grad():
        timer.run(*flat)  # warm-up: first calls pay one-off costs (allocator growth, lazy dispatch set-up)
        timer.times.clear()
        for _ in range(repeats):
            timer.run(*flat)
    nodes = list(gm.graph.nodes)
    first = next(i for i, n in enumerate(nodes) if n.op == "call_function" and str(n.target).startswith("graphred."))
    parts = {"scoring": 0.0, "merging": 0.0, "gathers": 0.0}
    served = 0.0
    for n in nodes[first:]:
        t = timer.times.get(n, 0.0) / repeats * 1e3
        if n.op != "call_function":
            continue
        target = str(n.target)
        mine = target.startswith("graphred.") or recorded(n, SIDE) or "graphred" in n.name
        if mine:
            part = "gathers" if "gather_tokens" in target else "merging" if any(m in target for m in _MERGING) else "scoring"
            parts[part] += t
        elif re.search(r"\.layers?\.\d+", module_path(n)):
            served += t
    ours = sum(parts.values())
    return {"ops_ms": ours, "served_ms": served, "ops_share": ours / served if served else float("nan"),
            **{f"{k}_ms": v for k, v in parts.items()}}


WIDE_MODEL = "llava-bench-1024"
WIDE_PLANS = ["fastv(layer=2, keep=0.25)", "pumer(prune=0.5, merge=0.2, layers=[2])",
              "pumer(prune=0.3, merge=0.2, layers=[2, 4, 6])"]


def _plan_rows(name: str, plans: dict, rounds: int, repeats: int) -> list[dict]:
    model, inputs = graphred.zoo.load(name)
    prog = graphred.capture(model, **inputs)
    rows = []
    for label, plan in plans.items():
        t0 = time.perf_counter()
        reduced = graphred.transform(prog, plan)
        t_transform = time.perf_counter() - t0
        est = graphred.estimate(prog, plan)
        base, fast = median_times(prog, reduced, inputs, rounds)
        overhead = _op_overhead(reduced, inputs, repeats)
        measured = base / fast
        rows.append({
            "plan": label, "tokens": f"{reduced.steps[0].get('length_after', '?')}..{reduced.steps[-1]['length_after']}" if reduced.steps else "",
            "base_ms": base * 1e3, "reduced_ms": fast * 1e3, "measured": measured,
            "predicted": float(est.speedup), "predicted_matmul": float(est.speedup_matmul),
            "ratio": measured / float(est.speedup), **overhead, "transform_s": t_transform,
        })
        print(f"{name} {label}: measured {measured:.2f}x, predicted {float(est.speedup):.2f}x, "
              f"ops {100 * overhead['ops_share']:.1f}% of served layers", flush=True)
    return rows


def run(threads: int, rounds: int, wide: bool = True) -> dict:
    torch.set_num_threads(threads)
    rows = _plan_rows("llava-bench", PLANS, rounds, repeats=5)
    # the same plans at a wider decoder: the ops' share of the layers should fall about as 1/width
    wide_rows = _plan_rows(WIDE_MODEL, {k: PLANS[k] for k in WIDE_PLANS}, max(3, rounds // 2), repeats=2) if wide else []
    zoo_rows = []
    for name in graphred.zoo.TEST_NAMES:
        m, kw = graphred.zoo.load(name)
        t0 = time.perf_counter()
        p = graphred.capture(m, **kw)
        t1 = time.perf_counter()
        report = graphred.analyze(p)
        t2 = time.perf_counter()
        plan = pumer(prune=0.3, merge=0.2) if report.cross_modal else tome(r=4)
        try:
            graphred.transform(p, plan)
            err = ""
        except graphred.GraphredError as e:
            err = type(e).__name__
        t3 = time.perf_counter()
        zoo_rows.append({"model": name, "plan": str(plan), "capture_s": t1 - t0, "analyze_s": t2 - t1,
                         "rewrite_s": t3 - t2, "total_s": t3 - t0, "error": err})
    return {"threads": threads, "rounds": rounds, "torch": torch.__version__, "cpu": platform.processor() or platform.machine(),
            "rows": rows, "wide_rows": wide_rows, "zoo": zoo_rows}


def _plan_table(rows: list[dict]) -> list[str]:
    out = ["| plan | sequence after steps | unreduced ms | reduced ms | measured | predicted (matmul) | measured / predicted | "
           "target | graphred ops / served layers | scoring + selection / matching + merging / gathers ms |",
           "|---|---|---:|---:|---:|---:|---:|---|---:|---:|"]
    for r in rows:
        ok = "met" if r["ratio"] >= TARGET_RATIO else "**missed**"
        ops_ok = "" if r["ops_share"] < 0.03 else " **(over 3%)**"
        out.append(f"| {r['plan']} | {r['tokens']} | {r['base_ms']:.0f} | {r['reduced_ms']:.0f} | {r['measured']:.2f}x | "
                   f"{r['predicted']:.2f}x ({r['predicted_matmul']:.2f}x) | {r['ratio']:.2f} | {ok} | "
                   f"{100 * r['ops_share']:.1f}% ({r['ops_ms']:.1f} / {r['served_ms']:.0f} ms){ops_ok} | "
                   f"{r['scoring_ms']:.1f} / {r['merging_ms']:.1f} / {r['gathers_ms']:.1f} |")
    return out


def to_markdown(res: dict) -> str:
    out = [f"<!-- {MARK}:start (written by bench/bench_reduce.py; do not edit by hand) -->",
           "### Reduction throughput on `llava-bench` (CPU)",
           "",
           f"CPU, {res['threads']} thread(s), torch {res['torch']}, batch 4, 576 image + 40 text tokens, random weights "
           f"(speed only). Median of {res['rounds']} alternating runs per model in one process; predicted = "
           "FLOPs before / after from `graphred.estimate` (all ops; matmul-only beside it). Target: measured >= "
           f"{TARGET_RATIO} x predicted; graphred's ops < 3% of the time of the layers they serve.",
           "",
           *_plan_table(res["rows"])]
    if res.get("wide_rows"):
        out += ["", f"The same plans on `{WIDE_MODEL}` (decoder width 1024, 16 heads; the same 576 + 40 tokens and "
                "batch 4), to show how graphred's share of the served layers scales with width:", "",
                *_plan_table(res["wide_rows"])]
    out += ["", "Capture + analysis + rewrite per zoo model (target: under 5 s):", "",
            "| model | plan | capture s | analyze s | rewrite s | total s | result |", "|---|---|---:|---:|---:|---:|---|"]
    for z in res["zoo"]:
        out.append(f"| {z['model']} | `{z['plan']}` | {z['capture_s']:.2f} | {z['analyze_s']:.2f} | {z['rewrite_s']:.2f} | "
                   f"{z['total_s']:.2f} | {z['error'] or 'ok'} |")
    out.append(f"<!-- {MARK}:end -->")
    return "\n".join(out)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--no-wide", action="store_true", help=f"skip the {WIDE_MODEL} rows (about 3 minutes)")
    args = ap.parse_args()
    res = run(args.threads, args.rounds, wide=not args.no_wide)
    publish(to_markdown(res), MARK, res, "bench_reduce.json", write=not args.no_write)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
