"""ToMe: bipartite soft matching inside image-only attention stacks (vision towers), ``r`` merges per layer."""
from __future__ import annotations

from ..analysis.blocks import UNIMODAL_SELF, AttentionBlock
from ..analysis.provenance import IMAGE, REGISTER
from ..errors import PlanError
from ..fx_utils import module_path, node_shape
from ..plans import ToMeStep
from .prune_merge import merge_stream
from .pumer import selected_layers
from .reduce import residual_after
from .rewrite_state import RewriteState, StepPass


class ToMePass(StepPass):
    """One :class:`~graphred.plans.ToMeStep`: after the attention residual of each chosen layer of every
    image-only attention stack, merge ``r`` image tokens (an ``r`` above what bipartite matching can
    merge there is capped, with a warning that states the cap). ``variant="reference"`` (the default)
    leaves the tokens in ToMe's output order after each merge, so the next layer splits that order.

    >>> import graphred
    >>> from graphred.passes.pipeline import lower
    >>> lower(graphred.plans.tome(r=4))[0]
    ToMePass(tome:r=4)
    """

    hint = ("ToMe merges tokens inside a vision tower whose tokens stay in their own stream or are scattered into a "
            "decoder's placeholders; try other layers or another r, or report the node named above.")

    def apply(self, gm, rs: RewriteState) -> None:
        step: ToMeStep = self.step
        towers: dict[str, list[AttentionBlock]] = {}
        for b in rs.blocks:
            # image tokens, and maybe register tokens (learned or padding slots, never merged) beside them
            if b.kind == UNIMODAL_SELF and IMAGE in b.query_modalities and b.query_modalities <= {IMAGE, REGISTER} \
                    and b.query_stream is not None:
                towers.setdefault(b.stack, []).append(b)
        if not towers:
            raise PlanError("tome: no image-only attention stack (vision tower) was found in the graph")
        for stack, blocks in towers.items():
            by_layer: dict[int, AttentionBlock] = {}
            for b in blocks:
                by_layer.setdefault(b.layer_index, b)
            for layer in selected_layers("tome", step.layers, sorted(by_layer), "layers", f"the vision tower {stack}"):
                b = by_layer[layer]
                point = residual_after(gm, rs.prov, b, b.query_stream)
                shape = node_shape(point)
                if shape is not None and any(s < 0 for s in shape):
                    raise PlanError(
                        f"tome: the tokens of the vision tower {stack} at node {point.name} (module "
                        f"{module_path(point) or '<top>'}) have a size only known at run time ({list(shape)}, -1 = "
                        "data-dependent: the images fed to the tower are chosen by a run-time mask, e.g. padding "
                        "images dropped); ToMe merges tokens where the number of images follows from the input "
                        "shapes. Reduce in the decoder instead (victor, fastv or pumer).",
                        node=point.name, module_path=module_path(point))
                st = rs.state(b.query_stream)
                rs.layer_chain = []
                merge_stream(rs, b, b.query_stream, point, step.r / max(rs.counts[st.stream][IMAGE], 1), IMAGE,
                             "tome", step.proportional, warn_over_cap=True, reorder=step.variant == "reference")
