"""RKDO against the static I-Con baseline on scikit-learn's digits: the paper's grid.

    python scripts/bench_rkdo.py                   # CPU: CNN on digits, 5 seeds × {1,2,5,10} epochs (~10 min)
    python scripts/bench_rkdo.py --device cuda     # the same on a GPU
    python scripts/bench_rkdo.py --tiny            # synthetic mixture, 2 seeds × {1,2} epochs: checks the script

The set-up follows the RKDO paper's (Martin, arXiv 2504.21707) at the size of
a CPU: two augmented views per image, batch 64, Adam (lr 1e-3, no decay, no
schedule), 1/2/5/10 epochs, 5 seeds; RKDO with depth 3, τ⁰ = 0.5, β = 0.1;
I-Con with τ = 0.5 and debiasing 0.2. The encoder is the engine's small CNN
(not ResNet-18; the images are 8×8) and every q is over [the other view,
256 fixed anchors] (``engines/rkdo/field.py``). Methods:
- ``icon``: the static objective (p fixed, τ fixed);
- ``rkdo``: the recursion across iterations, as the paper states it;
- ``rkdo-in-batch``: the recursion inside one batch's loss with the model's
  own q in the target, as the author's code runs it.

Each run goes through the executor's real loop (``train_stage``) on the
engine's real trainer; a seed fixes the initial weights, the data order and
the augmentations, which every method shares (paired runs). Reported per
method and epoch budget, mean ± std over seeds: the training loss (each
method's own objective, the mean over the last epoch — not comparable across
objectives), I-Con's KL on fixed held-out views at τ⁰ (one yardstick for
all), and the four downstream measures on the held-out 20%: linear-probe
accuracy, k-means NMI and ARI, 10-nearest-neighbour label retention. The
untrained encoder's measures are shown as a reference.

Writes ``docs/bench_rkdo.{json,md,png}``; text under the markdown's
"## Which of the paper's claims held" heading is kept across re-runs (it is
written by a person from the numbers). ``--tiny`` writes to a temporary
folder unless ``--out`` is given.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

METHODS: dict[str, dict[str, Any]] = {
    "icon": {"objective": "icon"},
    "rkdo": {"objective": "rkdo", "alpha": 0.5, "depth": 3, "beta": 0.1},
    "rkdo-in-batch": {"objective": "rkdo", "alpha": 0.5, "depth": 3, "beta": 0.1, "in_batch": True},
}
MEASURES = ("linear_probe_acc", "nmi", "ari", "knn_retention")
COLUMNS = ("train_loss", "val_loss", *MEASURES)
CLAIMS_HEADING = "## Which of the paper's claims held"


def stage_settings(steps: int, batch: int, lr: float) -> Any:
    from muse_plan.executor.settings import resolve
    from muse_plan.plan.io import spec_from_dict

    spec = spec_from_dict({
        "name": "bench-rkdo",
        "model": {"scale": "1M", "seq_len": 32, "vocab_size": 260, "shape": {"layers": 2, "d_model": 32, "n_heads": 2}},
        "training": {"micro_batch": batch, "lr": lr, "weight_decay": 0.0, "schedule": "constant",
                     "warmup_steps": 0, "clip_grad_norm": 10.0},
        "stages": [{"name": "representation", "kind": "representation", "steps": steps,
                    "eval_every": steps, "checkpoint_every": steps}],
    }, "bench")
    return resolve(spec, spec.stages[0])


class LastEpoch:
    """Loop hooks keeping every step's loss."""

    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_start(self, step: int) -> None: ...

    def on_step(self, record: Any) -> None:
        self.losses.append(record.loss)

    def on_eval(self, step: int, metrics: dict[str, float]) -> None: ...

    def on_checkpoint(self, step: int, path: Path) -> None: ...

    def on_alerts(self, findings: list[Any]) -> None: ...

    def on_notes(self, step: int, notes: list[str], severity: str) -> None: ...


def make_trainer(options: dict[str, Any], seed: int, steps: int, batch: int, device: str) -> Any:
    import torch

    from engines.contract import StageSetup
    from engines.rkdo.config import RkdoConfig
    from engines.rkdo.trainer import RkdoTrainer

    s = stage_settings(max(steps, 1), batch, 1e-3)
    torch.manual_seed(seed)
    trainer = RkdoTrainer()
    trainer.setup(StageSetup(name="representation", kind="representation", model=s.model,
                             options=RkdoConfig.from_options(options),
                             micro_batch=batch, micro_steps=steps, seed=seed, device=device))
    return trainer


