"""The GRPO engine end to end through ``muse plan run`` on CPU.

1. RL learns: a tiny decoder is pretrained on 2-digit × 1-digit
   multiplication, cold-start SFT'd on its worked solutions, then GRPO'd from
   the SFT result. The rollout reward (sampled accuracy on training
   problems) must rise over the stage, and held-out accuracy must not fall
   (plan seeds 0 and 1: reward 0.243 → 0.291 and 0.209 → 0.308 over 100
   steps; held-out greedy 0.270 → 0.295 and 0.320 → 0.320).
   What this does *not* show: a clear held-out gain. Measured on this set-up
   with three RL seeds (sampled held-out accuracy 0.268 → 0.286 / 0.290 /
   0.258, greedy 0.270 → 0.295 / 0.295 / 0.285), RL's held-out gain on a
   CPU-sized model is within a few points; see the issue note.
2. Every stage kind runs: the CPU variant of the bundled reasoning plan
   (cold-start SFT → GRPO / S-GRPO / T-SPMO with LoRA → rejection sampling →
   all-scenarios RL) completes, records its metrics and hands weights across
   LoRA boundaries.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from muse_plan.store import runs
from muse_plan.store.db import Store

TASK = ["multiplication:2x1"]
OPTIONS = {"tasks": TASK, "max_new_tokens": 40, "eval_problems": 200, "eval_samples": 4, "temperature": 1.0}
RL = {"kind": "reasoning_rl", "steps": 100, "eval_every": 100, "from_stage": "sft",
      "options": {**OPTIONS, "algorithm": "grpo", "group_size": 8},
      "training": {"lr": 1.0e-4, "warmup_steps": 2, "micro_batch": 16}}
PLAN = {
    "name": "grpo-e2e",
    "model": {"scale": "1M", "residual": "standard", "seq_len": 64, "vocab_size": 260,
              "shape": {"layers": 4, "d_model": 128, "n_heads": 4}},
    "compute": "cpu",
    "training": {"precision": "fp32", "micro_batch": 32, "lr": 1.0e-3, "warmup_steps": 10, "seed": 0},
    "stages": [
        {"name": "pretrain", "kind": "pretrain", "steps": 600, "eval_every": 600, "options": {"tasks": TASK}},
        {"name": "sft", "kind": "cold_start_sft", "steps": 20, "eval_every": 20, "options": OPTIONS,
         "training": {"lr": 1.0e-3, "warmup_steps": 2}},
        {**RL, "name": "rl"},
    ],
}


def _final(run_id: int, name: str) -> dict[str, float]:
    with Store().read() as session:
        run = runs.get_run(session, run_id)
        stages = {s.name: s for s in runs.stage_runs(session, run)}
        return {k: v for k, (_, v) in runs.last_metrics(session, stages[name].id).items()}


def test_grpo_raises_the_rollout_reward_and_keeps_held_out_accuracy(cli, tmp_path: Path, muse_home) -> None:
    path = tmp_path / "plan.yaml"
    path.write_text(yaml.safe_dump(PLAN))
    assert cli("plan", "import", path).exit_code == 0
    result = cli("plan", "run", "grpo-e2e")
    assert result.exit_code == 0, result.output
    before, after = _final(1, "sft"), _final(1, "rl")
    with Store().read() as session:
        rl = runs.stage_runs(session, runs.get_run(session, 1))[2]
        reward = [v for _, v in runs.metric_series(session, 1, "reward", rl.id)]
    first, last = sum(reward[:25]) / 25, sum(reward[-25:]) / 25
    print(f"rollout reward {first:.3f} → {last:.3f}; held-out greedy {before['test_accuracy']:.3f} → "
          f"{after['test_accuracy']:.3f}, sampled {before['test_accuracy_sampled']:.3f} → "
          f"{after['test_accuracy_sampled']:.3f}")
    assert before["test_accuracy"] > 0.05  # the SFT policy solves some: RL has a signal
    assert last > first + 0.02
    assert after["test_accuracy"] >= before["test_accuracy"] - 0.02


def test_the_cpu_reasoning_plan_runs_every_stage_kind_with_lora(cli, tmp_path: Path, muse_home) -> None:
    spec = yaml.safe_load((Path(__file__).parent.parent / "plans" / "reasoning-grpo-cpu.yaml").read_text())
    for stage in spec["stages"]:  # CI-sized: the same stages, a few steps each
        stage["steps"] = stage["eval_every"] = 40 if stage["kind"] == "pretrain" else 2
        stage.setdefault("options", {})["eval_problems"] = 8
    path = tmp_path / "plan.yaml"
    path.write_text(yaml.safe_dump(spec))
    assert cli("plan", "import", path).exit_code == 0
    result = cli("plan", "run", "reasoning-grpo-cpu")
    assert result.exit_code == 0, result.output
    assert "held-out accuracy" in result.output and "% sampled" in result.output
    assert "reasoning_rl_t_spmo: 2 steps" in result.output and ", reward " in result.output
    with Store().read() as session:
        run = runs.get_run(session, 1)
        assert run.status == "completed"
        for stage in runs.stage_runs(session, run):
            last = runs.last_metrics(session, stage.id)
            assert stage.status == "completed" and stage.step == stage.total_steps, stage.name
            if stage.name != "pretrain":
                assert "test_accuracy" in last and "test_accuracy_sampled" in last, stage.name
            if stage.name.startswith(("reasoning_rl", "all_scenarios")):
                assert "reward" in last and "train_accuracy" in last, stage.name
    manifest = yaml.safe_load((Path(run.run_dir) / "reasoning_rl_grpo" / "step-00000002" / "manifest.json").read_text())
    assert manifest["lora_scaling"] == 2.0  # alpha 16 / rank 8, for merging into the next plain stage
