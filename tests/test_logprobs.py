"""The RL step's per-token log-probabilities through the output head a chunk at a time
(engines/grpo/logprobs.py): the same values and gradients as the full logits' log-softmax,
nothing of vocabulary width kept for backward, and a head that does more than a linear
layer left on the full logits with a note."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from engines.architecture.config import ModelConfig
from engines.architecture.model import DecoderLM
from engines.grpo import logprobs
from engines.grpo.policy import Policy

transformers = pytest.importorskip("transformers")


def _full(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(logits, -1).gather(-1, targets[..., None]).squeeze(-1)


@pytest.mark.parametrize("bias", [False, True])
def test_chunked_logprobs_and_their_gradients_equal_the_log_softmax(monkeypatch, bias):
    monkeypatch.setattr(logprobs, "CHUNK_BYTES", 4 * 50 * 6)  # 6 rows a chunk: 37 rows in 7 chunks
    torch.manual_seed(0)
    hidden = torch.randn(37, 16, dtype=torch.float64, requires_grad=True)
    head = nn.Linear(16, 50, bias=bias).double()
    targets = torch.randint(0, 50, (37,))
    ours = logprobs.token_logprobs(hidden, head, targets)
    theirs = _full(head(hidden), targets)
    assert ours.dtype == torch.float32 and torch.allclose(ours.double(), theirs, atol=1e-6)
    weights = torch.randn(37, dtype=torch.float64)  # an advantage per token, signs mixed
    params = [hidden, *head.parameters()]
    for a, b in zip(torch.autograd.grad((ours * weights).sum(), params),
                    torch.autograd.grad((theirs * weights).sum(), params)):
        assert torch.allclose(a, b, atol=1e-6), float((a - b).abs().max())


def _hf(vocab: int = 640, capped: bool = False) -> nn.Module:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)

    class Capped(transformers.LlamaForCausalLM):  # soft-capped logits, as Gemma 2's (a cap that bites here)
        def forward(self, *args, **kwargs):
            out = super().forward(*args, **kwargs)
            out.logits = 0.02 * torch.tanh(out.logits / 0.02)
            return out

    return (Capped if capped else transformers.LlamaForCausalLM)(config)


def _decoder() -> DecoderLM:
    torch.manual_seed(0)
    return DecoderLM(ModelConfig(vocab_size=260, n_layers=2, d_model=32, n_heads=4, seq_len=48, residual="mhc"))


def _saved_widths(fn) -> tuple[torch.Tensor, list[int]]:
    """``fn()``'s output and the last dimension of every tensor autograd saved for its backward."""
    widths: list[int] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        widths.append(t.shape[-1] if t.dim() else 0)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, widths


@pytest.mark.parametrize("make", [_hf, _decoder], ids=["hugging-face", "decoder"])
def test_a_policy_takes_log_probs_through_the_head_in_chunks_with_the_full_logits_gradients(monkeypatch, make):
    monkeypatch.setattr(logprobs, "CHUNK_BYTES", 4 * 640 * 7)
    model = make()
    vocab = model.lm_head.weight.size(0)
    policy = Policy(model, 0, 1)
    ids = torch.randint(2, vocab, (5, 19))
    start = 6
    ours, widths = _saved_widths(lambda: policy.token_logprobs(ids, start))
    assert policy._heads.agrees == {id(model): True} and not policy.take_notes()
    assert vocab not in widths  # nothing of vocabulary width kept for backward
    theirs, full_widths = _saved_widths(lambda: policy._full_logprobs(ids, start, model))
    assert vocab in full_widths  # (what the full logits keep)
    assert ours.shape == theirs.shape == (5, 13) and torch.allclose(ours, theirs, atol=1e-5)
    advantage = torch.randn(5, 13)
    params = [p for p in model.parameters() if p.requires_grad]
    for a, b in zip(torch.autograd.grad((ours * advantage).sum(), params),
                    torch.autograd.grad((theirs * advantage).sum(), params)):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-4), float((a - b).abs().max())
    # the model is itself again: logits, not hidden states
    assert (model(ids)[0] if isinstance(model, DecoderLM) else model(ids).logits).shape[-1] == vocab


