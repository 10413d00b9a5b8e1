"""The figures of docs/passes.md's "Fidelity" subsection: reference vs positional variants of ToMe and
PuMer merging, and PuMer scoring with and without padded text rows.

    python bench/fidelity.py          # about a minute on a laptop CPU

Models: zoo presets with 4 layers in the part the method acts on (the CLIP/SigLIP vision tower, ViLT's
encoder, LLaVA's decoder), random seeded weights (ViLT at init std 0.2, as in
tests/passes/test_reference_methods.py, so that its attention is not uniform). Nothing here is about
accuracy: the figures say how far each variant's outputs move from the unreduced model's and from each
other, and how many kept tokens the variants share.
"""
from __future__ import annotations

import copy
import logging
import os
import sys
import warnings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
warnings.filterwarnings("ignore")
logging.disable(logging.WARNING)

import torch  # noqa: E402

import graphred  # noqa: E402
from graphred import zoo  # noqa: E402
from graphred.plans import pumer, tome  # noqa: E402


def deeper(name: str, layers: int = 4):
    model, kwargs = zoo.deepened(name, layers)
    return model, kwargs, graphred.capture(copy.deepcopy(model), **kwargs)


def run(m, kwargs, key):
    torch.manual_seed(0)  # ViLT samples its patch order
    with torch.no_grad():
        out = m(**kwargs)
    return out[key] if isinstance(out, dict) else getattr(out, key)


def image_positions(name: str, model, kwargs) -> list[set[int]]:
    """Per sample, the sequence positions of the image tokens in the stream the method reduces."""
    ids = kwargs["input_ids"]
    if name == "vilt":  # text first, then the image tokens
        return [set(range(ids.shape[1], 10**6))] * ids.shape[0]
    if name == "llava":
        return [set(torch.nonzero(r == model.config.image_token_id).flatten().tolist()) for r in ids]
    return [set(range(10**6))] * ids.shape[0]  # a vision tower: every token is an image token


def shared(a: torch.Tensor, b: torch.Tensor, images: list[set[int]]) -> str:
    """image tokens both variants keep, over the image tokens each keeps, summed over the batch"""
    same = sum(len(set(x.tolist()) & set(y.tolist()) & img) for x, y, img in zip(a, b, images))
    total = sum(len(set(x.tolist()) & img) for x, img in zip(a, images))
    return f"{same} of {total}"


def main():
    print("| model | plan | variant | max abs logit change vs unreduced | max abs difference between the variants "
          "| kept image tokens the variants share |")
    print("|---|---|---|---|---|---|")
    cases = [
        ("clip", "logits_per_image", tome(r=4), tome(r=4, variant="positional")),
        ("clip", "logits_per_image", tome(r=8), tome(r=8, variant="positional")),
        ("siglip", "logits_per_image", tome(r=4), tome(r=4, variant="positional")),
        ("siglip", "logits_per_image", tome(r=8), tome(r=8, variant="positional")),
        ("vilt", "logits", pumer(prune=0.3, merge=0.3, layers=[1, 2, 3]),
         pumer(prune=0.3, merge=0.3, layers=[1, 2, 3], variant="positional")),
        ("llava", "logits", pumer(prune=0.3, merge=0.3, layers=[1, 2, 3]),
         pumer(prune=0.3, merge=0.3, layers=[1, 2, 3], variant="positional")),
    ]
    models = {}
    for name, key, ref_plan, pos_plan in cases:
        if name not in models:
            models[name] = deeper(name)
        model, kwargs, prog = models[name]
        base = run(prog, kwargs, key)
        ref, pos = graphred.transform(prog, ref_plan), graphred.transform(prog, pos_plan)
        a, b = run(ref, kwargs, key), run(pos, kwargs, key)
        if name == "llava":  # the last position's logits (the next-token prediction)
            base, a, b = base[:, -1], a[:, -1], b[:, -1]
        between = f"{(a - b).abs().max():.4f}"
        share = shared(ref.kept_positions, pos.kept_positions, image_positions(name, model, kwargs))
        print(f"| {name} | `{ref_plan}` | reference | {(a - base).abs().max():.4f} | {between} | {share} |")
        print(f"| {name} | `{pos_plan}` | positional | {(b - base).abs().max():.4f} | | |")
    print()
    print("| model | plan | scoring | max abs logit change vs unreduced | kept image tokens shared with the default |")
    print("|---|---|---|---|---|")
    for name, key in (("vilt", "logits"), ("llava", "logits")):
        model, kwargs, prog = models[name]
        base = run(prog, kwargs, key)
        fixed = graphred.transform(prog, pumer(prune=0.3, merge=0.3, layers=[1, 2, 3]))
        padded = graphred.transform(prog, pumer(prune=0.3, merge=0.3, layers=[1, 2, 3], padded_queries=True))
        a, b = run(fixed, kwargs, key), run(padded, kwargs, key)
        if name == "llava":
            base, a, b = base[:, -1], a[:, -1], b[:, -1]
        print(f"| {name} | `pumer:prune=0.3,merge=0.3,layers=1/2/3` | valid text rows (default) | "
              f"{(a - base).abs().max():.4f} | |")
        print(f"| {name} | `padded_queries=true` | every text row (released code) | {(b - base).abs().max():.4f} | "
              f"{shared(padded.kept_positions, fixed.kept_positions, image_positions(name, model, kwargs))} |")


if __name__ == "__main__":
    main()
