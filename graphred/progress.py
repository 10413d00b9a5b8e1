"""A progress bar that redraws in place on a terminal and prints only a start and an end line otherwise
(logs, pipes, CI), so that a log holds two lines per task instead of one per step.

>>> import io
>>> out = io.StringIO()          # not a terminal
>>> show = progress_bar("eval", stream=out)
>>> for done in (8, 16, 24):
...     show(done, 24)
>>> print(out.getvalue(), end="")
eval: 24 to do
eval: 24/24 done
"""
from __future__ import annotations

import sys
from typing import Callable, TextIO

__all__ = ["progress_bar"]


def progress_bar(label: str, stream: TextIO | None = None, indent: int = 0, width: int = 30,
                 label_width: int = 34) -> Callable[[int, int], None]:
    """``show(done, total)``, to call after each step: a ``[####....] done/total`` bar redrawn with ``\\r``
    when ``stream`` (default: ``sys.stdout`` at call time) is a terminal; else one line when the first
    step is reported and one when ``done == total``."""
    state = {"started": False}

    def show(done: int, total: int) -> None:
        out = stream if stream is not None else sys.stdout
        pad = " " * indent
        tty = bool(getattr(out, "isatty", lambda: False)())
        if tty:
            filled = int(width * done / total) if total else width
            out.write(f"\r{pad}{label:<{label_width}} [{'#' * filled}{'.' * (width - filled)}] {done}/{total}")
            if done >= total:
                out.write("\n")
        else:
            if not state["started"]:
                out.write(f"{pad}{label}: {total} to do\n")
            if done >= total:
                out.write(f"{pad}{label}: {done}/{total} done\n")
        state["started"] = True
        out.flush()

    return show
