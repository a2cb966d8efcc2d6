"""Where a step of ``muse plan run`` spends its time: the executor's loop under torch.profiler.

Runs one of ``bench_plan_run.py``'s plans with the CLI in this process (``muse plan
import`` + ``muse plan run``, as a user runs them) and profiles ``--active`` steps
after ``--wait`` steps, by wrapping the loop's per-step function. Reports the wall
time of a step, how much of it the GPU was busy (sum of kernel times), the kernels
that take the most time, and the host-side operations that block (synchronisations,
copies) — what separates the loop from a hand-built one.

    PYTHONPATH=. python3 scripts/profile_plan_run.py --residual standard --compile on --out /tmp/prof
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--residual", default="standard")
    p.add_argument("--compile", default="on")
    p.add_argument("--wait", type=int, default=12, help="steps before profiling (compile, warm-up)")
    p.add_argument("--active", type=int, default=5, help="steps profiled")
    p.add_argument("--stream-dtype", default="float32", help="mhc/mgt stream state: float32 or bfloat16")
    p.add_argument("--kernels", default="off", help="training.fused_kernels: off, eager or on")
    p.add_argument("--cuda-graphs", default="auto", choices=["auto", "on", "off"], help="training.cuda_graphs")
    p.add_argument("--mhc-form", default="committed", choices=["committed", "two-kernel", "four-kernel", "streams"],
                   help="with --kernels on, mhc's fused connection: as committed, pre in two or four kernels, "
                        "or fused_streams' ops (fused_mhc.ENABLED off)")
    p.add_argument("--no-trace", action="store_true", help="leave out the Chrome trace (tens of MB)")
    p.add_argument("--plan", type=Path, help="profile this plan file instead (e.g. bench_grpo_trl.py --write-plan's): "
                                             "its first stage alone, run for --wait + --active + 2 steps")
    p.add_argument("--events", action="store_true",
                   help="no profiler: CUDA events at each step's phases (forward+backward, clipping, the rest), "
                        "so where an unprofiled step's time goes, idle GPU included")
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--out", type=Path, default=Path("/tmp/profile_plan_run"))
    args = p.parse_args()
    if args.plan is not None and not args.plan.is_file():
        p.error(f"plan file '{args.plan}' not found")

    import torch
    import yaml
    from bench_plan_run import SHAPE, TINY_SHAPE, gpu_compute, plan

    home = Path(tempfile.mkdtemp(prefix="muse-profile-"))
    os.environ["MUSE_HOME"] = str(home)
    cuda = torch.cuda.is_available() and not args.tiny
    steps = args.wait + args.active + 2
    if args.plan:
        data = yaml.safe_load(args.plan.read_text())
        data["stages"] = [{**data["stages"][0], "steps": steps}]
    else:
        data = plan(f"profile-{args.residual}", args.residual, args.compile, TINY_SHAPE if args.tiny else SHAPE,
                    64 if args.tiny else 2048, 2 if args.tiny else 8, steps, "bf16" if cuda else "fp32",
                    gpu_compute() if cuda else "cpu", stream_dtype=args.stream_dtype, kernels=args.kernels,
                    graphs=args.cuda_graphs)
    path = home / "plan.yaml"
    path.write_text(yaml.safe_dump(data))

    if args.events:
        return events_report(args, data, path, cuda, steps)
    from torch.profiler import ProfilerActivity, profile, schedule

    from engines.architecture import fused_mhc
    from muse_plan.executor import loop

    if args.mhc_form in ("two-kernel", "four-kernel"):
        fused_mhc.TWO_PASS_FORWARD = fused_mhc.TWO_PASS_BACKWARD = args.mhc_form == "two-kernel"
    fused_mhc.ENABLED = args.mhc_form != "streams"

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    prof = profile(activities=activities, schedule=schedule(wait=args.wait, warmup=1, active=args.active, repeat=1))
    stamps: list[float] = []
    accumulate = loop._accumulate

    def profiled(*a, **k):  # type: ignore[no-untyped-def]
        stamps.append(time.perf_counter())
        prof.step()
        return accumulate(*a, **k)

    loop._accumulate = profiled
    from muse_plan.cli.main import app

    for argv in (["plan", "import", str(path)], ["plan", "run", data["name"], "--no-probe", "--force"]):
        try:
            prof.start() if argv[1] == "run" else None
            app(argv, standalone_mode=False)
        finally:
            if argv[1] == "run":
                prof.stop()
    first = args.wait + 1  # the warm-up step's start, then ``active`` profiled steps
    walls = [b - a for a, b in zip(stamps[first:first + args.active], stamps[first + 1:first + args.active + 1])]
    events = prof.key_averages()
    device_key = "self_device_time_total" if cuda else "self_cpu_time_total"
    from torch.autograd import DeviceType

    # annotations on the GPU's timeline (the profiler's step markers, the optimizer's step) span kernels: not kernels
    on_device = [e for e in events if e.device_type == DeviceType.CUDA and not getattr(e, "is_user_annotation", False)
                 and not e.key.startswith(("ProfilerStep", "Optimizer."))]
    kernels = sorted(on_device if cuda else events, key=lambda e: getattr(e, device_key, 0), reverse=True)
    # the kernels' own time: CUDA events only (an op's self device time counts its kernels a second time)
    busy_us = sum(e.self_device_time_total for e in on_device) if cuda else 0.0
    step_ms = 1e3 * sum(walls) / max(len(walls), 1)
    blocking = [e for e in events if any(s in e.key for s in ("Synchronize", "cudaMemcpy", "item", "_local_scalar"))]
    report = {
        "cuda_graphs": args.cuda_graphs, "kernels": args.kernels,
        "mhc_form": args.mhc_form, "device": torch.cuda.get_device_name() if cuda else "cpu",
        "step_wall_ms": step_ms,
        "gpu_busy_ms_per_step": busy_us / 1e3 / args.active,
        "top": [{"name": e.key[:90], "ms_per_step": getattr(e, device_key, 0) / 1e3 / args.active,
                 "calls_per_step": e.count / args.active} for e in kernels[:25]],
        "blocking_host": [{"name": e.key[:90], "host_ms_per_step": e.cpu_time_total / 1e3 / args.active,
                           "calls_per_step": e.count / args.active} for e in blocking],
        "host_top": [{"name": e.key[:90], "host_self_ms_per_step": e.self_cpu_time_total / 1e3 / args.active}
                     for e in sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:20]],
    }
    args.out.mkdir(parents=True, exist_ok=True)
    name = (f"profile_{args.plan.stem if args.plan else args.residual}_{args.compile}"
            + ("_bf16" if args.stream_dtype == "bfloat16" else "")
            + ("" if args.kernels == "off" else f"_kernels-{args.kernels}")
            + ("" if args.mhc_form == "committed" else f"_{args.mhc_form}")
            + ("" if args.cuda_graphs == "auto" else f"_graphs-{args.cuda_graphs}"))
    (args.out / f"{name}.json").write_text(json.dumps(report, indent=1))
    if not args.no_trace:
        prof.export_chrome_trace(str(args.out / f"{name}.trace.json"))
    print(f"step {step_ms:.1f} ms wall; GPU busy {report['gpu_busy_ms_per_step']:.1f} ms a step")
    for row in report["top"][:15]:
        print(f"  {row['ms_per_step']:8.2f} ms  x{row['calls_per_step']:.0f}  {row['name']}")
    print("blocking host calls:")
    for row in report["blocking_host"]:
        print(f"  {row['host_ms_per_step']:8.2f} ms  x{row['calls_per_step']:.1f}  {row['name']}")


def events_report(args: argparse.Namespace, data: dict, path: Path, cuda: bool, steps: int) -> None:
    """The run unprofiled, with a CUDA event (a host stamp on CPU) where each step's forward+backward
    begins and ends and where its clipping begins and ends; the optimizer's step and whatever the loop
    does until the next step's first kernel fill the rest. Each phase's median over the steps after
    ``--wait``. An event marks when the GPU reaches it, so a phase counts the GPU's idle inside it."""
    import statistics

    import torch

    from muse_plan.cli.main import app
    from muse_plan.executor import loop

    marks: list[tuple[str, Any]] = []

    def mark(name: str) -> None:
        if cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            marks.append((name, e))
        else:
            marks.append((name, time.perf_counter()))

    host: list[float] = []
    accumulate, clip = loop._accumulate, loop.optimizers.clip_grad_norm

    def timed_accumulate(*a, **k):  # type: ignore[no-untyped-def]
        host.append(time.perf_counter())
        mark("step")
        out = accumulate(*a, **k)
        mark("backward_done")
        return out

    def timed_clip(*a, **k):  # type: ignore[no-untyped-def]
        out = clip(*a, **k)
        mark("clip_done")
        return out

    loop._accumulate, loop.optimizers.clip_grad_norm = timed_accumulate, timed_clip
    try:
        for argv in (["plan", "import", str(path)], ["plan", "run", data["name"], "--no-probe", "--force"]):
            app(argv, standalone_mode=False)
    finally:
        loop._accumulate, loop.optimizers.clip_grad_norm = accumulate, clip
    if cuda:
        torch.cuda.synchronize()

    def between(a: Any, b: Any) -> float:
        return a.elapsed_time(b) if cuda else 1e3 * (b - a)

    starts = [i for i, (name, _) in enumerate(marks) if name == "step"]
    phases: dict[str, list[float]] = {"forward_backward": [], "clip": [], "optimizer_and_loop": [], "step": []}
    for first, nxt in zip(starts[args.wait:], starts[args.wait + 1:]):
        (_, s), (_, b), (_, c), (_, n) = marks[first], marks[first + 1], marks[first + 2], marks[nxt]
        phases["forward_backward"].append(between(s, b))
        phases["clip"].append(between(b, c))
        phases["optimizer_and_loop"].append(between(c, n))
        phases["step"].append(between(s, n))
    launches = [1e3 * (b - a) for a, b in zip(host[args.wait:], host[args.wait + 1:])]
    report = {"device": torch.cuda.get_device_name() if cuda else "cpu", "plan": data["name"],
              "steps_measured": len(phases["step"]), "host_launch_to_launch_ms": statistics.median(launches),
              **{f"{k}_ms": statistics.median(v) for k, v in phases.items() if v}}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"events_{data['name']}.json").write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
