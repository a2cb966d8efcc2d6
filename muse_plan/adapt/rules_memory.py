"""Rules on memory and compute: use headroom the run left, or make room it lacked.

- ``memory_pressure``: the measured peak above 90% of a device → one more
  level of activation checkpointing (none → selective → full), priced by
  the memory model (peak) and the throughput model (the recomputation's
  cost).
- ``less_recompute``: checkpointing is on and a lighter level is predicted
  to fit → the lightest that fits; the throughput model prices the
  recomputation saved (``recompute_flops``: selective re-runs the SwiGLU
  gate and up projections, full the whole forward of every layer).
- ``larger_micro_batch``: the measured peak under half a device and
  accumulation to spare → the fastest larger micro-batch that is predicted
  to fit, accumulation divided by the same factor so the global batch (and
  so the loss curve per step) is unchanged. Proposed only where the
  throughput model predicts a gain of at least 3% (on a GPU fewer, larger
  micro-steps amortise the per-step host floor; on CPU it predicts none).

Every proposal here passes ``Context.predict``: the memory model's peak fits
the hardware and so does the measured peak moved by the model's difference.
"""

from __future__ import annotations

from muse_plan.adapt.context import Context, Proposal, with_changes
from muse_plan.executor.settings import StageSettings

PRESSURE = 0.90  # of a device: above this, make room
HEADROOM = 0.50  # of a device: under this, use the room
MIN_GAIN = 1.03  # predicted tokens/s ratio worth a change
LIGHTER = {"full": ("none", "selective"), "selective": ("none",), "none": ()}
HEAVIER = {"none": "selective", "selective": "full"}


def _peak(ctx: Context) -> tuple[float, float] | str:
    """(measured peak GiB, share of a device), or why there is no reading."""
    peaks = ctx.measured_peaks()
    if not peaks:
        return "the run recorded no memory readings"
    peak = max(peaks.values())
    return peak, peak / ctx.capacity_gib


def _peak_stage(ctx: Context) -> StageSettings:
    """The settings of the stage with the highest measured peak: the one a memory rule rewrites."""
    peaks = ctx.measured_peaks()
    name = max((n for n in peaks if n in ctx.resolved), key=peaks.get, default=None)
    return ctx.resolved[name] if name else ctx.trained_stages()[0]


def _memory_line(ctx: Context, peak: float, share: float) -> str:
    where = "host RAM" if ctx.hardware.gpu is None else f"one {ctx.hardware.gpu.key}"
    return f"peak memory {peak:.3g} GiB = {share:.0%} of {ctx.capacity_gib:.1f} GiB ({where})"


def memory_pressure(ctx: Context) -> Proposal | str:
    reading = _peak(ctx)
    if isinstance(reading, str):
        return reading
    peak, share = reading
    if share < PRESSURE:
        return f"{_memory_line(ctx, peak, share)}: under the {PRESSURE:.0%} mark"
    stage = _peak_stage(ctx)
    now = stage.activation_checkpointing
    nxt = HEAVIER.get(now)
    if nxt is None:
        return f"{_memory_line(ctx, peak, share)}, but checkpointing is already full"
    changes = ctx.changes_for([stage], "activation_checkpointing", lambda s: nxt)
    predicted = ctx.predict(with_changes(ctx.spec, changes))
    return Proposal(
        "memory_pressure", "more activation checkpointing", changes, f"activation_checkpointing {now}→{nxt}",
        (_memory_line(ctx, peak, share),) + _oom_line(ctx),
        f"{predicted.describe()}; the recomputation costs the step time shown",
        {"peak_gib": peak, "device_share": share}, predicted.numbers(), memory=True)


def _oom_line(ctx: Context) -> tuple[str, ...]:
    n = ctx.evidence.alerts.get("oom", 0) + ctx.evidence.alerts.get("memory_usage", 0)
    return (f"the monitor recorded {n} memory alert(s) or out-of-memory recoveries in this run",) if n else ()


