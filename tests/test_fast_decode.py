"""The GRPO policy's static-shape decoding: it samples exactly what the per-token loop
before it sampled (greedy and, from the same seed, at a temperature), every decode step
runs the same ops on the same shapes and the same memory with no host sync (so a CUDA
graph can hold it), and on CUDA the graph replays what the eager step computes, going
back to eager when a capture fails."""

from __future__ import annotations

from typing import Any, Sequence

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from engines.architecture.config import ModelConfig
from engines.architecture.model import DecoderLM, KVCache
from engines.grpo.policy import STATIC_WIDTH, Graphed, Policy, Rollout, _until_eos, static_shape

PAD, EOS = 258, 257
PROMPTS = [[256, 5, 6, 7, 8, 9, 10], [256, 1], [256, 40, 41, 42]]  # left padding: different lengths


def _model(n_kv_heads: int | None = None, residual: str = "standard", device: str = "cpu") -> DecoderLM:
    """A tiny decoder with weights wide enough that greedy decoding doesn't repeat one token."""
    torch.manual_seed(0)
    model = DecoderLM(ModelConfig(vocab_size=260, n_layers=2, d_model=64, n_heads=4, n_kv_heads=n_kv_heads,
                                  seq_len=48, residual=residual))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.3)
    return model.to(device).eval()


@torch.no_grad()
def reference_sample(model: DecoderLM, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                     temperature: float, eos: int = EOS) -> list[list[int]]:
    """The sampler before the static decode step: one forward a token through the cache's
    host-counted columns, ``torch.multinomial`` at a temperature."""
    width, B, device = max(len(p) for p in prompts), len(prompts), model.tok_emb.weight.device
    ids = torch.full((B, width), PAD, dtype=torch.long)
    valid = torch.zeros(B, width, dtype=torch.bool)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):], valid[i, width - len(p):] = torch.tensor(p), True
    ids, valid = ids.to(device), valid.to(device)
    cache = KVCache(model, B, width + max_new_tokens, valid)
    logits, _ = model(ids, cache=cache)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    out = torch.full((B, max_new_tokens), PAD, dtype=torch.long, device=device)
    for t in range(max_new_tokens):
        last = logits[:, -1].float()
        token = last.argmax(-1) if temperature <= 0 else \
            torch.multinomial(torch.softmax(last / temperature, dim=-1), 1).squeeze(-1)
        token = torch.where(done, torch.full_like(token, PAD), token)
        out[:, t] = token
        done |= token == eos
        if t % 8 == 7 and bool(done.all()):
            break
        cache.extend(torch.ones(B, 1, dtype=torch.bool, device=device))
        logits, _ = model(token[:, None], cache=cache)
    return [_until_eos(row, eos, PAD) for row in out.tolist()]


def _recomputed_greedy(model: DecoderLM, prompt: list[int], completion: list[int]) -> list[int]:
    """Greedy tokens for one unpadded row, the whole sequence recomputed each token (no cache)."""
    ids, out = list(prompt), []
    for _ in completion:
        ids.append(int(model(torch.tensor([ids]))[0][0, -1].argmax()))
        out.append(ids[-1])
    return out


@pytest.mark.parametrize("n_kv_heads,residual", [(None, "standard"), (2, "standard"), (1, "standard"), (2, "mhc")])
def test_greedy_decoding_equals_the_per_token_loop_and_full_recomputation(n_kv_heads, residual):
    model = _model(n_kv_heads, residual)
    first = reference_sample(model, PROMPTS, 16, 0.0)
    # an EOS the first row reaches early (its first token not seen before in the row)
    at = next(i for i in range(2, 16) if first[0][i] not in first[0][:i])
    eos = first[0][at]
    new = Policy(model, PAD, eos).sample(PROMPTS, 16, temperature=0.0)
    assert new == reference_sample(model, PROMPTS, 16, 0.0, eos)
    assert len(new[0]) == at + 1 and new[0][-1] == eos
    assert any(len(c) == 16 for c in new)  # another row runs to the limit past the first's end
    for prompt, completion in zip(PROMPTS, new):
        assert completion == _recomputed_greedy(model, prompt, completion)


