"""The fit search and its verdicts: fits, fits with changes, does not fit with
alternatives that fit; and `muse plan optimize` / `muse plan run` around it."""

from __future__ import annotations

import json

import pytest

from muse_plan.hardware.detect import HostInfo
from muse_plan.optimizer import fit as fitting
from muse_plan.plan.io import load_file, spec_from_dict
from muse_plan.plan.planner import complete
from tests.conftest import ROOT

HOST = HostInfo(cpu_model="test", cores_physical=2, cores_logical=2, ram_gib=64.0)


def bundled(name: str):
    return complete(load_file(str(ROOT / "plans" / f"{name}.yaml")))


def plan(training: dict, scale: str = "1.3B", compute: str = "1xA100-40GB", **extra):
    return complete(spec_from_dict({
        "name": "p", "model": {"scale": scale, "seq_len": 2048, "vocab_size": 32000},
        "compute": compute, "training": training,
        "stages": [{"name": "pretrain", "kind": "pretrain", "tokens": "1B"}], **extra}, "test"))


def test_the_quickstart_fits_this_cpu_as_written() -> None:
    spec = bundled("quickstart-cpu")
    result = fitting.fit(spec, fitting.hardware_for(spec, host=HOST))
    assert result.verdict == "fits" and result.changes == []
    assert result.eta is not None and result.eta.total_s > 0


def test_open_fields_are_filled_but_written_ones_kept() -> None:
    spec = plan({"precision": "bf16", "global_batch": 64}, scale="125M")
    result = fitting.fit(spec, fitting.hardware_for(spec, host=HOST))
    assert result.verdict == "fits"
    assert result.chosen.settings.precision == "bf16"  # written: kept
    assert result.chosen.seconds <= result.written.seconds
    fitted = result.fitted_spec
    assert fitted.training.global_batch == 64
    assert fitted.training.micro_batch * fitted.training.grad_accum == 64


def test_a_plan_that_fits_only_with_changes_lists_them() -> None:
    # 1.3B at micro-batch 16 without checkpointing needs far more than 40 GB of activations
    spec = plan({"precision": "bf16", "micro_batch": 16, "global_batch": 64,
                 "activation_checkpointing": "none", "offload": "none"})
    result = fitting.fit(spec, fitting.hardware_for(spec, host=HOST))
    assert result.verdict == "fits_with_changes"
    assert not result.written.fits and result.chosen.fits
    changed = {c.field for c in result.changes}
    assert changed & {"micro_batch", "checkpointing", "offload"}
    assert result.chosen.peak <= fitting.hardware_for(spec, host=HOST).limit_bytes
    fitted = result.fitted_spec
    assert fitted.training.micro_batch * fitted.training.grad_accum == 64  # the global batch is kept


def test_the_10b_plan_on_one_8gb_card_does_not_fit_and_each_alternative_does() -> None:
    spec = bundled("muse-10b-japanese")
    hw = fitting.hardware_for(spec, host=HOST)
    assert hw.describe() == "1xRTX3080-8GB"
    result = fitting.fit(spec, hw)
    assert result.verdict == "does_not_fit" and result.chosen is None
    assert len(result.alternatives) >= 2
    within = [a for a in result.alternatives if "within 7days" in a.title]
    assert within and within[0].result.eta.meets  # the largest model the week can train
    for alt in result.alternatives:  # each passes its own fit check, from scratch
        again = fitting.fit(alt.spec, alt.hardware, alternatives=False)
        assert again.verdict in ("fits", "fits_with_changes"), alt.title
        assert again.chosen.peak <= alt.hardware.limit_bytes


def test_a_memory_budget_caps_what_each_gpu_may_use() -> None:
    spec = plan({}, compute="8xH100")
    hw = fitting.hardware_for(spec, memory_budget_gib=128, host=HOST)
    assert hw.memory_gib == 16 and hw.count == 8
    assert fitting.hardware_for(spec, gpu="A100", count=2, host=HOST).describe() == "2xA100-80GB"


def test_unknown_gpu_is_refused() -> None:
    spec = plan({})
    with pytest.raises(ValueError, match="unknown GPU 'B300'"):
        fitting.hardware_for(spec, gpu="B300", host=HOST)


