"""Pass infrastructure: ordering, checks and error wrapping, analysis caching, meta['val'] helpers."""
from __future__ import annotations

import copy
import operator

import pytest
import torch
import torch.fx as fx
from torch.fx.passes.infra.pass_manager import PassManager as TorchPassManager

from graphred.errors import AnalysisError, PassError, PostconditionError, PreconditionError
from graphred.passes.infra import (
    ALL, Analysis, AnalysisManager, GraphredPass, PassManager, PassResult, check_meta_vals,
    insert_after, node_result, propagate_meta, record_node_result, replace_all_uses_except,
    set_fake_val,
)

aten = torch.ops.aten


class Toy(torch.nn.Module):
    def forward(self, x):
        return torch.relu(x + 1) * 2


class TokenToy(torch.nn.Module):
    """(B, N, 4) -> (B, N): a linear on the feature axis, then a sum; dim 1 plays the token axis."""

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(4, 3)

    def forward(self, x):
        return torch.relu(self.proj(x)).sum(-1)


@pytest.fixture(scope="module")
def exported():
    torch.manual_seed(0)
    return torch.export.export(TokenToy(), (torch.randn(2, 5, 4),))


@pytest.fixture(scope="module")
def exported_dynamic():
    batch = torch.export.Dim("B", min=2, max=64)
    return torch.export.export(TokenToy(), (torch.randn(2, 5, 4),), dynamic_shapes=({0: batch},))


def traced() -> fx.GraphModule:
    return fx.symbolic_trace(Toy())


def find(gm: fx.GraphModule, target) -> fx.Node:
    return next(n for n in gm.graph.nodes if n.target is target)


def narrow_tokens(gm: fx.GraphModule, keep: int, *, propagate: bool) -> fx.Node:
    """Insert ``x.narrow(1, 0, keep)`` after the input and route every other user of x through it."""
    x = next(n for n in gm.graph.nodes if n.op == "placeholder" and n.name == "x")
    with insert_after(x):
        cut = gm.graph.call_function(aten.narrow.default, (x, 1, 0, keep))
    replace_all_uses_except(x, cut, except_nodes=[u for u in x.users if u.op == "call_module"])
    if propagate:
        propagate_meta(gm, [cut])
    else:
        set_fake_val(cut)  # the new node is right, everything downstream is now stale
    return cut


# ----------------------------------------------------------------------------- toy passes


class Recorder(GraphredPass):
    def __init__(self, log: list, name: str, modified: bool = False):
        self.log, self.name, self.modified = log, name, modified

    def call(self, gm):
        self.log.append(self.name)
        return PassResult(gm, self.modified)


class AddToSub(GraphredPass):
    def call(self, gm):
        hits = [n for n in gm.graph.nodes if n.target is operator.add]
        for n in hits:
            n.target = operator.sub
        return PassResult(gm, bool(hits))


class BreakTopology(GraphredPass):
    """Makes relu read the mul that comes after it: lint must reject the graph."""

    def call(self, gm):
        relu, mul = find(gm, torch.relu), next(n for n in gm.graph.nodes if n.name == "mul")
        relu.args = (mul,)
        return PassResult(gm, True)


class Boom(GraphredPass):
    def call(self, gm):
        raise ValueError("boom inside the pass")


class StaleMeta(GraphredPass):
    def call(self, gm):
        narrow_tokens(gm, 3, propagate=False)
        return PassResult(gm, True)


class NarrowAndPropagate(GraphredPass):
    def call(self, gm):
        narrow_tokens(gm, 3, propagate=True)
        return PassResult(gm, True)


# ----------------------------------------------------------------------------- pass manager


def test_passes_run_in_order_and_modified_is_any():
    log = []
    passes = [Recorder(log, "a"), Recorder(log, "b", modified=True), Recorder(log, "c")]
    result = PassManager(passes)(traced())
    assert log == ["a", "b", "c"]
    assert result.modified is True
    assert PassManager([Recorder(log, "d")])(traced()).modified is False


def test_default_name_is_class_name_and_plain_functions_are_passes():
    assert AddToSub.name == "AddToSub" and AddToSub().name == "AddToSub"
    gm = traced()

    def noop(gm):
        return PassResult(gm, False)

    result = PassManager([noop, AddToSub()])(gm)
    assert result.modified and result.graph_module is gm
    assert "operator.sub" not in gm.code and "x - 1" in gm.code  # recompiled
    torch.testing.assert_close(gm(torch.zeros(3)), torch.zeros(3))


