"""GRPO's pure core: group advantages, the clipped surrogate, the k3 KL, S-GRPO's token mask.

Equations (DeepSeekMath, Shao et al. 2024, eq. 3 and 4; DeepSeek-R1 §2.2.1):

    Â_i = (r_i − mean(r)) / std(r)            for the G completions of one prompt
    ρ_t = π_θ(o_t | q, o_<t) / π_old(o_t | q, o_<t)
    J_t = min(ρ_t Â_i, clip(ρ_t, 1 − ε_low, 1 + ε_high) Â_i) − β D_KL,t
    D_KL,t = π_ref/π_θ − log(π_ref/π_θ) − 1   (Schulman's k3 estimator, ≥ 0)

and the loss is −J averaged over tokens. ``scale_by_std=False`` keeps only
the centring (Dr. GRPO, Liu et al. 2025, which argues the std rescales
easy and hard prompts unequally). ``std`` is the population standard
deviation of the group; a group whose rewards are all equal has zero
advantage (the ε in the denominator keeps it 0/ε, never NaN).

Normalisation of the per-token loss (``LOSS_NORMS``): ``sequence`` (GRPO's
1/|o_i| then the group mean), ``token`` (every token of the batch weighs the
same; DAPO), ``constant`` (divide by completions × max_new_tokens; Dr. GRPO).

S-GRPO (Lee & Tong 2025, §3.1) keeps GRPO's loss but lets only some tokens
of each completion in: every token before the cutoff index α, and each later
token with probability P while fewer than k tokens have been taken (the
first α count toward k). With one update per rollout (their setting) ρ = 1
in value, so clipping never binds; the gradient is still ∇π/π_old.
"""

from __future__ import annotations

from typing import Callable

import torch


def group_advantages(rewards: torch.Tensor, scale_by_std: bool = True, eps: float = 1e-4) -> torch.Tensor:
    """rewards (P, G) → advantages (P, G), normalised within each prompt's group."""
    centred = rewards - rewards.mean(dim=-1, keepdim=True)
    if not scale_by_std:
        return centred
    return centred / (rewards.std(dim=-1, keepdim=True, unbiased=False) + eps)


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimate of KL(π_θ ‖ π_ref): exp(Δ) − Δ − 1 with Δ = log π_ref − log π_θ."""
    delta = ref_logp - logp
    return torch.exp(delta) - delta - 1


def clipped_surrogate(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor,
                      eps_low: float, eps_high: float | None = None) -> torch.Tensor:
    """Per-token PPO objective min(ρÂ, clip(ρ)Â); advantages broadcast over tokens."""
    ratio = torch.exp(logp - old_logp)
    high = eps_low if eps_high is None else eps_high
    return torch.minimum(ratio * advantages, ratio.clamp(1 - eps_low, 1 + high) * advantages)


def _per_sequence(per_token: torch.Tensor, mask: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
    return ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1)).mean()


def _per_token(per_token: torch.Tensor, mask: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
    return (per_token * mask).sum() / mask.sum().clamp(min=1)


def _constant(per_token: torch.Tensor, mask: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
    return (per_token * mask).sum() / (mask.size(0) * max_new_tokens)


LOSS_NORMS: dict[str, Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]] = {
    "sequence": _per_sequence,
    "token": _per_token,
    "constant": _constant,
}


def grpo_loss(logp: torch.Tensor, old_logp: torch.Tensor, ref_logp: torch.Tensor | None,
              advantages: torch.Tensor, mask: torch.Tensor, *, clip_eps: float,
              clip_eps_high: float | None = None, kl_beta: float = 0.0, normalization: str = "token",
              max_new_tokens: int = 1) -> tuple[torch.Tensor, dict[str, float]]:
    """−J over the tokens in ``mask``. Shapes: log-probs and mask (B, T), advantages (B,)."""
    objective = clipped_surrogate(logp, old_logp, advantages[:, None], clip_eps, clip_eps_high)
    stats: dict[str, float] = {}
    if kl_beta > 0 and ref_logp is not None:
        kl = k3_kl(logp, ref_logp)
        objective = objective - kl_beta * kl
        stats["kl"] = float(_per_token(kl.detach(), mask, max_new_tokens))
    loss = -LOSS_NORMS[normalization](objective, mask.to(objective.dtype), max_new_tokens)
    return loss, stats


def s_grpo_mask(lengths: torch.Tensor, width: int, alpha: int, p: float, k: int,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """(B, width) bool: which completion tokens enter S-GRPO's loss.

    Positions t < α (and inside the completion) always; later ones each with
    probability p, in order, while the running count stays ≤ k.
    """
    t = torch.arange(width, device=lengths.device)[None, :]  # (1, T)
    inside = t < lengths[:, None]  # (B, T)
    early = inside & (t < alpha)
    draws = torch.rand(lengths.size(0), width, generator=generator, device=lengths.device) < p
    late = inside & (t >= alpha) & draws
    count = early.sum(-1, keepdim=True) + late.cumsum(-1)  # tokens taken up to and including t
    return early | (late & (count <= k))
