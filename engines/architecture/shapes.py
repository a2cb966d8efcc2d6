"""Model shapes: the standard table a model scale maps to, and parameter counts.

A plan names a scale ("10B"); the architecture engine needs a shape (layers,
width, heads). The table holds shapes people train at those sizes (GPT-3 and
Llama families); a scale between entries takes the nearest entry's width and
as many layers as make up the count. The count here is the standard residual
decoder's (tied embeddings, SwiGLU, RMSNorm); the n-stream residual modes add
a few parameters per layer that the engine's exact ``param_count`` includes.

The table and the scale parser belong to the architecture engine (engines
import nothing from the orchestrator); ``muse_plan.plan.units`` re-exports
``parse_scale`` for the plan's other parsers.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

_SCALE_UNITS = {"K": 1e3, "M": 1e6, "B": 1e9, "T": 1e12}
_SCALE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMBT])\s*$", re.IGNORECASE)


def parse_scale(text: str) -> int:
    """"1.3B" → 1_300_000_000."""
    m = _SCALE_RE.match(str(text))
    if not m:
        raise ValueError(f"{text!r} is not a model scale; scales look like 350M, 1.3B, 10B, 70B")
    count = float(m.group(1)) * _SCALE_UNITS[m.group(2).upper()]
    if count < 1e5:
        raise ValueError(f"{text!r} is too small a model scale; the smallest is 100K")
    return int(round(count))


@dataclass(frozen=True)
class Shape:
    layers: int
    d_model: int
    n_heads: int
    n_kv_heads: int
    d_ff: int


def swiglu_hidden(d_model: int, multiple_of: int = 64) -> int:
    """SwiGLU width that keeps the MLP at 8·d² parameters, rounded up (Llama's rule)."""
    hidden = int(8 * d_model / 3)
    return multiple_of * math.ceil(hidden / multiple_of)


# nominal parameter count → (layers, d_model, heads)
STANDARD_SHAPES: dict[int, tuple[int, int, int]] = {
    1_000_000: (4, 128, 4),
    10_000_000: (6, 256, 4),
    25_000_000: (8, 384, 6),
    50_000_000: (8, 512, 8),
    125_000_000: (12, 768, 12),
    350_000_000: (24, 1024, 16),
    760_000_000: (24, 1536, 16),
    1_300_000_000: (24, 2048, 16),
    2_700_000_000: (32, 2560, 32),
    7_000_000_000: (32, 4096, 32),
    13_000_000_000: (40, 5120, 40),
    30_000_000_000: (60, 6656, 52),
    70_000_000_000: (80, 8192, 64),
}


def layer_params(d_model: int, n_heads: int, n_kv_heads: int, d_ff: int) -> int:
    head_dim = d_model // n_heads
    attention = 2 * d_model * d_model + 2 * d_model * n_kv_heads * head_dim
    mlp = 3 * d_model * d_ff
    norms = 2 * d_model
    return attention + mlp + norms


def decoder_params(shape: Shape, vocab_size: int) -> int:
    """Parameters of a standard-residual decoder with tied embeddings."""
    per_layer = layer_params(shape.d_model, shape.n_heads, shape.n_kv_heads, shape.d_ff)
    return shape.layers * per_layer + vocab_size * shape.d_model + shape.d_model


def shape_for_params(n_params: int, vocab_size: int) -> Shape:
    """The table's shape for a nominal scale; between entries, the nearest entry's
    width (log distance) with layers refit to the count."""
    nominal = min(STANDARD_SHAPES, key=lambda n: abs(math.log(n / n_params)))
    layers, d_model, heads = STANDARD_SHAPES[nominal]
    d_ff = swiglu_hidden(d_model)
    if nominal == n_params:
        return Shape(layers, d_model, heads, heads, d_ff)
    per_layer = layer_params(d_model, heads, heads, d_ff)
    fitted = round((n_params - vocab_size * d_model - d_model) / per_layer)
    return Shape(max(1, fitted), d_model, heads, heads, d_ff)