def test_lint_failure_is_wrapped_with_pass_and_previous_passes():
    log = []
    with pytest.raises(PostconditionError) as info:
        PassManager([Recorder(log, "first"), Recorder(log, "second"), BreakTopology()])(traced())
    err = info.value
    assert err.pass_name == "BreakTopology" and err.previous == ("first", "second")
    message = str(err)
    assert "BreakTopology" in message and "first, second" in message and "used before" in message
    assert err.__cause__ is not None and "used before" in str(err.__cause__)


def test_exception_inside_pass_is_wrapped_and_chained():
    with pytest.raises(PassError) as info:
        PassManager([AddToSub(), Boom()])(traced())
    err = info.value
    assert type(err) is PassError and err.pass_name == "Boom" and err.previous == ("AddToSub",)
    assert "ValueError: boom inside the pass" in str(err)
    assert isinstance(err.__cause__, ValueError)


def test_requires_and_ensures_raise_typed_errors():
    class NeedsExport(GraphredPass):
        def requires(self, gm):
            if not any("val" in n.meta for n in gm.graph.nodes):
                raise PreconditionError("needs meta['val']: capture with torch.export first")

        def call(self, gm):
            return PassResult(gm, False)

    with pytest.raises(PreconditionError, match="NeedsExport.*capture with torch.export") as info:
        PassManager([NeedsExport()])(traced())
    assert info.value.pass_name == "NeedsExport"

    class NoRelu(AddToSub):
        def ensures(self, gm):
            if any(n.target is torch.relu for n in gm.graph.nodes):
                raise PostconditionError("relu still present")

    with pytest.raises(PostconditionError, match="NoRelu.*relu still present"):
        PassManager([NoRelu()])(traced())


def test_second_run_changes_nothing_and_fixpoint():
    gm = traced()
    assert PassManager([AddToSub()])(gm).modified
    assert not PassManager([AddToSub()])(gm).modified

    class DropOneRelu(GraphredPass):
        def call(self, gm):
            for n in gm.graph.nodes:
                if n.target is torch.relu:
                    n.replace_all_uses_with(n.args[0])
                    gm.graph.erase_node(n)
                    return PassResult(gm, True)
            return PassResult(gm, False)

    gm = fx.symbolic_trace(lambda x: torch.relu(torch.relu(torch.relu(x))))
    assert PassManager([DropOneRelu()], run_until_fixpoint=True)(gm).modified
    assert not any(n.target is torch.relu for n in gm.graph.nodes)

    with pytest.raises(PassError, match="no fixpoint after 3 iterations"):
        PassManager([Recorder([], "always", modified=True)], run_until_fixpoint=True, max_iterations=3)(traced())


def test_dce_only_when_the_pass_asks():
    class LeaveDeadNode(GraphredPass):
        def call(self, gm):
            with insert_after(find(gm, torch.relu)):
                gm.graph.call_function(torch.neg, (find(gm, torch.relu),))
            return PassResult(gm, True)

    class LeaveDeadNodeDCE(LeaveDeadNode):
        dce = True

    gm = traced()
    PassManager([LeaveDeadNode()])(gm)
    assert any(n.target is torch.neg for n in gm.graph.nodes)
    gm = traced()
    PassManager([LeaveDeadNodeDCE()])(gm)
    assert not any(n.target is torch.neg for n in gm.graph.nodes)


def test_graphred_pass_runs_under_torch_pass_manager():
    gm = traced()
    result = TorchPassManager([AddToSub()])(gm)
    assert result.modified and "x - 1" in result.graph_module.code


# ----------------------------------------------------------------------------- in place / out of place


def test_in_place_pass_must_return_its_input():
    class ReturnsCopy(GraphredPass):
        def call(self, gm):
            return PassResult(copy.deepcopy(gm), True)

    with pytest.raises(PostconditionError, match="in_place=True but returned a different GraphModule"):
        PassManager([ReturnsCopy()])(traced())


def test_out_of_place_pass_returns_a_new_module_and_leaves_input_alone():
    class CopyThenRewrite(AddToSub):
        in_place = False

        def call(self, gm):
            return super().call(copy.deepcopy(gm))

    gm = traced()
    before = gm.code
    result = PassManager([CopyThenRewrite()])(gm)
    assert result.graph_module is not gm and "x - 1" in result.graph_module.code
    assert gm.code == before

    class MutatesInput(AddToSub):
        in_place = False

        def call(self, gm):
            super().call(gm)
            return PassResult(copy.deepcopy(gm), True)

    with pytest.raises(PostconditionError, match="in_place=False but mutated its input"):
        PassManager([MutatesInput()])(traced())


