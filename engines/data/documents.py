"""A local corpus as the executor reads it: its files, its documents, its tokens; no torch, no numpy.

Design decisions:
- One reader for everything that looks at a user's corpus: the executor's
  token cache (``engines.data.corpus``), ``muse data inspect`` and ``muse
  data tokenizer train``. A file the inspector accepts is a file the run
  accepts, and the counts it prints are the run's. Nothing here imports
  torch or numpy, so those commands start fast.
- Accepted: plain text (.txt/.text/.md), one document per file, and .jsonl,
  one document per line in a string "text" field (blank lines skipped). A
  folder is read recursively, its accepted files in path order; others are
  ignored.
- Plain text files are read in chunks cut at line ends, so a large file
  never sits in memory whole; a newline byte never falls inside a UTF-8
  character, so a cut never splits one.
- Text must be UTF-8. A file that isn't is refused with its line and the
  offending byte rather than trained on with replacement characters: a
  Latin-1 or Shift-JIS file read that way would silently teach the model
  U+FFFD. The line is found by rescanning the file in binary, on the error
  path only.
- ``encoded_parts`` places EOS as the corpus stores it (after every .jsonl
  document; once after a plain file's last chunk) and yields flat lists, so
  the caller picks the container (numpy arrays in the corpus cache, a
  count in the inspector).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

from engines.options import read_from

TEXT_SUFFIXES = (".txt", ".text", ".md")
JSONL_SUFFIXES = (".jsonl",)
ACCEPTED_SUFFIXES = TEXT_SUFFIXES + JSONL_SUFFIXES
ENCODE_BATCH = 512  # documents per tokenizer call
TEXT_CHUNK = 4 << 20  # characters per plain-text read


def is_plain(path: Path) -> bool:
    return path.suffix.lower() in TEXT_SUFFIXES


def source_files(source: str | Path) -> list[Path]:
    """The accepted files of a local file or folder, resolved and sorted by path."""
    path = Path(source).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"data source '{source}' does not exist{read_from(path)}; use 'arithmetic' or a "
                                "local file/folder")
    accepted = ", ".join(ACCEPTED_SUFFIXES)
    if path.is_file():
        if path.suffix.lower() not in ACCEPTED_SUFFIXES:
            raise ValueError(f"data file '{source}' has an unsupported type '{path.suffix}'; accepted: {accepted}")
        return [path.resolve()]
    everything = [p for p in path.rglob("*") if p.is_file()]
    files = sorted((p.resolve() for p in everything if p.suffix.lower() in ACCEPTED_SUFFIXES),
                   key=lambda p: p.as_posix())
    if not files:
        others = f" (it holds {len(everything)} other file{'s' if len(everything) != 1 else ''}, e.g. " \
                 f"'{everything[0].name}')" if everything else " (it is empty)"
        raise ValueError(f"data folder '{source}' holds no {accepted} files{others}")
    return files


def utf8_error(path: Path) -> str:
    """The one-line message for a file that is not UTF-8: its first bad line and byte."""
    with path.open("rb") as handle:
        for lineno, line in enumerate(handle, start=1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as exc:
                return (f"{path}:{lineno}: not UTF-8 text (byte 0x{line[exc.start]:02x} at column {exc.start + 1}); "
                        "save the file as UTF-8")
    return f"{path}: not UTF-8 text; save the file as UTF-8"


def jsonl_text(line: str, path: Path, lineno: int) -> str:
    """The "text" field of one .jsonl line, or a one-line error naming the file and line."""
    try:
        record: Any = json.loads(line)
    except json.JSONDecodeError:
        raise ValueError(
            f"{path}:{lineno}: not valid JSON; each line must be an object with a string 'text' field"
        ) from None
    if not isinstance(record, dict) or not isinstance(record.get("text"), str):
        raise ValueError(f"{path}:{lineno}: expected a JSON object with a string 'text' field")
    return record["text"]


def numbered_documents(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, text) of one file's documents; a plain file's one document arrives in line-cut chunks,
    each numbered by its first line."""
    try:
        if not is_plain(path):
            with path.open("r", encoding="utf-8") as handle:
                for lineno, line in enumerate(handle, start=1):
                    if line.strip():
                        yield lineno, jsonl_text(line, path, lineno)
            return
        with path.open("r", encoding="utf-8") as handle:
            lineno = 1
            while chunk := handle.read(TEXT_CHUNK):
                chunk += handle.readline()
                yield lineno, chunk
                lineno += chunk.count("\n")
    except UnicodeDecodeError:
        raise ValueError(utf8_error(path)) from None


def documents(path: Path) -> Iterator[str]:
    """Documents of one file; a plain-text file's one document arrives in line-cut chunks."""
    for _, text in numbered_documents(path):
        yield text


def _flat(encoded: Sequence[Sequence[int]], eos: int | None) -> list[int]:
    flat: list[int] = []
    for ids in encoded:
        flat.extend(ids)
        if eos is not None:
            flat.append(eos)
    return flat


def encoded_parts(path: Path, tokenizer: Any, texts: Iterable[str] | None = None) -> Iterator[list[int]]:
    """Token ids of one file as the corpus stores them, EOS after each document, in batches.

    ``texts``: the file's documents already read (e.g. through a counter); by default they are read here.
    """
    plain = is_plain(path)
    eos = None if plain else tokenizer.eos_id
    batch: list[str] = []
    seen_text = False
    for text in documents(path) if texts is None else texts:
        batch.append(text)
        seen_text = seen_text or bool(text)
        if len(batch) == ENCODE_BATCH:
            yield _flat(tokenizer.encode_batch(batch), eos)
            batch = []
    if batch:
        yield _flat(tokenizer.encode_batch(batch), eos)
    if plain and seen_text:
        yield [tokenizer.eos_id]


def split_sizes(total: int, val_fraction: float, source: str) -> tuple[int, int]:
    """(train, val) token counts of a local corpus: validation is the last ``val_fraction`` of the tokens."""
    if total == 0:
        raise ValueError(f"data source '{source}' holds no text (0 tokens)")
    n_val = max(1, round(total * val_fraction))
    if n_val >= total - 1:
        raise ValueError(f"data source '{source}' has only {total} tokens: too few to split off validation")
    return total - n_val, n_val


def format_bytes(n: int) -> str:
    """A size for people: ``812 B``, ``40.2 KB``, ``1.3 GB`` (powers of 1024)."""
    size = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{n} B" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GB"
