"""Escalation ladders: what the recovery layer rewrites for each fault class.

Each fault class has an ordered ladder of rungs; the n-th fault of a class in
a stage tries rungs from the n-th on, and the first rung that applies to the
plan (and, for memory, that the optimizer's memory model predicts to fit this
machine) is the rewrite. A class whose ladder is used up has exhausted its
retry budget and the run stops with a report of what was tried.

- ``oom``: halve the micro-batch and double accumulation (the global batch
  is kept) → activation checkpointing (selective, then full) → offload the
  optimizer state → LoRA where the stage fine-tunes.
- ``nan``: roll back, skip the data window that produced it, halve the
  learning rate → leave fp16 for bf16 (or fp32 without bf16) → halve again.
- ``grad_explosion``: enable clipping at 1.0 or halve it → halve the
  learning rate → halve both.
Design: a rung is a pure function (plan, stage, fault) → a change or None;
the runner writes the revision and resumes. Pure functions keep the ladders
testable and identical on every process of a distributed run.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from muse_plan.plan.io import spec_from_dict, spec_to_dict
from muse_plan.plan.spec import PlanSpec, StageSpec


@dataclass(frozen=True)
class Rewrite:
    training: dict[str, Any]  # training fields to set
    summary: str  # "micro_batch 16→8, grad_accum 1→2 (global batch 16 kept)"
    skip_window: bool = False  # skip the data between the checkpoint and the fault
    techniques: dict[str, Any] = field(default_factory=dict)


Rung = Callable[[PlanSpec, StageSpec, int], "Rewrite | None"]


def _t(spec: PlanSpec, name: str, default: Any = None, stage: StageSpec | None = None) -> Any:
    value = getattr(spec.training_for(stage) if stage is not None else spec.training, name)
    return default if value is None else value


def halve_micro_batch(spec: PlanSpec, stage: StageSpec, world: int) -> Rewrite | None:
    micro = _t(spec, "micro_batch", 8, stage)
    if micro <= 1:
        return None
    accum = _t(spec, "grad_accum", 1, stage)
    total = spec.training_for(stage).global_batch or micro * accum * world
    new_micro = micro // 2
    new_accum = total // (new_micro * world)
    return Rewrite({"micro_batch": new_micro, "grad_accum": new_accum, "global_batch": total},
                   f"micro_batch {micro}→{new_micro}, grad_accum {accum}→{new_accum} (global batch {total} kept)")


def more_checkpointing(spec: PlanSpec, stage: StageSpec, world: int) -> Rewrite | None:
    now = _t(spec, "activation_checkpointing", "none", stage)
    nxt = {"none": "selective", "selective": "full"}.get(now)
    if nxt is None:
        return None
    return Rewrite({"activation_checkpointing": nxt}, f"activation_checkpointing {now}→{nxt}")


def offload_optimizer(spec: PlanSpec, stage: StageSpec, world: int) -> Rewrite | None:
    from muse_plan.executor.settings import NOT_YET

    if (_t(spec, "offload", "none", stage) != "none" or "optimizer" not in NOT_YET["offload"]
            or _t(spec, "sharding", "none", stage) not in ("none", "ddp")):
        return None  # the executor offloads only unsharded AdamW: a rewrite it would refuse is no remedy
    return Rewrite({"offload": "optimizer"}, "offload none→optimizer")


def lora(spec: PlanSpec, stage: StageSpec, world: int) -> Rewrite | None:
    # the GRPO engine's fine-tuning stages take LoRA; the architecture engine's finetune doesn't yet
    if spec.techniques.lora is not None or stage.kind not in ("cold_start_sft", "reasoning_rl",
                                                              "rejection_sampling", "all_scenarios_rl"):
        return None
    return Rewrite({}, "LoRA (rank 16) for the fine-tuning stage", techniques={"lora": {"rank": 16}})


def halve_lr(spec: PlanSpec, stage: StageSpec, world: int, *, skip: bool = False) -> Rewrite | None:
    lr = _t(spec, "lr", 3e-4, stage)
    return Rewrite({"lr": lr / 2}, f"lr {lr:g}→{lr / 2:g}" + (", data window skipped" if skip else ""),
                   skip_window=skip)


def leave_fp16(spec: PlanSpec, stage: StageSpec, world: int) -> Rewrite | None:
    if spec.training_for(stage).precision != "fp16":
        return None
    return Rewrite({"precision": "bf16"}, "precision fp16→bf16")


def clip_tighter(spec: PlanSpec, stage: StageSpec, world: int) -> Rewrite | None:
    clip = _t(spec, "clip_grad_norm", 1.0, stage)  # the executor clips at 1.0 by default
    new = 1.0 if clip > 1.0 else clip / 2
    return Rewrite({"clip_grad_norm": new}, f"clip_grad_norm {clip:g}→{new:g}")


def clip_and_lr(spec: PlanSpec, stage: StageSpec, world: int) -> Rewrite | None:
    a, b = clip_tighter(spec, stage, world), halve_lr(spec, stage, world)
    return Rewrite({**a.training, **b.training}, f"{a.summary}, {b.summary}")


LADDERS: dict[str, list[Rung]] = {
    "oom": [halve_micro_batch, halve_micro_batch, more_checkpointing, more_checkpointing, offload_optimizer, lora],
    "nan": [lambda p, s, w: halve_lr(p, s, w, skip=True), leave_fp16, lambda p, s, w: halve_lr(p, s, w, skip=True)],
    "grad_explosion": [clip_tighter, halve_lr, clip_and_lr],
}


def apply(spec: PlanSpec, rewrite: Rewrite, stage: StageSpec | None = None) -> PlanSpec:
    """The plan with the rewrite's training fields set — in the stage's own
    training settings where the stage sets that field, else plan-wide."""
    data = spec_to_dict(spec)
    own = stage.training.model_dump(exclude_defaults=True) if stage is not None and stage.training else {}
    if own:
        local = {k: v for k, v in rewrite.training.items() if k in own}
        for entry in data["stages"]:
            if entry["name"] == stage.name:
                entry["training"] = {**entry.get("training", {}), **local}
        rewrite = Rewrite({k: v for k, v in rewrite.training.items() if k not in own}, rewrite.summary,
                          rewrite.skip_window, rewrite.techniques)
    training = {**(data.get("training") or {}), **rewrite.training}
    if "micro_batch" in rewrite.training and spec.compute is None:
        training.pop("grad_accum", None)  # follows from global / (micro × processes)
    data["training"] = training
    if rewrite.techniques:
        techniques = data.get("techniques") or {}
        if not isinstance(techniques, dict):
            techniques = {t: {} for t in techniques}
        data["techniques"] = {**techniques, **rewrite.techniques}
    return spec_from_dict(data, "recovery rewrite")


def next_rewrite(spec: PlanSpec, stage: StageSpec, kind: str, used: int, world: int,
                 fits: Callable[[PlanSpec], bool] | None = None) -> tuple[int, Rewrite, PlanSpec] | None:
    """The first applicable rung at or after ``used`` → (rungs used now, rewrite, new plan)."""
    ladder = LADDERS.get(kind, [])
    done: list[str] = []
    for index in range(used, len(ladder)):
        rewrite = ladder[index](spec, stage, world)
        if rewrite is None:
            continue
        spec = apply(spec, rewrite, stage)
        stage = spec.stage(stage.name)
        done.append(rewrite.summary)
        if kind == "oom" and fits is not None and not fits(spec):
            continue  # predicted not to be enough: climb on from here
        return index + 1, Rewrite(rewrite.training, "; ".join(done), rewrite.skip_window, rewrite.techniques), spec
    return None
