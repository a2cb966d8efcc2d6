"""Rich and JSON renderings of ``muse plan adapt``: evidence, proposals, the diff. Pure."""

from __future__ import annotations

from typing import Any

from rich.console import Group
from rich.table import Table
from rich.text import Text

from muse_plan.adapt import Adaptation
from muse_plan.adapt.evidence import missing, summary
from muse_plan.cli.render import change_dicts, changes_table


def _number(series: str, value: float) -> str:
    if series == "tokens_per_s":
        return f"{value:,.0f}"
    return f"{value:.4g}"


def evidence_table(a: Adaptation) -> Table:
    table = Table(title="what the run measured", title_justify="left", header_style="bold", box=None,
                  padding=(0, 1), pad_edge=False)
    for column in ("stage", "series", "points", "first", "last", "best", "median"):
        table.add_column(column, no_wrap=True, justify="left" if column in ("stage", "series") else "right")
    for row in summary(a.evidence):
        s = row["series"]
        table.add_row(row["stage"], s, str(row["points"]),
                      *(_number(s, row[k]) for k in ("first", "last", "best", "median")))
    return table


def _header(a: Adaptation) -> Text:
    e = a.evidence
    text = Text.assemble(("adapt ", "bold"), (a.plan.name, "bold"),
                         f" from run {e.run_id} ({e.run_status}, started under revision {e.run_revision}); "
                         f"rewrites revision {a.head}; hardware {a.hardware}")
    return text


def _proposal(number: int, p: Any) -> Group:
    lines = [Text.assemble((f"{number}. {p.title}", "bold green"), f"  {p.summary}", (f"  [{p.rule}]", "dim"))]
    lines += [Text(f"   measured: {line}") for line in p.evidence]
    lines.append(Text(f"   predicted: {p.effect}", style="cyan"))
    return Group(*lines)


def adapt_view(a: Adaptation) -> Group:
    parts: list[Any] = [_header(a), Text(""), evidence_table(a)]
    absent = missing(a.evidence)
    if absent:
        parts.append(Text(f"not recorded by this run: {', '.join(absent)}", style="dim"))
    parts.append(Text(""))
    if a.proposals:
        parts.append(Text("proposals", style="bold"))
        parts += [_proposal(i, p) for i, p in enumerate(a.proposals, 1)]
    else:
        parts.append(Text("no change proposed for " + ", ".join(a.targets)))
    for p, why in a.set_aside:
        parts.append(Text(f"set aside: {p.title} ({p.summary}): {why}", style="yellow"))
    notes = [f"{rule}: {why}" for rule, why in a.checked] + [f"{rule}: skipped, {why}" for rule, why in a.skipped]
    if notes:
        parts.append(Text("\nchecked", style="bold"))
        parts += [Text(f"  {line}", style="dim") for line in notes]
    if a.changes:
        parts += [Text(""), changes_table(a.changes, f"{a.plan.name}: revision {a.head} → proposed")]
    parts.append(Text(_closing(a)))
    return Group(*parts)


def _closing(a: Adaptation) -> str:
    if a.revision is not None:
        laid = f"; {a.laid}" if a.laid else ""
        return (f"stored as revision {a.revision.number} (author adapt{laid}); see it with: "
                f"muse plan history {a.plan.name}")
    if a.changes:
        return f"nothing stored; store it with: muse plan adapt {a.plan.name} --apply"
    return f"nothing to store; plan {a.plan.name} stays at revision {a.head}"


def _proposal_dict(p: Any) -> dict[str, Any]:
    return {"rule": p.rule, "title": p.title, "summary": p.summary,
            "changes": dict(zip(p.paths, (value for _, value in p.changes))),
            "evidence": list(p.evidence), "effect": p.effect, "measured": p.measured, "predicted": p.predicted}


def adapt_dict(a: Adaptation) -> dict[str, Any]:
    e = a.evidence
    return {
        "plan": a.plan.name, "head": a.head, "hardware": a.hardware, "targets": list(a.targets),
        "run": {"id": e.run_id, "status": e.run_status, "revision": e.run_revision},
        "metrics": list(e.metrics), "not_recorded": missing(e), "evidence": summary(e), "alerts": e.alerts,
        "proposals": [_proposal_dict(p) for p in a.proposals],
        "set_aside": [{**_proposal_dict(p), "why": why} for p, why in a.set_aside],
        "checked": [{"rule": r, "why": why} for r, why in a.checked],
        "skipped": [{"rule": r, "why": why} for r, why in a.skipped],
        "changes": change_dicts(a.changes),
        "stored_revision": a.revision.number if a.revision is not None else None,
        "reason": a.reason if a.proposals else None,
    }
