"""The memory model against the GPU: predicted peak vs torch.cuda.max_memory_allocated.

    python scripts/bench_memory_model.py [--out docs] [--only N]

For each configuration (size, residual mode, micro-batch, checkpointing;
full training, LoRA, or one GRPO step) it builds the architecture engine's
model and runs two steps the way the executor does (bf16 autocast over fp32
trainable weights, AdamW, clipping), then reads the allocator's peak:

- ``full``: every parameter trains (sequence 2048, vocab 32000);
- ``lora``: the GRPO engine's LoRA (peft adapters, rank 16, on the query and
  value projections of the last quarter of the layers, Lee & Tong's
  placement), the frozen base kept in bf16 as the engine keeps it;
- ``grpo`` / ``grpo_full``: the GRPO engine's own ``reasoning_rl`` micro-step
  (``GrpoTrainer``: 2 prompts × a group of 8 completions sampled with the KV
  cache up to 512 new tokens, the byte tokenizer's 260-token vocabulary,
  then the clipped-ratio update over the 16 sequences), with LoRA (the KL
  reference is the model with its adapters off) or fully trained with a KL
  reference copy (β = 0.04).

Beside it: muse's prediction without the framework overhead term (the
allocator's peak does not see the CUDA context), and Accelerate's
``estimate-memory`` figure for the model ("Training using Adam" at float32:
the largest of its model, gradient, optimizer and step terms, 16 B a
parameter, from ``accelerate.commands.estimate.estimate_training_usage``),
where it applies (it has no notion of LoRA or sampling). Writes
``<out>/bench_memory_model.{json,md}``.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GIB = 2**30

# (scale, residual, micro_batch, checkpointing, mode); full and lora: sequence 2048, vocab 32000
CONFIGS = [
    ("125M", "standard", 8, "none", "full"), ("125M", "mhc", 8, "none", "full"),
    ("125M", "standard", 16, "full", "full"), ("350M", "standard", 1, "none", "full"),
    ("350M", "standard", 8, "none", "full"), ("350M", "standard", 8, "full", "full"),
    ("350M", "mhc", 8, "none", "full"), ("350M", "mhc", 4, "selective", "full"), ("350M", "ddl", 4, "none", "full"),
    ("760M", "standard", 4, "none", "full"), ("760M", "standard", 16, "full", "full"),
    ("1.3B", "standard", 2, "none", "full"), ("1.3B", "standard", 8, "full", "full"),
    ("1.3B", "mhc", 2, "full", "full"), ("1.3B", "standard", 4, "selective", "full"),
    ("350M", "standard", 8, "none", "lora"), ("1.3B", "standard", 4, "none", "lora"),
    ("760M", "mhc", 4, "full", "lora"),
    ("350M", "standard", 16, "none", "grpo"), ("125M", "standard", 16, "none", "grpo_full"),
]
LORA = {"rank": 16, "alpha": 32, "target_modules": ["q_proj", "v_proj"], "layers_fraction": 0.25}
PROMPTS, GROUP, NEW_TOKENS, GRPO_VOCAB = 2, 8, 512, 260
DEVICE = "cuda"


def accelerate_estimate(params: int) -> float | None:
    """Accelerate's estimate-memory "Training using Adam" at float32, in bytes (None without accelerate)."""
    try:
        from accelerate.commands.estimate import estimate_training_usage
    except ImportError:
        return None
    return float(max(estimate_training_usage(4 * params, "float32").values()))


def _optimizer(model):
    import torch

    trainable = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in trainable if p.dim() >= 2]
    rest = [p for p in trainable if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
                             lr=1e-4, betas=(0.9, 0.95))


def _train_steps(config, micro: int, ckpt: str, lora: bool):
    """Two executor-like steps of next-token training; returns the model (for its sizes)."""
    import torch

    from engines.architecture.model import DecoderLM
    from engines.grpo.policy import LoraSettings, add_lora, keep_frozen_in
    from engines.options import LoraOptions

    model = DecoderLM(config).to(DEVICE)
    model.set_checkpointing(ckpt)
    if lora:
        add_lora(model, LoraSettings.from_options(LoraOptions(**LORA)))
        keep_frozen_in(model, torch.bfloat16)
    opt = _optimizer(model)
    x = torch.randint(0, config.vocab_size, (micro, config.seq_len), device=DEVICE)
    for _ in range(2):
        with torch.autocast(DEVICE, dtype=torch.bfloat16):
            loss = model(x, x)[1]  # as the executor's trainer: the logits are not kept
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return {}


