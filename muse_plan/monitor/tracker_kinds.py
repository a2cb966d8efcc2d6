"""The trackers a run can log to — TensorBoard, MLflow, W&B — one registered record each.

Each record starts Accelerate's own tracker class for it (``accelerate.tracking``:
``TensorBoardTracker``, ``MLflowTracker``, ``WandBTracker``) the way
``Accelerator.init_trackers`` does — ``start()``, then ``store_init_configuration``
with the hyper-parameters — and finishes it as ``end_training`` does. Batches of
points go to the object the tracker wraps (``tracker.tracker``), because
Accelerate's ``log`` writes one step per call: TensorBoard's writer is flushed once
per batch instead of once per step, MLflow gets one ``log_batch`` per batch; W&B
logs a step per call anyway. Text events go through Accelerate's ``log`` where the
tracker has a text form (TensorBoard: a ``str`` value is ``add_text``), else
through the wrapped object (MLflow: one text artifact per event; W&B: a string).

What a tracker can't do shapes what it gets: W&B wants one increasing step per
run, so each stage's step is a metric of its own there (``pretrain/step``, by
``define_metric``); MLflow's parameters can't change, so a resumed MLflow run
keeps the ones it started with. No tracker package is imported here at module
level: naming one costs nothing until a run or an export starts it.
"""

from __future__ import annotations

import importlib.util
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

Scalar = bool | int | float | str
Point = tuple[int, str, float]  # (step, metric name, value): a metric point as the store holds it


def metric_tag(stage: str, name: str) -> str:
    """``pretrain/loss``: every plan, one stage or many, so a tag never changes meaning when a stage is added."""
    return f"{stage}/{name}"


@dataclass(frozen=True)
class Identity:
    """What names one muse run in every tracker: the plan is the project / experiment, the run a run in it."""

    plan: str
    run_id: int
    started: str  # when the run started (ISO): with the id, unique across stores and machines
    stages: tuple[str, ...]

    @property
    def name(self) -> str:
        return f"run-{self.run_id}"

    @property
    def tags(self) -> dict[str, str]:
        return {"muse.plan": self.plan, "muse.run": str(self.run_id), "muse.started": self.started}


@dataclass(frozen=True)
class Text:
    """One event of the run (a fault, an alert, a rewrite, a note) as a tracker shows it."""

    id: int  # the store's event id
    stage: str | None  # None: the run's own (started, resumed, completed)
    step: int  # the stage's step; 0 for an event that has none
    kind: str
    severity: str
    message: str

    @property
    def tag(self) -> str:
        return f"{self.stage}/events/{self.kind}" if self.stage else f"events/{self.kind}"

    @property
    def body(self) -> str:
        return f"{self.severity}: {self.message}"

    @property
    def artifact(self) -> str:
        """Where MLflow keeps it: one file per event, ordered by step in the artifact browser."""
        return f"events/{self.stage or 'run'}/step-{self.step:07d}-{self.kind}-{self.id}.txt"


class Opened(Protocol):
    """A started tracker of one run."""

    def scalars(self, stage: str, points: Sequence[Point], times: Sequence[float] | None) -> None: ...

    def texts(self, texts: Sequence[Text]) -> None: ...

    def finish(self, status: str) -> None: ...


@dataclass(frozen=True)
class TrackerKind:
    name: str  # as written in training.log_with, and Accelerate's name for it
    label: str
    modules: tuple[str, ...]  # any one of them importable: installed
    extra: str  # pip install -e '.[<extra>]'
    exports: bool  # muse runs export --to it (a folder it writes everything into)
    # (folder, identity, hyper-parameters, local): started; local: a live run's, where the user's
    # environment may name a server (MLFLOW_TRACKING_URI) — an export writes into its folder only
    open: Callable[[Path, Identity, dict[str, Scalar], bool], Opened]
    hint: Callable[[Path, bool], str]  # (folder, local) → how to look at it

    def installed(self) -> bool:
        return any(importlib.util.find_spec(m) is not None for m in self.modules)


