"""Verifiable arithmetic problems, generated locally: pretraining text and RL tasks.

Design decisions:
- A ``Problem`` is (prompt, integer answer, worked solution). Pretraining
  reads ``as_text`` documents; the GRPO engine will reuse the same problems,
  sending ``format_prompt`` and rewarding a completion whose last integer
  equals ``answer``. Every solution therefore ends with ``Answer: <n>``.
- Solutions are programmatic chains of thought (long multiplication's
  partial products, a running total, the word problem's equations), so a
  small model sees the intermediate steps it needs rather than only answers.
- Generators take a ``random.Random`` and draw from it only, so a seed fixes
  every problem. ``TASKS`` is the registry; an unknown name fails with the
  list of accepted ones.
- Held-out evaluation must be held out: ``split_seeds`` derives distinct
  train/test seeds, and on top of that the problem space is partitioned by a
  CRC32 of the prompt (1 bucket in ``_TEST_BUCKETS`` is test-only), so train
  and test never share a prompt however many problems each side draws.
"""

from __future__ import annotations

import hashlib
import itertools
import random
import zlib
from dataclasses import dataclass
from typing import Callable, Iterator, Literal, Sequence

Split = Literal["train", "test"]
_TEST_BUCKETS = 16  # prompts with crc32 % 16 == 0 belong to the test split
_MAX_REJECTIONS = 10_000  # consecutive misses before a task is declared too small to split


@dataclass(frozen=True)
class Problem:
    prompt: str
    answer: int
    solution: str


def _number(rng: random.Random, digits: int) -> int:
    """A number with exactly ``digits`` digits (0..9 for one digit)."""
    if digits < 1:
        raise ValueError(f"digits must be at least 1, got {digits}")
    return rng.randint(0 if digits == 1 else 10 ** (digits - 1), 10**digits - 1)


def _solved(prompt: str, steps: Sequence[str], answer: int) -> Problem:
    return Problem(prompt=prompt, answer=answer, solution="".join(s + "\n" for s in steps) + f"Answer: {answer}")


def multiplication(rng: random.Random, digits_a: int = 3, digits_b: int = 3) -> Problem:
    """a*b worked as long multiplication: one partial product per nonzero digit of b."""
    a, b = _number(rng, digits_a), _number(rng, digits_b)
    partials: list[tuple[int, int]] = []  # (digit·10^k, a·digit·10^k)
    for k, ch in enumerate(reversed(str(b))):
        if ch != "0":
            factor = int(ch) * 10**k
            partials.append((factor, a * factor))
    work = [f"{a}*{factor}={product}" for factor, product in partials]
    if len(partials) > 1:
        work.append("+".join(str(p) for _, p in partials) + f"={a * b}")
    line = f"{a}*{b}: " + ", ".join(work) if work else f"{a}*{b}=0"
    return _solved(f"What is {a}*{b}?", [line], a * b)


def add_sub_chain(rng: random.Random, terms: int = 4, digits: int = 3) -> Problem:
    """e.g. 512 - 37 + 904 - 6, solved as a running total (the answer may be negative)."""
    if terms < 2:
        raise ValueError(f"terms must be at least 2, got {terms}")
    numbers = [_number(rng, rng.randint(1, digits)) for _ in range(terms)]
    signs = [rng.choice("+-") for _ in range(terms - 1)]
    total, steps = numbers[0], []
    for sign, n in zip(signs, numbers[1:]):
        new = total + n if sign == "+" else total - n
        steps.append(f"{total}{sign}{n}={new}")
        total = new
    expression = str(numbers[0]) + "".join(f" {s} {n}" for s, n in zip(signs, numbers[1:]))
    return _solved(f"What is {expression}?", [", ".join(steps)], total)


_NAMES = ("Ava", "Ben", "Chloe", "Dev", "Emma", "Farid", "Grace", "Hiro",
          "Isla", "Jonas", "Kemi", "Liam", "Mei", "Noah", "Olga", "Priya")
_OBJECTS = ("apples", "marbles", "stickers", "books", "pencils", "cookies",
            "stamps", "coins", "shells", "cards", "cherries", "buttons")
_WordTemplate = Callable[[random.Random, str, str, str], tuple[str, list[str], int]]


def _gift(rng: random.Random, who: str, other: str, obj: str) -> tuple[str, list[str], int]:
    a, b = rng.randint(2, 99), rng.randint(2, 99)
    return (f"{who} has {a} {obj}. {other} gives {who} {b} more. How many {obj} does {who} have now?",
            [f"{a}+{b}={a + b}"], a + b)


def _give_away(rng: random.Random, who: str, other: str, obj: str) -> tuple[str, list[str], int]:
    a = rng.randint(5, 99)
    b = rng.randint(1, a)
    return (f"{who} had {a} {obj} and gave {b} of them to {other}. How many {obj} does {who} have left?",
            [f"{a}-{b}={a - b}"], a - b)


def _boxes(rng: random.Random, who: str, other: str, obj: str) -> tuple[str, list[str], int]:
    a, b = rng.randint(2, 12), rng.randint(2, 25)
    return (f"{who} buys {a} boxes with {b} {obj} in each box. How many {obj} does {who} buy?",
            [f"{a}*{b}={a * b}"], a * b)


def _share(rng: random.Random, who: str, other: str, obj: str) -> tuple[str, list[str], int]:
    each, friends = rng.randint(2, 20), rng.randint(2, 9)
    total = each * friends
    return (f"{who} shares {total} {obj} equally among {friends} friends. How many {obj} does each friend get?",
            [f"{total}/{friends}={each}"], each)


