"""Per-token log-probabilities through the output head, a chunk of tokens at a time.

An RL step needs log π(token) at each completion position: one number a token.
Taking it from the full logits keeps a (tokens × vocab) tensor for backward —
under autocast an fp32 copy for the log-softmax — and the backward builds more
of the same width. With Qwen2's 151,936-token vocabulary and 128 sequences of
~140 tokens that is ~10 GiB held, and several times that at the backward's
peak: the GRPO step peaked at 75.7 GiB on an H100 where TRL's, whose per-row
log-softmax avoids it, took 34.9 (docs/bench_grpo.md).

Here the model runs with its output head switched off, so it returns the final
hidden states; ``token_logprobs`` multiplies them by the head's weight a chunk
of tokens at a time (``CHUNK_BYTES`` of fp32 logits), keeping only each token's
picked logit and logsumexp. The backward recomputes each chunk's logits once
(one more head matmul) and writes d logp / d logits = onehot − softmax straight
into the hidden states' and the weight's gradients. Nothing of vocabulary width
outlives a chunk.

A model whose logits are more than its output layer's product (a soft-cap)
would give other numbers: on its first call for each model ``Policy`` checks
that the head applied to the hidden states gives the model's own logits, and
otherwise keeps the full logits, with a note.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

from engines.architecture.activation_terms import LOGPROB_CHUNK_BYTES
from engines.architecture.model import DecoderLM

CHUNK_BYTES = LOGPROB_CHUNK_BYTES  # fp32 logits a chunk; the backward holds ~1.5× that at once


def chunk_rows(vocab: int) -> int:
    return max(1, CHUNK_BYTES // (4 * vocab))


class _TokenLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                targets: torch.Tensor, rows: int) -> torch.Tensor:
        out = torch.empty(hidden.size(0), dtype=torch.float32, device=hidden.device)
        lse = torch.empty_like(out)
        for i in range(0, hidden.size(0), rows):
            logits = F.linear(hidden[i:i + rows], weight, bias).float()
            lse[i:i + rows] = torch.logsumexp(logits, dim=-1)
            out[i:i + rows] = logits.gather(-1, targets[i:i + rows, None]).squeeze(-1) - lse[i:i + rows]
        ctx.save_for_backward(hidden, weight, bias, targets, lse)
        ctx.rows = rows
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        hidden, weight, bias, targets, lse = ctx.saved_tensors
        want_h, want_w, want_b = ctx.needs_input_grad[:3]
        grad = grad.float()
        grad_h = torch.empty_like(hidden) if want_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_w else None
        grad_b = torch.zeros(weight.size(0), dtype=torch.float32, device=weight.device) \
            if want_b and bias is not None else None
        rows = ctx.rows
        for i in range(0, hidden.size(0), rows):
            h, g = hidden[i:i + rows], grad[i:i + rows, None]
            logits = F.linear(h, weight, bias).float()
            # d logp / d logits = onehot(target) − softmax; times the incoming gradient
            d = logits.sub_(lse[i:i + rows, None]).exp_().mul_(-g)
            d.scatter_add_(1, targets[i:i + rows, None], g)
            if grad_b is not None:
                grad_b += d.sum(0)
            d = d.to(hidden.dtype)
            if grad_h is not None:
                grad_h[i:i + rows] = d @ weight
            if grad_w is not None:
                grad_w += (d.t() @ h).float()
        return (grad_h, grad_w.to(weight.dtype) if grad_w is not None else None,
                grad_b.to(bias.dtype) if grad_b is not None else None, None, None)


def token_logprobs(hidden: torch.Tensor, head: nn.Linear, targets: torch.Tensor) -> torch.Tensor:
    """log softmax(head(hidden))[targets] for ``hidden`` (..., H) and ``targets`` (...), in fp32,
    as autocast would compute the logits (the head's product in its dtype)."""
    device = hidden.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else head.weight.dtype
    shape = targets.shape
    flat = hidden.reshape(-1, hidden.size(-1)).to(dtype)
    weight = head.weight.to(dtype)
    bias = head.bias.to(dtype) if head.bias is not None else None
    with torch.autocast(device, enabled=False):
        out = _TokenLogprobs.apply(flat, weight, bias, targets.reshape(-1), chunk_rows(weight.size(0)))
    return out.reshape(shape)


def bare(model: nn.Module) -> nn.Module:
    """The module under DDP, peft and torch.compile's wrappers."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel) or hasattr(model, "_orig_mod"):
            model = getattr(model, "module", None) or model._orig_mod
        elif hasattr(model, "get_base_model"):
            model = model.get_base_model()
        else:
            return model


def output_head(model: nn.Module) -> nn.Linear | None:
    """The model's output layer, where it is a plain linear layer whose weight is an ordinary
    tensor here (not sharded by FSDP, not quantised, not adapted by LoRA); else None."""
    if _fsdp_wrapped(model):  # its weight is FSDP's between forwards: the full logits
        return None
    m = bare(model)
    head = m.lm_head if isinstance(m, DecoderLM) else getattr(m, "get_output_embeddings", lambda: None)()
    if type(head) is not nn.Linear or head.weight.dim() != 2 or not head.weight.is_floating_point():
        return None
    if type(head.weight.data) is not torch.Tensor:  # a DTensor (FSDP2) or a quantised subclass
        return None
    return head


def _fsdp_wrapped(model: nn.Module) -> bool:
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel
    except ImportError:  # a torch without distributed
        return False
    return any(isinstance(m, FullyShardedDataParallel) for m in model.modules())


def model_logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """The logits (B, T, V) of muse's decoder or a Hugging Face causal LM (or, under
    ``hidden_out``, the final hidden states)."""
    out = model(ids)
    return out[0] if isinstance(out, tuple) else out.logits


class HeadCheck:
    """Per model, whether its log-probs may go through its output head a chunk at a time: checked once
    on one row, the head applied to the hidden states must give the model's own logits, so a model
    that soft-caps its logits after the head stays on the full logits (said once in ``notes``)."""

    def __init__(self) -> None:
        self.agrees: dict[int, bool] = {}
        self.notes: list[str] = []

    def __call__(self, model: nn.Module, inputs: torch.Tensor) -> nn.Linear | None:
        """The head to take log-probs through, or None; ``inputs``: token ids the model reads."""
        head = output_head(model)
        key = id(bare(model))
        if head is None or self.agrees.get(key) is False:
            return None
        if key not in self.agrees:
            m = bare(model)  # in eval mode: no dropout between the two, no random numbers drawn
            training = m.training
            m.eval()
            try:
                with torch.no_grad():
                    logits = model_logits(m, inputs[:1]).float()
                    with hidden_out(m):
                        hidden = model_logits(m, inputs[:1])
                    ours = head(hidden).float()
            finally:
                m.train(training)
            agrees = ours.shape == logits.shape and torch.allclose(ours, logits, rtol=1e-2, atol=1e-4)
            self.agrees[key] = agrees
            if not agrees:
                gap = float((ours - logits).abs().max()) if ours.shape == logits.shape else float("nan")
                self.notes.append(f"the model's logits are not its output layer's product (they differ by up to "
                                  f"{gap:.3g}); log-probs come from the full logits for the rest of the stage")
                return None
        return head


def cross_entropy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, check: HeadCheck) -> torch.Tensor:
    """The mean of −log p(y_t | x_≤t) over the positions whose target is not −1 (a supervised step's
    loss): through the output head a chunk of tokens at a time and at those positions only, where
    ``check`` finds the head gives the logits; else from the full logits in fp32."""
    head = check(model, x)
    if head is None:
        logits = model_logits(model, x)
        return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), y.reshape(-1), ignore_index=-1)
    keep = y >= 0
    with hidden_out(model):
        hidden = model_logits(model, x)  # (B, T, H)
    return -token_logprobs(hidden[keep], head, y[keep]).mean()


@contextlib.contextmanager
def hidden_out(model: nn.Module) -> Iterator[None]:
    """While inside, ``model(ids)`` returns its final hidden states (after the last norm) where it
    would return logits: the output layer passes its input through."""
    m = bare(model)
    if isinstance(m, DecoderLM):
        m.hidden_out = True
        try:
            yield
        finally:
            m.hidden_out = False
        return
    head = m.get_output_embeddings()
    head.forward = _identity
    try:
        yield
    finally:
        del head.forward


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x
