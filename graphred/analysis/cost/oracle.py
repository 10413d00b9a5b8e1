"""FLOP oracle: what ``torch.utils.flop_counter.FlopCounterMode`` counts while a function really runs.

This is the independent reference the cost model (:mod:`.registry`) is validated against. It is
torch's own counter, with the gaps that would make it miss attention filled:

* ``aten._scaled_dot_product_flash_attention_for_cpu`` (the kernel ``F.scaled_dot_product_attention``
  runs on CPU) and its backward have no formula in torch (checked on 2.13):
  :func:`install_cpu_sdpa_flop_formula` registers torch's own ``sdpa_flop_count`` /
  ``sdpa_backward_flop_count`` for them with ``register_flop_formula`` (GQA-aware; causal counted
  in full, torch's convention). Should a later torch register a formula that counts 0, ours is
  passed as a ``custom_mapping`` instead.
* ``aten._native_multi_head_attention`` (``nn.MultiheadAttention``'s eval fast path) runs its
  matmuls inside one kernel the mode cannot see into: counted as its projections plus SDPA.
* ``aten.linalg_solve_triangular`` / ``aten.triangular_solve`` (a triangular system solved by substitution,
  e.g. the UT transform of gated linear-attention layers) have no formula in torch (checked on 2.13), while
  the same product written as a matrix inverse times ``B`` is counted as a matmul: counted as
  ``n * numel(X)`` for an ``n x n`` triangle (``n*(n-1)`` per right-hand side with a unit diagonal; LAPACK's
  trsm count, 2 FLOPs per multiply-add).
* ``aten._grouped_mm`` (``F.grouped_mm``: the experts of a mixture-of-experts layer, each on its routed rows)
  has no formula in torch (checked on 2.13), nor have libraries' opaque fallbacks for it (custom ops named
  ``grouped_mm_fallback`` that loop ``mm`` over the groups inside one kernel): counted as the groups' matmuls,
  over the grouped dim up to ``offs[-1]`` (:func:`_grouped_mm_flop`).
* graphred custom ops (``torch.ops.graphred.*``) run as opaque kernels: ``attention_scores`` and
  ``bipartite_match`` are counted from their real arguments -- the query rows that carry weight and
  the candidate split that the kernels actually execute -- with torch's ``bmm_flop``. The other
  graphred ops do no matrix products (FlopCounterMode counts nothing for them).

As FlopCounterMode, the oracle counts matrix products only (2 FLOPs per multiply-add);
compare it with ``count_graph(..., kind="matmul")``.

>>> import torch, torch.nn.functional as F
>>> q = k = v = torch.randn(1, 2, 16, 8)
>>> count_flops_executed(F.scaled_dot_product_attention, q, k, v)
16384
"""
from __future__ import annotations

import math
from typing import Any, Callable

import torch
from torch.utils import flop_counter as _fc

__all__ = [
    "install_cpu_sdpa_flop_formula",
    "flop_counter_mode",
    "count_flops_executed",
    "flop_counts_executed",
    "peak_activations_executed",
]

aten = torch.ops.aten

# formulas passed as FlopCounterMode(custom_mapping=...) because the registered one counts nothing
_OVERRIDES: dict[Any, Callable] = {}
_INSTALLED = False


def _sdpa_count(query_shape, key_shape, value_shape) -> int:
    if hasattr(_fc, "sdpa_flop_count"):
        return _fc.sdpa_flop_count(query_shape, key_shape, value_shape)
    b, h, lq, d = query_shape
    lk, dv = key_shape[-2], value_shape[-1]
    return 2 * b * h * lq * lk * d + 2 * b * h * lq * lk * dv


def _cpu_sdpa_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    """FLOPs of aten._scaled_dot_product_flash_attention_for_cpu: torch's sdpa_flop_count."""
    return _sdpa_count(query_shape, key_shape, value_shape)


def _cpu_sdpa_backward_flop(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None,
                            **kwargs) -> int:
    """FLOPs of aten._scaled_dot_product_flash_attention_for_cpu_backward: torch's sdpa_backward_flop_count."""
    return _fc.sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


def _probe(formula: Callable, args: tuple, out_val: Any) -> int:
    try:
        return int(formula(*args, out_val=out_val))
    except Exception:  # noqa: BLE001 - a formula that cannot count the probe counts nothing
        return 0


