"""Train a byte-level BPE tokenizer on a local corpus: ``muse data tokenizer train``.

Design decisions:
- Byte-level BPE (GPT-2's scheme, through the ``tokenizers`` library): the
  256 byte symbols are always in the vocabulary, so any text — Japanese,
  emoji, a language the corpus never showed — encodes with no unknown
  token and decodes back exactly. No normalizer runs (NFKC would change the
  text), and no prefix space is added, so decode(encode(t)) == t.
- The corpus is read by ``engines.data.documents``, the executor's reader:
  the same files, formats and errors as a run, streamed into
  ``train_from_iterator`` so a corpus larger than memory trains in bounded
  memory (the trainer keeps word counts, not the text). The text goes in
  pieces of at most 64K characters cut at line ends: the trainer buffers
  256 items at a time, and a plain file's 4M-character chunks would make
  that buffer a gigabyte (a cut at a line end never splits a word).
- Two passes. The first counts the characters (and checks every file: a bad
  line fails in seconds, before training and before anything is written);
  the second trains on all but the last ``holdout`` share of the characters,
  which it keeps aside (up to ``MEASURE_CHARS``) to measure the new
  tokenizer against muse's byte tokenizer. The held-out share is the tail
  because the executor's validation split is the tail too: with the default
  5% (``data.val_fraction``'s default) the tokenizer has not seen the text the
  model is validated on (but for a few characters at the edge: the split is
  by characters here, by tokens there), so validation loss is not flattered.
- The specials are muse's names (``<|bos|>``, ``<|eos|>``, ``<|pad|>``, as
  ``muse export`` writes for the byte tokenizer) at ids 0-2, named again in
  ``tokenizer_config.json``, so ``HFTokenizer`` finds EOS/BOS/PAD and
  transformers' ``AutoTokenizer`` loads the folder as it is. As in any
  Hugging Face tokenizer, a literal ``<|eos|>`` in the text encodes as EOS.
- The folder is written to a temporary sibling, read back with
  ``HFTokenizer`` and checked to round-trip the held-out text, then moved
  into place: a failed run leaves no half-written tokenizer. A non-empty
  folder is refused unless ``force``, which replaces the tokenizer files
  there (stale ones, e.g. a ``merges.txt``, would confuse other loaders).
- ``muse-tokenizer.json`` in the folder records how it was trained and the
  held-out numbers; no loader reads it.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator

from engines.data.documents import documents, is_plain, source_files

SPECIALS = {"bos": "<|bos|>", "eos": "<|eos|>", "pad": "<|pad|>"}
MIN_VOCAB = 256 + len(SPECIALS)
MAX_VOCAB = 262_144  # the largest vocabularies in use (Gemma 3); beyond, an embedding table dwarfs a small model
MEASURE_CHARS = 8_000_000  # held-out characters kept to measure on; the rest of the held-out share is only skipped
REPORT_FILE = "muse-tokenizer.json"
# the trainer buffers 256 items of its iterator: a plain file's 4M-character chunks would hold ~1 GB there
PIECE_CHARS = 1 << 16
_REPORT_EVERY = 1 << 20  # progress is reported every MiB (or million characters), not every document
_WRITTEN = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", REPORT_FILE)
_STALE = ("vocab.json", "merges.txt", "vocab.txt", "tokenizer.model", "added_tokens.json", "spiece.model")

# (phase, done, total): "reading" counts UTF-8 bytes of text, "training" characters, "merging" has no total
Progress = Callable[[str, int, "int | None"], None]


@dataclass(frozen=True)
class TrainedTokenizer:
    directory: str
    vocab_size: int  # what the model's vocab_size must hold (can be below the request on a small corpus)
    requested_vocab_size: int
    source: str
    files: int
    documents: int
    characters: int  # the whole corpus
    trained_characters: int
    holdout: float
    heldout_characters: int  # measured (at most MEASURE_CHARS of the held-out share)
    heldout_bytes: int  # UTF-8 bytes: the byte tokenizer's token count
    heldout_tokens: int  # the trained tokenizer's

    @property
    def bytes_per_token(self) -> float:
        return self.heldout_bytes / max(self.heldout_tokens, 1)

    @property
    def tokens_per_char(self) -> float:
        return self.heldout_tokens / max(self.heldout_characters, 1)

    @property
    def byte_tokens_per_char(self) -> float:
        return self.heldout_bytes / max(self.heldout_characters, 1)

    def to_dict(self) -> dict:
        return {**asdict(self), "bytes_per_token": round(self.bytes_per_token, 4),
                "tokens_per_char": round(self.tokens_per_char, 4),
                "byte_tokens_per_char": round(self.byte_tokens_per_char, 4), "byte_bytes_per_token": 1.0}


def check_vocab_size(vocab_size: int) -> None:
    if not MIN_VOCAB <= vocab_size <= MAX_VOCAB:
        raise ValueError(f"vocab size {vocab_size} is out of range: a byte-level BPE holds the 256 bytes and "
                         f"{len(SPECIALS)} specials, so {MIN_VOCAB} to {MAX_VOCAB:,}")


def check_output(out_dir: Path, force: bool, replaced: str | None = "the tokenizer files") -> Path:
    """The output folder; FileExistsError (one line) when it is a file, or a non-empty folder
    without ``force`` (which would replace ``replaced`` in it; None: the command has no --force).
    ``muse export`` and ``muse runs export`` check their folders with this too."""
    out_dir = Path(out_dir).expanduser()
    if out_dir.exists() and not out_dir.is_dir():
        raise FileExistsError(f"output '{out_dir}' exists and is not a folder")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not force:
        instead = f", or pass --force to replace {replaced} in it" if replaced else " or an empty one"
        raise FileExistsError(f"output folder '{out_dir}' is not empty; name a new folder{instead}")
    return out_dir


def _count(files: list[Path], progress: Progress | None) -> tuple[int, int]:
    """(documents, characters) of the corpus, reading every file once (a bad line fails here, early)."""
    total_bytes = sum(p.stat().st_size for p in files)
    if progress:
        progress("reading", 0, total_bytes)
    docs = chars = nbytes = reported = 0
    for path in files:
        plain_seen = False
        for text in documents(path):
            if not is_plain(path):
                docs += 1
            elif text and not plain_seen:
                docs, plain_seen = docs + 1, True
            chars += len(text)
            nbytes += len(text.encode("utf-8"))
            if progress and nbytes - reported >= _REPORT_EVERY:
                progress("reading", min(nbytes, total_bytes), total_bytes)
                reported = nbytes
    if progress:
        progress("reading", total_bytes, total_bytes)
    return docs, chars


def _pieces(text: str) -> Iterator[str]:
    """``text`` in pieces of at most PIECE_CHARS, cut after a newline where there is one."""
    start = 0
    while len(text) - start > PIECE_CHARS:
        end = text.rfind("\n", start, start + PIECE_CHARS) + 1 or start + PIECE_CHARS
        yield text[start:end]
        start = end
    if start < len(text):
        yield text[start:]


def _split(files: list[Path], cut: int, heldout: list[str], progress: Progress | None,
           total: int) -> Iterator[str]:
    """The text before character ``cut``, piece by piece; the text after it (up to MEASURE_CHARS) into
    ``heldout``. A piece that straddles the cut is split there."""
    position = kept = reported = 0
    for path in files:
        for text in documents(path):
            start, position = position, position + len(text)
            if start < cut:
                yield from _pieces(text[: cut - start])
                if progress and position - reported >= _REPORT_EVERY:
                    progress("training", min(position, cut), total)
                    reported = position
                text = text[cut - start:]
            if text and kept < MEASURE_CHARS:
                heldout.append(text[: MEASURE_CHARS - kept])
                kept += len(heldout[-1])
    if progress:  # the trainer now learns its merges from the counts it gathered
        progress("merging", 0, None)


def _new_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _write_tokenizer(tmp: Path, raw) -> None:
    raw.save(str(tmp / "tokenizer.json"))
    named = {f"{k}_token": v for k, v in SPECIALS.items()}
    _write_json(tmp / "tokenizer_config.json", {
        "tokenizer_class": "PreTrainedTokenizerFast", **named, "add_bos_token": False, "add_eos_token": False,
        "clean_up_tokenization_spaces": False})
    _write_json(tmp / "special_tokens_map.json", named)


def _verify(tmp: Path, heldout: list[str]) -> int:
    """Read the folder back as muse will; the held-out token count. A text that doesn't round-trip is a bug."""
    from engines.data.tokenizer import HFTokenizer

    loaded = HFTokenizer(tmp)
    if (loaded.eos_id, loaded.bos_id, loaded.pad_id) != (1, 0, 2):
        raise RuntimeError(f"trained tokenizer's specials are {loaded.eos_id, loaded.bos_id, loaded.pad_id}, "
                           "not EOS 1, BOS 0, PAD 2")
    encoded = loaded.encode_batch(heldout)
    for text, ids in zip(heldout[:64], encoded):
        # a literal '<|eos|>' in the text encodes as the special (as in any Hugging Face tokenizer): not a bug
        if loaded.decode(ids) != text and not any(name in text for name in SPECIALS.values()):
            raise RuntimeError("trained tokenizer does not round-trip its held-out text")
    return sum(len(ids) for ids in encoded)


