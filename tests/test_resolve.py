"""One resolver: what the optimizer prices is what the executor runs, for every bundled
plan and stage; a rewrite lands where its stage reads it and moves no other stage."""

from __future__ import annotations

import pytest

from muse_plan.executor import prepare
from muse_plan.executor.settings import resolve, train_config
from muse_plan.optimizer import fit as fitting
from muse_plan.plan.io import load_file
from muse_plan.plan.planner import complete
from muse_plan.recovery.policies import next_rewrite
from tests.conftest import PLANS
from tests.test_fit import HOST


def _executor_settings(spec, hw, monkeypatch):
    """The settings ``muse plan run`` resolves for every stage on ``hw`` (bf16 as the card has it)."""
    monkeypatch.setattr(prepare, "bf16", lambda cuda: bool(cuda and hw.gpu.bf16))
    return [prepare.stage_settings(spec, i, hw.processes, hw.gpu is not None) for i in range(len(spec.stages))]


def _with_model_folder(spec, folder):
    """A plan of a Hugging Face model muse can't find here (``./models/Qwen2-1.5B``) gets a
    folder whose config.json is the model the plan describes, as the user's would be."""
    import json

    from muse_plan.executor.settings import decoder_config
    from muse_plan.plan.io import spec_from_dict, spec_to_dict

    c = decoder_config(spec, spec.stages[0])
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({
        "model_type": "qwen2", "vocab_size": c.vocab_size, "num_hidden_layers": c.n_layers,
        "hidden_size": c.d_model, "num_attention_heads": c.n_heads, "num_key_value_heads": c.kv_heads,
        "intermediate_size": c.ffn_dim, "rope_theta": c.rope_theta, "rms_norm_eps": c.norm_eps}))
    data = spec_to_dict(spec)
    data["model"]["init_from"] = str(folder)
    return spec_from_dict(data)


def test_every_bundled_plan_is_priced_as_the_executor_runs_it_before_and_after_fitting(monkeypatch,
                                                                                     tmp_path) -> None:
    checked = []
    for path in PLANS:
        spec = complete(load_file(str(path)))
        if spec.model.family == "hf":
            spec = _with_model_folder(spec, tmp_path / path.stem)
        hw = fitting.hardware_for(spec, host=HOST)
        result = fitting.fit(spec, hw, alternatives=False)
        runs = _executor_settings(spec, hw, monkeypatch)
        for priced, ran in zip(result.written.stages, runs):
            if priced.memory is None:
                continue
            assert (priced.knobs, priced.config, priced.steps) == (
                fitting.Settings.of(ran), train_config(ran), ran.steps), (path.name, ran.name)
            checked.append((path.stem, ran.name))
        if result.chosen is None:
            continue
        fitted = result.fitted_spec  # what the optimizer stores is what then runs
        for chosen, ran in zip(result.chosen.stages, _executor_settings(fitted, hw, monkeypatch)):
            if chosen.memory is not None:
                assert (chosen.knobs, chosen.config) == (fitting.Settings.of(ran), train_config(ran)), \
                    (path.name, ran.name)
    assert len({plan for plan, _ in checked}) >= 5 and len(checked) >= 15


def test_an_rl_stage_is_priced_as_prompts_times_its_group_at_its_own_settings() -> None:
    spec = complete(load_file("plans/reasoning-grpo-cpu.yaml"))
    hw = fitting.hardware_for(spec, host=HOST)
    stages = {s.name: s for s in fitting.price(spec, hw).stages}
    grpo, tspmo, rs = stages["reasoning_rl_grpo"], stages["reasoning_rl_t_spmo"], stages["rejection_sampling"]
    assert grpo.knobs.micro_batch == 8 and grpo.config.micro_batch == 8 * 8  # 8 prompts × group 8
    assert grpo.config.generation.group_size == 8 and grpo.config.lora is not None
    # T-SPMO: its own micro-batch (2), its own group (16) and its replayed groups (success_budget 2)
    assert (tspmo.knobs.micro_batch, tspmo.config.generation.group_size, tspmo.config.micro_batch) == (2, 16, 64)
    assert tspmo.config.generation.reference_model is False  # its objective has no KL term
    assert rs.config.generation.group_size == 8 and rs.config.lora is None  # lora: false in the stage
    assert stages["pretrain"].knobs.micro_batch == 32 and stages["pretrain"].config.generation is None


