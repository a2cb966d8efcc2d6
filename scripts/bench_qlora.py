"""QLoRA through ``muse plan run`` against the memory model and against peft + bitsandbytes
used directly, on one GPU (needs the ``qlora`` extra: bitsandbytes).

    python scripts/bench_qlora.py --make-model .bench/llama-7b      # once: a random-weight 7B
    python scripts/bench_qlora.py --model .bench/llama-7b --steps 20 --out docs/bench_qlora.json

The model: a real 7B Llama-style config (4096 wide, 32 layers, 32 heads, SwiGLU
11008, vocab 32000) with random weights, saved as a local folder (nothing is
downloaded). Both sides train the same thing: a 4-bit NF4 base (double
quantisation, bf16 compute), LoRA rank 16 (alpha 32) on every attention and MLP
projection of every layer, sequence 1024, micro-batch 1, activation
checkpointing, AdamW on the adapters.

- muse: a plan (``model.family: hf``) imported and run with ``muse plan run``
  in a subprocess, as a user runs it; its recorded ``memory_gib`` (peak
  allocated per step) and ``tokens_per_s`` are read back from the store; the
  prediction is ``muse plan optimize --json`` for the same plan on this GPU.
- the peer: transformers ``from_pretrained`` with ``BitsAndBytesConfig``, peft
  ``get_peft_model``, gradient checkpointing, a plain loop, timed the same way.
- the 8 GB fit: the same plan with ``compute: 1xRTX3080-8GB`` fitted by
  ``muse plan optimize`` and run here with the settings it chose; its measured
  peak must stay under 8 GiB.

Ratios are side by side from one process tree on one GPU; the script prints
one JSON object and writes it to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SEQ, RANK, ALPHA = 1024, 16, 32
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make_model(folder: Path) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096,
                         bos_token_id=256, eos_token_id=257, pad_token_id=258, tie_word_embeddings=False)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(folder)
    print(f"wrote {folder}", file=sys.stderr)


def plan(model: Path, steps: int, compute: str, training: dict) -> dict:
    return {
        "name": f"qlora-{compute.lower()}",
        "model": {"scale": "7B", "family": "hf", "init_from": str(model), "seq_len": SEQ, "vocab_size": 32000},
        "techniques": {"lora": {"rank": RANK, "alpha": ALPHA, "target_modules": TARGETS, "layers_fraction": 1.0,
                                "quantize_base": "4bit"}},
        "compute": compute,
        "training": {"precision": "bf16", "lr": 2e-4, "warmup_steps": 2, **training},
        "stages": [{"name": "tune", "kind": "finetune", "steps": steps, "checkpoint_every": 10 * steps,
                    "eval_every": 10 * steps}],
    }


def muse(home: Path, *args: str) -> str:
    env = {**os.environ, "MUSE_HOME": str(home), "PYTHONPATH": f"{ROOT}:{os.environ.get('PYTHONPATH', '')}"}
    done = subprocess.run([sys.executable, "-m", "muse_plan", *args], env=env, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"muse {' '.join(args)} exited {done.returncode}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return done.stdout


def run_muse(home: Path, data: dict, optimize_for: str | None = None) -> dict:
    import yaml

    home.mkdir(parents=True, exist_ok=True)
    path = home / f"{data['name']}.yaml"
    path.write_text(yaml.safe_dump(data))
    muse(home, "plan", "import", str(path))
    fit = json.loads(muse(home, "plan", "optimize", data["name"], "--json", *(
        [] if optimize_for else ["--dry-run"])))
    t0 = time.perf_counter()
    muse(home, "plan", "run", data["name"], "--no-probe", "--force")
    wall = time.perf_counter() - t0
    sys.path.insert(0, str(ROOT))
    os.environ["MUSE_HOME"] = str(home)
    from muse_plan.store import runs
    from muse_plan.store.db import Store

    with Store().read() as session:
        run = runs.list_runs(session)[0][0]
        memory = [v for _, v in runs.metric_series(session, run.id, "memory_gib")]
        speed = [v for _, v in runs.metric_series(session, run.id, "tokens_per_s")]
        settings = json.loads(muse(home, "plan", "export", data["name"], "--format", "json"))["training"]
    priced = (fit.get("chosen") or fit["written"])["stages"][0]
    memory_model = priced["memory"]  # bytes; the measured peak is what PyTorch allocated: no CUDA context
    return {"predicted_peak_gib": (memory_model["total"] - memory_model["overhead"]) / 2**30,
            "predicted_breakdown_gib": {k: v / 2**30 for k, v in memory_model.items()},
            "predicted_tokens_per_s": priced["tokens_per_s"],
            "fit": {k: fit.get(k) for k in ("verdict", "hardware")}, "settings": settings,
            "measured_peak_gib": max(memory), "tokens_per_s": statistics.median(speed[3:] or speed),
            "steps": len(speed), "wall_s": wall}


def run_peer(model_dir: Path, steps: int) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                           bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=q, dtype=torch.bfloat16,
                                                 device_map={"": 0}, local_files_only=True)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    model = get_peft_model(model, LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=TARGETS, lora_dropout=0.0))
    model.train()  # from_pretrained gives eval mode, where transformers skips gradient checkpointing
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4)
    g = torch.Generator(device="cuda").manual_seed(0)
    speeds, peaks = [], []
    for _ in range(steps):
        ids = torch.randint(0, 256, (1, SEQ + 1), device="cuda", generator=g)
        torch.cuda.reset_peak_memory_stats()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = model(input_ids=ids[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.size(-1)), ids[:, 1:].reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        speeds.append(SEQ / (time.perf_counter() - t0))
        peaks.append(torch.cuda.max_memory_allocated() / 2**30)
    return {"measured_peak_gib": max(peaks), "tokens_per_s": statistics.median(speeds[3:]), "steps": steps}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--make-model", type=Path)
    parser.add_argument("--model", type=Path)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--only", choices=("muse", "peer", "fit8"), action="append")
    parser.add_argument("--out", type=Path)
    a = parser.parse_args()
    if a.make_model:
        make_model(a.make_model)
        return
    import torch

    out = {"gpu": torch.cuda.get_device_name(0), "model": "random-weight Llama 7B config (4096×32, vocab 32000)",
           "seq": SEQ, "lora_rank": RANK, "targets": TARGETS, "steps": a.steps}
    gpu = "1xH200-141GB" if "H200" in out["gpu"] else "1xH100-80GB"
    only = a.only or ["muse", "peer", "fit8"]
    with tempfile.TemporaryDirectory() as tmp:
        if "muse" in only:
            out["muse"] = run_muse(Path(tmp) / "a", plan(a.model.resolve(), a.steps, gpu, {
                "micro_batch": 1, "grad_accum": 1, "activation_checkpointing": "full"}))
        if "fit8" in only:
            out["fit_8gb"] = run_muse(Path(tmp) / "b", plan(a.model.resolve(), a.steps, "1xRTX3080-8GB", {}),
                                      optimize_for="1xRTX3080-8GB")
    if "peer" in only:
        out["peer"] = run_peer(a.model.resolve(), a.steps)
    if "muse" in out and "peer" in out:
        out["muse_over_peer"] = {"tokens_per_s": out["muse"]["tokens_per_s"] / out["peer"]["tokens_per_s"],
                                 "peak": out["muse"]["measured_peak_gib"] / out["peer"]["measured_peak_gib"]}
    text = json.dumps(out, indent=2)
    print(text)
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
