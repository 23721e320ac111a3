"""What Python environment lungsql runs in, inside or outside the database server."""

from __future__ import annotations

import importlib
import sys
from dataclasses import dataclass
from pathlib import Path

# Import name, distribution name (for the fix), needed by the stored procedures.
COMPONENTS: tuple[tuple[str, str, bool], ...] = (
    ("numpy", "numpy", True),
    ("pydicom", "pydicom", True),
    ("onnxruntime", "onnxruntime", True),
    ("onnx", "onnx", True),  # reads a stored CNN before ONNX Runtime may (lungsql.ml.onnx_inspect)
    ("lightgbm", "lightgbm", True),
    ("cv2", "opencv-python-headless", True),
    ("lungsql", "lungsql", True),
)


@dataclass(frozen=True)
class Component:
    name: str
    version: str | None
    location: str | None

    @property
    def missing(self) -> bool:
        return self.version is None


def inspect_components() -> list[Component]:
    """Python itself, then each component with its version, or None when it cannot be imported."""
    found = [Component("python", sys.version.split()[0], sys.executable or sys.prefix)]
    for module_name, _dist, _required in COMPONENTS:
        try:
            module = importlib.import_module(module_name)
        except Exception as exc:  # an ImportError, or a broken binary extension
            found.append(Component(module_name, None, f"not importable: {exc}".splitlines()[0]))
            continue
        version = getattr(module, "__version__", None) or "unknown"
        location = str(Path(getattr(module, "__file__", "") or "").parent) or None
        found.append(Component(module_name, str(version), location))
    return found


def missing_message(components: list[Component]) -> tuple[str, str] | None:
    """(message, hint) when something required is missing, else None."""
    required = {name: dist for name, dist, needed in COMPONENTS if needed}
    missing = [c for c in components if c.missing and c.name in required]
    if not missing:
        return None
    names = ", ".join(f"{c.name} ({c.location})" for c in missing)
    dists = " ".join(required[c.name] for c in missing)
    return (
        f"Python inside the database server cannot import: {names}",
        f"install them into the project's venv (`.venv/bin/pip install {dists}`, or `make bootstrap`), "
        "then run `lungsql init` so the server uses that venv",
    )
