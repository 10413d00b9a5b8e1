"""Uneven batches: samples with different numbers of image tokens (multi-image prompts, per-image sizes).

Each sample keeps its own share (FastV: ``round(keep * n_b)`` of its ``n_b`` image tokens; PuMer's prune:
``n_b - round(p * n_b)``); the batch keeps the largest kept length, and a sample that keeps fewer holds
filler slots that no attention sees (``-1`` in the kept positions). The strongest check: each sample run
alone through the eager model (a private copy), cut at the same layer to the same kept tokens by forward
hooks, gives the same logits as that sample's row of the reduced batch."""
from __future__ import annotations

import copy

import pytest
import torch

import graphred
from graphred import zoo
from graphred.analysis.cost import count_flops_executed
from graphred.plans import fastv, pumer

UNEVEN = ["gemma3", "mistral3", "aya-vision", "internvl"]


def _sample(name: str, kwargs: dict, b: int) -> dict:
    """Sample ``b`` of a zoo batch, alone (its own images; the test knows how the zoo lays them out)."""
    per = zoo.info(name)["image_per_sample"]
    out = {}
    for k, v in kwargs.items():
        if not isinstance(v, torch.Tensor):
            out[k] = v
        elif k == "pixel_values" and v.shape[0] != kwargs["input_ids"].shape[0]:  # images of all samples, in order
            counts = [len([n for n in per[:i]]) for i in range(len(per))]
            imgs = zoo._images_per_sample(len(per))
            start = sum(imgs[:b])
            out[k] = v[start:start + imgs[b]]
        else:
            out[k] = v[b:b + 1]
    return out


def _cut_hooks(layers, first: int, kept: torch.Tensor, length: int):
    """Forward pre-hooks on ``layers[first:]``: every tensor argument with a dim of the full ``length`` (hidden
    states, masks on both axes, rotary tables, position ids) is gathered to ``kept``."""

    def take(t):
        if not isinstance(t, torch.Tensor):
            if isinstance(t, (tuple, list)):
                return type(t)(take(x) for x in t)
            if isinstance(t, dict):
                return {k: take(v) for k, v in t.items()}
            return t
        dims = [1] if t.dim() == 3 else [d for d in range(t.dim()) if (d >= 1 or t.dim() == 1)]
        for d in dims:
            if t.shape[d] == length:
                t = t.index_select(d, kept)
        return t

    def hook(mod, args, kwargs):
        return take(args), take(kwargs)

    return [layer.register_forward_pre_hook(hook, with_kwargs=True) for layer in layers[first:]]


def _decoder_layers(model):
    return model.model.language_model.layers


def _eager_alone(model, kwargs: dict, layer: int, kept: torch.Tensor) -> torch.Tensor:
    """Logits of one sample, the decoder cut to ``kept`` at the input of ``layer`` (an eager private copy)."""
    m = copy.deepcopy(model).eval()
    m.set_attn_implementation("eager")
    hooks = _cut_hooks(_decoder_layers(m), layer, kept, kwargs["input_ids"].shape[1])
    try:
        with torch.no_grad():
            return m(**kwargs).logits
    finally:
        for h in hooks:
            h.remove()


def _last_query_scores(model, kwargs: dict, layer: int) -> torch.Tensor:
    """Head-mean attention of the last position at decoder layer ``layer`` (eager, one sample)."""
    m = copy.deepcopy(model).eval()
    m.set_attn_implementation("eager")
    with torch.no_grad():
        out = m(**kwargs, output_attentions=True)
    return out.attentions[layer][0, :, -1, :].mean(0)


def _check_against_alone(name, model, kwargs, reduced, layer, want_per_sample):
    with torch.no_grad():
        out = reduced(**kwargs)
    kp = reduced.kept_positions
    image_id = model.config.image_token_id
    assert (kp == -1).any(), "an uneven batch pads the sample that keeps fewer tokens with filler slots"
    for b in range(kwargs["input_ids"].shape[0]):
        row = kp[b]
        real = row[row >= 0]
        assert torch.all(real[1:] > real[:-1])
        ids = kwargs["input_ids"][b]
        assert int((ids[real] == image_id).sum()) == want_per_sample[b], (b, want_per_sample)
        assert set(torch.nonzero(ids != image_id).flatten().tolist()) <= set(real.tolist()), "text was dropped"
        alone = _sample(name, kwargs, b)
        ref = _eager_alone(model, alone, layer, real)[0]
        got = out.logits[b][row >= 0]
        valid = kwargs["attention_mask"][b][real].bool()
        torch.testing.assert_close(got[valid], ref[valid], atol=2e-4, rtol=2e-4)
    return kp


