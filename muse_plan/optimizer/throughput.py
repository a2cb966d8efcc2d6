"""The throughput model: a candidate's optimizer-step time, and a plan's ETA.

Pure arithmetic on a ``TrainConfig`` (no torch), calibrated on measurements of
this project's executor, which trains eager with Accelerate or, with
``training.compile`` (on by default on a GPU for pretrain/continue/finetune),
with the blocks under torch.compile: ``cfg.compiled`` prices that.

FLOPs (``flops_per_token``), PaLM's convention, as docs/bench_architecture.md:
6·N + 12·L·d·T a trained token (2·N + 4·L·d·T forward only), attention without
causal halving. N is ``param_count``: all parameters, the tied embedding once.
Counting it is right for our tied model: the matrix is the LM head, whose
matmul costs 2·V·d a token forward, while the lookup is free. The residual
modes' parameters (mhc's maps, ddl's gate and value) are in N already; what
6N misses and this adds (x3 in training) is their parameter-free work per
connection and token: hc's n-stream reads of its dynamic weights
(2(n-1)·d(n+2)) and mixing (2n²d + 4nd); mhc's mixing (2n²d + 4nd) and
Sinkhorn (~5n² flops a half-iteration); ddl's normalise/project/update (6d);
mgt both, ddl's part on n streams. Elementwise work (norms, activations) is
not counted, as in 6N; its time is in the memory term below.

GPU time of a micro-step, seconds a token (a roofline of eager training):
  F / (peak · MATMUL_EFFICIENCY) + EAGER_TRAFFIC · L · d / bandwidth,
times the residual mode's eager slowdown and EXECUTOR_OVERHEAD, and never
less than the host's launch floor HOST_S_PER_LAYER · L a micro-step. The
memory term is what eager PyTorch's unfused norms, activations, casts and
residual adds move; it grows with d while the matmuls grow with d², so the
utilisation rises with model size. Peak: the compute dtype's dense datasheet
figure (fp32: ``peak_tflops_fp32``, since the executor leaves TF32 off; bf16
on a GPU without it: fp32's). ``UTILIZATION`` lists the resulting eager MFU
per catalog kind for a 1.3B shape (H200 0.34, H100 0.27, A100 0.39 ...).
The optimizer step adds OPTIMIZER_BYTES_PER_PARAM over memory bandwidth.

Calibration. "H200 rows": ``scripts/bench_throughput.py``, results and
command in docs/bench_throughput.md: a raw eager loop like the executor's
(autocast bf16, AdamW in its two groups, clipping, random tokens), one H200,
torch 2.11, CUDA events, mean of 10 steps after 3 warm-ups, each row beside
``step_time``'s prediction (measured/predicted 0.94-1.08 from 85M to 1.28B).
The constants were fitted to a first run of the same measurements (2026-11, a
scratch script that the bench replaces) with micro-step MFU (datasheet 989):
85M (12x768, V 260) 17.4%, 110M (12x768) 19.0%, 336M (24x1024) 24.9%, 729M
(24x1536) 30.9%, 1.28B (24x2048) 36.2%, 2.6B (32x2560) 37.0% (V 32000); the
bench's run (2026-11-22; no 2.6B row) gives 17.4, 20.9, 24.6, 30.4, 35.6%,
and every constant below that it re-derives within 11% of its value here.
- MATMUL_EFFICIENCY 0.80: measured, bf16 8192³ matmul at 784-795 TFLOP/s on
  the H200 (989 datasheet; 781 in the bench's run); 742-798 on H100s
  (docs/bench_architecture.md).
- EAGER_TRAFFIC 1420 B per layer·d_model·token: fitted (relative least squares,
  the efficiency fixed) to the six H200 micro-steps and the H100 350M eager
  step of docs/bench_architecture.md. The fit's errors: 85M -3%, 110M -10%,
  336M -1%, 729M +2%, 1.28B +4%, 2.6B -4%, H100 350M +10% (slower than seen).
  The bench's refit over its five micro-steps: 1476 (+4%).
  On kinds not measured (all but H100/H200) the table is this extrapolation.
- EAGER_TRAFFIC_MEASURED H100 1190 B: the H100's eager step is faster than the
  H200 fit scaled by the two datasheet bandwidths says (the H200's HBM3e gave
  the bench 4.2 of its 4.8 TB/s; part of eager's elementwise time does not
  scale with bandwidth at all). Fitted to the 350M standard step through
  ``muse plan run`` after the loop's pinned reads (78,508 tok/s,
  docs/bench_plan_run_pinned.json); with 1420 it was priced 12.3% slow. Against
  the other H100 eager measurements at that width: the hand-built loop of
  docs/bench_architecture.md (78,922) and the executor before its fixes
  (75,138, docs/bench_plan_run.md), -1% and +4%; the hand-built mhc, ddl and
  mgt rows through RESIDUAL_SLOWDOWN within 0.5%. One width (350M) only.
- EXECUTOR_OVERHEAD 1.035: measured, the executor's step at the 85M plan of
  docs/bench_multi_gpu.md (micro 16 x accumulation 2, 125.3 ms, 261,566 tok/s)
  over the raw loop's (2 x 59.5 ms micro-steps + 2.0 ms optimizer). The model
  predicts 270,000 tok/s there (+3%) and 493,000 on 2 GPUs (measured 478,214).
  The bench recomputes it from its own 85M rows: 1.032. Since the executor
  keeps the logits in bf16 and reads each step's numbers without draining
  the GPU (session 23) its compiled step is level with a hand-built loop's
  (+0.4%, H100, docs/bench_plan_run_pinned.json); the constant stays, as the
  compiled and eager fits below were made with it: the session's H100 rows
  come out 2.8-5.1% slow compiled and 12.3% slow eager (tests/test_throughput.py).
- HOST_S_PER_LAYER 4.15 ms: measured; the H200 runs of 4x128, 6x256 and 8x512
  decoders took 4.24, 4.14 and 4.10 ms a layer a step whatever their FLOPs,
  i.e. eager small models are bound by Python/launch time on that host. The
  bench's micro-steps: 4.04, 3.59 and 3.51 ms a layer (mean 3.72, -10%; the
  host's speed varies between machines of one kind).
- Compiled (``cfg.compiled``): COMPILED_TRAFFIC 315 B per layer·d_model·token in
  place of EAGER_TRAFFIC, fitted to standard through ``muse plan run`` on an H100
  (``scripts/bench_architecture.py --modes plan-run``, docs/bench_architecture_scope.md):
  350M (24x1024, micro 8) at 163,863 tok/s fits 312, 1.3B (24x2048, micro 4) at
  53,165 fits 319 — one constant for two widths. A residual mode adds its own
  traffic (``ResidualMode.compiled_traffic``, by stream dtype) rather than
  multiplying the step: its state is n·d_model wide, so its share falls with
  width as measured (mhc's bf16 state +57% at 350M, +34% at 1.3B: 457 and 416
  B fitted, one constant 440 for both). With ``training.fused_kernels: on``
  and a bf16 state, mhc's connection runs ``fused_mhc`` and is priced at
  ``ResidualMode.fused_traffic`` 620 B, fitted to its plan run on an H100
  (docs/bench_architecture_mhc_four_h100.json: 91,599 tok/s, 178.9 ms a step
  against standard's 101.5 in the call before it on the same machine), slower
  than torch's fusion (440 B), so the optimizer does not offer it. An earlier
  form (the state's gradient a stream at a time, spilling) measured 320 B on
  an H200 (docs/bench_architecture_fused.json). mgt's
  fused kernels (``fused_streams``' maps, read, dots and write) are priced at
  470 B, fitted to its row on an H100 (docs/bench_architecture_fused_h100.json,
  102,351 tok/s), where torch's 673 B predicted 13.5% too slow. ddl's
  ``fused_delta`` replayed from CUDA graphs (``fused_graphs_traffic``) is
  priced at 56 B, fitted to its overhead over standard in three H100
  invocations (+7.9, +5.5, +7.7%), where torch's 74 B said +9.2%; without
  graphs it measured +9.7% and keeps torch's price (``fused_traffic``).
  COMPILED_HOST_S_PER_LAYER 2.1 ms is assumed (half eager's: a compiled block
  launches a few fused kernels where eager launches one per operation); the
  350M compiled row bounds it above, being GPU-bound at 3.8 ms a layer (95.5 of
  102 ms busy, docs/profile_plan_run_standard.json).
- FUSED_OPTIMIZER_BYTES_PER_PARAM 50: the executor's optimizer on one GPU or
  under DDP since it runs torch's fused AdamW with the clipping folded into its
  kernel: the 350M decoder's profile through ``muse plan run`` on an H100
  (scripts/profile_plan_run.py) has 4.1 ms of fused AdamW and ~1 ms of norm
  a step for 336M parameters, i.e. 51 B a parameter at 3.35 TB/s.
- OPTIMIZER_BYTES_PER_PARAM 120: clipping plus foreach AdamW (the executor's
  under ZeRO-1 on several processes and FSDP) make ~12 passes over fp32
  tensors; fitted to the H200 rows' optimizer timings
  (2.0 ms at 85M from accumulation 1/2/4; 34 ms at 1.28B, 69 ms at 2.6B). The
  bench times clip + AdamW alone: 9.1, 19.1 and 32.8 ms at 336M, 729M and
  1.28B, i.e. 126 B a parameter (+5%).
- RESIDUAL_SLOWDOWN (GPU, eager, step time vs standard): measured on an H100 at
  350M (docs/bench_architecture.md): mhc 2.835, ddl 1.581, mgt 3.577; hc 2.0 is
  assumed (mhc less Sinkhorn; the CPU ratio hc/mhc = 0.73 supports it). At 85M
  on the H200 mhc measured 3.29x and ddl 1.64x in the first (scratch) run; the
  bench does not time residual modes. The penalty grows at small d.
- CPU: CPU_RESIDUAL_SLOWDOWN measured on this project's 2-core machine (the
  quickstart shape, DecoderLM steps timed directly: standard 21,996 tok/s, hc
  12,797, mhc 9,302, ddl 19,590, mgt 7,358). CPU_FLOPS_PER_CORE (effective, the
  executor's overhead included) calibrated on ``muse plan run quickstart-cpu``
  (4x128, seq 128, vocab 260, mhc n=4, micro 16, fp32): median 6,340 tok/s on
  2 cores (steps after the 10th), so 51.9 GFLOP/s a core; the optimizer's
  time is inside it. Scaling with cores is assumed linear.

Communication, once per optimizer step (the executor accumulates under
``no_sync``), ring volumes per process: ddp (several processes, any sharding
less than zero3) all-reduces fp32 gradients, 2(W-1)/W · 4 B per trainable
parameter; zero1/zero2's reduce-scatter + all-gather move the same; zero3/fsdp
add parameter all-gathers in each micro-step's forward and backward (fp32
weights), 1.5x DDP's volume at one micro-step a step. The link: within a host
the catalog's interconnect x NCCL_EFFICIENCY (0.8, assumed); across hosts
(``network_gbps`` given, or more than GPUS_PER_HOST processes) the network
x NCCL_EFFICIENCY. OVERLAP (0.5, assumed) of a transfer hides behind the last
backward (zero3's gathers behind all compute); beyond that window it is exposed.
SYNC_OVERHEAD_S (4.2 ms a step on several GPUs) is calibrated: on 2 H200s
(docs/bench_multi_gpu.md, 1.83x) DDP cost ~4.6 ms a step, while 341 MB of
gradients over NVLink would expose ~0.5 ms. What the rest is was not
measured: DDP's host work (its hooks on an 85M model that is near the host
floor), its bucket copies and end-of-backward wait, or a slower link than
NVLink (how that machine's GPUs were linked was not recorded). Taking it as
a fixed cost keeps large models on NVLink at NVLink's bandwidth; read as a
36 GB/s link instead, an 8xH100 ZeRO-3 7B step would be predicted 2x slower.
A second DDP measurement at another size would tell the two apart.

Offload over PCIe (PCIE_GBS 25 GB/s effective, assumed: PCIe 4.0 x16 moves
~25 of its 32 GB/s pinned; Gen5 hosts do better): ``optimizer`` moves the fp32
gradients down and the weights up each step (8 B/param) and runs AdamW on
the host at CPU_ADAM_S_PER_PARAM (4 ns, i.e. ~1 GB/s of fp32 parameters;
assumed, a vectorised multi-core CPU Adam), on the critical path; ``parameters``
adds the weights (compute dtype) up in each forward and backward, overlapped
with compute as communication is.

GRPO sampling (``cfg.generation``), per micro-step: prefill of prompts·G
sequences at the forward rate; then each generated token is one decode step
for the whole batch, memory-bound: one read of the weights (compute dtype, NF4
under QLoRA) plus the batch's KV cache at its mean length, over bandwidth x
DECODE_BANDWIDTH_EFFICIENCY (0.7, assumed), or the batch's FLOPs, or the host
floor of an eager forward (FORWARD_HOST_SHARE of an eager micro-step's), whichever
is slowest; a decode step replayed from a CUDA graph or compiled first
(``GenerationConfig.decode``, from ``training.compile``) has DECODE_FLOOR of that
floor; where the decode is kept between rollouts (``memory.keeps_decodes``) its prefill,
replayed from a graph too, costs PREFILL_REPLAYED of it, and where it is not, capturing the
step again each rollout CAPTURE_FLOOR (15.0 ms measured, 1.46 of the floor); and the
reference model's forward over every sampled token when it is kept.
Fitted to rollouts through ``muse plan run`` on an H100 (docs/bench_grpo.md, last two
sections: the 38.7M decoder, 128 rows, 112 new tokens, a prefill and a reference
forward a rollout): ``compile: off`` 1.17 s a rollout, a forward's floor of 10.3 ms
(0.20 of the micro-step's); ``auto`` (compiled, the decode kept between rollouts)
0.097 s: a 3.7 ms prefill (0.36 of the floor), a 10.8 ms compiled reference, 0.74 ms a
decode step with rewards and text folded in (0.0715); replayed uncompiled 1.86× the
compiled step, measured while each rollout still captured its step (0.222).

LoRA: the frozen base still runs forward and passes activation gradients down
to the lowest adapted layer (no weight gradients): training FLOPs are the
forward, 2·N_head + L_a·(2·N_layer + 8·d·T) for those gradients, and 6 an
adapter parameter. Time scales with the FLOPs; QLoRA's NF4 dequantisation
costs QLORA_SLOWDOWN (1.3, assumed) on top.

Recomputation: ``full`` runs every block's forward again (the head excepted);
``selective`` the SwiGLU hidden (gate and up matmuls, 4·d·ffn a token a layer).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

from engines.architecture.config import ModelConfig, param_count, stored_param_count
from engines.architecture.modes import RESIDUAL_MODES, fused_price
from muse_plan.hardware.catalog import CATALOG, GpuKind
from muse_plan.optimizer import memory
from muse_plan.optimizer.config import TrainConfig

TERA, GIGA = 1e12, 1e9
FP32 = 4

MATMUL_EFFICIENCY = 0.80
EAGER_TRAFFIC = 1420.0  # bytes per layer · d_model · trained token (bf16/fp16 autocast)
# where a kind's eager step was measured apart from the H200 rows the constant above was fitted to (module doc)
EAGER_TRAFFIC_MEASURED = {"H100": 1190.0}
COMPILED_TRAFFIC = 315.0  # the same with the blocks compiled: Inductor fuses the elementwise work
COMPILED_HOST_S_PER_LAYER = 2.1e-3  # assumed: a compiled micro-step's launches (module doc)
FP32_TRAFFIC = 1.5  # assumed: fp32 moves more, though autocast keeps much traffic fp32
EXECUTOR_OVERHEAD = 1.035
HOST_S_PER_LAYER = 4.15e-3  # a micro-step's forward + backward, eager
OPTIMIZER_BYTES_PER_PARAM = 120
FUSED_OPTIMIZER_BYTES_PER_PARAM = 50  # torch's fused AdamW with the clipping folded in (executor/optimizers.py)

# each residual mode's measured step-time factor against standard: its record's step_cost (modes.py)
RESIDUAL_SLOWDOWN = {name: m.step_cost_gpu for name, m in RESIDUAL_MODES.items()}
CPU_RESIDUAL_SLOWDOWN = {name: m.step_cost_cpu for name, m in RESIDUAL_MODES.items()}
CPU_FLOPS_PER_CORE = 51.9e9
CPU_MEMORY_GBS = 20.0  # assumed: decode on a CPU reads weights at ~20 GB/s
CPU_ALLREDUCE_GBS = 5.0  # assumed: gloo between processes of one host

OVERLAP = 0.5
SYNC_OVERHEAD_S = 4.2e-3
NCCL_EFFICIENCY = 0.8
GPUS_PER_HOST = 8
DEFAULT_NETWORK_GBPS = 100.0  # assumed where a plan spans hosts and names no network

PCIE_GBS = 25.0
CPU_ADAM_S_PER_PARAM = 4e-9
DECODE_BANDWIDTH_EFFICIENCY = 0.7
# an eager forward's host floor against an eager micro-step's (forward and backward), and a decode
# step's against that forward's, by how the step runs (GenerationConfig.decode); module doc
FORWARD_HOST_SHARE = 0.20
DECODE_FLOOR = {"eager": 1.0, "graphs": 0.222, "compiled": 0.0715}
# against that forward's floor: muse's decoder's prefill replayed from a CUDA graph (a decode kept between
# rollouts, memory.keeps_decodes), and capturing the decode step each rollout where none is kept
PREFILL_REPLAYED, CAPTURE_FLOOR = 0.36, 1.46
QLORA_SLOWDOWN = 1.3

DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


# ---- FLOPs ----------------------------------------------------------------------

def _residual_extra(c: ModelConfig) -> float:
    """Forward FLOPs one residual connection adds a token beyond 6N's count (its record's)."""
    return RESIDUAL_MODES[c.residual].extra_flops(c)


def flops_per_token(model: ModelConfig, *, training: bool = True) -> float:
    """6N + 12·L·d·T (+ residual work) a trained token; 2N + 4·L·d·T forward only."""
    c = model
    attention = 4 * c.n_layers * c.d_model * c.seq_len  # QK^T and AV, no causal halving
    forward = 2 * param_count(c) + attention + 2 * c.n_layers * _residual_extra(c)  # two connections a layer
    return 3 * forward if training else forward


def _forward_layers(c: ModelConfig) -> float:
    """Forward FLOPs a token of the blocks alone (what full checkpointing redoes)."""
    head = 2 * (c.vocab_size * c.d_model + c.d_model)
    return flops_per_token(c, training=False) - head


def _lora_flops(cfg: TrainConfig) -> float:
    """Training FLOPs a token with a frozen base: forward, activation gradients
    down to the lowest adapted layer, adapters' forward and both gradients."""
    c, lora = cfg.model, cfg.lora
    adapted = memory.lora_layers(c, lora)
    head = c.vocab_size * c.d_model
    per_layer = (param_count(c) - head - c.d_model) / c.n_layers
    # activation gradients: the weights' matmuls once more, attention's and the residual's twice
    layer_backward = 2 * per_layer + 8 * c.d_model * c.seq_len + 4 * _residual_extra(c)
    backward = 2 * head + adapted * layer_backward
    return flops_per_token(c, training=False) + backward + 6 * memory.lora_param_count(cfg)


