"""The two reductions every plan step is made of, on one attention block's token stream:

* :func:`prune_stream` scores tokens with the block's own query/key tensors (text-informed for PuMer,
  the last query for FastV, or a baseline scorer: hidden-state norm, seeded random), selects the
  image tokens to keep (``graphred::select_tokens``) and hands the kept indices to the token-axis
  rewrite;
* :func:`merge_stream` matches tokens by key similarity (``graphred::bipartite_match``), merges each
  source into its destination weighted by size (``graphred::merge_tokens``) and keeps the rest.

Both read and update the :class:`~graphred.passes.rewrite_state.RewriteState` (stream states,
counts, symbol substitutions, the log) and mark their side computations ``SIDE``.
"""
from __future__ import annotations

import operator
import warnings

import torch
import torch.fx as fx

from ..analysis.attention import mask_between, scores_matmul
from ..analysis.blocks import CROSS_ATTENTION, CROSS_MODAL_SELF, AttentionBlock
from ..analysis.provenance import CODE, IMAGE, TEXT
from ..errors import PlanError
from ..fx_utils import SIDE, call_with_val, fake_like, graph_device, last_of, node_shape, record
from .fillers import mask_fillers
from .reduce import emit_valid
from .rewrite_state import RewriteState
from .token_axis import derived_values, reduce_stream, stream_dims

aten = torch.ops.aten
gr = torch.ops.graphred


def current_mask(rs: RewriteState, block: AttentionBlock):
    """The mask the attention consumes *now* (an earlier reduction may have gathered it)."""
    if not block.mask:
        return None
    att = rs.node(block.node)
    if block.fused:
        m = att.args[3] if len(att.args) > 3 else att.kwargs.get("attn_mask")
        return m if isinstance(m, fx.Node) else None
    qk = scores_matmul(att.args[0])
    return mask_between(att.args[0], qk) if qk is not None else rs.node(block.mask)


def _scale(block: AttentionBlock) -> float:
    return block.scale if block.scale is not None else (block.head_dim or 1) ** -0.5


