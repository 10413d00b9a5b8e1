"""``graphred.estimate(program, plan=None) -> Estimate``: FLOPs, weight bytes, peak activation memory and
KV cache of a captured model, before and after a reduction plan, as numbers and as sympy expressions in
the token symbols (``n_img``, ``n_txt``, ``n_patch``, ``B``, ...). Nothing runs the model.

How the figures are made (``docs/cost-model.md`` has the long form):

* **FLOPs**: every ``call_function`` node of the aten graph is costed by the per-op registry
  (:mod:`graphred.analysis.cost.registry`) from its input and output shapes. ``flops_matmul`` counts what
  ``torch.utils.flop_counter.FlopCounterMode`` counts (matrix products, convolutions, attention kernels;
  2 FLOPs per multiply-add); ``flops`` adds everything else (elementwise, softmax, norms, ...). With the
  symbolic shapes of :class:`~graphred.analysis.provenance.TokenProvenance` the same formulas give
  ``flops_expr``. A node no formula covers is listed in :attr:`Estimate.uncounted`, never counted as 0.
* **Breakdown**: nodes are grouped by layer (the module path of each attention block's layer, e.g.
  ``model.language_model.layers.3``) and, outside layers, by tower (``model.vision_tower (outside
  layers)``) or top-level module (``lm_head``).
* **Weights**: bytes of the parameters/buffers the graph reads (:func:`.memory.weight_bytes`).
* **Peak activation memory**: liveness over the execution order, views sharing their base's storage,
  inputs counted, weights apart (:func:`.memory.activation_memory`).
* **KV cache**: for the self-attention blocks of a generative decoder (a stack whose output reaches a
  head over the input vocabulary), ``K`` and ``V`` as the layer computes them *before* grouped-query
  expansion: ``2 * B * L * H_kv * D * bytes`` per layer.
* **After a plan**: :func:`graphred.passes.apply.apply_plan` gives the reduced graph; its FLOPs are counted
  over that graph (graphred's scoring/selection/merge ops included, by the registry), and the expression is
  every original node's symbolic cost under the substitution in effect where it runs (``subs_at``) plus the
  new ops' cost. Speedup = FLOPs before / FLOPs after.

>>> import graphred
>>> model, inputs = graphred.zoo.load(graphred.zoo.TEST_NAMES[-2])  # a dual encoder
>>> est = graphred.estimate(graphred.capture(model, **inputs))
>>> est.flops_matmul == graphred.analysis.cost.count_flops_executed(model, **inputs)
True
"""
from __future__ import annotations

import inspect
import math
import operator
import os
import re
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Sequence

import sympy
import torch
import torch.fx as fx

from ...errors import AnalysisError, GraphredError, PlanError
from ...fx_utils import module_path
from ...program import Program
from ..blocks import CROSS_ATTENTION, AttentionBlock, detect_blocks, split_stack
from ..provenance import IMAGE, TEXT, TokenProvenance
from .memory import (
    MemoryProfile,
    WeightBytes,
    activation_memory,
    hint_int,
    storage_key,
    tensors_of,
    weight_bytes,
)
from .registry import _RUN_ONCE_HOPS, NodeCost, Uncounted, lookup, node_cost, to_expr, walk_costable

__all__ = [
    "Estimate",
    "GroupCost",
    "KVCache",
    "SweepTable",
    "estimate",
    "estimate_model",
    "sweep",
]

aten = torch.ops.aten
_ZERO = sympy.Integer(0)


# =============================================================================================
# values at the example inputs without running the model (partial evaluation)
# =============================================================================================


from ..evaluate import _ancestors, _fetch_attr, _to_cpu_device, partial_evaluate  # noqa: E402,F401


def _flat_inputs(gm: fx.GraphModule, args: tuple, kwargs: dict) -> list | None:
    from ..provenance import _flat_inputs as flat

    return flat(gm, args, kwargs)


def _is_meta_program(program: Program) -> bool:
    args, kwargs = program.example_inputs()
    leaves = torch.utils._pytree.tree_leaves((args, kwargs))
    if any(isinstance(t, torch.Tensor) and t.device.type == "meta" for t in leaves):
        return True
    return any(p.device.type == "meta" for p in program.graph_module.parameters())


def _unbacked_names(val: Any) -> set[str]:
    out: set[str] = set()

    def one(s):
        if isinstance(s, (torch.SymInt, torch.SymFloat, torch.SymBool)):
            try:
                for sym in sympy.sympify(s.node.expr).free_symbols:
                    if re.match(r"^u\d+$", sym.name):
                        out.add(sym.name)
            except Exception:  # noqa: BLE001
                pass

    if isinstance(val, torch.Tensor):
        for s in val.shape:
            one(s)
    elif isinstance(val, (list, tuple)):
        for v in val:
            out |= _unbacked_names(v)
    else:
        one(val)
    return out


def resolve_unbacked(gm: fx.GraphModule, flat_inputs: Sequence | None) -> tuple[dict[str, int], list[str]]:
    """Values of the unbacked symbols (``u0``, ...) of a graph whose shapes depend on input data (a
    boolean-mask select of real images, ...), by evaluating the nodes that introduce them on the example
    inputs (:func:`partial_evaluate`). Returns ``({name: value}, [names left unresolved])``."""
    intro: dict[str, fx.Node] = {}
    for node in gm.graph.nodes:
        for name in _unbacked_names(node.meta.get("val")):
            intro.setdefault(name, node)
    if not intro:
        return {}, []
    values: dict[str, int] = {}
    # hints recorded at capture (real-tensor propagation) first
    for node in gm.graph.nodes:
        v = node.meta.get("val")
        ts = tensors_of(v) or ([v] if isinstance(v, torch.SymInt) else [])
        for t in ts:
            dims = list(t.shape) if isinstance(t, torch.Tensor) else [t]
            for d in dims:
                if isinstance(d, torch.SymInt):
                    try:
                        e = sympy.sympify(d.node.expr)
                    except Exception:  # noqa: BLE001
                        continue
                    if isinstance(e, sympy.Symbol) and e.name in intro and e.name not in values:
                        try:
                            values[e.name] = hint_int(d)
                        except Exception:  # noqa: BLE001
                            pass
    missing = [n for n in intro if n not in values]
    if missing and flat_inputs is not None:
        nodes = {intro[n] for n in missing}
        got = partial_evaluate(gm, flat_inputs, nodes)
        for _ in range(3):  # a dim like 64*u0 needs u0 from another dim first
            for node, real in got.items():
                fake = node.meta.get("val")
                pairs = []
                if isinstance(fake, torch.Tensor) and isinstance(real, torch.Tensor):
                    pairs = list(zip(fake.shape, real.shape))
                elif isinstance(fake, torch.SymInt):
                    pairs = [(fake, real)]
                elif isinstance(fake, (list, tuple)) and isinstance(real, (list, tuple)):
                    for f, r in zip(fake, real):
                        if isinstance(f, torch.Tensor) and isinstance(r, torch.Tensor):
                            pairs += list(zip(f.shape, r.shape))
                for f, r in pairs:
                    if not isinstance(f, torch.SymInt):
                        continue
                    try:
                        e = sympy.sympify(f.node.expr)
                        e = sympy.sympify(e.xreplace({s: sympy.Integer(values[s.name]) for s in e.free_symbols
                                                      if s.name in values}))
                        free = [s for s in e.free_symbols if re.match(r"^u\d+$", s.name)]
                        if len(free) == 1:
                            sol = sympy.solve(sympy.Eq(e, int(r)), free[0])
                            if len(sol) == 1 and sympy.sympify(sol[0]).is_integer:
                                values[free[0].name] = int(sol[0])
                    except Exception:  # noqa: BLE001
                        continue
    return values, [n for n in intro if n not in values]


# =============================================================================================
# node costs with shapes in the token symbols
# =============================================================================================


