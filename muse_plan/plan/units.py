"""Parsers for the strings people write in plans and flags.

Each parser takes what a person writes ("10B", "1xRTX3080-8GB", "7days",
"128GB", "100Gbps") and returns a canonical value, or raises ``ValueError``
with a message saying what is accepted. The caller adds which field or flag
it was; these functions know nothing of plans.

Memory sizes are binary: "8GB" means 8 GiB, as GPU vendors and ``nvidia-smi``
mean it, so plans compare directly with what ``torch.cuda`` reports.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from engines.architecture.shapes import _SCALE_RE, parse_scale  # noqa: F401 (the scale parser, re-exported)
from muse_plan.hardware.catalog import known_kinds, lookup

def format_count(count: float, digits: int = 2) -> str:
    """1_300_000_000 → "1.3B": the inverse of ``parse_scale`` on round values. ``digits=3`` keeps three
    significant digits where two would round (11.4B, not 11B): the planner's token budgets, so stages
    that split one budget add up to it and two plans of one model get the same one."""
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if count >= size:
            value = count / size
            if digits >= 3:
                text = f"{value:.{max(0, 2 - int(math.log10(value)))}f}"
                text = text.rstrip("0").rstrip(".") if "." in text else text
            else:
                text = f"{value:.1f}" if value < 10 and value != int(value) else f"{value:.0f}"
            return f"{text}{unit}"
    return str(int(count))


def canonical_scale(text: str) -> str:
    """"1.30b" → "1.3B"; keeps the user's precision, drops noise."""
    m = _SCALE_RE.match(str(text))
    parse_scale(text)  # validates, with the user-facing message
    assert m is not None
    number = m.group(1).rstrip("0").rstrip(".") if "." in m.group(1) else m.group(1)
    return f"{number}{m.group(2).upper()}"


_DURATION_UNITS = {
    "s": 1, "sec": 1, "secs": 1, "second": 1, "seconds": 1,
    "m": 60, "min": 60, "mins": 60, "minute": 60, "minutes": 60,
    "h": 3600, "hr": 3600, "hrs": 3600, "hour": 3600, "hours": 3600,
    "d": 86400, "day": 86400, "days": 86400,
    "w": 604800, "week": 604800, "weeks": 604800,
}
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)\s*([a-z]+)")


def parse_duration(text: str) -> int:
    """"7days" → 604800, "1d12h" → 129600, "90min" → 5400 (seconds)."""
    s = str(text).strip().lower().replace(" ", "")
    parts = _DURATION_PART.findall(s)
    if not s or not parts or "".join(a + b for a, b in parts) != s:
        raise ValueError(f"{text!r} is not a duration; write 7days, 36h, 90min or 1d12h")
    total = 0.0
    for number, unit in parts:
        if unit not in _DURATION_UNITS:
            raise ValueError(f"{text!r}: unknown unit {unit!r}; use days, h, min or s")
        total += float(number) * _DURATION_UNITS[unit]
    if total <= 0:
        raise ValueError(f"{text!r} is not a positive duration")
    return int(round(total))


def format_duration(seconds: int) -> str:
    """604800 → "7days", 86400 → "1day", 129600 → "36h", 5400 → "90min": the largest whole unit."""
    for unit, size in (("days", 86400), ("h", 3600), ("min", 60)):
        if seconds % size == 0:
            return "1day" if seconds == size == 86400 else f"{seconds // size}{unit}"
    return f"{seconds}s"


def clock(seconds: float | None) -> str:
    """A measured (or counted-down) span as a clock: 0:01:52, 12:03:07; "—" for None."""
    if seconds is None:
        return "—"
    hours, rest = divmod(int(round(seconds)), 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}"


def approx_duration(seconds: float) -> str:
    """A predicted time for people: 45 s, 12 min, 3.2 h, 195 days, 2.1 years."""
    for unit, size, digits in (("years", 365 * 86400, 1), ("days", 86400, 0), ("h", 3600, 1), ("min", 60, 0)):
        if seconds >= 2 * size or (unit in ("h", "min") and seconds >= size):
            return f"{seconds / size:,.{digits}f} {unit}"
    return f"{seconds:.0f} s"