def install_cpu_sdpa_flop_formula() -> dict[str, str]:
    """Make FlopCounterMode count the CPU SDPA kernel (forward and backward); idempotent.

    Returns ``{op name: what was done}``: ``"registered"`` (no formula in this torch, ours added to
    ``torch.utils.flop_counter.flop_registry``), ``"present"`` (torch's own counts non-zero) or
    ``"override"`` (torch's counts 0; ours is used through ``custom_mapping``).

    >>> install_cpu_sdpa_flop_formula()["aten::_scaled_dot_product_flash_attention_for_cpu"] in (
    ...     "registered", "present")
    True
    """
    global _INSTALLED
    meta = dict(device="meta")
    q = torch.empty(1, 2, 4, 8, **meta)
    lse = torch.empty(1, 2, 4, **meta)
    done: dict[str, str] = {}
    specs = [
        ("_scaled_dot_product_flash_attention_for_cpu", _cpu_sdpa_flop, (q, q, q, 0.0, False), (q, lse)),
        ("_scaled_dot_product_flash_attention_for_cpu_backward", _cpu_sdpa_backward_flop,
         (q, q, q, q, q, lse, 0.0, False), (q, q, q)),
    ]
    for name, fn, probe_args, probe_out in specs:
        packet = getattr(aten, name, None)
        if packet is None:
            continue
        if name.endswith("_backward") and not hasattr(_fc, "sdpa_backward_flop_count"):
            continue
        qual = f"aten::{name}"
        if packet not in _fc.flop_registry:
            _fc.register_flop_formula(packet)(fn)
            done[qual] = "registered"
        elif packet in _OVERRIDES or _probe(_fc.flop_registry[packet], probe_args, probe_out) == 0:
            _OVERRIDES[packet] = fn
            done[qual] = "override"
        else:
            done[qual] = "present"
    _INSTALLED = True
    return done


# ---------------------------------------------------------------------------------------
# Formulas for kernels FlopCounterMode cannot see into (raw: they read real argument values)
# ---------------------------------------------------------------------------------------


def _is_real(t: Any) -> bool:
    if not isinstance(t, torch.Tensor) or t.device.type == "meta":
        return False
    from torch._subclasses.fake_tensor import FakeTensor
    from torch._subclasses.functional_tensor import FunctionalTensor

    return not isinstance(t, (FakeTensor, FunctionalTensor))


