"""Finding attention in an aten graph: fused (``scaled_dot_product_attention`` and its kernels) or
unfused (Q·Kᵀ matmul -> scale/mask -> softmax -> probs·V matmul). Structure only: no provenance.
Used by the provenance analysis (attention masks' values tell causality) and by block detection."""
from __future__ import annotations

import operator

import torch
import torch.fx as fx

from ..fx_utils import node_shape, op_packet
from .op_tables import SDPA

aten = torch.ops.aten

MATMULS = {aten.matmul, aten.bmm, aten.mm, aten.baddbmm}
PASS_THROUGH = {aten.mul, aten.div, aten.add, aten.sub, aten.masked_fill, aten.where, aten._to_copy, aten.to,
                 aten.clone, aten.view, aten.reshape, aten._unsafe_view, aten.dropout, aten.native_dropout,
                 aten.contiguous, aten.expand, aten.alias, aten.type_as, aten.clamp, aten.masked_fill_}
SOFTMAX = {aten.softmax, aten._softmax}
# attention sinks: a learned column joined to the scores (``cat`` on the key dim) before the softmax and sliced
# off its output (``probs[..., :-1]``) before the probs·V matmul
SCORES_JOIN = {aten.cat, aten.concat}


def scores_matmul(node: fx.Node) -> fx.Node | None:
    """From a softmax input, up through scaling/masking to the Q·Kᵀ matmul."""
    return scores_path(node)[0]


def scores_path(node: fx.Node) -> tuple[fx.Node | None, bool]:
    """``(qk, transposed)``: from a softmax input, up through scaling/masking/clamping to the Q·Kᵀ matmul, and
    whether the path swaps the scores' last two dims an odd number of times (one score matrix read both ways, as
    in a bi-directional attention: the softmax's queries are then the matmul's right operand)."""
    seen, transposed = 0, False
    while isinstance(node, fx.Node) and node.op == "call_function" and seen < 12:
        pk = op_packet(node)
        if pk in MATMULS:
            return node, transposed
        if _swaps_last_two(node):
            transposed = not transposed
        elif pk not in PASS_THROUGH and not (pk in SCORES_JOIN and _on_last_dim(node)):
            return None, False
        # follow the operand that carries the scores (the largest tensor)
        cands = [a for a in node.all_input_nodes if node_shape(a) is not None]
        if not cands:
            return None
        node = max(cands, key=lambda a: (len(node_shape(a)), _numel(node_shape(a))))
        seen += 1
    return None, False


def _swaps_last_two(node: fx.Node) -> bool:
    """A ``transpose``/``permute`` that swaps the last two dims and keeps the others."""
    shape, pk = node_shape(node), op_packet(node)
    if shape is None or len(shape) < 2:
        return False
    n = len(shape)
    if pk is aten.transpose and len(node.args) >= 3 and all(isinstance(d, int) for d in node.args[1:3]):
        return {node.args[1] % n, node.args[2] % n} == {n - 2, n - 1}
    if pk is aten.permute and len(node.args) >= 2:
        dims = [d % n for d in node.args[1]]
        return dims == list(range(n - 2)) + [n - 1, n - 2]
    return pk is aten.t and n == 2


def probs_matmul(node: fx.Node) -> fx.Node | None:
    """From softmax output, down through dropout/casts to the probs·V matmul."""
    frontier, seen = [node], 0
    while frontier and seen < 12:
        nxt = []
        for n in frontier:
            for u in n.users:
                pk = op_packet(u) if u.op == "call_function" else None
                if pk in MATMULS:
                    args = u.args[1:] if pk is aten.baddbmm else u.args
                    if args[0] is n:
                        return u
                elif pk in PASS_THROUGH or u.target is operator.getitem or pk is aten.slice and _on_last_dim(u):
                    nxt.append(u)
        frontier, seen = nxt, seen + 1
    return None


def _on_last_dim(node: fx.Node) -> bool:
    """A ``cat``/``slice`` along the last dim (the key dim of attention scores)."""
    shape = node_shape(node)
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    return shape is not None and isinstance(dim, int) and dim % len(shape) == len(shape) - 1


def _numel(shape) -> int:
    p = 1
    for s in shape:
        p *= int(s)
    return p


def mask_between(node: fx.Node, qk: fx.Node) -> fx.Node | None:
    """The additive/boolean mask applied between Q·Kᵀ and softmax, if any."""
    return mask_and_sense(node, qk)[0]


