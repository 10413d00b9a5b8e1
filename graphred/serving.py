"""Serving any input shape: a guarded, bounded cache of specialisations.

torch.export specialises a graph to the shapes it was captured at (the rewrite itself needs concrete
token counts: FastV keeps ``round(keep * n_img)`` tokens, a merge ``r`` of them). A captured
:class:`graphred.Program` and the module :func:`graphred.transform` returns therefore keep the
user's model (shared, never copied or changed) and build one specialisation per *input signature*,
the way Dynamo guards its compiled frames:

* the signature of a call is, for each argument passed (by name, after binding to the model's
  ``forward`` signature), its shape, dtype and device for a tensor, or its value otherwise; arguments
  the call omits are not passed at capture either, so they keep the model's defaults;
* a call whose signature was seen runs the stored graph (a dictionary look-up, no capture);
* a new signature is captured and rewritten once, under a lock (one capture at a time; callers at
  seen shapes do not wait for it), and stored in an LRU of ``max_specializations`` entries;
* ``captures`` counts the captures made for calls (the one at :func:`graphred.capture` excluded).

A call the model cannot serve raises :class:`graphred.InputError`, naming the argument, the shape it
got and what the model was seen to accept: never torch's raw guard assertion.

>>> import graphred
>>> model, inputs = graphred.zoo.load("llava")
>>> prog = graphred.capture(model, **inputs)
>>> bigger = graphred.zoo.inputs("llava", batch=3, text_len=20)
>>> prog(**bigger).logits.shape[0], prog.specializations.captures
(3, 1)
"""
from __future__ import annotations

import inspect
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
import torch.nn as nn

from .errors import GraphredError, InputError
from .fx_utils import align_inputs

__all__ = ["Buckets", "Specialization", "Specializations", "describe_inputs", "signature_key"]

# Non-float tensors up to this many elements are keyed by value as well as shape when the program was
# captured with data-dependent branches specialised (draft_export): grids, image sizes, counts.
SMALL_VALUE_TENSOR = 64


def _leaf_key(x: Any, by_value: bool) -> Any:
    if isinstance(x, torch.Tensor):
        key = ("T", tuple(x.shape), x.dtype, x.device.type)
        if by_value and not x.is_floating_point() and x.numel() <= SMALL_VALUE_TENSOR:
            key += (tuple(x.reshape(-1).tolist()),)
        return key
    if isinstance(x, (list, tuple)):
        return (type(x).__name__,) + tuple(_leaf_key(y, by_value) for y in x)
    if isinstance(x, dict):
        return ("dict",) + tuple((k, _leaf_key(v, by_value)) for k, v in sorted(x.items(), key=lambda kv: str(kv[0])))
    try:
        hash(x)
    except TypeError:
        return ("obj", type(x).__name__, id(x))
    return ("V", type(x).__name__, x)


def signature_key(arguments: dict[str, Any], by_value: bool = False) -> tuple:
    """The specialisation key of a call's bound arguments: names, tensor shapes/dtypes/devices, other values."""
    return tuple((name, _leaf_key(arguments[name], by_value)) for name in sorted(arguments))


def describe_inputs(arguments: dict[str, Any]) -> str:
    """``input_ids [3, 20] int64, pixel_values [3, 3, 32, 32] float32, use_cache=True``."""
    parts = []
    for name, v in arguments.items():
        if isinstance(v, torch.Tensor):
            parts.append(f"{name} {list(v.shape)} {str(v.dtype).replace('torch.', '')}")
        else:
            parts.append(f"{name}={v!r}" if not isinstance(v, (list, tuple, dict)) else f"{name}=<{type(v).__name__}>")
    return ", ".join(parts)


@dataclass
class Specialization:
    """One captured (and possibly rewritten) graph for one input signature."""

    graph_module: Any
    positional: tuple[str, ...] = ()  # argument names passed positionally at capture, in order
    positions_output: bool = False  # the graph returns (outputs, kept_positions)
    steps: list = field(default_factory=list)
    program: Any = None
    applied: Any = None

    def run(self, arguments: dict[str, Any]):
        args = [arguments[n] for n in self.positional]
        kwargs = {k: v for k, v in arguments.items() if k not in self.positional}
        args, kwargs = align_inputs(self.graph_module, args, kwargs)  # a ModelOutput's keys in the spec's order
        return self.graph_module(*args, **kwargs)


