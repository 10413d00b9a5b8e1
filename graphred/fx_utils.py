"""Small helpers over torch.fx graphs shared by analyses and passes."""
from __future__ import annotations

import contextlib
import functools
import operator
import re
import types
from typing import Any

import torch
import torch.fx as fx

META_KEY = "graphred"
"""The one ``node.meta`` key under which graphred records anything per node: analysis results (by
analysis name) and the rewrite's own records (:data:`ORIG_SHAPE`, :data:`SIDE`, :data:`MADE_BY`).
A pass's ``preserves`` speaks for every name under it."""

ORIG_SHAPE = "OrigShape"
"""Record: the node's shape before any rewrite (the token-axis rewrite reads the original layout)."""
SIDE = "Side"
"""Record: True on nodes a reduction inserted to compute scores, indices and sizes (pure; CSE may merge them)."""
MADE_BY = "MadeBy"
"""Record: the plan step (``step.spec()``) or pass that inserted the node."""


def record(node: fx.Node, name: str, value: Any) -> None:
    """Set ``node.meta[META_KEY][name] = value``."""
    node.meta.setdefault(META_KEY, {})[name] = value


def recorded(node: Any, name: str, default: Any = None) -> Any:
    """``node.meta[META_KEY][name]``, or ``default``.

    >>> gm = fx.symbolic_trace(torch.nn.ReLU()); n = next(iter(gm.graph.nodes))
    >>> record(n, SIDE, True); recorded(n, SIDE), recorded(n, MADE_BY)
    (True, None)
    """
    if not isinstance(node, fx.Node):
        return default
    return (node.meta.get(META_KEY) or {}).get(name, default)


def original_shape(node: Any) -> tuple | None:
    """The shape recorded under :data:`ORIG_SHAPE` before a rewrite, else the current shape."""
    return recorded(node, ORIG_SHAPE) or node_shape(node)


_LSELF = re.compile(r"^L\['self'\]\.?")
_INDEX = re.compile(r"\[['\"]?([^\]'\"]+)['\"]?\]")


def normalize_module_path(path: str) -> str:
    """``"L['self'].model.layers[3].attn"`` -> ``"model.layers.3.attn"``."""
    path = _LSELF.sub("", path)
    path = _INDEX.sub(r".\1", path)
    return path.strip(".")


def module_stack(node: fx.Node) -> list[tuple[str, str]]:
    """The (module path, class name) pairs that were active when ``node`` ran, outermost first."""
    stack = node.meta.get("nn_module_stack") or {}
    out = []
    for value in stack.values():
        path, cls = value if isinstance(value, tuple) else (value, "")
        name = cls if isinstance(cls, str) else getattr(cls, "__qualname__", str(cls))
        out.append((normalize_module_path(str(path)), name.rsplit(".", 1)[-1]))
    return [(p, c) for p, c in out if p]


def module_path(node: fx.Node) -> str:
    """Innermost module path of ``node`` ('' at the top level)."""
    stack = module_stack(node)
    return stack[-1][0] if stack else ""


def val(node: Any):
    """``node.meta['val']`` or None."""
    return node.meta.get("val") if isinstance(node, fx.Node) else None


def shape_of(node: Any) -> tuple | None:
    v = val(node)
    return tuple(v.shape) if isinstance(v, torch.Tensor) else None


def op_name(node: fx.Node) -> str:
    """``aten.mm.default`` style name of a call_function target, else the node op."""
    if node.op != "call_function":
        return node.op
    t = node.target
    if isinstance(t, torch._ops.OpOverload):
        return f"{t.namespace}.{t._opname}.{t._overloadname}"
    return getattr(t, "__name__", str(t))


def is_op(node: fx.Node, *packets) -> bool:
    """True if ``node`` calls one of the given aten op packets or overloads."""
    if node.op != "call_function":
        return False
    t = node.target
    for p in packets:
        if t is p:
            return True
        if isinstance(t, torch._ops.OpOverload) and t.overloadpacket is p:
            return True
    return False


