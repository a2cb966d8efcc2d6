"""PlanSpec: the only shape a plan has.

A tree of small frozen pydantic models with ``extra="forbid"``: an unknown
key is an error, not silently dropped. Human strings ("10B", "8xH100",
"7days") are parsed by ``units`` and kept in canonical form, so a plan
written to YAML and read back is the same plan. ``None`` means "left open":
the planner and the optimizer fill it; ``muse plan show`` says which.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import (
    field_validator,
    AliasChoices,
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    NonNegativeInt,
    PositiveFloat,
    model_validator,
)

from muse_plan.plan import units
from engines.architecture.config import RESIDUAL_NAMES
from engines.architecture.shapes import Shape, decoder_params, shape_for_params, swiglu_hidden
from muse_plan.plan.kinds import STAGE_KINDS, kind_of, stage_options
from muse_plan.plan.techniques import Techniques
from muse_plan.monitor.tracker_kinds import TRACKER_NAMES


class Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


def _via(parse):
    """Run a units parser on strings; its ValueError becomes the field's error."""
    return lambda value: parse(value) if isinstance(value, str) else value


Scale = Annotated[str, BeforeValidator(lambda v: units.canonical_scale(str(v)))]


def _at_most(limit: float, what: str):
    """A scale string no larger than ``limit`` (a sane bound, checked when the plan is read)."""
    def check(value: str) -> str:
        if units.parse_scale(value) > limit:
            raise ValueError(f"{value} is more than any run can {what} (at most {units.format_count(limit)})")
        return value
    return AfterValidator(check)


# sane ranges for counts and sizes, checked when a plan is read (a typo like 1e26 is one line, not
# an overflow hours later): generous beyond any run this tool plans
MAX_PARAMS, MAX_TOKENS = 100e12, 1e16
MAX_STEPS = 10**9
MAX_BATCH = 2**24
MAX_CONTEXT, MAX_VOCAB = 2**21, 2**23
MAX_WIDTH, MAX_LAYERS, MAX_HEADS = 2**18, 10**4, 2**14
Count = Annotated[int, Field(ge=1, le=MAX_STEPS)]
Batch = Annotated[int, Field(ge=1, le=MAX_BATCH)]
ModelScale = Annotated[Scale, _at_most(MAX_PARAMS, "train")]
TokenBudget = Annotated[Scale, _at_most(MAX_TOKENS, "read")]
Duration = Annotated[
    str, BeforeValidator(lambda v: units.format_duration(units.parse_duration(str(v))))
]
GiB = Annotated[PositiveFloat, BeforeValidator(_via(units.parse_gib))]
Gbps = Annotated[PositiveFloat, BeforeValidator(_via(units.parse_gbps))]

Residual = Literal[RESIDUAL_NAMES]  # the registered residual modes (engines/architecture/modes.py)
TASKS = ("reasoning", "knowledge", "coding", "multilingual", "arithmetic")


def _task_set(value: Any) -> tuple[str, ...]:
    names = units.split_csv(value) if isinstance(value, str) else [str(v).lower() for v in value]
    unknown = [n for n in names if n not in TASKS]
    if unknown:
        raise ValueError(f"unknown task {', '.join(map(repr, unknown))}; accepted: {', '.join(TASKS)}")
    return tuple(t for t in TASKS if t in names)


TaskSet = Annotated[tuple[str, ...], BeforeValidator(_task_set)]


def _tracker_set(value: Any) -> tuple[str, ...] | None:
    """``tensorboard,mlflow`` or a list; ``none`` or empty: no tracker (None, so a plan without
    one dumps as it always did). Kept in the registry's order, so a reordered list is the same plan."""
    if value is None:
        return None
    names = units.split_csv(value) if isinstance(value, str) else [str(v).lower() for v in value]
    names = [n for n in names if n != "none"]
    unknown = [n for n in names if n not in TRACKER_NAMES]
    if unknown:
        raise ValueError(f"unknown tracker {', '.join(map(repr, unknown))}; accepted: {', '.join(TRACKER_NAMES)}")
    return tuple(t for t in TRACKER_NAMES if t in names) or None


TrackerSet = Annotated[tuple[Literal[TRACKER_NAMES], ...] | None, BeforeValidator(_tracker_set)]


# YAML 1.1 reads a bare on / off as true / false (`compile: on`, `--set training.compile=on`):
# taken back as the words they were
_YAML_SWITCH = BeforeValidator(lambda v: {True: "on", False: "off"}.get(v, v) if isinstance(v, bool) else v)
OnOff = Annotated[Literal["auto", "on", "off"], _YAML_SWITCH]  # YAML reads a bare on / off as a boolean


