"""The probe: one measured step of each stage before a run (``executor/probe.py``)."""

from __future__ import annotations

import json

import yaml

from muse_plan.executor import probe
from muse_plan.store import runs
from muse_plan.store.db import Store

PLAN = {
    "name": "probed",
    "model": {"scale": "1M", "seq_len": 32, "vocab_size": 260, "shape": {"layers": 2, "d_model": 32, "n_heads": 2}},
    "compute": "cpu",
    "training": {"micro_batch": 8, "global_batch": 8, "lr": 3e-3, "warmup_steps": 1},
    "stages": [
        {"name": "pretrain", "kind": "pretrain", "steps": 6, "eval_every": 6},
        {"name": "rl", "kind": "reasoning_rl", "steps": 2, "eval_every": 2,
         "options": {"tasks": ["multiplication:2x1"], "group_size": 2, "max_new_tokens": 6, "eval_problems": 2},
         "training": {"micro_batch": 2, "global_batch": 2}},
    ],
}


def _run(cli, tmp_path, *flags) -> int:
    path = tmp_path / "probed.yaml"
    path.write_text(yaml.safe_dump(PLAN))
    assert cli("plan", "import", path).exit_code == 0
    result = cli("plan", "run", "probed", *flags)
    assert result.exit_code == 0, result.output
    with Store().read() as session:
        return len(runs.list_runs(session))


def _losses(run_id: int, stage: str | None = None) -> list[tuple[int, float]]:
    with Store().read() as session:
        ids = {s.name: s.id for s in runs.stage_runs(session, runs.get_run(session, run_id))}
        return runs.metric_series(session, run_id, "loss", *([ids[stage]] if stage else []))


def test_the_probe_measures_every_training_stage_and_leaves_the_run_as_it_would_have_been(cli, tmp_path) -> None:
    _run(cli, tmp_path, "--no-probe")
    cli("plan", "delete", "probed", "--yes")
    _run(cli, tmp_path, "--probe")
    with Store().read() as session:
        newest = runs.list_runs(session)[0][0]
        probes = [e for e in runs.events(session, newest.id, limit=50) if e.kind == "probe"]
    assert sorted(json.loads(e.data_json)["predicted_gib"] > 0 for e in probes) == [True, True]
    assert all(json.loads(e.data_json)["seconds"] > 0 and "fits" in e.message for e in probes)
    assert {e.message.split(":")[0] for e in probes} == {"probe of stage pretrain", "probe of stage rl"}
    with Store().read() as session:
        ids = [r.id for r, *_ in runs.list_runs(session)]
    # the probe restores every RNG and touches no trainer the run uses: the same curves, bit for bit
    assert len(_losses(max(ids))) == 8 and _losses(max(ids)) == _losses(min(ids))


def test_a_stage_the_probe_finds_too_big_is_rewritten_before_step_one(cli, tmp_path, monkeypatch) -> None:
    limits = iter([0.001] + [1e6] * 10)  # this machine "has" almost nothing for the first probe only
    monkeypatch.setattr(probe, "_limit_gib", lambda accelerator: next(limits))
    _run(cli, tmp_path, "--probe")
    history = json.loads(cli("plan", "history", "probed", "--json").stdout)
    assert history[-1]["author"] == "optimizer"
    assert history[-1]["reason"].startswith("probe before run: probe of stage pretrain:")
    assert "micro_batch 8→4, grad_accum 1→2 (global batch 8 kept)" in history[-1]["reason"]
    spec = json.loads(cli("plan", "export", "probed", "--format", "json").stdout)
    assert spec["stages"][0]["training"]["micro_batch"] == 4  # in the stage that did not fit
    assert spec["training"]["micro_batch"] == 8 and spec["stages"][1]["training"]["micro_batch"] == 2
    assert [s for s, _ in _losses(1, "pretrain")] == list(range(1, 7))  # then the whole run, rewritten


def test_optimize_probe_measures_each_stage_of_the_fitted_plan_here(cli, tmp_path) -> None:
    path = tmp_path / "probed.yaml"
    path.write_text(yaml.safe_dump(PLAN))
    assert cli("plan", "import", path).exit_code == 0
    result = cli("plan", "optimize", "probed", "--probe", "--dry-run", "--json")
    assert result.exit_code == 0, result.output
    probes = json.loads(result.stdout)["probes"]
    assert [p["stage"] for p in probes] == ["pretrain", "rl"]
    assert all(p["seconds"] > 0 and p["measured_gib"] > 0 and p["predicted_gib"] > 0 for p in probes)
    assert len(json.loads(cli("plan", "history", "probed", "--json").stdout)) == 1  # --dry-run stores nothing