def prune_stream(rs: RewriteState, block: AttentionBlock, stream: int, point: fx.Node, weights_kind: str,
                 ratio: float = 0.0, keep: float | None = None, step_name: str = "pumer", scorer: str = "attention",
                 seed: int = 0, renumber: bool = False, scores_out: dict | None = None,
                 padded_queries: bool = False) -> fx.Node | None:
    """Score with ``block``'s query/key tensors, select, and reduce ``stream`` at ``point`` (drop ``ratio`` of
    its image tokens, or keep ``keep`` of them). ``weights_kind``: "text" (valid text queries; every text query,
    padding included, with ``padded_queries``, as PuMer's released code) or "last" (the last valid query).
    With ``scores_out``, its ``"scores"`` is set to the tokens' scores at the numbering after the reduction
    (the scores are computed even when nothing is dropped). Returns the reduction's gather node, or None when
    nothing is dropped."""
    gm, graph = rs.gm, rs.gm.graph
    st = rs.state(stream, ragged=True, step_name=step_name)
    rs.check_order(stream, point, step_name)
    st.renumber = st.renumber or renumber
    ragged = rs.ragged.get(st.stream)
    per = ragged[IMAGE] if ragged is not None else [rs.counts[st.stream][IMAGE]]
    if min(per) == 0:
        raise PlanError(f"{step_name}: no image tokens left in a sample of the sequence at {block.module_path} "
                        f"(image tokens per sample: {per})")
    keeps = [max(n - round(ratio * n) if keep is None else max(round(keep * n), 1), 1) for n in per]
    if rs.keep_all:  # debug mode: the whole scoring/selection/gather path runs, every token is kept
        keeps = list(per)
    # per sample: real tokens dropped, plus the filler slots an earlier reduction left (dropped first)
    fill = rs.fillers.get(st.stream, [0] * len(per))
    drops = [n - k + f for n, k, f in zip(per, keeps, fill)]
    n_img, n_keep, n_drop = per[0], keeps[0], min(drops)  # the slots every sample loses
    if ragged is None:
        n_keep, n_drop = keeps[0], per[0] - keeps[0]
    elif not rs.keep_all and max(drops) <= 0 and scores_out is None:
        return None
    if ragged is None and not rs.keep_all and n_drop <= 0 and scores_out is None:
        return None
    q, k = rs.node(block.query), rs.node(block.key)
    sdpa = rs.node(block.node)
    mask = current_mask(rs, block)
    anchor = last_of(gm, [point, sdpa, q, k, mask, st.abs_index, st.sizes, st.filler])
    nxt = anchor.next
    k = _keys(gm, block, k, nxt)
    with graph.inserting_before(nxt):
        q, k, mask = _as_heads(rs, block, q, k, mask)
    with graph.inserting_before(nxt):
        key_codes = rs.codes(stream, nxt)
    with graph.inserting_before(nxt):
        Lk = node_shape(k)[-2]
        B = node_shape(q)[0]
        valid_k = rs.valid(stream, mask, Lk, B, nxt)
        Lq = node_shape(q)[-2]
        if weights_kind == "text":  # PuMer: valid text queries
            if block.kind == CROSS_MODAL_SELF:
                qc = key_codes
                is_text = call_with_val(graph, aten.eq.Scalar, (qc, CODE[TEXT]))
                if node_shape(is_text)[0] != B:
                    is_text = call_with_val(graph, aten.expand.default, (is_text, [B, Lq]))
                w = is_text if padded_queries else call_with_val(graph, aten.logical_and.default, (is_text, valid_k))
            else:
                w = call_with_val(graph, aten.ones.default, ([B, Lq],), {"dtype": torch.bool, "device": graph_device(graph.owning_module)})
        else:  # FastV: the last valid query
            pos = call_with_val(graph, aten.arange.default, (Lq,), {"dtype": torch.long, "device": graph_device(graph.owning_module)})
            vq = valid_k if Lq == Lk else call_with_val(graph, aten.ones.default, ([B, Lq],), {"dtype": torch.bool, "device": graph_device(graph.owning_module)})
            last = call_with_val(graph, aten.where.ScalarOther, (vq, pos, -1))
            last = call_with_val(graph, aten.amax.default, (last, [1], True))
            w = call_with_val(graph, aten.eq.Tensor, (pos, last))
        wf = call_with_val(graph, aten._to_copy.default, (w,), {"dtype": torch.float32})
        if scorer == "norm":  # text-agnostic baseline: the norm of each token's hidden state
            scores = call_with_val(graph, aten.linalg_vector_norm.default, (point, 2, [-1]))
            scores = call_with_val(graph, aten._to_copy.default, (scores,), {"dtype": torch.float32})
        elif scorer == "random":  # baseline: a fixed random priority per position (seeded)
            name = f"_graphred_random_{len(rs.log)}"
            gen = torch.Generator().manual_seed(seed + 7919 * len(rs.log))
            gm.register_buffer(name, torch.rand(1, st.length, generator=gen).to(graph_device(gm)), persistent=False)
            scores = graph.get_attr(name)
            scores.meta["val"] = fake_like(gm, getattr(gm, name))
            scores = call_with_val(graph, aten.expand.default, (scores, [B, st.length]))
        else:
            smask = mask
            if st.filler is not None:  # the attention will not see the filler slots (FillerMaskPass): nor do the scores
                same = block.query_stream is not None and rs.prov.find(block.query_stream) == st.stream
                smask = mask_fillers(graph, mask, st.filler, st.filler if same else None, Lq, q.meta["val"].dtype)
            scores = call_with_val(graph, gr.attention_scores.default, (q, k, wf, smask, _scale(block)))
        is_image = call_with_val(graph, aten.eq.Scalar, (key_codes, CODE[IMAGE]))
        if node_shape(is_image)[0] != B:
            is_image = call_with_val(graph, aten.expand.default, (is_image, [B, Lk]))
        if st.filler is not None:  # earlier filler slots score lowest: they go before any real token
            ninf = call_with_val(graph, aten.full_like.default, (scores, float("-inf")))
            scores = call_with_val(graph, aten.where.self, (st.filler, ninf, scores))
        if max(drops) <= 0 and not rs.keep_all:  # only the scores were wanted
            for n in (key_codes, valid_k, w, wf, scores):
                record(n, SIDE, True)
            scores_out["scores"] = scores
            return None
        filler = None
        if ragged is None:
            idx = call_with_val(graph, gr.select_tokens.default, (scores, is_image, n_drop))
        else:  # per-sample counts at a static length: samples that drop more keep filler slots
            sel = call_with_val(graph, gr.select_tokens_padded.default, (scores, is_image, drops, st.length - n_drop))
            idx = call_with_val(graph, operator.getitem, (sel, 0))
            filler = call_with_val(graph, operator.getitem, (sel, 1))
        kept_scores = call_with_val(graph, gr.gather_tokens.default, (scores, idx, 1)) if scores_out is not None else None
    for n in (key_codes, valid_k, w, wf, scores, is_image, idx, kept_scores, filler):
        if n is not None:
            record(n, SIDE, True)
    if filler is not None:
        record(sel, SIDE, True)
    if scores_out is not None:
        scores_out["scores"] = kept_scores
    new_len = st.length - n_drop
    g = reduce_stream(gm, rs.prov, st, point, idx, new_len, pass_name=f"{step_name} at {block.module_path}")
    rs.last_point[st.stream] = g
    if st.sizes is not None:
        rs.size_marks.setdefault(st.stream, []).append((g, st.sizes))
        _mark_concatenations(gm, rs, st, st.sizes, None)
    if ragged is None:
        rs.counts[st.stream][IMAGE] = n_keep
        rs.log.append({"step": step_name, "op": "prune", "block": block.module_path, "image_before": n_img,
                        "image_after": n_keep, "length_after": new_len})
    else:
        new_fill = [d - n_drop for d in drops]
        st.filler = filler if any(new_fill) else None
        rs.filler_marks.setdefault(st.stream, []).append((g, st.filler))
        _mark_concatenations(gm, rs, st, None, st.filler)
        rs.fillers[st.stream] = new_fill
        ragged[IMAGE] = keeps
        rs.counts[st.stream][IMAGE] -= n_drop  # image slots (real and filler) in the first sample's count
        rs.log.append({"step": step_name, "op": "prune", "block": block.module_path, "image_before": list(per),
                        "image_after": list(keeps), "fillers_after": list(new_fill), "length_after": new_len})
    rs.subs.append((g.name, {"stream": st.stream, IMAGE: rs.counts[st.stream][IMAGE]}))
    return g


