"""Problems for the GRPO stages, and the sequences built from them.

Design decisions:
- Problems come from ``engines.data.arithmetic`` (the same generated tasks
  the architecture engine pretrains on): train problems from the train
  split, evaluation from the held-out split, never overlapping.
- The problem stream is resumable by count: a checkpoint stores how many
  problems were drawn, resume redraws that many (generation is cheap and
  deterministic), so no generator state needs pickling.
- SFT sequences are prompt + target + EOS with the prompt's positions
  ignored (-1) in the loss: the model learns to answer, not to ask.
"""

from __future__ import annotations

import itertools
from typing import Any, Iterator, Sequence

import torch

from engines.data.arithmetic import Problem, format_prompt, generate, iter_problems
from engines.data.tokenizer import Tokenizer


class ProblemStream:
    def __init__(self, tasks: Sequence[str], seed: int, rank: int = 0, world_size: int = 1) -> None:
        self.tasks, self.seed, self.rank, self.world_size = list(tasks), seed, rank, world_size
        self.drawn = 0
        self._it = self._fresh()

    def _fresh(self) -> Iterator[Problem]:
        # every process walks one stream and keeps its own slice of it
        return itertools.islice(iter_problems(self.tasks, self.seed, "train"), self.rank, None, self.world_size)

    def take(self, n: int) -> list[Problem]:
        self.drawn += n
        return list(itertools.islice(self._it, n))

    def state_dict(self) -> dict[str, Any]:
        return {"drawn": self.drawn}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.drawn = 0
        self._it = self._fresh()
        self.take(int(state["drawn"]))


def held_out(tasks: Sequence[str], seed: int, n: int) -> list[Problem]:
    return generate(tasks, n, seed, "test")


def prompt_ids(tokenizer: Tokenizer, problem: Problem) -> list[int]:
    bos = [tokenizer.bos_id] if tokenizer.bos_id is not None else []
    return bos + tokenizer.encode(format_prompt(problem))


def sft_batch(tokenizer: Tokenizer, examples: Sequence[tuple[list[int], list[int]]],
              pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(prompt ids, target ids) pairs → right-padded inputs and targets (-1 = no loss)."""
    seqs = [p + t for p, t in examples]
    width = max(len(s) for s in seqs) - 1
    x = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    y = torch.full((len(seqs), width), -1, dtype=torch.long)
    for i, ((p, t), s) in enumerate(zip(examples, seqs)):
        x[i, : len(s) - 1] = torch.tensor(s[:-1])
        y[i, len(p) - 1: len(s) - 1] = torch.tensor(t)
    return x.to(device), y.to(device)
