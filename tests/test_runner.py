"""``muse plan run`` end to end on tiny plans: store records, stage chaining,
resume after SIGKILL matching the uninterrupted loss sequence, errors."""

from __future__ import annotations

import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from muse_plan.store import repo, runs
from muse_plan.store.db import Store
from muse_plan.store.models import Run
from tests.conftest import TINY, one_error_line, write_plan


def losses(run_id: int, stage_position: int = 0) -> list[tuple[int, float]]:
    with Store().read() as session:
        run = runs.get_run(session, run_id)
        stage = runs.stage_runs(session, run)[stage_position]
        return runs.metric_series(session, run_id, "loss", stage.id)


def test_a_plan_runs_to_completion_and_records_everything(cli, tmp_path, muse_home) -> None:
    assert cli("plan", "import", write_plan(tmp_path)).exit_code == 0
    result = cli("plan", "run", "tiny")
    assert result.exit_code == 0, result.output
    assert "validation loss" in result.output and "unigram model of the same data" in result.output
    series = losses(1)
    assert [s for s, _ in series] == list(range(1, 31))
    assert all(math.isfinite(v) for _, v in series)
    assert series[-1][1] < series[0][1] - 0.5  # it learns
    with Store().read() as session:
        run = runs.get_run(session, 1)
        assert run.status == "completed"
        stage = runs.stage_runs(session, run)[0]
        assert (stage.status, stage.step, stage.total_steps) == ("completed", 30, 30)
        last = runs.last_metrics(session, stage.id)
        assert last["val_loss"][0] == 30 and last["val_loss"][1] < last["unigram_val_loss"][1]
        assert {"grad_norm", "lr", "tokens_per_s", "memory_gib"} <= set(last)
    folder = muse_home / "runs" / "run-00001" / "pretrain"
    assert sorted(p.name for p in folder.iterdir()) == ["step-00000010", "step-00000020", "step-00000030"]
    shown = cli("run", "show", "1", "--json")
    assert shown.exit_code == 0 and '"status": "completed"' in shown.output
    listed = cli("run", "list")
    assert "tiny" in listed.output and "completed" in listed.output


def test_a_later_stage_starts_from_the_earlier_ones_weights(cli, tmp_path) -> None:
    stages = [{"name": "pretrain", "kind": "pretrain", "steps": 12, "checkpoint_every": 12},
              {"name": "more", "kind": "continue", "steps": 3, "checkpoint_every": 3}]
    cli("plan", "import", write_plan(tmp_path, stages=stages))
    assert cli("plan", "run", "tiny").exit_code == 0
    first, second = losses(1, 0), losses(1, 1)
    # a fresh model starts near ln(260) = 5.56; the continued one where the first stage ended
    assert second[0][1] < first[0][1] - 1.0
    assert abs(second[0][1] - first[-1][1]) < 0.5


