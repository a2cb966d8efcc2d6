"""Metrics where people already look: a run in TensorBoard, MLflow or W&B.

``training.log_with: [tensorboard, mlflow]`` (or ``muse plan run --log-with``)
mirrors a run into those trackers while it trains; ``muse runs export RUN --to
tensorboard DIR`` writes a stored run into one afterwards. Both go through one
``Mirror``, so the tags, steps, values, hyper-parameters and text events are the
same either way. The trackers themselves are ``tracker_kinds.py``.

Design decisions:
- The store stays the truth; trackers mirror it. A tracker gets exactly the metric
  points the store gets, when the Recorder writes them (``executor/record.py``: one
  batch per flush), and every event of the run — faults, alerts, rewrites,
  recovery, notes, whoever wrote them — read back from the store after each flush.
  A tracker that fails stops with a warning event; the run and the store go on.
- Accelerate's tracker classes are started, configured and finished as
  ``Accelerator.init_trackers`` / ``end_training`` do, but they belong to the run,
  not to one Accelerator: a run builds a new Accelerator when a stage's precision
  differs or recovery rewrites it, and one TensorBoard stream, one MLflow run must
  outlive that; ``end_training`` would also destroy the process group the runner
  keeps, and an export has no training Accelerator. Main process only, as in
  Accelerate: the Recorder runs there, and the trackers' ``main_process_only`` holds.
- Tags: ``STAGE/METRIC`` (``pretrain/loss``, ``reasoning_rl/reward``) in every plan,
  at the stage's own step as the store counts it; events as text at theirs,
  ``STAGE/events/KIND`` (``pretrain/events/fault``) or the run's ``events/KIND``
  (step 0 where an event has none).
- Hyper-parameters: the plan revision the run started under (``plan/...``) and each
  stage's settings as resolved for that machine (``settings/STAGE/...``), plus
  ``run/...``; flattened to scalars and strings (lists as JSON, open fields left
  out). ``prepare_run`` records them with the run's first event, so an export logs
  what the live run did, even after the code's defaults change. Revisions made while
  it runs arrive as rewrite events (MLflow's parameters can't change).
- Local by default, under the run's folder ``$MUSE_HOME/runs/run-N/``:
  ``tensorboard/`` (event files), ``mlflow/`` (a file store; MLFLOW_TRACKING_URI,
  where set, names a server instead), ``wandb/`` (offline unless WANDB_MODE or
  WANDB_API_KEY is set). An export writes into the folder it is given.
- A rewind can't be undone in a tracker: when a resume or a recovery goes back to
  a checkpoint, the store drops the points recorded after it, but those already
  mirrored stay beside the re-trained ones (the resume's event says where it went
  back to); ``muse runs export`` writes exactly the store's curve. A run resumed in
  a new process mirrors from its resume on.
- A tracker named but not installed is refused when a plan is imported, created or
  edited and when a run starts, never mid-run (``require``), naming the extra.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any, Callable

from pydantic import BaseModel

from muse_plan.errors import Conflict, PlanError
from muse_plan.monitor.tracker_kinds import TRACKERS, Identity, Opened, Point, Scalar, Text


def require(names: Iterable[str] | None, where: str = "training.log_with") -> None:
    """Refuse trackers whose package is missing, in one line naming what to install."""
    missing = [TRACKERS[n] for n in names or () if not TRACKERS[n].installed()]
    if not missing:
        return
    labels = " and ".join(k.label for k in missing)
    verb, it = ("is", "it") if len(missing) == 1 else ("are", "them")
    raise PlanError(f"{where}: {labels} {verb} not installed here; install {it} with: "
                    f"pip install -e '.[{','.join(k.extra for k in missing)}]'")


# ---- hyper-parameters ---------------------------------------------------------------------


def _plain(value: Any) -> Any:
    """A dataclass or pydantic model as a dict; a path or an enum as its text."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, Path):
        return str(value)
    return value


def _json_default(value: Any) -> Any:
    plain = _plain(value)
    return str(value) if plain is value else plain


def flatten(tree: Any) -> dict[str, Scalar]:
    """Nested dicts (dataclasses, pydantic models) as ``a/b/c`` keys of scalars and strings:
    what every tracker's hyper-parameters take. Lists become JSON; None (left open) is left out."""
    flat: dict[str, Scalar] = {}

    def walk(value: Any, key: str) -> None:
        value = _plain(value)
        if isinstance(value, dict):
            for k, v in value.items():
                walk(v, f"{key}/{k}" if key else str(k))
        elif isinstance(value, (list, tuple)):
            flat[key] = json.dumps(value, default=_json_default)
        elif isinstance(value, (bool, int, float, str)):
            flat[key] = value
        elif value is not None:
            flat[key] = str(value)

    walk(tree, "")
    return flat


