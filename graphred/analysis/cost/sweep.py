"""Sweeps: one estimate per plan over one program, as a table."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable


from ...program import Program
from .build import check_plan, estimate_after, estimate_before, prepare
from .report import human, human_bytes



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
            rows.append((r["plan"], human(r["flops"]), human(r["flops_matmul"]),
                         f"{100 * r['flops_reduction']:.1f}%", f"x{r['speedup']:.2f}",
                         human_bytes(r["peak_activation_bytes"]), human_bytes(r["kv_cache_bytes"])))
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
        check_plan(p)
    prep = prepare(program, value_inputs)
    base, shapes = estimate_before(prep)
    rows = [{"plan": "none", "flops": base.flops, "flops_matmul": base.flops_matmul, "flops_reduction": 0.0,
             "speedup": 1.0, "peak_activation_bytes": base.peak_activation_bytes, "kv_cache_bytes": base.kv_cache_bytes}]
    for p in plans:
        a = estimate_after(program, base, p, prep.prov, prep.grouper, shapes, prep.unbacked, prep.flat_values,
                            prep.value_inputs)
        rows.append({"plan": str(p), "flops": a.flops, "flops_matmul": a.flops_matmul,
                     "flops_reduction": 1.0 - a.flops / base.flops if base.flops else 0.0,
                     "speedup": base.flops / a.flops if a.flops else float("inf"),
                     "peak_activation_bytes": a.peak_activation_bytes, "kv_cache_bytes": a.kv_cache_bytes})
    return SweepTable(rows)
