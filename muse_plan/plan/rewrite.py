"""Writing training settings into a plan where the stages read them; no torch.

The optimizer's fit, the recovery handler and ``plan adapt`` all change
training fields of particular stages; each goes through ``set_training``
so a change lands where the stage reads it and no other stage's settings
move with it.

Design decisions:
- A stage reads the plan-wide ``training`` with its own ``training`` on top
  (``PlanSpec.training_for``). A change for some stages is written into
  each of those stages' own ``training``; only with ``spread`` (the fit,
  which sets every priced stage at once) does a value every stage shares,
  and no stage sets itself, go plan-wide, so a fitted single-stage plan
  still reads as one ``training`` block.
- The batch fields move together: a new micro-batch is written with the
  accumulation and the global batch beside it, at the same level, so the
  stage keeps its global batch and ``micro × accumulation × GPUs = global``
  holds in every scope, counted on the plan's own compute (one process
  where it names none); the executor derives the accumulation it runs
  from the global batch and the processes it has.
"""

from __future__ import annotations

from typing import Any

from muse_plan.plan.io import spec_from_dict, spec_to_dict
from muse_plan.plan.spec import PlanSpec

BATCH = ("micro_batch", "grad_accum", "global_batch")


def set_training(spec: PlanSpec, values: dict[str, dict[str, Any]], *, spread: bool = False,
                 source: str = "rewritten plan", also: dict[str, Any] | None = None) -> PlanSpec:
    """``spec`` with ``values`` ({stage name: {training field: value}}) written in, and the
    top-level sections in ``also`` replaced (a new ``compute``) in the same revision."""
    data = {**spec_to_dict(spec), **(also or {})}
    stages = {entry["name"]: entry for entry in data.get("stages", [])}
    own = {s.name: s.training.model_dump(exclude_none=True, exclude_defaults=True) if s.training else {}
           for s in spec.stages}
    ranks = max(1, int((data.get("compute") or {}).get("count") or 1))
    values = {name: _complete_batch(ranks, dict(fields)) for name, fields in values.items()}
    plan_wide: dict[str, Any] = {}
    if spread and values:
        for group in _groups(values):
            shared = {tuple(fields.get(f) for f in group) for fields in values.values()}
            set_here = any(f in own[name] for name in values for f in group)
            if len(shared) == 1 and not set_here and all(all(f in v for f in group) for v in values.values()):
                plan_wide.update({f: values[next(iter(values))][f] for f in group})
    if plan_wide:
        data["training"] = {**(data.get("training") or {}), **plan_wide}
    for name, fields in values.items():
        local = {k: v for k, v in fields.items() if k not in plan_wide}
        if local:
            stages[name]["training"] = {**stages[name].get("training", {}), **local}
    return spec_from_dict(data, source)


def _complete_batch(ranks: int, fields: dict[str, Any]) -> dict[str, Any]:
    """The accumulation written beside a new micro-batch and global batch is the one the
    plan's own compute implies (the executor derives the accumulation from the global
    batch for the processes it actually has, so a run on another count still keeps it)."""
    if "micro_batch" in fields and "global_batch" in fields:
        accum, rest = divmod(fields["global_batch"], fields["micro_batch"] * ranks)
        if rest or not accum:
            fields.pop("grad_accum", None)
        else:
            fields["grad_accum"] = accum
    return fields


def _groups(values: dict[str, dict[str, Any]]) -> list[tuple[str, ...]]:
    names = dict.fromkeys(f for fields in values.values() for f in fields)
    batch = tuple(f for f in BATCH if f in names)
    return ([batch] if batch else []) + [(f,) for f in names if f not in BATCH]
