"""The RKDO engine: representation learning by recursive KL divergence optimisation.

RKDO (Martin, arXiv 2504.21707) against the static I-Con objective
(Alshammari et al., ICLR 2025) on the same encoder, data and budget:

- ``objective.py``: the pure core — the KL over neighbourhoods, I-Con's
  debiased positive pair, the recursion p⁽ᵗ⁾ = (1−α)p⁽ᵗ⁻¹⁾ + αq⁽ᵗ⁻¹⁾ unrolled
  to a depth, the temperature schedule, α schedules;
- ``field.py``: where each sample's p⁽ᵗ⁾ lives between minibatches, and the
  registry of supervisory distributions (static, recursive, in-batch);
- ``data.py``, ``encoders.py``: digits / a synthetic mixture / a local folder,
  their augmentations, and the CNN, MLP and decoder-with-a-head encoders;
- ``evaluate.py``: the four downstream measures the engine is judged by;
- ``stopping.py``: the paper's rule, stop when the geometric decrease flattens;
- ``trainer.py``: the engine contract (``RkdoTrainer``).

Importing the package imports no torch; the modules do.
"""
