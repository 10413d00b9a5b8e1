"""Generation with a reduced model: reduced prefill, per-layer reduced KV caches, Hugging Face semantics.

``fast.generate(**inputs, max_new_tokens=32)`` (or ``graphred.generate(fast, ...)``) runs the model's own
``GenerationMixin.generate`` for everything but the decoding loop: the generation config, the logits
processors and warpers (temperature, top-k/p, repetition penalty, ...), the stopping criteria (eos,
max length), position ids from the attention mask, left padding. The loop itself is graphred's
(``custom_generate``), and differs from Hugging Face's ``_sample`` in two places:

* **Prefill runs reduced**: the prompt goes through the reduced module (one specialisation per prompt
  shape) with ``use_cache=True`` and, where the model takes it, ``logits_to_keep=1``, so the vocabulary
  head runs at the last position only. The reduced graph fills the key/value cache: each layer holds
  only the tokens that reached it (a FastV cut at layer K: layers < K hold the whole prompt, layers
  >= K the kept tokens).
* **Decode steps attend over those per-layer caches**: each step runs the user's model on the new token
  with that cache, so a layer's attention reads its own, shorter, key/value entries. Positions
  continue from the unreduced prompt length (the rotary position of a new token is the one it would
  have without reduction), as FastV does. With left padding, every layer still holds the padding
  positions first (padding is text, and reductions keep the order of the tokens they keep), so the
  mask of a layer is "the first ``p_b`` entries of sample b are invalid" for any cache length: the
  decode step applies it to each attention call (``torch.nn.functional.scaled_dot_product_attention``)
  with that layer's own key length.

Not supported (a :class:`graphred.GraphredError` says so): plans that renumber positions
(``renumber=True``: layers before and after the cut would need different positions for the same new
token), beam search and other non-sampling decoding modes, a cache passed in by the caller, and
left-padded batches on models whose attention does not go through SDPA.

>>> import graphred
>>> model, inputs = graphred.zoo.load("llava")
>>> fast = graphred.transform(graphred.capture(model, **inputs), graphred.plans.fastv(layer=1, keep=0.5))
>>> out = fast.generate(**inputs, max_new_tokens=4, do_sample=False)
>>> tuple(out.shape) == (2, inputs["input_ids"].shape[1] + 4)
True
"""
from __future__ import annotations

import functools
from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from .errors import GraphredError

__all__ = ["PaddingMask", "generate", "reduced_decoding"]

_SDPA = F.scaled_dot_product_attention


class PaddingMask(TorchFunctionMode):
    """During a decode step: give every SDPA call the mask of a left-padded batch at its own key length.

    ``pads[b]`` leading cache entries of sample b are padding in every layer, whatever the layer's
    length; the mask of an attention over ``n`` keys is ``arange(n) >= pads[b]`` (combined with a mask
    the call already has). ``calls`` counts the attention calls masked.
    """

    def __init__(self, pads: torch.Tensor):
        super().__init__()
        self.pads = pads
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is not _SDPA:  # the fast path: every other op of the step
            return func(*args, **kwargs) if kwargs else func(*args)
        kwargs = dict(kwargs or {})
        key = args[1]
        n = key.shape[-2]
        valid = torch.arange(n, device=key.device)[None, :] >= self.pads.to(key.device)[:, None]
        mask = valid[:, None, None, :]
        given = args[3] if len(args) > 3 else kwargs.get("attn_mask")
        if given is not None:
            mask = (mask & given) if given.dtype == torch.bool else given.masked_fill(~mask, float("-inf"))
        if len(args) > 3:
            args = (*args[:3], mask, *args[4:])
        else:
            kwargs["attn_mask"] = mask
        self.calls += 1
        return func(*args, **kwargs)


