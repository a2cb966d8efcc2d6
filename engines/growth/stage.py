"""The grow stage, engine side: what the runner calls between two training stages.

The runner owns files and the store: it finds the previous stage's final
checkpoint, sets up the architecture engine's trainer at the grown shape (for
its data and its evaluation), calls ``grow_stage`` and writes the grown
weights as the grow stage's checkpoint, from which the next stage starts like
from any other. This module only grows and measures.

Design decisions:
- Validation loss is measured before growth (the small model on the same
  held-out batches, when the context length is unchanged) and after it, and
  both are reported: for a function-preserving operator the two agree (up to
  the ε of width growth, see ``width.py``), for G_stack and LiGO the gap is
  the loss the continue stage must first win back.
- The grown model replaces ``trainer.model``, so the runner saves exactly
  the module it evaluated. Its rotary settings must be those the plan builds
  the stages after it with (the resolver's ``grown_rope``); a mismatch is refused.
- With ``optimizer_state: mapped`` the runner hands over the small stage's
  AdamW moments keyed by parameter name and gets the grown model's back in
  ``GrowReport.moments`` (``operators.grow_moments``); turning names into an
  optimizer's indices is the executor's, which builds the optimizer.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any, Callable

import torch

from engines.architecture.config import ModelConfig
from engines.architecture.model import DecoderLM
from engines.growth.operators import Moments, grow, grow_moments
from engines.growth.schedule import GrowSettings


@dataclass
class GrowReport:
    metrics: dict[str, float]
    summary: str  # one line for the run's event log
    moments: Moments | None = None  # the grown model's AdamW moments by name (optimizer_state: mapped)


def skeleton(config: ModelConfig) -> torch.nn.Module:
    """The model a stage of ``config`` trains, on the meta device: its parameters' names and
    order without their memory (what the executor keys the small stage's AdamW moments by)."""
    with torch.device("meta"):
        return DecoderLM(config)


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())  # tied weights are one parameter


def _shape(c: ModelConfig) -> str:
    return f"{c.n_layers}×{c.d_model} ({c.n_heads} heads, MLP {c.ffn_dim}, context {c.seq_len})"


def grow_stage(trainer: Any, small_config: ModelConfig, load_small: Callable[[DecoderLM], None],
               settings: GrowSettings, autocast: Callable[[], AbstractContextManager] = nullcontext,
               small_moments: Moments | None = None) -> GrowReport:
    """Grow the small model ``load_small`` fills into ``trainer.model``'s shape, in place
    of ``trainer.model``; ``ValueError`` for options or shapes the operator refuses.
    ``small_moments``: the small model's AdamW moments by parameter name, mapped
    through the operator when the options say ``optimizer_state: mapped``."""
    target = trainer.model.config
    small = DecoderLM(small_config).to(trainer.model.tok_emb.weight.device)
    load_small(small)
    metrics: dict[str, float] = {}
    if small_config.seq_len == target.seq_len:
        grown_template, trainer.model = trainer.model, small
        with autocast():
            metrics["val_loss_before_growth"] = trainer.evaluate()["val_loss"]
        trainer.model = grown_template
    if settings.mapped and small_moments is None:
        raise ValueError("growth optimizer_state 'mapped' needs the small stage's optimizer state")
    moments = grow_moments(small_moments, small, target, settings) if settings.mapped else None
    grown = grow(small, target, settings, trainer.next_batch, autocast)
    rope = (grown.model.config.rope_theta, grown.model.config.rope_scale)
    if rope != (target.rope_theta, target.rope_scale):  # what the stages after this one are built with
        raise ValueError(f"the grown model's rotary settings (theta {rope[0]:g}, scale {rope[1]:g}) are not the "
                         f"stage's (theta {target.rope_theta:g}, scale {target.rope_scale:g})")
    grown.model.set_checkpointing(trainer.model.checkpointing)
    trainer.model = grown.model
    with autocast():
        metrics["val_loss"] = trainer.evaluate()["val_loss"]
    if grown.fit_losses:
        metrics["fit_loss_first"], metrics["fit_loss_last"] = grown.fit_losses[0], grown.fit_losses[-1]
    how = settings.operator + (" (function-preserving)" if settings.function_preserving else "")
    before = metrics.get("val_loss_before_growth")
    loss = f"val loss {before:.4f} → {metrics['val_loss']:.4f}" if before is not None else \
        f"val loss {metrics['val_loss']:.4f}"
    fitted = f"; operator fitted {len(grown.fit_losses)} steps" if grown.fit_losses else ""
    carried = ""
    if moments is not None:
        carried = (f"; AdamW moments mapped for {len(moments)} of "
                   f"{sum(1 for _ in grown.model.parameters())} parameter tensors")
    summary = (f"grew {_shape(small_config)}, {n_params(small):,} parameters → {_shape(target)}, "
               f"{n_params(grown.model):,} parameters by {how}: {loss}{fitted}{carried}")
    return GrowReport(metrics, summary, moments)
