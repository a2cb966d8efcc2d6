"""QLoRA end to end on a GPU, on a tiny random-weight Llama (needs the ``qlora`` extra):
a finetune stage with a 4-bit NF4 base, LoRA on every projection and bitsandbytes'
paged 8-bit AdamW, run with ``muse plan run``: the loss falls and the base's linear
layers are bitsandbytes' 4-bit ones; then the GRPO engine's SFT stage on the same
4-bit base runs to completion, its evaluation sampling from it. (On an H100,
2026-12-06: all checks passed; an RL stage after the SFT stage was refused in one
line, as a stage can't start from a 4-bit checkpoint yet.)

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
    # the GRPO engine's SFT stage on the same 4-bit base (its evaluation samples from it)
    grpo = {**plan, "name": "qlora-grpo",
            "techniques": {**plan["techniques"], "grpo": {"group_size": 4, "temperature": 1.0}},
            "training": {**plan["training"], "micro_batch": 4},
            "stages": [{"name": "sft", "kind": "cold_start_sft", "steps": 3,
                        "options": {"tasks": ["multiplication:2x1"], "max_new_tokens": 16, "eval_problems": 4}}]}
    (work / "grpo.yaml").write_text(yaml.safe_dump(grpo))
    assert muse("plan", "import", str(work / "grpo.yaml")).returncode == 0
    rl = muse("plan", "run", "qlora-grpo", "--no-probe")
    out["grpo_exit"], out["grpo_tail"] = rl.returncode, (rl.stdout + rl.stderr)[-1200:]
    checks = {"run_ok": done.returncode == 0, "loss_falls": out["loss_last5"] < out["loss_first5"] - 0.3,
              "linear4bit": out["linear4bit"], "grpo_ok": rl.returncode == 0}
    out["checks"] = checks
    print(json.dumps(out))
    raise SystemExit(0 if all(checks.values()) else 1)


if __name__ == "__main__":
    main()
