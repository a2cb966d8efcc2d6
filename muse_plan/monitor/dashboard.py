"""The dashboard of ``muse monitor``: a run read from the store, as plain data and as a picture.

Design decisions:
- Two pure steps. ``snapshot(session, run)`` reads the store once and
  returns plain data (numbers, strings, ISO times: what ``--json`` prints);
  ``render(snapshot)`` turns that into a rich renderable and reads nothing.
  The live view is a loop of short read transactions, so the dashboard sees
  a consistent run at each refresh and a training process writing the store
  is never held up (SQLite WAL: readers do not block the writer).
- Every metric is read by (run, name, stage) newest first, which the
  ``ix_metric_points_run_name_step`` index answers without scanning the run.
- ETA comes from the step rate at the latest flushes: the executor writes a
  batch of steps every ~2 s, each point stamped when its batch is written,
  so points are grouped into flushes (gaps over 50 ms) and the rate is
  steps over seconds between the last few flushes' newest steps.
- What the store can't say (utilisation of a run that records none, the
  size of the machine's memory) comes from ``host_sample`` — psutil and
  NVML on this machine — and only for a run on this host.
- Whole-stage curves (``whole``): each of WHOLE_METRICS over every step of
  the current stage, averaged into at most WHOLE_POINTS buckets of equal step
  width by the database (one grouped query a metric, however long the stage),
  drawn as a small chart whose axes are the stage's steps and the curve's own
  range; ``smooth`` (0 ≤ α < 1) applies TensorBoard's exponential moving
  average to the bucket means. The recent-window sparklines stay beside them.
  Their cost grows with the stage: 0.24 s of a 0.30 s snapshot at 100,000
  steps on this 2-core machine (SQLite), against a default refresh of 30 s.
  ``compare`` puts runs of one plan on common axes: the same stage, bucketed
  over the steps any of them reached, each metric on one value range.
- ``--alert-thresholds`` here is display only: ``parse_thresholds`` and
  ``RULES`` are a small stand-in, with the detectors' meanings
  (``monitor/detectors.py``), that the alert engine can replace.
"""

from __future__ import annotations

import math
import socket
import statistics
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any

from rich.console import Group
from rich.table import Table
from rich.text import Text
from sqlmodel import Session, col, func, select

from muse_plan.errors import NotFound, PlanError
from muse_plan.plan.units import clock
from muse_plan.store import repo, runs
from muse_plan.store.models import MetricPoint, Plan, Run

SPARK = "▁▂▃▄▅▆▇█"
SPARK_POINTS = 60
WHOLE_POINTS = 60    # buckets a whole-stage curve is averaged into
WHOLE_ROWS = 3       # text rows of a whole-stage chart
WHOLE_METRICS = (("loss", "loss"), ("val_loss", "val loss"), ("grad_norm", "grad norm"), ("lr", "lr"),
                 ("tokens_per_s", "tokens/s"))
ETA_FLUSHES = 10     # flushes the step rate is measured over
ETA_POINTS = 2000    # newest loss points searched for them
MAX_WINDOW = 20_000  # most loss points a rule reads (plateau:N reads 2N)
FLUSH_GAP_S = 0.05   # points closer than this were written in one batch
# an RL stage's own: its surrogate loss says little, its reward does; and what its rollouts cost
# (muse run show's stage line uses the same words)
RL_RATES = {"reward": "reward {:.3f}", "rollout_s": "rollout {:.2f} s a micro-batch"}
SHOWN = ("loss", "val_loss", "unigram_val_loss", "grad_norm", "lr", "tokens_per_s", "memory_gib", *RL_RATES)
UTILISATION = ("gpu_util", "cpu_percent", "ram_percent")
REWRITERS = ("recovery", "optimizer", "adapt")
FINISHED = ("completed", "failed", "interrupted")
SEVERITY_STYLE = {"error": "bold red", "warning": "yellow", "info": "dim"}
STATUS_STYLE = {"completed": "green", "running": "cyan", "failed": "red", "interrupted": "yellow",
                "pending": "dim"}


class NoRunYet(NotFound):
    """The plan exists but has no run: the live view waits for one."""


# ---- alert thresholds (display only) ---------------------------------------------------------

