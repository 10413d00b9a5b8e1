"""graphred.capture: captured programs compute what the model computes, the model is never
changed (not on success, not on failure), and bad input gives a CaptureError that says why."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.utils._pytree as pytree

import graphred
from graphred import zoo

def _tensor_leaves(out):
    """Tensor leaves in key-path order (a ModelOutput's keys may be inserted in another order by the capture:
    every tensor is still compared with the one at the same path)."""
    leaves, spec = pytree.tree_flatten_with_path(out)
    leaves = sorted(leaves, key=lambda kv: pytree.keystr(kv[0]))
    return [x for _, x in leaves if isinstance(x, torch.Tensor)], spec


def _run(fn, kwargs):
    torch.manual_seed(0)  # ViLT samples its patch order with torch.multinomial
    with torch.no_grad():
        return fn(**kwargs)


def test_captured_equals_eager(zoo_name, zoo_model, zoo_program):
    model, kwargs = zoo_model(zoo_name)
    prog = zoo_program(zoo_name)
    assert isinstance(prog, graphred.Program) and prog.model_class == type(model).__name__
    eager_out, prog_out = _run(model, kwargs), _run(prog, kwargs)
    assert type(prog_out) is type(eager_out)
    want, _ = _tensor_leaves(eager_out)
    got, _ = _tensor_leaves(prog_out)
    assert want and len(got) == len(want), f"{len(got)} output tensors, eager has {len(want)}"
    for i, (g, w) in enumerate(zip(got, want)):
        assert g.shape == w.shape and g.dtype == w.dtype, f"output {i}"
        torch.testing.assert_close(g, w, rtol=0, atol=0, msg=lambda m: f"{zoo_name} output {i}: {m}")


def test_program_runs_on_its_example_inputs(zoo_model, zoo_program):
    model, kwargs = zoo_model("clip")
    want, _ = _tensor_leaves(_run(model, kwargs))
    got, _ = _tensor_leaves(_run(zoo_program("clip"), {}))
    assert want and len(got) == len(want)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=0)


def test_capture_leaves_model_unchanged(zoo_name, zoo_capture, model_state):
    model, kwargs, before, prog = zoo_capture(zoo_name)  # the model zoo_program was captured from
    model_state.assert_unchanged(model, before)


def test_capture_leaves_model_unchanged_after_eager_run(model_state):
    """Hugging Face models install output-capturing hooks on their first call; capture after an
    eager run keeps the hooks and the model exactly as they were too."""
    model, kwargs = zoo.load("llava")
    with torch.no_grad():
        model(**kwargs)
    before = model_state.snapshot(model)
    graphred.capture(model, **kwargs)
    model_state.assert_unchanged(model, before)
    with torch.no_grad():
        model(**kwargs)  # and it still runs


# ------------------------------------------------------------------------------ bad input


@pytest.fixture
def clip(model_state):
    model, kwargs = zoo.load("clip")
    return model, kwargs, model_state.snapshot(model)


@pytest.fixture
def assert_unchanged(model_state):
    return model_state.assert_unchanged


def test_not_a_module():
    with pytest.raises(graphred.CaptureError, match="torch.nn.Module"):
        graphred.capture(lambda x: x, x=torch.ones(2))
    with pytest.raises(graphred.CaptureError, match="torch.nn.Module"):
        graphred.capture("llava", input_ids=torch.ones(1, 2, dtype=torch.long))


def test_no_inputs(clip, assert_unchanged):
    model, _, before = clip
    with pytest.raises(graphred.CaptureError, match="example inputs"):
        graphred.capture(model)
    assert_unchanged(model, before)


@pytest.mark.parametrize("bad", ["pixel_valuez", "atention_mask", "not_an_input"])
def test_wrong_kwarg_name(clip, assert_unchanged, bad):
    model, kwargs, before = clip
    kwargs = dict(kwargs)
    kwargs[bad] = kwargs.pop("pixel_values") if bad == "pixel_valuez" else kwargs["attention_mask"]
    with pytest.raises(graphred.CaptureError, match=bad):
        graphred.capture(model, **kwargs)
    assert_unchanged(model, before)


def test_wrong_kwarg_name_plain_module(model_state, assert_unchanged):
    model = nn.Linear(4, 4)
    before = model_state.snapshot(model)
    with pytest.raises(graphred.CaptureError, match="Linear"):
        graphred.capture(model, inputs=torch.ones(2, 4))
    assert_unchanged(model, before)


def test_forward_raises(clip, assert_unchanged):
    model, kwargs, before = clip
    kwargs = dict(kwargs, pixel_values=torch.randn(2, 3, 17))  # no H x W image
    with pytest.raises(graphred.CaptureError, match="CLIPModel") as err:
        graphred.capture(model, **kwargs)
    assert "fails on the given inputs" in str(err.value)
    assert_unchanged(model, before)


def test_forward_raises_decoder(model_state, assert_unchanged):
    model, kwargs = zoo.load("llava")
    before = model_state.snapshot(model)
    kwargs = dict(kwargs, pixel_values=kwargs["pixel_values"][:, :, :16, :16])  # 16 px: fewer image features than tokens
    with pytest.raises(graphred.CaptureError, match="LlavaForConditionalGeneration"):
        graphred.capture(model, **kwargs)
    assert_unchanged(model, before)


class _Opaque:
    pass


@pytest.mark.parametrize("value", [_Opaque(), {1, 2}, b"bytes"], ids=["object", "set", "bytes"])
def test_unsupported_input_type(clip, assert_unchanged, value):
    model, kwargs, before = clip
    with pytest.raises(graphred.CaptureError, match="pixel_values"):
        graphred.capture(model, **dict(kwargs, pixel_values=value))
    assert_unchanged(model, before)


def test_unsupported_input_type_numpy(clip, assert_unchanged):
    np = pytest.importorskip("numpy")
    model, kwargs, before = clip
    with pytest.raises(graphred.CaptureError, match="ndarray"):
        graphred.capture(model, **dict(kwargs, pixel_values=kwargs["pixel_values"].numpy()))
    assert_unchanged(model, before)


def test_failure_then_success(clip, assert_unchanged):
    """A failed capture leaves nothing behind that changes the next one."""
    model, kwargs, before = clip
    with pytest.raises(graphred.CaptureError):
        graphred.capture(model, **dict(kwargs, pixel_values=torch.randn(2, 3, 17)))
    prog = graphred.capture(model, **kwargs)
    want, _ = _tensor_leaves(_run(model, kwargs))
    got, _ = _tensor_leaves(_run(prog, kwargs))
    assert want and len(got) == len(want)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=0)
    assert_unchanged(model, before)
