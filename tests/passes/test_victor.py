"""Victor: registers inserted after the image, the image dropped at layer k, on every zoo decoder."""
from __future__ import annotations

import pytest
import torch

import graphred
from graphred import ops as gops
from graphred.analysis.provenance import CODE, IMAGE, REGISTER
from graphred.errors import PlanError
from graphred.plans import parse_plan, tome, victor

DECODERS = ["llava", "paligemma", "idefics3", "qwen2-vl"]


def test_plan_text_and_validation():
    assert str(victor(registers=8, layer=2)) == "victor:registers=8,layer=2"
    assert parse_plan("victor:registers=8,layer=2") == victor(registers=8, layer=2)
    assert str(tome(r=2) + victor(registers=4, layer=1, init="random")) == "tome:r=2 + victor:registers=4,layer=1,init=random"
    with pytest.raises(PlanError, match="registers must be an integer >= 1"):
        victor(registers=0)
    with pytest.raises(PlanError, match="layer must be an integer >= 1"):
        victor(layer=0)
    with pytest.raises(PlanError, match="init must be one of"):
        victor(init="zeros")
    with pytest.raises(ValueError, match="registers must be"):
        parse_plan("victor:registers=0,layer=1")


def test_layout_codes_match_the_analysis():
    assert (gops.registers.IMAGE_CODE, gops.registers.REGISTER_CODE) == (CODE[IMAGE], CODE[REGISTER])


def test_layout_two_images():
    codes = torch.tensor([[0, 1, 1, 0, 1, 1, 1, 0]], dtype=torch.int8)
    src, orig, is_reg, keep = gops.register_layout(codes, 2, 2, 5)
    assert src.tolist() == [[0, 1, 2, 8, 9, 3, 4, 5, 6, 8, 9, 7]]
    assert orig.tolist() == [[0, 1, 2, 2, 2, 3, 4, 5, 6, 6, 6, 7]]
    assert keep.tolist() == [[0, 3, 4, 5, 9, 10, 11]]
    assert is_reg.sum().item() == 4


def test_layer_beyond_the_decoder(zoo_program):
    with pytest.raises(PlanError, match=r"beyond the decoder: model.language_model.layers has 2 layers"):
        graphred.transform(zoo_program("llava"), victor(registers=2, layer=2))


@pytest.mark.parametrize("name,what", [("vilt", "no decoder: its cross-modal stack"), ("clip", "dual encoder"),
                                       ("blip", "cross-attention layers")])
def test_models_without_a_decoder(zoo_program, name, what):
    with pytest.raises(PlanError, match=what):
        graphred.transform(zoo_program(name), victor(registers=2, layer=1))


@pytest.mark.parametrize("name", DECODERS)
def test_structure_on_every_zoo_decoder(zoo_model, zoo_program, model_state, name):
    model, kwargs = zoo_model(name)
    before = model_state.snapshot(model)
    prog = zoo_program(name)
    fast = graphred.transform(prog, victor(registers=3, layer=1))
    gm = fast.graph_module
    params = dict(fast.named_parameters())
    reg = params["graph_module.graphred_registers"]
    assert isinstance(reg, torch.nn.Parameter) and reg.shape[0] == 3
    assert any(n.op == "get_attr" and n.target == "graphred_registers" for n in gm.graph.nodes)
    assert any(n.target is torch.ops.graphred.register_layout.default for n in gm.graph.nodes)
    ins, drop = fast.steps
    n_img = drop["image_before"]
    L = kwargs["input_ids"].shape[1]
    assert ins["length_after"] == L + 3 and drop["length_after"] == L + 3 - n_img
    with torch.no_grad():
        out = fast(**kwargs)
    logits = out.logits if hasattr(out, "logits") else out[0]
    assert logits.shape[1] == L + 3 - n_img
    # what remains stands for text and the registers, never an image token
    image_token = model.config.image_token_id if hasattr(model.config, "image_token_id") else model.config.image_token_index
    kept = fast.kept_positions
    ids = kwargs["input_ids"].expand(kept.shape[0], -1)
    kept_ids = ids.gather(1, kept)
    assert int((kept_ids == image_token).sum()) == 3 * kept.shape[0]  # registers stand for their image's last token
    assert torch.isfinite(logits).all()
    model_state.assert_unchanged(model, before)


