"""Ensembles: several trained models deployed and scored as one.

An ensemble is stored as data, like every model: a JSON text naming its members by model id
and SHA-256 (so a member changed afterwards is refused, not silently used), the method and the
weights, with the SHA-256 of that text. Its probability for a patient combines the members'
probabilities, each member scoring the patient's features of its own CNN:

* ``mean``: the average;
* ``weighted``: the weighted average (weights given, or each member's validation AUC above
  0.5, so a member no better than chance counts for nothing);
* ``hard_vote``: the share of members whose probability is at least 0.5 (a majority vote, as a
  probability: 2 of 3 members gives 0.667);
* ``max``: the highest member probability (the most sensitive: one member is enough).
"""

from __future__ import annotations

import hashlib
import hmac
import json
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from lungsql.errors import ConfigurationError, IntegrityError

METHODS = ("mean", "weighted", "hard_vote", "max")
#: lungsql.models.algorithm and feature_set of an ensemble's row.
ALGORITHM = "ensemble"
FORMAT = "lungsql-ensemble-v1"


@dataclass(frozen=True)
class Member:
    model_id: int
    sha256: str
    weight: float


@dataclass(frozen=True)
class Ensemble:
    method: str
    members: tuple[Member, ...]

    def to_text(self) -> str:
        """The stored form: canonical JSON (its SHA-256 is the ensemble's)."""
        return json.dumps({"format": FORMAT, "method": self.method,
                           "members": [{"model_id": m.model_id, "sha256": m.sha256, "weight": m.weight}
                                       for m in self.members]}, sort_keys=True, separators=(",", ":"))

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.to_text().encode("utf-8")).hexdigest()

    def combine(self, probabilities: np.ndarray) -> np.ndarray:
        """(patients, members) member probabilities -> (patients,) ensemble probabilities."""
        p = np.asarray(probabilities, dtype=np.float64)
        if p.ndim != 2 or p.shape[1] != len(self.members):
            raise ValueError(f"expected (patients, {len(self.members)}) probabilities, got {p.shape}")
        if self.method == "mean":
            return p.mean(axis=1)
        if self.method == "weighted":
            w = np.array([m.weight for m in self.members])
            return p @ (w / w.sum())
        if self.method == "hard_vote":
            return (p >= 0.5).mean(axis=1)
        return p.max(axis=1)


def build(method: str, members: Sequence[dict[str, Any]], weights: Sequence[float] | None = None) -> Ensemble:
    """An ensemble of model rows (model_id, sha256, metrics); ConfigurationError naming what is wrong."""
    method = (method or "").strip().lower()
    if method not in METHODS:
        raise ConfigurationError(f"unknown ensemble method {method!r}", hint="use one of " + ", ".join(METHODS))
    ids = [int(m["model_id"]) for m in members]
    if len(ids) < 2 or len(set(ids)) != len(ids):
        raise ConfigurationError("an ensemble needs two or more different models",
                                 hint="e.g. model_ids => ARRAY[3, 5, 7]")
    if weights is not None and method != "weighted":
        raise ConfigurationError("weights are only for method => 'weighted'")
    if weights is None:
        if method == "weighted":
            weights = [max(0.0, float(_metrics(m).get("auc") or 0.5) - 0.5) for m in members]
            if not any(weights):
                raise ConfigurationError("no member is better than chance on its validation patients (AUC <= 0.5)",
                                         hint="give the weights: weights => ARRAY[...]")
        else:
            weights = [1.0] * len(members)
    weights = [float(w) for w in weights]
    if len(weights) != len(members) or any(not np.isfinite(w) or w < 0 for w in weights) or not sum(weights) > 0:
        raise ConfigurationError(f"weights must be {len(members)} finite numbers >= 0, not all 0; got {weights}")
    return Ensemble(method, tuple(Member(int(m["model_id"]), str(m["sha256"]), w) for m, w in zip(members, weights)))


def load(text: str, sha256: str) -> Ensemble:
    """An ensemble's stored text, checked against its SHA-256 before it is parsed (as data: JSON)."""
    actual = hashlib.sha256(text.encode("utf-8")).hexdigest()
    if not hmac.compare_digest(actual, str(sha256).strip().lower()):
        raise IntegrityError(f"the ensemble does not match its SHA-256 (expected {sha256}, got {actual})",
                             hint="the row was altered: deploy the ensemble again")
    spec = json.loads(text)
    if spec.get("format") != FORMAT or spec.get("method") not in METHODS:
        raise IntegrityError(f"not a lungsql ensemble ({spec.get('format')!r})")
    return Ensemble(spec["method"], tuple(Member(int(m["model_id"]), str(m["sha256"]), float(m["weight"]))
                                          for m in spec["members"]))


def _metrics(row: dict[str, Any]) -> dict[str, Any]:
    metrics = row.get("metrics") or {}
    return json.loads(metrics) if isinstance(metrics, str) else metrics