@pytest.mark.parametrize("name", ["internvl", "gemma3"])
def test_fastv_per_sample_matches_each_sample_alone(name, zoo_model, zoo_program):
    model, kwargs = zoo_model(name)
    per = zoo.info(name)["image_per_sample"]
    assert len(set(per)) > 1
    reduced = graphred.transform(zoo_program(name), fastv(layer=1, keep=0.5))
    kp = _check_against_alone(name, model, kwargs, reduced, 1, [round(0.5 * n) for n in per])
    # the selection is FastV's, per sample: the top image tokens by the last query's attention at layer 0
    image_id = model.config.image_token_id
    for b in range(len(per)):
        alone = _sample(name, kwargs, b)
        scores = _last_query_scores(model, alone, 0)
        img = torch.nonzero(alone["input_ids"][0] == image_id).flatten()
        top = img[torch.topk(scores[img], round(0.5 * len(img))).indices]
        real = kp[b][kp[b] >= 0]
        assert set(top.tolist()) == set(real.tolist()) & set(img.tolist()), b


def test_pumer_prune_per_sample_matches_each_sample_alone(zoo_model, zoo_program):
    model, kwargs = zoo_model("aya-vision")
    per = zoo.info("aya-vision")["image_per_sample"]
    reduced = graphred.transform(zoo_program("aya-vision"), pumer(prune=0.5, merge=0, layers=0))
    # pruning after layer 0's attention residual equals cutting at layer 1's input (the MLP is per token)
    _check_against_alone("aya-vision", model, kwargs, reduced, 1, [n - round(0.5 * n) for n in per])
    (step,) = reduced.steps
    assert step["image_before"] == per and step["image_after"] == [n - round(0.5 * n) for n in per]


@pytest.mark.parametrize("name", UNEVEN)
def test_reducing_plan_drops_estimated_and_measured_flops(name, zoo_model, zoo_program):
    model, kwargs = zoo_model(name)
    prog = zoo_program(name)
    plan = pumer(prune=0.3, merge=0.2)
    est = graphred.estimate(prog, plan)
    reduced = graphred.transform(prog, plan)
    before = count_flops_executed(model, **kwargs)
    after = count_flops_executed(reduced, **kwargs)
    assert est.after.flops < est.flops and after < before, (est.flops, est.after.flops, before, after)
    # the estimate counts what runs: the reduced graph's matrix products, filler slots included
    assert est.after.flops_matmul == after, (est.after.flops_matmul, after)
    # and its expression, at the symbols' values, gives the same number
    assert int(est.after.flops_matmul_expr.subs(est.after.symbols)) == est.after.flops_matmul
    with torch.no_grad():
        out = reduced(**kwargs)
    assert torch.isfinite(out.logits).all()
    per = zoo.info(name)["image_per_sample"]
    prune = next(s for s in reduced.steps if s["op"] == "prune")
    assert prune["image_after"] == [n - round(0.3 * n) for n in per]


def test_merge_text_refused_on_uneven_batch(zoo_program):
    with pytest.raises(graphred.PlanError, match="not defined for a causal decoder|same number"):
        graphred.transform(zoo_program("internvl"), pumer(prune=0.3, merge=0.2, merge_text=0.2))


def test_prefix_lm_fastv_paligemma(zoo_model, zoo_program):
    """Class 5: PaliGemma's prefix-LM mask (image and prompt bidirectional) is not causal, but the prompt ends
    in a text token whose attention FastV scores with; the cut model matches the eager one cut by hand."""
    model, kwargs = zoo_model("paligemma")
    prog = zoo_program("paligemma")
    assert not any(b.causal for b in graphred.analyze(prog).cross_modal)
    reduced = graphred.transform(prog, fastv(layer=1, keep=0.5))
    with torch.no_grad():
        out = reduced(**kwargs)
    kp = reduced.kept_positions
    n_img = zoo.info("paligemma")["image"]
    image_id = model.config.image_token_id
    for b in range(kp.shape[0]):
        alone = {k: (v[b:b + 1] if isinstance(v, torch.Tensor) else v) for k, v in kwargs.items()}
        scores = _last_query_scores(model, alone, 0)
        img = torch.nonzero(alone["input_ids"][0] == image_id).flatten()
        top = img[torch.topk(scores[img], round(0.5 * n_img)).indices]
        assert set(top.tolist()) == set(kp[b].tolist()) & set(img.tolist())
        ref = _eager_alone(model, alone, 1, kp[b])[0]
        valid = kwargs["attention_mask"][b][kp[b]].bool()
        torch.testing.assert_close(out.logits[b][valid], ref[valid], atol=2e-4, rtol=2e-4)


def test_generate_refuses_filler_slots(zoo_capture):
    model, kwargs, _, prog = zoo_capture("aya-vision")
    fast = graphred.transform(prog, fastv(layer=1, keep=0.5))
    inputs = {k: v for k, v in kwargs.items() if k != "use_cache"}
    with pytest.raises(graphred.GraphredError, match="filler slots"):
        fast.generate(**inputs, max_new_tokens=2, do_sample=False)
