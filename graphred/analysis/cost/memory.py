"""Memory of a captured graph without running it: weight bytes and peak activation memory by liveness.

Everything is read from the graph: each node's ``meta["val"]`` (a FakeTensor, or a tuple of them)
says how big its outputs are and which *storage* they live in. Fake tensors keep eager's aliasing:
a view, a ``reshape`` that can be a view, a no-op ``to`` or the ``getitem`` of a tuple output share
their base's storage, and a ``reshape`` that must copy does not. So counting storages, not tensors,
counts a view and its base once, exactly as the allocator does.

Liveness follows the execution order of the graph, as the generated ``forward`` runs it (it drops
each value right after its last use):

* a storage is allocated by the first node whose output holds it and freed after the last user of
  any node holding it (graph outputs live to the end);
* inputs (placeholders) are held by the caller: alive the whole time, and counted;
* parameters, buffers and constants (``get_attr``) are weights, counted apart (:func:`weight_bytes`);
  views of a weight are weights, a dtype cast of one is an activation;
* the submodule of a run-once higher-order op (``wrap_with_set_grad_enabled``) adds its own peak of
  intermediates at the step that calls it;
* at each step the kernel's transient workspace (:func:`transient_bytes`: what an op allocates
  through the dispatcher besides its outputs, e.g. the float mask CPU SDPA makes from a boolean one)
  is added while the op runs.

The peak is ``max_t live(t)``. With symbolic storage sizes (``sym_shape(node)`` giving a node's
shape in token symbols) every ``live(t)`` is a polynomial in the symbols; since the execution order
does not depend on the token counts, ``max_t live(t)`` is exactly the peak for any token count.
:attr:`MemoryProfile.peak_expr` is that ``Max``, with every step dropped whose polynomial another
step's dominates coefficient by coefficient (which cannot be the maximum for positive symbols).

>>> import torch
>>> gm = torch.export.export(torch.nn.Linear(8, 4), (torch.randn(2, 8),)).module()
>>> prof = activation_memory(gm)
>>> prof.peak_bytes, prof.input_bytes, weight_bytes(gm).total     # x: 64 B, out: 32 B; W+b: 144 B
(96, 64, 144)
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import sympy
import torch
import torch.fx as fx

from ...fx_utils import fetch_attr, module_path

__all__ = ["MemoryProfile", "WeightBytes", "activation_memory", "weight_bytes", "transient_bytes",
           "storage_key", "tensors_of", "transient", "hint_int"]

aten = torch.ops.aten

_RUN_ONCE_HOPS = {"wrap_with_set_grad_enabled", "wrap_with_autocast", "tag_activation_checkpoint", "wrap"}


def tensors_of(val: Any) -> list[torch.Tensor]:
    """The tensors in a node's ``meta['val']`` (a tensor, or nested tuples/lists of them)."""
    if isinstance(val, torch.Tensor):
        return [val]
    if isinstance(val, (list, tuple)):
        out: list[torch.Tensor] = []
        for v in val:
            out.extend(tensors_of(v))
        return out
    return []


def storage_key(t: torch.Tensor) -> int:
    """An identity for ``t``'s storage (equal for a view and its base; works on fake and meta tensors, and on
    the batched tensors inside a vmapped region, through the tensor they wrap)."""
    return unbatched(t).untyped_storage()._cdata


