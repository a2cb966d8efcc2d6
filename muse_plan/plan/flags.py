"""Building a PlanSpec from the seed workflow's flags, over an optional YAML base.

Each flag is parsed on its own first, so an error names the flag the person
typed (``--model-scale '10Q': ...``) rather than a field path they never saw.
Flags override what the YAML file says.
"""

from __future__ import annotations

from typing import Any, Callable

from pydantic import ValidationError

from muse_plan.errors import PlanError
from muse_plan.plan import units
from muse_plan.plan.io import describe
from muse_plan.plan.spec import _task_set
from muse_plan.plan.techniques import Techniques


def _flag(name: str, parse: Callable[[str], Any], value: str) -> Any:
    try:
        return parse(value)
    except ValidationError as exc:
        raise PlanError(f"{name} {value!r}: {describe(exc)}") from None
    except ValueError as exc:
        raise PlanError(f"{name}: {exc}") from None


def _techniques(value: str, base: Any) -> dict[str, Any]:
    """Names from the flag; options kept from the YAML base for names it already had."""
    chosen = Techniques.model_validate(value).names()
    base = base if isinstance(base, dict) else {}
    return {name: base.get(name) or {} for name in chosen}


def overlay_flags(
    data: dict[str, Any],
    *,
    name: str | None = None,
    description: str | None = None,
    model_scale: str | None = None,
    target_tasks: str | None = None,
    techniques: str | None = None,
    compute_budget: str | None = None,
    timeline: str | None = None,
) -> dict[str, Any]:
    """``data`` (a plan's fields, maybe empty) with the given flags written over it."""
    data = dict(data)
    if name is not None:
        data["name"] = name
    if description is not None:
        data["description"] = description
    if model_scale is not None:
        scale = _flag("--model-scale", units.canonical_scale, model_scale)
        model = dict(data.get("model") or {})
        model["scale"] = scale
        model.pop("shape", None)  # a new scale means the scale's shape
        data["model"] = model
    if target_tasks is not None:
        data["target_tasks"] = list(_flag("--target-tasks", _task_set, target_tasks))
    if techniques is not None:
        data["techniques"] = _flag("--techniques", lambda v: _techniques(v, data.get("techniques")), techniques)
    if compute_budget is not None:
        budget = _flag("--compute-budget", units.parse_compute, compute_budget)
        compute = dict(data.get("compute") or {})
        compute.pop("budget", None)
        compute.update(gpu=budget.gpu, count=budget.count, memory_gib=budget.memory_gib)
        data["compute"] = compute
    if timeline is not None:
        data["timeline"] = units.format_duration(_flag("--timeline", units.parse_duration, timeline))
    return data
