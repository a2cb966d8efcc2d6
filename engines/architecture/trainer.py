"""The architecture engine's trainer: next-token prediction on packed text.

Implements the engine contract (``engines/contract.py``) for the stage kinds
pretrain, continue and finetune. The executor owns the loop; this class
builds the ``DecoderLM`` and the corpus, hands out micro-batches, computes a
micro-batch's cross-entropy, evaluates on fixed held-out batches and keeps
the data position as its resumable state.

Design decisions:
- Generated arithmetic covers the stage's ``options.tasks`` (its typed
  ``ArchitectureOptions``) when given
  (e.g. ``[multiplication:2x1]``), else the default mix. A finetune stage
  with ``options.data`` trains on the user's JSONL examples instead, the
  loss on the completions only (``engines/data/sft.py``).
- The tokenizer's vocabulary must fit the model's (a byte tokenizer needs
  vocab_size >= 260); a mismatch is refused at setup with both numbers.
- Validation batches are the first windows of the held-out stream, the same
  on every evaluation and every process, so val losses are comparable along
  a run and across resumes.
- ``summary`` reports the unigram model's loss on the same validation data:
  the floor a model that ignores context would reach, printed next to the
  trained model's loss so a user can see it learned something.
- The model is muse's ``DecoderLM``, or with ``family: hf`` the local
  Hugging Face causal LM of ``init_from`` (``engines/hf.py``), trained on the
  same batches with the same loss: the logits of the tokens, cross-entropy
  against the next ones (the HF model's own shifted-label loss is not used,
  so both families see exactly one definition of the objective). An HF
  model's loss goes through its output head a chunk of tokens at a time
  (``engines/grpo/logprobs.cross_entropy``), so no tokens × vocabulary logits
  are kept for backward; muse's decoder's compiled loss head keeps them in
  the compute dtype.
- A continue or finetune stage with LoRA (``options.lora``) trains adapters
  through peft (``engines/grpo/policy.add_lora``, the GRPO engine's too), its
  frozen base kept in the stage's frozen precision; each checkpoint records
  the adapters' scaling so the next stage, or an export, can merge them.
"""

from __future__ import annotations

from typing import Any

import torch

from engines.architecture.model import DecoderLM
from engines.architecture.options import ArchitectureOptions
from engines.contract import MicroStep, StageSetup
from engines.data import BatchSampler, build_corpus, eval_batches, load_tokenizer, unigram_loss
from engines.data.corpus import Corpus
from engines.data.sft import MaskedStream


