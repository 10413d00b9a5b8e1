"""A zoo of tiny, seeded, randomly initialised vision-language models with example inputs.

The zoo is the one place in graphred that knows model families: it builds Hugging Face
models from configs (no hub access, random weights) and writes valid example inputs for
them. Everything else in graphred works from the captured graph.

>>> import graphred
>>> graphred.zoo.names()                                   # doctest: +ELLIPSIS
['llava', 'paligemma', 'idefics3', 'qwen2-vl', 'vilt', 'blip', 'clip', 'siglip', ..., 'llava-bench', 'llava-bench-1024']
>>> model, kwargs = graphred.zoo.load("clip")
>>> sorted(kwargs)
['attention_mask', 'input_ids', 'pixel_values']

Inputs are batch 2 (``llava-bench``: batch 4). Where a model takes an attention mask, the
last sample carries text padding: on the left for decoders (the side their tokenizers pad
for generation), on the right for encoders. Decoders with image placeholder tokens get
``use_cache=False`` so that the captured graph returns plain tensors. The llava, paligemma,
idefics3 and qwen2-vl presets hold the same number of image tokens in every sample; gemma3,
aya-vision and internvl hold one image in the first sample and two in the second, mistral3 one
image per sample at different sizes (uneven batches: ``info(name)["image_per_sample"]``).

``from_config_dir(path)`` builds the same kind of model and inputs from a local Hugging Face
model directory (``config.json``, weights optional), on the meta device by default, so a 7B
config costs no memory.
"""
from __future__ import annotations

import contextlib
import copy
import os
from dataclasses import dataclass
from typing import Any, Callable

import torch

from .errors import ConfigError

__all__ = [
    "FAMILY_NAMES",
    "TEST_NAMES",
    "describe",
    "from_config_dir",
    "info",
    "inputs",
    "is_bench",
    "load",
    "names",
    "resolve",
    "supported_model_types",
]


# --------------------------------------------------------------------------------------------
# Input builders (one per family, driven by the config)
# --------------------------------------------------------------------------------------------


def _sub(config: Any, key: str) -> Any:
    """``config.<key>_config`` or the config itself (for a text-only/vision-only config)."""
    return getattr(config, f"{key}_config", None) or config


def _first(*values: Any, default: Any = None) -> Any:
    for v in values:
        if v is not None:
            return v
    return default


def _size(v: Any) -> int:
    """An image/patch size that may be a pair."""
    return int(v[0]) if isinstance(v, (list, tuple)) else int(v)


def _rand_ids(gen: torch.Generator, shape: tuple, vocab: int, avoid: set[int]) -> torch.Tensor:
    """Random token ids in ``[4, vocab)`` (low ids are the usual specials) that avoid ``avoid``."""
    lo = 4 if vocab > 8 else 0
    ids = torch.randint(lo, vocab, shape, generator=gen)
    bad = torch.zeros_like(ids, dtype=torch.bool)
    for a in avoid:
        bad |= ids == a
    while bad.any():
        ids[bad] = torch.randint(lo, vocab, (int(bad.sum()),), generator=gen)
        bad = torch.zeros_like(ids, dtype=torch.bool)
        for a in avoid:
            bad |= ids == a
    return ids


def _decoder_text(
    gen: torch.Generator,
    batch: int,
    segments: list[tuple[str, int]],
    *,
    vocab: int,
    pad_id: int,
    image_id: int,
    avoid: set[int],
    pad: int,
) -> dict[str, torch.Tensor]:
    """Left-padded decoder prompts built from segments.

    ``segments`` is a list of ``("text", n)`` (n random tokens), ``("tok", id)`` (one fixed
    token) and ``("image", n)`` (n image placeholder tokens). The last sample has ``pad`` fewer
    text tokens (taken from its longest text segment) and ``pad`` padding tokens on the left.
    Returns ``input_ids``, ``attention_mask`` and ``image_mask`` (True on image placeholders).
    """
    avoid = set(avoid) | {image_id, pad_id}
    rows, masks, imgs = [], [], []
    longest = max((i for i, (k, _) in enumerate(segments) if k == "text"), key=lambda i: segments[i][1])
    for b in range(batch):
        p = pad if (b == batch - 1 and batch > 1) else 0
        ids: list[torch.Tensor] = [torch.full((p,), pad_id, dtype=torch.long)]
        img: list[torch.Tensor] = [torch.zeros(p, dtype=torch.bool)]
        for i, (kind, n) in enumerate(segments):
            if kind == "text":
                n = n - p if i == longest else n
                ids.append(_rand_ids(gen, (n,), vocab, avoid))
                img.append(torch.zeros(n, dtype=torch.bool))
            elif kind == "tok":
                ids.append(torch.tensor([n], dtype=torch.long))
                img.append(torch.zeros(1, dtype=torch.bool))
            else:
                ids.append(torch.full((n,), image_id, dtype=torch.long))
                img.append(torch.ones(n, dtype=torch.bool))
        row = torch.cat(ids)
        rows.append(row)
        imgs.append(torch.cat(img))
        m = torch.ones_like(row)
        m[:p] = 0
        masks.append(m)
    return {
        "input_ids": torch.stack(rows),
        "attention_mask": torch.stack(masks),
        "image_mask": torch.stack(imgs),
    }


def _uneven_decoder_text(
    gen: torch.Generator,
    per_sample: list[list[tuple[str, int]]],
    *,
    vocab: int,
    pad_id: int,
    image_id: int,
    avoid: set[int],
    pad: int,
) -> dict[str, torch.Tensor]:
    """Left-padded decoder prompts whose samples differ (each its own segments, as in
    :func:`_decoder_text`): every row takes extra text in its longest text segment up to the longest
    prompt, and the last sample (of several) carries ``pad`` padding tokens on the left."""
    avoid = set(avoid) | {image_id, pad_id}
    lens = [sum(1 if k == "tok" else n for k, n in segs) for segs in per_sample]
    length = max(lens) + (pad if len(per_sample) > 1 else 0)
    rows, masks, imgs = [], [], []
    for b, segs in enumerate(per_sample):
        p = pad if (b == len(per_sample) - 1 and len(per_sample) > 1) else 0
        extra = length - lens[b] - p
        longest = max((i for i, (k, _) in enumerate(segs) if k == "text"), key=lambda i: segs[i][1])
        ids: list[torch.Tensor] = [torch.full((p,), pad_id, dtype=torch.long)]
        for i, (kind, n) in enumerate(segs):
            if kind == "text":
                ids.append(_rand_ids(gen, (n + (extra if i == longest else 0),), vocab, avoid))
            elif kind == "tok":
                ids.append(torch.tensor([n], dtype=torch.long))
            else:
                ids.append(torch.full((n,), image_id, dtype=torch.long))
        row = torch.cat(ids)
        rows.append(row)
        imgs.append(row == image_id)
        m = torch.ones_like(row)
        m[:p] = 0
        masks.append(m)
    return {"input_ids": torch.stack(rows), "attention_mask": torch.stack(masks), "image_mask": torch.stack(imgs)}


def _images_per_sample(batch: int) -> list[int]:
    """Multi-image prompts: sample i holds 1 + (i % 2) images (batch 2: one image, then two)."""
    return [1 + (i % 2) for i in range(batch)]


