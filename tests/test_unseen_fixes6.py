"""General fixes for fresh5 failures (bench/unseen_families.py, branch fix5), each on a tiny synthetic model.

Inkling 2 (and its looped variant) failed "pumer: layer 0 ... has no attention where text queries meet image keys". Its
decoder is unusual in several ways at once, each of which the synthetic decoder below has:

* a router that sends each token's row through a data-dependent permutation (experts), so the analysis has no token
  axis for the layer's MLP output, then a short causal convolution over it: the analysis read that convolution as an
  image patch embedding (a new all-image stream), which the residual add then merged into the decoder's stream, so
  every decoder attention looked image-only. A convolution over features into which text has flowed is no patch
  embedding;
* attention residuals over blocks of layers: the attention output is not added back to the stream but stacked with
  the earlier blocks' states, which a learned query then mixes per token (an attention over the depth). PuMer's point
  after the attention is then the attention's output where it joins that stack; the default layers are those whose
  attention has text queries on image keys (the per-token depth attention has none), each once;
* after the cut, the rewrite meets ops the analysis has no axis for (the router's output): a padding mask multiplied
  elementwise, the convolution with its overhang, a causal left pad and ``unfold`` for per-token dynamic
  convolution weights, a view whose inferred size is not the one that grows; a relative-position bias gathered from a
  constant ``[Lq, Lk]`` distance table (the table is gathered per sample on both token dims); attention-sink logits
  joined to the scores and sliced off the probabilities (the filler mask of an uneven batch goes on the keys' part).
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils import _pytree as pytree

import graphred
from graphred.analysis.blocks import CROSS_MODAL_SELF
from graphred.passes.apply import apply_plan
from graphred.plans import pumer

V, D, H, HD, IMG, R, E = 40, 16, 2, 8, 39, 6, 3


class _Layer(nn.Module):
    def __init__(self):
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(D, D) for _ in range(4))
        self.kw = nn.Linear(D, H * 3)  # per-token weights of a causal dynamic convolution on the keys
        self.rel = nn.Linear(D, H * R)  # per-token bias by distance, 0 <= distance < R
        self.sink = nn.Linear(D, H)
        self.depth_q = nn.Parameter(torch.randn(D) * 0.1)
        self.router = nn.Linear(D, E)
        self.experts = nn.Parameter(torch.randn(E, D, D) * 0.2)
        self.conv = nn.Conv1d(D, D, 3, padding=2, groups=D)

    def forward(self, x, states, mask4, pad, dist):
        B, L, _ = x.shape
        q = self.q(x).view(B, L, H, HD).transpose(1, 2)
        k = self.k(x)
        win = F.pad(k.transpose(1, 2), (2, 0))[..., -(L + 2):].unfold(-1, 3, 1).flip(-1).transpose(1, 2)
        k = (win.reshape(B, L, H, -1, 3) * self.kw(x).view(B, L, H, 1, 3)).sum(-1).reshape(B, L, D) + k
        k = k.view(B, L, H, HD).transpose(1, 2)
        v = self.v(x).view(B, L, H, HD).transpose(1, 2)
        rel = self.rel(x).view(B, L, H, R).transpose(1, 2)
        bias = rel.gather(-1, dist.clamp(0, R - 1).expand(B, H, L, L)).masked_fill((dist < 0) | (dist >= R), 0.0)
        s = q @ k.transpose(-1, -2) * HD ** -0.5 + bias + mask4
        sinks = self.sink(x).transpose(1, 2).unsqueeze(-1)
        p = torch.cat([s, sinks], -1).float().softmax(-1)[..., :-1]
        h = self.o((p @ v).transpose(1, 2).reshape(B, L, D))
        # attention residuals: the layer input joins the stacked block states, the attention output is mixed with
        # them per token by a learned query (no residual add after the attention)
        states = torch.cat([states, x.unsqueeze(-2)], -2)
        st = torch.cat([states, h.unsqueeze(-2)], -2)
        w = (self.depth_q.expand(B, L, 1, D) @ st.transpose(-1, -2)).softmax(-1)
        m = (w @ st)[..., 0, :]
        # routed MLP: rows sorted by expert, then put back (the token axis goes through a permutation)
        flat = m.reshape(-1, D)
        e = self.router(flat).argmax(-1)
        order = torch.argsort(e, stable=True)
        y = torch.bmm(flat[order].unsqueeze(1), self.experts[e[order]]).squeeze(1)
        inv = torch.empty_like(order)
        inv[order] = torch.arange(order.numel())
        y = y[inv].view(B, L, D)
        # a short causal convolution after the MLP, padding masked
        y = self.conv((y * pad[:, :, None]).transpose(1, 2))[..., :L].transpose(1, 2)
        return h + y, states


class _BlockResidualDecoder(nn.Module):
    """Image patches scattered into placeholder tokens (8 in sample 0, 16 in sample 1), then 3 decoder layers."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(V, D)
        self.patch = nn.Conv2d(3, D, 2, 2)
        self.layers = nn.ModuleList([_Layer() for _ in range(3)])
        self.head = nn.Linear(D, V)

    def forward(self, input_ids, pixel_values, attention_mask):
        x = self.embed(input_ids)
        img = self.patch(pixel_values).flatten(2).transpose(1, 2).reshape(-1, D)
        ph = (input_ids == IMG)[..., None].expand_as(x)
        x = x.masked_scatter(ph, img.to(x.dtype))
        B, L, _ = x.shape
        allowed = torch.ones(L, L, dtype=torch.bool).tril()[None, None] & attention_mask.bool()[:, None, None, :]
        mask4 = torch.zeros(B, 1, L, L).masked_fill(~allowed, torch.finfo(torch.float32).min)
        pos = torch.arange(L)
        dist = pos[:, None] - pos[None, :]
        states = x.new_zeros(B, L, 0, D)
        for layer in self.layers:
            x, states = layer(x, states, mask4, attention_mask.float(), dist)
        return self.head(x)


