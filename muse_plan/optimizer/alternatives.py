"""What to do when a plan does not fit: ranked alternatives, each a whole plan
(and hardware) that passes the same fit check.

Order, closest to what the user asked first: keep the model and fine-tune it
with QLoRA (needs a pretrained checkpoint of that size); the largest model
trainable from scratch here; a growth path up to that model (train a
smaller one, grow it, continue); the same plan on more GPUs of this kind;
the same plan on GPUs with more memory.

The growth path's prediction (``growth_saving``): its pretraining (the small
stage, any middle stage, the continue stage at the target; what the fit
chose for each) against training the target from scratch on the same number
of tokens on the same hardware, in time (the throughput model, the
from-scratch plan fitted on its own) and in FLOPs (``throughput.train_flops``
per token, 6N + 12·L·d·T: PaLM's count, as docs/bench_growth.md). The grow
stage is priced only for LiGO: its fit, ``fit_steps`` steps of the grown
model on one micro-batch each (the copying operators cost nothing). Equal
tokens are not equal quality: at 304M on an H200, G_stack reached the
from-scratch loss with 41-53% fewer FLOPs (three seeds), so the prediction is the cost of
the same token budget, and the measurement says what it buys.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

from engines.options import LoraOptions
from muse_plan.hardware.catalog import CATALOG, variant
from muse_plan.optimizer import fit as fitting
from muse_plan.optimizer.throughput import train_flops
from muse_plan.plan.io import spec_from_dict, spec_to_dict
from muse_plan.plan.kinds import STAGE_KINDS
from muse_plan.plan.planner import complete
from muse_plan.plan.spec import PlanSpec
from muse_plan.plan.units import approx_duration, format_count

CHINCHILLA_TOKENS_PER_PARAM = 20
GPU_COUNTS = (1, 2, 4, 8, 16, 32, 64)
ALL_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _variant(spec: PlanSpec, name: str, **changes: Any) -> PlanSpec:
    data = spec_to_dict(spec)
    data["name"] = f"{spec.name}-{name}"[:120]
    for key, value in changes.items():
        if value is None:
            data.pop(key, None)
        else:
            data[key] = value
    return complete(spec_from_dict(data, f"alternative {name}"))


def _fits(spec: PlanSpec, hw: fitting.Hardware, lora: LoraOptions | None = None) -> fitting.FitResult | None:
    result = fitting.fit(spec, hw, alternatives=False, lora=lora)
    return result if result.verdict != "does_not_fit" else None


def _when(result: fitting.FitResult) -> str:
    if result.eta is None:
        return "time not predicted"
    when = approx_duration(result.eta.total_s)
    if result.eta.meets is False:
        when += f" (over the {result.spec.timeline} timeline)"
    return when


def _model(spec: PlanSpec, scale: int) -> dict[str, Any]:
    model = {k: v for k, v in spec_to_dict(spec)["model"].items() if k not in ("shape", "init_from")}
    model["scale"] = format_count(scale)
    return model


def qlora(spec: PlanSpec, hw: fitting.Hardware) -> fitting.Alternative | None:
    first = next((s for s in spec.stages if STAGE_KINDS[s.kind].priced is None), None)
    if first is None:
        return None
    techniques = spec_to_dict(spec).get("techniques") or {}
    techniques = {k: v for k, v in (techniques.items() if isinstance(techniques, dict) else
                                    ((t, {}) for t in techniques)) if k not in ("growth",)}
    qlora = LoraOptions(rank=16, layers_fraction=1.0, target_modules=tuple(ALL_TARGETS), quantize_base="4bit")
    techniques["lora"] = qlora.model_dump(mode="json")
    stage = {"name": "finetune", "kind": "finetune", "tokens": "100M"}
    model = {**spec_to_dict(spec)["model"], "family": "hf"}  # a pretrained model of that size, from its folder
    alt = _variant(spec, "qlora", techniques=techniques, stages=[stage], model=model)
    result = _fits(alt, hw, lora=qlora)
    if result is None:
        return None
    return fitting.Alternative(
        "fine-tune with QLoRA instead of training from scratch",
        f"keep the {spec.model.scale} model, start from a pretrained Hugging Face model of it (model.init_from: "
        f"its local folder), 4-bit frozen base with rank-16 adapters on every projection; 100M tokens take "
        f"{_when(result)} (needs bitsandbytes: pip install -e '.[qlora]')",
        alt, hw, result)


def _from_scratch(spec: PlanSpec, hw: fitting.Hardware, scale: int) -> tuple[PlanSpec, fitting.FitResult | None]:
    tokens = CHINCHILLA_TOKENS_PER_PARAM * scale
    alt = _variant(spec, f"{format_count(scale).lower()}-scratch", model=_model(spec, scale),
                   techniques=_without(spec, "growth"),
                   stages=[{"name": "pretrain", "kind": "pretrain", "tokens": format_count(tokens)}])
    return alt, _fits(alt, hw)


def _scratch_alternative(title: str, scale: int, alt: PlanSpec, hw: fitting.Hardware,
                         result: fitting.FitResult) -> fitting.Alternative:
    tokens = CHINCHILLA_TOKENS_PER_PARAM * scale
    return fitting.Alternative(title, f"pretrain {format_count(scale)} parameters on {format_count(tokens)} "
                               f"tokens (20 per parameter): {_when(result)}", alt, hw, result)


def largest_from_scratch(spec: PlanSpec, hw: fitting.Hardware) -> list[fitting.Alternative]:
    """The largest model that fits here; and, when its run misses the plan's
    timeline, the largest whose compute-optimal run meets it."""
    found: list[fitting.Alternative] = []
    for scale in fitting.largest_standard_scale(spec.model.approx_params()):
        alt, result = _from_scratch(spec, hw, scale)
        if result is None:
            continue
        if not found:
            found.append(_scratch_alternative(
                f"the largest model trainable from scratch here: {format_count(scale)}", scale, alt, hw, result))
        if result.eta is None or result.eta.meets is not False:
            if found[0].spec is not alt:
                found.append(_scratch_alternative(
                    f"the largest model trained compute-optimally within {spec.timeline}: {format_count(scale)}",
                    scale, alt, hw, result))
            break
    return found


PRETRAINING = ("pretrain", "continue")  # the stage kinds a growth path spends its token budget in


@dataclass(frozen=True)
class GrowthSaving:
    """A growth path's pretraining against the target trained from scratch on as many
    tokens, on the same hardware; ``scratch_s`` is None where that does not fit."""

    tokens: float
    growth_flops: float
    scratch_flops: float
    growth_s: float
    scratch_s: float | None

    @property
    def flops_saved(self) -> float:
        return 1 - self.growth_flops / self.scratch_flops

    @property
    def time_saved(self) -> float | None:
        return None if self.scratch_s is None else 1 - self.growth_s / self.scratch_s


def growth_saving(alt: PlanSpec, result: fitting.FitResult, hw: fitting.Hardware) -> GrowthSaving | None:
    """The prediction for growth plan ``alt`` fitted as ``result`` (see the module docstring)."""
    if result.chosen is None:
        return None
    stages = [st for st in result.chosen.priced if st.kind in PRETRAINING]
    if not stages:
        return None
    tokens = sum(st.steps * st.config.tokens_per_step for st in stages)
    flops = sum(st.steps * st.config.tokens_per_step * train_flops(st.config) for st in stages)
    target = stages[-1].config  # the continue stage trains the target
    scratch_flops = tokens * train_flops(target.with_(lora=None))
    fit = ligo_fit_steps(alt)
    fit_tokens = fit * target.micro_batch * target.world_size * target.model.seq_len
    flops += fit_tokens * train_flops(target)
    fit_s = stages[-1].seconds * fit_tokens / max(1, stages[-1].steps * target.tokens_per_step)
    steps = math.ceil(tokens / (fitting.global_batch(alt, hw) * target.model.seq_len))
    scratch = _variant(alt, "scratch", techniques=_without(alt, "growth"),
                       stages=[{"name": "pretrain", "kind": "pretrain", "steps": steps}])
    fitted = _fits(scratch, hw)
    scratch_s = fitted.eta.total_s if fitted is not None and fitted.eta is not None else None
    return GrowthSaving(tokens, flops, scratch_flops, sum(st.seconds for st in stages) + fit_s, scratch_s)


def ligo_fit_steps(spec: PlanSpec) -> int:
    """The steps a growth plan's LiGO fit takes (0 for the copying operators)."""
    growth = spec.techniques.growth
    if growth is None or growth.operator != "ligo":
        return 0
    from engines.growth.schedule import GrowSettings  # the engine's default

    return growth.fit_steps or GrowSettings.fit_steps


