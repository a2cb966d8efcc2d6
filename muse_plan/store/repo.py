"""Reading and writing plans and revisions. Functions take a ``Session``.

Revisions are append-only: ``add_revision`` writes revision ``head + 1``
and moves the plan's head in the same transaction. Writers queue rather than
race on every backend: a ``Store.write()`` block holds SQLite's write lock
from its first statement, and on other databases a plan read inside a write
block is read ``FOR UPDATE`` (its row stays locked until the block commits),
so an edit reads the head, changes it and appends ``head + 1`` with no
other writer in between: N concurrent edits give N revisions, numbered
without gaps. Nothing here updates or deletes a revision; deleting a whole
plan is the one exception.

A rewrite made by muse while a run trains (recovery, the probe, adapt) is
computed from the revision the run is under, which may no longer be the
head: ``rewrite_on_head`` lays its changes on top of the head instead
(``plan/merge.py``), so a person's edit made meanwhile is kept.
"""

from __future__ import annotations

import difflib
import json
from dataclasses import dataclass

from sqlmodel import Session, col, func, select

from muse_plan.errors import Conflict, NotFound, PlanError
from muse_plan.plan.io import spec_from_dict, spec_to_dict
from muse_plan.plan.merge import Merged, merge
from muse_plan.plan.spec import PlanSpec
from muse_plan.store.models import AUTHORS, Plan, PlanRevision, Run, utcnow


def spec_of(revision: PlanRevision, check_files: bool = False) -> PlanSpec:
    """A stored revision's spec. The files its options name (examples, reward modules) were read
    when it was written; they are read again only with ``check_files`` (a run, an optimization),
    so listing, showing, monitoring or reporting a plan works from any folder, where its relative
    paths may lead nowhere."""
    data = json.loads(revision.spec_json)
    if check_files:
        return spec_from_dict(data, f"revision {revision.number}")
    from engines.options import files_unchecked

    with files_unchecked():
        return spec_from_dict(data, f"revision {revision.number}")


def _snapshot(spec: PlanSpec) -> str:
    return json.dumps(spec_to_dict(spec), ensure_ascii=False, sort_keys=False)


def _writing(session: Session) -> bool:
    return bool(session.info.get("muse_write"))


def find_plan(session: Session, name: str) -> Plan | None:
    query = select(Plan).where(Plan.name == name)
    if _writing(session):  # the row stays locked until the write block ends (not on SQLite: no need)
        query = query.with_for_update().execution_options(populate_existing=True)
    return session.exec(query).first()