_BYTES_UNITS = {"": 1, "B": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
_BYTES_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:I?B)?\s*$", re.IGNORECASE)


def parse_gib(text: str | float | int) -> float:
    """"128GB" → 128.0, "512MB" → 0.5 (GiB). A bare number is GiB."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        value = float(text)
    else:
        m = _BYTES_RE.match(str(text))
        if not m:
            raise ValueError(f"{text!r} is not a memory size; write 8GB, 128GB, 512MB or 1TB")
        unit = m.group(2).upper() or "G"
        value = float(m.group(1)) * _BYTES_UNITS[unit] / 2**30
    if not value > 0 or math.isinf(value):
        raise ValueError(f"{text!r} is not a positive memory size")
    return value


_BANDWIDTH_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(bps|bit/s|b/s|B/s|Bps)\s*$")


def parse_gbps(text: str | float | int) -> float:
    """"100Gbps" → 100.0, "25GB/s" → 200.0 (gigabits per second)."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        value = float(text)
    else:
        m = _BANDWIDTH_RE.match(str(text))
        if not m:
            raise ValueError(f"{text!r} is not a bandwidth; write 100Gbps, 400Gb/s or 25GB/s")
        scale = {"": 1e-9, "K": 1e-6, "M": 1e-3, "G": 1.0, "T": 1e3}[m.group(2).upper()]
        bits = 8 if m.group(3) in ("B/s", "Bps") else 1
        value = float(m.group(1)) * scale * bits
    if not value > 0:
        raise ValueError(f"{text!r} is not a positive bandwidth")
    return value


@dataclass(frozen=True)
class ComputeBudget:
    """What "8xH100" or "1xRTX3080-8GB" says: GPU kind, count, memory per GPU."""

    gpu: str | None        # catalog key, a custom name, or None for CPU only
    count: int
    memory_gib: float | None


_COMPUTE_RE = re.compile(
    r"^\s*(?:(\d+)\s*[x×*]\s*)?([A-Za-z][A-Za-z0-9_]*?)(?:\s*[-_ ]\s*(\d+(?:\.\d+)?)\s*(?:GB|GiB|G))?\s*$",
    re.IGNORECASE,
)


def parse_compute(text: str) -> ComputeBudget:
    """"8xH100", "1xRTX3080-8GB", "2xA100-40GB", "cpu" → a ComputeBudget."""
    s = str(text).strip()
    if s.lower() == "cpu":
        return ComputeBudget(gpu=None, count=0, memory_gib=None)
    m = _COMPUTE_RE.match(s)
    if not m:
        raise ValueError(
            f"{text!r} is not a compute budget; write COUNTxGPU[-MEMGB] like 8xH100, "
            f"1xRTX3080-8GB, 2xA100-40GB, or cpu"
        )
    count = int(m.group(1) or 1)
    if count < 1:
        raise ValueError(f"{text!r}: the GPU count must be at least 1")
    name, memory = m.group(2).strip(), m.group(3)
    kind = lookup(name)
    memory_gib = float(memory) if memory else None
    if kind is None:
        if memory_gib is None:
            raise ValueError(
                f"{text!r}: unknown GPU {name!r}; known: {known_kinds()}; "
                f"for another GPU give its memory, like 1x{name}-24GB"
            )
        return ComputeBudget(gpu=name, count=count, memory_gib=memory_gib)
    return ComputeBudget(gpu=kind.key, count=count, memory_gib=memory_gib or kind.memory_gib)


def format_compute(budget: ComputeBudget) -> str:
    if budget.gpu is None:
        return "cpu"
    memory = budget.memory_gib
    text = f"{budget.count}x{budget.gpu}"
    if memory is not None:
        text += f"-{memory:g}GB"
    return text


def split_csv(text: str) -> list[str]:
    """"reasoning, knowledge" → ["reasoning", "knowledge"]; empty items dropped."""
    return [item.strip().lower() for item in str(text).split(",") if item.strip()]