def _left_padding(mask: torch.Tensor | None) -> torch.Tensor | None:
    """Padding count per sample of a 2D 0/1 mask that is zeros then ones per row; None without padding."""
    if mask is None:
        return None
    m = mask.to(torch.long)
    if not bool(((m == 0) | (m == 1)).all()) or not bool((m[:, 1:] >= m[:, :-1]).all()):
        raise GraphredError(
            "graphred generate needs left padding (each attention_mask row zeros, then ones), as Hugging Face "
            "decoders do; pad the prompts on the left (tokenizer padding_side='left')")
    pads = (m == 0).sum(dim=1)
    return pads if bool(pads.any()) else None


def _check_padding_kept(pads: torch.Tensor, kept: torch.Tensor | None) -> None:
    if kept is None:
        return
    if kept.shape[1] > 1 and not bool((kept[:, 1:] > kept[:, :-1]).all()):
        raise GraphredError("the reduced prefill changed the order of the tokens it kept; graphred generate needs "
                            "the order kept to mask padding in the per-layer caches")
    P = int(pads.max())
    if P:
        idx = torch.arange(P, device=kept.device)
        ok = (kept[:, :P] == idx) | (idx[None, :] >= pads[:, None].to(kept.device))
        if not bool(ok.all()):
            raise GraphredError("the reduction dropped padding positions of a left-padded prompt; graphred generate "
                                "needs them kept (they are masked) to mask the per-layer caches")


def _output_class(model):
    from transformers.generation.utils import GenerateDecoderOnlyOutput

    return GenerateDecoderOnlyOutput


def reduced_decoding(fast, model, input_ids, logits_processor, stopping_criteria, generation_config,
                     synced_gpus: bool = False, streamer=None, **model_kwargs):
    """The decoding loop ``generate`` hands to Hugging Face as ``custom_generate`` (see the module doc)."""
    if getattr(model.config, "is_encoder_decoder", False):
        raise GraphredError("graphred generate supports decoder-only models; this model is an encoder-decoder")
    if generation_config.num_beams not in (None, 1):
        raise GraphredError(f"graphred generate supports greedy search and sampling; got num_beams="
                            f"{generation_config.num_beams}")
    pad_token_id = generation_config._pad_token_tensor
    has_eos = any(hasattr(c, "eos_token_id") for c in stopping_criteria)
    do_sample = generation_config.do_sample
    return_dict = generation_config.return_dict_in_generate
    scores = () if (return_dict and generation_config.output_scores) else None
    raw_logits = () if (return_dict and generation_config.output_logits) else None
    batch = input_ids.shape[0]
    unfinished = torch.ones(batch, dtype=torch.long, device=input_ids.device)
    if pad_token_id is not None:
        pad_token_id = pad_token_id.to(input_ids.device)

    # ---- prefill: reduced, the cache built by the reduced graph
    model_kwargs["use_cache"] = True
    inputs = model.prepare_inputs_for_generation(input_ids, is_first_iteration=True, **model_kwargs)
    cache = inputs.pop("cache", None)
    if cache is not None and cache.get_seq_length() > 0:
        raise GraphredError("graphred generate starts from the prompt; a filled cache passed in is not supported")
    pads = _left_padding(model_kwargs.get("attention_mask"))
    outputs, kept = fast.forward_with_positions(**inputs)
    if kept is not None and bool((kept < 0).any()):
        raise GraphredError("the reduced prefill padded an uneven batch (samples with different numbers of image "
                            "tokens) with filler slots (-1 in the kept positions); decoding would need them masked in "
                            "every step's cache, which graphred generate does not do yet. Generate per sample, or "
                            "batch prompts with equal image counts")
    if pads is not None:
        _check_padding_kept(pads, kept)
    if outputs.get("cache") is None:
        raise GraphredError("the reduced prefill returned no key/value cache; the model must support use_cache=True")

    first = True
    while True:
        if not first:
            step = model.prepare_inputs_for_generation(input_ids, next_sequence_length=1, **model_kwargs)
            step.pop("attention_mask", None)  # padding is masked per layer by PaddingMask
            if pads is None:
                outputs = model(**step, return_dict=True)
            else:
                with PaddingMask(pads) as masking:
                    outputs = model(**step, return_dict=True)
                if masking.calls == 0:
                    raise GraphredError(
                        "a left-padded batch needs the decoder's attention to run through "
                        "torch.nn.functional.scaled_dot_product_attention (attn_implementation='sdpa') so graphred "
                        "can mask each layer's cache; generate the samples one by one or load the model with sdpa")
        first = False
        model_kwargs = model._update_model_kwargs_for_generation(outputs, model_kwargs)
        next_logits = outputs.logits[:, -1].to(copy=True, dtype=torch.float32, device=input_ids.device)
        next_scores = logits_processor(input_ids, next_logits)
        if scores is not None:
            scores += (next_scores,)
        if raw_logits is not None:
            raw_logits += (next_logits,)
        if do_sample:
            next_tokens = torch.multinomial(F.softmax(next_scores, dim=-1), num_samples=1).squeeze(1)
        else:
            next_tokens = torch.argmax(next_scores, dim=-1)
        if has_eos and pad_token_id is not None:
            next_tokens = next_tokens * unfinished + pad_token_id * (1 - unfinished)
        input_ids = torch.cat([input_ids, next_tokens[:, None]], dim=-1)
        if streamer is not None:
            streamer.put(next_tokens.cpu())
        unfinished = unfinished & ~stopping_criteria(input_ids, next_scores)
        del outputs
        if int(unfinished.max()) == 0:
            break
    if streamer is not None:
        streamer.end()
    if return_dict:
        return _output_class(model)(sequences=input_ids, scores=scores, logits=raw_logits,
                                    cache=model_kwargs.get("cache"))
    return input_ids