def _muse(home: Path, *args: str) -> subprocess.Popen:
    env = {**os.environ, "MUSE_HOME": str(home), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "muse_plan", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_resume_after_sigkill_reproduces_the_uninterrupted_run(tmp_path, monkeypatch) -> None:
    """Kill a run with SIGKILL mid-stage, truncate its newest checkpoint, resume:
    the corrupt checkpoint is skipped and the loss sequence is bit-identical."""
    stages = [{"name": "pretrain", "kind": "pretrain", "steps": 60, "checkpoint_every": 10, "eval_every": 30}]
    plan = write_plan(tmp_path, stages=stages)
    homes = {name: tmp_path / name for name in ("whole", "killed")}
    for home in homes.values():
        assert _muse(home, "plan", "import", str(plan)).wait() == 0
    whole = _muse(homes["whole"], "plan", "run", "tiny")  # beside the victim: one thread each, two cores
    folder = homes["killed"] / "runs" / "run-00001" / "pretrain"
    victim = _muse(homes["killed"], "plan", "run", "tiny")
    deadline = time.monotonic() + 120
    while not (folder / "step-00000030").is_dir():
        assert victim.poll() is None and time.monotonic() < deadline, "run ended before it could be killed"
        time.sleep(0.01)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert whole.wait(timeout=300) == 0, whole.stdout.read()
    newest = sorted(p for p in folder.iterdir() if p.name.startswith("step-") and not p.name.endswith(".tmp"))[-1]
    assert newest.name != "step-00000060", "the run finished before the kill"
    weights = newest / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])

    resumed = _muse(homes["killed"], "plan", "run", "tiny", "--resume")
    output = resumed.communicate(timeout=300)[0]
    assert resumed.returncode == 0, output
    assert f"checkpoint {newest.name}: model.safetensors does not match its checksum" in output

    monkeypatch.setenv("MUSE_HOME", str(homes["whole"]))
    expected = losses(1)
    monkeypatch.setenv("MUSE_HOME", str(homes["killed"]))
    got = losses(1)
    assert [s for s, _ in got] == list(range(1, 61))
    assert got == expected  # exact: same floats, step for step
    with Store().read() as session:
        run = session.get(Run, 1)
        assert run.status == "completed"
        messages = [e.message for e in runs.events(session, 1)]
        assert any(m.startswith("resuming stage pretrain from step-") for m in messages)


def test_ctrl_c_stops_a_run_with_one_line_saying_where_and_how_to_resume(cli, tmp_path, monkeypatch) -> None:
    stages = [{"name": "pretrain", "kind": "pretrain", "steps": 5000, "checkpoint_every": 10}]
    assert _muse(tmp_path, "plan", "import", str(write_plan(tmp_path, stages=stages))).wait() == 0
    folder = tmp_path / "runs" / "run-00001" / "pretrain"
    victim = _muse(tmp_path, "plan", "run", "tiny")
    deadline = time.monotonic() + 120
    while not (folder / "step-00000020").is_dir():
        assert victim.poll() is None and time.monotonic() < deadline, "run ended before it could be stopped"
        time.sleep(0.01)
    victim.send_signal(signal.SIGINT)
    output = victim.communicate(timeout=60)[0]
    assert victim.returncode == 130, output
    assert "Traceback" not in output, output
    last = output.strip().splitlines()[-1]
    found = re.fullmatch(r"run 1 interrupted in stage pretrain at step (\d+) of 5000, last checkpoint at step "
                         r"(\d+); resume with: muse plan run tiny --resume", last)
    assert found, last
    step, saved = int(found[1]), int(found[2])
    assert 20 <= saved <= step < 5000 and saved % 10 == 0
    monkeypatch.setenv("MUSE_HOME", str(tmp_path))
    assert [s for s, _ in losses(1)] == list(range(1, step + 1))  # every step trained is recorded
    with Store().read() as session:
        run = session.get(Run, 1)
        assert run.status == "interrupted" and runs.stage_runs(session, run)[0].step == step
    shown = cli("run", "show", "1").output
    assert "interrupted by the user" in shown and "resume with: muse run resume 1" in shown


def test_plan_with_an_engine_not_built_yet_is_refused_before_a_run_exists(cli, tmp_path, monkeypatch) -> None:
    # every engine of the plan's stage kinds exists now; take one out of the registry
    from engines import contract

    monkeypatch.setattr(contract, "TRAINERS", {k: v for k, v in contract.TRAINERS.items() if k != "grpo"})
    monkeypatch.setattr("muse_plan.executor.prepare.TRAINERS", contract.TRAINERS)
    data = {**TINY, "name": "rl", "techniques": {"grpo": {}}, "stages": []}
    data["model"] = {**TINY["model"], "residual": "standard"}
    cli("plan", "import", write_plan(tmp_path, **data))
    result = cli("plan", "run", "rl")
    assert result.exit_code == 2
    assert "runs on the 'grpo' engine, which this version of muse does not have yet" in result.output
    assert cli("run", "list", "--json").output.strip() == "[]"


