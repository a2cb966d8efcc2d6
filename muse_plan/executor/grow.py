"""The runner's path for a ``grow`` stage: grow the previous stage's model, save it.

A grow stage trains nothing (its plan budget is empty; LiGO's short operator
fit is the growth engine's business, ``engines/growth/ligo.py``), so it does
not go through the training loop. The runner sets up the architecture
engine's trainer at the grown shape (its data feeds LiGO, its held-out
batches measure the loss before and after growth) and hands over here.

Design decisions:
- Everything a growth can refuse (unknown options, ``optimizer_state:
  mapped``, shapes the operator can't join) is checked with the plan's other
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
from muse_plan.executor.runner import Prepared, Recorder, StageResult, View, _note
from muse_plan.executor.settings import StageSettings, engine_options, model_config
from muse_plan.monitor.detectors import Finding, Plateau
from muse_plan.plan.spec import PlanSpec, StageSpec
from muse_plan.store.db import Store


def check_growth(spec: PlanSpec, position: int) -> int:
    """Refuse a growth the plan can't make; the grow stage's steps (LiGO's fit, else 0)."""
    from engines.growth.schedule import check_growth as check_shapes, grow_settings

    stage = spec.stages[position]
    if position == 0 and stage.from_stage is None:
        raise PlanError(f"stage {stage.name!r} grows the model of the stage before it, but it is the first stage")
    source = spec.stage(stage.from_stage) if stage.from_stage else spec.stages[position - 1]
    try:
        grow = grow_settings(engine_options(spec, stage))
        check_shapes(grow.operator, model_config(spec, source), model_config(spec, stage))
    except ValueError as exc:
        raise PlanError(f"stage {stage.name!r}: {exc}") from None
    return grow.trains


def grow_stage(store: Store | None, accelerator: Any, spec: PlanSpec, prepared: Prepared, position: int,
               s: StageSettings, trainer: Any, view: View | None) -> StageResult:
    """Grow the source stage's final weights into ``trainer.model``'s shape and save them."""
    from engines.growth.stage import grow_stage as grow

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
        try:
            report = grow(trainer, model_config(spec, spec.stage(source)),
                          lambda small: checkpoint.load_weights(found[0], small),
                          engine_options(spec, stage), accelerator.autocast)
        except (ValueError, checkpoint.CorruptCheckpoint) as exc:
            raise PlanError(f"stage {stage.name!r}: {exc}") from None
        meta = {"plan": prepared.plan, "revision": prepared.revision, "run": prepared.run_id, "stage": stage.name}
        checkpoint.save(run_dir / stage.name, s.steps, trainer.model,
                        {"engine": trainer.state_dict(), "rng": checkpoint.rng_state()}, meta)
    accelerator.wait_for_everyone()
    if store is not None and report is not None:
        hooks = Recorder(store, prepared.run_id, prepared.stage_run_ids[position], view)
        hooks.on_start(0)
        hooks.on_eval(s.steps, report.metrics)
        hooks.finish(s.steps, {}, path)
        _note(store, prepared, position, [report.summary], view, severity="info")
        if view:
            view.stage_finished(stage.name)
    return StageResult(stage.name, s.steps, report.metrics if report else {}, time.perf_counter() - t0)


# stage options that end a stage at a loss plateau: before a grow stage (growth starts
# early), or any stage the plan allows to stop early (the recovery rung for a plateau)
PLATEAU_OPTIONS = ("grow_on_plateau", "stop_on_plateau")


def plateau_option(stage: StageSpec) -> str | None:
    return next((k for k in PLATEAU_OPTIONS if stage.options.get(k) not in (None, False)), None)


def plateau_window(spec: PlanSpec, stage: StageSpec) -> int:
    """The steps per window of a stage's plateau option; a plan error if it is not one."""
    key = plateau_option(stage) or "grow_on_plateau"
    value = stage.options[key]
    if value is True:
        return int(spec.alerts.get("plateau", 200))
    if isinstance(value, bool) or not isinstance(value, int) or value < 2:
        raise PlanError(f"stage {stage.name!r}: {key} must be true or a window of at least 2 steps, "
                        f"got {value!r}")
    return value


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
