"""The grow stage in a run: small pretrain → grow → continue through ``muse plan run``,
the growth recorded, the continue stage starting from the grown weights and
resuming from its own checkpoint taken after the growth, LiGO in a plan, the
re-warmup, refusals before a run exists, and ``muse plan show``'s shapes."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from muse_plan.errors import RunInterrupted
from muse_plan.executor.runner import run_plan
from muse_plan.store import repo, runs
from muse_plan.store.db import Store

pytestmark = pytest.mark.usefixtures("one_thread")  # two shared cores: more threads only contend

SMALL = {"layers": 2, "d_model": 32, "n_heads": 2}
PLAN = {
    "name": "grow",
    "model": {"scale": "1M", "residual": "mhc", "seq_len": 32, "vocab_size": 260,
              "shape": {"layers": 4, "d_model": 32, "n_heads": 2}},
    "techniques": {"mhc": {"streams": 2, "sinkhorn_iters": 5},
                   "growth": {"operator": "g_stack", "factor": 2, "function_preserving": True}},
    "compute": "cpu",
    "training": {"micro_batch": 4, "grad_accum": 1, "lr": 0.01, "warmup_steps": 3, "seed": 1},
    "stages": [
        {"name": "pretrain_small", "kind": "pretrain", "steps": 30, "shape": SMALL, "checkpoint_every": 30},
        {"name": "grow", "kind": "grow", "options": {"operator": "g_stack", "function_preserving": True}},
        {"name": "continue", "kind": "continue", "steps": 20, "checkpoint_every": 5, "eval_every": 10,
         "options": {"rewarm_fraction": 0.1}},
    ],
}


def write(tmp_path: Path, **changes) -> Path:
    data = {**PLAN, **changes}
    path = tmp_path / f"{data['name']}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def series(run_id: int, name: str, position: int) -> list[tuple[int, float]]:
    with Store().read() as session:
        stage = runs.stage_runs(session, runs.get_run(session, run_id))[position]
        return runs.metric_series(session, run_id, name, stage.id)


def messages(run_id: int) -> list[str]:
    with Store().read() as session:
        return [e.message for e in runs.events(session, run_id, limit=100)]


def test_small_grow_continue_runs_from_the_grown_weights(cli, tmp_path, muse_home) -> None:
    assert cli("plan", "import", write(tmp_path)).exit_code == 0
    result = cli("plan", "run", "grow")
    assert result.exit_code == 0, result.output
    before = series(1, "val_loss_before_growth", 1)
    after = series(1, "val_loss", 1)
    assert before[0][1] == pytest.approx(after[0][1], abs=1e-4)  # function-preserving, as measured
    assert before[0][1] < math.log(260) - 1.0  # the small model had learned something
    grew = [m for m in messages(1) if m.startswith("grew ")]
    assert len(grew) == 1 and "2×32" in grew[0] and "→ 4×32" in grew[0]
    assert "by g_stack (function-preserving)" in grew[0]
    weights = load_file(str(muse_home / "runs" / "run-00001" / "grow" / "step-00000000" / "model.safetensors"))
    assert {int(k.split(".")[1]) for k in weights if k.startswith("blocks.")} == {0, 1, 2, 3}
    assert weights["blocks.3.attn.wo.weight"].abs().sum() == 0  # an identity block, as written
    small_end, continued = series(1, "loss", 0), series(1, "loss", 2)
    assert continued[0][1] < math.log(260) - 1.0  # not a fresh model: it starts where the small one ended
    assert abs(continued[0][1] - small_end[-1][1]) < 0.5
    assert all(math.isfinite(v) for _, v in continued)
    lrs = series(1, "lr", 2)
    assert lrs[0][1] == pytest.approx(0.01 / 2)  # re-warm over 10% of 20 steps: 2 steps, not the plan's 3


class StopAt:
    """A run's view that interrupts it (as Ctrl-C would) at one step of one stage."""

    def __init__(self, stage: str, step: int) -> None:
        self.stage, self.at, self.current = stage, step, ""

    def message(self, text: str) -> None: ...

    def stage_started(self, name: str, total_steps: int, start_step: int) -> None:
        self.current = name

    def step(self, record) -> None:
        if self.current == self.stage and record.step == self.at:
            raise KeyboardInterrupt

    def evaluated(self, step: int, metrics: dict[str, float]) -> None: ...

    def stage_finished(self, name: str) -> None: ...


