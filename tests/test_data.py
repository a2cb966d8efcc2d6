"""engines.data: tokenizers round-trip, arithmetic problems are correct and held
out, corpora are built and cached as specified, and the batch sampler is
deterministic, resumable and splits data-parallel batches exactly."""

from __future__ import annotations

import json
import math
import re
import sys
from pathlib import Path
from typing import Sequence

import numpy as np
import pytest
import torch

from engines.data import (
    TASKS,
    BatchSampler,
    ByteTokenizer,
    Corpus,
    HFTokenizer,
    TokenStream,
    Tokenizer,
    as_text,
    build_corpus,
    eval_batches,
    generate,
    load_tokenizer,
    split_seeds,
    unigram_loss,
)
from engines.data.corpus import MIN_VAL_TOKENS

BYTE = ByteTokenizer()


# --- tokenizers -------------------------------------------------------------------------


def test_byte_tokenizer_round_trips_non_ascii() -> None:
    text = "héllo, 世界 🙂\nQ: 12*3?"
    ids = BYTE.encode(text)
    assert ids == list(text.encode("utf-8"))
    assert all(0 <= i < 256 for i in ids)
    assert BYTE.decode(ids) == text


def test_byte_tokenizer_specials() -> None:
    assert (BYTE.bos_id, BYTE.eos_id, BYTE.pad_id, BYTE.sep_id, BYTE.vocab_size) == (256, 257, 258, 259, 260)
    assert BYTE.name == "byte"
    assert BYTE.decode([256, 104, 259, 105, 257, 258]) == "hi"
    assert BYTE.decode([0xE4, 0xB8]) == "\ufffd"  # a cut multi-byte character decodes, replaced
    with pytest.raises(ValueError, match="outside the byte tokenizer's range"):
        BYTE.decode([260])


def test_load_tokenizer_rejects_unknown_names(tmp_path: Path) -> None:
    assert isinstance(load_tokenizer("byte"), ByteTokenizer)
    for name in ("gpt2", str(tmp_path / "missing"), str(_write(tmp_path / "a.txt", "x"))):
        with pytest.raises(ValueError, match=r"is neither 'byte' nor a local tokenizer directory"):
            load_tokenizer(name)


def _word_level_dir(directory: Path, *, eos: str | None = "</s>", config_eos: str | None = None) -> Path:
    tokenizers = pytest.importorskip("tokenizers")
    words = ["[UNK]", "hello", "world", "the", "cat"] + ([eos] if eos else [])
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    if eos:
        tok.add_special_tokens([eos])
    directory.mkdir(parents=True)
    tok.save(str(directory / "tokenizer.json"))
    if config_eos:
        (directory / "tokenizer_config.json").write_text(json.dumps({"eos_token": {"content": config_eos}}))
    return directory


def test_hf_tokenizer_directory_round_trip(tmp_path: Path) -> None:
    tok = load_tokenizer(str(_word_level_dir(tmp_path / "tok")))
    assert isinstance(tok, HFTokenizer)
    assert tok.vocab_size == 6 and tok.eos_id == 5
    assert tok.encode("hello the cat") == [1, 3, 4]  # no specials added
    assert tok.encode_batch(["cat", "world hello"]) == [[4], [2, 1]]
    assert tok.decode([1, 5, 2]) == "hello world"  # EOS skipped


def test_hf_tokenizer_eos_from_config_or_refused(tmp_path: Path) -> None:
    assert HFTokenizer(_word_level_dir(tmp_path / "a", eos="<end>", config_eos="<end>")).eos_id == 5
    directory = _word_level_dir(tmp_path / "b", eos=None)
    with pytest.raises(ValueError, match=re.escape(f"'{directory.resolve()}' has no EOS token")):
        HFTokenizer(directory)


def test_hf_tokenizer_without_tokenizer_json_needs_transformers(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "transformers", None)  # as on a machine without it
    (tmp_path / "vocab.txt").write_text("a\n")
    with pytest.raises(ValueError, match="has no tokenizer.json"):
        HFTokenizer(tmp_path)


