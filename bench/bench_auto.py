"""``graphred.plans.auto`` on the project's own trained VQA models: does the label-free proxy rank
plans as accuracy does, and is the chosen plan as accurate as the best hand plan of the sweep?

    python bench/bench_auto.py                      # writes docs/benchmarks.md's section + docs/results/auto.json
    python bench/bench_auto.py --limit 300 --no-write

For each model, every sweep plan of bench/bench_vqa.py gets its predicted speedup (``estimate``),
its proxy (the output divergence from the unreduced model on calibration batches: shipped test
questions the accuracy does not score, the last ones) and its accuracy (the first ``--limit``
questions). Spearman's rank correlation is taken between accuracy and the negated proxy (a smaller
divergence should mean a higher accuracy). Then ``auto`` chooses plans for speedups 1.5x and 2x
on the decoder model and is compared with the most accurate hand plan predicted at or above the
same speedup. CPU, 1 thread. All accuracies come from models this project trained itself.
"""
from __future__ import annotations

import argparse
import json
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
from graphred.autoplan import calibration_divergence  # noqa: E402
from graphred.data import models, scenes  # noqa: E402
from bench_vqa import plans_for  # noqa: E402
from _common import publish  # noqa: E402

MARK = "bench_auto"
BUDGETS = (1.5, 2.0)


