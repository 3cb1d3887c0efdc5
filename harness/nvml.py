"""GPU memory as the driver sees it (NVML, via the nvidia-ml-py package when installed): what this process holds,
CUDA context and allocator cache included, which the PyTorch allocator's own peak leaves out."""

from __future__ import annotations

import os


class ProcessMemory:
    """`sample()` -> GiB this process holds on the GPU now (None when NVML is unavailable); `peak` is the largest
    sample. Falls back to the whole device's used memory where the driver does not list processes by pid (some
    containers): the harness runs one training process at a time, so that is the same up to other tenants."""

    def __init__(self):
        self.peak: float | None = None
        try:
            import pynvml

            pynvml.nvmlInit()
            visible = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0].strip()
            if visible.startswith(("GPU-", "MIG-")):  # a device named by UUID: index 0 would be another GPU
                self._handle = pynvml.nvmlDeviceGetHandleByUUID(visible)
            else:
                self._handle = pynvml.nvmlDeviceGetHandleByIndex(int(visible) if visible.isdigit() else 0)
            self._nvml = pynvml
        except Exception:
            self._nvml = None

    def sample(self) -> float | None:
        if self._nvml is None:
            return None
        used = None
        try:
            for proc in self._nvml.nvmlDeviceGetComputeRunningProcesses(self._handle):
                if proc.pid == os.getpid() and proc.usedGpuMemory is not None:
                    used = proc.usedGpuMemory
            if used is None:
                used = self._nvml.nvmlDeviceGetMemoryInfo(self._handle).used
        except Exception:
            return self.peak
        gib = used / 2**30
        self.peak = gib if self.peak is None else max(self.peak, gib)
        return gib