def _z_score(s: dict[str, list[float]], limit: float) -> float | None:
    *before, last = s["loss"][-51:] or [None]
    if last is None or len(before) < 20 or not math.isfinite(last):
        return None
    sd = statistics.pstdev(before)
    return (last - statistics.fmean(before)) / sd if sd > 0 else None


def _drop(s: dict[str, list[float]], limit: float) -> float | None:
    *before, last = s["tokens_per_s"][-21:] or [None]
    if last is None or len(before) < 20:
        return None
    median = statistics.median(before)
    return 100 * (1 - last / median) if median > 0 else None


def _improvement(s: dict[str, list[float]], limit: float) -> float | None:
    n = max(int(limit), 1)
    losses = s["loss"][-2 * n:]
    if len(losses) < 2 * n:
        return None
    before, after = statistics.fmean(losses[:n]), statistics.fmean(losses[n:])
    return 100 * (before - after) / abs(before) if before else None


def _last(name: str) -> Callable[[dict[str, list[float]], float], float | None]:
    return lambda s, limit: s[name][-1] if s[name] else None


# name -> (what the threshold means, the metric it flags, measure(series, limit), is it over?)
RULES: dict[str, tuple[str, str, Callable[..., float | None], Callable[[float, float], bool]]] = {
    "gradient_norm": ("gradient norm above", "grad_norm", _last("grad_norm"), lambda v, t: v > t),
    "loss": ("loss above", "loss", _last("loss"), lambda v, t: v > t),
    "loss_spike": ("loss z-score vs the last 50 steps above", "loss", _z_score, lambda v, t: v > t),
    "memory_usage": ("% of device memory above", "memory_gib", _last("memory_percent"), lambda v, t: v > t),
    "throughput_drop": ("% drop of tokens/s vs the last 20 steps' median above", "tokens_per_s", _drop,
                        lambda v, t: v > t),
    "plateau": ("loss improved under 1% over this many steps:", "loss", _improvement, lambda v, t: v < 1.0),
}


def parse_thresholds(text: str | None) -> dict[str, float]:
    """``"gradient_norm:10,memory_usage:90"`` → {"gradient_norm": 10.0, "memory_usage": 90.0}:
    the same rules, names and ranges as ``muse plan run --alert-thresholds``."""
    from muse_plan.monitor.alerts import parse_thresholds as parse

    try:
        return parse(text or "")
    except ValueError as exc:
        raise PlanError(f"--alert-thresholds: {exc}") from None


def _rules(thresholds: dict[str, float], series: dict[str, list[float]]) -> list[dict[str, Any]]:
    rows = []
    for name, limit in thresholds.items():
        meaning, metric, measure, over = RULES[name]
        value = measure(series, limit)
        rows.append({"rule": name, "meaning": meaning, "metric": metric, "threshold": limit, "value": value,
                     "over": value is not None and over(value, limit)})
    return rows


# ---- reading the store -----------------------------------------------------------------------

def resolve_run(session: Session, ref: str | None) -> Run:
    """A run by id (``12``, ``run-00012``), else the newest run of a plan (id or
    name); with no ``ref``, the newest run in the store."""
    if ref is None:
        newest = runs.list_runs(session, limit=1)
        if not newest:
            raise NoRunYet("no run yet; start one with: muse plan run PLAN")
        return newest[0][0]
    ref = str(ref).strip()
    number = ref.removeprefix("run-")
    if number.isdigit() and (ref.startswith("run-") or session.get(Run, int(number))):
        return runs.get_run(session, ref)
    if number.isdigit() and session.get(Plan, int(number)) is None:
        raise NotFound(f"no run or plan {ref!r}; `muse run list` shows the runs, `muse plan list` the plans")
    plan = repo.get_plan(session, ref)
    newest = runs.list_runs(session, plan, limit=1)
    if not newest:
        raise NoRunYet(f"plan {plan.name!r} has no run yet; start one with: muse plan run {plan.name}")
    return newest[0][0]