def _multi_image_prompts(gen: torch.Generator, counts: list[int], text_len: int, image: list[tuple[str, int]],
                         config: Any, image_id: int, avoid: set[int], bos: int = 1) -> dict[str, torch.Tensor]:
    """Prompts ``<bos> text (image text)*`` with ``counts[i]`` images in sample i (``image``: one image's
    segments), left padded by 3 in the last sample."""
    pre = max(2, text_len // 4)
    per_sample = []
    for c in counts:
        segs: list[tuple[str, int]] = [("tok", bos), ("text", pre)]
        for j in range(c):
            segs += image + [("text", 2 if j < c - 1 else text_len - 1 - pre)]
        per_sample.append(segs)
    return _uneven_decoder_text(gen, per_sample, vocab=_text_vocab(config), pad_id=_pad_id(config), image_id=image_id,
                                avoid=set(avoid) | {bos}, pad=3)


def _uneven_meta(out: dict, text_len: int) -> dict:
    per = [int(n) for n in out["image_mask"].sum(1)]
    return {"image": max(per), "image_per_sample": per, "text": out["input_ids"].shape[1] - max(per),
            "padding": "left"}


def _shuffled_multi_inputs(config: Any, gen: torch.Generator, batch: int, text_len: int, cls_name: str) -> tuple[dict, dict]:
    """Aya Vision, InternVL: a ViT whose patches are pixel-shuffled (factor 2) into the image tokens; several
    images per prompt, a different count per sample."""
    v = config.vision_config
    size, patch = _size(v.image_size), _size(v.patch_size)
    factor = getattr(config, "downsample_factor", None) or round(1 / config.downsample_ratio)
    n_img = (size // patch) ** 2 // (factor * factor)
    counts = _images_per_sample(batch)
    out = _multi_image_prompts(gen, counts, text_len, [("image", n_img)], config, config.image_token_id, set())
    kwargs = {
        "input_ids": out["input_ids"],
        "attention_mask": out["attention_mask"],
        "pixel_values": _pixels(gen, sum(counts), _channels(v), size, size),
        "use_cache": False,
    }
    return kwargs, _uneven_meta(out, text_len)


def _gemma3_inputs(config: Any, gen: torch.Generator, batch: int, text_len: int, cls_name: str) -> tuple[dict, dict]:
    """Gemma 3: ``<start_of_image> <image>*n <end_of_image>`` per image, one or two images per sample; image
    tokens attend to each other bidirectionally (``token_type_ids`` marks them)."""
    v = config.vision_config
    size = _size(v.image_size)
    n_img = int(config.mm_tokens_per_image)
    t = config.text_config
    bos = int(_first(getattr(t, "bos_token_id", None), default=2))
    boi, eoi = int(config.boi_token_index), int(config.eoi_token_index)
    counts = _images_per_sample(batch)
    out = _multi_image_prompts(gen, counts, text_len, [("tok", boi), ("image", n_img), ("tok", eoi)], config,
                               config.image_token_id, {boi, eoi}, bos=bos)
    kwargs = {
        "input_ids": out["input_ids"],
        "attention_mask": out["attention_mask"],
        "token_type_ids": out["image_mask"].long(),
        "pixel_values": _pixels(gen, sum(counts), _channels(v), size, size),
        "use_cache": False,
    }
    return kwargs, _uneven_meta(out, text_len)


def _mistral3_inputs(config: Any, gen: torch.Generator, batch: int, text_len: int, cls_name: str) -> tuple[dict, dict]:
    """Mistral 3 (Pixtral tower): one image per sample at its own size (``image_sizes``): sample i is
    ``size x size * (1 + i % 2) / 2``-ish, so the samples hold different numbers of image tokens."""
    v = config.vision_config
    size, patch = _size(v.image_size), _size(v.patch_size)
    merge = int(config.spatial_merge_size)
    sizes = [(size, size // 2 if i % 2 == 0 else size) for i in range(batch)]
    n_per = [(h // patch // merge) * (w // patch // merge) for h, w in sizes]
    per_sample = [[("tok", 1), ("text", max(2, text_len // 4)), ("image", n),
                   ("text", text_len - 1 - max(2, text_len // 4))] for n in n_per]
    out = _uneven_decoder_text(gen, per_sample, vocab=_text_vocab(config), pad_id=_pad_id(config),
                               image_id=config.image_token_id, avoid={1}, pad=3)
    pixels = _pixels(gen, batch, _channels(v), size, size)
    for i, (h, w) in enumerate(sizes):  # the processor pads each image to the batch's largest
        pixels[i, :, h:, :] = 0
        pixels[i, :, :, w:] = 0
    kwargs = {
        "input_ids": out["input_ids"],
        "attention_mask": out["attention_mask"],
        "pixel_values": pixels,
        "image_sizes": torch.tensor(sizes, dtype=torch.long),
        "use_cache": False,
    }
    return kwargs, _uneven_meta(out, text_len)


def _encoder_text(
    gen: torch.Generator, batch: int, length: int, *, vocab: int, cls_id: int | None, sep_id: int | None,
    pad_id: int, pad: int, avoid: set[int] = frozenset(),
) -> dict[str, torch.Tensor]:
    """Right-padded encoder text: ``[CLS] tokens [SEP] <pad>...``; the last sample is ``pad`` shorter."""
    specials = {x for x in (cls_id, sep_id, pad_id) if x is not None} | set(avoid)
    n_body = length - (cls_id is not None) - (sep_id is not None)
    ids = _rand_ids(gen, (batch, n_body), vocab, specials)
    parts = []
    if cls_id is not None:
        parts.append(torch.full((batch, 1), cls_id, dtype=torch.long))
    parts.append(ids)
    if sep_id is not None:
        parts.append(torch.full((batch, 1), sep_id, dtype=torch.long))
    input_ids = torch.cat(parts, dim=1)
    mask = torch.ones_like(input_ids)
    if batch > 1 and pad > 0:
        real = length - pad
        last = input_ids[-1]
        if sep_id is not None:
            last[real - 1] = sep_id
        last[real:] = pad_id
        mask[-1, real:] = 0
    return {"input_ids": input_ids, "attention_mask": mask}


def _pixels(gen: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=gen)


def _channels(vision_config: Any) -> int:
    return int(getattr(vision_config, "num_channels", None) or 3)


def _text_vocab(config: Any) -> int:
    return int(_sub(config, "text").vocab_size)


def _pad_id(config: Any) -> int:
    t = _sub(config, "text")
    return int(_first(getattr(t, "pad_token_id", None), default=0))


def _llava_inputs(config: Any, gen: torch.Generator, batch: int, text_len: int, cls_name: str) -> tuple[dict, dict]:
    v = config.vision_config
    grid = _size(v.image_size) // _size(v.patch_size)
    n_img = grid * grid + (1 if config.vision_feature_select_strategy == "full" else 0)
    pre = max(2, text_len // 4)
    t = _decoder_text(
        gen, batch, [("tok", 1), ("text", pre), ("image", n_img), ("text", text_len - 1 - pre)],
        vocab=_text_vocab(config), pad_id=_pad_id(config), image_id=config.image_token_id, avoid={1}, pad=3,
    )
    kwargs = {
        "input_ids": t["input_ids"],
        "attention_mask": t["attention_mask"],
        "pixel_values": _pixels(gen, batch, _channels(v), _size(v.image_size), _size(v.image_size)),
        "use_cache": False,
    }
    return kwargs, {"image": n_img, "text": text_len, "padding": "left"}


def _paligemma_inputs(config: Any, gen: torch.Generator, batch: int, text_len: int, cls_name: str) -> tuple[dict, dict]:
    v = config.vision_config
    grid = _size(v.image_size) // _size(v.patch_size)
    n_img = grid * grid
    t = config.text_config
    bos = int(_first(getattr(t, "bos_token_id", None), default=2))
    nl = 108 if _text_vocab(config) > 108 else 3  # "\n" ends the prefix in PaliGemma prompts
    out = _decoder_text(
        gen, batch, [("image", n_img), ("tok", bos), ("text", text_len - 2), ("tok", nl)],
        vocab=_text_vocab(config), pad_id=_pad_id(config), image_id=config.image_token_id, avoid={bos, nl}, pad=3,
    )
    kwargs = {
        "input_ids": out["input_ids"],
        "attention_mask": out["attention_mask"],
        # the whole prompt is prefix (0): image and question attend bidirectionally
        "token_type_ids": torch.zeros_like(out["input_ids"]),
        "pixel_values": _pixels(gen, batch, _channels(v), _size(v.image_size), _size(v.image_size)),
        "use_cache": False,
    }
    return kwargs, {"image": n_img, "text": text_len, "padding": "left"}


def _one_image_per_sample(text: dict, gen: torch.Generator, vision_config: Any, size: int) -> dict:
    """Idefics-style inputs: the prompts of ``text`` and one ``size`` px image per sample, all pixels valid."""
    batch = text["input_ids"].shape[0]
    return {
        "input_ids": text["input_ids"],
        "attention_mask": text["attention_mask"],
        "pixel_values": _pixels(gen, batch, 1, _channels(vision_config), size, size),
        "pixel_attention_mask": torch.ones(batch, 1, size, size, dtype=torch.bool),
        "use_cache": False,
    }


def _idefics3_inputs(config: Any, gen: torch.Generator, batch: int, text_len: int, cls_name: str) -> tuple[dict, dict]:
    v = config.vision_config
    size, patch = _size(v.image_size), _size(v.patch_size)
    n_img = int(((size // patch) ** 2) / (config.scale_factor**2))
    vocab = _text_vocab(config)
    # <fake_token_around_image> <global-img> <image>*n <fake_token_around_image>: two ids next to the image id
    fake, glob = (config.image_token_id - 2) % vocab, (config.image_token_id - 1) % vocab
    pre = max(2, text_len // 4)
    out = _decoder_text(
        gen, batch,
        [("tok", 1), ("text", pre), ("tok", fake), ("tok", glob), ("image", n_img), ("tok", fake),
         ("text", text_len - 4 - pre)],
        vocab=vocab, pad_id=_pad_id(config), image_id=config.image_token_id, avoid={1, fake, glob}, pad=3,
    )
    return _one_image_per_sample(out, gen, v, size), {"image": n_img, "text": text_len, "padding": "left"}


def _qwen2_vl_inputs(config: Any, gen: torch.Generator, batch: int, text_len: int, cls_name: str) -> tuple[dict, dict]:
    v = config.vision_config
    merge, patch, tpatch = v.spatial_merge_size, _size(v.patch_size), _size(v.temporal_patch_size)
    # no image size in the config: the tiny zoo config carries one; real configs get 224 px (16x16 at patch 14)
    size = int(getattr(v, "graphred_image_size", 0) or 224)
    gh = gw = max(merge, (size // patch) // merge * merge)
    n_img = gh * gw // (merge * merge)
    ids = {config.image_token_id, config.video_token_id, config.vision_start_token_id, config.vision_end_token_id}
    pre = max(2, text_len // 4)
    out = _decoder_text(
        gen, batch,
        [("text", pre), ("tok", config.vision_start_token_id), ("image", n_img), ("tok", config.vision_end_token_id),
         ("text", text_len - 2 - pre)],
        vocab=_text_vocab(config), pad_id=_pad_id(config), image_id=config.image_token_id, avoid=ids, pad=3,
    )
    in_ch = int(_first(getattr(v, "in_channels", None), getattr(v, "in_chans", None), default=3))
    kwargs = {
        "input_ids": out["input_ids"],
        "attention_mask": out["attention_mask"],
        "mm_token_type_ids": out["image_mask"].to(torch.int32),
        "pixel_values": _pixels(gen, batch * gh * gw, in_ch * tpatch * patch * patch),
        "image_grid_thw": torch.tensor([[1, gh, gw]] * batch, dtype=torch.long),
        "use_cache": False,
    }
    return kwargs, {"image": n_img, "text": text_len, "padding": "left"}


def _mrope_positions(model: torch.nn.Module, kwargs: dict) -> None:
    """Qwen2-VL: precompute the 3-axis M-RoPE ``position_ids`` with the model's own ``get_rope_index``.

    Left to the model, this index is computed by Python-level loops over token values
    (``tolist``, ``groupby``), which torch.export cannot trace, and the forward stores
    ``rope_deltas`` on the model. Passed in, the captured graph takes positions as an input,
    as a processor-side computation; the outputs are the same.
    """
    inner = getattr(model, "model", model)
    position_ids, _ = inner.get_rope_index(
        kwargs["input_ids"],
        mm_token_type_ids=kwargs["mm_token_type_ids"],
        image_grid_thw=kwargs["image_grid_thw"],
        attention_mask=kwargs["attention_mask"],
    )
    kwargs["position_ids"] = position_ids


def _vilt_inputs(config: Any, gen: torch.Generator, batch: int, text_len: int, cls_name: str) -> tuple[dict, dict]:
    size = _size(config.image_size)
    text_len = min(text_len, config.max_position_embeddings)
    t = _encoder_text(gen, batch, text_len, vocab=config.vocab_size, cls_id=101 % config.vocab_size,
                      sep_id=102 % config.vocab_size, pad_id=_first(config.pad_token_id, default=0), pad=3)
    kwargs = {
        "input_ids": t["input_ids"],
        "attention_mask": t["attention_mask"],
        "token_type_ids": torch.zeros_like(t["input_ids"]),
        "pixel_values": _pixels(gen, batch, _channels(config), size, size),
        "pixel_mask": torch.ones(batch, size, size, dtype=torch.long),
    }
    n_img = (size // _size(config.patch_size)) ** 2 + 1  # + the image [CLS]
    return kwargs, {"image": n_img, "text": text_len, "padding": "right"}


def _dual_inputs(config: Any, gen: torch.Generator, batch: int, text_len: int, cls_name: str) -> tuple[dict, dict]:
    """CLIP, SigLIP, BLIP: a text stream and an image stream."""
    t, v = config.text_config, config.vision_config
    size = _size(v.image_size)
    text_len = min(text_len, t.max_position_embeddings)
    pad_id = int(_first(t.pad_token_id, default=0))
    model_type = config.model_type
    if model_type == "blip":
        # [CLS] text [SEP]; BLIP's tokenizer is BERT's
        cls_id, sep_id = 101 % t.vocab_size, _first(t.sep_token_id, default=102) % t.vocab_size
    elif model_type == "clip":
        # <bos> text <eos>: CLIP pools the first <eos>
        cls_id, sep_id = t.bos_token_id, t.eos_token_id
    else:
        # SigLIP: text then </s>; padded to length, pooled at the last position
        cls_id, sep_id = None, _first(t.eos_token_id, default=1)
    out = _encoder_text(gen, batch, text_len, vocab=t.vocab_size, cls_id=cls_id, sep_id=sep_id, pad_id=pad_id, pad=3)
    kwargs = {
        "input_ids": out["input_ids"],
        "attention_mask": out["attention_mask"],
        "pixel_values": _pixels(gen, batch, _channels(v), size, size),
    }
    if cls_name == "BlipForImageTextRetrieval":
        kwargs["use_itm_head"] = True
    n_img = (size // _size(v.patch_size)) ** 2 + (0 if model_type == "siglip" else 1)  # + [CLS] for CLIP/BLIP
    return kwargs, {"image": n_img, "text": text_len, "padding": "right"}


def _placeholder_decoder(config: Any, gen: torch.Generator, batch: int, text_len: int, n_img: int,
                         image_first: bool = False) -> dict:
    """Left-padded decoder prompts with ``n_img`` image placeholders (after one leading text token, or first)."""
    vocab, image_id = _text_vocab(config), config.image_token_id
    bos = int(_first(getattr(_sub(config, "text"), "bos_token_id", None), default=1)) % vocab
    segs = ([("image", n_img), ("tok", bos), ("text", text_len - 1)] if image_first else
            [("tok", bos), ("text", max(2, text_len // 4)), ("image", n_img), ("text", text_len - 1 - max(2, text_len // 4))])
    return _decoder_text(gen, batch, segs, vocab=vocab, pad_id=_pad_id(config), image_id=image_id,
                         avoid={bos}, pad=3)


def _fuyu_inputs(config: Any, gen: torch.Generator, batch: int, text_len: int, cls_name: str) -> tuple[dict, dict]:
    # Fuyu has no vision tower: raw patches [B, n, p*p*C] go through one Linear into the decoder
    size, patch = _size(config.image_size), _size(config.patch_size)
    n_img = (size // patch) ** 2
    t = _placeholder_decoder(config, gen, batch, text_len, n_img)
    kwargs = {
        "input_ids": t["input_ids"],
        "attention_mask": t["attention_mask"],
        "image_patches": _pixels(gen, batch, n_img, patch * patch * int(config.num_channels)),
        "use_cache": False,
    }
    return kwargs, {"image": n_img, "text": text_len, "padding": "left"}


def _blip2_inputs(config: Any, gen: torch.Generator, batch: int, text_len: int, cls_name: str) -> tuple[dict, dict]:
    # the Q-Former's learned queries become the image tokens (num_query_tokens placeholders, first)
    v = config.vision_config
    n_img = int(config.num_query_tokens)
    t = _placeholder_decoder(config, gen, batch, text_len, n_img, image_first=True)
    kwargs = {
        "input_ids": t["input_ids"],
        "attention_mask": t["attention_mask"],
        "pixel_values": _pixels(gen, batch, _channels(v), _size(v.image_size), _size(v.image_size)),
        "use_cache": False,
    }
    return kwargs, {"image": n_img, "text": text_len, "padding": "left"}


def _idefics2_inputs(config: Any, gen: torch.Generator, batch: int, text_len: int, cls_name: str) -> tuple[dict, dict]:
    # a perceiver resampler turns the patches into resampler_n_latents image tokens
    v = config.vision_config
    n_img = int(config.perceiver_config.resampler_n_latents)
    size = _size(v.image_size)
    t = _placeholder_decoder(config, gen, batch, text_len, n_img)
    return _one_image_per_sample(t, gen, v, size), {"image": n_img, "text": text_len, "padding": "left"}


def _lfm2_vl_inputs(config: Any, gen: torch.Generator, batch: int, text_len: int, cls_name: str) -> tuple[dict, dict]:
    # SigLIP2 NaFlex tower: flattened patches [B, n_patches, p*p*C] with their grid, pixel-unshuffled by the factor
    v = config.vision_config
    patch = _size(v.patch_size)
    grid = int(round(int(v.num_patches) ** 0.5))
    n_img = (grid // config.downsample_factor) ** 2
    t = _placeholder_decoder(config, gen, batch, text_len, n_img)
    kwargs = {
        "input_ids": t["input_ids"],
        "attention_mask": t["attention_mask"],
        "pixel_values": _pixels(gen, batch, grid * grid, patch * patch * _channels(v)),
        "pixel_attention_mask": torch.ones(batch, grid * grid, dtype=torch.long),
        "spatial_shapes": torch.tensor([[grid, grid]] * batch, dtype=torch.long),
        "use_cache": False,
    }
    return kwargs, {"image": n_img, "text": text_len, "padding": "left"}


def _mllama_inputs(config: Any, gen: torch.Generator, batch: int, text_len: int, cls_name: str) -> tuple[dict, dict]:
    # one image per sample, tiled into 2 tiles (aspect ratio 1x2) that run through the tower as batch rows; the
    # text attends to all tiles' patches by cross-attention, from its <|image|> token on
    v = config.vision_config
    size, patch = _size(v.image_size), _size(v.patch_size)
    tiles = 2
    ratio_id = 1 + next(i for i, r in enumerate(v.supported_aspect_ratios) if list(r) == [1, tiles])
    t = _placeholder_decoder(config, gen, batch, text_len, 1)
    ids = t["input_ids"]
    cross = torch.zeros(batch, ids.shape[1], 1, tiles, dtype=torch.long)
    for b in range(batch):
        cross[b, int(t["image_mask"][b].float().argmax()):] = 1
    kwargs = {
        "input_ids": ids,
        "attention_mask": t["attention_mask"],
        "pixel_values": _pixels(gen, batch, 1, tiles, _channels(v), size, size),
        "aspect_ratio_ids": torch.full((batch, 1), ratio_id, dtype=torch.long),
        "aspect_ratio_mask": torch.ones(batch, 1, tiles, dtype=torch.long),
        "cross_attention_mask": cross,
        "use_cache": False,
    }
    n_img = tiles * ((size // patch) ** 2 + 1)  # per tile: its patches and a class token
    return kwargs, {"image": n_img, "text": text_len + 1, "padding": "left"}


def _kosmos2_inputs(config: Any, gen: torch.Generator, batch: int, text_len: int, cls_name: str) -> tuple[dict, dict]:
    # <s> <image> latent_query_num image positions </image> text; the positions are marked by a mask input
    v, t = config.vision_config, config.text_config
    n_img = int(config.latent_query_num)
    bos, boi, eoi = int(t.bos_token_id), 5, 6  # (the ids around the image are ordinary tokens to the model)
    out = _decoder_text(gen, batch, [("tok", bos), ("tok", boi), ("image", n_img), ("tok", eoi), ("text", text_len - 3)],
                        vocab=int(t.vocab_size), pad_id=int(t.pad_token_id), image_id=7, avoid={bos, boi, eoi, 2}, pad=3)
    kwargs = {
        "input_ids": out["input_ids"],
        "attention_mask": out["attention_mask"],
        "image_embeds_position_mask": out["image_mask"].long(),
        "pixel_values": _pixels(gen, batch, _channels(v), _size(v.image_size), _size(v.image_size)),
        "use_cache": False,
    }
    return kwargs, {"image": n_img, "text": text_len, "padding": "left"}


@dataclass(frozen=True)
class _Family:
    """What the zoo knows about a model family: its classes and how to build inputs."""

    classes: tuple[str, ...]  # transformers classes, preferred first
    inputs: Callable[[Any, torch.Generator, int, int, str], tuple[dict, dict]]
    text_len: int  # text tokens per sample for configs read from a directory
    decoder: bool
    # inputs computed with the built model (host-side logic a processor would do), or None
    finish: Callable[[torch.nn.Module, dict], None] | None = None
    # weight matrices the random init leaves all zero (loaded from checkpoints in practice) get a seeded
    # normal init, so that tokens through them differ (Gemma 3's image projection would map every image to 0)
    init_zero_matrices: bool = False
    # scalar gates the random init leaves at zero (set by checkpoints) get a seeded value in [0.5, 1), so that the
    # gated branch reaches the output (Mllama's cross-attention gates would shut the image out of the text)
    init_zero_gates: bool = False


_FAMILIES: dict[str, _Family] = {
    "llava": _Family(("LlavaForConditionalGeneration",), _llava_inputs, 32, True),
    "paligemma": _Family(("PaliGemmaForConditionalGeneration",), _paligemma_inputs, 16, True),
    "idefics3": _Family(("Idefics3ForConditionalGeneration",), _idefics3_inputs, 24, True),
    "smolvlm": _Family(("SmolVLMForConditionalGeneration",), _idefics3_inputs, 24, True),
    "qwen2_vl": _Family(("Qwen2VLForConditionalGeneration",), _qwen2_vl_inputs, 24, True, _mrope_positions),
    "qwen2_5_vl": _Family(("Qwen2_5_VLForConditionalGeneration",), _qwen2_vl_inputs, 24, True, _mrope_positions),
    "gemma3": _Family(("Gemma3ForConditionalGeneration",), _gemma3_inputs, 16, True, init_zero_matrices=True),
    "mistral3": _Family(("Mistral3ForConditionalGeneration",), _mistral3_inputs, 16, True),
    "aya_vision": _Family(("AyaVisionForConditionalGeneration",), _shuffled_multi_inputs, 16, True),
    "internvl": _Family(("InternVLForConditionalGeneration",), _shuffled_multi_inputs, 16, True),
    "qwen3_vl": _Family(("Qwen3VLForConditionalGeneration",), _qwen2_vl_inputs, 24, True),
    "fuyu": _Family(("FuyuForCausalLM",), _fuyu_inputs, 24, True),
    "blip-2": _Family(("Blip2ForConditionalGeneration",), _blip2_inputs, 24, True),
    "idefics2": _Family(("Idefics2ForConditionalGeneration",), _idefics2_inputs, 24, True),
    "lfm2_vl": _Family(("Lfm2VlForConditionalGeneration",), _lfm2_vl_inputs, 24, True),
    "mllama": _Family(("MllamaForConditionalGeneration",), _mllama_inputs, 24, True, init_zero_gates=True),
    "kosmos-2": _Family(("Kosmos2ForConditionalGeneration",), _kosmos2_inputs, 24, True),
    "vilt": _Family(("ViltForQuestionAnswering", "ViltModel"), _vilt_inputs, 16, False),
    "blip": _Family(("BlipForImageTextRetrieval",), _dual_inputs, 16, False),
    "clip": _Family(("CLIPModel",), _dual_inputs, 16, False),
    "siglip": _Family(("SiglipModel",), _dual_inputs, 16, False),
}


def supported_model_types() -> list[str]:
    """The Hugging Face ``model_type`` values the zoo can build inputs for."""
    return sorted(_FAMILIES)


# --------------------------------------------------------------------------------------------
# Tiny configs (the presets)
# --------------------------------------------------------------------------------------------

_VOCAB = 320  # tiny vocabulary; the top ids are the image/special tokens


def _llama(hidden: int = 64, layers: int = 2, heads: int = 4, kv: int = 2, inter: int = 128,
           vocab: int = _VOCAB, max_pos: int = 1024):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                       num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=max_pos,
                       pad_token_id=0, bos_token_id=1, eos_token_id=2)


def _clip_vision(hidden: int = 32, layers: int = 2, heads: int = 2, inter: int = 64, image: int = 32, patch: int = 4):
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                            num_attention_heads=heads, image_size=image, patch_size=patch, projection_dim=hidden)


def _siglip_vision(hidden: int = 32, layers: int = 2, heads: int = 2, inter: int = 64, image: int = 32, patch: int = 4,
                   cls: Any = None, **extra: Any):
    if cls is None:
        from transformers import SiglipVisionConfig as cls
    return cls(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers, num_attention_heads=heads,
               image_size=image, patch_size=patch, **extra)


def _cfg_llava():
    from transformers import LlavaConfig

    # CLIP 32 px / patch 4 -> 8x8 = 64 patches (+CLS, dropped by the "default" strategy); Llama with GQA 4q/2kv
    return LlavaConfig(vision_config=_clip_vision(), text_config=_llama(), image_token_index=_VOCAB - 1,
                       image_seq_length=64, vision_feature_layer=-2, vision_feature_select_strategy="default")


def _cfg_llava_bench(hidden: int = 384, heads: int = 6, kv: int = 2, inter: int = 1024):
    from transformers import LlavaConfig

    # LLaVA-1.5 shape at reduced width: CLIP 336 px / patch 14 -> 24x24 = 576 image tokens, 8 Llama
    # layers (default: hidden 384, 6 q heads / 2 kv heads)
    return LlavaConfig(
        vision_config=_clip_vision(hidden=128, layers=4, heads=4, inter=512, image=336, patch=14),
        text_config=_llama(hidden=hidden, layers=8, heads=heads, kv=kv, inter=inter, vocab=8000, max_pos=2048),
        image_token_index=7999, image_seq_length=576, vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )


def _cfg_llava_bench_1024():
    # the same sequence at a wider decoder: hidden 1024, 16 heads (multi-head, as LLaVA-1.5)
    return _cfg_llava_bench(hidden=1024, heads=16, kv=16, inter=2816)


def _cfg_paligemma():
    from transformers import GemmaConfig, PaliGemmaConfig

    text = GemmaConfig(vocab_size=_VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=1024,
                       pad_token_id=0, bos_token_id=2, eos_token_id=1)
    return PaliGemmaConfig(vision_config=_siglip_vision(projection_dim=64), text_config=text,
                           image_token_index=_VOCAB - 1, projection_dim=64, hidden_size=64, vocab_size=_VOCAB)


def _cfg_idefics3():
    from transformers import Idefics3Config
    from transformers.models.idefics3.configuration_idefics3 import Idefics3VisionConfig

    # 32 px / patch 4 -> 64 patches; pixel shuffle with scale 2 -> 16 image tokens
    vision = _siglip_vision(cls=Idefics3VisionConfig)
    return Idefics3Config(vision_config=vision, text_config=_llama(), image_token_id=_VOCAB - 1, scale_factor=2,
                          pad_token_id=0)


def _cfg_qwen2_vl():
    from transformers import Qwen2VLConfig
    from transformers.models.qwen2_vl.configuration_qwen2_vl import Qwen2VLTextConfig, Qwen2VLVisionConfig

    vision = Qwen2VLVisionConfig(depth=2, embed_dim=32, hidden_size=64, mlp_ratio=2, num_heads=2, in_channels=3,
                                 patch_size=4, spatial_merge_size=2, temporal_patch_size=2)
    # 32 px / patch 4 -> 8x8 patches -> 2x2 merge -> 16 image tokens (not a config field: a zoo hint)
    vision.graphred_image_size = 32
    text = Qwen2VLTextConfig(vocab_size=_VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                             rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 10000.0},
                             bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return Qwen2VLConfig(text_config=text, vision_config=vision, image_token_id=_VOCAB - 4,
                         video_token_id=_VOCAB - 3, vision_start_token_id=_VOCAB - 2, vision_end_token_id=_VOCAB - 1)


def _cfg_gemma3():
    from transformers import Gemma3Config
    from transformers.models.gemma3.configuration_gemma3 import Gemma3TextConfig

    text = Gemma3TextConfig(vocab_size=_VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=1024,
                            sliding_window=512, pad_token_id=0, bos_token_id=2, eos_token_id=1)
    # SigLIP 32 px / patch 4 -> 64 patches, pooled to 16 tokens per image
    return Gemma3Config(text_config=text, vision_config=_siglip_vision(), mm_tokens_per_image=16,
                        image_token_index=_VOCAB - 1, boi_token_index=_VOCAB - 2, eoi_token_index=_VOCAB - 3)


def _cfg_mistral3():
    from transformers import Mistral3Config, PixtralVisionConfig

    vision = PixtralVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                 image_size=32, patch_size=4, head_dim=16)
    # per image: (h/4/2) x (w/4/2) tokens after the 2x2 patch merger: 32x16 px -> 8, 32x32 px -> 16
    return Mistral3Config(vision_config=vision, text_config=_llama(), image_token_index=_VOCAB - 1,
                          spatial_merge_size=2, vision_feature_layer=-1)


def _cfg_aya_vision():
    from transformers import AyaVisionConfig, Cohere2Config

    text = Cohere2Config(vocab_size=_VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024, sliding_window=512,
                         layer_types=["sliding_attention", "full_attention"], pad_token_id=0, bos_token_id=1,
                         eos_token_id=2)
    # SigLIP 32 px / patch 4 -> 64 patches, pixel shuffle 2 -> 16 tokens per image
    return AyaVisionConfig(vision_config=_siglip_vision(), text_config=text, image_token_id=_VOCAB - 1,
                           downsample_factor=2, adapter_layer_norm_eps=1e-5)


def _cfg_internvl():
    from transformers import InternVLConfig, Qwen2Config
    from transformers.models.internvl.configuration_internvl import InternVLVisionConfig

    text = Qwen2Config(vocab_size=_VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024, pad_token_id=0,
                       bos_token_id=1, eos_token_id=2)
    vision = InternVLVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                  image_size=[32, 32], patch_size=[4, 4])
    # 32 px / patch 4 -> 64 patches, pixel shuffle 0.5 -> 16 tokens per image
    return InternVLConfig(vision_config=vision, text_config=text, image_token_id=_VOCAB - 1, downsample_ratio=0.5)


def _cfg_vilt():
    from transformers import ViltConfig

    return ViltConfig(vocab_size=_VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                      intermediate_size=64, image_size=32, patch_size=4, max_position_embeddings=40,
                      num_labels=8, id2label={i: f"answer{i}" for i in range(8)},
                      label2id={f"answer{i}": i for i in range(8)}, pad_token_id=0)


def _cfg_blip():
    from transformers import BlipConfig, BlipTextConfig, BlipVisionConfig

    text = BlipTextConfig(vocab_size=_VOCAB, hidden_size=32, encoder_hidden_size=32, intermediate_size=64,
                          projection_dim=32, num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=64,
                          bos_token_id=_VOCAB - 2, pad_token_id=0, sep_token_id=102, eos_token_id=2)
    vision = BlipVisionConfig(hidden_size=32, intermediate_size=64, projection_dim=32, num_hidden_layers=2,
                              num_attention_heads=2, image_size=32, patch_size=4, initializer_range=0.02)
    return BlipConfig(text_config=text, vision_config=vision, projection_dim=32, image_text_hidden_size=32)


def _cfg_clip():
    from transformers import CLIPConfig, CLIPTextConfig

    text = CLIPTextConfig(vocab_size=_VOCAB, hidden_size=32, intermediate_size=64, projection_dim=32,
                          num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=32,
                          pad_token_id=0, bos_token_id=_VOCAB - 2, eos_token_id=_VOCAB - 1)
    return CLIPConfig(text_config=text, vision_config=_clip_vision(), projection_dim=32)


def _cfg_siglip():
    from transformers import SiglipConfig, SiglipTextConfig

    text = SiglipTextConfig(vocab_size=_VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=2, max_position_embeddings=32, pad_token_id=0, eos_token_id=1,
                            bos_token_id=_VOCAB - 1, projection_size=32)
    return SiglipConfig(text_config=text, vision_config=_siglip_vision())


def _cfg_fuyu():
    from transformers import FuyuConfig

    # no vision tower: 32 px / patch 8 -> 16 raw patches through one Linear; Persimmon decoder
    text = dict(model_type="persimmon", vocab_size=_VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, max_position_embeddings=1024, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return FuyuConfig(text_config=text, image_size=32, patch_size=8, num_channels=3, image_token_id=_VOCAB - 1,
                      hidden_size=64, vocab_size=_VOCAB)


def _cfg_blip2():
    from transformers import Blip2Config, Blip2QFormerConfig, Blip2VisionConfig, OPTConfig

    # ViT 32 px / patch 4 (64 patches + CLS) -> Q-Former, 16 learned queries cross-attending every layer -> OPT
    # decoder (learned absolute positions, post-attention norm on a folded [B*L, C] layout)
    vision = Blip2VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                               image_size=32, patch_size=4)
    qformer = Blip2QFormerConfig(vocab_size=_VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                 intermediate_size=64, encoder_hidden_size=32, cross_attention_frequency=1,
                                 max_position_embeddings=64)
    text = OPTConfig(vocab_size=_VOCAB, hidden_size=64, num_hidden_layers=2, ffn_dim=128, num_attention_heads=4,
                     max_position_embeddings=128, word_embed_proj_dim=64, pad_token_id=0, bos_token_id=2, eos_token_id=2)
    return Blip2Config(vision_config=vision.to_dict(), qformer_config=qformer.to_dict(), text_config=text.to_dict(),
                       num_query_tokens=16, image_token_index=_VOCAB - 1)


def _cfg_lfm2_vl():
    from transformers import Lfm2VlConfig

    # SigLIP2 NaFlex tower (Linear patch embedding, 8x8 patches) -> pixel unshuffle 2 -> 16 image tokens; LFM2
    # decoder whose layers 0 and 2 are short causal convolutions, 1 and 3 attention
    vision = dict(model_type="siglip2_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=2, patch_size=4, num_patches=64)
    text = dict(model_type="lfm2", vocab_size=_VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                num_attention_heads=4, num_key_value_heads=2, block_auto_adjust_ff_dim=False,
                layer_types=["conv", "full_attention", "conv", "full_attention"], max_position_embeddings=1024,
                pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return Lfm2VlConfig(vision_config=vision, text_config=text, image_token_id=_VOCAB - 1, projector_hidden_size=64,
                        downsample_factor=2)


def _cfg_qwen3_vl():
    from transformers import Qwen3VLConfig

    # Qwen2-VL's layout (32 px / patch 4 -> 8x8 -> 2x2 merge -> 16 image tokens), interpolated learned vision
    # positions and deepstack features added into the decoder; no precomputed position_ids
    vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, in_channels=3, patch_size=4,
                  spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=64, num_position_embeddings=64,
                  deepstack_visual_indexes=[0])
    text = dict(vocab_size=_VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, head_dim=16, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 10000.0,
                                 "mrope_interleaved": True})
    config = Qwen3VLConfig(text_config=text, vision_config=vision, image_token_id=_VOCAB - 4,
                           video_token_id=_VOCAB - 3, vision_start_token_id=_VOCAB - 2, vision_end_token_id=_VOCAB - 1)
    config.vision_config.graphred_image_size = 32  # (a zoo hint, as for Qwen2-VL)
    return config


def _cfg_kosmos2():
    from transformers import Kosmos2Config

    # CLIP-like tower (64 patches + CLS) -> 16 learned latent queries cross-attending to the patches -> a decoder
    # with scaled embeddings and sinusoidal positions
    text = dict(vocab_size=_VOCAB, max_position_embeddings=128, embed_dim=64, layers=2, ffn_dim=128, attention_heads=4,
                pad_token_id=1, bos_token_id=0, eos_token_id=2, dropout=0.0, attention_dropout=0.0)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32,
                  patch_size=4)
    return Kosmos2Config(text_config=text, vision_config=vision, latent_query_num=16)


def _cfg_mllama():
    from transformers import MllamaConfig

    # tiles of 16 px / patch 4 (16 patches + CLS, padded to 24) run as batch rows, then as one sequence per image
    # in the global layers; a Llama decoder with gated cross-attention layers 1 and 3 between self-attention 0 and 2
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_global_layers=1, attention_heads=2,
                  image_size=16, patch_size=4, max_num_tiles=2, supported_aspect_ratios=[[1, 1], [1, 2], [2, 1]],
                  vision_output_dim=64, intermediate_layers_indices=[0])
    text = dict(vocab_size=_VOCAB + 1, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                num_attention_heads=4, num_key_value_heads=2, cross_attention_layers=[1, 3],
                max_position_embeddings=1024, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return MllamaConfig(vision_config=vision, text_config=text, image_token_index=_VOCAB)


@dataclass(frozen=True)
class _Preset:
    family: str  # a key of _FAMILIES
    cls: str  # transformers class
    config: Callable[[], Any]
    summary: str
    text_len: int = 12
    batch: int = 2
    bench: bool = False


_PRESETS: dict[str, _Preset] = {
    "llava": _Preset("llava", "LlavaForConditionalGeneration", _cfg_llava,
                     "Llama decoder (2 layers, hidden 64, GQA 4q/2kv) + CLIP vision tower, image tokens scattered "
                     "into the text"),
    "paligemma": _Preset("paligemma", "PaliGemmaForConditionalGeneration", _cfg_paligemma,
                         "Gemma decoder (2 layers, GQA 4q/2kv, prefix-LM mask) + SigLIP vision tower, image first"),
    "idefics3": _Preset("idefics3", "Idefics3ForConditionalGeneration", _cfg_idefics3,
                        "SmolVLM-style: SigLIP-like tower, pixel shuffle (scale 2) connector, Llama decoder"),
    "qwen2-vl": _Preset("qwen2_vl", "Qwen2VLForConditionalGeneration", _cfg_qwen2_vl,
                        "Qwen2 decoder with M-RoPE (3-axis positions) + 2x2-merging ViT over flattened patches"),
    "gemma3": _Preset("gemma3", "Gemma3ForConditionalGeneration", _cfg_gemma3,
                      "Gemma 3 decoder (2 layers, sliding + global, image tokens bidirectional through a vmapped mask "
                      "function) + SigLIP tower pooled to 16 tokens; one image, then two images per sample"),
    "mistral3": _Preset("mistral3", "Mistral3ForConditionalGeneration", _cfg_mistral3,
                        "Llama decoder + Pixtral tower (2D rotary, per-image sizes, 2x2 patch merger); a 32x16 image, "
                        "then a 32x32 one: 8 and 16 image tokens"),
    "aya-vision": _Preset("aya_vision", "AyaVisionForConditionalGeneration", _cfg_aya_vision,
                          "Cohere2 decoder (sliding + global layers) + SigLIP tower, pixel shuffle 2; one image, then "
                          "two images per sample"),
    "internvl": _Preset("internvl", "InternVLForConditionalGeneration", _cfg_internvl,
                        "Qwen2 decoder + InternViT tower, pixel shuffle 0.5; one image, then two images per sample"),
    "vilt": _Preset("vilt", "ViltForQuestionAnswering", _cfg_vilt,
                    "single-stream encoder: text and image patches concatenated into one BERT-style sequence"),
    "blip": _Preset("blip", "BlipForImageTextRetrieval", _cfg_blip,
                    "image-text matching: BERT text encoder cross-attending to a ViT (use_itm_head=True)"),
    "clip": _Preset("clip", "CLIPModel", _cfg_clip, "dual encoder: separate text and vision transformers, contrastive"),
    "siglip": _Preset("siglip", "SiglipModel", _cfg_siglip,
                      "dual encoder with sigmoid loss: text transformer + ViT (no CLS, attention-pool head)"),
    "fuyu": _Preset("fuyu", "FuyuForCausalLM", _cfg_fuyu,
                    "Persimmon decoder fed raw image patches through one Linear (no vision tower, no convolution)"),
    "blip-2": _Preset("blip-2", "Blip2ForConditionalGeneration", _cfg_blip2,
                      "ViT + Q-Former (16 learned queries cross-attending to the patches) + OPT decoder (learned "
                      "positions, folded [B*L, C] feed-forward)"),
    "lfm2-vl": _Preset("lfm2_vl", "Lfm2VlForConditionalGeneration", _cfg_lfm2_vl,
                       "SigLIP2 NaFlex tower (Linear patches) + LFM2 decoder: causal convolution layers between the "
                       "attention layers, the first layer a convolution"),
    "qwen3-vl": _Preset("qwen3_vl", "Qwen3VLForConditionalGeneration", _cfg_qwen3_vl,
                        "Qwen3 decoder with interleaved M-RoPE and deepstack features + ViT with interpolated "
                        "positions; captured without precomputed position_ids (vision positions built in Python)"),
    "kosmos-2": _Preset("kosmos-2", "Kosmos2ForConditionalGeneration", _cfg_kosmos2,
                        "CLIP-like tower + 16 learned latent queries cross-attending to the patches + decoder with "
                        "scaled embeddings and sinusoidal positions; image positions marked by a mask input"),
    "mllama": _Preset("mllama", "MllamaForConditionalGeneration", _cfg_mllama,
                      "Llama-3.2-Vision-style: tiled image (tiles folded into the batch, then into one sequence) + "
                      "decoder with gated cross-attention layers interleaved with self-attention"),
    "llava-bench": _Preset("llava", "LlavaForConditionalGeneration", _cfg_llava_bench,
                           "LLaVA-1.5-shaped benchmark model: 576 image tokens, 8 Llama layers at hidden 384 "
                           "(GQA 6q/2kv), 4-layer CLIP-336/14 tower", text_len=40, batch=4, bench=True),
    "llava-bench-1024": _Preset("llava", "LlavaForConditionalGeneration", _cfg_llava_bench_1024,
                                "llava-bench at decoder width 1024 (16 heads, 8 layers): how costs scale with width",
                                text_len=40, batch=4, bench=True),
}


def names(include_bench: bool = True) -> list[str]:
    """The zoo's model names; ``include_bench=False`` leaves out the (larger) benchmark presets."""
    return [n for n, p in _PRESETS.items() if include_bench or not p.bench]


# Families added for issue 13 (architectures the analysis and rewrite had to learn to read): tested by their own
# expectation tests (tests/test_zoo_families.py: blocks, identity at zero reduction, a reducing plan, the estimate
# against FlopCounterMode), not by every zoo-wide fixture
FAMILY_NAMES: list[str] = ["gemma3", "mistral3", "aya-vision", "internvl", "fuyu", "blip-2", "kosmos-2", "lfm2-vl", "qwen3-vl",
                           "mllama"]
TEST_NAMES: list[str] = [n for n in names(include_bench=False) if n not in FAMILY_NAMES]


def is_bench(name: str) -> bool:
    """True for presets meant for benchmarks rather than unit tests (bigger, slower)."""
    return _preset(name).bench


def _preset(name: str) -> _Preset:
    try:
        return _PRESETS[name]
    except KeyError:
        raise ConfigError(f"Unknown zoo model {name!r}. Zoo models: {', '.join(names())}.") from None


def _example_inputs(preset: _Preset, config: Any, seed: int) -> tuple[dict, dict]:
    gen = torch.Generator().manual_seed(seed)
    kwargs, meta = _FAMILIES[preset.family].inputs(config, gen, preset.batch, preset.text_len, preset.cls)
    meta["pad"] = int((kwargs["attention_mask"][-1] == 0).sum())  # padding positions in the last sample
    return kwargs, meta


def info(name: str) -> dict:
    """Per-sample token counts and shape facts of a zoo model's example inputs (no model built).

    ``image`` and ``text`` count sequence positions per sample (``text`` includes the ``pad``
    padding positions of the last sample; ``image`` includes a vision [CLS] where the image
    stream has one).

    >>> info("llava")["image"], info("llava")["batch"]
    (64, 2)
    """
    p = _preset(name)
    _, meta = _example_inputs(p, p.config(), 0)
    return {"name": name, "class": p.cls, "batch": p.batch, "bench": p.bench, **meta}


def describe(name: str) -> str:
    """One line: the class, what it is, and its example inputs."""
    p = _preset(name)
    i = info(name)
    return (f"{p.cls} - {p.summary}; batch {i['batch']} x ({i['image']} image + {i['text']} text tokens, "
            f"the last sample {i['padding']}-padded by {i['pad']})")


@contextlib.contextmanager
def _seeded(seed: int):
    """Seed torch's CPU RNG for model init without disturbing the caller's RNG state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


@contextlib.contextmanager
def _quiet_transformers():
    """transformers' warnings and progress bars off while the zoo builds a model; restored after."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def _transformers_class(cls_name: str):
    import transformers

    cls = getattr(transformers, cls_name, None)
    if cls is None:
        raise ConfigError(f"transformers {transformers.__version__} has no class {cls_name}.")
    return cls


def load(name: str, seed: int = 0) -> tuple[torch.nn.Module, dict]:
    """Build zoo model ``name`` (random init seeded by ``seed``, eval mode) and its example inputs.

    >>> model, kwargs = load("llava")
    >>> type(model).__name__, tuple(kwargs["input_ids"].shape)
    ('LlavaForConditionalGeneration', (2, 76))
    """
    p = _preset(name)
    config = p.config()
    cls = _transformers_class(p.cls)
    with _quiet_transformers(), _seeded(seed):
        model = cls(config)
        if _FAMILIES[p.family].init_zero_matrices:
            with torch.no_grad():
                for _, w in model.named_parameters():
                    if w.dim() >= 2 and not bool(w.any()):
                        w.normal_(0.0, 0.02)
        if _FAMILIES[p.family].init_zero_gates:
            with torch.no_grad():
                for _, w in model.named_parameters():
                    if w.numel() == 1 and not bool(w.any()):
                        w.uniform_(0.5, 1.0)
    model.eval()
    kwargs, _ = _example_inputs(p, config, seed)
    finish = _FAMILIES[p.family].finish
    if finish is not None:
        finish(model, kwargs)
    return model, kwargs


def deepened(name: str, layers: int = 4, seed: int = 0) -> tuple[torch.nn.Module, dict]:
    """Zoo model ``name`` with ``layers`` layers in the stack the methods act on (the vision tower of a
    dual-tower model, the language model of LLaVA, else the model's own layers), seeded init; with two
    layers, differences between layer orders hide. ViLT gets a sharper init (std 0.2): at 0.02 its
    attention is almost uniform and score orders become coin tosses.

    >>> model, kwargs = deepened("clip")
    >>> model.config.vision_config.num_hidden_layers
    4
    """
    model, kwargs = load(name, seed=seed)
    config = copy.deepcopy(model.config)
    if name in ("clip", "siglip"):
        config.vision_config.num_hidden_layers = layers
    elif name == "llava":
        config.text_config.num_hidden_layers = layers
    else:
        config.num_hidden_layers = layers
    if name == "vilt":
        config.initializer_range = 0.2
    with _quiet_transformers(), _seeded(seed):
        deep = type(model)(config).eval()
    return deep, kwargs


def inputs(name: str, batch: int | None = None, text_len: int | None = None, seed: int = 0,
           model: torch.nn.Module | None = None) -> dict:
    """Example inputs of zoo model ``name`` at another batch size and/or text length (same rules: the last
    sample padded, left for decoders). Models whose inputs need the built model (Qwen2-VL's M-RoPE
    positions) use ``model`` or build one.

    >>> tuple(inputs("llava", batch=3, text_len=20)["input_ids"].shape)
    (3, 84)
    """
    p = _preset(name)
    config = p.config()
    gen = torch.Generator().manual_seed(seed)
    kwargs, _ = _FAMILIES[p.family].inputs(config, gen, batch or p.batch, text_len or p.text_len, p.cls)
    finish = _FAMILIES[p.family].finish
    if finish is not None:
        finish(model if model is not None else load(name, seed)[0], kwargs)
    return kwargs


# --------------------------------------------------------------------------------------------
# Local model directories
# --------------------------------------------------------------------------------------------

_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                 "pytorch_model.bin.index.json")


def _has_weights(path: str) -> bool:
    return any(os.path.exists(os.path.join(path, f)) for f in _WEIGHT_FILES) or any(
        f.endswith(".safetensors") for f in os.listdir(path)
    )


def _pick_class(config: Any, path: str):
    """The transformers class for a config: its ``architectures`` first, then the family's."""
    import transformers

    model_type = getattr(config, "model_type", None)
    archs = list(getattr(config, "architectures", None) or [])
    family = _FAMILIES.get(model_type)
    tried = []
    if family is not None:
        for name in archs + [c for c in family.classes if c not in archs]:
            tried.append(name)
            cls = getattr(transformers, name, None)
            if cls is not None:
                return cls, family
    else:
        tried = archs
    raise ConfigError(
        f"Cannot build a model from {path}: model_type {model_type!r}, architectures {archs or 'none'}"
        + (f"; tried classes {', '.join(tried)}" if tried else "")
        + f". graphred's zoo builds inputs for model types: {', '.join(supported_model_types())}."
    )


def from_config_dir(path: str | os.PathLike, device: str = "meta", seed: int = 0) -> tuple[torch.nn.Module, dict]:
    """Build a model and example inputs from a local Hugging Face model directory.

    ``device="meta"`` builds the model on the meta device (no memory, no weights loaded; for
    analysis and estimates). ``device="cpu"`` loads the weights when the directory has them
    (safetensors or ``pytorch_model.bin``) -- a checkpoint missing some of the model's tensors, or holding
    them in other shapes, is refused with a :class:`ConfigError` listing them -- else initialises
    randomly (seeded). Example inputs
    are built from the config (image size, patch size, image token id, vocabulary) with the
    same per-family builders as the zoo, on ``device``.
    """
    path = os.fspath(path)
    if device not in ("meta", "cpu"):
        raise ConfigError(f"from_config_dir: device must be 'meta' or 'cpu', got {device!r}.")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise ConfigError(f"{path} is not a Hugging Face model directory: it has no config.json.")
    from transformers import AutoConfig

    try:
        with _quiet_transformers():
            config = AutoConfig.from_pretrained(path, local_files_only=True)
    except Exception as e:  # noqa: BLE001 - unknown model_type, broken json, ...
        raise ConfigError(
            f"Cannot read the config in {path}: {type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}. "
            f"graphred's zoo builds inputs for model types: {', '.join(supported_model_types())}."
        ) from None
    cls, family = _pick_class(config, path)
    try:
        with _quiet_transformers():
            model = _build(cls, config, path, device, seed)
    except ConfigError:
        raise
    except Exception as e:  # noqa: BLE001
        raise ConfigError(f"Building {cls.__name__} from {path} failed: {type(e).__name__}: {e}") from None
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    kwargs, _ = family.inputs(config, gen, 2, family.text_len, cls.__name__)
    if family.finish is not None:
        family.finish(model, kwargs)
    if device == "meta":
        kwargs = {k: v.to("meta") if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
    return model, kwargs


def _build(cls, config: Any, path: str, device: str, seed: int) -> torch.nn.Module:
    if device == "meta":
        with torch.device("meta"):
            return cls(config)
    if _has_weights(path):
        model, info = cls.from_pretrained(path, local_files_only=True, output_loading_info=True)
        _check_loading_info(cls.__name__, path, info)
        return model
    with _seeded(seed):
        return cls(config)


def _check_loading_info(cls_name: str, path: str, info: dict) -> None:
    """Refuse a checkpoint that does not cover the model: transformers would initialise the missing
    tensors at random and say so only in a log graphred keeps quiet."""
    problems = []
    for key, what in (("missing_keys", "missing from the checkpoint"), ("mismatched_keys", "of another shape in the checkpoint")):
        names = sorted(str(k if isinstance(k, str) else k[0]) for k in (info.get(key) or ()))
        if names:
            shown = ", ".join(names[:12]) + (f", ... ({len(names)} in all)" if len(names) > 12 else "")
            problems.append(f"{len(names)} tensor(s) {what}: {shown}")
    if problems:
        raise ConfigError(
            f"The weights in {path} do not cover {cls_name}: {'; '.join(problems)}. They would be initialised at "
            "random. Use a complete checkpoint for this config, or a directory with only config.json for "
            "random (seeded) weights.")


def resolve(spec: str | os.PathLike, device: str | None = None) -> tuple[torch.nn.Module, dict, str]:
    """A zoo name or a local model directory -> ``(model, kwargs, name)``.

    For a directory, ``device=None`` means ``"cpu"`` when it holds weights, else ``"meta"``.
    """
    s = os.fspath(spec)
    if s in _PRESETS:
        model, kwargs = load(s)
        return model, kwargs, s
    if os.path.isdir(s):
        dev = device or ("cpu" if _has_weights(s) else "meta")
        model, kwargs = from_config_dir(s, device=dev)
        return model, kwargs, os.path.basename(os.path.normpath(s)) or s
    raise ConfigError(
        f"{s!r} is neither a zoo model nor a local model directory. Zoo models: {', '.join(names())}; "
        "or pass a directory holding a Hugging Face config.json."
    )


def llava15_config(hidden: int = 4096, layers: int = 32, heads: int = 32, intermediate: int = 11008):
    """A LLaVA-1.5-shaped ``LlavaConfig`` (CLIP ViT-L/14 at 336 px, 576 image tokens, Llama decoder);
    the defaults are the 7B decoder, ``(5120, 40, 40, 13824)`` gives 13B. For estimates without weights:
    ``llava15_config().save_pretrained(path)`` then ``graphred estimate path``."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    return LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                       num_attention_heads=16, image_size=336, patch_size=14, projection_dim=768),
        text_config=LlamaConfig(vocab_size=32064, hidden_size=hidden, intermediate_size=intermediate,
                                num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                                max_position_embeddings=4096, pad_token_id=0, bos_token_id=1, eos_token_id=2),
        image_token_index=32000, image_seq_length=576, vision_feature_layer=-2, vision_feature_select_strategy="default",
        architectures=["LlavaForConditionalGeneration"],
    )
