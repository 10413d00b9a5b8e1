"""General fixes for the cost model on mixture-of-experts layers (bench/unseen_families.py, branch moecost), each on
a tiny synthetic model:

* experts run as one grouped matmul over the rows routed to each (``F.grouped_mm`` / ``aten._grouped_mm``, or a
  library's opaque fallback for it: a custom op named ``grouped_mm_fallback`` that loops ``mm`` over the groups, as
  Hugging Face's MoE layers register one) did matrix-product work that neither ``FlopCounterMode`` (no formula in
  torch) nor the estimate (no cost formula: listed uncounted) counted, so "estimate == FlopCounterMode" held with
  the experts missing from both (Qwen3-VL-MoE: 28.1 M of 30.8 M). The oracle and the registry now count the groups'
  matmuls, ``2 * rows * K * N`` (the oracle over the rows up to ``offs[-1]``, which the kernel runs), and the
  routed rows follow the tokens a plan keeps.
"""
from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn

import graphred
from graphred.analysis.cost import count_flops_executed, count_graph
from graphred.plans import pumer
from tiny_layers import CausalLayer, ImageTextDecoder, image_text_inputs


def _loop_grouped_mm(input: torch.Tensor, weight: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    out = torch.zeros(input.shape[0], weight.shape[2], dtype=input.dtype)
    start = 0
    for i, end in enumerate(offs.tolist()):
        if end > start:
            out[start:end] = input[start:end] @ weight[i]
        start = end
    return out


def _loop_grouped_mm_fake(input, weight, offs):
    return input.new_empty(input.shape[0], weight.shape[2])


# a library's opaque fallback for torch._grouped_mm (one kernel looping mm over the groups)
torch.library.custom_op("graphred_test_moe::grouped_mm_fallback", _loop_grouped_mm, mutates_args=(),
                        schema="(Tensor input, Tensor weight, Tensor offs) -> Tensor")
torch.library.register_fake("graphred_test_moe::grouped_mm_fallback", _loop_grouped_mm_fake)


def test_grouped_matmuls_are_counted_by_the_oracle_and_the_registry():
    x, w = torch.randn(10, 16), torch.randn(3, 16, 8)
    offs = torch.tensor([4, 4, 10], dtype=torch.int32)
    fallback = torch.ops.graphred_test_moe.grouped_mm_fallback
    for fn in (lambda: F.grouped_mm(x, w, offs=offs), lambda: fallback(x, w, offs)):
        assert count_flops_executed(fn) == 2 * 10 * 16 * 8  # before: 0
    # rows past offs[-1] are not run by the kernel
    assert count_flops_executed(lambda: fallback(x, w, torch.tensor([2, 5, 6], dtype=torch.int32))) == 2 * 6 * 16 * 8

    class _M(nn.Module):
        def forward(self, x, w, offs):
            return F.grouped_mm(x, w, offs=offs) + fallback(x, w, offs)

    x, w = x.bfloat16(), w.bfloat16()  # torch's grouped_mm traces in bfloat16 only
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gm = torch.export.export(_M(), (x, w, offs)).module()
    totals = count_graph(gm, kind="matmul")
    assert not totals.uncounted  # before: both listed, "no cost formula"
    assert int(totals.flops) == count_flops_executed(_M(), x, w, offs) == 2 * 2 * 10 * 16 * 8


V, D, FF, IMG_ID, N_IMG, E, TOP_K = 40, 16, 32, 39, 4, 3, 2


class _GroupedExperts(nn.Module):
    """Top-k routing as Hugging Face's grouped-matmul experts write it: the (token, slot) pairs sorted by expert, the
    rows per expert counted (``histc``) into offsets, one grouped matmul per projection over all experts; ``impl``:
    ``"grouped_mm"`` (``F.grouped_mm``, the fallback when exported), ``"fallback"`` (an opaque custom op of the same
    operands) or ``"dense"``
    (each token's experts computed by an einsum, no grouping: the reference)."""

    def __init__(self, impl: str):
        super().__init__()
        self.impl = impl
        self.router = nn.Linear(D, E, bias=False)
        self.up = nn.Parameter(torch.randn(E, D, FF) / 4)
        self.down = nn.Parameter(torch.randn(E, FF, D) / 4)

    def _gmm(self, x, w, offs):
        # as Hugging Face's layers: torch's grouped_mm traces in bfloat16 only, so exported float32 runs the fallback
        if self.impl == "fallback" or torch.compiler.is_exporting():
            return torch.ops.graphred_test_moe.grouped_mm_fallback(x, w, offs)
        return F.grouped_mm(x, w, offs=offs)

    def forward(self, x):
        h = x.reshape(-1, D)
        weights, idx = torch.topk(self.router(h), TOP_K, dim=-1)
        weights = weights.softmax(-1)
        if self.impl == "dense":
            up = torch.einsum("td,tkdf->tkf", h, self.up[idx])
            out = torch.einsum("tkf,tkfd->tkd", F.silu(up), self.down[idx])
            return x + (out * weights.unsqueeze(-1)).sum(1).view(x.shape)
        ids, perm = torch.sort(idx.reshape(-1))
        rows = h[perm // TOP_K]
        offs = torch.cumsum(torch.histc(ids.float(), bins=E, min=0, max=E - 1), 0, dtype=torch.int32)
        out = self._gmm(F.silu(self._gmm(rows, self.up, offs)), self.down, offs)
        out = out * weights.reshape(-1)[perm].unsqueeze(-1)
        back = torch.zeros_like(out).index_copy(0, perm, out)
        return x + back.view(-1, TOP_K, D).sum(1).view(x.shape)


def _moe_decoder(impl: str) -> ImageTextDecoder:
    return ImageTextDecoder(V, D, IMG_ID, lambda: nn.Sequential(CausalLayer(D), _GroupedExperts(impl)))


def test_grouped_experts_are_in_the_estimate_before_and_after_a_plan():
    # the routed experts do the matrix-product work of the same experts computed token by token (the dense
    # reference); the estimate, FlopCounterMode on the model and on the reduced module all count it (before: 0 in
    # each, so the estimate "equalled" FlopCounterMode with the experts missing from both)
    torch.manual_seed(0)
    kwargs = image_text_inputs(V, IMG_ID, N_IMG)
    dense = _moe_decoder("dense").eval()
    want = count_flops_executed(dense, **kwargs)
    for impl in ("grouped_mm", "fallback"):
        model = _moe_decoder(impl).eval()
        model.load_state_dict(dense.state_dict())
        with torch.no_grad():
            torch.testing.assert_close(model(**kwargs), dense(**kwargs))
        assert count_flops_executed(model, **kwargs) == want, impl
        prog = graphred.capture(model, **kwargs)
        plan = pumer(prune=0.5, merge=0.0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            est = graphred.estimate(prog, plan)
        assert not est.uncounted, (impl, est.uncounted)
        assert est.flops_matmul == want, impl
        reduced = graphred.transform(prog, plan)
        with torch.no_grad():
            reduced(**kwargs)
        assert [s["image_after"] for s in reduced.steps if s["op"] == "prune"] == [2], reduced.steps
        got_after = count_flops_executed(reduced, **kwargs)
        assert est.after.flops_matmul == got_after, impl
        # the experts run on the kept tokens' rows: fewer tokens, fewer expert FLOPs, in both counts
        assert got_after < want and est.after.flops < est.flops
