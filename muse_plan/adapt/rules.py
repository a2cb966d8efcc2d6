"""The adapt rules' registry: name → check, the targets it serves, the metrics it reads.

The order is the priority when two proposals set the same field (a spiky
run's smaller learning rate comes before a plateau's), and when the
memory proposals together would not fit (making room before using it).
``--optimization-targets`` picks the rules that serve a target;
``--performance-metrics`` must include every metric a picked rule reads, or
the rule is reported as skipped.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from muse_plan.adapt import rules_memory as memory
from muse_plan.adapt import rules_training as training
from muse_plan.adapt.context import Context, Proposal

TARGETS: dict[str, str] = {
    "convergence_speed": "reach a lower loss in fewer steps or less time",
    "memory_efficiency": "use the memory the run has, without running out",
    "stability": "no loss spikes, exploding gradients or out-of-memory",
    "compute_efficiency": "more tokens per second from the same hardware",
}


@dataclass(frozen=True)
class Rule:
    check: Callable[[Context], Proposal | str]
    targets: tuple[str, ...]
    metrics: tuple[str, ...]  # performance metrics (evidence.METRICS) it reads; memory is always read


RULES: dict[str, Rule] = {
    "loss_spikes": Rule(training.loss_spikes, ("stability", "convergence_speed"), ("loss",)),  # norms if read
    "clipped_always": Rule(training.clipped_always, ("stability", "convergence_speed"), ("grad_norm",)),
    "memory_pressure": Rule(memory.memory_pressure, ("memory_efficiency", "stability"), ()),
    "less_recompute": Rule(memory.less_recompute, ("compute_efficiency", "memory_efficiency",
                                                    "convergence_speed"), ("throughput",)),
    "larger_micro_batch": Rule(memory.larger_micro_batch, ("memory_efficiency", "compute_efficiency",
                                                            "convergence_speed"), ("throughput",)),
    "plateau": Rule(training.plateau, ("convergence_speed",), ("loss",)),
    "no_signal": Rule(training.no_signal, ("convergence_speed",), ("reward", "accuracy")),
    "still_policy": Rule(training.still_policy, ("convergence_speed",), ("reward",)),
    "decay_only": Rule(training.decay_only, ("convergence_speed",), ("loss",)),
}
