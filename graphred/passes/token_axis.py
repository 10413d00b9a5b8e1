"""The token-axis rewrite: after a reduction node, make every downstream tensor consistent.

``reduce_stream`` inserts ``graphred::gather_tokens`` on one tensor of a token stream and walks
the graph forward. Every op that consumes a reduced tensor is revisited:

* its other tensor operands that still hold the stream at full length on an aligned dim
  (attention masks on both axes, rotary cos/sin, position ids, labels, ...) are gathered with
  the same indices right before the op;
* shape constants on the token axis (``view``/``reshape``/``expand`` sizes, slice bounds) are
  re-specialised to the new length;
* ``meta["val"]`` is recomputed.

Which dims of a tensor are the stream's is read from :class:`TokenProvenance` (computed on the
original graph, whose nodes the rewrite keeps); nothing is model-specific.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.fx as fx

from .. import ops as _ops  # noqa: F401  (registers graphred:: ops)

from ..analysis.op_tables import CONV, LOSSES, SDPA, loss_target_dims
from ..analysis.provenance import TOKENS, TokAxis, TokenProvenance, locate
from ..errors import PassError
from ..fx_utils import (
    ORIG_SHAPE, SIDE, arg_nodes, call_with_val, is_pointwise, module_path, node_shape, op_packet, original_shape, record, recorded,
    set_fake_val,
)

aten = torch.ops.aten
graphred_ops = torch.ops.graphred

_SHAPE_ARG_OPS = {aten.view, aten.reshape, aten._unsafe_view, aten.expand, aten.new_zeros, aten.new_ones,
                  aten.new_full, aten.new_empty, aten.broadcast_to}


def record_original_shapes(gm: fx.GraphModule) -> None:
    """Record every node's shape under :data:`graphred.fx_utils.ORIG_SHAPE` before the rewrite."""
    for n in gm.graph.nodes:
        s = node_shape(n)
        if s is not None:
            record(n, ORIG_SHAPE, s)


@dataclass
class StreamState:
    """What a sequence of reductions did to one stream."""

    stream: int
    length0: int  # original length
    length: int  # current length
    abs_index: fx.Node | None = None  # [B, length] original positions of the current tokens
    sizes: fx.Node | None = None  # [B, length] token sizes (merging)
    filler: fx.Node | None = None  # [B, length] bool: filler slots padding an uneven batch (never attended)
    kept_prefix: int = 0  # leading positions no reduction ever drops (protected class tokens, leading text)
    kept_suffix: int = 0  # trailing positions no reduction ever drops (a decoder's trailing text)
    aliases: set = field(default_factory=set)  # child streams that are this stream minus its kept prefix
    _gathered: dict = field(default_factory=dict, repr=False)
    renumber: bool = False  # position tables meeting the stream elementwise take slots 0..K-1
    history: list[dict] = field(default_factory=list)
    graph_mutates: bool | None = None  # whether the graph has in-place ops (then views are not shared by structure)
    # samples of the stream concatenated along the tokens (``cat(unbind(x))``: [B*L, C]): cat stream id -> its length
    folded: dict = field(default_factory=dict)
    # called when the reduced tokens reach a masked_scatter as its source: (gm, node, source rows before, after,
    # pass name) -> True where it shrank the destination's placeholders to match (else the scatter is refused)
    on_scatter: Callable | None = field(default=None, repr=False)
    # concatenations along the reduced tokens met by the last reduction (set by ``reduce_stream``):
    # ``(stream id of the concatenated tokens, cat node, parts)``, parts ``[None | int]``: None where the part is
    # the reduced tokens, else the length of a part kept whole (see :func:`derived_values`)
    derived: list = field(default_factory=list)
    _ctx: dict = field(default_factory=dict, repr=False)