# ----------------------------------------------------------------------------- shapes and ops


def size_hint(s: Any) -> int:
    """An int for a size that may be symbolic: its value, its hint, or its unbacked example value; -1 if none."""
    try:
        return int(s)
    except Exception:
        node = getattr(s, "node", None)
        h = getattr(node, "hint", None) if node is not None else None
        if h is not None:
            return int(h)
        unbacked = getattr(getattr(node, "shape_env", None), "unbacked_var_to_val", {}) if node is not None else {}
        expr = getattr(node, "expr", None)
        if expr is not None and unbacked:
            try:
                return int(expr.xreplace(unbacked))
            except Exception:
                pass
        return -1


def node_shape(node: Any) -> tuple[int, ...] | None:
    """The shape of ``node.meta['val']`` as ints (symbolic sizes by their hints), or None.

    >>> gm = torch.export.export(torch.nn.ReLU(), (torch.randn(2, 3),)).graph_module
    >>> node_shape(next(iter(gm.graph.nodes)))
    (2, 3)
    """
    v = val(node)
    if isinstance(v, torch.Tensor):
        try:
            return tuple(int(s) for s in v.shape)
        except Exception:  # unbacked symbols: use the hint where there is one
            return tuple(size_hint(s) for s in v.shape)
    return None


def node_dtype(node: Any) -> torch.dtype | None:
    """The dtype of ``node.meta['val']``, or None."""
    v = val(node)
    return v.dtype if isinstance(v, torch.Tensor) else None


def op_packet(node: fx.Node) -> Any:
    """The overload packet of an aten call (``aten.add`` for ``aten.add.Tensor``), else the target."""
    t = node.target
    return t.overloadpacket if isinstance(t, torch._ops.OpOverload) else t


def is_pointwise(node: fx.Node) -> bool:
    """True for a call of an op tagged pointwise, or of an aten alias of one (``multiply``, ``divide``,
    ``subtract``, ``greater``, ...: untagged ops whose composite kernel is one pointwise op).

    >>> g = fx.Graph(); x = g.placeholder("x")
    >>> is_pointwise(g.call_function(torch.ops.aten.multiply.Tensor, (x, x)))
    True
    >>> is_pointwise(g.call_function(torch.ops.aten.sum.default, (x,)))
    False
    """
    t = node.target
    if not isinstance(t, torch._ops.OpOverload):
        return False
    return torch.Tag.pointwise in t.tags or _alias_of_pointwise(t)


class _OpsCalled(torch.utils._python_dispatch.TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func)
        return func(*args, **(kwargs or {}))


def _example_arg(arg):
    """A value for a schema argument (meta tensor, number, its default, None); TypeError for other kinds."""
    t = arg.type
    if isinstance(t, torch.TensorType):
        return torch.empty(2, 3, device="meta")
    if isinstance(t, torch.NumberType):
        return 2
    if arg.has_default_value():
        return arg.default_value
    if isinstance(t, torch.OptionalType):
        return None
    raise TypeError(str(t))


@functools.cache
def _alias_of_pointwise(op: torch._ops.OpOverload) -> bool:
    """Whether ``op`` (untagged) runs exactly one pointwise op: its composite kernel, run once on meta tensors."""
    s = op._schema
    if op.namespace != "aten" or s.is_mutable or len(s.returns) != 1 or \
            any(a.alias_info is not None for a in s.arguments):
        return False
    try:
        args = [_example_arg(a) for a in s.arguments if not a.kwarg_only]
        kwargs = {a.name: _example_arg(a) for a in s.arguments if a.kwarg_only}
        called = _OpsCalled()
        with called:
            out = op.decompose(*args, **kwargs)
    except Exception:  # an argument kind this probe does not make, or a kernel that refuses the probe's values
        return False
    return out is not NotImplemented and len(called.ops) == 1 and torch.Tag.pointwise in called.ops[0].tags


