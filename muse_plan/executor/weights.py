"""Weights from one stage into the next stage's model, across LoRA boundaries.

A LoRA stage's checkpoint holds its frozen base (``X.base_layer.weight``)
and adapters (``X.lora_A.default.weight``, ``X.lora_B.default.weight``); a
plain stage's holds ``X.weight``. The next stage may be either:

- LoRA → LoRA: keys match; the adapters continue where they were.
- plain → LoRA: ``X.weight`` goes to ``X.base_layer.weight``; the adapters
  start fresh (B = 0, so the model computes what the source did).
- LoRA → plain: the adapters are merged, W = W₀ + s·B·A with s = α/r, the
  scaling recorded in the source's manifest (``lora_scaling``).

Anything else that does not fit is an error naming the keys.
"""

from __future__ import annotations

import torch

_BASE = ".base_layer.weight"
_A, _B = ".lora_A.default.weight", ".lora_B.default.weight"


def fit_keys(source: dict[str, torch.Tensor], target_keys: set[str],
             lora_scaling: float | None) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for key, value in source.items():
        if key.endswith(_BASE):
            module = key[: -len(_BASE)]
            if key in target_keys:
                out[key] = value
                continue
            a, b = source.get(module + _A), source.get(module + _B)
            if a is not None and b is not None:
                if lora_scaling is None:
                    raise ValueError(f"{module}: LoRA adapters without a recorded scaling can't be merged")
                # in fp32: a bf16 base (kept so under LoRA) would round a small update away
                value = value.float() + lora_scaling * (b.float() @ a.float())
            out[module + ".weight"] = value
        elif key.endswith((_A, _B)):
            if key in target_keys:
                out[key] = value
        elif key not in target_keys and key.endswith(".weight") and key[:-7] + _BASE in target_keys:
            out[key[:-7] + _BASE] = value
        else:
            out[key] = value
    return out


def load_into(model: torch.nn.Module, source: dict[str, torch.Tensor],
              lora_scaling: float | None) -> tuple[list[str], list[str]]:
    """Load ``source`` into ``model``; (missing, unexpected) keys, where fresh adapters
    and the second name of a tied weight don't count as missing."""
    target = model.state_dict()
    fitted = fit_keys(source, set(target), lora_scaling)
    missing, unexpected = model.load_state_dict(fitted, strict=False)
    loaded = {target[k].data_ptr() for k in fitted if k in target}
    missing = [k for k in missing if "lora_" not in k and target[k].data_ptr() not in loaded]
    return missing, list(unexpected)