def _move_into_place(tmp: Path, out_dir: Path) -> None:
    if not out_dir.exists():
        os.replace(tmp, out_dir)
        return
    for name in _WRITTEN + _STALE:
        (out_dir / name).unlink(missing_ok=True)
    for new in tmp.iterdir():
        os.replace(new, out_dir / new.name)
    tmp.rmdir()


def train_tokenizer(source: str, vocab_size: int, out_dir: str | Path, *, holdout: float = 0.05,
                    min_frequency: int = 2, force: bool = False,
                    progress: Progress | None = None) -> TrainedTokenizer:
    """Train a byte-level BPE of ``vocab_size`` tokens on a local file/folder; write it to ``out_dir``."""
    check_vocab_size(vocab_size)
    if not 0 < holdout <= 0.5:
        raise ValueError(f"holdout must be above 0 and at most 0.5, got {holdout}")
    if min_frequency < 1:
        raise ValueError(f"min_frequency must be at least 1, got {min_frequency}")
    if source == "arithmetic":
        raise ValueError("data source 'arithmetic' is generated text, not a corpus to train a tokenizer on; "
                         "name a local file or folder")
    out = check_output(Path(out_dir), force)
    files = source_files(source)
    docs, chars = _count(files, progress)
    if chars == 0:
        raise ValueError(f"data source '{source}' holds no text (0 characters)")
    cut = chars - max(1, round(chars * holdout))

    from tokenizers import trainers
    from tokenizers.pre_tokenizers import ByteLevel

    raw = _new_tokenizer()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                  special_tokens=[SPECIALS["bos"], SPECIALS["eos"], SPECIALS["pad"]],
                                  initial_alphabet=ByteLevel.alphabet(), show_progress=False)
    heldout: list[str] = []
    raw.train_from_iterator(_split(files, cut, heldout, progress, cut), trainer)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tokenizer-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()  # not mkdtemp: its 0700 would become the tokenizer folder's mode
    try:
        _write_tokenizer(tmp, raw)
        report = TrainedTokenizer(
            directory=str(out), vocab_size=raw.get_vocab_size(with_added_tokens=True),
            requested_vocab_size=vocab_size, source=source, files=len(files), documents=docs, characters=chars,
            trained_characters=cut, holdout=holdout, heldout_characters=sum(len(t) for t in heldout),
            heldout_bytes=sum(len(t.encode("utf-8")) for t in heldout), heldout_tokens=_verify(tmp, heldout))
        _write_json(tmp / REPORT_FILE, report.to_dict())
        _move_into_place(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return report
