"""graphred.estimate: predicted FLOPs, memory and KV cache against independent measurements.

* FLOPs (matrix products) against torch's FlopCounterMode on the *eager* model, CPU attention counted
  (graphred.analysis.cost.oracle), within 1% for every zoo model (exact in practice);
* peak activation memory against torch's ``MemTracker`` (torch.distributed._tools.mem_tracker) running
  the captured graph on the CPU, within 10% for every zoo model;
* the symbolic expressions evaluated at three text lengths against fresh captures at those lengths;
* a LLaVA-1.5-7B-shaped config (config.json only) estimated on the meta device in under 60 s.
"""
from __future__ import annotations

import json
import os

import pytest
import sympy
import torch

import graphred
from graphred import PlanError, zoo
from graphred.analysis.cost import count_flops_executed
from graphred.analysis.cost.estimate import Estimate, estimate_model, sweep
from graphred.analysis.cost.memory import activation_memory, weight_bytes

NAMES = zoo.TEST_NAMES  # (the issue-13 families: tests/test_zoo_families.py)


@pytest.fixture(scope="module")
def estimates(zoo_program):
    cache: dict[str, Estimate] = {}

    def get(name: str) -> Estimate:
        if name not in cache:
            cache[name] = graphred.estimate(zoo_program(name))
        return cache[name]

    return get


def _measured_peak_activations(gm, args: tuple, kwargs: dict) -> int:
    """Peak bytes of inputs + activations while ``gm`` runs, by torch's MemTracker (an independent
    measurement: it follows the real storages the CPU kernels allocate and free; graphred's oracle registers the
    inputs as live, the weights and tensor constants as weights)."""
    from graphred.analysis.cost.oracle import peak_activations_executed

    return peak_activations_executed(gm, *args, **kwargs)


def _has_apply_plan() -> bool:
    try:
        from graphred.analysis.cost.estimate import apply_plan_fn

        apply_plan_fn()
        return True
    except (PlanError, ImportError):
        return False


needs_apply_plan = pytest.mark.skipif(not _has_apply_plan(), reason="graphred.passes.apply_plan not available")


# ---------------------------------------------------------------------------------------------
# 1. FLOPs against FlopCounterMode on the eager model
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_matmul_flops_match_flop_counter_on_eager_model(name, estimates, zoo_model):
    model, kwargs = zoo_model(name)
    oracle = count_flops_executed(model, **kwargs)
    est = estimates(name)
    assert oracle > 0
    assert est.flops_matmul == oracle, (name, est.flops_matmul, oracle)
    assert est.flops >= est.flops_matmul
    assert not est.uncounted, est.uncounted


# ---------------------------------------------------------------------------------------------
# 2. peak activation memory against torch's MemTracker
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_peak_activation_memory_matches_mem_tracker(name, estimates, zoo_program):
    prog = zoo_program(name)
    args, kwargs = prog.example_inputs()
    measured = _measured_peak_activations(prog.graph_module, args, kwargs)
    est = estimates(name)
    assert est.peak_activation_bytes == measured, (name, est.peak_activation_bytes, measured)


def test_memory_counts_views_once_and_weights_apart():
    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(8, 8, bias=False)

        def forward(self, x):
            y = self.lin(x)            # 2x4x8 fp32 = 256 B
            z = y.view(8, 8).t()       # views of y: no new storage
            return (z * 2).sum()

    x = torch.randn(2, 4, 8)
    gm = graphred.capture(M(), x).graph_module
    prof = activation_memory(gm)
    # x (256 B, input, live throughout) + y (256) + z*2 (256) live together; views add nothing
    assert prof.peak_bytes == 256 * 3
    assert prof.input_bytes == 256
    assert weight_bytes(gm).total == 8 * 8 * 4


