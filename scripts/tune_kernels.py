"""The tiles of ``fused_mhc``'s kernels and DDL's tokens a backward program, timed on a GPU.

Each of ``pre``'s two forms, at 350M's shape (8 × 2048 tokens, 4 streams of d_model channels,
a bf16 state), alone, with CUDA events, for every (tokens, channels, warps) a program in the
grid below:

- forward: ``fused_streams``' maps kernel and read kernel (two launches, the state read twice
  from memory) against ``pre_read`` (one launch, its second read meant to come from L2);
- backward: the dots kernel and ``state_grad`` against ``pre_grad`` (the dots and the state's
  gradient in one launch);
- DDL's backward (``fused_delta``, fp32 state (tokens, d_model), the sublayer's output bf16) at 8 to
  32 tokens a program, 1 or 2 of them at once (``ROWS``), 4 to 16 warps (``WARPS``) and 1 to 3 token
  steps in flight (``STAGES``, Triton's pipelining of the loop): a program walks its tokens a few rows
  at a time and sums their parameter-gradient shares, so fewer tokens mean more programs in flight and
  more shares for torch to add; and DDL's forward at 1 to 4 tokens a program and 4 to 16 warps
  (``--ddl-only``: these alone).

Each row gives the median milliseconds and the bytes the form must move at least (the state
and the other tensors read or written once) over that time: the memory speed it reaches.
``fused_mhc.TILES`` takes the fastest; ``TWO_PASS_FORWARD`` / ``TWO_PASS_BACKWARD`` the faster
form, ``fused_delta.TOKENS_PER_PROGRAM``, ``ROWS``, ``WARPS`` and ``STAGES`` the fastest counts: ``--apply`` writes them into
``engines/architecture/fused_mhc.py`` and ``fused_delta.py`` (``--apply-from JSON`` does so from
an earlier run's file, with no GPU). Launch configurations that fail to compile (too
many registers, shared memory) are listed with why.

    PYTHONPATH=. python3 scripts/tune_kernels.py --out $OUT          # a GPU, ~2 min
    PYTHONPATH=. python3 scripts/tune_kernels.py --tiny              # CPU, Triton's interpreter: it runs
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
TINY = "--tiny" in sys.argv
if TINY:  # before triton is imported
    os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402

from engines.architecture import fused_delta as fd  # noqa: E402
from engines.architecture import fused_mhc as fm  # noqa: E402
from engines.architecture import fused_streams as fs  # noqa: E402


def time_ms(fn: Callable[[], Any], reps: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    times = []
    if TINY:
        start = time.perf_counter()
        fn()
        return 1e3 * (time.perf_counter() - start)
    for _ in range(reps):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        times.append(start.elapsed_time(stop))
    return statistics.median(times)


SOURCE = ROOT / "engines" / "architecture" / "fused_mhc.py"
DELTA_SOURCE = ROOT / "engines" / "architecture" / "fused_delta.py"


FORMS = ("maps + read", "pre_read", "dots + state_grad", "pre_grad", "ddl backward", "ddl forward")


def fastest(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Each form's fastest timed row (a form with none timed is left out)."""
    best = {}
    for form in FORMS:
        timed = [r for r in rows if r["form"] == form and "ms" in r]
        if timed:
            best[form] = min(timed, key=lambda r: r["ms"])
    return best


