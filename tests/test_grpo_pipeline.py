"""The GRPO engine end to end through ``muse plan run`` on CPU: every stage kind runs.

The CPU variant of the bundled reasoning plan (cold-start SFT → GRPO / S-GRPO
/ T-SPMO with LoRA → rejection sampling → all-scenarios RL) completes,
records its metrics and hands weights across LoRA boundaries. Whether RL
raises held-out accuracy is a claim that needs minutes of training to show
a margin: ``scripts/bench_grpo_cpu.py`` measures it (three seeds through
``muse plan run``, ``docs/bench_grpo_cpu.md``).
"""

from __future__ import annotations

from pathlib import Path

import yaml

from muse_plan.store import runs
from muse_plan.store.db import Store


def test_the_cpu_reasoning_plan_runs_every_stage_kind_with_lora(cli, tmp_path: Path, muse_home) -> None:
    spec = yaml.safe_load((Path(__file__).parent.parent / "plans" / "reasoning-grpo-cpu.yaml").read_text())
    for stage in spec["stages"]:  # CI-sized: the same stages, a few steps each
        stage["steps"] = stage["eval_every"] = 10 if stage["kind"] == "pretrain" else 2
        if stage["kind"] != "pretrain":
            stage.setdefault("options", {}).update(eval_problems=8, eval_samples=1)
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
                assert last["rollout_s"][1] > 0, stage.name  # one rollout a step: where its time went
    shown = " ".join(cli("run", "show", "1").output.split())
    assert "reasoning_rl_grpo at step 2:" in shown and "· reward " in shown and " s a micro-batch" in shown
    manifest = yaml.safe_load((Path(run.run_dir) / "reasoning_rl_grpo" / "step-00000002" / "manifest.json").read_text())
    assert manifest["lora_scaling"] == 2.0  # alpha 16 / rank 8, for merging into the next plain stage