def test_a_pass_that_changes_the_graph_must_say_so():
    class Liar(AddToSub):
        def call(self, gm):
            return PassResult(super().call(gm).graph_module, False)

    with pytest.raises(PostconditionError, match="reported modified=False but changed the graph"):
        PassManager([Liar()])(traced())


# ----------------------------------------------------------------------------- meta['val']


@pytest.mark.parametrize("which", ["module", "graph_module", "dynamic"])
def test_check_meta_vals_accepts_a_fresh_export(exported, exported_dynamic, which):
    if which == "graph_module":  # aten graph with parameters lifted to placeholders
        gm = copy.deepcopy(exported.graph_module)
    else:  # unlifted: parameters as get_attr, plus torch.export's _guards_fn call_module
        gm = (exported_dynamic if which == "dynamic" else exported).module()
    vals = {n.name: n.meta.get("val") for n in gm.graph.nodes}
    check_meta_vals(gm)
    assert {n.name: n.meta.get("val") for n in gm.graph.nodes} == vals  # meta is left unchanged


def test_check_meta_vals_skips_graphs_without_vals():
    gm = traced()  # symbolic_trace: placeholders carry no meta["val"]
    assert all("val" not in n.meta for n in gm.graph.nodes if n.op == "placeholder")
    node = next(n for n in gm.graph.nodes if n.op == "call_function")
    stale = torch.empty(7, 7, dtype=torch.float64)  # would fail a re-check, were one possible
    node.meta["val"] = stale
    before = {n: dict(n.meta) for n in gm.graph.nodes}
    assert check_meta_vals(gm) is None
    assert node.meta["val"] is stale
    assert {n: dict(n.meta) for n in gm.graph.nodes} == before


def test_check_meta_vals_catches_a_wrong_dtype(exported):
    gm = exported.module()
    relu = find(gm, aten.relu.default)
    relu.meta["val"] = relu.meta["val"].to(torch.float64)
    with pytest.raises(PostconditionError, match=r"(?s)relu.*recorded torch.float64\[2, 5, 3\], recomputed torch.float32"):
        check_meta_vals(gm)


def test_pass_that_leaves_meta_stale_is_caught(exported):
    with pytest.raises(PostconditionError) as info:
        PassManager([AddToSub(), StaleMeta()])(exported.module())
    message = str(info.value)
    assert "StaleMeta" in message and "AddToSub" in message and "meta['val'] is stale" in message
    assert "linear" in message and "recorded torch.float32[2, 5, 3], recomputed torch.float32[2, 3, 3]" in message
    # the same manager without the check lets it through
    PassManager([StaleMeta()], check_meta=False)(exported.module())


@pytest.mark.parametrize("dynamic", [False, True])
def test_propagate_meta_recomputes_downstream_shapes(exported, exported_dynamic, dynamic):
    ep = exported_dynamic if dynamic else exported
    gm = ep.module()
    result = PassManager([NarrowAndPropagate()])(gm)
    assert result.modified
    shapes = {n.name: list(n.meta["val"].shape) for n in gm.graph.nodes
              if n.op == "call_function" and isinstance(n.meta.get("val"), torch.Tensor)}
    cut = find(gm, aten.narrow.default).name
    batch = shapes[cut][0]
    assert shapes[cut] == [batch, 3, 4] and shapes["linear"] == [batch, 3, 3] and shapes["sum_1"] == [batch, 3]
    assert isinstance(batch, torch.SymInt) == dynamic  # a symbolic batch stays symbolic
    check_meta_vals(gm)
    x = torch.randn(2, 5, 4)
    expected = torch.relu(torch.nn.functional.linear(x[:, :3], gm.proj.weight, gm.proj.bias)).sum(-1)
    torch.testing.assert_close(gm(x), expected)


def test_set_fake_val_uses_the_inputs_fake_mode(exported):
    gm = exported.module()
    relu = find(gm, aten.relu.default)
    with insert_after(relu):
        t = gm.graph.call_function(aten.transpose.int, (relu, 1, 2))
    val = set_fake_val(t)
    assert list(val.shape) == [2, 3, 5] and val.fake_mode is relu.meta["val"].fake_mode
    with pytest.raises(AnalysisError, match="has no meta\\['val'\\]; make sure"):
        bare = traced()
        set_fake_val(find(bare, torch.relu))


