"""Worked example for docs/cost-model.md: FastV (K=2, R=50%) on LLaVA-1.5-7B and -13B shapes, analytically.

Builds each model from a config.json alone (meta device: no weights, no memory), captures it, estimates
it with graphred.estimate, then applies FastV *analytically*: the estimate's per-node symbolic FLOPs with
n_img -> n_img/2 substituted from decoder layer K on (layers K..T-1, the final norm and lm_head), plus the
cost of FastV's scorer (one query row's attention over all keys at layer K-1, and the sort), from the cost
registry. No model runs; every figure printed is computed here.

    python bench/cost_worked_example.py            # both sizes
    python bench/cost_worked_example.py 7b
    python bench/cost_worked_example.py --write    # both sizes, and rewrite its block of docs/cost-model.md
"""
from __future__ import annotations

import os
import sys
import tempfile

import sympy

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from graphred.analysis.cost.estimate import estimate_model  # noqa: E402
from graphred.analysis.cost.registry import lookup  # noqa: E402

SIZES = {  # Llama-2 decoders of LLaVA-1.5; the vision tower is CLIP ViT-L/14 at 336 px for both
    "7b": dict(hidden=4096, layers=32, heads=32, inter=11008),
    "13b": dict(hidden=5120, layers=40, heads=40, inter=13824),
}
K, R = 2, 0.5
PAPER_REDUCTION = 0.45  # FastV paper, LLaVA-1.5-13B, K=2 R=50% (Chen et al., 2024, abstract)


def write_config(path: str, hidden: int, layers: int, heads: int, inter: int) -> None:
    from graphred.zoo import llava15_config

    llava15_config(hidden, layers, heads, inter).save_pretrained(path)


def paper_formula(n: float, d: int, m: int, T: int, n_hat: float) -> float:
    """FastV's decoder-only estimate: per layer 4nd^2 + 2n^2d + 2ndm, n -> n_hat after layer K."""
    f = lambda x: 4 * x * d * d + 2 * x * x * d + 2 * x * d * m  # noqa: E731
    return 1 - (K * f(n) + (T - K) * f(n_hat)) / (T * f(n))


def scorer_flops(est, B, n_img, n_txt):
    """graphred::attention_scores for FastV (the last token's row over all keys at layer K-1) + the sort."""
    layer = est.decoder_layers()[K - 1].blocks[0]
    heads, d = layer.num_heads, layer.head_dim
    L = n_img + n_txt
    q, k = (B, heads, 1, d), (B, heads, L, d)
    scores = lookup("graphred::attention_scores").flops([q, k, (B, 1)], [(B, L)], (q, k, (B, 1), None, None))
    sort = lookup("graphred::select_tokens").flops([(B, n_img)], [(B, n_img)], ((B, n_img), None, n_img / 2))
    return scores + sort


