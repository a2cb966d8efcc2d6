"""The planner: turns techniques and tasks into an explicit plan.

``complete(spec)`` fills what a person left to muse and nothing else: the
residual mode the techniques imply, and, when the plan lists no stages, the
stages its techniques expand into. A plan with stages keeps them as written.
Everything the planner decides is written into the stored revision, so
``muse plan show`` displays exactly what ``muse plan run`` will do.

Budgets are starting points, not promises: pretraining defaults to 20 tokens
per parameter (Chinchilla); the RL stages take SEEDS.md's order of effort
(SFT shortest, all-scenarios RL longest). The optimizer
turns budgets into predicted time against the timeline, and into epochs of
the plan's data where it is a corpus of known size (``optimizer/data_budget``):
a budget is what the model would use, not what the data holds, so a budget
past the data is kept and the optimizer says what the repetition is worth.
"""

from __future__ import annotations

from typing import Callable

from muse_plan.errors import PlanError
from muse_plan.plan import units
from engines.architecture.shapes import Shape
from muse_plan.plan.spec import ModelShape, ModelSpec, PlanSpec, StageSpec, required_residual
from muse_plan.plan.techniques import GrowthOptions, RewardWeights

TOKENS_PER_PARAM = 20
GROWTH_STAGE_NAMES = frozenset({"pretrain_small", "grow", "grow_mid", "continue_mid", "continue"})
RL_STEPS = {"cold_start_sft": 1000, "reasoning_rl": 500, "rejection_sampling": 300, "all_scenarios_rl": 800}


def complete(spec: PlanSpec) -> PlanSpec:
    """The plan with its residual mode and stages filled in where left open."""
    model = spec.model
    if model.residual is None:
        model = model.model_copy(update={"residual": required_residual(spec.techniques) or "standard"})
    stages = grow_written_pretrain(spec) if spec.stages else derive_stages(spec)
    data = spec.model_dump(mode="json", exclude_none=True)
    data["model"] = model.model_dump(mode="json", exclude_none=True)
    data["stages"] = [s.model_dump(mode="json", exclude_none=True) for s in stages]
    return PlanSpec.model_validate(data)


def derive_stages(spec: PlanSpec) -> tuple[StageSpec, ...]:
    stages: list[StageSpec] = []
    if spec.techniques.growth is not None:
        stages += growth_stages(spec, spec.techniques.growth)
    elif spec.model.init_from is None and _trains_a_language_model(spec):
        stages.append(StageSpec(name="pretrain", kind="pretrain", tokens=_pretrain_tokens(spec, 1.0)))
    stages += reasoning_stages(spec)
    if spec.techniques.rkdo is not None:
        options = {"dataset": spec.techniques.rkdo.dataset}
        stages.append(StageSpec(name="representation", kind="representation", steps=2000, options=options))
    return tuple(stages)


def _trains_a_language_model(spec: PlanSpec) -> bool:
    """False only for a representation-learning plan: rkdo alone, no language tasks."""
    return spec.techniques.names() != ["rkdo"] or bool(spec.target_tasks)


def chinchilla_tokens(model: ModelSpec, share: float = 1.0) -> str:
    """``share`` of a compute-optimal pretraining budget for ``model``: 20 tokens a counted
    parameter (Hoffmann et al. 2022), at least 1M. Every budget the planner and the
    optimizer's alternatives give a model comes from here, so one model gets one budget."""
    return units.format_count(max(1e6, TOKENS_PER_PARAM * model.approx_params() * share), 3)


def _pretrain_tokens(spec: PlanSpec, share: float) -> str:
    return chinchilla_tokens(spec.model, share)


