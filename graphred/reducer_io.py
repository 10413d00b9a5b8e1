"""Saving and loading a transformed model's trainable state as safetensors.

The file holds the plan's parameters (``graphred_*``: Victor's registers) and, when the model's
own weights were fine-tuned (:meth:`ReducedModule.own_weights`), those weights too; its metadata
holds the plan text, the model class and the format, so a reload checks it is loading into the
same transform.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from .errors import GraphredError

REDUCER_FORMAT = "graphred-reducer/1"  # the safetensors metadata format of a saved reducer

__all__ = ["save_reducer", "load_reducer", "read_reducer"]


def _state(fast, include_model: bool) -> dict[str, torch.Tensor]:
    out = {f"reducer.{n}": p.detach().contiguous().cpu() for n, p in fast.reducer_parameters().items()}
    if include_model:
        seen = set()
        for n, p in fast.graph_module.named_parameters():
            if n in fast.reducer_parameters() or id(p) in seen:
                continue
            seen.add(id(p))
            out[f"model.{n}"] = p.detach().contiguous().cpu()
    return out


def save_reducer(fast, path: str | os.PathLike, *, include_model: bool | None = None) -> None:
    from safetensors.torch import save_file

    if include_model is None:
        include_model = bool(getattr(fast, "_owns_weights", False))
    tensors = _state(fast, include_model)
    if not tensors:
        raise GraphredError(f"save_reducer: the plan {fast.plan} adds no parameters and the model's weights were not "
                            "fine-tuned, so there is nothing to save; use a plan with parameters (graphred.plans.victor) "
                            "or pass include_model=True")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata={"format": REDUCER_FORMAT, "plan": str(fast.plan),
                                           "model_class": fast.model_class,
                                           "includes_model": "true" if include_model else "false"})


def read_reducer(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """``(tensors, metadata)`` of a saved reducer file."""
    from safetensors import safe_open

    p = Path(path)
    if not p.is_file():
        raise GraphredError(f"load_reducer: no file at {p}; save one with fast.save_reducer(path)")
    try:
        with safe_open(str(p), framework="pt") as f:
            meta = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:
        raise GraphredError(f"load_reducer: {p} is not a safetensors file ({type(e).__name__}: {e})") from e
    if meta.get("format") != REDUCER_FORMAT:
        raise GraphredError(f"load_reducer: {p} is not a graphred reducer file (format {meta.get('format')!r}, "
                            f"expected {REDUCER_FORMAT!r})")
    return tensors, meta


def load_reducer(fast_or_path, path=None, *, model=None, inputs=None, transform=None, module_class=None):
    """See :func:`graphred.load_reducer`; ``transform`` and ``module_class`` are graphred.transform and
    ReducedModule, handed in by the caller (this module does not import them: no import cycle)."""
    from .plans import parse_plan
    from .program import capture

    if isinstance(fast_or_path, module_class):
        if path is None:
            raise GraphredError("load_reducer(fast, path): give the file to load")
        fast = fast_or_path
        tensors, meta = read_reducer(path)
    else:
        path = fast_or_path
        tensors, meta = read_reducer(path)
        if model is None or inputs is None:
            raise GraphredError("load_reducer(path, model=..., inputs=...): give the model the reducer was trained on and "
                                f"example inputs (a dict of its keyword inputs), to capture and transform it with "
                                f"{meta.get('plan')!r}; or load into a transformed module with load_reducer(fast, path)")
        fast = transform(capture(model, **inputs), parse_plan(meta["plan"]))
    if meta.get("plan") != str(fast.plan):
        raise GraphredError(f"load_reducer: {path} was saved for the plan {meta.get('plan')!r}, this module has "
                            f"{str(fast.plan)!r}; transform with the same plan")
    if meta.get("model_class") != fast.model_class:
        raise GraphredError(f"load_reducer: {path} was saved for {meta.get('model_class')}, this module wraps "
                            f"{fast.model_class}")
    if meta.get("includes_model") == "true":
        fast.own_weights()  # the user's model keeps its weights; the loaded ones are this module's
    targets = {f"reducer.{n}": p for n, p in fast.reducer_parameters().items()}
    targets.update({f"model.{n}": p for n, p in fast.graph_module.named_parameters()
                    if f"reducer.{n}" not in targets})
    missing = [k for k in tensors if k not in targets]
    absent = [k for k in targets if k.startswith("reducer.") and k not in tensors]
    if missing or absent:
        raise GraphredError(f"load_reducer: {path} does not match this module: unknown entries {missing[:5]}, "
                            f"missing entries {absent[:5]}")
    with torch.no_grad():
        for k, t in tensors.items():
            p = targets[k]
            if tuple(p.shape) != tuple(t.shape):
                raise GraphredError(f"load_reducer: {k} has shape {tuple(t.shape)} in {path}, {tuple(p.shape)} here "
                                    "(a different number of registers or model width)")
            p.copy_(t.to(dtype=p.dtype, device=p.device))
    return fast