def _buy_then_give(rng: random.Random, who: str, other: str, obj: str) -> tuple[str, list[str], int]:
    a, b = rng.randint(2, 60), rng.randint(2, 60)
    c = rng.randint(1, a + b)
    return (f"{who} had {a} {obj}, bought {b} more, and then gave {c} to {other}. "
            f"How many {obj} does {who} have now?",
            [f"{a}+{b}={a + b}", f"{a + b}-{c}={a + b - c}"], a + b - c)


def _bags_plus_loose(rng: random.Random, who: str, other: str, obj: str) -> tuple[str, list[str], int]:
    a, b, c = rng.randint(2, 9), rng.randint(2, 15), rng.randint(1, 30)
    return (f"{who} has {a} bags with {b} {obj} in each bag and {c} loose {obj}. "
            f"How many {obj} does {who} have in all?",
            [f"{a}*{b}={a * b}", f"{a * b}+{c}={a * b + c}"], a * b + c)


def _difference(rng: random.Random, who: str, other: str, obj: str) -> tuple[str, list[str], int]:
    a, b = rng.randint(10, 99), rng.randint(1, 9)
    more = a + b
    return (f"{who} has {a} {obj}. {other} has {more} {obj}. How many more {obj} does {other} have than {who}?",
            [f"{more}-{a}={b}"], b)


_WORD_TEMPLATES: tuple[_WordTemplate, ...] = (
    _gift, _give_away, _boxes, _share, _buy_then_give, _bags_plus_loose, _difference,
)


def word_problem(rng: random.Random) -> Problem:
    """A SVAMP-style templated story with one or two operations and a non-negative answer."""
    template = rng.choice(_WORD_TEMPLATES)
    who, other = rng.sample(_NAMES, 2)
    prompt, steps, answer = template(rng, who, other, rng.choice(_OBJECTS))
    assert answer >= 0, prompt
    return _solved(prompt, steps, answer)


TASKS: dict[str, Callable[[random.Random], Problem]] = {
    "multiplication": multiplication,
    "add_sub": add_sub_chain,
    "word_problem": word_problem,
}


def task(name: str) -> Callable[[random.Random], Problem]:
    """A task by name; ``multiplication:AxB`` sets the digit counts (the paper's 3x3),
    ``add_sub:TERMSxDIGITS`` the chain."""
    base, _, sizes = name.partition(":")
    if base not in TASKS:
        raise ValueError(f"unknown arithmetic task '{name}'; accepted: {', '.join(TASKS)} "
                         "(multiplication:AxB and add_sub:TERMSxDIGITS take sizes)")
    if not sizes:
        return TASKS[base]
    parts = sizes.lower().split("x")
    if base == "word_problem" or len(parts) != 2 or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise ValueError(f"arithmetic task '{name}': write multiplication:AxB or add_sub:TERMSxDIGITS "
                         "with positive integers, like multiplication:3x3")
    a, b = int(parts[0]), int(parts[1])
    if base == "multiplication":
        return lambda rng: multiplication(rng, a, b)
    return lambda rng: add_sub_chain(rng, a, b)


def split_seeds(seed: int) -> tuple[int, int]:
    """(train_seed, test_seed): distinct 63-bit seeds derived from one plan seed."""
    def derive(split: str) -> int:
        digest = hashlib.sha256(f"muse-arithmetic:{seed}:{split}".encode()).digest()
        return int.from_bytes(digest[:8], "big") >> 1

    return derive("train"), derive("test")


def in_test_split(prompt: str) -> bool:
    """Whether a prompt belongs to the held-out part of the problem space."""
    return zlib.crc32(prompt.encode("utf-8")) % _TEST_BUCKETS == 0


def _check_tasks(task_names: Sequence[str]) -> list[str]:
    names = list(task_names)
    if not names:
        raise ValueError(f"no arithmetic tasks given; accepted: {', '.join(TASKS)}")
    for name in names:
        task(name)
    return names


def iter_problems(task_names: Sequence[str], seed: int, split: Split = "train") -> Iterator[Problem]:
    """An endless, deterministic stream of ``split`` problems, tasks taken round-robin."""
    names = _check_tasks(task_names)
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    train_seed, test_seed = split_seeds(seed)
    rng = random.Random(train_seed if split == "train" else test_seed)
    want_test = split == "test"
    tasks = {name: task(name) for name in names}
    for name in itertools.cycle(names):
        for _ in range(_MAX_REJECTIONS):
            problem = tasks[name](rng)
            if in_test_split(problem.prompt) == want_test:
                break
        else:
            raise ValueError(f"arithmetic task '{name}' has too few distinct problems to hold out a {split} split")
        yield problem


def generate(task_names: Sequence[str], n: int, seed: int, split: Split = "train") -> list[Problem]:
    """The first ``n`` problems of ``iter_problems(task_names, seed, split)``."""
    if n < 0:
        raise ValueError(f"n must be non-negative, got {n}")
    return list(itertools.islice(iter_problems(task_names, seed, split), n))


def format_prompt(problem: Problem) -> str:
    """The prefix a model completes: the pretraining format up to the solution."""
    return f"Q: {problem.prompt}\nA: "


def as_text(problem: Problem) -> str:
    """One pretraining document."""
    return f"{format_prompt(problem)}{problem.solution}\n"
