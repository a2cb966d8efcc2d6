"""The policy: the architecture engine's decoder or a local Hugging Face causal LM,
optionally with LoRA adapters (peft), with batched KV-cache sampling.

Design decisions:
- One adapter hides the two families: ``logits(ids)`` and ``sample(...)``.
  The decoder samples through its own ``KVCache`` (left-padded prompts, one
  decode step for the whole batch); a Hugging Face model through its own
  ``generate``. Sampling draws from torch's global generator, which the
  executor seeds and checkpoints, so a resumed stage samples what the
  uninterrupted one would have.
- LoRA goes through peft on the model in place (``get_peft_model``): adapters
  on the plan's target modules of the last ``layers_fraction`` of layers (Lee
  & Tong put them on the query/value projections of the last quarter or
  third). Hugging Face names map to the decoder's (q_proj → wq, ...), so one
  plan works for both families.
- The reference policy for the KL term costs nothing under LoRA: it is the
  same model with the adapters switched off. Without LoRA it is a frozen
  copy of the stage's starting weights, taken once and kept in the engine's
  state so a resumed stage keeps the same reference.
- Log-probs are computed only over completion positions, as
  logit − logsumexp (no (B, T, V) log-softmax kept for a large vocabulary).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import torch
import torch.nn as nn

from engines.architecture.model import DecoderLM, KVCache

# plan (Hugging Face) names → the architecture engine's module names
DECODER_MODULES = {"q_proj": "wq", "k_proj": "wk", "v_proj": "wv", "o_proj": "wo",
                   "gate_proj": "w_gate", "up_proj": "w_up", "down_proj": "w_down"}


@dataclass(frozen=True)
class LoraSettings:
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: tuple[str, ...] = ("q_proj", "v_proj")
    layers_fraction: float = 0.25

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    @classmethod
    def from_options(cls, options: Any) -> LoraSettings:
        """The plan's LoRA (``engines.options.LoraOptions``); the base's quantisation is the loader's."""
        return cls(rank=options.rank, alpha=options.alpha, dropout=options.dropout,
                   target_modules=tuple(options.target_modules), layers_fraction=options.layers_fraction)


def zero_loss(model: nn.Module) -> torch.Tensor:
    """A zero that still reaches every trainable weight (a micro-batch with nothing to learn:
    backward and the data-parallel all-reduce see the same graph as any other)."""
    return sum(p.sum() for p in model.parameters() if p.requires_grad) * 0.0


def _layer_count(model: nn.Module) -> tuple[int, str]:
    if isinstance(model, DecoderLM):
        return model.config.n_layers, "blocks"
    return int(model.config.num_hidden_layers), "layers"


def add_lora(model: nn.Module, lora: LoraSettings) -> Any:
    """Wrap ``model`` with peft LoRA in place; returns the PeftModel (for disable_adapter)."""
    from peft import LoraConfig, get_peft_model

    n_layers, pattern = _layer_count(model)
    first = n_layers - max(1, math.ceil(n_layers * lora.layers_fraction - 1e-9))  # as the memory model counts
    targets = list(lora.target_modules)
    if isinstance(model, DecoderLM):
        unknown = [t for t in targets if t not in DECODER_MODULES and t not in DECODER_MODULES.values()]
        if unknown:
            raise ValueError(f"LoRA target module '{unknown[0]}' is not in the decoder; accepted: "
                             f"{', '.join(DECODER_MODULES)}")
        targets = [DECODER_MODULES.get(t, t) for t in targets]
    config = LoraConfig(r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                        target_modules=targets, layers_to_transform=list(range(first, n_layers)),
                        layers_pattern=pattern)
    return get_peft_model(model, config)


FROZEN_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def with_lora(model: nn.Module, options: Any, frozen: str) -> tuple[Any, dict[str, Any]]:
    """LoRA (``engines.options.LoraOptions``) on ``model`` in place, for any engine: the
    base frozen in ``frozen`` precision — or, loaded in 4 bits (QLoRA), left as loaded — and
    the adapters in fp32. Returns the PeftModel and what each checkpoint's manifest records
    (the adapters' scaling, to merge them; that the base is 4-bit, where it is: such a
    stage's checkpoints hold the adapters only, ``StageSettings.adapters_only``)."""
    peft = add_lora(model, LoraSettings.from_options(options))
    meta: dict[str, Any] = {"lora_scaling": options.scaling}
    if options.quantize_base == "4bit":
        for p in model.parameters():
            if p.requires_grad:
                p.data = p.data.float()
        meta["quantized_base"] = "4bit"
    else:
        keep_frozen_in(model, FROZEN_DTYPES[frozen])  # the base never trains: the compute dtype is enough
    return peft, meta


def keep_frozen_in(model: nn.Module, dtype: torch.dtype) -> None:
    """Cast the parameters that don't train (LoRA's base) to ``dtype``; adapters stay fp32."""
    for p in model.parameters():
        if not p.requires_grad:
            p.data = p.data.to(dtype)


