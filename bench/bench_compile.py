"""torch.compile: the Inductor-compiled original model against the Inductor-compiled graphred model
(``torch.compile(model, backend="graphred", options={"plan": plan, "backend": "inductor"})``), measured
in the same run, with the cost model's predicted speedup beside it, and compile times.

    python bench/bench_compile.py                          # CPU, 1 thread; writes docs/results/compile.json
                                                           # and its section of docs/benchmarks.md
    python bench/bench_compile.py --device cuda            # bf16, SDPA: ms, peak memory, estimate
    python bench/bench_compile.py --no-write --rounds 3

Model: the zoo's ``llava-bench`` (LLaVA-1.5 shaped at reduced width: 576 image + 40 text tokens, 8
decoder layers at width 384, random weights: speed, not accuracy), batch 4. On CUDA the model runs in
bfloat16 with PyTorch's scaled-dot-product attention; the estimate is computed on the float32 CPU
capture (FLOPs do not depend on the dtype; its activation bytes are scaled by 2/4 for bf16). No
network is needed.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import sys
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
warnings.filterwarnings("ignore")

import graphred  # noqa: E402
from graphred.backend import graphred_backend  # noqa: E402
from graphred.plans import fastv, pumer, victor  # noqa: E402
from _common import median_ms, peak_mb, publish, timed_call  # noqa: E402

MODEL = "llava-bench"
PLANS = {
    "fastv(layer=2, keep=0.5)": fastv(layer=2, keep=0.5),
    "pumer(prune=0.5, merge=0.2, layers=[2])": pumer(prune=0.5, merge=0.2, layers=[2]),
}
# on CUDA also Victor (issue 12's llava-bench plan), eager and compiled
CUDA_PLANS = {**PLANS, "victor(registers=8, layer=2)": victor(registers=8, layer=2)}
TARGET_RATIO = 0.9  # measured / predicted under Inductor
MARK = "bench_compile"
RESULTS = ROOT / "docs" / "results" / "compile.json"


def _logits(out):
    return out["logits"] if "logits" in out else out[0]


def run(device: str, threads: int, rounds: int, model_name: str = MODEL) -> dict:
    torch.set_num_threads(threads)
    load_start = os.getloadavg()[0]
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    plans = CUDA_PLANS if device == "cuda" else PLANS
    model, inputs = graphred.zoo.load(model_name)
    prog = graphred.capture(model, **inputs)  # float32 CPU capture: the estimate's program
    estimates = {label: graphred.estimate(prog, plan) for label, plan in plans.items()}
    eager_ref = {label: graphred.transform(prog, plan) for label, plan in plans.items()}
    with torch.no_grad():  # the reference outputs, on the CPU in float32, before the model moves
        want_logits = {label: _logits(ref(**inputs)).float() for label, ref in eager_ref.items()}
    attn = model.config._attn_implementation  # the zoo builds with PyTorch's SDPA
    model = model.to(device=device, dtype=dtype)
    dev_inputs = {k: (v.to(device=device, dtype=dtype if v.is_floating_point() else v.dtype)
                      if isinstance(v, torch.Tensor) else v) for k, v in inputs.items()}

    dev_eager, errors = {}, {}
    if device == "cuda":  # graphred on a capture made on the device, in its dtype (eager, no compiler)
        dev_prog = graphred.capture(model, **dev_inputs)
        for label, plan in plans.items():
            try:
                dev_eager[label] = graphred.transform(dev_prog, plan)
            except Exception as e:  # noqa: BLE001 - recorded in the row
                errors[label] = f"eager: {type(e).__name__}: {str(e)[:300]}"
                print(f"{label}: {errors[label]}", flush=True)

    rows = []
    with torch.no_grad():
        torch._dynamo.reset()
        base = torch.compile(model, backend="inductor")
        t_compile_base, base_out = timed_call(base, dev_inputs, device)
        base_tokens = _logits(base_out).shape[1]
        compiled = {}
        for label, plan in plans.items():
            fast = torch.compile(model, backend=graphred_backend, options={"plan": plan, "backend": "inductor"})
            try:
                t_compile, out = timed_call(fast, dev_inputs, device)
            except Exception as e:  # noqa: BLE001 - recorded in the row
                errors[label] = (errors.get(label, "") + f" compiled: {type(e).__name__}: {str(e)[:300]}").strip()
                print(f"{label}: {errors[label]}", flush=True)
                continue
            compiled[label] = (fast, t_compile, _logits(out))
            print(f"compiled {label} in {t_compile:.1f} s", flush=True)
        for fn in [base] + [c[0] for c in compiled.values()]:  # warm-up after every compile
            timed_call(fn, dev_inputs, device)
        ms = median_ms({"base": base, **{k: v[0] for k, v in compiled.items()}}, dev_inputs, rounds, device)
        peak_base = peak_mb(base, dev_inputs, device)
        eager_ms = None
        if device == "cpu":  # the eager figures of the same plans, same run, for comparison
            eager_ms = median_ms({"base": prog, **eager_ref}, inputs, max(3, rounds // 2), device)
        elif dev_eager:  # eager on the device: the unreduced model against graphred.transform of the device capture
            for fn in [model, *dev_eager.values()]:
                timed_call(fn, dev_inputs, device)
            eager_ms = median_ms({"base": model, **dev_eager}, dev_inputs, rounds, device)
            eager_peak = {"base": peak_mb(model, dev_inputs, device),
                          **{k: peak_mb(f, dev_inputs, device) for k, f in dev_eager.items()}}
        def eager_fields(label: str) -> dict:
            if eager_ms is None or label not in eager_ms:
                return {}
            out = {"eager_measured": eager_ms["base"] / eager_ms[label]}
            if device == "cuda":
                out.update({"eager_base_ms": eager_ms["base"], "eager_reduced_ms": eager_ms[label],
                            "eager_peak_base_mb": eager_peak["base"], "eager_peak_reduced_mb": eager_peak[label]})
            return out

        for label, plan in plans.items():
            if label not in compiled:
                rows.append({"plan": label, "error": errors[label], "predicted": float(estimates[label].speedup),
                             **eager_fields(label)})
                continue
            fast, t_compile, logits = compiled[label]
            if logits.shape != want_logits[label].shape:  # the backend left the graph unchanged (it prints why)
                rows.append({"plan": label, "predicted": float(estimates[label].speedup), **eager_fields(label),
                             "error": f"compiled: the plan was not applied (sequence {logits.shape[1]}, "
                                      f"graphred.transform gives {want_logits[label].shape[1]})"})
                continue
            err = (logits.float().cpu() - want_logits[label]).abs().max().item()
            est = estimates[label]
            measured = ms["base"] / ms[label]
            row = {
                "plan": label, "tokens_out": int(logits.shape[1]), "tokens_in": int(base_tokens),
                "base_ms": ms["base"], "reduced_ms": ms[label], "measured": measured,
                "predicted": float(est.speedup), "ratio": measured / float(est.speedup),
                "compile_base_s": t_compile_base, "compile_reduced_s": t_compile,
                "max_abs_diff_vs_transform": err,
            }
            row.update(eager_fields(label))
            if label in errors:
                row["error"] = errors[label]
            if device == "cuda":
                scale = 2 / 4  # bf16 activations against the float32 estimate
                row.update({
                    "peak_base_mb": peak_base, "peak_reduced_mb": peak_mb(fast, dev_inputs, device),
                    "predicted_peak_act_base_mb": est.peak_activation_bytes * scale / 2**20,
                    "predicted_peak_act_reduced_mb": est.after.peak_activation_bytes * scale / 2**20,
                    "weights_mb": est.weight_bytes * scale / 2**20,
                })
            rows.append(row)
            print(f"{label}: {ms['base']:.1f} -> {ms[label]:.1f} ms, measured {measured:.2f}x, "
                  f"predicted {float(est.speedup):.2f}x", flush=True)
    info = {"device": device, "dtype": str(dtype).replace("torch.", ""), "threads": threads, "rounds": rounds,
            "torch": torch.__version__, "model": model_name, "attention": attn, "batch": int(inputs["input_ids"].shape[0]),
            "cpu": platform.processor() or platform.machine(),
            "gpu": torch.cuda.get_device_name() if device == "cuda" else None, "rows": rows,
            "load_average": [load_start, os.getloadavg()[0]], "cpu_count": os.cpu_count()}
    return info


def to_markdown(res: dict) -> str:
    dev = res["device"]
    head = (f"CPU, {res['threads']} thread(s)" if dev == "cpu" else f"{res['gpu']}, bf16, SDPA")
    out = [f"<!-- {MARK}-{dev}:start (written by bench/bench_compile.py; do not edit by hand) -->",
           f"### torch.compile with Inductor on `{res['model']}` ({dev.upper()})",
           "",
           f"{head}, torch {res['torch']}, batch {res['batch']}, random weights (speed only). Both models are compiled "
           "by Inductor: the original with `torch.compile(model)`, the reduced one with `torch.compile(model, "
           "backend=\"graphred\", options={\"plan\": ..., \"backend\": \"inductor\"})`. Median of "
           f"{res['rounds']} alternating calls after a warm-up; predicted = `graphred.estimate` FLOPs before / after. "
           f"Target: measured >= {TARGET_RATIO} x predicted. Compile time = the first call, with an empty Inductor cache at the start of the run (the graphred "
           "compiles follow the original's, whose unchanged graphs, such as the vision tower, they find in "
           "Inductor's cache).",
           ""]
    if res.get("load_average"):
        out[-1:] = [f"1-minute load average at the start / end of the run: {res['load_average'][0]:.1f} / "
                    f"{res['load_average'][1]:.1f} on {res['cpu_count']} cores (other jobs shared the machine "
                    "when it is above the core count).", ""]
    if dev == "cpu":
        out += ["| plan | sequence out | compiled original ms | compiled graphred ms | measured | predicted | "
                "measured / predicted | target | eager measured (same run) | compile s original / graphred | "
                "max abs diff vs transform |",
                "|---|---|---:|---:|---:|---:|---:|---|---:|---:|---:|"]
        for r in res["rows"]:
            ok = "met" if r["ratio"] >= TARGET_RATIO else "**missed**"
            out.append(f"| {r['plan']} | {r['tokens_in']} -> {r['tokens_out']} | {r['base_ms']:.0f} | {r['reduced_ms']:.0f} | "
                       f"{r['measured']:.2f}x | {r['predicted']:.2f}x | {r['ratio']:.2f} | {ok} | "
                       f"{r.get('eager_measured', float('nan')):.2f}x | {r['compile_base_s']:.0f} / "
                       f"{r['compile_reduced_s']:.0f} | {r['max_abs_diff_vs_transform']:.1e} |")
    else:
        out += ["Two ways to run each plan on the device: compiled (both models by Inductor, as above) and eager "
                "(the unreduced model as Hugging Face runs it against `graphred.transform` of a capture made on "
                "the device, in bf16, no compiler). Peak MB is `torch.cuda.max_memory_allocated` over one call "
                "(weights included); the prediction is the estimate's peak activations (float32 capture, bytes "
                "scaled to bf16) plus the weights.",
                "",
                "| plan | sequence out | compiled: original ms | graphred ms | measured | eager: original ms | "
                "graphred ms | measured | predicted | measured / predicted (compiled / eager) | "
                "peak MB compiled: original / graphred | eager: original / graphred | "
                "predicted peak activations MB original / graphred | compile s |",
                "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in res["rows"]:
            if "base_ms" not in r:
                e = (f"{r['eager_base_ms']:.2f} | {r['eager_reduced_ms']:.2f} | {r['eager_measured']:.2f}x"
                     if "eager_base_ms" in r else "| |")
                e_ratio = f"- / {r['eager_measured'] / r['predicted']:.2f}" if "eager_base_ms" in r else ""
                e_peak = f"{r['eager_peak_base_mb']:.0f} / {r['eager_peak_reduced_mb']:.0f}" if "eager_base_ms" in r else ""
                out.append(f"| {r['plan']} | {r['error']} | | | | {e} | {r['predicted']:.2f}x | {e_ratio} | | {e_peak} | | |")
                continue
            eager = r.get("eager_measured")
            e_cells = (f"{r['eager_base_ms']:.2f} | {r['eager_reduced_ms']:.2f} | {eager:.2f}x" if eager is not None
                       else f"failed: {r.get('error', '')} | | ")
            e_ratio = f"{eager / r['predicted']:.2f}" if eager is not None else "-"
            e_peak = (f"{r['eager_peak_base_mb']:.0f} / {r['eager_peak_reduced_mb']:.0f}" if eager is not None else "-")
            out.append(f"| {r['plan']} | {r['tokens_in']} -> {r['tokens_out']} | {r['base_ms']:.2f} | {r['reduced_ms']:.2f} | "
                       f"{r['measured']:.2f}x | {e_cells} | {r['predicted']:.2f}x | {r['ratio']:.2f} / {e_ratio} | "
                       f"{r['peak_base_mb']:.0f} / {r['peak_reduced_mb']:.0f} | {e_peak} | "
                       f"{r['predicted_peak_act_base_mb']:.0f} / {r['predicted_peak_act_reduced_mb']:.0f} "
                       f"(+ {r['weights_mb']:.0f} weights) | {r['compile_base_s']:.0f} / {r['compile_reduced_s']:.0f} |")
    out.append(f"<!-- {MARK}-{dev}:end -->")
    return "\n".join(out)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (default 1 on CPU, all on CUDA)")
    ap.add_argument("--rounds", type=int, default=None, help="timed calls per model (default 7 on CPU, 50 on CUDA)")
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--model", default=MODEL, help="a zoo name (a smoke test on a tiny model: --model llava --no-write)")
    args = ap.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: no CUDA device here", file=sys.stderr)
        return 2
    # compile times are cold: a fresh Inductor cache for the run (unless the caller names one)
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="graphred-bench-inductor-"))
    rounds = args.rounds or (7 if args.device == "cpu" else 50)
    threads = args.threads or (1 if args.device == "cpu" else os.cpu_count())
    if args.model != MODEL and not args.no_write:
        print(f"--model {args.model}: a smoke test; add --no-write (the published figures are {MODEL}'s)", file=sys.stderr)
        return 2
    res = run(args.device, threads, rounds, args.model)
    publish(to_markdown(res), f"{MARK}-{args.device}", res, f"bench_compile_{args.device}.json", write=not args.no_write)
    if not args.no_write:
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        all_res = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
        all_res[args.device] = res
        RESULTS.write_text(json.dumps(all_res, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
