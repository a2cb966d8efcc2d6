"""The memory model against the real thing.

The activation term is checked against what autograd really saves on the
architecture engine's ``DecoderLM``: ``saved_tensors_hooks`` see every tensor an
op saves for backward; we count unique storages (views and shared inputs once)
and leave out the model's parameters and buffers (the ``weights`` term). What
is compared, per checkpointing mode:
- none: everything the forward saves;
- selective / full: what the forward saves (the checkpoints' inputs, the
  outputs their consumers save) plus the largest recomputed segment (one
  SwiGLU hidden, one block), measured by running that segment's forward on the
  input the checkpoint kept, under the same hooks and autocast; storages
  already counted are not counted again.
Under autocast, the compute-dtype copies of parameters that autocast's cache
holds for the step are counted too (found by watching ``_to_copy`` of a
parameter in a dispatch mode, alive at the end of the forward): autograd saves
them without checkpointing and the cache holds them with it.
"""

from __future__ import annotations

import math
import subprocess
import sys
import weakref
from contextlib import nullcontext

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from engines.architecture.config import RESIDUAL_NAMES, ModelConfig, param_count
from engines.architecture.model import DecoderLM
from muse_plan.optimizer import memory
from muse_plan.optimizer.activations import activation_bytes, activation_detail
from muse_plan.optimizer.config import GenerationConfig, LoraConfig, TrainConfig

SHAPES = {
    "mha": dict(vocab_size=96, seq_len=32, n_layers=2, d_model=64, n_heads=4),
    "gqa": dict(vocab_size=80, seq_len=24, n_layers=2, d_model=96, n_heads=6, n_kv_heads=2,
                streams=3, sinkhorn_iters=5),
}
MICRO = 2


# ---- measuring what autograd saves ------------------------------------------------------

class _ParamCasts(TorchDispatchMode):
    """Weak references to every cast of a parameter (autocast's cached weight copies)."""

    def __init__(self, param_ptrs: set[int]) -> None:
        super().__init__()
        self.ptrs, self.casts = param_ptrs, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is torch.ops.aten._to_copy.default and args[0].untyped_storage().data_ptr() in self.ptrs:
            self.casts.append(weakref.ref(out))
        return out


class _Saved:
    """What a pack hook hands autograd: alive as long as autograd keeps the tensor."""

    __slots__ = ("t", "__weakref__")

    def __init__(self, t: torch.Tensor) -> None:
        self.t = t


