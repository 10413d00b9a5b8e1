"""Train the three shipped VQA models on the grid scenes, on CPU, and write their weights.

    apt-get install dataset-fashion-mnist
    python bench/train_models.py                      # all three, ~10 minutes each
    python bench/train_models.py --models vqa-vilt --steps 200 --out /tmp/w   # a quick try

Each model trains from scratch (graphred can download no pretrained weights) for a fixed
number of steps of AdamW with warm-up and cosine decay on the 80,000 training questions
(20,000 scenes), one thread by default. Afterwards it is evaluated on the 4,000 test questions
(1,000 scenes of unseen photographs) and on the shipped 300-scene subset; the weights go to
``graphred/weights/<name>.safetensors`` and the config, vocabulary, training facts and
accuracies to ``graphred/weights/<name>.json``.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time

import torch

from graphred.data import models, scenes

#: name -> steps, peak learning rate, questions per step, description scenes per step
SCHEDULE: dict[str, dict] = {
    "vqa-llava": {"steps": 2500, "lr": 2e-3, "batch_size": 32, "describe_batch": 8, "describe_until": 1.0},
    "vqa-vilt": {"steps": 2500, "lr": 2e-3, "batch_size": 64, "describe_batch": 16, "describe_until": 0.4},
    "vqa-blip": {"steps": 3000, "lr": 2e-3, "batch_size": 64, "describe_batch": 32, "describe_until": 1.0},
}


def cell_pooling(grid: int = scenes.GRID, cell: int = scenes.CELL, patch: int = models.PATCH) -> torch.Tensor:
    """``(cells, patches)``: the share of each grid cell that each image patch covers (rows sum to 1)."""
    n = grid * cell // patch
    span = lambda i, size: (i * size, (i + 1) * size)  # noqa: E731
    over = torch.zeros(grid, n)
    for c in range(grid):
        for p in range(n):
            (a0, a1), (b0, b1) = span(c, cell), span(p, patch)
            over[c, p] = max(0, min(a1, b1) - max(a0, b0))
    w = torch.einsum("ab,cd->acbd", over, over).reshape(grid * grid, n * n)
    return w / w.sum(1, keepdim=True)


class CellProbe:
    """Auxiliary training signal on the image tokens: what is in each grid cell (10 classes or empty).

    Each image-token state a model produces (the vision tower's output; ViLT's image tokens at
    its last layer, put back in grid order) is classified by a linear probe as the content of
    the cell the token's patch mostly covers (``per_token``; otherwise the states are averaged
    over each cell by patch overlap first). It plays the part of the pretrained vision tower
    real VLMs start from, and keeps each object's information on the tokens that cover it. The
    probe is discarded after training.
    """

    def __init__(self, name: str, model: torch.nn.Module, hidden: int, per_token: bool = True):
        self.name, self.model = name, model
        self.pool = cell_pooling()
        self.cell_of_token = self.pool.argmax(0)  # (patches,)
        self.per_token = per_token
        self.head = torch.nn.Linear(hidden, len(scenes.CLASSES) + 1)
        self.captured: dict[str, torch.Tensor] = {}
        if name == "vqa-llava":
            model.model.vision_tower.register_forward_hook(self._grab_tower)
        elif name == "vqa-blip":
            model.vision_model.register_forward_hook(self._grab_tower)
        else:
            emb = model.vilt.embeddings
            original = emb.visual_embed

            def visual_embed(*args, **kwargs):
                x, x_mask, (patch_index, hw) = original(*args, **kwargs)
                self.captured["patch_index"] = patch_index
                return x, x_mask, (patch_index, hw)

            emb.visual_embed = visual_embed

    def _grab_tower(self, module, args, output):
        self.captured["tokens"] = output.last_hidden_state[:, 1:]  # drop the image [CLS]

    def extra_kwargs(self) -> dict:
        return {"output_hidden_states": True} if self.name == "vqa-vilt" else {}

    def loss(self, output, layout: torch.Tensor) -> torch.Tensor:
        if self.name == "vqa-vilt":
            n = self.pool.shape[1]
            tokens = output.hidden_states[-1][:, -n:]  # [text, image CLS, patches]: the patches
            pi = self.captured["patch_index"]  # (B, n, 2): (row, col) of each token
            idx = (pi[..., 0] * int(n ** 0.5) + pi[..., 1]).unsqueeze(-1).expand_as(tokens)
            tokens = torch.zeros_like(tokens).scatter(1, idx, tokens)
        else:
            tokens = self.captured["tokens"]
        labels = torch.where(layout >= 0, layout, len(scenes.CLASSES)).long()
        if self.per_token:  # every token: the content of the cell it mostly covers
            return torch.nn.functional.cross_entropy(self.head(tokens).flatten(0, 1),
                                                     labels[:, self.cell_of_token].flatten())
        cells = torch.einsum("cp,bpd->bcd", self.pool, tokens)
        return torch.nn.functional.cross_entropy(self.head(cells).flatten(0, 1), labels.flatten())


class DescribeTask:
    """Auxiliary grounded description, two ways, alternating step by step.

    ``cells``: name what each grid cell holds, cells in a random order. ``counts``: say how
    many of each class the picture holds, classes in a random order. The decoder reads
    ``<bos> <image>*49 w1 a1 w2 a2 ...`` (``w`` a position or class word, ``a`` its answer
    word) and is trained to predict each ``a`` as the token after its ``w``, as the captioning
    stage of LLaVA-style training teaches a decoder to read image tokens. The encoders read
    ``[CLS] w1 w2 ... [SEP]`` and a linear probe on each ``w``'s output state predicts its
    answer (the analogue of ViLT/BLIP's masked-language-model pre-training). Nine or ten
    grounded targets per image teach the position-to-content and content-to-count reading the
    questions need; the probes are discarded after training.
    """

    MODES = ("cells", "counts")

    def __init__(self, name: str, model: torch.nn.Module, tok: scenes.SceneTokenizer, hidden: int):
        self.name, self.model, self.tok = name, model, tok
        self.answers = {
            "cells": list(scenes.CLASSES) + ["nothing"],
            "counts": list(scenes.NUMBERS),
        }
        self.keys = {"cells": list(scenes.POSITIONS), "counts": list(scenes.CLASSES)}
        self.heads = torch.nn.ModuleDict()
        if name != "vqa-llava":
            self.heads = torch.nn.ModuleDict({m: torch.nn.Linear(hidden, len(a)) for m, a in self.answers.items()})

    def parameters(self):
        return list(self.heads.parameters())

    def _targets(self, mode: str, layout: torch.Tensor) -> torch.Tensor:
        """``(B, keys)``: answer index per key, in key order."""
        if mode == "cells":
            return torch.where(layout >= 0, layout, len(scenes.CLASSES))
        classes = torch.arange(len(scenes.CLASSES))
        return (layout[:, :, None] == classes[None, None]).sum(1).clamp(max=len(scenes.NUMBERS) - 1)

    def loss(self, data: scenes.SceneSet, scene_ids: list[int], gen: torch.Generator, mode: str) -> torch.Tensor:
        tok, b = self.tok, len(scene_ids)
        keys = self.keys[mode]
        n = len(keys)
        perms = torch.stack([torch.randperm(n, generator=gen) for _ in range(b)])
        layout = torch.from_numpy(data.layout[scene_ids]).long()
        target = self._targets(mode, layout).gather(1, perms)  # (B, n) in prompt order
        key_ids = torch.tensor([tok.token_to_id[k] for k in keys])[perms]
        pixels = scenes.pixel_values(data.images[scene_ids])
        if self.name == "vqa-llava":
            n_img = (scenes.IMAGE_SIZE // models.PATCH) ** 2
            answer_ids = torch.tensor([tok.token_to_id[a] for a in self.answers[mode]])[target]
            words = torch.stack([key_ids, answer_ids], -1).flatten(1)  # w1 a1 w2 a2 ...
            head = torch.tensor([[tok.bos_id] + [tok.image_id] * n_img] * b)
            ids = torch.cat([head, words], 1)
            out = self.model(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pixels, use_cache=False)
            at = head.shape[1] + 2 * torch.arange(n)  # the key words
            return torch.nn.functional.cross_entropy(out.logits[:, at].flatten(0, 1), answer_ids.flatten())
        length = max(models.text_length(self.name), n + 2)
        ids = torch.full((b, length), tok.pad_id, dtype=torch.long)
        ids[:, 0], ids[:, 1: n + 1], ids[:, n + 1] = tok.cls_id, key_ids, tok.sep_id
        mask = (ids != tok.pad_id).long()
        if self.name == "vqa-vilt":
            out = self.model(input_ids=ids, attention_mask=mask, token_type_ids=torch.zeros_like(ids),
                             pixel_values=pixels, pixel_mask=torch.ones(b, scenes.IMAGE_SIZE, scenes.IMAGE_SIZE,
                                                                        dtype=torch.long),
                             output_hidden_states=True)
            states = out.hidden_states[-1][:, 1: n + 1]
        else:
            image = self.model.vision_model(pixel_values=pixels).last_hidden_state
            states = self.model.text_encoder(
                input_ids=ids, attention_mask=mask, encoder_hidden_states=image,
                encoder_attention_mask=torch.ones(image.shape[:-1], dtype=torch.long),
            ).last_hidden_state[:, 1: n + 1]
        return torch.nn.functional.cross_entropy(self.heads[mode](states).flatten(0, 1), target.flatten())


def packed_turns(tok: scenes.SceneTokenizer, data: scenes.SceneSet, scene_ids: list[int],
                 gen: torch.Generator) -> tuple[dict, torch.Tensor, torch.Tensor]:
    """Decoder training batch with all four questions of a scene sharing one image prefix.

    ``<bos> <image>*49 q1 q2 q3 q4 <pad>...``, the questions in a random order. A 4-D attention
    mask lets each question see the prefix and itself only, and ``position_ids`` restart each
    question right after the image, so every question is computed exactly as it would be alone
    (the evaluation prompt ``<bos> <image>*49 q``) while the image prefix is computed once.
    Returns the model kwargs, the positions of each question's last word ``(B, 4)`` (where its
    answer is predicted) and the answer token ids ``(B, 4)``.
    """
    n_img = (scenes.IMAGE_SIZE // models.PATCH) ** 2
    prefix = 1 + n_img
    rows = []
    for s in scene_ids:
        qs = data.questions[4 * s: 4 * s + 4]
        assert all(q.scene == s for q in qs)
        rows.append([qs[i] for i in torch.randperm(len(qs), generator=gen).tolist()])
    enc = [[tok.encode(q.text) for q in row] for row in rows]
    length = prefix + max(sum(len(w) for w in row) for row in enc)
    b = len(rows)
    ids = torch.full((b, length), tok.pad_id, dtype=torch.long)
    pos = torch.zeros((b, length), dtype=torch.long)
    block = torch.full((b, length), -2, dtype=torch.long)  # -1: prefix, k: question k, -2: padding
    ids[:, 0], ids[:, 1:prefix] = tok.bos_id, tok.image_id
    pos[:, :prefix] = torch.arange(prefix)
    block[:, :prefix] = -1
    where = torch.zeros((b, 4), dtype=torch.long)
    answers = torch.tensor([[tok.token_to_id[q.answer] for q in row] for row in rows])
    for i, row in enumerate(enc):
        at = prefix
        for k, words in enumerate(row):
            n = len(words)
            ids[i, at: at + n] = torch.tensor(words)
            pos[i, at: at + n] = prefix + torch.arange(n)
            block[i, at: at + n] = k
            where[i, k] = at + n - 1
            at += n
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    bq, bk = block[:, :, None], block[:, None, :]
    allowed = causal & ((bk == -1) | (bq == bk)) & (bq != -2)
    allowed |= torch.eye(length, dtype=torch.bool)  # padding rows see themselves (no empty softmax rows)
    kwargs = {"input_ids": ids, "attention_mask": allowed[:, None], "position_ids": pos,
              "pixel_values": scenes.pixel_values(data.images[scene_ids]), "use_cache": False}
    return kwargs, where, answers


def sincos_2d(grid: int, dim: int, base: float = 100.0) -> torch.Tensor:
    """``(grid*grid, dim)`` fixed 2-D sine-cosine position codes (as MAE initialises ViTs)."""
    quarter = dim // 4
    omega = 1.0 / base ** (torch.arange(quarter, dtype=torch.float64) / max(1, quarter))
    rows, cols = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    parts = []
    for coord in (rows.flatten(), cols.flatten()):
        ang = coord[:, None].double() * omega[None]
        parts += [ang.sin(), ang.cos()]
    out = torch.cat(parts, 1)
    return torch.nn.functional.pad(out, (0, dim - out.shape[1])).float()


@torch.no_grad()
def init_image_positions(name: str, model: torch.nn.Module) -> None:
    """Start the image position embeddings from 2-D sine-cosine codes (the CLS slot at zero).

    The architectures' default is a small random (or zero) init, from which these tiny models
    learn where a patch is only slowly; the codes give every patch a distinct, smooth position
    from the first step. They remain trainable parameters.
    """
    grid = scenes.IMAGE_SIZE // models.PATCH
    if name == "vqa-llava":
        table = model.model.vision_tower.embeddings.position_embedding.weight  # (1 + n, d)
    elif name == "vqa-blip":
        table = model.vision_model.embeddings.position_embedding[0]  # (1 + n, d)
    else:
        table = model.vilt.embeddings.position_embeddings[0]  # (1 + n, d)
    table.zero_()
    table[1:] = sincos_2d(grid, table.shape[1])


def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return peak * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * t)))


def train_one(name: str, train: scenes.SceneSet, test: scenes.SceneSet, shipped: scenes.SceneSet, *,
              steps: int, lr: float, batch_size: int, seed: int, eval_every: int, out: str | None,
              eval_limit: int, aux_weight: float, describe_weight: float, describe_batch: int,
              sincos: bool = True, describe_until: float = 1.0, overrides: list[str] | None = None) -> dict:
    tok = scenes.SceneTokenizer()
    torch.manual_seed(seed)
    config = models.default_config(name, tok)
    for item in overrides or ():
        key, _, value = item.partition("=")
        *path, last = key.split(".")
        node = config
        for part in path:
            node = node[part]
        node[last] = json.loads(value)
    model = models.build_model(name, config, tok).train()
    n_params = sum(p.numel() for p in model.parameters())
    if sincos:
        init_image_positions(name, model)
    probe = None
    if aux_weight > 0:
        width = (config["vision_config"]["hidden_size"] if name != "vqa-vilt" else config["hidden_size"])
        probe = CellProbe(name, model, width)
    describe = None
    if describe_weight > 0 and describe_batch > 0:
        describe = DescribeTask(name, model, tok, config.get("hidden_size") or config.get("text_config", {}).get(
            "hidden_size"))
    params = list(model.parameters()) + (list(probe.head.parameters()) if probe else []) + (
        describe.parameters() if describe else [])
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.98))
    gen = torch.Generator().manual_seed(seed)
    # the decoder packs a scene's four questions into one sequence: it steps over scenes
    packed = name == "vqa-llava"
    n_items = train.num_scenes if packed else len(train)
    order = torch.randperm(n_items, generator=gen)
    pos = 0
    warmup = max(1, steps // 20)
    print(f"[{name}] {type(model).__name__}, {n_params / 1e6:.2f}M parameters, {steps} steps x {batch_size}, "
          f"lr {lr}", flush=True)
    t0 = time.perf_counter()
    eval_time = 0.0
    running = aux_running = None
    desc_running = {m: None for m in DescribeTask.MODES}
    ema = lambda old, new: new if old is None else 0.95 * old + 0.05 * new  # noqa: E731
    for step in range(steps):
        if pos + batch_size > len(order):
            order, pos = torch.randperm(n_items, generator=gen), 0
        picked = order[pos: pos + batch_size].tolist()
        pos += batch_size
        for g in opt.param_groups:
            g["lr"] = lr_at(step, steps, lr, warmup)
        if packed:
            scene_ids = picked
            kwargs, at, answers = packed_turns(tok, train, scene_ids, gen)
            output = model(**kwargs)
            logits = output.logits[torch.arange(len(scene_ids))[:, None], at]
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), answers.flatten())
        else:
            qs = train.select(picked)
            scene_ids = [q.scene for q in qs]
            kwargs = models.build_inputs(name, tok, train, qs)
            if probe is not None:
                kwargs.update(probe.extra_kwargs())
            output = model(**kwargs)
            logits = models.training_logits(name, output)
            loss = torch.nn.functional.cross_entropy(logits, models.targets(name, tok, qs))
        running = ema(running, loss.item())
        if probe is not None:  # right after the forward whose image tokens it captured
            layout = torch.from_numpy(train.layout[scene_ids])
            aux = probe.loss(output, layout)
            aux_running = ema(aux_running, aux.item())
            loss = loss + aux_weight * aux
        if describe is not None and step < describe_until * steps:
            ids = torch.randint(0, train.num_scenes, (describe_batch,), generator=gen).tolist()
            mode = DescribeTask.MODES[step % 2]
            desc = describe.loss(train, ids, gen, mode)
            desc_running[mode] = ema(desc_running[mode], desc.item())
            loss = loss + describe_weight * desc
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if (step + 1) % 50 == 0 or step == steps - 1:
            el = time.perf_counter() - t0 - eval_time
            aux_txt = f" cell-probe {aux_running:.3f}" if probe is not None else ""
            if describe is not None:
                aux_txt += "".join(f" {m} {v:.3f}" for m, v in desc_running.items() if v is not None)
            print(f"[{name}] step {step + 1}/{steps} loss {running:.3f}{aux_txt} ({el:.0f}s)", flush=True)
        if eval_every and (step + 1) % eval_every == 0 and step != steps - 1:
            te = time.perf_counter()
            acc = models.evaluate(model, name, test, 200, tokenizer=tok, limit=eval_limit)
            model.train()
            eval_time += time.perf_counter() - te
            print(f"[{name}]   test accuracy on {eval_limit} questions: {acc:.3f}", flush=True)
    train_s = time.perf_counter() - t0 - eval_time
    model.eval()
    pred = models.predict(model, name, test, 200, tokenizer=tok)
    test_acc = models.accuracy_by_kind(test, pred, tok)
    shipped_acc = models.accuracy_by_kind(shipped, models.predict(model, name, shipped, 200, tokenizer=tok), tok)
    print(f"[{name}] trained in {train_s:.0f}s; test accuracy {test_acc['all']:.4f} {test_acc}; "
          f"shipped subset {shipped_acc['all']:.4f}", flush=True)
    info = {
        "note": "trained from scratch by graphred (bench/train_models.py) on its Fashion-MNIST grid scenes; "
                "no pretrained weights",
        "training": {
            "steps": steps, "batch_size": batch_size, "peak_lr": lr, "warmup_steps": warmup, "seed": seed,
            "optimizer": "AdamW(betas=(0.9, 0.98), weight_decay=0.01), cosine decay to 5%, grad clip 1.0",
            "questions_per_step": batch_size * (4 if packed else 1),
            "packing": ("each step takes batch_size scenes; a scene's four questions share its image prefix "
                        "(block attention mask, positions restarted), each computed as if alone") if packed else None,
            "auxiliary": {
                "cell_probe_weight": aux_weight if probe is not None else 0.0,
                "describe_weight": describe_weight if describe is not None else 0.0,
                "describe_batch": describe_batch if describe is not None else 0,
                "describe_until": describe_until,
                "image_position_init": "2-D sine-cosine" if sincos else "default",
                "note": "per-token cell-content probe on the image tokens and a grounded description task "
                        "(cell contents, class counts), both discarded after training; see bench/train_models.py",
            },
            "overrides": list(overrides or []),
            "train_questions": len(train), "train_scenes": train.num_scenes,
            "train_seconds": round(train_s, 1), "threads": torch.get_num_threads(),
            "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
            "torch": torch.__version__,
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
        st, js = models.save_trained(name, model, tok, config, info=info, directory=out)
        print(f"[{name}] wrote {st} ({os.path.getsize(st) / 1e6:.2f} MB) and {js}", flush=True)
    return info


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=list(models.MODEL_NAMES), choices=models.MODEL_NAMES)
    ap.add_argument("--steps", type=int, default=None, help="override the per-model step count")
    ap.add_argument("--lr", type=float, default=None, help="override the per-model peak learning rate")
    ap.add_argument("--batch-size", type=int, default=None, help="override the questions per step")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eval-every", type=int, default=0, help="evaluate on part of the test set every N steps")
    ap.add_argument("--eval-limit", type=int, default=800)
    ap.add_argument("--aux-weight", type=float, default=1.0, help="weight of the cell-probe loss (0: none)")
    ap.add_argument("--describe-weight", type=float, default=1.0, help="weight of the description loss (0: none)")
    ap.add_argument("--describe-batch", type=int, default=None, help="override the description scenes per step")
    ap.add_argument("--describe-until", type=float, default=None,
                    help="stop the description task after this fraction of the steps")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=JSON",
                    help="override a config entry, e.g. text_config.hidden_size=128 (for experiments)")
    ap.add_argument("--no-sincos", action="store_true", help="keep the default image position init")
    ap.add_argument("--out", default=str(models.WEIGHTS_DIR), help="weights directory ('-' to write nothing)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    train, test, shipped = scenes.load("train"), scenes.load("test"), scenes.load_shipped()
    for name in args.models:
        sched = SCHEDULE[name]
        train_one(name, train, test, shipped, steps=args.steps or sched["steps"], lr=args.lr or sched["lr"],
                  batch_size=args.batch_size or sched["batch_size"], seed=args.seed, eval_every=args.eval_every,
                  out=None if args.out == "-" else args.out, eval_limit=args.eval_limit, aux_weight=args.aux_weight,
                  describe_weight=args.describe_weight, describe_batch=args.describe_batch or sched["describe_batch"],
                  sincos=not args.no_sincos,
                  overrides=args.set,
                  describe_until=args.describe_until if args.describe_until is not None else sched["describe_until"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
