"""The training loop of one stage: step → record → evaluate → checkpoint.

The executor owns time; the engine's trainer only supplies micro-batches and
their losses (``engines/contract.py``). One code path serves one CPU, one GPU
and several GPUs: everything goes through an ``accelerate.Accelerator``
(DDP/FSDP underneath when launched with several processes).

Design decisions:
- Gradient accumulation is explicit: ``grad_accum`` micro-batches, each loss
  divided by ``grad_accum``, gradient all-reduce skipped (``no_sync``) on all
  but the last micro-batch. The global batch is micro × accum × processes.
- The gradient norm is recorded before clipping (that is the number a user
  sets an explosion threshold against); with no clipping the norm is still
  measured.
- No host sync inside a GPU step: a step's loss and gradient norm are copied
  to pinned host memory behind an event as the step is queued, and read after
  the next step has been queued (one step late), waiting on that event alone,
  so the host never drains the GPU's queue (an ``.item()`` would wait for the
  next step's kernels too, and the GPU would idle while the host reports and
  launches); always read before an evaluation or a checkpoint. On CPU they are
  read at once. A non-finite
  (all-process mean) loss raises ``NonFiniteLoss`` with the step and value
  for the recovery layer: on CPU before the optimizer touches the weights,
  on a GPU one step later — never after a checkpoint of bad weights, since a
  checkpoint step reads its numbers first. CUDA out-of-memory and
  ``MemoryError`` become ``OutOfMemory``.
- Resume is exact on CPU: the checkpoint restores weights, optimizer and
  scheduler state, every RNG and the data position, and the loop continues
  at the step after the checkpoint's.
- Only the main process writes checkpoints; the others wait for it. Under
  ZeRO-1 and FSDP every process first takes part in gathering the full
  optimizer state (and FSDP's full weights) to it; every process loads the
  full state on resume (``optimizers.save_state`` / ``load_state``).
- The optimizer is AdamW, on the device, on the host (``offload:
  optimizer``) or sharded (``zero1``, FSDP): ``executor/optimizers.py``.
- Ctrl-C stops the loop between two steps (``STOP``), so an interrupt never
  lands inside a store write or a checkpoint; a second Ctrl-C stops at once.
- An engine may end its stage early with its own rule (RKDO: the loss's
  geometric decrease has flattened): a trainer's optional ``should_stop()``
  is asked at each evaluation; the stage then checkpoints and ends there.
"""

from __future__ import annotations

import math
import threading
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import psutil
import torch

from engines.architecture.config import FUSED_RESIDUALS
from engines.architecture.modes import fused_form
from engines.contract import Trainer
from muse_plan.executor import checkpoint, optimizers
from muse_plan.executor.compiled import Compiled, compile_model, first_call
from muse_plan.executor.settings import StageSettings, lr_factor


# set by the first Ctrl-C (``runner.run_plan``'s handler): the loop stops at the next step
# boundary, never inside a store write or a checkpoint; a second Ctrl-C stops at once
STOP = threading.Event()


class Fault(Exception):
    """A training failure the recovery layer can act on."""

    def __init__(self, message: str, step: int, value: float | None = None):
        super().__init__(message)
        self.step, self.value = step, value


class NonFiniteLoss(Fault):
    pass


class OutOfMemory(Fault):
    pass


class GradientExplosion(Fault):
    pass


FAULTS: dict[str, type[Fault]] = {"nan": NonFiniteLoss, "oom": OutOfMemory, "grad_explosion": GradientExplosion}


