"""Accuracy against speed at equal kept tokens on the ``vqa2-*`` models (cluttered 224 px scenes, 196
image tokens, graphred.data.scenes2), where the answer sits in a few of the 196 patches.

    python bench/bench_vqa2.py                     # all three models: docs/results/vqa.json, docs/benchmarks.md, docs/img/
    python bench/bench_vqa2.py --models vqa2-llava --scenes 50 --no-write
    python bench/bench_vqa2.py --plot-only         # the figures again from docs/results/vqa.json

Methods, every one at the same layers and ratios where it prunes (equal kept image tokens):
PuMer prune only and prune + merge (text-informed), the text-agnostic baselines ``random`` and ``norm``
(graphred.plans.prune), FastV (decoder), ToMe (vision towers), Victor training-free (decoder), and an
**oracle**: keep the patches of the object asked about (the cells the answer is read from,
``SceneSet2.relevant_cells``), filled up with random other patches to the same count as PuMer keeps
in the end, dropped from the first cross-modal layer on (by attention mask: the text never sees the
others). The oracle is a bound on selection, not a runtime method: it has no speedup.

Accuracy on test scenes 0..N-1 (default 200 scenes, 800 questions; the models saw no test scene).
Speed: one batch, unreduced and reduced runs alternating in one process, medians (graphred.measure),
1 thread by default; predicted = graphred.estimate. CPU.
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
warnings.filterwarnings("ignore")

import graphred  # noqa: E402
from graphred.data import models, scenes2  # noqa: E402
from graphred.measure import median_times  # noqa: E402
from graphred.plans import fastv, prune, pumer, tome, victor  # noqa: E402
from _common import write_section  # noqa: E402

MARK = "bench_vqa2"
RATIOS = (0.3, 0.5, 0.7)
RESULTS = ROOT / "docs" / "results" / "vqa.json"
EARLY = " from layer 0"  # the method suffix of the decoder rows that prune from layer 0 on


def plans_for(name: str) -> list[tuple[str, object, float | None]]:
    """(method, plan, prune ratio or None). Baselines prune at PuMer's layers and ratios."""
    fam = models.family(name)
    out = []
    for p in RATIOS:
        out.append(("pumer", pumer(prune=p, merge=0.0, layers="from:1"), p))
        out.append(("pumer+merge", pumer(prune=p, merge=0.2, layers="from:1"), p))
        out.append(("random", prune(ratio=p, layers="from:1", scorer="random"), p))
        out.append(("norm", prune(ratio=p, layers="from:1", scorer="norm"), p))
    if fam == "llava":
        # the same comparison with pruning from layer 0 on (after the first layer's attention), where the
        # decoder still reads the image in layer 1
        for p in (0.3, 0.5):
            out.append((f"pumer{EARLY}", pumer(prune=p, merge=0.0, layers="from:0"), p))
            out.append((f"pumer+merge{EARLY}", pumer(prune=p, merge=0.2, layers="from:0"), p))
            out.append((f"random{EARLY}", prune(ratio=p, layers="from:0", scorer="random"), p))
            out.append((f"norm{EARLY}", prune(ratio=p, layers="from:0", scorer="norm"), p))
        out += [("fastv", fastv(layer=1, keep=k), None) for k in (0.5, 0.25, 0.125)]
        out += [("victor", victor(registers=r, layer=2), None) for r in (8, 16)]
    elif fam == "blip":
        out += [("tome", tome(r=r), None) for r in (24, 48)]
    # ViLT: no ToMe rows. ToMe merges inside an image-only attention stack (a vision tower); ViLT's single
    # stream has none (graphred refuses the plan with "no image-only attention stack"), see TOME_VILT
    return out


TOME_VILT = ("No ToMe rows: ToMe merges image tokens inside an image-only attention stack (a vision tower), "
             "and single-stream ViLT has none — its image tokens enter the one encoder together with the text "
             "— so graphred refuses `tome:...` here (\"no image-only attention stack (vision tower) was found "
             "in the graph\"). PuMer's merge is the merging method for this architecture.")


# --------------------------------------------------------------------------------------------
# The oracle: keep the asked-about object's patches (by attention mask), per architecture
# --------------------------------------------------------------------------------------------


def oracle_keep(data: scenes2.SceneSet2, q: scenes2.Question, keep: int, seed: int) -> list[int]:
    """``keep`` cells: those the answer is read from, then random others (seeded per question)."""
    rel = [c for c in dict.fromkeys(data.relevant_cells(q))][:keep]
    rest = [c for c in range(scenes2.NUM_CELLS) if c not in rel]
    random.Random(seed).shuffle(rest)
    return sorted(rel + rest[: keep - len(rel)])