class Specializations:
    """A thread-safe LRU of :class:`Specialization` keyed by input signature.

    ``build(arguments) -> Specialization`` is called once per new signature, under the lock.
    """

    def __init__(self, build: Callable[[dict], Specialization], max_size: int = 8, by_value: bool = False):
        if not isinstance(max_size, int) or max_size < 1:
            raise GraphredError(f"max_specializations must be an integer >= 1, got {max_size!r}")
        self._build = build
        self.max_size = max_size
        self.by_value = by_value
        self._entries: OrderedDict[tuple, Specialization] = OrderedDict()
        self._by_shape: dict[tuple, Specialization] = {}
        self._lock = threading.Lock()  # short: the LRU's bookkeeping (hits never wait for a capture)
        self._build_lock = threading.Lock()  # held while a miss captures: one capture at a time
        self.captures = 0  # specialisations built for calls
        self.hits = 0
        self.evictions = 0
        self.seen: list[str] = []  # descriptions of the signatures served (newest last, bounded)

    def __len__(self) -> int:
        return len(self._entries)

    def values(self) -> list[Specialization]:
        """The specialisations held now (least recently used first)."""
        with self._lock:
            return list(self._entries.values())

    def add(self, arguments: dict, spec: Specialization) -> None:
        """Store a specialisation built elsewhere (the program's own capture); not counted as a capture."""
        with self._lock:
            self._insert(signature_key(arguments, self.by_value), spec, arguments)

    def _insert(self, key: tuple, spec: Specialization, arguments: dict) -> None:
        self._entries[key] = spec
        self._by_shape[signature_key(arguments, False)] = spec  # for traced calls, whose values are symbolic
        self._entries.move_to_end(key)
        self.seen.append(describe_inputs(arguments))
        del self.seen[:-16]
        while len(self._entries) > self.max_size:
            _, gone = self._entries.popitem(last=False)
            for k in [k for k, v in self._by_shape.items() if v is gone]:
                del self._by_shape[k]
            self.evictions += 1

    def _hit(self, key: tuple) -> Specialization | None:
        with self._lock:
            spec = self._entries.get(key)
            if spec is not None:
                self._entries.move_to_end(key)
                self.hits += 1
            return spec

    def get(self, arguments: dict) -> Specialization:
        if torch.compiler.is_compiling():
            key = None
        else:
            key = signature_key(arguments, self.by_value)
            spec = self._hit(key)
            if spec is not None:
                return spec
        if torch.compiler.is_compiling():
            # traced (torch.export of the reduced module): values are symbolic, so match by shapes alone; a new
            # signature needs a capture of the model on real tensors, which cannot happen inside a trace
            spec = self._by_shape.get(signature_key(arguments, False))
            if spec is not None:
                return spec
            raise InputError(f"a reduced module traced by torch.export or torch.compile at {describe_inputs(arguments)}, "
                             "a signature it has not served: call it once at that shape outside the trace (or trace it "
                             f"at a served one: {'; '.join(self.seen[-3:])})")
        with self._build_lock:
            spec = self._hit(key)  # built by another thread while this one waited
            if spec is not None:
                return spec
            # capture runs the model (on real tensors under draft_export) and the rewrite may too: the
            # caller's RNG is left as it was, so a seeded call gives what the model gives under that seed
            with torch.random.fork_rng(devices=[]):
                spec = self._build(arguments)
            with self._lock:
                self.captures += 1
                self._insert(key, spec, arguments)
            return spec

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._by_shape.clear()


# ------------------------------------------------------------------------------------------ binding


def bind_arguments(signature: inspect.Signature | None, owner: str, args: tuple, kwargs: dict) -> dict[str, Any]:
    """The call's arguments by name, as passed (defaults not filled in: omitted stays omitted)."""
    if signature is None:
        if args:
            raise InputError(f"{owner} takes keyword arguments only (its forward signature is unknown); "
                             f"got {len(args)} positional argument(s)")
        return dict(kwargs)
    try:
        bound = signature.bind(*args, **kwargs)
    except TypeError as e:
        raise InputError(f"{owner}: {e}. It takes the model's forward arguments: {signature}") from None
    out: dict[str, Any] = {}
    for name, value in bound.arguments.items():
        kind = signature.parameters[name].kind
        if kind is inspect.Parameter.VAR_KEYWORD:
            out.update(value)
        elif kind is inspect.Parameter.VAR_POSITIONAL:
            if value:
                raise InputError(f"{owner}: extra positional arguments (*{name}) are not supported; pass keywords")
        else:
            out[name] = value
    return out


def check_leaves(owner: str, arguments: dict[str, Any]) -> None:
    """Reject inputs a captured graph cannot take (key/value caches from an earlier call, objects)."""
    for name, v in arguments.items():
        if isinstance(v, (torch.Tensor, int, float, bool, str, type(None))):
            continue
        if isinstance(v, (list, tuple, dict)):
            continue
        hint = (" To continue from a cache, use .generate(...), which runs the decode steps over the reduced "
                "per-layer caches." if "Cache" in type(v).__name__ else "")
        raise InputError(f"{owner}: input {name!r} is a {type(v).__name__}; a captured graph takes tensors, numbers, "
                         f"strings and lists/dicts of them.{hint}")


# ------------------------------------------------------------------------------------------ buckets


