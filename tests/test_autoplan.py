"""graphred.plans.auto: plans chosen for a budget, the output-divergence proxy, the CLI, bad input."""
from __future__ import annotations

import pytest
import torch

import graphred
from graphred.autoplan import AutoPlan, output_divergence
from graphred.plans import parse_plan


def test_auto_meets_the_speedup_and_ranks_by_the_proxy(zoo_model, zoo_program):
    _, kwargs = zoo_model("llava")
    prog = zoo_program("llava")
    plan = graphred.plans.auto(prog, speedup=1.3, methods=("fastv", "pumer"), calibration=[kwargs])
    assert isinstance(plan, AutoPlan) and not plan.is_identity
    est = graphred.estimate(prog, plan)  # the budget holds for the plan itself, not only the table
    assert est.speedup >= 1.3
    choice = plan.choice
    assert choice.ranked_by == "proxy" and choice.chosen.feasible
    feasible = [c for c in choice.candidates if c.feasible]
    assert len(feasible) >= 2 and all(c.proxy is not None and c.proxy >= 0 for c in feasible)
    assert choice.chosen.proxy == min(c.proxy for c in feasible)
    # the proxy of the chosen plan is what the transformed model shows on the calibration batch
    fast = graphred.transform(prog, plan)
    with torch.no_grad():
        out, kept = fast.forward_with_positions(**kwargs)
        ref = prog(**kwargs)
    assert output_divergence(ref, out, kept_positions=kept, attention_mask=kwargs["attention_mask"]) == pytest.approx(
        choice.chosen.proxy, rel=1e-6)
    # each candidate is the mildest of its kind within budget: 0.01 milder misses (or is the unreduced model)
    fastv_c = next(c for c in feasible if c.method == "fastv")
    (step,) = fastv_c.plan.steps
    milder = graphred.plans.fastv(layer=step.layer, keep=round(step.keep + 0.02, 2))
    assert graphred.estimate(prog, milder).speedup < 1.3
    text = plan.explain()
    assert "ranked by proxy" in text and str(plan) in text and "chosen:" in text
    assert parse_plan(str(plan)).steps == plan.steps  # str() is the text form, ready for --plan


def test_auto_without_calibration_says_the_cost_model_ranks_alone(zoo_program):
    plan = graphred.plans.auto(zoo_program("llava"), speedup=1.3, methods=("fastv",))
    assert plan.choice.ranked_by == "cost model"
    assert all(c.proxy is None for c in plan.choice.candidates)
    assert "cost model alone" in plan.explain() and "proxy was not measured" in plan.explain()


def test_auto_kv_cache_ceiling(zoo_program):
    prog = zoo_program("llava")
    base = graphred.estimate(prog)
    ceiling = int(0.8 * base.kv_cache_bytes)
    plan = graphred.plans.auto(prog, kv_cache=ceiling, methods=("fastv",))
    assert graphred.estimate(prog, plan).after.kv_cache_bytes <= ceiling


def test_impossible_budget_states_the_maximum(zoo_program):
    with pytest.raises(graphred.PlanError, match=r"out of reach.*gives \d+\.\d\dx predicted"):
        graphred.plans.auto(zoo_program("llava"), speedup=100)


@pytest.mark.parametrize("kwargs,match", [
    ({}, "needs a budget"),
    ({"speedup": 0.5}, "must be above 1"),
    ({"speedup": 1.2, "methods": ("fastv", "magic")}, "unknown method"),
])
def test_bad_budgets_are_clear_errors(zoo_program, kwargs, match):
    with pytest.raises(graphred.PlanError, match=match):
        graphred.plans.auto(zoo_program("llava"), **kwargs)


def test_auto_needs_a_program(zoo_model):
    model, _ = zoo_model("llava")
    with pytest.raises(graphred.PlanError, match="capture first"):
        graphred.plans.auto(model, speedup=1.2)


def test_output_divergence_kl_and_cosine():
    torch.manual_seed(0)
    a = torch.randn(3, 7)
    assert output_divergence(a, a) == 0.0
    b = a + torch.randn(3, 7)
    kl = torch.nn.functional.kl_div(b.log_softmax(-1), a.log_softmax(-1), log_target=True, reduction="none").sum(-1)
    assert output_divergence(a, b) == pytest.approx(float(kl.mean()), rel=1e-6)
    # [B, L, V] logits: the last valid position (left padding: the end; right padding: before it)
    ref = torch.randn(2, 5, 4)
    red = ref[:, [0, 2, 4]].clone()  # kept positions 0, 2, 4
    kept = torch.tensor([[0, 2, 4], [0, 2, 4]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])  # sample 1: last valid position 2
    assert output_divergence(ref, red, kept_positions=kept, attention_mask=mask) == 0.0
    red[1, 1, 0] += 1.0  # the distribution at sample 1's last valid position moves
    assert output_divergence(ref, red, kept_positions=kept, attention_mask=mask) > 0
    # embeddings: 1 - cosine
    e = {"image_embeds": torch.randn(2, 8)}
    assert output_divergence(e, {"image_embeds": 2 * e["image_embeds"]}) == pytest.approx(0.0, abs=1e-6)
    assert output_divergence(e, {"image_embeds": -e["image_embeds"]}) == pytest.approx(2.0)
    with pytest.raises(graphred.PlanError, match="neither logits nor pooled embeddings"):
        output_divergence({"x": a}, {"x": a})


def test_cli_plan_prints_a_plan_ready_for_estimate(capsys):
    from graphred.cli import main

    assert main(["plan", "llava", "--speedup", "1.2", "--methods", "fastv", "--calibration", "1"]) == 0
    captured = capsys.readouterr()
    spec = captured.out.strip()
    assert parse_plan(spec).steps and "graphred.plans.auto" in captured.err
    assert main(["estimate", "llava", "--plan", spec]) == 0  # the printed text is a plan the CLI takes
    assert main(["plan", "llava", "--speedup", "100"]) == 2
    assert "out of reach" in capsys.readouterr().err
