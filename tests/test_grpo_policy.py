"""The GRPO engine's policy: KV-cache sampling equals full recomputation for
every residual mode, LoRA trains only adapters, the reference policy is the
model without adapters, and weights cross LoRA boundaries between stages."""

import weakref

import pytest
import torch

from engines.architecture.config import ModelConfig
from engines.architecture.model import DecoderLM
from engines.grpo.policy import LoraSettings, Policy, add_lora
from muse_plan.executor.weights import load_into

PAD, EOS = 258, 257


def _model(residual: str = "standard", seed: int = 0) -> DecoderLM:
    torch.manual_seed(seed)
    return DecoderLM(ModelConfig(vocab_size=260, n_layers=2, d_model=32, n_heads=4, seq_len=48, residual=residual))


@pytest.mark.parametrize("residual", ["standard", "hc", "mhc", "ddl", "mgt"])
def test_cached_greedy_sampling_equals_full_recomputation(residual):
    model = _model(residual).eval()
    prompts = [[256, 5, 6, 7, 8, 9], [256, 1], [256, 40, 41]]  # different lengths: left padding in one batch
    outs = Policy(model, PAD, EOS).sample(prompts, 12, temperature=0.0)
    for prompt, out in zip(prompts, outs):
        ids = list(prompt)
        for token in out:
            logits, _ = model(torch.tensor([ids]))
            assert int(logits[0, -1].argmax()) == token
            ids.append(token)
        assert len(out) == 12 or out[-1] == EOS


def test_the_kv_cache_is_freed_when_sampling_returns_without_the_garbage_collector(monkeypatch):
    """A reference cycle would keep the cache (a rollout's largest tensors) alive into the update."""
    import gc

    import engines.architecture.model as model_module

    caches = []

    class Recorded(model_module.KVCache):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            caches.append(weakref.ref(self.layers[0].k))

    monkeypatch.setattr("engines.grpo.policy.KVCache", Recorded)
    gc.disable()
    try:
        Policy(_model(), PAD, EOS).sample([[256, 5, 6]] * 2, 8, temperature=1.0)
        assert len(caches) == 1 and caches[0]() is None
    finally:
        gc.enable()


def test_the_kv_cache_holds_keys_in_the_dtype_autocast_computes_them_in():
    model = _model()
    from engines.architecture.model import KVCache

    valid = torch.ones(1, 3, dtype=torch.bool)
    assert KVCache(model, 1, 8, valid).layers[0].k.dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cache = KVCache(model, 1, 8, valid)
        model(torch.tensor([[256, 5, 6]]), cache=cache)
    assert cache.layers[0].k.dtype == cache.layers[0].v.dtype == torch.bfloat16


def test_sampling_draws_from_torch_generator_so_a_seed_repeats_it():
    policy = Policy(_model(), PAD, EOS)
    torch.manual_seed(3)
    a = policy.sample([[256, 5]] * 4, 10, temperature=1.0)
    torch.manual_seed(3)
    assert policy.sample([[256, 5]] * 4, 10, temperature=1.0) == a
    assert len({tuple(x) for x in a}) > 1  # temperature 1 gives different completions


def test_lora_trains_only_adapters_of_the_last_layers_and_the_reference_is_the_base():
    model = _model()
    before = model(torch.tensor([[256, 5, 6]]))[0].detach()
    peft = add_lora(model, LoraSettings(rank=4, target_modules=("q_proj", "v_proj"), layers_fraction=0.5))
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert trainable and all("lora_" in n and n.startswith("blocks.1.") for n in trainable)
    assert {n.split(".")[3] for n in trainable} == {"wq", "wv"}
    with torch.no_grad():  # move the adapters off zero so the model differs from its base
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.fill_(0.1)
    policy = Policy(model, PAD, EOS, peft)
    ids = torch.tensor([[256, 5, 6]])
    assert not torch.allclose(policy.logits(ids), before)
    with policy.as_reference() as reference:
        assert torch.allclose(policy.logits(ids, reference), before, atol=1e-6)


def test_unknown_lora_target_is_refused_with_the_accepted_names():
    with pytest.raises(ValueError, match="LoRA target module 'qkv' is not in the decoder; accepted: q_proj"):
        add_lora(_model(), LoraSettings(target_modules=("qkv",)))


