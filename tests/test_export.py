"""``muse export``: a muse decoder as a Hugging Face Llama folder that computes the same
logits, its tokenizer encoding as muse's does, LoRA merged, what Llama can't say refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from engines.architecture.config import ModelConfig
from engines.architecture.model import DecoderLM, apply_rope, rope_cache
from engines.data.tokenizer import ByteTokenizer, HFTokenizer
from muse_plan.errors import Conflict, PlanError
from muse_plan.export import rope_permutation, to_hf
from tests.conftest import TINY_STANDARD, one_error_line, pretrain, write_plan

pytestmark = pytest.mark.usefixtures("one_thread")

TEXTS = ["hello, world", "こんにちは", "0123456789 + 42 = ?", "tab\there\nnew line é ü ß 😀"]


def decoder(seed: int = 0, **shape) -> DecoderLM:
    """A random decoder whose weights are far from init (norms and all), so every mapping counts."""
    torch.manual_seed(seed)
    fields = {"vocab_size": 260, "seq_len": 48, "n_layers": 2, "d_model": 32, "n_heads": 4, **shape}
    model = DecoderLM(ModelConfig(**fields)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    return model


def hf_logits(folder: Path, ids: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    assert type(model).__name__ == "LlamaForCausalLM"
    with torch.no_grad():
        return model(ids).logits


def muse_logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids)[0]


def test_the_permutation_turns_interleaved_pairs_into_rotated_halves() -> None:
    """Llama's rotate_half on the permuted head = muse's rotation of interleaved pairs, permuted."""
    hd, T = 8, 5
    cos, sin = rope_cache(T, hd, 10000.0, 2.0)
    x = torch.randn(1, 1, T, hd)
    perm = rope_permutation(hd)
    y = x[..., perm]
    c, s = torch.cat((cos, cos), -1), torch.cat((sin, sin), -1)
    half = torch.cat((-y[..., hd // 2:], y[..., : hd // 2]), -1)
    assert torch.allclose(y * c + half * s, apply_rope(x, cos, sin)[..., perm], atol=1e-6)


@pytest.mark.parametrize("shape, tied", [
    ({}, True),
    ({"n_kv_heads": 2, "rope_scale": 2.5, "rope_theta": 500.0, "norm_eps": 1e-5}, True),  # GQA, scaled rope
    ({"n_layers": 3, "d_model": 48, "n_heads": 6, "n_kv_heads": 1, "d_ff": 80}, False),  # MQA, untied head
    ({"n_layers": 1, "d_model": 64, "n_heads": 2, "rope_scale": 4.0}, False),
])
def test_the_exported_llama_computes_muses_logits(tmp_path, shape, tied) -> None:
    model = decoder(**shape)
    if not tied:
        model.lm_head.weight = torch.nn.Parameter(torch.randn_like(model.tok_emb.weight) * 0.3)
    out = to_hf(model, ByteTokenizer(), tmp_path / "hf")
    config = json.loads((out / "config.json").read_text())
    assert config["tie_word_embeddings"] is tied
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json", "generation_config.json", "model.safetensors", "special_tokens_map.json",
        "tokenizer.json", "tokenizer_config.json"]
    ids = torch.randint(0, 260, (2, 40), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(hf_logits(out, ids), muse_logits(model, ids), atol=1e-5, rtol=0)


def test_lora_adapters_are_merged(tmp_path) -> None:
    """A LoRA stage's checkpoint loaded into a plain model (load_into merges) exports to the
    adapted model's logits; so does the adapted model itself."""
    from engines.grpo.policy import LoraSettings, add_lora
    from muse_plan.executor import checkpoint

    model = decoder(n_kv_heads=2)
    lora = LoraSettings(rank=4, alpha=8.0, target_modules=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                           "up_proj", "down_proj"), layers_fraction=1.0)
    add_lora(model, lora)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.3)
    ids = torch.randint(0, 260, (2, 32), generator=torch.Generator().manual_seed(2))
    adapted = muse_logits(model, ids)
    saved = checkpoint.save(tmp_path / "stage", 5, model, {}, {"lora_scaling": lora.scaling})
    plain = DecoderLM(model.config).eval()
    checkpoint.load_weights(saved, plain)
    assert (muse_logits(plain, ids) - adapted).abs().max() < 1e-4
    merged = to_hf(plain, ByteTokenizer(), tmp_path / "merged")
    torch.testing.assert_close(hf_logits(merged, ids), muse_logits(plain, ids), atol=1e-5, rtol=0)
    direct = to_hf(model, ByteTokenizer(), tmp_path / "direct")
    torch.testing.assert_close(hf_logits(direct, ids), adapted, atol=1e-5, rtol=0)


