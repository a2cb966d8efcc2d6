"""The architecture engine's model half: a decoder-only LM with pluggable residuals.

``ModelConfig`` and ``param_count`` (config.py) import no torch, so planners can
size models cheaply; ``DecoderLM`` (model.py) is the nanoGPT-style model, and
``RESIDUALS`` / ``sinkhorn`` (residual.py) hold the residual modes standard,
hc, mhc, ddl and mgt with the equations each implements. The torch-backed
names load on first access, so importing this package (or its config) stays
torch-free for the CLI.
"""

from __future__ import annotations

from typing import Any

from engines.architecture.config import ModelConfig, param_count

__all__ = ["ModelConfig", "DecoderLM", "param_count", "RESIDUALS", "sinkhorn"]

_LAZY = {"DecoderLM": "model", "RESIDUALS": "residual", "sinkhorn": "residual"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"engines.architecture.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'engines.architecture' has no attribute {name!r}")
