"""The README followed top to bottom, as a new user on a fresh clone would: every
command of its fenced ``sh`` blocks, in document order, in one MUSE_HOME, each
expected to exit 0 (130 for the run the README says to stop with Ctrl-C).

Run in a scratch folder holding a copy of ``plans/`` (the README's commands write
``my-plan.yaml`` and ``report/`` where they run, never into the repo). On a tiny
budget: every CPU plan a command creates is shrunk right away with ``muse plan
edit --set`` (a 1-layer, 32-wide decoder at context 32; its steps, checkpoints and
the README's ``--inject`` steps kept), so the runs take seconds. Engines are real.

A command the test cannot run here is listed below with the reason, and the test
fails when a listed command is no longer in the README.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tests.conftest import ROOT

pytestmark = pytest.mark.usefixtures("one_thread")

# what the test does not run, and why
SKIPPED = {
    "make test": "the test suite itself",
    "source .venv/bin/activate": "shell state; the test calls muse in its own interpreter",
    "muse plan run my-plan --num-processes 2": "2 GPUs; CI has none (2 CPU processes: test_growth_stage.py)",
    "accelerate launch -m muse_plan plan run my-plan": "the same launched by hand: GPUs again",
    **dict.fromkeys([
        "muse plan run my-plan --num-processes 16 --num-machines 2 --machine-rank 0 --main-process-ip 10.0.0.1",
        "muse plan run my-plan --num-processes 16 --num-machines 2 --machine-rank 1 --main-process-ip 10.0.0.1",
        "muse run resume 3 --num-processes 16 --num-machines 2 --machine-rank 0 --main-process-ip 10.0.0.1"],
        "two machines of 8 GPUs; CI has one CPU host (2 'machines' of 1 process: test_launch.py)"),
}
# run in place of the README's command
INSTEAD = {
    # setup is the venv this test runs in; then the Makefile's own quickstart commands
    "make quickstart": "the muse commands of the Makefile's quickstart recipe",
}
# started as a process and stopped with Ctrl-C (SIGINT) once it has written a checkpoint,
# as the README says to (the next command resumes it): the exit code, the last line's start
INTERRUPTED = {"muse plan run quickstart-cpu": (130, "run 2 interrupted in stage pretrain")}
# what the output of a command starting so must say, beside its exit code
SAYS = {
    "muse plan optimize growth-8xh100 --available-gpus 8 --gpu-type H100": "on 8xH100-80GB: fits",
    "muse plan run quickstart-cpu --resume": "resumed and finished",
    "muse plan run quickstart-cpu --inject": "injected fault",
}

# a CPU plan at test size: the decoder made tiny, its steps and checkpoints kept
TINY = ["model.shape.layers=1", "model.shape.d_model=32", "model.shape.n_heads=2", "model.seq_len=32",
        "training.micro_batch=4", "training.global_batch=4", "techniques.mhc.streams=2",
        "techniques.mhc.sinkhorn_iters=5"]


def readme_commands(text: str) -> list[str]:
    """Each command of the fenced ``sh`` blocks, in order: continuation lines joined,
    comments dropped, spaces collapsed."""
    commands = []
    for block in re.findall(r"^```sh\n(.*?)^```", text, re.S | re.M):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if words:
                commands.append(shlex.join(words))
    return commands


def quickstart_recipe() -> list[list[str]]:
    """``muse`` arguments of the Makefile's quickstart target, in order."""
    makefile = (ROOT / "Makefile").read_text()
    recipe = re.search(r"^quickstart:.*\n((?:\t.*\n)+)", makefile, re.M)
    assert recipe, "the Makefile has no quickstart target"
    lines = [shlex.split(line.strip()) for line in recipe[1].splitlines()]
    assert lines and all(words[0] == "$(BIN)/muse" for words in lines), lines
    return [words[1:] for words in lines]


def test_the_skips_are_all_still_in_the_readme() -> None:
    commands = readme_commands((ROOT / "README.md").read_text())
    for listed in (*SKIPPED, *INSTEAD, *INTERRUPTED):
        assert listed in commands, f"{listed!r} is listed here but no longer in README.md"
    for prefix in SAYS:
        assert any(c.startswith(prefix) for c in commands), f"{prefix!r} is no longer in README.md"


def test_the_readme_runs_top_to_bottom(tmp_path: Path, muse_home: Path, monkeypatch) -> None:
    from muse_plan.cli.main import app

    work = tmp_path / "clone"
    shutil.copytree(ROOT / "plans", work / "plans")
    monkeypatch.chdir(work)
    runner = CliRunner()

    def muse(args: list[str]) -> str:
        result = runner.invoke(app, args)
        assert result.exit_code == 0, f"muse {shlex.join(args)} exited {result.exit_code}:\n{result.output}"
        for created in re.findall(r"(?:created|imported) plan (\S+) \(id", result.output):
            shrink(created)
        return result.output

    def shrink(plan: str) -> None:
        spec = json.loads(runner.invoke(app, ["plan", "show", plan, "--json"]).stdout)["spec"]
        if spec["compute"].get("gpu") is None and spec["compute"].get("count", 0) == 0:  # a CPU plan: runs here
            assignments = [a for a in TINY if not a.startswith("techniques.mhc") or spec["model"]["residual"] == "mhc"]
            files = [s["name"] for s in spec["stages"] if (s.get("options") or {}).get("data")]
            if files:  # the user's examples need the plan's context: fewer steps and problems instead
                assignments = [a for a in assignments if not a.startswith(("model.seq_len", "training.global"))] \
                    + [f"stages.{s['name']}.steps=2" for s in spec["stages"]] \
                    + [f"stages.{name}.options.eval_problems=4" for name in files]
            sets = [word for assignment in assignments for word in ("--set", assignment)]
            muse(["plan", "edit", plan, *sets, "--reason", "test size"])

    def interrupted(args: list[str], expect: int, says: str) -> str:
        before = set((muse_home / "runs").glob("run-*"))
        env = {**os.environ, "MUSE_HOME": str(muse_home), "OMP_NUM_THREADS": "1"}
        process = subprocess.Popen([sys.executable, "-m", "muse_plan", *args], cwd=work, env=env,
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        deadline = time.monotonic() + 60
        while not any(run not in before and any(run.glob("*/step-*")) for run in (muse_home / "runs").glob("run-*")):
            assert process.poll() is None and time.monotonic() < deadline, "the run ended before Ctrl-C"
            time.sleep(0.01)
        process.send_signal(signal.SIGINT)
        output = process.communicate(timeout=60)[0]
        assert process.returncode == expect, f"muse {shlex.join(args)} exited {process.returncode}:\n{output}"
        assert output.strip().splitlines()[-1].startswith(says), output
        return output

    ran = []
    for command in readme_commands((ROOT / "README.md").read_text()):
        if command in SKIPPED:
            continue
        if command in INSTEAD:
            for args in quickstart_recipe():
                muse(args)
            continue
        words = shlex.split(command)
        assert words[0] == "muse", f"README command {command!r}: run it here, or list it in SKIPPED with why"
        output = interrupted(words[1:], *INTERRUPTED[command]) if command in INTERRUPTED else muse(words[1:])
        for prefix, text in SAYS.items():
            if command.startswith(prefix):
                assert text in output, f"{command}: {text!r} not in\n{output}"
        ran.append(command)
    assert len(ran) > 20, ran
    assert (work / "my-plan.yaml").is_file() and (work / "report" / "run-1.html").is_file()  # here, not in the repo
