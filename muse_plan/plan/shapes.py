"""Model shapes: the standard table a model scale maps to, and parameter counts.

A plan names a scale ("10B"); the architecture engine needs a shape (layers,
width, heads). The table holds shapes people train at those sizes (GPT-3 and
Llama families); a scale between entries takes the nearest entry's width and
as many layers as make up the count. The count here is the standard residual
decoder's (tied embeddings, SwiGLU, RMSNorm); the n-stream residual modes add
a few parameters per layer that the engine's exact ``param_count`` includes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


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
