"""The growth engine's operators on tiny decoders of every residual mode: exact
function preservation, grown parameter counts, layer orders, Net2Net's copies,
context extension, LiGO, training after growth, and the refusals."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from engines.architecture.config import RESIDUAL_NAMES, ModelConfig, param_count
from engines.architecture.model import DecoderLM
from engines.growth import ligo
from engines.growth.context import extend_context
from engines.growth.depth import deepen
from engines.growth.operators import grow
from engines.growth.schedule import GrowSettings, check_growth, compound_shapes, grow_settings
from engines.growth.stage import n_params
from engines.growth.width import widen
from engines.architecture.shapes import Shape, swiglu_hidden

pytestmark = pytest.mark.usefixtures("one_thread")


def config(residual: str = "standard", **changes) -> ModelConfig:
    base = ModelConfig(vocab_size=64, seq_len=16, n_layers=2, d_model=32, n_heads=4, n_kv_heads=2,
                       residual=residual, streams=2, sinkhorn_iters=5)
    return replace(base, **changes)


def trained_like(c: ModelConfig, seed: int = 0) -> DecoderLM:
    """Every parameter moved well off its init: at init many residual branches are
    near the identity, which would make a preservation test too easy to pass."""
    torch.manual_seed(seed)
    model = DecoderLM(c)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    return model.eval()


def tokens(batch: int = 3, length: int = 16, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 64, (batch, length), generator=torch.Generator().manual_seed(seed))


def counting_batches(seed: int = 0, batch: int = 8, length: int = 17):
    """Sequences x_{t+1} = x_t + k (mod 64), k ∈ {1, 2, 3} per sequence: learnable in tens of steps."""
    g = torch.Generator().manual_seed(seed)

    def next_batch() -> tuple[torch.Tensor, torch.Tensor]:
        start = torch.randint(0, 64, (batch, 1), generator=g)
        step = torch.randint(1, 4, (batch, 1), generator=g)
        seq = (start + step * torch.arange(length)) % 64
        return seq[:, :-1], seq[:, 1:]
    return next_batch


def train(model: DecoderLM, batches, steps: int, lr: float = 3e-3) -> list[float]:
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1)
    losses = []
    for _ in range(steps):
        _, loss = model(*batches())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


TARGETS = {
    "g_stack": dict(n_layers=8),  # g = 4, the paper's recommendation
    "layer_dup": dict(n_layers=5),
    "net2net": dict(d_model=48, n_heads=6, n_kv_heads=3, d_ff=150),
    "compound": dict(n_layers=4, d_model=64, n_heads=8, n_kv_heads=4),
}


@pytest.mark.parametrize("operator", list(TARGETS))
@pytest.mark.parametrize("residual", RESIDUAL_NAMES)
def test_function_preserving_growth_keeps_the_logits_and_reaches_the_target_shape(residual, operator) -> None:
    small = trained_like(config(residual))
    target = replace(small.config, **TARGETS[operator])
    grown = grow(small, target, GrowSettings(operator=operator, function_preserving=True)).model.eval()
    x = tokens()
    with torch.no_grad():
        before, after = small(x)[0], grown(x)[0]
    assert before.abs().max() > 1.0  # logits worth comparing
    assert (after - before).abs().max().item() < 1e-5
    assert n_params(grown) == param_count(target)
    assert (grown.config.n_layers, grown.config.d_model, grown.config.n_heads, grown.config.kv_heads,
            grown.config.ffn_dim) == (target.n_layers, target.d_model, target.n_heads, target.kv_heads,
                                      target.ffn_dim)


def block(model: DecoderLM, i: int) -> dict[str, torch.Tensor]:
    return model.blocks[i].state_dict()


def test_g_stack_stacks_the_whole_model_in_order_and_plain_copies_change_the_function() -> None:
    small = trained_like(config("mhc", n_layers=3))
    grown = deepen(small, 12, "stack").eval()
    for layer in range(12):  # layers 1, 2, 3, 1, 2, 3, ... (Du et al.)
        for name, value in block(grown, layer).items():
            assert torch.equal(value, block(small, layer % 3)[name]), (layer, name)
    with torch.no_grad():
        assert (grown(tokens())[0] - small(tokens())[0]).abs().max() > 1e-2


def test_layer_dup_repeats_each_layer_in_place() -> None:
    small = trained_like(config(n_layers=2))
    grown = deepen(small, 5, "dup")
    sources = [0, 0, 0, 1, 1]
    for layer, source in enumerate(sources):
        assert torch.equal(grown.blocks[layer].attn.wq.weight, small.blocks[source].attn.wq.weight)


@pytest.mark.parametrize("residual", ["hc", "mhc", "mgt"])
def test_new_blocks_are_identity_connections_with_zeroed_outputs(residual) -> None:
    small = trained_like(config(residual))
    grown = deepen(small, 4, "stack", function_preserving=True)
    first, new = grown.blocks[1], grown.blocks[3]  # block 3 is the second copy of block 1
    assert torch.equal(first.attn.wq.weight, new.attn.wq.weight)  # the rest is a copy
    assert first.attn.wo.weight.abs().sum() > 0
    assert new.attn.wo.weight.abs().sum() == 0 and new.mlp.w_down.weight.abs().sum() == 0
    x = torch.randn(2, 5, 2, 32)
    if residual == "hc":
        assert torch.equal(new.attn_res.a_r, torch.eye(2)) and new.attn_res.w_r.abs().sum() == 0
    else:
        _, _, h_res = new.attn_res.maps(x)
        assert (h_res - torch.eye(2)).abs().max() < 1e-7


def test_net2net_copies_heads_and_units_and_splits_what_they_write() -> None:
    small = trained_like(config(n_kv_heads=None))
    target = replace(small.config, d_model=64, n_heads=8, n_kv_heads=None, d_ff=2 * small.config.ffn_dim)
    grown = widen(small, target)
    hd, d = 8, 32
    s_attn, g_attn = small.blocks[0].attn, grown.blocks[0].attn
    # the first heads keep their incoming weights in the old columns; new columns read zero channels
    assert torch.equal(g_attn.wq.weight[: 4 * hd, :d], s_attn.wq.weight)
    # each small head now appears twice; the copies' wo columns sum to the small head's
    wo = g_attn.wo.weight[:d].view(d, 8, hd)
    src = torch.stack([g_attn.wq.weight[h * hd:(h + 1) * hd, :d] for h in range(8)])
    for head in range(4):
        copies = [h for h in range(8) if torch.equal(src[h], s_attn.wq.weight[head * hd:(head + 1) * hd])]
        assert len(copies) == 2
        assert torch.allclose(wo[:, copies].sum(1), s_attn.wo.weight.view(d, 4, hd)[:, head], atol=1e-7)
    assert g_attn.wo.weight[d:].abs().sum() == 0  # nothing is written into the new channels yet
    assert grown.blocks[0].mlp.w_down.weight[d:].abs().sum() == 0
    assert grown.tok_emb.weight[:, d:].abs().sum() == 0
    assert grown.config.norm_eps == pytest.approx(small.config.norm_eps * 32 / 64)


def test_symmetry_noise_moves_only_the_copies_and_only_slightly() -> None:
    small = trained_like(config())
    target = replace(small.config, d_ff=2 * small.config.ffn_dim)
    exact = widen(small, target, noise=0.0)
    noisy = widen(small, target, noise=0.01).eval()
    f = small.config.ffn_dim
    w_exact, w_noisy = exact.blocks[0].mlp.w_gate.weight, noisy.blocks[0].mlp.w_gate.weight
    assert torch.equal(w_noisy[:f], w_exact[:f])  # originals untouched
    assert not torch.equal(w_noisy[f:], w_exact[f:])  # copies moved
    with torch.no_grad():
        gap = (noisy(tokens())[0] - small(tokens())[0]).abs().max().item()
    assert 1e-5 < gap < 0.1


@pytest.mark.parametrize("residual", RESIDUAL_NAMES)
def test_training_continues_after_growth_with_finite_falling_loss(residual) -> None:
    torch.manual_seed(0)
    small = DecoderLM(config(residual))
    batches = counting_batches()
    train(small, batches, 25)
    grown = grow(small, replace(small.config, n_layers=4), GrowSettings(function_preserving=True)).model
    losses = train(grown, batches, 25)
    assert all(math.isfinite(v) for v in losses)
    assert sum(losses[-5:]) / 5 < losses[0] - 0.3
    assert grown.blocks[3].attn.wo.weight.abs().sum() > 0  # the zeroed projections learned


def test_context_extension_keeps_short_inputs_or_interpolates_positions() -> None:
    small = trained_like(config())
    same = extend_context(small, 32, rope="none").eval()
    with torch.no_grad():
        assert (same(tokens())[0] - small(tokens())[0]).abs().max() < 1e-6
    longer = tokens(length=32)
    assert same(longer)[0].shape == (3, 32, 64)
    linear = extend_context(small, 32, rope="linear")
    assert linear.config.rope_scale == 2.0
    assert torch.allclose(linear.rope_cos[2 * 5], small.rope_cos[5], atol=1e-6)  # position 10 turns like 5
    ntk = extend_context(small, 64, rope="ntk")
    assert ntk.config.rope_theta == pytest.approx(10000 * 4 ** (8 / 6))
    with pytest.raises(ValueError, match="can't shorten"):
        extend_context(small, 8)


def test_ligo_starts_at_stacking_and_net2net_and_fitting_lowers_the_loss() -> None:
    small = trained_like(config("mhc"))
    deeper = replace(small.config, n_layers=4)
    op = ligo.LigoOperator(small, deeper, noise=0.0)
    stacked = deepen(small, 4, "stack").state_dict()
    for key, value in op.grown_state().items():
        assert torch.equal(value, stacked[key]), key
    wider = replace(small.config, d_model=48, n_heads=6, n_kv_heads=3, d_ff=150)
    at_init = ligo.apply(ligo.LigoOperator(small, wider, noise=0.0)).eval()
    with torch.no_grad():  # at equal depth the initial operator is Net2Net: the function is kept
        assert (at_init(tokens())[0] - small(tokens())[0]).abs().max() < 1e-5

    torch.manual_seed(0)
    learner = DecoderLM(config())
    batches = counting_batches()
    train(learner, batches, 20)
    target = replace(learner.config, n_layers=4, d_model=48, n_heads=6, n_kv_heads=3)
    grown = grow(learner, target, GrowSettings(operator="ligo", fit_steps=30, fit_lr=1e-2), batches)
    assert sum(grown.fit_losses[-5:]) < sum(grown.fit_losses[:5])
    assert n_params(grown.model) == param_count(target)
    with torch.no_grad():
        _, loss = grown.model(*batches())
    assert math.isfinite(loss.item()) and loss.item() < grown.fit_losses[0]


@pytest.mark.parametrize("operator, changes, message", [
    ("g_stack", dict(d_model=64, n_heads=8), "g_stack grows depth only"),
    ("net2net", dict(n_layers=4), "net2net grows width only"),
    ("net2net", dict(d_model=64), "keeps the head size"),
    ("compound", dict(n_layers=1), "can't shrink"),
    ("g_stack", dict(residual="mhc"), "growth keeps residual"),
    ("ligo", dict(seq_len=8), "can't shorten the context"),
    ("stretch", dict(n_layers=4), "unknown growth operator 'stretch'"),
])
def test_growth_an_operator_cannot_make_is_refused(operator, changes, message) -> None:
    with pytest.raises(ValueError, match=message):
        check_growth(operator, config(), replace(config(), **changes))


@pytest.mark.parametrize("options, message", [
    ({"operator": "ligo", "optimizer_state": "mapped"}, "'mapped' does not work with ligo"),
    ({"operator": "ligo", "function_preserving": True}, "ligo learns its operator"),
    ({"warp": 2}, "unknown growth option 'warp'"),
    ({"rope": "yarn"}, "growth rope 'yarn'"),
])
def test_bad_growth_options_are_refused(options, message) -> None:
    with pytest.raises(ValueError, match=message):
        grow_settings(options)


def test_growth_options_from_the_plan_parse_with_their_defaults() -> None:
    s = grow_settings({"operator": "ligo", "factor": 4, "at_fraction": 0.25, "rewarm_fraction": 0.02,
                       "function_preserving": False, "optimizer_state": "fresh"})
    assert (s.operator, s.trains, s.symmetry_noise) == ("ligo", 200, 0.01)
    assert grow_settings({"function_preserving": True}).symmetry_noise == 0.0
    assert grow_settings({}).trains == 0  # the copying operators take no steps


def test_compound_shapes_keep_the_head_size_between_the_ends() -> None:
    small, target = Shape(6, 512, 8, 8, swiglu_hidden(512)), Shape(12, 768, 12, 12, swiglu_hidden(768))
    shapes = compound_shapes(small, target, steps=2)
    assert shapes[0] == small and shapes[-1] == target
    mid = shapes[1]
    assert (mid.layers, mid.d_model, mid.n_heads) == (9, 640, 10)  # Gu et al.'s middle: (8, 640, 10)
    assert mid.d_model // mid.n_heads == 64


HEAD_DIM = 8
HEADS = [(h, kv) for h in (1, 2, 4, 6, 8) for kv in range(1, h + 1) if h % kv == 0]  # (query, key/value)


@pytest.mark.parametrize("residual", ["standard", "mhc"])
def test_net2net_keeps_the_function_for_every_gqa_change_the_growth_check_accepts(residual) -> None:
    """Every (query heads, key/value heads) → (more or as many of each) at a fixed head size,
    4 query heads on 1 key/value head → 4 on 4 among them: either the growth check refuses it
    with the reason, or the grown model computes what the small one did within 1e-5."""
    grown_ok = refused = 0
    for (h, kv) in HEADS:
        small_cfg = config(residual, d_model=h * HEAD_DIM, n_heads=h, n_kv_heads=kv)
        small = trained_like(small_cfg)
        x = tokens()
        with torch.no_grad():
            before = small(x)[0]
        for (h2, kv2) in HEADS:
            if h2 < h or kv2 < kv or (h2, kv2) == (h, kv):
                continue
            target = replace(small_cfg, d_model=h2 * HEAD_DIM, n_heads=h2, n_kv_heads=kv2)
            try:
                check_growth("net2net", small_cfg, target)
            except ValueError as exc:
                assert "can't keep the function" in str(exc)
                refused += 1
                continue
            grown = grow(small, target, GrowSettings(operator="net2net", function_preserving=True)).model.eval()
            with torch.no_grad():
                diff = (grown(x)[0] - before).abs().max().item()
            assert diff <= 1e-5, ((h, kv), (h2, kv2), diff)
            grown_ok += 1
    assert grown_ok >= 40 and refused >= 1  # 4q/1kv → 4q/4kv is among those grown; 8q/2kv → 6q/3kv refused


def test_ligos_fit_clips_its_gradient_and_stops_on_a_non_finite_loss() -> None:
    small = trained_like(config())
    target = replace(small.config, n_layers=4)
    batch = counting_batches()()
    clipped = grow(small, target, GrowSettings(operator="ligo", fit_steps=3, fit_lr=1e-2, fit_clip=1e-6),
                   lambda: batch)
    free = grow(small, target, GrowSettings(operator="ligo", fit_steps=3, fit_lr=1e-2), lambda: batch)
    assert clipped.fit_losses[0] == pytest.approx(free.fit_losses[0])  # the same start
    assert abs(clipped.fit_losses[-1] - clipped.fit_losses[0]) < abs(free.fit_losses[-1] - free.fit_losses[0])
    with torch.no_grad():
        small.tok_emb.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="LiGO's operator fit: loss is nan at fit step 1; lower fit_lr"):
        grow(small, target, GrowSettings(operator="ligo", fit_steps=2), lambda: batch)
