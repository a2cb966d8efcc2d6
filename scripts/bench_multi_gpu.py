"""One plan on 1 GPU and on N GPUs through Accelerate: same loss curve, more tokens/s.

    python scripts/bench_multi_gpu.py --processes 2 [--steps 300] [--out docs]

Runs ``muse plan run`` on one process and ``muse plan run --num-processes N``
on the same plan (same global batch: one GPU accumulates N micro-batches,
N GPUs take one each), then reads both runs back from the store and writes
the loss curves' agreement and the throughput ratio to
``<out>/bench_multi_gpu.{json,md}``. Needs N CUDA GPUs.
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

import yaml

ROOT = Path(__file__).resolve().parent.parent


def plan(steps: int, processes: int) -> dict:
    return {
        "name": "ddp-check",
        "description": "An 85M-parameter decoder on generated arithmetic text; 1 vs N GPUs at one global batch.",
        "model": {"scale": "125M", "residual": "standard", "seq_len": 1024, "vocab_size": 260,
                  "shape": {"layers": 12, "d_model": 768, "n_heads": 12}},
        "training": {"precision": "bf16", "micro_batch": 16, "global_batch": 16 * processes, "lr": 1e-3,
                     "warmup_steps": 30, "schedule": "cosine", "clip_grad_norm": 1.0, "seed": 0},
        "data": {"source": "arithmetic", "tokenizer": "byte"},
        "stages": [{"name": "pretrain", "kind": "pretrain", "steps": steps,
                    "checkpoint_every": steps, "eval_every": steps // 3}],
    }


def muse(*args: str, env: dict) -> float:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "muse_plan", *args], env=env, check=True)
    return time.perf_counter() - t0


def series(run_id: int, name: str) -> list[tuple[int, float]]:
    from muse_plan.store import runs
    from muse_plan.store.db import Store

    with Store().read() as session:
        return runs.metric_series(session, run_id, name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--out", type=Path, default=ROOT / "docs")
    args = parser.parse_args()

    import torch

    home = Path(tempfile.mkdtemp(prefix="muse-ddp-"))
    os.environ["MUSE_HOME"] = str(home)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    plan_file = home / "ddp-check.yaml"
    plan_file.write_text(yaml.safe_dump(plan(args.steps, args.processes)))
    muse("plan", "import", str(plan_file), env=env)
    wall = {"1": muse("plan", "run", "ddp-check", env=env),
            str(args.processes): muse("plan", "run", "ddp-check", "--num-processes", str(args.processes), env=env)}

    skip = max(10, args.steps // 10)  # leave out warm-up steps (allocator, kernels' autotuning)
    loss1, lossn = series(1, "loss"), series(2, "loss")
    assert [s for s, _ in loss1] == [s for s, _ in lossn] == list(range(1, args.steps + 1))
    diffs = [abs(a - b) for (_, a), (_, b) in zip(loss1, lossn)]
    tail = slice(len(diffs) - args.steps // 5, None)
    tps1 = statistics.median(v for s, v in series(1, "tokens_per_s") if s > skip)
    tpsn = statistics.median(v for s, v in series(2, "tokens_per_s") if s > skip)
    val1, valn = series(1, "val_loss"), series(2, "val_loss")
    result = {
        "device": torch.cuda.get_device_name(0), "gpus": args.processes, "torch": torch.__version__,
        "plan": plan(args.steps, args.processes), "steps": args.steps,
        "loss_first_10": {"1gpu": [v for _, v in loss1[:10]], f"{args.processes}gpu": [v for _, v in lossn[:10]]},
        "final_loss": {"1gpu": loss1[-1][1], f"{args.processes}gpu": lossn[-1][1]},
        "val_loss": {"1gpu": val1, f"{args.processes}gpu": valn},
        "mean_abs_loss_diff_last_20pct": statistics.mean(diffs[tail]),
        "max_abs_loss_diff": max(diffs),
        "max_abs_loss_diff_step": 1 + diffs.index(max(diffs)),
        "mean_abs_loss_diff_all": statistics.mean(diffs),
        "loss": {"1gpu": [v for _, v in loss1], f"{args.processes}gpu": [v for _, v in lossn]},
        "mean_loss_last_20pct": statistics.mean(v for _, v in loss1[tail]),
        "tokens_per_s": {"1gpu": tps1, f"{args.processes}gpu": tpsn},
        "speedup": tpsn / tps1,
        "wall_s": wall,
        "command": f"python scripts/bench_multi_gpu.py --processes {args.processes} --steps {args.steps}",
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_multi_gpu.json").write_text(json.dumps(result, indent=2))
    n = args.processes
    md = [
        f"# One plan on 1 and {n} GPUs (Accelerate/DDP)", "",
        f"Command: `{result['command']}`  ",
        f"Device: {n}× {result['device']}, torch {result['torch']}. Plan: 12×768 decoder (85M "
        f"parameters), seq 1024, bf16, global batch {16 * n} sequences (1 GPU: micro 16 × accumulation {n}; "
        f"{n} GPUs: micro 16 each), {args.steps} steps on generated arithmetic text.", "",
        "| | 1 GPU | %d GPUs |" % n, "| --- | --- | --- |",
        f"| tokens/s (median, steps > {skip}) | {tps1:,.0f} | {tpsn:,.0f} |",
        f"| final train loss | {loss1[-1][1]:.4f} | {lossn[-1][1]:.4f} |",
        f"| final val loss | {val1[-1][1]:.4f} | {valn[-1][1]:.4f} |",
        f"| wall time incl. start-up (s) | {wall['1']:.0f} | {wall[str(n)]:.0f} |", "",
        f"Speedup: **{result['speedup']:.2f}×** tokens/s (target ≥ 1.8×).  ",
        f"Loss curves: mean |Δloss| over the last 20% of steps {result['mean_abs_loss_diff_last_20pct']:.4f} "
        f"(mean loss there {result['mean_loss_last_20pct']:.3f}); over all steps "
        f"{result['mean_abs_loss_diff_all']:.4f}; largest |Δloss| {result['max_abs_loss_diff']:.4f} at step "
        f"{result['max_abs_loss_diff_step']}. Both runs see the same sequences in the same optimizer steps; "
        "the difference is bf16 reduction order.",
    ]
    (args.out / "bench_multi_gpu.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
