"""Rich renderings of a fit: verdict, memory breakdown with bars, settings, ETA, the data's epochs, alternatives."""

from __future__ import annotations

from typing import Any

from rich.console import Group
from rich.table import Table
from rich.text import Text

from muse_plan.plan.units import approx_duration

GIB = 2**30
VERDICTS = {
    "fits": ("fits as written", "green"),
    "fits_with_changes": ("fits with these changes", "yellow"),
    "does_not_fit": ("does not fit", "red"),
}
BAR = 30


def _gib(n: float) -> str:
    return f"{n / GIB:,.2f}"


def _peak_stage(candidate: Any) -> Any:
    return max(candidate.priced, key=lambda s: s.memory.total, default=None)


def memory_table(stage: Any, limit: int, capacity: int, title: str) -> Table:
    """Each term of the peak, in GiB, with a bar scaled to the device's memory."""
    table = Table(title=title, title_justify="left", header_style="bold", box=None, padding=(0, 1))
    table.add_column("term")
    table.add_column("GiB", justify="right")
    table.add_column("")
    scale = max(capacity, stage.memory.total)
    for name, value in stage.memory.items():
        if value:
            table.add_row(name, _gib(value), Text("█" * max(1, round(BAR * value / scale)), style="cyan"))
    total = stage.memory.total
    style = "green" if total <= limit else "red"
    table.add_row(Text("peak", style="bold"), Text(_gib(total), style=style),
                  Text(f"of {_gib(limit)} GiB usable ({_gib(capacity)} GiB, 10% kept free)", style="dim"))
    if stage.memory.host:
        table.add_row("host RAM (offloaded)", _gib(stage.memory.host), "")
    if stage.memory.gradients * 2 < stage.memory.weights and stage.config and not stage.config.lora:
        table.caption = ("gradients: what is alive when backward starts; the rest grow as activations "
                         "are freed and count in transient")
        table.caption_justify = "left"
    return table


def stages_table(candidate: Any) -> Table:
    table = Table(title="predicted time", title_justify="left", header_style="bold", box=None, padding=(0, 1))
    for column in ("stage", "steps", "peak GiB", "tokens/s", "time"):
        table.add_column(column, justify="right" if column != "stage" else "left")
    for s in candidate.stages:
        if s.memory is None:
            table.add_row(s.name, str(s.steps or "—"), "—", "—", Text(s.note, style="dim"))
            continue
        table.add_row(s.name, f"{s.steps:,}", _gib(s.memory.total), f"{s.time.tokens_per_s:,.0f}",
                      approx_duration(s.seconds))
    return table


def _knobs_text(s: Any) -> str:
    parts = [f"precision {s.precision}", f"micro-batch {s.micro_batch} × accumulation {s.grad_accum}",
             f"checkpointing {s.checkpointing}", f"sharding {s.sharding}", f"offload {s.offload}",
             f"optimizer {s.optimizer}"] + (["LoRA"] if s.lora else [])
    return ", ".join(parts)


def settings_line(candidate: Any) -> Text | None:
    """One line when every priced stage runs the same settings, else one per stage;
    None when no stage is priced."""
    if not candidate.priced:
        return None
    compiled = [s.name for s in candidate.priced if s.settings.compile]
    also = ("\ncompiled with torch.compile (training.compile), as priced: " + ", ".join(compiled)) if compiled else ""
    from muse_plan.optimizer.throughput import fused_priced  # the optimizer has it loaded by now

    fused = [s for s in candidate.priced if s.settings.model.fused_kernels != "off"]
    measured = [s.name for s in fused if fused_priced(s.settings.model, s.settings.cuda_graphs)]
    as_torch = [s.name for s in fused if not fused_priced(s.settings.model, s.settings.cuda_graphs)]
    also += ("\nfused Triton kernels on a GPU (training.fused_kernels), priced as measured: " + ", ".join(measured)
             if measured else "")
    also += ("\nfused Triton kernels on a GPU (training.fused_kernels), priced as torch's own: " + ", ".join(as_torch)
             if as_torch else "")
    if candidate.settings is not None:
        return Text("settings: " + _knobs_text(candidate.settings) + also)
    return Text("settings per stage:\n" + "\n".join(f"  {s.name}: {_knobs_text(s.knobs)}"
                                                     for s in candidate.priced) + also)


