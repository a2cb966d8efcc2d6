"""The one resolver: a stage's concrete settings from the plan, and the memory
and throughput models' input from those; no torch.

Design decisions:
- ``resolve(plan, stage, where)`` is the only place a training field gets a
  default, and the executor, the optimizer's fit, recovery, the report and
  ``plan adapt`` all call it, so what is priced is what runs. The plan may
  leave any field open (the optimizer fills them when it fits a plan to
  hardware); open fields resolve to: fp32 on CPU and on GPUs without bf16
  (fp16 needs loss scaling: the fit may choose it, and then writes it), bf16
  on GPUs that have it, micro-batch 8, AdamW lr 3e-4 with cosine decay to
  10%, weight decay 0.1, clipping at 1.0, warmup over 5% of the steps
  (``rewarm_fraction`` of it after a growth), DDP on several processes.
- A stage's settings are the plan-wide ``training`` with the stage's own on
  top; its options are typed by its engine (``plan/kinds.py``) and travel
  with the settings, so LoRA and a RL stage's sampling shape are priced as
  the engine runs them.
- ``train_config`` turns settings into the models' ``TrainConfig``. A RL
  stage's micro-batch is that many prompts, each sampled ``group_size``
  times (``samples`` for rejection sampling, plus T-SPMO's replayed groups),
  so it trains prompts × G sequences of prompt + ``max_new_tokens`` tokens,
  beside the KV cache of sampling them.
- The global batch is micro_batch × grad_accum × processes. When the plan
  names a global batch, the number of processes changes the accumulation,
  never the global batch, so one plan gives the same curve on 1 or 8 GPUs;
  a global batch the GPUs can't split evenly is refused with the numbers.
- A stage's budget is steps, or tokens turned into steps at the global batch
  and the sequence length.
- Memory settings the fit search may choose run as chosen or are refused
  here with a reason, never silently ignored (``_supported``): ``offload:
  optimizer`` (AdamW on the host), ``sharding: zero1`` (optimizer state
  sharded over processes) and ``zero2``/``zero3``/``fsdp`` (FSDP, GPUs only)
  run; ``offload: parameters``, ``adamw_8bit`` and combining offload with
  sharding are refused (``executor/optimizers.py`` says how each runs).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

from engines.architecture.config import ModelConfig
from engines.architecture.modes import fused_faster, fused_form
from engines.architecture.shapes import shape_for_params
from engines.options import LoraOptions
from muse_plan.errors import PlanError
from muse_plan.optimizer.config import FSDP_SHARDING, GenerationConfig, LoraConfig, TrainConfig
from muse_plan.plan.kinds import STAGE_KINDS, StageControl, TypedOptions, stage_options
from muse_plan.plan.spec import PlanSpec, StageSpec, TrainingSpec
from muse_plan.plan.units import parse_scale

DEFAULT_MICRO_BATCH = 8
DEFAULT_LR = 3e-4


@dataclass(frozen=True)
class StageSettings:
    name: str
    kind: str
    engine: str
    model: ModelConfig
    steps: int
    micro_batch: int
    grad_accum: int
    world_size: int
    precision: str  # fp32 | bf16 | fp16
    lr: float
    min_lr_ratio: float
    weight_decay: float
    warmup_steps: int
    schedule: str  # cosine | linear | constant | wsd
    clip_grad_norm: float | None
    checkpoint_every: int
    eval_every: int
    seed: int
    activation_checkpointing: str = "none"  # none | selective | full
    sharding: str = "none"  # none | ddp | zero1 | zero2 | zero3 | fsdp
    offload: str = "none"  # none | optimizer
    optimizer: str = "adamw"
    compile: bool = False  # the model's blocks under torch.compile (executor/compiled.py)
    compile_scope: str = "blocks"  # model | blocks: one graph, or one per block (``compile_scope``)
    compiled_head: bool = False  # muse's decoder's loss head compiled too (but where FSDP wraps the model)
    hf: bool = False  # a Hugging Face model (model.family: hf)
    cuda_graphs: bool = False  # the compiled regions replay CUDA graphs (``uses_cuda_graphs``)
    cuda_graphs_setting: str = "auto"  # the plan's training.cuda_graphs
    fused_kernels_setting: str = "auto"  # the plan's training.fused_kernels (model.fused_kernels: what it resolved to)
    eval_at_start: bool = False  # evaluate the starting weights before the first step (step 0)
    decode: str = "eager"  # how a GRPO-engine stage's sampling decodes (``decoding``)
    options: Any = None  # the engine's typed options (plan/kinds.py)
    control: StageControl = StageControl()
    lora: LoraOptions | None = None  # the adapters this stage trains, where its kind takes LoRA
    # checkpoints hold the LoRA adapters only: the base is model.init_from's, never changed (adapters_only)
    adapters_only: bool = False
    plateau: str | None = None  # grow_on_plateau | stop_on_plateau: the option that ends it at a plateau
    plateau_window: int | None = None

    @property
    def global_batch(self) -> int:
        return self.micro_batch * self.grad_accum * self.world_size

    @property
    def tokens_per_step(self) -> int:
        return self.global_batch * self.model.seq_len


def decoder_config(spec: PlanSpec, stage: StageSpec) -> ModelConfig:
    """The decoder shape a stage trains, whatever the family: the stage's shape,
    else the plan's, else the scale's; residual options from the techniques (their
    kernels from ``training.fused_kernels``); the
    stage's context (``seq_len``, else the plan's) with the rotary settings a
    context growth before it chose.
    The optimizer prices every stage with it; ``ValueError`` on a bad shape."""
    m = spec.model
    if m.family == "hf" and m.init_from and (Path(m.init_from).expanduser() / "config.json").is_file():
        return _hf_config(spec, stage)  # the model as its config.json says it is (else as the plan says)
    given = stage.shape or m.shape
    shape = given.resolved() if given is not None else shape_for_params(parse_scale(m.scale), m.vocab_size)
    t = spec.techniques
    extra: dict[str, object] = {}
    mixing = t.geometric_scaling or t.mhc
    if mixing is not None:
        extra.update(streams=mixing.streams, sinkhorn_iters=mixing.sinkhorn_iters, stream_dtype=mixing.stream_dtype)
    if t.geometric_scaling is not None:
        extra["beta_max"] = t.geometric_scaling.beta_max
    kernels = spec.training_for(stage).fused_kernels
    config = ModelConfig.from_shape(shape, m.vocab_size, stage.seq_len or m.seq_len,
                                    residual=m.residual or "standard",
                                    fused_kernels="off" if kernels in (None, "auto") else kernels, **extra)
    return grown_rope(spec, stage, config)  # a stage after a context growth: the rotary scaling it grew into


def kernels_and_graphs(kernels: str, graphs: str, compiled: bool, cuda: bool, grad_accum: int,
                       config: ModelConfig, world_size: int) -> tuple[ModelConfig, bool]:
    """The model with ``training.fused_kernels`` resolved, and whether its compiled regions replay CUDA
    graphs (``training.cuda_graphs``), decided together. ``kernels`` / ``graphs``: the plan's settings
    (``auto`` where it leaves them out).

    ``auto`` kernels (the default) in a stage compiled on a GPU (``compiles``: pretrain, continue,
    finetune): ``on`` where the connection's fused kernels compute the function the plan asks for and price
    below torch's fusion of it (``modes.fused_faster``, prices fitted to ``muse plan run`` at 350M on an
    H100, docs/bench_plan_run.md), given the graphs the step would replay with them on. So ddl and mhc with a
    bf16 state of 4 streams get them where a step is one micro-step on one process (replayed: ddl +5.4-7.9%
    over standard against +9%, mhc +33-38% against +47%), and torch's fusion where it sums micro-steps or
    runs on several processes (unreplayed, ddl's kernels measured +9.7%, level with torch's, and mhc's +90%
    against +50%, bound by their launches); mgt's bf16 state of 4 streams gets them either way (+55-60%
    against +83%). ``off`` elsewhere, an fp32 state of mhc / mgt among them (their kernels need the bf16
    state, a numeric choice the user makes). Stages not compiled (the GRPO engine's, or off a GPU) keep
    torch's: there the kernels were not timed, and a compiled stage's first step has a way back to torch's
    connections where they fail (``compiled.first_call``). The graphs then follow the kernels that run."""
    if compiled and kernels == "auto":
        replayed = uses_cuda_graphs(graphs, compiled, cuda, grad_accum, replace(config, fused_kernels="on"),
                                    world_size)
        config = replace(config, fused_kernels="on" if fused_faster(config, replayed) else "off")
    return config, uses_cuda_graphs(graphs, compiled, cuda, grad_accum, config, world_size)


def _hf_config(spec: PlanSpec, stage: StageSpec) -> ModelConfig:
    from engines.hf import hf_shape

    return ModelConfig(seq_len=stage.seq_len or spec.model.seq_len, **hf_shape(spec.model.init_from or ""))


def _lineage(spec: PlanSpec, stage: StageSpec) -> list[StageSpec]:
    """The stages whose weights lead to ``stage``'s, first to last (``from_stage``, else the one before)."""
    names = [s.name for s in spec.stages]
    chain, position = [], names.index(stage.name) if stage.name in names else None
    current: StageSpec | None = stage
    while current is not None and position is not None and len(chain) <= len(names):
        chain.append(current)
        previous = current.from_stage or (names[position - 1] if position else None)
        position = names.index(previous) if previous in names else None
        current = spec.stages[position] if position is not None else None
    return chain[::-1]


def grown_rope(spec: PlanSpec, stage: StageSpec, config: ModelConfig) -> ModelConfig:
    """``config`` (``stage``'s model, default rotary settings) with the rotary settings
    its weights were grown into: every grow stage on the way that lengthens the
    context applies its ``rope`` scaling (``engines.growth.context``); any other
    stage keeps what its source had."""
    from engines.growth.context import extended_config  # torch-free

    chain = _lineage(spec, stage)
    if not chain:  # a stage outside the plan's list has no lineage
        return config
    seq = [s.seq_len or spec.model.seq_len for s in chain]
    current = replace(config, seq_len=seq[0])
    for s, length in zip(chain[1:], seq[1:]):
        if STAGE_KINDS[s.kind].engine == "growth" and length > current.seq_len:
            current = extended_config(current, length, stage_options(spec, s).engine.rope)
        current = replace(current, seq_len=length)
    return replace(config, rope_theta=current.rope_theta, rope_scale=current.rope_scale)


def frozen_precision(s: StageSettings) -> str:
    """The dtype an engine keeps weights that never train in (LoRA's base, a KL reference):
    the compute dtype, except where FSDP shards the parameters (it flattens one dtype)."""
    return "fp32" if s.sharding in FSDP_SHARDING else s.precision


def engine_options(spec: PlanSpec, stage: StageSpec) -> Any:
    """The engine's typed options for ``stage`` (``plan/kinds.py``); a bad option is a plan error."""
    return typed_options(spec, stage).engine


def typed_options(spec: PlanSpec, stage: StageSpec) -> TypedOptions:
    try:
        return stage_options(spec, stage)
    except ValueError as exc:
        raise PlanError(str(exc)) from None


def model_config(spec: PlanSpec, stage: StageSpec) -> ModelConfig:
    """The decoder the architecture engine trains for ``stage``; refused as a plan error."""
    if spec.model.family == "hf" and stage.kind == "pretrain":
        raise PlanError(f"stage {stage.name!r}: a pretrain stage trains muse's decoder from scratch; a Hugging "
                        "Face model (model.family hf) is trained further by a continue or finetune stage")
    if spec.model.family == "hf" and not spec.model.init_from:
        raise PlanError("model.family hf needs model.init_from: the local folder of the Hugging Face model")
    try:
        return _hf_config(spec, stage) if spec.model.family == "hf" else decoder_config(spec, stage)
    except ValueError as exc:
        raise PlanError(f"stage {stage.name!r}: {exc}") from None


def _priced_config(spec: PlanSpec, stage: StageSpec) -> ModelConfig:
    """The decoder shape priced for a stage, whatever engine could train it (only the shape matters)."""
    try:
        return decoder_config(spec, stage)
    except ValueError as exc:
        raise PlanError(f"stage {stage.name!r}: {exc}") from None


def _batching(spec: PlanSpec, stage: StageSpec, world_size: int) -> tuple[int, int]:
    t = spec.training_for(stage)
    if t.global_batch is None:
        return t.micro_batch or DEFAULT_MICRO_BATCH, t.grad_accum or 1
    per_process, rest = divmod(t.global_batch, world_size)
    if rest:
        raise PlanError(f"global_batch {t.global_batch} can't be split evenly over {world_size} processes")
    micro = t.micro_batch or min(DEFAULT_MICRO_BATCH, per_process)
    accum, rest = divmod(per_process, micro)
    if rest:
        fits = max(d for d in range(1, min(micro, per_process) + 1) if per_process % d == 0)
        raise PlanError(
            f"global_batch {t.global_batch} is not a multiple of micro_batch {micro} × {world_size} "
            f"processes; choose a global batch divisible by {micro * world_size}, or training.micro_batch "
            f"{fits} ({per_process} sequences a process)"
        )
    return micro, accum


# training fields the executor can't honour (yet): refused, never silently ignored
NOT_YET = {
    "sharding": ("none", "ddp", "zero1", "zero2", "zero3", "fsdp"),
    "offload": ("none", "optimizer"),
    "optimizer": ("adamw", "adamw_8bit"),
}
WHY_NOT = {
    ("offload", "parameters"): "streaming the weights from host RAM layer by layer (FSDP's CPU offload) is not "
                               "wired into the loop",
}


def refusal(sharding: str, offload: str, optimizer: str, cuda: bool) -> str | None:
    """Why the executor can't run these memory settings, or None when it can."""
    for name, value in (("sharding", sharding), ("offload", offload), ("optimizer", optimizer)):
        accepted = NOT_YET[name]
        if value not in accepted:
            why = WHY_NOT.get((name, value))
            return (f"training.{name} {value!r} is not supported by the executor yet"
                    + (f" ({why})" if why else "") + f"; use {' or '.join(accepted)}")
    if sharding in FSDP_SHARDING and not cuda:
        return (f"training.sharding {sharding!r} runs through FSDP, which needs GPUs; "
                "on CPU use none, ddp or zero1")
    if optimizer == "adamw_8bit":
        if offload != "none" or sharding not in ("none", "ddp"):
            return ("training.optimizer 'adamw_8bit' (bitsandbytes' paged 8-bit AdamW) runs without offload or "
                    "sharding; use adamw there")
        if not cuda:
            return "training.optimizer 'adamw_8bit' needs a CUDA GPU (bitsandbytes' 8-bit optimizers); use adamw"
    if offload != "none" and sharding not in ("none", "ddp"):
        return (f"training.offload {offload!r} with sharding {sharding!r} is not supported by the "
                "executor yet; offload the optimizer without sharding, or shard without offload")
    return None


def _supported(t: TrainingSpec, cuda: bool) -> None:
    """Runnable here: the settings (``refusal``) and the packages they need on this machine."""
    why = refusal(t.sharding or "none", t.offload or "none", t.optimizer or "adamw", cuda)
    if why is None and t.optimizer == "adamw_8bit":
        from engines.hf import has_bitsandbytes

        if not has_bitsandbytes():
            why = "training.optimizer 'adamw_8bit' needs bitsandbytes: pip install -e '.[qlora]'"
    if why is not None:
        raise PlanError(why)


def adapters_only(spec: PlanSpec, stage: StageSpec) -> bool:
    """Whether the stage's frozen base is ``model.init_from``'s Hugging Face model as it is:
    a LoRA stage on an hf model that starts from nothing, or from such a stage with the
    same adapters (which it continues). Its checkpoints then hold the adapters only, and
    a 4-bit (QLoRA) base, which can't be stored and reloaded, is possible."""
    mine = _lora_of(spec, stage)
    if spec.model.family != "hf" or mine is None:
        return False
    source = _source(spec, stage)
    if source is None:
        return True
    theirs = _lora_of(spec, source)
    return theirs is not None and _adapters(theirs) == _adapters(mine) and adapters_only(spec, source)


def _no_4bit(spec: PlanSpec, stage: StageSpec, cuda: bool, sharding: str) -> str | None:
    """Why a stage's 4-bit (QLoRA) base can't run here, or None. Every stage kind that
    takes LoRA takes it on a 4-bit base (scripts/check_qlora_gpu.py runs them on a GPU)."""
    if spec.model.family != "hf":
        return "a 4-bit (QLoRA) base is loaded from a Hugging Face model (model.family hf, model.init_from)"
    if sharding not in ("none", "ddp"):
        return f"a 4-bit (QLoRA) base runs on one GPU or under DDP, not with sharding {sharding!r}"
    source = _source(spec, stage)
    if source is not None and not adapters_only(spec, stage):
        theirs = _lora_of(spec, source)
        if theirs is None or not adapters_only(spec, source):
            return (f"a 4-bit base is model.init_from's, and this stage starts from stage {source.name!r}, "
                    "whose trained full-precision weights muse can't quantize; give that stage the same LoRA")
        return (f"stage {source.name!r} trained other LoRA adapters, which a 4-bit base can't take merged; "
                "give both stages the same lora rank, alpha, target_modules and layers_fraction")
    from engines.hf import quantization_unavailable

    return quantization_unavailable(cuda)


def _adapters(lora: Any) -> tuple[Any, ...]:
    return lora.rank, lora.alpha, tuple(lora.target_modules), lora.layers_fraction


def _lora_of(spec: PlanSpec, stage: StageSpec) -> Any:
    """A stage's LoRA options (None where it has none)."""
    if not STAGE_KINDS[stage.kind].lora:
        return None
    return getattr(typed_options(spec, stage).engine, "lora", None)


def _source(spec: PlanSpec, stage: StageSpec) -> StageSpec | None:
    """The stage whose weights ``stage`` starts from (``from_stage``, else the one before)."""
    chain = _lineage(spec, stage)
    return chain[-2] if len(chain) > 1 else None


def compiles(setting: str, kind: str, cuda: bool) -> bool:
    """``training.compile``: the architecture engine's stages (their blocks see one shape
    a step; the GRPO engine's sampling a new one each token) — on a GPU under ``auto``."""
    return STAGE_KINDS[kind].engine == "architecture" and STAGE_KINDS[kind].trains and (
        setting == "on" or (setting == "auto" and cuda))


def compile_scope(setting: str, sharding: str) -> str:
    """``training.compile_scope``: ``model`` compiles the whole model as one graph,
    ``blocks`` each repeated block (and muse's loss head). ``auto`` is ``blocks``.
    FSDP and ZeRO-3 shard around the blocks, so they always compile blocks."""
    if sharding in ("fsdp", "zero3"):
        return "blocks"
    return "model" if setting == "model" else "blocks"


def uses_cuda_graphs(setting: str, compiled: bool, cuda: bool, grad_accum: int, model: ModelConfig,
                     world_size: int = 1) -> bool:
    """``training.cuda_graphs``: the compiled regions replay their kernels from CUDA graphs (Inductor's
    ``reduce-overhead``), on a GPU, where a step is one micro-step (a replay would overwrite the gradients a
    step sums, pytorch#169545). ``auto``: where they were measured faster, the fused connections
    (``graphs_measured_faster``), on one process: they were never run under DDP or sharding, where FSDP
    frees and gathers the parameters a replay would read; standard gained nothing (100.4 ms a step against
    ~100 at 350M on an H100) and kept 0.9 GiB more (docs/bench_plan_run.md)."""
    if not (compiled and cuda and grad_accum == 1) or setting == "off":
        return False
    return setting == "on" or (world_size == 1 and graphs_measured_faster(model))


def graphs_measured_faster(model: ModelConfig) -> bool:
    """The connections whose steps CUDA graphs made faster through ``muse plan run`` (350M, H100):
    ``fused_kernels: on`` for ddl (110.8 → 108.1 ms a step), and for mhc and mgt with a bf16 state of
    4 streams, the form their kernels run in (mhc 190.6 → 138.7 ms, its step bound by the kernels'
    launches; mgt 161.9 → 157.9)."""
    return model.fused_kernels == "on" and fused_form(model)


def decoding(setting: str, kind: str, cuda: bool, hf: bool = False) -> str:
    """``training.compile`` for the GRPO engine's stages, whose sampling decodes a token
    at a time (``engines/grpo/policy.py``): on a GPU ``auto`` and ``on`` compile muse's
    decoder's step and replay it from a CUDA graph (~20 s of compiling once; 755
    completions/s against 415 replayed uncompiled, docs/bench_grpo.md); a Hugging Face
    model's step over its static cache is replayed uncompiled; ``off`` launches every
    kernel as it comes."""
    if not cuda or setting == "off" or STAGE_KINDS[kind].engine != "grpo":
        return "eager"
    return "graphs" if hf else "compiled"


def default_precision(cuda: bool, bf16: bool) -> str:
    return "bf16" if cuda and bf16 else "fp32"


def resolve(spec: PlanSpec, stage: StageSpec, *, world_size: int = 1, cuda: bool = False,
            bf16: bool = False, check: bool = True) -> StageSettings:
    """Concrete settings for ``stage`` on ``world_size`` processes (GPUs if ``cuda``).
    ``check=False`` resolves settings the executor can't run yet, for pricing."""
    t = spec.training_for(stage)
    if check:
        _supported(t, cuda)
    config = model_config(spec, stage) if check else _priced_config(spec, stage)
    compiled = compiles(t.compile or "auto", stage.kind, cuda)
    micro, accum = _batching(spec, stage, world_size)
    hf = spec.model.family == "hf"  # a Hugging Face model has no connections of muse's
    config, graphs = kernels_and_graphs("off" if hf else t.fused_kernels or "auto", t.cuda_graphs or "auto",
                                        compiled, cuda, accum, config, world_size)
    if stage.steps is not None:
        steps = stage.steps
    elif stage.tokens is not None:
        steps = max(1, math.ceil(parse_scale(stage.tokens) / (micro * accum * world_size * config.seq_len)))
    elif not STAGE_KINDS[stage.kind].trains:
        steps = 0
    else:
        raise PlanError(f"stage {stage.name!r} has no budget; give it steps or tokens")
    precision = t.precision or default_precision(cuda, bf16)
    if precision == "fp16" and not cuda and check:
        raise PlanError("precision fp16 needs a GPU; use fp32 or bf16 on CPU")
    typed = typed_options(spec, stage)
    lora = getattr(typed.engine, "lora", None) if STAGE_KINDS[stage.kind].lora else None
    if check and lora is not None and lora.quantize_base != "none":
        why = _no_4bit(spec, stage, cuda, t.sharding or "none")
        if why is not None:
            raise PlanError(f"stage {stage.name!r}: {why}; or use lora.quantize_base: none")
    control = typed.control
    warmup = t.warmup_steps if t.warmup_steps is not None else max(1, steps // 20)
    if control.rewarm_fraction is not None:
        from engines.growth.schedule import rewarm_steps

        warmup = rewarm_steps(steps, control.rewarm_fraction)
    default_every = max(1, min(1000, steps // 10))
    sharding = t.sharding or ("ddp" if world_size > 1 else "none")
    window = getattr(control, control.plateau) if control.plateau else None
    scope = compile_scope(t.compile_scope or "auto", sharding)
    return StageSettings(
        name=stage.name, kind=stage.kind, engine=stage.engine or "", model=config, steps=steps,
        micro_batch=micro, grad_accum=accum, world_size=world_size, precision=precision,
        lr=t.lr or DEFAULT_LR,
        min_lr_ratio=0.1 if t.min_lr_ratio is None else t.min_lr_ratio,
        weight_decay=0.1 if t.weight_decay is None else t.weight_decay,
        warmup_steps=min(steps, warmup),
        schedule=t.schedule or "cosine",
        clip_grad_norm=1.0 if t.clip_grad_norm is None else t.clip_grad_norm,
        checkpoint_every=stage.checkpoint_every or default_every,
        eval_every=stage.eval_every or default_every,
        eval_at_start=bool(stage.eval_at_start),
        seed=t.seed,
        activation_checkpointing=t.activation_checkpointing or "none",
        sharding=sharding, offload=t.offload or "none",
        optimizer=t.optimizer or "adamw",
        compile=compiled,
        compile_scope=scope, hf=spec.model.family == "hf",
        compiled_head=compiled and spec.model.family != "hf",
        cuda_graphs=graphs,
        cuda_graphs_setting=t.cuda_graphs or "auto", fused_kernels_setting=t.fused_kernels or "auto",
        decode=decoding(t.compile or "auto", stage.kind, cuda, hf=spec.model.family == "hf"),
        options=typed.engine, control=control,
        lora=lora, adapters_only=adapters_only(spec, stage),
        plateau=control.plateau,
        plateau_window=None if window is None else int(spec.alerts.get("plateau", 200)) if window is True else window,
    )


PROMPT_TOKENS = 128  # a RL prompt's tokens as priced where the stage trains on the user's rows
TASK_SAMPLES = 256  # generated problems a task's longest prompt is taken over


def prompt_tokens(options: Any) -> int:
    """A stage's prompt as priced, in tokens: for generated ``tasks``, the longest of ``TASK_SAMPLES``
    problems of each as ``prompt_template`` shows it, in bytes, plus two (BOS, and a tokenizer's word-start
    piece) — every tokenizer muse reads takes at least a byte a token, so no prompt of the stage is
    longer; ``PROMPT_TOKENS`` for the user's rows (``data``)."""
    tasks = getattr(options, "tasks", None)
    if getattr(options, "data", None) or not tasks:
        return PROMPT_TOKENS
    return _longest_prompt_bytes(tuple(tasks), getattr(options, "prompt_template", "{prompt}")) + 2


@functools.lru_cache(maxsize=64)
def _longest_prompt_bytes(tasks: tuple[str, ...], template: str) -> int:
    import random

    from engines.data.arithmetic import task

    rng = random.Random(0)
    return max(len(template.replace("{prompt}", task(name)(rng).prompt).encode())
               for name in tasks for _ in range(TASK_SAMPLES))


def train_config(s: StageSettings) -> TrainConfig | None:
    """The memory and throughput models' input for a stage as the executor runs it;
    None for a stage kind the models don't price (``StageKind.priced``)."""
    kind = STAGE_KINDS[s.kind]
    if kind.priced is not None:
        return None
    lora = None
    if s.lora is not None:
        lora = LoraConfig(rank=s.lora.rank, target_modules=tuple(s.lora.target_modules),
                          layers_fraction=s.lora.layers_fraction, quantize_base=s.lora.quantize_base)
    model, micro, generation = s.model, s.micro_batch, None
    if kind.generates:
        o = s.options
        group = getattr(o, "group_size", None) or getattr(o, "samples")
        prompts = s.micro_batch + getattr(o, "success_budget", 0) + getattr(o, "failure_budget", 0) \
            if getattr(o, "replay", False) else s.micro_batch
        reference = kind.kl_reference and getattr(o, "kl_beta", 0.0) > 0
        prompt = prompt_tokens(o)
        generation = GenerationConfig(prompts=prompts, group_size=group, prompt_tokens=prompt,
                                      completion_tokens=o.max_new_tokens, reference_model=reference,
                                      decode=s.decode)
        model = replace(model, seq_len=prompt + o.max_new_tokens)
        micro = prompts * group  # every completion of every group trains in one micro-step
    return TrainConfig(model=model, micro_batch=micro, grad_accum=s.grad_accum, world_size=s.world_size,
                       precision=s.precision, checkpointing=s.activation_checkpointing, sharding=s.sharding,
                       offload=s.offload, optimizer=s.optimizer, lora=lora, generation=generation,
                       compiled=s.compile, compiled_head=s.compiled_head, hf=s.hf, cuda_graphs=s.cuda_graphs,
                       chunked_loss=kind.engine == "grpo" or s.hf)  # the GRPO engine's; an HF model's loss


def _wsd(progress: float, floor: float, decay_from: float = 0.8) -> float:
    if progress < decay_from:
        return 1.0
    return 1.0 - (1.0 - floor) * (progress - decay_from) / (1.0 - decay_from)


# after warmup: progress in [0, 1] and the floor (min_lr_ratio) -> lr multiplier
SCHEDULES: dict[str, Callable[[float, float], float]] = {
    "cosine": lambda p, floor: floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * p)),
    "linear": lambda p, floor: 1.0 - (1.0 - floor) * p,
    "constant": lambda p, floor: 1.0,
    "wsd": _wsd,  # warmup-stable-decay: hold, then decay linearly over the last 20%
}


def lr_factor(step: int, s: StageSettings) -> float:
    """Multiplier on the peak lr for optimizer step ``step`` (0-based): linear
    warmup to 1, then the schedule down to ``min_lr_ratio`` at the last step."""
    if step < s.warmup_steps:
        return (step + 1) / s.warmup_steps
    progress = min(1.0, (step - s.warmup_steps) / max(1, s.steps - 1 - s.warmup_steps))
    return SCHEDULES[s.schedule](progress, s.min_lr_ratio)
