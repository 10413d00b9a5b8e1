"""Attention-block detection: every attention in the graph, fused (``scaled_dot_product_attention``
and its kernels) or unfused (matmul -> softmax -> matmul), classified by the modalities of its
queries and keys as read from :mod:`graphred.analysis.provenance`."""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx

from ..fx_utils import module_path
from .provenance import IMAGE, REGISTER, SDPA, TEXT, TOKENS, TokenProvenance, _packet, _shape

aten = torch.ops.aten

CROSS_MODAL_SELF = "cross_modal_self"
CROSS_ATTENTION = "cross_attention"
UNIMODAL_SELF = "unimodal_self"

_MATMULS = {aten.matmul, aten.bmm, aten.mm, aten.baddbmm}
_PASS_THROUGH = {aten.mul, aten.div, aten.add, aten.sub, aten.masked_fill, aten.where, aten._to_copy, aten.to,
                 aten.clone, aten.view, aten.reshape, aten._unsafe_view, aten.dropout, aten.native_dropout,
                 aten.contiguous, aten.expand, aten.alias, aten.type_as}
_SOFTMAX = {aten.softmax, aten._softmax}


@dataclass
class AttentionBlock:
    """One attention computation in the graph."""

    index: int
    module_path: str
    stack: str
    layer_index: int
    kind: str
    query_modalities: frozenset
    key_modalities: frozenset
    tokens: dict[str, int]
    tokens_per_sample: list[dict[str, int]]
    fused: bool
    node: str  # the sdpa node, or the softmax node of an unfused attention
    query: str
    key: str
    value: str
    mask: str | None
    output: str  # the node holding the attention output (sdpa node or the probs@V matmul)
    num_heads: int | None
    head_dim: int | None
    causal: bool | None
    query_stream: int | None
    key_stream: int | None
    scale: float | None = None
    key_tokens: dict[str, int] = field(default_factory=dict)

    @property
    def is_cross_modal(self) -> bool:
        return self.kind != UNIMODAL_SELF

    def to_dict(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "module_path": self.module_path,
            "stack": self.stack,
            "layer_index": self.layer_index,
            "kind": self.kind,
            "query_modalities": sorted(self.query_modalities),
            "key_modalities": sorted(self.key_modalities),
            "tokens": dict(self.tokens),
            "key_tokens": dict(self.key_tokens),
            "tokens_per_sample": [dict(t) for t in self.tokens_per_sample],
            "fused": self.fused,
            "causal": self.causal,
            "num_heads": self.num_heads,
            "head_dim": self.head_dim,
            "node": self.node,
        }


_INT = re.compile(r"^\d+$")


def split_stack(path: str) -> tuple[str, int]:
    """``"model.layers.3.self_attn"`` -> ``("model.layers", 3)`` (the last numeric component)."""
    parts = path.split(".")
    for i in range(len(parts) - 1, -1, -1):
        if _INT.match(parts[i]):
            return ".".join(parts[:i]), int(parts[i])
    return path, 0


def _walk_up(node: fx.Node) -> fx.Node | None:
    """From a softmax input, up through scaling/masking to the Q·Kᵀ matmul."""
    seen = 0
    while isinstance(node, fx.Node) and node.op == "call_function" and seen < 12:
        pk = _packet(node)
        if pk in _MATMULS:
            return node
        if pk not in _PASS_THROUGH:
            return None
        # follow the operand that carries the scores (the largest tensor)
        cands = [a for a in node.all_input_nodes if _shape(a) is not None]
        if not cands:
            return None
        node = max(cands, key=lambda a: (len(_shape(a)), _numel(_shape(a))))
        seen += 1
    return None


def _walk_down(node: fx.Node) -> fx.Node | None:
    """From softmax output, down through dropout/casts to the probs·V matmul."""
    frontier, seen = [node], 0
    while frontier and seen < 12:
        nxt = []
        for n in frontier:
            for u in n.users:
                pk = _packet(u) if u.op == "call_function" else None
                if pk in _MATMULS:
                    args = u.args[1:] if pk is aten.baddbmm else u.args
                    if args[0] is n:
                        return u
                elif pk in _PASS_THROUGH or u.target is __import__("operator").getitem:
                    nxt.append(u)
        frontier, seen = nxt, seen + 1
    return None