def _points(session: Session, run_id: int, stage_id: int | None, name: str, limit: int) -> list[MetricPoint]:
    query = select(MetricPoint).where(MetricPoint.run_id == run_id, MetricPoint.name == name)
    if stage_id is not None:
        query = query.where(MetricPoint.stage_run_id == stage_id)
    query = query.order_by(col(MetricPoint.step).desc(), col(MetricPoint.id).desc()).limit(limit)
    return list(reversed(session.exec(query).all()))


def _utc(moment: datetime) -> datetime:
    return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)


def step_rate(points: list[tuple[int, datetime]], flushes: int = ETA_FLUSHES) -> float | None:
    """Steps per second between the newest steps of the last ``flushes`` written batches."""
    frontier: list[tuple[int, datetime]] = []
    for step, moment in sorted(points, key=lambda p: _utc(p[1])):
        moment = _utc(moment)
        if frontier and (moment - frontier[-1][1]).total_seconds() < FLUSH_GAP_S:
            frontier[-1] = (max(step, frontier[-1][0]), moment)
        else:
            frontier.append((step, moment))
    frontier = frontier[-flushes:]
    if len(frontier) < 2:
        return None
    (s0, t0), (s1, t1) = frontier[0], frontier[-1]
    seconds = (t1 - t0).total_seconds()
    return (s1 - s0) / seconds if seconds > 0 and s1 > s0 else None


def host_sample(run: Run) -> dict[str, Any] | None:
    """This machine's memory sizes, and its utilisation while ``run`` is alive here (else None)."""
    if run.host != socket.gethostname():
        return None
    import psutil

    memory = psutil.virtual_memory()
    sample: dict[str, Any] = {"ram_total_gib": memory.total / 2**30, "gpu_total_gib": None}
    gpus = _nvml()
    if gpus:
        sample["gpu_total_gib"] = gpus[0][0]
    if runs.is_alive(run):
        sample["cpu_percent"] = psutil.cpu_percent(interval=0.1)
        sample["ram_percent"] = memory.percent
        sample["gpu_util"] = statistics.fmean(u for _, u in gpus) if gpus else None
    return sample


def _nvml() -> list[tuple[float, float]]:
    """(memory GiB, utilisation %) per GPU, or [] without NVML or GPUs."""
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:  # no driver library, no NVIDIA GPU: nothing to sample
        return []
    try:
        handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
        return [(pynvml.nvmlDeviceGetMemoryInfo(h).total / 2**30, float(pynvml.nvmlDeviceGetUtilizationRates(h).gpu))
                for h in handles]
    except Exception:
        return []
    finally:
        pynvml.nvmlShutdown()


def _device_gib(spec: Any, host: dict[str, Any] | None) -> float | None:
    """Memory of one device of the run: the plan's GPU, else this host's GPU or RAM."""
    compute, host = spec.compute, host or {}
    if compute is not None and compute.gpu is not None:
        return compute.memory_gib
    if compute is None and host.get("gpu_total_gib"):
        return host["gpu_total_gib"]
    return host.get("ram_total_gib")


def _iso(moment: datetime | None) -> str | None:
    return _utc(moment).isoformat() if moment else None


