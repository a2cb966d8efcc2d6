"""Stage kinds and their typed options (``muse_plan/plan/kinds.py``, ``engines/*/options.py``):
every option is checked when a plan is read, engines get the typed object."""

from __future__ import annotations

import json

import pytest
import yaml

from engines.grpo.options import GrpoRl, RejectionSamplingOptions, SGrpoRl, TSpmoRl
from muse_plan.errors import PlanError
from muse_plan.plan.io import spec_from_dict
from muse_plan.plan.kinds import STAGE_KINDS, stage_options
from tests.conftest import one_error_line

MODEL = {"scale": "1M", "seq_len": 32, "vocab_size": 260, "shape": {"layers": 2, "d_model": 32, "n_heads": 2}}


def plan(stage: dict, **extra) -> dict:
    kind = stage["kind"]
    stages = [stage] if STAGE_KINDS[kind].trains else [{"name": "pre", "kind": "pretrain", "steps": 2}, stage]
    return {"name": "p", "model": MODEL, "stages": stages, **extra}


@pytest.mark.parametrize("stage, says", [
    ({"kind": "reasoning_rl", "options": {"grup_size": 4}}, "unknown option 'grup_size'; accepted: group_size"),
    ({"kind": "reasoning_rl", "options": {"kl_beta": "lots"}}, "option kl_beta = 'lots': input should be a valid number"),
    ({"kind": "reasoning_rl", "options": {"algorithm": "ppo"}}, "unknown RL algorithm 'ppo'; accepted: grpo, s_grpo"),
    ({"kind": "reasoning_rl", "options": {"algorithm": "t_spmo", "clip_eps": 0.3}}, "unknown option 'clip_eps'"),
    ({"kind": "all_scenarios_rl", "options": {"reward_weights": {"corect": 1}}},
     "option reward_weights: unknown reward 'corect'; accepted: correctness, extracted, format, efficiency, "
     "consistency, or your own as module:function or file.py:function"),
    ({"kind": "cold_start_sft", "options": {"tasks": ["mult"]}}, "unknown arithmetic task 'mult'"),
    ({"kind": "rejection_sampling", "options": {"keep": "best"}}, "option keep = 'best': input should be 'all' or"),
    ({"kind": "rejection_sampling", "options": {"lora": "yes"}}, "option lora = 'yes'"),
    ({"kind": "pretrain", "options": {"taks": ["add_sub"]}}, "unknown option 'taks'; accepted: data, eval_data, "
     "eval_fraction, prompt_template, packing, tasks, lora"),
    ({"kind": "pretrain", "options": {"data": "x.jsonl"}}, "option 'data' (your examples) is for finetune stages"),
    ({"kind": "pretrain", "options": {"stop_on_plateau": 1}}, "stop_on_plateau: must be true or a window of at"),
    ({"kind": "pretrain", "options": {"lora": True}}, "unknown option 'lora' for a pretrain stage"),
    ({"kind": "grow", "options": {"operatr": "g_stack"}}, "unknown growth option 'operatr'"),
    ({"kind": "grow", "options": {"noise": "lots"}}, "growth option noise must be a number, got 'lots'"),
    ({"kind": "representation", "options": {"gamma": 1}}, "unknown rkdo option 'gamma'"),
])
def test_a_bad_stage_option_is_refused_at_import_with_one_line_and_nothing_is_stored(cli, tmp_path, stage,
                                                                                      says) -> None:
    stage = {"name": "s", "steps": 3, **stage} if STAGE_KINDS[stage["kind"]].trains else {"name": "s", **stage}
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(plan(stage)))
    result = cli("plan", "import", path)
    one_error_line(result, "stage 's': ")
    assert says in result.output
    assert json.loads(cli("plan", "list", "--json").stdout) == []


def test_a_bad_option_set_by_an_edit_is_refused_and_the_head_revision_is_kept(cli, tmp_path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(plan({"name": "rl", "kind": "reasoning_rl", "steps": 3})))
    assert cli("plan", "import", path).exit_code == 0
    result = cli("plan", "edit", "p", "--set", "stages.rl.options.kl_beta=lots")
    one_error_line(result, "stage 'rl': option kl_beta = 'lots'")
    assert len(json.loads(cli("plan", "history", "p", "--json").stdout)) == 1


