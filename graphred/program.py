"""Capture: a model and example inputs -> :class:`Program` (an aten-level FX graph)."""
from __future__ import annotations

import contextlib
import copy
import inspect
import io
import logging
import operator
import traceback
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
import torch._functorch.config  # (torch._functorch.config.patch below; not imported by `import torch`)
import torch.fx as fx
import torch.nn as nn

from .errors import CaptureError
from .fx_utils import clone_mutated_constants, module_path
from .passes.infra import repair_meta_vals

__all__ = ["Program", "capture"]


@dataclass
class Program:
    """A captured model: an aten-level ``torch.fx.GraphModule`` plus what it was captured on.

    Calling the program runs the graph. It takes what the model's ``forward`` takes, at any input
    shape the model accepts: the program keeps the captured model (``model``; weights shared, never
    copied or changed) and captures once per new input signature (:mod:`graphred.serving`;
    ``specializations`` counts and bounds them). Arguments left out of a call keep the model's defaults.

    >>> import graphred, torch
    >>> model, kwargs = graphred.zoo.load("clip")
    >>> prog = graphred.capture(model, **kwargs)
    >>> out = prog(**kwargs)
    >>> prog.specializations.captures     # the call matched the capture's own signature
    0
    """

    graph_module: fx.GraphModule
    exported: torch.export.ExportedProgram
    example_args: tuple
    example_kwargs: dict
    model_class: str
    method: str = "export"
    notes: list[str] = field(default_factory=list)
    name: str = ""
    model: nn.Module | None = field(default=None, repr=False, compare=False)
    max_specializations: int = field(default=8, repr=False, compare=False)
    _specs: Any = field(default=None, repr=False, compare=False)

    @property
    def specializations(self):
        """The program's :class:`graphred.serving.Specializations` (one graph per input signature)."""
        if self._specs is None:
            from .serving import Specializations

            specs = Specializations(self._specialize, self.max_specializations, by_value=self.method == "draft_export")
            specs.add(self.bound_example(), self.own_specialization())
            self._specs = specs
        return self._specs

    def forward_signature(self) -> inspect.Signature | None:
        """The signature of the captured model's ``forward`` (None when the model was not kept)."""
        if self.model is None:
            return None
        sig = self.__dict__.get("_signature", _MISSING)
        if sig is _MISSING:
            try:
                sig = inspect.signature(self.model.forward)
            except (TypeError, ValueError):
                sig = None
            self.__dict__["_signature"] = sig
        return sig

    def bound_example(self) -> dict:
        """The capture's example inputs by argument name."""
        from .serving import bind_arguments

        sig = self.forward_signature()
        if sig is None:
            return dict(self.example_kwargs)
        return bind_arguments(sig, self.model_class, self.example_args, self.example_kwargs)

    def own_specialization(self):
        """This program's own graph as a :class:`graphred.serving.Specialization` of its example signature."""
        from .serving import Specialization

        sig = self.forward_signature()
        names = list(sig.parameters) if sig is not None else []
        return Specialization(self.graph_module, positional=tuple(names[: len(self.example_args)]), program=self)

    def recapture(self, arguments: dict) -> Program:
        """Capture the kept model again at a call's inputs (by name); a failure is an :class:`InputError`."""
        from .errors import InputError
        from .serving import describe_inputs

        if self.model is None:
            raise InputError(
                f"{self.model_class} was captured at {describe_inputs(self.bound_example())} and this program does "
                f"not hold the model to capture another shape; call it with those shapes, got "
                f"{describe_inputs(arguments)}")
        try:
            prog = capture(self.model, **arguments)
        except CaptureError as e:
            raise InputError(
                f"{self.model_class} cannot run on {describe_inputs(arguments)}: {e} Supported: what the model itself "
                f"accepts, e.g. the captured inputs {describe_inputs(self.bound_example())}.") from None
        prog.name = self.name
        return prog

    def _specialize(self, arguments: dict):
        return self.recapture(arguments).own_specialization()

    def __call__(self, *args, **kwargs):
        if not args and not kwargs:
            args, kwargs = self.example_args, self.example_kwargs
        from .serving import bind_arguments, check_leaves, describe_inputs, run_guarded

        arguments = bind_arguments(self.forward_signature(), self.model_class, args, kwargs)
        check_leaves(self.model_class, arguments)
        spec = self.specializations.get(arguments)
        return run_guarded(spec, self.model_class, arguments, f"inputs like {describe_inputs(self.bound_example())}")

    @property
    def graph(self) -> fx.Graph:
        return self.graph_module.graph

    def module_path(self, node: fx.Node) -> str:
        """The module path (``model.language_model.layers.3.self_attn``) a node came from."""
        return module_path(node)

    def module_paths(self) -> dict[str, str]:
        return {n.name: module_path(n) for n in self.graph.nodes}

    def example_inputs(self) -> tuple[tuple, dict]:
        return self.example_args, self.example_kwargs

    def __repr__(self) -> str:
        n_ops = sum(1 for n in self.graph.nodes if n.op == "call_function")
        return f"Program({self.model_class}, {n_ops} ops, captured by {self.method})"


def _user_frame(exc: BaseException) -> str:
    """The innermost frame outside torch's own internals, as ``file:line: code``."""
    tb = traceback.extract_tb(exc.__traceback__)
    keep = [f for f in tb if "/torch/" not in f.filename and "/graphred/" not in f.filename]
    frame = (keep or tb or [None])[-1]
    if frame is None:
        return "<unknown>"
    return f"{frame.filename}:{frame.lineno}: {frame.line}"


# Names a forward's ``**kwargs`` take by convention though no signature lists them: Hugging Face's
# ``can_return_tuple`` decorator consumes ``return_dict`` before the typed ``**kwargs`` see it.
_CONVENTIONAL_KWARGS = frozenset({"return_dict"})


def _forward_names(fn: Any) -> tuple[list[str], set[str] | None, bool]:
    """(named parameters, keys of a ``**kwargs: Unpack[TypedDict]`` or None, has ``**kwargs``) of a forward."""
    import typing

    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return [], None, True
    named = [n for n, p in params.items() if p.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)]
    var_kw = next((p for p in params.values() if p.kind is inspect.Parameter.VAR_KEYWORD), None)
    typed = None
    if var_kw is not None and typing.get_origin(var_kw.annotation) is typing.Unpack:
        args = typing.get_args(var_kw.annotation)
        keys = getattr(args[0], "__annotations__", None) if args else None
        if isinstance(keys, dict):
            typed = set(keys)
    return named, typed, var_kw is not None


