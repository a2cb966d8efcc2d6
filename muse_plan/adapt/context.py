"""What a rule sees (the plan, the run's evidence, the hardware) and what it returns.

Design decisions:
- A rule is a pure function ``Context → Proposal | str``: a proposal, or one
  line saying why it proposes nothing ("peak memory 61% of the device: under
  the 90% mark"), so the output shows what was checked, not only what fired.
- A proposal is a set of field assignments on the plan's data plus the
  evidence (measured numbers, in words and as numbers) and the predicted
  effect, with what predicts it: the optimizer's memory and throughput
  models where they price the change, "no model predicts this" where none
  does (a learning rate's effect on the loss).
- Memory predictions are the memory model's, checked two ways: the model's
  own peak for the new settings must fit the hardware (the same check
  ``muse plan run`` makes before it starts, so an adapted plan is never
  refused or re-fitted there), and the run's measured peak moved by the
  model's predicted difference must fit too. The second uses the model for
  what it is best at, a difference between two settings of one model, and
  the measurement for what the model can't know (the process's own
  overhead: on CPU the measured figure is the resident set of the whole
  process).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Callable

from muse_plan.adapt.evidence import Evidence
from muse_plan.executor.settings import StageSettings
from muse_plan.optimizer import fit as fitting
from muse_plan.plan.io import spec_from_dict, spec_to_dict
from muse_plan.plan.kinds import STAGE_KINDS
from muse_plan.plan.spec import PlanSpec

GIB = 2**30
Path = tuple[str, ...]


@dataclass(frozen=True)
class Proposal:
    rule: str
    title: str  # "smaller learning rate"
    changes: tuple[tuple[Path, Any], ...]  # (("training", "lr"), 0.005), ...
    summary: str  # "lr 0.01→0.005"
    evidence: tuple[str, ...]  # measured numbers, in words
    effect: str  # the predicted effect and what predicts it
    measured: dict[str, float] = field(default_factory=dict)
    predicted: dict[str, float] = field(default_factory=dict)
    memory: bool = False  # changes what a step holds in memory: re-checked when combined

    @property
    def paths(self) -> list[str]:
        """The changed fields as ``plan.diff`` names them (``stages[pretrain].steps``)."""
        return [dotted(path) for path, _ in self.changes]


def dotted(path: Path) -> str:
    """``training.lr``, ``stages[rl].training.lr``."""
    if path[0] == "stages":
        return ".".join((f"stages[{path[1]}]",) + path[2:])
    return ".".join(path)


def assign(data: dict[str, Any], path: Path, value: Any) -> None:
    """Set ``path`` in a plan's data; a ``stages`` step addresses a stage by name."""
    node: Any = data
    for key in path[:-1]:
        node = next(s for s in node if s.get("name") == key) if isinstance(node, list) else node.setdefault(key, {})
    node[path[-1]] = value


def with_changes(spec: PlanSpec, changes: tuple[tuple[Path, Any], ...]) -> PlanSpec:
    data = spec_to_dict(spec)
    for path, value in changes:
        assign(data, path, value)
    return spec_from_dict(data, "adapted plan")


@dataclass(frozen=True)
class Prediction:
    """The optimizer's models on a changed plan, against the current one."""

    fits: bool
    model_peak_gib: float  # the memory model's peak for the new settings
    calibrated_peak_gib: float | None  # the measured peak moved by the model's difference
    limit_gib: float  # usable per device after the optimizer's safety margin
    speedup: float  # predicted step-time ratio, current / new (tokens/s ×)

    def describe(self) -> str:
        peak = (f"peak ≈{self.calibrated_peak_gib:.3g} GiB (measured, moved by the memory model's difference), "
                if self.calibrated_peak_gib is not None else "")
        return (f"{peak}memory model peak {self.model_peak_gib:.3g} GiB of {self.limit_gib:.3g} GiB usable "
                f"({'fits' if self.fits else 'does not fit'}); throughput model: tokens/s ×{self.speedup:.2f}")

    def numbers(self) -> dict[str, float]:
        out = {"model_peak_gib": self.model_peak_gib, "limit_gib": self.limit_gib, "speedup": self.speedup}
        if self.calibrated_peak_gib is not None:
            out["calibrated_peak_gib"] = self.calibrated_peak_gib
        return out


