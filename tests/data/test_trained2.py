"""The shipped ``vqa2-*`` models (cluttered 224 px scenes, 196 image tokens) load by name through the
same API as ``vqa-llava`` and reach their recorded accuracy on the shipped test scenes."""
from __future__ import annotations

import functools

import pytest

from graphred.data import models, scenes2

TOLERANCE = 0.015  # BLAS differences may flip a few near-tied answers of the 200
SHIPPED = [n for n in models.MODEL_NAMES_V2 + models.MODEL_NAMES_V2_DEEP if models.weights_paths(n)[1].is_file()]


@functools.lru_cache(maxsize=None)
def _shipped() -> scenes2.SceneSet2:
    return models.shipped_scenes("vqa2-llava")


def test_the_decoder_and_cross_attention_models_ship():
    assert {"vqa2-llava", "vqa2-blip"} <= set(SHIPPED)


def test_the_deep_decoder_ships_with_the_same_tower_and_a_deeper_decoder():
    assert "vqa2-llava-deep" in SHIPPED
    deep, base = (models.metadata(n)["config"] for n in ("vqa2-llava-deep", "vqa2-llava"))
    assert deep["text_config"]["num_hidden_layers"] == models.DEEP_DECODER_LAYERS
    assert base["text_config"]["num_hidden_layers"] < models.DEEP_DECODER_LAYERS
    assert deep["vision_config"] == base["vision_config"]
    assert models.family("vqa2-llava-deep") == "llava" and models.image_tokens("vqa2-llava-deep") == 196


@pytest.mark.parametrize("name", SHIPPED)
def test_vqa2_model_loads_by_name(name):
    model, tok = models.load_trained(name)
    assert not model.training and tok == scenes2.tokenizer()
    assert models.metadata(name)["weights"]["bytes"] < 20e6
    data = _shipped()
    pred = models.predict(model, name, data, batch_size=8, tokenizer=tok, limit=8)
    assert pred.shape == (8,) and int(pred.max()) < len(scenes2.ANSWERS)


def test_vqa2_decoder_reaches_its_recorded_accuracy(name="vqa2-llava"):
    model, tok = models.load_trained(name)
    assert not model.training and tok == scenes2.tokenizer()
    meta = models.metadata(name)
    assert meta["weights"]["bytes"] < 20e6
    data = _shipped()
    kw = models.build_inputs(name, tok, data, data.questions[:2])
    assert kw["pixel_values"].shape[-1] == 224
    pred = models.predict(model, name, data, batch_size=100, tokenizer=tok)
    acc = models.accuracy_by_kind(data, pred, tok)
    assert acc["all"] == pytest.approx(meta["accuracy"]["shipped"], abs=TOLERANCE)
    assert meta["accuracy"]["test_questions"] == 1200