def _numel(shape) -> int:
    p = 1
    for s in shape:
        p *= int(s)
    return p


def _mask_of(node: fx.Node, qk: fx.Node) -> fx.Node | None:
    """The additive/boolean mask applied between Q·Kᵀ and softmax, if any."""
    n = node
    while isinstance(n, fx.Node) and n is not qk:
        pk = _packet(n)
        if pk in (aten.add, aten.masked_fill, aten.where):
            for a in n.all_input_nodes:
                if a is not qk and _walk_up(a) is None and _shape(a) is not None and len(_shape(a)) >= 2:
                    return a
        cands = [a for a in n.all_input_nodes if _shape(a) is not None]
        if not cands:
            break
        n = max(cands, key=lambda a: (len(_shape(a)), _numel(_shape(a))))
    return None


def find_attention(gm: fx.GraphModule) -> list[dict]:
    """Every attention in graph order: ``{node, q, k, v, mask, out, fused, scale, is_causal}``."""
    found = []
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        pk = _packet(node)
        if pk in SDPA:
            args = list(node.args) + [None] * 8
            mask = args[3] if isinstance(args[3], fx.Node) else node.kwargs.get("attn_mask")
            is_causal = bool(node.kwargs.get("is_causal", args[5] if pk is aten.scaled_dot_product_attention and isinstance(args[5], bool) else False))
            found.append(dict(node=node, q=args[0], k=args[1], v=args[2], mask=mask, out=node, fused=True,
                              scale=node.kwargs.get("scale"), is_causal=is_causal))
        elif pk in _SOFTMAX:
            qk = _walk_up(node.args[0])
            pv = _walk_down(node)
            if qk is None or pv is None:
                continue
            qargs = qk.args[1:] if _packet(qk) is aten.baddbmm else qk.args
            pargs = pv.args[1:] if _packet(pv) is aten.baddbmm else pv.args
            found.append(dict(node=node, q=qargs[0], k=qargs[1], v=pargs[1], mask=_mask_of(node.args[0], qk),
                              out=pv, fused=False, scale=_scale_between(node.args[0], qk), is_causal=False, qk=qk))
    return found


def _scale_between(node: fx.Node, qk: fx.Node) -> float:
    """The constant the scores are multiplied by between Q·Kᵀ and the softmax (1.0 if none)."""
    scale, n, seen = 1.0, node, 0
    while isinstance(n, fx.Node) and n is not qk and seen < 12:
        pk = _packet(n)
        consts = [a for a in n.args[1:] if isinstance(a, (int, float)) and not isinstance(a, bool)]
        if pk is aten.mul and consts:
            scale *= float(consts[0])
        elif pk is aten.div and consts:
            scale /= float(consts[0])
        cands = [a for a in n.all_input_nodes if _shape(a) is not None]
        if not cands:
            break
        n = max(cands, key=lambda a: (len(_shape(a)), _numel(_shape(a))))
        seen += 1
    return scale


def _is_causal_mask(m) -> bool | None:
    if not isinstance(m, torch.Tensor) or m.dim() < 2:
        return None
    if m.shape[-2] == 1 and m.shape[-1] > 1:
        return False  # one row broadcast over every query: a padding mask, never causal
    if m.shape[-1] != m.shape[-2] or m.shape[-1] < 2:
        return None
    allowed = m if m.dtype == torch.bool else m > torch.finfo(m.dtype).min / 2 if m.is_floating_point() else m != 0
    L = m.shape[-1]
    upper = torch.triu(torch.ones(L, L, dtype=torch.bool), diagonal=1)
    return bool((~allowed[..., upper]).all())


