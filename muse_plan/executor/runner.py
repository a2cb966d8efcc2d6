"""``muse plan run``: run a stored plan's stages in order, or resume a run.

Design decisions:
- Every process of a distributed launch runs this same function. Only the
  main process opens the store: it validates the plan, creates (or reopens)
  the run and broadcasts what the others need (run id, folder, the plan's
  JSON, where to start); every write to the store and every checkpoint is
  the main process's.
- Everything that can be refused is refused before a run exists: every
  stage's engine must be available and its settings must resolve. A plan
  that names an engine this version lacks fails with that one line.
- A stage starts from the previous stage's (or ``from_stage``'s) final
  checkpoint, the first from ``model.init_from`` when given; a resumed stage
  starts from its own newest good checkpoint, skipping corrupt ones (each
  skip is recorded as an event and shown).
- Resume runs under the plan's head revision; when a checkpoint was made
  under another revision, resume says so.
"""

from __future__ import annotations

import json
import os
import random
import socket
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Protocol

import numpy as np
import torch

from engines.contract import TRAINERS, StageSetup, available, make_trainer
from muse_plan.errors import Conflict, MuseError, NotFound, PlanError, RunFailed, RunInterrupted
from muse_plan.executor import checkpoint
from muse_plan.executor.loop import Fault, Injector, StepRecord, train_stage
from muse_plan.monitor.detectors import Watch
from muse_plan.recovery.handler import Budget, recover
from engines.architecture.options import ArchitectureOptions
from muse_plan.executor.settings import FSDP_SHARDING, StageSettings, frozen_precision, resolve
from muse_plan.plan.kinds import STAGE_KINDS
from muse_plan.plan.io import spec_from_dict, spec_to_dict
from muse_plan.plan.spec import PlanSpec
from muse_plan.store import repo, runs
from muse_plan.store.db import Store, muse_home
from muse_plan.store.models import Run, StageRun, utcnow

MIXED_PRECISION = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}
# engines whose stages change weights without training → the trainer that gives them data and evaluation
TRANSFORMS = {"growth": "architecture"}


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
    seconds: float


@dataclass
class RunResult:
    run_id: int
    plan: str
    revision: int
    resumed: bool
    main: bool = True  # the main process reports; the others stay quiet
    processes: int = 1
    stages: list[StageResult] = field(default_factory=list)


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


def run_plan(db_url: str | None, plan_ref: str, *, resume: bool = False, run_ref: str | None = None,
             view: View | None = None, force: bool = False, inject: str | None = None,
             probe: bool | None = None) -> RunResult:
    """Run (or resume) a plan on this process and any launched with it. ``probe``: one
    measured step of each stage before the run (``executor/probe.py``); None: on a GPU."""
    from accelerate import PartialState
    from accelerate.utils import broadcast_object_list

    cuda = torch.cuda.is_available()
    state = PartialState(cpu=not cuda)
    store = Store(db_url) if state.is_main_process else None
    decided: list[Any] = [None]
    if store is not None:
        try:
            decided[0] = _prepare(store, plan_ref, resume, run_ref, state.num_processes, cuda, force, view)
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
    injector = Injector(inject or os.environ.get("MUSE_INJECT"))
    try:
        if (cuda if probe is None else probe) and not prepared.resume:
            spec, accelerator = _probe(store, prepared, spec, state.num_processes, cuda, view)
        for position in range(prepared.start, len(spec.stages)):
            resuming = prepared.resume and position == prepared.start
            budget, skip_until = Budget(), None
            while True:
                accelerator = _accelerator_for(accelerator, spec, position, state.num_processes, cuda,
                                               lambda text: _note(store, prepared, position, [text], view, "info"))
                try:
                    result.stages.append(_run_stage(store, accelerator, spec, prepared, position, resuming, view,
                                                    injector, skip_until))
                    break
                except Fault as fault:
                    spec, skip = recover(store, prepared.run_id, prepared.stage_run_ids[position], prepared.plan,
                                         spec, position, fault, budget, accelerator.num_processes,
                                         view.message if view and store is not None else None)
                    prepared.revision += 1
                    resuming, skip_until = True, fault.step if skip else None
    except BaseException as exc:
        where = _mark_stopped(store, prepared, exc) if store is not None else ""
        if isinstance(exc, KeyboardInterrupt) and store is not None:
            raise RunInterrupted(f"run {prepared.run_id} interrupted{where}; resume with: "
                                 f"muse plan run {prepared.plan} --resume") from None
        if isinstance(exc, Fault):
            raise RunFailed(
                f"run {prepared.run_id} stopped: {exc}; resume with: muse plan run {prepared.plan} --resume"
            ) from exc
        raise
    result.revision = prepared.revision
    if store is not None:
        with store.write() as session:
            run = session.get(Run, prepared.run_id)
            run.status, run.finished_at, run.error = "completed", utcnow(), None
            runs.add_event(session, run, "run completed")
        store.close()
    return result


