"""The run's picture: four panels against the global step, an events strip
above them, and the memory and the events list beside them.

Design decisions:
- Drawn on a bare ``Figure`` with the Agg canvas, never through pyplot: no
  global figure state and no display needed, so it works on a headless
  training box and inside tests. 1600×1000 px at 100 dpi, constrained layout,
  the right column a subfigure of its own so its legend can't push the
  left column's panels apart.
- Markers stand on every panel at their global step: a fault as a solid red
  line (and a red ✕ on the loss curve), an alert as a dashed orange line with
  a ▼ at the panel's top, a rewrite or recovery as a dash-dot purple line.
- Their labels live in the strip above the panels, numbered, on up to three
  rows. The layout is run once first, so each label's width is measured, not
  guessed; when the long labels can't all be placed without overprinting,
  every label gets shorter ("3 rewrite", then "3"). The numbers point into
  the events list at the right, which has room for the messages.
"""

from __future__ import annotations

import io
import textwrap
from typing import Any, Callable, Sequence

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

from muse_plan.report import Marker, RunReport, plain, short, size

WIDTH, HEIGHT, DPI = 16, 10, 100
STYLE = {  # kind → (colour, line style, strip symbol)
    "fault": ("#d62728", "-", "X"),
    "alert": ("#ff7f0e", "--", "v"),
    "rewrite": ("#7b2cbf", "-.", "D"),
    "recovery": ("#7b2cbf", "-.", "o"),
}
TRAIN, VAL, BASE, STAGE = "#1f77b4", "#2ca02c", "#7f7f7f", "#555555"
PREDICTED, MEASURED = "#b39ddb", "#4527a0"
PANELS = (("loss", "loss (nats/token)"), ("grad_norm", "gradient norm"), ("lr", "learning rate"),
          ("tokens_per_s", "tokens/s"))
STRIP_ROWS = (0.58, 0.34, 0.10)  # y of each label row in the strip (axes fraction)
GAP_PX = 8  # from a marker's symbol to its label, and between labels
LABELS: tuple[Callable[[int, Marker], str], ...] = (
    lambda n, m: f"{n} {m.kind}: {short(m.label, 34)}",
    lambda n, m: f"{n} {m.kind}",
    lambda n, m: str(n),
)
SPIKE = 10  # a loss over 10× the median is a spike, drawn at the axis' top
SIDE_LINES, SIDE_WIDTH = 20, 48  # lines and characters the events list holds


def render(report: RunReport) -> bytes:
    """The report as PNG bytes."""
    fig = Figure(figsize=(WIDTH, HEIGHT), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    left, right = fig.subfigures(1, 2, width_ratios=(2.9, 1.1), wspace=0.01)
    grid = left.add_gridspec(len(PANELS) + 1, 1, height_ratios=(0.62, 1.45, 1, 1, 1))
    strip = left.add_subplot(grid[0])
    panels = [left.add_subplot(grid[i + 1], sharex=strip) for i in range(len(PANELS))]
    memory_ax, side = right.subplots(2, 1, height_ratios=(1, 1.3))
    fig.suptitle(report.title, fontsize=16, fontweight="bold")

    total = max((s.end for s in report.spans), default=1) or 1
    for ax, (name, label) in zip(panels, PANELS):
        _curve(ax, report.series.get(name, []), label)
        _mark(ax, report.markers)
    _losses(panels[0], report)
    _axes(panels, report)
    _cross_on_loss(panels[0], report)
    _frame_strip(strip, report)
    panels[-1].set_xlabel("step (stages laid end to end)")
    panels[-1].set_xlim(0, total * 1.01)
    _memory(memory_ax, report)
    _side(side, report)
    fig.draw_without_rendering()  # settle the layout, so the strip can measure its labels
    renderer = fig.canvas.get_renderer()
    _stages(report, strip, panels, renderer)
    _strip_labels(strip, report.markers, renderer)

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI)
    return buffer.getvalue()


def _curve(ax: Any, segments: list[list[tuple[int, float]]], label: str) -> None:
    for seg in (s for s in segments if s):
        xs, ys = zip(*seg)
        ax.plot(xs, ys, color=TRAIN, lw=1.4)
    ax.set_ylabel(label)
    ax.grid(True, alpha=0.25)
    if not any(segments):
        ax.set_yticks([])
        ax.text(0.5, 0.5, "nothing recorded", transform=ax.transAxes, ha="center", va="center",
                color="dimgray", style="italic")


