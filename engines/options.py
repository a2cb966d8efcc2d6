"""What every engine's typed stage options share; no torch.

Design decisions:
- An engine owns the options its stages accept: one frozen pydantic model
  per stage kind (``extra="forbid"``, ``Literal`` choices, bounds), with
  every default written once, there. The plan validates a stage's options
  against that model when the plan is imported or edited, and the executor
  hands the engine the validated object, so an engine reads ``o.group_size``
  and never a ``dict.get`` with a default of its own.
- ``LoraOptions`` lives here, not in one engine: it is a technique of the
  plan (``techniques.lora``) that any engine which fine-tunes may take.
- ``one_line`` turns a validation error into the one line the CLI prints:
  each key, its value and what is accepted, so a typo is refused at import
  with a message that says how to fix it.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PositiveInt, ValidationError


class Options(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class LoraOptions(Options):
    """LoRA (QLoRA with ``quantize_base: 4bit``) for the fine-tuning stages."""

    rank: PositiveInt = 8
    alpha: float = Field(16.0, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: tuple[str, ...] = ("q_proj", "v_proj")
    layers_fraction: float = Field(0.25, gt=0, le=1, description="last share of layers adapted (paper: 1/4 or 1/3)")
    quantize_base: Literal["none", "4bit"] = "none"

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank


def accepted(model: type[BaseModel]) -> str:
    return ", ".join(model.model_fields)


def one_line(exc: ValidationError, model: type[BaseModel]) -> str:
    """Every error of ``exc`` on one line: ``unknown option 'grup_size'; accepted: ...``,
    ``option kl_beta = 'lots': input should be a valid number``, joined by "; "."""
    return "; ".join(_one(err, model) for err in exc.errors())


def _one(err: Any, model: type[BaseModel]) -> str:
    loc = ".".join(str(part) for part in err["loc"])
    if err["type"] == "extra_forbidden":
        parent = err["loc"][:-1]
        inner = _nested(model, parent) or model
        where = ".".join(map(str, parent))
        key = f"{where}.{err['loc'][-1]}" if where else str(err["loc"][-1])
        return f"unknown option {key!r}; accepted: {accepted(inner)}"
    message = err["msg"].removeprefix("Value error, ")
    if "input" in err and err["type"] not in ("value_error", "assertion_error"):
        return f"option {loc} = {err['input']!r}: {message[:1].lower()}{message[1:]}"
    return f"option {loc}: {message}" if loc else message


def _nested(model: type[BaseModel], path: tuple[Any, ...]) -> type[BaseModel] | None:
    """The options model at ``path`` inside ``model`` (``reward_weights`` → ``RewardWeights``)."""
    for part in path:
        field = model.model_fields.get(str(part))
        if field is None:
            return None
        candidates = [field.annotation, *getattr(field.annotation, "__args__", ())]
        found = next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)
        if found is None:
            return None
        model = found
    return model
