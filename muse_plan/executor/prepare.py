"""Before a run exists: every stage checked, the plan fitted to this machine, the run
created (or reopened to resume).

- Everything that can be refused is refused before a run exists: every
  stage's engine must be available and its settings must resolve (a grow
  stage's growth is checked too). A plan that names an engine this version
  lacks fails with that one line.
- A new run is fitted to this machine first (``optimizer.fit``): a plan that
  can't fit is refused unless forced; one that fits only with changes runs
  under the optimizer's revision.
- Resume runs under the plan's head revision, from the first stage not
  completed; a run still alive elsewhere is not resumed twice.
- A new run's first event holds its hyper-parameters (the revision and every
  stage's resolved settings, ``monitor/trackers.run_config``): what its trackers
  and a later ``muse runs export`` log. A tracker the plan names whose package
  is missing is refused here, before the run exists.
"""

from __future__ import annotations

import json
import os
import socket
from dataclasses import replace
from typing import Any

import torch

from engines.contract import TRAINERS, available
from muse_plan.errors import Conflict, NotFound, PlanError
from muse_plan.executor.record import Prepared, View
from engines.contract import StageSetup
from muse_plan.executor.settings import StageSettings, frozen_precision, resolve
from muse_plan.monitor.trackers import require as require_trackers, run_config
from muse_plan.plan.io import spec_to_dict
from muse_plan.plan.kinds import STAGE_KINDS
from muse_plan.plan.spec import PlanSpec
from muse_plan.store import repo, runs
from muse_plan.store.db import Store, muse_home
from muse_plan.store.models import Run


def check_stages(spec: PlanSpec, world_size: int, cuda: bool) -> list[StageSettings]:
    if not spec.stages:
        raise PlanError(f"plan {spec.name!r} has no stages to run")
    settings = []
    for position, stage in enumerate(spec.stages):
        if not available(stage.engine or ""):
            raise PlanError(
                f"stage {stage.name!r} runs on the {stage.engine!r} engine, which this version of muse "
                f"does not have yet; available engines: {', '.join(TRAINERS)}"
            )
        settings.append(stage_settings(spec, position, world_size, cuda))
    return settings


def stage_settings(spec: PlanSpec, position: int, world_size: int, cuda: bool) -> StageSettings:
    """A stage's settings. A grow stage's budget is its operator's fit (LiGO; 0 for
    the copying operators) and its growth is checked here, before a run exists."""
    stage = spec.stages[position]
    if not STAGE_KINDS[stage.kind].trains:
        from muse_plan.executor.grow import check_growth

        stage = stage.model_copy(update={"steps": check_growth(spec, position)})
    return resolve(spec, stage, world_size=world_size, cuda=cuda, bf16=bf16(cuda))


def _head(store: Store, plan_ref: str, run_ref: str | None) -> tuple[Any, Any, PlanSpec]:
    """The plan (of ``run_ref`` when given), its head revision and that revision's spec."""
    with store.read() as session:
        if run_ref is not None:
            plan = session.get(repo.Plan, runs.get_run(session, run_ref).plan_id)
        else:
            plan = repo.get_plan(session, plan_ref)
        revision = repo.get_revision(session, plan)
        return plan, revision, repo.spec_of(revision, check_files=True)  # the run reads them: here, not mid-run


def check_launch(store: Store, plan_ref: str, run_ref: str | None, world_size: int, cuda: bool) -> None:
    """What ``prepare_run`` refuses first, asked by the process that launches the workers: a plan
    that can't run on ``world_size`` processes is one line and exit code 2 there, not a worker's
    error inside the launcher's traceback."""
    _, _, spec = _head(store, plan_ref, run_ref)
    require_trackers(spec.training.log_with)
    check_stages(spec, world_size, cuda)


def prepare_run(store: Store, plan_ref: str, resume: bool, run_ref: str | None, world_size: int,
             cuda: bool, force: bool = False, view: View | None = None, injector: Any = None) -> Prepared:
    plan, revision, spec = _head(store, plan_ref, run_ref)
    require_trackers(spec.training.log_with)  # a tracker's package missing: refused before a run exists
    trained = [s.steps for s in check_stages(spec, world_size, cuda) if STAGE_KINDS[s.kind].trains]
    unreachable = injector.unreachable(max(trained, default=0)) if injector is not None else []
    if unreachable:
        raise PlanError(f"--inject {','.join(unreachable)}: no stage of plan {plan.name!r} reaches that step "
                        f"(its longest trains {max(trained, default=0)} steps), so it would never fire; "
                        "nothing was run")
    if not resume:
        revision, spec = _fit_here(store, plan, revision, spec, world_size, force, view)
    settings = check_stages(spec, world_size, cuda)
    check_data(spec, settings)
    with store.write() as session:
        if resume:
            run, start = _reopen(session, plan, spec, run_ref, revision.number)
        else:
            run = runs.create_run(session, plan, revision.number, [(s.name, s.steps) for s in settings],
                                  str(muse_home() / "runs"))
            start = 0
            device = f"{world_size} GPU process(es)" if cuda else f"{world_size} CPU process(es)"
            # the run's hyper-parameters, kept with its first event: what its trackers (or an export) log
            config = run_config(plan.name, run.id, revision.number, spec_to_dict(spec), settings, world_size,
                                "cuda" if cuda else "cpu")
            runs.add_event(session, run, f"run started under revision {revision.number} on {device}",
                           data={"config": config})
        session.flush()
        stage_ids = [sr.id for sr in runs.stage_runs(session, run)]
        # a resumed run's trackers mirror its events from the resume on; earlier ones were mirrored before
        events_from = runs.newest_event_id(session, run.id) if resume else 0
    return Prepared(run.id, run.run_dir, plan.name, revision.number,
                    json.dumps(spec_to_dict(spec)), start, resume, stage_ids, events_from)


