"""The growth engine under the engine contract (``engines/contract.py``).

A ``grow`` stage changes weights instead of training them, so besides the
contract's methods this trainer has ``grow``: the executor hands it the
small stage's weights (a loader), the small model's config, the autocast
context and, for ``optimizer_state: mapped``, the small stage's AdamW
moments by name; the trainer grows them into its model's shape with its
typed options (``GrowSettings``) and reports. Data and evaluation — what
LiGO's fit trains on and what measures the loss before and after — are the
architecture engine's at the grown shape, held inside; reading and writing
checkpoints and optimizer-state formats stay the executor's.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from dataclasses import replace
from typing import Any, Callable

from engines.architecture.config import ModelConfig
from engines.architecture.options import ArchitectureOptions
from engines.architecture.trainer import ArchitectureTrainer
from engines.contract import MicroStep, StageSetup
from engines.growth.schedule import GrowSettings
from engines.growth.stage import GrowReport, Moments, grow_stage


class GrowthTrainer:
    def setup(self, stage: StageSetup) -> None:
        self.settings: GrowSettings = stage.options or GrowSettings()
        self.inner = ArchitectureTrainer()
        self.inner.setup(replace(stage, options=ArchitectureOptions()))

    @property
    def model(self) -> Any:
        return self.inner.model

    @model.setter
    def model(self, value: Any) -> None:
        self.inner.model = value

    def grow(self, small_config: ModelConfig, load_small: Callable[[Any], None],
             autocast: Callable[[], AbstractContextManager] = nullcontext, small_moments: Moments | None = None,
             fit_clip: float | None = None) -> GrowReport:
        """The small model ``load_small`` fills, grown into this stage's shape (``self.model``
        after it); LiGO's fit clipped at ``fit_clip`` (the stage's clip_grad_norm)."""
        return grow_stage(self.inner, small_config, load_small, replace(self.settings, fit_clip=fit_clip),
                          autocast, small_moments)

    def next_batch(self) -> Any:
        return self.inner.next_batch()

    def micro_step(self, batch: Any) -> MicroStep:
        return self.inner.micro_step(batch)

    def evaluate(self) -> dict[str, float]:
        return self.inner.evaluate()

    def summary(self) -> dict[str, float]:
        return {}

    def state_dict(self) -> dict[str, Any]:
        return self.inner.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.inner.load_state_dict(state)
