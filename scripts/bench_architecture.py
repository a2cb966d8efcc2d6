"""Training throughput and MFU of the architecture engine's decoder, beside a Hugging Face peer.

Times full training steps (forward, backward, AdamW step) of ``DecoderLM`` with
the residual modes standard, mhc (n = 4), ddl and mgt at the standard 350M
shape (24 layers, d_model 1024, 16 heads, SwiGLU 2752, vocab 32000), sequence
2048, micro-batch 8, bf16 autocast over float32 weights, each eager and under
``torch.compile``; and Hugging Face's ``LlamaForCausalLM`` of the same shape
(random init, sdpa attention, tied embeddings, same autocast), the model a user
would otherwise pick, eager.

Design decisions:
- MFU is against the bf16 matmul rate measured in the same run (an 8192³
  product timed with CUDA events; on a GPU the higher of the readings at the
  run's start and end), not a datasheet number.
- ``--rounds N`` runs every setting N times in turn; each residual mode's
  overhead is over the standard row of its own round, and the verdicts read
  each setting's median (``medians``), since a target's margin can be smaller
  than the spread from one invocation to the next.
- Model FLOPs per token = 6·N + 12·L·d·T: N every parameter (the tied
  embedding counts once, as the output projection that uses it), and the
  attention term without causal halving (PaLM's convention). The same
  formula for every model; work a residual mode adds beyond its parameters'
  matmuls (stream mixing, Sinkhorn) is overhead, not model FLOPs.
- Step time is the median of N timed steps after warm-up, each timed with
  CUDA events and no host synchronisation between steps, as a training loop
  runs. The first warm-up step's wall time (compilation included) is
  reported too.
- Settings run one at a time; between them everything is freed, dynamo's
  caches reset and peak-memory statistics cleared. A setting that fails (OOM,
  a compile error) is recorded with its error and the run goes on; every row
  is printed and the JSON rewritten as soon as it is measured, so a run cut
  short keeps what it measured.
- A model of ours may carry variants after ``+``: ``bf16`` stores the n-stream state in
  bf16 (``stream_dtype``); ``fused`` runs the connections' Triton kernels, eager and
  under torch.compile, ``fused-eager`` in eager mode only (``fused_kernels`` on and
  eager, a plan's ``training.fused_kernels``; by default they are off), e.g.
  ``--models standard,mhc,mhc+fused,mhc+bf16,mhc+bf16+fused``.
- ``--tiny`` checks the script itself: a tiny shape, fp32, on CPU unless told
  otherwise, eager only unless ``--modes eager,compile``, Hugging Face skipped
  when transformers is not installed.

Run:  PYTHONPATH=. python3 scripts/bench_architecture.py [--out docs/]
      PYTHONPATH=. python3 scripts/bench_architecture.py --tiny --out /tmp/bench
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import gc
import itertools
import json
import platform
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from engines.architecture import DecoderLM, ModelConfig, param_count  # noqa: E402
from engines.architecture import fused_streams  # noqa: E402
from engines.architecture import residual as residual_module  # noqa: E402

from _timing import timer  # noqa: E402

OURS = ("standard", "mhc", "ddl", "mgt")
# after "+": bf16 stream state, fused_kernels on or eager; plan-run only: compile_scope model (one
# graph), "again": the same plan once more with the Inductor cache the row before filled (a second run),
# "graphs" / "nographs": training.cuda_graphs on / off (else auto); "default" (plan-run only): the plan
# names neither fused_kernels nor cuda_graphs, and gets what muse's defaults resolve to
VARIANTS = ("bf16", "fused", "fused-eager", "model", "again", "graphs", "nographs", "default")
SCOPES = ("", "+model")  # the plan-run rows are compared within one compile scope
TARGET_MFU = 0.60  # standard, compiled
TARGET_VS_HF = 2.0  # standard compiled tokens/s over the HF peer's
TARGET_MHC_OVERHEAD = 0.07  # mhc step time over standard, compiled


@dataclasses.dataclass(frozen=True)
class Setup:
    device: torch.device
    amp: torch.dtype | None  # autocast dtype; None: plain fp32
    batch: int
    warmup: int
    steps: int
    compile_mode: str | None
    profile: bool  # record one extra step's top kernels


# ---- the two ceilings and the FLOP count --------------------------------------

def measure_peak(setup: Setup) -> float:
    """Matmul FLOP/s on this device: bf16 8192³ on GPU (median of 20), fp32 512³ on CPU."""
    cuda = setup.device.type == "cuda"
    n, dtype, reps = (8192, torch.bfloat16, 20) if cuda else (512, torch.float32, 10)
    a = torch.randn(n, n, device=setup.device, dtype=dtype)
    b = torch.randn(n, n, device=setup.device, dtype=dtype)
    times = []
    for i in range(reps + 5):
        start = timer(setup.device)
        a @ b
        elapsed = start()
        if i >= 5:
            times.append(elapsed)
    del a, b
    return 2 * n**3 / statistics.median(times)


def flops_per_token(n_params: int, config: ModelConfig) -> float:
    """6·N + 12·L·d·T (attention without causal halving)."""
    return 6 * n_params + 12 * config.n_layers * config.d_model * config.seq_len


def check_fused_sinkhorn(device: torch.device) -> dict[str, Any]:
    """The fused CUDA Sinkhorn against float64 log-space iterations, forward and gradient."""
    if device.type != "cuda" or not residual_module._FUSED:
        return {"fused": False}
    torch.manual_seed(1)
    logits = (2.0 * torch.randn(4096, 4, 4, device=device)).requires_grad_()
    grad = torch.randn(4096, 4, 4, device=device)
    fused = residual_module.sinkhorn(logits, 20)
    (fused_grad,) = torch.autograd.grad(fused, logits, grad)
    ref_in = logits.detach().double().requires_grad_()
    log_p = ref_in
    for _ in range(20):
        log_p = log_p - torch.logsumexp(log_p, -1, keepdim=True)
        log_p = log_p - torch.logsumexp(log_p, -2, keepdim=True)
    ref = log_p.exp()
    (ref_grad,) = torch.autograd.grad(ref, ref_in, grad.double())
    rel = lambda a, b: ((a.double() - b).norm() / b.norm()).item()  # noqa: E731
    result = {"fused": True, "fwd_rel_err": rel(fused, ref), "grad_rel_err": rel(fused_grad, ref_grad)}
    if not (result["fwd_rel_err"] < 1e-5 and result["grad_rel_err"] < 1e-4):
        residual_module._FUSED = False  # measure the plain path rather than a wrong kernel
        result["fused"] = False
    return result


def top_kernels(step: Callable[[], Any], n: int = 12) -> dict[str, Any]:
    """Device time of one more step, and its n costliest kernels."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    events = prof.key_averages()
    top = sorted(events, key=lambda e: -e.self_device_time_total)[:n]
    return {
        "device_ms": sum(e.self_device_time_total for e in events) / 1e3,
        "top": [{"kernel": e.key[:160], "ms": e.self_device_time_total / 1e3, "calls": e.count} for e in top],
    }


