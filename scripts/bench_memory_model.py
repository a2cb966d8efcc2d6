"""The memory model against the GPU: predicted peak vs torch.cuda.max_memory_allocated.

    python scripts/bench_memory_model.py [--out docs] [--only N]

For each configuration (size, residual mode, micro-batch, checkpointing) it
builds the architecture engine's model, trains two steps the way the
executor does (bf16 autocast over fp32 weights, AdamW, clipping) and reads
the allocator's peak. Beside it: muse's prediction without the framework
overhead term (the allocator's peak does not see the CUDA context), and the
weights + gradients + Adam count that Accelerate's estimate-memory and
DeepSpeed's estimators stop at. Writes ``<out>/bench_memory_model.{json,md}``.
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

# (scale, residual, micro_batch, checkpointing); sequence 2048, vocab 32000
CONFIGS = [
    ("125M", "standard", 8, "none"), ("125M", "mhc", 8, "none"), ("125M", "standard", 16, "full"),
    ("350M", "standard", 1, "none"), ("350M", "standard", 8, "none"), ("350M", "standard", 8, "full"),
    ("350M", "mhc", 8, "none"), ("350M", "mhc", 4, "selective"), ("350M", "ddl", 4, "none"),
    ("760M", "standard", 4, "none"), ("760M", "standard", 16, "full"), ("1.3B", "standard", 2, "none"),
    ("1.3B", "standard", 8, "full"), ("1.3B", "mhc", 2, "full"), ("1.3B", "standard", 4, "selective"),
]


def measure(scale: str, residual: str, micro: int, ckpt: str) -> dict:
    import torch

    from engines.architecture.config import ModelConfig, param_count
    from engines.architecture.model import DecoderLM
    from muse_plan.optimizer import memory
    from muse_plan.optimizer.config import TrainConfig

    config = ModelConfig.from_scale(scale, vocab_size=32000, seq_len=2048, residual=residual)
    cfg = TrainConfig(model=config, micro_batch=micro, precision="bf16", checkpointing=ckpt)
    predicted = memory.estimate(cfg, device="cuda")
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    model = DecoderLM(config).cuda()
    model.set_checkpointing(ckpt)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
                            lr=1e-4, betas=(0.9, 0.95))
    x = torch.randint(0, 32000, (micro, 2048), device="cuda")
    t0 = time.perf_counter()
    for _ in range(2):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(x, x)[1]  # as the executor's trainer: the logits are not kept
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    reserved = torch.cuda.max_memory_reserved()
    del model, opt, x, loss
    n = param_count(config)
    without_overhead = predicted.total - predicted.overhead
    return {
        "scale": scale, "residual": residual, "micro_batch": micro, "checkpointing": ckpt, "params": n,
        "measured_peak_gib": peak / GIB, "measured_reserved_gib": reserved / GIB,
        "predicted_gib": without_overhead / GIB, "predicted_with_overhead_gib": predicted.total / GIB,
        "error": without_overhead / peak - 1,
        "weights_grads_adam_gib": 16 * memory.trainable_param_count(cfg) / GIB,  # fp32 W + G + 2 moments
        "breakdown_gib": {k: v / GIB for k, v in predicted.as_dict().items()},
        "seconds": time.perf_counter() - t0,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs")
    parser.add_argument("--only", type=int, default=None, help="first N configurations")
    args = parser.parse_args()
    import torch

    rows = []
    for config in CONFIGS[: args.only]:
        try:
            rows.append(measure(*config))
        except torch.cuda.OutOfMemoryError:
            rows.append({"scale": config[0], "residual": config[1], "micro_batch": config[2],
                         "checkpointing": config[3], "oom": True})
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
        f"Command: `{summary['command']}` on {summary['device']}, torch {summary['torch']}.",
        "Each row trains two steps (bf16 autocast over fp32 weights, AdamW, clipping) at sequence 2048,",
        "vocab 32000; measured = `torch.cuda.max_memory_allocated`; predicted = muse's peak without its",
        "framework-overhead term (the allocator does not see the CUDA context); W+G+Adam = weights,",
        "gradients and Adam moments only, what Accelerate's estimate-memory and DeepSpeed's estimators count.",
        "",
        "| scale | residual | micro | checkpointing | measured GiB | predicted GiB | error | W+G+Adam GiB |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        if r.get("oom"):
            lines.append(f"| {r['scale']} | {r['residual']} | {r['micro_batch']} | {r['checkpointing']} | OOM | | | |")
            continue
        lines.append(f"| {r['scale']} | {r['residual']} | {r['micro_batch']} | {r['checkpointing']} | "
                     f"{r['measured_peak_gib']:.2f} | {r['predicted_gib']:.2f} | {r['error']:+.1%} | "
                     f"{r['weights_grads_adam_gib']:.2f} |")
    lines += ["", f"Median absolute error {summary['median_abs_error']:.1%}, worst {summary['max_abs_error']:.1%} "
              "(target: median ≤ 10%, worst ≤ 20%)."]
    (args.out / "bench_memory_model.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
