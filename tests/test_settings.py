"""Stage settings resolved from a plan, and the learning-rate schedule."""

from __future__ import annotations

import math

import pytest

from muse_plan.errors import PlanError
from muse_plan.executor.settings import lr_factor, model_config, resolve
from muse_plan.plan.io import spec_from_dict, spec_to_dict


def plan(training: dict | None = None, stage: dict | None = None, **model) -> object:
    return spec_from_dict({
        "name": "t",
        "model": {"scale": "1M", "seq_len": 64, "vocab_size": 260,
                  "shape": {"layers": 2, "d_model": 32, "n_heads": 2}, **model},
        "training": training or {},
        "stages": [{"name": "pretrain", "kind": "pretrain", "steps": 100, **(stage or {})}],
    }, "test")


def test_open_fields_get_the_documented_defaults() -> None:
    s = resolve(plan(), plan().stages[0])
    assert (s.precision, s.micro_batch, s.grad_accum, s.lr, s.schedule) == ("fp32", 8, 1, 3e-4, "cosine")
    assert (s.weight_decay, s.clip_grad_norm, s.min_lr_ratio, s.warmup_steps) == (0.1, 1.0, 0.1, 5)
    assert (s.checkpoint_every, s.eval_every) == (10, 10)
    assert s.model.residual == "standard" and s.model.n_layers == 2


def test_bf16_is_the_default_only_on_gpus_that_have_it() -> None:
    spec = plan()
    assert resolve(spec, spec.stages[0], cuda=True, bf16=True).precision == "bf16"
    assert resolve(spec, spec.stages[0], cuda=True, bf16=False).precision == "fp32"


def test_global_batch_is_kept_when_processes_change() -> None:
    spec = plan({"global_batch": 32, "micro_batch": 4})
    one = resolve(spec, spec.stages[0], world_size=1)
    two = resolve(spec, spec.stages[0], world_size=2)
    assert (one.grad_accum, two.grad_accum) == (8, 4)
    assert one.global_batch == two.global_batch == 32


def test_a_global_batch_that_does_not_split_is_refused() -> None:
    spec = plan({"global_batch": 30, "micro_batch": 4})
    with pytest.raises(PlanError, match=r"not a multiple of micro_batch 4 .* or training.micro_batch 3 \(30 "):
        resolve(spec, spec.stages[0])
    with pytest.raises(PlanError, match="can't be split evenly over 4 processes"):
        resolve(spec, spec.stages[0], world_size=4)
    spec = plan({"global_batch": 16, "micro_batch": 16})  # the bundled growth plan on 2 processes
    with pytest.raises(PlanError, match=r"or training.micro_batch 8 \(8 sequences a process\)"):
        resolve(spec, spec.stages[0], world_size=2)


def test_token_budget_becomes_steps() -> None:
    spec = plan({"micro_batch": 4}, {"steps": None, "tokens": "100K"})
    # 100,000 tokens / (4 sequences × 64 tokens) = 390.6 → 391 steps
    assert resolve(spec, spec.stages[0]).steps == 391


def test_fp16_on_cpu_is_refused() -> None:
    spec = plan({"precision": "fp16"})
    with pytest.raises(PlanError, match="fp16 needs a GPU"):
        resolve(spec, spec.stages[0])


def test_mhc_options_reach_the_model() -> None:
    spec = spec_from_dict({
        "name": "t", "model": {"scale": "1M", "seq_len": 32, "vocab_size": 260, "residual": "mgt",
                               "shape": {"layers": 1, "d_model": 32, "n_heads": 2}},
        "techniques": {"geometric_scaling": {"streams": 2, "sinkhorn_iters": 7, "beta_max": 1.5,
                                             "stream_dtype": "bfloat16"}},
        "stages": [{"name": "p", "kind": "pretrain", "steps": 1}],
    }, "test")
    config = model_config(spec, spec.stages[0])
    assert (config.residual, config.streams, config.sinkhorn_iters, config.beta_max, config.stream_dtype) == (
        "mgt", 2, 7, 1.5, "bfloat16")


def test_an_hf_model_is_trained_further_never_pretrained_and_needs_its_folder() -> None:
    spec = plan(family="hf")
    with pytest.raises(PlanError, match="a pretrain stage trains muse's decoder from scratch"):
        resolve(spec, spec.stages[0])
    data = spec_to_dict(spec)
    data["stages"][0]["kind"] = "continue"
    unset = spec_from_dict(data)
    with pytest.raises(PlanError, match="model.family hf needs model.init_from"):
        resolve(unset, unset.stages[0])
    data["model"]["init_from"] = "/no/such/model"
    missing = spec_from_dict(data)
    with pytest.raises(PlanError, match="is not a Hugging Face model directory: no such folder"):
        resolve(missing, missing.stages[0])
    assert resolve(missing, missing.stages[0], check=False).model.n_layers == 2  # priced as the plan says


def test_warmup_then_cosine_to_the_floor() -> None:
    spec = plan({"warmup_steps": 10, "min_lr_ratio": 0.1})
    s = resolve(spec, spec.stages[0])
    assert lr_factor(0, s) == pytest.approx(0.1)
    assert lr_factor(9, s) == pytest.approx(1.0)
    assert lr_factor(10, s) == pytest.approx(1.0)
    middle = 10 + (99 - 10) / 2
    assert lr_factor(int(middle), s) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 44 / 89)))
    assert lr_factor(99, s) == pytest.approx(0.1)


@pytest.mark.parametrize("schedule, at_end, at_70pct", [("linear", 0.1, None), ("constant", 1.0, 1.0),
                                                        ("wsd", 0.1, 1.0)])
def test_other_schedules(schedule: str, at_end: float, at_70pct: float | None) -> None:
    spec = plan({"warmup_steps": 0, "schedule": schedule, "min_lr_ratio": 0.1})
    s = resolve(spec, spec.stages[0])
    assert lr_factor(99, s) == pytest.approx(at_end)
    if at_70pct is not None:
        assert lr_factor(70, s) == pytest.approx(at_70pct)


@pytest.mark.parametrize("field, value, why", [
    ("offload", "parameters", "is not supported by the executor yet"),
    ("optimizer", "adamw_8bit", "needs a CUDA GPU")])
def test_settings_the_executor_cannot_honour_are_refused_not_ignored(field: str, value: str, why: str) -> None:
    spec = plan({field: value})
    with pytest.raises(PlanError, match=f"training.{field} '{value}' {why}"):
        resolve(spec, spec.stages[0])
