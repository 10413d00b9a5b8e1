"""Pass infrastructure: passes, cached read-only analyses, a checking pass manager, rewrite helpers.

Follows torch.fx's contract (``call(gm) -> PassResult(graph_module, modified)``), so a
:class:`GraphredPass` runs under torch's own ``PassManager`` and a plain torch pass function
runs under ours. Added on top: declared in-place/out-of-place behaviour (checked), preserved
analyses (the rest are dropped after a modifying pass), and a ``meta["val"]`` check.
"""
from __future__ import annotations

import contextlib
import operator
from collections.abc import Callable, Iterable, Iterator
from typing import Any, ClassVar
from weakref import WeakKeyDictionary

import torch
import torch.fx as fx
from torch._guards import detect_fake_mode
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.fx.experimental.symbolic_shapes import statically_known_true
from torch._dispatch.python import enable_python_dispatcher
from torch.fx.passes.fake_tensor_prop import FakeTensorProp
from torch.fx.passes.infra.pass_base import PassBase, PassResult
from torch.utils._pytree import tree_flatten

from graphred.errors import AnalysisError, PassError, PlanError, PostconditionError
from graphred.fx_utils import META_KEY, is_impure, set_fake_val

__all__ = [
    "ALL", "META_KEY", "Analysis", "AnalysisManager", "GraphredPass", "PassManager", "PassResult",
    "check_meta_vals", "insert_after", "node_result", "propagate_meta", "record_node_result",
    "replace_all_uses_except", "set_fake_val",
]



class _All(frozenset):
    """``preserves = ALL``: the pass keeps every analysis valid."""

    def __contains__(self, item: object) -> bool:
        return True

    def __repr__(self) -> str:
        return "ALL"


ALL: frozenset[str] = _All()


def _name_of(obj: Any) -> str:
    if isinstance(obj, str):
        return obj
    return getattr(obj, "name", None) or getattr(obj, "__name__", None) or type(obj).__name__


def _graph_code(gm: fx.GraphModule) -> str:
    return gm.graph.python_code("self").src


# ----------------------------------------------------------------------------- analyses


class Analysis:
    """A read-only computation over a graph module, cached by :class:`AnalysisManager`.

    >>> class CountNodes(Analysis):
    ...     def run(self, gm, am):
    ...         return len(gm.graph.nodes)
    >>> gm = fx.symbolic_trace(torch.nn.ReLU())
    >>> AnalysisManager().get(CountNodes, gm)
    3
    """

    name: ClassVar[str] = "Analysis"

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "name" not in cls.__dict__:
            cls.name = cls.__name__

    def run(self, gm: fx.GraphModule, am: AnalysisManager) -> Any:
        raise NotImplementedError


class AnalysisManager:
    """Caches analysis results per graph module; ``debug=True`` checks that analyses are read-only.

    >>> class Users(Analysis):
    ...     def run(self, gm, am):
    ...         return {n.name: len(n.users) for n in gm.graph.nodes}
    >>> am, gm = AnalysisManager(debug=True), fx.symbolic_trace(torch.nn.ReLU())
    >>> am.get(Users, gm) is am.get(Users, gm)       # computed once
    True
    >>> am.invalidate(gm, preserved=frozenset()); am.peek(Users, gm) is None
    True
    """

    def __init__(self, *, debug: bool = False):
        self.debug = debug
        self._cache: WeakKeyDictionary[fx.GraphModule, dict[str, Any]] = WeakKeyDictionary()
        self._running: list[str] = []

    def get(self, analysis: type[Analysis] | Analysis | str, gm: fx.GraphModule) -> Any:
        """The cached result of ``analysis`` on ``gm``, computing it first if needed.
        A bare name can only be read from the cache (see :meth:`require`)."""
        name = _name_of(analysis)
        results = self._cache.setdefault(gm, {})
        if name in results:
            return results[name]
        if isinstance(analysis, str):
            return self.require(name, gm)
        if name in self._running:
            raise AnalysisError(f"analyses depend on each other in a cycle: {' -> '.join(self._running + [name])}")
        instance = analysis() if isinstance(analysis, type) else analysis
        before = _graph_code(gm) if self.debug else None
        self._running.append(name)
        try:
            result = instance.run(gm, self)
        finally:
            self._running.pop()
        if self.debug and _graph_code(gm) != before:
            raise AnalysisError(f"analysis {name!r} changed the graph it analysed; analyses must be "
                                "read-only: move the change into a pass")
        results[name] = result
        return result

    def peek(self, analysis: type[Analysis] | Analysis | str, gm: fx.GraphModule) -> Any | None:
        """The cached result, or None; never computes."""
        return self._cache.get(gm, {}).get(_name_of(analysis))

    def require(self, analysis: type[Analysis] | Analysis | str, gm: fx.GraphModule) -> Any:
        """The cached result; raises :class:`AnalysisError` ("make sure X has run") if absent."""
        name = _name_of(analysis)
        results = self._cache.get(gm, {})
        if name not in results:
            raise AnalysisError(f"no result of analysis {name!r} for this graph; make sure {name} has "
                                "run (am.get(...)) and was not invalidated by a pass that does not preserve it")
        return results[name]

    def invalidate(self, gm: fx.GraphModule, preserved: frozenset[str] = frozenset()) -> None:
        """Drop every cached result (and per-node record under ``META_KEY``) not in ``preserved``."""
        results = self._cache.get(gm, {})
        for name in [n for n in results if n not in preserved]:
            del results[name]
        for node in gm.graph.nodes:
            records = node.meta.get(META_KEY)
            if records:
                for name in [n for n in records if n not in preserved]:
                    del records[name]


