"""GRPO vs S-GRPO vs T-SPMO under one budget, on a model muse pretrains itself.

    python scripts/bench_grpo.py [--tiny] [--out docs]

One run, one GPU: pretrain a decoder on 3×3-digit multiplication with its
worked long-multiplication steps, cold-start SFT it, then from the same SFT
weights run each RL algorithm for the same number of updates with LoRA on the
query/value projections of the last quarter of layers (Lee & Tong's set-up,
scaled down), all through ``muse plan run``: one plan pretrains and SFTs,
then three one-stage plans (``model.init_from`` = the SFT checkpoint) run the
algorithms side by side, each in its own process and store. Held-out accuracy (greedy, last
integer = answer) after each stage goes into a table next to the paper's
numbers on Qwen2-1.5B. Then, at the same model size, rollout throughput
(completions sampled per second with the KV cache) and update throughput
(completions through the GRPO loss and backward per second).

Writes ``<out>/bench_grpo.{json,md}``. ``--tiny`` runs a seconds-long CPU
version to check the script (its numbers mean nothing). ``--decode`` names
how the engine's own rollouts decode (``engines/grpo/policy.py``): ``graphs``
(the default: the decode step replayed from a CUDA graph), ``compiled``
(compiled, then replayed; a plan's ``training.compile: auto`` and ``on``) or
``eager`` (``compile: off``); several are measured one after the other, the
first in the table, to compare them in one run. ``--throughput-only`` times
rollouts twice: the engine's ``next_batch`` called directly (``--decode``), and
through ``muse plan run`` (``--plan-run``: a one-stage plan a
``training.compile`` setting, the rollout time each step records in the store).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
MAX_NEW_TOKENS = 112
PAPER = {"base": 3.9, "grpo": 4.4, "s_grpo": 22.9, "t_spmo": 70.0}  # 3×3 multiplication, n = 3000


TASK = ["multiplication:3x3"]


# the GPU run's budget: pretraining and SFT steps, and each RL algorithm's updates (see main's flags)
STEPS = {"pretrain": 1200, "sft": 100, "rl": 60}
TINY_STEPS = {"pretrain": 20, "sft": 5, "rl": 3}


def _steps(tiny: bool) -> dict[str, int]:
    return TINY_STEPS if tiny else STEPS


def _common(tiny: bool) -> dict:
    # a worked 3×3 solution is ~90 bytes after "A:" (three partial products and their sum)
    return {"tasks": TASK, "max_new_tokens": MAX_NEW_TOKENS, "eval_problems": 32 if tiny else 300,
            "eval_samples": 1, "temperature": 1.0}


def _model(tiny: bool) -> dict:
    shape = {"layers": 2, "d_model": 64, "n_heads": 4} if tiny else {"layers": 12, "d_model": 512, "n_heads": 8}
    return {"scale": "1M", "residual": "standard", "seq_len": 160, "vocab_size": 260, "shape": shape}


def plan(tiny: bool) -> dict:
    """Pretrain on the task's worked solutions, then cold-start SFT: the base every RL run starts from."""
    pre, sft = _steps(tiny)["pretrain"], _steps(tiny)["sft"]
    return {
        "name": "bench-grpo",
        "model": _model(tiny),
        "compute": "cpu" if tiny else None,
        "training": {"micro_batch": 8 if tiny else 64, "lr": 1.0e-3 if tiny else 5.0e-4,
                     "warmup_steps": 2 if tiny else 100},
        "stages": [
            {"name": "pretrain", "kind": "pretrain", "steps": pre, "eval_every": pre, "options": {"tasks": TASK}},
            {"name": "sft", "kind": "cold_start_sft", "steps": sft, "eval_every": sft, "options": _common(tiny),
             "training": {"lr": 3.0e-4, "warmup_steps": 2}},
        ],
    }


# Lee & Tong's settings: |G| = 8 (GRPO, S-GRPO) and 50 (T-SPMO), β = λ = 0.01, rollouts at temperature 0.3
ALGORITHMS = {"grpo": {"group_size": 8, "kl_beta": 0.01},
              "s_grpo": {"group_size": 8, "alpha": 25, "p": 0.5, "k": 50, "kl_beta": 0.01},
              "t_spmo": {"group_size": 50, "success_budget": 2, "failure_budget": 0, "l2_lambda": 0.01}}
