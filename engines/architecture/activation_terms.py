"""What autograd keeps for backward in one residual connection of ``DecoderLM``, per mode; no torch.

The architecture engine's own account of its residual modes' saved tensors,
which each mode's record (``modes.py``, ``activations``) names and the
memory model (``muse_plan/optimizer/activations.py``, whose docstring gives
the derivation and the checks against autograd) assembles into a layer and
a micro-batch. With the building blocks every mode's terms share: the
numerics of a forward, a connection's bytes, RMS norms, the sublayers'
inputs.
"""

from __future__ import annotations

from dataclasses import dataclass

from engines.architecture.config import ModelConfig

FP32 = 4
INT64 = 8
COMPUTE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
FUSED_SINKHORN_STREAMS = 4  # residual.sinkhorn's Triton kernel handles 4×4 matrices only
# an RL step's log-probs through the output head (engines/grpo/logprobs.py): fp32 logits a chunk
LOGPROB_CHUNK_BYTES = 256 * 2**20


@dataclass(frozen=True)
class Numerics:
    """How a forward runs: the compute dtype's bytes and the device kind."""

    act: int  # bytes per element of matmul outputs: 4 in fp32, 2 under autocast
    cuda: bool

    @property
    def autocast(self) -> bool:
        return self.act != FP32

    def cast(self, elems: int) -> int:
        """Bytes of autocast's compute-dtype copy of an fp32 tensor; none in fp32."""
        return elems * self.act if self.autocast else 0

    @property
    def fp32_ops(self) -> bool:
        """CUDA autocast runs pow, rsqrt, norms and nll_loss in fp32 (CPU autocast keeps bf16)."""
        return self.cuda and self.autocast

    @property
    def attention_output_copied(self) -> bool:
        """wo reads ``transpose(1, 2).reshape`` of the SDPA output: a copy of the (B, H, T, hd)
        output on CPU and from cuDNN (bf16/fp16 on CUDA); a view of the memory-efficient
        kernel's (B, T, H, hd) output (fp32 on CUDA)."""
        return self.autocast or not self.cuda

    @property
    def attention_fixed(self) -> int:
        """CUDA kernels save their dropout RNG state, a philox seed and offset (int64 each)."""
        return 2 * INT64 if self.cuda else 0


@dataclass(frozen=True)
class Connection:
    """What one residual connection saves around its sublayer, bytes per token
    unless named otherwise."""

    stream: int  # the incoming stream itself (4nC), if anything saves it
    saved: int  # everything else the connection saves, its sublayer excluded
    sublayer_in: int  # bytes per element of the tensor it feeds the sublayer
    sublayer_in_saved: bool = False  # that tensor is already counted above
    fixed: int = 0  # bytes per forward, not per token: uncached weight copies
    cast_weights: int = 0  # parameter elements its matmuls read (autocast caches a copy)


# ---- sublayers -----------------------------------------------------------------

def rmsnorm(c: ModelConfig, in_bytes: int, input_saved: bool) -> int:
    """``RMSNorm.forward``: xf (the input, or its fp32 upcast), rsqrt, normalised x."""
    upcast = c.d_model * FP32 if in_bytes != FP32 or not input_saved else 0
    return upcast + FP32 + c.d_model * in_bytes


def linear_inputs(c: ModelConfig, nm: Numerics, readers: int) -> int:
    """The fp32 norm output read by ``readers`` linears: shared in fp32, one cast each under autocast."""
    return readers * nm.cast(c.d_model) if nm.autocast else c.d_model * FP32


def attention(c: ModelConfig, nm: Numerics) -> int:
    qkv = 3 * c.n_heads * c.head_dim * nm.act  # after RoPE / the GQA repeat: H heads each
    out = c.d_model * nm.act + c.n_heads * FP32  # SDPA output and logsumexp
    wo_input = c.d_model * nm.act if nm.attention_output_copied else 0
    return linear_inputs(c, nm, 3) + qkv + out + wo_input


def mlp(c: ModelConfig, nm: Numerics) -> int:
    return linear_inputs(c, nm, 2) + 4 * c.ffn_dim * nm.act


def mlp_selective(c: ModelConfig, nm: Numerics) -> tuple[int, int]:
    """(forward, recompute): the checkpoint's fp32 input and the product; the rest redone."""
    recompute = (2 * nm.cast(c.d_model)) + 3 * c.ffn_dim * nm.act
    return c.d_model * FP32 + c.ffn_dim * nm.act, recompute


# ---- residual connections (residual.py) -------------------------------------------

def _standard(c: ModelConfig, nm: Numerics) -> Connection:
    # x + f(x): the add saves nothing; the sublayer's norm saves x
    return Connection(stream=c.d_model * FP32, saved=0, sublayer_in=FP32, sublayer_in_saved=True)


def _hc(c: ModelConfig, nm: Numerics) -> Connection:
    """HyperConnection: rms(x) → three tanh maps → two einsums → b·y.

    A matmul saves its inputs in the compute dtype: the fp32 tensor itself in
    fp32, else autocast's cast, one per matmul for a non-leaf (no cache).
    """
    n, C, a = c.streams, c.d_model, nm.act
    rstd = n * FP32  # rms over C for each stream
    xn = 3 * n * C * a if nm.autocast else n * C * FP32  # read by xn@w_m, xn@w_r, xn@w_b
    tanh = (2 * n + n * n) * a  # tanh saves its result, in the matmul's dtype
    mixers = (n + n * n) * a  # a_m, a_r (fp32 parameter + s·tanh) as the two bmms save them
    x = 2 * nm.cast(n * C)  # both einsums read the stream: a cast each under autocast
    b = n * FP32  # b·y saves b (fp32) and the sublayer output
    y = C * a
    return Connection(stream=n * C * FP32, saved=rstd + xn + tanh + mixers + x + b + y,
                      sublayer_in=a, cast_weights=C * (n + 2))


