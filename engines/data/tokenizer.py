"""Tokenizers for the decoder LM: bytes, or a local Hugging Face tokenizer.

Design decisions:
- One small ``Tokenizer`` protocol (``encode``/``encode_batch``/``decode``,
  ``vocab_size``, ``eos_id``, ``bos_id``, ``pad_id``, ``name``,
  ``fingerprint``) is all the corpus and the engines see, so the byte
  tokenizer and a Hugging Face one are interchangeable.
- ``ByteTokenizer``: UTF-8 bytes 0..255 are their own ids and four specials
  follow (BOS 256, EOS 257, PAD 258, SEP 259), vocab 260. It needs nothing
  on disk, never meets an unknown character, and matches the quickstart plan.
- ``encode`` never adds specials: the corpus decides where EOS goes (between
  documents) and an RL prompt decides about BOS. ``decode`` skips specials.
- ``HFTokenizer`` reads a local directory only (no hub, no network). The fast
  path is ``<dir>/tokenizer.json`` through the ``tokenizers`` library, so
  ``transformers`` is not needed; without that file it falls back to
  ``transformers.AutoTokenizer(local_files_only=True)`` when installed.
  The ``tokenizers`` library knows no "EOS", so the EOS token comes from
  ``tokenizer_config.json`` / ``special_tokens_map.json`` and then from a few
  conventional names; a tokenizer with none is refused, because the corpus
  needs one to separate documents.
- ``fingerprint`` names the exact vocabulary (a hash of tokenizer.json), so a
  pre-tokenized corpus cache is never reused with a different tokenizer.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Protocol, Sequence

from engines.options import read_from

_EOS_NAMES = ("</s>", "<|endoftext|>", "<|end_of_text|>", "<eos>", "[EOS]", "<|eos|>")
_BOS_NAMES = ("<s>", "<|begin_of_text|>", "<bos>", "[BOS]", "<|bos|>")
_PAD_NAMES = ("<pad>", "[PAD]", "<|pad|>")


class Tokenizer(Protocol):
    name: str
    fingerprint: str
    vocab_size: int
    eos_id: int
    bos_id: int | None
    pad_id: int | None

    def encode(self, text: str) -> list[int]: ...

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes as tokens 0..255, then BOS, EOS, PAD, SEP."""

    name = "byte"
    fingerprint = "byte-260"
    bos_id: int | None = 256
    eos_id = 257
    pad_id: int | None = 258
    sep_id = 259
    vocab_size = 260

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [list(t.encode("utf-8")) for t in texts]

    def decode(self, ids: Sequence[int]) -> str:
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"token id {bad[0]} is outside the byte tokenizer's range 0..{self.vocab_size - 1}")
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


def _special_from_configs(directory: Path, key: str) -> str | None:
    """The content of special token ``key`` (e.g. 'eos_token') in the dir's config files."""
    for filename in ("tokenizer_config.json", "special_tokens_map.json"):
        path = directory / filename
        if not path.is_file():
            continue
        try:
            value = json.loads(path.read_text(encoding="utf-8")).get(key)
        except (json.JSONDecodeError, AttributeError) as exc:
            raise ValueError(
                f"tokenizer directory '{directory}': {filename} is not a JSON object ({exc})"
            ) from None
        if isinstance(value, dict):
            value = value.get("content")
        if isinstance(value, str):
            return value
    return None


class HFTokenizer:
    """A Hugging Face tokenizer read from a local directory."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory).expanduser().resolve()
        self.name = str(self.directory)
        tokenizer_json = self.directory / "tokenizer.json"
        if tokenizer_json.is_file():
            self._init_fast(tokenizer_json)
        else:
            self._init_transformers()

    def _init_fast(self, tokenizer_json: Path) -> None:
        try:
            from tokenizers import Tokenizer as RawTokenizer
        except ImportError:
            raise ValueError(
                f"tokenizer directory '{self.directory}' needs the 'tokenizers' package; pip install tokenizers"
            ) from None
        self._fast: Any = RawTokenizer.from_file(str(tokenizer_json))
        self._auto: Any = None
        self.fingerprint = "hf-" + hashlib.sha256(tokenizer_json.read_bytes()).hexdigest()[:32]
        # ids run to the highest one, which a vocabulary with holes puts past the count
        self.vocab_size = max(int(self._fast.get_vocab_size(with_added_tokens=True)),
                              1 + max(self._fast.get_vocab(with_added_tokens=True).values(), default=-1))
        eos = self._find_special("eos_token", _EOS_NAMES)
        if eos is None:
            raise ValueError(
                f"tokenizer directory '{self.directory}' has no EOS token: set 'eos_token' in its "
                f"tokenizer_config.json or include one of {', '.join(_EOS_NAMES)}"
            )
        self.eos_id = eos
        self.bos_id = self._find_special("bos_token", _BOS_NAMES)
        self.pad_id = self._find_special("pad_token", _PAD_NAMES)

    def _find_special(self, key: str, conventional: Sequence[str]) -> int | None:
        configured = _special_from_configs(self.directory, key)
        for token in ([configured] if configured is not None else []) + list(conventional):
            token_id = self._fast.token_to_id(token)
            if token_id is not None:
                return int(token_id)
        return None

    def _init_transformers(self) -> None:
        try:
            from transformers import AutoTokenizer
        except ImportError:
            raise ValueError(
                f"tokenizer directory '{self.directory}' has no tokenizer.json, and reading other formats "
                "needs the 'transformers' package"
            ) from None
        try:
            self._auto = AutoTokenizer.from_pretrained(str(self.directory), local_files_only=True)
        except (OSError, ValueError) as exc:
            raise ValueError(f"tokenizer directory '{self.directory}' could not be loaded: {exc}") from None
        self._fast = None
        files = sorted(p for p in self.directory.iterdir() if p.is_file())
        stamp = json.dumps([(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files])
        self.fingerprint = "hf-" + hashlib.sha256(stamp.encode()).hexdigest()[:32]
        self.vocab_size = max(len(self._auto), 1 + max(self._auto.get_vocab().values(), default=-1))
        if self._auto.eos_token_id is None:
            raise ValueError(f"tokenizer directory '{self.directory}' has no EOS token (eos_token is unset)")
        self.eos_id = int(self._auto.eos_token_id)
        self.bos_id = self._auto.bos_token_id
        self.pad_id = self._auto.pad_token_id

    def encode(self, text: str) -> list[int]:
        if self._fast is not None:
            return list(self._fast.encode(text, add_special_tokens=False).ids)
        return list(self._auto.encode(text, add_special_tokens=False))

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        if self._fast is not None:
            return [list(e.ids) for e in self._fast.encode_batch(list(texts), add_special_tokens=False)]
        return [self.encode(t) for t in texts]

    def decode(self, ids: Sequence[int]) -> str:
        ids = [int(i) for i in ids]
        if self._fast is not None:
            return str(self._fast.decode(ids, skip_special_tokens=True))
        return str(self._auto.decode(ids, skip_special_tokens=True))


def load_tokenizer(name: str) -> Tokenizer:
    """'byte' → ByteTokenizer; an existing local directory → HFTokenizer."""
    if name == "byte":
        return ByteTokenizer()
    if Path(name).expanduser().is_dir():
        return HFTokenizer(name)
    raise ValueError(f"tokenizer '{name}' is neither 'byte' nor a local tokenizer directory{read_from(name)}")
