"""``--set path=value`` edits on a plan's data, before validation.

Paths are dotted field names; a stage is addressed by name or index
(``stages.pretrain.steps=100`` or ``stages.0.steps=100``). Values are read
as YAML scalars or flow collections (``3e-4``, ``true``, ``[a, b]``,
``{rank: 8}``). ``null`` removes the field, putting it back to its
default: a technique is switched on with ``techniques.lora={}`` and off
with ``techniques.lora=null`` (a bare ``lora:`` in YAML means "on").
"""

from __future__ import annotations

import copy
from typing import Any

import yaml

from muse_plan.errors import PlanError


def parse_assignment(text: str) -> tuple[list[str], Any]:
    path, sep, raw = text.partition("=")
    if not sep or not path.strip():
        raise PlanError(f"--set {text!r}: write FIELD=VALUE, like training.lr=3e-4")
    return path.strip().split("."), parse_value(raw.strip())


def parse_value(raw: str) -> Any:
    try:
        value = yaml.safe_load(raw) if raw else ""
    except yaml.YAMLError:
        return raw
    if isinstance(value, str):
        try:  # YAML 1.1 reads 3e-4 as text; a number was meant
            return float(value) if any(c in value for c in ".eE") else int(value)
        except ValueError:
            return value
    return value


def apply_sets(data: dict[str, Any], assignments: list[str]) -> dict[str, Any]:
    result = copy.deepcopy(data)
    for text in assignments:
        keys, value = parse_assignment(text)
        _assign(result, keys, value, text)
    return result


def _assign(data: dict[str, Any], keys: list[str], value: Any, text: str) -> None:
    node: Any = data
    for depth, key in enumerate(keys[:-1]):
        child = _child(node, key, text)
        if child is None:
            child = {}
            _put(node, key, child, text)
        if not isinstance(child, (dict, list)):
            where = ".".join(keys[: depth + 1])
            raise PlanError(f"--set {text!r}: {where} is a value, not a group of fields")
        node = child
    _put(node, keys[-1], value, text)


def _child(node: Any, key: str, text: str) -> Any:
    if isinstance(node, list):
        return node[_index(node, key, text)]
    return node.get(key)


def _put(node: Any, key: str, value: Any, text: str) -> None:
    if isinstance(node, list):
        node[_index(node, key, text)] = value
    elif value is None:
        node.pop(key, None)
    else:
        node[key] = value


def _index(items: list[Any], key: str, text: str) -> int:
    if key.isdigit() and int(key) < len(items):
        return int(key)
    for i, item in enumerate(items):
        if isinstance(item, dict) and item.get("name") == key:
            return i
    names = [item.get("name") for item in items if isinstance(item, dict)]
    raise PlanError(f"--set {text!r}: no item {key!r}; there are {', '.join(map(str, names)) or 'none'}")
