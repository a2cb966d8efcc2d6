"""Weights from one stage into the next stage's model, across LoRA boundaries.

A LoRA stage's checkpoint holds its frozen base (``X.base_layer.weight``)
and adapters (``X.lora_A.default.weight``, ``X.lora_B.default.weight``); a
plain stage's holds ``X.weight``; a 4-bit (QLoRA) stage's holds the adapters
only (``adapter_state``: its base is ``model.init_from``'s, which the next
model was built from). The next stage may be:

- LoRA → LoRA, same adapters: keys match; the adapters continue where they were.
- plain → LoRA: ``X.weight`` goes to ``X.base_layer.weight``; the adapters
  start fresh (B = 0, so the model computes what the source did).
- LoRA → plain, or onto a module the next stage puts no adapter on: the
  adapters are merged, W = W₀ + s·B·A with s = α/r, the scaling recorded in
  the source's manifest (``lora_scaling``), W₀ the source's base or, for an
  adapters-only source, the weight the next model already holds.

Anything else that does not fit is an error naming the keys; a merge into a
4-bit base (which can't take one) is an error saying so.
"""

from __future__ import annotations

import torch

_BASE = ".base_layer.weight"
_A, _B = ".lora_A.default.weight", ".lora_B.default.weight"


def is_adapter(key: str) -> bool:
    return key.endswith((_A, _B))


def adapter_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A LoRA model's adapters only: what a 4-bit stage's checkpoint holds."""
    return {k: v.detach().contiguous() for k, v in model.state_dict().items() if is_adapter(k)}


def _merged(module: str, base: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
            lora_scaling: float | None) -> torch.Tensor:
    if lora_scaling is None:
        raise ValueError(f"{module}: LoRA adapters without a recorded scaling can't be merged")
    if not base.is_floating_point() or base.numel() != b.size(0) * a.size(1):
        raise ValueError(f"{module}: its adapters can't be merged into a 4-bit (packed) base; give this stage "
                         "the same LoRA as the stage it starts from")
    # in fp32: a bf16 base (kept so under LoRA) would round a small update away
    return base.float() + lora_scaling * (b.float() @ a.float())


def fit_keys(source: dict[str, torch.Tensor], target: dict[str, torch.Tensor],
             lora_scaling: float | None) -> dict[str, torch.Tensor]:
    """``source`` renamed (and merged) to ``target``'s keys."""
    out: dict[str, torch.Tensor] = {}
    modules = {k[: -len(_A)] for k in source if k.endswith(_A)}
    for module in modules:  # the adapters: continued where the target has them, else merged
        a, b = source[module + _A], source.get(module + _B)
        if b is None:
            raise ValueError(f"{module}: lora_A without lora_B")
        if module + _A in target:
            out[module + _A], out[module + _B] = a, b
            if module + _BASE in source:
                out[module + _BASE] = source[module + _BASE]
            continue
        into = module + _BASE if module + _BASE in target else module + ".weight"
        base = source.get(module + _BASE, target.get(into))
        if base is None:
            raise ValueError(f"{module}: the adapters have no weight to merge into in this model")
        out[into] = _merged(module, base, a, b, lora_scaling)
    for key, value in source.items():
        if is_adapter(key) or (key.endswith(_BASE) and key[: -len(_BASE)] in modules):
            continue
        if key.endswith(_BASE) and key not in target:
            out[key[: -len(_BASE)] + ".weight"] = value
        elif key not in target and key.endswith(".weight") and key[:-7] + _BASE in target:
            out[key[:-7] + _BASE] = value
        else:
            out[key] = value
    return out


def load_into(model: torch.nn.Module, source: dict[str, torch.Tensor],
              lora_scaling: float | None, adapters_only: bool = False) -> tuple[list[str], list[str]]:
    """Load ``source`` into ``model``; (missing, unexpected) keys, where fresh adapters
    and the second name of a tied weight don't count as missing — nor, for an
    ``adapters_only`` source, the base the model already holds."""
    target = model.state_dict()
    fitted = fit_keys(source, target, lora_scaling)
    missing, unexpected = model.load_state_dict(fitted, strict=False)
    if adapters_only:
        return [], list(unexpected)
    loaded = {target[k].data_ptr() for k in fitted if k in target}
    missing = [k for k in missing if "lora_" not in k and target[k].data_ptr() not in loaded]
    return missing, list(unexpected)