def test_sampling_draws_what_the_loop_drew_from_the_same_seed_and_differs_across_tokens_and_rows():
    model, policy = _model(2), Policy(_model(2), PAD, EOS)
    torch.manual_seed(7)
    a = policy.sample(PROMPTS * 2, 20, temperature=1.0)
    torch.manual_seed(7)
    assert policy.sample(PROMPTS * 2, 20, temperature=1.0) == a
    torch.manual_seed(7)
    assert reference_sample(model, PROMPTS * 2, 20, 1.0) == a  # multinomial's draws, without its host sync
    assert all(0 <= t < 260 for c in a for t in c)
    assert len({tuple(c) for c in a}) == len(a)  # rows with the same prompt differ
    assert all(len(set(c)) > len(c) // 2 for c in a)  # tokens within a row differ
    torch.manual_seed(8)
    assert policy.sample(PROMPTS * 2, 20, temperature=1.0) != a


class _Recorded(TorchDispatchMode):
    """Every op a block of code runs: its name, its tensors' shapes and its other arguments."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[tuple[str, tuple[Any, ...]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        leaves = tree_leaves((args, kwargs or {}))
        self.ops.append((str(func), tuple(tuple(x.shape) if isinstance(x, torch.Tensor) else x for x in leaves)))
        return func(*args, **(kwargs or {}))


def _steps_stay_put(rollout: Any, state: list[torch.Tensor], steps: int = 5) -> None:
    """What a CUDA graph needs of ``rollout.step()``: the same ops on the same shapes and scalar arguments
    every token (so the position is no host scalar), none that reads a value back to the host, and every
    tensor it keeps (``state``) where it was."""
    before = [(t.data_ptr(), t.shape) for t in state]
    ops = []
    for _ in range(steps):
        with _Recorded() as recorded:
            rollout.step()
        ops.append(recorded.ops)
    assert all(step == ops[0] for step in ops)
    assert not any("_local_scalar_dense" in name or "item" in name or "nonzero" in name for name, _ in ops[0])
    assert [(t.data_ptr(), t.shape) for t in state] == before


def test_every_decode_step_runs_the_same_ops_on_the_same_memory_without_a_host_sync():
    model = _model(2)
    ids = torch.tensor([[PAD, PAD, 256, 1], [256, 5, 6, 7]])
    cache = KVCache(model, 2, 4 + 6, ids != PAD)
    with torch.no_grad():
        logits, _ = model(ids, cache=cache)
        cache.decode_on_device()
        rollout = Rollout(model, cache, 6, 1.0, PAD, EOS)
        rollout.take(logits)
        _steps_stay_put(rollout, [rollout.token, rollout.done, rollout.out, rollout.column, cache.position,
                                  cache.valid, *(t for layer in cache.layers for t in (layer.k, layer.v))])
    assert int(cache.position) == 4 + 5 and int(rollout.column) == 6 and cache.pos == 4
    assert bool(cache.valid[:, 4:9].all()) and not bool(cache.valid[:, 9:].any())


def _decode(model: DecoderLM, cache: KVCache, rollout: Rollout, ids: torch.Tensor, steps: int) -> list[list[int]]:
    """The prefill and ``steps`` decode steps, as ``Policy._sample_decoder`` runs them over a cache."""
    with torch.no_grad():
        logits, _ = model(ids, cache=cache)
        cache.decode_on_device()
        rollout.take(logits)
        for _ in range(1, steps):
            rollout.step()
    return rollout.out.tolist()


def test_a_cache_and_rollout_emptied_in_place_decode_the_next_batch_as_new_ones_would():
    """A kept decode step (on CUDA, its captured graph) replays over the next batch of the same shape: the
    cache and the rollout are emptied in the same tensors, and the old batch's keys, still there, change
    nothing."""
    model = _model(2)
    first = torch.tensor([[PAD, PAD, 256, 1], [256, 5, 6, 7]])
    second = torch.tensor([[256, 40, 41, 42], [PAD, PAD, PAD, 256]])
    cache = KVCache(model, 2, 4 + 8, first != PAD)
    rollout = Rollout(model, cache, 8, 0.0, PAD, EOS)
    _decode(model, cache, rollout, first, 8)
    tensors = [t.data_ptr() for t in (rollout.token, rollout.done, rollout.out, rollout.column, cache.position,
                                      cache.valid, *(t for layer in cache.layers for t in (layer.k, layer.v)))]
    cache.reset(second != PAD)
    rollout.reset()
    again = _decode(model, cache, rollout, second, 8)
    fresh = KVCache(model, 2, 4 + 8, second != PAD)
    assert again == _decode(model, fresh, Rollout(model, fresh, 8, 0.0, PAD, EOS), second, 8)
    assert [t.data_ptr() for t in (rollout.token, rollout.done, rollout.out, rollout.column, cache.position,
                                   cache.valid, *(t for layer in cache.layers for t in (layer.k, layer.v)))] == tensors


@pytest.mark.parametrize("decode,graphs,compiled", [("graphs", True, False), ("eager", False, False),
                                                    ("compiled", True, True)])
def test_the_decode_setting_picks_how_decode_steps_run(decode, graphs, compiled):
    policy = Policy(_model(), PAD, EOS, decode=decode)
    assert (policy.graphs, policy.compile) == (graphs, compiled)
    assert policy.sample(PROMPTS, 8, 0.0) == reference_sample(policy.model, PROMPTS, 8, 0.0)  # on CPU: eager
    assert policy.sample([[256] * 48], 8, 0.0) == [[]]  # a prompt that fills the context: nothing to sample
    with pytest.raises(ValueError, match="decode 'fast': one of eager, graphs, compiled"):
        Policy(_model(), PAD, EOS, decode="fast")


def test_training_compile_decides_how_a_sampling_stage_decodes():
    from muse_plan.executor.settings import decoding

    assert [decoding(c, "reasoning_rl", cuda=True) for c in ("auto", "on", "off")] == ["compiled", "compiled", "eager"]
    assert decoding("on", "reasoning_rl", cuda=False) == "eager"  # graphs need CUDA
    assert decoding("on", "pretrain", cuda=True) == "eager"  # no sampling there
    # a Hugging Face policy's step is replayed over its static cache, never compiled (Policy._sample_hf_static)
    assert [decoding(c, "reasoning_rl", cuda=True, hf=True) for c in ("auto", "on", "off")] == \
        ["graphs", "graphs", "eager"]


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@cuda
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_on_cuda_the_graph_replays_what_the_eager_step_computes(monkeypatch, temperature):
    model = _model(2, device="cuda")
    captured = []
    monkeypatch.setattr(Graphed, "_capture", lambda self, capture=Graphed._capture: (capture(self),
                                                                                       captured.append(self.graph)))
    outs = {}
    for graphs in (True, False):
        policy = Policy(model, PAD, EOS)
        policy.graphs = graphs
        torch.manual_seed(3)
        outs[graphs] = policy.sample(PROMPTS * 4, 24, temperature)
        assert policy.take_notes() == []
    assert len(captured) == 1 and captured[0] is not None
    assert outs[True] == outs[False]
    with torch.autocast("cuda", dtype=torch.bfloat16):
        assert len(Policy(model, PAD, EOS).sample(PROMPTS, 24, temperature)) == len(PROMPTS)


@cuda
def test_on_cuda_a_captured_decode_step_is_kept_for_the_next_batch_of_its_shape(monkeypatch):
    """The next rollout of the same rows, width bucket and length replays the decode step captured before
    (no new capture), its prefill too once captured (at its third call), and samples what eager decoding
    samples; another shape captures its own, at most KEPT_DECODES are kept, and none whose caches and graphs
    exceed KEPT_DECODE_BYTES."""
    import functools

    import engines.grpo.policy as policy_module

    model = _model(2, device="cuda").requires_grad_(False)  # as the copy full fine-tuning samples from
    captures = []

    def capture(self: Graphed, capture=Graphed._capture) -> None:
        capture(self)
        prefill = isinstance(self.step, functools.partial) and self.step.func is policy_module._prefill
        captures.append("prefill" if prefill else "step")

    monkeypatch.setattr(Graphed, "_capture", capture)
    eager = Policy(model, PAD, EOS)
    eager.graphs = False
    policy = Policy(model, PAD, EOS)
    other = [[256, 9, 8], [256, 3, 3, 3, 3], [256, 2]]  # widths within the same bucket of 8
    for prompts in (PROMPTS * 4, other * 4, PROMPTS * 4, other * 4):
        assert policy.sample(prompts, 24, 0.0) == eager.sample(prompts, 24, 0.0)
    assert captures == ["step", "prefill"] and len(policy._decodes) == 1
    [kept] = policy._decodes.values()
    assert kept.nbytes() >= kept.cache.nbytes() > 0
    policy.sample(PROMPTS * 2, 24, 0.0)  # another number of rows: its own step, both kept
    policy.sample(PROMPTS * 3, 24, 0.0)  # a third: the oldest goes
    assert captures[2:] == ["step", "step"] and len(policy._decodes) == policy_module.KEPT_DECODES == 2
    monkeypatch.setattr(policy_module, "KEPT_DECODE_BYTES", 0)  # nothing small enough
    small = Policy(model, PAD, EOS)
    small.sample(PROMPTS * 4, 24, 0.0)
    small.sample(PROMPTS * 4, 24, 0.0)
    assert captures[4:] == ["step", "step"] and small._decodes == {}


@cuda
def test_on_cuda_the_compiled_reference_gives_the_eager_ones_log_probs_and_a_failed_compile_says_so(monkeypatch):
    """Under training.compile the KL reference's blocks are compiled, one graph for every batch width: it gives
    the eager reference's log-probs; a compile that fails runs the blocks eagerly, with a note."""
    model = _model(2, device="cuda")
    ids = torch.tensor([PROMPTS[0] + [5, 6, 7, 8, 9, 10, 11]] * 3, device="cuda")

    def logprobs(policy: Policy, width: int) -> torch.Tensor:
        with torch.no_grad(), policy.as_reference() as reference:
            return policy.token_logprobs(ids[:, :width], 4, reference)

    eager, compiled = Policy(model, PAD, EOS, decode="graphs"), Policy(model, PAD, EOS, decode="compiled")
    for policy in (eager, compiled):
        policy.snapshot_reference()
    for width in (9, 12):  # another width: no recompile (dynamic), the same log-probs
        assert torch.allclose(logprobs(compiled, width), logprobs(eager, width), atol=1e-4)
    assert compiled.take_notes() == []
    assert all(block._compiled_call_impl is not None for block in compiled.reference.blocks)
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **options: setattr(
        self, "_compiled_call_impl", lambda *args, **kwargs: 1 / 0))
    broken = Policy(model, PAD, EOS, decode="compiled")
    broken.snapshot_reference()
    assert torch.allclose(logprobs(broken, 12), logprobs(eager, 12), atol=1e-4)
    assert broken.take_notes() == ["the compiled reference forward failed (ZeroDivisionError: division by zero); "
                                   "the reference runs eagerly for the rest of the stage"]
    assert all(block._compiled_call_impl is None for block in broken.reference.blocks)


