"""Rich renderings of plans, revisions and diffs. Pure: data in, renderables out."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from rich.console import Group
from rich.markup import escape
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from muse_plan.hardware.catalog import CATALOG
from muse_plan.plan import units
from muse_plan.plan.diff import MISSING, Change
from muse_plan.plan.spec import PlanSpec, StageSpec, TrainingSpec
from muse_plan.store.models import Plan, PlanRevision

OPEN = "[dim]— optimizer fills[/]"


def when(moment: datetime) -> str:
    return moment.astimezone().strftime("%Y-%m-%d %H:%M")


def _kv(rows: list[tuple[str, Any]]) -> Table:
    table = Table.grid(padding=(0, 2))
    table.add_column(style="bold cyan", no_wrap=True)
    table.add_column()
    for key, value in rows:
        table.add_row(key, value if isinstance(value, (str, Text)) else str(value))
    return table


def model_panel(spec: PlanSpec) -> Panel:
    m = spec.model
    shape = m.resolved_shape()
    source = "explicit" if m.shape else f"standard shape for {m.scale}"
    rows = [
        ("scale", f"{m.scale}  (≈{units.format_count(m.approx_params())} parameters as shaped)"),
        ("shape", f"{shape.layers} layers × d_model {shape.d_model}, {shape.n_heads} heads "
                  f"({shape.n_kv_heads} kv), d_ff {shape.d_ff}  [dim]{source}[/]"),
        ("residual", m.residual or OPEN),
        ("family", m.family),
        ("sequence", f"{m.seq_len} tokens, vocabulary {m.vocab_size}"),
    ]
    if m.init_from:
        rows.append(("init from", escape(m.init_from)))
    return Panel(_kv(rows), title="model", title_align="left")


def compute_panel(spec: PlanSpec) -> Panel:
    c = spec.compute
    if c is None:
        rows = [("budget", "[dim]— this machine, detected at fit time (`muse hardware`)[/]")]
    elif c.gpu is None:
        rows = [("budget", "cpu")]
    else:
        kind = CATALOG.get(c.gpu)
        detail = (f"{kind.display}; bf16 {'yes' if kind.bf16 else 'no'}, "
                  f"{(kind.peak_tflops_bf16 or kind.peak_tflops_fp16):g} TFLOP/s peak") if kind else "not in the catalog"
        rows = [("budget", f"{c.budget}  [dim]{detail}[/]")]
    if c is not None:
        for label, value, unit in (("memory budget", c.memory_budget_gib, "GiB"),
                                   ("host RAM", c.host_ram_gib, "GiB"),
                                   ("network", c.network_gbps, "Gbps")):
            if value is not None:
                rows.append((label, f"{value:g} {unit}"))
    rows.append(("timeline", spec.timeline or "[dim]none set[/]"))
    rows.append(("tasks", ", ".join(spec.target_tasks) or "[dim]none set[/]"))
    rows.append(("data", escape(f"{spec.data.source} (tokenizer {spec.data.tokenizer})")))
    return Panel(_kv(rows), title="compute, time, tasks", title_align="left")


def _compact(options: dict[str, Any]) -> str:
    def show(value: Any) -> str:
        if isinstance(value, list):
            return "+".join(map(str, value))
        if isinstance(value, dict):
            return "/".join(f"{v:g}" if isinstance(v, float) else str(v) for v in value.values())
        return str(value)

    return ", ".join(f"{k}={show(v)}" for k, v in options.items() if v is not None)


def techniques_panel(spec: PlanSpec) -> Panel:
    rows = []
    for name in spec.techniques.names():
        options = getattr(spec.techniques, name).model_dump(mode="json")
        rows.append((name, Text(_compact(options), style="dim")))
    body = _kv(rows) if rows else Text("none", style="dim")
    return Panel(body, title="techniques", title_align="left")


def _budget(stage: StageSpec) -> str:
    if stage.steps is not None:
        return f"{stage.steps} steps"
    if stage.tokens is not None:
        return f"{stage.tokens} tokens"
    return "—"


def _shape(spec: PlanSpec, stage: StageSpec) -> str:
    """layers×d_model, heads and context of the decoder a stage trains (or grows to)."""
    given = stage.shape or spec.model.shape
    shape = given.resolved() if given is not None else spec.model.resolved_shape()
    return f"{shape.layers}×{shape.d_model}, {shape.n_heads}h, seq {stage.seq_len or spec.model.seq_len}"


def stages_table(spec: PlanSpec) -> Table:
    branches = any(stage.from_stage for stage in spec.stages)
    table = Table(title="stages", title_justify="left", header_style="bold")
    table.add_column("#", justify="right")
    table.add_column("stage  [dim]options[/]", overflow="fold", ratio=1)
    table.add_column("engine", no_wrap=True)
    table.add_column("budget", no_wrap=True)
    table.add_column("shape", no_wrap=True)
    if branches:
        table.add_column("from", overflow="fold")
    previous, shapes = "—", {}
    for i, stage in enumerate(spec.stages, 1):
        shapes[stage.name] = shape = _shape(spec, stage)
        grown_from = shapes.get(stage.from_stage or previous) if stage.engine == "growth" else None
        shape_text = f"{grown_from} →\n{shape}" if grown_from else shape  # two lines: the names keep room
        name = Text(stage.name, style="bold")
        if stage.kind != stage.name:
            name.append(f" ({stage.kind})")
        if stage.options:
            name.append("\n" + _compact(stage.options), style="dim")
        if stage.training is not None:  # the stage's own training settings, over the plan's
            own = stage.training.model_dump(mode="json", exclude_defaults=True)
            name.append("\ntraining: " + _compact(own), style="dim")
        row = [str(i), name, stage.engine or "", _budget(stage), shape_text]
        table.add_row(*row, *([stage.from_stage or previous] if branches else []))
        previous = stage.name
    return table


def training_panel(training: TrainingSpec) -> Panel:
    values = training.model_dump()
    chosen = [(k, ", ".join(v) if k == "log_with" else str(v)) for k, v in values.items() if v is not None]
    open_ = [k for k, v in values.items() if v is None and k != "log_with"]  # trackers are the user's to name
    parts: list[Any] = [_kv(chosen)]
    if open_:
        parts.append(Text("left open for the optimizer: " + ", ".join(open_), style="dim"))
    return Panel(Group(*parts), title="training settings", title_align="left")


def revisions_table(revisions: list[tuple[PlanRevision, list[Change]]], title: str = "revisions") -> Table:
    table = Table(title=title, title_justify="left", header_style="bold")
    for column in ("rev", "when", "author", "reason", "changed"):
        table.add_column(column, overflow="fold")
    for revision, changes in revisions:
        changed = ", ".join(c.path for c in changes[:4]) + (f" (+{len(changes) - 4})" if len(changes) > 4 else "")
        table.add_row(str(revision.number), when(revision.created_at), revision.author,
                      Text(revision.reason), Text(changed or "—", style="" if changed else "dim"))
    return table


def plan_view(plan: Plan, revision: PlanRevision, spec: PlanSpec,
              recent: list[tuple[PlanRevision, list[Change]]]) -> Group:
    head = f" (newest is {plan.head})" if revision.number != plan.head else ""
    title = Text.assemble((spec.name, "bold"), f"  id {plan.id} · revision {revision.number}{head} · "
                          f"{revision.author}: {revision.reason}")  # Text: user text is never markup
    parts: list[Any] = [title]
    if spec.description:
        parts.append(Text(spec.description, style="italic"))
    parts += [model_panel(spec), compute_panel(spec), techniques_panel(spec),
              stages_table(spec), training_panel(spec.training), revisions_table(recent)]
    return Group(*parts)


def plans_table(rows: list[tuple[Plan, PlanRevision, PlanSpec]]) -> Table:
    table = Table(header_style="bold underline", box=None, padding=(0, 1), pad_edge=False)
    table.add_column("id", justify="right")
    table.add_column("name", no_wrap=True)
    table.add_column("scale", no_wrap=True)
    table.add_column("techniques", overflow="fold", min_width=10)
    for column in ("compute", "timeline", "rev"):
        table.add_column(column, no_wrap=True)
    for plan, revision, spec in rows:
        table.add_row(str(plan.id), plan.name, spec.model.scale, ", ".join(spec.techniques.names()) or "—",
                      spec.compute.budget if spec.compute else "detected", spec.timeline or "—",
                      str(plan.head))
    return table


def _value(value: Any) -> str:
    return "—" if value is MISSING else repr(value) if isinstance(value, str) else str(value)


def changes_table(changes: list[Change], title: str) -> Table:
    table = Table(title=title, title_justify="left", header_style="bold")
    for column in ("field", "", "before", "after"):
        table.add_column(column, overflow="fold")
    marks = {"added": "[green]+[/]", "removed": "[red]-[/]", "changed": "[yellow]~[/]"}
    for change in changes:
        table.add_row(Text(change.path), marks[change.kind], Text(_value(change.old)), Text(_value(change.new)))
    return table


def change_dicts(changes: list[Change]) -> list[dict[str, Any]]:
    return [{"path": c.path, "kind": c.kind,
             "old": None if c.old is MISSING else c.old,
             "new": None if c.new is MISSING else c.new} for c in changes]
