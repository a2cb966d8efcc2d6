"""Shared fixtures: every test gets its own MUSE_HOME, so nothing touches ~/.muse."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from muse_plan.store.db import Store

ROOT = Path(__file__).resolve().parent.parent
PLANS = sorted((ROOT / "plans").glob("*.yaml"))


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
