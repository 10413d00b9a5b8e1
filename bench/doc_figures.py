"""Every figure in README.md, docs/passes.md and docs/cost-model.md that no other bench script writes.

Each section below produces one marked block of a doc (``<!-- doc_figures:NAME:start -->`` ...
``<!-- doc_figures:NAME:end -->``) and, with ``--write``, replaces that block in place (bench/_common.py).
docs/benchmarks.md belongs to bench_reduce.py / bench_vqa.py; the worked example of cost-model.md to
cost_worked_example.py (``--write`` there too); passes.md's graph excerpts and error messages to
passes_excerpt.py.

    python bench/doc_figures.py                        # print every section
    python bench/doc_figures.py --write                # ... and rewrite them in the docs
    python bench/doc_figures.py estimate-llava --write  # only some sections

Sections: ``estimate-llava`` (passes.md: ``graphred analyze llava`` and ``graphred estimate llava --plan
fastv:layer=1,keep=0.5`` as printed; cheap), ``cost-accuracy`` (cost-model.md: the estimate against torch's
FlopCounterMode and MemTracker for every zoo model and five plans; about a minute), ``sweep`` (passes.md:
the plan sweep on llava-bench; about a minute). tests/test_doc_figures.py re-runs the cheap part (the
``llava`` rows and ``estimate-llava``) and checks the docs hold what the code prints now.
"""
from __future__ import annotations

import contextlib
import io
import logging
import os
import sys
import warnings
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

import graphred  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PASSES_MD = ROOT / "docs" / "passes.md"
COST_MD = ROOT / "docs" / "cost-model.md"


def _block(name: str, body: str) -> str:
    cmd = f"python bench/doc_figures.py {MARKS.get(name, name)} --write"
    return f"<!-- doc_figures:{name}:start ({cmd}) -->\n{body.rstrip()}\n<!-- doc_figures:{name}:end -->"


def _quiet():
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)


# ----------------------------------------------------------------------------- passes.md: CLI output
CLI_ANALYZE = ["analyze", "llava"]
CLI_ESTIMATE = ["estimate", "llava", "--plan", "fastv:layer=1,keep=0.5"]


def _cli(args: list[str]) -> str:
    from graphred.cli import main

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = main(list(args))
    if rc != 0:
        raise RuntimeError(f"graphred {' '.join(args)} exited {rc}")
    return buf.getvalue().rstrip()


def section_estimate_llava() -> dict[str, str]:
    """``graphred analyze llava`` and ``graphred estimate llava --plan fastv:layer=1,keep=0.5``, as printed."""
    return {
        "analyze-llava": _block("analyze-llava", f"```\n$ graphred {' '.join(CLI_ANALYZE)}\n{_cli(CLI_ANALYZE)}\n```"),
        "estimate-llava": _block("estimate-llava", f"```\n$ graphred {' '.join(CLI_ESTIMATE)}\n{_cli(CLI_ESTIMATE)}\n```"),
    }


# ----------------------------------------------------------------------------- cost-model.md: accuracy
ACCURACY_MODELS = ["llava", "paligemma", "idefics3", "qwen2-vl", "vilt", "blip", "clip", "siglip", "llava-bench"]
ACCURACY_PLANS = [("llava", "fastv:layer=1,keep=0.5"), ("llava", "pumer:prune=0.3,merge=0.2"),
                  ("paligemma", "pumer:prune=0.3,merge=0.2"), ("idefics3", "fastv:layer=1,keep=0.5"),
                  ("qwen2-vl", "fastv:layer=1,keep=0.5"), ("vilt", "pumer:prune=0.3,merge=0.2"),
                  ("blip", "pumer:prune=0.3,merge=0.2"), ("blip", "tome:r=4"), ("clip", "tome:r=4")]


def measured_peak_activations(fn, args: tuple, kwargs: dict) -> int:
    """Peak bytes of inputs + activations while ``fn`` runs, by torch's MemTracker (it follows the real
    storages the CPU kernels allocate and free); the inputs are registered as live, weights and tensor
    constants as weights (graphred.analysis.cost.oracle.peak_activations_executed)."""
    from graphred.analysis.cost.oracle import peak_activations_executed

    return peak_activations_executed(fn, *args, **kwargs)


def _err(pred: int, ref: int) -> str:
    return f"{100 * (pred - ref) / ref:+.2f}%" if ref else "n/a"


_programs: dict = {}


def _program(name: str):
    if name not in _programs:
        model, inputs = graphred.zoo.load(name)
        _programs[name] = (model, inputs, graphred.capture(model, **inputs))
    return _programs[name]


