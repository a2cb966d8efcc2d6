"""mHC's connection with one gradient of its state, not three: x_{l+1} = H_res x + H_postᵀ F(H_pre x).

With ``fused_streams``' ops the state x has three consumers (the maps, the read H_pre x and the
write H_res x + h_post ⊗ y), so its gradient is written three times (the write's, the maps', the
read's h_pre ⊗ ∂y) and autograd sums them: about a third of a connection's passes over the state
(``docs/bench_plan_run.md``). Here the state has one consumer, ``pre``: the maps, their gates
(sigmoids, Sinkhorn) and the read, returning y_in = H_pre x, h_post, H_res, and ``tap``, an
unwritten tensor of the state's shape. The write (``write``) reads x without differentiating it
and hands its output's gradient g back as ``tap``'s, so ``pre``'s backward has everything ∂x needs
and writes it once:

  ∂x = H_resᵀ g + h_pre ⊗ ∂y_in + (∂proj · r) φᵀ − (r²/D) ⟨∂proj, proj⟩ x,

one pass that reads x, g and ∂y_in (``_state_grad_kernel``), after the dots ⟨x_j, ∂y_in⟩ that
∂h_pre needs and the gates' small backward (sigmoids; Sinkhorn by its fused kernel). The write's
own backward then reads x, g and y for ∂H_res, ∂h_post and ∂y and writes no state gradient.

mgt's connection (``delta_connection``, behind ``DELTA``) has a fourth consumer of the state, the dots
d_j = ⟨x_j, k⟩ of its delta update; their op hands k and ∂d back as the gradients of two more taps of
``pre``, so the same one pass writes ∂x with their term ∂d_j k added.

n = 4 (the fused Sinkhorn's size), a bf16 state on a GPU (as ``fused_streams.maps_usable``). The
ops are ``torch.library.custom_op``s; the launchers run on CPU under ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

from typing import Callable

import torch

from engines.architecture import fused_streams as fs

triton, tl = fs.triton, (fs.tl if fs.AVAILABLE else None)
AVAILABLE = fs.AVAILABLE
ENABLED = True  # with fused_kernels on; False: fused_streams' three-gradient ops (to compare)
# mgt's connection through ``delta_connection`` (one gradient of its state); False: fused_streams' ops. Off: as
# accurate as torch's on an H100 but no faster through ``muse plan run`` (154.9 against 154.2 ms a step,
# docs/bench_plan_run.md, session 24)
DELTA = False
# (tokens, channels, warps) a program of each kernel; scripts/tune_kernels.py times the choices on a GPU.
# The state's gradient at 64 × 64 tiles (8 warps) needed more than 255 registers a thread and spilled (sm_90,
# scripts/check_kernels.py); at 32 × 64, 198. ``pre``'s two kernels read a program's tokens' state twice (the
# maps, then the read; the dots, then the gradient), the second time channel blocks last to first, to find in
# L2 what the first pass read last, so their programs take few tokens.
TILES = {"state_grad": (32, 64, 8), "pre_read": (16, 64, 4), "pre_grad": (16, 64, 8)}
# ``pre`` in two kernels (the maps with the read; the dots with the state's gradient), forward and backward;
# False: the maps, read, dots and state gradient as four kernels. On an H100 the two-kernel forward took
# 0.283 ms where the four-kernel form's maps and read take 0.123 (docs/bench_plan_run.md, last section)
TWO_PASS_FORWARD = False
TWO_PASS_BACKWARD = False


def usable(x: torch.Tensor, mode: str, residual: str = "mhc") -> bool:
    """x (..., n, C): n = 4 streams, and what ``fused_streams.maps_usable`` asks; for mgt, ``DELTA`` on."""
    return ENABLED and (residual != "mgt" or DELTA) and x.shape[-2] == 4 and fs.maps_usable(x, mode)


def connection(maps: torch.nn.Module, x: torch.Tensor, f: Callable[[torch.Tensor], torch.Tensor],
               dtype: torch.dtype) -> torch.Tensor:
    """``ManifoldHyperConnection``'s output through ``pre`` and ``write``; ``maps`` its ManifoldMaps."""
    B, T, n, C = x.shape
    flat = x.reshape(-1, n, C).contiguous()
    y_in, h_post, h_res, tap, _, _ = _pre_op(flat, maps.phi().float(), maps.alpha.float(), maps.b_pre.float(),
                                             maps.b_post.float(), maps.b_res.float(), float(maps.eps), int(maps.iters))
    y = f(y_in.view(B, T, C))
    out = _write_op(h_res, flat.detach(), h_post, y.reshape(-1, C).contiguous(), tap, dtype)
    return out.view(B, T, n, C)


