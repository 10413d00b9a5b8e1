"""Shared by the bench scripts: each owns a marked section of docs/benchmarks.md and rewrites only it."""
from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS_MD = ROOT / "docs" / "benchmarks.md"


def write_section(md: str, mark: str, path: Path = BENCHMARKS_MD) -> None:
    """Replace the ``<!-- mark:start ... mark:end -->`` block of ``path`` with ``md`` (append if absent)."""
    text = path.read_text() if path.exists() else "# Benchmarks\n\n"
    pat = re.compile(rf"<!-- {mark}:start.*?<!-- {mark}:end -->", re.S)
    text = pat.sub(lambda _: md, text) if pat.search(text) else text.rstrip() + "\n\n" + md + "\n"
    path.write_text(text)
