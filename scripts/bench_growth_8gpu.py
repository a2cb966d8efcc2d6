"""The scaled 8xH100 growth plan through ``muse plan run`` on 1, 2, 4 and 8 processes; one rank killed, resumed.

    python3 scripts/bench_growth_8gpu.py --processes 8 --kill --out $OUT                        # 8 GPUs, one call
    python3 scripts/bench_growth_8gpu.py --processes 1 --small-steps 40 --continue-steps 40 --out $OUT
    python3 scripts/bench_growth_8gpu.py --processes 2,4 --small-steps 40 --continue-steps 40 --out $OUT
    python3 scripts/bench_growth_8gpu.py --merge DIR [DIR ...] --out docs                       # → bench_growth_8gpu.md
    python3 scripts/bench_growth_8gpu.py --tiny --processes 1,2 --kill --out /tmp/g             # CPU, gloo: it works

For each process count N (a fresh ``$MUSE_HOME`` each): ``plans/growth-8xh100-scaled.yaml`` (``--tiny``:
``plans/growth-cpu.yaml``, shrunk) is imported, its steps edited as asked, and run with
``muse plan run PLAN --num-processes N``: the run fits the plan to N processes itself (sharding, micro-batch,
accumulation; the plan's global batch kept), as a user's run would. Then, from the store, the same numbers
``muse report`` draws: per stage the median tokens/s after ``--skip`` steps, the measured peak memory per
process beside the memory model's prediction for the settings the run used (``report.build``), the loss
curve, and the grow stage's event (with ``function_preserving`` the grown model's validation loss is the small
model's at the same context).

``--kill``: with the largest N, once the grown stage has passed ``--kill-at`` steps (after its first
checkpoint), one worker that is not the main process gets SIGKILL; the launcher stops the others, the run is
left failed, and ``muse plan run PLAN --resume --num-processes N`` must finish it from the last checkpoint.

Expected on 8 H100s (the optimizer's ETA for the plan: 2 min of steps, zero1, micro-batch 8 / 4): about 7–9
minutes for the 8-process call with its kill and resume (two compilations a run, 1.3B checkpoints); the 1-, 2-
and 4-process rows with 40 + 40 steps, since one GPU alone would take over 10 minutes for the plan's 300.

The 1-process row is the reference: the speed-up of N is its continue-stage tokens/s over the 1-process
one's (target ≥ 7× at 8), and the loss curves are compared over the steps both ran (bf16 noise). Each call
writes ``bench_growth_8gpu-<N,...>.json`` to ``--out``; ``--merge`` joins calls into one table.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PLAN, TINY_PLAN = ROOT / "plans" / "growth-8xh100-scaled.yaml", ROOT / "plans" / "growth-cpu.yaml"
TINY_EDITS = ["training.micro_batch=8", "training.warmup_steps=4", "stages.pretrain_small.eval_every=12",
              "stages.continue.eval_every=20"]


def muse(home: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "MUSE_HOME": str(home), "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-m", "muse_plan", *args], env=env, capture_output=True, text=True)
    if check and done.returncode:
        raise SystemExit(f"muse {' '.join(args)} exited {done.returncode}:\n{done.stdout[-3000:]}{done.stderr[-3000:]}")
    return done


def read_run(home: Path, run_id: int, skip: int) -> dict[str, Any]:
    """The run's numbers from its store: what ``muse report`` draws."""
    os.environ["MUSE_HOME"] = str(home)
    from muse_plan import report
    from muse_plan.store import runs
    from muse_plan.store.db import Store

    with Store().read() as session:
        run = runs.get_run(session, run_id)
        built = report.build(session, str(run_id))
        memory = {row.stage: (row.predicted_gib, row.measured_gib, row.note) for row in built.memory}
        stages = {}
        for sr in runs.stage_runs(session, run):
            series = {name: runs.metric_series(session, run_id, name, sr.id)
                      for name in ("loss", "val_loss", "tokens_per_s", "memory_gib")}
            speed = [v for s, v in series["tokens_per_s"] if s > skip] or [v for _, v in series["tokens_per_s"]]
            predicted, measured, note = memory.get(sr.name, (None, None, ""))
            stages[sr.name] = {"status": sr.status, "steps": sr.step, "tokens_per_s": statistics.median(speed)
                               if speed else None, "peak_gib": measured, "predicted_gib": predicted,
                               "memory_note": note, "loss": series["loss"], "val_loss": series["val_loss"]}
        events = [e.message for e in runs.events(session, run_id, limit=200)]
        return {"run": run_id, "status": run.status, "error": run.error, "stages": stages, "events": events,
                "grew": next((m for m in events if m.startswith("grew ")), None)}


