"""generate(): reduced prefill, per-layer reduced KV caches, Hugging Face generation semantics."""
import functools
import pytest
import torch
from transformers import GenerationConfig

import graphred
from graphred import zoo
from graphred.plans import Plan, fastv, pumer

DECODERS = [n for n in zoo.TEST_NAMES if zoo.info(n)["padding"] == "left"]
# and internvl of the issue-13 families: its vision tower's ModelOutput reaches the re-captured graph with its keys
# in another order than the spec recorded (serving aligns it). mistral3, which passes too, is left out: its
# draft-export capture takes about 17 s
GENERATE_DECODERS = DECODERS + ["internvl"]
PLANS = {"fastv": fastv(layer=1, keep=0.5), "pumer": pumer(prune=0.3, merge=0.2, layers=0)}


def _prompt(name, model, batch=3, seed=0):
    inputs = zoo.inputs(name, batch=batch, seed=seed, model=model)
    inputs.pop("use_cache", None)
    return inputs


@functools.lru_cache(maxsize=None)
def _build(name):
    model, kwargs = zoo.load(name)  # our own: generate runs it, and a run leaves Hugging Face's hooks on it
    return model, graphred.capture(model, **kwargs)


def _program(_fixture, name):
    return _build(name)


def test_decoders_are_found():
    assert set(DECODERS) >= {"llava", "paligemma", "idefics3", "qwen2-vl"}


@pytest.mark.parametrize("name", GENERATE_DECODERS)
def test_greedy_generate_equals_model_generate_with_left_padding(zoo_capture, name):
    model, prog = _program(zoo_capture, name)
    fast = graphred.transform(prog, Plan(()))
    inputs = _prompt(name, model)
    assert int((inputs["attention_mask"] == 0).sum()) > 0  # the last sample is left-padded
    with torch.no_grad():
        ref = model.generate(**inputs, max_new_tokens=8, do_sample=False)
        out = fast.generate(**inputs, max_new_tokens=8, do_sample=False)
    assert out.shape == ref.shape and torch.equal(out, ref)


def test_sampling_eos_and_generation_config_follow_hugging_face(zoo_capture, model_state):
    model, prog = _program(zoo_capture, "llava")
    fast = graphred.transform(prog, Plan(()))
    inputs = _prompt("llava", model)
    before = model_state.snapshot(model)
    with torch.no_grad():
        greedy = model.generate(**inputs, max_new_tokens=6, do_sample=False)
        eos = int(greedy[0, -4])  # a token sample 0 produces mid-way
        config = GenerationConfig(max_new_tokens=6, do_sample=True, top_k=20, temperature=0.7, eos_token_id=eos,
                                  pad_token_id=0)
        torch.manual_seed(3)
        ref = model.generate(**inputs, generation_config=config)
        torch.manual_seed(3)
        out = fast.generate(**inputs, generation_config=config)
        ref_eos = model.generate(**inputs, max_new_tokens=6, do_sample=False, eos_token_id=eos, pad_token_id=0)
        out_eos = graphred.generate(fast, **inputs, max_new_tokens=6, do_sample=False, eos_token_id=eos, pad_token_id=0)
    assert torch.equal(out, ref)
    assert torch.equal(out_eos, ref_eos) and (out_eos[0, -3:] == 0).all()  # stopped at eos, then padded
    model_state.assert_unchanged(model, before)


@pytest.mark.parametrize("plan_name", sorted(PLANS))
def test_prefill_cache_lengths_are_the_estimates_kept_counts(zoo_capture, plan_name):
    model, prog = _program(zoo_capture, "llava")
    plan = PLANS[plan_name]
    fast = graphred.transform(prog, plan)
    inputs = _prompt("llava", model, batch=2)
    est = graphred.estimate(prog, plan)
    with torch.no_grad():
        out = fast.generate(**inputs, max_new_tokens=1, do_sample=False, return_dict_in_generate=True)
    lengths = [layer.keys.shape[2] for layer in out.cache.layers]
    predicted = [info["k_shape"][2] for info in est.after.kv_cache.layers]
    assert lengths == predicted
    assert lengths[0] == inputs["input_ids"].shape[1] and lengths[1] < lengths[0]  # layer 1 caches kept tokens only
    assert [layer.values.shape[2] for layer in out.cache.layers] == predicted