def _probe(store: Store | None, prepared: Prepared, spec: PlanSpec, world_size: int, cuda: bool,
           view: View | None) -> tuple[PlanSpec, Any]:
    """Probe every stage before step 1 (``executor/probe.py``); a stage that does not fit is
    rewritten (a revision by the optimizer) and probed again. The plan to run, and the
    Accelerator the probes left (the first stage reuses it)."""
    from muse_plan.executor.probe import probe_plan

    held: list[Any] = [None]

    def accelerator_for(current_spec: PlanSpec, position: int) -> Any:
        held[0] = _accelerator_for(held[0], current_spec, position, world_size, cuda,
                                   lambda text: _note(store, prepared, position, [text], view, "info"))
        return held[0]

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

    def rewritten(new: PlanSpec, reason: str) -> None:
        prepared.revision += 1
        if store is None:
            return
        with store.write() as session:
            revision = repo.add_revision(session, repo.get_plan(session, prepared.plan), new, "optimizer", reason)
            prepared.revision = revision.number
            runs.add_event(session, session.get(Run, prepared.run_id), f"plan revision {revision.number}: {reason}",
                           kind="rewrite", severity="warning")
        if view:
            view.message(f"revision {prepared.revision} by the optimizer: {reason}")

    spec, _ = probe_plan(spec, lambda current, i: _settings(current, i, world_size, cuda), accelerator_for,
                         muse_home() / "cache", recorded, rewritten)
    return spec, held[0]


def _accelerator_for(current: Any, spec: PlanSpec, position: int, world_size: int, cuda: bool,
                     say: Callable[[str], None]) -> Any:
    """The Accelerator for a stage's precision and sharding: the current one when both
    match, else a new one — a stage of its own precision, or a recovery rewrite (fp16 →
    bf16) takes effect in this process, not at the next launch. The process group is
    kept. ``zero2``/``zero3``/``fsdp`` on several GPUs get Accelerate's FSDP2 plugin
    (``_fsdp_plugin``); on one process there is nothing to shard and they run as AdamW."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    s = _settings(spec, position, world_size, cuda)
    wanted = MIXED_PRECISION[s.precision]
    sharded = s.sharding if cuda and world_size > 1 and s.sharding in FSDP_SHARDING else None
    had = current.mixed_precision if current is not None else None
    if had == wanted and getattr(current, "muse_fsdp", None) == sharded:
        return current
    # the state is a process-wide singleton whose mixed precision can't change in
    # place (an earlier run in this process may have left another one)
    AcceleratorState._reset_state()
    from accelerate import PartialState
    from accelerate.utils import DistributedType

    partial = PartialState()
    if partial.distributed_type == DistributedType.FSDP:  # an FSDP stage's, which a new state would keep
        partial.distributed_type = DistributedType.MULTI_GPU
    if current is not None:
        say(f"stage {spec.stages[position].name} runs in {_precision_text(s.precision, sharded)} "
            f"(was {_precision_text(had, getattr(current, 'muse_fsdp', None))})")
    plugin = _fsdp_plugin(sharded, s.precision) if sharded else None
    accelerator = Accelerator(mixed_precision=wanted, cpu=not cuda, fsdp_plugin=plugin)
    accelerator.muse_fsdp = sharded
    return accelerator


def _precision_text(precision: str | None, sharded: str | None) -> str:
    return f"{precision} with {sharded} (FSDP)" if sharded else str(precision)


def _fsdp_plugin(sharding: str, precision: str) -> Any:
    """FSDP2, each transformer block a unit (named at prepare: ``optimizers.prepare``);
    zero2 keeps a block's weights gathered from forward to backward, zero3/fsdp reshard
    them. Under bf16/fp16 the gathered weights are in that dtype and gradients are
    reduced in fp32, as DDP's are; the sharded weights and AdamW stay fp32."""
    from accelerate.utils import FullyShardedDataParallelPlugin

    policy = None
    if precision != "fp32":
        from torch.distributed.fsdp import MixedPrecisionPolicy

        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
        policy = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
    return FullyShardedDataParallelPlugin(
        fsdp_version=2, reshard_after_forward=sharding != "zero2", auto_wrap_policy="transformer_based_wrap",
        state_dict_type="FULL_STATE_DICT", mixed_precision_policy=policy, cpu_ram_efficient_loading=False)