def _time_scale(cfg: TrainConfig) -> float:
    """Time of ``cfg``'s training FLOPs against a full model's (LoRA's share, QLoRA's cost)."""
    if cfg.lora is None:
        return 1.0
    share = _lora_flops(cfg) / flops_per_token(cfg.model)
    return share * (QLORA_SLOWDOWN if cfg.lora.quantize_base == "4bit" else 1.0)


def train_flops(cfg: TrainConfig) -> float:
    """FLOPs a trained token under ``cfg`` (LoRA aware), recomputation excluded."""
    return _lora_flops(cfg) if cfg.lora else flops_per_token(cfg.model)


def recompute_flops(cfg: TrainConfig) -> float:
    """FLOPs a token run again: by activation checkpointing, and by log-probs taken through the head
    a chunk at a time, whose backward recomputes the head's product (``memory.chunked_head``)."""
    c = cfg.model
    head = 2.0 * c.vocab_size * c.d_model if memory.chunked_head(cfg) else 0.0
    if cfg.checkpointing == "full":
        return _forward_layers(c) + head
    if cfg.checkpointing == "selective":
        return 4 * c.d_model * c.ffn_dim * c.n_layers + head  # gate and up projections
    return head


# ---- how fast a device trains -----------------------------------------------------

def peak_flops(gpu: GpuKind, precision: str) -> float:
    if precision == "fp16":
        return gpu.peak_tflops_fp16 * TERA
    if precision == "bf16" and gpu.bf16:
        return gpu.peak_tflops_bf16 * TERA
    return gpu.peak_tflops_fp32 * TERA  # fp32, or bf16 emulated where the card lacks it