def _by_step(points: Sequence[Point]) -> list[tuple[int, dict[str, float]]]:
    """Consecutive points of one step as one dict (W&B logs a step per call)."""
    grouped: list[tuple[int, dict[str, float]]] = []
    for step, name, value in points:
        if not grouped or grouped[-1][0] != step or name in grouped[-1][1]:
            grouped.append((step, {}))
        grouped[-1][1][name] = value
    return grouped


# ---- TensorBoard ------------------------------------------------------------------------------


class _TensorBoardRun:
    def __init__(self, tracker: Any) -> None:
        self.tracker = tracker

    def scalars(self, stage: str, points: Sequence[Point], times: Sequence[float] | None) -> None:
        writer = self.tracker.tracker
        for i, (step, name, value) in enumerate(points):
            writer.add_scalar(metric_tag(stage, name), value, global_step=step, walltime=times[i] if times else None)
        writer.flush()  # once per batch: Accelerate's log flushes after every step

    def texts(self, texts: Sequence[Text]) -> None:
        for text in texts:  # one call each: two events of a kind can share a step
            self.tracker.log({text.tag: text.body}, step=text.step)

    def finish(self, status: str) -> None:
        self.tracker.finish()


def _open_tensorboard(folder: Path, ident: Identity, config: dict[str, Scalar], local: bool) -> _TensorBoardRun:
    """Event files in ``folder``; the hyper-parameters once, in the folder's first stream (a
    resumed run appends a stream and keeps them)."""
    from accelerate.tracking import TensorBoardTracker

    fresh = not any(folder.glob("events.out.tfevents.*"))
    tracker = TensorBoardTracker(folder.name, folder.parent)  # Accelerate writes to logging_dir/run_name
    tracker.start()
    if fresh:
        tracker.store_init_configuration(config)
    return _TensorBoardRun(tracker)


# ---- MLflow -----------------------------------------------------------------------------------

MLFLOW_STATUS = {"completed": "FINISHED", "failed": "FAILED", "interrupted": "KILLED"}


class _MLflowRun:
    def __init__(self, tracker: Any, client: Any, restore_uri: str | None) -> None:
        self.tracker, self.client, self.restore_uri = tracker, client, restore_uri
        self.run_id = tracker.tracker.info.run_id

    def scalars(self, stage: str, points: Sequence[Point], times: Sequence[float] | None) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(metric_tag(stage, name), float(value), int(times[i] * 1000) if times else now, step)
                   for i, (step, name, value) in enumerate(points)]
        for start in range(0, len(metrics), 1000):  # MLflow takes at most 1000 metrics a batch
            self.client.log_batch(self.run_id, metrics=metrics[start:start + 1000])

    def texts(self, texts: Sequence[Text]) -> None:
        for text in texts:
            self.client.log_text(self.run_id, text.body, text.artifact)

    def finish(self, status: str) -> None:
        import mlflow

        try:
            if status == "completed":
                self.tracker.finish()
            else:  # finish(), with the run's real ending
                mlflow.end_run(status=MLFLOW_STATUS.get(status, "FAILED"))
        finally:  # MLflow keeps the URI in the process (and its environment): the next run must not inherit it
            mlflow.set_tracking_uri(self.restore_uri)


def _open_mlflow(folder: Path, ident: Identity, config: dict[str, Scalar], local: bool) -> _MLflowRun:
    """An MLflow file store in ``folder`` (MLflow 3 keeps it in maintenance mode and asks for
    MLFLOW_ALLOW_FILE_STORE: muse opts in for its own folders), or, for a live run, the server
    MLFLOW_TRACKING_URI names. The experiment is the plan; a resumed run continues its MLflow
    run (found by the ``muse.run`` and ``muse.started`` tags) and keeps its parameters."""
    import mlflow
    from accelerate.tracking import MLflowTracker

    users = os.environ.get("MLFLOW_TRACKING_URI")
    uri = users if local else None
    if not uri:
        folder.mkdir(parents=True, exist_ok=True)
        uri = folder.resolve().as_uri()
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    mlflow.set_tracking_uri(uri)  # Accelerate's tracker uses MLflow's fluent API
    client = mlflow.MlflowClient(uri)
    existing = _mlflow_run(client, ident)
    tracker = MLflowTracker(ident.plan, run_id=existing, tags=ident.tags, run_name=ident.name,
                            description=f"muse run {ident.run_id} of plan {ident.plan}")
    tracker.start()
    if existing is None:
        tracker.store_init_configuration(config)
    return _MLflowRun(tracker, client, users)


