"""docs/training.md: its python blocks run, in order, in one namespace, and print what the text says."""
from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

DOC = Path(__file__).resolve().parents[1] / "docs" / "training.md"


def test_training_guide_runs():
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), re.S)
    assert len(blocks) >= 4
    ns: dict = {}
    for block in blocks:
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            exec(compile(block, str(DOC), "exec"), ns)
        # every "print(...)  # expected" line prints the expected text
        printed = buf.getvalue().splitlines()
        expected = [m.group(1).strip() for m in re.finditer(r"^print\(.*\)\s+#\s*(.+)$", block, re.M)]
        wanted = [e for e in expected if not e.startswith(("predicted", "the logits"))]
        for e in wanted:
            assert any(e == p.strip() for p in printed), (e, printed)
