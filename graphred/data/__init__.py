"""Data graphred ships for its accuracy benchmark and demo.

- :mod:`graphred.data.scenes`: grid scenes of real Fashion-MNIST photographs with templated
  questions (a small VQA set), its word tokenizer, and a packaged 300-scene test subset.
- :mod:`graphred.data.models`: the three VQA models graphred trained itself on those scenes
  (``vqa-llava``, ``vqa-vilt``, ``vqa-blip``), ``load_trained`` and ``evaluate``.
"""
from __future__ import annotations

import importlib

__all__ = ["models", "scenes"]


def __getattr__(name: str):
    if name in __all__:
        return importlib.import_module(f"graphred.data.{name}")
    raise AttributeError(f"module 'graphred.data' has no attribute {name!r}")