class _Shapes:
    """Concrete and symbolic shapes of nodes, memoised (provenance's shapes, checked and repaired)."""

    def __init__(self, prov: TokenProvenance | None, symbol_values: Mapping, unbacked: Mapping[str, int]):
        self.prov = prov
        self.values = dict(symbol_values)
        self.unbacked = dict(unbacked)
        self._conc: dict[fx.Node, Any] = {}
        self._sym: dict[fx.Node, Any] = {}
        self._prov_memo: dict = {}
        self.repaired: set[str] = set()

    def _prov_shape(self, node: fx.Node):
        """``prov.symbolic_shape(node)``, memoised over what it depends on (the shape and the token axes):
        the layers of a model repeat the same few, and each costs a sympy simplification."""
        try:
            axes = tuple((self.prov.find(a.stream), a.stride, a.length) for a in self.prov.tokens(node).axes)
            v = node.meta.get("val")
            key = (tuple(hint_int(d, self.unbacked) for d in v.shape), axes) if isinstance(v, torch.Tensor) else None
        except Exception:  # noqa: BLE001
            key = None
        if key is not None and key in self._prov_memo:
            return self._prov_memo[key]
        try:
            s = self.prov.symbolic_shape(node)
        except Exception:  # noqa: BLE001
            s = None
        if key is not None:
            self._prov_memo[key] = s
        return s

    def _int(self, s: Any) -> int:
        if isinstance(s, int):
            return s
        try:
            return hint_int(s)
        except Exception:  # noqa: BLE001
            e = sympy.sympify(s.node.expr)
            e = sympy.sympify(e.xreplace({x: sympy.Integer(self.unbacked[x.name]) for x in e.free_symbols
                                          if x.name in self.unbacked}))
            if e.free_symbols:
                raise AnalysisError(f"unresolved symbolic size {e}") from None
            return int(e)

    def concrete(self, node: fx.Node):
        if node in self._conc:
            return self._conc[node]
        v = node.meta.get("val")
        out: Any = None
        if isinstance(v, torch.Tensor):
            out = tuple(sympy.Integer(self._int(s)) for s in v.shape)
        elif isinstance(v, (list, tuple)) and v and all(isinstance(t, torch.Tensor) for t in v):
            out = [tuple(sympy.Integer(self._int(s)) for s in t.shape) for t in v]
        self._conc[node] = out
        return out

    def symbolic(self, node: fx.Node):
        if node in self._sym:
            return self._sym[node]
        conc = self.concrete(node)
        out = conc
        if self.prov is not None and isinstance(conc, tuple):
            s = self._prov_shape(node)
            if s is not None and len(s) == len(conc):
                fixed = []
                for d_sym, d_conc in zip(s, conc):
                    d_sym = sympy.sympify(d_sym)
                    try:
                        ok = d_sym.free_symbols and int(d_sym.subs(self.values)) == int(d_conc)
                    except Exception:  # noqa: BLE001
                        ok = False
                    if not ok and d_sym != d_conc:
                        if d_sym.free_symbols or int(d_sym) != int(d_conc):
                            self.repaired.add(node.name)
                        d_sym = d_conc
                    fixed.append(d_sym)
                out = tuple(fixed)
        self._sym[node] = out
        return out

    # ---- completing token dims the provenance analysis leaves as numbers (masks, position ids, rope tables)
    def complete(self, gm: fx.GraphModule, rounds: int = 6) -> int:
        """Give a symbolic size to the dims of position-indexed side tensors -- attention masks built
        from ``arange(L)``, position ids, rotary tables -- which carry no token data, so the provenance
        analysis leaves them as numbers, but which broadcast against a token axis. Broadcasting makes
        an aligned dim of equal size the *same* dim, so the size is carried along broadcasts (pointwise
        ops, ``expand``, an SDPA mask against the score shape ``[B, H, Lq, Lk]``), ``unsqueeze`` /
        ``squeeze`` and copies, backward and forward, until nothing changes. Returns how many dims got
        a symbolic size."""
        nodes: list[fx.Node] = []
        links: list[tuple[fx.Node, fx.Node]] = []  # same tensor seen from two graphs (a HOP's body)
        self._collect(gm, nodes, links)
        for n in nodes:
            self.symbolic(n)
        changed_total = 0
        for _ in range(rounds):
            changed = 0
            for n in reversed(nodes):
                changed += self._complete_node(n, backward=True)
            for a, b in links:
                changed += self._link(a, b) + self._link(b, a)
            changed += self._companion_inputs(gm)
            for n in nodes:
                changed += self._complete_node(n, backward=False)
            changed_total += changed
            if not changed:
                break
        return changed_total

    def _collect(self, gm: fx.GraphModule, nodes: list, links: list) -> None:
        for n in gm.graph.nodes:
            if n.op in ("call_function", "placeholder"):
                nodes.append(n)
            t = n.target
            if n.op == "call_function" and isinstance(t, torch._ops.HigherOrderOperator) and t.name() in _RUN_ONCE_HOPS:
                pos = [i for i, a in enumerate(n.args) if isinstance(a, fx.Node) and a.op == "get_attr"
                       and isinstance(getattr(gm, a.target, None), fx.GraphModule)]
                if len(pos) != 1:
                    continue
                sub = getattr(gm, n.args[pos[0]].target)
                self._collect(sub, nodes, links)
                operands = list(n.args[pos[0] + 1:])
                phs = [x for x in sub.graph.nodes if x.op == "placeholder"]
                for ph, a in zip(phs, operands):
                    if isinstance(a, fx.Node):
                        links.append((a, ph))
                out = next((x for x in sub.graph.nodes if x.op == "output"), None)
                outs = out.args[0] if out is not None else ()
                outs = list(outs) if isinstance(outs, (list, tuple)) else [outs]
                for u in n.users:
                    if u.target is operator.getitem and isinstance(u.args[1], int) and u.args[1] < len(outs):
                        if isinstance(outs[u.args[1]], fx.Node):
                            links.append((outs[u.args[1]], u))

    def _companion_inputs(self, gm: fx.GraphModule) -> int:
        """Integer inputs shaped like the token ids (an attention mask, token type ids, position ids) are
        per-token inputs too: they take the ids' symbolic shape (their length is read through index
        values, which no shape rule can follow)."""
        phs = [n for n in gm.graph.nodes if n.op == "placeholder" and isinstance(n.meta.get("val"), torch.Tensor)
               and not n.meta["val"].is_floating_point()]
        n = 0
        for a in phs:
            sa = self._sym.get(a)
            if not isinstance(sa, tuple) or not any(sympy.sympify(d).free_symbols for d in sa):
                continue
            for b in phs:
                if b is not a and self.concrete(b) == self.concrete(a):
                    n += self._link(a, b)
        return n

    def _link(self, src: fx.Node, dst: fx.Node) -> int:
        a, b = self._sym.get(src), self._sym.get(dst)
        if not isinstance(a, tuple) or not isinstance(b, tuple) or len(a) != len(b):
            return 0
        n = 0
        for i, (x, y) in enumerate(zip(a, b)):
            if sympy.sympify(x).free_symbols and not sympy.sympify(y).free_symbols:
                n += self._set_dim(dst, i, x)
        return n

    def _set_dim(self, node: fx.Node, i: int, expr: sympy.Expr) -> int:
        cur = self._sym.get(node)
        if not isinstance(cur, tuple) or i >= len(cur) or node.name in self.repaired or node.op == "get_attr":
            return 0
        old = sympy.sympify(cur[i])
        if old.free_symbols or not sympy.sympify(expr).free_symbols or int(old) in (0, 1):
            return 0
        try:
            if int(sympy.sympify(expr).subs(self.values)) != int(old):
                return 0
        except Exception:  # noqa: BLE001
            return 0
        new = list(cur)
        new[i] = expr
        self._sym[node] = tuple(new)
        return 1

    def _pairs(self, node: fx.Node) -> list[tuple[fx.Node, list[tuple[int, int]], tuple]]:
        """``[(input, [(input dim, ref dim)], ref shape)]``: which input dims are the same dims as which
        dims of a reference shape (the node's output, or an SDPA's score shape)."""
        out = self._sym.get(node)
        if not isinstance(out, tuple):
            return []
        pk = _packet(node)
        res = []

        def right_aligned(x: fx.Node, ref: tuple) -> None:
            s = self._sym.get(x)
            if not isinstance(s, tuple) or len(s) > len(ref):
                return
            off = len(ref) - len(s)
            res.append((x, [(i, i + off) for i in range(len(s))], ref))

        if pk in _SDPA_PACKETS:
            args = list(node.args) + [None] * 4
            q, k = args[0], args[1]
            mask = args[3] if isinstance(args[3], fx.Node) else node.kwargs.get("attn_mask")
            qs, ks = self._sym.get(q), self._sym.get(k)
            if isinstance(mask, fx.Node) and isinstance(qs, tuple) and isinstance(ks, tuple) and len(qs) >= 2:
                right_aligned(mask, tuple(qs[:-1]) + (ks[-2],))
            return res
        if pk is aten.masked_scatter:
            for a in node.args[:2]:
                if isinstance(a, fx.Node):
                    right_aligned(a, out)
            return res
        if pk is aten.embedding and len(node.args) >= 2 and isinstance(node.args[1], fx.Node):
            idx = node.args[1]
            xs = self._sym.get(idx)
            if isinstance(xs, tuple) and len(xs) == len(out) - 1:
                res.append((idx, [(i, i) for i in range(len(xs))], out))
            return res
        if pk is aten.cat and node.args and isinstance(node.args[0], (list, tuple)):
            d = int(node.args[1]) if len(node.args) > 1 else int(node.kwargs.get("dim", 0))
            d = d if d >= 0 else d + len(out)
            for a in node.args[0]:
                xs = self._sym.get(a) if isinstance(a, fx.Node) else None
                if isinstance(xs, tuple) and len(xs) == len(out):
                    res.append((a, [(i, i) for i in range(len(xs)) if i != d], out))
            return res
        if pk in (aten.permute, aten.transpose, aten.t) and node.args and isinstance(node.args[0], fx.Node):
            x = node.args[0]
            xs = self._sym.get(x)
            if not isinstance(xs, tuple) or len(xs) != len(out):
                return res
            r = len(xs)
            if pk is aten.permute:
                perm = [int(p) % r for p in node.args[1]]
            else:
                d0, d1 = (int(node.args[1]) % r, int(node.args[2]) % r) if pk is aten.transpose else (0, 1 % max(r, 1))
                perm = list(range(r))
                perm[d0], perm[d1] = perm[d1], perm[d0]
            res.append((x, [(perm[j], j) for j in range(r)], out))
            return res
        if pk in (aten.view, aten.reshape, aten._unsafe_view, aten.flatten, aten.unflatten) and node.args \
                and isinstance(node.args[0], fx.Node):
            # a reshape keeps a dim when it has the same size and the same number of elements before it
            x = node.args[0]
            xc, oc = self.concrete(x), self.concrete(node)
            if isinstance(xc, tuple) and isinstance(oc, tuple) and isinstance(self._sym.get(x), tuple):
                def starts(sh):
                    acc, out_ = 1, []
                    for d in sh:
                        out_.append(acc)
                        acc *= int(d)
                    return out_
                si, so = starts(xc), starts(oc)
                pairs = [(i, j) for i in range(len(xc)) for j in range(len(oc))
                         if int(xc[i]) == int(oc[j]) and si[i] == so[j] and int(xc[i]) > 1]
                if pairs:
                    res.append((x, pairs, out))
            return res
        if pk is aten.expand or _is_broadcasting(node):
            for a in node.all_input_nodes:
                right_aligned(a, out)
            return res
        if pk is aten.unsqueeze and isinstance(node.args[0], fx.Node):
            x = node.args[0]
            d = int(node.args[1])
            d = d if d >= 0 else d + len(out)
            xs = self._sym.get(x)
            if isinstance(xs, tuple):
                res.append((x, [(i, i if i < d else i + 1) for i in range(len(xs))], out))
            return res
        if pk is aten.squeeze and isinstance(node.args[0], fx.Node):
            x = node.args[0]
            xc = self.concrete(x)
            if isinstance(xc, tuple):
                # map the non-squeezed dims in order (dims removed are size 1)
                dims = node.args[1] if len(node.args) > 1 else None
                dims = [dims] if isinstance(dims, int) else list(dims) if dims is not None else [i for i, d in enumerate(xc) if int(d) == 1]
                dims = [d + len(xc) if d < 0 else d for d in dims]
                kept = [i for i in range(len(xc)) if not (i in dims and int(xc[i]) == 1)]
                if len(kept) == len(out):
                    res.append((x, [(i, j) for j, i in enumerate(kept)], out))
            return res
        return res

    def _complete_node(self, node: fx.Node, backward: bool) -> int:
        n = 0
        for x, pairs, ref in self._pairs(node):
            xs = self._sym.get(x)
            if not isinstance(xs, tuple):
                continue
            for i, j in pairs:
                if i >= len(xs) or j >= len(ref):
                    continue
                a, b = sympy.sympify(xs[i]), sympy.sympify(ref[j])
                if backward and b.free_symbols and not a.free_symbols:
                    n += self._set_dim(x, i, b)
                elif not backward and a.free_symbols and not b.free_symbols and ref is self._sym.get(node):
                    n += self._set_dim(node, j, a)
        return n


