"""Alert thresholds as a user writes them: ``gradient_norm:10,memory_usage:90,loss_spike:3``.

Parsed and validated here (one line naming the bad part and what is
accepted); stored with the plan as ``alerts`` (``PlanSpec.alerts``), so a
run, the dashboard and a later resume all read the same rules.
"""

from __future__ import annotations

# name -> (meaning, lowest, highest)
ALERTS: dict[str, tuple[str, float, float]] = {
    "gradient_norm": ("gradient norm above which a step is an explosion (a fault)", 0.0, float("inf")),
    "loss": ("loss above which to alert", 0.0, float("inf")),
    "loss_spike": ("z-score of the loss against the last 50 steps", 0.5, 100.0),
    "memory_usage": ("percent of device memory", 1.0, 100.0),
    "throughput_drop": ("percent drop of tokens/s against the recent median", 1.0, 99.0),
    "plateau": ("steps over which the loss must improve by 1%", 10.0, 1e9),
    "no_signal": ("percent of an RL stage's groups scoring all alike over 50 steps", 1.0, 100.0),
}


def check(name: str, value: float) -> float:
    """``value`` when ``name`` is a known alert and the value in its range."""
    if name not in ALERTS:
        raise ValueError(f"unknown alert {name!r}; accepted: {', '.join(ALERTS)}")
    meaning, low, high = ALERTS[name]
    if not (low < value <= high if low == 0 else low <= value <= high):
        raise ValueError(f"alert {name}: {value:g} is out of range ({meaning}: {low:g} to {high:g})")
    return float(value)


def parse_thresholds(text: str) -> dict[str, float]:
    """``"gradient_norm:10,memory_usage:90"`` → {"gradient_norm": 10.0, "memory_usage": 90.0}."""
    found: dict[str, float] = {}
    for part in (p.strip() for p in str(text).split(",")):
        if not part:
            continue
        name, sep, value = part.partition(":")
        name = name.strip().replace("-", "_")
        if not sep:
            raise ValueError(f"{part!r} needs NAME:VALUE, like gradient_norm:10")
        try:
            number = float(value.strip().rstrip("%"))
        except ValueError:
            raise ValueError(f"{part!r}: {value.strip()!r} is not a number") from None
        try:
            found[name] = check(name, number)
        except ValueError as exc:
            raise ValueError(f"{part!r}: {exc}") from None
    if not found:
        raise ValueError("no alert thresholds given; write NAME:VALUE pairs like gradient_norm:10,memory_usage:90")
    return found
