"""Data-aware planning: epochs and effective tokens by Muennighoff et al.'s law (checked
on values worked by hand), a plan's corpus counted and priced in `muse plan optimize`,
the 10B-on-8GB user's honest proposal, and alternatives ranked and timed consistently."""

from __future__ import annotations

import json
import math

import pytest

from muse_plan.errors import PlanError
from muse_plan.optimizer import data_budget as budget
from muse_plan.optimizer import fit as fitting
from muse_plan.optimizer.data_size import measure
from muse_plan.plan.io import spec_from_dict
from muse_plan.plan.planner import complete
from muse_plan.plan.spec import DataSpec
from muse_plan.plan.units import approx_duration, parse_scale
from tests.conftest import TINY_STANDARD, write_plan
from tests.test_fit import HOST, bundled


# ---- the law, against hand-worked values -----------------------------------------

def test_epochs_and_effective_tokens_match_the_papers_formula_by_hand() -> None:
    # U_D = 100M unique tokens, D = 1B trained: 10 epochs, R_D = 9 repetitions.
    # D' = U + U·R*·(1 − e^(−R/R*)), R* = 15.387756:
    #   9 / 15.387756 = 0.5848806;  e^−0.5848806 = 0.5571724;  1 − 0.5571724 = 0.4428276
    #   15.387756 × 0.4428276 = 6.814123;  D' = 100M × (1 + 6.814123) = 781.41M
    assert budget.epochs(1e9, 100e6) == 10
    assert budget.repetitions(1e9, 100e6) == 9
    assert budget.effective_tokens(1e9, 100e6) == pytest.approx(781.4123e6, rel=1e-6)
    # 4 epochs (R = 3): 3 / 15.387756 = 0.1949602, e^− = 0.8228674, × R* of its complement 2.725673:
    # D' = 372.57M, 93% of the 400M trained: the paper's "up to 4 epochs cost next to nothing"
    assert budget.effective_tokens(400e6, 100e6) == pytest.approx(372.5673e6, rel=1e-6)
    # up to one epoch every token is new; past it, D' never reaches U·(1 + R*)
    assert budget.effective_tokens(60e6, 100e6) == 60e6
    assert budget.effective_tokens(1e13, 100e6) <= 100e6 * (1 + budget.R_D_STAR)


def test_the_laws_parameter_side_and_its_chinchilla_ratio() -> None:
    # G = (αA/(βB))^(1/(α+β)), α = β = 0.3526596: A/B = e^(6.255414 − 7.3049974) = 0.3500836,
    # G = 0.3500836^(1/0.7053192) = 0.2258019, N_opt(D) = D·G² = D / 19.613
    assert budget.data_optimal_params(1.96e9) == pytest.approx(1.96e9 / 19.613028, rel=1e-6)
    u_n = budget.data_optimal_params(100e6)  # 5.1M parameters are all 100M tokens feed fully
    assert budget.effective_params(u_n / 2, 100e6) == pytest.approx(u_n / 2)
    # 10 × U_N: R_N = 9, N' = U_N·(1 + 5.309743·(1 − e^(−9/5.309743))) = U_N × 5.3895
    expected = u_n * (1 + 5.309743 * (1 - math.exp(-9 / 5.309743)))
    assert budget.effective_params(10 * u_n, 100e6) == pytest.approx(expected)


def test_stages_are_priced_at_the_repetition_they_reach() -> None:
    first, second = budget.stage_data([("small", 200e6), ("continue", 300e6)], 100e6)
    assert (first.epochs, first.before, second.epochs, second.through) == (2, 0, 3, 5)
    assert first.effective + second.effective == pytest.approx(budget.effective_tokens(500e6, 100e6))
    assert not first.warning and second.warning  # 5 epochs through the continue stage: past 4


