"""Issue 3's expectations: token provenance and attention blocks on every zoo model."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import sympy
import torch

import graphred
from graphred import zoo
from graphred.analysis.blocks import CROSS_ATTENTION, CROSS_MODAL_SELF, UNIMODAL_SELF
from graphred.analysis.provenance import TOKENS, TokenProvenance

DECODERS = ["llava", "paligemma", "idefics3", "qwen2-vl"]  # the issue-13 families: tests/test_zoo_families.py


def _report(zoo_program, name):
    return graphred.analyze(zoo_program(name))


def _image_count(model, kwargs) -> list[int]:
    """Image placeholder positions per sample, read from the inputs (the test may know the model)."""
    cfg = model.config
    tok = getattr(cfg, "image_token_id", None)
    if tok is None:
        tok = getattr(cfg, "image_token_index")
    return [int(n) for n in (kwargs["input_ids"] == tok).sum(1)]


@pytest.mark.parametrize("name", DECODERS)
def test_decoders_vision_unimodal_language_cross_modal(zoo_program, zoo_model, name):
    report = _report(zoo_program, name)
    model, kwargs = zoo_model(name)
    n_img = _image_count(model, kwargs)
    L = kwargs["input_ids"].shape[1]
    lang = [b for b in report.blocks if b.kind == CROSS_MODAL_SELF]
    vision = [b for b in report.blocks if b.query_modalities == {"image"}]
    n_layers = model.config.text_config.num_hidden_layers
    assert len(lang) == n_layers, str(report)
    assert [b.layer_index for b in lang] == list(range(n_layers))
    assert vision and all(b.kind == UNIMODAL_SELF for b in vision)
    for b in lang:
        assert b.query_modalities == b.key_modalities == {"image", "text"}
        # per sample, the padded sample included: image tokens = placeholders, text = the rest
        assert [t["image"] for t in b.tokens_per_sample] == n_img
        assert [t["text"] for t in b.tokens_per_sample] == [L - n for n in n_img]
        assert b.module_path.endswith(f".{b.layer_index}.self_attn")
    assert report.cross_modal == lang


def test_vilt_every_layer_cross_modal_self(zoo_program, zoo_model):
    report = _report(zoo_program, "vilt")
    model, kwargs = zoo_model("vilt")
    assert len(report.blocks) == model.config.num_hidden_layers
    for b in report.blocks:
        assert b.kind == CROSS_MODAL_SELF
        assert b.tokens["text"] == kwargs["input_ids"].shape[1]
        assert b.tokens["image"] == zoo.info("vilt")["image"]   # patches + the image [CLS]
        assert b.causal is False


def test_blip_cross_attention_text_queries_image_keys(zoo_program, zoo_model):
    report = _report(zoo_program, "blip")
    model, kwargs = zoo_model("blip")
    by_path = {b.module_path: b for b in report.blocks}
    cross = [b for b in report.blocks if "crossattention" in b.module_path]
    text_self = [b for b in report.blocks if b.module_path.startswith("text_encoder") and "crossattention" not in b.module_path]
    vision = [b for b in report.blocks if b.module_path.startswith("vision_model")]
    assert cross and text_self and vision and len(by_path) == len(report.blocks)
    assert all(b.kind == CROSS_ATTENTION and b.query_modalities == {"text"} and b.key_modalities == {"image"} for b in cross)
    assert all(b.kind == UNIMODAL_SELF and b.query_modalities == {"text"} for b in text_self)
    assert all(b.kind == UNIMODAL_SELF and b.query_modalities == {"image"} for b in vision)
    assert report.cross_modal == cross


@pytest.mark.parametrize("name", ["clip", "siglip"])
def test_dual_encoders_have_no_cross_modal_block(zoo_program, name):
    report = _report(zoo_program, name)
    assert report.blocks and report.cross_modal == []
    assert "none cross-modal" in report.summary and "no cross-modal block" in report.summary
    mods = {m for b in report.blocks for m in b.key_modalities}
    assert mods == {"image", "text"}


def test_report_json_and_table(zoo_program):
    report = _report(zoo_program, "llava")
    d = json.loads(json.dumps(report.to_dict()))
    assert len(d["blocks"]) == len(report.blocks)
    assert d["blocks"][-1]["kind"] == CROSS_MODAL_SELF
    assert set(d["symbols"]) >= {"n_img", "n_txt", "B"}
    table = str(report)
    for b in report.blocks:
        assert b.module_path in table


def test_symbolic_shapes_evaluate_to_concrete(zoo_program):
    prog = zoo_program("llava")
    prov = TokenProvenance(prog.graph_module, prog.example_inputs())
    values = prov.symbol_values
    checked = 0
    for n in prog.graph.nodes:
        sym = prov.symbolic_shape(n)
        if sym is None:
            continue
        conc = tuple(int(s) for s in n.meta["val"].shape)
        assert tuple(int(sympy.sympify(s).subs(values)) for s in sym) == conc, n.format_node()
        if any(isinstance(s, sympy.Expr) and s.free_symbols for s in sym):
            checked += 1
    assert checked > 50  # most tensors of the model have a symbolic token or batch dim


def test_query_stream_dims_found_on_every_decoder_attention(zoo_program, zoo_model):
    prog = zoo_program("qwen2-vl")
    report = graphred.analyze(prog)
    model, _ = zoo_model("qwen2-vl")
    assert len(report.cross_modal) == model.config.text_config.num_hidden_layers  # the loop below runs on each
    for b in report.cross_modal:
        st = report.provenance.stream(b.query_stream)
        assert st.kind == TOKENS and {"image", "text"} <= st.modalities()


def test_text_only_model_reports_no_cross_modal_block():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                         num_key_value_heads=1, vocab_size=50)).eval()
    ids = torch.randint(0, 50, (2, 7))
    report = graphred.analyze(graphred.capture(model, input_ids=ids, use_cache=False))
    assert len(report.blocks) == 2 and report.cross_modal == []
    assert all(b.query_modalities == {"text"} and b.causal for b in report.blocks)
    assert "no cross-modal" in report.summary


def test_vision_only_model_reports_no_cross_modal_block():
    from transformers import CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(0)
    model = CLIPVisionModel(CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                             num_attention_heads=2, image_size=32, patch_size=8)).eval()
    report = graphred.analyze(graphred.capture(model, pixel_values=torch.randn(2, 3, 32, 32)))
    assert len(report.blocks) == 2 and report.cross_modal == []
    assert all(b.tokens == {"image": 17} for b in report.blocks)


def test_op_without_rule_is_reported_with_module_path():
    @torch.library.custom_op("graphred_test::mystery", mutates_args=())
    def mystery(x: torch.Tensor) -> torch.Tensor:
        return x * 2

    @mystery.register_fake
    def _(x):
        return torch.empty_like(x)

    class Inner(torch.nn.Module):
        def forward(self, x):
            return torch.ops.graphred_test.mystery(x)

    class Toy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(20, 8)
            self.inner = Inner()
            self.q = torch.nn.Linear(8, 8)

        def forward(self, ids):
            h = self.inner(self.emb(ids))
            q = self.q(h).view(2, 5, 2, 4).transpose(1, 2)
            return torch.nn.functional.scaled_dot_product_attention(q, q, q)

    report = graphred.analyze(graphred.capture(Toy(), torch.randint(0, 20, (2, 5))))
    assert [u.module_path for u in report.unknown_ops] == ["inner"]
    assert "mystery" in report.unknown_ops[0].op
    assert len(report.blocks) == 1  # the analysis still returns what it could establish
    assert "ops without a provenance rule" in str(report)


def test_analyze_rejects_non_program():
    with pytest.raises(graphred.GraphredError, match="graphred.capture"):
        graphred.analyze(torch.nn.Linear(2, 2))


def test_no_family_names_in_analysis_passes_ops():
    root = Path(graphred.__file__).parent
    pattern = ("llava", "paligemma", "idefics", "qwen", "vilt", "blip", "clip", "siglip", "llama", "gemma",
               "mistral", "smolvlm", "aya", "internvl", "intern_vit", "pixtral", "cohere", "image_token_index",
               "image_token_id", "fuyu", "mllama", "lfm2", "kosmos", "qformer", "q-former", "num_query_tokens",
               "resampler_n_latents")
    hits = []
    for sub in ("analysis", "passes", "ops"):
        for f in (root / sub).rglob("*.py"):
            for i, line in enumerate(f.read_text().lower().splitlines()):
                if line.strip().startswith("#"):
                    continue
                hits += [f"{f.name}:{i + 1}: {p}" for p in pattern if p in line]
    assert hits == []


def test_cli_analyze_json_and_table():
    out = subprocess.run([sys.executable, "-m", "graphred", "analyze", "llava", "--json"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    d = json.loads(out.stdout)
    assert any(b["kind"] == "cross_modal_self" for b in d["blocks"])
    out = subprocess.run([sys.executable, "-m", "graphred", "analyze", "llava"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "cross_modal_self" in out.stdout and "model.language_model.layers.0.self_attn" in out.stdout
