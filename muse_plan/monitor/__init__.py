"""Watching runs: detectors and alert rules on the metric stream (``detectors``),
and the live dashboard over the store (``dashboard``). No torch at import."""