class Injector:
    """Faults on purpose (``--inject nan@120,oom@200,grad_spike@300``), through the
    real code paths: a poisoned loss, the real out-of-memory error type, a loss
    scaled 10⁴× (its gradients explode). Each fires once per run, so a resumed
    stage does not meet it again."""

    KINDS = ("nan", "oom", "grad_spike")

    def __init__(self, spec: str | None = None) -> None:
        self.pending: set[tuple[str, int]] = set()
        for part in (p.strip() for p in (spec or "").split(",") if p.strip()):
            kind, _, at = part.partition("@")
            if kind not in self.KINDS or not at.strip().isdigit() or int(at) < 1:
                raise ValueError(f"--inject {part!r}: write KIND@STEP with KIND one of {', '.join(self.KINDS)}, "
                                 "like nan@120,oom@200")
            self.pending.add((kind, int(at)))

        self.fired: list[str] = []  # "nan@120": fired since the last take_fired()

    def unreachable(self, longest: int) -> list[str]:
        """The faults no stage reaches (a stage of ``longest`` steps is the longest)."""
        return sorted(f"{kind}@{step}" for kind, step in self.pending if step > longest)

    def take_fired(self) -> str | None:
        """The injected faults that fired since last asked (``nan@120``), None if none."""
        fired, self.fired = self.fired, []
        return ",".join(fired) or None

    def _fire(self, kind: str, step: int) -> bool:
        if (kind, step) in self.pending:
            self.pending.discard((kind, step))
            self.fired.append(f"{kind}@{step}")
            return True
        return False

    def before_step(self, step: int, device: str = "cuda") -> None:
        if self._fire("oom", step):  # the error this device would raise: CUDA's, or the host's
            if device == "cuda":
                raise torch.cuda.OutOfMemoryError(f"injected out-of-memory at step {step}")
            raise MemoryError(f"injected out-of-memory at step {step}")

    def loss_factor(self, step: int) -> float:
        if self._fire("nan", step):
            return float("nan")
        return 1e4 if self._fire("grad_spike", step) else 1.0


@dataclass(frozen=True)
class StepRecord:
    step: int  # 1-based: optimizer steps done
    loss: float
    grad_norm: float
    lr: float
    tokens: int  # tokens this step, all processes
    tokens_per_s: float
    memory_gib: float
    extra: dict[str, float] = field(default_factory=dict)  # the engine's own (reward, accuracy, ...)


class Hooks(Protocol):
    """What the loop reports to (the store recorder, the progress bar); main process only."""

    def on_start(self, step: int) -> None: ...

    def on_step(self, record: StepRecord) -> None: ...

    def on_eval(self, step: int, metrics: dict[str, float]) -> None: ...

    def on_checkpoint(self, step: int, path: Path) -> None: ...

    def on_alerts(self, findings: list[Any]) -> None: ...

    def on_notes(self, step: int, notes: list[str], severity: str) -> None: ...


def make_optimizer(model: torch.nn.Module, s: StageSettings) -> torch.optim.Optimizer:
    """AdamW for ``s`` (on the device, or its state on the host under ``offload:
    optimizer``); matrices decay, vectors and scalars (norms, gates, biases) don't."""
    return optimizers.make_optimizer(model, s)


def memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return psutil.Process().memory_info().rss / 2**30


