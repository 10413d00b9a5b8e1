"""Token reduction end to end: identity plans, graph structure, PuMer / FastV / ToMe behaviour,
a hand-written FastV reference on LLaVA, bad-plan errors, and the FLOP drop."""
from __future__ import annotations

import copy
from collections.abc import Mapping

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import graphred
from graphred.plans import fastv, pumer, tome

from output_leaves import tensor_leaves

# bound once: a name lookup per call would also see a submodule that shadowed the function
transform = graphred.transform

gr = torch.ops.graphred

CROSS_MODAL = ["llava", "paligemma", "idefics3", "qwen2-vl", "vilt", "blip"]


def _logits(out):
    return out["logits"] if isinstance(out, Mapping) else out[0]


# ------------------------------------------------------------------- 0. the public name


def test_transform_attribute_is_the_function(zoo_program):
    """``graphred.transform`` stays the function after every graphred submodule is imported
    (a submodule named ``transform`` would shadow the lazily resolved function)."""
    import importlib
    import pkgutil

    for info in pkgutil.walk_packages(graphred.__path__, "graphred."):
        if info.name.split(".")[-1] not in ("__main__", "cli", "demo"):
            importlib.import_module(info.name)
    for _ in range(2):
        assert callable(graphred.transform) and not isinstance(graphred.transform, type(graphred))
        reduced = graphred.transform(zoo_program("llava"), fastv(layer=1, keep=0.5))
        assert isinstance(reduced, torch.nn.Module)


# ------------------------------------------------------------------- 1. zero reduction is identity


def test_zero_reduction_is_identity(zoo_name, zoo_model, zoo_program):
    model, kwargs = zoo_model(zoo_name)
    reduced = transform(zoo_program(zoo_name), pumer(prune=0, merge=0))
    # ViLT samples its patch order with torch.multinomial: the same seed gives the same draws to
    # the eager model and the graph (the eager model is not bit-reproducible across calls otherwise)
    with torch.no_grad():
        torch.manual_seed(0)
        want = model(**kwargs)
        torch.manual_seed(0)
        got = reduced(**kwargs)
    assert reduced.steps == []
    w, g = dict(tensor_leaves(want)), dict(tensor_leaves(got))
    assert w.keys() == g.keys()
    assert w, "no tensor outputs"
    for k in w:
        assert torch.equal(w[k], g[k]), f"{zoo_name}: {k} differs"


def test_fastv_keep_all_is_identity(zoo_model, zoo_program):
    model, kwargs = zoo_model("llava")
    reduced = transform(zoo_program("llava"), fastv(layer=1, keep=1.0))
    with torch.no_grad():
        torch.manual_seed(0)
        want = model(**kwargs)
        torch.manual_seed(0)
        got = reduced(**kwargs)
    w, g = dict(tensor_leaves(want)), dict(tensor_leaves(got))
    assert w.keys() == g.keys()
    for k in w:
        assert torch.equal(w[k], g[k]), k


# ------------------------------------------------------------------- 2. structure (FastV on LLaVA)


def test_no_duplicate_gathers_after_pumer(zoo_program):
    """Each (tensor, index, dim) is gathered once: per-layer views of a shared table (rotary cos/sin
    unsqueezed in every layer) share one gather, and bookkeeping paths do not recompute an index."""
    reduced = transform(zoo_program("llava-bench"), pumer(prune=0.3, merge=0.2, layers=[2, 4]))
    graph = reduced.graph_module.graph
    gathers = [n for n in graph.nodes if n.op == "call_function" and n.target is gr.gather_tokens.default]
    keys = [(n.args[0], n.args[1], n.args[2]) for n in gathers]
    assert len(keys) == len(set(keys)), "a gather is repeated"

    def root(n):  # through view ops to the gathered table
        while n.op == "call_function" and n.target in (torch.ops.aten.unsqueeze.default, torch.ops.aten.view.default):
            n = n.args[0]
        return n
    by_root = {}
    for n in gathers:
        by_root.setdefault((root(n.args[0]), n.args[1], n.args[2]), []).append(n)
    shared = [v for v in by_root.values() if len(v) > 1]
    assert not shared, f"views of one table gathered separately: {[[n.name for n in v] for v in shared]}"
    graph.lint()