def test_tied_weights_are_counted_once():
    class Tied(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(10, 4)
            self.head = torch.nn.Linear(4, 10, bias=False)
            self.head.weight = self.emb.weight

        def forward(self, ids):
            return self.head(self.emb(ids))

    gm = graphred.capture(Tied(), torch.tensor([[1, 2, 3]])).graph_module
    assert weight_bytes(gm).total == 10 * 4 * 4


# ---------------------------------------------------------------------------------------------
# 3. symbolic expressions
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_expressions_give_the_numbers_at_the_example_inputs(name, estimates):
    est = estimates(name)
    v = est.symbols
    assert int(est.flops_expr.subs(v)) == est.flops
    assert int(est.flops_matmul_expr.subs(v)) == est.flops_matmul
    assert int(est.peak_activation_expr.subs(v)) == est.peak_activation_bytes
    assert int(est.kv_cache_expr.subs(v)) == est.kv_cache_bytes
    assert int(est.bytes_moved_expr.subs(v)) == est.bytes_moved
    assert sum(g.flops for g in est.groups) == est.flops
    assert sum(g.flops_matmul for g in est.groups) == est.flops_matmul


def _with_text_delta(name: str, kwargs: dict, delta: int) -> dict:
    """The zoo inputs with ``delta`` more (or fewer) plain text tokens per sample, built the way the zoo
    lays prompts out: decoders (left padding, text after the image) gain/lose tokens at the end,
    encoders (``[bos] text [eos] pad``) right after the first token."""
    kw = dict(kwargs)
    ids, am = kw["input_ids"], kw["attention_mask"]
    b, n = ids.shape
    at = n if name == "llava" else 1
    if delta >= 0:
        new = torch.arange(10, 10 + delta).repeat(b, 1)
        ids = torch.cat([ids[:, :at], new, ids[:, at:]], 1)
        am = torch.cat([am[:, :at], torch.ones(b, delta, dtype=am.dtype), am[:, at:]], 1)
    else:
        drop = set(range(at + delta, at)) if at == n else set(range(1, 1 - delta))
        keep = [i for i in range(n) if i not in drop]
        ids, am = ids[:, keep], am[:, keep]
    kw["input_ids"], kw["attention_mask"] = ids, am
    return kw


@pytest.mark.parametrize("name", ["llava", "clip"])
def test_expressions_equal_fresh_estimates_at_three_text_lengths(name, estimates, zoo_model):
    base = estimates(name)
    model, kwargs = zoo_model(name)
    n_txt = base.symbol("n_txt")
    seen = set()
    for delta in (-4, 0, 6):
        est = graphred.estimate(graphred.capture(model, **_with_text_delta(name, kwargs, delta)))
        values = {base.symbol(s.name): v for s, v in est.symbols.items()}
        seen.add(values[n_txt])
        for label, expr, number in (
            ("flops", base.flops_expr, est.flops),
            ("flops_matmul", base.flops_matmul_expr, est.flops_matmul),
            ("peak_activation", base.peak_activation_expr, est.peak_activation_bytes),
            ("kv_cache", base.kv_cache_expr, est.kv_cache_bytes),
            ("bytes_moved", base.bytes_moved_expr, est.bytes_moved),
        ):
            assert int(expr.subs(values)) == number, (name, delta, label)
    assert len(seen) == 3


def test_batch_symbol_scales_flops_and_kv_cache(estimates, zoo_model):
    base = estimates("llava")
    model, kwargs = zoo_model("llava")
    one = {k: (v[:1] if isinstance(v, torch.Tensor) else v) for k, v in kwargs.items()}
    est = graphred.estimate(graphred.capture(model, **one))
    values = {base.symbol(s.name): v for s, v in est.symbols.items()}
    assert values[base.symbol("B")] == 1
    assert int(base.flops_expr.subs(values)) == est.flops
    assert int(base.kv_cache_expr.subs(values)) == est.kv_cache_bytes


# ---------------------------------------------------------------------------------------------
# 4. breakdown, KV cache, output forms
# ---------------------------------------------------------------------------------------------


def test_breakdown_per_layer_and_tower(estimates):
    est = estimates("llava")
    names = [g.name for g in est.groups]
    assert "model.language_model.layers.0" in names and "model.language_model.layers.1" in names
    assert "model.vision_tower.encoder.layers.0" in names
    assert "lm_head" in names
    dec = est.group("model.language_model.layers.1")
    assert dec.kind == "layer" and dec.layer_index == 1 and dec.stack == "model.language_model.layers"
    assert [b.kind for b in dec.blocks] == ["cross_modal_self"]
    assert [g.layer_index for g in est.decoder_layers()] == [0, 1]
    towers = est.towers()
    assert set(towers) >= {"model.vision_tower", "model.language_model"}
    assert towers["model.vision_tower"]["modalities"] == {"image"}
    assert sum(t["flops"] for t in towers.values()) == est.flops
    # decoder layers grow with the image tokens, the vision tower with the patches only
    n_img, n_patch = est.symbol("n_img"), est.symbol("n_patch")
    assert n_img in dec.flops_expr.free_symbols and n_patch not in dec.flops_expr.free_symbols
    assert n_img not in towers["model.vision_tower"]["flops_expr"].free_symbols


def test_kv_cache_reads_heads_before_grouped_query_expansion(estimates):
    est = estimates("llava")  # tiny Llama: 4 query heads, 2 key/value heads, head_dim 16, 2 layers
    b, length = 2, est.symbols[est.symbol("n_img")] + est.symbols[est.symbol("n_txt")]
    assert est.kv_cache_bytes == 2 * 2 * b * length * 2 * 16 * 4
    layer = est.kv_cache.layers[0]
    assert layer["heads_kv"] == 2 and layer["query_heads"] == 4 and layer["head_dim"] == 16
    assert est.kv_cache.bytes_per_token == 2 * 2 * b * 2 * 16 * 4
    B, n_img, n_txt = (est.symbol(s) for s in ("B", "n_img", "n_txt"))
    assert sympy.expand(est.kv_cache_expr - 2 * 2 * B * (n_img + n_txt) * 2 * 16 * 4) == 0


@pytest.mark.parametrize("name,has_kv", [("paligemma", True), ("clip", False), ("vilt", False), ("blip", False)])
def test_kv_cache_only_for_generative_decoders(name, has_kv, estimates):
    est = estimates(name)
    assert (est.kv_cache_bytes > 0) is has_kv
    if not has_kv:
        assert est.kv_cache.note


def test_to_dict_is_json_and_str_is_a_table(estimates):
    est = estimates("llava")
    d = json.loads(json.dumps(est.to_dict()))
    assert d["flops_matmul"] == est.flops_matmul and d["symbols"]["n_img"] == 64
    assert d["peak_activation"]["bytes"] == est.peak_activation_bytes
    assert d["kv_cache"]["bytes"] == est.kv_cache_bytes
    assert {g["name"] for g in d["groups"]} >= {"model.language_model.layers.0", "lm_head"}
    text = str(est)
    assert "model.language_model.layers.0" in text and "KV cache" in text and "FLOPs" in text


def test_uncounted_nodes_are_listed_not_zeroed():
    class M(torch.nn.Module):
        def forward(self, x):
            return torch.lgamma(x @ x.transpose(-1, -2))

    x = torch.rand(2, 4, 4) + 1
    est = graphred.estimate(graphred.capture(M(), x))
    assert [u.op for u in est.uncounted] == ["aten.lgamma.default"]
    assert est.flops_matmul == 2 * 2 * 4 * 4 * 4
    assert "uncounted" in str(est) and est.to_dict()["uncounted"][0]["op"] == "aten.lgamma.default"


# ---------------------------------------------------------------------------------------------
# 5. queries
# ---------------------------------------------------------------------------------------------


def test_flops_as_function_of_and_evaluate(estimates):
    est = estimates("llava")
    f = est.flops_as_function_of("n_img", kind="matmul")
    n_img = est.symbol("n_img")
    assert f.free_symbols == {n_img}
    assert int(f.subs(n_img, 64)) == est.flops_matmul
    assert est.evaluate("flops_matmul", n_img=32) == int(f.subs(n_img, 32))
    assert est.evaluate("flops_matmul", n_img=32) < est.flops_matmul


def test_flops_with_substitution_from_a_layer(estimates):
    est = estimates("llava")
    n = est.symbol("n_img")
    half_from_1 = int(est.flops_with({n: n / 2}, start=1, kind="matmul").subs(est.symbols))
    layer1 = est.group("model.language_model.layers.1")
    lm_head = est.group("lm_head")
    expect = (est.flops_matmul - layer1.flops_matmul - lm_head.flops_matmul
              + int(layer1.flops_matmul_expr.subs(n, n / 2).subs(est.symbols))
              + int(lm_head.flops_matmul_expr.subs(n, n / 2).subs(est.symbols)))
    assert half_from_1 == expect
    assert int(est.flops_with({n: n}, kind="matmul").subs(est.symbols)) == est.flops_matmul


def test_solve_keep_for_reduction_round_trips(estimates):
    est = estimates("llava")
    n = est.symbol("n_img")
    keep = est.solve_keep_for_reduction(0.2, "n_img", start=1)
    assert 0 < keep < 1
    after = float(est.flops_with({n: keep * n}, start=1).subs(est.symbols))
    assert after == pytest.approx(0.8 * est.flops, rel=1e-6)
    tokens = est.solve_tokens_for_reduction(0.3, "n_img")
    assert float(est.flops_with({n: tokens}).subs(est.symbols)) == pytest.approx(0.7 * est.flops, rel=1e-6)
    with pytest.raises(ValueError, match="out of reach"):
        est.solve_keep_for_reduction(0.9, "n_img", start=1)
    layer = est.solve_layer_for_reduction(0.2, keep=0.25)
    assert layer in (0, 1)


# ---------------------------------------------------------------------------------------------
# 6. plans (after): the reduced graph counted, compared with the transformed model run eagerly
# ---------------------------------------------------------------------------------------------


@needs_apply_plan
@pytest.mark.parametrize("name,spec", [
    ("llava", "fastv:layer=1,keep=0.5"),
    ("qwen2-vl", "fastv:layer=1,keep=0.5"),
    ("vilt", "pumer:prune=0.3,merge=0.2"),
    ("llava", "pumer:prune=0.3,merge=0.2"),
    ("paligemma", "pumer:prune=0.3,merge=0.2"),
    ("idefics3", "fastv:layer=1,keep=0.5"),
    ("blip", "pumer:prune=0.3,merge=0.2"),
    ("blip", "tome:r=4"),
    ("clip", "tome:r=4"),
])
def test_after_plan_matches_the_transformed_model(name, spec, zoo_model, zoo_program):
    prog = zoo_program(name)
    model, kwargs = zoo_model(name)
    plan = graphred.plans.parse_plan(spec)
    est = graphred.estimate(prog, plan)
    fast = graphred.transform(prog, plan)
    oracle = count_flops_executed(fast, **kwargs)
    a = est.after
    assert a.flops_matmul == oracle, (name, spec, a.flops_matmul, oracle)
    assert est.speedup == pytest.approx(est.flops / a.flops)
    assert int(a.flops_expr.subs(est.symbols)) == a.flops
    measured = _measured_peak_activations(fast.graph_module, (), kwargs)
    assert a.peak_activation_bytes == measured, (name, spec, a.peak_activation_bytes, measured)
    d = json.loads(json.dumps(est.to_dict()))
    assert d["plan"] == spec and d["after"]["flops"] == a.flops and d["speedup"] == pytest.approx(est.speedup)
    assert f"after {spec}" in str(est)


@needs_apply_plan
def test_fastv_after_expression_is_the_original_cost_under_the_substitution(zoo_program):
    prog = zoo_program("llava")
    est = graphred.estimate(prog, graphred.plans.fastv(layer=1, keep=0.5))
    n = est.symbol("n_img")
    kept = graphred.zoo.info("llava")["image"] - round(0.5 * graphred.zoo.info("llava")["image"])
    # the layer after the cut costs what it cost before, with n_img replaced by the kept count
    before, after = est.group("model.language_model.layers.1"), est.after.group("model.language_model.layers.1")
    assert n in before.flops_expr.free_symbols and n not in after.flops_expr.free_symbols
    assert sympy.expand(after.flops_expr - before.flops_expr.subs(n, kept)) == 0
    assert sympy.expand(after.flops_matmul_expr - before.flops_matmul_expr.subs(n, kept)) == 0
    # layers before the cut and the vision tower are unchanged
    for name in ("model.language_model.layers.0", "model.vision_tower.encoder.layers.0"):
        assert sympy.expand(est.after.group(name).flops_matmul_expr - est.group(name).flops_matmul_expr) == 0, name
    assert est.after.flops < est.flops and est.after.kv_cache_bytes < est.kv_cache_bytes
    assert est.speedup > 1


@needs_apply_plan
def test_plan_that_cannot_apply_raises_the_transform_error(zoo_program):
    prog = zoo_program("clip")
    plan = graphred.plans.fastv(layer=1, keep=0.5)
    with pytest.raises(PlanError) as from_transform:
        graphred.transform(prog, plan)
    with pytest.raises(PlanError) as from_estimate:
        graphred.estimate(prog, plan)
    assert str(from_estimate.value) == str(from_transform.value)


def test_plan_estimates_need_apply_plan(monkeypatch, zoo_program):
    import graphred.passes as passes

    monkeypatch.delattr(passes, "apply_plan", raising=False)
    try:
        import graphred.passes.apply as apply_mod

        monkeypatch.delattr(apply_mod, "apply_plan", raising=False)
    except ImportError:
        pass
    with pytest.raises(PlanError, match="plan estimates need graphred.passes.apply_plan"):
        graphred.estimate(zoo_program("llava"), graphred.plans.fastv(layer=1, keep=0.5))


def test_plan_must_be_a_plan(zoo_program):
    with pytest.raises(PlanError, match="Plan"):
        graphred.estimate(zoo_program("llava"), "fastv:layer=1,keep=0.5")


@needs_apply_plan
def test_sweep_table(zoo_program):
    table = sweep(zoo_program("llava"), ["fastv:layer=1,keep=0.5", graphred.plans.fastv(layer=1, keep=0.25)])
    rows = list(table)
    assert [r["plan"] for r in rows] == ["none", "fastv:layer=1,keep=0.5", "fastv:layer=1,keep=0.25"]
    assert rows[0]["speedup"] == 1.0 and rows[2]["flops"] < rows[1]["flops"] < rows[0]["flops"]
    assert "fastv:layer=1,keep=0.25" in str(table)
    json.dumps(table.to_dict())


# ---------------------------------------------------------------------------------------------
# 7. config directories on the meta device
# ---------------------------------------------------------------------------------------------


def test_meta_config_dir_estimates_like_the_cpu_model(tmp_path):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    cfg = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                       image_size=32, patch_size=8, projection_dim=32),
        text_config=LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                pad_token_id=0, bos_token_id=1, eos_token_id=2),
        image_token_index=127, image_seq_length=16, vision_feature_layer=-2, vision_feature_select_strategy="default",
    )
    cfg.save_pretrained(tmp_path)
    meta = estimate_model(tmp_path)
    model, kwargs = zoo.from_config_dir(tmp_path, device="cpu")
    cpu = graphred.estimate(graphred.capture(model, **kwargs))
    assert {s.name: v for s, v in meta.symbols.items()} == {s.name: v for s, v in cpu.symbols.items()}
    assert meta.symbols[meta.symbol("n_img")] == 16
    for attr in ("flops", "flops_matmul", "peak_activation_bytes", "kv_cache_bytes", "weight_bytes"):
        assert getattr(meta, attr) == getattr(cpu, attr), attr
    assert sympy.expand(meta.flops_expr - cpu.flops_expr) == 0