def _keys(gm, block: AttentionBlock, k: fx.Node, before: fx.Node) -> fx.Node:
    """Keys as [..., L, D]: an unfused attention multiplies by Kᵀ, so undo the transpose (scores transposed before
    the softmax: the keys are the matmul's left operand, already [..., L, D])."""
    if block.fused or block.transposed:
        return k
    with gm.graph.inserting_before(before):
        kt = call_with_val(gm.graph, aten.transpose.int, (k, -1, -2))
        record(kt, SIDE, True)
    return kt


def _as_heads(rs: RewriteState, block: AttentionBlock, q: fx.Node | None, k: fx.Node,
              mask: fx.Node | None) -> tuple[fx.Node | None, fx.Node, fx.Node | None]:
    """Queries, keys (``[..., L, D]``) and mask as the scoring ops read them (at the graph's insertion point):
    heads folded into the batch (a ``bmm`` on ``[B*H, L, D]``) as ``[B, H, L, D]``, with a mask folded the same
    way; a boolean mask whose true entries are masked out (``masked_fill(mask, -inf)``) negated (true: attend)."""
    graph = rs.gm.graph
    made = []
    if mask is not None and block.mask_masks_out and mask.meta["val"].dtype == torch.bool:
        mask = call_with_val(graph, aten.logical_not.default, (mask,))
        made.append(mask)
    B, ks = rs.prov.batch_size, node_shape(k)
    if B and len(ks) == 3 and ks[0] % B == 0 and (q is None or node_shape(q)[0] == ks[0]):
        H = ks[0] // B
        k = call_with_val(graph, aten.reshape.default, (k, [B, H, *ks[1:]]))
        made.append(k)
        if q is not None:
            q = call_with_val(graph, aten.reshape.default, (q, [B, H, *node_shape(q)[1:]]))
            made.append(q)
        ms = node_shape(mask) if mask is not None else None
        if ms is not None and len(ms) == 3 and ms[0] == ks[0]:
            mask = call_with_val(graph, aten.reshape.default, (mask, [B, H, *ms[1:]]))
            made.append(mask)
    for n in made:
        record(n, SIDE, True)
    return q, k, mask