def _inputs():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, V - 2, (2, 24), generator=g)
    am = torch.ones(2, 24, dtype=torch.long)
    ids[0, :3], am[0, :3] = 0, 0  # left padding
    ids[0, 5:13] = IMG  # one image (8 tokens)
    ids[1, 2:18] = IMG  # two images
    return {"input_ids": ids, "pixel_values": torch.randn(3, 3, 4, 8, generator=g), "attention_mask": am}


@functools.lru_cache(maxsize=1)
def _captured():
    torch.manual_seed(0)
    model, kwargs = _BlockResidualDecoder().eval(), _inputs()
    return model, kwargs, graphred.capture(model, **kwargs)


def _leaves(out):
    return [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]


def test_convolution_after_a_router_is_no_image_stream():
    report = graphred.analyze(_captured()[2])
    # each layer's token attention sees the text and the image (before: image only, the decoder's stream merged
    # with a made-up patch stream from the convolution after the router)
    selfs = [b for b in report.blocks if b.kind == CROSS_MODAL_SELF]
    assert [b.layer_index for b in selfs] == [0, 1, 2], [(b.module_path, b.kind) for b in report.blocks]
    assert all(b.query_modalities == {"image", "text"} == b.key_modalities for b in selfs)
    assert all(b.tokens_per_sample == [{"image": 8, "text": 16}, {"image": 16, "text": 8}] for b in selfs)


def test_pumer_defaults_reduce_a_block_residual_decoder():
    model, kwargs, prog = _captured()
    reduced = graphred.transform(prog, pumer(prune=0.3, merge=0.2))
    with torch.no_grad():
        want, got = model(**kwargs), reduced(**kwargs)
    # (a logit per kept token: the text's and the kept image tokens')
    assert got.shape[::2] == want.shape[::2] and got.shape[1] < want.shape[1] and torch.isfinite(got).all()
    prunes = [s for s in reduced.steps if s["op"] == "prune"]
    # once per layer where text queries meet image keys, from the second on (not once per attention in the layer)
    assert [s["block"] for s in prunes] == ["layers.1", "layers.2"], reduced.steps
    assert all(a < b for s in prunes for a, b in zip(s["image_after"], s["image_before"]))
    assert prunes[0]["image_before"] == [8, 16] and prunes[0]["fillers_after"] != [0, 0]  # an uneven batch
    est = graphred.estimate(prog, pumer(prune=0.3, merge=0.2))
    assert est.after.flops < est.flops


def test_block_residual_decoder_keep_all_is_bit_exact():
    _, kwargs, prog = _captured()
    applied = apply_plan(prog, pumer(prune=0.3, merge=0.2), keep_all=True)
    assert len(applied.steps) == 4 and all(s["image_after"] == s["image_before"] for s in applied.steps)
    with torch.no_grad():
        want, got = _leaves(prog.graph_module(**kwargs)), _leaves(applied.graph_module(**kwargs))
    if applied.positions_output:  # (the kept positions, appended: every position here)
        assert torch.equal(got.pop(), torch.arange(24).expand(2, 24))
    assert len(want) == len(got) and all(torch.equal(w, g) for w, g in zip(want, got))


# ---------------------------------------------------------------------------------------------------------------------
# Granite 4 Vision failed "advanced indexing on the reduced token axis with positions not computed from the reduced
# tokens" at ``hidden[mask]``: before each of several decoder layers, features (one row per image token, packed in
# the order of the image positions) are added at the image positions, ``h.masked_scatter(m, (h[m] + f).view(-1))``.
# After a reduction, the mask is gathered like the tokens and picks the kept rows, and the packed features are gathered
# by each kept row's rank among the image positions; the same sequence goes on after each such write (it writes the
# image code where the image already is).

