"""Token-axis and modality provenance: for every tensor in a captured graph, which dimensions
are token axes (and of which token *stream*), which is the batch axis, and which modality each
position of a stream holds.

A *stream* is one token sequence (a vision tower's patches, a decoder's mixed sequence, a text
encoder's tokens). Streams are born where the graph shows tokens entering:

* an ``embedding`` whose indices come straight from an integer input (text tokens);
* a convolution over a floating input (image patches: its spatial positions, or its batch
  rows when the spatial extent is 1);
* a ``masked_scatter`` / ``index_put`` / ``where`` that writes image features into a stream
  (the new stream's layout is read from the mask at run time);
* a ``cat`` along a token axis (segments of the inputs; learned, input-free segments are
  special tokens: ``register`` in a mixed stream, else the stream's own modality);
* a ``slice`` / ``split`` of a stream (a child stream).

Token axes are tracked as ``(stream, flat_stride, length)``: the token index of the element at
row-major flat index ``f`` is ``(f // flat_stride) % length``. Reshapes keep flat indices, so
views, flattens and folded ``[B*L, C]`` layouts need no rule of their own. Every other op is
handled by a rule below; an op without a rule that receives token axes is reported by name
and module path, and propagation stops there on that path (never a silent guess).

Nothing here names a model or a config attribute: all of it is read from the graph.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any, Iterable

import sympy
import torch
import torch.fx as fx

from ..fx_utils import (
    arg_nodes, aten_packets, flat_inputs, is_pointwise, module_path, node_dtype, node_shape, op_name, original_shape, op_packet, size_hint,
)
from ..errors import AnalysisError
from ..passes.infra import Analysis
from .attention import find_attention
from .op_tables import (  # noqa: F401  (CLASS_INDEX_LOSSES, LOSSES, loss_target_dims: importable from here too)
    CLASS_INDEX_LOSSES, CONV, CREATION, IDENTITY, LOSSES, REDUCTIONS, RESHAPES, SDPA, SILENT, loss_target_dims,
)

aten = torch.ops.aten

TEXT, IMAGE, REGISTER = "text", "image", "register"
MODALITIES = (TEXT, IMAGE, REGISTER)
CODE = {TEXT: 0, IMAGE: 1, REGISTER: 2}
NAME = {v: k for k, v in CODE.items()}
BATCH, TOKENS = "batch", "tokens"
# placeholder meta key: ``(dim, modality)`` -- the input is a token stream of one modality along
# ``dim``, as another graph's analysis found (set by the torch.compile backend across graph breaks)
INPUT_TOKENS = "graphred_input_tokens"


# ----------------------------------------------------------------------------- data model
@dataclass(frozen=True)
class TokAxis:
    """A token (or batch) axis of a tensor in flat-index form."""

    stream: int
    stride: int
    length: int


@dataclass
class Stream:
    """One token sequence of the graph.

    ``recipe`` says how its modality layout is computed from graph values:
    ``("uniform", code)``, ``("mask", base_stream, mask_node, token_dim, code)``,
    ``("index_put", base_stream, self_node, index_nodes, code)``, ``("cat", [(stream|code, length)...])``,
    ``("slice", parent, start, end, step)``, ``("gather", parent, index_node, dim)`` (rows of the parent picked by
    an index: ``gather``, ``index_select``, ``x[:, idx]``).
    """

    id: int
    kind: str  # TOKENS or BATCH
    length: int
    origin: str  # node name
    rule: str
    recipe: tuple
    parents: tuple[int, ...] = ()
    codes: torch.Tensor | None = None  # [B or 1, length] int8 modality codes at the example inputs
    special: torch.Tensor | None = None  # [length] bool: learned (input-free) tokens, e.g. a class token
    sym_length: Any = None
    symbols: dict = field(default_factory=dict)  # modality -> symbol: its count is symbol + offsets[modality]
    offsets: dict = field(default_factory=dict)

    def modalities(self) -> set[str]:
        if self.codes is None:
            return set()
        return {NAME[int(c)] for c in torch.unique(self.codes).tolist() if int(c) in NAME}

    def counts(self) -> list[dict[str, int]]:
        """Tokens per modality, per sample."""
        if self.codes is None:
            return []
        out = []
        for row in self.codes:
            out.append({NAME[c]: int((row == c).sum()) for c in sorted(NAME) if int((row == c).sum())})
        return out


@dataclass
class TokenInfo:
    """What the analysis knows about one tensor."""

    axes: tuple[TokAxis, ...] = ()
    taint: frozenset = frozenset()  # modalities whose data flows into this tensor
    direct_ids: bool = False  # values copied from an integer graph input (token ids)
    learned: bool = False  # computed from parameters/constants only (no graph input)
    raw: bool = False  # values of a floating graph input, only reshaped, cast or scaled (features not yet projected)


@dataclass
class UnknownOp:
    node: str
    op: str
    module_path: str

    def __str__(self) -> str:
        return f"{self.op} at {self.module_path or '<top>'} (node {self.node})"


# ----------------------------------------------------------------------------- shape helpers
def _suffix(shape: tuple[int, ...], d: int) -> int:
    p = 1
    for s in shape[d + 1 :]:
        p *= int(s)
    return p


def locate(ax: TokAxis, shape: tuple[int, ...]) -> tuple[int, int, int] | None:
    """Dims ``(lo, hi, inner)`` that axis ``ax`` occupies in a tensor of ``shape``: the token index
    is spread over dims lo..hi, with ``inner`` the sub-stride inside dim hi. None if it does not fit."""
    shape = tuple(int(s) for s in shape)
    if not shape:
        return None
    hi = None
    for d in range(len(shape) - 1, -1, -1):
        suf = _suffix(shape, d)
        if suf <= ax.stride < suf * shape[d] and ax.stride % suf == 0:
            hi = d
            break
    if hi is None:
        return None
    inner = ax.stride // _suffix(shape, hi)
    top = ax.stride * ax.length
    lo = hi
    while _suffix(shape, lo) * shape[lo] < top:
        lo -= 1
        if lo < 0:
            return None
    if (_suffix(shape, lo) * shape[lo]) % top != 0 and lo != hi:
        return None
    if lo == hi and (shape[hi] * _suffix(shape, hi)) % top != 0:
        return None
    return lo, hi, inner


def axis_dim(ax: TokAxis, shape) -> int | None:
    """The single dim that holds exactly this axis (size == length), else None."""
    loc = locate(ax, shape)
    if loc is None:
        return None
    lo, hi, inner = loc
    if lo == hi and inner == 1 and int(shape[hi]) == ax.length:
        return hi
    return None


def relocate(axes: Iterable[TokAxis], in_shape, out_shape, dim_map: dict[int, int]) -> list[TokAxis]:
    """Carry axes from a tensor of ``in_shape`` to one of ``out_shape`` where input dim i became
    output dim ``dim_map[i]`` (same size). Axes over an unmapped or re-ordered dim are dropped."""
    out = []
    for ax in axes:
        loc = locate(ax, in_shape)
        if loc is None:
            continue
        lo, hi, inner = loc
        dims = list(range(lo, hi + 1))
        if not all(d in dim_map for d in dims):
            continue
        od = [dim_map[d] for d in dims]
        if od != list(range(od[0], od[0] + len(od))):
            continue
        if any(int(in_shape[d]) != int(out_shape[o]) for d, o in zip(dims, od)):
            continue
        out.append(TokAxis(ax.stream, inner * _suffix(tuple(int(s) for s in out_shape), od[-1]), ax.length))
    return out


_MASK_VIEWS = {aten.expand, aten.expand_as, aten.unsqueeze, aten.squeeze, aten.view, aten.reshape, aten._to_copy,
               aten.to, aten.clone, aten.alias, aten.contiguous}


def _mask_root(m):
    """The tensor a mask is a view, broadcast or cast of (the same positions)."""
    for _ in range(32):
        if not isinstance(m, fx.Node) or m.op != "call_function" or op_packet(m) not in _MASK_VIEWS or not m.args:
            return m
        m = m.args[0]
    return m


def _columns_of(u: fx.Node, x: fx.Node) -> bool:
    """``u`` reads columns of ``x`` on its last dim (``x[..., a:b]``, ``x[..., i]``)."""
    xs = node_shape(x)
    if u.op != "call_function" or op_packet(u) not in (aten.slice, aten.select) or not xs or u.args[0] is not x:
        return False
    dim = u.args[1] if len(u.args) > 1 else 0
    return isinstance(dim, int) and dim % len(xs) == len(xs) - 1


# ----------------------------------------------------------------------------- the analysis
class TokenProvenance:
    """Run the provenance analysis over ``gm`` (read-only).

    >>> import graphred
    >>> model, inputs = graphred.zoo.load(graphred.zoo.TEST_NAMES[0])  # a decoder VLM
    >>> prov = TokenProvenance(graphred.capture(model, **inputs).graph_module)
    >>> sorted(prov.streams_with(graphred.analysis.provenance.IMAGE))  # doctest: +SKIP
    """

    name = "token_provenance"

    def __init__(self, gm: fx.GraphModule, example_inputs: tuple[tuple, dict] | None = None,
                 value_inputs: tuple[tuple, dict] | None = None):
        self.gm = gm
        self.info: dict[fx.Node, Any] = {}
        self.streams: list[Stream] = []
        self._parent: list[int] = []  # union-find over stream ids
        self.unknown: list[UnknownOp] = []
        self._value_nodes: set[fx.Node] = set()
        self.batch_size: int | None = None
        self._run()
        for a in find_attention(gm):  # the masks of every attention: their values tell causality
            if isinstance(a.get("mask"), fx.Node):
                self._value_nodes.add(a["mask"])
        # values of the masks come from the inputs' bookkeeping only (CPU copies for a meta program)
        self.values: dict[fx.Node, Any] = self._evaluate(value_inputs or example_inputs) if (value_inputs or example_inputs) else {}
        self._layouts()
        self._symbolize()

    # ---- union-find over streams
    def find(self, sid: int) -> int:
        while self._parent[sid] != sid:
            self._parent[sid] = self._parent[self._parent[sid]]
            sid = self._parent[sid]
        return sid

    def stream(self, sid: int) -> Stream:
        return self.streams[self.find(sid)]

    def _new_stream(self, kind, length, node, rule, recipe, parents=()) -> int:
        if rule in ("tiles", "padded"):  # the same fold (padding) of the same stream is the same stream
            key = (rule, self.find(recipe[1]), recipe[2])
            for st in self.streams:
                if st.rule == rule and (st.rule, self.find(st.recipe[1]), st.recipe[2]) == key:
                    return self.find(st.id)
        if rule == "slice":  # the same range of the same stream is the same stream (q, k, v split alike)
            key = (self.find(recipe[1]),) + tuple(recipe[2:])
            for st in self.streams:
                if st.rule == "slice" and (self.find(st.recipe[1]),) + tuple(st.recipe[2:]) == key:
                    return self.find(st.id)
        sid = len(self.streams)
        self.streams.append(Stream(sid, kind, int(length), node.name, rule, recipe, tuple(parents)))
        self._parent.append(sid)
        return sid

    def _union(self, a: int, b: int) -> int:
        a, b = self.find(a), self.find(b)
        if a == b:
            return a
        sa, sb = self.streams[a], self.streams[b]
        if (sa.kind == BATCH) != (sb.kind == BATCH):
            # the batch axis met by a token axis of the same length at the same place (rows of a rank-2 float input,
            # taken for patches, added to per-sample values: a robot state, one row per sample): those rows are the
            # samples. The batch stays the batch; the streams are not merged (merged, every input's batch dim would
            # read as tokens of that stream)
            return a if sa.kind == BATCH else b
        if self._gathered(sa) != self._gathered(sb):
            # rows gathered from one sequence and met (added) with another at the same positions: the positions are
            # the other sequence's tokens, the gathered rows features added to them
            keep, drop = (b, a) if self._gathered(sa) else (a, b)
            self._parent[drop] = keep
            return keep
        # keep the more derived stream (a mixed layout beats a uniform one; later beats earlier)
        keep, drop = (a, b) if (sa.rule != "embedding" and sb.rule == "embedding") or (a > b and not (sb.rule != "embedding" and sa.rule == "embedding")) else (b, a)
        self._parent[drop] = keep
        return keep

    def _gathered(self, st: Stream) -> bool:
        """Rows gathered by an index (then perhaps written into: ``index_put``, ``masked_scatter``)."""
        for _ in range(len(self.streams)):
            if st.rule == "gather":
                return True
            if st.recipe[0] not in ("index_put", "mask"):
                return False
            st = self.streams[st.recipe[1]]
        return False

    # ---- accessors
    def tokens(self, node) -> TokenInfo:
        i = self.info.get(node)
        return i if isinstance(i, TokenInfo) else TokenInfo()

    def axes(self, node, kind: str = TOKENS) -> list[tuple[int, Stream]]:
        """``[(dim, stream)]`` for every axis of ``node`` that occupies a whole dim."""
        shape = original_shape(node)
        out = []
        if shape is None:
            return out
        for ax in self.tokens(node).axes:
            s = self.stream(ax.stream)
            if s.kind != kind:
                continue
            d = axis_dim(TokAxis(s.id, ax.stride, ax.length), shape)
            if d is not None:
                out.append((d, s))
        return out

    def token_dim(self, node, stream: Stream | None = None) -> int | None:
        for d, s in self.axes(node):
            if stream is None or s.id == stream.id:
                return d
        return None

    def streams_with(self, modality: str) -> list[int]:
        return [s.id for s in self.streams if self.find(s.id) == s.id and s.kind == TOKENS and modality in s.modalities()]

    def canonical_streams(self, kind: str = TOKENS) -> list[Stream]:
        return [s for s in self.streams if self.find(s.id) == s.id and s.kind == kind]

    # ---- propagation
    def _run(self) -> None:
        self._attention_at = {a["out"]: a for a in find_attention(self.gm)}
        for node in self.gm.graph.nodes:
            try:
                self.info[node] = self._visit(node)
                self._write_through_views(node)
                if node in self._attention_at:
                    self.info[node] = self._learned_queries(node, self._attention_at[node], self.info[node])
            except Exception as e:  # a rule that cannot apply is reported, never guessed
                self._unknown(node, f"{op_name(node)} ({type(e).__name__}: {e})")
                self.info[node] = TokenInfo()

    _VIEWS = aten_packets("slice", "alias", "select")

    def _write_through_views(self, node) -> None:
        """An in-place write (``copy_``, ``fill_``, ``add_``...: the op's first argument is written) into a view
        of a tensor (``buf[..., :8].copy_(k)``, a buffer filled in parts: ``new_empty`` then slice copies)
        changes what the tensor holds for the nodes that read it later: the written value's token axes are
        carried back through the views (``slice``, ``alias``, ``select``) to the base, where the view keeps
        the axis' dims whole, and its taint joins the base's. (``index_put_`` is its own rule.)"""
        tgt = node.target
        if node.op != "call_function" or not isinstance(tgt, torch._ops.OpOverload) \
                or tgt.overloadpacket is aten.index_put_ or not node.args or not isinstance(node.args[0], fx.Node):
            return
        args = tgt._schema.arguments
        if not args or args[0].alias_info is None or not args[0].alias_info.is_write:
            return
        written = self.info.get(node)
        if not isinstance(written, TokenInfo):
            return
        axes, cur = list(written.axes), node.args[0]
        shape = node_shape(node) or node_shape(cur)
        while True:
            if shape is None:
                return
            if cur.op != "call_function" or op_packet(cur) not in self._VIEWS or not isinstance(cur.args[0], fx.Node):
                break
            base = cur.args[0]
            bs = node_shape(base)
            if bs is None:
                return
            if op_packet(cur) is aten.select:
                d = cur.args[1] % len(bs)
                dm = {i: i if i < d else i + 1 for i in range(len(shape))}
            else:
                dm = {i: i for i in range(len(shape))}
            axes = relocate(axes, shape, bs, dm)  # (an axis over a dim the view cuts is dropped)
            cur, shape = base, bs
        old = self.info.get(cur)
        if not isinstance(old, TokenInfo) or (not axes and written.taint <= old.taint):
            return
        merged = tuple(old.axes) + tuple(a for a in axes if a not in old.axes)
        self.info[cur] = TokenInfo(merged, old.taint | written.taint, False, old.learned and written.learned)

    def _unknown(self, node, label=None):
        self.unknown.append(UnknownOp(node.name, label or op_name(node), module_path(node)))

    def _in(self, a) -> TokenInfo:
        return self.tokens(a) if isinstance(a, fx.Node) else TokenInfo(learned=True)

    def _taint(self, *args) -> frozenset:
        t = frozenset()
        for a in arg_nodes(args):
            t |= self.tokens(a).taint
        return t

    def _learned(self, args) -> bool:
        # sizes (SymInt nodes) say nothing about where values come from
        return all(self.tokens(a).learned for a in arg_nodes(args) if isinstance(a.meta.get("val"), torch.Tensor)
                   or a.op != "call_function")

    def _visit(self, node: fx.Node):
        if node.op == "placeholder":
            return self._placeholder(node)
        if node.op == "get_attr":
            return TokenInfo(learned=True)
        if node.op == "output":
            return None
        if node.op != "call_function":
            return TokenInfo(taint=self._taint(node.args, node.kwargs))
        tgt = node.target
        if tgt is operator.getitem:
            src = self.info.get(node.args[0])
            if isinstance(src, (list, tuple)):
                return src[node.args[1]] if node.args[1] < len(src) else TokenInfo()
            return TokenInfo(taint=self._taint(node.args[0]))
        if not isinstance(tgt, torch._ops.OpOverload):
            # python-level symbolic arithmetic (sym_ite, operator.*), set_grad wrappers, graphred ops
            if getattr(tgt, "__module__", "") in ("_operator", "operator", "torch") or "sym" in str(tgt):
                return TokenInfo()
            return self._opaque(node)
        pk = tgt.overloadpacket
        taint = self._taint(node.args, node.kwargs)
        learned = self._learned((node.args, node.kwargs))
        shape = node_shape(node)
        if pk in SILENT:
            return TokenInfo()
        if pk in CREATION:
            return TokenInfo(learned=True)
        if pk in RESHAPES:
            src = self._in(node.args[0])
            return TokenInfo(self._tiles(node, self._fit(src.axes, shape), shape), taint, src.direct_ids, learned,
                             raw=src.raw)
        if pk in (aten.permute, aten.transpose, aten.t, aten.movedim, aten.swapaxes, aten.swapdims):
            return self._permute(node, taint, learned)
        if pk in (aten.expand, aten.expand_as, aten.broadcast_to):
            return self._broadcast(node, [node.args[0]], taint, learned)
        if pk is aten.embedding:
            return self._embedding(node, taint, learned)
        if pk in CONV:
            return self._conv(node, taint, learned)
        if pk is aten.masked_scatter:
            return self._scatter(node, "mask", node.args[1], node.args[2], taint)
        if pk in (aten.index_put, aten.index_put_):
            return self._index_put(node, taint)
        if pk in (aten.copy, aten.copy_):  # dst's positions with src's values (src broadcast to dst)
            return self._broadcast(node, [a for a in node.args[:2] if isinstance(a, fx.Node)], taint, learned)
        if pk is aten.where and len(node.args) == 3:
            return self._where(node, taint, learned)
        if pk is aten.masked_fill and len(node.args) >= 3 and isinstance(node.args[0], fx.Node) and \
                self._in(node.args[0]).direct_ids and (not isinstance(node.args[2], fx.Node)
                                                       or self.tokens(node.args[2]).learned):
            # a constant written into input ids (placeholder ids replaced by the pad id before the lookup,
            # ``ids.masked_fill(ids == image_id, 0)``): still the input's ids, as for ``where`` and ``index_put``
            base = self._in(node.args[0])
            return TokenInfo(base.axes, taint, True, base.learned)
        if pk in (aten.cat, aten.concat, aten.concatenate):
            return self._cat(node, taint, learned)
        if pk is aten.stack:
            return self._stack(node, taint, learned)
        if pk in (aten.slice,):
            return self._slice(node, taint, learned)
        if pk in (aten.pad, aten.constant_pad_nd):
            return self._pad(node, taint, learned)
        if pk in (aten.select,):
            return self._select(node, taint, learned)
        if pk in (aten.split, aten.split_with_sizes, aten.chunk, aten.unbind, aten.tensor_split):
            return self._split(node, taint, learned)
        if pk in SDPA:
            return self._sdpa(node, taint, learned)
        if pk is aten.index and len(node.args) == 2:
            return self._index(node, taint, learned)
        if pk in (aten.gather, aten.index_select) and len(node.args) >= 3 and isinstance(node.args[2], fx.Node):
            return self._gather(node, taint, learned)
        if pk is aten.repeat or (tgt == aten.repeat_interleave.self_int and len(node.args) > 2):
            return self._repeat(node, taint, learned)
        if pk in (aten.linear,):
            x = node.args[0]
            xs = node_shape(x)
            dm = {i: i for i in range(len(xs) - 1)}
            axes = relocate(self._in(x).axes, xs, shape, dm)
            return TokenInfo(tuple(self._projected_features(node, x, axes)), taint, False, learned)
        if pk in (aten.mm, aten.addmm, aten.bmm, aten.baddbmm, aten.matmul, aten.linalg_solve_triangular):
            return self._matmul(node, taint, learned)
        if pk in REDUCTIONS and not is_pointwise(node):  # (min.other, max.other: elementwise, two tensors)
            return self._reduce(node, taint, learned)
        if pk in LOSSES:
            return self._loss(node, taint, learned)
        if pk in IDENTITY or is_pointwise(node):
            if isinstance(node.meta.get("val"), (tuple, list)):
                first = self._broadcast_info(node, [node.args[0]], _shape_of_val(node.meta["val"][0]), taint, learned)
                return [first] + [TokenInfo(taint=taint, learned=learned)] * (len(node.meta["val"]) - 1)
            ins = [a for a in arg_nodes(node.args) if node_shape(a) is not None]
            return self._broadcast(node, ins, taint, learned)
        return self._opaque(node, taint, learned)

    def _opaque(self, node, taint=None, learned=False):
        taint = self._taint(node.args, node.kwargs) if taint is None else taint
        if any(self.stream(ax.stream).kind == TOKENS for a in arg_nodes((node.args, node.kwargs)) for ax in self.tokens(a).axes):
            self._unknown(node)
        v = node.meta.get("val")
        if isinstance(v, (tuple, list)):
            return [TokenInfo(taint=taint, learned=learned) for _ in v]
        return TokenInfo(taint=taint, learned=learned)

    # ---- rules
    def _placeholder(self, node) -> TokenInfo:
        shape, dt = node_shape(node), node_dtype(node)
        if shape is None:
            return TokenInfo()
        axes = []
        # dim 0 of a batched input is the batch axis (a rank-2 float input holds rows of patches)
        if len(shape) >= 2 and not (dt is not None and dt.is_floating_point and len(shape) == 2):
            if self._batch_stream is None:
                self._batch_stream = self._new_stream(BATCH, shape[0], node, "input", ("batch",))
                self.batch_size = shape[0]
            if shape[0] == self.streams[self._batch_stream].length:
                axes.append(TokAxis(self._batch_stream, _suffix(shape, 0), shape[0]))
        hint = node.meta.get(INPUT_TOKENS)  # (dim, modality): a stream handed over from another graph
        if hint is not None and 0 < hint[0] < len(shape) and hint[1] in CODE:
            d, modality = hint
            sid = self._new_stream(TOKENS, shape[d], node, "input", ("uniform", CODE[modality]))
            axes.append(TokAxis(sid, _suffix(shape, d), shape[d]))
            return TokenInfo(tuple(axes), frozenset({modality}))
        if dt is not None and dt.is_floating_point:
            return TokenInfo(tuple(axes), frozenset({IMAGE}), raw=True)
        if dt is not None and dt != torch.bool:
            return TokenInfo(tuple(axes), frozenset(), direct_ids=True)
        return TokenInfo(tuple(axes))

    _batch_stream: int | None = None

    def _fit(self, axes, shape) -> tuple[TokAxis, ...]:
        if shape is None:
            return ()
        return tuple(a for a in axes if locate(a, shape) is not None)

    def _permute(self, node, taint, learned):
        x = node.args[0]
        xs, shape = node_shape(x), node_shape(node)
        n = len(xs)
        pk = op_packet(node)
        if pk is aten.permute:
            perm = [p % n for p in node.args[1]]
        elif pk is aten.t:
            perm = [1, 0] if n == 2 else list(range(n))
        else:
            a, b = node.args[1] % n, node.args[2] % n
            perm = list(range(n))
            perm[a], perm[b] = perm[b], perm[a]
        dm = {src: dst for dst, src in enumerate(perm)}
        src = self._in(x)
        return TokenInfo(tuple(relocate(src.axes, xs, shape, dm)), taint, src.direct_ids, learned, raw=src.raw)

    def _broadcast_info(self, node, ins, shape, taint, learned) -> TokenInfo:
        if shape is None:
            return TokenInfo(taint=taint, learned=learned)
        R = len(shape)
        by_dim: dict[int, TokAxis] = {}
        extra: list[TokAxis] = []
        for a in ins:
            s = node_shape(a)
            if s is None:
                continue
            r = len(s)
            dm = {i: i + R - r for i in range(r) if i + R - r >= 0 and s[i] == shape[i + R - r]}
            for ax in relocate(self._in(a).axes, s, shape, dm):
                loc = locate(ax, shape)
                # keyed by dim and flat stride: a folded dim ([B*L, C]) holds two axes at different strides
                key = (loc[1], ax.stride) if loc else (-1, ax.stride)
                prev = by_dim.get(key)
                if prev is None:
                    by_dim[key] = ax
                elif prev != ax:
                    if prev.length == ax.length and prev.stride == ax.stride:
                        sid = self._union(prev.stream, ax.stream)
                        by_dim[key] = TokAxis(sid, ax.stride, ax.length)
                    else:
                        extra.append(ax)
        direct = all(self._in(a).direct_ids for a in ins) if ins else False
        data = [self._in(a) for a in ins if not self._in(a).learned]
        raw = bool(data) and all(i.raw for i in data)
        # (an axis of another length at the same place is a sub-axis: tiles folded into one token dim hold each
        # tile's tokens too)
        axes = tuple(by_dim.values()) + tuple(a for a in extra if locate(a, shape) is not None and all((locate(a, shape)[1], a.stride, a.length) != (locate(b, shape)[1], b.stride, b.length) for b in by_dim.values()))
        return TokenInfo(axes, taint, direct and op_packet(node) in IDENTITY | RESHAPES | aten_packets("expand"), learned,
                         raw=raw)

    def _broadcast(self, node, ins, taint, learned):
        return self._broadcast_info(node, ins, node_shape(node), taint, learned)

    def _embedding(self, node, taint, learned):
        w, ids = node.args[0], node.args[1]
        ids_info = self._in(ids)
        ishape, shape = node_shape(ids), node_shape(node)
        dm = {i: i for i in range(len(ishape))}
        axes = relocate(ids_info.axes, ishape, shape, dm)
        if not ids_info.direct_ids:
            # codes computed from the image (a VQ tokenizer's argmin) looked up in a table stay image-derived
            return TokenInfo(tuple(axes), self.tokens(w).taint | (ids_info.taint & {IMAGE}), False, ids_info.learned)
        # token ids straight from an input: their last dim enumerates text tokens
        has_tok = any(self.stream(a.stream).kind == TOKENS for a in axes)
        if not has_tok and len(ishape) >= 1:
            d = len(ishape) - 1
            if not (len(ishape) >= 2 or d > 0) and len(ishape) == 1:
                d = 0
            if not any(axis_dim(a, shape) == d for a in axes):
                sid = self._new_stream(TOKENS, shape[d], node, "embedding", ("uniform", CODE[TEXT]))
                axes.append(TokAxis(sid, _suffix(shape, d), shape[d]))
        # one id per sample (an aspect-ratio or class id looked up into a conditioning vector) is no text sequence
        seq = any(self.stream(a.stream).kind == TOKENS and a.length > 1 for a in axes)
        return TokenInfo(tuple(axes), taint | {TEXT} if seq else taint, False, False)

    def _projected_features(self, node, x, axes) -> list[TokAxis]:
        """A learned projection of a floating input's raw values (no convolution before it: region features,
        flattened patches) is where image tokens enter: its row dim is a new image stream. Rows are the dim
        before the features ([B, N, C] -> N), or each row of a [N, C] input without a batch dim."""
        xi = self._in(x)
        shape = node_shape(node)
        if not xi.raw or not shape or len(shape) < 2 or any(self.stream(a.stream).kind == TOKENS for a in axes):
            return axes
        w = node.args[1] if len(node.args) > 1 else None
        if not (isinstance(w, fx.Node) and self.tokens(w).learned):
            return axes
        # features feed their projection only: an input also read elsewhere (hidden states handed over from code
        # outside the graph, feeding a residual as well as q/k/v) is not a set of raw features
        n, prev = x, None
        while isinstance(n, fx.Node):
            users = [u for u in n.users if isinstance(u.meta.get("val"), torch.Tensor)]  # (not guards, asserts)
            # (other feature columns read apart, e.g. each patch's row and column ids stored in its first columns,
            # where this projection reads columns of its own)
            if prev is not None and _columns_of(prev, n):
                users = [u for u in users if u is prev or not _columns_of(u, n)]
            if len(users) != 1:
                return axes
            prev = n
            if n.op == "placeholder":
                break
            data = [a for a in n.all_input_nodes if not self.tokens(a).learned]
            if len(data) != 1:
                return axes
            n = data[0]
        d = len(shape) - 2
        if any(self.stream(a.stream).kind == BATCH and axis_dim(a, shape) == d for a in axes) or shape[d] < 2:
            return axes  # [B, C]: one feature vector per sample, not a sequence
        sid = self._new_stream(TOKENS, shape[d], node, "patches", ("uniform", CODE[IMAGE]))
        return list(axes) + [TokAxis(sid, _suffix(shape, d), shape[d])]

    def _learned_queries(self, node, att, info: TokenInfo) -> TokenInfo:
        """Learned queries (a resampler's latents, a query transformer's query tokens: computed from parameters only)
        that attend to image tokens come out as image tokens: their positions become a new image stream at
        the attention output. One learned query (an attention-pooling probe) pools, it makes no sequence."""
        q, k = att["q"], att["k"]
        qi, ki = self.tokens(q), self.tokens(k)
        shape = node_shape(node)
        if not qi.learned or not shape or len(shape) < 2 or shape[-2] < 2 or IMAGE not in ki.taint:
            return info
        ks = node_shape(k)
        if not any(self.stream(a.stream).kind == TOKENS and axis_dim(a, ks) == len(ks) - 2 for a in ki.axes):
            return info
        if any(self.stream(a.stream).kind == TOKENS for a in info.axes):
            return info
        d = len(shape) - 2
        axes = list(info.axes)
        for a in ki.axes:  # the batch of the keys
            st = self.stream(a.stream)
            if st.kind == BATCH and axis_dim(a, ks) == 0 and shape[0] == st.length:
                axes.append(TokAxis(st.id, _suffix(shape, 0), st.length))
        sid = self._new_stream(TOKENS, shape[d], node, "queries", ("uniform", CODE[IMAGE]))
        axes.append(TokAxis(sid, _suffix(shape, d), shape[d]))
        return TokenInfo(tuple(axes), info.taint | {IMAGE}, False, False)

    def _tiles(self, node, axes, shape) -> tuple[TokAxis, ...]:
        """A reshape that folds several copies of a token sequence into one dim (image tiles that ran through
        the vision tower as batch rows, concatenated into one sequence per image): the folded dim is a ``tiles``
        stream, the parent's tokens once per tile."""
        out = list(axes)
        if not shape:
            return tuple(out)
        for ax in axes:
            st = self.stream(ax.stream)
            loc = locate(ax, shape)
            if st.kind != TOKENS or loc is None or loc[0] != loc[1] or loc[2] != 1 or shape[loc[1]] == ax.length:
                continue
            d = loc[1]
            if shape[d] % ax.length or any(locate(o, shape) is not None and locate(o, shape)[1] == d and o != ax
                                           for o in axes):
                continue
            n = shape[d] // ax.length
            sid = self._new_stream(TOKENS, shape[d], node, "tiles", ("tiles", st.id, n), parents=(st.id,))
            out.append(TokAxis(sid, _suffix(shape, d), shape[d]))
        return tuple(out)

    def _pad(self, node, taint, learned):
        """Padding: other dims keep their axes; a token dim padded at its end only becomes a ``padded`` stream (the
        tokens, then the padding), as after a convolution's overhang."""
        x = node.args[0]
        xs, shape = node_shape(x), node_shape(node)
        pads = list(node.args[1])
        xi = self._in(x)
        padded = {len(xs) - 1 - i // 2 for i, p in enumerate(pads) if p}
        dm = {i: i for i in range(len(xs)) if i not in padded}
        axes = relocate(xi.axes, xs, shape, dm)
        for ax in xi.axes:
            st = self.stream(ax.stream)
            d = axis_dim(ax, xs)
            if d is None or d not in padded or st.kind != TOKENS:
                continue
            i = 2 * (len(xs) - 1 - d)
            if pads[i] != 0 or pads[i + 1] < 0:
                raise ValueError("padding before the tokens")
            sid = self._new_stream(TOKENS, shape[d], node, "padded", ("padded", st.id, xs[d]), parents=(st.id,))
            axes.append(TokAxis(sid, _suffix(shape, d), shape[d]))
        return TokenInfo(tuple(axes), taint, False, learned)

    def _conv_over_tokens(self, node, xi, xs, shape) -> TokAxis | None:
        """A 1-d convolution whose input holds a token axis along its spatial dim mixes neighbouring tokens and
        keeps them: output position ``i`` ends its window at input position ``i - pad + kernel - 1``. The same
        stream where the length is kept; a ``padded`` stream (the input's tokens, then the overhang) where the
        padding makes it longer (a causal conv, cut back to the input length by a slice afterwards)."""
        if len(xs) != 3 or len(shape) != 3:
            return None
        d = 2
        ax = next((a for a in xi.axes if self.stream(a.stream).kind == TOKENS and axis_dim(a, xs) == d), None)
        if ax is None:
            return None
        w = node.args[1]
        k = node_shape(w)[-1] if isinstance(w, fx.Node) and node_shape(w) else None
        args = list(node.args) + [None] * 7
        stride, padding, dilation = args[3] or [1], args[4] or [0], args[5] or [1]
        stride, padding, dilation = [v[0] if isinstance(v, (list, tuple)) else v for v in (stride, padding, dilation)]
        if k is None or stride != 1 or dilation != 1 or not isinstance(padding, int):
            return None
        if shape[d] == xs[d]:
            return TokAxis(ax.stream, 1, ax.length)
        shift = k - 1 - padding  # output i <-> input i + shift
        if shift != 0 or shape[d] < xs[d]:
            return None
        sid = self._new_stream(TOKENS, shape[d], node, "padded", ("padded", self.stream(ax.stream).id, xs[d]),
                               parents=(ax.stream,))
        return TokAxis(sid, 1, shape[d])

    def _conv(self, node, taint, learned):
        x = node.args[0]
        xs, shape = node_shape(x), node_shape(node)
        xi = self._in(x)
        axes = relocate(xi.axes, xs, shape, {0: 0})
        seq = self._conv_over_tokens(node, xi, xs, shape)
        if seq is not None:  # a convolution along a token sequence (a causal/short conv layer of a decoder)
            return TokenInfo(tuple(axes) + (seq,), taint, False, learned)
        tok = [a for a in axes if self.stream(a.stream).kind == TOKENS]
        # (a patch embedding reads pixels: where text has flowed in, the tokens are a sequence whose axis was lost
        # upstream, e.g. through an expert router, and the convolution is a token mixer, not a new image stream)
        if not tok and IMAGE in taint and TEXT not in taint and len(shape) >= 3:
            spatial = 1
            for s in shape[2:]:
                spatial *= s
            if spatial > 1:
                sid = self._new_stream(TOKENS, spatial, node, "patches", ("uniform", CODE[IMAGE]))
                axes.append(TokAxis(sid, 1, spatial))
            elif not any(self.stream(a.stream).kind == BATCH for a in axes) and shape[0] > 1:
                # spatial extent 1: each batch row of the convolution is one patch
                sid = self._new_stream(TOKENS, shape[0], node, "patches", ("uniform", CODE[IMAGE]))
                axes = [TokAxis(sid, _suffix(shape, 0), shape[0])]
        return TokenInfo(tuple(axes), taint, False, learned)

    def _scatter(self, node, kind, mask, source, taint):
        src_taint = self.tokens(source).taint if isinstance(source, fx.Node) else frozenset()
        code = CODE[IMAGE] if IMAGE in src_taint else CODE[REGISTER] if not src_taint else CODE[TEXT]
        return self._write_into_stream(node, "scatter", lambda st, d: ("mask", st.id, mask, d, code), [mask], taint)

    def _index_put(self, node, taint):
        indices, values = node.args[1], node.args[2]
        vt = self.tokens(values).taint if isinstance(values, fx.Node) else frozenset()
        base = self._in(node.args[0])
        if base.direct_ids and (not isinstance(values, fx.Node) or self.tokens(values).learned):
            # a constant written into input ids (out-of-table ids zeroed for a second table): still the input's ids
            return TokenInfo(base.axes, taint, True, base.learned)
        code = CODE[IMAGE] if IMAGE in vt else CODE[TEXT]
        return self._write_into_stream(node, "index_put", lambda st, d: ("index_put", st.id, tuple(indices), d, code),
                                       [ix for ix in indices if isinstance(ix, fx.Node)], taint)

    def _write_into_stream(self, node, rule, recipe, value_nodes, taint):
        """Values written into a token stream at run-time positions (``masked_scatter``, ``index_put``):
        a new stream whose layout is read from ``value_nodes`` (the mask or indices)."""
        shape = node_shape(node)
        axes = list(self._in(node.args[0]).axes)
        for i, ax in enumerate(axes):
            st = self.stream(ax.stream)
            d = axis_dim(ax, shape)
            if st.kind != TOKENS or d is None:
                continue
            rec = recipe(st, d)
            if rec[0] == "mask" and st.recipe[0] == "mask" and tuple(rec[3:]) == tuple(st.recipe[3:]) and \
                    _mask_root(rec[2]) is _mask_root(st.recipe[2]):
                # the same code written again at the positions of the same mask (features added at the image
                # positions before a later layer): the layout is unchanged, the same sequence goes on
                break
            sid = self._new_stream(TOKENS, ax.length, node, rule, rec, parents=(st.id,))
            self._value_nodes.update(value_nodes)
            axes[i] = TokAxis(sid, ax.stride, ax.length)
            break
        return TokenInfo(tuple(axes), taint, False, False)

    def _where(self, node, taint, learned):
        cond, a, b = node.args
        info = self._broadcast(node, [x for x in (cond, a, b) if isinstance(x, fx.Node)], taint, learned)
        ids = [x for x in (a, b) if isinstance(x, fx.Node) and self._in(x).direct_ids]
        other = b if ids and ids[0] is a else a
        if len(ids) == 1 and (not isinstance(other, fx.Node) or self.tokens(other).learned):
            # a constant selected into input ids (placeholder ids replaced by the pad id before the lookup, as
            # ``index_put`` does it in place): still the input's ids
            return TokenInfo(info.axes, taint, True, info.learned)
        ta = self.tokens(a).taint if isinstance(a, fx.Node) else frozenset()
        tb = self.tokens(b).taint if isinstance(b, fx.Node) else frozenset()
        # image features selected into a text stream by a mask: a modality source
        if IMAGE in ta and TEXT in tb and IMAGE not in tb:
            shape = node_shape(node)
            for i, ax in enumerate(info.axes):
                st = self.stream(ax.stream)
                d = axis_dim(ax, shape)
                if st.kind == TOKENS and d is not None and st.modalities() <= {TEXT}:
                    sid = self._new_stream(TOKENS, ax.length, node, "scatter", ("mask", st.id, cond, d, CODE[IMAGE]), parents=(st.id,))
                    self._value_nodes.add(cond)
                    axes = list(info.axes)
                    axes[i] = TokAxis(sid, ax.stride, ax.length)
                    return TokenInfo(tuple(axes), taint, False, False)
        return info

    def _cat(self, node, taint, learned):
        tensors = [t for t in node.args[0] if isinstance(t, fx.Node)]
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
        shape = node_shape(node)
        dim = dim % len(shape)
        # non-cat dims: like an elementwise op whose inputs all have the output's size there
        carried: dict[int, TokAxis] = {}
        segments = []
        any_tok = False
        for t in tensors:
            ts = node_shape(t)
            if ts is None or len(ts) != len(shape):
                continue
            dm = {i: i for i in range(len(ts)) if i != dim}
            for ax in relocate(self._in(t).axes, ts, shape, dm):
                key = locate(ax, shape)[1]
                if key in carried and carried[key].stream != ax.stream and carried[key].length == ax.length:
                    carried[key] = TokAxis(self._union(carried[key].stream, ax.stream), ax.stride, ax.length)
                else:
                    carried.setdefault(key, ax)
            seg = None
            for ax in self._in(t).axes:
                st = self.stream(ax.stream)
                if st.kind == TOKENS and axis_dim(ax, ts) == dim:
                    seg = st.id
                    any_tok = True
            segments.append((seg, ts[dim], t))
        for t in tensors:  # legacy cat accepts empty 1-d tensors (an empty cache): zero-length segments
            ts = node_shape(t)
            if ts is not None and len(ts) != len(shape) and 0 in ts:
                segments.append((None, 0, t))
        axes = list(carried.values())
        nonempty = [(seg, n) for seg, n, _ in segments if n > 0]
        if any_tok and len(nonempty) == 1 and nonempty[0][0] is not None:
            # an empty segment (e.g. an empty key/value cache before the first step): the same stream
            seg, n = nonempty[0]
            axes.append(TokAxis(seg, _suffix(shape, dim), n))
            return TokenInfo(tuple(axes), taint, False, learned)
        if any_tok:
            parts = []
            others = {c for s, _, _ in segments if s is not None for c in [s]}
            for seg, n, t in segments:
                if seg is not None:
                    parts.append((seg, n))
                else:
                    parts.append((("special", self.tokens(t).learned, self.tokens(t).taint), n))
            sid = self._new_stream(TOKENS, shape[dim], node, "cat", ("cat", tuple(parts)), parents=tuple(others))
            axes.append(TokAxis(sid, _suffix(shape, dim), shape[dim]))
        return TokenInfo(tuple(axes), taint, False, learned)

    def _stack(self, node, taint, learned):
        tensors = [t for t in node.args[0] if isinstance(t, fx.Node)]
        dim = node.args[1] if len(node.args) > 1 else 0
        shape = node_shape(node)
        dim = dim % len(shape)
        axes = []
        for t in tensors[:1]:
            ts = node_shape(t)
            dm = {i: (i if i < dim else i + 1) for i in range(len(ts))}
            axes = relocate(self._in(t).axes, ts, shape, dm)
        return TokenInfo(tuple(axes), taint, False, learned)

    def _slice(self, node, taint, learned):
        x = node.args[0]
        xs, shape = node_shape(x), node_shape(node)
        dim = (node.args[1] if len(node.args) > 1 else 0) % len(xs)
        start = node.args[2] if len(node.args) > 2 else 0
        step = node.args[4] if len(node.args) > 4 else 1
        xi = self._in(x)
        dm = {i: i for i in range(len(xs)) if i != dim}
        axes = relocate(xi.axes, xs, shape, dm)
        if xs[dim] == shape[dim]:
            axes += relocate([a for a in xi.axes if axis_dim(a, xs) == dim], xs, shape, {dim: dim})
            return TokenInfo(tuple(axes), taint, xi.direct_ids, learned, raw=xi.raw)
        if xi.raw and dim == len(xs) - 1:  # some feature columns of raw features: still raw features
            return TokenInfo(tuple(axes), taint, xi.direct_ids, learned, raw=True)
        for ax in xi.axes:
            st = self.stream(ax.stream)
            if axis_dim(ax, xs) == dim and st.rule == "padded" and _norm_index(start, xs[dim]) == 0 \
                    and shape[dim] == st.recipe[2] and step == 1:
                axes.append(TokAxis(self.find(st.recipe[1]), _suffix(shape, dim), shape[dim]))  # the overhang cut off
                continue
            if axis_dim(ax, xs) == dim and st.kind == TOKENS and shape[dim] > 0:
                s0 = _norm_index(start, xs[dim])
                e0 = s0 + (shape[dim] - 1) * int(step) + 1
                sid = self._new_stream(TOKENS, shape[dim], node, "slice", ("slice", st.id, s0, e0, int(step)), parents=(st.id,))
                axes.append(TokAxis(sid, _suffix(shape, dim), shape[dim]))
        return TokenInfo(tuple(axes), taint, xi.direct_ids, learned)

    def _select(self, node, taint, learned):
        x = node.args[0]
        xs, shape = node_shape(x), node_shape(node)
        dim = node.args[1] % len(xs)
        dm = {i: (i if i < dim else i - 1) for i in range(len(xs)) if i != dim}
        xi = self._in(x)
        return TokenInfo(tuple(relocate(xi.axes, xs, shape, dm)), taint, xi.direct_ids, learned)

    def _split(self, node, taint, learned):
        x = node.args[0]
        xs = node_shape(x)
        vals = node.meta.get("val")
        pk = op_packet(node)
        if pk is aten.unbind:
            dim = (node.args[1] if len(node.args) > 1 else 0) % len(xs)
        else:
            dim = (node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)) % len(xs)
        xi = self._in(x)
        outs = []
        offset = 0
        for v in vals:
            vs = _shape_of_val(v)
            if pk is aten.unbind:
                dm = {i: (i if i < dim else i - 1) for i in range(len(xs)) if i != dim}
                outs.append(TokenInfo(tuple(relocate(xi.axes, xs, vs, dm)), taint, xi.direct_ids, learned))
                continue
            dm = {i: i for i in range(len(xs)) if i != dim}
            axes = relocate(xi.axes, xs, vs, dm)
            for ax in xi.axes:
                st = self.stream(ax.stream)
                if axis_dim(ax, xs) == dim and st.kind == TOKENS and vs[dim] > 0:
                    if vs[dim] == xs[dim]:
                        axes += relocate([ax], xs, vs, {dim: dim})
                    else:
                        sid = self._new_stream(TOKENS, vs[dim], node, "slice", ("slice", st.id, offset, offset + vs[dim], 1), parents=(st.id,))
                        axes.append(TokAxis(sid, _suffix(vs, dim), vs[dim]))
            offset += vs[dim]
            outs.append(TokenInfo(tuple(axes), taint, xi.direct_ids, learned))
        return outs

    def _index(self, node, taint, learned):
        """Advanced indexing ``x[i0, i1, ...]``: indexed dims are consumed (a token axis there is a
        selection, e.g. pooling one token per sample); the others keep their axes."""
        x, indices = node.args
        xs, shape = node_shape(x), node_shape(node)
        idx = [i for i, t in enumerate(indices) if t is not None]
        if not idx or idx != list(range(idx[0], idx[-1] + 1)):
            return self._opaque(node, taint, learned)
        if len(idx) == 1 and isinstance(indices[idx[0]], fx.Node) and len(node_shape(indices[idx[0]]) or ()) == 1 \
                and node_dtype(indices[idx[0]]) not in (torch.bool, torch.uint8):
            # one integer index vector on one dim (``x[:, idx]``): index_select there, the rows it picks
            d = idx[0]
            axes = relocate(self._in(x).axes, xs, shape, {i: i for i in range(len(xs)) if i != d})
            return TokenInfo(tuple(axes + self._gathered_rows(node, x, d, indices[d])), taint, False, learned)
        n_out_idx = len(shape) - (len(xs) - len(idx))
        dm = {}
        for d in range(len(xs)):
            if d < idx[0]:
                dm[d] = d
            elif d > idx[-1]:
                dm[d] = d - len(idx) + n_out_idx
        return TokenInfo(tuple(relocate(self._in(x).axes, xs, shape, dm)), taint, False, learned)

    def _gather(self, node, taint, learned):
        """``gather(x, dim, index)`` / ``index_select(x, dim, index)``: along ``dim``, the rows of ``x`` that the
        index picks; a token axis of ``x`` there becomes a stream of the gathered rows, whose layout is the
        parent's at the index's values (e.g. image patches gathered at each word's box). The other dims keep
        ``x``'s axes where their sizes are kept, and ``gather`` adds the index's own axes there."""
        x, dim, index = node.args[:3]
        xs, shape, ixs = node_shape(x), node_shape(node), node_shape(index)
        if xs is None or shape is None or ixs is None:
            return self._opaque(node, taint, learned)
        dim %= len(xs)
        xi = self._in(x)
        others = {i: i for i in range(len(xs)) if i != dim and xs[i] == shape[i]}
        axes = relocate(xi.axes, xs, shape, others)
        if op_packet(node) is aten.gather:  # (the index's axes on the dims where x has none)
            taken = {axis_dim(a, shape) for a in axes}
            axes += [a for a in relocate(self._in(index).axes, ixs, shape, {i: i for i in range(len(ixs)) if i != dim})
                     if axis_dim(a, shape) not in taken]
        return TokenInfo(tuple(axes + self._gathered_rows(node, x, dim, index)), taint, False, learned)

    def _repeat(self, node, taint, learned):
        """``repeat(x, sizes)`` / ``repeat_interleave(x, r, dim)``: the dims that are not repeated keep their axes
        (a hidden state tiled on its features, heads repeated for grouped keys)."""
        x = node.args[0]
        xs, shape = node_shape(x), node_shape(node)
        if op_packet(node) is aten.repeat:
            lead = len(node.args[1]) - len(xs)
            dm = {i: i + lead for i in range(len(xs)) if node.args[1][i + lead] == 1}
        else:
            dim = node.args[2] % len(xs)
            dm = {i: i for i in range(len(xs)) if i != dim}
        xi = self._in(x)
        return TokenInfo(tuple(relocate(xi.axes, xs, shape, dm)), taint, xi.direct_ids, learned)

    def _gathered_rows(self, node, x, d, index) -> list[TokAxis]:
        """The axis of ``node`` at dim ``d`` where ``index`` picks rows of a token axis of ``x`` there: a stream
        of the gathered rows (layout from the index's values)."""
        xs, shape = node_shape(x), node_shape(node)
        out = []
        for ax in self._in(x).axes:
            st = self.stream(ax.stream)
            if axis_dim(ax, xs) == d and st.kind == TOKENS and shape[d] > 0:
                self._value_nodes.add(index)
                sid = self._new_stream(TOKENS, shape[d], node, "gather", ("gather", st.id, index, d), parents=(st.id,))
                out.append(TokAxis(sid, _suffix(shape, d), shape[d]))
        return out

    def _sdpa(self, node, taint, learned):
        mask = node.args[3] if len(node.args) > 3 else node.kwargs.get("attn_mask")
        if isinstance(mask, fx.Node):
            self._value_nodes.add(mask)
        q = node.args[0]
        qs = node_shape(q)
        v = node.meta.get("val")
        out_shape = _shape_of_val(v[0] if isinstance(v, (tuple, list)) else v)
        dm = {i: i for i in range(len(qs) - 1)}
        out = TokenInfo(tuple(relocate(self._in(q).axes, qs, out_shape, dm)), taint, False, learned)
        if isinstance(v, (tuple, list)):
            return [out] + [TokenInfo(taint=taint) for _ in v[1:]]
        return out

    def _matmul(self, node, taint, learned):
        pk = op_packet(node)
        args = node.args[1:] if pk in (aten.addmm, aten.baddbmm) else node.args
        a, b = args[0], args[1]
        if pk is aten.linalg_solve_triangular:  # X = A^-1 B (left) or B A^-1: a product with the inverse
            left = node.args[3] if len(node.args) > 3 else node.kwargs.get("left", True)
            a, b = (a, b) if left else (b, a)
        as_, bs, shape = node_shape(a), node_shape(b), node_shape(node)
        R = len(shape)
        axes = []
        if len(as_) >= 2:
            dma = {len(as_) - 2: R - 2}
            dma.update({i: i + R - len(as_) for i in range(len(as_) - 2) if as_[i] == shape[i + R - len(as_)]})
            axes += relocate(self._in(a).axes, as_, shape, dma)
        elif len(as_) == 1:
            pass
        if len(bs) >= 2:
            dmb = {len(bs) - 1: R - 1}
            dmb.update({i: i + R - len(bs) for i in range(len(bs) - 2) if bs[i] == shape[i + R - len(bs)]})
            for ax in relocate(self._in(b).axes, bs, shape, dmb):
                if all(locate(ax, shape)[1] != locate(o, shape)[1] for o in axes):
                    axes.append(ax)
        return TokenInfo(tuple(axes), taint, False, learned)

    def _reduce(self, node, taint, learned):
        x = node.args[0]
        xs, shape = node_shape(x), node_shape(node)
        if shape is None:
            return TokenInfo(taint=taint)
        dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        if dims is None or isinstance(dims, (bool,)):
            dims = list(range(len(xs))) if len(shape) < len(xs) or not shape else []
        if isinstance(dims, int):
            dims = [dims]
        dims = [d % len(xs) for d in dims] if xs else []
        keep = len(shape) == len(xs)
        dm, j = {}, 0
        for i in range(len(xs)):
            if i in dims:
                if keep:
                    j += 1
                continue
            dm[i] = j
            j += 1
        return TokenInfo(tuple(relocate(self._in(x).axes, xs, shape, dm)), taint, False, learned)

    def _loss(self, node, taint, learned):
        """A loss: reduced to a scalar, or per position (``reduction='none'``) on the input's non-class dims."""
        v = node.meta.get("val")
        outs = list(v) if isinstance(v, (tuple, list)) else [v]
        x = node.args[0]
        xs = node_shape(x)
        infos = []
        for o in outs:
            shape = tuple(o.shape) if isinstance(o, torch.Tensor) else None
            if not shape or xs is None:
                infos.append(TokenInfo(taint=taint, learned=learned))
                continue
            keep = [d for d in range(len(xs)) if not (op_packet(node) in CLASS_INDEX_LOSSES and d == 1)]
            dm = {d: i for i, d in enumerate(keep) if i < len(shape)} if len(shape) < len(xs) else {d: d for d in range(len(xs))}
            infos.append(TokenInfo(tuple(relocate(self._in(x).axes, xs, shape, dm)), taint, False, learned))
        return infos if isinstance(v, (tuple, list)) else infos[0]

    # ---- example values and layouts
    def _evaluate(self, inputs) -> dict:
        """Values of the mask nodes at ``inputs``, from their ancestors only (not the model's layers)."""
        if not self._value_nodes:
            return {}
        from .evaluate import partial_evaluate

        flat = flat_inputs(self.gm, *inputs)
        if flat is None or any(isinstance(t, torch.Tensor) and t.device.type == "meta" for t in flat):
            return {}
        vals = partial_evaluate(self.gm, flat, self._value_nodes)
        return {n: (v.detach() if isinstance(v, torch.Tensor) else v) for n, v in vals.items()}

    def _layouts(self) -> None:
        for st in self.streams:
            if st.kind != TOKENS:
                continue
            try:
                st.codes, st.special = self._codes(st)
            except Exception:
                st.codes, st.special = None, None

    def _codes(self, st: Stream):
        r = st.recipe
        if r[0] == "uniform":
            return torch.full((1, st.length), r[1], dtype=torch.int8), torch.zeros(st.length, dtype=torch.bool)
        if r[0] == "mask":
            _, base, mask, d, code = r
            bcodes, bspecial = self._parent_codes(base)
            m = self.values.get(mask)
            if m is None:
                return None, bspecial
            m = _reduce_to(m.to(torch.bool), d)
            codes = torch.where(m, torch.tensor(code, dtype=torch.int8), bcodes.expand(m.shape[0], -1))
            return codes, bspecial
        if r[0] == "index_put":
            _, base, indices, d, code = r
            bcodes, bspecial = self._parent_codes(base)
            origin = next(n for n in self.gm.graph.nodes if n.name == st.origin)
            marker = torch.zeros(node_shape(origin), dtype=torch.bool)
            idx = [self.values.get(i) if isinstance(i, fx.Node) else None for i in indices]
            if any(isinstance(i, fx.Node) and v is None for i, v in zip(indices, idx)):
                return None, bspecial
            marker = marker.index_put(tuple(idx), torch.tensor(True))
            m = _reduce_to(marker, d)
            return torch.where(m, torch.tensor(code, dtype=torch.int8), bcodes.expand(m.shape[0], -1)), bspecial
        if r[0] == "cat":
            parts = r[1]
            real = [self._parent_codes(p) for p, _ in parts if isinstance(p, int)]
            mods = set()
            for c, _ in real:
                mods |= set(torch.unique(c).tolist())
            rows = max([c.shape[0] for c, _ in real] + [1])
            out, spec = [], []
            for p, n in parts:
                if isinstance(p, int):
                    c, s = self._parent_codes(p)
                    out.append(c.expand(rows, -1))
                    spec.append(s)
                else:
                    _, learned, taint = p
                    data = taint & {IMAGE, TEXT}
                    if not learned and len(data) == 1:
                        # input-derived tokens whose stream was lost upstream: their data says what they are
                        code, special = CODE[next(iter(data))], False
                    else:
                        code = next(iter(mods)) if len(mods) == 1 else CODE[REGISTER]
                        special = True
                    out.append(torch.full((rows, n), code, dtype=torch.int8))
                    spec.append(torch.full((n,), special, dtype=torch.bool))
            return torch.cat(out, 1), torch.cat(spec)
        if r[0] == "slice":
            _, parent, s0, e0, step = r
            c, s = self._parent_codes(parent)
            return c[:, s0:e0:step], s[s0:e0:step]
        if r[0] == "gather":
            _, parent, index, d = r
            c, s = self._parent_codes(parent)
            idx = self.values.get(index)
            if idx is None:
                return None, s[:0].new_zeros(st.length)
            idx = idx.long() % c.shape[1]  # (x[:, idx] takes negative positions from the end)
            if idx.dim() > 1:  # [B, ..., L at d, ...]: the row each position takes, per sample
                idx = idx.movedim(d, -1).reshape(idx.shape[0], -1, idx.shape[d])[:, 0] if d > 0 else idx.reshape(
                    idx.shape[0], -1)[:, 0].unsqueeze(0)
            else:
                idx = idx.unsqueeze(0)
            rows = max(c.shape[0], idx.shape[0])
            codes = c.expand(rows, -1).gather(1, idx.expand(rows, -1))
            return codes, s[idx[0]]
        if r[0] == "tiles":
            _, parent, n = r
            c, s = self._parent_codes(parent)
            return c.repeat(1, n), s.repeat(n)
        if r[0] == "padded":  # the parent's tokens, then an overhang of padding (special, register)
            _, parent, n = r
            c, s = self._parent_codes(parent)
            extra = st.length - n
            return (torch.cat([c, torch.full((c.shape[0], extra), CODE[REGISTER], dtype=torch.int8)], 1),
                    torch.cat([s, torch.ones(extra, dtype=torch.bool)]))
        return None, None

    def _parent_codes(self, sid):
        st = self.streams[sid]
        if st.codes is None:
            raise ValueError(f"layout of stream {sid} unknown")
        return st.codes, st.special

    # ---- symbolic lengths
    def _symbolize(self) -> None:
        """Give each stream a sympy length in per-modality symbols (n_img, n_txt, n_patch, ...)."""
        used: dict[str, int] = {}

        def sym(base: str):
            used[base] = used.get(base, 0) + 1
            name = base if used[base] == 1 else f"{base}{used[base]}"
            return sympy.Symbol(name, positive=True, integer=True)

        B = sympy.Symbol("B", positive=True, integer=True)
        self.batch_symbol = B
        self.symbol_values: dict[sympy.Symbol, int] = {B: self.batch_size or 1}
        for st in self.streams:
            if st.kind == BATCH:
                st.sym_length = B
                continue
            if self.find(st.id) != st.id and st.rule == "embedding":
                continue  # the same positions as its canonical stream (e.g. token-type embeddings)
            r = st.recipe
            if st.rule == "embedding" and self._scatter_child(st) is None:
                s = sym("n_txt")
                st.symbols = {TEXT: s}
                st.sym_length = s
                self.symbol_values[s] = st.length
            elif st.rule in ("scatter", "index_put"):
                counts = st.counts()
                n_src = counts[0].get(NAME[r[-1]], 0) if counts else 0
                si, stx = sym("n_img" if r[-1] == CODE[IMAGE] else "n_reg"), sym("n_txt")
                st.symbols = {NAME[r[-1]]: si, TEXT: stx}
                st.sym_length = si + stx
                self.symbol_values[si] = n_src
                self.symbol_values[stx] = st.length - n_src
                base = self.streams[r[1]]
                base.sym_length = st.sym_length
                base.symbols = dict(st.symbols)
            elif st.rule == "patches":
                s = sym("n_patch")
                st.symbols = {IMAGE: s}
                st.sym_length = s
                self.symbol_values[s] = st.length
            elif st.rule == "cat":
                total = 0
                for p, n in r[1]:
                    if isinstance(p, int):
                        ps = self.streams[self.find(p)]
                        total += ps.sym_length if ps.sym_length is not None else n
                        for mod, s_ in ps.symbols.items():
                            st.symbols.setdefault(mod, s_)
                    else:
                        _, learned, taint = p
                        data = taint & {IMAGE, TEXT}
                        if not learned and len(data) == 1:  # input-derived tokens whose stream was lost upstream
                            mod = next(iter(data))
                            s_ = sym("n_img" if mod == IMAGE else "n_txt")
                            self.symbol_values[s_] = n
                            st.symbols.setdefault(mod, s_)
                            total += s_
                        else:
                            total += n
                st.sym_length = total
                counts = st.counts()
                for mod, s_ in st.symbols.items():  # learned special tokens counted under a modality
                    if counts and s_ in self.symbol_values:
                        st.offsets[mod] = counts[0].get(mod, 0) - int(self.symbol_values[s_])
            elif st.rule == "tiles":
                parent = self.streams[self.find(r[1])]
                st.sym_length = r[2] * (parent.sym_length if parent.sym_length is not None else parent.length)
            elif st.rule == "padded":
                parent = self.streams[self.find(r[1])]
                base = parent.sym_length if parent.sym_length is not None else parent.length
                st.sym_length = base + (st.length - r[2])
            elif st.rule == "slice":
                parent = self.streams[r[1]]
                base = parent.sym_length if parent.sym_length is not None else parent.length
                st.sym_length = base - (parent.length - st.length) if r[4] == 1 else st.length
            else:
                st.sym_length = st.length

    def _scatter_child(self, st: Stream):
        for s in self.streams:
            if s.rule in ("scatter", "index_put") and s.recipe[1] == st.id:
                return s
        return None

    # ---- symbolic shapes
    def symbolic_shape(self, node) -> tuple | None:
        """``node``'s shape with token and batch dims written in the stream symbols."""
        shape = node_shape(node)
        if shape is None:
            return None
        out = [sympy.Integer(s) for s in shape]
        info = self.tokens(node)
        done = set()
        # whole-dim axes first: a sub-axis at the same place (each tile's tokens inside the tiles' sequence) is
        # already counted by the axis that holds it
        for ax in sorted(info.axes, key=lambda a: -a.length):
            st = self.stream(ax.stream)
            if st.sym_length is None:
                continue
            loc = locate(TokAxis(st.id, ax.stride, ax.length), shape)
            if loc is None:
                continue
            lo, hi, inner = loc
            if lo != hi or hi in done and st.kind == BATCH or (hi, ax.stride) in done:
                continue
            done.add((hi, ax.stride))
            size = out[hi]
            # replace the factor `length` of this dim by the symbolic length
            if isinstance(size, sympy.Integer) and int(size) % st.length == 0:
                out[hi] = sympy.Integer(int(size) // st.length) * st.sym_length
            else:
                out[hi] = sympy.simplify(size / st.length * st.sym_length) if isinstance(size, sympy.Basic) else size
        return tuple(out)


# ----------------------------------------------------------------------------- helpers
def _shape_of_val(v):
    if isinstance(v, torch.Tensor):
        return tuple(size_hint(s) for s in v.shape)
    return None


def _norm_index(i, n):
    i = int(i) if i is not None else 0
    return i + n if i < 0 else min(i, n)


def _reduce_to(m: torch.Tensor, d: int) -> torch.Tensor:
    """Reduce a mask to [B, L] over every dim but 0 and the token dim ``d`` (any)."""
    if m.dim() == 1:
        return m.unsqueeze(0)
    dims = [i for i in range(m.dim()) if i not in (0, d)]
    if dims:
        m = m.any(dim=dims)
    return m


class Provenance(Analysis):
    """:class:`TokenProvenance` as a cached analysis of the :class:`~graphred.passes.infra.AnalysisManager`.

    Its stream layouts are read from input values, so the first request on a graph gives them:
    ``am.get(Provenance(example_inputs, value_inputs=...), gm)``; later requests (``am.get(Provenance, gm)``)
    read the cache. The result describes the graph as it was when it ran: the reduction passes keep
    every original node and record its original shape, so they preserve it.

    >>> import graphred
    >>> from graphred.passes.infra import AnalysisManager
    >>> model, inputs = graphred.zoo.load(graphred.zoo.TEST_NAMES[0])
    >>> program = graphred.capture(model, **inputs); am = AnalysisManager()
    >>> prov = am.get(Provenance(program.example_inputs()), program.graph_module)
    >>> am.get(Provenance, program.graph_module) is prov
    True
    """

    def __init__(self, example_inputs: tuple[tuple, dict] | None = None, *, value_inputs: tuple | None = None):
        self.example_inputs, self.value_inputs = example_inputs, value_inputs

    def run(self, gm: fx.GraphModule, am: Any) -> TokenProvenance:
        if self.example_inputs is None and self.value_inputs is None:
            raise AnalysisError("Provenance needs the graph's example inputs the first time it runs on a graph "
                                "(the token layout is read from their values): am.get(Provenance((args, kwargs)), gm)")
        return TokenProvenance(gm, self.example_inputs, value_inputs=self.value_inputs)
