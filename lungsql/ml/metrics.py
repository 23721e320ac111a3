"""How well predicted cancer probabilities separate patients: ROC, AUC, log loss, Brier.

Pure numpy, no scikit-learn.  ``y`` holds labels 0 (no cancer) and 1
(cancer); ``p`` holds predicted probabilities of cancer, one per patient.

``summary`` is what training stores with a model: every value is a plain
``int``, ``float`` or ``None`` (or a list of them), so it goes into a ``jsonb``
column with ``json.dumps`` as it is.  It needs both classes and raises a
`ConfigurationError` that says which class is missing otherwise.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

from lungsql.errors import ConfigurationError

__all__ = [
    "Confusion",
    "LOG_LOSS_EPS",
    "ROC_MAX_POINTS",
    "brier",
    "confusion_at",
    "log_loss",
    "roc_auc",
    "roc_curve",
    "summary",
]

#: Probabilities are clipped to [eps, 1 - eps] before taking logarithms, so one
#: confident mistake costs about 34.5 instead of infinity.
LOG_LOSS_EPS = 1e-15

#: ``summary`` keeps at most this many points of the ROC curve.
ROC_MAX_POINTS = 100


class Confusion(NamedTuple):
    """Counts at one threshold; a patient is called positive when p >= threshold.

    ``sensitivity`` (tp / positives) or ``specificity`` (tn / negatives) is NaN
    when its class has no patient.
    """

    sensitivity: float
    specificity: float
    tp: int
    fp: int
    tn: int
    fn: int


def _check(y: Any, p: Any) -> tuple[np.ndarray, np.ndarray]:
    """Return y as int64 0/1 and p as finite float64, both 1-D and of one length."""
    y_arr = np.asarray(y)
    p_arr = np.asarray(p, dtype=np.float64)
    if y_arr.ndim != 1 or p_arr.ndim != 1:
        raise ConfigurationError(
            f"labels and probabilities must be 1-D, one value per patient; got shapes "
            f"{y_arr.shape} and {p_arr.shape}",
            hint="pass one label and one probability per patient",
        )
    if y_arr.shape != p_arr.shape:
        raise ConfigurationError(
            f"{y_arr.size} labels but {p_arr.size} probabilities",
            hint="pass one label and one probability per patient, in the same order",
        )
    if y_arr.size == 0:
        raise ConfigurationError(
            "no patients to evaluate", hint="evaluate on at least one labelled patient of each class"
        )
    bad = ~np.isin(y_arr, (0, 1))
    if bad.any():
        raise ConfigurationError(
            f"labels must be 0 (no cancer) or 1 (cancer); found {y_arr[bad][0]!r} "
            f"at position {int(np.flatnonzero(bad)[0])}",
            hint="fix or remove that label",
        )
    bad = ~np.isfinite(p_arr)
    if bad.any():
        raise ConfigurationError(
            f"probability at position {int(np.flatnonzero(bad)[0])} is {p_arr[bad][0]}",
            hint="probabilities must be finite numbers in [0, 1]",
        )
    return y_arr.astype(np.int64), p_arr


def _require_both_classes(y: np.ndarray, what: str) -> None:
    positives = int(y.sum())
    negatives = int(y.size - positives)
    if positives and negatives:
        return
    missing, present = ("positive (cancer = 1)", "negative") if not positives else (
        "negative (cancer = 0)", "positive")
    raise ConfigurationError(
        f"{what} needs both classes, but the {y.size} labelled patients evaluated "
        f"contain no {missing} patient (all {y.size} are {present})",
        hint="label more patients of the missing class, or evaluate on a larger set of patients "
             "(for training: a larger valid_fraction)",
    )


def _average_ranks(values: np.ndarray) -> np.ndarray:
    """Ranks 1..n of ``values``, tied values sharing the mean of their ranks."""
    order = np.argsort(values, kind="mergesort")
    sorted_values = values[order]
    # Start of each run of equal values, and the run each sorted position belongs to.
    starts = np.flatnonzero(np.r_[True, sorted_values[1:] != sorted_values[:-1]])
    ends = np.r_[starts[1:], values.size]  # exclusive
    run_of = np.repeat(np.arange(starts.size), ends - starts)
    mean_rank = (starts + 1 + ends) / 2.0  # mean of ranks starts+1 .. ends
    ranks = np.empty(values.size, dtype=np.float64)
    ranks[order] = mean_rank[run_of]
    return ranks


def roc_auc(y: Any, p: Any) -> float:
    """Area under the ROC curve: the probability that a random cancer patient
    gets a higher p than a random patient without cancer, ties counting half.

    Computed from average ranks (the Mann-Whitney U statistic), so tied
    probabilities are handled exactly.
    """
    y_arr, p_arr = _check(y, p)
    _require_both_classes(y_arr, "AUC")
    positives = int(y_arr.sum())
    negatives = y_arr.size - positives
    ranks = _average_ranks(p_arr)
    u = ranks[y_arr == 1].sum() - positives * (positives + 1) / 2.0
    return float(u / (positives * negatives))


def roc_curve(y: Any, p: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ROC curve: false- and true-positive rates at every distinct threshold.

    Returns ``(fpr, tpr, thresholds)``, thresholds decreasing; a patient is
    called positive when ``p >= threshold``.  The first point is (0, 0) at
    threshold ``inf`` (nobody called positive), the last is (1, 1) at the
    lowest probability.  Needs both classes.
    """
    y_arr, p_arr = _check(y, p)
    _require_both_classes(y_arr, "ROC curve")
    order = np.argsort(-p_arr, kind="mergesort")
    p_sorted = p_arr[order]
    y_sorted = y_arr[order]
    # Last position of each run of equal probabilities: the curve moves there.
    last = np.r_[np.flatnonzero(p_sorted[1:] != p_sorted[:-1]), p_sorted.size - 1]
    tps = np.cumsum(y_sorted)[last]
    fps = (last + 1) - tps
    tpr = np.r_[0.0, tps / tps[-1]]
    fpr = np.r_[0.0, fps / fps[-1]]
    thresholds = np.r_[np.inf, p_sorted[last]]
    return fpr, tpr, thresholds