def small_shape(shape: Shape, growth: GrowthOptions) -> ModelShape:
    """The shape trained before growth: depth ÷ factor for the depth operators
    (the width kept exactly, MLP and kv heads included), width ÷ factor for
    Net2Net, both halved for CompoundGrow; the head size is always kept."""
    layers, d_model, heads = shape.layers, shape.d_model, shape.n_heads
    if growth.operator in ("g_stack", "layer_dup", "ligo"):
        return ModelShape(layers=max(1, layers // growth.factor), d_model=d_model, n_heads=heads,
                          n_kv_heads=shape.n_kv_heads, d_ff=shape.d_ff)
    if growth.operator == "net2net":
        heads = max(1, heads // growth.factor)
        d_model = d_model // shape.n_heads * heads
    if growth.operator == "compound":
        layers, heads = max(1, layers // 2), max(1, heads // 2)
        d_model = d_model // shape.n_heads * heads
    return ModelShape(layers=layers, d_model=d_model, n_heads=heads)


def small_seq_len(spec: PlanSpec, growth: GrowthOptions) -> int | None:
    """The small stage's context, or None (the plan's); a plan error unless shorter."""
    short = growth.small_seq_len
    if short is not None and short >= spec.model.seq_len:
        raise PlanError(f"techniques.growth.small_seq_len {short} must be shorter than model.seq_len "
                        f"{spec.model.seq_len} (the grow stage extends the context to it)")
    return short


def grow_written_pretrain(spec: PlanSpec) -> tuple[StageSpec, ...]:
    """The plan's own stages; with the ``growth`` technique and no ``grow`` stage
    written, its first full-size ``pretrain`` stage becomes small pretrain → grow →
    continue: its budget (steps or tokens) split by ``at_fraction``, its checkpoint,
    evaluation and training settings kept on the stages that train, and a later
    stage's ``from_stage`` naming it pointed at ``continue``."""
    growth, stages = spec.techniques.growth, spec.stages
    if growth is None or any(s.kind == "grow" for s in stages):
        return stages
    at = next((i for i, s in enumerate(stages) if s.kind == "pretrain" and s.shape is None), None)
    if at is None:
        return stages
    written = stages[at]
    clash = sorted({s.name for i, s in enumerate(stages) if i != at} & GROWTH_STAGE_NAMES)
    if clash:
        raise PlanError(f"stage {written.name!r} can't be expanded for growth: the plan already has a stage named "
                        f"{clash[0]!r}")

    def budget(share: float) -> dict:
        if written.steps is not None:
            return {"steps": max(1, round(written.steps * share))}
        if written.tokens is not None:
            return {"tokens": units.format_count(max(1.0, units.parse_scale(written.tokens) * share), 3)}
        return {"tokens": _pretrain_tokens(spec, share)}

    kept = {k: v for k, v in (("checkpoint_every", written.checkpoint_every), ("eval_every", written.eval_every),
                              ("training", written.training)) if v is not None}
    grown = []
    for stage in growth_stages(spec, growth, budget):
        if stage.kind != "grow":
            stage = stage.model_copy(update={**kept, "options": {**written.options, **stage.options}})
        grown.append(stage)
    rest = [s.model_copy(update={"from_stage": "continue"}) if s.from_stage == written.name else s
            for s in stages[at + 1:]]
    return (*stages[:at], *grown, *rest)


def growth_stages(spec: PlanSpec, growth: GrowthOptions,
                  budget: Callable[[float], dict] | None = None) -> list[StageSpec]:
    """small pretrain → grow → continue; CompoundGrow grows twice through a middle
    shape (and, with ``small_seq_len``, a middle context: the geometric mean, as
    Gu et al. double the length at each step, 128 → 256 → 512). ``budget(share)``
    gives a training stage's budget (default: tokens, a share of 20 per parameter)."""
    budget = budget or (lambda share: {"tokens": _pretrain_tokens(spec, share)})
    target = spec.model.resolved_shape()
    small = small_shape(target, growth)
    short = small_seq_len(spec, growth)
    grow_options = {
        "operator": growth.operator,
        "factor": growth.factor,
        "function_preserving": growth.function_preserving,
        "optimizer_state": growth.optimizer_state,
    }
    if short is not None:
        grow_options["rope"] = growth.rope
    grow_options.update({k: v for k, v in (("fit_steps", growth.fit_steps), ("fit_lr", growth.fit_lr))
                         if v is not None})
    rewarm = {"rewarm_fraction": growth.rewarm_fraction}
    if growth.operator == "compound":  # CompoundGrow: two growth steps through a middle shape
        from engines.growth.schedule import compound_shapes

        mid = compound_shapes(small.resolved(), target, steps=2)[1]
        middle = ModelShape(layers=mid.layers, d_model=mid.d_model, n_heads=mid.n_heads)
        mid_seq = None if short is None else round((short * spec.model.seq_len) ** 0.5)
        return [
            StageSpec(name="pretrain_small", kind="pretrain", shape=small, seq_len=short,
                      **budget(growth.at_fraction / 2)),
            StageSpec(name="grow_mid", kind="grow", shape=middle, seq_len=mid_seq, options=grow_options),
            StageSpec(name="continue_mid", kind="continue", shape=middle, seq_len=mid_seq,
                      **budget(growth.at_fraction / 2), options=rewarm),
            StageSpec(name="grow", kind="grow", options=grow_options),
            StageSpec(name="continue", kind="continue", **budget(1 - growth.at_fraction), options=rewarm),
        ]
    return [
        StageSpec(name="pretrain_small", kind="pretrain", shape=small, seq_len=short,
                  **budget(growth.at_fraction)),
        StageSpec(name="grow", kind="grow", options=grow_options),
        StageSpec(name="continue", kind="continue", **budget(1 - growth.at_fraction), options=rewarm),
    ]


def verifiable_tasks(spec: PlanSpec) -> list[str]:
    """Generated tasks with checkable answers that serve the plan's target tasks."""
    tasks = []
    if "arithmetic" in spec.target_tasks or not spec.target_tasks:
        tasks += ["multiplication", "add_sub"]
    if "reasoning" in spec.target_tasks:
        tasks += ["word_problem", "multiplication"]
    return list(dict.fromkeys(tasks))


def reasoning_stages(spec: PlanSpec) -> list[StageSpec]:
    """DeepSeek-R1's four stages; several RL algorithms each start from the SFT result."""
    algorithms = spec.techniques.rl_algorithms()
    if not algorithms:
        return []
    common = {"tasks": verifiable_tasks(spec)}
    if spec.techniques.lora is not None:
        common["lora"] = True
    stages = [StageSpec(name="cold_start_sft", kind="cold_start_sft", steps=RL_STEPS["cold_start_sft"],
                        options=common)]
    several = len(algorithms) > 1
    for algorithm in algorithms:
        stages.append(StageSpec(
            name=f"reasoning_rl_{algorithm}" if several else "reasoning_rl",
            kind="reasoning_rl", steps=RL_STEPS["reasoning_rl"],
            options={**common, "algorithm": algorithm},
            from_stage="cold_start_sft" if several else None,
        ))
    stages.append(StageSpec(name="rejection_sampling", kind="rejection_sampling",
                            steps=RL_STEPS["rejection_sampling"], options=common))
    # all-scenarios RL: the seed's multi-objective reward; the verifiable stand-in
    # for its "consistency" is the share of true equations in the worked steps
    weights = (spec.techniques.grpo.reward_weights if spec.techniques.grpo else RewardWeights())
    scenario = {**common, "reward_weights": {**weights.model_dump(), "consistency": max(weights.consistency, 0.3)}}
    stages.append(StageSpec(name="all_scenarios_rl", kind="all_scenarios_rl",
                            steps=RL_STEPS["all_scenarios_rl"], options=scenario))
    return stages