def train_stage(trainer: Trainer, s: StageSettings, accelerator: Any, stage_dir: Path,
                meta: dict[str, Any], hooks: Hooks | None,
                start: checkpoint.Loaded | None = None, lag: bool | None = None,
                watch: Any = None, injector: Injector | None = None,
                skip_until: int | None = None,
                initial_optimizer_state: dict[str, Any] | None = None) -> dict[str, float]:
    """Run ``s.steps`` optimizer steps (from ``start``'s step when resuming).

    ``trainer.setup`` has run and the weights to start from are loaded.
    ``lag``: read each step's numbers one step late (default: on a GPU).
    ``initial_optimizer_state``: a full optimizer state to start from instead of
    an empty one (growth's mapped AdamW moments, ``executor/grow.py``).
    Returns the last step's loss and the last evaluation's metrics; when the
    engine's stopping rule ends the stage early, ``stopped_at_step`` too (after
    that step's evaluation and checkpoint).
    """
    main = accelerator.is_main_process
    model, optimizer = optimizers.prepare(accelerator, trainer.model, s)
    compiled = None
    if s.compile:  # the model or its blocks under torch.compile, in place (executor/compiled.py)
        from muse_plan.store.db import muse_home

        compiled = compile_model(accelerator.unwrap_model(model), muse_home() / "cache" / "inductor",
                                 s.compile_scope, head=not optimizers.is_fsdp(accelerator),
                                 graphs=s.cuda_graphs)
    # growth with optimizer_state: mapped (executor/grow.py): the stage starts from the moments
    # carried through the growth operator, not an empty state (its own lr and decay, set there)
    if initial_optimizer_state is not None and start is None:
        optimizers.load_state(accelerator, model, optimizer, initial_optimizer_state)
    trainer.model = model
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: lr_factor(i, s))
    step = 0
    if start is not None:
        optimizers.load_state(accelerator, model, optimizer, start.state["optimizer"])
        scheduler.load_state_dict(start.state["scheduler"])
        trainer.load_state_dict(start.state["engine"])
        checkpoint.set_rng_state(start.state["rng"])
        step = start.step
        # the plan's lr is authoritative (a recovery rewrite may have changed it)
        scheduler.base_lrs = [s.lr for _ in optimizer.param_groups]
        for group in optimizer.param_groups:
            group["lr"] = s.lr * lr_factor(step, s)
        scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]
    if skip_until is not None:  # leave out the data that led to the fault
        skipped = max(0, skip_until - step) * s.grad_accum
        if hasattr(trainer, "skip_batches"):  # without making them (the GRPO engine: no rollouts)
            trainer.skip_batches(skipped)
        else:
            for _ in range(skipped):
                trainer.next_batch()
    if main and hooks:
        hooks.on_start(step)
        _kernels_note(s, accelerator.device.type == "cuda", step, hooks)
    clip = s.clip_grad_norm if s.clip_grad_norm is not None else math.inf
    # On a GPU the step's numbers are read one step late, after the next step's
    # kernels are queued, so the host never waits on the GPU mid-loop.
    lag = accelerator.device.type == "cuda" if lag is None else lag
    result: dict[str, float] = {}
    pending: _Pending | None = None
    if s.eval_at_start and step == 0:  # the starting weights' score, the stage's step-0 point
        result.update(_evaluate(trainer, accelerator, compiled, 0, hooks if main else None))
    model.train()
    while step < s.steps:
        if STOP.is_set():  # Ctrl-C: stop between steps, with every step trained reported
            if pending:
                _report(pending, None, accelerator, hooks if main else None, result, watch)
            raise KeyboardInterrupt
        started = time.perf_counter()
        lr = scheduler.get_last_lr()[0]
        if compiled is not None and compiled.first_step_s is None:  # compiles here; eager again if that fails
            (loss, tokens, extra), failed = first_call(compiled, trainer, lambda: _accumulate(
                trainer, model, accelerator, s, step + 1, injector, compiled.graphs))
            compiled.first_step_s = time.perf_counter() - started
            _compile_note(compiled, failed, step + 1, hooks if main else None)
        else:
            loss, tokens, extra = _accumulate(trainer, model, accelerator, s, step + 1, injector,
                                              compiled is not None and compiled.graphs)
        loss = accelerator.reduce(loss, "mean")
        if not lag:
            _check_finite(loss.item(), step + 1)  # before the optimizer touches the weights
        grad_norm = optimizers.clip_grad_norm(accelerator, model, optimizer, clip)
        grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm  # FSDP2
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        _engine_notes(trainer, step, hooks if main else None)
        current = _Pending(step, loss, grad_norm, lr, tokens * accelerator.num_processes, started, extra)
        if lag:
            current.stage()
        due = step % s.eval_every == 0 or step % s.checkpoint_every == 0 or step == s.steps
        if pending:  # the previous step ran from its launch to this one's
            _report(pending, started, accelerator, hooks if main else None, result, watch)
        if not lag or due:
            _report(current, None, accelerator, hooks if main else None, result, watch)
        pending = current if lag and not due else None
        if step % s.eval_every == 0 or step == s.steps:
            result.update(_evaluate(trainer, accelerator, compiled, step, hooks if main else None))
        if step % s.checkpoint_every == 0 or step == s.steps:
            _save(trainer, accelerator, optimizer, scheduler, stage_dir, step, meta, hooks)
        if step % s.eval_every == 0 and step < s.steps and _engine_stops(trainer, accelerator):
            if step % s.checkpoint_every:
                _save(trainer, accelerator, optimizer, scheduler, stage_dir, step, meta, hooks)
            result["stopped_at_step"] = float(step)
            break
    return result


