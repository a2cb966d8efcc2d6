"""``muse run ...`` (also ``muse runs``): list, show, resume and export runs; and the body of ``muse plan run``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from muse_plan.cli.common import (MachineRankOpt, MainIpOpt, MainPortOpt, NumMachinesOpt, console, print_json,
                                  store)
from muse_plan.executor import launch  # no torch import there

app = typer.Typer(help="Inspect, resume and export training runs.", no_args_is_help=True)

RunArg = Annotated[str, typer.Argument(help="Run id (as in `muse run list`).")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")]


def execute(ctx: typer.Context, plan_ref: str, *, resume: bool, run_ref: str | None = None,
            num_processes: int = 1, force: bool = False, inject: str | None = None,
            alert_thresholds: str | None = None, probe: bool | None = None, log_with: str | None = None,
            machines: launch.Machines | None = None) -> None:
    """Run or resume a plan here, or on N GPUs (of one machine or several: ``machines``, a
    ``launch.Machines``) through ``accelerate launch``. Flags that change the plan
    (``--alert-thresholds``, ``--log-with``) are stored as its revision first, by the main machine."""
    from muse_plan.errors import PlanError

    machines = machines or launch.Machines()
    db_url = ctx.find_root().obj.get("db_url")
    if not launch.launched():
        machines.check(num_processes)
        if machines.rank and (alert_thresholds or log_with is not None):
            raise PlanError("--alert-thresholds and --log-with are stored with the plan by the main machine: "
                            "give them with --machine-rank 0")
    try:
        if inject:
            from muse_plan.executor.loop import Injector

            Injector(inject)
    except ValueError as exc:  # a bad --inject: one line, before anything runs
        raise PlanError(str(exc)) from None
    if alert_thresholds and not launch.launched():
        from muse_plan import api

        stored = api.set_alerts(store(ctx), plan_ref, alert_thresholds)
        if stored is not None:
            console.print(f"alert thresholds stored as revision {stored.revision.number}")
    if log_with is not None and not launch.launched():
        from muse_plan import api

        stored = api.set_log_with(store(ctx), plan_ref, log_with)
        if stored is not None:
            console.print(f"trackers ({log_with}) stored as revision {stored.revision.number}", highlight=False)
    if num_processes > 1 and not launch.launched():
        args = (["--db", db_url] if db_url else []) + (
            ["run", "resume", run_ref] if run_ref else
            ["plan", "run", plan_ref, *(["--resume"] if resume else []), *(["--force"] if force else []),
             *([] if probe is None else ["--probe" if probe else "--no-probe"])])
        local, gpus = launch.local_processes(num_processes, machines)
        if machines.rank == 0:  # the main machine's store: a plan these processes can't run is refused here
            from muse_plan.executor.prepare import check_launch

            check_launch(store(ctx), plan_ref, run_ref, num_processes, gpus > 0)
        if not gpus:
            console.print(f"no GPU on this machine: {local} process{'es' if local > 1 else ''} on the CPU over "
                          "gloo (a check of the distributed path, slower than one process)", highlight=False)
        raise typer.Exit(launch.relaunch(num_processes, args, {"MUSE_INJECT": inject} if inject else None,
                                         machines, gpus))
    from muse_plan.cli.progress import ProgressView
    from muse_plan.executor.runner import run_plan

    with ProgressView(console) as view:
        result = run_plan(db_url, plan_ref, resume=resume, run_ref=run_ref, view=view, force=force, inject=inject,
                          probe=probe)
    if result.main:
        _report(result)


def _report(result) -> None:
    from muse_plan.plan.units import clock

    verb = "resumed and finished" if result.resumed else "finished"
    where = f" on {result.processes} processes" if result.processes > 1 else ""
    moved = (f"; the plan's head is now revision {result.head}, stored since"
             if result.head is not None and result.head != result.revision else "")
    console.print(f"run {result.run_id} of plan [bold]{result.plan}[/] (revision {result.revision}{moved}) "
                  f"{verb}{where} in {clock(result.seconds)}"
                  + (f"; {clock(result.run_seconds)} since the run started" if result.resumed
                     and result.run_seconds is not None else ""), highlight=False)
    for stage in result.stages:
        m = stage.metrics
        if "reward" in m:  # an RL stage: its surrogate loss says little, the reward does
            trained = f", reward {m['reward']:.3f}"
        else:
            trained = f", train loss {m['loss']:.3f}" if "loss" in m else ""  # a grow stage trains nothing
        done = (f"steps {stage.start_step + 1}–{stage.steps} of {stage.steps} in {clock(stage.seconds)} "
                f"(resumed from step {stage.start_step})" if stage.start_step else
                f"{stage.steps} steps in {clock(stage.seconds)}")
        faults = f", {stage.faults} fault{'s' * (stage.faults > 1)} recovered" if stage.faults else ""
        console.print(f"  {stage.name}: {done}{faults}{trained}", highlight=False)
        if "val_loss" in m:
            baseline = m.get("unigram_val_loss")
            tail = (f" nats/token; a unigram model of the same data: {baseline:.3f}" if baseline is not None
                    else "")
            console.print(f"    validation loss {m['val_loss']:.3f}{tail}", highlight=False)
        if "test_accuracy" in m:
            sampled = (f", {100 * m['test_accuracy_sampled']:.1f}% sampled" if "test_accuracy_sampled" in m
                       else "")
            console.print(f"    held-out accuracy {100 * m['test_accuracy']:.1f}% greedy{sampled}", highlight=False)
    for hint in result.tracking:
        console.print(f"  {hint}", highlight=False, soft_wrap=True)
    console.print(f"see it with: muse run show {result.run_id}")


@app.command("list")
def list_(
    ctx: typer.Context,
    plan: Annotated[Optional[str], typer.Option(help="Only this plan's runs (id or name).")] = None,
    as_json: JsonOpt = False,
) -> None:
    """List runs, newest first."""
    from muse_plan.store import repo, runs

    with store(ctx).read() as session:
        only = repo.get_plan(session, plan) if plan else None
        rows = [(r, p, runs.shown_status(r), runs.stage_runs(session, r)) for r, p in runs.list_runs(session, only)]
    if as_json:
        print_json([{"id": r.id, "plan": p.name, "revision": r.under, "started_under": r.revision, "status": status,
                     "stages": [{"name": s.name, "status": runs.shown_stage_status(s, status), "step": s.step,
                                 "total_steps": s.total_steps}
                                for s in stages],
                     "started_at": r.started_at, "finished_at": r.finished_at} for r, p, status, stages in rows])
        return
    if not rows:
        console.print("No runs yet. Start one with `muse plan run PLAN`.")
        return
    from muse_plan.cli.render_runs import runs_table

    console.print(runs_table(rows))


@app.command()
def show(ctx: typer.Context, run: RunArg, as_json: JsonOpt = False) -> None:
    """A run's stages, status, last metrics, checkpoints and recent events."""
    from muse_plan.store import runs

    with store(ctx).read() as session:
        r = runs.get_run(session, run)
        plan = session.get(runs.Plan, r.plan_id)
        stages = [(s, runs.last_metrics(session, s.id)) for s in runs.stage_runs(session, r)]
        events = runs.events(session, r.id)
        status = runs.shown_status(r)
    if as_json:
        print_json({"id": r.id, "plan": plan.name, "revision": r.under, "started_under": r.revision,
                    "status": status, "error": r.error,
                    "run_dir": r.run_dir, "started_at": r.started_at, "finished_at": r.finished_at,
                    "stages": [{"name": s.name, "status": runs.shown_stage_status(s, status), "step": s.step,
                                "total_steps": s.total_steps,
                                "checkpoint": s.checkpoint, "metrics": {k: v for k, (_, v) in m.items()}}
                               for s, m in stages],
                    "events": [{"time": e.time, "severity": e.severity, "message": e.message} for e in events]})
        return
    from muse_plan.cli.render_runs import run_view

    console.print(run_view(r, plan.name, status, stages, events))


