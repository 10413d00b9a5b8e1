"""Plans on a program captured on the meta device: without value_inputs the error says what is missing
(not a symptom such as "not causal"); with CPU values of the same shapes the plan estimates as on the CPU."""
import warnings

import pytest
import torch

import graphred
from graphred.analysis.evaluate import meta_inputs


@pytest.fixture(scope="module")
def meta_llava(tmp_path_factory):
    model, inputs = graphred.zoo.load("llava")
    d = tmp_path_factory.mktemp("llava-config")
    model.config.save_pretrained(d)
    meta_model, meta_kwargs = graphred.zoo.from_config_dir(d, device="meta")
    cpu_model, cpu_kwargs = graphred.zoo.from_config_dir(d, device="cpu")  # same seed: same inputs, on the CPU
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return graphred.capture(meta_model, **meta_kwargs), cpu_model, cpu_kwargs


@pytest.mark.parametrize("spec", ["fastv:layer=1,keep=0.5", "pumer:prune=0.3,merge=0.2"])
def test_meta_program_without_values_says_what_is_missing(meta_llava, spec):
    prog, _, _ = meta_llava
    names = meta_inputs(*prog.example_inputs())
    assert "input_ids" in names
    plan = graphred.plans.parse_plan(spec)
    for call in (lambda: graphred.estimate(prog, plan), lambda: graphred.transform(prog, plan)):
        with pytest.raises(graphred.PlanError) as e:
            call()
        msg = str(e.value)
        assert "meta device" in msg and "input_ids" in msg and "value_inputs" in msg, msg
        assert msg.index("meta device") < msg.find("not causal") if "not causal" in msg else True


def test_meta_program_with_values_estimates_like_the_cpu_program(meta_llava):
    prog, cpu_model, inputs = meta_llava
    kw = {k: v for k, v in inputs.items() if isinstance(v, torch.Tensor)}
    shapes = {k: tuple(v.shape) for k, v in prog.example_inputs()[1].items() if isinstance(v, torch.Tensor)}
    assert shapes == {k: tuple(v.shape) for k, v in kw.items()}
    plan = graphred.plans.pumer(prune=0.3, merge=0.2, layers="all")
    got = graphred.estimate(prog, plan, value_inputs=((), kw))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = graphred.estimate(graphred.capture(cpu_model, **inputs), plan)
    assert got.after.flops == ref.after.flops and got.after.flops < got.flops