@cuda
def test_on_cuda_a_capture_that_fails_goes_on_eagerly_and_says_so(monkeypatch):
    model = _model(2, device="cuda")
    eager = Policy(model, PAD, EOS)
    eager.graphs = False
    expected = eager.sample(PROMPTS, 24, 0.0)
    step = Rollout.step

    def syncing(self: Rollout) -> None:  # a host sync: what a graph can't capture
        step(self)
        bool(self.done.any())

    monkeypatch.setattr(Rollout, "step", syncing)
    policy = Policy(model, PAD, EOS)
    assert policy.sample(PROMPTS, 24, 0.0) == expected
    [note] = policy.take_notes()
    assert not policy.graphs and note.startswith("capturing the decode step in a CUDA graph failed (")
    assert note.endswith("); decoding runs eagerly for the rest of the stage")
    assert policy.sample(PROMPTS, 24, 0.0) == expected


@cuda
def test_on_cuda_the_compiled_step_decodes_greedy_as_the_eager_one_and_a_failed_compile_keeps_the_graph(monkeypatch):
    model = _model(2, device="cuda")
    eager = Policy(model, PAD, EOS)
    eager.graphs = False
    expected = eager.sample(PROMPTS * 4, 24, 0.0)
    assert Policy(model, PAD, EOS, decode="compiled").sample(PROMPTS * 4, 24, 0.0) == expected
    monkeypatch.setattr("engines.grpo.policy._compiled_step", lambda: lambda rollout: 1 / 0)
    policy = Policy(model, PAD, EOS, decode="compiled")
    assert policy.sample(PROMPTS, 24, 0.0) == expected[:len(PROMPTS)]
    assert (policy.graphs, policy.compile) == (True, False)
    assert policy.take_notes() == ["the compiled decode step failed (ZeroDivisionError: division by zero); decode "
                                   "steps are captured uncompiled for the rest of the stage"]


