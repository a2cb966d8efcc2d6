"""Fit a plan to hardware: choose its training settings, or say honestly that
it does not fit and what does.

Design decisions:
- Every stage is priced as the executor runs it: its settings come from the
  one resolver (``executor.settings.resolve``: the plan's ``training`` with
  the stage's own on top, open fields at the same defaults the executor
  uses) and become the models' input through ``train_config`` (LoRA, a RL
  stage's prompts × group of completions and their KV cache, offload,
  sharding). Nothing here holds a default of its own.
- Each stage is fitted on its own: an RL stage that samples a group of
  completions is not a pretraining stage, so each gets its own micro-batch
  (accumulation keeps that stage's global batch), checkpointing, precision,
  sharding, offload and, where its engine runs it, LoRA. A plan fits when
  every stage does; its time is the sum of the stages'. The search offers
  only settings the executor runs (``executor.settings.refusal``).
- The chosen settings are written where each stage reads them
  (``plan/rewrite.py``): plan-wide when every priced stage shares a value
  that no stage sets itself, else in each stage's own ``training``.
- Verdicts: ``fits`` — every stage's own settings (open fields at the
  executor's defaults) fit; the search may still fill the fields the plan
  left open with faster choices, but changes nothing the plan wrote.
  ``fits_with_changes`` — some stage fits only with changes to what the
  plan wrote; the changes are listed per stage. ``does_not_fit`` — nothing in the search
  space fits; ranked alternatives follow, each a whole plan (and hardware)
  that passes this same fit.
- A safety margin (10% of each GPU's memory, or of the memory budget's share)
  is kept free: the memory model is checked against measurements, not exact.
- Stages no engine trains (``grow``) or that the memory model does not price
  yet (``representation``) are listed as not priced rather than guessed
  (``StageKind.priced``).
- The user-facing fit (``alternatives=True``, what ``muse plan optimize``
  runs) also measures the plan's data (``data_size``) and prices each stage
  that reads it in epochs and effective tokens (``data_budget``); a plan
  whose data runs past 4 epochs is offered the best use of it
  (``alternatives.best_use``) whether it fits or not. Fits made inside the
  executor, recovery and the alternatives themselves skip this.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field, replace
from typing import Any, Iterator

from engines.options import LoraOptions
from muse_plan.executor.settings import (DEFAULT_MICRO_BATCH, StageSettings, decoder_config, kernels_and_graphs,
                                         refusal, resolve, train_config, uses_cuda_graphs)
from muse_plan.hardware.catalog import CATALOG, GpuKind, lookup, variant
from muse_plan.optimizer import data_budget, memory, throughput
from muse_plan.optimizer.config import TrainConfig
from muse_plan.plan.kinds import STAGE_KINDS
from engines.architecture.shapes import STANDARD_SHAPES
from muse_plan.plan.spec import PlanSpec, StageSpec
from muse_plan.plan.units import format_count

SAFETY_MARGIN = 0.10
GIB = 2**30


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
    """The memory settings the search varies for one stage."""

    precision: str
    micro_batch: int
    grad_accum: int
    checkpointing: str
    sharding: str
    offload: str
    optimizer: str = "adamw"
    lora: bool = False

    # knob -> the training field it is written as
    FIELDS = {"precision": "precision", "micro_batch": "micro_batch", "grad_accum": "grad_accum",
              "checkpointing": "activation_checkpointing", "sharding": "sharding", "offload": "offload",
              "optimizer": "optimizer"}

    @classmethod
    def of(cls, s: StageSettings) -> Settings:
        return cls(s.precision, s.micro_batch, s.grad_accum, s.activation_checkpointing, s.sharding, s.offload,
                   s.optimizer, s.lora is not None)


@dataclass
class StageFit:
    name: str
    kind: str
    steps: int
    settings: StageSettings
    config: TrainConfig | None
    memory: memory.MemoryBreakdown | None
    time: throughput.StepTime | None
    note: str = ""

    @property
    def knobs(self) -> Settings:
        return Settings.of(self.settings)

    @property
    def seconds(self) -> float:
        return self.time.seconds * self.steps if self.time else 0.0

    def fits(self, limit: int, host_limit: int) -> bool:
        return self.memory is None or (self.memory.total <= limit and self.memory.host <= host_limit)


@dataclass
class Candidate:
    """Every stage of a plan under one choice of settings per stage."""

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
        return all(s.fits(self.limit, self.host_limit) for s in self.stages)

    @property
    def seconds(self) -> float:
        return sum(s.seconds for s in self.stages)

    @property
    def settings(self) -> Settings | None:
        """The settings every priced stage shares; None when the stages differ."""
        knobs = {s.knobs for s in self.priced}
        return knobs.pop() if len(knobs) == 1 else None


@dataclass(frozen=True)
class Change:
    stage: str
    field: str
    old: Any
    new: Any

    def __str__(self) -> str:
        return f"{self.field} {self.old}→{self.new}"


def grouped(changes: list[Change], stages: int) -> list[tuple[str, Any, Any, list[str]]]:
    """(field, old, new, the stages it changes in; [] when every priced stage shares it)."""
    by_change: dict[tuple[str, Any, Any], list[str]] = {}
    for c in changes:
        by_change.setdefault((c.field, c.old, c.new), []).append(c.stage)
    return [(name, old, new, [] if len(where) == stages else where) for (name, old, new), where in by_change.items()]


def describe_changes(changes: list[Change], stages: int) -> str:
    """``micro_batch 16→4`` for a change every priced stage shares, else ``stage rl: micro_batch 8→2``."""
    return ", ".join(f"{'stage ' + ', '.join(where) + ': ' if where else ''}{name} {old}→{new}"
                     for name, old, new, where in grouped(changes, stages))


@dataclass
class Alternative:
    title: str
    detail: str
    spec: PlanSpec
    hardware: Hardware
    result: FitResult
    kept: float = 1.0  # the share of the plan's model it trains (parameters, at most 1)
    key: str = ""  # what kind of alternative: qlora, largest, within_timeline, best_use, growth, more_gpus, ...
    data: dict[str, Any] | None = None  # its tokens against the plan's data (epochs, effective tokens)

    @property
    def seconds(self) -> float | None:
        """Its predicted time: its own fit's ETA, the one number every mention of it uses."""
        return self.result.eta.total_s if self.result.eta is not None else None

    @property
    def within_timeline(self) -> bool:
        return self.result.eta is None or self.result.eta.meets is not False


