"""General fixes for fresh3 failures that were left open (bench/unseen_families.py, branch fix13c), each on a tiny
synthetic model:

* a cat along the reduced token axis (an encoder-decoder whose decoder layers build their keys as the cat of their
  own keys and the encoder's output, T5Gemma 2's merged self/cross attention): the rewrite carries the reduction
  through it, the kept positions of the concatenated tokens being the union of each part's, shifted by the part's
  offset; masks at the concatenated length are gathered with that union (before: "concatenation along the reduced
  token axis");
* a running offset kept in a tensor that capture folded to a constant and that the model's code then writes in place
  with traced operands (``start += height * width`` in MiniCPM-V 4.6's merger): the graph records the write, and a
  later read of the offset into Python now gives the written value (before: the stale one, so the third image was
  cut at the second one's offset and capture failed "does not reproduce the model");
* a mixture of experts looping over the experts a batch hits (Step3p7): the values read during a capture with
  real-tensor propagation follow the model's weights (torch gave an ``nn.Parameter``'s real tensor uninitialised
  memory, so routing read into Python was garbage), and a loop over the rows of a ``nonzero`` gets one row per
  element (before: "cannot infer a Fake kernel for aten::index.Tensor because a return was not dense in memory").
"""
from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

import graphred
from graphred.plans import pumer

V, D, IMG_ID, N_IMG, T_ENC, T_DEC = 40, 16, 39, 16, 6, 5


class _EncDecCatKeys(nn.Module):
    """An encoder over image patches and text (padding mask), and a decoder whose layers attend to
    ``cat([own keys, encoder keys])`` with ``cat([causal mask, encoder padding mask])``."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(V, D)
        self.patch = nn.Conv2d(3, D, 2, 2)
        self.enc = nn.ModuleList([nn.Linear(D, 3 * D) for _ in range(2)])
        self.enc_out = nn.ModuleList([nn.Linear(D, D) for _ in range(2)])
        self.q = nn.ModuleList([nn.Linear(D, D) for _ in range(2)])
        self.own = nn.ModuleList([nn.Linear(D, 2 * D) for _ in range(2)])
        self.cross = nn.ModuleList([nn.Linear(D, 2 * D) for _ in range(2)])
        self.out = nn.ModuleList([nn.Linear(D, D) for _ in range(2)])

    def forward(self, input_ids, pixel_values, attention_mask, decoder_input_ids):
        img = self.patch(pixel_values).flatten(2).transpose(1, 2)  # [B, 16, D]
        x = torch.cat([img, self.embed(input_ids)], 1)
        B, L, _ = x.shape
        keep = torch.cat([torch.ones(B, N_IMG, dtype=torch.bool), attention_mask.bool()], 1)
        enc_mask = keep[:, None, None, :]
        for qkv, out in zip(self.enc, self.enc_out):
            q, k, v = qkv(x).view(B, L, 3, 2, D // 2).permute(2, 0, 3, 1, 4)
            x = x + out(F.scaled_dot_product_attention(q, k, v, attn_mask=enc_mask).transpose(1, 2).reshape(B, L, D))
        y = self.embed(decoder_input_ids)
        T = y.shape[1]
        causal = torch.ones(T, T, dtype=torch.bool).tril()[None, None].expand(B, 1, T, T)
        mask = torch.cat([causal, enc_mask.expand(B, 1, T, L)], -1)
        for q_proj, own, cross, out in zip(self.q, self.own, self.cross, self.out):
            q = q_proj(y).view(B, T, 2, D // 2).transpose(1, 2)
            ko, vo = own(y).view(B, T, 2, 2, D // 2).permute(2, 0, 3, 1, 4)
            kc, vc = cross(x).view(B, L, 2, 2, D // 2).permute(2, 0, 3, 1, 4)
            k, v = torch.cat([ko, kc], 2), torch.cat([vo, vc], 2)
            y = y + out(F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2).reshape(B, T, D))
        return y


def _enc_dec_inputs():
    g = torch.Generator().manual_seed(0)
    am = torch.ones(2, T_ENC, dtype=torch.long)
    am[1, -2:] = 0  # right padding in the encoder
    return {"input_ids": torch.randint(1, V - 1, (2, T_ENC), generator=g),
            "pixel_values": torch.randn(2, 3, 8, 8, generator=g), "attention_mask": am,
            "decoder_input_ids": torch.randint(1, V - 1, (2, T_DEC), generator=g)}


def test_cat_along_the_reduced_token_axis():
    torch.manual_seed(0)
    model, kwargs = _EncDecCatKeys().eval(), _enc_dec_inputs()
    prog = graphred.capture(model, **kwargs)
    reduced = graphred.transform(prog, pumer(prune=0.5, merge=0.0, layers=[0]))
    prunes = [s for s in reduced.steps if s.get("op") == "prune"]
    assert prunes and prunes[0]["image_after"] < prunes[0]["image_before"], reduced.steps
    with torch.no_grad():
        got, want = reduced(**kwargs), model(**kwargs)
    assert got.shape == want.shape and torch.isfinite(got).all()
    assert not torch.allclose(got, want)  # the decoder reads fewer encoder tokens
    # the decoder's keys are its own 5 and the kept encoder tokens; its mask lines up with them: the causal part
    # unchanged, and the padding of sample 1 (its last 2 text tokens, never pruned by an image prune) still masked
    gm = reduced.graph_module
    cats = [n for n in gm.graph.nodes if n.target is torch.ops.aten.scaled_dot_product_attention.default
            and n.args[1].meta["val"].shape[-2] > n.args[0].meta["val"].shape[-2]]
    assert len(cats) == 2
    n_enc = N_IMG + T_ENC - (prunes[0]["image_before"] - prunes[0]["image_after"])
    for n in cats:
        assert n.args[1].meta["val"].shape[-2] == T_DEC + n_enc
        mask = n.args[3] if len(n.args) > 3 else n.kwargs["attn_mask"]
        assert mask.meta["val"].shape[-1] == T_DEC + n_enc
    seen = []

    class _Record(fx.Interpreter):
        def call_function(self, target, args, kw):
            if target is torch.ops.aten.scaled_dot_product_attention.default and args[1].shape[-2] > args[0].shape[-2]:
                seen.append(args[3] if len(args) > 3 else kw["attn_mask"])
            return super().call_function(target, args, kw)

    names = [p.target for p in gm.graph.nodes if p.op == "placeholder"]
    gm.forward = lambda *a, **k: _Record(gm).run(*a, *[k[x] for x in names[len(a):]])
    with torch.no_grad():
        torch.testing.assert_close(reduced(**kwargs), got)
    assert len(seen) == 2
    causal = torch.ones(T_DEC, T_DEC, dtype=torch.bool).tril()
    for m in seen:
        m = m.expand(2, 1, T_DEC, T_DEC + n_enc)
        assert torch.equal(m[:, 0, :, :T_DEC], causal.expand(2, T_DEC, T_DEC))  # the decoder's own keys: offset 0
        assert m[0, 0, :, T_DEC:].all()  # sample 0 has no padding
        assert not m[1, 0, :, -2:].any() and m[1, 0, :, T_DEC:-2].all()  # sample 1's 2 pad tokens, still last


def test_cat_reduced_matches_the_model_at_zero_reduction():
    torch.manual_seed(0)
    model, kwargs = _EncDecCatKeys().eval(), _enc_dec_inputs()
    prog = graphred.capture(model, **kwargs)
    reduced = graphred.transform(prog, pumer(prune=0.0, merge=0.0))
    with torch.no_grad():
        torch.testing.assert_close(reduced(**kwargs), model(**kwargs))


class _RunningOffset(nn.Module):
    """Per-image features cut from one row of patches at a running offset kept in a tensor (MiniCPM-V 4.6's merger:
    ``start = 0; ...; start += height * width``, with ``height, width = target_sizes[i]``)."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 8)

    def forward(self, patches, target_sizes):
        x = self.proj(patches)  # [1, P, 8]
        grids = {tuple(hw) for hw in target_sizes.tolist()}  # (values read as dict keys: a capture with values read)
        x = x * len(grids)
        start, feats = 0, []
        for i in range(len(target_sizes)):
            h, w = target_sizes[i]
            n = h * w
            feats.append(x[0, start:start + n].mean(0))
            start += n
        return torch.stack(feats)


