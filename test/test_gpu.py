"""The driver check behind the CUDA provider: every way a GPU can be unusable gets its reason,
and a usable one its name and driver. libcuda and NVML are stood in by fakes (this machine has
no GPU); the real onnxruntime here has no CUDA provider, which is the first reason."""

from __future__ import annotations

import ctypes
from pathlib import Path

import pytest

from pantherseg.inference import gpu


def test_this_onnxruntime_has_no_cuda_provider():
    report = gpu.cuda_report.__wrapped__()
    assert not report.usable and report.description == "this onnxruntime build has no CUDA provider"


class FakeCuda:
    """libcuda's driver API as ctypes sees it: each call returns a CUDA status code."""

    def __init__(self, init=0, version=13000, count=1, name=b"NVIDIA H200"):
        self.init, self.version, self.count, self.name = init, version, count, name

    def cuInit(self, flags):  # noqa: N802 (the C API's names)
        return self.init

    def cuDriverGetVersion(self, out):  # noqa: N802
        out._obj.value = self.version
        return 0

    def cuDeviceGetCount(self, out):  # noqa: N802
        out._obj.value = self.count
        return 0

    def cuDeviceGet(self, out, ordinal):  # noqa: N802
        out._obj.value = ordinal
        return 0

    def cuDeviceGetName(self, buffer, length, device):  # noqa: N802
        ctypes.memmove(buffer, self.name, len(self.name))
        return 0


class FakeNvml:
    def nvmlInit_v2(self):  # noqa: N802
        return 0

    def nvmlSystemGetDriverVersion(self, buffer, length):  # noqa: N802
        ctypes.memmove(buffer, b"580.65.06", 9)
        return 0

    def nvmlShutdown(self):  # noqa: N802
        return 0


@pytest.fixture
def machine(monkeypatch, tmp_path):
    """A stand-in machine: an onnxruntime with a CUDA provider library, and the libraries that
    load (name -> fake, or the OSError message a missing one raises)."""
    capi = tmp_path / "onnxruntime" / "capi"
    capi.mkdir(parents=True)
    (capi / gpu.CUDA_PROVIDER_LIBRARY).write_bytes(b"")
    monkeypatch.setattr(gpu.ort, "__file__", str(capi.parent / "__init__.py"))
    monkeypatch.setattr(gpu, "_built_for_cuda", lambda: 13)
    libraries: dict[str, object] = {
        "libcuda.so.1": FakeCuda(),
        "libnvidia-ml.so.1": FakeNvml(),
        str(capi / gpu.CUDA_PROVIDER_LIBRARY): object(),
    }

    def load(name):
        found = libraries.get(str(name), f"{Path(str(name)).name}: cannot open shared object file")
        if isinstance(found, str):
            raise OSError(found)
        return found

    monkeypatch.setattr(gpu.ctypes, "CDLL", load)
    return libraries, capi


def test_a_usable_gpu_is_named_with_its_driver(machine):
    report = gpu.cuda_report.__wrapped__()
    assert report == gpu.GpuReport(True, "NVIDIA H200, driver 580.65.06 (supports CUDA 13.0)")


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        (
            lambda libs, capi: libs.pop("libcuda.so.1"),
            "libcuda.so.1 not found; docker needs --gpus all",
        ),
        (lambda libs, capi: setattr(libs["libcuda.so.1"], "init", 100), "CUDA error 100: no GPU"),
        (lambda libs, capi: setattr(libs["libcuda.so.1"], "count", 0), "sees no GPU"),
        (
            lambda libs, capi: setattr(libs["libcuda.so.1"], "version", 12040),
            "(supports CUDA 12.4): this onnxruntime-gpu build needs CUDA 13 or later",
        ),
        (
            lambda libs, capi: libs.__setitem__(
                str(capi / gpu.CUDA_PROVIDER_LIBRARY), "libcublasLt.so.13: cannot open"
            ),
            "CUDA provider cannot load (libcublasLt.so.13: cannot open",
        ),
    ],
)
def test_each_unusable_gpu_says_why(machine, change, reason):
    libraries, capi = machine
    change(libraries, capi)
    report = gpu.cuda_report.__wrapped__()
    assert not report.usable and reason in report.description


def test_a_driver_without_nvml_is_still_described(machine):
    libraries, _ = machine
    del libraries["libnvidia-ml.so.1"]
    report = gpu.cuda_report.__wrapped__()
    assert report.usable and "driver of unknown version" in report.description