def test_an_rl_stage_prices_the_prompts_its_tasks_generate_and_the_users_rows_at_the_default(tmp_path) -> None:
    """Generated tasks' prompts are priced at their longest (in bytes, as the template shows them, + 2): no prompt
    the stage draws is longer, and the update's sequences are that plus the completion; the user's rows, whose
    tokens the plan can't count without the tokenizer, at ``PROMPT_TOKENS``. Priced at 128 tokens, an 18-token
    arithmetic prompt made a Qwen2-0.5B GRPO step look twice its size and the optimizer switched it to LoRA."""
    import random

    from engines.data.arithmetic import task
    from engines.grpo.options import parse
    from muse_plan.executor.settings import PROMPT_TOKENS, prompt_tokens

    options = parse("reasoning_rl", {}, {"tasks": ["multiplication:3x3", "word_problem"], "max_new_tokens": 64,
                                         "prompt_template": "Q: {prompt}\nA: "})
    priced = prompt_tokens(options)
    for seed in range(1, 4):  # other draws than the priced ones: none longer
        rng = random.Random(seed)
        longest = max(len(f"Q: {task(name)(rng).prompt}\nA: ".encode()) + 1
                      for name in ("multiplication:3x3", "word_problem") for _ in range(512))
        assert longest <= priced < PROMPT_TOKENS
    assert prompt_tokens(parse("reasoning_rl", {}, {"tasks": ["multiplication:3x3"]})) == len("What is 123*456?") + 2
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(f'{{"prompt": "{i}+2?", "answer": "{i + 2}"}}\n' for i in range(40)))
    assert prompt_tokens(parse("reasoning_rl", {}, {"data": str(rows)})) == PROMPT_TOKENS
    spec = complete(load_file("plans/reasoning-grpo-cpu.yaml"))
    grpo = {s.name: s for s in fitting.price(spec, fitting.hardware_for(spec, host=HOST)).stages}["reasoning_rl_grpo"]
    stage = next(s for s in spec.stages if s.name == "reasoning_rl_grpo")
    generation, new = grpo.config.generation, stage.options["max_new_tokens"]
    assert generation.prompt_tokens < PROMPT_TOKENS and grpo.config.model.seq_len == generation.prompt_tokens + new


@pytest.mark.parametrize("world", [1, 2])
def test_an_oom_rewrite_of_a_stage_with_its_own_micro_batch_keeps_every_global_batch(world: int) -> None:
    spec = complete(load_file("plans/reasoning-grpo-cpu.yaml"))
    before = {s.name: resolve(spec, s, world_size=world) for s in spec.stages}
    used, rewrite, new = next_rewrite(spec, spec.stage("reasoning_rl_grpo"), "oom", 0, world)
    after = {s.name: resolve(new, s, world_size=world) for s in new.stages}
    assert after["reasoning_rl_grpo"].micro_batch == before["reasoning_rl_grpo"].micro_batch // 2
    assert after["reasoning_rl_grpo"].grad_accum == 2 * before["reasoning_rl_grpo"].grad_accum
    assert {n: s.global_batch for n, s in after.items()} == {n: s.global_batch for n, s in before.items()}
    assert {n: s.micro_batch for n, s in after.items() if n != "reasoning_rl_grpo"} == \
        {n: s.micro_batch for n, s in before.items() if n != "reasoning_rl_grpo"}
    # and again, from the rewritten plan: the ladder climbs on the stage's own numbers
    _, again, newer = next_rewrite(new, new.stage("reasoning_rl_grpo"), "oom", used, world)
    assert resolve(newer, newer.stage("reasoning_rl_grpo"), world_size=world).micro_batch == \
        before["reasoning_rl_grpo"].micro_batch // 4


