"""``torch.compile(model, backend="graphred", options={"plan": ...})``: graphred as a Dynamo backend.

Installed graphred registers this backend under the name ``"graphred"`` through the
``torch_dynamo_backends`` entry point, so the name works without importing graphred first::

    >>> import torch, graphred
    >>> model, inputs = graphred.zoo.load("llava")
    >>> fast = torch.compile(model, backend="graphred",
    ...                      options={"plan": "fastv:layer=1,keep=0.5", "backend": "aot_eager"})
    >>> with torch.no_grad():
    ...     out = fast(**inputs)

Every graph Dynamo hands the backend is brought to the aten level by :func:`graphred.capture`
(torch.export of the Dynamo graph, its parameters kept as parameters), analysed and rewritten by
:func:`graphred.passes.apply.apply_plan` -- the same rewrite as :func:`graphred.transform` -- and the
reduced graph goes to the inner backend (``"inductor"``, ``"aot_eager"`` or ``"eager"``), whose
AOTAutograd derives the forward and, when training, the backward of the *reduced* graph.

The token layout (which positions hold image tokens) is read from the values of the graph's
inputs: Dynamo hands a backend the real example tensors, and a graph break between the code that
computes an image mask and the code that uses it turns the mask into an input of the later graph,
whose value is then read the same way. A compiled graph is specialised, like ``transform``, to the
token counts of the inputs it was compiled on; inputs of another shape compile again (Dynamo's
guards for static graphs, and a per-shape specialisation here when Dynamo made a graph dynamic).

See docs/architecture.md, "torch.compile backend".
"""
from __future__ import annotations

import hashlib
import logging
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
import torch.fx as fx
import torch.nn as nn

from .errors import CaptureError, GraphredError, PlanError
from .fx_utils import is_impure
from .plans import Plan, parse_plan

__all__ = ["BackendOptions", "graphred_backend", "reset", "INNER_BACKENDS", "OPTION_NAMES"]

log = logging.getLogger("graphred.backend")

INNER_BACKENDS = ("inductor", "aot_eager", "eager")
OPTION_NAMES = ("plan", "backend", "inductor_options")


@dataclass(frozen=True)
class BackendOptions:
    """The backend's options, checked: a :class:`~graphred.plans.Plan` and the inner backend.

    >>> BackendOptions.parse({"plan": "fastv:layer=2,keep=0.5", "backend": "aot_eager"}).inner
    'aot_eager'
    """

    plan: Plan
    inner: str = "inductor"
    inductor_options: tuple = ()

    @classmethod
    def parse(cls, options: Any) -> "BackendOptions":
        if options is None:
            options = {}
        if not isinstance(options, dict):
            raise GraphredError(
                f"torch.compile(backend='graphred') takes options as a dict, got {type(options).__name__}: "
                "options={'plan': 'fastv:layer=2,keep=0.5', 'backend': 'inductor'}")
        unknown = sorted(set(options) - set(OPTION_NAMES))
        if unknown:
            raise GraphredError(
                f"unknown option(s) {', '.join(map(repr, unknown))} for torch.compile(backend='graphred'): "
                f"it takes {', '.join(map(repr, OPTION_NAMES))}")
        if "plan" not in options:
            raise PlanError(
                "torch.compile(backend='graphred') needs a plan: options={'plan': graphred.plans.fastv(layer=2, "
                "keep=0.5)} or a text spec such as 'pumer:prune=0.3,merge=0.2'")
        plan = options["plan"]
        if isinstance(plan, str):
            try:
                plan = parse_plan(plan)
            except ValueError as e:
                raise PlanError(f"the plan option of torch.compile(backend='graphred') does not parse: {e}") from None
        if not isinstance(plan, Plan):
            raise PlanError(
                f"the plan option must be a graphred.plans.Plan or a text spec, got {type(plan).__name__}: "
                "e.g. graphred.plans.pumer(prune=0.3, merge=0.2) or 'fastv:layer=2,keep=0.5'")
        inner = options.get("backend", "inductor")
        if inner not in INNER_BACKENDS:
            raise GraphredError(
                f"unknown inner backend {inner!r} for torch.compile(backend='graphred'): choose from "
                f"{', '.join(map(repr, INNER_BACKENDS))} (options={{'backend': 'inductor'}})")
        ind = options.get("inductor_options") or {}
        if not isinstance(ind, dict):
            raise GraphredError(f"inductor_options must be a dict of torch._inductor.config settings, got {type(ind).__name__}")
        if ind and inner != "inductor":
            raise GraphredError(f"inductor_options are given but the inner backend is {inner!r}, not 'inductor'")
        return cls(plan, inner, tuple(sorted(ind.items())))

    def key(self) -> str:
        """A digest of the plan, the inner backend and graphred's version: compiled artefacts are
        never shared between two different keys."""
        from . import __version__

        text = f"graphred {__version__}|{self.plan}|{self.plan.steps!r}|{self.inner}|{self.inductor_options!r}"
        return hashlib.sha256(text.encode()).hexdigest()


