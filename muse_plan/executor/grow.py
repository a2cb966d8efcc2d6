"""The runner's path for a ``grow`` stage: grow the previous stage's model, save it.

A grow stage trains nothing (its plan budget is empty; LiGO's short operator
fit is the growth engine's business, ``engines/growth/ligo.py``), so it does
not go through the training loop. The runner sets up the growth engine's
trainer like any engine's (``engines/growth/trainer.py``: the architecture
engine's data and evaluation at the grown shape, inside) and hands over
here; this module reads and writes the checkpoints and the optimizer-state
formats, and the trainer's ``grow`` changes the weights.

Design decisions:
- Everything a growth can refuse (unknown options, ``optimizer_state:
  mapped`` with LiGO, shapes the operator can't join) is checked with the plan's other
  stages before a run exists (``check_growth``), as a plan error.
- One process grows; the result is written with the executor's checkpoint
  writer as the stage's checkpoint ``step-N`` (N = the fit's steps, 0 for
  the copying operators), so the next stage, on every process, starts from
  it like from any stage's result and a resumed run never grows twice. A
  grow stage cut short is redone from the small model's checkpoint (the
  operators are deterministic for a seed).
- The growth is recorded as an event ("grew 2×32 … → 8×32 … by g_stack:
  val loss a → b") and its metrics (val loss before and after, LiGO's first
  and last fit loss) as the stage's metric points.
- ``optimizer_state: mapped``: the grow stage reads the optimizer state of
  the small stage's final checkpoint, names each entry by the parameter it
  belongs to (the order of the optimizer's two groups,
  ``optimizers.param_groups``, over a small model built on the meta device;
  FSDP's state is keyed by name already), has the growth engine carry the moments through the operator by
  name, and writes them, by name, into its checkpoint as
  ``state["mapped_optimizer"]`` (a key of its own: a training stage's
  ``optimizer`` is never carried into the next stage). The stage after it
  (``mapped_optimizer_state``) turns them into the full optimizer state its
  own optimizer loads (``optimizers.load_state``: AdamW's indices, or names
  under FSDP) with its own lr and weight decay, whenever it starts from the
  beginning, a resumed start included (``train_stage``'s
  ``initial_optimizer_state``). Parameters without moments (new ones, or
  those the function-preserving rewrite replaced) start fresh.
- Growth on a plateau instead of at a planned token count: a training stage
  with the option ``grow_on_plateau`` (true, or the window in steps) ends at
  the first evaluation after the monitor's plateau rule (``Plateau``: the
  mean loss of the last window improved by less than 1% on the window
  before; window: the option, else the plan's ``plateau`` alert threshold,
  else 200) fires on its training loss; its checkpoint there is its result,
  so the grow stage after it starts then. ``stop_on_plateau`` does the same
  for any training stage: the plan allows it to end early on a plateau and
  the next stage starts from there. It goes through the loop's engine
  stopping rule (``should_stop``), asked at evaluations only, so the loss
  tensors it keeps are read when the host syncs anyway. The detector's
  windows are not checkpointed: a resumed stage refills them.
"""

from __future__ import annotations

import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from muse_plan.errors import PlanError
from muse_plan.executor import checkpoint
from muse_plan.executor.record import Prepared, Recorder, StageResult, View, note, stage_meta
from muse_plan.executor.settings import StageSettings, engine_options, model_config
from muse_plan.monitor.detectors import Finding, Plateau
from muse_plan.plan.spec import PlanSpec
from muse_plan.store.db import Store


def check_growth(spec: PlanSpec, position: int) -> int:
    """Refuse a growth the plan can't make; the grow stage's steps (LiGO's fit, else 0)."""
    from engines.growth.schedule import check_growth as check_shapes

    stage = spec.stages[position]
    if position == 0 and stage.from_stage is None:
        raise PlanError(f"stage {stage.name!r} grows the model of the stage before it, but it is the first stage")
    source = spec.stage(stage.from_stage) if stage.from_stage else spec.stages[position - 1]
    try:
        grow = engine_options(spec, stage)
        if grow.mapped and source.engine == "growth":
            raise ValueError(f"optimizer_state 'mapped' carries the moments of a training stage, but "
                             f"{source.name!r} is a grow stage; grow from a stage that trains")
        check_shapes(grow.operator, model_config(spec, source), model_config(spec, stage))
    except ValueError as exc:
        raise PlanError(f"stage {stage.name!r}: {exc}") from None
    return grow.trains


