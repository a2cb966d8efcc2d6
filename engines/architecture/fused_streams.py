"""Fused Triton kernels for the passes multi-stream connections make over their n-stream state.

mHC's state is (B, T, n, C), n times the width of the standard residual, and a
connection's cost is its passes over it, not its arithmetic (2n² FLOPs an
element at n = 4). Xie et al. (arXiv 2512.24880, §4.3) fuse the read and the
write; this module does the same for muse's connections, each op one pass over
the state, accumulating in fp32 whatever the state's dtype:

``stream_read(h, x)``           y = Σ_j h[j] x[j]                  (M, n), (M, n, C) → (M, C)
``stream_write(H, x, p, y)``    out[i] = Σ_j H[i, j] x[j] + p[i] y  reads x and y once, writes out
``stream_dots(x, v)``           d[j] = ⟨x[j], v⟩                   (M, n, C), (M, C) → (M, n)
``maps_project(x, phi, eps)``   (x φ)/rms(x)                       (M, nC), (nC, P) → (M, P) fp32

``maps_project`` is mHC's three maps before their gates (``residual.ManifoldMaps``): the
RMS norm and the skinny product with φ (P = 2n + n² = 24 columns at n = 4) in one pass
over the state, and in its backward ∂x in one more (the product with φᵀ and the norm's
term together), where torch reads the state for the norm and for the product apart and
keeps an fp32 product of the state's width for the norm's backward. ∂φ = xᵀ (∂proj/rms)
is left to one matmul.

``stream_dots`` lets mgt's delta update, (H x)(I − β k kᵀ) + β (p v) kᵀ, be one
``stream_write`` with k as y: each stream's coefficient on k,
β (p_i v − Σ_j H[i, j] ⟨k, x_j⟩), needs only the n dot products ⟨k, x_j⟩.
``stream_read`` and ``stream_dots`` are each other's transposes: each one's
backward is the other op plus an outer product h ⊗ v, which is left to torch
so that under torch.compile inductor fuses it into the sum of the state's
gradients instead of writing it out as a tensor of its own.

Each op is a ``torch.library.custom_op`` with its fake and its autograd
registered, as ``residual._fused_sinkhorn`` is, so torch.compile keeps it as
one opaque call. The ``*_forward`` and ``write_backward`` launchers take plain
tensors of any device, so the tests run them on CPU under Triton's
interpreter (``TRITON_INTERPRET=1``). Connections use the ops when
``usable(x, mode)``: x on CUDA, Triton importable, and the model's ``fused_kernels`` (a plan's
``training.fused_kernels``) allows it.
"""

from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only torch: the connections' torch paths are the only ones
    triton = None

AVAILABLE = triton is not None
# ModelConfig.fused_kernels (training.fused_kernels in a plan) says where the connections use
# these ops: off (the default), eager (eager mode only) or on (under torch.compile too). Off by
# default: measured through ``muse plan run`` only slightly faster than Inductor's own fusion
# (docs/bench_plan_run.md). One mhc connection forward and backward, bf16 state, 16k tokens × 4 ×
# 1024, H100: eager 10.0 ms unfused, 4.9 fused; compiled 2.5 ms inductor's own fusion, 2.8 fused
# (the same 1.6 ms of device time: the custom ops cost host time, and inductor merges more).
MAPS = True  # with the stream ops, mHC's maps through maps_project (False: torch's; to compare)
MAX_BLOCK_C = 1024  # channels a program handles at once (fewer for a narrower model)


def usable(x: torch.Tensor, mode: str) -> bool:
    """Whether a connection whose config says ``fused_kernels: mode`` runs this module's ops on x:
    on CUDA, with Triton, mode on (or eager, and not under torch.compile)."""
    return AVAILABLE and mode != "off" and x.is_cuda and (mode == "on" or not torch.compiler.is_compiling())