_SDPA_PACKETS = {getattr(aten, n) for n in (
    "scaled_dot_product_attention", "_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_attention_math",
    "_scaled_dot_product_efficient_attention", "_scaled_dot_product_flash_attention", "_scaled_dot_product_cudnn_attention",
) if hasattr(aten, n)}
_BROADCAST_EXTRA = {getattr(aten, n) for n in (
    "where", "masked_fill", "_to_copy", "to", "clone", "alias", "detach", "contiguous", "type_as", "lift_fresh_copy",
    "bitwise_and", "bitwise_or", "__and__", "__or__", "logical_and", "logical_or", "logical_not", "bitwise_not",
) if hasattr(aten, n)}


def _is_broadcasting(node: fx.Node) -> bool:
    """Pointwise ops (and copies/casts): output dims and right-aligned input dims of equal size coincide."""
    t = node.target
    if not isinstance(t, torch._ops.OpOverload):
        return False
    if t.overloadpacket in _BROADCAST_EXTRA:
        return True
    return torch.Tag.pointwise in t.tags


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
class _NodeCost:
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


class _Coster:
    """Costs of nodes, memoised over (op, input shapes, arguments): a model's identical layers cost
    one evaluation of each formula."""

    def __init__(self, shapes: _Shapes, gm: fx.GraphModule | None = None, flat_inputs: Sequence | None = None):
        self.shapes = shapes
        self.cache: dict = {}
        self.gm = gm
        self.flat_inputs = flat_inputs
        self._rows: dict[fx.Node, int | None] = {}

    def _scored_rows(self, node: fx.Node) -> int | None:
        """Query rows ``graphred::attention_scores`` really runs: the rows with weight in some sample
        (read from the bookkeeping that computes the weights, at the example inputs), as its kernel does."""
        if node in self._rows:
            return self._rows[node]
        rows = None
        w = node.args[2] if len(node.args) > 2 else node.kwargs.get("query_weight")
        if isinstance(w, fx.Node) and self.gm is not None and self.flat_inputs is not None:
            got = partial_evaluate(self.gm, self.flat_inputs, [w]).get(w)
            if isinstance(got, torch.Tensor) and got.dim() >= 1:
                rows = int((got != 0).reshape(got.shape[0], -1).any(0).sum()) if got.dim() >= 2 else int((got != 0).sum())
        self._rows[node] = rows
        return rows

    def _attention_scores(self, node: fx.Node, shape_of: Callable, symbolic: bool):
        rows = self._scored_rows(node)
        q = node.args[0]
        qs = shape_of(q) if isinstance(q, fx.Node) else None
        if rows is None or not isinstance(qs, tuple) or len(qs) != 4:
            return None
        lq = sympy.sympify(qs[2])
        try:
            if int(lq.subs(self.shapes.values)) == rows:
                return None  # every row is scored
        except Exception:  # noqa: BLE001
            return None
        r_expr: sympy.Expr = sympy.Integer(rows)
        if symbolic:  # the scored rows are one modality's span of the query stream (the text): keep its symbol
            for term in sympy.Add.make_args(sympy.expand(lq)):
                if term.free_symbols and int(term.subs(self.shapes.values)) == rows:
                    r_expr = term
                    break

        def with_rows(n: fx.Node):
            s = shape_of(n)
            if n is q and isinstance(s, tuple):
                return (s[0], s[1], r_expr, s[3])
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
        if node.op == "call_function" and "graphred" in str(node.target):
            res = None
            if "attention_scores" in str(node.target):
                res = self._attention_scores(node, shape_of, symbolic)
            elif "bipartite_match" in str(node.target):
                res = self._bipartite_match(node, shape_of, symbolic)
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


# =============================================================================================
# grouping: layers, towers, the rest
# =============================================================================================


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


class _Grouper:
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


# =============================================================================================
# KV cache
# =============================================================================================

_KV_WALK = {aten.expand, aten.unsqueeze, aten.reshape, aten.view, aten._unsafe_view, aten.clone, aten.contiguous,
            aten.alias, aten.repeat_interleave, aten.repeat, aten._to_copy, aten.to, aten.squeeze, aten.flatten,
            aten.unflatten}