def aten_packets(*names: str) -> set:
    """The aten packets of these names that exist in this torch build."""
    aten = torch.ops.aten
    return {p for p in (getattr(aten, n, None) for n in names) if p is not None}


# ----------------------------------------------------------------------------- finding nodes


def node_order(gm: fx.GraphModule) -> dict[fx.Node, int]:
    """Node -> position in graph order (valid until the graph changes)."""
    return {n: i for i, n in enumerate(gm.graph.nodes)}


def node_map(gm: fx.GraphModule) -> dict[str, fx.Node]:
    """Name -> node, built once; look nodes up here instead of scanning the graph per name."""
    return {n.name: n for n in gm.graph.nodes}


def node_named(gm: fx.GraphModule, name: str) -> fx.Node:
    """The node called ``name`` (a linear scan: prefer :func:`node_map` for many look-ups)."""
    for n in gm.graph.nodes:
        if n.name == name:
            return n
    raise KeyError(name)


def last_of(gm: fx.GraphModule, nodes: Any) -> fx.Node:
    """The node among ``nodes`` (Nones skipped) that comes last in graph order."""
    order = node_order(gm)
    return max([n for n in nodes if n is not None], key=lambda n: order[n])


def ancestors(nodes: Any, stop: Any = None, stopped: set | None = None) -> set[fx.Node]:
    """``nodes`` and every node they are computed from. ``stop(n)`` (optional) names inputs of ``n`` not
    to walk through; they are added to ``stopped`` instead."""
    seen: set[fx.Node] = set()
    stack = list(nodes)
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        cut = stop(n) if stop is not None else ()
        for a in n.all_input_nodes:
            if a in cut:
                stopped.add(a)
            else:
                stack.append(a)
    return seen


def arg_nodes(args: Any) -> list[fx.Node]:
    """The nodes inside ``args`` (nested lists, tuples and dicts of node arguments), in order.

    >>> import torch.fx as fx
    >>> g = fx.Graph(); a = g.placeholder("a"); b = g.placeholder("b")
    >>> [n.name for n in arg_nodes((a, [1, b], {"k": a}))]
    ['a', 'b', 'a']
    """
    out: list[fx.Node] = []
    fx.node.map_arg(args, out.append)
    return out


def is_state_call(node: fx.Node) -> bool:
    """A call kept for what it does to the interpreter, not for a value: a Python-level function (not an
    aten/graphred op, not a builtin such as ``torch.neg``, not ``operator``) whose result nothing reads, e.g. the vmap nesting calls torch.export
    records around a vmapped mask function. Such a call must run, in graph order, before the nodes after
    it (they may live inside the vmap level it opens), and dead-code elimination must keep it.

    >>> def log(x): print(x)
    >>> g = fx.Graph(); x = g.placeholder("x"); n = g.call_function(log, (x,)); _ = g.output(x)
    >>> is_state_call(n), is_state_call(x)
    (True, False)
    """
    if node.op != "call_function" or node.users:
        return False
    t = node.target
    # a Python-level function (torch's own tensor functions and ops are builtins or OpOverloads: pure)
    return isinstance(t, types.FunctionType) and getattr(t, "__module__", None) not in ("_operator", "operator")


def is_impure(node: fx.Node) -> bool:
    """``node.is_impure()`` or an interpreter-state call (:func:`is_state_call`): what dead-code elimination
    keeps (``gm.graph.eliminate_dead_code(is_impure_node=is_impure)``)."""
    return node.is_impure() or is_state_call(node)


def fetch_attr(gm: torch.nn.Module, target: str) -> Any:
    """The attribute a ``get_attr`` target names (dotted path)."""
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _written_root(node: Any) -> Any:
    """The node whose storage ``node`` views: through view ops and ``getitem`` of their tuple outputs."""
    for _ in range(1000):
        if not isinstance(node, fx.Node) or node.op != "call_function" or not node.args:
            return node
        t = node.target
        if t is operator.getitem:
            node = node.args[0]
            continue
        schema = getattr(t, "_schema", None)
        if schema is None or not schema.returns or not schema.arguments:
            return node
        ret, first = schema.returns[0].alias_info, schema.arguments[0].alias_info
        if ret is None or ret.is_write or first is None or first.is_write:
            return node
        node = node.args[0]
    return node