def attention_backends(config: ModelConfig, setup: Setup) -> dict[str, Any]:
    """Which kernel scaled_dot_product_attention picks for one layer's causal bf16
    attention, and each backend's forward+backward time (median of 5)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    shape = (setup.batch, config.n_heads, config.seq_len, config.head_dim)
    q, k, v = (torch.randn(shape, device=setup.device, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    grad = torch.randn(shape, device=setup.device, dtype=torch.bfloat16)

    def run() -> None:
        torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True).backward(grad)

    result: dict[str, Any] = {"shape": list(shape), "default": top_kernels(run, 4)["top"]}
    for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION):
        try:
            with sdpa_kernel(backend):
                times = []
                for i in range(7):
                    stop = timer(setup.device)
                    run()
                    if i >= 2:
                        times.append(stop())
            result[f"{backend.name.lower()}_fwd_bwd_ms"] = 1e3 * statistics.median(times)
        except RuntimeError as exc:
            result[f"{backend.name.lower()}_fwd_bwd_ms"] = f"unavailable: {str(exc).splitlines()[0][:100]}"
    return result


# ---- models and one training step ---------------------------------------------

def variant(name: str) -> tuple[str, set[str]]:
    """"mhc+bf16+fused" → ("mhc", {"bf16", "fused"})."""
    base, *flags = name.split("+")
    if set(flags) - set(VARIANTS):
        raise ValueError(f"unknown variant in {name!r}; accepted after '+': {', '.join(VARIANTS)}")
    return base, set(flags)


def kernels(flags: set[str]) -> str:
    """The ``fused_kernels`` setting a model's variants ask for."""
    return "on" if "fused" in flags else "eager" if "fused-eager" in flags else "off"


