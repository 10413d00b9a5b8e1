"""Per-op cost formulas (FLOPs and bytes moved) over shapes, and a walker that sums them over an FX graph.

The registry has the shape of ``torch/utils/flop_counter.py``: a dict from an aten
``OpOverloadPacket`` (or a graphred custom op, by its name ``"graphred::merge_tokens"``) to an
:class:`OpCost`. A formula sees only shapes (tuples of ``int`` or ``sympy`` expressions) and the
op's non-tensor arguments, never a tensor, so the same formula gives a number on concrete
shapes and an expression in ``n_img``, ``B``, ... on symbolic ones. Results are always
``sympy`` expressions (``sympy.Integer`` on concrete shapes).

FLOP conventions
----------------
* Matrix products count 2 FLOPs per multiply-add: ``mm`` ``[m,k]@[k,n]`` is ``2*m*k*n``, as
  ``torch.utils.flop_counter`` counts it. Convolution: ``2 * out_numel * Cin/groups * prod(kernel)``
  (torch's ``conv_flop_count``, transposed convolutions over the input positions as torch does).
* Attention (SDPA kernels, the composite ``scaled_dot_product_attention``): ``2*B*H*Lq*Lk*D`` for
  ``Q K^T`` plus ``2*B*H*Lq*Lk*Dv`` for ``P V``, where ``H`` is the number of *query* heads (grouped-query
  attention broadcasts the fewer key/value heads), counted in full for causal attention too --
  torch's ``sdpa_flop`` convention. ``mode="causal_executed"`` counts only the unmasked
  (query, key) pairs of a causal kernel instead (see :func:`causal_pairs`).
* ``kind="matmul"`` counts exactly the ops ``FlopCounterMode`` counts (mm, addmm, bmm, baddbmm,
  _scaled_mm, convolution, SDPA kernels -- plus the CPU SDPA kernel, which
  :mod:`graphred.analysis.cost.oracle` registers, as it does triangular solves (``n * numel(X)``) and grouped
  matmuls (``_grouped_mm`` and libraries' ``grouped_mm_fallback`` ops: mixture-of-experts layers) --
  and composites that decompose into them:
  linear, matmul with a 2-D-or-more right operand, einsum, conv1d/2d/3d). Bias additions and
  everything else are 0 there. ``kind="all"`` adds the rest:

  - elementwise ops: 1 FLOP per output element per arithmetic op, comparisons and selects
    (``where``, ``masked_fill``) included; transcendental functions (exp, tanh, erf, ...) count 1;
    composite activations count their primitive ops (``ELEMENTWISE_FLOPS``: sigmoid 4, silu 5,
    gelu 5 or 9 with the tanh approximation, ...);
  - softmax / log_softmax: ``SOFTMAX_FLOPS`` = 5 per element (max, subtract, exp, sum, divide);
  - layer_norm: 5 per element (mean, subtract, square, sum, scale) + 1 per affine parameter
    (weight, bias); rms_norm: 3 per element (square, sum, scale) + 1 with a weight;
  - reductions: 1 per input element (mean adds 1 per output element, var/std 3, logsumexp 4);
  - sort / topk / graphred::select_tokens: comparisons, ``numel * ceil(log2(n))`` along the sorted dim;
  - attention kernels add ``SOFTMAX_FLOPS + 1`` (scale) per score, +1 with a mask;
  - bias of addmm/baddbmm/linear/convolution: 1 per output element;
  - mv / dot / addmv / outer: ``2*m*n`` (FlopCounterMode does not count these, hence "all" only);
  - data movement (cat, copies, gather/index/scatter, embedding) and views: 0 FLOPs.

Bytes moved: every tensor input read once plus every output written once (the ideal,
fused-kernel traffic), with three refinements: views and metadata ops move nothing
(:data:`KNOWN_ZERO_COST`; ``reshape`` of a non-viewable tensor copies, which this undercounts);
gathers (embedding, index_select, gather, index, graphred::gather_tokens) read the index and only
the gathered rows; allocations (``empty*``) move nothing.

An op without a formula is never counted as zero: :func:`lookup` returns ``None`` and
:func:`count_graph` lists the node in :attr:`CostTotals.uncounted`.

>>> import sympy, torch
>>> from graphred.analysis.cost.registry import REGISTRY
>>> mm = REGISTRY[torch.ops.aten.mm]
>>> mm.flops([(4, 5), (5, 6)], [(4, 6)])
240
>>> m, k, n = sympy.symbols("m k n", positive=True, integer=True)
>>> mm.flops([(m, k), (k, n)], [(m, n)])
2*k*m*n
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, NamedTuple, Sequence

import sympy
import torch
import torch.fx as fx

__all__ = [
    "OpCost",
    "Call",
    "NodeCost",
    "Uncounted",
    "CostTotals",
    "REGISTRY",
    "KNOWN_ZERO_COST",
    "ZERO_COST",
    "ELEMENTWISE_FLOPS",
    "SOFTMAX_FLOPS",
    "KINDS",
    "MODES",
    "register_cost",
    "lookup",
    "op_key",
    "count_graph",
    "node_cost",
    "causal_pairs",
    "grouped_mm_flops",
    "to_expr",
    "numel",
    "dtype_bytes",
]

aten = torch.ops.aten

KINDS = ("all", "matmul")
MODES = ("full", "causal_executed")

#: FLOPs per element of a softmax / log_softmax (max, subtract, exp, sum, divide).
SOFTMAX_FLOPS = 5

Dim = Any  # int | sympy.Expr | torch.SymInt
Shape = Sequence[Dim]

_ONE = sympy.Integer(1)
_ZERO = sympy.Integer(0)


# ---------------------------------------------------------------------------------------
# sympy-friendly arithmetic over shapes
# ---------------------------------------------------------------------------------------


def to_expr(x: Any) -> sympy.Expr:
    """An int, bool, ``torch.SymInt`` or sympy expression as a sympy expression.

    >>> to_expr(3), to_expr(sympy.Symbol("n"))
    (3, n)
    """
    if isinstance(x, sympy.Basic):
        return x
    if isinstance(x, bool):
        return sympy.Integer(int(x))
    if isinstance(x, int):
        return sympy.Integer(x)
    if isinstance(x, torch.SymInt):
        node = x.node
        const = node.maybe_as_int() if hasattr(node, "maybe_as_int") else None
        return sympy.Integer(const) if const is not None else sympy.sympify(node.expr)
    if isinstance(x, float):
        if x.is_integer():
            return sympy.Integer(int(x))
        return sympy.nsimplify(x, rational=True)
    return sympy.sympify(x)


def numel(shape: Shape | None) -> sympy.Expr:
    """Product of the dims (1 for a scalar, 0 for ``None``)."""
    if shape is None:
        return _ZERO
    return sympy.Mul(*[to_expr(d) for d in shape]) if len(shape) else _ONE


def _prod(dims: Iterable[Dim]) -> sympy.Expr:
    dims = [to_expr(d) for d in dims]
    return sympy.Mul(*dims) if dims else _ONE


def _log2_ceil(n: Dim) -> sympy.Expr:
    n = to_expr(n)
    if n.is_Integer:
        return sympy.Integer(max(int(n) - 1, 0).bit_length())
    return sympy.ceiling(sympy.log(n, 2))


def _is_one(d: Dim) -> bool:
    return to_expr(d) == 1


def _broadcast(shapes: Sequence[Shape]) -> tuple:
    """Broadcast shape of several shapes (a symbolic dim wins over a literal 1)."""
    shapes = [tuple(s) for s in shapes if s is not None]
    if not shapes:
        return ()
    rank = max(len(s) for s in shapes)
    out = []
    for i in range(rank):
        dim = _ONE
        for s in shapes:
            j = i - (rank - len(s))
            if j >= 0 and not _is_one(s[j]):
                dim = to_expr(s[j])
                break
        out.append(dim)
    return tuple(out)


def causal_pairs(lq: Dim, lk: Dim, align: str = "top_left") -> sympy.Expr:
    """Number of (query, key) pairs a causal mask leaves unmasked, exactly.

    ``align="top_left"`` is torch's ``is_causal`` (``ones(Lq, Lk).tril()``; query ``i`` sees keys
    ``0..i``): ``m*(m+1)/2 + (Lq-m)*Lk`` with ``m = min(Lq, Lk)``, i.e. ``Lq*(Lq+1)/2`` for ``Lq <= Lk``.
    ``align="bottom_right"`` aligns the last query with the last key (decoding with a KV cache,
    flash-attn >= 2.1, ``torch.nn.attention.bias.causal_lower_right``; query ``i`` sees keys
    ``0..Lk-Lq+i``): ``m*Lk - m*(m-1)/2``, i.e. ``Lq*Lk - Lq*(Lq-1)/2`` for ``Lq <= Lk``.
    The two agree when ``Lq == Lk``: ``L*(L+1)/2``.

    >>> causal_pairs(4, 4), causal_pairs(2, 5), causal_pairs(2, 5, "bottom_right")
    (10, 3, 9)
    """
    lq, lk = to_expr(lq), to_expr(lk)
    m = sympy.Min(lq, lk)
    if align == "top_left":
        return sympy.expand(m * (m + 1) / 2 + (lq - m) * lk)
    if align == "bottom_right":
        return sympy.expand(m * lk - m * (m - 1) / 2)
    raise ValueError(f"causal_pairs: align must be 'top_left' or 'bottom_right', got {align!r}")


def dtype_bytes(dtype: Any) -> int:
    """Bytes per element of a ``torch.dtype`` (an int is taken as the item size; ``None``: 4)."""
    if dtype is None:
        return 4
    if isinstance(dtype, int):
        return dtype
    return dtype.itemsize


# ---------------------------------------------------------------------------------------
# The formula object
# ---------------------------------------------------------------------------------------


class Call:
    """The arguments a formula sees: the op's args/kwargs with each tensor replaced by its shape.

    ``get(name)`` finds an argument by its schema name (positional or keyword), so formulas do not
    depend on how a graph spelled the call.
    """

    __slots__ = ("args", "kwargs", "out_shapes", "params")

    def __init__(self, args: Sequence, kwargs: Mapping, out_shapes: Sequence, params: Sequence[str]):
        self.args = tuple(args)
        self.kwargs = dict(kwargs)
        self.out_shapes = [tuple(s) if s is not None else None for s in out_shapes]
        self.params = tuple(params)

    def get(self, name: str, default: Any = None) -> Any:
        if name in self.kwargs:
            return self.kwargs[name]
        if name in self.params:
            i = self.params.index(name)
            if i < len(self.args):
                return self.args[i]
        return default

    def arg(self, i: int, default: Any = None) -> Any:
        return self.args[i] if i < len(self.args) else default

    @property
    def out(self) -> tuple | None:
        """The first output's shape (``None`` when the caller gave no output shapes)."""
        return self.out_shapes[0] if self.out_shapes else None


