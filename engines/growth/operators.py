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
- ``MOMENT_MAPS`` carries AdamW's moments through the same operator
  (``optimizer_state: mapped``): ``grow_moments`` takes and returns them keyed
  by parameter name, {name: {"exp_avg", "exp_avg_sq", "step"}}; the
  executor turns them into an optimizer's indices. A longer context changes
  no parameter, so it changes no moment. LiGO has none: its grown weights are
  learned mixtures of several small weights, and a mixture of moments is not
  the moment of a mixture (``schedule.MAPPED`` lists who accepts ``mapped``).
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
from engines.growth.depth import deepen, deepen_moments, layer_sources
from engines.growth.schedule import MAPPED, OPERATORS, GrowSettings, check_growth
from engines.growth.width import widen, widen_moments, width_map, widened_config

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
    losses = ligo.fit(op, batches, s.fit_steps, s.fit_lr, autocast, s.fit_clip)
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

Moments = dict[str, dict[str, torch.Tensor]]  # parameter name → {"exp_avg", "exp_avg_sq", "step"}
KINDS = {"exp_avg": 1, "exp_avg_sq": 2, "step": 0}  # AdamW's state → the power a gradient's factor takes


def _split(moments: Moments) -> dict[str, dict[str, torch.Tensor]]:
    """{name: {kind: t}} → {kind: {name: t}}."""
    out: dict[str, dict[str, torch.Tensor]] = {kind: {} for kind in KINDS}
    for name, state in moments.items():
        for kind, value in state.items():
            if kind not in KINDS:
                raise ValueError(f"optimizer state {kind!r} of {name!r} is not AdamW's; mapped moments "
                                 f"know {', '.join(KINDS)}")
            out[kind][name] = value
    return out


def _join(by_kind: dict[str, dict[str, torch.Tensor]]) -> Moments:
    out: Moments = {}
    for kind, states in by_kind.items():
        for name, value in states.items():
            out.setdefault(name, {})[kind] = value
    return {name: state for name, state in out.items() if set(state) == set(KINDS)}


def _depth_moments(order: str) -> Callable[..., Moments]:
    def mapped(moments: Moments, small: DecoderLM, target: ModelConfig, s: GrowSettings) -> Moments:
        c = small.config
        sources = layer_sources(c.n_layers, target.n_layers, order)
        weights = small.state_dict()
        return _join({kind: deepen_moments(t, weights, sources, c.residual, s.function_preserving,
                                           s.identity_logit) for kind, t in _split(moments).items()})
    return mapped


def _width_moments(moments: Moments, small: DecoderLM, target: ModelConfig, s: GrowSettings) -> Moments:
    config = widened_config(small.config, target)
    m = width_map(small.config, config, s.symmetry_noise, s.seed)  # the weights' map: same seed, same copies
    with torch.device("meta"):
        shapes = DecoderLM(config).state_dict()
    return _join({kind: widen_moments(t, KINDS[kind], shapes, m) for kind, t in _split(moments).items()})


def _compound_moments(moments: Moments, small: DecoderLM, target: ModelConfig, s: GrowSettings) -> Moments:
    wide = _width_moments(moments, small, target, s)
    # the depth step reads only the small model's depth, residual mode and parameter names,
    # which widening keeps
    return _depth_moments("stack")(wide, small, target, s)


MomentFn = Callable[[Moments, DecoderLM, ModelConfig, GrowSettings], Moments]

# operator → how AdamW's moments go through it; ligo has none (see the docstring)
MOMENT_MAPS: dict[str, MomentFn] = {
    "g_stack": _depth_moments("stack"),
    "layer_dup": _depth_moments("dup"),
    "net2net": _width_moments,
    "compound": _compound_moments,
}
assert frozenset(MOMENT_MAPS) == MAPPED, "schedule.MAPPED (torch-free) must list MOMENT_MAPS"


def grow_moments(moments: Moments, small: DecoderLM, target: ModelConfig, settings: GrowSettings) -> Moments:
    """AdamW's moments of ``small`` carried through ``settings.operator`` to ``target``'s
    parameters, keyed by name; a parameter without moments (new, or rewritten by
    the function-preserving option) is left out and starts fresh."""
    if settings.operator not in MOMENT_MAPS:
        raise ValueError(settings.mapped_refusal())
    check_growth(settings.operator, small.config, target)
    return MOMENT_MAPS[settings.operator](moments, small, target, settings)


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