def _bf16(cuda: bool) -> bool:
    return cuda and torch.cuda.is_bf16_supported()


def _check_stages(spec: PlanSpec, world_size: int, cuda: bool) -> list[StageSettings]:
    if not spec.stages:
        raise PlanError(f"plan {spec.name!r} has no stages to run")
    settings = []
    for position, stage in enumerate(spec.stages):
        if not available(stage.engine or "") and stage.engine not in TRANSFORMS:
            raise PlanError(
                f"stage {stage.name!r} runs on the {stage.engine!r} engine, which this version of muse "
                f"does not have yet; available engines: {', '.join(TRAINERS)}"
            )
        settings.append(_settings(spec, position, world_size, cuda))
    return settings


def _settings(spec: PlanSpec, position: int, world_size: int, cuda: bool) -> StageSettings:
    """A stage's settings. A grow stage's budget is its operator's fit (LiGO; 0 for
    the copying operators) and its growth is checked here, before a run exists."""
    stage = spec.stages[position]
    if stage.engine in TRANSFORMS:
        from muse_plan.executor.grow import check_growth

        stage = stage.model_copy(update={"steps": check_growth(spec, position)})
    return resolve(spec, stage, world_size=world_size, cuda=cuda, bf16=_bf16(cuda))


def _prepare(store: Store, plan_ref: str, resume: bool, run_ref: str | None, world_size: int,
             cuda: bool, force: bool = False, view: View | None = None) -> Prepared:
    with store.read() as session:
        if run_ref is not None:
            plan = session.get(repo.Plan, runs.get_run(session, run_ref).plan_id)
        else:
            plan = repo.get_plan(session, plan_ref)
        revision = repo.get_revision(session, plan)
        spec = repo.spec_of(revision)
    _check_stages(spec, world_size, cuda)
    if not resume:
        revision, spec = _fit_here(store, plan, revision, spec, world_size, force, view)
    settings = _check_stages(spec, world_size, cuda)
    with store.write() as session:
        if resume:
            run, start = _reopen(session, plan, spec, run_ref)
        else:
            run = runs.create_run(session, plan, revision.number, [(s.name, s.steps) for s in settings],
                                  str(muse_home() / "runs"))
            start = 0
            device = f"{world_size} GPU process(es)" if cuda else f"{world_size} CPU process(es)"
            runs.add_event(session, run, f"run started under revision {revision.number} on {device}")
        stage_ids = [sr.id for sr in runs.stage_runs(session, run)]
    return Prepared(run.id, run.run_dir, plan.name, revision.number,
                    json.dumps(spec_to_dict(spec)), start, resume, stage_ids)


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
        fitted = result.fitted_spec
        reason = f"fitted to {hw.describe()} before run: " + result.describe_changes()
        with store.write() as session:
            revision = repo.add_revision(session, repo.get_plan(session, plan.id), fitted, "optimizer", reason)
        say(f"revision {revision.number} by the optimizer: {reason}")
        return revision, fitted
    return revision, spec


def _reopen(session: Any, plan: Any, spec: PlanSpec, run_ref: str | None) -> tuple[Run, int]:
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
    run.host = socket.gethostname()
    runs.add_event(session, run, f"run resumed at stage {spec.stages[min(start, len(stages) - 1)].name}")
    return run, start