def faster_lines(candidate: Any, hw: Any) -> list[Text]:
    """What would make an mhc / mgt stage's connection faster, priced, for the user to choose."""
    from muse_plan.optimizer.fit import faster_connections

    return [Text(f"faster, your choice: {' with '.join(f.changes)} would train stage {f.stage} at "
                 f"{f.tokens_per_s:,.0f} tokens/s against {f.was_tokens_per_s:,.0f} (priced from plan runs on an "
                 "H100 / H200, docs/bench_plan_run.md"
                 + ("; a bf16 state's effect on the loss: docs/bench_stream_dtype.md"
                    if any("stream_dtype" in change for change in f.changes) else "") + ")", style="cyan")
            for f in faster_connections(candidate, hw)]


def eta_line(eta: Any, timeline: str | None) -> Text:
    total = approx_duration(eta.total_s)
    if eta.timeline_s is None:
        return Text(f"ETA {total} (the plan gives no timeline)")
    if eta.meets:
        return Text(f"ETA {total}, within the timeline of {timeline}", style="green")
    return Text(f"ETA {total}: misses the timeline of {timeline} by "
                f"{approx_duration(eta.total_s - eta.timeline_s)}", style="red")


def meets_line(m: Any, hw: Any) -> Text:
    ways = [f"train on {m.token_fraction:.0%} of the planned tokens"]
    if m.world_size:
        ways.append(f"use {m.world_size} {hw.gpu.key} GPUs at the same global batch")
    elif m.cpu_cores:
        ways.append(f"use about {m.cpu_cores} CPU cores")
    elif hw.gpu is not None:
        ways.append(f"no count of {hw.gpu.key} GPUs up to 1024 gets there at this global batch")
    return Text(f"to meet the timeline it needs {m.speedup:.1f}x: " + "; or ".join(ways), style="yellow")


def _epochs(value: float) -> str:
    return f"{value:,.1f}" if value < 100 else f"{value:,.0f}"


def data_lines(report: Any, verdict: str) -> list[Text]:
    """The plan's data: its size and how it was known; each corpus stage that repeats it, with
    its epochs and what they are worth; the best use of it, where the plan runs past the
    warning (with a plan that does not fit it is alternative 1 or so instead). Nothing for
    generated data."""
    from muse_plan.optimizer.data_budget import EPOCH_WARNING
    from muse_plan.plan.units import format_count

    size = report.size
    if size.how == "generated":
        return []
    if not size.bounded:
        return [Text(f"data {size.describe()}", style="dim")]
    lines = [Text(f"data {size.describe()}")]
    for s in report.stages:
        if not s.repeats:
            continue
        through = f" ({_epochs(s.through)} through it)" if s.before else ""
        worth = f"worth {format_count(s.effective)} new tokens" if s.effective >= 1e-3 * s.tokens \
            else "worth next to nothing in new tokens"
        lines.append(Text(f"  stage {s.name}: {format_count(s.tokens)} tokens, {_epochs(s.epochs)} epochs{through}, "
                          f"{worth}", style="yellow" if s.warning else ""))
    if report.binding:
        lines.append(Text(f"  past {EPOCH_WARNING:g} epochs a repeated token is worth less than a new one "
                          "(Muennighoff et al. 2023, effective data D' = U + U·R*·(1 − e^(−R/R*)), R* = 15.4)",
                          style="yellow"))
    proposal = report.proposal
    if proposal is not None and verdict != "does_not_fit":
        lines.append(Text(proposal.title[:1].upper() + proposal.title[1:], style="bold"))
        lines.append(Text(f"    {proposal.detail}"))
    return lines


