"""What changed between two plan revisions, as dotted field paths.

Stages are keyed by name (``stages[pretrain].steps``) rather than position,
so inserting a stage shows as one added stage, not every later one changed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

MISSING: Any = type("Missing", (), {"__repr__": lambda self: "—"})()


@dataclass(frozen=True)
class Change:
    path: str
    old: Any
    new: Any

    @property
    def kind(self) -> str:
        if self.old is MISSING:
            return "added"
        if self.new is MISSING:
            return "removed"
        return "changed"


def flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(data, dict) and data:
        out: dict[str, Any] = {}
        for key, value in data.items():
            out.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
        return out
    if prefix == "stages" and isinstance(data, list) and data:
        out = {}
        for stage in data:
            out.update(flatten({k: v for k, v in stage.items() if k != "name"}, f"stages[{stage['name']}]"))
        return out
    return {prefix: data}


def diff(old: dict[str, Any], new: dict[str, Any]) -> list[Change]:
    a, b = flatten(old), flatten(new)
    changes = []
    for path in list(a) + [p for p in b if p not in a]:
        before, after = a.get(path, MISSING), b.get(path, MISSING)
        if before != after:
            changes.append(Change(path, before, after))
    return changes