@dataclass
class FitResult:
    spec: PlanSpec
    hardware: Hardware
    verdict: str  # fits | fits_with_changes | does_not_fit
    written: Candidate
    chosen: Candidate | None
    changes: list[Change] = field(default_factory=list)
    unfit: list[str] = field(default_factory=list)  # stages no setting fits (does_not_fit)
    alternatives: list[Alternative] = field(default_factory=list)
    eta: throughput.Eta | None = None
    meets: throughput.Meets | None = None  # what would meet a missed timeline
    data: data_budget.DataReport | None = None  # the corpus stages' epochs; None: the data was not measured

    @property
    def fitted_spec(self) -> PlanSpec | None:
        if self.chosen is None:
            return None
        return apply_settings(self.spec, self.chosen, self.hardware)

    def describe_changes(self) -> str:
        return describe_changes(self.changes, len(self.written.priced))


# ---- plan → the stages' settings, priced ----------------------------------------

# the decoder a stage trains, for pricing (any family: only the shape matters)
stage_model = decoder_config
PROPOSED_LORA = LoraOptions(rank=16, target_modules=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                     "up_proj", "down_proj"), layers_fraction=1.0)


def stage_settings(spec: PlanSpec, hw: Hardware, *, lora: LoraOptions | None = None) -> list[StageSettings]:
    """Every stage's settings as the executor resolves them on ``hw`` (``executor.settings.resolve``),
    settings it can't run yet included, for pricing; ``lora``: priced as if every priced
    stage trained these adapters (the QLoRA alternative's what-if)."""
    out = []
    for stage in spec.stages:
        s = resolve(spec, stage, world_size=hw.processes, cuda=hw.gpu is not None,
                    bf16=bool(hw.gpu and hw.gpu.bf16), check=False)
        if lora is not None and STAGE_KINDS[stage.kind].priced is None and s.lora is None:
            s = replace(s, lora=lora)
        out.append(s)
    return out


