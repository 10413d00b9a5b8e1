"""The one rewrite pipeline: a plan lowers to passes the PassManager runs, with provenance, blocks and the
rewrite state as cached analyses; plus the plan errors that used to be silent or misleading."""
from __future__ import annotations

import warnings

import pytest
import torch

import graphred
from graphred.analysis.blocks import Blocks
from graphred.analysis.provenance import Provenance
from graphred.errors import PlanError, PreconditionError
from graphred.fx_utils import MADE_BY, ORIG_SHAPE, SIDE, recorded
from graphred.passes.apply import apply_plan
from graphred.passes.cse import CSEPass
from graphred.passes.fastv import FastVPass
from graphred.passes.infra import GraphredPass, PassManager
from graphred.passes.pipeline import lower, run_pipeline
from graphred.passes.fillers import FillerMaskPass
from graphred.passes.positions_output import PositionsOutputPass
from graphred.passes.proportional_attention import ProportionalAttentionPass
from graphred.passes.pumer import PumerPass
from graphred.passes.rewrite_state import Rewrite
from graphred.passes.tome import ToMePass
from graphred.plans import fastv, prune, pumer, tome

transform = graphred.transform


def test_lower_gives_one_pass_per_reducing_step_then_the_fixed_tail():
    plan = tome(r=4) + pumer(prune=0.5, merge=0.2) + fastv(layer=1, keep=1.0) + prune(0.3, scorer="norm")
    passes = lower(plan)
    assert [type(p) for p in passes] == [ToMePass, PumerPass, PumerPass, ProportionalAttentionPass, FillerMaskPass,
                                         PositionsOutputPass, CSEPass]  # fastv keep=1.0 is the identity: dropped
    assert [p.step for p in passes[:3]] == [plan.steps[0], plan.steps[1], plan.steps[3]]
    assert all(isinstance(p, GraphredPass) for p in passes)
    # one pass per file
    assert len({type(p).__module__ for p in passes}) == 6
    with pytest.raises(PlanError, match="expected a graphred.plans.Plan"):
        lower("fastv:layer=1")


def test_run_pipeline_on_a_bare_graph_module_is_apply_plan(zoo_program):
    prog = zoo_program("llava")
    plan = fastv(layer=1, keep=0.5)
    bare = run_pipeline(prog.graph_module, plan, prog.example_inputs())
    applied = apply_plan(prog, plan)
    assert bare.graph_module.code == applied.graph_module.code
    assert bare.log == applied.steps and bare.log[0]["image_after"] == 32
    assert bare.subs_at == applied.subs_at and bare.positions_output and applied.positions_output


def test_analyses_are_cached_and_preserves_is_honoured(zoo_program):
    prog = zoo_program("llava")
    out = run_pipeline(prog.graph_module, pumer(prune=0.5, merge=0.2), prog.example_inputs())
    am, gm = out.analyses, out.graph_module
    # the reduction passes preserve provenance and blocks; the clean-up (CSE + DCE) drops them
    assert PumerPass.preserves >= {Provenance.name, Blocks.name, Rewrite.name}
    assert Provenance.name not in CSEPass.preserves
    assert am.peek(Provenance, gm) is None and am.peek(Blocks, gm) is None
    assert am.peek(Rewrite, gm) is out.state and len(out.state.log) == 2  # prune, then merge


def test_inserted_nodes_carry_the_step_that_made_them(zoo_program):
    prog = zoo_program("llava")
    plan = fastv(layer=1, keep=0.5)
    gm = apply_plan(prog, plan).graph_module
    made = {recorded(n, MADE_BY) for n in gm.graph.nodes}
    assert plan.steps[0].spec() in made
    inserted = [n for n in gm.graph.nodes if recorded(n, MADE_BY) is not None]
    assert any(n.target is torch.ops.graphred.select_tokens.default for n in inserted)
    assert any(recorded(n, SIDE) for n in inserted)
    # every record lives under the one namespace; the program's own nodes got none
    assert not any(k.startswith("graphred_") for n in gm.graph.nodes for k in n.meta)
    assert all(recorded(n, ORIG_SHAPE) is None and recorded(n, MADE_BY) is None for n in prog.graph_module.graph.nodes)


def test_a_step_pass_without_provenance_is_a_precondition_error(zoo_program):
    gm = zoo_program("llava").graph_module
    with pytest.raises(PreconditionError, match="FastVPass.*needs the token provenance"):
        PassManager([FastVPass(fastv(layer=1, keep=0.5).steps[0])])(gm)


# ----------------------------------------------------------------- plan errors that used to mislead


@pytest.mark.parametrize("plan", [pumer(prune=0.5, layers="from:5"), pumer(prune=0.5, layers=(7,))])
def test_pumer_layers_beyond_the_model_say_how_many_it_has(zoo_program, plan):
    with pytest.raises(PlanError, match=r"2 cross-modal layers \[0, 1\]"):
        transform(zoo_program("llava"), plan)


@pytest.mark.parametrize("layers", ["from:5", 5, (5,)])
def test_tome_layers_beyond_the_tower_name_the_tower(zoo_program, layers):
    with pytest.raises(PlanError, match=r"tome: layers.*(are not|selects none).*\[0, 1\]") as ei:
        transform(zoo_program("clip"), tome(r=4, layers=layers))
    assert "dual encoder" not in str(ei.value)


def test_tome_r_above_the_cap_warns_with_the_cap(zoo_program):
    with pytest.warns(UserWarning, match=r"1000 merges requested, but bipartite matching merges at most \d+ of the"):
        reduced = transform(zoo_program("clip"), tome(r=1000, layers=(0,)))
    merged = reduced.steps[0]
    assert merged["image_after"] > 0 and merged["image_before"] - merged["image_after"] < 1000


def test_two_fastv_cuts_at_one_layer_say_so(zoo_program):
    with pytest.raises(PlanError, match="two FastV cuts at one layer"):
        transform(zoo_program("llava"), fastv(layer=1, keep=0.5) + fastv(layer=1, keep=0.5))


def test_transform_prints_no_future_warning(zoo_program):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        transform(zoo_program("llava"), fastv(layer=1, keep=0.5))
    assert not [w for w in caught if issubclass(w.category, FutureWarning)], [str(w.message) for w in caught]


def test_a_failed_rewrite_is_a_plan_error_that_keeps_the_node(zoo_program):
    """A failure inside a step's rewrite becomes a PlanError naming the step and the model, with the node
    and module path as attributes (the full original message stays on the chained error)."""
    from graphred.analysis.provenance import Provenance
    from graphred.passes.infra import AnalysisManager
    from graphred.passes.pipeline import copy_graph_module
    from graphred.passes.rewrite_state import StepPass
    from graphred.passes.token_axis import ReductionError

    prog = zoo_program("llava")
    gm = copy_graph_module(prog.graph_module)
    node = next(n for n in gm.graph.nodes if n.op == "call_function")

    class Broken(StepPass):
        def apply(self, gm, rs):
            raise ReductionError("first line\nsecond line", pass_name="broken", node=node.name,
                                 module_path="model.layers.0")

    am = AnalysisManager()
    am.get(Provenance(prog.example_inputs()), gm)
    am.get(Rewrite("TheModel"), gm)
    step = fastv(layer=1, keep=0.5).steps[0]
    with pytest.raises(PlanError, match=r"fastv:layer=1,keep=0.5: the rewrite of TheModel failed: "
                                        r"ReductionError: first line\. Try other") as ei:
        PassManager([Broken(step)], analyses=am)(gm)
    assert ei.value.node == node.name and ei.value.module_path == "model.layers.0"
    assert "second line" in str(ei.value.__cause__)
