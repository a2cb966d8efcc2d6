"""``muse plan run``: run a stored plan's stages in order, or resume a run.

Design decisions:
- Every process of a distributed launch runs this same function. Only the
  main process opens the store: it prepares the run (``prepare.py``) and
  broadcasts what the others need; every write to the store and every
  checkpoint is the main process's (``record.py``).
- Before step 1 of a new run every stage can be probed (``probe.py``; on a
  GPU by default): a stage that does not fit is rewritten first.
- A stage starts from the previous stage's (or ``from_stage``'s) final
  checkpoint, the first from ``model.init_from`` when given; a resumed stage
  starts from its own newest good checkpoint, skipping corrupt ones (each
  skip is recorded as an event and shown). Either way the stage builds the
  model that checkpoint's manifest describes.
- Resume runs under the plan's head revision; when a checkpoint was made
  under another revision, resume says so.
- ``training.log_with``: the run's trackers are started once, beside the store
  (main process), and outlive the Accelerators its stages build; each stage's
  Recorder feeds them, and they are finished with the run's ending
  (``monitor/trackers.py``).
- The modules: ``prepare`` (checks, fit, the run row), ``accelerators``
  (precision, FSDP), ``record`` (store writes, the view), ``grow`` (a grow
  stage), ``probe``, and this one, the stage loop around the engines.
"""

from __future__ import annotations

import json
import os
import random
import signal
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from engines.contract import make_trainer
from muse_plan.errors import MuseError, PlanError, RunFailed, RunInterrupted
from muse_plan.executor import checkpoint
from muse_plan.executor.accelerators import accelerator_for
from muse_plan.executor.loop import STOP, Fault, Injector, train_stage
from muse_plan.executor.prepare import prepare_run, set_up, stage_settings
from muse_plan.executor.record import (Prepared, Recorder, RunResult, StageResult, View, mark_stopped, note,
                                       stage_meta)
from muse_plan.monitor.detectors import Watch
from muse_plan.monitor.trackers import LiveMirror, open_live
from muse_plan.plan.io import spec_from_dict, spec_to_dict
from muse_plan.plan.kinds import STAGE_KINDS
from muse_plan.plan.spec import PlanSpec
from muse_plan.recovery.handler import Budget, recover
from muse_plan.store import repo, runs
from muse_plan.store.db import Store, muse_home
from muse_plan.store.models import Run, utcnow


