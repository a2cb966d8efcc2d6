"""The store on both backends, SQLite and PostgreSQL (an embedded server, see
conftest.py): plans through the CLI, migrations, runs and their metrics and
events, concurrent writers, and a tiny training run recorded in PostgreSQL."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from sqlalchemy import inspect, text
from sqlalchemy.exc import IntegrityError

from muse_plan import api
from muse_plan.errors import Conflict, NotFound, StoreError
from muse_plan.store import db, repo, runs
from muse_plan.store.db import Store
from muse_plan.store.models import Event, MetricPoint, PlanRevision, Run, StageRun
from tests.conftest import ROOT, TINY, one_error_line, pretrain, write_plan

def plan_file(folder: Path, **changes) -> Path:
    """The tiny plan at 8 steps (a second or two of training)."""
    changes.setdefault("stages", pretrain(8, 4))
    changes.setdefault("training", {**TINY["training"], "grad_accum": 1, "warmup_steps": 2})
    return write_plan(folder, **changes)


def ok(result):
    assert result.exit_code == 0, result.output
    return result


def as_utc(moment: datetime) -> datetime:
    """A stored time as the code reads it: naive means UTC (what SQLite hands back)."""
    return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)


# ---- plans through the CLI -------------------------------------------------------------

def test_plans_are_created_listed_shown_edited_and_deleted(cli, backend_url, tmp_path) -> None:
    db_ = ("--db", backend_url)
    imported = json.loads(ok(cli(*db_, "plan", "import", plan_file(tmp_path), "--json")).output)
    assert (imported["name"], imported["revision"], imported["created"]) == ("tiny", 1, True)
    ok(cli(*db_, "plan", "create", "--name", "other", "--compute-budget", "cpu", "--model-scale", "350M"))
    duplicate = cli(*db_, "plan", "create", "--name", "other", "--compute-budget", "cpu")
    assert duplicate.exit_code == 2 and "exists" in duplicate.output

    listed = json.loads(ok(cli(*db_, "plan", "list", "--json")).output)
    assert [(p["name"], p["revision"]) for p in listed] == [("tiny", 1), ("other", 1)]

    ok(cli(*db_, "plan", "edit", "tiny", "--set", "training.lr=0.02", "--reason", "faster"))
    ok(cli(*db_, "plan", "edit", "tiny", "--set", "description=two edits"))
    unchanged = ok(cli(*db_, "plan", "edit", "tiny", "--set", "description=two edits"))
    assert "no change" in unchanged.output

    shown = json.loads(ok(cli(*db_, "plan", "show", "tiny", "--json")).output)
    assert shown["head"] == 3 and shown["spec"]["description"] == "two edits"
    assert shown["spec"]["training"]["lr"] == 0.02
    first = json.loads(ok(cli(*db_, "plan", "show", "tiny", "--revision", "1", "--json")).output)
    assert first["spec"]["training"]["lr"] == 0.01 and first["revision"]["reason"].startswith("imported")

    history = json.loads(ok(cli(*db_, "plan", "history", "tiny", "--json")).output)
    assert [(h["revision"], h["author"]) for h in history] == [(1, "user"), (2, "user"), (3, "user")]
    assert history[1]["reason"] == "faster"
    assert [c["path"] for c in history[1]["changes"]] == ["training.lr"]
    assert all(as_utc(datetime.fromisoformat(h["created_at"])) <= datetime.now(timezone.utc) for h in history)
    assert json.loads(ok(cli(*db_, "plan", "diff", "tiny", "1", "3", "--json")).output)

    ok(cli(*db_, "plan", "delete", "other", "--yes"))
    assert [p["name"] for p in json.loads(ok(cli(*db_, "plan", "list", "--json")).output)] == ["tiny"]
    missing = cli(*db_, "plan", "show", "other")
    assert missing.exit_code == 2 and "no plan 'other'" in missing.output


def test_the_database_url_can_come_from_the_environment(cli, backend_url, tmp_path) -> None:
    env = {"MUSE_DB_URL": backend_url}
    ok(cli("plan", "import", plan_file(tmp_path), env=env))
    assert json.loads(ok(cli("plan", "list", "--json", env=env)).output)[0]["name"] == "tiny"
    store = Store(backend_url)
    try:
        assert api.show(store, "tiny").plan.head == 1
    finally:
        store.close()


def test_the_store_api_keeps_its_rules(backend_url) -> None:
    store = Store(backend_url)
    try:
        api.create(store, name="alpha", compute_budget="cpu")
        with pytest.raises(Conflict, match="exists"):
            api.create(store, name="alpha", compute_budget="cpu")
        api.edit(store, "alpha", ["description=one"])
        with pytest.raises(NotFound, match="did you mean 'alpha'"):
            api.show(store, "alpah")
        with pytest.raises(RuntimeError):  # a write that fails leaves nothing
            with store.write() as session:
                plan = repo.get_plan(session, "alpha")
                repo.add_revision(session, plan, repo.spec_of(repo.get_revision(session, plan)), "user", "x")
                raise RuntimeError("crash mid-transaction")
        with store.read() as session:
            plan = repo.get_plan(session, "alpha")
            assert plan.head == 2 and [r.number for r in repo.list_revisions(session, plan)] == [1, 2]
        # a revision number is unique per plan, in the database itself (muse may say so as a StoreError)
        with pytest.raises((IntegrityError, StoreError)):
            with store.write() as session:
                session.add(PlanRevision(plan_id=plan.id, number=1, author="user", reason="dup", spec_json="{}"))
        with store.read() as session:
            assert len(repo.list_revisions(session, repo.get_plan(session, "alpha"))) == 2
    finally:
        store.close()


@pytest.mark.postgres
def test_a_postgres_that_cannot_be_reached_is_one_error_line(cli, postgres_server, tmp_path) -> None:
    """No server at the socket, or no such database on the server: `error: …`, exit 2, no traceback."""
    for url in (f"postgresql+psycopg://postgres@/muse?host={tmp_path / 'no-server-here'}",
                postgres_server.url("no_such_database")):
        result = cli("--db", url, "plan", "list")
        assert result.exception is None or isinstance(result.exception, SystemExit), \
            f"{url}: raised {result.exception!r}"
        one_error_line(result, "can't be used")


# ---- migrations ------------------------------------------------------------------------

def test_a_new_database_is_created_at_the_newest_schema_and_then_found_current(backend_url) -> None:
    engine = db.make_engine(backend_url)
    try:
        assert db.migrate(engine) == 0
        tables = set(inspect(engine).get_table_names())
        assert {"schema_version", "plans", "plan_revisions", "runs", "stage_runs", "metric_points",
                "events"} <= tables
        assert db.migrate(engine) == db.SCHEMA_VERSION  # a second open finds it current
        with engine.connect() as conn:
            assert conn.execute(text("SELECT max(version) FROM schema_version")).scalar() == db.SCHEMA_VERSION
        store = Store(backend_url)  # and muse opens it as it is
        store.close()
    finally:
        engine.dispose()


def test_migrations_run_in_order_in_one_transaction(backend_url) -> None:
    engine = db.make_engine(backend_url)
    base = db.SCHEMA_VERSION
    try:
        db.migrate(engine)

        def add_note(conn) -> None:
            conn.exec_driver_sql("ALTER TABLE plans ADD COLUMN note TEXT")

        def broken(conn) -> None:
            raise RuntimeError("migration failed")

        with pytest.raises(RuntimeError, match="migration failed"):
            db.migrate(engine, migrations={base + 1: add_note, base + 2: broken}, latest=base + 2)
        # nothing of a failed upgrade stays: not the column, not the version
        assert "note" not in {c["name"] for c in inspect(engine).get_columns("plans")}
        assert db.migrate(engine, migrations={}, latest=base) == base

        ran = []
        migrations = {base + 1: lambda conn: (add_note(conn), ran.append(base + 1)),
                      base + 2: lambda conn: ran.append(base + 2)}
        assert db.migrate(engine, migrations=migrations, latest=base + 2) == base
        assert ran == [base + 1, base + 2]
        assert "note" in {c["name"] for c in inspect(engine).get_columns("plans")}
        assert db.migrate(engine, migrations=migrations, latest=base + 2) == base + 2 and len(ran) == 2
        with pytest.raises(StoreError, match="newer than this muse knows"):
            db.migrate(engine, latest=base)
    finally:
        engine.dispose()


# ---- runs, stage runs, metric points, events -------------------------------------------

def test_runs_metrics_and_events_roundtrip(backend_url, tmp_path) -> None:
    store = Store(backend_url)
    try:
        before = datetime.now(timezone.utc) - timedelta(seconds=5)
        api.import_file(store, str(plan_file(tmp_path)))
        with store.write() as session:
            plan = repo.get_plan(session, "tiny")
            run = runs.create_run(session, plan, 1, [("pretrain", 4), ("sft", 2)], str(tmp_path / "runs"))
            run_id = run.id
            first, second = runs.stage_runs(session, run)
            first.status, first.step = "running", 4
            session.add(first)
            runs.add_metrics(session, run_id, first.id, [(1, "loss", 5.5), (2, "loss", 4.25),
                                                         (3, "loss", 3.0), (4, "loss", 2.5),
                                                         (2, "val_loss", 4.5), (4, "val_loss", 3.0)])
            runs.add_event(session, run, "hello", stage_run_id=first.id, step=2)
            runs.add_event(session, run, "spike", kind="alert", severity="warning", stage_run_id=first.id,
                           step=3, data={"grad_norm": 12.5, "rule": "gradient_norm"})
            first_id, second_id = first.id, second.id

        with store.read() as session:
            run = runs.get_run(session, f"run-{run_id}")
            assert (run.status, run.revision, run.run_dir) == ("running", 1, str(tmp_path / "runs" / f"run-{run_id:05d}"))
            assert runs.is_alive(run) and runs.shown_status(run) == "running"
            assert [(s.position, s.name, s.total_steps) for s in runs.stage_runs(session, run)] == \
                [(0, "pretrain", 4), (1, "sft", 2)]
            assert runs.metric_series(session, run_id, "loss") == [(1, 5.5), (2, 4.25), (3, 3.0), (4, 2.5)]
            assert runs.metric_series(session, run_id, "val_loss", first_id) == [(2, 4.5), (4, 3.0)]
            assert runs.metric_series(session, run_id, "loss", second_id) == []
            assert runs.last_metrics(session, first_id) == {"loss": (4, 2.5), "val_loss": (4, 3.0)}
            stored = runs.events(session, run_id)
            assert [(e.kind, e.severity, e.message, e.step) for e in stored] == \
                [("info", "info", "hello", 2), ("alert", "warning", "spike", 3)]
            assert json.loads(stored[1].data_json) == {"grad_norm": 12.5, "rule": "gradient_norm"}
            assert [r.id for r, p in runs.list_runs(session)] == [run_id]
            assert runs.latest_unfinished(session, repo.get_plan(session, "tiny")).id == run_id
            # times are UTC on the way back (naive, as SQLite gives them, means UTC)
            assert before <= as_utc(run.started_at) <= datetime.now(timezone.utc)
            assert before <= as_utc(stored[0].time) <= datetime.now(timezone.utc)

        with store.write() as session:  # a resume drops the points past its checkpoint
            assert runs.drop_metrics_after(session, first_id, 2) == 3
            run = runs.get_run(session, run_id)
            run.status = "completed"
            session.add(run)
        with store.read() as session:
            assert runs.metric_series(session, run_id, "loss") == [(1, 5.5), (2, 4.25)]
            assert runs.latest_unfinished(session, repo.get_plan(session, "tiny")) is None
            assert repo.count_runs(session, repo.get_plan(session, "tiny"), "completed") == 1

        api.delete(store, "tiny")  # the plan takes everything hanging off it along
        with store.read() as session:
            for table in (PlanRevision, Run, StageRun, MetricPoint, Event):
                assert session.execute(text(f"SELECT count(*) FROM {table.__tablename__}")).scalar() == 0
    finally:
        store.close()


def test_times_are_utc_whatever_the_servers_time_zone(backend_url, tmp_path) -> None:
    """A PostgreSQL server in another time zone (a team's server, set up where it stands)
    must not shift the stored times: muse reads a naive time as UTC."""
    if backend_url.startswith("postgresql"):
        engine = db.make_engine(backend_url)
        with engine.connect() as conn:
            name = conn.execute(text("SELECT current_database()")).scalar()
            conn.execute(text(f'ALTER DATABASE "{name}" SET timezone TO \'America/Los_Angeles\''))
            conn.commit()
        engine.dispose()
    store = Store(backend_url)
    try:
        before = datetime.now(timezone.utc)
        stored = api.import_file(store, str(plan_file(tmp_path)))
        after = datetime.now(timezone.utc)
        assert before <= as_utc(stored.revision.created_at) <= after  # as written
        with store.read() as session:
            revision = repo.get_revision(session, repo.get_plan(session, "tiny"))
        slack = timedelta(seconds=2)  # the database may round to microseconds
        assert before - slack <= as_utc(revision.created_at) <= after + slack, \
            f"stored {revision.created_at!r}, written between {before} and {after}"
    finally:
        store.close()


# ---- concurrent writers ----------------------------------------------------------------

PROCESSES, EDITS = 8, 20

# The writers: a fresh interpreter imports muse and runs one read (so the imports an edit
# needs are done once), then forks PROCESSES processes; they wait for each other, then each
# runs `muse plan edit` EDITS times, in-process, through the command `muse` runs (built
# once here rather than at each of the 160 starts). Each process has its own connections;
# it exits 0 only if every one of its edits exited 0. Prints the exit codes, as JSON.
WRITERS = r"""
import contextlib, io, json, multiprocessing, os, sys, traceback
import typer.main
from muse_plan.cli.main import app

url, plan, processes, edits = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
command = typer.main.get_command(app)


def muse(*args):
    try:
        return command.main(["--db", url, *args], prog_name="muse", standalone_mode=False) or 0
    except Exception:  # what `muse` would show as a traceback
        traceback.print_exc()
        return 1


def writer(worker, start):
    sys.stdout = open(os.devnull, "w")  # the tables of changes
    start.wait(60)
    failed = 0
    for j in range(edits):
        value = f"p{worker}-e{j}"
        code = muse("plan", "edit", plan, "--set", f"description={value}", "--reason", value)
        if code:
            failed += 1
            print(f"process {worker}, edit {j}: exit {code}", file=sys.stderr, flush=True)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    with contextlib.redirect_stdout(io.StringIO()):
        assert muse("plan", "show", plan, "--json") == 0
    context = multiprocessing.get_context("fork")
    start = context.Barrier(processes)  # all started, then all go at once
    writers = [context.Process(target=writer, args=(i, start)) for i in range(processes)]
    for w in writers:
        w.start()
    for w in writers:
        w.join(300)
    print(json.dumps([w.exitcode for w in writers]))
"""


def test_concurrent_edits_give_one_revision_each_numbered_without_gaps(cli, backend_url, tmp_path,
                                                                       muse_home) -> None:
    """8 processes × 20 `muse plan edit` on one plan at once: 160 new revisions, 2 to 161,
    every edit's value in one of them, each process's edits in its own order, every exit 0."""
    ok(cli("--db", backend_url, "plan", "import", plan_file(tmp_path, name="shared")))
    env = {"MUSE_HOME": str(muse_home), "PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", WRITERS, backend_url, "shared", str(PROCESSES), str(EDITS)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    failed = [line for line in done.stderr.splitlines() if line.startswith("process ")]
    report = (f"exit codes {done.stdout.strip()}; {len(failed)} of {PROCESSES * EDITS} edits failed; "
              f"the first error:\n{done.stderr.split('process ')[0][-4000:]}")
    assert done.returncode == 0 and json.loads(done.stdout) == [0] * PROCESSES, report

    store = Store(backend_url)
    try:
        with store.read() as session:
            plan = repo.get_plan(session, "shared")
            revisions = repo.list_revisions(session, plan)
    finally:
        store.close()
    total = PROCESSES * EDITS
    assert plan.head == total + 1
    assert [r.number for r in revisions] == list(range(1, total + 2))
    values = [json.loads(r.spec_json).get("description") for r in revisions[1:]]
    assert sorted(values) == sorted(f"p{i}-e{j}" for i in range(PROCESSES) for j in range(EDITS))
    assert [r.reason for r in revisions[1:]] == values
    for i in range(PROCESSES):  # one process's edits land in the order it made them
        mine = [int(v.split("-e")[1]) for v in values if v.startswith(f"p{i}-")]
        assert mine == list(range(EDITS))
    switches = sum(a.split("-")[0] != b.split("-")[0] for a, b in zip(values, values[1:]))
    assert switches > PROCESSES - 1  # the processes ran at the same time, not one after another


# ---- a training run recorded in PostgreSQL ---------------------------------------------

@pytest.mark.postgres
def test_a_tiny_run_is_recorded_in_postgres(cli, one_thread, postgres_url, tmp_path, muse_home) -> None:
    db_ = ("--db", postgres_url)
    ok(cli(*db_, "plan", "import", plan_file(tmp_path)))
    result = ok(cli(*db_, "plan", "run", "tiny"))
    assert "validation loss" in result.output
    store = Store(postgres_url)
    try:
        with store.read() as session:
            (run, plan), = runs.list_runs(session)
            assert (plan.name, run.status, run.revision, run.error) == ("tiny", "completed", 1, None)
            assert run.finished_at is not None and as_utc(run.finished_at) >= as_utc(run.started_at)
            stage, = runs.stage_runs(session, run)
            assert (stage.name, stage.status, stage.step, stage.total_steps) == ("pretrain", "completed", 8, 8)
            series = runs.metric_series(session, run.id, "loss", stage.id)
            assert [s for s, _ in series] == list(range(1, 9))
            assert all(math.isfinite(v) for _, v in series)
            last = runs.last_metrics(session, stage.id)
            assert last["val_loss"][0] == 8 and {"grad_norm", "lr", "tokens_per_s"} <= set(last)
    finally:
        store.close()
    folder = muse_home / "runs" / f"run-{run.id:05d}" / "pretrain"
    assert sorted(p.name for p in folder.iterdir()) == ["step-00000004", "step-00000008"]
    shown = json.loads(ok(cli(*db_, "run", "show", str(run.id), "--json")).output)
    assert shown["status"] == "completed"
    assert "tiny" in ok(cli(*db_, "run", "list")).output
