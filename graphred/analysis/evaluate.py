"""Partial evaluation: values of a few graph nodes (the input bookkeeping: image-placeholder
masks, attention masks) computed from their ancestors only, never the model's layers. It always runs
on the CPU: graphs captured on the meta device (given CPU copies of the inputs) or on an accelerator
(their inputs and the weights the bookkeeping reads are copied to the CPU) give the same values as a
CPU capture."""
from __future__ import annotations

import operator
from typing import Any, Iterable, Sequence

import torch
import torch.fx as fx

from ..fx_utils import ancestors, fetch_attr, is_state_call


def to_cpu_device(x: Any) -> Any:
    """Any device in ``x`` (``meta``, ``cuda:0``, a ``torch.device``) -> the CPU, and tensors -> CPU
    copies, through lists, tuples and dicts.

    >>> to_cpu_device([torch.device("cuda", 0), "meta", {"device": "cuda"}, 3])
    [device(type='cpu'), 'cpu', {'device': 'cpu'}, 3]
    """
    if isinstance(x, torch.device):
        return torch.device("cpu")
    if isinstance(x, str) and _is_device_string(x):
        return "cpu"
    if isinstance(x, torch.Tensor) and x.device.type not in ("cpu", "meta"):
        return x.cpu()
    if isinstance(x, (list, tuple)):
        return type(x)(to_cpu_device(v) for v in x)
    if isinstance(x, dict):
        return {k: to_cpu_device(v) for k, v in x.items()}
    return x


def _is_device_string(s: str) -> bool:
    try:
        return torch.device(s).type != "cpu"
    except (RuntimeError, ValueError):
        return False


# graphred ops whose listed arguments are hidden-state data (scores, similarity metric, features):
# the op's bookkeeping outputs (kept indices, matched pairs, token sizes) have sizes that do not depend
# on them, so partial evaluation feeds a stand-in instead of running the layers that compute them.
DATA_ARGS: dict[str, tuple[str, ...]] = {
    "graphred::select_tokens": ("scores",),
    "graphred::select_tokens_padded": ("scores",),
    "graphred::bipartite_match": ("metric", "rank", "protected"),
    "graphred::merge_tokens": ("x",),
    "graphred::attention_scores": ("q", "k"),
}


def _data_arg_nodes(node: fx.Node) -> set[fx.Node]:
    """The inputs of ``node`` that :data:`DATA_ARGS` stands in for (empty for any other node)."""
    schema = getattr(node.target, "_schema", None)
    names = DATA_ARGS.get(getattr(schema, "name", None), ()) if node.op == "call_function" else ()
    if not names:
        return set()
    out = set()
    for i, a in enumerate(schema.arguments):
        if a.name in names:
            v = node.args[i] if i < len(node.args) else node.kwargs.get(a.name)
            if isinstance(v, fx.Node):
                out.add(v)
    return out


def _stand_in(node: fx.Node) -> Any:
    """A seeded random tensor shaped like ``node``'s value (from ``meta["val"]``)."""
    v = node.meta.get("val")
    if not isinstance(v, torch.Tensor):
        raise ValueError("no tensor value to stand in for")
    shape = tuple(int(d) for d in v.shape)
    g = torch.Generator().manual_seed(0)
    if v.is_floating_point():
        return torch.randn(shape, generator=g).to(v.dtype)
    if v.dtype == torch.bool:
        return torch.zeros(shape, dtype=torch.bool)  # nothing protected: any match count the graph asks for exists
    return torch.randint(0, 2, shape, generator=g).to(v.dtype)


def meta_inputs(args: tuple, kwargs: dict) -> list[str]:
    """Names of the inputs that are meta tensors (shapes without values): ``kwargs`` names, ``args[i]``.

    >>> import torch
    >>> meta_inputs((torch.ones(1, device="meta"),), {"input_ids": torch.ones(1, device="meta"), "x": torch.ones(1)})
    ['args[0]', 'input_ids']
    """
    names = [f"args[{i}]" for i, v in enumerate(args) if isinstance(v, torch.Tensor) and v.device.type == "meta"]
    return names + [k for k, v in kwargs.items() if isinstance(v, torch.Tensor) and v.device.type == "meta"]


