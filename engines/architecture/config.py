"""The decoder's configuration and its exact parameter count, without torch.

Design decisions:
- ``ModelConfig`` is a plain dataclass validated in ``__post_init__``; a bad
  value raises ``ValueError`` naming what is accepted, so a plan fails at
  validation rather than mid-run.
- A shape comes either explicitly (``ModelConfig(n_layers=..., d_model=...)``
  or ``from_shape``) or from a model scale through the one table of standard
  shapes in ``engines.architecture.shapes`` (``from_scale``); there is no second
  table here to drift out of step with the planner's.
- ``param_count`` is arithmetic on the config. The CLI imports this module to
  size plans, so it must not import torch; a residual mode's parameters are
  its record's (``modes.py``), and the tests check them against the modules
  in ``residual.py`` for every mode.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from engines.architecture.modes import RESIDUAL_MODES
from engines.architecture.shapes import Shape, parse_scale, shape_for_params, swiglu_hidden

RESIDUAL_NAMES: tuple[str, ...] = tuple(RESIDUAL_MODES)
MULTI_STREAM: frozenset[str] = frozenset(name for name, m in RESIDUAL_MODES.items() if m.multi_stream)
STREAM_DTYPES: tuple[str, ...] = ("float32", "bfloat16")
KERNEL_MODES: tuple[str, ...] = ("off", "eager", "on")  # ModelConfig.fused_kernels
FUSED_RESIDUALS: tuple[str, ...] = ("mhc", "mgt", "ddl")  # the residual modes that have fused kernels


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    seq_len: int
    n_layers: int
    d_model: int
    n_heads: int
    n_kv_heads: int | None = None  # None: as many as n_heads (no GQA)
    d_ff: int | None = None  # None: SwiGLU width 64·ceil((8·d_model/3)/64)
    residual: str = "standard"
    streams: int = 4  # n residual streams for hc / mhc / mgt
    sinkhorn_iters: int = 20  # mHC paper's t_max
    # dtype of the n-stream state between connections (hc / mhc / mgt): bfloat16 halves the
    # traffic of the widest tensor, as the mHC paper does (§4.3); the maps still run in fp32
    stream_dtype: str = "float32"
    # mhc / mgt / ddl connections as fused Triton kernels on a GPU (fused_streams, fused_mhc,
    # fused_delta): off, eager (in eager mode only) or on (under torch.compile too). The same
    # function computed another way: not part of what a checkpoint's weights need
    fused_kernels: str = "off"
    beta_max: float = 2.0  # DDL gate range [0, beta_max]; 2 allows reflection
    rope_theta: float = 10000.0
    rope_scale: float = 1.0  # position interpolation factor (>1 after a context extension)
    norm_eps: float = 1e-6
    dropout: float = 0.0
    # the input embedding is the LM head (muse's decoder always); a Hugging Face model may
    # keep two tables (a 7B Llama does): priced as stored (``stored_param_count``)
    tied_embeddings: bool = True

    def __post_init__(self) -> None:
        if self.residual not in RESIDUAL_NAMES:
            raise ValueError(
                f"unknown residual {self.residual!r}; accepted: {', '.join(RESIDUAL_NAMES)}"
            )
        for name in ("vocab_size", "seq_len", "n_layers", "d_model", "n_heads", "streams"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model {self.d_model} is not divisible by n_heads {self.n_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim {self.head_dim} must be even for rotary embeddings")
        if self.n_kv_heads is not None and (self.n_kv_heads < 1 or self.n_heads % self.n_kv_heads):
            raise ValueError(
                f"n_kv_heads {self.n_kv_heads} must be a positive divisor of n_heads {self.n_heads}"
            )
        if self.d_ff is not None and self.d_ff < 1:
            raise ValueError(f"d_ff must be a positive integer, got {self.d_ff!r}")
        if self.stream_dtype not in STREAM_DTYPES:
            raise ValueError(f"unknown stream_dtype {self.stream_dtype!r}; accepted: {', '.join(STREAM_DTYPES)}")
        if self.fused_kernels not in KERNEL_MODES:
            raise ValueError(f"unknown fused_kernels {self.fused_kernels!r}; accepted: {', '.join(KERNEL_MODES)}")
        if self.sinkhorn_iters < 1:
            raise ValueError(f"sinkhorn_iters must be at least 1, got {self.sinkhorn_iters}")
        if not 0.0 < self.beta_max <= 2.0:
            raise ValueError(f"beta_max must be in (0, 2], got {self.beta_max}")
        if not self.rope_scale >= 1.0:
            raise ValueError(f"rope_scale must be at least 1, got {self.rope_scale}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")

    # what a checkpoint's weights need to compute what they computed when saved, beyond
    # the shape they fit (growth rescales norm_eps; a context growth sets the rotary scaling)
    FUNCTIONAL = ("norm_eps", "rope_theta", "rope_scale", "beta_max", "sinkhorn_iters")
    STRUCTURE = ("vocab_size", "n_layers", "d_model", "n_heads", "kv_heads", "ffn_dim", "residual", "n_streams")

    def as_saved(self, saved: dict[str, Any] | None) -> ModelConfig:
        """This config with the functional settings of the config a checkpoint was saved
        with (its manifest's ``model_config``), when that checkpoint's model has this shape;
        unchanged otherwise (the weights won't load, and the loader says so)."""
        if not saved:
            return self
        try:
            other = ModelConfig(**{k: v for k, v in saved.items() if k in self.__dataclass_fields__})
        except (TypeError, ValueError):
            return self
        if any(getattr(other, k) != getattr(self, k) for k in self.STRUCTURE):
            return self
        return replace(self, **{k: getattr(other, k) for k in self.FUNCTIONAL})

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def ffn_dim(self) -> int:
        return self.d_ff or swiglu_hidden(self.d_model)

    @property
    def n_streams(self) -> int:
        """Residual streams the hidden state carries: 1 unless the mode widens it."""
        return self.streams if self.residual in MULTI_STREAM else 1

    @classmethod
    def from_shape(cls, shape: Shape, vocab_size: int, seq_len: int, **kwargs: Any) -> ModelConfig:
        return cls(
            vocab_size=vocab_size, seq_len=seq_len, n_layers=shape.layers,
            d_model=shape.d_model, n_heads=shape.n_heads,
            n_kv_heads=shape.n_kv_heads, d_ff=shape.d_ff, **kwargs,
        )

    @classmethod
    def from_scale(cls, scale: int | str, vocab_size: int, seq_len: int, **kwargs: Any) -> ModelConfig:
        """A nominal scale ("350M" or 350_000_000) → the standard table's shape."""
        if isinstance(scale, str):
            scale = parse_scale(scale)
        return cls.from_shape(shape_for_params(scale, vocab_size), vocab_size, seq_len, **kwargs)


def stored_param_count(config: ModelConfig) -> int:
    """The parameters held in memory: ``param_count`` and, where the embedding is not the
    head, the embedding table too (a lookup: it costs memory, not matmul FLOPs)."""
    return param_count(config) + (0 if config.tied_embeddings else config.vocab_size * config.d_model)


def param_count(config: ModelConfig) -> int:
    """Exact number of parameters of ``DecoderLM(config)`` (tied embeddings count once): the
    matrices a token passes through, what FLOPs are counted from."""
    c = config
    attention = 2 * c.d_model * c.d_model + 2 * c.d_model * c.kv_heads * c.head_dim
    mlp = 3 * c.d_model * c.ffn_dim
    norms = 2 * c.d_model
    residual = 2 * RESIDUAL_MODES[c.residual].params(c)  # one around attention, one around the MLP
    per_layer = attention + mlp + norms + residual
    return c.n_layers * per_layer + c.vocab_size * c.d_model + c.d_model  # + final norm


