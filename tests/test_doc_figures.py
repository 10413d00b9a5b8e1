"""Figures in the docs are what the code prints now: re-run the cheap part of bench/doc_figures.py
(the llava CLI outputs of docs/passes.md, the llava rows of docs/cost-model.md's accuracy tables) and
find each in its doc. A stale doc fails here: rerun ``python bench/doc_figures.py --write``."""
from __future__ import annotations

import importlib.util
import re
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def figures():
    spec = importlib.util.spec_from_file_location("doc_figures", ROOT / "bench" / "doc_figures.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _section(text: str, mark: str) -> str:
    m = re.search(rf"<!-- doc_figures:{mark}:start.*?-->\n(.*?)<!-- doc_figures:{mark}:end -->", text, re.S)
    assert m, f"no doc_figures:{mark} section"
    return m.group(1)


def test_every_marked_section_has_a_generator(figures):
    marks = set()
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        marks |= set(re.findall(r"<!-- doc_figures:([\w-]+):start", path.read_text()))
    assert marks == set(figures.MARKS), marks ^ set(figures.MARKS)  # each block has a writer, each writer a block
    assert set(figures.MARKS.values()) == set(figures.SECTIONS)


def test_cli_outputs_in_passes_md_are_current(figures):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        blocks = figures.section_estimate_llava()
    text = figures.PASSES_MD.read_text()
    for mark, md in blocks.items():
        assert _section(md, mark) == _section(text, mark), f"docs/passes.md {mark} is stale: run bench/doc_figures.py --write"


def test_llava_rows_of_cost_model_tables_are_current(figures):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rows = [figures.accuracy_row("llava"), figures.plan_row("llava", "fastv:layer=1,keep=0.5")]
    acc = _section(figures.COST_MD.read_text(), "cost-accuracy") + _section(figures.COST_MD.read_text(), "cost-accuracy-plans")
    for row in rows:
        assert row in acc.splitlines(), f"docs/cost-model.md lacks the current row {row!r}: run bench/doc_figures.py --write"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sentence = figures.weights_sentence("blip")
    assert _section(figures.COST_MD.read_text(), "weights-blip").strip() == sentence
