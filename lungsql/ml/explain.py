"""Which groups of slices a patient's probability comes from.

LightGBM gives the exact TreeSHAP contribution of every entry of the patient's
vector (`pred_contrib`), in log-odds: they add up, with the model's bias, to
the raw score whose logistic is the probability. The vector is
[mean over groups, max minus mean over groups, log1p(slices), age, sex]
(lungsql.ml.features), so each CNN feature's two contributions can be carried
back to the groups of three slices they were computed from:

* the contribution of ``delta_i`` (how far the maximum stands out) goes to the
  group that holds the maximum of feature i;
* the contribution of ``mean_i`` is shared among the groups in proportion to
  each group's distance from that mean, |x_gi - mean_i| (equally when every
  group has the same value): the groups that move the mean carry it.

What belongs to the patient and no group (the number of slices, age, sex)
is reported apart. Nothing is lost: the groups' contributions, the patient's
and the bias add up to the raw score.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from lungsql.errors import ConfigurationError


@dataclass(frozen=True)
class Explanation:
    """A patient's score taken apart, in log-odds (the probability is the logistic of `raw_score`)."""

    groups: np.ndarray  # float64 (n_groups,): each group of slices' contribution
    patient: dict[str, float]  # contributions of the entries that belong to no group (log_slices, age, sex)
    bias: float  # the model's expected raw score
    per_feature: np.ndarray | None = None  # (n_groups, D): the groups' contributions feature by feature

    @property
    def raw_score(self) -> float:
        return float(self.groups.sum() + sum(self.patient.values()) + self.bias)

    @property
    def probability(self) -> float:
        return 1.0 / (1.0 + math.exp(-self.raw_score))

    def ranked(self) -> list[int]:
        """Group indices, the most contributing (towards cancer) first."""
        return [int(g) for g in np.argsort(-self.groups, kind="stable")]


def contributions(booster, vector: np.ndarray) -> np.ndarray:
    """TreeSHAP contributions of one vector's entries, then the bias: float64 (len(vector) + 1,)."""
    x = np.asarray(vector, dtype=np.float64).reshape(1, -1)
    return np.asarray(booster.predict(x, pred_contrib=True), dtype=np.float64).reshape(-1)


def explain(booster, groups: np.ndarray, vector: np.ndarray, feature_names: list[str]) -> Explanation:
    """The contributions of one patient's groups of slices (`groups`: its stored features, one row
    per group; `vector`: the model input built from them, whose entries `feature_names` names)."""
    groups = np.asarray(groups, dtype=np.float64)
    n, d = groups.shape
    if len(feature_names) != len(vector) or feature_names[:2 * d] != (
            [f"mean_{i}" for i in range(d)] + [f"delta_{i}" for i in range(d)]):
        raise ConfigurationError(
            "this model's features are not the mean and delta blocks of the stored CNN features, so its "
            "contributions cannot be carried back to groups of slices",
            hint="explain a model trained by lungsql.train_model on this CNN's features")
    contrib = contributions(booster, vector)
    per_feature = attribution(groups, contrib[:d], contrib[d:2 * d])
    patient = {name: float(c) for name, c in zip(feature_names[2 * d:], contrib[2 * d:-1])}
    return Explanation(per_feature.sum(axis=1), patient, float(contrib[-1]), per_feature)


def attribution(groups: np.ndarray, mean_part: np.ndarray, delta_part: np.ndarray) -> np.ndarray:
    """(n_groups, D): each group's share of each CNN feature's contributions (the module's rule)."""
    n = groups.shape[0]
    distance = np.abs(groups - groups.mean(axis=0))
    total = distance.sum(axis=0)
    share = np.divide(distance, total, out=np.full_like(distance, 1.0 / n), where=total > 0)
    per_feature = share * mean_part
    per_feature[groups.argmax(axis=0), np.arange(groups.shape[1])] += delta_part
    return per_feature


def group_slices(n_groups: int, n_slices: int, slices_per_image: int = 3) -> list[range]:
    """The slices (indices in z order) each group holds, as lungsql.ml.preprocess.pack_groups packs them."""
    return [range(g * slices_per_image, min((g + 1) * slices_per_image, n_slices)) for g in range(n_groups)]
