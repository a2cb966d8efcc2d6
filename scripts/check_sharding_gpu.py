"""Check the executor's memory settings on GPUs: each trains, learns, resumes exactly,
and uses about the memory muse's model predicts.

    accelerate launch --num_processes 2 scripts/check_sharding_gpu.py   # every setting
    python scripts/check_sharding_gpu.py                                 # one GPU: none, offload

For each setting (one GPU: ``none`` and ``offload: optimizer``; several: also
``ddp``, ``zero1``, ``zero2``, ``zero3``, ``fsdp``) it trains a small decoder
through the executor's own code (``accelerators.accelerator_for``,
``loop.train_stage``: the optimizer, FSDP plugin, checkpoints and resume that
``muse plan run`` uses) for ``--steps`` steps with a checkpoint half way, then
resumes from that checkpoint and runs the second half again. The main process
prints one JSON line per setting: the first and last loss, whether the loss
fell, the largest difference between the resumed and the uninterrupted losses
(and final weights), ``torch.cuda.max_memory_allocated`` of the first run and
``muse_plan.optimizer.memory.estimate``'s prediction (its total without the
CUDA context and fragmentation allowance, which max_memory_allocated does not
see, and its ``host`` term). ``allocated_before_gib`` is what an earlier
setting left allocated when this one started (it is inside the peak): for a
clean peak, check one setting a launch (``--only zero3``). A resume counts
as continuing exactly when its losses match to 1e-4 and its final weights to
1e-5 (on an H200 the losses matched exactly and the weights to < 5e-7: GPU
kernels may round differently run to run). Exit status 1 when any setting
failed a check.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from engines.architecture.trainer import ArchitectureTrainer  # noqa: E402
from engines.contract import StageSetup  # noqa: E402
from muse_plan.executor import checkpoint  # noqa: E402
from muse_plan.executor.loop import train_stage  # noqa: E402
from muse_plan.executor.accelerators import accelerator_for as _accelerator_for  # noqa: E402
from muse_plan.executor.prepare import bf16 as _bf16  # noqa: E402
from muse_plan.executor.settings import resolve  # noqa: E402
from muse_plan.optimizer import memory  # noqa: E402
from muse_plan.optimizer.config import TrainConfig  # noqa: E402
from muse_plan.plan.io import spec_from_dict  # noqa: E402

GiB = 2**30
SETTINGS = [  # (name, training fields)
    ("none", {"sharding": "none"}),
    ("offload_optimizer", {"sharding": "none", "offload": "optimizer"}),
    ("ddp", {"sharding": "ddp"}),
    ("ddp_offload_optimizer", {"sharding": "ddp", "offload": "optimizer"}),
    ("zero1", {"sharding": "zero1"}),
    ("zero2", {"sharding": "zero2"}),
    ("zero3", {"sharding": "zero3"}),
    ("fsdp", {"sharding": "fsdp"}),
]
SHARDED = {"ddp", "zero1", "zero2", "zero3", "fsdp"}


def plan(args: argparse.Namespace, training: dict, world: int):
    return spec_from_dict({
        "name": "check-sharding",
        "model": {"scale": "1M", "residual": "standard", "seq_len": args.seq_len, "vocab_size": 260,
                  "shape": {"layers": args.layers, "d_model": args.d_model, "n_heads": args.d_model // 64}},
        "training": {"micro_batch": args.micro_batch, "grad_accum": 1, "lr": 1e-3, "warmup_steps": 2,
                     "seed": 7, "precision": args.precision, **training},
        "stages": [{"name": "pretrain", "kind": "pretrain", "steps": args.steps,
                    "checkpoint_every": args.steps // 2, "eval_every": args.steps}],
    }, "check")


class Losses:
    def __init__(self) -> None:
        self.losses: dict[int, float] = {}

    def on_start(self, step): pass

    def on_step(self, record): self.losses[record.step] = record.loss

    def on_eval(self, step, metrics): pass

    def on_checkpoint(self, step, path): pass

    def on_alerts(self, findings): pass

    def on_notes(self, step, notes, severity): pass


def trainer(s, accelerator, cache: Path) -> ArchitectureTrainer:
    torch.manual_seed(s.seed)
    t = ArchitectureTrainer()
    setup = StageSetup(name="pretrain", kind="pretrain", model=s.model, micro_batch=s.micro_batch, seed=s.seed,
                       rank=accelerator.process_index, world_size=accelerator.num_processes,
                       tokens_needed=s.steps * s.tokens_per_step, micro_steps=s.steps, cache_dir=cache,
                       device=str(accelerator.device), activation_checkpointing=s.activation_checkpointing)
    for turn in (True, False):  # the main process builds the data cache first
        if accelerator.is_main_process == turn:
            t.setup(setup)
        accelerator.wait_for_everyone()
    return t


def final_weights(stage_dir: Path, step: int) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(checkpoint.step_dir(stage_dir, step) / checkpoint.WEIGHTS))


def check(name: str, training: dict, args: argparse.Namespace, world: int, accelerator, work: Path):
    spec = plan(args, training, world)
    s = resolve(spec, spec.stages[0], world_size=world, cuda=True, bf16=_bf16(True))
    accelerator = _accelerator_for(accelerator, spec, 0, world, True, lambda text: None)
    stage_dir = work / name
    hooks = Losses()
    accelerator.free_memory()  # the last setting's models and optimizers
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    t0 = time.perf_counter()
    train_stage(trainer(s, accelerator, work / "cache"), s, accelerator, stage_dir, {}, hooks)
    seconds = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated()
    half = s.steps // 2
    again = Losses()
    t = trainer(s, accelerator, work / "cache")
    state, manifest = checkpoint.load(checkpoint.step_dir(stage_dir, half), t.model)
    first_final = final_weights(stage_dir, s.steps) if accelerator.is_main_process else None
    accelerator.wait_for_everyone()
    train_stage(t, s, accelerator, stage_dir, {}, again,
                checkpoint.Loaded(checkpoint.step_dir(stage_dir, half), half, state, manifest))
    cfg = TrainConfig(model=s.model, micro_batch=s.micro_batch, grad_accum=s.grad_accum, world_size=world,
                      precision=s.precision, checkpointing=s.activation_checkpointing, sharding=s.sharding,
                      offload=s.offload, optimizer=s.optimizer)
    predicted = memory.estimate(cfg, device="cuda")
    row = None
    if accelerator.is_main_process:
        resumed_final = final_weights(stage_dir, s.steps)
        loss_gap = max(abs(hooks.losses[i] - again.losses[i]) for i in range(half + 1, s.steps + 1))
        weight_gap = max((first_final[k].float() - resumed_final[k].float()).abs().max().item()
                         for k in first_final)
        losses = [hooks.losses[i] for i in sorted(hooks.losses)]
        row = {
            "setting": name, "processes": world, "precision": s.precision, "sharding": s.sharding,
            "offload": s.offload, "params_m": round(memory.param_count(s.model) / 1e6, 1),
            "first_loss": round(losses[0], 4), "last_loss": round(losses[-1], 4),
            "loss_fell": losses[-1] < losses[0] - 0.1,
            "resume_loss_gap": loss_gap, "resume_weight_gap": weight_gap,
            "resume_exact": loss_gap == 0.0 and weight_gap == 0.0,
            "max_allocated_gib": round(peak / GiB, 3), "allocated_before_gib": round(before / GiB, 3),
            "predicted_gib": round((predicted.total - predicted.overhead) / GiB, 3),
            "predicted_host_gib": round(predicted.host / GiB, 3),
            "predicted": {k: round(v / GiB, 3) for k, v in predicted.items()},
            "seconds_first_run": round(seconds, 1),
        }
        # GPU kernels (atomics in the embedding's backward) may round differently run to run
        row["ok"] = row["loss_fell"] and loss_gap < 1e-4 and weight_gap < 1e-5
        print(json.dumps(row), flush=True)
    accelerator.wait_for_everyone()
    return accelerator, row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--d-model", type=int, default=1024)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--precision", default="bf16", choices=["bf16", "fp32"])
    parser.add_argument("--only", nargs="*", help="settings to check (default: all this machine can run)")
    parser.add_argument("--out", type=Path, help="write check_sharding_gpu.json and .md here")
    args = parser.parse_args()
    from accelerate import PartialState

    state = PartialState()
    world = state.num_processes
    if not torch.cuda.is_available():
        print("check_sharding_gpu: no GPU here", file=sys.stderr)
        return 2
    wanted = [(n, t) for n, t in SETTINGS if (world > 1 or n not in SHARDED and not n.startswith("ddp"))
              and (not args.only or n in args.only)]
    accelerator, failed, rows = None, [], []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp) if state.is_main_process else None
        from accelerate.utils import broadcast_object_list

        shared = [str(work) if work else None]
        if world > 1:
            broadcast_object_list(shared, from_process=0)
        for name, training in wanted:
            try:
                accelerator, row = check(name, training, args, world, accelerator, Path(shared[0]))
            except Exception as exc:  # say which setting broke; the processes may be out of step: stop
                if state.is_main_process:
                    print(json.dumps({"setting": name, "ok": False, "error": f"{type(exc).__name__}: {exc}"}),
                          flush=True)
                failed.append(name)
                raise
            if row is not None:
                rows.append(row)
                if not row["ok"]:
                    failed.append(name)
    if args.out and state.is_main_process:
        write_report(args, rows, world)
    return 1 if failed else 0


def write_report(args: argparse.Namespace, rows: list[dict], world: int) -> None:
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "check_sharding_gpu.json").write_text(json.dumps(rows, indent=1))
    device = f"{world}× {torch.cuda.get_device_name(0)}, torch {torch.__version__}"
    lines = [
        "# The executor's memory settings on GPUs",
        "",
        f"Command: `accelerate launch --num_processes {world} scripts/check_sharding_gpu.py`  ",
        f"Device: {device}. Model: {args.layers}×{args.d_model} decoder, seq {args.seq_len}, "
        f"micro-batch {args.micro_batch} per GPU, {args.precision}, {args.steps} steps, a checkpoint half way; "
        "the second half run again from it.",
        "",
        "Peak = `torch.cuda.max_memory_allocated` of the first run (it includes *before*, what the "
        "earlier settings left allocated in this process); predicted = muse's memory model without the "
        "CUDA context and fragmentation allowance; host = the offloaded optimizer's pinned host memory.",
        "",
        "| setting | loss first → last | resume: max Δloss / Δweight | before GiB | peak GiB | "
        "predicted GiB | peak − before vs predicted | host GiB (predicted) | ok |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        net = r["max_allocated_gib"] - r["allocated_before_gib"]
        lines.append(
            f"| {r['setting']} | {r['first_loss']:.3f} → {r['last_loss']:.3f} | "
            f"{r['resume_loss_gap']:.1e} / {r['resume_weight_gap']:.1e} | {r['allocated_before_gib']:.2f} | "
            f"{r['max_allocated_gib']:.2f} | {r['predicted_gib']:.2f} | "
            f"{(net - r['predicted_gib']) / r['predicted_gib']:+.0%} | {r['predicted_host_gib']:.2f} | "
            f"{'yes' if r['ok'] else 'NO'} |")
    (args.out / "check_sharding_gpu.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
