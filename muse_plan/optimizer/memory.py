"""The memory model: one GPU's peak during a training step, as a named breakdown.

Pure arithmetic on a ``TrainConfig`` (no torch), so the fit search can price
hundreds of candidates while the CLI starts. Tools that count only weights,
gradients and Adam's moments (Accelerate's ``estimate-memory``) miss what
usually decides a fit: activations, the logits and the optimizer's
temporaries. Sizes are bytes per process (per GPU).

The peak is the larger of two moments of a step: the backward's start (every
activation saved, the head's gradient buffers) and the optimizer step (the
activations freed, every gradient and the optimizer's temporaries). The terms
sum to it: each is what it holds at the backward's start, and ``transient``
is what the peak needs beyond them.

Terms, per process (P: parameters of ``DecoderLM``, ``param_count``):
- ``weights``: 4P (the fp32 master weights autocast reads; no separate master
  copy). LoRA: the frozen base in the compute dtype (2 B/param under
  bf16/fp16, 4 in fp32 and where FSDP shards it) or, with ``quantize_base: 4bit``, the blocks'
  projections in NF4 with double-quantised constants (QLoRA, Dettmers et al.
  2023: 4 bits + 8-bit absmax per 64 + fp32 per 256 blocks ≈ 0.516 B/param;
  the embedding, norms and residual parameters stay in the compute dtype), plus
  the adapters in fp32 (r·(d_in + d_out) per adapted projection).
- ``gradients``: fp32 .grad, 4 B per trainable parameter, alive at the
  backward's start: all of them when micro-steps accumulate (or LoRA, or
  ZeRO/FSDP buffers); with one micro-step a step only the tied head's, since
  the executor's ``zero_grad(set_to_none=True)`` lets .grad grow layer by layer
  as the activations are freed (the rest appear at the step, in
  ``transient`` when that moment is the peak). DDP on several processes adds
  a full copy: its reducer's flat buckets (``gradient_as_bucket_view=False``,
  Accelerate's default); the executor's model is DDP-wrapped on several
  processes under ``none`` and ``zero1`` too (measured on 2× H200: ``none``
  peaked at 2.73 GiB, the DDP prediction 2.68).
- ``optimizer``: AdamW's two fp32 moments, 8 B per trainable parameter; its
  ``step`` counters are host scalars (PyTorch keeps them on the CPU unless
  fused/capturable) and are not counted. ``adamw_8bit`` (bitsandbytes): two
  uint8 states (2 B) plus an fp32 absmax per 256-element block each and two
  256-entry fp32 quantisation maps per tensor; tensors under 4096 elements keep
  fp32 states (8 B), as bitsandbytes does.
- ``activations``: ``activations.activation_bytes`` for one micro-batch (see
  that module: derived op by op from the model and checked against autograd).
- ``transient``: beyond the terms above, the larger of (a) the backward's
  working buffers: the log-softmax backward's two fp32 (tokens × V)
  gradients (one under CUDA autocast, whose nll runs on an fp32 copy), or a
  block's: the stream gradient, three (tokens × F) MLP gradients and the
  largest weight gradient before it joins .grad; plus one gathered layer's
  parameters under ZeRO-3/FSDP; and (b) the optimizer step's: the gradients
  not yet counted plus foreach AdamW's sqrt(v) for every parameter it steps
  (4 B each, PyTorch's default on CUDA), less the freed activations.
- ``generation`` (GRPO stages): the KV cache for prompts × G × (prompt +
  completion) tokens (2 · layers · kv_heads · head_dim values a token, in the
  compute dtype), the reference model for the KL term (a frozen copy in the
  compute dtype under full fine-tuning; nothing under LoRA, whose reference
  is the same model with the adapters off), under full fine-tuning in mixed
  precision that decodes on a GPU the copy sampling decodes from (the compute
  dtype), and the sampling logits
  (prompts × G × V, in the compute dtype and fp32). The GRPO engine samples, frees the cache, then trains, so
  the cache and logits count only for what they need beyond the training
  step's activations and transient buffers (the reference and the copy stay alive). Where
  muse's decoder replays captured decode steps, the caches kept for the next rollout (at most
  ``KEPT_DECODE_BYTES``) and the step's logits stay alive through the update too (``kept_decode_bytes``).
- compiled training (``cfg.compiled``, on CUDA): the activation term as Inductor's partitioner
  leaves it (``activations.COMPILED_BLOCK_SHARE``, measured per connection form of muse's decoder;
  a Hugging Face model's compiled blocks are priced as eager, not measured), and the compiled
  loss head's backward buffer, its logits' gradient in the compute dtype. Against the runs
  through ``muse plan run`` since the executor keeps the logits in the compute dtype (standard,
  ddl and mhc at 350M, CUDA graphs on and off) the total without ``overhead`` came within 0.5%
  of the store's peak; against 15 earlier ones (350M and 1.3B; standard, ddl, mgt and mhc, with
  and without graphs), within 1% once the two tensors the executor no longer makes are added
  back (docs/bench_memory_model.md, last section).
- ``overhead``: ``CUDA_CONTEXT_BYTES`` plus ``FRAGMENTATION`` of the other
  device terms; 0 on CPU.
- ``host``: bytes offloaded to host RAM (per process).

Sharding (``world_size`` processes): zero1 divides the optimizer state,
zero2 also the gradients, zero3/fsdp also the weights. Offload ``optimizer``
is the executor's ``HostAdamW`` (``executor/optimizers.py``): the host holds
the optimizer state, an fp32 master copy of every parameter it steps and a
fp32 buffer its gradient is copied into (4 + 4 B each beside the state); the
device keeps the fp32 weights autocast reads and the gradients, and its step
builds no temporaries there. ``parameters`` moves the weights and the
optimizer state, keeping one layer's weights on the device (priced for the
fit; the executor does not run it yet).

Checked on an H200 (PyTorch 2.11): over 14 runs of 125M-1.3B models (every
residual mode, each checkpointing, fp32 and bf16, accumulation 1 and 2, the
executor's loop), the total without ``overhead`` was within -2.6% to +10.7%
of ``torch.cuda.max_memory_allocated`` (over only with full checkpointing,
whose recomputed block we count beside the head's saved tensors), and the
total within -7% to +5% of the memory in use (allocator reserve + context).
``scripts/bench_memory_model.py`` (docs/bench_memory_model.md) re-checks it with
LoRA and the GRPO engine's sampling step: 20 configurations, median |error|
1.8%, worst 16.9% (full checkpointing, as above).
"""

