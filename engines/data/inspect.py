"""What a data source holds, counted as the executor reads it: ``muse data inspect`` and the planner.

Design decisions:
- One function, ``inspect_source``, for the CLI and for code that sizes a
  plan (the optimizer: how many tokens does ``data.source`` hold under
  ``data.tokenizer``?). It returns a frozen ``SourceReport``; nothing is
  printed or written here (not even the executor's token cache).
- The numbers are the executor's, not a re-implementation of them: files,
  documents and EOS placement come from ``engines.data.documents`` (the
  reader ``engines.data.corpus`` uses), and the train/validation split from
  its ``split_sizes`` (validation is the last ``val_fraction`` of tokens).
  ``tokens`` counts the stream a run trains on: the text's tokens plus one
  EOS per document; ``tokens_per_char`` leaves the EOS out.
- Exact when cheap, estimated when not. Up to ``exact_bytes`` on disk
  (16 MiB by default) every file is read and tokenized. Above, a sample is:
  ``SAMPLE_WINDOWS`` windows of whole lines at evenly spaced offsets
  through the concatenated files (so one huge file and many small ones are
  both sampled through and through, not just at their head), about
  ``SAMPLE_BYTES`` in all. Ratios per byte on disk (characters, text
  bytes, tokens, and for .jsonl documents, JSON overhead included) are
  measured per format and scaled by the exact file sizes; plain files are
  one document each, so their document count stays exact. The report says
  ``estimated``, and bad lines outside the windows surface only when a run
  reads the whole corpus. ``exact_bytes=0`` is the planner's fast path.
- ``arithmetic`` is generated: its streams are built exactly as the
  executor builds them (``build_corpus``, which imports torch, only for
  this source), sized by ``min_tokens``; its validation is the held-out
  split of unseen problems, not the last fraction.
- Samples: the first characters of the first few documents, encoded and
  decoded by the tokenizer, so the user sees what the model will see (a
  tokenizer that loses characters shows it here).
"""

from __future__ import annotations

import bisect
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

from engines.data.documents import (
    encoded_parts,
    format_bytes,
    is_plain,
    jsonl_text,
    numbered_documents,
    source_files,
    split_sizes,
    utf8_error,
)
from engines.data.tokenizer import Tokenizer, load_tokenizer

EXACT_BYTES = 16 << 20  # a BPE tokenizes ~1-2 MB/s a core in chunks of one big file: seconds, not minutes
SAMPLE_BYTES = 4 << 20
SAMPLE_WINDOWS = 64
SAMPLE_CHARS = 200


@dataclass(frozen=True)
class Sample:
    where: str  # "notes.jsonl:3", or a plain file's name
    text: str  # the document's first SAMPLE_CHARS characters, encoded and decoded by the tokenizer
    tokens: int  # their token count


@dataclass(frozen=True)
class SourceReport:
    source: str
    tokenizer: str
    vocab_size: int
    val_fraction: float
    files: int
    file_bytes: int  # on disk
    documents: int
    characters: int
    text_bytes: int  # UTF-8 bytes of the documents' text
    text_tokens: int
    tokens: int  # the stream a run trains on: text tokens + one EOS per document
    train_tokens: int | None  # None where the executor would refuse to split (see notes)
    val_tokens: int | None
    estimated: bool
    sampled_bytes: int  # bytes on disk read to count (file_bytes when exact)
    samples: tuple[Sample, ...] = ()
    notes: tuple[str, ...] = field(default=())

    @property
    def tokens_per_char(self) -> float:
        return self.text_tokens / max(self.characters, 1)

    @property
    def bytes_per_token(self) -> float:
        return self.text_bytes / max(self.text_tokens, 1)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "tokens_per_char": round(self.tokens_per_char, 4),
                "bytes_per_token": round(self.bytes_per_token, 4)}


@dataclass
class _Counts:
    raw: int = 0  # bytes on disk these counts come from
    documents: int = 0
    characters: int = 0
    text_bytes: int = 0
    text_tokens: int = 0

    def add_text(self, text: str, tokens: int) -> None:
        self.characters += len(text)
        self.text_bytes += len(text.encode("utf-8"))
        self.text_tokens += tokens

    def scaled(self, raw: int) -> _Counts:
        """These counts extrapolated from ``self.raw`` bytes on disk to ``raw``."""
        k = raw / self.raw if self.raw else 0.0
        return _Counts(raw, round(self.documents * k), round(self.characters * k), round(self.text_bytes * k),
                       round(self.text_tokens * k))