@torch.no_grad()
def oracle_accuracy(model, name: str, tok, data: scenes2.SceneSet2, keep: int, batch: int) -> float:
    fam = models.family(name)
    hits = 0
    qs = data.questions
    torch.manual_seed(0)
    for start in range(0, len(qs), batch):
        bq = qs[start: start + batch]
        kw = models.build_inputs(name, tok, data, bq)
        drop = torch.ones(len(bq), scenes2.NUM_CELLS, dtype=torch.bool)
        for i, q in enumerate(bq):
            drop[i, oracle_keep(data, q, keep, start + i)] = False
        if fam == "llava":
            mask = kw["attention_mask"].clone()
            img = kw["input_ids"] == tok.image_id  # (B, L): 196 per row, in cell order
            pos = img.nonzero()[:, 1].view(len(bq), scenes2.NUM_CELLS)
            mask.scatter_(1, pos, (~drop).long())
            kw["attention_mask"] = mask
            out = model(**kw)
        elif fam == "vilt":
            out = _vilt_masked(model, kw, drop)
        else:
            image = model.vision_model(pixel_values=kw["pixel_values"]).last_hidden_state
            att = torch.cat([torch.ones(len(bq), 1, dtype=torch.long), (~drop).long()], 1)
            text = model.text_encoder(input_ids=kw["input_ids"], attention_mask=kw["attention_mask"],
                                      encoder_hidden_states=image, encoder_attention_mask=att).last_hidden_state
            out = model.answer_head(text[:, 0])
        pred = models.answer_logits(name, out, tok).argmax(-1)
        truth = torch.tensor([tok.answer_index(q.answer) for q in bq])
        hits += int((pred == truth).sum())
    return hits / len(qs)


def _vilt_masked(model, kw: dict, drop: torch.Tensor):
    """ViLT with the image tokens of the cells ``drop`` ``(B, 196)`` masked off as keys for every query
    (text and image alike; each token still sees itself), in every layer. Its ``pixel_mask`` cannot do
    this: ViLT reads it as the image's size. ViLT samples its patches in a random order: the cell of
    each token is read from ``visual_embed``."""
    emb = model.vilt.embeddings
    original = emb.visual_embed
    seen = {}

    def visual_embed(*args, **kwargs):
        x, x_mask, (patch_index, hw) = original(*args, **kwargs)
        seen["cell"] = patch_index[..., 0] * scenes2.GRID + patch_index[..., 1]
        return x, x_mask, (patch_index, hw)

    def pre(mod, args, kwargs):
        args = list(args)
        mask = args[1] if len(args) > 1 else kwargs["attention_mask"]  # (B, 1, 1, L) additive
        length = mask.shape[-1]
        n = scenes2.NUM_CELLS
        cols = torch.zeros(mask.shape[0], length, dtype=torch.bool)
        cols[:, -n:] = drop.gather(1, seen["cell"])
        full = mask.expand(mask.shape[0], 1, length, length).clone()
        cut = cols[:, None, None, :] & ~torch.eye(length, dtype=torch.bool)[None, None]
        full = full.masked_fill(cut, torch.finfo(full.dtype).min)
        if len(args) > 1:
            args[1] = full
        else:
            kwargs["attention_mask"] = full
        return tuple(args), kwargs

    emb.visual_embed = visual_embed
    hooks = [layer.register_forward_pre_hook(pre, with_kwargs=True) for layer in model.vilt.encoder.layer]
    try:
        return model(**kw)
    finally:
        del emb.visual_embed  # the bound method of the class again
        for h in hooks:
            h.remove()


# --------------------------------------------------------------------------------------------