def test_groups_with_equally_long_prompts_share_a_forward_and_get_what_each_would_alone():
    from types import SimpleNamespace

    from engines.grpo.rl import Group, ReinforcementLearning

    model = _model()
    policy = Policy(model, PAD, EOS, decode="eager")
    make = lambda prompt, completions: Group(prompt, completions, torch.zeros(len(completions)), 0.0)  # noqa: E731
    groups = [make([256, 5, 6], [[7, 8, EOS], [9]]), make([256, 1, 2, 3, 4], [[5, 6]]),
              make([256, 9, 9], [[1, 2, 3, 4, 5, EOS], [6, EOS]])]  # the first and the last share a length
    rl = SimpleNamespace(t=SimpleNamespace(policy=policy, pad_id=PAD, device=torch.device("cpu"), model=model))
    ReinforcementLearning.logprobs(rl, groups[:1])  # the once-a-model check of the head (two one-row forwards)
    calls = []
    forward = model.forward
    model.forward = lambda *a, **k: calls.append(a[0].shape) or forward(*a, **k)
    together = ReinforcementLearning.logprobs(rl, groups)
    some = ReinforcementLearning.logprobs(rl, groups, rows=[[1], None, [0]])
    model.forward = forward
    assert calls[:2] == [torch.Size([4, 8]), torch.Size([1, 6])]  # 2 + 2 rows, padded to the longest
    for g, logp, rows, part in zip(groups, together, ([1], None, [0]), some):
        alone = policy.token_logprobs(g.ids(PAD, torch.device("cpu")), len(g.prompt))
        assert logp.shape == alone.shape and torch.allclose(logp, alone, atol=1e-5)
        expected = alone[rows] if rows else alone
        assert torch.allclose(part, expected[:, : part.size(1)], atol=1e-5)  # as wide as the rows asked for


@pytest.mark.parametrize("family", ["decoder", "hf"])
def test_sampling_never_draws_an_id_past_the_tokenizers_vocabulary(family):
    """A model's rows past its tokenizer's (a padded vocabulary) are never sampled, even
    when they would win: the tokenizer could not decode them."""
    torch.manual_seed(0)
    if family == "decoder":
        model = DecoderLM(ModelConfig(vocab_size=320, n_layers=1, d_model=32, n_heads=2, seq_len=48)).eval()
    else:
        transformers = pytest.importorskip("transformers")
        config = transformers.LlamaConfig(vocab_size=320, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                          num_attention_heads=2, max_position_embeddings=64, tie_word_embeddings=True)
        model = transformers.LlamaForCausalLM(config).eval()
    head = model.lm_head if family == "decoder" else model.get_output_embeddings()
    with torch.no_grad():
        head.weight[260:] *= 40  # the padded rows dominate the logits
    unlimited = Policy(model, PAD, EOS, decode="eager").sample(PROMPTS, 6, 1.0)
    assert any(t >= 260 for row in unlimited for t in row)  # they would be drawn
    for temperature in (0.0, 1.0):
        limited = Policy(model, PAD, EOS, decode="eager", vocab=260).sample(PROMPTS, 6, temperature)
        assert all(row and max(row) < 260 for row in limited)


