"""Plans in and out: YAML/JSON text, files, and one-line validation errors.

YAML goes through ``yaml.safe_load`` only. A plan is dumped with ``None``
fields left out (they mean "left open", the default), in the model's field
order, so dumping, loading and dumping again gives the same text.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from muse_plan.errors import PlanError
from muse_plan.plan.spec import PlanSpec


def spec_to_dict(spec: PlanSpec) -> dict[str, Any]:
    return spec.model_dump(mode="json", exclude_none=True)


def dump_yaml(spec: PlanSpec) -> str:
    return yaml.safe_dump(spec_to_dict(spec), sort_keys=False, allow_unicode=True, width=100)


def dump_json(spec: PlanSpec) -> str:
    return json.dumps(spec_to_dict(spec), indent=2, ensure_ascii=False)


def dump(spec: PlanSpec, fmt: str) -> str:
    if fmt == "yaml":
        return dump_yaml(spec)
    if fmt == "json":
        return dump_json(spec) + "\n"
    raise PlanError(f"unknown format {fmt!r}; accepted: yaml, json")


def spec_from_dict(data: Any, source: str = "plan") -> PlanSpec:
    if not isinstance(data, dict):
        raise PlanError(f"{source}: a plan is a mapping of fields (name, model, ...), not {type(data).__name__}")
    try:
        return PlanSpec.model_validate(data)
    except ValidationError as exc:
        raise PlanError(f"{source}: {describe(exc)}") from None


def load_text(text: str, source: str = "plan") -> PlanSpec:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise PlanError(f"{source}: not valid YAML{where}: {problem}") from None
    return spec_from_dict(data, source)


def load_file(path: str | Path) -> PlanSpec:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise PlanError(f"plan file {str(path)!r} not found") from None
    except IsADirectoryError:
        raise PlanError(f"plan file {str(path)!r} is a directory; name a .yaml or .json file") from None
    except UnicodeDecodeError:
        raise PlanError(f"plan file {str(path)!r} is not UTF-8 text") from None
    return load_text(text, source=str(path))


def describe(exc: ValidationError) -> str:
    """A pydantic error as one line: ``model.scale: '10Q' is not a model scale; ...``."""
    return "; ".join(_describe_one(err) for err in exc.errors())


def _describe_one(err: dict[str, Any]) -> str:
    loc = ".".join(str(part) for part in err["loc"])
    message = err["msg"].removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        message = f"unknown field {err['loc'][-1]!r}"
        loc = ".".join(str(part) for part in err["loc"][:-1])
    elif err["type"] not in ("value_error", "assertion_error") and "input" in err:
        shown = err["input"]
        if not isinstance(shown, (dict, list)):
            message += f" (got {shown!r})"
    return f"{loc}: {message}" if loc else message
