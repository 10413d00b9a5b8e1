"""What a CUDA capture looks like to graphred: the attention nodes, the analysis, and each plan's transform.

    python bench/cuda_probe.py --out DIR [--models llava,llava-bench] [--dtypes bfloat16,float32]

Writes DIR/probe.json (per model and dtype: the SDPA-kind nodes with their targets, arguments and users; the
report summary; per plan the transform's outcome or traceback) and DIR/<model>-<dtype>.py (the captured graph's
code). A diagnosis tool for a machine with a GPU; it runs on the CPU too (``--device cpu``) for comparison.
"""
from __future__ import annotations

import argparse
import json
import sys
import traceback
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
warnings.filterwarnings("ignore")

import graphred  # noqa: E402
from graphred.analysis.op_tables import SDPA  # noqa: E402
from graphred.fx_utils import op_packet  # noqa: E402
from graphred.plans import fastv, pumer, victor  # noqa: E402

def plans(layer: int) -> dict:
    return {"pumer": pumer(prune=0.5, merge=0.2, layers=[layer]), "fastv": fastv(layer=layer, keep=0.5),
            "victor": victor(registers=8, layer=layer)}


def _arg(a):
    if isinstance(a, torch.fx.Node):
        v = a.meta.get("val")
        return f"%{a.name}:{tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__}"
    if isinstance(a, (list, tuple)):
        return [_arg(x) for x in a]
    return repr(a)


def probe(name: str, dtype: torch.dtype, device: str, out: Path) -> dict:
    model, inputs = graphred.zoo.load(name)
    model = model.to(device=device, dtype=dtype)
    inputs = {k: (v.to(device=device, dtype=dtype if v.is_floating_point() else v.dtype)
                  if isinstance(v, torch.Tensor) else v) for k, v in inputs.items()}
    rec: dict = {"model": name, "dtype": str(dtype), "device": device}
    try:
        prog = graphred.capture(model, **inputs)
    except Exception:
        rec["capture"] = traceback.format_exc()[-3000:]
        return rec
    gm = prog.graph_module
    (out / f"{name}-{str(dtype).replace('torch.', '')}.py").write_text(gm.code)
    nodes = []
    for n in gm.graph.nodes:
        if n.op == "call_function" and op_packet(n) in SDPA:
            nodes.append({"name": n.name, "target": str(n.target), "args": _arg(list(n.args)),
                          "kwargs": {k: _arg(v) for k, v in n.kwargs.items()},
                          "users": [f"{u.name}={u.target}" for u in n.users],
                          "module": str(n.meta.get("nn_module_stack", {}) and list(n.meta["nn_module_stack"].values())[-1][0])})
    rec["sdpa_nodes"] = nodes[:6]
    rec["sdpa_count"] = len(nodes)
    rec["targets"] = sorted({x["target"] for x in nodes})
    try:
        rep = graphred.analyze(prog)
        rec["report"] = rep.summary
        rec["blocks"] = [b.to_dict() for b in rep.blocks][:12]
        rec["unknown_ops"] = [str(u) for u in rep.unknown_ops][:12]
    except Exception:
        rec["report"] = traceback.format_exc()[-3000:]
    rec["plans"] = {}
    for label, plan in plans(1 if name == "llava" else 2).items():
        try:
            fast = graphred.transform(prog, plan)
            with torch.no_grad():
                y = fast(**inputs)
            rec["plans"][label] = f"ok: {type(y).__name__}"
        except Exception:
            rec["plans"][label] = traceback.format_exc()[-4000:]
    try:  # the torch.compile path: Dynamo + AOTAutograd's aten graph on this device
        from graphred.backend import graphred_backend
        torch._dynamo.reset()
        fast = torch.compile(model, backend=graphred_backend, options={"plan": plans(1 if name == "llava" else 2)["pumer"],
                                                                       "backend": "aot_eager"})
        with torch.no_grad():
            fast(**inputs)
        rec["compile_pumer"] = "ok"
    except Exception:
        rec["compile_pumer"] = traceback.format_exc()[-4000:]
    return rec


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--models", default="llava")
    ap.add_argument("--dtypes", default="bfloat16")
    ap.add_argument("--device", default="cuda")
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    recs = []
    for name in a.models.split(","):
        for dt in a.dtypes.split(","):
            r = probe(name, getattr(torch, dt), a.device, out)
            recs.append(r)
            print(json.dumps({k: (v if k != "sdpa_nodes" else v[:1]) for k, v in r.items()}, indent=1)[:6000], flush=True)
    (out / "probe.json").write_text(json.dumps(recs, indent=1))


if __name__ == "__main__":
    main()
