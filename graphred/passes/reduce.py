"""Where the reductions go, and the run-time values they need.

* places: :func:`residual_after` (the residual add after an attention block: PuMer, ToMe),
  :func:`layer_input` (the tensor entering a layer: FastV), :func:`key_source` (the tensor a
  cross-attention's keys come from);
* run-time values: :func:`emit_codes` (each position's modality, from the same graph values the
  provenance analysis read) and :func:`emit_valid` (key validity from an attention mask).

The step passes (:mod:`.pumer`, :mod:`.fastv`, :mod:`.tome`) use them through :mod:`.prune_merge`.
"""
from __future__ import annotations

import torch
import torch.fx as fx

from ..analysis.blocks import AttentionBlock
from ..analysis.provenance import CODE, REGISTER, TokenProvenance
from ..errors import PlanError
from ..fx_utils import call_with_val, fake_like, graph_device, module_path, node_named, node_order, node_shape, op_packet

aten = torch.ops.aten
gr = torch.ops.graphred


# ----------------------------------------------------------------------------- graph builders
def _reduce_mask_to(graph, m: fx.Node, keep_dim: int) -> fx.Node:
    """bool mask of any rank -> [B, L] keeping dim 0 and ``keep_dim`` (any over the rest)."""
    shape = node_shape(m)
    if len(shape) == 1:
        return call_with_val(graph, aten.unsqueeze.default, (m, 0))
    dims = [i for i in range(len(shape)) if i not in (0, keep_dim % len(shape))]
    if dims:
        m = call_with_val(graph, aten.any.dims, (m, dims))
    return m


def emit_codes(gm: fx.GraphModule, prov: TokenProvenance, sid: int, cache: dict) -> fx.Node:
    """Emit nodes computing the modality codes ``[B|1, L]`` (int8) of stream ``sid`` at run time,
    from the same graph values the analysis read (masks of scatters, cat structure, slices)."""
    sid = prov.find(sid) if sid not in cache else sid
    if sid in cache:
        return cache[sid]
    st = prov.streams[sid]
    graph = gm.graph
    r = st.recipe
    if r[0] == "uniform" or st.codes is not None and r[0] in ("cat", "slice") and st.codes.shape[0] == 1:
        codes = st.codes if st.codes is not None else torch.full((1, st.length), r[1], dtype=torch.int8)
        name = f"_graphred_codes_{sid}"
        buf = codes[:1].clone().to(graph_device(gm))
        gm.register_buffer(name, buf, persistent=False)
        out = graph.get_attr(name)
        out.meta["val"] = fake_like(gm, buf)
    elif r[0] == "mask":
        _, base, mask, d, code = r
        b = emit_codes(gm, prov, base, cache)
        m = call_with_val(graph, aten._to_copy.default, (mask,), {"dtype": torch.bool})
        m = _reduce_mask_to(graph, m, d)
        out = call_with_val(graph, aten.where.ScalarSelf, (m, code, b))
        out = call_with_val(graph, aten._to_copy.default, (out,), {"dtype": torch.int8})
    elif r[0] == "index_put":
        _, base, indices, d, code = r
        b = emit_codes(gm, prov, base, cache)
        origin = node_named(gm, st.origin)
        z = call_with_val(graph, aten.zeros_like.default, (origin,), {"dtype": torch.bool})
        t = call_with_val(graph, aten.scalar_tensor.default, (True,), {"dtype": torch.bool, "device": graph_device(graph.owning_module)})
        m = call_with_val(graph, aten.index_put.default, (z, list(indices), t))
        m = _reduce_mask_to(graph, m, d)
        out = call_with_val(graph, aten.where.ScalarSelf, (m, code, b))
        out = call_with_val(graph, aten._to_copy.default, (out,), {"dtype": torch.int8})
    elif r[0] == "cat":
        parts = []
        for p, n in r[1]:
            if isinstance(p, int):
                parts.append(emit_codes(gm, prov, p, cache))
            else:
                raise PlanError("a stream built from learned segments and a data-dependent layout is not supported")
        rows = max(node_shape(p)[0] for p in parts)
        parts = [call_with_val(graph, aten.expand.default, (p, [rows, node_shape(p)[1]])) for p in parts]
        out = call_with_val(graph, aten.cat.default, (parts, 1))
    elif r[0] == "slice":
        _, parent, s0, e0, step = r
        pcodes = emit_codes(gm, prov, parent, cache)
        out = call_with_val(graph, aten.slice.Tensor, (pcodes, 1, s0, e0, step))
    elif r[0] == "tiles":  # the parent's layout once per tile
        _, parent, n = r
        pcodes = emit_codes(gm, prov, parent, cache)
        out = call_with_val(graph, aten.repeat.default, (pcodes, [1, n]))
    elif r[0] == "padded":  # the parent's layout, then the padding (register codes)
        _, parent, n = r
        pcodes = emit_codes(gm, prov, parent, cache)
        out = call_with_val(graph, aten.constant_pad_nd.default, (pcodes, [0, st.length - n], CODE[REGISTER]))
    else:
        raise PlanError(f"stream {sid} has no run-time layout ({r[0]})")
    cache[sid] = out
    return out