def test_a_static_cache_sees_few_shapes_and_its_padding_changes_no_completion():
    """transformers compiles a static cache's decode step per shape: prompt widths are bucketed and rows
    padded to a power of two, so rollouts and evaluation chunks share a few compiled steps. A Hugging Face
    model generating through the bucketed static cache (forced here on CPU) completes every prompt greedily
    as the dynamic cache does."""
    transformers = pytest.importorskip("transformers")
    shapes = set()
    for rows, width in [(3, 5), (3, 7), (1, 9), (8, 30), (5, 12)]:
        ids = torch.arange(rows * width).reshape(rows, width) + 1
        valid = torch.ones(rows, width, dtype=torch.bool)
        padded, mask = static_shape(ids, valid, PAD)
        shapes.add(tuple(padded.shape))
        assert torch.equal(padded[:rows, -width:], ids) and bool(mask[:rows, -width:].all())
        assert not mask[:, : padded.size(1) - width].any() and bool((padded[rows:, -width:] == ids[0]).all())
    assert shapes == {(8, STATIC_WIDTH)}
    assert static_shape(torch.ones(130, 40, dtype=torch.long), torch.ones(130, 40, dtype=torch.bool), PAD)[0].shape \
        == (256, 2 * STATIC_WIDTH)
    assert static_shape(torch.ones(8, 40, dtype=torch.long), torch.ones(8, 40, dtype=torch.bool), PAD, 50)[0].shape \
        == (8, 40)  # no room for the bucket's width: the prompts' own

    class StaticOnCpu(Policy):
        def _static_cache(self, ids: torch.Tensor) -> bool:
            return True

    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=320, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=2, max_position_embeddings=96)
    model = transformers.LlamaForCausalLM(config).eval()
    static = StaticOnCpu(model, PAD, EOS)
    static.own_static = False  # generate's static cache (a sliding-window model's, or after muse's loop failed)
    assert static.sample(PROMPTS, 12, 0.0) == Policy(model, PAD, EOS, decode="eager").sample(PROMPTS, 12, 0.0)
    assert static.take_notes() == []  # the static cache was used, not a fallback


def _hf(family: str, vocab: int = 320):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    shape = dict(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                 max_position_embeddings=96)
    if family == "llama":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(num_attention_heads=2, **shape))
    else:  # grouped-query attention, biased projections
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(num_attention_heads=4, num_key_value_heads=2,
                                                                       **shape))
    with torch.no_grad():  # wide enough weights that greedy decoding doesn't repeat one token
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.3)
    return model.eval()


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_muse_decodes_a_hugging_face_model_over_a_static_cache_as_generate_does(family, monkeypatch):
    """On CUDA a Hugging Face policy decodes in muse's own loop over transformers' static cache (each step the
    same tensors, replayed from a CUDA graph, nothing compiled): forced on CPU, it completes left-padded prompts
    greedily exactly as ``generate`` with the dynamic cache, stops rows at EOS, never draws past the
    tokenizer's vocabulary, and never calls ``generate``; at a temperature it draws valid, varied tokens."""
    model = _hf(family)

    class StaticOnCpu(Policy):
        def _static_cache(self, ids: torch.Tensor) -> bool:
            return True

    prompts = PROMPTS * 3
    expected = Policy(model, PAD, EOS, decode="eager").sample(prompts, 12, 0.0)
    eos = expected[1][4]  # a token greedy decoding draws mid-row: with it as EOS that row stops there
    ended = Policy(model, PAD, eos, decode="eager").sample(prompts, 12, 0.0)
    monkeypatch.setattr(type(model), "generate", lambda *a, **k: pytest.fail("generate was called"))
    from engines.grpo import policy as module

    queries: list[tuple[int, int]] = []  # each decode step's attention: (query length, query heads)
    attend = module._decode_attention
    monkeypatch.setattr(module, "_decode_attention",
                        lambda m, q, *a, **k: queries.append(tuple(q.shape[1:3])) or attend(m, q, *a, **k))
    policy = StaticOnCpu(model, PAD, EOS)
    assert policy.sample(prompts, 12, 0.0) == expected
    # the decode steps attended in muse's grouped one-query product (no key copied per query head), every layer
    # of every step after the prefill; the model attends with SDPA again after
    heads = model.config.num_attention_heads
    assert queries and set(queries) == {(heads, 1)} and len(queries) % model.config.num_hidden_layers == 0
    assert model.config._attn_implementation == "sdpa"
    assert StaticOnCpu(model, PAD, eos).sample(prompts, 12, 0.0) == ended
    assert len(ended[1]) == expected[1].index(eos) + 1 < 12  # the row stopped at EOS
    assert policy.take_notes() == []
    limited = StaticOnCpu(model, PAD, EOS, vocab=100).sample(prompts, 12, 1.0)
    assert all(0 <= t < 100 for row in limited for t in row) and len({t for row in limited for t in row}) > 10


def test_when_the_static_cache_fails_generate_decodes_and_a_note_says_why(monkeypatch):
    transformers = pytest.importorskip("transformers")
    model = _hf("llama")

    class StaticOnCpu(Policy):
        def _static_cache(self, ids: torch.Tensor) -> bool:
            return True

    def refuse(*args, **kwargs):
        raise RuntimeError("no static cache here")

    expected = Policy(model, PAD, EOS, decode="eager").sample(PROMPTS, 8, 0.0)
    monkeypatch.setattr(transformers, "StaticCache", refuse)
    policy = StaticOnCpu(model, PAD, EOS)
    policy.graphs = True
    out = policy.sample(PROMPTS, 8, 0.0)
    notes = policy.take_notes()
    assert notes[0] == ("decoding with a static cache failed (RuntimeError: no static cache here); generation runs "
                        "transformers' generate for the rest of the stage")
    assert out == expected  # from generate
    assert not policy.own_static