def test_the_byte_tokenizer_encodes_and_decodes_as_muses(tmp_path) -> None:
    from transformers import AutoTokenizer

    muse = ByteTokenizer()
    out = to_hf(decoder(), muse, tmp_path / "hf")
    hf = AutoTokenizer.from_pretrained(out)
    for text in TEXTS:
        ids = hf.encode(text)
        assert ids == muse.encode(text), text
        assert hf.decode(ids) == text == muse.decode(ids)
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (muse.bos_id, muse.eos_id, muse.pad_id)
    assert hf.convert_tokens_to_ids("<|sep|>") == muse.sep_id and len(hf) == muse.vocab_size
    assert hf.decode([muse.bos_id, *muse.encode("ok"), muse.eos_id], skip_special_tokens=True) == "ok"
    generation = json.loads((out / "generation_config.json").read_text())
    assert generation == {"bos_token_id": 256, "eos_token_id": 257, "pad_token_id": 258}
    # muse reads the folder back as a tokenizer directory, its specials found
    again = HFTokenizer(out)
    assert (again.eos_id, again.bos_id, again.pad_id) == (257, 256, 258)
    assert again.encode_batch(TEXTS) == muse.encode_batch(TEXTS)


def test_a_hugging_face_tokenizer_directory_is_copied(tmp_path) -> None:
    from transformers import AutoTokenizer

    source = to_hf(decoder(), ByteTokenizer(), tmp_path / "source")
    (source / "README.md").write_text("not a tokenizer file")
    out = to_hf(decoder(seed=1), HFTokenizer(source), tmp_path / "copied")
    assert not (out / "README.md").exists()
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        assert (out / name).read_bytes() == (source / name).read_bytes()
    assert AutoTokenizer.from_pretrained(out).encode(TEXTS[1]) == ByteTokenizer().encode(TEXTS[1])


def test_a_hugging_face_model_is_saved_with_its_adapters_merged(tmp_path) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from muse_plan.export import hf_to_hf

    source = to_hf(decoder(), ByteTokenizer(), tmp_path / "source")
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    peft = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.3)
    ids = torch.randint(0, 260, (2, 24), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        adapted = peft.eval()(ids).logits
    out = hf_to_hf(peft, HFTokenizer(source), tmp_path / "out")
    assert not list(out.glob("adapter_*")) and (out / "tokenizer.json").exists()
    torch.testing.assert_close(hf_logits(out, ids), adapted, atol=1e-5, rtol=0)


@pytest.mark.parametrize("residual", ["mhc", "ddl"])
def test_a_model_beyond_the_standard_residual_is_refused(tmp_path, residual) -> None:
    model = DecoderLM(ModelConfig(vocab_size=260, seq_len=16, n_layers=1, d_model=16, n_heads=2,
                                  residual=residual, streams=2))
    with pytest.raises(PlanError) as caught:
        to_hf(model, ByteTokenizer(), tmp_path / "hf")
    message = str(caught.value)
    assert "\n" not in message and "export supports the standard residual" in message
    assert "one residual stream" in message
    assert not (tmp_path / "hf").exists()


def test_a_non_empty_folder_is_refused_unless_forced(tmp_path) -> None:
    out = tmp_path / "hf"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    (out / "model-00001-of-00002.safetensors").write_text("stale")
    with pytest.raises(Conflict, match="is not empty"):
        to_hf(decoder(), ByteTokenizer(), out)
    assert sorted(p.name for p in out.iterdir()) == ["model-00001-of-00002.safetensors", "notes.txt"]
    to_hf(decoder(), ByteTokenizer(), out, force=True)
    names = {p.name for p in out.iterdir()}
    assert "notes.txt" in names and "model.safetensors" in names
    assert "model-00001-of-00002.safetensors" not in names  # stale weights would shadow the new ones
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".hf.export-")]