def cpu_flops(cores: int) -> float:
    """Effective FP32 FLOP/s of ``cores`` CPU cores in the executor (see module doc)."""
    return max(1, cores) * CPU_FLOPS_PER_CORE


def _gpu_s_per_token(cfg: TrainConfig, gpu: GpuKind) -> float:
    """Seconds a trained token on one GPU, before the host floor."""
    c = cfg.model
    mode = RESIDUAL_MODES[c.residual]
    if cfg.compiled:  # the mode's cost is the bytes it moves (modes.py compiled_traffic)
        fused = fused_traffic(c, cfg.cuda_graphs)
        traffic = COMPILED_TRAFFIC + (fused if fused is not None else mode.compiled_traffic[c.stream_dtype == "bfloat16"])
        slowdown = 1.0
    else:
        traffic, slowdown = eager_traffic(gpu), RESIDUAL_SLOWDOWN[c.residual]
    traffic *= FP32_TRAFFIC if cfg.precision == "fp32" else 1.0
    seconds = (flops_per_token(c) / (peak_flops(gpu, cfg.precision) * MATMUL_EFFICIENCY)
               + traffic * c.n_layers * c.d_model / (gpu.memory_bandwidth_gbs * GIGA))
    return seconds * _time_scale(cfg) * slowdown * EXECUTOR_OVERHEAD


