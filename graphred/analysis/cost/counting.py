"""Counting: every costable node of a graph costed by the registry at concrete and symbolic shapes
(graphred's own ops by their own formulas), summed into groups."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import sympy
import torch
import torch.fx as fx

from ... import ops  # noqa: F401  (registers torch.ops.graphred)
from ...errors import AnalysisError
from ...fx_utils import flat_inputs, module_path, op_packet
from ..blocks import split_stack
from ..evaluate import partial_evaluate
from .grouping import GroupCost, Grouper
from .registry import NodeCost, Uncounted, node_cost, walk_costable
from .shapes import Shapes

_ZERO = sympy.Integer(0)
_OWN_FORMULAS = {torch.ops.graphred.attention_scores: "_attention_scores",
                 torch.ops.graphred.bipartite_match: "_bipartite_match"}
"""graphred op packet -> the Coster method that costs it from more than its shapes."""


def _key_of(x: Any, shape_of: Callable) -> Any:
    if isinstance(x, fx.Node):
        v = x.meta.get("val")
        if isinstance(v, torch.Tensor):
            s = shape_of(x)
            return ("T", tuple(s) if s is not None else None, v.dtype)
        if isinstance(v, (torch.SymInt, int, bool, float)):
            return ("S", str(v))
        return ("N", x.name)
    if isinstance(x, (list, tuple)):
        return tuple(_key_of(a, shape_of) for a in x)
    if isinstance(x, dict):
        return tuple(sorted((k, _key_of(v, shape_of)) for k, v in x.items()))
    if isinstance(x, torch.SymInt):
        return ("S", str(x))
    try:
        hash(x)
        return x
    except TypeError:
        return repr(x)


@dataclass
class CountedNode:
    name: str
    group: int
    flops: int
    flops_matmul: int
    bytes: int
    flops_expr: sympy.Expr
    flops_matmul_expr: sympy.Expr
    bytes_expr: sympy.Expr
    order: int
    original: bool = True  # False: a node a plan added (graphred op, gather, ...)


class Coster:
    """Costs of nodes, memoised over (op, input shapes, arguments): a model's identical layers cost
    one evaluation of each formula."""

    def __init__(self, shapes: Shapes, gm: fx.GraphModule | None = None, flat_inputs: Sequence | None = None):
        self.shapes = shapes
        self.cache: dict = {}
        self.gm = gm
        self.flat_inputs = flat_inputs
        self._rows: dict[fx.Node, Any] = {}  # per node: scored rows, or a candidate split

    def _scored_rows(self, node: fx.Node) -> tuple[int, bool] | None:
        """Query rows ``graphred::attention_scores`` really runs, as its kernel chooses them
        (:func:`graphred.ops.scored_rows`, on the weights the bookkeeping computes at the example inputs):
        ``(rows, False)``, the rows with weight in some sample, run for every sample; or ``(total, True)``,
        each sample's own rows, ``total`` over the batch."""
        if node in self._rows:
            return self._rows[node]
        rows = None
        w = node.args[2] if len(node.args) > 2 else node.kwargs.get("query_weight")
        q = node.args[0]
        if isinstance(w, fx.Node) and isinstance(q, fx.Node) and self.gm is not None and self.flat_inputs is not None:
            got = partial_evaluate(self.gm, self.flat_inputs, [w]).get(w)
            qv = q.meta.get("val")
            if isinstance(got, torch.Tensor) and got.dim() == 1:
                got = got.unsqueeze(0)
            if isinstance(got, torch.Tensor) and got.dim() == 2 and isinstance(qv, torch.Tensor) and qv.dim() == 4:
                blocks = ops.scored_rows(got.expand(int(qv.shape[0]), got.shape[1]))
                if len(blocks) == 1:
                    rows = (int(blocks[0][2].numel()), False)
                else:
                    rows = (sum(int(r.numel()) for _, _, r in blocks), True)
        self._rows[node] = rows
        return rows

    def _attention_scores(self, node: fx.Node, shape_of: Callable, symbolic: bool):
        got = self._scored_rows(node)
        q = node.args[0]
        qs = shape_of(q) if isinstance(q, fx.Node) else None
        if got is None or not isinstance(qs, tuple) or len(qs) != 4:
            return None
        rows, per_sample = got
        lq = sympy.sympify(qs[2])
        try:
            if not per_sample and int(lq.subs(self.shapes.values)) == rows:
                return None  # every row is scored
        except Exception:  # noqa: BLE001
            return None
        r_expr: sympy.Expr = sympy.Integer(rows)
        if symbolic and not per_sample:  # the scored rows are one modality's span of the query stream (the text)
            for term in sympy.Add.make_args(sympy.expand(lq)):
                if term.free_symbols and int(term.subs(self.shapes.values)) == rows:
                    r_expr = term
                    break

        def with_rows(n: fx.Node):  # each sample's own rows: as one sample holding all of them
            s = shape_of(n)
            if n is q and isinstance(s, tuple):
                return (1 if per_sample else s[0], s[1], r_expr, s[3])
            return s

        a = node_cost(node, with_rows, kind="all")
        m = node_cost(node, with_rows, kind="matmul")
        if not isinstance(a, NodeCost) or not isinstance(m, NodeCost):
            return None
        return (sympy.sympify(a.flops), sympy.sympify(m.flops), sympy.sympify(a.bytes))

    def _candidate_split(self, node: fx.Node) -> tuple[int, int] | None:
        """``(|A|, |B|)`` ``graphred::bipartite_match`` really uses: the most even-/odd-ranked candidates of
        any sample (candidates read from the bookkeeping at the example inputs), as its kernel splits them."""
        if node in self._rows:
            return self._rows[node]
        split = None
        cand = node.args[1] if len(node.args) > 1 else node.kwargs.get("candidates")
        if isinstance(cand, fx.Node) and self.gm is not None and self.flat_inputs is not None:
            c = partial_evaluate(self.gm, self.flat_inputs, [cand]).get(cand)
            if isinstance(c, torch.Tensor) and c.dim() == 2 and c.dtype == torch.bool and c.shape[0] > 0:
                rank = torch.cumsum(c.to(torch.int64), dim=1) - 1
                split = (int((c & (rank % 2 == 0)).sum(1).max()), int((c & (rank % 2 == 1)).sum(1).max()))
        self._rows[node] = split
        return split

    def _bipartite_match(self, node: fx.Node, shape_of: Callable, symbolic: bool):
        r = node.args[2] if len(node.args) > 2 else node.kwargs.get("r")
        metric = node.args[0]
        ms = shape_of(metric) if isinstance(metric, fx.Node) else None
        split = self._candidate_split(node)
        if split is None or not isinstance(ms, tuple) or len(ms) != 3 or (isinstance(r, int) and r == 0):
            return None
        b, l, c = (sympy.sympify(x) for x in ms)
        na, nb = sympy.Integer(split[0]), sympy.Integer(split[1])
        if symbolic:  # the candidates are one modality's span (the image tokens): keep its symbol
            vals = self.shapes.values
            for term in sympy.Add.make_args(sympy.expand(l)):
                if term.free_symbols and int(term.subs(vals)) == split[0] + split[1]:
                    ea, eb = sympy.ceiling(term / 2), sympy.floor(term / 2)
                    if int(ea.subs(vals)) == split[0] and int(eb.subs(vals)) == split[1]:
                        na, nb = ea, eb
                    break
        # the registry's formula (graphred::bipartite_match) with the split the kernel makes
        lg = sympy.Integer(max(split[0] - 1, 0).bit_length())
        mm = 2 * b * na * nb * c
        other = 3 * b * l * c + b * na * nb + b * na * lg
        base = node_cost(node, shape_of, kind="all")
        if not isinstance(base, NodeCost):
            return None
        return (mm + other, mm, sympy.sympify(base.bytes))

    def cost(self, node: fx.Node, symbolic: bool) -> tuple | Uncounted | None:
        shape_of = self.shapes.symbolic if symbolic else self.shapes.concrete
        own = _OWN_FORMULAS.get(op_packet(node)) if node.op == "call_function" else None
        if own is not None:  # graphred's ops whose cost depends on more than their shapes
            res = getattr(self, own)(node, shape_of, symbolic)
            if res is not None:
                return res
        try:
            key = (node.target, symbolic, _key_of(node.args, shape_of), _key_of(dict(node.kwargs), shape_of),
                   _key_of(node, shape_of))
            hit = self.cache.get(key)
        except Exception:  # noqa: BLE001 - unhashable argument: no memo
            key, hit = None, None
        if hit is not None:
            return hit if not isinstance(hit, Uncounted) else hit._replace(name=node.name)
        try:
            a = node_cost(node, shape_of, kind="all")
            if isinstance(a, Uncounted) or a is None:
                res: Any = a
            else:
                m = node_cost(node, shape_of, kind="matmul")
                res = (sympy.sympify(a.flops), sympy.sympify(m.flops), sympy.sympify(a.bytes))
        except AnalysisError as e:
            res = Uncounted(node.name, str(node.target), f"shape not resolved: {e}")
        if key is not None:
            self.cache[key] = res
        return res


