"""The chest radiograph task: time per 1,000 radiographs to upload, featurize and score.

A synthetic ChestX-ray14 cohort (lungsql.dicom.synth_xray) is drawn at 256 x 256 and written again
at ChestX-ray14's own size, 1024 x 1024 8-bit PNG, so that reading and decoding cost what they
cost on the real download. Then: `lungsql ingest --task chest_xray14`, `CALL
lungsql.generate_features(task => 'chest_xray14')` with the newest CNN (the whole image resized to
its input; the run's own seconds, as lungsql.feature_runs times it), `lungsql.train_findings()`,
and scoring: `lungsql.predict_findings` one image per call (warm) and
`lungsql.predict_findings_batch` over every image.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from lungsql.bench.database import BenchDatabase
from lungsql.bench.scoring import percentile

SIDE = 1024


def run(db: BenchDatabase, patients: int = 80, calls: int = 100) -> dict:
    import cv2

    from lungsql.client import radiograph_ingest
    from lungsql.dicom import synth_xray

    with tempfile.TemporaryDirectory(prefix="lungsql-bench-xray-") as work:
        out = Path(work)
        summary = synth_xray.write_cohort(out, patients=patients, size=256, seed=2017)
        for path in (out / "images").glob("*.png"):
            small = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
            cv2.imwrite(str(path), cv2.resize(small, (SIDE, SIDE), interpolation=cv2.INTER_CUBIC))
        started = time.perf_counter()
        uploaded = radiograph_ingest.ingest(db.engine, out)
        upload_s = time.perf_counter() - started
    with db.connect() as conn:
        conn.execute("CALL lungsql.generate_features(task => 'chest_xray14')")
        images, seconds, provider = conn.execute(
            "SELECT patients, seconds, provider FROM lungsql.feature_runs WHERE task = 'chest_xray14' "
            "ORDER BY run_id DESC LIMIT 1").fetchone()
        started = time.perf_counter()
        rows = conn.execute("SELECT finding, auc FROM lungsql.train_findings()").fetchall()
        train_s = time.perf_counter() - started
        ids = [r[0] for r in conn.execute("SELECT image_id FROM lungsql.radiographs ORDER BY image_id")]
        conn.execute("SELECT count(*) FROM lungsql.predict_findings(%s)", (ids[0],)).fetchone()  # warm
        single_ms = []
        for i in range(calls):
            started = time.perf_counter()
            conn.execute("SELECT count(*) FROM lungsql.predict_findings(%s)", (ids[i % len(ids)],)).fetchone()
            single_ms.append((time.perf_counter() - started) * 1000)
        started = time.perf_counter()
        conn.execute("SELECT count(*) FROM lungsql.predict_findings_batch(%s)", (ids,)).fetchone()
        batch_s = time.perf_counter() - started
    aucs = {finding: auc for finding, auc in rows}
    return {
        "images": summary.images, "patients": summary.patients, "side": SIDE,
        "upload_s_per_1000": round(upload_s / uploaded.stored * 1000, 1),
        "featurize_s_per_1000": round(seconds / images * 1000, 1), "featurize_images_per_s": round(images / seconds, 1),
        "provider": provider,
        "train_s": round(train_s, 1), "mean_auc": aucs.get("mean"),
        "auc": {f: (round(a, 3) if a is not None else None) for f, a in aucs.items() if f != "mean"},
        "score_one_p50_ms": round(percentile(single_ms, 50), 2), "score_one_p99_ms": round(percentile(single_ms, 99), 2),
        "score_batch_s_per_1000": round(batch_s / len(ids) * 1000, 2),
    }