def run_model(name: str, n_scenes: int, batch: int, rounds: int, weights: str | None = None) -> list[dict]:
    model, tok = models.load_trained(name, weights)
    data = scenes2.generate("test", n_scenes)
    n = len(data.questions)
    example = models.build_inputs(name, tok, data, data.questions[:batch])
    prog = graphred.capture(model, **example)
    t0 = time.perf_counter()
    base = models.evaluate(prog, name, data, batch, tokenizer=tok)
    rows = [{"model": name, "method": "unreduced", "plan": "-", "ratio": None,
             "image_tokens_left": models.image_tokens(name), "accuracy": round(base, 4), "measured_speedup": 1.0,
             "predicted_speedup": 1.0, "questions": n}]
    print(f"[{name}] unreduced {100 * base:.1f}% on {n} questions ({time.perf_counter() - t0:.0f}s)", flush=True)
    kept_at: dict[float, int] = {}
    for method, plan, ratio in plans_for(name):
        t0 = time.perf_counter()
        try:
            fast = graphred.transform(prog, plan)
        except graphred.GraphredError as e:
            print(f"[{name}] {plan}: {str(e).splitlines()[0][:200]}", flush=True)
            rows.append({"model": name, "method": method, "plan": str(plan), "ratio": ratio, "image_tokens_left": None,
                         "accuracy": None, "measured_speedup": None, "predicted_speedup": None,
                         "error": str(e).splitlines()[0][:200]})
            continue
        acc = models.evaluate(fast, name, data, batch, tokenizer=tok)
        tb, tf = median_times(prog, fast, example, rounds)
        est = graphred.estimate(prog, plan)
        img = [s.get("image_after") for s in fast.steps if s.get("image_after") is not None]
        left = img[-1] if img else (plan.steps[0].registers if method == "victor" else None)
        if method == "pumer" and left is not None:
            kept_at[ratio] = int(left)
        rows.append({"model": name, "method": method, "plan": str(plan), "ratio": ratio, "image_tokens_left": left,
                     "accuracy": round(acc, 4), "measured_speedup": round(tb / tf, 3),
                     "predicted_speedup": round(float(est.speedup), 3), "questions": n})
        print(f"[{name}] {method:12s} {str(plan):45s} left {left}  acc {100 * acc:.1f}%  measured {tb / tf:.2f}x  "
              f"predicted {float(est.speedup):.2f}x ({time.perf_counter() - t0:.0f}s)", flush=True)
    for ratio, left in sorted(kept_at.items()):
        acc = oracle_accuracy(model, name, tok, data, left, batch)
        rows.append({"model": name, "method": "oracle", "plan": f"keep the asked-about object's patches ({left})",
                     "ratio": ratio, "image_tokens_left": left, "accuracy": round(acc, 4), "measured_speedup": None,
                     "predicted_speedup": None, "questions": n})
        print(f"[{name}] oracle       keep {left:3d} (as pumer prune {ratio})  acc {100 * acc:.1f}%", flush=True)
    return rows


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------


def pareto_png(rows: list[dict], name: str, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)", file=sys.stderr)
        return False
    mine = [r for r in rows if r["model"] == name and r.get("accuracy") is not None]
    base = next(r for r in mine if r["method"] == "unreduced")
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4.2))
    for a in (ax, bx):
        a.axhline(100 * base["accuracy"], color="black", lw=0.8, ls=":", label="unreduced")
    methods = [m for m in dict.fromkeys(r["method"] for r in mine) if m != "unreduced"]
    for m in methods:
        pts = sorted((r["measured_speedup"], 100 * r["accuracy"]) for r in mine
                     if r["method"] == m and r["measured_speedup"] is not None)
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=m)
        else:
            ax.plot([], [], marker="o")  # keep the colours of the two panels in step
        pts = sorted((r["image_tokens_left"], 100 * r["accuracy"]) for r in mine
                     if r["method"] == m and r["image_tokens_left"] is not None)
        bx.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=m,
                ls="--" if m == "oracle" else "-")
    ax.set_xlabel("measured speedup vs unreduced (CPU, 1 thread, same run)")
    ax.set_ylabel("test accuracy (%)")
    bx.set_xlabel(f"image tokens left (of {models.image_tokens(name)})")
    bx.set_xscale("log")
    ax.set_title(f"{name}: accuracy vs speed")
    bx.set_title(f"{name}: accuracy vs kept image tokens")
    for a in (ax, bx):
        a.grid(alpha=0.3)
    bx.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def verdicts(rows: list[dict], name: str) -> list[str]:
    mine = [r for r in rows if r["model"] == name and r.get("accuracy") is not None]
    base = next(r["accuracy"] for r in mine if r["method"] == "unreduced")
    acc = {(r["method"], r["ratio"]): r for r in mine if r["ratio"] is not None}
    out = []
    for p in RATIOS:
        try:
            t, ra, no = (acc[(m, p)] for m in ("pumer", "random", "norm"))
        except KeyError:
            continue
        orc = acc.get(("oracle", p))
        dr, dn = 100 * (t["accuracy"] - ra["accuracy"]), 100 * (t["accuracy"] - no["accuracy"])
        met = "met" if (dr >= 3 and dn >= 3) else "**missed**"
        out.append(f"- prune {p:g} ({t['image_tokens_left']} image tokens left): PuMer {100 * t['accuracy']:.1f}% vs random "
                   f"{100 * ra['accuracy']:.1f}% ({dr:+.1f}) vs norm {100 * no['accuracy']:.1f}% ({dn:+.1f})"
                   + (f"; oracle {100 * orc['accuracy']:.1f}%" if orc else "")
                   + (f" — target (>= 3 points above both at 0.5): {met}" if p == 0.5 else ""))
    for p in sorted({r["ratio"] for r in mine if r["method"].endswith(EARLY)}):
        early = {r["method"][: -len(EARLY)]: r for r in mine if r["method"].endswith(EARLY) and r["ratio"] == p}
        if not all(m in early for m in ("pumer", "random", "norm")):
            continue
        t, ra, no = early["pumer"], early["random"], early["norm"]
        dr, dn = 100 * (t["accuracy"] - ra["accuracy"]), 100 * (t["accuracy"] - no["accuracy"])
        out.append(f"- prune {p:g} from layer 0 ({t['image_tokens_left']} image tokens left): PuMer "
                   f"{100 * t['accuracy']:.1f}% vs random {100 * ra['accuracy']:.1f}% ({dr:+.1f}) vs norm "
                   f"{100 * no['accuracy']:.1f}% ({dn:+.1f})"
                   + (f" — {'met' if dr >= 3 and dn >= 3 else '**missed**'} (>= 3 points above both)"
                      if p == 0.5 else ""))
    fast = [r for r in mine if r["method"].split(" from")[0] in ("pumer", "pumer+merge")
            and (r["predicted_speedup"] or 0) >= 1.8]
    if fast:
        best = max(fast, key=lambda r: r["accuracy"])
        d = 100 * (base - best["accuracy"])
        out.append(f"- best PuMer plan at >= 1.8x predicted: `{best['plan']}` at {best['predicted_speedup']:.2f}x, "
                   f"{d:.1f} points below unreduced ({'within' if d <= 3 else '**outside**'} the 3-point target)")
    else:
        out.append("- no PuMer plan here reaches 1.8x predicted")
    for r in mine:
        if r["method"].endswith("fine-tuned"):
            d = 100 * (base - r["accuracy"])
            ok = d <= 1 and r["predicted_speedup"] >= 2
            out.append(f"- fine-tuned with the reducers in place ({r['finetune']['steps']} steps, "
                       f"{r['finetune']['seconds'] / 60:.0f} min): `{r['plan']}` at {r['predicted_speedup']:.2f}x predicted, "
                       f"{100 * r['training_free_accuracy']:.1f}% -> {100 * r['accuracy']:.1f}%, "
                       f"{abs(d):.1f} points {'below' if d >= 0 else 'above'} unreduced (target >= 2x within 1 point: {'met' if ok else '**missed**'})")
    ratios = [r["measured_speedup"] / r["predicted_speedup"] for r in mine
              if r["method"] not in ("unreduced", "oracle") and r["predicted_speedup"]]
    if ratios:
        out.append(f"- measured / predicted: min {min(ratios):.2f}, median {statistics.median(ratios):.2f} "
                   f"({sum(x >= 0.85 for x in ratios)}/{len(ratios)} plans >= 0.85)")
    return out