def run_plan(db_url: str | None, plan_ref: str, *, resume: bool = False, run_ref: str | None = None,
             view: View | None = None, force: bool = False, inject: str | None = None,
             probe: bool | None = None) -> RunResult:
    """Run (or resume) a plan on this process and any launched with it. ``probe``: one
    measured step of each stage before the run (``executor/probe.py``); None: on a GPU."""
    from accelerate import PartialState
    from accelerate.utils import broadcast_object_list

    t0 = time.perf_counter()
    cuda = torch.cuda.is_available()
    state = PartialState(cpu=not cuda)
    store = Store(db_url) if state.is_main_process else None
    decided: list[Any] = [None]
    injector = Injector(inject or os.environ.get("MUSE_INJECT"))
    if store is not None:
        try:
            decided[0] = prepare_run(store, plan_ref, resume, run_ref, state.num_processes, cuda, force, view,
                                     injector)
        except MuseError as exc:
            decided[0] = exc
    if state.num_processes > 1:
        broadcast_object_list(decided, from_process=0)
    if isinstance(decided[0], MuseError):
        raise decided[0]
    prepared: Prepared = decided[0]
    spec = spec_from_dict(json.loads(prepared.spec_json), "the plan")
    accelerator = None
    result = RunResult(prepared.run_id, prepared.plan, prepared.revision, prepared.resume,
                       main=state.is_main_process, processes=state.num_processes)
    mirror = None  # the run's trackers (training.log_with): main process, beside the store
    previous = _stop_between_steps()
    try:
        if store is not None and spec.training.log_with:
            mirror = open_live(store, prepared.run_id, spec.training.log_with, prepared.events_from,
                               view.message if view else None)
            result.tracking = mirror.hints
        if (cuda if probe is None else probe) and not prepared.resume:
            spec, accelerator = _probe(store, prepared, spec, state.num_processes, cuda, view)
            if state.num_processes > 1:
                spec, prepared.revision = _shared(spec, prepared.revision)
        for position in range(prepared.start, len(spec.stages)):
            resuming = prepared.resume and position == prepared.start
            budget, skip_until, began, starts = Budget(), None, time.perf_counter(), []
            while True:
                accelerator = accelerator_for(accelerator, spec, position, state.num_processes, cuda,
                                               lambda text: note(store, prepared, position, [text], view, "info"))
                try:
                    done = _run_stage(store, accelerator, spec, prepared, position, resuming, view, injector,
                                      skip_until, starts, mirror)
                    # this process's whole part of the stage: from where it first started, faults included
                    result.stages.append(replace(done, seconds=time.perf_counter() - began,
                                                 start_step=starts[0] if starts else 0, faults=len(budget.tried)))
                    break
                except Fault as fault:
                    spec, skip, prepared.revision = recover(
                        store, prepared.run_id, prepared.stage_run_ids[position], prepared.plan, spec, position,
                        fault, budget, accelerator.num_processes, view.message if view and store is not None
                        else None, prepared.revision, injector.take_fired())
                    if state.num_processes > 1:  # the main process laid it on the head: all go on with that
                        spec, prepared.revision = _shared(spec, prepared.revision)
                    resuming, skip_until = True, fault.step if skip else None
    except BaseException as exc:
        where = mark_stopped(store, prepared, exc) if store is not None else ""
        if mirror is not None:  # the stop's events too, and each tracker told how the run ended
            mirror.close("interrupted" if isinstance(exc, KeyboardInterrupt) else "failed")
        if isinstance(exc, KeyboardInterrupt) and store is not None:
            raise RunInterrupted(f"run {prepared.run_id} interrupted{where}; resume with: "
                                 f"muse plan run {prepared.plan} --resume") from None
        if isinstance(exc, Fault):
            raise RunFailed(
                f"run {prepared.run_id} stopped: {exc}; resume with: muse plan run {prepared.plan} --resume"
            ) from exc
        raise
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
    result.revision = prepared.revision
    result.seconds = time.perf_counter() - t0
    if store is not None:
        with store.write() as session:
            run = session.get(Run, prepared.run_id)
            run.status, run.finished_at, run.error = "completed", utcnow(), None
            run.current_revision = prepared.revision
            runs.add_event(session, run, f"run completed under revision {prepared.revision}")
            result.head = session.get(repo.Plan, run.plan_id).head
            result.run_seconds = (run.finished_at - run.started_at).total_seconds() if run.started_at else None
        if mirror is not None:
            mirror.close("completed")
        store.close()
    return result


def _shared(spec: PlanSpec, revision: int) -> tuple[PlanSpec, int]:
    """The main process's plan and revision number, on every process."""
    from accelerate.utils import broadcast_object_list

    box: list[Any] = [json.dumps(spec_to_dict(spec)), revision]
    broadcast_object_list(box, from_process=0)
    return spec_from_dict(json.loads(box[0]), "the plan"), int(box[1])


def _stop_between_steps() -> Any:
    """Ctrl-C sets ``loop.STOP`` (the loop stops at the next step boundary); a second one
    interrupts at once. Returns the handler it replaced (None off the main thread)."""
    STOP.clear()
    if threading.current_thread() is not threading.main_thread():
        return None

    def handler(signum: int, frame: Any) -> None:
        if STOP.is_set():
            raise KeyboardInterrupt
        STOP.set()

    return signal.signal(signal.SIGINT, handler)


