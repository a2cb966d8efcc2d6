"""``muse report``: one run as a picture (PNG) and a page (HTML).

Design decisions:
- Stages are laid end to end on one global step axis: a stage starts where
  the one before it ends (its planned ``total_steps``, or the steps it
  recorded if more), so a stage-local step ``s`` of a stage starting at ``o``
  is drawn at ``o + s``. ``lay_out``, ``global_step`` and ``markers`` are
  pure functions of plain data, so the positions are tested without a figure.
- An event names its stage by ``stage_run_id``; one that does not (a fault
  recorded for the whole run) belongs to the stage that was running when it
  was recorded, found by time. An event without a step stands at its
  stage's start.
- Predicted memory is the memory model's peak for each stage under the
  executor's own resolved settings for the revision the run started under,
  on the device the run's start event names (a GPU taken to have bf16
  when the plan leaves the precision open). On a GPU the CUDA context and
  the allocator's reserve are left out, since the measured number is
  ``torch.cuda.max_memory_allocated``; on a CPU the measured number is the
  process's RSS, which also holds Python and torch themselves.
- Gathering (here, no matplotlib) is apart from drawing (``plot``) and the
  page (``html``), which are imported only when a report is written, so the
  CLI starts without matplotlib.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, NamedTuple, Sequence

from sqlmodel import Session

from muse_plan.errors import MuseError, NotFound
from muse_plan.store import repo, runs
from muse_plan.store.models import Event, Plan, PlanRevision, Run

SERIES = ("loss", "val_loss", "grad_norm", "lr", "tokens_per_s", "memory_gib")
MARKED = ("fault", "alert", "rewrite", "recovery")
GIB = 2**30
LABEL_CHARS = 30


class ReportError(MuseError):
    """The report can't be written where the user asked."""


class Span(NamedTuple):
    """A stage on the global step axis: it covers steps ``start + 1 .. start + length``."""

    stage_run_id: int | None
    name: str
    start: int
    length: int
    status: str = "completed"
    started_at: datetime | None = None

    @property
    def end(self) -> int:
        return self.start + self.length


class Marker(NamedTuple):
    """An event drawn on the figure: compares equal to the tuple ``(x, kind, label)``."""

    x: int
    kind: str
    label: str


@dataclass(frozen=True)
class EventRow:
    x: int
    stage: str
    step: int | None
    kind: str
    severity: str
    message: str
    time: datetime


@dataclass(frozen=True)
class MemoryRow:
    stage: str
    predicted_gib: float | None
    measured_gib: float | None
    note: str = ""  # why there is no prediction


@dataclass
class RunReport:
    plan: str
    run_id: int
    revision: int
    status: str
    error: str | None
    device: str  # "gpu", "cpu" or "unknown"
    processes: int
    spans: list[Span]
    series: dict[str, list[list[tuple[int, float]]]]  # name → one list of (x, value) per span
    final: list[dict[str, float]]  # each span's last value of every metric
    markers: list[Marker]
    events: list[EventRow]
    memory: list[MemoryRow]
    revisions: list[PlanRevision] = field(default_factory=list)

    @property
    def title(self) -> str:
        last = max((r.number for r in self.revisions), default=self.revision)
        revision = f"revision {self.revision}" + (f"→{last}" if last > self.revision else "")
        return f"{self.plan} · run {self.run_id} · {revision} · {self.status}"

    @property
    def marked(self) -> list[EventRow]:
        """The events behind ``markers``, in the same order."""
        return sorted((e for e in self.events if e.kind in MARKED), key=lambda e: e.x)

    @property
    def measured_label(self) -> str:
        return {"gpu": "measured (max allocated, GPU)", "cpu": "measured (process RSS, CPU)"}.get(
            self.device, "measured (max allocated on GPU / process RSS on CPU)")


# ---- positions: pure ----------------------------------------------------------------

def lay_out(stages: Iterable[Sequence[Any]]) -> list[Span]:
    """Spans end to end from ``(stage_run_id, name, length[, status[, started_at]])`` in order."""
    spans, start = [], 0
    for stage_run_id, name, length, *rest in stages:
        spans.append(Span(stage_run_id, name, start, length, *rest))
        start += length
    return spans


