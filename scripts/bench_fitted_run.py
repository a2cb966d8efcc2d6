"""Fit a plan to this GPU with `muse plan optimize`, run the chosen settings, and
check the prediction: no out-of-memory, and how much of the card the run used.

    python scripts/bench_fitted_run.py [--scale 350M] [--global-batch 32] [--steps 200] [--out docs]

The plan leaves precision, micro-batch and checkpointing open; the optimizer
fills them (stored as its revision), then `muse plan run` trains. Writes the
predicted peak, the measured `max_memory_allocated` and the card's size to
``<out>/bench_fitted_run.{json,md}``. Needs one CUDA GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", default="350M")
    parser.add_argument("--global-batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--out", type=Path, default=ROOT / "docs")
    args = parser.parse_args()
    import torch

    home = Path(tempfile.mkdtemp(prefix="muse-fit-"))
    os.environ["MUSE_HOME"] = str(home)
    plan = {"name": "fit-check", "model": {"scale": args.scale, "seq_len": 2048, "vocab_size": 32000},
            "training": {"global_batch": args.global_batch, "lr": 3e-4},
            "stages": [{"name": "pretrain", "kind": "pretrain", "steps": args.steps,
                        "checkpoint_every": args.steps, "eval_every": args.steps}]}
    path = home / "fit-check.yaml"
    path.write_text(yaml.safe_dump(plan))
    muse = [sys.executable, "-m", "muse_plan"]
    subprocess.run([*muse, "plan", "import", str(path)], check=True)
    fitted = subprocess.run([*muse, "plan", "optimize", "fit-check", "--json"], check=True,
                            capture_output=True, text=True)
    fit = json.loads(fitted.stdout)
    subprocess.run([*muse, "plan", "optimize", "fit-check", "--dry-run"], check=True)
    run = subprocess.run([*muse, "plan", "run", "fit-check"])

    from muse_plan.store import runs
    from muse_plan.store.db import Store

    with Store().read() as session:
        memory = [v for _, v in runs.metric_series(session, 1, "memory_gib")]
        tps = [v for s, v in runs.metric_series(session, 1, "tokens_per_s") if s > 10]
    card = torch.cuda.get_device_properties(0).total_memory / 2**30
    stage = fit["chosen"]["stages"][0]
    result = {
        "device": torch.cuda.get_device_name(0), "torch": torch.__version__, "card_gib": card,
        "plan": plan, "verdict": fit["verdict"], "settings": fit["chosen"]["settings"],
        "predicted_peak_gib": stage["memory"]["total"] / 2**30,
        "predicted_without_overhead_gib": (stage["memory"]["total"] - stage["memory"]["overhead"]) / 2**30,
        "predicted_tokens_per_s": stage["tokens_per_s"],
        "run_exit_code": run.returncode, "steps_recorded": len(memory),
        "measured_peak_allocated_gib": max(memory) if memory else None,
        "measured_tokens_per_s_median": sorted(tps)[len(tps) // 2] if tps else None,
        "command": f"python scripts/bench_fitted_run.py --scale {args.scale} --global-batch {args.global_batch} "
                   f"--steps {args.steps}",
    }
    used = result["measured_peak_allocated_gib"]
    result["card_fraction_used"] = used / card if used else None
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_fitted_run.json").write_text(json.dumps(result, indent=2))
    s = result["settings"]
    md = [
        "# A fitted plan, run", "",
        f"Command: `{result['command']}` on {result['device']} ({card:.0f} GiB), torch {result['torch']}.", "",
        f"Plan: {args.scale} decoder, sequence 2048, global batch {args.global_batch}, {args.steps} steps; "
        f"precision, micro-batch and checkpointing left open. Verdict: {result['verdict']}; chosen: "
        f"precision {s['precision']}, micro-batch {s['micro_batch']} × accumulation {s['grad_accum']}, "
        f"checkpointing {s['checkpointing']}.", "",
        "| | predicted | measured |", "| --- | --- | --- |",
        f"| peak GiB (allocator) | {result['predicted_without_overhead_gib']:.1f} | "
        f"{used if used is None else f'{used:.1f}'} |",
        f"| tokens/s | {result['predicted_tokens_per_s']:,.0f} | "
        f"{result['measured_tokens_per_s_median'] or 0:,.0f} |", "",
        f"Run exit code {run.returncode} ({'no out-of-memory' if run.returncode == 0 else 'FAILED'}); "
        f"the run used {result['card_fraction_used'] or 0:.0%} of the card (target ≥ 80%).",
    ]
    (args.out / "bench_fitted_run.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
