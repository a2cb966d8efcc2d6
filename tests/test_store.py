import json
import multiprocessing as mp
import sqlite3

import pytest
from sqlmodel import func, select

from muse_plan.errors import Conflict, NotFound, StoreError
from muse_plan.plan.spec import PlanSpec
from muse_plan.store import db, repo, runs
from muse_plan.store.models import Event, MetricPoint, PlanRevision, Run, StageRun


def make(store, name="p", **fields):
    with store.write() as s:
        return repo.create_plan(s, PlanSpec(name=name, **fields))


def revise(store, ref, author="user", **fields):
    with store.write() as s:
        plan = repo.get_plan(s, ref)
        return repo.add_revision(s, plan, PlanSpec(name=plan.name, **fields), author, "why")


def test_default_database_is_sqlite_in_muse_home_in_wal_mode(store, muse_home):
    assert store.url == f"sqlite:///{muse_home / 'muse.db'}"
    connection = sqlite3.connect(muse_home / "muse.db")
    assert connection.execute("PRAGMA journal_mode").fetchone() == ("wal",)


def test_db_url_from_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("MUSE_DB_URL", f"sqlite:///{tmp_path}/other.db")
    assert db.default_url() == f"sqlite:///{tmp_path}/other.db"


def test_revisions_are_ordered_and_authored(memory_store):
    make(memory_store)
    revise(memory_store, "p", description="two")
    revise(memory_store, "p", author="recovery", description="three")
    with memory_store.read() as s:
        plan = repo.get_plan(s, "p")
        revisions = repo.list_revisions(s, plan)
    assert plan.head == 3
    assert [(r.number, r.author) for r in revisions] == [(1, "user"), (2, "user"), (3, "recovery")]
    assert json.loads(revisions[1].spec_json)["description"] == "two"


def test_revisions_are_immutable_in_the_database(store, muse_home):
    make(store)
    connection = sqlite3.connect(muse_home / "muse.db")
    with pytest.raises(sqlite3.IntegrityError, match="immutable"):
        connection.execute("UPDATE plan_revisions SET reason = 'rewritten'")
    with store.read() as s:
        assert repo.get_revision(s, repo.get_plan(s, "p")).reason == "created"


def test_revision_numbers_are_unique_per_plan(memory_store):
    plan, _ = make(memory_store)
    with pytest.raises(StoreError, match="nothing was written"):  # the database's constraint, in one line
        with memory_store.write() as s:
            s.add(PlanRevision(plan_id=plan.id, number=1, author="user", reason="dup", spec_json="{}"))
    with memory_store.read() as s:
        assert [r.reason for r in repo.list_revisions(s, plan)] == ["created"]


def test_unknown_author_is_refused(memory_store):
    make(memory_store)
    with pytest.raises(ValueError, match="author"):
        revise(memory_store, "p", author="someone")


def test_plans_by_id_or_name_and_missing_ones(memory_store):
    plan, _ = make(memory_store, "alpha")
    with memory_store.read() as s:
        assert repo.get_plan(s, str(plan.id)).name == "alpha"
        assert repo.get_plan(s, "alpha").id == plan.id
        with pytest.raises(NotFound, match="did you mean 'alpha'"):
            repo.get_plan(s, "alpah")
        with pytest.raises(NotFound, match="no revision 7; it has 1 to 1"):
            repo.get_revision(s, plan, 7)


def test_duplicate_name_conflicts_and_rename_checks(memory_store):
    make(memory_store, "a")
    make(memory_store, "b")
    with pytest.raises(Conflict, match="exists"):
        make(memory_store, "a")
    with pytest.raises(Conflict, match="taken"):
        with memory_store.write() as s:
            repo.add_revision(s, repo.get_plan(s, "a"), PlanSpec(name="b"), "user", "rename")


def test_delete_cascades_to_revisions_runs_metrics_events(memory_store):
    plan, _ = make(memory_store)
    with memory_store.write() as s:
        run = Run(plan_id=plan.id, revision=1, status="completed")
        s.add(run)
        s.flush()
        stage = StageRun(run_id=run.id, position=0, name="pretrain")
        s.add(stage)
        s.flush()
        s.add(MetricPoint(run_id=run.id, stage_run_id=stage.id, step=1, name="loss", value=2.0))
        s.add(Event(plan_id=plan.id, run_id=run.id, message="hello"))
    with memory_store.write() as s:
        repo.delete_plan(s, repo.get_plan(s, "p"))
    with memory_store.read() as s:
        for table in (PlanRevision, Run, StageRun, MetricPoint, Event):
            assert s.exec(select(func.count()).select_from(table)).one() == 0, table.__name__