def build_ours(config: ModelConfig) -> tuple[torch.nn.Module, int]:
    model = DecoderLM(config)
    assert sum(p.numel() for p in model.parameters()) == param_count(config)
    return model, param_count(config)


def build_hf(config: ModelConfig) -> tuple[torch.nn.Module, int]:
    from transformers import LlamaConfig, LlamaForCausalLM

    hf_config = LlamaConfig(
        vocab_size=config.vocab_size, hidden_size=config.d_model, intermediate_size=config.ffn_dim,
        num_hidden_layers=config.n_layers, num_attention_heads=config.n_heads,
        num_key_value_heads=config.kv_heads, max_position_embeddings=config.seq_len,
        rms_norm_eps=config.norm_eps, rope_theta=config.rope_theta, tie_word_embeddings=True,
        attention_bias=False, mlp_bias=False, hidden_act="silu", attn_implementation="sdpa",
    )
    model = LlamaForCausalLM(hf_config).float()
    assert model.config._attn_implementation == "sdpa", model.config._attn_implementation
    return model, sum(p.numel() for p in model.parameters())


def loss_of(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, hf: bool) -> torch.Tensor:
    if hf:
        return model(input_ids=x, labels=x).loss  # HF shifts the labels itself
    return model(x, y)[1]


def bench(name: str, mode: str, config: ModelConfig, setup: Setup) -> dict[str, Any]:
    """Build, warm up and time one (model, mode); everything it made is freed on return."""
    hf = name == "hf-llama"
    row: dict[str, Any] = {"model": name, "mode": mode}
    cuda = setup.device.type == "cuda"
    torch._dynamo.utils.counters.clear()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    torch.manual_seed(0)
    base, flags = variant(name)
    stream_dtype = "bfloat16" if "bf16" in flags else "float32"
    with setup.device:
        model, n_params = build_hf(config) if hf else build_ours(
            dataclasses.replace(config, residual=base, stream_dtype=stream_dtype, fused_kernels=kernels(flags)))
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.1, fused=cuda)
    run = torch.compile(model, mode=setup.compile_mode) if mode == "compile" else model
    x = torch.randint(0, config.vocab_size, (setup.batch, config.seq_len), device=setup.device)
    y = torch.randint(0, config.vocab_size, (setup.batch, config.seq_len), device=setup.device)

    def step() -> torch.Tensor:
        with torch.autocast(setup.device.type, dtype=setup.amp or torch.float32, enabled=setup.amp is not None):
            loss = loss_of(run, x, y, hf)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    t0 = time.perf_counter()
    for i in range(setup.warmup):
        loss = step()
        if i == 0:
            loss.item()
            row["first_step_s"] = time.perf_counter() - t0
    losses, marks = [], []
    for _ in range(setup.steps):
        # events are recorded without a host sync between steps, as a training loop runs
        begin = torch.cuda.Event(enable_timing=True) if cuda else time.perf_counter()
        if cuda:
            begin.record()
        losses.append(step())
        end = torch.cuda.Event(enable_timing=True) if cuda else time.perf_counter()
        if cuda:
            end.record()
        marks.append((begin, end))
    if cuda:
        torch.cuda.synchronize()
    times = [b.elapsed_time(e) / 1e3 if cuda else e - b for b, e in marks]
    step_s = statistics.median(times)
    tokens = setup.batch * config.seq_len
    row.update(
        params=n_params, step_ms=1e3 * step_s, step_ms_min=1e3 * min(times), step_ms_max=1e3 * max(times),
        tokens_per_s=tokens / step_s, model_flops_per_step=flops_per_token(n_params, config) * tokens,
        final_loss=losses[-1].item(),
        peak_mem_gib=torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
    )
    if setup.profile and cuda:
        row["profile"] = top_kernels(step)
    if mode == "compile":  # a graph break or a recompile would show here before it shows in the time
        counters = torch._dynamo.utils.counters
        row["graph_breaks"] = sum(counters["graph_break"].values())
        row["unique_graphs"] = counters["stats"]["unique_graphs"]
    del model, opt, run, x, y, losses
    return row


