"""Explanations and the portable model: how long `lungsql.explain_prediction` and
`lungsql.slice_heatmap` take, and how closely the exported ONNX file gives the database's probability.

Run after the scoring benchmark, on its deployed model and the uploaded cohort: the attribution of
every patient in one warm session; the heat map of every slice of each patient's top group (the
first call of a session also opens the CNN's ONNX Runtime session); then `lungsql model export` and,
for every patient, the exported file run by ONNX Runtime alone on the patient's stored series
against `lungsql.predict_lung_cancer`.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import sqlalchemy as sa

from lungsql.bench.database import BenchDatabase
from lungsql.bench.scoring import percentile
from lungsql.client import model_export

TARGET_MAP_S = 1.0


def run(db: BenchDatabase, patients_at_most: int | None = None) -> dict:
    with db.connect() as conn:
        patients = [r[0] for r in conn.execute("SELECT patient_id FROM lungsql.features ORDER BY patient_id")]
    patients = patients[:patients_at_most] if patients_at_most else patients
    with db.connect() as conn:
        model_id = conn.execute("SELECT lungsql.warm_up()").fetchone()[0]
        conn.execute("SELECT count(*) FROM lungsql.explain_prediction(%s)", (patients[0],)).fetchone()
        explain_ms, top = [], {}
        for patient in patients:
            started = time.perf_counter()
            rows = conn.execute("SELECT part, scan_ids FROM lungsql.explain_prediction(%s)", (patient,)).fetchall()
            explain_ms.append((time.perf_counter() - started) * 1000)
            top[patient] = rows[0][1]
    first_map_s, maps_s = [], []
    for patient in patients:
        with db.connect() as conn:  # a new session: the first map also opens the CNN
            for i, scan_id in enumerate(top[patient]):
                started = time.perf_counter()
                conn.execute("SELECT rows FROM lungsql.slice_heatmap(%s, %s)", (patient, scan_id)).fetchone()
                (first_map_s if i == 0 else maps_s).append(time.perf_counter() - started)
    export = _export_parity(db, model_id, patients)
    warm = statistics.median(maps_s) if maps_s else statistics.median(first_map_s)
    return {
        "patients": len(patients),
        "explain_p50_ms": round(percentile(explain_ms, 50), 1),
        "explain_p99_ms": round(percentile(explain_ms, 99), 1),
        "heatmap_first_in_session_s": round(statistics.median(first_map_s), 3),
        "heatmap_warm_p50_s": round(warm, 3),
        "heatmaps": len(first_map_s) + len(maps_s),
        "export": export,
        "target": {"value": round(warm, 3), "at_most": TARGET_MAP_S, "met": warm <= TARGET_MAP_S},
    }


def _export_parity(db: BenchDatabase, model_id: int, patients: list[str]) -> dict:
    from lungsql.dicom.series import read_slices
    from lungsql.ml.portable import PortableModel

    engine = sa.create_engine(db.url)
    try:
        with tempfile.TemporaryDirectory(prefix="lungsql-bench-export-") as work:
            out = Path(work) / "model.onnx"
            summary = model_export.export_model(engine, model_id, out)
            portable = PortableModel(out.read_bytes())
        differences, run_ms = [], []
        with engine.begin() as conn:
            for patient in patients:
                row = conn.execute(sa.text(
                    "SELECT f.series_instance_uid, p.age_years, p.sex FROM lungsql.features f "
                    "JOIN lungsql.patients p USING (patient_id) JOIN lungsql.models m ON m.cnn_id = f.cnn_id "
                    "WHERE f.patient_id = :p AND m.model_id = :m"), {"p": patient, "m": model_id}).one()
                scans = conn.execute(sa.text(
                    "SELECT dicom, z_position, frame_z FROM lungsql.scans WHERE patient_id = :p "
                    "AND series_instance_uid = :s ORDER BY scan_id"), {"p": patient, "s": row.series_instance_uid}
                ).all()
                slices, rescale = read_slices([tuple(s) for s in scans])
                started = time.perf_counter()
                theirs = portable.predict(slices, age=row.age_years, sex=row.sex, rescale=rescale)
                run_ms.append((time.perf_counter() - started) * 1000)
                ours = conn.execute(sa.text("SELECT lungsql.predict_lung_cancer(:p)"), {"p": patient}).scalar()
                differences.append(abs(theirs - ours))
    finally:
        engine.dispose()
    return {"seconds": summary["seconds"], "bytes": summary["bytes"], "max_abs_difference": max(differences),
            "patients": len(differences), "onnxruntime_p50_ms": round(statistics.median(run_ms), 1)}
