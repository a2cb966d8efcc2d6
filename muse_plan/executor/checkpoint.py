"""Checkpoints: write atomically, verify on load, fall back past a corrupt one.

A checkpoint is a folder ``step-00000100`` under a stage's folder holding
- ``model.safetensors``: the weights (safetensors: no code runs on load;
  tied tensors are stored once) — for a LoRA stage whose frozen base is
  ``model.init_from``'s model as it is (``settings.adapters_only``: every
  4-bit QLoRA stage among them) only its adapters (manifest ``weights:
  adapters``, ``base_model``: the directory they were trained on; the base,
  packed in 4 bits or not, is rebuilt from it, never stored);
- ``state.pt``: optimizer, scheduler, RNG states, the engine's state (data
  position), the step; tensors and plain containers only, loaded with
  ``torch.load(weights_only=True)``;
- ``manifest.json``, written last: the step, the plan revision, the time and
  the SHA-256 of each file.

Design decisions:
- Atomic by rename: everything is written into ``step-N.tmp`` and the
  folder renamed to ``step-N`` once the manifest is flushed, so a crash
  leaves either a whole checkpoint or a ``.tmp`` folder that is ignored
  (and removed by the next save).
- The loader trusts nothing: a checkpoint whose manifest is missing, whose
  checksums differ (a truncated file, a bad disk) or that fails to
  deserialise is reported and the next older one is tried.
- ``keep`` bounds disk use; the newest checkpoints are kept, and a stage's
  final checkpoint is what the next stage starts from.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, load_model, save_file, save_model

from muse_plan.errors import PlanError
from muse_plan.executor.weights import adapter_state, is_adapter, load_into

MANIFEST = "manifest.json"
WEIGHTS = "model.safetensors"
STATE = "state.pt"
ADAPTERS = "adapters"  # manifest "weights": the checkpoint holds LoRA adapters only


class CorruptCheckpoint(Exception):
    """A checkpoint folder that can't be trusted; the message says why."""


@dataclass
class Loaded:
    path: Path
    step: int
    state: dict[str, Any]
    manifest: dict[str, Any]


def step_dir(stage_dir: Path, step: int) -> Path:
    return stage_dir / f"step-{step:08d}"