def test_a_stage_after_growth_resumes_from_its_own_checkpoint(cli, tmp_path, monkeypatch) -> None:
    homes = {name: tmp_path / name for name in ("whole", "cut")}
    plan = write(tmp_path)
    for home in homes.values():
        monkeypatch.setenv("MUSE_HOME", str(home))
        assert cli("plan", "import", plan).exit_code == 0
    monkeypatch.setenv("MUSE_HOME", str(homes["whole"]))
    run_plan(None, "grow")
    expected = series(1, "loss", 2)

    monkeypatch.setenv("MUSE_HOME", str(homes["cut"]))
    with pytest.raises(RunInterrupted) as stopped:
        run_plan(None, "grow", view=StopAt("continue", 8))
    assert str(stopped.value) == ("run 1 interrupted in stage continue at step 8 of 20, last checkpoint at step 5; "
                                  "resume with: muse plan run grow --resume")
    with Store().read() as session:
        run = runs.get_run(session, 1)
        assert run.status == "interrupted"
        assert [s.status for s in runs.stage_runs(session, run)] == ["completed", "completed", "interrupted"]
    result = run_plan(None, "grow", resume=True)
    assert [s.name for s in result.stages] == ["continue"]  # neither the small stage nor the growth again
    assert "resuming stage continue from step-00000005" in messages(1)
    assert sum(m.startswith("grew ") for m in messages(1)) == 1
    assert series(1, "loss", 2) == expected  # exact: same floats, step for step


def test_ligo_in_a_plan_fits_its_operator_and_records_the_fit(cli, tmp_path, muse_home) -> None:
    stages = [dict(s) for s in PLAN["stages"]]
    stages[0] = {**stages[0], "steps": 10, "checkpoint_every": 10}
    stages[1] = {"name": "grow", "kind": "grow", "options": {"operator": "ligo", "fit_steps": 6,
                                                              "function_preserving": False}}
    stages[2] = {**stages[2], "steps": 2}
    techniques = {**PLAN["techniques"], "growth": {"operator": "ligo", "factor": 2}}
    cli("plan", "import", write(tmp_path, stages=stages, techniques=techniques))
    result = cli("plan", "run", "grow")
    assert result.exit_code == 0, result.output
    assert (muse_home / "runs" / "run-00001" / "grow" / "step-00000006").is_dir()
    first, last = series(1, "fit_loss_first", 1), series(1, "fit_loss_last", 1)
    assert math.isfinite(first[0][1]) and math.isfinite(last[0][1])
    assert any("by ligo" in m and "operator fitted 6 steps" in m for m in messages(1))


@pytest.mark.parametrize("grow_options, shape, message, when", [
    ({"operator": "ligo", "optimizer_state": "mapped"}, None, "optimizer_state 'mapped' does not work with ligo",
     "import"),
    ({"operator": "g_stack"}, {"layers": 4, "d_model": 64, "n_heads": 4},
     "g_stack grows depth only, but the width changes", "run"),
    ({"operator": "net2net"}, None, "net2net grows width only, but layers change 2 → 4", "run"),
    ({"operator": "g_stack", "warp": 1}, None, "unknown growth option 'warp'", "import"),
])
def test_a_growth_the_plan_cannot_make_is_refused_before_a_run_exists(cli, tmp_path, grow_options, shape,
                                                                       message, when) -> None:
    """Options are refused when the plan is read; shapes the operator can't join when a run starts."""
    stages = [dict(s) for s in PLAN["stages"]]
    stages[1] = {"name": "grow", "kind": "grow", "options": grow_options}
    model = {**PLAN["model"], "shape": shape} if shape else PLAN["model"]
    imported = cli("plan", "import", write(tmp_path, stages=stages, model=model))
    assert imported.exit_code == (2 if when == "import" else 0), imported.output
    result = imported if when == "import" else cli("plan", "run", "grow")
    assert result.exit_code == 2
    assert "stage 'grow': " in result.output and message in result.output
    assert cli("run", "list", "--json").output.strip() == "[]"


