"""The user's own examples: JSONL files of prompt/completion pairs, chat messages, or
prompt/answer problems, for the supervised and RL stages.

Design decisions:
- One JSON object per line, read as UTF-8; blank lines are skipped. Every
  problem is one line naming the file, the line and the field ("qa.jsonl:7:
  no 'answer' field (a string or a number)"), raised as ``ValueError`` when the
  plan is read (``check_file``) and again when a stage starts, so a bad file
  costs seconds, not a run.
- Three row shapes, whatever the stage:
  ``{"prompt", "completion"}`` — a supervised example;
  ``{"prompt", "answer", ...}`` — a problem with a reference answer (GSM8K's
  ``question`` is read as the prompt); extra fields are kept for the user's
  reward functions. GSM8K's convention is
  understood: an answer holding ``#### 42`` is a worked solution whose
  reference is what follows the last ``####``; for supervised stages such a
  row's answer text is its completion;
  ``{"messages": [{"role", "content"}, ...]}`` — a chat: the last assistant
  message is the completion, the messages before it the prompt, rendered
  with the tokenizer's chat template where it has one
  (``tokenizer_config.json``'s ``chat_template``), else the plain
  ``role: content`` template below. An ``answer`` field may sit beside it.
- What a stage needs is checked per stage: a supervised stage needs a
  completion (or a GSM8K answer), an RL stage a reference answer.
- The held-out split is by a hash of the prompt, so it never changes with
  the file's order or the seed, and a prompt is never on both sides;
  ``eval_data`` (a separate file) replaces it.
- ``Prompter`` turns rows into token ids for both engines: BOS (where the
  tokenizer has one) and the row's prompt text, or a chat's messages through
  the tokenizer's chat template (no BOS added where the template writes its
  own); a supervised target is the completion's tokens and EOS.
"""

from __future__ import annotations

import json
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Sequence

from engines.options import read_from

Need = Literal["completion", "answer", "either"]  # either: a completion or an answer
_GSM8K = "####"
PLAIN_ROLES = {"system": "System", "user": "User", "assistant": "Assistant"}


@dataclass(frozen=True)
class Example:
    """One row: the text a model is prompted with, what it should write, the reference."""

    prompt: str  # plain text, or '' for a chat (``messages`` renders it with the tokenizer)
    completion: str | None
    answer: str | None
    row: dict[str, Any] = field(default_factory=dict, compare=False)  # the whole JSON object
    messages: tuple[dict[str, str], ...] = ()  # a chat's turns before the completion
    where: str = ""  # "qa.jsonl:7"


def reference(answer: Any) -> str:
    """The reference answer of a row: GSM8K's ``... #### 42`` → ``42``; numbers as text."""
    text = str(answer).strip()
    if _GSM8K in text:
        text = text.rsplit(_GSM8K, 1)[1].strip()
    return text


def _text(row: dict[str, Any], key: str, where: str, what: str) -> str:
    value = row.get(key)
    if value is None:
        raise ValueError(f"{where}: no '{key}' field ({what})")
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise ValueError(f"{where}: field '{key}' is a {type(value).__name__}, not {what}")
    text = str(value)
    if key != "answer" and not text.strip():
        raise ValueError(f"{where}: field '{key}' is empty")
    return text


def _chat(row: dict[str, Any], where: str, need: Need) -> tuple[tuple[dict[str, str], ...], str | None]:
    messages = row["messages"]
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"{where}: field 'messages' is not a non-empty list of {{role, content}} objects")
    turns = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise ValueError(f"{where}: messages[{i}] is not a {{\"role\": str, \"content\": str}} object")
        turns.append({"role": m["role"], "content": m["content"]})
    if turns[-1]["role"] == "assistant":
        if len(turns) == 1:
            raise ValueError(f"{where}: messages hold only the assistant's answer, nothing to prompt with")
        return tuple(turns[:-1]), turns[-1]["content"]
    if need == "completion":
        raise ValueError(f"{where}: the last of 'messages' is not the assistant's, so there is nothing to learn")
    return tuple(turns), None


