"""The :class:`Estimate` report: FLOPs, weights, activation memory and KV cache, concrete and symbolic,
per group; what-ifs over the token symbols; a text table."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

import sympy

from ..blocks import AttentionBlock
from .counting import CountedNode
from .grouping import GroupCost
from .kv_cache import KVCache
from .memory import MemoryProfile, WeightBytes
from .registry import Uncounted

_ZERO = sympy.Integer(0)


def human(n: float, unit: str = "") -> str:
    n = float(n)
    for scale, suf in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= scale:
            return f"{n / scale:.3g} {suf}{unit}"
    return f"{n:.4g} {unit}".rstrip()


def human_bytes(n: float) -> str:
    n = float(n)
    for scale, suf in ((2**40, "TiB"), (2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
        if abs(n) >= scale:
            return f"{n / scale:.3g} {suf}"
    return f"{int(n)} B"


def subs_int(expr: sympy.Expr, values: Mapping) -> int:
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
    _nodes: list[CountedNode] = field(default_factory=list, repr=False)
    decode: Any = None  # DecodeCost (graphred.analysis.cost.decode): per-token decode cost vs cache lengths

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
    def added_flops(self) -> int:
        """FLOPs of the nodes a plan added to the graph (scoring, selection, gathers, merges); 0 for an
        estimate of an unreduced graph. Compare with ``flops`` for their share of the reduced model.

        >>> import graphred
        >>> model, inputs = graphred.zoo.load(graphred.zoo.TEST_NAMES[0])
        >>> prog = graphred.capture(model, **inputs)
        >>> est = graphred.estimate(prog, graphred.plans.pumer(prune=0.5, merge=0.0))
        >>> est.added_flops, 0 < est.after.added_flops < est.after.flops
        (0, True)
        """
        return sum(n.flops for n in self._nodes if not n.original)

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
        return subs_int(e, subs)

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
            rows.append((g.name, att, human(g.flops_matmul), human(g.flops), f"{100 * g.flops / total:.1f}%"))
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
        lines.append(f"FLOPs        {human(self.flops)} total, {human(self.flops_matmul)} in matrix products")
        lines.append(f"  as a function of the tokens: {sympy.collect(sympy.expand(self.flops_matmul_expr), list(self.symbols))}  (matmul)")
        lines.append(f"weights      {human_bytes(self.weights.total)} ({self.weights.count} tensors)")
        lines.append(f"activations  peak {human_bytes(self.memory.peak_bytes)} (inputs included), at {self.memory.peak_node}"
                     f"{f' in {self.memory.peak_module}' if self.memory.peak_module else ''}")
        if self.kv_cache.layers:
            lines.append(f"KV cache     {human_bytes(self.kv_cache.bytes)} after the prompt, {len(self.kv_cache.layers)} decoder layers, "
                         f"{human_bytes(self.kv_cache.bytes_per_token)} per further token (whole batch)")
        else:
            lines.append(f"KV cache     none ({self.kv_cache.note})")
        lines.append("")
        lines.extend(self._table())
        if self.after is not None:
            a = self.after
            lines.append("")
            lines.append(f"after {self.plan}:")
            lines.append(f"  FLOPs        {human(a.flops)} total ({human(a.flops_matmul)} matmul): "
                         f"reduction {100 * (self.flops_reduction or 0):.1f}%, predicted speedup x{self.speedup:.2f}")
            lines.append(f"  activations  peak {human_bytes(a.memory.peak_bytes)}")
            if a.kv_cache.layers:
                lines.append(f"  KV cache     {human_bytes(a.kv_cache.bytes)}")
        if self.uncounted:
            ops = sorted({u.op for u in self.uncounted})
            lines.append("")
            lines.append(f"uncounted: {len(self.uncounted)} node(s) without a cost formula ({', '.join(ops)}): "
                         "the FLOP totals are lower bounds by their cost")
        for n in self.notes:
            lines.append(f"note: {n}")
        return "\n".join(lines)