def snapshot(session: Session, run: Run, thresholds: dict[str, float] | None = None,
             host: dict[str, Any] | None = None, now: datetime | None = None, smooth: float = 0.0) -> dict[str, Any]:
    """Everything the dashboard shows of ``run``, read in ``session``, as plain data;
    ``smooth``: the whole-stage curves' exponential moving average (0: none)."""
    run = session.get(Run, run.id)  # as stored now, in this transaction
    plan = session.get(Plan, run.plan_id)
    status = runs.shown_status(run)
    device_gib = _device_gib(repo.spec_of(repo.get_revision(session, plan, run.under)), host)
    now = now or datetime.now(timezone.utc)
    stages = [_stage(session, run, s, status, device_gib, now) for s in runs.stage_runs(session, run)]
    current = next((s for s in stages if s["status"] == "running"), None) \
        or next((s for s in reversed(stages) if s["step"] > 0), None) or (stages[0] if stages else None)
    series, loss_points, last_point = _series(session, run, current, thresholds or {})
    rules = _rules(thresholds or {}, series)
    measured = {n: p[-1].value for n in UTILISATION if (p := _points(session, run.id, None, n, 1))}
    live = {n: (host or {}).get(n) for n in UTILISATION}
    utilisation = {n: measured.get(n, live[n]) for n in UTILISATION}
    utilisation["source"] = "run metrics" if measured else ("this host" if any(
        v is not None for v in live.values()) else None)
    revisions = [r for r in repo.list_revisions(session, plan) if r.author in REWRITERS][-4:]
    return {
        "run": run.id, "plan": plan.name, "plan_id": plan.id, "revision": run.under,
        "started_under": run.revision, "status": status,
        "finished": status in FINISHED, "error": run.error, "host": run.host,
        "started_at": _iso(run.started_at), "finished_at": _iso(run.finished_at),
        "taken_at": _iso(now), "last_metric_at": _iso(last_point),
        "device_memory_gib": device_gib,
        "stages": stages,
        "current_stage": current["name"] if current else None,
        "loss_points": loss_points,
        "series": {"loss": series["loss"][-SPARK_POINTS:], "grad_norm": series["grad_norm"][-SPARK_POINTS:]},
        "series_steps": series["steps"][-SPARK_POINTS:],
        "whole": _whole(session, run.id, current["stage_run_id"], smooth) if current else {},
        "smooth": smooth,
        "utilisation": utilisation,
        "rules": rules,
        "alerts": [{**r, "stage": current["name"] if current else None} for r in rules if r["over"]],
        "events": [{"time": _iso(e.time), "kind": e.kind, "severity": e.severity, "step": e.step,
                    "message": e.message} for e in runs.events(session, run.id, limit=8)],
        "rewrites": [{"revision": r.number, "author": r.author, "reason": r.reason, "time": _iso(r.created_at)}
                     for r in revisions],
    }


def _stage(session: Session, run: Run, stage: Any, run_status: str, device_gib: float | None,
           now: datetime) -> dict[str, Any]:
    metrics = {n: p[-1].value for n in SHOWN if (p := _points(session, run.id, stage.id, n, 1))}
    if "memory_gib" in metrics and device_gib:
        metrics["memory_percent"] = 100 * metrics["memory_gib"] / device_gib
    status = runs.shown_stage_status(stage, run_status)
    eta = rate = None
    if status == "running" and stage.total_steps:
        timed = [(p.step, p.time) for p in _points(session, run.id, stage.id, "loss", ETA_POINTS)]
        rate = step_rate(timed)
        if rate is None and stage.step and stage.started_at:  # one flush so far: the stage's mean rate
            elapsed = (now - _utc(stage.started_at)).total_seconds()
            rate = stage.step / elapsed if elapsed > 0 else None
        eta = max(stage.total_steps - stage.step, 0) / rate if rate else None
    total = stage.total_steps
    return {"name": stage.name, "stage_run_id": stage.id, "status": status, "step": stage.step, "total_steps": total,
            "progress": min(stage.step / total, 1.0) if total else None,
            "steps_per_s": rate, "eta_s": 0.0 if status == "completed" else eta, "metrics": metrics}


def _series(session: Session, run: Run, current: dict[str, Any] | None,
            thresholds: dict[str, float]) -> tuple[dict[str, list[Any]], int, datetime | None]:
    """The current stage's recent curves, its number of loss points and when the newest was written."""
    series: dict[str, list[Any]] = {"loss": [], "grad_norm": [], "tokens_per_s": [], "memory_percent": [],
                                     "steps": []}
    if current is None:
        return series, 0, None
    stage_id = current["stage_run_id"]
    window = min(max(SPARK_POINTS, 51, 2 * int(thresholds.get("plateau", 0))), MAX_WINDOW)
    loss = _points(session, run.id, stage_id, "loss", window)
    series["loss"], series["steps"] = [p.value for p in loss], [p.step for p in loss]
    series["grad_norm"] = [p.value for p in _points(session, run.id, stage_id, "grad_norm", SPARK_POINTS)]
    series["tokens_per_s"] = [p.value for p in _points(session, run.id, stage_id, "tokens_per_s", 21)]
    if "memory_percent" in current["metrics"]:
        series["memory_percent"] = [current["metrics"]["memory_percent"]]
    count = session.exec(select(func.count()).select_from(MetricPoint).where(
        MetricPoint.run_id == run.id, MetricPoint.name == "loss", MetricPoint.stage_run_id == stage_id)).one()
    return series, count, loss[-1].time if loss else None