def test_a_loss_plateau_ends_the_small_stage_and_the_growth_starts_there(cli, tmp_path, muse_home) -> None:
    stages = [dict(s) for s in PLAN["stages"]]
    stages[0] = {**stages[0], "steps": 200, "eval_every": 10, "checkpoint_every": 100,
                 "options": {"grow_on_plateau": 5}}
    stages[2] = {**stages[2], "steps": 2}
    training = {**PLAN["training"], "lr": 1e-7}  # a loss that cannot move: a plateau by the first full windows
    cli("plan", "import", write(tmp_path, stages=stages, training=training))
    result = cli("plan", "run", "grow")
    assert result.exit_code == 0, result.output
    assert "stage pretrain_small stopped early at step 10 of 200" in " ".join(messages(1))
    assert (muse_home / "runs" / "run-00001" / "pretrain_small" / "step-00000010").is_dir()
    assert [s for s, _ in series(1, "loss", 0)] == list(range(1, 11))
    assert any(m.startswith("grew 2×32") for m in messages(1))
    assert len(series(1, "loss", 2)) == 2  # the continue stage ran on the grown model


def test_a_bad_plateau_window_is_refused_when_the_plan_is_read(cli, tmp_path) -> None:
    stages = [dict(s) for s in PLAN["stages"]]
    stages[0] = {**stages[0], "options": {"grow_on_plateau": 1}}
    result = cli("plan", "import", write(tmp_path, stages=stages))
    assert result.exit_code == 2
    assert "grow_on_plateau: must be true or a window of at least 2 steps, got 1" in result.output
    assert cli("plan", "list", "--json").output.strip() == "[]"  # nothing stored


def shapes(shown: str) -> dict[str, str]:
    """``muse plan show``'s shape cell of each stage, its lines joined with spaces."""
    rows: dict[str, str] = {}
    name = ""
    table = shown[shown.index("\nstages"):shown.index("training settings")]
    for line in table.splitlines():
        cells = line.split("│")
        if len(cells) < 6:
            continue
        if cells[1].strip():  # a new row: its number
            name = cells[2].split()[0]
            rows[name] = ""
        if name and cells[5].strip():
            rows[name] = (rows[name] + " " + cells[5].strip()).strip()
    return rows


def test_plan_show_prints_the_shape_of_each_growth_stage(cli, tmp_path) -> None:
    data = {"name": "big", "model": {"scale": "125M", "seq_len": 256},
            "techniques": {"growth": {"factor": 4, "small_seq_len": 64}}}
    (tmp_path / "big.yaml").write_text(yaml.safe_dump(data))
    assert cli("plan", "import", tmp_path / "big.yaml").exit_code == 0
    shown = cli("plan", "show", "big")
    assert shown.exit_code == 0
    assert shapes(shown.output) == {"pretrain_small": "3×768, 12h, seq 64",
                                    "grow": "3×768, 12h, seq 64 → 12×768, 12h, seq 256",
                                    "continue": "12×768, 12h, seq 256"}
    assert "rope=linear" in shown.output  # the grow stage's options say how the context grows


def test_compound_growth_expands_into_two_growth_steps(cli, tmp_path) -> None:
    data = {"name": "cg", "model": {"scale": "125M", "seq_len": 2048},
            "techniques": {"growth": {"operator": "compound", "small_seq_len": 512}}}
    (tmp_path / "cg.yaml").write_text(yaml.safe_dump(data))
    result = cli("plan", "import", tmp_path / "cg.yaml")
    assert result.exit_code == 0
    rows = shapes(cli("plan", "show", "cg").output)
    # CompoundGrow's lengths double: 512 → 1024 → 2048
    assert rows["grow_mid"] == "6×384, 6h, seq 512 → 9×576, 9h, seq 1024"
    assert rows["grow"] == "9×576, 9h, seq 1024 → 12×768, 12h, seq 2048"


@pytest.mark.parametrize("growth, message", [
    ({"small_seq_len": 256}, "techniques.growth.small_seq_len 256 must be shorter than model.seq_len 256"),
    ({"small_seq_len": 0}, "small_seq_len"),
    ({"rope": "yarn"}, "rope"),
    ({"fit_steps": 50}, "fit_steps sets the fit of LiGO's learned operator, and operator 'g_stack' learns none"),
    ({"operator": "net2net", "fit_steps": 5, "fit_lr": 0.1}, "fit_steps and fit_lr set the fit of LiGO's"),
    ({"operator": "ligo", "fit_steps": 0}, "fit_steps"),
])
def test_a_bad_growth_option_is_one_line(cli, tmp_path, growth, message) -> None:
    from conftest import one_error_line

    data = {"name": "bad", "model": {"scale": "125M", "seq_len": 256}, "techniques": {"growth": growth}}
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(data))
    one_error_line(cli("plan", "import", tmp_path / "bad.yaml"), message)


