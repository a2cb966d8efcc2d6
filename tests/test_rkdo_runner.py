"""The RKDO engine through ``muse plan run``: the bundled plan, an early stop,
a representation stage after a pretrain stage, and bad options refused."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from muse_plan.store import runs
from muse_plan.store.db import Store

ROOT = Path(__file__).resolve().parent.parent


pytestmark = pytest.mark.usefixtures("one_thread")


def bundled_plan(tmp_path: Path, **stage_options) -> Path:
    data = yaml.safe_load((ROOT / "plans" / "rkdo-representation.yaml").read_text())
    data["techniques"]["rkdo"].update(dataset="synthetic")
    data["training"]["micro_batch"] = 32
    data["stages"][0].update(steps=40, eval_every=10, checkpoint_every=20)
    data["stages"][0]["options"] = {"encoder": "mlp", "anchors": 48, **stage_options}
    path = tmp_path / "rkdo.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_the_bundled_plan_runs_through_the_cli_and_records_the_measures(cli, tmp_path) -> None:
    assert cli("plan", "import", bundled_plan(tmp_path)).exit_code == 0
    result = cli("plan", "run", "rkdo-representation")
    assert result.exit_code == 0, result.output
    with Store().read() as session:
        run = runs.get_run(session, 1)
        stage = runs.stage_runs(session, run)[0]
        assert (run.status, stage.status, stage.step) == ("completed", "completed", 40)
        last = runs.last_metrics(session, stage.id)
        assert {"linear_probe_acc", "nmi", "ari", "knn_retention", "val_loss", "recursion_levels"} <= set(last)
        assert 0.2 < last["knn_retention"][1] <= 1.0
        # 40 batches of 32 over 960 training samples: every sample seen once, a third twice
        assert last["recursion_levels"][1] == pytest.approx(40 * 32 / 960)


def test_an_early_stop_through_the_cli_is_recorded(cli, tmp_path) -> None:
    path = bundled_plan(tmp_path, stop_tol=1.0, stop_window=2)
    cli("plan", "import", path)
    result = cli("plan", "run", "rkdo-representation")
    assert result.exit_code == 0, result.output
    assert "stopped early at step 10 of 40" in result.output
    with Store().read() as session:
        stage = runs.stage_runs(session, runs.get_run(session, 1))[0]
        assert (stage.status, stage.step) == ("completed", 10)
        assert stage.checkpoint.endswith("step-00000010")


def test_an_image_representation_stage_after_a_pretrain_stage_starts_fresh(cli, tmp_path) -> None:
    data = yaml.safe_load(bundled_plan(tmp_path).read_text())
    data["model"] = {"scale": "1M", "seq_len": 32, "vocab_size": 260, "shape": {"layers": 2, "d_model": 32, "n_heads": 2}}
    data["stages"] = [{"name": "pretrain", "kind": "pretrain", "steps": 2}, {**data["stages"][0], "steps": 4}]
    (tmp_path / "two.yaml").write_text(yaml.safe_dump(data))
    cli("plan", "import", tmp_path / "two.yaml")
    result = cli("plan", "run", "rkdo-representation")
    assert result.exit_code == 0, result.output  # no attempt to load decoder weights into the MLP
    assert "representation: 4 steps" in result.output


@pytest.mark.parametrize("options, message, when", [
    ({"gamma": 1}, "stage 'representation': unknown rkdo option 'gamma'; accepted:", "import"),
    ({"dataset": "/no/such/folder"}, "rkdo dataset '/no/such/folder' is neither 'digits', 'synthetic' nor a folder",
     "run"),
    ({"encoder": "cnn"}, "the cnn encoder reads images, not vector data", "run"),
])
def test_bad_options_are_refused_with_one_line_before_any_step(cli, tmp_path, options, message, when) -> None:
    """An unknown option when the plan is read; what needs the data (a folder, its kind) when the stage sets up."""
    imported = cli("plan", "import", bundled_plan(tmp_path, **options))
    assert imported.exit_code == (2 if when == "import" else 0)
    result = imported if when == "import" else cli("plan", "run", "rkdo-representation")
    assert result.exit_code == 2 and message in result.output
    assert "Traceback" not in result.output
