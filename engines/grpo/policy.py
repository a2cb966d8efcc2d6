"""The policy: the architecture engine's decoder or a local Hugging Face causal LM,
optionally with LoRA adapters (peft), with batched KV-cache sampling.

Design decisions:
- One adapter hides the two families: ``logits(ids)`` and ``sample(...)``.
  The decoder samples through its own ``KVCache`` (left-padded prompts, one
  decode step for the whole batch); a Hugging Face model through its own
  ``generate``. Sampling draws from torch's global generator, which the
  executor seeds and checkpoints, so a resumed stage samples what the
  uninterrupted one would have.
- Rollouts are bound by launching small kernels, not by arithmetic: a decode
  step of the decoder has the same tensors every token (the cache's position
  lives on the device), picks the next token on the device (no host sync but
  a check every 8 tokens that all rows ended) and, on CUDA, is captured once
  per rollout in a CUDA graph and replayed each token. A Hugging Face model
  decodes the same way on CUDA (``HfRollout``): transformers' static cache,
  an additive mask over its whole length and each row's positions given, so
  its step too is captured and replayed, with nothing compiled (``generate``
  with a static cache compiled a step for each cache shape, tens of seconds
  each on a GPU). A model with sliding-window layers, or whose static cache
  fails, goes through ``generate``.
  The plan's ``training.compile`` picks (``StageSetup.decode``,
  ``executor/settings.decoding``): ``off`` turns both off; ``auto`` and ``on``
  on a GPU also compile the decoder's step before capturing it: Inductor fuses
  its ~670 small kernels (``Policy.sample`` alone on an H100, 38.7M parameters,
  128 rows of 112 tokens: 867 completions/s against 523 captured uncompiled
  and 125 for the per-token loop before), for about 20 s of compiling once
  and again at the second cache width. A failure turns off what failed for
  the rest of the stage, with a note (a compile: the step is captured
  uncompiled), and the rollout goes on.
- LoRA goes through peft on the model in place (``get_peft_model``): adapters
  on the plan's target modules of the last ``layers_fraction`` of layers (Lee
  & Tong put them on the query/value projections of the last quarter or
  third). Hugging Face names map to the decoder's (q_proj → wq, ...), so one
  plan works for both families.
- Full fine-tuning keeps fp32 weights and computes under autocast; sampling
  then decodes from a copy of the weights in the compute dtype
  (``sample_dtype``, the trainer's choice on CUDA), refreshed in place before
  each ``sample`` (one cast-copy of the weights: 6 B a parameter read and
  written, not timed apart). Under autocast a Hugging Face model's keys come out fp32 (its
  rotary tables follow the fp32 embedding output) beside bf16 values, so its
  static cache refused them (``index_copy_``: a dtype mismatch) and every
  rollout fell back to the dynamic cache; a compiled decode step also casts
  every fp32 weight again at each token. The copy costs the compute dtype's
  bytes a parameter for the whole stage (``optimizer/memory.py: sampler_bytes``).
  The tokens are drawn from the copy; their log-probabilities for the loss
  come from the trained fp32 weights, as with a separate inference engine.
- The reference policy for the KL term costs nothing under LoRA: it is the
  same model with the adapters switched off. Without LoRA it is a frozen
  copy of the stage's starting weights, taken once and kept in the engine's
  state so a resumed stage keeps the same reference.
- Log-probs are computed only over completion positions, as
  logit − logsumexp, through the output head a chunk of tokens at a time
  (``engines/grpo/logprobs.py``): nothing of vocabulary width is kept for backward.
"""

from __future__ import annotations

import contextlib
import functools
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.nn as nn

from engines.architecture.model import DecoderLM, KVCache, fuse_projections, one_query_attention
from engines.grpo.logprobs import HeadCheck, bare, cross_entropy, hidden_out, model_logits
from engines.grpo.logprobs import token_logprobs as chunked_logprobs
from engines.grpo.options import KEPT_DECODE_BYTES, KEPT_DECODES