def grow_stage(store: Store | None, accelerator: Any, spec: PlanSpec, prepared: Prepared, position: int,
               s: StageSettings, trainer: Any, view: View | None, mirror: Any = None) -> StageResult:
    """Grow the source stage's final weights into ``trainer.model``'s shape and save them;
    its metrics reach the run's trackers (``mirror``) as a trained stage's do."""
    stage, run_dir = spec.stages[position], Path(prepared.run_dir)
    source = stage.from_stage or spec.stages[position - 1].name
    found = checkpoint.checkpoints(run_dir / source)
    if not found:
        raise PlanError(f"stage {stage.name!r} grows stage {source!r}'s model, which has no checkpoint")
    if store is not None and view:
        view.stage_started(stage.name, s.steps, 0)
    t0, report = time.perf_counter(), None
    path = checkpoint.step_dir(run_dir / stage.name, s.steps)
    if accelerator.is_main_process:
        options = engine_options(spec, stage)
        small_config = model_config(spec, spec.stage(source))
        try:
            moments = _small_moments(found[0], small_config) if options.mapped else None
            report = trainer.grow(small_config, lambda small: checkpoint.load_weights(found[0], small),
                                  accelerator.autocast, moments, fit_clip=s.clip_grad_norm)
        except (ValueError, checkpoint.CorruptCheckpoint) as exc:
            raise PlanError(f"stage {stage.name!r}: {exc}") from None
        meta = stage_meta(prepared, stage.name, trainer.model)  # the grown model's own config (a width
        # growth rescales norm_eps)
        state = {"engine": trainer.state_dict(), "rng": checkpoint.rng_state()}
        if report.moments is not None:  # by parameter name; the next stage makes its optimizer's form
            state["mapped_optimizer"] = report.moments
        checkpoint.save(run_dir / stage.name, s.steps, trainer.model, state, meta)
    accelerator.wait_for_everyone()
    if store is not None and report is not None:
        hooks = Recorder(store, prepared.run_id, prepared.stage_run_ids[position], view, mirror=mirror)
        hooks.on_start(0)
        hooks.on_eval(s.steps, report.metrics)
        hooks.finish(s.steps, {}, path)
        note(store, prepared, position, [report.summary], view, severity="info")
        if view:
            view.stage_finished(stage.name)
    return StageResult(stage.name, s.steps, report.metrics if report else {}, time.perf_counter() - t0)


def _param_names(model: torch.nn.Module) -> list[list[str]]:
    """Parameter names per group, in the order of the executor's optimizers
    (``optimizers.param_groups``: matrices, then vectors and scalars)."""
    from muse_plan.executor.optimizers import param_groups

    names = {id(p): n for n, p in model.named_parameters()}
    return [[names[id(p)] for p in group["params"]] for group in param_groups(model, 0.0)]