class Policy:
    """The trained model plus how to read log-probs from it and sample from it.

    ``model`` is the bare model (adapters injected in place under LoRA); a
    caller training under DDP passes its wrapped model to ``token_logprobs``.
    """

    def __init__(self, model: nn.Module, pad_id: int, eos_id: int, peft: Any = None,
                 frozen_dtype: torch.dtype = torch.float32) -> None:
        self.model, self.pad_id, self.eos_id, self.peft = model, pad_id, eos_id, peft
        self.reference: nn.Module | None = None  # frozen copy, full fine-tuning only
        self.frozen_dtype = frozen_dtype  # the reference copy's

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def logits(self, ids: torch.Tensor, model: nn.Module | None = None) -> torch.Tensor:
        out = (model or self.model)(ids)
        return out[0] if isinstance(out, tuple) else out.logits  # (B, T, V)

    def token_logprobs(self, ids: torch.Tensor, start: int, model: nn.Module | None = None) -> torch.Tensor:
        """log π(ids[:, t] | ids[:, :t]) for t ≥ start: (B, T − start)."""
        logits = self.logits(ids[:, :-1], model)[:, start - 1:].float()  # (B, Tc, V)
        targets = ids[:, start:]
        picked = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        return picked - torch.logsumexp(logits, dim=-1)

    @contextlib.contextmanager
    def as_reference(self) -> Iterator[nn.Module]:
        """The reference policy: adapters off under LoRA, else the frozen copy."""
        if self.peft is not None:
            with self.peft.disable_adapter():
                yield self.model
        else:
            if self.reference is None:
                raise RuntimeError("no reference policy: call snapshot_reference() first")
            yield self.reference

    def snapshot_reference(self) -> None:
        if self.peft is None and self.reference is None:
            import copy

            self.reference = copy.deepcopy(self.model).eval().requires_grad_(False)
            keep_frozen_in(self.reference, self.frozen_dtype)  # parameters only: rotary tables stay fp32

    @torch.no_grad()
    def sample(self, prompts: Sequence[Sequence[int]], max_new_tokens: int, temperature: float) -> list[list[int]]:
        """One completion per prompt (repeat a prompt for a group); each ends at EOS or the limit.
        ``temperature`` 0 is greedy."""
        was_training = self.model.training
        self.model.eval()
        try:
            if isinstance(self.model, DecoderLM):
                out = self._sample_decoder(prompts, max_new_tokens, temperature)
            else:
                out = self._sample_hf(prompts, max_new_tokens, temperature)
        finally:
            self.model.train(was_training)
        return out

    def _left_padded(self, prompts: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        valid = torch.zeros(len(prompts), width, dtype=torch.bool)
        for i, p in enumerate(prompts):
            ids[i, width - len(p):] = torch.tensor(list(p), dtype=torch.long)
            valid[i, width - len(p):] = True
        return ids.to(self.device), valid.to(self.device)

    def _sample_decoder(self, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                        temperature: float) -> list[list[int]]:
        ids, valid = self._left_padded(prompts)
        B, width = ids.shape
        model = self.model
        max_new_tokens = min(max_new_tokens, model.config.seq_len - width)
        cache = KVCache(model, B, width + max_new_tokens, valid)
        logits, _ = model(ids, cache=cache)  # prefill (B, width, V)
        done = torch.zeros(B, dtype=torch.bool, device=ids.device)
        out = torch.full((B, max_new_tokens), self.pad_id, dtype=torch.long, device=ids.device)
        for t in range(max_new_tokens):
            token = _pick(logits[:, -1].float(), temperature)  # (B,)
            token = torch.where(done, torch.full_like(token, self.pad_id), token)
            out[:, t] = token
            done |= token == self.eos_id
            if t % 8 == 7 and bool(done.all()):  # a host sync every few steps, not every step
                break
            cache.extend(torch.ones(B, 1, dtype=torch.bool, device=ids.device))
            logits, _ = model(token[:, None], cache=cache)
        return [_until_eos(row, self.eos_id, self.pad_id) for row in out.tolist()]

    def _sample_hf(self, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                   temperature: float) -> list[list[int]]:
        ids, valid = self._left_padded(prompts)
        sampling = {"do_sample": True, "temperature": temperature, "top_k": 0} if temperature > 0 else \
            {"do_sample": False}
        out = self.model.generate(input_ids=ids, attention_mask=valid.long(), max_new_tokens=max_new_tokens,
                                  pad_token_id=self.pad_id, eos_token_id=self.eos_id, use_cache=True, **sampling)
        return [_until_eos(row, self.eos_id, self.pad_id) for row in out[:, ids.size(1):].tolist()]


def _pick(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    if temperature <= 0:
        return logits.argmax(-1)
    return torch.multinomial(torch.softmax(logits / temperature, dim=-1), 1).squeeze(-1)


def _until_eos(row: list[int], eos: int, pad: int) -> list[int]:
    """The completion up to and including its EOS (pads dropped)."""
    if eos in row:
        return row[: row.index(eos) + 1]
    return [t for t in row if t != pad]
