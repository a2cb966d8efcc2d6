"""GRPO vs S-GRPO vs T-SPMO where RL has something to teach: a weak base muse builds itself, several seeds.

Lee & Tong (arXiv 2504.20834), Qwen2-1.5B with LoRA: 3×3 multiplication 3.9% → GRPO 4.4 / S-GRPO 22.9 /
T-SPMO 70.0; SVAMP 45.0 → 46.7 / 70.3 / 71.6. ``bench_grpo.py`` starts from a base that already solves 81% of
3×3 products greedily, so RL has nothing to teach there. This benchmark builds a base that is weak on the task
and runs the three algorithms from it, several seeds each, all through ``muse plan run``.

    python scripts/bench_rl_regime.py --tiny                       # CPU, minutes: the whole pipeline works
    python scripts/bench_rl_regime.py --phase rl --estimate        # what a call should take on one H100
    python scripts/bench_rl_regime.py --merge DIR [DIR ...]        # → docs/bench_rl_regime.{md,json,png}

What it does (``--task multiplication:3x3`` or ``word_problem``, the SVAMP-style templated stories):

1. **Data** as JSONL files, so that every stage and every run reads the same rows (the GRPO engine's
   ``data`` / ``eval_data`` options): training problems from the train split of
   ``engines/data/arithmetic.py``; ``--test-problems`` test problems from its test split (base seed);
   ``--val-problems`` validation problems from the test split under another seed with every test prompt left
   out. That module's split is a CRC32 bucket of the prompt, so no training prompt is ever a validation or
   test prompt, and the exclusion keeps validation and test apart; each set is deduplicated.
2. **The base** (``--phase base``): the decoder (12 layers × d_model 512, byte tokens, as bench_grpo) is
   pretrained on *shorter* problems with their worked steps and none of the task (3×3: 2×2, 2×3, 3×2 and 1×3
   digits, which hold every piece of a 3×3 solution — three partial products, a three-digit factor — but not
   one 3×3; word problems: add/sub chains and small products, no story), then cold-start SFT on the task's
   worked solutions at a constant lr, scored on the validation problems every ``--sft-every`` steps (greedy,
   and sampled at T = 0.3, the rollouts' temperature). The SFT length chosen is the first checkpoint whose
   validation greedy accuracy lies in the task's band (3×3: 2–10%, around the paper's 3.9%; word problems:
   35–55%, around its 45%) with a non-zero sampled accuracy, so that groups of rollouts carry some signal; if
   none does, the one nearest the band, said so. The base is then rebuilt to that step (the constant lr makes
   the first N steps of a longer SFT and an N-step SFT the same steps) and scored on the test problems.
3. **RL** (``--phase rl``): GRPO, S-GRPO and T-SPMO with ``bench_grpo.ALGORITHMS`` (|G| 8 / 8 / 50,
   β = λ = 0.01, T-SPMO replaying successes), LoRA rank 8 on q/v of the last quarter of layers, lr 1e-4,
   rollouts at T = 0.3, 16 prompts an update (T-SPMO 2), ``--updates`` updates, the test problems scored
   every ``--eval-every`` updates (learning curves). GRPO is given Lee & Tong's binary reward and GRPO's
   per-completion normalisation (the engine's GRPO default adds format and length terms), so S-GRPO differs
   from it by its token mask alone. Each (algorithm, seed) is a one-stage plan from the base checkpoint, its
   seed the plan's ``training.seed`` (the order of training rows, the rollouts' draws, the adapters' init).
   The base is rebuilt first (pass ``--sft-steps`` from the base call; without it the validation scan runs
   again), then every run of the call and the base's test evaluation start at once, each its own
   ``muse plan run`` process and store, sharing the GPU.
4. ``--phase r1``: ``plans/reasoning-r1-recipe.yaml`` (pretrain → cold-start SFT → GRPO → rejection
   sampling → all-scenarios RL), and the held-out accuracy after each stage.
5. ``--merge DIR ...``: the calls' JSON files into one table beside the paper's numbers, learning curves
   (PNG) and diagnostics (``docs/bench_rl_regime.{md,json,png}``).
6. Choosing RL settings without the test problems: ``--phase rl --held-out val --also K=V ...`` scores every
   run of the call, and its base, on the validation problems instead; the merge keeps those runs apart from
   the test rows and names, per task and algorithm, the setting with the highest mean validation Δ — the
   setting whose test row is the one to report.

Design decisions:
- Held-out accuracy: the engine's own evaluation (last number of the completion = answer), greedy and one
  sample a problem at T = 0.3 (``--eval-samples``), with binomial standard errors per run and mean ± s.e.
  over seeds; a run's change is taken against the base of its own call (paired), since a rebuilt base is
  not bit-identical on a GPU.
- The base's held-out accuracy comes from the same evaluator: a one-step ``cold_start_sft`` stage at lr
  1e-12 (AdamW moves no weight by more than ~2e-12: nothing an evaluation can see) whose
  evaluation scores the checkpoint — the engine has no evaluation at step 0 nor an evaluation-only stage.
- Time: a run's x-axis is the wall time since its stage started (evaluations included: every algorithm runs
  the same ones). Runs share one GPU, so "GPU-seconds" are fair-share seconds, ∫ dt / n(t) with n(t) the
  processes of the call running at t — an estimate that assumes equal shares. Completions/s is
  tokens/s ÷ mean completion tokens of each training step (evaluations excluded), under the same sharing.
- Memory: the store's peak ``memory_gib`` of each run beside ``muse plan optimize --json --dry-run``'s
  predicted total for the stage as written.
- A call keeps inside its limit: at ``--deadline-s`` the runs still going get Ctrl-C (they stop between two
  updates) and what they recorded is kept, the cut said in the JSON and the table; a SIGTERM from outside
  does the same. Each call writes one JSON file to ``--out`` (at most one per call on the device).

GPU calls (each a fresh machine and one command, ``PYTHONUNBUFFERED=1 PYTHONPATH=. python3 ...``; the minutes
are ``--estimate``'s for one H100, fitted to this script's own H100 calls, see ``estimate``; every call stops
its runs at 560 s whatever happens, and its JSON says what was cut):

    scripts/bench_rl_regime.py --phase base --out $OUT                                   # ~4 min; prints N
    scripts/bench_rl_regime.py --phase rl --sft-steps N --seeds 0 --out $OUT             # ~6.5 min
    scripts/bench_rl_regime.py --phase rl --sft-steps N --seeds 1 --out $OUT             # ~6.5 min
    scripts/bench_rl_regime.py --phase rl --sft-steps N --seeds 2 --out $OUT             # ~6.5 min
    scripts/bench_rl_regime.py --task word_problem --phase base --out $OUT               # ~3 min; prints M
    scripts/bench_rl_regime.py --task word_problem --phase rl --sft-steps M --seeds 0,1 --out $OUT   # ~5 min
    scripts/bench_rl_regime.py --task word_problem --phase rl --sft-steps M --seeds 2 --out $OUT     # ~3.5 min
    scripts/bench_rl_regime.py --phase r1 --out $OUT                                     # ~6 min

Measured on an H100 (2026-12-06, ``docs/rl_regime_calls/``): the base call took 237 s (N = 20); an rl call
pretrains and rebuilds the base in 80–116 s; with three runs sharing the GPU GRPO did ~0.8 s an update, S-GRPO
~0.9 s and T-SPMO 1.0 s (its 200 updates and five evaluations in 198 s), a seed's call 308 s; with six runs
sharing (two seeds) they reached 133–154 of 200 updates in the 350 s a 465 s deadline left; four GRPO / S-GRPO
runs at lr 1e-3 with LoRA on every layer finished 200 updates in 368 s.
``--rl-lr``, ``--lora-layers`` and ``--l2-lambda`` try settings other than the paper's; merge reports such a
call's runs apart, as a variant. ``--also l2_lambda=0 --also rl_lr=1e-3,lora_layers=1.0`` runs variants beside
the call's own settings, from the same rebuilt base (paired, and one base rebuild instead of one a variant),
leaving out the algorithms a variant would not change (λ is T-SPMO's alone), e.g.

    scripts/bench_rl_regime.py --phase rl --sft-steps 20 --seeds 0 --also l2_lambda=0 \
        --also rl_lr=1e-3,lora_layers=1.0 --out $OUT                                   # 8 runs

then, here, ``python scripts/bench_rl_regime.py --merge DIR1 DIR2 ...`` over the folders the calls' files came
back to. 3×3 takes one call per seed: two seeds of three algorithms are ~10 minutes at the default 200
updates, and get cut off. A call's runs print their own numbers as they end; the base call prints the chosen SFT
length (``--sft-steps``), which the RL calls take so that they rebuild that base without scanning again.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from bench_grpo import ALGORITHMS as PAPER_ALGORITHMS, ROLLOUT_TEMPERATURE  # noqa: E402

R1_PLAN = ROOT / "plans" / "reasoning-r1-recipe.yaml"
PAPER = {"multiplication:3x3": {"name": "3×3 multiplication", "base": 3.9, "grpo": 4.4, "s_grpo": 22.9,
                                "t_spmo": 70.0},
         "word_problem": {"name": "SVAMP", "base": 45.0, "grpo": 46.7, "s_grpo": 70.3, "t_spmo": 71.6}}
LABELS = {"base": "base (after cold-start SFT)", "grpo": "GRPO", "s_grpo": "S-GRPO", "t_spmo": "T-SPMO"}
CORRECT_ONLY = {"correctness": 1.0, "format": 0.0, "efficiency": 0.0}
# GRPO as Lee & Tong ran it: their binary reward, per-completion normalisation (DeepSeekMath's 1/|o_i|)
ALGORITHMS = {**PAPER_ALGORITHMS,
              "grpo": {**PAPER_ALGORITHMS["grpo"], "reward_weights": CORRECT_ONLY, "loss_normalization": "sequence"}}
LORA = {"rank": 8, "alpha": 16, "target_modules": ["q_proj", "v_proj"], "layers_fraction": 0.25}
PROMPT = "Q: {prompt}\nA: "  # engines.data.arithmetic.format_prompt, as a file's prompt_template
EVAL_LR = 1.0e-12  # the evaluation-only stage's one step: no weight moves (module docstring)


@dataclass(frozen=True)
class Task:
    pretrain: tuple[str, ...]  # shorter problems with worked steps, none of the task itself
    max_new_tokens: int
    band: tuple[float, float]  # validation greedy accuracy the base should have


TASKS = {
    "multiplication:3x3": Task(("multiplication:2x2", "multiplication:2x3", "multiplication:3x2",
                                "multiplication:1x3"), 112, (0.02, 0.10)),
    "word_problem": Task(("add_sub:2x2", "add_sub:3x2", "multiplication:1x2", "multiplication:2x2"), 40,
                         (0.35, 0.55)),
}


@dataclass(frozen=True)
class Config:
    task: str = "multiplication:3x3"
    tiny: bool = False
    shape: tuple[int, int, int] = (12, 512, 8)  # layers, d_model, heads
    seq_len: int = 160
    base_seed: int = 0
    pretrain_steps: int = 1200
    pretrain_micro: int = 64
    sft_max_steps: int = 150
    sft_every: int = 10
    sft_micro: int = 16
    sft_lr: float = 1.0e-4
    sft_steps: int | None = None  # the chosen SFT length; None: scan the validation problems
    band: tuple[float, float] = (0.02, 0.10)
    val_problems: int = 500
    val_samples: int = 2
    test_problems: int = 1000
    eval_samples: int = 1
    train_problems: int = 20000
    updates: int = 200
    eval_every: int = 40
    prompts: dict[str, int] = field(default_factory=lambda: {"grpo": 16, "s_grpo": 16, "t_spmo": 2})
    t_spmo_group: int = 50
    rl_lr: float = 1.0e-4  # the paper's; --rl-lr tries another (a variant, reported apart)
    lora_layers: float = 0.25  # LoRA on the last quarter of the layers (the paper's); --lora-layers
    l2_lambda: float = 0.01  # T-SPMO's L2 on the LoRA weights (the paper's λ); --l2-lambda
    deadline_s: float = 560.0
    held_out: str = "test"  # what the RL runs and their base are scored on: test, or val to choose settings

    @property
    def held_out_n(self) -> int:
        return self.val_problems if self.held_out == "val" else self.test_problems

    @property
    def variant(self) -> str:
        """'' for the paper's RL settings, else what differs (merge reports a variant's runs apart)."""
        parts = ([f"lr {self.rl_lr:g}"] if self.rl_lr != 1.0e-4 else []) + \
            ([f"LoRA on {self.lora_layers:.0%} of the layers"] if self.lora_layers != 0.25 else []) + \
            ([f"T-SPMO λ {self.l2_lambda:g}"] if self.l2_lambda != 0.01 else [])
        return ", ".join(parts)

    @property
    def max_new_tokens(self) -> int:
        return TASKS[self.task].max_new_tokens


TINY = dict(shape=(2, 64, 4), pretrain_steps=30, pretrain_micro=8, sft_max_steps=6, sft_every=2, sft_micro=4,
            sft_lr=1.0e-3, val_problems=24, test_problems=32, train_problems=300, updates=4, eval_every=2,
            prompts={"grpo": 2, "s_grpo": 2, "t_spmo": 1}, t_spmo_group=8, deadline_s=3000.0)


# ---- estimates -----------------------------------------------------------------------------
# From docs/bench_grpo.md / bench_grpo.json (38.7M decoder): pretraining ~230k tokens/s (H200, 1,200 steps
# × 64 × 160 in a 70 s stage: ~17 s of it generation and start); rollouts through the CUDA-graph decode step
# ~300 completions/s (H100, 128 rows, rewards included) and the GRPO update ~300/s (measured before the
# reference pass was batched); a `muse plan run` process ~20 s from launch to its first step. Concurrent runs:
# bench_grpo's three at once gave 2.3× one run's throughput with eager decoding. This script's own H100 calls
# (docs/rl_regime_calls/) fit a gain of ~3.7 with 3 runs sharing and ~3.0 with 6 (a seed's call: 308 s measured,
# 385 s estimated at 3.0; two seeds': 200 updates extrapolated to ~590 s, estimated 618 s): 3.0 is used.
PRETRAIN_TOKENS_S, STAGE_OVERHEAD_S, START_S = 230e3, 17.0, 20.0
COMPLETION_S, SHARING_GAIN = 1 / 300, 3.0


def estimate(cfg: Config, phase: str, algorithms: list[str], seeds: list[int]) -> float:
    """Seconds a phase should take on one H100 (rates above; completions cost in proportion to
    ``max_new_tokens`` against the 112 of 3×3 products)."""
    per = COMPLETION_S * cfg.max_new_tokens / 112
    pretrain = cfg.pretrain_steps * cfg.pretrain_micro * cfg.seq_len / PRETRAIN_TOKENS_S + STAGE_OVERHEAD_S + START_S
    val_eval = cfg.val_problems * (1 + cfg.val_samples) * per
    test_eval = cfg.test_problems * (1 + cfg.eval_samples) * per
    scan = (cfg.sft_max_steps // cfg.sft_every) * val_eval + START_S
    rebuild = START_S + val_eval + 10.0
    scanned = 0.0 if cfg.sft_steps is not None else scan
    if phase == "base":
        return pretrain + scanned + rebuild + START_S + test_eval
    if phase == "r1":
        spec = yaml.safe_load(R1_PLAN.read_text())
        total = START_S * 3 + STAGE_OVERHEAD_S  # the plan's run, its import, the pretrained model's evaluation
        for s in spec["stages"]:
            micro = (s.get("training") or {}).get("micro_batch", spec["training"]["micro_batch"])
            o = s.get("options", {})
            if s["kind"] == "pretrain":
                total += s["steps"] * micro * spec["model"]["seq_len"] / PRETRAIN_TOKENS_S
                continue
            samples = o.get("samples", 8 if s["kind"] != "cold_start_sft" else 0)
            train = 2 if "rl" in s["kind"] else 1  # rollout and update
            total += s["steps"] * micro * samples * train * COMPLETION_S
            total += (s["steps"] // s["eval_every"]) * o.get("eval_problems", 64) * (1 + o.get("eval_samples", 1)) \
                * COMPLETION_S
        return total
    replays = ALGORITHMS["t_spmo"]["success_budget"]  # T-SPMO: its prompts' groups, then the replayed ones
    rollouts = sum((cfg.prompts[a] + replays) * cfg.t_spmo_group if a == "t_spmo" else cfg.prompts[a] * 8
                   for a in algorithms)
    rl = len(seeds) * cfg.updates * rollouts * 2 * per / SHARING_GAIN  # rollout + update, shared
    held_out = cfg.held_out_n * (1 + cfg.eval_samples) * per  # the rl runs' evaluations (test or val)
    evals = len(seeds) * len(algorithms) * (cfg.updates // cfg.eval_every) * held_out / SHARING_GAIN
    return pretrain + scanned + rebuild + START_S + rl + evals + held_out / SHARING_GAIN


# ---- data ----------------------------------------------------------------------------------
def _problems(task: str, n: int, seed: int, split: str, exclude: set[str] = frozenset()) -> list[Any]:
    from engines.data.arithmetic import iter_problems

    out, seen = [], set(exclude)
    for drawn, p in enumerate(iter_problems([task], seed, split)):  # type: ignore[arg-type]
        if p.prompt not in seen:
            seen.add(p.prompt)
            out.append(p)
            if len(out) == n:
                return out
        if drawn > 50 * n:
            raise SystemExit(f"{task}'s {split} split holds too few distinct problems for {n} of them")
    return out


def _write_rows(path: Path, problems: list[Any]) -> Path:
    rows = ({"prompt": p.prompt, "completion": p.solution + "\n", "answer": p.answer} for p in problems)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


VAL_SEED_OFFSET = 7919  # validation: the test split under another seed, every test prompt left out


def write_data(cfg: Config, folder: Path) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    test = _problems(cfg.task, cfg.test_problems, cfg.base_seed, "test")
    val = _problems(cfg.task, cfg.val_problems, cfg.base_seed + VAL_SEED_OFFSET, "test", {p.prompt for p in test})
    train = _problems(cfg.task, cfg.train_problems, cfg.base_seed, "train")
    assert not {p.prompt for p in val} & {p.prompt for p in test} and len(test) == cfg.test_problems
    return {"train": _write_rows(folder / "train.jsonl", train), "val": _write_rows(folder / "val.jsonl", val),
            "test": _write_rows(folder / "test.jsonl", test)}


# ---- plans ---------------------------------------------------------------------------------
def _model(cfg: Config, init_from: Path | None = None) -> dict:
    layers, d_model, heads = cfg.shape
    model = {"scale": "1M", "residual": "standard", "seq_len": cfg.seq_len, "vocab_size": 260,
             "shape": {"layers": layers, "d_model": d_model, "n_heads": heads}}
    return {**model, "init_from": str(init_from)} if init_from is not None else model


def _plan(cfg: Config, name: str, model: dict, training: dict, stages: list[dict]) -> dict:
    return {"name": name, "model": model, "compute": "cpu" if cfg.tiny else None,
            "training": {"seed": cfg.base_seed, **training}, "stages": stages}


def _files(cfg: Config, files: dict[str, Path], held_out: str, samples: int) -> dict:
    """Options of a GRPO-engine stage reading the data files, scored on ``held_out`` (val or test)."""
    n = cfg.val_problems if held_out == "val" else cfg.test_problems
    return {"data": str(files["train"]), "eval_data": str(files[held_out]), "prompt_template": PROMPT,
            "max_new_tokens": cfg.max_new_tokens, "temperature": ROLLOUT_TEMPERATURE,
            "eval_temperature": ROLLOUT_TEMPERATURE, "eval_problems": n, "eval_samples": samples}


def pretrain_plan(cfg: Config) -> dict:
    steps = cfg.pretrain_steps
    return _plan(cfg, "regime-pretrain", _model(cfg),
                 {"micro_batch": cfg.pretrain_micro, "lr": 1.0e-3 if cfg.tiny else 5.0e-4,
                  "warmup_steps": 2 if cfg.tiny else 100},
                 [{"name": "pretrain", "kind": "pretrain", "steps": steps, "eval_every": steps,
                   "checkpoint_every": steps, "options": {"tasks": list(TASKS[cfg.task].pretrain)}}])


def sft_plan(cfg: Config, files: dict[str, Path], pretrained: Path, steps: int, every: int) -> dict:
    """Cold-start SFT at a constant lr (its first N steps are the same whatever ``steps``), scored on val."""
    return _plan(cfg, "regime-sft", _model(cfg, pretrained),
                 {"micro_batch": cfg.sft_micro, "lr": cfg.sft_lr, "warmup_steps": 1 if cfg.tiny else 5,
                  "schedule": "constant"},
                 [{"name": "sft", "kind": "cold_start_sft", "steps": steps, "eval_every": every,
                   "checkpoint_every": steps, "options": _files(cfg, files, "val", cfg.val_samples)}])


def eval_plan(cfg: Config, files: dict[str, Path], checkpoint: Path, held_out: str, samples: int,
              options: dict | None = None) -> dict:
    """Score ``checkpoint`` on ``held_out`` with the engine's evaluator: one step at lr 1e-12, then evaluate."""
    return _plan(cfg, f"regime-eval-{held_out}", _model(cfg, checkpoint),
                 {"micro_batch": 1, "lr": EVAL_LR, "warmup_steps": 0, "weight_decay": 0.0},
                 [{"name": "eval", "kind": "cold_start_sft", "steps": 1, "eval_every": 1,
                   "options": {**_files(cfg, files, held_out, samples), **(options or {})}}])


