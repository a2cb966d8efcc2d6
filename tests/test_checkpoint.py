"""Checkpoints: bit-identical round trip, checksums, fallback past a corrupt one."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from engines.architecture.config import ModelConfig
from engines.architecture.model import DecoderLM
from muse_plan.executor import checkpoint

CONFIG = ModelConfig(vocab_size=64, seq_len=16, n_layers=2, d_model=32, n_heads=2, residual="mhc")


def trained_model_and_state() -> tuple[DecoderLM, dict]:
    torch.manual_seed(0)
    model = DecoderLM(CONFIG)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    x = torch.randint(0, 64, (4, 16))
    _, loss = model(x, x)
    loss.backward()
    opt.step()
    return model, {"optimizer": opt.state_dict(), "engine": {"sampler": {"epoch": 1, "cursor": 12}},
                   "rng": checkpoint.rng_state()}


def test_round_trip_is_bit_identical(tmp_path) -> None:
    model, state = trained_model_and_state()
    path = checkpoint.save(tmp_path, 7, model, state, {"revision": 3})
    fresh = DecoderLM(CONFIG)
    loaded, manifest = checkpoint.load(path, fresh)
    for (name, a), (_, b) in zip(model.state_dict().items(), fresh.state_dict().items()):
        assert torch.equal(a, b), name
    assert fresh.lm_head.weight is fresh.tok_emb.weight  # still tied after loading
    assert loaded["step"] == 7 and manifest["revision"] == 3
    assert loaded["engine"] == {"sampler": {"epoch": 1, "cursor": 12}}
    moments = state["optimizer"]["state"][0]["exp_avg"]
    assert torch.equal(loaded["optimizer"]["state"][0]["exp_avg"], moments)


def test_rng_states_restore_every_generator() -> None:
    saved = checkpoint.rng_state()
    expected = (torch.rand(3), random.random(), np.random.rand())
    torch.rand(5), random.random(), np.random.rand()
    checkpoint.set_rng_state(saved)
    again = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(expected[0], again[0]) and expected[1:] == again[1:]


def test_written_atomically_and_pruned(tmp_path) -> None:
    model, state = trained_model_and_state()
    for step in (10, 20, 30, 40):
        checkpoint.save(tmp_path, step, model, state, {}, keep=2)
    (tmp_path / "step-00000050.tmp").mkdir()  # a save that died half-way
    assert [p.name for p in checkpoint.checkpoints(tmp_path)] == ["step-00000040", "step-00000030"]


@pytest.mark.parametrize("damage, why", [
    (lambda p: (p / "model.safetensors").write_bytes((p / "model.safetensors").read_bytes()[:100]),
     "model.safetensors does not match its checksum"),
    (lambda p: (p / "state.pt").unlink(), "state.pt is missing"),
    (lambda p: (p / "manifest.json").write_text("{"), "unreadable manifest"),
])
def test_a_corrupt_newest_checkpoint_falls_back_to_the_one_before(tmp_path, damage, why) -> None:
    model, state = trained_model_and_state()
    checkpoint.save(tmp_path, 10, model, state, {})
    with torch.no_grad():
        model.tok_emb.weight.add_(1.0)
    checkpoint.save(tmp_path, 20, model, state, {})
    damage(tmp_path / "step-00000020")
    fresh = DecoderLM(CONFIG)
    loaded, skipped = checkpoint.load_latest(tmp_path, fresh)
    assert loaded.step == 10
    assert len(skipped) == 1 and why in skipped[0] and "step-00000020" in skipped[0]
    assert torch.allclose(fresh.tok_emb.weight, model.tok_emb.weight - 1.0, atol=1e-6)


def test_no_checkpoint_at_all(tmp_path) -> None:
    assert checkpoint.load_latest(tmp_path / "nothing", DecoderLM(CONFIG)) == (None, [])


def test_weights_of_another_shape_are_refused(tmp_path) -> None:
    model, state = trained_model_and_state()
    path = checkpoint.save(tmp_path, 1, model, state, {})
    other = DecoderLM(ModelConfig(vocab_size=64, seq_len=16, n_layers=2, d_model=32, n_heads=2))
    with pytest.raises(checkpoint.CorruptCheckpoint, match="does the stage's shape match"):
        checkpoint.load_weights(path, other)


def test_manifest_records_checksums_of_both_files(tmp_path) -> None:
    model, state = trained_model_and_state()
    path = checkpoint.save(tmp_path, 3, model, state, {"plan": "p"})
    manifest = json.loads((path / "manifest.json").read_text())
    assert set(manifest["files"]) == {"model.safetensors", "state.pt"}
    assert manifest["plan"] == "p" and manifest["step"] == 3