def _lora_model_with_trained_adapters() -> tuple[DecoderLM, LoraSettings]:
    model, settings = _model(seed=1), LoraSettings(rank=4, alpha=8.0, layers_fraction=1.0)
    add_lora(model, settings)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.normal_(0, 0.2)
    return model, settings


def test_lora_checkpoint_merges_into_a_plain_model_that_computes_the_same():
    lora_model, settings = _lora_model_with_trained_adapters()
    ids = torch.tensor([[256, 9, 8, 7]])
    expected = lora_model(ids)[0].detach()
    plain = _model(seed=5)
    missing, unexpected = load_into(plain, {k: v.clone() for k, v in lora_model.state_dict().items()},
                                    settings.scaling)
    assert missing == [] and unexpected == []
    assert torch.allclose(plain(ids)[0], expected, atol=1e-5)


def test_plain_checkpoint_loads_under_fresh_adapters_and_lora_continues_lora(tmp_path):
    source = _model(seed=2)
    target = _model(seed=7)
    add_lora(target, LoraSettings(rank=4, layers_fraction=1.0))
    ids = torch.tensor([[256, 3, 4]])
    missing, unexpected = load_into(target, dict(source.state_dict()), None)
    assert missing == [] and unexpected == []
    assert torch.allclose(target(ids)[0], source(ids)[0], atol=1e-6)  # B = 0: adapters add nothing yet
    lora_model, settings = _lora_model_with_trained_adapters()
    again = _model(seed=9)
    add_lora(again, settings)
    load_into(again, dict(lora_model.state_dict()), settings.scaling)
    assert torch.allclose(again(ids)[0], lora_model(ids)[0], atol=1e-6)


def test_adapters_without_a_recorded_scaling_are_refused():
    lora_model, _ = _lora_model_with_trained_adapters()
    with pytest.raises(ValueError, match="without a recorded scaling"):
        load_into(_model(), dict(lora_model.state_dict()), None)


def _trainer(frozen: str, lora: dict | None, kl_beta: float = 0.0, decode: str = "eager", **extra):
    from engines.contract import StageSetup
    from engines.grpo.options import parse
    from engines.grpo.trainer import GrpoTrainer

    torch.manual_seed(0)
    options = {"tasks": ["multiplication:2x1"], "group_size": 4, "max_new_tokens": 8, "eval_problems": 2,
               "kl_beta": kl_beta, **({"lora": lora} if lora else {}), **extra}
    t = GrpoTrainer()
    t.setup(StageSetup(name="rl", kind="reasoning_rl", micro_batch=2, frozen_precision=frozen, decode=decode,
                       options=parse("reasoning_rl", {}, options),
                       model=ModelConfig(vocab_size=260, n_layers=4, d_model=64, n_heads=4, seq_len=48)))
    return t


