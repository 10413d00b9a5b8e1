"""``graphred demo``: the whole pipeline on the embedded, self-trained VQA decoder, in under a minute.

capture -> analysis -> estimate of a default plan -> transform -> the shipped test scenes answered
with and without the plan: accuracy, predicted and measured speedup side by side. The model is a
LLaVA-architecture model (CLIP vision tower, projector, Llama decoder) that graphred trained itself
on scenes of real Fashion-MNIST images (``bench/train_models.py``); no pretrained weights.
"""
from __future__ import annotations

import time

MODEL = "vqa-llava"
QUESTIONS = 1000
BATCH = 50


def _bar(label: str):
    from .progress import progress_bar

    return progress_bar(label, indent=6)


def run_demo(plan_text: str = "pumer:prune=0.5,merge=0,layers=1") -> int:
    import graphred
    from graphred.data import models, scenes
    from graphred.measure import speedup
    from graphred.plans import parse_plan

    import torch

    t_start = time.perf_counter()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small kernels: one thread measures the model, not thread synchronisation
    try:
        try:
            models.weights_paths(MODEL)
            present = all(p.exists() for p in models.weights_paths(MODEL))
        except graphred.GraphredError:
            present = False
        if not present:
            print(f"the trained weights of {MODEL} are not installed: running the pipeline on the zoo's "
                  "llava-bench (random weights: speed and structure, no accuracy)\n")
            return _run_untrained(graphred, speedup, parse_plan("fastv:layer=2,keep=0.25"), t_start)
        return _run(graphred, models, scenes, speedup, parse_plan(plan_text), t_start)
    finally:
        torch.set_num_threads(threads)


def _run_untrained(graphred, speedup, plan, t_start) -> int:
    model, inputs = graphred.zoo.load("llava-bench")
    prog = graphred.capture(model, **inputs)
    print(f"[1/4] captured {prog.model_class} with torch.export")
    print(f"[2/4] analysis: {graphred.analyze(prog).summary}")
    est = graphred.estimate(prog, plan)
    print(f"[3/4] estimate for {plan}: predicted speedup {est.speedup:.2f}x")
    fast = graphred.transform(prog, plan)
    print(f"[4/4] transformed and measured: {speedup(prog, fast, inputs, rounds=3):.2f}x (CPU, 1 thread), "
          f"done in {time.perf_counter() - t_start:.0f} s")
    return 0


def _run(graphred, models, scenes, speedup, plan, t_start) -> int:
    print(f"graphred {graphred.__version__} demo: {MODEL}, a VQA model graphred trained itself on real images\n")
    model, tok = models.load_trained(MODEL)
    test = scenes.load_shipped()
    n = min(QUESTIONS, len(test.questions))
    n -= n % BATCH
    example = models.build_inputs(MODEL, tok, test, test.questions[:BATCH])
    prog = graphred.capture(model, **example)
    print(f"[1/5] captured {prog.model_class} (batch {BATCH}) with torch.export")

    report = graphred.analyze(prog)
    print(f"[2/5] analysis: {report.summary}")
    for b in report.cross_modal:
        print(f"      {b.module_path:<42} {b.kind:<17} tokens {b.tokens}")

    est = graphred.estimate(prog, plan)
    print(f"[3/5] estimate for {plan}: FLOPs {est.flops / 1e9:.2f} G -> {est.after.flops / 1e9:.2f} G, "
          f"predicted speedup {est.speedup:.2f}x (before anything runs)")

    fast = graphred.transform(prog, plan)
    kept = [s.get("image_after") for s in fast.steps if s.get("image_after") is not None]
    print(f"[4/5] transformed: image tokens per sample {fast.steps[0]['image_before']} -> "
          f"{' -> '.join(str(k) for k in kept)}")

    print(f"[5/5] answering {n} test questions (shipped scenes)")
    acc0 = models.evaluate(prog, MODEL, test, BATCH, tokenizer=tok, limit=n, progress=_bar("unreduced"))
    acc1 = models.evaluate(fast, MODEL, test, BATCH, tokenizer=tok, limit=n, progress=_bar(str(plan)))
    measured = speedup(prog, fast, example)
    print()
    print(f"      {'':<34} {'accuracy':>9} {'speedup':>16}")
    print(f"      {'unreduced':<34} {100 * acc0:8.1f}% {'1.00x':>16}")
    print(f"      {str(plan):<34} {100 * acc1:8.1f}% {f'{measured:.2f}x measured':>16}  ({est.speedup:.2f}x predicted)")
    print(f"\ndone in {time.perf_counter() - t_start:.0f} s (CPU, 1 thread). Accuracy: graphred's own trained model, "
          "training-free reduction. See docs/benchmarks.md for the sweeps.")
    return 0