def run(size: str) -> None:
    cfg = SIZES[size]
    with tempfile.TemporaryDirectory() as d:
        write_config(d, **cfg)
        est = estimate_model(d)
    B, n_img, n_txt, n_patch = (est.symbol(s) for s in ("B", "n_img", "n_txt", "n_patch"))
    ex = {s.name: v for s, v in est.symbols.items()}
    print(f"== LLaVA-1.5-{size.upper()} shapes (hidden {cfg['hidden']}, {cfg['layers']} layers, {cfg['heads']} heads, "
          f"FFN {cfg['inter']}; CLIP ViT-L/14-336): estimated from config.json on the meta device")
    print(f"   example inputs: {ex}; weights {est.weight_bytes / 2**30:.1f} GiB (fp32 config), "
          f"peak activations {est.peak_activation_bytes / 2**20:.0f} MiB, KV cache {est.kv_cache_bytes / 2**20:.0f} MiB")
    start = est.decoder_layers()[K].name
    half = {n_img: n_img / 2}  # R = 50%: 288 of 576 image tokens stay (exact, 576 is even)
    full_all = est.flops_expr
    after_all = est.flops_with(half, start=start)
    towers = est.towers()
    dec_groups = [g for g in est.groups if g.kind == "layer" and g.stack == est.decoder_layers()[0].stack]
    dec_before = sympy.Add(*[g.flops_expr for g in dec_groups])
    dec_after = sympy.Add(*[g.flops_expr if g.layer_index < K else g.flops_expr.subs(half) for g in dec_groups])
    vision = towers.get("model.vision_tower", {}).get("flops_expr", sympy.Integer(0))
    scorer = scorer_flops(est, B, n_img, n_txt)
    print(f"   FastV K={K} R={int(R * 100)}%: image tokens from layer {K} on: n_img -> n_img/2 "
          f"(layers {K}..{cfg['layers'] - 1}, final norm, lm_head)")
    header = (f"   {'B':>2} {'n_txt':>5}  {'total TFLOPs':>12} {'vision %':>8} {'after':>8} {'+scorer':>8}  "
              f"{'reduction':>9} {'speedup':>7}  {'decoder only':>12} {'paper formula':>13}")
    print(header)
    for bv, tv in ((1, 0), (1, 32), (1, 128), (2, 32)):
        v = {B: bv, n_img: 576, n_txt: tv, n_patch: 576}
        tot = float(full_all.subs(v))
        aft = float(after_all.subs(v))
        sc = float(scorer.subs(v))
        red = 1 - (aft + sc) / tot
        dec_red = 1 - float(dec_after.subs(v)) / float(dec_before.subs(v))
        paper = paper_formula(576 + tv, cfg["hidden"], cfg["inter"], cfg["layers"], 288 + tv)
        print(f"   {bv:>2} {tv:>5}  {tot / 1e12:>12.2f} {100 * float(vision.subs(v)) / tot:>7.1f}% "
              f"{aft / 1e12:>8.2f} {sc / 1e9:>6.3f}G  {100 * red:>8.1f}% {tot / (aft + sc):>6.2f}x  "
              f"{100 * dec_red:>11.1f}% {100 * paper:>12.1f}%")
    paper_img_only = paper_formula(576, cfg["hidden"], cfg["inter"], cfg["layers"], 288)
    print(f"   paper formula on the 576 image tokens alone: {100 * paper_img_only:.1f}%; paper reports "
          f"{100 * PAPER_REDUCTION:.0f}% (LLaVA-1.5-13B)")
    lm = est.group("lm_head")
    v = {B: 1, n_img: 576, n_txt: 32, n_patch: 576}
    print(f"   at B=1, n_txt=32: vision tower {float(vision.subs(v)) / 1e12:.3f} TFLOPs (unchanged by FastV), "
          f"lm_head {float(lm.flops_expr.subs(v)) / 1e12:.3f} -> {float(lm.flops_expr.subs(half).subs(v)) / 1e12:.3f} "
          f"TFLOPs, decoder {float(dec_before.subs(v)) / 1e12:.2f} -> {float(dec_after.subs(v)) / 1e12:.2f} TFLOPs")
    keep = est.solve_keep_for_reduction(0.45, "n_img", start=start)
    print(f"   keep ratio from layer {K} for a 45% whole-model reduction at the example inputs (B={ex['B']}, "
          f"n_txt={ex['n_txt']}): {keep:.3f}")
    print()


def main(argv: list[str]) -> None:
    """Print the example; ``--write`` (both sizes) also rewrites its block of docs/cost-model.md."""
    import contextlib
    import io

    from _common import ROOT, write_section

    write = "--write" in argv
    sizes = [a.lower() for a in argv if a != "--write"] or ["7b", "13b"]
    buf = io.StringIO()
    for s in sizes:
        with contextlib.redirect_stdout(buf):
            run(s)
    text = buf.getvalue().rstrip()
    print(text)
    if write:
        if sizes != ["7b", "13b"]:
            raise SystemExit("--write needs both sizes (run without size arguments)")
        mark = "cost_worked_example"
        md = f"<!-- {mark}:start (python bench/cost_worked_example.py --write) -->\n```\n{text}\n```\n<!-- {mark}:end -->"
        write_section(md, mark, ROOT / "docs" / "cost-model.md")


if __name__ == "__main__":
    main(sys.argv[1:])
