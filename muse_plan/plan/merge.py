"""A rewrite laid on top of the plan's head: a three-way merge of plan data.

muse rewrites a plan while a run trains (recovery after a fault, the probe,
adapt) from the revision the run is under — the base. A person may have
stored edits since (``muse plan edit`` during the run), so the head is no
longer the base. Writing the rewrite as it was computed would silently put
the person's fields back; instead the rewrite's own changes (base → ours,
as dotted paths, ``plan/diff.py``) are applied to the head, and everything
else the head holds is kept.

A field both changed, to different values, is a conflict: the rewrite's
value is written (the run needs it to go on: a halved learning rate after a
NaN is the remedy, not a preference), and the conflict is reported with the
person's value so it can be put back by hand. A change to a stage the head
no longer has is a conflict too, and is dropped.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field
from typing import Any

from muse_plan.plan.diff import MISSING, Change, diff

_STAGE = re.compile(r"^stages\[(?P<name>[^\]]+)\]\.?(?P<rest>.*)$")


@dataclass(frozen=True)
class Clash:
    path: str
    theirs: Any  # the head's value (the person's edit)
    ours: Any  # the rewrite's value, which is written

    def describe(self) -> str:
        if self.ours is MISSING:
            return f"{self.path}: not written, its stage is gone from the head"
        return f"{self.path}: {self.theirs!r} in the head, the rewrite writes {self.ours!r}"


@dataclass
class Merged:
    data: dict[str, Any]
    applied: list[Change] = field(default_factory=list)  # the rewrite's own changes, as written
    kept: list[Change] = field(default_factory=list)  # the head's changes since the base, kept
    conflicts: list[Clash] = field(default_factory=list)

    def describe(self) -> str:
        """What a person reads in the event and the revision's reason."""
        parts = []
        if self.kept:
            parts.append("kept edits made since: " + ", ".join(c.path for c in self.kept))
        if self.conflicts:
            parts.append("conflict with an edit made since (the rewrite's value is written): "
                         + "; ".join(c.describe() for c in self.conflicts))
        return "; ".join(parts)


def _field(path: str) -> str:
    """The training field a path sets, wherever it sets it: a stage's own ``training.lr``
    overrides the plan's, so the two are one field for a conflict."""
    match = _STAGE.match(path)
    rest = match["rest"] if match else path
    return rest if rest.startswith("training.") else path


def merge(base: dict[str, Any], ours: dict[str, Any], head: dict[str, Any]) -> Merged:
    """``ours``' changes since ``base`` applied to ``head`` (all plan data, ``spec_to_dict``)."""
    mine, theirs = diff(base, ours), diff(base, head)
    out = Merged(copy.deepcopy(head))
    for change in mine:
        same = next((c for c in theirs if c.path == change.path), None)
        if same is not None and same.new == change.new:
            continue  # both made the same change
        for other in theirs:
            if other.path == change.path or _field(other.path) == _field(change.path):
                out.conflicts.append(Clash(other.path, other.new, change.new))
        if not _put(out.data, change.path, change.new):
            out.conflicts.append(Clash(change.path, MISSING, MISSING))
            continue
        out.applied.append(change)
    clashed = {c.path for c in out.conflicts}
    out.kept = [c for c in theirs if c.path not in clashed]
    return out


def _put(data: dict[str, Any], path: str, value: Any) -> bool:
    """Set (or, for ``MISSING``, remove) a flattened path in nested plan data;
    False when it names a stage the data does not have."""
    node: Any = data
    match = _STAGE.match(path)
    if match:
        stage = next((s for s in data.get("stages") or [] if s.get("name") == match["name"]), None)
        if stage is None:
            return False
        node, keys = stage, match["rest"].split(".") if match["rest"] else []
    else:
        keys = path.split(".")
    if not keys:
        return False
    for key in keys[:-1]:
        child = node.get(key)
        if not isinstance(child, dict):
            if value is MISSING:
                return True  # already absent
            child = node[key] = {}
        node = child
    if value is MISSING:
        node.pop(keys[-1], None)
    else:
        node[keys[-1]] = copy.deepcopy(value)
    return True
