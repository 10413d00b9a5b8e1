"""Apply a :class:`graphred.plans.Plan` to a captured program: a new, reduced graph module.

The program's own graph is never changed: the plan is applied to a copy that shares the
parameter tensors (no weights are copied).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import sympy
import torch
import torch.fx as fx
from torch.utils import _pytree as pytree

from ..analysis.evaluate import meta_inputs, meta_layout_message
from ..analysis.blocks import CROSS_ATTENTION, CROSS_MODAL_SELF, UNIMODAL_SELF, AttentionBlock, detect_blocks
from ..analysis.provenance import CODE, IMAGE, REGISTER, TEXT, TokenProvenance, _shape
from ..errors import PlanError
from ..plans import FastVStep, Plan, PumerStep, ToMeStep, select_layers
from ..program import Program
from .infra import set_fake_val
from .reduce import _node, emit_codes, emit_valid, graph_device, key_source, layer_input, residual_after
from .token_axis import StreamState, _call, record_original_shapes, reduce_stream

aten = torch.ops.aten
gr = torch.ops.graphred


@dataclass
class AppliedPlan:
    """The reduced graph and what was done to it."""

    graph_module: fx.GraphModule
    plan: Plan
    steps: list[dict] = field(default_factory=list)
    subs_at: dict[str, dict] = field(default_factory=dict)  # original node name -> {symbol: expr}
    positions_output: bool = False
    provenance: TokenProvenance | None = None
    blocks: list[AttentionBlock] = field(default_factory=list)


def copy_graph_module(gm: fx.GraphModule) -> fx.GraphModule:
    """A new GraphModule over a copy of ``gm``'s graph, sharing its parameters and buffers."""
    new_graph = copy.deepcopy(gm.graph)
    new = fx.GraphModule(gm, new_graph, class_name=type(gm).__name__)
    for k in ("_in_spec", "_out_spec"):
        if hasattr(gm, k):
            setattr(new, k, getattr(gm, k))
    for n_old, n_new in zip(gm.graph.nodes, new.graph.nodes):
        n_new.meta = dict(n_old.meta)
    return new


