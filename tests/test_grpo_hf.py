"""A Hugging Face policy from a local directory through the GRPO stages: a tiny
randomly initialised Llama (written here, nothing downloaded) with the byte
tokenizer, SFT → GRPO with LoRA on q_proj/v_proj → rejection sampling, each
stage starting from the one before, LoRA merged on the way out."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from muse_plan.store import runs
from muse_plan.store.db import Store

transformers = pytest.importorskip("transformers")  # installed with peft, a dependency

OPTIONS = {"tasks": ["multiplication:2x1"], "max_new_tokens": 24, "eval_problems": 4}


def _tiny_llama(directory: Path) -> None:
    config = transformers.LlamaConfig(
        vocab_size=260, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=True,
        bos_token_id=256, eos_token_id=257, pad_token_id=258)
    transformers.LlamaForCausalLM(config).save_pretrained(directory)


def test_a_local_hf_model_runs_sft_grpo_with_lora_and_rejection_sampling(cli, tmp_path: Path, muse_home) -> None:
    _tiny_llama(tmp_path / "llama")
    plan = {
        "name": "hf-tiny",
        "model": {"scale": "1M", "family": "hf", "init_from": str(tmp_path / "llama"), "seq_len": 96,
                  "vocab_size": 260, "shape": {"layers": 2, "d_model": 64, "n_heads": 4, "n_kv_heads": 2,
                                               "d_ff": 128}},
        "techniques": {"grpo": {"group_size": 4, "temperature": 1.0, "kl_beta": 0.04},
                       "lora": {"rank": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"],
                                "layers_fraction": 1.0}},
        "compute": "cpu",
        "training": {"precision": "fp32", "micro_batch": 4, "lr": 1.0e-3, "warmup_steps": 1},
        "stages": [
            {"name": "sft", "kind": "cold_start_sft", "steps": 3, "options": {**OPTIONS, "lora": False}},
            {"name": "rl", "kind": "reasoning_rl", "steps": 2, "options": {**OPTIONS, "algorithm": "grpo"},
             "training": {"micro_batch": 2}},
            {"name": "rs", "kind": "rejection_sampling", "steps": 2, "options": {**OPTIONS, "samples": 4}},
        ],
    }
    path = tmp_path / "plan.yaml"
    path.write_text(yaml.safe_dump(plan))
    assert cli("plan", "import", path).exit_code == 0
    result = cli("plan", "run", "hf-tiny")
    assert result.exit_code == 0, result.output
    with Store().read() as session:
        run = runs.get_run(session, 1)
        stages = runs.stage_runs(session, run)
        assert [s.status for s in stages] == ["completed"] * 3
        assert all("test_accuracy" in runs.last_metrics(session, s.id) for s in stages)
        assert "kl" in runs.last_metrics(session, stages[1].id)  # the reference: the model with adapters off
    rl = Path(run.run_dir) / "rl" / "step-00000002"
    assert json.loads((rl / "manifest.json").read_text())["lora_scaling"] == 2.0
    from safetensors import safe_open

    with safe_open(str(rl / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert any("q_proj.lora_A" in k for k in keys) and not any("k_proj.lora_A" in k for k in keys)


def test_a_directory_that_is_not_a_model_is_one_line(cli, tmp_path: Path) -> None:
    plan = {"name": "hf-bad", "model": {"scale": "1M", "family": "hf", "init_from": str(tmp_path),
                                        "shape": {"layers": 2, "d_model": 64, "n_heads": 4}},
            "compute": "cpu",
            "stages": [{"name": "sft", "kind": "cold_start_sft", "steps": 1, "options": OPTIONS}]}
    (tmp_path / "plan.yaml").write_text(yaml.safe_dump(plan))
    assert cli("plan", "import", tmp_path / "plan.yaml").exit_code == 0
    result = cli("plan", "run", "hf-bad")
    assert result.exit_code == 2
    assert "is not a Hugging Face model directory" in result.output


def test_an_sft_stage_on_a_local_hf_model_with_lora_resumes_exactly(cli, tmp_path: Path, muse_home) -> None:
    from muse_plan.errors import RunInterrupted
    from muse_plan.executor import loop
    from muse_plan.executor.runner import run_plan

    _tiny_llama(tmp_path / "llama")
    plan = {"name": "hf-sft", "compute": "cpu",
            "model": {"scale": "1M", "family": "hf", "init_from": str(tmp_path / "llama"), "seq_len": 96,
                      "vocab_size": 260},
            "techniques": {"grpo": {}, "lora": {"rank": 4, "alpha": 8, "layers_fraction": 1.0}},
            "training": {"precision": "fp32", "micro_batch": 4, "lr": 1.0e-3, "warmup_steps": 1, "seed": 2},
            "stages": [{"name": "sft", "kind": "cold_start_sft", "steps": 6, "checkpoint_every": 3,
                        "eval_every": 6, "options": OPTIONS}]}
    (tmp_path / "plan.yaml").write_text(yaml.safe_dump(plan))
    assert cli("plan", "import", tmp_path / "plan.yaml").exit_code == 0
    assert cli("plan", "run", "hf-sft").exit_code == 0

    class StopAt4:
        def step(self, record) -> None:
            if record.step == 4:
                loop.STOP.set()

        def message(self, text) -> None: ...

        def stage_started(self, *args) -> None: ...

        def evaluated(self, *args) -> None: ...

        def stage_finished(self, *args) -> None: ...

    with pytest.raises(RunInterrupted):
        run_plan(None, "hf-sft", view=StopAt4(), probe=False)
    assert run_plan(None, "hf-sft", resume=True, probe=False).stages[0].start_step == 3
    with Store().read() as session:
        first, second = ([v for _, v in runs.metric_series(session, r, "loss")] for r in (1, 2))
    assert len(first) == 6 and second == first  # steps 4-6 again from the checkpoint at 3, bit for bit