def _check_keyword_names(model: nn.Module, kwargs: dict) -> None:
    """Reject keyword inputs that a forward with ``**kwargs`` would silently ignore.

    A forward with ``**kwargs`` binds any name, so a misspelt optional input (``atention_mask``)
    would be dropped without a word and the graph captured without it. Rejected: a name close to
    a named parameter (a misspelling) that no submodule's forward takes either (a name passed down
    through ``**kwargs``, e.g. ``image_position_ids`` beside ``position_ids``, is an input); and,
    where ``**kwargs`` is typed ``Unpack[SomeTypedDict]`` (a declared set of pass-through
    options), a name that neither the TypedDict nor any submodule's forward takes.
    """
    import difflib

    named, typed, has_var_kw = _forward_names(model.forward)
    if not has_var_kw:
        return  # inspect's bind already rejected unknown names
    cls = type(model).__name__
    unknown = [n for n in kwargs if n not in named and n not in _CONVENTIONAL_KWARGS]
    if not unknown:
        return
    # the names the submodules' forwards take: a name that ``**kwargs`` passes down to one of them is an input
    sub_names: set[str] = set()
    seen: set[type] = set()
    for sub in model.modules():
        if sub is model or type(sub) in seen:
            continue
        seen.add(type(sub))
        sub_named, sub_typed, _ = _forward_names(sub.forward)
        sub_names |= set(sub_named) | (sub_typed or set())
    known: set[str] | None = None
    if typed is not None:
        known = set(named) | typed | _CONVENTIONAL_KWARGS | sub_names
    for name in unknown:
        close = difflib.get_close_matches(name, named, n=1, cutoff=0.8)
        if close and name not in sub_names:
            raise CaptureError(
                f"{cls}.forward has no input {name!r}; did you mean {close[0]!r}? (It takes {', '.join(named)}.)"
            )
        if known is not None and name not in known:
            close = difflib.get_close_matches(name, sorted(known), n=1, cutoff=0.8)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise CaptureError(
                f"{cls}.forward has no input {name!r}, and neither its typed **kwargs nor any of its "
                f"submodules take it, so it would be ignored silently.{hint} It takes {', '.join(named)}."
            )


def _check_inputs(model: Any, args: tuple, kwargs: dict) -> None:
    if not isinstance(model, nn.Module):
        raise CaptureError(
            f"graphred.capture expects a torch.nn.Module, got {type(model).__name__}. "
            "Pass the model object itself (e.g. a transformers PreTrainedModel)."
        )
    if not args and not kwargs:
        raise CaptureError(
            f"graphred.capture({type(model).__name__}) needs example inputs: "
            "call graphred.capture(model, **inputs) with the tensors the forward takes."
        )
    try:
        sig = inspect.signature(model.forward)
        sig.bind(*args, **kwargs)
    except TypeError as e:
        raise CaptureError(
            f"The example inputs do not match {type(model).__name__}.forward{inspect.signature(model.forward)}: {e}"
        ) from None
    _check_keyword_names(model, kwargs)

    def check_leaf(path: str, x: Any) -> None:
        if isinstance(x, (torch.Tensor, int, float, bool, str, type(None))):
            return
        if isinstance(x, (list, tuple)):
            for i, y in enumerate(x):
                check_leaf(f"{path}[{i}]", y)
            return
        if isinstance(x, dict):
            for k, y in x.items():
                check_leaf(f"{path}[{k!r}]", y)
            return
        raise CaptureError(
            f"Input {path} of {type(model).__name__} has type {type(x).__name__}; graphred captures "
            "tensors, numbers, strings and nested lists/dicts of them. Convert it to a tensor "
            "(e.g. a numpy array with torch.as_tensor) or drop it."
        )

    for i, a in enumerate(args):
        check_leaf(f"args[{i}]", a)
    for k, v in kwargs.items():
        check_leaf(k, v)


def _forward_fails(model: nn.Module, args: tuple, kwargs: dict) -> BaseException | None:
    """Run the forward on a copy (the user's model is never touched) and return its error, if any."""
    try:
        clone = copy.deepcopy(model)
    except Exception:  # noqa: BLE001 - an uncopyable model: skip the diagnosis
        return None
    try:
        with torch.no_grad():
            clone(*args, **kwargs)
    except Exception as e:  # noqa: BLE001
        return e
    return None


# errors of Python code that reads tensor values (a guard on one, a symbolic value used as a dict key)
_DATA_DEPENDENT = ("GuardOnDataDependentSymNode", "DataDependentOutputException", "data-dependent",
                   "non-nested SymInt", "PendingUnbackedSymbolNotFound",
                   # (a tensor built in C++ from traced tensors' data: an index given as a sequence of them)
                   "data is not allocated yet")
_NOISY_LOGGERS = ("torch.export", "torch._export", "torch.fx.experimental.symbolic_shapes")


@contextlib.contextmanager
def _quiet_torch_logs():
    """Silence torch.export's warnings and its failure dumps for the duration; restore after.

    torch.export prints the partial FX graph of a failed attempt straight to ``sys.stderr``
    (a whole model's graph for a data-dependent guard that capture then handles); that print
    goes to a discarded buffer.
    """
    loggers = [logging.getLogger(n) for n in _NOISY_LOGGERS]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


class _RealTensorPropagationLogFilter(logging.Filter):
    """Drops torch's ``propagate_real_tensors ...`` warnings. A program captured with real-tensor propagation
    keeps the example values of its data-dependent sizes in its shape environment, and every later shape
    query on its graph (analysis, rewrite, estimate) logs one such line per size read; capture has already
    said once, in ``Program.notes``, that those sizes are specialised to the example inputs."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("propagate_real_tensors")


_REAL_TENSOR_LOG_FILTER = _RealTensorPropagationLogFilter()
_SHAPES_LOGGER = "torch.fx.experimental.symbolic_shapes"


def _silence_real_tensor_propagation_logs() -> None:
    """Install :class:`_RealTensorPropagationLogFilter` on torch's symbolic-shapes logger (once)."""
    lg = logging.getLogger(_SHAPES_LOGGER)
    if _REAL_TENSOR_LOG_FILTER not in lg.filters:
        lg.addFilter(_REAL_TENSOR_LOG_FILTER)


_MISSING = object()


def _contents(v: Any) -> Any:
    """A shallow copy of a mutable container attribute's contents, else _MISSING."""
    if isinstance(v, dict):
        return dict(v)
    if isinstance(v, (list, set)):
        return type(v)(v) if type(v) in (list, set) else list(v)
    return _MISSING


def _same_contents(box: Any, saved: Any) -> bool:
    if isinstance(box, dict):
        return box.keys() == saved.keys() and all(box[k] is v for k, v in saved.items())
    if isinstance(box, list):
        return len(box) == len(saved) and all(a is b for a, b in zip(box, saved))
    return box == saved


@contextlib.contextmanager
def _preserve_attributes(model: nn.Module):
    """Leave every submodule's ``__dict__`` exactly as it was, object for object (and that of every plain Python
    object a submodule holds, e.g. a cache object whose dict a forward fills).

    Tracing runs the model's Python forward, and what a forward does to its module stays: Hugging
    Face models install output-capturing forward hooks on their first call (and set a flag
    attribute); torch.export (non-strict) writes attributes back after tracing as rebuilt copies
    of dict/list attributes (``_tp_plan`` and friends) and keeps any attribute a forward adds.
    Capture must not change the model at all, so after it (success or failure) every submodule
    gets back its original attribute objects, the original contents of its container attributes
    (parameters, buffers, submodules, hook dicts) and loses attributes added during capture.
    """
    saved, seen = [], set()
    for m in model.modules():
        attrs = dict(m.__dict__)
        containers = {k: c for k, v in attrs.items() if (c := _contents(v)) is not _MISSING}
        saved.append((m, attrs, containers))
        for obj in attrs.values():  # plain Python helpers the modules hold (a cache object and its dicts): the same
            if _plain_object(obj) and id(obj) not in seen:
                seen.add(id(obj))
                o_attrs = dict(vars(obj))
                saved.append((obj, o_attrs, {k: c for k, v in o_attrs.items() if (c := _contents(v)) is not _MISSING}))
    try:
        yield
    finally:
        for m, attrs, containers in saved:
            current = m.__dict__
            for k in [k for k in current if k not in attrs]:
                del current[k]
            for k, v in attrs.items():
                if current.get(k, _MISSING) is not v:
                    current[k] = v
            for k, items in containers.items():
                box = current[k]
                if not _same_contents(box, items):
                    box.clear()
                    box.update(items) if isinstance(box, (dict, set)) else box.extend(items)


