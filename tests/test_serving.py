"""Serving: any batch and text length, optional arguments, errors, per-call state, bounded specialisations."""
import threading

import pytest
import torch

import graphred
from graphred import zoo
from graphred.plans import Plan, fastv, pumer

# two shapes none of the zoo presets is captured at: a bigger batch with longer text, shorter text
UNSEEN = [dict(batch=3, text_len=20), dict(text_len=10)]


def _main_output(out):
    keys = [k for k in ("logits", "logits_per_image", "last_hidden_state") if k in out]
    return keys[0] if keys else next(iter(out.keys()))


def test_zero_reduction_at_unseen_shapes_is_the_model_bit_for_bit(zoo_name, zoo_model, zoo_program):
    model, kwargs = zoo_model(zoo_name)  # the same seeded weights as the captured private copy
    prog = zoo_program(zoo_name)
    fast = graphred.transform(prog, Plan(()))
    for shape in UNSEEN:
        inputs = zoo.inputs(zoo_name, model=model, **shape)
        assert {k: tuple(v.shape) for k, v in inputs.items() if isinstance(v, torch.Tensor)} != {
            k: tuple(v.shape) for k, v in kwargs.items() if isinstance(v, torch.Tensor)}
        with torch.no_grad():  # seeded alike: ViLT samples image patches with torch.multinomial
            torch.manual_seed(0)
            ref = model(**inputs)
            torch.manual_seed(0)
            out = fast(**inputs)
        for key in ref.keys():
            if isinstance(ref[key], torch.Tensor):
                assert torch.equal(out[key], ref[key]), f"{zoo_name} {shape}: {key} differs"
    assert fast.specializations.captures == len(UNSEEN)


def test_second_call_at_a_seen_shape_captures_nothing_and_the_cache_is_bounded(zoo_program):
    prog = zoo_program("llava")
    fast = graphred.transform(prog, fastv(layer=1, keep=0.5), max_specializations=2)
    a = zoo.inputs("llava", batch=3)
    b = zoo.inputs("llava", text_len=20)
    c = zoo.inputs("llava", batch=1, seed=1)
    with torch.no_grad():
        first = fast(**a).logits
        assert fast.specializations.captures == 1
        again = fast(**zoo.inputs("llava", batch=3, seed=5))  # same shapes, other values
        assert fast.specializations.captures == 1 and fast.specializations.hits >= 1
        assert torch.equal(fast(**a).logits, first)
        fast(**b)
        fast(**c)
    assert fast.specializations.captures == 3
    assert len(fast.specializations) == 2 and fast.specializations.evictions == 2  # the capture's own and `a` went
    assert again.logits.shape == first.shape
    with torch.no_grad():
        fast(**a)  # evicted: captured again
    assert fast.specializations.captures == 4


def test_optional_arguments_stay_optional(zoo_capture):
    model, kwargs, _, prog = zoo_capture("llava")  # captured with attention_mask and use_cache=False
    fast = graphred.transform(prog, fastv(layer=1, keep=0.5))
    lean = {k: kwargs[k] for k in ("input_ids", "pixel_values")}
    lean["input_ids"] = lean["input_ids"][:1]  # the unpadded sample: no mask needed
    lean["pixel_values"] = lean["pixel_values"][:1]
    with torch.no_grad():
        out = fast(**lean)
        ref_mask = fast(**lean, attention_mask=torch.ones_like(lean["input_ids"]), use_cache=False)
    torch.testing.assert_close(out.logits, ref_mask.logits, rtol=1e-5, atol=1e-5)
    # positional as in the model's forward signature
    with torch.no_grad():
        pos = fast(lean["input_ids"], lean["pixel_values"])
    assert torch.equal(pos.logits, out.logits)


def test_calls_the_model_cannot_serve_raise_input_errors(zoo_capture):
    model, kwargs, _, prog = zoo_capture("llava")
    fast = graphred.transform(prog, fastv(layer=1, keep=0.5))
    bad = dict(kwargs, pixel_values=torch.randn(2, 3, 48, 48))  # the tower's position table is for 32 px
    with pytest.raises(graphred.InputError) as e:
        fast(**bad)
    msg = str(e.value)
    assert "pixel_values [2, 3, 48, 48]" in msg and "Supported" in msg and "pixel_values [2, 3, 32, 32]" in msg
    with pytest.raises(graphred.InputError, match="pixel_vales"):
        fast(**dict(kwargs, pixel_vales=kwargs["pixel_values"]))
    from transformers import DynamicCache

    with pytest.raises(graphred.InputError, match="generate"):
        fast(**dict(kwargs, cache=DynamicCache()))
    with pytest.raises(graphred.InputError, match="input_ids"):
        graphred.transform(prog, fastv(layer=1, keep=0.5), buckets=[8])(**kwargs)


