"""``muse hardware``: what this machine has."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from muse_plan.cli.common import console, print_json


def hardware(
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")] = False,
) -> None:
    """Show this machine's GPUs (NVML, else torch.cuda), CPU cores and RAM."""
    from muse_plan.hardware.catalog import CATALOG
    from muse_plan.hardware.detect import detect

    host = detect()
    if as_json:
        print_json({**host.as_dict(), "compute_budget": host.compute_budget})
        return
    table = Table(title="This machine", show_header=True, header_style="bold")
    for column in ("device", "name", "memory", "cores", "bf16", "peak bf16 TFLOP/s"):
        table.add_column(column)
    for gpu in host.gpus:
        kind = CATALOG.get(gpu.kind or "")
        table.add_row(
            f"cuda:{gpu.index}", gpu.name, f"{gpu.memory_gib:.1f} GiB", "—",
            ("yes" if kind.bf16 else "no") if kind else "?",
            f"{kind.peak_tflops_bf16:g}" if kind and kind.bf16 else "—",
        )
    cores = f"{host.cores_logical} logical" + (f", {host.cores_physical} physical" if host.cores_physical else "")
    table.add_row("cpu", host.cpu_model, f"{host.ram_gib:.1f} GiB RAM", cores, "—", "—")
    console.print(table)
    if not host.gpus:
        console.print(f"No GPU found ({host.gpu_source}).")
    elif host.driver:
        console.print(f"NVIDIA driver {host.driver}.")
    console.print(f"As a plan's compute budget: [bold]{host.compute_budget}[/]")