def _flops(value: float) -> str:
    return f"{value:.2e}".replace("e+", "e") + " FLOPs"


def _describe_saving(s: GrowthSaving) -> str:
    tokens = format_count(s.tokens)
    if s.scratch_s is None:
        return (f"its pretraining: {approx_duration(s.growth_s)} and {_flops(s.growth_flops)}; from scratch "
                f"the target does not fit here, and {tokens} tokens of it would cost {_flops(s.scratch_flops)} "
                f"({s.flops_saved:.0%} fewer FLOPs by growth)")
    return (f"its pretraining: {approx_duration(s.growth_s)} and {_flops(s.growth_flops)}, against "
            f"{approx_duration(s.scratch_s)} and {_flops(s.scratch_flops)} from scratch on the same {tokens} "
            f"tokens here ({s.time_saved:.0%} less time, {s.flops_saved:.0%} fewer FLOPs)")


def growth_path(spec: PlanSpec, hw: fitting.Hardware, largest: fitting.Alternative | None) -> fitting.Alternative | None:
    if largest is None:
        return None
    scale = largest.spec.model.n_params_nominal
    techniques = _without(spec, "growth")
    techniques["growth"] = spec_to_dict(spec)["techniques"]["growth"] if spec.techniques.growth else {}
    alt = _variant(spec, f"{format_count(scale).lower()}-growth", model=_model(spec, scale),
                   techniques=techniques, stages=None)
    result = _fits(alt, hw)
    if result is None:
        return None
    saving = growth_saving(alt, result, hw)
    small = alt.stages[0].shape.resolved() if alt.stages and alt.stages[0].shape else None
    first = f"pretrain {small.layers}×{small.d_model}" if small else "pretrain a smaller model"
    operator = alt.techniques.growth.operator if alt.techniques.growth else "g_stack"
    detail = (f"{first}, grow it ({operator}), continue at {format_count(scale)}: {_when(result)}"
              + (f"; {_describe_saving(saving)}" if saving else "")
              + "; equal tokens are not equal loss: measured on an H200 at 304M, G_stack reached the "
              "from-scratch loss with 41-53% fewer FLOPs over three seeds (docs/bench_growth.md)")
    return fitting.Alternative(f"a growth path to {format_count(scale)}", detail, alt, hw, result)