def test_unknown_architecture_in_config_dir_is_a_clear_config_error(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertModel"]}))
    with pytest.raises(graphred.ConfigError, match="model types: .*llava"):
        estimate_model(tmp_path)


def _llava15_config(tmp_path, hidden=4096, layers=32, heads=32, inter=11008):
    graphred.zoo.llava15_config(hidden, layers, heads, inter).save_pretrained(tmp_path)
    return tmp_path


def test_llava15_7b_config_estimate_equals_the_hand_count(tmp_path):
    """A full-size config, estimated on the meta device (no weights allocated); no timing here (timings live
    in bench/)."""
    path = _llava15_config(tmp_path)
    est = estimate_model(os.fspath(path))
    v = {s.name: n for s, n in est.symbols.items()}
    assert v["n_img"] == 576 and v["n_patch"] == 576
    B, L, T = v["B"], v["n_img"] + v["n_txt"], 577
    h, I, V, hv, iv = 4096, 11008, 32064, 1024, 4096
    # matrix-product FLOPs by hand: CLIP ViT-L/14-336 (all 24 layers run), projector, Llama-2-7B, lm_head
    vision = 2 * B * 576 * (3 * 14 * 14) * hv + 24 * (8 * B * T * hv * hv + 4 * B * T * hv * iv + 4 * B * T * T * hv)
    projector = 2 * B * 576 * hv * h + 2 * B * 576 * h * h
    decoder = 32 * (8 * B * L * h * h + 6 * B * L * h * I + 4 * B * L * L * h)
    lm_head = 2 * B * L * h * V
    assert est.flops_matmul == vision + projector + decoder + lm_head
    assert est.kv_cache_bytes == 32 * 2 * B * L * 32 * 128 * 4  # fp32 config: 4 bytes per element
    assert len(est.kv_cache.layers) == 32
    assert 6.5e9 * 4 < est.weight_bytes < 7.5e9 * 4
    assert est.peak_activation_bytes > 0 and not est.uncounted


@needs_apply_plan
def test_plan_on_a_meta_device_program(tmp_path):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                       image_size=32, patch_size=8, projection_dim=32),
        text_config=LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                pad_token_id=0, bos_token_id=1, eos_token_id=2),
        image_token_index=127, image_seq_length=16, vision_feature_layer=-1, vision_feature_select_strategy="default",
    ).save_pretrained(tmp_path)
    est = estimate_model(tmp_path, graphred.plans.fastv(layer=2, keep=0.5))
    assert est.after.flops < est.flops  # the plan applies to a graph with no weights at all