def _probe(store: Store | None, prepared: Prepared, spec: PlanSpec, world_size: int, cuda: bool,
           view: View | None) -> tuple[PlanSpec, Any]:
    """Probe every stage before step 1 (``executor/probe.py``); a stage that does not fit is
    rewritten (a revision by the optimizer) and probed again. The plan to run, and the
    Accelerator the probes left (the first stage reuses it)."""
    from muse_plan.executor.probe import probe_plan

    def recorded(result: Any) -> None:
        if store is None:
            return
        position = next(i for i, s in enumerate(spec.stages) if s.name == result.stage)
        with store.write() as session:
            runs.add_event(session, session.get(Run, prepared.run_id), result.describe(), kind="probe",
                           severity="info" if result.fits else "warning",
                           stage_run_id=prepared.stage_run_ids[position], data=result.data())
        if view:
            view.message(result.describe())

    def rewritten(new: PlanSpec, reason: str) -> PlanSpec:
        if store is None:  # the main process's revision and plan reach this one after the probes
            prepared.revision += 1
            return new
        with store.write() as session:
            done = repo.rewrite_on_head(session, prepared.plan, prepared.revision, base[0], new, "optimizer", reason)
            prepared.revision = done.revision.number
            run = session.get(Run, prepared.run_id)
            run.current_revision = done.revision.number
            session.add(run)
            runs.add_event(session, run, f"plan revision {done.revision.number}: {reason}" +
                           (f"; {done.describe()}" if done.merged else ""), kind="rewrite", severity="warning")
        if view:
            view.message(f"revision {prepared.revision} by the optimizer: {reason}")
        base[0] = done.spec
        return done.spec

    base = [spec]  # the revision the run is under: what the next rewrite is computed from

    spec, _, accelerator = probe_plan(
        spec, world_size, cuda, muse_home() / "cache", recorded, rewritten,
        lambda position, text: note(store, prepared, position, [text], view, "info"))
    return spec, accelerator


def _seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _run_stage(store: Store | None, accelerator: Any, spec: PlanSpec, prepared: Prepared, position: int,
               resuming: bool, view: View | None, injector: Injector | None = None,
               skip_until: int | None = None, starts: list[int] | None = None,
               mirror: LiveMirror | None = None) -> StageResult:
    """One attempt at a stage; ``starts`` gets the step it started from; ``mirror``: the
    run's trackers, fed where the store is."""
    stage = spec.stages[position]
    s = stage_settings(spec, position, accelerator.num_processes, accelerator.device.type == "cuda")
    trains = STAGE_KINDS[stage.kind].trains
    if trains:  # built as the checkpoint it starts from was saved (norm eps, rope …)
        s = replace(s, model=s.model.as_saved(_saved_config(spec, prepared, position, resuming)))
    _seed(s.seed + position)
    trainer = make_trainer(stage.engine or "")
    set_up(trainer, spec, s, accelerator)
    if not trains:  # a grow stage: the engine changes the weights, the loop does not run
        from muse_plan.executor.grow import grow_stage

        return grow_stage(store, accelerator, spec, prepared, position, s, trainer, view, mirror)
    run_dir = Path(prepared.run_dir)
    start = _starting_point(store, accelerator, spec, prepared, position, resuming, trainer, view)
    if starts is not None:
        starts.append(start.step if start else 0)
    meta = stage_meta(prepared, stage.name, trainer.model)
    if s.adapters_only:  # the base is model.init_from's as it is: checkpoints hold the adapters
        base = Path(spec.model.init_from or "").expanduser().resolve()
        meta.update(weights=checkpoint.ADAPTERS, base_model=str(base))
    hooks = None
    if store is not None:
        hooks = Recorder(store, prepared.run_id, prepared.stage_run_ids[position], view, mirror=mirror)
        if view:
            view.stage_started(stage.name, s.steps, start.step if start else 0)
    t0 = time.perf_counter()
    kind = STAGE_KINDS[stage.kind]
    watch = Watch(spec.alerts, _capacity_gib(accelerator), kind.explosion_factor,
                  clip_grad_norm=s.clip_grad_norm, loss_alerts=kind.loss_alerts)
    if s.plateau is not None:  # end the stage at a loss plateau; the next (grow) stage starts there
        from muse_plan.executor.grow import GrowOnPlateau

        trainer = GrowOnPlateau(trainer, s.plateau_window, s.grad_accum)
    # a stage after a growth with optimizer_state: mapped starts from the mapped moments
    from muse_plan.executor.grow import mapped_optimizer_state

    initial = None if start is not None else mapped_optimizer_state(spec, prepared, position, accelerator,
                                                                    trainer.model, s)
    try:
        metrics = train_stage(trainer, s, accelerator, run_dir / stage.name, meta, hooks, start, watch=watch,
                              injector=injector, skip_until=skip_until, initial_optimizer_state=initial)
    except KeyboardInterrupt:
        if hooks is not None:  # keep the steps trained since the last flush: monitor and report show them
            hooks.flush()
        raise
    steps = int(metrics.pop("stopped_at_step", s.steps))  # the engine's stopping rule may end it early
    if steps < s.steps:
        note(store, prepared, position, [f"stage {stage.name} stopped early at step {steps} of {s.steps}: "
                                          "its engine's stopping rule"], view, severity="info")
    if store is not None:
        summary = trainer.summary()
        metrics.update(summary)
        hooks.finish(steps, summary, checkpoint.step_dir(run_dir / stage.name, steps))
        if view:
            view.stage_finished(stage.name)
    return StageResult(stage.name, steps, metrics, time.perf_counter() - t0, start.step if start else 0)


