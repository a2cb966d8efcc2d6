"""``muse plan adapt``: proposals from a real tiny run and from hand-made series,
each checked against the stored numbers and the optimizer's models; ``--apply``
stores one revision by adapt; without it nothing changes; errors; no torch."""

from __future__ import annotations

import json
import sqlite3
import statistics
from pathlib import Path

import pytest
import yaml

from conftest import heavy_imports, one_error_line, run_once
from muse_plan.adapt import adapt
from muse_plan.adapt.context import GIB, with_changes
from muse_plan.optimizer import fit as fitting
from muse_plan.plan.io import spec_from_dict, spec_to_dict
from muse_plan.plan.planner import complete
from muse_plan.store import repo, runs
from muse_plan.store.db import Store
from muse_plan.store.models import utcnow
from test_runner import TINY

# the runner tests' tiny plan, with two settings a run can show to be wrong:
# a clip far under its gradient norms, and recomputation it has memory to spare
CLIPPED = {**TINY, "training": {**TINY["training"], "clip_grad_norm": 0.05, "activation_checkpointing": "selective"}}


@pytest.fixture(scope="module")
def real_run(tmp_path_factory) -> Path:
    """A database holding the CLIPPED plan and one completed ``muse plan run`` of it."""
    home = tmp_path_factory.mktemp("adapt-home")
    run_once(home, CLIPPED)
    return home / "muse.db"


@pytest.fixture
def db(real_run, tmp_path) -> str:
    """A private copy of the real run's database (a test may store revisions in it): its URL."""
    copy = tmp_path / "copy.db"
    with sqlite3.connect(real_run) as source, sqlite3.connect(copy) as target:
        source.backup(target)
    return f"sqlite:///{copy}"


def stored(url: str, name: str) -> list[float]:
    with Store(url).read() as session:
        return [v for _, v in runs.metric_series(session, 1, name)]


def revisions(url: str, plan: str = "tiny") -> list[tuple[int, str, str, str]]:
    with Store(url).read() as session:
        return [(r.number, r.author, r.reason, r.spec_json)
                for r in repo.list_revisions(session, repo.get_plan(session, plan))]


# ---- a real run -----------------------------------------------------------------------

def test_a_real_run_gets_proposals_from_its_own_numbers_and_nothing_is_stored(cli, db) -> None:
    before = revisions(db)
    result = cli("--db", db, "plan", "adapt", "tiny", "--json")
    assert result.exit_code == 0, result.output
    out = json.loads(result.output)
    assert out["run"] == {"id": 1, "status": "completed", "revision": 1}
    proposals = {p["rule"]: p for p in out["proposals"]}
    assert list(proposals) == ["clipped_always", "less_recompute"]

    norms = stored(db, "grad_norm")
    clipped = proposals["clipped_always"]
    assert clipped["measured"]["grad_norm_median"] == pytest.approx(statistics.median(norms))
    assert clipped["measured"]["clipped_share"] == sum(v > 0.05 for v in norms) / len(norms) == 1.0
    assert clipped["changes"] == {"training.lr": 0.005}

    recompute = proposals["less_recompute"]
    assert recompute["measured"]["peak_gib"] == pytest.approx(max(stored(db, "memory_gib")))
    assert recompute["changes"] == {"training.activation_checkpointing": "none"}
    assert recompute["predicted"]["speedup"] > 1.03  # the throughput model prices the recomputation saved

    assert {(c["path"], c["old"], c["new"]) for c in out["changes"]} == {
        ("training.lr", 0.01, 0.005), ("training.activation_checkpointing", "selective", "none")}
    assert out["not_recorded"] == ["accuracy", "reward"]  # a pretraining run records no accuracy, no reward
    assert out["stored_revision"] is None
    assert revisions(db) == before  # nothing written

    shown = cli("--db", db, "plan", "adapt", "tiny")
    assert shown.exit_code == 0
    assert "nothing stored; store it with: muse plan adapt tiny --apply" in shown.output
    assert "100% of steps clipped" in " ".join(shown.output.split())
    assert revisions(db) == before