class _DeepLayer(nn.Module):
    def __init__(self, identity: bool):
        super().__init__()
        self.qkv, self.o, self.mlp = nn.Linear(D, 3 * D), nn.Linear(D, D), nn.Linear(D, D)
        if identity:  # the layer returns its input (the attention still scores the tokens)
            for p in (*self.o.parameters(), *self.mlp.parameters()):
                nn.init.zeros_(p)

    def forward(self, x, mask):
        B, L, _ = x.shape
        q, k, v = self.qkv(x).view(B, L, 3, H, HD).permute(2, 0, 3, 1, 4)
        x = x + self.o(F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2).reshape(B, L, D))
        return x + self.mlp(x).relu()


class _DeepstackDecoder(nn.Module):
    """Image patches scattered into placeholders, features added at the image positions before layers 1..3 of 4."""

    def __init__(self, identity: bool = False):
        super().__init__()
        self.embed = nn.Embedding(V, D)
        self.patch = nn.Conv2d(3, D, 2, 2)
        self.taps = nn.ModuleList([nn.Linear(D, D) for _ in range(3)])
        self.layers = nn.ModuleList([_DeepLayer(identity) for _ in range(4)])

    def forward(self, input_ids, pixel_values, attention_mask):
        x = self.embed(input_ids)
        img = self.patch(pixel_values).flatten(2).transpose(1, 2).reshape(-1, D)
        m = (input_ids == IMG)[..., None]
        x = x.masked_scatter(m.expand_as(x), img)
        B, L, _ = x.shape
        mask = torch.ones(L, L, dtype=torch.bool).tril()[None, None] & attention_mask.bool()[:, None, None, :]
        for i, layer in enumerate(self.layers):
            if i >= 1:
                x = x.masked_scatter(m, (x[m.squeeze(-1)] + self.taps[i - 1](img)).view(-1))
            x = layer(x, mask)
        return x


def _deep_inputs():
    g = torch.Generator().manual_seed(0)
    ids = torch.stack([torch.randperm(V - 3, generator=g)[:28] + 1 for _ in range(2)])  # (no token twice)
    am = torch.ones(2, 28, dtype=torch.long)
    ids[0, :3], am[0, :3] = 0, 0
    ids[0, 5:13] = IMG  # 8 image tokens
    ids[1, 2:18] = IMG  # 16
    return {"input_ids": ids, "pixel_values": torch.randn(3, 3, 4, 8, generator=g), "attention_mask": am}


def test_features_added_at_image_positions_after_the_cut():
    torch.manual_seed(0)
    model, kwargs = _DeepstackDecoder().eval(), _deep_inputs()
    prog = graphred.capture(model, **kwargs)
    report = graphred.analyze(prog)
    # one sequence through the decoder (each write of the features keeps it)
    assert len({b.query_stream for b in report.blocks}) == 1 and len(report.blocks) == 4
    reduced = graphred.transform(prog, pumer(prune=0.3, merge=0.2))
    with torch.no_grad():
        out = reduced(**kwargs)
    prunes = [s for s in reduced.steps if s["op"] == "prune"]
    assert [s["block"] for s in prunes] == ["layers.1", "layers.2", "layers.3"], reduced.steps
    assert prunes[0]["image_before"] == [8, 16] and all(
        a < b for s in prunes for a, b in zip(s["image_after"], s["image_before"]))
    assert torch.isfinite(out).all() and out.shape[1] < 28
    applied = apply_plan(prog, pumer(prune=0.3, merge=0.2), keep_all=True)
    with torch.no_grad():
        want, got = _leaves(prog.graph_module(**kwargs)), _leaves(applied.graph_module(**kwargs))
    if applied.positions_output:
        got.pop()
    assert len(want) == len(got) and all(torch.equal(w, g) for w, g in zip(want, got))


def test_features_reach_the_kept_image_tokens():
    # identity layers: each output row is its token's input plus the features added at its position, so every row of
    # the pruned model must be the unreduced model's row at the position it kept (the features of its own rank)
    torch.manual_seed(0)
    model, kwargs = _DeepstackDecoder(identity=True).eval(), _deep_inputs()
    prog = graphred.capture(model, **kwargs)
    reduced = graphred.transform(prog, pumer(prune=0.5, merge=0.0))
    with torch.no_grad():
        want, got = model(**kwargs), reduced(**kwargs)
    assert got.shape[1] < want.shape[1]
    text = kwargs["input_ids"] != IMG
    for b in range(2):
        pos = [int(torch.cdist(row[None], want[b]).argmin()) for row in got[b]]
        assert torch.allclose(got[b], want[b, pos], atol=1e-5)  # (a row with another rank's features matches none)
        assert set(torch.nonzero(text[b]).flatten().tolist()) - {0, 1, 2} <= set(pos)  # the text (padding: alike)
        assert len({p for p in pos if not text[b, p]}) < int((~text[b]).sum())  # and fewer image tokens
