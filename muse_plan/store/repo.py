"""Reading and writing plans and revisions. Functions take a ``Session``.

Revisions are append-only: ``add_revision`` writes revision ``head + 1``
and moves the plan's head in the same transaction (a ``Store.write()``
block, which on SQLite holds the write lock from its first statement, so
two processes adding revisions queue rather than race). Nothing here
updates or deletes a revision; deleting a whole plan is the one exception.
"""

from __future__ import annotations

import difflib
import json

from sqlmodel import Session, col, func, select

from muse_plan.errors import Conflict, NotFound
from muse_plan.plan.io import spec_from_dict, spec_to_dict
from muse_plan.plan.spec import PlanSpec
from muse_plan.store.models import AUTHORS, Plan, PlanRevision, Run, utcnow


def spec_of(revision: PlanRevision) -> PlanSpec:
    return spec_from_dict(json.loads(revision.spec_json), f"revision {revision.number}")


def _snapshot(spec: PlanSpec) -> str:
    return json.dumps(spec_to_dict(spec), ensure_ascii=False, sort_keys=False)


def find_plan(session: Session, name: str) -> Plan | None:
    return session.exec(select(Plan).where(Plan.name == name)).first()


def get_plan(session: Session, ref: str | int) -> Plan:
    """A plan by id (all digits) or by name."""
    ref = str(ref).strip()
    plan = session.get(Plan, int(ref)) if ref.isdigit() else find_plan(session, ref)
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
    session.refresh(plan)  # the head as stored now, not as this session last saw it
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
