"""What to do when a plan does not fit: alternatives, each a whole plan (and
hardware) that passes the same fit check, ranked by what the user can do.

The alternatives: keep the model and fine-tune it with QLoRA (needs a
pretrained checkpoint of that size); the largest model trainable from scratch
here; where the plan's data is a corpus of known size, the size that makes
the best use of it within the timeline (``best_use``), else the largest model
whose compute-optimal run meets the timeline; a growth path up to the largest
model (train a smaller one, grow it, continue); the same plan on more GPUs of
this kind; the same plan on GPUs with more memory.

Ranking (``rank``): what the user can do within the timeline first; then
what runs on the hardware they have; then how much of the plan's model it
keeps (its parameters over the plan's, at most 1); then the shorter run.

One number for one case: a model pretrained from scratch on a budget is
built and fitted once (``Scratch``, keyed by size and tokens), and every
mention of that case reads its fit's ETA (``Alternative.seconds``, worded by
``_when``). Budgets come from one function (``planner.chinchilla_tokens``,
20 tokens a counted parameter), so the largest-from-scratch alternative and
the growth path's from-scratch comparison are the same case and say the same
time. (Before, the first budgeted 20 × the nominal size, the second re-priced
20 × the counted size in steps of its own: one 350M run read 50 days in one
line and 48 in the next.)

Data (``data_budget``, ``data_size``): an alternative that pretrains on a
corpus of known size says how many epochs of it that is and what they are
worth under Muennighoff et al.'s law for repeated data; ``best_use`` picks
the size by that law (``data_budget.best_size``) among the sizes this
hardware trains from scratch, and says what ``MORE_DATA`` times the data
would buy.

The growth path's prediction (``growth_saving``): its pretraining (the small
stage, any middle stage, the continue stage at the target; what the fit
chose for each) against training the target from scratch on the same budget
on the same hardware, in time (the from-scratch case's own fit, the one the
largest-from-scratch alternative shows) and in FLOPs on the growth's tokens
(``throughput.train_flops`` per token, 6N + 12·L·d·T: PaLM's count, as
docs/bench_growth.md). The grow stage is priced only for LiGO: its fit,
``fit_steps`` steps of the grown model on one micro-batch each (the copying
operators cost nothing). Equal tokens are not equal quality: at 304M on an
H200, G_stack reached the from-scratch loss with 41-53% fewer FLOPs (three
seeds), so the prediction is the cost of the same token budget, and the
measurement says what it buys.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

from engines.architecture.shapes import STANDARD_SHAPES
from engines.options import LoraOptions
from muse_plan.hardware.catalog import CATALOG, variant
from muse_plan.optimizer import data_budget as budget
from muse_plan.optimizer import fit as fitting
from muse_plan.optimizer.throughput import train_flops
from muse_plan.plan.io import spec_from_dict, spec_to_dict
from muse_plan.plan.kinds import STAGE_KINDS
from muse_plan.plan.planner import chinchilla_tokens, complete
from muse_plan.plan.spec import ModelSpec, PlanSpec
from muse_plan.plan.units import approx_duration, format_count, parse_scale

GPU_COUNTS = (1, 2, 4, 8, 16, 32, 64)
ALL_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
QLORA_TOKENS = "100M"
TIMELINE_SHARE = 0.99  # best_use sizes its budget to this share of the timeline: step rounding stays inside it
MIN_TOKENS = 1e5  # the smallest token budget a stage takes


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
    """The one wording of an alternative's predicted time: its own fit's ETA."""
    if result.eta is None:
        return "time not predicted"
    when = approx_duration(result.eta.total_s)
    if result.eta.meets is False:
        when += f" (over the {result.spec.timeline} timeline)"
    return when


def _model(spec: PlanSpec, scale: int) -> dict[str, Any]:
    """The plan's model at ``scale``, as muse's decoder (what pretrains from scratch)."""
    model = {k: v for k, v in spec_to_dict(spec)["model"].items() if k not in ("shape", "init_from")}
    model["scale"] = format_count(scale)
    model["family"] = "decoder"
    return model


def _kept(alt: PlanSpec, spec: PlanSpec) -> float:
    return min(1.0, alt.model.approx_params() / spec.model.approx_params())


def _epochs(value: float) -> str:
    return f"{value:,.1f}" if value < 100 else f"{value:,.0f}"


# ---- data: an alternative's tokens against the plan's corpus ----------------------

def data_facts(alt: PlanSpec, hw: fitting.Hardware, size: Any) -> dict[str, Any] | None:
    """The corpus stages of ``alt`` against ``size`` (a ``DataSize``): tokens, epochs and
    effective tokens; None where the data is unbounded, unknown or not read."""
    if size is None or not size.bounded:
        return None
    stages = budget.stage_data(fitting.corpus_stages(alt, fitting.stage_settings(alt, hw)), size.unique)
    if not stages:
        return None
    tokens = sum(s.tokens for s in stages)
    return {"tokens": tokens, "unique_tokens": size.unique, "epochs": budget.epochs(tokens, size.unique),
            "effective_tokens": sum(s.effective for s in stages)}


def _data_note(facts: dict[str, Any] | None) -> str:
    if not facts or facts["epochs"] <= 1:
        return ""
    warn = f" (past {budget.EPOCH_WARNING:g}, repeats lose value)" if facts["epochs"] > budget.EPOCH_WARNING else ""
    return (f"; that is {_epochs(facts['epochs'])} epochs of the {format_count(facts['unique_tokens'])} training "
            f"tokens{warn}, worth {format_count(facts['effective_tokens'])} new ones")


# ---- pretraining from scratch: one fit per (size, budget) ------------------------

class Scratch:
    """The plan's model at a standard scale pretrained from scratch on a token budget
    on ``hw``, built and fitted once per (scale, tokens): every alternative and
    comparison that prices that case reads the same fit, so it says the same time."""

    def __init__(self, spec: PlanSpec, hw: fitting.Hardware) -> None:
        self.spec, self.hw = spec, hw
        self._fitted: dict[tuple[int, str], tuple[PlanSpec, fitting.FitResult | None]] = {}

    def tokens(self, scale: int) -> str:
        """The compute-optimal budget of the model at ``scale`` (``planner.chinchilla_tokens``)."""
        return chinchilla_tokens(ModelSpec.model_validate(_model(self.spec, scale)))

    def __call__(self, scale: int, tokens: str | None = None, *, steps: int | None = None
                 ) -> tuple[PlanSpec, fitting.FitResult | None]:
        """The case and its fit: ``tokens`` (default the compute-optimal budget), or ``steps``."""
        budget = {"steps": steps} if steps is not None else {"tokens": tokens or self.tokens(scale)}
        key = (scale, str(budget))
        if key not in self._fitted:
            label = str(budget.get("tokens") or f"{steps}-steps").lower()
            alt = _variant(self.spec, f"{format_count(scale).lower()}-scratch-{label}",
                           model=_model(self.spec, scale), techniques=_without(self.spec, "growth"),
                           stages=[{"name": "pretrain", "kind": "pretrain", **budget}])
            self._fitted[key] = (alt, _fits(alt, self.hw))
        return self._fitted[key]

    def on(self, scale: int, tokens: float) -> tuple[PlanSpec, fitting.FitResult | None]:
        """The case of about ``tokens`` (rounded down to two digits); a budget under the
        smallest a stage writes in tokens (``MIN_TOKENS``) is written in steps."""
        if tokens >= MIN_TOKENS:
            return self(scale, _round_down(tokens))
        alt, _ = self(scale)
        per_step = fitting.global_batch(alt, self.hw) * alt.model.seq_len
        return self(scale, steps=max(1, math.floor(tokens / per_step)))


def qlora(spec: PlanSpec, hw: fitting.Hardware, size: Any = None) -> fitting.Alternative | None:
    first = next((s for s in spec.stages if STAGE_KINDS[s.kind].priced is None), None)
    if first is None:
        return None
    techniques = spec_to_dict(spec).get("techniques") or {}
    techniques = {k: v for k, v in (techniques.items() if isinstance(techniques, dict) else
                                    ((t, {}) for t in techniques)) if k not in ("growth",)}
    qlora = LoraOptions(rank=16, layers_fraction=1.0, target_modules=tuple(ALL_TARGETS), quantize_base="4bit")
    techniques["lora"] = qlora.model_dump(mode="json")
    stage = {"name": "finetune", "kind": "finetune", "tokens": QLORA_TOKENS}
    model = {**spec_to_dict(spec)["model"], "family": "hf"}  # a pretrained model of that size, from its folder
    alt = _variant(spec, "qlora", techniques=techniques, stages=[stage], model=model)
    result = _fits(alt, hw, lora=qlora)
    if result is None:
        return None
    facts = data_facts(alt, hw, size)
    return fitting.Alternative(
        "fine-tune with QLoRA instead of training from scratch",
        f"keep the {spec.model.scale} model, start from a pretrained Hugging Face model of it (model.init_from: "
        f"its local folder), 4-bit frozen base with rank-16 adapters on every projection; {QLORA_TOKENS} tokens "
        f"take {_when(result)}{_data_note(facts)} (needs bitsandbytes: pip install -e '.[qlora]')",
        alt, hw, result, kept=1.0, key="qlora", data=facts)


def _scratch_alternative(spec: PlanSpec, title: str, key: str, scale: int, alt: PlanSpec,
                         hw: fitting.Hardware, result: fitting.FitResult, size: Any) -> fitting.Alternative:
    facts = data_facts(alt, hw, size)
    tokens = alt.stages[0].tokens
    return fitting.Alternative(
        title, f"pretrain {format_count(scale)} parameters on {tokens} tokens (20 per parameter of its "
               f"{format_count(alt.model.approx_params())}): "
               f"{_when(result)}{_data_note(facts)}", alt, hw, result, kept=_kept(alt, spec), key=key, data=facts)


def largest_from_scratch(spec: PlanSpec, hw: fitting.Hardware, scratch: Scratch | None = None, size: Any = None,
                         *, within: bool = True) -> list[fitting.Alternative]:
    """The largest model that fits here; and, with ``within``, when its run misses the
    plan's timeline, the largest whose compute-optimal run meets it."""
    scratch = scratch or Scratch(spec, hw)
    found: list[fitting.Alternative] = []
    for scale in fitting.largest_standard_scale(spec.model.approx_params()):
        alt, result = scratch(scale)
        if result is None:
            continue
        if not found:
            found.append(_scratch_alternative(spec, f"the largest model trainable from scratch here: "
                                              f"{format_count(scale)}", "largest", scale, alt, hw, result, size))
        if not within:
            break
        if result.eta is None or result.eta.meets is not False:
            if found[0].spec is not alt:
                found.append(_scratch_alternative(
                    spec, f"the largest model trained compute-optimally within {spec.timeline}: "
                          f"{format_count(scale)}", "within_timeline", scale, alt, hw, result, size))
            break
    return found


