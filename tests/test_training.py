"""graphred.train, save_reducer / load_reducer: fine-tuning a transformed model without touching the user's."""
from __future__ import annotations

import pytest
import torch

import graphred
from graphred.errors import GraphredError
from graphred.plans import fastv, victor


@pytest.fixture(scope="module")
def llava():
    model, kwargs = graphred.zoo.load("llava")
    with torch.no_grad():
        model(**kwargs)  # Hugging Face installs its output-capturing hooks on the first eager call
    return model, kwargs, graphred.capture(model, **kwargs)


def test_registers_train_and_the_users_model_is_unchanged(llava, model_state):
    model, kwargs, prog = llava
    before = model_state.snapshot(model)
    fast = graphred.transform(prog, victor(registers=2, layer=1))
    r0 = fast.graph_module.graphred_registers.detach().clone()
    res = graphred.train(fast, [kwargs], teacher=model, steps=4, lr=1e-2, progress=False, seed=1)
    assert len(res.losses) == 4 and res.trained == ["reducer.graphred_registers"]
    assert res.losses[-1] < res.losses[0]
    assert not torch.equal(fast.graph_module.graphred_registers, r0)
    assert not fast.training
    model_state.assert_unchanged(model, before)
    assert all(p.grad is None for p in model.parameters())


def test_save_and_load_round_trip(llava, tmp_path):
    model, kwargs, prog = llava
    fast = graphred.transform(prog, victor(registers=2, layer=1))
    with torch.no_grad():
        fast.graph_module.graphred_registers.add_(0.5)
        want = fast(**kwargs).logits
    path = tmp_path / "victor.safetensors"
    fast.save_reducer(path)
    again = graphred.load_reducer(path, model=model, inputs=kwargs)
    with torch.no_grad():
        torch.testing.assert_close(again(**kwargs).logits, want, rtol=0, atol=0)
    into = graphred.load_reducer(graphred.transform(prog, victor(registers=2, layer=1)), path)
    assert torch.equal(into.graph_module.graphred_registers, fast.graph_module.graphred_registers)
    with pytest.raises(GraphredError, match="saved for the plan 'victor:registers=2,layer=1'"):
        graphred.load_reducer(graphred.transform(prog, victor(registers=3, layer=1)), path)
    with pytest.raises(GraphredError, match="nothing to save"):
        graphred.transform(prog, fastv(layer=1, keep=0.5)).save_reducer(tmp_path / "x.safetensors")
    with pytest.raises(GraphredError, match="no file"):
        graphred.load_reducer(fast, tmp_path / "missing.safetensors")


def test_model_training_uses_own_weights_checkpoints_and_resumes(llava, tmp_path, model_state):
    model, kwargs, prog = llava
    before = model_state.snapshot(model)
    fast = graphred.transform(prog, fastv(layer=1, keep=0.5))
    with pytest.raises(GraphredError, match="no parameters of its own"):
        graphred.train(fast, [kwargs], teacher=model, steps=1, progress=False)
    ck = tmp_path / "ck.safetensors"
    res = graphred.train(fast, [kwargs], teacher=model, steps=2, what="model", lr=1e-3, progress=False,
                         checkpoint=ck, checkpoint_every=1)
    assert ck.is_file() and len(res.losses) == 2
    res2 = graphred.train(fast, [kwargs], teacher=model, steps=3, what="model", lr=1e-3, progress=False,
                          checkpoint=ck, resume=True)
    assert res2.start_step == 2 and len(res2.losses) == 1
    model_state.assert_unchanged(model, before)
    # the trained weights go with the reducer file
    fast.save_reducer(tmp_path / "m.safetensors")
    again = graphred.load_reducer(tmp_path / "m.safetensors", model=model, inputs=kwargs)
    with torch.no_grad():
        torch.testing.assert_close(again(**kwargs).logits, fast(**kwargs).logits, rtol=0, atol=0)
    model_state.assert_unchanged(model, before)


def test_train_and_eval_modes(llava):
    model, kwargs, prog = llava
    fast = graphred.transform(prog, victor(registers=2, layer=1))
    fast.train()
    assert fast.training and fast.graph_module.training
    out = fast(**kwargs).logits
    fast.eval()
    with torch.no_grad():
        torch.testing.assert_close(fast(**kwargs).logits, out.detach())


def test_bad_arguments(llava):
    model, kwargs, prog = llava
    fast = graphred.transform(prog, victor(registers=2, layer=1))
    with pytest.raises(GraphredError, match="what="):
        graphred.train(fast, [kwargs], teacher=model, what="everything", progress=False)
    with pytest.raises(GraphredError, match="data is empty"):
        graphred.train(fast, [], teacher=model, steps=1, progress=False)
    with pytest.raises(GraphredError, match="expects the module graphred.transform returned"):
        graphred.train(model, [kwargs], teacher=model, steps=1, progress=False)