def test_per_call_positions_under_eight_threads(zoo_program):
    fast = graphred.transform(zoo_program("llava"), pumer(prune=0.3, merge=0.2))
    calls = [zoo.inputs("llava", seed=s) for s in range(4)] + [zoo.inputs("llava", batch=3, seed=s) for s in range(4)]
    with torch.no_grad():
        expected = [fast.forward_with_positions(**c) for c in calls]
    results: dict[int, tuple] = {}
    errors = []
    barrier = threading.Barrier(len(calls))

    def worker(i):
        try:
            barrier.wait()
            for _ in range(3):
                with torch.no_grad():
                    out, kept = fast.forward_with_positions(**calls[i])
                    out2 = fast(**calls[i])
                    results[i] = (out.logits, kept, out2.logits, fast.kept_positions)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(calls))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for i, (out, kept) in enumerate(expected):
        logits, k, logits2, thread_kept = results[i]
        assert torch.equal(k, kept) and torch.equal(thread_kept, kept), f"call {i}: positions of another call"
        assert torch.equal(logits, out.logits) and torch.equal(logits2, out.logits)
    # distinct inputs chose distinct positions, so mixing them up could not pass unnoticed
    assert len({tuple(k.flatten().tolist()) for _, k in expected}) > 1


@pytest.mark.parametrize("plan", [Plan(()), fastv(layer=1, keep=0.5)], ids=["identity", "fastv"])
def test_buckets_pad_and_results_equal_the_unpadded_call(zoo_program, plan):
    fast = graphred.transform(zoo_program("llava"), plan, buckets=[96])
    plain = graphred.transform(zoo_program("llava"), plan)
    for text_len in (14, 20):
        inputs = zoo.inputs("llava", text_len=text_len)
        with torch.no_grad():
            out, kept = fast.forward_with_positions(**inputs)
            ref, ref_kept = plain.forward_with_positions(**inputs)
        assert out.logits.shape == ref.logits.shape
        torch.testing.assert_close(out.logits, ref.logits, rtol=1e-4, atol=1e-5)
        assert (kept is None and ref_kept is None) or torch.equal(kept, ref_kept)
    assert fast.specializations.captures == 1  # both lengths ran in the one 96-token bucket


def test_program_call_serves_other_shapes(zoo_model):
    model, kwargs = zoo_model("clip")
    prog = graphred.capture(model, **kwargs)  # its own program: the test counts its captures
    inputs = zoo.inputs("clip", batch=3, text_len=9)
    with torch.no_grad():
        ref = model(**inputs)
        out = prog(**inputs)
        prog(**inputs)
    assert torch.equal(out.logits_per_image, ref.logits_per_image)
    assert prog.specializations.captures == 1 and prog.specializations.hits >= 1


@pytest.mark.parametrize("module", ["graphred.serving", "graphred.generation", "graphred.analysis.cost.decode",
                                    "graphred.reduced_module", "graphred.program"])
def test_docstring_examples_run(module):
    import doctest
    import importlib

    result = doctest.testmod(importlib.import_module(module), optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0


def test_a_model_output_input_in_another_key_order_runs_the_stored_graph():
    # a ModelOutput's keys follow how it was built (fields set afterwards come last); the stored graph's input spec
    # holds one order and torch.fx compares it in order. Same keys in another order must run, and the caller's
    # object keep its order
    from transformers.modeling_outputs import BaseModelOutputWithPooling as Out
    from graphred.serving import Specialization, signature_key

    class M(torch.nn.Module):
        def forward(self, x, o):
            return x * o.last_hidden_state + o.pooler_output

    x, a, b = torch.randn(3), torch.randn(3), torch.randn(3)
    seen = Out(last_hidden_state=a, pooler_output=b)
    gm = torch.export.export(M(), (x,), {"o": seen}).module()
    late = Out(pooler_output=b)
    late["last_hidden_state"] = a
    assert list(late.keys()) != list(seen.keys())
    assert signature_key({"x": x, "o": late}) == signature_key({"x": x, "o": seen})  # one specialisation serves both
    with pytest.raises((RuntimeError, ValueError)):  # torch's own check of the spec
        gm(x, o=late)
    out = Specialization(gm, positional=("x",)).run({"x": x, "o": late})
    assert torch.equal(out, x * a + b) and list(late.keys()) == ["pooler_output", "last_hidden_state"]