DIAGNOSIS = ROOT / "docs" / "results" / "vqa2_diagnosis.json"


def _pct(x) -> str:
    return f"{100 * x:.1f}%"


def _kinds(d: dict) -> str:
    return ", ".join(f"{k} {100 * d[k]:.0f}%" for k in ("where", "exists", "count", "left") if k in d)


def diagnosis_lines(rows: list[dict]) -> list[str]:
    """Why the remaining misses miss, from bench/vqa2_diagnose.py's measurements (docs/results/vqa2_diagnosis.json)."""
    if not DIAGNOSIS.exists():
        return []
    import re

    d = json.loads(DIAGNOSIS.read_text())
    out = ["#### Why the misses miss (bench/vqa2_diagnose.py)", "",
           f"Measurements on test scenes 0..99 (400 questions), {d.get('note', '')}.", ""]
    cut = d.get("cut", {})
    if cut:
        out += ["**Text-informed vs random from layer 1** — how much of the answer still sits in the image tokens "
                "where a `layers=from:1` plan prunes: the accuracy when the text cannot read *any* image token from "
                "layer k on (decoder and ViLT: the text rows masked off the image columns; BLIP: the cross-attention "
                "of those layers skipped), against PuMer, random and norm at prune 0.5, by question kind:", ""]
    for name, c in cut.items():
        u = c["unreduced"]
        blind = c["text_blind_to_image_from_layer"]
        steps = c.get("from1_steps") or []
        first = steps[0].get("block", "") if steps else ""
        idx = [int(x) for x in re.findall(r"\.(\d+)\.", f".{first}.")]
        k_star = str(idx[-1] + 1) if idx else None
        plans = c.get("plans_at_0.5", {})
        pu, ra, no = (plans.get(f"{m}layers=from:1") for m in ("pumer:prune=0.5,merge=0,",
                                                                "prune:ratio=0.5,scorer=random,",
                                                                "prune:ratio=0.5,scorer=norm,"))
        line = (f"- {name} (unreduced {_pct(u['all'])}: {_kinds(u)}): text blind to the image from layer k: "
                + "; ".join(f"k={k} {_pct(v['all'])}" for k, v in blind.items()) + ".")
        if k_star is not None and k_star in blind and pu and ra and no:
            b = blind[k_star]
            need = ra["all"] + 0.03
            line += (f" The plan scores at `{first}` and prunes after it, so layers >= {k_star} see fewer image "
                     f"tokens; with none there the model keeps {_pct(b['all'])} ({_kinds(b)}): "
                     f"{100 * (u['all'] - b['all']):.1f} points depend on the kept tokens at all. At prune 0.5: "
                     f"PuMer {_pct(pu['all'])} ({_kinds(pu)}), random {_pct(ra['all'])} ({_kinds(ra)}), norm "
                     f"{_pct(no['all'])} ({_kinds(no)}). Counting answers, mean signed error in objects: PuMer "
                     f"{pu.get('count_bias', 0):+.2f}, random {ra.get('count_bias', 0):+.2f}, norm "
                     f"{no.get('count_bias', 0):+.2f}, unreduced {u.get('count_bias', 0):+.2f}. "
                     f"3 points above random would be {_pct(need)}, ")
            if need > u["all"]:
                line += (f"{100 * (need - u['all']):.1f} points **above the unreduced model**: random pruning from "
                         f"layer 1 loses only {100 * (u['all'] - ra['all']):.1f} points, so no selection of kept "
                         "tokens from layer 1 can win 3 points over it — this is the reason for the miss (the "
                         "grounded early layers have read the asked-about object before layer "
                         f"{k_star}; only what is still read there, mostly `count`, is at stake). The oracle rows "
                         "can beat the unreduced model because they act from the first cross-modal layer on.")
            else:
                line += "below the unreduced model: selection has the headroom here."
        out.append(line)
    if cut:
        out.append("")
    early = (cut.get("vqa2-llava") or {}).get("plans_at_0.5", {})
    pu0 = early.get("pumer:prune=0.5,merge=0,layers=from:0")
    llava = [r for r in rows if r["model"] == "vqa2-llava" and r.get("predicted_speedup")]
    from1 = [r for r in llava if r["method"] in ("pumer", "pumer+merge")]
    base = next((r["accuracy"] for r in llava if r["method"] == "unreduced"), None)
    if pu0 and from1 and base is not None:
        top = max(from1, key=lambda r: r["predicted_speedup"])
        out += [f"**PuMer at >= 1.8x within 3 points, training-free** — on the decoder the `from:1` plans top out at "
                f"{top['predicted_speedup']:.2f}x predicted (`{top['plan']}`, {top['image_tokens_left']} image "
                "token(s) left after layer 3): the vision tower and decoder layers 0-1 run at full size whatever is "
                "pruned, so 1.8x from layer 1 means dropping nearly every image token, and the text blind to the "
                f"image from layer 2 is {_pct(cut['vqa2-llava']['text_blind_to_image_from_layer']['2']['all'])}. "
                f"From layer 0, `pumer:prune=0.5,merge=0,layers=from:0` scores {_pct(pu0['all'])} ({_kinds(pu0)}; "
                f"count bias {pu0.get('count_bias', 0):+.2f}) against {_pct(cut['vqa2-llava']['unreduced']['all'])} "
                f"unreduced ({_kinds(cut['vqa2-llava']['unreduced'])}) in this run: the points are lost on `count` "
                "alone, which reads the image tokens in every decoder layer (text blind from layer 1, 2, 3: count "
                + ", ".join(f"{100 * cut['vqa2-llava']['text_blind_to_image_from_layer'][k]['count']:.0f}%"
                            for k in ("1", "2", "3"))
                + f"), and text-informed pruning shifts the counts up (mean signed error {pu0.get('count_bias', 0):+.2f} "
                f"against random's {(early.get('prune:ratio=0.5,scorer=random,layers=from:0') or {}).get('count_bias', 0):+.2f}), "
                "as expected if the count is read as the asked-about object's share of the attention: the kept tokens "
                "are the ones the class word attends to, so that share grows. The fine-tune with the "
                "reducers in place recovers it (rows `... fine-tuned`)."]
        for name in ("vqa2-blip", "vqa2-vilt"):
            mine = [r for r in rows if r["model"] == name and r["method"] in ("pumer", "pumer+merge")
                    and r.get("predicted_speedup")]
            towers = (d.get("towers", {}).get(name) or {}).get("by_tower", {})
            tower = sum(t["share"] for t in towers.values() if t["modalities"] == ["image"])
            if mine:
                top = max(mine, key=lambda r: r["predicted_speedup"])
                out[-1] += (f" {name}: the fastest PuMer plan is predicted at {top['predicted_speedup']:.2f}x "
                            f"(`{top['plan']}`, {top['image_tokens_left']} image token(s) left)"
                            + (f" — the image tower, which no text-informed plan can shrink (it runs before the "
                               f"text is read), is {100 * tower:.0f}% of its predicted FLOPs, and most of the rest is "
                               "the text's own work, so neither 1.8x training-free nor 2x fine-tuned is within reach of "
                               "PuMer on this architecture (a fine-tune cannot change a FLOP ratio)."
                               if top["predicted_speedup"] < 1.8 and tower else ""))
                blind = (cut.get(name) or {}).get("text_blind_to_image_from_layer", {})
                base_m = next((r["accuracy"] for r in rows if r["model"] == name and r["method"] == "unreduced"), None)
                if top["predicted_speedup"] >= 1.8 and "2" in blind and base_m is not None:
                    out[-1] += (f" at {_pct(top['accuracy'])}, {100 * (base_m - top['accuracy']):.1f} points below "
                                "unreduced: 1.8x from layer 1 means almost no image token left after layer 1, and "
                                f"this model still reads them in layers 2-3 (text blind to the image from layer 2: "
                                f"{_pct(blind['2']['all'])}; from layer 3: {_pct(blind['3']['all'])}).")
                elif top["predicted_speedup"] >= 1.8:
                    out[-1] += "."
        out.append("")
    prof = d.get("profile")
    if prof:
        fc = prof.get("fixed_cost", {})
        out += ["**Measured / predicted on the decoder** — torch.profiler at "
                f"{prof['threads']} thread(s), batch {prof['batch']}, per plan: the share of the reduced run's time "
                "spent in graphred's own ops (`graphred::*`: attention scoring, selection, gathers, bipartite "
                "matching, merges) against their share of the predicted FLOPs (`Estimate.added_flops`), and the "
                "measured / predicted ratio had those ops taken only their FLOP share of the predicted time. The "
                "unreduced model's time is linear in the batch with no fixed part to speak of "
                f"({fc.get('seconds_batch10', 0):.3f} s at 10 questions, {fc.get('seconds_batch50', 0):.3f} s at 50: "
                f"{fc.get('fixed_seconds', 0) * 1e3:+.0f} ms extrapolated to 0), so per-call overhead is not the "
                "gap.", "",
                "| plan | predicted | measured | measured / predicted | graphred ops: time share | FLOP share | "
                "measured / predicted with the ops at their FLOP share | graphred ops, ms per call |",
                "|---|---:|---:|---:|---:|---:|---:|---|"]
        for r in prof["rows"]:
            ex = ", ".join(f"{k.replace('graphred::', '')} {v:.0f}" for k, v in r["graphred_ops"].items())
            out.append(f"| `{r['plan']}` | {r['predicted']:.2f}x | {r['measured']:.2f}x | "
                       f"{r['measured_over_predicted']:.2f} | {100 * r['graphred_ops_time_share']:.1f}% | "
                       f"{100 * r['graphred_ops_flop_share']:.2f}% | {r['ratio_if_ops_at_flop_share']:.2f} | {ex} |")
        out += ["", "The reason for the plans under 0.85: graphred's ops are index and memory work (gathers of the "
                "hidden states, keys and values, top-k, the merge's scatter-add) that the FLOP count prices at about "
                "1% of the reduced model but that take several times that share of its time on this CPU; the "
                "merge plans add the most of them (bipartite matching and merging after each pruning), so they "
                "fall furthest below. The cost model's predicted speedup is a FLOP ratio by definition "
                "(docs/cost-model.md); its `bytes_moved` is the figure that sees these ops.", ""]
    ft = d.get("finetune")
    if ft:
        out += [f"**The fine-tuned rows** (`{ft['plan']}`, predicted {ft['predicted']:.2f}x): the same plan's graph "
                f"timed before and after a 2-step `graphred.train`, in one run: {ft['training_free_batch50']:.2f}x "
                f"-> {ft['after_train_batch50']:.2f}x at batch 50 (the sweep's), {ft['training_free_batch40']:.2f}x "
                f"-> {ft['after_train_batch40']:.2f}x at batch 40 (bench_vqa2_finetune.py's); trained / training-free "
                f"seconds per call {ft['trained_over_training_free_seconds']:.2f}. "]
        tuned = [r for r in rows if r["model"] == "vqa2-llava" and r["method"].endswith("fine-tuned")
                 and r.get("predicted_speedup")]
        free = {r["plan"]: r for r in rows if r["model"] == "vqa2-llava" and r["method"].endswith(EARLY)
                and r.get("predicted_speedup")}
        swept = {r["plan"]: r["measured_speedup"] / r["predicted_speedup"] for r in rows
                 if r["model"] == "vqa2-llava" and r.get("predicted_speedup") and not r["method"].endswith("fine-tuned")}
        spread = max((abs(r["measured_over_predicted"] - swept[r["plan"]]) for r in (prof or {}).get("rows", [])
                      if r["plan"] in swept), default=0.0)
        if tuned:
            out[-1] += ("So training leaves the graph's speed as it was and the batch size moves the ratio by a few "
                        "hundredths; the fine-tuned rows' ratios (" + ", ".join(
                            f"`{r['plan']}` {r['measured_speedup'] / r['predicted_speedup']:.2f}"
                            + (f" vs {free[r['plan']]['measured_speedup'] / free[r['plan']]['predicted_speedup']:.2f}"
                               " training-free in the sweep" if r["plan"] in free else "") for r in tuned)
                        + ") are their plans' own ratios (the graphred ops above) plus run-to-run spread on this "
                        "loaded machine (the same plans measured in this diagnosis run differ from the sweep's by up "
                        "to " + f"{spread:.2f}" + ").")
        out.append("")
    return out


