"""muse's bundled PyTorch engines, importable without the CLI or the store.

Each engine exposes a trainer that follows the engine contract in DESIGN.md
(``setup``, ``step``, ``state_dict``/``load_state_dict``, ``evaluate``); the
executor in ``muse_plan.executor`` owns time. The engines arrive with their
own issues: architecture (decoder LM with hc/mhc/ddl/mgt residuals), grpo,
growth and rkdo. Until then the package is empty on purpose.
"""
