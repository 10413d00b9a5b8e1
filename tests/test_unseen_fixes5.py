"""General fixes for fresh4 failures (bench/unseen_families.py, branch fixcap), each on a tiny synthetic model:

* a tensor built with ``torch.tensor`` from a Python list of per-sample traced values (Qwen3-Omni-MoE's rope
  deltas: ``torch.tensor([positions.max() + 1 - len(ids) for each sample])``), in a model whose Python also reads
  tensor values (so capture runs with values read): the list becomes the ``stack`` of its traced elements (before:
  torch built the tensor in C++ from the elements' data, "data is not allocated yet", and every fallback failed; the
  last one's error, a PendingUnbackedSymbolNotFound, was reported).
"""
from __future__ import annotations

import torch
from torch import nn

import graphred


class _DeltasFromALoop(nn.Module):
    """Per-sample positions built in a Python loop over the ids (values read into Python), then a per-sample delta
    computed from traced positions and gathered with ``torch.tensor``."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 4)

    def forward(self, input_ids, attention_mask):
        positions, deltas = [], []
        for i in range(input_ids.shape[0]):
            tokens = input_ids[i].tolist()  # values read into Python, searched as a list
            n = len(tokens) - tokens.index(next(t for t in tokens if t != 0))
            pos = (torch.cumsum(attention_mask[i], 0) - 1).float()  # (float: computed in the graph, not folded)
            positions.append(pos)
            deltas.append(pos.max() + 1 - n)  # a traced 0-d tensor
        delta = torch.tensor(deltas, device=input_ids.device).unsqueeze(1)
        pos = torch.stack(positions) + delta
        return self.emb(input_ids) * (pos.unsqueeze(-1) + 1), delta


def test_tensor_of_traced_per_sample_values_captures():
    model = _DeltasFromALoop().eval()
    ids = torch.tensor([[1, 2, 3, 4], [0, 5, 6, 7]])
    am = torch.tensor([[1, 1, 1, 1], [0, 1, 1, 1]])
    prog = graphred.capture(model, input_ids=ids, attention_mask=am)
    assert prog.method == "draft_export", prog.notes
    with torch.no_grad():
        got, want = prog(input_ids=ids, attention_mask=am), model(input_ids=ids, attention_mask=am)
    assert got[1].dtype == want[1].dtype == torch.float32 and got[1].shape == (2, 1)
    torch.testing.assert_close(got, want)
