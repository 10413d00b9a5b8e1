"""Captures that fall back to real-tensor propagation (ViLT, Qwen2-VL) do not flood the log with torch's
``propagate_real_tensors`` warnings when their graph is analysed and estimated afterwards."""
import logging

import graphred


def test_no_propagate_real_tensors_lines_after_a_draft_export_capture(zoo_program, caplog):
    prog = zoo_program("vilt")
    assert prog.method == "draft_export"
    with caplog.at_level(logging.INFO):
        graphred.analyze(prog)
        graphred.estimate(prog, graphred.plans.pumer(prune=0.3, merge=0.2))
    noisy = [r for r in caplog.records if str(r.msg).startswith("propagate_real_tensors")]
    assert not noisy, f"{len(noisy)} propagate_real_tensors lines, e.g. {noisy[0].getMessage()}"


def test_other_symbolic_shapes_warnings_still_pass(zoo_program, caplog):
    zoo_program("vilt")  # the filter is installed by such a capture
    lg = logging.getLogger("torch.fx.experimental.symbolic_shapes")
    with caplog.at_level(logging.WARNING):
        lg.warning("propagate_real_tensors evaluate_expr(%s) -> %s", "u0", 3)
        lg.warning("some other warning")
    assert [r.getMessage() for r in caplog.records if r.name == lg.name] == ["some other warning"]