def count_nodes(gm: fx.GraphModule, shapes: Shapes, grouper: Grouper | None, group_index: dict[str, int],
           groups: list[GroupCost], symbolic: bool = True,
           flat_inputs: Sequence | None = None) -> tuple[list[CountedNode], list[Uncounted]]:
    coster = Coster(shapes, gm, flat_inputs)
    nodes: list[CountedNode] = []
    uncounted: list[Uncounted] = []
    for order, (qual, node, anchor) in enumerate(walk_costable(gm)):
        if node.op == "call_module":
            if not str(node.target).startswith("_guards"):
                uncounted.append(Uncounted(qual, f"call_module {node.target}", "a module call, not an op"))
            continue
        conc = coster.cost(node, symbolic=False)
        if conc is None:
            continue
        if isinstance(conc, Uncounted):
            uncounted.append(conc._replace(name=qual))
            continue
        if symbolic:
            sym = coster.cost(node, symbolic=True)
            if not isinstance(sym, tuple):
                sym = conc
        else:
            sym = conc
        path = module_path(anchor)
        if grouper is not None:
            gname, gkind, tower = grouper.group_of(path)
        else:
            gname, gkind, tower = (path.split(".")[0] if path else "<top>"), "other", ""
        gi = group_index.get(gname)
        if gi is None:
            gi = len(groups)
            group_index[gname] = gi
            g = GroupCost(gname, gkind, tower)
            if gkind == "layer":
                st, idx = split_stack(gname)
                g.stack, g.layer_index = (st, idx) if st != gname else (None, None)
            groups.append(g)
        fa, fm, by = (int(x) for x in conc)
        nodes.append(CountedNode(qual, gi, fa, fm, by, sym[0], sym[1], sym[2], order))
    return nodes, uncounted


def sum_groups(groups: list[GroupCost], nodes: list[CountedNode]) -> None:
    acc: dict[int, list] = {}
    for n in nodes:
        acc.setdefault(n.group, []).append(n)
    for gi, g in enumerate(groups):
        ns = acc.get(gi, [])
        g.flops = sum(n.flops for n in ns)
        g.flops_matmul = sum(n.flops_matmul for n in ns)
        g.bytes = sum(n.bytes for n in ns)
        g.flops_expr = sympy.Add(*[n.flops_expr for n in ns]) if ns else _ZERO
        g.flops_matmul_expr = sympy.Add(*[n.flops_matmul_expr for n in ns]) if ns else _ZERO
        g.nodes = len(ns)