def fit_view(result: Any, stored: Any) -> Group:
    label, style = VERDICTS[result.verdict]
    hw = result.hardware
    parts: list[Any] = [Text.assemble((result.spec.name, "bold"), " on ", (hw.describe(), "bold"), ": ",
                                      (label, f"bold {style}"))]
    capacity = int(hw.memory_gib * 2**30)
    shown = result.chosen or result.written
    peak = _peak_stage(shown)
    if result.changes:
        from muse_plan.optimizer.fit import grouped

        for name, old, new, where in grouped(result.changes, len(result.written.priced)):
            scope = f" (stage {', '.join(where)})" if where else ""
            parts.append(Text(f"  {name}: {old} → {new}{scope}", style="yellow"))
    if peak is not None:
        which = "as written" if result.chosen is None else "chosen settings"
        parts.append(memory_table(peak, hw.limit_bytes, capacity,
                                  f"memory per device, stage {peak.name} ({which})"))
    if result.chosen is not None:
        parts += [p for p in (settings_line(result.chosen), stages_table(result.chosen)) if p is not None]
        if result.eta is not None:
            parts.append(eta_line(result.eta, result.spec.timeline))
            unpriced = [s.name for s in result.chosen.stages if s.memory is None]
            if unpriced:
                parts.append(Text(f"not in the ETA: {', '.join(unpriced)} (not priced)", style="dim"))
        if result.meets is not None:
            parts.append(meets_line(result.meets, hw))
        parts += faster_lines(result.chosen, hw)
    if result.data is not None:
        parts += data_lines(result.data, result.verdict)
    for i, alt in enumerate(result.alternatives, 1):
        if i == 1:
            parts.append(Text("alternatives that fit, within the timeline first:", style="bold"))
        parts.append(Text(f" {i}. {alt.title}", style="bold"))
        parts.append(Text(f"    {alt.detail}"))
    if result.unfit:
        parts.insert(1, Text(f"no setting fits stage{'s' if len(result.unfit) > 1 else ''} "
                             f"{', '.join(result.unfit)} here", style="red"))
    if result.verdict == "does_not_fit" and not result.alternatives:
        parts.append(Text("no alternative in the catalog fits either", style="red"))
    if stored is not None:
        parts.append(Text(f"stored as revision {stored.revision.number} (author optimizer): "
                          f"{stored.revision.reason}", style="dim"))
    return Group(*parts)


def fit_dict(result: Any, stored: Any) -> dict[str, Any]:
    from muse_plan.optimizer.fit import faster_connections

    def candidate(c: Any) -> dict[str, Any] | None:
        if c is None:
            return None
        return {"settings": vars(c.settings) if c.settings is not None else None, "fits": c.fits,
                "seconds": c.seconds,
                "stages": [{"name": s.name, "steps": s.steps, "note": s.note or None,
                            "settings": vars(s.knobs) if s.memory is not None else None,
                            "memory": s.memory.as_dict() | {"total": s.memory.total} if s.memory else None,
                            "tokens_per_s": s.time.tokens_per_s if s.time else None,
                            "seconds": s.seconds} for s in c.stages]}

    def alternative(a: Any) -> dict[str, Any]:
        return {"title": a.title, "detail": a.detail, "hardware": a.hardware.describe(), "verdict": a.result.verdict,
                "kind": a.key, "eta_s": a.seconds, "meets_timeline": a.result.eta.meets if a.result.eta else None,
                "model_kept": a.kept, "data": a.data}

    def data(report: Any) -> dict[str, Any] | None:
        if report is None:
            return None
        return report.size.as_dict() | {
            "stages": [{"name": s.name, "tokens": s.tokens, "epochs": s.epochs, "epochs_through": s.through,
                        "effective_tokens": s.effective, "warning": s.warning} for s in report.stages],
            "effective_tokens": report.effective if report.stages else None,
            "best_use": alternative(report.proposal) if report.proposal is not None else None}

    return {
        "plan": result.spec.name, "hardware": result.hardware.describe(), "verdict": result.verdict,
        "limit_bytes": result.hardware.limit_bytes,
        "changes": [{"stage": c.stage, "field": c.field, "old": c.old, "new": c.new} for c in result.changes],
        "unfit_stages": result.unfit,
        "written": candidate(result.written), "chosen": candidate(result.chosen),
        "eta_s": result.eta.total_s if result.eta else None,
        "meets_timeline": result.eta.meets if result.eta else None,
        "to_meet_timeline": vars(result.meets) if result.meets else None,
        "faster_connections": [{"stage": f.stage, "changes": list(f.changes), "tokens_per_s": f.tokens_per_s,
                                "was_tokens_per_s": f.was_tokens_per_s}
                               for f in (faster_connections(result.chosen, result.hardware) if result.chosen else [])],
        "alternatives": [alternative(a) for a in result.alternatives],
        "data": data(result.data),
        "revision": stored.revision.number if stored else None,
    }
