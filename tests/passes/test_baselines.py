"""Baseline pruning (random, token norm) at PuMer's places: same kept count, text kept, seeded."""
import torch

import graphred
from graphred.plans import prune, pumer


def _image_positions(model, kwargs):
    return kwargs["input_ids"] == model.config.image_token_id


def test_baselines_keep_k_images_and_all_text(zoo_program, zoo_model):
    model, kwargs = zoo_model("llava")
    prog = zoo_program("llava")
    is_img = _image_positions(model, kwargs)
    chosen = {}
    for scorer in ("random", "norm"):
        fast = graphred.transform(prog, prune(ratio=0.5, layers=[1], scorer=scorer))
        with torch.no_grad():
            fast(**kwargs)
        pos = fast.kept_positions
        assert pos.shape == (2, 12 + 32)
        for b in range(2):
            kept_img = is_img[b, pos[b]]
            assert int(kept_img.sum()) == 32
            assert set(torch.nonzero(~is_img[b]).flatten().tolist()) <= set(pos[b].tolist())
        chosen[scorer] = pos.clone()
    text = graphred.transform(prog, pumer(prune=0.5, merge=0, layers=[1]))
    with torch.no_grad():
        text(**kwargs)
    # three different scorers pick different image tokens at the same budget
    assert not torch.equal(chosen["random"], chosen["norm"])
    assert not torch.equal(chosen["norm"], text.kept_positions)


def test_random_baseline_is_seeded(zoo_program, zoo_model):
    _, kwargs = zoo_model("llava")
    prog = zoo_program("llava")
    runs = []
    for seed in (0, 0, 1):
        fast = graphred.transform(prog, prune(ratio=0.5, layers=[1], scorer="random", seed=seed))
        with torch.no_grad():
            fast(**kwargs)
        runs.append(fast.kept_positions.clone())
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])