def emit_valid(graph: fx.Graph, mask: fx.Node | None, length: int, rows: int) -> fx.Node:
    """``[B, L]`` bool: key positions some query may attend to (padding excluded), from an attention
    mask of any rank (bool = attend, float = additive)."""
    if mask is None:
        return call_with_val(graph, aten.ones.default, ([rows, length],), {"dtype": torch.bool, "device": graph_device(graph.owning_module)})
    v = mask.meta["val"]
    if v.dtype == torch.bool:
        allowed = mask
    else:
        allowed = call_with_val(graph, aten.gt.Scalar, (mask, torch.finfo(v.dtype).min / 2))
    shape = node_shape(mask)
    if len(shape) == 2:  # [queries, keys], no batch dim (it broadcasts over [B, H, Lq, Lk])
        allowed = call_with_val(graph, aten.any.dims, (allowed, [0], True))
    dims = list(range(1, len(shape) - 1))
    if dims:
        allowed = call_with_val(graph, aten.any.dims, (allowed, dims))
    if node_shape(allowed)[0] != rows:
        allowed = call_with_val(graph, aten.expand.default, (allowed, [rows, length]))
    return allowed


# ----------------------------------------------------------------------------- finding places
def _joined_state(prov: TokenProvenance, n: fx.Node, down: set, stream: int) -> fx.Node | None:
    """Where the attention's output is not added back but stacked with the earlier states of the stream (a
    ``cat``/``stack`` on a dim that is neither the tokens nor the features, e.g. attention residuals that mix the
    states of earlier blocks per token): the attention-path operand of that join, the new state of each token."""
    if n.op != "call_function" or op_packet(n) not in (aten.cat, aten.stack) or not n.args or \
            not isinstance(n.args[0], (list, tuple)):
        return None
    shape = node_shape(n)
    parts = [a for a in n.args[0] if isinstance(a, fx.Node)]
    dim = n.args[1] if len(n.args) > 1 else n.kwargs.get("dim", 0)
    if not shape or len(parts) != len(n.args[0]) or not isinstance(dim, int):
        return None
    dim %= len(shape)
    sdims = [d for d, s in prov.axes(n) if prov.find(s.id) == prov.find(stream)]
    if not sdims or dim in sdims or dim == len(shape) - 1:
        return None
    mine = [a for a in parts if a in down]
    others = [a for a in parts if a not in down]
    if len(mine) != 1 or not others or not all(
            any(prov.find(s.id) == prov.find(stream) for _, s in prov.axes(a)) for a in others):
        return None
    point = mine[0]
    if op_packet(point) is aten.unsqueeze and isinstance(point.args[0], fx.Node):  # (the join's new dim)
        point = point.args[0]
    return point


def residual_after(gm: fx.GraphModule, prov: TokenProvenance, block: AttentionBlock, stream: int) -> fx.Node:
    """The residual add that follows an attention block's output on ``stream`` (the place PuMer
    reduces: after the attention residual, before the MLP); where the output is stacked with the stream's earlier
    states instead of added (attention residuals over blocks of layers), the output where it joins them."""
    out = node_named(gm, block.output)
    down = {out}
    order = node_order(gm)
    for n in list(gm.graph.nodes)[order[out] + 1:]:
        if any(a in down for a in n.all_input_nodes):
            down.add(n)
            if op_packet(n) is aten.add and n.op == "call_function":
                others = [a for a in n.all_input_nodes if a not in down]
                if others and any(prov.find(s.id) == prov.find(stream) for _, s in prov.axes(n)):
                    return n
            joined = _joined_state(prov, n, down, stream)
            if joined is not None:
                return joined
        if len(down) > 400:
            break
    raise PlanError(
        f"no residual add follows the attention at {block.module_path} (its output node {block.output}) on its token "
        "stream (for example, attention computed separately per image and concatenated), so there is no single "
        "tensor to reduce after it. Reduce at a layer whose attention output is added back to the token stream, or "
        "use another plan.", node=block.output, module_path=block.module_path)


def token_streams(prov: TokenProvenance, node: fx.Node, length: int | None = None) -> list[int]:
    """Canonical ids of the token streams ``node`` holds on whole dims (of ``length`` tokens, if given)."""
    return [prov.find(s.id) for _, s in prov.axes(node) if length is None or s.length == length]