# ---- the best use of a corpus of known size ---------------------------------------

def size_options(spec: PlanSpec, scratch: Scratch) -> list[budget.SizeOption]:
    """Every standard scale up to the plan's that trains from scratch here, with its
    predicted seconds a token (its compute-optimal run's fit)."""
    options = []
    for scale in sorted(n for n in STANDARD_SHAPES if n <= spec.model.n_params_nominal):
        alt, result = scratch(scale)
        if result is None or result.eta is None or result.chosen is None:
            continue
        tokens = sum(st.steps * st.config.tokens_per_step for st in result.chosen.priced)
        options.append(budget.SizeOption(scale, alt.model.approx_params(), result.eta.total_s / tokens))
    return options


def _round_down(tokens: float) -> str:
    """``tokens`` to two significant digits, rounded down."""
    unit = 10 ** (math.floor(math.log10(tokens)) - 1)
    return format_count(math.floor(tokens / unit) * unit)


def _choice_facts(choice: budget.SizeChoice) -> dict[str, Any]:
    return {"scale": format_count(choice.option.scale), "params": choice.option.params, "tokens": choice.tokens,
            "unique_tokens": choice.unique, "epochs": choice.epochs, "effective_tokens": choice.effective}


def best_use(spec: PlanSpec, hw: fitting.Hardware, size: Any, scratch: Scratch | None = None
             ) -> fitting.Alternative | None:
    """The size that makes the best use of the plan's corpus and this hardware within the
    timeline (``data_budget.best_size``), as a plan; and what more data would buy."""
    if size is None or not size.bounded:
        return None
    scratch = scratch or Scratch(spec, hw)
    timeline = fitting.parse_timeline(spec)
    options = size_options(spec, scratch)
    choice = budget.best_size(options, size.unique, timeline * TIMELINE_SHARE if timeline else None)
    if choice is None:
        return None
    scale, tokens = choice.option.scale, choice.tokens
    alt, result = scratch.on(scale, tokens)
    for _ in range(3):  # a budget rounded onto the timeline's edge: a little less
        if result is None or result.eta is None or result.eta.meets is not False:
            break
        tokens *= 0.95
        alt, result = scratch.on(scale, tokens)
    if result is None:
        return None
    trained = fitting.corpus_stages(alt, fitting.stage_settings(alt, hw))[0][1]
    facts = data_facts(alt, hw, size) or {}
    facts |= {"scale": format_count(scale), "params": alt.model.approx_params()}
    more = budget.best_size(options, size.unique * budget.MORE_DATA, timeline * TIMELINE_SHARE if timeline else None)
    facts["more_data"] = None if more is None else {"factor": budget.MORE_DATA, **_choice_facts(more)}
    unique = format_count(size.unique)
    within = f" within {spec.timeline}" if spec.timeline else ""
    warn = (f"; past {budget.EPOCH_WARNING:g} epochs a repeated token is worth less than a new one, and past "
            f"{budget.MAX_EPOCHS:.0f} little at all" if facts["epochs"] > budget.EPOCH_WARNING else "")
    detail = (f"pretrain {format_count(scale)} parameters on {format_count(trained)} tokens: "
              f"{_epochs(facts['epochs'])} epochs of "
              f"the {unique} training tokens, worth {format_count(facts['effective_tokens'])} new ones by Muennighoff "
              f"et al.'s law for repeated data{warn}; {_when(result)}. Of the sizes this hardware trains{within}, "
              f"the law ranks it first")
    if more is not None:
        detail += (f"; with {budget.MORE_DATA}× the data ({format_count(size.unique * budget.MORE_DATA)} tokens): "
                   f"{format_count(more.option.scale)} on {format_count(more.tokens)} tokens, "
                   f"{_epochs(more.epochs)} epochs, worth {format_count(more.effective)} new ones")
    return fitting.Alternative(f"the best use of your {unique} training tokens{within}: {format_count(scale)}",
                               detail, alt, hw, result, kept=_kept(alt, spec), key="best_use", data=facts)


