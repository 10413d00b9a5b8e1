"""Apply a :class:`graphred.plans.Plan` to a captured program: a new, reduced graph module.

A thin wrapper over :mod:`graphred.passes.pipeline` (plan -> passes -> PassManager). The program's own
graph is never changed: the plan is applied to a copy that shares the parameter tensors (no weights
are copied).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch.fx as fx

from ..analysis.blocks import AttentionBlock
from ..analysis.evaluate import meta_inputs, meta_layout_message
from ..analysis.provenance import TokenProvenance
from ..errors import PlanError
from ..plans import Plan
from ..program import Program
from .pipeline import copy_graph_module, run_pipeline

__all__ = ["AppliedPlan", "apply_plan", "copy_graph_module"]


@dataclass
class AppliedPlan:
    """The reduced graph and what was done to it."""

    graph_module: fx.GraphModule
    plan: Plan
    steps: list[dict] = field(default_factory=list)
    subs_at: dict[str, dict] = field(default_factory=dict)  # original node name -> {symbol: expr}
    positions_output: bool = False
    provenance: TokenProvenance | None = None
    blocks: list[AttentionBlock] = field(default_factory=list)


def apply_plan(program: Program, plan: Plan, *, value_inputs: tuple | None = None,
               keep_all: bool = False) -> AppliedPlan:
    """Apply ``plan`` to a copy of ``program``'s graph. For a program captured on the meta device,
    ``value_inputs=(args, kwargs)`` gives CPU copies of the inputs from which the token layout is read.
    ``keep_all=True`` (a debug mode for tests) inserts every reduction's whole rewrite -- scores,
    selection, matching, merges, gathers of the stream and of every operand that meets it -- but keeps
    every token: the outputs must equal the program's bit for bit.

    >>> import graphred
    >>> model, inputs = graphred.zoo.load(graphred.zoo.TEST_NAMES[0])  # a decoder VLM
    >>> applied = apply_plan(graphred.capture(model, **inputs), graphred.plans.fastv(layer=1, keep=0.5))
    >>> applied.steps[0]["op"]
    'prune'
    """
    if not isinstance(plan, Plan):
        raise PlanError(f"expected a graphred.plans.Plan, got {type(plan).__name__}: build one with graphred.plans.pumer(...)")
    try:
        out = run_pipeline(program.graph_module, plan, program.example_inputs(), value_inputs=value_inputs,
                           model=program.model_class, keep_all=keep_all)
    except Exception as e:
        missing = meta_inputs(*program.example_inputs()) if value_inputs is None else []
        if missing:  # the real reason: the layout could not be read, not a step's symptom of it
            raise PlanError(f"{meta_layout_message(program.model_class, missing, str(plan))} (Without the values the "
                            f"pipeline reported: {str(e).splitlines()[0] if str(e) else type(e).__name__})") from e
        raise
    return AppliedPlan(out.graph_module, plan, out.log, out.subs_at, out.positions_output, out.provenance, out.blocks)