def free(device: torch.device) -> None:
    gc.collect()
    torch._dynamo.reset()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ---- report ------------------------------------------------------------------------

def add_derived(rows: list[dict[str, Any]], peak: float) -> None:
    """MFU, and each residual mode's step-time overhead over standard in the same mode (and round)."""
    standard = {(r["mode"], scope_of(r["model"]), r.get("round")): r["step_ms"] for r in rows
                if variant(r["model"])[0] == "standard" and "again" not in r["model"] and "step_ms" in r}
    for r in rows:
        if "step_ms" not in r:
            continue
        r["mfu"] = r["model_flops_per_step"] / (r["step_ms"] / 1e3) / peak
        key = (r["mode"], scope_of(r["model"]), r.get("round"))
        if variant(r["model"])[0] in OURS and key in standard:
            r["overhead_vs_standard"] = r["step_ms"] / standard[key] - 1


def medians(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """With ``--rounds``: each setting's median over its rounds, as a row (``round``: "median"). The
    overhead over standard is the median of each round's own (a round's standard ran beside it); the
    peak memory the largest; the first step the first round's (later rounds start from Inductor's cache)."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in rows:
        if "step_ms" in r and isinstance(r.get("round"), int):
            groups.setdefault((r["model"], r["mode"]), []).append(r)
    out = []
    for group in groups.values():
        first, step = group[0], statistics.median(r["step_ms"] for r in group)
        row = {**first, "round": "median", "rounds": len(group), "step_ms": step,
               "tokens_per_s": first["tokens_per_s"] * first["step_ms"] / step, "mfu": first["mfu"] * first["step_ms"] / step}
        row.pop("overhead_vs_standard", None)
        overs = [r["overhead_vs_standard"] for r in group if "overhead_vs_standard" in r]
        if overs:
            row["overhead_vs_standard"] = statistics.median(overs)
        mems = [r["peak_mem_gib"] for r in group if r.get("peak_mem_gib") is not None]
        row["peak_mem_gib"] = max(mems) if mems else None
        out.append(row)
    return out


def scope_of(name: str) -> str:
    return "+model" if "model" in variant(name)[1] else ""


TARGET_VS_HF_COMPILED = 1.1  # standard through muse plan run over the compiled HF peer
TARGET_CACHED_FIRST_STEP_S = 15.0  # a second run of a plan, Inductor's cache warm
TARGET_OVERHEAD_PLAN_RUN = {"ddl": 0.07, "mhc": 0.15, "mgt": 0.20}  # step time over standard, plan run


def verdicts(rows: list[dict[str, Any]]) -> list[str]:
    """The issue's targets against what was measured: the ``plan-run`` rows (what a user
    gets) where they were run, else the hand-built compiled loop's."""
    find = lambda m, mode: next((r for r in rows if r["model"] == m and r["mode"] == mode and "mfu" in r), None)  # noqa: E731
    verdict = lambda what, value, target, ok: f"{what} {value} vs target {target}: {'MET' if ok else 'MISSED'}"  # noqa: E731
    plan_run = any(r["mode"] == "plan-run" and "mfu" in r for r in rows)
    mode = "plan-run" if plan_run else "compile"
    hf, hf_compiled = find("hf-llama", "eager"), find("hf-llama", "compile")
    lines = []
    for scope in SCOPES if plan_run else ("",):
        std = find("standard" + scope, mode)
        if std:
            lines.append(verdict(f"standard{scope} ({mode}) MFU", f"{std['mfu']:.1%}", f">= {TARGET_MFU:.0%}",
                                 std["mfu"] >= TARGET_MFU))
        for peer, target in ((hf, TARGET_VS_HF), (hf_compiled, TARGET_VS_HF_COMPILED)):
            if std and peer:
                ratio = std["tokens_per_s"] / peer["tokens_per_s"]
                lines.append(verdict(f"standard{scope} ({mode}) / HF Llama ({peer['mode']}) tokens/s",
                                     f"{ratio:.2f}x", f">= {target}x", ratio >= target))
        limits = TARGET_OVERHEAD_PLAN_RUN if mode == "plan-run" else {"mhc": TARGET_MHC_OVERHEAD}
        for name, limit in limits.items():
            for row in rows:  # the mode and its variants (+bf16, +fused) in this scope
                if (row["mode"] == mode and variant(row["model"])[0] == name and scope_of(row["model"]) == scope
                        and "again" not in row["model"] and "overhead_vs_standard" in row):
                    lines.append(verdict(f"{row['model']} ({mode}) step time over standard",
                                         f"{row['overhead_vs_standard']:+.1%}", f"<= +{limit:.0%}",
                                         row["overhead_vs_standard"] <= limit))
        for row in rows:
            if (row["mode"] == mode and "again" in row["model"] and scope_of(row["model"]) == scope
                    and row.get("first_step_s") is not None):
                lines.append(verdict(f"{row['model']} ({mode}) first step with the cache",
                                     f"{row['first_step_s']:.1f} s", f"<= {TARGET_CACHED_FIRST_STEP_S:.0f} s",
                                     row["first_step_s"] <= TARGET_CACHED_FIRST_STEP_S))
    return lines


