"""Compiled training: the model's repeated blocks under ``torch.compile``, with a way back.

Design decisions:
- **Regional, in place.** Each block of the model's repeated ``blocks`` /
  ``layers`` ModuleList (muse's decoder, a Hugging Face decoder's layers) is
  compiled with ``Module.compile()``: every block has the same code, so
  Inductor compiles one graph and reuses it, the first step costs seconds
  rather than the minutes a whole-model graph can, and activation
  checkpointing, LoRA adapters inside a block, DDP and FSDP (which wrap or
  shard around the blocks) keep working as they do eager. ``Module.compile``
  changes no parameter name, so checkpoints, resume and export are the same
  files as an eager run's.
- **The loss head too.** muse's decoder's ``head`` (final norm, logits,
  cross-entropy) is compiled as one more region: eager, the (B·T × vocab)
  logits go through float32 casts and separate softmax passes each way, 4 ms
  of a 112 ms step of the 350M decoder on an H100. Not under FSDP, whose
  root module owns the head's parameters.
- **Or the whole model** (``training.compile_scope: model``): one graph for
  the forward (embedding, every block, the loss head) and one for the
  backward, with no launches of the host between the blocks' kernels. It
  costs a longer first step (a graph 24 blocks long) and recompiles for the
  evaluation's no-grad forward; ``Module.compile`` again, so nothing is
  renamed. FSDP and ZeRO-3 shard around the blocks: they compile blocks.
  Measured through ``muse plan run`` (350M, H100, docs/bench_plan_run.md):
  164,981 tokens/s against the blocks' 163,863 (+0.7%), for a first step of
  61.8 s against 11.6 s (6.5 s on a second run with the cache); after the
  loop's fixes of session 23, 96.2 ms a step both (first step 53.7 s against
  11.9; docs/bench_plan_run_pinned.json), so ``auto`` compiles blocks.
- **Which stages.** ``training.compile: auto`` compiles the architecture
  engine's stages (pretrain, continue, finetune) on a GPU; ``on`` compiles
  them on any device; ``off`` never. The GRPO engine's stages train eager
  (their updates see a new shape each rollout); the setting decides how their
  sampling decodes instead (``settings.decoding``: a CUDA graph of the decode
  step under ``auto``, compiled and captured under ``on``).
- **Inductor's cache** lives under ``$MUSE_HOME/cache/inductor`` (unless the
  user set ``TORCHINDUCTOR_CACHE_DIR``), so a resumed or repeated run reuses
  what the first one compiled.
- **A compile failure is not a dead run.** Compilation happens in the first
  step's forward; if that step raises, the blocks are put back to eager, the
  data position and the random generators are rewound to where the step
  started, and the step runs again eagerly; the run records why
  (``Compiled.fallback``). Where the eager step fails too and the model's
  connections ran fused Triton kernels (``training.fused_kernels``, on by
  default for ddl and a bf16 mhc / mgt state on a GPU), it runs once more with
  torch's connections, said in the same event; any other error the eager step
  raises is the run's.
- ``MUSE_COMPILE_BACKEND`` picks another backend (``aot_eager`` to tell a
  graph problem from a code-generation one; ``eager`` to trace only);
  ``training.cuda_graphs`` (``settings.uses_cuda_graphs``) compiles with
  Inductor's ``reduce-overhead`` mode: each region's kernels replayed from CUDA
  graphs, the loop marking each micro-step's start.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from engines.architecture.model import DecoderLM
from engines.architecture.residual import torch_connections

BLOCK_LISTS = ("blocks", "layers", "h")


def blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The model's repeated blocks: the children of its ``blocks`` / ``layers`` ModuleList."""
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and name.rsplit(".", 1)[-1] in BLOCK_LISTS and len(module):
            return list(module)
    return []


@dataclass
class Compiled:
    """The blocks compiled for one stage, and what happened to them."""

    modules: list[torch.nn.Module] = field(default_factory=list)
    backend: str = "inductor"
    head_of: torch.nn.Module | None = None  # the model whose ``head`` is compiled too
    first_step_s: float | None = None
    fallback: str | None = None  # why the stage went back to eager
    evaluated: bool = False  # the first evaluation (its own no-grad graph) has compiled
    scope: str = "blocks"  # blocks | model (training.compile_scope)
    mode: str | None = None  # Inductor's mode (reduce-overhead: training.cuda_graphs); None: its default

    @property
    def graphs(self) -> bool:
        """Whether the compiled regions replay CUDA graphs, whose outputs the next step's replay
        overwrites: the loop marks where each step begins."""
        return self.active and self.mode == "reduce-overhead"

    @property
    def active(self) -> bool:
        return bool(self.modules) and self.fallback is None

    def undo(self, why: str) -> None:
        for module in self.modules:
            module._compiled_call_impl = None  # what Module.compile() set: back to eager
        if self.head_of is not None:
            del self.head_of.head  # the instance's compiled function: the method again
            self.head_of = None
        self.fallback = why

    def describe(self) -> str:
        graphs = ", replayed from CUDA graphs" if self.graphs else ""
        if self.scope == "model":
            return "the whole model" + graphs
        return f"{len(self.modules)} blocks" + (" and the loss head" if self.head_of is not None else "") + graphs


