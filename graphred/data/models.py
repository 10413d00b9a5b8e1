"""The three VQA models graphred trained itself on the grid scenes, and how to run them.

No pretrained vision-language weights can be downloaded here, so graphred ships three small
models of standard Hugging Face architectures, trained from scratch on CPU on
:mod:`graphred.data.scenes` by ``bench/train_models.py`` (weights in ``graphred/weights/``):

=============  ====================================================================
``vqa-llava``  ``LlavaForConditionalGeneration``: CLIP vision tower (2 layers, width
               64, 84 px / patch 12 -> 49 image tokens), MLP projector, Llama decoder
               (4 layers, width 128, 4 query / 2 key-value heads). Prompt
               ``<bos> <image>*49 question``, left-padded; the answer is the next token.
``vqa-vilt``   ``ViltForQuestionAnswering``: one encoder (4 layers, width 96) over
               ``[CLS] question [SEP]`` and 49 image patches (+ the image ``[CLS]``);
               a classifier over the 28 answers.
``vqa-blip``   :class:`BlipVQA`: ``BlipVisionModel`` (2 layers, width 64) and a
               ``BlipTextModel`` (3 layers, width 128) whose text queries cross-attend
               to the 50 image tokens, and a linear head over the answers (the layout
               of ``BlipForImageTextRetrieval``'s image-text matching path).
=============  ====================================================================

Their test accuracies (4,000 questions on 1,000 scenes of unseen photographs) and training
facts are in ``metadata(name)``.

``vqa2-llava``, ``vqa2-vilt`` and ``vqa2-blip`` are the same three architectures at 224 px / patch
16 (196 image tokens), trained by ``bench/train_models2.py`` on the cluttered scenes of
:mod:`graphred.data.scenes2`; every function here takes their names too (``shipped_scenes(name)``
gives the matching test scenes, ``default_tokenizer(name)`` the vocabulary). ``vqa2-llava-deep`` is
``vqa2-llava`` with an 8-layer decoder (same scenes, vision tower and recipe; Victor's test model, see
docs/benchmarks.md).

>>> from graphred.data import models, scenes
>>> model, tok = models.load_trained("vqa-llava")
>>> test = scenes.load_shipped()
>>> acc = models.evaluate(model, "vqa-llava", test, batch_size=100)   # a fraction in [0, 1]
>>> kwargs = models.build_inputs("vqa-llava", tok, test, test.questions[:4])
>>> sorted(kwargs)
['attention_mask', 'input_ids', 'pixel_values', 'use_cache']

``evaluate`` (and ``predict``) take any callable that accepts the model's keyword arguments
(a transformed model, a compiled one) and read the answer the same way training did.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn

from ..errors import GraphredError
from .scenes import IMAGE_SIZE, KINDS, Question, SceneSet, SceneTokenizer

__all__ = [
    "MODEL_NAMES",
    "MODEL_NAMES_V2_DEEP",
    "BlipVQA",
    "WeightsError",
    "accuracy_by_kind",
    "answer_logits",
    "build_inputs",
    "build_model",
    "evaluate",
    "load_trained",
    "metadata",
    "predict",
    "save_trained",
    "text_length",
    "weights_paths",
]

MODEL_NAMES: tuple[str, ...] = ("vqa-llava", "vqa-vilt", "vqa-blip")
#: The same three architectures trained on the cluttered 224 px scenes (:mod:`graphred.data.scenes2`,
#: 196 image tokens); bench/train_models2.py trains them.
MODEL_NAMES_V2: tuple[str, ...] = ("vqa2-llava", "vqa2-vilt", "vqa2-blip")
#: Deeper variants on the same scenes, tower and recipe: ``vqa2-llava-deep`` has an 8-layer decoder (Victor's
#: test: registers summarise the image in the first layers, and a drop at layer 2 leaves most of the decoder short).
MODEL_NAMES_V2_DEEP: tuple[str, ...] = ("vqa2-llava-deep",)
ALL_MODEL_NAMES: tuple[str, ...] = MODEL_NAMES + MODEL_NAMES_V2 + MODEL_NAMES_V2_DEEP
#: decoder layers of the deep variants
DEEP_DECODER_LAYERS = 8
WEIGHTS_DIR = Path(__file__).resolve().parent.parent / "weights"
FORMAT_VERSION = 1

PATCH = 12  # 84 px / 12 -> a 7x7 grid: 49 image tokens
PATCH_V2 = 16  # 224 px / 16 -> a 14x14 grid: 196 image tokens
#: Questions are at most 10 words; every model pads its text to a fixed length so batch shapes
#: do not depend on which questions share a batch.
MAX_QUESTION_WORDS = 10


class WeightsError(GraphredError):
    """A shipped weights file is missing, corrupt, or does not match its model."""


# --------------------------------------------------------------------------------------------
# Architectures
# --------------------------------------------------------------------------------------------


class BlipVQA(nn.Module):
    """BLIP-style cross-attention VQA: text queries cross-attend to the image tokens.

    ``vision_model`` is a ``BlipVisionModel``; ``text_encoder`` a ``BlipTextModel`` (built
    with ``is_decoder=True`` in its config, which gives every layer a cross-attention, and run
    with ``is_decoder=False``, i.e. bidirectional self-attention, as
    ``BlipForImageTextRetrieval`` runs it for image-text matching); ``answer_head`` a linear
    layer on the text ``[CLS]`` state. Returns a ``SequenceClassifierOutput`` with ``logits``.
    """

    def __init__(self, vision_config: Any, text_config: Any, num_answers: int):
        super().__init__()
        from transformers import BlipTextModel, BlipVisionModel

        self.vision_model = BlipVisionModel(vision_config)
        self.text_encoder = BlipTextModel(text_config, add_pooling_layer=False)
        self.answer_head = nn.Linear(text_config.hidden_size, num_answers)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, pixel_values: torch.Tensor):
        from transformers.modeling_outputs import SequenceClassifierOutput

        image_embeds = self.vision_model(pixel_values=pixel_values).last_hidden_state
        image_atts = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device)
        text = self.text_encoder(
            input_ids=input_ids,
            attention_mask=attention_mask,
            encoder_hidden_states=image_embeds,
            encoder_attention_mask=image_atts,
        ).last_hidden_state
        return SequenceClassifierOutput(logits=self.answer_head(text[:, 0, :]))


def _check_name(name: str) -> str:
    if name not in ALL_MODEL_NAMES:
        raise GraphredError(f"unknown trained model {name!r}; expected one of {list(ALL_MODEL_NAMES)}")
    return name


def family(name: str) -> str:
    """``"llava"``, ``"vilt"`` or ``"blip"``: the architecture of a trained model name."""
    return _check_name(name).split("-")[1]


def geometry(name: str) -> tuple[int, int]:
    """``(image size in px, patch size in px)`` of ``name``'s inputs (84/12 or, for ``vqa2-*``, 224/16)."""
    _check_name(name)
    if name in MODEL_NAMES_V2 + MODEL_NAMES_V2_DEEP:
        from . import scenes2

        return scenes2.IMAGE_SIZE, PATCH_V2
    return IMAGE_SIZE, PATCH


