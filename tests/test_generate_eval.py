"""``muse generate`` and ``muse eval`` end to end, against the model computed directly.

A tiny plan is run for a few steps (a real run in a real store); a tiny
random Llama with a byte-level ``tokenizers`` tokenizer is written with
transformers' own classes; a "copying" decoder (its blocks write nothing, so
it predicts its last token again) makes accuracy something other than 0.
Every reference here is computed without ``muse_plan.trained``: the model
built from the files, an argmax loop over full forwards, the cross-entropy
by hand, the reward function of the RL stages."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from safetensors.torch import load_model

from tests.conftest import TINY_STANDARD, one_error_line, pretrain, run_once, write_plan
from engines.architecture.config import ModelConfig
from engines.architecture.model import DecoderLM
from engines.grpo.rewards import Completion, correctness

pytestmark = pytest.mark.usefixtures("one_thread")

EOS, BOS = 257, 256  # the byte tokenizer's
PLAN = {**TINY_STANDARD, "stages": pretrain(2, 2),
        "training": {**TINY_STANDARD["training"], "grad_accum": 1, "warmup_steps": 1}}


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> tuple[str, Path]:
    """A finished tiny run in its own store: (the store's URL, its checkpoint folder)."""
    home = tmp_path_factory.mktemp("home")
    url = run_once(home, PLAN)
    return url, home / "runs" / "run-00001" / "pretrain" / "step-00000002"


def _decoder(folder: Path) -> DecoderLM:
    manifest = json.loads((folder / "manifest.json").read_text())
    model = DecoderLM(ModelConfig(**manifest["model_config"]))
    load_model(model, str(folder / "model.safetensors"))
    return model.eval()


@torch.no_grad()
def _argmax_loop(forward, ids: list[int], steps: int, eos: int, context: int) -> list[int]:
    """Greedy continuation by full forwards of (at most) the last ``context`` tokens."""
    seq, out = list(ids), []
    for _ in range(steps):
        token = int(forward(torch.tensor([seq[-context:]]))[0, -1].argmax())
        seq.append(token)
        out.append(token)
        if token == eos:
            break
    return out


def _bytes_text(ids: list[int]) -> str:
    return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


def test_greedy_generate_on_a_run_prints_the_argmax_continuation(cli, run) -> None:
    url, folder = run
    model = _decoder(folder)
    prompt = "Q: 12+7\nA: "
    # a pretrain stage's prompt starts after an EOS, where its documents start; 40 tokens run past
    # the context of 32, so the KV cache's part and the sliding window's are both checked
    expected = _argmax_loop(lambda x: model(x)[0], [EOS, *prompt.encode()], 40, EOS, 32)
    assert len(expected) == 40  # no EOS on the way: the window's part is reached
    result = cli("--db", url, "generate", "1", "--prompt", prompt, "--temperature", "0", "--max-tokens", "40")
    assert result.exit_code == 0, result.output
    assert result.stdout == _bytes_text(expected) + "\n"
    assert "run 1, stage pretrain, step-00000002" in result.stderr
    shown = cli("--db", url, "generate", "run-00001", "--prompt", prompt, "--temperature", "0",
                "--max-tokens", "40", "--json")
    data = json.loads(shown.stdout)
    assert data["token_ids"] == expected and data["tokens"] == len(expected)
    assert data["completion"] == _bytes_text(expected) and data["source"] == "run 1, stage pretrain, step-00000002"
    by_plan = cli("--db", url, "generate", PLAN["name"], "--prompt", prompt, "--temperature", "0",
                  "--max-tokens", "40", "--json")  # a plan's name: its newest run
    assert json.loads(by_plan.stdout)["token_ids"] == expected
    # the stage folder and the checkpoint folder open the same model, found in the store
    by_folder = cli("--db", url, "generate", folder.parent, "--prompt", prompt, "--temperature", "0",
                    "--max-tokens", "40", "--json")
    assert json.loads(by_folder.stdout)["token_ids"] == expected
    assert json.loads(by_folder.stdout)["source"] == "run 1, stage pretrain, step-00000002"


def test_sampling_repeats_with_its_seed_and_stays_in_the_nucleus(cli, run) -> None:
    url, _ = run
    args = ("--db", url, "generate", "1", "--prompt", "abc", "--max-tokens", "12", "--json")
    first, again = (json.loads(cli(*args, "--seed", "3").stdout) for _ in range(2))
    assert first["token_ids"] == again["token_ids"] and len(first["token_ids"]) >= 1
    from muse_plan.trained import open_trained

    trained = open_trained("1", db_url=url)
    ids = trained.prompt_ids("abc")
    probs = torch.softmax(trained.logits(torch.tensor([ids]))[0, -1] / 0.8, -1)
    top = int(probs.argmax())
    # top_p so small only the most likely token is left: sampling is greedy then
    assert next(trained.sample(ids, 1, temperature=0.8, top_p=1e-6, seed=5)) == top


def test_eval_loss_is_the_cross_entropy_of_the_texts(cli, run, tmp_path) -> None:
    url, folder = run
    model = _decoder(folder)
    texts = ["Q: 3+4\nA: 7\n", "a longer text than the model's context of thirty-two tokens, in windows"]
    data = tmp_path / "texts.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    nats, count = 0.0, 0
    with torch.no_grad():
        for text in texts:
            seq = [EOS, *text.encode()]  # every byte predicted, the first after the EOS a document follows
            for start in range(0, len(seq) - 1, 32):  # disjoint windows of the context
                x, y = seq[start:start + 32], seq[start + 1:start + 33]
                logits = model(torch.tensor([x[:len(y)]]))[0][0]
                nats += float(F.cross_entropy(logits, torch.tensor(y), reduction="sum"))
                count += len(y)
    result = cli("--db", url, "eval", "1", "--data", data, "--json")
    assert result.exit_code == 0, result.output
    text = json.loads(result.stdout)["text"]
    assert text["tokens"] == count == sum(len(t.encode()) for t in texts)
    assert text["loss"] == pytest.approx(nats / count, rel=1e-5)
    assert text["perplexity"] == pytest.approx(math.exp(nats / count), rel=1e-5)
    shown = cli("--db", url, "eval", "1", "--data", data)
    assert f"loss {nats / count:.4f} nats/token" in shown.stdout


def _copying_checkpoint(folder: Path) -> Path:
    """A decoder whose blocks add nothing and whose embeddings all have one norm: the
    logits of a token are its normalised embedding against every embedding, so the
    greedy next token is the last one again (Cauchy-Schwarz)."""
    from muse_plan.executor import checkpoint
    from muse_plan.executor.record import model_meta

    torch.manual_seed(0)
    model = DecoderLM(ModelConfig(vocab_size=260, seq_len=32, n_layers=1, d_model=32, n_heads=2))
    with torch.no_grad():
        model.tok_emb.weight.copy_(F.normalize(model.tok_emb.weight, dim=1))
        for block in model.blocks:
            block.attn.wo.weight.zero_()
            block.mlp.w_down.weight.zero_()
    return checkpoint.save(folder, 5, model, {}, {"plan": "elsewhere", "revision": 1, **model_meta(model)})


def test_eval_accuracy_is_the_rl_stages_correctness_reward(cli, tmp_path) -> None:
    ckpt = _copying_checkpoint(tmp_path / "copy")
    rows = [("Q: 2+2\nA: 4", 4), ("Q: 2+3\nA: 4", 5), ("Q: 3*3\nA: 9", "9")]
    data = tmp_path / "answers.jsonl"
    data.write_text("".join(json.dumps({"prompt": p, "answer": a}) + "\n" for p, a in rows))
    model = _decoder(ckpt)
    expected = []
    for prompt, answer in rows:  # one token: the prompt's last digit again
        tokens = _argmax_loop(lambda x: model(x)[0], [EOS, *prompt.encode()], 1, EOS, 32)
        expected.append(correctness(Completion(_bytes_text(tokens), int(answer), len(tokens), 1)))
    assert expected == [1.0, 0.0, 1.0]
    result = cli("eval", ckpt, "--data", data, "--max-tokens", "1", "--json")
    assert result.exit_code == 0, result.output
    answers = json.loads(result.stdout)["answers"]
    assert [r["correct"] for r in answers["results"]] == expected
    assert [r["completion"] for r in answers["results"]] == ["4", "4", "9"]
    assert answers["accuracy"] == pytest.approx(2 / 3) and answers["correct"] == 2
    # no plan in the store says which tokenizer: the byte tokenizer, and the source says so
    assert "the byte tokenizer assumed" in json.loads(result.stdout)["source"]


def test_a_lora_checkpoint_opens_with_its_adapters_merged(tmp_path) -> None:
    """A LoRA stage's checkpoint (base + adapters, its manifest's lora_scaling) opens as the
    plain decoder computing what the adapted model computed."""
    from engines.grpo.policy import LoraSettings, add_lora
    from muse_plan.executor import checkpoint
    from muse_plan.executor.record import model_meta
    from muse_plan.trained import open_trained

    torch.manual_seed(1)
    model = DecoderLM(ModelConfig(vocab_size=260, seq_len=32, n_layers=2, d_model=32, n_heads=2))
    settings = LoraSettings(rank=2, alpha=6.0, target_modules=("q_proj", "v_proj"), layers_fraction=1.0)
    add_lora(model, settings)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)  # adapters that change what the model computes
    meta = {"lora_scaling": settings.scaling, **model_meta(model)}
    ckpt = checkpoint.save(tmp_path / "lora", 3, model, {}, meta)
    ids = torch.tensor([[EOS, *b"merge me"]])
    with torch.no_grad():
        adapted = model.eval()(ids)[0]
    trained = open_trained(str(ckpt))
    assert trained.kind == "muse" and not any("lora" in k for k in trained.model.state_dict())
    assert torch.allclose(trained.logits(ids), adapted, atol=1e-5)
    assert not torch.allclose(trained.logits(ids), _decoder_without_adapters(ckpt)(ids)[0], atol=1e-3)


