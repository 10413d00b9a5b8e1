"""The zoo: tiny seeded models with valid example inputs; local model directories."""
from __future__ import annotations

import json
import os

import pytest
import torch

import graphred
from graphred import zoo

REQUIRED = ["llava", "paligemma", "idefics3", "qwen2-vl", "vilt", "blip", "clip", "siglip", "llava-bench"]
DECODERS = {"llava", "paligemma", "idefics3", "qwen2-vl"}
UNEVEN = {"gemma3", "mistral3", "aya-vision", "internvl"}  # decoders whose samples hold different image counts


def test_names():
    assert set(REQUIRED) <= set(zoo.names())
    assert "llava-bench" in zoo.names()
    assert "llava-bench" not in zoo.names(include_bench=False)
    assert zoo.TEST_NAMES == [n for n in zoo.names(include_bench=False) if n not in zoo.FAMILY_NAMES]
    assert zoo.is_bench("llava-bench") and not zoo.is_bench("llava")
    for n in zoo.names():
        line = zoo.describe(n)
        assert isinstance(line, str) and line and "\n" not in line


def test_unknown_name():
    with pytest.raises(graphred.ConfigError, match="llava"):
        zoo.load("no-such-model")
    with pytest.raises(graphred.ConfigError, match="Zoo models: .*clip"):
        zoo.resolve("no-such-model")


def test_model_and_inputs(zoo_name, zoo_model):
    model, kwargs = zoo_model(zoo_name)
    info = zoo.info(zoo_name)
    assert type(model).__name__ == info["class"]
    assert not any(m.training for m in model.modules()), "zoo models are in eval mode"
    n_params = sum(p.numel() for p in model.parameters())
    assert n_params < 2_000_000, f"{zoo_name} is not tiny: {n_params} parameters"
    ids, mask = kwargs["input_ids"], kwargs["attention_mask"]
    assert ids.shape[0] == 2 and ids.dtype == torch.long and mask.shape == ids.shape
    # exactly one sample carries text padding, on the side the architecture pads
    assert mask[0].all() and not mask[1].all()
    pad = int((mask[1] == 0).sum())
    if zoo_name in DECODERS | UNEVEN:
        assert info["padding"] == "left" and not mask[1, :pad].any() and mask[1, pad:].all()
        assert kwargs.get("use_cache") is False
        image_id = model.config.image_token_id
        per_sample = (ids == image_id).sum(dim=1)
        if zoo_name in UNEVEN:
            assert per_sample.tolist() == info["image_per_sample"] and len(set(per_sample.tolist())) == 2
            assert info["image"] == max(info["image_per_sample"])
        else:
            assert per_sample.tolist() == [info["image"]] * 2, "both samples hold the same number of image tokens"
        assert ids.shape[1] == info["image"] + info["text"]
    else:
        assert info["padding"] == "right" and mask[1, : ids.shape[1] - pad].all() and not mask[1, -pad:].any()
        assert ids.shape[1] == info["text"]
    assert 16 <= info["image"] <= 65


def test_seeded():
    a_model, a_kwargs = zoo.load("clip", seed=0)
    b_model, b_kwargs = zoo.load("clip", seed=0)
    c_model, c_kwargs = zoo.load("clip", seed=1)
    sa, sb, sc = a_model.state_dict(), b_model.state_dict(), c_model.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert all(torch.equal(a_kwargs[k], b_kwargs[k]) for k in a_kwargs)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)
    assert not torch.equal(a_kwargs["pixel_values"], c_kwargs["pixel_values"])
    # loading does not disturb the caller's RNG
    torch.manual_seed(123)
    want = torch.rand(3)
    torch.manual_seed(123)
    zoo.load("clip")
    assert torch.equal(torch.rand(3), want)


def test_llava_uses_gqa_and_sdpa(zoo_model):
    model, _ = zoo_model("llava")
    text = model.config.text_config
    assert text.num_key_value_heads < text.num_attention_heads
    assert model.config._attn_implementation == "sdpa"


def test_qwen2_vl_inputs(zoo_model):
    model, kwargs = zoo_model("qwen2-vl")
    assert {"mm_token_type_ids", "image_grid_thw", "position_ids"} <= set(kwargs)
    assert torch.equal(kwargs["mm_token_type_ids"].bool(), kwargs["input_ids"] == model.config.image_token_id)
    assert kwargs["position_ids"].shape == (3, *kwargs["input_ids"].shape)


def test_llava_bench():
    model, kwargs = zoo.load("llava-bench")
    info = zoo.info("llava-bench")
    assert info["image"] == 576 and info["batch"] == 4 and 32 <= info["text"] <= 48
    text = model.config.text_config
    assert 6 <= text.num_hidden_layers <= 8 and 256 <= text.hidden_size <= 512
    ids = kwargs["input_ids"]
    assert ids.shape[0] == 4
    assert (ids == model.config.image_token_id).sum(dim=1).tolist() == [576] * 4


def _save_config(name: str, path) -> object:
    model, _ = zoo.load(name)
    model.config.save_pretrained(path)
    return model


@pytest.mark.parametrize("name", ["llava", "qwen2-vl", "clip"])
def test_from_config_dir_meta(name, tmp_path):
    original = _save_config(name, tmp_path)
    model, kwargs = zoo.from_config_dir(tmp_path, device="meta")
    assert type(model) is type(original)
    assert all(p.device.type == "meta" for p in model.parameters())
    assert all(v.device.type == "meta" for v in kwargs.values() if isinstance(v, torch.Tensor))
    assert set(kwargs) == set(zoo.load(name)[1])
    if name == "llava":
        prog = graphred.capture(model, **kwargs)  # meta: no memory, still a graph
        assert prog.model_class == "LlavaForConditionalGeneration"


def test_from_config_dir_cpu_loads_weights(tmp_path):
    model, kwargs = zoo.load("clip", seed=5)
    model.save_pretrained(tmp_path)
    loaded, loaded_kwargs = zoo.from_config_dir(tmp_path, device="cpu")
    sa, sb = model.state_dict(), loaded.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    with torch.no_grad():
        assert torch.equal(model(**loaded_kwargs).logits_per_image, loaded(**loaded_kwargs).logits_per_image)
    m, k, name = zoo.resolve(str(tmp_path))
    assert name == os.path.basename(tmp_path) and next(m.parameters()).device.type == "cpu"


def test_from_config_dir_errors(tmp_path):
    with pytest.raises(graphred.ConfigError, match="config.json"):
        zoo.from_config_dir(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "not-a-model-type"}))
    with pytest.raises(graphred.ConfigError, match="llava"):
        zoo.from_config_dir(tmp_path)
    # a model type transformers knows but the zoo has no input builder for
    from transformers import BertConfig

    bert = tmp_path / "bert"
    BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64).save_pretrained(bert)
    with pytest.raises(graphred.ConfigError, match=r"'bert'.*model types: .*llava"):
        zoo.from_config_dir(bert)
    with pytest.raises(graphred.ConfigError, match="neither a zoo model"):
        zoo.resolve(str(tmp_path / "missing"))