def _utc(moment: datetime | None) -> datetime | None:
    if moment is None or moment.tzinfo is not None:
        return moment
    return moment.replace(tzinfo=timezone.utc)  # SQLite hands back naive UTC


def stage_of(spans: Sequence[Span], stage_run_id: int | None, time: datetime | None = None) -> Span | None:
    """The span an event belongs to: by its stage, else the stage running at its time."""
    for span in spans:
        if stage_run_id is not None and span.stage_run_id == stage_run_id:
            return span
    moment = _utc(time)
    started = [s for s in spans if s.started_at is not None and moment is not None
               and _utc(s.started_at) <= moment]
    if started:
        return max(started, key=lambda s: _utc(s.started_at))
    return spans[0] if spans else None


def global_step(spans: Sequence[Span], stage_run_id: int | None, step: int | None,
                time: datetime | None = None) -> int:
    """Where a stage-local ``step`` stands on the global axis (its stage's start without one)."""
    span = stage_of(spans, stage_run_id, time)
    offset = span.start if span else 0
    return offset + (step or 0)


def short(text: str, limit: int = LABEL_CHARS) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1].rstrip() + "…"


def size(gib: float) -> str:
    return f"{gib:.2f} GiB" if gib >= 1 else f"{gib * 1024:.3g} MiB"


def plain(kind: str, message: str) -> str:
    """``message`` without a leading ``kind:`` that would repeat the marker's kind."""
    head, sep, rest = message.partition(":")
    return rest.strip() if sep and head.strip().lower() == kind else message


def markers(spans: Sequence[Span], events: Iterable[Any]) -> list[Marker]:
    """The faults, alerts, rewrites and recoveries among ``events`` at their global step."""
    found = [Marker(global_step(spans, e.stage_run_id, e.step, getattr(e, "time", None)), e.kind,
                    short(plain(e.kind, e.message)))
             for e in events if e.kind in MARKED]
    return sorted(found, key=lambda m: m.x)


# ---- gathering from the store ---------------------------------------------------------

def find_run(session: Session, ref: str) -> tuple[Run, Plan]:
    """A run by id (``12`` or ``run-00012``), or a plan's (name or id) newest run."""
    text = str(ref).strip()
    if text.removeprefix("run-").isdigit():
        try:
            run = runs.get_run(session, text)
            return run, session.get(Plan, run.plan_id)
        except NotFound:
            if text.startswith("run-"):
                raise
    plan = repo.find_plan(session, text) or (session.get(Plan, int(text)) if text.isdigit() else None)
    if plan is None:
        raise NotFound(f"no run or plan {text!r}; give a run id or a plan name (see: muse run list)")
    newest = runs.list_runs(session, plan, limit=1)
    if not newest:
        raise NotFound(f"plan {plan.name!r} has no runs yet; start one with: muse plan run {plan.name}")
    return newest[0][0], plan


START = re.compile(r"on (\d+) (GPU|CPU) process")


def _device(events: Sequence[Event]) -> tuple[str, int]:
    """The device kind and process count the run's start event names."""
    for e in events:
        found = START.search(e.message) if e.message.startswith("run started") else None
        if found:
            return found.group(2).lower(), int(found.group(1))
    return "unknown", 1


def predicted_gib(spec: Any, stage: Any, *, device: str, processes: int) -> tuple[float | None, str]:
    """The memory model's peak (GiB per process) for a stage as the executor ran it
    (``resolve`` → ``train_config``, as the optimizer prices it); or why not."""
    from muse_plan.executor.settings import resolve, train_config
    from muse_plan.optimizer import memory
    from muse_plan.plan.kinds import STAGE_KINDS

    if STAGE_KINDS[stage.kind].priced is not None:
        return None, f"not priced: {STAGE_KINDS[stage.kind].priced}"
    cuda = device == "gpu"
    try:
        cfg = train_config(resolve(spec, stage, world_size=processes, cuda=cuda, bf16=cuda, check=False))
    except (MuseError, ValueError) as exc:
        return None, f"not priced: {short(str(exc), 60)}"
    peak = memory.estimate(cfg, device="cuda" if cuda else "cpu")
    return (peak.total - peak.overhead) / GIB, ""


