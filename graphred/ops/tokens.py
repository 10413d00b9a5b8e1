"""Token-reduction custom ops (namespace ``graphred``).

Every op here is registered with :func:`torch.library.custom_op`, has a fake
(meta) implementation so that ``torch.export``, ``torch.compile`` and
``FakeTensorMode`` see correct output shapes, and an autograd formula where it is
differentiable in a data input. The ops know nothing about models: they take
tensors and ints. Graph passes insert them as ``torch.ops.graphred.<name>``.

Registered schemas (``torch.ops.graphred.<name>.default._schema``)::

    attention_scores(Tensor q, Tensor k, Tensor query_weight, Tensor? attn_bias=None,
                     float? scale=None) -> Tensor
    select_tokens(Tensor scores, Tensor candidates, SymInt n_drop) -> Tensor
    select_tokens_padded(Tensor scores, Tensor candidates, int[] n_drop, int length) -> (Tensor, Tensor)
    gather_tokens(Tensor x, Tensor index, int dim) -> Tensor
    bipartite_match(Tensor metric, Tensor candidates, SymInt r, Tensor? protected=None,
                    Tensor? rank=None, bool reorder=False) -> (Tensor, Tensor, Tensor)
    merge_tokens(Tensor x, Tensor sizes, Tensor src, Tensor dst) -> (Tensor, Tensor)

:func:`size_bias` is a plain function (``log`` plus a reshape are ordinary aten ops
that every tracer already understands; a custom op would only hide them).

Conventions: dim 0 is always the batch; token axes are given explicitly; index
tensors are ``int64``; "positions" are indices into the token axis of the tensor
the op was given.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

__all__ = [
    "attention_scores",
    "select_tokens",
    "select_tokens_padded",
    "gather_tokens",
    "bipartite_match",
    "merge_tokens",
    "size_bias",
    "scored_rows",
]

# The real attention_scores kernel scores (samples x query rows) in chunks so that the temporary
# float32 logits/probabilities stay under about this many elements (2 MiB: they stay in cache).
_CHUNK_ELEMENTS = 1 << 19
# Strided keys with fewer elements per (sample, head) than this are copied once rather than multiplied
# head by head (a matrix product call costs about as much as copying ~8k floats).
_SMALL_MATRIX = 8192


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


# ---------------------------------------------------------------------------------------
# attention_scores
# ---------------------------------------------------------------------------------------


def _check_attention_args(q: Tensor, k: Tensor, query_weight: Tensor) -> None:
    _check(q.dim() == 4, f"graphred::attention_scores: q must be [B,H,Lq,D], got shape {tuple(q.shape)}")
    _check(k.dim() == 4, f"graphred::attention_scores: k must be [B,Hk,Lk,D], got shape {tuple(k.shape)}")
    _check(k.shape[0] == q.shape[0], f"graphred::attention_scores: batch of q {q.shape[0]} != batch of k {k.shape[0]}")
    _check(k.shape[3] == q.shape[3], f"graphred::attention_scores: head dim of q {q.shape[3]} != head dim of k {k.shape[3]}")
    _check(
        q.shape[1] % k.shape[1] == 0,
        f"graphred::attention_scores: key heads ({k.shape[1]}) must divide query heads ({q.shape[1]})",
    )
    _check(
        query_weight.dim() == 2 and query_weight.shape[1] == q.shape[2]
        and (query_weight.shape[0] == q.shape[0] or query_weight.shape[0] == 1),
        f"graphred::attention_scores: query_weight must be [B,Lq]=[{q.shape[0]},{q.shape[2]}], "
        f"got {tuple(query_weight.shape)}",
    )


def _as_matrix_batch(k: Tensor) -> Optional[Tensor]:
    """``k`` ``[B, Hk, L, D]`` as ``[B*Hk, L, D]`` when that is a view whose matrices BLAS reads in place."""
    try:
        k3 = k.view(k.shape[0] * k.shape[1], k.shape[2], k.shape[3])
    except RuntimeError:
        return None
    return k3 if k3.stride(-1) == 1 or k3.stride(-2) == 1 else None


@torch.library.custom_op("graphred::attention_scores", mutates_args=())
def _attention_scores(
    q: Tensor, k: Tensor, query_weight: Tensor, attn_bias: Optional[Tensor] = None,
    scale: Optional[float] = None,
) -> Tensor:
    _check_attention_args(q, k, query_weight)
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    if scale is None:
        scale = 1.0 / math.sqrt(D)
    w = query_weight.to(torch.float32).expand(B, Lq)
    bias = None
    if attn_bias is not None:
        _check(attn_bias.dim() <= 4, f"graphred::attention_scores: attn_bias has rank {attn_bias.dim()} > 4")
        bias = attn_bias.reshape((1,) * (4 - attn_bias.dim()) + tuple(attn_bias.shape))
        bias = bias.expand(bias.shape[0], bias.shape[1], Lq, Lk)  # [Bb, Hb, Lq, Lk], a view
    # normalised weights, with the head mean folded in: sum_t w_t / (H * sum_t w_t); 0 where the sum is 0
    total = w.sum(dim=1, keepdim=True)
    w = w * torch.where(total == 0, 0.0, 1.0 / (total * H))

    acc = torch.zeros(B, 1, Lk, dtype=torch.float32, device=q.device)
    # Only query rows that carry weight contribute: FastV scores one row, PuMer the text rows. This selection is
    # data-dependent, which is fine in the real kernel (the op is opaque to tracers). The rows with weight in some
    # sample are scored for every sample, unless the samples' own rows add up to fewer (text at different positions:
    # uneven image counts, padding); then each sample scores its own rows (``scored_rows`` says which).
    kf = k.to(torch.float32)
    for b0, b1, rows in scored_rows(w):
        _score_rows(q, k, kf, w, bias, acc, b0, b1, rows, scale)
    return acc.squeeze(1)


def scored_rows(query_weight: Tensor) -> list[tuple[int, int, Tensor]]:
    """The (first sample, end sample, query rows) blocks ``graphred::attention_scores`` scores for weights
    ``[B, Lq]``: the rows with weight in some sample, for all samples at once; or, where the samples' own weighted
    rows add up to fewer than that union times ``B``, each sample's own rows.

    >>> w = torch.tensor([[1., 1., 0., 0.], [0., 0., 1., 1.]])
    >>> [(b0, b1, r.tolist()) for b0, b1, r in scored_rows(w)]
    [(0, 1, [0, 1]), (1, 2, [2, 3])]
    """
    nz = query_weight != 0
    B = nz.shape[0]
    union = torch.nonzero(nz.any(0)).flatten()
    own = [int(n) for n in nz.sum(1)]
    if B > 1 and sum(own) < B * union.numel():
        return [(b, b + 1, torch.nonzero(nz[b]).flatten()) for b in range(B)]
    return [(0, B, union)]


def _score_rows(q: Tensor, k: Tensor, kf: Tensor, w: Tensor, bias: Optional[Tensor], acc: Tensor, s0: int, s1: int,
                rows: Tensor, scale: float) -> None:
    """Add the weighted, head-averaged probabilities of query ``rows`` of samples ``s0:s1`` into ``acc``."""
    H, Lk, D = q.shape[1], k.shape[2], q.shape[3]
    Hk = k.shape[1]
    G = H // Hk
    # chunks of samples x query rows whose [b, H, n, Lk] logits stay about cache-sized
    per_row = H * Lk
    n_rows = max(1, min(rows.numel(), _CHUNK_ELEMENTS // per_row))
    n_samples = max(1, _CHUNK_ELEMENTS // (per_row * n_rows))
    for b0 in range(s0, s1, n_samples):
        b1 = min(s1, b0 + n_samples)
        kc = kf[b0:b1]
        k3 = _as_matrix_batch(kc)  # [b*Hk, Lk, D] without a copy, or None for a layout BLAS cannot batch
        if k3 is None and Lk * D < _SMALL_MATRIX:
            # small matrices: one copy is cheaper than a Python-level product per (sample, head)
            k3 = _as_matrix_batch(kc.contiguous())
        for start in range(0, rows.numel(), n_rows):
            r = rows[start:start + n_rows]
            n, nb = r.numel(), b1 - b0
            # scale folded into the (small) query rows; query heads grouped by their key head
            qr = q[b0:b1].index_select(2, r).to(torch.float32) * scale  # [nb, H, n, D], contiguous
            if k3 is not None:
                logits = torch.bmm(qr.view(nb * Hk, G * n, D), k3.transpose(1, 2)).view(nb, H, n, Lk)
            else:
                # keys as a strided view (e.g. [B, L, H, D] transposed to [B, H, L, D]): one matrix product
                # per (sample, key head) reads them in place; a batched matmul would first copy all keys
                logits = torch.empty(nb, Hk, G * n, Lk, dtype=torch.float32, device=q.device)
                qg = qr.view(nb, Hk, G * n, D)
                for i in range(nb):
                    for h in range(Hk):
                        torch.mm(qg[i, h], kc[i, h].t(), out=logits[i, h])
                logits = logits.view(nb, H, n, Lk)
            wh = w[b0:b1].index_select(1, r).unsqueeze(1).expand(nb, H, n)  # weight of each probability row
            if bias is not None:
                br = (bias[b0:b1] if bias.shape[0] > 1 else bias).index_select(2, r)  # [nb|1, Hb, n, Lk]
                # a row masked everywhere has no distribution: it contributes nothing (not NaN), and its
                # logits are kept finite so that the weighted sum below stays finite
                if br.dtype == torch.bool:
                    dead = ~br.any(-1)
                    fill = torch.finfo(torch.float32).min if bool(dead.any()) else float("-inf")
                    # a small float bias broadcast-added is cheaper than a broadcast masked_fill of the logits
                    br = torch.zeros(br.shape, dtype=torch.float32, device=br.device).masked_fill_(~br, fill)
                else:
                    dead = torch.isneginf(br).all(-1)
                    if bool(dead.any()):
                        br = br.clamp_min(torch.finfo(torch.float32).min)
                logits += br
                wh = wh * ~dead
            probs = torch.softmax(logits, dim=-1)
            # sum_t w_t mean_h P[h, t, :] as one [1, H*n] x [H*n, Lk] product per sample
            acc[b0:b1].baddbmm_(wh.reshape(nb, 1, H * n), probs.view(nb, H * n, Lk))


@_attention_scores.register_fake
def _(q, k, query_weight, attn_bias=None, scale=None):
    _check_attention_args(q, k, query_weight)
    return q.new_empty((q.shape[0], k.shape[2]), dtype=torch.float32)


def _attention_scores_setup(ctx, inputs, output):
    ctx.mark_non_differentiable(output)


def _attention_scores_backward(ctx, grad):
    return None, None, None, None, None


_attention_scores.register_autograd(_attention_scores_backward, setup_context=_attention_scores_setup)


def attention_scores(
    q: Tensor, k: Tensor, query_weight: Tensor, attn_bias: Optional[Tensor] = None,
    scale: Optional[float] = None,
) -> Tensor:
    """Weighted, head-averaged attention probabilities received by each key.

    ``s[b, j] = sum_t w[b,t] * mean_h softmax_j(scale * q k^T + bias)[b,h,t,j] / sum_t w[b,t]``
    (0 where a sample's weight sum is 0). This is the side computation that replaces
    eager attention probabilities when the model runs a fused kernel (SDPA).

    Args:
        q: queries ``[B, H, Lq, D]`` (any float dtype; computed in float32).
        k: keys ``[B, Hk, Lk, D]``; ``Hk`` must divide ``H`` (grouped-query attention:
            key head ``g`` serves query heads ``g*H/Hk .. (g+1)*H/Hk - 1``).
        query_weight: ``[B, Lq]`` (or ``[1, Lq]``) weight of each query row, e.g. 1 for
            valid text queries (PuMer) or a one-hot on the last query (FastV).
        attn_bias: optional mask broadcastable to ``[B, H, Lq, Lk]``: additive float
            (may hold ``-inf``) or bool (``True`` = attend), as SDPA's ``attn_mask``.
            A query row masked everywhere contributes zero.
        scale: logit scale; ``None`` means ``1/sqrt(D)`` (SDPA's default).

    Returns:
        ``[B, Lk]`` float32 scores, detached (the op is marked non-differentiable).

    Example:
        >>> import torch, graphred.ops as gops
        >>> q, k = torch.randn(2, 4, 5, 8), torch.randn(2, 2, 7, 8)
        >>> w = torch.zeros(2, 5); w[:, -1] = 1          # FastV: last query only
        >>> s = gops.attention_scores(q, k, w, None, 8 ** -0.5)
        >>> s.shape, bool(torch.allclose(s.sum(-1), torch.ones(2)))
        (torch.Size([2, 7]), True)
    """
    return torch.ops.graphred.attention_scores(q, k, query_weight, attn_bias, scale)


# ---------------------------------------------------------------------------------------
# select_tokens
# ---------------------------------------------------------------------------------------


def _check_select_args(scores: Tensor, candidates: Tensor, n_drop: int) -> None:
    _check(scores.dim() == 2, f"graphred::select_tokens: scores must be [B,L], got {tuple(scores.shape)}")
    _check(candidates.dtype == torch.bool, f"graphred::select_tokens: candidates must be bool, got {candidates.dtype}")
    _check(
        tuple(candidates.shape) == tuple(scores.shape),
        f"graphred::select_tokens: candidates {tuple(candidates.shape)} must match scores {tuple(scores.shape)}",
    )
    _check(n_drop >= 0, f"graphred::select_tokens: n_drop must be >= 0, got {n_drop}")
    _check(n_drop <= scores.shape[1], f"graphred::select_tokens: n_drop={n_drop} > sequence length {scores.shape[1]}")


@torch.library.custom_op("graphred::select_tokens", mutates_args=())
def _select_tokens(scores: Tensor, candidates: Tensor, n_drop: int) -> Tensor:
    _check_select_args(scores, candidates, n_drop)
    B, L = scores.shape
    if n_drop == 0:
        return torch.arange(L, device=scores.device).expand(B, L).clone()
    n_cand = candidates.sum(dim=1)
    if bool((n_cand < n_drop).any()):
        bad = int(torch.nonzero(n_cand < n_drop)[0, 0])
        raise ValueError(
            f"graphred::select_tokens: sample {bad} has {int(n_cand[bad])} candidate tokens, "
            f"fewer than n_drop={n_drop}; every sample needs at least n_drop candidates"
        )
    # Drop order: candidates first, then ascending score, then (ties) higher position first
    # so that among equal scores the lower position is kept. Work on the reversed sequence
    # so that stable sorts put higher original positions first.
    rev_scores = scores.flip(1)
    rev_noncand = (~candidates).flip(1).to(torch.int8)
    order = torch.sort(rev_scores, dim=1, stable=True).indices
    order = order.gather(1, torch.sort(rev_noncand.gather(1, order), dim=1, stable=True).indices)
    kept_rev = order[:, n_drop:]
    return torch.sort(L - 1 - kept_rev, dim=1).values


@_select_tokens.register_fake
def _(scores, candidates, n_drop):
    _check_select_args(scores, candidates, n_drop)
    return scores.new_empty((scores.shape[0], scores.shape[1] - n_drop), dtype=torch.int64)


def select_tokens(scores: Tensor, candidates: Tensor, n_drop: int) -> Tensor:
    """Indices of the tokens to keep after dropping the ``n_drop`` lowest-scoring candidates.

    Every non-candidate position is kept. Among candidates the ``n_drop`` lowest scores are
    dropped (ties: the lower position is kept). NaN scores sort as the highest (kept). The
    same number is dropped from every sample, so the output shape is static.

    Args:
        scores: ``[B, L]`` real scores.
        candidates: ``[B, L]`` bool, positions that may be dropped. Each sample must have
            at least ``n_drop`` candidates (``ValueError`` otherwise).
        n_drop: tokens dropped per sample.

    Returns:
        ``[B, L - n_drop]`` int64 positions, ascending (original order kept).

    Example:
        >>> import torch, graphred.ops as gops
        >>> s = torch.tensor([[0.9, 0.1, 0.5, 0.2, 0.0]])
        >>> c = torch.tensor([[False, True, True, True, False]])
        >>> gops.select_tokens(s, c, 2)
        tensor([[0, 2, 4]])
    """
    return torch.ops.graphred.select_tokens(scores, candidates, n_drop)


def _drop_order(scores: Tensor, candidates: Tensor) -> Tensor:
    """``[B, L]`` positions in drop order, reversed numbering (see :func:`_select_tokens`)."""
    rev_scores = scores.flip(1)
    rev_noncand = (~candidates).flip(1).to(torch.int8)
    order = torch.sort(rev_scores, dim=1, stable=True).indices
    return order.gather(1, torch.sort(rev_noncand.gather(1, order), dim=1, stable=True).indices)


def _check_padded_args(scores: Tensor, candidates: Tensor, n_drop: list, length: int) -> None:
    _check(scores.dim() == 2, f"graphred::select_tokens_padded: scores must be [B,L], got {tuple(scores.shape)}")
    _check(candidates.dtype == torch.bool and tuple(candidates.shape) == tuple(scores.shape),
           f"graphred::select_tokens_padded: candidates must be bool {tuple(scores.shape)}, got "
           f"{candidates.dtype} {tuple(candidates.shape)}")
    B, L = scores.shape
    _check(len(n_drop) == B, f"graphred::select_tokens_padded: {len(n_drop)} drop counts for a batch of {B}")
    _check(all(0 <= n <= L for n in n_drop), f"graphred::select_tokens_padded: drop counts {list(n_drop)} outside 0..{L}")
    _check(L - min(n_drop) == length,
           f"graphred::select_tokens_padded: length {length} must be L - min(n_drop) = {L - min(n_drop)}")


@torch.library.custom_op("graphred::select_tokens_padded", mutates_args=())
def _select_tokens_padded(scores: Tensor, candidates: Tensor, n_drop: list[int], length: int) -> tuple[Tensor, Tensor]:
    _check_padded_args(scores, candidates, n_drop, length)
    B, L = scores.shape
    drop = torch.tensor(n_drop, device=scores.device)
    n_cand = candidates.sum(dim=1)
    if bool((n_cand < drop).any()):
        bad = int(torch.nonzero(n_cand < drop)[0, 0])
        raise ValueError(
            f"graphred::select_tokens_padded: sample {bad} has {int(n_cand[bad])} candidate tokens, fewer than its "
            f"n_drop={n_drop[bad]}")
    order = _drop_order(scores, candidates)
    n_min = L - length
    kept_rev = order[:, n_min:]  # what every sample keeps in place: its first n_min drops go
    # sample b's drops n_min..n_drop[b]-1 stay as filler slots (its highest-scored drops)
    rank = torch.arange(n_min, L, device=scores.device).expand(B, length)
    filler = rank < drop[:, None]
    pos = L - 1 - kept_rev
    sorted_pos, perm = torch.sort(pos, dim=1)
    return sorted_pos, filler.gather(1, perm)


@_select_tokens_padded.register_fake
def _(scores, candidates, n_drop, length):
    _check_padded_args(scores, candidates, n_drop, length)
    B = scores.shape[0]
    return (scores.new_empty((B, length), dtype=torch.int64), scores.new_empty((B, length), dtype=torch.bool))


def select_tokens_padded(scores: Tensor, candidates: Tensor, n_drop: list[int], length: int) -> tuple[Tensor, Tensor]:
    """Per-sample drop counts at a static length: sample ``b`` drops its ``n_drop[b]`` lowest-scoring candidates
    (the order of :func:`select_tokens`), and every sample keeps ``length = L - min(n_drop)`` slots. A sample that
    drops more than the minimum keeps its highest-scored dropped tokens in the extra slots, flagged as fillers:
    a later attention must not attend to them (the slots pad the batch; they are not kept tokens).

    Args:
        scores: ``[B, L]`` real scores.
        candidates: ``[B, L]`` bool; sample ``b`` needs at least ``n_drop[b]`` candidates (``ValueError``).
        n_drop: tokens dropped per sample (``B`` ints).
        length: ``L - min(n_drop)``.

    Returns:
        ``(index, filler)``: ``[B, length]`` int64 positions, ascending, and ``[B, length]`` bool (True on a filler).

    Example:
        >>> import torch, graphred.ops as gops
        >>> s = torch.tensor([[0.9, 0.1, 0.5, 0.2, 0.0], [0.9, 0.1, 0.5, 0.2, 0.0]])
        >>> c = torch.tensor([[False, True, True, True, False]] * 2)
        >>> idx, filler = gops.select_tokens_padded(s, c, [1, 2], 4)
        >>> idx.tolist(), filler.tolist()
        ([[0, 2, 3, 4], [0, 2, 3, 4]], [[False, False, False, False], [False, False, True, False]])
    """
    return torch.ops.graphred.select_tokens_padded(scores, candidates, list(n_drop), length)


# ---------------------------------------------------------------------------------------
# gather_tokens
# ---------------------------------------------------------------------------------------


def _gather_geometry(x: Tensor, index: Tensor, dim: int):
    _check(x.dim() >= 2, f"graphred::gather_tokens: x must have a batch dim and a token dim, got {tuple(x.shape)}")
    _check(index.dim() == 2, f"graphred::gather_tokens: index must be [B,K], got {tuple(index.shape)}")
    nd = dim + x.dim() if dim < 0 else dim
    _check(1 <= nd < x.dim(), f"graphred::gather_tokens: dim={dim} is not a non-batch dim of a rank-{x.dim()} tensor")
    bx, bi = x.shape[0], index.shape[0]
    _check(
        bx == bi or bx == 1 or bi == 1,
        f"graphred::gather_tokens: batch of x ({bx}) and of index ({bi}) must match or one must be 1",
    )
    B = bi if bx == 1 else bx
    out_shape = list(x.shape)
    out_shape[0] = B
    out_shape[nd] = index.shape[1]
    return nd, B, out_shape


def _expanded_index(index: Tensor, nd: int, shape: list) -> Tensor:
    view = [1] * len(shape)
    view[0] = index.shape[0]
    view[nd] = index.shape[1]
    return index.reshape(view).expand(shape)


def _row_layout(x: Tensor, nd: int):
    """``(rows, P, L, T)`` when ``x`` can be read as a row table ``[bx*P*L, T]`` without a copy
    (contiguous after its batch dim, batch contiguous or broadcast), else ``None``."""
    shape = x.shape
    P = math.prod(shape[1:nd])
    L = shape[nd]
    T = math.prod(shape[nd + 1:])
    inner = x[:1] if x.shape[0] > 1 and x.stride(0) == 0 else x
    if not inner.is_contiguous() or T == 1:
        # T == 1 (the last dim) is a per-element gather: torch.gather is faster there
        return None
    return inner.reshape(inner.shape[0] * P * L, T), P, L, T


def _flat_rows(bx: int, P: int, L: int, index: Tensor) -> Tensor:
    """Row numbers into ``[bx*P*L, T]`` for ``index`` ``[B, K]``, batch major: ``[B*P*K]``."""
    B, K = index.shape
    dev = index.device
    base = torch.arange(P, device=dev).view(1, P, 1) * L
    if bx > 1:
        base = base + torch.arange(bx, device=dev).view(bx, 1, 1) * (P * L)
    return (base + index.view(B, 1, K)).reshape(-1)


@torch.library.custom_op(
    "graphred::gather_tokens", mutates_args=(), schema="(Tensor x, Tensor index, int dim) -> Tensor"
)
def _gather_tokens(x: Tensor, index: Tensor, dim: int) -> Tensor:
    nd, B, out_shape = _gather_geometry(x, index, dim)
    layout = _row_layout(x, nd)
    if layout is not None:
        # whole rows of T contiguous elements: an index_select of rows (memcpy speed)
        table, P, L, _T = layout
        bx = table.shape[0] // (P * L)
        return table.index_select(0, _flat_rows(bx, P, L, index.expand(B, index.shape[1]))).view(out_shape)
    xs = list(x.shape)
    xs[0] = B
    xe = x.expand(xs)
    return torch.gather(xe, nd, _expanded_index(index, nd, out_shape))


@_gather_tokens.register_fake
def _(x, index, dim):
    _nd, _B, out_shape = _gather_geometry(x, index, dim)
    return x.new_empty(out_shape)


def _gather_setup(ctx, inputs, output):
    x, index, dim = inputs
    ctx.save_for_backward(index)
    ctx.x_shape = tuple(x.shape)
    ctx.dim = dim


def _gather_backward(ctx, grad):
    (index,) = ctx.saved_tensors
    x_shape = ctx.x_shape
    nd = ctx.dim + len(x_shape) if ctx.dim < 0 else ctx.dim
    full = list(x_shape)
    full[0] = grad.shape[0]
    B, K = grad.shape[0], grad.shape[nd]
    P, L, T = math.prod(full[1:nd]), full[nd], math.prod(full[nd + 1:])
    if T > 1:
        # rows back into place: index_add over the row table (the inverse of the forward's index_select)
        rows = _flat_rows(B, P, L, index.expand(B, K))
        gx = grad.new_zeros(B * P * L, T).index_add_(0, rows, grad.reshape(B * P * K, T)).view(full)
    else:
        gx = grad.new_zeros(full).scatter_add(nd, _expanded_index(index, nd, list(grad.shape)), grad)
    if x_shape[0] != full[0]:
        gx = gx.sum(dim=0, keepdim=True)
    return gx, None, None


_gather_tokens.register_autograd(_gather_backward, setup_context=_gather_setup)


def gather_tokens(x: Tensor, index: Tensor, dim: int) -> Tensor:
    """Gather ``index[b]`` along token axis ``dim`` of every sample of ``x``.

    ``x`` has the batch on dim 0, of size ``B`` or 1 (a shared table such as a rotary
    ``[1, L, D]`` is broadcast to the index batch); any rank, any ``dim >= 1`` (negative
    dims count from the end). Works for float, integer and bool tensors (position ids,
    masks). Differentiable in ``x``: the gradient is scattered back into zeros (and summed
    over the batch when ``x``'s batch was 1).

    Args:
        x: ``[B or 1, ..., L, ...]``.
        index: ``[B, K]`` int64 positions along ``dim`` (``[1, K]`` broadcasts too).
        dim: the token axis of ``x``.

    Returns:
        ``x`` with ``K`` entries along ``dim`` and the broadcast batch on dim 0.

    Example:
        >>> import torch, graphred.ops as gops
        >>> mask = torch.arange(16.).reshape(1, 1, 4, 4).expand(2, 1, 4, 4)
        >>> idx = torch.tensor([[0, 2], [1, 3]])
        >>> gops.gather_tokens(mask, idx, 3)[1, 0, 0]
        tensor([1., 3.])
        >>> gops.gather_tokens(torch.randn(1, 4, 8), idx, 1).shape
        torch.Size([2, 2, 8])
    """
    return torch.ops.graphred.gather_tokens(x, index, dim)


# ---------------------------------------------------------------------------------------
# bipartite_match
# ---------------------------------------------------------------------------------------


def _check_match_args(metric: Tensor, candidates: Tensor, r: int, protected: Optional[Tensor],
                      rank: Optional[Tensor] = None) -> None:
    _check(metric.dim() == 3, f"graphred::bipartite_match: metric must be [B,L,C], got {tuple(metric.shape)}")
    BL = tuple(metric.shape[:2])
    _check(candidates.dtype == torch.bool, f"graphred::bipartite_match: candidates must be bool, got {candidates.dtype}")
    _check(tuple(candidates.shape) == BL, f"graphred::bipartite_match: candidates must be [B,L]={BL}, got {tuple(candidates.shape)}")
    if protected is not None:
        _check(protected.dtype == torch.bool, f"graphred::bipartite_match: protected must be bool, got {protected.dtype}")
        _check(tuple(protected.shape) == BL, f"graphred::bipartite_match: protected must be [B,L]={BL}, got {tuple(protected.shape)}")
    if rank is not None:
        _check(rank.is_floating_point(), f"graphred::bipartite_match: rank must be a float tensor, got {rank.dtype}")
        _check(tuple(rank.shape) == BL, f"graphred::bipartite_match: rank must be [B,L]={BL}, got {tuple(rank.shape)}")
    _check(r >= 0, f"graphred::bipartite_match: r must be >= 0, got {r}")
    _check(r <= metric.shape[1], f"graphred::bipartite_match: r={r} > sequence length {metric.shape[1]}")


@torch.library.custom_op("graphred::bipartite_match", mutates_args=())
def _bipartite_match(
    metric: Tensor, candidates: Tensor, r: int, protected: Optional[Tensor] = None,
    rank: Optional[Tensor] = None, reorder: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    _check_match_args(metric, candidates, r, protected, rank)
    B, L, C = metric.shape
    dev = metric.device
    if r == 0:
        empty = torch.empty(B, 0, dtype=torch.int64, device=dev)
        return torch.arange(L, device=dev).expand(B, L).clone(), empty, empty.clone()
    # candidate positions packed left per sample, in sequence order (or ascending ``rank``, ties by
    # position): even ranks are set A, odd ranks set B
    n_cand = candidates.sum(dim=1)
    M = int(n_cand.max())
    if rank is None:
        cpos = torch.sort((~candidates).to(torch.int8), dim=1, stable=True).indices[:, :M]  # [B, M]
    else:
        by_rank = torch.sort(rank.to(torch.float32), dim=1, stable=True).indices
        noncand = (~candidates).to(torch.int8).gather(1, by_rank)
        cpos = by_rank.gather(1, torch.sort(noncand, dim=1, stable=True).indices)[:, :M]
    rank = torch.arange(M, device=dev)
    ok = rank < n_cand.unsqueeze(1)  # [B, M]: a real candidate (samples may hold fewer)
    if protected is not None:
        # protected tokens never take part in a merge, neither as source nor as destination
        ok_free = ok & ~protected.gather(1, cpos)
    else:
        ok_free = ok
    a_pos, b_pos = cpos[:, 0::2], cpos[:, 1::2]
    a_ok, b_ok = ok_free[:, 0::2], ok_free[:, 1::2]

    # cosine similarity of each A token to every B token; B slots that cannot take a merge get -inf
    m = torch.nn.functional.normalize(metric.to(torch.float32).gather(1, cpos.unsqueeze(-1).expand(B, M, C)), dim=-1)
    neg_inf = torch.tensor(float("-inf"), device=dev)
    b_bias = torch.where(b_ok, torch.tensor(0.0, device=dev), neg_inf).unsqueeze(1)  # [B, 1, nB]
    if b_pos.shape[1] == 0:
        node_max = torch.full(a_pos.shape, float("-inf"), device=dev)
        node_idx = torch.zeros(a_pos.shape, dtype=torch.int64, device=dev)
    else:
        sim = torch.baddbmm(b_bias, m[:, 0::2], m[:, 1::2].transpose(1, 2))  # [B, nA, nB]
        node_max, node_idx = sim.max(dim=-1)
    # NaN similarities (NaN metric) count as unmergeable and sort last
    mergeable = a_ok & (node_max > float("-inf"))
    n_merge = mergeable.sum(dim=1)
    if bool((n_merge < r).any()):
        bad = int(torch.nonzero(n_merge < r)[0, 0])
        raise ValueError(
            f"graphred::bipartite_match: sample {bad} can merge at most {int(n_merge[bad])} tokens "
            f"({int(ok[bad, 0::2].sum())} A candidates of {int(n_cand[bad])} candidates, "
            f"minus protected ones and those without an unprotected B partner), but r={r}"
        )
    key = torch.where(mergeable, node_max, neg_inf)
    by_match = torch.sort(key, dim=1, descending=True, stable=True).indices  # [B, nA] rows of A, best match first
    order = by_match[:, :r]
    src = a_pos.gather(1, order)
    dst = b_pos.gather(1, node_idx.gather(1, order))
    # canonical order: by source position
    src, perm = torch.sort(src, dim=1)
    dst = dst.gather(1, perm)
    dropped = torch.zeros(B, L, dtype=torch.bool, device=dev).scatter_(1, src, True)
    keep_index = torch.nonzero(~dropped)[:, 1].clone().view(B, L - r)
    if reorder:
        keep_index = _reference_order(keep_index, candidates, cpos, ok, protected, by_match, order, M, r)
    return keep_index, src, dst


def _reference_order(keep_index: Tensor, candidates: Tensor, cpos: Tensor, ok: Tensor, protected: Optional[Tensor],
                     by_match: Tensor, order: Tensor, M: int, r: int) -> Tensor:
    """``keep_index`` with its candidate slots refilled in ToMe's output order: protected candidates, then the
    unmerged A tokens (by rank where the sample has a protected candidate, as ToMe sorts them to keep its class
    token first; otherwise best match first, ToMe's ``argsort`` order), then the B tokens by rank."""
    B = keep_index.shape[0]
    dev = keep_index.device
    nA = by_match.shape[1]
    ranks = torch.arange(M, device=dev)
    is_a = (ranks % 2 == 0).unsqueeze(0).expand(B, M)
    prot = protected.gather(1, cpos) & ok if protected is not None else torch.zeros_like(ok)
    has_prot = prot.any(dim=1, keepdim=True)
    # position of each A row in the best-match order
    match_pos = torch.empty_like(by_match).scatter_(1, by_match, torch.arange(nA, device=dev).expand(B, nA))
    within_a = torch.where(has_prot, ranks.unsqueeze(0) // 2, torch.zeros(1, dtype=torch.int64, device=dev))
    a_rows = (ranks // 2).clamp_max(nA - 1).unsqueeze(0).expand(B, M)
    within_a = torch.where(has_prot, within_a, match_pos.gather(1, a_rows))
    merged = torch.zeros(B, nA, dtype=torch.bool, device=dev).scatter_(1, order, True).gather(1, a_rows) & is_a
    group = torch.where(prot, 0, torch.where(is_a, 1, 2))
    within = torch.where(is_a & ~prot, within_a, ranks.unsqueeze(0).expand(B, M))
    gone = ~ok | merged
    sort_key = torch.where(gone, 3 * M, group * M + within)
    seq = cpos.gather(1, torch.sort(sort_key, dim=1, stable=True).indices)  # [B, M] kept candidates first
    n_kept = ok.sum(1, keepdim=True) - r
    slots = candidates.gather(1, keep_index)  # [B, L-r]: the slots that hold candidates
    return keep_index.masked_scatter(slots, seq[ranks.unsqueeze(0) < n_kept])


@_bipartite_match.register_fake
def _(metric, candidates, r, protected=None, rank=None, reorder=False):
    _check_match_args(metric, candidates, r, protected, rank)
    B, L = metric.shape[0], metric.shape[1]
    keep = metric.new_empty((B, L - r), dtype=torch.int64)
    return keep, metric.new_empty((B, r), dtype=torch.int64), metric.new_empty((B, r), dtype=torch.int64)


def bipartite_match(
    metric: Tensor, candidates: Tensor, r: int, protected: Optional[Tensor] = None,
    rank: Optional[Tensor] = None, reorder: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    """ToMe bipartite soft matching restricted to candidate tokens.

    Per sample, candidate positions in sequence order are split alternately into set A
    (even rank) and set B (odd rank). With the L2-normalised metric, each A token takes its
    most similar B token (cosine); the ``r`` A tokens with the highest such similarity are
    merged into their partners. Non-candidates never take part, so modality-aware merging
    calls this once with image candidates and once with text candidates. ``protected``
    tokens take part in no merge (neither as source nor as destination). Ties are broken
    toward the lower position.

    Args:
        metric: ``[B, L, C]`` similarity features (e.g. head-mean keys).
        candidates: ``[B, L]`` bool.
        r: merges per sample; must not exceed the mergeable A tokens of any sample
            (unprotected A candidates with an unprotected B partner), else ``ValueError``.
        protected: optional ``[B, L]`` bool.
        rank: optional ``[B, L]`` float: candidates are split into A/B alternately in ascending ``rank``
            (ties by position) instead of sequence order (PuMer splits its kept tokens in score order).
        reorder: return ``keep_index`` in ToMe's output order rather than ascending: its candidate slots
            hold the protected candidates, then the unmerged A tokens (by rank if the sample has a protected
            candidate, else best match first, as ToMe's ``argsort``), then the B tokens by rank; the next
            layer's alternating split then runs over that order, as in ToMe's code.

    Returns:
        ``(keep_index [B, L-r], src [B, r], dst [B, r])`` int64 positions: ``src`` are the
        merged-away A tokens (ascending), ``dst[:, i]`` the B partner of ``src[:, i]``, and
        ``keep_index`` every position except ``src``, ascending (a merged token stays at
        its ``dst`` position). Pass ``src``/``dst`` to :func:`merge_tokens`, then gather
        with ``keep_index``.

    Example:
        >>> import torch, graphred.ops as gops
        >>> metric = torch.tensor([[[1., 0], [1, 0], [0, 1], [0, 1.1], [5, 5]]])
        >>> cand = torch.tensor([[True, True, True, True, False]])
        >>> keep, src, dst = gops.bipartite_match(metric, cand, 2)
        >>> keep, src, dst
        (tensor([[1, 3, 4]]), tensor([[0, 2]]), tensor([[1, 3]]))
    """
    return torch.ops.graphred.bipartite_match(metric, candidates, r, protected, rank, reorder)


# ---------------------------------------------------------------------------------------
# merge_tokens
# ---------------------------------------------------------------------------------------


def _check_merge_args(x: Tensor, sizes: Tensor, src: Tensor, dst: Tensor) -> None:
    _check(x.dim() >= 2, f"graphred::merge_tokens: x must be [B,L,C], got {tuple(x.shape)}")
    _check(
        tuple(sizes.shape) == tuple(x.shape[:2]),
        f"graphred::merge_tokens: sizes must be [B,L]={tuple(x.shape[:2])}, got {tuple(sizes.shape)}",
    )
    _check(
        src.dim() == 2 and tuple(src.shape) == tuple(dst.shape) and src.shape[0] == x.shape[0],
        f"graphred::merge_tokens: src and dst must both be [B,r] with B={x.shape[0]}, "
        f"got {tuple(src.shape)} and {tuple(dst.shape)}",
    )


def _expand_rows(idx: Tensor, feat: int) -> Tensor:
    return idx.unsqueeze(-1).expand(idx.shape[0], idx.shape[1], feat)


@torch.library.custom_op("graphred::merge_tokens", mutates_args=())
def _merge_tokens(x: Tensor, sizes: Tensor, src: Tensor, dst: Tensor) -> tuple[Tensor, Tensor]:
    _check_merge_args(x, sizes, src, dst)
    shape = x.shape
    B, L = shape[0], shape[1]
    r = src.shape[1]
    ct = torch.promote_types(x.dtype, sizes.dtype)
    sc = sizes.to(ct)
    s_src = sc.gather(1, src)
    s_m = sc.scatter_add(1, dst, s_src)
    out = x.reshape(B, L, -1).clone(memory_format=torch.contiguous_format)  # other rows stay bit for bit
    if r == 0:
        return out.reshape(shape), s_m.to(sizes.dtype)
    F = out.shape[2]
    rows = out.view(B * L, F)
    offs = torch.arange(B, device=x.device).unsqueeze(1) * L
    src_rows, dst_rows = (src + offs).reshape(-1), (dst + offs).reshape(-1)
    # only the r destination rows per sample are touched: s_d x_d + sum of s_src x_src, over the merged size
    d_uniq = torch.unique(dst_rows)
    acc = rows.index_select(0, d_uniq).to(ct) * sc.reshape(-1).index_select(0, d_uniq).unsqueeze(1)
    slot = torch.searchsorted(d_uniq, dst_rows)
    acc.index_add_(0, slot, rows.index_select(0, src_rows).to(ct) * s_src.reshape(-1, 1))
    acc /= s_m.reshape(-1).index_select(0, d_uniq).unsqueeze(1)
    rows.index_copy_(0, d_uniq, acc.to(x.dtype))
    return out.reshape(shape), s_m.to(sizes.dtype)


@_merge_tokens.register_fake
def _(x, sizes, src, dst):
    _check_merge_args(x, sizes, src, dst)
    return torch.empty_like(x), torch.empty_like(sizes)


def _merge_setup(ctx, inputs, output):
    x, sizes, src, dst = inputs
    x_m, s_m = output
    ctx.save_for_backward(x, sizes, src, dst, x_m, s_m)


def _merge_backward(ctx, g_x, g_s):
    x, sizes, src, dst, x_m, s_m = ctx.saved_tensors
    shape = x.shape
    B, L = shape[0], shape[1]
    xf = x.reshape(B, L, -1)
    xmf = x_m.reshape(B, L, -1)
    F = xf.shape[2]
    if g_x is None:
        g_x = torch.zeros_like(x)
    if g_s is None:
        g_s = torch.zeros_like(sizes)
    ct = torch.promote_types(g_x.dtype, sizes.dtype)
    g = g_x.reshape(B, L, -1).to(ct)
    s = sizes.to(ct)
    is_dst = torch.zeros(B, L, dtype=torch.bool, device=x.device).scatter(1, dst, True)
    den = torch.where(is_dst, s_m.to(ct), torch.ones_like(s))
    # q = dL/d(numerator) on destination rows, 0 elsewhere
    q = torch.where(is_dst.unsqueeze(-1), g / den.unsqueeze(-1), torch.zeros_like(g))
    q_at_dst = q.gather(1, _expand_rows(dst, F))  # [B, r, F]
    s_src = s.gather(1, src)
    grad_x = grad_s = None
    if ctx.needs_input_grad[0]:
        own = torch.where(is_dst.unsqueeze(-1), q * s.unsqueeze(-1), g)
        gx = own.scatter_add(1, _expand_rows(src, F), q_at_dst * s_src.unsqueeze(-1))
        grad_x = gx.to(x.dtype).reshape(shape)
    if ctx.needs_input_grad[1]:
        xc, xmc = xf.to(ct), xmf.to(ct)
        gsm = g_s.to(ct)
        own = gsm + torch.where(is_dst, (q * (xc - xmc)).sum(-1), torch.zeros_like(s))
        xm_at_dst = xmc.gather(1, _expand_rows(dst, F))
        from_src = gsm.gather(1, dst) + (q_at_dst * (xc.gather(1, _expand_rows(src, F)) - xm_at_dst)).sum(-1)
        grad_s = own.scatter_add(1, src, from_src).to(sizes.dtype)
    return grad_x, grad_s, None, None


_merge_tokens.register_autograd(_merge_backward, setup_context=_merge_setup)


def merge_tokens(x: Tensor, sizes: Tensor, src: Tensor, dst: Tensor) -> tuple[Tensor, Tensor]:
    """Size-weighted merge of rows ``src`` into rows ``dst`` (ToMe's weighted average).

    For each destination ``d``: ``x'[d] = (s[d] x[d] + sum_{src->d} s[src] x[src]) /
    (s[d] + sum_{src->d} s[src])`` and ``sizes'[d] = s[d] + sum_{src->d} s[src]``; several
    sources may map to one destination. All other rows (including the ``src`` rows, which
    the caller drops afterwards with :func:`gather_tokens` and ``keep_index``) are returned
    unchanged, bit for bit. ``src`` and ``dst`` are expected to be disjoint (as
    :func:`bipartite_match` returns them); sizes must be positive on destination rows.
    Differentiable in ``x`` and ``sizes``.

    Args:
        x: ``[B, L, C]`` (trailing dims beyond the token axis are flattened internally).
        sizes: ``[B, L]`` float token sizes (1 for unmerged tokens).
        src, dst: ``[B, r]`` int64 positions.

    Returns:
        ``(x_merged [B, L, C], sizes_merged [B, L])``.

    Example:
        >>> import torch, graphred.ops as gops
        >>> x = torch.tensor([[[0.], [3.], [10.]]])
        >>> xm, sm = gops.merge_tokens(x, torch.tensor([[1., 2., 1.]]), torch.tensor([[0]]), torch.tensor([[1]]))
        >>> xm.flatten().tolist(), sm.flatten().tolist()
        ([0.0, 2.0, 10.0], [1.0, 3.0, 1.0])
    """
    return torch.ops.graphred.merge_tokens(x, sizes, src, dst)


# ---------------------------------------------------------------------------------------
# size_bias
# ---------------------------------------------------------------------------------------


def size_bias(sizes: Tensor, dtype: Optional[torch.dtype] = None) -> Tensor:
    """ToMe proportional attention as an additive attention mask: ``log(sizes)`` as
    ``[B, 1, 1, L]``, broadcastable over heads and queries (SDPA ``attn_mask``).

    A plain function, not a custom op: ``log`` and a reshape are aten ops that export,
    compile and autograd already handle, so the graph shows them directly. Add the result
    to any existing additive mask (``-inf`` entries stay ``-inf``).

    Args:
        sizes: ``[B, L]`` positive token sizes (as returned by :func:`merge_tokens`).
        dtype: output dtype (SDPA wants the query's); default: ``sizes``' dtype.

    Example:
        >>> import torch, graphred.ops as gops
        >>> gops.size_bias(torch.tensor([[1., 2.]])).shape
        torch.Size([1, 1, 1, 2])
    """
    bias = torch.log(sizes)[:, None, None, :]
    return bias if dtype is None else bias.to(dtype)
