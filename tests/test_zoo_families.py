"""The zoo families of issue 13 (zoo.FAMILY_NAMES): each gets the expectations the core zoo has.

* blocks: the decoder layers hold image and text (per sample, the padded one included), the vision side is
  image-only, and a resampler's cross-attention (learned queries reading the image) is cross-modal;
* zero reduction is the identity, bit for bit;
* a reducing plan runs, and both the estimate and FLOPs measured with FlopCounterMode on the reduced module drop;
* the estimate of the unreduced model equals FlopCounterMode on the eager model.

Which class of issue 13 each family exercises: fuyu (2: raw patches through a Linear), blip-2 and kosmos-2
(3: Q-Former / latent queries; blip-2's OPT decoder also 4: learned positions, folded feed-forward),
lfm2-vl (4: convolution layers before and between the attention layers; 2: a Linear patch embedding),
qwen3-vl (6: captured without precomputed position ids; its deepstack writes into the decoder stream),
mllama (4: tiles folded into the batch, gated cross-attention layers interleaved with self-attention).
"""
from __future__ import annotations

import copy
import warnings

import pytest
import torch

import graphred
from graphred import zoo
from graphred.analysis.blocks import CROSS_ATTENTION, CROSS_MODAL_SELF, UNIMODAL_SELF
from graphred.analysis.cost import count_flops_executed
from graphred.analysis.cost.oracle import peak_activations_executed
from graphred.errors import GraphredWarning, PlanSavesNothingWarning
from graphred.fx_utils import MADE_BY, module_path, recorded
from graphred.passes import unfold as unfold_pass
from graphred.plans import pumer

from output_leaves import tensor_leaves

NAMES = zoo.FAMILY_NAMES
UNEVEN = {"gemma3", "mistral3", "aya-vision", "internvl"}  # samples hold different image counts (tests/passes/test_uneven.py)
BIDIRECTIONAL_IMAGES = {"gemma3"}  # image tokens attend to each other both ways
# PuMer at its default layers (the cross-modal decoder layers after the first); mllama's reducing plan is tested
# below (structure and numerics against the eager model cut by hand)
PLANS = {n: pumer(prune=0.3, merge=0.2) for n in NAMES if n != "mllama"}


def _image_positions(model, kwargs) -> list[int]:
    """Image positions per sample, read from the inputs (the test may know the model)."""
    if "image_embeds_position_mask" in kwargs:  # kosmos-2 marks them with a mask
        return [int(n) for n in kwargs["image_embeds_position_mask"].sum(1)]
    return [int(n) for n in (kwargs["input_ids"] == model.config.image_token_id).sum(1)]


def test_family_names_are_zoo_models_outside_the_core_fixtures():
    assert len(NAMES) >= 4 and set(NAMES) <= set(zoo.names())
    assert not set(NAMES) & set(zoo.TEST_NAMES)


def test_blocks_tiled_cross_attention_decoder(zoo_model, zoo_program):
    """mllama (class 4): tiles run through the tower as batch rows and come back as one image sequence per
    sample; the decoder's gated cross-attention layers read it, its self-attention layers hold text only."""
    model, kwargs = zoo_model("mllama")
    report = graphred.analyze(zoo_program("mllama"))
    L = kwargs["input_ids"].shape[1]
    n_img = zoo.info("mllama")["image"]
    by = {b.module_path: b for b in report.blocks}
    for n in (0, 2):
        b = by[f"model.language_model.layers.{n}.self_attn"]
        assert b.kind == UNIMODAL_SELF and b.query_modalities == {"text"} and b.causal
    cross = [by[f"model.language_model.layers.{n}.cross_attn"] for n in (1, 3)]
    for b in cross:
        assert (b.kind, b.query_modalities, b.key_modalities) == (CROSS_ATTENTION, {"text"}, {"image"})
        assert b.tokens == {"text": L, "image": n_img} and b.key_stream is not None
    assert report.cross_modal == cross
    vision = [b for b in report.blocks if b.module_path.startswith("model.vision_model")]
    assert len(vision) == 3 and all(b.kind == UNIMODAL_SELF and "image" in b.query_modalities for b in vision)
    assert all(b.tokens["image"] == n_img for b in vision)  # both tiles in one sequence (+ tile padding)