def accuracy_row(name: str) -> str:
    from graphred.analysis.cost.oracle import count_flops_executed

    model, inputs, prog = _program(name)
    est = graphred.estimate(prog)
    oracle = count_flops_executed(model, **inputs)
    args, kwargs = prog.example_inputs()
    mem = measured_peak_activations(prog.graph_module, args, kwargs)
    return (f"| {name} | {est.flops_matmul:,} | {oracle:,} | {_err(est.flops_matmul, oracle)} | {est.flops:,} | "
            f"{est.peak_activation_bytes:,} B | {mem:,} B | {_err(est.peak_activation_bytes, mem)} | "
            f"{est.kv_cache_bytes:,} B |")


def plan_row(name: str, spec: str) -> str:
    from graphred.analysis.cost.oracle import count_flops_executed

    _, inputs, prog = _program(name)
    plan = graphred.plans.parse_plan(spec)
    est = graphred.estimate(prog, plan)
    fast = graphred.transform(prog, plan)
    oracle = count_flops_executed(fast, **inputs)
    mem = measured_peak_activations(fast.graph_module, (), inputs)
    a = est.after
    return (f"| {name} | {spec} | {a.flops_matmul:,} | {oracle:,} | {a.peak_activation_bytes:,} B | {mem:,} B | "
            f"{100 * est.flops_reduction:.1f}% |")


ACC_HEAD = ("| model | predicted matmul FLOPs | FlopCounterMode (eager) | error | all FLOPs | predicted peak act. | "
            "MemTracker peak | error | KV cache |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|")
PLAN_HEAD = ("| model | plan | predicted matmul FLOPs | FlopCounterMode | predicted peak act. | MemTracker | "
             "FLOP reduction |\n|---|---|---:|---:|---:|---:|---:|")


def section_cost_accuracy(models=None, plans=None) -> dict[str, str]:
    models = ACCURACY_MODELS if models is None else models
    plans = ACCURACY_PLANS if plans is None else plans
    acc = "\n".join([ACC_HEAD] + [accuracy_row(m) for m in models])
    after = "\n".join([PLAN_HEAD] + [plan_row(m, p) for m, p in plans])
    return {"cost-accuracy": _block("cost-accuracy", acc), "cost-accuracy-plans": _block("cost-accuracy-plans", after),
            "weights-blip": _block("weights-blip", weights_sentence("blip"))}


def weights_sentence(name: str) -> str:
    """The predicted weight bytes (what the graph reads) against every parameter and buffer of the module."""
    model, _, prog = _program(name)
    est = graphred.estimate(prog)
    total = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
    return ("Weights: the prediction counts what the graph reads; `MemTracker` counts every parameter and buffer of "
            f"the module, so they differ by the unused ones ({name.upper()}: {total - est.weight_bytes:,} B of {total:,} B).")


# ----------------------------------------------------------------------------- passes.md: the sweep
SWEEP_PLANS = ["fastv:layer=2,keep=0.5", "fastv:layer=2,keep=0.25", "pumer:prune=0.3,merge=0.2",
               "pumer:prune=0.5,merge=0,layers=every:2", "pumer:prune=0.1/0.2/0.3,merge=0,layers=2/4/6",
               "pumer:prune=0.5,merge=0,layers=2", "prune:ratio=0.5,scorer=random,layers=2",
               "prune:ratio=0.5,scorer=norm,layers=2", "fastv:layer=2,keep=0.5 + pumer:prune=0.5,merge=0,layers=5"]


def section_sweep() -> dict[str, str]:
    from graphred.analysis.cost.estimate import sweep

    _, inputs, prog = _program("llava-bench")
    cm = [b for b in graphred.analyze(prog).blocks if b.kind != "unimodal_self"]
    head = (f"input_ids {tuple(inputs['input_ids'].shape)}, pixel_values {tuple(inputs['pixel_values'].shape)}\n"
            f"{len(cm)} cross-modal blocks: {cm[0].module_path} ... {cm[-1].module_path}; tokens {cm[0].tokens}")
    return {"sweep": _block("sweep", f"```\n{head}\n\n{sweep(prog, SWEEP_PLANS)}\n```")}


# every marked block of the docs -> the section that writes it
MARKS = {"analyze-llava": "estimate-llava", "estimate-llava": "estimate-llava", "cost-accuracy": "cost-accuracy",
         "cost-accuracy-plans": "cost-accuracy", "weights-blip": "cost-accuracy", "sweep": "sweep"}
SECTIONS = {"estimate-llava": (section_estimate_llava, PASSES_MD), "cost-accuracy": (section_cost_accuracy, COST_MD),
            "sweep": (section_sweep, PASSES_MD)}


def main(argv: list[str]) -> int:
    from _common import write_section

    _quiet()
    torch.set_num_threads(1)
    write = "--write" in argv
    chosen = [a for a in argv if a != "--write"] or list(SECTIONS)
    for name in chosen:
        if name not in SECTIONS:
            raise SystemExit(f"unknown section {name!r}: choose from {', '.join(SECTIONS)}")
        fn, path = SECTIONS[name]
        for mark, md in fn().items():
            print(md, flush=True)
            if write:
                write_section(md, f"doc_figures:{mark}", path)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
