"""Labels meet the reduced token stream at the loss: they are reduced with the same positions."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import graphred
from graphred.plans import fastv, pumer


@pytest.fixture(scope="module")
def labelled_program():
    model, kwargs = graphred.zoo.load("llava")
    ids = kwargs["input_ids"]
    labels = ids.clone()
    labels[ids == model.config.image_token_id] = -100
    labels[kwargs["attention_mask"] == 0] = -100
    kwargs = dict(kwargs, labels=labels)
    return model, kwargs, graphred.capture(model, **kwargs)


def test_loss_is_not_an_unknown_op(labelled_program):
    _, _, prog = labelled_program
    report = graphred.analyze(prog)
    assert not [u for u in report.unknown_ops if "loss" in u.op], report.unknown_ops


def test_zero_reduction_keeps_the_loss_bit_exact(labelled_program):
    model, kwargs, prog = labelled_program
    with torch.no_grad():
        want = model(**kwargs).loss
        got = graphred.transform(prog, fastv(layer=1, keep=1.0))(**kwargs).loss
    assert torch.equal(got, want)


@pytest.mark.parametrize("plan", [fastv(layer=1, keep=0.5), pumer(prune=0.3, merge=0.2)], ids=str)
def test_reduced_loss_uses_each_kept_positions_own_target(labelled_program, plan):
    """Causal-LM loss on the reduced sequence: position p (kept) is scored against the original
    next token labels[p + 1], as the unreduced model scores it."""
    model, kwargs, prog = labelled_program
    fast = graphred.transform(prog, plan)
    with torch.no_grad():
        out = fast(**kwargs)
    kept = fast.kept_positions
    B, K, V = out.logits.shape
    assert K < kwargs["input_ids"].shape[1]
    shifted = F.pad(kwargs["labels"], (0, 1), value=-100)[:, 1:]
    target = shifted.gather(1, kept)
    want = F.cross_entropy(out.logits.reshape(B * K, V).float(), target.reshape(-1), ignore_index=-100)
    torch.testing.assert_close(out.loss, want, rtol=1e-5, atol=1e-6)
    # the text targets all survive: only image positions (label -100) are dropped, and the last
    # image token before the text (target = first text token) is kept or its term is the only loss
    n_targets_full = int((shifted != -100).sum())
    n_targets_kept = int((target != -100).sum())
    assert n_targets_full - B <= n_targets_kept <= n_targets_full


def test_per_position_loss_target_is_gathered():
    """A loss with reduction='none' on an unflattened [B, L] target, in a toy cross-modal model."""

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.self_attn = torch.nn.MultiheadAttention(16, 2, batch_first=True)

        def forward(self, x):
            return x + self.self_attn(x, x, x, need_weights=False)[0]

    class Toy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(32, 16)
            self.img = torch.nn.Linear(8, 16)
            self.layers = torch.nn.ModuleList([Block(), Block()])
            self.head = torch.nn.Linear(16, 32)

        def forward(self, input_ids, pixel_feats, labels):
            x = torch.cat([self.img(pixel_feats), self.emb(input_ids)], dim=1)
            for layer in self.layers:
                x = layer(x)
            logits = self.head(x)  # [B, L, C]
            return logits, F.cross_entropy(logits.transpose(1, 2), labels, reduction="none")  # [B, L]

    torch.manual_seed(0)
    toy = Toy().eval()
    ids, feats = torch.randint(0, 32, (2, 5)), torch.randn(2, 12, 8)
    labels = torch.randint(0, 32, (2, 17))
    prog = graphred.capture(toy, ids, feats, labels)
    fast = graphred.transform(prog, pumer(prune=0.5, merge=0, layers=[1]))
    with torch.no_grad():
        logits, loss = fast(ids, feats, labels)
    kept = fast.kept_positions
    assert kept.shape == (2, 11) and loss.shape == (2, 11)
    want = F.cross_entropy(logits.transpose(1, 2), labels.gather(1, kept), reduction="none")
    torch.testing.assert_close(loss, want)