def generate(fast, *args, **kwargs):
    """``model.generate`` semantics with a reduced prefill and per-layer reduced KV caches.

    ``fast`` is a module from :func:`graphred.transform`; the other arguments are those of Hugging Face
    ``generate`` (inputs, ``max_new_tokens``, ``do_sample``, ``generation_config``, ``logits_processor``,
    ``stopping_criteria``, ``return_dict_in_generate``, ...). Returns what ``generate`` returns (the
    sequences, or a ``GenerateDecoderOnlyOutput`` whose ``cache`` holds the per-layer caches).

    >>> import graphred
    >>> model, inputs = graphred.zoo.load("llava")
    >>> fast = graphred.transform(graphred.capture(model, **inputs), graphred.plans.pumer(prune=0.3, merge=0.2))
    >>> out = graphred.generate(fast, **inputs, max_new_tokens=3, do_sample=False, return_dict_in_generate=True)
    >>> [layer.keys.shape[2] for layer in out.cache.layers]    # prompt 76 tokens + 2 decoded; layer 1 reduced
    [78, 78]
    """
    # what graphred.transform returns (checked by what it has: reduced_module imports this module, not back)
    if not (hasattr(fast, "specializations") and hasattr(fast, "program") and hasattr(fast, "plan")):
        raise GraphredError(f"graphred.generate expects the module graphred.transform returns, got {type(fast).__name__}")
    model = fast.program.model
    if model is None or not callable(getattr(model, "generate", None)):
        raise GraphredError(f"{fast.model_class} has no generate method (a Hugging Face GenerationMixin model); "
                            "graphred generate decodes with the model's own generation machinery")
    for step in fast.plan.steps:
        if getattr(step, "renumber", False):
            raise GraphredError(f"{step.spec()}: generation with renumbered positions is not supported (layers before "
                                "and after the cut would give a new token different positions); use renumber=False")
    if "custom_generate" in kwargs:
        raise GraphredError("graphred generate supplies the decoding loop; custom_generate cannot be combined with it")
    kwargs.pop("use_cache", None)  # the reduced caches are the point: always on
    # Hugging Face hands a custom_generate callable only the keywords _sample does not take, so the
    # streamer (which generate itself also gets, for the prompt) is bound here
    loop = functools.partial(reduced_decoding, fast, streamer=kwargs.get("streamer"))
    return model.generate(*args, custom_generate=loop, **kwargs)
