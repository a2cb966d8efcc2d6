"""What storing mHC's n-stream state in bf16 does to learning: the same plan through
``muse plan run`` with ``techniques.<mixing>.stream_dtype`` float32 and bfloat16, side by side.

Each residual mode (mhc, and mgt through ``geometric_scaling``) is trained twice
from the same seed on the same generated data, once per stream dtype, as a user runs
it (``bench_plan_run.run_one``: a subprocess, its own store). The loss of every step
and the validation losses come from the store; the report gives the final
validation loss of each, the largest and the mean gap between the two training
curves over the last half, and a PNG of the curves.

    PYTHONPATH=. python3 scripts/bench_stream_dtype.py --out docs/            # CPU defaults
    PYTHONPATH=. python3 scripts/bench_stream_dtype.py --shape 24,1024,16 --seq 2048 --micro 8 --steps 300 --vocab 32000  # GPU
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))


def curves(data: dict, cache: Path) -> dict[str, Any]:
    """``data`` through ``muse plan run``; its training and validation losses from the store."""
    from bench_plan_run import run_one

    row = run_one(data, cache, skip=0)
    if "error" in row:
        raise SystemExit(f"{data['name']} failed: {row['error']}")
    from muse_plan.store import runs
    from muse_plan.store.db import Store

    store = Store()  # run_one left MUSE_HOME at this plan's store
    try:
        with store.read() as session:
            run = runs.list_runs(session)[0][0]
            loss = [v for _, v in runs.metric_series(session, run.id, "loss")]
            val = runs.metric_series(session, run.id, "val_loss")
    finally:
        store.close()
    return {"tokens_per_s": row["tokens_per_s"], "loss": loss, "val_loss": val}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=ROOT / "docs")
    p.add_argument("--residuals", default="mhc,mgt")
    p.add_argument("--shape", default="4,128,4", help="layers,d_model,heads")
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--micro", type=int, default=8)
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--vocab", type=int, default=260, help="the byte tokenizer's 260 on CPU; 32000 as the GPU benches")
    args = p.parse_args()
    import torch

    from bench_plan_run import plan

    layers, d_model, heads = (int(v) for v in args.shape.split(","))
    shape = {"layers": layers, "d_model": d_model, "n_heads": heads}
    cuda = torch.cuda.is_available()
    precision, compute = ("bf16", "1xH100") if cuda else ("fp32", "cpu")
    cache = Path(tempfile.mkdtemp(prefix="muse-inductor-"))
    device = torch.cuda.get_device_name(0) if cuda else f"CPU ({os.cpu_count()} cores)"
    out: dict[str, Any] = {"command": "python3 scripts/bench_stream_dtype.py " + " ".join(sys.argv[1:]),
                           "device": device, "precision": precision, "shape": shape, "seq_len": args.seq,
                           "micro_batch": args.micro, "steps": args.steps, "vocab_size": args.vocab, "rows": {}}
    for residual in args.residuals.split(","):
        for dtype in ("float32", "bfloat16"):
            data = plan(f"{residual}-{dtype}", residual, "off", shape, args.seq, args.micro, args.steps,
                        precision, compute, stream_dtype=dtype)
            data["stages"][0]["eval_every"] = max(1, args.steps // 10)
            data["model"]["vocab_size"] = args.vocab
            out["rows"][f"{residual}/{dtype}"] = got = curves(data, cache)
            print(f"{residual} {dtype}: final val {got['val_loss'][-1][1]:.4f}, "
                  f"{got['tokens_per_s']:,.0f} tok/s", flush=True)
        a, b = out["rows"][f"{residual}/float32"], out["rows"][f"{residual}/bfloat16"]
        half = len(a["loss"]) // 2
        gaps = [y - x for x, y in zip(a["loss"][half:], b["loss"][half:])]
        out["rows"][f"{residual}/gap"] = {
            "val_loss_fp32": a["val_loss"][-1][1], "val_loss_bf16": b["val_loss"][-1][1],
            "mean_gap_last_half": statistics.fmean(gaps), "largest_gap_last_half": max(gaps, key=abs)}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_stream_dtype.json").write_text(json.dumps(out, indent=1) + "\n")
    plot(out, args.out / "bench_stream_dtype.png")
    for residual in args.residuals.split(","):
        print(residual, json.dumps(out["rows"][f"{residual}/gap"]))


def plot(out: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    residuals = sorted({key.split("/")[0] for key in out["rows"]})
    fig, axes = plt.subplots(1, len(residuals), figsize=(6 * len(residuals), 4), squeeze=False)
    for ax, residual in zip(axes[0], residuals):
        for dtype, style in (("float32", "-"), ("bfloat16", "--")):
            row = out["rows"][f"{residual}/{dtype}"]
            ax.plot(range(1, len(row["loss"]) + 1), row["loss"], style, lw=1, label=f"train, {dtype} streams")
            steps, values = zip(*row["val_loss"])
            ax.plot(steps, values, style, marker="o", ms=3, label=f"validation, {dtype} streams")
        ax.set(title=f"{residual}: stream state fp32 vs bf16 ({out['device']})", xlabel="step", ylabel="loss")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