@cuda
def test_on_cuda_every_decode_reads_the_adapters_as_they_are_now():
    """RL updates LoRA weights in place between rollouts: a captured or compiled decode step must
    sample from the weights of this rollout, not of the first one it saw (greedy, bf16 autocast as a
    run's rollouts)."""
    from engines.grpo.policy import LoraSettings, add_lora

    model = _model(2, device="cuda")
    peft = add_lora(model, LoraSettings(rank=4, alpha=8, target_modules=("q_proj", "v_proj"), layers_fraction=1.0))
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert lora_b and all(float(p.abs().max()) == 0.0 for p in lora_b)  # peft starts B at zero
    policies = {mode: Policy(model, PAD, EOS, peft, decode=mode) for mode in ("eager", "graphs", "compiled")}
    outs: dict[str, list] = {}
    before: dict[str, list] = {}
    for round_ in range(3):
        for mode, policy in policies.items():
            with torch.autocast("cuda", dtype=torch.bfloat16):
                outs[mode] = policy.sample(PROMPTS * 4, 24, 0.0)
            assert policy.take_notes() == [], mode
            if round_:  # the perturbed adapters change what greedy picks, in every mode
                assert outs[mode] != before[mode], (mode, round_)
        assert outs["graphs"] == outs["eager"], round_  # the same kernels (Inductor's may round otherwise)
        before = dict(outs)
        torch.manual_seed(round_)
        with torch.no_grad():
            for p in lora_b:
                p.add_(torch.randn_like(p), alpha=0.5)
    # adapters that train: no decode kept past its rollout (autocast's casts of them last one rollout)
    assert all(policy._decodes == {} for policy in policies.values())


@pytest.mark.parametrize("family", ["decoder", "hf"])
def test_full_fine_tuning_samples_from_a_narrow_copy_with_the_weights_as_they_are_now(family):
    """fp32 weights under autocast decode from a copy in the compute dtype: it samples what a model cast to that
    dtype samples, follows the trained weights after an update (copied in place: the same tensors, so captured
    and compiled steps stay valid), shares a tied weight, and leaves the fp32 weights and the model's mode alone.
    LoRA, and a model already in the dtype, decode from the model itself."""
    import copy

    if family == "decoder":
        model = _model(2).train()
    else:
        transformers = pytest.importorskip("transformers")
        torch.manual_seed(0)
        config = transformers.LlamaConfig(vocab_size=320, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                          num_attention_heads=2, max_position_embeddings=96, tie_word_embeddings=True)
        model = transformers.LlamaForCausalLM(config).train()
    policy = Policy(model, PAD, EOS, decode="graphs", sample_dtype=torch.bfloat16)
    fp32 = [p.detach().clone() for p in model.parameters()]
    narrow_out = {}
    for round_ in range(2):
        out = policy.sample(PROMPTS, 10, 0.0)
        cast = copy.deepcopy(model)
        for p in cast.parameters():  # the weights cast; buffers (rotary tables) stay fp32 as in training
            p.data = p.data.to(torch.bfloat16)
        assert out == Policy(cast, PAD, EOS, decode="eager").sample(PROMPTS, 10, 0.0), round_
        sampler = policy.sampler()
        assert sampler is not model and all(p.dtype == torch.bfloat16 for p in sampler.parameters())
        for kept, now in zip(fp32, model.parameters()):
            assert now.dtype == torch.float32 and torch.equal(kept, now)  # the fp32 weights are untouched
        assert model.training  # sample() gives the model its mode back
        narrow_out[round_] = out
        if round_ == 0:
            tensors = [p.data_ptr() for p in sampler.parameters()]
            with torch.no_grad():  # an update
                for p in model.parameters():
                    p.add_(torch.randn_like(p), alpha=0.3)
            fp32 = [p.detach().clone() for p in model.parameters()]
    assert narrow_out[0] != narrow_out[1]  # the second rollout saw the updated weights
    assert [p.data_ptr() for p in policy.sampler().parameters()] == tensors  # copied into, not remade
    params = dict(policy.sampler().named_parameters(remove_duplicate=False))
    head, emb = ("lm_head.weight", "tok_emb.weight") if family == "decoder" else \
        ("lm_head.weight", "model.embed_tokens.weight")
    if head in params and emb in params:
        assert params[head] is params[emb]  # a tied weight stays one tensor
    assert Policy(cast, PAD, EOS, sample_dtype=torch.bfloat16).sampler() is cast  # already bf16: no copy
    assert Policy(model, PAD, EOS, peft=object(), sample_dtype=torch.bfloat16).sampler() is model  # LoRA