def _losses(ax: Any, report: RunReport) -> None:
    for seg in (s for s in report.series.get("val_loss", []) if s):
        xs, ys = zip(*seg)
        ax.plot(xs, ys, "o", color=VAL, ms=6, zorder=4)
    for span, final in zip(report.spans, report.final):
        if "unigram_val_loss" in final:
            ax.hlines(final["unigram_val_loss"], span.start, span.end, colors=BASE, linestyles="--", lw=1.3)
    _clip_spikes(ax, report)


def _clip_spikes(ax: Any, report: RunReport) -> None:
    """Keep a spike (a loss 10⁴× the rest) from flattening the curve: the axis stops above
    the ordinary values and each spike is an arrow at the top with its value."""
    points = [p for name in ("loss", "val_loss") for seg in report.series.get(name, []) for p in seg]
    if not points:
        return
    values = sorted(v for _, v in points)
    ordinary = [v for v in values if v <= SPIKE * max(values[len(values) // 2], 1e-9)]
    baselines = [f["unigram_val_loss"] for f in report.final if "unigram_val_loss" in f]
    top = max(ordinary + baselines)
    if top >= values[-1]:
        return
    low = min(ordinary + baselines)
    ax.set_ylim(low - 0.08 * (top - low), top + 0.12 * (top - low))
    for x, v in points:
        if v > top:
            ax.plot(x, 1.0, marker="^", color=TRAIN, ms=9, transform=ax.get_xaxis_transform(), clip_on=False)
            ax.annotate(f"{v:.3g}", (x, 1.0), xycoords=("data", "axes fraction"), xytext=(6, -9),
                        textcoords="offset pixels", fontsize=8.5, color=TRAIN, va="top",
                        bbox={"boxstyle": "round,pad=0.1", "fc": "white", "ec": "none", "alpha": 0.85})


def _axes(panels: list[Any], report: RunReport) -> None:
    """Log gradient norms; plain numbers on every axis (no 1e-3 offsets to look for)."""
    plain = FuncFormatter(lambda v, _: f"{v:.2g}")
    norms = [v for seg in report.series.get("grad_norm", []) for _, v in seg if v > 0]
    if norms:
        panels[1].set_yscale("log")
        spread = max(norms) / min(norms)
        if spread < 300:  # a few decades at most: plainly written ticks, as many as stay apart
            subs = (1, 1.5, 2, 3, 5, 7) if spread < 10 else (1, 2, 5)
            panels[1].yaxis.set_major_locator(LogLocator(subs=subs))
            panels[1].yaxis.set_major_formatter(plain)
            panels[1].yaxis.set_minor_formatter(NullFormatter())
    panels[2].yaxis.set_major_formatter(plain)
    panels[3].yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:,.0f}"))
    for ax in panels[:-1]:
        ax.tick_params(labelbottom=False)


def _stages(report: RunReport, strip: Any, panels: list[Any], renderer: Any) -> None:
    """Alternate shading per stage, dotted boundaries, each stage's name in the strip
    (shortened, or left out, where its span is too narrow for it)."""
    px_per_step = _px_per_step(strip)
    for i, span in enumerate(report.spans):
        for ax in (strip, *panels):
            if i % 2:
                ax.axvspan(span.start, span.end, color="#f0f0f0", zorder=0, lw=0)
            if i:
                ax.axvline(span.start, color=STAGE, ls=":", lw=1.3, zorder=1)
        full = span.name if span.status == "completed" else f"{span.name} ({span.status})"
        text = strip.text(span.start + span.length / 2, 0.97, full, ha="center", va="top", fontsize=11,
                          fontweight="bold", color=STAGE, in_layout=False, zorder=4,
                          bbox={"boxstyle": "square,pad=0.1", "fc": "#f0f0f0" if i % 2 else "white", "ec": "none"})
        room = span.length * px_per_step - GAP_PX
        for candidate in (short(span.name, 12), short(span.name, 5)):
            if text.get_window_extent(renderer).width <= room:
                break
            text.set_text(candidate)
        if text.get_window_extent(renderer).width > room:
            text.set_visible(False)


def _mark(ax: Any, markers: list[Marker]) -> None:
    for m in markers:
        colour, style, _ = STYLE[m.kind]
        ax.axvline(m.x, color=colour, ls=style, lw=1.5 if m.kind == "fault" else 1.2, alpha=0.85, zorder=3)
        if m.kind == "alert":
            ax.plot(m.x, 1.0, marker="v", color=colour, ms=8, transform=ax.get_xaxis_transform(),
                    clip_on=False, zorder=5)


def _cross_on_loss(ax: Any, report: RunReport) -> None:
    points = [p for seg in report.series.get("loss", []) for p in seg]
    for m in report.markers:
        if m.kind == "fault" and points:
            x, y = min(points, key=lambda p: abs(p[0] - m.x))
            ax.plot(m.x, y, marker="X", color=STYLE["fault"][0], ms=12, mec="white", mew=1, zorder=6)


def _frame_strip(ax: Any, report: RunReport) -> None:
    ax.set_ylim(0, 1)
    ax.set_yticks([])
    ax.tick_params(labelbottom=False, bottom=False)
    for edge in ("left", "right", "top"):
        ax.spines[edge].set_visible(False)
    for m in report.markers:
        colour, style, symbol = STYLE[m.kind]
        ax.axvline(m.x, color=colour, ls=style, lw=1.2, alpha=0.6, zorder=2)
    steps = max((s.end for s in report.spans), default=0)
    sub = report.device.upper() if report.device != "unknown" else "device unknown"
    sub += f" × {report.processes}" if report.processes > 1 else ""
    sub += f" · {len(report.spans)} stage{'s' if len(report.spans) != 1 else ''}, {steps:,} steps"
    if report.error:
        sub += f" · stopped by: {short(report.error, 90)}"
    ax.set_title(sub, loc="left", fontsize=10, color="dimgray")


def _px_per_step(ax: Any) -> float:
    lo, hi = ax.get_xlim()
    return ax.get_window_extent().width / max(hi - lo, 1e-9)


def stack(xs: Sequence[float], widths: Sequence[Sequence[float]], limit: float,
          rows: int = len(STRIP_ROWS)) -> list[tuple[int, bool, int]] | None:
    """For labels at pixel ``xs[i]``, each with candidate widths ``widths[i]`` (longest
    first, gap included): a (row, reads leftwards, candidate) each, so that no two on a
    row overlap and none leaves [0, limit]; None when some label fits nowhere. Labels
    read rightwards unless that runs off the edge."""
    taken: list[list[tuple[float, float]]] = [[] for _ in range(rows)]
    placed = []
    for x, candidates in zip(xs, widths):
        for choice, w in enumerate(candidates):
            leftwards = x + w > limit and x - w >= 0
            lo, hi = (x - w, x) if leftwards else (x, x + w)
            row = next((r for r, used in enumerate(taken) if all(hi <= a or lo >= b for a, b in used)), None)
            if row is not None:
                break
        else:
            return None
        taken[row].append((lo, hi))
        placed.append((row, leftwards, choice))
    return placed


def _strip_labels(ax: Any, markers: list[Marker], renderer: Any) -> None:
    """Each marker's symbol and numbered label in the strip: the longest label that
    fits, else all as numbers, else symbols only (the events list has the rest)."""
    if not markers:
        return
    lo, _ = ax.get_xlim()
    scale = _px_per_step(ax)
    xs = [(m.x - lo) * scale for m in markers]
    limit = ax.get_window_extent().width
    probe = ax.text(0, 0, "", fontsize=9, in_layout=False)

    def width(text: str) -> float:
        probe.set_text(text)
        return probe.get_window_extent(renderer).width + 2 * GAP_PX

    texts = [[label(n, m) for label in LABELS] for n, m in enumerate(markers, 1)]
    widths = [[width(t) for t in options] for options in texts]
    number = len(LABELS) - 1
    # who may have a longer label than its number: everyone, else all but alerts, else no one
    for wordy in (lambda m: True, lambda m: m.kind != "alert", lambda m: False):
        choices = [range(len(LABELS)) if wordy(m) else [number] for m in markers]
        placed = stack(xs, [[w[c] for c in cs] for w, cs in zip(widths, choices)], limit)
        if placed is not None:
            labels = [t[cs[c]] for t, cs, (_, _, c) in zip(texts, choices, placed)]
            break
    else:  # too crowded even for numbers: symbols only, the events list has the rest
        placed, labels = [(0, False, 0)] * len(markers), [""] * len(markers)
    probe.remove()
    for m, text, (row, leftwards, _) in zip(markers, labels, placed):
        colour, _, symbol = STYLE[m.kind]
        y = STRIP_ROWS[row]
        ax.plot(m.x, y, marker=symbol, color=colour, ms=8, mec="white", mew=0.8, zorder=5, clip_on=False)
        if text:
            ax.annotate(text, (m.x, y), xycoords=("data", "axes fraction"),
                        xytext=(-GAP_PX if leftwards else GAP_PX, 0), textcoords="offset pixels",
                        ha="right" if leftwards else "left", va="center", fontsize=9,
                        color=colour, in_layout=False, zorder=4,
                        bbox={"boxstyle": "round,pad=0.15", "fc": "white", "ec": "none", "alpha": 0.85})


def _memory(ax: Any, report: RunReport) -> None:
    """Predicted over measured bars per stage; a log axis when they differ by more than 20×
    (on a CPU, RSS holds the Python runtime and torch beside a tiny model)."""
    rows = report.memory
    height = 0.36
    gib = [v for r in rows for v in (r.predicted_gib, r.measured_gib) if v is not None and v > 0] or [1.0]
    scale, unit = (1, "GiB") if max(gib) >= 1 else (1024, "MiB")
    values = [v * scale for v in gib]
    low, top = min(values), max(values)
    log = top / low > 20
    if log:
        ax.set_xscale("log")
        ax.set_xlim(low / 3, top * 12)
    else:
        ax.set_xlim(0, top * 1.45)
    start = low / 2.5 if log else top * 0.02

    def beside(v: float) -> float:
        return v * 1.15 if log else v + top * 0.02

    for i, r in enumerate(rows):
        y = len(rows) - 1 - i
        for value, colour, dy, missing in ((r.predicted_gib, PREDICTED, height / 2, short(r.note, 34)),
                                           (r.measured_gib, MEASURED, -height / 2, "not measured")):
            if value is not None and value > 0:
                ax.barh(y + dy, value * scale, height, color=colour)
                ax.text(beside(value * scale), y + dy, size(value), va="center", fontsize=9)
            else:
                ax.text(start, y + dy, missing, va="center", fontsize=8.5, style="italic", color="dimgray")
    ax.set_yticks(range(len(rows)), [short(r.stage, 14) for r in reversed(rows)])
    ax.set_ylim(-0.8, len(rows) - 0.2)
    ax.set_xlabel(f"{unit} per process" + (" (log scale)" if log else ""))
    ax.set_title("memory: predicted vs measured", fontsize=11)
    ax.grid(True, axis="x", alpha=0.25)
    handles = [Patch(color=PREDICTED, label="predicted (memory model)"),
               Patch(color=MEASURED, label=report.measured_label)]
    ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.2), fontsize=8.5, frameon=False)


