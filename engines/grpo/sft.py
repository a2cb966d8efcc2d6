"""The supervised stages: cold-start SFT and rejection sampling.

- ``cold_start_sft`` (DeepSeek-R1 stage 1): fine-tune on chain-of-thought
  examples: the user's file's completions (``data``), or the generated
  tasks' programmatic solutions (long multiplication's partial products,
  running totals, the word problem's equations). Loss on the completion only.
- ``rejection_sampling`` (DeepSeek-R1 stage 3): sample K completions per
  prompt from the current policy, keep the correct ones — those the
  ``correctness`` reward scores 1 against the row's reference answer;
  ``keep: most_confident`` keeps only the one with the highest mean token
  log-probability — and fine-tune on them. A micro-batch whose prompts gave
  no correct completion contributes a zero loss and says so in its metrics
  (``kept``), rather than falling back to reference solutions.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from engines.contract import MicroStep
from engines.grpo.data import sft_batch
from engines.grpo.policy import zero_loss
from engines.grpo.rewards import correctness

if TYPE_CHECKING:
    from engines.grpo.trainer import GrpoTrainer

Example = tuple[list[int], list[int]]  # (prompt ids, target ids)


def sft_step(t: GrpoTrainer, examples: list[Example]) -> MicroStep:
    if not examples:  # nothing to learn from
        return MicroStep(loss=zero_loss(t.model), tokens=0, metrics={"kept": 0.0})
    x, y = sft_batch(t.tokenizer, examples, t.pad_id, t.device)
    loss = t.policy.cross_entropy(x, y, t.model)  # the completions' tokens through the head, a chunk at a time
    return MicroStep(loss=loss, tokens=int((y >= 0).sum()), metrics={"kept": float(len(examples))})


class ColdStartSft:
    def __init__(self, t: GrpoTrainer, options: Any) -> None:
        self.t = t

    def next_batch(self) -> list[Example]:
        prompter = self.t.prompter
        return [(prompter.ids(p), prompter.target(p)) for p in self.t.stream.take(self.t.micro_batch)]

    def micro_step(self, batch: list[Example]) -> MicroStep:
        return sft_step(self.t, batch)


class RejectionSampling:
    def __init__(self, t: GrpoTrainer, options: Any) -> None:
        self.t = t  # options: RejectionSamplingOptions (engines/grpo/options.py)
        self.samples = options.samples
        self.temperature = options.sampling_temperature
        self.keep = options.keep

    def next_batch(self) -> list[Example]:
        t = self.t
        problems = t.stream.take(t.micro_batch)
        prompts = [t.prompter.ids(p) for p in problems]
        outs = t.policy.sample([p for p in prompts for _ in range(self.samples)], t.max_new_tokens, self.temperature)
        examples: list[Example] = []
        for i, (prompt, problem) in enumerate(zip(prompts, problems)):
            group = outs[i * self.samples:(i + 1) * self.samples]
            right = [c for c in group if correctness(t.judged(problem, c))]
            if right and self.keep == "most_confident":
                right = [max(right, key=lambda c: self._confidence(prompt, c))]
            examples += [(prompt, c) for c in right]
        return examples

    @torch.no_grad()
    def _confidence(self, prompt: list[int], completion: list[int]) -> float:
        ids = torch.tensor([prompt + completion], device=self.t.device)
        return float(self.t.policy.token_logprobs(ids, len(prompt)).mean())

    def micro_step(self, batch: list[Example]) -> MicroStep:
        return sft_step(self.t, batch)
