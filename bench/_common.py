"""Shared by the bench scripts: each owns a marked section of docs/benchmarks.md and rewrites only it."""
from __future__ import annotations

import json
import re
import statistics
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS_MD = ROOT / "docs" / "benchmarks.md"


def write_section(md: str, mark: str, path: Path = BENCHMARKS_MD) -> None:
    """Replace the ``<!-- mark:start ... mark:end -->`` block of ``path`` with ``md`` (append if absent)."""
    text = path.read_text() if path.exists() else "# Benchmarks\n\n"
    pat = re.compile(rf"<!-- {mark}:start.*?<!-- {mark}:end -->", re.S)
    text = pat.sub(lambda _: md, text) if pat.search(text) else text.rstrip() + "\n\n" + md + "\n"
    path.write_text(text)


def publish(md: str, mark: str, data, json_name: str, write: bool) -> None:
    """Print ``md``, keep the raw results as ``bench/out/<json_name>``, and (``write``) rewrite the
    script's section of docs/benchmarks.md."""
    print(md)
    out = ROOT / "bench" / "out"
    out.mkdir(exist_ok=True)
    (out / json_name).write_text(json.dumps(data, indent=2))
    if write:
        write_section(md, mark)


def timed_call(fn, inputs: dict, device: str) -> tuple[float, object]:
    """``(seconds, output)`` of ``fn(**inputs)``, synchronised on a CUDA device."""
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = fn(**inputs)
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0, out


def median_ms(fns: dict, inputs: dict, rounds: int, device: str) -> dict:
    """Median ms per call of each function, alternating them so that drift hits all alike."""
    times = {k: [] for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            times[k].append(timed_call(fn, inputs, device)[0] * 1e3)
    return {k: statistics.median(v) for k, v in times.items()}


def peak_mb(fn, inputs: dict, device: str) -> float | None:
    """``torch.cuda.max_memory_allocated`` over one call, in MiB (None off CUDA)."""
    if device != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    fn(**inputs)
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() / 2**20