@dataclass(frozen=True)
class Buckets:
    """Pad the text of each call on the right to the smallest bucket length that fits, so that at most
    ``len(lengths)`` text lengths are ever captured per batch/image shape.

    Padding goes on the **right** with a zero attention mask: valid tokens keep their positions (no
    position ids shift) and, in a causal decoder, never see the padding; in a bidirectional encoder the
    mask hides it. Outputs along the token axis are cut back to the call's own length (for a reduced
    model: its kept tokens; the padding is text and is never dropped), so results equal the unpadded
    call at every valid position. Calls that return a key/value cache or keep only the last logits
    (``use_cache=True``, ``logits_to_keep``) are not padded: their outputs are position-bound.

    The sequence is the last dim of ``input_ids`` (``ids_name``); every non-float argument with the
    same batch and last dim (masks, token types, position ids, labels) is padded with it: ids with
    ``pad_id``, the attention mask with 0, ``labels`` with -100, anything else by repeating its last
    column.
    """

    lengths: tuple[int, ...]
    pad_id: int = 0
    ids_name: str = "input_ids"
    mask_name: str = "attention_mask"

    @staticmethod
    def make(lengths: Sequence[int] | "Buckets" | None, pad_id: int) -> "Buckets | None":
        if lengths is None or isinstance(lengths, Buckets):
            return lengths
        try:
            ls = tuple(sorted({int(x) for x in lengths}))
        except (TypeError, ValueError):
            raise GraphredError(f"buckets must be a list of text lengths (ints), got {lengths!r}") from None
        if not ls or ls[0] < 1:
            raise GraphredError(f"buckets must be positive text lengths, got {lengths!r}")
        return Buckets(ls, pad_id)

    def applies(self, arguments: dict) -> bool:
        keep = arguments.get("logits_to_keep")
        if arguments.get("use_cache") or isinstance(keep, torch.Tensor) or keep not in (None, 0):
            return False
        ids = arguments.get(self.ids_name)
        return isinstance(ids, torch.Tensor) and ids.dim() == 2

    def pad(self, owner: str, arguments: dict) -> tuple[dict, int]:
        """(padded arguments, number of padding positions added)."""
        ids = arguments[self.ids_name]
        B, L = ids.shape
        target = next((b for b in self.lengths if b >= L), None)
        if target is None:
            raise InputError(f"{owner}: {self.ids_name} has {L} tokens, more than the largest bucket "
                             f"({self.lengths[-1]}); add a bucket >= {L} or pass buckets=None")
        n = target - L
        if n == 0:
            return arguments, 0
        if self.mask_name not in arguments:
            raise InputError(f"{owner}: padding to bucket {target} needs an {self.mask_name} to mask the padding; "
                             "pass one (ones where the text is valid)")
        out = dict(arguments)
        for name, v in arguments.items():
            if not isinstance(v, torch.Tensor) or v.is_floating_point() or v.dim() < 2 or v.shape[-1] != L:
                continue
            if not ((v.dim() == 2 and v.shape[0] == B) or (v.dim() == 3 and v.shape[1] == B)):
                continue
            if name == self.ids_name:
                fill = torch.full((*v.shape[:-1], n), self.pad_id, dtype=v.dtype, device=v.device)
            elif name == self.mask_name:
                fill = torch.zeros((*v.shape[:-1], n), dtype=v.dtype, device=v.device)
            elif name == "labels":
                fill = torch.full((*v.shape[:-1], n), -100, dtype=v.dtype, device=v.device)
            else:
                fill = v[..., -1:].expand(*v.shape[:-1], n)
            out[name] = torch.cat([v, fill], dim=-1)
        return out, n


def trim_outputs(out: Any, length: int, n_pad: int) -> Any:
    """Cut ``n_pad`` trailing positions from every output tensor whose dim 1 has ``length`` positions."""
    if n_pad == 0:
        return out

    def cut(x):
        if isinstance(x, torch.Tensor) and x.dim() >= 2 and x.shape[1] == length:
            return x[:, : length - n_pad]
        return x

    if isinstance(out, dict):  # ModelOutput is an OrderedDict
        for k in list(out.keys()):
            v = out[k]
            if isinstance(v, (tuple, list)):
                out[k] = type(v)(cut(t) for t in v)
            else:
                out[k] = cut(v)
        return out
    if isinstance(out, (tuple, list)):
        return type(out)(cut(t) for t in out)
    return cut(out)


def pad_token_id(model: nn.Module | None) -> int:
    """The id to pad text with: the model's generation or model config ``pad_token_id`` (else 0)."""
    for owner in (getattr(model, "generation_config", None), getattr(model, "config", None)):
        for cfg in (owner, getattr(owner, "text_config", None)):
            v = getattr(cfg, "pad_token_id", None)
            if isinstance(v, int):
                return v
            if isinstance(v, (list, tuple)) and v and isinstance(v[0], int):
                return v[0]
    return 0


def _is_guard_failure(e: BaseException) -> bool:
    text = str(e)
    return isinstance(e, (AssertionError, RuntimeError)) and ("Guard failed" in text or "Expected input" in text)


def run_guarded(spec: Specialization, owner: str, arguments: dict, supported: str):
    """Run a specialisation; a guard the call breaks (a value the capture specialised on) becomes an InputError."""
    try:
        return spec.run(arguments)
    except Exception as e:  # noqa: BLE001 - re-raised unless it is a guard failure
        if not _is_guard_failure(e):
            raise
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise InputError(
            f"{owner} cannot serve {describe_inputs(arguments)}: the graph captured for this shape specialised on "
            f"input values this call changes ({first}). Supported: {supported}.") from None


__all__ += ["bind_arguments", "check_leaves", "pad_token_id", "run_guarded", "trim_outputs"]
