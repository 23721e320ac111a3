"""The pipeline on a demo-sized cohort (64 patients, 40-60 slices each): a
featurization cancelled midway with pg_cancel_backend and resumed, and a model
whose validation AUC shows the CNN features carry the nodules' signal."""

from __future__ import annotations

import threading
import time

import psycopg
import pytest
import sqlalchemy as sa

from databases import create_database, drop_database
from lungsql.client import cnns, ingest, migrations
from lungsql.dicom import synth

pytest.importorskip("torch", reason="the built-in CNN is exported with the export extra (make bootstrap)")

PATIENTS, SLICES, SEED = 64, (40, 60), 2017


@pytest.fixture(scope="module")
def cohort_db(cluster, tmp_path_factory):
    """One database for the module: the demo cohort uploaded, the built-in CNN imported."""
    out = tmp_path_factory.mktemp("demo-cohort")
    synth.write_cohort(out, patients=PATIENTS, slices=SLICES, seed=SEED)
    name = create_database(cluster)
    engine = sa.create_engine(cluster.url(dbname=name))
    migrations.init(engine)
    ingest.ingest(engine, out)
    cnns.import_builtin(engine)
    yield engine, cluster.url(dbname=name).replace("+psycopg", "")
    engine.dispose()
    drop_database(cluster, name)


def count(url: str, sql: str) -> int:
    with psycopg.connect(url) as conn:
        return conn.execute(sql).fetchone()[0]


def test_cancelled_featurization_keeps_finished_patients_and_resumes(cohort_db):
    _, url = cohort_db
    worker = psycopg.connect(url, autocommit=True)
    pid = worker.info.backend_pid
    outcome = {}

    def featurize():
        try:
            worker.execute("CALL lungsql.generate_features()")
            outcome["finished"] = True
        except psycopg.errors.QueryCanceled as exc:
            outcome["cancelled"] = str(exc)

    thread = threading.Thread(target=featurize)
    thread.start()
    deadline = time.monotonic() + 120
    while count(url, "SELECT count(*) FROM lungsql.features") < 3 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert count(url, f"SELECT count(*) FROM pg_stat_activity WHERE pid = {pid}") == 1
    with psycopg.connect(url, autocommit=True) as admin:
        admin.execute("SELECT pg_cancel_backend(%s)", (pid,))
    thread.join(120)
    worker.close()
    assert "cancelled" in outcome, outcome
    kept = count(url, "SELECT count(*) FROM lungsql.features")
    assert 3 <= kept < PATIENTS
    # Every kept row is whole: its bytes match its shape and its SHA-256.
    assert count(url, "SELECT count(*) FROM lungsql.features "
                      "WHERE length(data) <> 4 * n_groups * dim OR sha256 <> encode(sha256(data), 'hex')") == 0
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("CALL lungsql.generate_features()")
    assert count(url, "SELECT count(*) FROM lungsql.features") == PATIENTS
    assert count(url, "SELECT count(DISTINCT patient_id) FROM lungsql.features") == PATIENTS
    assert count(url, "SELECT patients FROM lungsql.feature_runs ORDER BY run_id DESC LIMIT 1") == PATIENTS - kept


def test_model_trained_in_the_database_separates_the_cohort(cohort_db):
    _, url = cohort_db
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("CALL lungsql.generate_features()")  # only what is missing
        model_id, metrics = conn.execute("SELECT * FROM lungsql.train_model()").fetchone()
        probabilities = conn.execute(
            "SELECT l.label, b.probability FROM lungsql.predict_lung_cancer_batch("
            "ARRAY(SELECT patient_id FROM lungsql.patients)) b JOIN lungsql.patients l USING (patient_id)"
        ).fetchall()
    assert metrics["valid_patients"] >= 15 and metrics["train_patients"] >= 45
    assert metrics["auc"] >= 0.85, metrics
    assert len(probabilities) == PATIENTS
    assert all(0.0 <= p <= 1.0 for _, p in probabilities)
