"""General fixes for fresh4 failures (bench/unseen_families.py, branch fixcap), each on a tiny synthetic model:

* a tensor built with ``torch.tensor`` from a Python list of per-sample traced values (Qwen3-Omni-MoE's rope
  deltas: ``torch.tensor([positions.max() + 1 - len(ids) for each sample])``), in a model whose Python also reads
  tensor values (so capture runs with values read): the list becomes the ``stack`` of its traced elements (before:
  torch built the tensor in C++ from the elements' data, "data is not allocated yet", and every fallback failed; the
  last one's error, a PendingUnbackedSymbolNotFound, was reported);
* a mixture of experts looping over the experts a batch hits (Step3p7, Mixtral-style): each expert's rows are
  ``torch.where`` of its one-hot column (a data-dependent count), run, and ``index_add_``-ed back. Capture: an
  in-place write under real-tensor propagation is applied once to the real values (torch applied ``index_add_``
  twice: the next layer's routing was read from wrong values, and the captured graph failed its own run). Rewrite:
  the nonzero of reduced tokens gives a fresh data-dependent count whose values are positions computed from the
  reduced rows (checked where they index, as sort/topk positions are), the runtime asserts that pinned the counts
  to the example inputs' are dropped, and the estimate reads the new counts from the reduced graph (before: "the
  reduced token axis reached dims [0] that the analysis did not trace" at the nonzero). Rows an input selects
  still fail;
* a PaliGemma-like prefix built as PI0 builds it: ids whose image placeholders are replaced by the pad id
  (``ids.masked_fill(ids == image_id, 0)``) are still the input's ids, so their lookup is a text stream and the
  ``where`` that merges the gathered image features makes a mixed stream (before: no text stream, no cross-modal
  block); and a per-sample float input (PI0's robot state, rank 2, taken for rows of patches) whose rows meet the
  batch axis leaves the batch the batch (before: the two streams were merged, every input's batch dim read as image
  tokens and the vision tower's patches were never found);
* a capture that every fallback fails names the error of the attempt with values read and its line too (before:
  only the last attempt's, torch's draft_export, which for Qwen3-Omni-MoE stopped at an unrelated pending symbol);
* a graph captured with values read that fails on its own example inputs, where the model runs, is a CaptureError
  (before: the check that compares it with the model skipped a graph that raised, and capture returned it).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import graphred
from graphred.errors import CaptureError, PlanError
from graphred.passes.infra import check_meta_vals
from graphred.plans import pumer
from tiny_layers import CausalLayer, ImageTextDecoder, image_text_inputs


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


V, D, IMG_ID, N_IMG = 40, 16, 39, 4


class _LoopExperts(nn.Module):
    """Top-k routing as Hugging Face's per-expert loop writes it (Step3p7, Mixtral-style): a one-hot of the chosen
    experts, a Python loop over the experts the batch hits (``nonzero``), each expert's rows by ``torch.where`` of
    its column (a data-dependent count), ``x[tok]`` run and ``index_add_`` back; or ``dense``: the same function
    computed per token without routing (the reference)."""

    def __init__(self, dense: bool = False, n_experts: int = 3, k: int = 2):
        super().__init__()
        self.dense, self.k = dense, k
        self.router = nn.Linear(D, n_experts, bias=False)
        self.w = nn.Parameter(torch.randn(n_experts, D, D) / 4)

    def forward(self, x):
        h = x.view(-1, x.shape[-1])
        w, idx = torch.topk(self.router(h), self.k, dim=-1)
        w = w.softmax(-1)
        if self.dense:
            return x + (torch.einsum("td,tkde->tke", h, self.w[idx]) * w.unsqueeze(-1)).sum(1).view(x.shape)
        out = torch.zeros_like(h)
        with torch.no_grad():
            mask = F.one_hot(idx, num_classes=self.w.shape[0]).permute(2, 1, 0)  # [E, k, T]
            hit = torch.greater(mask.sum(dim=(-1, -2)), 0).nonzero()
        for e in hit:
            e = e[0]
            slot, tok = torch.where(mask[e])
            out.index_add_(0, tok, (h[tok] @ self.w[e]) * w[tok, slot, None])
        return x + out.view(x.shape)


class _LoopMoEDecoder(ImageTextDecoder):
    def __init__(self, dense: bool = False):
        super().__init__(V, D, IMG_ID, lambda: nn.Sequential(CausalLayer(D), _LoopExperts(dense)))


def _moe_inputs():
    return image_text_inputs(V, IMG_ID, N_IMG)


def test_tokens_routed_by_a_loop_over_experts_are_reduced_like_the_dense_model():
    # each expert's rows are a nonzero of its one-hot column (a data-dependent count): their positions are computed
    # from the reduced rows at run time, so the reduced tokens take the same route (before: "the reduced token axis
    # reached dims [0] that the analysis did not trace" at the nonzero)
    torch.manual_seed(0)
    routed, dense = _LoopMoEDecoder().eval(), _LoopMoEDecoder(dense=True).eval()
    dense.load_state_dict(routed.state_dict())
    kwargs = _moe_inputs()
    outs = []
    for model in (routed, dense):
        prog = graphred.capture(model, **kwargs)
        with torch.no_grad():
            torch.testing.assert_close(prog(**kwargs), model(**kwargs))
        plan = pumer(prune=0.5, merge=0.25)
        reduced = graphred.transform(prog, plan)
        check_meta_vals(reduced.graph_module)
        with torch.no_grad():
            outs.append(reduced(**kwargs))
        assert [s["image_after"] for s in reduced.steps if s["op"] == "prune"] == [2], reduced.steps
        # the estimate reads the per-expert counts of the reduced graph at the example inputs (before: "unresolved
        # symbolic size", the rewrite's fresh counts had no value)
        est = graphred.estimate(prog, plan)
        assert est.after.flops < est.flops
    assert outs[0].shape[1] < kwargs["input_ids"].shape[1]
    torch.testing.assert_close(outs[0], outs[1])  # routing the kept tokens = computing them one by one


class _InputRowsDecoder(_LoopMoEDecoder):
    """The same, but one expert's rows are positions an input selects (``nonzero`` of a given mask): they still
    number the tokens before the reduction."""

    def forward(self, input_ids, pixel_values, rows):
        x = self.embed(input_ids)
        x = x.masked_scatter((input_ids == IMG_ID).unsqueeze(-1).expand_as(x), self.vis(pixel_values))
        x = self.layers[0](x)
        h = x.view(-1, D)
        tok = torch.nonzero(rows)[:, 0]
        x = x + h.new_zeros(h.shape).index_add_(0, tok, h[tok] @ self.layers[1][1].w[0]).view(x.shape)
        return self.head(x)


def test_expert_rows_selected_by_an_input_still_fail():
    torch.manual_seed(0)
    rows = torch.zeros(20, dtype=torch.bool)
    rows[::3] = True
    kwargs = dict(_moe_inputs(), rows=rows)
    prog = graphred.capture(_InputRowsDecoder().eval(), **kwargs)
    with pytest.raises(PlanError, match="positions not computed from the reduced tokens"):
        graphred.transform(prog, pumer(prune=0.5, merge=0.0))


class _GatheredPrefix(nn.Module):
    """A PaliGemma-like prefix as PI0 builds it: the image features gathered to every position by the rank of the
    image tokens, the text looked up from ids whose placeholders were replaced by the pad id (``masked_fill``), the
    two merged by ``where``; optionally a per-sample robot state (a rank-2 float input) projected and appended as
    one more token."""

    def __init__(self, state: bool = False):
        super().__init__()
        self.state = state
        self.embed, self.vis, self.head = nn.Embedding(V, D), nn.Linear(12, D), nn.Linear(D, V)
        self.state_proj = nn.Linear(6, D)
        self.layers = nn.ModuleList([CausalLayer(D), CausalLayer(D)])

    def forward(self, input_ids, pixel_values, state=None):
        mask = input_ids == IMG_ID
        img = self.vis(pixel_values)  # [B, N_IMG, D]
        rank = (mask.cumsum(-1) - 1).clamp(0, img.shape[1] - 1)
        img = img.gather(1, rank[..., None].expand(-1, -1, D))  # an image feature at every position
        x = torch.where(mask[..., None], img, self.embed(input_ids.masked_fill(mask, 0)))
        if self.state:
            x = torch.cat([x, self.state_proj(state)[:, None, :]], 1)
        for layer in self.layers:
            x = layer(x)
        return self.head(x)


def _prefix_inputs(state: bool = False):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, V - 2, (2, 10), generator=g)
    ids[:, 2:2 + N_IMG] = IMG_ID
    out = {"input_ids": ids, "pixel_values": torch.randn(2, N_IMG, 12, generator=g)}
    if state:
        out["state"] = torch.randn(2, 6, generator=g)
    return out


def test_ids_with_placeholders_filled_are_text_and_the_prefix_is_cross_modal():
    # ids.masked_fill(ids == image_id, 0) are still the input's ids: text tokens, with the image features merged by
    # where (before, masked_fill dropped "ids", the lookup gave no text stream and PI0 had no cross-modal block)
    torch.manual_seed(0)
    model, kwargs = _GatheredPrefix().eval(), _prefix_inputs()
    prog = graphred.capture(model, **kwargs)
    report = graphred.analyze(prog)
    assert report.cross_modal and all({"image", "text"} <= b.key_modalities for b in report.cross_modal), report.summary
    reduced = graphred.transform(prog, pumer(prune=0.5, merge=0.0))
    prunes = [s for s in reduced.steps if s["op"] == "prune"]
    assert prunes and all(s["image_after"] < s["image_before"] for s in prunes), reduced.steps
    with torch.no_grad():
        assert torch.isfinite(reduced(**kwargs)).all()


def test_a_per_sample_float_input_meeting_the_batch_stays_the_batch():
    # a rank-2 float input (a robot state, one row per sample) is taken for rows of patches; appended per sample,
    # its rows meet the batch axis. The batch stays the batch (before, the two streams were merged: every input's
    # batch dim read as image tokens, and the vision tower's own patches were never found)
    from graphred.analysis.provenance import BATCH, TokenProvenance

    torch.manual_seed(0)
    model, kwargs = _GatheredPrefix(state=True).eval(), _prefix_inputs(state=True)
    prog = graphred.capture(model, **kwargs)
    prov = TokenProvenance(prog.graph_module, prog.example_inputs())
    ids = next(n for n in prog.graph_module.graph.nodes if n.op == "placeholder" and n.target == "input_ids")
    assert prov.axes(ids, BATCH) and prov.axes(ids, BATCH)[0][0] == 0
    nodes = list(prog.graph_module.graph.nodes)
    cat = next(n for n in nodes if n.target is torch.ops.aten.cat.default)
    for n in [cat] + [n for n in nodes[nodes.index(cat):] if n.target is torch.ops.aten.linear.default]:
        # the samples (dim 0) hold no token axis where the sequence and the state met, nor anywhere after
        assert prov.axes(n) and all(d != 0 for d, _ in prov.axes(n)), (n.name, prov.axes(n))
    report = graphred.analyze(prog)
    assert report.cross_modal and all({"image", "text"} <= b.key_modalities for b in report.cross_modal), report.summary


class _LeavesTorch(nn.Module):
    """Branches on a value (so capture falls back), then leaves torch (numpy): no fallback captures it."""

    def forward(self, x):
        if x.sum() > 0:
            x = x * 2
        return x + torch.from_numpy(x.detach().numpy() * 0)  # the line every attempt stops at


def test_a_capture_failing_every_fallback_names_the_values_read_attempt():
    # the last attempt (torch's draft_export) often stops somewhere unrelated (Qwen3-Omni-MoE: a pending unbacked
    # symbol in the vision tower, where the values-read attempt had stopped at the model's torch.tensor(list)):
    # the error names both
    with pytest.raises(CaptureError) as err:
        graphred.capture(_LeavesTorch().eval(), x=torch.ones(3))
    msg = str(err.value)
    assert "With tensor values read at the example inputs" in msg, msg
    assert msg.count("test_unseen_fixes5.py") == 2 and "from_numpy" in msg, msg


def test_a_captured_graph_that_fails_on_its_example_inputs_is_a_capture_error(monkeypatch):
    # without the single real write (torch's double index_add_ on the real values), the loop's routing in the
    # second layer is read from wrong values, and the graph's runtime asserts pin counts the model does not have:
    # the graph fails on its own example inputs. That is a CaptureError now (before, the check skipped a graph
    # that raised, and capture returned it)
    from graphred import program as program_mod

    monkeypatch.setattr(program_mod, "_run_writing_real_once", lambda func, args, kwargs, run: run())
    torch.manual_seed(0)
    with pytest.raises(CaptureError, match="fails on those inputs"):
        graphred.capture(_LoopMoEDecoder().eval(), **_moe_inputs())


class _OneExpertHit(nn.Module):
    """A loop over the experts a batch hits (top-1 of a fixed router): tokens along the first axis go to expert 0,
    along the third to expert 2."""

    def __init__(self):
        super().__init__()
        self.router = nn.Linear(4, 3, bias=False)
        with torch.no_grad():
            self.router.weight.copy_(torch.eye(3, 4))
        self.w = nn.Parameter(torch.randn(3, 4, 4))

    def forward(self, x):
        top = self.router(x).topk(1, -1).indices
        out = torch.zeros_like(x)
        with torch.no_grad():
            hit = torch.greater(F.one_hot(top, 3).sum(dim=(0, 1)), 0).nonzero()
        for e in hit:
            e = e[0]
            tok, _ = torch.where(top == e)
            out.index_add_(0, tok, x[tok] @ self.w[e])
        return out


def test_a_call_routed_to_other_experts_than_the_capture_is_refused():
    # capture unrolls the loop over the experts the example hits (expert 0 only); a call whose tokens go to expert
    # 2 breaks the guard and is an InputError (before: the graph ran expert 0's loop only and returned zeros)
    from graphred.errors import InputError

    torch.manual_seed(0)
    model = _OneExpertHit().eval()
    x0 = torch.rand(5, 4) * 0.1 + torch.tensor([1.0, 0, 0, 0])
    x2 = torch.rand(5, 4) * 0.1 + torch.tensor([0, 0, 1.0, 0])
    prog = graphred.capture(model, x=x0)
    with torch.no_grad():
        torch.testing.assert_close(prog(x=x0), model(x=x0))
        assert model(x=x2).abs().sum() > 0
        with pytest.raises(InputError, match="Guard failed"):
            prog(x=x2)