# A flop function returns (matmul_flops, other_flops).
FlopFn = Callable[[Call, str], tuple]
BytesFn = Callable[[Sequence, Sequence, Sequence, Sequence, Call], Any]


def _tensor_bytes(shapes: Sequence, dtypes: Sequence | None) -> sympy.Expr:
    total = []
    for i, s in enumerate(shapes):
        if s is None:
            continue
        dt = dtypes[i] if dtypes is not None and i < len(dtypes) else None
        total.append(numel(s) * dtype_bytes(dt))
    return sympy.Add(*total) if total else _ZERO


def _bytes_default(in_shapes, in_dtypes, out_shapes, out_dtypes, call: Call) -> sympy.Expr:
    """Read every input once, write every output once."""
    return _tensor_bytes(in_shapes, in_dtypes) + _tensor_bytes(out_shapes, out_dtypes)


def _bytes_zero(in_shapes, in_dtypes, out_shapes, out_dtypes, call: Call) -> sympy.Expr:
    return _ZERO


def _bytes_write_only(in_shapes, in_dtypes, out_shapes, out_dtypes, call: Call) -> sympy.Expr:
    """Factories (``zeros``, ``full``, ``arange``): write the output."""
    return _tensor_bytes(out_shapes, out_dtypes)


def _bytes_gather(in_shapes, in_dtypes, out_shapes, out_dtypes, call: Call) -> sympy.Expr:
    """Gathers: read the index tensors and the gathered rows (as many as the output), write the output.

    The source is the first tensor input; its gathered part is read at the output's dtype.
    """
    rest = _tensor_bytes(in_shapes[1:], in_dtypes[1:] if in_dtypes is not None else None)
    return rest + 2 * _tensor_bytes(out_shapes, out_dtypes)


@dataclass(frozen=True)
class OpCost:
    """Cost formulas of one op.

    ``flops(in_shapes, out_shapes, args, kwargs, kind=, mode=)`` and
    ``bytes(in_shapes, in_dtypes, out_shapes, out_dtypes, args, kwargs)``:

    * ``in_shapes``: shapes of the tensor inputs, in argument order (absent optional tensors skipped);
    * ``out_shapes``: shapes of the tensor outputs;
    * ``args``/``kwargs``: the op's arguments as in its schema, each tensor replaced by its shape
      (``torch.utils.flop_counter``'s convention). ``args=None`` means "``in_shapes`` are the
      positional arguments", enough for ops whose non-tensor arguments keep their defaults;
    * dtypes: ``torch.dtype`` (or an item size in bytes); ``None`` means 4 bytes per element.

    >>> import torch
    >>> sdpa = REGISTRY[torch.ops.aten._scaled_dot_product_flash_attention_for_cpu]
    >>> q = (1, 8, 16, 64); kv = (1, 2, 16, 64)           # grouped-query: 2 key heads
    >>> int(sdpa.flops([q, kv, kv], [q], kind="matmul")) == 4 * 8 * 16 * 16 * 64
    True
    >>> args = (q, kv, kv, 0.0, True)                    # is_causal=True
    >>> sdpa.flops([q, kv, kv], [q], args, mode="causal_executed", kind="matmul")
    278528
    """

    name: str
    flop_fn: FlopFn
    bytes_fn: BytesFn = _bytes_default
    params: tuple = ()
    matmul: bool = False  # whether FlopCounterMode counts (part of) it
    doc: str = ""

    def _call(self, in_shapes, out_shapes, args, kwargs) -> Call:
        args = tuple(in_shapes) if args is None else tuple(args)
        return Call(args, kwargs or {}, list(out_shapes or ()), self.params)

    def flops(
        self,
        in_shapes: Sequence[Shape],
        out_shapes: Sequence[Shape] = (),
        args: Sequence | None = None,
        kwargs: Mapping | None = None,
        *,
        kind: str = "all",
        mode: str = "full",
    ) -> sympy.Expr:
        _check_kind_mode(kind, mode)
        mm, other = self.flop_fn(self._call(in_shapes, out_shapes, args, kwargs), mode)
        mm, other = to_expr(mm), to_expr(other)
        return mm if kind == "matmul" else mm + other

    def bytes(
        self,
        in_shapes: Sequence[Shape],
        in_dtypes: Sequence | None = None,
        out_shapes: Sequence[Shape] = (),
        out_dtypes: Sequence | None = None,
        args: Sequence | None = None,
        kwargs: Mapping | None = None,
    ) -> sympy.Expr:
        call = self._call(in_shapes, out_shapes, args, kwargs)
        return to_expr(self.bytes_fn(list(in_shapes), in_dtypes, list(out_shapes or ()), out_dtypes, call))


def _check_kind_mode(kind: str, mode: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"cost kind must be one of {KINDS}, got {kind!r}")
    if mode not in MODES:
        raise ValueError(f"cost mode must be one of {MODES}, got {mode!r}")


def _zero_flops(call: Call, mode: str):
    return _ZERO, _ZERO


#: The cost of a view or metadata op: 0 FLOPs, 0 bytes.
ZERO_COST = OpCost("zero", _zero_flops, _bytes_zero, doc="view / metadata: no FLOPs, no bytes")

#: ``OpOverloadPacket`` (or ``"ns::name"``) -> :class:`OpCost`.
REGISTRY: dict[Any, OpCost] = {}


def op_key(target: Any) -> Any:
    """Registry key of a call target: the aten packet, or ``"graphred::name"`` for other namespaces.

    >>> op_key(torch.ops.aten.mm.default)
    <OpOverloadPacket(op='aten.mm')>
    """
    if isinstance(target, torch._ops.OpOverload):
        target = target.overloadpacket
    if isinstance(target, torch._ops.OpOverloadPacket):
        ns = target._qualified_op_name.split("::", 1)[0]
        if ns == "aten":
            return target
        return target._qualified_op_name
    return target


def _packets(names: Iterable[str], ns=aten) -> list:
    out = []
    for n in names:
        p = getattr(ns, n, None) if hasattr(ns, n) else None
        if isinstance(p, torch._ops.OpOverloadPacket):
            out.append(p)
    return out