def _evaluate(trainer: Trainer, accelerator: Any, compiled: Compiled | None, step: int,
              hooks: Hooks | None) -> dict[str, float]:
    """The engine's evaluation at ``step`` (compiling its graph the first time), reported."""
    with accelerator.autocast():
        if compiled is not None and not compiled.evaluated:  # the first one compiles its graph
            metrics, failed = first_call(compiled, trainer, trainer.evaluate)
            compiled.evaluated = True
        else:
            metrics, failed = trainer.evaluate(), None
    if failed:
        _compile_note(compiled, failed, step, hooks)
    if hooks:
        hooks.on_eval(step, metrics)
    return metrics


def _compile_note(compiled: Compiled, failed: str | None, step: int, hooks: Hooks | None) -> None:
    if hooks is None:
        return
    if failed:
        hooks.on_notes(step, [f"torch.compile failed ({failed}); the stage trains eager from here"], "warning")
    elif compiled.active:
        hooks.on_notes(step, [f"compiled {compiled.describe()} ({compiled.backend}): the first step took "
                              f"{compiled.first_step_s:.1f} s with compilation"], "info")


def _kernels_note(s: StageSettings, cuda: bool, step: int, hooks: Hooks) -> None:
    """What ``training.fused_kernels`` gets here, said once a stage: the connections' Triton
    kernels, or why they run in torch (the same function either way)."""
    mode, residual, asked = s.model.fused_kernels, s.model.residual, s.fused_kernels_setting
    if mode == "off":
        if asked == "auto" and cuda and s.compile and fused_form(s.model):  # auto chose torch's: say why
            why = ("the step sums micro-steps" if s.grad_accum > 1 else "it runs on several processes"
                   if s.world_size > 1 else "training.cuda_graphs is off")
            hooks.on_notes(step, [f"torch's fusion for the {residual} connections (training.fused_kernels: auto): "
                                  f"their fused kernels are faster only replayed from CUDA graphs, and {why}"],
                           "info")
        return
    from engines.architecture.fused_streams import AVAILABLE as triton

    why = ("" if residual in FUSED_RESIDUALS else f"residual {residual} has none") or \
        ("" if cuda else "they run on a GPU only") or ("" if triton else "Triton is not installed")
    if why and asked != "auto":  # auto asked for nothing: where the kernels can't run, torch's is the default
        hooks.on_notes(step, [f"training.fused_kernels is {mode}, but {why}: the connections run in torch"], "info")
    elif not why:
        where = "eager and compiled" if mode == "on" else "in eager mode only"
        hooks.on_notes(step, [f"fused Triton kernels for the {residual} connections, {where} "
                              f"(training.fused_kernels: {asked})"], "info")


def _engine_notes(trainer: Trainer, step: int, hooks: Hooks | None) -> None:
    """What an engine has to say about this step (an optional ``take_notes()``: a
    user's reward failing on a sample) becomes an event of the run."""
    take = getattr(trainer, "take_notes", None)
    notes = take() if take is not None else []
    if notes and hooks:
        hooks.on_notes(step, notes, "warning")


def _engine_stops(trainer: Trainer, accelerator: Any) -> bool:
    """An engine's own early-stopping rule (an optional ``should_stop()``), asked
    only at evaluations, where the host has synced anyway; the main process's
    answer holds for every process, so all stop at the same step."""
    should_stop = getattr(trainer, "should_stop", None)
    if should_stop is None:
        return False
    from accelerate.utils import broadcast

    flag = torch.tensor([float(bool(should_stop()))], device=accelerator.device)
    return bool(broadcast(flag, from_process=0).item())


@dataclass
class _Pending:
    """A finished step whose numbers still live on the device."""

    step: int
    loss: torch.Tensor
    grad_norm: torch.Tensor
    lr: float
    tokens: int
    started: float  # host time the step's launch began
    extra: dict[str, float] = field(default_factory=dict)
    copied: torch.Tensor | None = None  # (loss, grad norm) in pinned host memory, once ``ready`` has passed
    ready: Any = None  # the CUDA event after that copy

    def stage(self) -> None:
        """Queue the copy of the step's numbers to the host (on a GPU), so reading them
        later waits for this step alone, not for whatever was queued after it."""
        if self.loss.device.type != "cuda":
            return
        values = torch.stack([self.loss.detach().float().reshape(()),
                              torch.as_tensor(self.grad_norm, device=self.loss.device).float().reshape(())])
        self.copied = torch.empty(2, dtype=torch.float32, pin_memory=True)
        self.copied.copy_(values, non_blocking=True)
        self.ready = torch.cuda.Event()
        self.ready.record()

    def values(self) -> tuple[float, float]:
        """The loss and the gradient norm, as host floats (a wait on this step's copy when staged)."""
        if self.copied is None:
            return self.loss.item(), float(self.grad_norm)
        self.ready.synchronize()
        loss, norm = self.copied.tolist()
        return loss, norm


