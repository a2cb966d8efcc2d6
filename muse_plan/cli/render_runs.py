"""Rich renderings of runs: the run list and one run's stages, metrics and events."""

from __future__ import annotations

from typing import Any

from rich.console import Group
from rich.table import Table
from rich.text import Text

from muse_plan.cli.render import when
from muse_plan.monitor.dashboard import RL_RATES
from muse_plan.store.models import Event, Run, StageRun
from muse_plan.store.runs import revision_text, shown_stage_status

STATUS_STYLE = {"completed": "green", "running": "cyan", "failed": "red", "interrupted": "yellow",
                "pending": "dim"}
LOSSES = (("loss", "loss"), ("val_loss", "val loss"), ("unigram_val_loss", "unigram"))
RATES = {"grad_norm": "grad norm {:.3g}", "lr": "lr {:.2e}", "tokens_per_s": "{:,.0f} tok/s",
         "memory_gib": "memory {:.2f} GiB", **RL_RATES}


def _status(status: str) -> Text:
    return Text(status, style=STATUS_STYLE.get(status, ""))


def _progress(stages: list[StageRun]) -> str:
    return " → ".join(f"{s.name} {s.step}/{s.total_steps or '?'}" for s in stages)


def runs_table(rows: list[tuple[Run, Any, str, list[StageRun]]]) -> Table:
    table = Table(header_style="bold underline", box=None, padding=(0, 1), pad_edge=False)
    for column in ("id", "plan", "rev", "status", "started"):
        table.add_column(column, no_wrap=True)
    table.add_column("stages", overflow="fold")
    for run, plan, status, stages in rows:
        table.add_row(str(run.id), plan.name, str(run.under), _status(status),
                      when(run.started_at) if run.started_at else "—", _progress(stages))
    return table


def _metric(name: str, value: float) -> str:
    if name == "lr":
        return f"{value:.2e}"
    if name == "tokens_per_s":
        return f"{value:,.0f}"
    return f"{value:.4g}"


def run_view(run: Run, plan_name: str, status: str, stages: list[tuple[StageRun, dict[str, tuple[int, float]]]],
             events: list[Event]) -> Group:
    title = Text.assemble((f"run {run.id}", "bold"), f"  plan {plan_name} · revision {revision_text(run)} · ",
                          _status(status))
    parts: list[Any] = [title]
    if run.error:
        parts.append(Text(f"stopped by: {run.error}", style="red"))
    if status in ("failed", "interrupted"):
        parts.append(Text(f"resume with: muse run resume {run.id}"))
    if run.run_dir:
        parts.append(Text(f"folder: {run.run_dir}", style="dim"))
    table = Table(header_style="bold underline", box=None, padding=(0, 1), pad_edge=False)
    for column in ("stage", "status", "step", *(label for _, label in LOSSES), "checkpoint"):
        table.add_column(column, no_wrap=True)
    rates = []
    for stage, metrics in stages:
        values = [_metric(n, metrics[n][1]) if n in metrics else "—" for n, _ in LOSSES]
        checkpoint = stage.checkpoint.rsplit("/", 1)[-1] if stage.checkpoint else "—"
        table.add_row(stage.name, _status(shown_stage_status(stage, status)), f"{stage.step}/{stage.total_steps or '?'}",
                      *values, checkpoint)
        shown = [form.format(metrics[n][1]) for n, form in RATES.items() if n in metrics]
        if shown:
            rates.append(Text(f"{stage.name} at step {metrics['loss'][0] if 'loss' in metrics else '?'}: "
                              + " · ".join(shown), style="dim"))
    parts += [Text(""), table, *rates]
    if events:
        parts.append(Text("\nevents", style="bold"))
        log = Table(box=None, show_header=False, padding=(0, 1), pad_edge=False)
        log.add_column(no_wrap=True)
        log.add_column(overflow="fold")
        for event in events:
            style = {"error": "red", "warning": "yellow"}.get(event.severity, "")
            log.add_row(when(event.time), Text(event.message, style=style))
        parts.append(log)
    return Group(*parts)
