"""How many tokens a plan's data holds, for the optimizer: generated, counted,
estimated from a sample, declared by the plan, or unknown (with the reason).

Design decisions:
- The counting is the data engine's (``engines.data.inspect.inspect_source``,
  what ``muse data inspect`` prints): files, documents, EOS placement and the
  train/validation split as a run reads them, exact up to its
  ``EXACT_BYTES`` on disk and estimated above from evenly spaced windows of
  whole lines. Nothing is re-implemented here, so the optimizer's epochs are
  counted on the tokens a run trains on.
- ``arithmetic`` is generated as a stage needs it: unbounded, nothing to
  count (and the engine's count of it would build the stream), so the
  optimizer plans as it always has.
- ``data.tokens`` (a size the plan declares) is what the optimizer plans
  with where the files are not on this machine (planning on a laptop for a
  corpus on the training box); where they are, the count wins and a declared
  size more than 10% off is shown beside it, so a stale one is visible.
- A source that is missing or unreadable, or a tokenizer that can't be
  loaded, gives an unknown size and the reason, never a guess; the optimizer
  then plans as for unbounded data and says so.
- Training reads the corpus less its validation share: ``unique`` is the
  train split (the engine's ``split_sizes``), applied to a declared size too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from muse_plan.plan.units import format_count, parse_scale

DECLARED_OFF = 0.10  # a declared size further than this from the count is shown beside it


@dataclass(frozen=True)
class DataSize:
    """The tokens a plan's data holds (train and validation) and the train split; ``tokens``
    None: unbounded (``how`` generated) or not known (``how`` unknown, ``detail`` says why)."""

    source: str
    how: str  # generated | counted | estimated | declared | unknown
    tokens: float | None
    train: float | None
    detail: str
    val_fraction: float = 0.05
    declared: float | None = None

    @property
    def bounded(self) -> bool:
        return self.train is not None

    @property
    def unique(self) -> float | None:
        """The distinct tokens training reads: the corpus less its validation split."""
        return self.train

    def describe(self) -> str:
        if self.tokens is None or self.train is None:
            return f"{self.source}: {self.detail}"
        return (f"{self.source}: {format_count(self.tokens)} tokens ({self.detail}); {format_count(self.train)} "
                f"for training after the {self.val_fraction:.0%} validation split")

    def as_dict(self) -> dict[str, Any]:
        return {"source": self.source, "how": self.how, "tokens": self.tokens, "unique_tokens": self.train,
                "val_fraction": self.val_fraction, "declared": self.declared, "detail": self.detail}


def _split(tokens: float, val_fraction: float) -> float:
    """The engine's split (``engines.data.documents.split_sizes``): validation the last share, at least 1."""
    return tokens - max(1, round(tokens * val_fraction))


def measure(data: Any, *, exact_bytes: int | None = None) -> DataSize:
    """The size of ``data`` (a plan's ``DataSpec``) by the rules of the module docstring;
    ``exact_bytes``: the engine's threshold for an exact count (its default when None)."""
    vf = data.val_fraction
    declared = float(parse_scale(data.tokens)) if getattr(data, "tokens", None) else None
    if data.source == "arithmetic":
        return DataSize(data.source, "generated", None, None, "generated as needed: no limit on tokens", vf)
    try:
        from engines.data.inspect import inspect_source

        options = {} if exact_bytes is None else {"exact_bytes": exact_bytes}
        report = inspect_source(data.source, data.tokenizer, val_fraction=vf, sample_docs=0, **options)
    except (OSError, ValueError) as exc:
        if declared is not None:
            return DataSize(data.source, "declared", declared, _split(declared, vf),
                            f"declared by data.tokens; not counted here: {exc}", vf, declared)
        return DataSize(data.source, "unknown", None, None, f"size unknown ({exc}); declare it with data.tokens", vf)
    if report.train_tokens is None:
        why = "; ".join(report.notes) or "too few tokens to split off validation"
        return DataSize(data.source, "unknown", float(report.tokens), None, why, vf, declared)
    files = f"{report.files} file{'s' if report.files != 1 else ''}, tokenizer {report.tokenizer}"
    if report.estimated:
        how, detail = "estimated", (f"estimated from {report.sampled_bytes / 2**20:,.1f} of "
                                    f"{report.file_bytes / 2**20:,.1f} MiB sampled: {files}")
    else:
        how, detail = "counted", f"counted: {files}"
    if declared is not None and abs(declared - report.tokens) > DECLARED_OFF * report.tokens:
        detail += f"; the plan declares {format_count(declared)} (data.tokens)"
    return DataSize(data.source, how, float(report.tokens), float(report.train_tokens), detail, vf, declared)