def with_knobs(s: StageSettings, k: Settings) -> StageSettings:
    """``s`` under the knobs ``k``; LoRA the optimizer proposes adapts every projection."""
    lora = s.lora if k.lora and s.lora is not None else PROPOSED_LORA if k.lora else None
    return replace(s, precision=k.precision, micro_batch=k.micro_batch, grad_accum=k.grad_accum,
                   activation_checkpointing=k.checkpointing, sharding=k.sharding, offload=k.offload,
                   optimizer=k.optimizer, lora=lora)


def price_stage(s: StageSettings, hw: Hardware) -> StageFit:
    """One stage's memory and time as the executor runs it (``train_config``)."""
    cfg = train_config(s)
    if cfg is None:
        return StageFit(s.name, s.kind, s.steps, s, None, None, None, STAGE_KINDS[s.kind].priced or "")
    mem = memory.estimate(cfg, device="cuda" if hw.gpu else "cpu")
    time = throughput.step_time(cfg, hw.gpu, cpu_cores=hw.cpu_cores, network_gbps=hw.network_gbps)
    return StageFit(s.name, s.kind, s.steps, s, cfg, mem, time)


@dataclass(frozen=True)
class FasterConnection:
    """Settings of an mhc / mgt stage's connection that price faster than what it runs, and fit."""

    stage: str
    changes: tuple[str, ...]  # plan fields and values, e.g. "techniques.mhc.stream_dtype: bfloat16"
    tokens_per_s: float
    was_tokens_per_s: float


def faster_connections(candidate: Candidate, hw: Hardware) -> list[FasterConnection]:
    """For each compiled stage of an mhc / mgt model (a mode whose fused kernels were timed,
    ``ResidualMode.fused_traffic``) under bf16 mixed precision on a GPU with bf16: the fastest of its
    connection's forms as priced, a bf16 stream state with torch's fusion or (4 streams) with
    ``training.fused_kernels: on``, where that is not what the stage runs, fits the same memory limit and
    prices at least 2% faster. A bf16 state rounds the streams between connections, so the optimizer says
    it and leaves the choice to the user; so too where the fused kernels the plan asks for price slower than
    torch's fusion (``training.fused_kernels: off``), and where a step that sums micro-steps on one GPU would,
    as one micro-step of the same global batch, replay CUDA graphs with the kernels (a micro-batch the plan
    chose, or the largest that fits, which a larger one may not)."""
    from engines.architecture.modes import RESIDUAL_MODES

    out = []
    for s in candidate.priced:
        cfg, m = s.config, s.settings.model
        if hw.gpu is None or not hw.gpu.bf16 or cfg is None or s.time is None or not cfg.compiled or \
                cfg.precision != "bf16" or RESIDUAL_MODES[m.residual].fused_traffic is None:
            continue
        technique = "geometric_scaling" if m.residual == "mgt" else m.residual
        best: tuple[float, tuple[str, ...]] | None = None
        batches = [(cfg.micro_batch, cfg.grad_accum)]
        if cfg.grad_accum > 1 and cfg.world_size == 1:  # one micro-step a step, the step CUDA graphs can replay
            batches.append((cfg.micro_batch * cfg.grad_accum, 1))
        for kernels, (micro, accum) in itertools.product(("off", "on") if m.streams == 4 else ("off",), batches):
            model = replace(cfg.model, stream_dtype="bfloat16", fused_kernels=kernels)
            graphs = uses_cuda_graphs(s.settings.cuda_graphs_setting, cfg.compiled, True, accum, model,
                                      cfg.world_size)
            form = replace(cfg, model=model, cuda_graphs=graphs, micro_batch=micro, grad_accum=accum)
            # what the user writes: under training.fused_kernels auto a bf16 state of 4 streams gets its kernels
            # where they price faster (mhc's where the step replays CUDA graphs)
            given = s.settings.fused_kernels_setting == "auto" and kernels_and_graphs(
                "auto", s.settings.cuda_graphs_setting, cfg.compiled, True, accum, model,
                cfg.world_size)[0].fused_kernels == kernels
            changes = ((f"techniques.{technique}.stream_dtype: bfloat16",) if m.stream_dtype != "bfloat16" else ()) \
                + ((f"training.fused_kernels: {kernels}",)
                   if (m.fused_kernels == "on") != (kernels == "on") and not given else ()) \
                + ((f"training.micro_batch: {micro}", "training.grad_accum: 1") if accum != cfg.grad_accum else ())
            if not changes or memory.estimate(form, device="cuda").total > candidate.limit:
                continue
            speed = throughput.step_time(form, hw.gpu, cpu_cores=hw.cpu_cores, network_gbps=hw.network_gbps)
            if speed.tokens_per_s >= 1.02 * s.time.tokens_per_s and (best is None or speed.tokens_per_s > best[0]):
                best = (speed.tokens_per_s, changes)
        if best is not None:
            out.append(FasterConnection(s.name, best[1], best[0], s.time.tokens_per_s))
    return out


