"""``graphred demo``: the whole pipeline on one model, end to end, in well under a minute.

Capture -> analysis -> estimate -> transform with a FastV and a PuMer plan -> run both and compare
with the unreduced model, measured in the same run. The model is the zoo's tiny LLaVA with
random weights (no accuracy is claimed here; accuracy figures come from the project's own
trained models, see docs/benchmarks.md).
"""
from __future__ import annotations

import time

import torch


def _time(fn, repeats: int = 5) -> float:
    fn()
    t = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        t.append(time.perf_counter() - t0)
    return sorted(t)[len(t) // 2]


def run_demo(name: str = "llava-bench") -> int:
    import graphred
    from graphred.plans import fastv, pumer

    print(f"graphred {graphred.__version__} demo on zoo model {name!r} (random weights: speed and structure, not accuracy)\n")
    model, inputs = graphred.zoo.load(name)
    t0 = time.perf_counter()
    prog = graphred.capture(model, **inputs)
    print(f"[1/4] captured {prog.model_class} with torch.export in {time.perf_counter() - t0:.1f} s")
    report = graphred.analyze(prog)
    print(f"[2/4] analysis: {report.summary}")
    for b in report.cross_modal[:3]:
        print(f"      {b.module_path}: {b.kind}, tokens {b.tokens}")
    plans = {"fastv(layer=2, keep=0.25)": fastv(layer=2, keep=0.25), "pumer(prune=0.5, merge=0.2, layers=[2])": pumer(prune=0.5, merge=0.2, layers=[2])}
    est_fn = getattr(graphred, "estimate", None)
    print("[3/4] transform and measure (median of 5 runs, CPU, same process)")
    with torch.no_grad():
        ref = prog(**inputs)
        base = _time(lambda: prog(**inputs))
        for label, plan in plans.items():
            fast = graphred.transform(prog, plan)
            out = fast(**inputs)
            t = _time(lambda: fast(**inputs))
            pred = ""
            try:
                est = est_fn(prog, plan)
                pred = f", predicted {est.speedup:.2f}x" if hasattr(est, "speedup") else ""
            except Exception as e:  # an estimate that cannot be made is said, not hidden
                pred = f", no prediction ({type(e).__name__})"
            logits, ref_logits = out.logits, ref.logits
            agree = (logits[:, -1].argmax(-1) == ref_logits[:, -1].argmax(-1)).float().mean().item()
            print(f"      {label}: sequence {ref_logits.shape[1]} -> {logits.shape[1]} tokens, measured {base / t:.2f}x{pred}, "
                  f"last-token argmax agreement {agree:.0%}")
    print("[4/4] done. See docs/ for the passes, the cost model and the benchmarks.")
    return 0
