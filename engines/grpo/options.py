"""The GRPO engine's options, one frozen model per stage kind and RL algorithm; no torch.

Design decisions:
- The technique models (``GrpoOptions``, ``SGrpoOptions``, ``TSpmoOptions``,
  what a plan writes under ``techniques``) and the stage models are one
  family: a stage's model is its algorithm's technique model plus what every
  GRPO-engine stage reads (tasks, sampling length and temperature, held-out
  evaluation, LoRA). So a default is written once, here, and a stage
  inherits the technique's values for the fields it shares.
- ``reasoning_rl`` and ``all_scenarios_rl`` pick their model by
  ``algorithm``; ``cold_start_sft`` and ``rejection_sampling`` have their
  own. ``parse`` is the one entry: it raises ``ValueError`` with one line.
- Rewards are named by the fields of ``RewardWeights``; the binary
  correctness reward is the default of S-GRPO and T-SPMO (Lee & Tong score
  a completion right or wrong), GRPO's default adds SEEDS.md's format and
  length terms.
- T-SPMO's objective has no KL term, so its ``kl_beta`` must stay 0.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import ConfigDict, Field, PositiveInt, ValidationError, field_validator, model_validator

from engines.options import ExampleFiles, LoraOptions, Options, one_line

RL_ALGORITHMS = ("grpo", "s_grpo", "t_spmo")
DEFAULT_TASKS = ("multiplication",)

# captured decode steps of muse's decoder kept between rollouts (``policy.Policy._keep``): at most this
# many, their caches at most this many bytes together (the memory model holds them through the update)
KEPT_DECODES, KEPT_DECODE_BYTES = 2, 1 << 30


class RewardWeights(Options):
    """SEEDS.md's weights for an unstable GRPO run (the KL term is the loss's), and any
    reward of the user's own: ``module:function`` or ``file.py:function`` as a key, its
    weight as the value (``engines/grpo/rewards.py``), imported when the plan is read."""

    model_config = ConfigDict(frozen=True, extra="allow")

    correctness: float = 1.0
    extracted: float = Field(0.0, description="the answer marked by \\boxed{}, ####, <answer> or Answer:")
    format: float = 0.3
    efficiency: float = 0.2
    consistency: float = Field(0.0, description="share of true equations in the worked steps (all-scenarios RL)")

    @model_validator(mode="after")
    def _user_rewards(self) -> RewardWeights:
        from engines.grpo.rewards import REWARDS, is_reference, load_reward
        from engines.options import checks_files

        for name, weight in (self.model_extra or {}).items():
            if not is_reference(name):
                raise ValueError(f"unknown reward {name!r}; accepted: {', '.join(REWARDS)}, or your own as "
                                 "module:function or file.py:function")
            if isinstance(weight, bool) or not isinstance(weight, (int, float)):
                raise ValueError(f"reward {name!r}: its weight {weight!r} is not a number")
            if checks_files():
                load_reward(name)  # a reference that does not import is refused now, not mid-run
        return self

    def active(self) -> dict[str, float]:
        return {name: float(w) for name, w in self.model_dump().items() if w}


CORRECTNESS_ONLY = RewardWeights(format=0.0, efficiency=0.0)


class GrpoOptions(Options):
    """GRPO (DeepSeekMath; DeepSeek-R1): group-normalised advantages, clipped ratio, k3 KL."""

    group_size: PositiveInt = 8
    clip_eps: float = Field(0.2, gt=0)
    clip_eps_high: float | None = Field(None, gt=0, description="asymmetric upper clip; None = clip_eps")
    kl_beta: float = Field(0.04, ge=0)
    scale_rewards: Literal["group", "batch", "none"] = Field(
        "group", description="advantage = centred reward / the group's or the micro-batch's sample std, "
                             "or only centred (none: Dr. GRPO); TRL's names and std")
    loss_normalization: Literal["token_batch", "token_prompt", "sequence", "constant"] = Field(
        "token_batch", description="token_batch: every token of the micro-batch weighs the same (TRL bnpo); "
                                   "token_prompt: per prompt, then prompts (DAPO eq. 8); sequence: per "
                                   "completion (GRPO); constant: / completions × max_new_tokens (Dr. GRPO)")
    temperature: float = Field(0.3, gt=0, description="Lee & Tong sample at 0.3")
    max_new_tokens: PositiveInt = 300
    reward_weights: RewardWeights = RewardWeights()

    @model_validator(mode="before")
    @classmethod
    def _earlier_names(cls, data: Any) -> Any:
        """``scale_by_std: false`` is ``scale_rewards: none``; ``token`` is ``token_batch``."""
        if isinstance(data, dict):
            data = dict(data)
            if "scale_by_std" in data and "scale_rewards" not in data:
                data["scale_rewards"] = "group" if data.pop("scale_by_std") else "none"
            if data.get("loss_normalization") == "token":
                data["loss_normalization"] = "token_batch"
        return data


class SGrpoOptions(GrpoOptions):
    """S-GRPO (Lee & Tong 2025): tokens before cutoff ``alpha`` always, later ones w.p. ``p`` up to ``k``."""

    alpha: PositiveInt = Field(25, description="cutoff index: earlier completion tokens always enter the loss")
    p: float = Field(0.5, gt=0, le=1, description="probability that a later token enters the loss")
    k: PositiveInt = Field(50, description="most tokens of one completion that enter the loss")
    kl_beta: float = Field(0.01, ge=0)
    reward_weights: RewardWeights = CORRECTNESS_ONLY
    loss_normalization: Literal["token_batch", "token_prompt", "sequence", "constant"] = Field(
        "sequence", description="S-GRPO keeps GRPO's per-completion mean over the tokens it lets in")


class TSpmoOptions(Options):
    """T-SPMO (Lee & Tong 2025): prefix-tree token advantages, LoRA L2, replay."""

    group_size: PositiveInt = Field(50, description="the paper samples |G| = 50")
    l2_lambda: float = Field(0.01, ge=0, description="λ on the LoRA weights' squared norm")
    replay: bool = True
    success_threshold: float = Field(1.0, description="reward r at or above which a completion is a success")
    success_budget: int = Field(2, ge=0, description="C_success: replays from successes per update")
    failure_budget: int = Field(0, ge=0, description="C_failure: replays from failures per update")
    kl_beta: float = Field(0.0, ge=0, le=0, description="T-SPMO's objective has no KL term")
    temperature: float = Field(0.3, gt=0)
    max_new_tokens: PositiveInt = 300
    reward_weights: RewardWeights = CORRECTNESS_ONLY


class StageOptions(ExampleFiles):
    """What every GRPO-engine stage reads: generated ``tasks``, or the rows of ``data``."""

    tasks: tuple[str, ...] = Field(DEFAULT_TASKS, description="generated tasks, e.g. multiplication:3x3")
    max_new_tokens: PositiveInt = 300
    temperature: float = Field(0.3, gt=0, description="sampling temperature of the stage's rollouts")
    eval_problems: PositiveInt = Field(64, description="held-out problems scored at each evaluation")
    eval_samples: PositiveInt = Field(4, description="samples per held-out problem for sampled accuracy")
    eval_temperature: float | None = Field(None, gt=0, description="None: the stage's temperature")
    lora: LoraOptions | None = None

    @field_validator("tasks", mode="before")
    @classmethod
    def _tasks(cls, value: Any) -> Any:
        from engines.data.arithmetic import task

        names = [value] if isinstance(value, str) else list(value)
        if not names:
            raise ValueError("tasks is empty; name at least one, e.g. multiplication:3x3")
        for name in names:
            task(str(name))  # an unknown task or size raises with what is accepted
        return tuple(names)

    @property
    def sampled_eval_temperature(self) -> float:
        return self.eval_temperature if self.eval_temperature is not None else self.temperature


class SftOptions(StageOptions):
    """``cold_start_sft``: supervised on worked solutions."""

    needs: ClassVar[Literal["completion", "answer"]] = "completion"


class RejectionSamplingOptions(StageOptions):
    """``rejection_sampling``: sample, keep the right completions, fine-tune on them."""

    samples: PositiveInt = Field(8, description="completions sampled per prompt")
    sampling_temperature: float = Field(0.7, gt=0)
    keep: Literal["all", "most_confident"] = "all"


class _Rl(StageOptions):
    updates_per_rollout: PositiveInt = Field(1, description="μ: updates on each batch of rollouts")


class GrpoRl(_Rl, GrpoOptions):
    algorithm: Literal["grpo"] = "grpo"


class SGrpoRl(_Rl, SGrpoOptions):
    algorithm: Literal["s_grpo"] = "s_grpo"


class TSpmoRl(_Rl, TSpmoOptions):
    algorithm: Literal["t_spmo"] = "t_spmo"


RL_MODELS: dict[str, type[_Rl]] = {"grpo": GrpoRl, "s_grpo": SGrpoRl, "t_spmo": TSpmoRl}
TECHNIQUES: dict[str, type[Options]] = {"grpo": GrpoOptions, "s_grpo": SGrpoOptions, "t_spmo": TSpmoOptions}
KIND_MODELS: dict[str, type[StageOptions]] = {"cold_start_sft": SftOptions,
                                              "rejection_sampling": RejectionSamplingOptions}


def model_for(kind: str, options: dict[str, Any]) -> type[StageOptions]:
    """The options model of a stage of ``kind`` whose options are ``options``."""
    if kind in KIND_MODELS:
        return KIND_MODELS[kind]
    algorithm = options.get("algorithm", "grpo")
    if algorithm not in RL_MODELS:
        raise ValueError(f"unknown RL algorithm {algorithm!r}; accepted: {', '.join(RL_ALGORITHMS)}")
    return RL_MODELS[algorithm]


def technique_of(kind: str, options: dict[str, Any]) -> str:
    """The technique whose options a stage takes as defaults: its RL algorithm, else grpo."""
    algorithm = options.get("algorithm", "grpo") if kind not in KIND_MODELS else "grpo"
    return algorithm if algorithm in RL_MODELS else "grpo"


def parse(kind: str, technique: dict[str, Any], stage: dict[str, Any]) -> StageOptions:
    """A stage's typed options: the technique's values for the fields the stage's
    model has, the stage's own on top (every key of those must be known)."""
    model = model_for(kind, stage)
    merged = {k: v for k, v in technique.items() if k in model.model_fields}
    merged.update(stage)
    try:
        return model.model_validate(merged)
    except ValidationError as exc:
        raise ValueError(one_line(exc, model)) from None
