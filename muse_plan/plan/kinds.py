"""Stage kinds: one registered record per kind, and a stage's typed options; no torch.

What a record holds, and why each field is here rather than in the module
that reads it (a fact written in two places drifts):
- ``engine``: the engine that runs the kind (``engines/contract.py`` finds
  its trainer); ``trains``: whether the stage runs the training loop and so
  needs a budget (``grow`` changes weights without one).
- ``lora``: whether LoRA may adapt the stage — true only where the engine
  runs it; ``lora_default``: whether the plan's ``techniques.lora`` reaches
  it unasked, the optimizer may propose it and recovery's last OOM rung may
  add it. A ``continue`` stage takes LoRA only when its own options ask
  (``lora: true``): continued pretraining — after a growth above all —
  trains every weight unless the user says otherwise.
- ``generates``: the stage samples completions every step, so the memory
  model prices a KV cache for a group of completions; ``kl_reference``: it
  keeps a reference policy when its ``kl_beta`` is above 0.
- ``explosion_factor``: how far above its running median a gradient norm
  must be to count as an explosion (a policy gradient from one rare success
  is legitimately tens of times an RL stage's median).
- ``loss_alerts``: whether the loss-spike and plateau alerts watch the stage.
  A policy-gradient stage's loss is a surrogate around zero whose size
  follows how many groups scored differently, not what the model has
  learned: a "spike" is one group with a success, a "plateau" is the normal
  state. Its alert is ``no_signal`` (``monitor/detectors.py``).
- ``priced``: None where the memory and throughput models price the stage,
  else why they don't.
- ``options``: the engine's parser, ``(kind, technique options, stage
  options) → typed options``; ``ValueError`` with one line. The technique
  the stage takes defaults from is ``technique`` (a function of the stage's
  options for the GRPO engine's RL algorithms).

``stage_options`` is the one place a stage's options are merged and typed:
the plan validates every stage with it when it is read, and the executor
hands its result to the engine. Options the executor itself reads
(``StageControl``: re-warmup, ending a stage at a plateau) are split off
first, so an engine sees only its own.

To add a stage kind: its engine's options model and parser, then one
``StageKind`` in ``STAGE_KINDS``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

from pydantic import Field, ValidationError, field_validator

from engines.options import LoraOptions, Options, one_line

if TYPE_CHECKING:
    from muse_plan.plan.spec import PlanSpec, StageSpec


def _growth(kind: str, technique: dict[str, Any], stage: dict[str, Any]) -> Any:
    from engines.growth.schedule import grow_settings

    return grow_settings({**technique, **stage})


def _rkdo(kind: str, technique: dict[str, Any], stage: dict[str, Any]) -> Any:
    from engines.rkdo.config import RkdoConfig

    return RkdoConfig.from_options({**technique, **stage})


def _grpo(kind: str, technique: dict[str, Any], stage: dict[str, Any]) -> Any:
    from engines.grpo.options import parse

    return parse(kind, technique, stage)


def _architecture(kind: str, technique: dict[str, Any], stage: dict[str, Any]) -> Any:
    from engines.architecture.options import parse

    return parse(kind, technique, stage)


def _rl_technique(options: dict[str, Any]) -> str:
    return str(options.get("algorithm", "grpo"))


@dataclass(frozen=True)
class StageKind:
    name: str
    engine: str
    options: Callable[[str, dict[str, Any], dict[str, Any]], Any]
    trains: bool = True
    lora: bool = False
    lora_default: bool = True
    generates: bool = False
    kl_reference: bool = False
    explosion_factor: float = 10.0
    loss_alerts: bool = True
    priced: str | None = None
    technique: Callable[[dict[str, Any]], str | None] = lambda options: None


STAGE_KINDS: dict[str, StageKind] = {k.name: k for k in (
    StageKind("pretrain", "architecture", _architecture),
    StageKind("continue", "architecture", _architecture, lora=True, lora_default=False),
    StageKind("finetune", "architecture", _architecture, lora=True),
    StageKind("cold_start_sft", "grpo", _grpo, lora=True, technique=lambda o: "grpo"),
    StageKind("reasoning_rl", "grpo", _grpo, lora=True, generates=True, kl_reference=True,
              explosion_factor=100.0, loss_alerts=False, technique=_rl_technique),
    StageKind("rejection_sampling", "grpo", _grpo, lora=True, generates=True, technique=lambda o: "grpo"),
    StageKind("all_scenarios_rl", "grpo", _grpo, lora=True, generates=True, kl_reference=True,
              explosion_factor=100.0, loss_alerts=False, technique=_rl_technique),
    StageKind("grow", "growth", _growth, trains=False, priced="growth changes weights, it does not train",
              technique=lambda o: "growth"),
    StageKind("representation", "rkdo", _rkdo, priced="not priced yet", technique=lambda o: "rkdo"),
)}
ENGINES = tuple(dict.fromkeys(k.engine for k in STAGE_KINDS.values()))


def kind_of(name: str) -> StageKind:
    if name not in STAGE_KINDS:
        raise ValueError(f"unknown stage kind {name!r}; accepted: {', '.join(STAGE_KINDS)}")
    return STAGE_KINDS[name]


class StageControl(Options):
    """Stage options the executor reads, whatever the engine."""

    rewarm_fraction: float | None = Field(None, ge=0, lt=1, description="lr re-warmup, share of the stage")
    grow_on_plateau: bool | int | None = Field(
        None, description="end the stage at a loss plateau so the next (grow) stage starts early; "
                          "true (the plan's plateau window) or a window in steps")
    stop_on_plateau: bool | int | None = Field(None, description="end the stage at a loss plateau")

    @field_validator("grow_on_plateau", "stop_on_plateau")
    @classmethod
    def _window(cls, value: bool | int | None) -> bool | int | None:
        if isinstance(value, int) and not isinstance(value, bool) and value < 2:
            raise ValueError(f"must be true or a window of at least 2 steps, got {value}")
        return value

    @property
    def plateau(self) -> str | None:
        """The option that ends this stage at a plateau, if any."""
        return next((k for k in ("grow_on_plateau", "stop_on_plateau") if getattr(self, k) not in (None, False)),
                    None)


CONTROL_KEYS = frozenset(StageControl.model_fields)


@dataclass(frozen=True)
class TypedOptions:
    engine: Any  # the engine's own typed options
    control: StageControl


def stage_options(spec: PlanSpec, stage: StageSpec) -> TypedOptions:
    """A stage's options, typed: the technique's (``techniques.<name>``) as defaults, the
    stage's own on top; ``ValueError`` naming the stage, the key and what is accepted."""
    kind = kind_of(stage.kind)
    own = dict(stage.options)
    control = {k: own.pop(k) for k in list(own) if k in CONTROL_KEYS} if kind.trains else {}
    technique_name = kind.technique(own)
    chosen = getattr(spec.techniques, technique_name, None) if technique_name else None
    technique = chosen.model_dump() if chosen is not None else {}
    try:
        if kind.lora:
            lora = _lora(spec, own.pop("lora", None), kind.lora_default)
            if lora is not None:
                own["lora"] = lora
        typed = kind.options(stage.kind, technique, own)
        ctl = StageControl.model_validate(control)
    except ValidationError as exc:
        raise ValueError(f"stage {stage.name!r}: {one_line(exc, StageControl)}") from None
    except (ValueError, TypeError) as exc:  # TypeError: a value of the wrong type in a dataclass's check
        also = f" (any training stage also takes {', '.join(sorted(CONTROL_KEYS))})" \
            if kind.trains and "unknown option" in str(exc) else ""
        raise ValueError(f"stage {stage.name!r}: {exc}{also}") from None
    return TypedOptions(typed, ctl)


def _lora(spec: PlanSpec, flag: Any, default: bool = True) -> dict[str, Any] | None:
    """A LoRA stage's adapters: the technique's unless the stage says ``lora: false``
    (or, where LoRA is not the kind's default, unless it says ``lora: true``); ``lora:
    true`` without the technique takes LoRA's defaults; a mapping is laid over the
    technique's."""
    base = spec.techniques.lora.model_dump() if spec.techniques.lora is not None else None
    if flag is False:
        return None
    if flag is True:
        return base or LoraOptions().model_dump()
    if isinstance(flag, dict):
        return {**(base or {}), **flag}
    if flag is None:
        return base if default else None
    raise ValueError(f"option lora = {flag!r}: write true, false or LoRA's options")