def _bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def test_a_bf16_stage_keeps_the_lora_base_in_bf16_and_the_memory_model_counts_it_exactly():
    from muse_plan.optimizer import memory
    from muse_plan.optimizer.config import GenerationConfig, LoraConfig, TrainConfig

    t = _trainer("bf16", {"rank": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"], "layers_fraction": 0.5})
    params = dict(t.model.named_parameters())
    trainable = [p for p in params.values() if p.requires_grad]
    assert {p.dtype for p in trainable} == {torch.float32} and len(trainable) == 2 * 2 * 2  # 2 layers × q, v × A, B
    assert {p.dtype for p in params.values() if not p.requires_grad} == {torch.bfloat16}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = t.micro_step(t.next_batch()).loss
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad is not None and p.grad.dtype == torch.float32 for p in trainable)
    assert all(p.grad is None for p in params.values() if not p.requires_grad)
    cfg = TrainConfig(model=t.model.config, micro_batch=2, precision="bf16", grad_accum=2,
                      lora=LoraConfig(rank=4, target_modules=("q_proj", "v_proj"), layers_fraction=0.5),
                      generation=GenerationConfig(group_size=4, reference_model=True))
    b = memory.estimate(cfg, device="cpu")
    assert b.weights == _bytes(params.values())
    assert b.gradients == _bytes(p.grad for p in trainable)
    assert b.optimizer == 2 * _bytes(trainable)
    # the KL reference under LoRA is the same model with its adapters off: nothing more is held
    assert memory.reference_bytes(cfg) == 0
    # an fp32 stage (the CPU default) keeps everything in fp32
    assert {p.dtype for p in _trainer("fp32", {"rank": 4}).model.parameters()} == {torch.float32}


def test_a_full_fine_tuning_reference_is_a_bf16_copy_of_the_weights_the_stage_starts_from():
    from muse_plan.optimizer import memory
    from muse_plan.optimizer.config import GenerationConfig, TrainConfig

    t = _trainer("bf16", None, kl_beta=0.04)
    t.next_batch()
    reference = dict(t.policy.reference.named_parameters())
    assert {p.dtype for p in reference.values()} == {torch.bfloat16}
    assert all(torch.equal(reference[k], p.detach().to(torch.bfloat16)) for k, p in t.model.named_parameters())
    assert {b.dtype for b in t.policy.reference.buffers() if b.is_floating_point()} <= {torch.float32}
    cfg = TrainConfig(model=t.model.config, precision="bf16")
    assert memory.reference_bytes(cfg.with_(generation=GenerationConfig())) == _bytes(reference.values())


def test_full_fine_tuning_that_decodes_on_a_gpu_samples_from_a_copy_the_memory_model_counts_exactly():
    """A stage whose decode steps are captured (a GPU's training.compile) with bf16 mixed precision samples from a
    bf16 copy of its fp32 weights; the memory model holds exactly its bytes for the stage, and nothing where the
    stage decodes eagerly, trains LoRA, computes in fp32 or has FSDP shard the parameters."""
    from muse_plan.optimizer import memory
    from muse_plan.optimizer.config import GenerationConfig, LoraConfig, TrainConfig

    t = _trainer("bf16", None, decode="graphs")  # on CPU the steps run eagerly; the copy is made all the same
    t.next_batch()
    assert t.policy.sample_dtype == torch.bfloat16
    copy = list(t.policy.sampler().parameters())
    assert {p.dtype for p in copy} == {torch.bfloat16} and {p.dtype for p in t.model.parameters()} == {torch.float32}
    cfg = TrainConfig(model=t.model.config, precision="bf16", generation=GenerationConfig(decode="graphs"))
    assert memory.sampler_bytes(cfg) == _bytes(copy) > 0
    assert memory.estimate(cfg).generation - memory.estimate(cfg.with_(generation=GenerationConfig())).generation \
        == _bytes(copy) + memory.kept_decode_bytes(cfg)
    for frozen, lora, decode in [("bf16", None, "eager"), ("bf16", {"rank": 4}, "graphs"), ("fp32", None, "graphs")]:
        assert _trainer(frozen, lora, decode=decode).policy.sample_dtype is None, (frozen, lora, decode)
    assert memory.sampler_bytes(cfg.with_(generation=GenerationConfig(decode="eager"))) == 0
    assert memory.sampler_bytes(cfg.with_(lora=LoraConfig())) == 0
    assert memory.sampler_bytes(cfg.with_(precision="fp32")) == 0
    assert memory.sampler_bytes(cfg.with_(sharding="fsdp", world_size=2)) == 0  # the executor's frozen dtype: fp32


def test_the_memory_model_holds_the_kept_decode_steps_caches_through_the_update():
    """Where muse's decoder replays captured decode steps, the caches kept for the next rollout (at most
    KEPT_DECODE_BYTES) and the step's logits are held beside the update's activations; nothing is kept where
    steps run eagerly or a Hugging Face model decodes (its own static cache, remade each rollout)."""
    from engines.architecture.config import ModelConfig
    from engines.grpo.options import KEPT_DECODE_BYTES
    from muse_plan.optimizer import memory
    from muse_plan.optimizer.config import GenerationConfig, LoraConfig, TrainConfig

    model = ModelConfig(vocab_size=260, n_layers=12, d_model=512, n_heads=8, seq_len=160)
    generation = GenerationConfig(prompts=16, group_size=8, prompt_tokens=24, completion_tokens=112, decode="compiled")
    cfg = TrainConfig(model=model, micro_batch=128, precision="bf16", generation=generation)
    kv = 2 * 12 * 512 * 128 * (24 + 112) * 2  # keys and values, bf16, every row's prompt and completion
    prefill = 128 * 24 * (3 * model.ffn_dim + 4 * 512) * 2  # the prefill graph's pool: a block's widest tensors
    logits = 128 * 260 * (2 + 4)
    # two decodes kept (two prompt widths), each one's cache and prefill pool
    assert memory.kept_decode_bytes(cfg) == 2 * (kv + prefill) + logits and 2 * (kv + prefill) < KEPT_DECODE_BYTES
    eager = cfg.with_(generation=GenerationConfig(**{**generation.__dict__, "decode": "eager"}))
    assert memory.kept_decode_bytes(eager) == memory.kept_decode_bytes(cfg.with_(hf=True)) == 0
    # sampling from weights that train (LoRA's adapters, an fp32 stage's): no copy, nothing kept
    assert memory.kept_decode_bytes(cfg.with_(lora=LoraConfig())) == memory.kept_decode_bytes(
        cfg.with_(precision="fp32")) == 0
    assert memory.estimate(cfg).generation - memory.estimate(eager).generation >= kv + prefill + logits
    # two decodes that together pass the cap: as many as fit it (the runtime lets go of the older one)
    wider = cfg.with_(generation=GenerationConfig(**{**generation.__dict__, "completion_tokens": 240}))
    one = memory._decode_bytes(wider)
    assert one <= KEPT_DECODE_BYTES < 2 * one and memory.kept_decode_bytes(wider) == KEPT_DECODE_BYTES + logits
    # one decode past the cap is never kept (Policy._keep drops it at once): no bytes held, and the
    # throughput model prices its capture every rollout
    long = cfg.with_(generation=GenerationConfig(**{**generation.__dict__, "completion_tokens": 2048}))
    assert memory._decode_bytes(long) > KEPT_DECODE_BYTES
    assert not memory.keeps_decodes(long) and memory.kept_decode_bytes(long) == 0


def test_adapters_merge_into_a_bf16_base_in_fp32_so_a_small_update_survives():
    from muse_plan.executor.weights import fit_keys

    base = torch.ones(4, 4, dtype=torch.bfloat16)
    a, b = torch.full((1, 4), 1e-3), torch.ones(4, 1)  # an update of 1e-3: below bf16's resolution at 1.0
    merged = fit_keys({"w.base_layer.weight": base, "w.lora_A.default.weight": a, "w.lora_B.default.weight": b},
                      {"w.weight": torch.zeros(4, 4)}, lora_scaling=1.0)["w.weight"]
    assert merged.dtype == torch.float32 and torch.allclose(merged, torch.full((4, 4), 1.001))


def test_adapters_alone_merge_into_the_weight_the_model_holds_and_never_into_a_packed_base():
    """A checkpoint of adapters only (its base is model.init_from's) merges into the next
    model's own weight; the same adapters continue where that model has them; a 4-bit
    base (packed bytes) can't take a merge: one error naming the module."""
    from muse_plan.executor.weights import fit_keys, load_into

    a, b = torch.randn(2, 4), torch.randn(4, 2)
    adapters = {"w.lora_A.default.weight": a, "w.lora_B.default.weight": b}
    held = torch.randn(4, 4)
    merged = fit_keys(adapters, {"w.weight": held}, lora_scaling=0.5)
    assert set(merged) == {"w.weight"} and torch.allclose(merged["w.weight"], held + 0.5 * b @ a)
    onto_lora = fit_keys(adapters, {"w.base_layer.weight": held, **adapters}, lora_scaling=0.5)
    assert set(onto_lora) == set(adapters)  # continued, the model's base untouched
    packed = torch.zeros(8, 1, dtype=torch.uint8)  # NF4: two weights a byte
    with pytest.raises(ValueError, match="w: its adapters can't be merged into a 4-bit"):
        fit_keys(adapters, {"w.base_layer.weight": packed}, lora_scaling=0.5)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4, bias=False))
    before = model[0].weight.detach().clone()
    missing, unexpected = load_into(model, {"0.lora_A.default.weight": a, "0.lora_B.default.weight": b}, 2.0, True)
    assert (missing, unexpected) == ([], []) and torch.allclose(model[0].weight, before + 2.0 * b @ a)


