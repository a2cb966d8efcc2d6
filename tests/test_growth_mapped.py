"""``optimizer_state: mapped``: AdamW's moments carried through the growth operator.

Depth: each grown block holds exactly its source block's moments. Width: the
mapped first moment of a gradient is the grown model's own gradient on the
same batch, for every residual mode (the rules of ``width.py``'s docstring).
In a run: the grow stage's checkpoint holds them by name, the continue stage's
optimizer starts from them (checked through AdamW's own update of its
moments), training goes on with a finite falling loss, and a continue stage
cut before its first checkpoint restarts from the mapped state exactly."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from engines.growth.depth import ZEROED
from engines.growth.operators import grow, grow_moments
from engines.growth.schedule import GrowSettings
from muse_plan.errors import RunInterrupted
from muse_plan.executor.runner import run_plan
from test_growth import config, counting_batches, trained_like
from test_growth_stage import PLAN, StopAt, messages, series, write

pytestmark = pytest.mark.usefixtures("one_thread")

KINDS = ("exp_avg", "exp_avg_sq", "step")


def random_moments(model: torch.nn.Module, seed: int = 0) -> dict[str, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return {name: {"exp_avg": torch.randn(p.shape, generator=g), "exp_avg_sq": torch.rand(p.shape, generator=g),
                   "step": torch.tensor(float(7 + i))} for i, (name, p) in enumerate(model.named_parameters())}


def block_moments(moments: dict, layer: int) -> dict[str, dict[str, torch.Tensor]]:
    prefix = f"blocks.{layer}."
    return {k[len(prefix):]: v for k, v in moments.items() if k.startswith(prefix)}


@pytest.mark.parametrize("operator, n_layers, sources", [
    ("g_stack", 6, [0, 1, 0, 1, 0, 1]),
    ("layer_dup", 5, [0, 0, 0, 1, 1]),
])
@pytest.mark.parametrize("residual", ["standard", "mhc"])
def test_each_grown_block_takes_the_moments_of_the_block_it_copies(operator, n_layers, sources, residual) -> None:
    small = trained_like(config(residual))
    moments = random_moments(small)
    target = config(residual, n_layers=n_layers)
    mapped = grow_moments(moments, small, target, GrowSettings(operator=operator))
    grown = grow(small, target, GrowSettings(operator=operator)).model
    assert set(mapped) == {name for name, _ in grown.named_parameters()}  # every parameter has moments
    for layer, source in enumerate(sources):
        got, want = block_moments(mapped, layer), block_moments(moments, source)
        assert set(got) == set(want)
        for name in want:
            for kind in KINDS:
                assert torch.equal(got[name][kind], want[name][kind]), (layer, name, kind)
    assert torch.equal(mapped["tok_emb.weight"]["exp_avg"], moments["tok_emb.weight"]["exp_avg"])


def test_function_preserving_depth_growth_starts_the_rewritten_parameters_fresh() -> None:
    small = trained_like(config("mhc"))
    moments = random_moments(small)
    mapped = grow_moments(moments, small, config("mhc", n_layers=4),
                          GrowSettings(operator="g_stack", function_preserving=True))
    rewritten = {*ZEROED, *(f"{c}.maps.{k}" for c in ("attn_res", "mlp_res") for k in ("alpha", "b_res"))}
    for layer in (0, 1):  # first copies: everything, as the source
        assert set(block_moments(mapped, layer)) == set(block_moments(moments, layer))
    for layer in (2, 3):  # identity blocks: the untouched parameters keep the source's, the rewritten start fresh
        got = block_moments(mapped, layer)
        assert set(got) == set(block_moments(moments, layer - 2)) - rewritten
        source = moments[f"blocks.{layer - 2}.attn.wq.weight"]
        assert torch.equal(got["attn.wq.weight"]["exp_avg_sq"], source["exp_avg_sq"])


def gradients(model: torch.nn.Module, batch) -> dict[str, torch.Tensor]:
    model.train()
    model.zero_grad()
    _, loss = model(*batch)
    loss.backward()
    return {name: p.grad.detach().clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("residual", ["standard", "hc", "mhc", "ddl", "mgt"])
@pytest.mark.parametrize("width", [
    dict(d_model=48, n_heads=6, n_kv_heads=3, d_ff=150),  # groups of 2 stay groups of 2
    dict(d_model=64, n_heads=8, n_kv_heads=2, d_ff=170),  # groups of 2 become groups of 4
])
def test_widened_moments_are_what_the_grown_model_would_have_seen(residual, width) -> None:
    """A gradient mapped as a first moment equals the grown model's gradient on the same
    batch wherever the map claims to know it; its square is the mapped second moment."""
    small = trained_like(config(residual))
    batch = counting_batches(length=17)()
    g = gradients(small, batch)
    settings = GrowSettings(operator="net2net", noise=0.0)
    target = config(residual, **width)
    as_moments = {n: {"exp_avg": t, "exp_avg_sq": t * t, "step": torch.tensor(5.0)} for n, t in g.items()}
    ones = {n: {"exp_avg": torch.ones_like(t), "exp_avg_sq": torch.ones_like(t), "step": torch.tensor(5.0)}
            for n, t in g.items()}
    mapped = grow_moments(as_moments, small, target, settings)
    known = grow_moments(ones, small, target, settings)
    grown = gradients(grow(small, target, settings).model, batch)
    scale = max(t.abs().max().item() for t in grown.values())  # some paths run in fp32 whatever the dtype
    compared = 0
    for name, actual in grown.items():
        mask = known[name]["exp_avg"] != 0
        assert torch.allclose(mapped[name]["exp_avg"][mask], actual[mask], rtol=0, atol=1e-5 * scale), name
        assert torch.allclose(mapped[name]["exp_avg_sq"], mapped[name]["exp_avg"] ** 2, rtol=1e-5, atol=1e-20)
        assert mapped[name]["step"] == 5.0
        compared += int(mask.sum())
    assert compared >= sum(t.numel() for t in g.values())  # every small entry reaches at least one grown one


def test_a_copied_units_incoming_moments_are_divided_and_outgoing_kept() -> None:
    small = trained_like(config())
    moments = random_moments(small)
    target = config(d_ff=small.config.ffn_dim + 10)  # ten MLP units copied once each
    settings = GrowSettings(operator="net2net", noise=0.0)
    mapped = grow_moments(moments, small, target, settings)
    from engines.growth.width import width_map, widened_config

    m = width_map(small.config, widened_config(small.config, target), 0.0, settings.seed)
    extra = m.ff_src[small.config.ffn_dim:]  # the sources of the ten copies, each now counted twice
    up, down = moments["blocks.1.mlp.w_up.weight"], moments["blocks.1.mlp.w_down.weight"]
    got_up, got_down = mapped["blocks.1.mlp.w_up.weight"], mapped["blocks.1.mlp.w_down.weight"]
    assert torch.allclose(got_up["exp_avg"][small.config.ffn_dim:], up["exp_avg"][extra] / 2)
    assert torch.allclose(got_up["exp_avg"][extra], up["exp_avg"][extra] / 2)  # the original too
    assert torch.allclose(got_up["exp_avg_sq"][extra], up["exp_avg_sq"][extra] / 4)
    assert torch.equal(got_down["exp_avg"][:, small.config.ffn_dim:], down["exp_avg"][:, extra])


def test_compound_moments_are_width_then_depth() -> None:
    small = trained_like(config("hc"))
    moments = random_moments(small)
    wide = config("hc", d_model=64, n_heads=8, n_kv_heads=4)
    both = config("hc", n_layers=4, d_model=64, n_heads=8, n_kv_heads=4)
    widened = grow_moments(moments, small, wide, GrowSettings(operator="net2net"))
    compound = grow_moments(moments, small, both, GrowSettings(operator="compound"))
    for layer in range(4):
        got, want = block_moments(compound, layer), block_moments(widened, layer % 2)
        assert set(got) == set(want)
        assert all(torch.equal(got[n]["exp_avg_sq"], want[n]["exp_avg_sq"]) for n in want)


@pytest.mark.parametrize("options, message", [
    ({"operator": "ligo", "optimizer_state": "mapped"},
     "growth optimizer_state 'mapped' does not work with ligo: it learns its operator"),
    ({"optimizer_state": "carried"}, "growth optimizer_state 'carried': accepted fresh, mapped"),
])
def test_mapped_moments_are_refused_where_they_cannot_be_carried(options, message) -> None:
    with pytest.raises(ValueError) as exc:
        GrowSettings(**options)
    assert message in str(exc.value)
    if options.get("operator") == "ligo":
        assert str(exc.value).endswith("or one of g_stack, layer_dup, net2net, compound")


# ---- in a run ------------------------------------------------------------------------

BETA1, BETA2 = 0.9, 0.95  # the executor's AdamW (optimizers.BETAS)
MAPPED_PLAN = {
    **PLAN,
    "techniques": {**PLAN["techniques"], "growth": {"operator": "g_stack", "factor": 2,
                                                   "optimizer_state": "mapped"}},
    "stages": [
        {**PLAN["stages"][0], "steps": 12, "checkpoint_every": 12},
        {"name": "grow", "kind": "grow", "options": {"operator": "g_stack"}},
        {**PLAN["stages"][2], "steps": 20, "checkpoint_every": 1, "eval_every": 10},  # step-1 is kept: cut at 2
    ],
}


def stage_state(home: Path, stage: str, step: int) -> dict:
    return torch.load(home / "runs" / "run-00001" / stage / f"step-{step:08d}" / "state.pt", weights_only=True)


def by_name(optimizer_state: dict, model: torch.nn.Module) -> dict[str, dict[str, torch.Tensor]]:
    from muse_plan.executor.grow import _param_names

    names = [n for group in _param_names(model) for n in group]
    return {names[i]: v for i, v in optimizer_state["state"].items()}


def test_the_continue_stage_starts_from_the_moments_of_the_blocks_it_copies(cli, tmp_path, muse_home) -> None:
    from engines.architecture.model import DecoderLM
    from muse_plan.executor.settings import model_config
    from muse_plan.plan.io import spec_from_dict

    assert cli("plan", "import", write(tmp_path, **MAPPED_PLAN)).exit_code == 0
    with pytest.raises(RunInterrupted):  # the continue stage's first checkpoint, before keep=3 prunes it
        run_plan(None, "grow", view=StopAt("continue", 2))
    spec = spec_from_dict(MAPPED_PLAN)
    small = by_name(stage_state(muse_home, "pretrain_small", 12)["optimizer"],
                    DecoderLM(model_config(spec, spec.stages[0])))
    grown_model = DecoderLM(model_config(spec, spec.stages[2]))
    mapped = stage_state(muse_home, "grow", 0)["mapped_optimizer"]
    assert set(mapped) == {n for n, _ in grown_model.named_parameters()}
    for layer, source in enumerate([0, 1, 0, 1]):  # G_stack: 1, 2, 1, 2
        got, want = block_moments(mapped, layer), block_moments(small, source)
        assert set(got) == set(want)
        assert all(torch.equal(got[n][k], want[n][k]) for n in want for k in KINDS)
        assert all(got[n]["step"] == 12 for n in got)  # the small stage's 12 steps
    # the continue stage's first step updated the mapped moments, not empty ones:
    # m1 = β1·m0 + (1-β1)·g and v1 = β2·v0 + (1-β2)·g² for one and the same g
    first = by_name(stage_state(muse_home, "continue", 1)["optimizer"], grown_model)
    for name, before in mapped.items():
        after = first[name]
        assert after["step"] == 13
        g = (after["exp_avg"] - BETA1 * before["exp_avg"]) / (1 - BETA1)
        assert torch.allclose(after["exp_avg_sq"], BETA2 * before["exp_avg_sq"] + (1 - BETA2) * g * g,
                              rtol=1e-4, atol=1e-12), name
    assert any("AdamW moments mapped for" in m for m in messages(1))
    run_plan(None, "grow", resume=True)  # on from the continue stage's own checkpoint
    losses = [v for _, v in series(1, "loss", 2)]
    assert all(math.isfinite(v) for v in losses)
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5  # still learning after the growth


def test_a_continue_stage_cut_before_its_first_checkpoint_restarts_from_the_mapped_moments(
        cli, tmp_path, monkeypatch) -> None:
    plan = {**MAPPED_PLAN, "stages": [*MAPPED_PLAN["stages"][:2],
                                      {**MAPPED_PLAN["stages"][2], "steps": 8, "checkpoint_every": 5}]}
    homes = {name: tmp_path / name for name in ("whole", "cut")}
    path = write(tmp_path, **plan)
    for home in homes.values():
        monkeypatch.setenv("MUSE_HOME", str(home))
        assert cli("plan", "import", path).exit_code == 0
    monkeypatch.setenv("MUSE_HOME", str(homes["whole"]))
    run_plan(None, "grow")
    expected = series(1, "loss", 2)

    monkeypatch.setenv("MUSE_HOME", str(homes["cut"]))
    with pytest.raises(RunInterrupted):
        run_plan(None, "grow", view=StopAt("continue", 3))
    assert not (homes["cut"] / "runs" / "run-00001" / "continue" / "step-00000005").exists()
    result = run_plan(None, "grow", resume=True)
    assert [s.name for s in result.stages] == ["continue"]
    assert series(1, "loss", 2) == expected  # the same mapped start, step for step

    monkeypatch.setenv("MUSE_HOME", str(tmp_path / "fresh"))  # and it is not what a fresh optimizer does
    fresh = {**plan, "techniques": {**plan["techniques"], "growth": {"operator": "g_stack", "factor": 2}}}
    assert cli("plan", "import", write(tmp_path, **fresh)).exit_code == 0
    run_plan(None, "grow")
    assert series(1, "loss", 2)[1:] != expected[1:]
