"""Partial evaluation: values of a few graph nodes (the input bookkeeping: image-placeholder
masks, attention masks) computed from their ancestors only, never the model's layers. It always runs
on the CPU: graphs captured on the meta device (given CPU copies of the inputs) or on an accelerator
(their inputs and the weights the bookkeeping reads are copied to the CPU) give the same values as a
CPU capture."""
from __future__ import annotations

from typing import Any, Iterable, Sequence

import torch
import torch.fx as fx

from ..fx_utils import ancestors, fetch_attr, is_state_call


def to_cpu_device(x: Any) -> Any:
    """Any device in ``x`` (``meta``, ``cuda:0``, a ``torch.device``) -> the CPU, and tensors -> CPU
    copies, through lists, tuples and dicts.

    >>> to_cpu_device([torch.device("cuda", 0), "meta", {"device": "cuda"}, 3])
    [device(type='cpu'), 'cpu', {'device': 'cpu'}, 3]
    """
    if isinstance(x, torch.device):
        return torch.device("cpu")
    if isinstance(x, str) and _is_device_string(x):
        return "cpu"
    if isinstance(x, torch.Tensor) and x.device.type not in ("cpu", "meta"):
        return x.cpu()
    if isinstance(x, (list, tuple)):
        return type(x)(to_cpu_device(v) for v in x)
    if isinstance(x, dict):
        return {k: to_cpu_device(v) for k, v in x.items()}
    return x


def _is_device_string(s: str) -> bool:
    try:
        return torch.device(s).type != "cpu"
    except (RuntimeError, ValueError):
        return False


# graphred ops whose listed arguments are hidden-state data (scores, similarity metric, features):
# the op's bookkeeping outputs (kept indices, matched pairs, token sizes) have sizes that do not depend
# on them, so partial evaluation feeds a stand-in instead of running the layers that compute them.
DATA_ARGS: dict[str, tuple[str, ...]] = {
    "graphred::select_tokens": ("scores",),
    "graphred::select_tokens_padded": ("scores",),
    "graphred::bipartite_match": ("metric", "rank", "protected"),
    "graphred::merge_tokens": ("x",),
    "graphred::attention_scores": ("q", "k"),
}


def _data_arg_nodes(node: fx.Node) -> set[fx.Node]:
    """The inputs of ``node`` that :data:`DATA_ARGS` stands in for (empty for any other node)."""
    schema = getattr(node.target, "_schema", None)
    names = DATA_ARGS.get(getattr(schema, "name", None), ()) if node.op == "call_function" else ()
    if not names:
        return set()
    out = set()
    for i, a in enumerate(schema.arguments):
        if a.name in names:
            v = node.args[i] if i < len(node.args) else node.kwargs.get(a.name)
            if isinstance(v, fx.Node):
                out.add(v)
    return out


def _stand_in(node: fx.Node) -> Any:
    """A seeded random tensor shaped like ``node``'s value (from ``meta["val"]``)."""
    v = node.meta.get("val")
    if not isinstance(v, torch.Tensor):
        raise ValueError("no tensor value to stand in for")
    shape = tuple(int(d) for d in v.shape)
    g = torch.Generator().manual_seed(0)
    if v.is_floating_point():
        return torch.randn(shape, generator=g).to(v.dtype)
    if v.dtype == torch.bool:
        return torch.zeros(shape, dtype=torch.bool)  # nothing protected: any match count the graph asks for exists
    return torch.randint(0, 2, shape, generator=g).to(v.dtype)


def meta_inputs(args: tuple, kwargs: dict) -> list[str]:
    """Names of the inputs that are meta tensors (shapes without values): ``kwargs`` names, ``args[i]``.

    >>> import torch
    >>> meta_inputs((torch.ones(1, device="meta"),), {"input_ids": torch.ones(1, device="meta"), "x": torch.ones(1)})
    ['args[0]', 'input_ids']
    """
    names = [f"args[{i}]" for i, v in enumerate(args) if isinstance(v, torch.Tensor) and v.device.type == "meta"]
    return names + [k for k, v in kwargs.items() if isinstance(v, torch.Tensor) and v.device.type == "meta"]


def meta_layout_message(model_class: str, names: Sequence[str], step: str = "") -> str:
    """What a plan on a program captured with meta inputs (and no ``value_inputs``) lacks, and what to do."""
    return (f"{step + ': ' if step else ''}{model_class} was captured with inputs on the meta device "
            f"({', '.join(names)}): they have shapes but no values, so the token layout a plan needs (where the "
            "image tokens sit, what the attention masks allow, which positions are padding) cannot be read. Pass CPU "
            "tensors of the same shapes as value_inputs=(args, kwargs): graphred.estimate(program, plan, "
            "value_inputs=...) or graphred.passes.apply.apply_plan(program, plan, value_inputs=...); "
            "graphred.analysis.cost.estimate.estimate_model(DIR, plan) does this for a config directory. "
            "Or capture on the CPU.")


def partial_evaluate(gm: fx.GraphModule, flat_inputs: Sequence, wanted: Iterable[fx.Node],
                     max_weight_numel: int = 1 << 22) -> dict[fx.Node, Any]:
    """Values of ``wanted`` nodes at ``flat_inputs`` (tensors, in placeholder order), computing
    only their ancestors -- the input bookkeeping (masks from ``input_ids == image_token``, counts of
    real images, ...), never the model's layers. It runs on the CPU whatever the graph's device: device
    arguments are mapped to the CPU, inputs and the weights the bookkeeping reads are copied there, and
    on a graph captured on the meta device a meta parameter/buffer the bookkeeping reads is taken as
    zeros when it is small (``max_weight_numel``). The hidden-state arguments of graphred's selection
    ops are stood in for (:data:`DATA_ARGS`), so no layer runs. A node that cannot be computed is left out."""
    wanted = [w for w in wanted if isinstance(w, fx.Node)]
    stand_ins: set[fx.Node] = set()
    need = ancestors(wanted, _data_arg_nodes, stand_ins)
    env: dict[fx.Node, Any] = {}
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for i, n in enumerate(placeholders):
        if i < len(flat_inputs):
            env[n] = to_cpu_device(flat_inputs[i])
    failed: set[fx.Node] = set()
    for n in stand_ins - need:  # a data argument that is itself wanted is computed, not stood in
        try:
            env[n] = _stand_in(n)
        except Exception:  # noqa: BLE001 - no shape to stand in: its users are skipped
            failed.add(n)
    _evaluate(gm, need, env, failed, max_weight_numel)
    return {w: env[w] for w in wanted if w in env}


def _evaluate(gm: fx.GraphModule, need: set, env: dict, failed: set, max_weight_numel: int) -> None:
    state_calls = {n for n in gm.graph.nodes if is_state_call(n)}
    for node in gm.graph.nodes:
        if node in state_calls and not node.all_input_nodes:
            # a mask function vmapped over positions: its nodes run inside the levels these calls open
            # (not data ancestors of anything, so they are run for what they do, whatever is needed)
            try:
                node.target(*to_cpu_device(node.args), **to_cpu_device(node.kwargs))
            except Exception:  # noqa: BLE001 - a state call that cannot run: the nodes inside fail and are skipped
                pass
            continue
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
                else:
                    v = to_cpu_device(v)
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