def _llava_reference(model, kwargs, registers: torch.Tensor, layer: int, images: int = 1, embeds=None,
                     positions=None) -> torch.Tensor:
    """Victor by hand on the eager Hugging Face model: the language model run on embeddings with the
    registers inserted after the image (their position ids: the image's last token's), the image
    removed from the hidden states, rotary tables and mask where layer ``layer`` begins. ``embeds`` and
    ``positions`` (with ``kwargs`` holding the matching ids and mask) replace the model's own embeddings
    and position ids 0..L-1."""
    lm = model.model.language_model
    seen = {}
    h = lm.register_forward_pre_hook(lambda mod, a, kw: seen.update(kw), with_kwargs=True)
    if embeds is None:
        with torch.no_grad():
            model(**kwargs)
    h.remove()
    E = seen["inputs_embeds"] if embeds is None else embeds
    B, L, D = E.shape
    codes = (kwargs["input_ids"] == model.config.image_token_id).to(torch.int8)
    n_img = int(codes[0].sum())
    src, orig, is_reg, keep = gops.register_layout(codes, registers.shape[0], images, n_img)
    E2 = gops.gather_tokens(torch.cat([E, registers.expand(B, -1, -1)], 1), src, 1)
    mask2 = gops.gather_tokens(kwargs["attention_mask"], orig, 1)
    if positions is not None:
        orig = gops.gather_tokens(positions, orig, 1)

    def drop(mod, args, kw, first):
        args = list(args)
        if first:
            args[0] = gops.gather_tokens(args[0], keep, 1)
        cos, sin = kw["position_embeddings"]
        kw["position_embeddings"] = (gops.gather_tokens(cos, keep, 1), gops.gather_tokens(sin, keep, 1))
        m = kw.get("attention_mask")
        if isinstance(m, torch.Tensor):
            kw["attention_mask"] = gops.gather_tokens(gops.gather_tokens(m, keep, m.dim() - 2), keep, m.dim() - 1)
        if isinstance(kw.get("position_ids"), torch.Tensor):
            kw["position_ids"] = gops.gather_tokens(kw["position_ids"].expand(B, -1), keep, 1)
        return tuple(args), kw

    hooks = [lm.layers[i].register_forward_pre_hook(lambda m, a, kw, f=(i == layer): drop(m, a, kw, f), with_kwargs=True)
             for i in range(layer, len(lm.layers))]
    try:
        with torch.no_grad():
            hs = lm(inputs_embeds=E2, attention_mask=mask2, position_ids=orig, use_cache=False).last_hidden_state
            return model.lm_head(hs)
    finally:
        for h in hooks:
            h.remove()


def test_matches_a_hand_written_eager_reference():
    model, kwargs = graphred.zoo.load("llava")
    model.config.text_config.num_hidden_layers = len(model.model.language_model.layers)
    prog = graphred.capture(model, **kwargs)
    fast = graphred.transform(prog, victor(registers=4, layer=1))
    with torch.no_grad():
        got = fast(**kwargs).logits
    want = _llava_reference(model, kwargs, fast.graph_module.graphred_registers.detach(), layer=1)
    assert got.shape == want.shape
    valid = gops.gather_tokens(kwargs["attention_mask"], fast.kept_positions, 1).bool()
    torch.testing.assert_close(got[valid], want[valid], atol=2e-5, rtol=1e-4)


def test_registers_matter_and_get_gradients(zoo_program, zoo_model):
    model, kwargs = zoo_model("llava")
    fast = graphred.transform(zoo_program("llava"), victor(registers=2, layer=1))
    reg = fast.graph_module.graphred_registers
    out = fast(**kwargs).logits
    (g,) = torch.autograd.grad(out[:, -1].square().sum(), [reg])
    assert g.shape == reg.shape and g.abs().sum() > 0
    with torch.no_grad():
        reg.add_(1.0)
        moved = fast(**kwargs).logits
        reg.sub_(1.0)
    assert not torch.allclose(moved[:, -1], out[:, -1].detach())


def test_pool_init_summarises_the_image_and_differs_from_random(zoo_program):
    prog = zoo_program("llava")
    pool = graphred.transform(prog, victor(registers=4, layer=1)).graph_module.graphred_registers
    rand = graphred.transform(prog, victor(registers=4, layer=1, init="random")).graph_module.graphred_registers
    assert pool.shape == rand.shape and not torch.allclose(pool, rand)
    assert len({tuple(r.tolist()) for r in pool}) == 4  # distinct registers (no symmetric start)


