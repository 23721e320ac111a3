"""Whether the featurization benchmark ran on a GPU.

No GPU machine was lent to the task that wrote this suite; on a machine with an NVIDIA GPU and
onnxruntime-gpu, `lungsql bench --provider cuda` runs the same featurization benchmark there.
"""

from __future__ import annotations


def status() -> dict:
    from lungsql import featurize

    providers = featurize.choose_providers()
    if featurize.CUDA in providers:
        return {"available": True, "providers": providers}
    return {"available": False, "reason": "no GPU machine was lent to this task",
            "providers": providers, "how_to_run": "on a GPU machine with onnxruntime-gpu: lungsql bench --provider cuda"}
