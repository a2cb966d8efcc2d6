import pytest

from muse_plan.errors import PlanError
from muse_plan.plan.diff import MISSING, diff, flatten
from muse_plan.plan.edit import apply_sets, parse_value


def test_flatten_keys_stages_by_name():
    data = {"training": {"lr": 0.1}, "stages": [{"name": "a", "steps": 5, "options": {"x": 1}}]}
    assert flatten(data) == {"training.lr": 0.1, "stages[a].steps": 5, "stages[a].options.x": 1}


def test_diff_reports_changed_added_removed():
    old = {"training": {"lr": 0.1, "seed": 0}, "stages": [{"name": "a", "steps": 5}]}
    new = {"training": {"lr": 0.2, "seed": 0, "precision": "bf16"},
           "stages": [{"name": "a", "steps": 5}, {"name": "b", "steps": 1}]}
    changes = {c.path: (c.kind, c.old, c.new) for c in diff(old, new)}
    assert changes == {
        "training.lr": ("changed", 0.1, 0.2),
        "training.precision": ("added", MISSING, "bf16"),
        "stages[b].steps": ("added", MISSING, 1),
    }
    assert [c.kind for c in diff(new, old)].count("removed") == 2


def test_identical_dicts_have_no_diff():
    assert diff({"a": {"b": [1, 2]}}, {"a": {"b": [1, 2]}}) == []


@pytest.mark.parametrize("raw, value", [("3e-4", 3e-4), ("8", 8), ("true", True), ("null", None),
                                        ("[a, b]", ["a", "b"]), ("{rank: 8}", {"rank": 8}), ("bf16", "bf16"),
                                        ("1e3", 1000.0)])
def test_parse_value(raw, value):
    assert parse_value(raw) == value


def test_apply_sets_addresses_stages_by_name_or_index_and_leaves_input_alone():
    data = {"training": {}, "stages": [{"name": "pre", "steps": 5}, {"name": "rl", "steps": 2}]}
    out = apply_sets(data, ["training.lr=3e-4", "stages.rl.steps=9", "stages.0.steps=7", "techniques.lora={}"])
    assert out["training"]["lr"] == 3e-4 and out["techniques"] == {"lora": {}}
    assert [s["steps"] for s in out["stages"]] == [7, 9]
    assert data["stages"][0]["steps"] == 5 and "lr" not in data["training"]


def test_null_removes_a_field():
    out = apply_sets({"techniques": {"lora": {}, "mhc": {}}, "training": {"lr": 0.1}},
                     ["techniques.lora=null", "training.lr=null"])
    assert out == {"techniques": {"mhc": {}}, "training": {}}


@pytest.mark.parametrize("assignment, message", [
    ("training.lr", "write FIELD=VALUE"),
    ("=3", "write FIELD=VALUE"),
    ("stages.nope.steps=1", "no item 'nope'; there are pre"),
    ("training.lr.x=1", "training.lr is a value"),
])
def test_apply_sets_errors(assignment, message):
    with pytest.raises(PlanError, match=message):
        apply_sets({"training": {"lr": 0.1}, "stages": [{"name": "pre"}]}, [assignment])


def test_a_rewrite_is_laid_on_the_head_keeping_edits_made_since():
    from muse_plan.plan.merge import merge

    base = {"name": "p", "training": {"lr": 0.003}, "stages": [{"name": "a", "steps": 10}, {"name": "b", "steps": 5}]}
    ours = {"name": "p", "training": {"lr": 0.003},
            "stages": [{"name": "a", "steps": 10, "training": {"micro_batch": 8}}, {"name": "b", "steps": 5}]}
    head = {"name": "p", "description": "mine", "training": {"lr": 0.001},
            "stages": [{"name": "a", "steps": 20}, {"name": "b", "steps": 5}]}
    out = merge(base, ours, head)
    assert out.data == {"name": "p", "description": "mine", "training": {"lr": 0.001},
                        "stages": [{"name": "a", "steps": 20, "training": {"micro_batch": 8}},
                                   {"name": "b", "steps": 5}]}
    assert [c.path for c in out.kept] == ["training.lr", "stages[a].steps", "description"]
    assert out.conflicts == [] and [c.path for c in out.applied] == ["stages[a].training.micro_batch"]
    assert head["training"] == {"lr": 0.001} and "training" not in head["stages"][0]  # inputs untouched


def test_a_field_both_changed_is_a_named_conflict_and_a_vanished_stage_drops_the_change():
    from muse_plan.plan.merge import merge

    base = {"training": {"lr": 0.003}, "stages": [{"name": "a", "steps": 10}]}
    ours = {"training": {"lr": 0.003}, "stages": [{"name": "a", "steps": 10, "training": {"lr": 0.0015}}]}
    head = {"training": {"lr": 0.002}, "stages": [{"name": "a", "steps": 10}]}
    out = merge(base, ours, head)  # the stage's own lr overrides the plan's: one field, so a conflict
    assert out.data["stages"][0]["training"] == {"lr": 0.0015} and out.data["training"] == {"lr": 0.002}
    assert [c.describe() for c in out.conflicts] == ["training.lr: 0.002 in the head, the rewrite writes 0.0015"]
    assert out.kept == [] and "conflict with an edit made since" in out.describe()
    gone = merge(base, ours, {"training": {"lr": 0.003}, "stages": [{"name": "z", "steps": 3}]})
    assert gone.data["stages"] == [{"name": "z", "steps": 3}] and gone.applied == []
    assert [c.describe() for c in gone.conflicts] == ["stages[a].training.lr: not written, its stage is gone "
                                                      "from the head"]
    same = merge(base, ours, ours)  # the head already has it: nothing to apply, nothing clashes
    assert same.data == ours and same.conflicts == [] and same.applied == []