def eager_traffic(gpu: GpuKind) -> float:
    """The bytes an eager micro-step moves a layer · d_model · token on ``gpu``: its own fit where measured."""
    return EAGER_TRAFFIC_MEASURED.get(gpu.key, EAGER_TRAFFIC)


def fused_traffic(c: ModelConfig, graphs: bool) -> float | None:
    """The bytes a layer · d_model · token this model's fused kernels add to a compiled step, as measured
    (``ResidualMode.fused_graphs_traffic`` where the regions replay CUDA graphs and that was timed, else
    ``fused_traffic``): with ``fused_kernels: on``, for ddl, and for mhc / mgt with a bf16 state of 4
    streams (``fused_mhc.usable``). The kernels run under any precision (they read the bf16 state), so the
    price holds under each, though it was timed under bf16 mixed precision: priced as torch's fusion under
    fp16, the kernels made fp16 look faster and the optimizer chose it, where the same kernels would run.
    None: priced as torch's own fusion (``eager`` runs none under compile; a form never timed)."""
    return fused_price(c, graphs) if c.fused_kernels == "on" else None


def fused_priced(c: ModelConfig, graphs: bool = False) -> bool:
    """Whether the model prices this model's fused kernels as measured (``fused_traffic``)."""
    return fused_traffic(c, graphs) is not None


