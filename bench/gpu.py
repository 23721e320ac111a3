"""Whether the featurization benchmark ran on a GPU.

The featurization benchmark runs on a GPU when ONNX Runtime can use one here (an NVIDIA GPU and
onnxruntime-gpu); `lungsql bench --provider cuda` asks for it explicitly.
"""

from __future__ import annotations


def status() -> dict:
    from lungsql.ml import devices

    providers = devices.choose_providers()
    if devices.CUDA in providers:
        return {"available": True, "providers": providers}
    return {"available": False, "reason": "the machine of this run has no NVIDIA GPU that ONNX Runtime can use",
            "providers": providers, "how_to_run": "on a GPU machine with onnxruntime-gpu: lungsql bench --provider cuda"}