def mask_and_sense(node: fx.Node, qk: fx.Node) -> tuple[fx.Node | None, bool]:
    """``(mask, masks_out)``: the mask applied between Q·Kᵀ and softmax (None if none), and whether its true
    entries are the positions masked *out* (``scores.masked_fill(mask, -inf)``), the opposite of the boolean masks
    of ``scaled_dot_product_attention`` (true: attend)."""
    n = node
    while isinstance(n, fx.Node) and n is not qk:
        pk = op_packet(n)
        if pk in (aten.add, aten.masked_fill, aten.masked_fill_, aten.where):
            for i, a in enumerate(n.args):
                if not isinstance(a, fx.Node):
                    continue
                if a is not qk and scores_matmul(a) is None and node_shape(a) is not None and len(node_shape(a)) >= 2:
                    fill = n.args[2] if len(n.args) > 2 else None
                    out = pk in (aten.masked_fill, aten.masked_fill_) and i == 1 and isinstance(fill, (int, float)) \
                        and fill < 0 or pk is aten.where and i == 0 and isinstance(n.args[1], (int, float)) \
                        and n.args[1] < 0  # (where(mask, -inf, scores))
                    return a, out
        cands = [a for a in n.all_input_nodes if node_shape(a) is not None]
        if not cands:
            break
        n = max(cands, key=lambda a: (len(node_shape(a)), _numel(node_shape(a))))
    return None, False


def find_attention(gm: fx.GraphModule) -> list[dict]:
    """Every attention in graph order: ``{node, q, k, v, mask, masks_out, out, fused, scale, is_causal,
    transposed}`` (``masks_out``: see :func:`mask_and_sense`).
    Unfused, ``k`` is the Q·Kᵀ matmul's right operand (the keys transposed, ``[..., D, Lk]``); where the scores
    are transposed before the softmax (``transposed``), the softmax's queries are the untransposed right operand
    (``q``, ``[..., Lq, D]``) and its keys the left operand (``k``, ``[..., Lk, D]``)."""
    found = []
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        pk = op_packet(node)
        if pk in SDPA:
            args = list(node.args) + [None] * 8
            mask = args[3] if isinstance(args[3], fx.Node) else node.kwargs.get("attn_mask")
            is_causal = bool(node.kwargs.get("is_causal", args[5] if pk is aten.scaled_dot_product_attention and isinstance(args[5], bool) else False))
            found.append(dict(node=node, q=args[0], k=args[1], v=args[2], mask=mask, out=node, fused=True,
                              scale=node.kwargs.get("scale"), is_causal=is_causal, transposed=False,
                              masks_out=False))
        elif pk in SOFTMAX:
            qk, transposed = scores_path(node.args[0])
            pv = probs_matmul(node)
            if qk is None or pv is None:
                continue
            qargs = qk.args[1:] if op_packet(qk) is aten.baddbmm else qk.args
            if transposed:  # scores (A·B)ᵀ = Bᵀ·Aᵀ: the queries are Bᵀ (B's untransposed input), the keys A
                b = qargs[1]
                if not (isinstance(b, fx.Node) and _swaps_last_two(b) and isinstance(b.args[0], fx.Node)):
                    continue  # no node holds the queries untransposed: not recognised
                qargs = (b.args[0], qargs[0])
            pargs = pv.args[1:] if op_packet(pv) is aten.baddbmm else pv.args
            mask, masks_out = mask_and_sense(node.args[0], qk)
            found.append(dict(node=node, q=qargs[0], k=qargs[1], v=pargs[1], mask=mask, masks_out=masks_out,
                              out=pv, fused=False, scale=_scale_between(node.args[0], qk), is_causal=False, qk=qk,
                              transposed=transposed))
    return found


def _scale_between(node: fx.Node, qk: fx.Node) -> float:
    """The constant the scores are multiplied by between Q·Kᵀ and the softmax (1.0 if none)."""
    scale, n, seen = 1.0, node, 0
    while isinstance(n, fx.Node) and n is not qk and seen < 12:
        pk = op_packet(n)
        consts = [a for a in n.args[1:] if isinstance(a, (int, float)) and not isinstance(a, bool)]
        if pk is aten.mul and consts:
            scale *= float(consts[0])
        elif pk is aten.div and consts:
            scale /= float(consts[0])
        cands = [a for a in n.all_input_nodes if node_shape(a) is not None]
        if not cands:
            break
        n = max(cands, key=lambda a: (len(node_shape(a)), _numel(node_shape(a))))
        seen += 1
    return scale
