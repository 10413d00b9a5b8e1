"""Where the time of a reduced model goes on the GPU: torch.profiler over one call of the unreduced model
(Hugging Face, eager) and of ``graphred.transform(prog, victor(registers=8, layer=2))``, at bench_gpu.py's
LLaVA-1.5-7B shape. Writes docs/results/gpu_profile_{hf,victor}.txt (the profiler's tables: self CPU time, self
CUDA time, kernel launches), which ``python bench/bench_gpu.py --publish`` summarises in docs/benchmarks.md.

    python bench/gpu_profile.py [--out DIR]      # on a CUDA machine
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import graphred  # noqa: E402
from graphred.plans import pumer, victor  # noqa: E402

from _common import median_ms  # noqa: E402
from bench_gpu import build  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(ROOT / "docs" / "results"))
    a = ap.parse_args()
    if not torch.cuda.is_available():
        print("gpu_profile: no CUDA device here", file=sys.stderr)
        return 2
    from torch.profiler import ProfilerActivity, profile

    out = Path(a.out)
    model, inputs = build("cuda", torch.bfloat16, 4, 39, False)
    with torch.no_grad():
        prog = graphred.capture(model, **inputs)
        fns = {"hf": model, "program": prog, "zero": graphred.transform(prog, pumer(prune=0.0, merge=0.0)),
               "victor": graphred.transform(prog, victor(registers=8, layer=2))}
        for f in fns.values():
            f(**inputs)
        print("median ms:", {k: round(v, 1) for k, v in median_ms(fns, inputs, 6, "cuda").items()}, flush=True)
        for name in ("victor", "hf"):
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as p:
                fns[name](**inputs)
                torch.cuda.synchronize()
            ka = p.key_averages()
            text = (ka.table(sort_by="self_cpu_time_total", row_limit=18, max_name_column_width=60) + "\n\n"
                    + ka.table(sort_by="self_cuda_time_total", row_limit=12, max_name_column_width=60))
            (out / f"gpu_profile_{name}.txt").write_text(text)
            print(name, "\n", text, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
