"""The stage loop on its own: the real architecture trainer, no store, no CLI."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator

from engines.contract import StageSetup
from engines.architecture.trainer import ArchitectureTrainer
from muse_plan.executor.loop import NonFiniteLoss, StepRecord, train_stage
from muse_plan.executor.settings import resolve
from muse_plan.plan.io import spec_from_dict

PLAN = {
    "name": "loop",
    "model": {"scale": "1M", "residual": "ddl", "seq_len": 32, "vocab_size": 260,
              "shape": {"layers": 2, "d_model": 32, "n_heads": 2}},
    "training": {"micro_batch": 4, "grad_accum": 2, "lr": 0.01, "warmup_steps": 2, "clip_grad_norm": 0.5},
    "stages": [{"name": "pretrain", "kind": "pretrain", "steps": 8, "checkpoint_every": 5, "eval_every": 4}],
}
SPEC = spec_from_dict(PLAN, "test")
SETTINGS = resolve(SPEC, SPEC.stages[0])


class Collect:
    def __init__(self, poison_at: int | None = None, trainer=None) -> None:
        self.steps: list[StepRecord] = []
        self.evals: list[tuple[int, dict]] = []
        self.saved: list[int] = []
        self.poison_at, self.trainer = poison_at, trainer

    def on_start(self, step: int) -> None:
        pass

    def on_step(self, record: StepRecord) -> None:
        self.steps.append(record)
        if record.step == self.poison_at:  # a weight goes bad: the next loss is NaN
            with torch.no_grad():
                self.trainer.model.tok_emb.weight.fill_(float("nan"))

    def on_eval(self, step: int, metrics: dict) -> None:
        self.evals.append((step, metrics))

    def on_checkpoint(self, step: int, path: Path) -> None:
        self.saved.append(step)


def trainer(tmp_path: Path, device: str = "cpu") -> ArchitectureTrainer:
    torch.manual_seed(0)
    t = ArchitectureTrainer()
    t.setup(StageSetup(name="pretrain", kind="pretrain", model=SETTINGS.model, micro_batch=4,
                       tokens_needed=SETTINGS.steps * SETTINGS.tokens_per_step, cache_dir=tmp_path, device=device))
    return t


@pytest.mark.parametrize("lag", [False, True])
def test_every_step_is_recorded_once_in_order_with_or_without_lag(tmp_path, lag: bool) -> None:
    hooks = Collect()
    result = train_stage(trainer(tmp_path), SETTINGS, Accelerator(cpu=True), tmp_path / "ckpt", {}, hooks,
                         lag=lag)
    assert [r.step for r in hooks.steps] == list(range(1, 9))
    assert [step for step, _ in hooks.evals] == [4, 8] and hooks.saved == [5, 8]
    assert all(r.tokens == 2 * 4 * 32 and r.tokens_per_s > 0 for r in hooks.steps)
    # warmup over 2 steps, then cosine from 0.01 down to 10%
    assert [round(r.lr, 6) for r in hooks.steps[:3]] == [0.005, 0.01, 0.01]
    assert result["loss"] == hooks.steps[-1].loss and result["val_loss"] == hooks.evals[-1][1]["val_loss"]
    assert hooks.steps[-1].loss < hooks.steps[0].loss


def test_eval_at_start_scores_the_starting_weights_as_step_0_and_changes_no_step(tmp_path) -> None:
    import dataclasses

    plain, first = Collect(), Collect()
    train_stage(trainer(tmp_path), SETTINGS, Accelerator(cpu=True), tmp_path / "a", {}, plain, lag=False)
    at_start = dataclasses.replace(SETTINGS, eval_at_start=True)
    train_stage(trainer(tmp_path), at_start, Accelerator(cpu=True), tmp_path / "b", {}, first, lag=False)
    assert [step for step, _ in first.evals] == [0, 4, 8]
    assert first.evals[0][1]["val_loss"] > first.evals[1][1]["val_loss"]  # untrained: worse than at step 4
    assert abs(first.evals[0][1]["val_loss"] - math.log(260)) < 0.5  # about uniform over the vocabulary
    assert [r.loss for r in first.steps] == [r.loss for r in plain.steps]  # evaluating moved nothing
    assert first.evals[1:] == plain.evals
    spec = spec_from_dict({**SPEC.model_dump(mode="json", exclude_none=True),
                           "stages": [{**SPEC.stages[0].model_dump(mode="json", exclude_none=True),
                                       "eval_at_start": True}]}, "test")
    assert resolve(spec, spec.stages[0]).eval_at_start and not SETTINGS.eval_at_start


def test_lag_changes_when_numbers_are_read_not_what_they_are(tmp_path) -> None:
    runs = []
    for lag in (False, True):
        hooks = Collect()
        train_stage(trainer(tmp_path), SETTINGS, Accelerator(cpu=True), tmp_path / f"c{lag}", {}, hooks, lag=lag)
        runs.append([(r.loss, r.grad_norm) for r in hooks.steps])
    assert runs[0] == runs[1]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_a_gpu_lagged_numbers_come_through_pinned_copies_and_match(tmp_path) -> None:
    """On a GPU the lagged read waits on the step's own copy to pinned memory, not on the queue
    behind it; the numbers are the ones an immediate read gives."""
    from muse_plan.executor import loop

    staged: list[loop._Pending] = []
    stage = loop._Pending.stage

    def spy(self: loop._Pending) -> None:
        stage(self)
        staged.append(self)

    runs = []
    for lag in (False, True):
        hooks = Collect()
        loop._Pending.stage = spy  # type: ignore[method-assign]
        try:
            train_stage(trainer(tmp_path, "cuda"), SETTINGS, Accelerator(), tmp_path / f"g{lag}", {}, hooks, lag=lag)
        finally:
            loop._Pending.stage = stage  # type: ignore[method-assign]
        runs.append([(r.loss, r.grad_norm) for r in hooks.steps])
    assert staged and all(p.copied is not None and p.copied.is_pinned() for p in staged)
    assert [r[0] for r in runs[1]] == pytest.approx([r[0] for r in runs[0]], rel=1e-4)
    assert [r[1] for r in runs[1]] == pytest.approx([r[1] for r in runs[0]], rel=1e-3)


def test_gradient_norm_is_recorded_before_clipping(tmp_path) -> None:
    hooks = Collect()
    train_stage(trainer(tmp_path), SETTINGS, Accelerator(cpu=True), tmp_path / "ckpt", {}, hooks)
    assert hooks.steps[0].grad_norm > 0.5  # clipping is at 0.5; the first step's norm is larger


@pytest.mark.parametrize("lag", [False, True])
def test_nan_loss_stops_the_stage_before_a_checkpoint_of_bad_weights(tmp_path, lag: bool) -> None:
    t = trainer(tmp_path)
    hooks = Collect(poison_at=3, trainer=t)
    # step 3's numbers reach the hooks after step 3 (no lag) or after step 4 was launched (lag),
    # so the first NaN loss is step 4's or step 5's; step 5 is a checkpoint step
    bad = 5 if lag else 4
    with pytest.raises(NonFiniteLoss, match=f"loss is nan at step {bad}") as caught:
        train_stage(t, SETTINGS, Accelerator(cpu=True), tmp_path / "ckpt", {}, hooks, lag=lag)
    assert caught.value.step == bad and math.isnan(caught.value.value)
    assert hooks.saved == []  # step 5's checkpoint was never written
    assert not (tmp_path / "ckpt").exists()


def test_prepare_leaves_autocast_to_the_loop_so_logits_stay_in_the_compute_dtype() -> None:
    """Accelerate's mixed precision wraps a prepared model's forward in autocast and casts its bf16
    outputs to fp32 (the logits: a tokens × vocabulary copy each step); the executor autocasts every
    forward itself, so ``optimizers.prepare`` puts the model's own forward back."""
    from accelerate.state import AcceleratorState

    from engines.architecture.model import DecoderLM
    from muse_plan.executor import optimizers

    AcceleratorState._reset_state()
    accelerator = Accelerator(mixed_precision="bf16", cpu=True)
    spec = spec_from_dict({**PLAN, "training": {**PLAN["training"], "precision": "bf16"}}, "test")
    bf16 = resolve(spec, spec.stages[0])
    model = DecoderLM(SETTINGS.model)
    x = torch.randint(0, 260, (2, 32))
    wrapped = accelerator.prepare(DecoderLM(SETTINGS.model))
    with accelerator.autocast():
        assert wrapped(x, x)[0].dtype == torch.float32  # what Accelerate alone hands back
    prepared, _ = optimizers.prepare(accelerator, model, bf16)
    assert "forward" not in accelerator.unwrap_model(prepared).__dict__
    with accelerator.autocast():
        logits, loss = prepared(x, x)
    assert logits.dtype == torch.bfloat16 and loss.dtype == torch.float32
    AcceleratorState._reset_state()
