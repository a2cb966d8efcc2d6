"""``muse generate`` and ``muse eval``: use a trained model (``muse_plan.trained``).

Design decisions:
- Both open the model through ``open_trained`` (a run id or a folder), so
  they see exactly what ``muse export`` exports; torch is imported inside the
  commands, so registering them costs ``muse --help`` nothing.
- ``generate`` streams: the continuation goes to stdout as its tokens come
  (text is decoded whole and only the new tail printed, held back while it
  ends in an incomplete UTF-8 character), and nothing else does, so it pipes
  cleanly; where the model came from and why generation stopped go to
  stderr. ``--json`` prints one object at the end instead. Temperature 0 is
  greedy; otherwise nucleus sampling from a generator seeded by ``--seed``.
- ``eval`` reads the whole file before it opens the model, so a bad file is
  one line naming its line number without waiting for a load. A row with
  ``text`` adds to the loss: nats per token over every token of every text
  (token-weighted, not a mean of row means) and its perplexity exp(loss). A
  row with ``prompt`` and ``answer`` adds to the accuracy: a greedy
  completion scored by the RL stages' own ``correctness`` reward
  (``engines/grpo/rewards.py``: the completion's last integer equals the
  answer); a row may be both. The prompt is used as written, after the
  model's prefix (``Trained.prefix``: BOS for a GRPO stage, as its prompts
  had). Completions are generated one row at a time through the same
  ``Trained.sample`` as ``generate``, so ``eval`` scores exactly what
  ``generate --temperature 0`` prints for that prompt.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from muse_plan.cli.common import console, err_console, print_json
from muse_plan.errors import NotFound, PlanError

RefArg = Annotated[str, typer.Argument(
    metavar="RUN|DIR", help="A run id (3 or run-00003), a plan's name (its newest run), a checkpoint or "
                            "stage folder, or a Hugging Face model folder.")]
StageOpt = Annotated[Optional[str], typer.Option(
    "--stage", help="Which stage of the run (default: its last stage that trained a language model).")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")]


def _open(ctx: typer.Context, ref: str, stage: str | None) -> Any:
    from muse_plan.trained import open_trained

    return open_trained(ref, stage=stage, db_url=ctx.find_root().obj.get("db_url"))


def _say(text: str) -> None:
    err_console.print(text, style="dim", highlight=False, soft_wrap=True, markup=False)


def generate(
    ctx: typer.Context,
    ref: RefArg,
    prompt: Annotated[str, typer.Option("--prompt", help="The text to continue.")],
    temperature: Annotated[float, typer.Option(help="Sampling temperature; 0 is greedy.")] = 0.8,
    top_p: Annotated[float, typer.Option("--top-p", help="Nucleus sampling: the most likely tokens "
                                                         "holding this share of the probability.")] = 0.95,
    max_tokens: Annotated[int, typer.Option("--max-tokens", help="Tokens to generate at most.")] = 128,
    seed: Annotated[int, typer.Option(help="Seed of the sampling generator.")] = 0,
    stage: StageOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Continue a prompt with a trained model, streaming the text as it comes.

    Stops at the end-of-sequence token or after --max-tokens."""
    if not temperature >= 0 or not math.isfinite(temperature):
        raise PlanError(f"--temperature must be 0 (greedy) or more, got {temperature}")
    if not 0 < top_p <= 1:
        raise PlanError(f"--top-p must be in (0, 1], got {top_p}")
    if max_tokens < 1:
        raise PlanError(f"--max-tokens must be at least 1, got {max_tokens}")
    trained = _open(ctx, ref, stage)
    ids = trained.prompt_ids(prompt)
    notes = list(trained.notes)
    if len(ids) > trained.context:
        notes.append(f"the prompt is {len(ids)} tokens, over the model's context of {trained.context}: "
                     f"its last {trained.context} are read")
    if not as_json:
        _say(trained.source)
        for note in notes:
            _say(f"note: {note}")
    head = trained.tokenizer.decode(ids)
    tokens: list[int] = []
    shown = ""
    try:
        for token in trained.sample(ids, max_tokens, temperature, top_p, seed):
            tokens.append(token)
            if as_json:
                continue
            text = trained.completion_text(ids, tokens, head)
            if text.endswith("\ufffd"):  # a character still incomplete: wait for its other bytes
                continue
            if text.startswith(shown):
                sys.stdout.write(text[len(shown):])
                sys.stdout.flush()
            shown = text
    except KeyboardInterrupt:
        if not as_json:
            sys.stdout.write("\n")
        raise typer.Exit(130) from None
    completion = trained.completion_text(ids, tokens, head)
    stopped = "eos" if tokens and tokens[-1] == trained.eos_id else "max_tokens"
    if as_json:
        print_json({"prompt": prompt, "completion": completion, "tokens": len(tokens), "token_ids": tokens,
                    "stopped": stopped, "source": trained.source, "temperature": temperature, "top_p": top_p,
                    "seed": seed, "notes": notes})
        return
    if completion.startswith(shown):
        sys.stdout.write(completion[len(shown):])
    sys.stdout.write("\n")
    sys.stdout.flush()
    why = "at the end-of-sequence token" if stopped == "eos" else f"at --max-tokens {max_tokens}"
    _say(f"{len(tokens)} tokens, stopped {why}")


