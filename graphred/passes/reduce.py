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
from ..analysis.provenance import TokenProvenance
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
    dims = list(range(1, len(shape) - 1))
    if dims:
        allowed = call_with_val(graph, aten.any.dims, (allowed, dims))
    if node_shape(allowed)[0] != rows:
        allowed = call_with_val(graph, aten.expand.default, (allowed, [rows, length]))
    return allowed


# ----------------------------------------------------------------------------- finding places
def residual_after(gm: fx.GraphModule, prov: TokenProvenance, block: AttentionBlock, stream: int) -> fx.Node:
    """The residual add that follows an attention block's output on ``stream`` (the place PuMer
    reduces: after the attention residual, before the MLP)."""
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
        if len(down) > 400:
            break
    raise PlanError(
        f"no residual add follows the attention at {block.module_path} on its token stream (for example, attention "
        "computed separately per image and concatenated), so there is no single tensor to reduce after it. "
        "Reduce at a layer whose attention output is added back to the token stream, or use another plan.")


def layer_input(gm: fx.GraphModule, prov: TokenProvenance, stack: str, layer: int, stream: int) -> fx.Node:
    """The tensor on ``stream`` that enters layer ``layer`` of ``stack`` from outside it."""
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
    raise PlanError(f"cannot find the input of layer {prefix}")


def key_source(gm: fx.GraphModule, prov: TokenProvenance, block: AttentionBlock, stream: int) -> fx.Node:
    """For a cross-attention: the tensor outside the attention module that its keys come from."""
    k = node_named(gm, block.key)
    parent = block.module_path.rsplit(".", 1)[0]
    n = k
    seen = 0
    while seen < 20:
        p = module_path(n)
        if not (p == parent or p.startswith(parent + ".")) or n.op != "call_function":
            return n
        nxt = [a for a in n.all_input_nodes if any(prov.find(s.id) == prov.find(stream) for _, s in prov.axes(a))]
        if not nxt:
            return n
        n = nxt[0]
        seen += 1
    return n
