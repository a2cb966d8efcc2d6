"""T-SPMO (Lee & Tong 2025, §3.2): token-level credit from a prefix tree, and replay.

For one prompt, |G| sampled completions o_1..o_G with rewards R_1..R_G form a
prefix tree: a node is a prefix p (the prompt plus the first t tokens of
some completion), an edge (p, v) says token v followed p. For each unique
transition (p, v) ∈ U the token-level advantage is the change in expected
reward that choosing v after p brings, estimated by empirical means over
the completions through the node and through the edge:

    A(v | p) = mean{R_i : o_i passes through p·v} − mean{R_i : o_i passes through p}

The objective maximised is (1/|U|) Σ_(p,v)∈U π_θ(v | p) · A(v | p) − λ Σ‖W‖²,
with π_θ a probability (not a log-probability) and the L2 term over the
LoRA weights only. A transition all of whose completions agree on the next
token has A = 0 and contributes nothing but still counts in |U|.

Replay (same section): completions seen earlier are kept as successes
(R ≥ r) or failures; each update draws up to C_success and C_failure of
them, picks a random position t between the end of the prompt and the end
of the completion, and samples |G| new completions from that prefix — so
the late decisions of rare successes get groups of their own.

Design decisions:
- The tree is built once per group with integer node ids (a dict keyed by
  (parent id, token)), O(G·T), not by hashing whole prefixes.
- Each unique transition remembers the first (row, position) where it
  occurs; the loss reads π_θ(v|p) there, so only the rows that hold a
  non-zero advantage need a forward pass with gradients.
- The replay buffer keeps token lists (bounded, oldest dropped) and is part
  of the engine's resumable state.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

from engines.data.examples import Example


@dataclass(frozen=True)
class Transition:
    row: int  # which completion holds it first
    position: int  # index of the token v inside that completion
    token: int
    advantage: float


def prefix_advantages(completions: Sequence[Sequence[int]], rewards: Sequence[float]) -> list[Transition]:
    """Every unique (prefix, next token) transition of a group with its A(v|p)."""
    assert len(completions) == len(rewards)
    children: dict[tuple[int, int], int] = {}
    total: list[float] = [0.0]  # per node: sum of rewards of completions through it
    count: list[int] = [0]
    first: dict[int, tuple[int, int, int, int]] = {}  # child node -> (parent, row, position, token)
    for row, (tokens, reward) in enumerate(zip(completions, rewards)):
        node = 0
        total[0] += reward
        count[0] += 1
        for position, token in enumerate(tokens):
            key = (node, int(token))
            child = children.get(key)
            if child is None:
                child = children[key] = len(total)
                total.append(0.0)
                count.append(0)
                first[child] = (node, row, position, int(token))
            total[child] += reward
            count[child] += 1
            node = child
    mean = [t / c for t, c in zip(total, count)]
    return [Transition(row, position, token, mean[child] - mean[parent])
            for child, (parent, row, position, token) in first.items()]


@dataclass
class ReplayBuffer:
    """Past completions of each prompt, split into successes and failures."""

    success_threshold: float
    capacity: int = 256
    successes: list[dict[str, Any]] = field(default_factory=list)
    failures: list[dict[str, Any]] = field(default_factory=list)

    def add(self, prompt: Sequence[int], completion: Sequence[int], reward: float, example: Example) -> None:
        """Stored as plain values (the row, not the ``Example``), so a checkpoint loads them
        with ``weights_only``."""
        side = self.successes if reward >= self.success_threshold else self.failures
        side.append({"prompt": list(prompt), "completion": list(completion), "answer": example.answer,
                     "text": example.prompt, "messages": [dict(m) for m in example.messages],
                     "row": dict(example.row)})
        del side[:-self.capacity]

    def draw(self, rng: Any, success_budget: int,
             failure_budget: int) -> list[tuple[list[int], list[int], Example]]:
        """Up to the budgets of (prompt, partial completion, example): a stored prompt and
        the part of its completion before a random cut (at least one token left to sample)."""
        chosen = (rng.sample(self.successes, min(success_budget, len(self.successes)))
                  + rng.sample(self.failures, min(failure_budget, len(self.failures))))
        out = []
        for item in chosen:
            completion = item["completion"]
            cut = rng.randint(0, max(0, len(completion) - 1))  # keep at least one token to generate
            example = Example(item.get("text", ""), None, item["answer"], item.get("row", {}),
                              tuple(item.get("messages", ())))
            out.append((item["prompt"], completion[:cut], example))
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"successes": self.successes, "failures": self.failures}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.successes, self.failures = list(state["successes"]), list(state["failures"])
