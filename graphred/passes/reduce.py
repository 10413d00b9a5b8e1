"""Reduction passes: text-informed pruning and modality-aware merging (PuMer), FastV, ToMe.

Each step finds its attention blocks through the analysis, inserts a small side computation
(scores from the block's own query/key tensors, never eager attention), a selection
(``graphred::select_tokens`` / ``graphred::bipartite_match``) and hands the kept indices to the
token-axis rewrite (:func:`graphred.passes.token_axis.reduce_stream`).
"""
from __future__ import annotations

import torch
import torch.fx as fx

from ..analysis.blocks import CROSS_ATTENTION, CROSS_MODAL_SELF, AttentionBlock
from ..analysis.provenance import CODE, IMAGE, TEXT, TokenProvenance, _packet, _shape
from ..errors import PlanError
from ..fx_utils import module_path
from .infra import set_fake_val
from .token_axis import StreamState, _call, reduce_stream

aten = torch.ops.aten
gr = torch.ops.graphred


# ----------------------------------------------------------------------------- graph builders
def _node(gm: fx.GraphModule, name: str) -> fx.Node:
    for n in gm.graph.nodes:
        if n.name == name:
            return n
    raise KeyError(name)


def _order(gm):
    return {n: i for i, n in enumerate(gm.graph.nodes)}


def _reduce_mask_to(graph, m: fx.Node, keep_dim: int) -> fx.Node:
    """bool mask of any rank -> [B, L] keeping dim 0 and ``keep_dim`` (any over the rest)."""
    shape = _shape(m)
    if len(shape) == 1:
        return _call(graph, aten.unsqueeze.default, (m, 0))
    dims = [i for i in range(len(shape)) if i not in (0, keep_dim % len(shape))]
    if dims:
        m = _call(graph, aten.any.dims, (m, dims))
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
        out.meta["val"] = _fake_like(gm, buf)
    elif r[0] == "mask":
        _, base, mask, d, code = r
        b = emit_codes(gm, prov, base, cache)
        m = _call(graph, aten._to_copy.default, (mask,), {"dtype": torch.bool})
        m = _reduce_mask_to(graph, m, d)
        out = _call(graph, aten.where.ScalarSelf, (m, code, b))
        out = _call(graph, aten._to_copy.default, (out,), {"dtype": torch.int8})
    elif r[0] == "index_put":
        _, base, indices, d, code = r
        b = emit_codes(gm, prov, base, cache)
        origin = _node(gm, st.origin)
        z = _call(graph, aten.zeros_like.default, (origin,), {"dtype": torch.bool})
        t = _call(graph, aten.scalar_tensor.default, (True,), {"dtype": torch.bool, "device": graph_device(graph.owning_module)})
        m = _call(graph, aten.index_put.default, (z, list(indices), t))
        m = _reduce_mask_to(graph, m, d)
        out = _call(graph, aten.where.ScalarSelf, (m, code, b))
        out = _call(graph, aten._to_copy.default, (out,), {"dtype": torch.int8})
    elif r[0] == "cat":
        parts = []
        for p, n in r[1]:
            if isinstance(p, int):
                parts.append(emit_codes(gm, prov, p, cache))
            else:
                raise PlanError("a stream built from learned segments and a data-dependent layout is not supported")
        rows = max(_shape(p)[0] for p in parts)
        parts = [_call(graph, aten.expand.default, (p, [rows, _shape(p)[1]])) for p in parts]
        out = _call(graph, aten.cat.default, (parts, 1))
    elif r[0] == "slice":
        _, parent, s0, e0, step = r
        pcodes = emit_codes(gm, prov, parent, cache)
        out = _call(graph, aten.slice.Tensor, (pcodes, 1, s0, e0, step))
    else:
        raise PlanError(f"stream {sid} has no run-time layout ({r[0]})")
    cache[sid] = out
    return out


def graph_device(gm: fx.GraphModule) -> torch.device:
    """The device the graph's inputs live on (meta for a program captured without weights)."""
    for n in gm.graph.nodes:
        v = n.meta.get("val")
        if n.op == "placeholder" and isinstance(v, torch.Tensor):
            return v.device
    return torch.device("cpu")


def _fake_like(gm, t: torch.Tensor):
    from torch._guards import detect_fake_mode

    from .infra import _graph_fake_mode

    return _graph_fake_mode(gm.graph).from_tensor(t)


def emit_valid(graph: fx.Graph, mask: fx.Node | None, length: int, rows: int) -> fx.Node:
    """``[B, L]`` bool: key positions some query may attend to (padding excluded), from an attention
    mask of any rank (bool = attend, float = additive)."""
    if mask is None:
        return _call(graph, aten.ones.default, ([rows, length],), {"dtype": torch.bool, "device": graph_device(graph.owning_module)})
    v = mask.meta["val"]
    if v.dtype == torch.bool:
        allowed = mask
    else:
        allowed = _call(graph, aten.gt.Scalar, (mask, torch.finfo(v.dtype).min / 2))
    shape = _shape(mask)
    dims = list(range(1, len(shape) - 1))
    if dims:
        allowed = _call(graph, aten.any.dims, (allowed, dims))
    if _shape(allowed)[0] != rows:
        allowed = _call(graph, aten.expand.default, (allowed, [rows, length]))
    return allowed


# ----------------------------------------------------------------------------- finding places
def residual_after(gm: fx.GraphModule, prov: TokenProvenance, block: AttentionBlock, stream: int) -> fx.Node:
    """The residual add that follows an attention block's output on ``stream`` (the place PuMer
    reduces: after the attention residual, before the MLP)."""
    out = _node(gm, block.output)
    down = {out}
    order = _order(gm)
    for n in list(gm.graph.nodes)[order[out] + 1:]:
        if any(a in down for a in n.all_input_nodes):
            down.add(n)
            if _packet(n) is aten.add and n.op == "call_function":
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
    k = _node(gm, block.key)
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
