"""Rewards for verifiable tasks: small functions of one completion, combined by weight —
muse's built-ins, and the user's own named by reference.

Design decisions:
- Correctness is the paper's score (Lee & Tong 2025, §4): the *last number*
  in the completion equals the reference answer. Numbers are normalised
  (thousands separators, a leading ``$``, a trailing ``%`` or ``.0`` don't
  matter; 3.50 is 3.5), so a GSM8K answer "1,234" matches "1234". A reference
  that is not a number is compared as text, case and spacing aside.
- ``extracted`` reads the answer where the completion marks it — the last
  ``\\boxed{...}``, ``#### ...``, ``<answer>...</answer>`` or ``Answer: ...``
  — and compares it the same way; unmarked, it scores 0.
- Everything else is shaping and carries a smaller weight (SEEDS.md:
  correctness 1.0, format 0.3, efficiency 0.2 when GRPO is unstable); the KL
  term belongs to the loss, not to the reward. ``format``: the last
  non-empty line marks the answer. ``efficiency`` rewards brevity only for
  correct completions, so a short wrong answer can't buy reward:
  ``correct · (1 − tokens / max_new_tokens)``. ``consistency`` (for
  all-scenarios RL) checks worked steps: the share of ``a op b = c``
  equations in the completion that are true.
- **The user's own reward** is named in ``reward_weights`` by reference:
  ``module:function`` (a module importable from the working directory) or
  ``path/to/file.py:function``, called as ``function(prompt, completion,
  example) -> float`` with the prompt's text, the completion's text and the
  example's row (its JSON object: ``answer`` and any extra fields; for
  generated arithmetic ``prompt``, ``answer`` and ``solution``). It is
  imported when the plan is read (``load_reward``), so a reference that does
  not import is refused then, in one line.
- A reward that raises, or returns something that is not a finite number,
  on one sample scores 0 there and the run goes on; ``Rewards.notes`` says
  so with the sample (the first three failures of each reward, then at 10,
  100, 1000... failures), and the engine hands the notes to the executor
  as events.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from engines.options import read_from

_NUMBER = re.compile(r"-?\$?\d[\d,]*(?:\.\d+)?")
_EQUATION = re.compile(r"(-?\d+)\s*([-+*/])\s*(\d+)\s*=\s*(-?\d+)")
_MARKED = re.compile(r"\\boxed\{([^{}]*)\}|####\s*([^\n]+)|<answer>(.*?)</answer>|Answer:\s*([^\n]+)", re.S)
_FINAL_MARK = re.compile(r"^(?:Answer:\s*\S.*|####\s*\S.*|.*\\boxed\{[^{}]+\}.*|.*<answer>.+</answer>.*)$")
SIGNATURE = "(prompt: str, completion: str, example: dict) -> float"


@dataclass(frozen=True)
class Completion:
    text: str
    answer: Any  # the reference: an int for generated arithmetic, the file's answer (text) otherwise
    tokens: int  # completion tokens generated (EOS included)
    max_new_tokens: int
    prompt: str = ""
    row: Mapping[str, Any] = field(default_factory=dict)  # the example's row, for the user's rewards


def number(text: str) -> float | None:
    """``text`` as a number after normalisation ("$1,234.50" → 1234.5), None if it is none."""
    cleaned = text.strip().replace(",", "").replace("$", "").removesuffix("%").strip()
    try:
        value = float(cleaned)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def same_answer(found: str | None, reference: Any) -> bool:
    """Numbers equal after normalisation; otherwise the texts, case and spacing aside."""
    if found is None:
        return False
    want, got = number(str(reference)), number(found)
    if want is not None and got is not None:
        return abs(got - want) <= 1e-9 * max(1.0, abs(want))
    return " ".join(found.split()).casefold().rstrip(".") == " ".join(str(reference).split()).casefold().rstrip(".")


def last_number(text: str) -> str | None:
    found = _NUMBER.findall(text)
    return found[-1] if found else None


def last_integer(text: str) -> int | None:
    """The last integer in ``text`` (kept for the arithmetic tasks' tools)."""
    found = re.findall(r"-?\d+", text)
    return int(found[-1]) if found else None


def marked_answer(text: str) -> str | None:
    """The answer the completion marks last (boxed, ####, answer tag, ``Answer:``)."""
    found = _MARKED.findall(text)
    if not found:
        return None
    return next(part for part in found[-1] if part).strip()


def correctness(c: Completion) -> float:
    want = number(str(c.answer))
    if want is None:  # a text answer: the marked one, else the last line
        lines = [line.strip() for line in c.text.strip().splitlines() if line.strip()]
        return 1.0 if same_answer(marked_answer(c.text) or (lines[-1] if lines else None), c.answer) else 0.0
    return 1.0 if same_answer(last_number(c.text), c.answer) else 0.0


def extracted(c: Completion) -> float:
    return 1.0 if same_answer(marked_answer(c.text), c.answer) else 0.0


def format_compliance(c: Completion) -> float:
    """1 when the last non-empty line marks the answer (``Answer: 42``, ``#### 42``, ``\\boxed{42}``)."""
    lines = [line.strip() for line in c.text.strip().splitlines() if line.strip()]
    return 1.0 if lines and _FINAL_MARK.match(lines[-1]) else 0.0


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
    "extracted": extracted,
    "format": format_compliance,
    "efficiency": length_efficiency,
    "consistency": consistency,
}


