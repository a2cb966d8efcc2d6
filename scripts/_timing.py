"""Timing shared by the benchmarks (``python scripts/bench_*.py`` puts this folder on sys.path)."""

from __future__ import annotations

import time
from typing import Any, Callable


def timer(device: Any) -> Callable[[], float]:
    """Start a timer; calling the result returns seconds (CUDA events on a GPU, so it syncs)."""
    if device.type == "cuda":
        import torch

        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()

        def stop() -> float:
            end.record()
            end.synchronize()
            return begin.elapsed_time(end) / 1e3

        return stop
    t0 = time.perf_counter()
    return lambda: time.perf_counter() - t0
