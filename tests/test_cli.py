"""The command line: `graphred` / `python -m graphred`."""
import json

import pytest
import subprocess
import sys

import graphred
from graphred.cli import main


def test_version_and_zoo(capsys):
    try:
        main(["--version"])
    except SystemExit as e:
        assert e.code == 0
    assert graphred.__version__ in capsys.readouterr().out
    assert main(["zoo"]) == 0
    out = capsys.readouterr().out
    for name in graphred.zoo.names():
        assert name in out


def test_capture_command(capsys):
    assert main(["capture", "clip"]) == 0
    out = capsys.readouterr().out
    assert "CLIPModel" in out and "aten ops" in out


def test_estimate_command_json(capsys):
    assert main(["estimate", "llava", "--plan", "fastv:layer=1,keep=0.5", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["after"]["flops"] < d["flops"]


def test_errors_are_one_clear_line(capsys):
    assert main(["analyze", "no-such-model"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("graphred: error:") and "llava" in err  # lists what exists
    assert main(["estimate", "llava", "--plan", "pumer:prune=2"]) == 2
    assert "out of range" in capsys.readouterr().err
    assert main(["estimate", "clip", "--plan", "fastv:layer=1"]) == 2
    assert "fastv" in capsys.readouterr().err


def test_python_dash_m_entry_point():
    out = subprocess.run([sys.executable, "-m", "graphred", "--version"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and graphred.__version__ in out.stdout


def test_finetune_saves_a_reloadable_reducer(tmp_path, capsys):
    from graphred.data import scenes

    try:
        scenes.load("train")
    except scenes.DatasetMissingError:
        pytest.skip("the training scenes (dataset-fashion-mnist) are not installed")
    out = tmp_path / "victor.safetensors"
    assert main(["finetune", "vqa-llava", "--plan", "victor:registers=2,layer=1", "--steps", "2", "--batch", "4",
                 "--limit", "0", "--out", str(out)]) == 0
    assert out.is_file() and "saved to" in capsys.readouterr().out
    from graphred.reducer_io import read_reducer

    tensors, meta = read_reducer(out)
    assert meta["plan"] == "victor:registers=2,layer=1" and meta["includes_model"] == "true"
    assert tensors["reducer.graphred_registers"].shape[0] == 2


def test_finetune_bad_plan_is_one_line():
    assert main(["finetune", "vqa-llava", "--plan", "victor:registers=0,layer=1"]) == 2


def test_bench_command_measures_against_predicted(capsys):
    assert main(["bench", "llava", "--plan", "fastv:layer=1,keep=0.5", "--repeats", "1", "--threads", "1", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["plan"] == "fastv:layer=1,keep=0.5" and r["threads"] == 1 and r["rounds"] == 1
    assert r["base_ms"] > 0 and r["reduced_ms"] > 0
    assert abs(r["measured_speedup"] - r["base_ms"] / r["reduced_ms"]) < 1e-9
    assert abs(r["predicted_speedup"] - r["flops"] / r["flops_after"]) < 1e-9 and r["flops_after"] < r["flops"]
    assert abs(r["measured_over_predicted"] - r["measured_speedup"] / r["predicted_speedup"]) < 1e-9


def test_bench_command_text_and_errors(capsys):
    from graphred.bench import format_bench

    r = {"model": "m", "model_class": "C", "plan": "fastv:layer=1,keep=0.5", "threads": 1, "rounds": 3,
         "base_ms": 2.0, "reduced_ms": 1.0, "transform_s": 0.1, "measured_speedup": 2.0, "predicted_speedup": 1.6,
         "flops": 4.0e7, "flops_after": 2.5e7, "measured_over_predicted": 1.25}
    text = format_bench(r)
    assert "measured x2.00, predicted x1.60" in text and "40 M -> 25 M" in text and "noisy" in text
    assert main(["bench", "llava", "--plan", "fastv:keep=1.0"]) == 2
    assert "reduces nothing" in capsys.readouterr().err
    assert main(["bench", "clip", "--plan", "fastv:layer=1"]) == 2
    assert capsys.readouterr().err.startswith("graphred: error: fastv")
