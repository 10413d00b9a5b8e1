"""A checkpoint that does not cover the model is refused, listing the missing tensors (transformers would
initialise them at random and say so only in a log the zoo keeps quiet); a complete one loads as saved."""
import os
import warnings

import pytest
import safetensors.torch as st
import torch

import graphred
from graphred.cli import main


@pytest.fixture
def clip_dir(tmp_path):
    model, _ = graphred.zoo.load("clip")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save_pretrained(tmp_path)
    return tmp_path, model


def test_complete_checkpoint_loads_its_weights(clip_dir):
    d, model = clip_dir
    loaded, _ = graphred.zoo.from_config_dir(d, device="cpu")
    ref = model.state_dict()
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, ref[k]), k


def test_missing_tensors_are_refused_by_name(clip_dir, capsys):
    d, _ = clip_dir
    f = os.path.join(d, "model.safetensors")
    tensors = st.load_file(f)
    dropped = sorted(k for k in tensors if k.endswith("fc1.weight"))[:2]
    assert dropped
    for k in dropped:
        del tensors[k]
    st.save_file(tensors, f, metadata={"format": "pt"})
    with pytest.raises(graphred.ConfigError) as e:
        graphred.zoo.from_config_dir(d, device="cpu")
    msg = str(e.value)
    assert f"{len(dropped)} tensor(s) missing" in msg
    for k in dropped:
        assert k.split(".", 1)[1] in msg  # named (up to transformers' prefix for the model class)
    assert main(["capture", str(d)]) == 2
    assert "missing from the checkpoint" in capsys.readouterr().err
