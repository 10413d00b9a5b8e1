"""The ``graphred`` command line: ``graphred zoo``, ``capture``, ``analyze``, ``estimate``, ``bench``, ``demo``."""
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
    sub.add_parser("demo", help="the end-to-end demo on the embedded model").set_defaults(fn=cmd_demo)
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