ROLLOUT_TEMPERATURE = 0.3


def rl_plan(name: str, tiny: bool, base: Path) -> dict:
    """One RL algorithm as a one-stage plan starting from the SFT checkpoint ``base``;
    LoRA on the query/value projections of the last quarter of layers (Lee & Tong)."""
    steps = _steps(tiny)["rl"]
    opts = {**ALGORITHMS[name], **({"group_size": 16} if tiny and name == "t_spmo" else {})}
    lora = {"rank": 8, "alpha": 16, "target_modules": ["q_proj", "v_proj"], "layers_fraction": 0.25}
    # the same update budget (steps) for each; 16 prompts × 8 completions, T-SPMO 2 × 50
    micro = 1 if tiny else (2 if name == "t_spmo" else 16)
    return {
        "name": f"bench-{name.replace('_', '-')}",
        "model": {**_model(tiny), "init_from": str(base)},
        "compute": "cpu" if tiny else None,
        "training": {"micro_batch": micro, "lr": 1.0e-4, "warmup_steps": 5},  # the paper's lr
        "stages": [{"name": name, "kind": "reasoning_rl", "steps": steps, "eval_every": steps,
                    "options": {**_common(tiny), **opts, "algorithm": name, "lora": lora,
                                "temperature": ROLLOUT_TEMPERATURE, "eval_temperature": 1.0}}],
    }