def merge_stream(rs: RewriteState, block: AttentionBlock, stream: int, point: fx.Node, ratio: float, modality: str,
                 step_name: str, proportional: bool = False, warn_over_cap: bool = False, *, reorder: bool = False,
                 scores: fx.Node | None = None, count_base: int | None = None,
                 carry_sizes: bool = True) -> fx.Node | None:
    """Merge ``round(ratio * count_base)`` of the stream's ``modality`` tokens (``count_base``: their current
    count unless given) at ``point`` by bipartite matching on ``block``'s keys (at most half the unprotected
    tokens; with ``warn_over_cap`` a larger request says so in a warning).

    ``reorder``: the stream takes ToMe's output order (protected tokens, unmerged A tokens, B tokens), so the
    next merge splits that order. ``scores``: ``[B, L]`` per-token scores at the current numbering; the A/B
    split then runs in descending score order and the best-scored candidate is protected (PuMer's reducer).
    ``carry_sizes=False``: every token weighs 1 in this merge's averages (PuMer's reducer starts sizes afresh
    at each layer); the stream's sizes are still kept up to date where proportional attention reads them.
    Returns the reduction's gather node, or None when nothing is merged."""
    gm, graph = rs.gm, rs.gm.graph
    st = rs.state(stream, ragged=True, step_name=step_name)
    rs.check_order(stream, point, step_name)
    ragged = rs.ragged.get(st.stream)
    if ragged is not None and modality != IMAGE:
        raise PlanError(f"{step_name}: merging {modality} tokens at {block.module_path} needs the same number of them "
                        f"in every sample; this batch holds {ragged[modality]}. Set merge_text=0")
    # uneven batches: every sample merges the same count, the smallest sample's share (a merge removes r tokens
    # from every row; fillers take no part)
    per = ragged[IMAGE] if ragged is not None else None
    n_mod = min(per) if per is not None else rs.counts[st.stream][modality]
    if per is not None and count_base is not None:
        count_base = min(count_base) if isinstance(count_base, (list, tuple)) else count_base
    # at most what bipartite matching can merge. With the p protected tokens leading the split (ToMe's class
    # token, or the best-scored token first in score order) that is (n - p) // 2, ToMe's cap; protected
    # tokens anywhere else may all take A slots, leaving ceil(n / 2) - p
    st_info = rs.prov.streams[st.stream]
    n_special = int(st_info.special.sum()) if st_info.special is not None and modality == IMAGE else 0
    leading = n_special == 0 or bool(st_info.special[:n_special].all())
    n_prot = n_special + (1 if scores is not None else 0)
    if scores is None and leading:
        cap = (n_mod - n_prot) // 2
    elif scores is not None and n_special == 0:
        cap = (n_mod - 1) // 2  # the best-scored token is rank 0: an A slot
    else:
        cap = (n_mod + 1) // 2 - n_prot
    want = round(ratio * (n_mod if count_base is None else count_base))
    if warn_over_cap and want > cap:
        warnings.warn(f"{step_name} at {block.module_path}: {want} merges requested, but bipartite matching merges at "
                      f"most {max(cap, 0)} of the {n_mod} {modality} tokens there ({n_prot} protected); merging "
                      f"{max(cap, 0)}", stacklevel=2)
    r = min(want, cap)
    if rs.keep_all:  # debug mode: matching and merging run with nothing merged
        r = 0
    elif r <= 0:
        return None
    k = rs.node(block.key)
    mask = current_mask(rs, block)
    nxt = last_of(gm, [point, k, mask, st.abs_index, st.sizes, scores, st.filler]).next
    k = _keys(gm, block, k, nxt)
    with graph.inserting_before(nxt):
        _, k, _ = _as_heads(rs, block, None, k, None)
    with graph.inserting_before(nxt):
        codes = rs.codes(stream, nxt)
    with graph.inserting_before(nxt):
        # head mean first (the gathers below then move H times fewer elements)
        metric = call_with_val(graph, aten.mean.dim, (k, [1]))  # [B, L, D]
        # this layer's keys were computed before the reductions made at this layer: follow them
        for idx in rs.layer_chain:
            metric = call_with_val(graph, gr.gather_tokens.default, (metric, idx, 1))
        if node_shape(metric)[-2] != st.length:
            raise PlanError(f"{step_name}: the keys at {block.module_path} hold {node_shape(metric)[-2]} tokens but the stream "
                            f"holds {st.length} there: list the plan's steps in graph order (vision-tower steps such "
                            "as tome(...) before steps at later layers)")
        B = node_shape(metric)[0]
        cand = call_with_val(graph, aten.eq.Scalar, (codes, CODE[modality]))
        if node_shape(cand)[0] != B:
            cand = call_with_val(graph, aten.expand.default, (cand, [B, st.length]))
        if st.filler is not None:  # filler slots are neither merged nor merged into
            cand = call_with_val(graph, aten.logical_and.default,
                                 (cand, call_with_val(graph, aten.logical_not.default, (st.filler,))))
        protected = rs.special(stream, nxt)
        if modality == TEXT:
            valid = emit_valid(graph, mask, node_shape(mask)[-1] if mask is not None else st.length, B) if mask is not None else None
            if valid is not None and node_shape(valid)[-1] == st.length:
                invalid = call_with_val(graph, aten.logical_not.default, (valid,))
                protected = invalid if protected is None else call_with_val(graph, aten.logical_or.default, (protected, invalid))
            # the first text token of each sample is a class token (ToMe protects class tokens)
            rank = call_with_val(graph, aten.cumsum.default, (cand, 1))
            first = call_with_val(graph, aten.logical_and.default, (cand, call_with_val(graph, aten.eq.Scalar, (rank, 1))))
            protected = first if protected is None else call_with_val(graph, aten.logical_or.default, (protected, first))
            # only the first token of a leading text run stays fixed now; the end moves
            st.kept_prefix = min(st.kept_prefix, 1)
            st.kept_suffix = 0
        rank = None
        side = []
        if scores is not None:
            # split in descending score order; the best-scored candidate is protected (PuMer's class_token=True)
            ninf = call_with_val(graph, aten.full_like.default, (scores, float("-inf")))
            cscores = call_with_val(graph, aten.where.self, (cand, scores, ninf))
            best = call_with_val(graph, aten.argmax.default, (cscores, 1, True))
            pos = call_with_val(graph, aten.arange.default, (st.length,), {"dtype": torch.long, "device": graph_device(gm)})
            is_best = call_with_val(graph, aten.eq.Tensor, (pos, best))
            protected = is_best if protected is None else call_with_val(graph, aten.logical_or.default, (protected, is_best))
            rank = call_with_val(graph, aten.neg.default, (cscores,))
            side += [ninf, cscores, best, pos, is_best, protected, rank]
        if protected is not None and node_shape(protected)[0] != B:
            protected = call_with_val(graph, aten.expand.default, (protected, [B, st.length]))
        if st.sizes is None or not carry_sizes:
            sizes = call_with_val(graph, aten.ones.default, ([B, st.length],), {"dtype": torch.float32, "device": graph_device(graph.owning_module)})
        else:
            sizes = st.sizes
        match = call_with_val(graph, gr.bipartite_match.default, (metric, cand, r, protected, rank, reorder))
        keep = call_with_val(graph, operator.getitem, (match, 0))
        src = call_with_val(graph, operator.getitem, (match, 1))
        dst = call_with_val(graph, operator.getitem, (match, 2))
    for n in [codes, metric, cand, match, keep, src, dst, sizes] + side:
        record(n, SIDE, True)

    merged = {}
    dim = point.args[2] if point.target is gr.gather_tokens.default else None
    tdim = dim if dim is not None else next((d for d, _ in stream_dims(rs.prov, point, st.stream)), 1)

    def transform(x: fx.Node) -> fx.Node:
        # merge_tokens takes the tokens on dim 1 ([B, L, ...]); keys laid out [B, H, L, D] are moved there and back
        if tdim != 1:
            x = call_with_val(graph, aten.movedim.int, (x, tdim, 1))
        out = call_with_val(graph, gr.merge_tokens.default, (x, sizes, src, dst))
        x2 = call_with_val(graph, operator.getitem, (out, 0))
        merged["sizes"] = call_with_val(graph, operator.getitem, (out, 1))
        return x2 if tdim == 1 else call_with_val(graph, aten.movedim.int, (x2, 1, tdim))

    g = reduce_stream(gm, rs.prov, st, point, keep, st.length - r, transform=transform,
                      pass_name=f"{step_name} at {block.module_path}", dim=dim, inputs_ready=last_of(gm, [src, dst, sizes]))
    if carry_sizes or st.sizes is None and proportional:
        with graph.inserting_before(last_of(gm, [g, merged["sizes"]]).next):
            st.sizes = call_with_val(graph, gr.gather_tokens.default, (merged["sizes"], keep, 1))
            record(st.sizes, SIDE, True)
    elif st.sizes is not None:  # this merge weighed every token 1; the stream's sizes (proportional attention) add up
        with graph.inserting_before(last_of(gm, [g, src, dst, st.sizes]).next):
            s_src = call_with_val(graph, aten.gather.default, (st.sizes, 1, src))
            s_m = call_with_val(graph, aten.scatter_add.default, (st.sizes, 1, dst, s_src))
            st.sizes = call_with_val(graph, gr.gather_tokens.default, (s_m, keep, 1))
        for n in (s_src, s_m, st.sizes):
            record(n, SIDE, True)
    rs.layer_chain.append(keep)
    rs.last_point[st.stream] = g
    rs.size_marks.setdefault(st.stream, []).append((g, st.sizes))
    if proportional:
        rs.proportional.add(st.stream)
    _mark_concatenations(gm, rs, st, st.sizes, st.filler if per is not None else None)
    if per is None:
        rs.counts[st.stream][modality] = n_mod - r
        rs.log.append({"step": step_name, "op": f"merge_{modality}", "block": block.module_path,
                        f"{modality}_before": n_mod, f"{modality}_after": n_mod - r, "length_after": st.length})
    else:
        ragged[IMAGE] = [n - r for n in per]
        rs.counts[st.stream][IMAGE] -= r
        rs.filler_marks.setdefault(st.stream, []).append((g, st.filler))
        rs.log.append({"step": step_name, "op": f"merge_{modality}", "block": block.module_path,
                        f"{modality}_before": list(per), f"{modality}_after": list(ragged[IMAGE]),
                        "fillers_after": list(rs.fillers[st.stream]), "length_after": st.length})
    rs.subs.append((g.name, {"stream": st.stream, modality: rs.counts[st.stream][modality]}))
    return g