from __future__ import annotations

import math
from dataclasses import astuple, dataclass, fields

from engines.architecture.activation_terms import LOGPROB_CHUNK_BYTES
from engines.architecture.config import ModelConfig, stored_param_count
from engines.architecture.modes import RESIDUAL_MODES
from engines.grpo.options import KEPT_DECODE_BYTES, KEPT_DECODES
from muse_plan.optimizer import activations as act
from muse_plan.optimizer.config import FSDP_SHARDING, LoraConfig, TrainConfig

FP32 = 4
# measured on an H200 (PyTorch 2.11, CUDA 13): 767-771 MiB outside PyTorch's allocator after a
# training step (context, cuBLAS/cuDNN handles and workspaces, loaded kernels)
CUDA_CONTEXT_BYTES = 768 * 2**20
# reserved over allocated at the peak, same runs: 1.5-19% (mean 9%), highest with full checkpointing
FRAGMENTATION = 0.10
NF4_BYTES = 0.5 + 1 / 64 + 4 / (64 * 256)  # QLoRA NF4 with double-quantised absmax
BNB_BLOCK, BNB_MIN_8BIT, BNB_QMAP = 256, 4096, 256  # bitsandbytes 8-bit optimizer layout

# LoRA's target names (Hugging Face's Llama) → our projection: (d_in, d_out) from the config
PROJECTIONS = {
    "q_proj": lambda c: (c.d_model, c.n_heads * c.head_dim),
    "k_proj": lambda c: (c.d_model, c.kv_heads * c.head_dim),
    "v_proj": lambda c: (c.d_model, c.kv_heads * c.head_dim),
    "o_proj": lambda c: (c.n_heads * c.head_dim, c.d_model),
    "gate_proj": lambda c: (c.d_model, c.ffn_dim),
    "up_proj": lambda c: (c.d_model, c.ffn_dim),
    "down_proj": lambda c: (c.ffn_dim, c.d_model),
}
MODULE_NAMES = {"q_proj": "wq", "k_proj": "wk", "v_proj": "wv", "o_proj": "wo",
                "gate_proj": "w_gate", "up_proj": "w_up", "down_proj": "w_down"}


