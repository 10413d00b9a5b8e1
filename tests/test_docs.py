"""Docs that run: every ```python block of README.md and docs/*.md, and the examples of the CLI's help.

Blocks of one file run in order in one namespace (a later block may use an earlier one's names),
from a temporary working directory. A block opts out only with ``<!-- skip: reason -->`` on the line
just before its opening fence; :func:`test_skipped_blocks_are_few_and_explained` lists them.
"""
from __future__ import annotations

import re
import shlex
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
_FENCE = re.compile(r"^(\s*)```(\w*)\s*$")
_SKIP = re.compile(r"^\s*<!--\s*skip:\s*(.+?)\s*-->\s*$")


def extract_blocks(text: str) -> list[dict]:
    """The fenced code blocks of a markdown text: ``{"lang", "code", "line", "skip"}`` each, ``line`` the
    1-based line of the opening fence and ``skip`` the reason of a ``<!-- skip: reason -->`` line just before it.

    >>> extract_blocks("x\\n<!-- skip: slow -->\\n```python\\nprint(1)\\n```\\n")[0]["skip"]
    'slow'
    """
    lines = text.splitlines()
    blocks, i = [], 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        indent, lang, start = m.group(1), m.group(2), i
        j = i + 1
        while j < len(lines) and lines[j].strip() != "```":
            j += 1
        if j == len(lines):
            raise ValueError(f"unclosed code fence at line {start + 1}")
        body = [ln[len(indent):] if ln.startswith(indent) else ln for ln in lines[start + 1:j]]
        prev = lines[start - 1] if start > 0 else ""
        skip = _SKIP.match(prev)
        blocks.append({"lang": lang, "code": "\n".join(body) + "\n", "line": start + 1,
                       "skip": skip.group(1) if skip else None})
        i = j + 1
    return blocks


def _python_blocks(path: Path) -> list[dict]:
    return [b for b in extract_blocks(path.read_text()) if b["lang"] == "python"]


def test_extractor_finds_blocks_and_skip_markers():
    text = "# t\n```python\na = 1\n```\n\n<!-- skip: needs a GPU -->\n```python\nb = a\n```\n```\nplain\n```\n"
    blocks = extract_blocks(text)
    assert [b["lang"] for b in blocks] == ["python", "python", ""]
    assert [b["skip"] for b in blocks] == [None, "needs a GPU", None]
    assert blocks[1]["line"] == 7 and blocks[0]["code"] == "a = 1\n"
    with pytest.raises(ValueError, match="unclosed"):
        extract_blocks("```python\nx = 1\n")


@pytest.mark.parametrize("path", [p for p in DOCS if _python_blocks(p)], ids=lambda p: p.relative_to(ROOT).as_posix())
def test_python_blocks_run(path, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    ns: dict = {"__name__": f"docs:{path.name}"}
    ran = 0
    for b in _python_blocks(path):
        if b["skip"]:
            continue
        code = compile(b["code"], f"{path.relative_to(ROOT)}:{b['line']}", "exec")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                exec(code, ns)  # noqa: S102 - running the docs is the point
            except Exception as e:
                raise AssertionError(f"the python block at {path.relative_to(ROOT)} line {b['line']} fails: "
                                     f"{type(e).__name__}: {e}") from e
        ran += 1
    assert ran > 0


def test_skipped_blocks_are_few_and_explained():
    skipped = [(p.relative_to(ROOT).as_posix(), b["line"], b["skip"]) for p in DOCS for b in _python_blocks(p) if b["skip"]]
    total = sum(len(_python_blocks(p)) for p in DOCS)
    for where, line, reason in skipped:
        print(f"skipped: {where}:{line}: {reason}")
        assert len(reason) >= 10, f"{where}:{line}: say why the block cannot run"
    assert len(skipped) <= max(1, total // 5), f"too many skipped doc blocks: {skipped}"


def test_cli_help_examples_run(capsys):
    from graphred.cli import main

    from graphred.cli import EXAMPLES

    cmds = []
    for name, lines in EXAMPLES.items():
        with pytest.raises(SystemExit):
            main([name, "--help"])
        help_text = capsys.readouterr().out
        for line in lines:
            assert line in help_text, f"example {line!r} is not in `graphred {name} --help`"
            cmds.append(shlex.split(line)[1:])
    cmds = [c for c in cmds if c[0] not in ("demo", "bench")]  # demo and bench: test_cli.py runs them
    assert any(c[0] == "estimate" and "--plan" in c for c in cmds), cmds
    for cmd in cmds:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            rc = main(cmd)
        out = capsys.readouterr()
        assert rc == 0, f"`graphred {shlex.join(cmd)}` (from its --help) exits {rc}: {out.err.strip()}"
