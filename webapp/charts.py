"""Geometry of the ROC chart, drawn as inline SVG by templates/_roc.html (no JavaScript)."""

from __future__ import annotations

import math
from dataclasses import dataclass

SIZE = 240          # side of the plot area, in SVG units
LEFT, TOP = 44, 12  # margins for the axis labels
RIGHT, BOTTOM = 12, 40


@dataclass(frozen=True)
class _Plot:
    """The square plot area and its margins, in SVG units."""

    width: int = LEFT + SIZE + RIGHT
    height: int = TOP + SIZE + BOTTOM
    left: int = LEFT
    top: int = TOP
    size: int = SIZE

    @property
    def right(self) -> int:
        return LEFT + SIZE

    @property
    def bottom(self) -> int:
        return TOP + SIZE


@dataclass(frozen=True, kw_only=True)
class RocChart(_Plot):
    points: str                 # the curve, "x,y x,y ..." in SVG units
    ticks: list[tuple[float, str]]  # (position along an axis in SVG units, label)
    auc: float | None


def roc_chart(metrics: dict | None) -> RocChart | None:
    """The chart of ``metrics['roc']`` ({fpr: [...], tpr: [...]}), or None when there is no usable curve."""
    roc = (metrics or {}).get("roc") or {}
    fpr, tpr = roc.get("fpr"), roc.get("tpr")
    if not isinstance(fpr, list) or not isinstance(tpr, list) or len(fpr) != len(tpr) or len(fpr) < 2:
        return None
    points = []
    for x, y in zip(fpr, tpr):
        if not _unit(x) or not _unit(y):
            return None
        points.append(f"{LEFT + x * SIZE:.1f},{TOP + (1.0 - y) * SIZE:.1f}")
    auc = metrics.get("auc")
    return RocChart(points=" ".join(points), ticks=[(i / 4 * SIZE, f"{i / 4:g}") for i in range(5)],
                    auc=float(auc) if _finite(auc) else None)


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _unit(value) -> bool:
    return _finite(value) and 0.0 <= value <= 1.0


@dataclass(frozen=True, kw_only=True)
class RocOverlay(_Plot):
    """Several models' ROC curves on one plot (the admin page's comparison)."""

    curves: list[tuple[str, RocChart]]  # (label, chart) in the order of the legend
    ticks: list[tuple[float, str]]


def roc_overlay(models: list[tuple[str, dict | None]]) -> RocOverlay | None:
    """The curves of (label, metrics) pairs that have one; None when fewer than two have."""
    curves = [(label, chart) for label, metrics in models if (chart := roc_chart(metrics)) is not None]
    if len(curves) < 2:
        return None
    return RocOverlay(curves=curves, ticks=[(i / 4 * SIZE, f"{i / 4:g}") for i in range(5)])
