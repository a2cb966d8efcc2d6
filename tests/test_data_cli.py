"""``muse data inspect`` and ``muse data tokenizer train``: your own corpus, counted and tokenized.

Counts are checked against hand-computed values and against the executor's own
corpus builder; the trained tokenizer is read back by ``load_tokenizer`` and by a
plan that trains with it; every bad input is one line, exit code 2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import ROOT, TINY, one_error_line, write_plan
from engines.data.inspect import inspect_source
from engines.data.tokenizer import ByteTokenizer, HFTokenizer, load_tokenizer

CORPUS = ROOT / "plans/data/corpus-ja-en"
JA_EN = ("港町の朝は、魚市場のせりの声から始まる。The harbor wakes before the town does.\n"
         "米を研ぐときは、最初の水をすぐに捨てる。When you wash rice, pour the first water away.\n")


def _write(path: Path, text: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def _folder(root: Path) -> tuple[Path, list[str]]:
    """A folder of every accepted format (and a file that is ignored); its documents in the executor's order."""
    docs = [JA_EN * 3, "# 見出し\nA heading and a line.\n", "最初の文書", "", "third document, plain ASCII"]
    _write(root / "a.txt", docs[0])
    _write(root / "b.md", docs[1])
    rows = [json.dumps({"text": d, "id": i}, ensure_ascii=False) for i, d in enumerate(docs[2:])]
    _write(root / "sub" / "c.jsonl", rows[0] + "\n\n" + "\n".join(rows[1:]) + "\n")  # a blank line is skipped
    _write(root / "notes.csv", "ignored,1\n")
    return root, docs


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, dict]:
    """A 600-token BPE trained on the shipped Japanese/English corpus through the CLI, and its --json."""
    from typer.testing import CliRunner

    from muse_plan.cli.main import app

    out = tmp_path_factory.mktemp("tok") / "tokenizer"
    result = CliRunner().invoke(app, ["data", "tokenizer", "train", str(CORPUS), "--vocab-size", "600",
                                      "-o", str(out), "--json"])
    assert result.exit_code == 0, result.output
    return out, json.loads(result.stdout)


# ---- muse data tokenizer train -----------------------------------------------------------------


def test_trained_tokenizer_needs_fewer_tokens_per_character_than_bytes(trained) -> None:
    out, report = trained
    assert report["vocab_size"] == 600 and report["files"] == 7
    assert report["heldout_characters"] > 500 and report["trained_characters"] < report["characters"]
    # measured on the held-out tail: the byte tokenizer spends one token per UTF-8 byte
    assert report["heldout_tokens"] < 0.6 * report["heldout_bytes"]
    assert report["tokens_per_char"] < 0.6 * report["byte_tokens_per_char"]
    assert report["bytes_per_token"] > 1.5
    assert json.loads((out / "muse-tokenizer.json").read_text())["heldout_tokens"] == report["heldout_tokens"]


def test_trained_tokenizer_loads_and_round_trips_exactly(trained) -> None:
    out, _ = trained
    tok = load_tokenizer(str(out))
    assert isinstance(tok, HFTokenizer) and tok.vocab_size == 600
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 2)
    texts = [JA_EN, "未知の漢字「龘」と絵文字 🎉、全角スペース　も。", "  two  spaces\tand a tab\r\nCRLF\n", "",
             "Ünïcödé naïve café — ‘quotes’"]
    for text in texts:
        ids = tok.encode(text)
        assert tok.decode(ids) == text
        assert max(ids, default=0) < tok.vocab_size and tok.eos_id not in ids  # no specials added
    byte = ByteTokenizer()
    assert len(tok.encode(JA_EN)) < 0.5 * len(byte.encode(JA_EN))


def test_trained_tokenizer_trains_a_plan(cli, trained, tmp_path) -> None:
    out, _ = trained
    stage = {"name": "pretrain", "kind": "pretrain", "steps": 3, "checkpoint_every": 3, "eval_every": 3}
    plan = {**TINY, "name": "own-tok", "model": {**TINY["model"], "residual": "standard", "vocab_size": 600},
            "techniques": {}, "data": {"source": str(CORPUS), "tokenizer": str(out), "val_fraction": 0.1},
            "stages": [stage]}
    assert cli("plan", "import", write_plan(tmp_path, plan)).exit_code == 0
    result = cli("plan", "run", "own-tok")
    assert result.exit_code == 0, result.output
    assert "pretrain: 3 steps" in result.output and "validation loss" in result.output
    small = {**plan, "name": "too-small", "model": {**plan["model"], "vocab_size": 512}}
    cli("plan", "import", write_plan(tmp_path, small))
    one_error_line(cli("plan", "run", "too-small"), "set model.vocab_size to at least 600")


