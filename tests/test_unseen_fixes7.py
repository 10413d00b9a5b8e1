"""General fixes for fresh6 failures (bench/unseen_families.py, branch fix6), each on a tiny synthetic model.

* Grounding DINO (and MM Grounding DINO) failed "pumer: layer 0 of model.decoder.layers has no attention where text
  queries meet image keys". Text and image meet in the encoder's fusion layers: one score matrix, image queries by
  text keys, read both ways, the text->image direction through a transpose; clamps and in-place ``masked_fill_`` on the
  scores' path; heads folded into the batch (``bmm`` on ``[B*H, L, D]``). The analysis missed both directions there.
  Found, PuMer's default reduces at the fusion layer; where the image tokens are then split into the fixed-size levels
  of a multi-scale map (read back by spatial location, as deformable attention does), the rewrite refuses at that
  split. Where no attention has text queries over image keys, PuMer's error says so and names the stacks.
* A ``masked_fill(mask, -inf)`` mask masks *out* its true entries: read with SDPA's polarity (true: attend), a causal
  mask looked anti-causal.
* OmDet-Turbo failed capture "unhashable type: non-nested SymInt": memos of earlier calls (an LRU cache object
  holding text embeddings keyed by token ids, a ``functools.lru_cache`` method for anchors) were used and filled while
  tracing: traced (fake) tensors stayed in them, and the model's next call returned them. Capture now runs with the
  memos hidden (the forward computes what they hold) and leaves them as they were.
"""
from __future__ import annotations

import collections
import functools

import pytest
import torch
from torch import nn

import graphred
from graphred.analysis.blocks import CROSS_ATTENTION
from graphred.errors import PlanError
from graphred.plans import pumer

V, D, H, HD = 30, 16, 2, 8


class _BiAttention(nn.Module):
    """Image and text attend to each other through one score matrix (heads folded into the batch)."""

    def __init__(self, both: bool = True, clamp: bool = True):
        super().__init__()
        self.both, self.clamp = both, clamp
        self.vq, self.tk, self.vv, self.tv = (nn.Linear(D, D) for _ in range(4))
        self.vo, self.tout = nn.Linear(D, D), nn.Linear(D, D)

    def _heads(self, x):
        B, L, _ = x.shape
        return x.view(B, L, H, HD).transpose(1, 2).reshape(B * H, L, HD)

    def forward(self, img, txt, txt_pad):
        B, N, _ = img.shape
        T = txt.shape[1]
        # (every projection before the scores, as in Grounding DINO: PuMer scores at this layer and cuts the image at
        # its input, so what the layer computes from the image after the scores would be reduced, the scores not)
        vv, tv = self._heads(self.vv(img)), self._heads(self.tv(txt))
        s = torch.bmm(self._heads(self.vq(img) * HD ** -0.5), self._heads(self.tk(txt)).transpose(1, 2))
        if self.clamp:
            s = torch.clamp(s - s.max(), min=-50000, max=50000)
        pad = txt_pad[:, None, None, :].repeat(1, H, 1, 1).flatten(0, 1)  # [B*H, 1, T], true at padding
        d_img = torch.bmm(s.masked_fill(pad, float("-inf")).softmax(-1), tv)
        d_img = self.vo(d_img.view(B, H, N, HD).transpose(1, 2).reshape(B, N, D))
        if not self.both:
            return img + d_img, txt
        st = s.transpose(1, 2)
        st = st - st.max(-1, keepdim=True)[0]
        if self.clamp:
            st = torch.clamp(st, min=-50000, max=50000)
        d_txt = torch.bmm(st.softmax(-1), vv)
        d_txt = self.tout(d_txt.view(B, H, T, HD).transpose(1, 2).reshape(B, T, D))
        return img + d_img, txt + d_txt


class _FusionEncoder(nn.Module):
    """Patches at two scales (4x4 and 2x2: 20 image tokens) and text; fusion layers; with ``levels``, after each
    fusion the image tokens are split into the two levels and read as maps (a convolution each)."""

    def __init__(self, layers: int = 2, levels: bool = False, **kw):
        super().__init__()
        self.embed = nn.Embedding(V, D)
        self.p0, self.p1 = nn.Conv2d(3, D, 2, 2), nn.Conv2d(3, D, 4, 4)
        self.layers = nn.ModuleList([_BiAttention(**kw) for _ in range(layers)])
        self.maps = nn.ModuleList([nn.Conv2d(D, D, 1) for _ in range(layers)]) if levels else None
        self.levels = levels

    def forward(self, input_ids, attention_mask, pixel_values):
        txt = self.embed(input_ids)
        img = torch.cat([self.p0(pixel_values).flatten(2), self.p1(pixel_values).flatten(2)], 2).transpose(1, 2)
        pad = attention_mask == 0
        for i, layer in enumerate(self.layers):
            img, txt = layer(img, txt, pad)
            if self.levels:
                B = img.shape[0]
                a, b = img.split([16, 4], dim=1)
                a = self.maps[i](a.transpose(1, 2).reshape(B, D, 4, 4)).flatten(2).transpose(1, 2)
                b = self.maps[i](b.transpose(1, 2).reshape(B, D, 2, 2)).flatten(2).transpose(1, 2)
                img = img + torch.cat([a, b], 1)
        return img.mean(1), txt


def _inputs():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, V, (2, 7), generator=g)
    am = torch.ones(2, 7, dtype=torch.long)
    ids[1, 4:], am[1, 4:] = 0, 0  # right padding
    return {"input_ids": ids, "attention_mask": am, "pixel_values": torch.randn(2, 3, 8, 8, generator=g)}


