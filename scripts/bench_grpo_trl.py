"""muse's GRPO step through ``muse plan run`` against TRL's ``GRPOTrainer`` on the same model.

A random-weight Hugging Face ``Qwen2ForCausalLM`` of Qwen2-0.5B's configuration (written
to a local folder: no hub) trains with GRPO on both sides with the same group size,
prompts (muse's generated 3×3 multiplications, byte tokens) and completion length,
full fine-tuning, no KL term (TRL's default β = 0), temperature 1, no vLLM:

- muse: a ``reasoning_rl`` stage of a plan run by ``muse plan run`` (a subprocess, its
  own store; ``training.compile: auto``, so on a GPU the decode step is replayed from a
  CUDA graph / transformers' static cache); completions/s = the store's tokens/s over
  its mean completion length, median over the steps after ``--skip``;
- TRL: ``GRPOTrainer`` with ``per_device_train_batch_size`` = prompts × group (one
  generation a step), activation checkpointing off as muse's; completions/s = the
  completions of a step over its wall time (a callback), median after ``--skip``.

muse's side also says where a step's time went (``step_phases``): the rollout (the store's ``rollout_s``:
sampling, rewards, the reference pass) and the rest of the step, the update.
Both sides also report where their wall time went (``phases``, seconds): muse's from
``muse plan run``'s launch to the run started, its first step's numbers in the store, its
last, the run finished and the process gone; TRL's from entering its side (TRL's import,
the model's load, the trainer's setup) to ``train()`` called, its first step and the end.

A random model rarely samples EOS, so completions on both sides run to the limit and
the two do the same work. Writes ``<out>/bench_grpo_trl.json``.

    PYTHONPATH=. python3 scripts/bench_grpo_trl.py --out docs/       # GPU (TRL, datasets installed)
    PYTHONPATH=. python3 scripts/bench_grpo_trl.py --tiny --out /tmp  # CPU: the script works
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

BOS, EOS, PAD = 256, 257, 258  # muse's byte tokenizer (engines/data/tokenizer.py)


def model_config(tiny: bool) -> Any:
    import transformers

    shape = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512) if tiny else \
        dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
             num_key_value_heads=2, vocab_size=151936)  # Qwen2-0.5B's config.json
    return transformers.Qwen2Config(**shape, max_position_embeddings=4096, rope_theta=1e6, tie_word_embeddings=True,
                                    bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD)


def write_model(folder: Path, tiny: bool) -> None:
    import torch
    import transformers

    torch.manual_seed(0)
    transformers.Qwen2ForCausalLM(model_config(tiny)).save_pretrained(folder)


def byte_tokenizer() -> Any:
    """TRL's tokenizer: muse's byte tokens (a character's byte value; BOS/EOS/PAD 256–258)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {chr(i): i for i in range(256)} | {"<bos>": BOS, "<eos>": EOS, "<pad>": PAD, "<unk>": 259}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    core.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                   unk_token="<unk>")


def prompts(n: int) -> list[str]:
    from engines.data.arithmetic import multiplication

    rng = random.Random(0)
    return [multiplication(rng).prompt for _ in range(n)]


def plan_data(folder: Path, args: argparse.Namespace, cuda: bool) -> dict[str, Any]:
    """muse's side: a plan of one ``reasoning_rl`` stage on the model in ``folder``."""
    return {"name": "grpo-vs-trl",
            "model": {"scale": "500M", "family": "hf", "init_from": str(folder), "residual": "standard",
                      "seq_len": 64 + args.max_new_tokens},
            "techniques": {"grpo": {"group_size": args.group, "temperature": 1.0, "kl_beta": 0.0}},
            "compute": "1xH100" if cuda else "cpu",
            "training": {"precision": "bf16" if cuda else "fp32", "micro_batch": args.prompts, "lr": 1e-6,
                         "warmup_steps": 1, "compile": "auto"},
            "stages": [{"name": "rl", "kind": "reasoning_rl", "steps": args.steps,
                        "checkpoint_every": 10 * args.steps, "eval_every": 10 * args.steps,
                        "options": {"tasks": ["multiplication:3x3"], "max_new_tokens": args.max_new_tokens,
                                    "eval_problems": 1}}]}


def run_muse(folder: Path, args: argparse.Namespace, cuda: bool) -> dict[str, Any]:
    from bench_plan_run import run_one

    row = run_one(plan_data(folder, args, cuda), Path(tempfile.mkdtemp(prefix="muse-inductor-")), skip=args.skip)
    if "error" in row:
        return row
    from muse_plan.store import repo, runs
    from muse_plan.store.db import Store

    store = Store()  # run_one left MUSE_HOME at the run's store
    try:
        with store.read() as session:
            run = runs.list_runs(session)[0][0]
            # what the run trained under (the optimizer may have rewritten the plan to fit): LoRA, checkpointing
            ran = repo.spec_of(repo.get_revision(session, repo.get_plan(session, run.plan_id), run.under))
            stage = ran.stages[0]
            trained = {"revision": run.under, "lora": "lora" in stage.options or ran.techniques.lora is not None,
                       "activation_checkpointing": ran.training_for(stage).activation_checkpointing}
            all_speed = [v for _, v in runs.metric_series(session, run.id, "tokens_per_s")]
            all_length = [v for _, v in runs.metric_series(session, run.id, "completion_tokens")]
            rollout = [v for _, v in runs.metric_series(session, run.id, "rollout_s")]
    finally:
        store.close()
    speed, length = all_speed[args.skip:], all_length[args.skip:]
    per_s = [s / n for s, n in zip(speed, length)]
    # every step's seconds (its completion tokens over its tokens/s): a step that compiles stands out
    step_s = [round(args.prompts * args.group * n / s, 2) for s, n in zip(all_speed, all_length) if s > 0]
    # where a step went (one micro-batch a step here): its rollout (sampling, rewards, reference pass) and the rest,
    # the update (forward, backward, optimizer), medians over the steps after --skip
    rollout_s = rollout[args.skip:len(step_s)]
    update_s = [a - b for a, b in zip(step_s[args.skip:], rollout_s)]
    step_phases = {"rollout_s": round(statistics.median(rollout_s), 3) if rollout_s else None,
                   "update_s": round(statistics.median(update_s), 3) if update_s else None}
    return {"completions_per_s": statistics.median(per_s), "mean_completion_tokens": statistics.fmean(length),
            "tokens_per_s": statistics.median(speed), "peak_gib": row["peak_gib"], "wall_s": row["wall_s"],
            "trained_as": trained, "events": row["events"], "phases": row["phases"], "step_seconds": step_s,
            "step_phases": step_phases}


def profile_muse_rollout(folder: Path, args: argparse.Namespace, cuda: bool) -> dict[str, Any]:
    """muse's sampling alone, as its stage runs it, on the same model: fp32 weights decoding from the bf16
    copy under bf16 autocast (on a GPU), the step replayed from a CUDA graph, the step's prompts × group
    rows; one rollout to warm (the copy made, the graph captured), one timed and one under torch.profiler."""
    import torch
    from bench_grpo import rollout_profile
    from transformers import AutoModelForCausalLM

    from engines.grpo.policy import Policy

    device = "cuda" if cuda else "cpu"
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).to(device)
    dtype = torch.bfloat16 if cuda else None
    policy = Policy(model, PAD, EOS, decode="graphs" if cuda else "eager", vocab=PAD + 1, sample_dtype=dtype)
    rows = [[BOS, *p.encode()] for p in prompts(args.prompts) for _ in range(args.group)]
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=cuda)

    def rollout() -> list[list[int]]:
        with autocast:
            return policy.sample(rows, args.max_new_tokens, 1.0)

    rollout()
    start = time.perf_counter()
    out = rollout()
    if cuda:
        torch.cuda.synchronize()
    wall = time.perf_counter() - start
    tokens = sum(len(row) for row in out)
    return {"rows": len(rows), "wall_s": wall, "completions_per_s": len(rows) / wall, "tokens_per_s": tokens / wall,
            "ms_a_decode_step": 1e3 * wall / max(max(len(row) for row in out), 1), "notes": policy.take_notes(),
            "profile": rollout_profile(rollout)}


