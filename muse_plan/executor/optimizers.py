"""The optimizer a stage's settings ask for, prepared for Accelerate, and its checkpoint state.

One AdamW (betas 0.9/0.95, eps 1e-8; matrices decay, vectors and scalars —
norms, gates, biases — don't), held in one of four ways (``optimizer:
adamw_8bit`` is bitsandbytes' paged 8-bit AdamW on the device, with the same
groups, on a GPU):

- ``offload: none``, ``sharding: none | ddp``: ``torch.optim.AdamW`` on the
  device (its fused kernel on a GPU, the gradient clipping folded into it:
  ``clip_grad_norm``).
- ``offload: optimizer``: ``HostAdamW`` (ZeRO-Offload, Ren et al. 2021, without
  the sharding): the two moments and an fp32 master copy of every trainable
  parameter live in host RAM (pinned when CUDA is there), with a host buffer
  for the gradients. A step copies each gradient to the host, runs torch's
  own AdamW math there (the fused CPU kernel where torch has it, so the
  update is torch.optim.AdamW's) and copies the updated master back into the
  device parameter. The copies are pipelined per tensor: the host updates one
  tensor while the next gradient comes down and the last result goes up. The
  device keeps the fp32 weights autocast reads and the gradients, nothing
  else. Trainable parameters must be fp32 (the executor's are: autocast
  casts), so the master equals the device parameter after every step: the
  checkpoint holds torch AdamW's state format without the master, which is
  rebuilt from the loaded weights — a checkpoint of either optimizer resumes
  under the other (the OOM ladder's offload rung resumes that way).
- ``sharding: zero1`` on several processes: ``ZeroRedundancyOptimizer``
  around AdamW with the same groups, each process stepping its share of the
  parameters and broadcasting them (DDP still all-reduces whole gradients).
  It is built after the model is on its device (its collectives run there).
  A checkpoint consolidates the state to the main process first (a
  collective); every process loads the full state and keeps its share. The
  format is AdamW's, so the checkpoints are interchangeable with ``ddp``'s.
  On one process zero1 is plain AdamW.
- ``sharding: zero2 | zero3 | fsdp`` on several GPUs: Accelerate's FSDP2
  plugin (``accelerators.accelerator_for`` builds it; ``fsdp_plugin``): each
  transformer block its own unit, ``reshard_after_forward`` off for zero2
  (gradients and optimizer state sharded, weights kept gathered between
  forward and backward) and on for zero3/fsdp (weights sharded too). A
  checkpoint gathers the full weights and the full optimizer state (keyed by
  parameter name) to the main process through
  ``torch.distributed.checkpoint.state_dict``; the weights are written as
  usual (safetensors), so the next stage or a resume under other settings
  reads them, and every process loads the full optimizer state and keeps its
  shard. An FSDP optimizer state resumes only under FSDP.

``prepare`` builds the optimizer and prepares both with the Accelerator;
``save_state`` / ``load_state`` are the checkpoint's two ends, called on every
process.
"""

from __future__ import annotations

import math
from typing import Any, Iterable

import torch
from torch.optim.adamw import adamw as adamw_update

from muse_plan.executor.settings import StageSettings

BETAS = (0.9, 0.95)
EPS = 1e-8


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Trainable parameters: matrices decay, vectors and scalars don't."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]


def make_optimizer(model: torch.nn.Module, s: StageSettings, *, shard: bool = False,
                   fused: bool = True) -> torch.optim.Optimizer:
    """The bare optimizer for ``s`` (``shard``: across the initialised process group).

    On a GPU, AdamW runs as torch's fused kernel (one pass over weights, gradients
    and moments) unless ``fused`` is off (FSDP, whose sharded parameters it is not
    built for): the default multi-tensor one took 10 ms of a 112 ms step of the
    350M decoder on an H100, the fused one a third of that (scripts/profile_plan_run.py).
    """
    groups = param_groups(model, s.weight_decay)
    if s.optimizer == "adamw_8bit":  # its two moments in 8 bits, paged to host RAM under memory pressure
        import bitsandbytes as bnb

        return bnb.optim.PagedAdamW8bit(groups, lr=s.lr, betas=BETAS, eps=EPS)
    if s.offload == "optimizer":
        return HostAdamW(groups, lr=s.lr, betas=BETAS, eps=EPS)
    if shard:
        from torch.distributed.optim import ZeroRedundancyOptimizer

        return ZeroRedundancyOptimizer(groups, optimizer_class=torch.optim.AdamW, lr=s.lr, betas=BETAS, eps=EPS)
    params = [p for group in groups for p in group["params"]]
    fused = fused and bool(params) and all(p.is_cuda and p.is_floating_point() for p in params)
    return torch.optim.AdamW(groups, lr=s.lr, betas=BETAS, eps=EPS, **({"fused": True} if fused else {}))


