"""The throughput model against the GPU: measured tokens/s beside ``step_time``'s prediction.

    PYTHONPATH=. python3 scripts/bench_throughput.py [--out docs]
    PYTHONPATH=. python3 scripts/bench_throughput.py --cpu-smoke --out /tmp/bench

Reproduces, in one run on one GPU, the measurements that calibrate
``muse_plan/optimizer/throughput.py``'s constants, and prints each beside the
constant it calibrates:

- the bf16 matmul peak (8192³, CUDA events, median of 20 after 5 warm-ups)
  over the catalog's datasheet peak: MATMUL_EFFICIENCY;
- the host floor: decoders of 4x128, 6x256 and 8x512 (vocab 260, sequence
  256, micro-batch 4), whose eager micro-step (forward + backward) takes a
  fixed time a layer whatever its FLOPs: HOST_S_PER_LAYER;
- a raw eager training loop built like the executor's (``DecoderLM``, bf16
  autocast over fp32 weights, AdamW in the executor's two groups with betas
  (0.9, 0.95), ``clip_grad_norm_`` at 1.0, loss / accumulation, random tokens)
  over 85M (12x768, vocab 260, sequence 1024, micro 16: the plan of
  docs/bench_multi_gpu.md) and 110M / 336M / 729M / 1.28B (12x768 ... 24x2048,
  vocab 32000, sequence 2048, micro 8). Each row times its micro-step alone and
  whole optimizer steps (CUDA events around a loop with no host sync, mean
  after warm-ups), and prints measured tokens/s, ``step_time(...)``'s
  prediction and their ratio. Each micro-step gives the EAGER_TRAFFIC it
  implies (the efficiency fixed), and the rows a relative-least-squares fit;
- the optimizer step (clipping + AdamW) timed alone on each model, and at 85M
  also as the intercept of step time over accumulation 1/2/4: its bytes a
  parameter over the datasheet bandwidth, OPTIMIZER_BYTES_PER_PARAM;
- EXECUTOR_OVERHEAD, cross-checked: the executor's 85M step of
  docs/bench_multi_gpu.md (125.3 ms at micro 16 x accumulation 2) over this
  run's raw micro-steps (the optimizer's time taken out first).

``step_time`` predicts the executor (it includes EXECUTOR_OVERHEAD); the raw
loop here has no Accelerate, so it should run that much faster: the table
gives the ratio against both ``step_time`` and that raw-loop prediction.
Every section prints as it is measured and the JSON/Markdown are rewritten
after each, so a run cut short keeps what it measured; once ``--budget-s``
seconds have passed, the remaining rows are skipped and marked so.

``--cpu-smoke`` checks the script itself on CPU (fp32 matmul peak, two tiny
decoders, predictions from the CPU model); its numbers calibrate nothing.
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from engines.architecture.config import ModelConfig, param_count  # noqa: E402
from muse_plan.hardware.catalog import CATALOG, GpuKind, match_device_name  # noqa: E402
from muse_plan.optimizer import throughput as tp  # noqa: E402
from muse_plan.optimizer.config import TrainConfig  # noqa: E402

from _timing import timer  # noqa: E402

EXECUTOR_85M_STEP_S = 0.1253  # docs/bench_multi_gpu.md: the executor, 85M, micro 16 x accumulation 2, 1 H200
CLIP = 1.0

# name, layers, d_model, heads, vocab, seq, micro, accumulations
HOST_ROWS = [("4x128", 4, 128, 4, 260, 256, 4, (1,)),
             ("6x256", 6, 256, 4, 260, 256, 4, (1,)),
             ("8x512", 8, 512, 8, 260, 256, 4, (1,))]
MODEL_ROWS = [("85M", 12, 768, 12, 260, 1024, 16, (1, 2, 4)),
              ("110M", 12, 768, 12, 32000, 2048, 8, (1,)),
              ("336M", 24, 1024, 16, 32000, 2048, 8, (1,)),
              ("729M", 24, 1536, 16, 32000, 2048, 8, (1,)),
              ("1.28B", 24, 2048, 16, 32000, 2048, 8, (1,))]
SMOKE_HOST_ROWS = [("2x64", 2, 64, 2, 260, 64, 2, (1,))]
SMOKE_MODEL_ROWS = [("smoke", 2, 128, 4, 260, 128, 4, (1, 2))]


def measure_peak(device: Any) -> dict[str, float]:
    """Matmul FLOP/s: bf16 8192³ on GPU (median of 20 after 5), fp32 512³ on CPU."""
    import torch

    cuda = device.type == "cuda"
    n, dtype, reps = (8192, torch.bfloat16, 20) if cuda else (512, torch.float32, 10)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    times = []
    for i in range(reps + 5):
        stop = timer(device)
        a @ b
        if i >= 5:
            times.append(stop())
        else:
            stop()
    del a, b
    return {"n": n, "dtype": str(dtype).removeprefix("torch."), "flops": 2 * n**3 / statistics.median(times)}


def measure_bandwidth(device: Any) -> float | None:
    """Device-to-device copy, bytes read + written a second (median of 10); None on CPU."""
    import torch

    if device.type != "cuda":
        return None
    src = torch.empty(2**30, dtype=torch.uint8, device=device)  # 1 GiB
    dst = torch.empty_like(src)
    times = []
    for i in range(13):
        stop = timer(device)
        dst.copy_(src)
        t = stop()
        if i >= 3:
            times.append(t)
    del src, dst
    return 2 * 2**30 / statistics.median(times)


def make_optimizer(model: Any) -> Any:
    """As the executor's ``make_optimizer``: matrices decay, vectors don't."""
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.1},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=3e-4, betas=(0.9, 0.95), eps=1e-8)


def time_loop(device: Any, fn: Callable[[], None], warmup: int, steps: int) -> float:
    """Mean seconds of ``fn`` over ``steps`` calls after ``warmup``, one timer around the loop."""
    import torch

    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    stop = timer(device)
    for _ in range(steps):
        fn()
    return stop() / steps


def predict(config: ModelConfig, micro: int, accum: int, gpu: GpuKind | None, cores: int) -> dict[str, float]:
    """``step_time``'s optimizer step, and the raw loop's (no executor overhead) from its parts."""
    cfg = TrainConfig(model=config, micro_batch=micro, grad_accum=accum, precision="bf16")
    st = tp.step_time(cfg, gpu, cpu_cores=cores)
    tokens = micro * config.seq_len
    if gpu is None:
        micro_s = tokens * tp._s_per_token(cfg, None, cores)
        raw_step = st.seconds
        bound = "cpu"
    else:
        gpu_s = tokens * tp._gpu_s_per_token(cfg, gpu) / tp.EXECUTOR_OVERHEAD
        host_s = tp._host_floor(config) / tp.EXECUTOR_OVERHEAD
        micro_s = max(gpu_s, host_s)
        raw_step = accum * micro_s + st.optimizer_s
        bound = "host" if host_s >= gpu_s else "gpu"
    return {"step_s": st.seconds, "tokens_per_s": st.tokens_per_s, "optimizer_s": st.optimizer_s,
            "raw_micro_s": micro_s, "raw_step_s": raw_step, "raw_tokens_per_s": cfg.tokens_per_step / raw_step,
            "bound": bound}


def measure_row(row: tuple, device: Any, gpu: GpuKind | None, cores: int, warmup: int, steps: int) -> dict[str, Any]:
    """One model: micro-step alone, whole steps at each accumulation, the optimizer alone."""
    import torch

    from engines.architecture.model import DecoderLM

    name, layers, d, heads, vocab, seq, micro, accums = row
    config = ModelConfig(vocab_size=vocab, seq_len=seq, n_layers=layers, d_model=d, n_heads=heads)
    n = param_count(config)
    t0 = time.perf_counter()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    torch.manual_seed(0)
    with device:
        model = DecoderLM(config).to(device)
    model.train()
    opt = make_optimizer(model)
    x = torch.randint(0, vocab, (micro, seq), device=device)
    y = torch.randint(0, vocab, (micro, seq), device=device)
    amp = torch.autocast(device.type, dtype=torch.bfloat16)

    def micro_step(scale: float = 1.0) -> None:
        with amp:
            loss = model(x, y)[1]
        (loss / scale).backward()

    def opt_step() -> None:
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        opt.step()

    def full_step(accum: int) -> Callable[[], None]:
        def step() -> None:
            for _ in range(accum):
                micro_step(accum)
            opt_step()
            opt.zero_grad(set_to_none=True)
        return step

    result: dict[str, Any] = {"name": name, "shape": f"{layers}x{d}", "layers": layers, "d_model": d,
                              "heads": heads, "vocab": vocab, "seq": seq, "micro": micro, "params": n}
    micro_s = time_loop(device, micro_step, warmup, steps)
    tokens = micro * seq
    flops = tp.flops_per_token(config) * tokens
    result.update(micro_s=micro_s, micro_tokens_per_s=tokens / micro_s,
                  micro_tflops=flops / micro_s / 1e12, ms_per_layer=micro_s / layers * 1e3)
    optimizer_s = time_loop(device, opt_step, 2, max(3, steps // 2))  # the grads from above stay
    result["optimizer_s"] = optimizer_s
    result["steps"] = []
    for accum in accums:
        opt.zero_grad(set_to_none=True)
        step_s = time_loop(device, full_step(accum), warmup, steps)
        p = predict(config, micro, accum, gpu, cores)
        measured = accum * tokens / step_s
        result["steps"].append({"accum": accum, "step_s": step_s, "tokens_per_s": measured,
                                "predicted": p, "ratio": measured / p["tokens_per_s"],
                                "ratio_raw": measured / p["raw_tokens_per_s"]})
    if len(accums) > 1:  # step = accum · a + b: b is the optimizer's (and the loop's) time a step
        xs = [s["accum"] for s in result["steps"]]
        ys = [s["step_s"] for s in result["steps"]]
        slope, intercept = statistics.linear_regression(xs, ys)
        result["fit_micro_s"], result["fit_optimizer_s"] = slope, intercept
    p1 = predict(config, micro, 1, gpu, cores)
    result["predicted_raw_micro_s"] = p1["raw_micro_s"]
    result["bound"] = p1["bound"]
    result["seconds"] = time.perf_counter() - t0
    if device.type == "cuda":
        result["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    del model, opt, x, y
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def implied_traffic(r: dict[str, Any], gpu: GpuKind) -> tuple[float, float]:
    """(fixed, per-unit) seconds of a raw micro-step: matmuls, and time a byte of EAGER_TRAFFIC."""
    config = ModelConfig(vocab_size=r["vocab"], seq_len=r["seq"], n_layers=r["layers"],
                         d_model=r["d_model"], n_heads=r["heads"])
    tokens = r["micro"] * r["seq"]
    matmul = tokens * tp.flops_per_token(config) / (tp.peak_flops(gpu, "bf16") * tp.MATMUL_EFFICIENCY)
    per_byte = tokens * r["layers"] * r["d_model"] / (gpu.memory_bandwidth_gbs * tp.GIGA)
    return matmul, per_byte


def analyse(out: dict[str, Any], gpu: GpuKind | None) -> dict[str, Any]:
    """What this run says each calibrated constant should be, beside the constant."""
    rows: list[dict[str, Any]] = []

    def add(constant: str, current: float, measured: float | None, how: str) -> None:
        rows.append({"constant": constant, "in_model": current, "this_run": measured,
                     "off": None if measured is None else measured / current - 1, "how": how})

    peak = out.get("peak")
    if gpu is not None and peak:
        add("MATMUL_EFFICIENCY", tp.MATMUL_EFFICIENCY, peak["flops"] / tp.peak_flops(gpu, "bf16"),
            "bf16 8192³ matmul over the datasheet peak")
    host = [r for r in out.get("host_rows", []) if "micro_s" in r]
    if gpu is not None and host:
        add("HOST_S_PER_LAYER", tp.HOST_S_PER_LAYER, statistics.mean(r["micro_s"] / r["layers"] for r in host),
            "small decoders' micro-step a layer (mean of " + ", ".join(r["shape"] for r in host) + ")")
    models = [r for r in out.get("model_rows", []) if "micro_s" in r]
    if gpu is not None and models:
        fitted = [r for r in models if r["bound"] == "gpu"]
        for r in models:
            matmul, per_byte = implied_traffic(r, gpu)
            r["implied_traffic"] = (r["micro_s"] - matmul) / per_byte
        if fitted:
            # relative least squares, one parameter: minimise Σ((a + b·x)/m - 1)²
            num = den = 0.0
            for r in fitted:
                a, b = implied_traffic(r, gpu)
                m = r["micro_s"]
                num += (b / m) * (1 - a / m)
                den += (b / m) ** 2
            add("EAGER_TRAFFIC", tp.eager_traffic(gpu), num / den,
                "relative least squares over the GPU-bound micro-steps (" + ", ".join(r["name"] for r in fitted) + ")")
        bytes_pp = [r["optimizer_s"] * gpu.memory_bandwidth_gbs * tp.GIGA / r["params"]
                    for r in models if r["params"] > 2e8]
        if bytes_pp:
            add("OPTIMIZER_BYTES_PER_PARAM", tp.OPTIMIZER_BYTES_PER_PARAM, statistics.mean(bytes_pp),
                "clip + AdamW timed alone, models over 200M (mean); datasheet bandwidth")
        small = next((r for r in models if r["name"] == "85M"), None)
        if small:
            raw = 2 * small["micro_s"]
            add("EXECUTOR_OVERHEAD", tp.EXECUTOR_OVERHEAD, (EXECUTOR_85M_STEP_S - small["optimizer_s"]) / raw,
                "docs/bench_multi_gpu.md's executor step (125.3 ms, 85M, 16x2) less this run's optimizer, "
                "over 2 raw micro-steps")
    return {"constants": rows}


def fmt_tok(v: float) -> str:
    return f"{v:,.0f}"


def write(out: dict[str, Any], dest: Path) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "bench_throughput.json").write_text(json.dumps(out, indent=2) + "\n")
    (dest / "bench_throughput.md").write_text(markdown(out))


def markdown(out: dict[str, Any]) -> str:
    env = out["env"]
    lines = ["# Throughput model vs the GPU", "",
             f"Command: `{out['command']}`  ",
             f"Device: {env['device']}, torch {env['torch']}, {env['date']}; predictions for catalog kind "
             f"{env['gpu_kind'] or 'CPU'}{' (smoke run: calibrates nothing)' if out['smoke'] else ''}.  ",
             f"Wall time {out.get('wall_s', 0):.0f} s.", "",
             "A raw eager loop built like the executor's (`DecoderLM`, bf16 autocast over fp32 weights, AdamW in "
             "the executor's two groups, clipping at 1.0, loss / accumulation, random tokens) against "
             "`muse_plan.optimizer.throughput.step_time`. `step_time` predicts the executor, which adds "
             f"EXECUTOR_OVERHEAD ({tp.EXECUTOR_OVERHEAD}) to compute; *raw pred.* is the same model without it, "
             "what this loop should do. Times are CUDA events around loops with no host sync (mean after "
             "warm-ups). MFU: the micro-step's model FLOPs (6N + 12·L·d·T) over the datasheet bf16 peak.", ""]
    peak = out.get("peak")
    if peak:
        bw = out.get("bandwidth_gbs")
        lines += [f"{peak['dtype']} matmul {peak['n']}³: **{peak['flops'] / 1e12:.1f} TFLOP/s**"
                  + (f"; device copy {bw:,.0f} GB/s (read + write)" if bw else "") + ".", ""]
    lines += ["| model | shape | vocab | seq | micro × accum | ms / step | tok/s measured | tok/s step_time "
              "| measured / step_time | measured / raw pred. | micro-step MFU | bound (model) |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    peak_flops = out.get("datasheet_peak")
    for r in out.get("host_rows", []) + out.get("model_rows", []):
        if "skipped" in r or "error" in r:
            lines.append(f"| {r['name']} | {r.get('shape', '')} | | | | {r.get('skipped') or r.get('error')} "
                         "| | | | | | |")
            continue
        mfu = f"{r['micro_tflops'] * 1e12 / peak_flops:.1%}" if peak_flops else ""
        for s in r["steps"]:
            p = s["predicted"]
            lines.append(f"| {r['name']} | {r['shape']} | {r['vocab']} | {r['seq']} | {r['micro']} × {s['accum']} "
                         f"| {s['step_s'] * 1e3:.1f} | {fmt_tok(s['tokens_per_s'])} | {fmt_tok(p['tokens_per_s'])} "
                         f"| {s['ratio']:.2f} | {s['ratio_raw']:.2f} | {mfu} | {r['bound']} |")
    lines += ["", "Per model: the micro-step alone and the optimizer step (clip + AdamW) alone, beside the "
              "model's raw micro-step and its OPTIMIZER_BYTES_PER_PARAM time; the EAGER_TRAFFIC each "
              "micro-step implies with MATMUL_EFFICIENCY fixed (host-bound rows imply nothing useful).", "",
              "| model | params | micro-step ms | raw pred. ms | ms / layer | optimizer ms | pred. ms "
              "| implied EAGER_TRAFFIC | peak GiB |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in out.get("host_rows", []) + out.get("model_rows", []):
        if "micro_s" not in r:
            continue
        pred_opt = r["steps"][0]["predicted"]["optimizer_s"]
        traffic = f"{r['implied_traffic']:.0f}" if "implied_traffic" in r and r["bound"] == "gpu" else ""
        fit = (f" (accum fit: {r['fit_micro_s'] * 1e3:.1f} a micro-step + {r['fit_optimizer_s'] * 1e3:.1f})"
               if "fit_optimizer_s" in r else "")
        lines.append(f"| {r['name']} | {r['params'] / 1e6:,.1f}M | {r['micro_s'] * 1e3:.1f} "
                     f"| {r['predicted_raw_micro_s'] * 1e3:.1f} | {r['ms_per_layer']:.2f} "
                     f"| {r['optimizer_s'] * 1e3:.1f}{fit} | {pred_opt * 1e3:.1f} | {traffic} "
                     f"| {r.get('peak_gib', 0):.1f} |")
    constants = out.get("analysis", {}).get("constants", [])
    if constants:
        lines += ["", "## The constants", "",
                  "| constant | in throughput.py | this run | off by | from |", "| --- | --- | --- | --- | --- |"]
        for c in constants:
            scale = 1e3 if c["constant"] == "HOST_S_PER_LAYER" else 1
            unit = " ms" if scale != 1 else ""
            lines.append(f"| {c['constant']} | {c['in_model'] * scale:.4g}{unit} | {c['this_run'] * scale:.4g}{unit} "
                         f"| {c['off']:+.1%} | {c['how']} |")
    if out.get("notes"):
        lines += ["", *out["notes"]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.splitlines()[1:]))
    parser.add_argument("--out", type=Path, default=ROOT / "docs", help="where bench_throughput.{json,md} go")
    parser.add_argument("--warmup", type=int, default=3, help="warm-up calls before each timed loop")
    parser.add_argument("--steps", type=int, default=10, help="timed calls in each loop")
    parser.add_argument("--budget-s", type=float, default=140.0,
                        help="skip the remaining rows once this many seconds have passed")
    parser.add_argument("--only", default=None, help="comma-separated row names (e.g. 85M,1.28B)")
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny configs on CPU: checks the script")
    args = parser.parse_args(argv)

    import torch

    began = time.perf_counter()
    cuda = torch.cuda.is_available() and not args.cpu_smoke
    device = torch.device("cuda" if cuda else "cpu")
    cores = torch.get_num_threads()
    gpu = None
    if cuda:
        name = torch.cuda.get_device_name(0)
        gpu = match_device_name(name)
        if gpu is None:
            gpu = CATALOG["H200"]
            print(f"{name} is not in the catalog: predicting for an H200", flush=True)
    else:
        name = f"CPU ({platform.processor() or platform.machine()}, {cores} threads)"
    host_rows, model_rows = (SMOKE_HOST_ROWS, SMOKE_MODEL_ROWS) if args.cpu_smoke else (HOST_ROWS, MODEL_ROWS)
    if args.only:
        wanted = set(args.only.split(","))
        host_rows = [r for r in host_rows if r[0] in wanted]
        model_rows = [r for r in model_rows if r[0] in wanted]
    out: dict[str, Any] = {
        "command": "python scripts/bench_throughput.py " + shlex.join(sys.argv[1:] if argv is None else argv),
        "smoke": args.cpu_smoke,
        "env": {"device": name, "gpu_kind": gpu.key if gpu else None, "torch": torch.__version__,
                "python": platform.python_version(), "date": dt.date.today().isoformat()},
        "datasheet_peak": tp.peak_flops(gpu, "bf16") if gpu else None,
        "warmup": args.warmup, "steps": args.steps,
        "host_rows": [], "model_rows": [], "notes": [],
    }

    out["peak"] = measure_peak(device)
    out["bandwidth_gbs"] = (bw / 1e9) if (bw := measure_bandwidth(device)) else None
    print(f"matmul {out['peak']['dtype']} {out['peak']['n']}^3: {out['peak']['flops'] / 1e12:.1f} TFLOP/s"
          + (f" ({out['peak']['flops'] / out['datasheet_peak']:.1%} of datasheet)" if gpu else "")
          + (f"; copy {out['bandwidth_gbs']:,.0f} GB/s" if out["bandwidth_gbs"] else ""), flush=True)
    write(out, args.out)

    for key, rows in (("host_rows", host_rows), ("model_rows", model_rows)):
        for row in rows:
            elapsed = time.perf_counter() - began
            if elapsed > args.budget_s:
                out[key].append({"name": row[0], "shape": f"{row[1]}x{row[2]}",
                                 "skipped": f"skipped: {elapsed:.0f} s > budget {args.budget_s:.0f} s"})
                print(f"{row[0]}: skipped (budget)", flush=True)
                continue
            try:
                r = measure_row(row, device, gpu, cores, args.warmup, args.steps)
            except torch.cuda.OutOfMemoryError as exc:
                r = {"name": row[0], "shape": f"{row[1]}x{row[2]}", "error": "OOM: " + str(exc).splitlines()[0]}
                gc.collect()
                torch.cuda.empty_cache()
            out[key].append(r)
            if "steps" in r:
                for s in r["steps"]:
                    print(f"{r['name']:>6} {r['shape']:>8} seq {r['seq']:>4} micro {r['micro']:>2} x{s['accum']}: "
                          f"{s['step_s'] * 1e3:8.1f} ms/step {s['tokens_per_s']:>11,.0f} tok/s | step_time "
                          f"{s['predicted']['tokens_per_s']:>11,.0f} ratio {s['ratio']:.2f} "
                          f"(raw {s['ratio_raw']:.2f}) | micro {r['micro_s'] * 1e3:.1f} ms "
                          f"({r['ms_per_layer']:.2f} ms/layer) opt {r['optimizer_s'] * 1e3:.1f} ms", flush=True)
            else:
                print(f"{r['name']}: {r.get('error')}", flush=True)
            out["analysis"] = analyse(out, gpu)
            out["wall_s"] = time.perf_counter() - began
            write(out, args.out)

    out["analysis"] = analyse(out, gpu)
    for c in out["analysis"]["constants"]:
        print(f"{c['constant']}: model {c['in_model']:.4g}, this run {c['this_run']:.4g} ({c['off']:+.1%}); {c['how']}",
              flush=True)
    out["wall_s"] = time.perf_counter() - began
    write(out, args.out)
    print(f"wrote {args.out / 'bench_throughput.md'} ({out['wall_s']:.0f} s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
