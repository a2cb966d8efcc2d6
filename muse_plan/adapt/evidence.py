"""What a run measured, read from the store once, as plain data the rules judge.

Design decisions:
- ``--performance-metrics`` names groups of stored series (``METRICS``: a
  name → which series belong to it), not series: ``loss`` is the training
  and the validation loss, ``accuracy`` every series whose name says
  accuracy (the RL and representation engines record their own). A rule
  that needs a group the user left out is reported as skipped, never run on
  half its evidence.
- Memory is a resource reading, not a performance metric: it is read
  whenever the run recorded it, because ``memory_efficiency`` can't be
  judged without it and every memory proposal is checked against it.
- Series are read per stage (a grown model's numbers are not its small
  predecessor's) and in full: a run of 10⁵ steps is 10⁵ points per series,
  which SQLite returns in well under a second; the rules need whole curves
  (a plateau's start, the spikes' steps), not the last values.
- Evidence is only good for the settings it was measured under: the plan
  fields that revisions made after the run ended changed are listed, and a
  proposal that would set one of them again is set aside (applying twice
  from one run would halve a learning rate twice on the same evidence).
- Alerts and faults the monitor recorded during the run are counted by kind
  from the run's events, so a proposal can say "the monitor also raised 3
  loss-spike alerts" — the same evidence ``muse monitor`` showed.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Callable

from sqlmodel import Session, col, func, select

from muse_plan.errors import NotFound, PlanError
from muse_plan.plan.diff import diff
from muse_plan.plan.io import spec_to_dict
from muse_plan.plan.units import split_csv
from muse_plan.store import repo, runs
from muse_plan.store.models import MetricPoint, Plan, Run

# a performance metric → whether a stored series belongs to it
METRICS: dict[str, Callable[[str], bool]] = {
    "loss": lambda name: name in ("loss", "val_loss", "l2_term"),  # T-SPMO's L2 term: a part of its loss
    "throughput": lambda name: name == "tokens_per_s",
    "accuracy": lambda name: "accuracy" in name,
    "grad_norm": lambda name: name == "grad_norm",
    "reward": lambda name: name in ("reward", "equal_groups", "advantage_abs", "kl"),  # RL signal, and how far it moved
}
RESOURCES = ("memory_gib", "lr")  # read whatever metrics were chosen
HIGHER_IS_BETTER = ("tokens_per_s",)


def parse_names(text: str | None, accepted: dict[str, Any], flag: str) -> tuple[str, ...]:
    """A comma list of registry names (all of them when ``text`` is None), in registry order."""
    if text is None:
        return tuple(accepted)
    names = split_csv(text)
    unknown = [n for n in names if n not in accepted]
    if unknown:
        raise PlanError(f"{flag}: unknown {', '.join(map(repr, unknown))}; accepted: {', '.join(accepted)}")
    if not names:
        raise PlanError(f"{flag}: give at least one of {', '.join(accepted)}")
    return tuple(n for n in accepted if n in names)


@dataclass
class StageEvidence:
    name: str
    status: str
    step: int
    total_steps: int | None
    series: dict[str, list[tuple[int, float]]] = field(default_factory=dict)

    def values(self, name: str) -> list[float]:
        return [v for _, v in self.series.get(name, [])]


@dataclass
class Evidence:
    plan: str
    run_id: int
    run_status: str
    run_revision: int
    metrics: tuple[str, ...]
    stages: list[StageEvidence]
    alerts: dict[str, int]  # monitor findings recorded during the run, by kind
    changed_after: dict[str, int] = field(default_factory=dict)  # plan field → revision that changed it after the run

    def trained(self, name: str) -> list[StageEvidence]:
        """Stages that recorded the series ``name``."""
        return [s for s in self.stages if s.series.get(name)]

    def peak(self, name: str) -> float | None:
        values = [v for s in self.stages for v in s.values(name)]
        return max(values) if values else None


def pick_run(session: Session, plan: Plan, run_ref: str | None) -> Run:
    """``run_ref`` (which must be this plan's), else the plan's newest run."""
    if run_ref is not None:
        run = runs.get_run(session, run_ref)
        if run.plan_id != plan.id:
            other = session.get(Plan, run.plan_id)
            raise PlanError(f"run {run.id} belongs to plan {other.name if other else run.plan_id!r}, "
                            f"not {plan.name!r}")
        return run
    newest = runs.list_runs(session, plan, limit=1)
    if not newest:
        raise NotFound(f"plan {plan.name!r} has no run to adapt from; run it first with: muse plan run {plan.name}")
    return newest[0][0]


def _series_names(session: Session, run_id: int) -> list[str]:
    query = select(MetricPoint.name).where(MetricPoint.run_id == run_id).distinct()
    return sorted(session.exec(query.order_by(col(MetricPoint.name))))


def _alert_kinds(session: Session, run_id: int) -> dict[str, int]:
    counts: dict[str, int] = {}
    for event in runs.events(session, run_id, limit=10_000):
        if event.kind in ("alert", "rewrite") and event.data_json:
            data = json.loads(event.data_json)
            kind = data.get("kind") or data.get("fault")  # alerts name their kind, rewrites the fault
            if kind:
                counts[kind] = counts.get(kind, 0) + 1
    return counts


def read(session: Session, plan: Plan, run_ref: str | None, metrics: tuple[str, ...]) -> Evidence:
    """The chosen run's series of the chosen metrics (and resources), stage by stage."""
    run = pick_run(session, plan, run_ref)
    names = [n for n in _series_names(session, run.id)
             if n in RESOURCES or any(METRICS[m](n) for m in metrics)]
    stages = []
    status = runs.shown_status(run)
    for sr in runs.stage_runs(session, run):
        series = {n: runs.metric_series(session, run.id, n, sr.id) for n in names}
        stages.append(StageEvidence(sr.name, runs.shown_stage_status(sr, status), sr.step, sr.total_steps,
                                    {n: points for n, points in series.items() if points}))
    if not any(s.series for s in stages):
        raise PlanError(f"run {run.id} of plan {plan.name!r} recorded none of the metrics {', '.join(metrics)} "
                        f"yet; let it train, or run the plan again with: muse plan run {plan.name}")
    return Evidence(plan.name, run.id, status, run.revision, metrics, stages,
                    _alert_kinds(session, run.id), _changed_after(session, plan, run))


def _utc(moment: datetime) -> datetime:
    return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)