def newest_step(home: Path, stage: str) -> int:
    os.environ["MUSE_HOME"] = str(home)
    from muse_plan.store import runs
    from muse_plan.store.db import Store

    try:
        with Store().read() as session:
            [(run, _)] = runs.list_runs(session, limit=1)
            return next((sr.step for sr in runs.stage_runs(session, run) if sr.name == stage), 0)
    except Exception:  # the run row not written yet, or the database busy: ask again
        return 0


def kill_a_worker(launcher: subprocess.Popen) -> dict[str, Any]:
    """SIGKILL the worker of the highest rank (never the main process, which holds the store)."""
    import psutil

    workers = []
    for child in psutil.Process(launcher.pid).children(recursive=True):
        try:
            rank = child.environ().get("RANK")
            if rank is not None and "muse_plan" in " ".join(child.cmdline()):
                workers.append((int(rank), child))
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    if not workers:
        return {"rank": None, "pid": None, "workers": 0}  # gone already: the run ended before the kill
    rank, victim = max(workers, key=lambda w: w[0])
    os.kill(victim.pid, signal.SIGKILL)
    return {"rank": rank, "pid": victim.pid, "workers": len(workers)}


def run_count(n: int, args: argparse.Namespace, work: Path, kill: bool) -> dict[str, Any]:
    home = work / f"home-{n}"
    plan = TINY_PLAN if args.tiny else PLAN
    name = "growth-cpu" if args.tiny else "growth-8xh100-scaled"
    muse(home, "plan", "import", str(plan))
    edits = list(TINY_EDITS if args.tiny else [])
    if args.small_steps:
        edits.append(f"stages.pretrain_small.steps={args.small_steps}")
    if args.continue_steps:
        edits += [f"stages.continue.steps={args.continue_steps}",
                  f"stages.continue.checkpoint_every={max(1, args.continue_steps // 4)}"]
    if edits:
        muse(home, "plan", "edit", name, *[x for e in edits for x in ("--set", e)])
    env = {**os.environ, "MUSE_HOME": str(home), "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "muse_plan", "plan", "run", name, "--num-processes", str(n)]
    t0 = time.perf_counter()
    launcher = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    killed = None
    if kill:
        while launcher.poll() is None and newest_step(home, "continue") < args.kill_at:
            time.sleep(0.5)
        if launcher.poll() is None:
            killed = {**kill_a_worker(launcher), "at_step": newest_step(home, "continue"),
                      "seconds": time.perf_counter() - t0}
    out = launcher.communicate()[0]
    first = {"seconds": time.perf_counter() - t0, "exit": launcher.returncode, "output": out[-4000:]}
    resumed = None
    if killed is not None:
        t1 = time.perf_counter()
        again = subprocess.run(command + ["--resume"], env=env, capture_output=True, text=True)
        resumed = {"seconds": time.perf_counter() - t1, "exit": again.returncode, "output": again.stdout[-4000:]}
    result = {"processes": n, "first": first, "killed": killed, "resumed": resumed, **read_run(home, 1, args.skip)}
    print(f"{n} process(es): {result['status']} in {first['seconds']:.0f} s"
          + (f"; rank {killed['rank']} killed at step {killed['at_step']}, resume exit {resumed['exit']}"
             if killed else ""), flush=True)
    for stage, s in result["stages"].items():
        print(f"  {stage}: {s['steps']} steps, {s['tokens_per_s'] or 0:,.0f} tok/s, peak {s['peak_gib']} GiB "
              f"(predicted {s['predicted_gib']})", flush=True)
    return result


def compare(rows: list[dict[str, Any]]) -> list[str]:
    """The table: speed-up over the 1-process row, memory against prediction, curves against 1 process."""
    rows = sorted(rows, key=lambda r: r["processes"])
    one = next((r for r in rows if r["processes"] == 1), None)
    lines = ["| processes | continue tok/s | speed-up | efficiency | peak GiB / process (predicted) | "
             "loss vs 1 process, max abs diff | grown stage status | killed → resumed |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        c = r["stages"].get("continue", {})
        base = one["stages"]["continue"] if one else None
        speed = (c["tokens_per_s"] / base["tokens_per_s"]) if base and c.get("tokens_per_s") else None
        diff = None
        if base and r is not one:
            mine, ref = dict(c["loss"]), dict(base["loss"])
            common = sorted(set(mine) & set(ref))
            diff = max((abs(mine[s] - ref[s]) for s in common), default=None)
        kill = (f"rank {r['killed']['rank']} at step {r['killed']['at_step']} → exit {r['resumed']['exit']}"
                if r.get("killed") else "")
        memory = (f"{c['peak_gib']:.1f} ({c['predicted_gib']:.1f})" if c.get("peak_gib") is not None
                  and c.get("predicted_gib") is not None else "—")
        per = "" if speed is None else f"{speed / r['processes']:.0%}"
        lines.append(f"| {r['processes']} | {c.get('tokens_per_s') or 0:,.0f} | "
                     f"{'' if speed is None else f'{speed:.2f}×'} | {per} | {memory} | "
                     f"{'' if diff is None else f'{diff:.4f}'} | {c.get('status', '—')} | {kill} |")
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--processes", default="8", help="process counts, e.g. 1,2,4,8 (each a fresh store)")
    p.add_argument("--kill", action="store_true", help="SIGKILL a worker of the largest count mid-run, then resume")
    p.add_argument("--kill-at", type=int, help="the grown stage's step after which to kill (default: a third)")
    p.add_argument("--small-steps", type=int, help="the small model's steps (default: the plan's)")
    p.add_argument("--continue-steps", type=int, help="the grown model's steps (default: the plan's)")
    p.add_argument("--skip", type=int, default=5, help="steps left out of the median tokens/s (compilation)")
    p.add_argument("--tiny", action="store_true", help="plans/growth-cpu.yaml on the CPU (gloo): the script works")
    p.add_argument("--merge", nargs="+", type=Path, metavar="DIR")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.merge:
        rows = [r for d in args.merge for f in sorted(d.glob("bench_growth_8gpu-*.json"))
                for r in json.loads(f.read_text())["rows"]]
        text = "\n".join(["# The scaled 8xH100 growth plan on 1–8 processes", "", *compare(rows), ""])
        (args.out / "bench_growth_8gpu.md").write_text(text)
        print(text)
        return
    if args.tiny:
        args.small_steps = args.small_steps or 12
        args.continue_steps = args.continue_steps or 40
    counts = [int(x) for x in args.processes.split(",")]
    steps = args.continue_steps or 180
    args.kill_at = args.kill_at or max(2, steps // 4 + 1)  # past the first checkpoint (every quarter)
    with tempfile.TemporaryDirectory(prefix="bench-growth-") as tmp:
        rows = [run_count(n, args, Path(tmp), args.kill and n == max(counts)) for n in counts]
    device = "cpu"
    try:
        import torch

        device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    except Exception:
        pass
    path = args.out / f"bench_growth_8gpu-{'-'.join(map(str, counts))}.json"
    path.write_text(json.dumps({"command": " ".join(["python3", *sys.argv]), "device": device, "tiny": args.tiny,
                                "rows": rows}, indent=1, default=str) + "\n")
    print("\n".join(compare(rows)))
    print(f"results: {path}")


if __name__ == "__main__":
    main()