def _plain_object(obj: Any) -> bool:
    """A Python object with attributes of its own that is no module, tensor, class, function or Python module."""
    import types

    return hasattr(obj, "__dict__") and isinstance(getattr(obj, "__dict__", None), dict) and not isinstance(
        obj, (nn.Module, torch.Tensor, type, types.FunctionType, types.MethodType, types.ModuleType))


def _holds_tensors(v: Any) -> bool:
    return isinstance(v, torch.Tensor) or isinstance(v, (tuple, list)) and any(_holds_tensors(x) for x in v)


def _memo_containers(model: nn.Module) -> list[tuple[str, dict]]:
    """``[(where, dict)]``: the dicts inside plain Python objects held by the model's modules (not modules, not
    tensors: a helper such as an LRU cache) whose values are tensors: results memoised by earlier calls (e.g.
    text embeddings keyed by the token ids), which a forward returns instead of computing them."""
    found, seen = [], set()
    for path, m in model.named_modules():
        for name, obj in vars(m).items():
            if not _plain_object(obj) or id(obj) in seen:
                continue
            seen.add(id(obj))
            for k, d in vars(obj).items():
                if isinstance(d, dict) and d and any(_holds_tensors(x) for x in d.values()):
                    found.append((f"{path + '.' if path else ''}{name}.{k}", d))
    return found


def _cached_methods(model: nn.Module) -> list[tuple[type, str, Any, Any]]:
    """``[(class, name, attribute, uncached)]``: the methods of the model's module classes memoised with
    ``functools.lru_cache``/``cache`` (the memo is the function's, shared by every call and every instance), with
    the same method without its memo."""
    out, seen = [], set()
    for m in model.modules():
        for cls in type(m).__mro__:
            if cls in seen or cls.__module__.startswith("torch."):
                continue
            seen.add(cls)
            for name, attr in list(vars(cls).items()):
                fn = attr.__func__ if isinstance(attr, (staticmethod, classmethod)) else attr
                if callable(getattr(fn, "cache_clear", None)) and callable(getattr(fn, "cache_info", None)) \
                        and callable(getattr(fn, "__wrapped__", None)):
                    plain = type(attr)(fn.__wrapped__) if isinstance(attr, (staticmethod, classmethod)) \
                        else fn.__wrapped__
                    out.append((cls, name, attr, plain))
    return out


@contextlib.contextmanager
def _memos_hidden(model: nn.Module, notes: list[str]):
    """While inside, the memo dicts of :func:`_memo_containers` are empty and the module classes' memoised methods
    (:func:`_cached_methods`) run unmemoised, so the traced forward computes what they hold from the inputs: the
    graph holds no earlier call's results as constants (looked up by keys read from the inputs), and no traced
    (fake) value is left in a memo for the model's next call. Put back after; said in ``notes`` where a memo
    held tensors."""
    memos = [(w, d, list(d.items())) for w, d in _memo_containers(model)]
    cached = _cached_methods(model)
    for _, d, _ in memos:
        d.clear()
    for cls, name, attr, plain in cached:
        setattr(cls, name, plain)
    try:
        yield
    finally:
        for _, d, items in memos:
            d.clear()
            d.update(items)
        for cls, name, attr, plain in cached:
            setattr(cls, name, attr)
    if memos:
        notes.append(f"tensors memoised by earlier calls in {', '.join(w for w, _, _ in memos)} were hidden while "
                     "capturing, so the graph computes them from the inputs (the model's memo is left as it was).")


def _export_real_tensors(model: nn.Module, args: tuple, kwargs: dict) -> torch.export.ExportedProgram:
    """torch.export with real-tensor propagation: data-dependent guards are decided by the
    example inputs' values. This is the mechanism of ``torch.export.draft_export`` without its
    structured-log report, which costs several times the export itself on models with many
    data-dependent symbols (ViLT: 1.6 s instead of 7 s)."""
    with torch._functorch.config.patch(
        fake_tensor_propagate_real_tensors=True, generate_fake_kernels_from_real_mismatches=True
    ), _real_parameter_values(), _RealWritesOnce():
        return torch.export.export(model, args, kwargs, strict=False)


@contextlib.contextmanager
def _real_parameter_values():
    """While inside, torch's real-tensor propagation gives the model's parameters their values. torch (2.13) copies
    a tensor's data into the real tensor it attaches to its fake only where the tensor's type is exactly
    ``torch.Tensor`` (``meta_utils._safe_copy``), so an ``nn.Parameter``'s real tensor is uninitialised memory and
    every real value computed from the weights (router logits, the experts a batch hits) is garbage, different
    at each capture. Only torch's helper is swapped, for the capture's duration; the model is not touched."""
    from torch._subclasses import meta_utils

    saved_copy, saved_clone = meta_utils._safe_copy, meta_utils._safe_clone

    def plain(src) -> bool:
        return type(src) in (torch.Tensor, nn.Parameter)

    def safe_copy(dst, src):
        if plain(src):
            dst.copy_(src.detach() if type(src) is nn.Parameter else src)

    def safe_clone(src):
        return (src.detach() if type(src) is nn.Parameter else src).clone() if plain(src) else None

    meta_utils._safe_copy, meta_utils._safe_clone = safe_copy, safe_clone
    try:
        yield
    finally:
        meta_utils._safe_copy, meta_utils._safe_clone = saved_copy, saved_clone


def _write_on_real_copy(func, base: torch.Tensor, args: tuple, kwargs: dict, value_of) -> torch.Tensor | None:
    """A copy of ``base`` after the in-place method ``func`` wrote into it, run outside tracing with every tensor
    operand after the first (``args[1:]``, ``kwargs``) replaced by ``value_of(t)``, its real value; None where an
    operand has none (``value_of`` gives None) or the call fails."""
    def real(a):
        if not isinstance(a, torch.Tensor):
            return a
        r = value_of(a)
        if r is None:
            raise LookupError
        return r
    try:
        a2, k2 = torch.utils._pytree.tree_map(real, (args[1:], kwargs))
        with torch.utils._python_dispatch._disable_current_modes():
            out = base.clone()
            func(out, *a2, **k2)
        return out
    except Exception:  # noqa: BLE001 - no real value to compute it from
        return None


def _run_writing_real_once(func, args: tuple, kwargs: dict, run):
    """``run()`` (the traced call of ``func``), and where ``func`` is a method writing in place into a traced tensor
    (``out.index_add_(...)``), the real tensor behind it (real-tensor propagation) left holding what ``func``
    computes on its value before the call, once. torch (2.13) runs an in-place op's real kernel on the real
    tensors and then, for an op it decomposes (``index_add_`` into ``index_put_(accumulate=True)``), the
    decomposition's in-place op again on the same real tensors: the write is applied twice (a mixture of experts
    summing its experts with ``index_add_``: every later real value, the next layer's routing, was wrong, and the
    counts the capture pinned failed the graph's own run)."""
    if not (args and isinstance(args[0], torch.Tensor) and _is_traced(args[0])
            and not isinstance(func, torch._ops.OpOverload)):
        return run()
    name = getattr(func, "__name__", "")
    if not (name.endswith("_") and not name.startswith("_")):
        return run()
    before = _ConcreteScalars._real(args[0])
    if before is None:
        return run()

    # (want is None where no real value can compute it: torch's then stays)
    want = _write_on_real_copy(func, before, args, kwargs,
                               lambda a: _ConcreteScalars._real(a) if _is_traced(a) else a)
    out = run()
    after = _ConcreteScalars._real(args[0])
    if want is not None and after is not None and after.shape == want.shape and after.dtype == want.dtype:
        with torch.utils._python_dispatch._disable_current_modes():
            if not torch.equal(after, want) and not (want.is_floating_point() and torch.equal(
                    after.isnan(), want.isnan()) and torch.equal(after.nan_to_num(0), want.nan_to_num(0))):
                after.copy_(want)
    return out