def register_cost(
    targets: Any,
    *,
    bytes: BytesFn | None = None,  # noqa: A002 - mirrors OpCost.bytes
    params: Sequence[str] = (),
    matmul: bool = False,
) -> Callable[[FlopFn], FlopFn]:
    """Register a flop function ``fn(call, mode) -> (matmul_flops, other_flops)`` for ops.

    ``targets``: an ``OpOverloadPacket``, an aten op name (``"mm"``; silently skipped when this torch
    lacks it), a custom op name (``"graphred::merge_tokens"``) or a list of these.

    >>> @register_cost("graphred::example_op", params=("x",))
    ... def _example(call, mode):
    ...     return 0, numel(call.get("x"))
    >>> lookup("graphred::example_op").flops([(2, 3)])
    6
    >>> del REGISTRY["graphred::example_op"]
    """
    if not isinstance(targets, (list, tuple)):
        targets = [targets]

    def deco(fn: FlopFn) -> FlopFn:
        for t in targets:
            if isinstance(t, str) and "::" not in t:
                if not hasattr(aten, t):
                    continue
                t = getattr(aten, t)
            key = op_key(t)
            name = key if isinstance(key, str) else key._qualified_op_name
            REGISTRY[key] = OpCost(
                name=str(name),
                flop_fn=fn,
                bytes_fn=bytes or _bytes_default,
                params=tuple(params),
                matmul=matmul,
                doc=(fn.__doc__ or "").strip(),
            )
        return fn

    return deco


# ---------------------------------------------------------------------------------------
# Matrix products
# ---------------------------------------------------------------------------------------


@register_cost("mm", params=("self", "mat2"), matmul=True)
def _mm(call: Call, mode: str):
    """``[m,k] @ [k,n]``: 2*m*k*n."""
    (m, k), (_k, n) = call.arg(0), call.arg(1)
    return 2 * to_expr(m) * to_expr(k) * to_expr(n), _ZERO


@register_cost("_scaled_mm", params=("self", "mat2"), matmul=True)
def _scaled_mm(call: Call, mode: str):
    """fp8 ``[m,k] @ [k,n]`` with scales: 2*m*k*n."""
    return _mm(call, mode)


@register_cost("addmm", params=("self", "mat1", "mat2", "beta", "alpha"), matmul=True)
def _addmm(call: Call, mode: str):
    """``bias + [m,k] @ [k,n]``: 2*m*k*n, plus m*n for the bias (kind="all")."""
    (m, k), (_k, n) = call.get("mat1"), call.get("mat2")
    return 2 * to_expr(m) * to_expr(k) * to_expr(n), to_expr(m) * to_expr(n)


@register_cost("bmm", params=("self", "mat2"), matmul=True)
def _bmm(call: Call, mode: str):
    """``[b,m,k] @ [b,k,n]``: 2*b*m*k*n."""
    (b, m, k), (_b, _k, n) = call.arg(0), call.arg(1)
    return 2 * _prod((b, m, k, n)), _ZERO


@register_cost("baddbmm", params=("self", "batch1", "batch2", "beta", "alpha"), matmul=True)
def _baddbmm(call: Call, mode: str):
    """``bias + [b,m,k] @ [b,k,n]``: 2*b*m*k*n, plus b*m*n for the bias (kind="all")."""
    (b, m, k), (_b, _k, n) = call.get("batch1"), call.get("batch2")
    return 2 * _prod((b, m, k, n)), _prod((b, m, n))


@register_cost(["addbmm"], params=("self", "batch1", "batch2", "beta", "alpha"))
def _addbmm(call: Call, mode: str):
    """``bias + sum_b [b,m,k] @ [b,k,n]`` (FlopCounterMode does not count it): 2*b*m*k*n + m*n."""
    (b, m, k), (_b, _k, n) = call.get("batch1"), call.get("batch2")
    return _ZERO, 2 * _prod((b, m, k, n)) + _prod((m, n))


def grouped_mm_flops(a: Shape, b: Shape) -> sympy.Expr:
    """Matrix-product FLOPs of a grouped matmul (``torch._grouped_mm`` / ``F.grouped_mm``) from its operands'
    shapes, 2 per multiply-add, every row of the grouped dim in one group:

    * ``[M, K] @ [G, K, N]`` (groups of rows, e.g. the tokens routed to each expert): ``2*M*K*N``;
    * ``[G, M, K] @ [K, N]`` (groups of columns) and ``[M, K] @ [K, N]`` (groups of ``K``): ``2*M*K*N``;
    * ``[G, M, K] @ [G, K, N]`` (a batched product): ``2*G*M*K*N``.

    The kernel skips grouped-dim rows past ``offs[-1]``; from shapes alone every row is counted (the two are
    equal where the offsets are cumulative counts over the whole grouped dim, as a router's are).

    >>> grouped_mm_flops((10, 8), (2, 8, 4))
    640
    """
    a, b = tuple(to_expr(d) for d in a), tuple(to_expr(d) for d in b)
    if len(a) == 2 and len(b) == 3:
        return 2 * a[0] * a[1] * b[2]
    if len(a) == 3 and len(b) == 2:
        return 2 * a[1] * a[2] * b[1]
    if len(a) == 2 and len(b) == 2:
        return 2 * a[0] * a[1] * b[1]
    if len(a) == 3 and len(b) == 3:
        return 2 * a[0] * a[1] * a[2] * b[2]
    raise ValueError(f"grouped matmul of a {len(a)}-d and a {len(b)}-d operand")


@register_cost("_grouped_mm", params=("self", "mat2", "offs", "bias", "out_dtype"), matmul=True)
def _grouped_mm(call: Call, mode: str):
    """Grouped matmul (the experts of a mixture-of-experts layer, each on its routed rows):
    :func:`grouped_mm_flops`, plus ``numel(out)`` for a bias (kind="all"). A custom op of another library named
    ``grouped_mm`` / ``grouped_mm_fallback`` with the same operands (input, weight, offs) is costed the same
    (:func:`lookup`)."""
    a, b = call.arg(0), call.arg(1)
    mm = grouped_mm_flops(a, b)
    bias = call.get("bias") if "bias" in call.params else None
    return mm, (numel(call.out) if bias is not None and call.out is not None else _ZERO)


@register_cost("matmul", params=("self", "other"), matmul=True)
def _matmul(call: Call, mode: str):
    """torch.matmul: 2 * numel(out) * k. With a 1-D right operand it runs mv/dot, which
    FlopCounterMode does not count, so those FLOPs go to kind="all" only."""
    a, b = call.arg(0), call.arg(1)
    k = to_expr(a[-1])
    if len(a) == 1 and len(b) == 1:
        total = 2 * k
    else:
        out = call.out
        if out is None:
            if len(b) == 1:
                out = tuple(a[:-1])
            elif len(a) == 1:
                out = tuple(b[:-2]) + (b[-1],)
            else:
                out = _broadcast([tuple(a[:-2]), tuple(b[:-2])]) + (a[-2], b[-1])
        total = 2 * numel(out) * k
    if len(b) == 1:
        return _ZERO, total
    return total, _ZERO


@register_cost(["mv", "dot", "vdot"], params=("self", "vec"))
def _mv(call: Call, mode: str):
    """Matrix-vector and dot products: 2 * numel(self) (FlopCounterMode does not count these)."""
    return _ZERO, 2 * numel(call.arg(0))


@register_cost("addmv", params=("self", "mat", "vec", "beta", "alpha"))
def _addmv(call: Call, mode: str):
    """``bias + [m,n] @ [n]``: 2*m*n + m (kind="all" only)."""
    mat = call.get("mat")
    return _ZERO, 2 * numel(mat) + to_expr(mat[0])


@register_cost(["outer", "ger"], params=("self", "vec2"))
def _outer(call: Call, mode: str):
    """Outer product: m*n multiplies (kind="all" only)."""
    return _ZERO, numel(call.arg(0)) * numel(call.arg(1))


def _trsm(a, x, unitriangular) -> sympy.Expr:
    """Substitution over an ``n x n`` triangle for each of the ``numel(X) / n`` right-hand sides:
    ``n*(n-1)/2`` multiply-adds (2 FLOPs each) plus ``n`` divisions unless the diagonal is unit."""
    n = to_expr(a[-1])
    return numel(x) * (n - 1 if unitriangular else n)


@register_cost("linalg_solve_triangular", params=("self", "B", "upper", "left", "unitriangular"), matmul=True)
def _solve_triangular(call: Call, mode: str):
    """``X = A^-1 B`` (or ``B A^-1``) for a triangular ``A [..., n, n]``: ``n * numel(X)``, ``(n-1) * numel(X)``
    with a unit diagonal (LAPACK's trsm count). torch has no formula for it; the oracle counts the same."""
    x = call.out if call.out is not None else _broadcast([call.get("self")[:-2], call.get("B")[:-2]]) + tuple(
        call.get("B")[-2:])
    return _trsm(call.get("self"), x, bool(call.get("unitriangular", False))), _ZERO


