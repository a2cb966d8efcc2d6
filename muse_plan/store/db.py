"""Opening the store: the engine from a URL, SQLite settings, schema migrations.

Default database: SQLite at ``$MUSE_HOME/muse.db`` (``~/.muse`` when unset);
``--db`` or ``MUSE_DB_URL`` take any SQLAlchemy URL (PostgreSQL for a team).

SQLite runs in WAL mode (readers never block the writer), with a busy
timeout and foreign keys on. Write transactions start with ``BEGIN
IMMEDIATE``: a deferred transaction that reads and then writes can fail at
once with "database is locked" when another process wrote in between, busy
timeout or not; taking the write lock up front makes writers queue instead.
Read transactions stay deferred so a monitor never holds up a run.

A database in a folder this user can't write (a shared, read-only
``MUSE_HOME``) is opened read-only: read commands work and say so once,
and any write fails with one line naming the folder, before anything runs.
On PostgreSQL the first migration of a new database holds an advisory lock,
so processes starting together don't each create the tables.

Migrations: a ``schema_version`` table and an ordered list of migration
functions, chosen over Alembic because the schema is small, a migration
must run unattended inside ``muse`` on a user's machine, and Alembic would
add a dependency and a config directory to every install. A new database
is created from the current models and stamped with the newest version;
an older one is brought forward by running each later migration in order
inside one write transaction; a newer one is refused, never touched.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from sqlalchemy import Connection, Engine, create_engine, event, inspect, make_url, select
from sqlalchemy.exc import ArgumentError, DatabaseError, IntegrityError, OperationalError
from sqlalchemy.pool import StaticPool
from sqlmodel import Session, SQLModel

from muse_plan.errors import StoreError
from muse_plan.store import models

BUSY_TIMEOUT_S = 30
SCHEMA_VERSION = 2


def _run_revision_now(conn: Connection) -> None:
    """2: a run records the revision it is under now, not only the one it started under."""
    conn.exec_driver_sql("ALTER TABLE runs ADD COLUMN current_revision INTEGER")


# version N → the function that upgrades a version N-1 database to N
MIGRATIONS: dict[int, Callable[[Connection], None]] = {2: _run_revision_now}


def muse_home() -> Path:
    return Path(os.environ.get("MUSE_HOME") or Path.home() / ".muse").expanduser()


def default_url() -> str:
    return os.environ.get("MUSE_DB_URL") or f"sqlite:///{muse_home() / 'muse.db'}"


def make_engine(url: str, read_only: bool = False) -> Engine:
    try:
        if url.startswith("sqlite"):
            return _sqlite_engine(url, read_only)
        return create_engine(url, pool_pre_ping=True)
    except (ArgumentError, ImportError, ValueError) as exc:
        raise StoreError(f"can't open database {url!r}: {exc}") from None


def sqlite_path(url: str) -> Path | None:
    if not url.startswith("sqlite") or url in ("sqlite://", "sqlite:///:memory:"):
        return None
    return Path(url.split("///", 1)[-1].split("?", 1)[0]).expanduser()


def read_only_folder(url: str) -> Path | None:
    """The folder of an existing SQLite database that this user can't write there, else None."""
    path = sqlite_path(url)
    if path is None or not path.exists():
        return None
    writable = os.access(path, os.W_OK) and os.access(path.parent, os.W_OK | os.X_OK)
    return None if writable else path.parent


def _sqlite_engine(url: str, read_only: bool = False) -> Engine:
    path = sqlite_path(url)
    if path is not None and not read_only:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"can't create the database folder {str(path.parent)!r}: {exc.strerror}") from None
    if read_only:  # SQLite's own read-only open: nothing written, not even a -shm file
        # without a -shm file no writer has the database open (the last one to close removes it and
        # leaves every change in the file), so the file is all there is: read it as immutable
        shm = path.with_name(path.name + "-shm")
        url = f"sqlite:///file:{path}?mode=ro{'' if shm.exists() else '&immutable=1'}&uri=true"
    engine = create_engine(
        url,
        connect_args={"timeout": BUSY_TIMEOUT_S, "check_same_thread": False},
        poolclass=StaticPool if path is None else None,
    )

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection, _record) -> None:
        dbapi_connection.isolation_level = None  # we issue BEGIN ourselves, below
        cursor = dbapi_connection.cursor()
        cursor.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_S * 1000}")
        if not read_only:
            cursor.execute("PRAGMA journal_mode = WAL")
            cursor.execute("PRAGMA synchronous = NORMAL")
        cursor.execute("PRAGMA foreign_keys = ON")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection) -> None:
        write = connection.get_execution_options().get("muse_write", False)
        connection.exec_driver_sql("BEGIN IMMEDIATE" if write else "BEGIN")

    return engine


