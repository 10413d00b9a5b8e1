"""Every excerpt and table in docs/passes.md, produced from real runs.

    python bench/passes_excerpt.py                 # all sections (about 2 minutes on a laptop CPU)
    python bench/passes_excerpt.py graph errors    # only some: cli, sweep, graph, semantics, errors, limits

Models are zoo presets with random, seeded weights ("llava": 2 Llama decoder layers + a 2-layer CLIP
tower, 64 image tokens; "llava-bench": LLaVA-1.5-shaped, 576 image tokens, 8 decoder layers at
hidden 384). Nothing here reflects accuracy; the sweep is the cost model's prediction.

Graph excerpts use ``node.format_node()`` with three abbreviations for width: ``[num_users=N]``
is dropped, ``call_function[target=torch.ops.X](args = (...), kwargs = {...})`` is written
``X(..., ...)``, and parameter names lose their ``model_language_model_`` prefix. Runs of nodes
that are not of interest are replaced by one ``...`` line saying how many and where.
"""
from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
import warnings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
warnings.filterwarnings("ignore")
logging.disable(logging.WARNING)

import torch  # noqa: E402

import graphred  # noqa: E402
from graphred.analysis.cost.estimate import sweep  # noqa: E402
from graphred.fx_utils import module_path  # noqa: E402
from graphred.passes.apply import apply_plan  # noqa: E402

P = graphred.plans
GR_OPS = {torch.ops.graphred.attention_scores.default, torch.ops.graphred.select_tokens.default,
          torch.ops.graphred.gather_tokens.default, torch.ops.graphred.bipartite_match.default,
          torch.ops.graphred.merge_tokens.default}
SDPA = torch.ops.aten.scaled_dot_product_attention.default

_cache: dict = {}


def load(name):
    if name not in _cache:
        model, inputs = graphred.zoo.load(name)
        _cache[name] = (model, inputs, graphred.capture(model, **inputs))
    return _cache[name]


def header(title):
    print(f"\n===== {title} " + "=" * max(0, 70 - len(title)))


# ----------------------------------------------------------------------------- cli
def section_cli():
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    for args in (["analyze", "llava"], ["estimate", "llava", "--plan", "fastv:layer=1,keep=0.5"]):
        header("$ graphred " + " ".join(args))
        r = subprocess.run([sys.executable, "-m", "graphred", *args], cwd=ROOT, env=env, capture_output=True, text=True)
        print(r.stdout.rstrip())
        if r.returncode:
            print(f"(exit {r.returncode}) {r.stderr.strip().splitlines()[-1]}")


# ----------------------------------------------------------------------------- sweep
SWEEP = [
    "fastv:layer=2,keep=0.5",
    "fastv:layer=2,keep=0.25",
    "pumer:prune=0.3,merge=0.2",
    "pumer:prune=0.5,merge=0,layers=every:2",
    "pumer:prune=0.1/0.2/0.3,merge=0,layers=2/4/6",
    "pumer:prune=0.5,merge=0,layers=2",
    "prune:ratio=0.5,scorer=random,layers=2",
    "prune:ratio=0.5,scorer=norm,layers=2",
    "fastv:layer=2,keep=0.5 + pumer:prune=0.5,merge=0,layers=5",
]


def section_sweep():
    _, inputs, prog = load("llava-bench")
    header("llava-bench (random weights): cross-modal layers")
    report = graphred.analyze(prog)
    cm = [b for b in report.blocks if b.kind != "unimodal_self"]
    print(f"input_ids {tuple(inputs['input_ids'].shape)}, pixel_values {tuple(inputs['pixel_values'].shape)}")
    print(f"{len(cm)} cross-modal blocks: {cm[0].module_path} ... {cm[-1].module_path}; tokens {cm[0].tokens}")
    header("sweep(prog, plans) on llava-bench: predicted, not measured")
    print(sweep(prog, SWEEP))


# ----------------------------------------------------------------------------- graph excerpt
def _fmt(n) -> str:
    s = n.format_node()
    s = re.sub(r" : \[num_users=\d+\]", "", s)
    m = re.match(r"^(%\S+) = call_function\[target=torch\.ops\.(\S+?)\]\(args = \((.*)\), kwargs = \{(.*)\}\)$", s)
    if m:
        args = m[3].rstrip(",")
        s = f"{m[1]} = {m[2]}({args}{', ' + m[4] if m[4] else ''})"
    s = s.replace("%model_language_model_", "%")
    v = n.meta.get("val")
    if isinstance(v, torch.Tensor):
        s += f"  -> {list(v.shape)}"
    return s


