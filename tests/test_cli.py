"""Every ``muse`` command through typer's CliRunner: output, exit codes, stored state."""

import json

import pytest
import yaml

from conftest import PLANS, ROOT, one_error_line

SEED = ["plan", "create", "--model-scale", "10B", "--target-tasks", "reasoning,knowledge",
        "--techniques", "grpo,mhc,growth", "--compute-budget", "1xRTX3080-8GB", "--timeline", "7days"]


def state(cli):
    """Everything stored, as plans with their full history: compared before/after bad input."""
    plans = json.loads(cli("plan", "list", "--json").stdout)
    return [(p["name"], json.loads(cli("plan", "history", p["name"], "--json").stdout)) for p in plans]


def test_seed_create_command_stores_a_planned_plan(cli):
    result = cli(*SEED)
    assert result.exit_code == 0, result.output
    assert "created plan plan-10b-grpo-mhc-growth (id 1, revision 1)" in result.output
    shown = json.loads(cli("plan", "show", "1", "--json").stdout)
    spec = shown["spec"]
    assert spec["model"] == {"scale": "10B", "family": "decoder", "residual": "mhc",
                             "seq_len": 2048, "vocab_size": 32000}
    assert spec["compute"] == {"gpu": "RTX3080", "count": 1, "memory_gib": 8.0}
    assert [s["name"] for s in spec["stages"]][:3] == ["pretrain_small", "grow", "continue"]
    assert shown["revision"]["author"] == "user"


def test_create_from_yaml_with_flag_overrides(cli):
    result = cli("plan", "create", "--from-yaml", ROOT / "plans/growth-8xh100.yaml", "--name", "mine",
                 "--compute-budget", "2xH200", "--timeline", "36h")
    assert result.exit_code == 0, result.output
    spec = json.loads(cli("plan", "show", "mine", "--json").stdout)["spec"]
    assert spec["compute"]["gpu"] == "H200" and spec["compute"]["count"] == 2
    assert spec["compute"]["network_gbps"] == 100.0  # kept from the file
    assert spec["timeline"] == "36h" and spec["techniques"]["growth"]["at_fraction"] == 0.25


def test_auto_names_do_not_collide(cli):
    assert cli(*SEED).exit_code == 0
    result = cli(*SEED)
    assert "plan-10b-grpo-mhc-growth-2" in result.output


def test_show_renders_every_section(cli):
    cli(*SEED)
    result = cli("plan", "show", "plan-10b-grpo-mhc-growth")
    assert result.exit_code == 0
    for text in ("model", "31 layers × d_model 5120", "compute, time, tasks", "1xRTX3080-8GB", "7days",
                 "techniques", "stages", "pretrain_small", "training settings", "left open for the optimizer",
                 "revisions", "created from flags"):
        assert text in result.output, text


def test_list_table_and_json(cli):
    assert "No plans yet" in cli("plan", "list").output
    for path in PLANS:
        assert cli("plan", "import", path).exit_code == 0
    listed = json.loads(cli("plan", "list", "--json").stdout)
    assert {p["name"] for p in listed} == {yaml.safe_load(p.read_text())["name"] for p in PLANS}
    table = cli("plan", "list").output
    assert "quickstart-cpu" in table and "8xH100-80GB" in table


def test_export_yaml_json_and_to_file(cli, tmp_path):
    cli("plan", "import", ROOT / "plans/quickstart-cpu.yaml")
    as_yaml = yaml.safe_load(cli("plan", "export", "quickstart-cpu").stdout)
    as_json = json.loads(cli("plan", "export", "quickstart-cpu", "--format", "json").stdout)
    assert as_yaml == as_json and as_yaml["stages"][0]["steps"] == 250
    out = tmp_path / "q.yaml"
    assert cli("plan", "export", "1", "-o", out).exit_code == 0
    assert yaml.safe_load(out.read_text()) == as_yaml


def test_import_again_unchanged_then_update(cli, tmp_path):
    path = ROOT / "plans/quickstart-cpu.yaml"
    cli("plan", "import", path)
    assert "nothing changed" in cli("plan", "import", path).output
    changed = tmp_path / "q.yaml"
    changed.write_text(path.read_text().replace("steps: 250", "steps: 500"))
    one_error_line(cli("plan", "import", changed), "exists with other contents; add --update")
    result = cli("plan", "import", changed, "--update")
    assert result.exit_code == 0 and "revision 2" in result.output


def test_edit_makes_a_revision_history_and_diff_show_it(cli):
    cli("plan", "import", ROOT / "plans/quickstart-cpu.yaml")
    result = cli("plan", "edit", "quickstart-cpu", "--set", "training.lr=3e-4",
                 "--set", "stages.pretrain.steps=600", "--reason", "slower, longer")
    assert result.exit_code == 0, result.output
    assert "training.lr" in result.output and "0.0003" in result.output
    history = json.loads(cli("plan", "history", "quickstart-cpu", "--json").stdout)
    assert [(h["revision"], h["reason"]) for h in history] == [
        (1, "imported from quickstart-cpu.yaml"), (2, "slower, longer")]
    assert {c["path"] for c in history[1]["changes"]} == {"training.lr", "stages[pretrain].steps"}
    changes = json.loads(cli("plan", "diff", "quickstart-cpu", "1", "2", "--json").stdout)
    assert {"path": "stages[pretrain].steps", "kind": "changed", "old": 250, "new": 600} in changes
    assert "slower, longer" in cli("plan", "history", "quickstart-cpu").output
    assert "stages[pretrain].steps" in cli("plan", "diff", "quickstart-cpu", "1", "2").output
    assert "are the same plan" in cli("plan", "diff", "quickstart-cpu", "2", "2").output
    old = json.loads(cli("plan", "show", "quickstart-cpu", "--revision", "1", "--json").stdout)
    assert old["spec"]["training"]["lr"] == 0.003 and old["head"] == 2


