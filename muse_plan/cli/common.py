"""What every command group shares: the store from ``--db``, consoles, JSON output."""

from __future__ import annotations

import json
import sys
from typing import TYPE_CHECKING, Annotated, Any, Optional

import typer
from rich.console import Console

if TYPE_CHECKING:
    from muse_plan.store.db import Store

console = Console()
err_console = Console(stderr=True)


def store(ctx: typer.Context) -> Store:
    """The store named by the root ``--db`` option (or MUSE_DB_URL, or the default)."""
    from muse_plan.store.db import Store

    root = ctx.find_root()
    root.ensure_object(dict)
    if "store" not in root.obj:
        opened = root.obj["store"] = Store(root.obj.get("db_url"))
        root.call_on_close(opened.close)
        if opened.read_only is not None:
            err_console.print(f"note: {opened.read_only} is read-only for this user; the store is open for "
                              "reading only", highlight=False, soft_wrap=True)
    return root.obj["store"]


def print_json(data: Any) -> None:
    """Plain JSON on stdout (no rich wrapping or colour), for scripts."""
    sys.stdout.write(json.dumps(data, indent=2, ensure_ascii=False, default=str) + "\n")


# several machines (``muse plan run``, ``muse run resume``): executor/launch.py
NumMachinesOpt = Annotated[int, typer.Option(
    "--num-machines", min=1, help="Machines in the run, as Accelerate's multi-node: the same command on each, "
                                  "with its own --machine-rank; --num-processes counts all machines' processes.")]
MachineRankOpt = Annotated[int, typer.Option(
    "--machine-rank", min=0, help="This machine's rank: 0 for the main machine, the one with the store.")]
MainIpOpt = Annotated[Optional[str], typer.Option(
    "--main-process-ip", help="The main machine's address, which every other machine reaches.")]
MainPortOpt = Annotated[int, typer.Option(
    "--main-process-port", min=1, max=65535, help="The main machine's port for the process group.")]
