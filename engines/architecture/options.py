"""The architecture engine's stage options (pretrain, continue, finetune); no torch.

One frozen model, validated when the plan is read (see ``engines/options.py``).
``tasks`` picks the generated arithmetic the stage trains on when the plan's
data source is ``arithmetic``; None is the default mix. ``lora``: the
adapters a continue or finetune stage trains instead of every weight (the
plan's ``techniques.lora``, or the stage's ``lora`` option); pretrain trains
from scratch, so never through adapters. ``data``: a finetune stage's own
JSONL examples (prompt/completion, chat messages, or GSM8K-style answers;
``engines/data/examples.py``) instead of the plan's corpus, the loss on the
completions only; ``packing`` packs them back to back into the model's
context, else each is padded to it.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field, ValidationError, field_validator

from engines.options import ExampleFiles, LoraOptions, one_line


class ArchitectureOptions(ExampleFiles):
    needs: ClassVar[Literal["completion", "answer"]] = "completion"

    packing: bool = Field(False, description="finetune on data: pack examples into the context (else pad each)")
    tasks: tuple[str, ...] | None = Field(None, description="generated arithmetic tasks; None: the default mix")
    lora: LoraOptions | None = Field(None, description="adapters a continue or finetune stage trains (techniques.lora)")

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
    if kind == "pretrain" and "lora" in stage:  # from scratch: every weight trains
        raise ValueError("unknown option 'lora' for a pretrain stage (it trains every weight from scratch); "
                         "accepted: tasks")
    if kind != "finetune" and ("data" in stage or "eval_data" in stage):
        raise ValueError(f"option 'data' (your examples) is for finetune stages; a {kind} stage reads the plan's "
                         "data.source (a text file or folder)")
    try:
        return ArchitectureOptions.model_validate(stage)
    except ValidationError as exc:
        raise ValueError(one_line(exc, ArchitectureOptions)) from None
