"""A representation stage's settings, read from the stage's options.

Design decisions:
- The executor hands the engine one dict: the plan's ``techniques.rkdo``
  options with the stage's own options on top (``engine_options``). It is
  read here into a frozen dataclass, once, at setup; an unknown key or a bad
  value raises ``ValueError`` naming what is accepted, which the executor
  reports as a plan error before any step runs.
- ``objective: icon`` is the static I-Con baseline: the supervisory
  distribution is fixed (α = 0) and so is the temperature (β = 0), whatever
  the RKDO options say, so one plan can hold both arms of a comparison.
- Encoder sizes are small by default: the bundled data (scikit-learn's
  digits, a synthetic mixture) trains in seconds on a CPU.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any

OBJECTIVES = ("rkdo", "icon")
ENCODER_NAMES = ("auto", "mlp", "cnn", "decoder")
ALPHA_SCHEDULE_NAMES = ("constant", "linear", "cosine", "adaptive")


@dataclass(frozen=True)
class RkdoConfig:
    objective: str = "rkdo"
    alpha: float = 0.5  # EMA weight of q⁽ᵗ⁻¹⁾ in p⁽ᵗ⁾
    depth: int = 3  # levels of the recursion kept (the paper uses 3)
    tau0: float = 0.5
    beta: float = 0.1  # τ⁽ᵗ⁾ = τ⁰(1 − β t/T)
    in_batch: bool = False  # the author's code's in-batch recursion
    debias: float = 0.2  # I-Con's uniform share in p⁽⁰⁾
    alpha_schedule: str = "constant"
    alpha_final: float = 0.0  # where an annealed α ends
    early_stop: bool = False  # stop when the loss's geometric decrease flattens
    stop_window: int = 0  # micro-steps per window of the stopping rule; 0: one epoch
    stop_tol: float = 0.01  # a window that lowers the loss by less than this share is flat
    stop_patience: int = 2  # flat windows in a row that stop the stage
    dataset: str = "digits"  # digits | synthetic | a local folder of images or text
    encoder: str = "auto"  # auto: cnn for images, mlp for vectors, decoder for text
    hidden: int = 128
    embed_dim: int = 64  # the frozen embedding the measures read
    proj_dim: int = 32  # the projection head's output, where the loss lives
    anchors: int = 256  # fixed neighbourhood of training samples every q is over
    test_fraction: float = 0.2  # held out for the measures, never trained on
    image_size: int = 16  # images from a folder are resized to this square
    knn_k: int = 10
    eval_samples: int = 4000  # most samples per split the measures read

    @classmethod
    def from_options(cls, options: dict[str, Any]) -> RkdoConfig:
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(options) - set(known))
        if unknown:
            raise ValueError(f"unknown rkdo option {', '.join(map(repr, unknown))}; accepted: {', '.join(known)}")
        values: dict[str, Any] = {}
        for name, value in options.items():
            kind = type(known[name].default)
            if kind is float and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
            if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
                raise ValueError(f"rkdo option {name} must be {kind.__name__}, got {value!r}")
            values[name] = value
        config = cls(**values)
        config.check()
        if config.objective == "icon":
            config = replace(config, alpha=0.0, beta=0.0, alpha_schedule="constant", in_batch=False)
        return config

    def check(self) -> None:
        choices = {"objective": OBJECTIVES, "encoder": ENCODER_NAMES, "alpha_schedule": ALPHA_SCHEDULE_NAMES}
        for name, accepted in choices.items():
            if getattr(self, name) not in accepted:
                raise ValueError(f"unknown rkdo {name} {getattr(self, name)!r}; accepted: {', '.join(accepted)}")
        for name in ("alpha", "alpha_final", "debias"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"rkdo option {name} must be in [0, 1], got {getattr(self, name)}")
        if not 0.0 <= self.beta < 1.0:
            raise ValueError(f"rkdo option beta must be in [0, 1) so the temperature stays positive, got {self.beta}")
        if not 0.0 < self.test_fraction < 1.0:
            raise ValueError(f"rkdo option test_fraction must be in (0, 1), got {self.test_fraction}")
        if self.tau0 <= 0 or self.stop_tol <= 0:
            raise ValueError("rkdo options tau0 and stop_tol must be positive")
        for name in ("depth", "hidden", "embed_dim", "proj_dim", "anchors", "image_size", "knn_k",
                     "eval_samples", "stop_patience"):
            if getattr(self, name) < 1:
                raise ValueError(f"rkdo option {name} must be a positive integer, got {getattr(self, name)}")
        if self.stop_window < 0:
            raise ValueError(f"rkdo option stop_window must be 0 (one epoch) or positive, got {self.stop_window}")

    @property
    def target(self) -> str:
        """The supervisory distribution's registry key (``field.TARGETS``)."""
        if self.objective == "icon":
            return "static"
        return "in_batch" if self.in_batch else "recursive"