def test_decode_cost_follows_the_per_layer_cache_lengths(zoo_program):
    """Per-token decode cost: the weights once per token, attention proportional to each layer's cache."""
    from graphred.analysis.cost.decode import decode_speedup
    from graphred.plans import fastv

    prog = zoo_program("llava")
    est = graphred.estimate(prog, fastv(layer=1, keep=0.5))
    before, after = est.decode, est.after.decode
    assert before.weight_elements == after.weight_elements > 0
    kv_lengths = [info["k_shape"][2] for info in est.after.kv_cache.layers]
    assert after.cache_lengths == kv_lengths and after.cache_lengths[1] < before.cache_lengths[1]
    # one more key in layer 1 costs 4 * heads * head_dim FLOPs per sample
    layer = after.layers[1]
    grown = after.flops([after.cache_lengths[0] + 1, after.cache_lengths[1] + 2])
    assert grown - after.flops() == after.batch * 4 * layer["heads"] * layer["head_dim"]
    B = next(x for x in after.flops_expr.free_symbols if x.name == "B")
    values = {**dict(zip(after.symbols, [n + 1 for n in after.cache_lengths])), B: after.batch}
    assert int(after.flops_expr.subs(values)) == after.flops()
    s = decode_speedup(est, new_tokens=32)
    assert s == pytest.approx(before.mean_flops(32) / after.mean_flops(32)) and 1.0 < s < est.speedup
