"""What autograd keeps for backward in one micro-batch of ``DecoderLM``; no torch.

The memory model's activation term, derived by reading
``engines/architecture/{model,residual}.py`` op by op and writing down what each
op saves for its backward (PyTorch's ``derivatives.yaml``): a matmul saves its
inputs (each only for the other's gradient), a product its two factors,
``pow``/``rsqrt``/``sigmoid``/``exp``/``logsumexp`` their input or result,
additions and reshapes nothing. Tensors that several ops save are counted once
(one storage), parameters and buffers not at all (the ``weights`` term).
``tests/test_memory_model.py`` counts the unique storages ``saved_tensors_hooks``
sees on the real model: on CPU this formula matches them to the byte for every
residual mode, checkpointing mode and precision, two shapes (GQA included);
on an H200 (``device="cuda"``) to within 0.12% (efficient attention pads its
logsumexp to 32 positions in fp32, not modelled).

Notation, bytes per token: C = d_model, H = n_heads, F = ffn_dim, V = vocab,
n = streams, m = 2n + n², t = sinkhorn_iters, a = the compute dtype's bytes (4
in fp32; 2 under bf16/fp16 autocast, whose matmuls output and save bf16); 4 for
what stays fp32 under autocast (the residual stream, statistics, sigmoids).
"CUDA" below means CUDA autocast, which also runs pow, rsqrt, norms and
nll_loss in fp32 where CPU autocast keeps bf16.

Per layer, two residual connections around pre-normed sublayers:
- RMSNorm (``RMSNorm.forward``): its input as fp32 (4C; the stream itself, or an
  upcast copy of a bf16 input), rsqrt 4, the normalised x in the input's dtype.
  The gain's product promotes the output to fp32.
- attention (``CausalSelfAttention``): wq/wk/wv's input (fp32: the norm output
  once, 4C; autocast: a cast per linear, 3aC); q, k after RoPE and v after GQA's
  ``repeat_interleave`` (H·hd = C each: 3aC); the SDPA output aC and logsumexp
  4H; wo's input aC, which ``transpose(1, 2).reshape`` copies from a (B, H, T, hd)
  output (CPU; cuDNN, PyTorch's bf16 choice on Hopper) but views in the
  memory-efficient kernel's (B, T, H, hd) one (fp32 on CUDA); CUDA kernels also
  save a philox seed and offset (16 B a layer). RoPE saves its cos/sin buffers.
- SwiGLU (``SwiGLU.hidden``): w_gate/w_up's input (4C or 2aC), the gate output
  (silu's input), silu's output, the up output and their product: 4aF.
- the connection, one function per mode in ``RESIDUAL_ACTIVATIONS``:
  standard  the stream 4C (the norm's input).
  hc        stream 4nC, rsqrt 4n, xn (4nC, or 3 casts 3a·nC: each matmul casts a
            non-leaf), tanh (2n+n²)a, a_m and a_r as the bmms save them (n+n²)a,
            the stream cast for each einsum 2a·nC under autocast, b 4n, y aC.
  mhc       the stream (4nC, or its one shared cast a·nC), ‖x‖ and rsqrt 8, xφ
            and its fp32 scaling m(a+4), σ(pre), σ(post), H_post 12n, Sinkhorn
            (CPU loop: each logsumexp's input and result, 4(2t(n²+n) + n²); the
            fused CUDA op for n = 4: its logits 4n²), H_pre and H_res as the bmms
            save them (casts an + an², or fp32 4n² from the fused op), y aC; per
            forward the concatenated φ (or its cast) a·nC·m.
  ddl       stream 4C, u aC, ‖u‖, its clamp and k = u/‖u‖ (2 + C)·s with s = 4 on
            CUDA else a, rsqrt(x) 4, rms(x) as @w_β saves it aC, σ and β 8, βk
            4C, v − kᵀx 4.
  mgt       mHC's stream/maps/reads; h = H_pre X aC; u aC; the delta gate on h
            as ddl's (rsqrt in h's dtype, and on CUDA ``pow``'s fp32 copy 4C);
            H_res X a·nC; v 4; v − kᵀx 4n; βk 4C.
Outside the layers: token ids and targets (int64, 16) and nll's total weight
(4 B); the final norm (input 4C, rsqrt 4, normalised 4C) and lm_head's input
(4C, or its cast aC); the log-probabilities 4V (CUDA: log_softmax's bf16 aV and
nll's fp32 copy 4V); the logits themselves are not saved (``transient``).

Autocast keeps one compute-dtype copy of every parameter a matmul reads for
the whole forward-and-backward (its cast cache lives until the outermost
autocast exits, which in the executor is after ``backward``): 2 B per matmul
weight element, in ``weight_casts``, whatever the checkpointing (saved by
autograd without it, held by the cache with it).

Checkpointing (``DecoderLM.set_checkpointing``):
- ``selective``: each SwiGLU hidden runs under ``checkpoint``, so the forward
  keeps its fp32 input (4C) and the product (aF, w_down's input); backward
  recomputes one layer's hidden at a time (w_gate/w_up's input casts and 3aF),
  the ``recompute`` component.
- ``full``: the forward keeps each block's input stream (4nC) and nothing inside
  the blocks; backward recomputes one block at a time, which saves what that
  block saves without checkpointing, less its input (``recompute``).
The term is the forward's saved bytes plus one recomputed segment: an upper
bound of the bytes alive at once, since the head's saved tensors are freed
before the first segment is recomputed.

LoRA (``lora=``): see the section below; exact for the standard residual,
an overcount for the others (their connections priced as in full training).

Not modelled: dropout masks (the engine's default dropout is 0, and a plan
has no knob for the model's), scalar constants autograd saves (8 B each).
"""

