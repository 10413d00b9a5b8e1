"""Throughput of reduced models against the unreduced one, measured in the same run, with the
cost model's predicted speedup beside it; the cost of graphred's own scoring/selection ops against
the layers they serve; and transform time per zoo model.

    python bench/bench_reduce.py                # writes its section of docs/benchmarks.md
    python bench/bench_reduce.py --threads 1 --rounds 9 --no-write

Model: the zoo's ``llava-bench`` (LLaVA-1.5 shaped at reduced width: 576 image tokens, 40 text
tokens, 8 decoder layers; random weights, so this measures speed, not accuracy), batch 4, CPU.
"""
from __future__ import annotations

import argparse
import json
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
from _common import write_section  # noqa: E402

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


def _op_overhead(reduced, inputs, repeats: int = 3) -> tuple[float, float, float]:
    """(ms in graphred's side computation + gathers, ms in the layers after the first reduction, share)."""
    gm = reduced.graph_module
    from graphred.analysis.provenance import _flat_inputs

    flat = _flat_inputs(gm, *((), inputs))
    timer = _NodeTimer(gm)
    with torch.no_grad():
        timer.run(*flat)  # warm-up: first calls pay one-off costs (allocator growth, lazy dispatch set-up)
        timer.times.clear()
        for _ in range(repeats):
            timer.run(*flat)
    nodes = list(gm.graph.nodes)
    first = next(i for i, n in enumerate(nodes) if n.op == "call_function" and str(n.target).startswith("graphred."))
    ours, served = 0.0, 0.0
    for n in nodes[first:]:
        t = timer.times.get(n, 0.0) / repeats
        if n.op != "call_function":
            continue
        mine = str(n.target).startswith("graphred.") or n.meta.get("graphred_side") or "graphred" in n.name
        if mine or module_path(n) == "":
            ours += t if mine else 0.0
            continue
        if re.search(r"\.layers?\.\d+", module_path(n)):
            served += t
    return ours * 1e3, served * 1e3, ours / served if served else float("nan")


def run(threads: int, rounds: int) -> dict:
    torch.set_num_threads(threads)
    model, inputs = graphred.zoo.load("llava-bench")
    prog = graphred.capture(model, **inputs)
    rows = []
    for label, plan in PLANS.items():
        t0 = time.perf_counter()
        reduced = graphred.transform(prog, plan)
        t_transform = time.perf_counter() - t0
        est = graphred.estimate(prog, plan)
        base, fast = median_times(prog, reduced, inputs, rounds)
        ours_ms, served_ms, share = _op_overhead(reduced, inputs)
        measured = base / fast
        rows.append({
            "plan": label, "tokens": f"{reduced.steps[0].get('length_after', '?')}..{reduced.steps[-1]['length_after']}" if reduced.steps else "",
            "base_ms": base * 1e3, "reduced_ms": fast * 1e3, "measured": measured,
            "predicted": float(est.speedup), "predicted_matmul": float(est.speedup_matmul),
            "ratio": measured / float(est.speedup), "ops_ms": ours_ms, "served_ms": served_ms, "ops_share": share,
            "transform_s": t_transform,
        })
        print(f"{label}: measured {measured:.2f}x, predicted {float(est.speedup):.2f}x, ops {100 * share:.1f}% of served layers", flush=True)
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
            "rows": rows, "zoo": zoo_rows}


def to_markdown(res: dict) -> str:
    out = [f"<!-- {MARK}:start (written by bench/bench_reduce.py; do not edit by hand) -->",
           "### Reduction throughput on `llava-bench` (CPU)",
           "",
           f"CPU, {res['threads']} thread(s), torch {res['torch']}, batch 4, 576 image + 40 text tokens, random weights "
           f"(speed only). Median of {res['rounds']} alternating runs per model in one process; predicted = "
           "FLOPs before / after from `graphred.estimate` (all ops; matmul-only beside it). Target: measured >= "
           f"{TARGET_RATIO} x predicted; graphred's ops < 3% of the time of the layers they serve.",
           "",
           "| plan | sequence after steps | unreduced ms | reduced ms | measured | predicted (matmul) | measured / predicted | target | graphred ops / served layers |",
           "|---|---|---:|---:|---:|---:|---:|---|---:|"]
    for r in res["rows"]:
        ok = "met" if r["ratio"] >= TARGET_RATIO else "**missed**"
        ops_ok = "" if r["ops_share"] < 0.03 else " **(over 3%)**"
        out.append(f"| {r['plan']} | {r['tokens']} | {r['base_ms']:.0f} | {r['reduced_ms']:.0f} | {r['measured']:.2f}x | "
                   f"{r['predicted']:.2f}x ({r['predicted_matmul']:.2f}x) | {r['ratio']:.2f} | {ok} | "
                   f"{100 * r['ops_share']:.1f}% ({r['ops_ms']:.1f} / {r['served_ms']:.0f} ms){ops_ok} |")
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
    args = ap.parse_args()
    res = run(args.threads, args.rounds)
    md = to_markdown(res)
    print(md)
    out = ROOT / "bench" / "out"
    out.mkdir(exist_ok=True)
    (out / "bench_reduce.json").write_text(json.dumps(res, indent=2))
    if not args.no_write:
        write_section(md, MARK)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