# ---- growth ------------------------------------------------------------------------

PRETRAINING = ("pretrain", "continue")  # the stage kinds a growth path spends its token budget in
SAME_BUDGET = 0.02  # a growth path's tokens this close to a from-scratch budget are that budget (step rounding)


@dataclass(frozen=True)
class GrowthSaving:
    """A growth path's pretraining against the target trained from scratch on the same
    budget, on the same hardware; ``scratch_s`` is None where that does not fit.
    FLOPs compare the growth's own tokens; ``scratch_s`` is the from-scratch case's fit."""

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


def growth_saving(alt: PlanSpec, result: fitting.FitResult, hw: fitting.Hardware,
                  scratch: Scratch | None = None) -> GrowthSaving | None:
    """The prediction for growth plan ``alt`` fitted as ``result`` (see the module docstring).
    The from-scratch side is ``scratch``'s case for the target's scale on the budget the
    growth's tokens come to: the compute-optimal one (which the largest-from-scratch
    alternative shows) when they are within ``SAME_BUDGET`` of it."""
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
    scratch = scratch or Scratch(alt, hw)
    scale = alt.model.n_params_nominal
    label = scratch.tokens(scale)
    if abs(parse_scale(label) - tokens) > SAME_BUDGET * tokens:
        label = format_count(tokens)
    _, fitted = scratch(scale, label)
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
    tokens = format_count(s.tokens, 3)  # as the budgets are written (planner.chinchilla_tokens)
    if s.scratch_s is None:
        return (f"its pretraining: {approx_duration(s.growth_s)} and {_flops(s.growth_flops)}; from scratch "
                f"the target does not fit here, and {tokens} tokens of it would cost {_flops(s.scratch_flops)} "
                f"({s.flops_saved:.0%} fewer FLOPs by growth)")
    return (f"its pretraining: {approx_duration(s.growth_s)} and {_flops(s.growth_flops)}, against "
            f"{approx_duration(s.scratch_s)} and {_flops(s.scratch_flops)} from scratch on the same {tokens} "
            f"tokens here ({s.time_saved:.0%} less time, {s.flops_saved:.0%} fewer FLOPs)")


