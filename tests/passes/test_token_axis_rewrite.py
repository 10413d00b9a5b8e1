"""Before/Expected for the token-axis rewrite on a small hand-written module: the graph after
``reduce_stream`` is compared as ``[(op, shape)]`` with a hand-written expected list, and its output with
the original model's output at the kept positions."""
from __future__ import annotations

import torch
import torch.nn as nn

from graphred.analysis.provenance import TokenProvenance
from graphred.fx_utils import call_with_val, node_shape, op_name
from graphred.passes.infra import check_meta_vals, insert_after
from graphred.passes.pipeline import copy_graph_module
from graphred.passes.token_axis import StreamState, record_original_shapes, reduce_stream

aten = torch.ops.aten


class Before(nn.Module):
    """Tokens from an embedding, a position table added, a per-token mask operand that meets the stream at
    full length, a shape constant on the token axis."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 4)
        self.pos = nn.Parameter(torch.randn(6, 4))
        self.proj = nn.Linear(4, 3)

    def forward(self, ids, mask):
        h = self.emb(ids) + self.pos
        h = h * mask.unsqueeze(-1)
        return self.proj(h).reshape(2, 6 * 3)


def _ops(gm):
    return [(op_name(n), node_shape(n)) for n in gm.graph.nodes if n.op == "call_function"]


def test_reduce_stream_matches_the_expected_graph():
    torch.manual_seed(0)
    model = Before()
    ids, mask = torch.randint(0, 10, (2, 6)), torch.rand(2, 6)
    gm = copy_graph_module(torch.export.export(model, (ids, mask)).module())
    assert _ops(gm) == [
        ("aten.embedding.default", (2, 6, 4)),
        ("aten.add.Tensor", (2, 6, 4)),
        ("aten.unsqueeze.default", (2, 6, 1)),
        ("aten.mul.Tensor", (2, 6, 4)),
        ("aten.linear.default", (2, 6, 3)),
        ("aten.reshape.default", (2, 18)),
    ]
    record_original_shapes(gm)
    prov = TokenProvenance(gm, ((ids, mask), {}))
    point = next(n for n in gm.graph.nodes if op_name(n) == "aten.add.Tensor")
    (dim, stream), = prov.axes(point)
    assert dim == 1
    with insert_after(point):  # keep tokens 1, 3, 5 of every sample
        idx = call_with_val(gm.graph, aten.arange.start_step, (1, 6, 2))
        idx = call_with_val(gm.graph, aten.unsqueeze.default, (idx, 0))
        idx = call_with_val(gm.graph, aten.expand.default, (idx, [2, 3]))
    reduce_stream(gm, prov, StreamState(stream.id, 6, 6), point, idx, 3)
    gm.graph.lint()
    gm.recompile()
    assert _ops(gm) == [
        ("aten.embedding.default", (2, 6, 4)),
        ("aten.add.Tensor", (2, 6, 4)),
        ("aten.arange.start_step", (3,)),
        ("aten.unsqueeze.default", (1, 3)),
        ("aten.expand.default", (2, 3)),
        ("graphred.gather_tokens.default", (2, 3, 4)),  # the reduction
        ("aten.unsqueeze.default", (2, 6, 1)),
        ("graphred.gather_tokens.default", (2, 3, 1)),  # the mask, gathered where it meets the stream
        ("aten.mul.Tensor", (2, 3, 4)),
        ("aten.linear.default", (2, 3, 3)),
        ("aten.reshape.default", (2, 9)),  # the shape constant re-specialised: 6 * 3 -> 3 * 3
    ]
    check_meta_vals(gm)
    expected = model(ids, mask).view(2, 6, 3)[:, 1::2].reshape(2, 9)
    torch.testing.assert_close(gm(ids, mask), expected)