def clone_mutated_constants(gm: fx.GraphModule) -> list[str]:
    """Make each tensor constant of ``gm`` that the graph writes in place (``get_attr`` of a tensor that is
    neither a parameter nor a buffer, written by an op such as ``add_``/``copy_``/``index_put_`` directly or
    through a view) a fresh ``clone`` per call, and return the constants' targets. Eager code builds such a
    tensor anew at each call (e.g. positions computed in Python and folded at capture, then ``pos[0] += k``);
    the graph reads one stored tensor, so without the clone a second call would start from the first call's
    writes. Buffers are left alone: writing them persists eagerly too.

    >>> import torch, torch.fx as fx
    >>> g = fx.Graph(); x = g.placeholder("x"); c = g.get_attr("c")
    >>> _ = g.call_function(torch.ops.aten.add_.Tensor, (c, 1)); _ = g.output(g.call_function(torch.ops.aten.add.Tensor, (x, c)))
    >>> root = torch.nn.Module(); root.c = torch.zeros(2)
    >>> gm = fx.GraphModule(root, g); gm.c = gm._buffers.pop("c")  # a constant (torch.export's lifted tensors)
    >>> clone_mutated_constants(gm)
    ['c']
    >>> gm(torch.zeros(2)).tolist(), gm(torch.zeros(2)).tolist()
    ([1.0, 1.0], [1.0, 1.0])
    """
    params = {n for n, _ in gm.named_parameters(remove_duplicate=False)}
    buffers = {n for n, _ in gm.named_buffers(remove_duplicate=False)}
    written: dict[fx.Node, None] = {}
    for n in gm.graph.nodes:
        schema = getattr(n.target, "_schema", None) if n.op == "call_function" else None
        if schema is None:
            continue
        for i, a in enumerate(schema.arguments):
            if a.alias_info is None or not a.alias_info.is_write:
                continue
            v = n.args[i] if i < len(n.args) else n.kwargs.get(a.name)
            for leaf in (v if isinstance(v, (list, tuple)) else [v]):
                root = _written_root(leaf)
                if isinstance(root, fx.Node) and root.op == "get_attr" and root.target not in params \
                        and root.target not in buffers and isinstance(fetch_attr(gm, root.target), torch.Tensor):
                    written[root] = None
    for c in written:
        with gm.graph.inserting_after(c):
            fresh = gm.graph.call_function(torch.ops.aten.clone.default, (c,))
        fresh.meta.update({k: v for k, v in c.meta.items() if k in ("stack_trace", "nn_module_stack")})
        v = c.meta.get("val")
        if v is not None:  # a storage of its own (the constant's val would make the copy count as a weight)
            with v.fake_mode if getattr(v, "fake_mode", None) is not None else contextlib.nullcontext():
                fresh.meta["val"] = v.clone()
        c.replace_all_uses_with(fresh, delete_user_cb=lambda u: u is not fresh)
    if written:
        gm.recompile()
    return [c.target for c in written]


def flat_inputs(gm: fx.GraphModule, args: Any, kwargs: Any) -> list | None:
    """Flatten ``(args, kwargs)`` the way the graph module's pytree codegen expects (None if it cannot)."""
    from torch.utils._pytree import tree_flatten

    spec = getattr(gm, "_in_spec", None)
    try:
        if spec is not None:
            flat, got = tree_flatten((tuple(args), dict(kwargs)))
            if got != spec:
                try:  # order kwargs like the spec does
                    from torch.export._tree_utils import reorder_kwargs

                    kwargs = reorder_kwargs(kwargs, spec)
                except Exception:
                    pass
                flat, _ = tree_flatten((tuple(args), dict(kwargs)))
            return flat
        flat, _ = tree_flatten((tuple(args), dict(kwargs)))
        return flat
    except Exception:
        return None


