"""The shipped trained VQA models: they load, reach their recorded accuracy on the shipped test
scenes, evaluate the same through any callable, and bad weight files fail loudly."""
from __future__ import annotations

import functools
import json
import shutil

import pytest
import torch

from graphred.data import models, scenes
from graphred.errors import GraphredError

# shipped accuracies are recomputed here; BLAS differences between machines may flip a few
# near-tied answers, never more than this
TOLERANCE = 0.01


@functools.lru_cache(maxsize=None)
def _loaded(name: str):
    return models.load_trained(name)


@functools.lru_cache(maxsize=None)
def _shipped() -> scenes.SceneSet:
    return scenes.load_shipped()


@functools.lru_cache(maxsize=None)
def _predictions(name: str) -> torch.Tensor:
    model, tok = _loaded(name)
    return models.predict(model, name, _shipped(), batch_size=200, tokenizer=tok)


@pytest.mark.parametrize("name", models.MODEL_NAMES)
def test_shipped_model_reaches_its_recorded_accuracy(name):
    model, tok = _loaded(name)
    assert not model.training
    assert tok == scenes.SceneTokenizer()
    meta = models.metadata(name)
    acc = models.accuracy_by_kind(_shipped(), _predictions(name), tok)
    assert acc["all"] == pytest.approx(meta["accuracy"]["shipped"], abs=TOLERANCE)
    for kind, value in meta["accuracy"]["shipped_by_kind"].items():
        assert acc[kind] == pytest.approx(value, abs=3 * TOLERANCE), kind
    # far above what the answer priors give (about a third)
    assert acc["all"] > 0.6
    assert meta["accuracy"]["test"] > 0.6 and meta["accuracy"]["test_questions"] == 4000


@pytest.mark.parametrize("name", models.MODEL_NAMES)
def test_evaluate_takes_any_callable_with_the_model_kwargs(name):
    model, tok = _loaded(name)
    small = _shipped().subset(25)
    seen = {}

    def as_tuple(**kwargs):  # a transformed model may return a tuple or a dict
        seen.update(kwargs)
        return (model(**kwargs).logits,)

    expected = float((_predictions(name)[: len(small)] == torch.tensor(
        [tok.answer_index(q.answer) for q in small.questions])).float().mean())
    assert models.evaluate(as_tuple, name, small, batch_size=32, tokenizer=tok) == pytest.approx(expected)
    assert models.evaluate(lambda **kw: {"logits": model(**kw).logits}, name, small, 50) == pytest.approx(expected)
    if name == "vqa-llava":
        assert seen["input_ids"].shape[1] == models.text_length(name) + 49
        assert (seen["input_ids"][:, -1] != tok.pad_id).all()  # left padding: the last token is real
        assert seen["use_cache"] is False
    else:
        assert seen["input_ids"].shape[1] == models.text_length(name)
        assert (seen["input_ids"][:, 0] == tok.cls_id).all()


def test_model_mode_is_restored_and_results_repeat():
    model, tok = _loaded("vqa-vilt")
    small = _shipped().subset(10)
    model.train()
    try:
        a = models.predict(model, "vqa-vilt", small, 16, tokenizer=tok)
        assert model.training
        b = models.predict(model, "vqa-vilt", small, 16, tokenizer=tok)
    finally:
        model.eval()
    assert torch.equal(a, b)


def _copy(name: str, tmp_path):
    st, js = models.weights_paths(name)
    shutil.copy(st, tmp_path / st.name)
    shutil.copy(js, tmp_path / js.name)
    return tmp_path / st.name, tmp_path / js.name


def _reseal(st, js):
    """Make the JSON's checksum match the (damaged) weights, to reach the later checks."""
    meta = json.loads(js.read_text())
    meta["weights"]["sha256"] = models._sha256(st)
    js.write_text(json.dumps(meta))


def test_flipped_bytes_fail_the_checksum(tmp_path):
    st, js = _copy("vqa-blip", tmp_path)
    data = bytearray(st.read_bytes())
    data[len(data) // 2] ^= 0xFF
    st.write_bytes(bytes(data))
    with pytest.raises(models.WeightsError, match="corrupt"):
        models.load_trained("vqa-blip", tmp_path)


def test_truncated_weights_are_an_error_not_a_random_init(tmp_path):
    st, js = _copy("vqa-vilt", tmp_path)
    st.write_bytes(st.read_bytes()[: st.stat().st_size // 3])
    _reseal(st, js)
    with pytest.raises(models.WeightsError, match="cannot read"):
        models.load_trained("vqa-vilt", tmp_path)


def test_weights_of_another_model_do_not_match(tmp_path):
    st, js = _copy("vqa-llava", tmp_path)
    other, _ = models.weights_paths("vqa-blip")
    shutil.copy(other, st)
    _reseal(st, js)
    with pytest.raises(models.WeightsError, match="does not match"):
        models.load_trained("vqa-llava", tmp_path)


def test_shape_mismatch_is_named(tmp_path):
    from safetensors.torch import load_file, save_file

    st, js = _copy("vqa-blip", tmp_path)
    state = load_file(str(st))
    state["answer_head.weight"] = state["answer_head.weight"][:-1]
    state["answer_head.bias"] = state["answer_head.bias"][:-1]
    save_file(state, str(st))
    _reseal(st, js)
    with pytest.raises(models.WeightsError, match="answer_head"):
        models.load_trained("vqa-blip", tmp_path)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(models.WeightsError, match="missing"):
        models.load_trained("vqa-vilt", tmp_path)
    st, js = _copy("vqa-vilt", tmp_path)
    st.unlink()
    with pytest.raises(models.WeightsError, match="missing"):
        models.load_trained("vqa-vilt", tmp_path)
    js.write_text("{not json")
    with pytest.raises(models.WeightsError, match="JSON"):
        models.load_trained("vqa-vilt", tmp_path)
    with pytest.raises(GraphredError, match="unknown trained model"):
        models.load_trained("vqa-nope")


def test_save_and_load_roundtrip(tmp_path):
    tok = scenes.SceneTokenizer()
    torch.manual_seed(0)
    model = models.build_model("vqa-blip")
    config = models.default_config("vqa-blip", tok)
    models.save_trained("vqa-blip", model, tok, config, info={"accuracy": {}}, directory=tmp_path)
    loaded, tok2 = models.load_trained("vqa-blip", tmp_path)
    assert tok2 == tok
    kwargs = models.build_inputs("vqa-blip", tok, _shipped(), _shipped().questions[:3])
    with torch.no_grad():
        assert torch.equal(model(**kwargs).logits, loaded(**kwargs).logits)