from __future__ import annotations

from typing import Callable

from engines.architecture.activation_terms import (COMPUTE_BYTES, FP32, INT64, Connection, Numerics, attention, mlp,
                                                   mlp_selective, rmsnorm)
from engines.architecture.config import ModelConfig
from engines.architecture.modes import RESIDUAL_MODES, load
from muse_plan.optimizer.config import LoraConfig

# the terms every mode's record names (modes.py), checked to cover every registered mode
RESIDUAL_ACTIVATIONS: dict[str, Callable[[ModelConfig, Numerics], Connection]] = {
    name: load(m.activations) for name, m in RESIDUAL_MODES.items()}


# ---- the whole model ------------------------------------------------------------

def matmul_weight_elements(c: ModelConfig) -> int:
    """Parameter elements the forward's matmuls read: autocast casts each once."""
    attn = 2 * c.d_model * c.d_model + 2 * c.d_model * c.kv_heads * c.head_dim
    mlp_w = 3 * c.d_model * c.ffn_dim
    residual = 2 * RESIDUAL_ACTIVATIONS[c.residual](c, Numerics(FP32, False)).cast_weights
    return c.n_layers * (attn + mlp_w + residual) + c.vocab_size * c.d_model  # + lm_head (tied)


def _layer(c: ModelConfig, nm: Numerics, checkpointing: str) -> tuple[dict[str, int], dict[str, int]]:
    """One block's saved bytes: per token by component (with 'recompute', selective
    checkpointing's hidden), and per forward by component."""
    conn = RESIDUAL_ACTIVATIONS[c.residual](c, nm)
    sub_in, sub_saved = conn.sublayer_in, conn.sublayer_in_saved
    per_token = {
        "streams": 2 * conn.stream,
        "residual": 2 * conn.saved,
        "norms": 2 * rmsnorm(c, sub_in, sub_saved),
        "attention": attention(c, nm),
    }
    if checkpointing == "selective":
        per_token["mlp"], per_token["recompute"] = mlp_selective(c, nm)
    else:
        per_token["mlp"] = mlp(c, nm)
    return per_token, {"residual": 2 * conn.fixed, "attention": nm.attention_fixed}


def log_probs(c: ModelConfig, nm: Numerics) -> int:
    """The cross-entropy's saved log-probabilities: fp32 (CPU autocast runs cross_entropy
    in fp32); CUDA autocast runs log_softmax in bf16 and nll_loss on an fp32 copy."""
    return c.vocab_size * (FP32 + (nm.act if nm.fp32_ops else 0))


# a GRPO-engine step's log-probs (RL, or a supervised loss) through the head a chunk at a time
# (engines/grpo/logprobs.py) keep, beside the head's input, a token's target id and logsumexp:
# nothing of vocabulary width
CHUNKED_LOG_PROBS = INT64 + FP32