class _Ctx:
    def __init__(self, gm, prov, blocks, program):
        self.gm, self.prov, self.blocks, self.program = gm, prov, blocks, program
        self.states: dict[int, StreamState] = {}
        self.codes_cache: dict = {}
        self.counts: dict[int, dict[str, int]] = {}  # stream -> current tokens per modality
        self.subs: list[tuple[str, dict]] = []  # (first original node affected, substitution)
        self.log: list[dict] = []
        self.original_names = {n.name for n in gm.graph.nodes}
        self.layer_chain: list[fx.Node] = []  # indices applied at the current layer, in order
        self.size_marks: dict[int, list[tuple[fx.Node, fx.Node]]] = {}  # stream -> [(reduction gather, sizes after it)]
        self.proportional: set[int] = set()  # streams whose later attention gets log(size) on its key logits
        self.valid0: dict[int, fx.Node] = {}  # stream -> key validity [B, L] at the original numbering
        self.last_point: dict[int, fx.Node] = {}  # stream -> the latest reduction's gather

    def check_order(self, sid: int, point: fx.Node, step_name: str) -> None:
        """Steps are applied in the order given; each must act later in the graph than the previous
        reductions of the same stream."""
        last = self.last_point.get(self.prov.find(sid))
        if last is not None:
            order = {n: i for i, n in enumerate(self.gm.graph.nodes)}
            if order[point] < order[last]:
                raise PlanError(f"{step_name}: it acts earlier in the graph than a step listed before it on the same "
                                "tokens; list the plan's steps in graph order (vision-tower steps such as tome(...) "
                                "before steps at later layers)")

    def state(self, sid: int) -> StreamState:
        sid = self.prov.find(sid)
        if sid not in self.states:
            st = self.prov.streams[sid]
            self.states[sid] = StreamState(sid, st.length, st.length, kept_prefix=_leading_fixed(st),
                                           kept_suffix=_trailing_fixed(st))
            counts = st.counts()
            per = {}
            for m in (IMAGE, TEXT, REGISTER):
                vals = {c.get(m, 0) for c in counts}
                if len(vals) > 1:
                    raise PlanError(
                        f"samples hold different numbers of {m} tokens ({sorted(vals)}) in the sequence at "
                        f"{st.origin}: graphred keeps k tokens per sample, so every sample must have the same count")
                per[m] = vals.pop() if vals else 0
            self.counts[sid] = per
        return self.states[sid]

    def codes(self, sid: int, before: fx.Node) -> fx.Node:
        """Current-level modality codes of the stream, inserted before ``before``."""
        st = self.state(sid)
        graph = self.gm.graph
        with graph.inserting_before(before):
            c = emit_codes(self.gm, self.prov, st.stream, self.codes_cache)
        # the cache holds original-length codes; bring them to the current numbering
        if st.abs_index is not None:
            with graph.inserting_before(before):
                rows = _shape(st.abs_index)[0]
                if _shape(c)[0] != rows:
                    c = _call(graph, aten.expand.default, (c, [rows, _shape(c)[1]]))
                c = _call(graph, gr.gather_tokens.default, (c, st.abs_index, 1))
        return c

    def valid(self, sid: int, mask: fx.Node | None, length: int, rows: int, before: fx.Node) -> fx.Node:
        """``[B, L]`` key validity at the current numbering. Read from the attention mask once, while the
        stream is still at its original numbering, then gathered (a reduce over an ``[B, 1, L, L]`` mask
        per step would cost O(L²) each time)."""
        st = self.state(sid)
        graph = self.gm.graph
        cached = self.valid0.get(st.stream)
        if cached is None and st.abs_index is None:
            with graph.inserting_before(before):
                cached = emit_valid(graph, mask, length, rows)
            cached.meta["graphred_side"] = True
            self.valid0[st.stream] = cached
            return cached
        if cached is None:  # the first step on this stream came after other reductions
            with graph.inserting_before(before):
                return emit_valid(graph, mask, length, rows)
        if st.abs_index is None:
            return cached
        with graph.inserting_before(before):
            return _call(graph, gr.gather_tokens.default, (cached, st.abs_index, 1))

    def special(self, sid: int, before: fx.Node) -> fx.Node | None:
        st = self.prov.streams[self.prov.find(sid)]
        if st.special is None or not bool(st.special.any()):
            return None
        name = f"_graphred_special_{st.id}"
        if not hasattr(self.gm, name):
            from .reduce import graph_device
            self.gm.register_buffer(name, st.special.view(1, -1).clone().to(graph_device(self.gm)), persistent=False)
        graph = self.gm.graph
        with graph.inserting_before(before):
            node = graph.get_attr(name)
            from .reduce import _fake_like
            node.meta["val"] = _fake_like(self.gm, getattr(self.gm, name))
            s = self.states[self.prov.find(sid)]
            if s.abs_index is not None:
                node = _call(graph, gr.gather_tokens.default, (node, s.abs_index, 1))
        return node


def _leading_fixed(st) -> int:
    """Leading positions image-token reductions never drop: protected (learned) tokens, or text before
    the first image token in every sample."""
    if st.special is not None and bool(st.special[:1].all()):
        n = 0
        while n < len(st.special) and bool(st.special[n]):
            n += 1
        return n
    return _run_of_text(st.codes, from_end=False)


def _trailing_fixed(st) -> int:
    """Trailing positions that are text in every sample (image-token reductions keep them last)."""
    return _run_of_text(st.codes, from_end=True)


def _run_of_text(codes, from_end: bool) -> int:
    if codes is None:
        return 0
    text = (codes == CODE[TEXT]).all(0)
    if from_end:
        text = text.flip(0)
    n = 0
    while n < len(text) and bool(text[n]):
        n += 1
    return n


def _after(gm, nodes) -> fx.Node:
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    return max([n for n in nodes if n is not None], key=lambda n: order[n])


def _mask_of(gm, block: AttentionBlock):
    """The mask the attention consumes *now* (an earlier reduction may have gathered it)."""
    if not block.mask:
        return None
    att = _node(gm, block.node)
    if block.fused:
        m = att.args[3] if len(att.args) > 3 else att.kwargs.get("attn_mask")
        return m if isinstance(m, fx.Node) else None
    from ..analysis.blocks import _mask_of as find_mask, _walk_up

    qk = _walk_up(att.args[0])
    return find_mask(att.args[0], qk) if qk is not None else _node(gm, block.mask)