def record_node_result(node: fx.Node, analysis: type[Analysis] | Analysis | str, value: Any) -> None:
    """Record a per-node analysis result under ``node.meta[META_KEY][analysis name]``."""
    node.meta.setdefault(META_KEY, {})[_name_of(analysis)] = value


def node_result(node: fx.Node, analysis: type[Analysis] | Analysis | str) -> Any:
    """Read what :func:`record_node_result` stored; raises "make sure X has run" if absent.

    >>> gm = fx.symbolic_trace(torch.nn.ReLU()); n = next(iter(gm.graph.nodes))
    >>> record_node_result(n, "Axis", 1); node_result(n, "Axis")
    1
    """
    name = _name_of(analysis)
    records = node.meta.get(META_KEY) or {}
    if name not in records:
        raise AnalysisError(f"node {node.format_node()} has no result of {name!r}; make sure {name} has run")
    return records[name]


# ----------------------------------------------------------------------------- passes


class GraphredPass(PassBase):
    """Base class of graphred passes; subclasses implement ``call(gm) -> PassResult``.

    Class attributes: ``name`` (defaults to the class name), ``preserves`` (analysis names
    still valid after a modifying run; ``ALL`` for all), ``in_place`` (mutates and returns
    ``gm``; if False, returns a new module and leaves ``gm`` untouched), ``dce`` (the manager
    runs dead-code elimination after a modifying run). ``self.analyses`` is the manager's
    :class:`AnalysisManager` while the pass runs.

    >>> class ReluToSigmoid(GraphredPass):
    ...     def call(self, gm):
    ...         hits = [n for n in gm.graph.nodes if n.target is torch.relu]
    ...         for n in hits:
    ...             n.target = torch.sigmoid
    ...         return PassResult(gm, bool(hits))
    >>> gm = fx.symbolic_trace(lambda x: torch.relu(x))
    >>> PassManager([ReluToSigmoid()])(gm).modified
    True
    """

    name: ClassVar[str] = "GraphredPass"
    preserves: ClassVar[frozenset[str]] = frozenset()
    in_place: ClassVar[bool] = True
    dce: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "name" not in cls.__dict__:
            cls.name = cls.__name__

    def __repr__(self) -> str:
        return self.name

    def __call__(self, graph_module: fx.GraphModule, analyses: AnalysisManager | None = None) -> PassResult:
        self.analyses = analyses if analyses is not None else AnalysisManager()
        self.requires(graph_module)
        result = self.call(graph_module)
        if not isinstance(result, PassResult):
            raise PassError(f"pass {self.name!r} returned {type(result).__name__}, not PassResult",
                            pass_name=self.name)
        self.ensures(result.graph_module)
        return result


def _wrap(err: BaseException, cls: type[PassError], name: str, previous: list[str], stage: str) -> PassError:
    cls = type(err) if isinstance(err, PassError) else cls
    before = ", ".join(previous) if previous else "none"
    message = (f"pass {name!r} failed {stage} (passes run before it: {before}): "
               f"{type(err).__name__}: {err}")
    try:
        return cls(message, pass_name=name, previous=tuple(previous))
    except TypeError:  # a PassError subclass with its own constructor
        return PassError(message, pass_name=name, previous=tuple(previous))