def _decoder_without_adapters(ckpt: Path) -> DecoderLM:
    from safetensors.torch import load_file

    manifest = json.loads((ckpt / "manifest.json").read_text())
    model = DecoderLM(ModelConfig(**manifest["model_config"]))
    base = {k.replace(".base_layer", ""): v for k, v in load_file(str(ckpt / "model.safetensors")).items()
            if "lora_" not in k}
    model.load_state_dict(base, strict=False)
    return model.eval()


def _tiny_llama(directory: Path, tokenizer: bool = True) -> None:
    """A random Llama over 256 byte-level symbols and <s>, </s>, with its tokenizer.json; without
    it, a vocabulary of the byte tokenizer's 260."""
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=258 if tokenizer else 260, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True,
        bos_token_id=256, eos_token_id=257)
    transformers.LlamaForCausalLM(config).save_pretrained(directory)
    if tokenizer:
        symbols = sorted(pre_tokenizers.ByteLevel.alphabet())
        raw = Tokenizer(models.BPE(vocab={s: i for i, s in enumerate(symbols)}, merges=[]))
        raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        raw.decoder = decoders.ByteLevel()
        raw.add_special_tokens(["<s>", "</s>"])
        raw.save(str(directory / "tokenizer.json"))


def test_greedy_generate_on_a_hugging_face_folder(cli, tmp_path) -> None:
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer

    folder = tmp_path / "llama"
    _tiny_llama(folder)
    model = transformers.LlamaForCausalLM.from_pretrained(folder).eval()
    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    prompt = "Hello, wörld"
    ids = [BOS, *tokenizer.encode(prompt, add_special_tokens=False).ids]  # its BOS first, as HF tokenizers do
    expected = _argmax_loop(lambda x: model(input_ids=x).logits, ids, 20, EOS, 64)
    completion = tokenizer.decode(ids + expected)[len(tokenizer.decode(ids)):]
    result = cli("generate", folder, "--prompt", prompt, "--temperature", "0", "--max-tokens", "20")
    assert result.exit_code == 0, result.output
    assert result.stdout == completion + "\n"
    assert f"Hugging Face model {folder}" in result.stderr
    data = json.loads(cli("generate", folder, "--prompt", prompt, "--temperature", "0", "--max-tokens", "20",
                          "--json").stdout)
    assert data["token_ids"] == expected
    # eval's loss on the same folder: the text's tokens after BOS, by hand
    rows = tmp_path / "t.jsonl"
    rows.write_text(json.dumps({"text": prompt}) + "\n")
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids[:-1]])).logits[0]
    loss = float(F.cross_entropy(logits, torch.tensor(ids[1:])))
    shown = json.loads(cli("eval", folder, "--data", rows, "--json").stdout)
    assert shown["text"]["loss"] == pytest.approx(loss, rel=1e-5)


