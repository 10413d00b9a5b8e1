"""PuMer (and the prune baselines): at each chosen cross-modal layer, text-informed pruning of image
tokens after the attention residual, then modality-aware merging of image (and text) tokens.

``pumer(prune=p, merge=m)`` lowers to one :class:`PumerPass`; ``prune(scorer="norm"|"random")`` is
the same pass with a text-agnostic scorer and no merging.
"""
from __future__ import annotations

from ..analysis.blocks import CROSS_ATTENTION, CROSS_MODAL_SELF, AttentionBlock
from ..analysis.provenance import IMAGE, TEXT
from ..errors import PlanError
from ..plans import PumerStep, select_layers
from .prune_merge import cross_modal_layers, merge_stream, prune_stream
from .reduce import key_source, residual_after
from .rewrite_state import RewriteState, StepPass


def selected_layers(step_name: str, selector, available: list[int], what: str, holder: str, default=None) -> list[int]:
    """Resolve a layer selector against ``available`` layer indices; a selection that names layers the
    model lacks, or selects none, is a :class:`PlanError` naming the layers there are."""
    if isinstance(selector, int) and not isinstance(selector, bool):
        selector = (selector,)
    chosen = select_layers(selector, available, default=default)
    missing = [l for l in chosen if l not in available]
    if missing:
        raise PlanError(f"{step_name}: layers {missing} are not {what} of {holder}; it has {len(available)} "
                        f"{what} {available}")
    if not chosen:
        raise PlanError(f"{step_name}: layers={selector!r} selects none of the {len(available)} {what} "
                        f"{available} of {holder}, so the step would do nothing; choose among those layers")
    return chosen


def _stack_summary(blocks: list[AttentionBlock]) -> list[str]:
    """Per stack with cross-modal attention: ``"<stack>: <query> queries over <key> keys (layers [..])"``."""
    seen: dict[tuple, list[int]] = {}
    for b in blocks:
        if b.kind in (CROSS_MODAL_SELF, CROSS_ATTENTION):
            key = (b.stack, "+".join(sorted(b.query_modalities)) or "?", "+".join(sorted(b.key_modalities)) or "?")
            seen.setdefault(key, [])
            if b.layer_index not in seen[key]:
                seen[key].append(b.layer_index)
    return [f"{s}: {q} queries over {k} keys (layers {ls})" for (s, q, k), ls in seen.items()]


class PumerPass(StepPass):
    """One :class:`~graphred.plans.PumerStep`: prune (text-informed, or a baseline scorer) and merge at
    each chosen cross-modal layer. Raises :class:`PlanError` if the model has no attention where text
    queries meet image keys, or the layers are not cross-modal layers.

    >>> import graphred
    >>> from graphred.passes.pipeline import lower
    >>> lower(graphred.plans.pumer(prune=0.5, merge=0.2))[0]
    PumerPass(pumer:prune=0.5,merge=0.2)
    """

    def apply(self, gm, rs: RewriteState) -> None:
        step: PumerStep = self.step
        stack, blocks = cross_modal_layers(rs.blocks)
        if not blocks:
            raise PlanError(
                f"pumer: {rs.model} has no cross-modal attention block (image and text never meet "
                "inside attention), so text-informed pruning has nowhere to apply. Use graphred.plans.tome(...) to "
                "merge tokens inside the vision tower instead.")
        available = [b.layer_index for b in blocks]
        by_layer: dict[int, AttentionBlock] = {}
        for b in blocks:  # per layer, the block where text queries meet image keys (text-informed scoring)
            fits = b.kind == CROSS_MODAL_SELF or (TEXT in b.query_modalities and IMAGE in b.key_modalities)
            if fits and b.layer_index not in by_layer:
                by_layer[b.layer_index] = b
        # the default: the layers where text queries meet image keys (a layer whose only cross-modal attention is
        # another kind, e.g. learned queries reading the tokens, has nothing to score with), from the second on
        if not by_layer and step.layers is None:
            raise PlanError(
                f"pumer: no attention in {rs.model} has text queries over image keys (or one sequence holding both), "
                "so text-informed scores are defined nowhere; its cross-modal attention is "
                + "; ".join(_stack_summary(rs.blocks)) + ". Use graphred.plans.tome(...) to merge tokens inside the "
                "vision tower instead")
        meeting = [a for a in dict.fromkeys(available) if a in by_layer] or available
        default = [a for a in meeting if a >= 1] or meeting  # scores need one cross-modal layer of context
        if all(b.kind == CROSS_ATTENTION for b in blocks) and len(meeting) > 1:
            # cross-attention reads the reduced image stream as keys/values: a reduction saves in the layers after
            # the one that scores it, so the last layer saves nothing (its scoring costs more than it removes)
            default = meeting[:-1]
        if step.layers is not None:
            chosen = selected_layers("pumer", step.layers, available, "cross-modal layers", stack)
        else:
            chosen = default
        causal = any(b.causal for b in blocks)
        if any(step.merge_text) and causal:
            raise PlanError("pumer: merge_text is not defined for a causal decoder (text tokens, their order and logits "
                            "are kept); set merge_text=0")
        for i, layer in enumerate(chosen):
            rs.layer_chain = []
            if layer not in by_layer:
                raise PlanError(f"pumer: layer {layer} of {stack} has no attention where text queries meet image keys")
            b = by_layer[layer]
            p, m, mt = step.ratio_at("prune", i), step.ratio_at("merge", i), step.ratio_at("merge_text", i)
            stream = b.query_stream if b.kind == CROSS_MODAL_SELF else b.key_stream
            if stream is None:
                raise PlanError(f"pumer: the token axis of {b.module_path} is unknown (see the analysis report's "
                                "unknown ops)")
            point = (residual_after(gm, rs.prov, b, stream) if b.kind == CROSS_MODAL_SELF
                     else key_source(gm, rs.prov, b, stream))
            name = "pumer" if step.scorer == "text" else f"prune[{step.scorer}]"
            ref = step.variant == "reference" and step.scorer == "text"
            sid = rs.state(stream, ragged=True, step_name=name).stream
            n_img = list(rs.ragged[sid][IMAGE]) if sid in rs.ragged else rs.counts[sid][IMAGE]
            scored = {} if ref and m > 0 else None  # the reference splits the kept tokens in score order
            g = prune_stream(rs, b, stream, point, "text", ratio=p, step_name=name, scorer=step.scorer,
                             seed=step.seed, renumber=step.renumber, scores_out=scored,
                             padded_queries=step.padded_queries)
            if g is not None:
                point = g
                rs.layer_chain.append(g.args[1])
            g2 = merge_stream(rs, b, stream, point, m, IMAGE, "pumer", step.proportional,
                              scores=scored["scores"] if scored else None, count_base=n_img if ref else None,
                              carry_sizes=not ref) if m > 0 else None
            if g2 is not None:
                point = g2
            if mt > 0:
                merge_stream(rs, b, stream, point, mt, TEXT, "pumer", step.proportional, carry_sizes=not ref)