def unbatched(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself, or for a tensor inside a vmapped region (the value torch.export records for the nodes of a
    vmapped mask function) the plain tensor that holds its data."""
    f = torch._C._functorch
    while f.is_batchedtensor(t):
        t = f.get_unwrapped(t)
    return t


def hint_int(s: Any, unbacked: Mapping[str, int] | None = None) -> int:
    """An int, or a ``torch.SymInt``'s value at the example inputs: its hint; for an unbacked symbol
    (a size that depends on input data), the value real-tensor propagation recorded or ``unbacked``
    gives (``{"u0": 2}``)."""
    if isinstance(s, int):
        return s
    try:
        return int(s)
    except Exception:  # noqa: BLE001 - unbacked
        node = getattr(s, "node", None)
        h = getattr(node, "hint", None) if node is not None else None
        if h is not None:
            return int(h)
        env = getattr(node, "shape_env", None)
        expr = getattr(node, "expr", None)
        if expr is None:
            raise
        vals = {k: sympy.Integer(int(v)) for k, v in (getattr(env, "unbacked_var_to_val", {}) or {}).items()} \
            if env is not None else {}
        e = sympy.sympify(expr).xreplace(vals) if vals else sympy.sympify(expr)
        if unbacked:
            e = sympy.sympify(e).xreplace({x: sympy.Integer(unbacked[x.name]) for x in sympy.sympify(e).free_symbols
                                           if x.name in unbacked})
        e = sympy.sympify(e)
        if e.free_symbols:
            raise
        return int(e)


def _nbytes(t: torch.Tensor, ub: Mapping | None = None) -> int:
    try:
        return hint_int(unbatched(t).untyped_storage().nbytes(), ub)
    except Exception:  # noqa: BLE001 - the tensor's own extent
        return _tensor_nbytes(t, ub)


def _tensor_nbytes(t: torch.Tensor, ub: Mapping | None = None) -> int:
    n = 1
    for s in t.shape:
        n *= hint_int(s, ub)
    return n * t.element_size()


# ---------------------------------------------------------------------------------------------
# weights
# ---------------------------------------------------------------------------------------------


@dataclass
class WeightBytes:
    """Bytes of the parameters, buffers and constants a graph reads (each storage once)."""

    total: int
    parameters: int
    buffers: int
    count: int  # distinct storages
    by_target: dict[str, int] = field(default_factory=dict)
    shared: dict[str, str] = field(default_factory=dict)  # target -> the target it shares storage with (tied)


def weight_bytes(gm: fx.GraphModule) -> WeightBytes:
    """Bytes of every parameter/buffer/constant the graph uses (``get_attr`` nodes with users).

    Tied weights (one storage under two names) are counted once; the storage's full size is
    counted (a parameter that is a view into a bigger buffer counts the buffer).
    """
    params = {id(p) for p in gm.parameters()}
    seen: dict[int, str] = {}
    by_target: dict[str, int] = {}
    shared: dict[str, str] = {}
    total = n_param = n_buf = 0

    def visit(mod: fx.GraphModule) -> None:
        nonlocal total, n_param, n_buf
        for node in mod.graph.nodes:
            if node.op != "get_attr" or not node.users:
                continue
            try:
                obj = fetch_attr(mod, node.target)
            except AttributeError:
                continue
            if isinstance(obj, fx.GraphModule):
                visit(obj)
                continue
            if not isinstance(obj, torch.Tensor):
                continue
            key = storage_key(obj)
            if key in seen:
                if seen[key] != node.target:
                    shared[node.target] = seen[key]
                continue
            seen[key] = node.target
            nb = _nbytes(obj)
            by_target[node.target] = nb
            total += nb
            if id(obj) in params or isinstance(obj, torch.nn.Parameter):
                n_param += nb
            else:
                n_buf += nb

    visit(gm)
    return WeightBytes(total, n_param, n_buf, len(seen), by_target, shared)


# ---------------------------------------------------------------------------------------------
# transient workspace of a kernel (allocated through the dispatcher, freed before the op returns)
# ---------------------------------------------------------------------------------------------

_SDPA = {getattr(aten, n) for n in ("scaled_dot_product_attention",) if hasattr(aten, n)}
_LINEAR = {aten.linear, aten.matmul}


def _foldable(t: torch.Tensor, keep_last: int, ub: Mapping | None = None) -> bool:
    """Whether all but the last ``keep_last`` dims of ``t`` fold into one dim as a view (no copy)."""
    lead = [(hint_int(s, ub), hint_int(st, ub)) for s, st in zip(t.shape[: t.dim() - keep_last],
                                                                  t.stride()[: t.dim() - keep_last])
            if hint_int(s, ub) != 1]
    for (s0, st0), (s1, st1) in zip(lead, lead[1:]):
        if st0 != st1 * s1:
            return False
    return True


def transient_bytes(node: fx.Node, unbacked: Mapping[str, int] | None = None) -> int:
    """Bytes ``node``'s kernel allocates through the dispatcher besides its outputs (eager).

    * ``scaled_dot_product_attention`` with a boolean mask: the mask converted to the query's float
      dtype (``where(mask, 0, -inf)``), plus the flash kernel's log-sum-exp ``[B, H, Lq]`` (fp32);
    * ``linear`` / ``matmul`` of an operand whose batch dims cannot fold into one as a view: the
      contiguous copy the kernel makes first (as ``torch.matmul`` reshapes before ``mm``/``bmm``).

    Anything else: 0 (a workspace a kernel allocates below the dispatcher is not counted).
    """
    return transient(node, None, unbacked)[0]


def transient(node: fx.Node, sym_shape: Callable[[fx.Node], Any] | None = None,
              unbacked: Mapping[str, int] | None = None) -> tuple[int, sympy.Expr]:
    """:func:`transient_bytes` and the same bytes as an expression over ``sym_shape`` (node -> symbolic shape)."""
    parts: list[tuple[int, sympy.Expr]] = []

    def numel(src: fx.Node, t: torch.Tensor, lo: int = 0, hi: int | None = None) -> tuple[int, sympy.Expr]:
        dims = list(t.shape)[lo:hi]
        n = 1
        for d in dims:
            n *= hint_int(d, unbacked)
        e = sympy.Integer(n)
        if sym_shape is not None:
            try:
                s = sym_shape(src)
            except Exception:  # noqa: BLE001
                s = None
            if isinstance(s, tuple) and len(s) == t.dim():
                cand = sympy.Mul(*[sympy.sympify(x) for x in list(s)[lo:hi]]) if dims else sympy.Integer(1)
                e = cand
        return n, e

    if node.op != "call_function":
        return 0, sympy.Integer(0)
    t = node.target
    pk = t.overloadpacket if isinstance(t, torch._ops.OpOverload) else t
    if pk in _SDPA:
        args = list(node.args) + [None] * 4
        qn = args[0] if isinstance(args[0], fx.Node) else None
        q = qn.meta.get("val") if qn is not None else None
        mask = args[3] if isinstance(args[3], fx.Node) else node.kwargs.get("attn_mask")
        mv = mask.meta.get("val") if isinstance(mask, fx.Node) else None
        if isinstance(mv, torch.Tensor) and mv.dtype == torch.bool and isinstance(q, torch.Tensor):
            n, e = numel(mask, mv)
            parts.append((n * q.element_size(), e * q.element_size()))
        if isinstance(q, torch.Tensor) and q.dim() >= 3:
            n, e = numel(qn, q, 0, q.dim() - 1)
            parts.append((n * 4, e * 4))
    elif pk in _LINEAR:
        xn = node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None
        wn = node.args[1] if len(node.args) > 1 and isinstance(node.args[1], fx.Node) else None
        x = xn.meta.get("val") if xn is not None else None
        w = wn.meta.get("val") if wn is not None else None
        if isinstance(x, torch.Tensor) and isinstance(w, torch.Tensor):
            if x.dim() >= 3 and w.dim() <= 2:
                # folded to [rows, k] for one mm (linear's weight is used transposed, as a view)
                if not _foldable(x, 1, unbacked):
                    n, e = numel(xn, x)
                    parts.append((n * x.element_size(), e * x.element_size()))
            elif x.dim() >= 3 and w.dim() >= 3:
                # batched: each operand expanded to the common batch shape and folded to [b, m, k]
                for src, tt in ((xn, x), (wn, w)):
                    if not _foldable(tt, 2, unbacked) or any(hint_int(st, unbacked) == 0 and hint_int(sz, unbacked) > 1
                                                             for sz, st in zip(tt.shape[:-2], tt.stride()[:-2])):
                        n, e = numel(src, tt)
                        parts.append((n * tt.element_size(), e * tt.element_size()))
    if not parts:
        return 0, sympy.Integer(0)
    return sum(p[0] for p in parts), sympy.Add(*[p[1] for p in parts])


# ---------------------------------------------------------------------------------------------
# liveness
# ---------------------------------------------------------------------------------------------


@dataclass
class Storage:
    """One allocation: who made it, how big, when it lives."""

    key: int
    producer: str
    kind: str  # "input" | "activation" | "weight"
    nbytes: int
    expr: sympy.Expr
    first: int
    last: int
    module_path: str = ""


@dataclass
class MemoryProfile:
    """Result of :func:`activation_memory`.

    ``peak_bytes`` counts inputs and activations (not weights) at the busiest step, ``peak_node`` is
    the node running then; ``peak_expr`` is the same peak as an expression in the token symbols
    (exact for any token counts, see the module doc); ``timeline[i]`` the bytes live while node ``i``
    of the graph runs.
    """

    peak_bytes: int
    peak_node: str
    peak_module: str
    peak_expr: sympy.Expr
    input_bytes: int
    input_expr: sympy.Expr
    timeline: list[int] = field(default_factory=list, repr=False)
    live_at_peak: list[tuple[str, int]] = field(default_factory=list, repr=False)
    storages: int = 0
    exact_symbolic: bool = True  # False when some storage's size could not be written in the symbols
    constant_storages: list[str] = field(default_factory=list, repr=False)
    allocations: list[Storage] = field(default_factory=list, repr=False)
    transients: dict[int, tuple[int, sympy.Expr]] = field(default_factory=dict, repr=False)


def _expand_poly(expr: sympy.Expr) -> dict:
    return dict(sympy.expand(expr).as_coefficients_dict())


def _add_into(acc: dict, poly: Mapping, sign: int) -> None:
    for m, c in poly.items():
        v = acc.get(m, 0) + sign * c
        if v == 0:
            acc.pop(m, None)
        else:
            acc[m] = v


def _dominates(q: Mapping, p: Mapping) -> bool:
    """True when ``q - p`` has no negative coefficient (so q >= p for positive symbols)."""
    for m in set(p) | set(q):
        if q.get(m, 0) - p.get(m, 0) < 0:
            return False
    return True


def _poly_expr(poly: Mapping) -> sympy.Expr:
    return sympy.Add(*[c * m for m, c in poly.items()]) if poly else sympy.Integer(0)


def activation_memory(
    gm: fx.GraphModule,
    sym_shape: Callable[[fx.Node], Any] | None = None,
    symbol_values: Mapping | None = None,
    *,
    count_inputs: bool = True,
    max_terms: int = 256,
    unbacked: Mapping[str, int] | None = None,
) -> MemoryProfile:
    """Peak memory of inputs + activations of ``gm`` by liveness over its execution order.

    ``sym_shape(node)`` (e.g. ``TokenProvenance.symbolic_shape``) gives a node's shape in token
    symbols; each storage's size is then the symbolic numel of a node holding it whole, checked
    against the concrete size at ``symbol_values`` (a size that does not check out stays a constant
    and is listed in ``constant_storages``). Without ``sym_shape`` every size is a constant.
    ``unbacked`` gives the values of data-dependent size symbols (``{"u0": 2}``) no hint records.
    """
    ub = dict(unbacked or {})
    nodes = list(gm.graph.nodes)
    index = {n: i for i, n in enumerate(nodes)}
    end = len(nodes)
    storages: dict[int, Storage] = {}
    weight_keys: set[int] = set()
    trans = [0] * (end + 1)
    transient_expr: dict[int, sympy.Expr] = {}
    values = dict(symbol_values or {})
    constant: list[str] = []

    def sym_bytes(node: fx.Node, t: torch.Tensor, nbytes: int, j: int = 0) -> sympy.Expr:
        if sym_shape is None:
            return sympy.Integer(nbytes)
        try:
            shape = sym_shape(node)
        except Exception:  # noqa: BLE001
            shape = None
        if isinstance(shape, list):  # several outputs
            shape = shape[j] if j < len(shape) else None
        if shape is None or len(shape) != t.dim() or _tensor_nbytes(t, ub) != nbytes:
            return None
        expr = sympy.Mul(*[sympy.sympify(s) for s in shape]) * t.element_size() if len(shape) else sympy.Integer(t.element_size())
        try:
            ok = int(expr.subs(values)) == nbytes
        except Exception:  # noqa: BLE001
            ok = False
        return expr if ok else None

    for node in nodes:
        i = index[node]
        val = node.meta.get("val")
        ts = tensors_of(val)
        if node.op == "get_attr":
            for t in ts:
                weight_keys.add(storage_key(t))
            continue
        if node.op == "placeholder":
            kind, first, last = "input", 0, end
        elif node.op == "call_function":
            kind, first, last = "activation", i, i
        else:
            continue
        users_last = max((index[u] for u in node.users), default=i)
        for j, t in enumerate(ts):
            k = storage_key(t)
            if k in weight_keys:
                continue
            st = storages.get(k)
            if st is None:
                nb = _nbytes(t, ub)
                expr = sym_bytes(node, t, nb, j)
                st = Storage(k, node.name, kind, nb, expr, first, max(last, users_last), module_path(node))
                storages[k] = st
            else:
                st.last = max(st.last, users_last, i)
                if (st.expr is None or not st.expr.free_symbols) and _nbytes(t, ub) == st.nbytes:
                    better = sym_bytes(node, t, st.nbytes, j)  # a later holder (a getitem, a view) may know more
                    if better is not None and (st.expr is None or better.free_symbols):
                        st.expr = better
        if node.op == "call_function":
            tb, te = transient(node, sym_shape, ub)
            try:
                if int(sympy.sympify(te).subs(values)) != tb:
                    te = sympy.Integer(tb)
            except Exception:  # noqa: BLE001
                te = sympy.Integer(tb)
            tgt = node.target
            if isinstance(tgt, torch._ops.HigherOrderOperator) and tgt.name() in _RUN_ONCE_HOPS:
                subs = [getattr(gm, a.target, None) for a in node.args if isinstance(a, fx.Node) and a.op == "get_attr"]
                subs = [s for s in subs if isinstance(s, fx.GraphModule)]
                if len(subs) == 1:
                    inner = activation_memory(subs[0], sym_shape, values, count_inputs=False, unbacked=ub)
                    out_b = sum(_nbytes(t, ub) for t in ts)
                    extra = max(0, inner.peak_bytes - out_b)
                    if extra:
                        out_e = sympy.Add(*[sym_bytes(node, t, _nbytes(t, ub), j) or sympy.Integer(_nbytes(t, ub))
                                            for j, t in enumerate(ts)])
                        extra_e = sympy.Max(0, inner.peak_expr - out_e, evaluate=False)
                        try:
                            ok = int(extra_e.subs(values)) == extra
                        except Exception:  # noqa: BLE001
                            ok = False
                        tb += extra
                        te = te + (extra_e if ok else extra)
            if tb:
                trans[i] += tb
                transient_expr[i] = te

    # graph outputs live to the end
    out_node = nodes[-1] if nodes and nodes[-1].op == "output" else None
    if out_node is not None:
        for a in out_node.all_input_nodes:
            for t in tensors_of(a.meta.get("val")):
                st = storages.get(storage_key(t))
                if st is not None:
                    st.last = end

    # sweep
    delta = [0] * (end + 2)
    delta_poly: list[dict] = [dict() for _ in range(end + 2)]
    input_bytes = 0
    input_poly: dict = {}
    for st in storages.values():
        if st.kind == "input" and not count_inputs:
            continue
        if st.expr is None:
            st.expr = sympy.Integer(st.nbytes)
            if sym_shape is not None:
                constant.append(st.producer)
        poly = _expand_poly(st.expr)
        delta[st.first] += st.nbytes
        delta[st.last + 1] -= st.nbytes
        _add_into(delta_poly[st.first], poly, 1)
        _add_into(delta_poly[st.last + 1], poly, -1)
        if st.kind == "input":
            input_bytes += st.nbytes
            _add_into(input_poly, poly, 1)

    timeline: list[int] = []
    live = 0
    live_poly: dict = {}
    candidates: list[tuple[int, int, dict]] = []
    for i in range(end):
        live += delta[i]
        _add_into(live_poly, delta_poly[i], 1)
        total = live + trans[i]
        timeline.append(total)
        snap = dict(live_poly)
        if i in transient_expr:
            _add_into(snap, _expand_poly(transient_expr[i]), 1)
        candidates.append((total, i, snap))

    if not timeline:
        return MemoryProfile(0, "", "", sympy.Integer(0), input_bytes, _poly_expr(input_poly))
    peak = max(timeline)
    peak_step = timeline.index(peak)
    # exact Max over the steps, without the dominated ones
    candidates.sort(key=lambda c: -c[0])
    kept: list[dict] = []
    exact = True
    for _, _, poly in candidates:
        if any(_dominates(q, poly) for q in kept):
            continue
        kept.append(poly)
        if len(kept) >= max_terms:
            exact = False
            break
    peak_expr = sympy.Max(*[_poly_expr(p) for p in kept], evaluate=False) if len(kept) > 1 else _poly_expr(kept[0])
    live_at = sorted(((st.producer, st.nbytes) for st in storages.values()
                      if st.first <= peak_step <= st.last and (count_inputs or st.kind != "input")),
                     key=lambda x: -x[1])
    pnode = nodes[peak_step]
    return MemoryProfile(
        peak_bytes=int(peak), peak_node=pnode.name, peak_module=module_path(pnode), peak_expr=peak_expr,
        input_bytes=int(input_bytes), input_expr=_poly_expr(input_poly), timeline=timeline,
        live_at_peak=live_at[:12], storages=len(storages), exact_symbolic=exact and not constant,
        constant_storages=constant, allocations=list(storages.values()),
        transients={i: (trans[i], transient_expr[i]) for i in transient_expr},
    )