def to_markdown(rows: list[dict], threads: int) -> str:
    out = [f"<!-- {MARK}:start (written by bench/bench_vqa2.py; do not edit by hand) -->",
           "### Token choice that matters: cluttered 224 px scenes, 196 image tokens (CPU)", "",
           "The `vqa2-*` models (bench/train_models2.py) on graphred.data.scenes2: 8-14 small Fashion-MNIST "
           "objects among about 90 digit-clutter cells on a textured canvas; each question is about one class "
           "of object, whose answer sits in at most four of the 196 patches. All methods at the same layers "
           "and ratios (equal kept image tokens); `oracle` keeps the asked-about object's patches (filled up "
           "with random ones to PuMer's final count) from the first cross-modal layer on, by attention mask (ViLT: "
           "the other image tokens masked off as keys in every layer, since ViLT reads its pixel mask as the "
           "image's size) — "
           "a bound on selection, with no speedup. Training-free. Speed: one batch, alternating runs in one "
           f"process, {threads} thread(s), on a shared, loaded 2-core machine; predicted from `graphred.estimate`. "
           "Rows: docs/results/vqa.json.", "",
           "Training (bench/train_models2.py, seed 0, one thread; losses and test accuracy along the way; "
           "python bench/train_models2.py --plot draws it):", "", "![vqa2 training curves](img/train_vqa2.png)", "",
           "Recipe: from scratch, 196 image tokens, fresh scenes every step; auxiliary losses (discarded after "
           "training): a per-patch content probe, a description task (every class word followed by its count) "
           "and a **grounding loss**. First recipe (all three before issue 15's "
           "retraining): layer 0's answer query (decoder: the answer position; encoders: the text [CLS]) trained "
           "toward the asked-about object's cells, 400 steps of 64 questions; those models stayed near the answer "
           "prior. Diagnosis (bench/train_models2.py, figures from the first vqa2-llava and short runs): (1) in the "
           "decoder that loss is ill-posed: at layer 0 the answer position has not read the question (96% of its "
           "layer-0 image attention went to object cells, 16% to the asked-about one); (2) a linear probe read the "
           "left neighbour's content from 0% of the tower's object cells, so `left` was unanswerable; (3) once the "
           "question's class word attended to the object (76% of its layer-0 image attention), its state still "
           "carried the quadrant at chance (17.5%), because the image tokens entering the decoder had lost most of "
           "their position (58% by a linear probe, against 99% at the tower's output); (4) two OpenMP threads ran "
           "this model's matmuls 20x slower than one on this loaded machine, so training uses one. Second recipe: "
           "a stage 1 that trains the image tower alone on class-balanced per-patch probes (its content, its left "
           "neighbour's); the question's **class word** grounded toward the cells of its class (decoder: layers 0 "
           "and 1; BLIP keeps the [CLS] cross-attention of layer 0, which has read the question); for the decoder, "
           "probes on the image tokens inside it (their row and column at its input, their left neighbour's "
           "content after layer 0: a previous-token head in row-major order) and the answer read from the class "
           "word's state after layer 1; ViLT, a single stream with no separate tower: stage 1 trains its image "
           "embeddings and encoder layer 0 on the image alone (the same probes, plus each token's cell, on the image "
           "tokens after layer 0, where they stay during the VQA stage), the class word grounded at layers 1 and 2 "
           "(in the description task too), the text [CLS] trained to attend to the class word at layer 3, and the "
           "answer read from the class word's state after layer 2; 1000-2000 steps at one thread. A caveat for reading the tables: the "
           "grounding makes the early text-to-image attention point at the object, which is close to what "
           "text-informed scoring reads; the decoder rows `... from layer 0` prune from layer 0 on, before the "
           "layer-1 read.", "",
           "Each model's unreduced accuracy against the answer prior (about 35%) says how much its rows can tell: "
           "a model near the prior moves by about a point whatever is pruned, and its 'within 3 points' verdicts "
           "are vacuous.", ""]
    for name in dict.fromkeys(r["model"] for r in rows if r["model"] in models.MODEL_NAMES_V2):
        try:
            meta = models.metadata(name)
        except models.WeightsError:
            continue
        tr, acc = meta["training"], meta["accuracy"]
        prev = tr.get("previous_stage") or {}
        vis = tr.get("vision_stage") or {}
        steps = tr["steps"] + prev.get("steps", 0)
        secs = tr["train_seconds"] + prev.get("train_seconds", 0) + vis.get("train_seconds", 0)
        stages = f" in 2 stages ({prev['steps']} + {tr['steps']})" if prev else ""
        tower = (f" after {vis['steps']} steps of the image tower alone on the patch probes"
                 if vis else "")
        out.append(f"- {name}: {steps} steps{stages} x {tr['questions_per_step']} questions{tower}, "
                   f"{tr.get('threads', 1)} thread(s), {secs / 60:.0f} min; test accuracy {100 * acc['test']:.1f}% "
                   f"({acc['test_questions']} questions; " + ", ".join(f"{k} {100 * v:.0f}%" for k, v in
                                                                    acc['test_by_kind'].items()) + ")")
    out.append("")
    for name in dict.fromkeys(r["model"] for r in rows):
        mine = [r for r in rows if r["model"] == name]
        base = next(r for r in mine if r["method"] == "unreduced")
        out += [f"#### {name} ({base['questions']} questions; unreduced accuracy {100 * base['accuracy']:.1f}%)", "",
                f"![{name}](img/pareto_{name}.png)", "",
                "| method | plan | image tokens left | accuracy | Δ vs unreduced | measured | predicted | measured / predicted |",
                "|---|---|---:|---:|---:|---:|---:|---:|"]
        for r in mine:
            if r.get("accuracy") is None:
                out.append(f"| {r['method']} | `{r['plan']}` | | error: {r.get('error', '')} | | | | |")
                continue
            d = 100 * (r["accuracy"] - base["accuracy"])
            ms = f"{r['measured_speedup']:.2f}x" if r["measured_speedup"] is not None else "—"
            ps = f"{r['predicted_speedup']:.2f}x" if r["predicted_speedup"] is not None else "—"
            mp = (f"{r['measured_speedup'] / r['predicted_speedup']:.2f}"
                  if r["measured_speedup"] is not None and r["predicted_speedup"] else "—")
            out.append(f"| {r['method']} | `{r['plan']}` | {r['image_tokens_left'] if r['image_tokens_left'] is not None else ''} "
                       f"| {100 * r['accuracy']:.1f}% | {d:+.1f} | {ms} | {ps} | {mp} |")
        out += [""] + verdicts(rows, name) + [""]
        if models.family(name) == "vilt":
            out += [TOME_VILT, ""]
    out += diagnosis_lines(rows)
    out.append(f"<!-- {MARK}:end -->")
    return "\n".join(out)


