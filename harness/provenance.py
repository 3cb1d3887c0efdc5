"""Provenance carried by every result row: package versions, GPU and driver, git commit, time."""

from __future__ import annotations

import os
import platform
import subprocess
from datetime import datetime, timezone
from importlib import metadata

PACKAGES = ("torch", "transformers", "triton", "peft", "liger-kernel", "unsloth", "unsloth_zoo", "cut-cross-entropy",
            "chronicals")


def versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def commit() -> str | None:
    """HEAD's hash, with '-dirty' when tracked files differ from it. A copy without .git (the GPU host gets the
    working tree, not the repository) names its commit in CHRONICALS_COMMIT, as scripts/h200.sh's caller sets it."""
    if os.environ.get("CHRONICALS_COMMIT"):
        return os.environ["CHRONICALS_COMMIT"]
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return head.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def device_info(device: str) -> dict:
    """GPU name, driver and CUDA version (None for a CPU run). Call in a process that may initialise CUDA."""
    if device != "cuda":
        return {"gpu": None, "driver": None, "cuda": None}
    import torch

    info = {"gpu": None, "driver": None, "cuda": torch.version.cuda}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    try:
        import pynvml

        pynvml.nvmlInit()
        driver = pynvml.nvmlSystemGetDriverVersion()
        info["driver"] = driver.decode() if isinstance(driver, bytes) else driver
    except Exception:
        try:
            smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=20)
            info["driver"] = smi.stdout.strip().splitlines()[0] if smi.returncode == 0 and smi.stdout else None
        except (OSError, subprocess.SubprocessError):
            pass
    return info


def snapshot() -> dict:
    """Everything above in one dict, for the benchmark scripts' JSON (the GPU's when CUDA is there)."""
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    return {"versions": versions(), "commit": commit(), "time": now(), **device_info(device)}
