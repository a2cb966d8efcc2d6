"""``muse report``: stage-local steps on the global axis, where the markers
stand, label stacking, a real tiny run drawn to PNG + HTML, and the errors."""

from __future__ import annotations

import base64
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from html import escape
from types import SimpleNamespace

import pytest
from matplotlib import image as mpimg

from conftest import ROOT, one_error_line
from muse_plan import report
from muse_plan.plan.io import spec_from_dict
from muse_plan.store import repo, runs
from muse_plan.store.db import Store
from test_runner import TINY, write_plan

T0 = datetime(2026, 1, 1, tzinfo=timezone.utc)
TWO_STAGES = [{"name": "pretrain", "kind": "pretrain", "steps": 30, "checkpoint_every": 10},
              {"name": "anneal", "kind": "continue", "steps": 10, "checkpoint_every": 5}]
EVENTS = [("fault", 12, "loss is NaN at step 12 (NonFiniteLoss)"),
          ("alert", 20, "gradient norm 41.3 is 8.2x its running median"),
          ("rewrite", 25, "revision 2 by recovery: lr 0.01 -> 0.005")]


# ---- pure: positions ----------------------------------------------------------------------

def event(kind: str, stage: int | None, step: int | None, message: str, minutes: int = 1) -> SimpleNamespace:
    return SimpleNamespace(kind=kind, stage_run_id=stage, step=step, message=message,
                           time=T0 + timedelta(minutes=minutes))


def test_a_stage_local_step_lands_after_the_stages_before_it() -> None:
    spans = report.lay_out([(1, "pretrain", 30), (2, "anneal", 10)])
    assert [(s.start, s.end) for s in spans] == [(0, 30), (30, 40)]
    assert report.global_step(spans, 2, 5) == 35
    assert report.global_step(spans, 1, 12) == 12
    assert report.global_step(spans, 2, None) == 30  # no step: the stage's start


def test_markers_stand_at_their_global_steps() -> None:
    spans = report.lay_out([(1, "pretrain", 30, "completed", T0),
                            (2, "anneal", 10, "failed", T0 + timedelta(minutes=5))])
    events = [
        event("info", None, None, "run started"),
        event("rewrite", 1, 25, "revision 2 by recovery"),
        event("fault", 1, 12, "loss is NaN"),
        event("alert", 1, 20, "gradient norm spike"),
        event("recovery", 2, 5, "resumed from step-00000020"),
        event("alert", 2, None, "throughput fell"),  # no step: the stage's start
        event("fault", None, 7, "out of memory", minutes=9),  # no stage: the one running then
    ]
    found = report.markers(spans, events)
    assert [(m.x, m.kind) for m in found] == [(12, "fault"), (20, "alert"), (25, "rewrite"), (30, "alert"),
                                             (35, "recovery"), (37, "fault")]
    assert found[0] == (12, "fault", "loss is NaN")
    long = report.markers(spans, [event("fault", 1, 3, "x" * 80)])
    assert len(long[0].label) == report.LABEL_CHARS and long[0].label.endswith("…")


def test_labels_stack_on_rows_without_overlapping() -> None:
    from muse_plan.report.plot import stack

    # two wide labels 10 px apart share no row; a third far away goes back to the first row
    assert stack([0, 10, 500], [[100], [100], [100]], 1000) == [(0, False, 0), (1, False, 0), (0, False, 0)]
    # near the right edge a label reads leftwards
    assert stack([950], [[100]], 1000) == [(0, True, 0)]
    # no room for a long label: its shorter candidate is taken
    assert stack([200, 150], [[100, 20], [100, 20]], 1000, rows=1) == [(0, False, 0), (0, False, 1)]
    # no room even for the shortest: None
    assert stack([0, 1, 2], [[100]] * 3, 1000, rows=2) is None


# ---- a run in the store ---------------------------------------------------------------------

def stored_run(store: Store, stages=TWO_STAGES, with_events: bool = True) -> int:
    """A two-stage run written straight to the store (no training): deterministic metrics."""
    spec = spec_from_dict({**TINY, "stages": stages}, "test")
    with store.write() as session:
        plan, _ = repo.create_plan(session, spec)
        run = runs.create_run(session, plan, 1, [(s["name"], s["steps"]) for s in stages], "/tmp/runs")
        runs.add_event(session, run, "run started under revision 1 on 1 CPU process(es)")
        for sr, stage in zip(runs.stage_runs(session, run), stages):
            sr.status, sr.step = "completed", stage["steps"]
            points = [(step, name, value) for step in range(1, stage["steps"] + 1) for name, value in
                      (("loss", 5.0 / step), ("grad_norm", 1.0 + step % 3), ("lr", 0.01), ("tokens_per_s", 1e4),
                       ("memory_gib", 0.3 + step / 1000))]
            points += [(stage["steps"], "val_loss", 2.0), (stage["steps"], "unigram_val_loss", 3.5)]
            runs.add_metrics(session, run.id, sr.id, points)
            if with_events and sr.position == 1:
                runs.add_event(session, run, "resumed", kind="recovery", stage_run_id=sr.id, step=5)
        run.status = "completed"
        return run.id