def one_run(options: dict[str, Any], seed: int, epochs: int, batch: int, lr: float, device: str,
            scratch: Path) -> dict[str, float]:
    from accelerate import Accelerator

    from muse_plan.executor.loop import train_stage

    probe = make_trainer(options, seed, 1, batch, device)
    per_epoch = probe.sampler.steps_per_epoch
    steps = epochs * per_epoch
    trainer = make_trainer(options, seed, steps, batch, device)
    hooks = LastEpoch()
    folder = scratch / f"run-{time.monotonic_ns()}"
    started = time.perf_counter()
    result = train_stage(trainer, stage_settings(steps, batch, lr), Accelerator(cpu=device == "cpu"), folder,
                         {}, hooks)
    seconds = time.perf_counter() - started
    shutil.rmtree(folder, ignore_errors=True)
    out = {"train_loss": statistics.fmean(hooks.losses[-per_epoch:]), "seconds": seconds, "steps": steps}
    out.update({k: result[k] for k in ("val_loss", *MEASURES)})
    return out


def untrained(options: dict[str, Any], seed: int, batch: int, device: str) -> dict[str, float]:
    found = make_trainer(options, seed, 1, batch, device).evaluate()
    return {k: found[k] for k in ("val_loss", *MEASURES)}


def summarise(runs: list[dict[str, Any]], key: str) -> tuple[float, float]:
    values = [r[key] for r in runs]
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def table(results: dict[str, Any], epochs: list[int]) -> list[str]:
    head = "| method | epochs | " + " | ".join(COLUMNS) + " |"
    lines = [head, "|" + "---|" * (len(COLUMNS) + 2)]
    base = results["untrained"]
    lines.append("| untrained | 0 | — | " + " | ".join(
        "{:.3f} ± {:.3f}".format(*summarise(base, k)) for k in COLUMNS[1:]) + " |")
    for method in results["methods"]:
        for e in epochs:
            runs = results["runs"][method][str(e)]
            cells = ["{:.3f} ± {:.3f}".format(*summarise(runs, k)) for k in COLUMNS]
            lines.append(f"| {method} | {e} | " + " | ".join(cells) + " |")
    return lines


def paired_gaps(results: dict[str, Any], epochs: list[int], method: str) -> list[str]:
    """Per epoch budget: mean over seeds of (method − icon), with how many seeds favour the method."""
    lines = [f"| {method} − icon | " + " | ".join(f"{e} ep" for e in epochs) + " |",
             "|" + "---|" * (len(epochs) + 1)]
    for key in ("val_loss", *MEASURES):
        cells = []
        for e in epochs:
            a, b = results["runs"][method][str(e)], results["runs"]["icon"][str(e)]
            diffs = [x[key] - y[key] for x, y in zip(a, b)]
            better = sum(d < 0 if key == "val_loss" else d > 0 for d in diffs)
            cells.append(f"{statistics.fmean(diffs):+.3f} ({better}/{len(diffs)})")
        lines.append(f"| {key} | " + " | ".join(cells) + " |")
    return lines


def loss_ratios(results: dict[str, Any], epochs: list[int], method: str) -> str:
    parts = []
    for e in epochs:
        own = summarise(results["runs"][method][str(e)], "train_loss")[0]
        icon = summarise(results["runs"]["icon"][str(e)], "train_loss")[0]
        parts.append(f"{e} ep: {100 * (1 - own / icon):.0f}% lower")
    return ", ".join(parts)


