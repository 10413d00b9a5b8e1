import subprocess
import sys


def test_demo_runs_end_to_end():
    out = subprocess.run([sys.executable, "-m", "graphred", "demo"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    text = out.stdout
    assert "captured" in text and "analysis:" in text and "predicted" in text
    # with the shipped weights: accuracy with and without the plan; without them: said plainly
    assert ("accuracy" in text and "measured" in text) or "random weights" in text