def test_a_hugging_face_stage_checkpoint_is_built_from_init_from_with_its_own_weights(cli, tmp_path,
                                                                                      muse_home) -> None:
    """A checkpoint of a family-hf stage holds no model_config: the model comes from the plan's
    init_from config, the weights from the checkpoint (not from init_from's folder)."""
    transformers = pytest.importorskip("transformers")
    from muse_plan.executor import checkpoint
    from muse_plan.store import repo, runs
    from muse_plan.store.db import Store

    init = tmp_path / "llama"
    _tiny_llama(init, tokenizer=False)
    plan = {"name": "hf-tiny", "model": {"scale": "1M", "family": "hf", "init_from": str(init), "seq_len": 64,
                                         "vocab_size": 260},
            "compute": "cpu", "training": {"precision": "fp32", "micro_batch": 2},
            "stages": [{"name": "sft", "kind": "cold_start_sft", "steps": 2}]}
    (tmp_path / "plan.yaml").write_text(yaml.safe_dump(plan))
    assert cli("plan", "import", tmp_path / "plan.yaml").exit_code == 0, "import"
    with Store().write() as session:
        run = runs.create_run(session, repo.get_plan(session, "hf-tiny"), 1, [("sft", 2)], str(muse_home / "runs"))
        run_dir = Path(run.run_dir)
    trained_model = transformers.LlamaForCausalLM.from_pretrained(init).eval()
    with torch.no_grad():
        for p in trained_model.parameters():
            p.add_(0.05 * torch.randn_like(p))  # "trained": not init_from's weights any more
    checkpoint.save(run_dir / "sft", 2, trained_model, {}, {"plan": "hf-tiny", "revision": 1, "run": 1,
                                                           "stage": "sft"})
    ids = [BOS, *b"Q: 1+1\nA: "]  # a GRPO stage's prompt: BOS first (engines/grpo/data.prompt_ids)
    expected = _argmax_loop(lambda x: trained_model(input_ids=x).logits, ids, 10, EOS, 64)
    result = cli("generate", "1", "--prompt", "Q: 1+1\nA: ", "--temperature", "0", "--max-tokens", "10", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["token_ids"] == expected and data["source"] == "run 1, stage sft, step-00000002"


@pytest.mark.parametrize("case, message", [
    ("missing path", "is neither a run id, a plan with a run, nor an existing folder"),
    ("not a model", "is not a model: it has no manifest.json"),
    ("a file", "is a file; give a run id"),
    ("unknown stage", "run 1 has no stage 'nope'; its stages: pretrain"),
    ("corrupt", "model.safetensors does not match its checksum"),
    ("no run", "no run '7'"),
])
def test_what_is_not_a_model_is_one_line(cli, run, tmp_path, case, message) -> None:
    url, folder = run
    ref, extra = {
        "missing path": (tmp_path / "nowhere", ()),
        "not a model": (tmp_path, ()),
        "a file": (tmp_path / "notes.txt", ()),
        "unknown stage": ("1", ("--stage", "nope")),
        "corrupt": (tmp_path / "step-00000002", ()),
        "no run": ("7", ()),
    }[case]
    (tmp_path / "notes.txt").write_text("hello")
    if case == "corrupt":
        shutil.copytree(folder, ref)
        weights = ref / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:-100])
    one_error_line(cli("--db", url, "generate", ref, "--prompt", "x", *extra), message)
    one_error_line(cli("--db", url, "eval", ref, "--data", tmp_path / "notes.txt", *extra),
                   "line 1: not JSON")  # the data file is read first


