"""Fewer image tokens than placeholders: shrink the placeholder spans of the sequence they are scattered into.

A decoder VLM writes its vision tower's tokens into the text embeddings at placeholder positions
(``masked_scatter`` with a mask of the image-token ids). When a reduction inside the vision tower (ToMe)
leaves ``K`` of every ``N`` tokens, the scatter receives ``K/N`` of the rows its placeholders expect.
:func:`shrink_placeholders` keeps, in every image run of the destination (a maximal run of placeholder
positions), its first ``run * K / N`` positions and every text position: a reduction of the destination
stream like any other (:func:`graphred.passes.token_axis.reduce_stream`), so its masks, position ids,
rotary tables and labels follow. The kept image positions keep their original position ids (the text after
an image keeps its own), as after a FastV or PuMer reduction in the decoder.

Nothing here knows a model: the destination stream, its modality codes and the ratio are read from the
graph and the token provenance.
"""
from __future__ import annotations

import torch
import torch.fx as fx

from .. import ops as _ops  # noqa: F401  (registers graphred:: ops)
from ..analysis.provenance import IMAGE, TOKENS
from ..fx_utils import SIDE, call_with_val, module_path, node_shape, record
from .token_axis import ReductionError, reduce_stream, stream_dims

gr = torch.ops.graphred

__all__ = ["shrink_placeholders", "only_shrunk", "PLACEHOLDER_OP"]

PLACEHOLDER_OP = "shrink_placeholders"  # the op name in the rewrite log and stream history


def _refuse(msg: str, node: fx.Node, pass_name: str) -> ReductionError:
    where = f" at node {node.name} (module {module_path(node) or '<top>'})"
    return ReductionError(f"{pass_name}: {msg}{where}", pass_name=pass_name, node=node.name,
                          module_path=module_path(node))


def shrink_placeholders(rs, gm: fx.GraphModule, scatter: fx.Node, rows0: int, rows1: int, pass_name: str) -> bool:
    """``scatter`` (``masked_scatter(dest, mask, source)``) now receives ``rows1`` of its ``rows0`` source rows:
    reduce the destination's token stream so each image run keeps ``run * rows1 / rows0`` placeholders. Returns
    True (done); raises a :class:`ReductionError` naming the obstacle, the node and its module path where the
    shrink is not sound."""
    prov = rs.prov
    dest = scatter.args[0]
    cands = [(d, s) for d, s in prov.axes(scatter) if s.kind == TOKENS]
    mine = [(d, s) for d, s in cands if s.origin == scatter.name or s.recipe and s.recipe[0] == "mask"]
    if not mine:
        raise _refuse("the reduced tokens are scattered into a tensor with no token sequence the analysis traced, so "
                      "its placeholders cannot shrink with them; reduce after the tokens enter the sequence instead",
                      scatter, pass_name)
    dim, stream = mine[0]
    sid = prov.find(stream.id)
    st = rs.state(sid, step_name=pass_name)
    again = st.abs_index is not None  # a later layer of the tower reduced again: shrink the shrunk spans
    if again and not only_shrunk(st):
        raise _refuse("the sequence the image tokens are scattered into was already reduced by a decoder step; list "
                      "vision-tower steps (tome) before decoder steps", scatter, pass_name)
    n_img = rs.counts[sid].get(IMAGE, 0)
    shape = node_shape(scatter)
    batch = shape[0] if dim != 0 else 1
    if again:  # the rows the scatter received so far: the placeholders left by the previous shrinks
        rows0 = n_img * batch
    if n_img == 0 or rows0 != n_img * batch:
        raise _refuse(f"the scatter writes {rows0} image rows but its sequence holds {n_img} image placeholders per "
                      f"sample ({batch} samples): not one row per placeholder, so the placeholders cannot shrink "
                      "with the rows", scatter, pass_name)
    info = prov.streams[sid]
    runs = [r * n_img // rs.prov.streams[sid].counts()[0].get(IMAGE, n_img) for r in _runs(info.codes)]  # current
    bad = sorted({r for r in runs if r * rows1 % rows0})
    if bad or n_img * rows1 % rows0:
        raise _refuse(f"image runs of {bad or [n_img]} placeholders cannot shrink by {rows1}/{rows0} (the rows the "
                      "vision tower now writes); choose an r that leaves a whole number of tokens per image",
                      scatter, pass_name)
    k_img = n_img * rows1 // rows0
    new_len = st.length - (n_img - k_img)
    graph = gm.graph
    codes = rs.codes(sid, scatter)
    with graph.inserting_before(scatter):
        keep = call_with_val(graph, gr.shrink_image_runs.default, (codes, rows1, rows0, new_len))
    record(keep, SIDE, True)
    point_dims = stream_dims(prov, dest, {sid} | {prov.find(p) for p in info.parents})
    dest_dim = point_dims[0][0] if point_dims else dim
    g = reduce_stream(gm, prov, st, scatter.args[0], keep, new_len, pass_name=pass_name, dim=dest_dim)
    st.history.append({"op": PLACEHOLDER_OP, "node": scatter.name, "abs_index": st.abs_index})
    rs.counts[sid][IMAGE] = k_img
    rs.last_point[sid] = g
    rs.log.append({"step": rs.step, "op": PLACEHOLDER_OP, "block": module_path(scatter) or "<top>",
                   f"{IMAGE}_before": n_img, f"{IMAGE}_after": k_img, "length_after": new_len})
    rs.subs.append((g.name, {"stream": sid, IMAGE: k_img}))
    return True


def only_shrunk(st) -> bool:
    """Whether every reduction of the stream state ``st`` so far is a placeholder shrink (its tokens are the
    original ones less the image placeholders a reduced vision tower no longer fills)."""
    if st.abs_index is None:
        return True
    last = st.history[-1] if st.history else {}
    return last.get("op") == PLACEHOLDER_OP and last.get("abs_index") is st.abs_index


def _runs(codes) -> list[int]:
    """Lengths of every image run (maximal run of image codes) in ``codes`` ``[B, L]``."""
    from ..analysis.provenance import CODE

    out = []
    if codes is None:
        return out
    for row in (codes == CODE[IMAGE]).tolist():
        n = 0
        for v in row + [False]:
            if v:
                n += 1
            elif n:
                out.append(n)
                n = 0
    return out
