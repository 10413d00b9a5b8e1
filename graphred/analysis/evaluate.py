"""Partial evaluation: values of a few graph nodes (the input bookkeeping: image-placeholder
masks, attention masks) computed from their ancestors only, never the model's layers. Works on
graphs captured on the meta device given CPU copies of the inputs."""
from __future__ import annotations

from typing import Any, Iterable, Sequence

import torch
import torch.fx as fx

from ..fx_utils import ancestors, fetch_attr


def to_cpu_device(x: Any) -> Any:
    """A meta device (or "meta") in ``x`` -> cpu, through lists, tuples and dicts."""
    if isinstance(x, torch.device) and x.type == "meta":
        return torch.device("cpu")
    if isinstance(x, str) and x == "meta":
        return "cpu"
    if isinstance(x, (list, tuple)):
        return type(x)(to_cpu_device(v) for v in x)
    if isinstance(x, dict):
        return {k: to_cpu_device(v) for k, v in x.items()}
    return x




def partial_evaluate(gm: fx.GraphModule, flat_inputs: Sequence, wanted: Iterable[fx.Node],
                     max_weight_numel: int = 1 << 22) -> dict[fx.Node, Any]:
    """Values of ``wanted`` nodes at ``flat_inputs`` (CPU tensors, in placeholder order), computing
    only their ancestors -- the input bookkeeping (masks from ``input_ids == image_token``, counts of
    real images, ...), never the model's layers. Works on a graph captured on the meta device: device
    arguments are mapped to the CPU, and a meta parameter/buffer the bookkeeping reads is taken as
    zeros when it is small (``max_weight_numel``). A node that cannot be computed is left out."""
    wanted = [w for w in wanted if isinstance(w, fx.Node)]
    need = ancestors(wanted)
    env: dict[fx.Node, Any] = {}
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for i, n in enumerate(placeholders):
        if i < len(flat_inputs):
            env[n] = flat_inputs[i]
    failed: set[fx.Node] = set()
    for node in gm.graph.nodes:
        if node not in need or node.op in ("placeholder", "output"):
            continue
        if any(a in failed or a not in env for a in node.all_input_nodes):
            failed.add(node)
            continue
        try:
            if node.op == "get_attr":
                v = fetch_attr(gm, node.target)
                if isinstance(v, torch.Tensor) and v.device.type == "meta":
                    if v.numel() > max_weight_numel:
                        raise ValueError("a large meta weight")
                    v = torch.zeros(v.shape, dtype=v.dtype)
            elif node.op == "call_function":
                args = to_cpu_device(fx.node.map_arg(node.args, lambda a: env[a]))
                kwargs = to_cpu_device(fx.node.map_arg(node.kwargs, lambda a: env[a]))
                with torch.no_grad():
                    v = node.target(*args, **kwargs)
            else:
                raise ValueError(node.op)
        except Exception:  # noqa: BLE001 - not computable here: its users are skipped too
            failed.add(node)
            continue
        env[node] = v
    return {w: env[w] for w in wanted if w in env}