def test_a_run_without_a_checkpoint_is_one_line(cli, tmp_path, muse_home) -> None:
    from muse_plan.store import repo, runs
    from muse_plan.store.db import Store

    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(PLAN))
    assert cli("plan", "import", tmp_path / "tiny.yaml").exit_code == 0
    with Store().write() as session:
        runs.create_run(session, repo.get_plan(session, "tiny"), 1, [("pretrain", 2)], str(muse_home / "runs"))
    one_error_line(cli("generate", "1", "--prompt", "x"), "run 1 has no checkpoint of a trained language model yet")
    one_error_line(cli("generate", "1", "--stage", "pretrain", "--prompt", "x"),
                   "stage 'pretrain' of run 1 has no checkpoint yet")


@pytest.mark.parametrize("lines, message", [
    (['{"text": "a"}', "not json"], "line 2: not JSON"),
    (['{"text": "a"}', "", '{"answer": 3}'], "line 3: a row with 'answer' needs 'prompt' too"),
    (['{"label": 1}'], "line 1: a row needs a 'text' field"),
    (['["text"]'], "line 1: a row must be a JSON object"),
    (['{"prompt": "1+1=", "answer": ["2"]}'], "line 1: 'answer' must be a non-empty string or a number"),
    ([], "has no rows"),
])
def test_a_bad_data_file_is_one_line_with_its_line_number(cli, run, tmp_path, lines, message) -> None:
    url, _ = run
    data = tmp_path / "rows.jsonl"
    data.write_text("\n".join(lines) + "\n")
    one_error_line(cli("--db", url, "eval", "1", "--data", data), message)
    one_error_line(cli("--db", url, "eval", "1", "--data", tmp_path / "absent.jsonl"), "no data file")


