"""Mutation score of the test suite: plant known bugs in graphred, one at a time, and count how many
the tests catch ("kill").

Each mutant is a text substitution in graphred's source, located by its text (not by file and line,
so it survives code moving between modules): the ``old`` snippet must occur exactly once under
``graphred/``. A mutant whose snippet is gone or ambiguous is reported as stale and left out of
the score. Each mutant runs a chosen set of test files in a private copy of the repository
(``pytest -x``: the first failure kills it); a timeout counts as killed.

Slow (minutes per dozen mutants on two cores), hence outside CI:

    python bench/mutation.py                 # all mutants, prints the table
    python bench/mutation.py --write         # also docs/testing.md's section + docs/results/mutation.json
    python bench/mutation.py --only ops-     # mutants whose id starts with "ops-"
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ROOT, write_section  # noqa: E402

TESTING_MD = ROOT / "docs" / "testing.md"

OPS = ["tests/ops/test_token_ops.py", "tests/passes/test_reference_methods.py"]
REDUCE = ["tests/passes/test_reduce.py", "tests/passes/test_baselines.py", "tests/passes/test_kv_cache.py",
          "tests/passes/test_labels.py", "tests/passes/test_keep_all.py"]
ANALYSIS = ["tests/analysis/test_analysis.py", "tests/analysis/test_unseen_architectures.py"]
COST = ["tests/analysis/test_estimate.py", "tests/analysis/test_cost_registry.py"]


@dataclass(frozen=True)
class Mutant:
    id: str
    why: str   # the bug it plants, in words
    old: str
    new: str
    tests: tuple[str, ...]


M = Mutant
MUTANTS: list[Mutant] = [
    # ---------------------------------------------------------------- ops/tokens.py
    M("ops-scores-no-scale", "attention_scores ignores the softmax scale",
      "qr = q[b0:b1].index_select(2, r).to(torch.float32) * scale", "qr = q[b0:b1].index_select(2, r).to(torch.float32)",
      tuple(OPS)),
    M("ops-scores-unnormalised-weights", "attention_scores does not divide by the query weight total",
      "w = w * torch.where(total == 0, 0.0, 1.0 / (total * H))", "w = w * torch.where(total == 0, 0.0, 1.0 / H)",
      tuple(OPS)),
    M("ops-scores-bias-ignored", "attention_scores drops the attention mask",
      "                logits += br\n", "                pass\n", tuple(OPS)),
    M("ops-scores-dead-rows-count", "a fully masked query row still contributes",
      "                wh = wh * ~dead\n", "                wh = wh\n", tuple(OPS)),
    M("ops-select-keeps-lowest", "select_tokens drops the highest scores instead of the lowest",
      "order = torch.sort(rev_scores, dim=1, stable=True).indices",
      "order = torch.sort(rev_scores, dim=1, stable=True, descending=True).indices", tuple(OPS + REDUCE)),
    M("ops-select-unsorted", "select_tokens returns kept positions out of order",
      "return torch.sort(L - 1 - kept_rev, dim=1).values", "return L - 1 - kept_rev", tuple(OPS + REDUCE)),
    M("ops-select-ignores-candidates", "select_tokens may drop non-candidates (text)",
      "rev_noncand = (~candidates).flip(1).to(torch.int8)", "rev_noncand = torch.zeros_like(candidates).flip(1).to(torch.int8)",
      tuple(OPS + REDUCE)),
    M("ops-gather-backward-no-batch-sum", "gather_tokens' gradient is not summed over a broadcast batch",
      "        gx = gx.sum(dim=0, keepdim=True)\n", "        gx = gx[:1]\n", tuple(OPS)),
    M("ops-gather-rowpath-off-by-one", "gather_tokens' row path reads the next row",
      "return table.index_select(0, _flat_rows(bx, P, L, index.expand(B, index.shape[1]))).view(out_shape)",
      "return table.index_select(0, (_flat_rows(bx, P, L, index.expand(B, index.shape[1])) + 1).clamp_max(table.shape[0] - 1)).view(out_shape)",
      tuple(OPS + REDUCE)),
    M("ops-match-protected-ignored", "bipartite_match merges protected tokens",
      "        ok_free = ok & ~protected.gather(1, cpos)", "        ok_free = ok", tuple(OPS + REDUCE)),
    M("ops-match-worst-pairs", "bipartite_match merges the least similar pairs",
      "by_match = torch.sort(key, dim=1, descending=True, stable=True).indices",
      "by_match = torch.sort(torch.where(mergeable, -node_max, neg_inf), dim=1, descending=True, stable=True).indices",
      tuple(OPS + REDUCE)),
    M("ops-match-no-normalise", "bipartite_match uses dot products instead of cosine similarity",
      "m = torch.nn.functional.normalize(metric.to(torch.float32).gather(1, cpos.unsqueeze(-1).expand(B, M, C)), dim=-1)",
      "m = metric.to(torch.float32).gather(1, cpos.unsqueeze(-1).expand(B, M, C))", tuple(OPS + REDUCE)),
    M("ops-merge-unweighted", "merge_tokens averages without the sizes",
      "acc.index_add_(0, slot, rows.index_select(0, src_rows).to(ct) * s_src.reshape(-1, 1))",
      "acc.index_add_(0, slot, rows.index_select(0, src_rows).to(ct))", tuple(OPS + REDUCE)),
    M("ops-merge-sizes-not-summed", "merge_tokens does not add the source sizes to the destination",
      "s_m = sc.scatter_add(1, dst, s_src)", "s_m = sc.clone()", tuple(OPS + REDUCE)),
    M("ops-merge-backward-src-grad", "merge_tokens' gradient does not reach the source rows",
      "gx = own.scatter_add(1, _expand_rows(src, F), q_at_dst * s_src.unsqueeze(-1))", "gx = own", tuple(OPS)),
    # ---------------------------------------------------------------- passes/
    M("passes-fastv-last-ignores-padding", "FastV scores with position L-1 even when it is padding",
      "last = call_with_val(graph, aten.where.ScalarOther, (vq, pos, -1))",
      "last = call_with_val(graph, aten.where.ScalarOther, (call_with_val(graph, aten.ones_like.default, (vq,)), pos, -1))",
      tuple(REDUCE + ["tests/passes/test_reference_methods.py"])),
    M("passes-fastv-scores-wrong-layer", "FastV scores with layer K's attention instead of layer K-1's",
      "score_block = by_layer[step.layer - 1]", "score_block = by_layer[step.layer]",
      tuple(REDUCE + ["tests/passes/test_reference_methods.py"])),
    M("passes-pumer-padding-text-queries", "PuMer scores with padded text queries too",
      "w = is_text if padded_queries else call_with_val(graph, aten.logical_and.default, (is_text, valid_k))",
      "w = is_text", tuple(REDUCE + ["tests/passes/test_reference_methods.py"])),
    M("passes-prune-count-off-by-one", "pruning keeps one image token fewer than the ratio says",
      "n_keep = n_img - round(ratio * n_img) if keep is None else max(round(keep * n_img), 1)",
      "n_keep = n_img - round(ratio * n_img) - 1 if keep is None else max(round(keep * n_img), 1)",
      tuple(REDUCE + ["tests/analysis/test_estimate.py"])),
    M("passes-candidates-include-text", "selection may drop text tokens",
      "is_image = call_with_val(graph, aten.eq.Scalar, (key_codes, CODE[IMAGE]))",
      "is_image = call_with_val(graph, aten.ge.Scalar, (key_codes, 0))", tuple(REDUCE)),
    M("passes-operands-not-gathered", "an operand meeting the reduced stream (mask, rotary table) is gathered but not used",
      "                n.replace_input_with(a, ga)\n                a = ga\n",
      "                a = a\n", tuple(REDUCE)),
    M("passes-uses-before-gather", "uses of the reduced tensor are not redirected to the gather",
      "        user.replace_input_with(point, g)\n", "        pass\n",
      tuple(REDUCE + ["tests/passes/test_keep_all.py"])),
    M("passes-proportional-no-log", "proportional attention adds the size instead of its log",
      "bias = call_with_val(graph, aten.log.default, (sizes,))", "bias = call_with_val(graph, aten.clone.default, (sizes,))",
      tuple(REDUCE + ["tests/passes/test_reference_methods.py"])),
    M("passes-sizes-not-carried", "merged sizes are not kept for later merges",
      "            st.sizes = call_with_val(graph, gr.gather_tokens.default, (merged[\"sizes\"], keep, 1))",
      "            st.sizes = None", tuple(REDUCE + ["tests/passes/test_reference_methods.py"])),
    M("passes-tome-positional-default", "ToMe keeps positional order instead of the reference's",
      "\"tome\", step.proportional, warn_over_cap=True, reorder=step.variant == \"reference\")",
      "\"tome\", step.proportional, warn_over_cap=True, reorder=False)",
      tuple(REDUCE + ["tests/passes/test_reference_methods.py"])),
    M("passes-pumer-count-after-prune", "PuMer's merge count is taken after pruning, not from the layer's image count",
      "count_base=n_img if ref else None", "count_base=None", tuple(REDUCE + ["tests/passes/test_reference_methods.py"])),
    M("passes-pumer-best-not-protected", "PuMer's best-scored token may be merged away",
      "protected = is_best if protected is None else call_with_val(graph, aten.logical_or.default, (protected, is_best))",
      "protected = protected", tuple(REDUCE + ["tests/passes/test_reference_methods.py"])),
    # ---------------------------------------------------------------- analysis/
    M("analysis-causal-any", "a mask with one open future slot still reads as causal",
      "return bool((~allowed[..., upper]).all())", "return bool((~allowed[..., upper]).any())",
      tuple(ANALYSIS + REDUCE)),
    M("analysis-no-cross-modal-self", "mixed image+text self-attention is classified unimodal",
      "kind = CROSS_MODAL_SELF if {IMAGE, TEXT} <= qm else UNIMODAL_SELF", "kind = UNIMODAL_SELF",
      tuple(ANALYSIS)),
    M("cost-conv-dropped", "convolution FLOPs are not counted",
      "mm = 2 * to_expr(x[0]) * _prod(positions) * _prod(w)", "mm = 0 * to_expr(x[0]) * _prod(positions) * _prod(w)",
      tuple(COST)),
    M("cost-mm-half", "mm counts one FLOP per multiply-add",
      "return 2 * to_expr(m) * to_expr(k) * to_expr(n), _ZERO", "return to_expr(m) * to_expr(k) * to_expr(n), _ZERO",
      tuple(COST)),
]


def _locate(src_root: Path, old: str) -> tuple[Path | None, str]:
    hits = []
    for p in sorted((src_root / "graphred").rglob("*.py")):
        n = p.read_text().count(old)
        if n:
            hits.append((p, n))
    if not hits:
        return None, "stale (snippet not found)"
    if len(hits) > 1 or hits[0][1] > 1:
        return None, "ambiguous (snippet occurs %d times)" % sum(n for _, n in hits)
    return hits[0][0], ""


def run(mutants: list[Mutant], timeout: float, python: str) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory(prefix="graphred-mutants-") as tmp:
        work = Path(tmp) / "repo"
        shutil.copytree(ROOT, work, ignore=shutil.ignore_patterns(".git", ".venv*", "out", "__pycache__",
                                                                  ".pytest_cache", ".hypothesis", "*.egg-info"))
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONDONTWRITEBYTECODE="1")
        for m in mutants:
            path, problem = _locate(work, m.old)
            row = {"id": m.id, "bug": m.why, "tests": list(m.tests)}
            if path is None:
                rows.append({**row, "status": problem})
                print(f"{m.id:40s} {problem}", flush=True)
                continue
            rel = str(path.relative_to(work))
            original = path.read_text()
            path.write_text(original.replace(m.old, m.new))
            t0 = time.perf_counter()
            try:
                proc = subprocess.run([python, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *m.tests],
                                      cwd=work, env=env, capture_output=True, text=True, timeout=timeout)
                status = "survived" if proc.returncode == 0 else ("killed" if proc.returncode in (1, 2) else
                                                                  f"killed (pytest exit {proc.returncode})")
                failed = [ln.split(" ")[1] for ln in proc.stdout.splitlines() if ln.startswith("FAILED ")][:1]
            except subprocess.TimeoutExpired:
                status, failed = "killed (timeout)", []
            finally:
                path.write_text(original)
            secs = time.perf_counter() - t0
            rows.append({**row, "file": rel, "status": status, "killed_by": failed, "seconds": round(secs, 1)})
            print(f"{m.id:40s} {status:12s} {secs:6.1f}s {failed[0] if failed else ''}", flush=True)
    return rows


def area(row: dict) -> str:
    f = row.get("file", "")
    return f.split("/")[1] if f.startswith("graphred/") and f.count("/") >= 2 else "other"


def report(rows: list[dict]) -> tuple[str, dict]:
    scored = [r for r in rows if r["status"] == "survived" or r["status"].startswith("killed")]
    by_area: dict[str, list[int]] = {}
    for r in scored:
        k = by_area.setdefault(area(r), [0, 0])
        k[0] += r["status"].startswith("killed")
        k[1] += 1
    pk = sum(by_area.get(a, [0, 0])[0] for a in ("passes", "ops"))
    pn = sum(by_area.get(a, [0, 0])[1] for a in ("passes", "ops"))
    lines = ["<!-- mutation:start (written by bench/mutation.py --write) -->",
             f"Mutation score: **{sum(r['status'].startswith('killed') for r in scored)} of {len(scored)} killed**"
             + (f"; passes/ and ops/: {pk} of {pn} ({100 * pk / pn:.0f}%, target 85%)" if pn else ""),
             "", "| area | killed | mutants |", "|---|---:|---:|"]
    for a, (k, n) in sorted(by_area.items()):
        lines.append(f"| {a}/ | {k} | {n} |")
    lines += ["", "| mutant | planted bug | status | first failing test |", "|---|---|---|---|"]
    for r in rows:
        lines.append(f"| `{r['id']}` | {r['bug']} | {r['status']} | {(r.get('killed_by') or [''])[0]} |")
    lines.append("<!-- mutation:end -->")
    data = {"score": {a: {"killed": k, "mutants": n} for a, (k, n) in by_area.items()},
            "passes_and_ops": {"killed": pk, "mutants": pn}, "rows": rows}
    return "\n".join(lines), data


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default="", help="run the mutants whose id starts with this prefix")
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds per mutant (a timeout counts as killed)")
    ap.add_argument("--write", action="store_true", help="rewrite docs/testing.md's section and docs/results/mutation.json")
    args = ap.parse_args(argv)
    chosen = [m for m in MUTANTS if m.id.startswith(args.only)]
    if not chosen:
        print(f"no mutant id starts with {args.only!r}", file=sys.stderr)
        return 2
    rows = run(chosen, args.timeout, sys.executable)
    md, data = report(rows)
    print(md)
    if args.write:
        write_section(md, "mutation", TESTING_MD)
        out = ROOT / "docs" / "results"
        out.mkdir(parents=True, exist_ok=True)
        (out / "mutation.json").write_text(json.dumps(data, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
