"""Victor benchmark: registers after the image, the image dropped at decoder layer k.

On a trained decoder VQA model (``--model``, default vqa-llava; any model of graphred.data.models):
accuracy unreduced / Victor untrained (pooled and random register init) / Victor after a fine-tune
(graphred.train: registers and model, KL to the unreduced model + answer loss) / the unreduced model
after the same fine-tune; predicted (whole model and decoder) vs measured speedup; training-step
time with and without Victor beside the predicted training-step FLOPs ratio; and how fast Victor can
make the model at all (every drop layer, 1 and ``--registers`` registers). On a zoo model
(``--bench-model``, default llava-bench): victor(registers=8, layer=2) predicted and measured
whole-model speedup. Adds or replaces the models' rows of docs/results/victor.json (a list, one row
per model) and rewrites the Victor section of docs/benchmarks.md from all rows.

    python bench/bench_victor.py                          # vqa-llava + llava-bench, CPU, 1 thread
    python bench/bench_victor.py --model vqa2-llava --bench-model '' --steps 600 --hidden-mse 1  # vqa2-llava's recipe
    python bench/bench_victor.py --model vqa2-llava-deep --layer 2 --bench-model '' --steps 600 --hidden-mse 1  # 8-layer decoder
    python bench/bench_victor.py --markdown-only          # the docs section from the JSON files

Needs the model's training scenes for the fine-tune. About 30 minutes per model on a loaded
2-core machine (two fine-tunes).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
warnings.filterwarnings("ignore")

import graphred  # noqa: E402
from graphred.analysis.cost.training import training_step_flops  # noqa: E402
from graphred.data import models  # noqa: E402
from graphred.errors import PlanError  # noqa: E402
from graphred.measure import speedup  # noqa: E402
from graphred.plans import victor  # noqa: E402
from _common import publish  # noqa: E402
from victor_study import PROBES, RESULTS as STUDY, decoder_speedup, finetune, scene_sets, scored  # noqa: E402

MARK = "bench_victor"
RESULTS = ROOT / "docs" / "results" / "victor.json"
#: the fine-tune recipe (chosen with bench/victor_study.py; see docs/benchmarks.md)
RECIPE = {"steps": 1200, "batch": 50, "lr": 5e-4, "reducer_lr": 5e-3, "schedule": "cosine", "warmup": 30,
          "hidden_mse": 0.0}


def step_time(module, inputs: dict, target: torch.Tensor, name: str, rounds: int) -> float:
    """Median seconds of one training step (forward, answer loss, backward) of ``module``."""
    params = [p for p in module.parameters() if p.requires_grad]
    times = []
    for i in range(rounds + 1):
        t0 = time.perf_counter()
        loss = F.cross_entropy(models.training_logits(name, module(**inputs)), target)
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        del grads
        if i:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def ceiling(prog, registers: int) -> list[dict]:
    """Predicted speedups (whole model, decoder) of victor(r, k) for r in (1, registers) and every
    drop layer k the decoder has: how fast Victor can make this model at all."""
    rows = []
    for r in sorted({1, registers}):
        k = 1
        while True:
            try:
                est = graphred.estimate(prog, victor(registers=r, layer=k))
            except PlanError:  # beyond the decoder
                break
            rows.append({"registers": r, "layer": k, "predicted_speedup": float(est.speedup),
                         "predicted_decoder_speedup": decoder_speedup(est)})
            k += 1
    return rows


def study_row(name: str, plan: str, recipe: dict, limit: int) -> dict | None:
    """A row of docs/results/victor_study.json that ran this very fine-tune (model, plan, recipe, seed 0,
    no other options), or None."""
    rows = json.loads(STUDY.read_text()) if STUDY.exists() else []
    for r in rows:
        if r["model"] == name and r["plan"] == plan and all(r.get(k) == v for k, v in recipe.items()) and \
                r.get("seed") == 0 and r.get("kl") == 1.0 and r.get("questions") == limit - limit % recipe["batch"]:
            return r
    return None


def vqa(name: str, registers: int, layer: int, recipe: dict, limit: int, rounds: int, fair: bool,
        reuse: bool = True) -> dict:
    """One row of victor.json for a trained VQA model: accuracy unreduced / Victor untrained (pooled and
    random init) / Victor fine-tuned (and the unreduced model fine-tuned with the same budget), speedups
    and training-step times."""
    sets = scene_sets(name)
    _, test = sets
    batch = recipe["batch"]
    plan = victor(registers=registers, layer=layer)
    label = f"{name} {plan}"
    reused = []
    row = study_row(name, str(plan), recipe, limit) if reuse else None
    if row is None:
        row, fast, prog = finetune(name, str(plan), limit=limit, sets=sets, label=label, **recipe)
    else:  # the same fine-tune (model, plan, recipe, seed) already ran in bench/victor_study.py
        print(f"[{name}] fine-tune results from victor_study row {row['name']!r}", flush=True)
        reused.append(row["name"])
        example = models.build_inputs(name, models.load_trained(name)[1], test, test.questions[:batch])
        prog = graphred.capture(models.load_trained(name)[0], **example)
        fast = graphred.transform(prog, plan)  # for timing (the weights do not change the time)
    _, tok = models.load_trained(name)
    n = row["questions"]
    unreduced = scored(prog, name, test, tok, batch, n)
    random_init = scored(graphred.transform(prog, victor(registers=registers, layer=layer, init="random")),
                         name, test, tok, batch, n)
    print(f"[{name}] unreduced {unreduced['all']:.3f}, victor untrained pool-init {row['before']['all']:.3f} "
          f"random-init {random_init['all']:.3f}, fine-tuned {row['after']['all']:.3f}", flush=True)
    example = models.build_inputs(name, tok, test, test.questions[:batch])
    est = graphred.estimate(prog, plan)
    measured = speedup(prog, fast, example, rounds=rounds)
    same_budget = None
    if fair:  # the same fine-tune applied to the unreduced model: what the extra training alone gives
        same_budget = study_row(name, "none", recipe, limit) if reuse else None
        if same_budget is not None:
            reused.append(same_budget["name"])
        else:
            same_budget, _, _ = finetune(name, "none", limit=limit, sets=sets, label=f"{name} unreduced", **recipe)

    # training-step time, unreduced vs Victor: the same answer loss, gradients of every weight
    student, _ = models.load_trained(name)
    prog_student = graphred.capture(student, **example)
    fast_step = graphred.transform(prog_student, plan)
    target = models.targets(name, tok, test.questions[:batch])
    t_full, t_victor = [], []
    for _ in range(rounds):  # alternate, so that drift on the shared machine hits both alike
        t_full.append(step_time(prog_student.graph_module, example, target, name, 1))
        t_victor.append(step_time(fast_step, example, target, name, 1))
    step_ratio = statistics.median(t_victor) / statistics.median(t_full)
    pred_step = training_step_flops(est, "registers+model")
    return {"model": name, "registers": registers, "layer": layer, "acc_unreduced": unreduced["all"],
            "acc_victor_untrained": row["before"]["all"], "acc_victor": row["after"]["all"],
            "predicted_speedup": float(est.speedup), "measured_speedup": measured, "train_step_ratio": step_ratio,
            "acc_victor_random_init": random_init["all"],
            "acc_unreduced_finetuned": same_budget["after"]["all"] if same_budget else None,
            "by_kind": {"unreduced": unreduced, "victor_untrained": row["before"], "victor_random_init": random_init,
                        "victor": row["after"], "unreduced_finetuned": same_budget["after"] if same_budget else None},
            "predicted_decoder_speedup": decoder_speedup(est), "measured_over_predicted": measured / float(est.speedup),
            "train_step_s_unreduced": statistics.median(t_full), "train_step_s_victor": statistics.median(t_victor),
            "predicted_train_step_ratio": pred_step["ratio"], "questions": n, "recipe": recipe,
            "train_s": row["train_s"], "train_s_unreduced": same_budget["train_s"] if same_budget else None,
            "from_study": reused,
            "ceiling": ceiling(prog, registers), "threads": torch.get_num_threads()}


def bench(name: str, registers: int, layer: int, rounds: int) -> dict:
    """A speed-only row (a zoo model with random weights): predicted and measured whole-model speedup."""
    model, inputs = graphred.zoo.load(name)
    prog = graphred.capture(model, **inputs)
    plan = victor(registers=registers, layer=layer)
    est = graphred.estimate(prog, plan)
    fast = graphred.transform(prog, plan)
    measured = speedup(prog, fast, inputs, rounds=rounds)
    return {"model": name, "registers": registers, "layer": layer, "acc_unreduced": None,
            "acc_victor_untrained": None, "acc_victor": None, "predicted_speedup": float(est.speedup),
            "measured_speedup": measured, "train_step_ratio": None,
            "predicted_decoder_speedup": decoder_speedup(est), "measured_over_predicted": measured / float(est.speedup),
            "kv_cache_bytes": [est.kv_cache_bytes, est.after.kv_cache_bytes],
            "flops": [int(est.flops), int(est.after.flops)], "threads": torch.get_num_threads()}


def _pct(x) -> str:
    return "" if x is None else f"{100 * x:.1f}%"


def to_markdown(rows: list[dict], study: list[dict]) -> str:
    """The Victor section of docs/benchmarks.md from the rows of victor.json and victor_study.json."""
    ok = lambda c: "met" if c else "**missed**"  # noqa: E731
    threads = ", ".join(str(t) for t in sorted({r.get("threads", 1) for r in rows + study}))
    out = [f"<!-- {MARK}:start (written by bench/bench_victor.py; do not edit by hand) -->",
           "### Victor: visual tokens summarised into registers (CPU)", "",
           f"CPU, {threads} thread(s), on a shared, loaded machine. One row per model of `docs/results/victor.json` "
           "(`python bench/bench_victor.py --model NAME` adds or replaces a model's row). Trained VQA models: "
           "accuracy on the shipped test questions (the `vqa2-*` models: the 1200 questions of their test split); the fine-tune is `graphred.train(..., what=\"registers+model\")`, "
           "answer loss + KL to the unreduced model (recipe below), and the *same* fine-tune applied to the unreduced "
           "model (`what=\"model\"`, no plan) is the fair reference. Zoo models (random weights) give speed only.", ""]
    vqa_rows = [r for r in rows if r.get("acc_unreduced") is not None]
    if vqa_rows:
        out += ["| model | plan | unreduced | unreduced, same fine-tune | victor untrained (pooled / random init) | "
                "victor fine-tuned | gap | target: within 4 points |", "|---|---|---:|---:|---|---:|---:|---|"]
        for r in vqa_rows:
            ref = r.get("acc_unreduced_finetuned")
            gap = round(100 * (r["acc_unreduced"] - r["acc_victor"]), 1)
            gap_ft = None if ref is None else round(100 * (ref - r["acc_victor"]), 1)
            out.append(f"| {r['model']} | `victor:registers={r['registers']},layer={r['layer']}` | "
                       f"{_pct(r['acc_unreduced'])} | {_pct(ref)} | {_pct(r['acc_victor_untrained'])} / "
                       f"{_pct(r.get('acc_victor_random_init'))} | {_pct(r['acc_victor'])} | {gap:+.1f}"
                       + ("" if gap_ft is None else f" ({gap_ft:+.1f} to the same fine-tune)")
                       + f" | to unreduced: {ok(gap <= 4)}"
                       + ("" if gap_ft is None else f"; to the same fine-tune: {ok(gap_ft <= 4)}") + " |")
        out += ["", "By question kind (unreduced / victor fine-tuned):", ""]
        for r in vqa_rows:
            bk = r.get("by_kind") or {}
            u, v = bk.get("unreduced") or {}, bk.get("victor") or {}
            kinds = [k for k in u if k != "all"]
            line = f"- {r['model']}: " + ", ".join(f"{k} {_pct(u[k])} / {_pct(v.get(k))}" for k in kinds)
            if v and kinds:
                worst = max(kinds, key=lambda k: u[k] - v.get(k, 0))
                line += f". The largest loss is on `{worst}` questions ({100 * (u[worst] - v[worst]):+.1f} points)"
                if worst == "where" and u[worst] - v[worst] > 0.04:
                    line += ("; Victor's registers all take their image's last position, so where an object is must "
                             "be written into their content by the decoder layers before the drop")
                if worst == "left" and u[worst] - v[worst] > 0.04:
                    line += ("; the unreduced model builds the left-of relation inside the decoder, after the drop "
                             "layer's input (the probes below)")
            out.append(line)
        out.append("")
        for r in vqa_rows:
            rc = r.get("recipe") or {}
            out.append(f"Recipe on {r['model']}: {rc.get('steps')} steps of batch {rc.get('batch')}, AdamW, lr "
                       f"{rc.get('lr'):g} (registers {rc.get('reducer_lr'):g}), {rc.get('schedule')} schedule after "
                       f"{rc.get('warmup')} warm-up steps, hidden-state MSE weight {rc.get('hidden_mse'):g}"
                       + (f" ({rc['hidden_at']})" if rc.get("hidden_at") else "") + "; "
                       f"{r['train_s']:.0f} s with Victor"
                       + (f", {r['train_s_unreduced']:.0f} s unreduced." if r.get("train_s_unreduced") else ".")
                       + (f" The fine-tunes are the rows {', '.join(r['from_study'])} of the study below (the same "
                          "run: model, plan, recipe and seed)." if r.get("from_study") else ""))
        out.append("")
    out += ["| model | plan | predicted speedup (whole) | predicted (decoder) | measured (whole) | measured/predicted | "
            "target |", "|---|---|---:|---:|---:|---:|---|"]
    for r in rows:
        rv = r["measured_speedup"] / r["predicted_speedup"]
        target = (f"decoder >= 3x: {ok(r['predicted_decoder_speedup'] >= 3)}; " if r.get("acc_unreduced") is not None
                  else f"whole >= 3x: {ok(r['predicted_speedup'] >= 3)}; ")
        out.append(f"| {r['model']} | `victor:registers={r['registers']},layer={r['layer']}` | "
                   f"{r['predicted_speedup']:.2f}x | {r['predicted_decoder_speedup']:.2f}x | "
                   f"{r['measured_speedup']:.2f}x | {rv:.2f} | {target}>= 0.85: {ok(rv >= 0.85)} |")
    for r in vqa_rows:
        if r.get("train_step_s_unreduced"):
            out += ["", f"Training step on {r['model']} (forward + answer loss + gradients of every weight, batch "
                    f"{(r.get('recipe') or {}).get('batch')}): {1000 * r['train_step_s_unreduced']:.0f} ms unreduced, "
                    f"{1000 * r['train_step_s_victor']:.0f} ms with Victor: ratio {r['train_step_ratio']:.2f} measured, "
                    f"{r['predicted_train_step_ratio']:.2f} predicted from training-step FLOPs "
                    f"({100 * (1 - r['train_step_ratio']):.0f}% less time; the paper reports 43% less)."]
        if r.get("ceiling"):
            best = max(r["ceiling"], key=lambda c: c["predicted_decoder_speedup"])
            out += ["", f"How fast Victor can make {r['model']} at all (predicted, `graphred.estimate`; the drop layer "
                    "must be >= 1, so the image is read by at least one decoder layer):", "",
                    "| registers | layer | predicted (whole) | predicted (decoder) |", "|---:|---:|---:|---:|"]
            out += [f"| {c['registers']} | {c['layer']} | {c['predicted_speedup']:.2f}x | "
                    f"{c['predicted_decoder_speedup']:.2f}x |" for c in r["ceiling"]]
            out += ["", f"The fastest Victor plan on {r['model']} predicts {best['predicted_decoder_speedup']:.2f}x for "
                    f"the decoder (registers={best['registers']}, layer={best['layer']}): the 3x target is "
                    f"{'reachable' if best['predicted_decoder_speedup'] >= 3 else '**out of reach for this model**'}."]
    if study:
        out += ["", "What limits the accuracy: fine-tunes from `bench/victor_study.py` (`docs/results/victor_study.json`; "
                "the same recipe for a Victor plan and for the unreduced model, `plan none`):", "",
                "| run | model | plan | steps | lr (registers) | hidden MSE | before | after | by kind after | s | "
                "predicted decoder speedup |", "|---|---|---|---:|---|---|---:|---:|---|---:|---:|"]
        for r in study:
            a = r["after"]
            kinds = ", ".join(f"{k} {_pct(a[k])}" for k in a if k != "all")
            mse = f"{r['hidden_mse']:g}" + (f" ({r['hidden_at']})" if r.get("hidden_at") else "")
            out.append(f"| {r['name']} | {r['model']} | `{r['plan']}` | {r['steps']} | {r['lr']:g} ({r['reducer_lr']:g}) | "
                       f"{mse} | {_pct(r['before']['all'])} | {_pct(a['all'])} | {kinds} | "
                       f"{r['train_s']:.0f} | {r['predicted_decoder_speedup']:.2f}x |")
        out += ["", "Hidden MSE: `last` = the last position after every decoder layer (bench/victor_study.py's own "
                "pairing); `kept` = `graphred.train`'s default (`graphred.training.kept_hidden`: every kept text "
                "position after every layer past the drop, each layer divided by the teacher's RMS)."]
        for m in dict.fromkeys(r["model"] for r in study):
            runs = [r for r in study if r["model"] == m]
            vic = [r for r in runs if r["plan"].startswith("victor")]
            if not vic:
                continue
            fast = [r for r in vic if r["predicted_decoder_speedup"] >= 3]  # the speed bar
            best = max(fast or vic, key=lambda r: r["after"]["all"])
            same = ("steps", "batch", "lr", "schedule", "warmup", "seed")  # the same budget, unreduced
            ref = [r for r in runs if r["plan"] == "none" and all(r[k] == best[k] for k in same)]
            unreduced = [r["acc_unreduced"] for r in rows if r["model"] == m and r.get("acc_unreduced") is not None]
            base = ref[0]["before"]["all"] if ref else (unreduced[0] if unreduced else None)
            line = (f"On {m} the most accurate fine-tuned Victor here{' at >= 3x predicted decoder speedup' if fast else ''}"
                    f" is `{best['plan']}` ({best['name']}): "
                    f"{_pct(best['after']['all'])}")
            def rel(d: float) -> str:
                return f"{abs(100 * d):.1f} points {'below' if d < 0 else 'above'}"
            if base is not None:
                line += f", {rel(best['after']['all'] - base)} the unreduced model"
            if ref:
                line += f", {rel(best['after']['all'] - ref[0]['after']['all'])} it after the same fine-tune"
            out += ["", line + f", at {best['predicted_decoder_speedup']:.2f}x predicted for the decoder."]
    out += depth_markdown(rows)
    out += probes_markdown(study)
    out.append(f"<!-- {MARK}:end -->")
    return "\n".join(out)


#: the paper's setting: LLaVA-1.5-7B's decoder depth (docs/cost-model.md, from its config.json) and image tokens
#: (/work/shared/DESIGN.md); Victor's registers (ALGORITHMS.md: 8, about 1% of the visual tokens)
PAPER_LAYERS, PAPER_IMAGE_TOKENS, PAPER_REGISTERS = 32, 576, 8


def decoder_layers(name: str) -> int:
    """The decoder depth of the trained model ``name`` (its shipped config)."""
    return int(models.metadata(name)["config"]["text_config"]["num_hidden_layers"])


def depth_markdown(rows: list[dict]) -> list[str]:
    """Why a deeper decoder is the fair test of Victor's 3x claim: the share of decoder layers left over a
    short sequence at a drop layer that predicts >= 3x, per trained model with a Victor row."""
    deep = [r for r in rows if r["model"] in models.MODEL_NAMES_V2_DEEP and r.get("acc_unreduced") is not None]
    shallow = [r for r in rows if r["model"] in models.MODEL_NAMES_V2 and r.get("acc_unreduced") is not None]
    if not deep or not shallow:
        return []
    s, d = shallow[0], deep[0]
    ls, ld = decoder_layers(s["model"]), decoder_layers(d["model"])
    k_paper = 2  # the drop layer the project's llava-bench target uses; the paper's k is "the first few layers"
    share = lambda layer, n: f"{n - layer} of {n} layers ({100 * (n - layer) / n:.0f}%)"  # noqa: E731
    ok = lambda c: "met" if c else "**missed**"  # noqa: E731

    def gap(r):
        ref = r.get("acc_unreduced_finetuned")
        return 100 * (r["acc_unreduced"] - r["acc_victor"]), (None if ref is None else 100 * (ref - r["acc_victor"]))

    gs, gd = gap(s), gap(d)
    below = lambda g: f"{abs(g):.1f} points {'below' if g >= 0 else 'above'}"  # noqa: E731
    fast = [c["layer"] for c in s.get("ceiling") or [] if c["registers"] == s["registers"]
            and c["predicted_decoder_speedup"] >= 3]
    kept = [c["predicted_decoder_speedup"] for c in s.get("ceiling") or [] if c["registers"] == s["registers"]
            and c["layer"] >= 2]
    para = (f"Why {d['model']} is the fair test. In the paper's setting (LLaVA-1.5-7B: {PAPER_LAYERS} decoder layers "
            f"(docs/cost-model.md), {PAPER_IMAGE_TOKENS} image tokens, {PAPER_REGISTERS} registers, "
            f"{100 * PAPER_REGISTERS / PAPER_IMAGE_TOKENS:.1f}% of them) the registers summarise the image in the first "
            f"few decoder layers and the rest run over registers and text only: a drop at layer {k_paper} leaves "
            f"{share(k_paper, PAPER_LAYERS)} short. {s['model']} has {ls} decoder layers: its Victor-{s['registers']} "
            f"plans that predict >= 3x for the decoder drop the image at layer "
            f"{', '.join(str(k) for k in fast) or 'none'} ({s['predicted_decoder_speedup']:.2f}x at layer "
            f"{s['layer']}), so layer 0 alone reads the image and {share(s['layer'], ls)} run short, while the probes "
            f"below show the left relation read into the class word by layer 1"
            + (f"; kept through layer 1, Victor-{s['registers']} predicts at most {max(kept):.2f}x there" if kept else "")
            + f". {d['model']} has the same data, vision tower and training recipe (for fewer steps: below) with {ld} decoder layers, so "
            f"`victor:registers={d['registers']},layer={d['layer']}` keeps {d['layer']} layers over the image and still "
            f"predicts {d['predicted_decoder_speedup']:.2f}x for the decoder ({share(d['layer'], ld)} short). "
            f"On it Victor-{d['registers']} fine-tuned is {below(gd[0])} the unreduced model"
            + ("" if gd[1] is None else f" ({below(gd[1])} it after the same fine-tune)")
            + f": within 4 points {ok(gd[0] <= 4 and (gd[1] is None or gd[1] <= 4))}. This does not undo the "
            f"{s['model']} result: there the target stays {ok(gs[0] <= 4)} ({below(gs[0])} the unreduced model at "
            f"{s['predicted_decoder_speedup']:.2f}x).")
    acc_gap = 100 * (s["acc_unreduced"] - d["acc_unreduced"])
    steps = [models.metadata(r["model"])["training"]["steps"] for r in (s, d)]
    para += (f" Training: {steps[1]} steps for {d['model']}, {steps[0]} for {s['model']}; unreduced "
             f"{_pct(d['acc_unreduced'])} against {_pct(s['acc_unreduced'])}"
             + (f", {acc_gap:.1f} points lower, so its fine-tunes start from a weaker model." if acc_gap > 2 else "."))
    return ["", para]


def probes_markdown(study: list[dict]) -> list[str]:
    """Where the ``left`` answer is in the model: linear probes (bench/victor_study.py ``left_probe``) on
    the unreduced model (docs/results/victor_probes.json) and on fine-tuned Victor modules (study rows
    run with ``--probe``)."""
    base = json.loads(PROBES.read_text()) if PROBES.exists() else None
    runs = [r for r in study if r.get("left_probe")]
    if not base and not runs:
        return []
    out = ["", "Where the answer to `left` (\"what is left of the X ?\") lives: test accuracy of a linear probe "
           "(fitted on 1500 training scenes, scored on the 300 test scenes' left questions; hidden state 0 = the "
           "decoder's input, state i = after decoder layer i-1):", "",
           ]
    labelled = ([(f"{base['model']} unreduced", base)] if base else []) + \
        [(f"{r['model']} `{r['plan']}` fine-tuned ({r['name']})", r["left_probe"]) for r in runs]
    cols = list(dict.fromkeys(k for _, res in labelled for k in res
                              if k not in ("prior", "test_questions", "model", "module")))
    short = [c.replace("class word, hidden state ", "class word, state ").replace(
        "object's image token, hidden state ", "object's image token, state ") for c in cols]
    out += ["| module | answer prior | " + " | ".join(short) + " |", "|---|---:|" + "---:|" * len(cols)]
    for label, res in labelled:
        out.append(f"| {label} | {_pct(res['prior'])} | " + " | ".join(_pct(res.get(c)) or "dropped" for c in cols) + " |")
    if base:
        word0 = base.get("class word, hidden state 1")
        word1 = base.get("class word, hidden state 2")
        cell_in = base.get("object's image token, hidden state 0")
        cell0 = base.get("object's image token, hidden state 1")
        out += ["", f"In the unreduced model no token entering the decoder carries the left relation (the asked-about "
                f"object's image token at the decoder's input: {_pct(cell_in)}, prior {_pct(base['prior'])}); decoder "
                f"layer 0 writes it into the image tokens ({_pct(cell0)} after layer 0), and layer 1 reads it into the "
                f"class word ({_pct(word0)} after layer 0, {_pct(word1)} after layer 1). Victor with layer=1 drops the "
                "image where layer 1 begins, so a Victor model answers `left` only if the vision tower learns to put "
                "the left neighbour into each image token *and* layer 0 learns to read it, in the same fine-tune."]
    early = [r for r in runs if "object's image token, hidden state 1" not in r["left_probe"]]  # dropped at layer 1
    later = [r for r in runs if r not in early]
    if early:
        tower = [r["left_probe"].get("object's image token, hidden state 0") for r in early]
        word = [r["left_probe"].get("class word, hidden state 1") for r in early]
        longest = max(r["steps"] for r in early)
        out += ["", f"Measured after the probed fine-tunes of plans that drop the image at layer 1 (up to {longest} "
                f"steps): the object's image token at the decoder's input holds the left neighbour at "
                f"{_pct(min(tower))}-{_pct(max(tower))} and the class word after layer 0 at {_pct(min(word))}-"
                f"{_pct(max(word))} (prior {_pct(early[0]['left_probe']['prior'])}): neither the answer loss and KL nor "
                "the hidden-state distillation taught the tower the new relation."]
    for r in later:
        out += ["", f"Control, `{r['plan']}` ({r['name']}; the image kept through layer 1, "
                f"{r['predicted_decoder_speedup']:.2f}x predicted for the decoder): `left` {_pct(r['before'].get('left'))} "
                f"untrained, {_pct(r['after'].get('left'))} after {r['steps']} steps, all questions "
                f"{_pct(r['after']['all'])}; the class word after layer 1 holds the answer at "
                f"{_pct(r['left_probe'].get('class word, hidden state 2'))}."]
    return out


def load_rows() -> list[dict]:
    """The rows of docs/results/victor.json (one per model; an older single-model file becomes its rows)."""
    if not RESULTS.exists():
        return []
    data = json.loads(RESULTS.read_text())
    if isinstance(data, list):
        return data
    return [data]  # pre-list format: a single row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="vqa-llava", help="a trained VQA model (graphred.data.models), e.g. vqa-llava")
    ap.add_argument("--registers", type=int, default=8)
    ap.add_argument("--layer", type=int, default=1)
    ap.add_argument("--steps", type=int, default=RECIPE["steps"])
    ap.add_argument("--batch", type=int, default=RECIPE["batch"])
    ap.add_argument("--lr", type=float, default=RECIPE["lr"])
    ap.add_argument("--reducer-lr", type=float, default=RECIPE["reducer_lr"])
    ap.add_argument("--schedule", default=RECIPE["schedule"])
    ap.add_argument("--warmup", type=int, default=RECIPE["warmup"])
    ap.add_argument("--hidden-mse", type=float, default=RECIPE["hidden_mse"])
    ap.add_argument("--hidden-at", default="kept", choices=("kept", "last"),
                    help="with --hidden-mse: graphred.train's kept-position pairing, or the last position only")
    ap.add_argument("--no-fair", action="store_true", help="skip fine-tuning the unreduced model with the same budget")
    ap.add_argument("--no-reuse", action="store_true",
                    help="fine-tune even when docs/results/victor_study.json holds the same fine-tune")
    ap.add_argument("--bench-model", default="llava-bench", help="a zoo model for a speed-only row ('' to skip)")
    ap.add_argument("--bench-layer", type=int, default=2)
    ap.add_argument("--limit", type=int, default=1200)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--markdown-only", action="store_true", help="rewrite the docs section from the JSON files")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = load_rows()
    new = []
    if not args.markdown_only:
        recipe = {"steps": args.steps, "batch": args.batch, "lr": args.lr, "reducer_lr": args.reducer_lr,
                  "schedule": args.schedule, "warmup": args.warmup, "hidden_mse": args.hidden_mse}
        if args.hidden_mse:
            recipe["hidden_at"] = args.hidden_at
        new.append(vqa(args.model, args.registers, args.layer, recipe, args.limit, args.rounds, not args.no_fair,
                       not args.no_reuse))
        if args.bench_model:
            new.append(bench(args.bench_model, 8, args.bench_layer, args.rounds))
    names = {r["model"] for r in new}
    rows = [r for r in rows if r["model"] not in names] + new
    study = json.loads(STUDY.read_text()) if STUDY.exists() else []
    if not args.no_write and new:
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(json.dumps(rows, indent=2) + "\n")
    publish(to_markdown(rows, study), MARK, rows, "bench_victor.json", write=not args.no_write)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
