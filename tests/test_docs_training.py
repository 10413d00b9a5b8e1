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
        # a trailing "(...)" after the expected text explains it
        expected = [re.sub(r"\s+\(.*\)$", "", m.group(1).strip())
                    for m in re.finditer(r"^print\(.*\)\s+#\s*(.+)$", block, re.M)]
        for e in expected:
            assert any(e == p.strip() for p in printed), (e, printed)


def test_training_guide_command_lines_parse():
    """The `graphred finetune ...` lines of the guide (and README) use options the CLI has."""
    import shlex

    from graphred.cli import build_parser

    text = DOC.read_text() + (DOC.parents[1] / "README.md").read_text()
    lines = re.findall(r"^\s*(graphred finetune .*(?:\\\n.*)*)$", text.replace("\\\n", " "), re.M)
    assert lines
    for line in lines:
        args = build_parser().parse_args(shlex.split(line)[1:])
        assert args.model == "vqa-llava" and args.plan.startswith("victor:")
