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


def test_norm_scorer_keeps_the_highest_norm_image_tokens(zoo_program, zoo_model):
    """The norm baseline keeps, per sample, the top-k image tokens by the L2 norm of the hidden
    state where it prunes (PuMer's place: the residual after layer 1's attention), read here from
    the eager model with a hook, independently of the rewrite."""
    model, kwargs = zoo_model("llava")
    is_img = _image_positions(model, kwargs)
    seen = {}
    norm_in = model.model.language_model.layers[1].post_attention_layernorm
    hook = norm_in.register_forward_pre_hook(lambda mod, args: seen.__setitem__("h", args[0].detach().clone()))
    try:
        with torch.no_grad():
            model(**kwargs)
    finally:
        hook.remove()
    norms = seen["h"].norm(dim=-1)                                        # [B, L]
    fast = graphred.transform(zoo_program("llava"), prune(ratio=0.5, layers=[1], scorer="norm"))
    with torch.no_grad():
        fast(**kwargs)
    for b in range(norms.shape[0]):
        img = torch.nonzero(is_img[b]).flatten()
        n_keep = len(img) - round(0.5 * len(img))
        expected = set(img[torch.topk(norms[b, img], n_keep).indices].tolist())
        kept = set(fast.kept_positions[b].tolist()) & set(img.tolist())
        assert kept == expected, (b, sorted(kept ^ expected))
