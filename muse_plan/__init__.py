"""muse: plan mode for LLM training runs.

The orchestrator package. Nothing here imports torch at module level: the
CLI's non-training commands must start fast (DESIGN.md, Conventions).
"""

__version__ = "0.1.0"
