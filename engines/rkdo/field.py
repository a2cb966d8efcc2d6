"""The supervisory field: where RKDO's p⁽ᵗ⁾(·|i) lives between minibatches.

RKDO's recursion p⁽ᵗ⁾(·|i) = (1−α) p⁽ᵗ⁻¹⁾(·|i) + α q⁽ᵗ⁻¹⁾(·|i) (Martin, arXiv
2504.21707) is per data point i and across iterations; with minibatches a
point is seen once an epoch, among different batch-mates each time.

Design decisions:
- A fixed neighbourhood makes distributions from different iterations
  comparable: every q(·|i) is over the same columns, [i's other augmented
  view, the M anchors] — a fixed random subset of the training samples
  chosen at setup. The anchors are embedded at every step, in a fresh
  augmented view and with gradient, like SimCLR's in-batch negatives. A
  detached memory bank of clean anchors failed here twice: with the positive
  pulled from both sides and the anchors pushed from one, the embedding
  collapsed (pairwise cosine 0.9998 within 60 steps on digits), and clean
  anchors against noisy views can be told apart by the noise alone.
  A sample that is itself an anchor has that column masked.
- Iteration t of sample i is its t-th visit: p⁽ᵗ⁾(·|i) uses the q the model
  gave i at its previous visits (the mean of its two views' q, detached).
  The field keeps the newest ``depth`` of them per sample (the recursion
  unrolled ``depth`` levels, see ``objective.unrolled_target``); the first
  visit's target is p⁽⁰⁾, I-Con's debiased positive pair.
- Targets are a registry (static I-Con, the recursion across iterations,
  the author's in-batch recursion), each a function of one step's
  ``Neighbourhood``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from engines.rkdo.objective import log_q, unrolled_target


class SupervisoryField:
    """The newest ``depth`` q's of every sample over the fixed neighbourhood."""

    def __init__(self, n_samples: int, columns: int, depth: int, device: torch.device | str = "cpu") -> None:
        self.depth = depth
        self.history = torch.zeros(n_samples, depth, columns, device=device)  # newest first
        self.visits = torch.zeros(n_samples, dtype=torch.long, device=device)

    def targets(self, samples: torch.Tensor, p0: torch.Tensor, alpha: float) -> torch.Tensor:
        """p⁽ᵗ⁾ for each row's sample, t its visits so far (p⁽⁰⁾ on a first visit)."""
        levels = self.visits[samples].clamp(max=self.depth)
        return unrolled_target(p0, self.history[samples], levels, alpha)

    def push(self, samples: torch.Tensor, q: torch.Tensor) -> None:
        """Record this visit's q(·|i) (one row per distinct sample)."""
        older = self.history[samples, : self.depth - 1]
        self.history[samples] = torch.cat([q.detach()[:, None].to(self.history.dtype), older], dim=1)
        self.visits[samples] += 1

    def levels(self) -> torch.Tensor:
        return self.visits.clamp(max=self.depth)

    def state_dict(self) -> dict[str, Any]:
        return {"history": self.history.cpu(), "visits": self.visits.cpu()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["history"].shape != self.history.shape:
            raise ValueError(f"supervisory field of shape {tuple(state['history'].shape)} does not fit this "
                             f"stage's {tuple(self.history.shape)} (data, anchors or depth changed)")
        self.history.copy_(state["history"])
        self.visits.copy_(state["visits"])


@dataclass
class Neighbourhood:
    """One step's rows (2B views) over the columns [positive, anchors...]."""

    logits: torch.Tensor  # (R, C) similarities / τ
    mask: torch.Tensor  # (R, C) usable columns
    p0: torch.Tensor  # (R, C) I-Con's debiased positive pair
    samples: torch.Tensor  # (R,) the dataset index of each row
    alpha: float
    depth: int
    field: SupervisoryField | None


def _static(n: Neighbourhood) -> torch.Tensor:
    return n.p0


def _recursive(n: Neighbourhood) -> torch.Tensor:
    assert n.field is not None, "the recursion across iterations needs a supervisory field"
    return n.field.targets(n.samples, n.p0, n.alpha)


def _in_batch(n: Neighbourhood) -> torch.Tensor:
    q = log_q(n.logits, n.mask).exp().detach()  # the model's own current q, in its own target
    rows = q.shape[0]
    levels = torch.full((rows,), n.depth, dtype=torch.long, device=q.device)
    return unrolled_target(n.p0, q[:, None].expand(rows, n.depth, q.shape[1]), levels, n.alpha)


TARGETS: dict[str, Callable[[Neighbourhood], torch.Tensor]] = {
    "static": _static,  # I-Con: p fixed
    "recursive": _recursive,  # RKDO as the paper states it: across iterations
    "in_batch": _in_batch,  # RKDO as the author's code runs it
}
