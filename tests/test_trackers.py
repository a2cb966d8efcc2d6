"""training.log_with and ``muse runs export``: a run's metrics, hyper-parameters and events
in TensorBoard and MLflow, read back with each tracker's own reader and held against the store.

The runs are real (tiny decoders on CPU, through ``muse plan run``) and so are the trackers
(TensorBoard event files, an MLflow file store). TensorBoard keeps scalars as float32, so its
values are compared with the store's rounded to float32; MLflow keeps float64 and is compared
exactly.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import TINY_STANDARD, one_error_line, write_plan
from muse_plan.store import runs
from muse_plan.store.db import Store

pytestmark = pytest.mark.usefixtures("one_thread")

LOGGED = {**TINY_STANDARD["training"], "log_with": ["tensorboard", "mlflow"]}
SHORT = [{"name": "pretrain", "kind": "pretrain", "steps": 6, "checkpoint_every": 2, "eval_every": 3}]
TASK = {"tasks": ["multiplication:2x1"]}
# two stages, the second a GRPO stage: its own metrics (reward, KL, accuracy) go out too
TWO_STAGES = {
    **TINY_STANDARD, "name": "rl-tiny",
    "model": {**TINY_STANDARD["model"], "seq_len": 48},
    "techniques": {"grpo": {"group_size": 2, "max_new_tokens": 4, "kl_beta": 0.04}},
    "stages": [
        {"name": "pretrain", "kind": "pretrain", "steps": 4, "checkpoint_every": 2, "eval_every": 2, "options": TASK},
        {"name": "rl", "kind": "reasoning_rl", "steps": 2, "eval_every": 2, "training": {"micro_batch": 1},
         "options": {**TASK, "max_new_tokens": 4, "eval_problems": 2, "eval_samples": 1, "lora": False}},
    ],
}


@pytest.fixture(autouse=True)
def local_mlflow(monkeypatch):
    """MLflow 3 opens a file store only when asked to; no server from the environment."""
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


# ---- reading back ---------------------------------------------------------------------------


def store_points(run_id: int) -> dict[str, list[tuple[int, float]]]:
    """``STAGE/METRIC`` → the store's (step, value) points, in the order recorded."""
    out: dict[str, list[tuple[int, float]]] = {}
    with Store().read() as session:
        for stage in runs.stage_runs(session, runs.get_run(session, run_id)):
            for step, name, value, _ in runs.metric_points(session, stage.id):
                out.setdefault(f"{stage.name}/{name}", []).append((step, value))
    return out


def store_events(run_id: int) -> list:
    with Store().read() as session:
        return runs.events_after(session, run_id, 0)


def stored_config(run_id: int) -> dict:
    return json.loads(store_events(run_id)[0].data_json)["config"]


