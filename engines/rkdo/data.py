"""Data for representation learning: labelled samples, augmentations, batches.

Design decisions:
- No network: scikit-learn's digits (1,797 8×8 images, 10 classes, shipped
  with the package), a generated Gaussian mixture for fast tests, or a local
  folder the user names — images or text files, one class per subfolder
  (files directly in the folder form one class, so the label measures are
  skipped).
- Labels are for the measures only; training never reads them. A fixed,
  stratified share of the samples is held out (the split does not depend on
  the training seed, so seeds vary the training, not the test set).
- Two augmented views per sample make the positive pair (SimCLR's recipe,
  which I-Con's contrastive slice takes as its supervisory distribution):
  images get small rotations (±15°), shifts (±1 px on 8×8, scaled with the
  size) and noise; vectors get noise and feature dropout; text gets a random
  crop and token dropout. Augmentations draw from a generator the trainer
  owns and checkpoints, so a resumed stage sees the same views.
- Batches walk a per-epoch permutation (seeded by seed and epoch) and drop
  the last partial batch; several processes take disjoint slices of it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

SPLIT_SEED = 0
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".pgm", ".tif", ".tiff"}
TEXT_SUFFIXES = {".txt", ".md"}


@dataclass
class RepresentationData:
    kind: str  # image | vector | text
    x: torch.Tensor  # (N, 1, H, W) float | (N, D) float | (N, L) long
    labels: torch.Tensor  # (N,) long
    train: torch.Tensor  # (N_train,) indices into x
    test: torch.Tensor  # (N_test,) indices into x
    classes: int  # distinct labels; < 2 means the label measures are skipped
    pad_id: int = 0  # text only
    vocab_size: int = 0  # text only


def digits(config: Any, **_: Any) -> RepresentationData:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32)[:, None] / 16.0  # (N, 1, 8, 8) in [0, 1]
    return _split("image", x, torch.tensor(d.target, dtype=torch.long), config.test_fraction)


def synthetic(config: Any, n: int = 1200, dim: int = 16, classes: int = 6, **_: Any) -> RepresentationData:
    """A Gaussian mixture whose classes overlap in most directions: the encoder
    has to find the few that separate them (fixed seed: the same data always)."""
    g = torch.Generator().manual_seed(1234)
    centres = torch.zeros(classes, dim)
    centres[:, :4] = 3.0 * torch.randn(classes, 4, generator=g)  # separated in 4 of 16 directions
    labels = torch.arange(n) % classes
    x = centres[labels] + torch.randn(n, dim, generator=g)
    return _split("vector", x, labels, config.test_fraction)


def folder(config: Any, *, path: str, tokenizer: Any = None, seq_len: int = 128, **_: Any) -> RepresentationData:
    root = Path(path).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"rkdo dataset {path!r} is neither 'digits', 'synthetic' nor a folder")
    files = sorted(p for p in root.rglob("*") if p.is_file() and not p.name.startswith("."))
    images = [p for p in files if p.suffix.lower() in IMAGE_SUFFIXES]
    texts = [p for p in files if p.suffix.lower() in TEXT_SUFFIXES]
    if images and texts:
        raise ValueError(f"rkdo dataset {path!r} holds both images and text files; keep one kind per folder")
    if not images and not texts:
        raise ValueError(f"rkdo dataset {path!r} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))}) "
                         f"and no text files ({', '.join(sorted(TEXT_SUFFIXES))})")
    if images:
        return _image_folder(root, images, config)
    return _text_folder(root, texts, config, tokenizer, seq_len)


def _class_of(root: Path, path: Path) -> str:
    parts = path.relative_to(root).parts
    return parts[0] if len(parts) > 1 else ""


def _image_folder(root: Path, paths: list[Path], config: Any) -> RepresentationData:
    from PIL import Image

    size = config.image_size
    arrays = [np.asarray(Image.open(p).convert("L").resize((size, size)), dtype=np.float32) / 255.0 for p in paths]
    x = torch.tensor(np.stack(arrays))[:, None]  # (N, 1, S, S)
    return _split("image", x, _label_ids([_class_of(root, p) for p in paths]), config.test_fraction)


def _text_folder(root: Path, paths: list[Path], config: Any, tokenizer: Any, seq_len: int) -> RepresentationData:
    """Each non-empty line of a text file is one sample, cut to ``seq_len`` tokens."""
    if tokenizer is None:
        raise ValueError("a text dataset needs a tokenizer")
    lines, names = [], []
    for p in paths:
        for line in p.read_text(encoding="utf-8", errors="replace").splitlines():
            if line.strip():
                lines.append(line.strip())
                names.append(_class_of(root, p))
    if len(lines) < 4:
        raise ValueError(f"rkdo dataset {str(root)!r} has {len(lines)} non-empty lines; it needs at least 4")
    pad = tokenizer.pad_id if tokenizer.pad_id is not None else tokenizer.eos_id
    ids = [ids[:seq_len] for ids in tokenizer.encode_batch(lines)]
    width = max(1, max(len(i) for i in ids))
    x = torch.full((len(ids), width), pad, dtype=torch.long)
    for row, seq in enumerate(ids):
        x[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
    data = _split("text", x, _label_ids(names), config.test_fraction)
    data.pad_id, data.vocab_size = pad, tokenizer.vocab_size
    return data


def _label_ids(names: list[str]) -> torch.Tensor:
    index = {name: i for i, name in enumerate(sorted(set(names)))}
    return torch.tensor([index[n] for n in names], dtype=torch.long)


def _split(kind: str, x: torch.Tensor, labels: torch.Tensor, test_fraction: float) -> RepresentationData:
    from sklearn.model_selection import train_test_split

    n = len(labels)
    counts = torch.bincount(labels)
    stratify = labels.numpy() if counts.min() >= 2 and len(counts) > 1 else None
    train, test = train_test_split(np.arange(n), test_size=test_fraction, random_state=SPLIT_SEED, stratify=stratify)
    return RepresentationData(kind, x, labels, torch.tensor(np.sort(train)), torch.tensor(np.sort(test)),
                              int((counts > 0).sum()))


# dataset name -> builder; anything else is read as a local folder
DATASETS: dict[str, Callable[..., RepresentationData]] = {"digits": digits, "synthetic": synthetic}


def load_dataset(config: Any, tokenizer: Any = None, seq_len: int = 128) -> RepresentationData:
    builder = DATASETS.get(config.dataset)
    if builder is not None:
        return builder(config)
    return folder(config, path=config.dataset, tokenizer=tokenizer, seq_len=seq_len)


def augment_images(x: torch.Tensor, g: torch.Generator, max_degrees: float = 15.0, noise: float = 0.1) -> torch.Tensor:
    """Small rotation, a shift of up to 1/8 of the side, additive noise; x (B, 1, H, W)."""
    B, _, H, W = x.shape
    angle = (torch.rand(B, generator=g) * 2 - 1) * math.radians(max_degrees)
    shift = torch.randint(-1, 2, (B, 2), generator=g).float() * max(1, H // 8) * 2.0 / H  # grid units
    cos, sin = angle.cos(), angle.sin()
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    moved = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return moved + noise * torch.randn(moved.shape, generator=g)


def augment_vectors(x: torch.Tensor, g: torch.Generator, noise: float = 0.5, drop: float = 0.1) -> torch.Tensor:
    keep = (torch.rand(x.shape, generator=g) >= drop).float()
    return x * keep + noise * torch.randn(x.shape, generator=g)


def augment_text(x: torch.Tensor, g: torch.Generator, pad_id: int, keep: float = 0.7,
                 drop: float = 0.1) -> torch.Tensor:
    """A random contiguous crop of at least ``keep`` of each sequence, moved to
    the front, and token dropout (dropped tokens become padding)."""
    B, L = x.shape
    out = torch.full_like(x, pad_id)
    lengths = (x != pad_id).sum(1).clamp_min(1)
    for row in range(B):
        n = int(lengths[row])
        shortest = max(1, math.ceil(n * keep))
        span = int(torch.randint(shortest, n + 1, (1,), generator=g))
        start = int(torch.randint(0, n - span + 1, (1,), generator=g))
        out[row, :span] = x[row, start:start + span]
    dropped = (torch.rand(x.shape, generator=g) < drop) & (out != pad_id)
    dropped[:, 0] = False  # keep one token so no view is empty
    return out.masked_fill(dropped, pad_id)


# data kind -> augmentation (the batch, the trainer's generator, the data) -> one view
AUGMENTATIONS: dict[str, Callable[[torch.Tensor, torch.Generator, RepresentationData], torch.Tensor]] = {
    "image": lambda x, g, d: augment_images(x, g),
    "vector": lambda x, g, d: augment_vectors(x, g),
    "text": lambda x, g, d: augment_text(x, g, d.pad_id),
}


class EpochSampler:
    """Batches of training indices from a per-epoch permutation; resumable."""

    def __init__(self, indices: torch.Tensor, batch: int, seed: int, rank: int = 0, world_size: int = 1) -> None:
        if batch * world_size > len(indices):
            raise ValueError(f"micro_batch {batch} × {world_size} processes is more than the "
                             f"{len(indices)} training samples; lower training.micro_batch")
        self.indices, self.batch, self.seed = indices, batch, seed
        self.rank, self.world_size = rank, world_size
        self.epoch, self.position = 0, 0
        self._order = self._permutation()

    @property
    def steps_per_epoch(self) -> int:
        return len(self.indices) // (self.batch * self.world_size)

    def _permutation(self) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return self.indices[torch.randperm(len(self.indices), generator=g)]

    def next(self) -> torch.Tensor:
        if self.position >= self.steps_per_epoch:
            self.epoch, self.position = self.epoch + 1, 0
            self._order = self._permutation()
        start = (self.position * self.world_size + self.rank) * self.batch
        self.position += 1
        return self._order[start:start + self.batch]

    def state_dict(self) -> dict[str, int]:
        return {"seed": self.seed, "epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.seed, self.epoch, self.position = int(state["seed"]), int(state["epoch"]), int(state["position"])
        self._order = self._permutation()
