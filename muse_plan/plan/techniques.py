"""Techniques a plan can integrate, each with its own typed options.

A plan's ``techniques`` is a set with options: in YAML a mapping from name to
options (``{grpo: {group_size: 8}, mhc: {}}``) or a plain list of names; on
the command line ``--techniques grpo,mhc,growth`` (every option at its
default). Unknown names and unknown options fail at validation, naming what
is accepted. Defaults follow the papers where the papers state them (cited
per field). The RL algorithms' and LoRA's models are their engines' own
(``engines/grpo/options.py``, ``engines/options.py``): a stage of that
engine takes a technique's values as its defaults, so each default is
written once.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, PositiveInt, model_validator

from engines.grpo.options import GrpoOptions, RewardWeights, SGrpoOptions, TSpmoOptions
from engines.options import LoraOptions, Options

__all__ = ["GrpoOptions", "SGrpoOptions", "TSpmoOptions", "RewardWeights", "LoraOptions", "MhcOptions",
           "GeometricScalingOptions", "GrowthOptions", "RkdoOptions", "Techniques", "TECHNIQUE_NAMES"]


StreamDtype = Literal["float32", "bfloat16"]  # engines.architecture.config.STREAM_DTYPES


class MhcOptions(Options):
    """mHC (DeepSeek 2025): n residual streams, H_res on the Birkhoff polytope."""

    streams: PositiveInt = Field(4, description="expansion rate n")
    sinkhorn_iters: PositiveInt = Field(20, description="Sinkhorn-Knopp iterations t_max")
    stream_dtype: StreamDtype = Field("float32", description="the n-stream state between connections "
                                                             "(bfloat16 halves its memory traffic)")


class GeometricScalingOptions(Options):
    """mHC + deep delta learning (Su & You 2026; Zhang et al. 2026): residual mode ``mgt``."""

    streams: PositiveInt = 4
    sinkhorn_iters: PositiveInt = 20
    stream_dtype: StreamDtype = "float32"
    beta_max: float = Field(2.0, gt=0, le=2, description="upper end of the delta gate β ∈ [0, β_max]")


class GrowthOptions(Options):
    """Train small, grow, continue (G_stack, Net2Net, CompoundGrow, LiGO); with
    ``small_seq_len`` the small stage also trains at a shorter context."""

    operator: Literal["g_stack", "layer_dup", "net2net", "compound", "ligo"] = "g_stack"
    factor: PositiveInt = Field(4, description="G_stack recommends a growth factor g = 4")
    at_fraction: float = Field(0.25, gt=0, lt=1, description="share of the token budget spent small")
    function_preserving: bool = False
    optimizer_state: Literal["fresh", "mapped"] = Field(
        "fresh", description="mapped: the small stage's AdamW moments carried through the operator (not ligo)")
    rewarm_fraction: float = Field(0.02, ge=0, lt=1, description="LR re-warmup, share of the continue stage")
    small_seq_len: PositiveInt | None = Field(
        None, description="context the small stage trains at; the grow stage extends it to model.seq_len")
    rope: Literal["none", "linear", "ntk"] = Field(
        "linear", description="rotary scaling when the context grows: position interpolation, NTK, or none")
    fit_steps: PositiveInt | None = Field(
        None, description="LiGO: steps fitting its operator (default 200), each about one grown-model micro-step")
    fit_lr: float | None = Field(None, gt=0, description="LiGO: the operator's Adam learning rate (default 1e-3)")

    @model_validator(mode="after")
    def _fit_is_ligos(self) -> GrowthOptions:
        given = [name for name in ("fit_steps", "fit_lr") if getattr(self, name) is not None]
        if given and self.operator != "ligo":
            raise ValueError(f"{' and '.join(given)} {'set' if len(given) > 1 else 'sets'} the fit of LiGO's "
                             f"learned operator, and operator {self.operator!r} learns none; drop "
                             f"{'them' if len(given) > 1 else 'it'} or use operator ligo")
        return self


class RkdoOptions(Options):
    """RKDO (Martin 2025): EMA-recursive supervisory distribution vs static I-Con."""

    alpha: float = Field(0.5, ge=0, le=1, description="EMA weight of q in p(t) = (1-α)p(t-1) + αq(t-1)")
    depth: PositiveInt = Field(3, description="recursion depth (the paper uses 3)")
    tau0: float = Field(0.5, gt=0)
    beta: float = Field(0.1, ge=0, lt=1, description="temperature decay τ(t) = τ0 (1 - β t/T)")
    in_batch: bool = Field(False, description="the author's code's in-batch recursion instead of across iterations")
    dataset: str = Field("digits", description="'digits' (scikit-learn), 'synthetic', or a local path")
    debias: float = Field(0.2, ge=0, le=1, description="I-Con's uniform share in p(0) (the paper's I-Con: 0.2)")
    alpha_schedule: Literal["constant", "linear", "cosine", "adaptive"] = Field(
        "constant", description="anneal α to alpha_final; adaptive: as the loss's geometric decrease flattens")
    alpha_final: float = Field(0.0, ge=0, le=1)
    early_stop: bool = Field(False, description="stop when the loss's geometric decrease flattens (the paper's rule)")
    stop_tol: float = Field(0.01, gt=0, description="an epoch lowering the loss by less than this share is flat")
    encoder: Literal["auto", "mlp", "cnn", "decoder"] = Field(
        "auto", description="auto: cnn for images, mlp for vectors, the plan's decoder for text")


class Techniques(Options):
    """The techniques a plan integrates; an absent one is off."""

    grpo: GrpoOptions | None = None
    s_grpo: SGrpoOptions | None = None
    t_spmo: TSpmoOptions | None = None
    mhc: MhcOptions | None = None
    geometric_scaling: GeometricScalingOptions | None = None
    growth: GrowthOptions | None = None
    rkdo: RkdoOptions | None = None
    lora: LoraOptions | None = None

    @model_validator(mode="before")
    @classmethod
    def _names_to_options(cls, data: Any) -> Any:
        if isinstance(data, str):
            data = [n.strip() for n in data.split(",") if n.strip()]
        if isinstance(data, (list, tuple, set)):
            data = {str(name).strip().lower(): {} for name in data}
        if isinstance(data, dict):
            unknown = sorted(k for k in data if k not in cls.model_fields)
            if unknown:
                raise ValueError(
                    f"unknown technique {', '.join(map(repr, unknown))}; "
                    f"accepted: {', '.join(TECHNIQUE_NAMES)}"
                )
            data = {k: ({} if v is None else v) for k, v in data.items()}
        return data

    def names(self) -> list[str]:
        return [name for name in TECHNIQUE_NAMES if getattr(self, name) is not None]

    def rl_algorithms(self) -> list[str]:
        return [name for name in ("grpo", "s_grpo", "t_spmo") if getattr(self, name) is not None]


TECHNIQUE_NAMES: tuple[str, ...] = tuple(Techniques.model_fields)