class _RealWritesOnce(torch.overrides.TorchFunctionMode):
    """During a capture with real-tensor propagation: each in-place write into a traced tensor leaves its real
    value as the op computes it once (:func:`_run_writing_real_once`)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        return _run_writing_real_once(func, args, kwargs, lambda: func(*args, **kwargs))


class _ConcreteScalars(torch.overrides.TorchFunctionMode):
    """During a capture with real-tensor propagation: a tensor read into Python (``tolist``, ``item``,
    ``bool``, ``int``, ``float``, ``index``) gives the value it has at the example inputs, a plain Python
    value, not an unbacked symbol. Python code that loops over such values, uses them as dict keys or
    ranges (vision position ids built per image, ``mask.any()`` branches) then traces as it runs on the
    example inputs: the graph is specialised to them, as draft export's guards are."""

    _READS = frozenset({torch.Tensor.tolist, torch.Tensor.item, torch.Tensor.__bool__, torch.Tensor.__int__,
                        torch.Tensor.__index__, torch.Tensor.__float__})

    def __init__(self):
        super().__init__()
        self.reads = 0
        # integer tensors selected by floating-point values (top-k expert ids, argmax, a sort's positions) and
        # what is computed from them: never folded, their values at trace time are not the inputs' bookkeeping
        # (and can differ from the model's own run)
        # (by id, the tensors kept alive for the capture: a WeakSet would compare tensors with ==)
        self._from_floats: dict[int, torch.Tensor] = {}
        # plain constants (made during the capture) written in place with traced operands (``start += n`` where
        # ``start`` was folded): the graph records the write, but the Python tensor keeps its old value, so a
        # later read would be stale. id -> (the constant, its value after the writes), for the reads
        self._written: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    @staticmethod
    def _real(t: Any) -> Any:
        from torch._subclasses.functional_tensor import FunctionalTensor

        for _ in range(8):
            if isinstance(t, FunctionalTensor):
                t = t.elem
            elif isinstance(t, torch.Tensor) and torch._is_functional_tensor(t):
                t = torch._from_functional_tensor(t)
            else:
                break
        return getattr(t, "real_tensor", None)

    def _fold(self, func, args, kwargs):
        """Integer bookkeeping over small tensors (at most :data:`graphred.serving.SMALL_VALUE_TENSOR`
        elements, the ones serving keys by value, e.g. image grids) computed on their example values: a
        constant of the graph, so ops with value-dependent sizes (``repeat_interleave`` by counts,
        ``arange(counts.sum())``) get static sizes. None where that does not apply."""
        from .serving import SMALL_VALUE_TENSOR

        flat, spec = torch.utils._pytree.tree_flatten((args, kwargs))
        tensors = [a for a in flat if isinstance(a, torch.Tensor)]
        if not any(_is_traced(a) for a in tensors) or any(a.is_floating_point() or a.is_complex() for a in tensors) \
                or any(id(a) in self._from_floats for a in tensors):
            return None
        reals = []
        for a in flat:
            if isinstance(a, torch.Tensor):
                r = self._real(a) if _is_traced(a) else self._current(a)
                if r is None or (_is_traced(a) and r.numel() > SMALL_VALUE_TENSOR):
                    return None
                reals.append(r)
            else:
                reals.append(a)
        a2, k2 = torch.utils._pytree.tree_unflatten(reals, spec)
        with torch.utils._python_dispatch._disable_current_modes():  # computed on the values, not traced
            out = func(*a2, **k2)
            ok = all(isinstance(o, torch.Tensor) and not (o.is_floating_point() or o.is_complex())
                     for o in torch.utils._pytree.tree_leaves(out) if isinstance(o, torch.Tensor))
            out = torch.utils._pytree.tree_map(
                lambda o: o.clone(memory_format=torch.contiguous_format) if isinstance(o, torch.Tensor) else o, out)
        # (cloned: fresh dense constants; a folded view with expand's zero strides cannot become a graph constant)
        return out if ok else None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in self._READS and args and isinstance(args[0], torch.Tensor):
            real = self._real(args[0]) if _is_traced(args[0]) else self._current(args[0])
            if real is not None:
                self.reads += 1
                if _is_traced(args[0]) and id(args[0]) in self._from_floats:
                    self._guard(args[0] == self._constant(real), "a value selected by floating-point values (a "
                                "router's choice of experts) read into Python at capture")
                with torch.utils._python_dispatch._disable_current_modes():
                    return func(real, *args[1:], **kwargs)
        if func in (torch.Tensor.__getitem__, torch.Tensor.__setitem__) and len(args) >= 2:
            index = self._bool_index(args[1])
            if index is not None:  # a boolean mask of known value: integer indices of static length
                self.reads += 1
                return func(args[0], index, *args[2:], **kwargs)
            index = self._bool_index_traced(args[1]) if func is torch.Tensor.__getitem__ else None
            if index is not None:
                return func(args[0], index, *args[2:], **kwargs)
            index = self._sequence_index(args[1])
            if index is not None:
                return func(args[0], index, *args[2:], **kwargs)
        if func in (torch.tensor, torch.as_tensor) and args:
            built = self._tensor_of_traced(args[0], kwargs)
            if built is not None:
                return built
        if func in (torch.nonzero, torch.Tensor.nonzero, torch.where) and args and isinstance(args[0], torch.Tensor) \
                and args[0].dim() >= 1 and (kwargs.get("as_tuple") or func is torch.where and len(args) == 1):
            # nonzero(as_tuple=True) leaves a pending unbacked size under real-tensor propagation; nonzero() and
            # unbind give the same index tensors
            return tuple(torch.nonzero(args[0]).unbind(1))
        name = getattr(func, "__name__", "")
        if not (isinstance(func, torch._ops.OpOverload) or name.startswith("_") or name.endswith("_")
                or name in self._NOT_FOLDED):
            try:
                out = self._fold(func, args, kwargs)
            except Exception:  # noqa: BLE001 - not foldable: traced as usual
                out = None
            if out is not None:
                self.reads += 1
                return out
        if name == "unbind" and args and isinstance(args[0], torch.Tensor) and _is_traced(args[0]):
            rows = self._unbind_rows(args[0], args[1] if len(args) > 1 else kwargs.get("dim", 0))
            if rows is not None:
                self.reads += 1
                return rows
        written = self._write_value(func, name, args, kwargs)
        out = _run_writing_real_once(func, args, kwargs, lambda: func(*args, **kwargs))
        if written is not None:
            self._written[id(args[0])] = (args[0], written)
        ins = [a for a in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)]
        if any(id(a) in self._from_floats for a in ins) or name in self._SELECTS and any(
                a.is_floating_point() or a.is_complex() for a in ins):
            for o in torch.utils._pytree.tree_leaves(out):
                if isinstance(o, torch.Tensor) and not (o.is_floating_point() or o.is_complex()):
                    self._from_floats[id(o)] = o
        return out

    def _unbind_rows(self, t: torch.Tensor, dim: int):
        """``unbind`` (a Python loop over a tensor) along a dim whose size is unbacked (the rows of a ``nonzero``:
        the experts a batch hits): one ``select`` per row at the example inputs (the loop runs that many times in
        the graph anyway). torch's unbind there gives each element the fake shape of the whole tensor (its real
        value is one row), and a later op on it fails ("a return was not dense in memory"). None where the size
        is static or its value unknown."""
        dim = dim % t.dim()
        real = self._real(t)
        if isinstance(t.shape[dim], int) or real is None:
            return None
        # (the loop is unrolled over the example's rows: a run with another count is refused, not cut short)
        self._guard(torch.scalar_tensor(t.shape[dim], dtype=torch.long) == real.shape[dim],
                    f"the number of rows a Python loop ran over at capture ({real.shape[dim]})")
        rows = tuple(torch.select(t, dim, i) for i in range(real.shape[dim]))
        if id(t) in self._from_floats:  # (the experts a router hit: their ids read later are guarded too)
            self._from_floats.update((id(r), r) for r in rows)
        return rows

    @staticmethod
    def _constant(real: torch.Tensor) -> torch.Tensor:
        with torch.utils._python_dispatch._disable_current_modes():
            return real.clone()

    @staticmethod
    def _guard(cond: torch.Tensor, what: str) -> None:
        """A run-time check in the graph that ``cond`` (traced) holds everywhere, as at the example inputs: the
        graph was specialised to ``what``; a call that changes it fails as a guard (an InputError from a
        Program) instead of computing with the example's value."""
        try:
            torch._assert_async(cond.all(), f"Guard failed: {what} changed")
        except Exception:  # noqa: BLE001 - shapes that cannot be compared here: left unguarded, as before
            pass

    def _current(self, t: torch.Tensor) -> torch.Tensor:
        """A plain constant's value now: after the in-place writes with traced operands that the trace recorded
        but did not apply to it (see :meth:`_write_value`)."""
        w = self._written.get(id(t))
        return w[1] if w is not None and w[0] is t else t

    def _write_value(self, func, name: str, args: tuple, kwargs: dict) -> torch.Tensor | None:
        """The value a plain constant will hold after ``func`` (a method writing in place: ``add_``, as
        ``start += n`` calls it) where another operand is traced; None for anything else."""
        if not (name.endswith("_") and not name.startswith("_") and args and isinstance(args[0], torch.Tensor)
                and not _is_traced(args[0]) and not isinstance(func, torch._ops.OpOverload)):
            return None
        rest = [a for a in torch.utils._pytree.tree_leaves((args[1:], kwargs)) if isinstance(a, torch.Tensor)]
        if not any(_is_traced(a) for a in rest):
            return None  # (run on the constant itself: its value is right)
        # (None: no real value to follow; reads of it stay as torch gives them)
        return _write_on_real_copy(func, self._current(args[0]), args, kwargs,
                                   lambda a: self._real(a) if _is_traced(a) else self._current(a))

    def _bool_index(self, index):
        """``index`` with each boolean mask tensor of known value (small, as :meth:`_fold`) replaced by the
        integer index tensors of its true positions; None when it holds no such mask."""
        from .serving import SMALL_VALUE_TENSOR

        items = index if isinstance(index, tuple) else (index,)
        out, changed = [], False
        for it in items:
            if isinstance(it, torch.Tensor) and it.dtype == torch.bool:
                real = self._real(it) if _is_traced(it) else it
                # (a constant mask, e.g. folded from an image grid, has static positions whatever its size)
                if real is not None and (real is it or real.numel() <= SMALL_VALUE_TENSOR):
                    with torch.utils._python_dispatch._disable_current_modes():
                        out.extend(t.clone() for t in real.nonzero(as_tuple=True))
                    changed = True
                    continue
            out.append(it)
        return tuple(out) if changed else None

    @staticmethod
    def _bool_index_traced(index):
        """``index`` with each traced boolean mask replaced by the traced integer index tensors of its true
        positions (``nonzero().unbind(1)``, the same selection); None when it holds none. Under real-tensor
        propagation a mask index ``x[mask]`` checks its fake result against the real one inside the op and
        pins the count of true positions to its value before the op's output binds it (a
        PendingUnbackedSymbolNotFound, e.g. Hugging Face's ``inputs_embeds[special_mask].numel()`` over a
        mask expanded to the hidden size); ``nonzero`` binds the count on its own output."""
        items = index if isinstance(index, tuple) else (index,)
        out, changed = [], False
        for it in items:
            if isinstance(it, torch.Tensor) and it.dtype == torch.bool and it.dim() >= 1 and _is_traced(it):
                out.extend(torch.nonzero(it).unbind(1))
                changed = True
            else:
                out.append(it)
        return tuple(out) if changed else None

    @staticmethod
    def _tensor_of_traced(data, kwargs: dict):
        """``torch.tensor(data)`` where ``data`` is a (nested) Python sequence holding traced 0-d tensors (a list of
        per-sample values computed in a Python loop, e.g. ``torch.tensor([pos.max() + 1 - n for ...])``): the
        ``torch.stack`` of its elements, a traced tensor of the same values, shape and dtype. torch builds such a
        tensor in C++ from the elements' data, which a traced tensor does not have ("data is not allocated yet").
        None when ``data`` holds no traced tensor or is not a plain nesting of 0-d tensors and numbers."""
        leaves: list = []

        def walk(d, depth):
            if isinstance(d, (list, tuple)):
                if not d or depth > 8:
                    return None
                shapes = [walk(e, depth + 1) for e in d]
                if any(s is None for s in shapes) or len(set(shapes)) != 1:
                    return None
                return (len(d),) + shapes[0]
            if isinstance(d, torch.Tensor) and d.dim() == 0 or isinstance(d, (bool, int, float)):
                leaves.append(d)
                return ()
            return None

        shape = walk(data, 0)
        if shape is None or not any(isinstance(e, torch.Tensor) and _is_traced(e) for e in leaves):
            return None
        dtype = kwargs.get("dtype")
        if dtype is None:  # torch.tensor's inference: the promoted type of the elements (numbers as Python values)
            def kind(e):
                if isinstance(e, torch.Tensor):
                    return e.dtype
                return torch.bool if isinstance(e, bool) else torch.int64 if isinstance(e, int) else \
                    torch.get_default_dtype()
            # (outside the trace: torch.promote_types called here would be recorded as a graph op)
            with torch.utils._python_dispatch._disable_current_modes():
                dtype = kind(leaves[0])
                for e in leaves[1:]:
                    dtype = torch.promote_types(dtype, kind(e))
        like = next(e for e in leaves if isinstance(e, torch.Tensor) and _is_traced(e))
        device = kwargs.get("device") or like.device
        parts = [e.to(device=device, dtype=dtype) if isinstance(e, torch.Tensor)
                 else torch.full((), e, dtype=dtype, device=device) for e in leaves]
        out = torch.stack(parts).reshape(shape)
        return out.requires_grad_() if kwargs.get("requires_grad") else out

    @classmethod
    def _sequence_index(cls, index):
        """``index`` with each Python sequence of traced 0-d tensors (``rows, cols = zip(*ind)``, then
        ``x[rows, cols]``) replaced by their ``torch.stack``: a traced index tensor. Indexing turns such a
        sequence into a tensor in C++ from the elements' data, which a traced tensor does not have ("data is
        not allocated yet"). None when ``index`` holds no such sequence."""
        def stacked(seq):
            if not isinstance(seq, (list, tuple)) or not seq:
                return None
            parts = [stacked(e) if isinstance(e, (list, tuple)) else e for e in seq]
            if not all(isinstance(e, torch.Tensor) and not e.is_floating_point() and e.dtype != torch.bool
                       for e in parts) or len({e.shape for e in parts}) != 1 or not any(_is_traced(e) for e in parts):
                return None
            return torch.stack([e.to(parts[0].dtype) for e in parts])

        if isinstance(index, list):
            return stacked(index)
        if not isinstance(index, tuple):
            return None
        out = [stacked(it) if isinstance(it, (list, tuple)) else None for it in index]
        if all(o is None for o in out):
            return None
        return tuple(it if o is None else o for it, o in zip(index, out))

    _SELECTS = frozenset({"topk", "sort", "argsort", "msort", "argmax", "argmin", "max", "min", "kthvalue", "mode",
                          "multinomial"})
    # (and fresh buffers: ``empty_like(perm)`` then ``inv[perm] = arange(n)`` writes into it; folded, the buffer
    # would be a graph constant holding uninitialised memory, the write lost)
    _NOT_FOLDED = frozenset({"size", "dim", "numel", "stride", "storage_offset", "untyped_storage", "detach",
                             "is_neg", "is_conj", "is_inference", "is_floating_point", "is_complex", "element_size",
                             "data_ptr", "requires_grad", "clone", "contiguous", "alias",
                             "empty_like", "zeros_like", "ones_like", "full_like", "new_empty", "new_zeros",
                             "new_ones", "new_full", "empty", "zeros", "ones", "full", "empty_strided",
                             # (views compute nothing: folded, a view of an input (``input_ids.view(-1, L)``) would
                             # make the graph ignore that input; what is computed from the view still folds)
                             "view", "view_as", "reshape", "reshape_as", "flatten", "unflatten", "squeeze",
                             "unsqueeze", "permute", "transpose", "t", "expand", "expand_as", "narrow", "movedim",
                             "swapaxes", "swapdims"})


