import pytest
import yaml

from muse_plan.errors import PlanError
from muse_plan.plan.io import spec_from_dict
from muse_plan.plan.spec import PlanSpec, StageSpec


def plan(**fields):
    return spec_from_dict({"name": "p", **fields})


def error_of(**fields) -> str:
    with pytest.raises(PlanError) as err:
        plan(**fields)
    return str(err.value)


def test_defaults_leave_settings_open():
    spec = plan()
    assert spec.model.scale == "350M" and spec.model.residual is None
    assert spec.compute is None and spec.timeline is None
    assert spec.training.lr is None and spec.stages == ()


def test_human_units_are_parsed_and_kept_canonical():
    spec = plan(model={"scale": "1.30b"}, timeline="1d12h", compute="2xa100-40gb",
                target_tasks="knowledge, reasoning")
    assert spec.model.scale == "1.3B" and spec.model.n_params_nominal == 1_300_000_000
    assert spec.timeline == "36h" and spec.timeline_seconds == 129600
    assert (spec.compute.gpu, spec.compute.count, spec.compute.memory_gib) == ("A100", 2, 40.0)
    assert spec.target_tasks == ("reasoning", "knowledge")  # canonical order


def test_compute_mapping_with_budget_and_aliases():
    spec = plan(compute={"budget": "8xH100", "memory_budget": "128GB", "host_ram": "512GB",
                         "network_bandwidth": "100Gbps"})
    c = spec.compute
    assert (c.gpu, c.count, c.memory_gib) == ("H100", 8, 80.0)
    assert (c.memory_budget_gib, c.host_ram_gib, c.network_gbps) == (128.0, 512.0, 100.0)
    assert c.budget == "8xH100-80GB"


def test_techniques_from_list_or_mapping():
    assert plan(techniques=["grpo", "mhc"]).techniques.names() == ["grpo", "mhc"]
    spec = plan(techniques={"lora": {"rank": 16}, "growth": None})
    assert spec.techniques.lora.rank == 16 and spec.techniques.growth.factor == 4
    assert spec.techniques.names() == ["growth", "lora"]


@pytest.mark.parametrize("fields, message", [
    ({"model": {"scale": "10Q"}}, "model.scale: '10Q' is not a model scale; scales look like 350M"),
    ({"techniques": ["grpo", "dpo"]}, "unknown technique 'dpo'; accepted: grpo, s_grpo"),
    ({"techniques": {"lora": {"rnak": 8}}}, "techniques.lora: unknown field 'rnak'"),
    ({"target_tasks": ["poetry"]}, "unknown task 'poetry'; accepted: reasoning, knowledge"),
    ({"timeline": "soon"}, "timeline: 'soon' is not a duration"),
    ({"compute": "3xB300"}, "unknown GPU 'B300'"),
    ({"compute": {"gpu": None, "count": 2}}, "count is set but no gpu"),
    ({"training": {"precision": "fp8"}}, "training.precision: Input should be"),
    ({"training": {"lr": -1}}, "training.lr: Input should be greater than 0"),
    ({"modle": {}}, "unknown field 'modle'"),
    ({"name": "a b"}, "name: 'a b' is not a valid name"),
    ({"name": "42"}, "can't be all digits"),
    ({"model": {"shape": {"layers": 2, "d_model": 100, "n_heads": 3}}}, "not divisible by n_heads"),
])
def test_errors_name_field_value_and_what_is_accepted(fields, message):
    assert message in error_of(**fields)


def test_error_is_one_line():
    text = error_of(model={"scale": "10Q"}, timeline="soon")
    assert "\n" not in text and "model.scale" in text and "timeline" in text


def test_residual_must_agree_with_techniques():
    assert "need 'mgt'" in error_of(model={"residual": "mhc"}, techniques=["geometric_scaling"])
    assert plan(model={"residual": "mhc"}, techniques=["mhc"]).model.residual == "mhc"


def test_batch_arithmetic_is_checked_across_gpus():
    ok = plan(compute="2xH100", training={"micro_batch": 4, "grad_accum": 8, "global_batch": 64})
    assert ok.training.global_batch == 64
    message = error_of(compute="2xH100", training={"micro_batch": 4, "grad_accum": 8, "global_batch": 32})
    assert "4 × grad_accum 8 × 2 GPU(s) = 64, not global_batch 32" in message