def main() -> int:
    global RATIOS
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="*", default=list(models.MODEL_NAMES_V2))
    ap.add_argument("--scenes", type=int, default=200, help="test scenes (four questions each)")
    ap.add_argument("--batch", type=int, default=50)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--ratios", type=float, nargs="+", default=list(RATIOS), help="prune ratios of the sweep")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--weights", default=None, help="weights directory (default: the shipped ones)")
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--plot-only", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    RATIOS = tuple(args.ratios)
    if args.plot_only:
        rows = json.loads(RESULTS.read_text())
    else:
        old = json.loads(RESULTS.read_text()) if RESULTS.exists() else []
        rows = []
        for m in args.models:
            rows += run_model(m, args.scenes, args.batch, args.rounds, args.weights)
        # keep the rows of models not rerun now
        rows = [r for r in old if r["model"] not in args.models] + rows
        rows.sort(key=lambda r: models.ALL_MODEL_NAMES.index(r["model"]))
    md = to_markdown(rows, args.threads)
    print(md)
    if not args.no_write:
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        if not args.plot_only:
            RESULTS.write_text(json.dumps(rows, indent=1) + "\n")
        img = ROOT / "docs" / "img"
        for name in dict.fromkeys(r["model"] for r in rows):
            pareto_png(rows, name, img / f"pareto_{name}.png")
        write_section(md, MARK)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
