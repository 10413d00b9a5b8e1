"""``graphred.train``: fine-tune a transformed model (Victor's registers, or the model with its
reducers in place) by distillation from the unreduced model plus an optional task loss.

>>> import graphred, torch
>>> model, inputs = graphred.zoo.load("llava")
>>> fast = graphred.transform(graphred.capture(model, **inputs), graphred.plans.victor(registers=2, layer=1))
>>> result = graphred.train(fast, [inputs], teacher=model, steps=2, lr=1e-2, progress=False)
>>> len(result.losses)
2
"""
from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

from .errors import GraphredError

__all__ = ["train", "TrainResult", "WHAT", "SCHEDULES", "kept_logits", "kept_hidden", "lr_factor"]

WHAT = ("registers", "registers+model", "model")
SCHEDULES = ("constant", "cosine")


def lr_factor(step: int, steps: int, schedule: str = "constant", warmup: int = 0) -> float:
    """The learning-rate factor :func:`train` applies at ``step`` (0-based) of ``steps``.

    >>> [round(lr_factor(s, 10, "cosine", warmup=2), 3) for s in (0, 1, 2, 9)]
    [0.5, 1.0, 1.0, 0.086]
    """
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    span = max(steps - warmup, 1)
    t = min((step - warmup) / span, 1.0)
    return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * t))


@dataclass
class TrainResult:
    """What :func:`train` did: the loss per step, the step it resumed from, and the time it took."""

    losses: list[float] = field(default_factory=list)
    parts: list[dict[str, float]] = field(default_factory=list)
    start_step: int = 0
    steps: int = 0
    seconds: float = 0.0
    trained: list[str] = field(default_factory=list)


