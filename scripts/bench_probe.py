"""The probe on a GPU: the memory model's prediction beside one measured step, per stage.

    python scripts/bench_probe.py [--out docs]     # one CUDA GPU, a few minutes

Each plan below is imported into a temporary ``MUSE_HOME`` and probed through
the product path, ``muse plan optimize NAME --probe --dry-run --json``: the
fit, then one forward, backward and optimizer step of every stage at its
largest shapes (``muse_plan/executor/probe.py``). Then one short plan runs
through ``muse plan run`` (which probes by default on a GPU) and its probe
events are read back from the store. Pretraining stages, and RL stages that
sample a group of completions per prompt (GRPO with LoRA or a full
fine-tune's KL reference, T-SPMO with its replayed groups) and cold-start
SFT, at 125M-1.3B.

Reported per stage: the memory model's peak (allocated bytes, without its
CUDA-context and fragmentation terms) against the allocator's measured
``max_memory_allocated``, and the memory the process held at its peak
(reserved + context) against the usable memory. Writes
``<out>/bench_probe.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

LORA = {"rank": 16, "alpha": 32, "target_modules": ["q_proj", "v_proj"], "layers_fraction": 0.25}
RL = {"tasks": ["multiplication:3x3"], "max_new_tokens": 256, "eval_problems": 4, "temperature": 1.0}


def plans(gpu: str) -> list[dict]:
    def pretrain(name: str, scale: str, micro: int, ckpt: str, residual: str = "standard", **model) -> dict:
        return {"name": name, "model": {"scale": scale, "seq_len": 2048, "vocab_size": 32000, "residual": residual,
                                        **model},
                "techniques": {"mhc": {}} if residual == "mhc" else {},
                "compute": gpu, "training": {"precision": "bf16", "micro_batch": micro, "global_batch": micro * 4,
                                             "activation_checkpointing": ckpt, "sharding": "none",
                                             "offload": "none"},
                "stages": [{"name": "pretrain", "kind": "pretrain", "steps": 10}]}

    def rl(name: str, kind: str, micro: int, options: dict, lora: bool = True) -> dict:
        return {"name": name, "model": {"scale": "125M", "seq_len": 512, "vocab_size": 260},
                "techniques": {"lora": LORA} if lora else {},
                "compute": gpu, "training": {"precision": "bf16", "micro_batch": micro, "global_batch": micro,
                                             "activation_checkpointing": "none", "sharding": "none",
                                             "offload": "none", "lr": 1e-4},
                "stages": [{"name": kind, "kind": kind, "steps": 10, "options": {**RL, **options}}]}

    return [
        pretrain("pretrain-350m", "350M", 8, "none"),
        pretrain("pretrain-350m-mhc", "350M", 4, "selective", residual="mhc"),
        pretrain("pretrain-1.3b-full", "1.3B", 8, "full"),
        rl("grpo-125m-lora", "reasoning_rl", 4, {"algorithm": "grpo", "group_size": 8, "kl_beta": 0.04}),
        rl("grpo-125m-full", "reasoning_rl", 2, {"algorithm": "grpo", "group_size": 8, "kl_beta": 0.04},
           lora=False),
        rl("tspmo-125m-lora", "reasoning_rl", 2, {"algorithm": "t_spmo", "group_size": 16, "success_budget": 2}),
        rl("sft-125m", "cold_start_sft", 16, {}, lora=False),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs")
    args = parser.parse_args()
    import torch
    import yaml
    from typer.testing import CliRunner

    home = Path(tempfile.mkdtemp(prefix="muse-probe-"))
    os.environ["MUSE_HOME"] = str(home)
    from muse_plan.cli.main import app
    from muse_plan.store import runs
    from muse_plan.store.db import Store

    name = torch.cuda.get_device_name(0)
    gpu = "1xH200" if "H200" in name else "1xH100-80GB" if "H100" in name else "1xA100-80GB"
    cli = CliRunner()
    rows = []
    for plan in plans(gpu):
        path = home / f"{plan['name']}.yaml"
        path.write_text(yaml.safe_dump(plan))
        assert cli.invoke(app, ["plan", "import", str(path)]).exit_code == 0, plan["name"]
        t0 = time.perf_counter()
        result = cli.invoke(app, ["plan", "optimize", plan["name"], "--probe", "--dry-run", "--json"])
        if result.exit_code != 0:
            rows.append({"plan": plan["name"], "error": result.output.strip()[-300:]})
            print(plan["name"], "failed:", result.output[-300:], flush=True)
            continue
        data = json.loads(result.stdout)
        for p in data["probes"]:
            rows.append({"plan": plan["name"], "verdict": data["verdict"], **p,
                         "wall_s": time.perf_counter() - t0})
            print(json.dumps(rows[-1]), flush=True)
    # the product path: `muse plan run` probes before step 1 on a GPU, and records it
    run_plan = plans(gpu)[0] | {"name": "run-probed"}
    path = home / "run-probed.yaml"
    path.write_text(yaml.safe_dump(run_plan))
    cli.invoke(app, ["plan", "import", str(path)])
    t0 = time.perf_counter()
    ran = cli.invoke(app, ["plan", "run", "run-probed"])
    with Store().read() as session:
        events = [e for e in runs.events(session, 1, limit=100) if e.kind == "probe"]
        memory = [v for _, v in runs.metric_series(session, 1, "memory_gib")]
    run = {"exit_code": ran.exit_code, "seconds": time.perf_counter() - t0,
           "predicted_gib": next((r["predicted_gib"] for r in rows if r["plan"] == "pretrain-350m"), None),
           "probe_events": [e.message for e in events], "run_peak_gib": max(memory) if memory else None}
    print(json.dumps(run), flush=True)
    measured = [r for r in rows if r.get("predicted_gib")]
    errors = [100 * (r["measured_gib"] / r["predicted_gib"] - 1) for r in measured]
    out = {"command": "python scripts/bench_probe.py", "gpu": name, "torch": torch.__version__, "rows": rows,
           "run": run, "median_abs_error_pct": statistics.median(abs(e) for e in errors) if errors else None,
           "worst_error_pct": max(errors, key=abs) if errors else None}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_probe.json").write_text(json.dumps(out, indent=2) + "\n")
    lines = [f"# The probe: predicted vs measured peak, one step per stage ({name})", "",
             f"Command: `{out['command']}` (torch {out['torch']}). Each plan through "
             "`muse plan optimize NAME --probe --dry-run --json`; set-up in the script's docstring.", "",
             "| plan | stage | predicted GiB | measured GiB | error | held GiB | usable GiB | fits | probe s |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['plan']} | — | — | — | — | — | — | {r['error'][:80]} | — |")
            continue
        error = f"{100 * (r['measured_gib'] / r['predicted_gib'] - 1):+.1f}%" if r.get("predicted_gib") else "—"
        fits = "OOM" if r["oom"] else "yes" if r["reserved_gib"] <= r["limit_gib"] else "no"
        lines.append(f"| {r['plan']} | {r['stage']} | {r['predicted_gib']:.2f} | {r['measured_gib']:.2f} | {error} "
                     f"| {r['reserved_gib']:.2f} | {r['limit_gib']:.1f} | {fits} | {r['seconds']:.1f} |")
    if errors:
        lines += ["", f"Median |error| {out['median_abs_error_pct']:.1f}%, worst {out['worst_error_pct']:+.1f}% "
                      "(measured against the model's allocated bytes)."]
    lines += ["", f"`muse plan run run-probed` (the first plan, 10 steps): exit {run['exit_code']} in "
                  f"{run['seconds']:.0f} s; the run's own peak (`memory_gib`, max_memory_allocated over its "
                  f"steps) {run['run_peak_gib']:.2f} GiB against the prediction {run['predicted_gib']:.2f} GiB; "
                  "its probe events:", ""] + [f"- {m}" for m in run["probe_events"]]
    (args.out / "bench_probe.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
