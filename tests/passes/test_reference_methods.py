"""Differential tests: graphred's rewrites against the reference algorithms, ported by hand to plain
eager PyTorch (written from /work/shared/ALGORITHMS.md and the papers, not from graphred's code).

* ToMe (Bolya et al.): bipartite soft matching on head-mean keys after each attention residual,
  ``merge_wavg``, the ``[unmerged A, merged B]`` output order (class token sorted first), the cap
  ``(t - protected) // 2``, proportional attention. CLIP and SigLIP vision towers.
* PuMer (Cao et al.): text-informed pruning (valid text queries, head mean, top-k in score order), then
  modality-aware merging as the released reducer: A/B alternate in score order, the best-scored kept
  token protected, sizes 1 at each layer, ``round(ratio * N)`` with ``N`` the image tokens before
  pruning. ViLT (right padding) and LLaVA (left and right padding).
* FastV (Chen et al.): the last query's head-mean attention at layer K-1, top ``round(keep * N)``.
  LLaVA, left and right padding.

The models have 4 layers (the zoo presets' configs with more layers, seeded init): with 2 layers
the differences between layer orders hide. Each test also checks that the non-reference variant
gives something else, so that a test that could not tell them apart fails.
"""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

import graphred
from graphred import ops as gops  # noqa: F401  (registers the graphred:: ops)
from graphred import zoo
from graphred.plans import fastv, pumer, tome

ATOL = 1e-4


# --------------------------------------------------------------------------------- models


_CACHE: dict = {}


def _captured(name: str, padding: str = "default"):
    key = (name, padding)
    if key not in _CACHE:
        model, kwargs = zoo.deepened(name)
        if padding == "right":
            kwargs = _right_padded(kwargs)
        _CACHE[key] = (model, kwargs, graphred.capture(copy.deepcopy(model), **kwargs))
    return _CACHE[key]


def _right_padded(kwargs: dict) -> dict:
    """A left-padded decoder batch turned right-padded: each row's padding moved to its end."""
    kw = dict(kwargs)
    ids, mask = kwargs["input_ids"].clone(), kwargs["attention_mask"].clone()
    for b in range(ids.shape[0]):
        p = int((mask[b] == 0).sum())
        ids[b] = torch.roll(ids[b], -p)
        mask[b] = torch.roll(mask[b], -p)
    assert bool((mask[:, 0] == 1).all()) and bool((mask == 0).any())
    kw["input_ids"], kw["attention_mask"] = ids, mask
    return kw


# --------------------------------------------------------------------------------- the reference algorithms