def test_a_plan_with_a_running_run_is_not_deleted(memory_store):
    plan, _ = make(memory_store)
    with memory_store.write() as s:
        s.add(Run(plan_id=plan.id, revision=1, status="running"))
    with pytest.raises(Conflict, match="running run"):
        with memory_store.write() as s:
            repo.delete_plan(s, repo.get_plan(s, "p"))
    with memory_store.read() as s:
        assert repo.get_plan(s, "p").head == 1


def test_failed_write_leaves_nothing(memory_store):
    make(memory_store)
    with pytest.raises(RuntimeError):
        with memory_store.write() as s:
            repo.add_revision(s, repo.get_plan(s, "p"), PlanSpec(name="p", description="x"), "user", "r")
            raise RuntimeError("crash mid-transaction")
    with memory_store.read() as s:
        assert repo.get_plan(s, "p").head == 1 and len(repo.list_revisions(s, repo.get_plan(s, "p"))) == 1


def test_new_database_is_stamped_with_the_newest_schema(tmp_path):
    engine = db.make_engine(f"sqlite:///{tmp_path}/new.db")
    assert db.migrate(engine) == 0
    assert db.migrate(engine) == db.SCHEMA_VERSION  # a second open finds it current


def test_migrations_run_in_order_from_the_stored_version(tmp_path):
    engine = db.make_engine(f"sqlite:///{tmp_path}/m.db")
    db.migrate(engine, migrations={}, latest=1)
    ran = []
    migrations = {2: lambda conn: ran.append(2), 3: lambda conn: ran.append(3)}
    assert db.migrate(engine, migrations=migrations, latest=3) == 1
    assert ran == [2, 3]
    assert db.migrate(engine, migrations=migrations, latest=3) == 3 and ran == [2, 3]


def test_a_version_1_store_gains_the_revision_a_run_is_under(tmp_path):
    """Migration 2 on a database as muse 0.1 of schema 1 left it: runs keep their rows."""
    url = f"sqlite:///{tmp_path}/v1.db"
    old = db.Store(url)
    plan, _ = make(old)
    with old.write() as s:
        s.add(Run(plan_id=plan.id, revision=1, status="completed"))
    with old.engine.begin() as conn:  # back to schema 1: no current_revision column
        conn.exec_driver_sql("ALTER TABLE runs DROP COLUMN current_revision")
        conn.exec_driver_sql("UPDATE schema_version SET version = 1")
    old.close()
    new = db.Store(url)
    with new.read() as s:
        run = s.exec(select(Run)).one()
        assert (run.revision, run.current_revision, run.under) == (1, None, 1)
        assert s.exec(select(func.max(db.models.SchemaVersion.version))).one() == 2


def test_a_newer_database_is_refused_untouched(tmp_path):
    engine = db.make_engine(f"sqlite:///{tmp_path}/n.db")
    db.migrate(engine, latest=5)
    with pytest.raises(StoreError, match="schema version 5, newer than this muse knows"):
        db.migrate(engine, latest=1)


def test_a_file_that_is_not_a_database_is_a_clear_error(tmp_path):
    path = tmp_path / "junk.db"
    path.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(StoreError, match="can't be used"):
        db.Store(f"sqlite:///{path}")
    assert path.read_bytes() == b"this is not sqlite" * 100


def test_a_bad_url_is_a_clear_error():
    with pytest.raises(StoreError, match="can't open database"):
        db.Store("nosuchdialect://x")