def apply(best: dict[str, Any]) -> str:
    """Write the fastest tiles and forms into fused_mhc.py's TILES and TWO_PASS_* lines; what changed.
    A form left untimed (a time limit, or no tile compiled) keeps what the file has."""
    import ast
    import re

    text = SOURCE.read_text()
    tiles = ast.literal_eval(re.search(r"^TILES = (\{.*\})$", text, flags=re.M).group(1))  # type: ignore[union-attr]
    for form, name in (("dots + state_grad", "state_grad"), ("pre_grad", "pre_grad"), ("pre_read", "pre_read")):
        if form in best:
            tiles[name] = tuple(best[form]["tiles"])
    def faster(one: str, other: str, switch: str) -> bool:  # a form not timed (a time limit): the file's
        if one in best and other in best:
            return best[one]["ms"] < best[other]["ms"]
        return re.search(rf"^{switch} = (\w+)$", text, flags=re.M).group(1) == "True"  # type: ignore[union-attr]

    forward = faster("pre_read", "maps + read", "TWO_PASS_FORWARD")
    backward = faster("pre_grad", "dots + state_grad", "TWO_PASS_BACKWARD")
    line = "TILES = {" + ", ".join(f'"{k}": {tuple(v)}' for k, v in tiles.items()) + "}"
    text = re.sub(r"^TILES = \{.*\}$", line, text, count=1, flags=re.M)
    text = re.sub(r"^TWO_PASS_FORWARD = \w+$", f"TWO_PASS_FORWARD = {forward}", text, count=1, flags=re.M)
    text = re.sub(r"^TWO_PASS_BACKWARD = \w+$", f"TWO_PASS_BACKWARD = {backward}", text, count=1, flags=re.M)
    SOURCE.write_text(text)
    said = f"{line}; TWO_PASS_FORWARD = {forward}; TWO_PASS_BACKWARD = {backward}"
    delta = DELTA_SOURCE.read_text()
    found = lambda name: ast.literal_eval(re.search(rf"^{name} = (.*)$", delta, flags=re.M).group(1))  # type: ignore[union-attr]  # noqa: E731
    rows, warps, stages = found("ROWS"), found("WARPS"), found("STAGES")
    if "ddl backward" in best:  # (tokens, rows, warps, stages)
        tokens, rows["backward"], warps["backward"], stages = best["ddl backward"]["tiles"]
        delta = re.sub(r"^TOKENS_PER_PROGRAM = \d+", f"TOKENS_PER_PROGRAM = {tokens}", delta, count=1, flags=re.M)
        said += f"; TOKENS_PER_PROGRAM = {tokens}"
    if "ddl forward" in best:  # (rows, warps)
        rows["forward"], warps["forward"] = best["ddl forward"]["tiles"]
    for name, value in (("ROWS", rows), ("WARPS", warps), ("STAGES", stages)):
        line = f"{name} = {value!r}".replace("'", '"')
        delta = re.sub(rf"^{name} = .*$", line, delta, count=1, flags=re.M)
        said += f"; {line}"
    DELTA_SOURCE.write_text(delta)
    return said


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--d-model", type=int, default=1024)
    p.add_argument("--tokens", type=int, default=8 * 2048)
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--out", type=Path)
    p.add_argument("--tiny", action="store_true", help="CPU under Triton's interpreter, a small shape: it runs")
    p.add_argument("--ddl-only", action="store_true", help="time DDL's kernels alone")
    p.add_argument("--apply", action="store_true", help="write the fastest tiles and forms into fused_mhc.py")
    p.add_argument("--apply-from", type=Path, help="an earlier run's tune_kernels.json: apply it, time nothing")
    args = p.parse_args()
    if args.apply_from:  # a run a time limit cut short has its rows but no "best"
        try:
            rows = json.loads(args.apply_from.read_text())["rows"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            print(f"error: --apply-from {args.apply_from}: not a tune_kernels.json ({type(exc).__name__}: {exc})",
                  file=sys.stderr)
            sys.exit(2)
        print(apply(fastest(rows)))
        return
    if not fs.AVAILABLE or not (TINY or torch.cuda.is_available()):
        sys.exit("tune_kernels needs Triton, and CUDA (or --tiny)")
    torch.manual_seed(0)
    M, n, C = (32, 4, 64) if TINY else (args.tokens, 4, args.d_model)
    P = 2 * n + n * n
    dev = dict(device="cpu" if TINY else "cuda")
    x, g = torch.randn(M, n, C, dtype=torch.bfloat16, **dev), torch.randn(M, n, C, dtype=torch.bfloat16, **dev)
    dy = torch.randn(M, C, **dev)  # ∂y_in, fp32 as y_in
    phi = 0.02 * torch.randn(n * C, P, **dev)
    alpha, b_pre = torch.rand(3, **dev), torch.randn(n, **dev)
    h_res = torch.softmax(torch.randn(M, n, n, **dev), -1)
    proj, rinv = fs.maps_forward(x.view(M, n * C), phi, 1e-6)
    h_pre = torch.sigmoid(alpha[0] * proj[:, :n] + b_pre)
    dproj = torch.randn(M, P, **dev)
    state = x.numel() * x.element_size()
    small = M * C * 4  # y_in or ∂y_in, fp32
    # the least each form moves: forward reads the state once and writes y_in; backward reads the state,
    # g and ∂y_in once and writes ∂x
    xs, us = torch.randn(M, C, **dev), torch.randn(M, C, **dev)  # DDL: an fp32 state, the sublayer's output
    w, b = 0.1 * torch.randn(C, **dev), torch.randn(1, **dev)
    # DDL's backward reads x, u and the gradient and writes ∂x and ∂u: x, the gradient and ∂x fp32, u and ∂u bf16
    least = {"forward": state + small, "backward": 3 * state + small, "ddl": 3 * M * C * 4 + 2 * M * C * 2,
             "ddl forward": 2 * M * C * 4 + M * C * 2}
    rows: list[dict[str, Any]] = []
    result = {"device": "cpu (interpreter)" if TINY else torch.cuda.get_device_name(), "torch": torch.__version__,
              "shape": {"tokens": M, "streams": n, "d_model": C},
              "command": " ".join(["python3", "scripts/tune_kernels.py", *sys.argv[1:]]),
              "least_bytes": least, "rows": rows}

    def save() -> None:  # after every row: a time limit keeps what was timed
        if args.out:
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / "tune_kernels.json").write_text(json.dumps(result, indent=1))

    def record(part: str, form: str, tiles: tuple[int, int, int] | None, fn: Callable[[], Any]) -> None:
        row: dict[str, Any] = {"part": part, "form": form, "tiles": tiles}
        try:
            row["ms"] = time_ms(fn, args.reps)
            row["gb_per_s"] = least[part] / row["ms"] / 1e6
        except Exception as exc:  # a launch configuration this GPU can't compile
            row["error"] = str(exc).splitlines()[0][:160]
        rows.append(row)
        print(json.dumps(row), flush=True)
        save()

    def split_forward() -> None:
        fs.maps_forward(x.view(M, n * C), phi, 1e-6)
        fs.read_forward(h_pre, x)

    def split_backward() -> None:
        fs.dots_forward(x, dy)
        fm.state_grad(x, g, h_res, h_pre, dy, phi, proj, rinv, dproj)

    mhc_grid = [(16, 32, 4)] if TINY else list(itertools.product((16, 32, 64), (64, 128), (4, 8, 16)))
    grid = [] if args.ddl_only else mhc_grid
    if grid:
        record("forward", "maps + read", None, split_forward)
    for tiles in grid:
        fm.TILES["state_grad"] = tiles
        record("backward", "dots + state_grad", tiles, split_backward)
    for tiles in grid:
        fm.TILES["pre_grad"] = tiles
        record("backward", "pre_grad", tiles, lambda: fm.pre_grad(x, g, h_res, dy, phi, proj, rinv, alpha, b_pre,
                                                                 dproj))
    for tiles in grid:
        fm.TILES["pre_read"] = tiles
        record("forward", "pre_read", tiles, lambda: fm.pre_read(x, phi, alpha, b_pre, 1e-6))
    # DDL as the model runs it: an fp32 state x and gradient, the sublayer's output u in bf16
    ub = us.to(torch.bfloat16)
    ddl_grid = [(8, 4, 4, 2)] if TINY else itertools.product((8, 16, 32), (1, 2), (4, 8, 16), (1, 2, 3))
    for tokens, r, warps, stages in ddl_grid:
        fd.TOKENS_PER_PROGRAM, fd.ROWS["backward"], fd.WARPS["backward"], fd.STAGES = tokens, r, warps, stages
        record("ddl", "ddl backward", (tokens, r, warps, stages),
               lambda: fd.delta_backward(xs, ub, w, b, w, b, xs, 2.0, 1e-6))
    for r, warps in [(4, 4)] if TINY else itertools.product((1, 2, 4), (4, 8, 16)):
        fd.ROWS["forward"], fd.WARPS["forward"] = r, warps
        record("ddl forward", "ddl forward", (r, warps), lambda: fd.delta_forward(xs, ub, w, b, w, b, 2.0, 1e-6))
    best = fastest(rows)
    for form, row in best.items():
        print(f"{form:<18} best {row['ms']:.3f} ms ({row['gb_per_s']:.0f} GB/s) at {row['tiles']}", flush=True)
    result["best"] = best
    save()
    if args.apply:
        print(apply(best))


if __name__ == "__main__":
    main()