@app.command()
def resume(
    ctx: typer.Context,
    run: RunArg,
    num_processes: Annotated[int, typer.Option("--num-processes", min=1, help="GPUs to use, all machines'.")] = 1,
    num_machines: NumMachinesOpt = 1,
    machine_rank: MachineRankOpt = 0,
    main_process_ip: MainIpOpt = None,
    main_process_port: MainPortOpt = 29500,
) -> None:
    """Continue a stopped run from its last good checkpoint."""
    from muse_plan.executor.launch import Machines

    execute(ctx, "", resume=True, run_ref=run, num_processes=num_processes,
            machines=Machines(num_machines, machine_rank, main_process_ip, main_process_port))


@app.command()
def export(
    ctx: typer.Context,
    run: RunArg,
    folder: Annotated[Path, typer.Argument(help="A new (or empty) folder to write the tracker's files into.")],
    to: Annotated[Optional[str], typer.Option("--to", help="tensorboard or mlflow.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Write a stopped run from the store into TensorBoard or MLflow, as it logs live.

    The same tags, steps, values, hyper-parameters and text events as training.log_with
    gives a run while it trains, into a new (or empty) folder."""
    from muse_plan.monitor.trackers import export_run

    done = export_run(store(ctx), run, (to or "").strip().lower(), folder)
    if as_json:
        print_json({"run": done.run_id, "plan": done.plan, "to": done.tracker, "dir": str(done.folder.resolve()),
                    "points": done.points, "events": done.events, "open": done.hint})
        return
    console.print(f"exported run {done.run_id} of plan [bold]{done.plan}[/] to {done.tracker} in {done.folder}: "
                  f"{done.points} metric points, {done.events} events", highlight=False, soft_wrap=True)
    console.print(f"open it with: {done.hint}", highlight=False, soft_wrap=True, markup=False)
