"""Plans chosen for a budget: ``graphred.plans.auto(program, speedup=2.0, calibration=batches)``.

The cost model knows every plan's FLOPs, memory and KV cache before anything runs, so it proposes
candidates that meet the budget: for each method and each place it can cut, the mildest reduction
that still meets it (the keep ratio solved on the estimate's symbolic expression, then checked and
corrected with exact estimates). A quality proxy measured on unlabelled calibration inputs ranks
the candidates: the divergence of the reduced model's final outputs from the unreduced program's
(KL divergence of the next-token or class distribution; 1 - cosine for embedding outputs). Without
calibration inputs the cost model ranks alone (the least reduction beyond the budget first) and the
table says so.

>>> import graphred
>>> model, inputs = graphred.zoo.load("llava")
>>> prog = graphred.capture(model, **inputs)
>>> plan = graphred.plans.auto(prog, speedup=1.1, calibration=[inputs])
>>> plan.choice.predicted_speedup >= 1.1
True
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import torch
import torch.nn.functional as F

from .errors import PlanError
from .plans import Plan

__all__ = ["AutoPlan", "Candidate", "AutoChoice", "auto", "calibration_divergence", "output_divergence"]

METHODS = ("fastv", "pumer", "tome", "victor")


@dataclass
class Candidate:
    """One plan the planner considered: its predicted costs, the proxy and why it was kept or not."""

    plan: Plan
    method: str
    predicted_speedup: float
    flops: int
    peak_bytes: int
    kv_cache_bytes: int
    feasible: bool
    proxy: float | None = None
    note: str = ""


@dataclass
class AutoChoice:
    """What :func:`auto` decided, and from what."""

    budget: dict
    candidates: list[Candidate]
    chosen: Candidate
    ranked_by: str  # "proxy" or "cost model"
    base_flops: int
    max_speedup: float
    seconds: float = 0.0

    @property
    def predicted_speedup(self) -> float:
        return self.chosen.predicted_speedup

    def table(self) -> str:
        head = (f"graphred.plans.auto: budget {_budget_text(self.budget)}; {len(self.candidates)} candidates, "
                f"ranked by {self.ranked_by}"
                + ("" if self.ranked_by == "proxy" else " alone (no calibration inputs: the proxy was not measured)")
                + f"; {self.seconds:.1f} s")
        rows = [head, "",
                f"  {'':1} {'plan':<52} {'speedup':>8} {'FLOPs':>14} {'KV cache':>11} {'proxy':>10}  note"]
        order = sorted(self.candidates, key=lambda c: (not c.feasible, math.inf if c.proxy is None else c.proxy,
                                                       -c.predicted_speedup))
        for c in order:
            mark = "*" if c is self.chosen else " "
            proxy = "-" if c.proxy is None else f"{c.proxy:.4g}"
            rows.append(f"  {mark} {str(c.plan):<52} {c.predicted_speedup:>7.2f}x {c.flops:>14,} "
                        f"{c.kv_cache_bytes:>10,}B {proxy:>10}  {c.note}")
        rows.append("")
        rows.append(f"  chosen: {self.chosen.plan}  (predicted {self.chosen.predicted_speedup:.2f}x; the most any "
                    f"candidate reaches: {self.max_speedup:.2f}x)")
        return "\n".join(rows)


@dataclass(frozen=True, repr=False)
class AutoPlan(Plan):
    """A :class:`~graphred.plans.Plan` chosen by :func:`auto`. ``str(plan)`` is its text form (ready
    for ``--plan``); ``repr(plan)`` and ``plan.explain()`` show the candidates table."""

    choice: AutoChoice | None = field(default=None, compare=False, hash=False)

    def explain(self) -> str:
        return self.choice.table() if self.choice is not None else str(self)

    def __repr__(self) -> str:
        return f"AutoPlan({self})\n{self.explain()}"


def _budget_text(b: dict) -> str:
    parts = []
    for k, v in b.items():
        parts.append(f"speedup >= {v:g}x" if k == "speedup" else f"{k} <= {v:,}")
    return ", ".join(parts)


# ------------------------------------------------------------------------------------ proxy


def _logits_of(out: Any) -> torch.Tensor | None:
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "keys"):
        for key in ("logits", "logits_per_image"):
            if key in out.keys() and isinstance(out[key], torch.Tensor):
                return out[key]
        return None
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    return None


def _embeddings_of(out: Any) -> list[torch.Tensor]:
    if hasattr(out, "keys"):
        return [out[k] for k in ("image_embeds", "text_embeds", "pooler_output") if k in out.keys()
                and isinstance(out[k], torch.Tensor)]
    return []


def _last_valid(mask: torch.Tensor | None, B: int, L: int) -> torch.Tensor:
    if mask is None or tuple(mask.shape) != (B, L):
        return torch.full((B,), L - 1, dtype=torch.long)
    pos = torch.arange(L).expand(B, L)
    return torch.where(mask.bool().cpu(), pos, -1).amax(dim=1)


def output_divergence(reference: Any, reduced: Any, *, kept_positions: torch.Tensor | None = None,
                      attention_mask: torch.Tensor | None = None) -> float:
    """How far ``reduced`` outputs are from ``reference``: the mean KL divergence KL(ref || reduced)
    of the output distributions (the next-token distribution at each sample's last valid position
    for ``[B, L, V]`` logits, the class distribution for ``[B, C]``), or 1 - cosine similarity of
    pooled embeddings when the model outputs no logits.

    >>> import torch
    >>> x = torch.randn(2, 5)
    >>> output_divergence(x, x)
    0.0
    """
    ref, red = _logits_of(reference), _logits_of(reduced)
    if ref is not None and red is not None:
        ref, red = ref.detach().float().cpu(), red.detach().float().cpu()
        if ref.dim() == 3:
            B, L, _ = ref.shape
            last = _last_valid(attention_mask, B, L)
            ref_rows = ref[torch.arange(B), last]
            if red.shape[1] == L:
                red_rows = red[torch.arange(B), last]
            elif kept_positions is not None:
                slot = (kept_positions.cpu() == last[:, None]).float().argmax(dim=1)
                red_rows = red[torch.arange(B), slot]
            else:
                red_rows = red[:, -1]
            ref, red = ref_rows, red_rows
        if ref.shape != red.shape:
            raise PlanError(f"graphred.plans.auto: the reduced model's logits have shape {tuple(red.shape)}, the "
                            f"unreduced {tuple(ref.shape)}; cannot compare them")
        kl = F.kl_div(F.log_softmax(red, -1), F.log_softmax(ref, -1), log_target=True, reduction="none").sum(-1)
        return max(float(kl.mean()), 0.0)
    pairs = list(zip(_embeddings_of(reference), _embeddings_of(reduced)))
    if not pairs:
        raise PlanError("graphred.plans.auto: the model's outputs hold neither logits nor pooled embeddings "
                        "(image_embeds, text_embeds, pooler_output), so the quality proxy has nothing to compare; "
                        "pass calibration=None to rank by the cost model alone")
    d = [1.0 - float(F.cosine_similarity(a.detach().float().flatten(1), b.detach().float().flatten(1), dim=-1).mean())
         for a, b in pairs]
    return max(sum(d) / len(d), 0.0)


def calibration_divergence(fast, calibration: Sequence[dict], references: list) -> float:
    """The mean :func:`output_divergence` of a transformed module ``fast`` from ``references`` (the
    unreduced outputs) over the ``calibration`` batches: the proxy :func:`auto` ranks plans by."""
    total = 0.0
    with torch.no_grad():
        for batch, ref in zip(calibration, references):
            out, kept = fast.forward_with_positions(**batch)
            total += output_divergence(ref, out, kept_positions=kept, attention_mask=batch.get("attention_mask"))
    return total / len(calibration)


def _proxy(program, plan: Plan, calibration: Sequence[dict], references: list) -> float:
    from .reduced_module import transform

    return calibration_divergence(transform(program, plan), calibration, references)


# ------------------------------------------------------------------------------------ candidates


def _estimate(program, plan):
    from .analysis.cost.estimate import estimate

    return estimate(program, plan)


def _meets(est, budget: dict) -> bool:
    a = est.after if est.after is not None else est
    ok = True
    if "speedup" in budget:
        ok &= (est.flops / a.flops) >= budget["speedup"] - 1e-9
    if "flops" in budget:
        ok &= a.flops <= budget["flops"]
    if "memory" in budget:
        ok &= a.peak_activation_bytes + a.weight_bytes <= budget["memory"]
    if "kv_cache" in budget:
        ok &= a.kv_cache_bytes <= budget["kv_cache"]
    return bool(ok)


def _candidate(program, plan: Plan, method: str, budget: dict, base) -> Candidate | None:
    try:
        est = _estimate(program, plan)
    except PlanError:
        return None  # the plan does not apply to this model (e.g. FastV on a non-causal encoder)
    a = est.after
    return Candidate(plan, method, est.flops / a.flops, a.flops, a.peak_activation_bytes + a.weight_bytes,
                     a.kv_cache_bytes, _meets(est, budget))


def _bisect(program, make, method: str, budget: dict, base, lo: float, hi: float, steps: int = 6) -> Candidate | None:
    """The mildest ``make(x)`` (x in [lo, hi]; larger x reduces more) that meets the budget, by
    bisection on exact estimates. Used where the budget has no closed form (memory, KV cache, ToMe's r)."""
    top = _candidate(program, make(hi), method, budget, base)
    if top is None or not top.feasible:
        if top is not None:
            top.note = "the strongest setting misses the budget"
        return top
    best, a, b = top, lo, hi
    for _ in range(steps):
        mid = (a + b) / 2
        c = _candidate(program, make(mid), method, budget, base)
        if c is None:
            break
        if c.feasible:
            best, b = c, mid
        else:
            a = mid
    return best


def _target_reduction(budget: dict, base) -> float | None:
    t = []
    if "speedup" in budget:
        t.append(1 - 1 / budget["speedup"])
    if "flops" in budget:
        t.append(1 - budget["flops"] / base.flops)
    return max(t) if t else None


def _fit_keep(program, make, method: str, budget: dict, base, layer: int, factor: float = 1.0) -> Candidate | None:
    """The mildest keep ratio at ``layer`` that meets the budget.

    The symbolic estimate gives the keep ratio at which the FLOPs fall by the target
    (``solve_keep_for_reduction``: the layers from ``layer`` on at ``keep * factor`` of the image
    tokens; ``factor`` < 1 where a merge at the same place removes a further share). That ignores
    the plan's own ops (scorer, gathers); one exact estimate measures them, and the keep ratio is
    solved again with the target raised by that overhead. Budgets without a closed form (memory,
    KV cache) fall back to bisection on exact estimates."""
    t = _target_reduction(budget, base)
    n = next((s for s in base.symbols if str(s) == "n_img"), None)
    if t is None or n is None or set(budget) - {"speedup", "flops"}:
        return _bisect(program, lambda x: make(1 - x), method, budget, base, 0.0, 0.99)

    def keep_for(target: float) -> float | None:
        try:
            k = base.solve_keep_for_reduction(min(target, 0.999), n, start=layer) / factor
        except (ValueError, TypeError):
            return None
        return min(math.floor(k * 100) / 100, 0.99)

    keep = keep_for(t)
    if keep is None or keep <= 0:
        # even keeping nothing from this layer on misses the budget: say so with the analytic ceiling
        # (no exact estimate spent on a plan that cannot be chosen)
        floor = float(base.flops_with({n: 0}, start=layer).subs(base.symbols))
        return Candidate(make(0.01), method, base.flops / max(floor, 1.0), int(floor), 0, 0, False,
                         note=f"layer {layer} cannot reach the budget: {base.flops / max(floor, 1.0):.2f}x at most "
                              "(analytic, every image token dropped)")
    c = _candidate(program, make(keep), method, budget, base)
    step = max(0.01, 1 / max(int(base.symbols[n]), 1))  # at least one token: smaller steps may keep the same count
    for _ in range(4):  # the overhead grows a little as keep falls (quadratic attention): correct again
        if c is None or c.feasible:
            return c
        analytic = float(base.flops_with({n: keep * factor * n}, start=layer).subs(base.symbols))
        nxt = keep_for(t + max(c.flops - analytic, 0) / base.flops)
        if nxt is None or nxt <= 0:
            c.note = f"no keep ratio at layer {layer} reaches the budget"
            return c
        keep = math.floor(min(nxt, keep - step) * 100) / 100
        if keep <= 0:
            break
        c2 = _candidate(program, make(keep), method, budget, base)
        if c2 is None:
            break
        c = c2
    if c is not None and not c.feasible:
        c.note = "misses the budget once its own ops are counted"
    return c


def _generate(program, budget: dict, methods: Sequence[str], trained: bool, base) -> list[Candidate]:
    from . import plans as P
    from .analysis.report import analyze

    report = analyze(program)
    cross = [b for b in report.blocks if b.kind in ("cross_modal_self", "cross_attention")]
    decoder = sorted({b.layer_index for b in cross if b.kind == "cross_modal_self" and b.causal and b.layer_index is not None})
    cross_layers = sorted({b.layer_index for b in cross if b.layer_index is not None})
    out: list[Candidate] = []
    if "fastv" in methods:
        for layer in decoder[1:]:
            c = _fit_keep(program, lambda k, layer=layer: P.fastv(layer=layer, keep=round(max(k, 0.01), 2)), "fastv",
                          budget, base, layer)
            if c is not None:
                out.append(c)
    if "pumer" in methods:
        for layer in cross_layers:
            for merge in (0.0, 0.2):
                c = _fit_keep(program, lambda k, layer=layer, merge=merge: P.pumer(
                    prune=min(round(1 - k, 2), 0.99), merge=merge, layers=[layer]), "pumer", budget, base, layer,
                    factor=1 - merge)
                if c is not None:
                    out.append(c)
    if "tome" in methods:
        c = _bisect(program, lambda x: P.tome(r=max(int(round(x)), 1)), "tome", budget, base, 1, 64)
        if c is not None and c.predicted_speedup > 1.0:
            out.append(c)
    if "victor" in methods and trained and hasattr(P, "victor"):
        for layer in decoder:
            c = _candidate(program, P.victor(registers=8, layer=layer), "victor", budget, base)
            if c is not None:
                out.append(c)
    return out


def _max_speedup(base) -> float:
    """Predicted speedup if every image token were dropped at the first decoder layer (whole model)."""
    syms = {str(s): s for s in base.symbols}
    if "n_img" not in syms:
        return 1.0
    layers = base.decoder_layers()
    start = layers[0].name if layers else None
    after = base.flops_with({syms["n_img"]: 0}, start=start).subs(base.symbols)
    return float(base.flops / max(float(after), 1.0))


def auto(program, *, speedup: float | None = None, flops: int | None = None, memory: int | None = None,
         kv_cache: int | None = None, calibration: Iterable[dict] | None = None,
         methods: Sequence[str] = METHODS, trained: bool = False) -> AutoPlan:
    """The plan expected to lose the least accuracy within a budget.

    Budgets (any combination, at least one): ``speedup`` (predicted FLOP ratio), ``flops`` (FLOPs
    after), ``memory`` (peak activation + weight bytes after), ``kv_cache`` (bytes after).
    ``calibration``: input batches (dicts of the model's keyword inputs, shaped like the program's
    example inputs) on which the quality proxy is measured; no labels needed. ``methods`` limits
    the candidates; Victor's registers need training, so it is a candidate only with
    ``trained=True``. See the module docstring for the procedure.
    """
    from .program import Program

    t0 = time.perf_counter()
    if not isinstance(program, Program):
        raise PlanError(f"graphred.plans.auto expects a graphred.Program, got {type(program).__name__}: "
                        "capture first with graphred.capture(model, **inputs)")
    budget = {k: v for k, v in (("speedup", speedup), ("flops", flops), ("memory", memory), ("kv_cache", kv_cache))
              if v is not None}
    if not budget:
        raise PlanError("graphred.plans.auto needs a budget: speedup=, flops=, memory= or kv_cache=")
    if "speedup" in budget and not budget["speedup"] > 1:
        raise PlanError(f"graphred.plans.auto: speedup={speedup} must be above 1 (1 is the unreduced model)")
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise PlanError(f"graphred.plans.auto: unknown method(s) {unknown}; choose from {', '.join(METHODS)}")
    base = _estimate(program, None)
    ceiling = _max_speedup(base)
    if "speedup" in budget and budget["speedup"] > ceiling:
        raise PlanError(f"graphred.plans.auto: a speedup of {budget['speedup']:g}x is out of reach for "
                        f"{program.model_class}: dropping every image token at the first decoder layer "
                        f"gives {ceiling:.2f}x predicted (the rest of the model costs the remainder)")
    cands = _generate(program, budget, methods, trained, base)
    feasible = [c for c in cands if c.feasible]
    if not feasible:
        best = max((c.predicted_speedup for c in cands), default=1.0)
        raise PlanError(f"graphred.plans.auto: no {'/'.join(methods)} plan meets {_budget_text(budget)} on "
                        f"{program.model_class}; the most any candidate reaches is {best:.2f}x predicted "
                        f"(the ceiling for dropping every image token is {ceiling:.2f}x)")
    calib = list(calibration) if calibration is not None else []
    if calib:
        with torch.no_grad():
            refs = [program(**b) for b in calib]
        for c in feasible:
            c.proxy = _proxy(program, c.plan, calib, refs)
        chosen = min(feasible, key=lambda c: (c.proxy, -c.predicted_speedup))
        ranked = "proxy"
    else:
        # cost model alone: the mildest plan within budget (least reduction beyond it); ties to the later cut
        chosen = min(feasible, key=lambda c: (c.predicted_speedup, METHODS.index(c.method)))
        ranked = "cost model"
    choice = AutoChoice(budget, cands, chosen, ranked, base.flops, ceiling, time.perf_counter() - t0)
    return AutoPlan(chosen.plan.steps, choice=choice)
