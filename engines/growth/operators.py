"""The growth operators a plan names, in one registry: small trained model → grown model.

``GROWTH_OPERATORS`` maps the ``growth`` technique's ``operator`` to a
function (small model, target config, settings, batches) → grown model:

g_stack     depth: the whole model stacked, layers 1…L, 1…L, … (Du et al. 2024);
layer_dup   depth: each layer repeated in place, 1, 1, 2, 2, …;
net2net     width: d_model, heads, kv heads, MLP units (Chen et al. 2016);
compound    width then depth in one step (Gu et al. 2021); a CompoundGrow
            schedule is several grow stages, see ``schedule.compound_shapes``;
ligo        a learned linear operator, fitted on the data (Wang et al. 2023).

Every operator first lengthens the context when the target's ``seq_len`` is
longer (``context.py``). ``function_preserving`` makes the copying operators
exact (``depth.py``, ``width.py``); LiGO refuses it (it learns its operator).

Design decisions:
- Width goes before depth in ``compound``: widening the L-layer model and
  then stacking it costs L widenings instead of L'.
- The grown model's config is the target's shape with two numbers the
  operator owns: ``norm_eps`` scaled by (D/D') after a width growth (what
  makes zero-initialised channels exact under RMSNorm, see ``width.py``) and
  the rotary settings of a context growth. ``grow`` asserts the shape.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Callable

import torch

from engines.architecture.config import ModelConfig
from engines.architecture.model import DecoderLM
from engines.growth import ligo
from engines.growth.context import extend_context
from engines.growth.depth import deepen
from engines.growth.schedule import OPERATORS, GrowSettings, check_growth
from engines.growth.width import widen

Batches = Callable[[], tuple[torch.Tensor, torch.Tensor]]
Autocast = Callable[[], AbstractContextManager]


@dataclass
class Grown:
    model: DecoderLM
    fit_losses: list[float] = field(default_factory=list)  # LiGO's fit, one per step


def _g_stack(model: DecoderLM, target: ModelConfig, s: GrowSettings, batches: Batches | None,
             autocast: Autocast) -> Grown:
    return Grown(deepen(model, target.n_layers, "stack", s.function_preserving, s.identity_logit))


def _layer_dup(model: DecoderLM, target: ModelConfig, s: GrowSettings, batches: Batches | None,
               autocast: Autocast) -> Grown:
    return Grown(deepen(model, target.n_layers, "dup", s.function_preserving, s.identity_logit))


def _net2net(model: DecoderLM, target: ModelConfig, s: GrowSettings, batches: Batches | None,
             autocast: Autocast) -> Grown:
    return Grown(widen(model, target, s.symmetry_noise, s.seed))


def _compound(model: DecoderLM, target: ModelConfig, s: GrowSettings, batches: Batches | None,
              autocast: Autocast) -> Grown:
    wide = widen(model, target, s.symmetry_noise, s.seed)
    return Grown(deepen(wide, target.n_layers, "stack", s.function_preserving, s.identity_logit))


def _ligo(model: DecoderLM, target: ModelConfig, s: GrowSettings, batches: Batches | None,
          autocast: Autocast) -> Grown:
    if batches is None:
        raise ValueError("ligo fits its operator on data; give it batches")
    op = ligo.LigoOperator(model, target, noise=s.symmetry_noise, seed=s.seed)
    losses = ligo.fit(op, batches, s.fit_steps, s.fit_lr, autocast)
    return Grown(ligo.apply(op), losses)


GrowFn = Callable[[DecoderLM, ModelConfig, GrowSettings, "Batches | None", Autocast], Grown]

GROWTH_OPERATORS: dict[str, GrowFn] = {
    "g_stack": _g_stack,
    "layer_dup": _layer_dup,
    "net2net": _net2net,
    "compound": _compound,
    "ligo": _ligo,
}
assert tuple(GROWTH_OPERATORS) == OPERATORS, "schedule.OPERATORS (torch-free) must list the registry"

SHAPE = ("n_layers", "d_model", "n_heads", "kv_heads", "ffn_dim", "seq_len", "vocab_size", "residual", "n_streams")


def grow(model: DecoderLM, target: ModelConfig, settings: GrowSettings, batches: Batches | None = None,
         autocast: Autocast = nullcontext) -> Grown:
    """``model`` grown to ``target``'s shape by ``settings.operator`` (``ValueError`` when it can't)."""
    check_growth(settings.operator, model.config, target)
    model = extend_context(model, target.seq_len, settings.rope)
    grown = GROWTH_OPERATORS[settings.operator](model, target, settings, batches, autocast)
    got = {name: getattr(grown.model.config, name) for name in SHAPE}
    want = {name: getattr(target, name) for name in SHAPE}
    assert got == want, f"grown shape {got} is not the target's {want}"
    return grown
