"""The ``graphred`` command line: ``graphred zoo``, ``capture``, ``analyze``, ``estimate``, ``plan``, ``bench``,
``finetune``, ``demo``."""
from __future__ import annotations

import argparse
import json
import sys
import time
import warnings

from . import __version__
from .errors import GraphredError, GraphredWarning


def _load(spec: str, device: str = "cpu"):
    from . import zoo

    return zoo.resolve(spec, device=device)


def cmd_zoo(args) -> int:
    from . import zoo

    names = zoo.names()
    width = max(len(n) for n in names)
    for n in names:
        print(f"{n:<{width}}  {zoo.describe(n)}")
    return 0


def cmd_capture(args) -> int:
    from .program import capture

    model, kwargs, name = _load(args.model)
    t0 = time.perf_counter()
    prog = capture(model, **kwargs)
    dt = time.perf_counter() - t0
    ops = sum(1 for n in prog.graph.nodes if n.op == "call_function")
    print(f"captured {name} ({prog.model_class}) with {prog.method}: {ops} aten ops in {dt:.2f} s")
    for note in prog.notes:
        print(f"  note: {note}")
    return 0


def cmd_analyze(args) -> int:
    from .analysis.report import analyze
    from .program import capture

    model, kwargs, name = _load(args.model)
    report = analyze(capture(model, **kwargs))
    print(json.dumps(report.to_dict(), indent=2) if args.json else report)
    return 0


def cmd_estimate(args) -> int:
    from .analysis.cost.estimate import estimate_model
    from .plans import parse_plan

    plan = parse_plan(args.plan) if args.plan else None
    est = estimate_model(args.model, plan)
    print(json.dumps(est.to_dict(), indent=2) if args.json else est)
    return 0


def cmd_demo(args) -> int:
    from .demo import run_demo

    return run_demo()


def cmd_bench(args) -> int:
    from .bench import run_bench

    return run_bench(args.model, args.plan, repeats=args.repeats, as_json=args.json, threads=args.threads)


# Example commands shown in each subcommand's --help (tests/test_docs.py runs them).
EXAMPLES: dict[str, list[str]] = {
    "capture": ["graphred capture clip"],
    "analyze": ["graphred analyze llava"],
    "estimate": ["graphred estimate llava --plan fastv:layer=1,keep=0.5",
                 "graphred estimate llava --plan pumer:prune=0.3,merge=0.2 --json"],
    "bench": ["graphred bench llava --plan fastv:layer=1,keep=0.5 --repeats 3 --threads 1"],
}


def _epilog(name: str) -> str | None:
    lines = EXAMPLES.get(name)
    return "examples:\n" + "\n".join("  " + ln for ln in lines) if lines else None


def _plan_inputs(spec: str, n_calibration: int, batch: int):
    """``(program, calibration batches)`` for ``graphred plan``: a trained VQA model (``vqa-*``) is
    calibrated on shipped scenes the accuracy benchmark does not score (the last questions); a zoo model
    or model directory on its example inputs with the float inputs (images) redrawn, seeded."""
    import torch

    from .program import capture

    from .data import models

    if spec in models.MODEL_NAMES:
        from .data import scenes

        model, tok = models.load_trained(spec)
        test = scenes.load_shipped()
        qs = test.questions
        example = models.build_inputs(spec, tok, test, qs[:batch])
        calib = [models.build_inputs(spec, tok, test, qs[len(qs) - (i + 1) * batch: len(qs) - i * batch])
                 for i in range(n_calibration)]
        return capture(model, **example), calib
    model, kwargs, _ = _load(spec)
    gen = torch.Generator().manual_seed(0)
    calib = []
    for _ in range(n_calibration):
        calib.append({k: torch.randn(v.shape, generator=gen, dtype=v.dtype) if isinstance(v, torch.Tensor)
                      and v.is_floating_point() else v for k, v in kwargs.items()})
    return capture(model, **kwargs), calib


def cmd_plan(args) -> int:
    from .plans import auto

    methods = tuple(m.strip() for m in args.methods.split(",")) if args.methods else None
    prog, calib = _plan_inputs(args.model, args.calibration, args.batch)
    kw = {"speedup": args.speedup, "flops": args.flops, "memory": args.memory, "kv_cache": args.kv_cache,
          "calibration": calib or None, "trained": args.trained}
    if methods:
        kw["methods"] = methods
    plan = auto(prog, **kw)
    print(plan.explain(), file=sys.stderr)
    print(plan)
    return 0