def test_stage_engine_follows_kind_and_budget_is_required():
    stage = StageSpec(name="s", kind="reasoning_rl", steps=10)
    assert stage.engine == "grpo"
    assert "needs a budget" in error_of(stages=[{"name": "s", "kind": "pretrain"}])
    assert "steps or tokens, not both" in error_of(stages=[{"name": "s", "kind": "pretrain", "steps": 1,
                                                            "tokens": "1B"}])
    assert "unknown stage kind 'train'" in error_of(stages=[{"name": "s", "kind": "train", "steps": 1}])
    assert "runs on engine 'grpo'" in error_of(stages=[{"name": "s", "kind": "cold_start_sft",
                                                         "engine": "rkdo", "steps": 1}])
    assert StageSpec(name="g", kind="grow").engine == "growth"  # growth needs no budget


def test_stage_names_unique_and_from_stage_earlier():
    two = [{"name": "a", "kind": "pretrain", "steps": 1}, {"name": "a", "kind": "continue", "steps": 1}]
    assert "appears twice" in error_of(stages=two)
    forward = [{"name": "a", "kind": "pretrain", "steps": 1, "from_stage": "b"},
               {"name": "b", "kind": "continue", "steps": 1}]
    assert "'b' is not an earlier stage" in error_of(stages=forward)


def test_specs_are_frozen():
    spec = plan()
    with pytest.raises(Exception):
        spec.name = "other"


def test_json_schema_names_every_section():
    schema = PlanSpec.model_json_schema()
    assert {"name", "model", "target_tasks", "techniques", "compute", "timeline", "training",
            "stages"} <= set(schema["properties"])


def test_an_unknown_rl_algorithm_is_refused_when_the_plan_is_read():
    stage = {"name": "rl", "kind": "reasoning_rl", "steps": 5, "options": {"algorithm": "grpoo"}}
    with pytest.raises(PlanError, match="stage 'rl': unknown RL algorithm 'grpoo'; accepted: grpo, s_grpo, t_spmo"):
        spec_from_dict({"name": "p", "stages": [stage]})
    assert spec_from_dict({"name": "p", "stages": [{**stage, "options": {"algorithm": "t_spmo"}}]})


@pytest.mark.parametrize("section, says", [
    ({"training": {"micro_batch": 10**26}}, "training.micro_batch: Input should be less than or equal to 16777216"),
    ({"stages": [{"name": "p", "kind": "pretrain", "steps": 10**29}]}, "stages.0.steps: Input should be less than"),
    ({"model": {"scale": "1000000T"}}, "model.scale: 1000000T is more than any run can train (at most 100T)"),
    ({"stages": [{"name": "p", "kind": "pretrain", "tokens": "100000000T"}]}, "is more than any run can read"),
    ({"model": {"seq_len": 10**12}}, "model.seq_len: Input should be less than or equal to"),
    ({"model": {"shape": {"layers": 10**9, "d_model": 64, "n_heads": 4}}}, "model.shape.layers"),
])
def test_counts_and_sizes_past_any_run_are_refused_at_import(cli, tmp_path, section, says) -> None:
    """A typo like 1e26 is one line when the plan is read, not an overflow hours into a run."""
    from tests.conftest import one_error_line

    path = tmp_path / "big.yaml"
    path.write_text(yaml.safe_dump({"name": "big", **section}))
    one_error_line(cli("plan", "import", path), says)
    assert cli("plan", "list", "--json").stdout.strip() == "[]"


def test_a_bare_on_or_off_in_yaml_is_the_word_not_a_boolean():
    """YAML 1.1 reads `compile: on` as true: the plan takes it back as "on" (and off as "off")."""
    data = yaml.safe_load("name: p\nmodel: {scale: 1M}\ntraining: {compile: on}\n")
    assert data["training"]["compile"] is True
    assert spec_from_dict(data, "p.yaml").training.compile == "on"
    data["training"]["compile"] = False
    assert spec_from_dict(data, "p.yaml").training.compile == "off"
    with pytest.raises(PlanError, match="compile"):
        spec_from_dict({**data, "training": {"compile": "sometimes"}}, "p.yaml")
