"""Building an :class:`~graphred.analysis.cost.report.Estimate`: the program's analyses, counting before
and after a plan (over the reduced graph from :func:`graphred.passes.apply.apply_plan`), and whole models
from a name or a config directory on the meta device."""
from __future__ import annotations

import inspect
import math
import os
import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import sympy
import torch
import torch.fx as fx

from ...errors import GraphredError, PlanError
from ...fx_utils import flat_inputs
from ...program import Program
from ..blocks import AttentionBlock, detect_blocks, split_stack
from ..provenance import TokenProvenance
from .counting import count_nodes, sum_groups
from .grouping import GroupCost, Grouper
from .kv_cache import kv_cache_of
from .memory import activation_memory, weight_bytes
from .report import Estimate, human
from .shapes import Shapes, is_meta_program, resolve_unbacked

_ZERO = sympy.Integer(0)


# =============================================================================================
# building an Estimate
# =============================================================================================


def program_analyses(program: Program, value_inputs: tuple | None):
    """Provenance + blocks; for a meta-device program the example values come from ``value_inputs``."""
    gm = program.graph_module
    notes: list[str] = []
    flat_values = None
    if is_meta_program(program):
        if value_inputs is not None:
            flat_values = flat_inputs(gm, *value_inputs)
            prov = TokenProvenance(gm, program.example_inputs(), value_inputs=value_inputs)
        else:
            prov = TokenProvenance(gm, program.example_inputs())
            notes.append("captured on the meta device without value_inputs: the image/text split of the token "
                         "streams could not be read (pass value_inputs=(args, kwargs) on the CPU)")
    else:  # the bookkeeping only, not the model: the same values as running the graph, at a fraction of the cost
        flat_values = flat_inputs(gm, *program.example_inputs())
        prov = TokenProvenance(gm, program.example_inputs())
    blocks = detect_blocks(gm, prov)
    return prov, blocks, flat_values, notes


def _check_expr(name: str, expr: sympy.Expr, value: int, symbols: Mapping, notes: list[str]) -> None:
    try:
        got = sympy.sympify(expr).subs(symbols)
        ok = got.is_number and int(got) == int(value)
    except Exception:  # noqa: BLE001
        ok, got = False, "?"
    if not ok:
        notes.append(f"{name}: the expression gives {got} at the example inputs, the graph {value} "
                     "(a size the provenance analysis did not express in the token symbols)")


def estimate_graph(program: Program, gm: fx.GraphModule, prov: TokenProvenance | None, blocks: list[AttentionBlock],
                    unbacked: Mapping[str, int], notes: list[str], *, grouper: Grouper | None = None,
                    name: str = "", sym_nodes: Callable | None = None, flat_inputs: Sequence | None = None) -> Estimate:
    t0 = time.perf_counter()
    symbols = dict(prov.symbol_values) if prov is not None else {}
    shapes = Shapes(prov, symbols, unbacked)
    if sym_nodes is not None:
        shapes = sym_nodes(shapes)
    if prov is not None:
        shapes.complete(gm)
    grouper = grouper or Grouper(blocks)
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
    nodes, uncounted = count_nodes(gm, shapes, grouper, group_index, groups, flat_inputs=flat_inputs)
    # groups in order of first node
    first = {}
    for n in nodes:
        first.setdefault(n.group, n.order)
    order = sorted(range(len(groups)), key=lambda i: first.get(i, math.inf))
    remap = {old: new for new, old in enumerate(order)}
    groups = [groups[i] for i in order]
    for n in nodes:
        n.group = remap[n.group]
    sum_groups(groups, nodes)

    flops = sum(n.flops for n in nodes)
    flops_mm = sum(n.flops_matmul for n in nodes)
    bytes_moved = sum(n.bytes for n in nodes)
    flops_expr = sympy.Add(*[n.flops_expr for n in nodes]) if nodes else _ZERO
    flops_mm_expr = sympy.Add(*[n.flops_matmul_expr for n in nodes]) if nodes else _ZERO
    bytes_expr = sympy.Add(*[n.bytes_expr for n in nodes]) if nodes else _ZERO

    mem = activation_memory(gm, shapes.symbolic if prov is not None else None, symbols, unbacked=unbacked)
    kv = kv_cache_of(gm, blocks, shapes)
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


def apply_plan_fn():
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


class AfterShapes(Shapes):
    """Shapes of the reduced graph: an original node's symbolic shape under ``subs_at``; a node the plan
    added takes, dim by dim, the symbolic dim of an input with the same value (else the concrete one)."""

    def __init__(self, base: Shapes, before_sym: Mapping[str, Any], subs_at: Mapping[str, Mapping]):
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