def parse_row(row: Any, where: str, need: Need) -> Example:
    """One JSON value → an ``Example`` with what ``need`` asks for, or ``ValueError``."""
    if not isinstance(row, dict):
        raise ValueError(f"{where}: not a JSON object")
    answer = reference(_text(row, "answer", where, "a string or a number")) if "answer" in row else None
    if "messages" in row:
        messages, completion = _chat(row, where, need)
        prompt = ""
    else:
        key = "question" if "prompt" not in row and "question" in row else "prompt"  # GSM8K's name
        prompt, messages = _text(row, key, where, "a string"), ()
        completion = _text(row, "completion", where, "a string") if "completion" in row else None
    if need == "completion" and completion is None:
        if answer is None or _GSM8K not in str(row.get("answer")):
            raise ValueError(f"{where}: no 'completion' field (a prompt/completion row, chat 'messages', or a "
                             "GSM8K-style 'answer' with its worked solution)")
        completion = str(row["answer"]).strip()
    if need == "either" and answer is None and completion is None:
        raise ValueError(f"{where}: no 'answer' (scored by accuracy) or 'completion' (scored by loss) field")
    if need == "answer" and answer is None:
        raise ValueError(f"{where}: no 'answer' field (the reference answer the rewards check)")
    if need == "answer" and not answer:
        raise ValueError(f"{where}: field 'answer' is empty")
    return Example(prompt, completion, answer, dict(row), messages, where)


def load_examples(path: str | Path, need: Need) -> list[Example]:
    """Every row of a JSONL file, each with what ``need`` asks for."""
    file = Path(path).expanduser()
    name = str(path)
    if file.suffix != ".jsonl":
        raise ValueError(f"{name}: examples are read from a .jsonl file (one JSON object a line)")
    try:
        data = file.read_bytes()
    except FileNotFoundError:
        raise ValueError(f"{name}: no such file{read_from(path)}") from None
    except IsADirectoryError:
        raise ValueError(f"{name}: a folder, not a .jsonl file") from None
    except OSError as exc:
        raise ValueError(f"{name}: can't be read ({exc.strerror})") from None
    examples = []
    for number, raw in enumerate(data.split(b"\n"), start=1):
        where = f"{name}:{number}"
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ValueError(f"{where}: not UTF-8 text (byte {exc.start + 1} of the line)") from None
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{where}: invalid JSON ({exc.msg} at column {exc.colno})") from None
        examples.append(parse_row(row, where, need))
    if not examples:
        raise ValueError(f"{name}: no examples (the file is empty)")
    return examples


_READ: dict[tuple[str, int, int, str], list[Example]] = {}


def read_examples(path: str | Path, need: Need) -> list[Example]:
    """``load_examples``, remembered while the file is unchanged (a plan is validated
    often; a file is parsed once)."""
    file = Path(path).expanduser()
    try:
        stat = file.stat()
        key = (str(file.resolve()), stat.st_mtime_ns, stat.st_size, need)
    except OSError:
        return load_examples(path, need)  # says what is wrong with the path
    if key not in _READ:
        if len(_READ) > 16:
            _READ.clear()
        _READ[key] = load_examples(path, need)
    return _READ[key]


def held_out(example: Example, fraction: float) -> bool:
    """Whether ``example`` is in the held-out share ``fraction`` (by its prompt's hash)."""
    key = example.prompt or json.dumps(example.messages, sort_keys=True)
    return zlib.crc32(key.encode("utf-8")) % 10_000 < fraction * 10_000