def check_data(spec: PlanSpec, settings: list[StageSettings]) -> None:
    """The plan's tokenizer (``data.tokenizer``) loads and its corpus (``data.source``, a local
    file or folder) is there and readable, asked before a run exists rather than when the first
    stage that reads them starts (every stage reads the tokenizer; the corpus, a stage of muse's
    architecture engine without examples of its own)."""
    if spec.data.tokenizer != "byte":
        from engines.data.tokenizer import load_tokenizer

        try:
            load_tokenizer(spec.data.tokenizer)
        except (ValueError, OSError) as exc:
            raise PlanError(f"data.tokenizer: {exc}") from None
    if spec.data.source == "arithmetic":
        return
    readers = [s.name for s in settings if STAGE_KINDS[s.kind].engine == "architecture"
               and STAGE_KINDS[s.kind].trains and getattr(s.options, "data", None) is None]
    if not readers:
        return
    from engines.data.documents import source_files

    try:
        source_files(spec.data.source)
    except (ValueError, FileNotFoundError) as exc:
        raise PlanError(f"stage {readers[0]!r}: {exc}") from None


def _fit_here(store: Store, plan: Any, revision: Any, spec: PlanSpec, world_size: int, force: bool,
              view: View | None) -> tuple[Any, PlanSpec]:
    """Fit the plan to this machine before a run: refuse what can't fit (unless
    forced); when it fits only with changes, record them as the optimizer's
    revision and run that."""
    from muse_plan.optimizer import fit as fitting

    hw = fitting.this_machine(world_size)
    if hw is None:
        return revision, spec
    result = fitting.fit(spec, hw, alternatives=False)
    say = view.message if view else (lambda text: None)
    if result.verdict == "does_not_fit":
        peak = result.written.peak / 2**30
        text = (f"plan {spec.name!r} does not fit {hw.describe()}: predicted peak {peak:.1f} GiB per device "
                f"with {hw.limit_bytes / 2**30:.1f} GiB usable, and no setting brings it under; "
                f"see the alternatives with: muse plan optimize {spec.name}")
        if not force:
            raise PlanError(text + "; --force runs it anyway")
        say(f"warning: {text}; running anyway (--force)")
        return revision, spec
    if result.verdict == "fits_with_changes":
        reason = f"fitted to {hw.describe()} before run: " + result.describe_changes()
        with store.write() as session:
            done = repo.rewrite_on_head(session, plan.id, revision.number, spec, result.fitted_spec, "optimizer",
                                        reason)
        say(f"revision {done.revision.number} by the optimizer: {reason}")
        return done.revision, done.spec
    return revision, spec


def _reopen(session: Any, plan: Any, spec: PlanSpec, run_ref: str | None, revision: int) -> tuple[Run, int]:
    run = runs.get_run(session, run_ref) if run_ref is not None else runs.latest_unfinished(session, plan)
    if run is None:
        raise NotFound(f"plan {plan.name!r} has no unfinished run to resume; start one with: "
                       f"muse plan run {plan.name}")
    if run.status == "completed":
        raise Conflict(f"run {run.id} already completed; start a new one with: muse plan run {plan.name}")
    if runs.is_alive(run) and run.pid != os.getpid():
        raise Conflict(f"run {run.id} is still running (pid {run.pid} on {run.host})")
    stages = runs.stage_runs(session, run)
    if [s.name for s in stages] != [s.name for s in spec.stages]:
        raise Conflict(f"plan {plan.name!r} has other stages than run {run.id} was started with; "
                       f"start a new run with: muse plan run {plan.name}")
    start = next((s.position for s in stages if s.status != "completed"), len(stages))
    run.status, run.pid, run.error, run.finished_at = "running", os.getpid(), None, None
    run.host, run.current_revision = socket.gethostname(), revision
    under = "" if revision == run.revision else f" under revision {revision} (started under {run.revision})"
    runs.add_event(session, run, f"run resumed at stage {spec.stages[min(start, len(stages) - 1)].name}{under}")
    return run, start


def bf16(cuda: bool) -> bool:
    return cuda and torch.cuda.is_bf16_supported()


def set_up(trainer: Any, spec: PlanSpec, s: StageSettings, accelerator: Any, **overrides: Any) -> None:
    """``trainer.setup`` for stage ``s`` on every process, the main process first (it builds
    and caches the data; the others read its cache); a bad input is the stage's plan error."""
    setup = StageSetup(
        name=s.name, kind=s.kind, model=s.model, options=s.options,
        data_source=spec.data.source, tokenizer=spec.data.tokenizer, val_fraction=spec.data.val_fraction,
        seed=s.seed, micro_batch=s.micro_batch, activation_checkpointing=s.activation_checkpointing,
        rank=accelerator.process_index, world_size=accelerator.num_processes,
        tokens_needed=s.steps * s.tokens_per_step, micro_steps=s.steps * s.grad_accum,
        cache_dir=muse_home() / "cache", device=str(accelerator.device), frozen_precision=frozen_precision(s),
        family=spec.model.family, init_from=spec.model.init_from, decode=s.decode)
    setup = replace(setup, **overrides)
    for turn in (True, False):
        if accelerator.is_main_process == turn:
            try:
                trainer.setup(setup)
            except (ValueError, FileNotFoundError) as exc:
                raise PlanError(f"stage {s.name!r}: {exc}") from None
        accelerator.wait_for_everyone()
