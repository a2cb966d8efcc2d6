"""Fit a plan to hardware: choose its training settings, or say honestly that
it does not fit and what does.

Design decisions:
- Settings are the plan's (``training`` is plan-wide), so the search is
  joint: a candidate (precision, micro-batch with accumulation keeping the
  global batch, checkpointing, sharding, offload, LoRA where a stage allows
  it) fits when every trained stage's predicted peak fits, and costs the
  sum of the stages' predicted times. The fastest fitting candidate wins;
  ties go to the one that changes least.
- Verdicts: ``fits`` — the plan's own settings (open fields at the
  executor's defaults) fit; the search may still fill the fields the plan
  left open with faster choices, but changes nothing the plan wrote.
  ``fits_with_changes`` — only a candidate that changes written settings
  fits; the changes are listed. ``does_not_fit`` — nothing in the search
  space fits; ranked alternatives follow, each a whole plan (and hardware)
  that passes this same fit.
- A safety margin (10% of each GPU's memory, or of the memory budget's share)
  is kept free: the memory model is checked against measurements, not exact.
- Stages no engine trains (``grow``) or that the memory model does not price
  yet (``representation``) are listed as not priced rather than guessed.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field, replace
from typing import Any, Iterator

from engines.architecture.config import ModelConfig
from muse_plan.executor.settings import DEFAULT_MICRO_BATCH, decoder_config
from muse_plan.hardware.catalog import CATALOG, GpuKind, lookup, variant
from muse_plan.optimizer import memory, throughput
from muse_plan.optimizer.config import GenerationConfig, LoraConfig, TrainConfig
from muse_plan.plan.shapes import STANDARD_SHAPES
from muse_plan.plan.spec import PlanSpec, StageSpec
from muse_plan.plan.units import format_count, parse_scale

SAFETY_MARGIN = 0.10
GIB = 2**30
LORA_KINDS = frozenset({"finetune", "cold_start_sft", "reasoning_rl", "rejection_sampling", "all_scenarios_rl"})
GENERATION_KINDS = frozenset({"reasoning_rl", "rejection_sampling", "all_scenarios_rl"})
NOT_PRICED = {"grow": "growth changes weights, it does not train", "representation": "not priced yet"}


@dataclass(frozen=True)
class Hardware:
    gpu: GpuKind | None  # None: CPU only
    count: int
    memory_gib: float  # usable per device before the margin (card, or budget share); CPU: host RAM
    host_ram_gib: float
    network_gbps: float | None = None
    cpu_cores: int = 2

    @property
    def processes(self) -> int:
        return max(1, self.count)

    @property
    def limit_bytes(self) -> int:
        return int(self.memory_gib * (1 - SAFETY_MARGIN) * GIB)

    def describe(self) -> str:
        if self.gpu is None:
            return f"cpu ({self.cpu_cores} cores, {self.host_ram_gib:.0f} GiB RAM)"
        return f"{self.count}x{self.gpu.key}-{self.gpu.memory_gib:g}GB"


def hardware_for(spec: PlanSpec, *, gpu: str | None = None, count: int | None = None,
                 memory_budget_gib: float | None = None, network_gbps: float | None = None,
                 host: Any = None) -> Hardware:
    """The plan's compute (flags override it), or this machine's when the plan names none."""
    c = spec.compute
    if host is None:
        from muse_plan.hardware.detect import detect

        host = detect(use_torch=False)
    cores = host.cores_physical or host.cores_logical or 1
    ram = (c.host_ram_gib if c and c.host_ram_gib else None) or host.ram_gib
    name = gpu or (c.gpu if c else None)
    if c is None and gpu is None:
        name = host.gpus[0].kind if host.gpus else None
        count = count or len(host.gpus)
    kind = lookup(name) if name else None
    if name and kind is None:
        raise ValueError(f"unknown GPU {name!r}; known: {', '.join(CATALOG)}")
    if kind is None:
        return Hardware(None, 0, ram, ram, network_gbps, cores)
    per_gpu = (c.memory_gib if c and c.gpu == kind.key and c.memory_gib else None) or kind.memory_gib
    kind = variant(kind, per_gpu)
    n = count or (c.count if c and c.count else 1)
    budget = memory_budget_gib or (c.memory_budget_gib if c else None)
    usable = min(per_gpu, budget / n) if budget else per_gpu
    return Hardware(kind, n, usable, ram, network_gbps or (c.network_gbps if c else None), cores)


@dataclass(frozen=True)
class Settings:
    """The plan-wide training settings one candidate proposes."""

    precision: str
    micro_batch: int
    grad_accum: int
    checkpointing: str
    sharding: str
    offload: str
    optimizer: str = "adamw"
    lora: bool = False

    FIELDS = {"precision": "precision", "micro_batch": "micro_batch", "grad_accum": "grad_accum",
              "checkpointing": "activation_checkpointing", "sharding": "sharding", "offload": "offload",
              "optimizer": "optimizer"}


@dataclass
class StageFit:
    name: str
    kind: str
    steps: int
    config: TrainConfig | None
    memory: memory.MemoryBreakdown | None
    time: throughput.StepTime | None
    note: str = ""

    @property
    def seconds(self) -> float:
        return self.time.seconds * self.steps if self.time else 0.0


@dataclass
class Candidate:
    settings: Settings
    stages: list[StageFit]
    limit: int
    host_limit: int

    @property
    def priced(self) -> list[StageFit]:
        return [s for s in self.stages if s.memory is not None]

    @property
    def peak(self) -> int:
        return max((s.memory.total for s in self.priced), default=0)

    @property
    def fits(self) -> bool:
        return all(s.memory.total <= self.limit and s.memory.host <= self.host_limit for s in self.priced)

    @property
    def seconds(self) -> float:
        return sum(s.seconds for s in self.stages)


@dataclass
class Alternative:
    title: str
    detail: str
    spec: PlanSpec
    hardware: Hardware
    result: FitResult


@dataclass
class FitResult:
    spec: PlanSpec
    hardware: Hardware
    verdict: str  # fits | fits_with_changes | does_not_fit
    written: Candidate
    chosen: Candidate | None
    changes: list[tuple[str, Any, Any]] = field(default_factory=list)
    alternatives: list[Alternative] = field(default_factory=list)
    eta: throughput.Eta | None = None
    meets: throughput.Meets | None = None  # what would meet a missed timeline

    @property
    def fitted_spec(self) -> PlanSpec | None:
        if self.chosen is None:
            return None
        return apply_settings(self.spec, self.chosen.settings, self.hardware)


# ---- plan → configurations ---------------------------------------------------

# the decoder a stage trains, for pricing (any family: only the shape matters)
stage_model = decoder_config


def _generation(spec: PlanSpec, stage: StageSpec) -> GenerationConfig:
    t = spec.techniques
    algo = t.grpo or t.s_grpo or t.t_spmo
    group = algo.group_size if algo else 8
    new = t.grpo.max_new_tokens if t.grpo else 300
    # a KL reference only in the RL stages whose β is above 0 (the engine takes none otherwise)
    beta = float(stage.options.get("kl_beta", getattr(algo, "kl_beta", 0.0)))
    return GenerationConfig(prompts=1, group_size=group, prompt_tokens=128, completion_tokens=new,
                            reference_model=stage.kind in ("reasoning_rl", "all_scenarios_rl") and beta > 0)


def _lora(spec: PlanSpec) -> LoraConfig:
    o = spec.techniques.lora
    if o is None:  # the optimizer proposing LoRA: adapt everything, the common QLoRA recipe
        return LoraConfig(rank=16, target_modules=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                   "up_proj", "down_proj"), layers_fraction=1.0)
    return LoraConfig(rank=o.rank, target_modules=tuple(o.target_modules), layers_fraction=o.layers_fraction,
                      quantize_base=o.quantize_base)


def global_batch(spec: PlanSpec, hw: Hardware) -> int:
    t = spec.training
    if t.global_batch:
        return t.global_batch
    return (t.micro_batch or DEFAULT_MICRO_BATCH) * (t.grad_accum or 1) * hw.processes


def stage_steps(spec: PlanSpec, stage: StageSpec, batch: int, seq_len: int) -> int:
    if stage.steps:
        return stage.steps
    if stage.tokens:
        return max(1, math.ceil(parse_scale(stage.tokens) / (batch * seq_len)))
    return 0


def price(spec: PlanSpec, s: Settings, hw: Hardware, models: list[ModelConfig] | None = None) -> Candidate:
    """Every stage of ``spec`` under settings ``s`` on ``hw``: memory and time."""
    batch = global_batch(spec, hw)
    stages = []
    models = models or [stage_model(spec, stage) for stage in spec.stages]
    for stage, model in zip(spec.stages, models):
        steps = stage_steps(spec, stage, batch, model.seq_len)
        if stage.kind in NOT_PRICED:
            stages.append(StageFit(stage.name, stage.kind, steps, None, None, None, NOT_PRICED[stage.kind]))
            continue
        lora = _lora(spec) if (s.lora or spec.techniques.lora) and stage.kind in LORA_KINDS else None
        cfg = TrainConfig(model=model, micro_batch=s.micro_batch, grad_accum=s.grad_accum,
                          world_size=hw.processes, precision=s.precision, checkpointing=s.checkpointing,
                          sharding=s.sharding, offload=s.offload, optimizer=s.optimizer, lora=lora,
                          generation=_generation(spec, stage) if stage.kind in GENERATION_KINDS else None)
        mem = memory.estimate(cfg, device="cuda" if hw.gpu else "cpu")
        time = throughput.step_time(cfg, hw.gpu, cpu_cores=hw.cpu_cores, network_gbps=hw.network_gbps)
        stages.append(StageFit(stage.name, stage.kind, steps, cfg, mem, time))
    host_limit = int(hw.host_ram_gib * 0.8 * GIB / (hw.processes if hw.gpu else 1))
    return Candidate(s, stages, hw.limit_bytes, host_limit)


# ---- the search ------------------------------------------------------------------

def written_settings(spec: PlanSpec, hw: Hardware) -> Settings:
    """The plan's settings, open fields at the executor's defaults."""
    t = spec.training
    batch = global_batch(spec, hw)
    micro = t.micro_batch or min(DEFAULT_MICRO_BATCH, batch // hw.processes)
    return Settings(
        precision=t.precision or _default_precision(hw),
        micro_batch=micro,
        grad_accum=max(1, batch // (micro * hw.processes)),
        checkpointing=t.activation_checkpointing or "none",
        sharding=t.sharding or ("ddp" if hw.processes > 1 else "none"),
        offload=t.offload or "none",
        optimizer=t.optimizer or "adamw",
        lora=spec.techniques.lora is not None,
    )


def _default_precision(hw: Hardware) -> str:
    if hw.gpu is None:
        return "fp32"
    return "bf16" if hw.gpu.bf16 else "fp16"


def _choices(spec: PlanSpec, hw: Hardware, free: set[str]) -> dict[str, list[Any]]:
    """Values each setting may take; a setting not in ``free`` keeps the plan's."""
    base = written_settings(spec, hw)
    per_process = global_batch(spec, hw) // hw.processes
    options: dict[str, list[Any]] = {
        "precision": ["bf16", "fp16", "fp32"] if hw.gpu and hw.gpu.bf16 else ["fp16", "fp32"] if hw.gpu else ["fp32"],
        "micro_batch": [m for m in (1, 2, 4, 8, 16, 32, 64) if per_process % m == 0] or [per_process],
        "checkpointing": ["none", "selective", "full"],
        "sharding": ["ddp", "zero1", "zero2", "zero3"] if hw.processes > 1 else ["none"],
        "offload": ["none", "optimizer", "parameters"] if hw.gpu else ["none"],
        # the plan's LoRA stays; the optimizer may propose it only where a stage fine-tunes
        "lora": [True] if spec.techniques.lora else
                [False, True] if any(s.kind in LORA_KINDS for s in spec.stages) else [False],
    }
    return {k: (v if k in free else [getattr(base, k)]) for k, v in options.items()}