def test_the_best_size_spends_the_timeline_but_not_past_the_epoch_cap() -> None:
    small = budget.SizeOption(50_000_000, 42_000_000, 1 / 14_000)
    mid = budget.SizeOption(125_000_000, 110_000_000, 1 / 6_000)
    large = budget.SizeOption(350_000_000, 336_000_000, 1 / 1_600)
    choice = budget.best_size([small, mid, large], 95e6, 7 * 86400)
    assert choice.option is mid
    assert choice.epochs == pytest.approx(budget.MAX_EPOCHS)  # 3 days of the 7: more epochs buy too little
    more = budget.best_size([small, mid, large], 4 * 95e6, 7 * 86400)
    assert more.seconds == pytest.approx(7 * 86400)  # with 4× the data the week is the limit
    assert 1 < more.epochs < choice.epochs


# ---- the data a plan holds ---------------------------------------------------------

def _corpus(folder):
    folder.mkdir()
    (folder / "a.txt").write_text("こんにちは世界\n" * 500, encoding="utf-8")  # 22 bytes a line
    lines = [json.dumps({"text": f"問題 {i}: 3 + {i}"}, ensure_ascii=False) for i in range(200)]
    (folder / "b.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    texts = [f"問題 {i}: 3 + {i}" for i in range(200)]
    # byte tokenizer: a token a UTF-8 byte; EOS once after the plain file, after every .jsonl document
    return 22 * 500 + 1 + sum(len(t.encode("utf-8")) + 1 for t in texts)


def test_a_local_folder_is_counted_exactly_a_missing_one_declared_or_unknown(tmp_path) -> None:
    total = _corpus(tmp_path / "corpus")
    size = measure(DataSpec(source=str(tmp_path / "corpus")))
    assert (size.how, size.tokens) == ("counted", total)
    assert size.unique == total - round(total * 0.05)  # the run's own train/validation split
    missing = str(tmp_path / "elsewhere")
    assert measure(DataSpec(source=missing, tokens="100M")).how == "declared"
    assert measure(DataSpec(source=missing, tokens="100M")).unique == 95e6
    unknown = measure(DataSpec(source=missing))
    assert unknown.how == "unknown" and not unknown.bounded and "data.tokens" in unknown.detail
    assert not measure(DataSpec()).bounded  # arithmetic: generated without limit


def test_a_large_corpus_is_estimated_from_a_sample(tmp_path) -> None:
    line = "学習データの一行です。This line mixes scripts.\n"
    (tmp_path / "big.txt").write_text(line * 120_000, encoding="utf-8")  # ~6.8 MB, over the sample's size
    size = measure(DataSpec(source=str(tmp_path / "big.txt")), exact_bytes=0)
    truth = len(line.encode("utf-8")) * 120_000 + 1
    assert size.how == "estimated" and "sampled" in size.detail
    assert size.tokens == pytest.approx(truth, rel=0.01)


def test_data_tokens_is_refused_for_generated_data() -> None:
    with pytest.raises(PlanError, match="generated as needed"):
        spec_from_dict({"name": "x", "data": {"source": "arithmetic", "tokens": "100M"}}, "test")


def test_optimize_json_gives_a_local_folders_tokens_and_each_stages_epochs(cli, tmp_path) -> None:
    total = _corpus(tmp_path / "corpus")
    stages = [{**TINY_STANDARD["stages"][0], "steps": 400}]  # 400 × 8 sequences × 32 tokens = 102,400 tokens
    path = write_plan(tmp_path, TINY_STANDARD, name="local", stages=stages,
                      data={"source": str(tmp_path / "corpus"), "tokenizer": "byte"})
    assert cli("plan", "import", path).exit_code == 0
    result = cli("plan", "optimize", "local", "--dry-run", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)["data"]
    unique = total - round(total * 0.05)
    assert (data["how"], data["tokens"], data["unique_tokens"]) == ("counted", total, unique)
    (stage,) = data["stages"]
    assert stage["tokens"] == 102_400 and stage["epochs"] == pytest.approx(102_400 / unique)
    assert stage["effective_tokens"] == pytest.approx(budget.effective_tokens(102_400, unique))
    assert stage["warning"] is True  # 7.3 epochs
    best = data["best_use"]  # the plan fits, but its data runs out: the best use of it is offered
    assert best["kind"] == "best_use" and best["data"]["epochs"] <= budget.MAX_EPOCHS + 0.01
    shown = cli("plan", "optimize", "local", "--dry-run").output
    assert f"stage pretrain: 102K tokens, {102_400 / unique:.1f} epochs" in shown
    assert "The best use of your 14K training tokens: 1M" in shown


# ---- the 10B-on-one-8GB-card user with 100M tokens ----------------------------------

def test_the_10b_japanese_user_hears_an_honest_size_within_the_week_and_its_epochs() -> None:
    spec = bundled("muse-10b-japanese")
    hw = fitting.hardware_for(spec, host=HOST)
    result = fitting.fit(spec, hw)
    assert result.data.size.how == "declared" and result.data.size.unique == 95e6
    assert result.data.binding and all(s.warning for s in result.data.stages)
    first = result.alternatives[0]
    assert first.key == "best_use" and first is result.data.proposal
    assert first.result.eta.meets and first.result.eta.total_s <= 7 * 86400
    assert first.spec.model.n_params_nominal < parse_scale("1B")  # honest: nowhere near 10B
    epochs = first.data["epochs"]
    assert 1 < epochs <= budget.MAX_EPOCHS + 0.01
    assert f"{epochs:,.1f} epochs" in first.detail and "with 4× the data" in first.detail
    more = first.data["more_data"]
    # 4× the data is worth more new tokens (the week's compute may then read it as often)
    assert more["unique_tokens"] == 4 * 95e6 and more["effective_tokens"] > first.data["effective_tokens"]


@pytest.mark.parametrize("plan", ["muse-10b-japanese", "readme-10b"])
def test_alternatives_within_the_timeline_come_first(plan) -> None:
    spec = bundled(plan) if plan != "readme-10b" else _readme_plan()
    result = fitting.fit(spec, fitting.hardware_for(spec, host=HOST))
    order = [a.within_timeline for a in result.alternatives]
    assert order[0] and order == sorted(order, reverse=True)
    over = [a for a in result.alternatives if not a.within_timeline and a.hardware == result.hardware]
    assert [a.kept for a in over] == sorted((a.kept for a in over), reverse=True)


def _readme_plan():
    """The README's `muse plan create --model-scale 10B --target-tasks reasoning,knowledge
    --techniques grpo,mhc,growth --compute-budget 1xRTX3080-8GB --timeline 7days`."""
    from muse_plan.plan.flags import overlay_flags

    data = overlay_flags({"name": "readme"}, model_scale="10B", target_tasks="reasoning,knowledge",
                         techniques="grpo,mhc,growth", compute_budget="1xRTX3080-8GB", timeline="7days")
    return complete(spec_from_dict(data, "plan"))


def test_one_case_says_one_time_wherever_it_appears() -> None:
    """The largest model from scratch and the growth path's from-scratch comparison are the
    same run (same model, budget and hardware): one fit, one number (it read 56 and 54 days)."""
    from muse_plan.optimizer.alternatives import growth_saving

    spec = _readme_plan()
    hw = fitting.hardware_for(spec, host=HOST)
    result = fitting.fit(spec, hw)
    largest = next(a for a in result.alternatives if a.key == "largest")
    growth = next(a for a in result.alternatives if a.key == "growth")
    assert growth.spec.model.scale == largest.spec.model.scale
    saving = growth_saving(growth.spec, growth.result, hw)
    assert saving.scratch_s == largest.seconds
    days = approx_duration(largest.seconds)
    assert f": {days} (over the 7days timeline)" in largest.detail
    assert f"against {days} and" in growth.detail
