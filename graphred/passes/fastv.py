"""FastV: after decoder layer ``layer - 1``, keep the image tokens the last query attends to most."""
from __future__ import annotations

from ..analysis.blocks import CROSS_MODAL_SELF
from ..analysis.provenance import CODE, IMAGE
from ..errors import PlanError
from ..plans import FastVStep
from .prune_merge import cross_modal_layers, prune_stream
from .reduce import layer_input, token_streams
from .rewrite_state import RewriteState, StepPass


class FastVPass(StepPass):
    """One :class:`~graphred.plans.FastVStep`: score image tokens with layer ``layer - 1``'s attention from
    the last valid query and cut the sequence at the input of layer ``layer``. Needs a decoder holding image
    and text tokens together, causal or prefix-LM / bidirectional over the image (then the sequence must end
    in a text token: the last prompt query); one cut per layer.

    >>> import graphred
    >>> from graphred.passes.pipeline import lower
    >>> lower(graphred.plans.fastv(layer=1, keep=0.5))
    [FastVPass(fastv:layer=1,keep=0.5), ProportionalAttentionPass, FillerMaskPass, PositionsOutputPass, CSEPass]
    """

    def apply(self, gm, rs: RewriteState) -> None:
        step: FastVStep = self.step
        stack, decoder = cross_modal_layers([b for b in rs.blocks if b.kind == CROSS_MODAL_SELF])
        if not decoder:
            raise PlanError(f"fastv: {rs.model} has no decoder layer holding image and text tokens together")
        if not all(b.causal for b in decoder) and _last_position_holds_image(rs, decoder[0].query_stream):
            # a prefix-LM or bidirectional-image decoder still ends its prompt with a text token, whose attention
            # FastV's score is; a sequence ending in image tokens (an encoder's [text | image]) has no such query
            raise PlanError(
                f"fastv: the cross-modal layers of {stack} are not causal (their attention masks let earlier tokens "
                "see later ones) and the sequence ends in image tokens, so there is no last prompt (text) query to "
                "score with. Use graphred.plans.pumer(...).")
        by_layer = {b.layer_index: b for b in decoder}
        layers = sorted(by_layer)
        before = [l for l in layers if l < step.layer]  # the attention layer before (layers without attention
        if not before:  # in between, e.g. convolutions, are skipped over)
            raise PlanError(f"fastv: layer={step.layer} needs an attention layer of {stack} before it to score with; "
                            f"its cross-modal attention layers are {layers} (layers without attention, e.g. "
                            f"convolutions, have no scores). Choose a layer after {layers[0]}.")
        where = (stack, step.layer)
        if where in rs.cuts:
            raise PlanError(f"fastv: two FastV cuts at one layer ({step.layer} of {stack}: {rs.cuts[where]} and "
                            f"{step.spec()}) are not supported; give one fastv(layer={step.layer}, keep=k) with the "
                            "product of the keep fractions, or cut at another layer")
        score_block = by_layer[before[-1]]
        stream = score_block.query_stream
        # a layer without attention (a convolution): its input is found by the layer's module path
        try:
            point = layer_input(gm, rs.prov, stack, step.layer, stream, block=by_layer.get(step.layer))
        except PlanError as e:
            if step.layer in by_layer:
                raise
            raise PlanError(f"fastv: layer={step.layer} is neither an attention layer of {stack} (those are {layers}) "
                            f"nor a layer whose input could be found ({e}). Choose a layer after {layers[0]} that the "
                            "decoder has.") from e
        here = token_streams(rs.prov, point, rs.prov.stream(stream).length)
        if here and rs.prov.find(stream) not in here:
            # the layer's input is another stream of the same positions (a write between the layers,
            # e.g. features added to the image positions): reduce that one
            stream = here[0]
        if prune_stream(rs, score_block, stream, point, "last", keep=step.keep, step_name="fastv",
                        renumber=step.renumber) is not None:
            rs.cuts[where] = step.spec()


def _last_position_holds_image(rs: RewriteState, stream) -> bool:
    """Whether some sample's last position holds an image token (at the example inputs' layout)."""
    if stream is None:
        return True
    codes = rs.prov.streams[rs.prov.find(stream)].codes
    return codes is None or bool((codes[:, -1] == CODE[IMAGE]).any())
