"""Per-token decode cost: what one generated token costs, as a function of each layer's cache length.

A decode step runs one new token per sample through the decoder: every weight matrix of the decoder
layers and of the vocabulary head is applied once (``2 * rows * cols`` FLOPs per sample, reading the
whole matrix), and each layer's attention reads its own key/value cache. With per-layer cache lengths
``c_l`` (the keys a layer attends over, the new token included), for batch ``B``::

    flops(c) = B * (2 * W + sum_l 4 * H_q,l * D_l * c_l)          (QK^T and AV: 2 * H_q * D * c each)
    bytes(c) = weight_bytes + sum_l 2 * B * H_kv,l * D_l * c_l * elsize

``W`` is the number of weight elements the decoder's matrix products use per token, read from the
captured graph (matrix products with a parameter operand inside a decoder layer, plus the head over
the input vocabulary); the layers, heads, head dims and prefill cache lengths come from
:class:`~graphred.analysis.cost.estimate.KVCache` of the estimate (before or after a plan: a plan
changes the lengths, not the weights). Elementwise work (norms, rotary, activations) is left out: at
one token per sample it is a small share of the matrix products.

Over ``T`` generated tokens the step ``t`` (1..T) attends over ``c_l + t`` keys (the prefill cache plus
the tokens decoded so far, the new one included); :meth:`DecodeCost.mean_flops` averages that, and
:func:`decode_speedup` is the ratio of the means before and after a plan.

>>> import graphred
>>> model, inputs = graphred.zoo.load(graphred.zoo.TEST_NAMES[0])  # a decoder VLM, 2 layers
>>> prog = graphred.capture(model, **inputs)
>>> est = graphred.estimate(prog, graphred.plans.fastv(layer=1, keep=0.5))
>>> est.decode.cache_lengths, est.after.decode.cache_lengths
([76, 76], [76, 44])
>>> round(decode_speedup(est, new_tokens=32), 3) > 1
True
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import sympy
import torch
import torch.fx as fx

from ...fx_utils import module_path
from .memory import hint_int

__all__ = ["DecodeCost", "decode_cost", "decode_speedup"]

aten = torch.ops.aten
_MATMUL = {aten.linear.default, aten.mm.default, aten.addmm.default, aten.matmul.default}


@dataclass
class DecodeCost:
    """Cost of one decode step (one new token per sample, whole batch) as a function of cache lengths."""

    batch: int
    weight_elements: int  # weight elements the decoder's matrix products use per token
    weight_bytes: int
    layers: list[dict] = field(default_factory=list)  # module_path, heads, heads_kv, head_dim, elsize, cache
    note: str = ""

    @property
    def cache_lengths(self) -> list[int]:
        """Each layer's cache length after the prefill."""
        return [int(layer["cache"]) for layer in self.layers]

    def flops(self, lengths: Sequence[int] | None = None) -> int:
        """FLOPs of one step whose layers attend over ``lengths`` keys (default: the prefill lengths + 1)."""
        c = self._lengths(lengths)
        attn = sum(4 * layer["heads"] * layer["head_dim"] * n for layer, n in zip(self.layers, c))
        return self.batch * (2 * self.weight_elements + attn)

    def bytes(self, lengths: Sequence[int] | None = None) -> int:
        """Bytes one step reads: the decoder's weights and every layer's keys and values."""
        c = self._lengths(lengths)
        kv = sum(2 * self.batch * layer["heads_kv"] * layer["head_dim"] * layer["elsize"] * n
                 for layer, n in zip(self.layers, c))
        return self.weight_bytes + kv

    @property
    def symbols(self) -> list[sympy.Symbol]:
        return [sympy.Symbol(f"c_{i}", integer=True, positive=True) for i in range(len(self.layers))]

    @property
    def flops_expr(self) -> sympy.Expr:
        """:meth:`flops` in the symbols ``c_0 .. c_{n-1}`` (one per decoder layer) and ``B``."""
        B = sympy.Symbol("B", integer=True, positive=True)
        attn = sympy.Add(*[4 * layer["heads"] * layer["head_dim"] * s for layer, s in zip(self.layers, self.symbols)])
        return B * (2 * self.weight_elements + attn)

    def mean_flops(self, new_tokens: int) -> float:
        """Mean FLOPs per step over ``new_tokens`` decode steps after the prefill."""
        base = self.cache_lengths
        return sum(self.flops([n + t for n in base]) for t in range(1, new_tokens + 1)) / max(new_tokens, 1)

    def mean_bytes(self, new_tokens: int) -> float:
        base = self.cache_lengths
        return sum(self.bytes([n + t for n in base]) for t in range(1, new_tokens + 1)) / max(new_tokens, 1)

    def _lengths(self, lengths: Sequence[int] | None) -> list[int]:
        if lengths is None:
            return [n + 1 for n in self.cache_lengths]
        lengths = list(lengths)
        if len(lengths) != len(self.layers):
            raise ValueError(f"one cache length per decoder layer: {len(self.layers)} layers, got {len(lengths)}")
        return lengths

    def to_dict(self) -> dict[str, Any]:
        return {"batch": self.batch, "weight_elements": self.weight_elements, "weight_bytes": self.weight_bytes,
                "cache_lengths": self.cache_lengths, "flops_per_token": self.flops(), "note": self.note}