def inspect_source(source: str, tokenizer: str | Tokenizer = "byte", *, val_fraction: float = 0.05, seed: int = 0,
                   min_tokens: int = 0, sample_docs: int = 3, exact_bytes: int = EXACT_BYTES,
                   sample_bytes: int = SAMPLE_BYTES) -> SourceReport:
    """Files, documents, characters, bytes and tokens of ``source`` ('arithmetic' or a local file/folder)
    under ``tokenizer`` (a name for ``load_tokenizer`` or a tokenizer), and the executor's train/val split.

    Exact up to ``exact_bytes`` on disk, else estimated from about ``sample_bytes`` (see the module's
    docstring); ``min_tokens`` and ``seed`` size and seed 'arithmetic' as a stage would."""
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be between 0 and 1 (exclusive), got {val_fraction}")
    tok = load_tokenizer(tokenizer) if isinstance(tokenizer, str) else tokenizer
    if source == "arithmetic":
        return _arithmetic(tok, val_fraction, seed, min_tokens, sample_docs)
    files = source_files(source)
    sizes = [p.stat().st_size for p in files]
    root = Path(source).expanduser().resolve()
    samples = _samples(files, root, tok, sample_docs)
    if sum(sizes) <= max(exact_bytes, sample_bytes):  # reading a sample would cost as much as reading it all
        counts, estimated, notes = _exact(files, tok), False, []
    else:
        counts, estimated = _estimate(files, sizes, tok, sample_bytes), True
        notes = [f"estimated from {SAMPLE_WINDOWS} windows ({format_bytes(counts.raw)} of {format_bytes(sum(sizes))}); "
                 "a bad line outside them shows when a run reads the whole corpus"]
    tokens = counts.text_tokens + counts.documents
    try:
        train, val = split_sizes(tokens, val_fraction, source)
    except ValueError as exc:
        train = val = None
        notes.append(str(exc))
    return SourceReport(
        source=source, tokenizer=tok.name, vocab_size=tok.vocab_size, val_fraction=val_fraction, files=len(files),
        file_bytes=sum(sizes), documents=counts.documents, characters=counts.characters,
        text_bytes=counts.text_bytes, text_tokens=counts.text_tokens, tokens=tokens, train_tokens=train,
        val_tokens=val, estimated=estimated, sampled_bytes=counts.raw if estimated else sum(sizes),
        samples=tuple(samples), notes=tuple(notes))


