"""engines.architecture: the decoder learns in every residual mode, its pure
functions hold their invariants, and its analytic parameter count is exact."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from engines.architecture import RESIDUALS, DecoderLM, ModelConfig, param_count, sinkhorn
from engines.architecture.residual import delta_operator, delta_update

MODES = sorted(RESIDUALS)
TINY = dict(vocab_size=64, seq_len=16, n_layers=2, d_model=32, n_heads=4)


def tiny(residual: str, **overrides: object) -> ModelConfig:
    return ModelConfig(**{**TINY, "residual": residual, **overrides})  # type: ignore[arg-type]


def pattern_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """Arithmetic progressions mod 64: each next token is the previous plus a
    per-row step, learnable from context but not from one token alone."""
    g = torch.Generator().manual_seed(0)
    start = torch.randint(0, 64, (8, 1), generator=g)
    step = torch.randint(1, 8, (8, 1), generator=g)
    seq = (start + step * torch.arange(17)) % 64  # (8, 17)
    return seq[:, :-1], seq[:, 1:]


@pytest.mark.parametrize("residual", MODES)
def test_every_mode_learns_a_pattern_with_finite_gradients(residual: str) -> None:
    torch.manual_seed(0)
    model = DecoderLM(tiny(residual))
    x, y = pattern_batch()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(30):
        _, loss = model(x, y)
        opt.zero_grad()
        loss.backward()
        for name, p in model.named_parameters():
            assert p.grad is not None and torch.isfinite(p.grad).all(), name
        opt.step()
        losses.append(loss.item())
    assert losses[0] > 3.5  # about ln 64 at init
    assert losses[-1] < 0.5 * losses[0], losses


def test_the_loss_trains_and_logits_given_with_it_are_detached() -> None:
    """With targets the loss is what trains: the logits come back detached, so a compiled head's
    backward is not handed their unused (B, T, V) gradient as zeros each step; without targets the
    logits carry the graph (GRPO's log-probabilities backpropagate through them)."""
    model = DecoderLM(tiny("standard"))
    x, y = pattern_batch()
    logits, loss = model(x, y)
    assert not logits.requires_grad and loss.requires_grad and logits.shape == (*x.shape, 64)
    alone, none = model(x)
    assert none is None and alone.requires_grad and torch.allclose(alone.detach(), logits)


@pytest.mark.parametrize("residual", MODES)
@pytest.mark.parametrize("kv_heads", [None, 2, 1])
def test_param_count_is_exact(residual: str, kv_heads: int | None) -> None:
    config = tiny(residual, n_kv_heads=kv_heads, streams=3, d_ff=48)
    model = DecoderLM(config)
    assert param_count(config) == sum(p.numel() for p in model.parameters())


def test_param_count_from_the_scale_table() -> None:
    config = ModelConfig.from_scale("1M", vocab_size=512, seq_len=64, residual="mgt")
    assert (config.n_layers, config.d_model, config.n_heads) == (4, 128, 4)
    assert param_count(config) == sum(p.numel() for p in DecoderLM(config).parameters())
    standard = dataclasses.replace(config, residual="standard")
    assert param_count(config) > param_count(standard)


@pytest.mark.parametrize("residual", MODES)
def test_model_is_causal(residual: str) -> None:
    torch.manual_seed(0)
    model = DecoderLM(tiny(residual)).eval()
    idx = torch.randint(0, 64, (2, 16))
    changed = idx.clone()
    changed[:, 10] = (changed[:, 10] + 1) % 64
    with torch.no_grad():
        a, _ = model(idx)
        b, _ = model(changed)
    assert torch.allclose(a[:, :10], b[:, :10], atol=1e-6)
    assert not torch.allclose(a[:, 10:], b[:, 10:], atol=1e-4)


@pytest.mark.parametrize(("residual", "atol"), [("hc", 1e-5), ("mhc", 1e-2)])
def test_hyper_connections_start_close_to_the_standard_residual(residual: str, atol: float) -> None:
    """hc's init is exactly the standard residual on copied streams; mhc differs
    only by its small dynamic term (alpha = 0.01)."""
    torch.manual_seed(0)
    # the final norm's eps is the one thing that tells n summed copies from one
    standard = DecoderLM(tiny("standard", norm_eps=1e-12)).eval()
    wide = DecoderLM(tiny(residual, norm_eps=1e-12)).eval()
    missing, unexpected = wide.load_state_dict(standard.state_dict(), strict=False)
    assert not unexpected and all("_res." in name for name in missing)
    idx = torch.randint(0, 64, (2, 16))
    with torch.no_grad():
        assert torch.allclose(standard(idx)[0], wide(idx)[0], atol=atol)


def test_sinkhorn_is_doubly_stochastic_and_non_negative() -> None:
    torch.manual_seed(0)
    logits = 0.5 * torch.randn(256, 4, 4)
    p = sinkhorn(logits, iters=20)
    assert (p >= 0).all()
    assert torch.allclose(p.sum(-1), torch.ones(256, 4), atol=1e-5)
    assert torch.allclose(p.sum(-2), torch.ones(256, 4), atol=1e-5)


def test_sinkhorn_gap_on_wider_logits_closes_with_more_iterations() -> None:
    """At logit std 1, 20 iterations (the mHC default) can leave row sums ~1e-4
    off, the finite-iteration gap mHC-lite (arXiv 2601.05732) points out; the
    last step normalises columns, so those stay exact."""
    torch.manual_seed(0)
    logits = torch.randn(256, 4, 4)
    row_gap = lambda iters: (sinkhorn(logits, iters).sum(-1) - 1).abs().max().item()  # noqa: E731
    assert (sinkhorn(logits, 20).sum(-2) - 1).abs().max() < 1e-5
    assert row_gap(60) < 1e-5 < row_gap(5)


def test_sinkhorn_survives_large_logits() -> None:
    p = sinkhorn(torch.tensor([[200.0, 0.0], [0.0, 200.0]]), iters=20)
    assert torch.isfinite(p).all()
    assert torch.allclose(p, torch.eye(2), atol=1e-5)


def _unit(c: int = 8) -> torch.Tensor:
    torch.manual_seed(0)
    return torch.nn.functional.normalize(torch.randn(c), dim=0)


def test_delta_operator_is_identity_at_beta_zero() -> None:
    k = _unit()
    assert torch.allclose(delta_operator(k, 0.0), torch.eye(8))


def test_delta_operator_is_a_reflection_at_beta_two() -> None:
    k = _unit()
    a = delta_operator(k, 2.0)
    assert torch.allclose(a @ a, torch.eye(8), atol=1e-6)
    assert torch.allclose(a @ k, -k, atol=1e-6)
    orthogonal = torch.randn(8)
    orthogonal -= (orthogonal @ k) * k
    assert torch.allclose(a @ orthogonal, orthogonal, atol=1e-6)


def test_delta_operator_is_a_projection_at_beta_one() -> None:
    k = _unit()
    a = delta_operator(k, 1.0)
    assert torch.allclose(a @ a, a, atol=1e-6)
    assert torch.allclose(a @ k, torch.zeros(8), atol=1e-6)


def test_delta_update_equals_operator_plus_write() -> None:
    k, x = _unit(), torch.randn(8)
    beta, v = torch.tensor([0.7]), torch.tensor([1.5])
    expected = delta_operator(k, 0.7) @ x + 0.7 * 1.5 * k
    assert torch.allclose(delta_update(x, k, beta, v), expected, atol=1e-6)


def test_unknown_residual_names_the_accepted_ones() -> None:
    with pytest.raises(ValueError, match="unknown residual 'resnet'.*standard, hc, mhc, ddl, mgt"):
        tiny("resnet")


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"d_model": 30}, "not divisible by n_heads"),
        ({"n_kv_heads": 3}, "n_kv_heads 3"),
        ({"beta_max": 3.0}, "beta_max"),
        ({"n_layers": 0}, "n_layers"),
    ],
)
def test_bad_shapes_are_rejected(overrides: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        tiny("standard", **overrides)


def test_config_imports_no_torch() -> None:
    import subprocess
    import sys

    code = "import sys, engines.architecture.config; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("residual", ["standard", "mhc"])
def test_activation_checkpointing_saves_memory_and_changes_no_gradient(residual: str) -> None:
    config = ModelConfig(vocab_size=64, seq_len=16, n_layers=2, d_model=32, n_heads=2, residual=residual)
    torch.manual_seed(0)
    model = DecoderLM(config)
    x = torch.randint(0, 64, (4, 16))
    grads, saved = {}, {}
    for mode in ("none", "selective", "full"):
        model.set_checkpointing(mode)
        model.zero_grad()
        sizes: list[int] = []

        def pack(t: torch.Tensor) -> torch.Tensor:
            sizes.append(t.numel() * t.element_size())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            _, loss = model(x, x)
        loss.backward()
        grads[mode] = [p.grad.clone() for p in model.parameters()]
        saved[mode] = sum(sizes)
    for mode in ("selective", "full"):
        assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(grads["none"], grads[mode]))
    assert saved["full"] < saved["selective"] < saved["none"]


def test_unknown_checkpointing_mode_is_refused() -> None:
    model = DecoderLM(ModelConfig(vocab_size=64, seq_len=16, n_layers=1, d_model=32, n_heads=2))
    with pytest.raises(ValueError, match="accepted: none, selective, full"):
        model.set_checkpointing("some")
