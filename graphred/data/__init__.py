"""Data graphred ships for its accuracy benchmark and demo.

- :mod:`graphred.data.scenes`: grid scenes of real Fashion-MNIST photographs with templated
  questions (a small VQA set), its word tokenizer, and a packaged 300-scene test subset.
- :mod:`graphred.data.scenes2`: cluttered 224 px scenes (196 patches) of small Fashion-MNIST objects
  among handwritten-digit clutter, each question about one object class; sprites and a 50-scene
  test subset ship with graphred.
- :mod:`graphred.data.models`: the VQA models graphred trained itself on those scenes
  (``vqa-llava``, ``vqa-vilt``, ``vqa-blip`` on the grid scenes; ``vqa2-llava``, ``vqa2-vilt``,
  ``vqa2-blip`` on the cluttered ones), ``load_trained`` and ``evaluate``.
"""
from __future__ import annotations

import importlib

__all__ = ["models", "scenes", "scenes2"]


def __getattr__(name: str):
    if name in __all__:
        return importlib.import_module(f"graphred.data.{name}")
    raise AttributeError(f"module 'graphred.data' has no attribute {name!r}")