def meta_layout_message(model_class: str, names: Sequence[str], step: str = "") -> str:
    """What a plan on a program captured with meta inputs (and no ``value_inputs``) lacks, and what to do."""
    return (f"{step + ': ' if step else ''}{model_class} was captured with inputs on the meta device "
            f"({', '.join(names)}): they have shapes but no values, so the token layout a plan needs (where the "
            "image tokens sit, what the attention masks allow, which positions are padding) cannot be read. Pass CPU "
            "tensors of the same shapes as value_inputs=(args, kwargs): graphred.estimate(program, plan, "
            "value_inputs=...) or graphred.passes.apply.apply_plan(program, plan, value_inputs=...); "
            "graphred.analysis.cost.estimate.estimate_model(DIR, plan) does this for a config directory. "
            "Or capture on the CPU.")


def partial_evaluate(gm: fx.GraphModule, flat_inputs: Sequence, wanted: Iterable[fx.Node],
                     max_weight_numel: int = 1 << 22) -> dict[fx.Node, Any]:
    """Values of ``wanted`` nodes at ``flat_inputs`` (tensors, in placeholder order), computing
    only their ancestors -- the input bookkeeping (masks from ``input_ids == image_token``, counts of
    real images, ...), never the model's layers. It runs on the CPU whatever the graph's device: device
    arguments are mapped to the CPU, inputs and the weights the bookkeeping reads are copied there, and
    on a graph captured on the meta device a meta parameter/buffer the bookkeeping reads is taken as
    zeros when it is small (``max_weight_numel``). The hidden-state arguments of graphred's selection
    ops are stood in for (:data:`DATA_ARGS`), so no layer runs. A node that cannot be computed is left out.

    Graphs that keep in-place ops (captures that were not functionalized): a tensor written in place,
    directly or through views (``w = full(...); w.select(0, i).copy_(t)``), holds what those writes put
    there, though they are not data ancestors of its readers. Every write into a tensor (or a view of it)
    that comes before a needed reader is evaluated too, in graph order; a wanted node's value is the one its
    readers see, and a node whose readers see different values (a write between them), or whose storage a
    write that could not be computed touched, is left out. Inputs and weights that are written are copied
    first: the caller's tensors and the model are never changed.

    >>> import torch
    >>> from torch.fx.experimental.proxy_tensor import make_fx
    >>> def f(x):
    ...     w = torch.zeros(2, 3); w.select(0, 1).copy_(x); return w.sum(-1)
    >>> gm = make_fx(f)(torch.ones(3))
    >>> out = [n for n in gm.graph.nodes if n.op == "output"][0].args[0]
    >>> partial_evaluate(gm, [torch.ones(3)], [out])[out].tolist()
    [0.0, 3.0]
    """
    wanted = [w for w in wanted if isinstance(w, fx.Node)]
    stand_ins: set[fx.Node] = set()
    need = ancestors(wanted, _data_arg_nodes, stand_ins)
    writes = _Writes(gm.graph)
    read_at: dict[fx.Node, int] = {}
    if writes.writers:
        read_at = writes.close(need, wanted, stand_ins)
    env: dict[fx.Node, Any] = {}
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for i, n in enumerate(placeholders):
        if i < len(flat_inputs):
            env[n] = to_cpu_device(flat_inputs[i])
            if n in writes.written:  # written in place: a copy, never the caller's tensor
                env[n] = _copy(env[n])
    failed: set[fx.Node] = set()
    for n in stand_ins - need:  # a data argument that is itself wanted is computed, not stood in
        try:
            env[n] = _stand_in(n)
        except Exception:  # noqa: BLE001 - no shape to stand in: its users are skipped
            failed.add(n)
    seen = _evaluate(gm, need, env, failed, max_weight_numel, writes, read_at)
    return {w: seen[w] if w in read_at else env[w] for w in wanted if (w in seen if w in read_at else w in env)}


