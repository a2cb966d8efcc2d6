"""The throughput model: FLOPs, calibrations against the measured runs, ETA."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import replace

import pytest

from engines.architecture.config import ModelConfig, param_count
from muse_plan.hardware.catalog import CATALOG
from muse_plan.optimizer import throughput as tp
from muse_plan.optimizer.config import GenerationConfig, LoraConfig, TrainConfig

H200, H100 = CATALOG["H200"], CATALOG["H100"]
BENCH_85M = ModelConfig(vocab_size=260, seq_len=1024, n_layers=12, d_model=768, n_heads=12)
QUICKSTART = ModelConfig(vocab_size=260, seq_len=128, n_layers=4, d_model=128, n_heads=4, residual="mhc")
SMALL = ModelConfig(vocab_size=100, seq_len=16, n_layers=2, d_model=8, n_heads=2)


def test_flops_per_token_on_a_hand_example():
    n = param_count(SMALL)
    # per layer 4·8² attention + 3·8·64 SwiGLU + 2·8 norms = 1808; 2 layers + 100·8 embedding + 8
    assert n == 2 * 1808 + 800 + 8 == 4424
    assert tp.flops_per_token(SMALL) == 6 * 4424 + 12 * 2 * 8 * 16
    assert tp.flops_per_token(SMALL, training=False) == 2 * 4424 + 4 * 2 * 8 * 16


def test_the_85m_bench_model_is_at_16_5_percent_of_the_h200_datasheet():
    assert param_count(BENCH_85M) == 85_153_536
    fpt = tp.flops_per_token(BENCH_85M)
    assert fpt == pytest.approx(6 * 85_153_536 + 12 * 12 * 768 * 1024)
    assert fpt * 261_566 / 989e12 == pytest.approx(0.165, abs=0.001)  # 20.7% of the measured ~790


def test_residual_modes_add_small_computed_work():
    base = tp.flops_per_token(replace(QUICKSTART, residual="standard"))
    extra = {}
    for mode in ("hc", "mhc", "ddl", "mgt"):
        c = ModelConfig(vocab_size=260, seq_len=128, n_layers=4, d_model=128, n_heads=4, residual=mode)
        extra[mode] = tp.flops_per_token(c) - 6 * param_count(c) - 12 * 4 * 128 * 128
    n, d = 4, 128
    mixing = 2 * n * n * d + 4 * n * d
    assert extra["mhc"] == 3 * 2 * 4 * (mixing + 5 * n * n * 2 * 20)  # x3 training, 2 connections, 4 layers
    assert extra["ddl"] == 3 * 2 * 4 * 6 * d
    assert extra["mgt"] > extra["mhc"] > extra["ddl"] > 0 and extra["hc"] > 0
    assert max(extra.values()) < 0.1 * base  # small beside 6N


def test_recompute_factors():
    cfg = TrainConfig(BENCH_85M, micro_batch=16)
    c = BENCH_85M
    full_ratio = tp.recompute_flops(cfg.with_(checkpointing="full")) / tp.train_flops(cfg)
    head = 2 * (c.vocab_size * c.d_model + c.d_model)
    assert full_ratio == pytest.approx((tp.flops_per_token(c, training=False) - head) / tp.flops_per_token(c))
    assert full_ratio == pytest.approx(1 / 3, abs=0.005)  # one more forward; the tiny head aside
    selective = tp.recompute_flops(cfg.with_(checkpointing="selective"))
    assert selective == 4 * 768 * 2048 * 12
    base = tp.step_time(cfg, H200)
    for mode, share in (("full", full_ratio), ("selective", selective / tp.train_flops(cfg))):
        st = tp.step_time(cfg.with_(checkpointing=mode), H200)
        assert st.recompute_s == pytest.approx(base.compute_s * share)
        assert st.seconds > base.seconds
    assert base.recompute_s == 0


def test_ddp_comm_volume_on_a_hand_example():
    cfg = TrainConfig(SMALL, world_size=4, sharding="ddp")
    grads, gathers = tp.comm_bytes(cfg)
    assert grads == 2 * 3 / 4 * 4 * 4424 and gathers == 0
    assert tp.comm_bytes(cfg.with_(sharding="zero2")) == (grads, 0)
    z3 = sum(tp.comm_bytes(cfg.with_(sharding="zero3")))
    assert z3 == pytest.approx(1.5 * grads)  # reduce-scatter + gathers in forward and backward
    assert tp.comm_bytes(cfg.with_(world_size=1)) == (0, 0)


def test_two_h200s_reproduce_the_measured_1_83x(monkeypatch):
    # measured when the executor stepped a multi-tensor AdamW after a clipping pass: priced as such
    monkeypatch.setattr(tp, "FUSED_OPTIMIZER_BYTES_PER_PARAM", tp.OPTIMIZER_BYTES_PER_PARAM)
    one = tp.step_time(TrainConfig(BENCH_85M, micro_batch=16, grad_accum=2), H200)
    two = tp.step_time(TrainConfig(BENCH_85M, micro_batch=16, world_size=2), H200)
    assert one.tokens_per_s == pytest.approx(261_566, rel=0.05)  # docs/bench_multi_gpu.md, 1 GPU
    assert two.tokens_per_s == pytest.approx(478_214, rel=0.05)
    assert two.tokens_per_s / one.tokens_per_s == pytest.approx(1.83, abs=0.15)
    assert one.comm_s == 0 and two.comm_s > 0


def test_the_350m_h100_eager_steps_are_priced_within_5_percent():
    """docs/bench_architecture.json: the hand-built eager loop on an H100, each residual mode, priced
    with the H100's own eager traffic (EAGER_TRAFFIC_MEASURED, fitted to the plan run's standard row)."""
    import json
    from pathlib import Path

    rows = json.loads((Path(__file__).resolve().parent.parent / "docs" / "bench_architecture.json").read_text())["rows"]
    measured = {r["model"]: r["tokens_per_s"] for r in rows if r["mode"] == "eager" and r["model"] != "hf-llama"}
    assert set(measured) == {"standard", "mhc", "ddl", "mgt"}
    for residual, tokens_per_s in measured.items():
        m = ModelConfig.from_scale("350M", vocab_size=32000, seq_len=2048, residual=residual)
        assert tp.step_time(TrainConfig(m, micro_batch=8), H100).tokens_per_s == pytest.approx(tokens_per_s, rel=0.05)
    assert tp.eager_traffic(H100) < tp.EAGER_TRAFFIC == tp.eager_traffic(CATALOG["A100"])  # unmeasured: the H200 fit


def test_compiled_steps_match_every_plan_run_row_measured_on_the_h100():
    """docs/bench_architecture_scope.json, the 1.3B/mgt rows of the same session
    (docs/bench_architecture_streams.json) and a later call's, after the Sinkhorn backward
    changed (docs/bench_architecture_maps.json): each row through `muse plan run` within 10%."""
    import json
    from pathlib import Path

    docs = Path(__file__).resolve().parent.parent / "docs"
    checked = 0
    for name in ("bench_architecture_scope.json", "bench_architecture_streams.json",
                 "bench_architecture_1.3b.json", "bench_architecture_maps.json"):
        data = json.loads((docs / name).read_text())
        assert "H100" in data["device"]
        layers, d_model = (int(v) for v in data["shape"].replace(",", "").split()[0:4:3])
        for row in data["rows"]:
            if row["mode"] != "plan-run" or "tokens_per_s" not in row:
                continue
            base, *flags = row["model"].split("+")
            m = ModelConfig(vocab_size=32000, seq_len=data["seq_len"], n_layers=layers, d_model=d_model,
                            n_heads=16, residual=base, stream_dtype="bfloat16" if "bf16" in flags else "float32")
            st = tp.step_time(TrainConfig(m, micro_batch=data["batch"], precision="bf16", compiled=True), H100)
            if "fused" not in flags:  # training.fused_kernels on: not what the model prices
                assert st.tokens_per_s == pytest.approx(row["tokens_per_s"], rel=0.1), row["model"]
                checked += 1
    assert checked >= 10
    # the mode's cost is traffic: its share of the step falls with width
    def share(scale: str, micro: int) -> float:
        std, mhc = (tp.step_time(TrainConfig(ModelConfig.from_scale(scale, vocab_size=32000, seq_len=2048,
                                                                    residual=r, stream_dtype="bfloat16"),
                                             micro_batch=micro, precision="bf16", compiled=True), H100)
                    for r in ("standard", "mhc"))
        return std.tokens_per_s / mhc.tokens_per_s - 1

    assert share("1.3B", 4) < share("350M", 8) * 0.75


def test_the_h200_plan_run_rows_are_priced_within_10_percent_and_fused_mhc_as_it_measures_now():
    """docs/bench_architecture_fused.json (an H200 through `muse plan run`): every row within 10% but the mhc
    row with fused kernels, an earlier form of fused_mhc (the state's gradient a stream at a time); the
    form that runs now is priced as it measured on an H100 (the next test): slower than torch's fusion."""
    import json
    from pathlib import Path

    data = json.loads((Path(__file__).resolve().parent.parent / "docs" / "bench_architecture_fused.json").read_text())
    assert "H200" in data["device"]

    def predicted(residual: str, flags: list[str], kernels: str) -> float:
        m = ModelConfig(vocab_size=32000, seq_len=data["seq_len"], n_layers=24, d_model=1024, n_heads=16,
                        residual=residual, stream_dtype="bfloat16" if "bf16" in flags else "float32",
                        fused_kernels=kernels)
        return tp.step_time(TrainConfig(m, micro_batch=data["batch"], precision="bf16", compiled=True),
                            H200).tokens_per_s

    rows = {row["model"]: row["tokens_per_s"] for row in data["rows"] if row["mode"] == "plan-run"}
    assert len(rows) == 5
    del rows["mhc+bf16+fused"]
    for name, measured in rows.items():
        base, *flags = name.split("+")
        assert predicted(base, flags, "on" if "fused" in flags else "off") == pytest.approx(measured, rel=0.1), name
    torch_mhc, fused_mhc = predicted("mhc", ["bf16"], "off"), predicted("mhc", ["bf16"], "on")
    assert fused_mhc < torch_mhc * 0.9  # now measured slower (next test); the optimizer does not offer it
    # eager kernels don't run under compile; an fp32 state and ddl have no measured price: torch's
    assert predicted("mhc", ["bf16"], "eager") == torch_mhc
    assert predicted("mhc", [], "on") == predicted("mhc", [], "off")
    assert predicted("ddl", [], "on") == predicted("ddl", [], "off")
    two = [ModelConfig(vocab_size=32000, seq_len=2048, n_layers=24, d_model=1024, n_heads=16, residual="mhc",
                       streams=2, stream_dtype="bfloat16", fused_kernels=k) for k in ("on", "off")]
    assert len({tp.step_time(TrainConfig(m, micro_batch=8, precision="bf16", compiled=True), H200).tokens_per_s
                for m in two}) == 1  # fused_mhc takes 4 streams: 2 run the stream ops, priced as torch's


def test_the_h100_fused_rows_through_plan_run_are_priced_within_10_percent():
    """docs/bench_architecture_fused_h100.json: standard, mhc (torch), ddl and mgt with the fused kernels, one
    H100 call through `muse plan run`; mgt's fused row priced as fused (torch's 673 B: 13.5% slow). Its mhc
    fused row ran fused_mhc's two-kernel form, since turned off, so the model (the default form's price)
    is not held to it."""
    import json
    from pathlib import Path

    data = json.loads((Path(__file__).resolve().parent.parent / "docs" /
                       "bench_architecture_fused_h100.json").read_text())
    assert "H100" in data["device"]
    rows = {row["model"]: row["tokens_per_s"] for row in data["rows"] if row["mode"] == "plan-run"}
    assert set(rows) == {"standard", "mhc+bf16", "mhc+bf16+fused", "ddl+fused", "mgt+bf16+fused"}
    del rows["mhc+bf16+fused"]
    for name, measured in rows.items():
        base, *flags = name.split("+")
        m = ModelConfig(vocab_size=32000, seq_len=data["seq_len"], n_layers=24, d_model=1024, n_heads=16,
                        residual=base, stream_dtype="bfloat16" if "bf16" in flags else "float32",
                        fused_kernels="on" if "fused" in flags else "off")
        predicted = tp.step_time(TrainConfig(m, micro_batch=data["batch"], precision="bf16", compiled=True),
                                 H100).tokens_per_s
        assert predicted == pytest.approx(measured, rel=0.1), (name, predicted, measured)


def test_the_tuned_h100_call_and_fused_mhc_as_it_runs_now_are_priced_within_10_percent():
    """docs/bench_architecture_tuned_h100.json (one H100 call through `muse plan run`, after
    scripts/tune_kernels.py): standard and ddl with fused_delta at the 32 tokens a program it chose;
    docs/bench_architecture_mhc_four_h100.json (the next call on the same machine): mhc with fused_mhc at its
    committed tiles. The tuned call's mhc row ran tiles not kept (slower), so the model is not held to it."""
    import json
    from pathlib import Path

    docs = Path(__file__).resolve().parent.parent / "docs"
    tuned = json.loads((docs / "bench_architecture_tuned_h100.json").read_text())
    four = json.loads((docs / "bench_architecture_mhc_four_h100.json").read_text())
    rows = {row["model"]: row["tokens_per_s"] for data in (tuned, four) for row in data["rows"]}
    assert "H100" in tuned["device"] and "H100" in four["device"]
    rows["mhc+bf16+fused"] = four["rows"][0]["tokens_per_s"]
    assert set(rows) == {"standard", "ddl+fused", "mhc+bf16+fused"}
    for name, measured in rows.items():
        base, *flags = name.split("+")
        m = ModelConfig(vocab_size=32000, seq_len=2048, n_layers=24, d_model=1024, n_heads=16, residual=base,
                        stream_dtype="bfloat16" if "bf16" in flags else "float32",
                        fused_kernels="on" if "fused" in flags else "off")
        predicted = tp.step_time(TrainConfig(m, micro_batch=8, precision="bf16", compiled=True), H100).tokens_per_s
        assert predicted == pytest.approx(measured, rel=0.1), (name, predicted, measured)


def test_quickstart_on_two_cpu_cores_runs_at_about_6000_tokens_per_s():
    st = tp.step_time(TrainConfig(QUICKSTART, micro_batch=16, precision="fp32"), None, cpu_cores=2)
    assert st.tokens_per_s == pytest.approx(6_000, rel=0.2)
    assert st.mfu is None and st.comm_s == 0
    four = tp.step_time(TrainConfig(QUICKSTART, micro_batch=16, precision="fp32"), None, cpu_cores=4)
    assert four.tokens_per_s == pytest.approx(2 * st.tokens_per_s)


def test_gpu_is_faster_than_cpu_and_bigger_models_use_the_gpu_better():
    cfg = TrainConfig(BENCH_85M, micro_batch=16)
    gpu, cpu = tp.step_time(cfg, H200), tp.step_time(cfg, None, cpu_cores=16)
    assert gpu.tokens_per_s > 100 * cpu.tokens_per_s
    assert 0 < gpu.mfu < 1
    big = ModelConfig.from_scale("1.3B", vocab_size=32000, seq_len=2048)
    assert tp.utilization(big, H200) > tp.utilization(BENCH_85M, H200)
    # fp32 on a GPU runs at the plain fp32 peak (no TF32)
    fp32 = tp.step_time(cfg.with_(precision="fp32"), H200)
    assert fp32.seconds > 3 * gpu.seconds
    assert fp32.mfu == pytest.approx(tp.flops_per_token(BENCH_85M) * fp32.tokens_per_s / 67e12)


def test_tiny_models_on_a_gpu_are_bound_by_the_host():
    tiny = ModelConfig(vocab_size=32000, seq_len=1024, n_layers=6, d_model=256, n_heads=4)
    st = tp.step_time(TrainConfig(tiny, micro_batch=16), H200)
    assert st.compute_s == pytest.approx(6 * tp.HOST_S_PER_LAYER * tp.EXECUTOR_OVERHEAD)
    assert st.compute_s == pytest.approx(0.0248 * 1.035, rel=0.05)  # measured 24.8 ms a micro-step, raw


def test_utilization_table_covers_the_catalog_and_matches_the_measured_kinds():
    assert set(tp.UTILIZATION) == set(CATALOG)
    assert all(0.05 < u < 0.8 for u in tp.UTILIZATION.values())
    # measured H200 1.28B micro-step: 36.2% raw, so ~35% through the executor
    assert tp.UTILIZATION["H200"] == pytest.approx(0.362 / 1.035, rel=0.08)
    assert tp.UTILIZATION["H100"] < tp.UTILIZATION["H200"]  # less bandwidth for eager's traffic


def test_offload_adds_time():
    cfg = TrainConfig(BENCH_85M, micro_batch=16)
    base = tp.step_time(cfg, H100)
    opt = tp.step_time(cfg.with_(offload="optimizer"), H100)
    params = tp.step_time(cfg.with_(offload="parameters"), H100)
    n = param_count(BENCH_85M)
    assert opt.offload_s == pytest.approx(8 * n / 25e9 + n * tp.CPU_ADAM_S_PER_PARAM)
    assert base.offload_s == 0 and opt.optimizer_s == 0 < base.optimizer_s
    assert base.seconds < opt.seconds < params.seconds


def test_more_gpus_over_a_slow_network_pay_for_it():
    big = ModelConfig.from_scale("1.3B", vocab_size=32000, seq_len=2048)
    cfg = TrainConfig(big, micro_batch=4, world_size=16, sharding="ddp")
    fast = tp.step_time(cfg, H100, network_gbps=400)
    slow = tp.step_time(cfg, H100, network_gbps=10)
    assert slow.comm_s > 10 * fast.comm_s
    assert tp.link_gbs(H100, 8, None) == pytest.approx(450 * 0.8)
    assert tp.link_gbs(H100, 16, None) == pytest.approx(100 / 8 * 0.8)  # hosts joined by the default network
    assert tp.link_gbs(CATALOG["RTX3090"], 2, None) == pytest.approx(32 * 0.8)


def test_generation_adds_memory_bound_sampling():
    m = ModelConfig.from_scale("1.3B", vocab_size=32000, seq_len=512)
    gen = GenerationConfig(prompts=2, group_size=8, prompt_tokens=128, completion_tokens=300)
    plain = tp.step_time(TrainConfig(m, micro_batch=16), H100)
    grpo = tp.step_time(TrainConfig(m, micro_batch=16, generation=gen), H100)
    assert plain.generation_s == 0 and grpo.generation_s > 0
    # and the log-probs' backward recomputes the head's product: 2·V·C a token more
    head = 2 * m.vocab_size * m.d_model / tp.train_flops(TrainConfig(m, micro_batch=16)) * plain.compute_s
    assert grpo.recompute_s == pytest.approx(head) and plain.recompute_s == 0
    assert grpo.seconds == pytest.approx(plain.seconds + grpo.generation_s + grpo.recompute_s)
    # each of the 300 decode steps reads the bf16 weights once at least
    assert grpo.generation_s > 300 * param_count(m) * 2 / (H100.memory_bandwidth_gbs * 1e9)


def test_lora_trains_faster_than_full_finetuning():
    m = ModelConfig.from_scale("1.3B", vocab_size=32000, seq_len=1024)
    full = TrainConfig(m, micro_batch=8)
    lora = full.with_(lora=LoraConfig(rank=16, target_modules=("q_proj", "v_proj")))
    assert tp.train_flops(lora) < 0.75 * tp.train_flops(full)
    assert tp.step_time(lora, H100).seconds < tp.step_time(full, H100).seconds


def test_eta_sums_the_stages_and_checks_the_timeline():
    st = tp.step_time(TrainConfig(BENCH_85M, micro_batch=16), H200)
    stages = [("pretrain", 1000, st), ("finetune", 500, st)]
    result = tp.eta(stages, timeline_s=None)
    assert result.total_s == pytest.approx(1500 * st.seconds)
    assert result.per_stage == [("pretrain", tp.stage_seconds(1000, st)), ("finetune", 500 * st.seconds)]
    assert result.meets is None
    assert tp.eta(stages, timeline_s=1600 * st.seconds).meets is True
    assert tp.eta(stages, timeline_s=1400 * st.seconds).meets is False


def test_what_meets_says_the_speedup_gpus_and_token_share():
    cfg = TrainConfig(BENCH_85M, micro_batch=16, grad_accum=8)
    seconds = tp.step_time(cfg, H200).seconds * 1000
    meets = tp.what_meets([("pretrain", 1000, cfg)], H200, seconds / 3.2)
    assert meets.speedup == pytest.approx(3.2)
    assert meets.token_fraction == pytest.approx(1 / 3.2)
    assert meets.world_size == 4  # 8 micro-batches a step split over 4 GPUs; 3 does not divide them
    faster = tp.what_meets([("pretrain", 1000, cfg)], H200, seconds * 2)
    assert faster.speedup == pytest.approx(0.5) and faster.world_size == 1 and faster.token_fraction == 1
    never = tp.what_meets([("pretrain", 1000, cfg)], H200, seconds / 100)
    assert never.world_size is None  # no split of the 128-sequence batch is 100x faster
    cpu = tp.what_meets([("q", 100, TrainConfig(QUICKSTART, micro_batch=16, precision="fp32"))], None,
                        tp.step_time(TrainConfig(QUICKSTART, micro_batch=16, precision="fp32"), None,
                                     cpu_cores=2).seconds * 50, cpu_cores=2)
    assert cpu.speedup == pytest.approx(2) and cpu.cpu_cores == 4 and cpu.world_size is None


def test_importing_the_model_does_not_import_torch():
    code = "import sys, muse_plan.optimizer.throughput; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_rollouts_from_a_cuda_graph_are_priced_at_the_measured_share_of_the_launch_floor():
    small = ModelConfig(vocab_size=260, seq_len=176, n_layers=12, d_model=512, n_heads=8)  # launch-bound
    times = {}
    for decode in ("eager", "graphs", "compiled"):
        gen = GenerationConfig(prompts=16, group_size=8, prompt_tokens=64, completion_tokens=112,
                               reference_model=False, decode=decode)
        times[decode] = tp.generation_seconds(TrainConfig(small, micro_batch=128, generation=gen), H100, 0.0)
    floor = tp._host_floor(small) * tp.FORWARD_HOST_SHARE
    prefill = {"eager": floor, "graphs": floor * 0.36, "compiled": floor * 0.36}  # muse's prefill replayed too
    decode_steps = {k: (v - prefill[k]) / 112 for k, v in times.items()}
    assert decode_steps["graphs"] / decode_steps["eager"] == pytest.approx(0.222)
    assert decode_steps["compiled"] / decode_steps["eager"] == pytest.approx(0.0715)
    # LoRA samples from the model itself, whose adapters train: no decode kept, so each rollout prefills
    # eagerly and captures its step again
    from muse_plan.optimizer.config import LoraConfig

    gen = GenerationConfig(prompts=16, group_size=8, prompt_tokens=64, completion_tokens=112,
                           reference_model=False, decode="compiled")
    lora = tp.generation_seconds(TrainConfig(small, micro_batch=128, generation=gen, lora=LoraConfig()), H100, 0.0)
    assert lora - times["compiled"] == pytest.approx(floor * (1.0 - 0.36) + floor * 1.46)
    from muse_plan.executor.settings import resolve, train_config
    from muse_plan.plan.io import spec_from_dict

    for compile_, expected in (("auto", "compiled"), ("on", "compiled"), ("off", "eager")):  # the plan decides
        spec = spec_from_dict({
            "name": "rl", "model": {"scale": "1M", "seq_len": 256, "vocab_size": 260,
                                    "shape": {"layers": 2, "d_model": 32, "n_heads": 2}},
            "training": {"compile": compile_},
            "stages": [{"name": "rl", "kind": "reasoning_rl", "steps": 10}]}, "test")
        settings = resolve(spec, spec.stages[0], cuda=True, bf16=True)
        assert train_config(settings).generation.decode == expected


def test_rollouts_through_muse_plan_run_are_priced_as_they_measured():
    """docs/bench_rollouts_plan_run_h100.json: the 38.7M decoder's rollouts through `muse plan run` on an H100
    (16 prompts × 8 completions, 112 new tokens), each step's rollout_s from the store. The sampling time the
    model prices for the same plan, as the executor resolves it, is within 5% of each setting's median."""
    import json
    import statistics
    import sys as _sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    _sys.path.insert(0, str(root / "scripts"))
    from bench_grpo import PLAN_RUN_SKIP, rollout_plan

    from muse_plan.executor.settings import resolve, train_config
    from muse_plan.plan.io import spec_from_dict

    calls = json.loads((root / "docs" / "bench_rollouts_plan_run_h100.json").read_text())
    # off: session 20's call (eager decoding is as it was); auto: session 21's, the decode kept between rollouts
    rows = [r for r in calls["call2"]["plan_run"] if r["compile"] == "off"] + calls["call3"]["new"]["plan_run"]
    assert [r["compile"] for r in rows] == ["off", "auto"]
    for row in rows:
        data = rollout_plan(row["compile"], 16, 8)
        spec = spec_from_dict({**data, "compute": "1xH100-80GB"}, "test")
        cfg = train_config(resolve(spec, spec.stages[0], cuda=True, bf16=True))
        measured = statistics.median(row["rollout_s"][PLAN_RUN_SKIP:])
        assert tp.generation_seconds(cfg, H100, 0.0) == pytest.approx(measured, rel=0.05), row["compile"]


def test_the_session_23_h100_plan_runs_are_priced_within_10_percent():
    """docs/bench_plan_run_pinned.json (one H100, after the loop's pinned reads): standard, ddl's fused
    kernels and mhc's and mgt's fused bf16 state under CUDA graphs through `muse plan run`, priced as the
    executor resolves each plan, within 10%; the eager standard row, which the H100's eager traffic was
    fitted to, within 1%."""
    import json
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
    from bench_plan_run import SHAPE, plan

    from muse_plan.executor.settings import resolve, train_config
    from muse_plan.plan.io import spec_from_dict

    def priced(base: str, flags: list[str], compile_: str) -> float:
        data = plan("p", base, compile_, SHAPE, 2048, 8, 10, "bf16", "1xH100",
                    "bfloat16" if "bf16" in flags else "float32", "auto", "on" if "fused" in flags else "off",
                    "on" if "graphs" in flags else "auto")
        spec = spec_from_dict(data, "t")
        return tp.step_time(train_config(resolve(spec, spec.stages[0], cuda=True, bf16=True)), H100).tokens_per_s

    docs = json.loads((Path(__file__).resolve().parent.parent / "docs" / "bench_plan_run_pinned.json").read_text())
    calls = (docs["new"], docs["call_2"]["tuned"], docs["call_2"]["untuned"], docs["call_3"]["hand_built_and_plan_run"])
    rows = [r for call in calls for r in call["rows"] if r["mode"] == "plan-run" and "model" not in r["model"]]
    assert {r["model"] for r in rows} == {"standard", "ddl+fused+graphs", "mhc+bf16+fused+graphs",
                                          "mgt+bf16+fused+graphs"} and len(rows) == 8
    for r in rows:
        base, *flags = r["model"].split("+")
        assert priced(base, flags, "on") == pytest.approx(r["tokens_per_s"], rel=0.1), r["model"]
    (eager,) = docs["call_3"]["eager"]["rows"]
    assert priced("standard", [], "off") == pytest.approx(eager["tokens_per_s"], rel=0.01)


def test_ddls_fused_step_under_graphs_is_priced_at_its_measured_overhead_over_standard():
    """ddl's fused kernels replayed from CUDA graphs (what training.fused_kernels auto runs for ddl on a GPU)
    are priced from their own measurement, no longer as torch's fusion (+9.2%): the predicted step over
    standard within a point of the mean of the three H100 invocations that ran both (docs), each within
    2.5 points; without graphs, as torch's."""
    import json
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
    from bench_plan_run import SHAPE, plan

    from muse_plan.executor.settings import resolve, train_config
    from muse_plan.plan.io import spec_from_dict

    def priced(base: str, kernels: str, graphs: str) -> float:
        data = plan("p", base, "on", SHAPE, 2048, 8, 10, "bf16", "1xH100", "float32", "auto", kernels, graphs)
        spec = spec_from_dict(data, "t")
        return tp.step_time(train_config(resolve(spec, spec.stages[0], cuda=True, bf16=True)), H100).tokens_per_s

    docs = Path(__file__).resolve().parent.parent / "docs"
    pinned = json.loads((docs / "bench_plan_run_pinned.json").read_text())["call_2"]["untuned"]["rows"]
    s25 = json.loads((docs / "bench_plan_run_session25_h100.json").read_text())
    calls = [pinned, s25["call1_a_committed"]["rows"], s25["call2_c_committed"]["rows"]]
    measured = [next(r["overhead_vs_standard"] for r in rows if r["model"] == "ddl+fused+graphs") for rows in calls]
    assert [round(m, 3) for m in measured] == [0.079, 0.055, 0.077]
    predicted = priced("standard", "off", "auto") / priced("ddl", "on", "on") - 1
    assert predicted == pytest.approx(sum(measured) / 3, abs=0.01)
    assert all(abs(predicted - m) < 0.025 for m in measured)
    torch_fusion = priced("standard", "off", "auto") / priced("ddl", "off", "auto") - 1
    assert priced("ddl", "on", "off") == pytest.approx(priced("ddl", "off", "auto"))  # no graphs: torch's price
    assert torch_fusion == pytest.approx(0.092, abs=0.005)