def test_replace_all_uses_except_and_insert_after_order():
    gm = traced()
    relu = find(gm, torch.relu)
    with insert_after(relu):
        a = gm.graph.call_function(torch.neg, (relu,))
        b = gm.graph.call_function(torch.neg, (a,))
        spare = gm.graph.call_function(torch.abs, (relu,))
    names = [n.name for n in gm.graph.nodes]
    assert names.index(relu.name) + 1 == names.index(a.name) == names.index(b.name) - 1
    changed = replace_all_uses_except(relu, b, except_nodes=[spare])  # a feeds b: kept, no cycle
    assert [n.name for n in changed] == ["mul"]
    assert set(relu.users) == {a, spare}
    gm.graph.lint()


# ----------------------------------------------------------------------------- analyses


class CountCalls(Analysis):
    runs = 0

    def run(self, gm, am):
        type(self).runs += 1
        return sum(n.op == "call_function" for n in gm.graph.nodes)


class Names(Analysis):
    def run(self, gm, am):
        for n in gm.graph.nodes:
            record_node_result(n, self, n.name.upper())
        return [n.name for n in gm.graph.nodes]


class DependsOnCount(Analysis):
    name = "depends"

    def run(self, gm, am):
        return am.get(CountCalls, gm) * 10


@pytest.fixture
def am():
    CountCalls.runs = 0
    return AnalysisManager(debug=True)


def test_analysis_is_computed_once_and_dependencies_resolve(am):
    gm = traced()
    assert am.peek(CountCalls, gm) is None
    assert am.get(DependsOnCount, gm) == 30
    assert am.get(CountCalls, gm) == 3 and am.get("CountCalls", gm) == 3 and CountCalls.runs == 1
    assert am.peek("depends", gm) == 30
    assert am.get(CountCalls, traced()) == 3 and CountCalls.runs == 2  # per graph module


def test_modifying_pass_drops_analyses_it_does_not_preserve(am):
    class KeepsCount(AddToSub):
        preserves = frozenset({"CountCalls"})

    gm = traced()
    am.get(CountCalls, gm), am.get(Names, gm)
    assert node_result(find(gm, torch.relu), Names) == "RELU"
    PassManager([KeepsCount()], analyses=am)(gm)
    assert am.peek(CountCalls, gm) == 3 and am.peek(Names, gm) is None
    with pytest.raises(AnalysisError, match="make sure Names has run"):
        node_result(find(gm, torch.relu), Names)
    assert CountCalls.runs == 1


def test_preserves_all_and_non_modifying_pass_keep_everything(am):
    class KeepsAll(AddToSub):
        preserves = ALL

    gm = traced()
    am.get(CountCalls, gm), am.get(Names, gm)
    PassManager([Recorder([], "noop"), KeepsAll()], analyses=am)(gm)
    assert am.peek(CountCalls, gm) == 3 and am.peek(Names, gm) is not None
    PassManager([Recorder([], "noop")], analyses=am)(gm)
    assert am.peek(Names, gm) is not None
    PassManager([AddToSub()], analyses=am)(gm)  # nothing left to rewrite: not modified
    assert am.peek(Names, gm) is not None


def test_pass_reads_analyses_through_its_manager(am):
    seen = []

    class Reader(GraphredPass):
        def call(self, gm):
            seen.append(self.analyses.require(CountCalls, gm))
            return PassResult(gm, False)

    gm = traced()
    with pytest.raises(PassError, match="Reader.*make sure CountCalls has run"):
        PassManager([Reader()], analyses=am)(gm)
    am.get(CountCalls, gm)
    PassManager([Reader()], analyses=am)(gm)
    assert seen == [3]


def test_missing_analysis_messages(am):
    gm = traced()
    with pytest.raises(AnalysisError, match="make sure TokenProvenance has run"):
        am.require("TokenProvenance", gm)
    with pytest.raises(AnalysisError, match="make sure TokenProvenance has run"):
        am.get("TokenProvenance", gm)
    with pytest.raises(AnalysisError, match="make sure Names has run"):
        node_result(find(gm, torch.relu), "Names")


def test_debug_mode_rejects_an_analysis_that_changes_the_graph(am):
    class Sneaky(Analysis):
        def run(self, gm, am):
            find(gm, torch.relu).target = torch.sigmoid

    with pytest.raises(AnalysisError, match="'Sneaky' changed the graph"):
        am.get(Sneaky, traced())


def test_cyclic_analyses_are_reported(am):
    class Ping(Analysis):
        def run(self, gm, am):
            return am.get(Pong, gm)

    class Pong(Analysis):
        def run(self, gm, am):
            return am.get(Ping, gm)

    with pytest.raises(AnalysisError, match="cycle: Ping -> Pong -> Ping"):
        am.get(Ping, traced())
