"""Shared test fixtures: every zoo model is built and captured at most once per test session.

Use the fixtures, which hand out the cached functions::

    def test_something(zoo_model, zoo_program):
        model, kwargs = zoo_model("llava")      # built once per session
        prog = zoo_program("llava")             # captured once per session

or parametrise over the zoo with the ``zoo_name`` fixture (every name in ``zoo.TEST_NAMES``).

The cached models, inputs and programs are shared by every test: treat them as read-only. A
test that needs to change a model builds its own with ``graphred.zoo.load(name)``.

``zoo_program(name)`` is captured from a private copy of the model (same seed, so the same
weights and inputs as ``zoo_model(name)``) that no test runs, with a snapshot of it taken just
before capture: ``zoo_capture(name)`` returns ``(model, kwargs, snapshot, program)`` for tests
that check capture left the model unchanged, without capturing a second time. The
``model_state`` fixture gives ``snapshot(model)`` and ``assert_unchanged(model, snapshot)``,
for any test that must show something leaves a model as it was.
"""
from __future__ import annotations

import functools
import os
import types

import pytest
import torch
import torch.nn as nn

import graphred
from graphred import zoo

# The suite runs in two pytest-xdist workers (Makefile: ``-n 2 --dist loadfile``), one per core: give each
# worker one intra-op thread, so that two workers do not fight over two cores with four threads.
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)

# ------------------------------------------------------------------- model state snapshots

_HOOK_DICTS = (
    "_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs", "_backward_hooks", "_backward_pre_hooks", "_state_dict_hooks",
    "_state_dict_pre_hooks", "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks",
)
_GLOBAL_HOOKS = (
    "_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks", "_global_backward_pre_hooks",
    "_global_forward_hooks_always_called", "_global_module_registration_hooks",
    "_global_parameter_registration_hooks", "_global_buffer_registration_hooks",
)


def _bits(t: torch.Tensor) -> torch.Tensor:
    t = t.detach().reshape(-1).contiguous().clone()
    return t.view(torch.uint8) if t.dtype != torch.bool else t


def snapshot_model(model: nn.Module) -> dict:
    """Everything that must stay as it was, by object identity where it can be."""
    import torch.nn.modules.module as module_mod

    config = getattr(model, "config", None)
    return {
        "class": type(model),
        "modules": {
            name: {
                "class": type(m),
                "dict": dict(m.__dict__),  # shallow: values compared by identity
                "training": m.training,
                "hooks": {h: dict(getattr(m, h, {})) for h in _HOOK_DICTS},
            }
            for name, m in model.named_modules(remove_duplicate=False)
        },
        "params": [(n, p, p.requires_grad) for n, p in model.named_parameters(remove_duplicate=False)],
        "buffers": [(n, b) for n, b in model.named_buffers(remove_duplicate=False)],
        "state": {k: (v.dtype, tuple(v.shape), _bits(v)) for k, v in model.state_dict().items()},
        "config": config.to_dict() if hasattr(config, "to_dict") else None,
        "global_hooks": {h: dict(getattr(module_mod, h, {})) for h in _GLOBAL_HOOKS},
    }


def assert_model_unchanged(model: nn.Module, before: dict) -> None:
    """Same class, same submodules, same ``__dict__`` keys and attribute objects, no hooks added
    (per module or global), same training flags, same parameter and buffer objects, state_dict
    bit-equal, same config."""
    after = snapshot_model(model)
    assert after["class"] is before["class"], "model class swapped"
    assert after["modules"].keys() == before["modules"].keys(), "submodules added or removed"
    for name, b in before["modules"].items():
        a = after["modules"][name]
        where = name or "<root>"
        assert a["class"] is b["class"], f"{where}: class swapped"
        assert a["dict"].keys() == b["dict"].keys(), (
            f"{where}: __dict__ keys changed: +{set(a['dict']) - set(b['dict'])} -{set(b['dict']) - set(a['dict'])}"
        )
        rebound = [k for k in b["dict"] if a["dict"][k] is not b["dict"][k]]
        assert not rebound, f"{where}: attributes rebound: {rebound}"
        assert a["training"] == b["training"], f"{where}: training flag changed"
        for h in _HOOK_DICTS:
            assert a["hooks"][h].keys() == b["hooks"][h].keys(), f"{where}: {h} changed"
    assert [n for n, *_ in after["params"]] == [n for n, *_ in before["params"]], "parameters renamed"
    for (n, p, rg), (_, p0, rg0) in zip(after["params"], before["params"]):
        assert p is p0, f"parameter {n} replaced"
        assert rg == rg0, f"parameter {n}: requires_grad changed"
    assert [n for n, _ in after["buffers"]] == [n for n, _ in before["buffers"]], "buffers renamed"
    for (n, b), (_, b0) in zip(after["buffers"], before["buffers"]):
        assert b is b0, f"buffer {n} replaced"
    assert after["state"].keys() == before["state"].keys()
    for k, (dtype, shape, bits) in before["state"].items():
        dtype2, shape2, bits2 = after["state"][k]
        assert (dtype2, shape2) == (dtype, shape) and torch.equal(bits2, bits), f"state_dict[{k!r}] changed"
    assert after["config"] == before["config"], "model.config changed"
    for h in _GLOBAL_HOOKS:
        assert after["global_hooks"][h].keys() == before["global_hooks"][h].keys(), f"global {h} changed"


# ------------------------------------------------------------------- zoo caches


@functools.lru_cache(maxsize=None)
def cached_zoo_model(name: str):
    """(model, kwargs) of zoo model ``name``, built once per session."""
    return zoo.load(name)


@functools.lru_cache(maxsize=None)
def cached_zoo_capture(name: str):
    """(private model, kwargs, snapshot before capture, Program), captured once per session."""
    model, kwargs = zoo.load(name)
    before = snapshot_model(model)
    prog = graphred.capture(model, **kwargs)
    prog.name = prog.name or name
    return model, kwargs, before, prog


def cached_zoo_program(name: str) -> graphred.Program:
    """The :class:`graphred.Program` of zoo model ``name``, captured once per session."""
    return cached_zoo_capture(name)[3]


@pytest.fixture(scope="session")
def zoo_model():
    """``zoo_model(name) -> (model, kwargs)``, cached for the session (read-only)."""
    return cached_zoo_model


@pytest.fixture(scope="session")
def zoo_program():
    """``zoo_program(name) -> Program``, cached for the session (read-only)."""
    return cached_zoo_program


@pytest.fixture(scope="session")
def zoo_capture():
    """``zoo_capture(name) -> (model, kwargs, snapshot, Program)``: the captured private model and
    its state just before capture (read-only)."""
    return cached_zoo_capture


@pytest.fixture(scope="session")
def model_state():
    """``model_state.snapshot(model)`` and ``model_state.assert_unchanged(model, snapshot)``."""
    return types.SimpleNamespace(snapshot=snapshot_model, assert_unchanged=assert_model_unchanged)


@pytest.fixture(params=zoo.TEST_NAMES, scope="session")
def zoo_name(request) -> str:
    """Each zoo model meant for tests (the benchmark presets left out)."""
    return request.param