def _short(path: str) -> str:
    return path.replace("model.language_model.", "") or "(inserted)"


def excerpt(gm, shown: set, first: str, last: str, original: set):
    """Print the nodes of ``gm`` from ``first`` to ``last``: those in ``shown`` and every graphred op;
    each run of other nodes becomes one '...' line."""
    lines, run = [], []

    def flush():
        if not run:
            return
        inserted = [n for n in run if n.name not in original]
        if inserted:
            ops = sorted({str(n.target).split(".")[-2] if n.op == "call_function" else n.op for n in inserted})
            lines.append(f"    ... {len(inserted)} inserted side node{'s' * (len(inserted) > 1)} ({', '.join(ops)})")
        rest = [n for n in run if n.name in original]
        if rest:
            mods = []
            for n in rest:
                p = ".".join(_short(module_path(n)).split(".")[:3])  # layers.N.<submodule>
                if p not in mods:
                    mods.append(p)
            lines.append(f"    ... {len(rest)} node{'s' * (len(rest) > 1)} in {', '.join(mods)}")
        run.clear()

    on = False
    for n in gm.graph.nodes:
        if n.name == first:
            on = True
        if not on:
            continue
        if n.name in shown or n.target in GR_OPS:
            flush()
            lines.append(_fmt(n))
        else:
            run.append(n)
        if n.name == last:
            break
    flush()
    print("\n".join(lines))


def section_graph():
    model, inputs, prog = load("llava")
    plan = P.fastv(layer=1, keep=0.5)  # the tiny model has 2 decoder layers: score at layer 0, reduce before layer 1
    applied = apply_plan(prog, plan)
    before, after = prog.graph_module, applied.graph_module
    original = {n.name for n in before.graph.nodes}

    def sdpa_of(gm, layer):
        return next(n.name for n in gm.graph.nodes if n.target is SDPA
                    and module_path(n).startswith(f"model.language_model.layers.{layer}."))

    first, last = sdpa_of(before, 0), sdpa_of(before, 1)
    # original nodes shown in both excerpts: attention projections, the residual adds, the
    # first-token-axis views of the next layer, and the first original user of every graphred node
    shown = set()
    for n in after.graph.nodes:
        p = module_path(n)
        if n.name not in original:
            continue
        if n.target is SDPA:
            shown.add(n.name)
        elif n.target is torch.ops.aten.linear.default and (p.endswith("o_proj") or p.endswith("q_proj")):
            shown.add(n.name)
        elif n.target is torch.ops.aten.add.Tensor and re.search(r"language_model\.layers\.\d+$", p):
            shown.add(n.name)
        elif n.target is torch.ops.aten.view.default and any(u.target is torch.ops.aten.linear.default
                                                             and module_path(u).endswith("q_proj") for u in n.all_input_nodes):
            shown.add(n.name)
    for n in after.graph.nodes:
        if n.target in GR_OPS:
            users = [u for u in n.users if u.name in original and "assert" not in u.name]
            if users:
                first_user = min(users, key=lambda u: list(after.graph.nodes).index(u))
                shown.add(first_user.name)
            for a in n.all_input_nodes:  # what a gather reads (rotary cos/sin tables)
                if a.name in original and a.target is torch.ops.aten.unsqueeze.default:
                    shown.add(a.name)
    header(f"BEFORE: zoo 'llava', {first} (layers.0) .. {last} (layers.1)")
    excerpt(before, shown, first, last, original)
    header(f"AFTER {plan}: same range")
    excerpt(after, shown, first, last, original)
    header("steps")
    for s in applied.steps:
        print(s)


# ----------------------------------------------------------------------------- semantics
def _ranges(xs) -> str:
    xs = list(xs)
    out, i = [], 0
    while i < len(xs):
        j = i
        while j + 1 < len(xs) and xs[j + 1] == xs[j] + 1:
            j += 1
        out.append(f"{xs[i]}" if i == j else f"{xs[i]}-{xs[j]}")
        i = j + 1
    return ", ".join(out)