def test_estimate_counts_the_victor_graph(zoo_model, zoo_program):
    name = "llava"
    from graphred.analysis.cost import count_flops_executed

    model, kwargs = zoo_model(name)
    prog = zoo_program(name)
    plan = victor(registers=4, layer=1)
    est = graphred.estimate(prog, plan)
    fast = graphred.transform(prog, plan)
    oracle = count_flops_executed(fast, **kwargs)
    a = est.after
    assert abs(a.flops_matmul - oracle) <= 0.01 * oracle, (a.flops_matmul, oracle)
    assert int(a.flops_expr.subs(est.symbols)) == a.flops
    assert a.flops < est.flops and a.kv_cache_bytes < est.kv_cache_bytes
    assert f"after {plan}" in str(est)


def test_kv_cache_of_later_layers_holds_no_image_token(zoo_model):
    model, kwargs = zoo_model("llava")
    with_cache = dict(kwargs, use_cache=True)
    fast = graphred.transform(graphred.capture(model, **with_cache), victor(registers=3, layer=1))
    with torch.no_grad():
        out = fast(**with_cache)
    layers = out.past_key_values.layers
    L, K = kwargs["input_ids"].shape[1], fast.kept_positions.shape[1]
    # layer 0 holds [text, image, registers, text]; layer 1 only text and registers
    assert [layer.keys.shape[-2] for layer in layers] == [L + 3, K]
    assert [layer.values.shape[-2] for layer in layers] == [L + 3, K]
    assert K == L + 3 - fast.steps[1]["image_before"]


def test_two_images_each_get_registers_and_match_the_reference():
    """Registers go after every image (the same parameters each time); checked against the eager reference."""
    model, kw = graphred.zoo.load("llava")
    ids, pv = kw["input_ids"], kw["pixel_values"]
    img = model.config.image_token_id
    B, n = ids.shape[0], int((ids[0] == img).sum())
    text = ids[ids != img].view(B, -1)
    two = torch.cat([text[:, :4], torch.full((B, n), img), text[:, 4:8], torch.full((B, n), img), text[:, 8:]], 1)
    kw2 = dict(kw, input_ids=two, attention_mask=torch.ones_like(two), pixel_values=torch.cat([pv, pv.flip(0)], 0))
    fast = graphred.transform(graphred.capture(model, **kw2), victor(registers=3, layer=1))
    ins, drop = fast.steps
    assert ins["images"] == 2 and ins["length_after"] == two.shape[1] + 6
    with torch.no_grad():
        got = fast(**kw2).logits
    assert got.shape[1] == two.shape[1] + 6 - 2 * n
    want = _llava_reference(model, kw2, fast.graph_module.graphred_registers.detach(), layer=1, images=2)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)


def test_victor_is_the_only_decoder_step(zoo_program):
    from graphred.plans import fastv

    prog = zoo_program("llava")
    with pytest.raises(PlanError, match="use it alone on the decoder"):
        graphred.transform(prog, fastv(layer=1, keep=0.5) + victor(registers=2, layer=1))
    with pytest.raises(PlanError):
        graphred.transform(prog, victor(registers=2, layer=1) + fastv(layer=1, keep=0.5))


def test_causal_lm_labels_follow_the_registers():
    """With a Hugging Face causal-LM loss, each kept position p (a register stands for its image's last
    token) is scored against the original next token labels[p + 1], as the unreduced model scores p."""
    model, kw = graphred.zoo.load("llava")
    ids = kw["input_ids"]
    labels = ids.clone()
    labels[ids == model.config.image_token_id] = -100
    labels[kw["attention_mask"] == 0] = -100
    labels[:, -3:] = ids[:, -3:]  # some text to score after the image
    kw = dict(kw, labels=labels)
    fast = graphred.transform(graphred.capture(model, **kw), victor(registers=3, layer=1))
    with torch.no_grad():
        out = fast(**kw)
    kept = fast.kept_positions
    want = torch.nn.functional.cross_entropy(out.logits[:, :-1].reshape(-1, out.logits.shape[-1]),
                                             labels.gather(1, kept[:, :-1] + 1).reshape(-1), ignore_index=-100)
    torch.testing.assert_close(out.loss, want)


