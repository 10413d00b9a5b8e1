"""graphred on a GPU at a real model size: LLaVA-1.5-7B's shape (``graphred.zoo.llava15_config()``: CLIP
ViT-L/14-336 tower, 576 image tokens, 32-layer Llama decoder at width 4096), random weights in bfloat16,
PyTorch's SDPA. Speed only: the weights are random, so the outputs say nothing of accuracy.

    python bench/bench_gpu.py --out DIR                 # on a CUDA machine: DIR/bench_gpu.json
    python bench/bench_gpu.py --device cpu --tiny --out DIR   # a smoke test of the script (small widths)

For each plan, in one process: the unreduced model as Hugging Face runs it (eager) against
``graphred.transform`` of a capture made on the device (eager, no compiler), median ms of alternating calls
after a warm-up, peak ``torch.cuda.max_memory_allocated`` over one call, and ``graphred.estimate``'s predicted
speedup and peak activations beside them. Rows are written after each plan, so a run cut short keeps what it
measured. ``python bench/bench_gpu.py --publish FILE`` writes FILE's rows into docs/benchmarks.md and
docs/results/gpu.json (on any machine).
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
warnings.filterwarnings("ignore")

import graphred  # noqa: E402
from _common import median_ms, peak_mb, timed_call  # noqa: E402
from graphred.plans import fastv, pumer, victor  # noqa: E402

PLANS = {
    "victor(registers=8, layer=2)": victor(registers=8, layer=2),
    "fastv(layer=2, keep=0.5)": fastv(layer=2, keep=0.5),
    "pumer(prune=0.5, merge=0.2, layers=[2])": pumer(prune=0.5, merge=0.2, layers=[2]),
}
MARK = "bench_gpu"
RESULTS = ROOT / "docs" / "results" / "gpu.json"


def build(device: str, dtype: torch.dtype, batch: int, text_len: int, tiny: bool, seed: int = 0):
    """The LLaVA-1.5-7B-shaped model (random weights, built on ``device`` in ``dtype``) and its inputs:
    ``batch`` prompts of one image (576 image tokens) and ``text_len`` text tokens, the last left-padded by 3."""
    from transformers import LlavaForConditionalGeneration

    cfg = graphred.zoo.llava15_config(**({"hidden": 128, "layers": 4, "heads": 4, "intermediate": 256} if tiny else {}))
    if tiny:
        v = cfg.vision_config
        v.hidden_size, v.intermediate_size, v.num_hidden_layers, v.num_attention_heads = 64, 128, 2, 4
    cfg.text_config._attn_implementation = "sdpa"
    cfg.vision_config._attn_implementation = "sdpa"
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlavaForConditionalGeneration(cfg)
    finally:
        torch.set_default_dtype(old)
    model.eval()
    g = torch.Generator().manual_seed(seed)
    n_img = cfg.image_seq_length
    ids = torch.randint(3, cfg.image_token_index, (batch, 1 + n_img + text_len), generator=g)
    ids[:, 0] = cfg.text_config.bos_token_id
    ids[:, 1:1 + n_img] = cfg.image_token_index
    mask = torch.ones_like(ids)
    pad = 3  # the last prompt is shorter: left padding
    ids[-1] = torch.cat([torch.full((pad,), cfg.text_config.pad_token_id), ids[-1, :-pad]])
    mask[-1, :pad] = 0
    size = cfg.vision_config.image_size
    pixels = torch.randn(batch, 3, size, size, generator=g)
    inputs = {"input_ids": ids.to(device), "attention_mask": mask.to(device),
              "pixel_values": pixels.to(device=device, dtype=dtype)}
    return model, inputs


def run(device: str, dtype: torch.dtype, batch: int, text_len: int, rounds: int, tiny: bool, out: Path) -> dict:
    t0 = time.perf_counter()
    model, inputs = build(device, dtype, batch, text_len, tiny)
    info = {"device": device, "gpu": torch.cuda.get_device_name() if device == "cuda" else None,
            "torch": torch.__version__, "dtype": str(dtype).replace("torch.", ""), "batch": batch,
            "tokens_in": int(inputs["input_ids"].shape[1]), "rounds": rounds, "tiny": tiny,
            "params_b": sum(p.numel() for p in model.parameters()) / 1e9, "rows": []}
    info["build_s"] = time.perf_counter() - t0
    print(f"built {info['params_b']:.2f}B params in {info['build_s']:.0f} s", flush=True)
    with torch.no_grad():
        t0 = time.perf_counter()
        prog = graphred.capture(model, **inputs)
        info["capture_s"] = time.perf_counter() - t0
        print(f"captured in {info['capture_s']:.0f} s", flush=True)
        for _ in range(2):  # warm-up
            timed_call(model, inputs, device)
        info["base_peak_mb"] = peak_mb(model, inputs, device)
        for label, plan in PLANS.items():
            row: dict = {"plan": label}
            try:
                t0 = time.perf_counter()
                est = graphred.estimate(prog, plan)
                row.update({"predicted": float(est.speedup), "estimate_s": time.perf_counter() - t0,
                            "predicted_peak_act_base_mb": est.peak_activation_bytes / 2**20,
                            "predicted_peak_act_reduced_mb": est.after.peak_activation_bytes / 2**20,
                            "weights_mb": est.weight_bytes / 2**20})
                t0 = time.perf_counter()
                fast = graphred.transform(prog, plan)
                row["transform_s"] = time.perf_counter() - t0
                y = fast(**inputs)
                row["tokens_out"] = int(y.logits.shape[1])
                timed_call(fast, inputs, device)
                ms = median_ms({"base": model, "reduced": fast}, inputs, rounds, device)
                b, r = ms["base"], ms["reduced"]
                row.update({"base_ms": b, "reduced_ms": r, "measured": b / r, "ratio": b / r / row["predicted"],
                            "peak_base_mb": info["base_peak_mb"], "peak_reduced_mb": peak_mb(fast, inputs, device)})
                del fast
            except Exception as e:  # noqa: BLE001 - the row says what failed
                row["error"] = f"{type(e).__name__}: {str(e)[:400]}"
            print(json.dumps(row), flush=True)
            info["rows"].append(row)
            out.write_text(json.dumps(info, indent=2))
    return info


def to_markdown(res: dict) -> str:
    lines = [f"<!-- {MARK}:start (written by bench/bench_gpu.py; do not edit by hand) -->",
             "### GPU: graphred at LLaVA-1.5-7B's shape (eager)",
             "",
             f"{res['gpu']}, {res['dtype']}, PyTorch SDPA, torch {res['torch']}. `graphred.zoo.llava15_config()` "
             f"({res['params_b']:.2f}B parameters: CLIP ViT-L/14-336, 576 image tokens, 32 Llama layers at width 4096), "
             f"random weights (speed only), batch {res['batch']} of {res['tokens_in']} tokens, the last prompt "
             "left-padded. The unreduced model as Hugging Face runs it against `graphred.transform` of a capture made "
             f"on the device, both eager (no compiler), median of {res['rounds']} alternating calls after a warm-up. Peak "
             "MB: `torch.cuda.max_memory_allocated` over one call, weights included; predicted: `graphred.estimate` "
             f"(its peak activations + weights). Capture took {res['capture_s']:.0f} s.",
             "",
             "| plan | sequence out | original ms | graphred ms | measured | predicted | measured / predicted | "
             "peak MB original / graphred | predicted peak MB original / graphred | transform s |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in res["rows"]:
        if "error" in r:
            lines.append(f"| {r['plan']} | failed: {r['error']} | | | | {r.get('predicted', float('nan')):.2f}x | | | | |")
            continue
        w, s = r["weights_mb"], 1.0  # the capture is in the run's dtype: the estimate's bytes are its bytes
        peak = (f"{r['peak_base_mb']:.0f} / {r['peak_reduced_mb']:.0f}" if r.get("peak_reduced_mb") is not None
                else "- (CPU)")
        lines.append(f"| {r['plan']} | {res['tokens_in']} -> {r['tokens_out']} | {r['base_ms']:.1f} | {r['reduced_ms']:.1f} | "
                     f"{r['measured']:.2f}x | {r['predicted']:.2f}x | {r['ratio']:.2f} | "
                     f"{peak} | "
                     f"{r['predicted_peak_act_base_mb'] * s + w:.0f} / {r['predicted_peak_act_reduced_mb'] * s + w:.0f} | "
                     f"{r['transform_s']:.0f} |")
    lines += _profile_paragraph()
    lines.append(f"<!-- {MARK}:end -->")
    return "\n".join(lines)


def _profile_totals(path: Path) -> dict | None:
    """``self_cpu_ms``, ``self_cuda_ms`` and kernel ``launches`` read off a torch.profiler table."""
    if not path.exists():
        return None
    text = path.read_text()
    cpu = re.search(r"Self CPU time total: ([\d.]+)(ms|us|s)", text)
    cuda = re.search(r"Self CUDA time total: ([\d.]+)(ms|us|s)", text)
    scale = {"us": 1e-3, "ms": 1.0, "s": 1e3}
    rows: dict[str, int] = {}  # the file holds two tables: count each launch row once
    for m in re.finditer(r"^\s*(cudaLaunchKernel|cuLaunchKernelEx)\s.*?(\d+)\s*$", text, re.M):
        rows.setdefault(m.group(1), int(m.group(2)))
    launches = sum(rows.values())
    if not (cpu and cuda):
        return None
    return {"self_cpu_ms": float(cpu.group(1)) * scale[cpu.group(2)],
            "self_cuda_ms": float(cuda.group(1)) * scale[cuda.group(2)], "launches": launches}


def _profile_paragraph() -> list[str]:
    """What bench/gpu_profile.py's tables say, if they were written."""
    hf, vic = (_profile_totals(RESULTS.parent / f"gpu_profile_{n}.txt") for n in ("hf", "victor"))
    if hf is None or vic is None:
        return []
    return ["",
            "Where the time goes (`bench/gpu_profile.py`, torch.profiler over one call, tables in "
            "`docs/results/gpu_profile_{hf,victor}.txt`): the unreduced model keeps the GPU busy for "
            f"{hf['self_cuda_ms']:.1f} ms, victor's reduced model for {vic['self_cuda_ms']:.1f} ms "
            f"({hf['self_cuda_ms'] / vic['self_cuda_ms']:.2f}x less GPU time), but the reduced model spends "
            f"{vic['self_cpu_ms']:.1f} ms on the CPU issuing {vic['launches']} kernel launches "
            f"(the unreduced one {hf['launches']}). After the reduction the GPU waits for the host: at this batch the "
            "reduced model is launch-bound, which FLOPs do not predict. Capturing the reduced graph in CUDA graphs or "
            "compiling it removes that host time; neither was measured on a GPU at this size yet (the torch.compile "
            "rows below are a small model, launch-bound whether compiled or not)."]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--text-len", type=int, default=39)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--tiny", action="store_true", help="small widths: a smoke test of the script")
    ap.add_argument("--out", default=str(ROOT / "bench" / "out" / "bench_gpu.json"))
    ap.add_argument("--publish", default=None, help="write a finished run's rows (its json) into the docs")
    a = ap.parse_args()
    if a.publish:
        from _common import write_section

        res = json.loads(Path(a.publish).read_text())
        write_section(to_markdown(res), MARK)
        RESULTS.write_text(json.dumps(res, indent=2) + "\n")
        return 0
    if a.device == "cuda" and not torch.cuda.is_available():
        print("bench_gpu: no CUDA device here; a smoke test runs with --device cpu --tiny", file=sys.stderr)
        return 2
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    dtype = torch.bfloat16 if a.device == "cuda" else torch.float32
    res = run(a.device, dtype, a.batch, a.text_len, a.rounds, a.tiny, out)
    print(to_markdown(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