def _is_traced(t: torch.Tensor) -> bool:
    """A tensor of the trace (fake or functional), not a plain constant."""
    from torch._subclasses.fake_tensor import FakeTensor
    from torch._subclasses.functional_tensor import FunctionalTensor

    return isinstance(t, (FakeTensor, FunctionalTensor)) or torch._is_functional_tensor(t)


def _export_concrete_reads(model: nn.Module, args: tuple, kwargs: dict) -> torch.export.ExportedProgram:
    """:func:`_export_real_tensors` with every tensor read into Python made concrete (:class:`_ConcreteScalars`)."""
    with torch._functorch.config.patch(
        fake_tensor_propagate_real_tensors=True, generate_fake_kernels_from_real_mismatches=True
    ), _real_parameter_values(), _ConcreteScalars():
        return torch.export.export(model, args, kwargs, strict=False)


def _register_output_types() -> None:
    """Let torch.export return Hugging Face key/value caches (``use_cache=True``) as pytrees."""
    try:
        from transformers.integrations.executorch import register_dynamic_cache_export_support
    except Exception:  # an older or newer transformers without it: caches stay unsupported
        return
    try:
        register_dynamic_cache_export_support()
    except Exception:  # already registered
        pass


def capture(model: nn.Module, *args, **kwargs) -> Program:
    """Capture ``model`` on example inputs as an aten-level FX graph.

    Uses ``torch.export`` (non-strict). Where a model branches on tensor data (a
    data-dependent guard), capture falls back to draft-export semantics (real-tensor
    propagation, as ``torch.export.draft_export``), which specialises those branches to the
    example inputs and records them in ``Program.notes``. Where the model's code asks
    ``torch.compiler.is_exporting()`` and the graph of its export path does not reproduce the model bit for
    bit, capture takes the model's eager path (its code told that it is not exported), so that the graph
    computes what the model computes; also recorded in ``Program.notes``.
    The model is never modified: no hooks, no attribute changes, no swapped classes.

    >>> import graphred
    >>> model, inputs = graphred.zoo.load("clip")
    >>> prog = graphred.capture(model, **inputs)
    >>> prog.model_class
    'CLIPModel'
    """
    _check_inputs(model, args, kwargs)
    _register_output_types()
    asked: list[str] = []
    try:
        with _exporting_flag_for_model_code(None, asked):
            gm, ep, method, notes = _export(model, args, kwargs)
    except CaptureError as first:
        if not asked:
            raise
        # (e.g. a graph specialised at the example inputs that differs from the model because its code asked
        # whether it is exported): capture again down the eager path, else the first error stands
        try:
            with _exporting_flag_for_model_code(False, []):
                gm, ep, method, notes = _export(model, args, kwargs)
        except Exception:  # noqa: BLE001 - the first error names the obstacle
            raise first from None
        notes.append(_EAGER_PATH_NOTE.format(callers=", ".join(sorted(set(asked)))))
        asked = []
    if asked:
        # the model's own code asked torch.compiler.is_exporting(): it may compute differently while exported
        # (e.g. a triangular solve replaced by forward substitution for export targets that lack it), so the
        # graph would differ from the model the user runs. Where it does, capture again with the model's code
        # told that it is not exported; that graph is kept where it reproduces the model bit for bit.
        again = _eager_path_capture(model, gm, args, kwargs, sorted(set(asked)))
        if again is not None:
            gm, ep, method, notes = again
    prog = Program(
        graph_module=gm,
        exported=ep,
        example_args=tuple(args),
        example_kwargs=dict(kwargs),
        model_class=type(model).__name__,
        method=method,
        notes=notes,
        model=model,
    )
    return prog


