"""Small helpers over torch.fx graphs shared by analyses and passes."""
from __future__ import annotations

import re
from typing import Any

import torch
import torch.fx as fx

_LSELF = re.compile(r"^L\['self'\]\.?")
_INDEX = re.compile(r"\[['\"]?([^\]'\"]+)['\"]?\]")


def normalize_module_path(path: str) -> str:
    """``"L['self'].model.layers[3].attn"`` -> ``"model.layers.3.attn"``."""
    path = _LSELF.sub("", path)
    path = _INDEX.sub(r".\1", path)
    return path.strip(".")


def module_stack(node: fx.Node) -> list[tuple[str, str]]:
    """The (module path, class name) pairs that were active when ``node`` ran, outermost first."""
    stack = node.meta.get("nn_module_stack") or {}
    out = []
    for value in stack.values():
        path, cls = value if isinstance(value, tuple) else (value, "")
        name = cls if isinstance(cls, str) else getattr(cls, "__qualname__", str(cls))
        out.append((normalize_module_path(str(path)), name.rsplit(".", 1)[-1]))
    return [(p, c) for p, c in out if p]


def module_path(node: fx.Node) -> str:
    """Innermost module path of ``node`` ('' at the top level)."""
    stack = module_stack(node)
    return stack[-1][0] if stack else ""


def val(node: Any):
    """``node.meta['val']`` or None."""
    return node.meta.get("val") if isinstance(node, fx.Node) else None


def shape_of(node: Any) -> tuple | None:
    v = val(node)
    return tuple(v.shape) if isinstance(v, torch.Tensor) else None


def op_name(node: fx.Node) -> str:
    """``aten.mm.default`` style name of a call_function target, else the node op."""
    if node.op != "call_function":
        return node.op
    t = node.target
    if isinstance(t, torch._ops.OpOverload):
        return f"{t.namespace}.{t._opname}.{t._overloadname}"
    return getattr(t, "__name__", str(t))


def is_op(node: fx.Node, *packets) -> bool:
    """True if ``node`` calls one of the given aten op packets or overloads."""
    if node.op != "call_function":
        return False
    t = node.target
    for p in packets:
        if t is p:
            return True
        if isinstance(t, torch._ops.OpOverload) and t.overloadpacket is p:
            return True
    return False