def clip_grad_norm(accelerator: Any, model: Any, optimizer: Any, clip: float) -> torch.Tensor:
    """The gradients' total norm before clipping, their clipping to ``clip`` arranged.

    Under a fused AdamW on one process or DDP (no loss scaler), the clipping
    rides in the optimizer's own kernel as its ``grad_scale`` (the gradients are
    divided by max(1, norm/clip) as they are read), instead of a separate pass
    that reads and writes every gradient: 3 ms of a 112 ms step of the 350M
    decoder on an H100. Elsewhere Accelerate's ``clip_grad_norm_``, which
    knows FSDP's and ZeRO's layouts.
    """
    inner = _inner(optimizer)
    folds = (isinstance(inner, torch.optim.AdamW) and inner.defaults.get("fused")
             and accelerator.scaler is None and not is_fsdp(accelerator)
             and hasattr(torch.nn.utils, "get_total_norm"))
    if not folds:
        return accelerator.clip_grad_norm_(model.parameters(), clip)
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    norm = torch.nn.utils.get_total_norm(grads, foreach=True)
    # torch.nn.utils.clip_grad_norm_'s coefficient, min(1, clip/(norm + 1e-6)), as a divisor
    inner.grad_scale = torch.clamp((norm + 1e-6) / clip, min=1.0).float() if math.isfinite(clip) else None
    return norm


def is_fsdp(accelerator: Any) -> bool:
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.FSDP


def prepare(accelerator: Any, model: torch.nn.Module, s: StageSettings) -> tuple[Any, Any]:
    """The model and its optimizer, prepared (wrapped for DDP/FSDP, on the device).

    The Accelerator first lets go of what an earlier stage (or an earlier try of
    this one) prepared: its memory, and FSDP's ``clip_grad_norm_``, which looks
    for the model among every model it holds, fails on finding others."""
    accelerator.free_memory()
    if s.sharding == "zero1" and accelerator.num_processes > 1:
        model = own_autocast(accelerator, accelerator.prepare(model))
        optimizer = make_optimizer(accelerator.unwrap_model(model), s, shard=True)
        # device_placement would round-trip an unconsolidated state_dict(), which ZeRO refuses
        return model, accelerator.prepare_optimizer(optimizer, device_placement=False)
    fsdp = is_fsdp(accelerator)
    if fsdp:
        accelerator.state.fsdp_plugin.transformer_cls_names_to_wrap = block_class_names(model)
    model, optimizer = accelerator.prepare(model, make_optimizer(model, s, fused=not fsdp))
    return own_autocast(accelerator, model), optimizer


def own_autocast(accelerator: Any, model: Any) -> Any:
    """``model`` with the forward Accelerate's mixed precision wrapped put back: the executor runs every
    forward in ``accelerator.autocast()`` itself, and the wrapper also casts every bf16/fp16 output to
    fp32 — the (B·T × vocab) logits a language model returns with its loss, 2 GB written each step of
    the 350M decoder outside any compiled region (with ``DecoderLM.head``'s detached logits: 96.9 → 93.6 ms
    a step and 1.0 GiB less at the peak on an H200, docs/bench_plan_run.md)."""
    inner = accelerator.unwrap_model(model)
    original = inner.__dict__.pop("_original_forward", None)
    if original is not None:
        if getattr(original, "__func__", None) is type(inner).forward:
            inner.__dict__.pop("forward", None)  # the class's own again
        else:  # another instance-level forward (a peft or hub wrapper's) was there before
            inner.forward = original
    return model


def block_class_names(model: torch.nn.Module) -> list[str]:
    """FSDP's wrapping units: a Hugging Face model's ``_no_split_modules``, else the
    classes of the repeated blocks (a ``blocks`` or ``layers`` ModuleList)."""
    names = list(getattr(model, "_no_split_modules", None) or [])
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and name.rsplit(".", 1)[-1] in ("blocks", "layers", "h"):
            names += [type(m).__name__ for m in module]
    if not names:
        raise ValueError(f"FSDP sharding: no repeated blocks found in {type(model).__name__} to shard by")
    return sorted(set(names))


def _inner(optimizer: Any) -> Any:
    return getattr(optimizer, "optimizer", optimizer)  # Accelerate's wrapper


def save_state(accelerator: Any, model: Any, optimizer: Any) -> tuple[Any, dict[str, Any] | None]:
    """What a checkpoint writes: (the module whose weights it saves, the optimizer's full
    state); a collective under ZeRO and FSDP. The state is None off the main process."""
    from torch.distributed.optim import ZeroRedundancyOptimizer

    inner = _inner(optimizer)
    if is_fsdp(accelerator):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        weights, state = get_state_dict(model, inner, options=options)
        return StateDictModule(weights, _tied_names(model)), state if accelerator.is_main_process else None
    if isinstance(inner, ZeroRedundancyOptimizer):
        inner.consolidate_state_dict(to=0)
    state = inner.state_dict() if accelerator.is_main_process else None
    return accelerator.unwrap_model(model), state