def plan_run(name: str, config: ModelConfig, setup: Setup, cache: Path) -> dict[str, Any]:
    """``name`` trained as a plan through ``muse plan run`` (``bench_plan_run.run_one``:
    a subprocess, as a user runs it), its tokens/s and memory read from the store."""
    from bench_plan_run import gpu_compute, plan, run_one

    shape = {"layers": config.n_layers, "d_model": config.d_model, "n_heads": config.n_heads}
    cuda = setup.device.type == "cuda"
    steps = setup.warmup + setup.steps
    base, flags = variant(name)
    data = plan(f"{name.replace('+', '-')}-plan-run", base, "on", shape, config.seq_len, setup.batch, steps,
                "bf16" if setup.amp else "fp32", gpu_compute() if cuda else "cpu",
                stream_dtype="bfloat16" if "bf16" in flags else "float32",
                scope="model" if "model" in flags else "auto",
                kernels=None if "default" in flags else kernels(flags),
                graphs=None if "default" in flags else "on" if "graphs" in flags else "off" if "nographs" in flags
                else "auto")
    got = run_one(data, cache, skip=setup.warmup)
    row: dict[str, Any] = {"model": name, "mode": "plan-run"}
    if "error" in got:
        return {**row, "error": got["error"].strip().splitlines()[-1][:200]}
    n_params = param_count(dataclasses.replace(config, residual=base))
    tokens = setup.batch * config.seq_len
    return {**row, "params": n_params, "step_ms": 1e3 * tokens / got["tokens_per_s"],
            "tokens_per_s": got["tokens_per_s"], "model_flops_per_step": flops_per_token(n_params, config) * tokens,
            "peak_mem_gib": got["peak_gib"], "first_step_s": got["first_step_s"],
            "predicted_tokens_per_s": got["predicted_tokens_per_s"], "predicted_peak_gib": got["predicted_peak_gib"],
            # what the run compiled and ran: its regions and graphs, its connections' kernels
            "compile_event": got["compile_event"],
            "kernels_event": next((m for m in got["events"] if "fused_kernels" in m), None)}


HEADER = "| model | mode | params | step ms (median) | tokens/s | MFU | peak mem GiB | 1st step s | vs standard |"


def table(rows: list[dict[str, Any]]) -> list[str]:
    lines = [HEADER, "| --- " * (HEADER.count("|") - 1) + "|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['mode']} | failed: {r['error']} |  |  |  |  |  |  |")
            continue
        mem = f"{r['peak_mem_gib']:.1f}" if r.get("peak_mem_gib") is not None else "-"
        over = f"{r['overhead_vs_standard']:+.1%}" if "overhead_vs_standard" in r else ""
        name = r["model"] + (f" (median of {r['rounds']})" if r.get("round") == "median" else
                             f" (round {r['round'] + 1})" if isinstance(r.get("round"), int) else "")
        lines.append(
            f"| {name} | {r['mode']} | {r['params'] / 1e6:.1f}M | {r['step_ms']:.1f} | "
            f"{r['tokens_per_s']:,.0f} | {r.get('mfu', float('nan')):.1%} | {mem} | "
            f"{r.get('first_step_s', float('nan')):.1f} | {over} |"
        )
    return lines