def tome_match(metric: torch.Tensor, r: int, class_token: bool):
    """ToMe's ``bipartite_soft_matching`` for one batch: returns ``merge(x, mode)`` as the reference's."""
    t = metric.shape[1]
    r = min(r, (t - int(class_token)) // 2)
    metric = metric / metric.norm(dim=-1, keepdim=True)
    a, b = metric[..., ::2, :], metric[..., 1::2, :]
    scores = a @ b.transpose(-1, -2)
    if class_token:
        scores[..., 0, :] = -math.inf
    node_max, node_idx = scores.max(dim=-1)
    edge_idx = node_max.argsort(dim=-1, descending=True)[..., None]
    unm_idx, src_idx = edge_idx[..., r:, :], edge_idx[..., :r, :]
    dst_idx = node_idx[..., None].gather(dim=-2, index=src_idx)
    if class_token:
        unm_idx = unm_idx.sort(dim=1)[0]

    def merge(x: torch.Tensor, mode: str = "sum") -> torch.Tensor:
        src, dst = x[..., ::2, :], x[..., 1::2, :]
        n, t1, c = src.shape
        unm = src.gather(dim=-2, index=unm_idx.expand(n, t1 - r, c))
        src = src.gather(dim=-2, index=src_idx.expand(n, r, c))
        dst = dst.scatter_reduce(-2, dst_idx.expand(n, r, c), src, reduce=mode)
        return torch.cat([unm, dst], dim=1)

    def order(x: torch.Tensor) -> torch.Tensor:  # what sits where after merge(): [unmerged A, B]
        src, dst = x[..., ::2, :], x[..., 1::2, :]
        return torch.cat([src.gather(dim=-2, index=unm_idx.expand(x.shape[0], src.shape[1] - r, x.shape[-1])), dst], 1)

    merge.order = order
    return merge


def merge_wavg(merge, x: torch.Tensor, size: torch.Tensor | None):
    """ToMe's size-weighted average: returns the merged ``x`` and sizes."""
    if size is None:
        size = torch.ones_like(x[..., 0, None])
    x = merge(x * size, mode="sum")
    size = merge(size, mode="sum")
    return x / size, size


def tome_reference(model, kwargs, r: int, proportional: bool = True):
    """Run ``model`` with ToMe in its vision tower, as ToMe's patch does; returns (outputs, kept positions)."""
    m = copy.deepcopy(model).eval()
    vision = m.vision_model
    class_token = hasattr(vision.embeddings, "class_embedding")
    state = {"size": None, "pos": None}

    def attend(attn, h, size):
        B, L, _ = h.shape
        q = attn.q_proj(h).view(B, L, attn.num_heads, -1).transpose(1, 2)
        k = attn.k_proj(h).view(B, L, attn.num_heads, -1).transpose(1, 2)
        v = attn.v_proj(h).view(B, L, attn.num_heads, -1).transpose(1, 2)
        logits = (q @ k.transpose(-1, -2)) * attn.scale
        if proportional and size is not None:
            logits = logits + size.log()[:, None, None, :, 0]
        out = (logits.softmax(-1) @ v).transpose(1, 2).reshape(B, L, -1)
        return attn.out_proj(out), k.mean(1)

    def layer_forward(layer):
        def forward(hidden_states, attention_mask=None, *args, **kw):
            x = hidden_states
            if state["pos"] is None:
                state["pos"] = torch.arange(x.shape[1]).expand(x.shape[0], -1)[..., None].float()
            out, metric = attend(layer.self_attn, layer.layer_norm1(x), state["size"])
            x = x + out
            merge = tome_match(metric, r, class_token)
            x, state["size"] = merge_wavg(merge, x, state["size"])
            state["pos"] = merge.order(state["pos"])  # a merged token sits at its B (dst) position
            return x + layer.mlp(layer.layer_norm2(x))
        return forward

    for layer in vision.encoder.layers:
        layer.forward = layer_forward(layer)
    head = getattr(vision, "head", None)
    if head is not None and proportional:  # an attention-pooling head sees the merged tokens: size bias too
        def head_forward(hidden_state):
            B, L, _ = hidden_state.shape
            probe = head.probe.repeat(B, 1, 1)
            bias = state["size"].log()[..., 0][:, None, None, :].expand(B, head.attention.num_heads, 1, L)
            h = head.attention(probe, hidden_state, hidden_state, attn_mask=bias.reshape(-1, 1, L))[0]
            return (h + head.mlp(head.layernorm(h)))[:, 0]
        head.forward = head_forward
    with torch.no_grad():
        out = m(**kwargs)
    return out, state["pos"][..., 0].long()


def bipartite_ranked(metric: torch.Tensor, ranked: list[int], r: int, protected: set[int]):
    """One sample of ToMe matching over ``ranked`` token indices (the split order); ``protected`` tokens
    are neither merged (A rows -inf, as ``class_token``) nor merged into (B columns -inf). Returns the
    ``(src, dst)`` token index pairs."""
    a_idx, b_idx = ranked[0::2], ranked[1::2]
    mtr = F.normalize(metric, dim=-1)
    scores = mtr[a_idx] @ mtr[b_idx].T
    for i, t in enumerate(a_idx):
        if t in protected:
            scores[i, :] = -math.inf
    for j, t in enumerate(b_idx):
        if t in protected:
            scores[:, j] = -math.inf
    node_max, node_idx = scores.max(dim=-1)
    edge = node_max.argsort(descending=True)[:r]
    return [(a_idx[int(e)], b_idx[int(node_idx[e])]) for e in edge]


def pumer_layer(x, probs, metric, kept, is_img, valid_q, prune: float, merge: float, protected: set[int],
                padded_queries: bool = False, n_learned: int = 0):
    """PuMer's reducer on one layer's tokens (after the attention residual), per sample: text-informed
    top-k pruning, then merging of the kept image tokens alternately in score order with the best one
    protected and sizes 1. ``x`` [B, L, C], ``probs`` [B, H, L, L] this layer's attention, ``metric``
    [B, L, D] head-mean keys, ``kept`` [B, L] original positions, ``is_img``/``valid_q`` [B, L] bool.
    ``protected`` holds graphred's one addition: learned tokens of the image stream (``n_learned`` of them in
    the model) are never merged; with them the merge cap is ``ceil(k / 2) - n_learned - 1`` instead of the
    reference's ``(k - 1) // 2`` (equal when there are none). Returns the reduced ``x`` and ``kept``
    (positional order)."""
    B = x.shape[0]
    xs, ks = [], []
    for b in range(B):
        text = ~is_img[b] & (valid_q[b] | padded_queries)
        score = probs[b].mean(0)[text].sum(0) / text.sum()  # mean over heads, mean over valid text queries
        img = torch.nonzero(is_img[b]).flatten()
        n = len(img)
        k = n - round(prune * n)
        top = img[torch.topk(score[img], k).indices].tolist()  # descending score order
        r = min(round(merge * n), (k - 1) // 2 if n_learned == 0 else (k + 1) // 2 - n_learned - 1)
        pairs = bipartite_ranked(metric[b], top, r, protected | {top[0]})
        xb = x[b].clone()
        size = torch.ones(xb.shape[0])
        acc = xb.clone()
        for s, d in pairs:
            acc[d] += xb[s]
            size[d] += 1
        xb = acc / size[:, None]
        gone = {s for s, _ in pairs} | set(img.tolist()) - set(top)
        keep = [i for i in range(xb.shape[0]) if i not in gone]
        xs.append(xb[keep])
        ks.append(kept[b][keep])
    return torch.stack(xs), torch.stack(ks)


# --------------------------------------------------------------------------------- the op against the ports


@pytest.mark.parametrize("class_token", [True, False])
@pytest.mark.parametrize("t,r", [(65, 100), (65, 5), (64, 100), (17, 3)])
def test_bipartite_match_reorder_is_tomes_output_order(class_token, t, r):
    """``reorder=True`` lists the kept tokens as ToMe's merge returns them; r at and below the cap."""
    gen = torch.Generator().manual_seed(t + r)
    metric = torch.randn(3, t, 8, generator=gen)
    merge = tome_match(metric.clone(), r, class_token)
    r_eff = min(r, (t - int(class_token)) // 2)
    want = merge.order(torch.arange(t).expand(3, t)[..., None].float())[..., 0].long()
    prot = torch.zeros(3, t, dtype=torch.bool)
    prot[:, 0] = class_token
    keep, src, dst = torch.ops.graphred.bipartite_match(metric, torch.ones(3, t, dtype=torch.bool), r_eff,
                                                        prot if class_token else None, None, True)
    assert torch.equal(keep, want)
    assert set(keep[0].tolist()) | set(src[0].tolist()) == set(range(t))


def test_bipartite_match_rank_splits_in_rank_order():
    """``rank`` orders the A/B split (PuMer's score order); matches the ranked port, protected token included."""
    gen = torch.Generator().manual_seed(1)
    L = 20
    metric, score = torch.randn(2, L, 6, generator=gen), torch.rand(2, L, generator=gen)
    cand = torch.ones(2, L, dtype=torch.bool)
    cand[:, :4] = False  # e.g. text tokens
    prot = torch.zeros(2, L, dtype=torch.bool)
    for b in range(2):
        ranked = sorted(range(4, L), key=lambda i: -float(score[b, i]))
        prot[b, ranked[0]] = True
        pairs = bipartite_ranked(metric[b], ranked, 5, {ranked[0]})
        _, src, dst = torch.ops.graphred.bipartite_match(metric[b:b + 1], cand[b:b + 1], 5, prot[b:b + 1],
                                                         -score[b:b + 1], False)
        assert sorted(pairs) == sorted(zip(src[0].tolist(), dst[0].tolist()))
    torch.library.opcheck(torch.ops.graphred.bipartite_match.default, (metric, cand, 5, prot, -score, True))


# --------------------------------------------------------------------------------- ToMe


@pytest.mark.parametrize("name", ["clip", "siglip"])
def test_tome_matches_reference(name):
    model, kwargs, prog = _captured(name)
    r = 4
    ref_out, ref_pos = tome_reference(model, kwargs, r)
    reduced = graphred.transform(prog, tome(r=r))
    with torch.no_grad():
        out = reduced(**kwargs)
    # the same tokens, in the same order: the reference's [unmerged A, merged B] order, layer after layer
    assert torch.equal(reduced.kept_positions, ref_pos), (reduced.kept_positions, ref_pos)
    torch.testing.assert_close(out.image_embeds, ref_out.image_embeds, atol=ATOL, rtol=ATOL)
    torch.testing.assert_close(out.logits_per_image, ref_out.logits_per_image, atol=ATOL, rtol=ATOL)
    # the positional variant keeps the sequence order, and from the second merge layer on other tokens
    positional = graphred.transform(prog, tome(r=r, variant="positional"))
    with torch.no_grad():
        positional(**kwargs)
    pos_sets = positional.kept_positions.sort(1).values
    assert not torch.equal(pos_sets, ref_pos.sort(1).values), "variants indistinguishable: the test has no power"


def test_tome_cap_is_the_reference_cap():
    """ToMe caps r at (t - protected) // 2: 32 of CLIP's 65 tokens (class token protected), 32 of SigLIP's 64."""
    for name, t, s in (("clip", 65, 1), ("siglip", 64, 0)):
        _, kwargs, prog = _captured(name)
        with pytest.warns(UserWarning, match=f"at most {(t - s) // 2} "):
            reduced = graphred.transform(prog, tome(r=40, layers=[0]))
        assert reduced.steps[0]["image_after"] == t - (t - s) // 2, reduced.steps


# --------------------------------------------------------------------------------- PuMer on ViLT


def vilt_pumer_reference(model, kwargs, layers, prune, merge, padded_queries=False):
    m = copy.deepcopy(model).eval()
    T = kwargs["input_ids"].shape[1]
    state: dict = {}

    def layer_forward(i, layer):
        def forward(hidden_states, attention_mask=None, output_attentions=False):
            x = hidden_states
            if "kept" not in state:
                B, L = x.shape[:2]
                state["valid"] = attention_mask[:, 0, 0, :] == 0
                state["kept"] = torch.arange(L).expand(B, L)
                state["img"] = (state["kept"] >= T)
            valid = state["valid"]
            sa = layer.attention.attention
            h = layer.layernorm_before(x)
            B, L, _ = h.shape
            q, k, v = (lin(h).view(B, L, -1, sa.attention_head_size).transpose(1, 2) for lin in (sa.query, sa.key, sa.value))
            logits = q @ k.transpose(-1, -2) / math.sqrt(sa.attention_head_size)
            logits = logits.masked_fill(~valid[:, None, None, :], torch.finfo(logits.dtype).min)
            probs = logits.softmax(-1)
            ctx = (probs @ v).transpose(1, 2).reshape(B, L, -1)
            x = x + layer.attention.output(ctx, h)
            if i in layers:
                kept = state["kept"]
                # ViLT's image [CLS] is summed with position and type embeddings: an ordinary image token, as in
                # the reference reducer (no learned token to protect)
                x, kept2 = pumer_layer(x, probs, k.mean(1), kept, state["img"], valid, prune, merge, set(),
                                       padded_queries)
                state["valid"] = torch.stack([valid[b][torch.searchsorted(kept[b], kept2[b])] for b in range(B)])
                state["kept"] = kept2
                state["img"] = kept2 >= T
            out = layer.output(layer.intermediate(layer.layernorm_after(x)), x)
            return (out,)
        return forward

    for i, layer in enumerate(m.vilt.encoder.layer):
        layer.forward = layer_forward(i, layer)
    torch.manual_seed(0)  # ViLT's patch embedding samples the patch order: the same draw as _run_vilt
    with torch.no_grad():
        out = m(**kwargs)
    return out, state["kept"]


def _run_vilt(reduced, kwargs):
    torch.manual_seed(0)
    with torch.no_grad():
        return reduced(**kwargs)


def test_pumer_matches_reference_vilt():
    model, kwargs, prog = _captured("vilt")
    ref_out, ref_kept = vilt_pumer_reference(model, kwargs, layers=(1, 2, 3), prune=0.3, merge=0.3)
    reduced = graphred.transform(prog, pumer(prune=0.3, merge=0.3, layers=[1, 2, 3]))
    out = _run_vilt(reduced, kwargs)
    assert torch.equal(reduced.kept_positions, ref_kept), (reduced.kept_positions, ref_kept)
    torch.testing.assert_close(out.logits, ref_out.logits, atol=ATOL, rtol=ATOL)
    positional = graphred.transform(prog, pumer(prune=0.3, merge=0.3, layers=[1, 2, 3], variant="positional"))
    _run_vilt(positional, kwargs)
    assert positional.kept_positions.shape != ref_kept.shape or not torch.equal(positional.kept_positions, ref_kept)


def test_pumer_padded_queries_option_vilt():
    """``padded_queries=True`` scores as the released code (padding rows counted) and matches a port that
    counts them; the default (valid rows only) picks other tokens on the padded sample."""
    model, kwargs, prog = _captured("vilt")
    ref_out, ref_kept = vilt_pumer_reference(model, kwargs, layers=(1, 2, 3), prune=0.3, merge=0.3,
                                             padded_queries=True)
    reduced = graphred.transform(prog, pumer(prune=0.3, merge=0.3, layers=[1, 2, 3], padded_queries=True))
    out = _run_vilt(reduced, kwargs)
    assert torch.equal(reduced.kept_positions, ref_kept)
    torch.testing.assert_close(out.logits, ref_out.logits, atol=ATOL, rtol=ATOL)
    _, fixed_kept = vilt_pumer_reference(model, kwargs, layers=(1, 2, 3), prune=0.3, merge=0.3)
    assert not torch.equal(fixed_kept, ref_kept), "padding rows changed nothing: the option is untested"


# --------------------------------------------------------------------------------- LLaVA: PuMer and FastV


def llava_reference(model, kwargs, on_attention=None, on_layer=None):
    """LLaVA's decoder run by hand (eager attention, original position ids, causal + padding mask over the
    kept tokens). ``on_attention(i, x, probs, metric, kept)`` after layer ``i``'s attention residual and
    ``on_layer(i, x, probs, kept)`` after layer ``i`` may return a reduced ``(x, kept)``."""
    m = copy.deepcopy(model).eval()
    lm = m.model.language_model
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, repeat_kv

    captured = {}

    def grab(mod, args, kw):
        captured["x"] = kw["hidden_states"] if "hidden_states" in kw else args[0]

    h = lm.layers[0].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad():
            m(**kwargs)
    finally:
        h.remove()
    x = captured["x"]
    B, L, _ = x.shape
    valid0 = kwargs["attention_mask"].bool()
    kept = torch.arange(L).expand(B, L)
    with torch.no_grad():
        for i, layer in enumerate(lm.layers):
            at = layer.self_attn
            hh = layer.input_layernorm(x)
            Bq, Lq, _ = hh.shape
            q, k, v = (p(hh).view(Bq, Lq, -1, at.head_dim).transpose(1, 2) for p in (at.q_proj, at.k_proj, at.v_proj))
            cos, sin = lm.rotary_emb(hh, kept)
            q, k = apply_rotary_pos_emb(q, k, cos, sin)
            allowed = (kept[:, None, :] <= kept[:, :, None]) & valid0.gather(1, kept)[:, None, :]
            logits = (q @ repeat_kv(k, at.num_key_value_groups).transpose(-1, -2)) * at.scaling
            logits = logits.masked_fill(~allowed[:, None], torch.finfo(logits.dtype).min)
            probs = logits.softmax(-1)
            ctx = (probs @ repeat_kv(v, at.num_key_value_groups)).transpose(1, 2).reshape(Bq, Lq, -1)
            x = x + at.o_proj(ctx)
            if on_attention is not None:
                x, kept = on_attention(i, x, probs, k.mean(1), kept)
            x = x + layer.mlp(layer.post_attention_layernorm(x))
            if on_layer is not None:
                x, kept = on_layer(i, x, probs, kept)
        logits = m.lm_head(lm.norm(x))
    return logits, kept


def _image_mask(model, kwargs, kept):
    return (kwargs["input_ids"] == model.config.image_token_id).gather(1, kept)


@pytest.mark.parametrize("padding", ["default", "right"])
def test_pumer_matches_reference_llava(padding):
    model, kwargs, prog = _captured("llava", padding)
    valid0 = kwargs["attention_mask"].bool()
    layers = (1, 2, 3)

    def on_attention(i, x, probs, metric, kept):
        if i not in layers:
            return x, kept
        return pumer_layer(x, probs, metric, kept, _image_mask(model, kwargs, kept), valid0.gather(1, kept),
                           0.3, 0.3, set())

    ref_logits, ref_kept = llava_reference(model, kwargs, on_attention=on_attention)
    reduced = graphred.transform(prog, pumer(prune=0.3, merge=0.3, layers=list(layers)))
    with torch.no_grad():
        out = reduced(**kwargs)
    assert torch.equal(reduced.kept_positions, ref_kept), (reduced.kept_positions, ref_kept)
    valid = valid0.gather(1, ref_kept)
    torch.testing.assert_close(out.logits[valid], ref_logits[valid], atol=ATOL, rtol=ATOL)
    positional = graphred.transform(prog, pumer(prune=0.3, merge=0.3, layers=list(layers), variant="positional"))
    with torch.no_grad():
        positional(**kwargs)
    assert positional.kept_positions.shape != ref_kept.shape or not torch.equal(positional.kept_positions, ref_kept)


@pytest.mark.parametrize("padding", ["default", "right"])
def test_fastv_matches_reference_llava(padding):
    model, kwargs, prog = _captured("llava", padding)
    valid0 = kwargs["attention_mask"].bool()
    K, keep = 2, 0.5

    def on_layer(i, x, probs, kept):
        if i != K - 1:
            return x, kept
        is_img = _image_mask(model, kwargs, kept)
        xs, ks = [], []
        for b in range(x.shape[0]):
            last = int(torch.nonzero(valid0[b].gather(0, kept[b])).max())  # the last valid query
            score = probs[b, :, last, :].mean(0)
            img = torch.nonzero(is_img[b]).flatten()
            top = img[torch.topk(score[img], round(keep * len(img))).indices]
            sel = torch.sort(torch.cat([torch.nonzero(~is_img[b]).flatten(), top])).values
            xs.append(x[b][sel])
            ks.append(kept[b][sel])
        return torch.stack(xs), torch.stack(ks)

    ref_logits, ref_kept = llava_reference(model, kwargs, on_layer=on_layer)
    reduced = graphred.transform(prog, fastv(layer=K, keep=keep))
    with torch.no_grad():
        out = reduced(**kwargs)
    assert torch.equal(reduced.kept_positions, ref_kept), (reduced.kept_positions, ref_kept)
    valid = valid0.gather(1, ref_kept)
    torch.testing.assert_close(out.logits[valid], ref_logits[valid], atol=ATOL, rtol=ATOL)