def plot(results: dict[str, Any], epochs: list[int], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(13, 7.5))
    titles = {"train_loss": "training loss (own objective; not comparable)", "val_loss": "I-Con KL, held-out views",
              "linear_probe_acc": "linear-probe accuracy", "nmi": "k-means NMI", "ari": "k-means ARI",
              "knn_retention": "10-NN label retention"}
    for ax, key in zip(axes.flat, COLUMNS):
        for method in results["methods"]:
            stats = [summarise(results["runs"][method][str(e)], key) for e in epochs]
            ax.errorbar(epochs, [m for m, _ in stats], yerr=[s for _, s in stats], marker="o", capsize=3,
                        label=method)
        if key != "train_loss":
            ax.axhline(summarise(results["untrained"], key)[0], color="grey", ls="--", lw=1, label="untrained")
        ax.set_xscale("log")
        ax.set_xticks(epochs, [str(e) for e in epochs])
        ax.set_xlabel("epochs")
        ax.set_title(titles[key], fontsize=10)
        if key == "train_loss":
            ax.set_yscale("log")
    axes.flat[1].legend(fontsize=8)  # the first panel has no untrained line
    fig.suptitle(f"RKDO vs I-Con on {results['dataset']} ({results['encoder']} encoder), "
                 f"mean ± std over {len(results['seeds'])} seeds", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_markdown(results: dict[str, Any], epochs: list[int], path: Path, command: str) -> None:
    """The tables; a person's text under ``CLAIMS_HEADING`` in an earlier file is kept."""
    kept = ""
    if path.exists():
        text = path.read_text()
        if CLAIMS_HEADING in text:
            kept = text[text.index(CLAIMS_HEADING):]
    lines = [
        "# RKDO vs I-Con (scripts/bench_rkdo.py)",
        "",
        f"Command: `{command}` — {results['device']}, torch threads {results['threads']}, "
        f"{results['seconds']:.0f} s in all.",
        "",
        f"Data: {results['dataset']} (train {results['n_train']}, held out {results['n_test']}); "
        f"encoder: {results['encoder']}; batch {results['batch']} (two views each) over "
        f"[positive, {results['anchors']} anchors]; Adam lr {results['lr']} (no decay, constant, clip 10); "
        f"{results['steps_per_epoch']} steps per epoch; seeds {results['seeds']}. "
        "RKDO: α 0.5, depth 3, τ⁰ 0.5, β 0.1; I-Con: τ 0.5 fixed, debiasing 0.2 (both share p⁽⁰⁾).",
        "",
        "Mean ± std over seeds. `train_loss` is each method's own objective (the mean over the last "
        "epoch) and is **not comparable across methods**; `val_loss` is I-Con's KL on fixed held-out "
        "views at τ 0.5, the same yardstick for every method.",
        "",
        *table(results, epochs),
        "",
        "Training loss relative to I-Con's (the paper's headline number; by construction for the "
        "recursive targets):",
        "",
        *[f"- {m}: {loss_ratios(results, epochs, m)}" for m in results["methods"] if m != "icon"],
        "",
        "Paired differences to I-Con (same seed: same initial weights, data order and augmentations); "
        "in brackets, the seeds on which the method is better:",
        "",
    ]
    for method in results["methods"]:
        if method != "icon":
            lines += [*paired_gaps(results, epochs, method), ""]
    lines += [f"![RKDO vs I-Con]({path.stem}.png)", ""]
    path.write_text("\n".join(lines) + ("\n" + kept if kept else ""))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="synthetic data, 2 seeds, 1 and 2 epochs")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--epochs", default="1,2,5,10")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--name", default="bench_rkdo", help="file stem of the .md/.json/.png written")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    epochs = [int(e) for e in args.epochs.split(",")]
    seeds = list(range(2 if args.tiny else args.seeds))
    if args.tiny:
        epochs = [1, 2]
    base = ({"dataset": "synthetic", "encoder": "mlp", "anchors": 64} if args.tiny
            else {"dataset": "digits", "encoder": "cnn", "anchors": 256})
    base.update(tau0=0.5, debias=0.2)
    methods = args.methods.split(",")
    out = args.out or (Path(tempfile.mkdtemp()) if args.tiny else ROOT / "docs")
    out.mkdir(parents=True, exist_ok=True)
    batch, lr = 64, 1e-3
    started = time.perf_counter()
    probe = make_trainer(base, 0, 1, batch, args.device)
    results: dict[str, Any] = {
        "dataset": base["dataset"], "encoder": base["encoder"], "anchors": base["anchors"], "batch": batch,
        "lr": lr, "seeds": seeds, "epochs": epochs, "methods": methods, "device": args.device,
        "threads": args.threads, "n_train": len(probe.data.train), "n_test": len(probe.data.test),
        "steps_per_epoch": probe.sampler.steps_per_epoch,
        "untrained": [untrained(base, seed, batch, args.device) for seed in seeds],
        "runs": {m: {} for m in methods},
    }
    with tempfile.TemporaryDirectory() as scratch:
        for method in methods:
            for e in epochs:
                runs = []
                for seed in seeds:
                    run = one_run({**base, **METHODS[method]}, seed, e, batch, lr, args.device, Path(scratch))
                    runs.append(run)
                    print(f"{method:14s} {e:2d} ep seed {seed}: " + ", ".join(
                        f"{k} {run[k]:.3f}" for k in COLUMNS) + f" ({run['seconds']:.1f} s)", flush=True)
                results["runs"][method][str(e)] = runs
    results["seconds"] = time.perf_counter() - started
    command = " ".join(["python scripts/bench_rkdo.py", *sys.argv[1:]])
    (out / f"{args.name}.json").write_text(json.dumps(results, indent=1))
    write_markdown(results, epochs, out / f"{args.name}.md", command)
    plot(results, epochs, out / f"{args.name}.png")
    print("\n".join(table(results, epochs)))
    print(f"wrote {out / args.name}.md, .json and .png")


if __name__ == "__main__":
    main()
