"""Supervised examples as token streams: the architecture engine's finetune on the
user's prompt/completion rows, with the loss on the completions only.

Design decisions:
- A ``MaskedStream`` is a ``TokenStream`` with a parallel mask: a window's
  targets are -1 (no loss) where the mask is off — the prompt, the padding.
  So the stream sampler (``BatchSampler``: shuffled, resumable by two
  integers, sliced across processes) and the fixed evaluation batches work
  on examples unchanged, and the loss is the engine's one cross-entropy
  with ``ignore_index=-1``.
- ``packing: false`` gives every example a window of its own (seq_len + 1
  tokens: BOS, prompt, completion, EOS, then padding), so no example sees
  another; ``packing: true`` lays examples back to back and cuts the
  stream into windows, as pretraining does, so no compute goes to padding —
  at the price of an example attending to the one before it (the common
  trade-off of packed SFT), and of an example cut across two windows.
- Examples longer than the context are left out by the caller
  (``engines/architecture/trainer``), with a note.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch

from engines.data.stream import Batch, TokenStream


@dataclass(frozen=True)
class MaskedStream(TokenStream):
    mask: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=bool))  # (N,) True: a target token

    def window_batch(self, indices: np.ndarray, seq_len: int) -> Batch:
        x, y = super().window_batch(indices, seq_len)
        span = seq_len + 1
        rows = np.asarray(indices, dtype=np.int64)[:, None] * span + np.arange(1, span)  # the targets' positions
        keep = torch.from_numpy(np.asarray(self.mask[rows], dtype=bool))
        return x, y.masked_fill(~keep, -1)


def example_stream(pairs: Sequence[tuple[list[int], list[int]]], seq_len: int, pad_id: int,
                   packing: bool) -> MaskedStream:
    """(prompt ids, target ids) pairs → one masked stream of (seq_len + 1)-token windows."""
    span = seq_len + 1
    tokens: list[int] = []
    mask: list[bool] = []
    for prompt, target in pairs:
        tokens += prompt + target
        mask += [False] * len(prompt) + [True] * len(target)
        if not packing:  # pad to the window's end
            fill = -len(tokens) % span
            tokens += [pad_id] * fill
            mask += [False] * fill
    return MaskedStream(np.asarray(tokens, dtype=np.int64), np.asarray(mask, dtype=bool))
