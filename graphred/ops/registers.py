"""``graphred::register_layout``: where learnable register tokens go in a token stream (Victor).

Given the run-time modality codes of a decoder's token stream, the op says where ``registers``
tokens are inserted after each image (a maximal run of image tokens), and which tokens remain
once the image tokens are dropped. Integer outputs only (no gradient flows through a layout).
"""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["register_layout", "register_layout_ragged", "shrink_image_runs", "IMAGE_CODE", "REGISTER_CODE"]

# the modality codes of graphred.analysis.provenance.CODE (kept in step by a test)
IMAGE_CODE = 1
REGISTER_CODE = 2


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


def _layout_shapes(codes: Tensor, registers: int, images: int, image_tokens: int) -> tuple[int, int, int]:
    _check(codes.dim() == 2, f"graphred::register_layout: codes must be [B, L], got {tuple(codes.shape)}")
    _check(registers >= 1, f"graphred::register_layout: registers must be >= 1, got {registers}")
    _check(images >= 1, f"graphred::register_layout: there must be at least one image, got {images}")
    L = codes.shape[1]
    _check(0 < image_tokens <= L, f"graphred::register_layout: image_tokens={image_tokens} does not fit length {L}")
    L_new = L + registers * images
    return codes.shape[0], L_new, L_new - image_tokens


@torch.library.custom_op(
    "graphred::register_layout", mutates_args=(),
    schema="(Tensor codes, int registers, int images, int image_tokens) -> (Tensor, Tensor, Tensor, Tensor)",
)
def _register_layout(codes: Tensor, registers: int, images: int, image_tokens: int):
    B, L_new, K = _layout_shapes(codes, registers, images, image_tokens)
    L = codes.shape[1]
    dev = codes.device
    is_img = codes == IMAGE_CODE
    nxt = torch.cat([is_img[:, 1:], torch.zeros_like(is_img[:, :1])], 1)
    end = is_img & ~nxt  # the last token of every image
    n_end = end.sum(1)
    _check(bool((n_end == images).all()), f"graphred::register_layout: every sample must hold {images} image(s) "
           f"(runs of image tokens); found {n_end.tolist()}")
    _check(bool((is_img.sum(1) == image_tokens).all()), f"graphred::register_layout: every sample must hold "
           f"{image_tokens} image tokens; found {is_img.sum(1).tolist()}")
    ends_through = end.long().cumsum(1)  # images finished at or before each position
    pos = torch.arange(L, device=dev).expand(B, L)
    new_pos = pos + registers * (ends_through - end.long())  # a token moves past the registers of earlier images
    src = torch.empty(B, L_new, dtype=torch.long, device=dev)
    orig = torch.empty(B, L_new, dtype=torch.long, device=dev)
    is_reg = torch.ones(B, L_new, dtype=torch.bool, device=dev)
    src.scatter_(1, new_pos, pos)
    orig.scatter_(1, new_pos, pos)
    is_reg.scatter_(1, new_pos, torch.zeros_like(is_img))
    # register j of image m sits at new_pos(end_m) + 1 + j; it reads row L + j of [x, registers]
    end_pos = pos[end].view(B, images)
    end_new = new_pos[end].view(B, images)
    j = torch.arange(registers, device=dev)
    slots = (end_new.unsqueeze(-1) + 1 + j).reshape(B, -1)
    src.scatter_(1, slots, (L + j).expand(B, images, registers).reshape(B, -1))
    orig.scatter_(1, slots, end_pos.unsqueeze(-1).expand(B, images, registers).reshape(B, -1))
    new_img = torch.zeros(B, L_new, dtype=torch.bool, device=dev).scatter_(1, new_pos, is_img)
    keep = torch.sort(new_img.to(torch.uint8), dim=1, stable=True).indices[:, :K].contiguous()
    return src, orig, is_reg, keep


@_register_layout.register_fake
def _(codes, registers, images, image_tokens):
    B, L_new, K = _layout_shapes(codes, registers, images, image_tokens)
    return (codes.new_empty(B, L_new, dtype=torch.long), codes.new_empty(B, L_new, dtype=torch.long),
            codes.new_empty(B, L_new, dtype=torch.bool), codes.new_empty(B, K, dtype=torch.long))


