"""Identity that exercises the rewrite: ``apply_plan(..., keep_all=True)`` runs every reduction's whole
rewrite (scoring, selection, matching and merging ops, gathers of the stream and of every operand that
meets it: masks, rotary tables, position ids, caches) while keeping every token, so the reduced graph must
hold graphred's ops and still give the unreduced program's outputs bit for bit."""
from __future__ import annotations

import pytest
import torch
from torch.utils import _pytree as pytree

import graphred
from graphred.passes.apply import apply_plan
from graphred.plans import fastv, parse_plan, pumer, tome

gr = torch.ops.graphred

# every zoo model with the plans that apply to it (merges included wherever a method merges)
CASES = [
    ("llava", "fastv:layer=1,keep=0.5"),
    ("llava", "pumer:prune=0.3,merge=0.2"),
    ("paligemma", "pumer:prune=0.3,merge=0.2"),
    ("idefics3", "fastv:layer=1,keep=0.5"),
    ("idefics3", "pumer:prune=0.3,merge=0.2"),
    ("qwen2-vl", "fastv:layer=1,keep=0.5"),
    ("gemma3", "fastv:layer=1,keep=0.5"),  # uneven batches: per-sample selection (select_tokens_padded)
    ("internvl", "pumer:prune=0.3,merge=0.2"),
    ("vilt", "pumer:prune=0.3,merge=0.2,merge_text=0.2"),
    ("blip", "pumer:prune=0.3,merge=0.2"),
    ("blip", "tome:r=4"),
    ("mllama", "pumer:prune=0.3,merge=0.2"),  # keys/values read through one unfolded view of the tiled image states
    ("clip", "tome:r=4"),
    ("siglip", "tome:r=4"),
    ("llava-bench", "fastv:layer=2,keep=0.5 + pumer:prune=0.3,merge=0.2,layers=4/6"),
]


def _count(gm, op) -> int:
    return sum(1 for n in gm.graph.nodes if n.op == "call_function" and n.target == op)


def _leaves(out):
    return [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]


@pytest.mark.parametrize("name,spec", CASES, ids=[f"{n}-{s.split(':')[0]}" for n, s in CASES])
def test_keep_all_runs_the_rewrite_and_is_bit_exact(name, spec, zoo_program, zoo_model):
    if name == "llava-bench":
        model, kwargs = _bench()
        prog = graphred.capture(model, **kwargs)
    else:
        _, kwargs = zoo_model(name)
        prog = zoo_program(name)
    plan = parse_plan(spec)
    applied = apply_plan(prog, plan, keep_all=True)
    gm = applied.graph_module
    # the rewrite ran: selection or matching ops and the gathers that follow them are in the graph
    picks = (_count(gm, gr.select_tokens.default) + _count(gm, gr.select_tokens_padded.default)
             + _count(gm, gr.bipartite_match.default))
    assert picks >= 1, spec
    assert _count(gm, gr.gather_tokens.default) >= picks
    if "merge" in spec or "tome" in spec:
        assert _count(gm, gr.merge_tokens.default) >= 1
    if "fastv" in spec or "pumer" in spec:
        assert _count(gm, gr.attention_scores.default) >= 1
    # ... and kept every token: the log says so, and the outputs are the program's, bit for bit
    assert applied.steps and all(s.get("image_after", s.get("text_after")) == s.get("image_before", s.get("text_before"))
                                 for s in applied.steps), applied.steps
    with torch.no_grad():  # seeded alike: ViLT's graph samples its patches (aten.multinomial)
        torch.manual_seed(0)
        want = _leaves(prog.graph_module(**kwargs))
        torch.manual_seed(0)
        got = _leaves(gm(**kwargs))
    if applied.positions_output:
        kept = got.pop()
        L = kept.shape[1]
        assert torch.equal(kept, torch.arange(L).expand_as(kept))
    assert len(got) == len(want) and want
    for g, w in zip(got, want):
        assert g.shape == w.shape and torch.equal(g, w), (spec, (g - w).abs().max() if g.shape == w.shape else g.shape)


def _bench():
    if not hasattr(_bench, "cache"):
        _bench.cache = graphred.zoo.load("llava-bench")
    model, inputs = _bench.cache
    return model, inputs


def test_keep_all_refuses_a_plan_that_adds_tokens(zoo_program):
    with pytest.raises(graphred.PlanError, match="keep_all"):
        apply_plan(zoo_program("llava"), graphred.plans.victor(registers=2, layer=1), keep_all=True)


def test_keep_all_catches_a_broken_selection(zoo_program, zoo_model, monkeypatch):
    """The mode can fail: a rewrite whose selection keeps every token but in the wrong order (here the
    kept indices reversed) changes the outputs although no token is dropped."""
    import graphred.passes.prune_merge as prune_merge

    _, kwargs = zoo_model("llava")
    prog = zoo_program("llava")
    real = prune_merge.call_with_val

    def reversed_selection(graph, target, args, kwargs=None):
        out = real(graph, target, args, kwargs)
        if target is gr.select_tokens.default:
            out = real(graph, torch.ops.aten.flip.default, (out, [1]))
        return out

    monkeypatch.setattr(prune_merge, "call_with_val", reversed_selection)
    applied = apply_plan(prog, fastv(layer=1, keep=0.5), keep_all=True)
    with torch.no_grad():
        want = _leaves(prog.graph_module(**kwargs))[0]
        got = _leaves(applied.graph_module(**kwargs))[0]
    assert not torch.equal(got, want)