def estimate_after(program: Program, before: Estimate, plan: Any, prov: TokenProvenance, grouper: Grouper,
                    shapes_before: Shapes, unbacked: Mapping[str, int], flat_inputs: Sequence | None = None,
                    value_inputs: tuple | None = None) -> Estimate:
    apply_plan = apply_plan_fn()
    try:
        params = inspect.signature(apply_plan).parameters
    except (TypeError, ValueError):
        params = {}
    meta = is_meta_program(program)
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
    if flat_inputs is not None and len(flat_inputs) == sum(n.op == "placeholder" for n in gm2.graph.nodes):
        # data-dependent sizes the rewrite made (the rows a nonzero of the reduced tokens selects): their values
        # at the example inputs, from the reduced graph
        fresh, _ = resolve_unbacked(gm2, flat_inputs)
        unbacked = {**fresh, **unbacked}
    blocks2 = list(getattr(applied, "blocks", None) or [])
    names2 = {n.name for n in gm2.graph.nodes}
    blocks2 = [b for b in blocks2 if b.node in names2] or [b for b in before.blocks if b.node in names2]
    est = estimate_graph(
        program, gm2, prov, blocks2, unbacked, notes, grouper=grouper, name=before.name,
        sym_nodes=lambda base: AfterShapes(base, before_sym, subs_at), flat_inputs=flat_inputs,
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
    warn_if_no_saving(plan, before, est)
    return est


def warn_if_no_saving(plan: Any, before: Estimate, after: Estimate) -> None:
    """:class:`graphred.errors.PlanSavesNothingWarning` when a non-identity plan does not lower the FLOPs."""
    import warnings

    from ...errors import PlanSavesNothingWarning

    if getattr(plan, "is_identity", False) or not before.flops or after.flops < before.flops:
        return
    warnings.warn(PlanSavesNothingWarning(
        f"{plan}: estimated {human(after.flops)} FLOPs after against {human(before.flops)} before "
        f"({100 * (after.flops / before.flops - 1):+.1f}%; matrix products {human(after.flops_matmul)} against "
        f"{human(before.flops_matmul)}): the plan's scoring, selection and gathers cost at least what the tokens it "
        "removes save. Reduce earlier (layers=...), reduce more, or run the model unreduced."), stacklevel=4)


@dataclass
class Prepared:
    program: Program
    prov: TokenProvenance
    blocks: list[AttentionBlock]
    grouper: Grouper
    unbacked: dict[str, int]
    notes: list[str]
    flat_values: list | None = None
    value_inputs: tuple | None = None


def prepare(program: Program, value_inputs: tuple | None) -> Prepared:
    if not isinstance(program, Program):
        raise GraphredError(f"graphred.estimate expects a graphred.Program, got {type(program).__name__}: "
                            "capture the model first with graphred.capture(model, **inputs).")
    prov, blocks, flat_values, notes = program_analyses(program, value_inputs)
    unbacked, unresolved = resolve_unbacked(program.graph_module, flat_values)
    if unresolved:
        notes.append(f"symbols {', '.join(unresolved)} (sizes that depend on input data) could not be resolved: "
                     "nodes whose shapes use them are listed as uncounted")
    return Prepared(program, prov, blocks, Grouper(blocks), unbacked, notes, flat_values, value_inputs)


def estimate_before(prep: Prepared) -> tuple[Estimate, Shapes]:
    holder: dict[str, Shapes] = {}

    def keep(base: Shapes) -> Shapes:
        holder["s"] = base
        return base

    est = estimate_graph(prep.program, prep.program.graph_module, prep.prov, prep.blocks, prep.unbacked,
                          list(prep.notes), grouper=prep.grouper, sym_nodes=keep, flat_inputs=prep.flat_values)
    return est, holder["s"]


def check_plan(plan: Any) -> None:
    from ...plans import Plan

    if not isinstance(plan, Plan):
        raise PlanError(f"expected a graphred.plans.Plan, got {type(plan).__name__}: build one with "
                        "graphred.plans.fastv(...) or parse one with graphred.plans.parse_plan('fastv:layer=2,keep=0.5')")
    apply_plan_fn()  # fail early and clearly


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
        check_plan(plan)
    t0 = time.perf_counter()
    prep = prepare(program, value_inputs)
    est, shapes = estimate_before(prep)
    if plan is not None:
        est.plan = plan
        est.after = estimate_after(program, est, plan, prep.prov, prep.grouper, shapes, prep.unbacked, prep.flat_values,
                                    prep.value_inputs)
    from .decode import decode_cost  # per-token decode cost (a plan changes the cache lengths, not the weights)

    for e in (est, est.after):
        if e is not None:
            e.decode = decode_cost(program.graph_module, e)
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
