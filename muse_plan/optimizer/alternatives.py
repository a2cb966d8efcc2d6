"""What to do when a plan does not fit: ranked alternatives, each a whole plan
(and hardware) that passes the same fit check.

Order, closest to what the user asked first: keep the model and fine-tune it
with QLoRA (needs a pretrained checkpoint of that size); the largest model
trainable from scratch here; a growth path up to that model (train a
smaller one, grow it, continue); the same plan on more GPUs of this kind;
the same plan on GPUs with more memory.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from muse_plan.hardware.catalog import CATALOG, variant
from muse_plan.optimizer import fit as fitting
from muse_plan.plan.io import spec_from_dict, spec_to_dict
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


def _fits(spec: PlanSpec, hw: fitting.Hardware) -> fitting.FitResult | None:
    result = fitting.fit(spec, hw, alternatives=False)
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
    first = next((s for s in spec.stages if s.kind not in fitting.NOT_PRICED), None)
    if first is None:
        return None
    techniques = spec_to_dict(spec).get("techniques") or {}
    techniques = {k: v for k, v in (techniques.items() if isinstance(techniques, dict) else
                                    ((t, {}) for t in techniques)) if k not in ("growth",)}
    techniques["lora"] = {"rank": 16, "layers_fraction": 1.0, "target_modules": ALL_TARGETS, "quantize_base": "4bit"}
    stage = {"name": "finetune", "kind": "finetune", "tokens": "100M"}
    alt = _variant(spec, "qlora", techniques=techniques, stages=[stage])
    result = _fits(alt, hw)
    if result is None:
        return None
    return fitting.Alternative(
        "fine-tune with QLoRA instead of training from scratch",
        f"keep the {spec.model.scale} model, start from a pretrained checkpoint of it (model.init_from), "
        f"4-bit frozen base with rank-16 adapters on every projection; 100M tokens take {_when(result)}",
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


def growth_path(spec: PlanSpec, hw: fitting.Hardware, largest: fitting.Alternative | None) -> fitting.Alternative | None:
    if largest is None:
        return None
    scale = largest.spec.model.n_params_nominal
    techniques = _without(spec, "growth")
    techniques["growth"] = {}
    alt = _variant(spec, f"{format_count(scale).lower()}-growth", model=_model(spec, scale),
                   techniques=techniques, stages=None)
    result = _fits(alt, hw)
    if result is None:
        return None
    saving = 1 - result.eta.total_s / largest.result.eta.total_s if result.eta and largest.result.eta else 0
    return fitting.Alternative(
        f"a growth path to {format_count(scale)}",
        f"pretrain a smaller model, grow it ({spec.techniques.growth.operator if spec.techniques.growth else 'g_stack'}), "
        f"continue at {format_count(scale)}: {_when(result)}, {saving:.0%} less time than from scratch "
        "(predicted from the small model's cheaper steps at the same token budget; measured on an H100 at "
        "304M, G_stack reached the from-scratch loss with 40% fewer FLOPs: docs/bench_growth.md)", alt, hw, result)


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
