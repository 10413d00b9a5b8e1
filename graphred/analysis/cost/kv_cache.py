"""KV cache of a generative decoder: ``K`` and ``V`` per self-attention layer as computed before
grouped-query expansion, for stacks whose output reaches a head over the input vocabulary."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import sympy
import torch
import torch.fx as fx

from ...fx_utils import ancestors, op_packet
from ..blocks import CROSS_ATTENTION, AttentionBlock
from ..provenance import TEXT
from .memory import hint_int
from .shapes import Shapes

aten = torch.ops.aten
_ZERO = sympy.Integer(0)


_KV_WALK = {aten.expand, aten.unsqueeze, aten.reshape, aten.view, aten._unsafe_view, aten.clone, aten.contiguous,
            aten.alias, aten.repeat_interleave, aten.repeat, aten._to_copy, aten.to, aten.squeeze, aten.flatten,
            aten.unflatten}


def _pre_expansion(node: fx.Node) -> fx.Node:
    """Walk up from an attention's key/value through the grouped-query expansion (``repeat_kv``:
    unsqueeze, expand, reshape; ``repeat_interleave``) to the smallest tensor holding the same data."""
    best = node
    cur = node

    def numel(n):
        v = n.meta.get("val")
        if not isinstance(v, torch.Tensor):
            return math.inf
        p = 1
        for s in v.shape:
            p *= hint_int(s)
        return p

    for _ in range(8):
        if cur.op != "call_function" or op_packet(cur) not in _KV_WALK or not cur.args or not isinstance(cur.args[0], fx.Node):
            break
        cur = cur.args[0]
        v = cur.meta.get("val")
        if not isinstance(v, torch.Tensor):
            break
        if numel(cur) <= numel(best):  # on a tie, the tensor further up (before unsqueeze/expand)
            best = cur
    return best


@dataclass
class KVCache:
    """The KV cache a generative decoder keeps after the prompt (prefill) at the example inputs.

    ``bytes`` = sum over decoder layers of K and V as stored (before grouped-query expansion);
    ``bytes_per_token`` what one more token adds (all layers, whole batch).
    """

    bytes: int = 0
    expr: sympy.Expr = _ZERO
    bytes_per_token: int = 0
    layers: list[dict] = field(default_factory=list)
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"bytes": int(self.bytes), "expr": str(self.expr), "bytes_per_token": int(self.bytes_per_token),
                "layers": list(self.layers), "note": self.note}


def _vocab_heads(gm: fx.GraphModule) -> list[fx.Node]:
    """Nodes computing logits over the input vocabulary: a matmul whose output's last dim is the row
    count of an embedding table indexed by a graph input (token ids)."""
    vocabs = set()
    for n in gm.graph.nodes:
        if n.op == "call_function" and op_packet(n) is aten.embedding and len(n.args) >= 2:
            w, idx = n.args[0], n.args[1]
            wv = w.meta.get("val") if isinstance(w, fx.Node) else None
            if isinstance(idx, fx.Node) and idx.op == "placeholder" and isinstance(wv, torch.Tensor):
                vocabs.add(hint_int(wv.shape[0]))
    heads = []
    if not vocabs:
        return heads
    for n in gm.graph.nodes:
        if n.op == "call_function" and op_packet(n) in (aten.linear, aten.matmul, aten.mm, aten.addmm):
            v = n.meta.get("val")
            if isinstance(v, torch.Tensor) and v.dim() >= 2 and hint_int(v.shape[-1]) in vocabs:
                heads.append(n)
    return heads


def kv_cache_of(gm: fx.GraphModule, blocks: Sequence[AttentionBlock], shapes: Shapes) -> KVCache:
    heads = _vocab_heads(gm)
    if not heads:
        return KVCache(note="no generative decoder (no head over the input vocabulary): no KV cache")
    anc = ancestors(heads)
    byname = {n.name: n for n in gm.graph.nodes}
    out = KVCache()
    per_token = 0
    exprs = []
    for b in blocks:
        node = byname.get(b.node)
        if node is None or node not in anc:
            continue
        if b.kind == CROSS_ATTENTION or (b.query_stream is not None and b.key_stream is not None
                                         and b.query_stream != b.key_stream):
            continue  # a cross-attention's keys come from the other sequence, computed once
        if TEXT not in b.query_modalities:
            continue  # a vision tower feeding the decoder: no cache
        k, v = byname.get(b.key), byname.get(b.value)
        if k is None or v is None:
            continue
        total, expr, tok = 0, _ZERO, 0
        info = {"module_path": b.module_path}
        for name, t in (("k", _pre_expansion(k)), ("v", _pre_expansion(v))):
            val = t.meta.get("val")
            conc = shapes.concrete(t)
            sym = shapes.symbolic(t)
            if not isinstance(val, torch.Tensor) or not isinstance(conc, tuple):
                continue
            n_el = int(sympy.Mul(*conc)) if conc else 1
            nbytes = n_el * val.element_size()
            total += nbytes
            expr += (sympy.Mul(*sym) if sym else sympy.Integer(1)) * val.element_size()
            seq = hint_int(val.shape[-2]) if val.dim() >= 2 else 1
            tok += nbytes // max(seq, 1)
            info[f"{name}_shape"] = [int(x) for x in conc]
            info[f"{name}_node"] = t.name
            if name == "k" and val.dim() == 4:
                info["heads_kv"] = int(conc[1])
                info["head_dim"] = int(conc[3])
        info["query_heads"] = b.num_heads
        info["bytes"] = total
        out.layers.append(info)
        out.bytes += total
        exprs.append(expr)
        per_token += tok
    out.expr = sympy.Add(*exprs) if exprs else _ZERO
    out.bytes_per_token = per_token
    if not out.layers:
        out.note = "a vocabulary head exists but no self-attention block with text queries feeds it"
    return out