@cuda
@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_on_cuda_a_hugging_face_model_decodes_from_a_graph_as_generate_does(family):
    """The captured static-cache step replays what ``generate`` computes (fp32, greedy), and a full fine-tuning
    stage's fp32 weights under bf16 autocast decode from the bf16 copy with no fallback (the static cache took
    its keys and values)."""
    model = _hf(family).cuda()
    graphed = Policy(model, PAD, EOS, decode="graphs")
    prompts = PROMPTS * 4
    assert graphed.sample(prompts, 16, 0.0) == Policy(model, PAD, EOS, decode="eager").sample(prompts, 16, 0.0)
    assert graphed.take_notes() == [] and graphed.hf_graphs
    mixed = Policy(model, PAD, EOS, decode="graphs", sample_dtype=torch.bfloat16)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = mixed.sample(prompts, 16, 1.0)
    assert mixed.take_notes() == [] and all(len(row) > 0 for row in out)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_every_hugging_face_decode_step_runs_the_same_ops_on_the_same_memory_without_a_host_sync(family):
    """What a CUDA graph needs of ``HfRollout.step``: the same ops on the same shapes every token, no
    scalar read back to the host, every tensor it keeps where it was (transformers' own code included)."""
    from engines.grpo.policy import HfRollout

    model = _hf(family)
    ids = torch.tensor([[PAD, PAD, 256, 1], [256, 5, 6, 7]])
    with torch.no_grad():
        rollout = HfRollout(model, ids, ids != PAD, 6, 1.0, PAD, EOS)
        layers = [t for t in vars(rollout.cache).get("layers", []) for t in (t.keys, t.values)]
        assert layers  # transformers' cache tensors are among what must stay put
        _steps_stay_put(rollout, [rollout.token, rollout.done, rollout.out, rollout.column, rollout.mask,
                                  rollout.position, rollout.cache_position, *layers])
    # five steps fed the columns 4..8 at each row's own positions (its real tokens counted): 2.., 4..
    assert int(rollout.cache_position) == 4 + 5 and rollout.position.tolist() == [[2 + 5], [4 + 5]]
    shut = torch.finfo(torch.float32).min
    assert rollout.mask[0, 0, 0].tolist() == [shut, shut] + [0.0] * 7 + [shut]  # left padding stays shut
    assert rollout.mask[1, 0, 0].tolist() == [0.0] * 9 + [shut]  # the last column: the next step's


def test_the_trl_benchmark_profiles_muses_sampling_alone(tmp_path):
    """scripts/bench_grpo_trl.py --profile-only (here --tiny, on CPU, no TRL needed): muse's sampling of the
    benchmark's model alone, timed, with its rows (prompts × group), tokens and profile in the JSON."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    pytest.importorskip("transformers")
    root = Path(__file__).resolve().parent.parent
    done = subprocess.run([sys.executable, str(root / "scripts" / "bench_grpo_trl.py"), "--tiny", "--profile-only",
                           "--out", str(tmp_path)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(root)})
    assert done.returncode == 0, done.stderr[-2000:]
    sampled = json.loads((tmp_path / "bench_grpo_trl_profile.json").read_text())["muse_sampling"]
    assert sampled["rows"] == 2 * 4 and sampled["tokens_per_s"] > 0 and sampled["notes"] == []
    assert sampled["profile"]["wall_s"] > 0 and 0 < sampled["ms_a_decode_step"] < sampled["wall_s"] * 1e3


def test_profile_plan_run_profiles_the_grpo_benchmarks_plan(tmp_path) -> None:
    """scripts/bench_grpo_trl.py --write-plan writes the benchmark's model and muse's plan;
    scripts/profile_plan_run.py --plan profiles that plan's steps as ``muse plan run`` runs them (here tiny,
    on CPU): the step's wall time, and the ops of the rollout and the update among the costliest."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    pytest.importorskip("transformers")
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": str(root)}
    script = lambda name, *args: subprocess.run([sys.executable, str(root / "scripts" / name), *args],  # noqa: E731
                                                 capture_output=True, text=True, timeout=300, env=env)
    done = script("bench_grpo_trl.py", "--tiny", "--write-plan", str(tmp_path / "bench"))
    assert done.returncode == 0, done.stderr[-2000:]
    assert (tmp_path / "bench" / "model" / "config.json").is_file()
    done = script("profile_plan_run.py", "--plan", str(tmp_path / "bench" / "plan.yaml"), "--tiny", "--wait", "1",
                  "--active", "2", "--no-trace", "--out", str(tmp_path / "profile"))
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads((tmp_path / "profile" / "profile_plan_on.json").read_text())
    assert report["step_wall_ms"] > 0 and report["device"] == "cpu"
    ops = {row["name"] for row in report["top"]}
    # the rollout's draws (temperature 1), the update's products and its optimizer step
    assert {"aten::exponential_", "aten::mm", "Optimizer.step#AdamW.step"} <= ops, ops


