"""Cost model: per-op FLOP/byte formulas over (symbolic) shapes, and the FLOP oracle they are checked against.

* :mod:`.registry` -- :data:`REGISTRY` of :class:`OpCost` formulas, :func:`count_graph` over an FX graph;
* :mod:`.oracle` -- :func:`count_flops_executed`, torch's ``FlopCounterMode`` with attention counted on CPU.

>>> import torch
>>> from graphred.analysis.cost import count_graph, count_flops_executed
>>> lin, x = torch.nn.Linear(8, 4), torch.randn(2, 8)
>>> gm = torch.export.export(lin, (x,)).module()
>>> int(count_graph(gm, kind="matmul").flops) == count_flops_executed(lin, x)
True
"""
from __future__ import annotations

from .oracle import count_flops_executed, flop_counter_mode, flop_counts_executed, install_cpu_sdpa_flop_formula
from .registry import (
    ELEMENTWISE_FLOPS,
    KINDS,
    KNOWN_ZERO_COST,
    MODES,
    REGISTRY,
    SOFTMAX_FLOPS,
    ZERO_COST,
    Call,
    CostTotals,
    NodeCost,
    OpCost,
    Uncounted,
    causal_pairs,
    count_graph,
    dtype_bytes,
    lookup,
    node_cost,
    numel,
    op_key,
    register_cost,
    to_expr,
)

__all__ = [
    "ELEMENTWISE_FLOPS", "KINDS", "KNOWN_ZERO_COST", "MODES", "REGISTRY", "SOFTMAX_FLOPS", "ZERO_COST",
    "Call", "CostTotals", "NodeCost", "OpCost", "Uncounted", "causal_pairs", "count_graph", "dtype_bytes",
    "lookup", "node_cost", "numel", "op_key", "register_cost", "to_expr",
    "count_flops_executed", "flop_counter_mode", "flop_counts_executed", "install_cpu_sdpa_flop_formula",
]
