"""Residual modes: one registered record per mode; no torch.

A record holds every fact about a residual mode that code outside its module
needs, so the parameter count, the memory model's tensor list, the
throughput model's FLOPs and measured step cost, the module and growth's
identity initialisation agree by construction:

- ``multi_stream``: the hidden state carries ``streams`` copies (hc, mhc, mgt);
- ``tensors(c)``: one connection's parameter tensors (element counts, in the
  module's order): the exact parameter count is their sum, the memory model
  counts AdamW's per-tensor state from them;
- ``extra_flops(c)``: forward FLOPs one connection adds a token beyond 6N;
- ``step_cost``: the measured eager step time against ``standard`` on a GPU
  (H100, 350M, docs/bench_architecture.md; hc assumed: mhc less Sinkhorn),
  and on this project's 2-core CPU (the quickstart shape) — the throughput
  model multiplies by it;
- ``compiled_traffic``: under torch.compile the mode's cost is memory traffic,
  not a factor: the bytes a layer·d_model·token it moves beyond ``standard``,
  with a float32 and a bfloat16 stream state (``stream_dtype``), from steps
  measured through ``muse plan run`` on an H100 (docs/bench_plan_run.md, its last section).
  The n-stream state is n·d_model wide while a layer's matmuls grow with
  d_model², so the relative cost falls with width: mhc's bf16 state fits 457 B
  at 350M (24×1024) and 416 B at 1.3B (24×2048) where a factor would have
  been +57% and +34%;
- ``module``, ``identity``, ``activations`` and ``width_rules``: where the
  torch module is (``residual.py``), the function that makes a new block's
  connection pass the state through once its sublayer outputs zero
  (``growth/depth.py``), what autograd keeps for backward in one connection
  (``activation_terms.py``, which the memory model assembles) and how
  Net2Net widens each of its parameters (``growth/width.py``; the AdamW
  moments follow from those rules), as ``module:name`` so this record stays
  torch-free and imports nothing.

To add a residual mode: its module in ``residual.py``, its identity in
``growth/depth.py``, its activation terms in ``activation_terms.py``, its
width rules in ``growth/width.py``, and one record here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    from engines.architecture.config import ModelConfig


def _hc(c: ModelConfig) -> list[int]:
    n, d = c.streams, c.d_model
    return [n, n * n, n, d, d * n, d, 1, 1]  # A_m, A_r, B; W_m, W_r, W_beta; scales s_alpha, s_beta


def _mhc(c: ModelConfig) -> list[int]:
    n, d = c.streams, c.d_model
    return [n * d * n, n * d * n, n * d * n * n, n, n, n * n, 3]  # phi_pre, phi_post, phi_res, biases, alphas


def _ddl(c: ModelConfig) -> list[int]:
    d = c.d_model
    return [d, 1, d, 1]  # gate w_beta, b_beta; value w_v, b_v


def _mixing_flops(c: ModelConfig) -> float:
    n, d = c.streams, c.d_model
    return 2 * n * n * d + 4 * n * d  # H_res x, H_pre x, H_post^T F


def _sinkhorn_flops(c: ModelConfig) -> float:
    return 5 * c.streams * c.streams * 2 * c.sinkhorn_iters


def _ddl_flops(c: ModelConfig) -> float:
    return 6 * c.d_model


@dataclass(frozen=True)
class ResidualMode:
    name: str
    multi_stream: bool
    tensors: Callable[[ModelConfig], list[int]]
    extra_flops: Callable[[ModelConfig], float]
    step_cost_gpu: float
    step_cost_cpu: float
    module: str
    identity: str
    activations: str
    width_rules: tuple[str, ...] = ()
    # under torch.compile: bytes a layer·d_model·token beyond standard's, (float32, bfloat16) stream state
    compiled_traffic: tuple[float, float] = (0.0, 0.0)
    # the same with training.fused_kernels on and a bfloat16 state of 4 streams, where the mode's kernels were
    # timed through `muse plan run` (mhc: fused_mhc as it is now, 620 fitted to 91,599 tok/s on an H100,
    # docs/bench_architecture_mhc_four_h100.json, slower than torch's 440: an earlier form measured 320 on an
    # H200; mgt: fused_streams' maps, read, dots and write, 470 fitted to 102,351 tok/s on an H100,
    # docs/bench_architecture_fused_h100.json, where its torch price, 673, predicted 88,533); None: its
    # kernels are priced as torch's own fusion
    fused_traffic: float | None = None
    # the same replayed from CUDA graphs (training.cuda_graphs), where timed: mhc's fused step is bound by the
    # host's launches without them (300 fitted to 118,111 tok/s on an H100, which it predicts at 118,238;
    # docs/bench_plan_run_graphs_h100.json); ddl's fused_delta (56, fitted to the mean of its three H100
    # invocations beside standard in one call, +7.9%, +5.5% and +7.7%: docs/bench_plan_run_pinned.json and
    # docs/bench_plan_run_session25_h100.json; without graphs it measured +9.7%, level with torch's 74)
    fused_graphs_traffic: float | None = None

    def params(self, c: ModelConfig) -> int:
        """Parameters one connection (around one sublayer) adds."""
        return sum(self.tensors(c))


_RES = "engines.architecture.residual"
_DEPTH = "engines.growth.depth"
_ACT = "engines.architecture.activation_terms"
_WIDTH = "engines.growth.width"
RESIDUAL_MODES: dict[str, ResidualMode] = {m.name: m for m in (
    ResidualMode("standard", False, lambda c: [], lambda c: 0.0, 1.0, 1.0,
                 f"{_RES}:_standard", f"{_DEPTH}:_nothing", f"{_ACT}:_standard"),
    ResidualMode("hc", True, _hc, lambda c: _mixing_flops(c) + 2 * (c.streams - 1) * c.d_model * (c.streams + 2),
                 2.0, 1.719, f"{_RES}:HyperConnection", f"{_DEPTH}:_identity_hc", f"{_ACT}:_hc",
                 (f"{_WIDTH}:HC_RULES",), compiled_traffic=(520.0, 360.0)),  # assumed: mhc's less its Sinkhorn
    ResidualMode("mhc", True, _mhc, lambda c: _mixing_flops(c) + _sinkhorn_flops(c), 2.835, 2.365,
                 f"{_RES}:ManifoldHyperConnection", f"{_DEPTH}:_identity_manifold", f"{_ACT}:_mhc",
                 (f"{_WIDTH}:MHC_RULES",), compiled_traffic=(633.0, 440.0), fused_traffic=620.0,
                 fused_graphs_traffic=300.0),
    ResidualMode("ddl", False, _ddl, _ddl_flops, 1.581, 1.123,
                 f"{_RES}:DeltaResidual", f"{_DEPTH}:_nothing", f"{_ACT}:_ddl", (f"{_WIDTH}:DDL_RULES",),
                 compiled_traffic=(74.0, 74.0), fused_graphs_traffic=56.0),  # no streams: the state is the hidden's
    ResidualMode("mgt", True, lambda c: _mhc(c) + _ddl(c),
                 lambda c: _mixing_flops(c) + _sinkhorn_flops(c) + c.streams * _ddl_flops(c), 3.577, 2.989,
                 f"{_RES}:ManifoldDeltaConnection", f"{_DEPTH}:_identity_manifold", f"{_ACT}:_mgt",
                 (f"{_WIDTH}:MHC_RULES", f"{_WIDTH}:DDL_RULES"), compiled_traffic=(868.0, 673.0),
                 fused_traffic=470.0),
)}


def fused_price(c: ModelConfig, graphs: bool) -> float | None:
    """The bytes a layer · d_model · token ``c``'s fused kernels add to a compiled step as measured through
    ``muse plan run`` (``ResidualMode.fused_graphs_traffic`` where the regions replay CUDA graphs and that was
    timed, else ``fused_traffic``), whether or not ``c`` turns them on; None where its form was never timed
    (priced as torch's own fusion)."""
    if not fused_form(c):
        return None
    mode = RESIDUAL_MODES[c.residual]
    return mode.fused_graphs_traffic if graphs and mode.fused_graphs_traffic is not None else mode.fused_traffic


def fused_faster(c: ModelConfig, graphs: bool) -> bool:
    """Whether ``c``'s fused kernels price below torch's fusion of the same connection (``compiled_traffic``
    for its stream dtype), with the step replayed from CUDA graphs or not: mhc's only with graphs (300 B
    against 440; 620 without, its step bound by the kernels' launches), ddl's only with graphs (56 B against
    74; +9.7% over standard without them, level with torch's), mgt's either way (470 against 673)."""
    price = fused_price(c, graphs)
    return price is not None and price < RESIDUAL_MODES[c.residual].compiled_traffic[c.stream_dtype == "bfloat16"]


def fused_form(c: ModelConfig) -> bool:
    """Whether ``c``'s connections are in the form their fused kernels were measured in through ``muse plan
    run`` (its kernels on or not): ddl's update, and mhc's / mgt's with a bf16 state of 4 streams (the form
    ``fused_mhc.usable`` takes). The one rule that turns the kernels on by default, prices them as measured
    and replays them from CUDA graphs."""
    return c.residual == "ddl" or (c.residual in ("mhc", "mgt") and c.stream_dtype == "bfloat16" and c.streams == 4)


def load(path: str) -> Callable:
    """The object a record names as ``module:name`` (its module may be importing still)."""
    import importlib
    import sys

    module, _, name = path.partition(":")
    return getattr(sys.modules.get(module) or importlib.import_module(module), name)