class ModelShape(Frozen):
    """An explicit shape; overrides what the model scale implies."""

    layers: Annotated[int, Field(ge=1, le=MAX_LAYERS)]
    d_model: Annotated[int, Field(ge=1, le=MAX_WIDTH)]
    n_heads: Annotated[int, Field(ge=1, le=MAX_HEADS)]
    n_kv_heads: Annotated[int, Field(ge=1, le=MAX_HEADS)] | None = None
    d_ff: Annotated[int, Field(ge=1, le=8 * MAX_WIDTH)] | None = Field(
        None, description="SwiGLU hidden width; default ≈ 8/3·d_model")

    @model_validator(mode="after")
    def _divisible(self) -> ModelShape:
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model {self.d_model} is not divisible by n_heads {self.n_heads}")
        if self.n_kv_heads and self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads {self.n_heads} is not divisible by n_kv_heads {self.n_kv_heads}")
        return self

    def resolved(self) -> Shape:
        return Shape(
            self.layers, self.d_model, self.n_heads,
            self.n_kv_heads or self.n_heads, self.d_ff or swiglu_hidden(self.d_model),
        )


class ModelSpec(Frozen):
    scale: ModelScale = "350M"
    family: Literal["decoder", "hf"] = Field(
        "decoder", description="muse's decoder (engines.architecture) or a local Hugging Face causal LM"
    )
    residual: Residual | None = Field(None, description="left open: chosen from the techniques")
    seq_len: Annotated[int, Field(ge=1, le=MAX_CONTEXT)] = 2048
    vocab_size: Annotated[int, Field(ge=1, le=MAX_VOCAB)] = 32000
    shape: ModelShape | None = None
    init_from: str | None = Field(None, description="local checkpoint or Hugging Face model directory")

    @property
    def n_params_nominal(self) -> int:
        return units.parse_scale(self.scale)

    def resolved_shape(self) -> Shape:
        if self.shape is not None:
            return self.shape.resolved()
        return shape_for_params(self.n_params_nominal, self.vocab_size)

    def approx_params(self, shape: Shape | None = None) -> int:
        return decoder_params(shape or self.resolved_shape(), self.vocab_size)


class ComputeSpec(Frozen):
    """Hardware the plan may use. A string like "8xH100" fills gpu, count and memory."""

    gpu: str | None = Field(None, description="GPU kind (catalog key) or None for CPU only")
    count: NonNegativeInt = 0
    memory_gib: PositiveFloat | None = Field(None, description="memory per GPU")
    memory_budget_gib: GiB | None = Field(
        None, validation_alias=AliasChoices("memory_budget_gib", "memory_budget"),
        description="cap on what the run may use in all; also written memory_budget: 128GB")
    host_ram_gib: GiB | None = Field(
        None, validation_alias=AliasChoices("host_ram_gib", "host_ram"),
        description="host memory; also written host_ram: 64GB")
    network_gbps: Gbps | None = Field(
        None, validation_alias=AliasChoices("network_gbps", "network_bandwidth", "network"),
        description="bandwidth between machines; also written network_bandwidth: 100Gbps")

    @model_validator(mode="before")
    @classmethod
    def _from_string(cls, data: Any) -> Any:
        if isinstance(data, str):
            budget = units.parse_compute(data)
            return {"gpu": budget.gpu, "count": budget.count, "memory_gib": budget.memory_gib}
        if isinstance(data, dict) and "budget" in data:
            data = dict(data)
            budget = units.parse_compute(data.pop("budget"))
            data.update(gpu=budget.gpu, count=budget.count, memory_gib=budget.memory_gib)
        return data

    @model_validator(mode="after")
    def _consistent(self) -> ComputeSpec:
        if self.gpu is None and self.count:
            raise ValueError("count is set but no gpu is named; write gpu: H100 or budget: 8xH100")
        if self.gpu is not None and self.count < 1:
            raise ValueError(f"gpu {self.gpu} needs a count of at least 1")
        return self

    @property
    def budget(self) -> str:
        return units.format_compute(units.ComputeBudget(self.gpu, self.count, self.memory_gib))

    @property
    def data_parallel(self) -> int:
        return max(1, self.count)


