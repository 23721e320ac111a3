"""Scoring: `SELECT lungsql.predict_lung_cancer(...)`: the first call in a new session, warm latency
p50 and p99, and patients/s through `lungsql.predict_lung_cancer_batch`."""

from __future__ import annotations

import statistics
import time

from lungsql.bench.database import BenchDatabase
from lungsql.bench.sizes import Sizes

TARGET_P50_MS = 5.0
NEW_SESSIONS = 3


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def run(db: BenchDatabase, sizes: Sizes) -> dict:
    with db.connect() as conn:
        patients = [r[0] for r in conn.execute("SELECT patient_id FROM lungsql.features ORDER BY patient_id")]
    first = []
    for i in range(NEW_SESSIONS):
        with db.connect() as conn:
            started = time.perf_counter()
            conn.execute("SELECT lungsql.predict_lung_cancer(%s)", (patients[i % len(patients)],)).fetchone()
            first.append((time.perf_counter() - started) * 1000)

    warm = []
    with db.connect() as conn:
        conn.execute("SELECT lungsql.predict_lung_cancer(%s)", (patients[0],)).fetchone()
        for i in range(sizes.scoring_calls):
            started = time.perf_counter()
            probability = conn.execute("SELECT lungsql.predict_lung_cancer(%s)",
                                       (patients[i % len(patients)],)).fetchone()[0]
            warm.append((time.perf_counter() - started) * 1000)
            if not 0.0 <= probability <= 1.0:
                raise RuntimeError(f"predict_lung_cancer returned {probability}")

        started = time.perf_counter()
        for _ in range(sizes.batch_repeats):
            rows = conn.execute("SELECT * FROM lungsql.predict_lung_cancer_batch(%s)", (patients,)).fetchall()
            if len(rows) != len(patients):
                raise RuntimeError(f"predict_lung_cancer_batch returned {len(rows)} rows for {len(patients)}")
        batch_s = time.perf_counter() - started

    p50 = percentile(warm, 50)
    return {
        "patients": len(patients),
        "first_call_ms": round(statistics.median(first), 1),
        "first_call_ms_each": [round(v, 1) for v in first],
        "warm_calls": len(warm),
        "warm_p50_ms": round(p50, 2),
        "warm_p99_ms": round(percentile(warm, 99), 2),
        "warm_mean_ms": round(statistics.fmean(warm), 2),
        "batch_calls": sizes.batch_repeats,
        "batch_patients_per_s": round(sizes.batch_repeats * len(patients) / batch_s, 1),
        "target": {"value": round(p50, 2), "at_most": TARGET_P50_MS, "met": p50 <= TARGET_P50_MS},
    }
