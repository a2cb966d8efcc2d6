"""Growth decided without torch: options, which shapes an operator may join,
CompoundGrow's schedule of shapes, G_stack's timing rule, the re-warmup.

The planner and the runner's plan check import this module, so it imports no
torch (``engines.architecture.config`` is torch-free too).

Design decisions:
- ``GrowSettings`` is the one parsed form of a grow stage's options (the
  ``growth`` technique's options merged under the stage's own). Unknown keys
  and bad values raise ``ValueError`` naming what is accepted, so a plan
  fails when a run is checked, not after the small model has trained.
- ``optimizer_state``: ``fresh`` (the default, and what G_stack and LiGO
  do: both restart the optimizer after growth) or ``mapped``: the small
  stage's AdamW moments carried through the same operator (``MAPPED``: the
  copying operators; ``operators.MOMENT_MAPS`` and the docstrings of
  ``depth.py`` and ``width.py`` say how), written into the grow stage's
  checkpoint and loaded by the continue stage into its new optimizer (its
  own lr and schedule kept). LiGO refuses it: its operator is learned.
- Which dimensions an operator may change: the depth operators (``g_stack``,
  ``layer_dup``) change layers only, ``net2net`` width only (d_model, heads,
  kv heads, MLP width) with the head size fixed — rotary frequencies depend on
  it, so a new head size would change every attention score — ``compound``
  and ``ligo`` both. Every operator may lengthen the context (seq_len).
- CompoundGrow (Gu et al., NAACL 2021) grows depth, width and heads together
  in 2–3 steps, e.g. (6, 512, 8) → (8, 640, 10) → (12, 768, 12);
  ``compound_shapes`` interpolates layers and heads linearly between the small
  and the target shape at a fixed head size.
- G_stack (Du et al., NeurIPS 2024) recommends a growth factor g = 4 and
  fits the number of tokens to train the small model before stacking; we
  recall the fit as log10 d = 0.88·log10 N + 163.27/log10 C − 5.74 (N the
  target's parameters, C the FLOPs budget; about 10B tokens at their
  410M–7B scales) but could not re-check the constants against the paper's
  text here, so muse does not use it.
  The planner uses ``at_fraction`` (SEEDS.md: growth 20–30% into training),
  also because toy budgets lie far outside the range the rule was fitted on.
- Sequence length: a growth may lengthen the context (``check_growth``), in
  a plan through the technique's ``small_seq_len`` (the small stage trains
  at it; the planner's concern, a plan key here). The rotary settings are
  the operator's (``rope``: none | linear | ntk, ``context.py``), so the
  target's ``rope_theta`` is not compared with the small model's, and
  the resolver (``muse_plan.executor.settings.grown_rope``) gives each stage
  the settings its weights were grown into.
- After growth the learning rate re-warms over ``rewarm_fraction`` of the
  continue stage's steps (SEEDS.md: 1–2%), replacing the stage's warmup.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Literal

from engines.architecture.config import ModelConfig
from engines.architecture.shapes import Shape, swiglu_hidden


OPERATORS: tuple[str, ...] = ("g_stack", "layer_dup", "net2net", "compound", "ligo")
DEPTH = frozenset({"g_stack", "layer_dup", "compound", "ligo"})  # may change n_layers
WIDTH = frozenset({"net2net", "compound", "ligo"})  # may change d_model, heads, d_ff
MAPPED = frozenset({"g_stack", "layer_dup", "net2net", "compound"})  # carry AdamW's moments
OPTIMIZER_STATES: tuple[str, ...] = ("fresh", "mapped")
ROPE_SCALINGS: tuple[str, ...] = ("none", "linear", "ntk")
# keys of the growth technique that concern other stages (planner, continue stage)
_PLAN_KEYS = frozenset({"factor", "at_fraction", "rewarm_fraction", "small_seq_len"})


@dataclass(frozen=True)
class GrowSettings:
    operator: Literal["g_stack", "layer_dup", "net2net", "compound", "ligo"] = "g_stack"
    function_preserving: bool = False
    optimizer_state: str = "fresh"
    noise: float | None = None  # None: 0 when function-preserving, else 0.01 (symmetry breaking)
    identity_logit: float = 20.0  # mHC's H_res logit gap for identity new blocks (see depth.py)
    rope: str = "linear"  # how a longer context is reached: none | linear | ntk
    fit_steps: int = 200  # LiGO: optimizer steps fitting the growth operator
    fit_lr: float = 1e-3  # LiGO: Adam learning rate of the operator
    fit_clip: float | None = None  # LiGO: the fit's gradient clipping (the executor passes the stage's)
    seed: int = 0

    def __post_init__(self) -> None:
        for name, kinds in (("function_preserving", (bool,)), ("noise", (int, float, type(None))),
                            ("identity_logit", (int, float)), ("fit_lr", (int, float)),
                            ("fit_clip", (int, float, type(None))), ("seed", (int,))):
            value = getattr(self, name)
            if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
                raise ValueError(f"growth option {name} must be a {'boolean' if kinds == (bool,) else 'number'}, "
                                 f"got {value!r}")
        if self.operator not in OPERATORS:
            raise ValueError(f"unknown growth operator {self.operator!r}; accepted: {', '.join(OPERATORS)}")
        if self.optimizer_state not in OPTIMIZER_STATES:
            raise ValueError(f"growth optimizer_state {self.optimizer_state!r}: accepted "
                             f"{', '.join(OPTIMIZER_STATES)}")
        if self.optimizer_state == "mapped" and self.operator not in MAPPED:
            raise ValueError(self.mapped_refusal())
        if self.function_preserving and self.operator == "ligo":
            raise ValueError("ligo learns its operator and is not function-preserving; set function_preserving "
                             "to false, or use g_stack, layer_dup, net2net or compound")
        if self.rope not in ROPE_SCALINGS:
            raise ValueError(f"growth rope {self.rope!r}: accepted {', '.join(ROPE_SCALINGS)}")
        if self.noise is not None and self.noise < 0:
            raise ValueError(f"growth noise must be at least 0, got {self.noise}")
        if not isinstance(self.fit_steps, int) or self.fit_steps < 1 or self.fit_lr <= 0:
            raise ValueError(f"growth fit_steps must be a positive integer and fit_lr positive, "
                             f"got {self.fit_steps!r} and {self.fit_lr!r}")

    def mapped_refusal(self) -> str:
        return (f"growth optimizer_state 'mapped' does not work with {self.operator}: it learns its operator, "
                f"and moments don't pass through a learned mixture of weights; use optimizer_state 'fresh', "
                f"or one of {', '.join(o for o in OPERATORS if o in MAPPED)}")

    @property
    def mapped(self) -> bool:
        return self.optimizer_state == "mapped"

    @property
    def symmetry_noise(self) -> float:
        if self.noise is not None:
            return self.noise
        return 0.0 if self.function_preserving else 0.01

    @property
    def trains(self) -> int:
        """Steps the grow stage itself takes (LiGO's fit), 0 for the copying operators."""
        return self.fit_steps if self.operator == "ligo" else 0


def grow_settings(options: dict[str, Any]) -> GrowSettings:
    """Parse a grow stage's options; ``ValueError`` with the accepted values. An
    option given as None (a plan's unset ``fit_steps``) takes its default."""
    known = {f.name for f in fields(GrowSettings)}
    unknown = sorted(k for k in options if k not in known and k not in _PLAN_KEYS)
    if unknown:
        raise ValueError(f"unknown growth option {', '.join(map(repr, unknown))}; "
                         f"accepted: {', '.join(sorted(known | _PLAN_KEYS))}")
    return GrowSettings(**{k: v for k, v in options.items() if k in known and v is not None})


def _describe(c: ModelConfig) -> str:
    return f"{c.n_layers}×{c.d_model} ({c.n_heads} heads, {c.kv_heads} kv, MLP {c.ffn_dim})"


def check_growth(operator: str, small: ModelConfig, big: ModelConfig) -> None:
    """Refuse a growth the operator can't make, saying which dimension is wrong."""
    if operator not in OPERATORS:
        raise ValueError(f"unknown growth operator {operator!r}; accepted: {', '.join(OPERATORS)}")
    fixed = ("vocab_size", "residual", "n_streams")
    for name in fixed:
        if getattr(small, name) != getattr(big, name):
            raise ValueError(f"growth keeps {name}: the small model has {getattr(small, name)!r}, "
                             f"the target {getattr(big, name)!r}")
    if big.seq_len < small.seq_len:
        raise ValueError(f"growth can't shorten the context: seq_len {small.seq_len} → {big.seq_len}")
    width = (small.d_model, small.n_heads, small.kv_heads, small.ffn_dim)
    grown = (big.d_model, big.n_heads, big.kv_heads, big.ffn_dim)
    if any(b < s for s, b in zip(width, grown)) or big.n_layers < small.n_layers:
        raise ValueError(f"growth can't shrink: {_describe(small)} → {_describe(big)}")
    if operator not in DEPTH and big.n_layers != small.n_layers:
        raise ValueError(f"{operator} grows width only, but layers change {small.n_layers} → {big.n_layers}; "
                         f"use compound or ligo to grow both")
    if operator not in WIDTH and width != grown:
        raise ValueError(f"{operator} grows depth only, but the width changes: {_describe(small)} → "
                         f"{_describe(big)}; use compound or ligo to grow both")
    if width != grown and gqa_refusal(small, big):
        raise ValueError(gqa_refusal(small, big))
    if width != grown and small.head_dim != big.head_dim:
        raise ValueError(f"growing width keeps the head size (rotary frequencies depend on it): "
                         f"{small.head_dim} in the small model, {big.head_dim} in the target; "
                         f"give the target {big.d_model // small.head_dim} heads")


def gqa_refusal(small: ModelConfig, big: ModelConfig) -> str | None:
    """Why a width growth can't keep the function under grouped-query attention, or None:
    each small group of g query heads must be seated in whole grown groups of g' (it needs
    ceil(g/g') grown key/value heads), see ``width.head_sources``."""
    g_small, g_big = small.n_heads // small.kv_heads, big.n_heads // big.kv_heads
    if small.kv_heads * -(-g_small // g_big) <= big.kv_heads:
        return None
    return (f"growing {small.n_heads} query heads on {small.kv_heads} key/value heads into {big.n_heads} on "
            f"{big.kv_heads} can't keep the function: each of the {small.kv_heads} groups of {g_small} query "
            f"heads needs {-(-g_small // g_big)} grown groups of {g_big}; give the target more key/value heads")


def compound_shapes(small: Shape, target: Shape, steps: int = 2) -> list[Shape]:
    """CompoundGrow's shapes from ``small`` to ``target`` in ``steps`` growth steps
    (both ends included): layers and heads interpolated, head size kept."""
    head_dim = target.d_model // target.n_heads
    kv_ratio = target.n_heads // target.n_kv_heads
    shapes = [small]
    for i in range(1, steps):
        heads = round(small.n_heads + (target.n_heads - small.n_heads) * i / steps)
        layers = round(small.layers + (target.layers - small.layers) * i / steps)
        kv = heads // kv_ratio if heads % kv_ratio == 0 else heads
        d_model = heads * head_dim
        shapes.append(Shape(layers, d_model, heads, kv, max(small.d_ff, swiglu_hidden(d_model))))
    return shapes + [target]


def rewarm_steps(steps: int, fraction: float) -> int:
    """Warmup steps after growth: ``fraction`` of the stage, at least one."""
    return max(1, round(steps * fraction))
