"""What this machine has: GPUs (NVML first, torch.cuda as the fallback), CPU, RAM.

NVML (nvidia-ml-py) is read first because it answers in milliseconds and
needs no torch import; torch.cuda is asked only when NVML is missing or
fails (no NVIDIA driver library, a non-NVIDIA build). GPUtil is not used:
it forks nvidia-smi on every read and has had no release since 2018.
"""

from __future__ import annotations

import os
import platform
import re
from dataclasses import asdict, dataclass, field

import psutil

from muse_plan.hardware.catalog import CATALOG, match_device_name


@dataclass(frozen=True)
class GpuInfo:
    index: int
    name: str
    memory_gib: float
    kind: str | None          # catalog key, when the name is one muse knows
    source: str               # "nvml" or "torch"


@dataclass(frozen=True)
class HostInfo:
    cpu_model: str
    cores_physical: int | None
    cores_logical: int
    ram_gib: float
    gpus: list[GpuInfo] = field(default_factory=list)
    driver: str | None = None
    gpu_source: str | None = None  # which probe found the GPUs, or why none

    def as_dict(self) -> dict:
        return asdict(self)

    @property
    def compute_budget(self) -> str:
        """This machine as a plan's compute budget: "2xA100-80GB" or "cpu"."""
        if not self.gpus:
            return "cpu"
        first = self.gpus[0]
        memory = first.memory_gib
        kind = CATALOG.get(first.kind or "")
        if kind:  # drivers report a little less than the marketed size (79.2 GiB on an "80GB" card)
            nearest = min(kind.memory_variants, key=lambda v: abs(v - memory))
            memory = nearest if abs(nearest - memory) <= 0.08 * nearest else memory
        name = first.kind or re.sub(r"[^A-Za-z0-9]", "", first.name)
        return f"{len(self.gpus)}x{name}-{memory:g}GB"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def gpus_from_nvml() -> tuple[list[GpuInfo], str | None]:
    import pynvml

    pynvml.nvmlInit()
    try:
        driver = pynvml.nvmlSystemGetDriverVersion()
        gpus = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(i)
            name = pynvml.nvmlDeviceGetName(handle)
            name = name.decode() if isinstance(name, bytes) else name
            memory = pynvml.nvmlDeviceGetMemoryInfo(handle).total / 2**30
            kind = match_device_name(name)
            gpus.append(GpuInfo(i, name, round(memory, 1), kind.key if kind else None, "nvml"))
        return gpus, driver.decode() if isinstance(driver, bytes) else driver
    finally:
        pynvml.nvmlShutdown()


def gpus_from_torch() -> list[GpuInfo]:
    import torch

    if not torch.cuda.is_available():
        return []
    gpus = []
    for i in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(i)
        kind = match_device_name(props.name)
        gpus.append(GpuInfo(i, props.name, round(props.total_memory / 2**30, 1),
                            kind.key if kind else None, "torch"))
    return gpus


def detect(use_torch: bool = True) -> HostInfo:
    gpus: list[GpuInfo] = []
    driver = None
    try:
        gpus, driver = gpus_from_nvml()
        source = "nvml"
    except Exception as exc:  # no driver library, no device, or a broken install
        source = f"nvml unavailable ({type(exc).__name__})"
        if use_torch:
            try:
                gpus = gpus_from_torch()
                source += "; torch.cuda"
            except ImportError:
                source += "; torch not installed"
    return HostInfo(
        cpu_model=_cpu_model(),
        cores_physical=psutil.cpu_count(logical=False),
        cores_logical=os.cpu_count() or 1,
        ram_gib=round(psutil.virtual_memory().total / 2**30, 1),
        gpus=gpus,
        driver=driver,
        gpu_source=source,
    )