def test_a_plan_without_a_run_says_how_to_start_one(cli, tmp_path) -> None:
    assert cli("plan", "import", write_plan(tmp_path, PLAN)).exit_code == 0
    one_error_line(cli("generate", PLAN["name"], "--prompt", "x"),
                   f"plan {PLAN['name']!r} has no run yet; start one with: muse plan run {PLAN['name']}")


def test_greedy_decodes_a_batch_of_prompts_as_one_at_a_time_does(tmp_path) -> None:
    """``Trained.greedy`` (what ``muse eval`` scores answers with) left-pads prompts of several lengths
    into batches and decodes them together: each completion is the one-prompt argmax loop's, a row
    stopping at EOS while others go on; a prompt too long for the context with ``max_tokens`` more and
    an empty prompt go through the one-at-a-time sampler; the order of the prompts is kept. The same
    for a Hugging Face model."""
    from engines.data.tokenizer import ByteTokenizer
    from muse_plan import trained as tr
    from muse_plan.trained import Trained, open_trained

    torch.manual_seed(3)
    model = DecoderLM(ModelConfig(vocab_size=260, seq_len=48, n_layers=2, d_model=32, n_heads=2)).eval()
    with torch.no_grad():  # weights far from the copying start, so completions vary along a row
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.3)
    first = _argmax_loop(lambda x: model(x)[0], [EOS, *b"ab"], 12, -1, 48)
    eos = next(t for i, t in enumerate(first) if i >= 2 and t not in first[:i])  # a token some row meets early
    t = Trained(model, ByteTokenizer(), "muse", "test", model.config, context=48)
    t.tokenizer.eos_id = eos  # type: ignore[misc]
    # in twos by length: (x, ab), (mid size, a longer prompt), then r×38 and q×40, which reach the context
    # (48) after 7 tokens and go on from their last 48 tokens, r's window 2 shorter than q's (padded);
    # q×50 longer than the context from the start; the empty prompt starts from EOS
    texts = (b"ab", b"a longer prompt", b"x", b"q" * 40, b"mid size", b"r" * 38, b"q" * 50)
    prompts = [[EOS, *p] for p in texts] + [[]]
    expected = [_argmax_loop(lambda x: model(x)[0], p or [eos], 12, eos, 48) for p in prompts]
    assert any(len(e) < 12 for e in expected) and any(len(e) == 12 for e in expected)
    folder = tmp_path / "llama"
    _tiny_llama(folder)
    hf = open_trained(str(folder))  # context 64: "x"×55 and "y"×50 padded together past it
    hf_prompts = [hf.prompt_ids(text) for text in ("Hello", "hi", "y" * 50, "x" * 55)]
    hf_expected = [_argmax_loop(lambda x: hf.model(input_ids=x).logits, p, 10, hf.eos_id, 64) for p in hf_prompts]
    tr.GREEDY_BATCH = 2  # several batches
    try:
        assert t.greedy(prompts, 12) == expected
        assert hf.greedy(hf_prompts, 10) == hf_expected
    finally:
        tr.GREEDY_BATCH = 32