@pytest.mark.parametrize("name", [n for n in NAMES if n != "mllama"])
def test_blocks(name, zoo_model, zoo_program):
    model, kwargs = zoo_model(name)
    report = graphred.analyze(zoo_program(name))
    n_img = _image_positions(model, kwargs)
    if name in UNEVEN:  # one image then two, or per-image sizes: the samples differ
        assert n_img[0] != n_img[1], n_img
    else:
        assert n_img == [zoo.info(name)["image"]] * 2
    L = kwargs["input_ids"].shape[1]
    decoder = [b for b in report.blocks if b.kind == CROSS_MODAL_SELF]
    assert decoder, str(report)
    for b in decoder:
        assert b.query_modalities == b.key_modalities == {"image", "text"}
        assert [t["image"] for t in b.tokens_per_sample] == n_img
        assert [t["text"] for t in b.tokens_per_sample] == [L - n for n in n_img]
        assert b.causal == (name not in BIDIRECTIONAL_IMAGES), b
    others = [b for b in report.blocks if b not in decoder]
    assert all("text" not in b.query_modalities for b in others), str(report)
    resampler = [b for b in report.blocks if b.kind == CROSS_ATTENTION]
    if name in ("blip-2", "kosmos-2"):  # learned queries reading the patches: every resampler layer
        assert len(resampler) == {"blip-2": 2, "kosmos-2": 1}[name], str(report)
        assert all(b.key_modalities == {"image"} for b in resampler)
        # the first reads with learned queries; the queries leave it as image tokens
        assert resampler[0].query_modalities == {"register"}
        assert all(b.query_modalities == {"image"} for b in resampler[1:])
        assert report.cross_modal == [b for b in report.blocks if b.kind != UNIMODAL_SELF]
    else:
        assert not resampler


@pytest.mark.parametrize("name", NAMES)
def test_zero_reduction_is_identity(name, zoo_model, zoo_program):
    model, kwargs = zoo_model(name)
    reduced = graphred.transform(zoo_program(name), pumer(prune=0, merge=0))
    with torch.no_grad():
        want, got = model(**kwargs), reduced(**kwargs)
    assert reduced.steps == []
    w, g = dict(tensor_leaves(want)), dict(tensor_leaves(got))
    assert w.keys() == g.keys() and w
    for k in w:
        assert torch.equal(w[k], g[k]), f"{name}: {k} differs"


