"""scripts/bench_rl_regime.py's merge: RL settings chosen on validation runs, never on the test rows."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_rl_regime", ROOT / "scripts" / "bench_rl_regime.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_rl_regime"] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def _run(algorithm: str, seed: int, final: float, variant: str, settings: dict, n: int) -> dict:
    return {"algorithm": algorithm, "seed": seed, "cut_off": False, "status": "completed", "updates_done": 40,
            "updates": 40, "curve": [[40, final, final, 10.0, 5.0]], "n": n, "samples": 1,
            "completions_per_s": 50.0, "peak_gib": 1.0, "predicted_gib": 1.2, "series": {"train_accuracy": []},
            "variant": variant, "settings": settings}


def _call(bench, split: str, base: float, finals: dict[str, dict[str, float]], started: str) -> dict:
    """One rl call of GRPO over the variants in ``finals`` ({variant: {settings..., "final": acc}})."""
    n = 500 if split == "val" else 1000
    config = {**bench.asdict(bench.Config()), "held_out": split}
    runs = [_run("grpo", 0, v["final"], variant, {k: x for k, x in v.items() if k != "final"}, n)
            for variant, v in finals.items()]
    return {"kind": "bench_rl_regime", "task": "multiplication:3x3", "phase": "rl", "config": config,
            "base": {split: {"greedy": base, "sampled": base, "n": n, "samples": 1}, "sft_steps": 20},
            "rl": runs, "device": "test", "started_at": started, "file": f"{split}.json"}


def test_the_setting_that_wins_on_validation_is_chosen_and_its_test_row_reported() -> None:
    bench = load_bench()
    fast = "lr 0.001"
    val = _call(bench, "val", 0.05, {"": {"final": 0.06}, fast: {"rl_lr": 1e-3, "final": 0.15}}, "a")
    # on the test problems the paper's setting looks better: the choice must not see that
    test = _call(bench, "test", 0.04, {"": {"final": 0.30}, fast: {"rl_lr": 1e-3, "final": 0.12}}, "b")
    merged = bench.aggregate([val, test])
    assert set(merged["tasks"]) == {"multiplication:3x3 (validation)", "multiplication:3x3 (validation, lr 0.001)",
                                    "multiplication:3x3", "multiplication:3x3 (lr 0.001)"}
    # validation runs stay out of the test rows: the test group's base is the test call's alone
    assert merged["tasks"]["multiplication:3x3"]["rows"]["base"]["greedy"][0] == 0.04
    grpo = merged["chosen"]["multiplication:3x3"]["grpo"]
    assert grpo["variant"] == fast
    assert round(grpo["test_delta"][0], 6) == 0.08  # the chosen setting's test Δ: 0.12 - 0.04
    assert sorted(round(c["delta"][0], 6) for c in grpo["candidates"]) == [0.01, 0.1]
    text = "\n".join(bench.selection_section(merged["chosen"]))
    assert "| `multiplication:3x3` | GRPO | paper: 1.0" in text and "| lr 0.001 | 8.0" in text


def test_a_tie_on_validation_keeps_the_papers_setting_and_no_test_row_is_said() -> None:
    bench = load_bench()
    val = _call(bench, "val", 0.05, {"lr 0.001": {"rl_lr": 1e-3, "final": 0.07}, "": {"final": 0.07}}, "a")
    grpo = bench.aggregate([val])["chosen"]["multiplication:3x3"]["grpo"]
    assert grpo["variant"] == "" and grpo["test_delta"] is None
    assert "not run on test" in "\n".join(bench.selection_section({"multiplication:3x3": {"grpo": grpo}}))