def split(examples: Sequence[Example], fraction: float, where: str) -> tuple[list[Example], list[Example]]:
    """(train, held out); both non-empty, or ``ValueError`` saying how to get there."""
    test = [e for e in examples if held_out(e, fraction)]
    train = [e for e in examples if not held_out(e, fraction)]
    if not test or not train:
        raise ValueError(f"{where}: {len(examples)} examples leave {'no' if not test else 'all'} held-out ones at "
                         f"eval_fraction {fraction:g}; give eval_data (a separate file) or change eval_fraction")
    return train, test


# ---- rendering ---------------------------------------------------------------------------


class Prompter:
    """Example rows → token ids for one tokenizer (and its chat template, if any)."""

    def __init__(self, tokenizer: Any, directory: str | None = None, prompt_template: str = "{prompt}") -> None:
        self.tokenizer, self.prompt_template = tokenizer, prompt_template
        self.template = chat_template(directory) if directory and directory != "byte" else None
        self.bos = [tokenizer.bos_id] if tokenizer.bos_id is not None else []
        self.specials = {"bos_token": self._text(tokenizer.bos_id), "eos_token": self._text(tokenizer.eos_id)}

    def _text(self, token: int | None) -> str:
        return "" if token is None or self.tokenizer.name == "byte" else _special_text(self.tokenizer, token)

    def text(self, example: Example) -> str:
        """The prompt as text: the row's, or its chat rendered."""
        if example.messages:
            return render_chat(example.messages, self.template, self.specials)
        return self.prompt_template.replace("{prompt}", example.prompt)

    def ids(self, example: Example) -> list[int]:
        text = self.text(example)
        bos = self.bos if not (self.specials["bos_token"] and text.startswith(self.specials["bos_token"])) else []
        return bos + self.tokenizer.encode(text)

    def target(self, example: Example) -> list[int]:
        """What supervised stages learn: the completion, then EOS."""
        return self.tokenizer.encode(example.completion or "") + [self.tokenizer.eos_id]


def _special_text(tokenizer: Any, token: int) -> str:
    fast = getattr(tokenizer, "_fast", None)
    if fast is not None:
        return str(fast.id_to_token(token) or "")
    auto = getattr(tokenizer, "_auto", None)
    return str(auto.convert_ids_to_tokens(token)) if auto is not None else ""


def plain_chat(messages: Sequence[dict[str, str]]) -> str:
    """The template for a tokenizer without a chat template: ``User: ...`` lines, then
    ``Assistant:`` where the model's answer starts."""
    lines = [f"{PLAIN_ROLES.get(m['role'], m['role'].capitalize())}: {m['content']}" for m in messages]
    return "\n".join(lines) + "\nAssistant: "


def render_chat(messages: Sequence[dict[str, str]], template: str | None, specials: dict[str, str]) -> str:
    """A chat's prompt through ``template`` (Jinja, as Hugging Face chat templates are),
    with the generation prompt added; the plain template when there is none."""
    if not template:
        return plain_chat(messages)
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)

    def raise_exception(message: str) -> None:
        raise ValueError(f"the tokenizer's chat template refused the messages: {message}")

    env.globals["raise_exception"] = raise_exception
    try:
        return env.from_string(template).render(messages=list(messages), add_generation_prompt=True, **specials)
    except ValueError:
        raise
    except Exception as exc:  # a template jinja can't parse or run: the plan's error, in one line
        raise ValueError(f"the tokenizer's chat template can't render the messages: {type(exc).__name__}: "
                         f"{str(exc).splitlines()[0] if str(exc) else ''}") from None


def chat_template(directory: str | Path | None) -> str | None:
    """A tokenizer directory's chat template (``chat_template.jinja`` or the
    ``chat_template`` of ``tokenizer_config.json``), None where it has none."""
    if directory is None:
        return None
    folder = Path(directory)
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    config = folder / "tokenizer_config.json"
    if config.is_file():
        try:
            value = json.loads(config.read_text(encoding="utf-8")).get("chat_template")
        except (ValueError, AttributeError):
            return None
        if isinstance(value, str):
            return value
        if isinstance(value, list):  # named templates: the default one
            named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
            return named.get("default")
    return None


