"""Attention-block detection: every attention in the graph, fused (``scaled_dot_product_attention``
and its kernels) or unfused (matmul -> softmax -> matmul), classified by the modalities of its
queries and keys as read from :mod:`graphred.analysis.provenance`."""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx

from ..fx_utils import module_path, node_shape
from .attention import find_attention
from ..passes.infra import Analysis
from .provenance import IMAGE, REGISTER, TEXT, Provenance, TokenProvenance

aten = torch.ops.aten

CROSS_MODAL_SELF = "cross_modal_self"
CROSS_ATTENTION = "cross_attention"
UNIMODAL_SELF = "unimodal_self"



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
    # unfused scores transposed before the softmax (one score matrix read both ways): ``key`` holds the keys
    # untransposed, ``[..., Lk, D]`` (else an unfused attention's ``key`` is the matmul's Kᵀ, ``[..., D, Lk]``)
    transposed: bool = False
    mask_masks_out: bool = False  # the mask's true entries are masked out (``masked_fill(mask, -inf)``)

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
    shape = node_shape(node)
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
            qd, kd = (-1, -2) if a["transposed"] else (-2, -1)
            qm, qs = _modalities(prov, qk, qd, prov.tokens(a["q"]).taint)
            km, ks = _modalities(prov, qk, kd, prov.tokens(a["k"]).taint)
        if not qm and prov.tokens(a["q"]).learned or not qm and not prov.tokens(a["q"]).taint:
            qm = frozenset({REGISTER})  # learned queries (an attention-pooling probe, a query transformer's queries)
        same = qs is not None and ks is not None and qs.id == ks.id
        data = (qm | km) & {IMAGE, TEXT}
        if same or (qs is None and ks is None and qm == km):
            kind = CROSS_MODAL_SELF if {IMAGE, TEXT} <= qm else UNIMODAL_SELF
        else:
            # two sequences: cross-modal when the data on the two sides differs (text queries on image
            # keys); learned queries pooling one modality stay unimodal
            kind = CROSS_ATTENTION if len(data) == 2 or (qm & {IMAGE, TEXT} and km & {IMAGE, TEXT} and qm != km) else UNIMODAL_SELF
            if _resamples(prov, a["out"]) or (qs is not None and ks is not None and qs.rule == "queries" and IMAGE in km):
                kind = CROSS_ATTENTION  # learned queries reading image tokens: a resampler's cross-attention
        per_sample = qs.counts() if qs is not None else []
        tokens = _collapse(per_sample)
        key_tokens = _collapse(ks.counts()) if ks is not None and not same else {}
        if kind == CROSS_ATTENTION or (not tokens and key_tokens):
            tokens = {**tokens, **{k: v for k, v in key_tokens.items() if k not in tokens}}
        qshape = node_shape(a["q"])
        path = module_path(node)
        stack, layer = split_stack(path)
        causal = True if a["is_causal"] else None
        if causal is None and a["mask"] is not None:
            mv = prov.values.get(a["mask"])
            if a["masks_out"] and isinstance(mv, torch.Tensor) and mv.dtype == torch.bool:
                mv = ~mv
            causal = _is_causal_mask(mv)
            mshape = node_shape(a["mask"])
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
            scale=a["scale"], key_tokens=key_tokens, transposed=a["transposed"],
            mask_masks_out=a["masks_out"],
        ))
    # layer index within a stack: the order of blocks sharing the stack
    return blocks


def _resamples(prov: TokenProvenance, out) -> bool:
    """True where the attention output starts an image stream of learned queries (see provenance)."""
    return any(st.rule == "queries" and st.origin == out.name for _, st in prov.axes(out))


def _collapse(per_sample: list[dict[str, int]]) -> dict[str, int]:
    """Per-sample counts -> one dict (the max over samples: equal counts are the common case)."""
    out: dict[str, int] = {}
    for d in per_sample:
        for k, v in d.items():
            out[k] = max(out.get(k, 0), v)
    return out


class Blocks(Analysis):
    """The attention blocks of a graph (:func:`detect_blocks`) as a cached analysis; needs
    :class:`~graphred.analysis.provenance.Provenance` in the same manager.

    >>> import graphred
    >>> from graphred.analysis.provenance import Provenance
    >>> from graphred.passes.infra import AnalysisManager
    >>> model, inputs = graphred.zoo.load(graphred.zoo.TEST_NAMES[0])
    >>> program = graphred.capture(model, **inputs); am = AnalysisManager()
    >>> _ = am.get(Provenance(program.example_inputs()), program.graph_module)
    >>> any(b.kind == CROSS_MODAL_SELF for b in am.get(Blocks, program.graph_module))
    True
    """

    def run(self, gm: fx.GraphModule, am: Any) -> list[AttentionBlock]:
        return detect_blocks(gm, am.get(Provenance, gm))
