"""A plan that saves nothing is flagged with a graphred warning; PuMer's default layers on a cross-attention
model (BLIP) are ones that save."""
import warnings

import pytest

import graphred
from graphred.cli import main
from graphred.errors import GraphredWarning, PlanSavesNothingWarning


def test_pumer_at_blips_last_cross_attention_layer_warns(zoo_program):
    prog = zoo_program("blip")
    with pytest.warns(PlanSavesNothingWarning, match=r"pumer:prune=0.3,merge=0.2,layers=1: estimated .* after against"):
        est = graphred.estimate(prog, graphred.plans.pumer(prune=0.3, merge=0.2, layers=1))
    assert est.after.flops >= est.flops  # the warning is about a real non-saving
    assert issubclass(PlanSavesNothingWarning, GraphredWarning) and issubclass(GraphredWarning, UserWarning)


def test_pumer_default_layers_on_blip_save_and_do_not_warn(zoo_program):
    prog = zoo_program("blip")
    with warnings.catch_warnings():
        warnings.simplefilter("error", GraphredWarning)
        est = graphred.estimate(prog, graphred.plans.pumer(prune=0.3, merge=0.2))
    assert est.after.flops < est.flops and est.after.flops_matmul < est.flops_matmul
    blocks = {s["block"] for s in est.after.applied.steps}
    assert blocks == {"text_encoder.encoder.layer.0.crossattention.self"}, blocks  # not the last layer
    # the plan's own ops (PuMer: text-to-image attention scoring, selection, gathers, merges) are priced
    # apart: none before, some after, more than a text-agnostic pruning at the same place (no scoring)
    rnd = graphred.estimate(prog, graphred.plans.prune(ratio=0.3, scorer="random", layers=0))
    assert est.added_flops == 0 and rnd.added_flops == 0
    assert 0 <= rnd.after.added_flops < est.after.added_flops < est.after.flops


def test_cli_prints_the_warning_as_one_line(capsys):
    assert main(["estimate", "blip", "--plan", "pumer:prune=0.3,merge=0.2,layers=1"]) == 0
    err = capsys.readouterr().err
    assert "graphred: warning: pumer:prune=0.3,merge=0.2,layers=1: estimated" in err