def register_layout(codes: Tensor, registers: int, images: int, image_tokens: int):
    """Where ``registers`` tokens go after each of ``images`` images in a stream with modality ``codes``.

    Returns ``(source, original, is_register, keep)``, each ``[B, ...]``:

    * ``source`` ``[B, L + registers*images]``: for every slot of the longer stream, the row of
      ``cat([x, registers], 1)`` it reads (register ``j`` reads row ``L + j`` after every image);
    * ``original``: the original position each slot stands for (a register stands for its image's
      last token: it takes that token's position id, rotary angle, mask row and label);
    * ``is_register``: bool, the register slots;
    * ``keep`` ``[B, L + registers*images - image_tokens]``: slots that remain once the image
      tokens are dropped (text and registers, in order).

    Example:
        >>> import torch, graphred.ops as gops
        >>> codes = torch.tensor([[0, 1, 1, 0]], dtype=torch.int8)   # text, image, image, text
        >>> src, orig, is_reg, keep = gops.register_layout(codes, 2, 1, 2)
        >>> src.tolist(), orig.tolist(), keep.tolist()
        ([[0, 1, 2, 4, 5, 3]], [[0, 1, 2, 2, 2, 3]], [[0, 3, 4, 5]])
    """
    return torch.ops.graphred.register_layout(codes, registers, images, image_tokens)


# ----------------------------------------------------------------------------- shrinking placeholder runs
def _check_shrink(codes: Tensor, num: int, den: int, length: int) -> None:
    _check(codes.dim() == 2, f"graphred::shrink_image_runs: codes must be [B, L], got {tuple(codes.shape)}")
    _check(0 <= num <= den and den >= 1, f"graphred::shrink_image_runs: need 0 <= num <= den, got {num}/{den}")
    _check(0 < length <= codes.shape[1], f"graphred::shrink_image_runs: length={length} does not fit {codes.shape[1]}")


@torch.library.custom_op("graphred::shrink_image_runs", mutates_args=(),
                         schema="(Tensor codes, int num, int den, int length) -> Tensor")