def test_mllama_reduction_reaches_the_later_cross_attention_layer(zoo_model, zoo_program):
    """mllama (class 4): each gated cross-attention layer projects its keys and values from the image states
    with the tiles folded into the batch ([B*tiles, patches, C]). The rewrite views them once with the tiles'
    tokens on one dim (UnfoldKeySourcesPass) and prunes that view after the scoring layer, so the later
    cross-attention layer projects only the kept tokens, its cross-attention mask cut alike. Estimated and
    measured FLOPs drop and agree; the logits equal the eager model's with the later layer given the same kept
    image tokens by hand."""
    model, kwargs = zoo_model("mllama")
    prog = zoo_program("mllama")
    plan = pumer(prune=0.7, merge=0.0)
    reduced = graphred.transform(prog, plan)
    with torch.no_grad():
        got = reduced(**kwargs).logits
    n_img, B = zoo.info("mllama")["image"], kwargs["input_ids"].shape[0]
    k = n_img - round(0.7 * n_img)
    assert [(s["block"], s["image_before"], s["image_after"]) for s in reduced.steps] == [
        ("model.language_model.layers.1.cross_attn", n_img, k)]
    # structure: one unfolded view of the image states, one gather of it after the scoring layer
    gm = reduced.graph_module
    gather = torch.ops.graphred.gather_tokens.default
    [unfolded] = [n for n in gm.graph.nodes if recorded(n, MADE_BY) == "UnfoldKeySourcesPass"]
    assert tuple(unfolded.meta["val"].shape[:2]) == (B, n_img)
    [cut] = [u for u in unfolded.users if u.target is gather]
    assert tuple(cut.meta["val"].shape[:2]) == (B, k)

    def in_module(path, target):
        return [n for n in gm.graph.nodes if n.target is target and module_path(n) == path]

    for layer, source in ((1, unfolded), (3, cut)):  # the scoring layer reads every token, the later one the kept
        for proj in ("k_proj", "v_proj"):
            [lin] = in_module(f"model.language_model.layers.{layer}.cross_attn.{proj}", torch.ops.aten.linear.default)
            assert lin.args[0] is source, (layer, proj, lin.args[0])
    [sdpa] = in_module("model.language_model.layers.3.cross_attn", torch.ops.aten.scaled_dot_product_attention.default)
    mask = sdpa.args[3]  # the cross-attention mask, cut on its key axis with the same indices
    assert mask.target is gather and mask.args[1] is cut.args[1] and mask.meta["val"].shape[-1] == k
    assert tuple(sdpa.args[1].meta["val"].shape[-2:]) == (k, sdpa.args[1].meta["val"].shape[-1])
    # FLOPs: the estimate drops (no PlanSavesNothingWarning) and equals FlopCounterMode, which drops too
    with warnings.catch_warnings():
        warnings.simplefilter("error", PlanSavesNothingWarning)
        est = graphred.estimate(prog, plan)
    measured_before, measured_after = count_flops_executed(model, **kwargs), count_flops_executed(reduced, **kwargs)
    assert est.after.flops < est.flops and est.after.flops_matmul < est.flops_matmul
    # ... and its expression says so: the tiles' length (written in the tower's patch symbol) is solved for the cut
    assert not [n for n in est.after.notes if "subs_at" in n], est.after.notes
    assert int(est.after.flops_expr.subs(est.after.symbols)) == est.after.flops
    assert est.after.flops_matmul == measured_after < measured_before, (est.after.flops_matmul, measured_after,
                                                                        measured_before)
    # numerics: the eager model (a private copy) with layer 3 given the kept image tokens and mask columns
    kept = reduced.kept_positions
    assert kept.shape == (B, k)
    eager = copy.deepcopy(model).eval()

    def cut_by_hand(mod, args, kw):
        states, m = kw["cross_attention_states"], kw["cross_attention_mask"]
        states = states.reshape(B, -1, states.shape[-1])
        states = states.gather(1, kept[..., None].expand(-1, -1, states.shape[-1]))
        m = m.gather(-1, kept[:, None, None, :].expand(*m.shape[:-1], k))
        return args, dict(kw, cross_attention_states=states, cross_attention_mask=m)

    eager.model.language_model.layers[3].register_forward_pre_hook(cut_by_hand, with_kwargs=True)
    with torch.no_grad():
        want, uncut = eager(**kwargs).logits, model(**kwargs).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got, uncut, rtol=1e-5, atol=1e-5)  # the cut mattered


def test_mllama_without_the_unfolding_the_warning_names_the_obstacle(zoo_program, monkeypatch):
    """Where no unfolding view applies (here: the unfolding switched off), the cut stays in the scoring layer;
    the warning names the node where the tokens first hold a dim of their own, and the op reading the folded
    layout, with their module paths. That cut comes after the layer's only readers of its keys, so it would change
    nothing: a PlanError says so (no reduced module that computes what the model does)."""
    from graphred.errors import PlanError

    monkeypatch.setattr(unfold_pass, "folded_key_chains", lambda *a: [])
    layer = r"model\.language_model\.layers\.1\.cross_attn"
    with pytest.warns(GraphredWarning, match=rf"keys of {layer}: .* at \w+ \(module {layer}\), inside the layer; "
                      rf"\w+ \(module {layer}\.k_proj\) computes them from a layout where they are folded"):
        with pytest.raises(PlanError, match=rf"no op after the cut reads the reduced tokens .*module {layer}"):
            graphred.transform(zoo_program("mllama"), pumer(prune=0.7, merge=0.0))



