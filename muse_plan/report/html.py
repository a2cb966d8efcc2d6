"""The run's page: the picture embedded as base64, then its stages, final
metrics, plan revisions and every event, in one file with inline CSS — no
script, nothing fetched, so it opens from a mail attachment or a laptop
offline. Every stored string is escaped."""

from __future__ import annotations

import base64
from datetime import datetime
from html import escape
from typing import Any, Iterable

from muse_plan.report import RunReport, size

CSS = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; color: #222; margin: 24px auto;
       max-width: 1640px; padding: 0 16px; }
h1 { font-size: 22px; margin: 0 0 4px; } h2 { font-size: 17px; margin: 28px 0 8px; }
.sub { color: #666; margin-bottom: 14px; } .error { color: #b71c1c; }
img { width: 100%; max-width: 1600px; border: 1px solid #ddd; }
table { border-collapse: collapse; font-variant-numeric: tabular-nums; }
th, td { padding: 4px 10px; border-bottom: 1px solid #e4e4e4; text-align: left; vertical-align: top; }
th { background: #f5f5f5; } td.num { text-align: right; }
tr.fault td { background: #fdecea; } tr.alert td { background: #fff4e5; }
tr.rewrite td, tr.recovery td { background: #f3e8fd; }
"""
STAGE_METRICS = (("loss", "train loss", "{:.4f}"), ("val_loss", "val loss", "{:.4f}"),
                 ("unigram_val_loss", "unigram val loss", "{:.4f}"), ("grad_norm", "grad norm", "{:.3g}"),
                 ("lr", "lr", "{:.2e}"), ("tokens_per_s", "tokens/s", "{:,.0f}"))


def page(report: RunReport, png: bytes) -> str:
    image = base64.b64encode(png).decode("ascii")
    parts = [
        "<!doctype html>", '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{escape(report.title)}</title><style>{CSS}</style></head><body>",
        f"<h1>{escape(report.title)}</h1>",
        f'<div class="sub">device: {escape(report.device)}'
        f"{f' × {report.processes}' if report.processes > 1 else ''}</div>",
    ]
    if report.error:
        parts.append(f'<p class="error">stopped by: {escape(report.error)}</p>')
    parts += [f'<img alt="{escape(report.title)}" src="data:image/png;base64,{image}">',
              "<h2>Stages</h2>", _stages(report),
              "<h2>Plan revisions</h2>", _revisions(report),
              "<h2>Events</h2>", _events(report), "</body></html>"]
    return "\n".join(parts) + "\n"


def _table(head: Iterable[str], rows: Iterable[tuple[str, list[tuple[str, bool]]]]) -> str:
    """A table: ``rows`` of (css class, [(escaped cell html, numeric)])."""
    out = ["<table><tr>" + "".join(f"<th>{escape(h)}</th>" for h in head) + "</tr>"]
    for css, cells in rows:
        tds = "".join(f'<td class="num">{c}</td>' if num else f"<td>{c}</td>" for c, num in cells)
        out.append(f'<tr class="{css}">{tds}</tr>')
    return "\n".join(out + ["</table>"])


def _value(final: dict[str, float], name: str, fmt: str) -> str:
    return fmt.format(final[name]) if name in final else "—"


def _size(value: float | None) -> str:
    return "—" if value is None else size(value)


def _stages(report: RunReport) -> str:
    head = ["stage", "status", "steps", *(label for _, label, _ in STAGE_METRICS),
            "predicted memory", report.measured_label]
    rows = []
    for span, final, mem in zip(report.spans, report.final, report.memory):
        cells = [(escape(span.name), False), (escape(span.status), False),
                 (f"{span.start + 1}–{span.end}" if span.length else "—", True)]
        cells += [(_value(final, name, fmt), True) for name, _, fmt in STAGE_METRICS]
        cells += [(_size(mem.predicted_gib) if mem.predicted_gib is not None else escape(mem.note), True),
                  (_size(mem.measured_gib), True)]
        rows.append(("", cells))
    return _table(head, rows)


def _when(moment: datetime | None) -> str:
    return moment.strftime("%Y-%m-%d %H:%M:%S") if moment else "—"


def _revisions(report: RunReport) -> str:
    if not report.revisions:
        return "<p>—</p>"
    rows: list[tuple[str, list[tuple[str, bool]]]] = [
        ("", [(str(r.number), True), (escape(r.author), False), (escape(r.reason), False),
              (_when(r.created_at), False)]) for r in report.revisions]
    return _table(["revision", "author", "reason", "time (UTC)"], rows)


def _events(report: RunReport) -> str:
    if not report.events:
        return "<p>no events recorded</p>"
    rows: list[tuple[str, Any]] = []
    for e in report.events:
        step = (str(e.step), str(e.x)) if e.step is not None else ("—", "—")
        rows.append((escape(e.kind), [(_when(e.time), False), (escape(e.stage or "—"), False),
                                      (step[0], True), (step[1], True),
                                      (escape(e.kind), False), (escape(e.severity), False),
                                      (escape(e.message), False)]))
    return _table(["time (UTC)", "stage", "step", "global step", "kind", "severity", "message"], rows)