def less_recompute(ctx: Context) -> Proposal | str:
    stage = _peak_stage(ctx)
    now = stage.activation_checkpointing
    if not LIGHTER[now]:
        return "activation checkpointing is off: nothing is recomputed"
    reading = _peak(ctx)
    if isinstance(reading, str):
        return reading
    peak, share = reading
    tried = []
    for level in LIGHTER[now]:
        changes = ctx.changes_for([stage], "activation_checkpointing", lambda s: level)
        predicted = ctx.predict(with_changes(ctx.spec, changes))
        tried.append(f"{level}: {predicted.describe()}")
        if predicted.fits and predicted.speedup >= MIN_GAIN:
            evidence = [_memory_line(ctx, peak, share), f"activation checkpointing is {now}"]
            mfu = ctx.measured_mfu()
            if mfu is not None:
                evidence.append(f"measured model FLOPs utilisation {mfu:.0%}")
            measured = {"peak_gib": peak, "device_share": share, **({"mfu": mfu} if mfu is not None else {})}
            return Proposal(
                "less_recompute", "fewer recomputations", changes, f"activation_checkpointing {now}→{level}",
                tuple(evidence), predicted.describe(), measured, predicted.numbers(), memory=True)
    return "no lighter checkpointing is predicted to fit and gain: " + "; ".join(tried)


def larger_micro_batch(ctx: Context) -> Proposal | str:
    reading = _peak(ctx)
    if isinstance(reading, str):
        return reading
    peak, share = reading
    if share >= HEADROOM:
        return f"{_memory_line(ctx, peak, share)}: no headroom under the {HEADROOM:.0%} mark"
    stage = _peak_stage(ctx)
    micro, accum = stage.micro_batch, stage.grad_accum
    factors = [f for f in (2, 4, 8, 16) if accum % f == 0]
    if not factors:
        return (f"{_memory_line(ctx, peak, share)}, but grad_accum is {accum}: a larger micro-batch would "
                "change the global batch")
    fitting = []
    for f in factors:
        changes = (ctx.changes_for([stage], "micro_batch", lambda s: micro * f)
                   + ctx.changes_for([stage], "grad_accum", lambda s: accum // f))
        predicted = ctx.predict(with_changes(ctx.spec, changes))
        if predicted.fits:
            fitting.append((changes, predicted, f))
    if not fitting:
        return f"{_memory_line(ctx, peak, share)}, but no larger micro-batch is predicted to fit"
    fastest = max(p.speedup for _, p, _ in fitting)
    # within 2% of the fastest: the largest micro-batch, as the optimizer's fit breaks ties
    changes, predicted, f = max((c for c in fitting if c[1].speedup >= fastest * 0.98), key=lambda c: c[2])
    if predicted.speedup < MIN_GAIN:
        return (f"{_memory_line(ctx, peak, share)}; micro_batch {micro * f} would fit, but the throughput model "
                f"predicts tokens/s ×{predicted.speedup:.2f}: not worth a change")
    evidence = [_memory_line(ctx, peak, share), f"micro_batch {micro} × grad_accum {accum}"]
    tps = [v for s in ctx.evidence.trained("tokens_per_s") for v in s.values("tokens_per_s")]
    measured = {"peak_gib": peak, "device_share": share}
    effect = predicted.describe()
    if tps:
        from statistics import median

        measured["tokens_per_s"] = median(tps)
        evidence.append(f"median {median(tps):,.0f} tokens/s")
        effect += f" (≈{median(tps) * predicted.speedup:,.0f} tokens/s)"
    return Proposal(
        "larger_micro_batch", "larger micro-batch", changes,
        f"micro_batch {micro}→{micro * f}, grad_accum {accum}→{accum // f} (global batch kept)",
        tuple(evidence), effect, measured, predicted.numbers(), memory=True)