def test_apply_stores_one_revision_by_adapt_and_a_second_adapt_defers_to_a_new_run(cli, db) -> None:
    result = cli("--db", db, "plan", "adapt", "tiny", "--apply")
    assert result.exit_code == 0, result.output
    assert "stored as revision 2 (author adapt)" in result.output
    (_, _, _, old), (number, author, reason, new) = revisions(db)
    assert (number, author) == (2, "adapt")
    assert reason.startswith("adapt from run 1: lr 0.01→0.005 (median gradient norm ")
    assert "activation_checkpointing selective→none (peak memory " in reason
    new_training = json.loads(new)["training"]
    assert new_training["lr"] == 0.005 and new_training["activation_checkpointing"] == "none"
    assert {k: v for k, v in json.loads(old).items() if k != "training"} == \
        {k: v for k, v in json.loads(new).items() if k != "training"}

    again = json.loads(cli("--db", db, "plan", "adapt", "tiny", "--apply", "--json").output)
    assert again["proposals"] == [] and again["stored_revision"] is None
    assert [p["rule"] for p in again["set_aside"]] == ["clipped_always"]
    assert "changed by revision 2 after run 1" in again["set_aside"][0]["why"]
    assert len(revisions(db)) == 2


def test_chosen_metrics_and_targets_pick_the_rules(cli, db) -> None:
    out = json.loads(cli("--db", db, "plan", "adapt", "tiny", "--performance-metrics", "loss",
                         "--optimization-targets", "stability,compute_efficiency", "--json").output)
    assert out["proposals"] == []
    assert {s["rule"]: s["why"] for s in out["skipped"]} == {
        "clipped_always": "reads grad_norm; add it to --performance-metrics",
        "less_recompute": "reads throughput; add it to --performance-metrics",
        "larger_micro_batch": "reads throughput; add it to --performance-metrics"}
    assert {c["rule"] for c in out["checked"]} == {"loss_spikes", "memory_pressure"}  # plateau serves neither
    assert {row["series"] for row in out["evidence"]} == {"loss", "val_loss", "memory_gib"}


def test_bad_names_and_missing_runs_are_one_line_errors(cli, db, tmp_path) -> None:
    one_error_line(cli("--db", db, "plan", "adapt", "tiny", "--performance-metrics", "loss,speed"),
                   "--performance-metrics: unknown 'speed'; accepted: loss, throughput, accuracy, grad_norm")
    one_error_line(cli("--db", db, "plan", "adapt", "tiny", "--optimization-targets", "fast"),
                   "accepted: convergence_speed, memory_efficiency, stability, compute_efficiency")
    one_error_line(cli("--db", db, "plan", "adapt", "tiny", "--run", "7"), "no run '7'")
    plan_file = tmp_path / "other.yaml"
    plan_file.write_text(yaml.safe_dump({**TINY, "name": "other"}))
    assert cli("--db", db, "plan", "import", plan_file).exit_code == 0
    one_error_line(cli("--db", db, "plan", "adapt", "other"),
                   "plan 'other' has no run to adapt from; run it first with: muse plan run other")
    one_error_line(cli("--db", db, "plan", "adapt", "other", "--run", "1"), "run 1 belongs to plan 'tiny', not 'other'")
    assert len(revisions(db)) == 1


# ---- hand-made series -------------------------------------------------------------------

H100 = {
    "name": "h100", "model": {"scale": "350M", "seq_len": 2048, "vocab_size": 32000},
    "compute": "1xH100",
    "training": {"precision": "bf16", "micro_batch": 2, "grad_accum": 8, "global_batch": 16, "lr": 3e-4,
                 "activation_checkpointing": "none"},
    "stages": [{"name": "pretrain", "kind": "pretrain", "steps": 100}],
}


def hand_run(store: Store, plan: dict, series: dict[str, dict[str, list[float]]]) -> int:
    """A completed run of ``plan`` whose stages recorded ``series`` (stage → name → values from step 1)."""
    spec = complete(spec_from_dict(plan))
    with store.write() as session:
        stored_plan, revision = repo.create_plan(session, spec)
        run = runs.create_run(session, stored_plan, revision.number,
                              [(s.name, s.steps or 100) for s in spec.stages], "/tmp/muse-runs")
        for stage in runs.stage_runs(session, run):
            points = [(i + 1, name, v) for name, values in series.get(stage.name, {}).items()
                      for i, v in enumerate(values)]
            runs.add_metrics(session, run.id, stage.id, points)
        run.status, run.finished_at = "completed", utcnow()
        return run.id


def flat(value: float, n: int = 100) -> list[float]:
    return [value] * n