@pytest.mark.parametrize("make", [_hf, _decoder], ids=["hugging-face", "decoder"])
def test_a_supervised_loss_through_the_head_in_chunks_equals_the_full_cross_entropy(monkeypatch, make):
    """Policy.cross_entropy (the SFT stages' loss): the mean over the targets that are not -1, from the head's
    product at those positions alone, a chunk at a time: the full logits' cross-entropy and its gradients,
    with nothing of vocabulary width kept for backward; a soft-capped head keeps the full logits."""
    import torch.nn.functional as F

    monkeypatch.setattr(logprobs, "CHUNK_BYTES", 4 * 640 * 7)
    model = make()
    vocab = model.lm_head.weight.size(0)
    policy = Policy(model, 0, 1)
    x = torch.randint(2, vocab, (4, 15))
    y = torch.randint(2, vocab, (4, 15))
    y[:, :6] = -1  # the prompts
    y[1, 11:] = -1  # a shorter completion, padded
    ours, widths = _saved_widths(lambda: policy.cross_entropy(x, y))
    assert vocab not in widths
    logits = model(x)[0] if isinstance(model, DecoderLM) else model(x).logits
    theirs = F.cross_entropy(logits.float().reshape(-1, vocab), y.reshape(-1), ignore_index=-1)
    assert torch.allclose(ours, theirs, atol=1e-5)
    params = [p for p in model.parameters() if p.requires_grad]
    for a, b in zip(torch.autograd.grad(ours, params), torch.autograd.grad(theirs, params)):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-4), float((a - b).abs().max())
    capped = Policy(_hf(capped=True), 0, 1)
    out = capped.model(x.clamp(max=639)).logits.float()
    assert torch.allclose(capped.cross_entropy(x.clamp(max=639), y.clamp(max=639)),
                          F.cross_entropy(out.reshape(-1, 640), y.clamp(max=639).reshape(-1), ignore_index=-1))
    assert "not its output layer" in capped.take_notes()[0]


def test_the_architecture_engines_hugging_face_loss_goes_through_the_head_in_chunks(monkeypatch):
    """A finetune / continue stage of a Hugging Face model (``ArchitectureTrainer._loss``): the full logits'
    cross-entropy, with nothing of vocabulary width kept for backward; a soft cap's note reaches the stage."""
    import torch.nn.functional as F

    from engines.architecture.trainer import ArchitectureTrainer

    monkeypatch.setattr(logprobs, "CHUNK_BYTES", 4 * 640 * 7)
    trainer = ArchitectureTrainer.__new__(ArchitectureTrainer)  # its loss alone: no corpus to build
    trainer.hf, trainer.model, trainer.heads, trainer.notes = True, _hf(), logprobs.HeadCheck(), []
    x, y = torch.randint(2, 640, (3, 16)), torch.randint(2, 640, (3, 16))
    y[2, 10:] = -1
    ours, widths = _saved_widths(lambda: trainer._loss(x, y))
    assert 640 not in widths
    theirs = F.cross_entropy(trainer.model(x).logits.float().reshape(-1, 640), y.reshape(-1), ignore_index=-1)
    assert torch.allclose(ours, theirs, atol=1e-5) and not trainer.take_notes()
    trainer.model, trainer.heads = _hf(capped=True), logprobs.HeadCheck()
    trainer._loss(x, y)
    assert "not its output layer" in trainer.take_notes()[0]


def test_a_head_that_caps_its_logits_stays_on_the_full_logits_and_says_so():
    model = _hf(capped=True)
    policy = Policy(model, 0, 1)
    ids = torch.randint(2, 640, (3, 12))
    got = policy.token_logprobs(ids, 4)
    assert torch.allclose(got, _full(model(ids[:, :-1]).logits[:, 3:], ids[:, 4:]), atol=1e-6)
    notes = policy.take_notes()
    assert len(notes) == 1 and "not its output layer" in notes[0]
    policy.token_logprobs(ids, 4)  # checked once: no second note
    assert not policy.take_notes() and policy._heads.agrees == {id(model): False}


def test_the_head_is_found_under_peft_and_left_alone_where_lora_adapts_it():
    peft = pytest.importorskip("peft")
    model = _hf()
    head = model.lm_head
    wrapped = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["q_proj"]))
    assert logprobs.output_head(wrapped) is head
    adapted = peft.get_peft_model(_hf(), peft.LoraConfig(r=2, target_modules=["q_proj", "lm_head"]))
    assert logprobs.output_head(adapted) is None  # LoRA's wrapper is not a plain linear layer


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_cuda_under_bf16_autocast_the_chunks_give_the_full_logits_values_and_gradients(monkeypatch):
    monkeypatch.setattr(logprobs, "CHUNK_BYTES", 4 * 640 * 64)
    model = _hf().cuda()
    policy = Policy(model, 0, 1)
    ids = torch.randint(2, 640, (16, 80), device="cuda")
    advantage = torch.randn(16, 70, device="cuda")
    params = [p for p in model.parameters() if p.requires_grad]
    with torch.autocast("cuda", dtype=torch.bfloat16):
        ours = policy.token_logprobs(ids, 10)
        theirs = policy._full_logprobs(ids, 10, model)
    assert policy._heads.agrees == {id(model): True}
    assert (ours - theirs).abs().max() < 2e-2
    for a, b in zip(torch.autograd.grad((ours * advantage).sum(), params),
                    torch.autograd.grad((theirs * advantage).sum(), params)):
        assert (a - b).norm() <= 2e-2 * b.norm(), float((a - b).norm() / b.norm())
