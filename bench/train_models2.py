"""Train the three ``vqa2-*`` models on the cluttered 224 px scenes (graphred.data.scenes2), on CPU.

    python bench/train_models2.py --models vqa2-llava            # one model, ~20 minutes, 1 thread
    python bench/train_models2.py --models vqa2-blip --steps 50 --out -   # a quick try

The shipped vqa2-vilt (single stream; the options its JSON records under ``training.auxiliary``):

    python bench/train_models2.py --models vqa2-vilt --vision-steps 600 --tower-layers 1 --ground-query word \
        --ground-weight 1 --word-ground-layers 2 --hop-layer 3 --word-weight 0.5 --word-layer 2 \
        --decoder-probes 0.5 --left-weight 0.5 --probe-balance 5 --curriculum 0.3 --eval-every 250

The shipped vqa2-llava-deep (vqa2-llava's options with an 8-layer decoder, 1200 steps instead of 2000 to fit a
session: 1199 s on one loaded thread):

    python bench/train_models2.py --models vqa2-llava-deep --steps 1200 --vision-steps 600 --ground-query word \
        --ground-weight 1 --word-ground-layers 2 --word-weight 0.5 --word-layer 1 --decoder-probes 0.5 \
        --left-weight 0.5 --probe-balance 5 --curriculum 0.3 --eval-every 400

Same architectures and recipe as bench/train_models.py (AdamW, warm-up, cosine decay, 2-D sine-cosine
image position init, a per-token probe of each patch's content discarded after training), at 196
image tokens. Training scenes are generated on the fly, a fresh block of scene indices every step
(scene ``i`` of the training split is deterministic), so no scene repeats; the training photographs
(1,500 sprites) are disjoint from the test ones. The four questions of a scene share its image: the
decoder packs them after one image prefix (block attention mask, positions restarted), BLIP encodes
the image once, ViLT (single stream) reads each question with its own copy of the image.

Writes ``graphred/weights/<name>.safetensors`` and ``<name>.json`` (config, vocabulary, training
facts, learning curve, test accuracy on 1,200 questions of test scenes 0..299 and on the shipped 50).
"""
from __future__ import annotations

import argparse
import math
import os
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from graphred.data import models, scenes2  # noqa: E402

#: name -> steps, peak lr, scenes per step (four questions each)
SCHEDULE: dict[str, dict] = {
    "vqa2-llava": {"steps": 400, "lr": 2e-3, "scenes": 16},
    "vqa2-vilt": {"steps": 1000, "lr": 2e-3, "scenes": 16},
    "vqa2-blip": {"steps": 400, "lr": 2e-3, "scenes": 16},
    "vqa2-llava-deep": {"steps": 400, "lr": 2e-3, "scenes": 16},
}
TEST_SCENES = 300
VISION_FIRST_SCENE = 800_000  # stage 1 (the image tower alone) reads scenes from here on
PROBE_CLASSES = len(scenes2.CLASSES) + 2  # the ten classes, a digit, bare texture


def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return peak * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * t)))


def sincos_2d(grid: int, dim: int, base: float = 100.0) -> torch.Tensor:
    quarter = dim // 4
    omega = 1.0 / base ** (torch.arange(quarter, dtype=torch.float64) / max(1, quarter))
    rows, cols = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    parts = []
    for coord in (rows.flatten(), cols.flatten()):
        ang = coord[:, None].double() * omega[None]
        parts += [ang.sin(), ang.cos()]
    out = torch.cat(parts, 1)
    return F.pad(out, (0, dim - out.shape[1])).float()


@torch.no_grad()
def init_image_positions(fam: str, model: torch.nn.Module) -> None:
    if fam == "llava":
        table = model.model.vision_tower.embeddings.position_embedding.weight
    elif fam == "blip":
        table = model.vision_model.embeddings.position_embedding[0]
    else:
        table = model.vilt.embeddings.position_embeddings[0]
    table.zero_()
    table[1:] = sincos_2d(scenes2.GRID, table.shape[1])


def probe_labels(data: scenes2.SceneSet2) -> torch.Tensor:
    """``(S, 196)``: each cell's class, 10 for a digit, 11 for bare texture."""
    lay = torch.from_numpy(data.layout).long()
    clut = torch.from_numpy(data.clutter).long()
    return torch.where(lay >= 0, lay, torch.where(clut >= 0, 10, 11))