@pytest.mark.parametrize("n_kv_heads", [None, 2])
def test_the_decode_steps_own_attention_product_gives_what_sdpa_gives(monkeypatch, n_kv_heads):
    """A decode step of muse's decoder can attend with muse's product (``model.one_query_attention``, the HF
    decode's) in place of SDPA's kernel: the same next-token logits (fp32) and the same greedy rows."""
    from engines.architecture import model as model_module

    model = _model(n_kv_heads)
    monkeypatch.setattr(model_module, "ONE_QUERY_PRODUCT", False)
    sdpa_rows = reference_sample(model, PROMPTS, 12, 0.0)
    calls = []
    product = model_module.one_query_attention
    monkeypatch.setattr(model_module, "one_query_attention", lambda *a: calls.append(1) or product(*a))
    monkeypatch.setattr(model_module, "ONE_QUERY_PRODUCT", True)
    assert reference_sample(model, PROMPTS, 12, 0.0) == sdpa_rows and len(calls) >= 2 * 11  # every layer, step
    monkeypatch.setattr(model_module, "ONE_QUERY_PRODUCT", False)
    ids = torch.randint(0, 256, (3, 9))

    @torch.no_grad()
    def step() -> torch.Tensor:  # one decode step's logits after an 8-token prefill
        cache = KVCache(model, 3, 20, torch.ones(3, 8, dtype=torch.bool))
        model(ids[:, :8], cache=cache)
        cache.extend(torch.ones(3, 1, dtype=torch.bool))
        return model(ids[:, 8:], cache=cache)[0]

    sdpa = step()
    monkeypatch.setattr(model_module, "ONE_QUERY_PRODUCT", True)
    assert torch.allclose(step(), sdpa, atol=1e-5)


@pytest.mark.parametrize("n_kv_heads,residual", [(None, "standard"), (2, "mhc")])
def test_fused_projections_compute_what_the_separate_ones_did_and_follow_writes_to_the_weights(n_kv_heads, residual):
    """A forward-only copy's q/k/v and gate/up weights as rows of one matrix each: the same logits and the same
    greedy completions, the same state dict; a write into a weight (a new update copied in, a loaded state dict)
    reaches the fused matrix; weights that train are left apart."""
    from engines.architecture.model import fuse_projections

    model = _model(n_kv_heads, residual)
    ids = torch.tensor([[256, 5, 6, 7, 8, 9, 10]])
    before, greedy = model(ids)[0], Policy(model, PAD, EOS, decode="eager").sample(PROMPTS, 12, 0.0)
    assert not fuse_projections(model)  # its weights train: nothing fused
    frozen = model.requires_grad_(False)
    keys = list(frozen.state_dict())
    assert fuse_projections(frozen)
    attn, mlp = frozen.blocks[0].attn, frozen.blocks[0].mlp
    assert attn.qkv is not None and mlp.gate_up is not None and list(frozen.state_dict()) == keys
    assert attn.wk.weight.data_ptr() == attn.qkv[attn.wq.weight.size(0):].data_ptr()  # a view of the rows
    assert torch.allclose(frozen(ids)[0], before, atol=1e-5)
    assert Policy(frozen, PAD, EOS, decode="eager").sample(PROMPTS, 12, 0.0) == greedy
    with torch.no_grad():
        attn.wv.weight.zero_()  # every value zero: attention adds nothing
        mlp.w_up.weight.mul_(2.0)
    assert not attn.qkv[-attn.wv.weight.size(0):].any() and torch.equal(mlp.gate_up[-mlp.w_up.weight.size(0):],
                                                                          mlp.w_up.weight)
    frozen.load_state_dict(_model(n_kv_heads, residual).state_dict())  # loading writes the fused matrices too
    assert torch.allclose(frozen(ids)[0], before, atol=1e-5)


def test_a_compiled_function_that_fails_runs_eagerly_from_then_on_and_says_so_once():
    from engines.grpo.policy import OrEager

    calls, told = [], []

    def broken(x: int) -> int:
        calls.append("compiled")
        raise RuntimeError("inductor could not lower this")

    def eager(x: int) -> int:
        calls.append("eager")
        return x + 1

    run = OrEager(broken, eager, told.append)
    assert [run(1), run(2)] == [2, 3]
    assert calls == ["compiled", "eager", "eager"] and [str(e) for e in told] == ["inductor could not lower this"]

    def short(x: int) -> int:
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    with pytest.raises(torch.cuda.OutOfMemoryError):  # a step too big for the device is no compiler's failure
        OrEager(short, eager, told.append)(1)
    assert len(told) == 1


def test_the_grpo_benchmark_times_a_rollout_phase_by_phase():
    """scripts/bench_grpo.py's rollout_phases: one rollout of the engine split into its phases, which add up
    to the rollout's time; on CPU nothing is captured, and sampling and the KL reference pass take time."""
    import sys as _sys
    from pathlib import Path

    from engines.contract import StageSetup
    from engines.grpo.options import parse
    from engines.grpo.trainer import GrpoTrainer

    _sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
    from bench_grpo import rollout_phases

    trainer = GrpoTrainer()
    trainer.setup(StageSetup(name="t", kind="reasoning_rl", model=_model(2).config, micro_batch=2, device="cpu",
                             decode="eager", options=parse("reasoning_rl", {}, {
                                 "tasks": ["multiplication:3x3"], "group_size": 4, "max_new_tokens": 16,
                                 "eval_problems": 1})))
    trainer.next_batch()
    phases = rollout_phases(trainer)
    parts = ("setup", "prefill", "capture", "decode", "rewards", "logprobs", "other")
    assert sum(phases[f"{k}_s"] for k in parts) == pytest.approx(phases["total_s"])
    assert phases["capture_s"] == phases["prefill_s"] == 0.0  # no graphs on CPU
    assert phases["decode_s"] > 0 and phases["logprobs_s"] > 0 and phases["rewards_s"] > 0
