"""ToMe's proportional attention: every attention after a merge adds ``log(size)`` of each key to its
logits, so a merged token weighs as the tokens it stands for."""
from __future__ import annotations

import torch
import torch.fx as fx

from ..errors import PlanError
from ..fx_utils import call_with_val, node_order, node_shape
from .infra import GraphredPass, PassResult
from .rewrite_state import Rewrite, RewriteState, StepPass

aten = torch.ops.aten


class ProportionalAttentionPass(GraphredPass):
    """For the streams a merge marked proportional (``RewriteState.proportional``), bias every later
    attention on them with ``log(sizes)``: SDPA gets an additive float mask, an unfused attention the bias
    before its softmax. Does nothing when no merge asked for it.

    >>> ProportionalAttentionPass.preserves >= {"Provenance", "Blocks", "Rewrite"}
    True
    """

    preserves = StepPass.preserves

    def call(self, gm: fx.GraphModule) -> PassResult:
        rs: RewriteState = self.analyses.get(Rewrite, gm)
        graph = gm.graph
        order = node_order(gm)
        changed = False
        for sid in rs.proportional:
            for b, att, (_, sizes) in rs.attentions_after(sid, rs.size_marks.get(sid, []), order):
                _bias(graph, att, b, sizes)
                changed = True
        return PassResult(gm, changed)


def _bias(graph: fx.Graph, att: fx.Node, b, sizes: fx.Node) -> None:
    with graph.inserting_before(att):
        bias = call_with_val(graph, aten.log.default, (sizes,))
        B, L = node_shape(bias)
        bias = call_with_val(graph, aten.view.default, (bias, [B, 1, 1, L]))
        if b.fused:
            if att.kwargs.get("is_causal"):
                raise PlanError(f"proportional attention at {b.module_path}: the attention uses is_causal=True, "
                                "which takes no additive mask; use proportional=False")
            mask = att.args[3] if len(att.args) > 3 else att.kwargs.get("attn_mask")
            q = att.args[0]
            if isinstance(mask, fx.Node):
                if mask.meta["val"].dtype == torch.bool:
                    zeros = call_with_val(graph, aten.zeros_like.default, (mask,), {"dtype": q.meta["val"].dtype})
                    mask = call_with_val(graph, aten.masked_fill.Scalar,
                                         (zeros, call_with_val(graph, aten.logical_not.default, (mask,)), float("-inf")))
                new_mask = call_with_val(graph, aten.add.Tensor, (mask, bias))
            else:
                new_mask = call_with_val(graph, aten._to_copy.default, (bias,), {"dtype": q.meta["val"].dtype})
            if len(att.args) > 3:
                args = list(att.args)
                args[3] = new_mask
                att.args = tuple(args)
            else:
                att.kwargs = {**att.kwargs, "attn_mask": new_mask}
        else:
            scores = att.args[0]
            sshape = node_shape(scores)
            if len(sshape) == 3:  # heads folded into the batch: [B*H, Lq, Lk]
                heads = sshape[0] // B
                bias = call_with_val(graph, aten.expand.default, (bias, [B, heads, 1, L]))
                bias = call_with_val(graph, aten.reshape.default, (bias, [B * heads, 1, L]))
            biased = call_with_val(graph, aten.add.Tensor, (scores, bias))
            att.args = (biased,) + tuple(att.args[1:])
