"""The GPU catalog: what each kind of accelerator offers a training run.

Numbers are vendor datasheet figures for dense (not 2:4-sparse) tensor-core
math with fp32 accumulation, which is what training uses; GeForce cards run
fp16/bf16 with fp32 accumulation at half their marketed fp16-accumulate rate.
Memory in GiB, as vendors mean "GB" for GPU memory (an "80GB" H100 has
80 GiB). The optimizer turns peaks into achievable speed
with a measured utilisation; this module only states the hardware.
"""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class GpuKind:
    key: str                       # canonical name used in plans: "H100"
    display: str                   # "NVIDIA H100 80GB SXM"
    memory_gib: float              # default memory when the plan names none
    memory_variants: tuple[float, ...]
    bf16: bool                     # native bf16 tensor-core support
    peak_tflops_bf16: float        # dense; 0 where the card has no bf16
    peak_tflops_fp16: float        # dense, fp32 accumulate
    peak_tflops_fp32: float        # plain fp32 (non-tensor-core) math
    memory_bandwidth_gbs: float    # GB/s
    interconnect: str              # "nvlink" or "pcie"
    interconnect_gbs: float        # GB/s per direction between GPUs of a host
    name_patterns: tuple[str, ...] = ()  # regexes matching driver-reported names


CATALOG: dict[str, GpuKind] = {g.key: g for g in (
    GpuKind("RTX3080", "NVIDIA GeForce RTX 3080 (10 GB desktop, 8/16 GB laptop)",
            10, (8, 10, 12, 16), True, 59.5, 59.5, 29.8, 760, "pcie", 32,
            (r"rtx\s*3080(?!\s*ti)",)),
    GpuKind("RTX3090", "NVIDIA GeForce RTX 3090", 24, (24,), True, 71.0, 71.0, 35.6,
            936, "pcie", 32, (r"rtx\s*3090",)),
    GpuKind("RTX4090", "NVIDIA GeForce RTX 4090", 24, (24,), True, 165.2, 165.2, 82.6,
            1008, "pcie", 32, (r"rtx\s*4090",)),
    GpuKind("T4", "NVIDIA T4", 16, (16,), False, 0.0, 65.0, 8.1, 320, "pcie", 16,
            (r"\bt4\b",)),
    GpuKind("L4", "NVIDIA L4", 24, (24,), True, 121.0, 121.0, 30.3, 300, "pcie", 32,
            (r"\bl4\b",)),
    GpuKind("A10", "NVIDIA A10", 24, (24,), True, 125.0, 125.0, 31.2, 600, "pcie", 32,
            (r"\ba10\b(?!0)",)),
    GpuKind("A100", "NVIDIA A100 SXM (40 or 80 GB)", 80, (40, 80), True, 312.0, 312.0,
            19.5, 2039, "nvlink", 300, (r"a100",)),
    GpuKind("H100", "NVIDIA H100 SXM 80GB", 80, (80,), True, 989.0, 989.0, 67.0,
            3350, "nvlink", 450, (r"h100",)),
    GpuKind("H200", "NVIDIA H200 SXM 141GB", 141, (141,), True, 989.0, 989.0, 67.0,
            4800, "nvlink", 450, (r"h200",)),
)}

# A100 40GB has less bandwidth than the 80GB part; the catalog keeps one
# entry per kind and lets memory pick the variant where it matters.
A100_40GB_BANDWIDTH_GBS = 1555.0


def _squash(name: str) -> str:
    return re.sub(r"[\s_\-]", "", name).upper()


def lookup(name: str) -> GpuKind | None:
    """The catalog entry for a kind as a user writes it ("rtx3080", "h100")."""
    return CATALOG.get(_squash(name))


def match_device_name(device_name: str) -> GpuKind | None:
    """The catalog entry for a name the driver reports ("NVIDIA H100 80GB HBM3")."""
    lowered = device_name.lower()
    for kind in CATALOG.values():
        if any(re.search(p, lowered) for p in kind.name_patterns):
            return kind
    return None


def known_kinds() -> str:
    return ", ".join(CATALOG)


# The 8 GB and 16 GB RTX 3080 are the laptop part: 6144 of the desktop's 8704
# CUDA cores at similar clocks (~0.7x the math) and a narrower memory bus.
LAPTOP_RTX3080 = {8.0: 448.0, 16.0: 512.0}  # memory GiB -> bandwidth GB/s


def variant(kind: GpuKind, memory_gib: float | None) -> GpuKind:
    """The entry for the memory size a plan names (an A100-40GB, a laptop RTX 3080)."""
    from dataclasses import replace

    if memory_gib is None:
        return kind
    if kind.key == "RTX3080" and memory_gib in LAPTOP_RTX3080:
        return replace(kind, display=f"NVIDIA GeForce RTX 3080 Laptop {memory_gib:g} GB", memory_gib=memory_gib,
                       peak_tflops_bf16=kind.peak_tflops_bf16 * 0.7, peak_tflops_fp16=kind.peak_tflops_fp16 * 0.7,
                       peak_tflops_fp32=kind.peak_tflops_fp32 * 0.7,
                       memory_bandwidth_gbs=LAPTOP_RTX3080[memory_gib])
    if kind.key == "A100" and memory_gib <= 40:
        return replace(kind, memory_gib=memory_gib, memory_bandwidth_gbs=A100_40GB_BANDWIDTH_GBS)
    return replace(kind, memory_gib=memory_gib)
