"""``graphred.estimate(program, plan=None) -> Estimate``: FLOPs, weight bytes, peak activation memory and
KV cache of a captured model, before and after a reduction plan, as numbers and as sympy expressions in
the token symbols (``n_img``, ``n_txt``, ``n_patch``, ``B``, ...). Nothing runs the model.

The code is split by concern; this module is the entry point and re-exports the public names:
:mod:`.shapes` (shapes in the token symbols), :mod:`.counting` (node costs), :mod:`.grouping` (layers,
towers), :mod:`.kv_cache`, :mod:`.report` (the :class:`Estimate`), :mod:`.build` (estimates before and
after a plan, whole models), :mod:`.sweep`.

How the figures are made (``docs/cost-model.md`` has the long form):

* **FLOPs**: every ``call_function`` node of the aten graph is costed by the per-op registry
  (:mod:`graphred.analysis.cost.registry`) from its input and output shapes. ``flops_matmul`` counts what
  ``torch.utils.flop_counter.FlopCounterMode`` counts (matrix products, convolutions, attention kernels;
  2 FLOPs per multiply-add); ``flops`` adds everything else (elementwise, softmax, norms, ...). With the
  symbolic shapes of :class:`~graphred.analysis.provenance.TokenProvenance` the same formulas give
  ``flops_expr``. A node no formula covers is listed in :attr:`Estimate.uncounted`, never counted as 0.
* **Breakdown**: nodes are grouped by layer (the module path of each attention block's layer, e.g.
  ``model.language_model.layers.3``) and, outside layers, by tower (``model.vision_tower (outside
  layers)``) or top-level module (``lm_head``).
* **Weights**: bytes of the parameters/buffers the graph reads (:func:`.memory.weight_bytes`).
* **Peak activation memory**: liveness over the execution order, views sharing their base's storage,
  inputs counted, weights apart (:func:`.memory.activation_memory`).
* **KV cache**: for the self-attention blocks of a generative decoder (a stack whose output reaches a
  head over the input vocabulary), ``K`` and ``V`` as the layer computes them *before* grouped-query
  expansion: ``2 * B * L * H_kv * D * bytes`` per layer.
* **After a plan**: :func:`graphred.passes.apply.apply_plan` gives the reduced graph; its FLOPs are counted
  over that graph (graphred's scoring/selection/merge ops included, by the registry), and the expression is
  every original node's symbolic cost under the substitution in effect where it runs (``subs_at``) plus the
  new ops' cost. Speedup = FLOPs before / FLOPs after.

>>> import graphred
>>> model, inputs = graphred.zoo.load(graphred.zoo.TEST_NAMES[-2])  # a dual encoder
>>> est = graphred.estimate(graphred.capture(model, **inputs))
>>> est.flops_matmul == graphred.analysis.cost.count_flops_executed(model, **inputs)
True
"""

from __future__ import annotations

from .build import apply_plan_fn, estimate, estimate_model
from .grouping import GroupCost
from .kv_cache import KVCache
from .report import Estimate
from .shapes import resolve_unbacked
from .sweep import SweepTable, sweep

__all__ = [
    "Estimate",
    "GroupCost",
    "KVCache",
    "SweepTable",
    "apply_plan_fn",
    "estimate",
    "estimate_model",
    "resolve_unbacked",
    "sweep",
]
