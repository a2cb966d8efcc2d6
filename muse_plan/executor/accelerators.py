"""The Accelerator a stage runs under: its precision and, on several GPUs, FSDP.

A stage of its own precision, or a recovery rewrite (fp16 → bf16), gets a
new Accelerator in this process; the process group is kept. ``zero2`` /
``zero3`` / ``fsdp`` on several GPUs go through Accelerate's FSDP2 plugin.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from muse_plan.executor.prepare import stage_settings
from muse_plan.executor.settings import FSDP_SHARDING
from muse_plan.plan.spec import PlanSpec


MIXED_PRECISION = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}


def accelerator_for(current: Any, spec: PlanSpec, position: int, world_size: int, cuda: bool,
                     say: Callable[[str], None]) -> Any:
    """The Accelerator for a stage's precision and sharding: the current one when both
    match, else a new one — a stage of its own precision, or a recovery rewrite (fp16 →
    bf16) takes effect in this process, not at the next launch. The process group is
    kept. ``zero2``/``zero3``/``fsdp`` on several GPUs get Accelerate's FSDP2 plugin
    (``_fsdp_plugin``); on one process there is nothing to shard and they run as AdamW."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    s = stage_settings(spec, position, world_size, cuda)
    wanted = MIXED_PRECISION[s.precision]
    sharded = s.sharding if cuda and world_size > 1 and s.sharding in FSDP_SHARDING else None
    had = current.mixed_precision if current is not None else None
    if had == wanted and getattr(current, "muse_fsdp", None) == sharded:
        return current
    # the state is a process-wide singleton whose mixed precision can't change in
    # place (an earlier run in this process may have left another one)
    AcceleratorState._reset_state()
    from accelerate import PartialState
    from accelerate.utils import DistributedType

    partial = PartialState()
    if partial.distributed_type == DistributedType.FSDP:  # an FSDP stage's, which a new state would keep
        partial.distributed_type = DistributedType.MULTI_GPU
    if current is not None:
        say(f"stage {spec.stages[position].name} runs in {_precision_text(s.precision, sharded)} "
            f"(was {_precision_text(had, getattr(current, 'muse_fsdp', None))})")
    plugin = _fsdp_plugin(sharded, s.precision) if sharded else None
    accelerator = Accelerator(mixed_precision=wanted, cpu=not cuda, fsdp_plugin=plugin)
    accelerator.muse_fsdp = sharded
    return accelerator


def _precision_text(precision: str | None, sharded: str | None) -> str:
    return f"{precision} with {sharded} (FSDP)" if sharded else str(precision)


def _fsdp_plugin(sharding: str, precision: str) -> Any:
    """FSDP2, each transformer block a unit (named at prepare: ``optimizers.prepare``);
    zero2 keeps a block's weights gathered from forward to backward, zero3/fsdp reshard
    them. Under bf16/fp16 the gathered weights are in that dtype and gradients are
    reduced in fp32, as DDP's are; the sharded weights and AdamW stay fp32."""
    from accelerate.utils import FullyShardedDataParallelPlugin

    policy = None
    if precision != "fp32":
        from torch.distributed.fsdp import MixedPrecisionPolicy

        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
        policy = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
    return FullyShardedDataParallelPlugin(
        fsdp_version=2, reshard_after_forward=sharding != "zero2", auto_wrap_policy="transformer_based_wrap",
        state_dict_type="FULL_STATE_DICT", mixed_precision_policy=policy, cpu_ram_efficient_loading=False)
