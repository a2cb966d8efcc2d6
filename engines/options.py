"""What every engine's typed stage options share; no torch.

Design decisions:
- An engine owns the options its stages accept: one frozen pydantic model
  per stage kind (``extra="forbid"``, ``Literal`` choices, bounds), with
  every default written once, there. The plan validates a stage's options
  against that model when the plan is imported or edited, and the executor
  hands the engine the validated object, so an engine reads ``o.group_size``
  and never a ``dict.get`` with a default of its own.
- ``LoraOptions`` lives here, not in one engine: it is a technique of the
  plan (``techniques.lora``) that any engine which fine-tunes may take.
- Files named in options (examples, reward modules) are read when a plan is
  imported or edited, and again when it runs or is fitted, not when a stored
  revision is read back to list, show, monitor or report it
  (``files_unchecked``): its relative paths lead somewhere only from the
  folder it was imported in.
- ``one_line`` turns a validation error into the one line the CLI prints:
  each key, its value and what is accepted, so a typo is refused at import
  with a message that says how to fix it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, PositiveInt, ValidationError, model_validator

# whether validating options reads the user's files (examples, reward modules); off while a stored
# revision is read back (``files_unchecked``), which was checked when it was written
_CHECK_FILES: ContextVar[bool] = ContextVar("muse_check_files", default=True)


def checks_files() -> bool:
    return _CHECK_FILES.get()


def read_from(path: str | Path) -> str:
    """What a "no such file" message adds for a relative path: the folder it was looked up from
    (a plan's relative paths lead somewhere only from the folder muse runs in)."""
    return "" if Path(path).expanduser().is_absolute() else f" (a relative path, read from {Path.cwd()})"


@contextmanager
def files_unchecked() -> Iterator[None]:
    """Validate without opening the files options name: a plan read back from the store
    (listed, shown, monitored, reported) from a folder where its relative paths don't lead."""
    token = _CHECK_FILES.set(False)
    try:
        yield
    finally:
        _CHECK_FILES.reset(token)


class Options(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class LoraOptions(Options):
    """LoRA (QLoRA with ``quantize_base: 4bit``) for the fine-tuning stages."""

    rank: PositiveInt = 8
    alpha: float = Field(16.0, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: tuple[str, ...] = ("q_proj", "v_proj")
    layers_fraction: float = Field(0.25, gt=0, le=1, description="last share of layers adapted (paper: 1/4 or 1/3)")
    quantize_base: Literal["none", "4bit"] = "none"

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank


class ExampleFiles(Options):
    """The user's JSONL examples a stage trains on instead of generated ``tasks``
    (``engines/data/examples.py``), read when the plan is read so a bad line is refused
    then; a subclass says what a row must hold (``needs``)."""

    needs: ClassVar[Literal["completion", "answer"]] = "answer"

    data: str | None = Field(None, description="your JSONL file instead of generated tasks: prompt/completion, "
                                               "chat messages, or prompt/answer rows")
    eval_data: str | None = Field(None, description="held-out JSONL file scored at evaluations")
    eval_fraction: float = Field(0.1, gt=0, lt=1, description="share of data held out when there is no eval_data")
    prompt_template: str = Field("{prompt}", description="how a row's prompt is shown to the model, e.g. "
                                                         "'Q: {prompt}\\nA: ' (chats use the chat template)")

    @model_validator(mode="after")
    def _files(self) -> ExampleFiles:
        from engines.data.examples import read_examples, split

        if "{prompt}" not in self.prompt_template:
            raise ValueError(f"prompt_template {self.prompt_template!r} has no {{prompt}} to put the row's prompt in")
        if self.data is None:
            if self.eval_data is not None:
                raise ValueError("eval_data is the held-out file of data; give data (your training file) too")
            return self
        if "tasks" in self.model_fields_set and getattr(self, "tasks", None):
            raise ValueError("give tasks (generated problems) or data (your file), not both")
        if not checks_files():
            return self
        rows = read_examples(self.data, self.needs)
        if self.eval_data is not None:
            read_examples(self.eval_data, self._eval_needs)
        else:
            split(rows, self.eval_fraction, self.data)
        return self

    @property
    def _eval_needs(self) -> Literal["completion", "answer", "either"]:
        # a supervised stage scores held-out rows by their answer or their completion's loss
        return "either" if self.needs == "completion" else "answer"

    def examples(self, limit: int | None = None) -> tuple[list[Any], list[Any]]:
        """(training rows, held-out rows — at most ``limit``) of ``data``."""
        from engines.data.examples import read_examples, split

        rows = read_examples(self.data or "", self.needs)
        if self.eval_data is not None:
            return rows, read_examples(self.eval_data, self._eval_needs)[:limit]
        train, test = split(rows, self.eval_fraction, self.data or "")
        return train, test[:limit]


def accepted(model: type[BaseModel]) -> str:
    return ", ".join(model.model_fields)


def one_line(exc: ValidationError, model: type[BaseModel]) -> str:
    """Every error of ``exc`` on one line: ``unknown option 'grup_size'; accepted: ...``,
    ``option kl_beta = 'lots': input should be a valid number``, joined by "; "."""
    return "; ".join(_one(err, model) for err in exc.errors())


def _one(err: Any, model: type[BaseModel]) -> str:
    loc = ".".join(str(part) for part in err["loc"])
    if err["type"] == "extra_forbidden":
        parent = err["loc"][:-1]
        inner = _nested(model, parent) or model
        where = ".".join(map(str, parent))
        key = f"{where}.{err['loc'][-1]}" if where else str(err["loc"][-1])
        return f"unknown option {key!r}; accepted: {accepted(inner)}"
    message = err["msg"].removeprefix("Value error, ")
    if "input" in err and err["type"] not in ("value_error", "assertion_error"):
        return f"option {loc} = {err['input']!r}: {message[:1].lower()}{message[1:]}"
    return f"option {loc}: {message}" if loc else message


def _nested(model: type[BaseModel], path: tuple[Any, ...]) -> type[BaseModel] | None:
    """The options model at ``path`` inside ``model`` (``reward_weights`` → ``RewardWeights``)."""
    for part in path:
        field = model.model_fields.get(str(part))
        if field is None:
            return None
        candidates = [field.annotation, *getattr(field.annotation, "__args__", ())]
        found = next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)
        if found is None:
            return None
        model = found
    return model