def bucketed(session: Session, run_id: int, stage_id: int, name: str, span: tuple[int, int],
             points: int = WHOLE_POINTS) -> list[float | None]:
    """``name`` over the steps ``span`` (first, last) of a stage as at most ``points`` bucket
    means of equal step width, bucketed by the database; None where a bucket holds no point
    (a validation loss measured every few hundred steps)."""
    first, last = span
    width = max(1, -(-(last - first + 1) // points))  # steps a bucket spans
    bucket = (MetricPoint.step - first) // width  # an integer division in SQLite and PostgreSQL alike
    rows = session.exec(select(bucket, func.avg(MetricPoint.value)).where(
        MetricPoint.run_id == run_id, MetricPoint.name == name, MetricPoint.stage_run_id == stage_id,
        MetricPoint.step >= first, MetricPoint.step <= last).group_by(bucket)).all()
    out: list[float | None] = [None] * ((last - first) // width + 1)
    for index, value in rows:
        out[int(index)] = float(value)
    return out


def ema(values: list[float | None], alpha: float) -> list[float | None]:
    """TensorBoard's smoothing: each point α of the running average and 1 − α of itself
    (empty buckets stay empty)."""
    out: list[float | None] = []
    last: float | None = None
    for v in values:
        if v is not None:
            last = v if last is None or not math.isfinite(last) else alpha * last + (1 - alpha) * v
        out.append(None if v is None else last)
    return out


def _span(session: Session, run_id: int, stage_id: int) -> tuple[int | None, int | None]:
    """A stage's first and last step with a point of the whole-stage curves; (None, None) before
    its first loss. One indexed min/max a metric."""
    spans = {name: session.exec(select(func.min(MetricPoint.step), func.max(MetricPoint.step)).where(
        MetricPoint.run_id == run_id, MetricPoint.name == name, MetricPoint.stage_run_id == stage_id)).one()
        for name, _ in WHOLE_METRICS}
    if spans["loss"][0] is None:
        return None, None
    found = [span for span in spans.values() if span[0] is not None]
    return min(a for a, _ in found), max(b for _, b in found)


def _whole(session: Session, run_id: int, stage_id: int, smooth: float) -> dict[str, Any]:
    """The stage's curves on one step axis: its first to last step with a point (step 0 where the
    stage scored its starting weights, ``eval_at_start``)."""
    first, last = _span(session, run_id, stage_id)
    if first is None:
        return {}
    curves: dict[str, Any] = {"steps": [first, last]}
    for name, _ in WHOLE_METRICS:
        values = bucketed(session, run_id, stage_id, name, (first, last))
        if any(v is not None for v in values):
            curves[name] = ema(values, smooth) if smooth else values
    return curves


def compare(session: Session, chosen: list[Run], smooth: float = 0.0) -> dict[str, Any]:
    """Runs of one plan on common axes: the same-named stage of each (the first run's
    current one), every WHOLE_METRICS curve bucketed over the steps any of them reached."""
    plans = {r.plan_id for r in chosen}
    if len(plans) > 1:
        names = ", ".join(f"run {r.id}: {session.get(Plan, r.plan_id).name}" for r in chosen)
        raise PlanError(f"--compare overlays runs of one plan; these are of several ({names})")
    first = snapshot(session, chosen[0])
    stage = first["current_stage"]
    if stage is None:
        raise PlanError(f"run {chosen[0].id} has no stage with steps to compare")
    ids: dict[int, int] = {}
    for r in chosen:
        found = [s for s in runs.stage_runs(session, r) if s.name == stage]
        if found:
            ids[r.id] = found[0].id
    spans = [_span(session, run_id, stage_id) for run_id, stage_id in ids.items()]
    reached = [span for span in spans if span[0] is not None]
    if not reached:
        raise PlanError(f"none of these runs has a loss in stage {stage!r} yet")
    span = (min(a for a, _ in reached), max(b for _, b in reached))
    curves: dict[str, dict[int, list[float | None]]] = {}
    for name, _ in WHOLE_METRICS:
        for run_id, stage_id in ids.items():
            values = bucketed(session, run_id, stage_id, name, span)
            if any(v is not None for v in values):
                curves.setdefault(name, {})[run_id] = ema(values, smooth) if smooth else values
    return {"plan": first["plan"], "stage": stage, "steps": list(span), "smooth": smooth,
            "runs": [{"run": r.id, "revision": r.under, "status": runs.shown_status(r)} for r in chosen],
            "curves": curves}


# ---- rendering (pure) ------------------------------------------------------------------------

def sparkline(values: list[float], width: int = SPARK_POINTS) -> str:
    """The last ``width`` values as ▁..█ between their min and max; × marks a non-finite value."""
    values = values[-width:]
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return "×" * len(values)
    low, high = min(finite), max(finite)
    span = high - low
    return "".join("×" if not math.isfinite(v) else SPARK[3 if span == 0 else
                   min(int((v - low) / span * len(SPARK)), len(SPARK) - 1)] for v in values)


def chart(values: list[float | None], rows: int = WHOLE_ROWS) -> list[str]:
    """``values`` as ``rows`` lines of ▁..█ blocks, the lowest value at the bottom edge and the
    highest filling the top row; × marks a non-finite value (on the bottom line), a blank None."""
    finite = [v for v in values if v is not None and math.isfinite(v)]
    low, high = (min(finite), max(finite)) if finite else (0.0, 0.0)
    levels = rows * len(SPARK)
    heights = [0 if v is None else -1 if not math.isfinite(v) else
               (levels // 2 if high == low else 1 + round((v - low) / (high - low) * (levels - 1))) for v in values]
    lines = []
    for row in range(rows - 1, -1, -1):  # top line first
        floor = row * len(SPARK)
        lines.append("".join("×" if h < 0 and row == 0 else " " if h <= floor else
                             "█" if h >= floor + len(SPARK) else SPARK[h - floor - 1] for h in heights))
    return lines


def _number(name: str, value: float | None) -> str:
    if value is None:
        return "—"
    if not math.isfinite(value):
        return str(value)
    if name == "lr":
        return f"{value:.2e}"
    if name == "tokens_per_s":
        return f"{value:,.0f}"
    if name == "memory_gib":
        return f"{value:.2f} GiB"
    return f"{value:.4g}"


def _bar(progress: float | None, width: int = 12) -> Text:
    if progress is None:
        return Text("—")
    done = int(round(progress * width))
    return Text.assemble(("━" * done, "green" if progress >= 1 else "cyan"), ("━" * (width - done), "grey35"),
                         f" {progress:4.0%}")


def _time(iso: str, form: str = "%H:%M:%S") -> str:
    return datetime.fromisoformat(iso).astimezone().strftime(form)


def _header(snap: dict[str, Any]) -> Text:
    status = snap["status"]
    started = snap.get("started_under", snap["revision"])
    revision = f"{snap['revision']}" + (f" (started under {started})" if started != snap["revision"] else "")
    head = Text.assemble((f"run {snap['run']}", "bold"), f" · plan {snap['plan']} · revision {revision} · ",
                         (status, STATUS_STYLE.get(status, "")))
    taken = datetime.fromisoformat(snap["taken_at"])
    head.append(f"   as of {_time(snap['taken_at'])}", style="dim")
    if snap["last_metric_at"] and not snap["finished"]:
        ago = (taken - datetime.fromisoformat(snap["last_metric_at"])).total_seconds()
        ago = max(int(ago), 0)
        head.append(f", last metrics {ago} s ago" if ago < 60 else f", last metrics {clock(ago)} ago",
                    style="dim")
    return head


def _stage_table(snap: dict[str, Any], flagged: set[str]) -> Table:
    table = Table(header_style="bold underline", box=None, padding=(0, 1), pad_edge=False)
    for column in ("stage", "status", "step", "progress", "ETA", "loss", "val loss"):
        table.add_column(column, no_wrap=True, justify="right" if column in ("step", "ETA") else "left")
    for s in snap["stages"]:
        m, current = s["metrics"], s["name"] == snap["current_stage"]
        table.add_row(Text(s["name"], style="bold" if current else ""),
                      Text(s["status"], style=STATUS_STYLE.get(s["status"], "")),
                      f"{s['step']}/{s['total_steps'] or '?'}", _bar(s["progress"]),
                      "done" if s["status"] == "completed" else clock(s["eta_s"]),
                      Text(_number("loss", m.get("loss")), style="bold red" if current and "loss" in flagged else ""),
                      _number("val_loss", m.get("val_loss")))
    return table


def _rates(snap: dict[str, Any], flagged: set[str]) -> list[Text]:
    """One line per stage with metrics: learning rate, throughput, memory (flagged ones red)."""
    lines = []
    for s in snap["stages"]:
        m, current = s["metrics"], s["name"] == snap["current_stage"]
        if not m:
            continue
        line = Text(f"{s['name']}: ", style="dim")
        for i, (name, form) in enumerate((("lr", "lr {}"), ("tokens_per_s", "{} tok/s"), ("memory_gib", "memory {}"))):
            text = form.format(_number(name, m.get(name)))
            if name == "memory_gib" and "memory_percent" in m:
                text += f" ({m['memory_percent']:.0f}%)"
            line.append(" · " if i else "", style="dim")
            line.append(text, style="bold red" if current and name in flagged else "dim")
        for name, form in RL_RATES.items():
            if name in m:
                line.append(" · " + form.format(m[name]), style="dim")
        lines.append(line)
    return lines


def _curves(snap: dict[str, Any], flagged: set[str]) -> Group:
    grid = Table.grid(padding=(0, 2))
    for _ in range(3):
        grid.add_column(no_wrap=True)
    steps, ranges = snap["series_steps"], []
    for name, label in (("loss", "loss"), ("grad_norm", "grad norm")):
        values = snap["series"][name]
        finite = [v for v in values if math.isfinite(v)]
        if finite:
            ranges.append(f"{label} {min(finite):.3g} to {max(finite):.3g}")
        grid.add_row(Text(label, style="bold"), Text(sparkline(values) or "—", style="cyan"),
                     Text(_number(name, values[-1]) if values else "—", style="bold red" if name in flagged else ""))
    span = f"steps {steps[0]}–{steps[-1]} of {snap['current_stage']}: " + ", ".join(ranges) if steps else "no steps yet"
    return Group(grid, Text(" " * 11 + span, style="dim"))  # under the sparklines


def _whole_curves(snap: dict[str, Any]) -> list[Any]:
    """Each whole-stage curve: its chart between its range's ends, the stage's steps beneath."""
    whole = snap.get("whole") or {}
    if not whole:
        return []
    grid = Table.grid(padding=(0, 1))
    grid.add_column(no_wrap=True, min_width=9)
    grid.add_column(no_wrap=True, justify="right", min_width=8)
    grid.add_column(no_wrap=True)
    for name, label in WHOLE_METRICS:
        if name not in whole:
            continue
        values = whole[name]
        finite = [v for v in values if v is not None and math.isfinite(v)]
        top, bottom = (_number(name, max(finite)), _number(name, min(finite))) if finite else ("—", "—")
        lines = chart(values)
        for i, line in enumerate(lines):
            edge = top if i == 0 else bottom if i == len(lines) - 1 else ""
            grid.add_row(Text(label if i == 0 else "", style="bold"), Text(edge, style="dim"),
                         Text(line, style="cyan"))
    steps = whole["steps"]
    smooth = f", smoothed α {snap['smooth']:g}" if snap.get("smooth") else ""
    title = Text.assemble(("whole stage ", "bold"), (f"{snap['current_stage']}: steps {steps[0]}–{steps[-1]}, "
                                                     f"bucket means{smooth}", "dim"))
    return [title, grid]


def render_compare(data: dict[str, Any]) -> Group:
    """``compare``'s runs, each metric's curves stacked on one step axis and one value range."""
    smooth = f", smoothed α {data['smooth']:g}" if data["smooth"] else ""
    first, last = data["steps"]
    parts: list[Any] = [Text.assemble(("compare ", "bold"), f"plan {data['plan']} · stage {data['stage']} · ",
                                      (f"steps {first}–{last}, bucket means{smooth}", "dim"))]
    parts.append(Text("  ".join(f"run {r['run']} (r{r['revision']}, {r['status']})" for r in data["runs"]),
                      style="dim"))
    grid = Table.grid(padding=(0, 1))
    grid.add_column(no_wrap=True, min_width=9)
    grid.add_column(no_wrap=True, min_width=7)
    grid.add_column(no_wrap=True, justify="right", min_width=8)
    grid.add_column(no_wrap=True)
    for name, label in WHOLE_METRICS:
        per_run = data["curves"].get(name, {})
        finite = [v for values in per_run.values() for v in values if v is not None and math.isfinite(v)]
        if not finite:
            continue
        low, high = min(finite), max(finite)
        for i, (run_id, values) in enumerate(per_run.items()):
            # each run's chart on the common range: the range's ends pinned as invisible extra columns
            top, bottom = chart([low, *values, high], rows=2)
            grid.add_row(Text(label if i == 0 else "", style="bold"), Text(f"run {run_id}"),
                         Text(_number(name, high) if i == 0 else _number(name, low) if i == len(per_run) - 1
                              else "", style="dim"), Text(top[1:-1] + "\n" + bottom[1:-1], style="cyan"))
    return Group(*parts, grid)


def _utilisation(snap: dict[str, Any]) -> Text:
    u = snap["utilisation"]
    text = Text.assemble(("utilisation ", "bold"))
    for name, label in (("gpu_util", "GPU"), ("cpu_percent", "CPU"), ("ram_percent", "RAM")):
        text.append(f" {label} " + (f"{u[name]:.0f}%" if u.get(name) is not None else "—") + " ")
    if u.get("source"):
        text.append(f"({u['source']})", style="dim")
    return text


def _rules_text(snap: dict[str, Any]) -> Text:
    text = Text.assemble(("alert rules ", "bold"))
    for i, r in enumerate(snap["rules"]):
        unit = "%" if r["rule"] in ("memory_usage", "throughput_drop", "plateau") else ""
        value = "—" if r["value"] is None else f"{r['value']:.3g}{unit}"
        text.append(" · " if i else " ")
        text.append(f"{r['rule']} {r['threshold']:g}: {value}")
        if r["value"] is not None:
            text.append(" OVER" if r["over"] else " ok", style="bold red" if r["over"] else "green")
    return text


def _log(title: str, rows: list[tuple[str, ...]], styles: list[str]) -> list[Any]:
    if not rows:
        return []
    table = Table(box=None, show_header=False, padding=(0, 1), pad_edge=False)
    for _ in rows[0][:-1]:
        table.add_column(no_wrap=True)
    table.add_column(overflow="fold")
    for row, style in zip(rows, styles):
        table.add_row(*(Text(cell) for cell in row), style=style)  # Text: a message's [brackets] are not markup
    return [Text(title, style="bold"), table]


def render(snap: dict[str, Any]) -> Group:
    """The dashboard of one snapshot; reads nothing but ``snap``."""
    flagged = {r["metric"] for r in snap["alerts"]}
    parts: list[Any] = [_header(snap)]
    if snap["error"]:
        parts.append(Text(f"stopped by: {snap['error']}", style="red"))
    parts += [Text(""), _stage_table(snap, flagged), *_rates(snap, flagged), Text(""), _curves(snap, flagged),
              *_whole_curves(snap), _utilisation(snap)]
    if snap["rules"]:
        parts.append(_rules_text(snap))
    events = snap["events"]
    parts += _log("events", [(_time(e["time"]), e["severity"],
                              e["message"] if e["kind"] == "info" else f"[{e['kind']}] {e['message']}")
                             for e in events],
                  [SEVERITY_STYLE.get(e["severity"], "") for e in events])
    parts += _log("plan rewrites", [(f"r{r['revision']}", r["author"], _time(r["time"], "%m-%d %H:%M"), r["reason"])
                                    for r in snap["rewrites"]], ["" for _ in snap["rewrites"]])
    return Group(*parts)


def closing_line(snap: dict[str, Any]) -> str:
    """What the live view prints when it stops on a finished run."""
    tail = f": {snap['error']}" if snap["error"] else ""
    return f"run {snap['run']} {snap['status']}{tail}; monitor stopped."