def log_loss(y: Any, p: Any, eps: float = LOG_LOSS_EPS) -> float:
    """Mean negative log-likelihood of the labels, probabilities clipped to [eps, 1 - eps]."""
    y_arr, p_arr = _check(y, p)
    clipped = np.clip(p_arr, eps, 1.0 - eps)
    losses = -(y_arr * np.log(clipped) + (1 - y_arr) * np.log1p(-clipped))
    return float(losses.mean())


def brier(y: Any, p: Any) -> float:
    """Brier score: mean squared difference between probability and label (0 is perfect)."""
    y_arr, p_arr = _check(y, p)
    return float(np.mean((p_arr - y_arr) ** 2))


def confusion_at(y: Any, p: Any, threshold: float = 0.5) -> Confusion:
    """Sensitivity, specificity and the four counts when ``p >= threshold`` means cancer."""
    y_arr, p_arr = _check(y, p)
    called = p_arr >= threshold
    actual = y_arr == 1
    tp = int(np.sum(called & actual))
    fp = int(np.sum(called & ~actual))
    tn = int(np.sum(~called & ~actual))
    fn = int(np.sum(~called & actual))
    sensitivity = tp / (tp + fn) if tp + fn else float("nan")
    specificity = tn / (tn + fp) if tn + fp else float("nan")
    return Confusion(float(sensitivity), float(specificity), tp, fp, tn, fn)


def _thin(n: int, max_points: int) -> np.ndarray:
    """Indices of at most ``max_points`` of ``n`` points, first and last always kept."""
    if n <= max_points:
        return np.arange(n)
    return np.unique(np.round(np.linspace(0, n - 1, max_points)).astype(np.int64))


def _drop_collinear(fpr: np.ndarray, tpr: np.ndarray) -> np.ndarray:
    """Indices of the ROC points that are corners (the others lie on a straight segment)."""
    if fpr.size <= 2:
        return np.arange(fpr.size)
    d_fpr, d_tpr = np.diff(fpr), np.diff(tpr)
    # A middle point is a corner when the direction changes there.
    corner = (d_fpr[:-1] * d_tpr[1:] - d_tpr[:-1] * d_fpr[1:]) != 0
    return np.flatnonzero(np.r_[True, corner, True])


def summary(y: Any, p: Any, threshold: float = 0.5, max_roc_points: int = ROC_MAX_POINTS) -> dict:
    """Everything training records about predictions on labelled patients.

    Keys: ``n``, ``positives``, ``negatives``, ``auc``, ``log_loss``, ``brier``,
    ``threshold``, ``sensitivity``, ``specificity``, ``tp``, ``fp``, ``tn``,
    ``fn`` and ``roc`` = ``{"fpr": [...], "tpr": [...], "threshold": [...]}``
    with at most ``max_roc_points`` points (straight-segment points dropped
    first, then an even selection); the first threshold is ``None`` (standing
    for +infinity: nobody called positive).  All values are JSON-serialisable.

    Raises `ConfigurationError` when one class is missing.
    """
    y_arr, p_arr = _check(y, p)
    _require_both_classes(y_arr, "evaluating a model")
    fpr, tpr, thresholds = roc_curve(y_arr, p_arr)
    keep = _drop_collinear(fpr, tpr)
    keep = keep[_thin(keep.size, max(2, int(max_roc_points)))]
    confusion = confusion_at(y_arr, p_arr, threshold)
    positives = int(y_arr.sum())
    return {
        "n": int(y_arr.size),
        "positives": positives,
        "negatives": int(y_arr.size - positives),
        "auc": roc_auc(y_arr, p_arr),
        "log_loss": log_loss(y_arr, p_arr),
        "brier": brier(y_arr, p_arr),
        "threshold": float(threshold),
        "sensitivity": confusion.sensitivity,
        "specificity": confusion.specificity,
        "tp": confusion.tp,
        "fp": confusion.fp,
        "tn": confusion.tn,
        "fn": confusion.fn,
        "roc": {
            "fpr": [float(v) for v in fpr[keep]],
            "tpr": [float(v) for v in tpr[keep]],
            "threshold": [None if np.isinf(v) else float(v) for v in thresholds[keep]],
        },
    }