class _Storages:
    """Unique storages of the tensors autograd still holds, the model's own left out.

    A pack hook also runs for tensors that no graph keeps (a checkpoint saving
    the inputs of a block none of whose inputs or weights needs a gradient):
    only what is still alive when the total is read counts."""

    def __init__(self, own: set[int]) -> None:
        self.own, self.extra, self.packed = own, {}, []

    def add(self, t: torch.Tensor) -> None:
        self._count(self.extra, t)

    def _count(self, into: dict[int, int], t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        if storage.data_ptr() not in self.own:
            into.setdefault(storage.data_ptr(), storage.nbytes())

    def pack(self, t: torch.Tensor) -> _Saved:
        saved = _Saved(t)
        self.packed.append(weakref.ref(saved))
        return saved

    @staticmethod
    def unpack(saved: _Saved) -> torch.Tensor:
        return saved.t

    @property
    def bytes(self) -> dict[int, int]:
        alive = dict(self.extra)
        for ref in self.packed:
            saved = ref()
            if saved is not None:
                self._count(alive, saved.t)
        return alive

    @property
    def total(self) -> int:
        return sum(self.bytes.values())


def _segments(model: DecoderLM) -> tuple[list, list]:
    """Record each recomputed segment's function and the input its checkpoint kept."""
    seen: list = []
    if model.checkpointing == "full":
        handles = [b.register_forward_pre_hook(lambda m, args: seen.append((m, args))) for b in model.blocks]
    elif model.checkpointing == "selective":
        handles = [b.mlp.register_forward_pre_hook(lambda m, args: seen.append((m.hidden, args)))
                   for b in model.blocks]
    else:
        handles = []
    return seen, handles


def _owner(fn) -> nn.Module:
    """The module a recorded segment runs: a block, or the MLP whose ``hidden`` it is."""
    return fn if isinstance(fn, nn.Module) else fn.__self__


def measured_activations(model: DecoderLM, micro: int, precision: str) -> int:
    cfg = model.config
    own = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    idx = torch.randint(0, cfg.vocab_size, (micro, cfg.seq_len))
    targets = torch.randint(0, cfg.vocab_size, (micro, cfg.seq_len))
    saved = _Storages(own)
    segments, handles = _segments(model)
    casts = _ParamCasts(own)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else nullcontext()
    with autocast:
        with torch.autograd.graph.saved_tensors_hooks(saved.pack, saved.unpack), casts:
            _, loss = model(idx, targets)
        for handle in handles:
            handle.remove()
        for ref in casts.casts:
            if ref() is not None:
                saved.add(ref())
        forward = saved.total
        recomputed = 0
        for fn, args in segments:
            if not any(a.requires_grad for a in args if isinstance(a, torch.Tensor)) and \
                    not any(p.requires_grad for p in _owner(fn).parameters()):
                continue  # a frozen segment: its checkpoint kept nothing, backward never recomputes it
            segment = _Storages(own | set(saved.bytes))
            with torch.autograd.graph.saved_tensors_hooks(segment.pack, segment.unpack):
                out = fn(*args)  # kept while counting: its graph holds what the segment saved
            recomputed = max(recomputed, segment.total)
            del out
    del loss
    return forward + recomputed


def _model(shape: str, residual: str, checkpointing: str) -> DecoderLM:
    torch.manual_seed(0)
    model = DecoderLM(ModelConfig(residual=residual, **SHAPES[shape]))
    model.set_checkpointing(checkpointing)
    return model


# ---- activations: formula vs autograd --------------------------------------------------

@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("checkpointing", ["none", "selective", "full"])
@pytest.mark.parametrize("residual", RESIDUAL_NAMES)
def test_activation_formula_matches_what_autograd_saves(shape, precision, checkpointing, residual):
    model = _model(shape, residual, checkpointing)
    measured = measured_activations(model, MICRO, precision)
    predicted = activation_bytes(model.config, MICRO, precision, checkpointing, device="cpu")
    assert predicted == pytest.approx(measured, rel=0.05)


def test_activation_detail_sums_and_scales_with_micro_batch():
    cfg = ModelConfig(residual="mhc", **SHAPES["mha"])
    detail = activation_detail(cfg, 2, "bf16", "none", device="cpu")
    assert sum(detail.values()) == activation_bytes(cfg, 2, "bf16", "none", device="cpu")
    assert {"tokens", "head", "norms", "attention", "mlp", "residual", "weight_casts"} <= set(detail)
    # everything but the per-forward weight copies is per token
    fixed = detail["weight_casts"]
    once, twice = (activation_bytes(cfg, m, "bf16", "none", device="cpu") - fixed for m in (1, 2))
    assert twice - once < once  # the φ copies are per forward, not per token
    assert activation_bytes(cfg, 4, "bf16", "none", device="cpu") > activation_bytes(cfg, 2, "bf16", "none", device="cpu")


def test_checkpointing_orders_activations():
    cfg = ModelConfig.from_scale("125M", 32000, 1024)
    none, selective, full = (activation_bytes(cfg, 4, "bf16", mode) for mode in ("none", "selective", "full"))
    assert none > selective > full


def test_cuda_differs_only_where_the_kernels_do():
    cfg = ModelConfig(residual="mhc", **SHAPES["mha"])  # n = 4: the fused Sinkhorn saves only its logits
    cpu = activation_detail(cfg, 2, "fp32", "none", device="cpu")
    cuda = activation_detail(cfg, 2, "fp32", "none", device="cuda")
    n, iters, tokens, layers = cfg.streams, cfg.sinkhorn_iters, 2 * cfg.seq_len, cfg.n_layers
    loop = (2 * iters * (n * n + n) + n * n) * 4
    fused = n * n * 4 + n * n * 4  # the op's saved logits, and H_res which mix_streams then saves
    assert cpu["residual"] - cuda["residual"] == 2 * layers * tokens * (loop - fused)
    wo_copy = cfg.d_model * 4  # CUDA's fp32 (memory-efficient) attention writes (B, T, H, hd): a view
    philox = 16  # its saved RNG seed and offset
    assert cpu["attention"] - cuda["attention"] == layers * (tokens * wo_copy - philox)


def test_cuda_autocast_runs_norms_and_nll_in_fp32():
    """Measured on an H200 (PyTorch 2.11): F.normalize's norm comes back fp32 and so does k;
    log_softmax stays bf16 while nll_loss reads an fp32 copy."""
    cfg = ModelConfig(residual="ddl", **SHAPES["mha"])
    cpu = activation_detail(cfg, 2, "bf16", "none", device="cpu")
    cuda = activation_detail(cfg, 2, "bf16", "none", device="cuda")
    tokens, layers, C = 2 * cfg.seq_len, cfg.n_layers, cfg.d_model
    assert cuda["head"] - cpu["head"] == tokens * cfg.vocab_size * 2
    assert cuda["residual"] - cpu["residual"] == 2 * layers * tokens * (2 * C + 4)
    assert cuda["attention"] - cpu["attention"] == layers * 16


# ---- LoRA activations: a frozen base in the compute dtype with adapters -------------------

class _LoraLinear(nn.Module):
    """Frozen base + B(A x), the adapters in fp32 as the executor keeps trainable weights."""

    def __init__(self, base: nn.Linear, rank: int) -> None:
        super().__init__()
        self.base = base
        self.a = nn.Parameter(torch.randn(rank, base.in_features) * 0.02)
        self.b = nn.Parameter(torch.randn(base.out_features, rank) * 0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + F.linear(F.linear(x, self.a), self.b)


def _lora_model(cfg: ModelConfig, lora: LoraConfig, precision: str, checkpointing: str) -> DecoderLM:
    torch.manual_seed(0)
    model = DecoderLM(cfg).to(torch.bfloat16 if precision == "bf16" else torch.float32)
    model.requires_grad_(False)
    adapted = memory.lora_layers(cfg, lora)
    for block in model.blocks[cfg.n_layers - adapted:]:
        for target in lora.target_modules:
            owner = block.attn if target in ("q_proj", "k_proj", "v_proj", "o_proj") else block.mlp
            name = memory.MODULE_NAMES[target]
            setattr(owner, name, _LoraLinear(getattr(owner, name), lora.rank))
    model.set_checkpointing(checkpointing)
    return model


LORAS = {
    "qv-half": LoraConfig(rank=4, target_modules=("q_proj", "v_proj"), layers_fraction=0.5),
    "all": LoraConfig(rank=8, target_modules=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                               "up_proj", "down_proj")),
}


@pytest.mark.parametrize("lora", list(LORAS))
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("checkpointing", ["none", "selective", "full"])
def test_lora_activations_match_autograd(lora, precision, checkpointing):
    cfg = ModelConfig(n_layers=4, **{k: v for k, v in SHAPES["gqa"].items() if k != "n_layers"})
    model = _lora_model(cfg, LORAS[lora], precision, checkpointing)
    measured = measured_activations(model, MICRO, precision)
    predicted = activation_bytes(cfg, MICRO, precision, checkpointing, device="cpu", lora=LORAS[lora])
    assert predicted == pytest.approx(measured, rel=0.05)


@pytest.mark.parametrize("checkpointing", ["none", "full"])
@pytest.mark.parametrize("residual", [r for r in RESIDUAL_NAMES if r != "standard"])
def test_lora_activations_of_other_residuals_are_an_upper_bound(residual, checkpointing):
    """Their connections are priced as in full training (fp32 stream, trainable gates)."""
    cfg = ModelConfig(residual=residual, n_layers=4, **{k: v for k, v in SHAPES["mha"].items() if k != "n_layers"})
    lora = LORAS["qv-half"]
    measured = measured_activations(_lora_model(cfg, lora, "bf16", checkpointing), MICRO, "bf16")
    predicted = activation_bytes(cfg, MICRO, "bf16", checkpointing, device="cpu", lora=lora)
    assert measured <= predicted < 3.5 * measured


# ---- weights, gradients, optimizer: exactly the real tensors ------------------------------

def _tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


@pytest.mark.parametrize("residual", RESIDUAL_NAMES)
def test_weights_gradients_and_adamw_state_equal_the_real_tensors(residual):
    cfg = ModelConfig(residual=residual, **SHAPES["gqa"])
    torch.manual_seed(0)
    model = DecoderLM(cfg)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    idx = torch.randint(0, cfg.vocab_size, (MICRO, cfg.seq_len))
    _, loss = model(idx, idx)
    loss.backward()
    optimizer.step()
    params = list(model.parameters())
    # AdamW's per-tensor ``step`` counters are 0-dim host tensors: not counted (see memory.py)
    moments = [v for state in optimizer.state.values() for k, v in state.items() if k != "step"]
    # with accumulation every .grad is alive at the backward's peak (see the test below for one step)
    cfg_train = TrainConfig(model=cfg, micro_batch=MICRO, grad_accum=2, precision="fp32")
    estimate = memory.estimate(cfg_train, device="cpu")
    assert estimate.weights == _tensor_bytes(params)
    assert estimate.gradients == _tensor_bytes(p.grad for p in params)
    assert estimate.optimizer == _tensor_bytes(moments)
    assert sorted(memory.parameter_tensors(cfg)) == sorted(p.numel() for p in params)


def test_breakdown_total_items_and_dict():
    b = memory.MemoryBreakdown(1, 2, 3, 4, 5, 6, 7, host=100)
    assert b.total == 28  # host is not on the device
    assert [name for name, _ in b.items()] == ["weights", "gradients", "optimizer", "activations",
                                               "transient", "generation", "overhead", "host"]
    assert b.as_dict()["host"] == 100 and sum(b.as_dict().values()) == 128


def test_cpu_has_no_overhead_and_cuda_does():
    cfg = TrainConfig(model=ModelConfig(**SHAPES["mha"]), micro_batch=2)
    assert memory.estimate(cfg, device="cpu").overhead == 0
    assert memory.estimate(cfg, device="cuda").overhead >= memory.CUDA_CONTEXT_BYTES


# ---- sharding, offload, 8-bit optimizer on hand values ------------------------------------

SMALL = ModelConfig(vocab_size=1000, seq_len=16, n_layers=2, d_model=64, n_heads=4)
P = param_count(SMALL)  # 2·(4·64² + 3·64·192 + 2·64) + 1000·64 + 64 = 170_816


def _estimate(**kw) -> memory.MemoryBreakdown:
    kw.setdefault("grad_accum", 2)  # gradients alive through the backward: the terms are whole
    return memory.estimate(TrainConfig(model=SMALL, micro_batch=1, **kw), device="cuda")


def test_hand_parameter_count():
    assert P == 2 * (4 * 64 * 64 + 3 * 64 * 192 + 2 * 64) + 1000 * 64 + 64 == 170_816


@pytest.mark.parametrize("sharding, weights, grads, optim", [
    ("none", 4 * P, 2 * 4 * P, 8 * P),  # several processes: Accelerate's DDP and its bucket copy
    ("zero1", 4 * P, 2 * 4 * P, 8 * P // 4),
    ("zero2", 4 * P, 4 * P // 4, 8 * P // 4),
    ("zero3", 4 * P // 4, 4 * P // 4, 8 * P // 4),
    ("fsdp", 4 * P // 4, 4 * P // 4, 8 * P // 4),
    ("ddp", 4 * P, 2 * 4 * P, 8 * P),  # the reducer's bucket copy of the gradients
])
def test_sharding_divides_what_it_should(sharding, weights, grads, optim):
    b = _estimate(sharding=sharding, world_size=4)
    assert (b.weights, b.gradients, b.optimizer) == (weights, grads, optim)


def test_one_micro_step_overlaps_gradients_with_activations():
    """set_to_none: .grad grows while activations are freed, so the peak is the larger of
    the backward's start (activations, the tied head's gradient) and the optimizer step."""
    cfg = TrainConfig(model=ModelConfig.from_scale("1.3B", 32000, 2048), micro_batch=2, precision="bf16")
    one, accum = memory.estimate(cfg), memory.estimate(cfg.with_(grad_accum=2))
    head_grad = 4 * 32000 * cfg.model.d_model
    assert one.gradients == head_grad and accum.gradients == 4 * param_count(cfg.model)
    assert accum.total - one.total == pytest.approx((accum.gradients - head_grad) * (1 + memory.FRAGMENTATION), rel=1e-6)
    # few activations: the optimizer step is the peak (gradients + foreach AdamW's sqrt(v))
    short = ModelConfig.from_scale("1.3B", 32000, 128)
    step = memory.estimate(TrainConfig(model=short, micro_batch=1, checkpointing="full"))
    assert step.activations + step.gradients + step.transient == 2 * 4 * param_count(short)


def test_zero3_gathers_one_layer_in_transient():
    layer = 4 * (4 * 64 * 64 + 3 * 64 * 192 + 2 * 64)
    base = _estimate(sharding="zero2", world_size=4, optimizer="adamw_8bit")
    gathered = _estimate(sharding="zero3", world_size=4, optimizer="adamw_8bit")
    assert gathered.transient - base.transient == layer


def test_offload_moves_bytes_to_host():
    plain = _estimate()
    opt = _estimate(offload="optimizer")
    # the moments, HostAdamW's fp32 master and its gradient buffer; the device keeps weights and gradients
    assert (opt.optimizer, opt.host, opt.weights, opt.gradients) == (0, 8 * P + 4 * P + 4 * P, 4 * P, 4 * P)
    assert opt.transient <= plain.transient  # no foreach temporaries on the device
    params = _estimate(offload="parameters")
    layer = 4 * (4 * 64 * 64 + 3 * 64 * 192 + 2 * 64)
    assert (params.optimizer, params.weights, params.host) == (0, layer, 8 * P + 4 * P)
    assert params.total < opt.total < plain.total


def test_adamw_8bit_state():
    b = _estimate(optimizer="adamw_8bit")
    big = [n for n in memory.parameter_tensors(SMALL) if n >= 4096]
    small = [n for n in memory.parameter_tensors(SMALL) if n < 4096]
    expect = sum(2 * n + 2 * 4 * math.ceil(n / 256) + 2 * 4 * 256 for n in big) + 8 * sum(small)
    assert b.optimizer == expect
    big_model = TrainConfig(model=ModelConfig.from_scale("7B", 32000, 2048), optimizer="adamw_8bit")
    per_param = memory.estimate(big_model).optimizer / param_count(big_model.model)
    assert 2.0 < per_param < 2.05  # vs 8 for AdamW


# ---- LoRA and QLoRA by hand ---------------------------------------------------------------

def test_lora_counts_by_hand():
    lora = LoraConfig(rank=8, target_modules=("q_proj", "v_proj"))
    cfg = TrainConfig(model=SMALL, lora=lora)
    # per layer: q (64→64) and v (64→64): 8·(64+64) each; 2 layers
    assert memory.lora_param_count(cfg) == 2 * 2 * 8 * (64 + 64) == 4096
    assert memory.trainable_param_count(cfg) == 4096
    gqa = ModelConfig(vocab_size=1000, seq_len=16, n_layers=4, d_model=64, n_heads=4, n_kv_heads=2)
    half = TrainConfig(model=gqa, lora=LoraConfig(rank=4, target_modules=("v_proj", "down_proj"),
                                                  layers_fraction=0.5))
    # v: 64 → 2·16 = 32; down: 192 → 64; the last 2 of 4 layers
    assert memory.lora_param_count(half) == 2 * (4 * (64 + 32) + 4 * (192 + 64))
    assert memory.trainable_param_count(TrainConfig(model=SMALL)) == P


def test_lora_memory_terms():
    lora = LoraConfig(rank=8, target_modules=("q_proj", "v_proj"))
    b = _estimate(lora=lora, precision="bf16")
    assert b.weights == 2 * P + 4 * 4096  # bf16 base, fp32 adapters
    assert (b.gradients, b.optimizer) == (4 * 4096, 8 * 4096)


def test_qlora_base_bytes():
    b = _estimate(lora=LoraConfig(rank=8, target_modules=("q_proj",), quantize_base="4bit"), precision="bf16")
    linear = 2 * (4 * 64 * 64 + 3 * 64 * 192)  # the blocks' projections in NF4
    rest = P - linear  # embedding and norms stay bf16
    nf4 = linear * (0.5 + 1 / 64 + 4 / (64 * 256))
    assert b.weights == math.ceil(nf4) + 2 * rest + 4 * 2 * 8 * (64 + 64)


def test_unknown_lora_target_is_refused():
    with pytest.raises(ValueError, match="accepted: q_proj"):
        memory.lora_param_count(TrainConfig(model=SMALL, lora=LoraConfig(target_modules=("qkv",))))


# ---- generation -----------------------------------------------------------------------------

def test_generation_kv_cache_by_hand():
    gen = GenerationConfig(prompts=2, group_size=4, prompt_tokens=10, completion_tokens=20, reference_model=False)
    cfg = TrainConfig(model=SMALL, micro_batch=1, grad_accum=2, precision="bf16", generation=gen)
    kv = 2 * 2 * 4 * 16 * (2 * 4) * (10 + 20) * 2  # k and v · layers · kv heads · head dim · seqs · tokens · bf16
    logits = 2 * 4 * 1000 * (2 + 4)
    assert memory.sampling_bytes(cfg) == kv + logits == 170_880
    assert memory.reference_bytes(cfg) == 0
    with_ref = cfg.with_(generation=GenerationConfig(prompts=2, group_size=4, prompt_tokens=10, completion_tokens=20))
    assert memory.reference_bytes(with_ref) == 2 * P  # a bf16 copy
    # under LoRA the reference is the model with its adapters off; a FSDP-sharded copy stays fp32
    assert memory.reference_bytes(with_ref.with_(lora=LoraConfig())) == 0
    assert memory.reference_bytes(with_ref.with_(sharding="fsdp", world_size=2)) == 4 * P


def test_sampling_and_training_peaks_do_not_add_up():
    """The engine samples, frees the cache, then trains: the estimate's generation term is the
    reference plus what sampling needs beyond the training step's activations and buffers."""
    def gen(group: int, ref: bool = False) -> GenerationConfig:
        return GenerationConfig(prompts=2, group_size=group, prompt_tokens=10, completion_tokens=20,
                                reference_model=ref)

    small = _estimate(precision="bf16", generation=gen(4))  # sampling fits inside the training peak
    assert small.generation == 0
    big_cfg = TrainConfig(model=SMALL, micro_batch=1, grad_accum=2, precision="bf16", generation=gen(512))
    big = memory.estimate(big_cfg, device="cuda")
    assert big.generation == memory.sampling_bytes(big_cfg) - big.activations - big.transient > 0
    assert _estimate(precision="bf16", generation=gen(4, ref=True)).generation == 2 * P


def test_no_generation_without_sampling():
    assert _estimate().generation == 0


# ---- import stays light ---------------------------------------------------------------------

def test_memory_model_imports_without_torch():
    probe = ("import sys, muse_plan.optimizer.memory, muse_plan.optimizer.activations\n"
             "print(','.join(m for m in ('torch', 'numpy') if m in sys.modules) or 'none')\n")
    from conftest import ROOT

    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "none"


@pytest.mark.parametrize("checkpointing", ["none", "full"])
@pytest.mark.parametrize("residual", ["mhc", "mgt"])
def test_a_bf16_stream_state_is_priced_as_autograd_saves_it(checkpointing, residual):
    torch.manual_seed(0)
    model = DecoderLM(ModelConfig(residual=residual, stream_dtype="bfloat16", **SHAPES["mha"]))
    model.set_checkpointing(checkpointing)
    measured = measured_activations(model, MICRO, "bf16")
    predicted = activation_bytes(model.config, MICRO, "bf16", checkpointing, device="cpu")
    assert predicted == pytest.approx(measured, rel=0.05)


# ---- compiled training (torch.compile through muse plan run) -------------------------------

def _probe_rows() -> list[dict]:
    import json
    from pathlib import Path

    data = json.loads((Path(__file__).resolve().parent.parent / "docs" / "probe_compiled_activations.json").read_text())
    assert "H100" in data["device"]
    return [r for r in data["rows"] if "error" not in r]


def test_the_compiled_shares_are_the_probes_measurements():
    """activations.COMPILED_BLOCK_SHARE holds what scripts/probe_compiled_activations.py measured on an H100:
    of the per-token bytes the model derives for a block, the share a compiled block kept (its weights' bf16
    casts, a per-layer constant, taken out of both), within 0.015 of every row of its form and checkpointing,
    whatever the width (1024, 2048) and micro-batch (2, 4); full checkpointing's forward kept each block's
    input alone, casts and all recomputed."""
    from muse_plan.optimizer.activations import COMPILED_BLOCK_SHARE, connection_form, matmul_weight_elements

    checked = set()
    for r in _probe_rows():
        c = ModelConfig(vocab_size=32000, seq_len=r["seq_len"], n_layers=1, d_model=r["d_model"],
                        n_heads=r["d_model"] // 64, residual=r["residual"], stream_dtype=r["stream_dtype"],
                        fused_kernels=r["fused_kernels"])
        tokens = r["micro_batch"] * r["seq_len"]
        casts = 2 * (matmul_weight_elements(c) - c.vocab_size * c.d_model) / tokens  # one layer's, a token
        if r["checkpointing"] == "full":  # the block's input: the n-stream state in its dtype
            assert r["compiled_layer_per_token"] == c.n_streams * c.d_model * (2 if c.n_streams > 1 and
                                                                                c.stream_dtype == "bfloat16" else 4)
            continue
        share = (r["compiled_layer_per_token"] - casts) / (r["model_layer_per_token"] - casts)
        key = (connection_form(c), r["checkpointing"])
        assert share == pytest.approx(COMPILED_BLOCK_SHARE[key], abs=0.015), key
        checked.add(key)
    assert len(checked) == len(COMPILED_BLOCK_SHARE)


def test_the_compiled_loss_head_keeps_its_logits_in_the_compute_dtype():
    """The probe's bytes outside the blocks a token, less the embedding and head weights' bf16 casts and the
    token ids: within 3% of the compiled head's formula at both widths (the eager head keeps 2.7-3× as
    much: fp32 log-probabilities beside bf16 ones)."""
    from engines.architecture.activation_terms import Numerics
    from muse_plan.optimizer.activations import _compiled_head, _head

    for r in _probe_rows():
        c = ModelConfig(vocab_size=32000, seq_len=r["seq_len"], n_layers=1, d_model=r["d_model"],
                        n_heads=r["d_model"] // 64)
        tokens = r["micro_batch"] * r["seq_len"]
        rest = r["compiled_rest_per_token"] - 2 * c.vocab_size * c.d_model / tokens - 16
        assert _compiled_head(c, Numerics(2, True)) == pytest.approx(rest, rel=0.03)
        assert _head(c, Numerics(2, True)) > 2.5 * rest


def test_compiled_activations_apply_on_cuda_and_not_to_lora():
    cfg = ModelConfig.from_scale("125M", vocab_size=32000, seq_len=512, residual="mhc", stream_dtype="bfloat16")
    eager = activation_bytes(cfg, 4, "bf16", "none")
    compiled = activation_bytes(cfg, 4, "bf16", "none", compiled=True, compiled_head=True)
    assert compiled < 0.8 * eager
    assert activation_bytes(cfg, 4, "bf16", "none", device="cpu", compiled=True) == \
        activation_bytes(cfg, 4, "bf16", "none", device="cpu")  # measured on CUDA only
    lora = LoraConfig()
    assert activation_bytes(cfg, 4, "bf16", "none", lora=lora, compiled=True) == \
        activation_bytes(cfg, 4, "bf16", "none", lora=lora)  # LoRA's compiled stages: not measured
    full = activation_detail(cfg, 4, "bf16", "full", compiled=True)
    assert full["weight_casts"] == 2 * cfg.vocab_size * cfg.d_model  # the blocks cast again when recomputed
    assert full["streams"] == activation_detail(cfg, 4, "bf16", "full")["streams"]
    # an unmeasured form is priced as eager; one not measured with selective checkpointing as without it
    from dataclasses import replace

    from muse_plan.optimizer.activations import compiled_block_share

    assert compiled_block_share(replace(cfg, residual="mgt", stream_dtype="float32"), "none") == 1.0
    assert compiled_block_share(replace(cfg, residual="ddl"), "selective") == compiled_block_share(
        replace(cfg, residual="ddl"), "none")


def _plan_run_peak_predicted(base: str, flags: list[str], graphs: str, shape: str, seq_len: int, batch: int,
                             compile_: str = "on"):
    """The memory model's peak without the context's overhead (GiB) for a bench_plan_run plan, as the
    executor resolves it, and its config."""
    import sys as _sys
    from pathlib import Path

    _sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
    from bench_plan_run import plan

    from muse_plan.executor.settings import resolve, train_config
    from muse_plan.plan.io import spec_from_dict

    layers, d_model = (int(v) for v in shape.replace(",", "").split()[0:4:3])
    data = plan("p", base, compile_, {"layers": layers, "d_model": d_model, "n_heads": 16}, seq_len, batch, 10, "bf16",
                "1xH100-80GB", "bfloat16" if "bf16" in flags else "float32", "auto", "on" if "fused" in flags else "off",
                graphs)
    spec = spec_from_dict(data, "t")
    cfg = train_config(resolve(spec, spec.stages[0], cuda=True, bf16=True))
    e = memory.estimate(cfg)
    return (e.total - e.overhead) / 2**30, cfg


def _graphs(flags: list[str], then: str) -> str:
    return "on" if "graphs" in flags else "off" if "nographs" in flags else then


def test_the_memory_model_predicts_the_compiled_plan_runs_peaks():
    """The plan-run rows of docs/bench_plan_run_logits.json and bench_plan_run_pinned.json (`muse plan run`,
    350M: standard, ddl's fused kernels, mhc's and mgt's fused bf16 state under CUDA graphs), priced as the
    executor resolves each plan: the total without the context's overhead within 1% of the store's peak
    (4% for the whole model compiled as one graph)."""
    import json
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent / "docs"
    docs = json.loads((root / "bench_plan_run_logits.json").read_text())
    pinned = json.loads((root / "bench_plan_run_pinned.json").read_text())  # session 23, H100: the loop's pinned reads
    calls = [docs["call_h200"]["new"], docs["call_h200_again"]["rows"], pinned["new"], pinned["call_2"]["tuned"],
             pinned["call_2"]["untuned"], pinned["call_3"]["hand_built_and_plan_run"]]
    checked = 0
    for call in calls:
        for row in call["rows"]:
            if row["mode"] != "plan-run":
                continue
            base, *flags = row["model"].split("+")
            predicted, _ = _plan_run_peak_predicted(base, flags, _graphs(flags, "auto"), call["shape"], call["seq_len"],
                                                    call["batch"])
            # compile_scope: model (one graph) measured 0.7 GiB over the blocks' peak, not priced apart
            assert predicted == pytest.approx(row["peak_mem_gib"], rel=0.04 if "model" in flags else 0.01), row["model"]
            checked += 1
    assert checked == 4 + 3 + 4 + 2 + 1  # 2 of the 3 in pinned["new"] with compile_scope: model


def test_the_memory_model_predicts_an_eager_plan_runs_peak():
    """The eager (compile: off) standard 350M plan run of docs/bench_plan_run_pinned.json (H100, after the
    executor stopped casting the logits to fp32): the model's total without the context's overhead within 1%
    of the store's peak."""
    import json
    from pathlib import Path

    eager = json.loads((Path(__file__).resolve().parent.parent / "docs" / "bench_plan_run_pinned.json").read_text())
    (row,) = eager["call_3"]["eager"]["rows"]
    assert row["name"] == "standard-off"
    predicted, cfg = _plan_run_peak_predicted("standard", [], "auto", "24 layers, d_model 1024", 2048, 8, "off")
    assert not cfg.compiled
    assert predicted == pytest.approx(row["peak_gib"], rel=0.01)


def test_the_earlier_plan_runs_peaks_are_the_model_and_the_tensors_the_executor_no_longer_makes():
    """Every plan-run row of docs/bench_plan_run_graphs2_h100.json and bench_plan_run_graphs_h100.json
    (`muse plan run` on H100s before the executor kept the logits in the compute dtype: 350M and 1.3B;
    standard, ddl, mgt, mhc; fused kernels on and off; CUDA graphs on and off): the model's total within 1%
    of the store's peak once the two tensors those runs held are added back: a tokens × vocabulary fp32
    gradient where the compute dtype's is priced now (Accelerate cast the returned logits to fp32), and under
    graphs one more tokens × vocabulary tensor in the compute dtype (the pool kept the unused logits'
    gradient's zeros). And the rows of the call between the two fixes (logits detached, still cast) with the
    first alone."""
    import json
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    docs = json.loads((root / "docs" / "bench_plan_run_graphs2_h100.json").read_text())
    older = json.loads((root / "docs" / "bench_plan_run_graphs_h100.json").read_text())
    between = json.loads((root / "docs" / "bench_plan_run_logits.json").read_text())["call_h100"]
    # the older file's calls set graphs by an environment variable (MUSE_COMPILE_MODE) before the plan setting
    calls = [(docs[k], None, True) for k in ("a350", "b13_call1", "b13_call2")] + \
        [(older[k], mode, True) for k, mode in (("default", "off"), ("reduce_overhead", "on"),
                                                ("graphs_standard_and_mhc", "on"), ("no_graphs_mhc", "off"))] + \
        [(between["new"], None, False)]
    checked = 0
    for call, mode, zeros_kept in calls:
        for row in call["rows"]:
            base, *flags = row["model"].split("+")
            # a row without +graphs / +nographs ran under the auto of then: graphs for mhc's fused form alone
            then = "on" if base == "mhc" and "fused" in flags else "off"
            graphs = mode or _graphs(flags, then if zeros_kept else "auto")
            predicted, cfg = _plan_run_peak_predicted(base, flags, graphs, call["shape"], call["seq_len"], call["batch"])
            logits = cfg.micro_batch * cfg.model.seq_len * cfg.model.vocab_size
            removed = logits * (4 - 2) + (logits * 2 if cfg.cuda_graphs and zeros_kept else 0)
            assert predicted + removed / 2**30 == pytest.approx(row["peak_mem_gib"], rel=0.01), (row["model"],
                                                                                               call["command"])
            checked += 1
    assert checked >= 14


def test_compiled_pricing_is_for_muse_decoders_own_compiled_regions():
    """A Hugging Face model's compiled blocks (not measured) are priced as eager; muse's loss head is priced
    compiled unless FSDP wraps the model on several processes (the executor leaves that head eager)."""
    m = ModelConfig.from_scale("125M", vocab_size=32000, seq_len=512)
    eager = memory.estimate(TrainConfig(m, micro_batch=4)).activations
    assert memory.estimate(TrainConfig(m, micro_batch=4, compiled=True, hf=True)).activations == eager
    blocks = memory.estimate(TrainConfig(m, micro_batch=4, compiled=True)).activations
    both = memory.estimate(TrainConfig(m, micro_batch=4, compiled=True, compiled_head=True)).activations
    assert both < blocks < eager
    wrapped = TrainConfig(m, micro_batch=4, compiled=True, compiled_head=True, world_size=2, sharding="fsdp")
    assert memory.estimate(wrapped).activations == memory.estimate(wrapped.with_(compiled_head=False)).activations