def cross_modal_layers(blocks: list[AttentionBlock]) -> tuple[str, list[AttentionBlock]]:
    cm = [b for b in blocks if b.kind in (CROSS_MODAL_SELF, CROSS_ATTENTION)]
    if not cm:
        return "", []
    by_stack: dict[str, list[AttentionBlock]] = {}
    for b in cm:
        by_stack.setdefault(b.stack, []).append(b)
    def meets(b: AttentionBlock) -> bool:  # text queries on image keys, or one sequence holding both
        return b.kind == CROSS_MODAL_SELF or (TEXT in b.query_modalities and IMAGE in b.key_modalities)

    # the stack where text meets image most often (a resampler's cross-attention reads the image with learned
    # queries: text-informed reductions belong where the text is)
    # (ties: the stack whose own sequence holds both, an encoder-decoder's fused encoder: reduced there, every later
    # layer and every cross-attention that reads its output as keys is smaller; then the later stack, the decoder
    # after a resampler)
    stack = max(by_stack, key=lambda s: (sum(meets(b) for b in by_stack[s]),
                                         sum(b.kind == CROSS_MODAL_SELF for b in by_stack[s]), len(by_stack[s]),
                                         by_stack[s][-1].index))
    return stack, by_stack[stack]


def _mark_concatenations(gm: fx.GraphModule, rs, st, sizes, filler) -> None:
    """The reduced tokens' sizes (proportional attention) and filler flags, laid out like every concatenation of
    them with other tokens along the token axis that the last reduction met, for the attentions reading it."""
    for sid, cat, v in derived_values(gm.graph, st, sizes, 1):
        rs.size_marks.setdefault(sid, []).append((cat, v))
        if st.stream in rs.proportional:
            rs.proportional.add(sid)
    for sid, cat, v in derived_values(gm.graph, st, filler, False):
        rs.filler_marks.setdefault(sid, []).append((cat, v))
