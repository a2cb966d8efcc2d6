"""QLoRA end to end on a GPU, on a tiny random-weight Llama (needs the ``qlora`` extra):
a finetune stage with a 4-bit NF4 base, LoRA on every projection and bitsandbytes'
paged 8-bit AdamW, run with ``muse plan run``: the loss falls and the base's linear
layers are bitsandbytes' 4-bit ones; the same stage stopped at step 30 and resumed
(``--resume``) repeats the uninterrupted losses; its checkpoints hold the adapters
only. Then the DeepSeek-R1 chain on the same 4-bit base — cold-start SFT → GRPO →
rejection sampling → all-scenarios RL, each continuing the one before's adapters —
runs to completion; its last stage exported (``muse export``) loads in transformers
and computes the logits muse's merged model does; ``muse generate`` samples from it.

    python scripts/check_qlora_gpu.py            # prints one JSON line; exit 1 on a failed check
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    import torch
    import yaml
    from transformers import LlamaConfig, LlamaForCausalLM

    work = Path(tempfile.mkdtemp())
    model_dir = work / "tiny-llama"
    config = LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=260, max_position_embeddings=256,
                         bos_token_id=256, eos_token_id=257, pad_token_id=258)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(model_dir)
    plan = {"name": "qlora-tiny", "model": {"scale": "10M", "family": "hf", "init_from": str(model_dir),
                                            "seq_len": 128, "vocab_size": 260},
            "techniques": {"lora": {"rank": 8, "alpha": 16, "layers_fraction": 1.0, "quantize_base": "4bit",
                                    "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                       "up_proj", "down_proj"]}},
            "compute": "1xH100", "training": {"precision": "bf16", "micro_batch": 8, "lr": 2e-3, "warmup_steps": 3,
                                              "optimizer": "adamw_8bit", "activation_checkpointing": "full"},
            "stages": [{"name": "tune", "kind": "finetune", "steps": 60, "checkpoint_every": 20,
                        "eval_every": 20}]}
    (work / "plan.yaml").write_text(yaml.safe_dump(plan))
    env = {**os.environ, "MUSE_HOME": str(work / "home"), "PYTHONPATH": f"{ROOT}:{os.environ.get('PYTHONPATH', '')}"}

    def muse(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "muse_plan", *args], env=env, capture_output=True, text=True)

    out: dict = {"gpu": torch.cuda.get_device_name(0)}
    assert muse("plan", "import", str(work / "plan.yaml")).returncode == 0
    done = muse("plan", "run", "qlora-tiny", "--no-probe")
    out["run_exit"] = done.returncode
    out["run_tail"] = (done.stdout + done.stderr)[-1500:]
    sys.path.insert(0, str(ROOT))
    os.environ["MUSE_HOME"] = env["MUSE_HOME"]
    from muse_plan.store import runs
    from muse_plan.store.db import Store

    with Store().read() as session:
        losses = [v for _, v in runs.metric_series(session, 1, "loss")]
        memory = [v for _, v in runs.metric_series(session, 1, "memory_gib")]
    out["loss_first5"], out["loss_last5"] = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    out["peak_gib"] = max(memory) if memory else None
    # what the engine built: 4-bit linear layers, adapters the only trainable weights
    from engines.hf import load_hf

    model = load_hf(str(model_dir), "cuda:0", "4bit")
    kinds = {type(m).__name__ for m in model.modules()}
    out["linear4bit"] = "Linear4bit" in kinds
    # the same stage stopped at step 30 (after its step-20 checkpoint) and resumed
    from muse_plan.errors import RunInterrupted
    from muse_plan.executor import loop
    from muse_plan.executor.runner import run_plan

    class StopAt:
        def step(self, record) -> None:
            if record.step == 30:
                loop.STOP.set()

        def __getattr__(self, name):
            return lambda *args, **kwargs: None

    try:
        run_plan(None, "qlora-tiny", view=StopAt(), probe=False)
    except RunInterrupted:
        pass
    loop.STOP.clear()
    resumed = muse("plan", "run", "qlora-tiny", "--resume", "--no-probe")
    out["resume_exit"], out["resume_tail"] = resumed.returncode, (resumed.stdout + resumed.stderr)[-800:]
    with Store().read() as session:
        again = [v for _, v in runs.metric_series(session, 2, "loss")]
        run1 = runs.get_run(session, 1)
    out["resume_steps"] = len(again)
    out["resume_max_abs_diff"] = max((abs(a - b) for a, b in zip(again, losses)), default=None)
    ckpt = Path(run1.run_dir) / "tune" / "step-00000060"
    manifest = json.loads((ckpt / "manifest.json").read_text())
    out["checkpoint_mib"] = round((ckpt / "model.safetensors").stat().st_size / 2**20, 2)
    out["checkpoint_weights"] = manifest.get("weights")
    # the R1 chain on the 4-bit base, each stage continuing the adapters of the one before
    options = {"tasks": ["multiplication:2x1"], "max_new_tokens": 16, "eval_problems": 8}
    grpo = {**plan, "name": "qlora-r1",
            "techniques": {**plan["techniques"], "grpo": {"group_size": 4, "temperature": 1.0, "kl_beta": 0.04}},
            "training": {**plan["training"], "micro_batch": 4},
            "stages": [{"name": "sft", "kind": "cold_start_sft", "steps": 20, "options": options},
                       {"name": "rl", "kind": "reasoning_rl", "steps": 4, "options": options},
                       {"name": "rs", "kind": "rejection_sampling", "steps": 3, "options": {**options, "samples": 4}},
                       {"name": "all", "kind": "all_scenarios_rl", "steps": 3, "options": options}]}
    (work / "grpo.yaml").write_text(yaml.safe_dump(grpo))
    assert muse("plan", "import", str(work / "grpo.yaml")).returncode == 0
    rl = muse("plan", "run", "qlora-r1", "--no-probe")
    out["grpo_exit"], out["grpo_tail"] = rl.returncode, (rl.stdout + rl.stderr)[-1200:]
    with Store().read() as session:
        stages = runs.stage_runs(session, runs.get_run(session, 3))
        out["r1_stages"] = {s.name: s.status for s in stages}
        out["r1_kl"] = runs.last_metrics(session, stages[1].id).get("kl")
        out["r1_peak_gib"] = {s.name: max((v for _, v in runs.metric_series(session, 3, "memory_gib", s.id)),
                                          default=None) for s in stages}
    exported = muse("export", "3", "-o", str(work / "exported"))
    out["export_exit"], out["export_tail"] = exported.returncode, (exported.stdout + exported.stderr)[-600:]
    if exported.returncode == 0:
        from transformers import AutoModelForCausalLM

        from muse_plan.trained import open_trained

        theirs = AutoModelForCausalLM.from_pretrained(str(work / "exported")).float().eval()
        ours = open_trained("3")
        ids = torch.randint(0, 256, (2, 24))
        with torch.no_grad():
            diff = (theirs(input_ids=ids).logits.float() - ours.logits(ids)).abs().max().item()
        out["export_logits_max_abs_diff"] = diff
    generated = muse("generate", "3", "--prompt", "12*3=", "--temperature", "0", "--max-tokens", "8", "--json")
    out["generate_exit"], out["generate_tail"] = generated.returncode, (generated.stdout + generated.stderr)[-400:]
    checks = {"run_ok": done.returncode == 0, "loss_falls": out["loss_last5"] < out["loss_first5"] - 0.3,
              "linear4bit": out["linear4bit"], "resume_ok": resumed.returncode == 0 and len(again) == 60,
              "resume_repeats": out["resume_max_abs_diff"] is not None and out["resume_max_abs_diff"] < 1e-3,
              "adapters_only": manifest.get("weights") == "adapters",
              "r1_ok": rl.returncode == 0 and set(out["r1_stages"].values()) == {"completed"},
              "export_same_logits": out.get("export_logits_max_abs_diff", 1.0) < 1e-4,
              "generate_ok": generated.returncode == 0}
    out["checks"] = checks
    print(json.dumps(out))
    raise SystemExit(0 if all(checks.values()) else 1)


if __name__ == "__main__":
    main()
