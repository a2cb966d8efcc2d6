"""What a compiled training step keeps for backward, against the memory model's eager count.

    python3 scripts/probe_compiled_activations.py [--out docs] [--tiny]

The memory model's activation term (``muse_plan/optimizer/activations.py``) is derived
op by op from what eager autograd saves. ``muse plan run`` compiles a GPU stage's blocks
and loss head (``executor/compiled.py``), and Inductor's partitioner saves less: it
recomputes pointwise work in the backward. This script measures both on the device:
for each residual mode and checkpointing, the bytes a forward leaves allocated
(``torch.cuda.memory_allocated`` after the forward against before it, under bf16
autocast, the logits dropped as the trainer drops them), eager and compiled as the
executor compiles, at two depths. The difference between the depths gives the bytes a
layer keeps; the rest is the head's (the embedding output, the final norm and the
log-probabilities). Each row is printed and written as it finishes
(``<out>/probe_compiled_activations.json``), so a time limit keeps what ran.

``--tiny`` checks the script on CPU (fp32, a small shape; the bytes counted are the
storages saved-tensor hooks see, and compiled regions' saves are among them).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from engines.architecture import DecoderLM, ModelConfig  # noqa: E402
from muse_plan.executor.compiled import compile_model  # noqa: E402
from muse_plan.optimizer.activations import activation_bytes  # noqa: E402

DEPTHS = (1, 3)
# (residual, stream dtype, fused kernels, checkpointing), in the order they matter: a time limit cuts the tail
CONFIGS = [
    ("standard", "float32", "off", "none"), ("mhc", "bfloat16", "on", "none"), ("ddl", "float32", "on", "none"),
    ("mgt", "bfloat16", "on", "none"), ("mhc", "bfloat16", "off", "none"), ("ddl", "float32", "off", "none"),
    ("mgt", "bfloat16", "off", "none"), ("mhc", "float32", "off", "none"), ("hc", "float32", "off", "none"),
    ("standard", "float32", "off", "selective"), ("standard", "float32", "off", "full"),
    ("mhc", "bfloat16", "on", "selective"), ("mhc", "bfloat16", "on", "full"),
    ("ddl", "float32", "on", "selective"), ("mgt", "bfloat16", "on", "selective"),
]


class _Saved:
    __slots__ = ("t", "__weakref__")

    def __init__(self, t: torch.Tensor) -> None:
        self.t = t


def _saved_bytes_cpu(step: Any, own: set[int]) -> int:
    """The unique storages autograd keeps after ``step()`` (the model's own left out)."""
    import weakref

    packed: list = []

    def pack(t: torch.Tensor) -> _Saved:
        s = _Saved(t)
        packed.append(weakref.ref(s))
        return s

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda s: s.t):
        loss = step()
    seen: dict[int, int] = {}
    for ref in packed:
        s = ref()
        if s is not None and s.t.untyped_storage().data_ptr() not in own:
            seen.setdefault(s.t.untyped_storage().data_ptr(), s.t.untyped_storage().nbytes())
    del loss
    return sum(seen.values())


def forward_bytes(config: ModelConfig, micro: int, checkpointing: str, compiled: bool, device: str,
                  cache: Path) -> int:
    """Bytes one forward leaves for its backward (module docstring)."""
    torch.manual_seed(0)
    model = DecoderLM(config).to(device)
    model.set_checkpointing(checkpointing)
    if compiled:
        state = compile_model(model, cache)
        if not state.active:
            raise RuntimeError(f"compile fell back: {state.fallback}")
    idx = torch.randint(0, config.vocab_size, (micro, config.seq_len), device=device)
    targets = torch.randint(0, config.vocab_size, (micro, config.seq_len), device=device)
    cuda = device == "cuda"
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=cuda)

    def step() -> torch.Tensor:
        return model(idx, targets)[1]  # the trainer keeps the loss alone

    with autocast:  # once to compile (and to make every lazy buffer), then measured
        step().backward()
    model.zero_grad(set_to_none=True)
    if not cuda:
        own = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
        return _saved_bytes_cpu(step, own)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    with autocast:
        loss = step()
        torch.cuda.synchronize()
        after = torch.cuda.memory_allocated()
        loss.backward()
    del loss
    model.zero_grad(set_to_none=True)
    return after - before


