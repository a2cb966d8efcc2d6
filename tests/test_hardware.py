
import pytest

from muse_plan.hardware import detect as detect_module
from muse_plan.hardware.catalog import CATALOG, lookup, match_device_name
from muse_plan.hardware.detect import GpuInfo, HostInfo, detect


@pytest.mark.parametrize("written, key", [("rtx3080", "RTX3080"), ("RTX-3090", "RTX3090"), ("h100", "H100"),
                                          ("a100", "A100"), ("l4", "L4"), ("t4", "T4")])
def test_lookup_normalises_what_people_write(written, key):
    assert lookup(written).key == key


@pytest.mark.parametrize("reported, key", [
    ("NVIDIA H100 80GB HBM3", "H100"), ("NVIDIA A100-SXM4-40GB", "A100"), ("NVIDIA GeForce RTX 3080 Laptop GPU", "RTX3080"),
    ("NVIDIA GeForce RTX 4090", "RTX4090"), ("Tesla T4", "T4"), ("NVIDIA L4", "L4"), ("NVIDIA A10", "A10"),
    ("NVIDIA H200", "H200"), ("NVIDIA GeForce RTX 3080 Ti", None), ("Quadro P1000", None),
])
def test_driver_names_map_to_catalog_kinds(reported, key):
    kind = match_device_name(reported)
    assert (kind.key if kind else None) == key


def test_catalog_covers_the_kinds_plans_name():
    assert {"RTX3080", "RTX3090", "RTX4090", "T4", "L4", "A10", "A100", "H100", "H200"} <= set(CATALOG)
    assert 8 in CATALOG["RTX3080"].memory_variants and 10 in CATALOG["RTX3080"].memory_variants
    assert not CATALOG["T4"].bf16 and CATALOG["H100"].bf16


def test_detect_reports_cpu_and_ram_without_gpus_here():
    host = detect(use_torch=False)
    assert host.cores_logical >= 1 and host.ram_gib > 0 and host.cpu_model
    if not host.gpus:
        assert host.compute_budget == "cpu" and "nvml" in host.gpu_source


def test_nvml_failure_falls_back_to_torch(monkeypatch):
    def broken():
        raise OSError("no libnvidia-ml")

    fake = [GpuInfo(0, "NVIDIA H100 80GB HBM3", 79.6, "H100", "torch")]
    monkeypatch.setattr(detect_module, "gpus_from_nvml", broken)
    monkeypatch.setattr(detect_module, "gpus_from_torch", lambda: fake)
    host = detect()
    assert host.gpus == fake and host.gpu_source == "nvml unavailable (OSError); torch.cuda"


def test_compute_budget_of_a_gpu_host():
    gpus = [GpuInfo(i, "NVIDIA A100-SXM4-80GB", 79.2, "A100", "nvml") for i in range(2)]
    host = HostInfo("x", 16, 32, 256.0, gpus)
    assert host.compute_budget == "2xA100-80GB"
    odd = HostInfo("x", 8, 16, 64.0, [GpuInfo(0, "Radeon Pro W7900", 45.0, None, "torch")])
    assert odd.compute_budget == "1xRadeonProW7900-45GB"
    from muse_plan.plan.units import parse_compute
    assert parse_compute(odd.compute_budget).memory_gib == 45.0  # a budget a plan accepts


def test_cli_commands_that_do_not_train_do_not_import_torch(tmp_path):
    from conftest import heavy_imports

    commands = [["--help"], ["plan", "list"], ["plan", "import", "plans/quickstart-cpu.yaml"],
                ["plan", "show", "quickstart-cpu"]]
    assert heavy_imports(tmp_path, commands) == "none"


def test_muse_hardware_puts_the_core_count_under_cores(cli):
    result = cli("hardware")
    assert result.exit_code == 0, result.output
    header = next(line for line in result.output.splitlines() if "device" in line)
    row = next(line for line in result.output.splitlines() if line.strip("│┃ ").startswith("cpu"))
    cells = [c.strip() for c in row.strip("│").split("│")]
    names = [c.strip() for c in header.strip("┃").split("┃")]
    assert names[:5] == ["device", "name", "memory", "cores", "bf16"]
    assert "logical" in cells[3] and cells[5] == "—"  # cores under "cores", none under the TFLOP/s column