@register_cost("triangular_solve", params=("self", "A", "upper", "transpose", "unitriangular"), matmul=True)
def _triangular_solve(call: Call, mode: str):
    """Legacy ``triangular_solve(B, A)``: as :func:`_solve_triangular` (the copy of ``A`` it returns is free)."""
    x = call.out if call.out is not None else _broadcast([call.get("A")[:-2], call.get("self")[:-2]]) + tuple(
        call.get("self")[-2:])
    return _trsm(call.get("A"), x, bool(call.get("unitriangular", False))), _ZERO


@register_cost("linear", params=("input", "weight", "bias"), matmul=True)
def _linear(call: Call, mode: str):
    """``x[..., in] @ W[out, in]^T``: 2 * numel(x[..., :-1]) * out * in, plus numel(out) for a bias."""
    x, w, bias = call.get("input"), call.get("weight"), call.get("bias")
    rows = _prod(x[:-1])
    if len(w) == 1:  # a vector weight: a dot product per row, no matmul kernel
        return _ZERO, 2 * rows * to_expr(w[0]) + (rows if bias is not None else 0)
    out_f, in_f = to_expr(w[0]), to_expr(w[1])
    return 2 * rows * out_f * in_f, (rows * out_f if bias is not None else _ZERO)


def _einsum_letters(equation: str, shapes: Sequence[Shape]) -> tuple[list[str], str, dict]:
    eq = equation.replace(" ", "")
    if "->" in eq:
        lhs, rhs = eq.split("->")
    else:
        lhs, rhs = eq, None
    terms = lhs.split(",")
    if len(terms) != len(shapes):
        raise ValueError(f"einsum {equation!r}: {len(terms)} operands in the equation, {len(shapes)} given")
    used = set(c for c in eq if c.isalpha())
    spare = [c for c in "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz" if c not in used]
    ell_rank = 0
    for t, s in zip(terms, shapes):
        if "..." in t:
            ell_rank = max(ell_rank, len(s) - (len(t) - 3))
    ell = "".join(spare[:ell_rank])
    sizes: dict = {}
    out_terms = []
    for t, s in zip(terms, shapes):
        if "..." in t:
            n = len(s) - (len(t) - 3)
            t = t.replace("...", ell[ell_rank - n:] if n else "")
        out_terms.append(t)
        for c, d in zip(t, s):
            if c not in sizes or _is_one(sizes[c]):
                sizes[c] = to_expr(d)
    if rhs is None:
        counts = {c: sum(t.count(c) for t in out_terms) for c in sizes}
        rhs = ell + "".join(sorted(c for c in sizes if counts[c] == 1 and c not in ell))
    else:
        rhs = rhs.replace("...", ell)
    return out_terms, rhs, sizes


@register_cost("einsum", params=("equation", "tensors", "path"), matmul=True)
def _einsum(call: Call, mode: str):
    """Left-to-right pairwise contraction, as torch's einsum runs it: a pair with summed letters is a
    bmm costing 2 * prod(sizes of the letters kept or summed) (letters only one side needs are summed
    out first); a pair with nothing to sum is an elementwise product (kind="all"). A single operand
    (a sum/permute) costs its numel (kind="all")."""
    terms, rhs, sizes = _einsum_letters(call.get("equation"), call.get("tensors"))
    if len(terms) == 1:
        return _ZERO, numel([sizes[c] for c in terms[0]])
    mm, other = [], []
    left = set(terms[0])
    for i, t in enumerate(terms[1:], start=1):
        right = set(t)
        later = set(rhs).union(*[set(x) for x in terms[i + 1:]]) if i + 1 < len(terms) else set(rhs)
        kept = (left | right) & later
        summed = (left & right) - later
        if summed:
            mm.append(2 * _prod(sizes[c] for c in sorted(kept | summed)))
        else:  # nothing to contract: torch multiplies elementwise (no bmm)
            other.append(_prod(sizes[c] for c in sorted(kept)))
        left = kept
    return sympy.Add(*mm), sympy.Add(*other)


# ---------------------------------------------------------------------------------------
# Convolution
# ---------------------------------------------------------------------------------------


def _conv_out_spatial(x, w, stride, padding, dilation):
    spatial = []
    nd = len(x) - 2
    for i in range(nd):
        def pick(v, default):
            if v is None:
                return default
            if isinstance(v, (list, tuple)):
                return v[i] if len(v) > 1 else v[0]
            return v
        s, d, kk = to_expr(pick(stride, 1)), to_expr(pick(dilation, 1)), to_expr(w[2 + i])
        if isinstance(padding, str):
            if padding == "same":
                spatial.append(to_expr(x[2 + i]))
                continue
            p = _ZERO
        else:
            p = to_expr(pick(padding, 0))
        spatial.append(sympy.floor((to_expr(x[2 + i]) + 2 * p - d * (kk - 1) - 1) / s) + 1)
    return spatial


def _conv_cost(x, w, out, bias, transposed, stride=1, padding=0, dilation=1):
    # torch's conv_flop_count: 2 * batch * prod(conv positions) * prod(kernel) * w[0] * w[1]
    # (w = [Cout, Cin/groups, *k] for a convolution, [Cin, Cout/groups, *k] transposed).
    if transposed:
        positions = list(x[2:])
    elif out is not None:
        positions = list(out[2:])
    else:
        positions = _conv_out_spatial(x, w, stride, padding, dilation)
    mm = 2 * to_expr(x[0]) * _prod(positions) * _prod(w)
    if bias is None:
        return mm, _ZERO
    out_numel = numel(out) if out is not None else None
    if out_numel is None:
        if transposed:
            return mm, _ZERO  # output size needs output_padding; only with out_shapes
        c_out = to_expr(w[0])
        out_numel = to_expr(x[0]) * c_out * _prod(positions)
    return mm, out_numel


_CONV_PARAMS = ("input", "weight", "bias", "stride", "padding", "dilation", "transposed", "output_padding", "groups")


@register_cost(["convolution", "_convolution", "convolution_overrideable", "cudnn_convolution", "_slow_conv2d_forward"],
               params=_CONV_PARAMS, matmul=True)
def _convolution(call: Call, mode: str):
    """2 * out_numel * Cin/groups * prod(kernel) (+ out_numel for a bias, kind="all")."""
    return _conv_cost(call.get("input"), call.get("weight"), call.out, call.get("bias"),
                      bool(call.get("transposed", False)), call.get("stride", 1), call.get("padding", 0),
                      call.get("dilation", 1))


@register_cost(["conv1d", "conv2d", "conv3d"],
               params=("input", "weight", "bias", "stride", "padding", "dilation", "groups"), matmul=True)
def _convnd(call: Call, mode: str):
    """conv1d/2d/3d: as ``convolution``."""
    return _conv_cost(call.get("input"), call.get("weight"), call.out, call.get("bias"), False,
                      call.get("stride", 1), call.get("padding", 0), call.get("dilation", 1))


@register_cost(["conv_transpose1d", "conv_transpose2d", "conv_transpose3d"],
               params=("input", "weight", "bias", "stride", "padding", "output_padding", "groups", "dilation"),
               matmul=True)
def _conv_transpose(call: Call, mode: str):
    """Transposed convolution: 2 * numel(input) * Cout/groups * prod(kernel), as torch counts it."""
    return _conv_cost(call.get("input"), call.get("weight"), call.out, call.get("bias"), True)


# ---------------------------------------------------------------------------------------
# Attention
# ---------------------------------------------------------------------------------------


def _attention_cost(q, k, v, *, causal: bool, has_mask: bool, mode: str):
    """(matmul, other) of softmax(q k^T * scale + mask) v with q [..., Lq, D], k [..., Lk, D], v [..., Lk, Dv].

    ``prod(q[:-2])`` is batch x query heads: grouped-query attention broadcasts key/value heads.
    """
    bh = _prod(q[:-2])
    lq, d = to_expr(q[-2]), to_expr(q[-1])
    lk, dv = to_expr(k[-2]), to_expr(v[-1])
    pairs = causal_pairs(lq, lk, "top_left") if (causal and mode == "causal_executed") else lq * lk
    mm = 2 * bh * pairs * d + 2 * bh * pairs * dv
    other = bh * pairs * (SOFTMAX_FLOPS + 1 + (1 if has_mask else 0))
    return mm, other