# --- arithmetic -------------------------------------------------------------------------


def _ints(text: str) -> list[int]:
    return [int(m) for m in re.findall(r"-?\d+", text)]


def test_multiplication_is_correct_with_partial_products() -> None:
    for problem in generate(["multiplication"], 200, seed=1):
        a, b = _ints(problem.prompt)
        assert 100 <= a <= 999 and 100 <= b <= 999
        assert problem.answer == a * b
        work, last = problem.solution.split("\n")
        assert last == f"Answer: {a * b}"
        partials = [(int(f), int(p)) for f, p in re.findall(rf"{a}\*(\d+)=(\d+)", work.split(": ")[1])]
        assert all(p == a * f for f, p in partials)
        assert sum(f for f, _ in partials) == b and sum(p for _, p in partials) == a * b


def test_add_sub_chain_matches_python() -> None:
    for problem in generate(["add_sub"], 200, seed=2):
        expression = problem.prompt.removeprefix("What is ").removesuffix("?")
        assert re.fullmatch(r"\d+( [+-] \d+){3}", expression)
        assert problem.answer == eval(expression)  # noqa: S307 - digits and +/- only, checked above
        assert problem.solution.endswith(f"\nAnswer: {problem.answer}")
        assert _ints(problem.solution.split("\n")[0])[-1] == problem.answer  # the running total ends there


def test_word_problem_steps_check_out() -> None:
    for problem in generate(["word_problem"], 300, seed=3):
        *steps, last = problem.solution.split("\n")
        assert last == f"Answer: {problem.answer}" and problem.answer >= 0
        for step in steps:
            lhs, rhs = step.split("=")
            assert eval(lhs.replace("/", "//")) == int(rhs), (problem.prompt, step)  # noqa: S307
        assert int(steps[-1].split("=")[1]) == problem.answer


def test_generation_is_deterministic_and_round_robin() -> None:
    names = ["multiplication", "add_sub", "word_problem"]
    first = generate(names, 30, seed=7)
    assert first == generate(names, 30, seed=7)
    assert first != generate(names, 30, seed=8)
    assert [p.prompt.startswith("What is") for p in first[:3]] == [True, True, False]
    assert "*" in first[0].prompt and "*" not in first[1].prompt
    assert as_text(first[0]) == f"Q: {first[0].prompt}\nA: {first[0].solution}\n"
    assert set(TASKS) == set(names)


def test_unknown_task_lists_accepted_names() -> None:
    with pytest.raises(ValueError, match="unknown arithmetic task 'division'; accepted: multiplication, add_sub"):
        generate(["multiplication", "division"], 3, seed=0)


def test_train_and_test_splits_share_no_prompts() -> None:
    train_seed, test_seed = split_seeds(0)
    assert train_seed != test_seed and split_seeds(0) == (train_seed, test_seed)
    train = {p.prompt for p in generate(["multiplication"], 3000, seed=0, split="train")}
    test = {p.prompt for p in generate(["multiplication"], 3000, seed=0, split="test")}
    assert len(train) > 2900 and len(test) > 2900
    assert not train & test


# --- corpus -----------------------------------------------------------------------------


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def _all_tokens(corpus: Corpus) -> list[int]:
    return np.concatenate([corpus.train.tokens, corpus.val.tokens]).tolist()


def _build(source: Path | str, tmp_path: Path, tokenizer: Tokenizer = BYTE, val_fraction: float = 0.1) -> Corpus:
    return build_corpus(str(source), tokenizer, seed=0, val_fraction=val_fraction, cache_dir=tmp_path / "cache")


class CountingTokenizer(ByteTokenizer):
    """Bytes, but counting calls and claiming a vocabulary too big for uint16."""

    def __init__(self, vocab_size: int = 260) -> None:
        self.vocab_size = vocab_size
        self.fingerprint = f"counting-{vocab_size}"
        self.calls = 0

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        self.calls += 1
        return super().encode_batch(texts)


