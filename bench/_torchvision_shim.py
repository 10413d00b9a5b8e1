"""Bench-only: let ``import torchvision`` (and so ``import timm``) work when torchvision's C++ ops cannot load.

Why: the timm-backed families of bench/unseen_families.py (gemma3n, fast_vlm, perception_lm) build their vision
towers through transformers' TimmWrapper, which needs timm, and timm imports torchvision. The only torchvision
wheel for this machine's torch 2.13.0+cpu (0.28.0, from the local PyPI mirror) is a CUDA build: its ``_C.so``
needs libc10_cuda.so and does not load. torchvision tolerates that (its ops then raise when called), except for
two unconditional ``torch.library.register_fake("torchvision::nms")`` / ``("torchvision::qnms")`` in
torchvision/_meta_registrations.py, which fail with "operator torchvision::nms does not exist" and abort the
import. This shim defines those two schemas (the ones torchvision's C++ library declares) with a kernel that raises,
so the pure-Python parts import. Nothing the benchmarked models run calls nms.

It does nothing when torchvision is not installed or when its ``_C`` extension loads (then the real ops exist).
Never imported by graphred or its tests; the harness imports it before transformers loads timm.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

_SCHEMAS = {
    "nms": "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}
_LIB = None  # the torch.library.Library holding the shim's definitions (kept alive for the process)


def _extension_loads(spec) -> bool:
    """Whether torchvision's own ``_C`` extension loads (then its ops are real and no shim is wanted)."""
    for folder in spec.submodule_search_locations or ():
        for lib in Path(folder).glob("_C*.so"):
            try:
                torch.ops.load_library(str(lib))
                return True
            except (OSError, RuntimeError):
                return False
    return False


def _missing(name: str) -> bool:
    try:
        getattr(torch.ops.torchvision, name)
        return False
    except (AttributeError, RuntimeError):
        return True


def install() -> bool:
    """Define the torchvision op schemas that its import needs; True if the shim defined any."""
    global _LIB
    spec = importlib.util.find_spec("torchvision")
    if spec is None or _LIB is not None or _extension_loads(spec):
        return False
    names = [n for n in _SCHEMAS if _missing(n)]
    if not names:
        return False
    _LIB = torch.library.Library("torchvision", "DEF")
    for name in names:
        _LIB.define(_SCHEMAS[name])

        def _unavailable(*args, _name=name, **kwargs):
            raise RuntimeError(f"torchvision::{_name} is a bench shim (bench/_torchvision_shim.py): torchvision's "
                               "C++ ops do not load against this torch; nothing in the benchmark should call it")

        _LIB.impl(name, _unavailable, "CompositeExplicitAutograd")
    return True


install()
