import pytest

from muse_plan.plan.io import spec_from_dict
from muse_plan.plan.planner import complete
from engines.architecture.shapes import decoder_params, shape_for_params
from muse_plan.plan.spec import ModelSpec


def planned(**fields):
    return complete(spec_from_dict({"name": "p", **fields}))


def names(spec):
    return [s.name for s in spec.stages]


def test_grpo_expands_into_the_r1_stages():
    spec = planned(techniques=["grpo"], target_tasks=["reasoning"])
    assert names(spec) == ["pretrain", "cold_start_sft", "reasoning_rl", "rejection_sampling", "all_scenarios_rl"]
    rl = spec.stage("reasoning_rl")
    assert rl.engine == "grpo" and rl.options["algorithm"] == "grpo"
    assert "word_problem" in rl.options["tasks"]


def test_s_grpo_alone_sets_the_algorithm_and_lora_marks_stages():
    spec = planned(techniques=["s_grpo", "lora"], model={"init_from": "./base"})
    assert names(spec)[0] == "cold_start_sft"  # a given base model is not pretrained again
    assert spec.stage("reasoning_rl").options == {"tasks": ["multiplication", "add_sub"], "lora": True,
                                                  "algorithm": "s_grpo"}


def test_several_rl_algorithms_each_start_from_sft():
    spec = planned(techniques=["grpo", "t_spmo"], model={"init_from": "./base"})
    assert names(spec) == ["cold_start_sft", "reasoning_rl_grpo", "reasoning_rl_t_spmo",
                           "rejection_sampling", "all_scenarios_rl"]
    assert spec.stage("reasoning_rl_t_spmo").from_stage == "cold_start_sft"


def test_growth_expands_pretraining_into_small_grow_continue():
    spec = planned(model={"scale": "7B"}, techniques={"growth": {"factor": 4, "at_fraction": 0.25}})
    assert names(spec) == ["pretrain_small", "grow", "continue"]
    small = spec.stage("pretrain_small").shape
    assert small.layers == 32 // 4 and small.d_model == 4096
    assert spec.stage("grow").options["operator"] == "g_stack"
    # 20 tokens per parameter, a quarter spent small
    total = 20 * spec.model.approx_params()
    assert float(spec.stage("pretrain_small").tokens[:-1]) * 1e9 == pytest.approx(total / 4, rel=0.05)


def test_net2net_growth_shrinks_width():
    spec = planned(model={"scale": "1.3B"}, techniques={"growth": {"operator": "net2net", "factor": 2}})
    small = spec.stage("pretrain_small").shape
    assert (small.layers, small.d_model, small.n_heads) == (24, 1024, 8)


def test_rkdo_alone_is_a_representation_plan():
    assert names(planned(techniques=["rkdo"])) == ["representation"]
    assert names(planned(techniques=["rkdo"], target_tasks=["knowledge"])) == ["pretrain", "representation"]


def test_residual_filled_from_techniques():
    assert planned(techniques=["mhc"]).model.residual == "mhc"
    assert planned(techniques=["mhc", "geometric_scaling"]).model.residual == "mgt"
    assert planned().model.residual == "standard"


def test_given_stages_are_kept():
    stages = [{"name": "only", "kind": "pretrain", "steps": 5}]
    assert names(planned(techniques=["grpo"], stages=stages)) == ["only"]


def test_complete_is_idempotent():
    once = planned(techniques=["grpo", "growth", "mhc"], model={"scale": "10B"})
    assert complete(once) == once


@pytest.mark.parametrize("scale, layers, d_model", [("350M", 24, 1024), ("7B", 32, 4096), ("125M", 12, 768)])
def test_table_scales_map_to_standard_shapes(scale, layers, d_model):
    shape = ModelSpec(scale=scale).resolved_shape()
    assert (shape.layers, shape.d_model) == (layers, d_model)


@pytest.mark.parametrize("scale", ["10B", "1.5B", "27B", "3B"])
def test_between_scales_shape_has_the_asked_parameter_count(scale):
    model = ModelSpec(scale=scale)
    assert model.approx_params() == pytest.approx(model.n_params_nominal, rel=0.05)


def test_param_count_formula_on_a_hand_example():
    shape = shape_for_params(1_000_000, vocab_size=256)  # (4 layers, 128, 4 heads), d_ff 384
    assert (shape.layers, shape.d_model, shape.d_ff) == (4, 128, 384)
    per_layer = 4 * 128 * 128 + 3 * 128 * 384 + 2 * 128
    assert decoder_params(shape, 256) == 4 * per_layer + 256 * 128 + 128


def test_growth_expands_a_written_pretrain_stage_and_splits_its_budget():
    stages = [{"name": "pre", "kind": "pretrain", "steps": 300, "eval_every": 50, "checkpoint_every": 25,
               "training": {"lr": 0.002}},
              {"name": "sft", "kind": "cold_start_sft", "steps": 10, "from_stage": "pre"}]
    spec = planned(model={"scale": "1M", "shape": {"layers": 4, "d_model": 128, "n_heads": 4}, "seq_len": 128},
                   techniques={"growth": {"factor": 2, "at_fraction": 0.4, "small_seq_len": 64}}, stages=stages)
    assert names(spec) == ["pretrain_small", "grow", "continue", "sft"]
    small, cont = spec.stage("pretrain_small"), spec.stage("continue")
    assert (small.steps, cont.steps) == (120, 180)
    assert (small.shape.layers, small.seq_len) == (2, 64)
    assert small.eval_every == cont.eval_every == 50 and small.checkpoint_every == 25
    assert small.training.lr == cont.training.lr == 0.002
    assert spec.stage("sft").from_stage == "continue"
    # a token budget is split the same way; a plan that writes its own grow stage is kept as written
    tokens = planned(techniques={"growth": {"at_fraction": 0.25}},
                     stages=[{"name": "pretrain", "kind": "pretrain", "tokens": "8B"}])
    assert (tokens.stage("pretrain_small").tokens, tokens.stage("continue").tokens) == ("2B", "6B")
    written = [{"name": "a", "kind": "pretrain", "steps": 5, "shape": {"layers": 1, "d_model": 64, "n_heads": 4}},
               {"name": "g", "kind": "grow"}, {"name": "b", "kind": "continue", "steps": 5}]
    assert names(planned(techniques=["growth"], stages=written)) == ["a", "g", "b"]


def test_a_written_pretrain_stage_is_not_expanded_over_a_stage_of_the_same_name():
    from muse_plan.errors import PlanError

    stages = [{"name": "pretrain", "kind": "pretrain", "steps": 10}, {"name": "continue", "kind": "finetune", "steps": 5}]
    with pytest.raises(PlanError, match="already has a stage named 'continue'"):
        planned(techniques=["growth"], stages=stages)
