"""DDL's residual update as one Triton pass each way: x + β k (v − kᵀx) (``residual.DeltaResidual``).

With u = F(x) the sublayer's output, k = u/‖u‖, v = w_vᵀu + b_v and β = β_max σ(w_βᵀ rms(x) + b_β),
torch computes the update as several passes over (tokens, C) tensors (the norms of u and x, the dot
products, the update, and as many again backward, with bf16 roundings between them under autocast).
Each is a per-token reduction followed by a per-token write, so one program can hold a token's row
and do all of it: the forward reads x and u and writes the result, as the standard residual's add
does; the backward reads x, u and the result's gradient and writes ∂x and ∂u, recomputing k, β and v
instead of storing them. Everything is computed in fp32 whatever the inputs' dtypes.

Backward, per token, with s = v − kᵀx and g = ∂out (out = x + β s k):
  ∂β = s kᵀg,  ∂s = β kᵀg  (so ∂v = ∂s, ∂(kᵀx) = −∂s),  ∂k = β s g − ∂s x,
  ∂z = ∂β β (1 − β/β_max)  for z = r wᵀ_βx + b_β, r = rsqrt(mean(x²) + eps),
  ∂x = g − ∂s k + ∂z (r w_β − (r³/C)(wᵀ_βx) x),
  ∂u = ∂v w_v + (∂k − (∂kᵀk) k)/‖u‖   (∂k/eps where ‖u‖ < eps, as F.normalize clamps),
and the parameters' gradients are sums over tokens: ∂w_β = Σ ∂z r x, ∂b_β = Σ ∂z, ∂w_v = Σ ∂v u,
∂b_v = Σ ∂v. Each backward program sums its tokens' shares; torch adds the programs' rows.

The op is a ``torch.library.custom_op`` (CUDA), as ``fused_streams``' ops are; the launchers take
plain tensors of any device, so the tests run them on CPU under ``TRITON_INTERPRET=1``.
``residual.DeltaResidual`` uses it when ``fused_streams.usable(x, config.fused_kernels)``.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only torch: DeltaResidual's torch path is the only one
    triton = None

AVAILABLE = triton is not None
# 32 timed fastest on an H100 (scripts/tune_kernels.py, docs/tune_kernels_h100.json: 0.173 ms against 0.219 at 64)
TOKENS_PER_PROGRAM = 32  # backward: tokens whose parameter-gradient shares one program sums
# tokens a program takes at once (a (ROWS, C) tile), backward and forward; scripts/tune_kernels.py times them.
# 1, a row at a time: the H100 tuning of 2026-12-07 picked 8 backward (which spills registers on sm_90) and 2
# forward, and ddl through plan run came out no faster (docs/bench_plan_run.md)
ROWS = {"backward": 1, "forward": 1}
# warps a program runs (None: 4 for a tile of up to 2048 elements, else 8), and how many of the backward's
# token steps are in flight at once (Triton's software pipelining of its loop; 1: none); the tuner times them
WARPS = {"backward": None, "forward": None}
STAGES = 1


def delta_residual(x: torch.Tensor, u: torch.Tensor, w_beta: torch.Tensor, b_beta: torch.Tensor,
                   w_v: torch.Tensor, b_v: torch.Tensor, beta_max: float, eps: float) -> torch.Tensor:
    """x + β k (v − kᵀx) over the last dim: (..., C) each, out in x's dtype (see the module)."""
    C = x.shape[-1]
    out = _delta_op(x.reshape(-1, C).contiguous(), u.reshape(-1, C).contiguous(), w_beta.float().contiguous(),
                    b_beta.float().reshape(1), w_v.float().contiguous(), b_v.float().reshape(1), float(beta_max),
                    float(eps))
    return out.view(x.shape)


# ---- launchers: plain tensors, any device -------------------------------------------

def _consts(C: int, rows: int, part: str) -> dict:
    block = triton.next_power_of_2(C)
    return dict(C=C, BLOCK_C=block, R=rows, num_warps=WARPS[part] or (4 if rows * block <= 2048 else 8))


def delta_forward(x: torch.Tensor, u: torch.Tensor, w_beta: torch.Tensor, b_beta: torch.Tensor,
                  w_v: torch.Tensor, b_v: torch.Tensor, beta_max: float, eps: float) -> torch.Tensor:
    """x (M, C), u (M, C), w_β, w_v (C,) fp32, b_β, b_v (1,) fp32 → (M, C) in x's dtype."""
    M, C = x.shape
    out = torch.empty_like(x)
    if M:
        rows = ROWS["forward"]
        _delta_fwd_kernel[(triton.cdiv(M, rows),)](x, u, w_beta, b_beta, w_v, b_v, out, M, beta_max, eps,
                                                   **_consts(C, rows, "forward"))
    return out


