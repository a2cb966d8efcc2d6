"""The GRPO engine's trainer: the four DeepSeek-R1 stages under the executor.

Implements the engine contract (``engines/contract.py``) for the stage kinds
``cold_start_sft``, ``reasoning_rl`` (``algorithm: grpo | s_grpo | t_spmo``),
``rejection_sampling`` and ``all_scenarios_rl``. ``STAGES`` maps a kind to
its handler; the trainer builds what they share — tokenizer, policy (the
architecture engine's decoder or a local Hugging Face model, with LoRA when
the plan asks), the problem stream and the held-out problems — and
delegates batches and losses to the handler.

Design decisions:
- Rows are the user's JSONL file (the stage's ``data``) or generated
  arithmetic (``engines/grpo/data.py``); a file's rows that can't fit the
  model's context are left out with a note (``take_notes``), all of them
  left out is an error at setup.
- Evaluation runs on a fixed set of held-out problems (the test split, the
  ``eval_data`` file or the held-out share of ``data``, never trained on),
  scored like the paper: the last number of the completion must equal the
  reference answer. Held-out rows with a completion and no answer (a
  prompt/completion SFT file) are scored by the completion's loss instead
  (``val_loss``). Both greedy accuracy and sampled
  accuracy (pass@1 at the stage's temperature, the quantity RL maximises)
  are reported: on a small model RL mostly sharpens the sampling
  distribution, which shows in the second long before the first.
- The reference policy (for the KL term) is taken when the stage's first
  batch is drawn — after the executor loaded the weights the stage starts
  from — and, without LoRA, saved in the engine's state so a resumed stage
  keeps it.
- Weights that never train — LoRA's frozen base and the KL reference copy —
  are kept in the stage's compute dtype when the executor computes in bf16
  or fp16 (``StageSetup.frozen_precision``): half the bytes of fp32, and
  autocast reads them in that dtype anyway. The adapters and a fully trained
  model keep fp32 master weights.
- LoRA stages record their adapters' scaling in ``checkpoint_meta``; the
  executor writes it into the checkpoint manifest, so the next stage can
  merge the adapters into plain weights when it trains without them.
"""

from __future__ import annotations

from typing import Any

import torch

from engines.architecture.model import DecoderLM
from engines.contract import MicroStep, StageSetup
from engines.data import load_tokenizer
from engines.grpo.data import Prompter, ProblemStream, held_out
from engines.grpo.options import parse
from engines.grpo.policy import FROZEN_DTYPES, Policy, with_lora
from engines.hf import enable_checkpointing, load_hf
from engines.grpo.rewards import Completion, correctness, format_compliance
from engines.grpo.rl import ReinforcementLearning
from engines.grpo.sft import ColdStartSft, RejectionSampling

STAGES: dict[str, Any] = {
    "cold_start_sft": ColdStartSft,
    "reasoning_rl": ReinforcementLearning,
    "rejection_sampling": RejectionSampling,
    "all_scenarios_rl": ReinforcementLearning,
}
KL_KINDS = ("reasoning_rl", "all_scenarios_rl")  # the stages whose loss has a KL term



HELD_OUT_SEED = 0  # generated held-out problems: drawn the same for every training seed


