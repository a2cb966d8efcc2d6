"""Reading and writing runs, stage runs, metric points and events.

Functions take a ``Session``; the executor calls them inside ``Store.write()``
blocks, a batch of metric points per block, so a training process holds the
SQLite write lock for milliseconds at a time and a dashboard or a second
``muse`` command reading the store is never blocked for long.

A run killed without warning (SIGKILL, power loss) stays ``running`` in the
store; ``is_alive`` tells such a run from a live one by its host and pid, and
resuming it first drops the metric points recorded after the checkpoint it
resumes from, so the stored curve is the one the resumed run really follows.
"""

from __future__ import annotations

import json
import os
import socket
from datetime import datetime, timezone
from typing import Any, Iterable

from sqlmodel import Session, col, delete, func, select

from muse_plan.errors import NotFound
from muse_plan.store.models import Event, MetricPoint, Plan, Run, StageRun, utcnow

UNFINISHED = ("pending", "running", "failed", "interrupted")


def create_run(session: Session, plan: Plan, revision: int, stages: Iterable[tuple[str, int]],
               run_dir_root: str) -> Run:
    """A run in state ``running`` with one pending stage run per (name, total_steps)."""
    run = Run(plan_id=plan.id, revision=revision, status="running", host=socket.gethostname(),
              pid=os.getpid(), started_at=utcnow())
    session.add(run)
    session.flush()
    run.run_dir = os.path.join(run_dir_root, f"run-{run.id:05d}")
    for position, (name, total) in enumerate(stages):
        session.add(StageRun(run_id=run.id, position=position, name=name, total_steps=total))
    session.flush()
    return run


def get_run(session: Session, run_id: int | str) -> Run:
    ref = str(run_id).strip().removeprefix("run-")
    run = session.get(Run, int(ref)) if ref.isdigit() else None
    if run is None:
        raise NotFound(f"no run {run_id!r}; list runs with: muse run list")
    return run


def list_runs(session: Session, plan: Plan | None = None, limit: int = 50) -> list[tuple[Run, Plan]]:
    query = select(Run, Plan).join(Plan, Plan.id == Run.plan_id)
    if plan is not None:
        query = query.where(Run.plan_id == plan.id)
    return list(session.exec(query.order_by(col(Run.id).desc()).limit(limit)))


def latest_unfinished(session: Session, plan: Plan) -> Run | None:
    query = (select(Run).where(Run.plan_id == plan.id, col(Run.status).in_(UNFINISHED))
             .order_by(col(Run.id).desc()))
    return session.exec(query).first()


def is_alive(run: Run) -> bool:
    """Whether a ``running`` run's process still exists (only knowable on its own host)."""
    if run.status != "running" or run.pid is None:
        return False
    if run.host != socket.gethostname():
        return True  # another machine's run: assume it is what the store says
    try:
        os.kill(run.pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def shown_status(run: Run) -> str:
    """The status to show: a ``running`` run whose process is gone was interrupted."""
    if run.status == "running" and not is_alive(run):
        return "interrupted"
    return run.status


def shown_stage_status(stage: StageRun, run_status: str) -> str:
    """A stage's status as shown beside its run's ``shown_status``: a stage still marked
    running in a run that is not (its process was killed) stopped as the run did."""
    if stage.status == "running" and run_status != "running":
        return run_status
    return stage.status


def revision_text(run: Run) -> str:
    """"5", or "5 (started under 3)" when a rewrite or a resume moved the run on."""
    return str(run.under) if run.under == run.revision else f"{run.under} (started under {run.revision})"


def stage_runs(session: Session, run: Run) -> list[StageRun]:
    return list(session.exec(select(StageRun).where(StageRun.run_id == run.id)
                             .order_by(col(StageRun.position))))


def add_metrics(session: Session, run_id: int, stage_run_id: int,
                points: Iterable[tuple[int, str, float]]) -> None:
    session.add_all(MetricPoint(run_id=run_id, stage_run_id=stage_run_id, step=step, name=name, value=value)
                    for step, name, value in points)


def drop_metrics_after(session: Session, stage_run_id: int, step: int) -> int:
    """Delete a stage's metric points past ``step`` (recorded after its last checkpoint)."""
    result = session.exec(delete(MetricPoint).where(
        MetricPoint.stage_run_id == stage_run_id, MetricPoint.step > step))
    return result.rowcount or 0


def metric_series(session: Session, run_id: int, name: str,
                  stage_run_id: int | None = None) -> list[tuple[int, float]]:
    query = select(MetricPoint.step, MetricPoint.value).where(
        MetricPoint.run_id == run_id, MetricPoint.name == name)
    if stage_run_id is not None:
        query = query.where(MetricPoint.stage_run_id == stage_run_id)
    return [(s, v) for s, v in session.exec(query.order_by(col(MetricPoint.step), col(MetricPoint.id)))]


def metric_points(session: Session, stage_run_id: int) -> list[tuple[int, str, float, float]]:
    """A stage's every metric point as (step, name, value, POSIX time), in the order recorded."""
    query = (select(MetricPoint.step, MetricPoint.name, MetricPoint.value, MetricPoint.time)
             .where(MetricPoint.stage_run_id == stage_run_id).order_by(col(MetricPoint.id)))
    return [(step, name, value, posix_time(time)) for step, name, value, time in session.exec(query)]


def posix_time(time: datetime) -> float:
    """A stored time handed back without its zone was stored as UTC."""
    return (time if time.tzinfo else time.replace(tzinfo=timezone.utc)).timestamp()


def last_metrics(session: Session, stage_run_id: int) -> dict[str, tuple[int, float]]:
    """The newest (step, value) of each metric a stage recorded."""
    newest = (select(MetricPoint.name, func.max(MetricPoint.id).label("mid"))
              .where(MetricPoint.stage_run_id == stage_run_id).group_by(MetricPoint.name).subquery())
    rows = session.exec(select(MetricPoint).join(newest, col(MetricPoint.id) == newest.c.mid))
    return {p.name: (p.step, p.value) for p in rows}


def add_event(session: Session, run: Run, message: str, *, kind: str = "info", severity: str = "info",
              stage_run_id: int | None = None, step: int | None = None,
              data: dict[str, Any] | None = None) -> Event:
    event = Event(plan_id=run.plan_id, run_id=run.id, stage_run_id=stage_run_id, step=step, kind=kind,
                  severity=severity, message=message, data_json=json.dumps(data) if data else None)
    session.add(event)
    return event


def events(session: Session, run_id: int, limit: int = 20) -> list[Event]:
    query = select(Event).where(Event.run_id == run_id).order_by(col(Event.id).desc()).limit(limit)
    return list(reversed(list(session.exec(query))))


def events_after(session: Session, run_id: int, after: int, limit: int | None = None) -> list[Event]:
    """The run's events with an id above ``after``, oldest first: what a tracker mirror
    (``monitor/trackers.py``) has not seen yet."""
    query = select(Event).where(Event.run_id == run_id, col(Event.id) > after).order_by(col(Event.id))
    return list(session.exec(query.limit(limit) if limit is not None else query))


def newest_event_id(session: Session, run_id: int) -> int:
    """The id of the run's newest event (0 for none)."""
    return session.exec(select(func.max(Event.id)).where(Event.run_id == run_id)).one() or 0