def test_fastv_structure_llava(zoo_model, zoo_program):
    model, kwargs = zoo_model("llava")
    reduced = transform(zoo_program("llava"), fastv(layer=1, keep=0.5))
    graph = reduced.graph_module.graph
    graph.lint()
    calls = [n for n in graph.nodes if n.op == "call_function"]
    assert sum(n.target is gr.attention_scores.default for n in calls) == 1
    assert sum(n.target is gr.select_tokens.default for n in calls) == 1
    assert any(n.target is gr.gather_tokens.default for n in calls)
    missing = [n.name for n in calls if "val" not in n.meta]
    assert not missing, f"call_function nodes without meta['val']: {missing[:10]}"

    with torch.no_grad():
        out = reduced(**kwargs)
    ids = kwargs["input_ids"]
    B, L = ids.shape
    n_img = int((ids[0] == model.config.image_token_id).sum())
    assert (L, n_img) == (76, 64)
    logits = _logits(out)
    assert logits.shape[:2] == (B, 76 - 32)
    kp = reduced.kept_positions
    assert kp is not None and tuple(kp.shape) == (B, 44)
    assert torch.all(kp[:, 1:] > kp[:, :-1]), "kept positions not sorted ascending"
    for b in range(B):
        kept = set(kp[b].tolist())
        text = set(torch.nonzero(ids[b] != model.config.image_token_id).flatten().tolist())
        assert text <= kept, f"sample {b}: text positions dropped: {sorted(text - kept)}"
        assert L - 1 in kept
    assert [s["op"] for s in reduced.steps] == ["prune"]
    assert reduced.steps[0]["image_before"] == 64 and reduced.steps[0]["image_after"] == 32
    assert reduced.steps[0]["length_after"] == 44


# ------------------------------------------------------------------- 3. PuMer


