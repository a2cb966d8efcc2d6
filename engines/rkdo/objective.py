"""The RKDO and I-Con objectives as pure functions on tensors.

Both objectives are a mean of KL divergences between a supervisory
neighbourhood distribution p(·|i) and a learned one q(·|i) (I-Con,
Alshammari et al., ICLR 2025, its one equation):

    L = (1/n) Σᵢ KL(p(·|i) ‖ q(·|i)),   q(j|i) = exp(zᵢ·zⱼ/τ) / Σ_{k≠i} exp(zᵢ·z_k/τ)

I-Con's SimCLR slice takes p(·|i) uniform over i's augmented positives; its
debiasing mixes in a uniform distribution over the neighbourhood:
p̃(j|i) = (1−a)·p(j|i) + a/|N(i)|. RKDO (Martin, arXiv 2504.21707)
makes the supervisory distribution recursive,

    p⁽ᵗ⁾(·|i) = (1−α)·p⁽ᵗ⁻¹⁾(·|i) + α·q⁽ᵗ⁻¹⁾(·|i)            (the recursion, R)
    τ⁽ᵗ⁾ = τ⁰·(1 − β·t/T)                                     (the schedule, S)

and with α = 0 it is I-Con again.

Design decisions:
- The recursion is kept unrolled: p⁽ᵗ⁾ = (1−α)ᵗ p⁽⁰⁾ + Σ_{k=1..t} α(1−α)^{k−1} q⁽ᵗ⁻ᵏ⁾
  (what R gives after t steps). ``depth`` d keeps the d newest levels and
  leaves the remaining weight on p⁽⁰⁾, so the augmentation positives never
  drop out of the target (weight (1−α)^d) and a sample's state is d
  distributions; while t ≤ d it is exactly R (tested).
- The author's code forms the target inside one batch from the model's own
  current q (detached), applying R d times: p = (1−α)^d p⁽⁰⁾ + (1−(1−α)^d) q.
  By convexity of KL in its first argument that loss is at most (1−α)^d times
  the static one before any learning happens, so "lower loss" is partly by
  construction. With the target detached (as here) its gradient with respect
  to the logits is q − p = (1−α)^d (q − p⁽⁰⁾): I-Con's gradient scaled down,
  which Adam's per-parameter normalisation undoes, so it trains like I-Con
  (tested). It is offered (``in_batch``) and is the same unrolled formula
  with the current q in every level.
- Every target is detached: p is supervision, gradients flow through q only.
- Neighbourhood columns a row can't use (the sample itself among the
  anchors) are masked: q gives them no mass and neither does p.
- α may be annealed over training (the paper's guidance: larger α converges
  faster but over-specialises); schedules are a registry of functions of
  training progress.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F


def temperature(tau0: float, beta: float, t: int, total: int) -> float:
    """τ⁽ᵗ⁾ = τ⁰(1 − β t/T) (S); t counts from 0, t/T is capped at 1."""
    progress = min(1.0, t / total) if total > 0 else 0.0
    return tau0 * (1.0 - beta * progress)


def ema_update(p: torch.Tensor, q: torch.Tensor, alpha: float) -> torch.Tensor:
    """One step of the recursion R: p⁽ᵗ⁾ = (1−α) p⁽ᵗ⁻¹⁾ + α q⁽ᵗ⁻¹⁾."""
    return (1.0 - alpha) * p + alpha * q


def unrolled_target(p0: torch.Tensor, history: torch.Tensor, levels: torch.Tensor,
                    alpha: float) -> torch.Tensor:
    """p⁽ᵗ⁾ from p⁽⁰⁾ and the newest q's, R unrolled ``levels`` times per row.

    p0: (R, C); history: (R, d, C), newest first; levels: (R,) how many of a
    row's d slots hold a q (0 gives p⁽⁰⁾ back).
    """
    d = history.shape[1]
    k = torch.arange(d, device=history.device)
    weights = alpha * (1.0 - alpha) ** k.to(history.dtype)  # α(1−α)^{k−1}, k = 1..d
    weights = weights * (k[None, :] < levels[:, None])  # (R, d): slots not yet filled weigh 0
    rest = (1.0 - alpha) ** levels.to(history.dtype)  # (R,)
    return rest[:, None] * p0 + torch.einsum("rd,rdc->rc", weights, history)


def positive_target(mask: torch.Tensor, debias: float) -> torch.Tensor:
    """I-Con's debiased positive-pair distribution over [positive, anchors...].

    mask: (R, C) True where a column is a usable neighbour; column 0 is the
    other augmented view. p⁽⁰⁾ = (1−a)·e₀ + a·uniform over the usable columns.
    """
    uniform = mask.float() / mask.sum(dim=1, keepdim=True)
    p0 = debias * uniform
    p0[:, 0] += 1.0 - debias
    return p0


def log_q(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """log q(·|i): a softmax over the usable columns (masked ones get -inf)."""
    return F.log_softmax(logits.masked_fill(~mask, float("-inf")), dim=1)


def neighbour_kl(p: torch.Tensor, logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(1/n) Σᵢ KL(p(·|i) ‖ q(·|i)) with q = softmax of ``logits`` over ``mask``;
    0·log 0 = 0, so p may be zero wherever q is."""
    lq = log_q(logits, mask)
    p = p.detach()
    plogp = torch.where(p > 0, p * torch.log(p.clamp_min(1e-30)), torch.zeros_like(p))
    cross = torch.where(p > 0, p * lq.masked_fill(~mask, 0.0), torch.zeros_like(p))
    return (plogp - cross).sum(dim=1).mean()


# progress in [0, 1] -> share of the way from alpha_final to alpha
ALPHA_SCHEDULES: dict[str, Callable[[float], float]] = {
    "constant": lambda progress: 1.0,
    "linear": lambda progress: 1.0 - progress,
    "cosine": lambda progress: 0.5 * (1.0 + math.cos(math.pi * progress)),
}


def scheduled_alpha(alpha: float, alpha_final: float, schedule: str, progress: float) -> float:
    """α annealed from ``alpha`` to ``alpha_final`` over training (``adaptive`` is
    the trainer's: it scales α by how much of the loss's decrease is left)."""
    share = ALPHA_SCHEDULES[schedule](min(1.0, max(0.0, progress)))
    return alpha_final + (alpha - alpha_final) * share