def _state(path: Path) -> dict[str, Any]:
    """The non-weight state of a verified checkpoint."""
    checkpoint.verify(path)
    try:
        return torch.load(path / checkpoint.STATE, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise checkpoint.CorruptCheckpoint(f"{path.name}: {exc}") from None


def _small_moments(path: Path, config: Any) -> dict[str, dict[str, torch.Tensor]]:
    """The small stage's AdamW state keyed by parameter name (from torch AdamW's
    index-keyed format, or FSDP's name-keyed one)."""
    from engines.growth.stage import skeleton

    saved = _state(path).get("optimizer")
    if saved is None:
        raise ValueError(f"optimizer_state 'mapped' needs the optimizer state of {path.parent.name}'s "
                         f"checkpoint {path.name}, which has none")
    names = _param_names(skeleton(config))
    if all(isinstance(k, str) for k in saved["state"]):  # FSDP's full state: keyed by name already
        return {n: saved["state"][n] for group in names for n in group if n in saved["state"]}
    groups = saved["param_groups"]
    if [len(g["params"]) for g in groups] != [len(n) for n in names]:
        raise ValueError(f"the optimizer state of {path.parent.name}/{path.name} does not match its model "
                         f"({[len(g['params']) for g in groups]} parameters per group, the model "
                         f"{[len(n) for n in names]})")
    return {name: saved["state"][index] for group, group_names in zip(groups, names)
            for index, name in zip(group["params"], group_names) if index in saved["state"]}


def _as_optimizer_state(moments: dict[str, dict[str, torch.Tensor]], model: torch.nn.Module,
                        s: StageSettings, by_name: bool) -> dict[str, Any]:
    """Name-keyed moments as a full optimizer state for ``model`` under ``s``'s own
    hyperparameters: torch AdamW's index-keyed format, or (``by_name``) FSDP's."""
    from muse_plan.executor.optimizers import BETAS, EPS, param_groups

    names = _param_names(model)
    groups = torch.optim.AdamW(param_groups(model, s.weight_decay), lr=s.lr, betas=BETAS,
                               eps=EPS).state_dict()["param_groups"]  # holds no state: nothing allocated
    if by_name:
        groups = [{**g, "params": group_names} for g, group_names in zip(groups, names)]
        return {"state": {n: moments[n] for group in names for n in group if n in moments}, "param_groups": groups}
    flat = [n for group in names for n in group]  # torch numbers a state's parameters across its groups
    return {"state": {i: moments[n] for i, n in enumerate(flat) if n in moments}, "param_groups": groups}


def mapped_optimizer_state(spec: PlanSpec, prepared: Prepared, position: int, accelerator: Any,
                           model: torch.nn.Module, s: StageSettings) -> dict[str, Any] | None:
    """The optimizer state a stage starting after a growth with ``optimizer_state:
    mapped`` begins with, in the form ``optimizers.load_state`` takes on this
    accelerator and with the stage's own lr and weight decay; None otherwise."""
    from muse_plan.executor.optimizers import is_fsdp

    stage = spec.stages[position]
    if position == 0 and stage.from_stage is None:
        return None
    source = spec.stage(stage.from_stage) if stage.from_stage else spec.stages[position - 1]
    if source.engine != "growth":
        return None
    found = checkpoint.checkpoints(Path(prepared.run_dir) / source.name)
    if not found:
        return None
    try:
        mapped = _state(found[0]).get("mapped_optimizer")
    except checkpoint.CorruptCheckpoint as exc:
        raise PlanError(f"stage {stage.name!r}: {exc}") from None
    if mapped is None:
        return None
    return _as_optimizer_state(mapped, model, s, by_name=is_fsdp(accelerator))


class GrowOnPlateau:
    """A trainer that ends its stage once its training loss plateaus (see the module docstring)."""

    def __init__(self, inner: Any, window: int, grad_accum: int) -> None:
        self.inner, self.grad_accum = inner, grad_accum
        self.detector = Plateau(window)
        self.losses: list[torch.Tensor] = []  # micro-batch losses since the last evaluation, on the device
        self.steps = 0
        self.found: Finding | None = None

    @property
    def model(self) -> Any:
        return self.inner.model

    @model.setter
    def model(self, value: Any) -> None:  # the loop hands back the model it prepared
        self.inner.model = value

    def __getattr__(self, name: str) -> Any:  # everything else is the inner trainer's
        if name == "inner":  # not set yet (a copy being built): no recursion
            raise AttributeError(name)
        return getattr(self.inner, name)

    def micro_step(self, batch: Any) -> Any:
        out = self.inner.micro_step(batch)
        self.losses.append(out.loss.detach().float())
        return out

    def should_stop(self) -> bool:
        whole = len(self.losses) // self.grad_accum * self.grad_accum
        per_step = torch.stack(self.losses[:whole]).view(-1, self.grad_accum).mean(1).tolist() if whole else []
        self.losses = []
        for loss in per_step:
            self.steps += 1
            self.found = self.found or self.detector.observe(SimpleNamespace(step=self.steps, loss=loss))
        return self.found is not None