# ----------------------------------------------------------------- ToMe in the vision tower, then Victor
def _scatter_source(fast, kwargs) -> torch.Tensor:
    """The image rows the transformed graph writes into the text embeddings (the masked_scatter source)."""
    import torch.fx as fx
    from torch.utils import _pytree as pytree

    gm = fast.graph_module
    (scatter,) = [n for n in gm.graph.nodes if n.target is torch.ops.aten.masked_scatter.default]
    got = {}

    class Grab(fx.Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            if n is scatter.args[2]:
                got["rows"] = out
            return out

    flat = pytree.tree_leaves(gm.graph._codegen.process_inputs((), dict(kwargs)))
    with torch.no_grad():
        Grab(gm).run(*flat)
    return got["rows"]


def _shrunk_inputs(model, kwargs, rows: torch.Tensor):
    """By hand: every image's placeholder run keeps its first K positions (K = rows per image), the image rows
    are scattered there, the kept tokens keep their original position ids."""
    img = model.config.image_token_id
    ids, mask = kwargs["input_ids"], kwargs["attention_mask"]
    B, L = ids.shape
    n = int((ids[0] == img).sum())
    K = rows.shape[0] // B
    keep = torch.stack([torch.cat([torch.nonzero(row != img).flatten(), torch.nonzero(row == img).flatten()[:K]]).sort().values
                        for row in ids])
    ids2, mask2 = ids.gather(1, keep), mask.gather(1, keep)
    with torch.no_grad():
        E = model.get_input_embeddings()(ids2)
        E = E.masked_scatter((ids2 == img).unsqueeze(-1), rows.to(E.dtype))
    return dict(kwargs, input_ids=ids2, attention_mask=mask2), E, keep, n, K


def test_tome_in_the_tower_shrinks_the_placeholders_and_matches_a_reference(zoo_model, zoo_program, model_state):
    model, kwargs = zoo_model("llava")
    before = model_state.snapshot(model)
    fast = graphred.transform(zoo_program("llava"), tome(r=2))
    shrink = [s for s in fast.steps if s["op"] == "shrink_placeholders"]
    merges = [s for s in fast.steps if s["op"] == "merge_image"]
    assert shrink and merges
    rows = _scatter_source(fast, kwargs)
    kw2, E, keep, n, K = _shrunk_inputs(model, kwargs, rows)
    assert K < n and shrink[-1]["image_after"] == K  # the tower's merges reached the decoder
    with torch.no_grad():
        got = fast(**kwargs).logits
        want = model(inputs_embeds=E, attention_mask=kw2["attention_mask"], position_ids=keep).logits
    assert got.shape == want.shape == (kwargs["input_ids"].shape[0], kwargs["input_ids"].shape[1] - (n - K), want.shape[-1])
    assert torch.equal(fast.kept_positions, keep)
    valid = kw2["attention_mask"].bool()
    torch.testing.assert_close(got[valid], want[valid], atol=2e-5, rtol=1e-4)
    model_state.assert_unchanged(model, before)


def test_victor_composes_with_tome_in_the_tower(zoo_model, zoo_program):
    """victor + tome (either order): ToMe merges in the tower, the placeholders shrink, the registers follow the
    shorter image; checked against the eager reference, the estimate against FlopCounterMode, and tome(r=0)
    leaves Victor as it is."""
    from graphred.analysis.cost import count_flops_executed

    model, kwargs = zoo_model("llava")
    prog = zoo_program("llava")
    plan = victor(registers=3, layer=1) + tome(r=2)
    fast = graphred.transform(prog, plan)
    ops = [s["op"] for s in fast.steps]
    assert ops.index("shrink_placeholders") < ops.index("insert_registers") < ops.index("drop_image")
    ins = [s for s in fast.steps if s["op"] == "insert_registers"][0]
    rows = _scatter_source(fast, kwargs)
    kw2, E, keep, n, K = _shrunk_inputs(model, kwargs, rows)
    L = kwargs["input_ids"].shape[1]
    assert ins["length_after"] == L - (n - K) + 3
    with torch.no_grad():
        got = fast(**kwargs).logits
    want = _llava_reference(model, kw2, fast.graph_module.graphred_registers.detach(), layer=1, embeds=E, positions=keep)
    assert got.shape == want.shape and got.shape[1] == L - n + 3
    valid = gops.gather_tokens(kwargs["attention_mask"], fast.kept_positions, 1).bool()
    torch.testing.assert_close(got[valid], want[valid], atol=2e-5, rtol=1e-4)
    # the same rewrite whichever order the plan lists the steps in
    other = graphred.transform(prog, tome(r=2) + victor(registers=3, layer=1))
    with torch.no_grad():
        torch.testing.assert_close(other(**kwargs).logits, got)
    est = graphred.estimate(prog, plan)
    oracle = count_flops_executed(fast, **kwargs)
    assert abs(est.after.flops_matmul - oracle) <= 0.01 * oracle, (est.after.flops_matmul, oracle)
    alone = graphred.estimate(prog, victor(registers=3, layer=1))
    assert est.after.flops < alone.after.flops  # the tower's merges pay off in the decoder too
    # zero reduction in the tower: Victor alone, bit for bit
    zero = graphred.transform(prog, victor(registers=3, layer=1) + tome(r=0))
    ref = graphred.transform(prog, victor(registers=3, layer=1))
    with torch.no_grad():
        assert torch.equal(zero(**kwargs).logits, ref(**kwargs).logits)


def test_victor_and_tome_on_paligemma_prefix_lm(zoo_model, zoo_program):
    """PaliGemma (SigLIP tower, no class token, prefix-LM decoder): every tower layer's merges reach the decoder, so
    the placeholders shrink twice; the estimate counts the graph that runs (FlopCounterMode)."""
    from graphred.analysis.cost import count_flops_executed

    model, kwargs = zoo_model("paligemma")
    prog = zoo_program("paligemma")
    plan = victor(registers=2, layer=1) + tome(r=2)
    fast = graphred.transform(prog, plan)
    shrinks = [s for s in fast.steps if s["op"] == "shrink_placeholders"]
    merges = [s for s in fast.steps if s["op"] == "merge_image"]
    assert [s["image_after"] for s in shrinks] == [s["image_after"] for s in merges]  # the tower's count, each layer
    drop = fast.steps[-1]
    assert drop["op"] == "drop_image" and drop["image_before"] == merges[-1]["image_after"]
    with torch.no_grad():
        out = fast(**kwargs).logits
    assert out.shape[1] == kwargs["input_ids"].shape[1] - shrinks[0]["image_before"] + 2 and torch.isfinite(out).all()
    est = graphred.estimate(prog, plan)
    oracle = count_flops_executed(fast, **kwargs)
    assert abs(est.after.flops_matmul - oracle) <= 0.01 * oracle, (est.after.flops_matmul, oracle)


@pytest.mark.parametrize("name,obstacle", [("idefics3", "size only known at run time"),
                                           ("qwen2-vl", "no residual add follows the attention"),
                                           ("gemma3", "reshaped to .* a layout with no dim for the tokens")])
def test_tome_in_a_tower_it_cannot_reduce_names_the_obstacle(zoo_program, name, obstacle):
    with pytest.raises(PlanError, match=obstacle) as e:
        graphred.transform(zoo_program(name), victor(registers=2, layer=1) + tome(r=2))
    assert e.value.node and e.value.module_path or "at node" in str(e.value)


# ----------------------------------------------------------------- uneven batches
def test_uneven_batch_each_sample_matches_the_reference_alone(zoo_model, zoo_program):
    """Samples with different image counts (the zoo's internvl batch: one image, then two): every sample gets the
    registers of the most images (filler slots where it has fewer), a sample with more image tokens keeps the
    difference as filler slots at the drop; each sample's real slots equal the eager reference run on it alone."""
    model, kwargs = zoo_model("internvl")
    fast = graphred.transform(zoo_program("internvl"), victor(registers=3, layer=1))
    ins, drop = fast.steps
    with torch.no_grad():
        got = fast(**kwargs).logits
    kept = fast.kept_positions
    regs = fast.graph_module.graphred_registers.detach()
    img = model.config.image_token_id
    ids = kwargs["input_ids"]
    runs = [int(((ids[b] == img) & ~torch.cat([ids[b, 1:] == img, torch.tensor([False])])).sum()) for b in range(len(ids))]
    assert len(set(runs)) > 1 and drop["fillers_after"] == [3 * (max(runs) - r) + n - min(drop["image_before"])
                                                            for r, n in zip(runs, drop["image_before"])]
    assert (kept == -1).sum(1).tolist() == drop["fillers_after"]
    first = 0
    for b, r in enumerate(runs):
        kw_b = {k: (v[first:first + r] if k == "pixel_values" else v[b:b + 1]) if isinstance(v, torch.Tensor) else v
                for k, v in kwargs.items()}
        first += r
        want = _llava_reference(model, kw_b, regs, layer=1, images=r)
        real = kept[b] >= 0
        assert int(real.sum()) == want.shape[1]
        torch.testing.assert_close(got[b, real], want[0], atol=2e-5, rtol=1e-4)
    from graphred.analysis.cost import count_flops_executed

    est = graphred.estimate(zoo_program("internvl"), victor(registers=3, layer=1))
    oracle = count_flops_executed(fast, **kwargs)
    assert abs(est.after.flops_matmul - oracle) <= 0.01 * oracle, (est.after.flops_matmul, oracle)