def run_trl(folder: Path, args: argparse.Namespace, cuda: bool) -> dict[str, Any]:
    entered = time.perf_counter()  # TRL's import, the model's load and the trainer's setup count, as muse's do
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    marks: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, *_: Any, **__: Any) -> None:
            if cuda:
                torch.cuda.synchronize()
            marks.append(time.perf_counter())

    lengths: list[int] = []

    def reward(completions: list[str], **_: Any) -> list[float]:  # cheap, as muse's correctness check is
        lengths.extend(len(c.encode()) for c in completions)
        return [float(c.strip().endswith("0")) for c in completions]

    config = GRPOConfig(output_dir=tempfile.mkdtemp(prefix="trl-"), per_device_train_batch_size=args.prompts * args.group,
                        num_generations=args.group, max_completion_length=args.max_new_tokens, learning_rate=1e-6,
                        beta=0.0, temperature=1.0, bf16=cuda, use_cpu=not cuda, max_steps=args.steps, logging_steps=1,
                        report_to="none", save_strategy="no", gradient_checkpointing=False, use_vllm=False)
    model = AutoModelForCausalLM.from_pretrained(folder, torch_dtype=torch.float32)
    trainer = GRPOTrainer(model=model, reward_funcs=reward, args=config, processing_class=byte_tokenizer(),
                          train_dataset=Dataset.from_list([{"prompt": p} for p in prompts(args.prompts * args.steps)]),
                          callbacks=[Clock()])
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    trainer.train()
    every = [b - a for a, b in zip([start, *marks], marks)]
    steps = every[args.skip:]
    n = args.prompts * args.group
    return {"completions_per_s": statistics.median(n / s for s in steps),
            "mean_completion_bytes": statistics.fmean(lengths) if lengths else None,
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
            "wall_s": time.perf_counter() - start,
            "phases": {"train_called_s": round(start - entered, 2),
                       "first_step_s": round(marks[0] - entered, 2) if marks else None,
                       "finished_s": round(time.perf_counter() - entered, 2)},
            "step_seconds": [round(x, 2) for x in every]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tiny", action="store_true", help="a tiny Qwen2 on CPU: checks the script works")
    p.add_argument("--out", type=Path, default=ROOT / "docs")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--skip", type=int, default=2, help="steps left out of the medians (compilation, warm-up)")
    p.add_argument("--prompts", type=int, default=16, help="prompts a step")
    p.add_argument("--group", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--profile", action="store_true",
                   help="also muse's sampling alone on the model, timed and under torch.profiler (its kernels)")
    p.add_argument("--profile-only", action="store_true", help="the profile alone: no plan run, no TRL")
    p.add_argument("--write-plan", type=Path, metavar="DIR",
                   help="only write the model (DIR/model) and muse's plan (DIR/plan.yaml), e.g. for "
                        "scripts/profile_plan_run.py --plan")
    args = p.parse_args()
    if args.tiny:
        args.steps, args.skip, args.prompts, args.group, args.max_new_tokens = 3, 1, 2, 4, 8
    import torch
    import transformers

    try:
        import trl
    except ImportError:
        if not (args.profile_only or args.write_plan):
            raise
        trl = None
    cuda = torch.cuda.is_available() and not args.tiny
    folder = (args.write_plan or Path(tempfile.mkdtemp(prefix="qwen2-random-"))) / "model"
    write_model(folder, args.tiny)
    if args.write_plan:
        import yaml

        (args.write_plan / "plan.yaml").write_text(yaml.safe_dump(plan_data(folder.resolve(), args, cuda)))
        print(args.write_plan / "plan.yaml")
        return
    out: dict[str, Any] = {
        "command": "python3 scripts/bench_grpo_trl.py " + " ".join(sys.argv[1:]),
        "device": torch.cuda.get_device_name(0) if cuda else f"CPU ({os.cpu_count()} cores)",
        "torch": torch.__version__, "transformers": transformers.__version__,
        "trl_version": trl.__version__ if trl else None,
        "model": "Qwen2-0.5B configuration, random weights" if not args.tiny else "tiny Qwen2",
        "prompts": args.prompts, "group": args.group, "max_new_tokens": args.max_new_tokens, "steps": args.steps}
    if args.profile or args.profile_only:
        out["muse_sampling"] = profile_muse_rollout(folder, args, cuda)
        if cuda:  # the profiled model is gone: give its memory back before the two sides run
            torch.cuda.empty_cache()
        print("muse sampling", json.dumps({k: v for k, v in out["muse_sampling"].items() if k != "profile"}),
              flush=True)
    if args.profile_only:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "bench_grpo_trl_profile.json").write_text(json.dumps(out, indent=1) + "\n")
        return
    out["muse"] = run_muse(folder, args, cuda)
    print("muse", json.dumps(out["muse"]), flush=True)
    out["trl"] = run_trl(folder, args, cuda)
    print("trl", json.dumps(out["trl"]), flush=True)
    if "completions_per_s" in out["muse"]:
        out["muse_over_trl"] = out["muse"]["completions_per_s"] / out["trl"]["completions_per_s"]
        print(f"muse / TRL completions/s: {out['muse_over_trl']:.2f}x (target >= 2x)")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_grpo_trl.json").write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
