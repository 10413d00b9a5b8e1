"""Shared by the bench scripts: each owns a marked section of docs/benchmarks.md and rewrites only it."""
from __future__ import annotations

import json
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


def publish(md: str, mark: str, data, json_name: str, write: bool) -> None:
    """Print ``md``, keep the raw results as ``bench/out/<json_name>``, and (``write``) rewrite the
    script's section of docs/benchmarks.md."""
    print(md)
    out = ROOT / "bench" / "out"
    out.mkdir(exist_ok=True)
    (out / json_name).write_text(json.dumps(data, indent=2))
    if write:
        write_section(md, mark)
