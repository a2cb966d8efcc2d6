"""One candidate training configuration: what the memory and throughput models
price and the fit search varies. Plain dataclasses, no torch, no pydantic.

Conventions shared by every model in this package:
- ``precision`` is how the executor trains: ``fp32``; ``bf16``/``fp16`` are
  autocast over fp32 parameters (the parameters are the fp32 master weights,
  so there is no separate master copy), gradients in fp32.
- ``sharding``: ``none`` (one process), ``ddp`` (replicas), ``zero1``
  (optimizer state sharded), ``zero2`` (+ gradients), ``zero3``/``fsdp``
  (+ parameters); sharded terms are divided by ``world_size``.
- ``offload``: ``optimizer`` moves optimizer state to host RAM; ``parameters``
  moves parameters and optimizer state.
- Sizes are bytes (ints); the CLI turns them into GiB.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from engines.architecture.config import ModelConfig

PRECISIONS = ("fp32", "bf16", "fp16")
CHECKPOINTING = ("none", "selective", "full")
SHARDING = ("none", "ddp", "zero1", "zero2", "zero3", "fsdp")
FSDP_SHARDING = ("zero2", "zero3", "fsdp")  # on several processes, FSDP wraps the model (executor/accelerators.py)
OFFLOAD = ("none", "optimizer", "parameters")
OPTIMIZERS = ("adamw", "adamw_8bit")


@dataclass(frozen=True)
class LoraConfig:
    rank: int = 8
    target_modules: tuple[str, ...] = ("q_proj", "v_proj")  # q_proj k_proj v_proj o_proj gate_proj up_proj down_proj
    layers_fraction: float = 1.0  # last share of layers adapted
    quantize_base: str = "none"  # none | 4bit (QLoRA: NF4 base, bf16 compute)


@dataclass(frozen=True)
class GenerationConfig:
    """The GRPO stages' sampling step: G completions per prompt, KV cache, a reference model."""

    prompts: int = 1  # prompts per micro-batch
    group_size: int = 8  # G completions per prompt
    prompt_tokens: int = 128
    completion_tokens: int = 300
    reference_model: bool = True  # a frozen copy for the KL term
    decode: str = "eager"  # eager | graphs | compiled: how decode steps run (executor/settings.decoding)


@dataclass(frozen=True)
class TrainConfig:
    model: ModelConfig
    micro_batch: int = 8  # sequences per process per micro-step
    grad_accum: int = 1
    world_size: int = 1  # processes (GPUs)
    precision: str = "bf16"
    checkpointing: str = "none"
    sharding: str = "none"
    offload: str = "none"
    optimizer: str = "adamw"
    lora: LoraConfig | None = None
    generation: GenerationConfig | None = None
    compiled: bool = False  # the blocks under torch.compile (training.compile)
    compiled_head: bool = False  # muse's decoder's loss head compiled too, where FSDP does not wrap the model
    hf: bool = False  # a Hugging Face model: its compiled blocks' saved bytes not measured (priced as eager)
    chunked_loss: bool = False  # the loss through the output head a chunk of tokens at a time (the GRPO
    # engine's stages; a Hugging Face model's in the architecture engine)
    cuda_graphs: bool = False  # the compiled regions replayed from CUDA graphs (training.cuda_graphs)

    def __post_init__(self) -> None:
        for name, allowed in (("precision", PRECISIONS), ("checkpointing", CHECKPOINTING),
                              ("sharding", SHARDING), ("offload", OFFLOAD), ("optimizer", OPTIMIZERS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} {getattr(self, name)!r} is not one of {', '.join(allowed)}")

    @property
    def global_batch(self) -> int:
        return self.micro_batch * self.grad_accum * self.world_size

    @property
    def tokens_per_step(self) -> int:
        return self.global_batch * self.model.seq_len

    def with_(self, **changes: object) -> TrainConfig:
        return replace(self, **changes)
