"""``muse plan ...``: create, list, show, export, import, edit, history, diff, optimize, adapt, run, delete, schema."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from muse_plan.cli.common import (MachineRankOpt, MainIpOpt, MainPortOpt, NumMachinesOpt, console, print_json,
                                  store)

app = typer.Typer(help="Create, inspect and change training plans.", no_args_is_help=True)

PlanArg = Annotated[str, typer.Argument(help="Plan id or name.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")]


@app.command()
def create(
    ctx: typer.Context,
    name: Annotated[Optional[str], typer.Option(help="Unique plan name [default: derived].")] = None,
    model_scale: Annotated[Optional[str], typer.Option(help="Model size: 350M, 1.3B, 10B, 70B.")] = None,
    target_tasks: Annotated[Optional[str], typer.Option(
        help="Comma list of reasoning, knowledge, coding, multilingual, arithmetic.")] = None,
    techniques: Annotated[Optional[str], typer.Option(
        help="Comma list of grpo, s_grpo, t_spmo, mhc, geometric_scaling, growth, rkdo, lora.")] = None,
    compute_budget: Annotated[Optional[str], typer.Option(
        help="GPUs: 8xH100, 1xRTX3080-8GB, 2xA100-40GB or cpu [default: this machine].")] = None,
    timeline: Annotated[Optional[str], typer.Option(help="Time allowed: 7days, 36h, 90min.")] = None,
    description: Annotated[Optional[str], typer.Option(help="One line on what the plan is for.")] = None,
    from_yaml: Annotated[Optional[Path], typer.Option(
        "--from-yaml", help="Start from a plan file; flags override its fields.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Create a plan from flags (and/or a YAML file); the planner fills in its stages."""
    from muse_plan import api

    stored = api.create(
        store(ctx), from_yaml=str(from_yaml) if from_yaml else None, name=name,
        description=description, model_scale=model_scale, target_tasks=target_tasks,
        techniques=techniques, compute_budget=compute_budget, timeline=timeline,
    )
    _report_stored(stored, "created", as_json)


def _report_stored(stored, verb: str, as_json: bool) -> None:
    from muse_plan.plan.io import spec_to_dict

    if as_json:
        print_json({"id": stored.plan.id, "name": stored.plan.name, "revision": stored.revision.number,
                    "created": stored.created, "spec": spec_to_dict(stored.spec)})
        return
    stages = " → ".join(s.name for s in stored.spec.stages) or "none"
    console.print(f"{verb} plan [bold]{stored.plan.name}[/] (id {stored.plan.id}, "
                  f"revision {stored.revision.number}); stages: {stages}")
    console.print(f"see it with: muse plan show {stored.plan.name}")


@app.command("list")
def list_(ctx: typer.Context, as_json: JsonOpt = False) -> None:
    """List stored plans with their newest revision."""
    from muse_plan import api

    rows = api.list_plans(store(ctx))
    if as_json:
        print_json([{"id": p.id, "name": p.name, "revision": p.head, "scale": s.model.scale,
                     "techniques": s.techniques.names(),
                     "compute": s.compute.budget if s.compute else None,
                     "timeline": s.timeline, "updated_at": r.created_at.isoformat()}
                    for p, r, s in rows])
        return
    if not rows:
        console.print("No plans yet. Create one with `muse plan create` or `muse plan import FILE`.")
        return
    from muse_plan.cli.render import plans_table

    console.print(plans_table(rows))


