"""The resource optimizer: memory model, throughput model, fit search, verdicts.

No torch at import: the CLI fits plans in well under a second.
"""
