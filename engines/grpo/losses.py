"""GRPO's pure core: group advantages, the clipped surrogate, the k3 KL, S-GRPO's token mask.

Equations (DeepSeekMath, Shao et al. 2024, eq. 3 and 4; DeepSeek-R1 §2.2.1):

    Â_i = (r_i − mean(r)) / std(r)            for the G completions of one prompt
    ρ_t = π_θ(o_t | q, o_<t) / π_old(o_t | q, o_<t)
    J_t = min(ρ_t Â_i, clip(ρ_t, 1 − ε_low, 1 + ε_high) Â_i) − β D_KL,t
    D_KL,t = π_ref/π_θ − log(π_ref/π_θ) − 1   (Schulman's k3 estimator, ≥ 0)

and the loss is −J averaged over tokens.

Advantages (``scale_rewards``, TRL's names and convention): ``group`` divides
the centred rewards by the standard deviation of the prompt's group,
``batch`` by that of every reward of the micro-batch's groups, ``none``
only centres (Dr. GRPO, Liu et al. 2025, which argues the std rescales easy
and hard prompts unequally). The std is the sample standard deviation
(Bessel's N−1, ``torch.std``'s default, as TRL computes it) plus ε = 1e-4;
a group whose rewards are all equal has zero advantage (0/ε, never NaN), and
a group of one completion has no spread: its std counts as 0. (TRL's
``batch`` is the whole generation batch over every process; here it is the
micro-batch's groups on this process, the same when one process draws one
micro-batch a step.)

Normalisation of the per-token loss (``NORMALIZATIONS``), over the groups of
one micro-batch:
- ``token_batch``: every token of the micro-batch weighs the same, the sum
  over all tokens of all completions divided by their count (TRL's
  ``bnpo``; its ``dapo`` divides by the count over every process);
- ``token_prompt``: each prompt's tokens averaged, then the prompts
  averaged (DAPO's equation 8: 1/Σ|o_i| over one prompt's group);
- ``sequence``: each completion's tokens averaged, then the completions
  (GRPO's 1/|o_i|; TRL's ``grpo``);
- ``constant``: the sum divided by completions × max_new_tokens (Dr. GRPO;
  TRL's ``dr_grpo``).
``token`` (this engine's earlier name) reads as ``token_batch``, what its
documentation promised.

S-GRPO (Lee & Tong 2025, §3.1) keeps GRPO's loss but lets only some tokens
of each completion in: every token before the cutoff index α, and each later
token with probability P while fewer than k tokens have been taken (the
first α count toward k). With one update per rollout (their setting) ρ = 1
in value, so clipping never binds; the gradient is still ∇π/π_old.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch


def group_advantages(rewards: torch.Tensor, scale: str = "group", eps: float = 1e-4) -> torch.Tensor:
    """rewards (P, G) → advantages (P, G): centred within each prompt's group, divided by
    the group's (``group``) or the whole micro-batch's (``batch``) sample std, or not (``none``)."""
    centred = rewards - rewards.mean(dim=-1, keepdim=True)
    if scale == "none":
        return centred
    if scale == "group":
        std = rewards.std(dim=-1, keepdim=True) if rewards.size(-1) > 1 else torch.zeros_like(rewards[..., :1])
    elif scale == "batch":
        std = rewards.std() if rewards.numel() > 1 else torch.zeros(())
    else:
        raise ValueError(f"scale_rewards {scale!r}; accepted: {', '.join(SCALES)}")
    return centred / (std + eps)


SCALES = ("group", "batch", "none")


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


@dataclass
class Terms:
    """One group's masked objective, kept apart so the micro-batch's groups can be
    normalised together (``normalized_loss``)."""

    token_sum: torch.Tensor  # Σ_i Σ_t J_i,t over the mask
    tokens: torch.Tensor  # Σ mask
    sequence_sum: torch.Tensor  # Σ_i (Σ_t J_i,t / |o_i|)
    completions: int


def _token_batch(terms: list[Terms], max_new_tokens: int) -> torch.Tensor:
    return sum(t.token_sum for t in terms) / sum(t.tokens for t in terms).clamp(min=1)


def _token_prompt(terms: list[Terms], max_new_tokens: int) -> torch.Tensor:
    return sum(t.token_sum / t.tokens.clamp(min=1) for t in terms) / len(terms)


def _sequence(terms: list[Terms], max_new_tokens: int) -> torch.Tensor:
    return sum(t.sequence_sum for t in terms) / sum(t.completions for t in terms)


def _constant(terms: list[Terms], max_new_tokens: int) -> torch.Tensor:
    return sum(t.token_sum for t in terms) / (sum(t.completions for t in terms) * max_new_tokens)


NORMALIZATIONS: dict[str, Callable[[list[Terms], int], torch.Tensor]] = {
    "token_batch": _token_batch,
    "token_prompt": _token_prompt,
    "sequence": _sequence,
    "constant": _constant,
}


def grpo_terms(logp: torch.Tensor, old_logp: torch.Tensor, ref_logp: torch.Tensor | None,
               advantages: torch.Tensor, mask: torch.Tensor, *, clip_eps: float,
               clip_eps_high: float | None = None, kl_beta: float = 0.0) -> tuple[Terms, dict[str, float]]:
    """J over the tokens in ``mask`` for one group. Shapes: log-probs and mask (B, T), advantages (B,)."""
    objective = clipped_surrogate(logp, old_logp, advantages[:, None], clip_eps, clip_eps_high)
    stats: dict[str, float] = {}
    m = mask.to(objective.dtype)
    if kl_beta > 0 and ref_logp is not None:
        kl = k3_kl(logp, ref_logp)
        objective = objective - kl_beta * kl
        stats["kl"] = float((kl.detach() * m).sum() / m.sum().clamp(min=1))
    per_token = objective * m
    terms = Terms(per_token.sum(), m.sum(), (per_token.sum(-1) / m.sum(-1).clamp(min=1)).sum(), int(mask.size(0)))
    return terms, stats


def normalized_loss(terms: list[Terms], normalization: str, max_new_tokens: int) -> torch.Tensor:
    """−J of a micro-batch's groups under ``normalization`` (``NORMALIZATIONS``)."""
    return -NORMALIZATIONS[normalization](terms, max_new_tokens)


def grpo_loss(logp: torch.Tensor, old_logp: torch.Tensor, ref_logp: torch.Tensor | None,
              advantages: torch.Tensor, mask: torch.Tensor, *, clip_eps: float,
              clip_eps_high: float | None = None, kl_beta: float = 0.0, normalization: str = "token_batch",
              max_new_tokens: int = 1) -> tuple[torch.Tensor, dict[str, float]]:
    """−J of one group's completions (``grpo_terms`` then ``normalized_loss``)."""
    terms, stats = grpo_terms(logp, old_logp, ref_logp, advantages, mask, clip_eps=clip_eps,
                              clip_eps_high=clip_eps_high, kl_beta=kl_beta)
    return normalized_loss([terms], normalization, max_new_tokens), stats


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