def _export(model: nn.Module, args: tuple, kwargs: dict) -> tuple[torch.fx.GraphModule, Any, str, list[str]]:
    """torch.export with graphred's fallbacks (see :func:`capture`): the graph module, the exported program,
    the method and the notes."""
    cls = type(model).__name__
    notes: list[str] = []
    method = "export"
    read_error = None  # (the error of the capture with values read, where draft_export was tried after it)
    with warnings.catch_warnings(), _quiet_torch_logs(), _preserve_attributes(model), _memos_hidden(model, notes):
        warnings.simplefilter("ignore")
        try:
            ep = torch.export.export(model, args, kwargs, strict=False)
        except Exception as first:  # noqa: BLE001 - classified below
            text = f"{type(first).__name__}: {first}"
            if any(k in text for k in _DATA_DEPENDENT):
                try:
                    how = "draft_export semantics (real-tensor propagation)"
                    try:
                        ep = _export_real_tensors(model, args, kwargs)
                    except Exception:  # noqa: BLE001 - Python that reads tensor values (loops, dict keys)
                        try:
                            ep = _export_concrete_reads(model, args, kwargs)
                            how = ("real-tensor propagation with tensor values read into Python (loops, keys, "
                                   "branches) taken at the example inputs")
                        except Exception as reads:  # noqa: BLE001 - the full draft_export, with its own retries
                            read_error = reads
                            with _real_parameter_values():
                                ep = torch.export.draft_export(model, args, kwargs, strict=False)
                    method = "draft_export"
                    _silence_real_tensor_propagation_logs()
                    notes.append(
                        "torch.export hit a data-dependent guard at "
                        f"{_user_frame(first)}; captured with {how}, which specialise data-dependent branches "
                        "to the example inputs."
                    )
                except Exception as second:  # noqa: BLE001
                    raise _capture_error(model, args, kwargs, second, read_error) from second
            else:
                raise _capture_error(model, args, kwargs, first) from first
    gm = ep.module()
    _inline_integer_grad_blocks(gm)
    cloned = clone_mutated_constants(gm)
    if cloned:
        notes.append(f"the graph writes in place into {len(cloned)} tensor constant(s) built at capture "
                     f"({', '.join(cloned[:4])}); each call now starts from a fresh copy, as the model's code "
                     "builds them anew at each call.")
    if method == "draft_export":
        try:
            repair_meta_vals(gm)  # (real-tensor propagation can record vals the op does not produce)
        except Exception:  # noqa: BLE001 - not re-propagable here: the recorded vals stay, as before
            pass
        _check_specialised(model, gm, args, kwargs, notes[-1] if notes else "")
    return gm, ep, method, notes