def test_tokenizer_train_refuses_a_full_folder_unless_forced(cli, tmp_path) -> None:
    corpus = _write(tmp_path / "c.txt", JA_EN * 5)
    out = tmp_path / "out"
    _write(out / "keep.txt", "mine")
    _write(out / "merges.txt", "a stale file another loader would read")
    args = ("data", "tokenizer", "train", corpus, "--vocab-size", 300, "-o", out)
    one_error_line(cli(*args), f"output folder '{out}' is not empty; name a new folder, or pass --force")
    assert cli(*args, "--force").exit_code == 0
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt", "muse-tokenizer.json", "special_tokens_map.json",
                                                     "tokenizer.json", "tokenizer_config.json"]
    assert load_tokenizer(str(out)).decode(load_tokenizer(str(out)).encode(JA_EN)) == JA_EN


@pytest.mark.parametrize("size", [258, 262_145])
def test_tokenizer_vocab_size_is_bounded(cli, tmp_path, size) -> None:
    corpus = _write(tmp_path / "c.txt", JA_EN)
    result = cli("data", "tokenizer", "train", corpus, "--vocab-size", size, "-o", tmp_path / "out")
    one_error_line(result, f"vocab size {size} is out of range: a byte-level BPE holds the 256 bytes and 3 "
                           "specials, so 259 to 262,144")
    assert not (tmp_path / "out").exists()


# ---- muse data inspect -------------------------------------------------------------------------