class PassManager:
    """Runs passes in order and checks the graph after each one that modifies it.

    After a modifying pass: dead-code elimination (if the pass sets ``dce``), ``graph.lint()``
    (``lint``), ``recompile()``, :func:`check_meta_vals` (``check_meta``; a fake re-propagation,
    costly on big graphs), then analyses the pass does not preserve are dropped. Any failure is
    raised as :class:`PassError` naming the pass and those before it, the original chained; a
    :class:`~graphred.errors.PlanError` (the plan does not apply) passes through unchanged.

    >>> gm = fx.symbolic_trace(lambda x: torch.relu(x) + 1)
    >>> PassManager([lambda gm: PassResult(gm, False)])(gm).modified
    False
    """

    def __init__(self, passes: Iterable[Callable[[fx.GraphModule], PassResult]], *, lint: bool = True,
                 check_meta: bool = True, run_until_fixpoint: bool = False, max_iterations: int = 10,
                 analyses: AnalysisManager | None = None):
        self.passes = list(passes)
        self.lint, self.check_meta = lint, check_meta
        self.run_until_fixpoint, self.max_iterations = run_until_fixpoint, max_iterations
        self.analyses = analyses if analyses is not None else AnalysisManager()

    def __call__(self, gm: fx.GraphModule) -> PassResult:
        ran: list[str] = []
        modified_any = False
        for _ in range(self.max_iterations if self.run_until_fixpoint else 1):
            changed_by = []
            for p in self.passes:
                gm, modified = self._run_one(p, gm, ran)
                ran.append(_name_of(p))
                if modified:
                    changed_by.append(_name_of(p))
            modified_any |= bool(changed_by)
            if not changed_by or not self.run_until_fixpoint:
                return PassResult(gm, modified_any)
        raise PassError(f"no fixpoint after {self.max_iterations} iterations: {', '.join(changed_by)} still "
                        "reported modified=True; a pass must report False once it has nothing left to do",
                        pass_name=changed_by[0], previous=tuple(ran))

    def _run_one(self, p: Callable, gm: fx.GraphModule, previous: list[str]) -> tuple[fx.GraphModule, bool]:
        name, in_place = _name_of(p), getattr(p, "in_place", True)
        before = _graph_code(gm)
        try:
            result = p(gm, self.analyses) if isinstance(p, GraphredPass) else p(gm)
        except PlanError:  # the plan does not apply: the user's error, already said in the plan's terms
            raise
        except Exception as err:
            raise _wrap(err, PassError, name, previous, "while running") from err
        try:
            if not isinstance(result, PassResult):
                raise TypeError(f"a pass must return PassResult(graph_module, modified), got {type(result).__name__}")
            new, modified = result.graph_module, bool(result.modified)
            if in_place and new is not gm:
                raise RuntimeError("declared in_place=True but returned a different GraphModule; "
                                   "set in_place = False on the pass or return the module it was given")
            if not in_place and _graph_code(gm) != before:
                raise RuntimeError("declared in_place=False but mutated its input graph; copy it first "
                                   "(e.g. copy.deepcopy(gm)) or declare in_place = True")
            if not in_place and modified and new is gm:
                raise RuntimeError("declared in_place=False and modified=True but returned its input module")
            if in_place and not modified and _graph_code(new) != before:
                raise RuntimeError("reported modified=False but changed the graph")
            if modified:
                if getattr(p, "dce", False):
                    new.graph.eliminate_dead_code(is_impure_node=is_impure)
                if self.lint:
                    new.graph.lint()
                new.recompile()
                if self.check_meta:
                    check_meta_vals(new)
                self.analyses.invalidate(new, getattr(p, "preserves", frozenset()))
        except Exception as err:
            raise _wrap(err, PostconditionError, name, previous, "its checks") from err
        return new, modified


# ----------------------------------------------------------------------------- meta["val"]


