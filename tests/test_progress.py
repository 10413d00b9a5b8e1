"""The progress bar: redrawn in place on a terminal, only start and end lines in a log."""
import io

from graphred.progress import progress_bar


class _Tty(io.StringIO):
    def isatty(self):
        return True


def test_not_a_terminal_gets_two_lines():
    out = io.StringIO()
    show = progress_bar("eval", stream=out, indent=2)
    for done in range(4, 101, 4):
        show(done, 100)
    assert out.getvalue().splitlines() == ["  eval: 100 to do", "  eval: 100/100 done"]
    assert "\r" not in out.getvalue()


def test_terminal_gets_a_redrawn_bar():
    out = _Tty()
    show = progress_bar("eval", stream=out, width=10, label_width=4)
    for done in (5, 10):
        show(done, 10)
    assert out.getvalue() == "\reval [#####.....] 5/10\reval [##########] 10/10\n"
