"""Architectures outside the zoo, written in plain PyTorch: the analysis must read them from the graph."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import graphred
from graphred.errors import PlanError
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
    """The cut is read by what follows: fewer FLOPs run and the outputs change. In a co-attention layer the image
    stream is updated before the cross-attention that scores it, so the cut goes to that updated stream (the
    layer's input is read only before the scores); a gated cross-attention decoder's last cross layer has no
    later reader of the image features, and a plan there is refused instead of changing nothing."""
    from graphred.analysis.cost import count_flops_executed

    ids, px = _inputs()
    for model, layers in ((DualStream().eval(), [0]), (DualStream().eval(), [1]), (GatedCrossDecoder().eval(), [0])):
        prog = graphred.capture(model, ids, px)
        fast = graphred.transform(prog, graphred.plans.pumer(prune=0.5, merge=0.0, layers=layers))
        with torch.no_grad():
            out, ref = fast(ids, px), prog(ids, px)
        assert out.shape == ref.shape and torch.isfinite(out).all()
        assert not torch.equal(out, ref), (type(model).__name__, layers)
        assert fast.steps[0]["image_before"] == 16 and fast.steps[0]["image_after"] == 8
        assert count_flops_executed(fast, ids, px) < count_flops_executed(prog, ids, px), (type(model).__name__, layers)
    prog = graphred.capture(GatedCrossDecoder().eval(), ids, px)
    with pytest.raises(PlanError, match="no op after the cut reads"):
        graphred.transform(prog, graphred.plans.pumer(prune=0.5, merge=0.0, layers=[1]))


# ------------------------------------------------------------------- issue 13, classes 2, 3, 4, 6


class RegionFeatureDualStream(nn.Module):
    """LXMERT-style: region features (a float tensor, no convolution) projected by a Linear form the image
    stream; text attends to it across streams."""

    def __init__(self, d=32, feat=24, layers=2):
        super().__init__()
        self.embed = nn.Embedding(50, d)
        self.regions = nn.Linear(feat, d)
        self.text_self = nn.ModuleList(Attention(d) for _ in range(layers))
        self.image_self = nn.ModuleList(Attention(d) for _ in range(layers))
        self.cross = nn.ModuleList(Attention(d) for _ in range(layers))
        self.head = nn.Linear(d, 3)

    def forward(self, input_ids, region_features):
        t, i = self.embed(input_ids), self.regions(region_features)
        for ts, im, c in zip(self.text_self, self.image_self, self.cross):
            t, i = t + ts(t), i + im(i)
            t = t + c(t, i)
        return self.head(t[:, 0])


class RegionFeatureSingleStream(nn.Module):
    """VisualBERT-style: projected region features concatenated after the text into one encoder sequence."""

    def __init__(self, d=32, feat=24, layers=2):
        super().__init__()
        self.embed = nn.Embedding(50, d)
        self.regions = nn.Linear(feat, d)
        self.layers = nn.ModuleList(Attention(d) for _ in range(layers))

    def forward(self, input_ids, region_features):
        h = torch.cat([self.embed(input_ids), self.regions(region_features)], 1)
        for a in self.layers:
            h = h + a(h)
        return h[:, 0]


def _regions():
    torch.manual_seed(0)
    return torch.randint(0, 50, (2, 7)), torch.randn(2, 10, 24)


def test_region_features_through_a_linear_are_an_image_stream():
    """Class 2: no convolution anywhere; the float input reaches the tokens through a projection."""
    ids, feats = _regions()
    prog = graphred.capture(RegionFeatureDualStream().eval(), ids, feats)
    by = {b.module_path: b for b in graphred.analyze(prog).blocks}
    for l in range(2):
        assert by[f"image_self.{l}"].kind == UNIMODAL_SELF and by[f"image_self.{l}"].query_modalities == {"image"}
        assert by[f"image_self.{l}"].tokens == {"image": 10}
        c = by[f"cross.{l}"]
        assert (c.kind, c.query_modalities, c.key_modalities) == (CROSS_ATTENTION, {"text"}, {"image"})
        assert c.key_stream is not None
    fast = graphred.transform(prog, graphred.plans.pumer(prune=0.5, merge=0.0, layers=[0]))
    with torch.no_grad():
        assert torch.isfinite(fast(ids, feats)).all()
    assert [(s["image_before"], s["image_after"]) for s in fast.steps] == [(10, 5)]
    est = graphred.estimate(prog, graphred.plans.pumer(prune=0.5, merge=0.0, layers=[0]))
    assert est.after.flops < est.flops

    single = graphred.capture(RegionFeatureSingleStream().eval(), ids, feats)
    blocks = graphred.analyze(single).blocks
    assert [b.kind for b in blocks] == [CROSS_MODAL_SELF] * 2
    assert all(b.tokens == {"text": 7, "image": 10} for b in blocks)
    fast = graphred.transform(single, graphred.plans.pumer(prune=0.4, merge=0.0, layers=[1]))
    with torch.no_grad():
        out, ref = fast(ids, feats), single(ids, feats)
    assert out.shape == ref.shape and fast.steps[0]["image_after"] == 6


class PostNormDecoder(nn.Module):
    """Class 4 in one decoder: scaled token embeddings plus learned absolute positions, a causal convolution
    layer before the first attention, norms after the residual (post-norm) applied on a folded [B*L, C]
    layout, and gated cross-attention to the image interleaved with the self-attention layers."""

    def __init__(self, d=32, layers=3):
        super().__init__()
        self.embed = nn.Embedding(50, d)
        self.pos = nn.Embedding(64, d)
        self.patch = nn.Conv2d(3, d, 8, 8)
        self.proj = nn.Linear(d, d)
        self.conv = nn.Conv1d(d, d, 3, padding=2, groups=d)
        self.attn = nn.ModuleList(Attention(d) for _ in range(layers))
        self.norm = nn.ModuleList(nn.LayerNorm(d) for _ in range(layers))
        self.mlp = nn.ModuleList(nn.Linear(d, d) for _ in range(layers))
        self.cross = nn.ModuleList(Attention(d) for _ in range(layers))
        self.gate = nn.Parameter(torch.full((layers,), 0.5))

    def forward(self, input_ids, pixel_values, image_mask):
        img = self.proj(self.patch(pixel_values).flatten(2).transpose(1, 2))
        B, L = input_ids.shape
        h = self.embed(input_ids) * 5.0
        h = h.masked_scatter(image_mask[..., None], img.to(h.dtype))
        h = h + self.pos(torch.arange(L))[None]
        h = h + self.conv(h.transpose(1, 2))[..., :L].transpose(1, 2)  # causal conv layer first
        for n, (a, norm, mlp) in enumerate(zip(self.attn, self.norm, self.mlp)):
            h = h + a(h, causal=True)
            flat = h.reshape(B * L, -1)  # post-norm and feed-forward on the folded layout
            h = norm(flat + mlp(flat)).view(B, L, -1)
            if n % 2 == 1:
                h = h + torch.tanh(self.gate[n]) * self.cross[n](h, img)
        return h


def _decoder_inputs():
    torch.manual_seed(0)
    ids = torch.randint(0, 50, (2, 24))
    mask = torch.zeros(2, 24, dtype=torch.bool)
    mask[:, 3:19] = True
    return ids, torch.randn(2, 3, 32, 32), mask


def test_decoder_variants_are_walked_structurally():
    ids, px, mask = _decoder_inputs()
    prog = graphred.capture(PostNormDecoder().eval(), ids, px, mask)
    by = {b.module_path: b for b in graphred.analyze(prog).blocks}
    for n in range(3):
        b = by[f"attn.{n}"]
        assert b.kind == CROSS_MODAL_SELF and b.tokens == {"image": 16, "text": 8} and b.causal
    assert by["cross.1"].kind == CROSS_ATTENTION
    for plan, after in ((graphred.plans.fastv(layer=2, keep=0.5), [8]),
                        (graphred.plans.pumer(prune=0.25, merge=0.0, layers=[1, 2]), [12, 9])):
        fast = graphred.transform(prog, plan)
        with torch.no_grad():
            out = fast(ids, px, mask)
        assert torch.isfinite(out).all()
        assert [s["image_after"] for s in fast.steps] == after
        est = graphred.estimate(prog, plan)
        assert est.after.flops < est.flops


class PythonBookkeepingVLM(nn.Module):
    """Class 6: image positions and a branch computed by data-dependent Python (a loop over grid values,
    a dict keyed by them, counts expanded with repeat_interleave, ``mask.any()``)."""

    def __init__(self, d=32, image_id=49):
        super().__init__()
        self.embed = nn.Embedding(50, d)
        self.patch = nn.Linear(12, d)
        self.pos = nn.Embedding(64, d)
        self.layers = nn.ModuleList(Attention(d) for _ in range(2))
        self.image_id = image_id

    def forward(self, input_ids, patches, grid):
        positions, offsets = [], {}
        for t, h, w in grid.tolist():  # per image, in Python
            offsets[(h, w)] = len(positions)
            positions.extend(range(h * w))
        counts = grid.prod(-1)
        which = torch.repeat_interleave(torch.arange(grid.shape[0]), counts)
        img = self.patch(patches) + self.pos(torch.tensor(positions)) + which[:, None] * 0.01
        h = self.embed(input_ids)
        mask = input_ids == self.image_id
        if mask.any():
            h = h.masked_scatter(mask[..., None], img)
        for a in self.layers:
            h = h + a(h, causal=True)
        return h


def test_data_dependent_python_captures_without_precomputed_inputs():
    torch.manual_seed(0)
    ids = torch.randint(0, 40, (2, 12))
    ids[:, 2:10] = 49
    patches, grid = torch.randn(16, 12), torch.tensor([[1, 2, 4], [1, 4, 2]])
    model = PythonBookkeepingVLM().eval()
    prog = graphred.capture(model, ids, patches, grid)
    assert prog.method == "draft_export" and any("read into Python" in n for n in prog.notes)
    with torch.no_grad():
        assert torch.equal(prog(ids, patches, grid), model(ids, patches, grid))
    blocks = graphred.analyze(prog).blocks
    assert [b.kind for b in blocks] == [CROSS_MODAL_SELF] * 2 and blocks[0].tokens == {"image": 8, "text": 4}
    fast = graphred.transform(prog, graphred.plans.fastv(layer=1, keep=0.5))
    with torch.no_grad():
        assert torch.isfinite(fast(ids, patches, grid)).all()
    assert fast.steps[0]["image_after"] == 4
