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

    no_cache = graphred.transform(graphred.capture(model, **dict(kwargs, use_cache=False)), fastv(layer=1, keep=0.5))
    with torch.no_grad():
        assert torch.equal(out.logits, no_cache(**dict(kwargs, use_cache=False)).logits)
