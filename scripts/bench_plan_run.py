"""The speed a user gets: each residual mode trained through ``muse plan run`` itself,
eager and compiled (``training.compile``), with tokens/s, MFU and memory read from the
store, and the throughput model's prediction beside each row.

Each configuration is one plan (350M standard shape by default: 24 layers, d_model
1024, 16 heads, vocab 32000; sequence 2048, micro-batch 8, bf16, generated data)
run by ``python -m muse_plan plan run`` in a subprocess with its own ``MUSE_HOME``
but one shared Inductor cache, as a user runs it. ``--repeat-cached`` runs the first
compiled configuration again to time a start from the cache.

- tokens/s: the median of the store's ``tokens_per_s`` over the steps after the
  first ``--skip`` (compilation and warm-up), as ``muse run show`` reports it;
- MFU: model FLOPs a token (6·N + 12·L·d·T, the throughput model's count) × tokens/s
  over the bf16 matmul rate measured in the same invocation
  (``bench_architecture.measure_peak``);
- compile: the first step's seconds from the run's event ("compiled N blocks ...");
- predicted: ``muse plan optimize --json --dry-run``'s tokens/s for the stage.

    PYTHONPATH=. python3 scripts/bench_plan_run.py --out docs/           # GPU
    PYTHONPATH=. python3 scripts/bench_plan_run.py --tiny --out /tmp/b   # CPU: the script works
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SHAPE = {"layers": 24, "d_model": 1024, "n_heads": 16}
TINY_SHAPE = {"layers": 2, "d_model": 64, "n_heads": 2}


def plan(name: str, residual: str, compile_: str, shape: dict, seq: int, micro: int, steps: int,
         precision: str, compute: str, stream_dtype: str = "float32", scope: str = "auto",
         kernels: str | None = "off", graphs: str | None = "auto") -> dict:
    """A one-stage pretrain plan; ``kernels`` / ``graphs`` None leave ``training.fused_kernels`` /
    ``cuda_graphs`` out, so the plan gets muse's defaults as a user's plan that never names them does."""
    mixing = {"mhc": "mhc", "mgt": "geometric_scaling"}.get(residual)  # the technique that sets its streams
    techniques = {mixing: {"streams": 4, "stream_dtype": stream_dtype}} if mixing else {}
    return {"name": name, "model": {"scale": "350M", "residual": residual, "seq_len": seq, "vocab_size": 32000,
                                    "shape": shape},
            "techniques": techniques, "compute": compute,
            "training": {"precision": precision, "micro_batch": micro, "grad_accum": 1, "lr": 3e-4,
                         "warmup_steps": 5, "compile": compile_, "compile_scope": scope,
                         **({"fused_kernels": kernels} if kernels is not None else {}),
                         **({"cuda_graphs": graphs} if graphs is not None else {})},
            "stages": [{"name": "pretrain", "kind": "pretrain", "steps": steps, "checkpoint_every": 10 * steps,
                        "eval_every": 10 * steps}]}


def gpu_compute() -> str:
    """The plan's ``compute`` for the GPU this runs on (the catalog's kind its name matches;
    an H100 when none does), so the throughput model prices the card that was measured."""
    import torch

    from muse_plan.hardware.catalog import match_device_name

    kind = match_device_name(torch.cuda.get_device_name(0))
    return f"1x{kind.key if kind is not None else 'H100'}"


def muse(home: Path, cache: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, **(env or {}), "MUSE_HOME": str(home), "TORCHINDUCTOR_CACHE_DIR": str(cache),
           "PYTHONPATH": f"{ROOT}:{os.environ.get('PYTHONPATH', '')}"}
    return subprocess.run([sys.executable, "-m", "muse_plan", *args], env=env, capture_output=True, text=True)


def run_one(data: dict, cache: Path, skip: int, env: dict[str, str] | None = None) -> dict[str, Any]:
    """One plan through ``muse plan run``; ``env`` adds to its environment."""
    import yaml

    home = Path(tempfile.mkdtemp(prefix="muse-bench-run-"))
    path = home / "plan.yaml"
    path.write_text(yaml.safe_dump(data))
    if muse(home, cache, "plan", "import", str(path)).returncode:
        raise SystemExit(f"import failed for {data['name']}")
    fit = muse(home, cache, "plan", "optimize", data["name"], "--json", "--dry-run")
    predicted = predicted_peak = None
    if fit.returncode == 0:
        fitted = json.loads(fit.stdout)
        priced = (fitted.get("chosen") or fitted["written"])["stages"][0]
        predicted = priced.get("tokens_per_s")
        if priced.get("memory"):  # the memory model's peak without the context's overhead: what the store's is
            predicted_peak = (priced["memory"]["total"] - priced["memory"]["overhead"]) / 2**30
    t0, launched = time.perf_counter(), time.time()
    done = muse(home, cache, "plan", "run", data["name"], "--no-probe", "--force", env=env)
    wall, exited = time.perf_counter() - t0, time.time()
    row: dict[str, Any] = {"name": data["name"], "residual": data["model"]["residual"],
                           "compile": data["training"]["compile"], "wall_s": wall, "predicted_tokens_per_s": predicted,
                           "predicted_peak_gib": predicted_peak}
    if done.returncode:
        row["error"] = (done.stdout + done.stderr)[-1500:]
        return row
    os.environ["MUSE_HOME"] = str(home)
    from muse_plan.store import runs
    from muse_plan.store.db import Store

    store = Store()
    try:
        with store.read() as session:
            run = runs.list_runs(session)[0][0]
            speed = [v for _, v in runs.metric_series(session, run.id, "tokens_per_s")]
            memory = [v for _, v in runs.metric_series(session, run.id, "memory_gib")]
            events = [e.message for e in runs.events(session, run.id, limit=50)]
            phases = wall_phases(session, run, launched, exited)
    finally:
        store.close()
    compiled = next((m for m in events if m.startswith(("compiled ", "torch.compile failed"))), None)
    first = re.search(r"first step took ([\d.]+) s", compiled or "")
    row.update(tokens_per_s=statistics.median(speed[skip:] or speed), peak_gib=max(memory), steps=len(speed),
               compile_event=compiled, first_step_s=float(first[1]) if first else None,
               events=events[:30],  # what the run said (a fallback, a cache it could not use)
               phases=phases)
    return row


def wall_phases(session: Any, run: Any, launched: float, exited: float) -> dict[str, float]:
    """Where a run's wall time went, in seconds from ``muse plan run``'s launch, from the store's times.

    A metric point's time is its flush (every 2 s, or at once after a step that took longer), so
    ``first_step_s`` is when the first step's numbers reached the store: the startup a user waits through."""
    from muse_plan.store import runs
    from muse_plan.store.runs import posix_time

    stages = runs.stage_runs(session, run)
    times = sorted(t for stage in stages for *_, t in runs.metric_points(session, stage.id))
    marks = {"run_started_s": run.started_at, "first_step_s": times[0] if times else None,
             "last_step_s": times[-1] if times else None, "stages_finished_s": stages[-1].finished_at if stages else None,
             "run_finished_s": run.finished_at}
    out = {k: round((posix_time(v) if not isinstance(v, float) else v) - launched, 2)
           for k, v in marks.items() if v is not None}
    out["exited_s"] = round(exited - launched, 2)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=ROOT / "docs")
    p.add_argument("--tiny", action="store_true", help="a tiny shape on CPU: checks the script works")
    p.add_argument("--residuals", default="standard,mhc,ddl,mgt")
    p.add_argument("--modes", default="off,on", help="training.compile values to run")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--skip", type=int, default=10, help="steps left out of the median (compile, warm-up)")
    p.add_argument("--repeat-cached", action="store_true", help="run the first compiled row again (cache warm)")
    args = p.parse_args()
    import torch

    from engines.architecture import ModelConfig, param_count

    sys.path.insert(0, str(ROOT / "scripts"))
    from bench_architecture import Setup, flops_per_token, measure_peak

    cuda = torch.cuda.is_available() and not args.tiny
    shape, seq, micro = (TINY_SHAPE, 64, 4) if args.tiny else (SHAPE, 2048, 8)
    precision, compute = ("bf16", gpu_compute()) if cuda else ("fp32", "cpu")
    peak = None
    if cuda:
        peak = measure_peak(Setup(torch.device("cuda"), torch.bfloat16, micro, 0, 0, None, False))
    cache = Path(tempfile.mkdtemp(prefix="muse-inductor-"))
    out = {"command": "python3 scripts/bench_plan_run.py " + " ".join(sys.argv[1:]),
           "device": torch.cuda.get_device_name(0) if cuda else "cpu", "torch": torch.__version__,
           "bf16_matmul_flops": peak, "rows": []}
    args.out.mkdir(parents=True, exist_ok=True)
    jobs = [(r, m) for r in args.residuals.split(",") for m in args.modes.split(",")]
    if args.repeat_cached and "on" in args.modes.split(","):
        jobs.append((args.residuals.split(",")[0], "on"))
    for i, (residual, mode) in enumerate(jobs):
        name = f"{residual}-{mode}" + ("-cached" if i >= len(jobs) - 1 and args.repeat_cached else "")
        data = plan(name, residual, mode, shape, seq, micro, args.steps, precision, compute)
        row = run_one(data, cache, args.skip)
        config = ModelConfig(vocab_size=32000, seq_len=seq, n_layers=shape["layers"], d_model=shape["d_model"],
                             n_heads=shape["n_heads"], residual=residual, streams=4)
        if peak and "tokens_per_s" in row:
            row["mfu"] = flops_per_token(param_count(config), config) * row["tokens_per_s"] / peak
        out["rows"].append(row)
        print(json.dumps(row), flush=True)
        (args.out / "bench_plan_run.json").write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