def _packet(node: fx.Node):
    t = node.target
    return t.overloadpacket if isinstance(t, torch._ops.OpOverload) else t


def _pre_expansion(node: fx.Node) -> fx.Node:
    """Walk up from an attention's key/value through the grouped-query expansion (``repeat_kv``:
    unsqueeze, expand, reshape; ``repeat_interleave``) to the smallest tensor holding the same data."""
    best = node
    cur = node

    def numel(n):
        v = n.meta.get("val")
        if not isinstance(v, torch.Tensor):
            return math.inf
        p = 1
        for s in v.shape:
            p *= hint_int(s)
        return p

    for _ in range(8):
        if cur.op != "call_function" or _packet(cur) not in _KV_WALK or not cur.args or not isinstance(cur.args[0], fx.Node):
            break
        cur = cur.args[0]
        v = cur.meta.get("val")
        if not isinstance(v, torch.Tensor):
            break
        if numel(cur) <= numel(best):  # on a tie, the tensor further up (before unsqueeze/expand)
            best = cur
    return best


@dataclass
class KVCache:
    """The KV cache a generative decoder keeps after the prompt (prefill) at the example inputs.

    ``bytes`` = sum over decoder layers of K and V as stored (before grouped-query expansion);
    ``bytes_per_token`` what one more token adds (all layers, whole batch).
    """

    bytes: int = 0
    expr: sympy.Expr = _ZERO
    bytes_per_token: int = 0
    layers: list[dict] = field(default_factory=list)
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"bytes": int(self.bytes), "expr": str(self.expr), "bytes_per_token": int(self.bytes_per_token),
                "layers": list(self.layers), "note": self.note}


def _vocab_heads(gm: fx.GraphModule) -> list[fx.Node]:
    """Nodes computing logits over the input vocabulary: a matmul whose output's last dim is the row
    count of an embedding table indexed by a graph input (token ids)."""
    vocabs = set()
    for n in gm.graph.nodes:
        if n.op == "call_function" and _packet(n) is aten.embedding and len(n.args) >= 2:
            w, idx = n.args[0], n.args[1]
            wv = w.meta.get("val") if isinstance(w, fx.Node) else None
            if isinstance(idx, fx.Node) and idx.op == "placeholder" and isinstance(wv, torch.Tensor):
                vocabs.add(hint_int(wv.shape[0]))
    heads = []
    if not vocabs:
        return heads
    for n in gm.graph.nodes:
        if n.op == "call_function" and _packet(n) in (aten.linear, aten.matmul, aten.mm, aten.addmm):
            v = n.meta.get("val")
            if isinstance(v, torch.Tensor) and v.dim() >= 2 and hint_int(v.shape[-1]) in vocabs:
                heads.append(n)
    return heads


def _kv_cache(gm: fx.GraphModule, blocks: Sequence[AttentionBlock], shapes: _Shapes) -> KVCache:
    heads = _vocab_heads(gm)
    if not heads:
        return KVCache(note="no generative decoder (no head over the input vocabulary): no KV cache")
    anc = _ancestors(heads)
    byname = {n.name: n for n in gm.graph.nodes}
    out = KVCache()
    per_token = 0
    exprs = []
    for b in blocks:
        node = byname.get(b.node)
        if node is None or node not in anc:
            continue
        if b.kind == CROSS_ATTENTION or (b.query_stream is not None and b.key_stream is not None
                                         and b.query_stream != b.key_stream):
            continue  # a cross-attention's keys come from the other sequence, computed once
        if TEXT not in b.query_modalities:
            continue  # a vision tower feeding the decoder: no cache
        k, v = byname.get(b.key), byname.get(b.value)
        if k is None or v is None:
            continue
        total, expr, tok = 0, _ZERO, 0
        info = {"module_path": b.module_path}
        for name, t in (("k", _pre_expansion(k)), ("v", _pre_expansion(v))):
            val = t.meta.get("val")
            conc = shapes.concrete(t)
            sym = shapes.symbolic(t)
            if not isinstance(val, torch.Tensor) or not isinstance(conc, tuple):
                continue
            n_el = int(sympy.Mul(*conc)) if conc else 1
            nbytes = n_el * val.element_size()
            total += nbytes
            expr += (sympy.Mul(*sym) if sym else sympy.Integer(1)) * val.element_size()
            seq = hint_int(val.shape[-2]) if val.dim() >= 2 else 1
            tok += nbytes // max(seq, 1)
            info[f"{name}_shape"] = [int(x) for x in conc]
            info[f"{name}_node"] = t.name
            if name == "k" and val.dim() == 4:
                info["heads_kv"] = int(conc[1])
                info["head_dim"] = int(conc[3])
        info["query_heads"] = b.num_heads
        info["bytes"] = total
        out.layers.append(info)
        out.bytes += total
        exprs.append(expr)
        per_token += tok
    out.expr = sympy.Add(*exprs) if exprs else _ZERO
    out.bytes_per_token = per_token
    if not out.layers:
        out.note = "a vocabulary head exists but no self-attention block with text queries feeds it"
    return out


# =============================================================================================
# the Estimate
# =============================================================================================


def _human(n: float, unit: str = "") -> str:
    n = float(n)
    for scale, suf in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= scale:
            return f"{n / scale:.3g} {suf}{unit}"
    return f"{n:.4g} {unit}".rstrip()