def _grpo_steps(config, ckpt: str, lora: bool):
    """Two micro-steps of the GRPO engine's reasoning_rl stage; returns the realised widths."""
    import torch

    from engines.contract import StageSetup
    from engines.grpo.options import parse
    from engines.grpo.trainer import GrpoTrainer

    options = {"tasks": ["multiplication:3x3"], "algorithm": "grpo", "group_size": GROUP,
               "max_new_tokens": NEW_TOKENS, "temperature": 1.0, "eval_problems": 1,
               "kl_beta": 0.04, **({"lora": LORA} if lora else {})}
    t = GrpoTrainer()
    t.setup(StageSetup(name="rl", kind="reasoning_rl", model=config, micro_batch=PROMPTS,
                       options=parse("reasoning_rl", {}, options),
                       activation_checkpointing=ckpt, device=DEVICE, frozen_precision="bf16"))
    opt = _optimizer(t.model)
    widths, prompts = [], []
    phases: dict[str, float] = {}  # the allocator's running peak after each phase, GiB: where the peak is

    def mark(name: str) -> None:
        torch.cuda.synchronize()
        phases[name] = max(phases.get(name, 0.0), torch.cuda.max_memory_allocated() / GIB)
        phases[f"{name} (allocated)"] = torch.cuda.memory_allocated() / GIB

    mark("setup")
    for _ in range(2):
        with torch.autocast(DEVICE, dtype=torch.bfloat16):
            groups = t.next_batch()
            mark("sampling")
            loss = t.micro_step(groups).loss
            mark("forward")
        loss.backward()
        mark("backward")
        torch.nn.utils.clip_grad_norm_([p for p in t.model.parameters() if p.requires_grad], 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        mark("step")
        widths.append(sum(len(g.prompt) + max(map(len, g.completions)) for g in groups) / len(groups))
        prompts.append(max(len(g.prompt) for g in groups))
    return {"mean_width": max(widths), "prompt_tokens": max(prompts), "phases_gib": phases,
            "widths": [[len(g.prompt) + max(map(len, g.completions)) for g in groups]]}


def measure(scale: str, residual: str, micro: int, ckpt: str, mode: str = "full") -> dict:
    import torch

    from engines.architecture.config import ModelConfig, param_count
    from muse_plan.optimizer import memory
    from muse_plan.optimizer.config import GenerationConfig, LoraConfig, TrainConfig

    grpo = mode.startswith("grpo")
    lora = mode in ("lora", "grpo")
    vocab, seq = (GRPO_VOCAB, 32 + NEW_TOKENS) if grpo else (32000, 2048)
    config = ModelConfig.from_scale(scale, vocab_size=vocab, seq_len=seq, residual=residual)
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    shape = _grpo_steps(config, ckpt, lora) if grpo else _train_steps(config, micro, ckpt, lora)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    reserved = torch.cuda.max_memory_reserved()
    seconds = time.perf_counter() - t0
    gc.collect()
    lora_cfg = LoraConfig(rank=LORA["rank"], target_modules=tuple(LORA["target_modules"]),
                          layers_fraction=LORA["layers_fraction"]) if lora else None
    generation = None
    if grpo:  # the update's sequences: prompt + the group's longest completion (measured)
        generation = GenerationConfig(prompts=PROMPTS, group_size=GROUP, prompt_tokens=shape["prompt_tokens"],
                                      completion_tokens=NEW_TOKENS, reference_model=True)
        config = ModelConfig.from_scale(scale, vocab_size=vocab, seq_len=round(shape["mean_width"]),
                                        residual=residual)
    cfg = TrainConfig(model=config, micro_batch=micro, precision="bf16", checkpointing=ckpt, lora=lora_cfg,
                      generation=generation)
    predicted = memory.estimate(cfg, device="cuda")
    n = param_count(config)
    without_overhead = predicted.total - predicted.overhead
    accelerate = accelerate_estimate(n) if mode == "full" else None
    return {
        "scale": scale, "residual": residual, "micro_batch": micro, "checkpointing": ckpt, "mode": mode,
        "params": n, "trainable": memory.trainable_param_count(cfg), **shape,
        "measured_peak_gib": peak / GIB, "measured_reserved_gib": reserved / GIB,
        "predicted_gib": without_overhead / GIB, "predicted_with_overhead_gib": predicted.total / GIB,
        "error": without_overhead / peak - 1,
        "accelerate_estimate_gib": None if accelerate is None else accelerate / GIB,
        "breakdown_gib": {k: v / GIB for k, v in predicted.as_dict().items()},
        "seconds": seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs")
    parser.add_argument("--only", type=int, default=None, help="first N configurations")
    parser.add_argument("--rows", default=None, help="these configurations only, by index: 15,16,18")
    args = parser.parse_args()
    import torch

    rows = []
    chosen = [CONFIGS[int(i)] for i in args.rows.split(",")] if args.rows else CONFIGS[: args.only]
    for config in chosen:
        try:
            rows.append(measure(*config))
        except torch.cuda.OutOfMemoryError:
            rows.append({"scale": config[0], "residual": config[1], "micro_batch": config[2],
                         "checkpointing": config[3], "mode": config[4], "oom": True})
            torch.cuda.empty_cache()
        r = rows[-1]
        print(json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items()
                          if k != "breakdown_gib"}), flush=True)
    errors = [abs(r["error"]) for r in rows if "error" in r]
    summary = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__,
               "median_abs_error": statistics.median(errors), "max_abs_error": max(errors),
               "command": "python scripts/bench_memory_model.py", "rows": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_memory_model.json").write_text(json.dumps(summary, indent=2))
    lines = [
        "# Memory model vs the GPU", "",
        f"Command: `{summary['command']}` on {summary['device']}, torch {summary['torch']}.", "",
        "Each row runs two steps the way the executor does (bf16 autocast over fp32 trainable weights, AdamW,",
        "clipping). *full*: every parameter trains, sequence 2048, vocab 32000. *lora*: the GRPO engine's peft",
        "LoRA (rank 16 on q/v of the last quarter of layers), base kept in bf16. *grpo*: the GRPO engine's",
        f"reasoning_rl micro-step ({PROMPTS} prompts × {GROUP} completions sampled with the KV cache, up to "
        f"{NEW_TOKENS} new tokens, byte vocabulary; the update over all {PROMPTS * GROUP}), with LoRA (micro = "
        "sequences); *grpo_full*: the same fully trained with a bf16 KL reference copy.",
        "Measured = `torch.cuda.max_memory_allocated`; predicted = muse's peak without its framework-overhead",
        "term (the allocator does not see the CUDA context). Accelerate = `accelerate estimate-memory`'s",
        "\"Training using Adam\" at float32 for the same parameter count (weights, gradients and Adam only;",
        "it has no activations, LoRA or sampling).",
        "",
        "| scale | residual | mode | micro | checkpointing | measured GiB | predicted GiB | error | "
        "Accelerate GiB |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        head = f"| {r['scale']} | {r['residual']} | {r['mode']} | {r['micro_batch']} | {r['checkpointing']} |"
        if r.get("oom"):
            lines.append(f"{head} OOM | | | |")
            continue
        acc = "n/a" if r["accelerate_estimate_gib"] is None else f"{r['accelerate_estimate_gib']:.2f}"
        lines.append(f"{head} {r['measured_peak_gib']:.2f} | {r['predicted_gib']:.2f} | {r['error']:+.1%} | {acc} |")
    lines += ["", f"Median absolute error {summary['median_abs_error']:.1%}, worst {summary['max_abs_error']:.1%} "
              "(target: median ≤ 10%, worst ≤ 20%)."]
    (args.out / "bench_memory_model.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
