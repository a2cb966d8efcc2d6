"""Growth vs training from scratch: validation loss against training FLOPs.

One run, one data stream, four arms on the same target decoder:

- scratch      the target trained from its init for ``--steps`` steps; its
               final validation loss is the target every other arm must reach;
- g_stack      a model with 1/g of the layers trained for ``--small-fraction``
               × steps, stacked g times (Du et al. 2024, g = 4), continued;
- g_stack_fp   the same small model, stacked with function-preserving
               identity blocks (engines/growth/depth.py), continued;
- ligo         the same small model, grown by LiGO's learned operator fitted
               for ``--fit-steps`` steps (Wang et al. 2023), continued.

The three growth arms share one trained small model; each is charged its
FLOPs (and LiGO its fit). A growth arm continues with the same batch, peak
learning rate and cosine horizon as scratch (re-warmed over 2% of it) and
stops at the first evaluation at or below scratch's final loss (unless
``--no-stop``); "FLOPs to target" interpolates linearly between evaluations.

Design decisions:
- FLOPs per token = 6·N + 12·L·d·T, N every parameter (tied embedding once),
  attention without causal halving — scripts/bench_architecture.py's
  convention; a LiGO fit step is charged as one training step of the grown
  model (its forward and backward run through it; the operator's own
  arithmetic is a few GFLOPs). Evaluations are not charged.
- Data: the engines/data corpus over a local text folder. ``stdlib`` (the
  default) copies this Python's standard library sources into .txt files
  (~30 MB of real text on any machine, no network), byte tokenizer.
  ``arithmetic`` uses the generated problems; any other value is a path.
- bf16 autocast over fp32 weights on CUDA (as the executor trains), fp32 on
  CPU; AdamW (0.9, 0.95), weight decay 0.1 on matrices, clipping at 1.0;
  warmup over 5% of a phase (the executor's default), then cosine to 10%;
  after growth a 2% re-warmup to the same peak.
- ``--tiny`` checks the script on CPU in about a minute: a 4-layer, 64-wide
  model, 2 MB of text, a few hundred steps. Its numbers say nothing about
  growth at scale.

Run:  PYTHONPATH=. python3 scripts/bench_growth.py                 # CUDA, ~8 min on one H100
      PYTHONPATH=. python3 scripts/bench_growth.py --tiny          # CPU check
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import json
import math
import platform
import shlex
import sys
import sysconfig
import tempfile
import time
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from engines.architecture import DecoderLM, ModelConfig  # noqa: E402
from engines.data import BatchSampler, build_corpus, eval_batches, load_tokenizer  # noqa: E402
from engines.growth.operators import grow  # noqa: E402
from engines.growth.schedule import GrowSettings  # noqa: E402
from engines.growth.stage import n_params  # noqa: E402


@dataclass
class Curve:
    name: str
    points: list[tuple[float, float]] = field(default_factory=list)  # (training FLOPs, val loss)
    seconds: float = 0.0
    params: int = 0
    notes: str = ""


def flops_per_token(c: ModelConfig, n: int) -> float:
    return 6 * n + 12 * c.n_layers * c.d_model * c.seq_len


def stdlib_corpus(folder: Path, megabytes: float) -> Path:
    """This Python's standard library sources as .txt files (a local, real-text corpus)."""
    out = folder / f"stdlib-{megabytes:g}mb"
    if (out / "DONE").is_file():
        return out
    out.mkdir(parents=True, exist_ok=True)
    lib = Path(sysconfig.get_paths()["stdlib"])
    total, budget = 0, megabytes * 1e6
    for i, path in enumerate(sorted(p for p in lib.rglob("*.py") if "site-packages" not in p.parts)):
        text = path.read_text(errors="replace")
        (out / f"{i:05d}.txt").write_text(text)
        total += len(text)
        if total >= budget:
            break
    (out / "DONE").write_text(str(total))
    return out


class Data:
    def __init__(self, args: argparse.Namespace, cache: Path) -> None:
        tokenizer = load_tokenizer("byte")
        source = str(stdlib_corpus(cache, args.data_mb)) if args.data == "stdlib" else args.data
        self.corpus = build_corpus(source, tokenizer, seed=args.seed, val_fraction=0.02, cache_dir=cache,
                                   min_tokens=args.steps * args.micro_batch * args.seq_len)
        self.vocab = tokenizer.vocab_size
        self.val = eval_batches(self.corpus.val, args.seq_len, args.micro_batch, args.eval_batches)
        self.args = args

    def sampler(self) -> BatchSampler:
        return BatchSampler(self.corpus.train, seq_len=self.args.seq_len, seed=self.args.seed)