def sinkhorn(c: ModelConfig, nm: Numerics) -> int:
    """``residual.sinkhorn``: the CPU loop's logsumexps each save input (n²) and
    result (n), exp its result; the fused CUDA op saves only its logits."""
    n = c.streams
    if nm.cuda and n == FUSED_SINKHORN_STREAMS:
        return n * n * FP32
    return (2 * c.sinkhorn_iters * (n * n + n) + n * n) * FP32


def _h_res_for_mix(c: ModelConfig, nm: Numerics) -> int:
    """What mix_streams' bmm saves of H_res: a cast, the fused output, or (loop) exp's result again."""
    n = c.streams
    if nm.autocast:
        return n * n * nm.act
    return n * n * FP32 if nm.cuda and n == FUSED_SINKHORN_STREAMS else 0


def _manifold_maps(c: ModelConfig, nm: Numerics) -> tuple[int, int]:
    """ManifoldMaps: (bytes per token, bytes per forward for φ's concatenated copy)."""
    n, C = c.streams, c.d_model
    m = 2 * n + n * n
    stats = 2 * FP32  # ‖x‖ (vector_norm's result, pow's input) and rsqrt(ms + eps)
    proj = m * nm.act + m * FP32  # x φ (matmul output), × rsqrt → fp32, read by the α products
    gates = 3 * n * FP32  # sigmoid results (pre, post) and H_post = 2σ
    phi = n * C * m * nm.act  # cat(φ_pre, φ_post, φ_res), or its cast: no cache for a non-leaf
    return stats + proj + gates + sinkhorn(c, nm), phi


def _streams_operand(c: ModelConfig, nm: Numerics) -> tuple[int, int]:
    """(stream, copy): matmul_operand keeps x itself in fp32, one compute-dtype copy under autocast."""
    nc = c.streams * c.d_model
    return (0, nc * nm.act) if nm.autocast else (nc * FP32, 0)


def _mhc(c: ModelConfig, nm: Numerics) -> Connection:
    """ManifoldHyperConnection: maps(xm) → read_streams → f → mix_streams + H_post·y."""
    n, C, a = c.streams, c.d_model, nm.act
    stream, xm = _streams_operand(c, nm)
    maps, phi = _manifold_maps(c, nm)
    reads = nm.cast(n) + _h_res_for_mix(c, nm)  # bmm casts H_pre and H_res under autocast
    y = C * a  # H_post·y saves the sublayer output
    return Connection(stream=stream, saved=xm + maps + reads + y, sublayer_in=a, fixed=phi)


def _delta_gate(c: ModelConfig, nm: Numerics, h_bytes: int) -> int:
    """DeltaGate's saves beyond h and u: ‖u‖ and its clamp, rms(h)'s rsqrt and output
    (as @w_β saves it: in the compute dtype), σ and β; then k = u/‖u‖.

    On CPU the norms and rsqrt keep u's and h's dtype; CUDA autocast returns them in
    fp32, which promotes k to fp32, and its ``pow`` saves an fp32 copy of a bf16 h.
    """
    C, a = c.d_model, nm.act
    stat = FP32 if nm.fp32_ops else a  # ‖u‖, clamp_min(‖u‖)
    normalize = 2 * stat + C * stat  # and k
    h_stat = FP32 if nm.fp32_ops or h_bytes == FP32 else a
    upcast = C * FP32 if nm.fp32_ops and h_bytes != FP32 else 0
    rms_h = upcast + h_stat + C * a
    gate = 2 * FP32  # sigmoid result and β (the fp32 bias promotes)
    return normalize + rms_h + gate


def _ddl(c: ModelConfig, nm: Numerics) -> Connection:
    """DeltaResidual: x + β k (v − kᵀx) with k, β, v from DeltaGate(x, f(x))."""
    C, a = c.d_model, nm.act
    u = C * a  # sublayer output: normalize, @w_v
    update = C * FP32 + FP32  # β·k (fp32: β promotes) and v − kᵀx, both read by their product
    return Connection(stream=C * FP32, saved=u + _delta_gate(c, nm, FP32) + update,
                      sublayer_in=FP32, sublayer_in_saved=True, cast_weights=2 * C)


def _mgt(c: ModelConfig, nm: Numerics) -> Connection:
    """ManifoldDeltaConnection: mHC's maps, h = H_pre X, DeltaGate(h, f(h)), delta update of H_res X."""
    n, C, a = c.streams, c.d_model, nm.act
    stream, xm = _streams_operand(c, nm)
    maps, phi = _manifold_maps(c, nm)
    reads = nm.cast(n) + _h_res_for_mix(c, nm)
    h = C * a  # read_streams output: rms(h) saves it (and so does the norm in fp32)
    u = C * a
    mixed = n * C * a  # H_res X, saved by k·mixed
    target = FP32 + n * FP32  # H_post·v saves v (fp32) and H_post (counted in maps); v − kᵀx per stream
    update = C * FP32  # β·k (fp32: β promotes)
    saved = xm + maps + reads + h + u + _delta_gate(c, nm, a) + mixed + target + update
    return Connection(stream=stream, saved=saved, sublayer_in=a, sublayer_in_saved=not nm.autocast,
                      fixed=phi, cast_weights=2 * C)