def _align(value: Any, spec: Any) -> Any:
    if spec.is_leaf() or isinstance(value, torch.Tensor):
        return value
    if isinstance(value, dict) and isinstance(spec.context, list):
        keys = spec.context
        kids = {k: _align(value[k], c) for k, c in zip(keys, spec.children()) if k in value}
        reorder = list(value.keys()) != list(keys) and set(value.keys()) == set(keys)
        if not reorder and all(kids[k] is value[k] for k in kids):
            return value
        if type(value) is dict:  # torch.fx flattens a plain dict by the spec's keys: its order does not matter
            return {**value, **kids}
        import copy

        out = copy.copy(value)
        for k, v in kids.items():
            out[k] = v
        if reorder and hasattr(out, "move_to_end"):
            for k in keys:
                out.move_to_end(k)
        return out
    if type(value) in (list, tuple) and len(value) == spec.num_children:
        items = [_align(v, c) for v, c in zip(value, spec.children())]
        return value if all(a is b for a, b in zip(items, value)) else type(value)(items)
    return value


def align_inputs(gm: Any, args: Any, kwargs: dict) -> tuple[Any, dict]:
    """``(args, kwargs)`` arranged the way the graph module's input spec recorded them: an ordered mapping
    (a Hugging Face ``ModelOutput`` passed as an input) whose keys the spec holds in another order is
    re-ordered in a shallow copy, since torch.fx's ``tree_flatten_spec`` compares such a node's keys in
    order. Another producer of the same output (say, a ``ModelOutput`` whose fields were set after it was
    built) gives the same keys in another order. The caller's objects are left as they are.

    >>> import torch
    >>> from transformers.modeling_outputs import BaseModelOutputWithPooling
    >>> gm = torch.export.export(type("M", (torch.nn.Module,), {"forward": lambda self, o: o.last_hidden_state
    ...     + o.pooler_output})(), (), {"o": BaseModelOutputWithPooling(torch.ones(2), torch.ones(2))}).module()
    >>> o = BaseModelOutputWithPooling(pooler_output=torch.ones(2)); o["last_hidden_state"] = torch.ones(2)
    >>> _, kw = align_inputs(gm, (), {"o": o})
    >>> list(kw["o"].keys()), list(o.keys())
    (['last_hidden_state', 'pooler_output'], ['pooler_output', 'last_hidden_state'])
    """
    spec = getattr(gm, "_in_spec", None)
    if spec is None or spec.num_children != 2:
        return args, kwargs
    try:
        return _align(tuple(args), spec.children()[0]), _align(dict(kwargs), spec.children()[1])
    except Exception:  # noqa: BLE001 - an input the spec does not describe: torch's own check reports it
        return args, kwargs


def graph_device(gm: fx.GraphModule) -> torch.device:
    """The device the graph's inputs live on (meta for a program captured without weights)."""
    for n in gm.graph.nodes:
        v = n.meta.get("val")
        if n.op == "placeholder" and isinstance(v, torch.Tensor):
            return v.device
    return torch.device("cpu")


# ----------------------------------------------------------------------------- fake values

FAKE_MODE_ATTR = "_graphred_fake_mode"
"""Attribute of an ``fx.Graph`` caching the fake mode of its values (a graph has no ``meta``)."""


def graph_fake_mode(graph: fx.Graph) -> Any:
    """The fake mode of a graph's own values (so that new nodes without tensor inputs, such as
    an ``arange``, share it); a fresh one if the graph has none."""
    from torch._guards import detect_fake_mode
    from torch._subclasses.fake_tensor import FakeTensorMode

    mode = getattr(graph, FAKE_MODE_ATTR, None)
    if mode is None:
        vals = [n.meta.get("val") for n in graph.nodes if n.op in ("placeholder", "get_attr", "call_function")
                and isinstance(n.meta.get("val"), torch.Tensor)][:64]
        mode = detect_fake_mode(vals) or FakeTensorMode()
        setattr(graph, FAKE_MODE_ATTR, mode)
    return mode