def test_depth_and_context_growth_run_end_to_end(cli, tmp_path, muse_home) -> None:
    """The small model trains at context 16, the grow stage stacks it and lengthens the
    context to 32 by position interpolation, the continue stage trains the result."""
    from muse_plan.executor.settings import model_config
    from muse_plan.plan.io import spec_from_dict

    stages = [dict(s) for s in PLAN["stages"]]
    stages[0] = {**stages[0], "seq_len": 16}
    stages[1] = {**stages[1], "options": {"operator": "g_stack", "function_preserving": True, "rope": "linear"}}
    assert cli("plan", "import", write(tmp_path, stages=stages)).exit_code == 0
    assert shapes(cli("plan", "show", "grow").output)["grow"] == "2×32, 2h, seq 16 → 4×32, 2h, seq 32"
    result = cli("plan", "run", "grow")
    assert result.exit_code == 0, result.output
    grew = next(m for m in messages(1) if m.startswith("grew "))
    assert "context 16" in grew and "→ 4×32 (2 heads, MLP 128, context 32)" in grew
    assert series(1, "val_loss_before_growth", 1) == []  # another context: no like-for-like loss before
    spec = spec_from_dict(yaml.safe_load(write(tmp_path, stages=stages).read_text()))
    small, cont = model_config(spec, spec.stages[0]), model_config(spec, spec.stages[2])
    assert (small.seq_len, small.rope_scale) == (16, 1.0)
    assert (cont.seq_len, cont.rope_scale) == (32, 2.0)  # the continue stage trains what was grown
    small_end, continued = series(1, "loss", 0), series(1, "loss", 2)
    assert continued[0][1] < math.log(260) - 1.0  # the grown weights, not a fresh model
    assert all(math.isfinite(v) for _, v in continued)
    assert len(small_end) == 30


def test_the_rotary_settings_follow_the_weights_through_a_context_growth() -> None:
    from muse_plan.executor.settings import model_config
    from muse_plan.plan.io import spec_from_dict

    stages = [{"name": "small", "kind": "pretrain", "steps": 1, "seq_len": 16},
              {"name": "grow", "kind": "grow", "options": {"operator": "g_stack", "rope": "ntk"}},
              {"name": "continue", "kind": "continue", "steps": 1},
              {"name": "sft", "kind": "finetune", "steps": 1},
              {"name": "other", "kind": "pretrain", "steps": 1, "from_stage": "small"}]
    spec = spec_from_dict({**PLAN, "stages": stages})
    c = {s.name: model_config(spec, s) for s in spec.stages}
    head = c["small"].head_dim
    theta = 10000.0 * 2 ** (head / (head - 2))  # NTK: θ·s^(d/(d−2)), s = 32/16
    assert c["small"].rope_theta == 10000.0 and c["other"].rope_theta == 10000.0
    assert c["grow"].rope_theta == pytest.approx(theta) and c["continue"].rope_theta == pytest.approx(theta)
    assert c["sft"].rope_theta == pytest.approx(theta)  # a later stage trains the same weights
    assert {x.rope_scale for x in c.values()} == {1.0}


def test_grown_weights_load_into_the_plans_model() -> None:
    """The grow stage writes what DecoderLM(plan shape) loads: names and shapes agree."""
    from engines.architecture.config import ModelConfig
    from engines.architecture.model import DecoderLM
    from engines.growth.operators import grow
    from engines.growth.schedule import GrowSettings

    small = DecoderLM(ModelConfig(vocab_size=260, seq_len=32, n_layers=2, d_model=32, n_heads=2,
                                  residual="mgt", streams=2))
    target = ModelConfig(vocab_size=260, seq_len=32, n_layers=4, d_model=64, n_heads=4, residual="mgt", streams=2)
    grown = grow(small, target, GrowSettings(operator="compound", function_preserving=True)).model
    plan_model = DecoderLM(target)
    plan_model.load_state_dict(grown.state_dict())
    assert torch.equal(plan_model.blocks[3].mlp.w_up.weight, grown.blocks[3].mlp.w_up.weight)