@pytest.mark.parametrize("algorithm", ["grpo", "s_grpo", "t_spmo"])
def test_an_update_reports_its_signal_equal_groups_and_advantages(algorithm):
    """What says why an RL stage learns or not: the share of groups whose completions all scored
    alike, the mean |advantage| (GRPO, S-GRPO: of the completions; T-SPMO: of its informative
    prefix-tree transitions) and T-SPMO's share of transitions that carry one."""
    from engines.grpo.rl import Group

    lora = {"rank": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"], "layers_fraction": 0.5}
    t = _trainer("fp32", lora, algorithm=algorithm)
    split = Group([1, 2, 3], [[5, 6], [5, 7], [5, 7], [5, 6]], torch.tensor([1.0, 0.0, 0.0, 1.0]), 0.5)
    alike = Group([1, 2, 4], [[8], [8, 9], [9], [8]], torch.zeros(4), 0.0)
    metrics = t.micro_step([split, alike]).metrics
    assert metrics["equal_groups"] == 0.5
    if algorithm == "t_spmo":
        assert 0 < metrics["informative_transitions"] < 1 and metrics["advantage_abs"] > 0
        # its L2 term, λ Σ‖W‖² over the adapters: peft starts B at 0, so it is A's alone
        adapters = [p for n, p in t.model.named_parameters() if "lora_A" in n]
        assert metrics["l2_term"] == pytest.approx(0.01 * sum(float(p.pow(2).sum()) for p in adapters), rel=1e-5)
        assert metrics["l2_term"] > 0
        quiet = t.micro_step([alike]).metrics
        assert quiet["equal_groups"] == 1.0 and quiet["informative_transitions"] == quiet["advantage_abs"] == 0.0
    else:  # ±0.5 over the group's sample std (√(1/3)) + 1e-4, for half of the 8 completions
        assert "l2_term" not in metrics
        assert metrics["advantage_abs"] == pytest.approx(0.5 * 0.5 / (3 ** -0.5 + 1e-4), rel=1e-6)


def test_the_held_out_problems_are_the_same_whatever_the_training_seed():
    """Seeds of one plan are compared on one test set: the generated held-out problems don't
    follow training.seed (the training stream does)."""
    from engines.contract import StageSetup
    from engines.grpo.options import parse
    from engines.grpo.trainer import GrpoTrainer

    def problems(seed: int) -> tuple[list[str], list]:
        t = GrpoTrainer()
        t.setup(StageSetup(name="rl", kind="reasoning_rl", micro_batch=2, seed=seed,
                           options=parse("reasoning_rl", {}, {"tasks": ["multiplication:2x2"], "group_size": 2,
                                                              "max_new_tokens": 4, "eval_problems": 16}),
                           model=ModelConfig(vocab_size=260, n_layers=1, d_model=32, n_heads=2, seq_len=48)))
        return [e.prompt for e in t.eval_problems], [e.prompt for e in t.stream.take(4)]

    (test_a, train_a), (test_b, train_b) = problems(0), problems(3)
    assert test_a == test_b and len(set(test_a)) > 8
    assert train_a != train_b  # the seed still orders the training problems


@pytest.mark.parametrize("updates_per_rollout", [1, 2])
def test_skipping_a_faults_window_leaves_out_its_problems_without_rolling_them_out(updates_per_rollout):
    """A recovery that skips the data between the checkpoint and the fault: the problem stream ends
    where drawing those batches would have left it, and nothing is sampled for them."""
    drawn = _trainer("fp32", None, updates_per_rollout=updates_per_rollout)
    for _ in range(3):
        drawn.next_batch()
    skipped = _trainer("fp32", None, updates_per_rollout=updates_per_rollout)
    calls = []
    sample = skipped.policy.sample
    skipped.policy.sample = lambda *a, **k: calls.append(a) or sample(*a, **k)
    skipped.skip_batches(3)
    assert calls == []
    # three batches of one rollout each, or one rollout serving two: the rest of a rollout goes too
    assert skipped.stream.drawn == 2 * (3 if updates_per_rollout == 1 else 2)
    assert drawn.stream.drawn == 2 * (3 if updates_per_rollout == 1 else 2)
    batch = skipped.next_batch()  # and the next batch is the stream's next problems, sampled now
    assert len(calls) == 1 and len(batch) == 2 and skipped.stream.drawn == drawn.stream.drawn + 2


def test_each_micro_step_says_how_long_its_rollout_took_and_a_reused_rollout_took_none():
    """rollout_s: the seconds spent sampling, scoring and the reference pass for this micro-batch, which
    the store keeps beside the step's time; a stored rollout served again (updates_per_rollout 2) costs 0."""
    import time

    t = _trainer("fp32", None, kl_beta=0.04, updates_per_rollout=2)
    sample = t.policy.sample
    t.policy.sample = lambda *a, **k: time.sleep(0.2) or sample(*a, **k)  # a rollout at least this long
    first = t.micro_step(t.next_batch()).metrics["rollout_s"]
    again = t.micro_step(t.next_batch()).metrics["rollout_s"]
    assert first >= 0.2 and again == 0.0
