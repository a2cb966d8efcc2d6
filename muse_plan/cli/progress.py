"""The live progress bar of ``muse plan run``: stage, step, loss, tokens/s, ETA."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn


def _tokens(rate: float) -> str:
    return f"{rate / 1e3:.1f}k" if rate < 1e6 else f"{rate / 1e6:.2f}M"


class ProgressView:
    """Implements the runner's ``View``: one bar per stage, messages above it."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.progress = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}"), TextColumn("val {task.fields[val]}"),
            TextColumn("{task.fields[rate]} tok/s"), TimeRemainingColumn(),
            console=console, transient=False,
        )
        self.task: Any = None
        self.started = False  # the bar appears with the first stage, not before a plan error

    def __enter__(self) -> ProgressView:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.started:
            self.progress.stop()

    def message(self, text: str) -> None:
        # soft wrap: a long line (a command to copy, a path) is not broken by inserted newlines
        self.progress.console.print(text, markup=False, highlight=False, soft_wrap=True)

    def stage_started(self, name: str, total_steps: int, start_step: int) -> None:
        if not self.started:
            self.progress.start()
            self.started = True
        same = [t for t in self.progress.tasks if t.description == name]
        if same:  # the stage resumed after a recovery: the same bar goes back to its checkpoint
            self.task = same[-1].id
            self.progress.update(self.task, total=total_steps, completed=start_step)
            return
        self.task = self.progress.add_task(name, total=total_steps, completed=start_step,
                                           loss="-", val="-", rate="-")

    def step(self, record: Any) -> None:
        self.progress.update(self.task, completed=record.step, loss=f"{record.loss:.3f}",
                             rate=_tokens(record.tokens_per_s))

    def evaluated(self, step: int, metrics: dict[str, float]) -> None:
        if "val_loss" in metrics:
            self.progress.update(self.task, val=f"{metrics['val_loss']:.3f}")

    def stage_finished(self, name: str) -> None:
        self.progress.update(self.task, completed=self.progress.tasks[-1].total)