def image_tokens(name: str) -> int:
    """The number of image patches (image tokens) ``name`` reads."""
    size, patch = geometry(name)
    return (size // patch) ** 2


def default_tokenizer(name: str) -> SceneTokenizer:
    """The tokenizer ``name`` is trained with (the vocabulary of its scene set)."""
    if _check_name(name) in MODEL_NAMES_V2 + MODEL_NAMES_V2_DEEP:
        from . import scenes2

        return scenes2.tokenizer()
    return SceneTokenizer()


def shipped_scenes(name: str):
    """The packaged test scenes of ``name``'s scene set (``scenes.load_shipped`` or ``scenes2.load_shipped``)."""
    if _check_name(name) in MODEL_NAMES_V2 + MODEL_NAMES_V2_DEEP:
        from . import scenes2

        return scenes2.load_shipped()
    from . import scenes

    return scenes.load_shipped()


def default_config(name: str, tokenizer: SceneTokenizer | None = None) -> dict:
    """The JSON-able configuration ``bench/train_models.py`` trains ``name`` with."""
    tok = tokenizer or default_tokenizer(name)
    vocab, n_ans = tok.vocab_size, len(tok.answers)
    IMAGE_SIZE, PATCH = geometry(name)  # noqa: N806 - the v1 constants, per model
    fam = family(name)
    if name in MODEL_NAMES_V2 + MODEL_NAMES_V2_DEEP:
        return _config_v2(fam, tok, IMAGE_SIZE, PATCH,
                          decoder_layers=DEEP_DECODER_LAYERS if name in MODEL_NAMES_V2_DEEP else 4)
    if fam == "llava":
        from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

        vision = CLIPVisionConfig(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                                  image_size=IMAGE_SIZE, patch_size=PATCH, num_channels=3, projection_dim=64)
        text = LlamaConfig(vocab_size=vocab, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                           pad_token_id=tok.pad_id, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id,
                           tie_word_embeddings=False)
        cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_index=tok.image_id,
                          image_seq_length=(IMAGE_SIZE // PATCH) ** 2, vision_feature_layer=-1,
                          vision_feature_select_strategy="default", projector_hidden_act="gelu")
        return cfg.to_dict()
    if fam == "vilt":
        from transformers import ViltConfig

        cfg = ViltConfig(vocab_size=vocab, hidden_size=96, num_hidden_layers=4, num_attention_heads=4,
                         intermediate_size=256, image_size=IMAGE_SIZE, patch_size=PATCH, num_channels=3,
                         max_position_embeddings=MAX_QUESTION_WORDS + 2, max_image_length=-1,
                         num_labels=n_ans, id2label=dict(enumerate(tok.answers)),
                         label2id={a: i for i, a in enumerate(tok.answers)}, pad_token_id=tok.pad_id)
        return cfg.to_dict()
    from transformers import BlipTextConfig, BlipVisionConfig

    vision = BlipVisionConfig(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                              image_size=IMAGE_SIZE, patch_size=PATCH, projection_dim=64)
    text = BlipTextConfig(vocab_size=vocab, hidden_size=128, encoder_hidden_size=64, intermediate_size=256,
                          num_hidden_layers=3, num_attention_heads=4, max_position_embeddings=MAX_QUESTION_WORDS + 2,
                          pad_token_id=tok.pad_id, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id,
                          sep_token_id=tok.sep_id, is_decoder=True, projection_dim=64)
    return {"vision_config": vision.to_dict(), "text_config": text.to_dict(), "num_answers": n_ans}


def _config_v2(fam: str, tok: SceneTokenizer, size: int, patch: int, decoder_layers: int = 4) -> dict:
    """The ``vqa2-*`` configurations: 224 px, patch 16 (196 image tokens); widths as the v1 models,
    sized so that each trains in about 20 minutes on one CPU thread (``decoder_layers``: the Llama
    decoder's depth, 4 but for ``vqa2-llava-deep``)."""
    vocab, n_ans, n_img = tok.vocab_size, len(tok.answers), (size // patch) ** 2
    if fam == "llava":
        from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

        vision = CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                  image_size=size, patch_size=patch, num_channels=3, projection_dim=64)
        text = LlamaConfig(vocab_size=vocab, hidden_size=128, intermediate_size=256, num_hidden_layers=decoder_layers,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=320,
                           pad_token_id=tok.pad_id, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id,
                           tie_word_embeddings=False)
        cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_index=tok.image_id,
                          image_seq_length=n_img, vision_feature_layer=-1,
                          vision_feature_select_strategy="default", projector_hidden_act="gelu")
        return cfg.to_dict()
    if fam == "vilt":
        from transformers import ViltConfig

        cfg = ViltConfig(vocab_size=vocab, hidden_size=96, num_hidden_layers=4, num_attention_heads=4,
                         intermediate_size=192, image_size=size, patch_size=patch, num_channels=3,
                         max_position_embeddings=MAX_QUESTION_WORDS + 2, max_image_length=-1,
                         num_labels=n_ans, id2label=dict(enumerate(tok.answers)),
                         label2id={a: i for i, a in enumerate(tok.answers)}, pad_token_id=tok.pad_id)
        return cfg.to_dict()
    from transformers import BlipTextConfig, BlipVisionConfig

    vision = BlipVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                              image_size=size, patch_size=patch, projection_dim=64)
    text = BlipTextConfig(vocab_size=vocab, hidden_size=128, encoder_hidden_size=64, intermediate_size=256,
                          num_hidden_layers=3, num_attention_heads=4, max_position_embeddings=MAX_QUESTION_WORDS + 2,
                          pad_token_id=tok.pad_id, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id,
                          sep_token_id=tok.sep_id, is_decoder=True, projection_dim=64)
    return {"vision_config": vision.to_dict(), "text_config": text.to_dict(), "num_answers": n_ans}


