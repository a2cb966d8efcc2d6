"""The error handler inside ``muse plan run``: a fault → the next rung of its
ladder → a recorded plan revision (author recovery; the evidence as reason)
→ the runner rolls back to the stage's last good checkpoint and resumes.

Every process calls ``recover`` with the same fault and plan and gets the
same rewrite (the ladders are pure); only the main process (``store`` given)
writes the revision and the events. The rewrite is laid on the plan's head
(``repo.rewrite_on_head``): an edit a person stored while the run trained is
kept, a clash with it is named in the event and the revision's reason, and
the run goes on under the revision written — which the main process then
hands to the others (``runner.py``). A fault ``--inject`` caused says so in
the revision's reason and the event, so ``muse plan history`` tells an
injected rewrite from a real one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from muse_plan.errors import RunFailed
from muse_plan.plan.spec import PlanSpec
from muse_plan.recovery.policies import next_rewrite
from muse_plan.store import repo, runs
from muse_plan.store.models import Run

KINDS = {"NonFiniteLoss": "nan", "OutOfMemory": "oom", "GradientExplosion": "grad_explosion"}


@dataclass
class Budget:
    """Rungs used per fault class within one stage, and what was tried."""

    used: dict[str, int] = field(default_factory=dict)
    tried: list[str] = field(default_factory=list)


def _fits_here(world: int) -> Any:
    from muse_plan.optimizer import fit as fitting

    hw = fitting.this_machine(world)
    if hw is None:
        return None
    return lambda spec: fitting.price(spec, hw).fits


def recover(store: Any, run_id: int, stage_run_id: int, plan_name: str, spec: PlanSpec, position: int,
            fault: Exception, budget: Budget, world: int, say: Any = None, revision: int = 0,
            injected: str | None = None) -> tuple[PlanSpec, bool, int]:
    """The plan to go on with, whether to skip the faulty data window, and the revision
    number it is (``revision``, the one the run was under, plus one off the main
    process); raises ``RunFailed`` with a report when the fault's ladder is used up.
    ``injected``: the ``--inject`` fault that caused it (``nan@120``)."""
    kind = KINDS.get(type(fault).__name__)
    stage = spec.stages[position]
    step = getattr(fault, "step", None)
    found = next_rewrite(spec, stage, kind, budget.used.get(kind, 0), world,
                         fits=_fits_here(world) if kind == "oom" else None) if kind else None
    if found is None:
        tried = "; ".join(budget.tried) or "nothing (no rewrite applies)"
        message = (f"stage {stage.name} stopped at step {step}: {fault}. Recovery tried: {tried}. "
                   f"No rewrite is left for {kind or type(fault).__name__}")
        if store is not None:
            with store.write() as session:
                runs.add_event(session, session.get(Run, run_id), message, kind="fault", severity="error",
                               stage_run_id=stage_run_id, step=step)
        raise RunFailed(f"run {run_id}: {message}; the plan and checkpoints are intact, resume after a change "
                        f"with: muse plan run {plan_name} --resume") from fault
    budget.used[kind], rewrite, new_spec = found
    budget.tried.append(rewrite.summary)
    cause = f"injected fault (--inject {injected}): " if injected else ""
    reason = f"{cause}recovery from {kind} at step {step} of {stage.name} ({fault}): {rewrite.summary}"
    if store is None:
        return new_spec, rewrite.skip_window, revision + 1
    with store.write() as session:
        done = repo.rewrite_on_head(session, plan_name, revision, spec, new_spec, "recovery", reason)
        run = session.get(Run, run_id)
        run.current_revision = done.revision.number
        session.add(run)
        runs.add_event(session, run, f"{cause}fault: {fault}", kind="fault", severity="warning",
                       stage_run_id=stage_run_id, step=step, data={"injected": injected} if injected else None)
        laid = f"; {done.describe()}" if done.merged is not None else ""
        what = (f"plan revision {done.revision.number}: {rewrite.summary}{laid}" if done.written else
                f"{rewrite.summary}: revision {done.revision.number}, the head, already has it")
        runs.add_event(session, run, f"{what}; continuing under revision {done.revision.number}", kind="rewrite",
                       severity="warning", stage_run_id=stage_run_id, step=step,
                       data={"revision": done.revision.number, "fault": kind, "injected": injected,
                             "conflicts": [c.path for c in done.merged.conflicts] if done.merged else []})
    if say:
        say(f"{cause}{kind} at step {step}: {what}; continuing under revision {done.revision.number}")
    return done.spec, rewrite.skip_window, done.revision.number