def _scale(block: AttentionBlock) -> float:
    return block.scale if block.scale is not None else (block.head_dim or 1) ** -0.5


def _prune(ctx: _Ctx, block: AttentionBlock, stream: int, point: fx.Node, weights_kind: str, ratio: float = 0.0,
           keep: float | None = None, step_name: str = "pumer", scorer: str = "attention", seed: int = 0,
           renumber: bool = False) -> fx.Node | None:
    """Score with ``block``'s query/key tensors, select, and reduce ``stream`` at ``point``."""
    gm, graph = ctx.gm, ctx.gm.graph
    st = ctx.state(stream)
    ctx.check_order(stream, point, step_name)
    st.renumber = st.renumber or renumber
    n_img = ctx.counts[st.stream][IMAGE]
    if n_img == 0:
        raise PlanError(f"{step_name}: no image tokens left in the sequence at {block.module_path}")
    n_keep = n_img - round(ratio * n_img) if keep is None else max(round(keep * n_img), 1)
    n_keep = max(n_keep, 1)
    n_drop = n_img - n_keep
    if n_drop <= 0:
        return None
    q, k = _node(gm, block.query), _node(gm, block.key)
    sdpa = _node(gm, block.node)
    mask = _mask_of(gm, block)
    anchor = _after(gm, [point, sdpa, q, k, mask, st.abs_index, st.sizes])
    nxt = anchor.next
    k = _keys(gm, block, k, nxt)
    with graph.inserting_before(nxt):
        key_codes = ctx.codes(stream, nxt)
    with graph.inserting_before(nxt):
        Lk = _shape(k)[-2]
        B = _shape(q)[0]
        valid_k = ctx.valid(stream, mask, Lk, B, nxt)
        Lq = _shape(q)[-2]
        if weights_kind == "text":  # PuMer: valid text queries
            if block.kind == CROSS_MODAL_SELF:
                qc = key_codes
                is_text = _call(graph, aten.eq.Scalar, (qc, CODE[TEXT]))
                if _shape(is_text)[0] != B:
                    is_text = _call(graph, aten.expand.default, (is_text, [B, Lq]))
                w = _call(graph, aten.logical_and.default, (is_text, valid_k))
            else:
                w = _call(graph, aten.ones.default, ([B, Lq],), {"dtype": torch.bool, "device": graph_device(graph.owning_module)})
        else:  # FastV: the last valid query
            pos = _call(graph, aten.arange.default, (Lq,), {"dtype": torch.long, "device": graph_device(graph.owning_module)})
            vq = valid_k if Lq == Lk else _call(graph, aten.ones.default, ([B, Lq],), {"dtype": torch.bool, "device": graph_device(graph.owning_module)})
            last = _call(graph, aten.where.ScalarOther, (vq, pos, -1))
            last = _call(graph, aten.amax.default, (last, [1], True))
            w = _call(graph, aten.eq.Tensor, (pos, last))
        wf = _call(graph, aten._to_copy.default, (w,), {"dtype": torch.float32})
        if scorer == "norm":  # text-agnostic baseline: the norm of each token's hidden state
            scores = _call(graph, aten.linalg_vector_norm.default, (point, 2, [-1]))
            scores = _call(graph, aten._to_copy.default, (scores,), {"dtype": torch.float32})
        elif scorer == "random":  # baseline: a fixed random priority per position (seeded)
            name = f"_graphred_random_{len(ctx.log)}"
            gen = torch.Generator().manual_seed(seed + 7919 * len(ctx.log))
            gm.register_buffer(name, torch.rand(1, st.length, generator=gen).to(graph_device(gm)), persistent=False)
            scores = graph.get_attr(name)
            from .reduce import _fake_like
            scores.meta["val"] = _fake_like(gm, getattr(gm, name))
            scores = _call(graph, aten.expand.default, (scores, [B, st.length]))
        else:
            scores = _call(graph, gr.attention_scores.default, (q, k, wf, mask, _scale(block)))
        is_image = _call(graph, aten.eq.Scalar, (key_codes, CODE[IMAGE]))
        if _shape(is_image)[0] != B:
            is_image = _call(graph, aten.expand.default, (is_image, [B, Lk]))
        idx = _call(graph, gr.select_tokens.default, (scores, is_image, n_drop))
    for n in (key_codes, valid_k, w, wf, scores, is_image, idx):
        n.meta["graphred_side"] = True
    new_len = st.length - n_drop
    g = reduce_stream(gm, ctx.prov, st, point, idx, new_len, pass_name=f"{step_name} at {block.module_path}")
    ctx.last_point[st.stream] = g
    if st.sizes is not None:
        ctx.size_marks.setdefault(st.stream, []).append((g, st.sizes))
    ctx.counts[st.stream][IMAGE] = n_keep
    ctx.log.append({"step": step_name, "op": "prune", "block": block.module_path, "image_before": n_img,
                    "image_after": n_keep, "length_after": new_len})
    ctx.subs.append((g.name, {"stream": st.stream, IMAGE: n_keep}))
    return g


