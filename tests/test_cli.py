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
