"""Several processes and several machines through ``accelerate launch`` (``executor/launch.py``).

On this CPU-only host a "machine" is one ``muse plan run`` command with its ``--machine-rank``; the two
commands meet over gloo at the main machine's address, exactly as two hosts of a cluster would, and
share the run's folder as a cluster's shared disk would."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from muse_plan.errors import PlanError
from muse_plan.executor.launch import Machines, command
from muse_plan.store import runs
from muse_plan.store.db import Store

PLAN = Path(__file__).resolve().parent.parent / "plans" / "quickstart-cpu.yaml"
SMALL = ["--set", "stages.pretrain.steps=8", "--set", "stages.pretrain.eval_every=8",
         "--set", "stages.pretrain.checkpoint_every=8", "--set", "training.warmup_steps=2",
         "--set", "training.micro_batch=8", "--set", "training.grad_accum=2"]  # global batch 16 kept


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _losses(run_id: int) -> list[float]:
    with Store().read() as session:
        stage = runs.stage_runs(session, runs.get_run(session, run_id))[0]
        return [v for _, v in runs.metric_series(session, run_id, "loss", stage.id)]


@pytest.mark.parametrize("flags, error", [
    (Machines(2), "--num-machines 2 needs --main-process-ip"),
    (Machines(2, 2, "10.0.0.1"), "--machine-rank 2 must be below --num-machines 2"),
    (Machines(1, 1), "--machine-rank and --main-process-ip are for several machines"),
    (Machines(2, 0, "10.0.0.1"), "--num-processes 3 counts the processes of all 2 machines"),
])
def test_machine_flags_that_cant_make_one_run_are_one_line(flags, error) -> None:
    with pytest.raises(PlanError, match=error):
        flags.check(3 if flags.main_ip and not flags.rank else 2)


def test_the_launch_command_is_accelerates_multi_node_one() -> None:
    cmd = command(8, ["plan", "run", "p"], Machines(2, 1, "10.0.0.1", 29611))
    at = cmd.index("--num_processes")
    assert cmd[at:at + 10] == ["--num_processes", "8", "--num_machines", "2", "--machine_rank", "1",
                               "--main_process_ip", "10.0.0.1", "--main_process_port", "29611"]
    assert cmd[-5:] == ["-m", "muse_plan", "plan", "run", "p"]


def test_two_machines_of_one_process_train_one_model_as_one_process_does(cli, muse_home) -> None:
    """2 "machines" × 1 process on this host through ``muse plan run``'s own launch path: both commands
    exit 0, the main machine's reports the run on 2 processes, the other's reports nothing, and the
    loss curve is the one-process curve at the same global batch (micro-batch 8 × 2 processes against
    8 × 2 accumulation steps)."""
    assert cli("plan", "import", PLAN).exit_code == 0
    assert cli("plan", "edit", "quickstart-cpu", *SMALL).exit_code == 0
    one = cli("plan", "run", "quickstart-cpu")
    assert one.exit_code == 0, one.output
    port, env = str(_free_port()), {**os.environ, "OMP_NUM_THREADS": "1"}

    def machine(rank: int) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "muse_plan", "plan", "run", "quickstart-cpu",
                                 "--num-processes", "2", "--num-machines", "2", "--machine-rank", str(rank),
                                 "--main-process-ip", "127.0.0.1", "--main-process-port", port],
                                env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    other, main = machine(1), machine(0)
    main_out, other_out = main.communicate(timeout=240)[0], other.communicate(timeout=60)[0]
    assert (main.returncode, other.returncode) == (0, 0), main_out + other_out
    assert "run 2 of plan quickstart-cpu (revision 2) finished on 2 processes" in main_out
    assert "finished" not in other_out and "no GPU on this machine: 1 process on the CPU" in other_out
    with Store().read() as session:
        run = runs.get_run(session, 2)
        assert run.status == "completed"
        assert runs.events(session, 2, limit=100)[0].message == "run started under revision 2 on 2 CPU process(es)"
    alone, together = _losses(1), _losses(2)
    assert len(alone) == len(together) == 8
    assert max(abs(a - b) for a, b in zip(alone, together)) < 1e-4, (alone, together)


def test_a_plan_the_processes_cant_split_is_refused_before_any_worker_starts(cli, muse_home) -> None:
    assert cli("plan", "import", PLAN).exit_code == 0  # global batch 16 = micro-batch 16 × 1
    result = cli("plan", "run", "quickstart-cpu", "--num-processes", "2")
    assert result.exit_code == 2
    assert "global_batch 16 is not a multiple of micro_batch 16 × 2 processes" in result.output
    with Store().read() as session:
        assert runs.list_runs(session) == []  # nothing started, nothing stored
