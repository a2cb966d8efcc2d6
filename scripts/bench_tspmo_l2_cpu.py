"""T-SPMO with and without its L2 term on the adapters, on CPU, through one ``muse plan run``.

    python scripts/bench_tspmo_l2_cpu.py --out docs          # ~8 min on 2 CPU cores

The H100 runs of ``bench_rl_regime.py`` found T-SPMO's loss to be its L2 term λΣ‖W_LoRA‖² and nothing
else, and no held-out change (docs/bench_grpo.md); ``muse plan adapt`` proposes ``l2_lambda: 0`` for such a
stage (``decay_only``) without a measured gain. This measures one, small: the CPU reasoning plan's model
(``plans/reasoning-grpo-cpu.yaml``: 4 layers × 128, pretrained on 2×1-digit products, cold-start SFT), then
T-SPMO stages from the SFT result, λ = 0.01 (the paper's) and λ = 0, ``--seeds`` seeds each (the stage's
``training.seed``), all in one plan run by ``muse plan run``. Each T-SPMO stage is scored at its end on the
same ``--eval-problems`` held-out problems (greedy and one sample), beside the SFT result's own score.
Writes ``<out>/bench_tspmo_l2_cpu.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
LAMBDAS = (0.01, 0.0)


def plan(steps: int, seeds: list[int], eval_problems: int, pretrain_steps: int | None = None) -> dict:
    spec = yaml.safe_load((ROOT / "plans" / "reasoning-grpo-cpu.yaml").read_text())
    base = [s for s in spec["stages"] if s["name"] in ("pretrain", "cold_start_sft")]
    if pretrain_steps:  # a quick check of the script (the plan's 400 otherwise)
        base[0] = {**base[0], "steps": pretrain_steps, "eval_every": pretrain_steps}
    base[1]["options"] = {**base[1]["options"], "eval_problems": eval_problems, "eval_samples": 1}
    rl = next(s for s in spec["stages"] if s["name"] == "reasoning_rl_t_spmo")
    stages = [{**rl, "name": f"t_spmo_l{lam:g}_s{seed}".replace(".", "p"), "steps": steps, "eval_every": steps,
               "checkpoint_every": steps,
               "options": {**rl["options"], "l2_lambda": lam, "eval_problems": eval_problems, "eval_samples": 1},
               "training": {**rl["training"], "seed": seed}}
              for lam in LAMBDAS for seed in seeds]
    return {**spec, "name": "tspmo-l2-cpu", "description": "T-SPMO with and without its L2 term, CPU",
            "stages": base + stages}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=100, help="T-SPMO updates a stage")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--eval-problems", type=int, default=256)
    p.add_argument("--pretrain-steps", type=int, help="the base's pretraining (default the plan's 400)")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    with tempfile.TemporaryDirectory(prefix="bench-tspmo-") as tmp:
        home = Path(tmp)
        env = {**os.environ, "MUSE_HOME": str(home), "PYTHONPATH": str(ROOT)}
        path = home / "plan.yaml"
        path.write_text(yaml.safe_dump(plan(args.steps, seeds, args.eval_problems, args.pretrain_steps), sort_keys=False))
        muse = [sys.executable, "-m", "muse_plan"]
        subprocess.run([*muse, "plan", "import", str(path)], env=env, check=True, capture_output=True)
        t0 = time.perf_counter()
        done = subprocess.run([*muse, "plan", "run", "tspmo-l2-cpu"], env=env, capture_output=True, text=True)
        if done.returncode:
            raise SystemExit(done.stdout[-3000:] + done.stderr[-3000:])
        seconds = time.perf_counter() - t0
        os.environ["MUSE_HOME"] = str(home)
        sys.path.insert(0, str(ROOT))
        from muse_plan.store import runs
        from muse_plan.store.db import Store

        rows = {}
        with Store().read() as session:
            for sr in runs.stage_runs(session, runs.get_run(session, 1)):
                last = {k: v for k, (_, v) in runs.last_metrics(session, sr.id).items()}
                series = {k: [v for _, v in runs.metric_series(session, 1, k, sr.id)] for k in ("loss", "l2_term")}
                rows[sr.name] = {"greedy": last.get("test_accuracy"), "sampled": last.get("test_accuracy_sampled"),
                                 "loss": series["loss"], "l2_term": series["l2_term"]}
    base = rows["cold_start_sft"]
    n = args.eval_problems
    lines = ["# T-SPMO with and without its L2 term (CPU)", "",
             "    python " + " ".join(["scripts/bench_tspmo_l2_cpu.py", *sys.argv[1:]]), "",
             f"One `muse plan run` of {seconds:.0f} s on this machine's CPU (2 cores): the CPU reasoning plan's "
             f"4×128 decoder after cold-start SFT, then T-SPMO stages of {args.steps} updates from it (|G| 16, "
             f"LoRA rank 8 on q/v of the last half of the layers, lr 5e-4, T = 1), scored on the same {n} held-out "
             f"2×1-digit products. SFT result: greedy {100 * base['greedy']:.1f}%, sampled "
             f"{100 * base['sampled']:.1f}%. Policy term: the median of |loss − l2_term| / l2_term over the "
             "stage's updates.", "",
             "| λ (l2_lambda) | seeds | held-out greedy (%) | Δ greedy vs SFT (pts) | sampled (%) | "
             "policy term / L2 term | L2 term, first → last |", "|---|---|---|---|---|---|---|"]
    summary = {}
    for lam in LAMBDAS:
        mine = [rows[f"t_spmo_l{lam:g}_s{seed}".replace(".", "p")] for seed in seeds]
        greedy = [r["greedy"] for r in mine]
        sampled = [r["sampled"] for r in mine]
        se = statistics.stdev(greedy) / math.sqrt(len(greedy)) if len(greedy) > 1 else float("nan")
        share = [statistics.median([abs(a - b) / b for a, b in zip(r["loss"], r["l2_term"]) if b > 0] or [math.nan])
                 for r in mine]
        first = statistics.fmean(r["l2_term"][0] for r in mine if r["l2_term"]) if lam else 0.0
        last = statistics.fmean(r["l2_term"][-1] for r in mine if r["l2_term"]) if lam else 0.0
        summary[str(lam)] = {"greedy": greedy, "sampled": sampled,  # no L2 term (λ 0): no share, null
                             "policy_share": [None if math.isnan(x) else x for x in share]}
        lines.append(f"| {lam:g} | {len(mine)} | {100 * statistics.fmean(greedy):.1f} ± {100 * se:.1f} | "
                     f"{100 * (statistics.fmean(greedy) - base['greedy']):+.1f} | "
                     f"{100 * statistics.fmean(sampled):.1f} | "
                     f"{'—' if not lam else f'{100 * statistics.median(share):.1f}%'} | "
                     f"{'—' if not lam else f'{first:.4f} → {last:.4f}'} |")
    lines += ["", f"± is the standard error over seeds; one run's binomial s.e. at these accuracies is about "
              f"{100 * math.sqrt(base['greedy'] * (1 - base['greedy']) / n):.1f} points.", ""]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_tspmo_l2_cpu.md").write_text("\n".join(lines))
    (args.out / "bench_tspmo_l2_cpu.json").write_text(json.dumps(
        {"command": " ".join(["python", *sys.argv]), "seconds": seconds, "base": base, "summary": summary,
         "stages": rows}, indent=1) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