def _seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _run_stage(store: Store | None, accelerator: Any, spec: PlanSpec, prepared: Prepared, position: int,
               resuming: bool, view: View | None, injector: Injector | None = None,
               skip_until: int | None = None) -> StageResult:
    stage = spec.stages[position]
    s = _settings(spec, position, accelerator.num_processes, accelerator.device.type == "cuda")
    if stage.engine not in TRANSFORMS:  # built as the checkpoint it starts from was saved (norm eps, rope …)
        s = replace(s, model=s.model.as_saved(_saved_config(spec, prepared, position, resuming)))
    _seed(s.seed + position)
    trainer = make_trainer(TRANSFORMS.get(stage.engine or "", stage.engine or ""))
    setup = StageSetup(
        # a grow stage's trainer is the architecture engine's at the grown shape (data, evaluation)
        name=stage.name, kind=stage.kind, model=s.model,
        options=ArchitectureOptions() if stage.engine in TRANSFORMS else s.options,
        data_source=spec.data.source, tokenizer=spec.data.tokenizer, val_fraction=spec.data.val_fraction,
        seed=s.seed, micro_batch=s.micro_batch, activation_checkpointing=s.activation_checkpointing,
        rank=accelerator.process_index,
        world_size=accelerator.num_processes, tokens_needed=s.steps * s.tokens_per_step,
        micro_steps=s.steps * s.grad_accum,
        cache_dir=muse_home() / "cache", device=str(accelerator.device),
        frozen_precision=frozen_precision(s), family=spec.model.family, init_from=spec.model.init_from,
    )
    # the main process builds (and caches) the data first, so the others read its cache
    for turn in (True, False):
        if accelerator.is_main_process == turn:
            try:
                trainer.setup(setup)
            except (ValueError, FileNotFoundError) as exc:
                raise PlanError(f"stage {stage.name!r}: {exc}") from None
        accelerator.wait_for_everyone()
    if stage.engine in TRANSFORMS:
        from muse_plan.executor.grow import grow_stage

        return grow_stage(store, accelerator, spec, prepared, position, s, trainer, view)
    run_dir = Path(prepared.run_dir)
    start = _starting_point(store, accelerator, spec, prepared, position, resuming, trainer, view)
    meta = {"plan": prepared.plan, "revision": prepared.revision, "run": prepared.run_id, "stage": stage.name,
            **model_meta(trainer.model)}
    hooks = None
    if store is not None:
        hooks = Recorder(store, prepared.run_id, prepared.stage_run_ids[position], view)
        if view:
            view.stage_started(stage.name, s.steps, start.step if start else 0)
    t0 = time.perf_counter()
    watch = Watch(spec.alerts, _capacity_gib(accelerator), STAGE_KINDS[stage.kind].explosion_factor)
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
        _note(store, prepared, position, [f"stage {stage.name} stopped early at step {steps} of {s.steps}: "
                                          "its engine's stopping rule"], view, severity="info")
    if store is not None:
        summary = trainer.summary()
        metrics.update(summary)
        hooks.finish(steps, summary, checkpoint.step_dir(run_dir / stage.name, steps))
        if view:
            view.stage_finished(stage.name)
    return StageResult(stage.name, steps, metrics, time.perf_counter() - t0)


def model_meta(model: Any) -> dict[str, Any]:
    """The manifest's ``model_config``: the full config the weights were built with,
    so a later stage (or a resume) builds exactly that model; {} for a model without one."""
    from dataclasses import asdict

    from engines.architecture.config import ModelConfig

    config = getattr(model, "config", None)
    return {"model_config": asdict(config)} if isinstance(config, ModelConfig) else {}


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


def _starting_point(store: Store | None, accelerator: Any, spec: PlanSpec, prepared: Prepared,
                    position: int, resuming: bool, trainer: Any,
                    view: View | None) -> checkpoint.Loaded | None:
    """Load the weights this stage starts from; the checkpoint when resuming."""
    run_dir = Path(prepared.run_dir)
    stage = spec.stages[position]
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
            notes.append(f"no usable checkpoint for stage {stage.name}; starting it from its beginning")
        _note(store, prepared, position, notes, view, severity="warning" if skipped else "info")
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


def _note(store: Store | None, prepared: Prepared, position: int, notes: list[str], view: View | None,
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


def _mark_stopped(store: Store, prepared: Prepared, exc: BaseException) -> str:
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
    """Loop hooks that write a stage's metrics to the store in batches (main process)."""

    def __init__(self, store: Store, run_id: int, stage_run_id: int, view: View | None,
                 flush_seconds: float = 2.0) -> None:
        self.store, self.run_id, self.stage_run_id, self.view = store, run_id, stage_run_id, view
        self.flush_seconds = flush_seconds
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

    def flush(self, checkpoint: str | None = None, **updates: Any) -> None:
        with self.store.write() as session:
            runs.add_metrics(session, self.run_id, self.stage_run_id, self.buffer)
            sr = session.get(StageRun, self.stage_run_id)
            sr.step = self.step
            if checkpoint is not None:
                sr.checkpoint = checkpoint
            for key, value in updates.items():
                setattr(sr, key, value)
        self.buffer = []
        self.last_flush = time.monotonic()

    def finish(self, step: int, summary: dict[str, float], final: Path) -> None:
        self.buffer += [(step, name, value) for name, value in summary.items()]
        self.flush(checkpoint=str(final), status="completed", finished_at=utcnow())