def _side(ax: Any, report: RunReport) -> None:
    """The numbered markers' messages (fewer lines each when there are many), then a key."""
    ax.axis("off")
    ax.set_title("events", loc="left", fontsize=11)
    marked = report.marked
    per_event = max(1, min(3, SIDE_LINES // max(1, len(marked))))
    lines: list[str] = []
    for n, e in enumerate(marked, 1):
        where = f"{e.stage} step {e.step}" if e.step is not None else (f"{e.stage} start" if e.stage else "run")
        text = f"{n} {e.kind} · {where}: {plain(e.kind, e.message)}"
        wrapped = textwrap.wrap(text, SIDE_WIDTH, subsequent_indent="   ")
        if len(wrapped) > per_event:
            rest = " ".join(w.strip() for w in wrapped[per_event - 1:])
            indent = "   " if per_event > 1 else ""
            wrapped = wrapped[:per_event - 1] + [indent + short(rest, SIDE_WIDTH - len(indent))]
        lines += wrapped
    if not lines:
        lines = ["no faults, alerts or rewrites"]
    if len(lines) > SIDE_LINES:
        lines = lines[: SIDE_LINES - 1] + [f"… {len(marked)} in all: see the HTML page"]
    ax.text(0, 1, "\n".join(lines), va="top", ha="left", fontsize=8.5, family="monospace",
            transform=ax.transAxes, linespacing=1.3)
    key = [Line2D([], [], color=TRAIN, lw=1.4, label="train"),
           Line2D([], [], color=VAL, ls="", marker="o", label="validation"),
           Line2D([], [], color=BASE, ls="--", label="unigram baseline (val)"),
           Line2D([], [], color=STAGE, ls=":", label="stage boundary"),
           Line2D([], [], color=STYLE["fault"][0], ls="-", marker="X", label="fault"),
           Line2D([], [], color=STYLE["alert"][0], ls="--", marker="v", label="alert"),
           Line2D([], [], color=STYLE["rewrite"][0], ls="-.", marker="D", label="rewrite"),
           Line2D([], [], color=STYLE["recovery"][0], ls="-.", marker="o", label="recovery")]
    ax.legend(handles=key, loc="lower left", fontsize=9, frameon=False, ncol=2)