def _head(c: ModelConfig, nm: Numerics, chunked: bool = False) -> int:
    """Final norm (of the fp32 stream sum), lm_head's input, the log-probabilities."""
    lm_input = nm.cast(c.d_model) if nm.autocast else c.d_model * FP32
    return rmsnorm(c, FP32, input_saved=False) + lm_input + (CHUNKED_LOG_PROBS if chunked else log_probs(c, nm))


def _assemble(detail: dict[str, int], per_token: dict[str, int], fixed: dict[str, int],
              layers: int, tokens: int) -> None:
    """Add ``layers`` blocks of (per_token, fixed) bytes into ``detail`` by component."""
    for name in per_token.keys() | fixed.keys():
        value = layers * (per_token.get(name, 0) * tokens + fixed.get(name, 0))
        detail[name] = detail.get(name, 0) + value


# ---- compiled training ------------------------------------------------------------------
# Under torch.compile (``executor/compiled.py``: the blocks, and muse's loss head) Inductor's
# partitioner saves less than eager autograd: it recomputes pointwise work in the backward.
# Measured on an H100 (scripts/probe_compiled_activations.py, docs/probe_compiled_activations.json:
# the bytes a bf16 forward leaves for its backward, at 1 and 3 layers, d_model 1024 and 2048,
# micro-batch 2 and 4 of 2,048 tokens): a compiled block keeps its weights' bf16 casts as eager
# autocast does, and of the per-token bytes this module derives for a block the share below, by
# connection form and checkpointing (within 1% across the widths and micro-batches measured).
# The fused kernels' forms (``fused``) save what their ops save, priced here as torch's fusion.
COMPILED_BLOCK_SHARE: dict[tuple[str, str], float] = {
    ("standard", "none"): 0.628, ("standard", "selective"): 0.376,
    ("hc", "none"): 0.604,
    ("mhc", "none"): 0.952, ("mhc+bf16", "none"): 0.738, ("mhc+bf16", "selective"): 0.585,
    ("mhc+bf16+fused", "none"): 0.791, ("mhc+bf16+fused", "selective"): 0.654,
    ("ddl", "none"): 0.519, ("ddl+fused", "none"): 0.517, ("ddl+fused", "selective"): 0.326,
    ("mgt+bf16", "none"): 0.481, ("mgt+bf16+fused", "none"): 0.580, ("mgt+bf16+fused", "selective"): 0.472,
}


def connection_form(c: ModelConfig) -> str:
    """The residual mode with what changes what it saves: a bf16 state of several streams, and the
    fused kernels where they run (``fused_kernels: on``; mhc / mgt need that bf16 state of 4 streams)."""
    form = c.residual
    if c.n_streams > 1 and c.stream_dtype == "bfloat16":
        form += "+bf16"
    if c.fused_kernels == "on" and (c.residual == "ddl" or (form.endswith("+bf16") and c.streams == 4
                                                             and c.residual in ("mhc", "mgt"))):
        form += "+fused"
    return form


def compiled_block_share(c: ModelConfig, checkpointing: str) -> float:
    """COMPILED_BLOCK_SHARE for a model: a form not measured with selective checkpointing takes its
    share without (selective saved less in every form measured); a form not measured at all, 1."""
    form = connection_form(c)
    mode = "none" if checkpointing == "full" else checkpointing
    return COMPILED_BLOCK_SHARE.get((form, mode), COMPILED_BLOCK_SHARE.get((form, "none"), 1.0))


def _compiled_head(c: ModelConfig, nm: Numerics) -> int:
    """The compiled loss head a token (measured 70,444 B at d_model 1024 and 78,012 at 2048, V 32,000,
    bf16): the final stream's sum (fp32), the normalised input of the head (compute dtype) and the
    logits the cross-entropy's backward reads (compute dtype): no fp32 log-probabilities."""
    return c.d_model * (FP32 + nm.act) + c.vocab_size * nm.act