def _native_mha_flop(query_shape, key_shape, value_shape, embed_dim, num_head, *args, out_shape=None,
                     **kwargs) -> int:
    """nn.MultiheadAttention fast path (batch first): q/k/v/out projections + SDPA."""
    b, lq, e = query_shape
    s = key_shape[1]
    e, h = int(embed_dim), int(num_head)
    proj = _fc.mm_flop((b * lq, e), (e, e)) * 2 + _fc.mm_flop((b * s, e), (e, e)) * 2
    return proj + _sdpa_count((b, h, lq, e // h), (b, h, s, e // h), (b, h, s, e // h))


def _trsm_flop(a_shape, x_shape, unitriangular: bool) -> int:
    """Substitution over an ``n x n`` triangle for every right-hand side in ``X`` (``numel(X) / n`` of them):
    ``n*(n-1)/2`` multiply-adds each (2 FLOPs apiece) plus ``n`` divisions unless the diagonal is unit."""
    n = int(a_shape[-1])
    return math.prod(int(d) for d in x_shape) * (n - 1 if unitriangular else n)


def _linalg_solve_triangular_flop(a_shape, b_shape, *args, upper=None, left=True, unitriangular=False,
                                  out_shape=None, **kwargs) -> int:
    """aten.linalg_solve_triangular(A, B, upper=, left=, unitriangular=): X = A^-1 B (or B A^-1)."""
    return _trsm_flop(a_shape, out_shape if out_shape is not None else b_shape, bool(unitriangular))


def _triangular_solve_flop(b_shape, a_shape, upper=True, transpose=False, unitriangular=False, *args,
                           out_shape=None, **kwargs) -> int:
    """aten.triangular_solve(B, A, upper, transpose, unitriangular) -> (X, A copy): X = A^-1 B."""
    x_shape = out_shape[0] if out_shape else b_shape
    return _trsm_flop(a_shape, x_shape, bool(unitriangular))


#: kernels with no formula in ``torch.utils.flop_counter`` that do matrix-product work: counted by ours
_MISSING_FORMULAS = {
    "linalg_solve_triangular": _linalg_solve_triangular_flop,
    "triangular_solve": _triangular_solve_flop,
}


def _grouped_mm_flop(a, b, offs=None, *args, out_val=None, **kwargs) -> int:
    """aten._grouped_mm (F.grouped_mm; a mixture-of-experts layer's experts, each on its routed rows) and
    libraries' opaque fallbacks of the same operands: the groups' matmuls, over the grouped dim up to ``offs[-1]``
    (the kernel skips rows past it) where the offsets are real, else over the whole grouped dim.
    ``[M,K]@[G,K,N]``: 2*rows*K*N; ``[G,M,K]@[K,N]``: 2*M*K*cols; ``[M,K]@[K,N]``: 2*M*k*N;
    ``[G,M,K]@[G,K,N]``: a bmm."""
    sa, sb = tuple(int(d) for d in a.shape), tuple(int(d) for d in b.shape)
    last = None
    if _is_real(offs) and offs.numel() > 0:
        last = int(offs.reshape(-1)[-1])
    if len(sa) == 2 and len(sb) == 3:
        m = sa[0] if last is None else max(0, min(last, sa[0]))
        return _fc.mm_flop((m, sa[1]), (sa[1], sb[2]))
    if len(sa) == 3 and len(sb) == 2:
        n = sb[1] if last is None else max(0, min(last, sb[1]))
        return _fc.mm_flop((sa[1], sa[2]), (sa[2], n))
    if len(sa) == 2 and len(sb) == 2:
        k = sa[1] if last is None else max(0, min(last, sa[1]))
        return _fc.mm_flop((sa[0], k), (k, sb[1]))
    if len(sa) == 3 and len(sb) == 3:
        return _fc.bmm_flop(sa, sb)
    return 0


_grouped_mm_flop._get_raw = True

#: op names outside aten taken as ``aten._grouped_mm`` (libraries' opaque fallbacks for it; the registry's
#: ``GROUPED_MM_NAMES``)
_GROUPED_MM_NAMES = ("grouped_mm", "_grouped_mm", "grouped_mm_fallback")


def _grouped_mm_mapping() -> dict[Any, Callable]:
    """``aten._grouped_mm`` (when torch has no formula for it) and every loaded custom op named as a grouped
    matmul (:data:`_GROUPED_MM_NAMES`, any namespace but aten) -> :func:`_grouped_mm_flop`."""
    out: dict[Any, Callable] = {}
    packet = getattr(aten, "_grouped_mm", None)
    if packet is not None and packet not in _fc.flop_registry:
        out[packet] = _grouped_mm_flop
    try:
        names = torch._C._dispatch_get_all_op_names()
    except Exception:  # noqa: BLE001 - no registry listing in this torch: aten's op only
        return out
    for qual in names:
        ns, _, name = str(qual).partition("::")
        name = name.split(".")[0]
        if ns in ("aten", "") or name not in _GROUPED_MM_NAMES:
            continue
        try:
            out[getattr(getattr(torch.ops, ns), name)] = _grouped_mm_flop
        except (AttributeError, RuntimeError):
            continue
    return out


def _attention_scores_flop(q, k, query_weight, attn_bias=None, scale=None, *, out_val=None, **kwargs) -> int:
    """graphred::attention_scores: q k^T over the query rows the kernel runs (the rows with weight in some
    sample, or each sample's own: :func:`graphred.ops.scored_rows`), then the weighted sum over those rows
    (a bmm)."""
    b, h, lq, d = q.shape
    lk = k.shape[2]
    if not _is_real(query_weight):
        return _fc.bmm_flop((b * h, lq, d), (b * h, d, lk)) + _fc.bmm_flop((b, 1, lq), (b, lq, lk))
    from graphred.ops import scored_rows

    total = 0
    for b0, b1, rows in scored_rows(query_weight.expand(b, lq)):
        nb, n = b1 - b0, rows.numel()
        total += _fc.bmm_flop((nb * h, n, d), (nb * h, d, lk)) + _fc.bmm_flop((nb, 1, n), (nb, n, lk))
    return total


_attention_scores_flop._get_raw = True


def _bipartite_match_flop(metric, candidates, r, protected=None, rank=None, reorder=False, *, out_val=None,
                          **kwargs) -> int:
    """graphred::bipartite_match: the [B, |A|, C] @ [B, C, |B|] similarity over the candidate split the
    kernel makes (|A|, |B| = most even-/odd-ranked candidates of any sample)."""
    if int(r) == 0:
        return 0
    b, l, c = metric.shape
    na, nb = math.ceil(l / 2), l // 2
    if _is_real(candidates):
        rank = torch.cumsum(candidates.to(torch.int64), dim=1) - 1
        na = int((candidates & (rank % 2 == 0)).sum(1).max()) if b else 0
        nb = int((candidates & (rank % 2 == 1)).sum(1).max()) if b else 0
    return _fc.bmm_flop((b, na, c), (b, c, nb))


_bipartite_match_flop._get_raw = True


def _graphred_mapping() -> dict[Any, Callable]:
    try:
        import graphred.ops  # noqa: F401 - registers torch.ops.graphred.*
    except Exception:  # noqa: BLE001 - the oracle works without the custom ops
        return {}
    out = {}
    for name, fn in (("attention_scores", _attention_scores_flop), ("bipartite_match", _bipartite_match_flop)):
        try:
            packet = getattr(torch.ops.graphred, name)
        except (AttributeError, RuntimeError):
            continue
        out[packet] = fn
    return out


def flop_counter_mode(display: bool = False, depth: int = 2) -> _fc.FlopCounterMode:
    """A ``FlopCounterMode`` that also counts CPU attention, MHA's fast path, triangular solves and graphred ops.

    >>> import torch
    >>> with flop_counter_mode() as fc:
    ...     _ = torch.randn(4, 5) @ torch.randn(5, 6)
    >>> fc.get_total_flops()
    240
    """
    install_cpu_sdpa_flop_formula()
    mapping: dict[Any, Callable] = dict(_OVERRIDES)
    if aten._native_multi_head_attention not in _fc.flop_registry:
        mapping[aten._native_multi_head_attention] = _native_mha_flop
    for name, fn in _MISSING_FORMULAS.items():
        packet = getattr(aten, name, None)
        if packet is not None and packet not in _fc.flop_registry:
            mapping[packet] = fn
    mapping.update(_grouped_mm_mapping())
    mapping.update(_graphred_mapping())
    return _fc.FlopCounterMode(display=display, depth=depth, custom_mapping=mapping)


def count_flops_executed(fn: Callable, *args, **kwargs) -> int:
    """Total FLOPs FlopCounterMode counts while ``fn(*args, **kwargs)`` runs (see the module doc).

    >>> import torch
    >>> count_flops_executed(torch.nn.Linear(8, 4), torch.randn(2, 8))
    128
    """
    with flop_counter_mode() as fc:
        fn(*args, **kwargs)
    return int(fc.get_total_flops())


def flop_counts_executed(fn: Callable, *args, **kwargs) -> dict[str, int]:
    """FLOPs per op (``"aten.mm"``, ``"graphred.attention_scores"``, ...) while ``fn`` runs.

    >>> import torch
    >>> flop_counts_executed(torch.nn.Linear(8, 4), torch.randn(2, 8))
    {'aten.addmm': 128}
    """
    with flop_counter_mode() as fc:
        fn(*args, **kwargs)
    counts = fc.get_flop_counts().get("Global", {})
    return {str(k): int(v) for k, v in counts.items()}


def _tensor_constants(fn: Any) -> list[torch.Tensor]:
    """Tensors a module holds as plain attributes, neither parameters nor buffers (torch.export's lifted
    constants, set on the graph module as attributes)."""
    if not isinstance(fn, torch.nn.Module):
        return []
    return [v for m in fn.modules() for v in vars(m).values() if isinstance(v, torch.Tensor)]


def peak_activations_executed(fn: Callable, *args, **kwargs) -> int:
    """Peak bytes of inputs + activations while ``fn(*args, **kwargs)`` really runs (CPU), by torch's
    ``MemTracker`` (it follows the storages the kernels allocate and free): the reference the liveness
    estimate (:func:`graphred.analysis.cost.memory.activation_memory`) is checked against.

    The inputs are registered as live. The module's parameters and buffers, and its tensor constants
    (plain tensor attributes: the constants torch.export lifts), are registered apart, as weights: left
    unregistered, a constant would count as an activation from the first op that returns a view of it
    (a ``reshape`` of a constant allocates nothing), and stay counted for the rest of the run.

    >>> lin, x = torch.nn.Linear(8, 4), torch.randn(2, 8)
    >>> peak_activations_executed(lin, x)     # x: 64 B, the output: 32 B
    96
    """
    from torch.distributed._tools.mem_tracker import MemTracker, _MemRefType
    from torch.utils._pytree import tree_leaves

    mt = MemTracker()
    mt.track_external(*([fn] if isinstance(fn, torch.nn.Module) else []), *_tensor_constants(fn))
    with torch.no_grad(), mt:
        for t in tree_leaves((args, kwargs)):  # the inputs are live too: register their storages
            if isinstance(t, torch.Tensor):
                t.view_as(t)
        out = fn(*args, **kwargs)
        del out
    return int(mt.get_tracker_snapshot("peak").get(torch.device("cpu"), {}).get(_MemRefType.ACT, 0))