def _memory(session: Session, run: Run, plan: Plan, spans: list[Span], device: str,
            processes: int, measured: list[list[tuple[int, float]]]) -> list[MemoryRow]:
    try:
        spec = repo.spec_of(repo.get_revision(session, plan, run.under))  # what it finished with
    except MuseError:
        spec = None
    stages = {s.name: s for s in spec.stages} if spec else {}
    rows = []
    for span, points in zip(spans, measured):
        most = max((v for _, v in points), default=None)
        stage = stages.get(span.name)
        if stage is None:
            rows.append(MemoryRow(span.name, None, most, f"not priced: no stage {span.name!r} in the revision"))
            continue
        predicted, note = predicted_gib(spec, stage, device=device, processes=processes)
        rows.append(MemoryRow(span.name, predicted, most, note))
    return rows


def build(session: Session, ref: str) -> RunReport:
    """Everything the picture and the page show for run (or plan) ``ref``."""
    run, plan = find_run(session, ref)
    stage_runs = runs.stage_runs(session, run)
    raw = {name: [[(s, v) for s, v in runs.metric_series(session, run.id, name, sr.id) if math.isfinite(v)]
                  for sr in stage_runs] for name in SERIES}
    lengths = [max([sr.total_steps or 0, sr.step, *(s for series in raw.values() for s, _ in series[i])])
               for i, sr in enumerate(stage_runs)]
    status = runs.shown_status(run)
    spans = lay_out((sr.id, sr.name, n, runs.shown_stage_status(sr, status), sr.started_at)
                    for sr, n in zip(stage_runs, lengths))
    series = {name: [[(span.start + s, v) for s, v in points] for span, points in zip(spans, per_stage)]
              for name, per_stage in raw.items()}
    final = [{k: v for k, (_, v) in runs.last_metrics(session, sr.id).items()} for sr in stage_runs]
    events = runs.events(session, run.id, limit=100_000)
    rows = []
    for e in events:
        placed = e.stage_run_id is not None or e.step is not None  # not a whole-run note
        span = stage_of(spans, e.stage_run_id, e.time)
        rows.append(EventRow(global_step(spans, e.stage_run_id, e.step, e.time),
                             span.name if span and placed else "", e.step, e.kind, e.severity, e.message, e.time))
    device, processes = _device(events)
    story = [r for r in repo.list_revisions(session, plan) if r.number >= run.revision
             and (run.finished_at is None or _utc(r.created_at) <= _utc(run.finished_at))]
    return RunReport(
        plan=plan.name, run_id=run.id, revision=run.under, status=status, error=run.error,
        device=device, processes=processes, spans=spans, series=series, final=final,
        markers=markers(spans, events), events=rows,
        memory=_memory(session, run, plan, spans, device, processes, raw["memory_gib"]), revisions=story,
    )


# ---- writing -----------------------------------------------------------------------------

def output_paths(output: Path, run_id: int) -> tuple[Path, Path]:
    """(png, html) for ``--output``: a .png or .html file (the other beside it) or a folder."""
    suffix = output.suffix.lower()
    if suffix == ".png":
        return output, output.with_suffix(".html")
    if suffix in (".html", ".htm"):
        return output.with_suffix(".png"), output
    if suffix and not output.is_dir():
        raise ReportError(f"--output {output}: name a .png or .html file, or a folder")
    return output / f"run-{run_id}.png", output / f"run-{run_id}.html"


def write(report: RunReport, output: Path) -> tuple[Path, Path]:
    """Draw ``report`` and write the PNG and the HTML page; returns their paths."""
    png, page = output_paths(Path(output).expanduser(), report.run_id)
    from muse_plan.report import html, plot

    image = plot.render(report)
    try:
        png.parent.mkdir(parents=True, exist_ok=True)
        png.write_bytes(image)
        page.write_text(html.page(report, image), encoding="utf-8")
    except OSError as exc:
        raise ReportError(f"can't write the report to {output}: {exc.strerror or exc}; "
                          "name a file or folder you can write to") from None
    return png, page