def test_inspect_counts_a_folder_exactly(cli, tmp_path) -> None:
    folder, docs = _folder(tmp_path / "data")
    chars, nbytes = sum(len(d) for d in docs), sum(len(d.encode()) for d in docs)
    result = cli("data", "inspect", folder, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert (report["files"], report["documents"], report["characters"], report["text_bytes"]) == (3, 5, chars, nbytes)
    assert report["tokens"] == nbytes + 5 and report["estimated"] is False  # bytes, one EOS per document
    assert report["val_tokens"] == round((nbytes + 5) * 0.05) and report["train_tokens"] + report["val_tokens"] == \
        report["tokens"]
    assert report["tokens_per_char"] == round(nbytes / chars, 4)
    assert [s["where"] for s in report["samples"]] == ["a.txt", "b.md", "sub/c.jsonl:1"]
    assert report["samples"][0]["text"] == docs[0][:200]
    table = cli("data", "inspect", folder).output
    for text in ("3 files", f"{chars:,}", f"{nbytes + 5:,} ({nbytes:,} text + 5 EOS)", "sub/c.jsonl:1"):
        assert text in table, text


def test_inspect_matches_the_executors_corpus(trained, tmp_path) -> None:
    from engines.data.corpus import build_corpus

    out, _ = trained
    folder, _ = _folder(tmp_path / "data")
    reports = []
    for tokenizer in (ByteTokenizer(), load_tokenizer(str(out))):
        reports.append(report := inspect_source(str(folder), tokenizer, val_fraction=0.2))
        corpus = build_corpus(str(folder), tokenizer, seed=0, val_fraction=0.2, cache_dir=tmp_path / "cache")
        assert (report.train_tokens, report.val_tokens) == (len(corpus.train), len(corpus.val))
    assert reports[1].tokens_per_char < 0.6 * reports[0].tokens_per_char


def test_inspect_estimates_a_large_corpus_from_a_sample(tmp_path) -> None:
    texts = sorted(CORPUS.glob("*.[mt]*"))
    for i in range(8):  # 8 plain files and a .jsonl, ~280 KB: 64 windows of whole lines
        _write(tmp_path / "big" / f"{i}.txt", "\n".join(p.read_text() for p in texts[i % 3:]))
    _write(tmp_path / "big" / "z.jsonl", (CORPUS / "field-notes.jsonl").read_text() * 10)
    exact = inspect_source(str(tmp_path / "big"), "byte")
    estimate = inspect_source(str(tmp_path / "big"), "byte", exact_bytes=0, sample_bytes=24_000)
    assert not exact.estimated and estimate.estimated and estimate.sampled_bytes < exact.file_bytes / 3
    assert "estimated from 64 windows" in estimate.notes[0]
    assert abs(estimate.documents - exact.documents) <= 0.1 * exact.documents
    for name in ("characters", "text_bytes", "tokens"):
        assert abs(getattr(estimate, name) - getattr(exact, name)) < 0.05 * getattr(exact, name), name


def test_inspect_arithmetic_is_the_generated_corpus(cli) -> None:
    report = json.loads(cli("data", "inspect", "arithmetic", "--json").stdout)
    assert report["train_tokens"] >= 200_000 and report["val_tokens"] >= 65_536
    assert report["tokens"] == report["text_tokens"] + report["documents"]
    assert report["samples"][0]["text"].startswith("Q: ")


# ---- bad input: one line, exit code 2, naming the file (line, field) ----------------------------


def _bad_sources(tmp: Path) -> list[tuple[Path, str]]:
    ok = json.dumps({"text": "fine"})
    (tmp / "empty").mkdir()
    return [
        (tmp / "missing", f"data source '{tmp / 'missing'}' does not exist"),
        (tmp / "empty", f"data folder '{tmp / 'empty'}' holds no .txt, .text, .md, .jsonl files (it is empty)"),
        (_write(tmp / "other" / "x.csv", "a,b\n").parent, "holds no .txt, .text, .md, .jsonl files (it holds 1 "
                                                          "other file, e.g. 'x.csv')"),
        (_write(tmp / "latin1.txt", "caf\u00e9\n".encode() + "na\u00efve\n".encode("latin-1")),
         f"{(tmp / 'latin1.txt').resolve()}:2: not UTF-8 text (byte 0xef at column 3); save the file as UTF-8"),
        (_write(tmp / "sjis.jsonl", (ok + "\n" + json.dumps({"text": "日本"}, ensure_ascii=False) + "\n")
                .encode("shift_jis")), f"{(tmp / 'sjis.jsonl').resolve()}:2: not UTF-8 text"),
        (_write(tmp / "bad.jsonl", f"{ok}\n\n{{not json\n"),
         f"{(tmp / 'bad.jsonl').resolve()}:3: not valid JSON; each line must be an object with a string 'text'"),
        (_write(tmp / "field.jsonl", f"{ok}\n{json.dumps({'body': 'x'})}\n"),
         f"{(tmp / 'field.jsonl').resolve()}:2: expected a JSON object with a string 'text' field"),
        (_write(tmp / "number.jsonl", f"{json.dumps({'text': 7})}\n"),
         f"{(tmp / 'number.jsonl').resolve()}:1: expected a JSON object with a string 'text' field"),
    ]


def test_bad_sources_are_one_line_naming_the_file(cli, tmp_path) -> None:
    for source, message in _bad_sources(tmp_path):
        one_error_line(cli("data", "inspect", source), message)
        out = tmp_path / "tok-out"
        one_error_line(cli("data", "tokenizer", "train", source, "--vocab-size", 300, "-o", out), message)
        assert not out.exists()  # nothing written
    one_error_line(cli("data", "inspect", tmp_path / "latin1.txt", "-t", tmp_path / "nope"),
                   "is neither 'byte' nor a local tokenizer directory")


def test_a_run_refuses_a_non_utf8_file_as_inspect_does(tmp_path) -> None:
    from engines.data.corpus import build_corpus

    path = _write(tmp_path / "latin1.txt", "ok\nna\u00efve\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin1.txt:2: not UTF-8 text \(byte 0xef at column 3\)"):
        build_corpus(str(path), ByteTokenizer(), seed=0, val_fraction=0.1, cache_dir=tmp_path / "cache")


def test_a_bad_line_in_an_estimated_corpus_is_named_by_its_line(tmp_path) -> None:
    good = json.dumps({"text": "a line of text " * 8}) + "\n"
    path = _write(tmp_path / "d.jsonl", good * 2000 + '{"body": 1}\n' * 2000)  # the second half is bad
    with pytest.raises(ValueError, match=r"d.jsonl:(\d+): expected a JSON object") as info:
        inspect_source(str(path), "byte", exact_bytes=0, sample_bytes=16_000)
    line = int(str(info.value).split(":")[-2])
    assert 2000 < line <= 4000


def test_data_commands_import_no_torch_or_numpy(muse_home, tmp_path) -> None:
    from conftest import heavy_imports

    commands = [["data", "inspect", str(CORPUS)], ["data", "inspect", str(CORPUS), "--json"],
                ["data", "tokenizer", "train", str(CORPUS), "--vocab-size", "300", "-o", str(tmp_path / "t")],
                ["data", "inspect", str(CORPUS), "-t", str(tmp_path / "t")], ["data", "--help"]]
    assert heavy_imports(muse_home, commands) == "none"