def lr_at(step: int, total: int, warmup: int, peak: float) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - 1 - warmup))
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


class Trainer:
    """The same loop for every arm: AdamW, warmup + cosine, bf16 autocast on CUDA."""

    def __init__(self, data: Data, args: argparse.Namespace, device: torch.device) -> None:
        self.data, self.args, self.device = data, args, device
        cuda = device.type == "cuda"
        self.autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if cuda else nullcontext

    def batches(self, sampler: BatchSampler) -> Callable[[], tuple[torch.Tensor, torch.Tensor]]:
        def next_batch() -> tuple[torch.Tensor, torch.Tensor]:
            x, y = sampler.next_batch(self.args.micro_batch)
            return x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
        return next_batch

    @torch.no_grad()
    def evaluate(self, model: DecoderLM) -> float:
        model.eval()
        total = 0.0
        with self.autocast():
            for x, y in self.data.val:
                total += model(x.to(self.device), y.to(self.device))[1].float().item()
        model.train()
        return total / len(self.data.val)

    def train(self, model: DecoderLM, sampler: BatchSampler, steps: int, curve: Curve, start_flops: float,
              horizon: int | None = None, target: float | None = None, warmup: float = 0.05) -> tuple[float, int]:
        """Train up to ``steps`` steps (schedule over ``horizon``, warming up over
        ``warmup`` of it); stop at the first evaluation at or below ``target``."""
        a = self.args
        horizon = horizon or steps
        matrices = [p for p in model.parameters() if p.dim() >= 2]
        vectors = [p for p in model.parameters() if p.dim() < 2]
        opt = torch.optim.AdamW([{"params": matrices, "weight_decay": 0.1}, {"params": vectors, "weight_decay": 0.0}],
                                lr=a.lr, betas=(0.9, 0.95), fused=self.device.type == "cuda")
        per_step = flops_per_token(model.config, n_params(model)) * a.micro_batch * a.seq_len
        warmup_steps, flops, next_batch = max(1, round(warmup * horizon)), start_flops, self.batches(sampler)
        model.train()
        for step in range(steps):
            for group in opt.param_groups:
                group["lr"] = lr_at(step, horizon, warmup_steps, a.lr)
            x, y = next_batch()
            with self.autocast():
                _, loss = model(x, y)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            flops += per_step
            if step == 9 and curve.name == "scratch":  # the first steps carry start-up costs; ten give a fair rate
                self.started = time.perf_counter()
            if step == 9 + a.eval_every and curve.name == "scratch":
                rate = (time.perf_counter() - self.started) / a.eval_every
                print(f"  {rate:.3f} s a step: scratch needs about {rate * steps:.0f} s", flush=True)
            if (step + 1) % a.eval_every == 0 or step + 1 == steps:
                val = self.evaluate(model)
                curve.points.append((flops, val))
                print(f"  {curve.name:>10} step {step + 1:5d}  {flops:.3e} FLOPs  val {val:.4f}", flush=True)
                if not math.isfinite(val):
                    raise RuntimeError(f"{curve.name}: validation loss {val} at step {step + 1}")
                if target is not None and val <= target:
                    return flops, step + 1
        return flops, steps


def crossing(points: list[tuple[float, float]], target: float) -> float | None:
    """FLOPs at which a curve first reaches ``target`` (linear between evaluations)."""
    for i, (flops, loss) in enumerate(points):
        if loss <= target:
            if i == 0:
                return flops
            (f0, l0) = points[i - 1]
            return f0 + (flops - f0) * (l0 - target) / (l0 - loss) if l0 != loss else flops
    return None


