"""Problems and examples for the GRPO stages, and the sequences built from them.

Design decisions:
- Every stage reads ``Example`` rows (``engines/data/examples.py``): from the
  user's JSONL file (the stage's ``data``), or made from muse's generated
  arithmetic (``engines.data.arithmetic``: the same tasks the architecture
  engine pretrains on; prompt ``Q: ...\\nA: ``, the worked solution as the
  completion, the integer answer as the reference). Held-out rows are never
  trained on: the arithmetic test split, a separate ``eval_data`` file, or
  the hash-split ``eval_fraction`` of the file.
- The stream is resumable by count: a checkpoint stores how many rows were
  drawn, resume redraws that many (cheap and deterministic), so no generator
  state needs pickling. A file is read in a fresh seeded order each epoch.
  Every process walks the one stream and keeps its own slice of it.
- Prompts: ``engines.data.examples.Prompter`` (BOS, then the row's prompt
  text or its chat rendered).
- SFT sequences are prompt + target + EOS with the prompt's positions
  ignored (-1) in the loss: the model learns to answer, not to ask.
"""

from __future__ import annotations

import itertools
import random
from typing import Any, Iterator, Sequence

import torch

from engines.data.arithmetic import Problem, format_prompt, generate, iter_problems
from engines.data.examples import Example, Prompter
from engines.data.tokenizer import Tokenizer


def from_problem(problem: Problem) -> Example:
    """A generated arithmetic problem as an example row."""
    row = {"prompt": problem.prompt, "answer": problem.answer, "solution": problem.solution}
    return Example(format_prompt(problem), problem.solution + "\n", problem.answer, row)  # type: ignore[arg-type]


def _epochs(examples: Sequence[Example], seed: int) -> Iterator[Example]:
    for epoch in itertools.count():
        order = list(range(len(examples)))
        random.Random(seed * 1_000_003 + epoch).shuffle(order)
        yield from (examples[i] for i in order)


class ProblemStream:
    """Training rows: the user's ``examples`` in seeded epochs, else generated ``tasks``."""

    def __init__(self, tasks: Sequence[str], seed: int, rank: int = 0, world_size: int = 1,
                 examples: Sequence[Example] | None = None) -> None:
        self.tasks, self.seed, self.rank, self.world_size = list(tasks), seed, rank, world_size
        self.examples = list(examples) if examples is not None else None
        self.drawn = 0
        self._it = self._fresh()

    def _fresh(self) -> Iterator[Example]:
        source = _epochs(self.examples, self.seed) if self.examples is not None else \
            map(from_problem, iter_problems(self.tasks, self.seed, "train"))
        return itertools.islice(source, self.rank, None, self.world_size)

    def take(self, n: int) -> list[Example]:
        self.drawn += n
        return list(itertools.islice(self._it, n))

    def state_dict(self) -> dict[str, Any]:
        return {"drawn": self.drawn}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.drawn = 0
        self._it = self._fresh()
        self.take(int(state["drawn"]))


def held_out(tasks: Sequence[str], seed: int, n: int) -> list[Example]:
    return [from_problem(p) for p in generate(tasks, n, seed, "test")]


def prompt_ids(tokenizer: Tokenizer, example: Example) -> list[int]:
    """BOS and a plain-text prompt's tokens (chats need a ``Prompter``)."""
    return Prompter(tokenizer).ids(example)


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
