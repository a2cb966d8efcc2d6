"""Text data for the decoder LM engine: tokenizers, generated arithmetic, token streams.

Design decisions:
- Nothing here touches the network, the CLI or the store: data is generated
  (``arithmetic``) or read from a local path, and bad input raises
  ``ValueError`` / ``FileNotFoundError`` with one line saying what is
  accepted, which the executor turns into a user error.
- ``tokenizer`` (bytes or a local Hugging Face directory), ``arithmetic``
  (verifiable problems shared with the GRPO engine), ``corpus`` (build the
  train/val streams, pre-tokenized once into a cache) and ``stream``
  (resumable, data-parallel batch sampling) are separate modules, each with
  its own decisions in its docstring.
- Importing the package imports no torch: ``arithmetic`` and ``tokenizer``
  are plain Python, and the torch/numpy-backed names (corpus, stream) load
  on first access, so a plan's task names are checked when it is read.
"""

from __future__ import annotations

from typing import Any

from engines.data.arithmetic import (
    TASKS,
    Problem,
    add_sub_chain,
    as_text,
    format_prompt,
    generate,
    iter_problems,
    multiplication,
    split_seeds,
    word_problem,
)
__all__ = [
    "TASKS", "Problem", "add_sub_chain", "as_text", "format_prompt", "generate", "iter_problems",
    "multiplication", "split_seeds", "word_problem",
    "Corpus", "build_corpus", "pretokenize", "token_dtype",
    "BatchSampler", "TokenStream", "eval_batches", "unigram_loss",
    "ByteTokenizer", "HFTokenizer", "Tokenizer", "load_tokenizer",
]

_LAZY = {"Corpus": "corpus", "build_corpus": "corpus", "pretokenize": "corpus", "token_dtype": "corpus",
         "BatchSampler": "stream", "TokenStream": "stream", "eval_batches": "stream", "unigram_loss": "stream",
         "ByteTokenizer": "tokenizer", "HFTokenizer": "tokenizer", "Tokenizer": "tokenizer",
         "load_tokenizer": "tokenizer"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"engines.data.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'engines.data' has no attribute {name!r}")
