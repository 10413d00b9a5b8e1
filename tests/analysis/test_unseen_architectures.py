"""Architectures outside the zoo, written in plain PyTorch: the analysis must read them from the graph."""
import torch
import torch.nn as nn
import torch.nn.functional as F

import graphred
from graphred.analysis.blocks import CROSS_ATTENTION, CROSS_MODAL_SELF, UNIMODAL_SELF


class Attention(nn.Module):
    def __init__(self, d, heads=2):
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.h = heads

    def forward(self, x, ctx=None, causal=False):
        ctx = x if ctx is None else ctx
        B, L, D = x.shape
        split = lambda t: t.view(B, t.shape[1], self.h, D // self.h).transpose(1, 2)  # noqa: E731
        out = F.scaled_dot_product_attention(split(self.q(x)), split(self.k(ctx)), split(self.v(ctx)), is_causal=causal)
        return self.o(out.transpose(1, 2).reshape(B, L, D))


class CoAttentionLayer(nn.Module):
    """METER-style: each stream attends to itself, then to the other stream."""

    def __init__(self, d):
        super().__init__()
        self.text_self, self.image_self = Attention(d), Attention(d)
        self.text_cross, self.image_cross = Attention(d), Attention(d)

    def forward(self, t, i):
        t, i = t + self.text_self(t), i + self.image_self(i)
        return t + self.text_cross(t, i), i + self.image_cross(i, t)


class DualStream(nn.Module):
    def __init__(self, d=32, layers=2):
        super().__init__()
        self.embed = nn.Embedding(50, d)
        self.patch = nn.Conv2d(3, d, 8, 8)
        self.layers = nn.ModuleList(CoAttentionLayer(d) for _ in range(layers))

    def forward(self, input_ids, pixel_values):
        t = self.embed(input_ids)
        i = self.patch(pixel_values).flatten(2).transpose(1, 2)
        for layer in self.layers:
            t, i = layer(t, i)
        return t[:, 0] @ i.mean(1).T


class GatedCrossDecoder(nn.Module):
    """Flamingo / Llama-3.2-Vision style: a causal text decoder with cross-attention to image
    features in every other layer."""

    def __init__(self, d=32, layers=4):
        super().__init__()
        self.embed = nn.Embedding(50, d)
        self.patch = nn.Conv2d(3, d, 8, 8)
        self.vision = nn.ModuleList(Attention(d) for _ in range(1))
        self.self_attn = nn.ModuleList(Attention(d) for _ in range(layers))
        self.cross_attn = nn.ModuleList(Attention(d) for _ in range(layers // 2))
        self.gate = nn.Parameter(torch.ones(layers // 2))
        self.head = nn.Linear(d, 50)

    def forward(self, input_ids, pixel_values):
        img = self.patch(pixel_values).flatten(2).transpose(1, 2)
        for a in self.vision:
            img = img + a(img)
        h = self.embed(input_ids)
        for n, a in enumerate(self.self_attn):
            h = h + a(h, causal=True)
            if n % 2 == 1:
                h = h + torch.tanh(self.gate[n // 2]) * self.cross_attn[n // 2](h, img)
        return self.head(h)


def _inputs():
    torch.manual_seed(0)
    return torch.randint(0, 50, (2, 7)), torch.randn(2, 3, 32, 32)


def test_dual_stream_co_attention():
    ids, px = _inputs()
    report = graphred.analyze(graphred.capture(DualStream().eval(), ids, px))
    kinds = {b.module_path: (b.kind, set(b.query_modalities), set(b.key_modalities)) for b in report.blocks}
    for l in range(2):
        assert kinds[f"layers.{l}.text_self"] == (UNIMODAL_SELF, {"text"}, {"text"})
        assert kinds[f"layers.{l}.image_self"] == (UNIMODAL_SELF, {"image"}, {"image"})
        assert kinds[f"layers.{l}.text_cross"] == (CROSS_ATTENTION, {"text"}, {"image"})
        assert kinds[f"layers.{l}.image_cross"] == (CROSS_ATTENTION, {"image"}, {"text"})
    assert len(report.cross_modal) == 4
    b = next(b for b in report.blocks if b.module_path == "layers.0.text_cross")
    assert b.tokens == {"text": 7, "image": 16}


def test_decoder_with_interleaved_cross_attention():
    ids, px = _inputs()
    report = graphred.analyze(graphred.capture(GatedCrossDecoder().eval(), ids, px))
    by = {b.module_path: b for b in report.blocks}
    assert by["vision.0"].kind == UNIMODAL_SELF and by["vision.0"].query_modalities == {"image"}
    for n in range(4):
        b = by[f"self_attn.{n}"]
        assert b.kind == UNIMODAL_SELF and b.query_modalities == {"text"} and b.causal
    for n in range(2):
        b = by[f"cross_attn.{n}"]
        assert b.kind == CROSS_ATTENTION and b.query_modalities == {"text"} and b.key_modalities == {"image"}
        assert (b.stack, b.layer_index) == ("cross_attn", n)


def test_pumer_applies_to_unseen_architectures():
    ids, px = _inputs()
    for model, layers in ((DualStream().eval(), [1]), (GatedCrossDecoder().eval(), [1])):
        prog = graphred.capture(model, ids, px)
        fast = graphred.transform(prog, graphred.plans.pumer(prune=0.5, merge=0.0, layers=layers))
        with torch.no_grad():
            out, ref = fast(ids, px), prog(ids, px)
        assert out.shape == ref.shape and torch.isfinite(out).all()
        assert fast.steps[0]["image_before"] == 16 and fast.steps[0]["image_after"] == 8