def test_memory_headroom_on_an_h100_proposes_the_fastest_micro_batch_that_fits(store) -> None:
    hand_run(store, H100, {"pretrain": {"memory_gib": flat(12.0), "tokens_per_s": flat(40_000.0)}})
    done = adapt(store, "h100", targets="memory_efficiency")
    [p] = done.proposals
    assert p.rule == "larger_micro_batch"
    new = dict((path[-1], value) for path, value in p.changes)
    assert new["micro_batch"] * new["grad_accum"] == 16 and new["micro_batch"] > 2  # global batch kept
    # the optimizer's models, asked directly, agree with what the proposal says
    spec = repo_spec(store, "h100")
    hw = fitting.hardware_for(spec)
    before = fitting.price(spec, hw)
    after_spec = with_changes(spec, p.changes)
    after = fitting.price(after_spec, hw)
    assert after.fits
    assert p.predicted["speedup"] == pytest.approx(before.seconds / after.seconds) and p.predicted["speedup"] >= 1.03
    assert p.predicted["calibrated_peak_gib"] == pytest.approx(12.0 + (after.peak - before.peak) / GIB)
    assert p.predicted["calibrated_peak_gib"] <= hw.limit_bytes / GIB
    assert [c.path for c in done.changes] == ["training.micro_batch", "training.grad_accum"]


def repo_spec(store: Store, name: str):
    with store.read() as session:
        return repo.spec_of(repo.get_revision(session, repo.get_plan(session, name)))


def test_a_nearly_full_device_gets_checkpointing_and_no_larger_batch(store) -> None:
    hand_run(store, H100, {"pretrain": {"memory_gib": flat(76.0), "tokens_per_s": flat(40_000.0)}})
    done = adapt(store, "h100", targets="memory_efficiency")
    [p] = done.proposals
    assert (p.rule, p.summary) == ("memory_pressure", "activation_checkpointing none→selective")
    assert p.measured["device_share"] == pytest.approx(76.0 / 80.0)
    assert p.predicted["speedup"] < 1.0  # recomputation costs time, and the proposal says how much
    assert dict(done.checked)["larger_micro_batch"].endswith("no headroom under the 50% mark")


def test_loss_spikes_get_a_clip_at_the_measured_90th_percentile(store) -> None:
    loss = [3.0 + 0.01 * (i % 5) for i in range(100)]
    loss[60] = 6.0
    norms = [1.0 + 0.02 * (i % 10) for i in range(100)]
    norms[59] = 9.0  # the step before the spike
    plan = {**H100, "training": {**H100["training"], "clip_grad_norm": 5.0}}
    hand_run(store, plan, {"pretrain": {"loss": loss, "grad_norm": norms}})
    done = adapt(store, "h100", targets="stability")
    [p] = done.proposals
    assert p.rule == "loss_spikes" and p.title == "tighter gradient clipping"
    new_clip = p.changes[0][1]
    assert statistics.median(norms) < new_clip < 5.0
    assert new_clip == pytest.approx(sorted(norms)[90], rel=0.05)
    assert p.predicted["spikes_clipped"] == 1.0
    assert "1 loss spike(s) above z = 4 in 100 steps: pretrain step 61" in p.evidence[0]


def test_two_rules_on_one_field_keep_the_first_and_set_the_other_aside(store) -> None:
    loss = [3.0 + 0.01 * (i % 5) for i in range(100)]
    loss[60] = 6.0
    plan = {**H100, "training": {**H100["training"], "clip_grad_norm": 1.0}}
    hand_run(store, plan, {"pretrain": {"loss": loss, "grad_norm": flat(20.0)}})
    done = adapt(store, "h100", targets="stability")
    assert [p.rule for p in done.proposals] == ["loss_spikes"]
    assert done.spec.training.lr == pytest.approx(1.5e-4)  # halved once, not twice
    [(aside, why)] = done.set_aside
    assert aside.rule == "clipped_always" and why == "loss_spikes already sets training.lr"


def plateau_curve(n: int = 100, flat_from: int = 40) -> list[float]:
    return [5.0 - 0.05 * min(i, flat_from) + 0.001 * (i % 3) for i in range(n)]


