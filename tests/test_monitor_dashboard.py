"""``muse monitor``: snapshots of a real tiny run, ETA and alert rules on hand-made data,
errors, no torch import, and a dashboard polling a run that is writing the store."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone

import pytest
import yaml

from conftest import ROOT, heavy_imports, one_error_line, run_once
from muse_plan.monitor import dashboard
from muse_plan.plan.io import spec_from_dict
from muse_plan.store import repo, runs
from muse_plan.store.db import Store
from muse_plan.store.models import MetricPoint
from test_runner import TINY  # the same tiny plan the runner tests train

T0 = datetime(2026, 1, 1, 12, 0, tzinfo=timezone.utc)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A store holding one completed run of the tiny plan, made by ``muse plan run``: its URL."""
    return run_once(tmp_path_factory.mktemp("monitor-home"), TINY)


def stored_last(url: str, name: str) -> float:
    with Store(url).read() as session:
        stage = runs.stage_runs(session, runs.get_run(session, 1))[0]
        return runs.last_metrics(session, stage.id)[name][1]


def hand_run(store: Store, name: str = "hand", *, done: int = 40, total: int = 100, per_flush: int = 4,
             seconds_per_flush: float = 2.0, losses: list[float] | None = None) -> int:
    """A running run written by hand: ``done`` steps flushed ``per_flush`` at a time every
    ``seconds_per_flush`` seconds, each point stamped with its flush time (as the executor does)."""
    losses = losses or [5.0 - 0.01 * s for s in range(done)]
    with store.write() as session:
        plan, revision = repo.create_plan(session, spec_from_dict({**TINY, "name": name}))
        run = runs.create_run(session, plan, revision.number, [("pretrain", total)], "/tmp/muse-runs")
        stage = runs.stage_runs(session, run)[0]
        stage.status, stage.step, stage.started_at = "running", done, T0
        for i in range(done):
            flushed = T0 + timedelta(seconds=seconds_per_flush * (i // per_flush + 1), microseconds=50 * i)
            session.add_all(MetricPoint(run_id=run.id, stage_run_id=stage.id, step=i + 1, name=metric,
                                        value=value, time=flushed)
                            for metric, value in (("loss", losses[i]), ("grad_norm", 1.0 + i % 3),
                                                  ("tokens_per_s", 1000.0), ("memory_gib", 2.0)))
        return run.id


def hand_snapshot(store: Store, run_id: int, **kw) -> dict:
    with store.read() as session:
        return dashboard.snapshot(session, runs.get_run(session, run_id), **kw)


# ---- a real run ----------------------------------------------------------------------------

def test_once_shows_stage_step_loss_and_sparklines(cli, tiny_run):
    result = cli("--db", tiny_run, "monitor", "1", "--once")
    assert result.exit_code == 0, result.output
    loss = stored_last(tiny_run, "loss")
    for text in ("run 1", "plan tiny", "completed", "pretrain", "30/30", f"{loss:.4g}", "done", "steps 1–30"):
        assert text in result.output, text
    assert any(ch in result.output for ch in dashboard.SPARK)


def test_json_snapshot_has_the_run_and_the_stored_last_loss(cli, tiny_run):
    result = cli("--db", tiny_run, "monitor", "run-00001", "--json")
    assert result.exit_code == 0, result.output
    snap = json.loads(result.stdout)
    assert {"run", "plan", "revision", "status", "finished", "stages", "current_stage", "loss_points", "series",
            "utilisation", "rules", "alerts", "events", "rewrites"} <= set(snap)
    assert (snap["run"], snap["plan"], snap["status"], snap["finished"]) == (1, "tiny", "completed", True)
    stage = snap["stages"][0]
    assert (stage["name"], stage["step"], stage["total_steps"], stage["progress"]) == ("pretrain", 30, 30, 1.0)
    assert stage["metrics"]["loss"] == stored_last(tiny_run, "loss")
    assert stage["metrics"]["val_loss"] == stored_last(tiny_run, "val_loss")
    assert snap["loss_points"] == 30 and len(snap["series"]["loss"]) == 30
    assert snap["series"]["loss"][-1] == stage["metrics"]["loss"]
    assert [e["message"] for e in snap["events"]][-1] == "run completed under revision 1"
    assert snap["utilisation"]["cpu_percent"] is None  # a finished run: nothing recorded, nothing sampled


def test_a_threshold_crossed_is_flagged(cli, tiny_run):
    grad = stored_last(tiny_run, "grad_norm")
    result = cli("--db", tiny_run, "monitor", "tiny", "--json",
                 "--alert-thresholds", f"gradient_norm:{grad / 2},loss:1000")
    snap = json.loads(result.stdout)
    assert [(a["rule"], a["value"], a["metric"]) for a in snap["alerts"]] == [("gradient_norm", grad, "grad_norm")]
    assert [(r["rule"], r["over"]) for r in snap["rules"]] == [("gradient_norm", True), ("loss", False)]
    shown = cli("--db", tiny_run, "monitor", "tiny", "--once", "--alert-thresholds", f"gradient_norm:{grad / 2}")
    assert f"gradient_norm {grad / 2:g}: {grad:.3g} OVER" in shown.output


def test_live_mode_shows_a_finished_run_once_and_stops(cli, tiny_run):
    result = cli("--db", tiny_run, "monitor", "1", "--update-interval", "0.2")
    assert result.exit_code == 0, result.output
    assert "30/30" in result.output
    assert result.output.strip().endswith("run 1 completed; monitor stopped.")


def test_ctrl_c_leaves_the_live_view_cleanly(cli, store, monkeypatch):
    sleep = time.sleep

    def interrupt(seconds):  # Ctrl-C while the view waits for its next refresh
        if seconds == 5:
            raise KeyboardInterrupt
        sleep(seconds)

    monkeypatch.setattr(time, "sleep", interrupt)
    with store.write() as session:
        repo.create_plan(session, spec_from_dict({**TINY, "name": "later"}))
    waiting = cli("monitor", "later", "--update-interval", "5")
    assert waiting.exit_code == 0 and "has no run yet" in waiting.output and "Ctrl-C to stop)\nmonitor stopped." in waiting.output
    run_id = hand_run(store, done=12)  # alive: its pid is this test's
    watched = cli("monitor", str(run_id), "--update-interval", "5")
    assert watched.exit_code == 0, watched.output
    assert "12/100" in watched.output
    assert watched.output.strip().endswith(f"monitor stopped; run {run_id} goes on")


# ---- choosing the run, errors --------------------------------------------------------------

def test_a_plan_name_or_id_means_its_newest_run(cli, store):
    first = hand_run(store, "alpha", done=10)  # plan 1, run 1
    with store.write() as session:
        for name in ("b", "c", "d"):  # plans 2 to 4, no runs
            repo.create_plan(session, spec_from_dict({**TINY, "name": name}))
    other = hand_run(store, "epsilon", done=5)  # plan 5, run 2
    with store.write() as session:
        newest = runs.create_run(session, repo.get_plan(session, "alpha"), 1, [("pretrain", 100)], "/tmp/r").id

    def shown(ref):
        result = cli("monitor", ref, "--json")
        assert result.exit_code == 0, result.output
        return json.loads(result.stdout)["run"]

    assert shown("alpha") == newest == 3
    assert shown("1") == first and shown("run-1") == first  # digits name a run first
    assert shown("5") == other  # no run 5: plan 5's newest run
    no_target = cli("monitor", "--alert-thresholds", "gradient_norm:10,memory_usage:90", "--json")
    assert no_target.exit_code == 0, no_target.output
    assert json.loads(no_target.stdout)["run"] == newest  # no target: the store's newest run


def test_unknown_targets_fail_with_one_line(cli, store):
    one_error_line(cli("monitor", "--once"), "no run yet; start one with: muse plan run PLAN")
    one_error_line(cli("monitor", "99"), "no run or plan '99'")
    one_error_line(cli("monitor", "run-00099"), "no run 'run-00099'")
    one_error_line(cli("monitor", "nosuch"), "no plan 'nosuch'")
    with store.write() as session:
        repo.create_plan(session, spec_from_dict({**TINY, "name": "fresh"}))
    one_error_line(cli("monitor", "fresh", "--once"), "plan 'fresh' has no run yet")


@pytest.mark.parametrize("text, named", [
    ("gradient_norm:ten", "'gradient_norm:ten'"),
    ("speed:3", "'speed:3'"),
    ("gradient_norm", "'gradient_norm'"),
    ("loss:1,memory_usage:150", "'memory_usage:150'"),
    ("loss:-1", "'loss:-1'"),
])
def test_bad_alert_thresholds_fail_naming_the_bad_part(cli, text, named):
    one_error_line(cli("monitor", "1", "--once", "--alert-thresholds", text), named)


def test_parse_thresholds():
    assert dashboard.parse_thresholds("gradient_norm:10, memory_usage:90%,loss_spike:3,") == {
        "gradient_norm": 10.0, "memory_usage": 90.0, "loss_spike": 3.0}


def test_a_too_short_update_interval_is_refused(cli):
    one_error_line(cli("monitor", "1", "--update-interval", "0.1"), "--update-interval must be at least 0.2")


# ---- ETA, rules and sparklines on hand-made data -------------------------------------------

def test_eta_from_the_step_rate_between_flushes(memory_store):
    # 4 steps per flush, a flush every 2 s: 2 steps/s; 60 steps to go → 30 s
    run_id = hand_run(memory_store, done=40, total=100)
    stage = hand_snapshot(memory_store, run_id)["stages"][0]
    assert stage["steps_per_s"] == pytest.approx(2.0, rel=1e-3)
    assert stage["eta_s"] == pytest.approx(30.0, rel=1e-3)


def test_step_rate_of_points_written_one_by_one():
    points = [(s, T0 + timedelta(seconds=0.5 * s)) for s in range(1, 31)]
    assert dashboard.step_rate(points) == pytest.approx(2.0)
    assert dashboard.step_rate(points[:1]) is None
    batch = [(s, T0 + timedelta(microseconds=10 * s)) for s in range(1, 9)]  # one flush: no rate yet
    assert dashboard.step_rate(batch) is None


def test_a_finished_or_dead_run_has_no_eta(memory_store):
    run_id = hand_run(memory_store, done=40, total=100)
    with memory_store.write() as session:
        runs.get_run(session, run_id).pid = 2**22 + 12345  # no such process: interrupted
    snap = hand_snapshot(memory_store, run_id)
    assert snap["status"] == "interrupted" and snap["finished"]
    assert snap["stages"][0]["status"] == "interrupted" and snap["stages"][0]["eta_s"] is None


def test_loss_spike_plateau_and_memory_rules(memory_store):
    calm = [2.0 + 0.01 * (i % 2) for i in range(39)]
    run_id = hand_run(memory_store, done=40, losses=calm + [3.0])
    snap = hand_snapshot(memory_store, run_id, thresholds={"loss_spike": 3, "plateau": 15, "memory_usage": 50},
                         host={"ram_total_gib": 3.0})
    rules = {r["rule"]: r for r in snap["rules"]}
    assert rules["loss_spike"]["over"] and rules["loss_spike"]["value"] > 50
    assert rules["plateau"]["over"]  # the mean loss did not improve by 1% over 15 steps
    assert rules["memory_usage"]["value"] == pytest.approx(100 * 2.0 / 3.0) and rules["memory_usage"]["over"]
    assert {a["rule"] for a in snap["alerts"]} == {"loss_spike", "plateau", "memory_usage"}
    text = _plain(dashboard.render(snap))
    assert "loss_spike 3:" in text and "OVER" in text and "memory 2.00 GiB (67%)" in text


def test_sparkline():
    assert dashboard.sparkline([1, 2, 3, 4, 5, 6, 7, 8]) == "▁▂▃▄▅▆▇█"
    assert dashboard.sparkline([2.0, 2.0]) == "▄▄"
    assert dashboard.sparkline([1.0, math.nan, 2.0]) == "▁×█"
    assert len(dashboard.sparkline(list(range(200)))) == dashboard.SPARK_POINTS


def test_render_shows_events_and_plan_rewrites(memory_store):
    run_id = hand_run(memory_store, done=8)
    with memory_store.write() as session:
        run = runs.get_run(session, run_id)
        plan = repo.get_plan(session, run.plan_id)
        repo.add_revision(session, plan, spec_from_dict({**TINY, "name": "hand"}), "recovery",
                          "gradient explosion at step 8: clip 1.0")
        runs.add_event(session, run, "gradient norm 86000 at step 8", kind="fault", severity="error", step=8)
    snap = hand_snapshot(memory_store, run_id)
    assert snap["events"][-1]["kind"] == "fault"
    assert [(r["revision"], r["author"], r["reason"]) for r in snap["rewrites"]] == [
        (2, "recovery", "gradient explosion at step 8: clip 1.0")]
    text = _plain(dashboard.render(snap))
    assert "[fault] gradient norm 86000 at step 8" in text and "r2" in text and "clip 1.0" in text
    assert "8/100" in text and "running" in text


def test_an_rl_stage_shows_its_reward_and_what_its_rollouts_cost(memory_store):
    run_id = hand_run(memory_store, done=4)
    with memory_store.write() as session:
        stage = runs.stage_runs(session, runs.get_run(session, run_id))[0]
        session.add_all(MetricPoint(run_id=run_id, stage_run_id=stage.id, step=4, name=name, value=value,
                                    time=T0 + timedelta(seconds=9)) for name, value in (("reward", 0.375),
                                                                                        ("rollout_s", 0.84)))
    snap = hand_snapshot(memory_store, run_id)
    assert snap["stages"][0]["metrics"]["reward"] == 0.375
    assert "reward 0.375 · rollout 0.84 s a micro-batch" in _plain(dashboard.render(snap))
    plain = hand_snapshot(memory_store, hand_run(memory_store, "pre", done=4))  # a stage without: no such line
    assert "reward" not in _plain(dashboard.render(plain))


def _plain(renderable) -> str:
    from rich.console import Console

    console = Console(width=120, record=True, file=open(os.devnull, "w"))
    console.print(renderable)
    return console.export_text()


# ---- no torch; a dashboard beside a writing run --------------------------------------------

def test_monitor_does_not_import_torch(tmp_path):
    url = f"sqlite:///{tmp_path / 'muse.db'}"
    opened = Store(url)
    hand_run(opened, done=12)
    with opened.write() as session:
        runs.get_run(session, 1).status = "completed"
    opened.close()
    commands = [["--db", url, *args] for args in (["monitor", "1", "--once"], ["monitor", "hand", "--json"],
                                                  ["monitor", "1", "--update-interval", "0.2"])]
    assert heavy_imports(tmp_path, commands) == "none"


def test_polling_a_run_while_it_writes(cli, tmp_path, muse_home):
    plan_file = tmp_path / "tiny.yaml"
    plan_file.write_text(yaml.safe_dump(TINY))
    assert cli("plan", "import", plan_file).exit_code == 0
    writer = subprocess.Popen([sys.executable, "-m", "muse_plan", "plan", "run", "tiny"], cwd=ROOT,
                              env={**os.environ, "MUSE_HOME": str(muse_home)},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen, polls = [], 0
    try:
        while True:
            done = writer.poll() is not None
            polls += 1
            if polls % 5 == 0:  # now and then through the CLI, as a script would
                result = cli("monitor", "tiny", "--json")
                if result.exit_code == 0:
                    seen.append(json.loads(result.stdout))
                else:
                    assert "has no run yet" in result.output, result.output
            else:
                opened = Store()  # a fresh store each time, like a separate `muse monitor`
                try:
                    with opened.read() as session:
                        run = dashboard.resolve_run(session, "tiny")
                        seen.append(dashboard.snapshot(session, run))
                except dashboard.NoRunYet:
                    pass
                finally:
                    opened.close()
            if done:
                break
            time.sleep(0.2)
    finally:
        if writer.poll() is None:
            writer.kill()
        output = writer.communicate()[0]
    assert writer.returncode == 0, output
    assert "locked" not in output
    final = seen[-1]
    assert final["status"] == "completed" and final["loss_points"] == 30 == final["stages"][0]["step"]
    steps = [s["stages"][0]["step"] for s in seen]
    assert steps == sorted(steps)  # the dashboard never sees the run go backwards


# ---- whole-stage curves ------------------------------------------------------------------------

def test_whole_stage_curves_are_bucket_means_over_every_step_on_one_axis(store):
    losses = [float(s) for s in range(1, 41)]  # step s has loss s: a bucket's mean is its middle
    run_id = hand_run(store, done=40, losses=losses)
    with store.write() as session:
        stage = runs.stage_runs(session, runs.get_run(session, run_id))[0]
        session.add_all(MetricPoint(run_id=run_id, stage_run_id=stage.id, step=s, name="val_loss", value=10.0 + s,
                                    time=T0) for s in (10, 20))
    with store.read() as session:
        means = dashboard.bucketed(session, run_id, stage.id, "loss", (1, 40), points=8)  # 5 steps a bucket
        sparse = dashboard.bucketed(session, run_id, stage.id, "val_loss", (1, 40), points=8)
    assert means == [3.0, 8.0, 13.0, 18.0, 23.0, 28.0, 33.0, 38.0]
    assert sparse == [None, 20.0, None, 30.0, None, None, None, None]  # steps 10 and 20, on the loss's axis
    snap = hand_snapshot(store, run_id)
    assert snap["whole"]["steps"] == [1, 40] and snap["whole"]["loss"] == losses  # 40 steps fit 60 buckets
    assert set(snap["whole"]) == {"steps", "loss", "val_loss", "grad_norm", "tokens_per_s"}  # no lr written
    smoothed = hand_snapshot(store, run_id, smooth=0.5)["whole"]["loss"]
    assert smoothed[:3] == [1.0, 1.5, 2.25]  # TensorBoard's EMA: 0.5 of the average, 0.5 of the point
    text = _plain(dashboard.render(snap))
    assert "whole stage pretrain: steps 1–40" in text and "val loss" in text and "\nlr " not in text
    with store.write() as session:  # eval_at_start: the starting weights' score at step 0, on the axis too
        session.add(MetricPoint(run_id=run_id, stage_run_id=stage.id, step=0, name="val_loss", value=50.0, time=T0))
    whole = hand_snapshot(store, run_id)["whole"]
    assert whole["steps"] == [0, 40] and whole["val_loss"][0] == 50.0 and whole["loss"][0] is None


def test_a_chart_puts_the_lowest_value_at_the_bottom_and_the_highest_at_the_top():
    top, bottom = dashboard.chart([0.0, 1.0, None, 2.0, float("nan")], rows=2)
    assert bottom == "▁█ █×"  # the lowest one level up; an empty bucket blank; × a non-finite value
    assert top == " ▁ █ "  # the middle value just over the bottom line, the highest filling the top


def test_bad_smoothing_fails_in_one_line(cli, store):
    one_error_line(cli("monitor", "--smooth", "1"), "--smooth must be at least 0 and below 1, not 1")


def test_compare_overlays_runs_of_one_plan_on_common_axes(cli, store):
    first = hand_run(store, done=40, losses=[5.0] * 40)
    with store.write() as session:  # a second run of the same plan, further along, lower
        plan = repo.get_plan(session, "hand")
        run = runs.create_run(session, plan, 1, [("pretrain", 100)], "/tmp/muse-runs")
        stage = runs.stage_runs(session, run)[0]
        stage.status, stage.step, stage.started_at = "running", 60, T0
        session.add_all(MetricPoint(run_id=run.id, stage_run_id=stage.id, step=s, name="loss", value=3.0, time=T0)
                        for s in range(1, 61))
        second = run.id
    with store.read() as session:
        data = dashboard.compare(session, [runs.get_run(session, first), runs.get_run(session, second)])
    assert data["stage"] == "pretrain" and data["steps"] == [1, 60]  # the furthest run sets the axis
    loss = data["curves"]["loss"]
    assert loss[first] == [5.0] * 40 + [None] * 20 and loss[second] == [3.0] * 60
    assert list(data["curves"]["grad_norm"]) == [first]  # only the first run recorded it
    result = cli("monitor", "--compare", str(first), str(second))
    assert result.exit_code == 0, result.output
    assert "compare plan hand · stage pretrain" in result.output and f"run {second}" in result.output
    assert json.loads(cli("monitor", "--compare", str(first), str(second), "--json").output)["steps"] == [1, 60]


def test_compare_refuses_runs_of_several_plans_and_a_single_run(cli, store):
    a = hand_run(store, "one")
    b = hand_run(store, "two")
    one_error_line(cli("monitor", "--compare", str(a), str(b)), "--compare overlays runs of one plan")
    one_error_line(cli("monitor", "--compare", str(a)), "--compare takes two or more runs")
    one_error_line(cli("monitor", str(a), str(b)), "one run or plan at a time")