def _check_finite(value: float, step: int) -> None:
    if not math.isfinite(value):
        raise NonFiniteLoss(f"loss is {value} at step {step}", step, value)


def _report(p: _Pending, ended: float | None, accelerator: Any, hooks: Hooks | None,
            result: dict[str, float], watch: Any = None) -> None:
    """Read a step's numbers (a host sync), check them, hand them to the hooks;
    the detectors' faults stop the stage on every process alike.

    ``ended``: when the next step's launch began; None: now, after the sync.
    """
    loss, grad_norm = p.values()
    _check_finite(loss, p.step)
    result["loss"] = loss
    result.update(p.extra)  # the engine's own numbers (an RL stage's reward) reach the run's summary
    seconds = (ended if ended is not None else time.perf_counter()) - p.started
    record = StepRecord(p.step, loss, grad_norm, p.lr, p.tokens, p.tokens / max(seconds, 1e-9),
                        memory_gib(accelerator.device), p.extra)
    if hooks:
        hooks.on_step(record)
    if watch is not None:
        found = watch.fault(record)
        if found is not None:
            raise FAULTS[found.kind](found.message, found.step, found.value)
        alerts = watch.alert(record)
        if alerts and hooks:
            hooks.on_alerts(alerts)


def _accumulate(trainer: Trainer, model: torch.nn.Module, accelerator: Any, s: StageSettings,
                step: int, injector: Injector | None = None,
                graphs: bool = False) -> tuple[torch.Tensor, int, dict[str, float]]:
    """Forward and backward over ``grad_accum`` micro-batches: mean loss, tokens,
    and the mean of each metric the engine reported (host floats, this process).
    ``graphs``: the compiled regions replay CUDA graphs; each micro-step starts a new replay."""
    total = torch.zeros((), device=accelerator.device)
    tokens = 0
    extra: dict[str, float] = {}
    factor = injector.loss_factor(step) if injector else 1.0
    try:
        if injector:
            injector.before_step(step, accelerator.device.type)
        for i in range(s.grad_accum):
            with accelerator.autocast():  # an engine that samples (GRPO's rollouts) does so in the compute dtype
                batch = trainer.next_batch()
            sync = i == s.grad_accum - 1
            if graphs:
                torch.compiler.cudagraph_mark_step_begin()
            with nullcontext() if sync else accelerator.no_sync(model), accelerator.autocast():
                out = trainer.micro_step(batch)
                if factor != 1.0:
                    out.loss = out.loss * factor
                accelerator.backward(out.loss / s.grad_accum)
            total += out.loss.detach().float()
            tokens += out.tokens
            for name, value in out.metrics.items():
                extra[name] = extra.get(name, 0.0) + float(value) / s.grad_accum
    except torch.cuda.OutOfMemoryError as exc:
        raise OutOfMemory(f"CUDA out of memory at step {step}: {str(exc).splitlines()[0]}", step) from None
    except MemoryError as exc:
        why = f": {exc}" if str(exc) else ""
        raise OutOfMemory(f"out of host memory at step {step}{why}", step) from None
    return total / s.grad_accum, tokens, extra


def _save(trainer: Trainer, accelerator: Any, optimizer: Any, scheduler: Any, stage_dir: Path,
          step: int, meta: dict[str, Any], hooks: Hooks | None) -> None:
    weights, optimizer_state = optimizers.save_state(accelerator, trainer.model, optimizer)  # all processes
    if accelerator.is_main_process:
        state = {
            "optimizer": optimizer_state,
            "scheduler": scheduler.state_dict(),
            "engine": trainer.state_dict(),
            "rng": checkpoint.rng_state(),
        }
        meta = {**meta, **getattr(trainer, "checkpoint_meta", {})}  # e.g. LoRA scaling
        path = checkpoint.save(stage_dir, step, weights, state, meta)
        if hooks:
            hooks.on_checkpoint(step, path)
    accelerator.wait_for_everyone()