def tensorboard(folder: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return acc


def tb_scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    acc = tensorboard(folder)
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def tb_texts(folder: Path) -> list[tuple[str, int, str]]:
    acc = tensorboard(folder)
    return sorted((tag.removesuffix("/text_summary"), e.step, e.tensor_proto.string_val[0].decode())
                  for tag in acc.Tags()["tensors"] if tag.endswith("/text_summary") for e in acc.Tensors(tag))


def tb_hparams(folder: Path) -> dict:
    """The hyper-parameters TensorBoard's HParams tab shows (the plugin's session start)."""
    from tensorboard.plugins.hparams import plugin_data_pb2

    (sub,) = [p for p in folder.iterdir() if p.is_dir() and any(p.glob("events.out.tfevents.*"))]
    content = tensorboard(sub).PluginTagToContent("hparams")["_hparams_/session_start_info"]
    hparams = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info.hparams
    return {k: getattr(v, v.WhichOneof("kind")) for k, v in hparams.items()}


def float32(points: list[tuple[int, float]]) -> list[tuple[int, float]]:
    return [(step, float(np.float32(value))) for step, value in points]


def mlflow_run(folder: Path):
    from mlflow import MlflowClient

    client = MlflowClient(folder.resolve().as_uri())
    (experiment,) = client.search_experiments()
    (run,) = client.search_runs([experiment.experiment_id])
    return client, run


def mlflow_scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    client, run = mlflow_run(folder)
    history = {key: client.get_metric_history(run.info.run_id, key) for key in run.data.metrics}
    return {key: sorted(((m.step, m.value) for m in points), key=lambda p: p[0]) for key, points in history.items()}


def mlflow_texts(folder: Path) -> dict[str, str]:
    client, run = mlflow_run(folder)
    root = Path(run.info.artifact_uri.removeprefix("file://"))
    return {p.relative_to(root).as_posix(): p.read_text() for p in (root / "events").rglob("*.txt")}


def by_step(points: dict[str, list[tuple[int, float]]]) -> dict[str, list[tuple[int, float]]]:
    return {tag: sorted(series, key=lambda p: p[0]) for tag, series in points.items()}


# ---- live ---------------------------------------------------------------------------------------


def test_a_run_logs_every_stored_point_hyperparameter_and_fault_to_tensorboard_and_mlflow(cli, tmp_path) -> None:
    plan = write_plan(tmp_path, TINY_STANDARD, training=LOGGED, stages=SHORT)
    assert cli("plan", "import", plan).exit_code == 0
    result = cli("plan", "run", "tiny", "--inject", "nan@3")  # checkpoint at 2, NaN at 3: recovered
    assert result.exit_code == 0, result.output
    run_dir = Path(json.loads(cli("run", "show", "1", "--json").stdout)["run_dir"])
    assert f"tensorboard --logdir {run_dir / 'tensorboard'}" in result.output

    stored = store_points(1)
    assert {"pretrain/loss", "pretrain/grad_norm", "pretrain/lr", "pretrain/tokens_per_s", "pretrain/memory_gib",
            "pretrain/val_loss"} <= set(stored)
    assert [step for step, _ in stored["pretrain/loss"]] == [1, 2, 3, 4, 5, 6]
    tb = tb_scalars(run_dir / "tensorboard")
    assert tb == {tag: float32(series) for tag, series in stored.items()}  # every tag, step and value; no other
    assert mlflow_scalars(run_dir / "mlflow") == by_step(stored)

    config = stored_config(1)  # the revision the run started under, and its resolved settings
    assert config["run/revision"] == 1 and config["plan/training/lr"] == 0.01  # recovery's revision 2 halved it
    assert config["settings/pretrain/steps"] == 6 and config["settings/pretrain/precision"] == "fp32"
    assert config["settings/pretrain/model/d_model"] == 32 and config["plan/stages/pretrain/checkpoint_every"] == 2
    _, run = mlflow_run(run_dir / "mlflow")
    assert run.data.params == {k: str(v) for k, v in config.items()}
    assert tb_hparams(run_dir / "tensorboard") == {k: float(v) if isinstance(v, (bool, int, float)) else v
                                                   for k, v in config.items()}
    assert run.info.status == "FINISHED" and run.data.tags["muse.run"] == "1"

    texts = tb_texts(run_dir / "tensorboard")
    assert len(texts) == len(store_events(1))  # every event of the run, once
    assert ("pretrain/events/fault", 3, "warning: injected fault (--inject nan@3): fault: loss is nan at step 3") \
        in texts
    assert any(tag == "pretrain/events/rewrite" and step == 3 and "lr 0.01→0.005" in text
               for tag, step, text in texts)
    faults = {path: text for path, text in mlflow_texts(run_dir / "mlflow").items() if "-fault-" in path}
    assert [path.rsplit("-", 2)[0] for path in faults] == ["events/pretrain/step-0000003"]
    assert "loss is nan at step 3" in next(iter(faults.values()))


def test_log_with_on_the_command_line_is_a_revision_and_export_matches_the_live_logs(cli, tmp_path) -> None:
    assert cli("plan", "import", write_plan(tmp_path, TWO_STAGES)).exit_code == 0
    result = cli("plan", "run", "rl-tiny", "--log-with", "mlflow,tensorboard")
    assert result.exit_code == 0, result.output
    assert "trackers (mlflow,tensorboard) stored as revision 2" in result.output
    history = json.loads(cli("plan", "history", "rl-tiny", "--json").stdout)
    assert [(h["author"], h["reason"]) for h in history][-1] == ("user", "--log-with tensorboard,mlflow")
    assert json.loads(cli("plan", "show", "rl-tiny", "--json").stdout)["spec"]["training"]["log_with"] == \
        ["tensorboard", "mlflow"]

    run_dir = Path(json.loads(cli("run", "show", "1", "--json").stdout)["run_dir"])
    live_tb, live_ml = tb_scalars(run_dir / "tensorboard"), mlflow_scalars(run_dir / "mlflow")
    assert {"pretrain/loss", "rl/loss", "rl/reward", "rl/kl", "rl/train_accuracy", "rl/test_accuracy"} <= set(live_tb)
    assert live_ml == by_step(store_points(1))

    exported = cli("runs", "export", "1", "--to", "tensorboard", tmp_path / "tb")
    assert exported.exit_code == 0, exported.output
    assert f"tensorboard --logdir {tmp_path / 'tb'}" in exported.output
    assert cli("runs", "export", "1", "--to", "mlflow", tmp_path / "ml").exit_code == 0
    assert tb_scalars(tmp_path / "tb") == live_tb
    assert tb_texts(tmp_path / "tb") == tb_texts(run_dir / "tensorboard")
    assert tb_hparams(tmp_path / "tb") == tb_hparams(run_dir / "tensorboard")
    assert mlflow_scalars(tmp_path / "ml") == live_ml
    assert mlflow_texts(tmp_path / "ml") == mlflow_texts(run_dir / "mlflow")
    (_, live_run), (_, exported_run) = mlflow_run(run_dir / "mlflow"), mlflow_run(tmp_path / "ml")
    assert exported_run.data.params == live_run.data.params and exported_run.data.params
    assert exported_run.info.status == "FINISHED"

    from muse_plan import api

    assert api.set_log_with(Store(), "rl-tiny", "tensorboard, mlflow") is None  # unchanged: no revision


def test_a_tracker_that_fails_stops_alone_and_the_store_keeps_every_point(cli, tmp_path, monkeypatch) -> None:
    from muse_plan.monitor import tracker_kinds

    def full(self, stage, points, times):
        raise OSError("No space left on device")

    monkeypatch.setattr(tracker_kinds._TensorBoardRun, "scalars", full)
    plan = write_plan(tmp_path, TINY_STANDARD, training=LOGGED, stages=[{**SHORT[0], "steps": 4}])
    assert cli("plan", "import", plan).exit_code == 0
    result = cli("plan", "run", "tiny")
    assert result.exit_code == 0, result.output
    warnings = [e.message for e in store_events(1) if e.severity == "warning"]
    assert warnings == ["TensorBoard stopped logging (OSError: No space left on device); the store keeps every "
                        "metric: muse runs export writes them to a tracker later"]
    stored = store_points(1)
    assert [step for step, _ in stored["pretrain/loss"]] == [1, 2, 3, 4]
    run_dir = Path(json.loads(cli("run", "show", "1", "--json").stdout)["run_dir"])
    assert mlflow_scalars(run_dir / "mlflow") == by_step(stored)


class StopAt:
    """A run's view that stops it as Ctrl-C does, at one step."""

    def __init__(self, step: int) -> None:
        self.at = step

    def message(self, text: str) -> None: ...

    def stage_started(self, name: str, total_steps: int, start_step: int) -> None: ...

    def step(self, record) -> None:
        if record.step == self.at:
            raise KeyboardInterrupt

    def evaluated(self, step: int, metrics: dict[str, float]) -> None: ...

    def stage_finished(self, name: str) -> None: ...


def test_a_resumed_run_goes_on_in_the_same_tracker_runs_and_a_rewind_is_relogged(cli, tmp_path) -> None:
    from muse_plan.errors import RunInterrupted
    from muse_plan.executor.runner import run_plan

    assert cli("plan", "import", write_plan(tmp_path, TINY_STANDARD, training=LOGGED, stages=SHORT)).exit_code == 0
    with pytest.raises(RunInterrupted):
        run_plan(None, "tiny", view=StopAt(3), probe=False)  # stopped after step 3; checkpoint at 2
    run_plan(None, "tiny", resume=True, probe=False)  # a new process would do the same: nothing is carried over
    run_dir = Path(json.loads(cli("run", "show", "1", "--json").stdout)["run_dir"])

    stored = store_points(1)
    assert [step for step, _ in stored["pretrain/loss"]] == [1, 2, 3, 4, 5, 6]  # the store dropped the first step 3
    logged = mlflow_scalars(run_dir / "mlflow")  # one MLflow run, continued
    assert [step for step, _ in logged["pretrain/loss"]] == [1, 2, 3, 3, 4, 5, 6]  # it can't drop: step 3 twice
    assert dict(stored["pretrain/loss"])[3] == logged["pretrain/loss"][3][1]  # the re-trained step 3 came last
    assert {tag: series[-1] for tag, series in stored.items()} == {tag: logged[tag][-1] for tag in stored}
    _, run = mlflow_run(run_dir / "mlflow")
    assert run.info.status == "FINISHED" and run.data.params == {k: str(v) for k, v in stored_config(1).items()}
    assert len(list((run_dir / "tensorboard").glob("*/hparams.yml"))) == 1  # hyper-parameters once
    assert len(list((run_dir / "tensorboard").glob("events.out.tfevents.*"))) == 2  # a stream per process
    bodies = sorted(text for _, _, text in tb_texts(run_dir / "tensorboard"))
    assert bodies == sorted(f"{e.severity}: {e.message}" for e in store_events(1))  # each event once, across both


# ---- refused, in one line ------------------------------------------------------------------------


def test_a_tracker_that_is_not_installed_is_refused_before_anything_is_stored(cli, tmp_path, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "mlflow", None)  # what importlib finds for a missing package
    with_mlflow = write_plan(tmp_path, TINY_STANDARD, training={**LOGGED, "log_with": ["mlflow"]})
    one_error_line(cli("plan", "import", with_mlflow),
                   "training.log_with: MLflow is not installed here; install it with: pip install -e '.[mlflow]'")
    assert "No plans yet" in cli("plan", "list").output

    assert cli("plan", "import", write_plan(tmp_path, TINY_STANDARD)).exit_code == 0
    one_error_line(cli("plan", "run", "tiny", "--log-with", "tensorboard,mlflow"),
                   "--log-with: MLflow is not installed here; install it with: pip install -e '.[mlflow]'")
    one_error_line(cli("plan", "edit", "tiny", "--set", "training.log_with=[mlflow]"), "pip install -e '.[mlflow]'")
    one_error_line(cli("plan", "run", "tiny", "--log-with", "tensorbord"),
                   "--log-with: unknown tracker 'tensorbord'; accepted: tensorboard, mlflow, wandb")
    assert len(json.loads(cli("plan", "history", "tiny", "--json").stdout)) == 1

    # named while installed, missing when the run starts: refused before a run exists
    assert cli("plan", "edit", "tiny", "--set", "training.log_with=[tensorboard]").exit_code == 0
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    monkeypatch.setitem(sys.modules, "tensorboardX", None)
    one_error_line(cli("plan", "run", "tiny"),
                   "training.log_with: TensorBoard is not installed here; install it with: "
                   "pip install -e '.[tensorboard]'")
    assert "No runs yet" in cli("run", "list").output


def test_export_refuses_a_bad_run_folder_or_tracker_in_one_line(cli, tmp_path, muse_home) -> None:
    one_error_line(cli("runs", "export", "7", "--to", "tensorboard", tmp_path / "out"), "no run '7'")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "notes.txt").write_text("mine")
    one_error_line(cli("runs", "export", "7", "--to", "mlflow", tmp_path / "full"),
                   f"output folder '{tmp_path / 'full'}' is not empty; name a new folder or an empty one")
    one_error_line(cli("runs", "export", "7", "--to", "csv", tmp_path / "out"),
                   "--to 'csv': accepted: tensorboard, mlflow")
    one_error_line(cli("run", "export", "7", "--to", "wandb", tmp_path / "out"), "W&B logs a run live only")
    one_error_line(cli("runs", "export", "7", tmp_path / "out"),
                   "give the tracker to write: --to tensorboard or --to mlflow")

    from muse_plan.plan.io import load_file
    from muse_plan.store import repo

    with Store().write() as session:  # a run whose process (this one) is alive: still running
        plan, revision = repo.create_plan(session, load_file(write_plan(tmp_path, TINY_STANDARD)), reason="test")
        run = runs.create_run(session, plan, revision.number, [("pretrain", 30)], str(muse_home / "runs"))
        assert run.pid == os.getpid()
    one_error_line(cli("runs", "export", "1", "--to", "tensorboard", tmp_path / "out"), "run 1 is still running")
    assert not (tmp_path / "out").exists()