# ---- eval ------------------------------------------------------------------------------------


@dataclass
class Row:
    line: int
    text: str | None = None
    prompt: str | None = None
    answer: str | None = None
    data: dict[str, Any] | None = None


def read_rows(path: Path) -> list[Row]:
    """The rows of a JSONL file; every problem is one line naming the file and line."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise NotFound(f"no data file {str(path)!r}" if not path.exists() else f"{path} is not a file")
    rows: list[Row] = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise PlanError(f"{path}: can't be read as UTF-8 text ({exc})") from None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path}, line {number}"
        try:
            data = json.loads(line)
        except ValueError as exc:
            raise PlanError(f"{where}: not JSON ({exc})") from None
        if not isinstance(data, dict):
            raise PlanError(f"{where}: a row must be a JSON object, got {type(data).__name__}")
        row = Row(number)
        if "text" in data:
            if not isinstance(data["text"], str):
                raise PlanError(f"{where}: 'text' must be a string")
            row.text = data["text"]
        if "question" in data and "prompt" not in data:  # GSM8K's name for the prompt
            data["prompt"] = data.pop("question")
        if "prompt" in data or "answer" in data:
            if not ("prompt" in data and "answer" in data):
                present, missing = ("prompt", "answer") if "prompt" in data else ("answer", "prompt")
                raise PlanError(f"{where}: a row with {present!r} needs {missing!r} too")
            if not isinstance(data["prompt"], str):
                raise PlanError(f"{where}: 'prompt' must be a string")
            row.prompt, row.answer, row.data = data["prompt"], _answer(data["answer"], where), data
        if row.text is None and row.prompt is None:
            raise PlanError(f"{where}: a row needs a 'text' field (loss), or 'prompt' and 'answer' (accuracy)")
        rows.append(row)
    if not rows:
        raise PlanError(f"{path} has no rows")
    return rows


def _answer(value: Any, where: str) -> str:
    """The reference answer as the RL stages read it (``engines/data/examples.reference``:
    GSM8K's ``... #### 42`` is 42)."""
    from engines.data.examples import reference

    if isinstance(value, bool) or not isinstance(value, (str, int, float)) or not reference(value):
        raise PlanError(f"{where}: 'answer' must be a non-empty string or a number, got {value!r}")
    return reference(value)


def evaluate(trained: Any, rows: list[Row], max_tokens: int, reward: str = "correctness") -> dict[str, Any]:
    """Loss over the text rows and accuracy over the prompt/answer rows: the share the
    ``reward`` (an RL stage's reward, built-in or ``module:function``) scores 1."""
    from engines.grpo.rewards import Completion, Rewards

    try:
        judge = Rewards({reward: 1.0})
    except ValueError as exc:
        raise PlanError(str(exc)) from None

    out: dict[str, Any] = {"source": trained.source, "text": None, "answers": None}
    texts = [r for r in rows if r.text is not None]
    if texts:
        nats = tokens = 0
        for r in texts:
            total, count = trained.text_loss(r.text)
            nats, tokens = nats + total, tokens + count
        loss = nats / tokens if tokens else None
        out["text"] = {"rows": len(texts), "tokens": tokens, "loss": loss,
                       "perplexity": math.exp(loss) if loss is not None and loss < 700 else None}
    asked = [r for r in rows if r.prompt is not None]
    if asked:
        results = []
        prompts = [trained.prompt_ids(r.prompt) for r in asked]
        for r, ids, generated in zip(asked, prompts, trained.greedy(prompts, max_tokens)):
            text = trained.completion_text(ids, generated)
            score, _ = judge.score(Completion(text, r.answer, len(generated), max_tokens, r.prompt or "",
                                              r.data or {}))
            results.append({"line": r.line, "prompt": r.prompt, "answer": r.answer, "completion": text,
                            "tokens": len(generated), "correct": score})
        right = sum(x["correct"] for x in results)
        out["answers"] = {"rows": len(asked), "correct": right, "accuracy": right / len(asked),
                          "reward": reward, "max_tokens": max_tokens, "results": results,
                          "reward_failures": judge.take_notes()}
    return out


def eval_(
    ctx: typer.Context,
    ref: RefArg,
    data: Annotated[Path, typer.Option(
        "--data", help="JSONL: rows with 'text' (loss, perplexity) and/or 'prompt' and 'answer' "
                       "(accuracy of greedy completions).")],
    stage: StageOpt = None,
    max_tokens: Annotated[int, typer.Option(
        "--max-tokens", help="Tokens a completion may take, for prompt/answer rows.")] = 128,
    reward: Annotated[str, typer.Option(
        "--reward", help="The RL stages' reward that scores an answer: correctness, extracted, format, ... "
                         "or your own as module:function / file.py:function.")] = "correctness",
    as_json: JsonOpt = False,
) -> None:
    """Score a trained model on a JSONL file: loss and perplexity of texts, accuracy on answers.

    Accuracy is the mean of an RL stage's reward (``--reward``; by default
    correctness: the completion's last number equals the answer, GSM8K's
    ``#### 42`` read as 42)."""
    if max_tokens < 1:
        raise PlanError(f"--max-tokens must be at least 1, got {max_tokens}")
    rows = read_rows(data)
    from engines.grpo.rewards import Rewards

    try:
        Rewards({reward: 1.0})  # a reward that does not import: refused before the model loads
    except ValueError as exc:
        raise PlanError(str(exc)) from None
    trained = _open(ctx, ref, stage)
    result = evaluate(trained, rows, max_tokens, reward)
    if as_json:
        print_json({**result, "data": str(data), "notes": trained.notes})
        return
    for note in trained.notes:
        _say(f"note: {note}")
    console.print(f"{trained.source} on {data}", highlight=False, soft_wrap=True, markup=False)
    text = result["text"]
    if text is not None:
        if text["loss"] is None:
            console.print(f"  text: {text['rows']} rows, no tokens to score", highlight=False)
        else:
            ppl = f"{text['perplexity']:.4g}" if text["perplexity"] is not None else "inf"
            console.print(f"  text: {text['rows']} rows, {text['tokens']} tokens: loss {text['loss']:.4f} "
                          f"nats/token, perplexity {ppl}", highlight=False, soft_wrap=True)
    answers = result["answers"]
    if answers is not None:
        console.print(f"  answers: {answers['rows']} rows: accuracy {100 * answers['accuracy']:.1f}% "
                      f"({answers['correct']:g} of {answers['rows']}), greedy, at most {max_tokens} tokens; "
                      + ("correct: the completion's last number is the answer" if reward == "correctness" else
                         f"scored by the reward {reward}"), highlight=False, soft_wrap=True)
        for failure in answers["reward_failures"]:
            _say(f"note: {failure}")
