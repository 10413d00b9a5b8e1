"""Speed measured the honest way: a ratio against the unreduced model, in the same run."""
from __future__ import annotations

import statistics
import time
from typing import Any, Callable


def median_times(fa: Callable[..., Any], fb: Callable[..., Any], kwargs: dict, rounds: int = 7) -> tuple[float, float]:
    """Median seconds per call of ``fa(**kwargs)`` and ``fb(**kwargs)``, alternating A and B so that
    drift on a shared machine hits both alike (one warm-up call each first).

    >>> import torch
    >>> ta, tb = median_times(torch.nn.Identity(), torch.nn.Identity(), {"input": torch.ones(2)}, rounds=3)
    >>> ta > 0 and tb > 0
    True
    """
    import torch

    ta, tb = [], []
    with torch.no_grad():
        fa(**kwargs)
        fb(**kwargs)
        for _ in range(rounds):
            for f, acc in ((fa, ta), (fb, tb)):
                t0 = time.perf_counter()
                f(**kwargs)
                acc.append(time.perf_counter() - t0)
    return statistics.median(ta), statistics.median(tb)


def speedup(baseline: Callable[..., Any], reduced: Callable[..., Any], kwargs: dict, rounds: int = 7) -> float:
    """``median(baseline) / median(reduced)`` measured in this run (see :func:`median_times`)."""
    ta, tb = median_times(baseline, reduced, kwargs, rounds)
    return ta / tb
