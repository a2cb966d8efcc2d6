"""The engine contract: what the executor hands an engine, and what it calls.

Design decisions:
- An engine does not own time. The executor owns the loop (steps, gradient
  accumulation, clipping, precision, learning-rate schedule, checkpoints,
  resume, several processes); an engine's trainer only builds its model and
  data in ``setup``, hands out micro-batches, computes a micro-batch's loss,
  evaluates, and keeps its own resumable state (the data position, replay
  buffers) in ``state_dict``. So every engine gets accumulation, clipping,
  mixed precision, checkpoints, monitoring and recovery for free, and a
  trainer is testable in a few lines without the CLI or the store.
- The model's weights are not part of ``state_dict``: the executor saves
  ``trainer.model`` itself (safetensors), so a stage's result is one weights
  file whatever engine made it.
- ``StageSetup`` is a plain dataclass, not the plan's pydantic model: engines
  stay importable and testable without the orchestrator. Its ``options`` is
  the engine's own typed options object (``engines/*/options.py``,
  ``GrowSettings``, ``RkdoConfig``), validated when the plan was read; an
  engine reads its attributes and holds no defaults of its own.
- Optional extras a trainer may have, each asked for with ``getattr`` by the
  executor: ``should_stop()`` (its own early-stopping rule, asked at
  evaluations), ``checkpoint_meta`` (a dict written into each checkpoint's
  manifest, e.g. LoRA's scaling so a later stage can merge the adapters) and
  ``init_module`` (the part of the model an earlier stage's weights fit; None:
  nothing loads) and ``take_notes()`` (lines worth an event, asked after each
  step: a user's reward failing on a sample). An engine whose stages change weights instead of training
  them (growth) has ``grow(...)``, which the executor calls in place of the
  loop (``engines/growth/trainer.py``).
- Engines are found through a registry of import paths, so an unknown or
  not-yet-built engine fails when a run starts, not mid-plan, and importing
  the registry imports no torch.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import torch

    from engines.architecture.config import ModelConfig


@dataclass
class StageSetup:
    """Everything an engine needs to build one stage; filled in by the executor."""

    name: str
    kind: str
    model: ModelConfig
    options: Any = None  # the stage kind's typed options (its engine's options model); None: the defaults
    data_source: str = "arithmetic"
    tokenizer: str = "byte"
    val_fraction: float = 0.05
    seed: int = 0
    micro_batch: int = 8
    activation_checkpointing: str = "none"  # none | selective | full
    rank: int = 0
    world_size: int = 1
    tokens_needed: int = 0  # training tokens the stage will read (all processes)
    micro_steps: int = 0  # micro-batches each process will run (steps × grad_accum); 0: unknown
    eval_batches: int = 8
    cache_dir: Path = Path(".")
    device: str = "cpu"
    # the dtype weights that never train are kept in (LoRA's frozen base, the KL reference):
    # fp32, or the stage's compute dtype (bf16 / fp16) when the executor computes in it
    frozen_precision: str = "fp32"
    family: str = "decoder"  # decoder (the architecture engine's) | hf (a local Hugging Face model)
    init_from: str | None = None  # the hf model's directory
    # how sampling decodes on CUDA (engines/grpo/policy.py): eager | graphs (CUDA graphs, an HF static
    # cache) | compiled (the step compiled, then captured); from training.compile (settings.decoding)
    decode: str = "eager"


@dataclass
class MicroStep:
    """One micro-batch's loss (a graph-connected scalar) and what it covered."""

    loss: torch.Tensor
    tokens: int
    metrics: dict[str, float] = field(default_factory=dict)


class Trainer(Protocol):
    model: torch.nn.Module

    def setup(self, stage: StageSetup) -> None: ...

    def next_batch(self) -> Any: ...

    # optional: ``skip_batches(n)`` leaves out the data of n batches without making them (a recovery
    # skipping the window that led to a fault); without it the loop draws n batches and drops them

    def micro_step(self, batch: Any) -> MicroStep: ...

    def evaluate(self) -> dict[str, float]: ...

    def summary(self) -> dict[str, float]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


# engine name (as in the plan's STAGE_KINDS) -> "module:TrainerClass"
TRAINERS: dict[str, str] = {
    "architecture": "engines.architecture.trainer:ArchitectureTrainer",
    "rkdo": "engines.rkdo.trainer:RkdoTrainer",
    "grpo": "engines.grpo.trainer:GrpoTrainer",
    "growth": "engines.growth.trainer:GrowthTrainer",
}


def available(engine: str) -> bool:
    return engine in TRAINERS


def make_trainer(engine: str) -> Trainer:
    if engine not in TRAINERS:
        raise ValueError(
            f"engine {engine!r} is not available in this version of muse; available: {', '.join(TRAINERS)}"
        )
    module, cls = TRAINERS[engine].split(":")
    return getattr(importlib.import_module(module), cls)()