def _changed_after(session: Session, plan: Plan, run: Run) -> dict[str, int]:
    """Plan fields that revisions made after the run ended changed (its evidence predates them).

    The end is when the run finished, or its newest metric point for a run
    that died without saying so; revisions made during the run (recovery's)
    count as the run's own."""
    newest = session.exec(select(func.max(MetricPoint.time)).where(MetricPoint.run_id == run.id)).one()
    end = run.finished_at or newest
    if end is None:
        return {}
    changed: dict[str, int] = {}
    previous = None
    for revision in repo.list_revisions(session, plan):
        current = spec_to_dict(repo.spec_of(revision))
        if previous is not None and _utc(revision.created_at) > _utc(end):
            for change in diff(previous, current):
                changed.setdefault(change.path, revision.number)
        previous = current
    return changed


def summary(evidence: Evidence) -> list[dict[str, Any]]:
    """One row per stage and series: points, first, last, best and median value."""
    rows = []
    for stage in evidence.stages:
        for name, points in stage.series.items():
            if name == "lr":
                continue
            values = [v for _, v in points]
            best = max(values) if name in HIGHER_IS_BETTER or "accuracy" in name else min(values)
            if name == "memory_gib":
                best = max(values)  # for memory the peak is what matters
            rows.append({"stage": stage.name, "series": name, "points": len(values), "first": values[0],
                         "last": values[-1], "best": best, "median": statistics.median(values)})
    return rows


def missing(evidence: Evidence) -> list[str]:
    """Chosen metrics the run recorded no series of (``accuracy`` on a pretraining run)."""
    names = {n for s in evidence.stages for n in s.series}
    return [m for m in evidence.metrics if not any(METRICS[m](n) for n in names)]