def test_corpus_from_text_file(tmp_path: Path) -> None:
    text = "héllo world\n" * 50
    corpus = _build(_write(tmp_path / "a.txt", text), tmp_path)
    assert _all_tokens(corpus) == BYTE.encode(text) + [BYTE.eos_id]
    assert isinstance(corpus.train.tokens, np.memmap) and corpus.train.tokens.dtype == np.uint16
    assert corpus.vocab_size == 260
    assert "1 file" in corpus.description and f"{len(corpus.train):,} train" in corpus.description


def test_corpus_from_jsonl_and_folder(tmp_path: Path) -> None:
    lines = [json.dumps({"text": "first doc", "id": 1}), "", json.dumps({"text": "second"})]
    jsonl = _write(tmp_path / "data" / "sub" / "b.jsonl", "\n".join(lines) + "\n")
    eos = [BYTE.eos_id]
    assert _all_tokens(_build(jsonl, tmp_path)) == BYTE.encode("first doc") + eos + BYTE.encode("second") + eos
    _write(tmp_path / "data" / "a.md", "# title\n")
    _write(tmp_path / "data" / "z.csv", "ignored,1\n")
    folder = _build(tmp_path / "data", tmp_path)
    expected = BYTE.encode("# title\n") + eos + BYTE.encode("first doc") + eos + BYTE.encode("second") + eos
    assert _all_tokens(folder) == expected  # sorted by path: data/a.md before data/sub/b.jsonl
    assert "2 files" in folder.description


def test_pretokenized_cache_is_reused_and_invalidated(tmp_path: Path) -> None:
    source = _write(tmp_path / "a.txt", "abc " * 100)
    tok = CountingTokenizer()
    first = _build(source, tmp_path, tok)
    calls = tok.calls
    (cached,) = (tmp_path / "cache").glob("*.bin")
    mtime = cached.stat().st_mtime_ns
    second = _build(source, tmp_path, tok)
    assert tok.calls == calls and cached.stat().st_mtime_ns == mtime
    assert _all_tokens(first) == _all_tokens(second)
    meta = json.loads(cached.with_suffix(".json").read_text())
    assert meta["tokens"] == 401 and meta["dtype"] == "uint16"
    _write(source, "changed " * 100)
    assert _all_tokens(_build(source, tmp_path, tok))[:8] == BYTE.encode("changed ")
    assert tok.calls > calls and not list((tmp_path / "cache").glob("*.tmp"))


def test_large_vocab_is_stored_as_uint32(tmp_path: Path) -> None:
    corpus = _build(_write(tmp_path / "a.txt", "x" * 100), tmp_path, CountingTokenizer(vocab_size=70_000))
    assert corpus.train.tokens.dtype == np.uint32 and corpus.val.tokens.dtype == np.uint32


def test_bad_jsonl_line_names_file_and_line(tmp_path: Path) -> None:
    path = _write(tmp_path / "d.jsonl", json.dumps({"text": "ok"}) + "\n" + json.dumps({"body": "x"}) + "\n")
    expected = f"{path.resolve()}:2: expected a JSON object with a string 'text' field"
    with pytest.raises(ValueError, match=re.escape(expected)):
        _build(path, tmp_path)
    _write(path, "{not json\n")
    with pytest.raises(ValueError, match=re.escape(f"{path.resolve()}:1: not valid JSON")):
        _build(path, tmp_path)
    assert not list((tmp_path / "cache").glob("*"))  # nothing half-written left behind


