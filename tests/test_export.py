"""Export round-trip: torch.export.export of a transformed model, torch.export.save / load, and a run
in a fresh process that imports graphred (which registers torch.ops.graphred.*) give the outputs of
the transformed model."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import graphred
from graphred.plans import fastv, pumer, tome

from output_leaves import tensor_leaves

ROOT = Path(__file__).resolve().parents[1]

# every zoo model with a plan that applies to it
PLANS = {
    "llava": fastv(layer=1, keep=0.5),
    "paligemma": pumer(prune=0.3, merge=0.2),
    "idefics3": pumer(prune=0.3, merge=0.2),
    "qwen2-vl": pumer(prune=0.3, merge=0.2),
    "vilt": pumer(prune=0.3, merge=0.2),
    "blip": pumer(prune=0.3, merge=0.2),
    "clip": tome(r=4),
    "siglip": tome(r=4),
}


def _run(fn, kwargs) -> dict:
    with torch.no_grad():
        torch.manual_seed(0)
        return dict(tensor_leaves(fn(**kwargs)))


@pytest.fixture(scope="module")
def saved(tmp_path_factory, zoo_model, zoo_program):
    """name -> (file, kwargs, outputs of the transformed model), each saved with torch.export.save."""
    out = {}
    folder = tmp_path_factory.mktemp("exported")
    for name, plan in PLANS.items():
        model, kwargs = zoo_model(name)
        reduced = graphred.transform(zoo_program(name), plan)
        want = _run(reduced, kwargs)
        tensors = {k: v for k, v in kwargs.items() if isinstance(v, torch.Tensor)}
        consts = {k: v for k, v in kwargs.items() if not isinstance(v, torch.Tensor)}
        ep = torch.export.export(reduced, (), kwargs, strict=False)
        path = folder / f"{name}.pt2"
        torch.export.save(ep, path)
        out[name] = (path, tensors, consts, want, type(model).__module__)
    return out


@pytest.mark.parametrize("name", sorted(PLANS))
def test_export_save_load_same_outputs(name, saved):
    path, tensors, consts, want, _ = saved[name]
    loaded = torch.export.load(path).module()
    got = _run(loaded, {**tensors, **consts})
    assert got.keys() == want.keys() and want
    for k in want:
        assert torch.equal(got[k], want[k]), f"{name}: {k}"
    assert any(str(n.target).startswith("graphred.") for n in loaded.graph.nodes), \
        f"{name}: the loaded program holds no graphred op (was the plan applied?)"


def test_fresh_process_after_import_graphred(saved, tmp_path):
    """A new interpreter: import graphred (and the model's transformers module, which declares its
    output classes), torch.export.load, run: the outputs of the transformed model, for every model."""
    cases = {name: (str(p), t, c, w, mod) for name, (p, t, c, w, mod) in saved.items()}
    torch.save(cases, tmp_path / "cases.pt")
    script = textwrap.dedent(f"""
        import importlib, torch
        import graphred
        cases = torch.load({str(tmp_path / 'cases.pt')!r}, weights_only=False)
        bad = []
        for name, (path, tensors, consts, want, module) in cases.items():
            importlib.import_module(module)
            m = torch.export.load(path).module()
            with torch.no_grad():
                torch.manual_seed(0)
                out = m(**tensors, **consts)
            flat, _ = torch.utils._pytree.tree_flatten(out)
            got = [x for x in flat if isinstance(x, torch.Tensor)]
            if len(got) != len(want) or not all(torch.equal(a, b) for a, b in zip(got, want.values())):
                bad.append(name)
        print("BAD", bad, "OF", len(cases))
    """)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env,
                          cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"BAD [] OF {len(PLANS)}" in done.stdout, done.stdout


def test_load_needs_graphred_ops(saved, tmp_path):
    """Without graphred imported, the graphred ops are unknown: registering them is what the import does."""
    path, module = str(saved["llava"][0]), saved["llava"][4]
    script = f"import torch, {module}\ntorch.export.load({path!r})\n"
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, timeout=300,
                          env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert done.returncode != 0
    assert "graphred" in done.stderr