_EAGER_PATH_NOTE = ("the model's code asks torch.compiler.is_exporting() ({callers}) and computes differently when "
                    "told it is exported; captured with that code told it is not (torch's own code is told the "
                    "truth), so the graph computes what the model computes when run.")


@contextlib.contextmanager
def _exporting_flag_for_model_code(answer: bool | None, asked: list[str]):
    """While inside, ``torch.compiler.is_exporting()`` called from code outside torch (the model's, its library's)
    answers ``answer`` (None: the true flag) and the calling module's name is appended to ``asked``; torch's own
    calls (export's machinery) always get the true flag. A name bound before (``from torch.compiler import
    is_exporting``) is not seen."""
    import sys

    import torch.compiler as tc

    saved = tc.is_exporting

    def is_exporting() -> bool:
        caller = sys._getframe(1).f_globals.get("__name__", "")
        if caller == "torch" or caller.startswith("torch."):
            return saved()
        asked.append(caller)
        return saved() if answer is None else answer

    tc.is_exporting = is_exporting
    try:
        yield
    finally:
        tc.is_exporting = saved


def _run_model_and_graph(model: nn.Module, gm: torch.fx.GraphModule, args: tuple, kwargs: dict, model_runs: int = 1,
                         flops: list | None = None, graph_errors: list | None = None):
    """The model's outputs (``model_runs`` runs) and the graph's on the example inputs, by pytree path, with the
    graph's buffers and constants put back after it ran (export lifts in-place updates into them); None where
    either cannot run here (training mode, meta tensors, an error). With ``flops`` (a list), the matrix-product
    FLOPs of the model's first run and of the graph's (graphred's FlopCounterMode) are appended to it.
    ``graph_errors``: where given, an error of the graph's run after the model ran is appended to it."""
    leaves = torch.utils._pytree.tree_leaves((args, kwargs, list(model.parameters())[:1]))
    if model.training or any(isinstance(t, torch.Tensor) and t.device.type == "meta" for t in leaves):
        return None
    saved = [(t, t.clone()) for m in gm.modules()
             for t in list(m._buffers.values()) + [v for v in vars(m).values() if isinstance(v, torch.Tensor)]
             if isinstance(t, torch.Tensor) and not isinstance(t, nn.Parameter)]
    try:
        with torch.no_grad(), _preserve_attributes(model):
            from .analysis.cost.oracle import flop_counter_mode

            wants = []
            for i in range(model_runs):
                counting = flops is not None and i == 0
                with flop_counter_mode() if counting else contextlib.nullcontext() as fc:
                    wants.append(_tensor_leaves(model(*args, **kwargs)))
                if counting:
                    flops.append(int(fc.get_total_flops()))
        try:
            with torch.no_grad(), flop_counter_mode() if flops is not None else contextlib.nullcontext() as fc:
                got = _tensor_leaves(gm(*args, **kwargs))
        except Exception as e:  # noqa: BLE001 - the graph fails where the model runs
            if graph_errors is not None:
                graph_errors.append(e)
            return None
        if flops is not None:
            flops.append(int(fc.get_total_flops()))
    except Exception:  # noqa: BLE001 - not runnable here: left to the caller's own checks
        return None
    finally:
        with torch.no_grad():
            for t, copy_ in saved:
                t.copy_(copy_)
    return wants, got


def _bit_equal_outputs(a: dict, b: dict) -> bool:
    """The same tensors by path, bit for bit (NaN where the other has NaN)."""
    def same(x, y):
        if x.shape != y.shape or x.dtype != y.dtype:
            return False
        if not (x.is_floating_point() or x.is_complex()):
            return torch.equal(x, y)
        nx, ny = x.isnan(), y.isnan()
        return torch.equal(nx, ny) and torch.equal(x.masked_fill(nx, 0), y.masked_fill(ny, 0))

    return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)


def _eager_path_capture(model: nn.Module, gm: torch.fx.GraphModule, args: tuple, kwargs: dict, callers: list[str]):
    """Where ``gm`` does not reproduce the model bit for bit and the model runs deterministically, or reproduces it
    but with more matrix-product FLOPs than the model runs (the code's export path computing the same values
    another way, e.g. a triangular solve as a product with the inverse built by substitution): capture again with
    the model's code told that it is not exported (:func:`_exporting_flag_for_model_code`) and return that capture
    (``(gm, ep, method, notes)``) if it reproduces the model bit for bit (and, in the second case, costs less);
    None otherwise (the first capture stands)."""
    counts: list[int] = []
    first = _run_model_and_graph(model, gm, args, kwargs, flops=counts)
    if first is None:
        return None
    costlier = False
    if _bit_equal_outputs(first[0][0], first[1]):
        costlier = len(counts) == 2 and counts[1] > counts[0]
        if not costlier:
            return None
    else:
        again = _run_model_and_graph(model, gm, args, kwargs)
        if again is None or not _bit_equal_outputs(first[0][0], again[0][0]):
            return None  # (a model that draws random numbers in eval mode cannot be compared)
    try:
        with _exporting_flag_for_model_code(False, []):
            gm2, ep2, method2, notes2 = _export(model, args, kwargs)
    except Exception:  # noqa: BLE001 - the eager path does not capture: the export path's graph stands
        return None
    counts2: list[int] = []
    second = _run_model_and_graph(model, gm2, args, kwargs, flops=counts2 if costlier else None)
    if second is None or not _bit_equal_outputs(first[0][0], second[1]):
        return None
    if costlier and not (len(counts2) == 2 and counts2[1] < counts[1]):
        return None
    notes2.append(_EAGER_PATH_NOTE.format(callers=", ".join(callers)))
    if costlier:
        notes2.append(f"(the graph of the code's export path computed the same outputs with {counts[1]} matrix-product "
                      f"FLOPs, the model {counts[0]}; the graph kept computes {counts2[1]})")
    return gm2, ep2, method2, notes2