def rl_plan(cfg: Config, files: dict[str, Path], base: Path, algorithm: str, seed: int) -> dict:
    opts = {**ALGORITHMS[algorithm], **_files(cfg, files, cfg.held_out, cfg.eval_samples), "algorithm": algorithm,
            "lora": {**LORA, "layers_fraction": cfg.lora_layers}}
    if algorithm == "t_spmo":
        opts.update(group_size=cfg.t_spmo_group, l2_lambda=cfg.l2_lambda)
    return _plan(cfg, f"regime-{algorithm.replace('_', '-')}-s{seed}", _model(cfg, base),
                 {"micro_batch": cfg.prompts[algorithm], "lr": cfg.rl_lr, "warmup_steps": 1 if cfg.tiny else 5,
                  "seed": seed},
                 [{"name": algorithm, "kind": "reasoning_rl", "steps": cfg.updates, "eval_every": cfg.eval_every,
                   "checkpoint_every": cfg.updates, "options": opts}])


# ---- processes -----------------------------------------------------------------------------
@dataclass
class Launched:
    label: str
    home: Path
    proc: subprocess.Popen
    cut_off: bool = False


RUNNING: list[Launched] = []  # every process this script started and has not seen end


def launch(label: str, home: Path, spec: dict, threads: int, predict: bool = False) -> Launched:
    """``muse plan import`` + ``muse plan run`` of ``spec`` in its own store (MUSE_HOME), in a process group
    of its own so that a deadline can stop it; ``predict``: the optimizer's JSON into ``fit.json`` first."""
    home.mkdir(parents=True, exist_ok=True)
    path = home / "plan.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    muse, name = f"{sys.executable} -m muse_plan", spec["name"]
    fit = f"({muse} plan optimize {name} --json --dry-run > {home / 'fit.json'} 2>/dev/null || true) && " \
        if predict else ""
    command = f"{muse} plan import {path} >/dev/null && {fit}exec {muse} plan run {name} --no-probe"
    env = {**os.environ, "MUSE_HOME": str(home), "PYTHONPATH": f"{ROOT}:{os.environ.get('PYTHONPATH', '')}",
           "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(threads))}
    proc = subprocess.Popen(["bash", "-c", command], env=env, cwd=ROOT, stdout=(home / "log.txt").open("w"),
                            stderr=subprocess.STDOUT, start_new_session=True)
    RUNNING.append(Launched(label, home, proc))
    return RUNNING[-1]


def _stop(runs: list[Launched], grace: float = 20.0) -> None:
    """Ctrl-C to each run's process group (the loop stops between two steps), then SIGKILL after ``grace``."""
    for r in runs:
        if r.proc.poll() is None:
            r.cut_off = True
            os.killpg(r.proc.pid, signal.SIGINT)
    end = time.monotonic() + grace
    for r in runs:
        try:
            r.proc.wait(timeout=max(0.1, end - time.monotonic()))
        except subprocess.TimeoutExpired:
            os.killpg(r.proc.pid, signal.SIGKILL)
            r.proc.wait()


def wait(runs: list[Launched], deadline: float) -> None:
    """Until every run ends or the deadline (``time.monotonic()``) passes; a run that failed is said with
    its log's tail, and the others go on."""
    while any(r.proc.poll() is None for r in runs) and time.monotonic() < deadline:
        time.sleep(1.0)
    _stop(runs)
    for r in runs:
        RUNNING.remove(r)
        if r.proc.returncode and not r.cut_off:
            print(f"--- {r.label} failed (exit {r.proc.returncode}):\n{(r.home / 'log.txt').read_text()[-2500:]}",
                  flush=True)


# ---- the store -----------------------------------------------------------------------------
def _posix(t: datetime | None) -> float | None:
    from muse_plan.store.runs import posix_time

    return None if t is None else posix_time(t)


def read_record(home: Path) -> dict[str, Any]:
    """The newest run in ``home``'s store: per stage its status, start and end (POSIX), and every metric
    as [step, value, seconds since the stage started]; the run's folder and events."""
    from muse_plan.store import runs
    from muse_plan.store.db import Store

    if not (home / "muse.db").exists():
        return {"stages": {}, "run_dir": None, "events": []}
    store = Store(f"sqlite:///{home / 'muse.db'}")
    try:
        with store.read() as session:
            listed = runs.list_runs(session)
            if not listed:
                return {"stages": {}, "run_dir": None, "events": []}
            run = listed[0][0]
            out: dict[str, Any] = {"run_dir": run.run_dir, "status": run.status, "stages": {},
                                   "events": [e.message for e in runs.events(session, run.id, limit=20)]}
            for stage in runs.stage_runs(session, run):
                points = runs.metric_points(session, stage.id)
                start = _posix(stage.started_at) or (points[0][3] if points else None)
                series: dict[str, list] = {}
                for step, name, value, t in points:
                    series.setdefault(name, []).append([step, value, round(t - start, 2)])
                end = _posix(stage.finished_at) or (points[-1][3] if points else start)
                out["stages"][stage.name] = {"status": stage.status, "start": start, "end": end, "series": series}
    finally:
        store.close()
    fit = home / "fit.json"
    if fit.exists() and fit.stat().st_size:
        try:
            priced = json.loads(fit.read_text())
            stage = (priced.get("written") or priced.get("chosen"))["stages"][0]
            out["predicted_gib"] = stage["memory"]["total"] / 2**30
        except (ValueError, KeyError, TypeError, IndexError):
            pass
    return out


def newest_checkpoint(record: dict, stage: str) -> Path:
    found = sorted((Path(record["run_dir"]) / stage).glob("step-*")) if record.get("run_dir") else []
    found = [p for p in found if not p.name.endswith(".tmp")]
    if not found:
        raise SystemExit(f"no checkpoint of stage {stage!r} in {record.get('run_dir')}")
    return found[-1]


def last(record: dict, stage: str, metric: str) -> float | None:
    points = record["stages"].get(stage, {}).get("series", {}).get(metric)
    return points[-1][1] if points else None


def curve(record: dict, stage: str) -> list[list[float]]:
    """[step, greedy, sampled, seconds] at each evaluation of ``stage``."""
    series = record["stages"].get(stage, {}).get("series", {})
    sampled = {s: v for s, v, _ in series.get("test_accuracy_sampled", [])}
    return [[s, v, sampled.get(s, float("nan")), t] for s, v, t in series.get("test_accuracy", [])]


def slim(record: dict, keep: tuple[str, ...]) -> dict:
    """A record with only the metric series ``keep`` (the JSON that comes back stays small)."""
    stages = {name: {**s, "series": {k: v for k, v in s["series"].items() if k in keep}}
              for name, s in record["stages"].items()}
    return {**record, "stages": stages}


DIAGNOSTICS = ("equal_groups", "advantage_abs", "informative_transitions")  # engines/grpo/rl.py, per update
RL_SERIES = ("test_accuracy", "test_accuracy_sampled", "test_format", "reward", "train_accuracy", "kl", "loss",
             "grad_norm", "completion_tokens", "tokens_per_s", "memory_gib", "l2_term", *DIAGNOSTICS)


# ---- phases --------------------------------------------------------------------------------
class Call:
    """One invocation: its config, its working folder, its deadline and the result it writes."""

    def __init__(self, cfg: Config, phase: str, out: Path, command: str) -> None:
        self.cfg, self.phase, self.out = cfg, phase, out
        self.root = Path(tempfile.mkdtemp(prefix="muse-rl-regime-"))
        self.started = time.monotonic()
        self.deadline = self.started + cfg.deadline_s
        self.threads = 1 if cfg.tiny else max(1, (os.cpu_count() or 2) // 4)
        self.result: dict[str, Any] = {"kind": "bench_rl_regime", "task": cfg.task, "phase": phase,
                                       "tiny": cfg.tiny, "command": command, "config": asdict(cfg),
                                       "device": device_name(cfg.tiny), "started_at": _now(), "partial": True}
        self._files: dict[str, Path] | None = None
        self.pending: tuple[list[Launched], dict[str, dict]] | None = None  # RL runs launched, not yet read

    @property
    def files(self) -> dict[str, Path]:
        if self._files is None:
            self._files = write_data(self.cfg, self.root / "data")
        return self._files

    def run(self, label: str, spec: dict, predict: bool = False) -> Launched:
        return launch(label, self.root / label, spec, self.threads, predict)

    def run_one(self, label: str, spec: dict) -> dict:
        launched = self.run(label, spec)
        wait([launched], self.deadline)
        record = read_record(launched.home)
        if launched.cut_off or launched.proc.returncode:
            self.save()
            raise SystemExit(f"{label} did not finish ({'deadline' if launched.cut_off else 'failed'})")
        return record

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def save(self, partial: bool = True) -> Path:
        self.result.update(partial=partial, wall_seconds=self.elapsed())
        self.out.mkdir(parents=True, exist_ok=True)
        tag = self.result["task"].replace(":", "").replace("_", "")
        seeds = "-s" + "".join(map(str, self.result.get("seeds", []))) if self.result.get("seeds") else ""
        path = self.out / f"bench_rl_regime-{tag}-{self.phase}{seeds}.json"
        path.write_text(json.dumps(self.result, default=str) + "\n")
        return path


def build_base(call: Call, scan: bool) -> Path:
    """Pretrain; when ``scan``, the SFT validation scan and its choice; then the SFT to the chosen step.
    Returns the base checkpoint (the SFT's last)."""
    cfg, base = call.cfg, call.result.setdefault("base", {})
    pre = call.run_one("pretrain", pretrain_plan(cfg))
    base["pretrain"] = {"val_loss": last(pre, "pretrain", "val_loss"),
                        "seconds": pre["stages"]["pretrain"]["end"] - pre["stages"]["pretrain"]["start"]}
    pretrained = newest_checkpoint(pre, "pretrain")
    print(f"[{call.elapsed():.0f} s] pretrained: val_loss {base['pretrain']['val_loss']}", flush=True)
    steps = cfg.sft_steps
    if scan or steps is None:
        steps = scan_sft(call, pretrained)
    sft = call.run_one("sft", sft_plan(cfg, call.files, pretrained, steps, steps))
    base["sft_steps"] = steps
    base["val"] = {"greedy": last(sft, "sft", "test_accuracy"), "sampled": last(sft, "sft", "test_accuracy_sampled")}
    print(f"[{call.elapsed():.0f} s] base rebuilt with {steps} SFT steps: validation {base['val']}", flush=True)
    call.save()
    return newest_checkpoint(sft, "sft")


def scan_sft(call: Call, pretrained: Path) -> int:
    """Cold-start SFT scored on validation every ``sft_every`` steps (and the pretrained model alone, at
    step 0, beside it); the chosen step by ``choose``."""
    cfg = call.cfg
    runs = [call.run("scan", sft_plan(cfg, call.files, pretrained, cfg.sft_max_steps, cfg.sft_every)),
            call.run("pretrained-val", eval_plan(cfg, call.files, pretrained, "val", cfg.val_samples))]
    wait(runs, call.deadline)
    scanned, alone = read_record(runs[0].home), read_record(runs[1].home)
    points = [[s, g, samp] for s, g, samp, _ in curve(scanned, "sft")]
    step0 = [[0, last(alone, "eval", "test_accuracy"), last(alone, "eval", "test_accuracy_sampled")]]
    if not points:
        call.save()
        raise SystemExit(f"the SFT scan recorded no evaluation:\n{(runs[0].home / 'log.txt').read_text()[-2000:]}")
    chosen, reason = choose(points, cfg.band)
    call.result["base"]["scan"] = {"curve": step0 + points, "band": cfg.band, "chosen": chosen, "reason": reason,
                                   "val_problems": cfg.val_problems, "val_samples": cfg.val_samples}
    print(f"[{call.elapsed():.0f} s] validation scan (SFT step, greedy, sampled): {step0 + points}\n"
          f"chosen: --sft-steps {chosen} — {reason}", flush=True)
    call.save()
    return chosen


def choose(points: list[list[float]], band: tuple[float, float]) -> tuple[int, str]:
    """The first SFT step whose validation greedy accuracy is in ``band`` with sampled accuracy above 0;
    else the one nearest the band (the earliest of equals)."""
    lo, hi = band
    for step, greedy, sampled in points:
        if lo <= greedy <= hi and sampled > 0:
            return int(step), (f"the first SFT checkpoint whose validation greedy accuracy ({greedy:.1%}) is in "
                               f"the band {lo:.0%}–{hi:.0%}, with sampled accuracy {sampled:.1%} at T = 0.3")

    def distance(point: list[float]) -> float:
        greedy, sampled = point[1], point[2]
        return (lo - greedy if greedy < lo else greedy - hi if greedy > hi else 0.0) + (sampled <= 0) * 1e-6

    step, greedy, sampled = min(points, key=distance)
    return int(step), (f"no SFT checkpoint had validation greedy accuracy in the band {lo:.0%}–{hi:.0%} with "
                       f"sampled accuracy above 0; the nearest: {greedy:.1%} greedy, {sampled:.1%} sampled")


def phase_base(call: Call) -> None:
    cfg = call.cfg
    base = build_base(call, scan=cfg.sft_steps is None)
    test = call.run_one("base-test", eval_plan(cfg, call.files, base, "test", cfg.eval_samples))
    call.result["base"]["test"] = held_out_result(test, "eval", cfg)
    print(f"[{call.elapsed():.0f} s] base on {cfg.test_problems} test problems: {call.result['base']['test']}",
          flush=True)


def held_out_result(record: dict, stage: str, cfg: Config, n: int | None = None) -> dict:
    # the engine names its held-out metrics test_*, whichever file eval_data is
    return {"greedy": last(record, stage, "test_accuracy"), "sampled": last(record, stage, "test_accuracy_sampled"),
            "n": n or cfg.test_problems, "samples": cfg.eval_samples}


VARIED = ("rl_lr", "lora_layers", "l2_lambda")  # the RL settings a variant may change (--also)


def variant_configs(cfg: Config, also: list[str]) -> list[Config]:
    """The call's own RL settings, then one Config per ``--also "rl_lr=1e-3,lora_layers=1.0"``."""
    out = [cfg]
    for spec in also:
        changes: dict[str, float] = {}
        for part in (x.strip() for x in spec.split(",") if x.strip()):
            key, _, value = part.partition("=")
            if key.strip() not in VARIED:
                raise SystemExit(f"--also {spec!r}: {key.strip()!r} is not one of {', '.join(VARIED)}")
            changes[key.strip()] = float(value)
        out.append(replace(cfg, **changes))
    return out


def changes_for(variant: Config, cfg: Config, algorithm: str) -> bool:
    """Whether ``variant`` runs ``algorithm`` differently from ``cfg`` (λ is T-SPMO's alone)."""
    return (variant.rl_lr, variant.lora_layers) != (cfg.rl_lr, cfg.lora_layers) or \
        (algorithm == "t_spmo" and variant.l2_lambda != cfg.l2_lambda)


def phase_rl(call: Call, algorithms: list[str], seeds: list[int], also: list[str] | None = None) -> None:
    cfg = call.cfg
    variants = variant_configs(cfg, also or [])
    call.result.update(algorithms=algorithms, seeds=seeds, rl=[],
                       variants=[{k: getattr(v, k) for k in VARIED} for v in variants])
    base = build_base(call, scan=cfg.sft_steps is None)
    launched = [call.run("base-held-out", eval_plan(cfg, call.files, base, cfg.held_out, cfg.eval_samples))]
    plans = {}
    for index, variant in enumerate(variants):  # every variant from the one base: paired comparisons
        for seed in seeds:
            for algorithm in (a for a in algorithms if not index or changes_for(variant, cfg, a)):
                label = f"{algorithm}-s{seed}" + (f"-v{index}" if index else "")
                plans[label] = rl_plan(variant, call.files, base, algorithm, seed)
                launched.append(call.run(label, plans[label], predict=True))
    print(f"[{call.elapsed():.0f} s] {len(launched) - 1} RL runs and the base's {cfg.held_out} evaluation started",
          flush=True)
    call.pending = (launched, plans)
    wait(launched, call.deadline)
    collect_rl(call)


def collect_rl(call: Call) -> None:
    """The RL runs' records into the call's result (also from the SIGTERM handler, after it stopped them)."""
    (launched, plans), call.pending = call.pending, None
    cfg, seeds, algorithms = call.cfg, call.result["seeds"], call.result["algorithms"]
    records = {r.label: (read_record(r.home), r.cut_off) for r in launched}
    call.result["base"][cfg.held_out] = held_out_result(records["base-held-out"][0], "eval", cfg, cfg.held_out_n)
    intervals = [(rec["stages"][s]["start"], rec["stages"][s]["end"]) for rec, _ in records.values()
                 for s in rec["stages"] if rec["stages"][s]["start"] is not None]
    for index, changes in enumerate(call.result.get("variants") or [{}]):
        variant = replace(cfg, **changes)
        for seed in seeds:
            for algorithm in (a for a in algorithms if not index or changes_for(variant, cfg, a)):
                label = f"{algorithm}-s{seed}" + (f"-v{index}" if index else "")
                record, cut = records[label]
                call.result["rl"].append({**summarize(variant, algorithm, seed, slim(record, RL_SERIES), cut,
                                                      intervals, plans[label]),
                                          "variant": variant.variant, "settings": changes})
    print_call(call)


def fair_share(intervals: list[tuple[float, float]], start: float, end: float) -> float:
    """∫ dt / n(t) over [start, end], n(t) the intervals holding t (at least 1)."""
    cuts = sorted({start, end, *(t for i in intervals for t in i if start < t < end)})
    total = 0.0
    for a, b in zip(cuts, cuts[1:]):
        mid = (a + b) / 2
        total += (b - a) / max(1, sum(lo <= mid <= hi for lo, hi in intervals))
    return total


def summarize(cfg: Config, algorithm: str, seed: int, record: dict, cut: bool,
              intervals: list[tuple[float, float]], plan: dict) -> dict:
    stage = record["stages"].get(algorithm, {"series": {}, "start": None, "end": None})
    series = stage["series"]
    points = curve(record, algorithm)
    if stage["start"] is not None:
        for p in points:  # fair-share GPU-seconds at each evaluation
            p.append(fair_share(intervals, stage["start"], stage["start"] + p[3]))
    speed = {s: v for s, v, _ in series.get("tokens_per_s", [])}
    per_step = [speed[s] / v for s, v, _ in series.get("completion_tokens", []) if speed.get(s) and v > 0]
    memory = [v for _, v, _ in series.get("memory_gib", [])]
    return {"algorithm": algorithm, "seed": seed, "cut_off": cut, "status": stage.get("status"),
            "updates_done": max((s for s, _, _ in series.get("loss", [])), default=0), "updates": cfg.updates,
            "curve": points, "n": cfg.held_out_n, "samples": cfg.eval_samples, "split": cfg.held_out,
            "completions_per_s": statistics.median(per_step) if per_step else None,
            "peak_gib": max(memory) if memory else None, "predicted_gib": record.get("predicted_gib"),
            "seconds": (stage["end"] - stage["start"]) if stage["start"] is not None else None,
            "series": {k: [[s, v] for s, v, _ in series.get(k, [])]
                       for k in ("reward", "train_accuracy", "kl", "loss", "grad_norm", "completion_tokens",
                                 *DIAGNOSTICS)},
            "events": record.get("events", [])[:10], "plan": plan}


def phase_r1(call: Call) -> None:
    """The R1 recipe plan as written (compute: this machine; ``--tiny``: a tiny shape and a few steps), then
    the pretrained checkpoint scored on the same held-out problems as the later stages."""
    from engines.data.arithmetic import generate

    spec = r1_spec(call.cfg)
    task, shape = spec["stages"][1]["options"], spec["model"]["shape"]
    cfg = replace(call.cfg, shape=(shape["layers"], shape["d_model"], shape["n_heads"]),
                  seq_len=spec["model"]["seq_len"], test_problems=task["eval_problems"],
                  eval_samples=task.get("eval_samples", 1))
    launched = call.run("r1", spec)
    wait([launched], call.deadline)
    record = read_record(launched.home)
    stages: dict[str, dict] = {}
    call.result["r1"] = {"plan": spec, "cut_off": launched.cut_off, "exit": launched.proc.returncode,
                         "stages": stages, "events": record.get("events", [])[:10]}
    for name, stage in record["stages"].items():
        if stage["start"] is not None:
            stages[name] = {**held_out_result(record, name, cfg), "seconds": stage["end"] - stage["start"],
                            "status": stage["status"], "curve": curve(record, name)}
    call.save()
    if stages.get("pretrain", {}).get("status") == "completed":  # scored on the stages' own held-out problems
        folder, seed = call.root / "r1-data", spec["training"].get("seed", 0)
        folder.mkdir(parents=True, exist_ok=True)
        files = {"train": _write_rows(folder / "train.jsonl", generate(task["tasks"], 64, seed, "train")),
                 "test": _write_rows(folder / "test.jsonl", generate(task["tasks"], cfg.test_problems, seed, "test"))}
        evaluated = call.run_one("r1-pretrain-test", eval_plan(
            cfg, files, newest_checkpoint(record, "pretrain"), "test", cfg.eval_samples,
            {"max_new_tokens": task["max_new_tokens"]}))
        stages["pretrain"].update(held_out_result(evaluated, "eval", cfg),
                                  val_loss=last(record, "pretrain", "val_loss"))
    for name, s in stages.items():
        print(f"r1 {name} ({s['status']}): greedy {s['greedy']}, sampled {s['sampled']}", flush=True)


def r1_spec(cfg: Config) -> dict:
    spec = json.loads(json.dumps(yaml.safe_load(R1_PLAN.read_text())))  # anchors become separate copies
    spec["compute"] = "cpu" if cfg.tiny else None  # this machine, as detected
    if cfg.tiny:
        spec["model"]["shape"] = {"layers": 2, "d_model": 64, "n_heads": 4}
        spec["training"].update(precision="fp32", micro_batch=8, warmup_steps=2)
        for stage in spec["stages"]:
            stage["steps"] = stage["eval_every"] = 20 if stage["kind"] == "pretrain" else 2
            if stage["kind"] != "pretrain":
                stage["options"].update(eval_problems=16, max_new_tokens=48)
                stage.setdefault("training", {})["micro_batch"] = 2
    return spec


# ---- output of one call ----------------------------------------------------------------------
def print_call(call: Call) -> None:
    split = call.cfg.held_out
    base = call.result["base"].get(split) or {}
    print(f"base: greedy {base.get('greedy')}, sampled {base.get('sampled')} on {base.get('n')} {split} problems")
    for r in call.result.get("rl", []):
        final = r["curve"][-1] if r["curve"] else None
        print(f"{r['algorithm']} seed {r['seed']}{' (' + r['variant'] + ')' if r.get('variant') else ''}: "
              f"{r['updates_done']}/{r['updates']} updates"
              f"{' (cut off)' if r['cut_off'] else ''}, final greedy {final[1] if final else None}, "
              f"sampled {final[2] if final else None}, {r['completions_per_s'] or 0:.1f} completions/s, "
              f"peak {r['peak_gib'] or 0:.2f} GiB (predicted {r['predicted_gib'] or 0:.2f})", flush=True)


def device_name(tiny: bool) -> str:
    if tiny:
        return "CPU"
    try:
        names = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                               text=True, timeout=20).stdout.strip().splitlines()
        return names[0] if names else "CPU"
    except (OSError, subprocess.TimeoutExpired):
        return "CPU"


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")



# ---- merging calls: table, curves, diagnostics -------------------------------------------------
def load_calls(dirs: list[Path]) -> list[dict]:
    calls = []
    for folder in dirs:
        for path in sorted(Path(folder).glob("*.json")):
            try:
                data = json.loads(path.read_text())
            except (ValueError, OSError):
                continue
            if isinstance(data, dict) and data.get("kind") == "bench_rl_regime":
                calls.append({**data, "file": f"{Path(folder).name}/{path.name}"})
    return calls


def _binomial(p: float, n: int) -> float:
    return math.sqrt(max(p * (1 - p), 0.0) / n) if n else float("nan")


def _mean_se(values: list[float], one_se: float) -> tuple[float, float]:
    """Mean ± s.e. over seeds; a single value keeps ``one_se`` (its binomial s.e.)."""
    mean = sum(values) / len(values)
    return mean, statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else one_se


def _tenths(points: list[list[float]]) -> tuple[float, float] | None:
    values = [v for _, v in points]
    if not values:
        return None
    k = max(1, len(values) // 10)
    return sum(values[:k]) / k, sum(values[-k:]) / k


def aggregate(calls: list[dict]) -> dict[str, Any]:
    tasks: dict[str, dict] = {}
    for c in calls:
        if c["phase"] == "r1":
            continue
        called = Config(**{k: c["config"][k] for k in VARIED if k in c["config"]}).variant \
            if c["phase"] == "rl" else ""
        # a run's own variant (a call with --also holds several); older calls: the call's settings
        variants = dict.fromkeys([r.get("variant", called) for r in c.get("rl", [])] or [called])
        base = c.get("base", {})
        # an rl call scored on validation (--held-out val) chooses settings; it is kept apart from the test rows
        split = c["config"].get("held_out", "test") if c["phase"] == "rl" else "test"
        test = base.get(split) or {}
        for variant in variants:
            named = ", ".join(x for x in ("validation" if split == "val" else "", variant) if x)
            t = tasks.setdefault(c["task"] + (f" ({named})" if named else ""),
                                 {"task": c["task"], "variant": variant, "split": split, "bases": [], "runs": [],
                                  "scans": [], "calls": [], "config": c["config"]})
            t["calls"].append({k: c.get(k) for k in ("file", "phase", "device", "wall_seconds", "partial", "seeds")})
            if test.get("greedy") is not None:
                t["bases"].append({**test, "sft_steps": base.get("sft_steps"), "file": c["file"]})
            if base.get("scan"):
                t["scans"].append({**base["scan"], "file": c["file"], "device": c["device"]})
            mine = [r for r in c.get("rl", []) if r.get("variant", called) == variant]
            if mine:
                t["config"] = {**c["config"], **(mine[0].get("settings") or {})}
            t["runs"] += [{**r, "base": test, "file": c["file"], "device": c["device"],
                           "started_at": c.get("started_at") or ""} for r in mine]
    for t in tasks.values():
        mark_superseded(t["runs"])
        t["rows"] = method_rows(t)
    r1 = [c for c in calls if c.get("r1")]
    return {"tasks": tasks, "r1": r1[-1] if r1 else None, "chosen": choose_on_validation(tasks)}


def mark_superseded(runs: list[dict]) -> None:
    """One run counts per (algorithm, seed): the newest call's that did not fail. Older runs of the same seed
    (a call re-run, e.g. after a fix) and failed runs get ``superseded_by`` and stay in the per-run table only."""
    for key in {(r["algorithm"], r["seed"]) for r in runs}:
        mine = sorted((r for r in runs if (r["algorithm"], r["seed"]) == key), key=lambda r: r["started_at"])
        kept = next((r for r in reversed(mine) if r.get("status") != "failed"), None)
        for r in mine:
            if r is not kept:
                r["superseded_by"] = "failed" if kept is None else kept["file"]


def method_rows(t: dict) -> dict[str, dict]:
    rows: dict[str, dict] = {}
    if t["bases"]:
        b = t["bases"]
        greedy, sampled = [x["greedy"] for x in b], [x["sampled"] for x in b]
        rows["base"] = {"runs": len(b), "greedy": _mean_se(greedy, _binomial(greedy[0], b[0]["n"])),
                        "sampled": _mean_se(sampled, _binomial(sampled[0], b[0]["n"] * b[0]["samples"]))}
    for algorithm in ALGORITHMS:
        runs = [r for r in t["runs"] if r["algorithm"] == algorithm and r["curve"] and not r.get("superseded_by")]
        if not runs:
            continue
        n, samples = runs[0]["n"], runs[0]["samples"]
        greedy, sampled = [r["curve"][-1][1] for r in runs], [r["curve"][-1][2] for r in runs]
        paired = [r for r in runs if r["base"].get("greedy") is not None]
        deltas = [r["curve"][-1][1] - r["base"]["greedy"] for r in paired]
        one = math.hypot(_binomial(greedy[0], n), _binomial(paired[0]["base"]["greedy"], n)) if paired else 0.0
        no_correct = [sum(v == 0 for _, v in r["series"]["train_accuracy"]) / len(r["series"]["train_accuracy"])
                      for r in runs if r["series"].get("train_accuracy")]
        speed = [r["completions_per_s"] for r in runs if r["completions_per_s"]]
        rows[algorithm] = {
            "runs": len(runs), "seeds": sorted(r["seed"] for r in runs),
            "greedy": _mean_se(greedy, _binomial(greedy[0], n)),
            "sampled": _mean_se(sampled, _binomial(sampled[0], n * samples)),
            "delta": _mean_se(deltas, one) if deltas else None,
            "updates": (min(r["updates_done"] for r in runs), max(r["updates_done"] for r in runs)),
            "cut_off": sum(bool(r["cut_off"]) for r in runs),
            "peak_gib": max((r["peak_gib"] for r in runs if r["peak_gib"] is not None), default=None),
            "predicted_gib": next((r["predicted_gib"] for r in runs if r["predicted_gib"] is not None), None),
            "completions_per_s": sum(speed) / len(speed) if speed else None,
            "no_correct_updates": sum(no_correct) / len(no_correct) if no_correct else None}
    if "grpo" in rows:
        target = rows["grpo"]["greedy"][0]
        for algorithm in ALGORITHMS:
            if algorithm in rows:
                rows[algorithm]["to_grpo_final"] = time_to(t["runs"], algorithm, target)
    return rows


def time_to(runs: list[dict], algorithm: str, target: float) -> dict:
    """Fair-share GPU-seconds (and wall seconds) to the first evaluation at or above ``target``."""
    reached = []
    mine = [r for r in runs if r["algorithm"] == algorithm and r["curve"] and not r.get("superseded_by")]
    for r in mine:
        hit = next((p for p in r["curve"] if p[1] >= target - 1e-9 and len(p) > 4), None)
        if hit is not None:
            reached.append((hit[4], hit[3], hit[0]))
    if not reached:
        return {"target": target, "reached": 0, "runs": len(mine)}
    return {"target": target, "reached": len(reached), "runs": len(mine),
            "gpu_s": sum(x[0] for x in reached) / len(reached), "wall_s": sum(x[1] for x in reached) / len(reached),
            "updates": sum(x[2] for x in reached) / len(reached)}


def _pct(value: tuple[float, float] | None) -> str:
    if value is None:
        return "—"
    mean, se = value
    return f"{100 * mean:.1f} ± {100 * se:.1f}" if not math.isnan(se) else f"{100 * mean:.1f}"


def _num(value: float | None, digits: int = 1) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def task_section(task: str, t: dict) -> str:
    paper, rows, cfg = PAPER[task], t["rows"], t["config"]
    val = t.get("split") == "val"
    lines = [f"## {paper['name'] if task != 'word_problem' else 'SVAMP-style word problems (`word_problem`)'}"
             + (" — on the validation problems, to choose settings" if val else "")
             + (f" — tried: {t['variant']} (not the paper's settings)" if t.get("variant") else ""), ""]
    steps = sorted({b["sft_steps"] for b in t["bases"] if b.get("sft_steps") is not None})
    layers, d_model, heads = cfg["shape"]
    prompts = ", ".join(f"{LABELS[a]} {cfg['prompts'][a]}" for a in ALGORITHMS)
    pretrain = ", ".join(f"`{x}`" for x in TASKS[task].pretrain)
    lines.append(
        f"Base: {layers} layers × d_model {d_model} pretrained {cfg['pretrain_steps']} steps × "
        f"{cfg['pretrain_micro']} sequences on {pretrain} (worked steps, none of `{task}`), then cold-start SFT "
        f"({cfg['sft_micro']} examples a step, lr {cfg['sft_lr']:g} constant) for "
        f"{' / '.join(map(str, steps))} steps, chosen on {cfg['val_problems']} validation problems (band "
        f"{100 * cfg['band'][0]:.0f}–{100 * cfg['band'][1]:.0f}% greedy). RL: LoRA rank 8 on q/v of the last "
        f"{cfg.get('lora_layers', 0.25):.0%} of layers, lr {cfg.get('rl_lr', 1e-4):g}, rollouts at T = 0.3, prompts an update "
        f"{prompts}, |G| 8 / 8 / {cfg['t_spmo_group']}. "
        f"Held-out: {cfg['val_problems'] if val else cfg['test_problems']} {'validation' if val else 'test'} "
        f"problems, greedy and {cfg['eval_samples']} sample(s) a problem at "
        f"T = 0.3; ± is the s.e. over seeds (one run: binomial). Δ: each run's final greedy accuracy minus its own "
        f"call's base, then mean ± s.e.")
    lines += ["", "| method | runs | updates | held-out greedy (%) | sampled, T=0.3 (%) | Δ greedy vs base (pts) | "
              "paper, Qwen2-1.5B (%) | peak GiB (predicted) | completions/s | fair-share GPU-s to GRPO's final |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for method in ("base", *ALGORITHMS):
        r = rows.get(method)
        if r is None:
            continue
        if method == "base":
            lines.append(f"| {LABELS[method]} | {r['runs']} | 0 | {_pct(r['greedy'])} | {_pct(r['sampled'])} | | "
                         f"{paper['base']} | | | |")
            continue
        lo, hi = r["updates"]
        cut = f" ({r['cut_off']} cut off)" if r["cut_off"] else ""
        reach = r.get("to_grpo_final")
        reached = "" if reach is None else (f"{reach['gpu_s']:.0f} ({reach['reached']}/{reach['runs']} runs)"
                                           if reach["reached"] else f"not reached (0/{reach['runs']})")
        memory = f"{_num(r['peak_gib'], 2)} ({_num(r['predicted_gib'], 2)})"
        updates = f"{lo}{cut}" if lo == hi else f"{lo}–{hi}{cut}"
        lines.append(f"| {LABELS[method]} | {r['runs']} | {updates} | {_pct(r['greedy'])} | {_pct(r['sampled'])} | "
                     f"{_pct(r['delta'])} | {paper[method]} | {memory} | {_num(r['completions_per_s'])} | {reached} |")
    lines += ["", "Peak GiB: the store's `memory_gib` (max over runs; torch's peak allocation on a GPU, the process's "
              "resident memory on a CPU), beside `muse plan optimize --json --dry-run`'s "
              "total for the stage as written. Completions/s and seconds are measured with the call's runs sharing "
              "one GPU; fair-share GPU-seconds integrate 1/(processes running) over the run's wall time, "
              "evaluations included.", ""]
    lines += scan_section(t) + runs_section(t) + diagnostics_section(t)
    return "\n".join(lines)


def choose_on_validation(tasks: dict[str, dict]) -> dict[str, dict[str, dict]]:
    """Per task and algorithm, the RL setting (variant) whose mean greedy Δ on the validation problems is
    highest (calls with ``--held-out val``), beside each candidate's Δ and the chosen setting's test row."""
    chosen: dict[str, dict[str, dict]] = {}
    for t in (t for t in tasks.values() if t.get("split") == "val"):
        for algorithm in ALGORITHMS:
            row = t["rows"].get(algorithm)
            if row is None or row["delta"] is None:
                continue
            entry = chosen.setdefault(t["task"], {}).setdefault(algorithm, {"candidates": []})
            entry["candidates"].append({"variant": t["variant"], "delta": row["delta"], "runs": row["runs"],
                                        "updates": row["updates"]})
    for task, algorithms in chosen.items():
        for algorithm, entry in algorithms.items():
            # a tie goes to the paper's settings (variant "")
            best = max(entry["candidates"], key=lambda c: (c["delta"][0], not c["variant"]))
            test = tasks.get(task + (f" ({best['variant']})" if best["variant"] else ""))
            row = (test or {}).get("rows", {}).get(algorithm)
            entry.update(variant=best["variant"], test_delta=row["delta"] if row else None,
                         test_runs=row["runs"] if row else 0)
    return chosen


def selection_section(chosen: dict[str, dict[str, dict]]) -> list[str]:
    if not chosen:
        return []
    out = ["## RL settings chosen on the validation problems", "",
           "Each candidate setting ran on the validation problems (`--held-out val`: the runs and their base scored "
           "on the validation file, never the test file); the setting with the highest mean greedy Δ there is the "
           "one chosen, and its test row (its own section above) is the number to report. Test rows of settings "
           "not chosen here are shown in their sections for what they are, not chosen on them.", "",
           "| task | method | candidates: validation Δ greedy (pts, runs, updates) | chosen | test Δ of the chosen |",
           "|---|---|---|---|---|"]
    for task, algorithms in chosen.items():
        for algorithm, e in algorithms.items():
            cands = "; ".join(f"{c['variant'] or 'paper'}: {_pct(c['delta'])} ({c['runs']}, "
                              f"{'–'.join(map(str, sorted(set(c['updates']))))})" for c in e["candidates"])
            test = f"{_pct(e['test_delta'])} ({e['test_runs']} runs)" if e["test_delta"] else "not run on test"
            out.append(f"| `{task}` | {LABELS[algorithm]} | {cands} | {e['variant'] or 'paper'} | {test} |")
    return out + [""]


def scan_section(t: dict) -> list[str]:
    out = []
    for scan in t["scans"]:
        out += ["### Choosing the base on validation problems", "",
                f"`{scan['file']}` ({scan['device']}): {scan['val_problems']} validation problems, greedy and "
                f"{scan['val_samples']} samples a problem at T = 0.3. Chosen: **{scan['chosen']} SFT steps**, "
                f"{scan['reason']}.", "",
                "| SFT step | validation greedy (%) | validation sampled (%) |", "|---|---|---|"]
        out += [f"| {int(s)}{' (chosen)' if s == scan['chosen'] else ''}{' (pretrained only)' if s == 0 else ''} | "
                f"{_num(None if g is None else 100 * g)} | {_num(None if v is None else 100 * v)} |"
                for s, g, v in scan["curve"]]
        out.append("")
    return out


def runs_section(t: dict) -> list[str]:
    out = ["### Each run", "", "| algorithm | seed | call | base greedy (%) | final greedy (%) | final sampled (%) | "
           "updates | reward, first → last tenth | updates with no correct rollout (%) | last KL |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(t["runs"], key=lambda r: (list(ALGORITHMS).index(r["algorithm"]), r["seed"], r["file"])):
        if not r["curve"]:
            fault = next((e for e in r.get("events", []) if e.startswith("fault: ")), None)
            out.append(f"| {LABELS[r['algorithm']]} | {r['seed']} | {r['file']}{_superseded(r)} | | no evaluation recorded "
                       f"({r['status']}{'; ' + fault if fault else ''}) | | {r['updates_done']} | | | |")
            continue
        _, greedy, sampled = r["curve"][-1][:3]
        reward = _tenths(r["series"].get("reward", []))
        acc = r["series"].get("train_accuracy", [])
        kl = r["series"].get("kl", [])
        base = r["base"].get("greedy")
        out.append(
            f"| {LABELS[r['algorithm']]} | {r['seed']} | {r['file']}{_superseded(r)} | "
            f"{_num(None if base is None else 100 * base)} | "
            f"{100 * greedy:.1f} ± {100 * _binomial(greedy, r['n']):.1f} | "
            f"{100 * sampled:.1f} ± {100 * _binomial(sampled, r['n'] * r['samples']):.1f} | {r['updates_done']}"
            f"{' (cut off)' if r['cut_off'] else ''} | "
            f"{'' if reward is None else f'{reward[0]:.3f} → {reward[1]:.3f}'} | "
            f"{'' if not acc else f'{100 * sum(v == 0 for _, v in acc) / len(acc):.0f}'} | "
            f"{'' if not kl else f'{kl[-1][1]:.2g}'} |")
    return out + [""]


def _superseded(r: dict) -> str:
    by = r.get("superseded_by")
    return "" if not by else (" (failed: not counted)" if by == "failed" else f" (not counted: seed re-run in `{by}`)")


def diagnostics_section(t: dict) -> list[str]:
    """For each algorithm, what the engine recorded, headed by whether its paired gain over its base is
    above 2 s.e. over seeds. Every algorithm gets one: runs that share one base evaluation understate
    the noise of a small gain (three answers in a thousand passed the 2-s.e. rule on the word problems)."""
    out = []
    for algorithm in ALGORITHMS:
        row = t["rows"].get(algorithm)
        if row is None or row["delta"] is None:
            continue
        beat = row["delta"][0] - 2 * row["delta"][1] > 0
        verdict = "gained more than 2 s.e. over seeds" if beat else "did not beat its base"
        runs = [r for r in t["runs"] if r["algorithm"] == algorithm and not r.get("superseded_by")]
        reward = [x for x in (_tenths(r["series"].get("reward", [])) for r in runs) if x]
        acc = [x for x in (_tenths(r["series"].get("train_accuracy", [])) for r in runs) if x]
        tokens = [x for x in (_tenths(r["series"].get("completion_tokens", [])) for r in runs) if x]
        grad = [statistics.median(v for _, v in r["series"]["grad_norm"]) for r in runs if r["series"].get("grad_norm")]
        mean = lambda xs, i: sum(x[i] for x in xs) / len(xs)  # noqa: E731
        out += [f"### Diagnostics: {LABELS[algorithm]} {verdict}", "",
                f"Δ greedy {_pct(row['delta'])} points over {row['runs']} run(s). Rollout reward, first → last "
                f"tenth of the updates: {mean(reward, 0):.3f} → {mean(reward, 1):.3f}; training accuracy "
                f"{mean(acc, 0):.3f} → {mean(acc, 1):.3f}; mean completion tokens {mean(tokens, 0):.1f} → "
                f"{mean(tokens, 1):.1f}; median gradient norm {statistics.mean(grad):.3g}. Updates in which no "
                f"rollout was correct (every group all-zero: no signal but the KL / L2 term): "
                f"{100 * row['no_correct_updates']:.0f}%." if reward and acc and tokens and grad
                and row["no_correct_updates"] is not None else "The runs recorded no training metrics.",
                "", _signal(runs), ""]
    return out


def _signal(runs: list[dict]) -> str:
    """The engine's own account of each update's signal, first → last tenth, averaged over the runs."""
    parts = []
    for key, what in (("equal_groups", "groups whose completions all scored alike"),
                      ("advantage_abs", "mean |advantage|"),
                      ("informative_transitions", "T-SPMO transitions with an advantage"),
                      ("l2_term", "T-SPMO's L2 term λΣ‖W_LoRA‖² (its whole loss when the policy term is nil)")):
        tenths = [x for x in (_tenths(r["series"].get(key, [])) for r in runs) if x]
        if tenths:
            first, last = (sum(x[i] for x in tenths) / len(tenths) for i in (0, 1))
            parts.append(f"{what} {first:.3f} → {last:.3f}")
    return ("Signal per update, first → last tenth: " + "; ".join(parts) + ".") if parts else \
        "The runs recorded no signal statistics (equal_groups, advantage_abs)."


def r1_section(call: dict) -> str:
    r1 = call["r1"]
    lines = ["## The DeepSeek-R1 recipe end to end (`plans/reasoning-r1-recipe.yaml`)", "",
             f"`{call['file']}` on {call['device']}, whole call {call.get('wall_seconds', 0):.0f} s. Held-out: the "
             "stages' own held-out problems (the test split), greedy and one sample at T = 0.3; the pretrained "
             "model is scored on the same problems by an evaluation-only stage.", "",
             "| after stage | held-out greedy (%) | sampled (%) | stage seconds |", "|---|---|---|---|"]
    for name, s in r1["stages"].items():
        g, v = s.get("greedy"), s.get("sampled")
        name += "" if s.get("status") == "completed" else f" ({s.get('status')}: cut off)"
        lines.append(f"| {name} | {_num(None if g is None else 100 * g)} | {_num(None if v is None else 100 * v)} | "
                     f"{_num(s.get('seconds'), 0)} |")
    return "\n".join(lines) + "\n"


def section_order(item: tuple[str, dict]) -> tuple[int, bool, str]:
    """Per task: the test rows (the paper's settings first), then the validation runs that chose settings."""
    t = item[1]
    return list(TASKS).index(t["task"]), t.get("split") == "val", t["variant"]


def plot(tasks: dict[str, dict], path: Path) -> bool:
    """Held-out greedy accuracy against updates and fair-share GPU-seconds, and the rollout reward."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    names = [name for name, t in sorted(tasks.items(), key=section_order) if any(r["curve"] for r in t["runs"])]
    if not names:
        return False
    colors = {"grpo": "tab:blue", "s_grpo": "tab:orange", "t_spmo": "tab:green"}
    fig, axes = plt.subplots(len(names), 3, figsize=(16, 4.4 * len(names)), squeeze=False)
    for row, name in zip(axes, names):
        t = tasks[name]
        base = t["rows"].get("base")
        for algorithm, color in colors.items():
            runs = [r for r in t["runs"] if r["algorithm"] == algorithm and r["curve"] and not r.get("superseded_by")]
            if not runs:
                continue
            steps = sorted(set.intersection(*[{p[0] for p in r["curve"]} for r in runs]))
            values = [[next(p[1] for p in r["curve"] if p[0] == s) for r in runs] for s in steps]
            mean = [100 * sum(v) / len(v) for v in values]
            se = [100 * statistics.stdev(v) / math.sqrt(len(v)) if len(v) > 1 else 0.0 for v in values]
            own = [r["base"]["greedy"] for r in runs if r["base"].get("greedy") is not None]
            # update 0 is the runs' own bases (paired, as Δ is), not the mean over every call's base
            x, y = ([0] + steps, [100 * sum(own) / len(own)] + mean) if len(own) == len(runs) else (steps, mean)
            row[0].plot(x, y, marker="o", color=color, label=f"{LABELS[algorithm]} ({len(runs)} runs)")
            row[0].fill_between(steps, [m - s for m, s in zip(mean, se)], [m + s for m, s in zip(mean, se)],
                                color=color, alpha=0.2)
            for r in runs:
                pts = [p for p in r["curve"] if len(p) > 4]
                start = [(0.0, 100 * r["base"]["greedy"])] if r["base"].get("greedy") is not None else []
                xy = start + [(p[4], 100 * p[1]) for p in pts]
                row[1].plot([a for a, _ in xy], [b for _, b in xy], marker=".", color=color, alpha=0.7, lw=1)
                reward = r["series"].get("reward", [])
                window = max(1, len(reward) // 20)
                values = [v for _, v in reward]
                smooth = [statistics.mean(values[max(0, i - window + 1):i + 1]) for i in range(len(values))]
                row[2].plot([s for s, _ in reward], smooth, color=color, alpha=0.7, lw=1)
        if base:
            p = base["greedy"][0]
            n = next((r["n"] for r in t["runs"] if r.get("n")), 0)
            for ax in row[:2]:
                ax.axhline(100 * p, color="gray", ls="--", lw=1, label="base (every call's mean)")
                if n:  # the scale a change is read against: one evaluation's binomial noise
                    se = 100 * math.sqrt(p * (1 - p) / n)
                    ax.axhspan(100 * p - se, 100 * p + se, color="gray", alpha=0.12,
                               label=f"base ± 1 binomial s.e. ({n} problems)")
        title = PAPER[t["task"]]["name"] if t["task"] != "word_problem" else "word problems"
        title += f" ({t['variant']})" if t["variant"] else ""
        split = "validation" if t.get("split") == "val" else "held-out"
        row[0].set(title=f"{title}:\n{split} greedy accuracy", xlabel="RL updates", ylabel="%")
        row[1].set(title="per run, against fair-share GPU-seconds", xlabel="GPU-seconds (shared GPU)", ylabel="%")
        row[2].set(title="rollout reward (moving mean; T-SPMO: replays included)", xlabel="RL updates", ylabel="mean reward")
        row[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def merge(dirs: list[Path], out: Path) -> Path:
    calls = load_calls(dirs)
    if not calls:
        raise SystemExit(f"no bench_rl_regime JSON files in {', '.join(map(str, dirs))}")
    merged = aggregate(calls)
    out.mkdir(parents=True, exist_ok=True)
    tiny = any(c.get("tiny") for c in calls)
    sources = "\n".join(f"- `{c['file']}`: `{c['command']}` on {c['device']}, {c.get('wall_seconds', 0):.0f} s"
                        f"{' (partial: cut off)' if c.get('partial') else ''}" for c in calls)
    md = ["# GRPO vs S-GRPO vs T-SPMO from a weak base, several seeds", "",
          *(["**`--tiny`: a CPU check of the script; these numbers mean nothing.**", ""] if tiny else []),
          "Made by `scripts/bench_rl_regime.py` (its docstring says how) from these calls, merged with "
          "`python scripts/bench_rl_regime.py --merge ...` (numbers: `bench_rl_regime.json`):", "", sources, "",
          "Paper: Lee & Tong (arXiv 2504.20834), Qwen2-1.5B with LoRA.", ""]
    for _, t in sorted(merged["tasks"].items(), key=section_order):
        md.append(task_section(t["task"], t))
    md += selection_section(merged["chosen"])
    if merged["r1"] is not None:
        md.append(r1_section(merged["r1"]))
    if plot(merged["tasks"], out / "bench_rl_regime.png"):
        md += ["![held-out accuracy against updates and GPU-seconds; rollout reward](bench_rl_regime.png)", ""]
    text = "\n".join(md)
    (out / "bench_rl_regime.md").write_text(text)
    # each run's numbers without its per-step series, events and plan: those stay in the calls' own files
    slim = [{**c, "rl": [{k: v for k, v in r.items() if k not in ("series", "events", "plan")} for r in c["rl"]]}
            if c.get("rl") else c for c in calls]
    (out / "bench_rl_regime.json").write_text(json.dumps({"calls": slim, "summary": {
        task: {"rows": t["rows"], "bases": t["bases"], "scans": t["scans"]} for task, t in merged["tasks"].items()},
        "chosen_on_validation": merged["chosen"]},
        indent=1, default=str) + "\n")
    print(text, flush=True)
    return out / "bench_rl_regime.md"


# ---- the command line ------------------------------------------------------------------------
def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="a CPU check of the whole pipeline (numbers mean nothing)")
    p.add_argument("--phase", choices=("base", "rl", "r1", "all"), help="default: all with --tiny")
    p.add_argument("--task", choices=tuple(TASKS), default="multiplication:3x3")
    p.add_argument("--algorithms", default=",".join(ALGORITHMS))
    p.add_argument("--seeds", default="0,1,2", help="RL seeds (the plans' training.seed); one a call on a GPU")
    p.add_argument("--updates", type=int, help="updates per RL run (default 200)")
    p.add_argument("--eval-every", type=int, help="updates between held-out evaluations (default 40)")
    p.add_argument("--rl-lr", type=float, help="the RL runs' lr (default the paper's 1e-4): a variant, reported apart")
    p.add_argument("--lora-layers", type=float,
                   help="the fraction of layers (the last ones) with LoRA (default the paper's 0.25): a variant")
    p.add_argument("--also", action="append", default=[], metavar="K=V[,K=V]",
                   help="an RL variant run beside the call's own settings from the same base, e.g. "
                        "--also l2_lambda=0 --also rl_lr=1e-3,lora_layers=1.0 (keys: rl_lr, lora_layers, l2_lambda)")
    p.add_argument("--l2-lambda", type=float, help="T-SPMO's L2 on the LoRA weights (default the paper's 0.01): "
                   "a variant")
    p.add_argument("--sft-steps", type=int, help="the base's SFT length (the base call prints it); else scanned")
    p.add_argument("--sft-max-steps", type=int, help="the validation scan's SFT length (default 150)")
    p.add_argument("--sft-every", type=int, help="SFT steps between validation scores (default 10)")
    p.add_argument("--sft-lr", type=float, help="the cold-start SFT's constant lr (default 1e-4)")
    p.add_argument("--pretrain-steps", type=int, help="pretraining steps of the base (default 1200)")
    p.add_argument("--test-problems", type=int, help="held-out test problems (default 1000)")
    p.add_argument("--val-problems", type=int, help="validation problems for the scan (default 500)")
    p.add_argument("--eval-samples", type=int, help="samples a test problem for sampled accuracy (default 1)")
    p.add_argument("--band", help="validation greedy accuracy the base should have, LO,HI as fractions "
                                  "(3×3: 0.02,0.10; word problems: 0.35,0.55)")
    p.add_argument("--held-out", choices=("test", "val"), default="test",
                   help="what the rl phase's runs and their base are scored on; val chooses RL settings "
                        "(--also candidates) without the test problems, and the merge says which won")
    p.add_argument("--base-seed", type=int, default=0, help="the base's seed: its data and training")
    p.add_argument("--deadline-s", type=float, help="stop the call's runs this long after it started (default 560)")
    p.add_argument("--out", type=Path, help="where a call's JSON goes (default: a new temporary folder); "
                                            "with --merge, the report's folder (default docs/)")
    p.add_argument("--merge", nargs="+", type=Path, metavar="DIR", help="merge the calls' JSON files in DIR ...")
    p.add_argument("--estimate", action="store_true", help="print what the phase should take on one H100, and stop")
    p.add_argument("--keep", action="store_true", help="keep each call's working folder (stores, logs, checkpoints)")
    return p.parse_args()


def config(args: argparse.Namespace) -> Config:
    cfg = Config(task=args.task, tiny=args.tiny, base_seed=args.base_seed, band=TASKS[args.task].band,
                 **(TINY if args.tiny else {}))
    flags = {"updates": args.updates, "eval_every": args.eval_every, "sft_steps": args.sft_steps,
             "sft_max_steps": args.sft_max_steps, "sft_every": args.sft_every, "sft_lr": args.sft_lr,
             "pretrain_steps": args.pretrain_steps,
             "test_problems": args.test_problems, "val_problems": args.val_problems,
             "eval_samples": args.eval_samples, "deadline_s": args.deadline_s, "rl_lr": args.rl_lr,
             "lora_layers": args.lora_layers, "l2_lambda": args.l2_lambda, "held_out": args.held_out,
             "band": tuple(float(x) for x in args.band.split(",")) if args.band else None}
    return replace(cfg, **{k: v for k, v in flags.items() if v is not None})


CURRENT: list[Call] = []  # the call in progress, for the SIGTERM handler


def on_term(signum: int, frame: Any) -> None:
    """A time limit from outside: stop the runs, keep what the call has, exit 124."""
    _stop(list(RUNNING), grace=5.0)
    if CURRENT:
        if CURRENT[-1].pending is not None:
            collect_rl(CURRENT[-1])
        print(f"stopped by signal {signum}; saved {CURRENT[-1].save(partial=True)}", flush=True)
    sys.exit(124)


def main() -> None:
    args = parse_args()
    if args.merge:
        merge(args.merge, args.out or ROOT / "docs")
        return
    cfg = config(args)
    phase = args.phase or ("all" if args.tiny else None)
    if phase is None:
        raise SystemExit("give --phase base, rl, r1 (or all), --merge DIR ..., or --tiny")
    algorithms = [a for a in args.algorithms.split(",") if a]
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    unknown = [a for a in algorithms if a not in ALGORITHMS]
    if unknown:
        raise SystemExit(f"unknown algorithm {unknown[0]!r}; accepted: {', '.join(ALGORITHMS)}")
    if args.held_out == "val" and phase not in ("rl", "all"):
        raise SystemExit(f"--held-out val chooses RL settings: it applies to --phase rl, not {phase} "
                         "(the base phase already chooses its SFT length on the validation problems)")
    phases = ["base", "rl", "r1"] if phase == "all" else [phase]
    for name in phases if not args.tiny else []:
        seconds = estimate(cfg, name, algorithms, seeds * (1 + len(args.also)))  # a variant: as many runs again
        print(f"{name}: estimated {seconds / 60:.1f} min on one H100 (estimate(): fitted to the H100 calls); "
              f"this call stops its runs at {cfg.deadline_s:.0f} s"
              + (" — expect them cut off: give fewer --seeds a call" if seconds > cfg.deadline_s else ""), flush=True)
    if "rl" in phases and phase != "all" and cfg.sft_steps is None:
        print("note: no --sft-steps: the rl call scans the SFT length on validation again (the base call prints "
              "it); that scan is in the estimate", flush=True)
    if args.estimate:
        return
    out = args.out or Path(tempfile.mkdtemp(prefix="bench-rl-regime-"))
    signal.signal(signal.SIGTERM, on_term)
    command = "python scripts/bench_rl_regime.py " + " ".join(sys.argv[1:])
    for name in phases:
        call = Call(cfg, name, out, command)
        CURRENT.append(call)
        if name == "base":
            phase_base(call)
            cfg = replace(cfg, sft_steps=call.result["base"]["sft_steps"])  # --phase all: the rl call reuses it
        elif name == "rl":
            phase_rl(call, algorithms, seeds, args.also)
        else:
            phase_r1(call)
        cut = any(r["cut_off"] for r in call.result.get("rl", [])) or (call.result.get("r1") or {}).get("cut_off")
        print(f"[{call.elapsed():.0f} s] {name} done{' (runs cut off at the deadline)' if cut else ''}: "
              f"{call.save(partial=bool(cut))}", flush=True)
        if not args.keep:  # the stores, logs and checkpoints of a finished call (a failed one's stay)
            shutil.rmtree(call.root, ignore_errors=True)
    if phase == "all":
        merge([out], out)
    print(f"results in {out}", flush=True)


if __name__ == "__main__":
    main()
