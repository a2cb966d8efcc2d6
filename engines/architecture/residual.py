"""Residual connections: how a block wraps each sublayer F (attention or MLP).

Every connection is a module ``conn(x, f) -> x`` where ``f`` is the sublayer
(its pre-norm included) taking and returning (B, T, C). ``RESIDUALS`` maps a
mode name to the connection's constructor and whether the hidden state carries
n streams, shape (B, T, n, C); the model expands the embedding to n copies at
the input and sums the streams before the final norm (Zhu et al. sum them;
the final RMSNorm makes sum and mean the same function).

Equations implemented (x_l is the state entering a sublayer):

standard   x_{l+1} = x_l + F(x_l).

hc         Hyper-connections, Zhu et al., ICLR 2025 (arXiv 2409.19606), the
           dynamic variant (DHC). With H ∈ R^{n×C} and H̄ = norm(H):
             A_m(H) = A_m + s_α·tanh(H̄ W_m),   A_r(H) = A_r + s_α·tanh(H̄ W_r),
             B(H)   = B + s_β·tanh(H̄ W_β)ᵀ,
             H' = A_rᵀ H + B(H)ᵀ F(Hᵀ A_m).
           Init as the paper: A_r = I, B = 1, A_m = e_{k mod n} for the k-th
           sublayer, W = 0, s = 0.01. With copied streams this is exactly the
           standard residual at init. norm is a parameter-free RMS norm here
           (the paper's norm has its own gain; ours is left out so that the
           per-sublayer count stays n²+2n + C(n+2) + 2).

mhc        Manifold-constrained HC, Xie et al. (DeepSeek), arXiv 2512.24880,
           eqs. 7-8 and the layer update x_{l+1} = H_res x_l + H_postᵀ F(H_pre x_l):
             x̃ = RMSNorm(vec(x_l)) ∈ R^{nC}
             H̃_pre  = α_pre ·(x̃ φ_pre)  + b_pre,   H_pre  = σ(H̃_pre)
             H̃_post = α_post·(x̃ φ_post) + b_post,  H_post = 2σ(H̃_post)
             H̃_res  = α_res ·mat(x̃ φ_res) + b_res, H_res  = SinkhornKnopp(exp H̃_res)
           so H_pre, H_post are non-negative and H_res is doubly stochastic.
           Choices where the paper's text was not at hand: the RMSNorm has no
           gain (a gain before the linear φ is redundant); α = 0.01, φ ~ N(0, 0.02²);
           b_pre = logit(1/n) (the sublayer reads the stream mean), b_post = 0
           (H_post = 1), b_res = 4·I (H_res ≈ 0.95·I, so streams keep their
           identity). With copied streams this equals the standard residual at init.

ddl        Deep delta learning, Zhang et al., 2026 (arXiv 2601.00417), scalar
           value limit d_v = 1:
             A(x) = I − β k kᵀ,  x_{l+1} = A(x_l) x_l + β k v = x_l + β k (v − kᵀ x_l),
           with k = u/‖u‖ the unit direction of the sublayer output u = F(x_l),
           v = w_vᵀ u + b_v the target value, β = β_max·σ(w_βᵀ norm(x_l) + b_β) ∈ [0, 2]:
           identity at β = 0, projection at 1, Householder reflection at 2.
           Taking k from the sublayer output follows the authors' d_v = 1
           transformer; v and β as single linear maps is our simplest reading.

mgt        mHC and DDL together, after Su & You, 2026 (arXiv 2601.01014):
           "mHC controls update direction while DDL controls magnitude and sign".
           The paper gives no single update rule we could find; ours composes
           the two operators, which act on different axes and so commute:
             X_{l+1} = (H_res X_l)(I − β k kᵀ) + β (H_post v) kᵀ,
           with H_pre, H_post, H_res from mHC, u = F(H_pre X_l), and k, v, β as
           in ddl (β read from the normalised sublayer input H_pre X_l).

Speed (measured by scripts/bench_architecture.py, docs/bench_architecture.md):
Sinkhorn runs as one fused Triton kernel each way on CUDA; mHC's three maps are
one matmul with the RMSNorm applied as a per-token scale; with
``ModelConfig.fused_kernels`` (a plan's ``training.fused_kernels``) ``eager``
(eager mode) or ``on`` (under torch.compile too), on CUDA with Triton, the
stream read H_pre x and the write H_res x + H_post y (for mgt, the delta
update as such a write) are one Triton pass each
(``fused_streams``; off by default, see there), and so are the maps' norm and
product with φ, each way, and ddl's whole update (``fused_delta``); an mhc
connection with n = 4 and a bf16 state is one op before the sublayer and one
after, writing the state's gradient once (``fused_mhc``); else
the stream sums are written so that inductor fuses them under torch.compile,
and eager autocast casts the n-stream state once a connection instead of once
per product. The state may be stored in bf16 between connections
(``ModelConfig.stream_dtype``, as the mHC paper does), halving its traffic; the
maps' norm and Sinkhorn stay in fp32.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from engines.architecture import fused_delta, fused_mhc, fused_streams
from engines.architecture.config import ModelConfig
from engines.architecture.modes import RESIDUAL_MODES, load

Sublayer = Callable[[torch.Tensor], torch.Tensor]


# ---- pure functions ---------------------------------------------------------

def sinkhorn(logits: torch.Tensor, iters: int = 20) -> torch.Tensor:
    """Sinkhorn-Knopp on exp(logits) over the last two dims → doubly stochastic.

    Alternating row and column normalisation, done in log space so that large
    logits neither overflow exp nor lose the small entries. For n = 4 (mHC's
    choice) on a CUDA tensor, with Triton, the iterations run fused in one kernel
    forward and one backward (``_fused_sinkhorn``): unfused, each of the 2·iters
    normalisations is a handful of launches on a tiny (…, 4, 4) tensor, and
    launches, not arithmetic, set the time: at 16k tokens on an H100, about
    6.5 ms a connection forward and backward unfused, 0.17 ms for the fused
    backward alone when it recomputed every step from the logits, 41 µs on an
    H200 when it saved both steps' outputs (it now saves each iteration's input).
    """
    n = logits.shape[-1]
    if logits.is_cuda and _FUSED and logits.shape[-2:] == (4, 4):
        flat = logits.float().reshape(-1, n, n).contiguous()
        return _fused_sinkhorn(flat, iters).view(logits.shape).to(logits.dtype)
    log_p = logits.float()
    for _ in range(iters):
        log_p = log_p - torch.logsumexp(log_p, dim=-1, keepdim=True)  # rows sum to 1
        log_p = log_p - torch.logsumexp(log_p, dim=-2, keepdim=True)  # columns sum to 1
    return log_p.exp().to(logits.dtype)


def read_streams(h_pre: torch.Tensor, x: torch.Tensor, fused: str = "off") -> torch.Tensor:
    """Σ_j h_pre[j] x[j]: (B, T, n), (B, T, n, C) → (B, T, C).

    Fused (``fused_streams.usable(x, fused)``): one Triton pass. Else eager: one
    batched matmul (in bf16 under autocast, like any matmul). Under
    torch.compile the same sum written as a broadcast, which inductor fuses
    into one pass over x (in x's dtype) instead of calling a bmm with n = 4.
    """
    if fused_streams.usable(x, fused):
        return fused_streams.stream_read(h_pre, x)
    if torch.compiler.is_compiling():
        return (h_pre.unsqueeze(-1) * x).sum(-2)
    return torch.einsum("btn,btnc->btc", h_pre, x)


def write_streams(h_res: torch.Tensor, x: torch.Tensor, h_post: torch.Tensor, y: torch.Tensor,
                  dtype: torch.dtype, fused: str = "off") -> torch.Tensor:
    """H_res x + h_post ⊗ y: (B, T, n, n), (B, T, n, C), (B, T, n), (B, T, C) → (B, T, n, C) in
    ``dtype``, the stream state's.

    Fused (``fused_streams.usable(x, fused)``): one Triton pass that reads x and y once and
    writes the result; else mix_streams and the broadcast product.
    """
    if fused_streams.usable(x, fused):
        return fused_streams.stream_write(h_res, x, h_post, y, dtype)
    return (mix_streams(h_res, x) + h_post.unsqueeze(-1) * y.unsqueeze(2)).to(dtype)


def matmul_operand(x: torch.Tensor) -> torch.Tensor:
    """x as the products of a connection read it: once cast to autocast's matmul
    dtype in eager mode, itself under torch.compile, fp32 without autocast.

    Eager autocast casts an operand for every product that reads it and keeps
    each copy for the backward; the n-stream state feeds three (the maps,
    read_streams, mix_streams), so one shared copy saves two casts and two
    saved copies a connection (the fused kernels read it too: half the bytes of
    an fp32 state, and the copy the maps keep is the only one). Under torch.compile the state is read as it is
    and inductor fuses the reads. Without autocast the products run in the
    weights' fp32 (a no-op unless the state is stored in bf16).
    """
    on = x.device.type
    if not torch.is_autocast_enabled(on):
        return x.to(torch.promote_types(x.dtype, torch.float32))  # bf16 → fp32; fp32, fp64 as they are
    if torch.compiler.is_compiling():
        return x
    return x.to(torch.get_autocast_dtype(on))


def mix_streams(h_res: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """H_res x per token: (B, T, n, n), (B, T, n, C) → (B, T, n, C); see read_streams."""
    if torch.compiler.is_compiling():
        return (h_res.unsqueeze(-1) * x.unsqueeze(-3)).sum(-2)
    return torch.einsum("btij,btjc->btic", h_res, x)


def delta_operator(k: torch.Tensor, beta: torch.Tensor | float) -> torch.Tensor:
    """A = I − β k kᵀ for a unit k of shape (..., C) → (..., C, C)."""
    eye = torch.eye(k.shape[-1], dtype=k.dtype, device=k.device)
    beta = torch.as_tensor(beta, dtype=k.dtype, device=k.device)
    return eye - beta[..., None, None] * k[..., :, None] * k[..., None, :]


def delta_update(x: torch.Tensor, k: torch.Tensor, beta: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """x + β k (v − kᵀx), i.e. A(k, β) x + β k v, without forming the C×C matrix.

    x, k: (..., C); beta, v: (..., 1).
    """
    return x + beta * k * (v - (k * x).sum(-1, keepdim=True))


def rms(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Parameter-free RMS normalisation over the last dim."""
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def map_gates(proj: torch.Tensor, alpha: torch.Tensor, b_pre: torch.Tensor, b_post: torch.Tensor,
              b_res: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """mHC's gates from the maps' normalised projections (..., 2n+n²): H_pre = σ(·) and
    H_post = 2σ(·), each (..., n), and Sinkhorn's logits (..., n, n)."""
    pre, post, res = proj.split((n, n, n * n), dim=-1)
    return (torch.sigmoid(alpha[0] * pre + b_pre), 2 * torch.sigmoid(alpha[1] * post + b_post),
            alpha[2] * res.unflatten(-1, (n, n)) + b_res)


def expand_streams(x: torch.Tensor, n: int, dtype: str = "float32") -> torch.Tensor:
    """(B, T, C) → (B, T, n, C) in ``dtype`` (``ModelConfig.stream_dtype``): every
    stream starts as a copy of the embedding. The state stays in that dtype
    between connections, each of which casts its output back to it."""
    return x.to(getattr(torch, dtype)).unsqueeze(2).expand(-1, -1, n, -1).contiguous()


def reduce_streams(x: torch.Tensor) -> torch.Tensor:
    """(B, T, n, C) → (B, T, C) by summing the streams, as Zhu et al. do, in fp32."""
    return x.sum(dim=2, dtype=torch.float32)


# ---- fused Sinkhorn (CUDA through Triton; absent on CPU-only installs) ---------

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only torch: the log-space loop above is the only path
    triton = None

_FUSED = triton is not None
_SINKHORN_BLOCK = 32  # matrices per program, one per thread


if _FUSED:
    # Each 4×4 matrix lives in one thread's registers as four row vectors, so a
    # row normalisation is a reduction inside the thread and a column one is
    # elementwise across the rows: no shuffles or shared memory in the 2·iters
    # dependent steps, which would otherwise set the time.

    @triton.jit
    def _row_norm(r):
        """r − logsumexp(r) over each row; r: (BLOCK, 4), row i of BLOCK matrices."""
        m = tl.max(r, axis=1)[:, None]
        return r - m - tl.log(tl.sum(tl.exp(r - m), axis=1))[:, None]

    @triton.jit
    def _col_norm(r0, r1, r2, r3):
        m = tl.maximum(tl.maximum(r0, r1), tl.maximum(r2, r3))
        lse = m + tl.log(tl.exp(r0 - m) + tl.exp(r1 - m) + tl.exp(r2 - m) + tl.exp(r3 - m))
        return r0 - lse, r1 - lse, r2 - lse, r3 - lse

    @triton.jit
    def _iterate(r0, r1, r2, r3, steps):
        for _ in range(steps):
            r0, r1, r2, r3 = _col_norm(_row_norm(r0), _row_norm(r1), _row_norm(r2), _row_norm(r3))
        return r0, r1, r2, r3

    @triton.jit
    def _row_offsets(n_mats, BLOCK: tl.constexpr):
        mat = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        offs = mat[:, None] * 16 + tl.arange(0, 4)[None, :]  # row 0 of each matrix; row i at + 4i
        return offs, (mat < n_mats)[:, None] & (offs >= 0)

    @triton.jit
    def _sinkhorn_fwd_kernel(logits_ptr, out_ptr, n_mats, ITERS: tl.constexpr, BLOCK: tl.constexpr):
        offs, mask = _row_offsets(n_mats, BLOCK)
        r0 = tl.load(logits_ptr + offs, mask=mask, other=0.0)
        r1 = tl.load(logits_ptr + offs + 4, mask=mask, other=0.0)
        r2 = tl.load(logits_ptr + offs + 8, mask=mask, other=0.0)
        r3 = tl.load(logits_ptr + offs + 12, mask=mask, other=0.0)
        r0, r1, r2, r3 = _iterate(r0, r1, r2, r3, ITERS)
        tl.store(out_ptr + offs, tl.exp(r0), mask=mask)
        tl.store(out_ptr + offs + 4, tl.exp(r1), mask=mask)
        tl.store(out_ptr + offs + 8, tl.exp(r2), mask=mask)
        tl.store(out_ptr + offs + 12, tl.exp(r3), mask=mask)

    @triton.jit
    def _sinkhorn_bwd_kernel(logits_ptr, grad_out_ptr, grad_in_ptr, saved_ptr, n_mats,
                             ITERS: tl.constexpr, BLOCK: tl.constexpr):
        # Each half-step y = x − lse(x) has the backward dx = dy − exp(y)·Σ dy along
        # its axis, so going back through step k needs only that step's outputs. The
        # forward is run again once, writing each iteration's input to ``saved``
        # (iters matrices a matrix, in the logits' layout: the logits, then each
        # column step's output but the last), then read back in reverse: iteration
        # k's column output is the next one's input (or the last, still in
        # registers), its row output one row step from its own input. Saving both
        # steps' outputs moved twice the bytes (41 µs a connection of 16k tokens on
        # an H200); recomputing each step's outputs from the logits instead (no
        # scratch) runs iters²/2 dependent steps: 0.17 ms on an H100.
        offs, mask = _row_offsets(n_mats, BLOCK)
        plane = n_mats * 16  # one saved iteration's matrices
        r0 = tl.load(logits_ptr + offs, mask=mask, other=0.0)
        r1 = tl.load(logits_ptr + offs + 4, mask=mask, other=0.0)
        r2 = tl.load(logits_ptr + offs + 8, mask=mask, other=0.0)
        r3 = tl.load(logits_ptr + offs + 12, mask=mask, other=0.0)
        for k in range(ITERS):
            rows = saved_ptr + k * plane + offs  # iteration k's input
            tl.store(rows, r0, mask=mask)
            tl.store(rows + 4, r1, mask=mask)
            tl.store(rows + 8, r2, mask=mask)
            tl.store(rows + 12, r3, mask=mask)
            r0, r1, r2, r3 = _col_norm(_row_norm(r0), _row_norm(r1), _row_norm(r2), _row_norm(r3))
        g0 = tl.load(grad_out_ptr + offs, mask=mask, other=0.0) * tl.exp(r0)  # through the final exp
        g1 = tl.load(grad_out_ptr + offs + 4, mask=mask, other=0.0) * tl.exp(r1)
        g2 = tl.load(grad_out_ptr + offs + 8, mask=mask, other=0.0) * tl.exp(r2)
        g3 = tl.load(grad_out_ptr + offs + 12, mask=mask, other=0.0) * tl.exp(r3)
        for back in range(ITERS):  # r0..r3: iteration k's column output
            k = ITERS - 1 - back
            col_sum = g0 + g1 + g2 + g3
            g0 = g0 - tl.exp(r0) * col_sum
            g1 = g1 - tl.exp(r1) * col_sum
            g2 = g2 - tl.exp(r2) * col_sum
            g3 = g3 - tl.exp(r3) * col_sum
            rows = saved_ptr + k * plane + offs
            r0 = tl.load(rows, mask=mask, other=0.0)  # iteration k's input: the one before's column output
            r1 = tl.load(rows + 4, mask=mask, other=0.0)
            r2 = tl.load(rows + 8, mask=mask, other=0.0)
            r3 = tl.load(rows + 12, mask=mask, other=0.0)
            g0 = g0 - tl.exp(_row_norm(r0)) * tl.sum(g0, axis=1)[:, None]
            g1 = g1 - tl.exp(_row_norm(r1)) * tl.sum(g1, axis=1)[:, None]
            g2 = g2 - tl.exp(_row_norm(r2)) * tl.sum(g2, axis=1)[:, None]
            g3 = g3 - tl.exp(_row_norm(r3)) * tl.sum(g3, axis=1)[:, None]
        tl.store(grad_in_ptr + offs, g0, mask=mask)
        tl.store(grad_in_ptr + offs + 4, g1, mask=mask)
        tl.store(grad_in_ptr + offs + 8, g2, mask=mask)
        tl.store(grad_in_ptr + offs + 12, g3, mask=mask)

    def _launch(kernel, *tensors: torch.Tensor, iters: int) -> None:
        n_mats = tensors[0].shape[0]
        grid = (triton.cdiv(n_mats, _SINKHORN_BLOCK),)
        kernel[grid](*tensors, n_mats, ITERS=iters, BLOCK=_SINKHORN_BLOCK, num_warps=1)

    # custom ops, so torch.compile keeps the kernels whole instead of breaking its graph
    @torch.library.custom_op("muse_architecture::sinkhorn", mutates_args=(), device_types="cuda")
    def _fused_sinkhorn(logits: torch.Tensor, iters: int) -> torch.Tensor:
        """(M, n, n) float32 logits → (M, n, n) doubly stochastic; see ``sinkhorn``."""
        out = torch.empty_like(logits)
        _launch(_sinkhorn_fwd_kernel, logits, out, iters=iters)
        return out

    @torch.library.custom_op("muse_architecture::sinkhorn_backward", mutates_args=(), device_types="cuda")
    def _fused_sinkhorn_backward(logits: torch.Tensor, grad: torch.Tensor, iters: int) -> torch.Tensor:
        grad_in = torch.empty_like(logits)
        saved = logits.new_empty((iters, *logits.shape))  # each iteration's input: iters·64 B a matrix
        _launch(_sinkhorn_bwd_kernel, logits, grad.contiguous(), grad_in, saved, iters=iters)
        return grad_in

    @_fused_sinkhorn.register_fake
    def _(logits: torch.Tensor, iters: int) -> torch.Tensor:
        return torch.empty_like(logits)

    @_fused_sinkhorn_backward.register_fake
    def _(logits: torch.Tensor, grad: torch.Tensor, iters: int) -> torch.Tensor:
        return torch.empty_like(logits)

    def _sinkhorn_setup(ctx, inputs, output) -> None:  # type: ignore[no-untyped-def]
        ctx.save_for_backward(inputs[0])
        ctx.iters = inputs[1]

    def _sinkhorn_grad(ctx, grad: torch.Tensor):  # type: ignore[no-untyped-def]
        (logits,) = ctx.saved_tensors
        return _fused_sinkhorn_backward(logits, grad, ctx.iters), None

    _fused_sinkhorn.register_autograd(_sinkhorn_grad, setup_context=_sinkhorn_setup)


# ---- connections --------------------------------------------------------------

class StandardResidual(nn.Module):
    def forward(self, x: torch.Tensor, f: Sublayer) -> torch.Tensor:
        return x + f(x)


class HyperConnection(nn.Module):
    """Dynamic hyper-connection (Zhu et al.) over n streams."""

    def __init__(self, config: ModelConfig, sublayer_index: int) -> None:
        super().__init__()
        n, d = config.streams, config.d_model
        self.eps = config.norm_eps
        self.a_m = nn.Parameter(F.one_hot(torch.tensor(sublayer_index % n), n).float())
        self.a_r = nn.Parameter(torch.eye(n))
        self.b = nn.Parameter(torch.ones(n))
        self.w_m = nn.Parameter(torch.zeros(d))
        self.w_r = nn.Parameter(torch.zeros(d, n))
        self.w_b = nn.Parameter(torch.zeros(d))
        self.s_a = nn.Parameter(torch.tensor(0.01))
        self.s_b = nn.Parameter(torch.tensor(0.01))

    def forward(self, x: torch.Tensor, f: Sublayer) -> torch.Tensor:
        state, x = x, x.float()  # a bf16 state computes in fp32 here (a no-op for an fp32 one)
        xn = rms(x, self.eps)  # (B, T, n, C)
        a_m = self.a_m + self.s_a * torch.tanh(xn @ self.w_m)  # (B, T, n)
        a_r = self.a_r + self.s_a * torch.tanh(xn @ self.w_r)  # (B, T, n, n), row j from stream j
        b = self.b + self.s_b * torch.tanh(xn @ self.w_b)  # (B, T, n)
        y = f(torch.einsum("btn,btnc->btc", a_m, x))  # (B, T, C)
        mixed = torch.einsum("btji,btjc->btic", a_r, x)  # A_rᵀ H
        return (mixed + b.unsqueeze(-1) * y.unsqueeze(2)).to(state.dtype)


class ManifoldMaps(nn.Module):
    """mHC's H_pre, H_post (non-negative) and H_res (doubly stochastic) from the n streams."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        n, d = config.streams, config.d_model
        self.n, self.iters, self.eps, self.fused = n, config.sinkhorn_iters, config.norm_eps, config.fused_kernels
        self.phi_pre = nn.Parameter(torch.randn(n * d, n) * 0.02)
        self.phi_post = nn.Parameter(torch.randn(n * d, n) * 0.02)
        self.phi_res = nn.Parameter(torch.randn(n * d, n * n) * 0.02)
        self.b_pre = nn.Parameter(torch.full((n,), -math.log(n - 1) if n > 1 else 4.0))
        self.b_post = nn.Parameter(torch.zeros(n))
        self.b_res = nn.Parameter(4.0 * torch.eye(n))
        self.alpha = nn.Parameter(torch.full((3,), 0.01))  # pre, post, res

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        B, T, n, C = x.shape
        flat = x.reshape(B, T, n * C)
        # RMSNorm(x) φ = (x φ)/rms(x): scale the 2n+n² outputs rather than write a
        # normalised copy of x, and read x once for all three maps, not three times
        phi = self.phi()
        if fused_streams.maps_usable(x, self.fused):  # one Triton pass each way (maps_project)
            proj = fused_streams.maps_project(flat, phi, self.eps)
        else:
            at_least_fp32 = torch.promote_types(flat.dtype, torch.float32)  # a float64 reference stays float64
            ms = torch.linalg.vector_norm(flat, dim=-1, keepdim=True, dtype=at_least_fp32).square() / (n * C)
            proj = (flat @ phi) * torch.rsqrt(ms + self.eps)  # (B, T, 2n+n²)
        h_pre, h_post, res_logits = map_gates(proj, self.alpha, self.b_pre, self.b_post, self.b_res, n)
        return h_pre, h_post, sinkhorn(res_logits, self.iters)  # H_res: (B, T, n, n)

    def phi(self) -> torch.Tensor:
        """The three maps' projections as one (nC, 2n+n²) matrix: one product reads x once."""
        return torch.cat((self.phi_pre, self.phi_post, self.phi_res), dim=1)


class ManifoldHyperConnection(nn.Module):
    """mHC: x_{l+1} = H_res x_l + H_postᵀ F(H_pre x_l)."""

    def __init__(self, config: ModelConfig, sublayer_index: int) -> None:
        super().__init__()
        self.maps = ManifoldMaps(config)

    def forward(self, x: torch.Tensor, f: Sublayer) -> torch.Tensor:
        xm, fused = matmul_operand(x), self.maps.fused  # (B, T, n, C)
        if fused_mhc.usable(xm, fused):  # the whole connection, one gradient of the state (fused_mhc)
            return fused_mhc.connection(self.maps, xm, f, x.dtype)
        h_pre, h_post, h_res = self.maps(xm)
        y = f(read_streams(h_pre, xm, fused))  # (B, T, C)
        return write_streams(h_res, xm, h_post, y, x.dtype, fused)  # (B, T, n, C), the state's dtype


class DeltaGate(nn.Module):
    """DDL's direction k, gate β ∈ [0, β_max] and value v from the input h and output u."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        d = config.d_model
        self.beta_max, self.eps, self.fused = config.beta_max, config.norm_eps, config.fused_kernels
        self.w_beta = nn.Parameter(torch.zeros(d))
        self.b_beta = nn.Parameter(torch.zeros(1))  # β starts at β_max/2: projection-like for β_max = 2
        self.w_v = nn.Parameter(torch.randn(d) * 0.02)
        self.b_v = nn.Parameter(torch.zeros(1))

    def forward(self, h: torch.Tensor, u: torch.Tensor) -> tuple[torch.Tensor, ...]:
        k = F.normalize(u, dim=-1, eps=self.eps)  # (B, T, C), unit
        beta = self.beta_max * torch.sigmoid(rms(h, self.eps) @ self.w_beta + self.b_beta).unsqueeze(-1)
        v = (u @ self.w_v + self.b_v).unsqueeze(-1)  # (B, T, 1)
        return k, beta, v


class DeltaResidual(nn.Module):
    """DDL, d_v = 1: x_{l+1} = x_l + β k (v − kᵀ x_l)."""

    def __init__(self, config: ModelConfig, sublayer_index: int) -> None:
        super().__init__()
        self.gate = DeltaGate(config)

    def forward(self, x: torch.Tensor, f: Sublayer) -> torch.Tensor:
        u = f(x)
        if fused_streams.usable(x, self.gate.fused):  # one Triton pass each way (fused_delta)
            g = self.gate
            return fused_delta.delta_residual(x, u, g.w_beta, g.b_beta, g.w_v, g.b_v, g.beta_max, g.eps)
        k, beta, v = self.gate(x, u)
        return delta_update(x, k, beta, v)


class ManifoldDeltaConnection(nn.Module):
    """mgt: X_{l+1} = (H_res X_l)(I − β k kᵀ) + β (H_post v) kᵀ."""

    def __init__(self, config: ModelConfig, sublayer_index: int) -> None:
        super().__init__()
        self.maps = ManifoldMaps(config)
        self.gate = DeltaGate(config)

    def forward(self, x: torch.Tensor, f: Sublayer) -> torch.Tensor:
        xm, fused = matmul_operand(x), self.maps.fused  # (B, T, n, C)
        if fused_mhc.usable(xm, fused, "mgt"):  # one gradient of the state, as mHC's (fused_mhc)
            return fused_mhc.delta_connection(self.maps, self.gate, xm, f, x.dtype)
        h_pre, h_post, h_res = self.maps(xm)
        h = read_streams(h_pre, xm, fused)  # (B, T, C)
        k, beta, v = self.gate(h, f(h))  # (B, T, C), (B, T, 1), (B, T, 1)
        target = h_post.unsqueeze(-1) * v.unsqueeze(2)  # (B, T, n, 1): each stream's write
        if fused_streams.usable(x, fused):
            # H_res X + β k (t − kᵀ H_res X) = H_res X + c ⊗ k with c = β (t − H_res (kᵀX)):
            # the update is a write of k, and kᵀX the n dot products of one pass over X
            kx = fused_streams.stream_dots(xm, k)  # (B, T, n)
            c = beta * (target.squeeze(-1) - (h_res * kx.unsqueeze(-2)).sum(-1))  # (B, T, n), fp32
            return write_streams(h_res, xm, c, k, x.dtype, fused)
        mixed = mix_streams(h_res, xm)  # (B, T, n, C)
        return delta_update(mixed, k.unsqueeze(2), beta.unsqueeze(2), target).to(x.dtype)


def torch_connections(modules: list[nn.Module]) -> bool:
    """Every connection among ``modules`` (and inside them) that runs fused kernels back to torch's ops,
    the same function: whether there was one (a stage whose kernels fail goes on without them)."""
    changed = False
    for root in modules:
        for module in root.modules():
            if isinstance(module, (ManifoldMaps, DeltaGate)) and module.fused != "off":
                module.fused, changed = "off", True
    return changed


# ---- registry -----------------------------------------------------------------

@dataclass(frozen=True)
class Residual:
    make: Callable[[ModelConfig, int], nn.Module]  # (config, sublayer index) → connection
    multi_stream: bool


def _standard(config: ModelConfig, sublayer_index: int) -> nn.Module:
    return StandardResidual()


# residual mode → its module and stream layout, from its record (modes.py)
RESIDUALS: dict[str, Residual] = {name: Residual(load(m.module), multi_stream=m.multi_stream)
                                  for name, m in RESIDUAL_MODES.items()}