# plan (Hugging Face) names → the architecture engine's module names
DECODES = ("eager", "graphs", "compiled")  # how decode steps run on CUDA (see the module doc)
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
                 frozen_dtype: torch.dtype = torch.float32, decode: str = "graphs", vocab: int | None = None,
                 sample_dtype: torch.dtype | None = None) -> None:
        self.model, self.pad_id, self.eos_id, self.peft = model, pad_id, eos_id, peft
        # ids the tokenizer can decode: a model's vocabulary is often padded past its tokenizer's
        # (Qwen2: 151,936 rows for 151,665 tokens), and sampling never draws the rest
        self.vocab = vocab
        self.reference: nn.Module | None = None  # frozen copy, full fine-tuning only
        self._heads = HeadCheck()  # per model: whether chunked log-probs match its logits
        self.frozen_dtype = frozen_dtype  # the reference copy's
        if decode not in DECODES:
            raise ValueError(f"decode {decode!r}: one of {', '.join(DECODES)}")
        self.graphs = decode != "eager"  # decode steps from CUDA graphs (HF: a static cache), on CUDA
        self.compile = decode == "compiled"  # the decoder's step compiled before it is captured
        self.notes: list[str] = []
        # sampling from a copy of the weights in this dtype (None: from the model itself); LoRA's adapters
        # and an already-narrow model decode from the model
        narrow = all(p.dtype == sample_dtype for p in model.parameters())
        self.sample_dtype = None if peft is not None or sample_dtype is None or narrow else sample_dtype
        self._sampler: nn.Module | None = None
        # a Hugging Face model on CUDA: muse's static-cache loop (HfRollout), its steps from a CUDA graph
        self.own_static, self.hf_graphs = True, True
        self._copies: tuple[list[torch.Tensor], list[torch.Tensor]] = ([], [])
        # captured decode steps kept for the next batch of the same shape (``_keep``), oldest first
        self._decodes: dict[tuple[Any, ...], _Decode] = {}

    def sampler(self) -> nn.Module:
        """The model ``sample`` decodes with: the model, or its copy in ``sample_dtype`` with the
        model's weights as they are now (made on first use, then copied into in place, so CUDA graphs
        and compiled steps that read its tensors stay valid)."""
        if self.sample_dtype is None:
            return self.model
        if self._sampler is None:
            import copy

            # each parameter cast once, never held in fp32 twice (deepcopy takes the memo's objects;
            # a tied weight is one entry); buffers (rotary tables) are copied as they are
            params = list(self.model.parameters())
            memo: dict[int, Any] = {id(p): nn.Parameter(p.detach().to(self.sample_dtype), requires_grad=False)
                                    for p in params}
            self._sampler = copy.deepcopy(self.model, memo).eval()
            fuse_projections(self._sampler)  # q/k/v and gate/up one product each: decoding is launch-bound
            self._copies = ([memo[id(p)] for p in params], [p.detach() for p in params])
        else:
            torch._foreach_copy_(*self._copies)
        return self._sampler

    def take_notes(self) -> list[str]:
        """Lines worth an event: what decoding or the log-probs stopped doing, and why."""
        notes, self.notes, self._heads.notes = self.notes + self._heads.notes, [], []
        return notes

    def _failed(self, what: str, exc: BaseException, instead: str) -> None:
        lines = str(exc).strip().splitlines()
        self.notes.append(f"{what} failed ({type(exc).__name__}{': ' + lines[0] if lines else ''}); "
                          f"{instead} for the rest of the stage")

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def logits(self, ids: torch.Tensor, model: nn.Module | None = None) -> torch.Tensor:
        return model_logits(model or self.model, ids)  # (B, T, V)

    def token_logprobs(self, ids: torch.Tensor, start: int, model: nn.Module | None = None) -> torch.Tensor:
        """log π(ids[:, t] | ids[:, :t]) for t ≥ start: (B, T − start). Through the output head a
        chunk of tokens at a time (``engines/grpo/logprobs.py``) where the model's head is one linear
        layer and gives what its logits give; else from the full logits."""
        model = model or self.model
        head = self._heads(model, ids[:, :-1])
        if head is None:
            return self._full_logprobs(ids, start, model)
        with hidden_out(model):
            hidden = self.logits(ids[:, :-1], model)[:, start - 1:]  # (B, Tc, H)
        return chunked_logprobs(hidden, head, ids[:, start:])

    def cross_entropy(self, x: torch.Tensor, y: torch.Tensor, model: nn.Module | None = None) -> torch.Tensor:
        """A supervised step's loss (``logprobs.cross_entropy``): the mean −log π of the targets that are
        not −1, through the output head a chunk at a time where it gives what the logits give."""
        return cross_entropy(model or self.model, x, y, self._heads)

    def _full_logprobs(self, ids: torch.Tensor, start: int, model: nn.Module) -> torch.Tensor:
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
            fuse_projections(self.reference)
            if self.compile and isinstance(self.reference, DecoderLM) and self.device.type == "cuda":
                self._compile_reference(self.reference)

    def _compile_reference(self, reference: DecoderLM) -> None:
        """Each rollout's reference pass with the blocks compiled (one graph for all of them, its batch and
        width dynamic: every rollout's differ): its eager kernels took half as long again as the decode's
        prefill (docs/bench_grpo.md). A compile that fails leaves the blocks eager, with a note."""
        for block in reference.blocks:
            block.compile(dynamic=True)

        def eager_again(exc: Exception) -> None:
            for block in reference.blocks:
                block._compiled_call_impl = None  # what Module.compile() set
            self._failed("the compiled reference forward", exc, "the reference runs eagerly")

        reference.forward = OrEager(reference.forward, reference.forward, eager_again)

    @torch.no_grad()
    def sample(self, prompts: Sequence[Sequence[int]], max_new_tokens: int, temperature: float) -> list[list[int]]:
        """One completion per prompt (repeat a prompt for a group); each ends at EOS or the limit.
        ``temperature`` 0 is greedy."""
        was_training = self.model.training
        self.model.eval()
        try:
            model = self.sampler()
            if isinstance(model, DecoderLM):
                out = self._sample_decoder(model, prompts, max_new_tokens, temperature)
            else:
                out = self._sample_hf(model, prompts, max_new_tokens, temperature)
        finally:
            self.model.train(was_training)
        return out

    def _left_padded(self, prompts: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(p) for p in prompts)
        ids = torch.tensor([[self.pad_id] * (width - len(p)) + list(p) for p in prompts], dtype=torch.long)
        starts = width - torch.tensor([len(p) for p in prompts])  # one tensor made, not one a row
        valid = torch.arange(width)[None, :] >= starts[:, None]
        return ids.to(self.device), valid.to(self.device)

    def _sample_decoder(self, model: DecoderLM, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                        temperature: float) -> list[list[int]]:
        ids, valid = self._left_padded(prompts)
        if ids.is_cuda:  # prompts a few tokens longer or shorter reuse a kept decode (eager decodes alike)
            ids, valid = static_shape(ids, valid, self.pad_id, model.config.seq_len - max_new_tokens, rows=False,
                                      multiple=8)
        B, width = ids.shape
        max_new_tokens = min(max_new_tokens, model.config.seq_len - width)
        if max_new_tokens <= 0:  # the prompts fill the context
            return [[] for _ in prompts]
        graphs = self.graphs and ids.is_cuda
        # kept (and its prefill captured) only where no weight it reads trains: autocast caches the casts of
        # weights that train (LoRA's fp32 adapters) for one autocast region, so a graph captured in one
        # rollout's would read, in the next, casts already freed
        keeps = graphs and not any(p.requires_grad for p in model.parameters())
        key = (id(model), B, width, max_new_tokens, temperature, self.compile, torch.get_autocast_dtype("cuda")
               if torch.is_autocast_enabled("cuda") else None)
        decode = self._decodes.pop(key, None) if keeps else None
        if decode is not None:  # the same tensors, emptied: its captured steps replay over this batch
            decode.cache.reset(valid)
            decode.rollout.reset()
            decode.ids.copy_(ids)
        else:
            decode = _Decode(model, ids, valid, max_new_tokens, temperature, self.pad_id, self.eos_id, self.vocab,
                             graphs, self.compile, keeps)
        decode.prefill()
        decode.cache.prefilled(width)
        rollout = decode.rollout
        for t in range(1, max_new_tokens):
            if t % 8 == 0 and bool(rollout.done.all()):  # a host sync every few steps, not every step
                break
            decode.step()
        out = rollout.out.tolist()
        if isinstance(decode.step, Graphed) and decode.step.failed is not None:
            if self.compile:
                self.compile = False
                self._failed("the compiled decode step", decode.step.failed, "decode steps are captured uncompiled")
            else:
                self.graphs = False
                self._failed("capturing the decode step in a CUDA graph", decode.step.failed,
                             "decoding runs eagerly")
        elif keeps:
            self._keep(key, decode)
        return [_until_eos(row, self.eos_id, self.pad_id) for row in out[: len(prompts)]]

    def _keep(self, key: tuple[Any, ...], decode: _Decode) -> None:
        """Keep a decode and its captured steps for the next batch of the same shape, the most recent last,
        while their caches and graphs' memory come to at most ``KEPT_DECODE_BYTES`` (the memory model holds
        them through the update): capturing the steps again took a tenth of a rollout, and a prefill whose
        launches aren't replayed another tenth (docs/bench_grpo.md)."""
        self._decodes[key] = decode
        while len(self._decodes) > KEPT_DECODES or sum(d.nbytes() for d in self._decodes.values()) > KEPT_DECODE_BYTES:
            self._decodes.pop(next(iter(self._decodes)))

    def _static_cache(self, ids: torch.Tensor) -> bool:
        """Whether a Hugging Face model generates with its static cache (compiled decode steps)."""
        return self.graphs and ids.is_cuda

    def _sample_hf(self, model: nn.Module, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                   temperature: float) -> list[list[int]]:
        ids, valid = self._left_padded(prompts)
        static = self._static_cache(ids)
        if static and self.own_static and own_static_loop(model):  # a static cache, steps replayed from a graph
            done = self._sample_hf_static(model, ids, valid, max_new_tokens, temperature)
            if done is not None:
                return done
        if static:  # one compiled decode step per bucket, not one per batch's width and row count
            room = getattr(model.config, "max_position_embeddings", None)
            ids, valid = static_shape(ids, valid, self.pad_id, None if room is None else room - max_new_tokens)
        sampling = {"do_sample": True, "temperature": temperature, "top_k": 0} if temperature > 0 else \
            {"do_sample": False}
        rows = model.get_output_embeddings().weight.size(0)
        if self.vocab is not None and self.vocab < rows:  # the padded rows the tokenizer has no token for
            sampling["suppress_tokens"] = list(range(self.vocab, rows))
        generate = functools.partial(model.generate, input_ids=ids, attention_mask=valid.long(),
                                     max_new_tokens=max_new_tokens, pad_token_id=self.pad_id,
                                     eos_token_id=self.eos_id, use_cache=True, **sampling)
        out = None
        if static:  # a static cache: generate compiles its decode step (CUDA graphs)
            try:
                out = generate(cache_implementation="static")
            except Exception as exc:  # a model without a static cache, a compile error: the dynamic cache
                self.graphs = False
                self._failed("generating with a static cache", exc, "generation uses the dynamic cache")
        if out is None:
            out = generate()
        completions = out[: len(prompts), ids.size(1):]  # the padding rows' are dropped
        return [_until_eos(row, self.eos_id, self.pad_id) for row in completions.tolist()]

    def _sample_hf_static(self, model: nn.Module, ids: torch.Tensor, valid: torch.Tensor, max_new_tokens: int,
                          temperature: float) -> list[list[int]] | None:
        """``_sample_decoder`` for a Hugging Face model: a prefill into transformers' static cache, then
        one decode step a token over the same tensors (``HfRollout``), captured once in a CUDA graph and
        replayed (on CUDA): no compiling, so no compile per shape. None where the prefill or the cache
        fails (the caller goes on with ``generate``, and a note says why)."""
        try:
            rollout = HfRollout(model, ids, valid, max_new_tokens, temperature, self.pad_id, self.eos_id, self.vocab)
        except Exception as exc:  # a model whose forward takes no static cache, 4-D mask or positions
            self._failed("decoding with a static cache", exc, "generation runs transformers' generate")
            self.own_static = False
            return None
        graphed = Graphed(rollout.step, eager=rollout.step) if ids.is_cuda and self.hf_graphs else None
        with decode_attention(model):
            for t in range(1, max_new_tokens):
                if t % 8 == 0 and bool(rollout.done.all()):
                    break
                (graphed or rollout.step)()
        if graphed is not None and graphed.failed is not None:
            self.hf_graphs = False
            self._failed("capturing the Hugging Face decode step in a CUDA graph", graphed.failed,
                         "its decode steps run eagerly")
        return [_until_eos(row, self.eos_id, self.pad_id) for row in rollout.out.tolist()]