@dataclass
class Context:
    spec: PlanSpec  # the plan's head revision: the one a proposal rewrites
    evidence: Evidence

    @cached_property
    def hardware(self) -> fitting.Hardware:
        """The plan's compute, or this machine when the plan names none (as ``muse plan optimize``)."""
        return fitting.hardware_for(self.spec)

    @cached_property
    def resolved(self) -> dict[str, StageSettings]:
        """Every stage's settings as the executor runs them on the plan's hardware (the one resolver)."""
        return {s.name: s for s in fitting.stage_settings(self.spec, self.hardware)}

    @cached_property
    def priced(self) -> fitting.Candidate:
        return self.price(self.spec)

    def price(self, spec: PlanSpec) -> fitting.Candidate:
        return fitting.price(spec, self.hardware)

    def trained_stages(self, names: list[str] | None = None) -> list[StageSettings]:
        """The named stages' settings (default: every stage that trains), in plan order."""
        return [s for s in self.resolved.values()
                if (names is None and STAGE_KINDS[s.kind].trains) or (names is not None and s.name in names)]

    def changes_for(self, stages: list[StageSettings], field: str,
                    value: Callable[[StageSettings], Any]) -> tuple[tuple[Path, Any], ...]:
        """``field`` set to ``value(stage)`` where each stage reads it: plan-wide when the
        stages are every training stage, share the value and none sets the field itself;
        else in each stage's own ``training`` (every other stage keeps its setting)."""
        values = {s.name: value(s) for s in stages}
        own = {s.name for s in self.spec.stages if s.training is not None and getattr(s.training, field) is not None}
        every = {s.name for s in self.trained_stages()}
        if set(values) == every and len(set(values.values())) == 1 and not own & every:
            return ((("training", field), next(iter(values.values()))),)
        return tuple((("stages", name, "training", field), v) for name, v in values.items())

    @property
    def capacity_gib(self) -> float:
        """One device's memory (the card, or its share of a memory budget; host RAM on CPU)."""
        return self.hardware.memory_gib

    def measured_peaks(self) -> dict[str, float]:
        """Each stage's highest ``memory_gib`` reading."""
        return {s.name: max(s.values("memory_gib")) for s in self.evidence.trained("memory_gib")}

    def predict(self, spec: PlanSpec) -> Prediction:
        """The memory and throughput models on ``spec``, against the head plan and the run's measurements."""
        new, now = self.price(spec), self.priced
        before = {s.name: s for s in now.priced}
        measured = self.measured_peaks()
        calibrated = [measured[s.name] + (s.memory.total - before[s.name].memory.total) / GIB
                      for s in new.priced if s.name in measured and s.name in before]
        limit = self.hardware.limit_bytes / GIB
        peak = max(calibrated) if calibrated else None
        fits = new.fits and (peak is None or peak <= limit)
        speedup = now.seconds / new.seconds if new.seconds > 0 else 1.0
        return Prediction(fits, new.peak / GIB, peak, limit, speedup)

    def measured_mfu(self) -> float | None:
        """Model FLOPs utilisation of the run's median tokens/s (GPU plans only)."""
        hw, stages = self.hardware, self.evidence.trained("tokens_per_s")
        if hw.gpu is None or not stages:
            return None
        from statistics import median

        from muse_plan.optimizer import throughput

        priced = {s.name: s for s in self.priced.priced}
        ratios = []
        for stage in stages:
            fit = priced.get(stage.name)
            if fit is None:
                continue
            flops = throughput.train_flops(fit.config) * median(stage.values("tokens_per_s"))
            ratios.append(flops / (hw.processes * throughput.peak_flops(hw.gpu, fit.config.precision)))
        return max(ratios) if ratios else None