def activation_detail(model: ModelConfig, micro_batch: int, precision: str, checkpointing: str,
                      *, device: str = "cuda", lora: LoraConfig | None = None,
                      chunked_head: bool = False, compiled: bool = False,
                      compiled_head: bool = False) -> dict[str, int]:
    """Saved bytes at the peak of one micro-batch, by component, summing to
    ``activation_bytes``: tokens, head, weight_casts, and over the layers streams,
    norms, attention, mlp, residual; recompute (one checkpointed segment).
    ``chunked_head``: the log-probs are taken through the head in chunks (a GRPO-engine step).
    ``compiled`` (on CUDA): the blocks under torch.compile, ``compiled_head`` muse's loss head too
    (COMPILED_BLOCK_SHARE); LoRA's compiled stages are priced as eager (not measured)."""
    if precision not in COMPUTE_BYTES:
        raise ValueError(f"precision {precision!r} is not one of {', '.join(COMPUTE_BYTES)}")
    if checkpointing not in ("none", "selective", "full"):
        raise ValueError(f"checkpointing {checkpointing!r} is not one of none, selective, full")
    c, tokens = model, micro_batch * model.seq_len
    nm = Numerics(COMPUTE_BYTES[precision], device == "cuda")
    if lora is not None:
        return _lora_detail(c, nm, tokens, checkpointing, lora, chunked_head)
    per_token, fixed = _layer(c, nm, checkpointing)
    compiled = compiled and device == "cuda"
    if compiled:
        share = compiled_block_share(c, checkpointing)
        per_token = {name: int(share * value) for name, value in per_token.items()}
    recompute = per_token.pop("recompute", 0) * tokens
    head = _compiled_head(c, nm) if compiled_head and compiled and not chunked_head else _head(c, nm, chunked_head)
    detail = {"tokens": 2 * INT64 * tokens + FP32, "head": head * tokens,  # + nll's total weight
              "weight_casts": nm.cast(matmul_weight_elements(c))}
    if compiled and checkpointing == "full":  # the compiled blocks cast their weights again when recomputed
        detail["weight_casts"] = nm.cast(c.vocab_size * c.d_model)
    if checkpointing == "full":
        # the checkpoint keeps each block's input: the n-stream state in its own dtype
        state_bytes = 2 if c.n_streams > 1 and c.stream_dtype == "bfloat16" else FP32
        block_input = c.n_streams * c.d_model * state_bytes
        detail["streams"] = c.n_layers * block_input * tokens
        # one block recomputed in backward: all it saves but its input, which the checkpoint holds
        first_stream = RESIDUAL_ACTIVATIONS[c.residual](c, nm).stream
        detail["recompute"] = (sum(per_token.values()) - first_stream) * tokens + sum(fixed.values())
    else:
        _assemble(detail, per_token, fixed, c.n_layers, tokens)
        detail["recompute"] = recompute
    return {name: value for name, value in detail.items() if value}


def activation_bytes(model: ModelConfig, micro_batch: int, precision: str, checkpointing: str,
                     *, device: str = "cuda", lora: LoraConfig | None = None, chunked_head: bool = False,
                     compiled: bool = False, compiled_head: bool = False) -> int:
    """Bytes autograd keeps for backward at the peak of one micro-batch of ``DecoderLM(model)``."""
    return sum(activation_detail(model, micro_batch, precision, checkpointing, device=device, lora=lora,
                                 chunked_head=chunked_head, compiled=compiled, compiled_head=compiled_head).values())


# ---- LoRA -----------------------------------------------------------------------------
# The base is frozen and stored in the compute dtype, so its stream and matmul
# outputs are in that dtype and no weight is cast. A matmul saves its input only
# for its weight's gradient, a product a factor only for the other factor's: so
# frozen projections and norm gains save nothing of their own, while everything
# on the gradient's path to the adapters still does. Layers below the first
# adapted one see no gradient at all and save nothing, checkpoints included:
# a checkpoint none of whose inputs or weights needs a gradient builds no
# graph, so nothing holds its input (measured on an H200: 760M mHC, LoRA on
# the last quarter, full checkpointing peaked at 5.05 GiB where counting every
# block's input predicted 9.01).

# the tensors adapters read, per token, as the frozen forward leaves them
WIDTHS: dict[str, Callable[[ModelConfig, Numerics], int]] = {
    "attn_in": lambda c, nm: c.d_model * nm.act,  # the attention norm's output
    "attn_out": lambda c, nm: c.d_model * nm.act if nm.attention_output_copied else 0,  # wo's input
    "mlp_in": lambda c, nm: c.d_model * nm.act,  # the MLP norm's output
    "mlp_hidden": lambda c, nm: c.ffn_dim * nm.act,  # w_down's input
}
ATTENTION_INPUTS = {"attn_in": ("q_proj", "k_proj", "v_proj"), "attn_out": ("o_proj",)}
MLP_INPUTS = {"mlp_in": ("gate_proj", "up_proj"), "mlp_hidden": ("down_proj",)}