def test_mllama_tome_finds_the_tiled_tower_and_names_the_split_of_its_tiles(zoo_program):
    """mllama's vision tower holds image tokens and the padding slots that round each tile up (register tokens):
    ToMe takes it as an image-only stack. It lays the tiles end to end in one sequence and later takes them apart
    again with a reshape, which a merge over the whole sequence cannot follow: the error names that obstacle, the
    node and its module path."""
    from graphred.errors import PlanError
    from graphred.plans import tome

    with pytest.raises(PlanError) as info:
        graphred.transform(zoo_program("mllama"), tome(r=4))
    msg = str(info.value)
    assert "no image-only attention stack" not in msg
    assert "tome at model.vision_model.transformer.layers.0.self_attn" in msg
    assert "the token axis is split here over dims 1..2" in msg and "(module model.vision_model)" in msg
    assert "call_function[target=torch.ops.aten.reshape" in msg


def test_lfm2_fastv_cuts_at_a_convolution_layer_and_refuses_one_with_no_attention_before(zoo_model, zoo_program):
    """lfm2-vl's decoder: convolution layers 0 and 2, attention layers 1 and 3. FastV at layer 2 scores with layer
    1's attention and cuts at the input of the convolution layer (found by its module path); FLOPs drop, estimated
    and measured alike. At layer 1 no attention comes before: the error says so."""
    from graphred.errors import PlanError
    from graphred.plans import fastv

    model, kwargs = zoo_model("lfm2-vl")
    prog = zoo_program("lfm2-vl")
    with pytest.raises(PlanError, match=r"layer=1 needs an attention layer of model\.language_model\.layers before "
                       r"it .* attention layers are \[1, 3\] .* Choose a layer after 1"):
        graphred.transform(prog, fastv(layer=1, keep=0.5))
    plan = fastv(layer=2, keep=0.5)
    reduced = graphred.transform(prog, plan)
    est = graphred.estimate(prog, plan)
    with torch.no_grad():
        out = reduced(**kwargs)
    L = kwargs["input_ids"].shape[1]
    n_img = min(_image_positions(model, kwargs))
    assert out.logits.shape[1] == L - (n_img - round(0.5 * n_img)) and torch.isfinite(out.logits).all()
    measured_after = count_flops_executed(reduced, **kwargs)
    assert est.after.flops_matmul == measured_after < count_flops_executed(model, **kwargs)


# the uneven families run the same plan, with per-sample checks, in tests/passes/test_uneven.py; mllama's reducing
# plan is checked above (its PLANS entry, with merging, runs bit-exact under keep_all in tests/passes/test_keep_all.py)
@pytest.mark.parametrize("name", [n for n in NAMES if n != "mllama" and n not in UNEVEN])
def test_reducing_plan_lowers_estimated_and_measured_flops(name, zoo_model, zoo_program):
    model, kwargs = zoo_model(name)
    prog = zoo_program(name)
    reduced = graphred.transform(prog, PLANS[name])
    with torch.no_grad():
        out = reduced(**kwargs)
    for k, t in tensor_leaves(out):
        if t.is_floating_point():
            assert torch.isfinite(t).all(), f"{name}: {k}"
    prunes = [s for s in reduced.steps if s["op"] == "prune"]
    assert prunes and all(s["image_after"] < s["image_before"] for s in prunes), reduced.steps
    est = graphred.estimate(prog, PLANS[name])
    assert est.after.flops < est.flops
    measured_before = count_flops_executed(model, **kwargs)
    measured_after = count_flops_executed(reduced, **kwargs)
    assert measured_after < measured_before, (measured_after, measured_before)
    assert est.after.flops_matmul == measured_after, (name, est.after.flops_matmul, measured_after)


@pytest.mark.parametrize("name", NAMES)
def test_estimate_equals_flop_counter(name, zoo_model, zoo_program):
    model, kwargs = zoo_model(name)
    prog = zoo_program(name)
    est = graphred.estimate(prog)
    assert est.flops_matmul == count_flops_executed(model, **kwargs) > 0
    assert not est.uncounted, est.uncounted
    # and the peak activation memory equals MemTracker's on the captured graph (qwen3-vl's folded constants,
    # viewed by dead reshapes, are weights: the oracle registers them as such)
    args, kw = prog.example_inputs()
    assert est.peak_activation_bytes == peak_activations_executed(prog.graph_module, *args, **kw), name