class GrpoTrainer:
    def setup(self, stage: StageSetup) -> None:
        if stage.kind not in STAGES:
            raise ValueError(f"the grpo engine runs stage kinds {', '.join(STAGES)}, not {stage.kind!r}")
        o = stage.options or parse(stage.kind, {}, {})  # the stage kind's typed options (grpo/options.py)
        self.device = torch.device(stage.device)
        self.tokenizer = load_tokenizer(stage.tokenizer)
        self.pad_id = self.tokenizer.pad_id if self.tokenizer.pad_id is not None else self.tokenizer.eos_id
        self.special = {self.tokenizer.eos_id, self.pad_id, self.tokenizer.bos_id}
        self.micro_batch = stage.micro_batch
        self.max_new_tokens = o.max_new_tokens
        model = self._build_model(stage, o.lora.quantize_base if o.lora is not None else "none")
        peft, self.checkpoint_meta = None, {}
        if o.lora is not None:
            peft, self.checkpoint_meta = with_lora(model, o.lora, stage.frozen_precision)
        self.model = model
        frozen = FROZEN_DTYPES[stage.frozen_precision]
        # full fine-tuning's fp32 weights under autocast decode from a copy in the compute dtype (policy.py);
        # where FSDP shards the parameters frozen_precision is fp32, and there is no copy
        self.policy = Policy(model, self.pad_id, self.tokenizer.eos_id, peft, frozen, stage.decode,
                             vocab=self.tokenizer.vocab_size,
                             sample_dtype=frozen if stage.decode != "eager" and frozen != torch.float32 else None)
        self.prompter = Prompter(self.tokenizer, stage.tokenizer, o.prompt_template)
        self.notes: list[str] = []
        if o.data is not None:
            train, test = o.examples(o.eval_problems)
            train = self._fitting(train, stage.model.seq_len, o.data, supervised=o.needs == "completion")
            self.stream = ProblemStream(list(o.tasks), stage.seed, stage.rank, stage.world_size, examples=train)
            self.eval_problems = self._fitting(test, stage.model.seq_len, o.eval_data or o.data, supervised=False)
        else:
            self.stream = ProblemStream(list(o.tasks), stage.seed, stage.rank, stage.world_size)
            # one test set whatever training.seed: runs of a plan under several seeds are scored alike
            self.eval_problems = held_out(list(o.tasks), HELD_OUT_SEED, o.eval_problems)
        self.eval_temperature = o.sampled_eval_temperature
        self.eval_samples = o.eval_samples
        self.handler = STAGES[stage.kind](self, o)
        self.needs_reference = getattr(o, "kl_beta", 0.0) > 0 and stage.kind in KL_KINDS

    def _build_model(self, stage: StageSetup, quantize: str = "none") -> torch.nn.Module:
        if stage.family == "hf":
            if not stage.init_from:
                raise ValueError("a Hugging Face policy needs model.init_from: a local model directory")
            model = load_hf(stage.init_from, stage.device, quantize)
            if stage.activation_checkpointing != "none":
                enable_checkpointing(model)
            return model
        if self.tokenizer.vocab_size > stage.model.vocab_size:
            raise ValueError(f"tokenizer {stage.tokenizer!r} has {self.tokenizer.vocab_size} tokens but the "
                             f"model's vocab_size is {stage.model.vocab_size}")
        model = DecoderLM(stage.model).to(self.device)
        model.set_checkpointing(stage.activation_checkpointing)
        return model

    def _fitting(self, rows: list[Any], context: int, name: str, supervised: bool) -> list[Any]:
        """The rows whose prompt (and, for a supervised stage, completion) fit ``context``."""
        def length(row: Any) -> int:
            return len(self.prompter.ids(row)) + (len(self.prompter.target(row)) - 1 if supervised else 0)

        kept = [row for row in rows if length(row) < context]
        if not kept:
            raise ValueError(f"{name}: no example fits the model's context of {context} tokens "
                             f"({rows[0].where}: {length(rows[0])} tokens); raise model.seq_len")
        if len(kept) < len(rows):
            first = next(row for row in rows if length(row) >= context)
            self.notes.append(f"{name}: {len(rows) - len(kept)} of {len(rows)} examples left out, longer than the "
                              f"model's context of {context} tokens (the first: {first.where})")
        return kept

    def take_notes(self) -> list[str]:
        rewards = getattr(self.handler, "rewards", None)
        notes = self.notes + self.policy.take_notes() + (rewards.take_notes() if rewards is not None else [])
        self.notes = []
        return notes

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode([i for i in ids if i not in self.special])

    def next_batch(self) -> Any:
        if self.needs_reference:
            self.policy.snapshot_reference()  # the stage's starting weights, once
        return self.handler.next_batch()

    def micro_step(self, batch: Any) -> MicroStep:
        return self.handler.micro_step(batch)

    def skip_batches(self, n: int) -> None:
        """Leave out the problems of ``n`` batches without sampling them (a recovery's skipped window:
        drawing them would roll out, or sample for rejection, only to drop the result)."""
        skip = getattr(self.handler, "skip", None)
        if skip is not None:  # RL: its own bookkeeping of rollouts that serve several updates
            skip(n)
            return
        for _ in range(n):  # a batch is one draw of micro_batch problems
            self.stream.take(self.micro_batch)

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Held-out accuracy, greedy (``test_accuracy``) and sampled at the stage's
        temperature, ``eval_samples`` per problem (``test_accuracy_sampled``: the
        pass@1 RL optimises); ``val_loss`` on held-out completions without an answer."""
        metrics: dict[str, float] = {}
        if any(p.answer is not None for p in self.eval_problems):
            greedy, formatted = self._score(0.0, 1)
            sampled, _ = self._score(self.eval_temperature, self.eval_samples)
            metrics.update(test_accuracy=greedy, test_format=formatted, test_accuracy_sampled=sampled)
        if any(p.answer is None and p.completion for p in self.eval_problems):
            metrics["val_loss"] = self._completion_loss()
        return metrics

    def _score(self, temperature: float, samples: int, batch: int = 64) -> tuple[float, float]:
        right = formatted = 0.0
        problems = [p for p in self.eval_problems if p.answer is not None for _ in range(samples)]
        for i in range(0, len(problems), batch):
            chunk = problems[i:i + batch]
            outs = self.policy.sample([self.prompter.ids(p) for p in chunk], self.max_new_tokens, temperature)
            for p, c in zip(chunk, outs):
                judged = self.judged(p, c)
                right += correctness(judged)
                formatted += format_compliance(judged)
        n = max(1, len(problems))
        return right / n, formatted / n

    def judged(self, example: Any, completion: list[int], given: list[int] | None = None) -> Completion:
        """A sampled completion (after ``given`` tokens of it, a replay's prefix) as the rewards see it."""
        tokens = (given or []) + completion
        return Completion(self.decode(tokens), example.answer, len(tokens), self.max_new_tokens,
                          self.prompter.text(example), example.row)

    def _completion_loss(self, batch: int = 16) -> float:
        from engines.grpo.data import sft_batch

        rows = [p for p in self.eval_problems if p.answer is None and p.completion]
        total = count = 0.0
        for i in range(0, len(rows), batch):
            pairs = [(self.prompter.ids(p), self.prompter.target(p)) for p in rows[i:i + batch]]
            x, y = sft_batch(self.tokenizer, pairs, self.pad_id, self.device)
            logits = self.policy.logits(x, self.model).float()
            total += float(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1),
                                                             ignore_index=-1, reduction="sum"))
            count += float((y >= 0).sum())
        return total / max(count, 1.0)

    def summary(self) -> dict[str, float]:
        return {"eval_problems": float(len(self.eval_problems))}

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"stream": self.stream.state_dict()}
        if hasattr(self.handler, "state_dict"):
            state["handler"] = self.handler.state_dict()
        if self.policy.reference is not None:
            state["reference"] = {k: v.detach().cpu() for k, v in self.policy.reference.state_dict().items()}
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.stream.load_state_dict(state["stream"])
        if "handler" in state:
            self.handler.load_state_dict(state["handler"])
        if "reference" in state:
            self.policy.snapshot_reference()
            self.policy.reference.load_state_dict(state["reference"])
