"""Sequence-length growth: extend a trained decoder's context from T to T'.

The decoder has no position parameters (rotary embeddings, RoFormer), so a
longer context is a new config, the same weights, and a choice of how the
rotary angles of positions beyond T are made (``ROPE_SCALINGS``):

none     keep the frequencies θ_i = θ^(−2i/d): positions < T turn exactly as
         before (the grown model is the small one on inputs of length ≤ T);
         positions ≥ T see angles never trained on (extrapolation).
linear   position interpolation (Chen et al., 2023, "Extending Context Window
         of Large Language Models via Positional Interpolation"): position t
         turns by the angle of t·T/T', so the whole new context spans the
         trained angles; short inputs change (the model needs a short
         fine-tune, which the continue stage is). ``config.rope_scale``.
ntk      "NTK-aware" scaling (bloc97, 2023): θ' = θ·s^(d/(d−2)) with s = T'/T
         stretches the low frequencies most and leaves the highest nearly
         as trained.

In a plan the small stage trains at ``stage.seq_len`` (the growth technique's
``small_seq_len``) and the grow stage lengthens the context to its own. The
rotary settings are not parameters (the angles are a non-persistent buffer),
so a stage that trains the grown weights must be built with them:
``muse_plan.executor.settings.grown_rope`` walks a stage's lineage through its grow stages and
gives every later stage the settings its weights were grown into.

This module's config half is torch-free (the planner's side uses it); only
``extend_context`` builds a model.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING, Callable

from engines.architecture.config import ModelConfig

if TYPE_CHECKING:
    from engines.architecture.model import DecoderLM


def _none(c: ModelConfig, seq_len: int) -> ModelConfig:
    return replace(c, seq_len=seq_len)


def _linear(c: ModelConfig, seq_len: int) -> ModelConfig:
    return replace(c, seq_len=seq_len, rope_scale=c.rope_scale * seq_len / c.seq_len)


def _ntk(c: ModelConfig, seq_len: int) -> ModelConfig:
    s, d = seq_len / c.seq_len, c.head_dim
    return replace(c, seq_len=seq_len, rope_theta=c.rope_theta * s ** (d / (d - 2)))


ROPE_SCALINGS: dict[str, Callable[[ModelConfig, int], ModelConfig]] = {
    "none": _none,
    "linear": _linear,
    "ntk": _ntk,
}


def extended_config(config: ModelConfig, seq_len: int, rope: str = "linear") -> ModelConfig:
    if rope not in ROPE_SCALINGS:
        raise ValueError(f"unknown rope scaling {rope!r}; accepted: {', '.join(ROPE_SCALINGS)}")
    if seq_len < config.seq_len:
        raise ValueError(f"context growth can't shorten seq_len {config.seq_len} → {seq_len}")
    return config if seq_len == config.seq_len else ROPE_SCALINGS[rope](config, seq_len)


def extend_context(model: DecoderLM, seq_len: int, rope: str = "linear") -> DecoderLM:
    """``model`` with a ``seq_len`` context: a new model holding a copy of the weights."""
    from engines.architecture.model import DecoderLM

    config = extended_config(model.config, seq_len, rope)
    if config == model.config:
        return model
    grown = DecoderLM(config).to(model.tok_emb.weight.device)
    grown.load_state_dict(model.state_dict())
    return grown