def test_edit_can_rename_a_plan(cli):
    cli("plan", "import", ROOT / "plans/quickstart-cpu.yaml")
    assert cli("plan", "edit", "quickstart-cpu", "--set", "name=qs").exit_code == 0
    assert [p["name"] for p in json.loads(cli("plan", "list", "--json").stdout)] == ["qs"]
    assert json.loads(cli("plan", "show", "qs", "--json").stdout)["head"] == 2
    one_error_line(cli("plan", "show", "quickstart-cpu"), "no plan 'quickstart-cpu'")


def test_edit_without_change_records_nothing(cli):
    cli("plan", "import", ROOT / "plans/quickstart-cpu.yaml")
    result = cli("plan", "edit", "quickstart-cpu", "--set", "training.lr=0.003")
    assert result.exit_code == 0 and "no change" in result.output
    assert len(json.loads(cli("plan", "history", "1", "--json").stdout)) == 1


def test_edit_replan_rederives_stages(cli):
    cli(*SEED, "--name", "p")
    result = cli("plan", "edit", "p", "--set", "techniques.growth=null", "--replan")
    assert result.exit_code == 0, result.output
    stages = [s["name"] for s in json.loads(cli("plan", "show", "p", "--json").stdout)["spec"]["stages"]]
    assert stages[0] == "pretrain" and "grow" not in stages


def test_delete(cli):
    cli("plan", "import", ROOT / "plans/quickstart-cpu.yaml")
    declined = cli("plan", "delete", "quickstart-cpu", input="n\n")
    assert declined.exit_code == 1 and declined.output.rstrip().endswith("not deleted")
    assert len(json.loads(cli("plan", "list", "--json").stdout)) == 1
    result = cli("plan", "delete", "quickstart-cpu", "--yes")
    assert result.exit_code == 0 and "deleted plan quickstart-cpu" in result.output
    assert json.loads(cli("plan", "list", "--json").stdout) == []


def test_schema_is_json_schema(cli):
    schema = json.loads(cli("plan", "schema").stdout)
    assert schema["title"] == "PlanSpec" and "stages" in schema["properties"]


def test_hardware_table_and_json(cli):
    result = cli("hardware")
    assert result.exit_code == 0 and "cpu" in result.output and "As a plan's compute budget" in result.output
    data = json.loads(cli("hardware", "--json").stdout)
    assert data["cores_logical"] >= 1 and data["ram_gib"] > 0 and "compute_budget" in data


def test_db_option_points_at_another_database(cli, tmp_path):
    url = f"sqlite:///{tmp_path}/team.db"
    assert cli("--db", url, "plan", "import", ROOT / "plans/quickstart-cpu.yaml").exit_code == 0
    assert json.loads(cli("--db", url, "plan", "list", "--json").stdout)[0]["name"] == "quickstart-cpu"
    assert json.loads(cli("plan", "list", "--json").stdout) == []


def test_version(cli):
    assert cli("--version").output.startswith("muse 0.1.0")


@pytest.mark.parametrize("args, message", [
    (["plan", "create", "--model-scale", "10Q"], "--model-scale: '10Q' is not a model scale; scales look like 350M, 1.3B, 10B"),
    (["plan", "create", "--compute-budget", "2xFOO"], "unknown GPU 'FOO'"),
    (["plan", "create", "--target-tasks", "poetry"], "--target-tasks: unknown task 'poetry'"),
    (["plan", "create", "--techniques", "grpo,dpo"], "unknown technique 'dpo'"),
    (["plan", "create", "--timeline", "soon"], "--timeline: 'soon' is not a duration"),
    (["plan", "create", "--name", "quickstart-cpu"], "a plan named 'quickstart-cpu' exists"),
    (["plan", "create", "--from-yaml", "nope.yaml"], "plan file 'nope.yaml' not found"),
    (["plan", "import", "nope.yaml"], "plan file 'nope.yaml' not found"),
    (["plan", "show", "nope"], "no plan 'nope'"),
    (["plan", "show", "quickstart-cpu", "--revision", "9"], "has no revision 9"),
    (["plan", "export", "quickstart-cpu", "--format", "toml"], "unknown format 'toml'"),
    (["plan", "edit", "quickstart-cpu", "--set", "training.lr=-1"], "training.lr: Input should be greater than 0"),
    (["plan", "edit", "quickstart-cpu", "--set", "training.lrr=1"], "unknown field 'lrr'"),
    (["plan", "edit", "quickstart-cpu", "--set", "stages.x.steps=1"], "no item 'x'"),
    (["plan", "edit", "quickstart-cpu"], "nothing to change"),
    (["plan", "diff", "quickstart-cpu", "1", "3"], "has no revision 3"),
    (["plan", "delete", "nope", "--yes"], "no plan 'nope'"),
    (["--db", "nosuch://x", "plan", "list"], "can't open database"),
])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(cli, args, message):
    cli("plan", "import", ROOT / "plans/quickstart-cpu.yaml")
    before = state(cli)
    one_error_line(cli(*args), message)
    assert state(cli) == before


def test_bad_plan_files_write_nothing(cli, tmp_path):
    cases = {"syntax.yaml": "name: [x", "field.yaml": "name: p\nmodle: {}\n", "list.yaml": "- 1\n"}
    for name, text in cases.items():
        (tmp_path / name).write_text(text)
        one_error_line(cli("plan", "import", tmp_path / name), name)
    assert json.loads(cli("plan", "list", "--json").stdout) == []


def test_usage_errors_exit_2(cli):
    assert cli("plan", "create", "--no-such-flag").exit_code == 2
    assert cli("plan", "show").exit_code == 2
