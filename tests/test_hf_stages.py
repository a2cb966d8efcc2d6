"""A local Hugging Face model (``model.family: hf``) as the model of the architecture
engine's stages: continued pretraining on all weights, then fine-tuning through LoRA,
each from the one before, with falling loss and an exact resume; the optimizer prices
the model its config.json describes; 4-bit bases refused where they can't run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from muse_plan.executor import loop
from muse_plan.store import runs
from muse_plan.store.db import Store

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_thread")


def _tiny_llama(directory: Path, tied: bool = False) -> Path:
    config = transformers.LlamaConfig(
        vocab_size=260, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=64, tie_word_embeddings=tied,
        bos_token_id=256, eos_token_id=257, pad_token_id=258)
    transformers.LlamaForCausalLM(config).save_pretrained(directory)
    return directory


def _plan(tmp_path: Path, name: str = "hf-lm", **changes) -> Path:
    plan = {
        "name": name,
        "model": {"scale": "1M", "family": "hf", "init_from": str(_tiny_llama(tmp_path / "llama")), "seq_len": 32,
                  "vocab_size": 260},
        "techniques": {"lora": {"rank": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj", "down_proj"],
                                "layers_fraction": 1.0}},
        "compute": "cpu",
        "training": {"precision": "fp32", "micro_batch": 8, "lr": 3e-3, "warmup_steps": 2, "seed": 3},
        "stages": [
            {"name": "tune", "kind": "finetune", "steps": 24, "checkpoint_every": 12, "eval_every": 12,
             "training": {"lr": 2e-2}},
            {"name": "more", "kind": "continue", "steps": 24, "checkpoint_every": 12, "eval_every": 12,
             "options": {"lora": False}},
        ],
        **changes,
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(plan))
    return path


def _losses(url_home: Path, run_id: int, position: int) -> list[float]:
    with Store().read() as session:
        stage = runs.stage_runs(session, runs.get_run(session, run_id))[position]
        return [v for _, v in runs.metric_series(session, run_id, "loss", stage.id)]


def test_an_hf_model_finetunes_through_lora_then_continues_on_all_weights(cli, tmp_path, muse_home) -> None:
    assert cli("plan", "import", _plan(tmp_path)).exit_code == 0
    result = cli("plan", "run", "hf-lm")
    assert result.exit_code == 0, result.output
    tune, more = _losses(muse_home, 1, 0), _losses(muse_home, 1, 1)
    assert len(tune) == 24 and len(more) == 24
    assert sum(tune[-6:]) / 6 < sum(tune[:6]) / 6 - 0.05  # the adapters alone lower the loss
    assert more[0] < tune[0] - 0.05  # the next stage starts from the merged adapters, not the raw model
    assert sum(more[-6:]) / 6 < sum(more[:6]) / 6 - 0.2  # and every weight training lowers it further
    with Store().read() as session:
        run = runs.get_run(session, 1)
    from safetensors.torch import load_file

    base = load_file(str(tmp_path / "llama" / "model.safetensors"))
    lora = load_file(str(Path(run.run_dir) / "tune" / "step-00000024" / "model.safetensors"))
    full = load_file(str(Path(run.run_dir) / "more" / "step-00000024" / "model.safetensors"))
    assert any("down_proj.lora_A" in k for k in lora) and not any("k_proj.lora_A" in k for k in lora)
    q = "model.layers.0.self_attn.q_proj"
    # the base is init_from's as it is: the LoRA stage's checkpoint holds only its adapters
    assert all("lora_" in k for k in lora) and len(lora) == 2 * 3 * 2  # A, B × 3 modules × 2 layers
    assert lora[f"{q}.lora_B.default.weight"].abs().sum() > 0  # the adapters trained (B starts at 0)
    assert not any("lora_" in k for k in full)  # merged on the way into a stage without LoRA
    assert not full["model.layers.0.mlp.up_proj.weight"].equal(base["model.layers.0.mlp.up_proj.weight"])
    manifest = json.loads((Path(run.run_dir) / "tune" / "step-00000024" / "manifest.json").read_text())
    assert manifest["lora_scaling"] == 2.0 and manifest["weights"] == "adapters"
    assert manifest["base_model"] == str((tmp_path / "llama").resolve())
    assert "weights" not in json.loads((Path(run.run_dir) / "more" / "step-00000024" / "manifest.json").read_text())


class _StopAt:
    def __init__(self, step: int) -> None:
        self.at = step

    def step(self, record) -> None:
        if record.step == self.at:
            loop.STOP.set()  # as a first Ctrl-C does: the run stops at this step's end

    def message(self, text) -> None: ...

    def stage_started(self, *args) -> None: ...

    def evaluated(self, *args) -> None: ...

    def stage_finished(self, *args) -> None: ...


def test_an_hf_stage_resumes_exactly(cli, tmp_path, muse_home) -> None:
    from muse_plan.errors import RunInterrupted
    from muse_plan.executor.runner import run_plan

    path = _plan(tmp_path, stages=[{"name": "tune", "kind": "finetune", "steps": 16, "checkpoint_every": 8,
                                    "eval_every": 8}])  # through LoRA: the adapters and their moments resume
    assert cli("plan", "import", path).exit_code == 0
    assert cli("plan", "run", "hf-lm").exit_code == 0
    with pytest.raises(RunInterrupted):
        run_plan(None, "hf-lm", view=_StopAt(11), probe=False)
    assert _losses(muse_home, 2, 0)[:8] == _losses(muse_home, 1, 0)[:8]
    resumed = run_plan(None, "hf-lm", resume=True, probe=False)
    assert resumed.stages[0].start_step == 8
    assert _losses(muse_home, 2, 0) == _losses(muse_home, 1, 0)  # bit for bit, steps 9-16 again from step 8


def test_the_optimizer_prices_the_model_its_config_describes(cli, tmp_path) -> None:
    from muse_plan.executor.settings import resolve
    from muse_plan.plan.io import load_file

    spec = load_file(_plan(tmp_path))
    s = resolve(spec, spec.stages[0], check=False)
    assert (s.model.n_layers, s.model.d_model, s.model.n_heads, s.model.n_kv_heads, s.model.d_ff,
            s.model.vocab_size) == (2, 32, 2, 1, 64, 260)
    assert s.lora is not None and s.lora.target_modules == ("q_proj", "v_proj", "down_proj")
    assert resolve(spec, spec.stages[1], check=False).lora is None  # the stage said lora: false
    from muse_plan.plan.io import spec_from_dict, spec_to_dict

    data = spec_to_dict(spec)
    data["stages"][1]["options"] = {}  # continued pretraining: every weight unless the stage asks for LoRA
    assert resolve(spec_from_dict(data), spec_from_dict(data).stages[1], check=False).lora is None
    data["stages"][1]["options"] = {"lora": True}
    asked = spec_from_dict(data)
    assert resolve(asked, asked.stages[1], check=False).lora.rank == 4  # the technique's adapters


def test_4bit_bases_are_refused_where_they_cant_run(cli, tmp_path) -> None:
    cpu = _plan(tmp_path, name="q-cpu", techniques={"lora": {"quantize_base": "4bit"}})
    result = cli("plan", "import", cpu)
    assert result.exit_code == 2 and "a 4-bit (QLoRA) base needs a CUDA GPU" in result.output
    assert cli("plan", "list", "--json").stdout.strip() == "[]"  # nothing stored
    gpu = _plan(tmp_path, name="q-gpu", techniques={"lora": {"quantize_base": "4bit"}}, compute="1xRTX3080-8GB")
    assert cli("plan", "import", gpu).exit_code == 0  # priced for its GPU; this version does not run it yet
    ran = cli("plan", "run", "q-gpu", "--force")  # on this machine: no CUDA
    assert ran.exit_code == 2 and "a 4-bit (QLoRA) base needs a CUDA GPU" in ran.output
    assert cli("run", "list", "--json").stdout.strip() == "[]"


def test_an_hf_model_is_not_pretrained_from_scratch(cli, tmp_path) -> None:
    path = _plan(tmp_path, stages=[{"name": "p", "kind": "pretrain", "steps": 2}])
    assert cli("plan", "import", path).exit_code == 0
    result = cli("plan", "run", "hf-lm")
    assert result.exit_code == 2 and "a pretrain stage trains muse's decoder from scratch" in result.output


def test_an_adapters_only_checkpoint_goes_only_onto_its_own_base(cli, tmp_path) -> None:
    """A LoRA stage on init_from's model as it is stores its adapters and the base's folder;
    opened without that folder, or resumed after model.init_from changed, it is one line."""
    path = _plan(tmp_path, stages=[{"name": "tune", "kind": "finetune", "steps": 4, "checkpoint_every": 2,
                                    "eval_every": 2}])
    assert cli("plan", "import", path).exit_code == 0
    assert cli("plan", "run", "hf-lm").exit_code == 0
    with Store().read() as session:
        run = runs.get_run(session, 1)
    opened = cli("generate", "1", "--prompt", "12+7=", "--max-tokens", "2", "--json")
    assert opened.exit_code == 0, opened.output  # the adapters merged into tmp_path/llama's weights
    from muse_plan.errors import RunInterrupted
    from muse_plan.executor.runner import run_plan

    with pytest.raises(RunInterrupted):
        run_plan(None, "hf-lm", view=_StopAt(3), probe=False)  # run 2 stops with step-2 stored
    other = _tiny_llama(tmp_path / "other")
    assert cli("plan", "edit", "hf-lm", "--set", f"model.init_from={other}").exit_code == 0
    resumed = cli("plan", "run", "hf-lm", "--resume")
    assert resumed.exit_code == 2
    assert f"holds LoRA adapters trained on the base model '{(tmp_path / 'llama').resolve()}'" in resumed.output
    assert f"set model.init_from to '{(tmp_path / 'llama').resolve()}'" in resumed.output
    import shutil

    shutil.rmtree(tmp_path / "llama")
    result = cli("generate", str(Path(run.run_dir) / "tune" / "step-00000004"), "--prompt", "1", "--max-tokens", "1")
    assert result.exit_code == 2 and result.output.count("\n") == 1
    assert "the checkpoint holds LoRA adapters for the base model" in result.output and "no such folder" in result.output


def test_a_4bit_base_goes_where_init_froms_model_is_unchanged(tmp_path) -> None:
    from muse_plan.errors import PlanError
    from muse_plan.executor.settings import _no_4bit, adapters_only, resolve
    from muse_plan.plan.io import load_file

    spec = load_file(_plan(tmp_path, compute="1xH100", techniques={"lora": {"quantize_base": "4bit"}}, stages=[
        {"name": "tune", "kind": "finetune", "steps": 4},
        {"name": "rl", "kind": "reasoning_rl", "steps": 2},
        {"name": "more", "kind": "continue", "steps": 4, "from_stage": "tune"},
        {"name": "rs", "kind": "rejection_sampling", "steps": 2, "from_stage": "more"},
        {"name": "wide", "kind": "all_scenarios_rl", "steps": 2, "from_stage": "rl",
         "options": {"lora": {"rank": 16, "quantize_base": "4bit"}}}]))
    tune, rl, more, rs, wide = spec.stages
    assert adapters_only(spec, tune) and adapters_only(spec, rl)  # the RL stage continues tune's adapters
    assert _no_4bit(spec, rl, True, "none") in (None, "a 4-bit (QLoRA) base needs bitsandbytes: pip install -e "
                                                      "'.[qlora]'")
    assert not adapters_only(spec, more)  # continue trains every weight: the adapters merged into them
    assert resolve(spec, more, cuda=True).lora is None
    with pytest.raises(PlanError, match="stage 'rs': a 4-bit base is model.init_from's, and this stage starts "
                                        "from stage 'more', whose trained full-precision weights muse can't"):
        resolve(spec, rs, cuda=True)
    with pytest.raises(PlanError, match="stage 'wide': stage 'rl' trained other LoRA adapters"):
        resolve(spec, wide, cuda=True)
    assert "sharding 'zero2'" in _no_4bit(spec, tune, True, "zero2")


def test_an_out_of_memory_continue_stage_is_given_lora_and_restarts_from_its_start(cli, tmp_path, muse_home) -> None:
    """The OOM ladder's last rung reaches continue stages: with nothing else left to halve
    or offload, the failing stage alone gets LoRA (rank 16), and — its checkpoints holding
    every weight, not adapters — starts again from step 0 on init_from's model."""
    path = _plan(tmp_path, training={"precision": "fp32", "micro_batch": 1, "grad_accum": 2, "lr": 3e-3,
                                     "activation_checkpointing": "full", "offload": "optimizer", "seed": 3},
                 stages=[{"name": "more", "kind": "continue", "steps": 8, "checkpoint_every": 4, "eval_every": 4},
                         {"name": "tune", "kind": "finetune", "steps": 2, "options": {"lora": False}}])
    assert cli("plan", "import", path).exit_code == 0
    result = cli("plan", "run", "hf-lm", "--inject", "oom@6")
    assert result.exit_code == 0, result.output
    history = json.loads(cli("plan", "history", "hf-lm", "--json").stdout)
    assert "LoRA (rank 16) for stage more, restarted from its starting weights" in history[-1]["reason"]
    spec = json.loads(cli("plan", "export", "hf-lm", "--format", "json").stdout)
    assert spec["stages"][0]["options"]["lora"] == {"rank": 16} and spec["techniques"]["lora"]["rank"] == 4
    assert spec["stages"][1]["options"] == {"lora": False}  # the other stage keeps its settings
    with Store().read() as session:
        events = [e.message for e in runs.events(session, 1, limit=50)]
        run = runs.get_run(session, 1)
    assert any(m.startswith("stage more now trains through LoRA (revision 2), which its checkpoints don't hold: "
                            "restarting it from step 0") for m in events)
    assert run.status == "completed"
    manifest = json.loads((Path(run.run_dir) / "more" / "step-00000008" / "manifest.json").read_text())
    assert manifest["weights"] == "adapters" and manifest["lora_scaling"] == 8 / 16  # the technique's alpha, rank 16