def growth_path(spec: PlanSpec, hw: fitting.Hardware, largest: fitting.Alternative | None,
                scratch: Scratch | None = None, size: Any = None) -> fitting.Alternative | None:
    """Grow up to ``largest``'s size: the planner's growth stages (and the plan's other
    techniques' stages after them), their budgets shares of the same compute-optimal budget
    (``planner.chinchilla_tokens``) as ``largest``'s."""
    if largest is None:
        return None
    scratch = scratch or Scratch(spec, hw)
    scale = largest.spec.model.n_params_nominal
    techniques = _without(spec, "growth")
    techniques["growth"] = spec_to_dict(spec)["techniques"]["growth"] if spec.techniques.growth else {}
    alt = _variant(spec, f"{format_count(scale).lower()}-growth", model=_model(spec, scale), techniques=techniques,
                   stages=None)
    result = _fits(alt, hw)
    if result is None:
        return None
    saving = growth_saving(alt, result, hw, scratch)
    small = alt.stages[0].shape.resolved() if alt.stages and alt.stages[0].shape else None
    first = f"pretrain {small.layers}×{small.d_model}" if small else "pretrain a smaller model"
    operator = alt.techniques.growth.operator if alt.techniques.growth else "g_stack"
    facts = data_facts(alt, hw, size)
    detail = (f"{first}, grow it ({operator}), continue at {format_count(scale)}: {_when(result)}"
              + (f"; {_describe_saving(saving)}" if saving else "") + _data_note(facts)
              + "; equal tokens are not equal loss: measured on an H200 at 304M, G_stack reached the "
              "from-scratch loss with 41-53% fewer FLOPs over three seeds (docs/bench_growth.md)")
    return fitting.Alternative(f"a growth path to {format_count(scale)}", detail, alt, hw, result,
                               kept=_kept(alt, spec), key="growth", data=facts)


