"""Several processes: ``muse plan run PLAN --num-processes N`` re-launches itself
through ``accelerate launch`` (never a home-made launcher), so a run started
either way goes down the same code path. No torch import here.

Design decisions:
- Several machines as Accelerate does it: the same command on each machine,
  with ``--num-machines M --machine-rank R --main-process-ip IP``.
  ``--num-processes`` counts the processes of all machines, as Accelerate's
  ``--num_processes`` does, so each machine runs N / M of them.
- Only the main process (rank 0 of machine 0) opens the store; it broadcasts
  the run to the others (``executor/runner.py``). The other machines need
  neither the plan nor a store, but every process reads the stages'
  checkpoints from the run's folder, which the main process writes: the
  runs folder (``$MUSE_HOME/runs``) must be one filesystem every machine sees
  at the same path, as on a cluster's shared disk.
- A machine without a GPU runs its processes on the CPU over gloo: slower
  than one process, it checks the distributed path (DDP, growth, multi-node)
  on a laptop or in CI.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass

from muse_plan.errors import PlanError

DEFAULT_PORT = 29500  # Accelerate's and torchrun's


@dataclass(frozen=True)
class Machines:
    """Where the processes of one run live: ``count`` machines, this one's ``rank``, and the main
    machine's address and port, which every other machine reaches."""

    count: int = 1
    rank: int = 0
    main_ip: str | None = None
    port: int = DEFAULT_PORT

    def check(self, num_processes: int) -> None:
        """Refuse flags that can't make one run, in one line each."""
        if self.count == 1:
            if self.rank or self.main_ip:
                raise PlanError("--machine-rank and --main-process-ip are for several machines: "
                                "add --num-machines (2 or more)")
            return
        if not self.main_ip:
            raise PlanError(f"--num-machines {self.count} needs --main-process-ip: the address of the machine "
                            "with --machine-rank 0, which the others reach")
        if self.rank >= self.count:
            raise PlanError(f"--machine-rank {self.rank} must be below --num-machines {self.count} "
                            f"(0 for the main machine, up to {self.count - 1})")
        if num_processes % self.count:
            raise PlanError(f"--num-processes {num_processes} counts the processes of all {self.count} machines: "
                            f"give a multiple of {self.count} (processes a machine × {self.count})")

    def args(self) -> list[str]:
        extra = ["--machine_rank", str(self.rank), "--main_process_ip", str(self.main_ip),
                 "--main_process_port", str(self.port)] if self.count > 1 else []
        return ["--num_machines", str(self.count), *extra]


def launched() -> bool:
    """Whether this process is one of several started by a launcher."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 or "ACCELERATE_PROCESS_INDEX" in os.environ


def gpu_count() -> int:
    from muse_plan.hardware.detect import detect

    return len(detect().gpus)


def command(num_processes: int, muse_args: list[str], machines: Machines = Machines()) -> list[str]:
    """The ``accelerate launch`` command that runs ``muse <muse_args>`` as this machine's part of
    ``num_processes`` processes (all machines')."""
    return [
        sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(num_processes),
        *machines.args(), "--multi_gpu", "--mixed_precision", "no", "--dynamo_backend", "no",
        "-m", "muse_plan", *muse_args,
    ]


def local_processes(num_processes: int, machines: Machines = Machines()) -> tuple[int, int]:
    """This machine's processes and its GPUs (0: the processes run on the CPU, over gloo)."""
    machines.check(num_processes)
    local, gpus = num_processes // machines.count, gpu_count()
    if gpus and local > gpus:
        where = f" ({local} a machine)" if machines.count > 1 else ""
        raise PlanError(f"--num-processes {num_processes}{where} needs as many GPUs; this machine has {gpus}")
    return local, gpus


def relaunch(num_processes: int, muse_args: list[str], env: dict[str, str] | None,
             machines: Machines, gpus: int) -> int:
    """Run ``muse <muse_args>`` as this machine's part of ``num_processes`` processes (``env`` added
    to the workers' environment, e.g. MUSE_INJECT; ``gpus``: ``local_processes``'s count, 0 for the
    CPU); returns its exit code."""
    extra = {} if gpus else {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}  # CPU: no oversubscribing
    return subprocess.call(command(num_processes, muse_args, machines), env={**os.environ, **extra, **(env or {})})