# ----------------------------------------------------------------------------- logging, once per reason
_said: set[str] = set()


def reset() -> None:
    """Forget the reasons already logged (each is logged once per process otherwise)."""
    _said.clear()


def _say_once(reason: str) -> None:
    if reason not in _said:
        _said.add(reason)
        log.warning("graphred backend: %s", reason)


# ----------------------------------------------------------------------------- the inner backends
def _inner_compile(inner: str, gm: fx.GraphModule, example_inputs: Sequence, inductor_options: tuple) -> Callable:
    if inner == "eager":
        return gm.forward
    if inner == "aot_eager":
        from torch._dynamo.backends.debugging import aot_eager

        return aot_eager(gm, list(example_inputs))
    from torch._inductor.compile_fx import compile_fx

    return compile_fx(gm, list(example_inputs), config_patches=dict(inductor_options) or None)


# ----------------------------------------------------------------------------- Dynamo graph -> Program
def _is_state(node: fx.Node, value: Any) -> bool:
    """A placeholder Dynamo lifted from the module's parameters or buffers."""
    if isinstance(value, nn.Parameter):
        return True
    arg = node.meta.get("grapharg")
    src = getattr(getattr(arg, "source", None), "name", "")
    src = src() if callable(src) else src
    return isinstance(value, torch.Tensor) and "._buffers[" in str(src)


class _Lifted(nn.Module):
    """The Dynamo graph with its parameters and buffers as the module's own (the analysis tells
    learned tensors from inputs by that), taking the remaining inputs positionally."""

    def __init__(self, gm: fx.GraphModule, inputs: Sequence, state_at: list[int]):
        super().__init__()
        self.gm = gm
        self._n = len(inputs)
        self._state_at = state_at
        self._user_at = [i for i in range(len(inputs)) if i not in set(state_at)]
        for j, i in enumerate(state_at):
            t = inputs[i]
            if isinstance(t, nn.Parameter):
                self.register_parameter(f"p{j}", t)
            else:
                self.register_buffer(f"p{j}", t)

    def forward(self, *user):
        args: list[Any] = [None] * self._n
        for j, i in enumerate(self._state_at):
            args[i] = getattr(self, f"p{j}")
        for v, i in zip(user, self._user_at):
            args[i] = v
        # run node by node, so that each traced aten op keeps the Dynamo node's module path
        # (nn_module_stack): the analysis numbers layers by it
        with fx.traceback.preserve_node_meta():
            return fx.Interpreter(self.gm).run(*args)


def _drop_positions_output(gm: fx.GraphModule) -> None:
    """The rewrite appends the kept positions to the outputs; Dynamo's caller expects the graph's own."""
    out = next(n for n in gm.graph.nodes if n.op == "output")
    cg = gm.graph._codegen
    info = getattr(cg, "pytree_info", None)
    spec = info.out_spec
    flat = list(out.args[0])
    out.args = (tuple(flat[:-1]),)
    cg.pytree_info = info._replace(out_spec=spec.children_specs[0])
    gm.graph.eliminate_dead_code(is_impure_node=is_impure)
    gm.recompile()


def _has_image_tokens(prov) -> bool:
    from .analysis.provenance import IMAGE

    return bool(prov.streams_with(IMAGE))


# ----------------------------------------------------------------------------- layouts across graph breaks
# A tensor one compiled graph returns, known to be a token stream of one modality along one dim, by
# its id: the graph that consumes it (compiled after a graph break, on the tensors of that very run)
# reads it from here. Entries die with their tensors.
_LAYOUTS: dict[int, tuple] = {}
_LAYOUT_LOST = "graphred_layout_lost"  # placeholder meta: a graph before this one lost the layout


def _remember_layout(t: torch.Tensor, dim: int, modality: str, length: int) -> None:
    key = id(t)
    try:
        ref = weakref.ref(t, lambda _r, key=key: _LAYOUTS.pop(key, None))
    except TypeError:
        return
    _LAYOUTS[key] = (ref, dim, modality, length)


def _layout_of(t: Any) -> tuple[int, str | None] | None:
    if not isinstance(t, torch.Tensor):
        return None
    entry = _LAYOUTS.get(id(t))
    if entry is None:
        return None
    ref, dim, modality, length = entry
    if ref() is not t:
        return None
    if dim is not None and (t.dim() <= dim or t.shape[dim] != length):
        return None
    return dim, modality