def migrate(engine: Engine, migrations: dict[int, Callable[[Connection], None]] | None = None,
            latest: int = SCHEMA_VERSION) -> int:
    """Bring the database to ``latest``; returns the version it was at (0 if new)."""
    migrations = MIGRATIONS if migrations is None else migrations
    with engine.execution_options(muse_write=True).begin() as conn:
        if conn.dialect.name == "postgresql":  # one migrating process at a time, until commit
            conn.exec_driver_sql("SELECT pg_advisory_xact_lock(6173)")
        if not inspect(conn).has_table(models.SchemaVersion.__tablename__):
            SQLModel.metadata.create_all(conn)
            conn.execute(models.SchemaVersion.__table__.insert().values(version=latest))
            return 0
        current = conn.execute(select(models.SchemaVersion.version).order_by(
            models.SchemaVersion.version.desc())).scalar() or 0
        if current > latest:
            raise StoreError(
                f"the database is at schema version {current}, newer than this muse knows "
                f"({latest}); upgrade muse to use it"
            )
        for version in range(current + 1, latest + 1):
            migrations[version](conn)
            conn.execute(models.SchemaVersion.__table__.insert().values(version=version))
        return current


def check_version(engine: Engine, latest: int = SCHEMA_VERSION) -> None:
    """For a read-only database: refuse one this muse can't read as it is."""
    with engine.connect() as conn:
        current = conn.execute(select(models.SchemaVersion.version).order_by(
            models.SchemaVersion.version.desc())).scalar() or 0
    if current != latest:
        raise StoreError(f"the database is at schema version {current} and this muse needs {latest}; "
                         "its folder is read-only, so it can't be brought up to date here")


# what SQLite says when the file, not muse, is the problem
_UNUSABLE = ("unable to open", "not a database", "disk I/O", "readonly", "malformed", "Connection refused")


class Store:
    """The opened database. ``read()`` and ``write()`` give sessions; a write
    commits at the end of its block or, on any error, leaves nothing behind."""

    def __init__(self, url: str | None = None):
        self.url = url or default_url()
        # an existing database in a folder this user can't write: read-only, said once by the CLI
        self.read_only = read_only_folder(self.url)
        self.engine = make_engine(self.url, read_only=self.read_only is not None)
        self._write_engine = self.engine.execution_options(muse_write=True)
        with self._translated():
            if self.read_only is not None:
                check_version(self.engine)
            else:
                migrate(self.engine)

    @contextmanager
    def read(self) -> Iterator[Session]:
        with self._translated(), Session(self.engine, expire_on_commit=False) as session:
            yield session

    @contextmanager
    def write(self) -> Iterator[Session]:
        if self.read_only is not None:
            raise StoreError(f"the store's folder {str(self.read_only)!r} is read-only for this user; "
                             "nothing was written (set MUSE_HOME or --db to a store you can write)")
        with self._translated(), Session(self._write_engine, expire_on_commit=False) as session:
            session.info["muse_write"] = True  # plans read here are locked (repo.py)
            with session.begin():
                yield session

    @property
    def shown_url(self) -> str:
        """The URL for a message: any password hidden."""
        try:
            return make_url(self.url).render_as_string(hide_password=True)
        except ArgumentError:
            return self.url

    def _unusable(self, orig: BaseException) -> StoreError:
        lines = str(orig).strip().splitlines()
        return StoreError(f"database {self.shown_url!r} can't be used: {lines[0] if lines else type(orig).__name__}")

    @contextmanager
    def _translated(self) -> Iterator[None]:
        try:
            yield
        except OperationalError as exc:
            text = str(exc.orig)
            if "locked" in text or "busy" in text:
                raise StoreError(
                    f"the database {self.shown_url!r} stayed locked by another process for "
                    f"{BUSY_TIMEOUT_S} s; nothing was written"
                ) from None
            # a server's database that can't be reached (no server, no such database, refused) is
            # the user's to fix, as is a SQLite file that is not a usable database
            if not self.url.startswith("sqlite") or any(sign in text for sign in _UNUSABLE):
                raise self._unusable(exc.orig) from None
            raise
        except IntegrityError as exc:
            if "unique" in str(exc.orig).lower():  # two writers created the same thing at once
                raise StoreError("another process wrote the same record at the same moment; nothing was "
                                 "written, run the command again") from None
            raise
        except DatabaseError as exc:
            if any(sign in str(exc.orig) for sign in _UNUSABLE):
                raise self._unusable(exc.orig) from None
            raise

    def close(self) -> None:
        self.engine.dispose()