def section_semantics():
    header("zero reduction is the identity (CPU float32, torch.equal)")
    for name, plan in (("llava", P.pumer(prune=0.0, merge=0.0)), ("llava", P.fastv(layer=1, keep=1.0)),
                       ("vilt", P.pumer(prune=0.0, merge=0.0, merge_text=0.0)), ("clip", P.tome(r=0))):
        model, inputs, prog = load(name)
        fast = graphred.transform(prog, plan)
        with torch.no_grad():  # same RNG state for both: ViLT samples image patches with torch.multinomial
            torch.manual_seed(0)
            ref = model(**inputs)
            torch.manual_seed(0)
            out = fast(**inputs)
        key = "logits" if hasattr(ref, "logits") and ref.logits is not None else "logits_per_image"
        print(f"{name:6s} {str(plan):36s} {key}: torch.equal = {torch.equal(getattr(ref, key), getattr(out, key))}")

    header("fastv(layer=1, keep=0.5) on zoo 'llava': what is kept, per sample")
    model, inputs, prog = load("llava")
    fast = graphred.transform(prog, P.fastv(layer=1, keep=0.5))
    with torch.no_grad():
        out = fast(**inputs)
        ref = model(**inputs)
    ids, am = inputs["input_ids"], inputs["attention_mask"]
    img = model.config.image_token_index
    kp = fast.kept_positions
    print(f"logits before {list(ref.logits.shape)}  after {list(out.logits.shape)}  kept_positions {list(kp.shape)}")
    for b in range(ids.shape[0]):
        pos = kp[b].tolist()
        is_img = (ids[b] == img)
        text = [i for i in range(ids.shape[1]) if not is_img[i]]
        pads = int((am[b] == 0).sum())
        kept_img = sum(bool(is_img[p]) for p in pos)
        print(f"sample {b}: {pads} padding, {int(is_img.sum())} image -> {kept_img} kept, "
              f"{len(text)} text/pad positions all kept: {set(text) <= set(pos)}, ascending: {pos == sorted(pos)}")
        print(f"          kept_positions = [{_ranges(pos)}]")
    # the last valid token's logits are those of the original last position, over the kept sequence
    print(f"last position kept: {kp[:, -1].tolist()}; the rotary cos/sin of layer 1 are gathered at these "
          "original positions (see the graph excerpt), not renumbered 0..K-1")


# ----------------------------------------------------------------------------- errors and limits
def attempt(name, plan, note=""):
    try:
        if isinstance(plan, str):
            plan = P.parse_plan(plan)
        _, _, prog = load(name)
        graphred.transform(prog, plan)
        print(f"{name} + {plan}: OK{note}")
    except (graphred.PlanError, ValueError) as e:
        print(f"{name} + {plan}{note}\n  {type(e).__name__}: {e}")


def section_errors():
    header("plans that do not fit the model: PlanError")
    attempt("clip", P.pumer(prune=0.3, merge=0.2))
    attempt("vilt", P.fastv(layer=1, keep=0.5))
    attempt("llava", P.fastv(layer=5, keep=0.5))
    attempt("llava", P.pumer(prune=0.3, merge=0.0, layers=[3]))
    attempt("llava", P.pumer(prune=0.3, merge=0.2, merge_text=0.1))
    header("bad plan values: ValueError at construction or parse")
    for spec in ("pumer:prune=1.0", "fastv:layer=0,keep=0.5", "pumer:prune=0.1/0.2,layers=from:2", "tome:r=8,layers=odd"):
        try:
            P.parse_plan(spec)
            print(f"{spec}: accepted")
        except ValueError as e:
            print(f"{spec}\n  ValueError: {e}")


def limits_mllama():
    from graphred.analysis.cost import count_flops_executed

    model, inputs, prog = load("mllama")
    for plan in (P.pumer(prune=0.7, merge=0.0), P.pumer(prune=0.3, merge=0.2)):
        fast = graphred.transform(prog, plan)
        est = graphred.estimate(prog, plan)
        before, after = count_flops_executed(model, **inputs), count_flops_executed(fast, **inputs)
        print(f"mllama + {plan}: " + ", ".join(f"{s['op']} at {s['block']} image {s['image_before']}->{s['image_after']}"
                                               for s in fast.steps)
              + f"; estimated FLOPs {est.flops / 1e6:.2f} M -> {est.after.flops / 1e6:.2f} M, matrix products "
              f"{est.flops_matmul / 1e6:.2f} M -> {est.after.flops_matmul / 1e6:.2f} M; measured (FlopCounterMode) "
              f"{before / 1e6:.2f} M -> {after / 1e6:.2f} M")


