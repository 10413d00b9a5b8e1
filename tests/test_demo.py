import subprocess
import sys


def test_demo_runs_end_to_end():
    out = subprocess.run([sys.executable, "-m", "graphred", "demo"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    text = out.stdout
    assert "captured" in text and "analysis:" in text and "predicted" in text
    # the package ships the trained weights, so the demo must use them: accuracy with and without
    # the plan, measured beside predicted (the random-weights fallback is for broken installs only)
    assert "random weights" not in text, text[-2000:]
    assert "accuracy" in text and "measured" in text
