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
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from muse_plan.errors import PlanError
from muse_plan.executor import checkpoint
from muse_plan.executor.runner import Prepared, Recorder, StageResult, View, _note
from muse_plan.executor.settings import StageSettings, engine_options, model_config
from muse_plan.plan.spec import PlanSpec
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
