"""The probe: one training step of each stage, measured, before hours are spent.

``muse plan run`` (on a GPU by default, ``--probe`` anywhere) and ``muse plan
optimize --probe`` run two optimizer steps of every stage that trains (the
second beside the optimizer state the first made; two micro-steps each
where the stage accumulates, the second beside the first one's gradients),
at its largest shapes, and set the measured peak beside the memory model's
prediction before step 1 of the run.

Design decisions:
- The probe builds its own trainer for the stage (``setup`` as the run
  would, random weights) and drops it after the step, and every RNG is put
  back, so the run itself draws the same data and samples it would have
  drawn without a probe.
- Largest shapes: the architecture engine's micro-batch is always full
  (micro-batch × context); an RL stage samples from random weights, which
  almost never emit EOS, so every completion of every group runs to
  ``max_new_tokens`` — the long sample that otherwise comes late. (A
  rejection-sampling stage keeps only correct samples, none from random
  weights: its update is probed empty, its sampling is probed full.)
- What is compared: on a GPU the allocator's peak (``max_memory_allocated``)
  with the model's prediction less its CUDA-context and fragmentation
  overhead, and the peak the process reserved (``max_memory_reserved``, plus
  the context) with the usable memory (the card less the optimizer's 10%
  margin); on CPU the process's resident set with host RAM. A stage whose
  measured peak is over the usable memory, or that runs out of memory in
  the probe, does not fit: recovery's OOM ladder rewrites its settings (a
  revision by the optimizer, with the measurement as its reason) and the
  stage is probed again, before any step of the run.
- Every process probes; the decision uses the largest peak over processes,
  so every process takes the same rewrite. The probe's seconds are shown
  and recorded with its numbers as an event of the run.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from typing import Any, Callable

import psutil
import torch

from engines.contract import make_trainer
from muse_plan.errors import PlanError
from muse_plan.executor import checkpoint, optimizers
from muse_plan.executor.prepare import set_up
from muse_plan.executor.settings import StageSettings, train_config
from muse_plan.plan.kinds import STAGE_KINDS
from muse_plan.plan.spec import PlanSpec

GIB = 2**30
STEPS = 2  # optimizer steps a probe takes


@dataclass
class ProbeResult:
    stage: str
    measured_gib: float  # GPU: allocator peak; CPU: resident set
    reserved_gib: float  # what the process held at its peak (GPU: reserved + context; CPU: = measured)
    predicted_gib: float | None  # the memory model, on the same footing as ``measured_gib``
    limit_gib: float  # usable on one device
    seconds: float
    oom: bool = False
    cuda: bool = True

    @property
    def fits(self) -> bool:
        return not self.oom and self.reserved_gib <= self.limit_gib

    def describe(self) -> str:
        if self.oom:
            return f"probe of stage {self.stage}: out of memory in one step ({self.seconds:.1f} s)"
        verdict = "fits" if self.fits else "does not fit"
        if not self.cuda:  # the resident set is the whole process, not the training tensors the model prices
            predicted = (f" (the memory model's training tensors: {self.predicted_gib:.2f} GiB)"
                         if self.predicted_gib is not None else "")
            return (f"probe of stage {self.stage}: process resident set {self.measured_gib:.2f} GiB{predicted} "
                    f"of {self.limit_gib:.2f} GiB usable: {verdict} ({self.seconds:.1f} s)")
        predicted = f", predicted {self.predicted_gib:.2f} GiB" if self.predicted_gib is not None else ""
        error = (f" ({100 * (self.measured_gib / self.predicted_gib - 1):+.0f}%)"
                 if self.predicted_gib else "")
        return (f"probe of stage {self.stage}: peak {self.measured_gib:.2f} GiB{predicted}{error}, "
                f"{self.reserved_gib:.2f} GiB held of {self.limit_gib:.2f} GiB usable: {verdict} "
                f"({self.seconds:.1f} s)")

    def data(self) -> dict[str, Any]:
        return {"measured_gib": self.measured_gib, "reserved_gib": self.reserved_gib,
                "predicted_gib": self.predicted_gib, "limit_gib": self.limit_gib, "seconds": self.seconds,
                "oom": self.oom}


def _predicted(s: StageSettings, cuda: bool) -> float | None:
    from muse_plan.optimizer import memory

    cfg = train_config(s)
    if cfg is None:
        return None
    peak = memory.estimate(cfg, device="cuda" if cuda else "cpu")
    return (peak.total - peak.overhead) / GIB


def _limit_gib(accelerator: Any) -> float:
    from muse_plan.optimizer.fit import SAFETY_MARGIN

    if accelerator.device.type == "cuda":
        total = torch.cuda.get_device_properties(accelerator.device).total_memory
    else:
        total = psutil.virtual_memory().total
    return total * (1 - SAFETY_MARGIN) / GIB


def probe_stage(spec: PlanSpec, s: StageSettings, accelerator: Any, cache_dir: Any) -> ProbeResult:
    """One step of stage ``s`` on a fresh trainer; every RNG restored afterwards."""
    from muse_plan.optimizer.memory import CUDA_CONTEXT_BYTES

    cuda = accelerator.device.type == "cuda"
    rng = checkpoint.rng_state()
    trainer = make_trainer(s.engine)
    started = time.perf_counter()
    oom = False
    try:
        # the data a few steps need, one evaluation batch
        set_up(trainer, spec, s, accelerator, tokens_needed=min(s.steps, 4) * s.tokens_per_step, eval_batches=1,
               cache_dir=cache_dir)
        if cuda:
            torch.cuda.synchronize(accelerator.device)
            torch.cuda.reset_peak_memory_stats(accelerator.device)
        model, optimizer = optimizers.prepare(accelerator, trainer.model, s)
        trainer.model = model
        model.train()
        for _ in range(STEPS):  # the second step runs beside the optimizer state the first one made
            for _ in range(min(2, s.grad_accum)):  # a second micro-step runs beside the first one's .grad
                batch = trainer.next_batch()
                with accelerator.autocast():
                    out = trainer.micro_step(batch)
                accelerator.backward(out.loss / s.grad_accum)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize(accelerator.device)
    except (torch.cuda.OutOfMemoryError, MemoryError):
        oom = True
    except ValueError as exc:
        raise PlanError(f"stage {s.name!r}: {exc}") from None
    seconds = time.perf_counter() - started
    if cuda:
        measured = torch.cuda.max_memory_allocated(accelerator.device) / GIB
        reserved = (torch.cuda.max_memory_reserved(accelerator.device) + CUDA_CONTEXT_BYTES) / GIB
    else:
        measured = reserved = psutil.Process().memory_info().rss / GIB
    peak = accelerator.reduce(torch.tensor([measured, reserved, float(oom)], device=accelerator.device), "max")
    measured, reserved, oom = float(peak[0]), float(peak[1]), bool(peak[2] > 0)
    del trainer
    accelerator.free_memory()
    if cuda:
        torch.cuda.empty_cache()
    checkpoint.set_rng_state(rng)
    return ProbeResult(s.name, measured, reserved, _predicted(s, cuda), _limit_gib(accelerator), seconds, oom, cuda)


def probe_plan(spec: PlanSpec, world_size: int, cuda: bool, cache_dir: Any,
               say: Callable[[ProbeResult], None] = lambda r: None,
               rewrite: Callable[[PlanSpec, str], PlanSpec | None] = lambda spec, reason: None,
               note: Callable[[int, str], None] = lambda position, text: None,
               ) -> tuple[PlanSpec, list[ProbeResult], Any]:
    """Probe every stage that trains, each under the Accelerator and settings the run gives
    it; a stage that does not fit climbs recovery's OOM ladder (``rewrite(new_spec,
    reason)`` records each rung and may give back the plan to go on with: the rung laid
    on the stored head) and is probed again. Returns the plan to run, every probe
    made and the Accelerator the probes left; ``PlanError`` when a stage fits no rung."""
    from muse_plan.executor.accelerators import accelerator_for
    from muse_plan.executor.prepare import stage_settings
    from muse_plan.recovery.policies import next_rewrite

    results: list[ProbeResult] = []
    accelerator = None
    for position, stage in enumerate(spec.stages):
        if not STAGE_KINDS[stage.kind].trains:
            continue
        used = 0
        while True:
            accelerator = accelerator_for(accelerator, spec, position, world_size, cuda,
                                          lambda text: note(position, text))
            s = stage_settings(spec, position, world_size, cuda)
            result = probe_stage(spec, replace(s, steps=max(1, s.steps)), accelerator, cache_dir)
            results.append(result)
            say(result)
            if result.fits:
                break
            found = next_rewrite(spec, stage, "oom", used, accelerator.num_processes)
            if found is None:
                raise PlanError(f"{result.describe()}; no rewrite of stage {stage.name!r} is left to try "
                                "(micro-batch 1, full checkpointing, optimizer offload, LoRA where it runs)")
            used, change, spec = found
            spec = rewrite(spec, f"probe before run: {result.describe()}; {change.summary}") or spec
            stage = spec.stages[position]
    return spec, results, accelerator