def delta_connection(maps: torch.nn.Module, gate: torch.nn.Module, x: torch.Tensor,
                     f: Callable[[torch.Tensor], torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """``ManifoldDeltaConnection``'s output, X_{l+1} = H_res X + c ⊗ k with c = β (H_post v − H_res ⟨X, k⟩),
    through ``pre``, the dots and ``write``, so that the state's gradient is written once: the dots hand
    their term back to ``pre`` through two more taps. ``gate`` is its DeltaGate."""
    B, T, n, C = x.shape
    flat = x.reshape(-1, n, C).contiguous()
    y_in, h_post, h_res, tap, tap_k, tap_d, _, _ = _pre_delta_op(
        flat, maps.phi().float(), maps.alpha.float(), maps.b_pre.float(), maps.b_post.float(), maps.b_res.float(),
        float(maps.eps), int(maps.iters))
    h = y_in.view(B, T, C)
    k, beta, v = gate(h, f(h))  # (B, T, C), (B, T, 1), (B, T, 1)
    k = k.reshape(-1, C).contiguous()
    kx = _delta_dots_op(flat.detach(), k, tap_k, tap_d)  # (M, n)
    c = beta.reshape(-1, 1) * (h_post * v.reshape(-1, 1) - (h_res * kx.unsqueeze(-2)).sum(-1))  # (M, n) fp32
    out = _write_op(h_res, flat.detach(), c, k, tap, dtype)
    return out.view(B, T, n, C)


# ---- launchers: plain tensors, any device -------------------------------------------

def state_grad(x: torch.Tensor, g: torch.Tensor, h_res: torch.Tensor, h_pre: torch.Tensor, dy: torch.Tensor,
               phi: torch.Tensor, proj: torch.Tensor, rinv: torch.Tensor, dproj: torch.Tensor,
               k: torch.Tensor | None = None, dk: torch.Tensor | None = None) -> torch.Tensor:
    """∂x (module docstring): x, g (M, n, C); h_res (M, n, n), h_pre (M, n), dy (M, C), φ (nC, P),
    proj, dproj (M, P), rinv (M,) → (M, n, C) in x's dtype. With k (M, C) and dk (M, n), mgt's dots
    ⟨x_j, k⟩ add their term dk_j k to each stream's gradient."""
    M, n, C = x.shape
    if n != 4:  # the kernel holds four streams' gradients at once (usable() admits n = 4 alone)
        raise ValueError(f"fused_mhc.state_grad takes 4 streams, got {n}")
    dx = torch.empty_like(x)
    phi, consts = fs._maps_args(x, phi)
    bm, bc, warps = TILES["state_grad"]
    extra = k is not None
    _state_grad_kernel[(triton.cdiv(M, bm), triton.cdiv(C, bc))](
        x, g.contiguous(), h_res, h_pre, dy, phi, proj, rinv, dproj, dx, k.contiguous() if extra else dy,
        dk.contiguous() if extra else h_pre, M, C=C, N=n, BC=bc, **{**consts, "BM": bm}, EXTRA=extra,
        num_warps=warps)
    return dx


def pre_read(x: torch.Tensor, phi: torch.Tensor, alpha: torch.Tensor, b_pre: torch.Tensor,
             eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The maps' projections, their norm and the read in one kernel: x (M, n, C), φ (nC, P) →
    proj (M, P) and r (M,) as ``fused_streams.maps_forward``'s, y_in = Σ_j σ(α₀ proj_j + b_pre_j) x_j
    (M, C), all fp32."""
    M, n, C = x.shape
    P = phi.shape[1]
    f32 = dict(dtype=torch.float32, device=x.device)
    proj, rinv, y = torch.empty(M, P, **f32), torch.empty(M, **f32), torch.empty(M, C, **f32)
    phi, consts = fs._maps_args(x, phi)
    bm, bc, warps = TILES["pre_read"]
    _pre_read_kernel[(triton.cdiv(M, bm),)](x, phi, alpha, b_pre, proj, rinv, y, M, eps, C=C, N=n, BC=bc,
                                            **{**consts, "BM": bm}, num_warps=warps)
    return proj, rinv, y


def pre_grad(x: torch.Tensor, g: torch.Tensor, h_res: torch.Tensor, dy: torch.Tensor, phi: torch.Tensor,
             proj: torch.Tensor, rinv: torch.Tensor, alpha: torch.Tensor, b_pre: torch.Tensor,
             dproj: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``state_grad`` with the dots before it in one kernel: ∂x, and ∂(α₀ proj_pre + b_pre) (M, n) fp32,
    H_pre's part of ∂proj over α₀, which the kernel finds from ⟨x_j, ∂y_in⟩; ``dproj`` (M, P) holds
    ∂proj's other parts (its first n columns are not read)."""
    M, n, C = x.shape
    if n != 4:
        raise ValueError(f"fused_mhc.pre_grad takes 4 streams, got {n}")
    dx = torch.empty_like(x)
    d_pre = torch.empty(M, n, dtype=torch.float32, device=x.device)
    phi, consts = fs._maps_args(x, phi)
    bm, bc, warps = TILES["pre_grad"]
    _pre_grad_kernel[(triton.cdiv(M, bm),)](
        x, g.contiguous(), h_res, dy, phi, proj, rinv, alpha, b_pre, dproj, dx, d_pre, M, C=C, N=n, BC=bc,
        **{**consts, "BM": bm}, num_warps=warps)
    return dx, d_pre


if AVAILABLE:
    from engines.architecture.fused_streams import _maps_grad_rows, _maps_tile, _token_rows

    @triton.jit
    def _stream_grad_start(x_ptr, phi_ptr, h_pre, dproj, coef, dy, rows, rm, c, tile, cols, k, dk_ptr,
                           j: tl.constexpr, C: tl.constexpr, N: tl.constexpr, D: tl.constexpr, P: tl.constexpr,
                           BF16: tl.constexpr, PRECISION: tl.constexpr, EXTRA: tl.constexpr):
        """Stream j's ∂x before H_resᵀ g: the maps' terms and h_pre[j] ∂y (and mgt's dk[j] k), (BM, BC) fp32."""
        col = j * C + c  # the state's flat column of (stream j, channel c): φ's row
        x = tl.load(x_ptr + rows[:, None] * D + col[None, :], mask=tile, other=0.0).to(tl.float32)
        phi_t = tl.load(phi_ptr + col[None, :] * P + cols[:, None], mask=(cols < P)[:, None] & (c < C)[None, :],
                        other=0.0)
        if BF16:
            acc = tl.dot(dproj, phi_t)
        else:
            acc = tl.dot(dproj, phi_t, input_precision=PRECISION)
        acc += coef[:, None] * x + h_pre[:, None] * dy
        if EXTRA:
            acc += tl.load(dk_ptr + rows * N + j, mask=rm, other=0.0)[:, None] * k
        return acc

    @triton.jit
    def _state_grad_tile(x_ptr, g_ptr, hres_ptr, dy_ptr, phi_ptr, dx_ptr, k_ptr, dk_ptr, h0, h1, h2, h3, dproj, coef,
                         rows, rm, c, cols, C: tl.constexpr, N: tl.constexpr, D: tl.constexpr, P: tl.constexpr,
                         BF16: tl.constexpr, PRECISION: tl.constexpr, EXTRA: tl.constexpr):
        """∂x on BM tokens × BC channels of the four streams at once, so each of g's streams is read once
        (H_resᵀ g mixes every stream of g into every stream of ∂x; a loop over output streams read g N times).
        h0..h3: h_pre's four columns (BM,); dproj: ∂proj · r (BM, PP); coef: the norm's term's on x."""
        tile = rm[:, None] & (c < C)[None, :]
        dy = tl.load(dy_ptr + rows[:, None] * C + c[None, :], mask=tile, other=0.0).to(tl.float32)
        k = dy
        if EXTRA:
            k = tl.load(k_ptr + rows[:, None] * C + c[None, :], mask=tile, other=0.0).to(tl.float32)
        # each argument spelled out: a tuple unpacked into a jit call needs a newer Triton than torch>=2.4 brings
        acc0 = _stream_grad_start(x_ptr, phi_ptr, h0, dproj, coef, dy, rows, rm, c, tile, cols, k, dk_ptr, 0, C,
                                  N, D, P, BF16, PRECISION, EXTRA)
        acc1 = _stream_grad_start(x_ptr, phi_ptr, h1, dproj, coef, dy, rows, rm, c, tile, cols, k, dk_ptr, 1, C,
                                  N, D, P, BF16, PRECISION, EXTRA)
        acc2 = _stream_grad_start(x_ptr, phi_ptr, h2, dproj, coef, dy, rows, rm, c, tile, cols, k, dk_ptr, 2, C,
                                  N, D, P, BF16, PRECISION, EXTRA)
        acc3 = _stream_grad_start(x_ptr, phi_ptr, h3, dproj, coef, dy, rows, rm, c, tile, cols, k, dk_ptr, 3, C,
                                  N, D, P, BF16, PRECISION, EXTRA)
        for i in tl.static_range(N):  # H_resᵀ g: ∂x_j += H_res[i, j] g_i
            g = tl.load(g_ptr + rows[:, None] * D + (i * C + c)[None, :], mask=tile, other=0.0).to(tl.float32)
            h = hres_ptr + (rows * N + i) * N
            acc0 += tl.load(h, mask=rm, other=0.0)[:, None] * g
            acc1 += tl.load(h + 1, mask=rm, other=0.0)[:, None] * g
            acc2 += tl.load(h + 2, mask=rm, other=0.0)[:, None] * g
            acc3 += tl.load(h + 3, mask=rm, other=0.0)[:, None] * g
        out = dx_ptr + rows[:, None] * D + c[None, :]
        ty = dx_ptr.dtype.element_ty
        tl.store(out, acc0.to(ty), mask=tile)
        tl.store(out + C, acc1.to(ty), mask=tile)
        tl.store(out + 2 * C, acc2.to(ty), mask=tile)
        tl.store(out + 3 * C, acc3.to(ty), mask=tile)

    @triton.jit
    def _state_grad_kernel(x_ptr, g_ptr, hres_ptr, hpre_ptr, dy_ptr, phi_ptr, proj_ptr, rinv_ptr, dproj_ptr, dx_ptr,
                           k_ptr, dk_ptr, M, C: tl.constexpr, N: tl.constexpr, BM: tl.constexpr, BC: tl.constexpr,
                           D: tl.constexpr, P: tl.constexpr, PP: tl.constexpr, BF16: tl.constexpr,
                           PRECISION: tl.constexpr, EXTRA: tl.constexpr):
        """One (BM tokens, BC channels) tile of ∂x, h_pre and ∂proj read from memory."""
        rows, rm = _token_rows(M, BM)
        c = tl.program_id(1) * BC + tl.arange(0, BC)
        cols = tl.arange(0, PP)
        dproj, coef = _maps_grad_rows(dproj_ptr, proj_ptr, rinv_ptr, rows, rm, D, P, PP)
        if BF16:
            dproj = dproj.to(tl.bfloat16)
        h = hpre_ptr + rows * N
        _state_grad_tile(x_ptr, g_ptr, hres_ptr, dy_ptr, phi_ptr, dx_ptr, k_ptr, dk_ptr, tl.load(h, mask=rm, other=0.0),
                         tl.load(h + 1, mask=rm, other=0.0), tl.load(h + 2, mask=rm, other=0.0),
                         tl.load(h + 3, mask=rm, other=0.0), dproj, coef, rows, rm, c, cols, C, N, D, P, BF16,
                         PRECISION, EXTRA)

    @triton.jit
    def _column(t, cols, j: tl.constexpr):
        """Column j of t (BM, PP) as (BM,)."""
        return tl.sum(tl.where((cols == j)[None, :], t, 0.0), axis=1)

    @triton.jit
    def _pre_read_kernel(x_ptr, phi_ptr, alpha_ptr, bpre_ptr, proj_ptr, rinv_ptr, y_ptr, M, eps, C: tl.constexpr,
                         N: tl.constexpr, BC: tl.constexpr, D: tl.constexpr, P: tl.constexpr, PP: tl.constexpr,
                         BM: tl.constexpr, BF16: tl.constexpr, PRECISION: tl.constexpr):
        """BM tokens: x φ and the sum of squares, channel block by block (all streams of one block, then
        the next); then y_in = Σ_j σ(α₀ proj_j + b_pre_j) x_j, blocks last to first."""
        rows, rm = _token_rows(M, BM)
        cols = tl.arange(0, PP)
        pm = cols < P
        acc = tl.zeros((BM, PP), tl.float32)
        ss = tl.zeros((BM,), tl.float32)
        blocks: tl.constexpr = (C + BC - 1) // BC
        for b in range(blocks):
            c = b * BC + tl.arange(0, BC)
            cm = c < C
            for j in tl.static_range(N):
                dot, squares = _maps_tile(x_ptr, phi_ptr, rows, rm, j * C + c, cm, cols, pm, D, P, BF16, PRECISION)
                acc += dot
                ss += squares
        rinv = tl.rsqrt(ss / D + eps)
        proj = acc * rinv[:, None]
        tl.store(proj_ptr + rows[:, None] * P + cols[None, :], proj, mask=rm[:, None] & pm[None, :])
        tl.store(rinv_ptr + rows, rinv, mask=rm)
        h = tl.sigmoid(tl.load(alpha_ptr) * proj + tl.load(bpre_ptr + cols, mask=cols < N, other=0.0)[None, :])
        for back in range(blocks):
            c = (blocks - 1 - back) * BC + tl.arange(0, BC)
            tile = rm[:, None] & (c < C)[None, :]
            y = tl.zeros((BM, BC), tl.float32)
            for j in tl.static_range(N):
                x = tl.load(x_ptr + rows[:, None] * D + (j * C + c)[None, :], mask=tile, other=0.0)
                y += _column(h, cols, j)[:, None] * x.to(tl.float32)
            tl.store(y_ptr + rows[:, None] * C + c[None, :], y, mask=tile)

    @triton.jit
    def _pre_grad_kernel(x_ptr, g_ptr, hres_ptr, dy_ptr, phi_ptr, proj_ptr, rinv_ptr, alpha_ptr, bpre_ptr, dproj_ptr,
                         dx_ptr, dpre_ptr, M, C: tl.constexpr, N: tl.constexpr, BC: tl.constexpr, D: tl.constexpr,
                         P: tl.constexpr, PP: tl.constexpr, BM: tl.constexpr, BF16: tl.constexpr,
                         PRECISION: tl.constexpr):
        """BM tokens: ⟨x_j, ∂y_in⟩ over the channels, so H_pre's part of ∂proj; then ∂x, blocks last to
        first."""
        rows, rm = _token_rows(M, BM)
        cols = tl.arange(0, PP)
        pre = cols < N
        small = rm[:, None] & (cols < P)[None, :]
        proj = tl.load(proj_ptr + rows[:, None] * P + cols[None, :], mask=small, other=0.0)
        rinv = tl.load(rinv_ptr + rows, mask=rm, other=0.0)
        a0 = tl.load(alpha_ptr)
        h = tl.sigmoid(a0 * proj + tl.load(bpre_ptr + cols, mask=pre, other=0.0)[None, :])
        dots = tl.zeros((BM, PP), tl.float32)  # ⟨x_j, ∂y_in⟩ in column j
        blocks: tl.constexpr = (C + BC - 1) // BC
        for b in range(blocks):
            c = b * BC + tl.arange(0, BC)
            tile = rm[:, None] & (c < C)[None, :]
            dy = tl.load(dy_ptr + rows[:, None] * C + c[None, :], mask=tile, other=0.0).to(tl.float32)
            for j in tl.static_range(N):
                x = tl.load(x_ptr + rows[:, None] * D + (j * C + c)[None, :], mask=tile, other=0.0).to(tl.float32)
                dots += tl.where((cols == j)[None, :], tl.sum(x * dy, axis=1)[:, None], 0.0)
        d_pre = dots * h * (1 - h)  # through H_pre = σ(·); 0 past column N, as dots is
        tl.store(dpre_ptr + rows[:, None] * N + cols[None, :], d_pre, mask=rm[:, None] & pre[None, :])
        dproj = tl.load(dproj_ptr + rows[:, None] * P + cols[None, :], mask=small & (cols >= N)[None, :],
                        other=0.0) + a0 * d_pre
        coef = -rinv * rinv / D * tl.sum(dproj * proj, axis=1)
        dproj = dproj * rinv[:, None]
        if BF16:
            dproj = dproj.to(tl.bfloat16)
        h0 = _column(h, cols, 0)
        h1 = _column(h, cols, 1)
        h2 = _column(h, cols, 2)
        h3 = _column(h, cols, 3)
        for back in range(blocks):
            c = (blocks - 1 - back) * BC + tl.arange(0, BC)
            _state_grad_tile(x_ptr, g_ptr, hres_ptr, dy_ptr, phi_ptr, dx_ptr, dy_ptr, dy_ptr, h0, h1, h2, h3, dproj,
                             coef, rows, rm, c, cols, C, N, D, P, BF16, PRECISION, False)

    # ---- the ops ----------------------------------------------------------------------

    def pre_forward(x: torch.Tensor, phi: torch.Tensor, alpha: torch.Tensor, b_pre: torch.Tensor, b_post: torch.Tensor,
                    b_res: torch.Tensor, eps: float, iters: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                                           torch.Tensor, torch.Tensor, torch.Tensor]:
        """(y_in, h_post, H_res, tap, proj, rinv): the last two for the backward alone."""
        from engines.architecture.residual import _fused_sinkhorn, map_gates  # residual imports this module

        M, n, C = x.shape
        if TWO_PASS_FORWARD:
            proj, rinv, y_in = pre_read(x, phi, alpha, b_pre, eps)
            _, h_post, logits = map_gates(proj, alpha, b_pre, b_post, b_res, n)
        else:
            proj, rinv = fs._maps_op(x.view(M, n * C), phi, eps)
            h_pre, h_post, logits = map_gates(proj, alpha, b_pre, b_post, b_res, n)
            y_in = fs._read_op(h_pre, x)
        return y_in, h_post, _fused_sinkhorn(logits.contiguous(), iters), torch.empty_like(x), proj, rinv

    _pre_op = torch.library.custom_op("muse_architecture::mhc_pre", mutates_args=(), device_types="cuda")(pre_forward)

    @_pre_op.register_fake
    def _(x, phi, alpha, b_pre, b_post, b_res, eps, iters):  # type: ignore[no-untyped-def]
        M, n, C = x.shape
        f32 = dict(dtype=torch.float32, device=x.device)
        return (torch.empty(M, C, **f32), torch.empty(M, n, **f32), torch.empty(M, n, n, **f32), torch.empty_like(x),
                torch.empty(M, phi.shape[1], **f32), torch.empty(M, **f32))

    def pre_delta_forward(x: torch.Tensor, phi: torch.Tensor, alpha: torch.Tensor, b_pre: torch.Tensor,
                          b_post: torch.Tensor, b_res: torch.Tensor, eps: float,
                          iters: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                               torch.Tensor, torch.Tensor, torch.Tensor]:
        """``pre_forward``'s outputs with two more unwritten taps, for mgt: (M, C) in x's dtype and (M, n)
        fp32, through which the dots ⟨x_j, k⟩ hand k and their gradient back (``_delta_dots_grad``)."""
        y_in, h_post, h_res, tap, proj, rinv = pre_forward(x, phi, alpha, b_pre, b_post, b_res, eps, iters)
        M, n, C = x.shape
        return (y_in, h_post, h_res, tap, x.new_empty(M, C), x.new_empty(M, n, dtype=torch.float32), proj, rinv)

    _pre_delta_op = torch.library.custom_op("muse_architecture::mgt_pre", mutates_args=(),
                                            device_types="cuda")(pre_delta_forward)

    @_pre_delta_op.register_fake
    def _(x, phi, alpha, b_pre, b_post, b_res, eps, iters):  # type: ignore[no-untyped-def]
        M, n, C = x.shape
        f32 = dict(dtype=torch.float32, device=x.device)
        return (torch.empty(M, C, **f32), torch.empty(M, n, **f32), torch.empty(M, n, n, **f32), torch.empty_like(x),
                x.new_empty(M, C), torch.empty(M, n, **f32), torch.empty(M, phi.shape[1], **f32),
                torch.empty(M, **f32))

    def delta_dots(x: torch.Tensor, k: torch.Tensor, tap_k: torch.Tensor, tap_d: torch.Tensor) -> torch.Tensor:
        """⟨x_j, k⟩ (M, n) fp32 for mgt's update; x is not differentiated here (``_delta_dots_grad``)."""
        return fs.dots_forward(x, k)

    _delta_dots_op = torch.library.custom_op("muse_architecture::mgt_dots", mutates_args=(),
                                             device_types="cuda")(delta_dots)

    @_delta_dots_op.register_fake
    def _(x, k, tap_k, tap_d):  # type: ignore[no-untyped-def]
        return x.new_empty(x.shape[:2], dtype=torch.float32)

    _state_grad_op = torch.library.custom_op("muse_architecture::mhc_state_grad", mutates_args=(),
                                             device_types="cuda")(state_grad)

    @_state_grad_op.register_fake
    def _(x, g, h_res, h_pre, dy, phi, proj, rinv, dproj, k=None, dk=None):  # type: ignore[no-untyped-def]
        return torch.empty_like(x)

    _pre_grad_op = torch.library.custom_op("muse_architecture::mhc_pre_grad", mutates_args=(),
                                           device_types="cuda")(pre_grad)

    @_pre_grad_op.register_fake
    def _(x, g, h_res, dy, phi, proj, rinv, alpha, b_pre, dproj):  # type: ignore[no-untyped-def]
        return torch.empty_like(x), x.new_empty(x.shape[:2], dtype=torch.float32)

    def write_forward(h_res: torch.Tensor, x: torch.Tensor, h_post: torch.Tensor, y: torch.Tensor, tap: torch.Tensor,
                      dtype: torch.dtype) -> torch.Tensor:
        return fs.write_forward(h_res, x, h_post, y, dtype)

    _write_op = torch.library.custom_op("muse_architecture::mhc_write", mutates_args=(), device_types="cuda")(
        write_forward)

    @_write_op.register_fake
    def _(h_res, x, h_post, y, tap, dtype):  # type: ignore[no-untyped-def]
        return torch.empty_like(x, dtype=dtype)

    def write_backward(h_res: torch.Tensor, x: torch.Tensor, h_post: torch.Tensor, y: torch.Tensor,
                       grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        dh_res, _, dh_post, dy = fs.write_backward(h_res, x, h_post, y, grad, write_dx=False)
        return dh_res, dh_post, dy

    _write_backward_op = torch.library.custom_op("muse_architecture::mhc_write_backward", mutates_args=(),
                                                 device_types="cuda")(write_backward)

    @_write_backward_op.register_fake
    def _(h_res, x, h_post, y, grad):  # type: ignore[no-untyped-def]
        return torch.empty_like(h_res), torch.empty_like(h_post), torch.empty_like(y)

    def _write_setup(ctx, inputs, output) -> None:  # type: ignore[no-untyped-def]
        ctx.save_for_backward(*inputs[:4])

    def _write_grad(ctx, grad: torch.Tensor):  # type: ignore[no-untyped-def]
        grad = grad.contiguous()
        dh_res, dh_post, dy = _write_backward_op(*ctx.saved_tensors, grad)
        return dh_res, None, dh_post, dy, grad, None  # the state's gradient goes to pre, as tap's

    def _pre_setup(ctx, inputs, output) -> None:  # type: ignore[no-untyped-def]
        x, phi, alpha, b_pre, b_post, b_res, eps, iters = inputs
        _, _, h_res, _, proj, rinv = output
        ctx.save_for_backward(x, phi, alpha, b_pre, b_post, b_res, h_res, proj, rinv)
        ctx.iters = iters

    def _pre_grad(ctx, dy, dh_post, dh_res, g, _dproj, _drinv):  # type: ignore[no-untyped-def]
        return _pre_backward(ctx, dy, dh_post, dh_res, g)

    def _pre_delta_setup(ctx, inputs, output) -> None:  # type: ignore[no-untyped-def]
        _pre_setup(ctx, inputs, (*output[:4], *output[6:]))

    def _pre_delta_grad(ctx, dy, dh_post, dh_res, g, k, dk, _dproj, _drinv):  # type: ignore[no-untyped-def]
        return _pre_backward(ctx, dy, dh_post, dh_res, g, k, dk)

    def _delta_dots_setup(ctx, inputs, output) -> None:  # type: ignore[no-untyped-def]
        ctx.save_for_backward(inputs[0], inputs[1])
        ctx.tap_dtype = inputs[2].dtype

    def _delta_dots_grad(ctx, grad: torch.Tensor):  # type: ignore[no-untyped-def]
        """∂k = Σ_j ∂d_j x_j; x's term ∂d_j k goes to pre through the taps (k as tap_k's, ∂d as tap_d's), where
        the state's gradient is written once."""
        x, k = ctx.saved_tensors
        grad = grad.contiguous()
        return None, fs._read_op(grad, x).to(k.dtype), k.to(ctx.tap_dtype), grad

    def _pre_backward(ctx, dy, dh_post, dh_res, g, k=None, dk=None):  # type: ignore[no-untyped-def]
        from engines.architecture.residual import _fused_sinkhorn_backward, map_gates

        x, phi, alpha, b_pre, b_post, b_res, h_res, proj, rinv = ctx.saved_tensors
        M, n, C = x.shape
        h_pre, h_post, logits = map_gates(proj, alpha, b_pre, b_post, b_res, n)  # (M, 24): cheap to redo
        dy = dy.contiguous()
        pre, post, res = proj.split((n, n, n * n), dim=-1)
        d_post = dh_post * h_post * (1 - h_post / 2)  # H_post = 2σ(·)
        d_res = _fused_sinkhorn_backward(logits.contiguous(), dh_res.contiguous(), ctx.iters).view(M, n * n)
        # the two-kernel form finds H_pre's part from ⟨x_j, ∂y_in⟩ (the first n columns are its); mgt's dots take
        # the four-kernel one
        if TWO_PASS_BACKWARD and k is None:
            rest = torch.cat((torch.zeros_like(d_post), alpha[1] * d_post, alpha[2] * d_res), dim=-1)
            dx, d_pre = _pre_grad_op(x, g, h_res, dy, phi, proj, rinv, alpha, b_pre, rest)
            dproj = torch.cat((alpha[0] * d_pre, rest[:, n:]), dim=-1)
        else:
            d_pre = fs._dots_op(x, dy) * h_pre * (1 - h_pre)  # through H_pre = σ(·)
            dproj = torch.cat((alpha[0] * d_pre, alpha[1] * d_post, alpha[2] * d_res), dim=-1).contiguous()
            dx = _state_grad_op(x, g, h_res, h_pre, dy, phi, proj, rinv, dproj, k, dk)
        d_phi = fs.phi_grad(x.view(M, n * C), phi, rinv, dproj)
        d_alpha = torch.stack(((d_pre * pre).sum(), (d_post * post).sum(), (d_res * res).sum()))
        return (dx, d_phi, d_alpha, d_pre.sum(0), d_post.sum(0), d_res.sum(0).view(n, n), None, None)

    _write_op.register_autograd(_write_grad, setup_context=_write_setup)
    _pre_op.register_autograd(_pre_grad, setup_context=_pre_setup)
    _pre_delta_op.register_autograd(_pre_delta_grad, setup_context=_pre_delta_setup)
    _delta_dots_op.register_autograd(_delta_dots_grad, setup_context=_delta_dots_setup)