def fake_like(gm: fx.GraphModule, t: torch.Tensor) -> Any:
    """A fake tensor for ``t`` in the fake mode of ``gm``'s graph (for a new ``get_attr`` node's val)."""
    return graph_fake_mode(gm.graph).from_tensor(t)


def set_fake_val(node: fx.Node) -> Any:
    """Recompute ``node.meta["val"]`` by running its target on its inputs' fake values, under
    the inputs' FakeTensorMode; returns the new val.

    >>> gm = torch.export.export(torch.nn.ReLU(), (torch.randn(2, 3),)).graph_module
    >>> x = next(iter(gm.graph.nodes))
    >>> with gm.graph.inserting_after(x): n = gm.graph.call_function(torch.ops.aten.narrow.default, (x, 1, 0, 2))
    >>> set_fake_val(n).shape
    torch.Size([2, 2])
    """
    from torch._dispatch.python import enable_python_dispatcher
    from torch._guards import detect_fake_mode
    from torch.utils._pytree import tree_flatten

    from .errors import AnalysisError

    if node.op not in ("call_function", "call_method"):
        raise AnalysisError(f"set_fake_val needs a call_function/call_method node, got {node.format_node()}")

    def fake(arg: fx.Node) -> Any:
        if "val" not in arg.meta:
            raise AnalysisError(f"input {arg.format_node()} of {node.format_node()} has no meta['val']; "
                                "make sure fake propagation (set_fake_val/propagate_meta) has run on it")
        return arg.meta["val"]

    args, kwargs = fx.node.map_arg((node.args, node.kwargs), fake)
    mode = detect_fake_mode(tree_flatten((args, kwargs))[0]) or detect_fake_mode() or graph_fake_mode(node.graph)
    # a graph captured with real-tensor propagation (data-dependent fallback) has a mode that also runs
    # the real kernels; new nodes need shapes only, and their inputs may carry no real values
    real = getattr(mode, "propagate_real_tensors", False)
    mode.propagate_real_tensors = False
    try:
        # (the Python dispatcher, as torch.export traces: composite ops on symbolic sizes decompose in Python)
        with mode, enable_python_dispatcher():
            if node.op == "call_method":
                v = getattr(args[0], node.target)(*args[1:], **kwargs)
            else:
                v = node.target(*args, **kwargs)
    finally:
        mode.propagate_real_tensors = real
    env = getattr(mode, "shape_env", None)
    if env is not None and getattr(env, "pending_fresh_unbacked_symbols", None):
        # a data-dependent size made here (a nonzero of rewritten inputs): bound to this node's output, as the
        # export tracer binds it, so the next fake run does not find it pending
        from torch.fx.experimental.symbolic_shapes import compute_unbacked_bindings

        bindings = compute_unbacked_bindings(env, v)
        if bindings:
            node.meta["unbacked_bindings"] = bindings
    node.meta["val"] = v
    if "tensor_meta" in node.meta and isinstance(v, torch.Tensor):
        from torch.fx.passes.shape_prop import _extract_tensor_metadata

        node.meta["tensor_meta"] = _extract_tensor_metadata(v)
    return v


def call_with_val(graph: fx.Graph, target: Any, args: Any, kwargs: dict | None = None) -> fx.Node:
    """Insert ``target(*args, **kwargs)`` at the graph's insertion point and set its ``meta["val"]``.

    >>> gm = torch.export.export(torch.nn.ReLU(), (torch.randn(2, 3),)).graph_module
    >>> x = next(iter(gm.graph.nodes))
    >>> with gm.graph.inserting_after(x): n = call_with_val(gm.graph, torch.ops.aten.neg.default, (x,))
    >>> tuple(n.meta["val"].shape)
    (2, 3)
    """
    n = graph.call_function(target, tuple(args), kwargs or {})
    set_fake_val(n)
    return n
