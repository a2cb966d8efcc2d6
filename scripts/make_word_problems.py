"""Writes the GSM8K-style question/answer files muse ships in ``plans/data/``:
``word-problems-train.jsonl`` and ``word-problems-test.jsonl``, one JSON object a line
with a ``question`` and an ``answer`` holding the worked solution and, after ``####``,
the final number — the layout of GSM8K's files, so a plan written for these runs on
GSM8K itself. The problems are templated here (one or two steps of +, −, ×, small
numbers), deterministic for the seed; train and test never share a question.

    python scripts/make_word_problems.py            # rewrites both files
"""

from __future__ import annotations

import json
import random
from pathlib import Path

OUT = Path(__file__).resolve().parent.parent / "plans" / "data"
NAMES = ("Ava", "Ben", "Chloe", "Dev", "Emma", "Farid", "Grace", "Hiro", "Isla", "Jonas", "Kemi", "Liam",
         "Mei", "Noah", "Olga", "Priya", "Rosa", "Sami", "Tomas", "Yuki")
THINGS = ("apples", "marbles", "stickers", "books", "pencils", "cookies", "stamps", "shells", "cards", "buttons")
ITEMS = ("notebook", "pen", "ticket", "sandwich", "plant", "toy car")


def problem(rng: random.Random) -> tuple[str, str]:
    who, other = rng.sample(NAMES, 2)
    thing = rng.choice(THINGS)
    kind = rng.randrange(5)
    if kind == 0:
        a, b = rng.randint(2, 40), rng.randint(2, 40)
        return (f"{who} has {a} {thing}. {other} gives {who} {b} more. How many {thing} does {who} have now?",
                f"{who} has {a} + {b} = {a + b} {thing}.\n#### {a + b}")
    if kind == 1:
        a = rng.randint(5, 60)
        b = rng.randint(1, a - 1)
        return (f"{who} had {a} {thing} and gave {b} of them to {other}. How many {thing} does {who} have left?",
                f"{who} has {a} - {b} = {a - b} {thing} left.\n#### {a - b}")
    if kind == 2:
        a, b = rng.randint(2, 9), rng.randint(2, 9)
        return (f"{who} buys {a} boxes with {b} {thing} in each box. How many {thing} does {who} buy?",
                f"{who} buys {a} * {b} = {a * b} {thing}.\n#### {a * b}")
    if kind == 3:
        item = rng.choice(ITEMS)
        price, count = rng.randint(2, 12), rng.randint(2, 6)
        return (f"A {item} costs ${price}. {who} buys {count} of them. How many dollars does {who} spend?",
                f"{who} spends {count} * {price} = {count * price} dollars.\n#### {count * price}")
    a, b = rng.randint(5, 30), rng.randint(2, 20)
    c = rng.randint(1, a + b - 1)
    return (f"{who} has {a} {thing}, finds {b} more, then gives {c} to {other}. How many {thing} does {who} "
            f"have now?", f"{who} has {a} + {b} = {a + b} {thing}.\nThen {a + b} - {c} = {a + b - c}.\n"
                          f"#### {a + b - c}")


def main(train: int = 1500, test: int = 300, seed: int = 2026) -> None:
    rng = random.Random(seed)
    seen: set[str] = set()
    rows: list[dict[str, str]] = []
    while len(rows) < train + test:
        question, answer = problem(rng)
        if question not in seen:
            seen.add(question)
            rows.append({"question": question, "answer": answer})
    for name, part in (("word-problems-train.jsonl", rows[:train]), ("word-problems-test.jsonl", rows[train:])):
        (OUT / name).write_text("".join(json.dumps(r) + "\n" for r in part), encoding="utf-8")
        print(f"{OUT / name}: {len(part)} rows")


if __name__ == "__main__":
    main()