def test_optimize_cli_stores_the_optimizers_revision(cli) -> None:
    cli("plan", "import", ROOT / "plans/quickstart-cpu.yaml")
    result = cli("plan", "optimize", "quickstart-cpu", "--gpu-type", "H100", "--available-gpus", "1",
                 "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["verdict"] in ("fits", "fits_with_changes") and data["hardware"] == "1xH100-80GB"
    history = json.loads(cli("plan", "history", "quickstart-cpu", "--json").stdout)
    if data["revision"] is not None:
        assert history[-1]["author"] == "optimizer" and "fitted to 1xH100-80GB" in history[-1]["reason"]
    shown = cli("plan", "optimize", "quickstart-cpu", "--dry-run")
    assert shown.exit_code == 0 and "quickstart-cpu on" in shown.output


def test_optimize_cli_says_does_not_fit_with_alternatives(cli) -> None:
    cli("plan", "import", ROOT / "plans/muse-10b-japanese.yaml")
    result = cli("plan", "optimize", "muse-10b-japanese")
    assert result.exit_code == 0, result.output
    assert "does not fit" in result.output and "alternatives that fit" in result.output
    history = json.loads(cli("plan", "history", "muse-10b-japanese", "--json").stdout)
    assert len(history) == 1  # nothing fitted, nothing stored


@pytest.mark.parametrize("flag, value, message", [
    ("--gpu-type", "B300", "unknown GPU 'B300'"),
    ("--memory-budget", "lots", "memory"),
    ("--available-gpus", "0", "at least 1"),
])
def test_optimize_bad_flags(cli, flag, value, message) -> None:
    cli("plan", "import", ROOT / "plans/quickstart-cpu.yaml")
    result = cli("plan", "optimize", "quickstart-cpu", flag, value)
    assert result.exit_code == 2 and message in result.output


def test_run_refuses_a_plan_that_cannot_fit_this_machine(cli, tmp_path) -> None:
    huge = tmp_path / "huge.yaml"
    huge.write_text("name: huge\nmodel: {scale: 70B, seq_len: 2048, vocab_size: 32000}\ncompute: cpu\n"
                    "stages: [{name: pretrain, kind: pretrain, steps: 1}]\n")
    cli("plan", "import", huge)
    result = cli("plan", "run", "huge")
    assert result.exit_code == 2
    assert "does not fit" in result.output and "muse plan optimize huge" in result.output
    assert "--force" in result.output
    assert cli("run", "list", "--json").output.strip() == "[]"


@pytest.mark.parametrize("gpu, count", [("RTX3080", 1), ("A100", 1), ("H100", 2), ("H200", 2), ("T4", 4)])
def test_the_quick_no_never_hides_a_fitting_candidate(gpu: str, count: int) -> None:
    spec = bundled("muse-10b-japanese")
    hw = fitting.hardware_for(spec, gpu=gpu, count=count, host=HOST)
    limits = fitting._limits(hw)
    for s in fitting.stage_settings(spec, hw):
        if fitting.train_config(s) is None:
            continue
        exhaustive = any(fitting.price_stage(fitting.with_knobs(s, k), hw).fits(*limits)
                         for k in fitting._candidates(s, hw, fitting.ALL_FIELDS))
        assert fitting._could_fit(s, hw, fitting.ALL_FIELDS) == exhaustive, s.name


def test_a_plan_fitted_to_fewer_gpus_than_it_names_says_so() -> None:
    spec = plan({"micro_batch": 8, "global_batch": 64}, scale="350M", compute="8xH100")
    result = fitting.fit(spec, fitting.hardware_for(spec, count=4, host=HOST))
    fitted = result.fitted_spec
    assert (fitted.compute.gpu, fitted.compute.count) == ("H100", 4)
    t = fitted.training
    assert t.micro_batch * t.grad_accum * 4 == t.global_batch == 64


def test_a_plan_that_does_not_fit_names_the_stages_no_setting_fits() -> None:
    spec = bundled("reasoning-grpo-a100")  # T-SPMO: 50 completions a prompt with a 152k vocabulary, one micro-step
    spec = spec.model_copy(update={"compute": spec.compute.model_copy(update={"memory_gib": 16.0})})  # fits in 40
    result = fitting.fit(spec, fitting.hardware_for(spec, host=HOST), alternatives=False)
    assert result.verdict == "does_not_fit" and result.unfit == ["reasoning_rl_t_spmo"]


def test_an_alternative_is_written_as_a_plan_file_that_imports_and_fits(cli, tmp_path) -> None:
    assert cli("plan", "create", "--model-scale", "10B", "--target-tasks", "reasoning", "--techniques", "mhc",
               "--compute-budget", "1xRTX3080-8GB", "--timeline", "7days", "--name", "big").exit_code == 0
    shown = json.loads(cli("plan", "optimize", "big", "--dry-run", "--json").stdout)
    assert shown["verdict"] == "does_not_fit" and shown["alternatives"]
    out = tmp_path / "alt.yaml"
    result = cli("plan", "optimize", "big", "--dry-run", "--write-alternative", "1", "-o", out)
    assert result.exit_code == 0, result.output
    written = load_file(out)
    assert f"wrote alternative 1 ({shown['alternatives'][0]['title']}) to {out} as plan {written.name!r}" \
        in " ".join(result.output.split())
    assert cli("plan", "import", out).exit_code == 0
    fitted = json.loads(cli("plan", "optimize", written.name, "--dry-run", "--json").stdout)
    assert fitted["verdict"] in ("fits", "fits_with_changes")
    assert fitted["hardware"] == shown["alternatives"][0]["hardware"]
    bad = cli("plan", "optimize", "big", "--write-alternative", str(len(shown["alternatives"]) + 1), "-o", out)
    assert bad.exit_code == 2 and "the alternatives are numbered 1 to" in bad.output
    alone = cli("plan", "optimize", "big", "--write-alternative", "1")
    assert alone.exit_code == 2 and "go together" in alone.output


def test_the_qlora_alternative_is_written_as_a_plan_that_only_needs_the_models_folder(cli, tmp_path) -> None:
    assert cli("plan", "create", "--model-scale", "7B", "--target-tasks", "reasoning", "--compute-budget",
               "1xRTX3080-8GB", "--timeline", "7days", "--name", "seven").exit_code == 0
    shown = json.loads(cli("plan", "optimize", "seven", "--dry-run", "--json").stdout)
    number = next(i for i, a in enumerate(shown["alternatives"], 1) if "QLoRA" in a["title"])
    out = tmp_path / "qlora.yaml"
    result = cli("plan", "optimize", "seven", "--dry-run", "--write-alternative", number, "-o", out)
    assert result.exit_code == 0, result.output
    assert "set model.init_from to its local folder first" in " ".join(result.output.split())
    written = load_file(out)
    assert (written.model.family, written.model.init_from) == ("hf", None)
    assert written.techniques.lora.quantize_base == "4bit" and [s.kind for s in written.stages] == ["finetune"]
    assert cli("plan", "import", out).exit_code == 0
    ran = cli("plan", "run", written.name)  # here: refused before a run, in one line, until init_from is set
    assert ran.exit_code == 2 and "model.family hf needs model.init_from" in ran.output


def test_writing_an_alternative_of_a_plan_that_fits_says_there_is_none(cli, tmp_path) -> None:
    assert cli("plan", "import", ROOT / "plans" / "quickstart-cpu.yaml").exit_code == 0
    result = cli("plan", "optimize", "quickstart-cpu", "--dry-run", "--write-alternative", "1", "-o",
                 tmp_path / "x.yaml")
    assert result.exit_code == 2 and not (tmp_path / "x.yaml").exists()
    assert "plan 'quickstart-cpu' fits here, and the fit offers no alternative to write" in result.output


def test_an_mhc_stage_is_told_the_fastest_connection_as_priced(cli, tmp_path) -> None:
    """The optimizer prices an mhc / mgt stage's connection forms (a bf16 state with torch's fusion or with
    fused_kernels on) beside what the plan runs and says the fastest as the user's choice: for mhc a bf16 state
    with its fused kernels replayed from CUDA graphs (training.cuda_graphs: auto; without graphs the fused step
    measured slower than torch's fusion on an H100, so fused_kernels off where graphs are off); for mgt a bf16
    state with its fused kernels; under training.fused_kernels auto (the default) a bf16 state of 4 streams
    gets its kernels without a word more; nothing once the plan runs the fastest, for standard, or on a CPU
    or a GPU without bf16."""
    def mhc(compute: str, **mhc_options):
        return plan({}, scale="350M", compute=compute, techniques={"mhc": {"streams": 4, **mhc_options}})

    spec = mhc("1xH100-80GB")
    assert spec.model.residual == "mhc"
    result = fitting.fit(spec, fitting.hardware_for(spec, host=HOST), alternatives=False)
    (faster,) = fitting.faster_connections(result.chosen, result.hardware)
    assert faster.stage == "pretrain"
    assert faster.changes == ("techniques.mhc.stream_dtype: bfloat16",)  # fused_kernels auto: then on
    assert faster.was_tokens_per_s == result.chosen.priced[0].time.tokens_per_s
    assert faster.tokens_per_s > 1.2 * faster.was_tokens_per_s  # 300 B a layer·d·token against fp32's 633
    half = mhc("1xH100-80GB", stream_dtype="bfloat16")
    result = fitting.fit(half, fitting.hardware_for(half, host=HOST), alternatives=False)
    chosen = result.chosen.priced[0].settings  # auto: the kernels, replayed from graphs
    assert chosen.model.fused_kernels == "on" and chosen.cuda_graphs
    assert fitting.faster_connections(result.chosen, result.hardware) == []
    torch_fusion = complete(spec_from_dict({**half.model_dump(mode="json", exclude_none=True),
                                            "training": {"fused_kernels": "off"}}, "test"))
    result = fitting.fit(torch_fusion, fitting.hardware_for(torch_fusion, host=HOST), alternatives=False)
    assert [f.changes for f in fitting.faster_connections(result.chosen, result.hardware)] == [
        ("training.fused_kernels: on",)]  # 300 B replayed from graphs against torch's 440
    fused = complete(spec_from_dict({**half.model_dump(mode="json", exclude_none=True),
                                     "training": {"fused_kernels": "on"}}, "test"))
    result = fitting.fit(fused, fitting.hardware_for(fused, host=HOST), alternatives=False)
    # the kernels run under any precision: fp16 is not chosen to dodge their price (it was, priced as torch's)
    assert result.chosen.priced[0].settings.precision == "bf16" and result.chosen.priced[0].settings.cuda_graphs
    assert fitting.faster_connections(result.chosen, result.hardware) == []  # it runs the fastest
    no_graphs = complete(spec_from_dict({**half.model_dump(mode="json", exclude_none=True),
                                         "training": {"fused_kernels": "on", "cuda_graphs": "off"}}, "test"))
    result = fitting.fit(no_graphs, fitting.hardware_for(no_graphs, host=HOST), alternatives=False)
    assert [f.changes for f in fitting.faster_connections(result.chosen, result.hardware)] == [
        ("training.fused_kernels: off",)]  # without graphs the fused step priced at 620 B, torch's at 440
    # nothing to say: standard; a CPU; a GPU without bf16 (a T4 trains in fp16, where the kernels were never timed)
    for other in (plan({}, scale="350M", compute="1xH100-80GB"), mhc("cpu"), mhc("1xT4")):
        result = fitting.fit(other, fitting.hardware_for(other, host=HOST), alternatives=False)
        assert fitting.faster_connections(result.chosen, result.hardware) == [], other.compute
    mgt = plan({}, scale="350M", compute="1xH100-80GB", techniques={"geometric_scaling": {}})
    result = fitting.fit(mgt, fitting.hardware_for(mgt, host=HOST), alternatives=False)
    assert [f.changes for f in fitting.faster_connections(result.chosen, result.hardware)] == [
        ("techniques.geometric_scaling.stream_dtype: bfloat16",)]

    from tests.conftest import write_plan
    assert cli("plan", "import", write_plan(tmp_path, {**spec.model_dump(mode="json", exclude_none=True),
                                                       "name": "fast"})).exit_code == 0
    shown = " ".join(cli("plan", "optimize", "fast", "--dry-run").output.split())
    assert "faster, your choice: techniques.mhc.stream_dtype: bfloat16 would train stage pretrain at" in shown
    data = json.loads(cli("plan", "optimize", "fast", "--dry-run", "--json").output)
    assert [f["changes"] for f in data["faster_connections"]] == [["techniques.mhc.stream_dtype: bfloat16"]]


def test_a_step_summing_micro_steps_is_told_one_micro_step_replays_the_fused_kernels() -> None:
    """mhc's bf16 state under training.fused_kernels auto runs torch's fusion where a step sums micro-steps
    (its kernels measured faster only replayed from CUDA graphs); where the same global batch as one
    micro-step fits one GPU, the optimizer says so, priced as that step runs (kernels and graphs), and the
    plan with the change runs it. Not on two GPUs (no graphs under DDP by default), nor where it won't fit."""
    def mhc(training: dict, compute: str = "1xH100-80GB"):
        return plan(training, scale="350M", compute=compute,
                    techniques={"mhc": {"streams": 4, "stream_dtype": "bfloat16"}})

    summed = mhc({"micro_batch": 8, "global_batch": 16, "precision": "bf16"})
    result = fitting.fit(summed, fitting.hardware_for(summed, host=HOST), alternatives=False)
    ran = result.chosen.priced[0]
    assert (ran.settings.grad_accum, ran.settings.model.fused_kernels, ran.settings.cuda_graphs) == (2, "off", False)
    (faster,) = fitting.faster_connections(result.chosen, result.hardware)
    assert faster.changes == ("training.micro_batch: 16", "training.grad_accum: 1")
    changed = mhc({"micro_batch": 16, "grad_accum": 1, "global_batch": 16, "precision": "bf16"})
    again = fitting.fit(changed, fitting.hardware_for(changed, host=HOST), alternatives=False).chosen.priced[0]
    assert (again.settings.grad_accum, again.settings.model.fused_kernels, again.settings.cuda_graphs) == \
        (1, "on", True)
    assert again.time.tokens_per_s == pytest.approx(faster.tokens_per_s)  # priced as the changed plan runs
    assert faster.tokens_per_s > 1.1 * faster.was_tokens_per_s
    two = mhc({"micro_batch": 8, "global_batch": 32, "precision": "bf16"}, compute="2xH100-80GB")
    result = fitting.fit(two, fitting.hardware_for(two, host=HOST), alternatives=False)
    assert result.chosen.priced[0].settings.grad_accum == 2
    assert fitting.faster_connections(result.chosen, result.hardware) == []
    huge = mhc({"micro_batch": 8, "global_batch": 512, "precision": "bf16"})  # 512 sequences at once: no fit
    result = fitting.fit(huge, fitting.hardware_for(huge, host=HOST), alternatives=False)
    assert fitting.faster_connections(result.chosen, result.hardware) == []


def test_the_faster_connection_is_said_only_when_it_fits_and_is_faster(monkeypatch) -> None:
    from dataclasses import replace

    from engines.architecture import modes
    from muse_plan.optimizer import memory

    spec = plan({"fused_kernels": "off"}, scale="350M", compute="1xH100-80GB",
                techniques={"geometric_scaling": {"streams": 4, "stream_dtype": "bfloat16"}})
    result = fitting.fit(spec, fitting.hardware_for(spec, host=HOST), alternatives=False)
    assert [f.changes for f in fitting.faster_connections(result.chosen, result.hardware)] == [
        ("training.fused_kernels: on",)]
    mgt = modes.RESIDUAL_MODES["mgt"]  # fused priced as torch's bf16 fusion: no faster, nothing to say
    monkeypatch.setitem(modes.RESIDUAL_MODES, "mgt", replace(mgt, fused_traffic=mgt.compiled_traffic[1]))
    assert fitting.faster_connections(result.chosen, result.hardware) == []
    monkeypatch.setitem(modes.RESIDUAL_MODES, "mgt", mgt)
    estimate = memory.estimate  # the faster form over the memory limit: nothing to say

    def heavier(cfg, **kwargs):  # type: ignore[no-untyped-def]
        got = estimate(cfg, **kwargs)
        return replace(got, activations=got.activations + 10**12) if cfg.model.fused_kernels == "on" else got

    monkeypatch.setattr(memory, "estimate", heavier)
    assert fitting.faster_connections(result.chosen, result.hardware) == []
