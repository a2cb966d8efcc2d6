import pytest
import yaml

from conftest import PLANS
from muse_plan import api
from muse_plan.errors import PlanError
from muse_plan.plan import io
from muse_plan.plan.planner import complete


@pytest.mark.parametrize("path", PLANS, ids=lambda p: p.name)
def test_bundled_plans_round_trip_yaml_store_yaml(path, store, tmp_path):
    stored = api.import_file(store, str(path))
    exported = io.dump_yaml(api.show(store, stored.plan.name).spec)
    assert io.load_text(exported) == complete(io.load_file(path))
    # the exported file, stored again under another name and exported, is the same text
    copy = tmp_path / "copy.yaml"
    copy.write_text(exported)
    api.import_file(store, str(copy), name="copy")
    exported_copy = io.dump_yaml(api.show(store, "copy").spec)
    assert exported_copy == exported.replace(f"name: {stored.plan.name}\n", "name: copy\n", 1)


def test_json_and_yaml_dumps_hold_the_same_plan():
    spec = complete(io.load_file(PLANS[0]))
    assert io.load_text(io.dump(spec, "json")) == io.load_text(io.dump(spec, "yaml")) == spec


def test_dump_leaves_out_open_fields():
    data = yaml.safe_load(io.dump_yaml(io.spec_from_dict({"name": "p"})))
    assert "compute" not in data and "lr" not in data["training"]


@pytest.mark.parametrize("text, message", [
    ("name: [unclosed", "not valid YAML at line 1"),
    ("- a\n- b\n", "a plan is a mapping of fields"),
    ("name: p\nmodel: {scale: 10Q}\n", "model.scale: '10Q' is not a model scale"),
    ("", "a plan is a mapping"),
])
def test_bad_text_is_one_clear_line(text, message):
    with pytest.raises(PlanError) as err:
        io.load_text(text, source="f.yaml")
    assert message in str(err.value) and str(err.value).startswith("f.yaml: ")
    assert "\n" not in str(err.value)


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(PlanError, match="not found"):
        io.load_file(tmp_path / "nope.yaml")
    with pytest.raises(PlanError, match="is a directory"):
        io.load_file(tmp_path)


def test_yaml_is_loaded_safely(tmp_path):
    path = tmp_path / "evil.yaml"
    path.write_text("name: !!python/object/apply:os.system ['echo hi']\n")
    with pytest.raises(PlanError, match="not valid YAML"):
        io.load_file(path)
