"""graphred custom ops (``torch.ops.graphred.*``). Importing this package registers them.

See :mod:`graphred.ops.tokens` for the ops, their schemas and their semantics.
"""
from __future__ import annotations

from .tokens import (
    attention_scores,
    bipartite_match,
    gather_tokens,
    merge_tokens,
    scored_rows,
    select_tokens,
    select_tokens_padded,
    size_bias,
)
from .registers import register_layout, register_layout_ragged, shrink_image_runs

__all__ = [
    "attention_scores",
    "bipartite_match",
    "gather_tokens",
    "merge_tokens",
    "scored_rows",
    "select_tokens",
    "select_tokens_padded",
    "size_bias",
    "register_layout",
    "register_layout_ragged",
    "shrink_image_runs",
]
