"""General fixes found by bench/unseen_families.py on the third fresh held-out set (fresh3), each on a tiny
synthetic model, after the set was measured untouched:

* an input that a forward's ``**kwargs`` passes down to a submodule, whose name is close to one of the forward's
  own parameters (DiffusionGemma: ``image_position_ids`` beside ``position_ids``): an input, not a misspelling
  (before, capture rejected it with "did you mean 'position_ids'?"); a real misspelling is still rejected.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

import graphred
from graphred.errors import CaptureError


class _Tower(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 8)
        self.pos = nn.Embedding(16, 8)

    def forward(self, pixel_values, image_position_ids=None):
        x = self.proj(pixel_values)
        return x if image_position_ids is None else x + self.pos(image_position_ids)


class _PassDown(nn.Module):
    """``forward(input_ids, position_ids=None, **kwargs)`` hands ``**kwargs`` to its tower."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(16, 8)
        self.tower = _Tower()

    def forward(self, input_ids, pixel_values, position_ids=None, **kwargs):
        x = self.embed(input_ids)
        if position_ids is not None:
            x = x + position_ids.unsqueeze(-1)
        return torch.cat([self.tower(pixel_values, **kwargs), x], 1)


def _pass_down_inputs():
    g = torch.Generator().manual_seed(0)
    return {"input_ids": torch.randint(0, 16, (2, 5), generator=g),
            "pixel_values": torch.randn(2, 3, 4, generator=g),
            "image_position_ids": torch.arange(3).expand(2, 3).clone()}


def test_input_passed_down_through_kwargs_is_not_a_misspelling():
    model, kwargs = _PassDown().eval(), _pass_down_inputs()
    prog = graphred.capture(model, **kwargs)
    with torch.no_grad():
        assert torch.equal(prog(**kwargs), model(**kwargs))
    # the input is used: another value changes the output
    other = dict(kwargs, image_position_ids=kwargs["image_position_ids"] + 1)
    with torch.no_grad():
        assert not torch.equal(prog(**other), prog(**kwargs))


def test_misspelt_input_beside_kwargs_still_rejected():
    model, kwargs = _PassDown().eval(), _pass_down_inputs()
    kwargs["positon_ids"] = kwargs.pop("image_position_ids")
    with pytest.raises(CaptureError, match="did you mean 'position_ids'"):
        graphred.capture(model, **kwargs)
