"""The GRPO engine's trainer: the four DeepSeek-R1 stages under the executor.

Implements the engine contract (``engines/contract.py``) for the stage kinds
``cold_start_sft``, ``reasoning_rl`` (``algorithm: grpo | s_grpo | t_spmo``),
``rejection_sampling`` and ``all_scenarios_rl``. ``STAGES`` maps a kind to
its handler; the trainer builds what they share — tokenizer, policy (the
architecture engine's decoder or a local Hugging Face model, with LoRA when
the plan asks), the problem stream and the held-out problems — and
delegates batches and losses to the handler.

Design decisions:
- Evaluation runs on a fixed set of held-out problems (the test split,
  never trained on), scored like the paper: the last integer of the
  completion must equal the answer. Both greedy accuracy and sampled
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
from engines.grpo.data import ProblemStream, held_out, prompt_ids
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
        self.policy = Policy(model, self.pad_id, self.tokenizer.eos_id, peft, FROZEN_DTYPES[stage.frozen_precision])
        self.stream = ProblemStream(list(o.tasks), stage.seed, stage.rank, stage.world_size)
        self.eval_problems = held_out(list(o.tasks), stage.seed, o.eval_problems)
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

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode([i for i in ids if i not in self.special])

    def next_batch(self) -> Any:
        if self.needs_reference:
            self.policy.snapshot_reference()  # the stage's starting weights, once
        return self.handler.next_batch()

    def micro_step(self, batch: Any) -> MicroStep:
        return self.handler.micro_step(batch)

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Held-out accuracy, greedy (``test_accuracy``) and sampled at the stage's
        temperature, ``eval_samples`` per problem (``test_accuracy_sampled``: the
        pass@1 RL optimises)."""
        greedy, formatted = self._score(0.0, 1)
        sampled, _ = self._score(self.eval_temperature, self.eval_samples)
        return {"test_accuracy": greedy, "test_format": formatted, "test_accuracy_sampled": sampled}

    def _score(self, temperature: float, samples: int, batch: int = 64) -> tuple[float, float]:
        right = formatted = 0.0
        problems = [p for p in self.eval_problems for _ in range(samples)]
        for i in range(0, len(problems), batch):
            chunk = problems[i:i + batch]
            outs = self.policy.sample([prompt_ids(self.tokenizer, p) for p in chunk], self.max_new_tokens,
                                      temperature)
            for p, c in zip(chunk, outs):
                judged = Completion(self.decode(c), p.answer, len(c), self.max_new_tokens)
                right += correctness(judged)
                formatted += format_compliance(judged)
        n = max(1, len(problems))
        return right / n, formatted / n

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