def stream_dims(prov: TokenProvenance, node: fx.Node, stream, shape=None) -> list[tuple[int, int]]:
    """``[(dim, factor)]``: dims of ``node`` (original) that hold ``stream``; the dim's size is
    ``factor * length`` (factor > 1 for folded layouts such as ``[B*L, C]``)."""
    shape = recorded(node, ORIG_SHAPE) or shape or node_shape(node)
    out = []
    if shape is None:
        return out
    targets = {prov.find(s) for s in (stream if isinstance(stream, (set, frozenset, list, tuple)) else {stream})}
    for ax in prov.tokens(node).axes:
        st = prov.stream(ax.stream)
        if st.id not in targets or st.kind != TOKENS:
            continue
        loc = locate(TokAxis(st.id, ax.stride, ax.length), shape)
        if loc is None or loc[0] != loc[1]:
            continue
        out.append((loc[1], shape[loc[1]] // ax.length))
    return out


class ReductionError(PassError):
    """The token-axis rewrite cannot carry a reduction through a node; ``node`` (its name) and
    ``module_path`` say which."""

    def __init__(self, message: str, *, pass_name: str | None = None, node: str | None = None,
                 module_path: str | None = None):
        super().__init__(message, pass_name=pass_name)
        self.node, self.module_path = node, module_path


def _fail(msg: str, node: fx.Node | None, pass_name: str) -> ReductionError:
    where = f" at node {node.format_node()} (module {module_path(node) or '<top>'})" if node is not None else ""
    return ReductionError(f"{pass_name}: {msg}{where}", pass_name=pass_name,
                          node=node.name if node is not None else None,
                          module_path=module_path(node) if node is not None else None)


def reduce_stream(
    gm: fx.GraphModule,
    prov: TokenProvenance,
    state: StreamState,
    point: fx.Node,
    index: fx.Node,
    new_length: int,
    *,
    transform: Callable[[fx.Node], fx.Node] | None = None,
    pass_name: str = "reduce_stream",
    dim: int | None = None,
    inputs_ready: fx.Node | None = None,
    gather_index: fx.Node | None = None,
) -> fx.Node:
    """Reduce ``state.stream`` at ``point`` to the ``new_length`` tokens in ``index`` ([B, new_length],
    positions in the stream's *current* numbering) and fix up everything downstream.

    ``index`` must already be in the graph; the gather is inserted right after it, and only uses of
    ``point`` that come after the gather are redirected. ``transform`` may rewrite ``point``'s value
    before the gather (merging). Returns the gather node.

    ``gather_index`` (default ``index``) is what gathers ``transform(point)`` when the transform
    changes its numbering (inserted tokens: ``index`` then says which original token each new slot
    stands for, and may repeat positions, so ``new_length`` may exceed the current length).
    """
    graph = gm.graph
    # a convolution along the tokens pads them (the stream plus an overhang): the same tokens for the rewrite
    state.aliases |= {prov.find(s.id) for s in prov.streams if s.rule == "padded" and prov.find(s.recipe[1]) == prov.find(state.stream)}
    if dim is None:
        dims = stream_dims(prov, point, state.stream) if point in prov.info else []
        if not dims:
            raise _fail(f"{point.name} does not carry the token stream being reduced", point, pass_name)
        dim = dims[0][0]
    old = state.length
    order = {n: i for i, n in enumerate(graph.nodes)}
    ready = _last(graph, [index] + [x for x in (inputs_ready, gather_index) if x is not None])
    with graph.inserting_before(ready.next):  # (inserting_after would reverse several new nodes)
        src = transform(point) if transform is not None else point
    after = src if transform is not None else index
    if order.get(after, 0) < order[index]:
        after = index
    with graph.inserting_after(_last(graph, [index, src] + ([gather_index] if gather_index is not None else []))):
        g = call_with_val(graph, graphred_ops.gather_tokens.default, (src, index if gather_index is None else gather_index, dim))
    order = {n: i for i, n in enumerate(graph.nodes)}
    for user in list(point.users):
        if user is g or user is src or order[user] <= order[g]:
            continue
        user.replace_input_with(point, g)
    # update the absolute positions
    with graph.inserting_after(g):
        if state.abs_index is None:
            abs_index = index
        else:
            abs_index = call_with_val(graph, graphred_ops.gather_tokens.default, (state.abs_index, index, 1))
    state.abs_index = abs_index
    state.length = new_length
    if state.filler is not None:  # filler slots stay flagged where the reduction keeps them
        with graph.inserting_after(abs_index):
            state.filler = call_with_val(graph, graphred_ops.gather_tokens.default, (state.filler, index, 1))
            record(state.filler, SIDE, True)
    if state.sizes is not None and transform is None:  # merged-token sizes follow every pruning
        with graph.inserting_before(g):
            state.sizes = call_with_val(graph, graphred_ops.gather_tokens.default, (state.sizes, index, 1))
            record(state.sizes, SIDE, True)
    state.derived = []
    reduced: dict[fx.Node, set[int]] = {g: {dim}}
    if transform is not None:
        reduced[g] = {dim}
    _propagate(gm, prov, state, g, index, old, new_length, reduced, pass_name)
    if not g.users:
        # every reader of the tokens at this point runs before the cut (e.g. keys computed inside the layer whose
        # scores choose the cut): nothing would read fewer tokens, and the reduction would change nothing
        raise _fail(f"no op after the cut reads the reduced tokens of {point.name} (its readers all run before "
                    "the scores that choose the cut), so the reduction would change nothing; "
                    "reduce at an earlier layer, or where the tokens enter the layers that read them", point,
                    pass_name)
    return g


def _last(graph: fx.Graph, nodes) -> fx.Node:
    order = {n: i for i, n in enumerate(graph.nodes)}
    return max(nodes, key=lambda n: order[n])


# Views of one tensor: two such nodes with the same op and arguments are the same tensor, so one
# gather serves both (each decoder layer unsqueezes the shared rotary cos/sin tables afresh).
_VIEW_OPS = {aten.unsqueeze, aten.squeeze, aten.view, aten.reshape, aten._unsafe_view, aten.expand, aten.slice,
             aten.select, aten.transpose, aten.permute, aten.t, aten.alias, aten.unflatten, aten.flatten}


def _graph_mutates(graph: fx.Graph) -> bool:
    for n in graph.nodes:
        schema = getattr(n.target, "_schema", None) if n.op == "call_function" else None
        if schema is not None and schema.is_mutable:
            return True
    return False


def _structural_key(a: fx.Node, memo: dict):
    """``a`` itself, or for a chain of views a key equal for every node computing the same view."""
    if a in memo:
        return memo[a]
    key = a
    if a.op == "call_function" and op_packet(a) in _VIEW_OPS:
        def norm(v):
            if isinstance(v, fx.Node):
                return _structural_key(v, memo)
            if isinstance(v, (list, tuple)):
                return tuple(norm(x) for x in v)
            return v
        try:
            key = (a.target, norm(a.args), tuple(sorted((k, norm(v)) for k, v in a.kwargs.items())))
            hash(key)
        except TypeError:
            key = a
    memo[a] = key
    return key


def _propagate(gm, prov, state, g, index, old, new, reduced, pass_name):
    graph = gm.graph
    started = False
    state._gathered = {}  # (operand, dim) -> its gathered version: shared masks/rotary tables gathered once
    # views are shared by structure only where nothing writes in place (a view taken after a write would differ)
    if state.graph_mutates is None:  # the rewrite inserts only functional ops: computed once per stream
        state.graph_mutates = _graph_mutates(graph)
    state._view_keys = None if state.graph_mutates else {}
    for n in list(graph.nodes):
        if n is g:
            started = True
            continue
        if not started or n.op != "call_function":
            if n.op == "output":
                continue
            continue
        if recorded(n, SIDE):
            continue
        ins = [a for a in n.all_input_nodes if a in reduced and reduced[a]]
        if not ins:
            continue
        # (index, old, new) of the tokens this node reads: the reduction's own, or those of a concatenation of
        # the reduced tokens with other tokens along the token axis (their kept positions: the union)
        ctxs = {state._ctx.get(a, (index, old, new)) for a in ins}
        if len(ctxs) > 1 and op_packet(n) not in SDPA:
            raise _fail("the reduced tokens meet a concatenation of them with other tokens in one elementwise op "
                        "(their token axes no longer line up)", n, pass_name)
        # (an attention whose keys are the concatenation: its output follows the queries; its mask, both)
        ctx = state._ctx.get(n.args[0], (index, old, new)) if len(ctxs) > 1 else ctxs.pop()
        if ctx[0] is not index:
            state._ctx[n] = ctx
        _fix_node(gm, prov, state, n, *ctx, reduced, pass_name)


def _aligned_dims(n: fx.Node, a: fx.Node, out_dims: set[int], out_shape, reduced_inputs) -> list[int]:
    """Dims of operand ``a`` of op ``n`` that line up with the reduced output dims ``out_dims``."""
    pk = op_packet(n)
    ashape = node_shape(a)
    if ashape is None:
        return []
    if pk in SDPA:
        q, k = n.args[0], n.args[1]
        mask = n.args[3] if len(n.args) > 3 else n.kwargs.get("attn_mask")
        if a is mask:
            dims = []
            if q in reduced_inputs:
                dims.append(len(ashape) - 2)
            if k in reduced_inputs:
                dims.append(len(ashape) - 1)
            return dims
        return []
    if pk in (aten.mm, aten.bmm, aten.matmul, aten.addmm, aten.baddbmm):
        R = len(out_shape)
        r = len(ashape)
        # batch dims broadcast from the right, excluding the two matrix dims
        return [d + R - r for d in range(r - 2) if (d + R - r) in out_dims] if r > 2 else []
    if pk is aten.gather and len(n.args) > 2 and a is n.args[2] and len(ashape) == len(out_shape):
        # gather(src, dim, index): off ``dim``, index, src and output line up position by position
        return [d for d in out_dims if d != n.args[1] % len(out_shape)]
    if pk is aten.masked_scatter and a is not n.args[2]:  # the mask lines up with the destination, not the source
        R, r = len(out_shape), len(ashape)
        return [d for d in range(r) if (d + R - r) in out_dims]
    if not (is_pointwise(n) or pk in (aten.cat, aten.concat, aten.where, aten.masked_fill, aten.stack)):
        return []  # weights, norms' affine parameters, indices of other ops: never token-aligned
    R = len(out_shape)
    r = len(ashape)
    return [d for d in range(r) if (d + R - r) in out_dims]


def _fix_node(gm, prov, state, n, index, old, new, reduced, pass_name):
    graph = gm.graph
    pk = op_packet(n)
    orig_shape = node_shape(n)  # as it is now (after earlier reductions)
    sd = stream_dims(prov, n, {state.stream} | state.aliases) if orig_shape is not None else []
    out_dims = {d for d, _ in sd if orig_shape[d] // max(_factor(sd, d), 1) == old or True}
    reduced_inputs = {a for a in n.all_input_nodes if a in reduced and reduced[a]}
    if orig_shape is not None and pk is aten.gather and n.args[0] in reduced_inputs:
        out_dims |= {d for d in reduced[n.args[0]] if 0 <= d < len(orig_shape) and d != n.args[1] % len(orig_shape)}
    if orig_shape is not None and (is_pointwise(n) or pk in (aten.where, aten.masked_fill)):
        # an elementwise op lines its operands up position by position: a reduced dim of an input that the analysis
        # has no axis for (rows restored from an expert router) is the tokens' in the output as well, so that
        # full-length operands on it (a padding mask) are gathered alike
        for a in reduced_inputs:
            r = len(original_shape(a) or node_shape(a) or ())
            out_dims |= {d + len(orig_shape) - r for d in reduced[a]
                         if 0 <= d < r and 0 <= d + len(orig_shape) - r and orig_shape[d + len(orig_shape) - r] == old}

    if pk in LOSSES:
        _gather_loss_target(graph, n, index, old, new, reduced)
    if pk in _SIZE_ASSERTS:
        # a runtime assert on a size computed from the reduced tokens: real-tensor propagation pinned a
        # data-dependent count (the rows a nonzero selects) to its value at the example inputs; the reduced rows
        # select another count, and the ops after it were traced for any count
        graph.erase_node(n)
        return
    if pk in _COUNTED:
        # the positions of the nonzero elements of reduced tokens (the rows routed to one expert): their count is
        # data-dependent (a fresh unbacked size), their values positions along the reduced dims (checked where
        # they index, by _runtime_positions)
        set_fake_val(n)
        reduced[n] = {0}
        return
    if n.target is operator.getitem:
        set_fake_val(n)
        new_shape = node_shape(n)
        reduced[n] = {d for d in out_dims if new_shape and orig_shape and new_shape[d] != orig_shape[d]}
        reduced[n] |= _counted_dims(n)
        if new_shape and orig_shape and len(new_shape) == len(orig_shape):
            # an output of an op the analysis has no axis rule for (topk, sort: routing tokens to experts) whose
            # length follows the tokens: still reduced, so its users are revisited
            reduced[n] |= {d for d in range(len(new_shape))
                           if new_shape[d] != orig_shape[d] and _scales(orig_shape[d], new_shape[d], old, new)}
        return
    if orig_shape is None:  # several outputs (split, native_layer_norm, sdpa kernels): getitems follow
        try:
            set_fake_val(n)
        except Exception as e:
            parts = _fixed_parts(n, reduced)
            if parts is not None:
                raise _fail(f"the reduced token axis (dim {parts[0]}) is split here into parts of fixed sizes {parts[1]} "
                            f"(of {sum(parts[1])} tokens; e.g. the levels of a multi-scale feature map, each then read "
                            "back by spatial location, as deformable attention samples it): the kept tokens no longer "
                            "make those parts, so no reduction before this point is sound. Reduce after the last op "
                            "that splits the tokens so, or not in this stack", n, pass_name) from e
            raise _fail(f"the op cannot take the reduced token axis ({type(e).__name__})", n, pass_name) from e
        reduced[n] = {-1}
        return
    # gather full-length external operands on their aligned dims
    for a in list(n.all_input_nodes):
        # (an input reduced on one token dim, still at full length on another that the output's tokens line up with
        # elementwise: e.g. a [B, H, Lq, Lk] bias whose queries were reduced, met by scores whose keys are too)
        if a in reduced_inputs and not (is_pointwise(n) or pk in (aten.where, aten.masked_fill)):
            continue
        ashape = node_shape(a)
        if ashape is None:
            continue
        dim_ctx = _sdpa_mask_ctx(state, n, a, ashape, (index, old, new))
        dims = [d for d in _aligned_dims(n, a, out_dims, orig_shape, reduced_inputs)
                if d < len(ashape) and ashape[d] == dim_ctx.get(d, (index, old))[1] and d not in reduced.get(a, ())]
        if a in reduced_inputs and not dims:
            continue
        composed = None if dim_ctx or a in reduced_inputs else _compose_gather_chain(graph, state, a, dims, index, old)
        if composed is not None:  # a is a previous reduction's gather: one gather with the composed index
            n.replace_input_with(a, composed)
            continue
        lead = len(orig_shape) - len(ashape)
        if dims and lead > 0 and (is_pointwise(n) or pk in (aten.where, aten.masked_fill)):
            # a table without the leading (batch) dims that it broadcasts over, e.g. [Lq, Lk] relative distances:
            # given them (size 1), so that its token dims are gathered per sample
            with graph.inserting_after(a):
                full = call_with_val(graph, aten.view.default, (a, [1] * lead + list(ashape)))
            n.replace_input_with(a, full)
            a, ashape, dims = full, node_shape(full), [d + lead for d in dims]
        # leading dims first: a row gather (fast) shrinks what the last-dim gather reads
        for d in sorted(dims):
            d_index, d_old = dim_ctx.get(d, (index, old))[:2]
            if d < len(ashape) and ashape[d] == d_old:
                akey = a if state._view_keys is None else _structural_key(a, state._view_keys)
                key = (akey, d, d_index)
                ga = state._gathered.get(key)
                if ga is None:
                    which = d_index
                    if state.renumber and is_pointwise(n):
                        # renumbered: an operand combined elementwise with the tokens (a rotary cos/sin table,
                        # position ids) takes the first K slots; masks at the attention still follow the tokens
                        which = state._gathered.get("slots")
                        if which is None:
                            with graph.inserting_before(index.next):
                                ar = call_with_val(graph, aten.arange.default, (new,), {"dtype": torch.long, "device": index.meta["val"].device})
                                which = call_with_val(graph, aten.expand.default, (ar, list(node_shape(index))))
                            state._gathered["slots"] = which
                    # right after the operand (and the index), so later layers reuse the same gather
                    with graph.inserting_after(_last(graph, [a, which])):
                        ga = call_with_val(graph, graphred_ops.gather_tokens.default, (a, which, d))
                    state._gathered[key] = ga
                n.replace_input_with(a, ga)
                a = ga
                ashape = node_shape(ga)
    # re-specialise shape arguments
    if pk in (aten.view, aten.reshape, aten._unsafe_view) and not sd and n.args[0] in reduced_inputs and \
            _respecialise_scaled_view(n, reduced, old, new):
        pass  # one dim of the view grows with the tokens (rows routed and restored, [B*L*k, C] -> [B*L, k, C])
    elif pk in (aten.view, aten.reshape, aten._unsafe_view) and not sd and n.args[0] in reduced_inputs and \
            len(orig_shape) > len(original_shape(n.args[0]) or ()):
        split = _split_axis(prov, n, {state.stream} | state.aliases)
        if split is not None:
            raise _fail(f"the reduced tokens are reshaped to {list(orig_shape)}, a layout with no dim for the tokens: "
                        f"the token axis is split here over dims {split[0]}..{split[1]} (sizes {split[2]}: an image's "
                        "tiles laid end to end taken apart again, or a spatial grid for pooling or pixel shuffle); "
                        "tokens merged or pruned before it leave no part its size, so reduce after it (in the "
                        "decoder: victor, fastv or pumer)", n, pass_name)
        raise _fail(f"the reduced tokens are reshaped to {list(orig_shape)}, a layout with no dim for the tokens (a "
                    "spatial grid: pooling or pixel shuffle follows); tokens merged or pruned before it leave no grid, "
                    "so reduce after it (in the decoder: victor, fastv or pumer)", n, pass_name)
    if pk in _SHAPE_ARG_OPS:
        size_arg = 1
        sizes = list(n.args[size_arg])
        folded = _folded_dims(prov, state, n)
        for d, f in sd:
            # an int, or a symbolic size computed in the graph (data-dependent capture): both become the
            # reduced length, which is static
            if d < len(sizes) and (isinstance(sizes[d], fx.Node) or isinstance(sizes[d], int) and sizes[d] != -1):
                sizes[d] = folded.get(d, f * new)
        args = list(n.args)
        args[size_arg] = sizes
        n.args = tuple(args)
    elif pk in (aten.flatten, aten.unflatten) and pk is aten.unflatten:
        sizes = list(n.args[2])
        base = n.args[1] % len(original_shape(n.args[0]))
        for d, f in sd:
            j = d - base
            if 0 <= j < len(sizes) and sizes[j] != -1:
                sizes[j] = f * new
        n.args = (n.args[0], n.args[1], sizes)
    elif pk is aten.slice:
        src = n.args[0]
        sdim = n.args[1] if len(n.args) > 1 else 0
        src_dims = reduced.get(src, set())
        if sdim % len(orig_shape) in src_dims:
            tail = False
            start = n.args[2] if len(n.args) > 2 else 0
            end = n.args[3] if len(n.args) > 3 else None
            step = n.args[4] if len(n.args) > 4 else 1
            start = 0 if start is None else start
            if start < 0 and -start >= (original_shape(src) or orig_shape)[sdim % len(orig_shape)]:
                start = 0  # (the last n of n positions: every position, whatever the length)
                n.args = (n.args[0], n.args[1], 0) + tuple(n.args[3:])
            if start == 0 and (end is None or end >= old) and step == 1:
                args = list(n.args) + [None] * (4 - len(n.args))
                args[3] = new if end is not None and end < 2**62 else end
                n.args = tuple(args[:max(len(n.args), 4)])
            elif start < 0 and -start <= state.kept_suffix and (end is None or end >= old or end == 0):
                tail = True  # end-aligned within the trailing tokens that stay last: a fixed length, off the stream
            elif start == 0 and step == 1 and isinstance(end, int) and end < 0 and \
                    _head_ctx(state._gathered.get(("parts", index)), -end) is not None:
                # cuts whole parts off the end of a concatenation with the reduced tokens: the rest are those tokens
                # (the negative end still cuts the same parts); its users read them in their own numbering
                head = _head_ctx(state._gathered.get(("parts", index)), -end)
                state._ctx[n] = head
                index, old, new = head
            elif 0 < start <= state.kept_prefix and (end is None or end >= old) and step == 1:
                # drops leading tokens that no reduction touches (e.g. a class token): still the same ones
                args = list(n.args) + [None] * (4 - len(n.args))
                args[3] = new if end is not None and end < 2**62 else end
                n.args = tuple(args[:max(len(n.args), 4)])
                for d, st in prov.axes(n):
                    if d == sdim % len(orig_shape):
                        state.aliases.add(prov.find(st.id))
                sd = stream_dims(prov, n, {state.stream} | state.aliases)
            else:
                raise _fail(f"a slice [{start}:{end}:{step}] on the reduced token axis cannot be re-specialised", n, pass_name)
            out_dims = set() if tail else {sdim % len(orig_shape)}
    elif pk in (aten.select,):
        sdim = n.args[1] % len(node_shape(n.args[0]))
        if sdim in reduced.get(n.args[0], set()):
            idx = n.args[2]
            if not (0 <= idx < state.kept_prefix or (idx < 0 and -idx <= state.kept_suffix)):
                raise _fail(f"select of token {idx} on the reduced token axis: that token is not one the reductions "
                            "keep in place (protect it, or reduce after it is read)", n, pass_name)
    elif pk is aten.index:
        src = n.args[0]
        idxs = n.args[1]
        rows_mask = _rows_mask(n, src, idxs, reduced, old)
        if rows_mask is not None:  # x[mask]: the rows at the mask's positions, gathered alike
            _fix_masked_rows(gm, n, rows_mask, index, old)
        else:
            for d, ix in enumerate(idxs):
                if ix is not None and d in reduced.get(src, set()):
                    _check_runtime_positions(n, src, d, ix, reduced, pass_name)
    elif pk in _DIM_INDEX_OPS and isinstance(n.args[1], int) and isinstance(n.args[2], fx.Node) and \
            node_shape(n.args[0]) and n.args[1] % len(node_shape(n.args[0])) in reduced.get(n.args[0], set()):
        # (index_add_ of each expert's rows back into the tokens: positions computed from the reduced rows)
        _check_runtime_positions(n, n.args[0], n.args[1] % len(node_shape(n.args[0])), n.args[2], reduced,
                                 pass_name)
    elif pk in (aten.index_put, aten.index_put_) and (n.args[0] in reduced_inputs or any(
            isinstance(ix, fx.Node) and ix in reduced_inputs for ix in n.args[1])):
        _fix_index_put(gm, n, reduced, reduced_inputs, pass_name)
    elif pk in (aten.masked_scatter, aten.index_put, aten.index_put_, aten.scatter, aten.scatter_add):
        src = n.args[2] if len(n.args) > 2 else None
        if pk is aten.masked_scatter and src in reduced_inputs and n.args[0] not in reduced_inputs and \
                n.args[1] not in reduced_inputs and state.on_scatter is not None:
            # fewer tokens than placeholders: the destination's placeholder spans shrink alike (or a graphred error)
            rows0 = _numel(original_shape(src)) // max(_numel(original_shape(src)[-1:]), 1)
            rows1 = _numel(node_shape(src)) // max(_numel(node_shape(src)[-1:]), 1)
            if state.on_scatter(gm, n, rows0, rows1, pass_name):
                return
        row_wise = pk in (aten.scatter, aten.scatter_add) and n.args[0] in reduced_inputs and \
            isinstance(n.args[1], int) and n.args[1] % len(orig_shape) not in reduced.get(n.args[0], set())
        # (a scatter within each token's row, e.g. top-k expert scores into a row of experts, keeps the rows)
        if not row_wise and any(a in reduced_inputs for a in arg_nodes(n.args[1:])):
            raise _fail("the reduced tokens are scattered into another sequence (their count is fixed there by the "
                        "input's placeholders); reduce them after they enter that sequence instead", n, pass_name)
    elif pk in (aten.cat, aten.concat):
        cdim = (n.args[1] if len(n.args) > 1 else 0) % len(orig_shape)
        parts = [t for t in n.args[0] if isinstance(t, fx.Node)]
        on_axis = [t for t in parts if cdim in reduced.get(t, set())]
        others_empty = all(t.meta["val"].numel() == 0 for t in parts if t not in on_axis)
        folded_sid = _samples_cat(prov, state, n, parts, on_axis, cdim)
        if folded_sid is not None:  # every part is one sample of the stream: the samples' tokens, one after another
            state.aliases.add(folded_sid)
            state.folded[folded_sid] = sum(node_shape(t)[cdim] for t in parts)
            sd = stream_dims(prov, n, {state.stream} | state.aliases)
            out_dims = {d for d, _ in sd}
        elif on_axis and not (len(on_axis) == 1 and others_empty):
            # (appending to an empty key/value cache is fine: the result is the reduced tokens)
            _union_ctx(gm, prov, state, n, parts, on_axis, cdim, (index, old, new), pass_name)
            sd = stream_dims(prov, n, {state.stream} | state.aliases)
            out_dims = {d for d, _ in sd}
        if on_axis:
            out_dims = set(out_dims) | {cdim}
    try:
        set_fake_val(n)
    except Exception as e:  # the op did not accept the reduced shapes
        split = _split_axis(prov, n, {state.stream} | state.aliases)
        if split is not None:
            raise _fail(_split_message(split), n, pass_name) from e
        raise _fail(f"the op cannot take the reduced token axis ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})", n, pass_name) from e
    new_shape = node_shape(n)
    if new_shape is None:
        v = n.meta.get("val")
        if isinstance(v, (tuple, list)):
            reduced[n] = set(out_dims)
        return
    changed = {d for d in range(min(len(new_shape), len(orig_shape))) if new_shape[d] != orig_shape[d]}
    out_dims = set(out_dims) | _shifted_dims(n, pk, reduced_inputs, reduced, orig_shape, new_shape, old, new)
    # a dim the analysis has no axis for may still follow the tokens: rows routed through a data-dependent
    # permutation (experts), or an op without an axis rule that keeps the token dim. Its length is k * tokens
    # before and after; every size constant on it was re-specialised above (or set_fake_val failed), and
    # positions indexing it were checked to be computed from the reduced rows at run time.
    counted = _counted_dims(n)
    untraced = {d for d in changed - out_dims - counted if not _scales(orig_shape[d], new_shape[d], old, new)}
    if untraced or len(new_shape) != len(orig_shape):
        changed = untraced or changed
        raise _fail(f"the reduced token axis reached dims {sorted(changed - out_dims)} that the analysis did not "
                    "trace (an op without a provenance rule upstream)", n, pass_name)
    reduced[n] = changed
    if not reduced[n] and out_dims and new != old:
        # an op we could not re-specialise left the stream at full length
        raise _fail("the token axis kept its full length after the rewrite (no rule re-specialised it)", n, pass_name)


def _shifted_dims(n, pk, reduced_inputs, reduced, orig_shape, new_shape, old, new) -> set[int]:
    """Reduced dims of the first input that ``n`` keeps with a fixed overhang (a causal convolution's padding, a pad,
    the windows of an unfold with step 1: ``old + c`` before and ``new + c`` after, ``c`` the op's own), where the
    analysis has no axis for them (tokens restored from an expert router)."""
    x = n.args[0] if n.args else None
    if x not in reduced_inputs or len(new_shape) != len(orig_shape):
        return set()
    if pk in CONV:
        args = list(n.args) + [None] * 7
        ones = all(v in (None, 1) or isinstance(v, (list, tuple)) and all(e == 1 for e in v) for v in (args[3], args[5]))
        transposed = pk in (aten.convolution, aten._convolution) and args[6] not in (None, False)
        if not ones or transposed:  # stride and dilation 1, not a transposed convolution
            return set()
        dims = {d for d in reduced[x] if 2 <= d < len(orig_shape)}  # (spatial dims only)
    elif pk in (aten.pad, aten.constant_pad_nd):
        dims = {d for d in reduced[x] if 0 <= d < len(orig_shape)}
    elif pk is aten.unfold and len(n.args) > 3 and n.args[3] == 1:
        dims = {d for d in reduced[x] if d == n.args[1] % len(orig_shape)}
    else:
        return set()
    return {d for d in dims if orig_shape[d] - new_shape[d] == old - new}


def _head_ctx(parts, cut: int):
    """The context of the one reduced part left where ``cut`` trailing positions of a concatenation (``parts`` as
    :func:`_union_ctx` records them) are exactly whole parts; else None."""
    if not parts:
        return None
    parts = list(parts)
    while cut > 0 and parts and isinstance(parts[-1], int) and parts[-1] <= cut:
        cut -= parts.pop()
    return parts[0] if cut == 0 and len(parts) == 1 and isinstance(parts[0], tuple) else None


def _sdpa_mask_ctx(state, n, a, ashape, primary) -> dict:
    """dim -> (index, old, new) for an attention mask whose query and key tokens were reduced differently (the
    keys a concatenation of the reduced tokens with other tokens); {} for every other operand."""
    if op_packet(n) not in SDPA or not state._ctx:
        return {}
    mask = n.args[3] if len(n.args) > 3 else n.kwargs.get("attn_mask")
    if a is not mask:
        return {}
    q, k = n.args[0], n.args[1]
    out = {}
    if q in state._ctx:
        out[len(ashape) - 2] = state._ctx[q]
    if k in state._ctx:
        out[len(ashape) - 1] = state._ctx[k]
    if out:
        out.setdefault(len(ashape) - 2, primary)
        out.setdefault(len(ashape) - 1, primary)
    return out


def _union_ctx(gm, prov, state, n, parts, on_axis, cdim, primary, pass_name) -> None:
    """A cat along the token axis of reduced tokens with other tokens: the kept positions of the concatenated
    tokens are the union of each part's (the reduced parts' kept positions, the other parts' every position),
    each shifted by the part's offset. Records that index and the old and new lengths for the cat's users."""
    graph = gm.graph
    cat_sids = [prov.find(st.id) for d, st in prov.axes(n) if d == cdim and st.kind == TOKENS]
    B = node_shape(primary[0])[0]
    if not cat_sids or cdim == 0 or any(node_shape(t)[0] != B for t in parts):
        raise _fail("concatenation along the reduced token axis where the analysis traced no token stream for the "
                    "result (or the parts' batch dims differ)", n, pass_name)
    specs, lengths_old, lengths_new, idxs = [], [], [], []
    for t in parts:
        if t in on_axis:
            ix, o, nw = state._ctx.get(t, primary)
            specs.append(ix)
            idxs.append(ix)
        else:
            o = nw = node_shape(t)[cdim]
            specs.append(o)
        lengths_old.append(o)
        lengths_new.append(nw)
    key = ("union", tuple(specs))
    union = state._gathered.get(key)
    if union is None:
        dev = primary[0].meta["val"].device
        with graph.inserting_before(_last(graph, idxs).next):
            pieces, off = [], 0
            for spec, o in zip(specs, lengths_old):
                if isinstance(spec, fx.Node):
                    p = call_with_val(graph, aten.add.Tensor, (spec, off)) if off else spec
                else:
                    ar = call_with_val(graph, aten.arange.start, (off, off + o), {"dtype": torch.long, "device": dev})
                    p = call_with_val(graph, aten.expand.default, (call_with_val(graph, aten.unsqueeze.default, (ar, 0)), [B, o]))
                pieces.append(p)
                off += o
            union = call_with_val(graph, aten.cat.default, (pieces, 1))
        for x in [union, *pieces, *(q for p in pieces for q in p.all_input_nodes if q not in idxs)]:
            record(x, SIDE, True)
        state._gathered[key] = union
    state._ctx[n] = (union, sum(lengths_old), sum(lengths_new))
    # the parts, in order (a reduced part's context, or a whole part's length), for a slice that cuts whole parts
    # off the end again (an attention sink's column, joined to the scores and sliced off the probabilities)
    state._gathered[("parts", union)] = [state._ctx.get(t, primary) if t in on_axis else node_shape(t)[cdim]
                                         for t in parts]
    state.aliases.update(cat_sids)
    state.derived.append((cat_sids[0], n, [None if isinstance(s, fx.Node) else s for s in specs]))


def derived_values(graph: fx.Graph, state: StreamState, value: fx.Node | None, fill) -> list:
    """``[(stream id, cat node, value of the concatenated tokens)]``: a per-token ``[B, L]`` value of the reduced
    stream (token sizes, filler flags) laid out like each concatenation the last reduction met (``fill`` for the
    tokens of the other parts), inserted right before that concatenation."""
    out = []
    if value is None:
        return out
    for sid, cat, parts in state.derived:
        with graph.inserting_before(cat):
            B = node_shape(value)[0]
            pieces = [value if p is None else call_with_val(
                graph, aten.full.default, ([B, p], fill), {"dtype": value.meta["val"].dtype,
                                                           "device": value.meta["val"].device}) for p in parts]
            v = call_with_val(graph, aten.cat.default, (pieces, 1))
        record(v, SIDE, True)
        for p in v.all_input_nodes:
            record(p, SIDE, True)
        out.append((sid, cat, v))
    return out


def _gather_loss_target(graph, n, index, old, new, reduced):
    """A loss whose input lost tokens: gather its target (labels) at the same positions. The target may
    be flattened with the batch (``labels.view(-1)`` against ``logits.view(-1, V)``): it is unflattened,
    gathered and flattened again."""
    inp, tgt = n.args[0], n.args[1] if len(n.args) > 1 else None
    if not isinstance(tgt, fx.Node) or inp not in reduced or tgt in reduced and reduced[tgt]:
        return
    tshape = node_shape(tgt)
    B = node_shape(index)[0]
    mapping = loss_target_dims(n)
    x = tgt
    for d in sorted(reduced[inp]):
        td = mapping.get(d)
        if td is None or tshape is None:
            continue
        with graph.inserting_before(n):
            if td >= 1 and tshape[td] == old:
                x = call_with_val(graph, graphred_ops.gather_tokens.default, (x, index, td))
            elif td == 0 and tshape[0] == B * old:  # batch-major flattened [B*L, ...]
                rest = list(node_shape(x)[1:])
                x = call_with_val(graph, aten.view.default, (x, [B, old, *rest]))
                x = call_with_val(graph, graphred_ops.gather_tokens.default, (x, index, 1))
                x = call_with_val(graph, aten.view.default, (x, [B * new, *rest]))
            else:
                continue
        tshape = node_shape(x)
    if x is not tgt:
        n.replace_input_with(tgt, x)


def _compose_gather_chain(graph, state, a, dims, index, old):
    """If ``a`` is ``gather(...gather(root, prev, d1)..., prev, dk)`` from an earlier reduction and ``dims``
    are among d1..dk, return ``root`` gathered once per dim with ``prev∘index`` (not a second full gather)."""
    if not dims or state.renumber:
        return None
    chain, root, prev = [], a, None
    while root.op == "call_function" and root.target is graphred_ops.gather_tokens.default and \
            (prev is None or root.args[1] is prev):
        prev = root.args[1]
        chain.append(root.args[2])
        root = root.args[0]
    if prev is None or not set(dims) <= set(chain) or node_shape(prev)[1] != old:
        return None
    key = (a, "composed")
    if key in state._gathered:
        return state._gathered[key]
    comp = state._gathered.get((prev, "index"))
    if comp is None:
        with graph.inserting_after(_last(graph, [prev, index])):
            comp = call_with_val(graph, graphred_ops.gather_tokens.default, (prev, index, 1))
        state._gathered[(prev, "index")] = comp
    x = root
    for d in reversed(chain):
        with graph.inserting_after(_last(graph, [x, comp])):
            x = call_with_val(graph, graphred_ops.gather_tokens.default, (x, comp, d))
    state._gathered[key] = x
    return x


def _fixed_parts(n: fx.Node, reduced: dict) -> tuple[int, list[int]] | None:
    """``(dim, sizes)`` where ``n`` splits a reduced dim of its input into parts of constant sizes."""
    if op_packet(n) not in (aten.split_with_sizes, aten.split) or not isinstance(n.args[0], fx.Node):
        return None
    sizes = n.args[1] if len(n.args) > 1 else None
    shape = recorded(n.args[0], ORIG_SHAPE) or node_shape(n.args[0])
    dim = (n.args[2] if len(n.args) > 2 else n.kwargs.get("dim", 0))
    if shape is None or not isinstance(dim, int):
        return None
    dim %= len(shape)
    if dim not in reduced.get(n.args[0], set()):
        return None
    if isinstance(sizes, int):
        sizes = [sizes] * (int(shape[dim]) // sizes) + ([int(shape[dim]) % sizes] if int(shape[dim]) % sizes else [])
    if not isinstance(sizes, (list, tuple)) or not all(isinstance(x, int) for x in sizes) or len(sizes) < 2:
        return None
    return dim, list(sizes)


def _split_message(split: tuple[int, int, list[int]]) -> str:
    return (f"the token axis is split here over dims {split[0]}..{split[1]} (sizes {split[2]}: a sequence made of "
            "equal parts, such as an image's tiles laid end to end, taken apart again); the reduction changed the "
            "length of the whole axis, so no part keeps its size. Reduce where the parts are not taken apart "
            "afterwards, or in each part apart")


def _split_axis(prov: TokenProvenance, node: fx.Node, streams) -> tuple[int, int, list[int]] | None:
    """``(first, last, sizes)`` when ``node`` (original shape) holds one of ``streams`` spread over several dims."""
    shape = recorded(node, ORIG_SHAPE) or node_shape(node)
    if shape is None:
        return None
    targets = {prov.find(s) for s in streams}
    for ax in prov.tokens(node).axes:
        if prov.find(ax.stream) in targets and prov.stream(ax.stream).kind == TOKENS:
            loc = locate(TokAxis(prov.find(ax.stream), ax.stride, ax.length), shape)
            if loc is not None and loc[0] != loc[1]:
                return loc[0], loc[1], list(shape[loc[0]:loc[1] + 1])
    return None


def _scales(size0: int, size1: int, old: int, new: int) -> bool:
    """A dim of ``size0`` = k * ``old`` that is now k * ``new``: it follows the tokens."""
    return old > 0 and size0 % old == 0 and size1 == size0 // old * new


def _respecialise_scaled_view(n: fx.Node, reduced: dict, old: int, new: int) -> bool:
    """A view of a reduced tensor with no analysed token dim (rows permuted for routing): the one size that is a
    multiple of the old length, and lies at or above the input's innermost reduced dim in the flat layout,
    becomes that multiple of the new one, where that alone matches the input's new element count. False (nothing
    changed) where no size, or more than one, fits."""
    sizes = list(n.args[1])
    src_shape = node_shape(n.args[0])
    want = _numel(src_shape)
    rdims = [d for d in reduced.get(n.args[0], set()) if 0 <= d < len(src_shape)]
    if not rdims or not all(isinstance(x, int) and x >= -1 for x in sizes) or old <= 0:
        return False
    inner = _numel(src_shape[max(rdims) + 1:])  # the flat stride of the innermost reduced dim
    if sizes.count(-1) == 1:  # the view infers that size itself: right where it is the one that grows
        d = sizes.index(-1)
        rest = -_numel(sizes)
        if _numel(sizes[d + 1:]) >= inner and rest > 0 and want % rest == 0 and \
                all(x % old != 0 or _numel(sizes[j + 1:]) < inner for j, x in enumerate(sizes) if j != d):
            return True
        # else the size that grows is another one: the inferred one keeps its size (the view's, before this rewrite)
        cur = node_shape(n)
        if not cur or len(cur) != len(sizes):
            return False
        full = sizes[:d] + [cur[d]] + sizes[d + 1:]
        fits = [j for j, x in enumerate(full) if j != d and _numel(full[j + 1:]) >= inner and x % old == 0
                and _numel(full) // x * (x // old * new) == want]
        if len(fits) != 1:
            return False
        sizes[fits[0]] = sizes[fits[0]] // old * new
        n.args = (n.args[0], sizes, *n.args[2:])
        return True
    if -1 in sizes or _numel(sizes) == want:
        return False
    fits = [d for d, x in enumerate(sizes) if _numel(sizes[d + 1:]) >= inner and x % old == 0
            and _numel(sizes) // x * (x // old * new) == want]
    if len(fits) != 1:
        return False
    sizes[fits[0]] = sizes[fits[0]] // old * new
    n.args = (n.args[0], sizes, *n.args[2:])
    return True


_VALUE_PASS = {aten.view, aten.reshape, aten._unsafe_view, aten.flatten, aten.clone, aten.contiguous, aten._to_copy,
               aten.alias, aten.detach, aten.lift_fresh_copy, aten.unsqueeze, aten.squeeze}
_ARG_POSITIONS = {aten.sort: (1, -1), aten.topk: (2, -1), aten.max: (1, None), aten.min: (1, None),
                  aten.kthvalue: (2, -1), aten.mode: (1, -1)}  # op -> (position of its dim argument, default)


def _runtime_positions(ix: fx.Node, reduced: dict) -> tuple[int, int] | None:
    """``(n, k)`` where the values of ``ix`` are positions along a reduced dim of current length ``n``, divided by
    ``k``, computed at run time from the reduced rows themselves (the index output of a sort/topk/argsort along
    that dim, its inverse permutation, views of those, floor division by a constant); None otherwise (positions
    read from an input or a constant would still number the tokens before the reduction)."""
    div = 1
    x = ix
    for _ in range(64):
        if not isinstance(x, fx.Node) or x.op != "call_function":
            return None
        pk = op_packet(x)
        if pk in _VALUE_PASS:
            x = x.args[0]
            continue
        if pk is aten.floor_divide and len(x.args) > 1 and isinstance(x.args[1], int) and x.args[1] > 0:
            div *= x.args[1]
            x = x.args[0]
            continue
        if pk in (aten.argsort, aten.argmax, aten.argmin) or (
                x.target is operator.getitem and x.args[1] == 1 and isinstance(x.args[0], fx.Node)
                and op_packet(x.args[0]) in _ARG_POSITIONS):
            op = x if pk in (aten.argsort, aten.argmax, aten.argmin) else x.args[0]
            where, default = (1, -1) if op is x else _ARG_POSITIONS[op_packet(op)]
            d = op.args[where] if len(op.args) > where else op.kwargs.get("dim", default)
            src = op.args[0]
            shape = node_shape(src)
            if d is None or not isinstance(d, int) or shape is None or src not in reduced:
                return None
            d %= len(shape)
            if d not in reduced[src]:
                return None
            return (shape[d], div) if shape[d] % div == 0 else None
        col = _nonzero_column(x)
        if col is not None:
            # column j of nonzero(src) (``torch.where(mask)``): positions along dim j of src, from its values
            src, j = col
            shape = node_shape(src)
            if src not in reduced or shape is None or j not in reduced[src]:
                return None
            return (shape[j], div) if shape[j] % div == 0 else None
        if pk in (aten.index_put, aten.index_put_) and len(x.args) >= 3 and len(x.args[1]) == 1:
            # inv[perm] = arange(n): the inverse permutation of positions along the same dim
            base, (perm,), vals = x.args[0], x.args[1], x.args[2]
            inner = _runtime_positions(perm, reduced) if isinstance(perm, fx.Node) else None
            if inner is None or inner[1] != 1 or not isinstance(vals, fx.Node) or op_packet(vals) is not aten.arange \
                    or node_shape(vals) != (inner[0],) or op_packet(base) not in (aten.empty_like, aten.zeros_like):
                return None
            return (inner[0], div) if inner[0] % div == 0 else None
        return None
    return None


_SIZE_ASSERTS = {aten._assert_scalar, aten.sym_constrain_range_for_size, aten.sym_constrain_range}
_COUNTED = {aten.nonzero, aten.argwhere}
_DIM_INDEX_OPS = {aten.index_add, aten.index_add_, aten.index_copy, aten.index_copy_, aten.index_fill,
                  aten.index_fill_, aten.index_select}


def _counted_dims(n: fx.Node) -> set[int]:
    """Dims of ``n`` whose size is a data-dependent count the rewrite made (an unbacked symbol: the rows a
    nonzero of reduced tokens selects, and what is computed from them)."""
    from torch.fx.experimental.symbolic_shapes import free_unbacked_symbols

    v = n.meta.get("val")
    if not isinstance(v, torch.Tensor):
        return set()
    return {d for d, s in enumerate(v.shape) if isinstance(s, torch.SymInt) and free_unbacked_symbols(s)}


def _nonzero_column(x: fx.Node) -> tuple[fx.Node, int] | None:
    """``(src, j)`` where ``x`` is column j of ``nonzero(src)`` (``unbind(1)[j]`` or ``select(1, j)``)."""
    if x.target is operator.getitem and isinstance(x.args[0], fx.Node) and op_packet(x.args[0]) is aten.unbind:
        ub, j = x.args[0], x.args[1]
        nz = ub.args[0]
        dim = ub.args[1] if len(ub.args) > 1 else ub.kwargs.get("dim", 0)
    elif op_packet(x) is aten.select:
        nz, dim, j = x.args[0], x.args[1], x.args[2]
    else:
        return None
    if not (isinstance(nz, fx.Node) and op_packet(nz) in _COUNTED and dim in (1, -1) and isinstance(j, int)):
        return None
    src = nz.args[0]
    shape = node_shape(src)
    if not isinstance(src, fx.Node) or shape is None or not -len(shape) <= j < len(shape):
        return None
    return src, j % len(shape)


def _check_runtime_positions(n, src, d, ix, reduced, pass_name):
    pos = _runtime_positions(ix, reduced)
    length = node_shape(src)[d]
    if pos is None or pos[0] // pos[1] != length:
        raise _fail("advanced indexing on the reduced token axis with positions not computed from the reduced "
                    "tokens (an input's or a constant's positions still number the tokens before the reduction)",
                    n, pass_name)


_ROWS_MASK = "graphred_rows_mask"  # meta of an ``x[mask]`` the rewrite re-made: its mask, at the current numbering


def _rows_mask(n: fx.Node, src: fx.Node, idxs, reduced: dict, old: int) -> fx.Node | None:
    """The ``[B, L]`` bool mask of ``x[mask]`` (``index`` with the mask, or with the columns of its ``nonzero``) that
    picks rows of ``x`` reduced on dim 1 (the tokens), else None."""
    if 1 not in reduced.get(src, set()) or 0 in reduced.get(src, set()):
        return None
    m = n.meta.get(_ROWS_MASK)
    if m is None and len(idxs) == 1 and isinstance(idxs[0], fx.Node) and idxs[0].meta.get("val") is not None \
            and idxs[0].meta["val"].dtype == torch.bool:
        m = idxs[0]
    elif m is None and len(idxs) == 2 and all(isinstance(i, fx.Node) and i.target is operator.getitem for i in idxs):
        ub = idxs[0].args[0]
        if ub is idxs[1].args[0] and [i.args[1] for i in idxs] == [0, 1] and op_packet(ub) is aten.unbind and \
                len(ub.args) > 1 and ub.args[1] in (1, -1) and op_packet(ub.args[0]) is aten.nonzero:
            m = ub.args[0].args[0]
    shape = node_shape(m) if isinstance(m, fx.Node) else None
    return m if shape is not None and len(shape) == 2 and shape[1] == old else None


def _fix_masked_rows(gm, n: fx.Node, m: fx.Node, index: fx.Node, old: int) -> None:
    """``x[mask]`` with ``x`` reduced on its tokens: the mask is gathered like the tokens and picks the kept rows, in
    order, into a fixed number of rows (as many as before, the kept ones first: a later ``masked_scatter`` with the
    gathered mask reads just those). Rows that an elementwise user meets (features packed one per masked position,
    added at those positions) are gathered alike, by each kept row's rank among the mask's positions."""
    graph = gm.graph
    rows, B = node_shape(n)[0], node_shape(m)[0]
    with graph.inserting_before(n):
        rank = call_with_val(graph, aten._to_copy.default, (m,), {"dtype": torch.long})
        rank = call_with_val(graph, aten.cumsum.default, (call_with_val(graph, aten.reshape.default, (rank, [-1])), 0))
        rank = call_with_val(graph, aten.view.default, (call_with_val(graph, aten.sub.Tensor, (rank, 1)), [B, old]))
        m2 = call_with_val(graph, graphred_ops.gather_tokens.default, (m, index, 1))
        rank = call_with_val(graph, graphred_ops.gather_tokens.default, (rank, index, 1))
        nz = call_with_val(graph, aten.nonzero_static.default, (m2,), {"size": rows, "fill_value": 0})
        ix = [call_with_val(graph, aten.select.int, (nz, 1, j)) for j in range(2)]
        which = call_with_val(graph, aten.clamp_min.default, (call_with_val(graph, aten.index.Tensor, (rank, ix)), 0))
    for x in (rank, m2, nz, *ix, which):
        record(x, SIDE, True)
    n.args = (n.args[0], ix)
    n.meta[_ROWS_MASK] = m2
    for u in list(n.users):
        if u.op != "call_function" or not is_pointwise(u):
            continue
        for a in u.all_input_nodes:
            ashape = node_shape(a)
            if a is not n and ashape and len(ashape) >= 1 and ashape[0] == rows and not recorded(a, SIDE):
                with graph.inserting_before(u):
                    ga = call_with_val(graph, aten.index_select.default, (a, 0, which))
                u.replace_input_with(a, ga)


def _fix_index_put(gm, n, reduced, reduced_inputs, pass_name):
    """``x[idx] = v`` touching the reduced rows: an index on a reduced dim of ``x`` must be positions computed
    from the reduced rows; ``v`` an ``arange`` over the old rows (an inverse permutation) is re-made over the new
    rows; ``v`` left at full length otherwise fails in ``set_fake_val``."""
    base, idxs, vals = n.args[0], list(n.args[1]), n.args[2]
    bdims = reduced.get(base, set()) if base in reduced_inputs else set()
    on_rows = [d for d, ix in enumerate(idxs) if isinstance(ix, fx.Node) and d in bdims]
    for d in on_rows:
        _check_runtime_positions(n, base, d, idxs[d], reduced, pass_name)
    if base not in reduced_inputs:  # a reduced index writing into a full-length tensor: its rows are gone
        raise _fail("positions computed from the reduced tokens write into a tensor that keeps the full length",
                    n, pass_name)
    if on_rows and isinstance(vals, fx.Node) and vals not in reduced_inputs and op_packet(vals) is aten.arange \
            and len(vals.args) == 1 and isinstance(vals.args[0], int):
        rows = node_shape(idxs[on_rows[0]])
        if rows is not None and len(rows) == 1 and rows[0] != vals.args[0]:
            with gm.graph.inserting_before(n):
                ar = call_with_val(gm.graph, aten.arange.default, (rows[0],), dict(vals.kwargs))
            n.replace_input_with(vals, ar)


def _numel(shape) -> int:
    out = 1
    for s in shape or ():
        out *= int(s)
    return out


def _samples_cat(prov, state, n, parts, on_axis, cdim):
    """The id of the stream ``n`` makes by concatenating, along the reduced token axis, parts that are each
    one sample of the reduced stream (``cat(unbind(x))``, ``cat(split(x))``: a ``[B*L, C]`` layout), else None."""
    if len(parts) < 2 or len(on_axis) != len(parts):
        return None
    mine = {state.stream} | state.aliases
    for t in parts:
        if not any(d == cdim for d, _ in stream_dims(prov, t, mine)):
            return None
    for d, st in prov.axes(n):
        if d == cdim and st.recipe and st.recipe[0] == "cat":
            return prov.find(st.id)
    return None


def _folded_dims(prov, state, n) -> dict[int, int]:
    """dim -> current length, for the dims of ``n`` that hold a folded (samples concatenated) stream."""
    if not state.folded:
        return {}
    return {d: state.folded[prov.find(st.id)] for d, st in prov.axes(n) if prov.find(st.id) in state.folded}


def _factor(sd, d):
    for dd, f in sd:
        if dd == d:
            return f
    return 1