def probe(base: ModelConfig, micro: int, row: tuple[str, str, str, str], device: str, cache: Path) -> dict[str, Any]:
    residual, stream_dtype, kernels, checkpointing = row
    # one compiled block function serves every row: without a reset, past Dynamo's recompile limit (8)
    # a later row's blocks would silently run eager
    torch._dynamo.reset()
    precision = "bf16" if device == "cuda" else "fp32"
    out: dict[str, Any] = {"residual": residual, "stream_dtype": stream_dtype, "fused_kernels": kernels,
                           "checkpointing": checkpointing, "d_model": base.d_model, "micro_batch": micro,
                           "seq_len": base.seq_len}
    tokens = micro * base.seq_len
    for depth in DEPTHS:
        config = replace(base, n_layers=depth, residual=residual, stream_dtype=stream_dtype, fused_kernels=kernels)
        out[f"model_L{depth}"] = activation_bytes(config, micro, precision, checkpointing, device=device)
        for compiled in (False, True):
            started = time.perf_counter()
            out[f"{'compiled' if compiled else 'eager'}_L{depth}"] = forward_bytes(
                config, micro, checkpointing, compiled, device, cache)
            out[f"{'compiled' if compiled else 'eager'}_L{depth}_s"] = round(time.perf_counter() - started, 1)
    span = DEPTHS[1] - DEPTHS[0]
    for kind in ("model", "eager", "compiled"):
        layer = (out[f"{kind}_L{DEPTHS[1]}"] - out[f"{kind}_L{DEPTHS[0]}"]) / span
        out[f"{kind}_layer_per_token"] = layer / tokens
        out[f"{kind}_rest_per_token"] = (out[f"{kind}_L{DEPTHS[0]}"] - DEPTHS[0] * layer) / tokens
    e, c = out["eager_layer_per_token"], out["compiled_layer_per_token"]
    out["compiled_over_eager_layer"] = c / e if e else None
    out["compiled_over_eager_rest"] = (out["compiled_rest_per_token"] / out["eager_rest_per_token"]
                                       if out["eager_rest_per_token"] else None)
    out["eager_over_model_layer"] = e / out["model_layer_per_token"] if out["model_layer_per_token"] else None
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=ROOT / "docs")
    p.add_argument("--tiny", action="store_true", help="a CPU check of the script (fp32, a small shape)")
    p.add_argument("--widths", default="1024,2048", help="d_model of each pass (heads: d_model / 64)")
    p.add_argument("--wide-configs", type=int, default=5, help="how many CONFIGS the second width runs")
    p.add_argument("--micro", type=int, default=None, help="micro-batch (default 2)")
    p.add_argument("--only", default=None,
                   help="rows to run at the first width, e.g. 'standard:float32:off:none,mhc:bfloat16:on:full'")
    p.add_argument("--append", action="store_true", help="add to an existing JSON in --out")
    args = p.parse_args()
    device = "cpu" if args.tiny else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        sys.exit("needs a GPU (or --tiny for a CPU check)")
    torch.set_float32_matmul_precision("high")
    cache = Path(tempfile.mkdtemp(prefix="muse-inductor-"))
    widths = [64] if args.tiny else [int(w) for w in args.widths.split(",")]
    seq, micro, vocab = (64, 2, 256) if args.tiny else (2048, 2, 32000)
    micro = args.micro or micro
    path = args.out / "probe_compiled_activations.json"
    result: dict[str, Any] = {"command": "python3 scripts/probe_compiled_activations.py" + (" --tiny" if args.tiny else ""),
                              "device": torch.cuda.get_device_name(0) if device == "cuda" else "CPU",
                              "torch": torch.__version__, "rows": []}
    if args.append and path.exists():
        result = json.loads(path.read_text())
    result.setdefault("commands", []).append(" ".join(sys.argv))
    first = CONFIGS if args.only is None else [tuple(r.split(":")) for r in args.only.split(",")]
    args.out.mkdir(parents=True, exist_ok=True)
    for i, width in enumerate(widths):
        base = ModelConfig(vocab_size=vocab, seq_len=seq, n_layers=1, d_model=width, n_heads=max(1, width // 64))
        for row in first if i == 0 else first[:args.wide_configs]:
            if args.tiny and row[2] == "on":
                continue  # the kernels run on a GPU only
            try:
                r = probe(base, micro, row, device, cache)
            except Exception as exc:  # one configuration failing leaves the others
                r = {"row": list(row), "d_model": width, "error": f"{type(exc).__name__}: {exc}"[:500]}
            result["rows"].append(r)
            print(json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items()
                              if not k.endswith(("_L1", "_L3"))}), flush=True)
            path.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
