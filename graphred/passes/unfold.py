"""Key/value sources in a folded layout, unfolded so that one reduction serves every later layer.

A cross-attention may project its keys and values from a tensor that holds the key tokens folded with
another axis: tiles of an image run through a vision tower as batch rows, ``[B*T, P, C]``, and each
layer projects ``[B*T, P, C] -> [B*T, P, C']`` and only then views the result as ``[B, T*P, H, D]``,
where the tokens first occupy one dim. Kept indices over the ``T*P`` tokens cannot be gathered on the
folded tensor, so a reduction could only act inside each layer, after its projections.

:class:`UnfoldKeySourcesPass` rewrites, for every such chain, ``view(rowwise(S), W)`` into
``view(rowwise(reshape(S, [.., T*P, C])), W)``: the shared source ``S`` is viewed once with the tokens
on one dim, and the projections (ops acting on each row alone: linear layers, elementwise ops whose
other operands broadcast over the last dim) read that view. Every value is unchanged (the same rows in
the same order). The token-provenance analysis, run again on the result, then finds the key tokens on a
whole dim of the shared tensor, and a reduction there (:func:`graphred.passes.reduce.key_source`) reaches
the projections of every later layer.
"""
from __future__ import annotations

import math

import torch
import torch.fx as fx

from ..analysis.blocks import Blocks
from ..analysis.provenance import Provenance, TokenProvenance
from ..errors import PreconditionError
from ..fx_utils import MADE_BY, is_pointwise, module_path, node_named, node_shape, op_packet, record, set_fake_val
from .infra import GraphredPass, PassResult
from .rewrite_state import RECORDS

aten = torch.ops.aten

_VIEWS = {aten.view, aten.reshape, aten._unsafe_view}
_PASS_THROUGH = {aten.expand, aten.unsqueeze, aten.clone, aten.contiguous, aten.alias}


def _under(path: str, prefix: str) -> bool:
    return path == prefix or path.startswith(prefix + ".")


def _row_input(n: fx.Node) -> fx.Node | None:
    """The operand ``n`` acts on row by row (each position of its last dim's rows alone), or None: a linear
    layer's input, or the full-shape operand of an elementwise op whose other operands broadcast over the last
    dim only (a bias, a norm weight, a scalar)."""
    if n.op != "call_function" or not n.args or not isinstance(n.args[0], fx.Node):
        return None
    x = n.args[0]
    others = [a for a in n.all_input_nodes if a is not x]
    if op_packet(n) is aten.linear:
        return x if all(len(node_shape(a) or ()) <= 2 for a in others) else None
    if not is_pointwise(n) or node_shape(x) != node_shape(n):
        return None
    for a in others:
        s = node_shape(a)
        if s is None or any(d != 1 for d in s[:-1]):
            return None
    return x


def folded_key_chains(gm: fx.GraphModule, prov: TokenProvenance,
                      blocks) -> list[tuple[fx.Node, list[fx.Node], fx.Node, list[int]]]:
    """``[(source, chain, view, unfolded shape)]``: for the keys and values of every attention whose key tokens
    are not its query tokens, the row-wise chain (first op first) that projects them from a ``source`` outside
    the attention's layer in which the key tokens are folded with another dim, up to the ``view`` that first
    puts them on one dim."""
    out, seen = [], set()
    for b in blocks:
        if b.key_stream is None or b.query_stream is not None and prov.find(b.query_stream) == prov.find(b.key_stream):
            continue
        sid = prov.find(b.key_stream)
        layer = b.module_path.rsplit(".", 1)[0]

        def whole(x, sid=sid):
            return [d for d, s in prov.axes(x) if prov.find(s.id) == sid]

        for start in (b.key, b.value):
            n = node_named(gm, start)
            for _ in range(40):  # up to the first tensor in the layer that holds the key tokens on a whole dim
                ins = [a for a in n.all_input_nodes if whole(a) and _under(module_path(a), layer)]
                if ins:
                    n = ins[0]
                elif op_packet(n) in _PASS_THROUGH and isinstance(n.args[0], fx.Node) \
                        and _under(module_path(n.args[0]), layer):
                    n = n.args[0]  # (grouped-query keys repeated by expand: a view of the keys)
                else:
                    break
            if n in seen or op_packet(n) not in _VIEWS or not whole(n) or not _under(module_path(n), layer) \
                    or not isinstance(n.args[0], fx.Node):
                continue
            view, d = n, whole(n)[0]
            wshape, top = node_shape(view), view.args[0]
            if wshape is None or node_shape(top) is None or math.prod(wshape[d + 1:]) != node_shape(top)[-1]:
                continue  # the tokens are not the rows of the viewed tensor
            chain, x = [], top
            while True:
                r = _row_input(x)
                if r is None or len(x.users) != 1 or not _under(module_path(x), layer):
                    break
                chain.append(x)
                x = r
            src, sshape = x, node_shape(x)
            if not chain or sshape is None or _under(module_path(src), layer) or whole(src):
                continue
            unfolded = list(wshape[:d + 1]) + [sshape[-1]]
            if math.prod(sshape) != math.prod(unfolded):
                continue
            seen.add(view)
            out.append((src, chain[::-1], view, unfolded))
    return out


class UnfoldKeySourcesPass(GraphredPass):
    """Before a plan's reductions: cross-attention keys/values projected from a shared source whose key tokens
    are folded with another dim (tiles in the batch) read one unfolded view of that source instead (module
    docstring). Values are unchanged; the token provenance and blocks are dropped (the pipeline computes them
    again on the result). Needs :class:`Provenance` and :class:`Blocks` in its analysis manager.

    >>> "Provenance" in UnfoldKeySourcesPass.preserves, "MadeBy" in UnfoldKeySourcesPass.preserves
    (False, True)
    """

    preserves = RECORDS

    def requires(self, graph_module: fx.GraphModule) -> None:
        if self.analyses.peek(Provenance, graph_module) is None:
            raise PreconditionError(f"{self.name} needs the token provenance of the graph in its analysis manager: "
                                    "am.get(Provenance(example_inputs), gm) first", pass_name=self.name)

    def call(self, gm: fx.GraphModule) -> PassResult:
        prov = self.analyses.get(Provenance, gm)
        blocks = self.analyses.get(Blocks, gm)
        views: dict[tuple[fx.Node, tuple[int, ...]], fx.Node] = {}
        modified = False
        for src, chain, view, shape in folded_key_chains(gm, prov, blocks):
            u = views.get((src, tuple(shape)))
            if u is None:
                with gm.graph.inserting_after(src):
                    u = gm.graph.call_function(aten.reshape.default, (src, shape))
                for k in ("nn_module_stack", "stack_trace"):
                    if k in src.meta:
                        u.meta[k] = src.meta[k]
                set_fake_val(u)
                record(u, MADE_BY, self.name)
                views[(src, tuple(shape))] = u
            chain[0].replace_input_with(src, u)
            try:
                for n in chain + [view]:
                    set_fake_val(n)
            except Exception:  # noqa: BLE001 (the view does not take the unfolded rows: leave this chain folded)
                chain[0].replace_input_with(u, src)
                for n in chain + [view]:
                    set_fake_val(n)
                continue
            modified = True
        for u in views.values():
            if not u.users:
                gm.graph.erase_node(u)
        return PassResult(gm, modified)


__all__ = ["UnfoldKeySourcesPass", "folded_key_chains"]
