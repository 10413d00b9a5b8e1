"""Prefill with a key/value cache: entries of layers after the reduction hold only the kept tokens."""
import torch

import graphred
from graphred.plans import fastv


def test_fastv_prefill_cache_entries_are_reduced(zoo_model):
    model, kwargs = zoo_model("llava")
    with_cache = dict(kwargs, use_cache=True)
    prog = graphred.capture(model, **with_cache)
    with torch.no_grad():
        ref = model(**with_cache)
        captured = prog(**with_cache)
    for a, b in zip(ref.past_key_values.layers, captured.past_key_values.layers):
        assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)

    fast = graphred.transform(prog, fastv(layer=1, keep=0.5))
    with torch.no_grad():
        out = fast(**with_cache)
    layers = out.past_key_values.layers
    L, K = kwargs["input_ids"].shape[1], fast.kept_positions.shape[1]
    assert [tuple(layer.keys.shape[-2:-1]) for layer in layers] == [(L,), (K,)]  # FastV: layers < K keep all
    assert [tuple(layer.values.shape[-2:-1]) for layer in layers] == [(L,), (K,)]
    torch.testing.assert_close(layers[0].keys, ref.past_key_values.layers[0].keys, rtol=0, atol=0)
    # contents: layer 0 runs on every token, so layer 1's input at a kept position is the unreduced
    # one, and its cached keys/values (per-token projections, rotary at the original position) are
    # the unreduced cache gathered at the kept positions
    kept = fast.kept_positions
    for name in ("keys", "values"):
        full = getattr(ref.past_key_values.layers[1], name)            # [B, H, L, D]
        idx = kept[:, None, :, None].expand(full.shape[0], full.shape[1], K, full.shape[-1])
        torch.testing.assert_close(getattr(layers[1], name), torch.gather(full, 2, idx), rtol=1e-5, atol=1e-6)

    no_cache = graphred.transform(graphred.capture(model, **dict(kwargs, use_cache=False)), fastv(layer=1, keep=0.5))
    with torch.no_grad():
        assert torch.equal(out.logits, no_cache(**dict(kwargs, use_cache=False)).logits)
