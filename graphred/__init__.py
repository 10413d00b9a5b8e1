"""graphred: token reduction for vision-language models, done as a compiler pass pipeline.

>>> import graphred
>>> model, inputs = graphred.zoo.load("llava")
>>> prog = graphred.capture(model, **inputs)
"""
from __future__ import annotations

import importlib

from .errors import (
    AnalysisError,
    CaptureError,
    ConfigError,
    GraphredError,
    InputError,
    PassError,
    PlanError,
    PostconditionError,
    PreconditionError,
)
from .program import Program, capture
from . import plans as _plans
from .autoplan import auto as _auto

# graphred.plans.auto lives in autoplan (it reads the cost model and runs candidates), exposed beside the other
# plan builders; set here so that plans.py does not import the cost model (no import cycle)
_plans.auto = _auto

# the custom ops (torch.ops.graphred.*) are registered on import: a reduced program saved with
# torch.export.save loads and runs in a process that has imported graphred
from . import ops  # noqa: E402,F401

__version__ = "0.1.0"

_LAZY_MODULES = {"zoo", "plans", "cli", "passes", "analysis", "data", "backend", "training", "serving", "generation"}
_LAZY_ATTRS = {
    "analyze": ("graphred.analysis.report", "analyze"),
    "Report": ("graphred.analysis.report", "Report"),
    "estimate": ("graphred.analysis.cost.estimate", "estimate"),
    "Estimate": ("graphred.analysis.cost.estimate", "Estimate"),
    "transform": ("graphred.reduced_module", "transform"),
    "ReducedModule": ("graphred.reduced_module", "ReducedModule"),
    "load_reducer": ("graphred.reduced_module", "load_reducer"),
    "train": ("graphred.training", "train"),
    "generate": ("graphred.generation", "generate"),
}


def __getattr__(name: str):
    if name in _LAZY_MODULES:
        return importlib.import_module(f"graphred.{name}")
    if name in _LAZY_ATTRS:
        mod, attr = _LAZY_ATTRS[name]
        return getattr(importlib.import_module(mod), attr)
    raise AttributeError(f"module 'graphred' has no attribute {name!r}")


__all__ = [
    "AnalysisError", "CaptureError", "ConfigError", "GraphredError", "InputError", "PassError", "PlanError",
    "PostconditionError", "PreconditionError", "Program", "capture", "analyze", "estimate",
    "transform", "generate", "load_reducer", "train", "zoo", "plans", "__version__",
]