DECODE_ATTENTION = "muse_decode"  # transformers' name for ``_decode_attention`` while muse decodes


def _decode_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                      **kwargs: Any) -> tuple[torch.Tensor, None]:
    """A decode step's attention, one query a row, as transformers' attention functions take it: query (B, H, 1, D),
    key and value (B, H_kv, S, D), an additive mask (B, 1, 1, S) → (B, 1, H, D). Each key/value head's G = H / H_kv
    query heads (heads kv·G … kv·G + G − 1, as ``repeat_kv`` lays them out) meet its keys in one product, so the
    cache is never copied G times (SDPA with a mask asks for repeated keys: on an H100 those copies and cuDNN's
    one-query attention took half of a Qwen2-0.5B decode step's kernel time). The softmax runs in fp32. Anything else
    (the prefill, dropout, a soft cap, a sliding window, a position bias, attention sinks) goes to transformers'
    SDPA path."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    extras = ("softcap", "sliding_window", "position_bias", "s_aux", "sinks")  # terms this product leaves out
    if query.shape[2] != 1 or dropout or any(kwargs.get(name) is not None for name in extras):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    B, H, _, D = query.shape
    grouped = query.reshape(B, key.shape[1], H // key.shape[1], D)
    out = one_query_attention(grouped, key, value, attention_mask, scaling if scaling is not None else D ** -0.5)
    return out.reshape(B, 1, H, D), None


@contextlib.contextmanager
def decode_attention(model: nn.Module) -> Iterator[None]:
    """``model`` attends with ``_decode_attention`` inside (a CUDA graph captured here keeps its kernels),
    its own attention again after; a model whose attention is not SDPA's keeps it."""
    config = getattr(model, "config", None)
    before = getattr(config, "_attn_implementation", None)
    if before != "sdpa":
        yield
        return
    from transformers import AttentionInterface

    AttentionInterface.register(DECODE_ATTENTION, _decode_attention)
    configs = {id(c): c for c in (m.config for m in model.modules() if hasattr(m, "config"))
               if getattr(c, "_attn_implementation", None) == "sdpa"}.values()
    for c in configs:
        c._attn_implementation = DECODE_ATTENTION
    try:
        yield
    finally:
        for c in configs:
            c._attn_implementation = "sdpa"