def test_running_offset_written_in_place_is_read_fresh():
    # the offset is folded to a constant after the first image and then written in place with traced operands:
    # the graph records the write, and the next image's slice must read the written value (before: the third
    # image was cut at the second one's offset, and capture failed "does not reproduce the model")
    torch.manual_seed(0)
    model = _RunningOffset().eval()
    kwargs = {"patches": torch.randn(1, 4 + 4 + 8, 4), "target_sizes": torch.tensor([[2, 2], [2, 2], [2, 4]])}
    prog = graphred.capture(model, **kwargs)
    assert prog.method == "draft_export", prog.notes  # (the offset is read into Python: values read)
    with torch.no_grad():
        torch.testing.assert_close(prog(**kwargs), model(**kwargs))



class _ExpertLoop(nn.Module):
    """A mixture of experts looping over the experts a batch hits (Step3p7's, as Hugging Face writes them):
    ``for e in nonzero(hit): tok = where(mask[e])``, with a one-row-per-token routing (top-1) from a Linear."""

    def __init__(self):
        super().__init__()
        self.router = nn.Linear(4, 3)
        self.w = nn.Parameter(torch.randn(3, 4, 4))

    def forward(self, x):
        top = self.router(x).topk(1, -1).indices  # [T, 1]
        final = torch.zeros_like(x)
        with torch.no_grad():
            mask = F.one_hot(top, num_classes=4).permute(2, 1, 0)  # [experts + 1, 1, T]
            hit = torch.greater(mask.sum(dim=(-1, -2)), 0).nonzero()
        for e in hit:
            e = e[0]
            if e == 3:
                continue
            _, tok = torch.where(mask[e])
            final.index_add_(0, tok, x[tok] @ self.w[e])
        return final


def test_expert_loop_captures_with_the_routing_of_the_weights():
    # values read during the capture follow the model's weights (before, torch gave the parameters' real tensors
    # uninitialised memory: the loop ran over garbage experts, differently at each capture), and a loop over the
    # rows of a nonzero gets rows, not the whole tensor (before: "cannot infer a Fake kernel for aten::index.Tensor
    # because a return was not dense in memory")
    torch.manual_seed(0)
    model = _ExpertLoop().eval()
    with torch.no_grad():
        model.router.bias.copy_(torch.tensor([0.0, 50.0, 0.0]))  # every token routed to expert 1
    kwargs = {"x": torch.randn(7, 4)}
    prog = graphred.capture(model, **kwargs)
    assert prog.method == "draft_export", prog.notes
    with torch.no_grad():
        torch.testing.assert_close(prog(**kwargs), model(**kwargs))