def _same_output(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal within float tolerance (floating point) or exactly (integers, booleans)."""
    if a.is_floating_point():
        return torch.allclose(a, b, rtol=1e-4, atol=1e-5, equal_nan=True)
    return torch.equal(a, b)


def _differs_when_exporting(model: nn.Module, got: dict, args: tuple, kwargs: dict) -> bool:
    """True where the model run eagerly, but told that it is being exported, computes what the graph computes:
    its code takes another path under ``torch.compiler.is_exporting()`` (Hugging Face's mask helpers keep an
    all-true padding mask when exporting and drop it eagerly, and SDPA then applies the attention module's own
    ``is_causal``), so the graph is right for that path and wrong for the eager one. Hiding the flag from the
    capture does not help there: the helpers also test whether the mask is a fake tensor. ``got``: the graph's
    outputs on ``args``/``kwargs`` (by pytree path)."""
    try:
        with torch.no_grad(), _preserve_attributes(model), _exporting_flag_for_model_code(True, []):
            traced_path = _tensor_leaves(model(*args, **kwargs))
    except Exception:  # noqa: BLE001 - the model does not run so: not this cause
        return False
    same = [k for k in traced_path if k in got and traced_path[k].shape == got[k].shape
            and traced_path[k].dtype == got[k].dtype]
    return bool(same) and all(_same_output(traced_path[k], got[k]) for k in same)


def _check_specialised(model: nn.Module, gm: torch.fx.GraphModule, args: tuple, kwargs: dict, how: str) -> None:
    """A graph captured with values read at the example inputs must reproduce the model on them: run both
    (eval mode, real tensors only) and raise :class:`CaptureError` naming the first output that differs
    beyond float tolerance. A specialisation that went wrong (a value read after an in-place write, a branch
    taken on a stale value) is caught here instead of as wrong outputs later."""
    failed: list = []
    ran = _run_model_and_graph(model, gm, args, kwargs, model_runs=2, graph_errors=failed)
    if failed:
        e = failed[0]
        line = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise CaptureError(
            f"{type(model).__name__}: the graph captured with values read at the example inputs fails on those "
            f"inputs ({type(e).__name__}: {line}), where the model runs. {how} A value read during the capture "
            "differed from the model's own (a count pinned by a runtime assert, a branch taken on a wrong value); "
            "pass the data-dependent inputs precomputed, or compile with torch.compile(model, backend='graphred', "
            "...).") from e
    if ran is None:
        return
    (want, again), got = ran
    if not _bit_equal_outputs(want, again):
        return  # (a forward that draws random numbers in eval mode cannot be compared)
    for k in want:
        a, b = want[k], got.get(k)
        if b is None or a.shape != b.shape or a.dtype != b.dtype:
            continue  # (outputs are compared where both sides name the same tensor)
        if not _same_output(a, b):
            diff = (a.float() - b.float()).abs().nan_to_num(0).max().item()
            if _differs_when_exporting(model, got, args, kwargs):
                raise CaptureError(
                    f"{type(model).__name__}: the captured graph does not reproduce the model on the example inputs "
                    f"(output {k}, shape {tuple(a.shape)}: max difference {diff:.3g}) because the model computes "
                    "differently while it is traced: run eagerly with torch.compiler.is_exporting() true, it computes "
                    "what the graph computes. Its code branches on being exported or traced (e.g. Hugging Face's mask "
                    "helpers keep an all-true padding mask when tracing and drop it eagerly, and SDPA then applies "
                    "the attention module's own is_causal, so an attention declared causal is causal eagerly only). "
                    "Pass example inputs for which both paths agree (a padding mask with a masked position), or fix "
                    "the model's flag.")
            raise CaptureError(
                f"{type(model).__name__}: the graph captured with values read at the example inputs does not "
                f"reproduce the model on those inputs (output {k}, shape {tuple(a.shape)}: max difference "
                f"{diff:.3g}). {how} A value read into Python was stale or a branch was specialised wrongly; pass "
                "the data-dependent inputs precomputed, or compile with torch.compile(model, backend='graphred', "
                "...).")


def _tensor_leaves(out: Any, prefix: str = "out") -> dict[str, torch.Tensor]:
    """The tensors of a model output by path (``out.logits``, ``out[0]``): dicts and ``ModelOutput`` by key."""
    if isinstance(out, torch.Tensor):
        return {prefix: out}
    found: dict[str, torch.Tensor] = {}
    if hasattr(out, "keys") and hasattr(out, "__getitem__"):
        for k in out.keys():
            found.update(_tensor_leaves(out[k], f"{prefix}.{k}"))
    elif isinstance(out, (list, tuple)):
        for i, v in enumerate(out):
            found.update(_tensor_leaves(v, f"{prefix}[{i}]"))
    return found


def _inline_integer_grad_blocks(gm: torch.fx.GraphModule) -> None:
    """Inline the ``torch.no_grad()`` / ``enable_grad`` blocks of ``gm`` (``wrap_with_set_grad_enabled``
    submodules) whose outputs are all integer or boolean: no gradient flows through them, so the grad mode
    changes nothing, and inline their data-dependent sizes (``nonzero`` positions) are bound where they are made
    (a fake-tensor re-propagation of the submodule leaves them pending)."""
    from torch._higher_order_ops.wrap import wrap_with_set_grad_enabled

    changed = False
    for n in list(gm.graph.nodes):
        if n.op != "call_function" or n.target is not wrap_with_set_grad_enabled or len(n.args) < 2:
            continue
        outs = torch.utils._pytree.tree_leaves(n.meta.get("val"))
        # (sizes are integers too: a nonzero's count read after the block, by a guard on a loop over its rows)
        if not outs or any(not isinstance(o, (torch.Tensor, int, torch.SymInt)) or isinstance(o, torch.Tensor) and (
                o.is_floating_point() or o.is_complex()) for o in outs):
            continue
        sub_node = n.args[1]
        sub = getattr(gm, sub_node.target, None) if isinstance(sub_node, torch.fx.Node) else None
        if not isinstance(sub, torch.fx.GraphModule) or any(m.op in ("get_attr", "call_module") for m in sub.graph.nodes):
            continue
        if not all(u.op == "call_function" and u.target is operator.getitem for u in n.users):
            continue
        placeholders = [m for m in sub.graph.nodes if m.op == "placeholder"]
        if len(placeholders) != len(n.args) - 2:
            continue
        with gm.graph.inserting_before(n):
            out = gm.graph.graph_copy(sub.graph, dict(zip(placeholders, n.args[2:])))
        out = out if isinstance(out, (tuple, list)) else (out,)
        for u in list(n.users):
            u.replace_all_uses_with(out[u.args[1]])
            gm.graph.erase_node(u)
        gm.graph.erase_node(n)
        if not sub_node.users:
            gm.graph.erase_node(sub_node)
            delattr(gm, sub_node.target)
        changed = True
    if changed:
        gm.graph.lint()
        gm.recompile()


def _capture_error(model: nn.Module, args: tuple, kwargs: dict, exc: BaseException,
                   read_error: BaseException | None = None) -> CaptureError:
    """The CaptureError for ``exc`` (the last attempt's error); ``read_error``: the error of the capture with tensor
    values read, the fallback that gets furthest on data-dependent Python, named too (the last attempt,
    torch's draft_export, often stops at an earlier, unrelated place)."""
    cls = type(model).__name__
    eager = _forward_fails(model, args, kwargs)
    if eager is not None:
        return CaptureError(
            f"{cls}.forward fails on the given inputs ({type(eager).__name__}: {str(eager).splitlines()[0] if str(eager) else ''}) "
            f"at {_user_frame(eager)}. Check the example inputs: graphred captures what the model runs."
        )
    first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    also = ""
    if read_error is not None:
        line = str(read_error).strip().splitlines()[0] if str(read_error).strip() else ""
        also = (f"  With tensor values read at the example inputs (graphred's fallback): "
                f"{type(read_error).__name__}: {line}\n  at {_user_frame(read_error)}\n")
    return CaptureError(
        f"torch.export could not capture {cls}: {type(exc).__name__}: {first_line}\n"
        f"  at {_user_frame(exc)}\n{also}"
        "  Try: model.eval(); pass plain tensors (use_cache=False, return_dict=True for Hugging Face "
        "models); or compile with torch.compile(model, backend='graphred', options={'plan': ...}), which "
        "captures the graph piecewise around what torch.export cannot trace."
    )
