"""``muse plan adapt``: a finished (or running) run's metrics → a proposed plan revision.

Why a package of its own and not part of ``recovery``: recovery acts inside
a run, on one fault, at once, within a retry budget, with no person
watching; adapt acts between runs, on whole curves, when a person asks, and
shows its evidence before anything is stored. They share the plan store's
revision history (authors ``recovery`` and ``adapt``), not their logic.

- ``evidence``: the run's series and the monitor's findings, read once.
- ``context``: what a rule sees and returns; memory and speed predictions
  by the optimizer's models, calibrated by the run's measured peak.
- ``rules_training`` / ``rules_memory``: the rules; ``rules``: their
  registry (name → check, targets, metrics).
- ``propose``: run the rules, combine, diff, store with ``apply``.
"""

from muse_plan.adapt.propose import Adaptation, adapt

__all__ = ["Adaptation", "adapt"]
