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
"""

from __future__ import annotations

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
from engines.data.corpus import Corpus, build_corpus, pretokenize, token_dtype
from engines.data.stream import BatchSampler, TokenStream, eval_batches, unigram_loss
from engines.data.tokenizer import ByteTokenizer, HFTokenizer, Tokenizer, load_tokenizer

__all__ = [
    "TASKS", "Problem", "add_sub_chain", "as_text", "format_prompt", "generate", "iter_problems",
    "multiplication", "split_seeds", "word_problem",
    "Corpus", "build_corpus", "pretokenize", "token_dtype",
    "BatchSampler", "TokenStream", "eval_batches", "unigram_loss",
    "ByteTokenizer", "HFTokenizer", "Tokenizer", "load_tokenizer",
]
