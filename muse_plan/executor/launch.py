"""Several processes: ``muse plan run PLAN --num-processes N`` re-launches itself
through ``accelerate launch`` (never a home-made launcher), so a run started
either way goes down the same code path. No torch import here."""

from __future__ import annotations

import os
import subprocess
import sys

from muse_plan.errors import PlanError


def launched() -> bool:
    """Whether this process is one of several started by a launcher."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 or "ACCELERATE_PROCESS_INDEX" in os.environ


def gpu_count() -> int:
    from muse_plan.hardware.detect import detect

    return len(detect().gpus)


def command(num_processes: int, muse_args: list[str]) -> list[str]:
    """The ``accelerate launch`` command that runs ``muse <muse_args>`` on N GPUs."""
    return [
        sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(num_processes),
        "--num_machines", "1", "--multi_gpu", "--mixed_precision", "no", "--dynamo_backend", "no",
        "-m", "muse_plan", *muse_args,
    ]


def relaunch(num_processes: int, muse_args: list[str], env: dict[str, str] | None = None) -> int:
    """Run ``muse <muse_args>`` on ``num_processes`` GPUs (``env`` added to the
    workers' environment, e.g. MUSE_INJECT); returns its exit code."""
    gpus = gpu_count()
    if num_processes > gpus:
        raise PlanError(f"--num-processes {num_processes} needs as many GPUs; this machine has {gpus}")
    return subprocess.call(command(num_processes, muse_args), env={**os.environ, **(env or {})})
