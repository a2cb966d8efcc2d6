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
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from engines.architecture.config import MULTI_STREAM, RESIDUAL_NAMES, ModelConfig

Sublayer = Callable[[torch.Tensor], torch.Tensor]


# ---- pure functions ---------------------------------------------------------

def sinkhorn(logits: torch.Tensor, iters: int = 20) -> torch.Tensor:
    """Sinkhorn-Knopp on exp(logits) over the last two dims → doubly stochastic.

    Alternating row and column normalisation, done in log space so that large
    logits neither overflow exp nor lose the small entries.
    """
    log_p = logits.float()
    for _ in range(iters):
        log_p = log_p - torch.logsumexp(log_p, dim=-1, keepdim=True)  # rows sum to 1
        log_p = log_p - torch.logsumexp(log_p, dim=-2, keepdim=True)  # columns sum to 1
    return log_p.exp().to(logits.dtype)


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


def expand_streams(x: torch.Tensor, n: int) -> torch.Tensor:
    """(B, T, C) → (B, T, n, C): every stream starts as a copy of the embedding."""
    return x.unsqueeze(2).expand(-1, -1, n, -1).contiguous()


def reduce_streams(x: torch.Tensor) -> torch.Tensor:
    """(B, T, n, C) → (B, T, C) by summing the streams, as Zhu et al. do."""
    return x.sum(dim=2)


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
        xn = rms(x, self.eps)  # (B, T, n, C)
        a_m = self.a_m + self.s_a * torch.tanh(xn @ self.w_m)  # (B, T, n)
        a_r = self.a_r + self.s_a * torch.tanh(xn @ self.w_r)  # (B, T, n, n), row j from stream j
        b = self.b + self.s_b * torch.tanh(xn @ self.w_b)  # (B, T, n)
        y = f(torch.einsum("btn,btnc->btc", a_m, x))  # (B, T, C)
        mixed = torch.einsum("btji,btjc->btic", a_r, x)  # A_rᵀ H
        return mixed + b.unsqueeze(-1) * y.unsqueeze(2)


class ManifoldMaps(nn.Module):
    """mHC's H_pre, H_post (non-negative) and H_res (doubly stochastic) from the n streams."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        n, d = config.streams, config.d_model
        self.n, self.iters, self.eps = n, config.sinkhorn_iters, config.norm_eps
        self.phi_pre = nn.Parameter(torch.randn(n * d, n) * 0.02)
        self.phi_post = nn.Parameter(torch.randn(n * d, n) * 0.02)
        self.phi_res = nn.Parameter(torch.randn(n * d, n * n) * 0.02)
        self.b_pre = nn.Parameter(torch.full((n,), -math.log(n - 1) if n > 1 else 4.0))
        self.b_post = nn.Parameter(torch.zeros(n))
        self.b_res = nn.Parameter(4.0 * torch.eye(n))
        self.alpha = nn.Parameter(torch.full((3,), 0.01))  # pre, post, res

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        B, T, n, C = x.shape
        flat = rms(x.reshape(B, T, n * C), self.eps)  # (B, T, nC)
        h_pre = torch.sigmoid(self.alpha[0] * (flat @ self.phi_pre) + self.b_pre)  # (B, T, n)
        h_post = 2 * torch.sigmoid(self.alpha[1] * (flat @ self.phi_post) + self.b_post)  # (B, T, n)
        res_logits = self.alpha[2] * (flat @ self.phi_res).view(B, T, n, n) + self.b_res
        return h_pre, h_post, sinkhorn(res_logits, self.iters)  # H_res: (B, T, n, n)


class ManifoldHyperConnection(nn.Module):
    """mHC: x_{l+1} = H_res x_l + H_postᵀ F(H_pre x_l)."""

    def __init__(self, config: ModelConfig, sublayer_index: int) -> None:
        super().__init__()
        self.maps = ManifoldMaps(config)

    def forward(self, x: torch.Tensor, f: Sublayer) -> torch.Tensor:
        h_pre, h_post, h_res = self.maps(x)
        y = f(torch.einsum("btn,btnc->btc", h_pre, x))  # (B, T, C)
        mixed = torch.einsum("btij,btjc->btic", h_res, x)  # (B, T, n, C)
        return mixed + h_post.unsqueeze(-1) * y.unsqueeze(2)


class DeltaGate(nn.Module):
    """DDL's direction k, gate β ∈ [0, β_max] and value v from the input h and output u."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        d = config.d_model
        self.beta_max, self.eps = config.beta_max, config.norm_eps
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
        k, beta, v = self.gate(x, f(x))
        return delta_update(x, k, beta, v)


class ManifoldDeltaConnection(nn.Module):
    """mgt: X_{l+1} = (H_res X_l)(I − β k kᵀ) + β (H_post v) kᵀ."""

    def __init__(self, config: ModelConfig, sublayer_index: int) -> None:
        super().__init__()
        self.maps = ManifoldMaps(config)
        self.gate = DeltaGate(config)

    def forward(self, x: torch.Tensor, f: Sublayer) -> torch.Tensor:
        h_pre, h_post, h_res = self.maps(x)
        h = torch.einsum("btn,btnc->btc", h_pre, x)  # (B, T, C)
        k, beta, v = self.gate(h, f(h))  # (B, T, C), (B, T, 1), (B, T, 1)
        mixed = torch.einsum("btij,btjc->btic", h_res, x)  # (B, T, n, C)
        target = h_post.unsqueeze(-1) * v.unsqueeze(2)  # (B, T, n, 1): each stream's write
        return delta_update(mixed, k.unsqueeze(2), beta.unsqueeze(2), target)


# ---- registry -----------------------------------------------------------------

@dataclass(frozen=True)
class Residual:
    make: Callable[[ModelConfig, int], nn.Module]  # (config, sublayer index) → connection
    multi_stream: bool


def _standard(config: ModelConfig, sublayer_index: int) -> nn.Module:
    return StandardResidual()


RESIDUALS: dict[str, Residual] = {
    "standard": Residual(_standard, multi_stream=False),
    "hc": Residual(HyperConnection, multi_stream=True),
    "mhc": Residual(ManifoldHyperConnection, multi_stream=True),
    "ddl": Residual(DeltaResidual, multi_stream=False),
    "mgt": Residual(ManifoldDeltaConnection, multi_stream=True),
}

assert set(RESIDUALS) == set(RESIDUAL_NAMES), "config and residual registries must agree"
assert {name for name, r in RESIDUALS.items() if r.multi_stream} == MULTI_STREAM