def _modalities(prov: TokenProvenance, node, dim_from_end: int, fallback) -> tuple[frozenset, Any]:
    shape = _shape(node)
    if shape is None:
        return frozenset(fallback & {IMAGE, TEXT, REGISTER}), None
    want = len(shape) + dim_from_end
    for d, st in prov.axes(node):
        if d == want and st.codes is not None:
            return frozenset(st.modalities()), st
    return frozenset(fallback & {IMAGE, TEXT, REGISTER}), None


def detect_blocks(gm: fx.GraphModule, prov: TokenProvenance) -> list[AttentionBlock]:
    """Attention blocks of ``gm`` in graph order, classified with ``prov``."""
    blocks = []
    for i, a in enumerate(find_attention(gm)):
        node = a["node"]
        if a["fused"]:
            qm, qs = _modalities(prov, a["q"], -2, prov.tokens(a["q"]).taint)
            km, ks = _modalities(prov, a["k"], -2, prov.tokens(a["k"]).taint)
        else:
            qk = a["qk"]
            qm, qs = _modalities(prov, qk, -2, prov.tokens(a["q"]).taint)
            km, ks = _modalities(prov, qk, -1, prov.tokens(a["k"]).taint)
        if not qm and prov.tokens(a["q"]).learned or not qm and not prov.tokens(a["q"]).taint:
            qm = frozenset({REGISTER})  # learned queries (an attention-pooling probe, Q-Former queries)
        same = qs is not None and ks is not None and qs.id == ks.id
        data = (qm | km) & {IMAGE, TEXT}
        if same or (qs is None and ks is None and qm == km):
            kind = CROSS_MODAL_SELF if {IMAGE, TEXT} <= qm else UNIMODAL_SELF
        else:
            # two sequences: cross-modal when the data on the two sides differs (text queries on image
            # keys); learned queries pooling one modality stay unimodal
            kind = CROSS_ATTENTION if len(data) == 2 or (qm & {IMAGE, TEXT} and km & {IMAGE, TEXT} and qm != km) else UNIMODAL_SELF
        per_sample = qs.counts() if qs is not None else []
        tokens = _collapse(per_sample)
        key_tokens = _collapse(ks.counts()) if ks is not None and not same else {}
        if kind == CROSS_ATTENTION or (not tokens and key_tokens):
            tokens = {**tokens, **{k: v for k, v in key_tokens.items() if k not in tokens}}
        qshape = _shape(a["q"])
        path = module_path(node)
        stack, layer = split_stack(path)
        causal = True if a["is_causal"] else None
        if causal is None and a["mask"] is not None:
            causal = _is_causal_mask(prov.values.get(a["mask"]))
            mshape = _shape(a["mask"])
            if causal is None and mshape and len(mshape) >= 2 and mshape[-2] == 1 and mshape[-1] > 1:
                causal = False  # a single mask row broadcast over all queries: padding only
        if causal is None and a["mask"] is None:
            causal = False
        blocks.append(AttentionBlock(
            index=i, module_path=path, stack=stack, layer_index=layer, kind=kind,
            query_modalities=qm, key_modalities=km, tokens=tokens, tokens_per_sample=per_sample,
            fused=a["fused"], node=node.name, query=a["q"].name, key=a["k"].name, value=a["v"].name,
            mask=a["mask"].name if isinstance(a["mask"], fx.Node) else None, output=a["out"].name,
            num_heads=qshape[-3] if qshape and len(qshape) >= 3 else None,
            head_dim=qshape[-1] if qshape else None, causal=causal,
            query_stream=qs.id if qs is not None else None, key_stream=ks.id if ks is not None else None,
            scale=a["scale"], key_tokens=key_tokens,
        ))
    # layer index within a stack: the order of blocks sharing the stack
    return blocks


def _collapse(per_sample: list[dict[str, int]]) -> dict[str, int]:
    """Per-sample counts -> one dict (the max over samples: equal counts are the common case)."""
    out: dict[str, int] = {}
    for d in per_sample:
        for k, v in d.items():
            out[k] = max(out.get(k, 0), v)
    return out