STATIC_WIDTH = 32  # a static cache's prompts are left-padded to a multiple of this many tokens


def own_static_loop(model: nn.Module) -> bool:
    """Whether muse decodes a Hugging Face model with its own static-cache loop (``HfRollout``): every
    layer attends over the whole context (a sliding window would need its own mask) and the model takes
    a static cache. Else ``generate`` does."""
    try:
        from transformers import StaticCache  # noqa: F401
    except ImportError:
        return False
    config = getattr(model, "config", None)
    kinds = set(getattr(config, "layer_types", None) or ["full_attention"])
    return kinds == {"full_attention"} and not getattr(config, "use_sliding_window", False) \
        and bool(getattr(model, "_supports_static_cache", True)) and not getattr(config, "is_encoder_decoder", False)


def static_shape(ids: torch.Tensor, valid: torch.Tensor, pad_id: int, max_width: int | None = None,
                 rows: bool = True, multiple: int = STATIC_WIDTH) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded prompts (B, W) padded to the shape a static cache compiles for: the width up to a
    multiple of ``STATIC_WIDTH`` (at most ``max_width``, the positions left after the completion), the
    rows up to a power of two (at least 8) with copies of the first prompt, whose completions the
    caller drops. transformers compiles its decode step for each cache shape (rows × prompt width +
    new tokens; on CPU, a new graph for each): unbucketed, every batch with a new longest prompt and
    every evaluation chunk of another size compiles again, and past torch's recompile limit (8) the
    step runs uncompiled. Masked positions change no row's output. ``rows=False``: the width only (to a
    multiple of ``multiple``)."""
    count, width = ids.shape
    wide = -(-width // multiple) * multiple
    wide = width if max_width is not None and wide > max_width else wide
    tall = max(8, 1 << (count - 1).bit_length()) if rows else count
    if (tall, wide) == (count, width):
        return ids, valid
    padded = torch.full((tall, wide), pad_id, dtype=ids.dtype, device=ids.device)
    mask = torch.zeros((tall, wide), dtype=valid.dtype, device=valid.device)
    padded[:count, wide - width:], mask[:count, wide - width:] = ids, valid
    padded[count:, wide - width:], mask[count:, wide - width:] = ids[:1], valid[:1]
    return padded, mask


class Rollout:
    """A batch's decoding held on the device: each row's last token (B, 1), which rows
    have ended, the completion so far (B, steps) and the column the next token goes to.
    A step changes these in place and keeps no other tensor, so every step reads and
    writes the same memory: it can be captured once in a CUDA graph and replayed."""

    def __init__(self, model: DecoderLM, cache: KVCache, steps: int, temperature: float,
                 pad_id: int, eos_id: int, vocab: int | None = None) -> None:
        self.cache = cache
        self._start(model, cache.valid.size(0), cache.valid.device, steps, temperature, pad_id, eos_id, vocab)

    def _start(self, model: nn.Module, batch: int, device: torch.device, steps: int, temperature: float,
               pad_id: int, eos_id: int, vocab: int | None) -> None:
        self.model, self.temperature, self.pad_id, self.eos_id = model, temperature, pad_id, eos_id
        self.vocab = vocab  # draw among the first ``vocab`` ids only (None: all)
        self.token = torch.full((batch, 1), pad_id, dtype=torch.long, device=device)
        self.done = torch.zeros(batch, dtype=torch.bool, device=device)
        self.out = torch.full((batch, steps), pad_id, dtype=torch.long, device=device)
        self.column = torch.zeros(1, dtype=torch.long, device=device)

    def reset(self) -> None:
        """Empty again, in the same tensors (a kept decode step's next batch)."""
        self.token.fill_(self.pad_id)
        self.done.zero_()
        self.out.fill_(self.pad_id)
        self.column.zero_()

    def take(self, logits: torch.Tensor) -> None:
        """Each row's next token from its last logits (B, T, V); pad once the row has ended."""
        token = _pick(logits[:, -1, : self.vocab].float(), self.temperature).masked_fill_(self.done, self.pad_id)
        self.out.index_copy_(1, self.column, token[:, None])
        self.done |= token == self.eos_id
        self.token.copy_(token[:, None])
        self.column.add_(1)

    def step(self) -> None:
        """Feed each row its last token and take the next."""
        self.take(self.model(self.token, cache=self.cache)[0])


class _Decode:
    """One batch's decoding with muse's decoder: the cache, the rollout's tensors, the prompts' buffer
    (B, W), the prefill (the last position's logits only: the rest would be B × W × V for nothing) and the
    decode step; with ``graphs`` the step replayed from a CUDA graph once captured, and where the decode is to
    be ``kept`` (``Policy._keep``) the prefill too, so it runs the next batch of its shape with no capture and
    none of the prefill's launches."""

    def __init__(self, model: DecoderLM, ids: torch.Tensor, valid: torch.Tensor, steps: int, temperature: float,
                 pad_id: int, eos_id: int, vocab: int | None, graphs: bool, compiled: bool, kept: bool) -> None:
        self.ids = ids
        self.cache = KVCache(model, ids.size(0), ids.size(1) + steps, valid)
        self.rollout = Rollout(model, self.cache, steps, temperature, pad_id, eos_id, vocab)
        prefill = functools.partial(_prefill, model, ids, self.cache, self.rollout)  # no cycle through self
        self.prefill: Callable[[], None] = prefill
        self.step: Callable[[], None] = self.rollout.step
        if graphs:
            step = functools.partial(_compiled_step(), self.rollout) if compiled else self.rollout.step
            self.step = Graphed(step, eager=self.rollout.step)
            if kept:  # a prefill is captured at its third call: worth it only for a decode kept that long
                self.prefill = Graphed(prefill, eager=prefill)

    def nbytes(self) -> int:
        """Its cache and its graphs' memory."""
        graphs = sum(g.pool_bytes for g in (self.prefill, self.step) if isinstance(g, Graphed))
        return self.cache.nbytes() + graphs


def _prefill(model: DecoderLM, ids: torch.Tensor, cache: KVCache, rollout: Rollout) -> None:
    with hidden_out(model):
        hidden, _ = model(ids, cache=cache)  # (B, W, C)
    rollout.take(model.lm_head(hidden[:, -1:]))
    cache.decode_on_device()


class HfRollout(Rollout):
    """``Rollout`` for a Hugging Face causal LM over transformers' ``StaticCache``: the prompts (left-padded,
    B × W) are prefilled at cache columns 0..W−1, then each step feeds every row its last token at column
    ``cache_position`` (a device tensor, W then W+1, ...), with each row's own position (its count of real
    tokens: left padding shifts no row's rotary positions) and an additive mask over the cache's whole
    length, opened one column a step. Every step reads and writes the same tensors, so a CUDA graph holds it."""

    def __init__(self, model: nn.Module, ids: torch.Tensor, valid: torch.Tensor, steps: int, temperature: float,
                 pad_id: int, eos_id: int, vocab: int | None = None) -> None:
        import inspect

        from transformers import StaticCache

        B, W = ids.shape
        device, length = ids.device, W + steps
        self._start(model, B, device, steps, temperature, pad_id, eos_id, vocab)
        self.cache = StaticCache(config=model.config, max_cache_len=length)
        dtype = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else \
            next(model.parameters()).dtype
        low = torch.finfo(dtype).min
        keys = torch.zeros(B, length, dtype=torch.bool, device=device)
        keys[:, :W] = valid
        causal = torch.ones(W, length, dtype=torch.bool, device=device).tril()  # query i sees columns ≤ i
        seen = (keys[:, None, :] & causal[None]) | torch.eye(W, length, dtype=torch.bool, device=device)[None]
        prefill = torch.zeros(B, 1, W, length, dtype=dtype, device=device).masked_fill_(~seen[:, None], low)
        positions = (valid.long().cumsum(-1) - 1).clamp_(min=0)
        takes = inspect.signature(model.forward).parameters
        # the cache's keyword: ``cache`` from transformers 5.2x, ``past_key_values`` before; the column it
        # writes at: ``cache_position`` where the cache takes it, else the cache counts on the device itself
        self.cache_kw = "cache" if "cache" in takes else "past_key_values"
        extra = {"logits_to_keep": 1} if "logits_to_keep" in takes else {}
        logits = model(input_ids=ids, attention_mask=prefill, position_ids=positions, use_cache=True,
                       cache_position=torch.arange(W, device=device), **{self.cache_kw: self.cache}, **extra).logits
        # the decode steps': each row's keys so far (a pad query saw its own key above, so no row is empty)
        self.mask = torch.zeros(B, 1, 1, length, dtype=dtype, device=device).masked_fill_(~keys[:, None, None], low)
        self.position = valid.long().sum(-1, keepdim=True)  # (B, 1) the next token's position in its row
        self.cache_position = torch.full((1,), W, dtype=torch.long, device=device)
        self.take(logits)

    def step(self) -> None:
        self.mask.index_fill_(-1, self.cache_position, 0.0)
        logits = self.model(input_ids=self.token, attention_mask=self.mask, position_ids=self.position, use_cache=True,
                            cache_position=self.cache_position, **{self.cache_kw: self.cache}).logits
        self.take(logits)
        self.cache_position.add_(1)
        self.position.add_(1)


class Graphed:
    """``step()`` replayed from a CUDA graph: run for the first ``WARMUP`` calls on a
    side stream (lazy set-up — cuBLAS workspaces, autocast's cast weights, compiling —
    happens outside the capture, as ``torch.cuda.graph`` asks), captured at the next
    call and replayed from then on. The warm-up calls are real steps, so nothing runs
    twice. The graph is captured under whatever autocast the caller runs in and
    replayed in the same call, so capture and replay never see different precisions.
    Random draws in the graph come from the default CUDA generator, which the capture
    registers: each replay draws new numbers and advances it. If a warm-up call or the
    capture raises, ``failed`` holds why and every call from then on runs ``eager()``
    (the same step, uncompiled): a capture only records, so it changed no state."""

    WARMUP = 2

    def __init__(self, step: Callable[[], None], eager: Callable[[], None]) -> None:
        self.step, self.eager, self.calls = step, eager, 0
        self.graph: torch.cuda.CUDAGraph | None = None
        self.failed: Exception | None = None
        self.pool_bytes = 0  # the device memory its capture reserved (the graph's own pool)

    def __call__(self) -> None:
        if self.graph is not None:
            self.graph.replay()
        elif self.failed is not None:
            self.eager()
        elif self.calls < self.WARMUP:
            self.calls += 1
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            try:
                with torch.cuda.stream(side):
                    self.step()
            except Exception as exc:
                self.failed = exc
                self.eager()
            torch.cuda.current_stream().wait_stream(side)
        else:
            self._capture()
            self()

    def _capture(self) -> None:
        graph = torch.cuda.CUDAGraph()
        torch.cuda.empty_cache()  # as the capture itself does first, so the growth below is the graph's pool
        reserved = torch.cuda.memory_reserved()
        try:
            # thread_local: CUDA calls another thread makes meanwhile (a data loader's) are not the capture's
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                self.step()
        except Exception as exc:  # an op a graph can't hold: eager from here
            self.failed = exc
        else:
            self.graph = graph
            self.pool_bytes = max(0, torch.cuda.memory_reserved() - reserved)


class OrEager:
    """A compiled function that runs its eager form from the first call whose compiling or running raises
    (told to ``failed`` once), never a dead stage; running out of memory is not a compiler's failure."""

    def __init__(self, compiled: Callable[..., Any], eager: Callable[..., Any],
                 failed: Callable[[Exception], None]) -> None:
        self.compiled, self.eager, self.failed = compiled, eager, failed
        self.broken = False

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if not self.broken:
            try:
                return self.compiled(*args, **kwargs)
            except torch.cuda.OutOfMemoryError:
                raise
            except Exception as exc:
                self.broken = True
                self.failed(exc)
        return self.eager(*args, **kwargs)


@functools.cache
def _compiled_step() -> Callable[[Rollout], None]:
    """``Rollout.step`` compiled, made once so that later rollouts reuse what it compiled:
    its guards decide when a batch or cache width needs compiling again (from the second
    width on, one graph with the width dynamic). One graph or an error, never a silent
    break into pieces."""
    return torch.compile(Rollout.step, fullgraph=True)


def _pick(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Greedy at temperature 0; else a draw from softmax(logits / temperature) the way
    ``torch.multinomial`` draws one (the argmax of the probabilities over Exp(1) noise:
    the same tokens from the same generator state) without its check of the
    probabilities on the host, a sync each token that a CUDA graph can't hold."""
    if temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits / temperature, dim=-1)
    return (probs / torch.empty_like(probs).exponential_()).argmax(-1)


def _until_eos(row: list[int], eos: int, pad: int) -> list[int]:
    """The completion up to and including its EOS (pads dropped)."""
    if eos in row:
        return row[: row.index(eos) + 1]
    return [t for t in row if t != pad]
