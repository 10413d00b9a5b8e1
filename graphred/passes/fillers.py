"""Filler slots of uneven batches: keep every attention off them.

When the samples of a batch hold different numbers of image tokens (multi-image prompts, per-sample
image sizes), a reduction keeps per-sample counts: each sample drops its own share, and the batch keeps
the largest kept length. A sample that dropped more keeps some of its dropped tokens in the extra slots,
flagged as fillers (``graphred::select_tokens_padded``). :class:`FillerMaskPass` masks the filler keys
in every attention that runs after them, so no real token attends to a filler and the fillers never
reach a real token's output; a filler query keeps its own row (a fully masked row would be NaN, and a
NaN value would reach other rows through ``0 * NaN``).
"""
from __future__ import annotations

import torch
import torch.fx as fx

from ..errors import PlanError
from ..fx_utils import call_with_val, graph_device, node_order, node_shape, op_packet
from .infra import GraphredPass, PassResult
from .rewrite_state import Rewrite, RewriteState, StepPass

aten = torch.ops.aten


def _masked_where(graph: fx.Graph, filler_k: fx.Node, filler_q: fx.Node | None, lq: int) -> fx.Node:
    """``[B, 1, Lq, Lk]`` bool: True where a query must not see a key (the key is a filler, the query is not)."""
    b, lk = node_shape(filler_k)
    cond = call_with_val(graph, aten.view.default, (filler_k, [b, 1, 1, lk]))
    if filler_q is not None:
        real_q = call_with_val(graph, aten.logical_not.default, (filler_q,))
        real_q = call_with_val(graph, aten.view.default, (real_q, [b, 1, lq, 1]))
        cond = call_with_val(graph, aten.logical_and.default, (cond, real_q))
    else:
        cond = call_with_val(graph, aten.expand.default, (cond, [b, 1, lq, lk]))
    return cond


def mask_fillers(graph: fx.Graph, mask: fx.Node | None, filler_k: fx.Node, filler_q: fx.Node | None, lq: int,
                 dtype: torch.dtype) -> fx.Node:
    """An attention mask like ``mask`` (bool = attend, float = additive, or None) that also keeps real queries
    off the filler keys; inserted at the graph's current insertion point."""
    cond = _masked_where(graph, filler_k, filler_q, lq)
    if mask is None:
        return call_with_val(graph, aten.logical_not.default, (cond,))
    if mask.meta["val"].dtype == torch.bool:
        return call_with_val(graph, aten.logical_and.default,
                             (mask, call_with_val(graph, aten.logical_not.default, (cond,))))
    return call_with_val(graph, aten.where.ScalarSelf, (cond, torch.finfo(mask.meta["val"].dtype).min, mask))


class FillerMaskPass(GraphredPass):
    """For every stream a reduction padded with filler slots (``RewriteState.filler_marks``), mask the filler
    keys in every later attention on it: SDPA's mask (bool or additive; a causal SDPA without a mask gets an
    explicit causal one), an unfused attention's logits before the softmax. Does nothing on even batches.

    >>> FillerMaskPass.preserves >= {"Provenance", "Blocks", "Rewrite"}
    True
    """

    preserves = StepPass.preserves

    def call(self, gm: fx.GraphModule) -> PassResult:
        rs: RewriteState = self.analyses.get(Rewrite, gm)
        graph = gm.graph
        order = node_order(gm)
        changed = False
        for sid, marks in rs.filler_marks.items():
            for b, att, (_, filler) in rs.attentions_after(sid, marks, order):
                if filler is None:
                    continue
                same = b.query_stream is not None and rs.prov.find(b.query_stream) == sid
                _mask(graph, att, b, filler, same)
                changed = True
        return PassResult(gm, changed)


def _mask(graph: fx.Graph, att: fx.Node, b, filler: fx.Node, same: bool) -> None:
    with graph.inserting_before(att):
        if b.fused:
            q = att.args[0]
            lq = node_shape(q)[-2]
            mask = att.args[3] if len(att.args) > 3 else att.kwargs.get("attn_mask")
            mask = mask if isinstance(mask, fx.Node) else None
            causal = att.kwargs.get("is_causal") or (len(att.args) > 5 and att.args[5] is True)
            if causal and mask is None:  # SDPA takes is_causal or a mask: make the causal mask explicit
                lk = node_shape(filler)[-1]
                ones = call_with_val(graph, aten.ones.default, ([lq, lk],),
                                     {"dtype": torch.bool, "device": graph_device(graph.owning_module)})
                mask = call_with_val(graph, aten.tril.default, (ones,))
            elif causal:
                raise PlanError(f"filler slots at {b.module_path}: the attention takes both a mask and is_causal=True; "
                                "graphred cannot combine them")
            new_mask = mask_fillers(graph, mask, filler, filler if same else None, lq, q.meta["val"].dtype)
            if len(att.args) > 3:
                args = list(att.args)
                args[3] = new_mask
                if len(args) > 5:
                    args[5] = False
                att.args = tuple(args)
            else:
                att.kwargs = {**att.kwargs, "attn_mask": new_mask}
            if causal:
                att.kwargs = {**att.kwargs, "is_causal": False}
        else:
            _mask_scores(graph, att, b, filler, same)


def _mask_scores(graph: fx.Graph, att: fx.Node, b, filler: fx.Node, same: bool) -> None:
    """An unfused attention (``att``, its softmax): the filler keys' logits to the dtype's minimum."""
    scores, joined = att.args[0], None
    if node_shape(scores)[-1] != node_shape(filler)[-1]:
        # columns joined to the scores on the key dim (an attention sink's logit): mask the keys' part
        joined = scores
        while op_packet(joined) in (aten._to_copy, aten.to, aten.clone, aten.contiguous):  # (a cast after the join)
            joined = joined.args[0]
        shape = node_shape(joined)
        parts = list(joined.args[0]) if op_packet(joined) in (aten.cat, aten.concat) else []
        keys = [p for p in parts if isinstance(p, fx.Node) and node_shape(p)[-1] == node_shape(filler)[-1]]
        dim = joined.args[1] if len(joined.args) > 1 else 0
        if len(keys) != 1 or dim % len(shape) != len(shape) - 1:
            raise PlanError(f"filler slots at {b.module_path}: the logits before the softmax ({scores.name}) are neither "
                            "the keys' logits nor those joined with other columns on the key dim; graphred cannot mask "
                            "the filler keys there", node=scores.name, module_path=b.module_path)
        scores = keys[0]
    with graph.inserting_before(joined if joined is not None else att):
        sshape = node_shape(scores)
        lq = sshape[-2]
        cond = _masked_where(graph, filler, filler if same else None, lq)
        B = node_shape(filler)[0]
        if len(sshape) == 3:  # heads folded into the batch: [B*H, Lq, Lk]
            heads = sshape[0] // B
            cond = call_with_val(graph, aten.expand.default, (cond, [B, heads, lq, sshape[-1]]))
            cond = call_with_val(graph, aten.reshape.default, (cond, [B * heads, lq, sshape[-1]]))
        masked = call_with_val(graph, aten.where.ScalarSelf, (cond, torch.finfo(scores.meta["val"].dtype).min, scores))
    if joined is not None:
        joined.replace_input_with(scores, masked)
    else:
        att.args = (masked,) + tuple(att.args[1:])