def _output_layouts(program) -> tuple[dict[int, tuple[int, str | None, int]], Any]:
    """(flat output index -> (dim, modality, length) for outputs that are a one-modality token stream
    (modality None: the layout was lost before this graph), the program's token provenance)."""
    from .analysis.provenance import TOKENS, TokenProvenance

    prov = TokenProvenance(program.graph_module, program.example_inputs())
    out = next(n for n in program.graph.nodes if n.op == "output")
    flat = out.args[0] if isinstance(out.args[0], (list, tuple)) else [out.args[0]]
    found = {}
    sources = _stream_sources(prov)
    if any(_untracked_tokens(n, prov, sources) for n in program.graph.find_nodes(op="placeholder")):
        # an input's layout is unknown: every output's is too (a stream built on it would be mislabelled)
        for i, node in enumerate(flat):
            if isinstance(node, fx.Node):
                found[i] = (None, None, None)
        return found, prov
    for i, node in enumerate(flat):
        if not isinstance(node, fx.Node):
            continue
        for dim, st in prov.axes(node, TOKENS):
            mods = st.modalities()
            if dim > 0 and len(mods) == 1:
                found[i] = (dim, next(iter(mods)), st.length)
                break
    return found, prov


def _capture(gm: fx.GraphModule, inputs: list, opts: BackendOptions, graph_id: str):
    """(program taking the user inputs, their positions) or None where torch.export cannot take the graph."""
    from .analysis.provenance import INPUT_TOKENS
    from .program import capture

    state_at = [i for i, (n, v) in enumerate(zip(gm.graph.find_nodes(op="placeholder"), inputs)) if _is_state(n, v)]
    user_at = [i for i in range(len(inputs)) if i not in set(state_at)]
    user = [inputs[i] for i in user_at]
    if not any(isinstance(u, torch.Tensor) and u.dim() >= 1 for u in user):
        return None
    try:
        program = capture(_Lifted(gm, inputs, state_at), *user)
    except CaptureError as e:
        _say_once(f"plan {opts.plan} not applied to a graph torch.export could not bring to aten "
                  f"({str(e).splitlines()[0]}); it compiles unchanged")
        return None
    program.name = graph_id
    # torch.export's input-guard check names Dynamo's sources (L[...]) when the graph takes the sizes
    # of a dynamic graph as inputs; the per-shape specialisation here checks the inputs instead
    gm_ = program.graph_module
    for node in list(gm_.graph.nodes):
        if node.op == "call_module" and node.target == "_guards_fn":
            gm_.graph.erase_node(node)
    gm_.recompile()
    program.model_class = "a Dynamo graph"
    for node, value in zip(program.graph.find_nodes(op="placeholder"), user):
        hint = _layout_of(value)
        if hint is not None and hint[1] is None:
            node.meta[_LAYOUT_LOST] = True
        elif hint is not None:
            node.meta[INPUT_TOKENS] = hint
    return program, user_at


def _untracked_tokens(node: fx.Node, prov, sources: set) -> bool:
    """A floating input of rank >= 3 with no token axis known and no token stream born from it (as
    patches are born from pixels): hidden states whose layout was lost before this graph."""
    from .analysis.provenance import TOKENS

    if node.meta.get(_LAYOUT_LOST):
        return True
    v = node.meta.get("val")
    if not (isinstance(v, torch.Tensor) and v.dtype.is_floating_point and v.dim() >= 3) or prov.axes(node, TOKENS):
        return False
    return node not in sources


def _stream_sources(prov) -> set:
    """Inputs a token stream is born from (directly or through other ops)."""
    by_name = {n.name: n for n in prov.gm.graph.nodes}
    seen: set = set()
    stack = [by_name[st.origin] for st in prov.streams if st.rule == "patches" and st.origin in by_name]
    while stack:
        n = stack.pop()
        if n not in seen:
            seen.add(n)
            stack.extend(n.all_input_nodes)
    return {n for n in seen if n.op == "placeholder"}


def _rewrite(program, opts: BackendOptions, prov):
    """The reduced graph module, or None where the plan does not apply to this graph (said once)."""
    from .analysis.blocks import detect_blocks
    from .passes.apply import apply_plan

    try:
        applied = apply_plan(program, opts.plan)
    except PlanError as e:
        blocks = detect_blocks(program.graph_module, prov)
        sources = _stream_sources(prov)
        untracked = [n.name for n in program.graph.find_nodes(op="placeholder") if _untracked_tokens(n, prov, sources)]
        if blocks and not _has_image_tokens(prov) and untracked:
            _say_once(f"plan {opts.plan} not applied to a graph whose attention layers take {', '.join(untracked)} "
                      "from code outside any compiled graph (or from a graph whose output mixes modalities): "
                      "the token layout is not known there, so it compiles unchanged. graphred.transform("
                      "graphred.capture(model, **inputs), plan) captures the whole model in one graph")
            return None
        if blocks and not _has_image_tokens(prov):
            raise PlanError(
                f"plan {opts.plan} reduces image tokens, but the attention layers of the compiled model see "
                f"none: no token stream holds image tokens ({len(blocks)} attention blocks, streams: "
                f"{', '.join(sorted({m for st in prov.streams for m in st.modalities()})) or 'none'}). "
                "Compile a vision-language model, call it with its image inputs, or drop the plan.") from None
        _say_once(f"plan {opts.plan} does not apply to a graph ({str(e).splitlines()[0]}); it compiles unchanged")
        return None
    out = applied.graph_module
    if applied.positions_output:
        _drop_positions_output(out)
    return out