def _where(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix() if root.is_dir() else path.name
    except ValueError:
        return path.name


def _sample(where: str, text: str, tok: Tokenizer) -> Sample:
    ids = tok.encode(text[:SAMPLE_CHARS])
    return Sample(where, tok.decode(ids), len(ids))


def _samples(files: list[Path], root: Path, tok: Tokenizer, wanted: int) -> list[Sample]:
    """Openings of ``wanted`` documents: the first of files spread through the list (first, middle, last),
    then more from .jsonl files where there are fewer files than samples. Reads only what it shows."""
    if wanted < 1:
        return []
    picks = sorted({round(i * (len(files) - 1) / max(wanted - 1, 1)) for i in range(wanted)})
    samples: list[Sample] = []
    for n, index in enumerate(picks):
        path = files[index]
        share = -(-(wanted - len(samples)) // (len(picks) - n))  # what is left, spread over the picks left
        for lineno, text in numbered_documents(path):
            if share == 0 or (is_plain(path) and not text):
                break
            samples.append(_sample(_where(path, root) + ("" if is_plain(path) else f":{lineno}"), text, tok))
            share -= 1
            if is_plain(path):
                break
    return samples


def _exact(files: list[Path], tok: Tokenizer) -> _Counts:
    counts = _Counts()

    def counted(path: Path) -> Iterator[str]:
        seen = False
        for _, text in numbered_documents(path):
            counts.add_text(text, 0)
            if not is_plain(path) or (text and not seen):
                counts.documents += 1
                seen = True
            yield text

    for path in files:
        counts.raw += path.stat().st_size
        for part in encoded_parts(path, tok, counted(path)):
            counts.text_tokens += len(part)
    counts.text_tokens -= counts.documents  # encoded_parts placed one EOS per document
    return counts


def _line_number(path: Path, offset: int) -> int:
    """The 1-based line at byte ``offset`` of ``path`` (for an error message only)."""
    newlines = 0
    with path.open("rb") as handle:
        while offset > 0:
            block = handle.read(min(offset, 16 << 20))
            if not block:
                break
            newlines += block.count(b"\n")
            offset -= len(block)
    return newlines + 1


def _window(path: Path, offset: int, size: int) -> tuple[int, bytes]:
    """Whole lines from byte ``offset`` (the next line start) for about ``size`` bytes: (start, bytes)."""
    with path.open("rb") as handle:
        handle.seek(offset)
        if offset:
            handle.readline()  # the rest of a line the offset fell into
        start = handle.tell()
        return start, handle.read(size) + handle.readline()


def _count_window(path: Path, start: int, data: bytes, tok: Tokenizer, counts: _Counts) -> None:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError(utf8_error(path)) from None
    counts.raw += len(data)
    if is_plain(path):  # as text mode reads it: universal newlines
        text = text.replace("\r\n", "\n").replace("\r", "\n")
        counts.add_text(text, len(tok.encode(text)))
        return
    position = start
    for line in data.split(b"\n"):
        if line.strip():
            decoded = line.decode("utf-8")
            try:
                doc = jsonl_text(decoded, path, 0)
            except ValueError:
                jsonl_text(decoded, path, _line_number(path, position))  # raises again, naming the line
                raise
            counts.documents += 1
            counts.add_text(doc, len(tok.encode(doc)))
        position += len(line) + 1


def _estimate(files: list[Path], sizes: list[int], tok: Tokenizer, sample_bytes: int) -> _Counts:
    """Counts scaled from SAMPLE_WINDOWS windows at evenly spaced offsets through the concatenated files."""
    total = sum(sizes)
    ends = [sum(sizes[: i + 1]) for i in range(len(sizes))]
    per_window = max(sample_bytes // SAMPLE_WINDOWS, 1024)
    sampled = {True: _Counts(), False: _Counts()}  # by is_plain: JSON overhead makes .jsonl's ratios its own
    picks = [bisect.bisect_right(ends, total * (i + 0.5) / SAMPLE_WINDOWS) for i in range(SAMPLE_WINDOWS)]
    for i, index in enumerate(picks):
        index = min(index, len(files) - 1)
        offset = int(total * (i + 0.5) / SAMPLE_WINDOWS) - (ends[index] - sizes[index])
        start, data = _window(files[index], max(offset, 0), per_window)
        _count_window(files[index], start, data, tok, sampled[is_plain(files[index])])
    result = _Counts()
    for plain in (True, False):
        format_files = [(p, s) for p, s in zip(files, sizes) if is_plain(p) == plain]
        raw = sum(s for _, s in format_files)
        if raw == 0:
            continue
        if sampled[plain].raw == 0:  # a format too small for any window: the start of its largest file
            path = max(format_files, key=lambda f: f[1])[0]
            _count_window(path, 0, _window(path, 0, per_window)[1], tok, sampled[plain])
        scaled = sampled[plain].scaled(raw)
        if plain:  # one document per non-empty file: exact
            scaled.documents = sum(1 for _, s in format_files if s > 0)
        result.raw += sampled[plain].raw
        for name in ("documents", "characters", "text_bytes", "text_tokens"):
            setattr(result, name, getattr(result, name) + getattr(scaled, name))
    return result


def _arithmetic(tok: Tokenizer, val_fraction: float, seed: int, min_tokens: int, wanted: int) -> SourceReport:
    import numpy as np

    from engines.data.corpus import MIN_ARITHMETIC_TOKENS, build_corpus

    corpus = build_corpus("arithmetic", tok, seed=seed, val_fraction=val_fraction,
                          cache_dir=Path(tempfile.gettempdir()), min_tokens=min_tokens)
    counts, samples = _Counts(), []
    for stream in (corpus.train.tokens, corpus.val.tokens):
        ids = np.asarray(stream)
        cuts = np.flatnonzero(ids == tok.eos_id)
        for begin, end in zip(np.concatenate([[0], cuts[:-1] + 1]), cuts):
            text = tok.decode(ids[begin:end].tolist())
            counts.documents += 1
            counts.add_text(text, int(end - begin))
            if len(samples) < wanted:
                samples.append(_sample(f"problem {len(samples) + 1}", text, tok))
    n_train, n_val = len(corpus.train), len(corpus.val)
    note = (f"generated (seed {seed}): the train stream grows to the stages' token budget (at least "
            f"{max(min_tokens, MIN_ARITHMETIC_TOKENS):,} tokens); validation is a held-out split of unseen problems")
    return SourceReport(
        source="arithmetic", tokenizer=tok.name, vocab_size=tok.vocab_size, val_fraction=val_fraction, files=0,
        file_bytes=0, documents=counts.documents, characters=counts.characters, text_bytes=counts.text_bytes,
        text_tokens=counts.text_tokens, tokens=n_train + n_val, train_tokens=n_train, val_tokens=n_val,
        estimated=False, sampled_bytes=0, samples=tuple(samples), notes=(note,))