def _by_stage(spec: dict[str, Any]) -> dict[str, Any]:
    """A dumped plan with its stages keyed by name (``plan/stages/pretrain/steps``), not one JSON list."""
    stages = {s["name"]: {k: v for k, v in s.items() if k != "name"} for s in spec.get("stages", [])}
    return {**spec, "stages": stages}


def run_config(plan: str, run_id: int, revision: int, spec: dict[str, Any], settings: Sequence[Any],
               processes: int, device: str) -> dict[str, Scalar]:
    """A run's hyper-parameters: its revision's plan (``spec``, dumped) and every stage's resolved settings."""
    return flatten({"run": {"plan": plan, "id": run_id, "revision": revision, "processes": processes,
                            "device": device},
                    "plan": _by_stage(spec), "settings": {s.name: s for s in settings}})


def stored_config(session: Any, run: Any, plan: Any) -> dict[str, Scalar]:
    """The hyper-parameters recorded with the run's first event; for a run from before they
    were, its revision's plan (its settings were not kept)."""
    from muse_plan.plan.io import spec_to_dict
    from muse_plan.store import repo, runs

    first = runs.events_after(session, run.id, 0, limit=1)
    data = json.loads(first[0].data_json) if first and first[0].data_json else {}
    if "config" in data:
        return data["config"]
    spec = repo.spec_of(repo.get_revision(session, plan, run.revision))
    return flatten({"run": {"plan": plan.name, "id": run.id, "revision": run.revision},
                    "plan": _by_stage(spec_to_dict(spec))})


# ---- the mirror ---------------------------------------------------------------------------


class Mirror:
    """The started trackers of one run (live) or one export; points and events go in as the store has them.

    ``strict``: a tracker's error propagates (an export); otherwise the tracker is dropped and
    the failure kept in ``failures`` for the run to record (a run never stops for its mirror)."""

    def __init__(self, strict: bool = False) -> None:
        self.opened: dict[str, Opened] = {}
        self.strict = strict
        self.failures: list[str] = []

    @classmethod
    def open(cls, folders: dict[str, Path], ident: Identity, config: dict[str, Scalar], *, local: bool,
             strict: bool = False) -> Mirror:
        mirror = cls(strict)
        for name, folder in folders.items():
            opened = mirror._guard(name, lambda: TRACKERS[name].open(folder, ident, config, local))
            if opened is not None:
                mirror.opened[name] = opened
        return mirror

    def points(self, stage: str, points: Sequence[Point], times: Sequence[float] | None = None) -> None:
        if points:
            for name, opened in list(self.opened.items()):
                self._guard(name, lambda: opened.scalars(stage, points, times))

    def texts(self, texts: Sequence[Text]) -> None:
        if texts:
            for name, opened in list(self.opened.items()):
                self._guard(name, lambda: opened.texts(texts))

    def close(self, status: str) -> None:
        for name, opened in list(self.opened.items()):
            self._guard(name, lambda: opened.finish(status))
        self.opened.clear()

    def _guard(self, name: str, call: Callable[[], Any]) -> Any:
        """``call()``'s result; None when it failed and the tracker was dropped."""
        try:
            return call()
        except Exception as exc:
            if self.strict:
                raise
            self.opened.pop(name, None)
            first = (str(exc).strip().splitlines() or [""])[0]
            self.failures.append(f"{TRACKERS[name].label} stopped logging ({type(exc).__name__}: {first}); the store "
                                 f"keeps every metric: muse runs export writes them to a tracker later")
            return None


def _texts(events: Iterable[Any], stages: dict[int, str]) -> list[Text]:
    return [Text(e.id, stages.get(e.stage_run_id) if e.stage_run_id is not None else None, e.step or 0, e.kind,
                 e.severity, e.message) for e in events]


def _identity(run: Any, plan: Any, stages: Sequence[Any]) -> Identity:
    started = run.started_at or run.created_at
    return Identity(plan.name, run.id, started.isoformat(), tuple(s.name for s in stages))


# ---- live: the run's trackers ---------------------------------------------------------------


