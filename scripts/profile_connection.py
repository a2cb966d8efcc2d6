"""What one residual connection costs, forward and backward, and in which kernels.

``docs/bench_architecture*.md`` measure whole steps through ``muse plan run``; mhc adds
57–79% to the standard 350M step where the issue asks for ≤ 15%. This script takes one
connection apart at that shape (8 × 2048 tokens, d_model 1024, n = 4 streams, bf16
autocast, under torch.compile as the executor runs it): its forward + backward around a
sublayer that costs next to nothing (a per-channel scale), timed with CUDA events, and its
kernels under torch.profiler, for

- ``standard``: x + f(x), the cost every other row is measured against;
- ``mhc``: the torch connection inductor fuses (the executor's default);
- ``mhc+streams``: ``fused_streams``' read and write kernels, the maps in torch;
- ``mhc+fused``: those and ``maps_project`` (norm and product with φ, each way);
- ``mhc+one``: ``fused_mhc``, the connection as two ops that write the state's gradient once
  (bf16 states only; an fp32 one runs ``mhc+fused``'s ops), its ``pre`` in two kernels (the maps with
  the read; the dots with the state's gradient);
- ``mhc+split``: ``mhc+one`` with ``pre`` in four kernels (maps, read; dots, state's gradient), as before;
- ``sinkhorn``: the fused Sinkhorn forward + backward alone, on the same tokens' 4×4 logits;

each with a bf16 stream state (``+bf16``, as ``techniques.mhc.stream_dtype: bfloat16``) and
an fp32 one. A 350M step has 48 connections. One connection alone is bound by the host's
launches (its wall time, ``ms``, is mostly that), so what a step pays is the device time, the
sum of its kernels (``(all kernels)``, the last row of each case's list).

    PYTHONPATH=. python3 scripts/profile_connection.py --out $OUT          # a GPU, ~2 min
    PYTHONPATH=. python3 scripts/profile_connection.py --tiny              # CPU: it runs (numbers mean nothing)
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

import torch  # noqa: E402

from engines.architecture import ModelConfig  # noqa: E402
from engines.architecture import fused_mhc, fused_streams  # noqa: E402
from engines.architecture import residual  # noqa: E402

VARIANTS = ("standard", "mhc", "mhc+streams", "mhc+fused", "mhc+split", "mhc+one")


def setting(name: str) -> tuple[str, bool, bool, bool]:
    """(residual, stream kernels on, maps kernel on, fused_mhc on)."""
    base = name.split("+")[0]
    one = name.endswith(("+one", "+split"))
    return base, one or name.endswith(("+streams", "+fused")), one or name.endswith("+fused"), one


def measure(fn, steps: int, warmup: int, cuda: bool) -> list[float]:  # type: ignore[no-untyped-def]
    from _timing import timer

    device = torch.device("cuda" if cuda else "cpu")
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(steps):
        stop = timer(device)
        fn()
        times.append(stop() * 1e3)
    return times


def kernels(fn, cuda: bool, top: int) -> list[dict[str, Any]]:  # type: ignore[no-untyped-def]
    """The device kernels of one call of ``fn`` (ms each, summed over calls), most first."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    if not cuda:
        return []
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    rows = [{"name": e.key[:120], "ms": e.device_time_total / 1e3, "calls": e.count}
            for e in prof.key_averages() if e.device_type == DeviceType.CUDA and e.device_time_total > 0]
    rows.sort(key=lambda r: -r["ms"])
    return rows[:top] + [{"name": "(all kernels)", "ms": sum(r["ms"] for r in rows), "calls": 0}]