def _adapters(c: ModelConfig, nm: Numerics, lora: LoraConfig, inputs: dict[str, tuple[str, ...]]) -> int:
    """An adapter saves its input (shared by adapters reading one tensor) and its r-wide hidden."""
    targets = set(lora.target_modules)
    saved = 0
    for width, names in inputs.items():
        hit = targets.intersection(names)
        if hit:
            saved += WIDTHS[width](c, nm) + len(hit) * lora.rank * nm.act
    return saved


def _lora_layer(c: ModelConfig, nm: Numerics, lora: LoraConfig,
                checkpointing: str) -> tuple[dict[str, int], dict[str, int]]:
    """One adapted block: bytes per token, bytes per forward. Residual modes other than
    standard add their connections as derived for full training: an overcount."""
    a = nm.act
    frozen_norm = c.d_model * FP32 + FP32  # fp32 input (upcast, or the fp32 stream) and rsqrt
    core = 3 * c.d_model * a + c.d_model * a + c.n_heads * FP32  # q, k, v, SDPA output, logsumexp
    parts = {"norms": 2 * frozen_norm, "attention": core + _adapters(c, nm, lora, ATTENTION_INPUTS)}
    hidden = 3 * c.ffn_dim * a  # silu's input, silu's output and up's output (each other's factors)
    mlp_adapters = _adapters(c, nm, lora, MLP_INPUTS)
    if checkpointing == "selective":  # the checkpoint keeps the MLP input; w_down's adapter its input
        gate_up = _adapters(c, nm, lora, {"mlp_in": MLP_INPUTS["mlp_in"]})
        gate_up_hidden = gate_up - (c.d_model * a if gate_up else 0)
        parts["mlp"] = c.d_model * a + mlp_adapters - gate_up
        parts["recompute"] = hidden + gate_up_hidden
    else:
        parts["mlp"] = hidden + mlp_adapters
    fixed = {"attention": nm.attention_fixed}
    if c.residual != "standard":
        conn = RESIDUAL_ACTIVATIONS[c.residual](c, nm)
        parts["residual"], fixed["residual"] = 2 * (conn.stream + conn.saved), 2 * conn.fixed
    return parts, fixed


def _lora_detail(c: ModelConfig, nm: Numerics, tokens: int, checkpointing: str,
                 lora: LoraConfig, chunked_head: bool = False) -> dict[str, int]:
    from muse_plan.optimizer.memory import lora_layers, lora_tensors  # memory imports this module

    adapted = lora_layers(c, lora)
    per_token, fixed = _lora_layer(c, nm, lora, checkpointing)
    recompute = per_token.pop("recompute", 0) * tokens
    first_norm = c.d_model * FP32 + FP32  # the first adapted layer's attention norm: no gradient reaches it
    head = c.d_model * FP32 + FP32  # the frozen final norm
    # the log-probs: in chunks, the head's input (the frozen norm's output) and a target and logsumexp
    head += c.d_model * nm.act + CHUNKED_LOG_PROBS if chunked_head else log_probs(c, nm)
    detail = {"tokens": INT64 * tokens + FP32, "head": head * tokens,  # targets: the embedding is frozen
              "weight_casts": nm.cast(sum(lora_tensors(c, lora)))}
    # the stream is in the compute dtype for standard; mHC's fp32 H_post promotes the others' (bound: fp32)
    block_input = c.n_streams * c.d_model * (nm.act if c.residual == "standard" else FP32) * tokens
    if checkpointing == "full":  # each adapted block's checkpoint keeps its input; a frozen one nothing
        detail["streams"] = adapted * block_input
        input_again = 0 if nm.autocast else c.d_model * FP32  # fp32: the norm's input is the block's
        detail["recompute"] = (sum(per_token.values()) - input_again) * tokens + sum(fixed.values())
    else:
        _assemble(detail, per_token, fixed, adapted, tokens)
        detail["norms"] -= first_norm * tokens
        detail["recompute"] = recompute
    return {name: value for name, value in detail.items() if value}