class LiveMirror:
    """A running run's mirror: the Recorder hands it each flushed batch, then it reads the
    run's new events from the store (``sync``); failures become warning events."""

    def __init__(self, mirror: Mirror, store: Any, run_id: int, stages: dict[int, str], since: int,
                 hints: list[str]) -> None:
        self.mirror, self.store, self.run_id, self.stages = mirror, store, run_id, stages
        self.cursor = since - 1  # the newest event already mirrored
        self.hints = hints  # how to look at each tracker: the run's report prints them
        self.reported = 0

    def points(self, stage_run_id: int, points: Sequence[Point]) -> None:
        self.mirror.points(self.stages[stage_run_id], points)

    def sync(self) -> None:
        from muse_plan.store import runs
        from muse_plan.store.models import Run

        new = self.mirror.failures[self.reported:]
        if new:
            self.reported = len(self.mirror.failures)
            with self.store.write() as session:
                run = session.get(Run, self.run_id)
                for text in new:
                    runs.add_event(session, run, text, severity="warning")
        with self.store.read() as session:
            events = runs.events_after(session, self.run_id, self.cursor)
        if events:
            self.cursor = events[-1].id
            self.mirror.texts(_texts(events, self.stages))

    def close(self, status: str) -> None:
        """The run's last events, then each tracker finished with the run's ending."""
        self.sync()
        self.mirror.close(status)
        self.sync()  # a tracker that failed at the end: its event is stored, if no longer mirrored


def open_live(store: Any, run_id: int, names: Sequence[str], since: int = 0,
              say: Callable[[str], None] | None = None) -> LiveMirror:
    """Start the run's trackers under its folder; mirror its events from id ``since`` on
    (0: all; a resumed run's earlier ones were mirrored by the process that wrote them)."""
    from muse_plan.store import runs
    from muse_plan.store.models import Plan, Run

    with store.read() as session:
        run = session.get(Run, run_id)
        plan = session.get(Plan, run.plan_id)
        stages = runs.stage_runs(session, run)
        config = stored_config(session, run, plan)
        ident = _identity(run, plan, stages)
    folders = {name: Path(run.run_dir) / name for name in names}
    # written before MLflow's start sets its URI in the environment
    hint_of = {n: f"{TRACKERS[n].label}: {TRACKERS[n].hint(folders[n], True)}" for n in names}
    mirror = Mirror.open(folders, ident, config, local=True)
    hints = [hint_of[n] for n in names if n in mirror.opened]
    live = LiveMirror(mirror, store, run_id, {s.id: s.name for s in stages}, since, hints)
    logging = ["logging to " + "; ".join(hints)] if hints else []
    with store.write() as session:
        run = session.get(Run, run_id)
        for text in logging:
            runs.add_event(session, run, text)
        for text in mirror.failures:  # a tracker that did not start: the run goes on without it
            runs.add_event(session, run, text, severity="warning")
    live.reported = len(mirror.failures)
    for text in [*("logging to " + h for h in hints), *mirror.failures] if say else []:  # a command a line
        say(text)
    return live


# ---- export: a stored run into a tracker afterwards -------------------------------------------


@dataclass(frozen=True)
class Exported:
    run_id: int
    plan: str
    tracker: str
    folder: Path
    points: int
    events: int
    hint: str


def export_run(store: Any, ref: str, to: str, folder: Path) -> Exported:
    """``muse runs export RUN --to TRACKER DIR``: a run that has stopped, from the store into a
    new tracker folder — the tags, steps, values, hyper-parameters and events a live run logs."""
    from engines.data.train_tokenizer import check_output
    from muse_plan.store import runs
    from muse_plan.store.models import Plan

    exportable = [n for n, k in TRACKERS.items() if k.exports]
    if to not in exportable:
        live = f" ({TRACKERS[to].label} logs a run live only: training.log_with)" if to in TRACKERS else ""
        raise PlanError(f"--to {to!r}: accepted: {', '.join(exportable)}{live}" if to else
                        f"give the tracker to write: --to {' or --to '.join(exportable)}")
    require([to], "--to")
    try:
        folder = check_output(folder, force=False, replaced=None)
    except FileExistsError as exc:
        raise Conflict(str(exc)) from None
    with store.read() as session:
        run = runs.get_run(session, ref)
        if runs.shown_status(run) == "running":
            raise Conflict(f"run {run.id} is still running; export it once it has stopped (it can log live: "
                           f"training.log_with)")
        plan = session.get(Plan, run.plan_id)
        stages = runs.stage_runs(session, run)
        config = stored_config(session, run, plan)
        series = [(s.name, runs.metric_points(session, s.id)) for s in stages]
        texts = _texts(runs.events_after(session, run.id, 0), {s.id: s.name for s in stages})
        status, ident = runs.shown_status(run), _identity(run, plan, stages)
    mirror = Mirror.open({to: folder}, ident, config, local=False, strict=True)
    try:
        for stage, rows in series:
            mirror.points(stage, [(step, name, value) for step, name, value, _ in rows], [t for *_, t in rows])
        mirror.texts(texts)
    except BaseException:
        mirror.strict = False  # the error that stopped the export is the one to see
        mirror.close("failed")
        raise
    mirror.close(status)
    return Exported(run.id, plan.name, to, folder, sum(len(rows) for _, rows in series), len(texts),
                    TRACKERS[to].hint(folder, False))