def test_a_plateau_before_growth_moves_the_growth_earlier(store) -> None:
    plan = {"name": "grower", "model": {"scale": "350M", "seq_len": 2048}, "compute": "1xH100",
            "techniques": {"growth": {"operator": "g_stack", "factor": 4, "at_fraction": 0.25}}}
    spec = complete(spec_from_dict(plan))
    small, grow, cont = spec.stages
    hand_run(store, {**spec_to_dict(spec), "name": "grower"}, {small.name: {"loss": plateau_curve()}})
    done = adapt(store, "grower", targets="convergence_speed", metrics="loss")
    [p] = done.proposals
    assert p.title == "earlier growth"
    step = int(p.measured["plateau_step"])
    assert 41 <= step <= 41 + 12  # the curve flattens at step 41; blocks of 12 steps resolve it
    assert p.predicted["at_fraction"] == pytest.approx(0.25 * step / 100, abs=0.001)
    new = done.spec
    assert new.techniques.growth.at_fraction == p.predicted["at_fraction"]
    from muse_plan.plan.units import parse_scale

    old_total = parse_scale(small.tokens) + parse_scale(cont.tokens)
    new_total = parse_scale(new.stages[0].tokens) + parse_scale(new.stages[2].tokens)
    assert new_total == pytest.approx(old_total, rel=0.02)  # budget moved, not added
    assert parse_scale(new.stages[0].tokens) == pytest.approx(parse_scale(small.tokens) * step / 100, rel=0.05)
    assert {c.path for c in done.changes} == {"techniques.growth.at_fraction", f"stages[{small.name}].tokens",
                                             f"stages[{cont.name}].tokens"}


def test_a_plateau_without_growth_lowers_the_rate_or_decays_it(store) -> None:
    hand_run(store, H100, {"pretrain": {"loss": plateau_curve()}})
    [p] = adapt(store, "h100", targets="convergence_speed", metrics="loss").proposals
    assert (p.title, p.summary) == ("smaller learning rate", "lr 0.0003→0.00015")
    constant = {**H100, "name": "constant", "training": {**H100["training"], "schedule": "constant"}}
    hand_run(store, constant, {"pretrain": {"loss": plateau_curve()}})
    [p] = adapt(store, "constant", targets="convergence_speed", metrics="loss").proposals
    assert p.changes == ((("training", "schedule"), "cosine"),)
    steady = {**H100, "name": "steady"}
    hand_run(store, steady, {"pretrain": {"loss": [5.0 - 0.02 * i for i in range(100)]}})
    done = adapt(store, "steady", targets="convergence_speed", metrics="loss")
    assert done.proposals == [] and dict(done.checked)["plateau"].startswith("no plateau")


def test_adapt_imports_no_torch(store, muse_home) -> None:
    hand_run(store, H100, {"pretrain": {"memory_gib": flat(12.0), "tokens_per_s": flat(40_000.0),
                                        "loss": plateau_curve()}})
    assert heavy_imports(muse_home, [["plan", "adapt", "h100"], ["plan", "adapt", "h100", "--json"]]) == "none"


RL_H100 = {
    "name": "rl-h100", "model": {"scale": "40M", "seq_len": 160},
    "compute": "1xH100",
    "training": {"precision": "bf16", "micro_batch": 16, "lr": 1e-4},
    "stages": [{"name": "grpo", "kind": "reasoning_rl", "steps": 100,
                "options": {"tasks": ["multiplication:3x3"], "group_size": 8, "max_new_tokens": 112}}],
}


def test_an_rl_stage_whose_groups_all_score_alike_gets_larger_groups_priced(store) -> None:
    """The H100 regime of docs/bench_grpo.md: 2% training accuracy, 97% of the groups of 8 all-zero."""
    hand_run(store, RL_H100, {"grpo": {"equal_groups": flat(0.97), "train_accuracy": flat(0.02),
                                       "memory_gib": flat(2.15)}})
    done = adapt(store, "rl-h100")
    [p] = [p for p in done.proposals if p.rule == "no_signal"]
    assert p.changes == ((("stages", "grpo", "options", "group_size"), 16),) and p.summary == "group_size 8→16"
    assert p.predicted["informative_share_now"] == pytest.approx(1 - 0.98 ** 8 - 0.02 ** 8)
    assert p.predicted["informative_share"] == pytest.approx(1 - 0.98 ** 16 - 0.02 ** 16)
    assert "97% of grpo's groups scored all alike" in p.evidence[0] and "measured now 3%" in p.effect
    spec = with_changes(repo_spec(store, "rl-h100"), p.changes)
    assert fitting.stage_settings(spec, fitting.hardware_for(spec))[0].options.group_size == 16


def test_an_rl_stage_with_signal_in_most_groups_is_left_alone(store) -> None:
    hand_run(store, RL_H100, {"grpo": {"equal_groups": flat(0.5), "train_accuracy": flat(0.4),
                                       "memory_gib": flat(2.15)}})
    done = adapt(store, "rl-h100")
    assert not [p for p in done.proposals if p.rule == "no_signal"]
    assert dict(done.checked)["no_signal"] == \
        "50% of grpo's groups scored all alike (mean over 100 steps): under 80%"