def test_a_nan_rewrite_halves_the_lr_the_stage_ran_with_and_only_its_own() -> None:
    spec = complete(load_file("plans/reasoning-grpo-cpu.yaml"))
    _, rewrite, new = next_rewrite(spec, spec.stage("rejection_sampling"), "nan", 0, 1)
    assert rewrite.summary.startswith("lr 5e-05→2.5e-05")
    assert resolve(new, new.stage("rejection_sampling")).lr == 2.5e-5
    assert resolve(new, new.stage("pretrain")).lr == resolve(spec, spec.stage("pretrain")).lr == 1e-3


def test_the_report_prices_a_stage_as_the_optimizer_does() -> None:
    from muse_plan.report import predicted_gib

    spec = complete(load_file("plans/reasoning-grpo-cpu.yaml"))
    hw = fitting.hardware_for(spec, host=HOST)
    for priced in fitting.price(spec, hw).priced:
        gib, note = predicted_gib(spec, spec.stage(priced.name), device="cpu", processes=1)
        assert note == "" and gib == pytest.approx((priced.memory.total - priced.memory.overhead) / 2**30)


def test_open_precision_resolves_the_same_for_the_optimizer_and_the_executor() -> None:
    from muse_plan.hardware.catalog import lookup
    from muse_plan.plan.io import spec_from_dict

    spec = spec_from_dict({"name": "p", "model": {"scale": "125M", "seq_len": 512},
                           "stages": [{"name": "pre", "kind": "pretrain", "steps": 10}]})
    for gpu, precision in (("T4", "fp32"), ("A100", "bf16")):  # T4: no bf16, and fp16 needs loss scaling
        hw = fitting.Hardware(lookup(gpu), 1, lookup(gpu).memory_gib, 64.0)
        assert fitting.price(spec, hw).stages[0].knobs.precision == precision
        assert resolve(spec, spec.stages[0], cuda=True, bf16=lookup(gpu).bf16).precision == precision


def test_cuda_graphs_resolve_from_the_plan_and_reach_the_price() -> None:
    """``training.cuda_graphs``: auto turns them on for mHC's fused connection on a GPU, one micro-step a
    step; the executor's settings and the throughput model's config carry the same answer."""
    from muse_plan.optimizer import throughput
    from muse_plan.hardware.catalog import lookup
    from muse_plan.plan.io import spec_from_dict

    def spec(training: dict):
        return spec_from_dict({"name": "p", "model": {"scale": "125M", "seq_len": 512, "residual": "mhc"},
                               "techniques": {"mhc": {"streams": 4, "stream_dtype": "bfloat16"}},
                               "training": {"micro_batch": 8, "global_batch": 8, "precision": "bf16", **training},
                               "stages": [{"name": "pre", "kind": "pretrain", "steps": 10}]})

    fused = spec({"fused_kernels": "on"})
    s = resolve(fused, fused.stages[0], cuda=True, bf16=True)
    assert s.compile and s.cuda_graphs and train_config(s).cuda_graphs
    assert not resolve(fused, fused.stages[0], cuda=False).cuda_graphs
    default = spec({})  # fused_kernels auto: on for this bf16 state of 4 streams, so graphs too
    assert resolve(default, default.stages[0], cuda=True, bf16=True).cuda_graphs
    for training in ({"fused_kernels": "on", "cuda_graphs": "off"}, {"fused_kernels": "off"},
                     {"fused_kernels": "on", "global_batch": 16}):  # two micro-steps a step
        p = spec(training)
        assert not resolve(p, p.stages[0], cuda=True, bf16=True).cuda_graphs, training
    forced = spec({"cuda_graphs": "on"})
    assert resolve(forced, forced.stages[0], cuda=True, bf16=True).cuda_graphs
    # priced: the fused connection replayed from graphs at its measured traffic, faster than without
    graphs = train_config(s)
    h100 = lookup("H100")
    assert throughput.step_time(graphs, h100).seconds < throughput.step_time(
        graphs.with_(cuda_graphs=False), h100).seconds