def _human_bytes(n: float) -> str:
    n = float(n)
    for scale, suf in ((2**40, "TiB"), (2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
        if abs(n) >= scale:
            return f"{n / scale:.3g} {suf}"
    return f"{int(n)} B"


def _subs_int(expr: sympy.Expr, values: Mapping) -> int:
    v = sympy.sympify(expr).subs(values)
    return int(v) if v.is_number else v


@dataclass
class Estimate:
    """What :func:`estimate` predicts. Numbers are at the example inputs (``symbols``); every ``*_expr``
    is the same quantity as a sympy expression in the token symbols and batch ``B``.

    >>> import graphred
    >>> model, inputs = graphred.zoo.load(graphred.zoo.TEST_NAMES[0])  # a decoder VLM
    >>> est = graphred.estimate(graphred.capture(model, **inputs))
    >>> n_img = est.symbol("n_img")
    >>> int(est.flops_matmul_expr.subs(est.symbols)) == est.flops_matmul
    True
    """

    model_class: str
    name: str
    symbols: dict[sympy.Symbol, int]
    flops: int
    flops_matmul: int
    flops_expr: sympy.Expr
    flops_matmul_expr: sympy.Expr
    bytes_moved: int
    bytes_moved_expr: sympy.Expr
    weights: WeightBytes
    memory: MemoryProfile
    kv_cache: KVCache
    groups: list[GroupCost]
    blocks: list[AttentionBlock]
    uncounted: list[Uncounted]
    notes: list[str] = field(default_factory=list)
    plan: Any = None
    after: Estimate | None = None
    seconds: float = 0.0
    _nodes: list[_NodeCost] = field(default_factory=list, repr=False)

    # ------------------------------------------------------------------ plain figures
    @property
    def weight_bytes(self) -> int:
        return self.weights.total

    @property
    def peak_activation_bytes(self) -> int:
        return self.memory.peak_bytes

    @property
    def peak_activation_expr(self) -> sympy.Expr:
        return self.memory.peak_expr

    @property
    def kv_cache_bytes(self) -> int:
        return self.kv_cache.bytes

    @property
    def kv_cache_expr(self) -> sympy.Expr:
        return self.kv_cache.expr

    @property
    def speedup(self) -> float | None:
        """Predicted speedup of the plan: FLOPs before / FLOPs after (all FLOPs)."""
        if self.after is None or not self.after.flops:
            return None
        return self.flops / self.after.flops

    @property
    def speedup_matmul(self) -> float | None:
        if self.after is None or not self.after.flops_matmul:
            return None
        return self.flops_matmul / self.after.flops_matmul

    @property
    def flops_reduction(self) -> float | None:
        """1 - FLOPs after / FLOPs before."""
        if self.after is None or not self.flops:
            return None
        return 1.0 - self.after.flops / self.flops

    @property
    def complete(self) -> bool:
        return not self.uncounted

    def towers(self) -> dict[str, dict[str, Any]]:
        """FLOPs per tower (``""``: outside every tower, e.g. ``lm_head``), with its blocks' modalities."""
        out: dict[str, dict[str, Any]] = {}
        for g in self.groups:
            t = out.setdefault(g.tower, {"flops": 0, "flops_matmul": 0, "flops_expr": _ZERO,
                                         "flops_matmul_expr": _ZERO, "modalities": set(), "groups": []})
            t["flops"] += g.flops
            t["flops_matmul"] += g.flops_matmul
            t["flops_expr"] += g.flops_expr
            t["flops_matmul_expr"] += g.flops_matmul_expr
            t["groups"].append(g.name)
            for b in g.blocks:
                t["modalities"] |= set(b.query_modalities) | set(b.key_modalities)
        return out

    def group(self, name: str) -> GroupCost:
        for g in self.groups:
            if g.name == name:
                return g
        raise KeyError(f"no group {name!r}; groups: {', '.join(g.name for g in self.groups)}")

    # ------------------------------------------------------------------ symbols
    def symbol(self, name: str | sympy.Symbol) -> sympy.Symbol:
        """The estimate's own token symbol called ``name`` (``"n_img"``, ``"n_txt"``, ``"B"``, ...); a sympy
        symbol of that name (``sympy.Symbol("n_img")``, whatever its assumptions) gives the same one.
        Use it to build what-ifs: ``n = est.symbol("n_img"); est.flops_with({n: n / 2})``."""
        key = name.name if isinstance(name, sympy.Symbol) else name
        for s in self.symbols:
            if s.name == key:
                return s
        raise KeyError(f"no symbol {key!r} in this estimate; symbols: {', '.join(s.name for s in self.symbols)}")

    def _own_symbols(self, e: Any) -> Any:
        """``e`` with every sympy symbol named like one of the estimate's replaced by the estimate's."""
        if not isinstance(e, sympy.Basic):
            return e
        own = {s.name: s for s in self.symbols}
        return e.xreplace({f: own[f.name] for f in e.free_symbols if isinstance(f, sympy.Symbol) and f.name in own})

    def _kind_expr(self, kind: str) -> sympy.Expr:
        if kind not in ("all", "matmul"):
            raise ValueError(f"kind must be 'all' or 'matmul', got {kind!r}")
        return self.flops_expr if kind == "all" else self.flops_matmul_expr

    def flops_as_function_of(self, symbol: str | sympy.Symbol, kind: str = "all") -> sympy.Expr:
        """FLOPs as an expression in one symbol, the others fixed at their example values.

        >>> import graphred
        >>> model, inputs = graphred.zoo.load(graphred.zoo.TEST_NAMES[0])  # a decoder VLM
        >>> est = graphred.estimate(graphred.capture(model, **inputs))
        >>> f = est.flops_as_function_of("n_img", kind="matmul")
        >>> f.free_symbols == {est.symbol("n_img")}
        True
        """
        s = self.symbol(symbol)
        return sympy.expand(self._kind_expr(kind).subs({k: v for k, v in self.symbols.items() if k != s}))

    def evaluate(self, expr: sympy.Expr | str = "flops", **values: int) -> int:
        """An expression (or the name of one: ``"flops"``, ``"flops_matmul"``, ``"peak_activation"``,
        ``"kv_cache"``) at the example inputs with some symbols changed: ``est.evaluate(n_img=288)``."""
        named = {"flops": self.flops_expr, "flops_matmul": self.flops_matmul_expr,
                 "peak_activation": self.peak_activation_expr, "kv_cache": self.kv_cache_expr,
                 "bytes_moved": self.bytes_moved_expr}
        e = named[expr] if isinstance(expr, str) else expr
        subs = dict(self.symbols)
        for k, v in values.items():
            subs[self.symbol(k)] = v
        return _subs_int(e, subs)

    # ------------------------------------------------------------------ what-ifs
    def _start_order(self, start: str | int | None) -> int:
        if start is None:
            return -1
        if isinstance(start, int):
            layers = self.decoder_layers()
            if not layers:
                raise ValueError("this model has no decoder stack: name the group to start from")
            match = [g for g in layers if g.layer_index == start]
            if not match:
                raise ValueError(f"no decoder layer {start}; decoder layers: "
                                 f"{', '.join(str(g.layer_index) for g in layers)}")
            start = match[0].name
        gi = [i for i, g in enumerate(self.groups) if g.name == start]
        if gi:
            orders = [n.order for n in self._nodes if n.group == gi[0]]
            return min(orders) if orders else -1
        for n in self._nodes:
            if n.name == start:
                return n.order
        raise KeyError(f"{start!r} is neither a group nor a node of this estimate")

    def flops_with(self, subs: Mapping, start: str | int | None = None, kind: str = "all") -> sympy.Expr:
        """FLOPs as an expression when ``subs`` (``{n_img: keep * n_img}``) holds for every node from
        ``start`` on (a group name such as ``"model.language_model.layers.2"``, a decoder layer index, a
        node name; None: everywhere) -- e.g. a pruning step's analytic effect, without the step's own cost.
        Keys are symbol names or sympy symbols (``est.symbol("n_img")``, or a plain ``sympy.Symbol("n_img")``:
        matched by name); a key naming no symbol of the estimate raises KeyError.

        >>> import graphred, sympy
        >>> model, inputs = graphred.zoo.load(graphred.zoo.TEST_NAMES[0])  # a decoder VLM
        >>> est = graphred.estimate(graphred.capture(model, **inputs))
        >>> n = est.symbol("n_img")
        >>> e = est.flops_with({n: n / 2}, start=1, kind="matmul")
        >>> int(e.subs(est.symbols)) < est.flops_matmul
        True
        """
        if kind not in ("all", "matmul"):
            raise ValueError(f"kind must be 'all' or 'matmul', got {kind!r}")
        subs = {self.symbol(k): self._own_symbols(v) for k, v in subs.items()}  # names or symbols; unknown: KeyError
        first = self._start_order(start)
        before, after = [], []
        for n in self._nodes:
            e = n.flops_expr if kind == "all" else n.flops_matmul_expr
            (after if n.order >= first else before).append(e)
        return sympy.Add(*before) + sympy.Add(*after).subs(subs)

    def decoder_layers(self) -> list[GroupCost]:
        """Layer groups of the stack that holds the cross-modal self-attention (the decoder), in order."""
        stacks = [g.stack for g in self.groups if g.kind == "layer" and any(b.kind == "cross_modal_self" for b in g.blocks)]
        if not stacks:
            return []
        return [g for g in self.groups if g.kind == "layer" and g.stack == stacks[0]]

    def solve_tokens_for_reduction(self, target: float, symbol: str | sympy.Symbol = "n_img",
                                   start: str | int | None = None, kind: str = "all") -> float:
        """The count of ``symbol`` tokens (from ``start`` on) at which FLOPs fall by ``target`` (0.45 = 45%).

        Solved with sympy on the estimate's expression; raises ValueError when even 0 tokens cannot reach
        the target (the rest of the model costs too much), saying what the ceiling is.
        """
        s = self.symbol(symbol)
        if not 0 < target < 1:
            raise ValueError(f"target must be a fraction in (0, 1), got {target}")
        x = sympy.Symbol("x", nonnegative=True)
        total = self._kind_expr(kind).subs(self.symbols)
        after = self.flops_with({s: x}, start=start, kind=kind).subs({k: v for k, v in self.symbols.items() if k != s})
        after = after.subs(s, self.symbols[s])
        n0 = self.symbols[s]
        goal = (1 - sympy.Rational(str(target))) * total
        floor_cost = after.subs(x, 0)
        if floor_cost > goal:
            best = 1 - float(floor_cost / total)
            raise ValueError(f"a {target:.0%} FLOP reduction is out of reach by removing {s} tokens"
                             f"{f' from {start}' if start is not None else ''}: even 0 of them saves {best:.1%}")
        sols = [sympy.nsimplify(r) for r in sympy.solve(sympy.Eq(after, goal), x)]
        real = sorted(float(r) for r in sols if r.is_real and 0 <= float(r) <= n0 + 1e-9)
        if not real:
            f = sympy.lambdify(x, after - goal)
            lo, hi = 0.0, float(n0)
            for _ in range(200):
                mid = (lo + hi) / 2
                if f(mid) > 0:
                    hi = mid
                else:
                    lo = mid
            return lo
        return real[-1]

    def solve_keep_for_reduction(self, target: float, symbol: str | sympy.Symbol = "n_img",
                                 start: str | int | None = None, kind: str = "all") -> float:
        """The keep ratio of ``symbol`` tokens (from ``start`` on) that reduces FLOPs by ``target``.

        >>> import graphred
        >>> model, inputs = graphred.zoo.load(graphred.zoo.TEST_NAMES[0])  # a decoder VLM
        >>> est = graphred.estimate(graphred.capture(model, **inputs))
        >>> keep = est.solve_keep_for_reduction(0.2, "n_img", start=1)
        >>> 0 < keep < 1
        True
        """
        s = self.symbol(symbol)
        return self.solve_tokens_for_reduction(target, s, start, kind) / self.symbols[s]

    def solve_layer_for_reduction(self, target: float, keep: float, symbol: str | sympy.Symbol = "n_img",
                                  kind: str = "all") -> int | None:
        """The latest decoder layer to start keeping ``keep`` of the ``symbol`` tokens at that still
        reduces FLOPs by ``target`` (None when no layer does)."""
        s = self.symbol(symbol)
        best = None
        total = self._kind_expr(kind).subs(self.symbols)
        for g in self.decoder_layers():
            e = self.flops_with({s: keep * s}, start=g.name, kind=kind).subs(self.symbols)
            if 1 - e / total >= target:
                best = g.layer_index
        return best

    # ------------------------------------------------------------------ output
    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "model_class": self.model_class,
            "name": self.name,
            "symbols": {s.name: int(v) for s, v in self.symbols.items()},
            "flops": int(self.flops),
            "flops_matmul": int(self.flops_matmul),
            "flops_expr": str(self.flops_expr),
            "flops_matmul_expr": str(self.flops_matmul_expr),
            "bytes_moved": int(self.bytes_moved),
            "weights": {"bytes": int(self.weights.total), "parameters": int(self.weights.parameters),
                        "buffers": int(self.weights.buffers), "tensors": int(self.weights.count),
                        "tied": dict(self.weights.shared)},
            "peak_activation": {"bytes": int(self.memory.peak_bytes), "expr": str(self.memory.peak_expr),
                                "node": self.memory.peak_node, "module_path": self.memory.peak_module,
                                "input_bytes": int(self.memory.input_bytes),
                                "exact_symbolic": bool(self.memory.exact_symbolic)},
            "kv_cache": self.kv_cache.to_dict(),
            "groups": [g.to_dict() for g in self.groups],
            "towers": {k or "<none>": {"flops": int(v["flops"]), "flops_matmul": int(v["flops_matmul"]),
                                       "modalities": sorted(v["modalities"])} for k, v in self.towers().items()},
            "uncounted": [{"node": u.name, "op": u.op, "reason": u.reason} for u in self.uncounted],
            "notes": list(self.notes),
            "seconds": round(self.seconds, 3),
        }
        if self.plan is not None:
            d["plan"] = str(self.plan)
        if self.after is not None:
            d["after"] = self.after.to_dict()
            d["speedup"] = self.speedup
            d["speedup_matmul"] = self.speedup_matmul
            d["flops_reduction"] = self.flops_reduction
        return d

    def _table(self) -> list[str]:
        total = max(self.flops, 1)
        rows = [("group", "attention", "matmul FLOPs", "all FLOPs", "share")]
        for g in self.groups:
            att = ", ".join(sorted({f"{b.kind}" for b in g.blocks})) if g.blocks else ""
            rows.append((g.name, att, _human(g.flops_matmul), _human(g.flops), f"{100 * g.flops / total:.1f}%"))
        widths = [max(len(r[i]) for r in rows) for i in range(5)]
        out = []
        for j, r in enumerate(rows):
            out.append("  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip())
            if j == 0:
                out.append("  ".join("-" * w for w in widths))
        return out

    def __str__(self) -> str:
        syms = ", ".join(f"{s.name}={v}" for s, v in self.symbols.items())
        lines = [f"{self.model_class}{f' ({self.name})' if self.name else ''}: cost estimate at {syms}", ""]
        lines.append(f"FLOPs        {_human(self.flops)} total, {_human(self.flops_matmul)} in matrix products")
        lines.append(f"  as a function of the tokens: {sympy.collect(sympy.expand(self.flops_matmul_expr), list(self.symbols))}  (matmul)")
        lines.append(f"weights      {_human_bytes(self.weights.total)} ({self.weights.count} tensors)")
        lines.append(f"activations  peak {_human_bytes(self.memory.peak_bytes)} (inputs included), at {self.memory.peak_node}"
                     f"{f' in {self.memory.peak_module}' if self.memory.peak_module else ''}")
        if self.kv_cache.layers:
            lines.append(f"KV cache     {_human_bytes(self.kv_cache.bytes)} after the prompt, {len(self.kv_cache.layers)} decoder layers, "
                         f"{_human_bytes(self.kv_cache.bytes_per_token)} per further token (whole batch)")
        else:
            lines.append(f"KV cache     none ({self.kv_cache.note})")
        lines.append("")
        lines.extend(self._table())
        if self.after is not None:
            a = self.after
            lines.append("")
            lines.append(f"after {self.plan}:")
            lines.append(f"  FLOPs        {_human(a.flops)} total ({_human(a.flops_matmul)} matmul): "
                         f"reduction {100 * (self.flops_reduction or 0):.1f}%, predicted speedup x{self.speedup:.2f}")
            lines.append(f"  activations  peak {_human_bytes(a.memory.peak_bytes)}")
            if a.kv_cache.layers:
                lines.append(f"  KV cache     {_human_bytes(a.kv_cache.bytes)}")
        if self.uncounted:
            ops = sorted({u.op for u in self.uncounted})
            lines.append("")
            lines.append(f"uncounted: {len(self.uncounted)} node(s) without a cost formula ({', '.join(ops)}): "
                         "the FLOP totals are lower bounds by their cost")
        for n in self.notes:
            lines.append(f"note: {n}")
        return "\n".join(lines)


# =============================================================================================
# building an Estimate
# =============================================================================================


def _analysis(program: Program, value_inputs: tuple | None):
    """Provenance + blocks; for a meta-device program the example values come from ``value_inputs``."""
    gm = program.graph_module
    notes: list[str] = []
    flat_values = None
    if _is_meta_program(program):
        if value_inputs is not None:
            flat_values = _flat_inputs(gm, *value_inputs)
            prov = TokenProvenance(gm, program.example_inputs(), value_inputs=value_inputs)
        else:
            prov = TokenProvenance(gm, program.example_inputs())
            notes.append("captured on the meta device without value_inputs: the image/text split of the token "
                         "streams could not be read (pass value_inputs=(args, kwargs) on the CPU)")
    else:  # the bookkeeping only, not the model: the same values as running the graph, at a fraction of the cost
        flat_values = _flat_inputs(gm, *program.example_inputs())
        prov = TokenProvenance(gm, program.example_inputs())
    blocks = detect_blocks(gm, prov)
    return prov, blocks, flat_values, notes


def _count(gm: fx.GraphModule, shapes: _Shapes, grouper: _Grouper | None, group_index: dict[str, int],
           groups: list[GroupCost], symbolic: bool = True,
           flat_inputs: Sequence | None = None) -> tuple[list[_NodeCost], list[Uncounted]]:
    coster = _Coster(shapes, gm, flat_inputs)
    nodes: list[_NodeCost] = []
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
        nodes.append(_NodeCost(qual, gi, fa, fm, by, sym[0], sym[1], sym[2], order))
    return nodes, uncounted


def _sum_groups(groups: list[GroupCost], nodes: list[_NodeCost]) -> None:
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


def _check_expr(name: str, expr: sympy.Expr, value: int, symbols: Mapping, notes: list[str]) -> None:
    try:
        got = sympy.sympify(expr).subs(symbols)
        ok = got.is_number and int(got) == int(value)
    except Exception:  # noqa: BLE001
        ok, got = False, "?"
    if not ok:
        notes.append(f"{name}: the expression gives {got} at the example inputs, the graph {value} "
                     "(a size the provenance analysis did not express in the token symbols)")


def _estimate_graph(program: Program, gm: fx.GraphModule, prov: TokenProvenance | None, blocks: list[AttentionBlock],
                    unbacked: Mapping[str, int], notes: list[str], *, grouper: _Grouper | None = None,
                    name: str = "", sym_nodes: Callable | None = None, flat_inputs: Sequence | None = None) -> Estimate:
    t0 = time.perf_counter()
    symbols = dict(prov.symbol_values) if prov is not None else {}
    shapes = _Shapes(prov, symbols, unbacked)
    if sym_nodes is not None:
        shapes = sym_nodes(shapes)
    if prov is not None:
        shapes.complete(gm)
    grouper = grouper or _Grouper(blocks)
    groups: list[GroupCost] = []
    group_index: dict[str, int] = {}
    for b in blocks:  # layer groups first, in block order, so they carry their blocks
        gname = grouper.layer_of_block.get(b.node)
        if gname is None:
            continue
        if gname not in group_index:
            group_index[gname] = len(groups)
            st, idx = split_stack(gname)
            groups.append(GroupCost(gname, "layer", grouper.tower_of(gname), *((st, idx) if st != gname else (None, None))))
        groups[group_index[gname]].blocks.append(b)
    nodes, uncounted = _count(gm, shapes, grouper, group_index, groups, flat_inputs=flat_inputs)
    # groups in order of first node
    first = {}
    for n in nodes:
        first.setdefault(n.group, n.order)
    order = sorted(range(len(groups)), key=lambda i: first.get(i, math.inf))
    remap = {old: new for new, old in enumerate(order)}
    groups = [groups[i] for i in order]
    for n in nodes:
        n.group = remap[n.group]
    _sum_groups(groups, nodes)

    flops = sum(n.flops for n in nodes)
    flops_mm = sum(n.flops_matmul for n in nodes)
    bytes_moved = sum(n.bytes for n in nodes)
    flops_expr = sympy.Add(*[n.flops_expr for n in nodes]) if nodes else _ZERO
    flops_mm_expr = sympy.Add(*[n.flops_matmul_expr for n in nodes]) if nodes else _ZERO
    bytes_expr = sympy.Add(*[n.bytes_expr for n in nodes]) if nodes else _ZERO

    mem = activation_memory(gm, shapes.symbolic if prov is not None else None, symbols, unbacked=unbacked)
    kv = _kv_cache(gm, blocks, shapes)
    wb = weight_bytes(gm)
    if shapes.repaired:
        notes.append(f"{len(shapes.repaired)} node(s) have sizes the provenance analysis did not write in the "
                     "token symbols; their dims are kept at the example values in the expressions")
    for label, e, v in (("flops", flops_expr, flops), ("flops_matmul", flops_mm_expr, flops_mm),
                        ("kv_cache", kv.expr, kv.bytes)):
        _check_expr(label, e, v, symbols, notes)
    return Estimate(
        model_class=program.model_class, name=name or program.name, symbols=symbols, flops=flops,
        flops_matmul=flops_mm, flops_expr=flops_expr, flops_matmul_expr=flops_mm_expr, bytes_moved=bytes_moved,
        bytes_moved_expr=bytes_expr, weights=wb, memory=mem, kv_cache=kv, groups=groups, blocks=list(blocks),
        uncounted=uncounted, notes=notes, seconds=time.perf_counter() - t0, _nodes=nodes,
    )


def _apply_plan_fn():
    import importlib

    passes = importlib.import_module("graphred.passes")
    fn = getattr(passes, "apply_plan", None)
    if fn is None:
        try:
            fn = getattr(importlib.import_module("graphred.passes.apply"), "apply_plan", None)
        except ImportError:
            fn = None
    if fn is None:
        raise PlanError("plan estimates need graphred.passes.apply_plan")
    return fn


class _AfterShapes(_Shapes):
    """Shapes of the reduced graph: an original node's symbolic shape under ``subs_at``; a node the plan
    added takes, dim by dim, the symbolic dim of an input with the same value (else the concrete one)."""

    def __init__(self, base: _Shapes, before_sym: Mapping[str, Any], subs_at: Mapping[str, Mapping]):
        super().__init__(None, base.values, base.unbacked)
        self.before_sym = before_sym
        self.subs_at = subs_at

    def symbolic(self, node: fx.Node):
        if node in self._sym:
            return self._sym[node]
        conc = self.concrete(node)
        out = conc
        if isinstance(conc, tuple):
            sym = self.before_sym.get(node.name)
            if isinstance(sym, tuple) and len(sym) == len(conc):
                subs = self.subs_at.get(node.name) or {}
                cand = tuple(sympy.sympify(d).subs(subs) for d in sym)
                if all(self._same(c, d) for c, d in zip(cand, conc)):
                    out = cand
                else:  # a node the rewrite re-specialised: keep what still matches
                    out = tuple(c if self._same(c, d) else d for c, d in zip(cand, conc))
            else:
                out = self._from_inputs(node, conc)
        self._sym[node] = out
        return out

    def _same(self, e, d) -> bool:
        try:
            return int(sympy.sympify(e).subs(self.values)) == int(d)
        except Exception:  # noqa: BLE001
            return False

    def _from_inputs(self, node: fx.Node, conc: tuple) -> tuple:
        ins = [a for a in node.all_input_nodes if isinstance(a.meta.get("val"), torch.Tensor)]
        dims = []
        for i, d in enumerate(conc):
            pick = d
            for a in ins:  # same position first, then any
                s = self.symbolic(a)
                if isinstance(s, tuple) and len(s) == len(conc) and i < len(s):
                    e = sympy.sympify(s[i])
                    if e.free_symbols and self._same(e, d):
                        pick = e
                        break
            dims.append(pick)
        return tuple(dims)


def _estimate_after(program: Program, before: Estimate, plan: Any, prov: TokenProvenance, grouper: _Grouper,
                    shapes_before: _Shapes, unbacked: Mapping[str, int], flat_inputs: Sequence | None = None,
                    value_inputs: tuple | None = None) -> Estimate:
    apply_plan = _apply_plan_fn()
    try:
        params = inspect.signature(apply_plan).parameters
    except (TypeError, ValueError):
        params = {}
    meta = _is_meta_program(program)
    hook = meta and value_inputs is not None and "value_inputs" in params
    if hook:  # CPU copies of the inputs, for the example values a meta-device graph cannot compute
        applied = apply_plan(program, plan, value_inputs=value_inputs)
    else:  # a meta-device program without value_inputs: apply_plan's PlanError says what is missing
        applied = apply_plan(program, plan)
    gm2 = applied.graph_module
    subs_at = {k: dict(v) for k, v in (getattr(applied, "subs_at", None) or {}).items()}
    before_sym = {}
    for n in program.graph_module.graph.nodes:
        s = shapes_before.symbolic(n)
        if isinstance(s, tuple):
            before_sym[n.name] = s
    notes: list[str] = []
    blocks2 = list(getattr(applied, "blocks", None) or [])
    names2 = {n.name for n in gm2.graph.nodes}
    blocks2 = [b for b in blocks2 if b.node in names2] or [b for b in before.blocks if b.node in names2]
    est = _estimate_graph(
        program, gm2, prov, blocks2, unbacked, notes, grouper=grouper, name=before.name,
        sym_nodes=lambda base: _AfterShapes(base, before_sym, subs_at), flat_inputs=flat_inputs,
    )
    # the expression the brief asks for: each original node's symbolic cost under subs_at, plus the new ops
    orig = {n.name: n for n in before._nodes}
    parts_all, parts_mm = [], []
    for n in est._nodes:
        root = n.name.split("/")[0]
        if n.name in orig:
            subs = subs_at.get(root) or {}
            parts_all.append(orig[n.name].flops_expr.subs(subs))
            parts_mm.append(orig[n.name].flops_matmul_expr.subs(subs))
        else:
            n.original = False
            parts_all.append(n.flops_expr)
            parts_mm.append(n.flops_matmul_expr)
    sub_all = sympy.Add(*parts_all) if parts_all else _ZERO
    sub_mm = sympy.Add(*parts_mm) if parts_mm else _ZERO
    try:
        ok = int(sub_all.subs(est.symbols)) == est.flops and int(sub_mm.subs(est.symbols)) == est.flops_matmul
    except Exception:  # noqa: BLE001
        ok = False
    if ok:
        est.flops_expr, est.flops_matmul_expr = sub_all, sub_mm
    else:  # subs_at does not say what every reduction did: cost the reduced graph's own shapes instead
        est.notes.append("after: the plan's symbol substitutions (subs_at) do not account for every reduced "
                         "size; the expression is the reduced graph's cost, with the sizes no substitution "
                         "explains kept at their example values")
    _check_expr("after: flops", est.flops_expr, est.flops, est.symbols, est.notes)
    est.plan = plan
    est.applied = applied  # type: ignore[attr-defined]
    _warn_if_no_saving(plan, before, est)
    return est


def _warn_if_no_saving(plan: Any, before: Estimate, after: Estimate) -> None:
    """:class:`graphred.errors.PlanSavesNothingWarning` when a non-identity plan does not lower the FLOPs."""
    import warnings

    from ...errors import PlanSavesNothingWarning

    if getattr(plan, "is_identity", False) or not before.flops or after.flops < before.flops:
        return
    warnings.warn(PlanSavesNothingWarning(
        f"{plan}: estimated {_human(after.flops)} FLOPs after against {_human(before.flops)} before "
        f"({100 * (after.flops / before.flops - 1):+.1f}%; matrix products {_human(after.flops_matmul)} against "
        f"{_human(before.flops_matmul)}): the plan's scoring, selection and gathers cost at least what the tokens it "
        "removes save. Reduce earlier (layers=...), reduce more, or run the model unreduced."), stacklevel=4)


@dataclass
class _Prepared:
    program: Program
    prov: TokenProvenance
    blocks: list[AttentionBlock]
    grouper: _Grouper
    unbacked: dict[str, int]
    notes: list[str]
    flat_values: list | None = None
    value_inputs: tuple | None = None


def _prepare(program: Program, value_inputs: tuple | None) -> _Prepared:
    if not isinstance(program, Program):
        raise GraphredError(f"graphred.estimate expects a graphred.Program, got {type(program).__name__}: "
                            "capture the model first with graphred.capture(model, **inputs).")
    prov, blocks, flat_values, notes = _analysis(program, value_inputs)
    unbacked, unresolved = resolve_unbacked(program.graph_module, flat_values)
    if unresolved:
        notes.append(f"symbols {', '.join(unresolved)} (sizes that depend on input data) could not be resolved: "
                     "nodes whose shapes use them are listed as uncounted")
    return _Prepared(program, prov, blocks, _Grouper(blocks), unbacked, notes, flat_values, value_inputs)


def _before(prep: _Prepared) -> tuple[Estimate, _Shapes]:
    holder: dict[str, _Shapes] = {}

    def keep(base: _Shapes) -> _Shapes:
        holder["s"] = base
        return base

    est = _estimate_graph(prep.program, prep.program.graph_module, prep.prov, prep.blocks, prep.unbacked,
                          list(prep.notes), grouper=prep.grouper, sym_nodes=keep, flat_inputs=prep.flat_values)
    return est, holder["s"]


def _check_plan(plan: Any) -> None:
    from ...plans import Plan

    if not isinstance(plan, Plan):
        raise PlanError(f"expected a graphred.plans.Plan, got {type(plan).__name__}: build one with "
                        "graphred.plans.fastv(...) or parse one with graphred.plans.parse_plan('fastv:layer=2,keep=0.5')")
    _apply_plan_fn()  # fail early and clearly


def estimate(program: Program, plan: Any = None, *, value_inputs: tuple | None = None) -> Estimate:
    """Predict FLOPs, weight bytes, peak activation memory and KV cache of ``program`` (and after ``plan``).

    Nothing runs the model: costs come from the graph's shapes (``meta["val"]``) and the per-op
    registry; the token counts come from the token provenance analysis, which reads only the input
    bookkeeping (where image tokens sit) at the example inputs. For a program captured on the meta
    device, ``value_inputs=(args, kwargs)`` gives CPU copies of the example inputs for that bookkeeping
    (:func:`estimate_model` does this).

    With a ``plan``, :attr:`Estimate.after` is the estimate of the reduced graph and
    :attr:`Estimate.speedup` the predicted speedup; a plan that cannot apply raises the same
    :class:`graphred.PlanError` as :func:`graphred.transform`.
    """
    if plan is not None:
        _check_plan(plan)
    t0 = time.perf_counter()
    prep = _prepare(program, value_inputs)
    est, shapes = _before(prep)
    if plan is not None:
        est.plan = plan
        est.after = _estimate_after(program, est, plan, prep.prov, prep.grouper, shapes, prep.unbacked, prep.flat_values,
                                    prep.value_inputs)
    est.seconds = time.perf_counter() - t0
    return est


# =============================================================================================
# whole models from a name or a config directory, on the meta device
# =============================================================================================


def _cpu_inputs_for_dir(path: str, model: torch.nn.Module) -> tuple | None:
    """CPU copies of the example inputs :func:`graphred.zoo.from_config_dir` builds for ``path`` (same seed)."""
    from ... import zoo

    hook = getattr(zoo, "example_inputs_for_dir", None)
    try:
        if hook is not None:
            kw = hook(path)
            return (), dict(kw)
        from transformers import AutoConfig

        with zoo._quiet_transformers():
            config = AutoConfig.from_pretrained(path, local_files_only=True)
        cls, family = zoo._pick_class(config, path)
        gen = torch.Generator().manual_seed(0)
        kw, _ = family.inputs(config, gen, 2, family.text_len, cls.__name__)
        if family.finish is not None:
            family.finish(model, kw)
        kw = {k: (v.to("cpu") if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
        return (), kw
    except Exception:  # noqa: BLE001 - the estimate says it could not read the token split
        return None


def estimate_model(spec: str | os.PathLike, plan: Any = None) -> Estimate:
    """Estimate a zoo model (a name from ``graphred zoo``) or a Hugging Face model directory at full size.

    A directory needs only its ``config.json``: the model is built on the meta device (no weights, no
    memory), captured with meta tensors, and the example inputs' bookkeeping (where the image tokens
    go) is read from CPU copies of those inputs. An unknown architecture raises the zoo's
    :class:`graphred.ConfigError`.
    """
    from ... import zoo
    from ...program import capture

    t0 = time.perf_counter()
    s = os.fspath(spec)
    model, kwargs, name = zoo.resolve(s, device="meta")
    values = None
    if os.path.isdir(s) and any(isinstance(v, torch.Tensor) and v.device.type == "meta" for v in kwargs.values()):
        values = _cpu_inputs_for_dir(s, model)
    prog = capture(model, **kwargs)
    prog.name = prog.name or name
    est = estimate(prog, plan, value_inputs=values)
    est.seconds = time.perf_counter() - t0
    return est


# =============================================================================================
# sweeps
# =============================================================================================


@dataclass
class SweepTable:
    """One row per plan: FLOPs, reduction, speedup, peak activations, KV cache (the first row: no plan)."""

    rows: list[dict[str, Any]]

    def to_dict(self) -> dict[str, Any]:
        return {"rows": [dict(r) for r in self.rows]}

    def __iter__(self):
        return iter(self.rows)

    def __len__(self) -> int:
        return len(self.rows)

    def __str__(self) -> str:
        head = ("plan", "FLOPs", "matmul FLOPs", "reduction", "speedup", "peak act.", "KV cache")
        rows = [head]
        for r in self.rows:
            rows.append((r["plan"], _human(r["flops"]), _human(r["flops_matmul"]),
                         f"{100 * r['flops_reduction']:.1f}%", f"x{r['speedup']:.2f}",
                         _human_bytes(r["peak_activation_bytes"]), _human_bytes(r["kv_cache_bytes"])))
        widths = [max(len(x[i]) for x in rows) for i in range(len(head))]
        out = []
        for j, r in enumerate(rows):
            out.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))))
            if j == 0:
                out.append("  ".join("-" * w for w in widths))
        return "\n".join(out)