def test_planning_and_showing_growth_imports_no_torch(tmp_path) -> None:
    from conftest import heavy_imports

    commands = [["plan", "create", "--model-scale", "125M", "--techniques", "growth", "--name", "cg"],
                ["plan", "edit", "cg", "--set", "techniques.growth.operator=compound", "--replan"],
                ["plan", "show", "cg"]]
    assert heavy_imports(tmp_path, commands) == "none"


def test_the_growth_path_predicts_its_time_and_flops_against_training_from_scratch() -> None:
    """The optimizer's growth alternative: its pretraining's FLOPs are the small stage's plus
    the continue stage's, 6N + 12·L·d·T per token each; from scratch is the target on as many
    tokens, timed by the largest-from-scratch alternative's own fit (same model, budget, hardware)."""
    from engines.architecture.config import param_count
    from muse_plan.executor.settings import decoder_config
    from muse_plan.optimizer import fit as fitting
    from muse_plan.optimizer.alternatives import growth_saving
    from muse_plan.plan.io import spec_from_dict
    from muse_plan.plan.planner import complete
    from muse_plan.plan.units import approx_duration, parse_scale
    from test_fit import HOST

    spec = complete(spec_from_dict({"name": "big", "model": {"scale": "10B", "residual": "standard", "seq_len": 1024},
                                    "compute": "1xRTX3080-8GB", "timeline": "7days"}))
    hw = fitting.hardware_for(spec, host=HOST)
    result = fitting.fit(spec, hw)
    assert result.verdict == "does_not_fit"
    growth = next(a for a in result.alternatives if a.title.startswith("a growth path to "))
    largest = next(a for a in result.alternatives if a.title.startswith("the largest model trainable"))
    alt, chosen = growth.spec, {s.name: s.settings for s in growth.result.chosen.priced}
    assert [s.kind for s in alt.stages] == ["pretrain", "grow", "continue"]
    tokens, flops = 0, 0.0
    for stage in (alt.stages[0], alt.stages[2]):
        c, batch = decoder_config(alt, stage), chosen[stage.name].global_batch  # each stage fitted on its own
        stage_tokens = math.ceil(parse_scale(stage.tokens) / (batch * c.seq_len)) * batch * c.seq_len
        tokens += stage_tokens
        flops += stage_tokens * (6 * param_count(c) + 12 * c.n_layers * c.d_model * c.seq_len)
    target = decoder_config(alt, alt.stages[2])
    saving = growth_saving(alt, growth.result, hw)
    assert saving.tokens == tokens
    assert saving.growth_flops == pytest.approx(flops, rel=1e-12)
    assert saving.scratch_flops == pytest.approx(
        tokens * (6 * param_count(target) + 12 * target.n_layers * target.d_model * target.seq_len), rel=1e-12)
    assert alt.stages[0].shape.layers == target.n_layers // 4  # G_stack's g = 4: a quarter of the depth
    assert 0 < saving.flops_saved < 0.75 * 0.75  # a quarter of the depth for a quarter of the tokens, at most
    # the same model on the same budget (step rounding apart) and hardware: the largest alternative's own fit
    assert abs(parse_scale(largest.spec.stages[0].tokens) - tokens) <= 0.02 * tokens
    assert saving.scratch_s == largest.result.eta.total_s
    assert saving.growth_s == pytest.approx(sum(s for name, s in growth.result.eta.per_stage
                                                if name in ("pretrain_small", "continue")))
    assert 0 < saving.time_saved < 1
    detail = growth.detail
    assert f"its pretraining: {approx_duration(saving.growth_s)} and {saving.growth_flops:.2e}".replace("e+", "e") \
        in detail
    assert f"against {approx_duration(saving.scratch_s)}" in detail
    assert f"({saving.time_saved:.0%} less time, {saving.flops_saved:.0%} fewer FLOPs)" in detail


def test_a_growth_path_whose_target_does_not_fit_from_scratch_compares_flops_only() -> None:
    from muse_plan.optimizer.alternatives import GrowthSaving, _describe_saving

    text = _describe_saving(GrowthSaving(tokens=2e9, growth_flops=6e18, scratch_flops=8e18, growth_s=7200,
                                         scratch_s=None))
    assert text == ("its pretraining: 2.0 h and 6.00e18 FLOPs; from scratch the target does not fit here, and "
                    "2B tokens of it would cost 8.00e18 FLOPs (25% fewer FLOPs by growth)")