def run(args: argparse.Namespace, progress: Callable[[dict[str, Any]], None] = lambda r: None) -> dict[str, Any]:
    """Every arm in turn; ``progress`` gets the result so far after each arm (a
    run cut off by a time limit still leaves the arms it finished on disk)."""
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    cache = Path(tempfile.gettempdir()) / "muse-bench-growth"
    data = Data(args, cache)
    print(data.corpus.description, flush=True)
    big = ModelConfig(vocab_size=data.vocab, seq_len=args.seq_len, n_layers=args.layers, d_model=args.d_model,
                      n_heads=args.heads, residual=args.residual)
    small = replace(big, n_layers=args.layers // args.factor)
    trainer = Trainer(data, args, device)
    curves: list[Curve] = []

    t0 = time.perf_counter()
    scratch = Curve("scratch")
    model = DecoderLM(big).to(device)
    scratch.params = n_params(model)
    scratch_flops, _ = trainer.train(model, data.sampler(), args.steps, scratch, 0.0)
    scratch.seconds = time.perf_counter() - t0
    target = scratch.points[-1][1]
    curves.append(scratch)
    del model

    def result() -> dict[str, Any]:
        return {"target": target, "scratch_flops": scratch_flops, "small_flops": small_flops,
                "small_steps": small_steps, "big": big.__dict__, "small": small.__dict__,
                "data": data.corpus.description, "curves": [c.__dict__ for c in curves]}

    t0 = time.perf_counter()
    small_curve = Curve("small")
    small_model = DecoderLM(small).to(device)
    small_curve.params = n_params(small_model)
    sampler = data.sampler()
    small_steps = max(1, round(args.small_fraction * args.steps))
    small_flops, _ = trainer.train(small_model, sampler, small_steps, small_curve, 0.0)
    small_seconds = time.perf_counter() - t0
    after_small = sampler.state_dict()

    arms = {"g_stack": GrowSettings("g_stack"), "g_stack_fp": GrowSettings("g_stack", function_preserving=True),
            "ligo": GrowSettings("ligo", fit_steps=args.fit_steps, fit_lr=args.fit_lr)}
    for name in args.arms.split(","):
        t0 = time.perf_counter()
        curve = Curve(name, list(small_curve.points))
        arm_sampler = data.sampler()
        arm_sampler.load_state_dict(after_small)
        grown = grow(copy.deepcopy(small_model), big, arms[name], trainer.batches(arm_sampler), trainer.autocast)
        model = grown.model
        flops = small_flops + len(grown.fit_losses) * flops_per_token(big, n_params(model)) * \
            args.micro_batch * args.seq_len
        curve.points.append((flops, trainer.evaluate(model)))
        curve.notes = f"val loss right after growth {curve.points[-1][1]:.4f}"
        print(f"  {name:>10} grown: {curve.notes}", flush=True)
        trainer.train(model, arm_sampler, args.steps, curve, flops, horizon=args.steps,
                      target=None if args.no_stop else target, warmup=0.02)  # SEEDS.md: re-warm 1–2%
        curve.params, curve.seconds = n_params(model), small_seconds + time.perf_counter() - t0
        curves.append(curve)
        progress(result())
        del model, grown
    return result()


def table(result: dict[str, Any]) -> list[str]:
    rows = ["| arm | params | FLOPs to scratch's final val loss | saving vs scratch | last val loss | wall s | notes |",
            "| --- | --- | --- | --- | --- | --- | --- |"]
    base = result["scratch_flops"]
    for c in result["curves"]:
        reached = crossing(c["points"], result["target"])
        flops = f"{reached:.3e}" if reached is not None else "not reached"
        saving = "" if reached is None or c["name"] == "scratch" else \
            f"{1 - reached / base:.1%} fewer" if reached <= base else f"{reached / base - 1:.1%} more"
        rows.append(f"| {c['name']} | {c['params'] / 1e6:.1f}M | {flops} | {saving} | {c['points'][-1][1]:.4f} | "
                    f"{c['seconds']:.0f} | {c['notes']} |")
    return rows


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for c in result["curves"]:
        xs, ys = zip(*c["points"])
        ax.plot(xs, ys, label=c["name"], marker="." if len(xs) < 60 else None)
    ax.axhline(result["target"], color="grey", linestyle=":", label="scratch's final val loss")
    ax.axvline(result["small_flops"], color="grey", linestyle="--", linewidth=0.8, label="growth")
    ax.set_xlabel("training FLOPs")
    ax.set_ylabel("validation loss (nats/token)")
    ax.set_title("growth vs from scratch")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def write(result: dict[str, Any], args: argparse.Namespace, seconds: float) -> None:
    stem = "bench_growth_tiny" if args.tiny else "bench_growth"
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    command = "PYTHONPATH=. python3 scripts/bench_growth.py " + shlex.join(sys.argv[1:])
    b, s = result["big"], result["small"]
    cpu = f"CPU ({platform.processor() or platform.machine()})"
    device = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else cpu
    label = ("**CPU smoke run (`--tiny`): checks the script; says nothing about growth at scale.**\n\n"
             if args.tiny else "")
    lines = ["# Growth vs from scratch: validation loss against training FLOPs\n", label,
             f"Produced by `{command}` on {dt.datetime.now(dt.timezone.utc).isoformat(timespec='seconds')} "
             f"in {seconds:.0f} s; device: {device}; torch {torch.__version__}.\n",
             f"Target: {b['n_layers']} layers × d_model {b['d_model']}, {b['n_heads']} heads, residual "
             f"{b['residual']}, context {b['seq_len']}; small: {s['n_layers']} layers (g = {args.factor}), trained "
             f"{result['small_steps']} steps; every arm {args.micro_batch}×{b['seq_len']} tokens a step, peak lr "
             f"{args.lr:g}, scratch {args.steps} steps. Data: {result['data']}.\n",
             f"Scratch's final validation loss: **{result['target']:.4f}**. FLOPs = (6·N + 12·L·d·T) × tokens; "
             "growth arms are charged the small model's training and LiGO's fit.\n", *table(result), "",
             f"![curves]({stem}.png)\n"]
    (out / f"{stem}.md").write_text("\n".join(lines))
    (out / f"{stem}.json").write_text(json.dumps({"command": command, **result}, indent=1))
    plot(result, out / f"{stem}.png")
    print("\n".join(table(result)))
    print(f"wrote {out / (stem + '.md')}")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tiny", action="store_true", help="CPU smoke run: tiny model, 2 MB of text, ~1 minute")
    p.add_argument("--device", default=None, help="default: cuda when available (cpu with --tiny)")
    p.add_argument("--out", type=Path, default=ROOT / "docs")
    p.add_argument("--data", default="stdlib", help="stdlib | arithmetic | a local text folder or file")
    p.add_argument("--data-mb", type=float, default=None, help="stdlib: megabytes of source text")
    p.add_argument("--layers", type=int, default=None)
    p.add_argument("--d-model", type=int, default=None)
    p.add_argument("--heads", type=int, default=None)
    p.add_argument("--residual", default="standard")
    p.add_argument("--factor", type=int, default=4, help="growth factor g (G_stack recommends 4)")
    p.add_argument("--seq-len", type=int, default=None)
    p.add_argument("--micro-batch", type=int, default=None)
    p.add_argument("--steps", type=int, default=None, help="scratch's steps (and the growth arms' horizon)")
    p.add_argument("--small-fraction", type=float, default=0.5, help="small model's steps ÷ scratch's steps")
    p.add_argument("--fit-steps", type=int, default=None, help="LiGO's operator fit")
    p.add_argument("--fit-lr", type=float, default=1e-3)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--eval-every", type=int, default=None)
    p.add_argument("--eval-batches", type=int, default=None)
    p.add_argument("--arms", default="g_stack,g_stack_fp,ligo")
    p.add_argument("--no-stop", action="store_true", help="continue growth arms for all steps")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    # real: a 302M-parameter decoder (the 350M table shape with a byte vocabulary); tiny: a CPU check
    real = dict(layers=24, d_model=1024, heads=16, seq_len=512, micro_batch=32, steps=500, fit_steps=100,
                lr=5e-4, eval_every=25, eval_batches=4, data_mb=64, device="cuda")
    tiny = dict(layers=4, d_model=64, heads=4, seq_len=64, micro_batch=8, steps=160, fit_steps=10,
                lr=3e-3, eval_every=20, eval_batches=4, data_mb=2, device="cpu", factor=2)
    for key, value in (tiny if args.tiny else real).items():
        if key == "factor":
            args.factor = value if "--factor" not in sys.argv else args.factor
        elif getattr(args, key) is None:
            setattr(args, key, value)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("no CUDA device: run with --tiny (CPU) or --device cpu")
    return args


def main() -> None:
    args = parse_args()
    if args.device == "cpu":
        torch.set_num_threads(1)  # a shared CPU: more threads only contend
    t0 = time.perf_counter()
    result = run(args, progress=lambda partial: write(partial, args, time.perf_counter() - t0))
    write(result, args, time.perf_counter() - t0)


if __name__ == "__main__":
    main()
