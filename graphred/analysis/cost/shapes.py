"""Shapes in the token symbols: node shapes at the example inputs and as sympy expressions of the
token counts (``n_img``, ``n_txt``, ``B``, ...), with unbacked sizes resolved by partial evaluation."""
from __future__ import annotations

import operator
import re
from typing import Any, Mapping, Sequence

import sympy
import torch
import torch.fx as fx

from ...errors import AnalysisError
from ...fx_utils import flat_inputs, op_packet
from ...program import Program
from ..evaluate import partial_evaluate
from ..provenance import TokenProvenance
from .memory import hint_int, tensors_of
from .registry import RUN_ONCE_HOPS

aten = torch.ops.aten


# =============================================================================================
# values at the example inputs without running the model (partial evaluation)
# =============================================================================================




def is_meta_program(program: Program) -> bool:
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
# node shapes in the token symbols
# =============================================================================================


class Shapes:
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
            if n.op == "call_function" and isinstance(t, torch._ops.HigherOrderOperator) and t.name() in RUN_ONCE_HOPS:
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
        pk = op_packet(node)
        res = []

        def right_aligned(x: fx.Node, ref: tuple) -> None:
            s = self._sym.get(x)
            if not isinstance(s, tuple) or len(s) > len(ref):
                return
            off = len(ref) - len(s)
            res.append((x, [(i, i + off) for i in range(len(s))], ref))

        if pk in SDPA_PACKETS:
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
        if pk is aten.expand or is_broadcasting(node):
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


SDPA_PACKETS = {getattr(aten, n) for n in (
    "scaled_dot_product_attention", "_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_attention_math",
    "_scaled_dot_product_efficient_attention", "_scaled_dot_product_flash_attention", "_scaled_dot_product_cudnn_attention",
) if hasattr(aten, n)}
_BROADCAST_EXTRA = {getattr(aten, n) for n in (
    "where", "masked_fill", "_to_copy", "to", "clone", "alias", "detach", "contiguous", "type_as", "lift_fresh_copy",
    "bitwise_and", "bitwise_or", "__and__", "__or__", "logical_and", "logical_or", "logical_not", "bitwise_not",
) if hasattr(aten, n)}


def is_broadcasting(node: fx.Node) -> bool:
    """Pointwise ops (and copies/casts): output dims and right-aligned input dims of equal size coincide."""
    t = node.target
    if not isinstance(t, torch._ops.OpOverload):
        return False
    if t.overloadpacket in _BROADCAST_EXTRA:
        return True
    return torch.Tag.pointwise in t.tags
