"""A short fine-tune of a trained VQA model with the reducers in place (PuMer's recipe), with
``graphred.train`` (through ``graphred.training.finetune_shipped``, also ``graphred finetune``): the
transformed graph is trained directly (its custom ops have autograd), distilling from the
unreduced model (KL on the answer logits) plus the answer loss. Reports accuracy before and after,
beside the unreduced model's, on the shipped test questions; writes a section of docs/benchmarks.md.

    python bench/finetune_reduced.py --model vqa-llava --plan "pumer:prune=0.7,merge=0.2,layers=from:1"

Needs the training scenes (Debian package dataset-fashion-mnist). CPU, a few minutes.
"""
from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
warnings.filterwarnings("ignore")

import graphred  # noqa: E402
from graphred.training import finetune_shipped  # noqa: E402
from graphred.plans import parse_plan  # noqa: E402
from _common import publish  # noqa: E402

MARK = "bench_finetune"


def finetune(name: str, plan_text: str, steps: int, batch: int, lr: float, temperature: float, limit: int) -> dict:
    """graphred.train on the shipped model (graphred.training.finetune_shipped), plus the estimate."""
    r = finetune_shipped(name, plan_text, steps=steps, batch=batch, lr=lr, temperature=temperature, limit=limit,
                         log_every=50)
    est = graphred.estimate(r.pop("program"), parse_plan(plan_text))
    r.pop("fast")
    r["predicted_speedup"] = float(est.speedup)
    return r


def to_markdown(rows: list[dict]) -> str:
    out = [f"<!-- {MARK}:start (written by bench/finetune_reduced.py; do not edit by hand) -->",
           "### Fine-tuning with the reducers in place (graphred's own trained models, CPU)", "",
           "The transformed graph itself is trained (graphred's ops have autograd): answer loss + KL to the "
           "unreduced model's answer distribution, AdamW, batch and steps below. Accuracy on the shipped test "
           "questions. Target: within 1 point of unreduced after a short fine-tune.", "",
           "| model | plan | predicted speedup | unreduced | reduced, training-free | reduced, fine-tuned | gap after | steps (s) | target |",
           "|---|---|---:|---:|---:|---:|---:|---|---|"]
    for r in rows:
        gap = 100 * (r["unreduced"] - r["after"])
        out.append(f"| {r['model']} | `{r['plan']}` | {r['predicted_speedup']:.2f}x | {100 * r['unreduced']:.1f}% | "
                   f"{100 * r['before']:.1f}% | {100 * r['after']:.1f}% | {gap:+.1f} | {r['steps']} ({r['train_s']:.0f}) | "
                   f"{'met' if gap <= 1 else '**missed**'} |")
    out.append(f"<!-- {MARK}:end -->")
    return "\n".join(out)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", nargs="*", default=["vqa-llava"])
    ap.add_argument("--plan", default="pumer:prune=0.7,merge=0.2,layers=from:1")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=50)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--temperature", type=float, default=2.0)
    ap.add_argument("--limit", type=int, default=1000)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = [finetune(m, args.plan, args.steps, args.batch, args.lr, args.temperature, args.limit) for m in args.model]
    publish(to_markdown(rows), MARK, rows, "bench_finetune.json", write=not args.no_write)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