def test_bad_sources_are_refused(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    expected = f"data source '{missing}' does not exist; use 'arithmetic' or a local file/folder"
    with pytest.raises(FileNotFoundError, match=re.escape(expected)):
        _build(missing, tmp_path)
    with pytest.raises(ValueError, match="unsupported type '.csv'; accepted: .txt, .text, .md, .jsonl"):
        _build(_write(tmp_path / "a.csv", "x"), tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no .txt"):
        _build(tmp_path / "empty", tmp_path)
    with pytest.raises(ValueError, match=r"holds no text \(0 tokens\)"):
        _build(_write(tmp_path / "empty.txt", ""), tmp_path)
    with pytest.raises(ValueError, match="val_fraction must be between 0 and 1"):
        _build("arithmetic", tmp_path, val_fraction=1.0)


def test_local_val_split_is_the_last_fraction(tmp_path: Path) -> None:
    corpus = _build(_write(tmp_path / "a.txt", "0123456789" * 100 + "abcdefghi"), tmp_path, val_fraction=0.1)
    assert (len(corpus.train), len(corpus.val)) == (909, 101)  # 1010 tokens with the final EOS; val = round(101.0)
    assert BYTE.decode(corpus.val.tokens.tolist()).endswith("0123456789abcdefghi")


def test_arithmetic_corpus_is_deterministic_and_held_out(tmp_path: Path) -> None:
    corpus = build_corpus("arithmetic", BYTE, seed=0, val_fraction=0.05, cache_dir=tmp_path, min_tokens=300_000)
    again = build_corpus("arithmetic", BYTE, seed=0, val_fraction=0.05, cache_dir=tmp_path, min_tokens=300_000)
    assert np.array_equal(corpus.train.tokens, again.train.tokens)
    assert 300_000 <= len(corpus.train) < 320_000
    assert max(MIN_VAL_TOKENS, math.ceil(len(corpus.train) * 0.05 / 0.95)) <= len(corpus.val) < 80_000
    assert corpus.train.tokens.dtype == np.uint16 and int(corpus.train.tokens[-1]) == BYTE.eos_id
    prompts = lambda s: set(re.findall(r"Q: (.*)\n", BYTE.decode(s.tokens.tolist())))  # noqa: E731
    assert not prompts(corpus.train) & prompts(corpus.val)
    other = build_corpus("arithmetic", BYTE, seed=1, val_fraction=0.05, cache_dir=tmp_path)
    assert not np.array_equal(other.train.tokens[:1000], corpus.train.tokens[:1000])
    assert "arithmetic" in corpus.description and "seed 0" in corpus.description


# --- sampling ---------------------------------------------------------------------------

SEQ = 8


def _positions(n: int) -> TokenStream:
    """A stream whose every token is its own position, so a batch shows where it came from."""
    return TokenStream(np.arange(n, dtype=np.int64))


def _window_ids(x: torch.Tensor) -> list[int]:
    return (x[:, 0] // (SEQ + 1)).tolist()


def test_batches_have_shape_and_shifted_targets() -> None:
    stream = TokenStream(np.arange(900, dtype=np.uint16))
    assert stream.windows(SEQ) == 100
    x, y = BatchSampler(stream, SEQ, seed=0).next_batch(4)
    assert x.shape == y.shape == (4, SEQ) and x.dtype == y.dtype == torch.int64
    assert torch.equal(y, x + 1) and torch.equal(x[:, 1:], y[:, :-1])
    assert (x[:, 0] % (SEQ + 1) == 0).all()  # windows start on window boundaries


def test_sampler_is_deterministic_and_resumes_exactly() -> None:
    stream = _positions(900)
    run, twin, other = (BatchSampler(stream, SEQ, seed=s) for s in (3, 3, 4))
    first = [_window_ids(run.next_batch(4)[0]) for _ in range(3)]
    assert first == [_window_ids(twin.next_batch(4)[0]) for _ in range(3)]
    assert first != [_window_ids(other.next_batch(4)[0]) for _ in range(3)]
    state = run.state_dict()
    assert state == {"epoch": 0, "cursor": 12}
    expected = [run.next_batch(4) for _ in range(30)]  # crosses into epoch 1
    resumed = BatchSampler(stream, SEQ, seed=3)
    resumed.load_state_dict(state)
    for (x, y), (rx, ry) in zip(expected, (resumed.next_batch(4) for _ in range(30))):
        assert torch.equal(x, rx) and torch.equal(y, ry)
    assert resumed.state_dict() == run.state_dict() and run.epoch == 1


def test_two_ranks_split_the_single_process_batch() -> None:
    stream = _positions(900)
    single = BatchSampler(stream, SEQ, seed=5)
    ranks = [BatchSampler(stream, SEQ, seed=5, rank=r, world_size=2) for r in range(2)]
    for _ in range(20):  # 20 global batches of 6 windows: crosses an epoch of 100
        x, y = single.next_batch(6)
        (x0, y0), (x1, y1) = (s.next_batch(3) for s in ranks)
        assert not set(_window_ids(x0)) & set(_window_ids(x1))
        assert torch.equal(torch.cat([x0, x1]), x) and torch.equal(torch.cat([y0, y1]), y)
    assert ranks[0].state_dict() == ranks[1].state_dict() == single.state_dict() == {"epoch": 1, "cursor": 24}


def test_epoch_wraps_and_drops_the_incomplete_tail() -> None:
    sampler = BatchSampler(_positions(10 * (SEQ + 1) + 5), SEQ, seed=0)
    first_epoch = _window_ids(sampler.next_batch(4)[0]) + _window_ids(sampler.next_batch(4)[0])
    assert len(set(first_epoch)) == 8 and set(first_epoch) <= set(range(10))
    assert sampler.state_dict() == {"epoch": 0, "cursor": 8}
    third = _window_ids(sampler.next_batch(4)[0])
    order = np.random.default_rng((0, 1)).permutation(10)
    assert sampler.state_dict() == {"epoch": 1, "cursor": 4} and third == order[:4].tolist()


def test_sampler_refuses_a_stream_smaller_than_a_global_batch() -> None:
    sampler = BatchSampler(_positions(5 * (SEQ + 1)), SEQ, seed=0, world_size=2, rank=1)
    with pytest.raises(ValueError, match=r"one global batch of 6 windows needs at least 54 tokens"):
        sampler.next_batch(3)
    with pytest.raises(ValueError, match="sampler state must be"):
        sampler.load_state_dict({"epoch": 0, "cursor": 99})
    with pytest.raises(ValueError, match="rank must be in"):
        BatchSampler(_positions(100), SEQ, seed=0, rank=2, world_size=2)


def test_eval_batches_are_the_first_windows_in_order() -> None:
    stream = _positions(30 * (SEQ + 1))
    batches = eval_batches(stream, SEQ, micro_batch=4, max_batches=3)
    assert [_window_ids(x) for x, _ in batches] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]
    assert all(torch.equal(y, x + 1) for x, y in batches)
    assert len(eval_batches(stream, SEQ, micro_batch=4, max_batches=100)) == 7  # 30 // 4 full batches
    assert [x.shape[0] for x, _ in eval_batches(_positions(2 * (SEQ + 1)), SEQ, 4, 5)] == [2]
    with pytest.raises(ValueError, match="at least 9 are needed"):
        eval_batches(_positions(SEQ), SEQ, 4, 5)


def test_unigram_loss_by_hand() -> None:
    train = TokenStream(np.array([0, 0, 1], dtype=np.uint16))
    val = TokenStream(np.array([1, 0, 0, 1], dtype=np.uint16))  # targets 0, 0, 1
    p0, p1 = 3 / 5, 2 / 5  # add-one: (2+1)/(3+2), (1+1)/(3+2)
    expected = -(2 * math.log(p0) + math.log(p1)) / 3
    assert unigram_loss(train, val, vocab_size=2) == pytest.approx(expected, rel=1e-12)
    with pytest.raises(ValueError, match="outside vocab_size 2"):
        unigram_loss(TokenStream(np.array([0, 2])), val, vocab_size=2)


def test_unigram_baseline_on_arithmetic_beats_uniform(tmp_path: Path) -> None:
    corpus = build_corpus("arithmetic", BYTE, seed=0, val_fraction=0.05, cache_dir=tmp_path)
    loss = unigram_loss(corpus.train, corpus.val, corpus.vocab_size)
    assert 2.0 < loss < math.log(260)
