"""Escalation ladders: what the recovery layer rewrites for each fault class.

Each fault class has an ordered ladder of rungs; the n-th fault of a class in
a stage tries rungs from the n-th on, and the first rung that applies to the
plan (and, for memory, that the optimizer's memory model predicts to fit this
machine) is the rewrite. A class whose ladder is used up has exhausted its
retry budget and the run stops with a report of what was tried.

A rewrite lands in the failing stage's own ``training`` (``plan/rewrite.py``):
the stage that faulted changes, every other stage keeps its settings and
its global batch. Current values come from the one resolver, so a rung
halves what the stage actually ran with.

- ``oom``: halve the micro-batch and double accumulation (the stage's global
  batch is kept) → activation checkpointing (selective, then full) → offload the
  optimizer state → LoRA (rank 16) on the failing stage alone, where its kind
  takes LoRA (continue and finetune included) and it trains every weight; the
  stage then starts again from its starting weights (its checkpoints hold
  every weight, not adapters: ``runner._starting_point``).
- ``nan``: roll back, skip the data window that produced it, halve the
  learning rate → leave fp16 for bf16 (or fp32 without bf16) → halve again.
- ``grad_explosion``: enable clipping at 1.0 or halve it → halve the
  learning rate → halve both; each rung also skips the data window that
  produced it. A spike from a bad batch (the commonest cause in pretraining)
  comes back at the same step after a restart from the checkpoint, whatever
  the clipping — seen when recovery restarted an RL stage three times into
  the same fault — so the batches between the checkpoint and the fault are
  skipped, as large pretraining runs do when they rewind past a spike.
Design: a rung is a pure function (plan, stage, fault) → a change or None;
the runner writes the revision and resumes. Pure functions keep the ladders
testable and identical on every process of a distributed run.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Callable

from muse_plan.executor.settings import StageSettings, refusal, resolve
from muse_plan.plan.io import spec_from_dict, spec_to_dict
from muse_plan.plan.kinds import STAGE_KINDS
from muse_plan.plan.rewrite import set_training
from muse_plan.plan.spec import PlanSpec, StageSpec


@dataclass(frozen=True)
class Rewrite:
    training: dict[str, Any]  # training fields to set
    summary: str  # "micro_batch 16→8, grad_accum 1→2 (global batch 16 kept)"
    skip_window: bool = False  # skip the data between the checkpoint and the fault
    options: dict[str, Any] = field(default_factory=dict)  # the failing stage's own options to set


Rung = Callable[[PlanSpec, StageSpec, int], "Rewrite | None"]


def _now(spec: PlanSpec, stage: StageSpec, world: int) -> StageSettings:
    """The stage's settings as the executor runs them (the one resolver's defaults)."""
    return resolve(spec, stage, world_size=world, check=False)


def halve_micro_batch(spec: PlanSpec, stage: StageSpec, world: int) -> Rewrite | None:
    s = _now(spec, stage, world)
    if s.micro_batch <= 1:
        return None
    new_micro = s.micro_batch // 2
    new_accum = s.global_batch // (new_micro * world)
    return Rewrite({"micro_batch": new_micro, "grad_accum": new_accum, "global_batch": s.global_batch},
                   f"micro_batch {s.micro_batch}→{new_micro}, grad_accum {s.grad_accum}→{new_accum} "
                   f"(global batch {s.global_batch} kept)")


def more_checkpointing(spec: PlanSpec, stage: StageSpec, world: int) -> Rewrite | None:
    now = _now(spec, stage, world).activation_checkpointing
    nxt = {"none": "selective", "selective": "full"}.get(now)
    if nxt is None:
        return None
    return Rewrite({"activation_checkpointing": nxt}, f"activation_checkpointing {now}→{nxt}")


def offload_optimizer(spec: PlanSpec, stage: StageSpec, world: int) -> Rewrite | None:
    s = _now(spec, stage, world)
    if s.offload != "none" or refusal(s.sharding, "optimizer", s.optimizer, cuda=True) is not None:
        return None  # a rewrite the executor would refuse is no remedy
    return Rewrite({"offload": "optimizer"}, "offload none→optimizer")


def lora(spec: PlanSpec, stage: StageSpec, world: int) -> Rewrite | None:
    # only where the stage's kind takes LoRA, the stage trains every weight and did not say lora: false
    if not STAGE_KINDS[stage.kind].lora or _now(spec, stage, world).lora is not None \
            or stage.options.get("lora") is False:
        return None
    return Rewrite({}, f"LoRA (rank 16) for stage {stage.name}, restarted from its starting weights",
                   options={"lora": {"rank": 16}})


def halve_lr(spec: PlanSpec, stage: StageSpec, world: int) -> Rewrite | None:
    lr = _now(spec, stage, world).lr
    return Rewrite({"lr": lr / 2}, f"lr {lr:g}→{lr / 2:g}")


def leave_fp16(spec: PlanSpec, stage: StageSpec, world: int) -> Rewrite | None:
    if spec.training_for(stage).precision != "fp16":
        return None
    return Rewrite({"precision": "bf16"}, "precision fp16→bf16")


def clip_tighter(spec: PlanSpec, stage: StageSpec, world: int) -> Rewrite | None:
    clip = _now(spec, stage, world).clip_grad_norm
    new = 1.0 if clip > 1.0 else clip / 2
    return Rewrite({"clip_grad_norm": new}, f"clip_grad_norm {clip:g}→{new:g}")


def clip_and_lr(spec: PlanSpec, stage: StageSpec, world: int) -> Rewrite | None:
    a, b = clip_tighter(spec, stage, world), halve_lr(spec, stage, world)
    return Rewrite({**a.training, **b.training}, f"{a.summary}, {b.summary}")


def skipping(rung: Rung) -> Rung:
    """``rung``, restarting past the data window that produced the fault."""
    def skipped(spec: PlanSpec, stage: StageSpec, world: int) -> Rewrite | None:
        found = rung(spec, stage, world)
        return None if found is None else replace(found, summary=found.summary + ", data window skipped",
                                                  skip_window=True)
    return skipped


LADDERS: dict[str, list[Rung]] = {
    "oom": [halve_micro_batch, halve_micro_batch, more_checkpointing, more_checkpointing, offload_optimizer, lora],
    "nan": [skipping(halve_lr), leave_fp16, skipping(halve_lr)],
    "grad_explosion": [skipping(clip_tighter), skipping(halve_lr), skipping(clip_and_lr)],
}


def apply(spec: PlanSpec, rewrite: Rewrite, stage: StageSpec | None = None) -> PlanSpec:
    """The plan with the rewrite's training fields set in the failing stage's own
    training settings (``plan/rewrite.py``: every other stage keeps its settings and
    its global batch), plan-wide when no stage is named; its options set on that stage."""
    if rewrite.training:
        if stage is not None:
            spec = set_training(spec, {stage.name: rewrite.training}, source="recovery rewrite")
        else:
            data = spec_to_dict(spec)
            data["training"] = {**(data.get("training") or {}), **rewrite.training}
            spec = spec_from_dict(data, "recovery rewrite")
    if rewrite.options and stage is not None:
        data = spec_to_dict(spec)
        for entry in data["stages"]:
            if entry["name"] == stage.name:
                entry["options"] = {**(entry.get("options") or {}), **rewrite.options}
        spec = spec_from_dict(data, "recovery rewrite")
    return spec


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
        return index + 1, Rewrite(rewrite.training, "; ".join(done), rewrite.skip_window, rewrite.options), spec
    return None
