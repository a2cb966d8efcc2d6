"""``muse plan adapt``: read a run, run the rules, combine their proposals, and
with ``apply`` store the result as a revision by ``adapt``.

Design decisions:
- Reading and writing are two transactions: the analysis reads the store
  once (a read transaction never holds up a training run writing metrics),
  and the write lays the proposals on the plan's head as it is then
  (``repo.rewrite_on_head``): if someone stored an edit in between, their
  fields are kept, and a field both changed is named as a conflict.
- Proposals are made independently against the head plan, then combined in
  the registry's order: one that sets a field an earlier one set is set
  aside (named, with why), and a memory proposal whose combination with the
  earlier ones is predicted not to fit is set aside too. So the stored plan
  is one the optimizer's models accept as a whole, not only piece by piece.
- The rewrite is the head plan with field assignments; nothing else of the
  plan changes, and the diff shown is ``plan.diff`` of head → proposal, the
  same diff ``muse plan history`` will show for the stored revision.
- A proposal that sets a field a revision changed after the run ended is
  set aside: the run's evidence was measured under the old value.
- Without ``apply`` nothing is written; with it and no proposal, nothing is
  written either.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from muse_plan.adapt.context import Context, Proposal, with_changes
from muse_plan.adapt.evidence import METRICS, Evidence, parse_names, read
from muse_plan.adapt.rules import RULES, TARGETS
from muse_plan.errors import PlanError
from muse_plan.plan.diff import Change, diff
from muse_plan.plan.io import spec_to_dict
from muse_plan.plan.spec import PlanSpec
from muse_plan.store import repo
from muse_plan.store.db import Store
from muse_plan.store.models import Plan, PlanRevision


@dataclass
class Adaptation:
    plan: Plan
    head: int  # the revision the proposals rewrite
    evidence: Evidence
    targets: tuple[str, ...]
    hardware: str
    spec: PlanSpec  # the proposed plan (the head's when nothing is proposed)
    proposals: list[Proposal] = field(default_factory=list)  # combined into ``spec``
    set_aside: list[tuple[Proposal, str]] = field(default_factory=list)
    checked: list[tuple[str, str]] = field(default_factory=list)  # (rule, why it proposes nothing)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (rule, the metrics it lacks)
    changes: list[Change] = field(default_factory=list)
    revision: PlanRevision | None = None  # stored with ``apply``
    laid: str = ""  # how it was laid on a head that moved on while adapt read ('' when it had not)

    @property
    def reason(self) -> str:
        parts = [f"{p.summary} ({p.evidence[0]})" for p in self.proposals]
        return f"adapt from run {self.evidence.run_id}: " + "; ".join(parts)


def _run_rules(ctx: Context, metrics: tuple[str, ...], targets: tuple[str, ...],
               out: Adaptation) -> list[Proposal]:
    found = []
    for name, rule in RULES.items():
        if not set(rule.targets) & set(targets):
            continue
        lacking = [m for m in rule.metrics if m not in metrics]
        if lacking:
            out.skipped.append((name, f"reads {', '.join(lacking)}; add it to --performance-metrics"))
            continue
        result = rule.check(ctx)
        if isinstance(result, str):
            out.checked.append((name, result))
        else:
            found.append(result)
    return found


def _combine(ctx: Context, proposals: list[Proposal], out: Adaptation) -> PlanSpec:
    spec, taken = ctx.spec, {}
    later = ctx.evidence.changed_after
    for proposal in proposals:
        stale = next((path for path in proposal.paths if path in later), None)
        if stale is not None:
            out.set_aside.append((proposal, f"{stale} was changed by revision {later[stale]} after run "
                                            f"{ctx.evidence.run_id}; its evidence predates that: run the plan again"))
            continue
        clash = next((path for path in proposal.paths if path in taken), None)
        if clash is not None:
            out.set_aside.append((proposal, f"{taken[clash]} already sets {clash}"))
            continue
        new = with_changes(spec, proposal.changes)
        earlier = [p.rule for p in out.proposals if p.memory]
        if proposal.memory and earlier and not ctx.predict(new).fits:
            out.set_aside.append((proposal, f"with {', '.join(earlier)} it is predicted not to fit"))
            continue
        spec = new
        out.proposals.append(proposal)
        taken.update({path: proposal.rule for path in proposal.paths})
    return spec


def adapt(store: Store, ref: str, *, metrics: str | None = None, targets: str | None = None,
          run: str | None = None, apply: bool = False) -> Adaptation:
    """Proposals for plan ``ref`` from its newest run (or ``run``); stored as a revision with ``apply``."""
    chosen = parse_names(metrics, METRICS, "--performance-metrics")
    aims = parse_names(targets, TARGETS, "--optimization-targets")
    with store.read() as session:
        plan = repo.get_plan(session, ref)
        head = repo.get_revision(session, plan)
        spec = repo.spec_of(head)
        evidence = read(session, plan, run, chosen)
    ctx = Context(spec, evidence)
    try:
        hardware = ctx.hardware.describe()
    except ValueError as exc:
        raise PlanError(f"plan {plan.name!r}: {exc}") from None
    out = Adaptation(plan, head.number, evidence, aims, hardware, spec)
    out.spec = _combine(ctx, _run_rules(ctx, chosen, aims, out), out)
    out.changes = diff(spec_to_dict(spec), spec_to_dict(out.spec))
    if apply and out.changes:
        with store.write() as session:  # laid on the head: an edit stored while adapt read is kept
            done = repo.rewrite_on_head(session, plan.id, head.number, spec, out.spec, "adapt", out.reason)
        out.spec, out.laid = done.spec, done.describe()
        out.revision = done.revision if done.written else None
    return out