@pytest.mark.parametrize("name", CROSS_MODAL)
def test_pumer_runs_and_respects_ratios(name, zoo_model, zoo_program):
    _, kwargs = zoo_model(name)
    reduced = transform(zoo_program(name), pumer(prune=0.3, merge=0.2))
    with torch.no_grad():
        out = reduced(**kwargs)
    for k, t in tensor_leaves(out):
        if t.is_floating_point():
            assert torch.isfinite(t).all(), f"{name}: {k} not finite"
    prunes = [s for s in reduced.steps if s["op"] == "prune"]
    merges = [s for s in reduced.steps if s["op"] == "merge_image"]
    assert prunes and merges, reduced.steps
    for s in prunes:
        n = s["image_before"]
        assert s["image_after"] == n - round(0.3 * n), s
    for s in merges:
        # the reference reducer: round(ratio * image tokens before pruning), at most (n - 1) // 2 (one protected)
        n, n0 = s["image_before"], next(p["image_before"] for p in prunes if p["block"] == s["block"])
        assert s["image_after"] == n - min(round(0.2 * n0), (n - 1) // 2), s
    # the chain is consistent: each step starts where the previous one ended
    steps = prunes + merges
    steps.sort(key=lambda s: reduced.steps.index(s))
    for a, b in zip(steps, steps[1:]):
        if a["block"] == b["block"]:
            assert b["image_before"] == a["image_after"]
    assert reduced.kept_positions is not None
    assert reduced.kept_positions.shape[1] == reduced.steps[-1]["length_after"]


def test_pumer_merge_keeps_text_vilt(zoo_model, zoo_program):
    _, kwargs = zoo_model("vilt")
    reduced = transform(zoo_program("vilt"), pumer(prune=0, merge=0.5))
    with torch.no_grad():
        reduced(**kwargs)
    (step,) = reduced.steps
    assert step["op"] == "merge_image"
    n = step["image_before"]
    assert step["image_after"] == n - min(round(0.5 * n), n // 2)
    kp = reduced.kept_positions
    # ViLT's sequence is [text tokens | image tokens]: the text prefix is input_ids' length
    n_text = kwargs["input_ids"].shape[1]
    assert kp.shape[1] == n_text + step["image_after"]
    for b in range(kp.shape[0]):
        kept = set(kp[b].tolist())
        assert set(range(n_text)) <= kept, f"sample {b}: text positions merged away"
        assert all(p < n_text + n for p in kept)


# ------------------------------------------------------------------- 4. FastV reference on LLaVA


def _fastv_reference(model, kwargs, keep: float, renumber: bool = False):
    """FastV by hand on a private eager copy: layer-0 attention of the last query, top-k image
    tokens, then decoder layer 1, the final norm and lm_head on the kept tokens."""
    m = copy.deepcopy(model).eval()
    m.set_attn_implementation("eager")
    lm = m.model.language_model
    assert len(lm.layers) == 2
    captured = {}
    h = lm.layers[0].register_forward_hook(lambda mod, args, out: captured.__setitem__("h0", out))
    try:
        with torch.no_grad():
            full = m(**kwargs, output_attentions=True)
    finally:
        h.remove()
    h0 = captured["h0"]
    h0 = h0[0] if isinstance(h0, tuple) else h0                     # [B, L, D] after layer 0
    attn0 = full.attentions[0]                                        # [B, H, L, L]
    ids, amask = kwargs["input_ids"], kwargs["attention_mask"]
    B, L = ids.shape
    is_img = ids == model.config.image_token_id
    # the last valid query of each sample (right padding puts it before the end)
    last = (torch.arange(L)[None, :] * amask.bool()).amax(dim=1)      # [B]
    scores = attn0[torch.arange(B), :, last, :].mean(dim=1)           # mean over heads, last valid query row
    kept_rows = []
    for b in range(B):
        img_pos = torch.nonzero(is_img[b]).flatten()
        n_keep = round(keep * len(img_pos))
        top = torch.topk(scores[b, img_pos], n_keep).indices
        chosen = img_pos[top]
        text_pos = torch.nonzero(~is_img[b]).flatten()
        kept_rows.append(torch.sort(torch.cat([text_pos, chosen])).values)
    kept = torch.stack(kept_rows)                                     # [B, K], ascending
    K = kept.shape[1]

    hk = torch.gather(h0, 1, kept[..., None].expand(B, K, h0.shape[-1]))
    # original position ids, or (renumbered) slots 0..K-1
    pos = torch.arange(K).expand(B, K) if renumber else kept
    cos, sin = lm.rotary_emb(hk, pos)
    allowed = (kept[:, None, :] <= kept[:, :, None]) & amask.bool().gather(1, kept)[:, None, :]
    mask = torch.zeros(B, 1, K, K, dtype=hk.dtype)
    mask.masked_fill_(~allowed[:, None], torch.finfo(hk.dtype).min)
    with torch.no_grad():
        h1 = lm.layers[1](hk, attention_mask=mask, position_ids=pos, position_embeddings=(cos, sin))
        h1 = h1[0] if isinstance(h1, tuple) else h1
        logits = m.lm_head(lm.norm(h1))
    return kept, logits, scores


def _right_padded(kwargs: dict) -> dict:
    """The same batch with every sample's padding moved to the end of its row."""
    ids, amask = kwargs["input_ids"], kwargs["attention_mask"].bool()
    assert not bool(amask.all()), "the zoo batch must hold a padded sample"
    rows, masks = [], []
    for b in range(ids.shape[0]):
        rows.append(torch.cat([ids[b][amask[b]], ids[b][~amask[b]]]))
        masks.append(torch.cat([amask[b][amask[b]], amask[b][~amask[b]]]))
    out = dict(kwargs, input_ids=torch.stack(rows), attention_mask=torch.stack(masks).to(kwargs["attention_mask"].dtype))
    assert not bool(out["attention_mask"][:, -1].all())  # a sample ends in padding
    return out


@pytest.mark.parametrize("padding", ["left", "right"])
@pytest.mark.parametrize("renumber", [False, True])
def test_fastv_matches_reference_llava(zoo_model, zoo_program, renumber, padding):
    model, kwargs = zoo_model("llava")
    prog = zoo_program("llava")
    if padding == "right":
        kwargs = _right_padded(kwargs)
        prog = graphred.capture(model, **kwargs)
    kept_ref, logits_ref, _ = _fastv_reference(model, kwargs, keep=0.5, renumber=renumber)
    reduced = transform(prog, fastv(layer=1, keep=0.5, renumber=renumber))
    with torch.no_grad():
        out = reduced(**kwargs)
    assert torch.equal(reduced.kept_positions, kept_ref), (
        f"selection differs from eager attention:\n{reduced.kept_positions}\nvs\n{kept_ref}")
    logits = _logits(out)
    assert logits.shape == logits_ref.shape
    torch.testing.assert_close(logits[:, -1], logits_ref[:, -1], atol=1e-4, rtol=1e-4)
    # every unpadded position, not only the last, follows the reference
    valid = kwargs["attention_mask"].bool().gather(1, kept_ref)
    torch.testing.assert_close(logits[valid], logits_ref[valid], atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------- 5. bad input


def test_pumer_on_clip_has_no_cross_modal(zoo_program):
    with pytest.raises(graphred.PlanError, match="no cross-modal"):
        transform(zoo_program("clip"), pumer(prune=0.3, merge=0.2))


def test_fastv_on_vilt_not_causal(zoo_program):
    with pytest.raises(graphred.PlanError, match="not causal"):
        transform(zoo_program("vilt"), fastv(layer=1, keep=0.5))


def test_fastv_layer_out_of_range_lists_layers(zoo_program):
    with pytest.raises(graphred.PlanError) as ei:
        transform(zoo_program("llava"), fastv(layer=5, keep=0.5))
    assert "[0, 1]" in str(ei.value), str(ei.value)


def test_bad_ratio_at_construction():
    with pytest.raises(ValueError):
        pumer(prune=1.5)
    assert issubclass(graphred.PlanError, ValueError)


def test_transform_rejects_raw_module(zoo_model):
    model, _ = zoo_model("clip")
    with pytest.raises(graphred.GraphredError):
        transform(model, tome(r=8))


def test_merge_text_on_causal_decoder(zoo_program):
    with pytest.raises(graphred.PlanError, match="merge_text"):
        transform(zoo_program("llava"), pumer(prune=0, merge=0, merge_text=0.2))


def test_user_model_unchanged(zoo_capture, model_state):
    model, kwargs, before_capture, prog = zoo_capture("llava")
    model_state.assert_unchanged(model, before_capture)
    snap = model_state.snapshot(model)
    reduced = transform(prog, fastv(layer=1, keep=0.5))
    with torch.no_grad():
        reduced(**kwargs)
    model_state.assert_unchanged(model, snap)


def test_composed_plan_fastv_then_pumer(zoo_program):
    _, kwargs = zoo_program("llava").example_inputs()
    reduced = transform(zoo_program("llava"), fastv(layer=1, keep=0.5) + pumer(prune=0.2, merge=0.1, layers=[1]))
    with torch.no_grad():
        out = reduced(**kwargs)
    assert [s["step"] for s in reduced.steps] == ["fastv", "pumer", "pumer"]
    assert _logits(out).shape[1] == reduced.steps[-1]["length_after"]
    assert reduced.kept_positions.shape == (2, reduced.steps[-1]["length_after"])


def test_pumer_on_every_layer_with_merging(zoo_program):
    """Prune and merge at two successive layers: sizes, keys and masks follow each reduction."""
    _, kwargs = zoo_program("llava").example_inputs()
    reduced = transform(zoo_program("llava"), pumer(prune=0.2, merge=0.2, layers=[0, 1]))
    with torch.no_grad():
        out = reduced(**kwargs)
    images = [s.get("image_after") for s in reduced.steps]
    # the reference counts: each layer prunes round(0.2 n) and merges round(0.2 n) of its n image tokens before pruning
    want, n = [], 64
    for _ in range(2):
        want += [n - round(0.2 * n), n - 2 * round(0.2 * n)]
        n = want[-1]
    assert images == want  # 64 -prune 13-> 51 -merge 13-> 38 -prune 8-> 30 -merge 8-> 22
    assert _logits(out).shape[1] == 12 + want[-1] and torch.isfinite(_logits(out)).all()
    pos = reduced.kept_positions
    assert (pos[:, 1:] > pos[:, :-1]).all()


# ------------------------------------------------------------------- 6. ToMe


def test_tome_clip_and_idempotence(zoo_program):
    prog = zoo_program("clip")
    _, kwargs = prog.example_inputs()
    code_before = prog.graph_module.code
    r1 = transform(prog, tome(r=8))
    assert prog.graph_module.code == code_before, "transform changed the program's graph"
    r2 = transform(prog, tome(r=8))
    assert prog.graph_module.code == code_before
    assert r1.graph_module.code == r2.graph_module.code
    with torch.no_grad():
        out = r1(**kwargs)
    lengths = [s["image_before"] for s in r1.steps[:1]] + [s["image_after"] for s in r1.steps]
    assert lengths == [65, 57, 49], r1.steps
    assert [s["length_after"] for s in r1.steps] == [57, 49]
    for k, t in tensor_leaves(out):
        if t.is_floating_point():
            assert torch.isfinite(t).all(), k


# ------------------------------------------------------------------- 7. FLOPs drop


def _count(fn, kwargs) -> int:
    from graphred.analysis.cost import oracle

    oracle.install_cpu_sdpa_flop_formula()
    with FlopCounterMode(display=False, custom_mapping=dict(oracle._OVERRIDES)) as fc, torch.no_grad():
        fn(**kwargs)
    return fc.get_total_flops()


def test_fastv_reduces_flops(zoo_model, zoo_program):
    _, kwargs = zoo_model("llava")
    prog = zoo_program("llava")
    reduced = transform(prog, fastv(layer=1, keep=0.25))
    before = _count(prog.graph_module, kwargs)
    after = _count(reduced, kwargs)
    assert before > 0
    assert after < before, (before, after)


def test_pumer_prune_merge_and_merge_text_at_one_layer_vilt(zoo_program):
    """Three reductions at one layer: keys follow each; the text [CLS] the pooler reads is protected."""
    prog = zoo_program("vilt")
    _, kwargs = prog.example_inputs()
    reduced = transform(prog, pumer(prune=0.3, merge=0.2, merge_text=0.2, layers=[1]))
    torch.manual_seed(0)
    with torch.no_grad():
        out = reduced(**kwargs)
    torch.manual_seed(0)
    with torch.no_grad():
        ref = prog(**kwargs)
    assert [s["op"] for s in reduced.steps] == ["prune", "merge_image", "merge_text"]
    assert (reduced.kept_positions[:, 0] == 0).all()  # the [CLS] stays first
    # reductions after the last layer's attention leave the pooled [CLS] exactly as it was
    torch.testing.assert_close(_logits(out), _logits(ref), atol=1e-5, rtol=0)


def test_steps_out_of_graph_order_say_so(zoo_program):
    with pytest.raises(graphred.PlanError, match="graph order"):
        transform(zoo_program("blip"), pumer(prune=0.3, merge=0.2) + tome(r=4))
    reduced = transform(zoo_program("blip"), tome(r=4) + pumer(prune=0.3, merge=0.2))
    assert [s["step"] for s in reduced.steps][:2] == ["tome", "tome"]


@pytest.mark.parametrize("name", ["clip", "siglip"])
def test_tome_proportional_attention(zoo_program, name):
    """log(size) is added to the key logits of every attention after the first merge, and it brings the
    merged model closer to the unmerged one than plain merging does."""
    prog = zoo_program(name)
    _, kwargs = prog.example_inputs()
    prop = transform(prog, tome(r=8))
    plain = transform(prog, tome(r=8, proportional=False))
    logs = [n for n in prop.graph_module.graph.nodes if n.target is torch.ops.aten.log.default]
    # one bias per attention after the first merge: the tower's later layers (and a pooling head)
    later = [b for b in graphred.analyze(prog).blocks if b.query_modalities == {"image"} and b.layer_index >= 1
             or b.query_modalities == {"register"}]
    assert len(logs) == len(later) >= 1
    assert not any(n.target is torch.ops.aten.log.default for n in plain.graph_module.graph.nodes)
    with torch.no_grad():
        ref, a, b = prog(**kwargs), prop(**kwargs), plain(**kwargs)
    ref_img = ref.image_embeds
    err_prop = (a.image_embeds - ref_img).abs().max()
    err_plain = (b.image_embeds - ref_img).abs().max()
    assert err_prop < err_plain, (float(err_prop), float(err_plain))