def is_reference(name: str) -> bool:
    """A user reward's reference: ``module:function`` or ``file.py:function``."""
    module, _, function = name.rpartition(":")
    return bool(module) and function.isidentifier()


def load_reward(reference: str) -> Callable[..., Any]:
    """The user's reward function ``reference`` names, checked to take (prompt, completion,
    example); ``ValueError`` in one line when it can't be had."""
    module_name, _, function = reference.rpartition(":")
    what = f"reward {reference!r}"
    if not module_name or not function.isidentifier():
        raise ValueError(f"{what}: write module:function or path/to/file.py:function")
    try:
        if module_name.endswith(".py"):
            path = Path(module_name).expanduser()
            if not path.is_file():
                raise ValueError(f"{what}: no such file {module_name!r}{read_from(path)}")
            spec = importlib.util.spec_from_file_location(f"muse_reward_{abs(hash(str(path.resolve())))}", path)
            module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
            spec.loader.exec_module(module)  # type: ignore[union-attr]
        else:
            if "" not in sys.path and str(Path.cwd()) not in sys.path:
                sys.path.insert(0, str(Path.cwd()))  # module:function from the working directory, as python -m does
            module = importlib.import_module(module_name)
    except ValueError:
        raise
    except Exception as exc:  # the user's module failing to import, whatever it raises
        first = str(exc).splitlines()[0] if str(exc) else ""
        raise ValueError(f"{what} can't be imported: {type(exc).__name__}: {first}".rstrip(": ")) from None
    fn = getattr(module, function, None)
    if not callable(fn):
        raise ValueError(f"{what}: {module_name} has no function {function!r}")
    try:
        inspect.signature(fn).bind("prompt", "completion", {})
    except TypeError:
        raise ValueError(f"{what}: {function} must take {SIGNATURE}") from None
    except ValueError:  # a builtin without a signature: trust it
        pass
    return fn


def check_weights(weights: Mapping[str, float]) -> dict[str, float]:
    unknown = [name for name in weights if name not in REWARDS and not is_reference(name)]
    if unknown:
        raise ValueError(f"unknown reward '{unknown[0]}'; accepted: {', '.join(REWARDS)}, or your own as "
                         "module:function or file.py:function")
    return {name: float(w) for name, w in weights.items() if w}


def _sample(c: Completion) -> str:
    prompt = c.prompt if len(c.prompt) <= 80 else c.prompt[:77] + "..."
    text = c.text if len(c.text) <= 120 else c.text[:117] + "..."
    return f"prompt {prompt!r}, completion {text!r}"


class Rewards:
    """The stage's weighted rewards: built-ins by name, the user's by reference."""

    def __init__(self, weights: Mapping[str, float]) -> None:
        self.weights = check_weights(weights)
        self.functions: dict[str, Callable[[Completion], float]] = {}
        for name in self.weights:
            if name in REWARDS:
                self.functions[name] = REWARDS[name]
            else:
                user = load_reward(name)
                self.functions[name] = lambda c, user=user: user(c.prompt, c.text, dict(c.row))
        self.failures: dict[str, int] = {}
        self.notes: list[str] = []

    def _one(self, name: str, c: Completion) -> float:
        try:
            value = self.functions[name](c)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise TypeError(f"returned {value!r}, not a finite number")
            return float(value)
        except Exception as exc:  # the user's code: whatever it raises costs this sample's score only
            count = self.failures[name] = self.failures.get(name, 0) + 1
            if count <= 3:
                why = str(exc).splitlines()[0] if str(exc) else ""
                self.notes.append(f"reward {name} failed on a sample ({type(exc).__name__}"
                                  f"{': ' + why if why else ''}); scored 0: {_sample(c)}")
            elif math.log10(count).is_integer():
                self.notes.append(f"reward {name} has failed on {count} samples (each scored 0)")
            return 0.0

    def score(self, c: Completion) -> tuple[float, dict[str, float]]:
        """The weighted total and each reward's own value (for the monitor)."""
        parts = {name: self._one(name, c) for name in self.weights}
        return sum(self.weights[name] * value for name, value in parts.items()), parts

    def take_notes(self) -> list[str]:
        notes, self.notes = self.notes, []
        return notes


def score(c: Completion, weights: Mapping[str, float]) -> tuple[float, dict[str, float]]:
    """Built-in rewards only: the weighted total and each reward's value."""
    parts = {name: REWARDS[name](c) for name in weights}
    return sum(weights[name] * value for name, value in parts.items()), parts