def test_a_stage_takes_its_techniques_values_and_its_own_on_top() -> None:
    spec = spec_from_dict(plan({"name": "rl", "kind": "reasoning_rl", "steps": 3, "options": {"kl_beta": 0.1}},
                               techniques={"grpo": {"group_size": 4, "kl_beta": 0.02}, "lora": {"rank": 4}}))
    o = stage_options(spec, spec.stage("rl")).engine
    assert isinstance(o, GrpoRl) and (o.group_size, o.kl_beta, o.lora.rank) == (4, 0.1, 4)
    assert o.temperature == 0.3 and o.max_new_tokens == 300  # GrpoOptions' defaults, written once


@pytest.mark.parametrize("algorithm, model, group", [("s_grpo", SGrpoRl, 8), ("t_spmo", TSpmoRl, 50)])
def test_each_rl_algorithm_gets_its_own_model_and_defaults(algorithm, model, group) -> None:
    spec = spec_from_dict(plan({"name": "rl", "kind": "reasoning_rl", "steps": 3,
                                "options": {"algorithm": algorithm, "lora": False}},
                               techniques={"grpo": {"group_size": 4}}))
    o = stage_options(spec, spec.stage("rl")).engine
    assert type(o) is model and o.group_size == group and o.lora is None  # grpo's group size is grpo's only


def test_rejection_sampling_and_the_grpo_trainer_read_the_typed_options() -> None:
    from engines.contract import StageSetup
    from engines.grpo.trainer import GrpoTrainer
    from muse_plan.executor.settings import resolve

    spec = spec_from_dict(plan({"name": "rs", "kind": "rejection_sampling", "steps": 3,
                                "options": {"samples": 3, "keep": "most_confident", "max_new_tokens": 7,
                                            "tasks": ["multiplication:2x1"], "eval_problems": 2}}))
    s = resolve(spec, spec.stage("rs"))
    assert isinstance(s.options, RejectionSamplingOptions)
    t = GrpoTrainer()
    t.setup(StageSetup(name="rs", kind="rejection_sampling", model=s.model, options=s.options, micro_batch=2))
    assert (t.handler.samples, t.handler.keep, t.max_new_tokens, len(t.eval_problems)) == (3, "most_confident", 7, 2)


def test_executor_options_are_split_off_and_resolved() -> None:
    spec = spec_from_dict(plan({"name": "pre", "kind": "pretrain", "steps": 100,
                                "options": {"stop_on_plateau": True, "rewarm_fraction": 0.1, "tasks": "add_sub"}},
                               alerts={"plateau": 30}))
    from muse_plan.executor.settings import resolve

    s = resolve(spec, spec.stage("pre"))
    assert (s.plateau, s.plateau_window, s.warmup_steps) == ("stop_on_plateau", 30, 10)
    assert s.options.tasks == ("add_sub",)


def test_a_stage_option_the_engine_would_refuse_mid_run_is_a_plan_error_for_the_executor() -> None:
    from muse_plan.executor.settings import engine_options

    spec = spec_from_dict(plan({"name": "rl", "kind": "reasoning_rl", "steps": 3}))
    bad = spec.stage("rl").model_copy(update={"options": {"group_size": 0}})  # past validation, as a stale row
    with pytest.raises(PlanError, match="stage 'rl': option group_size = 0: input should be greater than 0"):
        engine_options(spec, bad)


def test_every_kind_is_one_record_and_the_planner_uses_only_registered_kinds() -> None:
    from muse_plan.plan.planner import complete

    assert {k.engine for k in STAGE_KINDS.values()} == {"architecture", "grpo", "growth", "rkdo"}
    assert [k.name for k in STAGE_KINDS.values() if k.generates] == ["reasoning_rl", "rejection_sampling",
                                                                       "all_scenarios_rl"]
    spec = complete(spec_from_dict({"name": "all", "techniques": "grpo,growth,rkdo"}))
    assert {s.kind for s in spec.stages} <= set(STAGE_KINDS)
    for stage in spec.stages:  # every planned stage's options type-check
        stage_options(spec, stage)
