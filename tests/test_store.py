import json
import multiprocessing as mp
import sqlite3

import pytest
from sqlalchemy.exc import IntegrityError
from sqlmodel import func, select

from muse_plan.errors import Conflict, NotFound, StoreError
from muse_plan.plan.spec import PlanSpec
from muse_plan.store import db, repo
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
    with pytest.raises(IntegrityError):
        with memory_store.write() as s:
            s.add(PlanRevision(plan_id=plan.id, number=1, author="user", reason="dup", spec_json="{}"))


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
