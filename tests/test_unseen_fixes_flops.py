"""General fixes for the "flops" stage of bench/unseen_families.py (branch fixflops), each on a tiny synthetic model:

* a triangular solve (``torch.linalg.solve_triangular``, the UT transform of gated linear-attention layers) does
  matrix-product work that ``FlopCounterMode`` did not count (torch has no formula for it), while the same product
  written as an inverse times ``B`` (what such a layer computes when torch is exporting) is counted as a matmul:
  the oracle and the cost registry now count ``n * numel(X)`` for it (``(n-1) * numel(X)`` with a unit diagonal);
* a model whose code computes the same values another, costlier way when told it is exported (that layer: the
  inverse of the triangle built by substitution, then multiplied): capture keeps the eager path's graph where the
  export path's runs more matrix-product FLOPs than the model (before: only where the outputs differed);
* PuMer's scoring (``graphred::attention_scores``) ran the query rows with weight in *some* sample for every sample:
  with the text at different positions in each sample (uneven image counts, padding) that is up to ``B`` times the
  rows that carry weight. It now runs each sample's own rows where they add up to fewer, and the oracle and the
  cost model count what it runs (``graphred.ops.scored_rows``).
"""
from __future__ import annotations

import warnings

import torch
from torch import nn

from graphred.analysis.cost import count_flops_executed, count_graph


class _Solve(nn.Module):
    """``X = A^-1 B`` with ``A`` unit lower triangular, as a gated delta rule's chunk transform."""

    def forward(self, a, b):
        eye = torch.eye(a.shape[-1])
        system = a.tril(-1) + eye
        return torch.linalg.solve_triangular(system, b, upper=False, unitriangular=True) + \
            torch.linalg.solve_triangular(system, b, upper=False, left=True)


def test_triangular_solve_is_counted_by_the_oracle_and_the_registry():
    a, b = torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 5)
    m = _Solve()
    n, rhs = 8, 2 * 3 * 8 * 5  # numel(X)
    got = count_flops_executed(m, a, b)
    assert got == rhs * (n - 1) + rhs * n  # unit diagonal: no divisions
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gm = torch.export.export(m, (a, b)).module()
    totals = count_graph(gm, kind="matmul")
    assert not totals.uncounted
    assert int(totals.flops) == got


class _ExportPathCostsMore(nn.Module):
    """Code that asks ``torch.compiler.is_exporting()`` and, when told yes, computes the same values with three
    matrix products instead of one (as a gated delta rule builds the inverse of its triangle for export targets
    that lack a triangular solve)."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(8, 8))

    def forward(self, x):
        if torch.compiler.is_exporting():
            return (x @ self.w + x @ self.w) * 0.5 + 0 * (x @ self.w)  # bit for bit x @ w
        return x @ self.w


def test_capture_keeps_the_eager_path_when_the_export_path_costs_more():
    import graphred

    m, x = _ExportPathCostsMore().eval(), torch.randn(2, 5, 8)
    prog = graphred.capture(m, x)
    with torch.no_grad():
        eager, graph = count_flops_executed(m, x), count_flops_executed(prog.graph_module, x)
        assert torch.equal(prog.graph_module(x), m(x))
    assert eager == 2 * 2 * 5 * 8 * 8
    assert graph == eager  # before: 3x (the export path's graph)
    assert any("matrix-product FLOPs" in n for n in prog.notes)


class _Score(nn.Module):
    """Text-informed scores with the text rows read from the bookkeeping (code 1 = text)."""

    def forward(self, q, k, codes):
        import graphred.ops as gops

        return gops.attention_scores(q, k, (codes == 1).float(), None, 0.25)


def test_scoring_runs_each_samples_own_rows_and_the_counts_follow():
    from graphred.analysis.cost.counting import Coster
    from graphred.analysis.cost.shapes import Shapes
    from graphred.fx_utils import flat_inputs

    torch.manual_seed(0)
    B, H, L, D = 2, 2, 12, 8
    q, k = torch.randn(B, H, L, D), torch.randn(B, H, L, D)
    codes = torch.zeros(B, L, dtype=torch.long)
    codes[0, :3] = 1  # sample 0's text first, sample 1's last: 7 rows carry weight in some sample, 3 + 4 their own
    codes[1, 8:] = 1
    got = _Score()(q, k, codes)
    probs = torch.softmax(q @ k.transpose(-1, -2) * 0.25, -1).mean(1)
    torch.testing.assert_close(got, torch.stack([probs[0, :3].mean(0), probs[1, 8:].mean(0)]))
    own = sum(2 * H * n * L * D + 2 * n * L for n in (3, 4))
    union = 2 * B * H * 7 * L * D + 2 * B * 7 * L
    assert count_flops_executed(_Score(), q, k, codes) == own < union  # before: union
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gm = torch.export.export(_Score(), (q, k, codes)).module()
    node = next(n for n in gm.graph.nodes if n.op == "call_function" and "attention_scores" in str(n.target))
    cost = Coster(Shapes(None, {}, {}), gm, flat_inputs(gm, (q, k, codes), {})).cost(node, symbolic=False)
    assert int(cost[1]) == own  # the cost model's matmul FLOPs of the node