def step_of(path: Path) -> int | None:
    """The step a checkpoint folder ``step-N`` holds (None for another name)."""
    return int(path.name[5:]) if path.name.startswith("step-") and path.name[5:].isdigit() else None


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def rng_state() -> dict[str, Any]:
    """Every generator a run draws from, as tensors and plain values."""
    version, mt, gauss = random.getstate()
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": [version, torch.tensor(mt, dtype=torch.int64), gauss],
        "numpy": [np_kind, torch.from_numpy(np_keys.astype(np.int64)), np_pos, np_has_gauss, np_gauss],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    version, mt, gauss = state["python"]
    random.setstate((version, tuple(int(v) for v in mt.tolist()), gauss))
    kind, keys, pos, has_gauss, gauss_np = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss_np))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(stage_dir: Path, step: int, model: torch.nn.Module, state: dict[str, Any],
         meta: dict[str, Any], keep: int | None = 3) -> Path:
    """Write checkpoint ``step`` atomically and prune older ones beyond ``keep``."""
    final = step_dir(stage_dir, step)
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    if meta.get("weights") == ADAPTERS:
        save_file(adapter_state(model), str(tmp / WEIGHTS))
    else:
        save_model(model, str(tmp / WEIGHTS))
    torch.save({**state, "step": step}, tmp / STATE)
    manifest = {
        "step": step, **meta, "time": datetime.now(timezone.utc).isoformat(),
        "files": {name: _sha256(tmp / name) for name in (WEIGHTS, STATE)},
    }
    with open(tmp / MANIFEST, "w") as f:
        json.dump(manifest, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    if final.exists():  # a re-run of the same step after a resume: replace it
        shutil.rmtree(final)
    os.replace(tmp, final)
    if keep is not None:
        for old in checkpoints(stage_dir)[keep:]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def checkpoints(stage_dir: Path) -> list[Path]:
    """Finished checkpoint folders, newest first."""
    if not stage_dir.is_dir():
        return []
    found = [p for p in stage_dir.iterdir() if p.is_dir() and step_of(p) is not None]
    return sorted(found, key=step_of, reverse=True)


def verify(path: Path) -> dict[str, Any]:
    """The manifest of a checkpoint whose files all match their checksums."""
    try:
        manifest = json.loads((path / MANIFEST).read_text())
        files = manifest["files"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CorruptCheckpoint(f"{path.name}: unreadable manifest ({exc})") from None
    for name, digest in files.items():
        if not (path / name).is_file():
            raise CorruptCheckpoint(f"{path.name}: {name} is missing")
        if _sha256(path / name) != digest:
            raise CorruptCheckpoint(f"{path.name}: {name} does not match its checksum")
    return manifest


def _same_base(manifest: dict[str, Any], path: Path, model: torch.nn.Module) -> None:
    """An adapters-only checkpoint goes onto the base it was trained on: the model's
    ``init_from`` directory must be the manifest's ``base_model``."""
    base = manifest.get("base_model")
    built_from = getattr(getattr(model, "config", None), "_name_or_path", None)
    if not base or not built_from or Path(built_from).expanduser().resolve() != Path(base).resolve():
        raise PlanError(f"{path}: it holds LoRA adapters trained on the base model {base!r}, but this model "
                        f"was built from {built_from!r}; set model.init_from to {base!r}")


def _read(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path / WEIGHTS))
    except Exception as exc:  # a file that passed its checksum but still won't load
        raise CorruptCheckpoint(f"{path.name}: {exc}") from None


def holds_lora(path: Path) -> bool | None:
    """Whether a checkpoint holds LoRA adapters (its manifest records their scaling);
    None when its manifest can't be read (the loader then says why)."""
    try:
        return "lora_scaling" in json.loads((path / MANIFEST).read_text())
    except (OSError, ValueError, TypeError):
        return None


def load(path: Path, model: torch.nn.Module) -> tuple[dict[str, Any], dict[str, Any]]:
    """Load one verified checkpoint: weights into ``model``; returns (state, manifest)."""
    manifest = verify(path)
    try:
        if manifest.get("weights") == ADAPTERS:
            _same_base(manifest, path, model)
            tensors = _read(path)
            wanted = {k for k in model.state_dict() if is_adapter(k)}
            missing, unexpected = sorted(wanted - set(tensors)), sorted(set(tensors) - wanted)
            if not missing and not unexpected:
                model.load_state_dict(tensors, strict=False)
        else:
            missing, unexpected = load_model(model, str(path / WEIGHTS), strict=False)
        state = torch.load(path / STATE, map_location="cpu", weights_only=True)
    except (CorruptCheckpoint, PlanError):
        raise
    except Exception as exc:  # a file that passed its checksum but still won't load
        raise CorruptCheckpoint(f"{path.name}: {exc}") from None
    if missing or unexpected:
        raise CorruptCheckpoint(
            f"{path.name}: weights don't match the model (missing {sorted(missing)[:3]}, "
            f"unexpected {sorted(unexpected)[:3]})"
        )
    return state, manifest


def load_latest(stage_dir: Path, model: torch.nn.Module) -> tuple[Loaded | None, list[str]]:
    """The newest checkpoint that verifies and loads (None when there is none),
    and "step-N: why" for each newer one that was passed over as corrupt."""
    skipped: list[str] = []
    for path in checkpoints(stage_dir):
        try:
            state, manifest = load(path, model)
        except CorruptCheckpoint as exc:
            skipped.append(str(exc))
            continue
        return Loaded(path=path, step=int(state["step"]), state=state, manifest=manifest), skipped
    return None, skipped


def load_weights(path: Path, model: torch.nn.Module) -> None:
    """Only the weights of a verified checkpoint (a previous stage's result)."""
    manifest = verify(path)
    adapters = manifest.get("weights") == ADAPTERS
    if adapters:
        _same_base(manifest, path, model)
    try:
        missing, unexpected = load_into(model, _read(path), manifest.get("lora_scaling"), adapters)
    except (ValueError, RuntimeError) as exc:  # RuntimeError: a tensor of another shape
        raise CorruptCheckpoint(f"{path}: {exc}") from None
    if missing or unexpected:
        raise CorruptCheckpoint(
            f"{path}: weights don't fit this stage's model (missing {sorted(missing)[:3]}, "
            f"unexpected {sorted(unexpected)[:3]}); does the stage's shape match the one it starts from?"
        )
