"""Tests of the graphred:: token custom ops: opcheck, reference equivalence, properties,
fake-tensor shapes, export and compile."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch._subclasses.fake_tensor import FakeTensorMode

import graphred.ops as gops

OPS = torch.ops.graphred
HSETTINGS = settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _candidates(B: int, L: int, min_count: int, seed: int) -> torch.Tensor:
    g = _gen(seed)
    c = torch.rand(B, L, generator=g) < 0.6
    for b in range(B):  # top up to the required count
        free = torch.nonzero(~c[b]).flatten()
        need = min_count - int(c[b].sum())
        if need > 0:
            c[b, free[:need]] = True
    return c


# ------------------------------------------------------------------------------ references


def ref_attention_scores(q, k, w, bias, scale):
    B, H, Lq, D = q.shape
    Hk = k.shape[1]
    kk = k.float().repeat_interleave(H // Hk, dim=1)
    logits = q.float() @ kk.transpose(-1, -2) * scale
    if bias is not None:
        if bias.dtype == torch.bool:
            bias = torch.zeros(bias.shape).masked_fill(~bias, float("-inf"))
        logits = logits + bias.float()
    p = torch.softmax(logits, -1).nan_to_num(0.0).mean(1)  # [B, Lq, Lk]
    w = w.float().expand(B, Lq)
    tot = w.sum(1, keepdim=True)
    out = (w.unsqueeze(-1) * p).sum(1) / tot
    return torch.where(tot == 0, torch.zeros_like(out), out)


def ref_merge(x, sizes, src, dst):
    x = x.clone().double()
    s = sizes.clone().double()
    out_x, out_s = x.clone(), s.clone()
    for b in range(x.shape[0]):
        groups = {}
        for i in range(src.shape[1]):
            groups.setdefault(int(dst[b, i]), []).append(int(src[b, i]))
        for d, ss in groups.items():
            tot = s[b, d] + sum(s[b, j] for j in ss)
            acc = s[b, d] * x[b, d] + sum(s[b, j] * x[b, j] for j in ss)
            out_x[b, d] = acc / tot
            out_s[b, d] = tot
    return out_x, out_s


# ------------------------------------------------------------------------------ opcheck


def _opcheck(op, args, kwargs=None):
    res = torch.library.opcheck(op, args, kwargs or {})
    bad = {k: v for k, v in res.items() if v != "SUCCESS"}
    assert not bad, bad


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 2, 3, 4, 2, 5), (2, 4, 5, 8, 1, 7), (3, 4, 1, 4, 4, 6)])
@pytest.mark.parametrize("bias_kind", ["none", "float", "bool"])
@pytest.mark.parametrize("requires_grad", [False, True])
def test_opcheck_attention_scores(dtype, shape, bias_kind, requires_grad):
    B, H, Lq, D, Hk, Lk = shape
    g = _gen(0)
    q = torch.randn(B, H, Lq, D, generator=g).to(dtype).requires_grad_(requires_grad)
    k = torch.randn(B, Hk, Lk, D, generator=g).to(dtype).requires_grad_(requires_grad)
    w = (torch.rand(B, Lq, generator=g) > 0.3).float()
    bias = None
    if bias_kind == "float":
        bias = torch.randn(B, 1, Lq, Lk, generator=g)
    elif bias_kind == "bool":
        bias = torch.rand(1, 1, Lq, Lk, generator=g) > 0.2
    _opcheck(OPS.attention_scores.default, (q, k, w, bias, 1.0 / math.sqrt(D)))
    _opcheck(OPS.attention_scores.default, (q, k, w), {"attn_bias": bias})


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.int64])
@pytest.mark.parametrize("B,L,n_drop", [(1, 5, 0), (2, 7, 3), (3, 9, 4)])
def test_opcheck_select_tokens(dtype, B, L, n_drop):
    scores = (torch.randn(B, L, generator=_gen(1)) * 10).to(dtype)
    cand = _candidates(B, L, n_drop, 1)
    _opcheck(OPS.select_tokens.default, (scores, cand, n_drop))


@pytest.mark.parametrize(
    "xshape,dim,B",
    [((2, 6, 4), 1, 2), ((1, 6, 4), 1, 3), ((2, 1, 6, 6), 2, 2), ((2, 1, 6, 6), 3, 2), ((2, 6), 1, 2),
     ((1, 6, 4), -2, 2)],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.int64, torch.bool])
def test_opcheck_gather_tokens(xshape, dim, B, dtype):
    g = _gen(2)
    x = torch.randn(xshape, generator=g)
    if dtype == torch.bool:
        x = x > 0
    else:
        x = (x * 5).to(dtype)
    if dtype.is_floating_point:
        x.requires_grad_(True)
    L = xshape[dim]
    index = torch.sort(torch.randint(0, L, (B, 4), generator=g), dim=1).values
    _opcheck(OPS.gather_tokens.default, (x, index, dim))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("B,L,C,r,with_protected", [(1, 6, 4, 1, False), (2, 9, 3, 2, True), (3, 12, 5, 3, True)])
def test_opcheck_bipartite_match(dtype, B, L, C, r, with_protected):
    metric = torch.randn(B, L, C, generator=_gen(3)).to(dtype)
    cand = torch.ones(B, L, dtype=torch.bool)
    cand[:, -1] = False
    prot = None
    if with_protected:
        prot = torch.zeros(B, L, dtype=torch.bool)
        prot[:, 0] = True
    _opcheck(OPS.bipartite_match.default, (metric, cand, r, prot))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("B,L,C,r", [(1, 5, 3, 0), (2, 8, 4, 3), (3, 10, 2, 4)])
def test_opcheck_merge_tokens(dtype, B, L, C, r):
    g = _gen(4)
    x = torch.randn(B, L, C, generator=g, dtype=dtype, requires_grad=True)
    sizes = (torch.rand(B, L, generator=g, dtype=dtype) + 0.5).requires_grad_(True)
    perm = torch.stack([torch.randperm(L, generator=g) for _ in range(B)])
    src = perm[:, :r].contiguous()
    # several sources may share a destination
    dst = perm[:, r:r + max(1, r // 2)].repeat(1, r)[:, :r].contiguous()
    _opcheck(OPS.merge_tokens.default, (x, sizes, src, dst))


def test_merge_tokens_gradcheck():
    g = _gen(5)
    B, L, C = 2, 7, 3
    x = torch.randn(B, L, C, generator=g, dtype=torch.float64, requires_grad=True)
    sizes = (torch.rand(B, L, generator=g, dtype=torch.float64) + 0.5).requires_grad_(True)
    src = torch.tensor([[0, 2, 4], [6, 1, 3]])
    dst = torch.tensor([[1, 1, 5], [0, 0, 0]])
    f = lambda x, s: gops.merge_tokens(x, s, src, dst)  # noqa: E731
    assert torch.autograd.gradcheck(f, (x, sizes))
    assert torch.autograd.gradgradcheck(f, (x, sizes))


def test_gather_tokens_gradcheck_broadcast():
    g = _gen(6)
    x = torch.randn(1, 6, 3, generator=g, dtype=torch.float64, requires_grad=True)
    index = torch.tensor([[0, 2, 2], [1, 4, 5]])
    assert torch.autograd.gradcheck(lambda x: gops.gather_tokens(x, index, 1), (x,))
    x2 = torch.randn(2, 2, 6, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: gops.gather_tokens(x, index, -1), (x2,))
    assert torch.autograd.gradgradcheck(lambda x: gops.gather_tokens(x, index, -1), (x2,))


def test_attention_scores_is_detached():
    q = torch.randn(1, 2, 3, 4, requires_grad=True)
    k = torch.randn(1, 2, 5, 4, requires_grad=True)
    s = gops.attention_scores(q, k, torch.ones(1, 3))
    assert not s.requires_grad and s.dtype == torch.float32


# ------------------------------------------------------------------------------ attention_scores


@given(
    B=st.integers(1, 3), Hk=st.integers(1, 3), G=st.integers(1, 3), Lq=st.integers(1, 6),
    Lk=st.integers(1, 7), D=st.integers(1, 5), causal=st.booleans(), bias_kind=st.sampled_from(["none", "float", "bool"]),
    seed=st.integers(0, 2**16),
)
@HSETTINGS
def test_attention_scores_matches_eager(B, Hk, G, Lq, Lk, D, causal, bias_kind, seed):
    g = _gen(seed)
    H = Hk * G
    q = torch.randn(B, H, Lq, D, generator=g)
    k = torch.randn(B, Hk, Lk, D, generator=g)
    w = (torch.rand(B, Lq, generator=g) > 0.4).float() * torch.rand(B, Lq, generator=g)
    bias = None
    if bias_kind == "float":
        bias = torch.randn(B, 1, Lq, Lk, generator=g)
        if causal:  # additive causal mask, queries are the last Lq positions of Lk
            allowed = torch.ones(Lq, Lk, dtype=torch.bool).tril(Lk - Lq)
            bias = bias.masked_fill(~allowed, float("-inf"))
    elif bias_kind == "bool":
        bias = torch.rand(B, H, Lq, Lk, generator=g) > 0.3
        if causal:
            bias = bias & torch.ones(Lq, Lk, dtype=torch.bool).tril(Lk - Lq)
    scale = 0.5 + torch.rand((), generator=g).item()
    got = gops.attention_scores(q, k, w, bias, scale)
    want = ref_attention_scores(q, k, w, bias, scale)
    assert got.shape == (B, Lk) and got.dtype == torch.float32
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_attention_scores_matches_sdpa_probabilities():
    """Against explicit eager attention of a GQA causal model with padded text queries."""
    torch.manual_seed(0)
    B, H, Hk, L, D = 2, 8, 2, 10, 16
    q, k = torch.randn(B, H, L, D), torch.randn(B, Hk, L, D)
    causal = torch.full((L, L), float("-inf")).triu(1)
    pad = torch.zeros(B, 1, 1, L)
    pad[1, ..., :3] = float("-inf")  # left padding of sample 1
    bias = causal + pad
    w = torch.zeros(B, L)
    w[0, 6:] = 1
    w[1, 7:] = 1  # sample 1's padded positions 0..2 carry no query weight
    kk = k.repeat_interleave(H // Hk, 1)
    probs = torch.softmax(q @ kk.transpose(-1, -2) / math.sqrt(D) + bias, -1).mean(1)
    want = torch.stack([probs[0, 6:].mean(0), probs[1, 7:].mean(0)])
    got = gops.attention_scores(q, k, w, bias)
    torch.testing.assert_close(got, want)
    # FastV: one-hot on the last query
    w_last = torch.zeros(B, L)
    w_last[:, -1] = 1
    torch.testing.assert_close(gops.attention_scores(q, k, w_last, bias), probs[:, -1])


def test_attention_scores_zero_weight_and_fully_masked_rows():
    q, k = torch.randn(2, 2, 3, 4), torch.randn(2, 2, 5, 4)
    w = torch.tensor([[0.0, 0, 0], [1, 1, 0]])
    bias = torch.zeros(2, 1, 3, 5)
    bias[1, :, 1] = float("-inf")  # weighted but fully masked row: contributes nothing
    s = gops.attention_scores(q, k, w, bias, 0.5)
    assert torch.equal(s[0], torch.zeros(5))
    assert torch.isfinite(s).all()
    torch.testing.assert_close(s[1].sum(), torch.tensor(0.5))


def test_attention_scores_errors():
    with pytest.raises(ValueError, match="divide"):
        gops.attention_scores(torch.randn(1, 3, 2, 4), torch.randn(1, 2, 2, 4), torch.ones(1, 2))
    with pytest.raises(ValueError, match="query_weight"):
        gops.attention_scores(torch.randn(1, 2, 2, 4), torch.randn(1, 2, 2, 4), torch.ones(1, 3))


# ------------------------------------------------------------------------------ select_tokens


@given(
    B=st.integers(1, 4), L=st.integers(1, 12), frac=st.floats(0, 1), seed=st.integers(0, 2**16),
    ties=st.booleans(),
)
@HSETTINGS
def test_select_tokens_properties(B, L, frac, seed, ties):
    g = _gen(seed)
    cand = torch.rand(B, L, generator=g) < 0.7
    n_min = int(cand.sum(1).min())
    n_drop = int(round(frac * n_min))
    scores = torch.randn(B, L, generator=g)
    if ties:
        scores = torch.randint(0, 3, (B, L), generator=g).float()
    idx = gops.select_tokens(scores, cand, n_drop)
    assert idx.shape == (B, L - n_drop) and idx.dtype == torch.int64
    for b in range(B):
        kept = idx[b].tolist()
        assert kept == sorted(set(kept))
        keptset = set(kept)
        assert all(i in keptset for i in range(L) if not cand[b, i])
        dropped = [i for i in range(L) if i not in keptset]
        assert len(dropped) == n_drop and all(cand[b, i] for i in dropped)
        # dropped are the lowest-scoring candidates; ties: the higher position goes first
        ranked = sorted((i for i in range(L) if cand[b, i]), key=lambda i: (scores[b, i].item(), -i))
        assert sorted(ranked[:n_drop]) == dropped


def test_select_tokens_basics():
    s = torch.tensor([[1.0, 1.0, 1.0, 1.0]])
    c = torch.ones(1, 4, dtype=torch.bool)
    assert gops.select_tokens(s, c, 2).tolist() == [[0, 1]]
    assert gops.select_tokens(s, c, 0).tolist() == [[0, 1, 2, 3]]
    # non-candidates are kept even with the lowest score
    s = torch.tensor([[-9.0, 5.0, 0.0, 1.0]])
    c = torch.tensor([[False, True, True, True]])
    assert gops.select_tokens(s, c, 1).tolist() == [[0, 1, 3]]
    with pytest.raises(ValueError, match="fewer than n_drop"):
        gops.select_tokens(s, c, 4)


# ------------------------------------------------------------------------------ gather_tokens


@given(
    rank=st.integers(2, 4), data=st.data(), bcast=st.booleans(), dtype=st.sampled_from([torch.float32, torch.int64, torch.bool]),
    seed=st.integers(0, 2**16),
)
@HSETTINGS
def test_gather_tokens_matches_torch_gather(rank, data, bcast, dtype, seed):
    g = _gen(seed)
    B = data.draw(st.integers(1, 3))
    shape = [1 if bcast else B] + [data.draw(st.integers(1, 4)) for _ in range(rank - 1)]
    dim = data.draw(st.integers(1, rank - 1))
    K = data.draw(st.integers(0, 5))
    x = torch.randn(shape, generator=g) * 4
    x = x > 0 if dtype == torch.bool else x.to(dtype)
    index = torch.randint(0, shape[dim], (B, K), generator=g)
    got = gops.gather_tokens(x, index, dim)
    xs = list(shape)
    xs[0] = B
    xe = x.expand(xs)
    view = [1] * rank
    view[0], view[dim] = B, K
    out_shape = list(xs)
    out_shape[dim] = K
    want = torch.gather(xe, dim, index.view(view).expand(out_shape))
    assert got.dtype == x.dtype
    assert torch.equal(got, want)
    # negative dim is the same axis
    assert torch.equal(gops.gather_tokens(x, index, dim - rank), want)


def test_gather_tokens_backward_broadcast_sums():
    x = torch.randn(1, 5, 2, requires_grad=True)
    index = torch.tensor([[0, 1], [0, 4]])
    gops.gather_tokens(x, index, 1).sum().backward()
    want = torch.zeros(1, 5, 2)
    want[0, 0] = 2
    want[0, 1] = 1
    want[0, 4] = 1
    assert torch.equal(x.grad, want)


def test_gather_tokens_errors():
    with pytest.raises(ValueError, match="dim"):
        gops.gather_tokens(torch.randn(2, 3), torch.zeros(2, 1, dtype=torch.long), 0)
    with pytest.raises(ValueError, match="batch"):
        gops.gather_tokens(torch.randn(2, 3), torch.zeros(3, 1, dtype=torch.long), 1)


# ------------------------------------------------------------------------------ bipartite_match


@given(
    B=st.integers(1, 3), L=st.integers(2, 14), C=st.integers(1, 4), frac=st.floats(0, 1), seed=st.integers(0, 2**16),
    use_protected=st.booleans(),
)
@HSETTINGS
def test_bipartite_match_properties(B, L, C, frac, seed, use_protected):
    g = _gen(seed)
    metric = torch.randn(B, L, C, generator=g)
    cand = torch.rand(B, L, generator=g) < 0.7
    prot = (torch.rand(B, L, generator=g) < 0.2) if use_protected else None
    # mergeable A tokens per sample, computed independently
    caps = []
    for b in range(B):
        pos = [i for i in range(L) if cand[b, i]]
        a = [p for p in pos[0::2] if prot is None or not prot[b, p]]
        bb = [p for p in pos[1::2] if prot is None or not prot[b, p]]
        caps.append(len(a) if bb else 0)
    r = int(math.floor(frac * min(caps)))
    keep, src, dst = gops.bipartite_match(metric, cand, r, prot)
    assert keep.shape == (B, L - r) and src.shape == (B, r) and dst.shape == (B, r)
    assert keep.dtype == src.dtype == dst.dtype == torch.int64
    mn = torch.nn.functional.normalize(metric, dim=-1)
    for b in range(B):
        pos = [i for i in range(L) if cand[b, i]]
        a_set, b_set = set(pos[0::2]), set(pos[1::2])
        s, d = src[b].tolist(), dst[b].tolist()
        assert set(s) <= a_set and set(d) <= b_set  # never pairs with a non-candidate; A -> B
        assert len(set(s)) == r and not (set(s) & set(d))
        if prot is not None:
            assert not any(prot[b, i] for i in s + d)
        k = keep[b].tolist()
        assert k == sorted(k) and set(k) == set(range(L)) - set(s)
        # each merged source went to its best unprotected partner
        b_free = [j for j in b_set if prot is None or not prot[b, j]]
        for i, j in zip(s, d):
            best = max(float(mn[b, i] @ mn[b, jj]) for jj in b_free)
            assert float(mn[b, i] @ mn[b, j]) >= best - 1e-6
        # the chosen sources have the highest best-match scores among mergeable A tokens
        a_free = [i for i in a_set if prot is None or not prot[b, i]]
        if r and b_free:
            best_of = {i: max(float(mn[b, i] @ mn[b, jj]) for jj in b_free) for i in a_free}
            lowest_chosen = min(best_of[i] for i in s)
            assert all(best_of[i] <= lowest_chosen + 1e-6 for i in a_free if i not in s)


def test_bipartite_match_example_and_errors():
    metric = torch.tensor([[[1.0, 0], [1, 0], [0, 1], [0, 1], [1, 1]]])
    cand = torch.tensor([[True, True, True, True, False]])
    keep, src, dst = gops.bipartite_match(metric, cand, 1)
    assert src.tolist() == [[0]] and dst.tolist() == [[1]] and keep.tolist() == [[1, 2, 3, 4]]
    keep, src, dst = gops.bipartite_match(metric, cand, 0)
    assert keep.tolist() == [[0, 1, 2, 3, 4]] and src.shape == (1, 0)
    with pytest.raises(ValueError, match="r=3"):
        gops.bipartite_match(metric, cand, 3)
    prot = torch.tensor([[True, False, False, False, False]])
    with pytest.raises(ValueError, match="r=2"):
        gops.bipartite_match(metric, cand, 2, prot)
    _, src, dst = gops.bipartite_match(metric, cand, 1, prot)
    assert src.tolist() == [[2]] and dst.tolist() == [[3]]


# ------------------------------------------------------------------------------ merge_tokens


@given(B=st.integers(1, 3), L=st.integers(2, 10), C=st.integers(1, 4), frac=st.floats(0, 1), seed=st.integers(0, 2**16))
@HSETTINGS
def test_merge_tokens_properties(B, L, C, frac, seed):
    g = _gen(seed)
    x = torch.randn(B, L, C, generator=g, dtype=torch.float64)
    sizes = torch.rand(B, L, generator=g, dtype=torch.float64) * 3 + 0.5
    cand = torch.ones(B, L, dtype=torch.bool)
    r = int(math.floor(frac * (L // 2)))
    keep, src, dst = gops.bipartite_match(x.float(), cand, r)
    xm, sm = gops.merge_tokens(x, sizes, src, dst)
    wx, ws = ref_merge(x, sizes, src, dst)
    torch.testing.assert_close(xm, wx)
    torch.testing.assert_close(sm, ws)
    xk = gops.gather_tokens(xm, keep, 1)
    sk = gops.gather_tokens(sm, keep, 1)
    torch.testing.assert_close((sk.unsqueeze(-1) * xk).sum(1), (sizes.unsqueeze(-1) * x).sum(1))
    torch.testing.assert_close(sk.sum(1), sizes.sum(1))
    # rows that are not destinations are untouched, bit for bit
    is_dst = torch.zeros(B, L, dtype=torch.bool).scatter(1, dst, True)
    assert torch.equal(xm[~is_dst], x[~is_dst]) and torch.equal(sm[~is_dst], sizes[~is_dst])


def test_merge_tokens_identity_at_r0_and_many_to_one():
    x = torch.randn(2, 5, 3)
    sizes = torch.rand(2, 5) + 1
    empty = torch.empty(2, 0, dtype=torch.long)
    xm, sm = gops.merge_tokens(x, sizes, empty, empty)
    assert torch.equal(xm, x) and torch.equal(sm, sizes)
    src, dst = torch.tensor([[0, 1], [3, 4]]), torch.tensor([[2, 2], [0, 0]])
    xm, sm = gops.merge_tokens(x, sizes, src, dst)
    wx, ws = ref_merge(x, sizes, src, dst)
    torch.testing.assert_close(xm, wx.float())
    torch.testing.assert_close(sm, ws.float())


def test_merge_tokens_bfloat16_keeps_dtypes():
    x = torch.randn(1, 4, 2, dtype=torch.bfloat16)
    sizes = torch.ones(1, 4)
    xm, sm = gops.merge_tokens(x, sizes, torch.tensor([[0]]), torch.tensor([[1]]))
    assert xm.dtype == torch.bfloat16 and sm.dtype == torch.float32


def test_size_bias():
    sizes = torch.tensor([[1.0, 2.0, 4.0]])
    b = gops.size_bias(sizes)
    assert b.shape == (1, 1, 1, 3)
    torch.testing.assert_close(b.flatten(), sizes.log().flatten())
    assert gops.size_bias(sizes, torch.bfloat16).dtype == torch.bfloat16
    # proportional attention with SDPA: a size-2 key weighs like two copies of it
    q, k, v = torch.randn(1, 1, 2, 4), torch.randn(1, 1, 2, 4), torch.randn(1, 1, 2, 4)
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=gops.size_bias(torch.tensor([[1.0, 2.0]])))
    k2, v2 = torch.cat([k, k[:, :, 1:]], 2), torch.cat([v, v[:, :, 1:]], 2)
    torch.testing.assert_close(out, torch.nn.functional.scaled_dot_product_attention(q, k2, v2))


# ------------------------------------------------------------------------------ fake / export / compile


def _example_inputs():
    g = _gen(7)
    B, H, Hk, L, D, C = 2, 4, 2, 8, 4, 6
    return dict(
        q=torch.randn(B, H, L, D, generator=g),
        k=torch.randn(B, Hk, L, D, generator=g),
        w=torch.ones(B, L),
        bias=torch.zeros(B, 1, L, L).masked_fill(torch.ones(L, L, dtype=torch.bool).triu(1), float("-inf")),
        cand=torch.tensor([[False] + [True] * 6 + [False]] * B),
        x=torch.randn(B, L, C, generator=g),
        sizes=torch.ones(B, L),
        rope=torch.randn(1, L, D, generator=g),
    )


def _all_ops(inp):
    s = gops.attention_scores(inp["q"], inp["k"], inp["w"], inp["bias"], 0.5)
    idx = gops.select_tokens(s, inp["cand"], 2)
    keep, src, dst = gops.bipartite_match(inp["x"], inp["cand"], 2, None)
    xm, sm = gops.merge_tokens(inp["x"], inp["sizes"], src, dst)
    return dict(
        s=s, idx=idx, keep=keep, src=src, dst=dst, xm=xm, sm=sm,
        xg=gops.gather_tokens(inp["x"], idx, 1),
        rope=gops.gather_tokens(inp["rope"], idx, 1),
        mask=gops.gather_tokens(inp["bias"], idx, 3),
        pos=gops.gather_tokens(torch.arange(8).expand(2, 8), keep, 1),
    )


def test_fake_shapes_match_real():
    inp = _example_inputs()
    real = _all_ops(inp)
    with FakeTensorMode(allow_non_fake_inputs=False) as mode:
        fake_inp = {k: mode.from_tensor(v) for k, v in inp.items()}
        fake = _all_ops(fake_inp)
    for name in real:
        assert fake[name].shape == real[name].shape, name
        assert fake[name].dtype == real[name].dtype, name


class _Reducer(torch.nn.Module):
    def forward(self, q, k, w, bias, cand, x, sizes, rope):
        s = gops.attention_scores(q, k, w, bias, 0.5)
        idx = gops.select_tokens(s, cand, 2)
        keep, src, dst = gops.bipartite_match(x, cand, 1)
        xm, sm = gops.merge_tokens(x, sizes, src, dst)
        xk = gops.gather_tokens(xm, keep, 1)
        sk = gops.gather_tokens(sm, keep, 1)
        y = gops.gather_tokens(xk, idx[:, :-1], 1) * 2
        cos = gops.gather_tokens(rope, idx, 1)
        mask = gops.gather_tokens(gops.gather_tokens(bias, idx, 2), idx, 3) + gops.size_bias(gops.gather_tokens(sk, idx[:, :-1], 1))[..., :1]
        return y, cos, mask


def test_export_contains_graphred_ops():
    inp = _example_inputs()
    args = (inp["q"], inp["k"], inp["w"], inp["bias"], inp["cand"], inp["x"], inp["sizes"], inp["rope"])
    ep = torch.export.export(_Reducer(), args)
    targets = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
    for name in ["attention_scores", "select_tokens", "bipartite_match", "merge_tokens", "gather_tokens"]:
        assert f"graphred.{name}.default" in targets, (name, targets)
    want = _Reducer()(*args)
    got = ep.module()(*args)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


def test_export_dynamic_sequence():
    class M(torch.nn.Module):
        def forward(self, s, cand, x):
            idx = gops.select_tokens(s, cand, 2)
            return gops.gather_tokens(x, idx, 1)

    s, x = torch.randn(2, 8), torch.randn(2, 8, 3)
    cand = torch.ones(2, 8, dtype=torch.bool)
    L = torch.export.Dim("L", min=4, max=64)
    ep = torch.export.export(M(), (s, cand, x), dynamic_shapes=({1: L}, {1: L}, {1: L}))
    s2, x2 = torch.randn(2, 12), torch.randn(2, 12, 3)
    out = ep.module()(s2, torch.ones(2, 12, dtype=torch.bool), x2)
    assert out.shape == (2, 10, 3)


def test_attention_scores_chunked(monkeypatch):
    import graphred.ops.tokens as tokens

    q, k = torch.randn(2, 4, 9, 3), torch.randn(2, 2, 5, 3)
    w = torch.rand(2, 9)
    full = gops.attention_scores(q, k, w)
    monkeypatch.setattr(tokens, "_CHUNK_ELEMENTS", 2 * 4 * 5 * 2)  # two query rows per chunk, one sample
    torch.testing.assert_close(gops.attention_scores(q, k, w), full)
    k_strided = k.transpose(1, 2).contiguous().transpose(1, 2)  # [B, L, Hk, D] memory, per-head matrix products
    torch.testing.assert_close(gops.attention_scores(q, k_strided, w), full)  # copied once (small)
    monkeypatch.setattr(tokens, "_SMALL_MATRIX", 0)
    torch.testing.assert_close(gops.attention_scores(q, k_strided, w), full)  # per-head products
    monkeypatch.setattr(tokens, "_CHUNK_ELEMENTS", 4 * 5 * 9)  # all rows of one sample per chunk
    torch.testing.assert_close(gops.attention_scores(q, k, w), full)


def test_compile_dynamic_shapes():
    def f(s, cand, x):
        idx = gops.select_tokens(s, cand, 2)
        return gops.gather_tokens(x, idx, 1).sum(-1)

    compiled = torch.compile(f, backend="aot_eager", dynamic=True, fullgraph=True)
    for L in (6, 9):
        s, x = torch.randn(2, L), torch.randn(2, L, 3)
        cand = torch.ones(2, L, dtype=torch.bool)
        torch.testing.assert_close(compiled(s, cand, x), f(s, cand, x))


def test_compile_aot_eager_with_backward():
    inp = _example_inputs()

    def f(x, sizes, cand, rope):
        keep, src, dst = gops.bipartite_match(x.detach(), cand, 2)
        xm, sm = gops.merge_tokens(x, sizes, src, dst)
        xk = gops.gather_tokens(xm, keep, 1)
        return (xk * gops.gather_tokens(rope, keep, 1)[..., :1]).sum() + sm.sum()

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    x1 = inp["x"].clone().requires_grad_(True)
    x2 = inp["x"].clone().requires_grad_(True)
    out_c = compiled(x1, inp["sizes"], inp["cand"], inp["rope"])
    out_e = f(x2, inp["sizes"], inp["cand"], inp["rope"])
    torch.testing.assert_close(out_c, out_e)
    out_c.backward()
    out_e.backward()
    torch.testing.assert_close(x1.grad, x2.grad)

    compiled_all = torch.compile(_all_ops, backend="aot_eager", fullgraph=True)
    got, want = compiled_all(inp), _all_ops(inp)
    for name in want:
        torch.testing.assert_close(got[name], want[name])


@pytest.mark.parametrize("layout", ["transposed", "broadcast_batch", "sliced"])
def test_gather_and_merge_on_non_contiguous_inputs(layout):
    """The row-table fast paths must give what they give on a contiguous copy of the same tensor."""
    g = torch.Generator().manual_seed(3)
    base = torch.randn(3, 5, 9, 4, generator=g)  # [B, H, L, D]
    x = {
        "transposed": base.transpose(1, 2),  # [B, L, H, D] view
        "broadcast_batch": base[:1].expand(3, 5, 9, 4).transpose(1, 2),
        "sliced": base[:, :, :, 1:3].transpose(1, 2),
    }[layout]
    assert not x.is_contiguous()
    idx = torch.stack([torch.randperm(9, generator=g)[:6].sort().values for _ in range(3)])
    for dim in (1, 2):
        got = gops.gather_tokens(x, idx[:, : min(6, x.shape[dim])] % x.shape[dim], dim)
        want = gops.gather_tokens(x.contiguous(), idx[:, : min(6, x.shape[dim])] % x.shape[dim], dim)
        assert torch.equal(got, want)
    src, dst = torch.tensor([[0, 2]] * 3), torch.tensor([[1, 3]] * 3)
    sizes = torch.rand(3, 9, generator=g) + 0.5
    xm, sm = gops.merge_tokens(x, sizes, src, dst)
    xc, sc = gops.merge_tokens(x.contiguous(), sizes, src, dst)
    assert xm.is_contiguous() and torch.equal(xm, xc) and torch.equal(sm, sc)
    assert torch.equal(xm[:, 4:], x[:, 4:])  # rows that are no destination are untouched


# ------------------------------------------------------------------------------ select_tokens_padded


@pytest.mark.parametrize("n_drop", [[3, 5, 4], [0, 2, 1], [2, 2, 2]])
def test_select_tokens_padded(n_drop):
    """Uneven batches: sample b drops its n_drop[b] lowest-scored candidates; the batch keeps L - min(n_drop)
    slots, the extra ones filled with each sample's highest-scored dropped tokens, flagged."""
    g = torch.Generator().manual_seed(0)
    B, L = 3, 12
    scores = torch.rand(B, L, generator=g)
    cand = torch.rand(B, L, generator=g) > 0.2
    cand[:, :6] = True
    length = L - min(n_drop)
    _opcheck(torch.ops.graphred.select_tokens_padded.default, (scores, cand, n_drop, length))
    idx, filler = gops.select_tokens_padded(scores, cand, n_drop, length)
    assert idx.shape == filler.shape == (B, length)
    # the slots are select_tokens' at the smallest drop count
    assert torch.equal(idx, gops.select_tokens(scores, cand, min(n_drop)))
    for b in range(B):
        real = set(gops.select_tokens(scores[b:b + 1], cand[b:b + 1], n_drop[b])[0].tolist())
        kept = idx[b][~filler[b]].tolist()
        assert set(kept) == real and int(filler[b].sum()) == n_drop[b] - min(n_drop)
        fill = idx[b][filler[b]]
        assert bool(cand[b, fill].all())
        if len(fill):  # the fillers are dropped candidates scored above every other dropped candidate
            dropped = [p for p in range(L) if p not in real and bool(cand[b, p]) and p not in fill.tolist()]
            assert all(float(scores[b, f]) >= float(scores[b, d]) for f in fill.tolist() for d in dropped)
    with pytest.raises(ValueError, match="length"):
        gops.select_tokens_padded(scores, cand, n_drop, length - 1)
