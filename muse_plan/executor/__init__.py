"""The stage executor: settings, the training loop, checkpoints, runs.

``settings`` imports no torch (the CLI sizes stages with it); ``loop``,
``checkpoint`` and ``runner`` need torch and load only when a run starts.
"""