def test_build_lays_stages_end_to_end_and_prices_their_memory(store) -> None:
    run_id = stored_run(store)
    with store.read() as session:
        data = report.build(session, str(run_id))
    assert [(s.name, s.start, s.length) for s in data.spans] == [("pretrain", 0, 30), ("anneal", 30, 10)]
    first, second = data.series["loss"]
    assert (first[0][0], first[-1][0], second[0][0], second[-1][0]) == (1, 30, 31, 40)
    assert data.markers == [(35, "recovery", "resumed")]
    assert (data.device, data.processes) == ("cpu", 1)
    assert [m.stage for m in data.memory] == ["pretrain", "anneal"]
    assert all(m.predicted_gib and 0 < m.predicted_gib < 0.1 for m in data.memory)  # a 2-layer d=32 model
    assert data.memory[0].measured_gib == pytest.approx(0.33)
    assert data.final[1]["unigram_val_loss"] == 3.5


def test_a_plan_name_reports_its_newest_run(store) -> None:
    stored_run(store)
    with store.write() as session:
        plan = repo.get_plan(session, "tiny")
        runs.create_run(session, plan, 1, [("pretrain", 30), ("anneal", 10)], "/tmp/runs")
    with store.read() as session:
        assert report.build(session, "tiny").run_id == 2
        assert report.build(session, "run-00001").run_id == 1


def test_a_stage_the_memory_model_cant_price_says_so(store) -> None:
    stages = [TWO_STAGES[0], {"name": "grow", "kind": "grow", "steps": 1}]
    stored_run(store, stages, with_events=False)
    with store.read() as session:
        data = report.build(session, "1")
    assert data.memory[1].predicted_gib is None and data.memory[1].note.startswith("not priced")


# ---- end to end through the CLI ---------------------------------------------------------

def test_report_of_a_real_tiny_run_writes_png_and_html(cli, tmp_path) -> None:
    assert cli("plan", "import", write_plan(tmp_path)).exit_code == 0
    assert cli("plan", "run", "tiny").exit_code == 0
    with Store().write() as session:
        run = runs.get_run(session, 1)
        stage = runs.stage_runs(session, run)[0]
        for kind, step, message in EVENTS:
            runs.add_event(session, run, message, kind=kind, severity="warning", stage_run_id=stage.id, step=step)
    out = tmp_path / "out"
    result = cli("report", "1", "--output", out)
    assert result.exit_code == 0, result.output
    png, page = out / "run-1.png", out / "run-1.html"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert mpimg.imread(png).shape[:2] == (1000, 1600)
    html = page.read_text()
    assert "data:image/png;base64," + base64.b64encode(png.read_bytes()).decode() in html
    for _, _, message in EVENTS:
        assert escape(message) in html  # escaped: "->" is stored as "-&gt;"
    text = html.replace(base64.b64encode(png.read_bytes()).decode(), "")  # "http" may occur in base64 by chance
    assert "<script" not in text and "http" not in text
    with Store().read() as session:
        found = report.build(session, "1").markers
    # the monitor may add its own alerts on a busy machine; ours stand where they were put
    assert {(m.x, m.kind) for m in found} >= {(12, "fault"), (20, "alert"), (25, "rewrite")}


def test_output_names_a_file_or_a_folder(cli, tmp_path, store) -> None:
    stored_run(store)
    assert cli("report", "1", "--output", tmp_path / "a" / "pic.png").exit_code == 0
    assert (tmp_path / "a" / "pic.png").exists() and (tmp_path / "a" / "pic.html").exists()
    assert cli("report", "tiny", "-o", tmp_path / "b" / "page.html").exit_code == 0
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == ["page.html", "page.png"]


def test_an_unknown_run_is_one_error_line(cli, tmp_path) -> None:
    one_error_line(cli("report", "7", "--output", tmp_path), "no run or plan '7'")
    one_error_line(cli("report", "run-00007", "--output", tmp_path), "no run 'run-00007'")
    assert not any(tmp_path.rglob("*.png"))


def test_an_unwritable_output_is_one_error_line(cli, tmp_path, store) -> None:
    stored_run(store)
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    one_error_line(cli("report", "1", "--output", blocker / "report"), "can't write the report")
    one_error_line(cli("report", "1", "--output", tmp_path / "pic.jpg"), "name a .png or .html file")
    assert not any(tmp_path.rglob("*.png"))


def test_help_does_not_import_matplotlib() -> None:
    code = ("import sys\nfrom muse_plan.cli.main import app\n"
            "try:\n    app(['--help'])\nexcept SystemExit:\n    pass\n"
            "heavy = [m for m in ('matplotlib', 'torch') if m in sys.modules]\n"
            "assert not heavy, heavy\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
