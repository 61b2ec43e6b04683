"""Whether onnxruntime's CUDA provider can run here, and on what: asked before any session is made.

onnxruntime-gpu lists its CUDA provider whether or not a GPU, a driver and the CUDA libraries are
there; asked to use it without them, it prints an error block on stderr and falls back to the CPU.
grand-challenge shows stderr as errors, and its hosts' NVIDIA driver is not published (a CUDA 13
build needs a driver >= 580). So the driver is asked directly (libcuda through ctypes: no extra
package), the provider's own library is loaded once to see that its CUDA libraries resolve, and
the answer is one line for the log: the GPU and driver in use, or why the CPU runs instead.
"""

from __future__ import annotations

import ctypes
import functools
from dataclasses import dataclass
from pathlib import Path

import onnxruntime as ort

CUDA_PROVIDER_LIBRARY = "libonnxruntime_providers_cuda.so"
_CUDA_ERRORS = {100: "no GPU is visible", 35: "the driver is older than this CUDA runtime"}


@dataclass(frozen=True)
class GpuReport:
    usable: bool
    description: str  # the GPU and driver when usable, else why not


def _text(call, *args: object) -> str:
    buffer = ctypes.create_string_buffer(256)
    return buffer.value.decode() if call(buffer, 256, *args) == 0 else ""


def _driver_version() -> str:
    """The driver's own version ("580.65.06") from NVML, when its library is there."""
    try:
        nvml = ctypes.CDLL("libnvidia-ml.so.1")
    except OSError:
        return ""
    if nvml.nvmlInit_v2() != 0:
        return ""
    try:
        buffer = ctypes.create_string_buffer(96)
        return buffer.value.decode() if nvml.nvmlSystemGetDriverVersion(buffer, 96) == 0 else ""
    finally:
        nvml.nvmlShutdown()


def _built_for_cuda() -> int | None:
    """The CUDA major version this onnxruntime-gpu build links (13 for 1.27 and later)."""
    try:
        from onnxruntime.capi import build_and_package_info
    except ImportError:
        return None
    version = getattr(build_and_package_info, "cuda_version", "") or ""
    return int(version.split(".")[0]) if version.split(".")[0].isdigit() else None


@functools.cache
def cuda_report() -> GpuReport:
    """Whether the CUDA provider can run (the first GPU's name, the driver and the CUDA version
    it supports), or the first reason it cannot, in words a user can act on."""
    provider = Path(ort.__file__).parent / "capi" / CUDA_PROVIDER_LIBRARY
    if not provider.is_file():
        return GpuReport(False, "this onnxruntime build has no CUDA provider")
    try:
        cuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return GpuReport(
            False, "no NVIDIA driver in reach (libcuda.so.1 not found; docker needs --gpus all)"
        )
    status = cuda.cuInit(0)
    if status != 0:
        reason = _CUDA_ERRORS.get(status, "see the NVIDIA driver's documentation")
        return GpuReport(False, f"the NVIDIA driver did not start (CUDA error {status}: {reason})")
    version, count, device = ctypes.c_int(), ctypes.c_int(), ctypes.c_int()
    cuda.cuDriverGetVersion(ctypes.byref(version))
    supports = f"{version.value // 1000}.{version.value % 1000 // 10}"
    if cuda.cuDeviceGetCount(ctypes.byref(count)) != 0 or count.value < 1:
        return GpuReport(False, "the NVIDIA driver sees no GPU")
    cuda.cuDeviceGet(ctypes.byref(device), 0)
    name = _text(cuda.cuDeviceGetName, device) or "an NVIDIA GPU"
    driver = _driver_version()
    described = f"{name}, driver {driver or 'of unknown version'} (supports CUDA {supports})"
    needed = _built_for_cuda()
    if needed is not None and version.value // 1000 < needed:
        return GpuReport(
            False, f"{described}: this onnxruntime-gpu build needs CUDA {needed} or later"
        )
    try:
        ctypes.CDLL(str(provider))
    except OSError as error:
        return GpuReport(False, f"{described}: onnxruntime's CUDA provider cannot load ({error})")
    return GpuReport(True, described)