def test_the_bundled_growth_plan_on_two_processes_grows_once_and_resumes_after_growth(
        cli, muse_home, monkeypatch) -> None:
    """The distributed code path, end to end: plans/growth-cpu.yaml under DDP (2 processes over
    gloo, launched by torchrun as accelerate would), its
    blocks compiled (dynamo's ``eager`` backend: the graphs captured, no compiler): the main process grows,
    both continue from the grown weights and the mapped AdamW moments on the one-process curve at
    the same global batch; a NaN in the grown stage sends both back to its last checkpoint (after
    the growth, which is not redone) under the recovery's revision."""
    import os
    import subprocess
    import sys

    monkeypatch.setenv("MUSE_COMPILE_BACKEND", "eager")  # dynamo's capture, without AOTAutograd: seconds
    plan = Path(__file__).resolve().parent.parent / "plans" / "growth-cpu.yaml"
    assert cli("plan", "import", plan).exit_code == 0
    assert cli("plan", "edit", "growth-cpu", "--set", "stages.pretrain_small.steps=12",
               "--set", "stages.continue.steps=16", "--set", "training.warmup_steps=4",
               "--set", "stages.pretrain_small.eval_every=12", "--set", "stages.continue.eval_every=8",
               "--set", "stages.continue.checkpoint_every=8", "--set", "training.micro_batch=8",
               "--set", "training.compile=on").exit_code == 0
    assert shapes(cli("plan", "show", "growth-cpu").output)["grow"] == "2×128, 4h, seq 64 → 4×128, 4h, seq 128"
    one = cli("plan", "run", "growth-cpu")
    assert one.exit_code == 0, one.output
    # one process: its written pretrain stage became small → grow → continue, AdamW's moments carried
    # through the stack, and the grown model ends below the small one
    assert any("AdamW moments mapped for" in m for m in messages(1) if m.startswith("grew "))
    small, continued = series(1, "val_loss", 0), series(1, "val_loss", 2)
    assert [s for s, _ in small][-1] == 12 and [s for s, _ in continued][-1] == 16
    assert continued[-1][1] < small[-1][1] - 0.1
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MUSE_INJECT": "nan@14"}  # in the grown stage only
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                          "-m", "muse_plan", "plan", "run", "growth-cpu"], env=env, capture_output=True, text=True,
                         timeout=300)
    assert two.returncode == 0, two.stdout + two.stderr
    assert "(revision 3) finished on 2 processes" in two.stdout  # 2: the edits; 3: the recovery's rewrite
    assert two.stdout.count("finished on 2 processes") == 1  # only the main process reports
    with Store().read() as session:  # the main process stored the rewrite; both went on under it
        run = runs.get_run(session, 2)
        assert (run.revision, run.current_revision, run.status) == (2, 3, "completed")
        assert repo.get_plan(session, "growth-cpu").head == 3
    events = messages(2)
    assert sum(m.startswith("grew ") for m in events) == 1 and any("AdamW moments mapped for" in m for m in events)
    assert any("continuing under revision 3" in m for m in events), events
    assert sum(m.startswith("compiled 2 blocks and the loss head (eager)") for m in events) == 1  # small
    assert sum(m.startswith("compiled 4 blocks and the loss head (eager)") for m in events) == 2  # + resumed
    small_one, small_two = series(1, "loss", 0), series(2, "loss", 0)
    grown_one, grown_two = series(1, "loss", 2), series(2, "loss", 2)
    assert [s for s, _ in grown_two] == list(range(1, 17))  # the steps after the rollback, trained again
    assert max(abs(a - b) for (_, a), (_, b) in zip(small_one, small_two)) < 1e-4, (small_one, small_two)
    # the grown stage on the one-process curve up to its checkpoint before the fault (step 8; from
    # there it trains again under the rewritten lr): the same grown weights and mapped moments
    assert max(abs(a - b) for (_, a), (_, b) in zip(grown_one[:8], grown_two[:8])) < 1e-4