def maps_usable(x: torch.Tensor, mode: str) -> bool:
    """Whether mHC's maps run ``maps_project`` on x: as ``usable``, for a bf16 x (a bf16 state,
    or eager autocast's copy) only. An fp32 state keeps torch's maps: the kernel's exact fp32
    product took 8.5 ms a connection forward and backward on an H100, against 0.12 ms in TF32
    for a bf16 one (``docs/profile_connection_h100.json``), and TF32 would round an fp32 state's maps."""
    return MAPS and x.dtype == torch.bfloat16 and usable(x, mode)


# ---- public ops on (..., n, C) states --------------------------------------------

def _tokens(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, *x.shape[-2:]).contiguous()


def _rows(t: torch.Tensor, width: int) -> torch.Tensor:
    """(..., width) → (M, width) fp32 contiguous: the per-token coefficients."""
    return t.float().reshape(-1, width).contiguous()


def stream_read(h: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Σ_j h[j] x[j]: (..., n), (..., n, C) → (..., C) in fp32."""
    n, C = x.shape[-2:]
    return _read_op(_rows(h, n), _tokens(x)).view(*x.shape[:-2], C)


def stream_write(h_res: torch.Tensor, x: torch.Tensor, h_post: torch.Tensor, y: torch.Tensor,
                 dtype: torch.dtype | None = None) -> torch.Tensor:
    """H_res x + h_post ⊗ y: (..., n, n), (..., n, C), (..., n), (..., C) → (..., n, C) in ``dtype``
    (default x's): the state's dtype when x is eager autocast's bf16 copy of an fp32 state."""
    n, C = x.shape[-2:]
    out = _write_op(_rows(h_res, n * n).view(-1, n, n), _tokens(x), _rows(h_post, n), y.reshape(-1, C).contiguous(),
                    dtype or x.dtype)
    return out.view(x.shape)


def stream_dots(x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """⟨x[j], v⟩ for each stream j: (..., n, C), (..., C) → (..., n) in fp32."""
    n, C = x.shape[-2:]
    return _dots_op(_tokens(x), v.reshape(-1, C).contiguous()).view(*x.shape[:-1])


def maps_project(flat: torch.Tensor, phi: torch.Tensor, eps: float) -> torch.Tensor:
    """(x φ) · rsqrt(mean(x²) + eps) over the last dim: (..., D), (D, P) → (..., P) in fp32."""
    D, P = phi.shape
    proj, _ = _maps_op(flat.reshape(-1, D).contiguous(), phi.float().contiguous(), float(eps))
    return proj.view(*flat.shape[:-1], P)


def phi_grad(x: torch.Tensor, phi: torch.Tensor, rinv: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """∂φ of the maps' projections (x φ) · r: xᵀ (∂proj · r), one matmul in x's dtype (as autocast's);
    x (M, D), rinv (M,), grad (M, P) → (D, P) in φ's dtype."""
    return (x.t() @ (grad * rinv.unsqueeze(-1)).to(x.dtype)).to(phi.dtype)


# ---- launchers: plain tensors, any device (the interpreter runs them on CPU) --------
# At 16k tokens × 4 × 1024 on an H100, 4 warps over 1024 channels ran every kernel at 2.3 to
# 2.9 TB/s in fp32 and bf16; 256 channels, or 8 warps, cost the write's backward up to 2×.

def _block(C: int, block_c: int | None) -> int:
    return block_c or min(MAX_BLOCK_C, triton.next_power_of_2(C))


def read_forward(h: torch.Tensor, x: torch.Tensor, block_c: int | None = None) -> torch.Tensor:
    """y = Σ_j h[j] x[j]; h (M, n) fp32, x (M, n, C) → y (M, C) in h's dtype (as torch promotes h·x)."""
    M, n, C = x.shape
    block_c = _block(C, block_c)
    y = h.new_empty(M, C)
    _read_kernel[(M, triton.cdiv(C, block_c))](h, x, y, C=C, N=n, BLOCK_C=block_c)
    return y


def dots_forward(x: torch.Tensor, v: torch.Tensor, block_c: int | None = None) -> torch.Tensor:
    """d[j] = ⟨x[j], v⟩; x (M, n, C), v (M, C) → d (M, n) fp32."""
    M, n, C = x.shape
    d = torch.empty(M, n, dtype=torch.float32, device=x.device)
    _dots_kernel[(M,)](x, v, d, C=C, N=n, NP=triton.next_power_of_2(n), BLOCK_C=_block(C, block_c))
    return d


def write_forward(h_res: torch.Tensor, x: torch.Tensor, h_post: torch.Tensor, y: torch.Tensor,
                  dtype: torch.dtype | None = None, block_c: int | None = None) -> torch.Tensor:
    """out[i] = Σ_j h_res[i, j] x[j] + h_post[i] y; h_* fp32, x (M, n, C), y (M, C) → ``dtype`` (x's)."""
    M, n, C = x.shape
    block_c = _block(C, block_c)
    out = torch.empty_like(x, dtype=dtype or x.dtype)
    _write_fwd_kernel[(M, triton.cdiv(C, block_c))](h_res, x, h_post, y, out, C=C, N=n,
                                                    NP=triton.next_power_of_2(n), BLOCK_C=block_c)
    return out


def write_backward(h_res: torch.Tensor, x: torch.Tensor, h_post: torch.Tensor, y: torch.Tensor,
                   grad: torch.Tensor, block_c: int | None = None, write_dx: bool = True) -> tuple[torch.Tensor, ...]:
    """(dh_res, dx, dh_post, dy) of ``write_forward``, in one pass over x and the gradient; each
    in its input's dtype. ``write_dx=False``: dx is left unwritten (``fused_mhc`` writes the
    state's gradient itself) and returned empty."""
    M, n, C = x.shape
    dh_res, dh_post, dy = (torch.empty_like(t) for t in (h_res, h_post, y))
    dx = torch.empty_like(x) if write_dx else x.new_empty(0)
    _write_bwd_kernel[(M,)](h_res, x, h_post, y, grad, dh_res, dx, dh_post, dy, C=C, N=n,
                            NP=triton.next_power_of_2(n), BLOCK_C=_block(C, block_c), WRITE_DX=write_dx)
    return dh_res, dx, dh_post, dy


# Tokens a program, state columns a step (multiples of 16: tl.dot). Every program reads all of φ,
# so fewer, wider programs read less of it: at 32 tokens in fp32, φ's reads from L2 were twice
# the state's and the forward ran at a third of the memory's speed (H100).
MAPS_BLOCK_M, MAPS_FWD_BLOCK_K, MAPS_BWD_BLOCK_K = 64, 64, 128
INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"


def _maps_args(x: torch.Tensor, phi: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """φ as the kernels read it, and their constants. A bf16 x multiplies φ in bf16 on a GPU, as
    autocast's matmul does; Triton's interpreter has no bf16 product, so there (and for an fp32 x)
    φ stays fp32 and the product runs in TF32 for a bf16 x, in fp32 for an fp32 one."""
    D, P = phi.shape
    bf16 = x.dtype == torch.bfloat16 and not INTERPRETING
    return phi.to(torch.bfloat16) if bf16 else phi, dict(
        D=D, P=P, PP=max(16, triton.next_power_of_2(P)), BM=MAPS_BLOCK_M, BF16=bf16,
        PRECISION="ieee" if x.dtype == torch.float32 else "tf32")


def maps_forward(x: torch.Tensor, phi: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """proj = (x φ) · r and r = rsqrt(mean(x²) + eps); x (M, D), φ (D, P) fp32 → (M, P), (M,) fp32
    (the product's precision: ``_maps_args``)."""
    M = x.shape[0]
    proj = torch.empty(M, phi.shape[1], dtype=torch.float32, device=x.device)
    rinv = torch.empty(M, dtype=torch.float32, device=x.device)
    phi, consts = _maps_args(x, phi)
    _maps_fwd_kernel[(triton.cdiv(M, MAPS_BLOCK_M),)](x, phi, proj, rinv, M, eps, BK=MAPS_FWD_BLOCK_K, **consts)
    return proj, rinv


def maps_backward(x: torch.Tensor, phi: torch.Tensor, proj: torch.Tensor, rinv: torch.Tensor,
                  grad: torch.Tensor) -> torch.Tensor:
    """∂x of ``maps_forward``'s proj: (grad · r) φᵀ − (r² / D) ⟨grad, proj⟩ x, in x's dtype."""
    M, D = x.shape
    dx = torch.empty_like(x)
    grid = (triton.cdiv(M, MAPS_BLOCK_M), triton.cdiv(D, MAPS_BWD_BLOCK_K))
    phi, consts = _maps_args(x, phi)
    _maps_bwd_kernel[grid](x, phi, proj, rinv, grad, dx, M, BK=MAPS_BWD_BLOCK_K, **consts)
    return dx


# ---- kernels ------------------------------------------------------------------------
# Rows are tokens, contiguous (n, C) each: a program's loads run along C, coalesced. The
# passes with no reduction over C (read, write forward) take one (token, C-block) each;
# those with one (dots, write backward) take a token and walk its C in blocks, reducing
# in fp32. C is a compile-time constant: one model has one width.

if AVAILABLE:

    @triton.jit
    def _read_kernel(h_ptr, x_ptr, y_ptr, C: tl.constexpr, N: tl.constexpr, BLOCK_C: tl.constexpr):
        """y = Σ_j h[j] x[j] over one C-block of one token."""
        m = tl.program_id(0).to(tl.int64)
        c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        cm = c < C
        acc = tl.zeros((BLOCK_C,), tl.float32)
        for j in tl.static_range(N):
            x_j = tl.load(x_ptr + (m * N + j) * C + c, mask=cm, other=0.0).to(tl.float32)
            acc += tl.load(h_ptr + m * N + j) * x_j
        tl.store(y_ptr + m * C + c, acc.to(y_ptr.dtype.element_ty), mask=cm)

    @triton.jit
    def _dots_kernel(x_ptr, v_ptr, d_ptr, C: tl.constexpr, N: tl.constexpr, NP: tl.constexpr,
                     BLOCK_C: tl.constexpr):
        """d[j] = ⟨x[j], v⟩ for one token."""
        m = tl.program_id(0).to(tl.int64)
        j = tl.arange(0, NP)
        jm = j < N
        acc = tl.zeros((NP, BLOCK_C), tl.float32)
        for start in range(0, C, BLOCK_C):
            c = start + tl.arange(0, BLOCK_C)
            cm = c < C
            x = tl.load(x_ptr + (m * N + j[:, None]) * C + c[None, :], mask=jm[:, None] & cm[None, :], other=0.0)
            acc += x.to(tl.float32) * tl.load(v_ptr + m * C + c, mask=cm, other=0.0).to(tl.float32)[None, :]
        tl.store(d_ptr + m * N + j, tl.sum(acc, axis=1), mask=jm)

    @triton.jit
    def _write_fwd_kernel(h_res_ptr, x_ptr, h_post_ptr, y_ptr, out_ptr, C: tl.constexpr, N: tl.constexpr,
                          NP: tl.constexpr, BLOCK_C: tl.constexpr):
        m = tl.program_id(0).to(tl.int64)
        c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        cm = c < C
        i = tl.arange(0, NP)
        im = i < N
        y = tl.load(y_ptr + m * C + c, mask=cm, other=0.0).to(tl.float32)
        acc = tl.load(h_post_ptr + m * N + i, mask=im, other=0.0)[:, None] * y[None, :]  # (NP, BLOCK_C)
        for j in tl.static_range(N):
            h_col = tl.load(h_res_ptr + (m * N + i) * N + j, mask=im, other=0.0)  # H[:, j]
            x_j = tl.load(x_ptr + (m * N + j) * C + c, mask=cm, other=0.0).to(tl.float32)
            acc += h_col[:, None] * x_j[None, :]
        tl.store(out_ptr + (m * N + i[:, None]) * C + c[None, :], acc.to(out_ptr.dtype.element_ty),
                 mask=im[:, None] & cm[None, :])

    @triton.jit
    def _write_bwd_kernel(h_res_ptr, x_ptr, h_post_ptr, y_ptr, g_ptr, dh_res_ptr, dx_ptr, dh_post_ptr, dy_ptr,
                          C: tl.constexpr, N: tl.constexpr, NP: tl.constexpr, BLOCK_C: tl.constexpr,
                          WRITE_DX: tl.constexpr):
        """dx[j] = Σ_i H[i, j] g[i], dy = Σ_i p[i] g[i], dH[i, j] = ⟨g[i], x[j]⟩, dp[i] = ⟨g[i], y⟩."""
        m = tl.program_id(0).to(tl.int64)
        j = tl.arange(0, NP)
        jm = j < N
        d_res = tl.zeros((NP, NP), tl.float32)  # dH; row i gathers stream i's gradient
        d_post = tl.zeros((NP,), tl.float32)
        for start in range(0, C, BLOCK_C):
            c = start + tl.arange(0, BLOCK_C)
            cm = c < C
            mask = jm[:, None] & cm[None, :]
            rows = (m * N + j[:, None]) * C + c[None, :]
            x = tl.load(x_ptr + rows, mask=mask, other=0.0).to(tl.float32)  # (NP, BLOCK_C)
            y = tl.load(y_ptr + m * C + c, mask=cm, other=0.0).to(tl.float32)
            dx = tl.zeros((NP, BLOCK_C), tl.float32)
            dy = tl.zeros((BLOCK_C,), tl.float32)
            for i in tl.static_range(N):
                g = tl.load(g_ptr + (m * N + i) * C + c, mask=cm, other=0.0).to(tl.float32)
                h_row = tl.load(h_res_ptr + (m * N + i) * N + j, mask=jm, other=0.0)  # H[i, :]
                dx += h_row[:, None] * g[None, :]
                dy += tl.load(h_post_ptr + m * N + i) * g
                d_res += tl.where(j[:, None] == i, tl.sum(x * g[None, :], axis=1)[None, :], 0.0)
                d_post += tl.where(j == i, tl.sum(g * y), 0.0)
            if WRITE_DX:
                tl.store(dx_ptr + rows, dx.to(dx_ptr.dtype.element_ty), mask=mask)
            tl.store(dy_ptr + m * C + c, dy.to(dy_ptr.dtype.element_ty), mask=cm)
        tl.store(dh_res_ptr + (m * N + j[:, None]) * N + j[None, :], d_res, mask=jm[:, None] & jm[None, :])
        tl.store(dh_post_ptr + m * N + j, d_post, mask=jm)

    @triton.jit
    def _token_rows(M, BM: tl.constexpr):
        """This program's BM tokens (int64 offsets) and which of them exist."""
        rows = tl.program_id(0) * BM + tl.arange(0, BM)
        return rows.to(tl.int64), rows < M

    @triton.jit
    def _maps_grad_rows(g_ptr, proj_ptr, rinv_ptr, rows, rm, D: tl.constexpr, P: tl.constexpr, PP: tl.constexpr):
        """For the maps' backward on BM tokens: ∂proj · r (BM, PP) and c = −(r²/D) ⟨∂proj, proj⟩ (BM,),
        the norm's term's coefficient on x."""
        cols = tl.arange(0, PP)
        small = rm[:, None] & (cols < P)[None, :]
        g = tl.load(g_ptr + rows[:, None] * P + cols[None, :], mask=small, other=0.0)
        proj = tl.load(proj_ptr + rows[:, None] * P + cols[None, :], mask=small, other=0.0)
        rinv = tl.load(rinv_ptr + rows, mask=rm, other=0.0)
        return g * rinv[:, None], -rinv * rinv / D * tl.sum(g * proj, axis=1)

    @triton.jit
    def _maps_tile(x_ptr, phi_ptr, rows, rm, k, km, cols, pm, D: tl.constexpr, P: tl.constexpr, BF16: tl.constexpr,
                   PRECISION: tl.constexpr):
        """One (tokens, state columns k) tile's share of the maps: x φ (BM, PP) and the sum of squares (BM,)."""
        x = tl.load(x_ptr + rows[:, None] * D + k[None, :], mask=rm[:, None] & km[None, :], other=0.0)
        xf = x.to(tl.float32)
        squares = tl.sum(xf * xf, axis=1)
        phi = tl.load(phi_ptr + k[:, None] * P + cols[None, :], mask=km[:, None] & pm[None, :], other=0.0)
        if BF16:
            dot = tl.dot(x, phi)
        else:
            dot = tl.dot(xf, phi, input_precision=PRECISION)
        return dot, squares

    @triton.jit
    def _maps_fwd_kernel(x_ptr, phi_ptr, proj_ptr, rinv_ptr, M, eps, D: tl.constexpr, P: tl.constexpr,
                         PP: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr, BF16: tl.constexpr,
                         PRECISION: tl.constexpr):
        """BM tokens: the sum of squares and x φ over D in steps of BK, then both scaled."""
        rows, rm = _token_rows(M, BM)
        cols = tl.arange(0, PP)
        pm = cols < P
        acc = tl.zeros((BM, PP), tl.float32)
        ss = tl.zeros((BM,), tl.float32)
        for start in range(0, D, BK):
            k = start + tl.arange(0, BK)
            dot, squares = _maps_tile(x_ptr, phi_ptr, rows, rm, k, k < D, cols, pm, D, P, BF16, PRECISION)
            acc += dot
            ss += squares
        rinv = tl.rsqrt(ss / D + eps)
        tl.store(proj_ptr + rows[:, None] * P + cols[None, :], acc * rinv[:, None], mask=rm[:, None] & pm[None, :])
        tl.store(rinv_ptr + rows, rinv, mask=rm)

    @triton.jit
    def _maps_bwd_kernel(x_ptr, phi_ptr, proj_ptr, rinv_ptr, g_ptr, dx_ptr, M, D: tl.constexpr, P: tl.constexpr,
                         PP: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr, BF16: tl.constexpr,
                         PRECISION: tl.constexpr):
        """One (BM tokens, BK columns) tile of ∂x: (g r) φᵀ + c x, c = −(r²/D) ⟨g, proj⟩ a token."""
        rows, rm = _token_rows(M, BM)
        cols = tl.arange(0, PP)
        g, coef = _maps_grad_rows(g_ptr, proj_ptr, rinv_ptr, rows, rm, D, P, PP)
        k = tl.program_id(1) * BK + tl.arange(0, BK)
        km = k < D
        tile = rm[:, None] & km[None, :]
        phi_t = tl.load(phi_ptr + k[None, :] * P + cols[:, None], mask=(cols < P)[:, None] & km[None, :], other=0.0)
        x = tl.load(x_ptr + rows[:, None] * D + k[None, :], mask=tile, other=0.0).to(tl.float32)
        if BF16:
            dx = tl.dot(g.to(tl.bfloat16), phi_t)
        else:
            dx = tl.dot(g, phi_t, input_precision=PRECISION)
        dx += coef[:, None] * x
        tl.store(dx_ptr + rows[:, None] * D + k[None, :], dx.to(dx_ptr.dtype.element_ty), mask=tile)

    # ---- custom ops: torch.compile keeps each kernel whole -----------------------------

    @torch.library.custom_op("muse_architecture::stream_read", mutates_args=(), device_types="cuda")
    def _read_op(h: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return read_forward(h, x)

    @torch.library.custom_op("muse_architecture::stream_dots", mutates_args=(), device_types="cuda")
    def _dots_op(x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return dots_forward(x, v)

    @torch.library.custom_op("muse_architecture::stream_write", mutates_args=(), device_types="cuda")
    def _write_op(h_res: torch.Tensor, x: torch.Tensor, h_post: torch.Tensor, y: torch.Tensor,
                  dtype: torch.dtype) -> torch.Tensor:
        return write_forward(h_res, x, h_post, y, dtype)

    @torch.library.custom_op("muse_architecture::stream_write_backward", mutates_args=(), device_types="cuda")
    def _write_backward_op(h_res: torch.Tensor, x: torch.Tensor, h_post: torch.Tensor, y: torch.Tensor,
                           grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        return write_backward(h_res, x, h_post, y, grad)

    @torch.library.custom_op("muse_architecture::maps_project", mutates_args=(), device_types="cuda")
    def _maps_op(x: torch.Tensor, phi: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
        return maps_forward(x, phi, eps)

    @torch.library.custom_op("muse_architecture::maps_project_backward", mutates_args=(), device_types="cuda")
    def _maps_backward_op(x: torch.Tensor, phi: torch.Tensor, proj: torch.Tensor, rinv: torch.Tensor,
                          grad: torch.Tensor) -> torch.Tensor:
        return maps_backward(x, phi, proj, rinv, grad)

    @_maps_op.register_fake
    def _(x: torch.Tensor, phi: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
        return x.new_empty(x.shape[0], phi.shape[1], dtype=torch.float32), x.new_empty(x.shape[0], dtype=torch.float32)

    @_maps_backward_op.register_fake
    def _(x: torch.Tensor, phi: torch.Tensor, proj: torch.Tensor, rinv: torch.Tensor,
          grad: torch.Tensor) -> torch.Tensor:
        return torch.empty_like(x)

    @_read_op.register_fake
    def _(h: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return h.new_empty(x.shape[0], x.shape[2])

    @_dots_op.register_fake
    def _(x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return x.new_empty(x.shape[:2], dtype=torch.float32)

    @_write_op.register_fake
    def _(h_res: torch.Tensor, x: torch.Tensor, h_post: torch.Tensor, y: torch.Tensor,
          dtype: torch.dtype) -> torch.Tensor:
        return torch.empty_like(x, dtype=dtype)

    @_write_backward_op.register_fake
    def _(h_res: torch.Tensor, x: torch.Tensor, h_post: torch.Tensor, y: torch.Tensor,
          grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        return tuple(torch.empty_like(t) for t in (h_res, x, h_post, y))  # type: ignore[return-value]

    def _save_inputs(ctx, inputs, output) -> None:  # type: ignore[no-untyped-def]
        ctx.save_for_backward(*(t for t in inputs if isinstance(t, torch.Tensor)))

    def _outer(h: torch.Tensor, v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """h[j] v for each stream j, in ``like``'s dtype: (M, n), (M, C) → (M, n, C)."""
        return (h.unsqueeze(-1) * v.unsqueeze(-2)).to(like.dtype)

    def _read_grad(ctx, grad: torch.Tensor):  # type: ignore[no-untyped-def]
        h, x = ctx.saved_tensors
        grad = grad.contiguous()
        return _dots_op(x, grad), _outer(h, grad, x)

    def _dots_grad(ctx, grad: torch.Tensor):  # type: ignore[no-untyped-def]
        x, v = ctx.saved_tensors
        grad = grad.contiguous()
        return _outer(grad, v, x), _read_op(grad, x).to(v.dtype)

    def _write_grad(ctx, grad: torch.Tensor):  # type: ignore[no-untyped-def]
        return *_write_backward_op(*ctx.saved_tensors, grad.contiguous()), None

    def _maps_setup(ctx, inputs, output) -> None:  # type: ignore[no-untyped-def]
        ctx.save_for_backward(inputs[0], inputs[1], *output)

    def _maps_grad(ctx, grad: torch.Tensor, _grad_rinv: torch.Tensor | None):  # type: ignore[no-untyped-def]
        x, phi, proj, rinv = ctx.saved_tensors
        grad = grad.contiguous()
        return _maps_backward_op(x, phi, proj, rinv, grad), phi_grad(x, phi, rinv, grad), None

    _maps_op.register_autograd(_maps_grad, setup_context=_maps_setup)
    _read_op.register_autograd(_read_grad, setup_context=_save_inputs)
    _dots_op.register_autograd(_dots_grad, setup_context=_save_inputs)
    _write_op.register_autograd(_write_grad, setup_context=_save_inputs)
