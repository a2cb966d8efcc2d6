"""The RKDO paper's stopping rule: stop when the loss's geometric decrease flattens.

Under its idealised assumptions the paper bounds the loss by a geometric
sequence, L⁽ᵗ⁾ ≤ (1−α)ᵗ L⁽⁰⁾ (Martin, arXiv 2504.21707), and advises to stop
early once that decrease flattens. The observable counterpart is the share
by which the mean loss falls from one window of steps to the next,

    decay_k = 1 − L̄_k / L̄_{k−1},

constant for a geometric sequence and near zero once training has
flattened.

Design decisions:
- Windows, not steps: one micro-step's loss is noisy (augmentations,
  batch-mates); a window (one epoch by default) averages that out.
- Flat means ``decay_k < tol`` for ``patience`` windows in a row; one flat
  window can be noise.
- The same numbers drive the ``adaptive`` α schedule: α is scaled by
  decay_k / max decay seen, so the recursion leans less on the model's own
  past distributions as learning slows (the paper's advice to anneal α).
- Plain floats and a ``state_dict``: the rule resumes with the stage.
"""

from __future__ import annotations

from typing import Any


class GeometricDecay:
    def __init__(self, window: int, tol: float = 0.01, patience: int = 2) -> None:
        if window < 1:
            raise ValueError(f"the stopping rule's window must be at least 1 step, got {window}")
        self.window, self.tol, self.patience = window, tol, patience
        self.means: list[float] = []  # one mean loss per finished window
        self._sum, self._count = 0.0, 0

    def observe(self, loss: float) -> None:
        self._sum += loss
        self._count += 1
        if self._count == self.window:
            self.means.append(self._sum / self._count)
            self._sum, self._count = 0.0, 0

    def decays(self) -> list[float]:
        return [1.0 - b / a for a, b in zip(self.means, self.means[1:]) if a != 0]

    @property
    def decay(self) -> float | None:
        """The newest window's share of decrease; None before two windows."""
        found = self.decays()
        return found[-1] if found else None

    @property
    def flat(self) -> bool:
        found = self.decays()
        return len(found) >= self.patience and all(d < self.tol for d in found[-self.patience:])

    def remaining_share(self) -> float:
        """decay_k / the largest decay seen, in [0, 1]; 1 until there is one."""
        found = self.decays()
        best = max(found, default=0.0)
        if not found or best <= 0:
            return 1.0
        return min(1.0, max(0.0, found[-1] / best))

    def state_dict(self) -> dict[str, Any]:
        return {"means": list(self.means), "sum": self._sum, "count": self._count}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.means = [float(m) for m in state["means"]]
        self._sum, self._count = float(state["sum"]), int(state["count"])