class ArchitectureTrainer:
    def setup(self, stage: StageSetup) -> None:
        config = stage.model
        options = stage.options or ArchitectureOptions()
        tokenizer = load_tokenizer(stage.tokenizer)
        if tokenizer.vocab_size > config.vocab_size:
            raise ValueError(
                f"tokenizer {stage.tokenizer!r} has {tokenizer.vocab_size} tokens but the model's "
                f"vocab_size is {config.vocab_size}; set model.vocab_size to at least {tokenizer.vocab_size}"
            )
        self.device = torch.device(stage.device)
        self.micro_batch = stage.micro_batch
        self.notes: list[str] = []
        if options.data is not None:  # the user's examples, the loss on their completions
            self.corpus = self._examples(options, tokenizer, stage)
        else:
            self.corpus = build_corpus(
                stage.data_source, tokenizer, seed=stage.seed, val_fraction=stage.val_fraction,
                cache_dir=stage.cache_dir, min_tokens=stage.tokens_needed,
                **({"tasks": list(options.tasks)} if options.tasks else {}),
            )
        self.sampler = BatchSampler(
            self.corpus.train, seq_len=config.seq_len, seed=stage.seed,
            rank=stage.rank, world_size=stage.world_size,
        )
        self.sampler.require(stage.micro_batch)
        self.val = eval_batches(self.corpus.val, config.seq_len, stage.micro_batch, stage.eval_batches)
        self.hf = stage.family == "hf"
        self.heads: Any = None
        if self.hf:
            from engines.grpo.logprobs import HeadCheck

            self.heads = HeadCheck()  # whether the HF model's loss may go through its head in chunks
        quantized = options.lora is not None and options.lora.quantize_base == "4bit"
        if quantized and not self.hf:
            raise ValueError("a 4-bit (QLoRA) base is loaded from a Hugging Face model: model.family hf")
        if self.hf:
            from engines.hf import enable_checkpointing, load_hf

            self.model = load_hf(stage.init_from or "", str(self.device), "4bit" if quantized else "none")
            if stage.activation_checkpointing != "none":
                enable_checkpointing(self.model)
        else:
            self.model = DecoderLM(config).to(self.device)
            self.model.set_checkpointing(stage.activation_checkpointing)
        self.checkpoint_meta: dict[str, Any] = {}
        if options.lora is not None:
            from engines.grpo.policy import with_lora

            _, self.checkpoint_meta = with_lora(self.model, options.lora, stage.frozen_precision)

    def _examples(self, options: ArchitectureOptions, tokenizer: Any, stage: StageSetup) -> Corpus:
        """The stage's JSONL examples as masked streams (``engines/data/sft.py``): train and
        held out, the rows longer than the context left out with a note."""
        from engines.data.examples import Prompter
        from engines.data.sft import example_stream

        prompter = Prompter(tokenizer, stage.tokenizer, options.prompt_template)
        pad = tokenizer.pad_id if tokenizer.pad_id is not None else tokenizer.eos_id
        streams = []
        for rows, name in zip(options.examples(), (options.data, options.eval_data or options.data)):
            pairs = [(prompter.ids(r), prompter.target(r)) for r in rows if r.completion]
            fitting = [p for p in pairs if len(p[0]) + len(p[1]) <= stage.model.seq_len + 1]
            if not fitting:
                raise ValueError(f"{name}: no example with a completion fits the model's context of "
                                 f"{stage.model.seq_len} tokens; raise model.seq_len")
            if len(fitting) < len(pairs):
                self.notes.append(f"{name}: {len(pairs) - len(fitting)} of {len(pairs)} examples left out, longer "
                                  f"than the model's context of {stage.model.seq_len} tokens")
            streams.append(example_stream(fitting, stage.model.seq_len, pad, options.packing))
        return Corpus(streams[0], streams[1], tokenizer.vocab_size, f"examples of {options.data}")

    def take_notes(self) -> list[str]:
        notes, self.notes = self.notes, []
        if self.heads is not None:
            notes, self.heads.notes = notes + self.heads.notes, []
        return notes

    def _loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if not self.hf:
            return self.model(x, y)[1]
        from engines.grpo.logprobs import cross_entropy

        return cross_entropy(self.model, x, y, self.heads)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.sampler.next_batch(self.micro_batch)
        return x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)

    def micro_step(self, batch: tuple[torch.Tensor, torch.Tensor]) -> MicroStep:
        x, y = batch  # (B, T) each
        return MicroStep(loss=self._loss(x, y), tokens=x.numel())

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        was_training = self.model.training
        self.model.eval()
        total = torch.zeros((), device=self.device)
        for x, y in self.val:
            total += self._loss(x.to(self.device), y.to(self.device)).float()
        self.model.train(was_training)
        return {"val_loss": (total / len(self.val)).item()}

    def summary(self) -> dict[str, float]:
        if isinstance(self.corpus.train, MaskedStream):  # examples: a unigram floor over padding means nothing
            return {"examples_windows": float(self.corpus.train.windows(self.sampler.seq_len))}
        return {"unigram_val_loss": unigram_loss(self.corpus.train, self.corpus.val, self.corpus.vocab_size)}

    def state_dict(self) -> dict[str, Any]:
        return {"sampler": self.sampler.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sampler.load_state_dict(state["sampler"])