# ----------------------------------------------------------------------------- one compiled graph
def _shape_key(args: Sequence) -> tuple:
    """Shapes, dtypes and devices of the inputs, values of scalar inputs, identities of parameters."""
    key = []
    for a in args:
        if isinstance(a, nn.Parameter):
            key.append(id(a))
        elif isinstance(a, torch.Tensor):
            key.append((a.shape, a.dtype, a.device))
        elif isinstance(a, (int, float, bool)):
            key.append(a)
        else:
            key.append(type(a))
    return tuple(key)


class _CompiledGraph:
    """One Dynamo graph, compiled per input shape (and per parameter identity): a graph Dynamo
    made dynamic is still specialised here, since the rewrite keeps k tokens of a known count."""

    def __init__(self, gm: fx.GraphModule, opts: BackendOptions, graph_id: str):
        self.gm, self.opts, self.graph_id = gm, opts, graph_id
        self.by_shape: dict[tuple, Callable] = {}
        self.keep_alive: list = []

    def compile(self, inputs: list) -> Callable:
        key = _shape_key(inputs)
        fn = self.by_shape.get(key)
        if fn is not None:
            return fn
        real = [int(a) if isinstance(a, torch.SymInt) else a for a in inputs]
        captured = _capture(self.gm, real, self.opts, self.graph_id)
        layouts: dict = {}
        reduced = None
        if captured is not None:
            program, user_at = captured
            layouts, prov = _output_layouts(program)
            reduced = _rewrite(program, self.opts, prov)
        if reduced is None:
            inner = _inner_compile(self.opts.inner, self.gm, real, self.opts.inductor_options)
            user_at = list(range(len(real)))
        else:
            inner = _inner_compile(self.opts.inner, reduced, [real[i] for i in user_at], self.opts.inductor_options)

        def fn(*args, _inner=inner, _at=user_at, _layouts=layouts):
            out = _inner(*[args[i] for i in _at])
            if _layouts:
                flat = out if isinstance(out, (list, tuple)) else [out]
                for i, (dim, modality, length) in _layouts.items():
                    if i < len(flat) and isinstance(flat[i], torch.Tensor):
                        _remember_layout(flat[i], dim, modality, length)
            return out

        self.keep_alive.append([a for a in inputs if isinstance(a, nn.Parameter)])  # their ids in the key stay valid
        self.by_shape[key] = fn
        return fn

    def __call__(self, *args):
        return self.compile(list(args))(*args)


_graph_count = [0]


def graphred_backend(gm: fx.GraphModule, example_inputs: list, *, options: dict | None = None,
                     mode: str | None = None) -> Callable:
    """The Dynamo backend ``"graphred"``: rewrite each graph with the plan, compile with the inner backend.

    ``options``: ``plan`` (a :class:`~graphred.plans.Plan` or a text spec, required), ``backend``
    (``"inductor"``, the default, ``"aot_eager"`` or ``"eager"``), ``inductor_options`` (a dict of
    ``torch._inductor.config`` settings). Options are checked before anything compiles; a bad one
    raises a :class:`~graphred.errors.GraphredError` (Dynamo reports it as ``BackendCompilerFailed``,
    whose ``inner_exception`` is the graphred error).

    >>> import torch, graphred
    >>> model, inputs = graphred.zoo.load("llava")
    >>> fast = torch.compile(model, backend=graphred.backend.graphred_backend,
    ...                      options={"plan": graphred.plans.fastv(layer=1, keep=0.5), "backend": "eager"})
    >>> with torch.no_grad():
    ...     logits = fast(**inputs).logits
    """
    opts = BackendOptions.parse(options)
    if mode not in (None, "default"):
        _say_once(f"mode={mode!r} is not used by the graphred backend; pass inductor settings as "
                  "options={'inductor_options': {...}}")
    _graph_count[0] += 1
    graph_id = f"graph {_graph_count[0]}"
    if opts.plan.is_identity:
        return _inner_compile(opts.inner, gm, example_inputs, opts.inductor_options)
    compiled = _CompiledGraph(gm, opts, graph_id)
    compiled.compile(list(example_inputs))
    return compiled