def build_model(name: str, config: dict | None = None, tokenizer: SceneTokenizer | None = None) -> nn.Module:
    """A freshly initialised model for ``name`` (random weights: for training, not evaluation)."""
    cfg = config if config is not None else default_config(name, tokenizer)
    _check_name(name)
    try:
        if family(name) == "llava":
            from transformers import LlavaConfig, LlavaForConditionalGeneration

            model = LlavaForConditionalGeneration(LlavaConfig.from_dict(cfg))
        elif family(name) == "vilt":
            from transformers import ViltConfig, ViltForQuestionAnswering

            model = ViltForQuestionAnswering(ViltConfig.from_dict(cfg))
        else:
            from transformers import BlipTextConfig, BlipVisionConfig

            model = BlipVQA(BlipVisionConfig.from_dict(cfg["vision_config"]),
                            BlipTextConfig.from_dict(cfg["text_config"]), int(cfg["num_answers"]))
    except GraphredError:
        raise
    except Exception as e:
        raise WeightsError(f"cannot build {name} from its config: {type(e).__name__}: {e}") from e
    return model.eval()


# --------------------------------------------------------------------------------------------
# Inputs and outputs
# --------------------------------------------------------------------------------------------


def text_length(name: str) -> int:
    """The fixed text length of ``name``'s inputs (without image tokens)."""
    _check_name(name)
    return MAX_QUESTION_WORDS + (1 if family(name) == "llava" else 2)