def get_plan(session: Session, ref: str | int) -> Plan:
    """A plan by id (all digits) or by name; locked for the rest of a write block."""
    ref = str(ref).strip()
    plan = (session.get(Plan, int(ref), with_for_update=_writing(session), populate_existing=True)
            if ref.isdigit() else find_plan(session, ref))
    if plan is None:
        names = list(session.exec(select(Plan.name)))
        close = difflib.get_close_matches(ref, names, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else "; `muse plan list` shows the plans"
        raise NotFound(f"no plan {ref!r}{hint}")
    return plan


def create_plan(session: Session, spec: PlanSpec, reason: str = "created",
                author: str = "user") -> tuple[Plan, PlanRevision]:
    if find_plan(session, spec.name) is not None:
        raise Conflict(
            f"a plan named {spec.name!r} exists; choose another --name, or change it "
            f"with `muse plan edit {spec.name}`"
        )
    plan = Plan(name=spec.name)
    session.add(plan)
    session.flush()
    revision = _append(session, plan, spec, author, reason)
    return plan, revision


def add_revision(session: Session, plan: Plan, spec: PlanSpec, author: str,
                 reason: str) -> PlanRevision:
    """Append ``spec`` as the plan's next revision (renaming the plan if its name changed)."""
    session.refresh(plan, with_for_update=_writing(session))  # the head as stored now, and locked
    if spec.name != plan.name:
        other = find_plan(session, spec.name)
        if other is not None and other.id != plan.id:
            raise Conflict(f"can't rename {plan.name!r} to {spec.name!r}: that name is taken")
        plan.name = spec.name
    return _append(session, plan, spec, author, reason)


def _append(session: Session, plan: Plan, spec: PlanSpec, author: str, reason: str) -> PlanRevision:
    if author not in AUTHORS:
        raise ValueError(f"author must be one of {AUTHORS}, not {author!r}")
    now = utcnow()
    revision = PlanRevision(plan_id=plan.id, number=plan.head + 1, author=author,
                            reason=reason, spec_json=_snapshot(spec), created_at=now)
    plan.head = revision.number
    plan.updated_at = now
    session.add(revision)
    session.add(plan)
    session.flush()
    return revision


@dataclass
class Rewritten:
    revision: PlanRevision  # what the plan's head is now: the rewrite's revision (or the head it matched)
    spec: PlanSpec  # what that revision holds: the rewrite laid on the head
    base: int  # the revision the rewrite was computed from
    head: int  # the head it was laid on
    merged: Merged | None = None  # how, when the head had moved on from the base
    written: bool = True  # False: the head already held every change, nothing was stored

    def describe(self) -> str:
        """'' when the head was the base; else which revision it was laid on and what was kept."""
        if self.merged is None:
            return ""
        more = self.merged.describe()
        return f"laid on revision {self.head}, the head (computed from {self.base})" + (f"; {more}" if more else "")


def rewrite_on_head(session: Session, plan_ref: str | int, base: int, base_spec: PlanSpec, new: PlanSpec,
                    author: str, reason: str) -> Rewritten:
    """Store ``new`` — computed from revision ``base`` (``base_spec``) — as the plan's next
    revision, laid on the head (``plan/merge.py``) when edits were stored since ``base``."""
    plan = get_plan(session, plan_ref)  # locked: no edit lands between reading the head and writing
    if plan.head == base:
        return Rewritten(_append(session, plan, new, author, reason), new, base, base)
    head = get_revision(session, plan)
    merged = merge(spec_to_dict(base_spec), spec_to_dict(new), json.loads(head.spec_json))
    try:
        spec = spec_from_dict(merged.data, f"revision {head.number} with the {author}'s rewrite")
    except PlanError as exc:
        raise Conflict(f"plan {plan.name!r} was edited to revision {head.number} while it ran, and the "
                       f"{author}'s rewrite ({reason}) can't be laid on it: {exc}") from None
    out = Rewritten(head, spec, base, head.number, merged, written=spec != spec_of(head))
    if out.written:
        out.revision = _append(session, plan, spec, author, f"{reason}; {out.describe()}")
    return out


def get_revision(session: Session, plan: Plan, number: int | None = None) -> PlanRevision:
    number = plan.head if number is None else number
    revision = session.exec(select(PlanRevision).where(
        PlanRevision.plan_id == plan.id, PlanRevision.number == number)).first()
    if revision is None:
        raise NotFound(f"plan {plan.name!r} has no revision {number}; it has 1 to {plan.head}")
    return revision


def list_revisions(session: Session, plan: Plan) -> list[PlanRevision]:
    return list(session.exec(select(PlanRevision).where(PlanRevision.plan_id == plan.id)
                             .order_by(col(PlanRevision.number))))


def list_plans(session: Session) -> list[tuple[Plan, PlanRevision]]:
    rows = session.exec(
        select(Plan, PlanRevision)
        .join(PlanRevision, (PlanRevision.plan_id == Plan.id) & (PlanRevision.number == Plan.head))
        .order_by(col(Plan.id))
    )
    return list(rows)


def count_runs(session: Session, plan: Plan, status: str | None = None) -> int:
    query = select(func.count()).select_from(Run).where(Run.plan_id == plan.id)
    if status is not None:
        query = query.where(Run.status == status)
    return session.exec(query).one()


def delete_plan(session: Session, plan: Plan) -> None:
    if count_runs(session, plan, status="running"):
        raise Conflict(f"plan {plan.name!r} has a running run; stop it before deleting the plan")
    session.delete(plan)
    session.flush()
