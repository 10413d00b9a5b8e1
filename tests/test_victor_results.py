"""docs/results/victor.json (one row per model, the issue's keys) and the Victor section of
docs/benchmarks.md agree: the section is what bench/bench_victor.py renders from the JSON files."""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
KEYS = {"model", "registers", "layer", "acc_unreduced", "acc_victor_untrained", "acc_victor", "predicted_speedup",
        "measured_speedup", "train_step_ratio"}


def test_victor_results_and_their_docs_section():
    rows = json.loads((ROOT / "docs" / "results" / "victor.json").read_text())
    assert isinstance(rows, list) and rows
    assert all(KEYS <= set(r) for r in rows), [sorted(KEYS - set(r)) for r in rows]
    models = [r["model"] for r in rows]
    assert len(set(models)) == len(models), models
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import bench_victor
    finally:
        sys.path.remove(str(ROOT / "bench"))
    study = json.loads(bench_victor.STUDY.read_text()) if bench_victor.STUDY.exists() else []
    text = (ROOT / "docs" / "benchmarks.md").read_text()
    section = re.search(r"<!-- bench_victor:start.*?<!-- bench_victor:end -->", text, re.S)
    assert section is not None
    assert section.group(0) == bench_victor.to_markdown(rows, study)
