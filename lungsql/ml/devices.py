"""Where the CNN runs: ONNX Runtime's execution providers (a GPU when one is present) and the CPU cores
this process may use."""

from __future__ import annotations

import os
from typing import Sequence

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
TENSORRT = "TensorrtExecutionProvider"



def _gpu_present() -> bool:
    """An NVIDIA GPU is visible to this process (driver loaded, not hidden)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip() in ("", "-1"):
        return False
    try:
        return bool(os.listdir("/proc/driver/nvidia/gpus"))
    except OSError:
        return os.path.exists("/dev/nvidia0")


def choose_providers(available: Sequence[str] | None = None, tensorrt: bool = False) -> list[str]:
    """ONNX Runtime execution providers to ask for, best first, CPU last.

    `available` defaults to what onnxruntime reports, keeping the GPU
    providers only when a GPU is present (onnxruntime-gpu lists CUDA even on
    machines without one); a list given here is taken as it is.  TensorRT is
    used only when `tensorrt` is true: it compiles an engine for every new
    session, which takes minutes and happens again in every database backend.
    """
    if available is None:
        import onnxruntime as ort

        available = ort.get_available_providers()
        if not _gpu_present():
            available = [p for p in available if p not in (CUDA, TENSORRT)]
    chosen = [p for p in ((TENSORRT,) if tensorrt else ()) + (CUDA,) if p in available]
    return chosen + [CPU]


def default_threads() -> int:
    """CPU cores this process may use (its affinity mask, else os.cpu_count())."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1