def describe_rows(data: scenes2.SceneSet2, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """The description task: ``(B, 10)`` class indices in a random order per scene, and ``(B, 10)`` how many
    of each the scene holds (0..4)."""
    b = data.num_scenes
    order = torch.stack([torch.randperm(len(scenes2.CLASSES), generator=gen) for _ in range(b)])
    lay = torch.from_numpy(data.layout).long()
    counts = (lay[:, :, None] == torch.arange(len(scenes2.CLASSES))).sum(1)
    return order, counts.gather(1, order)


def packed(tok, data: scenes2.SceneSet2, gen: torch.Generator, describe: bool = False):
    """Decoder batch: ``<bos> <image>*196 q1 q2 q3 q4 [d]``, each question seeing the prefix and itself only.

    ``describe``: a fifth block ``c1 n1 c2 n2 ... c10 n10`` (every class word followed by its count word,
    classes in a random order), trained to predict each ``n`` after its ``c`` — the grounded description
    LLaVA-style training starts from; it teaches the class-word-to-patches reading all four kinds need."""
    n_img = scenes2.NUM_CELLS
    prefix = 1 + n_img
    b = data.num_scenes
    rows = []
    for s in range(b):
        qs = data.questions[4 * s: 4 * s + 4]
        rows.append([qs[i] for i in torch.randperm(4, generator=gen).tolist()])
    enc = [[tok.encode(q.text) for q in row] for row in rows]
    d_at = d_ans = None
    if describe:
        order, counts = describe_rows(data, gen)
        cls_ids = torch.tensor([tok.token_to_id[c] for c in scenes2.CLASSES])[order]
        num_ids = torch.tensor([tok.token_to_id[w] for w in scenes2.NUMBERS])[counts]
        for i, row in enumerate(enc):
            row.append(torch.stack([cls_ids[i], num_ids[i]], -1).flatten().tolist())
        d_ans = num_ids
    length = prefix + max(sum(len(w) for w in row) for row in enc)
    ids = torch.full((b, length), tok.pad_id, dtype=torch.long)
    pos = torch.zeros((b, length), dtype=torch.long)
    block = torch.full((b, length), -2, dtype=torch.long)
    ids[:, 0], ids[:, 1:prefix] = tok.bos_id, tok.image_id
    pos[:, :prefix] = torch.arange(prefix)
    block[:, :prefix] = -1
    where = torch.zeros((b, 4), dtype=torch.long)
    word_at = torch.zeros((b, 4), dtype=torch.long)  # the asked-about class word of each question
    class_words = _class_word_ids(tok)
    answers = torch.tensor([[tok.token_to_id[q.answer] for q in row] for row in rows])
    for i, row in enumerate(enc):
        at = prefix
        for k, words in enumerate(row):
            n = len(words)
            ids[i, at: at + n] = torch.tensor(words)
            pos[i, at: at + n] = prefix + torch.arange(n)
            block[i, at: at + n] = k
            if k < 4:
                where[i, k] = at + n - 1
                word_at[i, k] = at + next(j for j, w in enumerate(words) if w in class_words)
            else:
                d_at = d_at if d_at is not None else torch.zeros((b, n // 2), dtype=torch.long)
                d_at[i] = at + 2 * torch.arange(n // 2)
            at += n
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    bq, bk = block[:, :, None], block[:, None, :]
    allowed = causal & ((bk == -1) | (bq == bk)) & (bq != -2)
    allowed |= torch.eye(length, dtype=torch.bool)
    # an additive float mask: eager attention (used when the grounding loss reads attention weights)
    # mis-reads a boolean 4-D mask (it differs from sdpa by up to 9 in the logits); a float one agrees
    mask = torch.zeros(allowed.shape, dtype=torch.float32).masked_fill(~allowed, float("-inf"))
    kwargs = {"input_ids": ids, "attention_mask": mask[:, None], "position_ids": pos,
              "pixel_values": scenes2.pixel_values(data.images), "use_cache": False}
    return kwargs, where, answers, d_at, d_ans, rows, (order if describe else None), word_at


def _class_word_ids(tok) -> set[int]:
    from graphred.data.scenes import PLURALS

    return {tok.token_to_id[w] for w in (*scenes2.CLASSES, *PLURALS) if w in tok.token_to_id}


def relevant_mask(data: scenes2.SceneSet2, questions) -> torch.Tensor:
    """``(Q, 196)`` bool: the cells each question's answer is read from (none for an absent class)."""
    out = torch.zeros(len(questions), scenes2.NUM_CELLS, dtype=torch.bool)
    for i, q in enumerate(questions):
        out[i, data.relevant_cells(q)] = True
    return out


def object_mask(data: scenes2.SceneSet2, questions) -> torch.Tensor:
    """``(Q, 196)`` bool: the cells of the class each question names (none for an absent class)."""
    lay = torch.from_numpy(data.layout).long()
    return lay[[q.scene for q in questions]] == torch.tensor([q.target for q in questions])[:, None]


def left_labels(labels: torch.Tensor) -> torch.Tensor:
    """``(S, 196)``: the probe label of each cell's left neighbour (bare texture in column 0)."""
    out = torch.full_like(labels, PROBE_CLASSES - 1)
    out[:, 1:] = labels[:, :-1]
    out[:, ::scenes2.GRID] = PROBE_CLASSES - 1
    return out


def _mean(a, b):
    return b if a is None else a if b is None else 0.5 * (a + b)


def _class_cells(data: scenes2.SceneSet2, order: torch.Tensor) -> torch.Tensor:
    """``(B * 10, 196)`` bool: for each described class (``order`` ``(B, 10)``), the cells holding it."""
    lay = torch.from_numpy(data.layout).long()  # (B, 196)
    return (lay[:, None, :] == order[:, :, None]).flatten(0, 1)


def grounding_loss(attn: torch.Tensor, relevant: torch.Tensor) -> torch.Tensor | None:
    """``attn`` ``(Q, heads, 196)``: one query's attention over the image tokens (cell order). The share of
    it (heads averaged) on the relevant cells, as ``-log``, over the questions that have relevant cells."""
    has = relevant.any(1)
    if not has.any():
        return None
    a = attn.mean(1)
    share = (a * relevant).sum(1) / a.sum(1).clamp_min(1e-9)
    return -torch.log(share[has].clamp_min(1e-6)).mean()


class Trainer:
    def __init__(self, name: str, seed: int, ground: float = 0.0, ground_query: str = "answer",
                 answer_layer: int | None = None, left_weight: float = 0.0,
                 hop_layer: int | None = None, probe_balance: float = 1.0, word_weight: float = 0.0,
                 word_layer: int = 0, decoder_probes: float = 0.0, word_ground_layers: int = 1,
                 tower_layers: int = 0):
        self.tower_layers = tower_layers  # single stream: the leading layers stage 1 trains as an image tower
        self.name, self.fam, self.ground = name, models.family(name), ground
        self.ground_query, self.answer_layer, self.left_weight = ground_query, answer_layer, left_weight
        self.hop_layer, self.probe_balance, self.word_weight, self.word_layer = (hop_layer, probe_balance,
                                                                               word_weight, word_layer)
        self.decoder_probes, self.word_ground_layers = decoder_probes, word_ground_layers
        self.tok = models.default_tokenizer(name)
        torch.manual_seed(seed)
        self.config = models.default_config(name, self.tok)
        self.model = models.build_model(name, self.config, self.tok).train()
        init_image_positions(self.fam, self.model)
        if ground > 0 and hasattr(self.model, "set_attn_implementation"):  # attention weights are read
            self.model.set_attn_implementation("eager")
        width = self.config["hidden_size"] if self.fam == "vilt" else self.config["vision_config"]["hidden_size"]
        self.probe = torch.nn.Linear(width, PROBE_CLASSES)
        self.left_probe = torch.nn.Linear(width, PROBE_CLASSES)  # the left neighbour's content
        if self.fam in ("llava", "vilt"):  # the answer from the question's class word, discarded after training
            hidden = self.config["hidden_size"] if self.fam == "vilt" else self.config["text_config"]["hidden_size"]
            self.word_probe = torch.nn.Linear(hidden, len(scenes2.ANSWERS))
            self.pos_probe = torch.nn.Linear(hidden, 2 * scenes2.GRID)
            self.dec_left_probe = torch.nn.Linear(hidden, PROBE_CLASSES)
        if self.fam == "vilt":  # single stream: each image token's cell (row, column) after the tower layers
            self.pos_probe = torch.nn.Linear(width, 2 * scenes2.GRID)
        hidden = self.config["hidden_size"] if self.fam == "vilt" else self.config["text_config"]["hidden_size"]
        self.count_head = torch.nn.Linear(hidden, len(scenes2.NUMBERS))  # the encoders' description probe
        self.captured: dict = {}
        if self.fam == "llava":
            self.model.model.vision_tower.register_forward_hook(self._grab)
        elif self.fam == "blip":
            self.model.vision_model.register_forward_hook(self._grab)
        else:  # ViLT samples its patches in a random order: keep where each token came from
            emb = self.model.vilt.embeddings
            original = emb.visual_embed

            def visual_embed(*args, **kwargs):
                x, x_mask, (patch_index, hw) = original(*args, **kwargs)
                self.captured["patch_index"] = patch_index
                return x, x_mask, (patch_index, hw)

            emb.visual_embed = visual_embed

    def _grab(self, module, args, output):
        self.captured["tokens"] = output.last_hidden_state[:, 1:]

    def parameters(self):
        extra = ([p for m in (self.word_probe, self.pos_probe, self.dec_left_probe) for p in m.parameters()]
                 if self.fam == "llava" else [p for m in (self.word_probe, self.pos_probe) for p in m.parameters()]
                 if self.fam == "vilt" else [])
        return (list(self.model.parameters()) + list(self.probe.parameters()) + list(self.left_probe.parameters())
                + list(self.count_head.parameters()) + extra)

    def _describe_ids(self, data, gen):  # -> ids (B, 12), counts (B, 10), class order (B, 10)
        tok = self.tok
        order, counts = describe_rows(data, gen)
        b, n = order.shape
        ids = torch.full((b, n + 2), tok.pad_id, dtype=torch.long)
        ids[:, 0], ids[:, -1] = tok.cls_id, tok.sep_id
        ids[:, 1:-1] = torch.tensor([tok.token_to_id[c] for c in scenes2.CLASSES])[order]
        return ids, counts, order

    def vision_modules(self) -> list[torch.nn.Module]:
        """The image tower (and the per-patch probes) that stage 1 trains alone."""
        if self.fam == "llava":
            return [self.model.model.vision_tower, self.probe, self.left_probe]
        if self.fam == "blip":
            return [self.model.vision_model, self.probe, self.left_probe]
        if self.tower_layers < 1:
            raise ValueError("a single-stream model has no separate image tower: give --tower-layers")
        # single stream: the image embeddings and the first `tower_layers` layers of the shared encoder
        # stand in for a tower (they will read the text too in the VQA stage)
        vilt = self.model.vilt
        return [vilt.embeddings, *vilt.encoder.layer[: self.tower_layers], self.probe, self.left_probe]

    def _image_only(self, pix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Single stream, stage 1: the image tokens alone through the tower layers (the image embedding
        as ``ViltEmbeddings`` builds it: patches, positions, image [CLS], modality type 1) -> the patch
        states ``(B, n, width)`` and each one's cell ``(B, n)`` (ViLT samples patches in a random order)."""
        emb = self.model.vilt.embeddings
        mask = torch.ones(pix.shape[0], pix.shape[2], pix.shape[3], dtype=torch.long)
        x, x_mask, (patch_index, _) = emb.visual_embed(pix, mask, max_image_length=self.config["max_image_length"])
        x = x + emb.token_type_embeddings(torch.ones_like(x_mask, dtype=torch.long))
        for layer in self.model.vilt.encoder.layer[: self.tower_layers]:
            x = layer(x)[0]
        n = scenes2.NUM_CELLS
        return x[:, -n:], patch_index[..., 0] * scenes2.GRID + patch_index[..., 1]

    def vision_loss(self, data: scenes2.SceneSet2) -> torch.Tensor:
        """Stage 1: the per-patch probes on the image tower's output (each cell's content and its left
        neighbour's), the tower alone: the pretrained image encoder real VLMs start from."""
        pix = scenes2.pixel_values(data.images)
        labels = probe_labels(data)
        left = left_labels(labels)
        if self.fam == "vilt":
            tokens, cell = self._image_only(pix)
            return self.probe_loss(tokens, labels.gather(1, cell), left.gather(1, cell))
        tower = self.model.model.vision_tower if self.fam == "llava" else self.model.vision_model
        tokens = tower(pixel_values=pix).last_hidden_state[:, 1:]
        return self.probe_loss(tokens, labels, left)

    def probe_loss(self, tokens: torch.Tensor, labels: torch.Tensor, left: torch.Tensor) -> torch.Tensor:
        """The per-patch probes (own content; left neighbour's at ``left_weight``), objects weighted up by
        ``probe_balance`` (they are 6% of the cells: unweighted, the probe learns texture and digits)."""
        w = torch.ones(PROBE_CLASSES)
        w[len(scenes2.CLASSES):] = 1.0 / self.probe_balance
        out = F.cross_entropy(self.probe(tokens).flatten(0, 1), labels.flatten(), weight=w)
        if self.left_weight > 0:
            out = out + self.left_weight * F.cross_entropy(self.left_probe(tokens).flatten(0, 1), left.flatten(),
                                                           weight=w)
        return out

    def loss(self, data: scenes2.SceneSet2, gen: torch.Generator, describe: bool):
        """(answer loss, probe loss, description loss or None) on one block of scenes."""
        labels = probe_labels(data)
        left = left_labels(labels)
        tok, name = self.tok, self.name
        desc = ground = word_probe = extra_probe = None
        n = scenes2.NUM_CELLS
        if self.fam == "llava":
            kwargs, at, answers, d_at, d_ans, qrows, d_order, word_at = packed(tok, data, gen, describe)
            out = self.model(**kwargs, output_attentions=self.ground > 0,
                             output_hidden_states=self.word_weight > 0 or self.decoder_probes > 0)
            rows = torch.arange(data.num_scenes)[:, None]
            flat = [q for row in qrows for q in row]
            if self.decoder_probes > 0:
                # the image tokens as the decoder reads them: their cell (row, column) at its input (the
                # projector's output), and their left neighbour's content after layer 0 (a previous-token
                # head: row-major order puts the left neighbour just before)
                entering = out.hidden_states[0][:, 1: 1 + n]
                cell = torch.arange(n)
                rc = self.pos_probe(entering)  # (B, n, 2 * GRID)
                g = scenes2.GRID
                pos_loss = (F.cross_entropy(rc[..., :g].flatten(0, 1), (cell // g).repeat(data.num_scenes))
                            + F.cross_entropy(rc[..., g:].flatten(0, 1), (cell % g).repeat(data.num_scenes)))
                w = torch.ones(PROBE_CLASSES)
                w[len(scenes2.CLASSES):] = 1.0 / self.probe_balance
                dec_left = F.cross_entropy(self.dec_left_probe(out.hidden_states[1][:, 1: 1 + n]).flatten(0, 1),
                                           left.flatten(), weight=w)
                extra_probe = self.decoder_probes * (pos_loss + dec_left)
            if self.word_weight > 0:  # the answer, read from the class word's state after layer `word_layer`
                state = out.hidden_states[self.word_layer + 1][rows, word_at]  # (B, 4, hidden)
                word_probe = F.cross_entropy(self.word_probe(state).flatten(0, 1),
                                             torch.tensor([tok.answer_index(q.answer) for q in flat]))
            if self.ground > 0 and self.ground_query == "answer":
                # layer 0: each answer position's attention over the 196 image tokens (ill-posed: at
                # layer 0 the answer position has not read the question yet)
                att = out.attentions[0][rows, :, at][..., 1: 1 + n]  # (B, 4, heads, 196)
                ground = grounding_loss(att.flatten(0, 1), relevant_mask(data, flat))
            elif self.ground > 0:  # layer 0 (and on): the question's class word over the cells of that class
                for layer in range(self.word_ground_layers):
                    att = out.attentions[layer][rows, :, word_at][..., 1: 1 + n]
                    ground = _mean(ground, grounding_loss(att.flatten(0, 1), object_mask(data, flat)))
            if self.ground > 0 and self.hop_layer is not None:
                # the answer position's attention to the question's class word (the second hop)
                att = out.attentions[self.hop_layer][rows, :, at]  # (B, 4, heads, L)
                onehot = torch.zeros(att.shape[:2] + att.shape[-1:], dtype=torch.bool)
                onehot[rows, torch.arange(4)[None], word_at] = True
                ground = _mean(ground, grounding_loss(att.flatten(0, 1), onehot.flatten(0, 1)))
            if self.ground > 0 and self.answer_layer is not None:
                # a later layer: the answer position (which has read the question by now) over the answer's cells
                att = out.attentions[self.answer_layer][rows, :, at][..., 1: 1 + n]
                ground = _mean(ground, grounding_loss(att.flatten(0, 1), relevant_mask(data, flat)))
            logits = out.logits[rows, at]
            ans = F.cross_entropy(logits.flatten(0, 1), answers.flatten())
            if describe:
                desc = F.cross_entropy(out.logits[rows, d_at].flatten(0, 1), d_ans.flatten())
                if self.ground > 0:  # each class word of the description over the image tokens
                    att = out.attentions[0][rows, :, d_at][..., 1: 1 + n]
                    ground = _mean(ground, grounding_loss(att.flatten(0, 1), _class_cells(data, d_order)))
            tokens = self.captured["tokens"]
        elif self.fam == "blip":
            qs = data.questions
            pix = scenes2.pixel_values(data.images)
            image = self.model.vision_model(pixel_values=pix).last_hidden_state
            tokens = image[:, 1:]
            kw = models.build_inputs(name, tok, data, qs)
            img = image.repeat_interleave(4, 0)
            tout = self.model.text_encoder(input_ids=kw["input_ids"], attention_mask=kw["attention_mask"],
                                           encoder_hidden_states=img,
                                           encoder_attention_mask=torch.ones(img.shape[:-1], dtype=torch.long),
                                           output_attentions=self.ground > 0)
            text = tout.last_hidden_state
            if self.ground > 0:  # cross-attention layer 0: the [CLS] query over the 196 patches
                ground = grounding_loss(tout.cross_attentions[0][:, :, 0, 1:], relevant_mask(data, qs))
            ans = F.cross_entropy(self.model.answer_head(text[:, 0]), models.targets(name, tok, qs))
            if describe:
                ids, counts, order = self._describe_ids(data, gen)
                dout = self.model.text_encoder(input_ids=ids, attention_mask=torch.ones_like(ids),
                                               encoder_hidden_states=image,
                                               encoder_attention_mask=torch.ones(image.shape[:-1], dtype=torch.long),
                                               output_attentions=self.ground > 0)
                st = dout.last_hidden_state[:, 1:-1]
                if self.ground > 0:  # each class word over the patches
                    att = dout.cross_attentions[0][:, :, 1:-1, 1:].transpose(1, 2)
                    ground = _mean(ground, grounding_loss(att.flatten(0, 1), _class_cells(data, order)))
                desc = F.cross_entropy(self.count_head(st).flatten(0, 1), counts.flatten())
        else:
            qs = data.questions
            kw = models.build_inputs(name, tok, data, qs)
            out = self.model(**kw, output_hidden_states=True, output_attentions=self.ground > 0)
            ans = F.cross_entropy(out.logits, models.targets(name, tok, qs))
            # the patch probes on the image tokens after the tower layers (the last layer without them)
            tokens = out.hidden_states[self.tower_layers or -1][:, -n:]
            pi = self.captured["patch_index"]  # (B, n, 2): (row, col) of each image token
            cell = pi[..., 0] * scenes2.GRID + pi[..., 1]  # (B, 196): the cell of each image token
            labels = labels.repeat_interleave(4, 0).gather(1, cell)
            left = left.repeat_interleave(4, 0).gather(1, cell)
            words = _class_word_ids(tok)
            q_rows = torch.arange(len(qs))
            word_at = torch.tensor([next(j for j, w in enumerate(r) if w in words) for r in kw["input_ids"].tolist()])
            if self.ground > 0 and self.ground_query == "answer":
                # layer 0: the text [CLS] query over the patches (in ViLT's sampled order); ill-posed, as
                # for the decoder: at layer 0 [CLS] has not read the question
                att = out.attentions[0][:, :, 0, -n:]
                rel = relevant_mask(data, qs).gather(1, cell)
                ground = grounding_loss(att, rel)
            elif self.ground > 0:  # from the first layer after the tower: the class word over its class's cells
                for layer in range(self.tower_layers, self.tower_layers + self.word_ground_layers):
                    att = out.attentions[layer][q_rows, :, word_at][..., -n:]  # (Q, heads, n)
                    ground = _mean(ground, grounding_loss(att, object_mask(data, qs).gather(1, cell)))
            if self.ground > 0 and self.answer_layer is not None:  # later: [CLS] over the answer's cells
                att = out.attentions[self.answer_layer][:, :, 0, -n:]
                ground = _mean(ground, grounding_loss(att, relevant_mask(data, qs).gather(1, cell)))
            if self.ground > 0 and self.hop_layer is not None:  # [CLS] (the answer query) to the class word
                att = out.attentions[self.hop_layer][:, :, 0, : kw["input_ids"].shape[1]]  # (Q, heads, text)
                onehot = torch.zeros(len(qs), att.shape[-1], dtype=torch.bool)
                onehot[q_rows, word_at] = True
                ground = _mean(ground, grounding_loss(att, onehot))
            if self.decoder_probes > 0:  # the image tokens' cell (row, column) where the probes read them
                g = scenes2.GRID
                rc = self.pos_probe(tokens)
                extra_probe = self.decoder_probes * (F.cross_entropy(rc[..., :g].flatten(0, 1), (cell // g).flatten())
                                                     + F.cross_entropy(rc[..., g:].flatten(0, 1), (cell % g).flatten()))
            if self.word_weight > 0:  # the answer, read from the class word's state after layer `word_layer`
                state = out.hidden_states[self.word_layer + 1][q_rows, word_at]
                word_probe = F.cross_entropy(self.word_probe(state),
                                             torch.tensor([tok.answer_index(q.answer) for q in qs]))
            if describe:
                ids, counts, order = self._describe_ids(data, gen)
                kw = models.build_inputs(name, tok, data, qs[::4])
                kw["input_ids"], kw["attention_mask"] = ids, torch.ones_like(ids)
                kw["token_type_ids"] = torch.zeros_like(ids)
                dout = self.model(**kw, output_hidden_states=True, output_attentions=self.ground > 0)
                st = dout.hidden_states[-1][:, 1: ids.shape[1] - 1]
                if self.ground > 0 and self.ground_query == "word":  # each class word over its cells
                    dpi = self.captured["patch_index"]
                    dcell = dpi[..., 0] * scenes2.GRID + dpi[..., 1]  # (B, n)
                    cells = _class_cells(data, order).view(len(ids), -1, n)  # (B, 10, 196) in cell order
                    cells = cells.gather(2, dcell[:, None, :].expand_as(cells))
                    for layer in range(self.tower_layers, self.tower_layers + self.word_ground_layers):
                        att = dout.attentions[layer][:, :, 1: ids.shape[1] - 1, -n:].transpose(1, 2)
                        ground = _mean(ground, grounding_loss(att.flatten(0, 1), cells.flatten(0, 1)))
                desc = F.cross_entropy(self.count_head(st).flatten(0, 1), counts.flatten())
        probe = self.probe_loss(tokens, labels, left)
        if word_probe is not None:
            probe = probe + self.word_weight * word_probe
        if extra_probe is not None:
            probe = probe + extra_probe
        return ans, probe, desc, ground


def train(name: str, steps: int, lr: float, n_scenes: int, seed: int, eval_every: int, out: str | None,
          probe_weight: float, describe_weight: float = 1.0, describe_until: float = 1.0,
          ground_weight: float = 0.0, curriculum: float = 0.0, init: str | None = None,
          first_scene: int = 0, ground_query: str = "answer", answer_layer: int | None = None,
          left_weight: float = 0.0, vision_steps: int = 0, hop_layer: int | None = None,
          probe_balance: float = 1.0, word_weight: float = 0.0, word_layer: int = 0,
          decoder_probes: float = 0.0, word_ground_layers: int = 1, tower_layers: int = 0) -> dict:
    tr = Trainer(name, seed, ground_weight, ground_query, answer_layer, left_weight, hop_layer, probe_balance,
                 word_weight, word_layer, decoder_probes, word_ground_layers, tower_layers)
    previous = None
    if init is not None:  # a second stage: continue from saved weights (probe heads start afresh)
        from safetensors.torch import load_file

        st, _ = models.weights_paths(name, init)
        tr.model.load_state_dict(load_file(str(st)), strict=True)
        previous = models.metadata(name, init)["training"]
    stage1 = None
    cache = Path(__file__).resolve().parent / "out" / (f"stage1-{name}-seed{seed}-{vision_steps}x{n_scenes}-lr{lr}"
                                                      f"-left{left_weight}-bal{probe_balance}"
                                                      + (f"-tower{tower_layers}" if tr.fam == "vilt" else "") + ".pt")
    if vision_steps > 0 and cache.is_file():  # stage 1 is deterministic: reuse a finished one
        saved = torch.load(cache)
        for m, sd in zip(tr.vision_modules(), saved["modules"]):
            m.load_state_dict(sd)
        stage1 = saved["info"]
        print(f"[{name}] stage 1 from {cache}", flush=True)
    elif vision_steps > 0:  # stage 1: the image tower alone on the per-patch probes
        vparams = [p for m in tr.vision_modules() for p in m.parameters()]
        vopt = torch.optim.AdamW(vparams, lr=lr, betas=(0.9, 0.98), weight_decay=0.01)
        t1, run_v, vcurve = time.perf_counter(), None, {"step": [], "probe_loss": []}
        for step in range(vision_steps):
            for g in vopt.param_groups:
                g["lr"] = lr_at(step, vision_steps, lr, max(1, vision_steps // 20))
            first = VISION_FIRST_SCENE + step * n_scenes
            vloss = tr.vision_loss(scenes2.generate("train", range(first, first + n_scenes)))
            vopt.zero_grad(set_to_none=True)
            vloss.backward()
            torch.nn.utils.clip_grad_norm_(vparams, 1.0)
            vopt.step()
            run_v = vloss.item() if run_v is None else 0.9 * run_v + 0.1 * vloss.item()
            if (step + 1) % 25 == 0 or step == vision_steps - 1:
                vcurve["step"].append(step + 1)
                vcurve["probe_loss"].append(round(run_v, 4))
                print(f"[{name}] stage 1 step {step + 1}/{vision_steps} probe loss {run_v:.3f} "
                      f"({time.perf_counter() - t1:.0f}s)", flush=True)
        stage1 = {"steps": vision_steps, "scenes_per_step": n_scenes, "peak_lr": lr,
                  "data": f"training scenes {VISION_FIRST_SCENE}..{VISION_FIRST_SCENE + vision_steps * n_scenes - 1}",
                  "train_seconds": round(time.perf_counter() - t1, 1), "curve": vcurve}
        cache.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"modules": [m.state_dict() for m in tr.vision_modules()], "info": stage1}, cache)
    params = tr.parameters()
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.98))
    gen = torch.Generator().manual_seed(seed)
    warmup = max(1, steps // 20)
    test = scenes2.generate("test", TEST_SCENES)
    shipped = scenes2.load_shipped()
    n_params = sum(p.numel() for p in tr.model.parameters())
    print(f"[{name}] {type(tr.model).__name__}, {n_params / 1e6:.2f}M parameters, {steps} steps x {n_scenes} scenes "
          f"(x4 questions), lr {lr}", flush=True)
    curve = {"step": [], "loss": [], "probe_loss": [], "describe_loss": [], "eval_step": [], "eval_accuracy": []}
    ema = lambda old, new: new if old is None else 0.9 * old + 0.1 * new  # noqa: E731
    run_a = run_p = run_d = run_g = None
    t0 = time.perf_counter()
    eval_s = 0.0
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, steps, lr, warmup)
        ease = max(0.0, 1.0 - step / max(1.0, curriculum * steps)) if curriculum > 0 else 0.0
        first = first_scene + step * n_scenes
        data = scenes2.generate("train", range(first, first + n_scenes), ease=ease)
        ans, probe, desc, ground = tr.loss(data, gen, describe_weight > 0 and step < describe_until * steps)
        loss = ans + probe_weight * probe + (describe_weight * desc if desc is not None else 0.0)
        if ground is not None:
            loss = loss + ground_weight * ground
            run_g = ema(run_g, ground.item())
        if desc is not None:
            run_d = ema(run_d, desc.item())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        run_a, run_p = ema(run_a, ans.item()), ema(run_p, probe.item())
        if (step + 1) % 25 == 0 or step == steps - 1:
            el = time.perf_counter() - t0 - eval_s
            curve["step"].append(step + 1)
            curve["loss"].append(round(run_a, 4))
            curve["probe_loss"].append(round(run_p, 4))
            curve["describe_loss"].append(round(run_d, 4) if run_d is not None else None)
            dtxt = f" describe {run_d:.3f}" if run_d is not None else ""
            dtxt += f" grounding {run_g:.3f}" if run_g is not None else ""
            curve.setdefault("grounding_loss", []).append(round(run_g, 4) if run_g is not None else None)
            print(f"[{name}] step {step + 1}/{steps} answer loss {run_a:.3f} probe {run_p:.3f}{dtxt} ({el:.0f}s)",
                  flush=True)
        if eval_every and (step + 1) % eval_every == 0 and step != steps - 1:
            te = time.perf_counter()
            pred = models.predict(tr.model, name, test, 100, tokenizer=tr.tok, limit=400)
            by = models.accuracy_by_kind(test, pred, tr.tok)
            acc = by["all"]
            tr.model.train()
            eval_s += time.perf_counter() - te
            curve["eval_step"].append(step + 1)
            curve["eval_accuracy"].append(round(acc, 4))
            print(f"[{name}]   test accuracy on 400 questions: {acc:.3f} "
                  f"({', '.join(f'{k} {v:.2f}' for k, v in by.items() if k != 'all')})", flush=True)
    train_s = time.perf_counter() - t0 - eval_s
    if ground_weight > 0 and hasattr(tr.model, "set_attn_implementation"):
        tr.model.set_attn_implementation("sdpa")
    model = tr.model.eval()
    pred = models.predict(model, name, test, 100, tokenizer=tr.tok)
    test_acc = models.accuracy_by_kind(test, pred, tr.tok)
    curve["eval_step"].append(steps)
    curve["eval_accuracy"].append(round(float(test_acc["all"]), 4))
    shipped_acc = models.accuracy_by_kind(shipped, models.predict(model, name, shipped, 100, tokenizer=tr.tok), tr.tok)
    print(f"[{name}] trained in {train_s:.0f}s; test accuracy {test_acc['all']:.4f} {test_acc}; shipped "
          f"{shipped_acc['all']:.4f}", flush=True)
    info = {
        "note": "trained from scratch by graphred (bench/train_models2.py) on its cluttered 224 px scenes "
                "(graphred.data.scenes2); no pretrained weights",
        "training": {
            "steps": steps, "scenes_per_step": n_scenes, "questions_per_step": 4 * n_scenes, "peak_lr": lr,
            "warmup_steps": warmup, "seed": seed,
            "optimizer": "AdamW(betas=(0.9, 0.98), weight_decay=0.01), cosine decay to 5%, grad clip 1.0",
            "data": f"training scenes {first_scene}..{first_scene + steps * n_scenes - 1} of graphred.data.scenes2 "
                    "(each seen once)",
            "previous_stage": previous,
            "vision_stage": stage1,
            "auxiliary": {"probe_weight": probe_weight, "describe_weight": describe_weight,
                          "describe_until": describe_until, "grounding_weight": ground_weight,
                          "grounding_query": ground_query, "answer_grounding_layer": answer_layer,
                          "left_probe_weight": left_weight, "hop_grounding_layer": hop_layer,
                          "probe_balance": probe_balance, "word_probe_weight": word_weight,
                          "word_probe_layer": word_layer, "decoder_probes_weight": decoder_probes,
                          "word_grounding_layers": word_ground_layers,
                          **({"tower_layers": tower_layers} if tr.fam == "vilt" else {}),
                          "curriculum": (f"clutter and texture ramp from none to full over the first "
                                         f"{100 * curriculum:.0f}% of the steps (scenes2.generate(ease=...))")
                                        if curriculum > 0 else "none",
                          "grounding": ("layer 0: the answer query's attention (decoder: the answer position; "
                                        "encoders: the text [CLS]) over the image tokens is trained toward the "
                                        "cells of the asked-about object (-log of its share), standing in for the "
                                        "grounded pre-training real VLMs get; later layers are free")
                                       if ground_query == "answer" else
                                       (f"layers {tower_layers}..{tower_layers + word_ground_layers - 1} (ViLT: the "
                                        "first layers after the tower layers; [CLS] toward the class word at "
                                        "hop_grounding_layer): the attention of the question's class word (the "
                                        "word naming the asked-about class) over the image tokens is trained toward "
                                        "the cells of that class (-log of its share of the image attention; none for "
                                        "an absent class), and in the description task each class word toward its "
                                        "cells; standing in for the grounded pre-training real VLMs get; later "
                                        "layers are free") if tr.fam == "vilt" else
                                       ("layer 0: the attention of the question's class word (the word naming "
                                        "the asked-about class) over the image tokens is trained toward the cells "
                                        "of that class (-log of its share of the image attention; none for an "
                                        "absent class), and in the description block each class word toward its "
                                        "cells; standing in for the grounded pre-training real VLMs get; later "
                                        "layers and the answer position are free"),
                          "stage_1": ("the image embeddings and the first tower_layers encoder layers trained on the "
                                      "image alone (ViLT has no separate tower)" if tr.fam == "vilt" else
                                      "the image tower alone")
                                     + " trained on the per-patch probes (own content, and the "
                                     "left neighbour's at left_probe_weight) before the VQA stage (vision_stage)"
                                     if vision_steps > 0 else "none",
                          "describe": "every class word followed by its count (decoder: a fifth packed block, "
                                      "next-token; encoders: a [CLS] c1..c10 [SEP] sequence and a linear count "
                                      "probe on each word), discarded after training",
                          "note": "per-token linear probe of each patch's content (10 classes, digit, texture) on "
                                  "the image tokens (vision tower output; ViLT's last layer), discarded after "
                                  "training; 2-D sine-cosine image position init"},
            "train_seconds": round(train_s, 1), "threads": torch.get_num_threads(),
            "machine": f"{platform.machine()} {platform.processor() or ''}".strip() + " (shared, loaded)",
            "torch": torch.__version__,
            "curve": curve,
        },
        "accuracy": {
            "test": round(test_acc["all"], 4),
            "test_by_kind": {k: round(v, 4) for k, v in test_acc.items() if k != "all"},
            "test_questions": len(test),
            "shipped": round(shipped_acc["all"], 4),
            "shipped_by_kind": {k: round(v, 4) for k, v in shipped_acc.items() if k != "all"},
            "shipped_questions": len(shipped),
        },
    }
    if out is not None:
        st, js = models.save_trained(name, model, tr.tok, tr.config, info=info, directory=out)
        print(f"[{name}] wrote {st} ({os.path.getsize(st) / 1e6:.2f} MB) and {js}", flush=True)
    return info


def plot_curves(path: Path, directory: str | None = None) -> bool:
    """docs/img/train_vqa2.png: each shipped vqa2 model's training losses and test accuracy, from the
    curves recorded in its weights JSON."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)", file=sys.stderr)
        return False
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for ax, name in zip(axes, models.MODEL_NAMES_V2):
        try:
            meta = models.metadata(name, directory)
        except models.WeightsError:
            ax.set_title(f"{name}: not trained")
            continue
        tr = meta["training"]
        c = {k: list(v) for k, v in tr["curve"].items()}
        minutes, stages = tr["train_seconds"] / 60, 1
        if tr.get("vision_stage"):  # the image tower's own first stage (per-patch probes), not on the x axis
            minutes, stages = minutes + tr["vision_stage"]["train_seconds"] / 60, 2
        prev = tr.get("previous_stage")
        if prev:  # a two-stage run: the first stage's curve, then the second shifted by its steps
            pc, off = prev["curve"], prev["steps"]
            for k in ("step", "eval_step"):
                c[k] = pc[k] + [off + x for x in c[k]]
            for k in ("loss", "probe_loss", "eval_accuracy"):
                c[k] = pc[k] + c[k]
            c["describe_loss"] = pc.get("describe_loss", [None] * len(pc["step"])) + c.get("describe_loss", [])
            minutes, stages = minutes + prev["train_seconds"] / 60, 2
            ax.axvline(off, color="grey", lw=0.6, ls=":")
        ax.plot(c["step"], c["loss"], label="answer loss")
        ax.plot(c["step"], c["probe_loss"], label="patch probe loss")
        if any(v is not None for v in c.get("describe_loss", [])):
            ax.plot(c["step"], c["describe_loss"], label="description loss")
        ax.set_xlabel("step")
        ax.set_ylabel("loss (EMA)")
        bx = ax.twinx()
        bx.plot(c["eval_step"], [100 * a for a in c["eval_accuracy"]], "k--o", ms=3, label="test accuracy")
        bx.set_ylabel("test accuracy (%)")
        bx.set_ylim(0, 100)
        ax.set_title(f"{name}: {minutes:.0f} min ({stages} stage{'s' if stages > 1 else ''}), seed {tr['seed']}, "
                     f"{100 * meta['accuracy']['test']:.1f}%", fontsize=9)
        ax.legend(fontsize=7, loc="upper center")
        bx.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    print(f"wrote {path}")
    return True


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=list(models.MODEL_NAMES_V2),
                    choices=models.MODEL_NAMES_V2 + models.MODEL_NAMES_V2_DEEP)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--lr", type=float, default=None)
    ap.add_argument("--scenes", type=int, default=None, help="scenes per step (four questions each)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eval-every", type=int, default=150)
    ap.add_argument("--probe-weight", type=float, default=1.0)
    ap.add_argument("--describe-weight", type=float, default=1.0)
    ap.add_argument("--describe-until", type=float, default=1.0)
    ap.add_argument("--init", default=None, help="continue from the weights in this directory (a second stage)")
    ap.add_argument("--first-scene", type=int, default=0, help="first training scene index")
    ap.add_argument("--curriculum", type=float, default=0.5,
                    help="ramp clutter and texture from none to full over this fraction of the steps (0: none)")
    ap.add_argument("--ground-weight", type=float, default=0.5,
                    help="weight of the layer-0 grounding loss on the answer query's attention (0: none)")
    ap.add_argument("--ground-query", choices=("answer", "word"), default="answer",
                    help="decoder: which query the layer-0 grounding loss trains: the answer position, or the "
                         "question's class word (the answer position cannot know the class at layer 0)")
    ap.add_argument("--answer-layer", type=int, default=None,
                    help="decoder: also ground the answer position's attention at this layer (it has read the "
                         "question by then)")
    ap.add_argument("--hop-layer", type=int, default=None,
                    help="decoder: train the answer position's attention at this layer toward the question's "
                         "class word")
    ap.add_argument("--probe-balance", type=float, default=1.0,
                    help="weight object cells this many times a digit or texture cell in the patch probes")
    ap.add_argument("--word-weight", type=float, default=0.0,
                    help="decoder: weight of a linear probe reading the answer from the question's class word "
                         "after layer --word-layer (makes the layer-0 read of the object carry what the answer needs)")
    ap.add_argument("--word-layer", type=int, default=0)
    ap.add_argument("--decoder-probes", type=float, default=0.0,
                    help="decoder: weight of probes on the image tokens inside the decoder: their cell (row, column) "
                         "at its input, their left neighbour's content after layer 0; ViLT: their cell where the patch probes read them (after --tower-layers)")
    ap.add_argument("--word-ground-layers", type=int, default=1,
                    help="decoder: ground the question's class word in this many layers from layer 0")
    ap.add_argument("--tower-layers", type=int, default=0,
                    help="single stream (ViLT): stage 1 trains the image embeddings and this many leading encoder "
                         "layers on the image alone; the patch probes then read the image tokens after them, and "
                         "the class-word grounding starts at the next layer")
    ap.add_argument("--left-weight", type=float, default=0.0,
                    help="weight of a second per-patch probe: the left neighbour's content (for 'left')")
    ap.add_argument("--vision-steps", type=int, default=0,
                    help="stage 1: train the image tower alone on the per-patch probes for this many steps first")
    ap.add_argument("--out", default=str(models.WEIGHTS_DIR), help="weights directory ('-' to write nothing)")
    ap.add_argument("--plot", action="store_true", help="only draw docs/img/train_vqa2.png from the weights JSONs")
    args = ap.parse_args(argv)
    if args.plot:
        plot_curves(Path(__file__).resolve().parents[1] / "docs" / "img" / "train_vqa2.png",
                    None if args.out in ("-", str(models.WEIGHTS_DIR)) else args.out)
        return 0
    torch.set_num_threads(args.threads)
    for name in args.models:
        s = SCHEDULE[name]
        train(name, args.steps or s["steps"], args.lr or s["lr"], args.scenes or s["scenes"], args.seed,
              args.eval_every, None if args.out == "-" else args.out, args.probe_weight, args.describe_weight,
              args.describe_until, args.ground_weight, args.curriculum, args.init, args.first_scene,
              args.ground_query, args.answer_layer, args.left_weight, args.vision_steps,
              args.hop_layer, args.probe_balance, args.word_weight, args.word_layer, args.decoder_probes,
              args.word_ground_layers, args.tower_layers)
    return 0


if __name__ == "__main__":
    sys.exit(main())