# ---- the command, end to end on a trained run ------------------------------------------------

PLAN = {**TINY_STANDARD, "stages": pretrain(3, 3),
        "training": {**TINY_STANDARD["training"], "micro_batch": 2, "grad_accum": 1, "warmup_steps": 1}}

# the folder loaded by transformers alone: muse can't be imported in this interpreter
LOAD_WITHOUT_MUSE = """
import sys
class NoMuse:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('muse_plan', 'engines'):
            raise ImportError('muse is not installed here')
sys.meta_path.insert(0, NoMuse())
import json, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
folder, text = sys.argv[1], sys.argv[2]
model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
ids = AutoTokenizer.from_pretrained(folder).encode(text)
with torch.no_grad():
    logits = model(torch.tensor([ids])).logits[0]
print(json.dumps({"ids": ids, "logits": logits.tolist(), "class": type(model).__name__}))
"""


def test_muse_export_writes_a_folder_transformers_loads_alone(cli, tmp_path) -> None:
    import subprocess
    import sys

    from muse_plan.trained import open_trained

    assert cli("plan", "import", write_plan(tmp_path, PLAN)).exit_code == 0
    ran = cli("plan", "run", "tiny")
    assert ran.exit_code == 0, ran.output
    out = tmp_path / "exported"
    result = cli("export", "1", "--stage", "pretrain", "-o", out)
    assert result.exit_code == 0, result.output
    assert "LlamaForCausalLM" in result.output and "model.safetensors" in result.output
    assert f"AutoModelForCausalLM.from_pretrained('{out.resolve()}')" in result.output

    text = "12 + 30 = 42"
    loaded = subprocess.run([sys.executable, "-I", "-c", LOAD_WITHOUT_MUSE, str(out), text],
                            cwd=tmp_path, capture_output=True, text=True)
    assert loaded.returncode == 0, loaded.stderr
    got = json.loads(loaded.stdout.strip().splitlines()[-1])
    assert got["class"] == "LlamaForCausalLM" and got["ids"] == ByteTokenizer().encode(text)
    trained = open_trained("1", stage="pretrain")
    expected = muse_logits(trained.model.float().eval(), torch.tensor([got["ids"]]))[0]
    torch.testing.assert_close(torch.tensor(got["logits"]), expected, atol=1e-5, rtol=0)

    one_error_line(cli("export", "1", "-o", out), "is not empty")
    forced = cli("export", "1", "-o", out, "--force", "--json")
    assert forced.exit_code == 0, forced.output
    data = json.loads(forced.output)
    assert data["architecture"] == "LlamaForCausalLM" and data["kind"] == "muse"
    assert {f["name"] for f in data["files"]} >= {"config.json", "model.safetensors", "tokenizer.json"}


def test_muse_export_of_a_hugging_face_folder_saves_it_as_it_is(cli, tmp_path) -> None:
    from transformers import AutoTokenizer

    source = to_hf(decoder(n_kv_heads=2), ByteTokenizer(), tmp_path / "source")
    result = cli("export", source, "-o", tmp_path / "again", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["kind"] == "hf" and data["architecture"] == "LlamaForCausalLM"
    ids = torch.randint(0, 260, (1, 20), generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(hf_logits(tmp_path / "again", ids), hf_logits(source, ids), atol=1e-6, rtol=0)
    assert AutoTokenizer.from_pretrained(tmp_path / "again").encode(TEXTS[1]) == ByteTokenizer().encode(TEXTS[1])


def test_muse_export_refuses_an_mhc_model_in_one_line(cli, tmp_path, monkeypatch) -> None:
    from types import SimpleNamespace

    from muse_plan import trained

    model = DecoderLM(ModelConfig(vocab_size=260, seq_len=16, n_layers=1, d_model=16, n_heads=2,
                                  residual="mhc", streams=2))
    opened = SimpleNamespace(model=model, tokenizer=ByteTokenizer(), kind="muse", source="run 1, stage pretrain",
                             config=model.config)
    monkeypatch.setattr(trained, "open_trained", lambda *a, **kw: opened)
    one_error_line(cli("export", "1", "-o", tmp_path / "out"), "export supports the standard residual")
    assert not (tmp_path / "out").exists()
