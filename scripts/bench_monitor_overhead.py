"""What watching a run costs, and how fast the error handler gets it training again.

    python scripts/bench_monitor_overhead.py                 # one CUDA GPU, ~350M decoder, bf16
    python scripts/bench_monitor_overhead.py --tiny          # CPU, tiny decoder: checks the script
    python scripts/bench_monitor_overhead.py --log-with tensorboard,mlflow   # monitoring with trackers too

Part 1, monitoring overhead: the executor's real loop (``train_stage``) on
the architecture engine, in rounds alternating off, on, on, off (ABBA, so a
drift in clocks or temperature cancels out) in one process:
- off: ``hooks=None, watch=None`` — no detectors, nothing written;
- on: the runner's ``Recorder`` writing every step's metrics to a real
  SQLite store (batched, as in ``muse plan run``) and the detectors'
  ``Watch`` with alert thresholds on every step.
Step time is read on the host at each batch the engine hands out (one per
step at accumulation 1): the loop reads a step's numbers one step late on a
GPU, so the host runs at most one step ahead and the interval between two
batches is a step, hidden host work and all. The mean over the steps after
``--warmup`` includes the store's periodic flushes; the median shows a
typical step. The target is on/off ≤ 1.01.

Part 2, recovery time: ``run_plan`` (the real runner, a store in a temporary
``MUSE_HOME``) with ``--inject nan@K`` and then ``oom@K``. A view notes the
host time of every reported step, the recovery's rewrite and the stage's
restart: from the last step reported before the fault to the rewrite stored,
the stage restarted from its last checkpoint, the first resumed step's
numbers, and the run back at the step where the fault struck.

Design decisions:
- The micro-batch is checked with the optimizer's memory model before the
  run (halved until it is predicted to fit this GPU), so the benchmark never
  measures an out-of-memory crash.
- Each round builds its trainer and ``Accelerator`` afresh (the same seed,
  so the same weights and data) and frees them after: accelerate's
  ``prepare`` wraps a model's forward once per call, so reusing one model
  would make later rounds slower for a reason that is not monitoring.
- Per round the last step (evaluation and the final checkpoint) is outside
  the timed window; the checkpoints are deleted after each round to keep the
  disk free.
- ``--tiny`` writes its table to a temporary folder unless ``--out`` is
  given: a CPU check is not the result docs/ reports.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# every detector on: explosions against the running median (the default), spikes, plateaus, memory, throughput
ALERTS = {"loss_spike": 4.0, "plateau": 200.0, "memory_usage": 95.0, "throughput_drop": 50.0}


def plan_data(args: argparse.Namespace, name: str, steps: int, checkpoint_every: int) -> dict[str, Any]:
    if args.tiny:
        model = {"scale": "1M", "residual": args.residual, "seq_len": 64, "vocab_size": 260,
                 "shape": {"layers": 2, "d_model": 64, "n_heads": 2}}
        compute, precision = "cpu", "fp32"
    else:
        model = {"scale": "350M", "residual": args.residual, "seq_len": args.seq_len, "vocab_size": 32000}
        compute, precision = None, "bf16"
    data = {
        "name": name, "model": model,
        "training": {"precision": precision, "micro_batch": args.micro_batch, "grad_accum": 1,
                     "lr": 3e-4, "warmup_steps": 10, "seed": 0, "clip_grad_norm": 1.0},
        "alerts": ALERTS,
        "stages": [{"name": "pretrain", "kind": "pretrain", "steps": steps, "checkpoint_every": checkpoint_every,
                    "eval_every": steps}],
    }
    if compute:
        data["compute"] = compute
    return data


def fitting_micro_batch(args: argparse.Namespace) -> int:
    """The largest micro-batch ≤ ``--micro-batch`` the memory model predicts to fit this machine."""
    from muse_plan.optimizer import fit as fitting
    from muse_plan.plan.io import spec_from_dict

    hw = fitting.this_machine(1)
    micro = args.micro_batch
    while micro > 1 and hw is not None:
        spec = spec_from_dict(plan_data(argparse.Namespace(**{**vars(args), "micro_batch": micro}), "probe", 10, 10))
        if fitting.price(spec, hw).fits:
            break
        micro //= 2
    return micro


class Stamped:
    """The real trainer, with the host time noted at each batch it hands out."""

    def __init__(self, trainer: Any) -> None:
        self.__dict__.update(inner=trainer, stamps=[])

    def next_batch(self) -> Any:
        self.stamps.append(time.perf_counter())
        return self.inner.next_batch()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self.inner, name, value)  # train_stage sets trainer.model to the prepared model


class Timed:
    """Host seconds spent inside an object's methods (the Recorder's, the Watch's)."""

    def __init__(self, inner: Any) -> None:
        self.inner, self.seconds = inner, 0.0

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self.inner, name)
        if not callable(attr):
            return attr

        def timed(*args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return attr(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - t0

        return timed


def one_round(spec: Any, monitored: bool, index: int, warmup: int, home: Path,
              log_with: list[str] | None = None) -> dict[str, Any]:
    """``train_stage`` once, monitoring on or off; the step times after ``warmup``. ``log_with``:
    monitoring also mirrors every flushed batch and event into these trackers, as a run does."""
    import torch
    from accelerate import Accelerator

    from engines.contract import StageSetup, make_trainer
    from muse_plan.executor.loop import train_stage
    from muse_plan.executor.accelerators import MIXED_PRECISION
    from muse_plan.executor.record import Recorder
    from muse_plan.executor.settings import engine_options, resolve
    from muse_plan.monitor.detectors import Watch
    from muse_plan.store import repo, runs
    from muse_plan.store.db import Store

    cuda = torch.cuda.is_available()
    stage = spec.stages[0]
    s = resolve(spec, stage, world_size=1, cuda=cuda, bf16=cuda and torch.cuda.is_bf16_supported())
    accelerator = Accelerator(mixed_precision=MIXED_PRECISION[s.precision], cpu=not cuda)
    torch.manual_seed(s.seed)
    trainer = make_trainer(stage.engine or "")
    trainer.setup(StageSetup(
        name=stage.name, kind=stage.kind, model=s.model, options=engine_options(spec, stage),
        data_source=spec.data.source, tokenizer=spec.data.tokenizer, val_fraction=spec.data.val_fraction,
        seed=s.seed, micro_batch=s.micro_batch, activation_checkpointing=s.activation_checkpointing,
        tokens_needed=s.steps * s.tokens_per_step, cache_dir=home / "cache", device=str(accelerator.device)))
    stamped = Stamped(trainer)
    hooks = watch = store = None
    if monitored:
        store = Store()
        with store.write() as session:
            plan = repo.get_plan(session, spec.name)
            run = runs.create_run(session, plan, plan.head, [(stage.name, s.steps)], str(home / "runs"))
            run_id, stage_run_id = run.id, runs.stage_runs(session, run)[0].id
        capacity = (torch.cuda.get_device_properties(0).total_memory if cuda else os.sysconf("SC_PHYS_PAGES")
                    * os.sysconf("SC_PAGE_SIZE")) / 2**30
        mirror = None
        if log_with:  # the run's trackers, fed where the store is (monitor/trackers.py)
            from muse_plan.monitor.trackers import open_live

            mirror = open_live(store, run_id, log_with)
        hooks = Timed(Recorder(store, run_id, stage_run_id, None, mirror=mirror))
        watch = Timed(Watch(spec.alerts, capacity))
    folder = home / "rounds" / f"round-{index}"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    train_stage(stamped, s, accelerator, folder, {"plan": spec.name, "round": index}, hooks, watch=watch)
    points = 0
    if monitored:
        hooks.inner.flush()
        if hooks.inner.mirror is not None:
            hooks.inner.mirror.close("completed")
        with store.read() as session:
            points = sum(len(runs.metric_series(session, run_id, n)) for n in ("loss", "grad_norm", "tokens_per_s"))
        store.close()
    steps = stamped.stamps[warmup:]  # the last step's interval (evaluation, checkpoint) is not among them
    gaps = [b - a for a, b in zip(steps, steps[1:])]
    result = {
        "round": index, "monitoring": "on" if monitored else "off", "timed_steps": len(gaps),
        "mean_step_s": (steps[-1] - steps[0]) / len(gaps), "median_step_s": statistics.median(gaps),
        "monitor_host_s_per_step": (hooks.seconds + watch.seconds) / s.steps if monitored else 0.0,
        "points_written": points,
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
    }
    del trainer, stamped, accelerator, hooks, watch
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    shutil.rmtree(folder, ignore_errors=True)
    return result


class Clock:
    """A run's view that notes the host time of each step, message and stage start."""

    def __init__(self) -> None:
        self.steps: list[tuple[float, int]] = []
        self.messages: list[tuple[float, str]] = []
        self.starts: list[tuple[float, int]] = []

    def message(self, text: str) -> None:
        self.messages.append((time.perf_counter(), text))

    def stage_started(self, name: str, total_steps: int, start_step: int) -> None:
        self.starts.append((time.perf_counter(), start_step))

    def step(self, record: Any) -> None:
        self.steps.append((time.perf_counter(), record.step))

    def evaluated(self, step: int, metrics: dict[str, float]) -> None:
        pass

    def stage_finished(self, name: str) -> None:
        pass


def fault_run(args: argparse.Namespace, kind: str, home: Path) -> dict[str, Any]:
    """A real run with one injected fault: seconds from the last good step to training again."""
    from muse_plan.executor.runner import run_plan
    from muse_plan.plan.io import spec_from_dict
    from muse_plan.store import repo, runs
    from muse_plan.store.db import Store

    name, at, every = f"fault-{kind}", args.fault_at, args.fault_every
    store = Store()
    with store.write() as session:
        repo.create_plan(session, spec_from_dict(plan_data(args, name, args.fault_steps, every)))
    store.close()
    clock = Clock()
    t0 = time.perf_counter()
    result = run_plan(None, name, view=clock, inject=f"{kind}@{at}")
    wall = time.perf_counter() - t0
    # the first step whose number goes back is the first resumed step
    back = next(i for i in range(1, len(clock.steps)) if clock.steps[i][1] <= clock.steps[i - 1][1])
    last_good, first = clock.steps[back - 1], clock.steps[back]
    rewrite = next(t for t, text in clock.messages if "plan revision" in text and t > last_good[0])
    restart = next(t for t, _ in clock.starts if t > rewrite)
    again = next(t for t, step in clock.steps[back:] if step >= at)
    with store.read() as session:
        revisions = repo.list_revisions(session, repo.get_plan(session, name))
        reason = next(r.reason for r in revisions if r.author == "recovery")
        status = runs.get_run(session, result.run_id).status
    store.close()
    shutil.rmtree(home / "runs", ignore_errors=True)
    return {
        "fault": f"{kind}@{at}", "last_step_before": last_good[1], "resumed_at_step": first[1],
        "to_rewrite_s": rewrite - last_good[0], "to_restart_s": restart - last_good[0],
        "to_first_step_s": first[0] - last_good[0], "to_fault_step_again_s": again - last_good[0],
        "rewrite": reason.rsplit("): ", 1)[-1], "run_status": status, "wall_s": wall,  # after "(the fault): "
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="CPU, a tiny decoder: checks the script in a minute")
    parser.add_argument("--residual", default="standard")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--micro-batch", type=int, default=None, help="default 16 (8 with --tiny)")
    parser.add_argument("--steps", type=int, default=None, help="steps a round (60; 30 with --tiny)")
    parser.add_argument("--warmup", type=int, default=None, help="steps a round leaves untimed (10; 5 with --tiny)")
    parser.add_argument("--rounds", type=int, default=4, help="off, on, on, off, ... (a multiple of 2)")
    parser.add_argument("--fault-steps", type=int, default=20)
    parser.add_argument("--fault-every", type=int, default=10, help="checkpoint interval of the fault runs")
    parser.add_argument("--fault-at", type=int, default=15)
    parser.add_argument("--log-with", default="",
                        help="trackers the monitored rounds also log to, e.g. tensorboard,mlflow (training.log_with)")
    parser.add_argument("--no-faults", action="store_true", help="part 1 only (no recovery runs)")
    parser.add_argument("--out", type=Path, default=None, help="default docs/ (a temporary folder with --tiny)")
    args = parser.parse_args()
    args.log_with = [t.strip() for t in args.log_with.split(",") if t.strip()]
    args.micro_batch = args.micro_batch or (8 if args.tiny else 16)
    args.steps = args.steps or (30 if args.tiny else 60)
    args.warmup = args.warmup if args.warmup is not None else (5 if args.tiny else 10)
    if args.warmup + 2 >= args.steps or args.fault_at <= args.fault_every or args.fault_at > args.fault_steps:
        parser.error("need warmup + 2 < steps and fault-every < fault-at <= fault-steps")
    if args.rounds < 2 or args.rounds % 2:
        parser.error("--rounds must be an even number, at least 2")

    import torch

    if not args.tiny and not torch.cuda.is_available():
        parser.error("needs a CUDA GPU; use --tiny to check the script on CPU")
    if args.tiny:
        torch.set_num_threads(1)  # the check shares a small machine; more threads only contend
    home = Path(tempfile.mkdtemp(prefix="muse-monitor-bench-"))
    os.environ["MUSE_HOME"] = str(home)
    os.environ.pop("MUSE_DB_URL", None)
    asked = args.micro_batch
    args.micro_batch = fitting_micro_batch(args)

    from muse_plan.plan.io import spec_from_dict
    from muse_plan.store import repo
    from muse_plan.store.db import Store

    spec = spec_from_dict(plan_data(args, "overhead", args.steps, args.steps))
    with Store().write() as session:
        repo.create_plan(session, spec)
    order = [False, True, True, False] * (args.rounds // 4) + [False, True] * (args.rounds % 4 // 2)
    rounds = []
    for index, monitored in enumerate(order):
        rounds.append(one_round(spec, monitored, index, args.warmup, home, args.log_with))
        print(json.dumps(rounds[-1]), flush=True)
    faults: list[dict[str, Any]] = []
    write(args, asked, rounds, faults)  # part 1's table now: a time limit during part 2 does not lose it
    for kind in () if args.no_faults else ("nan", "oom"):
        faults.append(fault_run(args, kind, home))
        print(json.dumps(faults[-1]), flush=True)
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    shutil.rmtree(home, ignore_errors=True)
    if faults:
        write(args, asked, rounds, faults)


def _mean(rows: list[dict[str, Any]], key: str, on: bool) -> float:
    return statistics.fmean(r[key] for r in rows if (r["monitoring"] == "on") == on)


def write(args: argparse.Namespace, asked: int, rounds: list[dict[str, Any]], faults: list[dict[str, Any]]) -> None:
    import torch

    cuda = torch.cuda.is_available() and not args.tiny
    device = torch.cuda.get_device_name(0) if cuda else f"CPU ({torch.get_num_threads()} torch thread(s))"
    command = "python scripts/bench_monitor_overhead.py" + (" --tiny" if args.tiny else "") + (
        f" --residual {args.residual}" if args.residual != "standard" else "") + (
        f" --log-with {','.join(args.log_with)}" if args.log_with else "") + (" --no-faults" if args.no_faults else "")
    shape = ("tiny decoder (2 layers, d_model 64), seq 64, fp32" if args.tiny else
             f"350M decoder ({args.residual} residual), seq {args.seq_len}, bf16 autocast")
    mean_ratio = _mean(rounds, "mean_step_s", True) / _mean(rounds, "mean_step_s", False)
    median_ratio = _mean(rounds, "median_step_s", True) / _mean(rounds, "median_step_s", False)
    host_us = _mean(rounds, "monitor_host_s_per_step", True) * 1e6
    md = [
        "# Monitoring overhead and recovery time", "",
        f"Command: `{command}` on {device}, torch {torch.__version__}.  ",
        f"Model: {shape}, micro-batch {args.micro_batch}"
        + (f" (asked {asked}; halved to what the memory model predicts fits)" if asked != args.micro_batch else "")
        + f", accumulation 1; {args.steps} steps a round, the first {args.warmup} untimed; rounds "
        + " ".join("on" if r["monitoring"] == "on" else "off" for r in rounds) + ".", "",
        "| | monitoring off | monitoring on | on / off |", "| --- | --- | --- | --- |",
        f"| mean step (ms) | {_mean(rounds, 'mean_step_s', False) * 1e3:.2f} | "
        f"{_mean(rounds, 'mean_step_s', True) * 1e3:.2f} | {mean_ratio:.4f} |",
        f"| median step (ms) | {_mean(rounds, 'median_step_s', False) * 1e3:.2f} | "
        f"{_mean(rounds, 'median_step_s', True) * 1e3:.2f} | {median_ratio:.4f} |",
        f"| host time in Recorder + Watch per step (µs) | — | {host_us:.0f} | |",
        f"| metric points written a round (loss, grad norm, tokens/s) | 0 | "
        f"{_mean(rounds, 'points_written', True):.0f} | |", "",
        f"Overhead: **{(mean_ratio - 1) * 100:+.2f}%** of the mean step (target ≤ 1%).", "",
        "Per round: " + "; ".join(f"{r['round']} {r['monitoring']} {r['mean_step_s'] * 1e3:.2f} ms" for r in rounds)
        + ".", "",
    ]
    md += [] if not faults else [
        "Recovery through `run_plan` (the real runner and store), times from the last step reported before "
        f"the fault; {args.fault_steps} steps, a checkpoint every {args.fault_every}:", "",
        "| fault | rewrite (recovery revision) | rewrite stored (s) | stage restarted (s) | first resumed step (s) "
        "| back at the fault step (s) | run |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for f in faults:
        md.append(f"| {f['fault']} (last step {f['last_step_before']}, resumed at {f['resumed_at_step']}) | "
                  f"{f['rewrite']} | {f['to_rewrite_s']:.2f} | {f['to_restart_s']:.2f} | {f['to_first_step_s']:.2f} | "
                  f"{f['to_fault_step_again_s']:.2f} | {f['run_status']} |")
    out = args.out or (Path(tempfile.mkdtemp(prefix="bench-monitor-out-")) if args.tiny else ROOT / "docs")
    out.mkdir(parents=True, exist_ok=True)
    result = {"command": command, "device": device, "torch": torch.__version__, "micro_batch": args.micro_batch,
              "rounds": rounds, "faults": faults, "mean_ratio": mean_ratio, "median_ratio": median_ratio}
    stem = "bench_monitor_overhead" + ("_trackers" if args.log_with else "")  # the trackers' own table
    (out / f"{stem}.json").write_text(json.dumps(result, indent=2))
    (out / f"{stem}.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    print(f"\nwrote {out / f'{stem}.md'}")


if __name__ == "__main__":
    main()