def accuracies(home: Path) -> dict[str, dict[str, float]]:
    """The last metrics of each stage of run 1 in the store under ``home``."""
    from muse_plan.store import runs
    from muse_plan.store.db import Store

    out = {}
    with Store(f"sqlite:///{home / 'muse.db'}").read() as session:
        run = runs.get_run(session, 1)
        for stage in runs.stage_runs(session, run):
            last = {k: v for k, (_, v) in runs.last_metrics(session, stage.id).items()}
            out[stage.name] = {k: last[k] for k in ("test_accuracy", "test_accuracy_sampled", "reward",
                                                    "tokens_per_s") if k in last}
            reward = [v for _, v in runs.metric_series(session, run.id, "reward", stage.id)]
            if reward:  # the rollouts' mean reward over the first and the last tenth of the updates
                tenth = max(1, len(reward) // 10)
                out[stage.name]["reward_first"] = sum(reward[:tenth]) / tenth
                out[stage.name]["reward_last"] = sum(reward[-tenth:]) / tenth
            if stage.started_at and stage.finished_at:
                out[stage.name]["seconds"] = (stage.finished_at - stage.started_at).total_seconds()
        run_dir = Path(run.run_dir)
    out["_run_dir"] = str(run_dir)  # type: ignore[assignment]
    return out


def launch(home: Path, spec: dict, log: Path) -> subprocess.Popen:
    """``muse plan import`` + ``muse plan run`` of ``spec`` in its own store (MUSE_HOME)."""
    home.mkdir(parents=True, exist_ok=True)
    path = home / "plan.yaml"
    path.write_text(yaml.safe_dump(spec))
    env = {**os.environ, "MUSE_HOME": str(home)}
    py = sys.executable
    cmd = f"{py} -m muse_plan plan import {path} && {py} -m muse_plan plan run {spec['name']}"
    return subprocess.Popen(cmd, shell=True, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)


def rollout_profile(rollout) -> dict:  # type: ignore[no-untyped-def]
    """One more rollout (``rollout()``) under torch.profiler: its wall time (the profiler's overhead
    included), the sum of its kernels' device time, how many kernels it launched and the costliest, so a
    rollout short of its target says whether the GPU or the host sets its pace."""
    import torch
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    cuda = torch.cuda.is_available()
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        start = time.perf_counter()
        rollout()
        if cuda:
            torch.cuda.synchronize()
        wall = time.perf_counter() - start
    kernels = [e for e in prof.key_averages() if e.device_type == DeviceType.CUDA and e.device_time_total > 0]
    kernels.sort(key=lambda e: -e.device_time_total)
    return {"wall_s": wall, "kernels_s": sum(e.device_time_total for e in kernels) / 1e6,
            "kernel_launches": sum(e.count for e in kernels),
            "top": [{"name": e.key[:100], "ms": e.device_time_total / 1e3, "calls": e.count} for e in kernels[:12]]}


def rollout_phases(trainer) -> dict:  # type: ignore[no-untyped-def]
    """One more rollout (``trainer.next_batch``) timed by phase, each phase ended by a device sync (the syncs
    cost a little time of their own): ``setup`` (the sampler's weights, left padding, a new cache and decode
    step where none is kept; up to the prefill), ``prefill`` (eager, captured or replayed), ``capture`` (the
    decode step's warm-up calls and capture, where it is not kept), ``decode`` (the rest of sampling: the
    decode loop and the completions to the host), ``rewards`` (text and reward functions, host only),
    ``logprobs`` (the reference pass, and the old policy's where it is kept) and ``other``."""
    import contextlib
    import functools

    import torch

    from engines.grpo import policy as P
    from engines.grpo import rl as R

    times = {k: 0.0 for k in ("setup", "prefill", "capture", "decode", "rewards", "logprobs")}
    sample_began: list[float] = []

    def now() -> float:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return time.perf_counter()

    def timed(key, fn):  # type: ignore[no-untyped-def]
        def wrapper(*args, **kwargs):  # type: ignore[no-untyped-def]
            start = now()
            try:
                return fn(*args, **kwargs)
            finally:
                times[key] += now() - start
        return wrapper

    def sample(fn):  # type: ignore[no-untyped-def]
        def wrapper(*args, **kwargs):  # type: ignore[no-untyped-def]
            sample_began.append(now())
            out = fn(*args, **kwargs)
            times["decode"] += now() - sample_began.pop()
            return out
        return wrapper

    def graphed_call(fn):  # type: ignore[no-untyped-def]
        def wrapper(self):  # type: ignore[no-untyped-def]
            if isinstance(self.step, functools.partial) and self.step.func is P._prefill:
                times["setup"] += now() - sample_began[-1]
                return timed("prefill", fn)(self)
            if self.graph is not None or self.failed is not None:
                return fn(self)
            return timed("capture", fn)(self)
        return wrapper

    rl = trainer.handler
    patches = [(P.Policy, "sample", sample), (P.Graphed, "__call__", graphed_call),
               (R.ReinforcementLearning, "logprobs", lambda fn: timed("logprobs", fn)),
               (type(trainer), "judged", lambda fn: timed("rewards", fn)),
               (type(rl.rewards), "score", lambda fn: timed("rewards", fn))]
    with contextlib.ExitStack() as undo:
        for owner, name, wrap in patches:
            before = owner.__dict__[name]
            setattr(owner, name, wrap(before))
            undo.callback(setattr, owner, name, before)
        start = now()
        trainer.next_batch()
        total = now() - start
    times["decode"] -= times["setup"] + times["prefill"] + times["capture"]
    times["other"] = total - sum(times.values())
    return {"total_s": total, **{f"{k}_s": v for k, v in times.items()}}


def throughput(spec: dict, device: str, prompts: int, group: int, decodes: list[str],
               profile: bool = False) -> dict:
    """Completions/s for rollout (KV-cache sampling) and for the GRPO update, same model,
    rollouts decoding as ``decodes[0]`` says; each other decode's numbers under ``other_decodes``."""
    import torch

    from engines.architecture.config import ModelConfig
    from engines.contract import StageSetup
    from engines.grpo.options import parse
    from engines.grpo.trainer import GrpoTrainer
    from muse_plan.plan.spec import ModelShape

    from engines.architecture import model as model_module

    shape = ModelShape(**spec["model"]["shape"]).resolved()
    config = ModelConfig.from_shape(shape, 260, spec["model"]["seq_len"])
    decode, _, attention = decodes[0].partition("+")  # as training.compile would set it (executor/settings.decoding)
    model_module.ONE_QUERY_PRODUCT = attention != "sdpa"
    trainer = GrpoTrainer()
    # the weights that never train (the KL reference) and the copy sampling decodes from in the compute dtype,
    # as the executor sets a bf16 stage up (executor/settings.frozen_precision)
    trainer.setup(StageSetup(name="t", kind="reasoning_rl", model=config, micro_batch=prompts, device=device,
                             decode=decode, frozen_precision="bf16" if device == "cuda" else "fp32",
                             options=parse("reasoning_rl", {}, {
                                 "tasks": ["multiplication:3x3"], "group_size": group,
                                 "max_new_tokens": MAX_NEW_TOKENS, "temperature": 1.0, "eval_problems": 1})))
    dtype = torch.bfloat16 if device == "cuda" else torch.float32

    def timed(fn):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = fn()
        if device == "cuda":
            torch.cuda.synchronize()
        return out, time.perf_counter() - start

    with torch.autocast(device, dtype=dtype, enabled=device == "cuda"):
        for _ in range(3):  # warm-up: compiling, and capturing the decode step (first) and the prefill (third)
            batch, _ = timed(trainer.next_batch)
        rollouts, updates = [], []
        for _ in range(3):
            batch, seconds = timed(trainer.next_batch)
            rollouts.append(seconds)
            step, seconds = timed(lambda: trainer.micro_step(batch).loss.backward())
            updates.append(seconds)
    n = prompts * group
    tokens = sum(len(c) for g in batch for c in g.completions)
    out = {"decode": decodes[0], "completions": n, "mean_completion_tokens": tokens / n,
           "rollout_completions_per_s": n / min(rollouts), "rollout_tokens_per_s": tokens / min(rollouts),
           "update_completions_per_s": n / min(updates),
           "parameters": sum(p.numel() for p in trainer.model.parameters())}
    if profile and device == "cuda":
        with torch.autocast(device, dtype=dtype):
            out["profile"] = rollout_profile(trainer.next_batch)
            out["phases"] = [rollout_phases(trainer) for _ in range(3)]
    if decodes[1:]:
        out["other_decodes"] = {d: throughput(spec, device, prompts, group, [d], profile) for d in decodes[1:]}
    return out


PLAN_RUN_STEPS, PLAN_RUN_SKIP = 8, 2  # steps of the rollout plan; the first ones compile and capture


def rollout_plan(compile_setting: str, prompts: int, group: int, tiny: bool = False) -> dict:
    """``throughput``'s rollouts as a user's plan: one reasoning_rl stage of the same decoder (random
    weights), the same prompts × group rows and completion length, full fine-tuning, the decode step as
    ``training.compile`` makes it (``executor/settings.decoding``)."""
    return {
        "name": f"rollouts-{compile_setting}", "model": _model(tiny), "compute": "cpu" if tiny else None,
        "training": {"micro_batch": prompts, "lr": 1.0e-5, "warmup_steps": 1, "compile": compile_setting},
        "stages": [{"name": "rl", "kind": "reasoning_rl", "steps": PLAN_RUN_STEPS, "eval_every": 10_000,
                    "options": {"tasks": TASK, "group_size": group, "max_new_tokens": MAX_NEW_TOKENS,
                                "temperature": 1.0, "eval_problems": 1}}],
    }


def plan_run_rollouts(compile_setting: str, prompts: int, group: int, tiny: bool = False) -> dict:
    """Rollout and update completions/s through ``muse plan run``, read from its store: each micro-step's
    ``rollout_s`` (sampling, rewards, the reference pass) and its step time less that, medians over the
    steps after the first PLAN_RUN_SKIP (whose rollouts compile and capture the decode step)."""
    import statistics

    sys.path.insert(0, str(ROOT / "scripts"))
    from bench_plan_run import run_one

    from muse_plan.store import runs
    from muse_plan.store.db import Store

    row = run_one(rollout_plan(compile_setting, prompts, group, tiny),
                  Path(tempfile.mkdtemp(prefix="muse-inductor-")), skip=PLAN_RUN_SKIP)
    if "error" in row:
        return {"compile": compile_setting, "error": row["error"]}
    store = Store()  # run_one left MUSE_HOME at the run's store
    try:
        with store.read() as session:
            run = runs.list_runs(session)[0][0]
            series = {k: [v for _, v in runs.metric_series(session, run.id, k)]
                      for k in ("rollout_s", "completion_tokens", "tokens_per_s")}
    finally:
        store.close()
    n = prompts * group
    rollout = series["rollout_s"][PLAN_RUN_SKIP:]
    lengths = series["completion_tokens"]
    step = [n * length / speed for length, speed in zip(lengths, series["tokens_per_s"]) if speed > 0]
    update = [a - b for a, b in zip(step[PLAN_RUN_SKIP:], rollout)]
    first = series["rollout_s"][:PLAN_RUN_SKIP]
    return {"compile": compile_setting, "completions": n, "steps": len(step),
            "rollout_completions_per_s": n / statistics.median(rollout),
            "update_completions_per_s": n / statistics.median(update) if update else None,
            "mean_completion_tokens": statistics.fmean(lengths[PLAN_RUN_SKIP:]),
            "rollout_s": [round(v, 3) for v in series["rollout_s"]], "first_rollouts_s": first,
            "peak_gib": row.get("peak_gib"), "events": row.get("events", [])[:12]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="a seconds-long CPU check of the script")
    parser.add_argument("--out", type=Path, default=ROOT / "docs")
    parser.add_argument("--pretrain-steps", type=int, default=STEPS["pretrain"])
    parser.add_argument("--sft-steps", type=int, default=STEPS["sft"])
    parser.add_argument("--rl-steps", type=int, default=STEPS["rl"], help="updates per RL algorithm")
    parser.add_argument("--throughput-only", action="store_true",
                        help="re-measure throughput alone (a quiet GPU) into an existing <out>/bench_grpo.json")
    from engines.grpo.policy import DECODES

    parser.add_argument("--decode", nargs="+", choices=[*DECODES, *(f"{d}+sdpa" for d in DECODES)], default=["graphs"],
                        help="how rollouts decode; several to compare, the first in the table; '+sdpa': a decode "
                             "step's attention by SDPA's kernel instead of muse's product (model.ONE_QUERY_PRODUCT)")
    parser.add_argument("--plan-run", nargs="*", choices=["auto", "on", "off"], default=["auto"],
                        help="with --throughput-only: rollouts also through `muse plan run`, a one-stage plan "
                             "for each training.compile given (default: auto; none: skip)")
    parser.add_argument("--profile", action="store_true",
                        help="with --throughput-only: one more rollout a decode under torch.profiler (its kernels)")
    args = parser.parse_args()
    STEPS.update(pretrain=args.pretrain_steps, sft=args.sft_steps, rl=args.rl_steps)
    if args.throughput_only:
        result = json.loads((args.out / "bench_grpo.json").read_text())
        result["throughput"] = throughput(result["plan"], "cuda", prompts=16, group=8, decodes=args.decode,
                                          profile=args.profile)
        result["throughput"]["plan_run"] = [plan_run_rollouts(c, 16, 8) for c in args.plan_run]
        write(result, args.out)
        return
    root = Path(tempfile.mkdtemp(prefix="muse-grpo-"))
    started = time.perf_counter()
    out = None if args.tiny else args.out
    command = "python scripts/bench_grpo.py" + (" --tiny" if args.tiny else
                                                f" --pretrain-steps {STEPS['pretrain']} --sft-steps {STEPS['sft']} "
                                                f"--rl-steps {STEPS['rl']}")
    result = {"device": _device_name(args.tiny), "plan": plan(args.tiny), "rl_plans": {}, "stages": {},
              "throughput": None, "wall_seconds": 0.0, "command": command}
    logs: list[Path] = [root / "base.log"]

    def save(partial: bool) -> None:
        result["wall_seconds"] = time.perf_counter() - started
        result["partial"] = partial
        write(result, out)

    def on_term(signum, frame) -> None:  # a time limit: keep what finished, show where the rest was
        for log in logs:
            if log.exists():
                print(f"--- {log.name} (tail)\n{log.read_text()[-1500:]}", flush=True)
        save(partial=True)
        sys.exit(124)

    signal.signal(signal.SIGTERM, on_term)
    base = launch(root / "base", plan(args.tiny), logs[0])
    if base.wait():
        sys.exit(f"the base run failed:\n{logs[0].read_text()[-2000:]}")
    acc = accuracies(root / "base")
    sft = max((Path(acc.pop("_run_dir")) / "sft").glob("step-*"))
    result["stages"].update(acc)
    print(f"base done in {time.perf_counter() - started:.0f} s: {acc}", flush=True)
    save(partial=True)
    # the three algorithms from the same SFT weights, concurrently (each its own process and store):
    # one small model leaves the GPU mostly idle between kernel launches
    result["rl_plans"] = {n: rl_plan(n, args.tiny, sft) for n in ALGORITHMS}
    procs = {}
    for name in ALGORITHMS:
        logs.append(root / f"{name}.log")
        procs[name] = launch(root / name, result["rl_plans"][name], logs[-1])
    for name, proc in procs.items():
        if proc.wait():
            sys.exit(f"{name} failed:\n{(root / f'{name}.log').read_text()[-2000:]}")
        result["stages"].update({k: v for k, v in accuracies(root / name).items() if k != "_run_dir"})
        print(f"{name} done at {time.perf_counter() - started:.0f} s: {result['stages'][name]}", flush=True)
        save(partial=True)
    device = "cpu" if args.tiny else "cuda"
    result["throughput"] = throughput(plan(args.tiny), device, prompts=2 if args.tiny else 16,
                                      group=4 if args.tiny else 8, decodes=args.decode)
    save(partial=False)


def _device_name(tiny: bool) -> str:
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() and not tiny else "CPU"


def write(result: dict, out: Path | None) -> None:
    acc, speed, gpu, wall = result["stages"], result["throughput"], result["device"], result["wall_seconds"]
    rows = [("base (after cold-start SFT)", "sft", "base"), ("GRPO", "grpo", "grpo"),
            ("S-GRPO", "s_grpo", "s_grpo"), ("T-SPMO", "t_spmo", "t_spmo")]
    lines = ["| method | held-out greedy (%) | held-out sampled, T=1 (%) | paper, Qwen2-1.5B (%) | "
             "rollout reward, first → last tenth | stage time (s) |",
             "|---|---|---|---|---|---|"]
    nan = float("nan")
    for label, stage, paper in rows:
        a = acc.get(stage)
        if a is None:
            lines.append(f"| {label} | not run (cut off) | | {PAPER[paper]} | | |")
            continue
        reward = f"{a['reward_first']:.3f} → {a['reward_last']:.3f}" if "reward_first" in a else ""
        lines.append(f"| {label} | {100 * a.get('test_accuracy', nan):.1f} | "
                     f"{100 * a.get('test_accuracy_sampled', nan):.1f} | {PAPER[paper]} | {reward} | "
                     f"{a.get('seconds', nan):.0f} |")
    table = "\n".join(lines)
    s = speed
    speed_line = ("Throughput: not measured (the run was cut off before it).\n" if s is None else
                  f"Throughput at {s['parameters'] / 1e6:.1f}M parameters, {s['completions']} completions per batch "
                  f"(mean {s['mean_completion_tokens']:.0f} tokens): rollout {s['rollout_completions_per_s']:.0f} "
                  f"completions/s, update {s['update_completions_per_s']:.0f} completions/s.\n")
    if s is not None:
        speed_line += "".join(f"Rollout, decode {d['decode']}: {d['rollout_completions_per_s']:.0f} completions/s, "
                              f"{d['rollout_tokens_per_s']:.0f} tokens/s.\n"
                              for d in [s, *s.get("other_decodes", {}).values()] if "decode" in d)
        for r in s.get("plan_run", []):
            speed_line += (f"Rollout through `muse plan run`, training.compile {r['compile']}: failed: "
                           f"{r['error'][-300:]}\n" if "error" in r else
                           f"Rollout through `muse plan run`, training.compile {r['compile']}: "
                           f"{r['rollout_completions_per_s']:.0f} completions/s (mean "
                           f"{r['mean_completion_tokens']:.0f} tokens), update {r['update_completions_per_s'] or 0:.0f} "
                           f"completions/s.\n")
    cut = "**Partial: the run was cut off; the rows it did not reach say so.**\n\n" if result.get("partial") else ""
    md = (f"# GRPO vs S-GRPO vs T-SPMO on 3×3-digit multiplication\n\n{cut}"
          f"Command: `{result['command']}` on {gpu}; whole run {wall:.0f} s. The three RL runs start from the "
          f"same SFT checkpoint and run at the same time on the one GPU (their stage times overlap).\n\n"
          f"{table}\n\n{speed_line}")
    print(md, flush=True)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "bench_grpo.json").write_text(json.dumps(result, indent=2, default=str))
        (out / "bench_grpo.md").write_text(md)


if __name__ == "__main__":
    main()
