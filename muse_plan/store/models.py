"""Tables of the plan store.

A plan is a name and a pointer to its newest revision; every revision is an
immutable full JSON snapshot of the PlanSpec with its author and reason.
Runs, stage runs, metric points and events hang off plans and runs and are
filled by the executor, monitor and recovery layers. Deleting a plan
deletes what hangs off it (foreign keys with ON DELETE CASCADE, which the
engine turns on for SQLite).

Times are timezone-aware UTC (``utcnow``); SQLModel stores and returns them so.
"""

from __future__ import annotations

from datetime import datetime, timezone

from sqlalchemy import DDL, Column, Index, Text, UniqueConstraint, event
from sqlmodel import Field, SQLModel

AUTHORS = ("user", "optimizer", "recovery", "adapt")
RUN_STATUSES = ("pending", "running", "completed", "failed", "interrupted")
EVENT_KINDS = ("info", "alert", "fault", "rewrite", "recovery")


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class SchemaVersion(SQLModel, table=True):
    __tablename__ = "schema_version"
    version: int = Field(primary_key=True)
    applied_at: datetime = Field(default_factory=utcnow)


class Plan(SQLModel, table=True):
    __tablename__ = "plans"
    id: int | None = Field(default=None, primary_key=True)
    name: str = Field(unique=True, index=True)
    head: int = Field(default=0, description="number of the newest revision")
    created_at: datetime = Field(default_factory=utcnow)
    updated_at: datetime = Field(default_factory=utcnow)


class PlanRevision(SQLModel, table=True):
    __tablename__ = "plan_revisions"
    __table_args__ = (UniqueConstraint("plan_id", "number"),)
    id: int | None = Field(default=None, primary_key=True)
    plan_id: int = Field(foreign_key="plans.id", ondelete="CASCADE", index=True)
    number: int
    author: str
    reason: str
    spec_json: str = Field(sa_column=Column(Text, nullable=False))
    created_at: datetime = Field(default_factory=utcnow)


# Immutability is the store's promise, so the database keeps it too: on SQLite
# an UPDATE of a revision aborts, whatever code issues it.
event.listen(PlanRevision.__table__, "after_create", DDL(
    "CREATE TRIGGER plan_revisions_immutable BEFORE UPDATE ON plan_revisions "
    "BEGIN SELECT RAISE(ABORT, 'plan revisions are immutable'); END"
).execute_if(dialect="sqlite"))


class Run(SQLModel, table=True):
    __tablename__ = "runs"
    id: int | None = Field(default=None, primary_key=True)
    plan_id: int = Field(foreign_key="plans.id", ondelete="CASCADE", index=True)
    revision: int = Field(description="plan revision the run started under")
    current_revision: int | None = Field(default=None, description="plan revision the run is under now")
    status: str = "pending"
    run_dir: str | None = None
    host: str | None = None
    pid: int | None = None
    error: str | None = Field(default=None, sa_column=Column(Text))
    created_at: datetime = Field(default_factory=utcnow)
    started_at: datetime | None = None
    finished_at: datetime | None = None

    @property
    def under(self) -> int:
        """The revision the run is under now (a rewrite while it trains moves it on)."""
        return self.current_revision or self.revision


class StageRun(SQLModel, table=True):
    __tablename__ = "stage_runs"
    __table_args__ = (UniqueConstraint("run_id", "position"),)
    id: int | None = Field(default=None, primary_key=True)
    run_id: int = Field(foreign_key="runs.id", ondelete="CASCADE", index=True)
    position: int
    name: str
    status: str = "pending"
    step: int = 0
    total_steps: int | None = None
    checkpoint: str | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None


class MetricPoint(SQLModel, table=True):
    __tablename__ = "metric_points"
    __table_args__ = (Index("ix_metric_points_run_name_step", "run_id", "name", "step"),)
    id: int | None = Field(default=None, primary_key=True)
    run_id: int = Field(foreign_key="runs.id", ondelete="CASCADE")
    stage_run_id: int | None = Field(default=None, foreign_key="stage_runs.id", ondelete="CASCADE")
    step: int
    name: str
    value: float
    time: datetime = Field(default_factory=utcnow)


class Event(SQLModel, table=True):
    __tablename__ = "events"
    id: int | None = Field(default=None, primary_key=True)
    plan_id: int = Field(foreign_key="plans.id", ondelete="CASCADE", index=True)
    run_id: int | None = Field(default=None, foreign_key="runs.id", ondelete="CASCADE", index=True)
    stage_run_id: int | None = Field(default=None, foreign_key="stage_runs.id", ondelete="CASCADE")
    step: int | None = None
    kind: str = "info"
    severity: str = "info"
    message: str = Field(sa_column=Column(Text, nullable=False))
    data_json: str | None = Field(default=None, sa_column=Column(Text))
    time: datetime = Field(default_factory=utcnow)
