"""Grouping: nodes into layers (the module path of each attention block's layer), towers outside their
layers, and top-level modules."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import sympy

from ..blocks import AttentionBlock, split_stack

_ZERO = sympy.Integer(0)


@dataclass
class GroupCost:
    """Cost of one group of nodes: a layer (``kind="layer"``) or what a tower/module runs outside its
    layers (``kind="other"``). FLOPs as numbers at the example inputs and as sympy expressions."""

    name: str
    kind: str
    tower: str
    stack: str | None = None
    layer_index: int | None = None
    blocks: list[AttentionBlock] = field(default_factory=list)
    flops: int = 0
    flops_matmul: int = 0
    bytes: int = 0
    flops_expr: sympy.Expr = _ZERO
    flops_matmul_expr: sympy.Expr = _ZERO
    nodes: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name, "kind": self.kind, "tower": self.tower, "stack": self.stack,
            "layer_index": self.layer_index,
            "blocks": [{"module_path": b.module_path, "kind": b.kind, "causal": b.causal, "tokens": dict(b.tokens)}
                       for b in self.blocks],
            "flops": int(self.flops), "flops_matmul": int(self.flops_matmul), "bytes_moved": int(self.bytes),
            "flops_expr": str(self.flops_expr), "flops_matmul_expr": str(self.flops_matmul_expr), "nodes": self.nodes,
        }


def _prefix_of(prefix: str, path: str) -> bool:
    return bool(prefix) and (path == prefix or path.startswith(prefix + "."))


class Grouper:
    def __init__(self, blocks: Sequence[AttentionBlock]):
        self.layer_of_block: dict[str, str] = {}
        layer_names: list[str] = []
        numeric_stacks: list[str] = []
        for b in blocks:
            stack, idx = split_stack(b.module_path)
            parts = b.module_path.split(".")
            if stack != b.module_path and len(stack.split(".")) < len(parts):
                name = f"{stack}.{idx}"
                if stack not in numeric_stacks:
                    numeric_stacks.append(stack)
            else:  # an attention outside a numbered stack (an attention-pooling head): its parent module
                name = ".".join(parts[:-1]) or b.module_path
            self.layer_of_block[b.node] = name
            if name not in layer_names:
                layer_names.append(name)
        self.layers = sorted(layer_names, key=len, reverse=True)  # longest prefix first
        self.roots = self._roots(numeric_stacks)
        self.blocks = list(blocks)

    @staticmethod
    def _roots(stacks: list[str]) -> list[str]:
        """The shortest prefix of each stack no other stack shares: its tower."""
        roots = []
        for s in stacks:
            parts = s.split(".")
            root = s
            for k in range(1, len(parts) + 1):
                cand = ".".join(parts[:k])
                if not any(_prefix_of(cand, o) for o in stacks if o != s):
                    root = cand
                    break
            if root not in roots:
                roots.append(root)
        return sorted(roots, key=len, reverse=True)

    def tower_of(self, path: str) -> str:
        for r in self.roots:
            if _prefix_of(r, path):
                return r
        return ""

    def group_of(self, path: str) -> tuple[str, str, str]:
        """``(group name, kind, tower)`` of a node's module path."""
        for name in self.layers:
            if _prefix_of(name, path):
                return name, "layer", self.tower_of(name)
        tower = self.tower_of(path)
        if tower:
            return f"{tower} (outside layers)", "other", tower
        if not path:
            return "<top>", "other", ""
        parts = path.split(".")
        for k in range(1, len(parts) + 1):
            cand = ".".join(parts[:k])
            if not any(_prefix_of(cand, r) for r in self.roots):
                return cand, "other", ""
        return f"{path} (glue)", "other", ""
