"""The root ``muse`` app: global options, the command groups, the one error handler."""

from __future__ import annotations

from typing import Annotated, Optional

import typer
from typer.core import TyperGroup

from muse_plan import __version__
from muse_plan.errors import MuseError


class MuseGroup(TyperGroup):
    """Translates every ``MuseError`` into ``error: <message>`` and its exit code (2:
    the user's to fix)."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except MuseError as exc:
            typer.echo(f"{exc.prefix}{exc}", err=True)
            raise typer.Exit(exc.exit_code) from None


app = typer.Typer(
    cls=MuseGroup,
    name="muse",
    help="Plan mode for LLM training runs: plan, fit, run, watch, repair.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    add_completion=False,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"muse {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    ctx: typer.Context,
    db: Annotated[Optional[str], typer.Option(
        "--db", envvar="MUSE_DB_URL", show_envvar=True,
        help="SQLAlchemy database URL [default: sqlite:///$MUSE_HOME/muse.db]")] = None,
    version: Annotated[bool, typer.Option(
        "--version", callback=_version, is_eager=True, help="Print the version and exit.")] = False,
) -> None:
    ctx.ensure_object(dict)
    ctx.obj["db_url"] = db


def _register() -> None:
    from muse_plan.cli import hardware, monitor, plan, report, run

    app.add_typer(plan.app, name="plan")
    app.add_typer(run.app, name="run")
    app.add_typer(run.app, name="runs", hidden=True)  # `muse runs export ...`, as the plural reads too
    app.command("hardware")(hardware.hardware)
    app.command("monitor")(monitor.monitor)
    app.command("report")(report.report)
    from muse_plan.cli import generate
    app.command("generate")(generate.generate)
    app.command("eval")(generate.eval_)
    from muse_plan.cli.export import export
    app.command("export")(export)
    from muse_plan.cli import data
    app.add_typer(data.app, name="data")


_register()


def run() -> None:
    app()