def test_a_locked_database_is_a_clear_error_and_nothing_is_written(store, muse_home, monkeypatch):
    make(store)
    monkeypatch.setattr(db, "BUSY_TIMEOUT_S", 0.2)
    other = db.Store(store.url)  # connects with the short timeout
    blocker = sqlite3.connect(muse_home / "muse.db", isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    try:
        with pytest.raises(StoreError, match="locked by another process"):
            with other.write() as s:
                repo.add_revision(s, repo.get_plan(s, "p"), PlanSpec(name="p", description="x"), "user", "r")
    finally:
        blocker.execute("ROLLBACK")
        other.close()
    with store.read() as s:
        assert repo.get_plan(s, "p").head == 1


# ---- several processes on one SQLite file ---------------------------------

REVISIONS_PER_WRITER = 15


def _writer(url: str, tag: str) -> None:
    store = db.Store(url)
    for i in range(REVISIONS_PER_WRITER):
        with store.write() as s:
            plan = repo.get_plan(s, "shared")
            repo.add_revision(s, plan, PlanSpec(name="shared", description=f"{tag}-{i}"), "user", f"{tag}-{i}")


def _lister(url: str, stop, seen, reading) -> None:
    store = db.Store(url)
    while not stop.is_set():
        with store.read() as s:
            rows = repo.list_plans(s)
            seen.value = max(seen.value, rows[0][0].head)
        reading.set()


def test_two_writers_and_a_reader_lose_nothing_and_never_see_a_lock(store):
    make(store, "shared")
    ctx = mp.get_context("spawn")
    stop, reading, seen = ctx.Event(), ctx.Event(), ctx.Value("i", 0)
    reader = ctx.Process(target=_lister, args=(store.url, stop, seen, reading))
    writers = [ctx.Process(target=_writer, args=(store.url, tag)) for tag in ("a", "b")]
    reader.start()
    # a spawned process takes seconds to import on a slow machine: the writers start once the reader reads
    assert reading.wait(120)
    for w in writers:
        w.start()
    for w in writers:
        w.join(120)
    stop.set()
    reader.join(60)
    assert [w.exitcode for w in writers] == [0, 0] and reader.exitcode == 0
    with store.read() as s:
        revisions = repo.list_revisions(s, repo.get_plan(s, "shared"))
    assert [r.number for r in revisions] == list(range(1, 2 * REVISIONS_PER_WRITER + 2))
    reasons = {r.reason for r in revisions}
    assert {f"{t}-{i}" for t in "ab" for i in range(REVISIONS_PER_WRITER)} <= reasons
    assert seen.value >= 1


def _read_only_shell(home) -> list[str] | None:
    """A command prefix under which ``home`` can't be written by this user, or None: a
    non-root user gets the folder's mode bits; root (whom mode bits don't stop) gets a
    read-only bind mount of it in a mount namespace of its own."""
    import os
    import shutil
    import subprocess

    if os.geteuid() != 0:
        home.chmod(0o555)
        (home / "muse.db").chmod(0o444)
        return []
    if shutil.which("unshare") is None:
        return None
    mount = f"mount --bind {home} {home} && mount -o remount,ro,bind {home}"
    probe = subprocess.run(["unshare", "-m", "sh", "-c", f"{mount} && touch {home / 'x'}"],
                           capture_output=True, text=True)
    if "Read-only" not in probe.stderr:
        return None
    return ["unshare", "-m", "sh", "-c", mount + ' && exec "$@"', "sh"]


def test_a_read_only_home_reads_its_plans_and_refuses_writes_in_one_line(muse_home, cli):
    import subprocess
    import sys

    assert cli("plan", "create", "--name", "shared", "--model-scale", "10M", "--target-tasks", "reasoning",
               "--compute-budget", "1xRTX3080-8GB", "--timeline", "1day").exit_code == 0
    before = (muse_home / "muse.db").read_bytes()
    prefix = _read_only_shell(muse_home)
    if prefix is None:
        pytest.skip("can't make a folder read-only for this user here (root, and no mount namespace)")

    def muse(*args):
        return subprocess.run([*prefix, sys.executable, "-m", "muse_plan", *args], capture_output=True, text=True,
                              env={**__import__("os").environ, "MUSE_HOME": str(muse_home)})

    listed = muse("plan", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    assert [p["name"] for p in json.loads(listed.stdout)] == ["shared"]
    assert listed.stderr.strip() == f"note: {muse_home} is read-only for this user; the store is open for reading only"
    edited = muse("plan", "edit", "shared", "--set", "description=x")
    assert edited.returncode == 2
    assert edited.stderr.strip().splitlines()[-1] == (
        f"error: the store's folder '{muse_home}' is read-only for this user; nothing was written (set MUSE_HOME "
        "or --db to a store you can write)")
    assert (muse_home / "muse.db").read_bytes() == before and not (muse_home / "muse.db-wal").exists()


def test_a_killed_runs_running_stage_shows_as_interrupted_everywhere(store, cli):
    import subprocess
    import sys

    plan, _ = make(store)
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    with store.write() as s:  # as SIGKILL leaves it: the run and its stage still marked running
        run = runs.create_run(s, repo.get_plan(s, "p"), 1, [("pretrain", 30)], "/tmp/nowhere")
        run.pid = int(gone.stdout)
        stage = runs.stage_runs(s, run)[0]
        stage.status, stage.step = "running", 12
    shown = json.loads(cli("run", "show", "1", "--json").stdout)
    assert (shown["status"], shown["stages"][0]["status"]) == ("interrupted", "interrupted")
    listed = json.loads(cli("run", "list", "--json").stdout)[0]
    assert (listed["status"], listed["stages"][0]["status"]) == ("interrupted", "interrupted")
    snap = json.loads(cli("monitor", "1", "--once", "--json").stdout)
    assert (snap["status"], snap["stages"][0]["status"]) == ("interrupted", "interrupted")