def delta_backward(x: torch.Tensor, u: torch.Tensor, w_beta: torch.Tensor, b_beta: torch.Tensor,
                   w_v: torch.Tensor, b_v: torch.Tensor, grad: torch.Tensor, beta_max: float,
                   eps: float) -> tuple[torch.Tensor, ...]:
    """(∂x, ∂u, ∂w_β, ∂b_β, ∂w_v, ∂b_v), each in its input's dtype and shape."""
    M, C = x.shape
    rows = min(ROWS["backward"], TOKENS_PER_PROGRAM)
    if TOKENS_PER_PROGRAM % rows:
        raise ValueError(f"fused_delta: TOKENS_PER_PROGRAM {TOKENS_PER_PROGRAM} is not a multiple of {rows} rows")
    programs = max(1, triton.cdiv(M, TOKENS_PER_PROGRAM))
    dx, du = torch.empty_like(x), torch.empty_like(u)
    # ∂w_β, ∂w_v, ∂b_β, ∂b_v: every program writes its whole row (no tokens: no program, zeros)
    shares = (torch.empty if M else torch.zeros)(programs, 2 * C + 2, dtype=torch.float32, device=x.device)
    if M:
        _delta_bwd_kernel[(programs,)](x, u, w_beta, b_beta, w_v, b_v, grad, dx, du, shares, M, beta_max, eps,
                                       TOKENS=TOKENS_PER_PROGRAM, STAGES=STAGES, **_consts(C, rows, "backward"))
    total = shares.sum(0)
    part = lambda lo, hi, like: total[lo:hi].to(like.dtype, copy=True)  # noqa: E731 - no output aliases another
    return dx, du, part(0, C, w_beta), part(2 * C, 2 * C + 1, b_beta), part(C, 2 * C, w_v), part(2 * C + 1, None, b_v)


# ---- kernels: a few tokens' rows at once in one program ------------------------------
# Each pass is a handful of reductions over a token's row (norms and dot products), then a write; both
# kernels take ``ROWS`` tokens a step as a (ROWS, C) tile and reduce along its rows.