def _shrink_image_runs(codes: Tensor, num: int, den: int, length: int) -> Tensor:
    _check_shrink(codes, num, den, length)
    B, L = codes.shape
    is_img = (codes == IMAGE_CODE).cpu()
    rows = []
    for b in range(B):
        keep, i, row = [], 0, is_img[b].tolist()
        while i < L:
            if not row[i]:
                keep.append(i)
                i += 1
                continue
            j = i
            while j < L and row[j]:
                j += 1
            _check((j - i) * num % den == 0, f"graphred::shrink_image_runs: a run of {j - i} image placeholders at "
                   f"position {i} of sample {b} cannot shrink by {num}/{den} (the image tokens written there shrank "
                   "by that ratio); every image must have the placeholder count it had when the model was captured")
            keep.extend(range(i, i + (j - i) * num // den))
            i = j
        _check(len(keep) == length, f"graphred::shrink_image_runs: sample {b} keeps {len(keep)} positions, the "
               f"graph expects {length}; batch samples with equal image placeholder counts")
        rows.append(keep)
    return torch.tensor(rows, dtype=torch.long, device=codes.device)


@_shrink_image_runs.register_fake
def _(codes, num, den, length):
    _check_shrink(codes, num, den, length)
    return codes.new_empty(codes.shape[0], length, dtype=torch.long)


def shrink_image_runs(codes: Tensor, num: int, den: int, length: int) -> Tensor:
    """Keep index ``[B, length]`` of a token stream whose image runs (maximal runs of image codes) each keep
    their first ``run * num / den`` positions; every other position is kept. Used where fewer image tokens
    than placeholders reach a scatter (a vision tower reduced by ToMe): the placeholder spans shrink alike.

    Example:
        >>> import torch, graphred.ops as gops
        >>> codes = torch.tensor([[0, 1, 1, 1, 1, 0, 1, 1, 1, 1]], dtype=torch.int8)
        >>> gops.shrink_image_runs(codes, 1, 2, 6).tolist()
        [[0, 1, 2, 5, 6, 7]]
    """
    return torch.ops.graphred.shrink_image_runs(codes, num, den, length)


# ----------------------------------------------------------------------------- uneven batches
def _check_ragged(codes: Tensor, registers: int, length_ins: int, length_keep: int) -> None:
    _check(codes.dim() == 2, f"graphred::register_layout_ragged: codes must be [B, L], got {tuple(codes.shape)}")
    _check(registers >= 1, f"graphred::register_layout_ragged: registers must be >= 1, got {registers}")
    _check(length_ins > codes.shape[1] and 0 < length_keep <= length_ins,
           f"graphred::register_layout_ragged: lengths {length_ins}/{length_keep} do not fit {codes.shape[1]}")


@torch.library.custom_op(
    "graphred::register_layout_ragged", mutates_args=(),
    schema="(Tensor codes, int registers, int length_ins, int length_keep) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)",
)
def _register_layout_ragged(codes: Tensor, registers: int, length_ins: int, length_keep: int):
    _check_ragged(codes, registers, length_ins, length_keep)
    B, L = codes.shape
    N = registers
    is_img = (codes == IMAGE_CODE).cpu()
    src, orig, reg, fill, keep, fill_keep = [], [], [], [], [], []
    for b in range(B):
        row = is_img[b].tolist()
        ends = [i for i in range(L) if row[i] and (i + 1 == L or not row[i + 1])]
        _check(len(ends) >= 1, f"graphred::register_layout_ragged: sample {b} holds no image")
        extra = length_ins - L - N * len(ends)
        _check(extra >= 0 and extra % N == 0, f"graphred::register_layout_ragged: sample {b} has {len(ends)} images, "
               f"which do not fit length {length_ins} with {N} registers each")
        s, o, r, f, img = [], [], [], [], []
        for i in range(L):
            s.append(i), o.append(i), r.append(False), f.append(False), img.append(row[i])
            if i in ends:  # N registers after every image; after the last one, the filler slots of fewer images
                n = N + (extra if i == ends[-1] else 0)
                for j in range(n):
                    s.append(L + j % N), o.append(i), r.append(True), f.append(j >= N), img.append(False)
        dropped = sum(img)
        spare = length_keep - (length_ins - dropped)  # image tokens this sample keeps as filler slots
        _check(spare >= 0, f"graphred::register_layout_ragged: sample {b} keeps {length_ins - dropped} slots, "
               f"more than {length_keep}")
        k, fk = [], []
        for i in range(length_ins):
            if img[i] and spare > 0:
                spare -= 1
                k.append(i), fk.append(True)
            elif not img[i]:
                k.append(i), fk.append(f[i])
        src.append(s), orig.append(o), reg.append(r), fill.append(f), keep.append(k), fill_keep.append(fk)
    dev = codes.device
    t = lambda x, dt: torch.tensor(x, dtype=dt, device=dev)  # noqa: E731
    return (t(src, torch.long), t(orig, torch.long), t(reg, torch.bool), t(fill, torch.bool), t(keep, torch.long),
            t(fill_keep, torch.bool))


@_register_layout_ragged.register_fake
def _(codes, registers, length_ins, length_keep):
    _check_ragged(codes, registers, length_ins, length_keep)
    B = codes.shape[0]
    e = codes.new_empty
    return (e(B, length_ins, dtype=torch.long), e(B, length_ins, dtype=torch.long), e(B, length_ins, dtype=torch.bool),
            e(B, length_ins, dtype=torch.bool), e(B, length_keep, dtype=torch.long), e(B, length_keep, dtype=torch.bool))


def register_layout_ragged(codes: Tensor, registers: int, length_ins: int, length_keep: int):
    """:func:`register_layout` for samples with different image counts or sizes, at static lengths.

    Every sample gets ``registers`` slots after each image; a sample with fewer images than the most
    gets the missing registers' slots after its last image as *filler* slots (no attention sees them). At the
    drop, a sample with more image tokens than the fewest keeps the difference (its first image tokens) as filler
    slots, so every sample has ``length_keep`` slots. Returns ``(source, original, is_register, filler, keep,
    filler_kept)``: the first four ``[B, length_ins]``, the last two ``[B, length_keep]``.

    Example:
        >>> import torch, graphred.ops as gops
        >>> codes = torch.tensor([[0, 1, 1, 0], [0, 1, 0, 0]], dtype=torch.int8)
        >>> src, orig, is_reg, fill, keep, fk = gops.register_layout_ragged(codes, 1, 5, 4)
        >>> src.tolist(), fill.tolist(), keep.tolist(), fk.tolist()
        ([[0, 1, 2, 4, 3], [0, 1, 4, 2, 3]], [[False, False, False, False, False], [False, False, False, False, False]], [[0, 1, 3, 4], [0, 2, 3, 4]], [[False, True, False, False], [False, False, False, False]])
    """
    return torch.ops.graphred.register_layout_ragged(codes, registers, length_ins, length_keep)