def build_inputs(name: str, tokenizer: SceneTokenizer, scenes: SceneSet,
                 questions: Sequence[Question]) -> dict[str, Any]:
    """Model keyword arguments for a batch of questions, exactly as training built them.

    ``vqa-llava``: ``<bos> <image>*49 question``, left-padded to a fixed length, with
    ``attention_mask``, ``pixel_values`` and ``use_cache=False``. ``vqa-vilt``: ``[CLS] question
    [SEP]`` right-padded, with ``token_type_ids`` and an all-ones ``pixel_mask``. ``vqa-blip``:
    ``[CLS] question [SEP]`` right-padded, with ``attention_mask`` and ``pixel_values``.
    """
    _check_name(name)
    tok = tokenizer
    length = text_length(name)
    rows = []
    for q in questions:
        words = tok.encode(q.text)
        if len(words) > MAX_QUESTION_WORDS:
            raise GraphredError(f"question longer than {MAX_QUESTION_WORDS} words: {q.text!r}")
        rows.append(words)
    b = len(rows)
    pixels = scenes.pixel_values(questions)
    size = geometry(name)[0]
    if family(name) == "llava":
        n_img = image_tokens(name)
        total = length + n_img
        ids = torch.full((b, total), tok.pad_id, dtype=torch.long)
        mask = torch.zeros((b, total), dtype=torch.long)
        for i, words in enumerate(rows):
            seq = [tok.bos_id] + [tok.image_id] * n_img + words
            ids[i, total - len(seq):] = torch.tensor(seq)
            mask[i, total - len(seq):] = 1
        return {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels, "use_cache": False}
    ids = torch.full((b, length), tok.pad_id, dtype=torch.long)
    mask = torch.zeros((b, length), dtype=torch.long)
    for i, words in enumerate(rows):
        seq = [tok.cls_id] + words + [tok.sep_id]
        ids[i, : len(seq)] = torch.tensor(seq)
        mask[i, : len(seq)] = 1
    if family(name) == "vilt":
        return {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids),
                "pixel_values": pixels, "pixel_mask": torch.ones((b, size, size), dtype=torch.long)}
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels}