def _limits(hw: Hardware) -> tuple[int, int]:
    return hw.limit_bytes, int(hw.host_ram_gib * 0.8 * GIB / (hw.processes if hw.gpu else 1))


def price(spec: PlanSpec, hw: Hardware) -> Candidate:
    """The plan as written (open fields at the resolver's defaults) on ``hw``."""
    return Candidate([price_stage(s, hw) for s in stage_settings(spec, hw)], *_limits(hw))


def global_batch(spec: PlanSpec, hw: Hardware) -> int:
    """The first training stage's global batch on ``hw``, as the executor resolves it."""
    trained = [s for s in stage_settings(spec, hw) if STAGE_KINDS[s.kind].trains]
    return trained[0].global_batch if trained else DEFAULT_MICRO_BATCH * hw.processes


# ---- the search, one stage at a time ---------------------------------------------

def runnable(k: Settings, hw: Hardware) -> bool:
    """Whether the executor runs these settings on ``hw`` (``executor.settings.refusal``)."""
    return refusal(k.sharding, k.offload, k.optimizer, hw.gpu is not None) is None


def _choices(s: StageSettings, hw: Hardware, free: set[str]) -> dict[str, list[Any]]:
    """Values each knob may take for stage ``s``; a knob not in ``free`` keeps its value."""
    base = Settings.of(s)
    per_process = s.micro_batch * s.grad_accum
    lora_ok = STAGE_KINDS[s.kind].lora and STAGE_KINDS[s.kind].lora_default  # proposed where it is the norm
    options: dict[str, list[Any]] = {
        "precision": ["bf16", "fp16", "fp32"] if hw.gpu and hw.gpu.bf16 else ["fp16", "fp32"] if hw.gpu else ["fp32"],
        "micro_batch": [m for m in (1, 2, 4, 8, 16, 32, 64) if per_process % m == 0] or [per_process],
        "checkpointing": ["none", "selective", "full"],
        "sharding": ["ddp", "zero1", "zero2", "zero3"] if hw.processes > 1 else ["none"],
        "offload": ["none", "optimizer"] if hw.gpu else ["none"],
        # LoRA a stage has stays; the optimizer may propose it only where the stage's engine runs it
        "lora": [True] if s.lora is not None else [False, True] if lora_ok else [False],
    }
    return {k: (v if k in free else [getattr(base, k)]) for k, v in options.items()}


