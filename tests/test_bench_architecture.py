"""scripts/bench_architecture.py's arithmetic: MFU against the peak, each residual mode's overhead over the
standard row of its own round, and ``--rounds``' medians, which the verdicts read."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
import bench_architecture as ba  # noqa: E402


def _row(model: str, step_ms: float, rnd: int | None, peak_gib: float = 20.0) -> dict:
    row = {"model": model, "mode": "plan-run", "params": 336e6, "step_ms": step_ms, "tokens_per_s": 16384e3 / step_ms,
           "model_flops_per_step": 43e12, "peak_mem_gib": peak_gib, "first_step_s": 12.0}
    return row if rnd is None else {**row, "round": rnd}


def test_rounds_pair_each_mode_with_its_own_rounds_standard_and_the_verdicts_read_the_medians():
    # round 1: ddl +5.0% over its standard; round 2: +8.0%; round 3: +7.5% -> median +7.5% (missed)
    rows = [_row("standard", 100.0, 0), _row("ddl+fused+graphs", 105.0, 0),
            _row("standard", 96.0, 1), _row("ddl+fused+graphs", 103.68, 1, peak_gib=22.5),
            _row("standard", 98.0, 2), _row("ddl+fused+graphs", 105.35, 2)]
    ba.add_derived(rows, 716.7e12)
    assert [round(r.get("overhead_vs_standard", 0), 4) for r in rows[1::2]] == [0.05, 0.08, 0.075]
    assert rows[0]["mfu"] == pytest.approx(43e12 / 0.1 / 716.7e12)
    med = {r["model"]: r for r in ba.medians(rows)}
    assert med["standard"]["step_ms"] == 98.0 and med["standard"]["rounds"] == 3
    assert med["standard"]["mfu"] == pytest.approx(43e12 / 0.098 / 716.7e12)  # 61.2%
    assert med["standard"]["tokens_per_s"] == pytest.approx(16384e3 / 98.0)
    assert med["ddl+fused+graphs"]["overhead_vs_standard"] == pytest.approx(0.075)
    assert med["ddl+fused+graphs"]["peak_mem_gib"] == 22.5
    said = ba.verdicts(list(med.values()))
    assert "standard (plan-run) MFU 61.2% vs target >= 60%: MET" in said
    assert "ddl+fused+graphs (plan-run) step time over standard +7.5% vs target <= +7%: MISSED" in said
    assert any(line.startswith("| ddl+fused+graphs (median of 3) | plan-run |") for line in ba.table(list(med.values())))


def test_one_round_is_as_before_no_medians():
    rows = [_row("standard", 100.0, None), _row("mhc+bf16+fused+graphs", 136.0, None)]
    ba.add_derived(rows, 716.7e12)
    assert rows[1]["overhead_vs_standard"] == pytest.approx(0.36) and ba.medians(rows) == []
    assert "mhc+bf16+fused+graphs (plan-run) step time over standard +36.0% vs target <= +15%: MISSED" in ba.verdicts(rows)
