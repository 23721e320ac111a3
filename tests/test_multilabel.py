"""One LightGBM booster per finding (lungsql.ml.multilabel): the split keeps patients whole, each
finding has its own weighting and metrics, and the stored boosters are checked before use."""

from __future__ import annotations

import numpy as np
import pytest

from lungsql.errors import IntegrityError
from lungsql.ml import multilabel

FINDINGS = ("A", "B", "C")


def cohort(n_patients: int = 80, per_patient: int = 3, seed: int = 0):
    rng = np.random.default_rng(seed)
    patients = [f"p{i:03d}" for i in range(n_patients) for _ in range(per_patient)]
    Y = (rng.random((len(patients), 3)) < [0.3, 0.15, 0.05]).astype(int)
    X = rng.normal(size=(len(patients), 12)).astype(np.float32)
    X[:, :3] += 2.5 * Y  # each finding shows in one feature
    return X, Y, patients


def test_each_finding_gets_its_booster_its_weighting_and_its_auc():
    X, Y, patients = cohort()
    result = multilabel.train(X, Y, patients, FINDINGS, [f"f{i}" for i in range(12)],
                              params={"num_iterations": 60, "min_data_in_leaf": 3})
    assert [b.finding for b in result.boosters] == list(FINDINGS)
    per = result.metrics["per_finding"]
    assert all(per[f]["auc"] > 0.85 for f in FINDINGS), per
    assert result.metrics["mean_auc"] == pytest.approx(np.mean([per[f]["auc"] for f in FINDINGS]))
    assert result.metrics["split"] == "patient"
    # Validation counts add up to the held-out images, finding by finding.
    assert {per[f]["positives"] + per[f]["negatives"] for f in FINDINGS} == {result.metrics["valid_images"]}
    assert per["C"]["train_positives"] < per["A"]["train_positives"]


def test_no_patient_is_on_both_sides_of_the_split():
    _, _, patients = cohort()
    held = multilabel.patient_split(patients, 0.25, seed=5)
    assert {p for p, h in zip(patients, held) if h}.isdisjoint({p for p, h in zip(patients, held) if not h})
    assert 0.2 < held.mean() < 0.3


def test_the_official_split_is_honoured_and_a_patient_on_both_lists_is_refused():
    X, Y, patients = cohort()
    split = ["test" if int(p[1:]) % 5 == 0 else "train_val" for p in patients]
    result = multilabel.train(X, Y, patients, FINDINGS, [f"f{i}" for i in range(12)],
                              params={"num_iterations": 20}, official_split=split)
    assert result.metrics["split"] == "official" and result.metrics["valid_images"] == split.count("test")
    split[1] = "test"  # patient p000's second image on the other list
    split[0] = "train_val"
    with pytest.raises(Exception, match="images on both official lists"):
        multilabel.train(X, Y, patients, FINDINGS, [f"f{i}" for i in range(12)], official_split=split)


def test_a_stored_model_is_checked_booster_by_booster():
    X, Y, patients = cohort()
    result = multilabel.train(X, Y, patients, FINDINGS, [f"f{i}" for i in range(12)], params={"num_iterations": 10})
    stored = {b.finding: (b.model_text, b.sha256) for b in result.boosters}
    model = multilabel.FindingsModel(result.manifest, result.sha256, stored, model_id=1)
    rows = model.predict(X[:4])
    assert len(rows) == 4 and set(rows[0]) == set(FINDINGS) and all(0 <= p <= 1 for p in rows[0].values())
    altered = dict(stored, B=(stored["B"][0].replace("tree", "tree ", 1), stored["B"][1]))
    with pytest.raises(IntegrityError):
        multilabel.FindingsModel(result.manifest, result.sha256, altered, model_id=1)
    swapped = dict(stored, B=stored["A"])
    with pytest.raises(IntegrityError, match="not the one its manifest names"):
        multilabel.FindingsModel(result.manifest, result.sha256, swapped, model_id=1)
    with pytest.raises(IntegrityError, match="manifest does not match"):
        multilabel.FindingsModel(result.manifest + " ", result.sha256, stored, model_id=1)


def test_a_rare_finding_still_has_held_out_patients():
    patients = [f"p{i:03d}" for i in range(100)]
    Y = np.zeros((100, 2), int)
    Y[[3, 40, 77], 1] = 1  # three patients have the rare finding
    Y[::2, 0] = 1
    for seed in range(10):
        held = multilabel.patient_split(patients, 0.25, seed, Y)
        assert 1 <= held[Y[:, 1] == 1].sum() <= 2 and held.sum() == 25
        assert 0.4 < Y[held, 0].mean() < 0.6