def _mlflow_hint(folder: Path, local: bool) -> str:
    uri = os.environ.get("MLFLOW_TRACKING_URI") if local else None
    return f"MLflow at {uri}" if uri else f"MLFLOW_ALLOW_FILE_STORE=true mlflow ui --backend-store-uri {folder}"


def _mlflow_run(client: Any, ident: Identity) -> str | None:
    experiment = client.get_experiment_by_name(ident.plan)
    if experiment is None:
        return None
    found = client.search_runs([experiment.experiment_id], max_results=1, filter_string=(
        f"tags.`muse.run` = '{ident.run_id}' and tags.`muse.started` = '{ident.started}'"))
    return found[0].info.run_id if found else None


# ---- W&B --------------------------------------------------------------------------------------


class _WandBRun:
    def __init__(self, tracker: Any) -> None:
        self.tracker = tracker

    def scalars(self, stage: str, points: Sequence[Point], times: Sequence[float] | None) -> None:
        for step, values in _by_step(points):
            self.tracker.log({**{metric_tag(stage, n): v for n, v in values.items()}, f"{stage}/step": step})

    def texts(self, texts: Sequence[Text]) -> None:
        for text in texts:
            self.tracker.log({text.tag: text.body, **({f"{text.stage}/step": text.step} if text.stage else {})})

    def finish(self, status: str) -> None:
        self.tracker.tracker.finish(exit_code=0 if status == "completed" else 1)


def _open_wandb(folder: Path, ident: Identity, config: dict[str, Scalar], local: bool) -> _WandBRun:
    """Offline, its files in ``folder`` (``wandb sync`` uploads them later), unless WANDB_MODE or
    WANDB_API_KEY says the user set W&B up. A resumed run continues the W&B run of the same id."""
    from accelerate.tracking import WandBTracker

    configured = bool(os.environ.get("WANDB_MODE") or os.environ.get("WANDB_API_KEY"))
    folder.parent.mkdir(parents=True, exist_ok=True)
    stamp = "".join(c for c in ident.started if c.isdigit())[:14]
    tracker = WandBTracker(ident.plan, name=ident.name, id=f"muse-run-{ident.run_id}-{stamp}", resume="allow",
                           dir=str(folder.parent), tags=[f"muse-run-{ident.run_id}"],
                           **({} if configured else {"mode": "offline"}))
    tracker.start()
    for stage in ident.stages:
        tracker.tracker.define_metric(f"{stage}/step")
        tracker.tracker.define_metric(f"{stage}/*", step_metric=f"{stage}/step")
    tracker.store_init_configuration(config)
    return _WandBRun(tracker)


def _wandb_hint(folder: Path, local: bool) -> str:
    if os.environ.get("WANDB_MODE") or os.environ.get("WANDB_API_KEY"):
        return "W&B as WANDB_MODE / WANDB_API_KEY set it up"
    return f"wandb sync {folder}/offline-run-*"


TRACKERS: dict[str, TrackerKind] = {k.name: k for k in (
    TrackerKind("tensorboard", "TensorBoard", ("tensorboard", "tensorboardX"), "tensorboard", True,
                _open_tensorboard, lambda folder, local: f"tensorboard --logdir {folder}"),
    TrackerKind("mlflow", "MLflow", ("mlflow",), "mlflow", True, _open_mlflow, _mlflow_hint),
    TrackerKind("wandb", "W&B", ("wandb",), "wandb", False, _open_wandb, _wandb_hint),
)}
TRACKER_NAMES: tuple[str, ...] = tuple(TRACKERS)
