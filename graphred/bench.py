"""``graphred bench MODEL --plan SPEC``: the measured speedup of a plan against the unreduced model, in the
same run, with the cost model's predicted speedup beside it.

>>> from graphred.bench import bench
>>> r = bench("llava", "fastv:layer=1,keep=0.5", rounds=3)
>>> r["measured_speedup"] > 0 and r["predicted_speedup"] > 1
True
"""
from __future__ import annotations

import json
import time
from typing import Any

from .errors import GraphredError

__all__ = ["bench", "run_bench", "format_bench"]

# below this many milliseconds per call, fixed per-call and per-op overheads dominate the time
_SMALL_MS = 5.0


def bench(model: str, plan: Any, rounds: int = 5) -> dict[str, Any]:
    """Time the captured model and ``graphred.transform(program, plan)`` alternately on the example
    inputs (median of ``rounds`` calls each, after one warm-up: :func:`graphred.measure.median_times`) and
    put the measured ratio beside the estimate's predicted FLOP speedup. ``model`` is a zoo name or a
    local Hugging Face model directory (a directory with only ``config.json`` gets random CPU weights:
    fine for timing). Returns a JSON-serialisable dict."""
    import torch

    from . import zoo
    from .analysis.cost.estimate import estimate
    from .measure import median_times
    from .plans import Plan, parse_plan
    from .program import capture
    from .reduced_module import transform

    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
        raise ValueError(f"rounds must be an integer >= 1, got {rounds!r}")
    p = parse_plan(plan) if isinstance(plan, str) else plan
    if not isinstance(p, Plan):
        raise GraphredError(f"expected a plan (text such as 'fastv:layer=1,keep=0.5' or graphred.plans.*), got {plan!r}")
    if p.is_identity:
        raise ValueError(f"plan {p} reduces nothing: there is nothing to measure (give a ratio > 0)")
    m, kwargs, name = zoo.resolve(model, device="cpu")
    prog = capture(m, **kwargs)
    est = estimate(prog, p)
    t0 = time.perf_counter()
    reduced = transform(prog, p)
    t_transform = time.perf_counter() - t0
    base, fast = median_times(prog, reduced, kwargs, rounds)
    measured = base / fast
    predicted = float(est.speedup)
    return {
        "model": name, "model_class": prog.model_class, "plan": str(p), "device": "cpu",
        "threads": torch.get_num_threads(), "rounds": rounds,
        "base_ms": base * 1e3, "reduced_ms": fast * 1e3,
        "measured_speedup": measured, "predicted_speedup": predicted,
        "predicted_speedup_matmul": float(est.speedup_matmul),
        "measured_over_predicted": measured / predicted if predicted else float("nan"),
        "flops": int(est.flops), "flops_after": int(est.after.flops), "transform_s": t_transform,
    }


def _si(x: float) -> str:
    for unit, f in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= f:
            return f"{x / f:.3g} {unit}"
    return f"{x:.3g}"


def format_bench(r: dict[str, Any]) -> str:
    """The text ``graphred bench`` prints for a :func:`bench` result."""
    lines = [
        f"{r['model']} ({r['model_class']}) + {r['plan']}: CPU, {r['threads']} thread(s), median of {r['rounds']} "
        "alternating calls each",
        f"  unreduced  {r['base_ms']:9.2f} ms",
        f"  reduced    {r['reduced_ms']:9.2f} ms   (transform took {r['transform_s']:.2f} s)",
        f"  speedup    measured x{r['measured_speedup']:.2f}, predicted x{r['predicted_speedup']:.2f} "
        f"(FLOPs {_si(r['flops'])} -> {_si(r['flops_after'])}), "
        f"measured/predicted {r['measured_over_predicted']:.2f}",
    ]
    if r["base_ms"] < _SMALL_MS:
        lines.append(f"  note: the unreduced model runs in under {_SMALL_MS:g} ms per call, where fixed per-call and "
                     "per-op overheads weigh more than FLOPs; the measured ratio is noisy at this size")
    return "\n".join(lines)


def run_bench(model: str, plan: str, repeats: int = 5, as_json: bool = False, threads: int | None = None) -> int:
    """The ``graphred bench`` command: print :func:`format_bench` (or JSON) and return 0."""
    import torch

    if threads is not None:
        if threads < 1:
            raise ValueError(f"--threads must be >= 1, got {threads}")
        torch.set_num_threads(threads)
    r = bench(model, plan, rounds=repeats)
    print(json.dumps(r, indent=2) if as_json else format_bench(r))
    return 0
