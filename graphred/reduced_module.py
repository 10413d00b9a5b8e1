"""``graphred.transform(program, plan) -> nn.Module``: the reduced model, same call signature."""
from __future__ import annotations

import torch
import torch.nn as nn

from .errors import GraphredError
from .passes.apply import AppliedPlan, apply_plan
from .plans import Plan
from .program import Program
from .reducer_io import REDUCER_FORMAT, load_reducer as load_saved_reducer, save_reducer as save_reducer_file

__all__ = ["ReducedModule", "transform", "load_reducer"]

REDUCER_PREFIX = "graphred_"  # parameters a pass registered on the graph module (Victor's registers)


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

    def reducer_parameters(self) -> dict[str, nn.Parameter]:
        """The parameters the plan added (Victor's registers), by name; empty for plans without any."""
        return {n: p for n, p in self.graph_module.named_parameters() if n.startswith(REDUCER_PREFIX)}

    def own_weights(self) -> "ReducedModule":
        """Give this module its own copy of the model's weights (they are shared with the user's
        model after ``transform``), so that training them leaves the user's model unchanged. Idempotent."""
        if getattr(self, "_owns_weights", False):
            return self
        clones: dict[int, nn.Parameter] = {}
        for name, p in list(self.graph_module.named_parameters(remove_duplicate=False)):
            if name.startswith(REDUCER_PREFIX):
                continue
            mod_path, _, leaf = name.rpartition(".")
            mod = self.graph_module.get_submodule(mod_path) if mod_path else self.graph_module
            new = clones.setdefault(id(p), nn.Parameter(p.detach().clone(), requires_grad=p.requires_grad))
            setattr(mod, leaf, new)
        self._owns_weights = True
        return self

    def save_reducer(self, path, *, include_model: bool | None = None) -> None:
        """Save the plan's parameters (and, after :meth:`own_weights`/fine-tuning the model, its
        weights) as safetensors, with the plan in the metadata. Reload with :func:`graphred.load_reducer`.

        >>> import graphred, tempfile, os
        >>> model, inputs = graphred.zoo.load("llava")
        >>> fast = graphred.transform(graphred.capture(model, **inputs), graphred.plans.victor(registers=2, layer=1))
        >>> path = os.path.join(tempfile.mkdtemp(), "victor.safetensors")
        >>> fast.save_reducer(path)
        >>> graphred.load_reducer(fast, path) is fast
        True
        """
        save_reducer_file(self, path, include_model=include_model)

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


def load_reducer(fast_or_path, path=None, *, model=None, inputs: dict | None = None) -> ReducedModule:
    """Load saved reducer parameters: ``load_reducer(fast, path)`` into a transformed module (same
    plan), or ``load_reducer(path, model=model, inputs=example_inputs)`` to capture ``model``,
    transform it with the saved plan and load. See :meth:`ReducedModule.save_reducer`.

    >>> import graphred, tempfile, os
    >>> model, inputs = graphred.zoo.load("llava")
    >>> fast = graphred.transform(graphred.capture(model, **inputs), graphred.plans.victor(registers=2, layer=1))
    >>> path = os.path.join(tempfile.mkdtemp(), "victor.safetensors")
    >>> fast.save_reducer(path)
    >>> again = graphred.load_reducer(path, model=model, inputs=inputs)
    >>> bool((again.graph_module.graphred_registers == fast.graph_module.graphred_registers).all())
    True
    """
    return load_saved_reducer(fast_or_path, path, model=model, inputs=inputs, transform=transform,
                              module_class=ReducedModule)