def test_an_rl_policy_that_stood_still_gets_a_larger_step_on_every_layer(store) -> None:
    """The H100 regime of issue 21: a KL of ~5e-6 after the stage (lr 1e-4, LoRA on the last quarter) taught
    nothing; lr 1e-3 with LoRA on every layer taught +5.8 points. Both are proposed, priced, and apply."""
    plan = {**RL_H100, "techniques": {"lora": {"rank": 8, "layers_fraction": 0.25}}}
    hand_run(store, plan, {"grpo": {"kl": flat(5e-6), "equal_groups": flat(0.94), "memory_gib": flat(2.2)}})
    done = adapt(store, "rl-h100")
    [p] = [p for p in done.proposals if p.rule == "still_policy"]
    assert p.summary == "lr 0.0001→0.001, LoRA on the last 25% of the layers→all of them"
    assert p.measured["kl"] == pytest.approx(5e-6) and p.predicted["lr"] == pytest.approx(1e-3)
    assert "94% of its groups scored all alike" in p.evidence
    stored = repo_spec(store, "rl-h100")
    [s] = fitting.stage_settings(with_changes(stored, p.changes), fitting.hardware_for(stored))
    assert s.lr == pytest.approx(1e-3) and s.lora.layers_fraction == 1.0 and s.lora.rank == 8
    assert fitting.stage_settings(stored, fitting.hardware_for(stored))[0].lora.layers_fraction == 0.25


def test_an_rl_policy_that_moved_is_left_alone(store) -> None:
    hand_run(store, RL_H100, {"grpo": {"kl": [1e-6] * 90 + [5e-3] * 10, "memory_gib": flat(2.2)}})
    done = adapt(store, "rl-h100")
    assert not [p for p in done.proposals if p.rule == "still_policy"]
    assert dict(done.checked)["still_policy"] == \
        "grpo's KL to its reference over the last tenth of 100 steps: 0.005: the policy moved (at least 0.0001)"


def test_a_t_spmo_stage_whose_loss_was_its_decay_gets_no_decay(store) -> None:
    """The H100 T-SPMO runs: the loss was λΣ‖A‖² (0.1605 falling to 0.070) and a policy term of ~0.3% of it."""
    plan = {**RL_H100, "stages": [{**RL_H100["stages"][0], "name": "tspmo",
                                   "options": {**RL_H100["stages"][0]["options"], "algorithm": "t_spmo"}}]}
    l2 = [0.1605 - 0.0009 * i for i in range(100)]
    hand_run(store, plan, {"tspmo": {"l2_term": l2, "loss": [v * 1.003 for v in l2], "memory_gib": flat(1.7)}})
    done = adapt(store, "rl-h100")
    [p] = [p for p in done.proposals if p.rule == "decay_only"]
    assert p.changes == ((("stages", "tspmo", "options", "l2_lambda"), 0.0),) and p.summary == "l2_lambda 0.01→0"
    assert p.measured["policy_share"] == pytest.approx(0.003)
    stored = repo_spec(store, "rl-h100")
    assert fitting.stage_settings(with_changes(stored, p.changes), fitting.hardware_for(stored))[0].options.l2_lambda \
        == 0.0


def test_a_t_spmo_stage_whose_policy_term_counts_keeps_its_decay(store) -> None:
    plan = {**RL_H100, "stages": [{**RL_H100["stages"][0], "name": "tspmo",
                                   "options": {**RL_H100["stages"][0]["options"], "algorithm": "t_spmo"}}]}
    hand_run(store, plan, {"tspmo": {"l2_term": flat(0.1), "loss": flat(0.05), "memory_gib": flat(1.7)}})
    done = adapt(store, "rl-h100")
    assert not [p for p in done.proposals if p.rule == "decay_only"]
    assert dict(done.checked)["decay_only"].endswith(": the policy term counts (at least 5%)")


def test_an_rl_stages_surrogate_loss_is_no_plateau_and_has_no_spikes(store) -> None:
    """As the monitor's alerts: a GRPO loss flat around zero with one group's success is neither a plateau
    to halve the lr for nor a spike (the CPU reasoning plan's GRPO stage drew both before)."""
    loss = [-0.002] * 60 + [0.4] + [-0.002] * 39
    hand_run(store, RL_H100, {"grpo": {"loss": loss, "grad_norm": flat(0.01), "memory_gib": flat(2.2)}})
    done = adapt(store, "rl-h100")
    assert not [p for p in done.proposals if p.rule in ("plateau", "loss_spikes")]
    checked = dict(done.checked)
    assert checked["plateau"] == "no plateau over a quarter of a stage (no loss recorded)"
    assert checked["loss_spikes"] == "no loss spike above z = 4 in 0 steps"