def test_training_step_flops():
    from graphred.analysis.cost.training import group_step_flops, training_step_flops

    assert group_step_flops(10, 8, True, True) == 10 + 16 + 2
    assert group_step_flops(10, 8, False, True) == 10 + 8 + 2
    assert group_step_flops(10, 8, False, False) == 10
    model, kwargs = graphred.zoo.load("llava")
    est = graphred.estimate(graphred.capture(model, **kwargs), victor(registers=2, layer=1))
    full = training_step_flops(est, "registers+model")
    regs = training_step_flops(est, "registers")
    assert full["before"] > regs["before"] > est.flops  # weight gradients cost more than input gradients alone
    assert 0 < full["ratio"] < 1 and full["after"] > est.after.flops
    with pytest.raises(ValueError, match="what="):
        training_step_flops(est, "all")


def test_registers_and_model_both_train(llava, model_state):
    """what="registers+model" (Victor's recipe): gradients reach the registers and the module's own copy of
    the weights; the user's model keeps its weights."""
    model, kwargs, prog = llava
    before = model_state.snapshot(model)
    fast = graphred.transform(prog, victor(registers=2, layer=1))
    w0 = {n: p.detach().clone() for n, p in fast.graph_module.named_parameters()}
    res = graphred.train(fast, [kwargs], teacher=model, steps=1, what="registers+model", lr=1e-3, reducer_lr=1e-2,
                         progress=False)
    assert "reducer.graphred_registers" in res.trained and len(res.trained) == len(w0)
    moved = {n for n, p in fast.graph_module.named_parameters() if not torch.equal(p, w0[n])}
    assert "graphred_registers" in moved
    assert len(moved) > len(w0) // 2, sorted(set(w0) - moved)  # the layers before and after the drop train
    model_state.assert_unchanged(model, before)


def test_warmup_scales_the_first_update(llava):
    """AdamW's first update is about lr per element, so a warm-up of 2 steps halves it (factor 1/2)."""
    model, kwargs, prog = llava
    moves = []
    fast = graphred.transform(prog, victor(registers=2, layer=1))
    reg = fast.graph_module.graphred_registers
    r0 = reg.detach().clone()
    for warmup in (0, 2):  # each call starts a fresh optimizer; the registers start from r0 both times
        with torch.no_grad():
            reg.copy_(r0)
        graphred.train(fast, [kwargs], teacher=model, steps=1, lr=1e-2, warmup=warmup, schedule="cosine",
                       clip=None, progress=False)
        moves.append((reg - r0).abs().max().item())
    assert moves[1] == pytest.approx(moves[0] / 2, rel=0.05), moves
    with pytest.raises(GraphredError, match="schedule="):
        graphred.train(fast, [kwargs], teacher=model, steps=1, schedule="linear", progress=False)
    with pytest.raises(GraphredError, match="warmup must be"):
        graphred.train(fast, [kwargs], teacher=model, steps=1, warmup=-1, progress=False)


def test_hidden_mse_pairs_the_kept_hidden_states(llava):
    """hidden_mse without hidden_fn: the student's hidden states after the drop against the teacher's at the
    same original positions and layers (registers and padding left out); zero for the identity plan."""
    from graphred.plans import Plan
    from graphred.training import kept_hidden

    model, kwargs, prog = llava
    fast = graphred.transform(prog, victor(registers=2, layer=1))
    with pytest.raises(GraphredError, match="output_hidden_states=True"):
        graphred.train(fast, [kwargs], teacher=model, steps=1, hidden_mse=1.0, progress=False)
    batch = {**kwargs, "output_hidden_states": True}
    with torch.no_grad():
        out, kept = fast.forward_with_positions(**batch)
        t_out = model(**batch)
        s, t = kept_hidden(out, t_out, kept, batch)
        same, _ = kept_hidden(t_out, t_out, None, batch)
    after = [h for h in out.hidden_states if h.shape[1] == kept.shape[1]]
    text = kwargs["attention_mask"].gather(1, kept).bool()
    regs = (kept.unsqueeze(2) == kept.unsqueeze(1)).sum(2) > 1
    assert 0 < len(after) < len(out.hidden_states) == len(t_out.hidden_states)
    assert s.shape == t.shape and s.shape[0] == len(after) * int((text & ~regs).sum())
    assert float((s - t).pow(2).mean()) > 0
    assert same.shape[0] == len(t_out.hidden_states) * int(kwargs["attention_mask"].sum())
    res = graphred.train(graphred.transform(prog, Plan()), [batch], teacher=model, steps=1, what="model",
                         kl_weight=0.0, hidden_mse=1.0, progress=False)
    assert res.parts[0]["mse"] == 0.0  # zero reduction: the student's states are the teacher's
    res = graphred.train(fast, [batch], teacher=model, steps=2, what="registers+model", kl_weight=0.0,
                         hidden_mse=1.0, lr=1e-3, progress=False)
    assert res.parts[0]["mse"] > 0