@app.command()
def show(
    ctx: typer.Context,
    plan: PlanArg,
    revision: Annotated[Optional[int], typer.Option(help="Show this revision [default: newest].")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Show a plan: model, compute, techniques, stages, training settings, revisions."""
    from muse_plan import api
    from muse_plan.plan.io import spec_to_dict

    stored = api.show(store(ctx), plan, revision)
    if as_json:
        r = stored.revision
        print_json({"id": stored.plan.id, "name": stored.plan.name, "head": stored.plan.head,
                    "revision": {"number": r.number, "author": r.author, "reason": r.reason,
                                 "created_at": r.created_at.isoformat()},
                    "spec": spec_to_dict(stored.spec)})
        return
    from muse_plan.cli.render import plan_view

    _, history = api.history(store(ctx), plan)
    console.print(plan_view(stored.plan, stored.revision, stored.spec, history[-5:]))


@app.command()
def export(
    ctx: typer.Context,
    plan: PlanArg,
    format: Annotated[str, typer.Option("--format", "-f", help="yaml or json.")] = "yaml",
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Write to this file.")] = None,
    revision: Annotated[Optional[int], typer.Option(help="Export this revision [default: newest].")] = None,
) -> None:
    """Write a plan as YAML or JSON (to stdout, or to --output)."""
    from muse_plan import api
    from muse_plan.errors import MuseError
    from muse_plan.plan.io import dump

    text = dump(api.show(store(ctx), plan, revision).spec, format)
    if output is None:
        typer.echo(text, nl=False)
        return
    try:
        output.write_text(text, encoding="utf-8")
    except OSError as exc:
        raise MuseError(f"can't write {str(output)!r}: {exc.strerror}") from None
    console.print(f"wrote {output}")


@app.command("import")
def import_(
    ctx: typer.Context,
    file: Annotated[Path, typer.Argument(help="A plan file, YAML or JSON.")],
    name: Annotated[Optional[str], typer.Option(help="Store it under this name instead.")] = None,
    update: Annotated[bool, typer.Option(
        "--update", help="If the plan exists, record the file as its next revision.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Store a plan file. Re-importing an unchanged file changes nothing."""
    from muse_plan import api

    stored = api.import_file(store(ctx), str(file), name=name, update=update)
    if not stored.created and not as_json:
        console.print(f"plan [bold]{stored.plan.name}[/] is already stored as revision "
                      f"{stored.revision.number}; nothing changed")
        return
    _report_stored(stored, "imported" if stored.revision.number == 1 else "updated", as_json)


@app.command()
def edit(
    ctx: typer.Context,
    plan: PlanArg,
    set_: Annotated[Optional[list[str]], typer.Option(
        "--set", help="FIELD=VALUE, repeatable: training.lr=3e-4, stages.pretrain.steps=500, "
                      "techniques.lora={}.")] = None,
    reason: Annotated[Optional[str], typer.Option(help="Why; recorded with the revision.")] = None,
    replan: Annotated[bool, typer.Option(
        "--replan", help="Re-derive stages and residual mode from the techniques.")] = False,
) -> None:
    """Change a plan; every change is a new revision with its reason."""
    from muse_plan import api
    from muse_plan.cli.render import changes_table

    stored, changes = api.edit(store(ctx), plan, set_ or [], reason=reason, replan=replan)
    if not changes:
        console.print(f"no change: plan {stored.plan.name} stays at revision {stored.revision.number}")
        return
    console.print(changes_table(changes, f"{stored.plan.name}: revision {stored.revision.number}"))


@app.command()
def history(ctx: typer.Context, plan: PlanArg, as_json: JsonOpt = False) -> None:
    """Every revision of a plan: who, when, why, and what it changed."""
    from muse_plan import api
    from muse_plan.cli.render import change_dicts, revisions_table

    found, rows = api.history(store(ctx), plan)
    if as_json:
        print_json([{"revision": r.number, "author": r.author, "reason": r.reason,
                     "created_at": r.created_at.isoformat(), "changes": change_dicts(c)}
                    for r, c in rows])
        return
    console.print(revisions_table(rows, title=f"history of {found.name}"))


@app.command()
def diff(
    ctx: typer.Context,
    plan: PlanArg,
    rev_a: Annotated[int, typer.Argument(help="Older revision number.")],
    rev_b: Annotated[int, typer.Argument(help="Newer revision number.")],
    as_json: JsonOpt = False,
) -> None:
    """The fields that differ between two revisions of a plan."""
    from muse_plan import api
    from muse_plan.cli.render import change_dicts, changes_table

    found, changes = api.diff_revisions(store(ctx), plan, rev_a, rev_b)
    if as_json:
        print_json(change_dicts(changes))
    elif not changes:
        console.print(f"revisions {rev_a} and {rev_b} of {found.name} are the same plan")
    else:
        console.print(changes_table(changes, f"{found.name}: revision {rev_a} → {rev_b}"))


@app.command()
def optimize(
    ctx: typer.Context,
    plan: PlanArg,
    available_gpus: Annotated[Optional[int], typer.Option(help="GPUs to fit on [default: the plan's].")] = None,
    gpu_type: Annotated[Optional[str], typer.Option(help="GPU kind: H100, A100, RTX3080, ... [default: the plan's].")] = None,
    memory_budget: Annotated[Optional[str], typer.Option(help="Cap on GPU memory in all, like 128GB.")] = None,
    network_bandwidth: Annotated[Optional[str], typer.Option(help="Between machines, like 100Gbps.")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Show the fit; store no revision.")] = False,
    probe: Annotated[bool, typer.Option(
        "--probe", help="Then run two measured optimizer steps of each stage here (on the target machine).")] = False,
    write_alternative: Annotated[Optional[int], typer.Option(
        "--write-alternative", metavar="N", help="Write alternative N (as numbered) as a plan file (-o).")] = None,
    output: Annotated[Optional[Path], typer.Option(
        "--output", "-o", help="The plan file --write-alternative writes (.yaml or .json).")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Fit the plan to the hardware: verdict, memory breakdown, settings, ETA, alternatives."""
    from muse_plan import api
    from muse_plan.errors import PlanError

    if (write_alternative is None) != (output is None):
        raise PlanError("--write-alternative N and -o FILE go together: which alternative, and where to write it")
    done = api.optimize(store(ctx), plan, gpu_type=gpu_type, available_gpus=available_gpus,
                        memory_budget=memory_budget, network_bandwidth=network_bandwidth, dry_run=dry_run,
                        probe=probe)
    from muse_plan.cli.render_fit import fit_dict, fit_view

    written = api.write_alternative(done.result, write_alternative, output) if output is not None else None
    if as_json:
        print_json(fit_dict(done.result, done.stored) | {"probes": [p.data() | {"stage": p.stage}
                                                                    for p in done.probes]}
                   | ({"written": written} if written else {}))
        return
    console.print(fit_view(done.result, done.stored))
    for p in done.probes:
        console.print(p.describe(), highlight=False)
    if written:
        console.print(f"wrote alternative {write_alternative} ({written['title']}) to {output} as plan "
                      f"{written['name']!r}; import it with: muse plan import {output}"
                      + (f"; {written['note']}" if written["note"] else ""), highlight=False, soft_wrap=True)


@app.command()
def adapt(
    ctx: typer.Context,
    plan: PlanArg,
    performance_metrics: Annotated[Optional[str], typer.Option(
        help="Comma list of loss, throughput, accuracy, grad_norm, reward to read [default: all].")] = None,
    optimization_targets: Annotated[Optional[str], typer.Option(
        help="Comma list of convergence_speed, memory_efficiency, stability, compute_efficiency "
             "[default: all].")] = None,
    run: Annotated[Optional[str], typer.Option("--run", help="Read this run [default: the plan's newest].")] = None,
    apply: Annotated[bool, typer.Option("--apply", help="Store the proposed plan as a revision by adapt.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Read a run's metrics and propose a rewritten plan, each change with its evidence; --apply stores it."""
    from muse_plan.adapt import adapt as propose
    from muse_plan.cli.render_adapt import adapt_dict, adapt_view

    done = propose(store(ctx), plan, metrics=performance_metrics, targets=optimization_targets, run=run,
                   apply=apply)
    if as_json:
        print_json(adapt_dict(done))
    else:
        console.print(adapt_view(done))


@app.command("run")
def run_(
    ctx: typer.Context,
    plan: PlanArg,
    resume: Annotated[bool, typer.Option(
        "--resume", help="Continue the plan's latest unfinished run from its last checkpoint.")] = False,
    num_processes: Annotated[int, typer.Option(
        "--num-processes", min=1, help="GPUs to use, through accelerate launch (all machines', with "
                                       "--num-machines).")] = 1,
    num_machines: NumMachinesOpt = 1,
    machine_rank: MachineRankOpt = 0,
    main_process_ip: MainIpOpt = None,
    main_process_port: MainPortOpt = 29500,
    force: Annotated[bool, typer.Option(
        "--force", help="Run even when the optimizer predicts it does not fit.")] = False,
    alert_thresholds: Annotated[Optional[str], typer.Option(
        help="Alert rules stored with the plan, like gradient_norm:10,memory_usage:90,loss_spike:3.")] = None,
    inject: Annotated[Optional[str], typer.Option(
        help="Faults on purpose, like nan@120,oom@200,grad_spike@300 (also MUSE_INJECT).")] = None,
    probe: Annotated[Optional[bool], typer.Option(
        "--probe/--no-probe", help="One measured step of each stage before the run; default: on a GPU.")] = None,
    log_with: Annotated[Optional[str], typer.Option(
        "--log-with", help="Trackers stored with the plan (training.log_with), like tensorboard,mlflow,wandb; "
                           "none to stop.")] = None,
) -> None:
    """Fit the plan to this machine, then run its stages (or resume its last run)."""
    from muse_plan.cli.run import execute
    from muse_plan.executor.launch import Machines

    execute(ctx, plan, resume=resume, num_processes=num_processes, force=force, inject=inject,
            alert_thresholds=alert_thresholds, probe=probe, log_with=log_with,
            machines=Machines(num_machines, machine_rank, main_process_ip, main_process_port))


@app.command()
def delete(
    ctx: typer.Context,
    plan: PlanArg,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Don't ask.")] = False,
) -> None:
    """Delete a plan with all its revisions, runs and metrics."""
    from muse_plan import api

    if not yes and not typer.confirm(f"Delete plan {plan!r} with its revisions, runs and metrics?",
                                     default=False):
        console.print("not deleted")
        raise typer.Exit(1)
    gone = api.delete(store(ctx), plan)
    console.print(f"deleted plan {gone.name} (id {gone.id})")


@app.command()
def schema() -> None:
    """Print the JSON schema of a plan file."""
    from muse_plan.plan.spec import PlanSpec

    typer.echo(json.dumps(PlanSpec.model_json_schema(), indent=2))