@dataclass(frozen=True)
class MemoryBreakdown:
    """Peak bytes of one process, by what holds them; ``total`` is the device's."""

    weights: int
    gradients: int
    optimizer: int
    activations: int
    transient: int
    generation: int
    overhead: int
    host: int = 0

    @property
    def total(self) -> int:
        return sum(astuple(self)) - self.host

    def items(self) -> list[tuple[str, int]]:
        return [(f.name, getattr(self, f.name)) for f in fields(self)]

    def as_dict(self) -> dict[str, int]:
        return dict(self.items())


# ---- parameters ---------------------------------------------------------------------

def parameter_tensors(model: ModelConfig) -> list[int]:
    """Element counts of ``DecoderLM(model)``'s parameter tensors (the tied head once; an
    untied head, a Hugging Face model's, as a table of its own)."""
    c = model
    per_layer = [c.d_model, *(a * b for a, b in (f(c) for f in PROJECTIONS.values())), c.d_model]
    residual = RESIDUAL_MODES[c.residual].tensors(c)
    tables = [c.vocab_size * c.d_model] * (1 if c.tied_embeddings else 2)
    return tables + c.n_layers * (per_layer + 2 * residual) + [c.d_model]


def lora_layers(model: ModelConfig, lora: LoraConfig) -> int:
    """Layers adapted: the last ``layers_fraction`` share, rounded up, at least one."""
    return max(1, math.ceil(model.n_layers * lora.layers_fraction - 1e-9))


def _projections(model: ModelConfig, lora: LoraConfig) -> list[tuple[int, int]]:
    unknown = [t for t in lora.target_modules if t not in PROJECTIONS]
    if unknown:
        raise ValueError(f"unknown LoRA target {unknown[0]!r}; accepted: {', '.join(PROJECTIONS)}")
    return [PROJECTIONS[t](model) for t in dict.fromkeys(lora.target_modules)]


def lora_tensors(model: ModelConfig, lora: LoraConfig) -> list[int]:
    """Element counts of the adapters' A (r × d_in) and B (d_out × r) matrices."""
    per_layer = [n for d_in, d_out in _projections(model, lora) for n in (lora.rank * d_in, d_out * lora.rank)]
    return lora_layers(model, lora) * per_layer


def lora_param_count(cfg: TrainConfig) -> int:
    return sum(lora_tensors(cfg.model, cfg.lora)) if cfg.lora else 0


def trainable_param_count(cfg: TrainConfig) -> int:
    return lora_param_count(cfg) if cfg.lora else stored_param_count(cfg.model)


def _trainable_tensors(cfg: TrainConfig) -> list[int]:
    return lora_tensors(cfg.model, cfg.lora) if cfg.lora else parameter_tensors(cfg.model)


# ---- the terms ------------------------------------------------------------------------

def _weights(cfg: TrainConfig) -> int:
    """Bytes of every parameter the process would hold unsharded."""
    if cfg.lora is None:
        return FP32 * stored_param_count(cfg.model)
    return _base_bytes(cfg) + FP32 * lora_param_count(cfg)


