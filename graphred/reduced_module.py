"""``graphred.transform(program, plan) -> nn.Module``: the reduced model, same call signature, any shape."""
from __future__ import annotations

import threading
from typing import Any, Sequence

import torch
import torch.nn as nn

from .errors import GraphredError, InputError, PlanError
from .passes.apply import AppliedPlan, apply_plan
from .plans import Plan
from .program import Program
from .reducer_io import REDUCER_FORMAT, load_reducer as load_saved_reducer, save_reducer as save_reducer_file
from .serving import (
    Buckets,
    Specialization,
    Specializations,
    bind_arguments,
    check_leaves,
    describe_inputs,
    pad_token_id,
    run_guarded,
    trim_outputs,
)

__all__ = ["ReducedModule", "transform", "load_reducer", "REDUCER_FORMAT"]

REDUCER_PREFIX = "graphred_"  # parameters a pass registered on the graph module (Victor's registers)


class ReducedModule(nn.Module):
    """A transformed model. Call it like the original model, at any batch size, text length and image
    count the model accepts: the module keeps the program's model (weights shared, never copied) and
    rewrites it once per new input signature (:mod:`graphred.serving`). Arguments a call leaves out
    keep the model's defaults.

    Which original positions the reduced outputs cover is a per-call result:
    ``out, kept = fast.forward_with_positions(**inputs)`` returns them with the outputs ([B, K], or
    None for a plan that keeps every token). ``fast.kept_positions`` holds the positions of the latest
    call **made by the calling thread** (thread-local, so concurrent callers each read their own).

    >>> import graphred
    >>> model, inputs = graphred.zoo.load("llava")
    >>> fast = graphred.transform(graphred.capture(model, **inputs), graphred.plans.fastv(layer=1, keep=0.5))
    >>> out, kept = fast.forward_with_positions(**inputs)
    >>> kept.shape[0] == inputs["input_ids"].shape[0] and out.logits.shape[1] == kept.shape[1]
    True
    >>> out = fast(**graphred.zoo.inputs("llava", batch=3))    # a new batch size: captured once
    >>> fast.specializations.captures
    1
    """

    def __init__(self, applied: AppliedPlan, program: Program, *, buckets: Buckets | None = None,
                 max_specializations: int = 8):
        super().__init__()
        self.graph_module = applied.graph_module  # the specialisation at the program's example inputs
        self.plan = applied.plan
        self.steps = applied.steps
        self._positions = applied.positions_output
        self.model_class = program.model_class
        self.buckets = buckets
        # plain attributes (not submodules): the program holds the user's model, which is not ours to register
        self.__dict__["program"] = program
        self.__dict__["_local"] = threading.local()
        own = program.own_specialization()
        own.graph_module = applied.graph_module
        own.positions_output = applied.positions_output
        own.steps = applied.steps
        own.applied = applied
        specs = Specializations(self._specialize, max_specializations, by_value=program.method == "draft_export")
        specs.add(program.bound_example(), own)
        self.__dict__["specializations"] = specs

    # ------------------------------------------------------------------ per-call state
    @property
    def kept_positions(self) -> torch.Tensor | None:
        """Kept original positions ([B, K]) of the latest call made by this thread (None before any)."""
        return getattr(self._local, "positions", None)

    # ------------------------------------------------------------------ specialisation
    def _specialize(self, arguments: dict) -> Specialization:
        prog = self.program.recapture(arguments)
        try:
            applied = apply_plan(prog, self.plan)
        except PlanError as e:
            raise InputError(
                f"{self.plan} cannot reduce {self.model_class} at {describe_inputs(arguments)}: {e} Supported: inputs "
                f"where the plan applies, e.g. {describe_inputs(self.program.bound_example())}.") from None
        self._share_parameters(applied.graph_module)
        spec = prog.own_specialization()
        spec.graph_module = applied.graph_module
        spec.positions_output = applied.positions_output
        spec.steps = applied.steps
        spec.applied = applied
        return spec

    def _share_parameters(self, gm: torch.fx.GraphModule) -> None:
        """A new specialisation runs this module's parameters, not fresh ones: the plan's own (Victor's
        registers, possibly trained) and, after :meth:`own_weights`, this module's copy of the model's."""
        mine = dict(self.graph_module.named_parameters(remove_duplicate=False))
        for name, _ in list(gm.named_parameters(remove_duplicate=False)):
            p = mine.get(name)
            if p is None:
                continue
            mod_path, _, leaf = name.rpartition(".")
            mod = gm.get_submodule(mod_path) if mod_path else gm
            mod._parameters[leaf] = p

    def reducer_parameters(self) -> dict[str, nn.Parameter]:
        """The parameters the plan added (Victor's registers), by name; empty for plans without any."""
        return {n: p for n, p in self.graph_module.named_parameters() if n.startswith(REDUCER_PREFIX)}

    def own_weights(self) -> "ReducedModule":
        """Give this module its own copy of the model's weights (they are shared with the user's
        model after ``transform``), so that training them leaves the user's model unchanged. Idempotent;
        specialisations made before or after use the copy too."""
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
        for spec in self.specializations.values():
            if spec.graph_module is not self.graph_module:
                self._share_parameters(spec.graph_module)
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

    def specialization(self, *args, **kwargs) -> Specialization:
        """The specialisation a call with these arguments runs (captured now if the signature is new)."""
        arguments = self._arguments(args, kwargs)
        return self.specializations.get(arguments)

    def _arguments(self, args: tuple, kwargs: dict) -> dict:
        owner = f"graphred.ReducedModule({self.model_class})"
        arguments = bind_arguments(self.program.forward_signature(), owner, args, kwargs)
        check_leaves(owner, arguments)
        return arguments

    def _run(self, args: tuple, kwargs: dict):
        arguments = self._arguments(args, kwargs)
        n_pad = 0
        if self.buckets is not None and self.buckets.applies(arguments):
            arguments, n_pad = self.buckets.pad(f"graphred.ReducedModule({self.model_class})", arguments)
        spec = self.specializations.get(arguments)
        out = run_guarded(spec, f"graphred.ReducedModule({self.model_class})", arguments,
                          f"inputs like {describe_inputs(self.program.bound_example())}")
        positions = None
        if spec.positions_output:
            out, positions = out
        if n_pad:
            length = positions.shape[1] if positions is not None else arguments[self.buckets.ids_name].shape[1]
            if positions is not None:
                valid_len = arguments[self.buckets.ids_name].shape[1] - n_pad
                if bool((positions[:, length - n_pad:] < valid_len).any()):
                    raise GraphredError(f"{self.plan} dropped bucket padding before text tokens; call without buckets")
                positions = positions[:, : length - n_pad]
            out = trim_outputs(out, length, n_pad)
        self._local.positions = positions
        return out, positions

    def forward(self, *args, **kwargs):
        return self._run(args, kwargs)[0]

    def forward_with_positions(self, *args, **kwargs):
        """``(outputs, kept_positions)`` of this call; kept_positions is None for a plan that keeps every token."""
        return self._run(args, kwargs)

    def generate(self, *args, **kwargs):
        """Generate with the reduced prefill and per-layer reduced KV caches; see :func:`graphred.generate`."""
        from .generation import generate

        return generate(self, *args, **kwargs)

    def extra_repr(self) -> str:
        return f"model={self.model_class}, plan={self.plan}, specializations={len(self.specializations)}"


def transform(program: Program, plan: Plan, *, buckets: Sequence[int] | None = None,
              max_specializations: int = 8) -> ReducedModule:
    """Rewrite ``program`` with ``plan``; the program and the user's model are left unchanged.

    The returned module serves any input shape the model accepts (one capture and rewrite per new input
    signature, at most ``max_specializations`` kept, least recently used dropped). ``buckets=[64, 128,
    256]`` pads the text of each call on the right to the next bucket length (masked), which bounds the
    number of specialisations; results at the valid positions equal the unpadded call
    (:class:`graphred.serving.Buckets`).

    >>> import graphred
    >>> model, inputs = graphred.zoo.load("vilt")
    >>> fast = graphred.transform(graphred.capture(model, **inputs), graphred.plans.pumer(prune=0.3, merge=0.2))
    """
    if not isinstance(program, Program):
        raise GraphredError(
            f"graphred.transform expects a graphred.Program, got {type(program).__name__}: capture first with "
            "graphred.capture(model, **inputs)")
    bk = Buckets.make(buckets, pad_token_id(program.model))
    return ReducedModule(apply_plan(program, plan), program, buckets=bk, max_specializations=max_specializations)


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