def connection_case(name: str, stream_dtype: str, shape: tuple[int, int, int, int], cuda: bool,
                    args: argparse.Namespace) -> dict[str, Any]:
    B, T, n, C = shape
    base, streams, maps, one = setting(name)
    fused_streams.MAPS, fused_mhc.ENABLED = maps, one
    fused_mhc.TWO_PASS_FORWARD = fused_mhc.TWO_PASS_BACKWARD = not name.endswith("+split")
    device = torch.device("cuda" if cuda else "cpu")
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=64, seq_len=T, n_layers=1, d_model=C, n_heads=max(1, C // 64),
                         residual=base, streams=n, stream_dtype=stream_dtype, fused_kernels="on" if streams else "off")
    conn = residual.RESIDUALS[base].make(config, 0).to(device)
    scale = torch.nn.Parameter(torch.ones(C, device=device))
    multi = residual.RESIDUALS[base].multi_stream
    dtype = getattr(torch, stream_dtype) if multi else torch.float32
    x = torch.randn(B, T, n, C, device=device) if multi else torch.randn(B, T, C, device=device)
    x = x.to(dtype).requires_grad_()
    grad = torch.randn_like(x)

    def body(x: torch.Tensor) -> torch.Tensor:
        return conn(x, lambda h: h * scale)

    run = torch.compile(body) if cuda or args.compile_on_cpu else body
    torch._dynamo.reset()  # and no cached graph: one traced under another case's switches would be taken
    torch._inductor.config.fx_graph_cache = False
    torch._functorch.config.enable_autograd_cache = False

    def step() -> None:
        x.grad = None  # in a model the state's gradient flows on to the block before: nothing accumulates
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            out = run(x)
        out.backward(grad)

    times = measure(step, args.steps, args.warmup, cuda)
    row = {"case": name if not multi else f"{name}{'+bf16' if stream_dtype == 'bfloat16' else ''}",
           "ms": statistics.median(times), "ms_all": [round(t, 4) for t in times],
           "state_mib": x.numel() * x.element_size() / 2**20, "kernels": kernels(step, cuda, args.top)}
    return row


def sinkhorn_case(shape: tuple[int, int, int, int], cuda: bool, args: argparse.Namespace) -> dict[str, Any]:
    B, T, n, _ = shape
    device = torch.device("cuda" if cuda else "cpu")
    logits = (torch.randn(B, T, n, n, device=device) + 4 * torch.eye(n, device=device)).requires_grad_()
    grad = torch.randn_like(logits)

    def step() -> None:
        residual.sinkhorn(logits, 20).backward(grad)

    times = measure(step, args.steps, args.warmup, cuda)
    return {"case": "sinkhorn", "ms": statistics.median(times), "ms_all": [round(t, 4) for t in times],
            "kernels": kernels(step, cuda, args.top)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tiny", action="store_true", help="CPU, a small shape: the script runs")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--dtypes", default="bfloat16,float32", help="the multi-stream cases' state dtypes")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--top", type=int, default=12, help="kernels listed a case")
    p.add_argument("--compile-on-cpu", action="store_true")
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    cuda = torch.cuda.is_available() and not args.tiny
    if args.tiny:
        args.steps, args.warmup = 2, 1
    shape = (1, 32, 4, 64) if args.tiny else (8, 2048, 4, 1024)
    rows = []
    for name in args.variants.split(","):
        if setting(name)[1] and not (cuda and fused_streams.AVAILABLE):
            print(f"{name}: skipped (needs CUDA and Triton)", flush=True)
            continue
        for stream_dtype in (args.dtypes.split(",") if name != "standard" else ["float32"]):
            row = connection_case(name, stream_dtype, shape, cuda, args)
            rows.append(row)
            print(f"{row['case']:<22} {row['ms']:8.3f} ms", flush=True)
    rows.append(sinkhorn_case(shape, cuda, args))
    print(f"{'sinkhorn':<22} {rows[-1]['ms']:8.3f} ms", flush=True)
    standard = next((r["ms"] for r in rows if r["case"] == "standard"), None)
    for r in rows:
        r["over_standard_ms"] = None if standard is None else r["ms"] - standard
    result = {"device": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__,
              "shape": {"batch": shape[0], "seq": shape[1], "streams": shape[2], "d_model": shape[3]},
              "command": " ".join(["python3", "scripts/profile_connection.py", *sys.argv[1:]]), "rows": rows}
    for r in rows:
        print(f"\n{r['case']}: {r['ms']:.3f} ms" + (f" ({r['over_standard_ms']:+.3f} over standard)"
                                                   if r["over_standard_ms"] is not None else ""))
        for k in r["kernels"]:
            print(f"  {k['ms']:7.3f} ms {k['calls']:3d}x {k['name']}")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "profile_connection.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