def sweep(program: Program, plans: Iterable[Any], *, value_inputs: tuple | None = None) -> SweepTable:
    """Estimate ``program`` under each plan (``Plan`` objects or their text form) and tabulate.

    The first row is the unreduced model. A plan that cannot apply raises its PlanError.
    """
    from ...plans import parse_plan

    plans = [parse_plan(p) if isinstance(p, str) else p for p in plans]
    for p in plans:
        _check_plan(p)
    prep = _prepare(program, value_inputs)
    base, shapes = _before(prep)
    rows = [{"plan": "none", "flops": base.flops, "flops_matmul": base.flops_matmul, "flops_reduction": 0.0,
             "speedup": 1.0, "peak_activation_bytes": base.peak_activation_bytes, "kv_cache_bytes": base.kv_cache_bytes}]
    for p in plans:
        a = _estimate_after(program, base, p, prep.prov, prep.grouper, shapes, prep.unbacked, prep.flat_values,
                            prep.value_inputs)
        rows.append({"plan": str(p), "flops": a.flops, "flops_matmul": a.flops_matmul,
                     "flops_reduction": 1.0 - a.flops / base.flops if base.flops else 0.0,
                     "speedup": base.flops / a.flops if a.flops else float("inf"),
                     "peak_activation_bytes": a.peak_activation_bytes, "kv_cache_bytes": a.kv_cache_bytes})
    return SweepTable(rows)