def layer_boundary(gm: fx.GraphModule, prov: TokenProvenance, block: AttentionBlock) -> fx.Node | None:
    """The tensor entering the layer of ``block``, found from the graph's structure alone: the nearest
    dominator of the attention's query, over the nodes that carry a token sequence of the query's length,
    that also feeds the computation after the attention output (the residual skip around the attention,
    whether norms come before or after, whatever the layer's module path). None where no such node exists
    (no skip connection)."""
    import networkx as nx

    q, out = node_named(gm, block.query), node_named(gm, block.output)
    lengths = [s.length for d, s in prov.axes(q)] or [None]
    length = node_shape(q)[-2] if node_shape(q) and len(node_shape(q)) >= 2 else lengths[0]
    order = node_order(gm)
    g = nx.DiGraph()
    src = "__source__"
    for n in gm.graph.nodes:
        if order[n] > order[q]:
            break
        if not token_streams(prov, n, length):
            continue
        ins = [a for a in n.all_input_nodes if a in g]
        g.add_node(n)
        for a in ins:
            g.add_edge(a, n)
        if not ins:
            g.add_edge(src, n)
    if q not in g:
        return None
    idom = nx.immediate_dominators(g, src)
    down, limit = {out}, order[out] + 600  # the computation after the attention output (the layer's rest)
    for n in list(gm.graph.nodes)[order[out] + 1:]:
        if order[n] > limit:
            break
        if any(a in down for a in n.all_input_nodes):
            down.add(n)
    d = idom.get(q)
    while d is not None and d != src:
        if any(u in down for u in d.users):
            return d
        d = idom.get(d)
    return None


def layer_input(gm: fx.GraphModule, prov: TokenProvenance, stack: str, layer: int, stream: int,
                block: AttentionBlock | None = None) -> fx.Node:
    """The tensor on ``stream`` that enters layer ``layer`` of ``stack`` from outside it. With ``block`` (the
    layer's attention), found structurally first (:func:`layer_boundary`), then by module path."""
    if block is not None:
        found = layer_boundary(gm, prov, block)
        if found is not None:
            return found
    prefix = f"{stack}.{layer}"
    for n in gm.graph.nodes:
        p = module_path(n)
        if n.op != "call_function" or not (p == prefix or p.startswith(prefix + ".")):
            continue
        for a in n.all_input_nodes:
            ap = module_path(a)
            if (ap == prefix or ap.startswith(prefix + ".")) and a.op == "call_function":
                continue
            if any(prov.find(s.id) == prov.find(stream) for _, s in prov.axes(a)):
                return a
    raise PlanError(f"cannot find the input of layer {prefix}: no tensor on its token stream enters the layer's "
                    "modules from outside, and no skip connection around its attention was found in the graph")


_SHAPE_ONLY = {aten.expand, aten.unsqueeze, aten.view, aten.reshape, aten._unsafe_view, aten.clone, aten.contiguous}


def key_source(gm: fx.GraphModule, prov: TokenProvenance, block: AttentionBlock, stream: int) -> fx.Node:
    """For a cross-attention: the tensor outside the attention module that its keys come from."""
    k = node_named(gm, block.key)
    parent = block.module_path.rsplit(".", 1)[0]

    def carries(x):
        return any(prov.find(s.id) == prov.find(stream) for _, s in prov.axes(x))

    n = good = k
    chain: list[fx.Node] = []  # the tensors on the stream from the keys upward
    seen = 0
    while seen < 20:
        if carries(n):
            good = n
            chain.append(n)
        p = module_path(n)
        if not (p == parent or p.startswith(parent + ".")) or n.op != "call_function":
            break
        nxt = [a for a in n.all_input_nodes if carries(a)]
        if not nxt and op_packet(n) in _SHAPE_ONLY and isinstance(n.args[0], fx.Node):
            # (grouped-query keys repeated by expand: a view of the keys, whatever the analysis tracked there)
            nxt = [n.args[0]]
        if not nxt:
            break
        n = nxt[0]
        seen += 1
    # the furthest tensor up the chain that still holds the stream on a whole dim (keys computed per layer from
    # another layout, e.g. tiles in the batch, are reduced in that layer only) and that something after the
    # attention still reads: a layer input read only before the scores (co-attention layers that update the
    # image stream before their cross-attention) would make a cut that changes nothing, so the cut goes to the
    # stream's value that later ops read (the one the keys come from)
    if carries(n):
        if not chain or chain[-1] is not n:  # (the walk stopped after a step, before looking at n)
            chain.append(n)
        order = node_order(gm)
        after = order[node_named(gm, block.output)]
        read_later = [c for c in chain if any(order[u] > after for u in c.users)]
        return read_later[-1] if read_later else n
    if module_path(good) == parent or module_path(good).startswith(parent + "."):
        import warnings

        from ..errors import GraphredWarning

        warnings.warn(GraphredWarning(
            f"keys of {block.module_path}: the image tokens first hold a dim of their own at {good.name} (module "
            f"{module_path(good)}), inside the layer; {n.name} (module {module_path(n) or '<top>'}) computes them from "
            "a layout where they are folded with another dim that no unfolding view could replace, so the cut "
            "shortens this layer's keys only, after its scores, and no later layer reads fewer tokens"), stacklevel=3)
    return good