def _frozen_bytes(cfg: TrainConfig) -> int:
    """Bytes per value of weights that never train (LoRA's base, a KL reference): the
    compute dtype, fp32 where FSDP shards the parameters (as the executor keeps them)."""
    return FP32 if cfg.sharding in FSDP_SHARDING else act.COMPUTE_BYTES[cfg.precision]


def _base_bytes(cfg: TrainConfig) -> int:
    """LoRA's frozen base: the compute dtype, or NF4 for the blocks' projections."""
    c, dtype = cfg.model, _frozen_bytes(cfg)
    total = stored_param_count(c)
    if cfg.lora is None or cfg.lora.quantize_base != "4bit":
        return dtype * total
    linear = c.n_layers * sum(a * b for a, b in (f(c) for f in PROJECTIONS.values()))
    return math.ceil(NF4_BYTES * linear) + dtype * (total - linear)


def _optimizer_bytes(tensors: list[int], optimizer: str) -> int:
    if optimizer == "adamw":
        return 2 * FP32 * sum(tensors)
    return sum(_adamw_8bit(n) for n in tensors)


def _adamw_8bit(n: int) -> int:
    if n < BNB_MIN_8BIT:
        return 2 * FP32 * n
    blocks = -(-n // BNB_BLOCK)
    return 2 * (n + FP32 * blocks + FP32 * BNB_QMAP)


def _layer_weights(cfg: TrainConfig) -> int:
    """Bytes of one block's parameters as stored (ZeRO-3's gather, offload's resident layer)."""
    c = cfg.model
    per_layer = (stored_param_count(c) - (1 if c.tied_embeddings else 2) * c.vocab_size * c.d_model
                 - c.d_model) // c.n_layers
    if cfg.lora is None:
        return FP32 * per_layer
    return _frozen_bytes(cfg) * per_layer


def reference_bytes(cfg: TrainConfig) -> int:
    """The KL reference: a frozen copy under full fine-tuning; under LoRA the same model
    with its adapters off, no copy."""
    g = cfg.generation
    if g is None or not g.reference_model or cfg.lora is not None:
        return 0
    return _frozen_bytes(cfg) * stored_param_count(cfg.model)


def sampler_bytes(cfg: TrainConfig) -> int:
    """Full fine-tuning under mixed precision that decodes on a GPU (``generation.decode`` graphs or
    compiled) samples from a copy of the weights in the compute dtype, kept for the stage
    (``engines/grpo/policy.py``); none under LoRA, in fp32, or where the frozen dtype is fp32 (FSDP)."""
    g = cfg.generation
    dtype = _frozen_bytes(cfg)
    if g is None or g.decode == "eager" or cfg.lora is not None or dtype == FP32:
        return 0
    return dtype * stored_param_count(cfg.model)


def _sampling_parts(cfg: TrainConfig) -> tuple[int, int]:
    """The KV cache of prompts × G sequences and the sampling logits, in bytes."""
    g = cfg.generation
    if g is None:
        return 0, 0
    c, dtype = cfg.model, act.COMPUTE_BYTES[cfg.precision]
    sequences = g.prompts * g.group_size
    kv = 2 * c.n_layers * c.kv_heads * c.head_dim * sequences * (g.prompt_tokens + g.completion_tokens) * dtype
    return kv, sequences * c.vocab_size * (dtype + FP32)


def sampling_bytes(cfg: TrainConfig) -> int:
    """The sampling phase's own bytes: the KV cache of prompts × G sequences and the logits."""
    return sum(_sampling_parts(cfg))


def keeps_decodes(cfg: TrainConfig) -> bool:
    """Whether the GRPO engine keeps its captured decodes (cache, prefill and decode step graphs) between
    rollouts (``engines/grpo/policy.py``): muse's decoder decoding from CUDA graphs out of the copy full
    fine-tuning samples from, whose weights don't train (``sampler_bytes``), where one decode's cache and
    prefill pool fit ``KEPT_DECODE_BYTES`` (``Policy._keep`` lets go of a larger one at once); LoRA's
    adapters and an fp32 stage's weights train, and a Hugging Face model decodes over its own static
    cache, remade each rollout."""
    return (cfg.generation is not None and not cfg.hf and sampler_bytes(cfg) > 0
            and _decode_bytes(cfg) <= KEPT_DECODE_BYTES)


def _decode_bytes(cfg: TrainConfig) -> int:
    """One captured decode's cache and prefill graph's pool: the KV cache of every row's prompt and
    completion, and a block's widest intermediates over the prompts (gate and up, their product, the
    streams and q/k/v), in the compute dtype."""
    g, c = cfg.generation, cfg.model
    if g is None:
        return 0
    kv, _ = _sampling_parts(cfg)
    width = 3 * c.ffn_dim + 4 * c.d_model * c.n_streams
    return kv + g.prompts * g.group_size * g.prompt_tokens * width * act.COMPUTE_BYTES[cfg.precision]


def kept_decode_bytes(cfg: TrainConfig) -> int:
    """What stays allocated between rollouts where muse's decoder replays captured decode steps: the
    caches and prefill pools of the decodes kept for the next batches (``KEPT_DECODES`` of them, one a
    prompt width, at most ``KEPT_DECODE_BYTES`` together) and the logits in the decode step's graph;
    none where none is kept (``keeps_decodes``)."""
    if not keeps_decodes(cfg):
        return 0
    _, logits = _sampling_parts(cfg)
    return min(KEPT_DECODES * _decode_bytes(cfg), KEPT_DECODE_BYTES) + logits


def compiled_head(cfg: TrainConfig) -> bool:
    """Whether muse's decoder's loss head runs compiled (``executor/compiled.py``): a compiled stage of
    muse's own decoder, its head not owned by FSDP's root module."""
    return cfg.compiled and cfg.compiled_head and not cfg.hf and not fsdp_wrapped(cfg)


def fsdp_wrapped(cfg: TrainConfig) -> bool:
    """Whether the executor wraps the model in FSDP (several processes, ``executor/accelerators.py``)."""
    return cfg.world_size > 1 and cfg.sharding in FSDP_SHARDING


def chunked_head(cfg: TrainConfig) -> bool:
    """Whether the step takes its log-probs through the output head a chunk at a time: a GRPO-engine
    stage's, RL or supervised, and a Hugging Face model's loss (``engines/grpo/logprobs.py``), unless
    FSDP wraps the model (``logprobs.output_head``)."""
    return (cfg.generation is not None or cfg.chunked_loss) and not fsdp_wrapped(cfg)


def _backward_buffers(cfg: TrainConfig, device: str) -> int:
    """The largest working buffers of the backward, beside the activations."""
    c, dtype = cfg.model, act.COMPUTE_BYTES[cfg.precision]
    tokens = cfg.micro_batch * c.seq_len
    if chunked_head(cfg):  # a chunk's fp32 logits (made its gradient in place) and its bf16 copy;
        # the head weight's fp32 gradient sum and a chunk's product, cast to fp32, beside it
        head = 2 * min(LOGPROB_CHUNK_BYTES, FP32 * tokens * c.vocab_size) + \
            (2 * FP32 * c.vocab_size * c.d_model if cfg.lora is None else 0)
    elif compiled_head(cfg) and device == "cuda":  # muse's compiled loss head: its logits' gradient, in the
        # compute dtype (docs/bench_plan_run.md: an fp32 one fitted before the executor stopped Accelerate
        # from casting the logits it returns to fp32, and from their unused gradient's zeros)
        head = dtype * tokens * c.vocab_size
    else:  # the log-softmax backward's two fp32 (tokens × V) gradients; under CUDA autocast the
        # nll backward's one fp32 gradient (beside its fp32 input, saved), then bf16 ones
        head = (1 if device == "cuda" and dtype != FP32 else 2) * FP32 * tokens * c.vocab_size
    stream = c.n_streams * c.d_model * (FP32 if cfg.lora is None else dtype)
    block = tokens * (stream + 3 * c.ffn_dim * dtype)
    if cfg.lora is None:  # the largest weight gradient: the mm's output and its fp32 cast
        block += c.d_model * c.ffn_dim * (dtype + (FP32 if dtype != FP32 else 0))
    gathered = _layer_weights(cfg) if cfg.sharding in ("zero3", "fsdp") else 0
    return max(head, block) + gathered


def _step_buffers(cfg: TrainConfig, device: str, stepped_params: int) -> int:
    """Foreach AdamW (PyTorch's default on CUDA) builds sqrt(v) for every parameter at once."""
    foreach = device == "cuda" and cfg.optimizer == "adamw" and cfg.offload == "none"
    return FP32 * stepped_params if foreach else 0


def _gradients_in_backward(cfg: TrainConfig, gradients: int) -> int:
    """Gradient bytes alive at the backward's start. With one micro-step a step, the
    executor's ``zero_grad(set_to_none=True)`` leaves no .grad: it is allocated layer by
    layer while the activations are freed, so only the tied head's gradient (computed
    first, held until the embedding's is added to it) coexists with the activations.
    Accumulating micro-steps keep every .grad; sharded runs keep their buffers."""
    if cfg.grad_accum > 1 or cfg.lora is not None or cfg.sharding not in ("none", "ddp"):
        return gradients
    return min(gradients, FP32 * cfg.model.vocab_size * cfg.model.d_model)


def _overhead(device_bytes: int, device: str) -> int:
    return 0 if device != "cuda" else CUDA_CONTEXT_BYTES + int(FRAGMENTATION * device_bytes)


def estimate(cfg: TrainConfig, *, device: str = "cuda") -> MemoryBreakdown:
    """The peak of one process training ``cfg`` on ``device`` ("cuda" or "cpu")."""
    world = cfg.world_size
    shards = {"zero1": 1, "zero2": 2, "zero3": 3, "fsdp": 3}.get(cfg.sharding, 0)
    weights = _weights(cfg) // (world if shards >= 3 else 1)
    trainable = trainable_param_count(cfg)
    gradients = FP32 * trainable // (world if shards >= 2 else 1)
    # Accelerate wraps the model in DDP on several processes unless FSDP shards it
    buckets = gradients if cfg.sharding in ("none", "ddp", "zero1") and world > 1 else 0
    optimizer = _optimizer_bytes(_trainable_tensors(cfg), cfg.optimizer) // (world if shards >= 1 else 1)
    stepped = trainable // (world if shards >= 1 else 1)

    host = 0
    if cfg.offload in ("optimizer", "parameters"):
        host, optimizer = optimizer, 0
    if cfg.offload == "optimizer":  # HostAdamW's fp32 master and gradient buffer
        host += 2 * FP32 * stepped
    if cfg.offload == "parameters":
        host += weights
        weights = min(weights, _layer_weights(cfg))

    activation = act.activation_bytes(cfg.model, cfg.micro_batch, cfg.precision, cfg.checkpointing,
                                      device=device, lora=cfg.lora, chunked_head=chunked_head(cfg),
                                      compiled=cfg.compiled and not cfg.hf,
                                      compiled_head=compiled_head(cfg))
    # two candidate peaks: the backward's start and the optimizer step (activations freed)
    in_backward = _gradients_in_backward(cfg, gradients)
    backward = activation + in_backward + _backward_buffers(cfg, device)
    step = gradients + _step_buffers(cfg, device, stepped)
    transient = max(backward, step) - activation - in_backward
    # the engine samples, frees the cache, then trains: the sampling phase adds only what
    # its cache and logits need beyond the training phase's activations and buffers
    kept = kept_decode_bytes(cfg)  # held through the update too
    generation = reference_bytes(cfg) + sampler_bytes(cfg) + kept + \
        max(0, sampling_bytes(cfg) - kept - activation - transient)
    grads = in_backward + buckets
    device_bytes = weights + grads + optimizer + activation + transient + generation
    return MemoryBreakdown(weights, grads, optimizer, activation, transient, generation,
                           _overhead(device_bytes, device), host)
