"""Token streams for the decoder LM: build once, sample batches resumably.

Design decisions:
- A corpus is two flat token streams (train, val) with EOS after every
  document; a model sees documents packed back to back, as in GPT-2/nanoGPT.
- ``source == "arithmetic"`` is generated in memory (fast and deterministic
  for a seed, so nothing is cached). Train comes from the train split, val
  from the held-out test split of ``engines.data.arithmetic``, so validation
  loss measures generalisation to unseen problems.
- A local file or folder is tokenized once into ``cache_dir`` as a raw
  token file named by a hash of (resolved paths, sizes, mtimes, tokenizer
  fingerprint, vocab), written under a temporary name and renamed, its meta
  JSON (count, dtype) written last as the commit marker; later builds
  memory-map it, so a corpus larger than RAM costs nothing to reopen.
  Validation is the last ``val_fraction`` of the tokens.
- Plain text files (.txt/.text/.md) are one document each, read in chunks
  cut at line ends so a large file never sits in memory whole; .jsonl holds
  one document per line in a string "text" field. The reading (and where
  EOS goes, and the train/val split sizes) lives in ``engines.data.documents``,
  shared with ``muse data inspect`` and the tokenizer trainer, so what they
  count is what a run reads. Text must be UTF-8 (a file that isn't is
  refused naming its line, not read with replacement characters).
- Tokens are stored as uint16 when the vocabulary fits (ids <= 65534), else
  uint32: half the disk and page cache for most tokenizers.
- Sampling (``BatchSampler``, ``eval_batches``, ``unigram_loss``) lives in
  ``engines.data.stream`` and is re-exported here.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np

from engines.data import arithmetic
from engines.data.documents import encoded_parts, source_files, split_sizes
from engines.data.stream import BatchSampler, TokenStream, eval_batches, unigram_loss
from engines.data.tokenizer import Tokenizer

__all__ = ["Corpus", "TokenStream", "BatchSampler", "build_corpus", "eval_batches", "pretokenize",
           "token_dtype", "unigram_loss"]

DEFAULT_TASKS = ("multiplication", "add_sub", "word_problem")
MIN_ARITHMETIC_TOKENS = 200_000
MIN_VAL_TOKENS = 65_536  # a few dozen evaluation batches at quickstart sizes
_CACHE_VERSION = 1
_ARITHMETIC_CHUNK = 64  # generated documents per call: small, so a stream overshoots its target little


@dataclass(frozen=True)
class Corpus:
    train: TokenStream
    val: TokenStream
    vocab_size: int
    description: str


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 65535 else np.dtype(np.uint32)


def _pack(docs: Iterable[list[int]], eos: int, dtype: np.dtype) -> np.ndarray:
    flat: list[int] = []
    for ids in docs:
        flat.extend(ids)
        flat.append(eos)
    return np.array(flat, dtype=dtype)


def build_corpus(
    source: str,
    tokenizer: Tokenizer,
    *,
    seed: int,
    val_fraction: float,
    cache_dir: Path,
    min_tokens: int = 0,
    tasks: Sequence[str] = DEFAULT_TASKS,
) -> Corpus:
    """Train and val token streams from 'arithmetic' or a local file/folder.

    ``min_tokens`` sizes generated data only; a local corpus is what it is
    (the sampler wraps into further epochs).
    """
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be between 0 and 1 (exclusive), got {val_fraction}")
    if source == "arithmetic":
        return _arithmetic_corpus(tokenizer, seed, val_fraction, min_tokens, tasks)
    return _local_corpus(source, tokenizer, val_fraction, Path(cache_dir))


def _arithmetic_tokens(
    tokenizer: Tokenizer, tasks: Sequence[str], seed: int, split: arithmetic.Split, target: int
) -> tuple[np.ndarray, int]:
    problems = arithmetic.iter_problems(tasks, seed, split)
    dtype = token_dtype(tokenizer.vocab_size)
    parts, total, docs = [], 0, 0
    while total < target:
        texts = [arithmetic.as_text(next(problems)) for _ in range(_ARITHMETIC_CHUNK)]
        part = _pack(tokenizer.encode_batch(texts), tokenizer.eos_id, dtype)
        parts.append(part)
        total += len(part)
        docs += len(texts)
    return np.concatenate(parts), docs


def _arithmetic_corpus(
    tokenizer: Tokenizer, seed: int, val_fraction: float, min_tokens: int, tasks: Sequence[str]
) -> Corpus:
    train, train_docs = _arithmetic_tokens(tokenizer, tasks, seed, "train", max(min_tokens, MIN_ARITHMETIC_TOKENS))
    val_target = max(math.ceil(len(train) * val_fraction / (1 - val_fraction)), MIN_VAL_TOKENS)
    val, val_docs = _arithmetic_tokens(tokenizer, tasks, seed, "test", val_target)
    description = (
        f"arithmetic ({', '.join(tasks)}), seed {seed}: {len(train):,} train tokens in {train_docs:,} problems, "
        f"{len(val):,} val tokens in {val_docs:,} held-out problems, tokenizer {tokenizer.name}"
    )
    return Corpus(TokenStream(train), TokenStream(val), tokenizer.vocab_size, description)


def _encode_file(path: Path, tokenizer: Tokenizer, dtype: np.dtype) -> Iterator[np.ndarray]:
    """Token arrays for one file, EOS after each document (a text file is one document)."""
    for part in encoded_parts(path, tokenizer):
        yield np.array(part, dtype=dtype)


def _cache_key(files: list[Path], tokenizer: Tokenizer) -> str:
    stamp = [(p.as_posix(), p.stat().st_size, p.stat().st_mtime_ns) for p in files]
    blob = json.dumps([_CACHE_VERSION, stamp, tokenizer.fingerprint, tokenizer.vocab_size])
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def _read_cache(bin_path: Path, meta_path: Path) -> np.ndarray | None:
    if not (bin_path.is_file() and meta_path.is_file()):
        return None
    try:
        meta = json.loads(meta_path.read_text())
        count, dtype = int(meta["tokens"]), np.dtype(meta["dtype"])
    except (ValueError, KeyError, TypeError):
        return None
    if count < 1 or bin_path.stat().st_size != count * dtype.itemsize:
        return None
    return np.memmap(bin_path, dtype=dtype, mode="r", shape=(count,))


def pretokenize(files: list[Path], tokenizer: Tokenizer, cache_dir: Path) -> tuple[np.ndarray, Path]:
    """Tokenize ``files`` into ``cache_dir`` once; return the memory-mapped tokens and their path."""
    key = _cache_key(files, tokenizer)
    bin_path, meta_path = cache_dir / f"tokens-{key}.bin", cache_dir / f"tokens-{key}.json"
    cached = _read_cache(bin_path, meta_path)
    if cached is not None:
        return cached, bin_path
    cache_dir.mkdir(parents=True, exist_ok=True)
    dtype = token_dtype(tokenizer.vocab_size)
    tmp_bin = bin_path.with_name(f"{bin_path.name}.{os.getpid()}.tmp")
    count = 0
    try:
        with tmp_bin.open("wb") as out:
            for path in files:
                for part in _encode_file(path, tokenizer, dtype):
                    out.write(part.tobytes())
                    count += len(part)
        if count == 0:
            return np.zeros(0, dtype=dtype), bin_path  # nothing cached: an empty corpus is an error upstream
        os.replace(tmp_bin, bin_path)
    finally:
        tmp_bin.unlink(missing_ok=True)
    meta = {"tokens": count, "dtype": dtype.name, "tokenizer": tokenizer.name, "files": len(files)}
    tmp_meta = meta_path.with_name(f"{meta_path.name}.{os.getpid()}.tmp")
    tmp_meta.write_text(json.dumps(meta))
    os.replace(tmp_meta, meta_path)
    return np.memmap(bin_path, dtype=dtype, mode="r", shape=(count,)), bin_path


def _local_corpus(source: str, tokenizer: Tokenizer, val_fraction: float, cache_dir: Path) -> Corpus:
    files = source_files(source)
    tokens, _ = pretokenize(files, tokenizer, cache_dir)
    n_train, _ = split_sizes(len(tokens), val_fraction, source)
    train, val = tokens[:n_train], tokens[n_train:]
    description = (
        f"{source} ({len(files)} file{'s' if len(files) != 1 else ''}): {len(train):,} train / "
        f"{len(val):,} val tokens, tokenizer {tokenizer.name}"
    )
    return Corpus(TokenStream(train), TokenStream(val), tokenizer.vocab_size, description)