def _vocab_sizes(gm: fx.GraphModule) -> set[int]:
    """Row counts of embedding tables indexed by a graph input (token ids)."""
    sizes = set()
    for n in gm.graph.nodes:
        if n.op == "call_function" and n.target is aten.embedding.default and len(n.args) >= 2:
            w, idx = n.args[0], n.args[1]
            wv = w.meta.get("val") if isinstance(w, fx.Node) else None
            if isinstance(idx, fx.Node) and idx.op == "placeholder" and isinstance(wv, torch.Tensor):
                sizes.add(hint_int(wv.shape[0]))
    return sizes


def _is_parameter(gm: fx.GraphModule, node: Any) -> bool:
    if not isinstance(node, fx.Node):
        return False
    if node.op == "get_attr":
        return True
    return node.op == "placeholder" and isinstance(node.meta.get("val"), torch.nn.Parameter)


def _weight_of(gm: fx.GraphModule, n: fx.Node) -> fx.Node | None:
    """The weight operand of a matrix product with a parameter (after a transpose/permute, if any)."""
    for a in n.args[:3]:
        cur = a
        for _ in range(3):
            if _is_parameter(gm, cur):
                return cur
            if isinstance(cur, fx.Node) and cur.op == "call_function" and cur.target in (
                    aten.t.default, aten.transpose.int, aten.permute.default, aten.to.dtype, aten._to_copy.default):
                cur = cur.args[0]
            else:
                break
    return None


def decode_cost(gm: fx.GraphModule, est) -> DecodeCost:
    """:class:`DecodeCost` of the decoder in ``gm`` with the per-layer caches of ``est`` (an Estimate)."""
    kv = est.kv_cache
    if not kv.layers:
        return DecodeCost(batch=0, weight_elements=0, weight_bytes=0, note=kv.note or "no KV cache: no decoder")
    paths = [layer["module_path"] for layer in kv.layers]
    # the decoder layers: the layer groups holding those attention blocks
    layer_prefixes = [g.name for g in est.groups if g.kind == "layer" and any(b.module_path in paths for b in g.blocks)]
    vocab = _vocab_sizes(gm)
    elements = 0
    nbytes = 0
    seen: set[str] = set()
    for n in gm.graph.nodes:
        if n.op != "call_function" or n.target not in _MATMUL:
            continue
        w = _weight_of(gm, n)
        if w is None or w.name in seen:
            continue
        path = module_path(n)
        out = n.meta.get("val")
        in_layer = any(path == p or path.startswith(p + ".") for p in layer_prefixes)
        is_head = isinstance(out, torch.Tensor) and out.dim() >= 2 and hint_int(out.shape[-1]) in vocab
        if not (in_layer or is_head):
            continue
        wv = w.meta.get("val")
        if not isinstance(wv, torch.Tensor):
            continue
        numel = 1
        for s in wv.shape:
            numel *= hint_int(s)
        seen.add(w.name)
        elements += numel
        nbytes += numel * wv.element_size()
    layers = []
    for info in kv.layers:
        k_shape = info.get("k_shape")
        if not k_shape or len(k_shape) != 4:
            continue
        B, hkv, L, D = (int(x) for x in k_shape)
        elsize = info["bytes"] // max(2 * B * hkv * L * D, 1)
        layers.append({"module_path": info["module_path"], "heads": int(info.get("query_heads") or hkv),
                       "heads_kv": hkv, "head_dim": D, "elsize": max(int(elsize), 1), "cache": L, "batch": B})
    batch = layers[0]["batch"] if layers else 0
    return DecodeCost(batch=batch, weight_elements=elements, weight_bytes=nbytes, layers=layers)


def decode_speedup(est, new_tokens: int = 32, by: str = "flops") -> float | None:
    """Predicted per-token decode speedup of ``est.plan`` over ``new_tokens`` generated tokens: the mean
    step cost before over the mean after (``by="flops"`` or ``"bytes"``)."""
    before, after = getattr(est, "decode", None), getattr(getattr(est, "after", None), "decode", None)
    if before is None or after is None or not before.layers or not after.layers:
        return None
    if by == "bytes":
        return before.mean_bytes(new_tokens) / after.mean_bytes(new_tokens)
    return before.mean_flops(new_tokens) / after.mean_flops(new_tokens)
