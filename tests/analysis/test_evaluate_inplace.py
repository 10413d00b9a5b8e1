"""Partial evaluation on graphs that keep in-place ops (captures that were not functionalized): a tensor
made by ``full``/``zeros``/``new_empty`` and then written through views (``w.select(0, i).copy_(t)``,
``fill_``, ``index_put_`` on a slice) holds what the writes put there, though the writes are not data
ancestors of its readers. Its value must be the one a real run reads, or be left out -- never the
tensor's initial value."""
import torch
import torch.fx as fx
from torch.fx.experimental.proxy_tensor import make_fx

from graphred.analysis.evaluate import partial_evaluate


def _real(gm: fx.GraphModule, inputs: list, nodes: list) -> dict:
    """Values of ``nodes`` in a real run, copied when computed (what their next user reads)."""
    got = {}

    class Rec(fx.Interpreter):
        def run_node(self, n):
            v = super().run_node(n)
            if n in nodes:
                got[n] = v.clone()
            return v

    Rec(gm).run(*[x.clone() for x in inputs])
    return got


def _node(gm: fx.GraphModule, op) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target is op]


def _buffer_written_through_views(x):
    w = torch.full((4, 6), 0.0)  # a query-weight-like buffer, filled in parts
    w.select(0, 0).copy_(x[0])
    w[1].fill_(2.0)
    w[2, 1:4].copy_(x[1, :3])
    w[3][torch.tensor([0, 5])] = torch.tensor([7.0, 9.0])  # index_put_ through a select
    e = x.new_empty((2, 6))
    e[:, :3].copy_(x[:, :3])
    e[:, 3:].fill_(1.0)
    return (w != 0).sum(-1), e * 2


def test_writes_through_views_before_the_reader_are_evaluated():
    x = torch.arange(12.0).reshape(2, 6) + 1
    gm = make_fx(_buffer_written_through_views)(x)
    kinds = {n.target for n in gm.graph.nodes if n.op == "call_function"}
    assert {torch.ops.aten.copy_.default, torch.ops.aten.fill_.Scalar, torch.ops.aten.index_put_.default} <= kinds
    count = _node(gm, torch.ops.aten.sum.dim_IntList)[0]
    doubled = _node(gm, torch.ops.aten.mul.Tensor)[0]
    full = _node(gm, torch.ops.aten.full.default)[0]
    got = partial_evaluate(gm, [x], [count, doubled, full])
    real = _real(gm, [x], [count, doubled])
    assert got[count].tolist() == real[count].tolist() == [6, 6, 3, 2]
    assert torch.equal(got[doubled], real[doubled])
    # the buffer node itself: the value its reader (``ne``) sees, not its initial zeros
    assert (got[full] != 0).sum(-1).tolist() == [6, 6, 3, 2]


def _written_after_a_read(x):
    w = torch.zeros(2, 3)
    w[0].fill_(1.0)
    v = w.select(0, 0)
    r1 = v * 1  # reads v while row 0 holds ones
    w[0].fill_(5.0)
    return r1, w.sum()  # the sum reads the later write


def test_a_wanted_node_has_the_value_its_readers_see():
    x = torch.ones(3)
    gm = make_fx(_written_after_a_read)(x)
    v = [n for n in _node(gm, torch.ops.aten.select.int) if n.users and
         next(iter(n.users)).target is torch.ops.aten.mul.Tensor][0]
    total = _node(gm, torch.ops.aten.sum.default)[0]
    got = partial_evaluate(gm, [x], [v, total])
    assert got[total].item() == 15.0  # both writes
    assert got[v].tolist() == [1.0, 1.0, 1.0]  # as ``v * 1`` read it, not after the later write


def _read_on_both_sides_of_a_write(x):
    w = torch.zeros(3)
    a = w + x
    w.fill_(2.0)
    return a, w + x


def test_a_node_read_before_and_after_a_write_is_left_out():
    x = torch.ones(3)
    gm = make_fx(_read_on_both_sides_of_a_write)(x)
    w = _node(gm, torch.ops.aten.zeros.default)[0]
    adds = _node(gm, torch.ops.aten.add.Tensor)
    got = partial_evaluate(gm, [x], [w, *adds])
    assert w not in got  # no single value: unknown, not one of them
    assert [got[a].tolist() for a in adds] == [[1.0] * 3, [3.0] * 3]


def _written_from_a_second_input(x, y):
    w = torch.zeros(2, 3)
    w[1].copy_(y)
    return (w + x).sum(-1)


def test_a_write_that_cannot_be_computed_leaves_its_readers_unknown():
    x, y = torch.ones(3), torch.full((3,), 4.0)
    gm = make_fx(_written_from_a_second_input)(x, y)
    out = _node(gm, torch.ops.aten.sum.dim_IntList)[0]
    assert partial_evaluate(gm, [x, y], [out])[out].tolist() == [3.0, 15.0]
    assert out not in partial_evaluate(gm, [x], [out])  # y unknown: never the unwritten zeros' [3, 3]


CONST = torch.zeros(3)


def _writes_into_inputs_and_constants(x):
    x.select(0, 0).fill_(7.0)
    CONST.add_(1.0)
    return x * 2 + CONST


def test_inputs_and_weights_written_in_place_are_copied():
    x = torch.ones(2, 3)
    gm = make_fx(_writes_into_inputs_and_constants)(x.clone())
    consts = [n for n in gm.graph.nodes if n.op == "get_attr"]
    assert consts and all(torch.ops.aten.add_.Tensor in {u.target for u in c.users} for c in consts)
    before = {c.target: getattr(gm, c.target).clone() for c in consts}
    out = [n for n in gm.graph.nodes if n.op == "output"][0].args[0]
    out = out[0] if isinstance(out, (list, tuple)) else out
    got = partial_evaluate(gm, [x], [out])
    assert got[out].tolist() == [[16.0] * 3, [4.0] * 3]
    assert torch.equal(x, torch.ones(2, 3))  # the caller's input
    assert all(torch.equal(getattr(gm, t), v) for t, v in before.items())  # the graph's constant
