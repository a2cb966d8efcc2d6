"""The growth engine: train a small decoder, grow it, continue training the large one.

Modules, each with its equations and decisions in its docstring:
``schedule`` (no torch: options, which operator joins which shapes,
CompoundGrow's shapes, G_stack's timing rule, the re-warmup), ``depth``
(G_stack stacking, layer duplication, identity new blocks for every residual
mode), ``width`` (Net2Net widening of the stream, heads and MLP),
``context`` (longer context, rotary scaling), ``ligo`` (the learned linear
growth operator), ``operators`` (the ``GROWTH_OPERATORS`` registry,
``grow``, and ``MOMENT_MAPS``: AdamW's moments through the same operators for
``optimizer_state: mapped``) and ``stage`` (what the runner's grow stage calls).

Importing this package imports no torch; the torch-backed names load on
first access, so the planner can use ``schedule`` from the CLI.
"""

from __future__ import annotations

from typing import Any

from engines.growth.schedule import OPERATORS, GrowSettings, check_growth, compound_shapes, grow_settings

__all__ = ["OPERATORS", "GrowSettings", "check_growth", "compound_shapes", "grow_settings",
           "GROWTH_OPERATORS", "grow", "deepen", "widen", "extend_context"]

_LAZY = {"GROWTH_OPERATORS": "operators", "grow": "operators", "deepen": "depth", "widen": "width",
         "extend_context": "context"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"engines.growth.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'engines.growth' has no attribute {name!r}")