def _without(spec: PlanSpec, name: str) -> dict[str, Any]:
    techniques = spec_to_dict(spec).get("techniques") or {}
    if not isinstance(techniques, dict):
        techniques = {t: {} for t in techniques}
    return {k: v for k, v in techniques.items() if k != name}


# ---- the plan as written on other hardware ----------------------------------------

def _on(spec: PlanSpec, hw: fitting.Hardware) -> PlanSpec:
    compute = {"gpu": hw.gpu.key, "count": hw.count, "memory_gib": hw.gpu.memory_gib}
    return _variant(spec, f"{hw.count}x{hw.gpu.key.lower()}", compute=compute)


def more_gpus(spec: PlanSpec, hw: fitting.Hardware, size: Any = None) -> fitting.Alternative | None:
    if hw.gpu is None:
        return None
    for count in (c for c in GPU_COUNTS if c > hw.count):
        found = _as_written(spec, replace(hw, count=count, memory_gib=hw.gpu.memory_gib), f"{count} {hw.gpu.key} GPUs",
                            "more_gpus", size)
        if found is not None:
            return found
    return None


def _as_written(spec: PlanSpec, hw: fitting.Hardware, title: str, key: str, size: Any = None
                ) -> fitting.Alternative | None:
    """The plan unchanged on other hardware, when it fits there."""
    alt = _on(spec, hw)
    result = _fits(alt, hw)
    if result is None:
        return None
    facts = data_facts(alt, hw, size)
    return fitting.Alternative(title, f"the plan as written on {hw.describe()}: {_when(result)}{_data_note(facts)}",
                               alt, hw, result, kept=1.0, key=key, data=facts)


def larger_gpus(spec: PlanSpec, hw: fitting.Hardware, size: Any = None) -> fitting.Alternative | None:
    have = hw.gpu.memory_gib if hw.gpu else 0
    kinds = sorted((variant(k, v) for k in CATALOG.values() for v in k.memory_variants if v > have),
                   key=lambda k: (k.memory_gib, -k.peak_tflops_bf16))
    for count in GPU_COUNTS:
        for kind in kinds:
            bigger = fitting.Hardware(kind, count, kind.memory_gib, hw.host_ram_gib, hw.network_gbps, hw.cpu_cores)
            found = _as_written(spec, bigger, bigger.describe(), "larger_gpus", size)
            if found is not None:
                return found
    return None


# ---- all of them, ranked -----------------------------------------------------------

def rank(found: list[fitting.Alternative], hw: fitting.Hardware) -> list[fitting.Alternative]:
    """Within the timeline first; then on the hardware the user has; then the most of the
    plan's model kept; then the shorter run (the module docstring)."""
    return sorted(found, key=lambda a: (not a.within_timeline, a.hardware != hw, -a.kept,
                                        a.seconds if a.seconds is not None else math.inf))


def propose(spec: PlanSpec, hw: fitting.Hardware, size: Any = None,
            scratch: Scratch | None = None) -> list[fitting.Alternative]:
    """Every alternative that fits (``size``: the plan's ``DataSize``, when measured), ranked."""
    scratch = scratch or Scratch(spec, hw)
    bounded = size is not None and size.bounded
    found = largest_from_scratch(spec, hw, scratch, size, within=not bounded)
    largest = found[0] if found else None
    if bounded:
        found.append(best_use(spec, hw, size, scratch))
    found += [qlora(spec, hw, size), growth_path(spec, hw, largest, scratch, size), more_gpus(spec, hw, size),
              larger_gpus(spec, hw, size)]
    return rank([a for a in found if a is not None], hw)
