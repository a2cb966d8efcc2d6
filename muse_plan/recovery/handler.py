"""The error handler inside ``muse plan run``: a fault → the next rung of its
ladder → a recorded plan revision (author recovery; the evidence as reason)
→ the runner rolls back to the stage's last good checkpoint and resumes.

Every process calls ``recover`` with the same fault and plan and gets the
same rewrite (the ladders are pure); only the main process (``store`` given)
writes the revision and the events.
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
            fault: Exception, budget: Budget, world: int, say: Any = None) -> tuple[PlanSpec, bool]:
    """The rewritten plan and whether to skip the faulty data window; raises
    ``RunFailed`` with a report when the fault's ladder is used up."""
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
    reason = f"recovery from {kind} at step {step} of {stage.name} ({fault}): {rewrite.summary}"
    if store is not None:
        with store.write() as session:
            plan = repo.get_plan(session, plan_name)
            revision = repo.add_revision(session, plan, new_spec, "recovery", reason)
            run = session.get(Run, run_id)
            runs.add_event(session, run, f"fault: {fault}", kind="fault", severity="warning",
                           stage_run_id=stage_run_id, step=step)
            runs.add_event(session, run, f"plan revision {revision.number}: {rewrite.summary}; resuming from the "
                           "last good checkpoint", kind="rewrite", severity="warning", stage_run_id=stage_run_id,
                           step=step, data={"revision": revision.number, "fault": kind})
        if say:
            say(f"{kind} at step {step}: plan revision {revision.number} ({rewrite.summary}); resuming")
    return new_spec, rewrite.skip_window