def _candidates(s: StageSettings, hw: Hardware, free: set[str]) -> Iterator[Settings]:
    choices = _choices(s, hw, free)
    per_process = s.micro_batch * s.grad_accum
    for prec, micro, ckpt, shard, off, lora in itertools.product(*choices.values()):
        k = Settings(prec, micro, max(1, per_process // micro), ckpt, shard, off, s.optimizer, lora)
        if runnable(k, hw):
            yield k


def open_fields(spec: PlanSpec, stage: StageSpec) -> set[str]:
    t = spec.training_for(stage)
    free = {k for k, name in Settings.FIELDS.items() if getattr(t, name) is None}
    if spec.techniques.lora is None and "lora" not in stage.options:
        free.add("lora")  # but the search proposes LoRA only when nothing else fits
    return free - {"optimizer", "grad_accum"}  # accumulation follows the micro-batch


TIE = 0.02  # candidates within 2% of the fastest count as equally fast


def search(s: StageSettings, hw: Hardware, free: set[str]) -> StageFit | None:
    """The fastest fitting settings for stage ``s`` varying ``free`` knobs; None when none fits.

    The throughput model resolves time to about 10%, so candidates within 2% of
    the fastest are ties; a tie goes to the largest micro-batch (fewer
    micro-steps: less launch, accumulation and optimizer overhead per token
    than the model sees, and the memory the user paid for put to work), then
    to the one that changes least.
    """
    limit, host_limit = _limits(hw)
    if not _could_fit(s, hw, free):
        return None
    fitting = [f for f in (price_stage(with_knobs(s, k), hw) for k in _candidates(s, hw, free))
               if f.fits(limit, host_limit)]
    if not fitting:
        return None
    fastest = min(f.seconds for f in fitting)
    base = Settings.of(s)
    ties = [f for f in fitting if f.seconds <= fastest * (1 + TIE)]
    return max(ties, key=lambda f: (f.knobs.micro_batch, -len(_changed(base, f.knobs)), -f.seconds))


def _could_fit(s: StageSettings, hw: Hardware, free: set[str]) -> bool:
    """Whether the most frugal choice of each free knob fits: when it does not,
    nothing in the search space does (a quick no for hardware far too small).
    Precision and offload are not monotone in memory (autocast keeps bf16 weight
    copies; offload trades device memory for host RAM), so each is tried."""
    choices = _choices(s, hw, free)
    micro = min(choices["micro_batch"])
    frugal = Settings(
        precision=choices["precision"][0], micro_batch=micro,
        grad_accum=max(1, s.micro_batch * s.grad_accum // micro),
        checkpointing="full" if "full" in choices["checkpointing"] else choices["checkpointing"][0],
        sharding=choices["sharding"][-1], offload=choices["offload"][0], optimizer=s.optimizer,
        lora=choices["lora"][-1])
    limit, host_limit = _limits(hw)
    tries = [replace(frugal, precision=p, offload=o) for p in choices["precision"] for o in choices["offload"]]
    return any(price_stage(with_knobs(s, k), hw).fits(limit, host_limit) for k in tries)


ALL_FIELDS = {"precision", "micro_batch", "checkpointing", "sharding", "offload", "lora"}


def fit(spec: PlanSpec, hw: Hardware, *, alternatives: bool = True, lora: LoraOptions | None = None,
        data: Any = None) -> FitResult:
    """Each stage fitted on its own: its written settings when they fit (open knobs
    filled with faster choices), else the fastest that fit varying every knob.

    ``alternatives``: the user-facing fit. It measures the plan's data (``data_size.measure``;
    ``data``, a ``DataSize``, when the caller has), prices the corpus stages' epochs
    against it (``data_budget``), and when the plan does not fit, or its data runs past
    ``EPOCH_WARNING`` epochs, proposes what does (``alternatives``)."""
    settings = stage_settings(spec, hw, lora=lora)
    written = Candidate([price_stage(s, hw) for s in settings], *_limits(hw))
    chosen_stages: list[StageFit] = []
    unfit: list[str] = []
    for stage, s, as_written in zip(spec.stages, settings, written.stages):
        if as_written.memory is None:
            chosen_stages.append(as_written)
            continue
        free = open_fields(spec, stage)
        if as_written.fits(*_limits(hw)):
            best = search(s, hw, free - {"lora"}) or as_written
        else:
            best = search(s, hw, ALL_FIELDS - ({"lora"} - free))
        if best is None:
            unfit.append(stage.name)
        else:
            chosen_stages.append(best)
    verdict = "fits" if written.fits else "does_not_fit" if unfit else "fits_with_changes"
    chosen = Candidate(chosen_stages, *_limits(hw)) if not unfit else None
    result = FitResult(spec, hw, verdict, written, chosen, unfit=unfit)
    if chosen is not None:
        result.changes = [Change(a.name, name, old, new) for a, b in zip(written.priced, chosen.priced)
                          for name, old, new in _changed(a.knobs, b.knobs)]
        result.eta = throughput.eta([(s.name, s.steps, s.time) for s in chosen.priced], parse_timeline(spec))
        if result.eta.meets is False:
            result.meets = throughput.what_meets([(s.name, s.steps, s.config) for s in chosen.priced], hw.gpu,
                                                 result.eta.timeline_s, cpu_cores=hw.cpu_cores,
                                                 network_gbps=hw.network_gbps)
    if alternatives:
        from muse_plan.optimizer import alternatives as alts
        from muse_plan.optimizer.data_size import measure

        size = data if data is not None else measure(spec.data)
        result.data = data_report(spec, settings, size)
        scratch = alts.Scratch(spec, hw)
        if chosen is None:
            result.alternatives = alts.propose(spec, hw, size, scratch)
        if result.data.binding:
            result.data.proposal = next((a for a in result.alternatives if a.key == "best_use"), None) \
                or alts.best_use(spec, hw, size, scratch)
    return result


def corpus_stages(spec: PlanSpec, settings: list[StageSettings]) -> list[tuple[str, float]]:
    """(name, tokens) of each stage that reads ``data.source`` (the architecture engine's
    training stages; the RL stages generate their tasks), its tokens as the executor runs
    them: steps × global batch × context."""
    return [(s.name, float(s.steps * s.tokens_per_step)) for s in settings
            if STAGE_KINDS[s.kind].trains and STAGE_KINDS[s.kind].engine == "architecture"]


def data_report(spec: PlanSpec, settings: list[StageSettings], size: Any) -> data_budget.DataReport:
    """The plan's corpus stages against the tokens its data holds (none when unbounded or unknown)."""
    unique = size.unique
    stages = data_budget.stage_data(corpus_stages(spec, settings), unique) if unique else []
    return data_budget.DataReport(size, stages)


def parse_timeline(spec: PlanSpec) -> float | None:
    if not spec.timeline:
        return None
    from muse_plan.plan.units import parse_duration

    return parse_duration(spec.timeline)


def _changed(a: Settings, b: Settings) -> list[tuple[str, Any, Any]]:
    names = list(Settings.FIELDS) + ["lora"]
    return [(n, getattr(a, n), getattr(b, n)) for n in names if getattr(a, n) != getattr(b, n)]


def apply_settings(spec: PlanSpec, chosen: Candidate, hw: Hardware) -> PlanSpec:
    """The plan with each stage's chosen settings written where the executor reads them
    (``plan.rewrite.set_training``: plan-wide when every priced stage shares a value no
    stage sets itself, else in each stage's own ``training``), LoRA added where chosen,
    and its compute set to the hardware they were fitted to."""
    from muse_plan.plan.io import spec_from_dict, spec_to_dict
    from muse_plan.plan.rewrite import set_training

    compute = {k: v for k, v in (spec_to_dict(spec).get("compute") or {}).items()
               if k not in ("gpu", "count", "memory_gib")}
    if hw.gpu is not None:
        compute.update(gpu=hw.gpu.key, count=hw.count, memory_gib=hw.gpu.memory_gib)
    values = {f.name: _written_values(f.settings) for f in chosen.priced}
    spec = set_training(spec, values, spread=True, source="fitted plan", also={"compute": compute})
    data = spec_to_dict(spec)
    with_lora = {f.name for f in chosen.priced if f.settings.lora is not None}
    if with_lora and spec.techniques.lora is None:
        data.setdefault("techniques", {})["lora"] = PROPOSED_LORA.model_dump(mode="json", exclude_defaults=True)
        for entry in data["stages"]:  # the technique reaches every LoRA stage: not those fitted without it
            kind = STAGE_KINDS[entry["kind"]]
            if kind.lora and kind.lora_default and entry["name"] not in with_lora:
                entry["options"] = {**entry.get("options", {}), "lora": False}
    return spec_from_dict(data, "fitted plan")


def _written_values(s: StageSettings) -> dict[str, Any]:
    knobs = Settings.of(s)
    values = {name: getattr(knobs, key) for key, name in Settings.FIELDS.items()}
    values["global_batch"] = s.global_batch
    return values
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