@pytest.mark.parametrize("args, message", [
    (("plan", "run", "nope"), "no plan 'nope'"),
    (("plan", "run", "tiny", "--resume"), "has no unfinished run to resume"),
    (("run", "show", "7"), "no run '7'"),
    (("run", "resume", "x"), "no run 'x'"),
])
def test_bad_run_requests(cli, tmp_path, args, message) -> None:
    cli("plan", "import", write_plan(tmp_path))
    result = cli(*args)
    assert result.exit_code == 2
    assert message in result.output


def test_a_completed_run_is_not_resumed(cli, tmp_path) -> None:
    cli("plan", "import", write_plan(tmp_path))
    assert cli("plan", "run", "tiny").exit_code == 0
    result = cli("run", "resume", "1")
    assert result.exit_code == 2 and "run 1 already completed" in result.output


def test_data_that_does_not_exist_is_a_plan_error_before_a_run_exists(cli, tmp_path, monkeypatch) -> None:
    cli("plan", "import", write_plan(tmp_path, data={"source": str(tmp_path / "missing.txt")}))
    one_error_line(cli("plan", "run", "tiny"), f"stage 'pretrain': data source '{tmp_path / 'missing.txt'}' "
                                               "does not exist; use 'arithmetic'")
    monkeypatch.chdir(tmp_path)
    assert cli("plan", "edit", "tiny", "--set", "data.source=corpus").exit_code == 0
    one_error_line(cli("plan", "run", "tiny"), f"data source 'corpus' does not exist (a relative path, read from "
                                               f"{tmp_path})")
    (tmp_path / "corpus").mkdir()
    one_error_line(cli("plan", "run", "tiny"), "data folder 'corpus' holds no .txt")
    (tmp_path / "corpus" / "a.txt").write_text("some text " * 50)
    assert cli("plan", "edit", "tiny", "--set", "data.tokenizer=my-tokenizer").exit_code == 0
    one_error_line(cli("plan", "run", "tiny"), "data.tokenizer: tokenizer 'my-tokenizer' is neither 'byte' nor a "
                                               f"local tokenizer directory (a relative path, read from {tmp_path})")
    with Store().read() as session:
        assert runs.list_runs(session) == []  # refused before any run was stored


def test_a_stage_of_another_precision_gets_its_own_accelerator(cli, tmp_path, muse_home) -> None:
    stages = [TINY["stages"][0] | {"steps": 4, "checkpoint_every": 4, "eval_every": 4},
              {"name": "more", "kind": "continue", "steps": 4, "checkpoint_every": 4, "eval_every": 4,
               "training": {"precision": "bf16"}}]
    training = {**TINY["training"], "precision": "fp32"}
    assert cli("plan", "import", write_plan(tmp_path, stages=stages, training=training)).exit_code == 0
    result = cli("plan", "run", "tiny")
    assert result.exit_code == 0, result.output
    assert "stage more runs in bf16 (was no)" in result.output
    with Store().read() as session:
        texts = [e.message for e in runs.events(session, 1)]
    assert "stage more runs in bf16 (was no)" in texts


def test_a_stage_the_plan_lets_stop_on_a_plateau_ends_there_and_the_next_starts(cli, tmp_path, muse_home) -> None:
    stages = [TINY["stages"][0] | {"steps": 200, "eval_every": 10, "checkpoint_every": 100,
                                   "options": {"stop_on_plateau": 5}},
              {"name": "more", "kind": "continue", "steps": 2}]
    training = {**TINY["training"], "lr": 1e-7}  # a loss that cannot move: a plateau by the first full windows
    assert cli("plan", "import", write_plan(tmp_path, stages=stages, training=training)).exit_code == 0
    result = cli("plan", "run", "tiny")
    assert result.exit_code == 0, result.output
    with Store().read() as session:
        texts = [e.message for e in runs.events(session, 1)]
    assert any("stage pretrain stopped early at step 10 of 200" in t for t in texts)
    assert [s for s, _ in losses(1)] == list(range(1, 11))
    assert len(losses(1, 1)) == 2  # the next stage ran from the plateau's checkpoint