# ---- the plan field ------------------------------------------------------------------------------


def test_log_with_is_checked_when_the_plan_is_read() -> None:
    from muse_plan.errors import PlanError
    from muse_plan.plan.io import spec_from_dict, spec_to_dict

    base = {**TINY_STANDARD, "stages": SHORT}
    assert spec_from_dict({**base, "training": {"log_with": "MLflow, tensorboard"}}).training.log_with == \
        ("tensorboard", "mlflow")  # the registry's order: the same plan however it is written
    assert spec_from_dict({**base, "training": {"log_with": "none"}}).training.log_with is None
    assert "log_with" not in spec_to_dict(spec_from_dict(base))["training"]  # a plan without trackers dumps as before
    with pytest.raises(PlanError, match="unknown tracker 'comet'; accepted: tensorboard, mlflow, wandb"):
        spec_from_dict({**base, "training": {"log_with": ["comet"]}})
    with pytest.raises(PlanError, match="stage 'pretrain': training.log_with is the run's, not a stage's"):
        spec_from_dict({**base, "stages": [{**SHORT[0], "training": {"log_with": ["tensorboard"]}}]})


def test_wandb_logs_offline_into_the_run_folder_when_installed(cli, tmp_path, monkeypatch) -> None:
    """W&B with nothing configured: offline, under the run's folder, its summary the store's last numbers."""
    pytest.importorskip("wandb")
    for name in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_DIR"):
        monkeypatch.delenv(name, raising=False)
    plan = write_plan(tmp_path, TINY_STANDARD, training={**TINY_STANDARD["training"], "log_with": ["wandb"]},
                      stages=SHORT)
    assert cli("plan", "import", plan).exit_code == 0
    result = cli("plan", "run", "tiny")
    assert result.exit_code == 0, result.output
    run_dir = Path(json.loads(cli("run", "show", "1", "--json").stdout)["run_dir"])
    [offline] = list((run_dir / "wandb").rglob("offline-run-*"))  # offline: nothing was sent anywhere
    [records] = list(offline.glob("*.wandb"))
    # wandb (0.2x on) ships no reader for its offline record file: a history row there holds each value
    # as JSON beside its key, so every stored loss (JSON as written) must be in it, under its tag
    written, stored = records.read_bytes(), store_points(1)["pretrain/loss"]
    assert written.count(b"pretrain/loss") >= len(stored) == 6
    assert all(json.dumps(value).encode() in written for _, value in stored)