class TrainingSpec(Frozen):
    """Loop settings; every field left open is the optimizer's to fill."""

    precision: Literal["fp32", "fp16", "bf16"] | None = None
    micro_batch: Batch | None = None
    grad_accum: Batch | None = None
    global_batch: Batch | None = Field(None, description="sequences per optimizer step, all GPUs")
    lr: PositiveFloat | None = None
    min_lr_ratio: float | None = Field(None, ge=0, le=1)
    weight_decay: float | None = Field(None, ge=0)
    warmup_steps: Annotated[int, Field(ge=0, le=MAX_STEPS)] | None = None
    schedule: Literal["cosine", "linear", "constant", "wsd"] | None = None
    clip_grad_norm: PositiveFloat | None = None
    activation_checkpointing: Literal["none", "selective", "full"] | None = None
    sharding: Literal["none", "ddp", "zero1", "zero2", "zero3", "fsdp"] | None = None
    offload: Literal["none", "optimizer", "parameters"] | None = None
    optimizer: Literal["adamw", "adamw_8bit"] | None = None
    compile: OnOff | None = Field(
        None, description="torch.compile the model's blocks: auto (on a GPU, for pretrain/continue/finetune; for GRPO "
                          "stages the decode step, replayed from a CUDA graph), on, off")
    compile_scope: Literal["auto", "model", "blocks"] | None = Field(
        None, description="what training.compile compiles: the whole model as one graph, or each repeated block "
                          "(and muse's loss head); auto: blocks (one graph measured +0.7% faster for a first "
                          "step five times longer)")
    cuda_graphs: OnOff | None = Field(
        None, description="replay the compiled regions' kernels from CUDA graphs (Inductor's reduce-overhead), "
                          "never where a step accumulates micro-steps: auto (with fused_kernels: on for ddl, and "
                          "for mhc / mgt with a bf16 state, on one process: measured 2-27% faster a step on an "
                          "H100, never run under DDP or sharding; docs/bench_plan_run.md), on, off")
    fused_kernels: Annotated[Literal["auto", "off", "eager", "on"], _YAML_SWITCH] | None = Field(
        None, description="mhc / mgt / ddl connections as fused Triton kernels on a GPU: auto (the default: on for "
                          "mgt with a bf16 state of 4 streams, and for ddl and mhc's bf16 state of 4 streams where "
                          "the step replays CUDA graphs, the forms measured faster through muse plan run; off "
                          "elsewhere), off, eager (in eager mode only) or on (under "
                          "torch.compile too); the same function as torch's, which a stage whose kernels fail "
                          "goes on with, said in an event (training.cuda_graphs; docs/bench_plan_run.md)")
    log_with: TrackerSet = Field(
        None, description="also log the run's metrics and events to these trackers (tensorboard, mlflow, wandb), "
                          "through Accelerate; the run's, not a stage's (monitor/trackers.py)")
    seed: int = 0


class DataSpec(Frozen):
    source: str = Field("arithmetic", description="'arithmetic' (generated) or a local file/folder path")
    tokenizer: str = Field("byte", description="'byte' or a local Hugging Face tokenizer directory")
    val_fraction: float = Field(0.05, gt=0, lt=1)
    tokens: TokenBudget | None = Field(
        None, description="the local corpus's size in tokens under data.tokenizer, like 100M: what the optimizer "
                          "plans with where the files are not on this machine (where they are, it counts them)")

    @model_validator(mode="after")
    def _sized_corpus(self) -> DataSpec:
        if self.tokens is not None and self.source == "arithmetic":
            raise ValueError("tokens sizes a local corpus, and 'arithmetic' data is generated as needed: "
                             "leave tokens out, or name the corpus in source")
        return self


_SLUG = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def _slug(value: str) -> str:
    if not _SLUG.match(value):
        raise ValueError(
            f"{value!r} is not a valid name; use letters, digits, '.', '_' or '-' (at most 64)"
        )
    return value


Slug = Annotated[str, AfterValidator(_slug)]


