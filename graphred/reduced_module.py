"""``graphred.transform(program, plan) -> nn.Module``: the reduced model, same call signature."""
from __future__ import annotations

import torch
import torch.nn as nn

from .errors import GraphredError
from .passes.apply import AppliedPlan, apply_plan
from .plans import Plan
from .program import Program

__all__ = ["ReducedModule", "transform"]


class ReducedModule(nn.Module):
    """A transformed model. Call it like the original model; ``kept_positions`` then holds, for
    the reduced token stream, the original position of every token the outputs cover ([B, K]).

    >>> import graphred
    >>> model, inputs = graphred.zoo.load("llava")
    >>> fast = graphred.transform(graphred.capture(model, **inputs), graphred.plans.fastv(layer=1, keep=0.5))
    >>> out = fast(**inputs)
    >>> fast.kept_positions.shape[0] == inputs["input_ids"].shape[0]
    True
    """

    def __init__(self, applied: AppliedPlan, program: Program):
        super().__init__()
        self.graph_module = applied.graph_module
        self.plan = applied.plan
        self.steps = applied.steps
        self._positions = applied.positions_output
        self.model_class = program.model_class
        self.kept_positions: torch.Tensor | None = None

    def forward(self, *args, **kwargs):
        out = self.graph_module(*args, **kwargs)
        if self._positions:
            out, self.kept_positions = out
        return out

    def forward_with_positions(self, *args, **kwargs):
        """``(outputs, kept_positions)``; kept_positions is None for an identity plan."""
        out = self.graph_module(*args, **kwargs)
        if self._positions:
            return out
        return out, None

    def extra_repr(self) -> str:
        return f"model={self.model_class}, plan={self.plan}"


def transform(program: Program, plan: Plan) -> ReducedModule:
    """Rewrite ``program`` with ``plan``; the program and the user's model are left unchanged.

    >>> import graphred
    >>> model, inputs = graphred.zoo.load("vilt")
    >>> fast = graphred.transform(graphred.capture(model, **inputs), graphred.plans.pumer(prune=0.3, merge=0.2))
    """
    if not isinstance(program, Program):
        raise GraphredError(
            f"graphred.transform expects a graphred.Program, got {type(program).__name__}: capture first with "
            "graphred.capture(model, **inputs)")
    return ReducedModule(apply_plan(program, plan), program)