def section_limits():
    header("ToMe in a decoder VLM's vision tower: the placeholder spans shrink with the tower's tokens")
    _, _, prog = load("llava")
    for plan in (P.tome(r=4), P.victor(registers=4, layer=1) + P.tome(r=4)):
        fast = graphred.transform(prog, plan)
        print(f"llava + {plan}: " + "; ".join(
            f"{s['op']} at {s['block']}" + (f" image {s['image_before']}->{s['image_after']}" if "image_before" in s
                                             else f" +{s['registers']} registers") for s in fast.steps)
            + f"; decoder length {prog.example_inputs()[1]['input_ids'].shape[1]} -> "
            f"{[s for s in fast.steps if s['op'] != 'merge_image'][-1]['length_after']}")
    for name in ("idefics3", "gemma3"):
        attempt(name, P.tome(r=2))
    header("ToMe on Qwen2-VL's vision tower")
    attempt("qwen2-vl", P.tome(r=2))
    header("ToMe where the vision tower keeps its own stream")
    for name in ("clip", "siglip", "blip"):
        _, _, prog = load(name)
        fast = graphred.transform(prog, P.tome(r=4))
        ops = sorted({str(n.target).split(".")[-2] for n in fast.graph_module.graph.nodes if n.target in GR_OPS})
        print(f"{name}: " + ", ".join(f"{s['block'].split('.self_attn')[0]} {s['image_before']}->{s['image_after']}"
                                      for s in fast.steps) + f"; graphred ops: {', '.join(ops)}")
    header("samples with different image counts")
    model, inputs, _ = load("llava")
    img = model.config.image_token_index
    n = model.config.image_seq_length
    ids = torch.full((2, 2 * n + 12), 5, dtype=torch.long)
    ids[0, 1:1 + 2 * n] = img  # two images in sample 0
    ids[1, 1:1 + n] = img  # one image in sample 1
    prog2 = graphred.capture(model, input_ids=ids, attention_mask=torch.ones_like(ids),
                             pixel_values=torch.randn(3, 3, 32, 32), use_cache=False)
    for plan in (P.fastv(layer=1, keep=0.5), P.pumer(prune=0.5, merge=0.2, layers=1)):
        fast = graphred.transform(prog2, plan)
        with torch.no_grad():
            fast(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=torch.randn(3, 3, 32, 32),
                 use_cache=False)
        fillers = (fast.kept_positions == -1).sum(1).tolist()
        print(f"{plan}: " + "; ".join(f"{s['op']} image tokens per sample {s['image_before']} -> {s['image_after']}"
                                      for s in fast.steps)
              + f"; length {ids.shape[1]} -> {fast.kept_positions.shape[1]}, filler slots per sample {fillers}")
    fast = graphred.transform(prog2, P.victor(registers=4, layer=1))
    with torch.no_grad():
        fast(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=torch.randn(3, 3, 32, 32), use_cache=False)
    ins, drop = fast.steps
    print(f"{P.victor(registers=4, layer=1)}: insert_registers {ins['registers']} per image run (at most "
          f"{ins['images']} per sample), length {ids.shape[1]} -> {ins['length_after']}; drop_image image "
          f"tokens per sample {drop['image_before']} -> 0; length -> {drop['length_after']}, filler slots per sample "
          f"{(fast.kept_positions == -1).sum(1).tolist()}")
    header("PuMer on ViLT: prune + merge + merge_text at the same layer (composes)")
    attempt("vilt", "pumer:prune=0,merge=0.2,merge_text=0.1")
    attempt("vilt", "pumer:prune=0.3,merge=0,merge_text=0.1")
    attempt("vilt", "pumer:prune=0.3,merge=0.2,merge_text=0.1")
    header("BLIP: a composed plan's steps in graph order and out of it")
    attempt("blip", "tome:r=4 + pumer:prune=0.3,merge=0.2")
    attempt("blip", "pumer:prune=0.3,merge=0.2 + tome:r=4")
    header("mllama: tiles in the batch, keys/values projected per cross-attention layer from one unfolded view")
    limits_mllama()
    header("KV cache: prefill with use_cache=True, cache entries per layer after fastv(layer=1)")
    fast = graphred.transform(graphred.capture(model, **dict(inputs, use_cache=True)), P.fastv(layer=1, keep=0.5))
    with torch.no_grad():
        out = fast(**dict(inputs, use_cache=True))
    print("cached tokens per layer:", [int(layer.keys.shape[-2]) for layer in out.past_key_values.layers])


SECTIONS = {"cli": section_cli, "sweep": section_sweep, "graph": section_graph, "semantics": section_semantics,
            "errors": section_errors, "limits": section_limits}

if __name__ == "__main__":
    torch.manual_seed(0)
    chosen = sys.argv[1:] or list(SECTIONS)
    for s in chosen:
        if s not in SECTIONS:
            sys.exit(f"unknown section {s!r}: choose from {', '.join(SECTIONS)}")
    for s in chosen:
        SECTIONS[s]()