if AVAILABLE:

    @triton.jit
    def _gate(x, u, w_beta, b_beta, w_v, b_v, beta_max, eps, C: tl.constexpr):
        """k, ‖u‖ (clamped), β, s = v − kᵀx, r and wᵀ_βx for tokens' rows x, u (R, BLOCK_C) fp32;
        each scalar of a token as (R, 1)."""
        norm_u = tl.maximum(tl.sqrt(tl.sum(u * u, axis=1)), eps)[:, None]
        k = u / norm_u
        r = (1.0 / tl.sqrt(tl.sum(x * x, axis=1) / C + eps))[:, None]
        wx = tl.sum(w_beta[None, :] * x, axis=1)[:, None]
        beta = beta_max * tl.sigmoid(r * wx + b_beta)
        s = (tl.sum(w_v[None, :] * u, axis=1) + b_v - tl.sum(k * x, axis=1))[:, None]
        return k, norm_u, beta, s, r, wx

    @triton.jit
    def _delta_fwd_kernel(x_ptr, u_ptr, wb_ptr, bb_ptr, wv_ptr, bv_ptr, out_ptr, M, beta_max, eps,
                          C: tl.constexpr, BLOCK_C: tl.constexpr, R: tl.constexpr):
        c = tl.arange(0, BLOCK_C)
        cm = c < C
        m = tl.program_id(0).to(tl.int64) * R + tl.arange(0, R).to(tl.int64)
        at, rm = m[:, None] * C + c[None, :], (m < M)[:, None] & cm[None, :]
        x = tl.load(x_ptr + at, mask=rm, other=0.0).to(tl.float32)
        u = tl.load(u_ptr + at, mask=rm, other=0.0).to(tl.float32)
        w_beta = tl.load(wb_ptr + c, mask=cm, other=0.0)
        w_v = tl.load(wv_ptr + c, mask=cm, other=0.0)
        k, norm_u, beta, s, r, wx = _gate(x, u, w_beta, tl.load(bb_ptr), w_v, tl.load(bv_ptr), beta_max, eps, C)
        tl.store(out_ptr + at, (x + beta * s * k).to(out_ptr.dtype.element_ty), mask=rm)

    @triton.jit
    def _delta_bwd_kernel(x_ptr, u_ptr, wb_ptr, bb_ptr, wv_ptr, bv_ptr, g_ptr, dx_ptr, du_ptr, shares_ptr, M,
                          beta_max, eps, C: tl.constexpr, BLOCK_C: tl.constexpr, TOKENS: tl.constexpr,
                          R: tl.constexpr, STAGES: tl.constexpr):
        c = tl.arange(0, BLOCK_C)
        cm = c < C
        w_beta = tl.load(wb_ptr + c, mask=cm, other=0.0)
        w_v = tl.load(wv_ptr + c, mask=cm, other=0.0)
        b_beta, b_v = tl.load(bb_ptr), tl.load(bv_ptr)
        d_wb = tl.zeros((BLOCK_C,), tl.float32)
        d_wv = tl.zeros((BLOCK_C,), tl.float32)
        d_bb = tl.sum(d_wb, axis=0)  # fp32 scalar zeros
        d_bv = tl.sum(d_wv, axis=0)
        for t in tl.range(0, TOKENS, R, num_stages=STAGES):
            m = tl.program_id(0).to(tl.int64) * TOKENS + t + tl.arange(0, R).to(tl.int64)
            # a token past M loads zeros: every share below is then 0
            at, rm = m[:, None] * C + c[None, :], (m < M)[:, None] & cm[None, :]
            x = tl.load(x_ptr + at, mask=rm, other=0.0).to(tl.float32)
            u = tl.load(u_ptr + at, mask=rm, other=0.0).to(tl.float32)
            g = tl.load(g_ptr + at, mask=rm, other=0.0).to(tl.float32)
            k, norm_u, beta, s, r, wx = _gate(x, u, w_beta, b_beta, w_v, b_v, beta_max, eps, C)
            kg = tl.sum(k * g, axis=1)[:, None]
            d_beta = s * kg
            d_s = beta * kg
            dk = beta * s * g - d_s * x
            dz = d_beta * beta * (1.0 - beta / beta_max)
            dx = g - d_s * k + dz * (r * w_beta[None, :] - (r * r * r / C) * wx * x)
            du = d_s * w_v[None, :] + tl.where(norm_u > eps, dk - tl.sum(dk * k, axis=1)[:, None] * k, dk) / norm_u
            tl.store(dx_ptr + at, dx.to(dx_ptr.dtype.element_ty), mask=rm)
            tl.store(du_ptr + at, du.to(du_ptr.dtype.element_ty), mask=rm)
            d_wb += tl.sum(dz * r * x, axis=0)
            d_wv += tl.sum(d_s * u, axis=0)
            d_bb += tl.sum(tl.sum(dz, axis=1), axis=0)
            d_bv += tl.sum(tl.sum(d_s, axis=1), axis=0)
        row = shares_ptr + tl.program_id(0).to(tl.int64) * (2 * C + 2)
        tl.store(row + c, d_wb, mask=cm)
        tl.store(row + C + c, d_wv, mask=cm)
        tl.store(row + 2 * C, d_bb)
        tl.store(row + 2 * C + 1, d_bv)

    # ---- the op: torch.compile keeps each kernel whole ---------------------------------

    @torch.library.custom_op("muse_architecture::delta_residual", mutates_args=(), device_types="cuda")
    def _delta_op(x: torch.Tensor, u: torch.Tensor, w_beta: torch.Tensor, b_beta: torch.Tensor, w_v: torch.Tensor,
                  b_v: torch.Tensor, beta_max: float, eps: float) -> torch.Tensor:
        return delta_forward(x, u, w_beta, b_beta, w_v, b_v, beta_max, eps)

    @torch.library.custom_op("muse_architecture::delta_residual_backward", mutates_args=(), device_types="cuda")
    def _delta_backward_op(x: torch.Tensor, u: torch.Tensor, w_beta: torch.Tensor, b_beta: torch.Tensor,
                           w_v: torch.Tensor, b_v: torch.Tensor, grad: torch.Tensor, beta_max: float,
                           eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                                torch.Tensor]:
        return delta_backward(x, u, w_beta, b_beta, w_v, b_v, grad, beta_max, eps)

    @_delta_op.register_fake
    def _(x, u, w_beta, b_beta, w_v, b_v, beta_max, eps):  # type: ignore[no-untyped-def]
        return torch.empty_like(x)

    @_delta_backward_op.register_fake
    def _(x, u, w_beta, b_beta, w_v, b_v, grad, beta_max, eps):  # type: ignore[no-untyped-def]
        return tuple(torch.empty_like(t) for t in (x, u, w_beta, b_beta, w_v, b_v))

    def _delta_setup(ctx, inputs, output) -> None:  # type: ignore[no-untyped-def]
        ctx.save_for_backward(*inputs[:6])
        ctx.beta_max, ctx.eps = inputs[6], inputs[7]

    def _delta_grad(ctx, grad: torch.Tensor):  # type: ignore[no-untyped-def]
        grads = _delta_backward_op(*ctx.saved_tensors, grad.contiguous(), ctx.beta_max, ctx.eps)
        return *grads, None, None

    _delta_op.register_autograd(_delta_grad, setup_context=_delta_setup)