def optimizer_bytes_per_param(cfg: TrainConfig) -> float:
    """Memory traffic of one optimizer step a parameter on a GPU: the executor's fused
    AdamW where it runs one (one process or DDP, ZeRO-1 on one process), else the
    multi-tensor AdamW after a separate clipping pass (ZeRO, FSDP)."""
    fused = cfg.optimizer == "adamw" and (cfg.sharding in ("none", "ddp")
                                         or (cfg.sharding == "zero1" and cfg.world_size == 1))
    return FUSED_OPTIMIZER_BYTES_PER_PARAM if fused else OPTIMIZER_BYTES_PER_PARAM


def _host_floor(c: ModelConfig, compiled: bool = False, graphs: bool = False) -> float:
    """The host's launch time of a micro-step: eager's measured, by the mode's launches;
    compiled blocks' assumed (COMPILED_HOST_S_PER_LAYER), the mode fused into them; none
    assumed where the compiled regions replay CUDA graphs (a replay a region)."""
    if graphs:
        return 0.0
    if compiled:
        return COMPILED_HOST_S_PER_LAYER * c.n_layers * EXECUTOR_OVERHEAD
    return HOST_S_PER_LAYER * c.n_layers * RESIDUAL_SLOWDOWN[c.residual] * EXECUTOR_OVERHEAD


