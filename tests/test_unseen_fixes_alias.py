"""A general fix found on a timm-backed unseen family (gemma3n, bench/unseen_families.py, branch timm), on a tiny
synthetic model:

* an elementwise op captured under an aten alias that carries no ``pointwise`` tag (``torch.multiply`` is
  ``aten.multiply.Tensor``; also ``divide``, ``subtract``, ``greater``, ...): the analysis lost the token axis there
  and the rewrite did not gather the op's full-length operand, so a per-token input computed once before the layers
  and read in every layer (Gemma 3n's per-layer inputs) met the reduced tokens unreduced: "the op cannot take the
  reduced token axis (Attempting to broadcast a dimension of length 12 ...)". An untagged aten op whose composite
  kernel runs one pointwise op is now pointwise (graphred.fx_utils.is_pointwise).
"""
from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

import graphred
from graphred.analysis.provenance import TokenProvenance
from graphred.fx_utils import is_pointwise
from graphred.plans import pumer

V, D, IMG_ID, N_IMG, L = 40, 16, 39, 8, 12


class _SideInputLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv, self.out = nn.Linear(D, 3 * D), nn.Linear(D, D)
        self.gate, self.proj = nn.Linear(D, 4), nn.Linear(4, D)

    def forward(self, x, side):
        B, T, _ = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, 2, D // 2).permute(2, 0, 3, 1, 4)
        x = x + self.out(F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, D))
        # the per-token side input joins each layer through an untagged alias of mul
        return x + self.proj(torch.multiply(F.gelu(self.gate(x)), side))


class _SideInputDecoder(nn.Module):
    """Image patches scattered into the prompt's placeholders; a per-token input made once from the embeddings,
    before the layers, read by every layer."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(V, D)
        self.patch = nn.Conv2d(3, D, 4, 4)
        self.side = nn.Linear(D, 4)
        self.layers = nn.ModuleList([_SideInputLayer() for _ in range(3)])

    def forward(self, input_ids, pixel_values):
        x = self.embed(input_ids)
        img = self.patch(pixel_values).flatten(2).transpose(1, 2)  # [B, 4, D] per image, two images a sample
        mask = (input_ids == IMG_ID).unsqueeze(-1).expand_as(x)
        x = x.masked_scatter(mask, img.reshape(-1, D))
        side = self.side(x)
        for layer in self.layers:
            x = layer(x, side)
        return x


def _inputs():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, V - 1, (2, L), generator=g)
    ids[:, 2:2 + N_IMG] = IMG_ID
    return {"input_ids": ids, "pixel_values": torch.randn(4, 3, 8, 8, generator=g)}


def test_aten_aliases_of_pointwise_ops_are_pointwise():
    g = fx.Graph()
    x = g.placeholder("x")
    aten = torch.ops.aten
    for op in (aten.multiply.Tensor, aten.divide.Tensor, aten.subtract.Tensor, aten.greater.Scalar):
        assert is_pointwise(g.call_function(op, (x, x if "Tensor" in op._overloadname else 1))), op
    for op in (aten.sum.default, aten.linear.default, aten.softmax.int):  # reductions and others stay out
        assert not is_pointwise(g.call_function(op, (x,))), op


def test_a_per_token_input_read_through_an_untagged_alias_is_reduced_with_the_tokens():
    torch.manual_seed(0)
    model, kwargs = _SideInputDecoder().eval(), _inputs()
    prog = graphred.capture(model, **kwargs)
    gm = prog.graph_module
    prov = TokenProvenance(gm, prog.example_inputs())
    muls = [n for n in gm.graph.nodes if n.target is torch.ops.aten.multiply.Tensor]
    assert len(muls) == 3
    assert all([d for d, _ in prov.axes(n)] == [1] for n in muls)  # the analysis keeps the token axis
    with torch.no_grad():
        want = model(**kwargs)
        assert torch.equal(graphred.transform(prog, pumer(prune=0, merge=0))(**kwargs), want)
        out = graphred.transform(prog, pumer(prune=0.5, merge=0.0))(**kwargs)
    assert out.shape[1] < L and torch.isfinite(out).all()