def _sdpa(mask_name: str | None):
    def fn(call: Call, mode: str):
        q, k, v = call.arg(0), call.arg(1), call.arg(2)
        mask = call.get(mask_name) if mask_name else None
        causal = bool(call.get("is_causal", False))
        return _attention_cost(q, k, v, causal=causal, has_mask=mask is not None, mode=mode)

    fn.__doc__ = (
        "2*B*H*Lq*Lk*D (Q K^T) + 2*B*H*Lq*Lk*Dv (P V), H = query heads (GQA-aware), causal counted in "
        "full as FlopCounterMode does; mode='causal_executed' counts causal_pairs(Lq, Lk, 'top_left') "
        "(torch's is_causal) instead of Lq*Lk. kind='all' adds (SOFTMAX_FLOPS + 1 [+1 mask]) per score."
    )
    return fn


register_cost("scaled_dot_product_attention", matmul=True,
              params=("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa"))(
    _sdpa("attn_mask"))
register_cost("_scaled_dot_product_attention_math", matmul=True,
              params=("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "dropout_mask"))(
    _sdpa("attn_mask"))
register_cost("_scaled_dot_product_flash_attention_for_cpu", matmul=True,
              params=("query", "key", "value", "dropout_p", "is_causal", "attn_mask", "scale"))(
    _sdpa("attn_mask"))
register_cost("_scaled_dot_product_flash_attention", matmul=True,
              params=("query", "key", "value", "dropout_p", "is_causal", "return_debug_mask", "scale"))(
    _sdpa(None))
register_cost(["_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention"], matmul=True,
              params=("query", "key", "value", "attn_bias", "compute_log_sumexp", "dropout_p", "is_causal"))(
    _sdpa("attn_bias"))
register_cost("_scaled_dot_product_fused_attention_overrideable", matmul=True,
              params=("query", "key", "value", "attn_bias", "dropout_p", "is_causal"))(
    _sdpa("attn_bias"))


@register_cost("_native_multi_head_attention", matmul=True,
               params=("query", "key", "value", "embed_dim", "num_head", "qkv_weight", "qkv_bias",
                       "proj_weight", "proj_bias", "mask"))
def _native_mha(call: Call, mode: str):
    """nn.MultiheadAttention's fast path, batch-first ``query [B,L,E]``, ``key/value [B,S,E]``:
    projections 4*B*L*E^2 + 4*B*S*E^2 plus attention 4*B*L*S*E (FlopCounterMode does not see it
    on its own; the oracle registers the same count)."""
    q, kk = call.get("query"), call.get("key")
    b, lq, e = (to_expr(d) for d in q)
    s = to_expr(kk[-2])
    mm = 4 * b * lq * e * e + 4 * b * s * e * e + 4 * b * lq * s * e
    other = b * lq * s * (SOFTMAX_FLOPS + 1 + (1 if call.get("mask") is not None else 0)) + 4 * b * (lq + s) * e
    return mm, other


# ---------------------------------------------------------------------------------------
# Softmax and normalisation
# ---------------------------------------------------------------------------------------


@register_cost(["_softmax", "softmax", "_safe_softmax", "_log_softmax", "log_softmax"], params=("self", "dim"))
def _softmax(call: Call, mode: str):
    """SOFTMAX_FLOPS (5) per element: max, subtract, exp, sum, divide (log_softmax: log instead)."""
    return _ZERO, SOFTMAX_FLOPS * numel(call.arg(0))


@register_cost(["layer_norm", "native_layer_norm"], params=("input", "normalized_shape", "weight", "bias", "eps"))
def _layer_norm(call: Call, mode: str):
    """5 per element (mean, subtract, square, sum, scale) + 1 per affine parameter present."""
    n = numel(call.get("input"))
    affine = (call.get("weight") is not None) + (call.get("bias") is not None)
    return _ZERO, (5 + affine) * n


@register_cost(["group_norm", "native_group_norm"], params=("input", "weight", "bias"))
def _group_norm(call: Call, mode: str):
    """As layer_norm: 5 per element + 1 per affine parameter present."""
    n = numel(call.get("input"))
    affine = (call.get("weight") is not None) + (call.get("bias") is not None)
    return _ZERO, (5 + affine) * n


@register_cost(["rms_norm", "_fused_rms_norm"], params=("input", "normalized_shape", "weight", "eps"))
def _rms_norm(call: Call, mode: str):
    """3 per element (square, sum, scale) + 1 with a weight."""
    return _ZERO, (3 + (call.get("weight") is not None)) * numel(call.get("input"))


@register_cost(["_native_batch_norm_legit_no_training", "_native_batch_norm_legit",
                "_native_batch_norm_legit_functional", "native_batch_norm", "batch_norm", "instance_norm"],
               params=("input", "weight", "bias"))
def _batch_norm(call: Call, mode: str):
    """2 per element (subtract mean, scale) + 1 per affine parameter present (statistics ignored)."""
    affine = (call.get("weight") is not None) + (call.get("bias") is not None)
    return _ZERO, (2 + affine) * numel(call.get("input"))


# ---------------------------------------------------------------------------------------
# Elementwise
# ---------------------------------------------------------------------------------------

#: FLOPs per output element of elementwise ops (in-place variants ``add_`` etc. count the same).
ELEMENTWISE_FLOPS: dict[str, int] = {
    **{n: 1 for n in (
        "abs", "neg", "reciprocal", "rsqrt", "sqrt", "exp", "exp2", "expm1", "log", "log1p", "log2", "log10",
        "sin", "cos", "tan", "asin", "acos", "atan", "sinh", "cosh", "tanh", "asinh", "acosh", "atanh",
        "erf", "erfc", "erfinv", "relu", "relu6", "sign", "sgn", "floor", "ceil", "round", "trunc", "frac",
        "logical_not", "bitwise_not", "clamp", "clamp_min", "clamp_max", "hardtanh", "square", "pow",
        "add", "sub", "rsub", "mul", "div", "true_divide", "floor_divide", "remainder", "fmod",
        "maximum", "minimum", "fmax", "fmin", "eq", "ne", "lt", "le", "gt", "ge",
        "greater", "greater_equal", "less", "less_equal", "not_equal",
        "logical_and", "logical_or", "logical_xor", "bitwise_and", "bitwise_or", "bitwise_xor",
        "bitwise_left_shift", "bitwise_right_shift", "__and__", "__or__", "__xor__", "__lshift__", "__rshift__",
        "where", "masked_fill", "atan2", "copysign", "isnan", "isinf", "isfinite", "isneginf", "isposinf",
        "threshold", "heaviside", "signbit", "nan_to_num", "bernoulli",
    )},
    "sigmoid": 4,       # neg, exp, add, reciprocal
    "silu": 5,          # x * sigmoid(x)
    "gelu": 5,          # x/sqrt2, erf, +1, *0.5, *x   (9 with approximate="tanh")
    "softplus": 3,      # exp, add, log
    "mish": 5,          # softplus, tanh, mul
    "elu": 3, "celu": 3, "selu": 4,
    "leaky_relu": 2, "hardsigmoid": 3, "hardswish": 4, "logit": 3,
    "lerp": 3,          # a + w * (b - a)
    "addcmul": 3, "addcdiv": 3, "xlogy": 2, "hypot": 3, "logaddexp": 4,
    "native_dropout": 2, "dropout": 2,  # mask compare + scale, only when training
}


def _elementwise(per_element: int):
    def fn(call: Call, mode: str):
        out = call.out
        if out is None:
            out = _broadcast([s for s in call.args if _is_shape(s)])
        return _ZERO, per_element * numel(out)

    fn.__doc__ = f"{per_element} FLOP(s) per output element."
    return fn


def _is_shape(x: Any) -> bool:
    return isinstance(x, tuple) and all(isinstance(d, (int, sympy.Basic, torch.SymInt)) for d in x)


for _name, _per in ELEMENTWISE_FLOPS.items():
    if _name in ("gelu", "dropout", "native_dropout"):
        continue
    register_cost([_name, _name + "_"])(_elementwise(_per))


@register_cost(["gelu", "gelu_"], params=("self", "approximate"))
def _gelu(call: Call, mode: str):
    """gelu: 5 per element with erf, 9 with approximate='tanh'."""
    per = 9 if call.get("approximate", "none") == "tanh" else 5
    out = call.out if call.out is not None else call.arg(0)
    return _ZERO, per * numel(out)


@register_cost("glu", params=("self", "dim"))
def _glu(call: Call, mode: str):
    """glu: sigmoid (4) + multiply per output element."""
    out = call.out
    if out is None:
        x, d = call.arg(0), call.get("dim", -1)
        out = list(x)
        out[d] = to_expr(out[d]) / 2
    return _ZERO, 5 * numel(out)


def _bytes_dropout(in_shapes, in_dtypes, out_shapes, out_dtypes, call: Call):
    if call.get("train", True) is False:
        return _ZERO  # identity
    return _bytes_default(in_shapes, in_dtypes, out_shapes, out_dtypes, call)


@register_cost("dropout", params=("input", "p", "train"), bytes=_bytes_dropout)
def _dropout(call: Call, mode: str):
    """dropout: 2 per element (compare, scale) when training; identity (0 FLOPs, 0 bytes) otherwise."""
    if call.get("train", True) is False:
        return _ZERO, _ZERO
    return _ZERO, 2 * numel(call.arg(0))


@register_cost("native_dropout", params=("input", "p", "train"), bytes=_bytes_dropout)
def _native_dropout(call: Call, mode: str):
    """native_dropout: as dropout."""
    return _dropout(call, mode)


# ---------------------------------------------------------------------------------------
# Reductions, scans, sorting
# ---------------------------------------------------------------------------------------


def _reduction(per_input: int, per_output: int = 0):
    def fn(call: Call, mode: str):
        n_in = numel(call.arg(0))
        n_out = sum((numel(s) for s in call.out_shapes[:1] if s is not None), _ZERO) if per_output else _ZERO
        return _ZERO, per_input * n_in + per_output * n_out

    fn.__doc__ = f"{per_input} FLOP(s) per input element" + (f" + {per_output} per output element." if per_output else ".")
    return fn


register_cost(["sum", "nansum", "amax", "amin", "max", "min", "argmax", "argmin", "prod", "any", "all",
               "_is_all_true", "_is_any_true", "aminmax", "count_nonzero", "cumsum", "cumprod", "cummax", "cummin",
               "logcumsumexp", "multinomial", "histc", "bincount"])(_reduction(1))
register_cost(["mean", "nanmean"])(_reduction(1, 1))
register_cost(["var", "std", "var_mean", "std_mean"])(_reduction(3))
register_cost(["logsumexp"])(_reduction(4, 1))
register_cost(["linalg_vector_norm", "norm", "frobenius_norm"])(_reduction(2, 1))


def _sort_like(dim_name: str, dim_default: int):
    def fn(call: Call, mode: str):
        x = call.arg(0)
        if len(x) == 0:
            return _ZERO, _ZERO
        d = call.get(dim_name, dim_default)
        d = int(d) if d is not None else -1
        return _ZERO, numel(x) * _log2_ceil(x[d])

    fn.__doc__ = "Comparisons: numel * ceil(log2(n)) along the sorted dim."
    return fn


register_cost(["sort", "argsort", "msort"], params=("self", "dim"))(_sort_like("dim", -1))
register_cost(["topk"], params=("self", "k", "dim"))(_sort_like("dim", -1))
register_cost(["kthvalue"], params=("self", "k", "dim"))(_sort_like("dim", -1))
register_cost(["median", "nanmedian", "mode"], params=("self", "dim"))(_sort_like("dim", -1))


@register_cost(["_unique2", "unique_dim", "unique_consecutive", "_unique"])
def _unique(call: Call, mode: str):
    """unique: a sort of the flattened input, numel * ceil(log2(numel)) comparisons."""
    n = numel(call.arg(0))
    return _ZERO, n * _log2_ceil(n)


@register_cost(["searchsorted", "bucketize"], params=("sorted_sequence", "self"))
def _searchsorted(call: Call, mode: str):
    """Binary search: numel(values) * ceil(log2(n))."""
    seq = call.arg(0) if call.arg(0) is not None else (1,)
    vals = call.arg(1)
    n_vals = numel(vals) if _is_shape(vals) else _ONE
    return _ZERO, n_vals * _log2_ceil(seq[-1] if len(seq) else 1)


# ---------------------------------------------------------------------------------------
# Data movement: gathers, scatters, copies, factories
# ---------------------------------------------------------------------------------------

register_cost(["embedding", "gather", "index_select", "index", "_unsafe_index", "take", "_embedding_bag",
               "embedding_bag"],
              bytes=_bytes_gather)(_zero_flops)


def _scatter_add(src_name: str):
    def fn(call: Call, mode: str):
        src = call.get(src_name)
        return _ZERO, numel(src) if _is_shape(src) else _ZERO

    fn.__doc__ = "1 FLOP per source element (the accumulation)."
    return fn


register_cost(["scatter_add", "scatter_add_"], params=("self", "dim", "index", "src"))(_scatter_add("src"))
register_cost(["scatter_reduce", "scatter_reduce_"], params=("self", "dim", "index", "src", "reduce"))(_scatter_add("src"))
register_cost(["index_add", "index_add_"], params=("self", "dim", "index", "source", "alpha"))(_scatter_add("source"))
register_cost(["index_reduce", "index_reduce_"], params=("self", "dim", "index", "source", "reduce"))(_scatter_add("source"))


@register_cost(["index_put", "index_put_", "_index_put_impl", "_index_put_impl_"],
               params=("self", "indices", "values", "accumulate"))
def _index_put(call: Call, mode: str):
    """0 FLOPs, or 1 per value with accumulate=True."""
    if call.get("accumulate", False):
        vals = call.get("values")
        return _ZERO, numel(vals) if _is_shape(vals) else _ZERO
    return _ZERO, _ZERO


register_cost([
    "scatter", "scatter_", "index_copy", "index_copy_", "index_fill", "index_fill_", "masked_scatter", "masked_scatter_",
    "masked_select", "nonzero", "nonzero_static", "slice_scatter", "select_scatter", "diagonal_scatter",
    "as_strided_scatter", "cat", "concat", "concatenate", "stack", "hstack", "vstack", "clone", "contiguous",
    "_to_copy", "to", "copy", "copy_", "_copy_from", "_copy_from_and_resize", "type_as", "repeat",
    "repeat_interleave", "tile", "constant_pad_nd", "pad", "reflection_pad1d", "reflection_pad2d",
    "replication_pad1d", "replication_pad2d", "flip", "roll", "tril", "triu", "tril_", "triu_",
    "expand_copy", "permute_copy", "view_copy", "transpose_copy", "t_copy", "unsqueeze_copy", "squeeze_copy",
    "alias_copy", "slice_copy", "select_copy", "split_copy", "split_with_sizes_copy", "unbind_copy",
    "as_strided_copy", "detach_copy", "lift_fresh_copy", "pixel_shuffle", "pixel_unshuffle", "im2col", "col2im",
    "one_hot", "fill", "fill_", "zero_", "masked_fill_", "_unsafe_masked_index", "_unsafe_index_put",
])(_zero_flops)

register_cost([
    "zeros", "ones", "full", "arange", "linspace", "scalar_tensor", "zeros_like", "ones_like", "full_like",
    "new_zeros", "new_ones", "new_full", "rand", "randn", "randint", "rand_like", "randn_like", "randint_like",
    "randperm", "eye", "tensor", "lift_fresh",
], bytes=_bytes_write_only)(_zero_flops)

register_cost(["empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "empty_permuted",
               "resize_", "set_"], bytes=_bytes_zero)(_zero_flops)


@register_cost(["upsample_bilinear2d", "upsample_bicubic2d", "_upsample_bicubic2d_aa", "_upsample_bilinear2d_aa",
                "upsample_nearest1d", "upsample_nearest2d", "upsample_nearest3d", "upsample_linear1d",
                "upsample_trilinear3d", "_upsample_nearest_exact2d"])
def _upsample(call: Call, mode: str):
    """Interpolation: 4 FLOPs per output element (bilinear weights); nearest counted the same (upper bound)."""
    out = call.out
    return _ZERO, 4 * numel(out) if out is not None else _ZERO


@register_cost(["avg_pool1d", "avg_pool2d", "avg_pool3d", "max_pool1d", "max_pool2d", "max_pool3d",
                "max_pool2d_with_indices", "max_pool3d_with_indices", "adaptive_avg_pool1d",
                "adaptive_avg_pool2d", "_adaptive_avg_pool2d", "adaptive_avg_pool3d", "_adaptive_avg_pool3d",
                "adaptive_max_pool1d", "adaptive_max_pool2d"])
def _pool(call: Call, mode: str):
    """Pooling: 1 FLOP per input element (each input is read into about one window)."""
    return _ZERO, numel(call.arg(0))


# ---------------------------------------------------------------------------------------
# graphred custom ops (graphred/ops/tokens.py), keyed by name
# ---------------------------------------------------------------------------------------


@register_cost("graphred::attention_scores", params=("q", "k", "query_weight", "attn_bias", "scale"), matmul=True)
def _g_attention_scores(call: Call, mode: str):
    """q [B,H,Lq,D], k [B,Hk,Lk,D] -> [B,Lk]: 2*B*H*Lq*Lk*D for q k^T (H = query heads) plus 2*B*Lq*Lk
    for the query-weighted sum (a bmm); kind="all" adds (SOFTMAX_FLOPS + 2 [+1 bias]) per score
    (scale, softmax, head mean). Counts every query row: an upper bound, since the kernel skips
    query rows whose weight is 0 in every sample, or runs each sample's own weighted rows where fewer
    (:func:`graphred.ops.scored_rows`; FastV scores 1 row; the estimate reads the rows from the
    bookkeeping and counts what the kernel runs)."""
    q, k = call.get("q"), call.get("k")
    b, h, lq, d = (to_expr(x) for x in q)
    lk = to_expr(k[2])
    scores = b * h * lq * lk
    mm = 2 * scores * d + 2 * b * lq * lk
    other = scores * (SOFTMAX_FLOPS + 2 + (1 if call.get("attn_bias") is not None else 0))
    return mm, other


@register_cost("graphred::select_tokens", params=("scores", "candidates", "n_drop"))
def _g_select_tokens(call: Call, mode: str):
    """scores [B,L] -> [B,L-n_drop]: a sort, counted as comparisons B*L*ceil(log2(L)) (kind="all")."""
    b, l = call.get("scores")
    return _ZERO, to_expr(b) * to_expr(l) * _log2_ceil(l)


@register_cost("graphred::select_tokens_padded", params=("scores", "candidates", "n_drop", "length"))
def _g_select_tokens_padded(call: Call, mode: str):
    """scores [B,L] -> ([B,length], [B,length]): the same sort as select_tokens, B*L*ceil(log2(L)) (kind="all")."""
    b, l = call.get("scores")
    return _ZERO, to_expr(b) * to_expr(l) * _log2_ceil(l)


register_cost("graphred::gather_tokens", params=("x", "index", "dim"), bytes=_bytes_gather)(_zero_flops)


@register_cost("graphred::bipartite_match", params=("metric", "candidates", "r", "protected", "rank", "reorder"),
               matmul=True)
def _g_bipartite_match(call: Call, mode: str):
    """metric [B,L,C]: cosine similarity of set A (ceil(L/2) tokens) against set B (floor(L/2)) as a
    bmm, 2*B*ceil(L/2)*floor(L/2)*C; kind="all" adds the normalisation (3*B*L*C), the row max
    (B*|A|*|B|) and the sort of A (B*|A|*ceil(log2|A|)). Assumes every position is a candidate (an
    upper bound; the split is over the candidates at run time). r == 0 costs nothing."""
    b, l, c = (to_expr(x) for x in call.get("metric"))
    r = call.get("r")
    if r is not None and to_expr(r) == 0:
        return _ZERO, _ZERO
    na, nb = sympy.ceiling(l / 2), sympy.floor(l / 2)
    mm = 2 * b * na * nb * c
    other = 3 * b * l * c + b * na * nb + b * na * _log2_ceil(na)
    return mm, other


@register_cost("graphred::merge_tokens", params=("x", "sizes", "src", "dst"))
def _g_merge_tokens(call: Call, mode: str):
    """x [B,L,C...], src/dst [B,r]: size-weighted scatter-add, 3*B*r*C (multiply, add, divide per
    merged element; kind="all")."""
    x, src = call.get("x"), call.get("src")
    b, r = to_expr(src[0]), to_expr(src[1])
    return _ZERO, 3 * b * r * _prod(x[2:])


# ---------------------------------------------------------------------------------------
# Views and metadata: zero cost
# ---------------------------------------------------------------------------------------

_ZERO_COST_NAMES = (
    "view", "reshape", "_unsafe_view", "_reshape_alias", "expand", "expand_as", "permute", "transpose", "t",
    "unsqueeze", "squeeze", "slice", "select", "alias", "detach", "detach_", "flatten", "unflatten", "unbind",
    "split", "split_with_sizes", "tensor_split", "chunk", "narrow", "as_strided", "view_as", "reshape_as",
    "diagonal", "movedim", "moveaxis", "meshgrid", "broadcast_tensors", "swapaxes", "swapdims", "unfold", "view_as_real", "view_as_complex",
    "real", "imag", "conj", "resolve_conj", "resolve_neg", "numpy_T", "mT", "mH", "adjoint",
    "_assert_async", "_assert_scalar", "_assert_tensor_metadata", "_functional_assert_async",
    "_functional_assert_scalar", "_functional_sym_constrain_range", "_functional_sym_constrain_range_for_size",
    "_make_dep_token", "sym_constrain_range", "sym_constrain_range_for_size", "sym_size", "sym_numel",
    "sym_stride", "sym_storage_offset", "size", "stride", "dim", "numel", "is_contiguous", "is_same_size",
    "_local_scalar_dense", "item", "_nested_tensor_size", "_shape_as_tensor", "lift", "_assert_tensor_metadata",
    "_has_compatible_shallow_copy_type", "is_nonzero", "requires_grad_", "_set_grad_enabled",
)

#: Views, metadata and assertion ops (aten packets) plus ``operator.getitem``: 0 FLOPs, 0 bytes.
KNOWN_ZERO_COST: frozenset = frozenset(_packets(_ZERO_COST_NAMES) + [operator.getitem])

#: op names (outside aten) taken as ``aten._grouped_mm``: libraries' opaque fallbacks for it (a Python loop of
#: ``mm`` over the groups, registered as a custom op so that compilers do not trace the loop)
GROUPED_MM_NAMES = ("grouped_mm", "_grouped_mm", "grouped_mm_fallback")


def _grouped_mm_alias(key: str) -> OpCost | None:
    """The cost of ``aten._grouped_mm`` for a custom op ``"ns::name"`` whose name is one of :data:`GROUPED_MM_NAMES`
    (its operands are read as ``_grouped_mm``'s: input, weight, offs; other layouts fail as "formula failed")."""
    name = key.split("::", 1)[-1]
    if name not in GROUPED_MM_NAMES or not hasattr(aten, "_grouped_mm"):
        return None
    base = REGISTRY.get(op_key(aten._grouped_mm))
    if base is None:
        return None
    return OpCost(name=key, flop_fn=base.flop_fn, bytes_fn=base.bytes_fn, params=("self", "mat2", "offs"),
                  matmul=True, doc=base.doc)


def lookup(target: Any) -> OpCost | None:
    """The :class:`OpCost` of a call target (OpOverload, packet, ``"ns::name"``, python callable), or None.

    Views/metadata ops (:data:`KNOWN_ZERO_COST`) and python scalar arithmetic on symbolic sizes
    (``operator.mul``, ``torch.sym_max``, ...) give :data:`ZERO_COST`; an op without a formula gives None.

    >>> lookup(torch.ops.aten.view.default) is ZERO_COST, lookup(torch.ops.aten.lgamma.default)
    (True, None)
    """
    if isinstance(target, str):
        if "::" in target:
            ns, name = target.split("::", 1)
            if ns == "aten":
                target = getattr(aten, name.split(".")[0], None)
                if target is None:
                    return None
            else:
                return REGISTRY.get(f"{ns}::{name.split('.')[0]}") or _grouped_mm_alias(f"{ns}::{name.split('.')[0]}")
        else:
            target = getattr(aten, target, None)
            if target is None:
                return None
    key = op_key(target)
    cost = REGISTRY.get(key)
    if cost is not None:
        return cost
    if isinstance(key, str):
        alias = _grouped_mm_alias(key)
        if alias is not None:
            return alias
    if key in KNOWN_ZERO_COST:
        return ZERO_COST
    if isinstance(target, torch._ops.HigherOrderOperator) and target.name() == "flat_apply":
        # torch.export's wrapper for a traced Python call; in vmapped mask functions an index into a tensor
        # (ModIndex): a read, no arithmetic
        return ZERO_COST
    if isinstance(target, (torch._ops.OpOverload, torch._ops.OpOverloadPacket, torch._ops.HigherOrderOperator)):
        return None
    if callable(target):
        mod = getattr(target, "__module__", None) or ""
        name = getattr(target, "__name__", "")
        if mod in ("_operator", "operator", "math") or name.startswith("sym_") or (
            mod.startswith("torch.fx.experimental") and "sym" in mod
        ):
            return ZERO_COST
        if mod.startswith("torch._functorch"):  # vmap bookkeeping: levels, batch dims added/removed (views)
            return ZERO_COST
    return None


# ---------------------------------------------------------------------------------------
# Walking an FX graph
# ---------------------------------------------------------------------------------------


@dataclass
class NodeCost:
    """Cost of one graph node."""

    op: str
    flops: sympy.Expr
    bytes: sympy.Expr


class Uncounted(NamedTuple):
    """A node :func:`count_graph` could not cost: its name, op and why."""

    name: str
    op: str
    reason: str = "no cost formula"


@dataclass
class CostTotals:
    """Result of :func:`count_graph`: totals, per-node costs and the nodes left uncounted.

    ``flops`` and ``bytes`` are sympy expressions (``sympy.Integer`` on concrete shapes); any node
    in ``uncounted`` is missing from them, so a non-empty list means the totals are lower bounds.
    """

    flops: sympy.Expr
    bytes: sympy.Expr
    per_node: dict[str, NodeCost] = field(default_factory=dict)
    uncounted: list[Uncounted] = field(default_factory=list)
    kind: str = "all"
    mode: str = "full"

    @property
    def complete(self) -> bool:
        return not self.uncounted

    def by_op(self) -> dict[str, sympy.Expr]:
        """FLOPs summed per op name, largest first when concrete."""
        acc: dict[str, list] = {}
        for c in self.per_node.values():
            acc.setdefault(c.op, []).append(c.flops)
        out = {k: sympy.Add(*v) for k, v in acc.items()}
        try:
            return dict(sorted(out.items(), key=lambda kv: -int(kv[1])))
        except TypeError:
            return out

    def subs(self, values: Mapping) -> CostTotals:
        """The same totals with symbols substituted (``{n_img: 576}``)."""
        return CostTotals(
            flops=sympy.sympify(self.flops).subs(values),
            bytes=sympy.sympify(self.bytes).subs(values),
            per_node={k: NodeCost(c.op, c.flops.subs(values), c.bytes.subs(values)) for k, c in self.per_node.items()},
            uncounted=list(self.uncounted),
            kind=self.kind,
            mode=self.mode,
        )

    def __repr__(self) -> str:
        return (f"CostTotals(kind={self.kind!r}, mode={self.mode!r}, flops={self.flops}, bytes={self.bytes}, "
                f"nodes={len(self.per_node)}, uncounted={len(self.uncounted)})")


def _op_name(target: Any) -> str:
    if isinstance(target, torch._ops.OpOverload):
        return f"{target.namespace}.{target._opname}.{target._overloadname}"
    if isinstance(target, torch._ops.HigherOrderOperator):
        return f"higher_order.{target.name()}"
    return getattr(target, "__name__", str(target))


def _flatten_tensors(val: Any) -> list:
    if isinstance(val, torch.Tensor):
        return [val]
    if isinstance(val, (list, tuple)):
        out = []
        for v in val:
            out.extend(_flatten_tensors(v))
        return out
    return []


def _default_shape(node: fx.Node):
    v = node.meta.get("val")
    if isinstance(v, torch.Tensor):
        return tuple(to_expr(d) for d in v.shape)
    return None


def node_cost(
    node: fx.Node,
    shape_of: Callable[[fx.Node], Any] | None = None,
    *,
    kind: str = "all",
    mode: str = "full",
) -> NodeCost | Uncounted | None:
    """Cost of one ``call_function`` node from its arguments' shapes and ``meta['val']``.

    Returns a :class:`NodeCost`, an :class:`Uncounted` (no formula, or the formula failed), or None
    for nodes that are not calls (placeholders, outputs, get_attr).
    """
    _check_kind_mode(kind, mode)
    if node.op != "call_function":
        return None
    target = node.target
    name = _op_name(target)
    cost = lookup(target)
    if cost is None:
        return Uncounted(node.name, name)
    if cost is ZERO_COST:
        return NodeCost(name, _ZERO, _ZERO)

    in_shapes: list = []
    in_dtypes: list = []

    def shape_for(n: fx.Node):
        s = shape_of(n) if shape_of is not None else None
        if s is None:
            s = _default_shape(n)
        elif isinstance(s, list):  # several outputs: not an input shape on its own
            s = None
        return tuple(s) if s is not None else None

    def conv(a: Any) -> Any:
        if isinstance(a, fx.Node):
            v = a.meta.get("val")
            if isinstance(v, torch.Tensor):
                s = shape_for(a)
                in_shapes.append(s)
                in_dtypes.append(v.dtype)
                return s
            if isinstance(v, (torch.SymInt, int, bool)):
                return to_expr(v)
            if isinstance(v, (torch.SymFloat, float)):
                return v
            return v
        if isinstance(a, (list, tuple)):
            return type(a)(conv(x) for x in a)
        if isinstance(a, torch.SymInt):
            return to_expr(a)
        return a

    args = tuple(conv(a) for a in node.args)
    kwargs = {k: conv(v) for k, v in node.kwargs.items()}

    outs = _flatten_tensors(node.meta.get("val"))
    out_shapes = [tuple(to_expr(d) for d in t.shape) for t in outs]
    out_dtypes = [t.dtype for t in outs]
    if shape_of is not None:
        s = shape_of(node)
        if isinstance(s, list):
            out_shapes = [tuple(x) for x in s]
        elif s is not None and out_shapes:
            out_shapes = [tuple(s)] + out_shapes[1:]
    try:
        flops = cost.flops(in_shapes, out_shapes, args, kwargs, kind=kind, mode=mode)
        nbytes = cost.bytes(in_shapes, in_dtypes, out_shapes, out_dtypes, args, kwargs)
    except Exception as e:  # noqa: BLE001 - a formula that cannot read this call is reported, not zeroed
        return Uncounted(node.name, name, f"formula failed: {type(e).__name__}: {e}")
    return NodeCost(name, flops, nbytes)


# Higher-order ops that run their submodule exactly once.
RUN_ONCE_HOPS = {"wrap_with_set_grad_enabled", "wrap_with_autocast", "tag_activation_checkpoint", "wrap"}


def count_graph(
    gm: fx.GraphModule,
    shape_of: Callable[[fx.Node], Any] | None = None,
    kind: str = "all",
    mode: str = "full",
) -> CostTotals:
    """Sum FLOPs and bytes over every ``call_function`` node of ``gm`` (nodes need ``meta['val']``).

    ``shape_of(node)`` may return a shape (a tuple of ints / sympy expressions) to use instead of
    the node's concrete ``meta['val'].shape`` -- a list of shapes for nodes with several tensor
    outputs -- or None to keep the concrete one. Nodes without a formula are listed in
    ``uncounted`` (never counted as zero). Submodules of run-once higher-order ops
    (``wrap_with_set_grad_enabled``, ``wrap_with_autocast``) are counted as part of the graph,
    their nodes named ``"outer/inner"``. ``call_module`` nodes other than export's guard check are
    listed as uncounted too.

    >>> import torch
    >>> ep = torch.export.export(torch.nn.Linear(8, 4), (torch.randn(2, 8),))
    >>> count_graph(ep.module(), kind="matmul").flops
    128
    """
    _check_kind_mode(kind, mode)
    per_node: dict[str, NodeCost] = {}
    uncounted: list[Uncounted] = []
    _count_into(gm, shape_of, kind, mode, per_node, uncounted, prefix="")
    flops = sympy.Add(*[c.flops for c in per_node.values()]) if per_node else _ZERO
    nbytes = sympy.Add(*[c.bytes for c in per_node.values()]) if per_node else _ZERO
    return CostTotals(flops=flops, bytes=nbytes, per_node=per_node, uncounted=uncounted, kind=kind, mode=mode)


def walk_costable(gm: fx.GraphModule, prefix: str = "", parent: fx.Node | None = None):
    """``(qualified name, node, anchor)`` for every ``call_function`` and ``call_module`` node, with the
    bodies of run-once higher-order ops (``wrap_with_set_grad_enabled``, ...) inlined as ``"outer/inner"``;
    ``anchor`` is the outermost node (its module path groups the cost)."""
    for node in gm.graph.nodes:
        if node.op == "call_function" and isinstance(node.target, torch._ops.HigherOrderOperator) \
                and node.target.name() in RUN_ONCE_HOPS:
            subs = [getattr(gm, a.target, None) for a in node.args if isinstance(a, fx.Node) and a.op == "get_attr"]
            subs = [s for s in subs if isinstance(s, fx.GraphModule)]
            if len(subs) == 1:
                yield from walk_costable(subs[0], prefix + node.name + "/", parent or node)
                continue
        if node.op in ("call_function", "call_module"):
            yield prefix + node.name, node, parent or node


def _count_into(gm, shape_of, kind, mode, per_node, uncounted, prefix):
    for qual, node, _ in walk_costable(gm, prefix):
        if node.op == "call_module":
            if not str(node.target).startswith("_guards"):  # export's guard check costs nothing
                uncounted.append(Uncounted(qual, f"call_module {node.target}",
                                           "a module call, not an op: lower the graph to aten first"))
            continue
        r = node_cost(node, shape_of, kind=kind, mode=mode)
        if r is None:
            continue
        if isinstance(r, Uncounted):
            uncounted.append(r._replace(name=qual))
        else:
            per_node[qual] = r