def _saved_config(spec: PlanSpec, prepared: Prepared, position: int, resuming: bool) -> dict[str, Any] | None:
    """The model config in the manifest of the checkpoint this stage will start from
    (its own newest when resuming, else its source stage's newest); None without one."""
    stage, run_dir = spec.stages[position], Path(prepared.run_dir)
    found = checkpoint.checkpoints(run_dir / stage.name) if resuming else []
    if not found:
        source = stage.from_stage or (spec.stages[position - 1].name if position else None)
        found = checkpoint.checkpoints(run_dir / source) if source else []
    try:
        return json.loads((found[0] / checkpoint.MANIFEST).read_text()).get("model_config") if found else None
    except (OSError, ValueError, AttributeError):
        return None  # the loader reports a corrupt checkpoint in its own words


def _capacity_gib(accelerator: Any) -> float:
    if accelerator.device.type == "cuda":
        return torch.cuda.get_device_properties(accelerator.device).total_memory / 2**30
    import psutil

    return psutil.virtual_memory().total / 2**30


def _has_lora(model: torch.nn.Module) -> bool:
    return any("lora_" in name for name, _ in model.named_parameters())


def _starting_point(store: Store | None, accelerator: Any, spec: PlanSpec, prepared: Prepared,
                    position: int, resuming: bool, trainer: Any,
                    view: View | None) -> checkpoint.Loaded | None:
    """Load the weights this stage starts from; the checkpoint when resuming."""
    run_dir = Path(prepared.run_dir)
    stage = spec.stages[position]
    found = checkpoint.checkpoints(run_dir / stage.name) if resuming else []
    held = checkpoint.holds_lora(found[0]) if found else None
    if held is not None and held != _has_lora(trainer.model):
        now = "through LoRA" if _has_lora(trainer.model) else "on every weight"
        note(store, prepared, position, [f"stage {stage.name} now trains {now} (revision {prepared.revision}), "
                                         f"which its checkpoints don't hold: restarting it from step 0"], view,
             severity="info")
        resuming = False
    if resuming:
        start, skipped = checkpoint.load_latest(run_dir / stage.name, trainer.model)
        notes = [f"checkpoint {why}; trying an older one" for why in skipped]
        if start is not None:
            notes.append(f"resuming stage {stage.name} from {start.path.name}")
            made_under = start.manifest.get("revision")
            if made_under != prepared.revision:
                notes.append(f"checkpoint was made under revision {made_under}; "
                             f"continuing under revision {prepared.revision}")
        elif skipped:
            notes.append(f"no usable checkpoint for stage {stage.name}; restarting it from step 0")
        else:
            notes.append(f"restarting stage {stage.name} from step 0 (no checkpoint yet)")
        note(store, prepared, position, notes, view, severity="warning" if skipped else "info")
        if start is not None:
            return start
    source = stage.from_stage or (spec.stages[position - 1].name if position else None)
    # the part of the model earlier weights fit (RKDO's text encoder: its decoder); None: none does
    target = getattr(trainer, "init_module", trainer.model)
    if target is None:
        return None
    try:
        if source is not None:
            found = checkpoint.checkpoints(run_dir / source)
            if not found:
                raise PlanError(f"stage {stage.name!r} starts from stage {source!r}, which has no checkpoint")
            checkpoint.load_weights(found[0], target)
        elif spec.model.init_from and spec.model.family == "decoder":  # an hf model loads itself
            checkpoint.load_weights(Path(spec.model.init_from).expanduser(), target)
    except checkpoint.CorruptCheckpoint as exc:
        raise PlanError(f"stage {stage.name!r}: {exc}") from None
    return None
