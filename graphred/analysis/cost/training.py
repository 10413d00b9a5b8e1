"""Training-step FLOPs (forward + backward) from an :class:`~graphred.analysis.cost.estimate.Estimate`.

The backward pass of a matrix product ``Y = X W`` costs two products of the same size (``dX`` and
``dW``); of an elementwise or reduction op, about one forward's worth. So per group of nodes:

* a group whose weights train: ``forward + 2 * matmul + 1 * other``;
* a group that only passes gradients on (the registers train, the weights do not): ``forward +
  1 * matmul + 1 * other`` (input gradients only);
* a group before the first trained tensor: ``forward`` (no gradient reaches it).

Which groups are which follows ``what`` (see :func:`graphred.train`): with ``"registers"`` the
gradient flows from the loss back to where the registers enter (the decoder's layers and what follows
them); with ``"model"``/``"registers+model"`` every group trains. The ratio of two such step costs
(a plan's reduced graph against the unreduced one) predicts the training-time saving.

>>> import graphred
>>> from graphred.analysis.cost.training import training_step_flops
>>> model, inputs = graphred.zoo.load(graphred.zoo.TEST_NAMES[0])  # a decoder VLM
>>> est = graphred.estimate(graphred.capture(model, **inputs), graphred.plans.victor(registers=2, layer=1))
>>> step = training_step_flops(est, what="registers+model")
>>> step["after"] < step["before"]
True
"""
from __future__ import annotations

from typing import Any

__all__ = ["training_step_flops", "group_step_flops"]

_WHAT = ("registers", "registers+model", "model")


def group_step_flops(flops: int, flops_matmul: int, trains_weights: bool, gets_gradient: bool) -> int:
    """Forward + backward FLOPs of one group (see the module doc)."""
    other = max(int(flops) - int(flops_matmul), 0)
    if not gets_gradient:
        return int(flops)
    return int(flops) + (2 if trains_weights else 1) * int(flops_matmul) + other


def _decoder_stack(est) -> str | None:
    stacks = {}
    for g in est.groups:
        if g.kind == "layer" and any(b.kind == "cross_modal_self" for b in g.blocks):
            stacks[g.stack] = stacks.get(g.stack, 0) + 1
    return max(stacks, key=stacks.get) if stacks else None


def _step(est, what: str) -> int:
    groups = list(est.groups)
    if what != "registers":
        return sum(group_step_flops(g.flops, g.flops_matmul, True, True) for g in groups)
    stack = _decoder_stack(est)
    # groups are in graph order: the registers enter where the decoder's first layer begins
    first = next((i for i, g in enumerate(groups) if g.stack == stack and g.kind == "layer"), len(groups))
    return sum(group_step_flops(g.flops, g.flops_matmul, False, i >= first) for i, g in enumerate(groups))


def training_step_flops(est, what: str = "registers+model") -> dict[str, Any]:
    """``{"before", "after", "ratio", "what"}``: training-step FLOPs of the unreduced and the reduced
    model (``after`` is None for an estimate without a plan); ``ratio = after / before``."""
    if what not in _WHAT:
        raise ValueError(f"what={what!r}: choose from {', '.join(_WHAT)}")
    before = _step(est, what)
    after = _step(est.after, what) if getattr(est, "after", None) is not None else None
    return {"what": what, "before": before, "after": after,
            "ratio": (after / before) if after is not None and before else None}