def load_state(accelerator: Any, model: Any, optimizer: Any, state: dict[str, Any]) -> None:
    """Load a checkpoint's full optimizer state on this process (each keeps its share)."""
    if is_fsdp(accelerator):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(model, _inner(optimizer), state,
                                 options=StateDictOptions(full_state_dict=True))
        return
    optimizer.load_state_dict(state)


def _tied_names(model: torch.nn.Module) -> list[list[str]]:
    """Names that share one parameter (a tied head), so a gathered copy is stored once."""
    by_id: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        by_id.setdefault(id(p), []).append(name)
    return [names for names in by_id.values() if len(names) > 1]


class StateDictModule(torch.nn.Module):
    """A gathered state dict in a module's clothes, for ``checkpoint.save`` (which
    writes a module's weights with safetensors): tied names share one tensor again."""

    def __init__(self, state: dict[str, torch.Tensor], tied: list[list[str]]) -> None:
        super().__init__()
        self._state = dict(state)
        for names in tied:
            kept = next((n for n in names if n in self._state), None)
            for name in names:
                if kept is not None and name in self._state:
                    self._state[name] = self._state[kept]

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:  # type: ignore[override]
        return dict(self._state)


class HostAdamW(torch.optim.Optimizer):
    """AdamW whose state lives in host RAM; see the module docstring."""

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2) -> None:
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay})
        for group in self.param_groups:
            for p in group["params"]:
                if p.dtype != torch.float32:
                    raise ValueError(f"HostAdamW keeps an fp32 master equal to each parameter; got {p.dtype}")
        self._pin = torch.cuda.is_available()
        self._fused = _cpu_fused_adamw()
        self._master: dict[torch.Tensor, torch.Tensor] = {}
        self._grad: dict[torch.Tensor, torch.Tensor] = {}

    def _host_like(self, p: torch.Tensor) -> torch.Tensor:
        return torch.zeros(p.shape, dtype=torch.float32, pin_memory=self._pin)

    def _state(self, p: torch.Tensor) -> dict[str, Any]:
        """The host state of ``p``, made on first use (an empty state at ``prepare``
        keeps Accelerate's device-placement round trip from copying it to the GPU)."""
        state = self.state[p]
        if not state:
            state["step"] = torch.tensor(0.0)
            state["exp_avg"] = self._host_like(p)
            state["exp_avg_sq"] = self._host_like(p)
        if p not in self._master:
            self._master[p] = self._host_like(p)
            self._master[p].copy_(p.detach())
            self._grad[p] = self._host_like(p)
        return state

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        todo: list[tuple[dict[str, Any], torch.Tensor, Any]] = []
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                self._state(p)
                self._grad[p].copy_(p.grad, non_blocking=True)
                done = None
                if p.grad.is_cuda:
                    done = torch.cuda.Event()
                    done.record()
                todo.append((group, p, done))
        for group, p, done in todo:
            if done is not None:
                done.synchronize()  # this gradient is on the host; later ones still coming
            state = self.state[p]
            beta1, beta2 = group["betas"]
            adamw_update(
                [self._master[p]], [self._grad[p]], [state["exp_avg"]], [state["exp_avg_sq"]], [],
                [state["step"]], foreach=False, fused=self._fused, amsgrad=False, beta1=beta1, beta2=beta2,
                lr=group["lr"], weight_decay=group["weight_decay"], eps=group["eps"], maximize=False)
            p.copy_(self._master[p], non_blocking=True)
        return loss

    def state_dict(self) -> dict[str, Any]:
        return super().state_dict()  # torch AdamW's format: step, exp_avg, exp_avg_sq (no master)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Copy a saved state (this class's or torch AdamW's) into the host buffers,
        wherever its tensors are; the masters are taken from the parameters."""
        saved = state_dict["param_groups"]
        if [len(g["params"]) for g in saved] != [len(g["params"]) for g in self.param_groups]:
            raise ValueError("loaded optimizer state has other parameter groups than this model's")
        for group, old in zip(self.param_groups, saved):
            for key in ("lr", "betas", "eps", "weight_decay", "initial_lr"):
                if key in old:
                    group[key] = tuple(old[key]) if key == "betas" else old[key]
            for p, index in zip(group["params"], old["params"]):
                self._master.pop(p, None)
                self.state.pop(p, None)
                values = state_dict["state"].get(index)
                if values is None:
                    continue
                state = self._state(p)
                state["step"] = torch.tensor(float(values["step"]))
                state["exp_avg"].copy_(values["exp_avg"])
                state["exp_avg_sq"].copy_(values["exp_avg_sq"])


def _cpu_fused_adamw() -> bool:
    """Whether torch has the fused (vectorised, multi-threaded) AdamW kernel for CPU tensors."""
    try:
        p = torch.zeros(1, requires_grad=True)
        p.grad = torch.zeros(1)
        torch.optim.AdamW([p], fused=True).step()
        return True
    except (RuntimeError, TypeError):
        return False
