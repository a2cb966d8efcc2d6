"""Token streams and the batches cut from them, resumable and data-parallel.

Design decisions:
- A ``TokenStream`` is a flat 1-D array of ids (in memory or a read-only
  ``np.memmap``). Training examples are non-overlapping windows of
  seq_len + 1 tokens: inputs are the first seq_len, targets the last seq_len
  (the same window shifted by one), so no target crosses a window edge.
- ``BatchSampler`` is the data position for exact resume. Each epoch's window
  order is ``np.random.default_rng((seed, epoch)).permutation(windows)``, a
  pure function of (seed, epoch), so the whole position is two integers —
  ``{"epoch", "cursor"}`` — and a checkpoint restores it exactly.
- Data parallelism without communication: every rank computes the same
  global order; each ``next_batch`` consumes one global batch
  (micro_batch × world_size windows) and returns this rank's contiguous
  slice. Ranks therefore see disjoint windows, the union over ranks equals
  the single-process batch of micro_batch × world_size, and all cursors move
  in lockstep. An epoch's incomplete last global batch is dropped so every
  batch is full and every rank's shapes agree.
- ``eval_batches`` takes the first windows in order: the same batches at
  every evaluation, on every rank, whatever the training position.
- ``unigram_loss`` is the baseline to beat: cross-entropy of the val targets
  under add-one-smoothed train token frequencies, p(t) = (c_t + 1)/(N + V).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

Batch = tuple[torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class TokenStream:
    tokens: np.ndarray  # (N,) token ids; may be a read-only np.memmap

    def __post_init__(self) -> None:
        if self.tokens.ndim != 1:
            raise ValueError(f"a token stream is 1-D, got shape {self.tokens.shape}")

    def __len__(self) -> int:
        return int(self.tokens.shape[0])

    def windows(self, seq_len: int) -> int:
        """How many non-overlapping (seq_len + 1)-token windows the stream holds."""
        if seq_len < 1:
            raise ValueError(f"seq_len must be at least 1, got {seq_len}")
        return len(self) // (seq_len + 1)

    def window_batch(self, indices: np.ndarray, seq_len: int) -> Batch:
        """Inputs and targets, each (B, seq_len) int64, for the given window indices."""
        span = seq_len + 1
        rows = np.asarray(indices, dtype=np.int64)[:, None] * span + np.arange(span)  # (B, T+1)
        block = torch.from_numpy(np.asarray(self.tokens[rows], dtype=np.int64))  # (B, T+1)
        return block[:, :-1], block[:, 1:]


class BatchSampler:
    """Shuffled training batches with an exact, two-integer position."""

    def __init__(
        self, stream: TokenStream, seq_len: int, *, seed: int, rank: int = 0, world_size: int = 1
    ) -> None:
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank must be in 0..world_size-1 (world_size >= 1), got rank {rank} of {world_size}")
        self.stream = stream
        self.seq_len = seq_len
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.n_windows = stream.windows(seq_len)
        self.epoch = 0
        self.cursor = 0  # windows of the current epoch's order already consumed, by all ranks
        self._order: tuple[int, np.ndarray] | None = None

    def require(self, micro_batch: int) -> None:
        """Raise unless the stream holds at least one global batch of ``micro_batch`` per rank."""
        if micro_batch < 1:
            raise ValueError(f"micro_batch must be at least 1, got {micro_batch}")
        needed = micro_batch * self.world_size
        if self.n_windows < needed:
            tokens = needed * (self.seq_len + 1)
            raise ValueError(
                f"the training stream has {len(self.stream):,} tokens ({self.n_windows} windows of "
                f"{self.seq_len + 1}); one global batch of {needed} windows needs at least {tokens:,} tokens"
            )

    def _permutation(self) -> np.ndarray:
        if self._order is None or self._order[0] != self.epoch:
            rng = np.random.default_rng((self.seed % 2**64, self.epoch))
            self._order = (self.epoch, rng.permutation(self.n_windows))
        return self._order[1]

    def next_batch(self, micro_batch: int) -> Batch:
        """This rank's (x, y), each (micro_batch, seq_len) int64; y is x shifted by one token."""
        self.require(micro_batch)
        needed = micro_batch * self.world_size
        if self.cursor + needed > self.n_windows:
            self.epoch, self.cursor = self.epoch + 1, 0
        start = self.cursor + self.rank * micro_batch
        indices = self._permutation()[start : start + micro_batch]
        self.cursor += needed
        return self.stream.window_batch(indices, self.seq_len)

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "cursor": self.cursor}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        epoch, cursor = state.get("epoch"), state.get("cursor")
        valid = isinstance(epoch, int) and isinstance(cursor, int) and epoch >= 0 and 0 <= cursor <= self.n_windows
        if not valid:
            raise ValueError(
                f"sampler state must be {{'epoch': int >= 0, 'cursor': int in 0..{self.n_windows}}}, got {state!r}"
            )
        self.epoch, self.cursor = epoch, cursor


def eval_batches(stream: TokenStream, seq_len: int, micro_batch: int, max_batches: int) -> list[Batch]:
    """Up to ``max_batches`` full batches of the first windows in order (one short batch if
    the stream holds fewer than ``micro_batch`` windows)."""
    if micro_batch < 1 or max_batches < 1:
        raise ValueError(f"micro_batch and max_batches must be at least 1, got {micro_batch} and {max_batches}")
    n_windows = stream.windows(seq_len)
    if n_windows == 0:
        raise ValueError(
            f"the validation stream has {len(stream)} tokens; at least {seq_len + 1} are needed for one window"
        )
    n_batches = min(max_batches, max(1, n_windows // micro_batch))
    size = min(micro_batch, n_windows)
    return [stream.window_batch(np.arange(b * size, (b + 1) * size), seq_len) for b in range(n_batches)]


def unigram_loss(train: TokenStream, val: TokenStream, vocab_size: int, max_tokens: int = 100_000_000) -> float:
    """Val cross-entropy (nats/token) of add-one-smoothed train unigram frequencies.

    The targets are every val token after the first; both streams are read
    up to ``max_tokens`` so a huge corpus costs a bounded pass.
    """
    counts = np.bincount(np.asarray(train.tokens[:max_tokens]), minlength=vocab_size)
    if counts.shape[0] > vocab_size:
        raise ValueError(f"train stream holds token id {counts.shape[0] - 1}, outside vocab_size {vocab_size}")
    log_p = np.log(counts + 1.0) - np.log(counts.sum() + vocab_size)  # (V,)
    targets = np.asarray(val.tokens[1 : max_tokens + 1], dtype=np.int64)
    if targets.size == 0:
        raise ValueError(f"the validation stream needs at least 2 tokens, got {len(val)}")
    if targets.max() >= vocab_size:
        raise ValueError(f"val stream holds token id {int(targets.max())}, outside vocab_size {vocab_size}")
    return float(-log_p[targets].mean())