class _RecomputeVals(FakeTensorProp):
    """FakeTensorProp that returns fresh vals instead of keeping them; parameters come from meta."""

    def run_node(self, n: fx.Node) -> Any:
        if n.op == "get_attr":
            v = n.meta.get("val")
            if isinstance(v, FakeTensor) and v.fake_mode is self._mode:
                return v
            real = self.fetch_attr(n.target)
            return self._mode.from_tensor(real) if isinstance(real, torch.Tensor) else real
        if n.op == "call_module" and not n.users:
            return None  # e.g. torch.export's _guards_fn: checks, computes nothing
        out = super().run_node(n)
        if n.op == "call_function" and n.target is torch.ops.aten.unbind.int:
            inp = self.env.get(n.args[0]) if isinstance(n.args[0], fx.Node) else None
            fixed = _unbind_pieces(inp, n, out)
            if fixed is not None:
                n.meta["val"] = out = fixed
        return out


def _same_val(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return (a.dtype == b.dtype and a.dim() == b.dim()
                and all(statically_known_true(x == y) for x, y in zip(a.shape, b.shape)))
    return not isinstance(a, torch.Tensor) and not isinstance(b, torch.Tensor)


def _recompute_vals(gm: fx.GraphModule) -> dict[fx.Node, Any] | None:
    """Fresh fake vals of every node, propagated from the placeholders' ``meta["val"]`` (``None`` when a
    placeholder has none); ``meta`` is left unchanged."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    inputs = [n.meta.get("val") for n in placeholders]
    if not placeholders or any(v is None for v in inputs):
        return None
    mode = detect_fake_mode(inputs) or FakeTensorMode(allow_non_fake_inputs=True)
    saved = {n: dict(n.meta) for n in gm.graph.nodes}
    # a graph captured with real-tensor propagation has a mode that also runs the real kernels; the check
    # compares shapes and dtypes only, and the real values of new nodes may be missing
    real = getattr(mode, "propagate_real_tensors", False)
    mode.propagate_real_tensors = False
    try:
        # the Python dispatcher: an op with a composite kernel that needs concrete sizes (e.g. upsample_*.vec)
        # decomposes in Python on symbolic sizes, as it did when torch.export traced it
        with enable_python_dispatcher():
            _RecomputeVals(gm, mode).propagate_dont_convert_inputs(*inputs)
        return {n: n.meta.get("val") for n in gm.graph.nodes}
    finally:
        mode.propagate_real_tensors = real
        for n, meta in saved.items():
            n.meta.clear()
            n.meta.update(meta)


def _stale_nodes(gm: fx.GraphModule, fresh: dict[fx.Node, Any]) -> list[fx.Node]:
    bad = []
    for n in gm.graph.nodes:
        if n.op != "call_function" or n.meta.get("val") is None:
            continue
        old, _ = tree_flatten(n.meta["val"])
        new, _ = tree_flatten(fresh[n])
        if len(old) != len(new) or not all(_same_val(a, b) for a, b in zip(old, new)):
            bad.append(n)
    return bad


def check_meta_vals(gm: fx.GraphModule) -> None:
    """Re-propagate fake tensors from the placeholders' ``meta["val"]`` and raise
    :class:`PostconditionError` if a call_function node's recorded val has another shape or dtype.
    Does nothing when a placeholder has no ``meta["val"]``; leaves ``meta`` unchanged."""
    fresh = _recompute_vals(gm)
    if fresh is None:
        return
    bad = [f"  {n.format_node()}\n    recorded {_describe(n.meta['val'])}, recomputed {_describe(fresh[n])}"
           for n in _stale_nodes(gm, fresh)]
    if bad:
        raise PostconditionError("meta['val'] is stale on these nodes (call set_fake_val/propagate_meta "
                                 "after a rewrite):\n" + "\n".join(bad))


def repair_meta_vals(gm: fx.GraphModule) -> list[str]:
    """Replace each call_function node's ``meta["val"]`` that disagrees (shape or dtype) with what its op
    computes from its inputs' vals by the recomputed one, and return those nodes' names. A graph exported
    with real-tensor propagation can record vals the op does not produce (e.g. ``unbind`` of a 1-D tensor,
    read into Python by ``tolist()``, recorded with 1-D pieces), which the passes' :func:`check_meta_vals`
    would later report as stale. Does nothing when a placeholder has no ``meta["val"]``.

    >>> import torch, torch.fx as fx
    >>> gm = torch.export.export(torch.nn.Linear(2, 2), (torch.ones(1, 2),)).module()
    >>> repair_meta_vals(gm)
    []
    """
    fresh = _recompute_vals(gm)
    stale = _stale_nodes(gm, fresh) if fresh is not None else []
    for n in stale:
        n.meta["val"] = fresh[n]
    return [n.name for n in stale] + _repair_unbind_vals(gm)


def _unbind_pieces(inp: Any, n: fx.Node, pieces: Any) -> list | None:
    """The right vals of ``unbind`` node ``n``'s pieces where ``pieces`` keep the unbound dim (else None)."""
    if not isinstance(inp, FakeTensor) or not isinstance(pieces, (list, tuple)) \
            or all(isinstance(p, torch.Tensor) and p.dim() == inp.dim() - 1 for p in pieces):
        return None
    dim = (n.args[1] if len(n.args) > 1 else n.kwargs.get("dim", 0)) % inp.dim()
    shape = [s for i, s in enumerate(inp.shape) if i != dim]
    with inp.fake_mode:
        return [torch.empty(shape, dtype=inp.dtype, device=inp.device) for _ in pieces]


def _repair_unbind_vals(gm: fx.GraphModule) -> list[str]:
    """``unbind`` pieces recorded with the unbound dim kept: the fake kernel (a split then a squeeze) keeps a
    dim whose size is symbolic (an unbacked count) because it cannot prove it is 1, while the op removes it.
    Each piece, and its ``getitem``, gets the input's val less that dim."""
    fixed = []
    for n in gm.graph.nodes:
        if n.op != "call_function" or n.target is not torch.ops.aten.unbind.int:
            continue
        new = _unbind_pieces(n.args[0].meta.get("val") if isinstance(n.args[0], fx.Node) else None, n,
                             n.meta.get("val"))
        if new is None:
            continue
        n.meta["val"] = new
        for u in n.users:
            if u.target is operator.getitem and isinstance(u.args[1], int):
                u.meta["val"] = new[u.args[1]]
        fixed.append(n.name)
    return fixed


def _describe(v: Any) -> str:
    leaves, _ = tree_flatten(v)
    return ", ".join(f"{x.dtype}{list(x.shape)}" if isinstance(x, torch.Tensor) else repr(x) for x in leaves)


def propagate_meta(gm: fx.GraphModule, start_nodes: fx.Node | Iterable[fx.Node]) -> list[fx.Node]:
    """Recompute ``meta["val"]`` of ``start_nodes`` and every call node downstream of them, in
    graph (topological) order; returns the nodes updated."""
    todo = [start_nodes] if isinstance(start_nodes, fx.Node) else list(start_nodes)
    reached: set[fx.Node] = set()
    while todo:
        n = todo.pop()
        if n not in reached:
            reached.add(n)
            todo.extend(n.users)
    updated = [n for n in gm.graph.nodes if n in reached and n.op in ("call_function", "call_method")]
    for n in updated:
        set_fake_val(n)
    return updated


# ----------------------------------------------------------------------------- rewrite helpers


def replace_all_uses_except(node: fx.Node, new: fx.Node, except_nodes: Iterable[fx.Node] = ()) -> list[fx.Node]:
    """Make every user of ``node`` use ``new`` instead, except ``except_nodes`` and the nodes
    ``new`` is computed from (so ``new = g(f(node))`` makes no cycle); returns the users changed."""
    keep, todo = set(except_nodes), [new]
    while todo:  # new and its ancestors, up to node
        n = todo.pop()
        if n is not node and n not in keep:
            keep.add(n)
            todo.extend(n.all_input_nodes)
    return node.replace_all_uses_with(new, delete_user_cb=lambda user: user not in keep)


@contextlib.contextmanager
def insert_after(node: fx.Node) -> Iterator[None]:
    """Like ``graph.inserting_after(node)``, but nodes created inside come out in creation
    order (torch's puts each new node right after ``node``, reversing them).

    >>> gm = fx.symbolic_trace(lambda x: x + 1); x = next(iter(gm.graph.nodes))
    >>> with insert_after(x):
    ...     a = gm.graph.call_function(torch.neg, (x,)); b = gm.graph.call_function(torch.abs, (a,))
    >>> [n.name for n in gm.graph.nodes][:3]
    ['x', 'neg', 'abs_1']
    """
    graph, last = node.graph, [node]

    def insert(new: fx.Node) -> None:
        last[0].append(new)
        last[0] = new

    orig, graph._insert = graph._insert, insert
    try:
        yield
    finally:
        graph._insert = orig