def ranks(xs: list[float]) -> list[float]:
    """Ranks 1..n, ties sharing their mean rank."""
    order = sorted(range(len(xs)), key=lambda i: xs[i])
    r = [0.0] * len(xs)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and xs[order[j + 1]] == xs[order[i]]:
            j += 1
        for k in range(i, j + 1):
            r[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return r


def spearman(a: list[float], b: list[float]) -> float:
    ra, rb = ranks(a), ranks(b)
    n = len(a)
    ma, mb = sum(ra) / n, sum(rb) / n
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    va = sum((x - ma) ** 2 for x in ra) ** 0.5
    vb = sum((y - mb) ** 2 for y in rb) ** 0.5
    return cov / (va * vb) if va and vb else float("nan")


def run_model(name: str, limit: int, batch: int, n_calib: int) -> dict:
    model, tok = models.load_trained(name)
    test = scenes.load_shipped()
    qs = test.questions
    n = min(limit, len(qs) - n_calib * batch)
    n -= n % batch
    calib = [models.build_inputs(name, tok, test, qs[len(qs) - (i + 1) * batch: len(qs) - i * batch])
             for i in range(n_calib)]
    prog = graphred.capture(model, **calib[0])
    with torch.no_grad():
        refs = [prog(**b) for b in calib]
    base_acc = models.evaluate(prog, name, test, batch, tokenizer=tok, limit=n)
    rows = []
    for method, plans in plans_for(name).items():
        for plan, _ in plans:
            try:
                fast = graphred.transform(prog, plan)
            except graphred.GraphredError as e:
                print(f"  {plan}: {str(e).splitlines()[0][:100]}", file=sys.stderr)
                continue
            est = graphred.estimate(prog, plan)
            rows.append({"model": name, "method": method, "plan": str(plan), "predicted_speedup": est.speedup,
                         "proxy": calibration_divergence(fast, calib, refs),
                         "accuracy": models.evaluate(fast, name, test, batch, tokenizer=tok, limit=n)})
            print(f"  {name} {str(plan):<48} {rows[-1]['predicted_speedup']:.2f}x proxy {rows[-1]['proxy']:.4f} "
                  f"acc {rows[-1]['accuracy']:.3f}", file=sys.stderr)
    rho = spearman([r["accuracy"] for r in rows], [-r["proxy"] for r in rows])
    auto_rows = []
    if name == "vqa-llava":
        for s in BUDGETS:
            t0 = time.perf_counter()
            plan = graphred.plans.auto(prog, speedup=s, calibration=calib)
            secs = time.perf_counter() - t0
            acc = models.evaluate(graphred.transform(prog, plan), name, test, batch, tokenizer=tok, limit=n)
            hand = [r for r in rows if r["predicted_speedup"] >= s]
            best = max(hand, key=lambda r: r["accuracy"]) if hand else None
            fastest = max(rows, key=lambda r: r["predicted_speedup"])
            auto_rows.append({"model": name, "budget": s, "plan": str(plan),
                              "predicted_speedup": plan.choice.predicted_speedup, "proxy": plan.choice.chosen.proxy,
                              "accuracy": acc, "best_hand_accuracy": best["accuracy"] if best else None,
                              "best_hand_plan": best["plan"] if best else None,
                              "fastest_hand_plan": fastest["plan"], "fastest_hand_speedup": fastest["predicted_speedup"],
                              "fastest_hand_accuracy": fastest["accuracy"], "seconds": secs,
                              "candidates": len(plan.choice.candidates)})
            print(plan.explain(), file=sys.stderr)
    return {"model": name, "questions": n, "calibration": n_calib * batch, "unreduced_accuracy": base_acc,
            "spearman": rho, "rows": rows, "auto": auto_rows}


def render(results: list[dict]) -> str:
    lines = ["<!-- bench_auto:start (written by bench/bench_auto.py) -->",
             "### Choosing plans for a budget: `graphred.plans.auto`",
             "",
             "Does the label-free proxy (output divergence from the unreduced model on calibration questions the "
             "accuracy does not score) rank the sweep plans of the accuracy benchmark as their accuracy does? "
             "Spearman's rank correlation between accuracy and the negated proxy (target >= 0.8). Models trained by "
             "this project (bench/train_models.py); CPU, 1 thread.",
             "",
             "| model | plans | questions | calibration questions | unreduced acc. | Spearman |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in results:
        lines.append(f"| {r['model']} | {len(r['rows'])} | {r['questions']} | {r['calibration']} | "
                     f"{100 * r['unreduced_accuracy']:.1f}% | {r['spearman']:.2f} |")
    autos = [a for r in results for a in r["auto"]]
    if autos:
        lines += ["", "`auto` against the most accurate hand plan of the sweep predicted at or above the same speedup "
                      "(target: at least as accurate; choosing under 60 s):", "",
                  "| model | budget | auto's plan | predicted | proxy | accuracy | best hand plan | its accuracy | choosing s |",
                  "|---|---:|---|---:|---:|---:|---|---:|---:|"]
        for a in autos:
            if a["best_hand_plan"] is None:  # no hand plan reaches the budget: show the fastest one
                hand = (f"none reaches {a['budget']:g}x; the fastest: `{a['fastest_hand_plan']}` "
                        f"({a['fastest_hand_speedup']:.2f}x)")
                hacc = f"{100 * a['fastest_hand_accuracy']:.1f}%"
            else:
                hand, hacc = f"`{a['best_hand_plan']}`", f"{100 * a['best_hand_accuracy']:.1f}%"
            lines.append(f"| {a['model']} | {a['budget']:g}x | `{a['plan']}` | {a['predicted_speedup']:.2f}x | "
                         f"{a['proxy']:.4f} | {100 * a['accuracy']:.1f}% | {hand} | {hacc} | {a['seconds']:.0f} |")
    lines.append("<!-- bench_auto:end -->")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="*", default=list(models.MODEL_NAMES))
    ap.add_argument("--limit", type=int, default=600)
    ap.add_argument("--batch", type=int, default=50)
    ap.add_argument("--calibration", type=int, default=2, help="calibration batches")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    results = [run_model(m, args.limit, args.batch, args.calibration) for m in args.models]
    md = render(results)
    publish(md, MARK, results, "bench_auto.json", write=not args.no_write)
    if not args.no_write:
        out = ROOT / "docs" / "results"
        out.mkdir(parents=True, exist_ok=True)
        rows = [{k: a[k] for k in ("model", "budget", "plan", "predicted_speedup", "proxy", "accuracy",
                                   "best_hand_accuracy")} for r in results for a in r["auto"]]
        (out / "auto.json").write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