def _capture(**kw):
    torch.manual_seed(0)
    model, kwargs = _FusionEncoder(**kw).eval(), _inputs()
    return model, kwargs, graphred.capture(model, **kwargs)


def test_fusion_attention_both_directions_are_found():
    _, _, prog = _capture()
    cross = [b for b in graphred.analyze(prog).blocks if b.kind == CROSS_ATTENTION]
    pairs = sorted((b.layer_index, tuple(sorted(b.query_modalities)), tuple(sorted(b.key_modalities))) for b in cross)
    assert pairs == [(0, ("image",), ("text",)), (0, ("text",), ("image",)),
                     (1, ("image",), ("text",)), (1, ("text",), ("image",))], pairs
    t2i = [b for b in cross if b.query_modalities == {"text"}]
    assert all(b.transposed and b.tokens_per_sample[0].get("text") == 7 for b in t2i)
    assert all(b.key_tokens == {"image": 20} for b in t2i)


def test_pumer_defaults_reduce_at_the_fusion_layer():
    model, kwargs, prog = _capture()
    reduced = graphred.transform(prog, pumer(prune=0.3, merge=0.2))
    with torch.no_grad():
        want, got = model(**kwargs), reduced(**kwargs)
    prunes = [s for s in reduced.steps if s["op"] == "prune"]
    assert [(s["block"], s["image_before"], s["image_after"]) for s in prunes] == [("layers.0", 20, 14)], reduced.steps
    assert torch.equal(got[1].isfinite(), torch.ones_like(got[1], dtype=torch.bool)) and got[0].shape == want[0].shape
    # the text tokens of layer 0 are computed before the reduction: equal; layer 1's read the reduced image
    assert not torch.allclose(got[1], want[1])
    est = graphred.estimate(prog, pumer(prune=0.3, merge=0.2))
    assert est.after.flops < est.flops
    # zero reduction stays the identity
    same = graphred.transform(prog, pumer(prune=0, merge=0))
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(same(**kwargs), want))


def test_tokens_split_into_fixed_levels_are_refused_at_the_split():
    _, _, prog = _capture(levels=True)
    with pytest.raises(PlanError, match=r"split here into parts of fixed sizes \[16, 4\]") as err:
        graphred.transform(prog, pumer(prune=0.3, merge=0.2))
    assert "split_with_sizes" in str(err.value) and "layers.0" in str(err.value)


def test_pumer_says_when_no_attention_has_text_queries_over_image_keys():
    _, _, prog = _capture(both=False, clamp=False)
    with pytest.raises(PlanError, match=r"no attention in _FusionEncoder has text queries over image keys") as err:
        graphred.transform(prog, pumer(prune=0.3, merge=0.2))
    assert "layers: image queries over text keys (layers [0, 1])" in str(err.value)


class _MaskedFillCausal(nn.Module):
    """Text with image patches before it; one unfused attention masked by ``masked_fill(upper, -inf)``."""

    def __init__(self):
        super().__init__()
        self.embed, self.patch = nn.Embedding(V, D), nn.Conv2d(3, D, 4, 4)
        self.q, self.k, self.v = nn.Linear(D, D), nn.Linear(D, D), nn.Linear(D, D)

    def forward(self, input_ids, pixel_values):
        x = torch.cat([self.patch(pixel_values).flatten(2).transpose(1, 2), self.embed(input_ids)], 1)
        L = x.shape[1]
        upper = torch.ones(L, L, dtype=torch.bool).triu(1)
        s = (self.q(x) @ self.k(x).transpose(1, 2)).masked_fill(upper, float("-inf"))
        return s.softmax(-1) @ self.v(x)


def test_masked_fill_masks_are_read_as_masking_out():
    model = _MaskedFillCausal().eval()
    kwargs = {"input_ids": torch.randint(0, V, (2, 5)), "pixel_values": torch.randn(2, 3, 8, 8)}
    (b,) = graphred.analyze(graphred.capture(model, **kwargs)).blocks
    assert b.mask_masks_out and b.causal is True


class _Memo:
    def __init__(self):
        self.cache = collections.OrderedDict()


class _Memoised(nn.Module):
    """Position embeddings memoised in a plain cache object, a grid memoised by ``functools.lru_cache``."""

    def __init__(self):
        super().__init__()
        self.pos, self.proj = nn.Embedding(16, D), nn.Linear(D, D)
        self.memo = _Memo()

    @functools.lru_cache(maxsize=4)
    def grid(self, n: int) -> torch.Tensor:
        return torch.linspace(0, 1, n)[:, None]

    def forward(self, x):
        n = x.shape[1]
        if n not in self.memo.cache:
            self.memo.cache[n] = self.pos(torch.arange(n))
        return self.proj(x + self.memo.cache[n]) * self.grid(n)


def test_capture_leaves_memos_without_traced_values():
    torch.manual_seed(0)
    model, x = _Memoised().eval(), torch.randn(2, 5, D)
    wrapper = _Memoised.__dict__["grid"]
    prog = graphred.capture(model, x)
    assert len(model.memo.cache) == 0 and _Memoised.__dict__["grid"] is wrapper
    with torch.no_grad():
        want = model(x)  # (before: the memos held fake tensors from the trace, returned here)
        got = prog.graph_module(x)
    assert type(want) is torch.Tensor and torch.allclose(_first(got), want)
    # captured again with the memos filled by that call: the graph still computes them, the memo is kept as it was
    kept = model.memo.cache[5]
    prog = graphred.capture(model, x)
    assert model.memo.cache[5] is kept and any("memoised" in n for n in prog.notes)
    with torch.no_grad():
        assert torch.allclose(_first(prog.graph_module(x)), model(x))


def _first(out):
    return out[0] if isinstance(out, (tuple, list)) else out
