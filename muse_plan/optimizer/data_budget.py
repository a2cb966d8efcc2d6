"""What a plan's data is worth: epochs, effective tokens under repetition, and
the model size that makes the best use of the data and the compute in hand.

Pure arithmetic (no I/O, no torch); ``data_size`` says how many tokens a
source holds, the fit prices the stages, and this module weighs the two.

The equations, and where each comes from:

- Epochs: ``E = D / U_D`` for ``D`` tokens trained on ``U_D`` unique ones;
  repetitions ``R_D = max(0, E - 1)``.
- Effective data, Muennighoff et al. 2023, "Scaling Data-Constrained Language
  Models" (arXiv:2305.16264), Section 3, Eq. 5:
  ``D' = U_D + U_D · R*_D · (1 - exp(-R_D / R*_D))``. A repeated token is
  worth ``exp(-k / R*_D)`` of a fresh one on its k-th repetition, so a few
  epochs are almost as good as new data (4 epochs: D' = 3.73·U_D, 93%),
  and D' can never pass ``U_D · (1 + R*_D)``, about 16.4·U_D.
- Effective parameters, same section, Eq. 6: ``U_N = min(N, N_opt(U_D))``,
  ``R_N = max(0, N / U_N - 1)``, ``N' = U_N + U_N · R*_N · (1 - exp(-R_N / R*_N))``:
  parameters beyond what the unique data can feed lose value the same way.
- The data-constrained loss, same section, Eq. 7: Chinchilla's form
  (Hoffmann et al. 2022, "Training Compute-Optimal Large Language Models",
  arXiv:2203.15556, Eq. 2) with N', D' in place of N, D:
  ``L = E + A / N'^α + B / D'^β``. ``N_opt(D)``, the parameters a compute-
  optimal run on D tokens trains, is Hoffmann et al.'s Eq. 4 allocation
  inverted: ``N_opt = (D · G)^(β/α) · G`` with ``G = (α·A / (β·B))^(1/(α+β))``;
  with these constants it is D / 19.6, Chinchilla's 20 tokens a parameter.
- The fitted constants are the authors' own, as published with the paper's
  code (github.com/huggingface/datablations, README, "Parametric Fit"):
  R*_D = 15.387756, R*_N = 5.309743, A = e^6.255414, B = e^7.3049974,
  E = e^0.6254804, α = β = 0.3526596. They were fitted on English C4 with the
  GPT-2 tokenizer, so the loss they give is no prediction of a run's loss on
  other data; it is used here only to rank sizes against one another.

Design decisions:
- Epochs are counted over the stages that read the corpus (the architecture
  engine's: pretrain, continue, finetune; the RL stages generate their own
  tasks), in plan order: a continue stage after a growth re-reads what the
  small model already read, so its tokens are priced at the repetition it
  actually reaches. A stage's effective tokens are D'(all through it) −
  D'(all before it), so the stages' shares add up to the plan's D'.
- A warning from past 4 epochs: the paper's headline is that up to 4 epochs
  of repetition cost next to nothing against unique data.
- The size proposal (``best_size``) minimises Eq. 7's loss over the sizes the
  hardware fits, each trained for as many tokens as the timeline allows at
  its predicted throughput, but never past ``1 + R*_D`` epochs (from there a
  further epoch is worth less than 1/e of fresh data, the paper's "returns
  diminish around 16 epochs"). Sizes whose loss is within ``LOSS_TIE`` of
  the best are ties, and a tie goes to the shorter run. With no timeline a
  size trains Chinchilla's 20 tokens a parameter, within the same epoch cap.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

# Muennighoff et al. 2023, fitted constants (datablations README, "Parametric Fit")
R_D_STAR = 15.387756
R_N_STAR = 5.309743
LAW_A = math.exp(6.255414)
LAW_B = math.exp(7.3049974)
LAW_E = math.exp(0.6254804)
LAW_ALPHA = 0.3526596
LAW_BETA = 0.3526596

EPOCH_WARNING = 4.0  # past this many epochs repetition starts to cost (the paper's headline)
MAX_EPOCHS = 1 + R_D_STAR  # past R*_D repetitions a further epoch is worth < 1/e of fresh data
LOSS_TIE = 0.002  # Eq. 7 losses this close (relative) rank as equal; the shorter run wins
TOKENS_PER_PARAM = 20  # Hoffmann et al. 2022: a compute-optimal run's tokens a parameter
MORE_DATA = 4  # "what more data would buy": the proposal again with this many times the data


def epochs(tokens: float, unique: float) -> float:
    """How many passes ``tokens`` of training make over ``unique`` tokens."""
    if unique <= 0:
        raise ValueError(f"unique tokens must be positive, got {unique}")
    return tokens / unique


def repetitions(tokens: float, unique: float) -> float:
    """R_D: the epochs after the first (0 while the data is not exhausted)."""
    return max(0.0, epochs(tokens, unique) - 1)


def effective_tokens(tokens: float, unique: float) -> float:
    """D' (Muennighoff et al. 2023, Eq. 5): what ``tokens`` of training over ``unique``
    distinct tokens are worth in fresh tokens; ``tokens`` itself up to one epoch."""
    if tokens <= unique:
        return float(tokens)
    r = repetitions(tokens, unique)
    return unique + unique * R_D_STAR * (1 - math.exp(-r / R_D_STAR))


def _g() -> float:
    return (LAW_ALPHA * LAW_A / (LAW_BETA * LAW_B)) ** (1 / (LAW_ALPHA + LAW_BETA))


def data_optimal_params(tokens: float) -> float:
    """N_opt(D): the parameters a compute-optimal run on ``tokens`` trains (Hoffmann
    et al. 2022, Eq. 4, inverted; the datablations code's ``D_to_N``)."""
    g = _g()
    return (tokens * g) ** (LAW_BETA / LAW_ALPHA) * g


def effective_params(params: float, unique: float) -> float:
    """N' (Muennighoff et al. 2023, Eq. 6): parameters past what ``unique`` tokens can
    feed (U_N = N_opt(U_D)) decay in value like repeated tokens, with R*_N."""
    base = min(params, data_optimal_params(unique))
    r = max(0.0, params / base - 1)
    return base + base * R_N_STAR * (1 - math.exp(-r / R_N_STAR))


def law_loss(params: float, tokens: float, unique: float | None) -> float:
    """Eq. 7's loss for ``params`` trained on ``tokens`` over ``unique`` distinct tokens
    (None: unbounded data, Chinchilla's Eq. 2). For ranking sizes only (module docstring)."""
    if unique is None:
        n, d = params, tokens
    else:
        n, d = effective_params(params, unique), effective_tokens(tokens, unique)
    return LAW_E + LAW_A / n ** LAW_ALPHA + LAW_B / d ** LAW_BETA


# ---- the plan's stages against the data ------------------------------------------

@dataclass(frozen=True)
class StageData:
    """One corpus-reading stage: its tokens, its epochs of the unique data, and what
    they are worth; ``before``: the epochs the stages before it already read."""

    name: str
    tokens: float
    epochs: float
    before: float
    effective: float

    @property
    def through(self) -> float:
        """Epochs of the data read by the end of this stage."""
        return self.before + self.epochs

    @property
    def repeats(self) -> bool:
        return self.through > 1

    @property
    def warning(self) -> bool:
        return self.through > EPOCH_WARNING


def stage_data(stages: list[tuple[str, float]], unique: float) -> list[StageData]:
    """Each (name, tokens) stage, in plan order, against ``unique`` tokens (module docstring)."""
    out, seen = [], 0.0
    for name, tokens in stages:
        worth = max(0.0, effective_tokens(seen + tokens, unique) - effective_tokens(seen, unique))
        out.append(StageData(name, tokens, epochs(tokens, unique), epochs(seen, unique), worth))
        seen += tokens
    return out


@dataclass
class DataReport:
    """A plan's data (``data_size.DataSize``) and its corpus stages against it; ``proposal``:
    the alternative that makes the best use of it (``alternatives.best_use``), where the
    plan's stages run past ``EPOCH_WARNING`` epochs."""

    size: Any
    stages: list[StageData] = field(default_factory=list)
    proposal: Any = None

    @property
    def binding(self) -> bool:
        return any(s.warning for s in self.stages)

    @property
    def effective(self) -> float:
        return sum(s.effective for s in self.stages)


# ---- the size that makes the best use of the data and the compute ----------------

@dataclass(frozen=True)
class SizeOption:
    """A model size the hardware fits from scratch, and how fast it trains there."""

    scale: int  # nominal, as the plan writes it
    params: int  # counted (embeddings included, as Hoffmann et al. count)
    seconds_per_token: float


@dataclass(frozen=True)
class SizeChoice:
    option: SizeOption
    tokens: float
    unique: float
    loss: float

    @property
    def epochs(self) -> float:
        return epochs(self.tokens, self.unique)

    @property
    def effective(self) -> float:
        return effective_tokens(self.tokens, self.unique)

    @property
    def seconds(self) -> float:
        return self.tokens * self.option.seconds_per_token


def tokens_for(option: SizeOption, unique: float, timeline_s: float | None) -> float:
    """The tokens ``option`` trains: what the timeline allows (without one, Chinchilla's
    ``TOKENS_PER_PARAM`` a parameter), at most ``MAX_EPOCHS`` of the data."""
    cap = MAX_EPOCHS * unique
    if timeline_s is None:
        return min(cap, TOKENS_PER_PARAM * option.params)
    return min(cap, timeline_s / option.seconds_per_token)


def best_size(options: list[SizeOption], unique: float, timeline_s: float | None) -> SizeChoice | None:
    """The size whose run on ``unique`` tokens within ``timeline_s`` has the lowest Eq. 7
    loss (ties within ``LOSS_TIE``: the shorter run); None without options."""
    choices = []
    for option in options:
        tokens = tokens_for(option, unique, timeline_s)
        if tokens > 0:
            choices.append(SizeChoice(option, tokens, unique, law_loss(option.params, tokens, unique)))
    if not choices:
        return None
    best = min(c.loss for c in choices)
    ties = [c for c in choices if c.loss <= best * (1 + LOSS_TIE)]
    return min(ties, key=lambda c: (c.seconds, -c.option.params))
