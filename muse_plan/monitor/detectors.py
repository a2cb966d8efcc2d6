"""Detectors on the metric stream: pure objects fed one step at a time.

Each detector sees every optimizer step's record (loss, gradient norm before
clipping, tokens/s, memory) and returns findings: a ``fault`` stops the stage
for the recovery layer, an ``alert`` is recorded and shown. They keep small
windows of recent values and do no I/O, so they run on every process of a
distributed run alike (a fault must stop every process at the same step)
and cost microseconds a step; they read numbers the loop has already
brought to the host (on a GPU one step late, see ``executor/loop.py``), so
they add no device sync.

Defaults and thresholds (``--alert-thresholds`` overrides; ``alerts.py``):
- non-finite loss or gradient norm: always a fault;
- gradient explosion: gradient norm above ``gradient_norm`` when given, else
  above 10× the running median of the last 50 steps (after 20 steps) and above
  the stage's clipping norm: a fault. A norm the run's own clipping would not
  even cut is no explosion: in RL with sparse rewards most steps carry only
  the KL term's ~1e-7 gradient, and the first group that scores differently
  is a thousand times that — real signal, which a relative rule alone took
  for a fault (and recovery, restarting at the same step, met it again);
- loss spike: z-score of the loss against the last 50 steps above
  ``loss_spike`` (default 4): an alert (as the plateau, not in a
  policy-gradient stage, whose loss is a surrogate: ``StageKind.loss_alerts``);
- plateau: less than 1% relative improvement of the mean loss over
  ``plateau`` steps (default 200): an alert;
- throughput drop: tokens/s below (1 − ``throughput_drop``/100) of the
  window's median, only when a threshold is given (on a shared machine
  tokens/s swings without anything being wrong): an alert;
- memory usage: memory above ``memory_usage`` percent of the device: an alert;
- no signal: in an RL stage, at least ``no_signal`` percent (default 95) of
  the groups of the last 50 steps scored all alike (the engine's
  ``equal_groups``): their advantages are zero, so the updates learn next to
  nothing — an alert, once a window. Seen on an H100: a base solving 2% of
  its problems left GRPO 97% all-equal groups and 200 updates taught nothing.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from dataclasses import dataclass
from typing import Any, Protocol


@dataclass(frozen=True)
class Finding:
    kind: str  # nan | grad_explosion | loss_spike | plateau | throughput_drop | memory_usage
    severity: str  # fault | alert
    step: int
    value: float
    threshold: float | None
    message: str

    def data(self) -> dict[str, Any]:
        return {"kind": self.kind, "step": self.step, "value": self.value, "threshold": self.threshold}


class Detector(Protocol):
    def observe(self, r: Any) -> Finding | None: ...


class NonFinite:
    def observe(self, r: Any) -> Finding | None:
        for name, value in (("loss", r.loss), ("gradient norm", r.grad_norm)):
            if not math.isfinite(value):
                return Finding("nan", "fault", r.step, value, None, f"{name} is {value} at step {r.step}")
        return None


class GradExplosion:
    """``floor``: the relative rule fires only above it (the clipping norm; None: no floor)."""

    def __init__(self, threshold: float | None = None, factor: float = 10.0, window: int = 50,
                 warmup: int = 20, floor: float | None = None) -> None:
        self.threshold, self.factor, self.warmup, self.floor = threshold, factor, warmup, floor
        self.recent: deque[float] = deque(maxlen=window)

    def observe(self, r: Any) -> Finding | None:
        value = r.grad_norm
        limit = self.threshold
        relative = limit is None and len(self.recent) >= self.warmup
        if relative:
            limit = self.factor * statistics.median(self.recent)
        # a zero norm (an RL step whose groups all scored alike) says nothing
        # about the gradient's scale; counting it would drag the median to 0
        if value > 0:
            self.recent.append(value)
        if relative and self.floor and value <= self.floor:
            return None
        if limit is not None and value > limit:
            why = "threshold" if self.threshold is not None else f"{self.factor:g}× the running median"
            return Finding("grad_explosion", "fault", r.step, value, limit,
                           f"gradient norm {value:.3g} at step {r.step} is above {limit:.3g} ({why})")
        return None


class LossSpike:
    def __init__(self, z: float = 4.0, window: int = 50, warmup: int = 20) -> None:
        self.z, self.warmup = z, warmup
        self.recent: deque[float] = deque(maxlen=window)

    def observe(self, r: Any) -> Finding | None:
        found = None
        if len(self.recent) >= self.warmup:
            mean, sd = statistics.fmean(self.recent), statistics.pstdev(self.recent)
            if sd > 0 and (r.loss - mean) / sd > self.z:
                found = Finding("loss_spike", "alert", r.step, r.loss, self.z,
                                f"loss {r.loss:.4g} at step {r.step} is {(r.loss - mean) / sd:.1f} standard "
                                f"deviations above the last {len(self.recent)} steps' mean {mean:.4g}")
        self.recent.append(r.loss)
        return found


class Plateau:
    def __init__(self, window: int = 200, min_improvement: float = 0.01) -> None:
        self.window, self.min_improvement = window, min_improvement
        self.recent: deque[float] = deque(maxlen=2 * window)
        self.quiet_until = 0

    def observe(self, r: Any) -> Finding | None:
        self.recent.append(r.loss)
        if len(self.recent) < 2 * self.window or r.step < self.quiet_until:
            return None
        values = list(self.recent)
        before, after = statistics.fmean(values[: self.window]), statistics.fmean(values[self.window:])
        gain = (before - after) / abs(before) if before else 0.0
        if gain < self.min_improvement:
            self.quiet_until = r.step + self.window  # say it once a window
            return Finding("plateau", "alert", r.step, gain, self.min_improvement,
                           f"loss improved {gain:.2%} over the last {self.window} steps (below "
                           f"{self.min_improvement:.0%}): a plateau")
        return None


class ThroughputDrop:
    def __init__(self, percent: float = 50.0, window: int = 20) -> None:
        self.fraction = 1 - percent / 100
        self.recent: deque[float] = deque(maxlen=window)

    def observe(self, r: Any) -> Finding | None:
        found = None
        if len(self.recent) == self.recent.maxlen:
            median = statistics.median(self.recent)
            if r.tokens_per_s < self.fraction * median:
                found = Finding("throughput_drop", "alert", r.step, r.tokens_per_s, self.fraction * median,
                                f"{r.tokens_per_s:,.0f} tokens/s at step {r.step}, under "
                                f"{self.fraction:.0%} of the recent median {median:,.0f}")
        self.recent.append(r.tokens_per_s)
        return found


class MemoryUsage:
    def __init__(self, percent: float, capacity_gib: float) -> None:
        self.percent, self.capacity = percent, capacity_gib
        self.said = False

    def observe(self, r: Any) -> Finding | None:
        used = 100 * r.memory_gib / self.capacity if self.capacity else 0.0
        if used > self.percent and not self.said:
            self.said = True
            return Finding("memory_usage", "alert", r.step, used, self.percent,
                           f"memory at {used:.0f}% of {self.capacity:.1f} GiB at step {r.step} "
                           f"(threshold {self.percent:g}%)")
        return None


class NoSignal:
    def __init__(self, percent: float = 95.0, window: int = 50) -> None:
        self.share = percent / 100
        self.recent: deque[float] = deque(maxlen=window)
        self.quiet_until = 0

    def observe(self, r: Any) -> Finding | None:
        value = getattr(r, "extra", {}).get("equal_groups")
        if value is None:  # not an RL stage
            return None
        self.recent.append(value)
        if len(self.recent) < (self.recent.maxlen or 0) or r.step < self.quiet_until:
            return None
        mean = statistics.fmean(self.recent)
        if mean < self.share:
            return None
        self.quiet_until = r.step + len(self.recent)  # say it once a window
        return Finding("no_signal", "alert", r.step, 100 * mean, 100 * self.share,
                       f"{mean:.0%} of the groups of the last {len(self.recent)} steps scored all alike: no "
                       "advantage, next to nothing to learn (larger groups, a warmer temperature or an easier "
                       "start help; `muse plan adapt` prices larger groups)")


class Watch:
    """All detectors of one stage; ``faults`` run on every process, ``alerts`` on the main one."""

    def __init__(self, thresholds: dict[str, float] | None = None, capacity_gib: float | None = None,
                 explosion_factor: float = 10.0, clip_grad_norm: float | None = None,
                 loss_alerts: bool = True) -> None:
        """``loss_alerts``: False for a policy-gradient stage, whose loss is a surrogate (``StageKind``)."""
        t = thresholds or {}
        self.faults: list[Detector] = [NonFinite(), GradExplosion(t.get("gradient_norm"), explosion_factor,
                                                                  floor=clip_grad_norm)]
        self.alerts: list[Detector] = [LossSpike(t.get("loss_spike", 4.0)), Plateau(int(t.get("plateau", 200)))] \
            if loss_alerts else []
        self.alerts.append(NoSignal(t.get("no_signal", 95.0)))
        if "throughput_drop" in t:  # opt-in: on a shared machine tokens/s swings without a fault
            self.alerts.append(ThroughputDrop(t["throughput_drop"]))
        if "memory_usage" in t and capacity_gib:
            self.alerts.append(MemoryUsage(t["memory_usage"], capacity_gib))

    def fault(self, r: Any) -> Finding | None:
        for detector in self.faults:
            found = detector.observe(r)
            if found:
                return found
        return None

    def alert(self, r: Any) -> list[Finding]:
        return [f for f in (d.observe(r) for d in self.alerts) if f]
