"""The RKDO engine: the recursion and schedules on hand values, the loss against a
hand-computed KL, the I-Con limit, training, resume and early stopping through
the executor's loop (the CLI and runner: test_rkdo_runner.py)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator

from engines.contract import StageSetup
from engines.rkdo.config import RkdoConfig
from engines.rkdo.field import TARGETS, Neighbourhood, SupervisoryField
from engines.rkdo.objective import (
    ema_update,
    neighbour_kl,
    positive_target,
    scheduled_alpha,
    temperature,
    unrolled_target,
)
from engines.rkdo.stopping import GeometricDecay
from engines.rkdo.trainer import RkdoTrainer
from muse_plan.executor import checkpoint
from muse_plan.executor.loop import train_stage
from muse_plan.executor.settings import resolve
from muse_plan.plan.io import spec_from_dict

FAST = {"dataset": "synthetic", "anchors": 48, "hidden": 32, "embed_dim": 16, "proj_dim": 16}


def settings(steps: int = 12, eval_every: int = 6, checkpoint_every: int = 6, **training):
    spec = spec_from_dict({
        "name": "rep",
        "model": {"scale": "1M", "seq_len": 32, "vocab_size": 260, "shape": {"layers": 2, "d_model": 32, "n_heads": 2}},
        "training": {"micro_batch": 32, "lr": 3e-3, "warmup_steps": 0, "schedule": "constant", "weight_decay": 0.0,
                     **training},
        "stages": [{"name": "representation", "kind": "representation", "steps": steps,
                    "eval_every": eval_every, "checkpoint_every": checkpoint_every}],
    }, "test")
    return resolve(spec, spec.stages[0])


def trainer(s, seed: int = 0, **options) -> RkdoTrainer:
    torch.manual_seed(seed)
    t = RkdoTrainer()
    t.setup(StageSetup(name="representation", kind="representation", model=s.model,
                       options=RkdoConfig.from_options({**FAST, **options}),
                       micro_batch=s.micro_batch, micro_steps=s.steps * s.grad_accum, seed=seed))
    return t


pytestmark = pytest.mark.usefixtures("one_thread")


class Collect:
    def __init__(self, stop_after_checkpoint: int | None = None) -> None:
        self.losses: dict[int, float] = {}
        self.evals: list[tuple[int, dict]] = []
        self.saved: list[int] = []
        self.stop_after_checkpoint = stop_after_checkpoint

    def on_start(self, step: int) -> None:
        pass

    def on_step(self, record) -> None:
        self.losses[record.step] = record.loss

    def on_eval(self, step: int, metrics: dict) -> None:
        self.evals.append((step, metrics))

    def on_checkpoint(self, step: int, path: Path) -> None:
        self.saved.append(step)
        if step == self.stop_after_checkpoint:
            raise KeyboardInterrupt  # the process dies right after this checkpoint


# ---------------------------------------------------------------- pure core
def test_temperature_schedule_on_hand_values() -> None:
    # τ(t) = τ0 (1 − β t/T) with τ0 = 0.5, β = 0.1, T = 100
    assert [temperature(0.5, 0.1, t, 100) for t in (0, 50, 100)] == pytest.approx([0.5, 0.475, 0.45])
    assert temperature(0.5, 0.1, 250, 100) == pytest.approx(0.45)  # never past the schedule's end
    assert temperature(0.5, 0.1, 30, 0) == 0.5  # an unknown length keeps τ0


def test_ema_recursion_on_hand_values() -> None:
    p = torch.tensor([[0.8, 0.2, 0.0]])
    q = torch.tensor([[0.2, 0.3, 0.5]])
    # p(1) = 0.75·p(0) + 0.25·q(0)
    assert ema_update(p, q, 0.25).tolist()[0] == pytest.approx([0.65, 0.225, 0.125])
    assert ema_update(p, q, 0.0).tolist() == p.tolist()


def test_unrolled_target_is_the_recursion_while_within_depth_and_anchored_beyond() -> None:
    torch.manual_seed(0)
    p0 = torch.softmax(torch.randn(2, 5), 1)
    qs = [torch.softmax(torch.randn(2, 5), 1) for _ in range(4)]
    alpha, depth = 0.3, 3
    for t in range(depth + 1):
        expected = p0
        for q in qs[:t]:
            expected = ema_update(expected, q, alpha)
        history = torch.zeros(2, depth, 5)
        for k, q in enumerate(reversed(qs[:t])):  # newest first
            history[:, k] = q
        got = unrolled_target(p0, history, torch.full((2,), t), alpha)
        assert torch.allclose(got, expected, atol=1e-6)
    # beyond the depth the oldest levels fold into p(0): (1−α)^3 p0 + α q3 + α(1−α) q2 + α(1−α)² q1
    history = torch.stack([qs[3], qs[2], qs[1]], 1)
    got = unrolled_target(p0, history, torch.full((2,), depth), alpha)
    hand = 0.343 * p0 + 0.3 * qs[3] + 0.21 * qs[2] + 0.147 * qs[1]
    assert torch.allclose(got, hand, atol=1e-6) and torch.allclose(got.sum(1), torch.ones(2))


def test_field_keeps_each_samples_newest_qs_and_starts_from_p0() -> None:
    field = SupervisoryField(n_samples=3, columns=2, depth=2)
    p0 = torch.tensor([[0.9, 0.1], [0.9, 0.1]])
    for q in ([0.5, 0.5], [0.2, 0.8], [0.4, 0.6]):
        field.push(torch.tensor([0]), torch.tensor([q]))
    got = field.targets(torch.tensor([0, 1]), p0, alpha=0.5)
    # sample 0: 0.25·p0 + 0.5·q3 + 0.25·q2 (q1 fell out); sample 1, never seen: p0
    assert got[0].tolist() == pytest.approx([0.25 * 0.9 + 0.5 * 0.4 + 0.25 * 0.2, 0.25 * 0.1 + 0.5 * 0.6 + 0.25 * 0.8])
    assert got[1].tolist() == pytest.approx([0.9, 0.1])
    assert field.visits.tolist() == [3, 0, 0]


def test_positive_target_is_icons_debiased_pair() -> None:
    mask = torch.tensor([[True, True, False, True]])
    assert positive_target(mask, 0.2).tolist()[0] == pytest.approx([0.8 + 0.2 / 3, 0.2 / 3, 0.0, 0.2 / 3])


def test_loss_equals_a_hand_computed_kl_on_four_points() -> None:
    z = [(1.0, 0.0), (0.6, 0.8), (0.0, 1.0), (-0.8, 0.6)]
    tau = 0.5
    p = [[0.0, 0.7, 0.2, 0.1], [0.5, 0.0, 0.5, 0.0], [0.1, 0.8, 0.0, 0.1], [0.0, 0.0, 1.0, 0.0]]
    total = 0.0
    for i in range(4):
        sims = {j: (z[i][0] * z[j][0] + z[i][1] * z[j][1]) / tau for j in range(4) if j != i}
        norm = sum(math.exp(s) for s in sims.values())
        total += sum(p[i][j] * math.log(p[i][j] / (math.exp(sims[j]) / norm)) for j in sims if p[i][j] > 0)
    Z = torch.tensor(z)
    mask = ~torch.eye(4, dtype=torch.bool)
    got = neighbour_kl(torch.tensor(p), Z @ Z.T / tau, mask)
    assert got.item() == pytest.approx(total / 4, rel=1e-5)


def test_alpha_schedules_anneal_towards_alpha_final() -> None:
    assert scheduled_alpha(0.5, 0.1, "constant", 0.7) == 0.5
    assert scheduled_alpha(0.5, 0.1, "linear", 0.5) == pytest.approx(0.3)
    assert scheduled_alpha(0.5, 0.1, "cosine", 1.0) == pytest.approx(0.1)


def test_geometric_decay_rule_on_hand_losses() -> None:
    rule = GeometricDecay(window=2, tol=0.05, patience=2)
    for loss in (8, 8, 4, 4, 2, 2):  # halving every window: a geometric decrease
        rule.observe(loss)
    assert rule.decays() == [0.5, 0.5] and not rule.flat and rule.remaining_share() == 1.0
    for loss in (1.98, 1.98, 1.97, 1.97):  # 1% and 0.5% per window: flat
        rule.observe(loss)
    assert rule.decay == pytest.approx(1 - 1.97 / 1.98) and rule.flat
    assert rule.remaining_share() == pytest.approx(rule.decay / 0.5)
    again = GeometricDecay(window=2, tol=0.05, patience=2)
    again.load_state_dict(rule.state_dict())
    assert again.flat and again.means == rule.means


def test_options_are_checked_with_what_is_accepted() -> None:
    with pytest.raises(ValueError, match="unknown rkdo option 'gamma'; accepted: objective, alpha"):
        RkdoConfig.from_options({"gamma": 1})
    with pytest.raises(ValueError, match="unknown rkdo alpha_schedule 'fast'; accepted: constant, linear"):
        RkdoConfig.from_options({"alpha_schedule": "fast"})
    with pytest.raises(ValueError, match="alpha must be in \\[0, 1\\], got 1.5"):
        RkdoConfig.from_options({"alpha": 1.5})
    icon = RkdoConfig.from_options({"objective": "icon", "alpha": 0.5, "beta": 0.1})
    assert (icon.alpha, icon.beta, icon.target) == (0.0, 0.0, "static")


# ------------------------------------------------------------ the trainer
def run_steps(t: RkdoTrainer, steps: int, lr: float = 3e-3) -> list[float]:
    opt = torch.optim.Adam(t.model.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        out = t.micro_step(t.next_batch())
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(out.loss.item())
    return losses


def test_alpha_zero_keeps_the_supervisory_distribution_fixed_the_icon_limit() -> None:
    s = settings(steps=70)
    epoch = trainer(s).sampler.steps_per_epoch  # 30 batches of 32 from 960 training samples
    icon = run_steps(trainer(s, objective="icon"), 70)
    frozen = trainer(s, objective="rkdo", alpha=0.0, beta=0.0)
    assert run_steps(frozen, 70) == pytest.approx(icon, rel=1e-5)  # the same losses, step for step
    idx, a, b, anchors = frozen.next_batch()
    z = torch.nn.functional.normalize(frozen.model(torch.cat([a, b, anchors])), dim=1)
    n = frozen._neighbourhood(z[:64], z[64:], torch.cat([idx, idx]), 0.5, 0.0)
    assert torch.equal(TARGETS["recursive"](n), n.p0)  # visited twice, its target is still p(0)
    # with α > 0 the first epoch is I-Con's (first visits: p(0)); the second is not
    recursive = run_steps(trainer(s, objective="rkdo", beta=0.0), 70)
    assert recursive[:epoch] == pytest.approx(icon[:epoch], rel=1e-5)
    assert abs(recursive[epoch + 1] - icon[epoch + 1]) > 0.1


def test_the_in_batch_target_lowers_the_loss_by_construction() -> None:
    """The author's code's form: the model's own q in its target, so before any
    training its loss is at most (1−α)^depth of the static one (KL is convex)."""
    t = trainer(settings(), in_batch=True, alpha=0.5, depth=3)
    idx, a, b, anchors = t.next_batch()
    with torch.no_grad():
        z = torch.nn.functional.normalize(t.model(torch.cat([a, b, anchors])), dim=1)
    n = t._neighbourhood(z[:64], z[64:], torch.cat([idx, idx]), 0.5, 0.5)
    static = neighbour_kl(TARGETS["static"](n), n.logits, n.mask).item()
    in_batch = neighbour_kl(TARGETS["in_batch"](n), n.logits, n.mask).item()
    assert in_batch <= 0.125 * static + 1e-6


def test_the_in_batch_gradient_is_the_static_one_scaled_by_one_minus_alpha_to_the_depth() -> None:
    """With the target detached, d KL(p‖q)/d logits = q − p = (1−α)^d (q − p(0)):
    the in-batch form trains like I-Con with a smaller gradient (the same under Adam)."""
    torch.manual_seed(0)
    logits = torch.randn(6, 5, requires_grad=True)
    mask = torch.ones(6, 5, dtype=torch.bool)
    mask[0, 3] = False
    p0 = positive_target(mask, 0.2)
    grads = {}
    for name in ("static", "in_batch"):
        n = Neighbourhood(logits, mask, p0, torch.arange(6), alpha=0.5, depth=3, field=None)
        logits.grad = None
        neighbour_kl(TARGETS[name](n), logits, mask).backward()
        grads[name] = logits.grad.clone()
    assert torch.allclose(grads["in_batch"], 0.125 * grads["static"], atol=1e-6)


@pytest.mark.parametrize("options", [{"objective": "icon"}, {"objective": "rkdo"},
                                     {"objective": "rkdo", "in_batch": True}],
                         ids=["icon", "rkdo", "rkdo-in-batch"])
def test_each_objective_learns_through_the_loop(tmp_path, options) -> None:
    s = settings(steps=60, eval_every=60, checkpoint_every=60)
    t = trainer(s, **options)
    before = t.evaluate()
    hooks = Collect()
    result = train_stage(t, s, Accelerator(cpu=True), tmp_path, {}, hooks)
    losses = [hooks.losses[i] for i in sorted(hooks.losses)]
    assert sum(losses[-10:]) < sum(losses[:10])  # its own loss falls
    after = hooks.evals[-1][1]
    assert after["val_loss"] < before["val_loss"] - 0.3  # and so does I-Con's on held-out views
    assert after["knn_retention"] > before["knn_retention"] + 0.02
    assert {"linear_probe_acc", "nmi", "ari"} <= set(result)


@pytest.mark.parametrize("objective", ["rkdo", "icon"])
def test_a_resumed_stage_repeats_the_uninterrupted_one(tmp_path, objective: str) -> None:
    s = settings(steps=40, eval_every=20, checkpoint_every=20)  # a resume mid-epoch, field half updated
    whole = Collect()
    train_stage(trainer(s, objective=objective), s, Accelerator(cpu=True), tmp_path / "whole", {}, whole)
    killed = Collect(stop_after_checkpoint=20)
    with pytest.raises(KeyboardInterrupt):
        train_stage(trainer(s, objective=objective), s, Accelerator(cpu=True), tmp_path / "killed", {}, killed)
    fresh = trainer(s, seed=5, objective=objective)  # another seed: everything must come from the checkpoint
    path = checkpoint.step_dir(tmp_path / "killed", 20)
    state, manifest = checkpoint.load(path, fresh.model)
    start = checkpoint.Loaded(path=path, step=20, state=state, manifest=manifest)
    resumed = Collect()
    train_stage(fresh, s, Accelerator(cpu=True), tmp_path / "killed", {}, resumed, start)
    assert sorted(resumed.losses) == list(range(21, 41))
    assert [resumed.losses[i] for i in range(21, 41)] == [whole.losses[i] for i in range(21, 41)]
    if objective == "rkdo":
        assert int(state["engine"]["field"]["visits"].sum()) == 20 * 32


def test_the_stopping_rule_ends_the_stage_at_an_evaluation_with_a_checkpoint(tmp_path) -> None:
    # every window is "flat" under tol 1.0: windows of 2 steps, flat twice in a
    # row once three windows are done (step 6), so the first evaluation after
    # it (step 8) stops the stage
    s = settings(steps=30, eval_every=4, checkpoint_every=10)
    t = trainer(s, early_stop=True, stop_tol=1.0, stop_window=2, stop_patience=2)
    hooks = Collect()
    result = train_stage(t, s, Accelerator(cpu=True), tmp_path, {}, hooks)
    assert result["stopped_at_step"] == 8 and sorted(hooks.losses) == list(range(1, 9))
    assert [step for step, _ in hooks.evals] == [4, 8] and hooks.evals[-1][1]["decay_flat"] == 1.0
    assert hooks.saved == [8] and checkpoint.checkpoints(tmp_path)[0].name == "step-00000008"
    off = trainer(s, early_stop=False, stop_tol=1.0, stop_window=2)
    assert "stopped_at_step" not in train_stage(off, s, Accelerator(cpu=True), tmp_path / "off", {}, Collect())


def test_cnn_encoder_learns_digits(tmp_path) -> None:
    s = settings(steps=30, eval_every=30, checkpoint_every=30)
    t = trainer(s, dataset="digits", encoder="auto", anchors=64, hidden=32)
    assert type(t.model).__name__ == "CNNEncoder" and t.init_module is None
    before = t.evaluate()
    hooks = Collect()
    train_stage(t, s, Accelerator(cpu=True), tmp_path, {}, hooks)
    losses = [hooks.losses[i] for i in sorted(hooks.losses)]
    assert sum(losses[-5:]) < sum(losses[:5]) - 0.2
    assert hooks.evals[-1][1]["val_loss"] < before["val_loss"] - 0.1


def test_adaptive_alpha_shrinks_as_the_geometric_decrease_flattens() -> None:
    t = trainer(settings(), alpha=0.5, alpha_final=0.1, alpha_schedule="adaptive", stop_window=1)
    assert t.alpha() == 0.5  # no decrease measured yet
    for loss in (4.0, 2.0, 1.5):  # decays 0.5, then 0.25: half the best decrease is left
        t.rule.observe(loss)
    assert t.alpha() == pytest.approx(0.1 + 0.4 * 0.5)


def test_a_folder_of_images_is_a_labelled_image_dataset(tmp_path) -> None:
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    for label, row in (("bars", slice(4, 8)), ("blocks", slice(0, 4))):
        (tmp_path / "images" / label).mkdir(parents=True)
        for i in range(40):
            pixels = (torch.rand(12, 12, generator=g) * 60).to(torch.uint8)
            pixels[row] += 180
            Image.fromarray(pixels.numpy()).save(tmp_path / "images" / label / f"{i}.png")
    s = settings(steps=6, eval_every=6, checkpoint_every=6, micro_batch=16)
    t = trainer(s, dataset=str(tmp_path / "images"), image_size=8, anchors=16)
    assert t.data.kind == "image" and tuple(t.data.x.shape) == (80, 1, 8, 8) and t.data.classes == 2
    assert type(t.model).__name__ == "CNNEncoder"
    assert torch.bincount(t.data.labels[t.data.test]).tolist() == [8, 8]  # a stratified 20%
    result = train_stage(t, s, Accelerator(cpu=True), tmp_path / "run", {}, Collect())
    assert result["linear_probe_acc"] >= 0.9  # labels follow the folders: bright top or bottom half


def write_texts(folder: Path) -> Path:
    lines = {"sums": [f"{a} plus {b} is {a + b}" for a in range(12) for b in range(4)],
             "words": [f"the {w} sat on the {v} mat" for w in ("cat", "dog", "fox", "owl", "bee", "elk")
                       for v in ("red", "old", "big", "wet", "dry", "new", "tan", "hot")]}
    for name, rows in lines.items():
        (folder / name).mkdir(parents=True)
        (folder / name / "lines.txt").write_text("\n".join(rows))
    return folder


def test_text_encoder_is_the_decoder_with_a_head_and_learns(tmp_path) -> None:
    s = settings(steps=12, eval_every=12, checkpoint_every=12, micro_batch=16)
    t = trainer(s, dataset=str(write_texts(tmp_path / "texts")), anchors=32)
    assert type(t.model).__name__ == "TextEncoder" and t.data.classes == 2
    # a pretrained decoder's weights load into the encoder's decoder
    from engines.architecture.model import DecoderLM

    lm = DecoderLM(s.model)
    checkpoint.save(tmp_path / "pre", 1, lm, {"step": 1}, {})
    checkpoint.load_weights(checkpoint.step_dir(tmp_path / "pre", 1), t.init_module)
    assert torch.equal(t.model.lm.tok_emb.weight, lm.tok_emb.weight)
    hooks = Collect()
    train_stage(t, s, Accelerator(cpu=True), tmp_path / "run", {}, hooks)
    losses = [hooks.losses[i] for i in sorted(hooks.losses)]
    assert sum(losses[-3:]) < sum(losses[:3])
