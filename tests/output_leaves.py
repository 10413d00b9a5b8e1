"""A test helper: every tensor of a model output, by path (``out.logits``, ``out.past_key_values[0][1]``)."""
from __future__ import annotations

from collections.abc import Mapping

import torch


def tensor_leaves(x, path: str = "out"):
    """(path, tensor) for every tensor leaf of a model output."""
    if isinstance(x, torch.Tensor):
        yield path, x
    elif isinstance(x, Mapping):
        for k in x.keys():
            yield from tensor_leaves(x[k], f"{path}.{k}")
    elif isinstance(x, (tuple, list)):
        for i, v in enumerate(x):
            yield from tensor_leaves(v, f"{path}[{i}]")