class StageSpec(Frozen):
    name: Slug
    kind: str
    engine: str | None = Field(None, description="implied by kind; filled in on validation")
    options: dict[str, Any] = Field(default_factory=dict)
    steps: Count | None = None
    tokens: TokenBudget | None = Field(None, description="token budget instead of steps, like 2B")
    checkpoint_every: Count | None = None
    eval_every: Count | None = None
    eval_at_start: bool | None = Field(
        None, description="evaluate the weights the stage starts from before its first step, as step 0: "
                          "the score training is measured against")
    shape: ModelShape | None = Field(None, description="shape trained here when not the plan's")
    seq_len: Annotated[int, Field(ge=1, le=MAX_CONTEXT)] | None = Field(
        None, description="context trained here when not model.seq_len (growth)")
    from_stage: str | None = Field(None, description="stage whose result starts this one; default the previous")
    training: TrainingSpec | None = Field(
        None, description="this stage's own training settings (e.g. a lower lr for RL), over the plan's")

    @model_validator(mode="before")
    @classmethod
    def _engine_from_kind(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("kind") in STAGE_KINDS and data.get("engine") is None:
            data = {**data, "engine": STAGE_KINDS[data["kind"]].engine}
        return data

    @model_validator(mode="after")
    def _kind_and_budget(self) -> StageSpec:
        kind = kind_of(self.kind)
        if self.engine != kind.engine:
            raise ValueError(f"stage kind {self.kind!r} runs on engine {kind.engine!r}, not {self.engine!r}")
        if self.steps is not None and self.tokens is not None:
            raise ValueError(f"stage {self.name!r}: give steps or tokens, not both")
        if kind.trains and self.steps is None and self.tokens is None:
            raise ValueError(f"stage {self.name!r} trains, so it needs a budget: steps or tokens")
        return self


def _plan_name(value: str) -> str:
    _slug(value)
    if value.isdigit():
        raise ValueError(f"{value!r}: a plan name can't be all digits (those address plans by id)")
    return value


class PlanSpec(Frozen):
    name: Annotated[str, AfterValidator(_plan_name)]
    description: str = ""
    model: ModelSpec = ModelSpec()
    target_tasks: TaskSet = ()
    techniques: Techniques = Techniques()
    compute: ComputeSpec | None = Field(None, description="left open: this machine, detected")
    timeline: Duration | None = None
    training: TrainingSpec = TrainingSpec()
    data: DataSpec = DataSpec()
    stages: tuple[StageSpec, ...] = ()
    alerts: dict[str, float] = Field(
        default_factory=dict, description="alert thresholds, e.g. {gradient_norm: 10, memory_usage: 90}")

    @field_validator("alerts")
    @classmethod
    def _alerts(cls, value: dict[str, float]) -> dict[str, float]:
        from muse_plan.monitor.alerts import check

        return {name: check(name, v) for name, v in value.items()}

    @model_validator(mode="after")
    def _cross_checks(self) -> PlanSpec:
        self._check_stages()
        self._check_residual()
        self._check_batch()
        self._check_options()
        self._check_log_with()
        return self

    def _check_stages(self) -> None:
        seen: list[str] = []
        for stage in self.stages:
            if stage.name in seen:
                raise ValueError(f"stage name {stage.name!r} appears twice")
            if stage.from_stage is not None and stage.from_stage not in seen:
                raise ValueError(
                    f"stage {stage.name!r}: from_stage {stage.from_stage!r} is not an earlier stage"
                )
            seen.append(stage.name)

    def _check_residual(self) -> None:
        wanted = required_residual(self.techniques)
        if wanted and self.model.residual and self.model.residual != wanted:
            raise ValueError(
                f"model.residual is {self.model.residual!r} but techniques "
                f"{', '.join(self.techniques.names())} need {wanted!r}"
            )

    def _check_batch(self) -> None:
        """micro × accum × GPUs = global batch, plan-wide and in every stage that sets its own."""
        ranks = self.compute.data_parallel if self.compute else 1
        scopes = [("training", self.training)] + [
            (f"stage {s.name!r}", self.training_for(s)) for s in self.stages if s.training is not None]
        for where, t in scopes:
            if t.micro_batch and t.grad_accum and t.global_batch \
                    and t.micro_batch * t.grad_accum * ranks != t.global_batch:
                raise ValueError(
                    f"{where}: micro_batch {t.micro_batch} × grad_accum {t.grad_accum} × "
                    f"{ranks} GPU(s) = {t.micro_batch * t.grad_accum * ranks}, not global_batch {t.global_batch}"
                )

    def _check_options(self) -> None:
        """Every stage's options typed against its engine's model, here, not when the stage starts;
        a 4-bit base on a plan for a machine without a GPU is refused here too (bitsandbytes'
        4-bit kernels run on CUDA only)."""
        for stage in self.stages:
            lora = getattr(stage_options(self, stage).engine, "lora", None)
            if lora is not None and lora.quantize_base != "none" and self.compute is not None \
                    and self.compute.gpu is None:
                raise ValueError(f"stage {stage.name!r}: a 4-bit (QLoRA) base needs a CUDA GPU, and this plan's "
                                 "compute has none; use lora.quantize_base: none, or a GPU budget")

    def _check_log_with(self) -> None:
        """One set of trackers per run: a stage that names its own is refused, not half-honoured."""
        for stage in self.stages:
            if stage.training is not None and stage.training.log_with is not None:
                raise ValueError(f"stage {stage.name!r}: training.log_with is the run's, not a stage's; "
                                 "set it in the plan's training")

    @property
    def timeline_seconds(self) -> int | None:
        return units.parse_duration(self.timeline) if self.timeline else None

    def training_for(self, stage: StageSpec) -> TrainingSpec:
        """The plan's training settings with the stage's own on top."""
        if stage.training is None:
            return self.training
        return self.training.model_copy(update=stage.training.model_dump(exclude_defaults=True))

    def stage(self, name: str) -> StageSpec:
        for stage in self.stages:
            if stage.name == name:
                return stage
        raise KeyError(name)


def required_residual(techniques: Techniques) -> str | None:
    """The residual mode the techniques imply: mhc → mhc, geometric_scaling → mgt."""
    if techniques.geometric_scaling is not None:
        return "mgt"
    if techniques.mhc is not None:
        return "mhc"
    return None