@pytest.mark.parametrize("fit_steps", [500, None])
def test_the_growth_path_charges_ligo_for_its_fit(fit_steps) -> None:
    """LiGO's operator fit is fit_steps steps of the grown model on one micro-batch each
    (the engine's 200 when the plan gives none); the copying operators cost nothing."""
    from engines.architecture.config import param_count
    from muse_plan.executor.settings import decoder_config
    from muse_plan.optimizer import fit as fitting
    from muse_plan.optimizer.alternatives import growth_saving
    from muse_plan.plan.io import spec_from_dict
    from muse_plan.plan.planner import complete
    from test_fit import HOST

    def growth_path(growth: dict):
        spec = complete(spec_from_dict({"name": "big", "model": {"scale": "10B", "residual": "standard",
                                                                  "seq_len": 1024},
                                        "techniques": {"growth": growth},
                                        "compute": "1xRTX3080-8GB", "timeline": "7days"}))
        hw = fitting.hardware_for(spec, host=HOST)
        alt = next(a for a in fitting.fit(spec, hw).alternatives if a.title.startswith("a growth path to "))
        return alt, growth_saving(alt.spec, alt.result, hw), hw

    ligo_options = {"operator": "ligo"} | ({"fit_steps": fit_steps} if fit_steps else {})
    ligo, charged, hw = growth_path(ligo_options)
    stack, free, _ = growth_path({"operator": "g_stack"})
    assert [s.shape for s in ligo.spec.stages] == [s.shape for s in stack.spec.stages]
    assert ligo.spec.stages[1].options["operator"] == "ligo"
    assert ligo.spec.stages[1].options.get("fit_steps") == fit_steps  # the engine's default when None
    chosen = ligo.result.chosen.priced[-1].knobs  # the continue stage, which trains the grown model
    assert [s.knobs for s in ligo.result.chosen.priced] == [s.knobs for s in stack.result.chosen.priced]
    target = decoder_config(ligo.spec, ligo.spec.stages[2])
    per_token = 6 * param_count(target) + 12 * target.n_layers * target.d_model * target.seq_len
    fit_tokens = (fit_steps or 200) * chosen.micro_batch * hw.processes * target.seq_len
    assert charged.tokens == free.tokens
    assert charged.growth_flops - free.growth_flops == pytest.approx(fit_tokens * per_token, rel=1e-9)
    assert charged.growth_s > free.growth_s


@pytest.mark.parametrize("residual", ["standard", "hc", "mhc", "ddl", "mgt"])
@pytest.mark.parametrize("operator", ["net2net", "compound", "ligo"])
def test_a_grown_then_continued_model_computes_what_the_grown_one_did(tmp_path, operator, residual) -> None:
    """The checkpoint's manifest holds the config the weights were saved with; the stage after
    the growth builds that model (a width growth rescales norm_eps), not the plan's default."""
    from engines.architecture.config import ModelConfig
    from engines.architecture.model import DecoderLM
    from engines.growth.operators import grow
    from engines.growth.schedule import GrowSettings
    from muse_plan.executor import checkpoint
    from muse_plan.executor.record import model_meta

    torch.manual_seed(0)
    small_layers = 2 if operator == "net2net" else 1
    small = DecoderLM(ModelConfig(vocab_size=64, seq_len=16, n_layers=small_layers, d_model=16, n_heads=2,
                                  residual=residual, streams=2))
    target = ModelConfig(vocab_size=64, seq_len=16, n_layers=2, d_model=32, n_heads=4, residual=residual, streams=2)
    batches = (lambda: (torch.randint(0, 64, (2, 16)), torch.randint(0, 64, (2, 16)))) if operator == "ligo" else None
    settings = GrowSettings(operator=operator, fit_steps=2, noise=0.0, function_preserving=operator != "ligo")
    grown = grow(small, target, settings, batches).model.eval()
    assert grown.config.norm_eps != target.norm_eps  # what the plan alone would build differs
    path = checkpoint.save(tmp_path / "grow", 0, grown, {}, model_meta(grown))
    saved = json.loads((path / checkpoint.MANIFEST).read_text())["model_config"]
    continued_config = target.as_saved(saved)  # what the continue stage builds (the runner's _saved_config)
    fields = continued_config.FUNCTIONAL + continued_config.STRUCTURE
    assert [getattr(continued_config, f) for f in fields] == [getattr(grown.config, f) for f in fields]
    continued = DecoderLM(continued_config).eval()
    checkpoint.load_weights(path, continued)
    x = torch.randint(0, 64, (2, 16))
    with torch.no_grad():
        assert (continued(x)[0] - grown(x)[0]).abs().max() <= 1e-5