@pytest.mark.parametrize("plan_name", sorted(PLANS))
def test_eight_decode_steps_match_a_hand_written_loop_over_the_reduced_cache(zoo_capture, plan_name):
    model, prog = _program(zoo_capture, "llava")
    fast = graphred.transform(prog, PLANS[plan_name])
    inputs = _prompt("llava", model, batch=3)
    inputs = {k: v[:2] for k, v in inputs.items()}  # the two unpadded samples
    assert bool((inputs["attention_mask"] == 1).all())
    L = inputs["input_ids"].shape[1]
    with torch.no_grad():
        out = fast.generate(**inputs, max_new_tokens=9, do_sample=False, return_dict_in_generate=True,
                            output_logits=True)
        # by hand: the reduced prefill, then 8 steps of the model over that cache
        pre = fast(**inputs, use_cache=True, logits_to_keep=1)
        cache = pre.cache
        prefill_lengths = [layer.keys.shape[2] for layer in cache.layers]
        logits = [pre.logits[:, -1]]
        tokens = [pre.logits[:, -1].argmax(-1)]
        for i in range(8):
            step = model(input_ids=tokens[-1][:, None], cache=cache, use_cache=True,
                         position_ids=torch.full((2, 1), L + i, dtype=torch.long))
            cache = step.cache
            logits.append(step.logits[:, -1])
            tokens.append(step.logits[:, -1].argmax(-1))
    assert torch.equal(out.sequences[:, L:], torch.stack(tokens, dim=1))
    for a, b in zip(out.logits, logits):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert [layer.keys.shape[2] for layer in out.cache.layers] == [n + 8 for n in prefill_lengths]
    assert len(set(prefill_lengths)) == 2  # the layers really hold caches of different lengths


@pytest.mark.parametrize("plan_name", sorted(PLANS))
def test_left_padded_batch_decodes_like_each_sample_alone(zoo_capture, plan_name):
    model, prog = _program(zoo_capture, "llava")
    fast = graphred.transform(prog, PLANS[plan_name])
    inputs = _prompt("llava", model, batch=3)
    pad = int((inputs["attention_mask"][-1] == 0).sum())
    assert pad > 0
    with torch.no_grad():
        batched = fast.generate(**inputs, max_new_tokens=6, do_sample=False, return_dict_in_generate=True,
                                output_logits=True)
        alone = {k: v[-1:, pad:] if v.dim() == 2 else v[-1:] for k, v in inputs.items()}
        single = fast.generate(**alone, max_new_tokens=6, do_sample=False, return_dict_in_generate=True,
                               output_logits=True)
    for a, b in zip(batched.logits, single.logits):
        torch.testing.assert_close(a[-1:], b, rtol=1e-4, atol=1e-4)
    assert torch.equal(batched.sequences[-1, -6:], single.sequences[0, -6:])


def test_generate_refuses_what_it_cannot_do(zoo_capture):
    model, prog = _program(zoo_capture, "llava")
    inputs = _prompt("llava", model)
    with pytest.raises(graphred.GraphredError, match="renumber"):
        graphred.transform(prog, fastv(layer=1, keep=0.5, renumber=True)).generate(**inputs, max_new_tokens=2)
    fast = graphred.transform(prog, fastv(layer=1, keep=0.5))
    with pytest.raises(graphred.GraphredError, match="num_beams"):
        fast.generate(**inputs, max_new_tokens=2, num_beams=2)
    right = dict(inputs, attention_mask=inputs["attention_mask"].flip(-1))
    with pytest.raises(graphred.GraphredError, match="left padding"):
        fast.generate(**right, max_new_tokens=2)
    _, vilt_kwargs, _, vilt_prog = zoo_capture("vilt")
    with pytest.raises(graphred.GraphredError, match="generate"):
        graphred.transform(vilt_prog, Plan(())).generate(**vilt_kwargs)


def test_readme_using_it_block_runs():
    """README's "Using it" example (capture, estimate, transform, per-call positions, generate) runs as written."""
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = text.split("## Using it", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    assert "generate(" in code
    scope: dict = {}
    with torch.no_grad():
        exec(compile(code, "README.md", "exec"), scope)  # noqa: S102 - the documented example itself
    assert scope["tokens"].shape[1] == scope["inputs"]["input_ids"].shape[1] + 16
    assert scope["kept"].shape[1] == scope["out"].logits.shape[1]