def _keys(gm, block: AttentionBlock, k: fx.Node, before: fx.Node) -> fx.Node:
    """Keys as [..., L, D]: an unfused attention multiplies by Kᵀ, so undo the transpose."""
    if block.fused:
        return k
    with gm.graph.inserting_before(before):
        kt = _call(gm.graph, aten.transpose.int, (k, -1, -2))
        kt.meta["graphred_side"] = True
    return kt


def _merge(ctx: _Ctx, block: AttentionBlock, stream: int, point: fx.Node, ratio: float, modality: str,
           step_name: str, proportional: bool = False) -> fx.Node | None:
    gm, graph = ctx.gm, ctx.gm.graph
    st = ctx.state(stream)
    ctx.check_order(stream, point, step_name)
    n_mod = ctx.counts[st.stream][modality]
    # at most what bipartite matching can merge: half the unprotected candidates, less protected A slots
    st_info = ctx.prov.streams[st.stream]
    n_special = int(st_info.special.sum()) if st_info.special is not None and modality == IMAGE else 0
    r = min(round(ratio * n_mod), (n_mod - n_special) // 2 - n_special)
    if r <= 0:
        return None
    k = _node(gm, block.key)
    mask = _mask_of(gm, block)
    nxt = _after(gm, [point, k, mask, st.abs_index, st.sizes]).next
    k = _keys(gm, block, k, nxt)
    with graph.inserting_before(nxt):
        codes = ctx.codes(stream, nxt)
    with graph.inserting_before(nxt):
        # head mean first (the gathers below then move H times fewer elements)
        metric = _call(graph, aten.mean.dim, (k, [1]))  # [B, L, D]
        # this layer's keys were computed before the reductions made at this layer: follow them
        for idx in ctx.layer_chain:
            metric = _call(graph, gr.gather_tokens.default, (metric, idx, 1))
        if _shape(metric)[-2] != st.length:
            raise PlanError(f"{step_name}: the keys at {block.module_path} hold {_shape(metric)[-2]} tokens but the stream "
                            f"holds {st.length} there: list the plan's steps in graph order (vision-tower steps such "
                            "as tome(...) before steps at later layers)")
        B = _shape(metric)[0]
        cand = _call(graph, aten.eq.Scalar, (codes, CODE[modality]))
        if _shape(cand)[0] != B:
            cand = _call(graph, aten.expand.default, (cand, [B, st.length]))
        protected = ctx.special(stream, nxt)
        if modality == TEXT:
            valid = emit_valid(graph, mask, _shape(mask)[-1] if mask is not None else st.length, B) if mask is not None else None
            if valid is not None and _shape(valid)[-1] == st.length:
                invalid = _call(graph, aten.logical_not.default, (valid,))
                protected = invalid if protected is None else _call(graph, aten.logical_or.default, (protected, invalid))
            # the first text token of each sample is a class token (ToMe protects class tokens)
            rank = _call(graph, aten.cumsum.default, (cand, 1))
            first = _call(graph, aten.logical_and.default, (cand, _call(graph, aten.eq.Scalar, (rank, 1))))
            protected = first if protected is None else _call(graph, aten.logical_or.default, (protected, first))
            # only the first token of a leading text run stays fixed now; the end moves
            st.kept_prefix = min(st.kept_prefix, 1)
            st.kept_suffix = 0
        if protected is not None and _shape(protected)[0] != B:
            protected = _call(graph, aten.expand.default, (protected, [B, st.length]))
        if st.sizes is None:
            sizes = _call(graph, aten.ones.default, ([B, st.length],), {"dtype": torch.float32, "device": graph_device(graph.owning_module)})
        else:
            sizes = st.sizes
        match = _call(graph, gr.bipartite_match.default, (metric, cand, r, protected))
        keep = _call(graph, __import__("operator").getitem, (match, 0))
        src = _call(graph, __import__("operator").getitem, (match, 1))
        dst = _call(graph, __import__("operator").getitem, (match, 2))
    for n in (codes, metric, cand, match, keep, src, dst, sizes):
        n.meta["graphred_side"] = True

    merged = {}

    def transform(x: fx.Node) -> fx.Node:
        out = _call(graph, gr.merge_tokens.default, (x, sizes, src, dst))
        x2 = _call(graph, __import__("operator").getitem, (out, 0))
        merged["sizes"] = _call(graph, __import__("operator").getitem, (out, 1))
        return x2

    with graph.inserting_before(nxt):
        pass
    dim = point.args[2] if point.target is gr.gather_tokens.default else None
    g = reduce_stream(gm, ctx.prov, st, point, keep, st.length - r, transform=transform,
                      pass_name=f"{step_name} at {block.module_path}", dim=dim, inputs_ready=_after(gm, [src, dst, sizes]))
    with graph.inserting_before(_after(gm, [g, merged["sizes"]]).next):
        st.sizes = _call(graph, gr.gather_tokens.default, (merged["sizes"], keep, 1))
        st.sizes.meta["graphred_side"] = True
    ctx.layer_chain.append(keep)
    ctx.last_point[st.stream] = g
    ctx.size_marks.setdefault(st.stream, []).append((g, st.sizes))
    if proportional:
        ctx.proportional.add(st.stream)
    ctx.counts[st.stream][modality] = n_mod - r
    ctx.log.append({"step": step_name, "op": f"merge_{modality}", "block": block.module_path,
                    f"{modality}_before": n_mod, f"{modality}_after": n_mod - r, "length_after": st.length})
    ctx.subs.append((g.name, {"stream": st.stream, modality: n_mod - r}))
    return g


def _cross_modal_layers(blocks: list[AttentionBlock]) -> tuple[str, list[AttentionBlock]]:
    cm = [b for b in blocks if b.kind in (CROSS_MODAL_SELF, CROSS_ATTENTION)]
    if not cm:
        return "", []
    by_stack: dict[str, list[AttentionBlock]] = {}
    for b in cm:
        by_stack.setdefault(b.stack, []).append(b)
    stack = max(by_stack, key=lambda s: len(by_stack[s]))
    return stack, by_stack[stack]


def _apply_pumer(ctx: _Ctx, step: PumerStep) -> None:
    stack, blocks = _cross_modal_layers(ctx.blocks)
    if not blocks:
        raise PlanError(
            f"pumer: {ctx.program.model_class} has no cross-modal attention block (image and text never meet "
            "inside attention), so text-informed pruning has nowhere to apply. Use graphred.plans.tome(...) to "
            "merge tokens inside the vision tower instead.")
    available = [b.layer_index for b in blocks]
    default = [a for a in available if a >= 1] or available  # scores need one cross-modal layer of context
    if all(b.kind == CROSS_ATTENTION for b in blocks) and len(available) > 1:
        # cross-attention reads the reduced image stream as keys/values: a reduction saves in the layers after
        # the one that scores it, so the last layer saves nothing (its scoring costs more than it removes)
        default = available[:-1]
    chosen = select_layers(step.layers, available, default=None) if step.layers is not None else default
    missing = [l for l in chosen if l not in available]
    if missing:
        raise PlanError(f"pumer: layers {missing} are not cross-modal layers of {stack}; it has cross-modal layers {available}")
    causal = any(b.causal for b in blocks)
    if any(step.merge_text) and causal:
        raise PlanError("pumer: merge_text is not defined for a causal decoder (text tokens, their order and logits are "
                        "kept); set merge_text=0")
    by_layer: dict[int, AttentionBlock] = {}
    for b in blocks:  # per layer, the block where text queries meet image keys (text-informed scoring)
        fits = b.kind == CROSS_MODAL_SELF or (TEXT in b.query_modalities and IMAGE in b.key_modalities)
        if fits and b.layer_index not in by_layer:
            by_layer[b.layer_index] = b
    for i, layer in enumerate(chosen):
        ctx.layer_chain = []
        if layer not in by_layer:
            raise PlanError(f"pumer: layer {layer} of {stack} has no attention where text queries meet image keys")
        b = by_layer[layer]
        p, m, mt = step.ratio_at("prune", i), step.ratio_at("merge", i), step.ratio_at("merge_text", i)
        stream = b.query_stream if b.kind == CROSS_MODAL_SELF else b.key_stream
        if stream is None:
            raise PlanError(f"pumer: the token axis of {b.module_path} is unknown (see the analysis report's unknown ops)")
        point = residual_after(ctx.gm, ctx.prov, b, stream) if b.kind == CROSS_MODAL_SELF else key_source(ctx.gm, ctx.prov, b, stream)
        g = _prune(ctx, b, stream, point, "text", ratio=p, step_name="pumer" if step.scorer == "text" else f"prune[{step.scorer}]",
                   scorer=step.scorer, seed=step.seed, renumber=step.renumber)
        if g is not None:
            point = g
            ctx.layer_chain.append(g.args[1])
        g2 = _merge(ctx, b, stream, point, m, IMAGE, "pumer", step.proportional) if m > 0 else None
        if g2 is not None:
            point = g2
        if mt > 0:
            _merge(ctx, b, stream, point, mt, TEXT, "pumer", step.proportional)


def _apply_fastv(ctx: _Ctx, step: FastVStep) -> None:
    stack, blocks = _cross_modal_layers(ctx.blocks)
    decoder = [b for b in blocks if b.kind == CROSS_MODAL_SELF]
    if not decoder:
        raise PlanError(f"fastv: {ctx.program.model_class} has no decoder layer holding image and text tokens together")
    if not all(b.causal for b in decoder):
        raise PlanError(
            f"fastv: the cross-modal layers of {stack} are not causal (their attention masks let earlier tokens see "
            "later ones), and FastV scores with the last token of a causal decoder. Use graphred.plans.pumer(...).")
    by_layer = {b.layer_index: b for b in decoder}
    layers = sorted(by_layer)
    if step.layer not in by_layer or step.layer - 1 not in by_layer:
        raise PlanError(f"fastv: layer={step.layer} needs decoder layers {step.layer - 1} and {step.layer}; "
                        f"{stack} has cross-modal layers {layers}. Choose 1 <= layer <= {layers[-1]}.")
    score_block = by_layer[step.layer - 1]
    stream = score_block.query_stream
    point = layer_input(ctx.gm, ctx.prov, stack, step.layer, stream)
    _prune(ctx, score_block, stream, point, "last", keep=step.keep, step_name="fastv", renumber=step.renumber)


def _apply_tome(ctx: _Ctx, step: ToMeStep) -> None:
    towers: dict[str, list[AttentionBlock]] = {}
    for b in ctx.blocks:
        if b.kind == UNIMODAL_SELF and b.query_modalities == frozenset({IMAGE}) and b.query_stream is not None:
            towers.setdefault(b.stack, []).append(b)
    if not towers:
        raise PlanError("tome: no image-only attention stack (vision tower) was found in the graph")
    for stack, blocks in towers.items():
        by_layer = {}
        for b in blocks:
            by_layer.setdefault(b.layer_index, b)
        chosen = select_layers(step.layers, sorted(by_layer))
        for layer in chosen:
            b = by_layer[layer]
            point = residual_after(ctx.gm, ctx.prov, b, b.query_stream)
            st = ctx.state(b.query_stream)
            ctx.layer_chain = []
            _merge(ctx, b, b.query_stream, point, step.r / max(ctx.counts[st.stream][IMAGE], 1), IMAGE, "tome",
                   step.proportional)


def apply_plan(program: Program, plan: Plan, *, value_inputs: tuple | None = None) -> AppliedPlan:
    """Apply ``plan`` to a copy of ``program``'s graph. For a program captured on the meta device,
    ``value_inputs=(args, kwargs)`` gives CPU copies of the inputs from which the token layout is read.

    >>> import graphred
    >>> model, inputs = graphred.zoo.load(graphred.zoo.TEST_NAMES[0])  # a decoder VLM
    >>> applied = apply_plan(graphred.capture(model, **inputs), graphred.plans.fastv(layer=1, keep=0.5))
    >>> applied.steps[0]["op"]
    'prune'
    """
    if not isinstance(plan, Plan):
        raise PlanError(f"expected a graphred.plans.Plan, got {type(plan).__name__}: build one with graphred.plans.pumer(...)")
    gm = copy_graph_module(program.graph_module)
    record_original_shapes(gm)
    prov = TokenProvenance(gm, program.example_inputs(), value_inputs=value_inputs)
    blocks = detect_blocks(gm, prov)
    ctx = _Ctx(gm, prov, blocks, program)
    for step in plan.steps:
        if step.is_identity:
            continue
        apply_step = {PumerStep: _apply_pumer, FastVStep: _apply_fastv, ToMeStep: _apply_tome}.get(type(step))
        if apply_step is None:
            raise PlanError(f"unknown plan step {step!r}")
        try:
            apply_step(ctx, step)
        except Exception as e:
            missing = meta_inputs(*program.example_inputs()) if value_inputs is None else []
            if missing:  # the real reason: the layout could not be read, not the step's symptom of it
                raise PlanError(f"{meta_layout_message(program.model_class, missing, step.spec())} (Without the values the "
                                f"step reported: {str(e).splitlines()[0] if str(e) else type(e).__name__})") from e
            if isinstance(e, PlanError):
                raise
            # a rewrite that cannot be done is the plan's error, said in its terms
            hint = {
                ToMeStep: "ToMe applies to vision towers whose tokens stay in their own stream (dual encoders, "
                          "cross-attention models); for a decoder VLM use pumer(...) or fastv(...).",
            }.get(type(step), "Try other layers or ratios, or report the node named above.")
            raise PlanError(f"{step.spec()}: the rewrite of {program.model_class} failed: {type(e).__name__}: "
                            f"{str(e).splitlines()[0] if str(e) else ''}. {hint}") from e
    _proportional_attention(ctx)
    positions = False
    if ctx.states and not plan.is_identity:
        positions = _add_positions_output(gm, ctx)
    _dedupe_inserted(gm, keep={name for name, _ in ctx.subs})
    gm.graph.eliminate_dead_code()
    gm.graph.lint()
    gm.recompile()
    return AppliedPlan(gm, plan, ctx.log, _subs_at(gm, ctx, prov), positions, prov, blocks)


def _dedupe_inserted(gm: fx.GraphModule, keep: set[str]) -> int:
    """Common-subexpression elimination over the nodes the plan inserted: separate bookkeeping paths
    (kept original positions, composed gather indices, modality codes) often compute the same index
    twice. Only graphred's ops and side computations take part; all are pure. Returns the count removed."""
    seen: dict = {}
    removed = 0

    def norm(v):
        if isinstance(v, (list, tuple)):
            return tuple(norm(x) for x in v)
        if isinstance(v, torch.dtype | torch.device):
            return str(v)
        return v

    for n in list(gm.graph.nodes):
        if n.op != "call_function" or n.name in keep:
            continue
        ours = str(n.target).startswith("graphred.") or n.meta.get("graphred_side")
        if not ours or n.target in (aten.rand.default, aten.randn.default, aten.empty.memory_format):
            continue
        try:
            key = (n.target, norm(n.args), tuple(sorted((k, norm(v)) for k, v in n.kwargs.items())))
            hash(key)
        except TypeError:
            continue
        first = seen.setdefault(key, n)
        if first is not n:
            n.replace_all_uses_with(first)
            gm.graph.erase_node(n)
            removed += 1
    return removed


def _proportional_attention(ctx: _Ctx) -> None:
    """ToMe's proportional attention: every attention after a merge adds ``log(size)`` of each key to
    its logits, so a merged token weighs as the tokens it stands for. With SDPA this is an additive
    float mask; an unfused attention gets the bias before its softmax."""
    gm, graph = ctx.gm, ctx.gm.graph
    order = {n: i for i, n in enumerate(graph.nodes)}
    for sid in ctx.proportional:
        marks = sorted(ctx.size_marks.get(sid, []), key=lambda m: order[m[0]])
        for b in ctx.blocks:
            if b.key_stream is None or ctx.prov.find(b.key_stream) != sid:
                continue
            att = _node(gm, b.node)
            live = [m for m in marks if order[m[0]] < order[att]]
            if not live:
                continue
            sizes = live[-1][1]
            with graph.inserting_before(att):
                bias = _call(graph, aten.log.default, (sizes,))
                B, L = _shape(bias)
                bias = _call(graph, aten.view.default, (bias, [B, 1, 1, L]))
                if b.fused:
                    if att.kwargs.get("is_causal"):
                        raise PlanError(f"proportional attention at {b.module_path}: the attention uses is_causal=True, "
                                        "which takes no additive mask; use proportional=False")
                    mask = att.args[3] if len(att.args) > 3 else att.kwargs.get("attn_mask")
                    q = att.args[0]
                    if isinstance(mask, fx.Node):
                        if mask.meta["val"].dtype == torch.bool:
                            zeros = _call(graph, aten.zeros_like.default, (mask,), {"dtype": q.meta["val"].dtype})
                            mask = _call(graph, aten.masked_fill.Scalar, (zeros, _call(graph, aten.logical_not.default, (mask,)), float("-inf")))
                        new_mask = _call(graph, aten.add.Tensor, (mask, bias))
                    else:
                        new_mask = _call(graph, aten._to_copy.default, (bias,), {"dtype": q.meta["val"].dtype})
                    if len(att.args) > 3:
                        args = list(att.args)
                        args[3] = new_mask
                        att.args = tuple(args)
                    else:
                        att.kwargs = {**att.kwargs, "attn_mask": new_mask}
                else:
                    scores = att.args[0]
                    sshape = _shape(scores)
                    if len(sshape) == 3:  # heads folded into the batch: [B*H, Lq, Lk]
                        heads = sshape[0] // B
                        bias = _call(graph, aten.expand.default, (bias, [B, heads, 1, L]))
                        bias = _call(graph, aten.reshape.default, (bias, [B * heads, 1, L]))
                    biased = _call(graph, aten.add.Tensor, (scores, bias))
                    att.args = (biased,) + tuple(att.args[1:])


def _add_positions_output(gm: fx.GraphModule, ctx: _Ctx) -> bool:
    """Append the kept original positions of the model's output stream to the graph outputs."""
    out = next(n for n in gm.graph.nodes if n.op == "output")
    flat = list(out.args[0]) if isinstance(out.args[0], (list, tuple)) else [out.args[0]]
    idx = None
    for sid, st in ctx.states.items():
        if st.abs_index is not None:
            idx = st.abs_index
    if idx is None:
        return False
    cg = gm.graph._codegen
    info = getattr(cg, "pytree_info", None)
    if info is None or info.out_spec is None:
        return False
    out.args = (tuple(flat) + (idx,),)
    new_spec = pytree.TreeSpec(tuple, None, [info.out_spec, pytree.LeafSpec()])
    cg.pytree_info = info._replace(out_spec=new_spec)
    return True


def _subs_at(gm, ctx: _Ctx, prov: TokenProvenance) -> dict[str, dict]:
    """For every original node, the symbol substitution in effect where it runs."""
    out: dict[str, dict] = {}
    current: dict = {}
    marks = {name: s for name, s in ctx.subs}
    for n in gm.graph.nodes:
        if n.name in marks:
            s = marks[n.name]
            st = prov.streams[s["stream"]]
            for mod, val in s.items():
                if mod == "stream":
                    continue
                sym = st.symbols.get(mod)
                if sym is not None:
                    current[sym] = sympy.Integer(val - st.offsets.get(mod, 0))
        if n.name in ctx.original_names and current:
            out[n.name] = dict(current)
    return out
