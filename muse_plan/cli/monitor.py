"""``muse monitor [RUN|PLAN]``: a live dashboard of a run (by default the newest),
read from the store while it trains."""

from __future__ import annotations

import math
import time
from typing import Annotated, Any, Optional

import typer

from muse_plan.cli.common import console, print_json, store
from muse_plan.errors import PlanError

MIN_INTERVAL_S = 0.2


def monitor(
    ctx: typer.Context,
    targets: Annotated[Optional[list[str]], typer.Argument(
        metavar="RUN|PLAN", help="A run id (12 or run-00012), or a plan id or name: that plan's newest run. "
                                   "Default: the newest run in the store. With --compare: two or more runs.")] = None,
    update_interval: Annotated[float, typer.Option(
        "--update-interval", help="Seconds between refreshes (at least 0.2).")] = 30.0,
    once: Annotated[bool, typer.Option("--once", help="Print one snapshot and exit.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print one snapshot as JSON for scripts.")] = False,
    alert_thresholds: Annotated[Optional[str], typer.Option(
        "--alert-thresholds", help='Rules to show, like "gradient_norm:10,memory_usage:90,loss_spike:3".')] = None,
    smooth: Annotated[float, typer.Option(
        "--smooth", help="Smooth the whole-stage curves with an exponential moving average, 0 (none) to 0.99, "
                         "as TensorBoard's slider.")] = 0.0,
    compare: Annotated[bool, typer.Option(
        "--compare", help="Overlay the whole-stage curves of the runs named (of one plan) on common axes, once.")] = False,
) -> None:
    """Watch a run: stages, progress, ETA, loss curves, utilisation, alerts and plan rewrites."""
    from muse_plan.monitor import dashboard

    thresholds = dashboard.parse_thresholds(alert_thresholds) if alert_thresholds is not None else {}
    if not (math.isfinite(update_interval) and update_interval >= MIN_INTERVAL_S):
        raise PlanError(f"--update-interval must be at least {MIN_INTERVAL_S} seconds, not {update_interval:g}")
    if not (math.isfinite(smooth) and 0.0 <= smooth < 1.0):
        raise PlanError(f"--smooth must be at least 0 and below 1, not {smooth:g}")
    targets = targets or []
    opened = store(ctx)
    if compare:
        if len(targets) < 2:
            raise PlanError("--compare takes two or more runs, like: muse monitor --compare 3 4")
        with opened.read() as session:
            chosen = [dashboard.resolve_run(session, t) for t in targets]
            data = dashboard.compare(session, chosen, smooth)
        print_json(_jsonable(data)) if as_json else console.print(dashboard.render_compare(data))
        return
    if len(targets) > 1:
        raise PlanError(f"one run or plan at a time ({' '.join(targets)}); to overlay runs: muse monitor --compare")
    target = targets[0] if targets else None
    if once or as_json:
        snap = _read(opened, target, thresholds, smooth)
        if as_json:
            print_json(_jsonable(snap))
        else:
            console.print(dashboard.render(snap))
        return
    _watch(opened, target, thresholds, update_interval, smooth)


def _read(opened: Any, ref: str | None, thresholds: dict[str, float], smooth: float = 0.0) -> dict[str, Any]:
    """One snapshot in two short read transactions, with the host sampled between them."""
    from muse_plan.monitor import dashboard

    with opened.read() as session:
        run = dashboard.resolve_run(session, ref)
    host = dashboard.host_sample(run)
    with opened.read() as session:
        return dashboard.snapshot(session, run, thresholds, host, smooth=smooth)


def _watch(opened: Any, ref: str | None, thresholds: dict[str, float], interval: float, smooth: float) -> None:
    from rich.live import Live
    from rich.text import Text

    from muse_plan.monitor import dashboard

    snap, interrupted = None, False
    try:
        with Live(console=console, auto_refresh=False, transient=False) as live:
            while True:
                try:
                    snap = _read(opened, ref, thresholds, smooth)
                except dashboard.NoRunYet as waiting:
                    live.update(Text(f"{waiting} — waiting for it (Ctrl-C to stop)"), refresh=True)
                else:
                    ref = str(snap["run"])  # follow this run, even if the plan starts another
                    live.update(dashboard.render(snap), refresh=True)
                    if snap["finished"]:
                        break
                time.sleep(interval)
    except KeyboardInterrupt:
        interrupted = True
    if not console.is_terminal:
        console.line()  # off a terminal, Live does not end its last line
    if interrupted:
        console.print("monitor stopped" + (f"; run {snap['run']} goes on" if snap and not snap["finished"] else "."))
    else:
        console.print(dashboard.closing_line(snap), highlight=False)


def _jsonable(value: Any) -> Any:
    """NaN and infinities as strings: strict JSON has no such numbers."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    return value