def _without(spec: PlanSpec, name: str) -> dict[str, Any]:
    techniques = spec_to_dict(spec).get("techniques") or {}
    if not isinstance(techniques, dict):
        techniques = {t: {} for t in techniques}
    return {k: v for k, v in techniques.items() if k != name}


def _on(spec: PlanSpec, hw: fitting.Hardware) -> PlanSpec:
    compute = {"gpu": hw.gpu.key, "count": hw.count, "memory_gib": hw.gpu.memory_gib}
    return _variant(spec, f"{hw.count}x{hw.gpu.key.lower()}", compute=compute)


def more_gpus(spec: PlanSpec, hw: fitting.Hardware) -> fitting.Alternative | None:
    if hw.gpu is None:
        return None
    for count in (c for c in GPU_COUNTS if c > hw.count):
        found = _as_written(spec, replace(hw, count=count, memory_gib=hw.gpu.memory_gib), f"{count} {hw.gpu.key} GPUs")
        if found is not None:
            return found
    return None


def _as_written(spec: PlanSpec, hw: fitting.Hardware, title: str) -> fitting.Alternative | None:
    """The plan unchanged on other hardware, when it fits there."""
    alt = _on(spec, hw)
    result = _fits(alt, hw)
    if result is None:
        return None
    return fitting.Alternative(title, f"the plan as written on {hw.describe()}: {_when(result)}", alt, hw, result)


def larger_gpus(spec: PlanSpec, hw: fitting.Hardware) -> fitting.Alternative | None:
    have = hw.gpu.memory_gib if hw.gpu else 0
    kinds = sorted((variant(k, v) for k in CATALOG.values() for v in k.memory_variants if v > have),
                   key=lambda k: (k.memory_gib, -k.peak_tflops_bf16))
    for count in GPU_COUNTS:
        for kind in kinds:
            bigger = fitting.Hardware(kind, count, kind.memory_gib, hw.host_ram_gib, hw.network_gbps, hw.cpu_cores)
            found = _as_written(spec, bigger, bigger.describe())
            if found is not None:
                return found
    return None


def propose(spec: PlanSpec, hw: fitting.Hardware) -> list[fitting.Alternative]:
    scratch = largest_from_scratch(spec, hw)
    largest = scratch[0] if scratch else None
    found = [qlora(spec, hw), *scratch, growth_path(spec, hw, largest), more_gpus(spec, hw), larger_gpus(spec, hw)]
    return [a for a in found if a is not None]