def test_a_runs_relative_tokenizer_is_found_from_any_folder(cli, tmp_path, monkeypatch) -> None:
    """A plan whose tokenizer is a relative folder, run in its own folder: each checkpoint's manifest
    keeps the folder the run ran in, so ``muse eval`` and ``muse generate`` load that tokenizer from
    elsewhere (the plan's path read from the run's folder), and say so in one line where it is gone."""
    work, elsewhere = tmp_path / "work", tmp_path / "elsewhere"
    work.mkdir(), elsewhere.mkdir()
    shutil.copytree(Path(__file__).resolve().parent.parent / "plans" / "data" / "tokenizer-ja-en", work / "tok")
    plan = write_plan(work, {**TINY_STANDARD, "model": {**TINY_STANDARD["model"], "vocab_size": 2048}},
                      stages=pretrain(2, 2), data={"source": "arithmetic", "tokenizer": "tok"})
    monkeypatch.chdir(work)
    assert cli("plan", "import", plan).exit_code == 0
    assert cli("plan", "run", "tiny").exit_code == 0
    ckpt = next((work.parent / "muse-home" / "runs" / "run-00001").rglob("manifest.json"))
    assert json.loads(ckpt.read_text())["workdir"] == str(work)
    monkeypatch.chdir(elsewhere)
    (elsewhere / "t.jsonl").write_text(json.dumps({"text": "1 + 2 = 3"}) + "\n")
    shown = cli("eval", "1", "--data", "t.jsonl", "--json")
    assert shown.exit_code == 0, shown.output
    assert json.loads(shown.stdout)["text"]["tokens"] > 0
    assert cli("generate", "1", "--prompt", "1 +", "--max-tokens", "3").exit_code == 0
    shutil.rmtree(work / "tok")
    one_error_line(cli("eval", "1", "--data", "t.jsonl"), "tokenizer 'tok' is neither 'byte' nor a local tokenizer "
                                                         f"directory (a relative path, read from {elsewhere})")
