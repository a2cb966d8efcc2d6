"""Registers and spills of muse's Triton kernels, compiled for a GPU without one.

A kernel whose threads need more than 255 registers keeps the rest on a stack in local
memory (a spill); a memory-bound kernel that spills runs well below the memory's speed.
This script calls the real launchers (``fused_streams``, ``fused_mhc``, ``fused_delta``,
the fused Sinkhorn) on CPU tensors of a model's shape with Triton's launch replaced by a
recorder, then compiles each recorded launch (its argument types, compile-time constants,
warps) for the target GPU with Triton's own compiler and ptxas, which ship in the
``triton`` wheel, and reads each binary's resource usage with ``cuobjdump``. Nothing runs
on a GPU, so nothing is timed: this says which kernels spill and at which tiles, not how
fast they are.

    python scripts/check_kernels.py                        # 350M's shape (C 1024, 4 streams), sm_90
    python scripts/check_kernels.py --d-model 2048 --arch 90 --out docs

Needs ``triton`` (not in ``make test``'s install: it comes with a CUDA build of torch, or
``pip install triton``). Writes ``<out>/check_kernels.json`` when ``--out`` is given.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

DTYPES = {"torch.float32": "fp32", "torch.bfloat16": "bf16", "torch.float16": "fp16", "torch.float64": "fp64",
          "torch.int64": "i64", "torch.int32": "i32"}


def record_launches(d_model: int, streams: int, tokens: int) -> list[dict[str, Any]]:
    """Each launcher once at the shape, Triton's launch swapped for a recorder: (kernel, args, kwargs)."""
    import torch
    from triton.runtime.jit import JITFunction

    from engines.architecture import fused_delta as fd
    from engines.architecture import fused_mhc as fm
    from engines.architecture import fused_streams as fs
    from engines.architecture import residual as r

    launches: list[dict[str, Any]] = []

    def run(self, *args, grid, warmup, **kwargs):  # type: ignore[no-untyped-def]
        launches.append({"kernel": self, "args": args, "kwargs": kwargs})

    real, JITFunction.run = JITFunction.run, run
    try:
        M, n, C, P = tokens, streams, d_model, streams * streams + 2 * streams
        bf16, f32 = dict(dtype=torch.bfloat16), dict(dtype=torch.float32)
        x, g = torch.randn(M, n, C, **bf16), torch.randn(M, n, C, **bf16)
        h, h_post, h_res = torch.rand(M, n), torch.rand(M, n), torch.rand(M, n, n)
        y, dy = torch.randn(M, C, **bf16), torch.randn(M, C, **f32)
        phi, proj, rinv, dproj = torch.randn(n * C, P), torch.randn(M, P), torch.rand(M), torch.randn(M, P)
        fs.read_forward(h, x)
        fs.dots_forward(x, dy)
        fs.write_forward(h_res, x, h_post, y)
        fs.write_backward(h_res, x, h_post, y, g)
        fs.maps_forward(x.view(M, n * C), phi, 1e-6)
        fs.maps_backward(x.view(M, n * C), phi, proj, rinv, dproj)
        fm.state_grad(x, g, h_res, h, dy, phi, proj, rinv, dproj)
        alpha, b_pre = torch.rand(3), torch.randn(n)
        fm.pre_read(x, phi, alpha, b_pre, 1e-6)
        fm.pre_grad(x, g, h_res, dy, phi, proj, rinv, alpha, b_pre, dproj)
        xs, us = torch.randn(M, C, **f32), torch.randn(M, C, **f32)  # DDL's fused update runs in fp32
        w, b = torch.randn(C), torch.randn(1)
        fd.delta_forward(xs, us, w, b, w, b, 2.0, 1e-6)
        fd.delta_backward(xs, us, w, b, w, b, xs, 2.0, 1e-6)
        logits = torch.randn(M, n, n)
        r._launch(r._sinkhorn_fwd_kernel, logits, torch.empty_like(logits), iters=20)
        r._launch(r._sinkhorn_bwd_kernel, logits, logits, torch.empty_like(logits),
                  logits.new_empty((20, *logits.shape)), iters=20)
    finally:
        JITFunction.run = real
    return launches


def _type(value: Any) -> str:
    import torch

    if isinstance(value, torch.Tensor):
        return "*" + DTYPES[str(value.dtype)]
    if isinstance(value, bool):
        return "i1"
    return "i32" if isinstance(value, int) else "fp32"


def compile_one(launch: dict[str, Any], arch: int) -> dict[str, Any]:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn, args, kwargs = launch["kernel"], launch["args"], dict(launch["kwargs"])
    options = {k: kwargs.pop(k) for k in ("num_warps", "num_stages") if k in kwargs}
    names = fn.arg_names
    values = dict(zip(names, args)) | kwargs
    constexprs = {p.name for p in fn.params if p.is_constexpr}
    signature = {name: "constexpr" if name in constexprs else _type(values[name]) for name in names}
    consts = {(names.index(name),): values[name] for name in constexprs}
    binary = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=consts),
                            target=GPUTarget("cuda", arch, 32), options=options)
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(binary.asm["cubin"])
    usage = subprocess.run([str(tool), "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    os.unlink(f.name)
    fields = dict(part.split(":") for part in next(l for l in usage.splitlines() if "REG:" in l).split()
                  if ":" in part and part.split(":")[1].isdigit())
    shown = {k: values[k] for k in sorted(constexprs) if isinstance(values[k], (int, bool))}
    return {"kernel": fn.__name__, "num_warps": options.get("num_warps", 4), "constants": shown,
            "registers": int(fields["REG"]), "stack_bytes": int(fields["STACK"]), "shared_bytes": int(fields["SHARED"])}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--d-model", type=int, default=1024)
    p.add_argument("--streams", type=int, default=4)
    p.add_argument("--arch", type=int, default=90, help="compute capability ×10: 90 Hopper, 80 Ampere")
    p.add_argument("--out", type=Path, help="write check_kernels.json here")
    args = p.parse_args()
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    warnings.filterwarnings("ignore")
    try:
        import triton  # noqa: F401
    except ImportError:
        sys.exit("check_kernels.py needs triton (pip install triton); it compiles the kernels, it runs none")
    rows = [compile_one(launch, args.arch) for launch in record_launches(args.d_model, args.streams, 256)]
    print(f"sm_{args.arch}, d_model {args.d_model}, {args.streams} streams: registers a thread (255 at most) "
          "and the stack a spill needs (0: no spill)\n")
    print("| kernel | warps | constants | registers | stack bytes (spills) |\n|---|---|---|---|---|")
    for row in rows:
        consts = ", ".join(f"{k} {v}" for k, v in row["constants"].items())
        print(f"| `{row['kernel']}` | {row['num_warps']} | {consts} | {row['registers']} | {row['stack_bytes']} |")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "check_kernels.json").write_text(json.dumps(
            {"command": "python scripts/check_kernels.py " + " ".join(sys.argv[1:]), "arch": args.arch,
             "d_model": args.d_model, "streams": args.streams, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
