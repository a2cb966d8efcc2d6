"""``muse data``: look at a corpus before a plan trains on it, and train a tokenizer for it.

``muse data inspect SOURCE`` counts what ``engines.data.inspect`` counts (the
executor's numbers); ``muse data tokenizer train CORPUS`` runs
``engines.data.train_tokenizer``. The CLI parses and renders only. Neither
command imports torch (the engines' data reader is plain Python), except
``inspect arithmetic``, which builds the generated streams as a run does.
The library raises ``ValueError`` / ``FileNotFoundError`` / ``FileExistsError``
with one line naming the file (and line, field); they are translated here
into muse's user errors (exit code 2). A progress bar (stderr, transient)
appears only on a terminal and for a corpus large enough to wait for.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Annotated, Any, Iterator

import typer
from rich.markup import escape
from rich.table import Table

from engines.data.documents import format_bytes
from muse_plan.cli.common import console, err_console, print_json
from muse_plan.errors import Conflict, NotFound, PlanError

app = typer.Typer(help="Look at a corpus and train a tokenizer for it.", no_args_is_help=True)
tokenizer_app = typer.Typer(help="Tokenizers for your own data.", no_args_is_help=True)
app.add_typer(tokenizer_app, name="tokenizer")

JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")]
PROGRESS_BYTES = 8 << 20  # below, training takes about a second: no bar


@contextlib.contextmanager
def _user_errors() -> Iterator[None]:
    """The data library's one-line errors as muse's user errors (exit code 2)."""
    try:
        yield
    except FileNotFoundError as exc:
        raise NotFound(str(exc)) from None
    except FileExistsError as exc:
        raise Conflict(str(exc)) from None
    except (ValueError, OSError) as exc:  # OSError: a file that can't be read (permissions, a folder gone)
        raise PlanError(str(exc)) from None




def _count(n: int | None) -> str:
    return "—" if n is None else f"{n:,}"


# ---- muse data inspect -------------------------------------------------------------------------


@app.command("inspect")
def inspect(
    source: Annotated[str, typer.Argument(help="'arithmetic', or a local .txt/.text/.md/.jsonl file or folder.")],
    tokenizer: Annotated[str, typer.Option(
        "--tokenizer", "-t", help="'byte' or a local tokenizer folder (a plan's data.tokenizer).")] = "byte",
    val_fraction: Annotated[float, typer.Option(
        "--val-fraction", help="The plan's data.val_fraction: validation is the last fraction of tokens.")] = 0.05,
    exact: Annotated[bool, typer.Option(
        "--exact", help="Count a large corpus exactly instead of estimating it from a sample.")] = False,
    seed: Annotated[int, typer.Option("--seed", help="arithmetic only: the plan's training.seed.")] = 0,
    json_out: JsonOpt = False,
) -> None:
    """Files, documents, characters, bytes and tokens of a data source, and its train/val split.

    The numbers are the ones a run uses: the same reader, EOS after every
    document, validation the last --val-fraction of the tokens. A corpus over
    16 MB on disk is estimated from a sample (and says so) unless --exact."""
    from engines.data.inspect import inspect_source

    with _user_errors():
        report = inspect_source(source, tokenizer, val_fraction=val_fraction, seed=seed,
                                **({"exact_bytes": 1 << 62} if exact else {}))
    if json_out:
        print_json(report.to_dict())
        return
    _render_report(report)


def _render_report(report: Any) -> None:
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold")
    grid.add_column()
    estimated = " [yellow](estimated)[/]" if report.estimated else ""
    where = ("generated" if report.source == "arithmetic"
             else f"{report.files:,} file{'s' if report.files != 1 else ''}, {format_bytes(report.file_bytes)} on disk")
    grid.add_row("source", f"{escape(report.source)} ({where})")
    grid.add_row("tokenizer", f"{escape(report.tokenizer)} (vocab {report.vocab_size:,})")
    grid.add_row("documents", f"{report.documents:,}{estimated}")
    grid.add_row("characters", f"{report.characters:,}{estimated}")
    grid.add_row("bytes", f"{report.text_bytes:,} (UTF-8 text){estimated}")
    grid.add_row("tokens", f"{report.tokens:,} ({report.text_tokens:,} text + {report.documents:,} EOS){estimated}")
    split = f"{_count(report.train_tokens)} train / {_count(report.val_tokens)} val"
    how = ("held-out problems" if report.source == "arithmetic"
           else f"the last {report.val_fraction:g} of the tokens")
    grid.add_row("split", f"{split} (validation: {how})")
    grid.add_row("tokens/char", f"{report.tokens_per_char:.3f}   bytes/token {report.bytes_per_token:.2f}")
    console.print(grid)
    if report.samples:
        console.print("[bold]samples[/] (the first characters, as the tokenizer decodes them)")
        for sample in report.samples:
            text = sample.text.replace("\n", "⏎ ")
            console.print(f"  [dim]{escape(sample.where)} · {sample.tokens} tokens[/]  {escape(text)}",
                          highlight=False, soft_wrap=True)
    for note in report.notes:
        console.print(f"note: {escape(note)}", highlight=False, soft_wrap=True)


# ---- muse data tokenizer train -----------------------------------------------------------------


class _Bar:
    """The trainer's progress callback as a rich bar on stderr (reading, training, merging), started at the
    first report when the corpus is large enough to wait for and stderr is a terminal."""

    LABELS = {"reading": "reading the corpus", "training": "counting pairs", "merging": "learning merges"}

    def __init__(self) -> None:
        self.progress: Any = None
        self.tasks: dict[str, Any] = {}

    def __enter__(self) -> _Bar:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.progress is not None:
            self.progress.stop()

    def __call__(self, phase: str, done: int, total: int | None) -> None:
        if self.progress is None:
            if not (phase == "reading" and (total or 0) >= PROGRESS_BYTES and err_console.is_terminal):
                return
            from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeRemainingColumn

            self.progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), TaskProgressColumn(),
                                     TimeRemainingColumn(), console=err_console, transient=True)
            self.progress.start()
        if phase not in self.tasks:
            for task in self.tasks.values():  # the previous phase is over
                self.progress.update(task, completed=self.progress.tasks[task].total or 0)
            self.tasks[phase] = self.progress.add_task(self.LABELS.get(phase, phase), total=total)
        self.progress.update(self.tasks[phase], completed=done, total=total)


@tokenizer_app.command("train")
def train(
    corpus: Annotated[str, typer.Argument(help="A local .txt/.text/.md/.jsonl file or a folder of them.")],
    vocab_size: Annotated[int, typer.Option("--vocab-size", help="Tokens in the vocabulary, specials included.")],
    output: Annotated[Path, typer.Option(
        "--output", "-o", help="The tokenizer folder to write (a plan's data.tokenizer); must be empty "
                               "unless --force.")],
    holdout: Annotated[float, typer.Option(
        "--holdout", help="The last share of the corpus kept out of training and measured on.")] = 0.05,
    min_frequency: Annotated[int, typer.Option(
        "--min-frequency", help="A pair seen fewer times is never merged.")] = 2,
    force: Annotated[bool, typer.Option(
        "--force", help="Write into a non-empty folder, replacing the tokenizer files there.")] = False,
    json_out: JsonOpt = False,
) -> None:
    """Train a byte-level BPE tokenizer on your files; compare it with muse's byte tokenizer.

    Any text round-trips exactly (bytes are in the vocabulary, nothing is
    normalized). The last --holdout of the corpus (by characters, as the
    run's validation is its last tokens) is not trained on; bytes/token and
    tokens/char are measured there. The folder holds tokenizer.json with
    <|bos|>, <|eos|> and <|pad|>, and loads as a plan's data.tokenizer and
    with transformers' AutoTokenizer."""
    from engines.data.train_tokenizer import train_tokenizer

    with _user_errors():
        with _Bar() as bar:
            result = train_tokenizer(corpus, vocab_size, output, holdout=holdout, min_frequency=min_frequency,
                                     force=force, progress=bar)
    if json_out:
        print_json(result.to_dict())
        return
    _render_trained(result)


def _render_trained(r: Any) -> None:
    console.print(f"trained a byte-level BPE of {r.vocab_size:,} tokens on {escape(r.source)} ({r.files:,} "
                  f"file{'s' if r.files != 1 else ''}, {r.documents:,} documents, {r.characters:,} characters)",
                  highlight=False, soft_wrap=True)
    if r.vocab_size < r.requested_vocab_size:
        console.print(f"note: the corpus holds merges for {r.vocab_size:,} tokens only, not the "
                      f"{r.requested_vocab_size:,} asked for (pairs seen fewer than --min-frequency times are "
                      "not merged)", highlight=False, soft_wrap=True)
    console.print(f"measured on the held-out last {r.holdout:g} of the corpus ({r.heldout_characters:,} characters, "
                  "not trained on):", highlight=False, soft_wrap=True)
    table = Table(show_header=True, header_style="bold", box=None, padding=(0, 2))
    for column, justify in (("tokenizer", "left"), ("tokens", "right"), ("bytes/token", "right"),
                            ("tokens/char", "right")):
        table.add_column(column, justify=justify)
    table.add_row("byte (muse)", f"{r.heldout_bytes:,}", "1.00", f"{r.byte_tokens_per_char:.3f}")
    table.add_row("trained", f"{r.heldout_tokens:,}", f"{r.bytes_per_token:.2f}", f"{r.tokens_per_char:.3f}")
    console.print(table)
    console.print(f"wrote {escape(r.directory)}", highlight=False, soft_wrap=True)
    console.print(f"use it in a plan:  data.tokenizer: {escape(r.directory)}  and  model.vocab_size: "
                  f"{r.vocab_size} (or more)", highlight=False, soft_wrap=True)
