"""scripts/bench_rkdo.py --tiny end to end: its files, its paired numbers, and a
person's claims paragraph kept when the tables are rewritten."""

from __future__ import annotations

import importlib.util
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_rkdo", ROOT / "scripts" / "bench_rkdo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_tiny_bench_writes_tables_from_its_runs_and_keeps_the_claims(tmp_path) -> None:
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_rkdo.py"), "--tiny", "--out", str(tmp_path)],
                         capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert out.returncode == 0, out.stderr
    results = json.loads((tmp_path / "bench_rkdo.json").read_text())
    assert results["methods"] == ["icon", "rkdo", "rkdo-in-batch"] and results["epochs"] == [1, 2]
    assert all(len(results["runs"][m][e]) == 2 for m in results["methods"] for e in ("1", "2"))
    assert (tmp_path / "bench_rkdo.png").stat().st_size > 10_000
    md = (tmp_path / "bench_rkdo.md").read_text()
    icon = results["runs"]["icon"]["2"]
    assert "| icon | 2 | {:.3f} ± {:.3f} |".format(
        statistics.fmean(r["train_loss"] for r in icon), statistics.stdev(r["train_loss"] for r in icon)) in md
    rkdo = results["runs"]["rkdo"]["1"]
    diffs = [a["knn_retention"] - b["knn_retention"] for a, b in zip(rkdo, results["runs"]["icon"]["1"])]
    assert f"{statistics.fmean(diffs):+.3f} ({sum(d > 0 for d in diffs)}/2)" in md

    bench = load_bench()
    (tmp_path / "bench_rkdo.md").write_text(md + "\n## Which of the paper's claims held\n\nNone, here.\n")
    bench.write_markdown(results, [1, 2], tmp_path / "bench_rkdo.md", "again")
    again = (tmp_path / "bench_rkdo.md").read_text()
    assert "Command: `again`" in again and again.rstrip().endswith("## Which of the paper's claims held\n\nNone, here.")