def _cpu_s_per_token(cfg: TrainConfig, cores: int) -> float:
    slowdown = CPU_RESIDUAL_SLOWDOWN[cfg.model.residual] * _time_scale(cfg)
    return flops_per_token(cfg.model) * slowdown / cpu_flops(cores)


def _s_per_token(cfg: TrainConfig, gpu: GpuKind | None, cpu_cores: int | None) -> float:
    if gpu is not None:
        return _gpu_s_per_token(cfg, gpu)
    cores = max(1, (cpu_cores or os.cpu_count() or 1) // cfg.world_size)  # processes share the cores
    return _cpu_s_per_token(cfg, cores)


def utilization(model: ModelConfig, gpu: GpuKind, precision: str = "bf16", micro_batch: int = 8) -> float:
    """Eager MFU the executor reaches on ``gpu`` for ``model`` (compute only)."""
    cfg = TrainConfig(model=model, micro_batch=micro_batch, precision=precision)
    tokens = micro_batch * model.seq_len
    seconds = max(tokens * _gpu_s_per_token(cfg, gpu), _host_floor(model))
    return flops_per_token(model) * tokens / seconds / peak_flops(gpu, precision)


REFERENCE_MODEL = ModelConfig(vocab_size=32000, seq_len=2048, n_layers=24, d_model=2048, n_heads=16)
# eager bf16 (fp16 where the card has no bf16) MFU of a 1.3B decoder, micro 8 x 2048
UTILIZATION: dict[str, float] = {
    k: round(utilization(REFERENCE_MODEL, g, "bf16" if g.bf16 else "fp16"), 3) for k, g in CATALOG.items()
}


# ---- communication and offload ----------------------------------------------------

def link_gbs(gpu: GpuKind | None, world_size: int, network_gbps: float | None) -> float:
    """Effective GB/s of the gradient ring's slowest link."""
    if gpu is None:
        return CPU_ALLREDUCE_GBS
    within = gpu.interconnect_gbs * NCCL_EFFICIENCY
    if network_gbps is None and world_size <= GPUS_PER_HOST:
        return within
    network = (network_gbps or DEFAULT_NETWORK_GBPS) / 8 * NCCL_EFFICIENCY
    return min(within, network)


def comm_bytes(cfg: TrainConfig) -> tuple[float, float]:
    """Bytes one process sends in a step: (gradient sync, zero3/fsdp parameter gathers)."""
    w = cfg.world_size
    if w <= 1:
        return 0.0, 0.0
    ring = (w - 1) / w
    grads = 2 * ring * FP32 * memory.trainable_param_count(cfg)
    gathers = 0.0
    if cfg.sharding in ("zero3", "fsdp"):
        grads /= 2  # reduce-scatter only; the gathers below replace the all-gather
        gathers = cfg.grad_accum * 2 * ring * FP32 * stored_param_count(cfg.model)
    return grads, gathers


def _exposed(seconds: float, window: float) -> float:
    """What of a transfer compute cannot hide: at least (1 - OVERLAP), all past the window."""
    return max((1 - OVERLAP) * seconds, seconds - window)


def offload_seconds(cfg: TrainConfig, compute_s: float) -> float:
    """PCIe traffic and the host's AdamW that offloading adds to a step (exposed part)."""
    if cfg.offload == "none":
        return 0.0
    shards = cfg.world_size if cfg.sharding != "none" and cfg.sharding != "ddp" else 1
    trainable = memory.trainable_param_count(cfg) / shards
    seconds = 8 * trainable / (PCIE_GBS * GIGA) + trainable * CPU_ADAM_S_PER_PARAM
    if cfg.offload == "parameters":
        weights = stored_param_count(cfg.model) * DTYPE_BYTES[cfg.precision] / (
            cfg.world_size if cfg.sharding in ("zero3", "fsdp") else 1)
        seconds += _exposed(2 * cfg.grad_accum * weights / (PCIE_GBS * GIGA), compute_s)
    return seconds


# ---- GRPO sampling ------------------------------------------------------------------

def generation_seconds(cfg: TrainConfig, gpu: GpuKind | None, fwd_s_per_token: float) -> float:
    """Sampling time of one micro-step: prefill, decode, the reference model's forward."""
    g, c = cfg.generation, cfg.model
    if g is None:
        return 0.0
    batch = g.prompts * g.group_size
    dtype = DTYPE_BYTES[cfg.precision]
    per_param = memory.NF4_BYTES if cfg.lora and cfg.lora.quantize_base == "4bit" else dtype
    kv_token = 2 * c.n_layers * c.kv_heads * c.head_dim * dtype
    read = param_count(c) * per_param + batch * kv_token * (g.prompt_tokens + g.completion_tokens / 2)
    floor = 0.0
    if gpu is None:
        bandwidth = CPU_MEMORY_GBS * GIGA
    else:
        bandwidth = gpu.memory_bandwidth_gbs * GIGA * DECODE_BANDWIDTH_EFFICIENCY
        floor = _host_floor(c) * FORWARD_HOST_SHARE
    decode_step = max(read / bandwidth, batch * fwd_s_per_token, floor * DECODE_FLOOR[g.decode])
    kept = memory.keeps_decodes(cfg)  # the prefill replayed, the step captured once (not each rollout)
    prefill = max(batch * g.prompt_tokens * fwd_s_per_token, floor * (PREFILL_REPLAYED if kept else 1.0))
    capture = floor * CAPTURE_FLOOR if g.decode != "eager" and not kept else 0.0
    sampled = batch * (g.prompt_tokens + g.completion_tokens)
    reference = max(sampled * fwd_s_per_token, floor) if g.reference_model else 0.0
    return prefill + capture + g.completion_tokens * decode_step + reference


# ---- one optimizer step ---------------------------------------------------------------

@dataclass(frozen=True)
class StepTime:
    """One optimizer step of one candidate; the parts add up to ``seconds``.

    ``comm_s`` and ``offload_s`` are what compute does not hide. ``mfu`` is
    model FLOPs (no recomputation) against the GPUs' datasheet peak; None on CPU.
    """

    seconds: float
    compute_s: float
    recompute_s: float
    comm_s: float
    offload_s: float
    tokens_per_s: float
    mfu: float | None
    optimizer_s: float = 0.0
    generation_s: float = 0.0


def step_time(cfg: TrainConfig, gpu: GpuKind | None, *, cpu_cores: int | None = None,
              network_gbps: float | None = None) -> StepTime:
    """Predicted time of one optimizer step of ``cfg`` on ``gpu`` (None: the CPU)."""
    c = cfg.model
    tokens = cfg.micro_batch * c.seq_len  # a micro-step of one process
    s_per_token = _s_per_token(cfg, gpu, cpu_cores)
    if gpu is None:
        micro = tokens * s_per_token
        optimizer = 0.0  # inside the calibrated CPU rate
    else:
        micro = max(tokens * s_per_token, _host_floor(c, cfg.compiled, cfg.cuda_graphs))
        stepped = memory.trainable_param_count(cfg)
        if cfg.sharding in ("zero1", "zero2", "zero3", "fsdp"):
            stepped /= cfg.world_size
        optimizer = 0.0 if cfg.offload != "none" else (
            optimizer_bytes_per_param(cfg) * stepped / (gpu.memory_bandwidth_gbs * GIGA))
    compute = cfg.grad_accum * micro
    recompute = compute * recompute_flops(cfg) / train_flops(cfg)
    grads, gathers = comm_bytes(cfg)
    link = link_gbs(gpu, cfg.world_size, network_gbps) * GIGA
    backward = micro * 2 / 3  # the last micro-step's backward hides the gradient sync
    comm = _exposed(grads / link, backward) + _exposed(gathers / link, compute)
    if gpu is not None and cfg.world_size > 1:
        comm += SYNC_OVERHEAD_S
    offload = 0.0 if gpu is None else offload_seconds(cfg, compute)
    forward = (s_per_token if cfg.lora is None else _s_per_token(cfg.with_(lora=None), gpu, cpu_cores)) / 3
    generation = cfg.grad_accum * generation_seconds(cfg, gpu, forward)
    seconds = compute + recompute + optimizer + comm + offload + generation
    tokens_per_s = cfg.tokens_per_step / seconds
    mfu = None if gpu is None else (
        train_flops(cfg) * tokens_per_s / (cfg.world_size * peak_flops(gpu, cfg.precision)))
    return StepTime(seconds, compute, recompute, comm, offload, tokens_per_s, mfu, optimizer, generation)


# ---- stages, the plan's ETA, and what would meet the timeline ------------------------

def stage_seconds(steps: int, st: StepTime) -> float:
    return steps * st.seconds


@dataclass
class Eta:
    total_s: float
    per_stage: list[tuple[str, float]]
    timeline_s: float | None
    meets: bool | None  # None: the plan has no timeline


def eta(stages: list[tuple[str, int, StepTime]], timeline_s: float | None) -> Eta:
    per_stage = [(name, stage_seconds(steps, st)) for name, steps, st in stages]
    total = sum(s for _, s in per_stage)
    return Eta(total, per_stage, timeline_s, None if timeline_s is None else total <= timeline_s)


@dataclass(frozen=True)
class Meets:
    """What it takes to finish within the timeline, in numbers the CLI words.

    ``speedup``: predicted time / timeline (≤ 1: it already meets it).
    ``token_fraction``: the share of the stages' steps (tokens) that fits.
    ``world_size``: the fewest GPUs of the same kind, at the same global batch,
    predicted to meet it (None: none up to the search limit, or a CPU plan).
    ``cpu_cores``: for a CPU plan, cores at the calibrated linear scaling.
    """

    speedup: float
    token_fraction: float
    world_size: int | None
    cpu_cores: int | None


def _resized(cfg: TrainConfig, world_size: int) -> TrainConfig | None:
    """``cfg`` on ``world_size`` processes at the same global batch, or None."""
    per_process, rest = divmod(cfg.global_batch, world_size)
    if rest or per_process < 1:
        return None
    micro = max(m for m in range(1, min(cfg.micro_batch, per_process) + 1) if per_process % m == 0)
    return cfg.with_(world_size=world_size, micro_batch=micro, grad_accum=per_process // micro)


def _candidate_sizes(current: int, limit: int) -> list[int]:
    small = range(current + 1, min(limit, GPUS_PER_HOST) + 1)
    return [*small, *range(max(GPUS_PER_HOST, current) + GPUS_PER_HOST, limit + 1, GPUS_PER_HOST)]


def what_meets(stages: list[tuple[str, int, TrainConfig]], gpu: GpuKind | None, timeline_s: float, *,
               cpu_cores: int | None = None, network_gbps: float | None = None,
               max_world_size: int = 1024) -> Meets:
    """The speedup a plan needs to meet ``timeline_s``, and two ways to get it."""
    def total(world: int | None) -> float | None:
        seconds = 0.0
        for _, steps, cfg in stages:
            sized = cfg if world is None else _resized(cfg, world)
            if sized is None:
                return None
            seconds += steps * step_time(sized, gpu, cpu_cores=cpu_cores, network_gbps=network_gbps).seconds
        return seconds

    now = total(None) or 0.0
    speedup = now / timeline_s if timeline_s > 0 else math.inf
    fraction = min(1.0, timeline_s / now) if now > 0 else 1.0
    if gpu is None:
        cores = cpu_cores or os.cpu_count() or 1
        return Meets(speedup, fraction, None, math.ceil(cores * max(1.0, speedup)))
    current = max((cfg.world_size for _, _, cfg in stages), default=1)
    if speedup <= 1:
        return Meets(speedup, fraction, current, None)
    for world in _candidate_sizes(current, max_world_size):
        seconds = total(world)
        if seconds is not None and seconds <= timeline_s:
            return Meets(speedup, fraction, world, None)
    return Meets(speedup, fraction, None, None)
