"""General fixes found by bench/unseen_families.py on its dev families, each on a tiny synthetic model.

* image tokens made by a VQ tokenizer (Emu3): the image's codes are looked up in the text embedding table and
  scattered into the prompt; they are image tokens (before, the lookup dropped the image's provenance);
* input ids with a constant written into them (IDEFICS' decoupled embedding zeroes out-of-table ids) are still
  the prompt's ids: its embedding is the text stream (before, no text was found);
* capture with values read at the example inputs: a large boolean mask index and ``nonzero(as_tuple=True)``
  under ``torch.no_grad`` (ColQwen2, Phi-4-multimodal) capture, and the captured graph is checked against the
  model on the example inputs (a wrong specialisation is a CaptureError, not wrong outputs later);
* tokens routed to experts (Aria's mixture of experts): rows flattened, top-k experts per token, rows sorted by
  expert (``sort`` positions, ``x[perm // k]``), the inverse permutation (``inv[perm] = arange``) and
  ``view(N, k, C).sum(1)``: reduced tokens take the same route (before, "advanced indexing on the reduced token
  axis"); positions from an input still fail; tokens tiled once per expert (Llama 4: ``repeat(E, 1)``,
  ``view(E, -1, C)``; before, "reshaped to a layout with no dim for the tokens"); logits masked on the vocabulary
  axis after the cut (``logits[:, :, ids] = -inf``, Chameleon's image-token ids; before, "reached dims that the
  analysis did not trace"); ``torch.min`` of two tensors on the tokens (Pix2Struct's relative position buckets;
  before, the analysis took it for a reduction and lost the token axis); the same routing captured with
  values read into Python (ERNIE-4.5-VL-MoE, GLM-4.5V-MoE: image counts as dict keys): ``empty_like(perm)`` is no
  longer folded into a constant of uninitialised memory, lost the write ``inv[perm] = arange`` (before, an
  IndexError at run-time-garbage positions, reported as "unhashable type: non-nested SymInt");
* a model whose Python asks ``torch.compiler.is_exporting()`` (Phi-4-multimodal: Hugging Face's mask helper keeps
  an all-true mask under export and drops it eagerly, where the vision attention, declared causal, then masks
  causally): the graph of the exported path differs from the model; the CaptureError names that cause (before,
  "does not reproduce the model", cause unknown);
* a composite op on symbolic sizes (Nemotron-H-Omni's vision tower: ``interpolate`` to a size computed in the
  graph, ``upsample_bilinear2d.vec``): graphred's fake propagation (the meta check after every pass,
  ``set_fake_val``) runs it through the Python dispatcher as torch.export does (before, "SymIntArrayRef expected
  to contain only concrete integers", reported as CSEPass failing its checks);
* a boolean mask index over a large traced mask in a capture with values read (Hugging Face's placeholder check
  ``inputs_embeds[mask.unsqueeze(-1).expand_as(inputs_embeds)].numel()``, dots3_note, minimax_m3_vl): taken as
  ``nonzero().unbind(1)`` indices, traced (before, "Pending unbacked symbols ... not in returned outputs");
* an index given as Python sequences of traced 0-d tensors (UDOP: ``rows, cols = zip(*ind)``,
  ``patch_inds[rows, cols] = False``): stacked into a traced index tensor in a capture with values read (before,
  "data is not allocated yet", not taken for data-dependent, no fallback);
* keys assembled in place (dots3_note: ``k = h.new_empty(...)``, ``k[..., :8].copy_(k_nope)``,
  ``k[..., 8:].copy_(k_rot)``): the written values' token axes are carried back through the slices to the buffer
  (before, the buffer was a constant with no tokens, the block had no key modality, no cross-modal block);
* unfused attention with a sink (hy_v4_vl: a learned column ``cat`` to the scores on the key dim before the
  softmax, ``probs[..., :-1]`` after): found as attention (before, not recognised, no decoder block);
* flattened patches that carry each patch's row and column ids in their first columns (Pix2Struct: ``x[..., 2:]``
  projected, ``x[..., 0].long()`` looked up): the projected columns are raw features, their rows image tokens
  (before, the slice dropped "raw" and the other column reads made the input look used elsewhere: no image stream);
* window lengths read into Python for a ``split`` (EXAONE-4.5's vision attention: ``cu_seqlens`` from
  ``unique_consecutive``, ``torch.split(q, lengths.tolist())``): the ``unbind`` behind ``tolist`` has 0-d pieces in
  ``meta["val"]`` (before, torch's fake kernel kept the unbacked dim, and the meta check failed once a recompute
  knew the size: "meta['val'] is stale", reported as CSEPass failing its checks);
* integer bookkeeping folded to a constant in a capture with values read, then written in place (Qwen4-Exp's
  position ids: ``pos[0] += k``): each call starts from a fresh copy (before, the graph wrote into its stored
  constant and the second call's outputs differed from the first's);
* a model whose code computes differently when told it is exported (Hugging Face's reference gated delta rule in
  MiniCPM-OCR and Qwen4-Exp: a triangular solve eagerly, forward substitution under ``is_exporting()``): captured
  again with the model's code told it is not exported, the graph reproduces the model bit for bit (before, the
  graph differed from the model by rounding, 2e-7, and zero reduction was not bit-exact); where the flag alone
  decides a dropped mask (the Phi-4-like model without the traced-tensor check), the graph is the eager path;
* small token ids viewed in a capture with values read (UDOP's T5 stack: ``input_ids.view(-1, L)``): views are
  not folded (before, the view became a constant, the graph ignored its ids and no text stream was found);
* patches gathered at each word's box and added to the word, the other patches picked by an index (UDOP:
  ``gather`` along the tokens, ``x[i][mask]``): the gathered rows carry the provenance of their source rows, and
  rows added onto another sequence's tokens are features of those tokens (before, ``aten.gather`` had no rule);
  PuMer reduces in the fused encoder of an encoder-decoder (before, a tie chose the decoder's cross-attention,
  whose reduction saved less than its scoring cost: UDOP's FLOPs rose);
* tokens through a unit triangular solve along the tokens (the eager path of the gated delta rule, now captured:
  Qwen4-Exp), a hidden state tiled on its features (``repeat(1, 1, k)``) and keys repeated over heads
  (``repeat_interleave``): the token axis is kept (before, no rule for any of them; Qwen4-Exp's attention after
  them had no token axis).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch._subclasses.functional_tensor import FunctionalTensor

import graphred
from graphred import program as program_mod
from graphred.analysis.blocks import CROSS_MODAL_SELF
from graphred.errors import CaptureError, PlanError
from graphred.passes.infra import check_meta_vals
from graphred.plans import pumer
from tiny_layers import CausalLayer

V, D, IMG_ID, N_IMG = 40, 16, 39, 4


class _VQDecoder(nn.Module):
    """Image -> conv -> nearest codebook entry -> code ids mapped into the vocabulary -> the text table ->
    scattered into the prompt's placeholders; optionally a decoupled vocabulary (ids >= V - 8 zeroed for the
    main table, looked up in a second one)."""

    def __init__(self, decoupled: bool = False):
        super().__init__()
        self.decoupled = decoupled
        self.conv = nn.Conv2d(3, 8, 4, 4)
        self.codebook = nn.Parameter(torch.randn(6, 8))
        self.register_buffer("code_to_id", torch.arange(6) + 10)
        self.embed = nn.Embedding(V, D)
        self.extra = nn.Embedding(8, D)
        self.layers = nn.ModuleList([CausalLayer(D), CausalLayer(D)])

    def forward(self, input_ids, pixel_values):
        ids = input_ids
        if self.decoupled:
            ids = input_ids.clone()
            ids[input_ids >= V - 8] = 0
        x = self.embed(ids)
        if self.decoupled:
            x = x + self.extra((input_ids - (V - 8)).clamp(min=0))
        f = self.conv(pixel_values).flatten(2).transpose(1, 2)  # [B, 4, 8]
        codes = torch.cdist(f, self.codebook.expand(f.shape[0], -1, -1)).argmin(-1)
        img = self.embed(self.code_to_id[codes])  # the image's tokens, from the text table
        mask = (input_ids == IMG_ID).unsqueeze(-1).expand_as(x)
        x = x.masked_scatter(mask, img)
        for layer in self.layers:
            x = layer(x)
        return x


def _inputs():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(20, V - 8, (2, 10), generator=g)
    ids[:, 2:2 + N_IMG] = IMG_ID
    return {"input_ids": ids, "pixel_values": torch.randn(2, 3, 8, 8, generator=g)}


def _decoder_blocks(model, kwargs):
    report = graphred.analyze(graphred.capture(model, **kwargs))
    return [b for b in report.blocks if b.kind == CROSS_MODAL_SELF], report


def test_vq_codes_through_the_text_table_are_image_tokens():
    torch.manual_seed(0)
    model, kwargs = _VQDecoder().eval(), _inputs()
    decoder, report = _decoder_blocks(model, kwargs)
    assert len(decoder) == 2, str(report)
    assert all([t["image"] for t in b.tokens_per_sample] == [N_IMG, N_IMG] for b in decoder)


def test_constant_written_into_input_ids_keeps_them_text():
    torch.manual_seed(0)
    model, kwargs = _VQDecoder(decoupled=True).eval(), _inputs()
    decoder, report = _decoder_blocks(model, kwargs)
    assert len(decoder) == 2, str(report)
    assert all([t.get("text") for t in b.tokens_per_sample] == [10 - N_IMG] * 2 for b in decoder)
    prog = graphred.capture(model, **kwargs)
    reduced = graphred.transform(prog, pumer(prune=0.5, merge=0.0))
    with torch.no_grad():
        assert reduced(**kwargs).shape[1] < kwargs["input_ids"].shape[1]


class _MaskedRows(nn.Module):
    """Rows picked by a mask built from a small grid input (ColQwen2 unpads its patches so), a branch on the
    ids, and image positions found by ``nonzero(as_tuple=True)`` under ``no_grad`` (Phi-4-multimodal)."""

    def __init__(self):
        super().__init__()
        self.embed, self.proj = nn.Embedding(V, D), nn.Linear(4, D)

    def forward(self, input_ids, patches, grid):
        counts = grid[:, 0] * grid[:, 1]
        keep = torch.arange(patches.shape[1])[None] < counts[:, None]  # [B, 40]: 80 > 64 elements
        feats = self.proj(patches[keep])
        x = self.embed(input_ids)
        if (input_ids == IMG_ID).any():  # a data-dependent branch: the capture reads values
            with torch.no_grad():
                pos = torch.nonzero(input_ids == IMG_ID, as_tuple=True)
            x = x.index_put(pos, feats[: pos[0].shape[0]])
        return x


def _masked_rows_captured():
    torch.manual_seed(0)
    model = _MaskedRows().eval()
    ids = torch.randint(0, V - 2, (2, 12))
    ids[:, 3:7] = IMG_ID
    kwargs = {"input_ids": ids, "patches": torch.randn(2, 40, 4), "grid": torch.tensor([[2, 2], [2, 2]])}
    return model, kwargs, graphred.capture(model, **kwargs)


def test_mask_index_and_nonzero_tuple_capture_with_values_read():
    model, kwargs, prog = _masked_rows_captured()
    assert prog.method == "draft_export"
    with torch.no_grad():
        assert torch.equal(prog.graph_module(**kwargs), model(**kwargs))
    # the positions' count is bound where nonzero makes it: the graph re-propagates (it did not in a no_grad block)
    check_meta_vals(prog.graph_module)


def test_a_specialised_graph_that_differs_from_the_model_is_a_capture_error():
    model, kwargs, prog = _masked_rows_captured()
    other = _MaskedRows().eval()  # other weights: what a wrongly specialised graph computes, for the check
    with pytest.raises(CaptureError, match=r"does not reproduce the model .*output out, shape \(2, 12, 16\)"):
        program_mod._check_specialised(other, prog.graph_module, (), kwargs, "")
    program_mod._check_specialised(model, prog.graph_module, (), kwargs, "")  # the right graph passes


class _Experts(nn.Module):
    """Top-k routing as Hugging Face's grouped experts do it (sort rows by expert, run, restore the order), or
    ``dense``: the same function computed per token without routing (the reference)."""

    def __init__(self, dense: bool = False, n_experts: int = 3, k: int = 2, tiled: bool = False):
        super().__init__()
        self.dense, self.k, self.tiled = dense, k, tiled
        self.router = nn.Linear(D, n_experts, bias=False)
        self.w = nn.Parameter(torch.randn(n_experts, D, D) / 4)

    def forward(self, x):
        if self.dense:
            w, idx = torch.topk(self.router(x), self.k, dim=-1)
            return x + (torch.einsum("bld,blkde->blke", x, self.w[idx]) * w.softmax(-1).unsqueeze(-1)).sum(2)
        h = x.view(-1, x.shape[-1])
        if self.tiled:  # Llama 4: every token tiled once per expert, weighted by its score, viewed [E, -1, C]
            w, idx = torch.topk(self.router(h), self.k, dim=-1)
            scores = torch.zeros_like(self.router(h)).scatter(1, idx, w.softmax(-1))
            rows = h.repeat(self.w.shape[0], 1) * scores.transpose(0, 1).reshape(-1, 1)
            out = torch.bmm(rows.view(self.w.shape[0], -1, x.shape[-1]), self.w)
            return x + out.view(self.w.shape[0], -1, x.shape[-1]).sum(0).view(x.shape)
        w, idx = torch.topk(self.router(h), self.k, dim=-1)
        ids_g, perm = torch.sort(idx.reshape(-1))
        rows = torch.bmm(h[perm // self.k].unsqueeze(1), self.w[ids_g]).squeeze(1)
        rows = rows * w.softmax(-1).reshape(-1)[perm].unsqueeze(-1)
        inv = torch.empty_like(perm)
        inv[perm] = torch.arange(perm.size(0))
        return x + rows[inv].view(h.shape[0], self.k, x.shape[-1]).sum(1).view(x.shape)


class _MoEDecoder(nn.Module):
    """Layer 0 routes by sorting, layer 1 by tiling (or both dense)."""

    def __init__(self, dense: bool = False, shuffle: bool = False, python_keys: bool = False):
        super().__init__()
        self.shuffle, self.python_keys = shuffle, python_keys
        self.embed, self.vis, self.head = nn.Embedding(V, D), nn.Linear(12, D), nn.Linear(D, V)
        self.layers = nn.ModuleList([nn.Sequential(CausalLayer(D), _Experts(dense, tiled=i == 1)) for i in range(2)])

    def forward(self, input_ids, pixel_values, order=None):
        x = self.embed(input_ids)
        x = x.masked_scatter((input_ids == IMG_ID).unsqueeze(-1).expand_as(x), self.vis(pixel_values))
        x = torch.min(x, torch.full_like(x, 1e4))  # elementwise min of two tensors (T5-style position buckets)
        if self.python_keys:  # image counts read into Python as dict keys (as M-RoPE index builders do)
            x = x * {c: 1.0 for c in (input_ids == IMG_ID).sum(1).tolist()}[N_IMG]
        for layer in self.layers:
            x = layer(x)
        if self.shuffle:  # tokens reordered by positions an input gives: not computed from the tokens
            x = x[:, order]
        logits = self.head(x)
        logits[:, :, torch.tensor([0, IMG_ID])] = -1e4  # ids never generated, masked on the vocabulary axis
        return logits


def _moe_inputs():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, V - 2, (2, D), generator=g)  # (as many tokens as channels: [B*L*k, C] -> [B*L, k, C]
    ids[:, 2:2 + N_IMG] = IMG_ID                          # has two sizes that are multiples of L)
    return {"input_ids": ids, "pixel_values": torch.randn(2, N_IMG, 12, generator=g)}


def test_tokens_routed_to_experts_are_reduced_like_the_dense_model():
    torch.manual_seed(0)
    routed, dense = _MoEDecoder().eval(), _MoEDecoder(dense=True).eval()
    dense.load_state_dict(routed.state_dict())
    kwargs = _moe_inputs()
    outs = []
    for model in (routed, dense):
        prog = graphred.capture(model, **kwargs)
        reduced = graphred.transform(prog, pumer(prune=0.5, merge=0.25))
        check_meta_vals(reduced.graph_module)
        with torch.no_grad():
            outs.append(reduced(**kwargs))
        assert [s["image_after"] for s in reduced.steps if s["op"] == "prune"] == [2], reduced.steps
    assert outs[0].shape[1] < kwargs["input_ids"].shape[1]
    torch.testing.assert_close(outs[0], outs[1])  # routing the kept tokens = computing them one by one


def test_tokens_indexed_by_an_inputs_positions_still_fail():
    torch.manual_seed(0)
    kwargs = dict(_moe_inputs(), order=torch.arange(D - 1, -1, -1))
    prog = graphred.capture(_MoEDecoder(dense=True, shuffle=True).eval(), **kwargs)
    with pytest.raises(PlanError, match="positions not computed from the reduced tokens"):
        graphred.transform(prog, pumer(prune=0.5, merge=0.0))


class _MaskDroppedEagerly(nn.Module):
    """An all-true patch mask dropped unless exporting (as Hugging Face's mask helpers do), then attention that is
    causal when it has no mask; a data-dependent branch on the ids sends capture down its values-read path.
    ``fake_check``: the mask is also kept where it is a traced tensor (Hugging Face's ``is_tracing``)."""

    def __init__(self, fake_check: bool = True):
        super().__init__()
        self.embed, self.proj = nn.Embedding(V, D), nn.Linear(4, D)
        self.fake_check = fake_check

    def forward(self, input_ids, patches, patch_mask):
        x = self.proj(patches)
        B, P, _ = x.shape
        q = x.view(B, P, 2, D // 2).transpose(1, 2)
        mask = patch_mask
        traced = self.fake_check and isinstance(mask, (torch._subclasses.FakeTensor, FunctionalTensor))
        if not (torch.compiler.is_exporting() or traced) and bool(mask.all()):
            mask = None
        if mask is None:
            a = F.scaled_dot_product_attention(q, q, q, is_causal=True)
        else:
            a = F.scaled_dot_product_attention(q, q, q, attn_mask=mask[:, None, None, :])
        img = a.transpose(1, 2).reshape(B, P, D)
        e = self.embed(input_ids)
        if (input_ids == IMG_ID).any():
            e = e.masked_scatter((input_ids == IMG_ID).unsqueeze(-1).expand_as(e), img)
        return e


def test_a_model_that_branches_on_exporting_is_named_as_the_cause():
    """(Where hiding the flag from the model's code is not enough: the mask is also kept because it is traced.)"""
    torch.manual_seed(0)
    model = _MaskDroppedEagerly(fake_check=True).eval()
    ids = torch.randint(0, V - 2, (2, 10))
    ids[:, 2:2 + N_IMG] = IMG_ID
    mask = torch.ones(2, N_IMG, dtype=torch.bool)
    kwargs = {"input_ids": ids, "patches": torch.randn(2, N_IMG, 4), "patch_mask": mask}
    with pytest.raises(CaptureError, match=r"computes differently while it is traced: run eagerly with "
                                           r"torch.compiler.is_exporting\(\) true"):
        graphred.capture(model, **kwargs)
    mask[1, -1] = False  # a masked position: both paths keep the mask, and the graph is the model
    prog = graphred.capture(model, **kwargs)
    with torch.no_grad():
        torch.testing.assert_close(prog.graph_module(**kwargs), model(**kwargs))


def test_a_model_that_branches_on_exporting_only_is_captured_down_its_eager_path():
    """(The flag alone decides: the graph is captured with the model's code told it is not exported.)"""
    torch.manual_seed(0)
    model = _MaskDroppedEagerly(fake_check=False).eval()
    ids = torch.randint(0, V - 2, (2, 10))
    ids[:, 2:2 + N_IMG] = IMG_ID
    kwargs = {"input_ids": ids, "patches": torch.randn(2, N_IMG, 4), "patch_mask": torch.ones(2, N_IMG, dtype=torch.bool)}
    prog = graphred.capture(model, **kwargs)
    with torch.no_grad():
        assert torch.equal(prog(**kwargs), model(**kwargs))
    assert any("is_exporting" in note for note in prog.notes), prog.notes


class _SolveOrSubstitute(nn.Module):
    """A unit lower-triangular solve eagerly, forward substitution when exported (Hugging Face's reference gated
    delta rule, Qwen3.5 / MiniCPM-OCR / Qwen4-Exp): the same maths, rounded differently. ``eager_exports``: False
    where the eager path cannot be captured (it leaves torch), so the exported path's graph stands."""

    def __init__(self, eager_exports: bool = True):
        super().__init__()
        self.a, self.eager_exports = nn.Linear(D, D), eager_exports

    def forward(self, x):
        m = torch.tril(self.a(x) @ x.transpose(-1, -2), -1) * 0.3  # [B, L, L], strictly lower
        if not torch.compiler.is_exporting():
            if not self.eager_exports:
                x = x + torch.from_numpy(x.detach().numpy() * 0)  # (numpy: a fake tensor has no data)
            eye = torch.eye(x.shape[1])
            return torch.linalg.solve_triangular(m + eye, x, upper=False, unitriangular=True)
        inv = -m
        for i in range(1, x.shape[1]):
            row = inv[..., i, :i].clone()
            inv[..., i, :i] = row + (row.unsqueeze(-1) * inv[..., :i, :i].clone()).sum(-2)
        return (inv + torch.eye(x.shape[1])) @ x


def test_a_model_that_rounds_differently_when_exported_is_captured_bit_exact():
    torch.manual_seed(0)
    x = torch.randn(2, 12, D)
    model = _SolveOrSubstitute().eval()
    with torch.no_grad():
        want = model(x)
        with program_mod._exporting_flag_for_model_code(True, []):
            exported_path = model(x)
    assert not torch.equal(want, exported_path)  # (the premise: the two paths round differently)
    torch.testing.assert_close(want, exported_path)
    prog = graphred.capture(model, x=x)
    with torch.no_grad():
        assert torch.equal(prog(x=x), want)
        assert torch.equal(graphred.transform(prog, pumer(prune=0, merge=0))(x=x), want)
    assert any("is_exporting" in note for note in prog.notes), prog.notes
    # where the eager path does not capture, the exported path's graph stands (within rounding of the model)
    other = _SolveOrSubstitute(eager_exports=False).eval()
    other.load_state_dict(model.state_dict())
    prog = graphred.capture(other, x=x)
    with torch.no_grad():
        assert torch.equal(prog(x=x), exported_path)
    assert not any("is_exporting" in note for note in prog.notes), prog.notes


def test_routing_captured_with_values_read_keeps_its_inverse_permutation():
    torch.manual_seed(0)
    model, kwargs = _MoEDecoder(python_keys=True).eval(), _moe_inputs()
    prog = graphred.capture(model, **kwargs)
    assert prog.method == "draft_export"
    with torch.no_grad():
        torch.testing.assert_close(prog.graph_module(**kwargs), model(**kwargs))


class _ResizeToSymbolicSize(nn.Module):
    def forward(self, x):
        s = x.shape[-1] * 2  # a size computed in the graph: symbolic when the input's size is
        return F.interpolate(x, size=(s, s), mode="bilinear")


def test_composite_op_on_symbolic_sizes_passes_the_meta_check():
    from torch.export import Dim

    from graphred.fx_utils import set_fake_val

    side = Dim("side", min=2, max=64)
    ep = torch.export.export(_ResizeToSymbolicSize(), (torch.randn(1, 2, 4, 4),),
                             dynamic_shapes=({2: side, 3: side},))
    gm = ep.graph_module
    up = [n for n in gm.graph.nodes if n.target is torch.ops.aten.upsample_bilinear2d.vec]
    assert len(up) == 1 and not isinstance(up[0].args[1][0], int)  # the op and its symbolic size are in the graph
    check_meta_vals(gm)  # raised "SymIntArrayRef expected to contain only concrete integers" before
    recorded = up[0].meta["val"].shape
    new = set_fake_val(up[0])
    assert new.shape[:2] == (1, 2) and str(new.shape[2]) == str(recorded[2]) and str(new.shape[2]) != "8"


class _PlaceholderCheck(nn.Module):
    """Image features scattered at the image-token positions after Hugging Face's placeholder check (the mask
    expanded to the hidden size and indexed: 2 * 12 * 16 elements, larger than any folded mask), behind a
    data-dependent branch, so the capture reads values."""

    def __init__(self):
        super().__init__()
        self.embed, self.proj = nn.Embedding(V, D), nn.Linear(4, D)

    def forward(self, input_ids, patches):
        x, feats = self.embed(input_ids), self.proj(patches).reshape(-1, D)
        mask = (input_ids == IMG_ID).unsqueeze(-1).expand_as(x)
        torch._check(x[mask].numel() == feats.numel())
        if (input_ids == IMG_ID).any():
            x = x.masked_scatter(mask, feats)
        return x


def test_large_mask_index_captures_with_values_read():
    torch.manual_seed(0)
    model = _PlaceholderCheck().eval()
    ids = torch.randint(0, V - 2, (2, 12))
    ids[:, 3:7] = IMG_ID
    kwargs = {"input_ids": ids, "patches": torch.randn(2, 4, 4)}
    with pytest.raises(Exception, match="Pending unbacked"):  # torch's own real-tensor propagation
        program_mod._export_real_tensors(model, (), kwargs)
    prog = graphred.capture(model, **kwargs)
    assert prog.method == "draft_export"
    with torch.no_grad():
        assert torch.equal(prog.graph_module(**kwargs), model(**kwargs))
    check_meta_vals(prog.graph_module)
    # the mask stays computed from the ids (not folded to the example's positions)
    assert any(n.target is torch.ops.aten.nonzero.default for n in prog.graph_module.graph.nodes)


class _PatchesByPosition(nn.Module):
    """Patches picked by the positions of the tokens' boxes (UDOP): the positions unpacked into Python tuples of
    0-d tensors and used as an index."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, D)

    def forward(self, patches, points):
        x = self.proj(patches)  # [B, 6, D]
        keep = torch.full_like(x[:, :, 0], True).bool()
        ind = torch.cat([torch.arange(len(points))[:, None].repeat(1, points.size(-1))[:, :, None], points[:, :, None]],
                        dim=-1).flatten(0, 1)
        rows, cols = zip(*ind)
        keep[rows, cols] = False
        return x * keep[:, :, None]


def test_index_by_a_sequence_of_traced_scalars_captures():
    torch.manual_seed(0)
    model = _PatchesByPosition().eval()
    kwargs = {"patches": torch.randn(2, 6, 4), "points": torch.tensor([[0, 2], [1, 5]])}
    prog = graphred.capture(model, **kwargs)
    assert prog.method == "draft_export"
    with torch.no_grad():
        assert torch.equal(prog.graph_module(**kwargs), model(**kwargs))
    # the positions are computed from the input in the graph, not folded to the example's values
    assert any(n.target is torch.ops.aten.stack.default for n in prog.graph_module.graph.nodes)


class _BufferKeyLayer(CausalLayer):
    """Attention whose keys are written into a fresh buffer in two slices (``new_empty`` then ``copy_``)."""

    def forward(self, x):
        B, L, _ = x.shape
        q, k, v = self.qkv(x).view(B, L, 3, 2, D // 2).permute(2, 0, 3, 1, 4)
        key = q.new_empty(B, 2, L, D // 2)
        key[..., : D // 4].copy_(k[..., : D // 4])
        key[..., D // 4:].copy_(k[..., D // 4:] * 2)
        return x + self.out(F.scaled_dot_product_attention(q, key, v, is_causal=True).transpose(1, 2).reshape(B, L, D))


def test_keys_written_into_a_buffer_keep_their_tokens():
    torch.manual_seed(0)
    model, kwargs = _VQDecoder().eval(), _inputs()
    model.layers = nn.ModuleList([_BufferKeyLayer(), _BufferKeyLayer()])
    decoder, report = _decoder_blocks(model, kwargs)
    assert len(decoder) == 2, str(report)
    assert all(b.key_stream is not None and "image" in b.key_modalities for b in decoder)
    prog = graphred.capture(model, **kwargs)
    with torch.no_grad():
        want = model(**kwargs)
        assert torch.equal(graphred.transform(prog, pumer(prune=0, merge=0))(**kwargs), want)
        reduced = graphred.transform(prog, pumer(prune=0.5, merge=0.0))
        assert reduced(**kwargs).shape[1] < kwargs["input_ids"].shape[1]


class _SinkLayer(CausalLayer):
    """Unfused causal attention with an attention sink (a learned logit per head joined to the scores)."""

    def __init__(self):
        super().__init__()
        self.sinks = nn.Parameter(torch.zeros(2))

    def forward(self, x):
        B, L, _ = x.shape
        q, k, v = self.qkv(x).view(B, L, 3, 2, D // 2).permute(2, 0, 3, 1, 4)
        mask = torch.full((L, L), float("-inf")).triu(1)
        w = torch.matmul(q, k.transpose(2, 3)) * (D // 2) ** -0.5 + mask
        w = torch.cat([w, self.sinks.reshape(1, -1, 1, 1).expand(B, -1, L, -1)], dim=-1)
        probs = F.softmax(w - w.max(dim=-1, keepdim=True).values, dim=-1)[..., :-1]
        return x + self.out(torch.matmul(probs, v).transpose(1, 2).reshape(B, L, D))


def test_attention_with_a_sink_is_found_and_reduced():
    torch.manual_seed(0)
    model, kwargs = _VQDecoder().eval(), _inputs()
    model.layers = nn.ModuleList([_SinkLayer(), _SinkLayer()])
    decoder, report = _decoder_blocks(model, kwargs)
    assert len(decoder) == 2 and all(not b.fused for b in decoder), str(report)
    prog = graphred.capture(model, **kwargs)
    with torch.no_grad():
        assert torch.equal(graphred.transform(prog, pumer(prune=0, merge=0))(**kwargs), model(**kwargs))
        reduced = graphred.transform(prog, pumer(prune=0.5, merge=0.0))
        assert reduced(**kwargs).shape[1] < kwargs["input_ids"].shape[1]


class _PatchIdsDecoder(nn.Module):
    """Flattened patches [B, N, 2 + 4]: row and column ids in the first two columns, the pixels after them."""

    def __init__(self):
        super().__init__()
        self.proj, self.row, self.col = nn.Linear(4, D), nn.Embedding(8, D), nn.Embedding(8, D)
        self.embed = nn.Embedding(V, D)
        self.encoder, self.layers = CausalLayer(D), nn.ModuleList([CausalLayer(D), CausalLayer(D)])

    def forward(self, input_ids, flattened_patches):
        rows, cols = flattened_patches[:, :, 0].long(), flattened_patches[:, :, 1].long()
        img = self.encoder(self.proj(flattened_patches[:, :, 2:]) + self.row(rows) + self.col(cols))
        x = torch.cat([img, self.embed(input_ids)], dim=1)
        for layer in self.layers:
            x = layer(x)
        return x


def test_flattened_patches_with_position_columns_are_image_tokens():
    torch.manual_seed(0)
    patches = torch.randn(2, 6, 6)
    patches[:, :, 0], patches[:, :, 1] = (torch.arange(6) // 3).float(), (torch.arange(6) % 3).float()
    kwargs = {"input_ids": torch.randint(0, V, (2, 5)), "flattened_patches": patches}
    model = _PatchIdsDecoder().eval()
    decoder, report = _decoder_blocks(model, kwargs)
    assert len(decoder) == 2 and all(b.tokens == {"image": 6, "text": 5} for b in decoder), str(report)
    encoder = [b for b in report.blocks if b.module_path == "encoder"]
    # the image's own attention, before any text: its tokens are found from the projection alone
    assert len(encoder) == 1 and encoder[0].tokens == {"image": 6} and encoder[0].query_stream is not None, str(report)
    prog = graphred.capture(model, **kwargs)
    with torch.no_grad():
        reduced = graphred.transform(prog, pumer(prune=0.5, merge=0.0))
        assert reduced(**kwargs).shape[1] < 11


class _SplitByLengths(nn.Module):
    """Window lengths read into Python for a ``split`` (a vision tower's windowed attention)."""

    def forward(self, x, cu):
        cu = torch.unique_consecutive(cu)  # (an unbacked count of windows)
        parts = torch.split(x, (cu[1:] - cu[:-1]).tolist(), dim=1)
        return torch.cat([p * (i + 1) for i, p in enumerate(parts)], 1)


def test_unbind_behind_tolist_has_0d_pieces_in_meta():
    x, cu = torch.randn(2, 8), torch.tensor([0, 3, 3, 8], dtype=torch.int32)
    model = _SplitByLengths()
    prog = graphred.capture(model, x=x, cu=cu)
    gm = prog.graph_module
    unbinds = [n for n in gm.graph.nodes if n.target is torch.ops.aten.unbind.int]
    assert unbinds
    for n in unbinds:
        rank = n.args[0].meta["val"].dim() - 1
        assert [p.dim() for p in n.meta["val"]] == [rank] * len(n.meta["val"]), n.meta["val"]
        assert all(u.meta["val"].dim() == rank for u in n.users)
    check_meta_vals(gm)
    with torch.no_grad():
        torch.testing.assert_close(prog(x=x, cu=cu), model(x, cu))


class _FoldedThenWritten(nn.Module):
    """Integer bookkeeping folded at capture (values read as dict keys send capture down that path), then
    written in place."""

    def forward(self, x, grid):
        x = x * {c: 1.0 for c in grid.tolist()}[1]
        pos = grid.cumsum(0)
        pos[0] += 4
        return x * pos.float().sum()


def test_constant_written_in_place_starts_fresh_at_each_call():
    x, grid = torch.randn(2, 3), torch.tensor([1, 2, 3])
    model = _FoldedThenWritten()
    prog = graphred.capture(model, x=x, grid=grid)
    with torch.no_grad():
        want = model(x, grid)
        for _ in range(3):
            torch.testing.assert_close(prog(x=x, grid=grid), want)
    assert any("tensor constant" in note for note in prog.notes), prog.notes


class _FoldedIds(nn.Module):
    """Small token ids viewed (``input_ids.view(-1, L)``, as T5-style stacks do) in a capture with values read."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(V, D)

    def forward(self, input_ids, grid):
        scale = {c: 1.0 for c in grid.tolist()}[1]  # (values read: capture takes its values-read path)
        return self.embed(input_ids.view(-1, input_ids.shape[-1])) * scale


def test_a_view_of_small_ids_is_not_folded_into_a_constant():
    model = _FoldedIds().eval()
    ids, grid = torch.randint(0, V, (2, 6)), torch.tensor([1, 2])
    prog = graphred.capture(model, input_ids=ids, grid=grid)
    other = (ids + 1) % V
    with torch.no_grad():  # (before, the view was a constant: the graph ignored its input_ids)
        assert torch.equal(prog.graph_module(input_ids=other, grid=grid), model(other, grid))
    assert any(n.op == "placeholder" and n.target == "input_ids" and len(n.users) > 0
               for n in prog.graph_module.graph.nodes)


class _EncLayer(CausalLayer):
    def forward(self, x):
        B, L, _ = x.shape
        q, k, v = self.qkv(x).view(B, L, 3, 2, D // 2).permute(2, 0, 3, 1, 4)
        return x + self.out(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, L, D))


class _BoxEncoderDecoder(nn.Module):
    """UDOP-like: each word gets the patch under its box added (``gather`` of the patches along the tokens), the
    patches not under a box follow the words (``index_select``), a fused encoder, then a decoder whose
    cross-attention reads the encoder's output."""

    def __init__(self):
        super().__init__()
        self.embed, self.patch = nn.Embedding(V, D), nn.Conv2d(3, D, 2, 2)
        self.enc = nn.ModuleList([_EncLayer(), _EncLayer()])
        self.dec, self.q, self.kv, self.o = CausalLayer(D), nn.Linear(D, D), nn.Linear(D, 2 * D), nn.Linear(D, D)
        self.register_buffer("free", torch.arange(0, 16, 2))  # the patches no word sits on

    def forward(self, input_ids, boxes, pixel_values, decoder_input_ids):
        p = self.patch(pixel_values).flatten(2).transpose(1, 2)  # [B, 16, D]
        t = self.embed(input_ids) + torch.gather(p, 1, boxes.unsqueeze(-1).expand(-1, -1, D))
        x = torch.cat([t, p.index_select(1, self.free)], 1)
        for layer in self.enc:
            x = layer(x)
        y = self.dec(self.embed(decoder_input_ids))
        B, T, _ = y.shape
        k, v = self.kv(x).view(B, -1, 2, 2, D // 2).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(self.q(y).view(B, T, 2, D // 2).transpose(1, 2), k, v)
        return y + self.o(a.transpose(1, 2).reshape(B, T, D))


def test_patches_gathered_at_word_boxes_keep_words_text_and_patches_image():
    torch.manual_seed(0)
    model = _BoxEncoderDecoder().eval()
    kwargs = {"input_ids": torch.randint(0, V, (2, 5)), "boxes": torch.randint(0, 8, (2, 5)) * 2 + 1,
              "pixel_values": torch.randn(2, 3, 8, 8), "decoder_input_ids": torch.randint(0, V, (2, 3))}
    prog = graphred.capture(model, **kwargs)
    report = graphred.analyze(prog)
    assert not report.unknown_ops, report.unknown_ops  # (before: aten.gather had no rule)
    enc = [b for b in report.blocks if b.module_path.startswith("enc.")]
    # the words stay text (the gathered patch rows are features added to them), the free patches are image
    assert len(enc) == 2 and all(b.kind == CROSS_MODAL_SELF and b.tokens == {"text": 5, "image": 8} for b in enc), \
        str(report)
    with torch.no_grad():
        assert torch.equal(graphred.transform(prog, pumer(prune=0, merge=0))(**kwargs), model(**kwargs))
        reduced = graphred.transform(prog, pumer(prune=0.5, merge=0.0))
        reduced(**kwargs)
    # the fused encoder is where PuMer reduces (before, the decoder's cross-attention, the later stack of a tie)
    assert [s["block"] for s in reduced.steps if s["op"] == "prune"] == ["enc.1"], reduced.steps


class _SolveTiledLayer(CausalLayer):
    """Tokens mixed by a unit triangular solve along the tokens (the eager gated delta rule), the hidden state
    tiled on its features (``repeat(1, 1, 2)``), keys shared by two heads (``repeat_interleave`` on the heads)."""

    def forward(self, x):
        B, L, _ = x.shape
        m = torch.tril(x @ x.transpose(-1, -2) * 0.01, -1) + torch.eye(L)
        h = torch.linalg.solve_triangular(m, x, upper=False, unitriangular=True)
        h = h.repeat(1, 1, 2).view(B, L, 2, D).mean(2)
        q, k, v = self.qkv(h).view(B, L, 3, 2, D // 2).permute(2, 0, 3, 1, 4)
        k, v = k[:, :1].repeat_interleave(2, dim=1), v[:, :1].repeat_interleave(2, dim=1)
        return x + self.out(F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, L, D))


def test_tokens_through_a_triangular_solve_and_repeats_keep_their_axis():
    torch.manual_seed(0)
    model, kwargs = _VQDecoder().eval(), _inputs()
    model.layers = nn.ModuleList([_SolveTiledLayer(), _SolveTiledLayer()])
    decoder, report = _decoder_blocks(model, kwargs)
    mine = [u for u in report.unknown_ops if any(k in u.op for k in ("solve_triangular", "repeat"))]
    assert not mine, mine  # (before: all three had no rule)
    assert len(decoder) == 2 and all(b.query_stream is not None for b in decoder), str(report)
    prog = graphred.capture(model, **kwargs)
    with torch.no_grad():
        reduced = graphred.transform(prog, pumer(prune=0.5, merge=0.0))
        assert reduced(**kwargs).shape[1] < kwargs["input_ids"].shape[1]