def _copy(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        return v.detach().clone()
    if isinstance(v, (list, tuple)):
        return type(v)(_copy(x) for x in v)
    return v


class _Writes:
    """The in-place writes of a graph: for each node the tensors it may share storage with (its roots,
    through views, ``getitem`` of their outputs and the outputs of in-place ops, by the ops' alias
    annotations) and, for each root, the nodes that write into it (an op's mutable arguments: ``copy_``,
    ``fill_``, ``index_put_``, ``add_``, ``out=`` ...), in graph order. Taking an op that only may alias
    (``reshape``, ``contiguous``) as a view costs an evaluation at most, never a wrong value."""

    def __init__(self, graph: fx.Graph):
        self.pos = {n: i for i, n in enumerate(graph.nodes)}
        self.end = len(self.pos)
        self._roots: dict[fx.Node, frozenset] = {}
        self.writers: dict[fx.Node, list[fx.Node]] = {}
        self.writes: dict[fx.Node, frozenset] = {}  # writer -> roots it writes
        for n in graph.nodes:  # in graph order: a view's sources have their roots already
            src = self._sources(n)
            self._roots[n] = frozenset().union(*(self.roots(s) for s in src)) if src else frozenset([n])
            schema = getattr(n.target, "_schema", None) if n.op == "call_function" else None
            if schema is None:
                continue
            hit = frozenset().union(*(self.roots(x) for x in self._args(n, schema, write=True)))
            if hit:
                self.writes[n] = hit
                for r in hit:
                    self.writers.setdefault(r, []).append(n)
        self.written = set(self.writers)

    @staticmethod
    def _args(n: fx.Node, schema: Any, write: bool) -> list[fx.Node]:
        """Node arguments of ``n`` with an alias annotation (``write``: only those it writes)."""
        out: list[fx.Node] = []
        for i, a in enumerate(schema.arguments):
            if a.alias_info is None or (write and not a.alias_info.is_write):
                continue
            v = n.args[i] if i < len(n.args) else n.kwargs.get(a.name)
            fx.node.map_arg(v, out.append)
        return out

    def roots(self, n: fx.Node) -> frozenset:
        """The nodes whose storage ``n``'s value may share (``n`` itself for a fresh tensor)."""
        return self._roots.get(n) or frozenset([n])

    def _sources(self, n: fx.Node) -> list[fx.Node] | None:
        """The nodes ``n``'s value may be a view of (None: a fresh tensor, or not a call)."""
        if n.op != "call_function":
            return None
        if n.target is operator.getitem and n.args and isinstance(n.args[0], fx.Node):
            return [n.args[0]]
        schema = getattr(n.target, "_schema", None)
        if schema is None or not schema.returns:
            return None
        src = self._args(n, schema, write=False)
        return src or None

    def readers(self, n: fx.Node) -> list[int]:
        """Positions where ``n``'s value is read: its users, through views of it and in-place ops on it
        (the writes themselves are not reads), the graph's output included."""
        out, stack, seen = [], [n], set()
        while stack:
            x = stack.pop()
            if x in seen:
                continue
            seen.add(x)
            for u in x.users:
                if u.op == "output":
                    out.append(self.pos[u])
                elif u in self.writes and x in self._args(u, u.target._schema, write=True):
                    stack.append(u)  # writes into x; what it returns is x again
                elif x in (self._sources(u) or ()):
                    stack.append(u)  # a view of x
                else:
                    out.append(self.pos[u])
        return out

    def close(self, need: set, wanted: list, stand_ins: set) -> dict[fx.Node, int]:
        """Grow ``need`` (in place) by the writes its nodes' reads depend on, and their ancestors; return,
        for each wanted node whose storage is written, where its readers read it (the graph's end if none
        does; -1 when writes fall between its readers: no single value)."""
        read_at: dict[fx.Node, int] = {}
        todo: list[tuple[fx.Node, int]] = []
        for w in wanted:
            rs = self.roots(w)
            if not any(r in self.writers for r in rs):
                continue
            pos = sorted(self.readers(w)) or [self.end]
            first, last = pos[0], pos[-1]
            between = any(first < self.pos[x] < last for r in rs for x in self.writers.get(r, ()))
            read_at[w] = -1 if between else first
            todo += [(r, first) for r in rs]
        upto: dict[fx.Node, int] = {}  # per root: writes before this position are in need already
        stack = list(need)
        while stack or todo:
            while stack:
                n = stack.pop()
                for a in n.all_input_nodes:
                    todo += [(r, self.pos[n]) for r in self.roots(a) if r in self.writers]
            while todo:
                r, p = todo.pop()
                if p <= upto.get(r, -1):
                    continue
                for x in self.writers.get(r, ()):
                    if upto.get(r, -1) <= self.pos[x] < p and x not in need:
                        self._add(x, need, stack, stand_ins)
                upto[r] = max(upto.get(r, -1), p)
        return read_at

    @staticmethod
    def _add(x: fx.Node, need: set, stack: list, stand_ins: set) -> None:
        """``x`` and its ancestors not in ``need`` yet (the data arguments of graphred's ops stood in for)."""
        todo = [x]
        while todo:
            n = todo.pop()
            if n in need:
                continue
            need.add(n)
            stack.append(n)
            cut = _data_arg_nodes(n)
            for a in n.all_input_nodes:
                if a in cut:
                    stand_ins.add(a)
                else:
                    todo.append(a)


def _evaluate(gm: fx.GraphModule, need: set, env: dict, failed: set, max_weight_numel: int,
              writes: _Writes | None = None, read_at: dict | None = None) -> dict:
    """Evaluate ``need`` in graph order into ``env``; returns the values of ``read_at``'s nodes as their
    readers see them (copied at the first reader)."""
    state_calls = {n for n in gm.graph.nodes if is_state_call(n)}
    read_at = read_at or {}
    snap_at: dict[int, list[fx.Node]] = {}
    for w, p in read_at.items():
        if p >= 0:
            snap_at.setdefault(p, []).append(w)
    seen: dict[fx.Node, Any] = {}
    spoiled: set[fx.Node] = set()  # roots a write that could not be computed went into

    def snap(p: int) -> None:
        for w in snap_at.get(p, ()):
            if w in env and w not in failed and not (writes.roots(w) & spoiled):
                seen[w] = _copy(env[w])

    def roots_of(n: fx.Node) -> frozenset:
        return writes.roots(n) if writes is not None and writes.writers else frozenset()

    for i, node in enumerate(gm.graph.nodes):
        snap(i)
        if node in state_calls and not node.all_input_nodes:
            # a mask function vmapped over positions: its nodes run inside the levels these calls open
            # (not data ancestors of anything, so they are run for what they do, whatever is needed)
            try:
                node.target(*to_cpu_device(node.args), **to_cpu_device(node.kwargs))
            except Exception:  # noqa: BLE001 - a state call that cannot run: the nodes inside fail and are skipped
                pass
            continue
        if node not in need or node.op in ("placeholder", "output"):
            continue
        if any(a in failed or a not in env or roots_of(a) & spoiled for a in node.all_input_nodes):
            failed.add(node)
            if writes is not None and node in writes.writes:
                spoiled |= writes.writes[node]
            continue
        try:
            if node.op == "get_attr":
                v = fetch_attr(gm, node.target)
                if isinstance(v, torch.Tensor) and v.device.type == "meta":
                    if v.numel() > max_weight_numel:
                        raise ValueError("a large meta weight")
                    v = torch.zeros(v.shape, dtype=v.dtype)
                else:
                    v = to_cpu_device(v)
                    if writes is not None and node in writes.written:  # written in place: never the model's
                        v = _copy(v)
            elif node.op == "call_function":
                args = to_cpu_device(fx.node.map_arg(node.args, lambda a: env[a]))
                kwargs = to_cpu_device(fx.node.map_arg(node.kwargs, lambda a: env[a]))
                with torch.no_grad():
                    v = node.target(*args, **kwargs)
            else:
                raise ValueError(node.op)
        except Exception:  # noqa: BLE001 - not computable here: its users are skipped too
            failed.add(node)
            if writes is not None and node in writes.writes:  # what it writes into is unknown from here on
                spoiled |= writes.writes[node]
            continue
        env[node] = v
    snap(len(gm.graph.nodes))
    return seen
