"""Encoders: a backbone that gives the embedding, a projection head for the loss.

Design decisions:
- SimCLR's split (the paper's set-up is ResNet-18 plus a projection head):
  the objective is computed on the L2-normalised output of a small
  projection head; the measures read the backbone's embedding (``features``),
  which transfers better than the head's output.
- Sizes suit the bundled data on a CPU: an MLP for vectors (and flattened
  images), a three-layer CNN with global pooling for images, and for text
  the architecture engine's decoder, mean-pooled over the non-padding
  tokens, so a representation stage can start from a pretrained decoder
  (``init_module``).
- No batch norm: a batch's statistics would leak between the two views and
  the anchors, and train and eval mode would differ.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn as nn

from engines.rkdo.data import RepresentationData


def _head(width: int, proj_dim: int) -> nn.Module:
    return nn.Sequential(nn.Linear(width, width), nn.GELU(), nn.Linear(width, proj_dim))


class MLPEncoder(nn.Module):
    def __init__(self, in_dim: int, hidden: int, embed_dim: int, proj_dim: int) -> None:
        super().__init__()
        self.backbone = nn.Sequential(
            nn.Flatten(), nn.Linear(in_dim, hidden), nn.GELU(), nn.LayerNorm(hidden),
            nn.Linear(hidden, hidden), nn.GELU(), nn.Linear(hidden, embed_dim),
        )
        self.head = _head(embed_dim, proj_dim)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)  # (B, embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))  # (B, proj_dim)


class CNNEncoder(nn.Module):
    def __init__(self, channels: int, hidden: int, embed_dim: int, proj_dim: int) -> None:
        super().__init__()
        c = max(8, hidden // 4)
        self.backbone = nn.Sequential(
            nn.Conv2d(channels, c, 3, padding=1), nn.GELU(), nn.GroupNorm(4, c),
            nn.Conv2d(c, 2 * c, 3, padding=1, stride=2), nn.GELU(), nn.GroupNorm(4, 2 * c),
            nn.Conv2d(2 * c, 4 * c, 3, padding=1, stride=2), nn.GELU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4 * c, embed_dim),
        )
        self.head = _head(embed_dim, proj_dim)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)  # (B, embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class TextEncoder(nn.Module):
    """The architecture engine's decoder (``lm``), mean-pooled, with a head."""

    def __init__(self, model_config: Any, pad_id: int, embed_dim: int, proj_dim: int) -> None:
        super().__init__()
        from engines.architecture.model import DecoderLM

        self.lm = DecoderLM(model_config)
        self.pad_id = pad_id
        self.to_embed = nn.Linear(model_config.d_model, embed_dim)
        self.head = _head(embed_dim, proj_dim)
        self._hidden: torch.Tensor | None = None
        # the decoder's last hidden states are its final norm's output; a hook
        # reads them without copying the decoder's forward here
        self.lm.norm.register_forward_hook(lambda module, args, out: setattr(self, "_hidden", out))

    def features(self, tokens: torch.Tensor) -> torch.Tensor:
        tokens = tokens[:, : self.lm.config.seq_len]
        self.lm(tokens)
        hidden, self._hidden = self._hidden, None
        assert hidden is not None
        keep = (tokens != self.pad_id).unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
        pooled = (hidden * keep).sum(1) / keep.sum(1).clamp_min(1.0)  # (B, d_model)
        return self.to_embed(pooled)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(tokens))


def _mlp(data: RepresentationData, config: Any, model_config: Any) -> nn.Module:
    if data.kind == "text":
        raise ValueError("the mlp encoder can't read text; use encoder: decoder")
    return MLPEncoder(int(data.x[0].numel()), config.hidden, config.embed_dim, config.proj_dim)


def _cnn(data: RepresentationData, config: Any, model_config: Any) -> nn.Module:
    if data.kind != "image":
        raise ValueError(f"the cnn encoder reads images, not {data.kind} data; use encoder: mlp or decoder")
    return CNNEncoder(int(data.x.shape[1]), config.hidden, config.embed_dim, config.proj_dim)


def _decoder(data: RepresentationData, config: Any, model_config: Any) -> nn.Module:
    if data.kind != "text":
        raise ValueError(f"the decoder encoder reads text, not {data.kind} data; use encoder: cnn or mlp")
    if data.vocab_size > model_config.vocab_size:
        raise ValueError(f"the tokenizer has {data.vocab_size} tokens but the model's vocab_size is "
                         f"{model_config.vocab_size}")
    return TextEncoder(model_config, data.pad_id, config.embed_dim, config.proj_dim)


ENCODERS: dict[str, Callable[[RepresentationData, Any, Any], nn.Module]] = {
    "mlp": _mlp,
    "cnn": _cnn,
    "decoder": _decoder,
}
# what ``encoder: auto`` picks for each kind of data
DEFAULT_ENCODER = {"image": "cnn", "vector": "mlp", "text": "decoder"}
