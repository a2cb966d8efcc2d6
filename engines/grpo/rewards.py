"""Rewards for verifiable tasks: small functions of one completion, combined by weight.

Design decisions:
- Correctness is the paper's score (Lee & Tong 2025, §4): exact match of the
  *last integer* in the completion with the answer. Everything else is
  shaping and carries a smaller weight (SEEDS.md: correctness 1.0, format
  0.3, efficiency 0.2 when GRPO is unstable); the KL term belongs to the
  loss, not to the reward.
- Efficiency rewards brevity only for correct completions, so a short wrong
  answer can't buy reward: ``correct · (1 − tokens / max_new_tokens)``.
- Consistency (for all-scenarios RL) checks the worked steps themselves:
  the share of ``a op b = c`` equations in the completion that are true.
  It is the one "consistency" signal a generated task can verify; the
  seed's helpfulness and safety rewards need judges or data muse can't
  download, so they are not offered.
- ``REWARDS`` is the registry; an unknown weight name fails with the list.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Mapping

_INTEGER = re.compile(r"-?\d+")
_FINAL_LINE = re.compile(r"^Answer: -?\d+$")
_EQUATION = re.compile(r"(-?\d+)\s*([-+*/])\s*(\d+)\s*=\s*(-?\d+)")


@dataclass(frozen=True)
class Completion:
    text: str
    answer: int
    tokens: int  # completion tokens generated (EOS included)
    max_new_tokens: int


def last_integer(text: str) -> int | None:
    found = _INTEGER.findall(text)
    return int(found[-1]) if found else None


def correctness(c: Completion) -> float:
    return 1.0 if last_integer(c.text) == c.answer else 0.0


def format_compliance(c: Completion) -> float:
    """1 when the last non-empty line is ``Answer: <integer>``."""
    lines = [line.strip() for line in c.text.strip().splitlines() if line.strip()]
    return 1.0 if lines and _FINAL_LINE.match(lines[-1]) else 0.0


def length_efficiency(c: Completion) -> float:
    return correctness(c) * max(0.0, 1.0 - c.tokens / c.max_new_tokens)


def _holds(a: int, op: str, b: int, result: int) -> bool:
    if op == "+":
        return a + b == result
    if op == "-":
        return a - b == result
    if op == "*":
        return a * b == result
    return b != 0 and a == result * b  # division: exact


def consistency(c: Completion) -> float:
    equations = _EQUATION.findall(c.text)
    if not equations:
        return 0.0
    return sum(_holds(int(a), op, int(b), int(r)) for a, op, b, r in equations) / len(equations)


REWARDS: dict[str, Callable[[Completion], float]] = {
    "correctness": correctness,
    "format": format_compliance,
    "efficiency": length_efficiency,
    "consistency": consistency,
}


def check_weights(weights: Mapping[str, float]) -> dict[str, float]:
    unknown = [name for name in weights if name not in REWARDS]
    if unknown:
        raise ValueError(f"unknown reward '{unknown[0]}'; accepted: {', '.join(REWARDS)}")
    return {name: float(w) for name, w in weights.items() if w}


def score(c: Completion, weights: Mapping[str, float]) -> tuple[float, dict[str, float]]:
    """The weighted total and each weighted reward's own value (for the monitor)."""
    parts = {name: REWARDS[name](c) for name in weights}
    return sum(weights[name] * value for name, value in parts.items()), parts