def write(out: Path, meta: dict[str, Any], rows: list[dict[str, Any]]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_architecture.json").write_text(json.dumps({**meta, "rows": rows}, indent=2) + "\n")
    md = [
        "# Architecture engine: training throughput and MFU",
        "",
        f"Produced by `{meta['command']}` on {meta['date']}.",
        "",
        f"Device: {meta['device']}; torch {meta['torch']}, CUDA {meta['cuda']}, transformers "
        f"{meta['transformers']}, Python {meta['python']}.",
        "",
        f"Shape: {meta['shape']}; micro-batch {meta['batch']} x sequence {meta['seq_len']} = "
        f"{meta['batch'] * meta['seq_len']} tokens a step; {meta['precision']}; AdamW (fused on CUDA); "
        f"step time = median of {meta['steps']} timed steps after {meta['warmup']} warm-up steps.",
        "",
        f"Peak: {meta['peak_tflops']:.0f} TFLOP/s measured in this run ({meta['peak_how']}; on a GPU the "
        "higher of the measurements at its start and end). "
        "MFU = (6·N + 12·L·d·T) FLOPs per token x tokens/s / peak, N all parameters, attention "
        "without causal halving.",
        "",
        *table(rows),
        "",
        *[f"- {v}" for v in meta.get("verdicts", [])],
        "",
    ]
    (out / "bench_architecture.md").write_text("\n".join(md))


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tiny", action="store_true", help="tiny shape, few steps, fp32, CPU: checks the script works")
    p.add_argument("--out", type=Path, default=ROOT / "docs", help="folder for bench_architecture.{json,md}")
    p.add_argument("--models", default="hf-llama," + ",".join(OURS), help="comma-separated; hf-llama is the peer")
    p.add_argument("--modes", default=None,
                   help="comma-separated from eager,compile,plan-run (default: eager,compile; eager alone with "
                        "--tiny); plan-run trains each model as a plan through `muse plan run` (compile: on), "
                        "--warmup + --steps steps, the median after --warmup")
    p.add_argument("--hand-built", default=None,
                   help="comma-separated models of ours that also run the hand-built eager/compile modes "
                        "(default: all; 'none': only the HF peer does, ours run plan-run alone)")
    p.add_argument("--scale", default="350M", help="the model shape (ModelConfig.from_scale), e.g. 1.3B")
    p.add_argument("--batch", type=int, default=None, help="micro-batch (default 8; 2 with --tiny)")
    p.add_argument("--compile-mode", default=None, help="torch.compile mode, e.g. max-autotune-no-cudagraphs")
    p.add_argument("--profile", action="store_true", help="record each setting's top kernels (one extra step) in the JSON")
    p.add_argument("--device", default=None, help="default: cuda when available (cpu with --tiny)")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 10; 3 with --tiny)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up steps (default 3; 1 with --tiny)")
    p.add_argument("--rounds", type=int, default=1,
                   help="run every setting this many times, in turn (standard, ddl, standard, ddl, ...); the "
                        "verdicts take each setting's median: from one invocation to the next on one H100 a "
                        "step moved by ±1 ms in 100, the size of some targets' margins")
    return p.parse_args()


