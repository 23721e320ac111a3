"""Training: seconds of `pipeline.fit` (what lungsql.train_model runs) against the number of patients,
on synthetic CNN features with a planted signal."""

from __future__ import annotations

import hashlib
import time

import numpy as np

from lungsql.bench.database import BenchDatabase
from lungsql.bench.sizes import Sizes
from lungsql.ml.features import GroupFeatures
from lungsql.server import pipeline

DIM = 1280  # EfficientNet-Lite0's pooled features
TARGET_SECONDS_1600 = 30.0


def synthetic_rows(patients: int, groups: int, seed: int = 2017) -> list[dict]:
    """Labelled features rows as lungsql.train_model reads them: half with cancer, whose most unusual
    image stands out in a few features."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(patients):
        label = i % 2
        array = rng.normal(0.0, 1.0, size=(groups, DIM)).astype(np.float32)
        if label:
            array[rng.integers(groups), :16] += 2.5
        features = GroupFeatures(array, n_slices=3 * groups)
        rows.append({"patient_id": f"bench-{i:05d}", "label": label, "age_years": float(rng.integers(40, 80)),
                     "sex": "MF"[i % 3 % 2], "data": features.to_bytes(), "n_groups": groups, "dim": DIM,
                     "n_slices": features.n_slices, "sha256": hashlib.sha256(features.to_bytes()).hexdigest()})
    return rows


def run(db: BenchDatabase, sizes: Sizes) -> dict:
    points = []
    for n in sizes.training_patients:
        rows = synthetic_rows(n, sizes.groups_per_patient)
        started = time.perf_counter()
        result = pipeline.fit(rows, params=None)
        seconds = time.perf_counter() - started
        points.append({"patients": n, "seconds": round(seconds, 2), "auc": round(result.metrics["auc"], 3),
                       "best_iteration": result.best_iteration})
    largest = points[-1]
    out = {"features_per_image": DIM, "groups_per_patient": sizes.groups_per_patient, "points": points,
           "in_database": _in_database(db)}
    if largest["patients"] >= 1600:
        out["target"] = {"patients": largest["patients"], "value": largest["seconds"],
                         "at_most": TARGET_SECONDS_1600, "met": largest["seconds"] <= TARGET_SECONDS_1600}
    return out


def setup(db: BenchDatabase) -> None:
    """What the later sections need of this one when it is not measured: a deployed model."""
    with db.connect() as conn:
        conn.execute("SELECT * FROM lungsql.train_model()").fetchone()


def _in_database(db: BenchDatabase) -> dict:
    """One `SELECT * FROM lungsql.train_model()` on the uploaded cohort's real features, for reference
    (it also deploys the model the scoring and web benchmarks use)."""
    with db.connect() as conn:
        patients = conn.execute("SELECT count(*) FROM lungsql.features f JOIN lungsql.patients p "
                                "USING (patient_id) WHERE p.label IS NOT NULL").fetchone()[0]
        started = time.perf_counter()
        model_id, metrics = conn.execute("SELECT * FROM lungsql.train_model()").fetchone()
        seconds = time.perf_counter() - started
    return {"patients": patients, "seconds": round(seconds, 2), "model_id": model_id,
            "auc": round(float(metrics["auc"]), 3)}