def compile_model(model: torch.nn.Module, cache_dir: Path, scope: str = "blocks", head: bool = True,
                  graphs: bool = False) -> Compiled:
    """Compile ``model`` in place: as one graph (``scope="model"``), or each of its
    blocks and muse's decoder's loss head when ``head``; an empty ``Compiled`` when
    blocks were asked for and it has none. ``graphs``: the regions replay CUDA graphs
    (``settings.uses_cuda_graphs``, which never asks where a step sums micro-steps)."""
    found = [model] if scope == "model" else blocks(model)
    if not found:
        return Compiled(fallback="no repeated blocks to compile")
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache_dir))
    backend = os.environ.get("MUSE_COMPILE_BACKEND", "inductor")
    mode = "reduce-overhead" if graphs else None
    compiled = Compiled(found, backend, scope=scope, mode=mode)
    options = {"mode": mode} if mode else {}
    try:
        for module in found:
            module.compile(backend=backend, **options)
        if scope == "model":
            return compiled
        if head and isinstance(model, DecoderLM):
            model.head = torch.compile(model.head, backend=backend, **options)  # an instance attribute over the method
            compiled.head_of = model
    except Exception as exc:  # an unknown backend, a torch without dynamo: eager, said so
        compiled.undo(why(exc))
    return compiled


def first_call(compiled: Compiled | None, trainer: Any, fn: Any) -> tuple[Any, str | None]:
    """``fn()`` — a stage's first compiled step or evaluation — and, when compiling it
    failed, the reason after ``fn()`` ran again eagerly from the same data and generators;
    where that failed too and connections ran fused kernels (``training.fused_kernels``),
    once more with torch's connections, the same function. Each retry starts from no
    gradients: a backward that failed part way may have left some."""
    if compiled is None or not compiled.active:
        return fn(), None
    # the step and the evaluation compile once each; only those first calls need the rewind
    from muse_plan.executor.loop import Fault

    saved = rewindable(trainer)
    try:
        return fn(), None
    except (Fault, KeyboardInterrupt, torch.cuda.OutOfMemoryError, MemoryError):
        raise
    except Exception as exc:  # whatever compiling raised: the stage goes on eager
        reason = why(exc)
        compiled.undo(reason)
        rewind(trainer, saved, compiled.modules)
    try:
        return fn(), reason
    except (Fault, KeyboardInterrupt, torch.cuda.OutOfMemoryError, MemoryError):
        raise
    except Exception as again:  # eager failed too: the connections' fused kernels, if any, go
        if not torch_connections(compiled.modules):
            raise
        rewind(trainer, saved, compiled.modules)
        return fn(), f"{reason}; eager, the fused connection kernels failed too ({why(again)}): " \
                     "the connections run in torch's ops"


def rewindable(trainer: Any) -> dict[str, Any]:
    """What a step changes outside the weights: the data position and the generators."""
    from muse_plan.executor import checkpoint

    return {"engine": trainer.state_dict(), "rng": checkpoint.rng_state()}


def rewind(trainer: Any, state: dict[str, Any], modules: Sequence[torch.nn.Module] = ()) -> None:
    """The data position and generators back to ``state``, and no gradient on the trainer's model
    or ``modules``."""
    from muse_plan.executor import checkpoint

    trainer.load_state_dict(state["engine"])
    checkpoint.set_rng_state(state["rng"])
    model = getattr(trainer, "model", None)
    for module in [*modules, *([model] if isinstance(model, torch.nn.Module) else [])]:
        for param in module.parameters():
            param.grad = None


def why(exc: BaseException) -> str:
    """One line: the exception's type and the first line of its message."""
    inner = getattr(exc, "inner_exception", None)  # dynamo's BackendCompilerFailed: what the backend raised
    if isinstance(inner, BaseException):
        return f"{type(exc).__name__}: {why(inner)}"
    text = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    return f"{type(exc).__name__}: {text[0][:200]}" if text else type(exc).__name__