def main() -> None:
    args = parse_args()
    if args.rounds < 1:
        sys.exit(f"--rounds takes a count of 1 or more, got {args.rounds}")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() and not args.tiny else "cpu"))
    cuda = device.type == "cuda"
    if args.tiny:
        config = ModelConfig(vocab_size=512, seq_len=64, n_layers=2, d_model=64, n_heads=4)
    else:
        config = ModelConfig.from_scale(args.scale, vocab_size=32000, seq_len=2048)
    setup = Setup(
        device=device, amp=torch.bfloat16 if cuda and not args.tiny else None,
        batch=args.batch or (2 if args.tiny else 8),
        warmup=args.warmup if args.warmup is not None else (1 if args.tiny else 3),
        steps=args.steps if args.steps is not None else (3 if args.tiny else 10),
        compile_mode=args.compile_mode, profile=args.profile,
    )
    modes = [m.strip() for m in (args.modes or ("eager" if args.tiny else "eager,compile")).split(",") if m.strip()]
    if not modes or set(modes) - {"eager", "compile", "plan-run"}:
        sys.exit(f"--modes takes eager, compile and/or plan-run, got {args.modes!r}")
    torch.set_float32_matmul_precision("high")
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    hand_built = None if args.hand_built is None else {m.strip() for m in args.hand_built.split(",")} - {"none"}
    try:
        import transformers
        hf_version = transformers.__version__
    except ImportError:
        hf_version = None
        if "hf-llama" in models:
            print("transformers not installed: skipping the hf-llama peer")
            models.remove("hf-llama")
    start = time.perf_counter()
    say = lambda msg: print(f"[{time.perf_counter() - start:6.1f}s] {msg}", flush=True)  # noqa: E731

    peak = measure_peak(setup)
    say(f"matmul peak {peak / 1e12:.1f} TFLOP/s on {torch.cuda.get_device_name() if cuda else platform.processor() or 'cpu'}")
    sinkhorn_check = check_fused_sinkhorn(device)
    say(f"fused sinkhorn: {sinkhorn_check}")
    attention = attention_backends(config, setup) if cuda else None
    if attention:
        say("attention (one layer, fwd+bwd): " + ", ".join(
            f"{k[:-11]} {v:.2f} ms" if isinstance(v, float) else f"{k[:-11]} {v}" for k, v in attention.items() if k.endswith("_ms")
        ) + f"; default runs {attention['default'][0]['kernel'][:60]}")
        free(device)
    meta: dict[str, Any] = {
        "command": shlex.join(["python3", *sys.argv]),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name() if cuda else f"CPU ({platform.processor() or platform.machine()})",
        "torch": torch.__version__, "cuda": torch.version.cuda, "transformers": hf_version,
        "python": platform.python_version(),
        "shape": (f"{config.n_layers} layers, d_model {config.d_model}, {config.n_heads} heads, "
                  f"SwiGLU {config.ffn_dim}, vocab {config.vocab_size}, mhc/mgt streams {config.streams}, "
                  f"Sinkhorn iterations {config.sinkhorn_iters}"),
        "batch": setup.batch, "seq_len": config.seq_len, "steps": setup.steps, "warmup": setup.warmup,
        "precision": "bf16 autocast, fp32 weights" if setup.amp else "fp32",
        "compile_mode": args.compile_mode or "default",
        "peak_tflops": peak / 1e12,
        "peak_how": "bf16 8192^3 matmul, median of 20, CUDA events" if cuda else "fp32 512^3 matmul on CPU",
        "flops_formula": "6*N + 12*L*d*T per token, no causal halving",
        "fused_sinkhorn": sinkhorn_check,
        "fused_streams": fused_streams.AVAILABLE and cuda,
        "attention": attention,
    }
    rows: list[dict[str, Any]] = []
    print(HEADER.replace("|", " ").strip(), flush=True)
    cache = Path(tempfile.mkdtemp(prefix="muse-inductor-"))  # the plan runs' shared Inductor cache
    for rnd, name, mode in itertools.product(range(args.rounds), models, modes):
        if mode == "plan-run" and name == "hf-llama":
            continue
        if mode != "plan-run" and name != "hf-llama" and (
                variant(name)[1] & {"model", "again"} or (hand_built is not None and name not in hand_built)):
            continue  # a plan's own setting (compile_scope, a second run), or left to plan-run by --hand-built
        try:
            row = plan_run(name, config, setup, cache) if mode == "plan-run" else bench(name, mode, config, setup)
        except Exception as exc:  # a failed setting is a result too; the others still run
            row = {"model": name, "mode": mode, "error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"}
        free(device)
        if args.rounds > 1:
            row["round"] = rnd
        rows.append(row)
        add_derived(rows, peak)
        summary = medians(rows)
        meta["verdicts"] = verdicts(summary or rows)
        write(args.out, meta, rows + summary)
        say(table([row])[-1])
    if cuda:
        # MFU against the higher of the two measurements: the same card's peak read 760 and 782 TFLOP/s at
        # the starts of two invocations on an H100, and the lower one would flatter every row by 3%
        meta["peak_tflops_at_end"] = measure_peak(setup) / 1e12
        say(f"matmul peak at the end {meta['peak_tflops_at_end']:.1f} TFLOP/s")
        meta["peak_tflops"] = max(meta["peak_tflops"], meta["peak_tflops_at_end"])
        add_derived(rows, meta["peak_tflops"] * 1e12)
    summary = medians(rows)
    meta["verdicts"] = verdicts(summary or rows)
    write(args.out, meta, rows + summary)
    print("\n".join(table(rows + summary)))
    for v in meta["verdicts"]:
        print(v)


if __name__ == "__main__":
    main()