def _logits_of(output: Any) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, dict) or hasattr(output, "keys"):
        if "logits" in output:
            return output["logits"]
    logits = getattr(output, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise GraphredError(f"cannot find logits in a model output of type {type(output).__name__}")


def answer_logits(name: str, output: Any, tokenizer: SceneTokenizer) -> torch.Tensor:
    """``(B, len(answers))`` scores from a model output (a ModelOutput, dict, tuple or tensor).

    The decoder's scores are its logits at the last position restricted to the answer tokens.
    """
    logits = _logits_of(output)
    if family(name) == "llava":
        if logits.dim() == 3:
            logits = logits[:, -1, :]
        return logits[:, tokenizer.answer_token_ids]
    return logits


def targets(name: str, tokenizer: SceneTokenizer, questions: Sequence[Question]) -> torch.Tensor:
    """Training targets: the answer token id (decoder, over the vocabulary) or answer index."""
    if family(name) == "llava":
        return torch.tensor([tokenizer.token_to_id[q.answer] for q in questions], dtype=torch.long)
    return torch.tensor([tokenizer.answer_index(q.answer) for q in questions], dtype=torch.long)


def training_logits(name: str, output: Any) -> torch.Tensor:
    """The logits the training loss reads: last position over the vocabulary, or answer scores."""
    logits = _logits_of(output)
    return logits[:, -1, :] if family(name) == "llava" else logits


def _placement(model: Any, device: Any, dtype: Any) -> tuple[Any, Any]:
    if isinstance(model, nn.Module) and (device is None or dtype is None):
        p = next(iter(model.parameters()), None)
        if p is not None:
            device = p.device if device is None else device
            dtype = p.dtype if dtype is None else dtype
    return device, dtype


def _move(kwargs: dict, device: Any, dtype: Any) -> dict:
    out = {}
    for k, v in kwargs.items():
        if isinstance(v, torch.Tensor):
            v = v.to(device=device) if device is not None else v
            if dtype is not None and v.is_floating_point():
                v = v.to(dtype)
        out[k] = v
    return out


def predict(model: Callable[..., Any], name: str, scenes: SceneSet, batch_size: int = 64, *,
            tokenizer: SceneTokenizer | None = None, limit: int | None = None,
            progress: Callable[[int, int], None] | None = None,
            device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The predicted answer index of every question in ``scenes`` (or its first ``limit``).

    ``model`` is the trained model or anything called the same way (a transformed or compiled
    model). An ``nn.Module`` is run in eval mode (its mode is restored afterwards); the random
    state is forked and seeded, so ViLT's random patch order repeats run to run. Inputs go to
    ``device``/``dtype`` (by default those of an ``nn.Module``'s parameters; CPU float32 for
    other callables); ``progress(done, total)`` is called after every batch.
    """
    tok = tokenizer or default_tokenizer(name)
    device, dtype = _placement(model, device, dtype)
    qs = scenes.questions if limit is None else scenes.questions[: int(limit)]
    if batch_size < 1:
        raise GraphredError(f"batch_size must be >= 1, got {batch_size}")
    was_training = model.training if isinstance(model, nn.Module) else None
    if isinstance(model, nn.Module):
        model.eval()
    preds = []
    try:
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            torch.manual_seed(0)
            for start in range(0, len(qs), batch_size):
                batch = qs[start: start + batch_size]
                out = model(**_move(build_inputs(name, tok, scenes, batch), device, dtype))
                preds.append(answer_logits(name, out, tok).float().argmax(-1).cpu())
                if progress is not None:
                    progress(min(start + batch_size, len(qs)), len(qs))
    finally:
        if was_training:
            model.train()
    return torch.cat(preds) if preds else torch.zeros(0, dtype=torch.long)


def _truth(scenes: SceneSet, tok: SceneTokenizer, n: int) -> torch.Tensor:
    return torch.tensor([tok.answer_index(q.answer) for q in scenes.questions[:n]], dtype=torch.long)


def evaluate(model: Callable[..., Any], name: str, scenes: SceneSet, batch_size: int = 64, *,
             tokenizer: SceneTokenizer | None = None, limit: int | None = None,
             progress: Callable[[int, int], None] | None = None,
             device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> float:
    """Accuracy (a fraction) of ``model`` on the questions of ``scenes``; see :func:`predict`."""
    tok = tokenizer or default_tokenizer(name)
    pred = predict(model, name, scenes, batch_size, tokenizer=tok, limit=limit, progress=progress,
                   device=device, dtype=dtype)
    if pred.numel() == 0:
        raise GraphredError("no questions to evaluate")
    return float((pred == _truth(scenes, tok, pred.numel())).float().mean())


def accuracy_by_kind(scenes: SceneSet, predictions: torch.Tensor,
                     tokenizer: SceneTokenizer | None = None) -> dict[str, float]:
    """Accuracy per question kind (and ``"all"``) of predictions from :func:`predict`."""
    if tokenizer is None:
        from .scenes2 import SceneSet2, tokenizer as tokenizer_v2

        tokenizer = tokenizer_v2() if isinstance(scenes, SceneSet2) else SceneTokenizer()
    tok = tokenizer
    n = predictions.numel()
    ok = (predictions == _truth(scenes, tok, n)).tolist()
    out: dict[str, float] = {}
    for kind in dict.fromkeys([*KINDS, *(q.kind for q in scenes.questions[:n])]):
        hits = [o for o, q in zip(ok, scenes.questions[:n]) if q.kind == kind]
        if hits:
            out[kind] = sum(hits) / len(hits)
    out["all"] = sum(ok) / max(n, 1)
    return out


# --------------------------------------------------------------------------------------------
# Shipped weights
# --------------------------------------------------------------------------------------------


def weights_paths(name: str, directory: str | os.PathLike | None = None) -> tuple[Path, Path]:
    """``(<name>.safetensors, <name>.json)`` in the package's ``weights/`` (or ``directory``)."""
    d = Path(directory) if directory is not None else WEIGHTS_DIR
    _check_name(name)
    return d / f"{name}.safetensors", d / f"{name}.json"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save_trained(name: str, model: nn.Module, tokenizer: SceneTokenizer, config: dict, *,
                 info: dict | None = None, directory: str | os.PathLike | None = None) -> tuple[Path, Path]:
    """Write ``model``'s weights (safetensors) and a JSON with its config, vocabulary and ``info``."""
    from safetensors.torch import save_file

    st_path, js_path = weights_paths(name, directory)
    st_path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    save_file(state, str(st_path), metadata={"graphred_model": name, "format": str(FORMAT_VERSION)})
    meta = {
        "format": FORMAT_VERSION,
        "name": name,
        "architecture": type(model).__name__,
        "config": config,
        "tokenizer": tokenizer.to_dict(),
        "weights": {"file": st_path.name, "sha256": _sha256(st_path), "bytes": st_path.stat().st_size,
                    "tensors": len(state), "parameters": int(sum(v.numel() for v in state.values()))},
        **(info or {}),
    }
    js_path.write_text(json.dumps(meta, indent=1, sort_keys=False) + "\n")
    return st_path, js_path


def metadata(name: str, directory: str | os.PathLike | None = None) -> dict:
    """The JSON shipped beside ``name``'s weights (config, vocabulary, training facts, accuracies)."""
    _, js_path = weights_paths(name, directory)
    if not js_path.is_file():
        raise WeightsError(f"no trained weights for {name}: {js_path} is missing; reinstall graphred "
                           "or train them with `python bench/train_models.py`")
    try:
        meta = json.loads(js_path.read_text())
    except (OSError, ValueError) as e:
        raise WeightsError(f"{js_path} is not valid JSON ({e}); reinstall graphred") from e
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_VERSION or meta.get("name") != name:
        raise WeightsError(f"{js_path} is not a graphred v{FORMAT_VERSION} description of {name}")
    return meta


def load_trained(name: str, directory: str | os.PathLike | None = None) -> tuple[nn.Module, SceneTokenizer]:
    """The shipped trained model ``name`` (in eval mode) and its tokenizer.

    Any problem with the files (missing, truncated, checksum mismatch, tensors that do not
    fit the architecture) raises :class:`WeightsError`; a model is never returned with
    randomly initialised weights.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    _check_name(name)
    meta = metadata(name, directory)
    st_path, js_path = weights_paths(name, directory)
    if not st_path.is_file():
        raise WeightsError(f"no trained weights for {name}: {st_path} is missing; reinstall graphred "
                           "or train them with `python bench/train_models.py`")
    expected = meta.get("weights", {}).get("sha256")
    actual = _sha256(st_path)
    if expected != actual:
        raise WeightsError(
            f"{st_path} is corrupt or does not belong to {js_path.name}: its sha256 is {actual[:16]}..., "
            f"the JSON expects {str(expected)[:16]}...; reinstall graphred or retrain with bench/train_models.py"
        )
    try:
        tokenizer = SceneTokenizer.from_dict(meta["tokenizer"])
    except (KeyError, TypeError) as e:
        raise WeightsError(f"{js_path} has no usable tokenizer: {e}") from e
    model = build_model(name, meta.get("config"), tokenizer)
    try:
        state = load_file(str(st_path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise WeightsError(f"cannot read {st_path}: {e}") from e
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    bad_shape = sorted(k for k in set(own) & set(state) if tuple(own[k].shape) != tuple(state[k].shape))
    if missing or unexpected or bad_shape:
        raise WeightsError(
            f"{st_path} does not match the {meta.get('architecture', name)} architecture of {name}: "
            f"{len(missing)} missing tensors {missing[:3]}, {len(unexpected)} unexpected {unexpected[:3]}, "
            f"{len(bad_shape)} with other shapes {bad_shape[:3]}"
        )
    nonfinite = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if nonfinite:
        raise WeightsError(f"{st_path} holds non-finite values in {nonfinite[:3]}")
    model.load_state_dict(state, strict=True)
    return model.eval(), tokenizer