def _logits(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    lg = out.get("logits") if hasattr(out, "get") else getattr(out, "logits", None)
    if isinstance(lg, torch.Tensor):
        return lg
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise GraphredError(f"train: cannot find logits in a model output of type {type(out).__name__}; pass "
                        "logits_fn=lambda output, batch: ... to say where they are")


def kept_logits(student_logits: torch.Tensor, teacher_logits: torch.Tensor, kept: torch.Tensor | None,
                batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Pair the student's logits with the teacher's at the same original positions: ``[N, V]`` each.
    ``kept`` ([B, K], the transformed module's ``kept_positions``) maps student positions to original
    ones; positions standing for the same original token (Victor's registers stand for their image's
    last token) are paired only at the last of them, which predicts the same next token as the teacher
    does there; padding (``attention_mask == 0``) is left out."""
    if kept is None:  # an identity plan: positions line up
        s, t = student_logits, teacher_logits
        valid = torch.ones(s.shape[:2], dtype=torch.bool, device=s.device)
        if isinstance(batch.get("attention_mask"), torch.Tensor) and batch["attention_mask"].shape == valid.shape:
            valid = batch["attention_mask"].bool()
        return s[valid], t[valid]
    B, K = kept.shape
    t = torch.gather(teacher_logits, 1, kept.unsqueeze(-1).expand(B, K, teacher_logits.shape[-1]))
    last = torch.ones_like(kept, dtype=torch.bool)
    last[:, :-1] = kept[:, 1:] != kept[:, :-1]
    valid = last
    am = batch.get("attention_mask")
    if isinstance(am, torch.Tensor) and am.dim() == 2:
        valid = valid & torch.gather(am.expand(B, -1), 1, kept).bool()
    return student_logits[valid], t[valid]


def _hidden_states(out: Any, who: str) -> tuple:
    hs = out.get("hidden_states") if hasattr(out, "get") else getattr(out, "hidden_states", None)
    if not isinstance(hs, (tuple, list)) or not hs or not all(isinstance(h, torch.Tensor) for h in hs):
        raise GraphredError(f"train: hidden_mse without hidden_fn pairs the {who}'s hidden_states, and its output "
                            "has none; put output_hidden_states=True in each batch, or pass hidden_fn=(output, batch) "
                            "-> features")
    return tuple(hs)


def kept_hidden(student_out: Any, teacher_out: Any, kept: torch.Tensor | None,
                batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Pair the student's hidden states with the teacher's at the same original positions and layers:
    ``[N, D]`` each, the default features of ``train(..., hidden_mse=w)``. Both outputs need
    ``hidden_states`` (``output_hidden_states=True``). Every layer whose student state has the output's
    length (every layer after the plan's last drop, where ``kept`` maps student positions to original
    ones; every layer for a plan that keeps every token) is paired with the teacher's state of the same
    index; positions several student tokens stand for (Victor's registers) and padding are left out.
    Each layer's pair is divided by the teacher's root-mean-square state at that layer, so that every
    layer weighs alike in the MSE (a residual stream grows layer by layer).
    This is the signal that teaches the layers before a drop to carry what the teacher's later layers
    still read from the dropped tokens.

    >>> import torch
    >>> s = {"hidden_states": (torch.zeros(1, 5, 2), torch.ones(1, 3, 2))}   # 3 tokens left after layer 0
    >>> t = {"hidden_states": (torch.zeros(1, 4, 2), torch.full((1, 4, 2), 2.0))}
    >>> a, b = kept_hidden(s, t, torch.tensor([[0, 3, 3]]), {})  # positions 0 and 3; the duplicate is left out
    >>> a.shape, b[0].tolist()                                   # divided by the teacher's RMS (2)
    (torch.Size([1, 2]), [1.0, 1.0])
    """
    s_hs, t_hs = _hidden_states(student_out, "student"), _hidden_states(teacher_out, "teacher")
    if len(s_hs) != len(t_hs):
        raise GraphredError(f"train: the student has {len(s_hs)} hidden states and the teacher {len(t_hs)}; pass "
                            "hidden_fn=(output, batch) -> features to pair them")
    B = s_hs[-1].shape[0]
    am = batch.get("attention_mask")
    if kept is None:
        K = s_hs[-1].shape[1]
        idx = torch.arange(K, device=s_hs[-1].device).expand(B, K)
        valid = torch.ones(B, K, dtype=torch.bool, device=idx.device)
    else:
        idx, K = kept, kept.shape[1]
        counts = torch.zeros(B, int(kept.max()) + 1, dtype=torch.long, device=kept.device)
        counts.scatter_add_(1, kept, torch.ones_like(kept))
        valid = torch.gather(counts, 1, kept) == 1
    if isinstance(am, torch.Tensor) and am.dim() == 2 and am.shape[1] > int(idx.max()):
        valid = valid & torch.gather(am.expand(B, -1), 1, idx).bool()
    s_out, t_out = [], []
    for s, t in zip(s_hs, t_hs):
        if s.dim() != 3 or s.shape[1] != K:
            continue  # a layer before the drop: its positions are not the output's
        tk = torch.gather(t, 1, idx.unsqueeze(-1).expand(B, K, t.shape[-1]))[valid]
        scale = tk.detach().float().pow(2).mean().clamp_min(1e-12).rsqrt()  # every layer weighs alike
        s_out.append(s[valid] * scale)
        t_out.append(tk * scale)
    if not s_out:
        raise GraphredError(f"train: no hidden state of the student has the output's {K} positions, so none can be "
                            "paired with the teacher's; pass hidden_fn=(output, batch) -> features")
    return torch.cat(s_out), torch.cat(t_out)


def _batches(data) -> Callable[[int], dict]:
    if callable(data) and not isinstance(data, (list, tuple)):
        return data
    if isinstance(data, (list, tuple)):
        if not data:
            raise GraphredError("train: data is empty; give a list of input dicts, an iterable, or a function step -> batch")
        return lambda i: data[i % len(data)]
    it = iter(data)
    cache: dict[int, dict] = {}
    pos = [0]

    def get(i: int) -> dict:
        while pos[0] <= i:  # skips forward on resume
            try:
                cache.clear()
                cache[pos[0]] = next(it)
            except StopIteration:
                raise GraphredError(f"train: data ran out at step {pos[0]}; give more batches or fewer steps") from None
            pos[0] += 1
        return cache[i]
    return get


def _progress(enabled: bool | None):
    if enabled is None:
        enabled = sys.stderr.isatty()
    if not enabled:
        return lambda *a, **k: None, lambda: None

    def bar(step: int, total: int, loss: float, t0: float) -> None:
        w = 30
        done = int(w * step / max(total, 1))
        rate = (time.perf_counter() - t0) / max(step, 1)
        sys.stderr.write(f"\r[{'#' * done}{'.' * (w - done)}] {step}/{total} loss {loss:.4f} "
                         f"({rate:.2f} s/step, {rate * (total - step):.0f} s left)")
        sys.stderr.flush()
    return bar, lambda: sys.stderr.write("\n")


def _trainable(fast, what: str) -> dict[str, torch.nn.Parameter]:
    from .reduced_module import ReducedModule

    if not isinstance(fast, ReducedModule):
        raise GraphredError(f"train: expects the module graphred.transform returned, got {type(fast).__name__}")
    if what not in WHAT:
        raise GraphredError(f"train: what={what!r}; choose from {', '.join(WHAT)}")
    reducer = fast.reducer_parameters()
    if what in ("registers", "registers+model") and not reducer:
        raise GraphredError(f"train: the plan {fast.plan} has no parameters of its own (registers); use "
                            "what='model' to fine-tune the model with its reducers in place, or a victor(...) plan")
    out = {f"reducer.{n}": p for n, p in reducer.items()} if what != "model" else {}
    if what != "registers":
        fast.own_weights()  # the user's model (the teacher) keeps its weights
        for n, p in fast.graph_module.named_parameters():
            if n not in reducer and p.is_floating_point():
                out[f"model.{n}"] = p
    return out


def _save(path: Path, params: dict, opt: torch.optim.Optimizer, step: int, seed: int, plan: str) -> None:
    from safetensors.torch import save_file

    tensors = {f"param.{k}": p.detach().contiguous().cpu() for k, p in params.items()}
    names = list(params)
    for i, p in enumerate(params.values()):
        for k, v in opt.state.get(p, {}).items():
            if isinstance(v, torch.Tensor):
                tensors[f"optim.{names[i]}.{k}"] = v.detach().contiguous().cpu().reshape(v.shape)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    save_file(tensors, str(tmp), metadata={"format": "graphred-train/1", "step": str(step), "seed": str(seed),
                                           "plan": plan})
    os.replace(tmp, path)


def _resume(path: Path, params: dict, opt: torch.optim.Optimizer, plan: str) -> int:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        if meta.get("format") != "graphred-train/1":
            raise GraphredError(f"train: {path} is not a graphred training checkpoint")
        if meta.get("plan") != plan:
            raise GraphredError(f"train: checkpoint {path} is for the plan {meta.get('plan')!r}, not {plan!r}")
        keys = set(f.keys())
        with torch.no_grad():
            for k, p in params.items():
                if f"param.{k}" not in keys:
                    raise GraphredError(f"train: checkpoint {path} has no {k}; it was written for other trained "
                                        "parameters (another what=)")
                p.copy_(f.get_tensor(f"param.{k}"))
        for k, p in params.items():
            st = {}
            for key in keys:
                if key.startswith(f"optim.{k}."):
                    st[key[len(f"optim.{k}."):]] = f.get_tensor(key)
            if st:
                if "step" in st and st["step"].dim() == 0:
                    st["step"] = st["step"].float()
                opt.state[p] = st
        return int(meta.get("step", 0))


@torch.enable_grad()  # training works inside a caller's torch.no_grad() block too
def train(fast, data, teacher=None, *, steps: int = 100, what: str = "registers", lr: float = 1e-3,
          weight_decay: float = 0.0, kl_weight: float = 1.0, temperature: float = 1.0, task_weight: float = 1.0,
          task_loss: Callable[[Any, dict], torch.Tensor] | None = None,
          logits_fn: Callable[[Any, dict], torch.Tensor] | None = None,
          hidden_mse: float = 0.0, hidden_fn: Callable[[Any, dict], torch.Tensor] | None = None,
          clip: float | None = 1.0, seed: int = 0, reducer_lr: float | None = None, checkpoint: str | os.PathLike | None = None,
          checkpoint_every: int = 50, resume: bool = False, progress: bool | None = None,
          log_every: int = 0, schedule: str = "constant", warmup: int = 0) -> TrainResult:
    """Fine-tune ``fast`` (from :func:`graphred.transform`) for ``steps`` steps of AdamW.

    Args:
        data: input batches (dicts of the model's keyword inputs): a list (cycled), an iterable,
            or a function ``step -> batch``.
        teacher: the unreduced model (or program) for distillation; None trains on ``task_loss`` only.
        what: ``"registers"`` (the plan's parameters only: the model's weights, shared with the
            user's model, get no gradient and stay as they are), ``"registers+model"`` (as Victor
            does) or ``"model"`` (the model with its reducers in place, as PuMer does). Training the
            model first gives ``fast`` its own copy of the weights.
        kl_weight, temperature: KL(teacher || student) on the logits, paired at the same original
            positions (:func:`kept_logits`) or by ``logits_fn(output, batch) -> [N, V]`` when given.
        task_loss: ``(output, batch) -> loss`` on the student (default: the output's ``loss`` when
            the batch has ``labels``, else none).
        hidden_mse, hidden_fn: an MSE between ``hidden_fn(output, batch)`` of student and teacher
            (features paired by the caller, e.g. a pooled last hidden state); without ``hidden_fn``, the
            hidden states of every layer after the plan's last drop at the kept positions
            (:func:`kept_hidden`; the batches need ``output_hidden_states=True``).
        checkpoint, checkpoint_every, resume: a safetensors checkpoint (trained parameters and the
            optimizer state) written every ``checkpoint_every`` steps and at the end; ``resume=True``
            continues from it.
        progress: a progress bar on stderr (default: only when stderr is a terminal).
        reducer_lr: a separate learning rate for the plan's own parameters (registers start from
            scratch and usually want a larger one than the pretrained weights).
        schedule, warmup: ``"constant"`` learning rates, or ``"cosine"`` decay to 5% at ``steps``;
            either after ``warmup`` steps of linear warm-up. The factor is a function of the step
            number alone, so a resumed run continues on the same curve.

    Returns:
        :class:`TrainResult`; ``fast`` is trained in place and left in eval mode.
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise GraphredError(f"train: steps must be a non-negative integer, got {steps!r}")
    if schedule not in SCHEDULES:
        raise GraphredError(f"train: schedule={schedule!r}; choose from {', '.join(SCHEDULES)}")
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
        raise GraphredError(f"train: warmup must be a non-negative integer (steps), got {warmup!r}")
    if teacher is None and task_loss is None and kl_weight and not task_weight:
        raise GraphredError("train: nothing to learn from: give teacher= (distillation) or task_loss=")
    params = _trainable(fast, what)
    torch.manual_seed(seed)
    get = _batches(data)
    reducer = [p for k, p in params.items() if k.startswith("reducer.")]
    rest = [p for k, p in params.items() if not k.startswith("reducer.")]
    groups = [g for g in ({"params": reducer, "lr": reducer_lr or lr}, {"params": rest, "lr": lr}) if g["params"]]
    opt = torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay)
    base_lrs = [g["lr"] for g in opt.param_groups]
    ckpt = Path(checkpoint) if checkpoint is not None else None
    start = 0
    if resume:
        if ckpt is None:
            raise GraphredError("train: resume=True needs checkpoint=PATH")
        if ckpt.is_file():
            start = _resume(ckpt, params, opt, str(fast.plan))
    result = TrainResult(start_step=start, trained=list(params))
    if teacher is not None and hasattr(teacher, "eval") and getattr(teacher, "training", False):
        raise GraphredError("train: the teacher is in training mode; call teacher.eval() first (graphred does not "
                            "change the user's model)")
    bar, end = _progress(progress)
    plist = list(params.values())
    fast.train()
    t0 = time.perf_counter()
    try:
        for step in range(start, steps):
            f = lr_factor(step, steps, schedule, warmup)
            for g, b in zip(opt.param_groups, base_lrs):
                g["lr"] = b * f
            batch = get(step)
            out = fast(**batch)
            kept = fast.kept_positions
            loss = torch.zeros((), dtype=torch.float32)
            parts = {}
            if teacher is not None and (kl_weight or hidden_mse):
                with torch.no_grad():
                    t_out = teacher(**batch)
                if kl_weight:
                    if logits_fn is not None:
                        s_l, t_l = logits_fn(out, batch), logits_fn(t_out, batch)
                    else:
                        s_l, t_l = kept_logits(_logits(out), _logits(t_out), kept, batch)
                    T = temperature
                    kl = F.kl_div(F.log_softmax(s_l.float() / T, -1), F.log_softmax(t_l.float() / T, -1),
                                  reduction="batchmean", log_target=True) * T * T
                    parts["kl"] = float(kl.detach())
                    loss = loss + kl_weight * kl
                if hidden_mse:
                    if hidden_fn is None:
                        s_h, t_h = kept_hidden(out, t_out, kept, batch)
                    else:
                        s_h, t_h = hidden_fn(out, batch), hidden_fn(t_out, batch)
                    mse = F.mse_loss(s_h.float(), t_h.float())
                    parts["mse"] = float(mse.detach())
                    loss = loss + hidden_mse * mse
            if task_weight:
                tl = task_loss(out, batch) if task_loss is not None else (
                    getattr(out, "loss", None) if "labels" in batch else None)
                if tl is not None:
                    parts["task"] = float(tl.detach())
                    loss = loss + task_weight * tl
            if not loss.requires_grad:
                raise GraphredError("train: the loss does not depend on the trained parameters (no teacher, no task "
                                    "loss, or outputs that ignore them)")
            # gradients of the trained parameters only: nothing accumulates in the user's model's .grad
            grads = torch.autograd.grad(loss, plist, allow_unused=True)
            for p, g in zip(plist, grads):
                p.grad = g
            if clip:
                torch.nn.utils.clip_grad_norm_([p for p in plist if p.grad is not None], clip)
            opt.step()
            for p in plist:
                p.grad = None
            lv = float(loss.detach())
            if not math.isfinite(lv):
                raise GraphredError(f"train: the loss became {lv} at step {step}; lower lr (now {lr})")
            result.losses.append(lv)
            result.parts.append(parts)
            bar(step + 1, steps, lv, t0)
            if log_every and (step + 1) % log_every == 0:
                print(f"step {step + 1}/{steps} loss {lv:.4f} " + " ".join(f"{k} {v:.4f}" for k, v in parts.items()),
                      flush=True)
            if ckpt is not None and checkpoint_every and (step + 1) % checkpoint_every == 0:
                _save(ckpt, params, opt, step + 1, seed, str(fast.plan))
    finally:
        end()
        fast.eval()
    if ckpt is not None and steps > start:
        _save(ckpt, params, opt, steps, seed, str(fast.plan))
    result.steps = steps - start
    result.seconds = time.perf_counter() - t0
    return result


def finetune_shipped(name: str, plan, *, steps: int = 300, batch: int = 50, what: str | None = None, lr: float = 1e-4,
                     reducer_lr: float | None = 3e-3, temperature: float = 2.0, limit: int = 1000, seed: int = 0,
                     checkpoint: str | os.PathLike | None = None, resume: bool = False, out: str | os.PathLike | None = None,
                     progress: bool | None = None, log_every: int = 0, evaluate: bool = True,
                     schedule: str = "constant", warmup: int = 0) -> dict:
    """Fine-tune one of graphred's shipped VQA models (:mod:`graphred.data.models`) with ``plan`` in
    place: answer loss + KL to the unreduced model's answer distribution. Returns accuracies on the
    shipped test questions before and after, beside the unreduced model's; ``out`` saves the result with
    :meth:`ReducedModule.save_reducer`. Needs the training scenes (Debian's dataset-fashion-mnist).
    ``what`` defaults to ``"registers+model"`` for a plan with registers, else ``"model"``."""
    from .data import models, scenes
    from .plans import Plan, parse_plan
    from .program import capture
    from .reduced_module import transform

    plan = parse_plan(plan) if isinstance(plan, str) else plan
    if not isinstance(plan, Plan):
        raise GraphredError(f"finetune: expected a plan (text or graphred.plans.Plan), got {type(plan).__name__}")
    torch.manual_seed(seed)
    teacher, tok = models.load_trained(name)
    teacher.eval()
    train_set = scenes.load("train")
    test = scenes.load_shipped()
    n = min(limit, len(test.questions))
    n -= n % batch
    example = models.build_inputs(name, tok, test, test.questions[:batch])
    prog = capture(teacher, **example)
    fast = transform(prog, plan)
    if what is None:
        what = "registers+model" if fast.reducer_parameters() else "model"
    acc = {}
    if evaluate and n:
        acc["unreduced"] = models.evaluate(prog, name, test, batch, tokenizer=tok, limit=n)
        acc["before"] = models.evaluate(fast, name, test, batch, tokenizer=tok, limit=n)
    qs = train_set.questions
    gen = torch.Generator().manual_seed(seed)
    order = torch.randint(len(qs), (max(steps, 1), batch), generator=gen).tolist()
    current = {}

    def data(step: int) -> dict:
        current["qs"] = [qs[i] for i in order[step]]
        return models.build_inputs(name, tok, train_set, current["qs"])

    def task(out_, _batch) -> torch.Tensor:
        return F.cross_entropy(models.training_logits(name, out_), models.targets(name, tok, current["qs"]))

    res = train(fast, data, teacher=teacher, steps=steps, what=what, lr=lr, reducer_lr=reducer_lr,
                temperature=temperature, task_loss=task, logits_fn=lambda o, b: models.training_logits(name, o),
                seed=seed, checkpoint=checkpoint, resume=resume, progress=progress, log_every=log_every,
                schedule=schedule, warmup=warmup)
    if evaluate and n:
        acc["after"] = models.evaluate(fast, name, test, batch, tokenizer=tok, limit=n)
    if out is not None:
        fast.save_reducer(out)
    return {"model": name, "plan": str(plan), "what": what, "steps": steps, "batch": batch, "lr": lr,
            "reducer_lr": reducer_lr, "questions": n, "train_s": res.seconds, "losses": res.losses[-5:],
            **acc, "fast": fast, "program": prog}
