"""What a run records and shows: the run's shared facts, its view, the store's writer.

- ``Prepared`` is what the main process decided before a run (run id,
  folder, the plan, where to start), broadcast to every process.
- ``View`` is how a run shows itself (the CLI's progress bar), main process
  only; ``note`` writes an event and shows it.
- ``Recorder`` is the loop's hooks that write a stage's metrics to the
  store in batches, and hand each batch to the run's trackers when it has
  any; ``mark_stopped`` records a run that stopped (a fault, Ctrl-C) and
  says where.
- ``model_meta`` is what a checkpoint's manifest says about the model its
  weights were built with (``ModelConfig``), so a later stage builds it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol


from muse_plan.executor import checkpoint
from muse_plan.executor.loop import Fault, StepRecord
from muse_plan.monitor.trackers import LiveMirror
from muse_plan.store import runs
from muse_plan.store.db import Store
from muse_plan.store.models import Run, StageRun, utcnow


class View(Protocol):
    """How a run shows itself (the CLI's progress bar); main process only."""

    def message(self, text: str) -> None: ...

    def stage_started(self, name: str, total_steps: int, start_step: int) -> None: ...

    def step(self, record: StepRecord) -> None: ...

    def evaluated(self, step: int, metrics: dict[str, float]) -> None: ...

    def stage_finished(self, name: str) -> None: ...


@dataclass
class StageResult:
    name: str
    steps: int
    metrics: dict[str, float]
    seconds: float  # wall time of this stage in this process, faults and their recovery included
    start_step: int = 0  # the step this process started it from (a resume's checkpoint)
    faults: int = 0  # faults recovered from on the way

    @property
    def trained_here(self) -> int:
        return self.steps - self.start_step


@dataclass
class RunResult:
    run_id: int
    plan: str
    revision: int  # the revision the run finished under
    resumed: bool
    main: bool = True  # the main process reports; the others stay quiet
    processes: int = 1
    stages: list[StageResult] = field(default_factory=list)
    seconds: float = 0.0  # wall time of this process's part of the run
    head: int | None = None  # the plan's head when it finished (an edit since may have moved it on)
    run_seconds: float | None = None  # wall time since the run first started, pauses included
    tracking: list[str] = field(default_factory=list)  # how to look at each tracker it logged to


@dataclass
class Prepared:
    """What the main process decided, broadcast to every process."""

    run_id: int
    run_dir: str
    plan: str
    revision: int
    spec_json: str
    start: int  # position of the first stage to run
    resume: bool
    stage_run_ids: list[int]
    events_from: int = 0  # the first of the run's events this process mirrors to its trackers (0: all)


def stage_meta(prepared: Prepared, stage: str, model: Any) -> dict[str, Any]:
    """What a stage's checkpoints' manifests say besides the weights: the plan, revision, run and stage,
    the folder the run ran in (the plan's relative paths, a tokenizer or ``init_from``, lead somewhere
    from there: ``muse eval`` and ``muse generate`` find them from any folder) and the model's config."""
    return {"plan": prepared.plan, "revision": prepared.revision, "run": prepared.run_id, "stage": stage,
            "workdir": str(Path.cwd()), **model_meta(model)}


def model_meta(model: Any) -> dict[str, Any]:
    """The manifest's ``model_config``: the full config the weights were built with,
    so a later stage (or a resume) builds exactly that model; {} for a model without one."""
    from dataclasses import asdict

    from engines.architecture.config import ModelConfig

    config = getattr(model, "config", None)
    return {"model_config": asdict(config)} if isinstance(config, ModelConfig) else {}


def note(store: Store | None, prepared: Prepared, position: int, notes: list[str], view: View | None,
          severity: str) -> None:
    if store is None or not notes:
        return
    with store.write() as session:
        run = session.get(Run, prepared.run_id)
        for text in notes:
            runs.add_event(session, run, text, severity=severity,
                           stage_run_id=prepared.stage_run_ids[position])
    if view:
        for text in notes:
            view.message(text)


def mark_stopped(store: Store, prepared: Prepared, exc: BaseException) -> str:
    """Records the run and its running stage as stopped; returns where, for a
    message (" in stage pretrain at step 29 of 250, last checkpoint at step 20")."""
    status = "interrupted" if isinstance(exc, KeyboardInterrupt) else "failed"
    message = "interrupted by the user" if status == "interrupted" else f"{type(exc).__name__}: {exc}"
    where = ""
    with store.write() as session:
        run = session.get(Run, prepared.run_id)
        run.status, run.error, run.finished_at = status, message, utcnow()
        stopped = None
        for sr in runs.stage_runs(session, run):
            if sr.status == "running":
                sr.status, stopped = status, sr.id
                found = checkpoint.checkpoints(Path(prepared.run_dir) / sr.name)  # what a resume loads
                saved = checkpoint.step_of(found[0]) if found else None
                where = (f" in stage {sr.name} at step {sr.step} of {sr.total_steps}, "
                         + (f"last checkpoint at step {saved}" if saved is not None else "no checkpoint yet"))
        runs.add_event(session, run, message, kind="fault" if isinstance(exc, Fault) else "info",
                       severity="error", step=getattr(exc, "step", None), stage_run_id=stopped)
    return where


class Recorder:
    """Loop hooks that write a stage's metrics to the store in batches (main process).

    ``mirror``: the run's trackers (``training.log_with``); each batch goes to them
    right after the store has it, then the run's new events (``monitor/trackers.py``)."""

    def __init__(self, store: Store, run_id: int, stage_run_id: int, view: View | None,
                 flush_seconds: float = 2.0, mirror: LiveMirror | None = None) -> None:
        self.store, self.run_id, self.stage_run_id, self.view = store, run_id, stage_run_id, view
        self.flush_seconds, self.mirror = flush_seconds, mirror
        self.buffer: list[tuple[int, str, float]] = []
        self.step = 0
        self.last_flush = time.monotonic()

    def on_start(self, step: int) -> None:
        self.step = step
        with self.store.write() as session:
            runs.drop_metrics_after(session, self.stage_run_id, step)
            sr = session.get(StageRun, self.stage_run_id)
            sr.status, sr.step = "running", step
            sr.started_at = sr.started_at or utcnow()

    def on_step(self, r: StepRecord) -> None:
        self.step = r.step
        self.buffer += [(r.step, "loss", r.loss), (r.step, "grad_norm", r.grad_norm), (r.step, "lr", r.lr),
                        (r.step, "tokens_per_s", r.tokens_per_s), (r.step, "memory_gib", r.memory_gib)]
        self.buffer += [(r.step, name, value) for name, value in r.extra.items()]
        if self.view:
            self.view.step(r)
        if time.monotonic() - self.last_flush > self.flush_seconds:
            self.flush()

    def on_eval(self, step: int, metrics: dict[str, float]) -> None:
        self.buffer += [(step, name, value) for name, value in metrics.items()]
        if self.view:
            self.view.evaluated(step, metrics)

    def on_checkpoint(self, step: int, path: Path) -> None:
        self.flush(checkpoint=str(path))

    def on_alerts(self, findings: list[Any]) -> None:
        with self.store.write() as session:
            run = session.get(Run, self.run_id)
            for f in findings:
                runs.add_event(session, run, f.message, kind="alert", severity="warning",
                               stage_run_id=self.stage_run_id, step=f.step, data=f.data())
        if self.view:
            for f in findings:
                self.view.message(f"alert: {f.message}")

    def on_notes(self, step: int, notes: list[str], severity: str = "warning") -> None:
        with self.store.write() as session:
            run = session.get(Run, self.run_id)
            for text in notes:
                runs.add_event(session, run, text, kind="engine", severity=severity,
                               stage_run_id=self.stage_run_id, step=step)
        if self.view:
            for text in notes:
                self.view.message(text)

    def flush(self, checkpoint: str | None = None, **updates: Any) -> None:
        with self.store.write() as session:
            runs.add_metrics(session, self.run_id, self.stage_run_id, self.buffer)
            sr = session.get(StageRun, self.stage_run_id)
            sr.step = self.step
            if checkpoint is not None:
                sr.checkpoint = checkpoint
            for key, value in updates.items():
                setattr(sr, key, value)
        written, self.buffer = self.buffer, []
        if self.mirror is not None:  # after the store: a tracker's trouble never costs it a point
            self.mirror.points(self.stage_run_id, written)
            self.mirror.sync()
        self.last_flush = time.monotonic()

    def finish(self, step: int, summary: dict[str, float], final: Path) -> None:
        self.buffer += [(step, name, value) for name, value in summary.items()]
        self.flush(checkpoint=str(final), status="completed", finished_at=utcnow())
