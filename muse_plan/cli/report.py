"""``muse report RUN --output PATH``: a run as a PNG and an HTML page.

matplotlib is imported inside the command (through ``muse_plan.report.plot``),
so registering it costs ``muse --help`` nothing."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from muse_plan.cli.common import console, store


def report(
    ctx: typer.Context,
    run: Annotated[str, typer.Argument(
        help="Run id (12 or run-00012), or a plan name or id for its newest run.")],
    output: Annotated[Path, typer.Option(
        "--output", "-o", help="A .png or .html file (the other is written beside it), "
                               "or a folder for run-N.png and run-N.html.")],
) -> None:
    """Draw a run as a PNG and an HTML page, its faults, alerts and rewrites marked.

    Loss, gradient norm, learning rate and tokens/s against steps (stages end to
    end), the predicted vs measured memory of each stage, and the run's events."""
    from muse_plan.report import build, write

    with store(ctx).read() as session:
        data = build(session, run)
    png, page = write(data, output)
    console.print(f"run {data.run_id} of plan [bold]{data.plan}[/]: wrote {png} and {page}", highlight=False)
