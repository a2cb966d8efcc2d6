"""The architecture engine's stage options (pretrain, continue, finetune); no torch.

One frozen model, validated when the plan is read (see ``engines/options.py``).
``tasks`` picks the generated arithmetic the stage trains on when the plan's
data source is ``arithmetic``; None is the default mix.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field, ValidationError, field_validator

from engines.options import Options, one_line


class ArchitectureOptions(Options):
    tasks: tuple[str, ...] | None = Field(None, description="generated arithmetic tasks; None: the default mix")

    @field_validator("tasks", mode="before")
    @classmethod
    def _tasks(cls, value: Any) -> Any:
        if value is None:
            return None
        from engines.data.arithmetic import task

        names = [value] if isinstance(value, str) else list(value)
        for name in names:
            task(str(name))
        return tuple(names)


def parse(kind: str, technique: dict[str, Any], stage: dict[str, Any]) -> ArchitectureOptions:
    try:
        return ArchitectureOptions.model_validate(stage)
    except ValidationError as exc:
        raise ValueError(one_line(exc, ArchitectureOptions)) from None