def cmd_finetune(args) -> int:
    from .training import finetune_shipped

    r = finetune_shipped(args.model, args.plan, steps=args.steps, batch=args.batch, what=args.what, lr=args.lr,
                         reducer_lr=args.reducer_lr, limit=args.limit, seed=args.seed, checkpoint=args.checkpoint,
                         resume=args.resume, out=args.out, log_every=args.log_every, schedule=args.schedule,
                         warmup=args.warmup)
    if "after" in r:
        print(f"{r['model']} {r['plan']} ({r['what']}, {r['steps']} steps, {r['train_s']:.0f} s): accuracy "
              f"{100 * r['unreduced']:.1f}% unreduced, {100 * r['before']:.1f}% before, {100 * r['after']:.1f}% after")
    if args.out:
        print(f"saved to {args.out} (reload with graphred.load_reducer)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="graphred", description="Token reduction for vision-language models, as a compiler.")
    p.add_argument("--version", action="version", version=f"graphred {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("zoo", help="list the built-in tiny models").set_defaults(fn=cmd_zoo)
    s = sub.add_parser("capture", help="capture MODEL (zoo name or HF model directory) and summarise the graph", epilog=_epilog("capture"),
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    s.add_argument("model")
    s.set_defaults(fn=cmd_capture)
    s = sub.add_parser("analyze", help="token provenance and attention blocks of MODEL", epilog=_epilog("analyze"),
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    s.add_argument("model")
    s.add_argument("--json", action="store_true")
    s.set_defaults(fn=cmd_analyze)
    s = sub.add_parser("estimate", help="predicted FLOPs / memory of MODEL, before and after --plan", epilog=_epilog("estimate"),
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    s.add_argument("model")
    s.add_argument("--plan", default=None, help="a plan, e.g. pumer:prune=0.3,merge=0.2 or fastv:layer=2,keep=0.5 (layer < the decoder's layer count)")
    s.add_argument("--json", action="store_true")
    s.set_defaults(fn=cmd_estimate)
    s = sub.add_parser("bench", help="measured speedup of --plan on MODEL against the unreduced model", epilog=_epilog("bench"),
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    s.add_argument("model")
    s.add_argument("--plan", required=True, help="the plan to time, e.g. fastv:layer=1,keep=0.5")
    s.add_argument("--repeats", type=int, default=5, help="timed calls of each model (median; default 5)")
    s.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's own)")
    s.add_argument("--json", action="store_true")
    s.set_defaults(fn=cmd_bench)
    s = sub.add_parser("plan", help="choose a plan for a budget (prints it in text form, ready for --plan)",
                       description="Choose the plan expected to lose the least accuracy within a budget. The "
                                   "candidates table goes to stderr; the chosen plan's text form to stdout.")
    s.add_argument("model", help="a zoo name, a trained VQA model (vqa-llava, vqa-vilt, vqa-blip) or a model directory")
    s.add_argument("--speedup", type=float, default=None, help="predicted speedup to reach, e.g. 2")
    s.add_argument("--flops", type=int, default=None, help="FLOPs ceiling after the plan")
    s.add_argument("--memory", type=int, default=None, help="peak memory ceiling (activations + weights, bytes)")
    s.add_argument("--kv-cache", dest="kv_cache", type=int, default=None, help="KV-cache ceiling (bytes)")
    s.add_argument("--calibration", type=int, default=2, help="calibration batches for the quality proxy (0: cost model alone)")
    s.add_argument("--batch", type=int, default=16, help="batch size of a trained model's calibration batches")
    s.add_argument("--methods", default=None, help="comma-separated subset of fastv,pumer,tome,victor")
    s.add_argument("--trained", action="store_true", help="also consider plans that need training (victor)")
    s.set_defaults(fn=cmd_plan)
    sub.add_parser("demo", help="the end-to-end demo on the embedded model").set_defaults(fn=cmd_demo)
    s = sub.add_parser("finetune", help="fine-tune a shipped VQA model (vqa-llava, vqa-vilt, vqa-blip) with --plan in place")
    s.add_argument("model")
    s.add_argument("--plan", required=True, help="e.g. victor:registers=8,layer=1 or pumer:prune=0.7,merge=0.2")
    s.add_argument("--steps", type=int, default=300)
    s.add_argument("--batch", type=int, default=50)
    s.add_argument("--what", choices=["registers", "registers+model", "model"], default=None)
    s.add_argument("--lr", type=float, default=1e-4)
    s.add_argument("--reducer-lr", type=float, default=3e-3)
    s.add_argument("--schedule", choices=["constant", "cosine"], default="constant")
    s.add_argument("--warmup", type=int, default=0, help="steps of linear learning-rate warm-up")
    s.add_argument("--limit", type=int, default=1000, help="test questions to evaluate on (0: none)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--checkpoint", default=None, help="safetensors checkpoint written during training")
    s.add_argument("--resume", action="store_true")
    s.add_argument("--out", default=None, help="save the fine-tuned reducer (and weights) here")
    s.add_argument("--log-every", type=int, default=0)
    s.set_defaults(fn=cmd_finetune)
    return p


def _show_warning(message, category, filename, lineno, file=None, line=None, _default=warnings.showwarning):
    """graphred's own warnings as one line each (``graphred: warning: ...``); others as Python shows them."""
    if isinstance(category, type) and issubclass(category, GraphredWarning):
        print(f"graphred: warning: {message}", file=sys.stderr)
    else:
        _default(message, category, filename, lineno, file, line)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    with warnings.catch_warnings():
        warnings.showwarning = _show_warning
        return _run(args)


def _run(args) -> int:
    try:
        return args.fn(args)
    except (GraphredError, ValueError) as e:  # bad plans, models, inputs: one clear line, no traceback
        print(f"graphred: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