def _candidates(spec: PlanSpec, hw: Hardware, free: set[str]) -> Iterator[Settings]:
    choices = _choices(spec, hw, free)
    per_process = global_batch(spec, hw) // hw.processes
    for prec, micro, ckpt, shard, off, lora in itertools.product(*choices.values()):
        yield Settings(prec, micro, max(1, per_process // micro), ckpt, shard, off,
                       written_settings(spec, hw).optimizer, lora)


def _open_fields(spec: PlanSpec) -> set[str]:
    t = spec.training
    free = {k for k, name in Settings.FIELDS.items() if getattr(t, name) is None}
    return free - {"optimizer", "grad_accum"}  # accumulation follows the micro-batch


TIE = 0.02  # candidates within 2% of the fastest count as equally fast


def search(spec: PlanSpec, hw: Hardware, free: set[str]) -> Candidate | None:
    """The fastest fitting candidate varying ``free`` settings; None when none fits.

    The throughput model resolves time to about 10%, so candidates within 2% of
    the fastest are ties; a tie goes to the largest micro-batch (fewer
    micro-steps: less launch, accumulation and optimizer overhead per token
    than the model sees, and the memory the user paid for put to work), then
    to the one that changes least.
    """
    models = [stage_model(spec, stage) for stage in spec.stages]
    if not _could_fit(spec, hw, free, models):
        return None
    fitting = [c for c in (price(spec, s, hw, models) for s in _candidates(spec, hw, free)) if c.fits]
    if not fitting:
        return None
    fastest = min(c.seconds for c in fitting)
    base = written_settings(spec, hw)
    ties = [c for c in fitting if c.seconds <= fastest * (1 + TIE)]
    return max(ties, key=lambda c: (c.settings.micro_batch, -len(_changes(base, c.settings)), -c.seconds))


def _could_fit(spec: PlanSpec, hw: Hardware, free: set[str], models: list[ModelConfig]) -> bool:
    """Whether the most frugal choice of each free setting fits: when it does
    not, nothing in the search space does (a quick no for hardware far too small).
    Precision and offload are not monotone in memory (autocast keeps bf16 weight
    copies; offload trades device memory for host RAM), so each is tried."""
    choices = _choices(spec, hw, free)
    micro = min(choices["micro_batch"])
    frugal = Settings(
        precision=choices["precision"][0], micro_batch=micro,
        grad_accum=max(1, global_batch(spec, hw) // hw.processes // micro),
        checkpointing="full" if "full" in choices["checkpointing"] else choices["checkpointing"][0],
        sharding=choices["sharding"][-1], offload=choices["offload"][0],
        optimizer=written_settings(spec, hw).optimizer, lora=choices["lora"][-1])
    return any(price(spec, replace(frugal, precision=p, offload=o), hw, models).fits
               for p in choices["precision"] for o in choices["offload"])


ALL_FIELDS = {"precision", "micro_batch", "checkpointing", "sharding", "offload", "lora"}


def fit(spec: PlanSpec, hw: Hardware, *, alternatives: bool = True) -> FitResult:
    written = price(spec, written_settings(spec, hw), hw)
    if written.fits:
        chosen = search(spec, hw, _open_fields(spec)) or written
        verdict = "fits"
    else:
        chosen = search(spec, hw, ALL_FIELDS)
        verdict = "fits_with_changes" if chosen else "does_not_fit"
    result = FitResult(spec, hw, verdict, written, chosen)
    if chosen is not None:
        result.changes = _changes(written.settings, chosen.settings)
        result.eta = throughput.eta([(s.name, s.steps, s.time) for s in chosen.priced],
                                    parse_timeline(spec))
        if result.eta.meets is False:
            result.meets = throughput.what_meets([(s.name, s.steps, s.config) for s in chosen.priced], hw.gpu,
                                                 result.eta.timeline_s, cpu_cores=hw.cpu_cores,
                                                 network_gbps=hw.network_gbps)
    elif alternatives:
        from muse_plan.optimizer.alternatives import propose

        result.alternatives = propose(spec, hw)
    return result


def parse_timeline(spec: PlanSpec) -> float | None:
    if not spec.timeline:
        return None
    from muse_plan.plan.units import parse_duration

    return parse_duration(spec.timeline)


def _changes(a: Settings, b: Settings) -> list[tuple[str, Any, Any]]:
    names = list(Settings.FIELDS) + ["lora"]
    return [(n, getattr(a, n), getattr(b, n)) for n in names if getattr(a, n) != getattr(b, n)]


def apply_settings(spec: PlanSpec, s: Settings, hw: Hardware) -> PlanSpec:
    """The plan with the chosen settings written into ``training`` (and LoRA added),
    its compute set to the hardware they were fitted to."""
    from muse_plan.plan.io import spec_from_dict, spec_to_dict

    data = spec_to_dict(spec)
    training = dict(data.get("training") or {})
    training.update({name: getattr(s, key) for key, name in Settings.FIELDS.items()})
    training["global_batch"] = global_batch(spec, hw)
    data["training"] = training
    # the settings hold for the hardware they were fitted to: the plan says so
    compute = {k: v for k, v in (data.get("compute") or {}).items() if k not in ("gpu", "count", "memory_gib")}
    if hw.gpu is not None:
        compute.update(gpu=hw.gpu.key, count=hw.count, memory_gib=hw.gpu.memory_gib)
    data["compute"] = compute
    if s.lora and spec.techniques.lora is None:
        data.setdefault("techniques", {})["lora"] = {"rank": 16, "layers_fraction": 1.0,
                                                     "target_modules": list(_lora(spec).target_modules)}
    return spec_from_dict(data, "fitted plan")


def largest_standard_scale(below: int) -> list[int]:
    """Nominal scales of the standard shape table under ``below``, largest first."""
    return sorted((n for n in STANDARD_SHAPES if n < below), reverse=True)


def describe_scale(n: int) -> str:
    return format_count(n)


def this_machine(processes: int = 1, host: Any = None) -> Hardware | None:
    """The machine a run starts on, as fit hardware; None for a GPU the catalog lacks."""
    if host is None:
        from muse_plan.hardware.detect import detect

        host = detect(use_torch=False)
    cores = host.cores_physical or host.cores_logical or 1
    if not host.gpus:
        return Hardware(None, 0, host.ram_gib, host.ram_gib, None, cores)
    first = host.gpus[0]
    kind = CATALOG.get(first.kind or "")
    if kind is None:
        return None
    kind = variant(kind, first.memory_gib if first.memory_gib in kind.memory_variants else kind.memory_gib)
    return Hardware(kind, processes, first.memory_gib, host.ram_gib, None, cores)
