"""The in-database pipeline called as a DBA calls it: CALL generate_features,
train_model, deploy, predict_lung_cancer, with the real exported CNN."""

from __future__ import annotations

import numpy as np
import psycopg
import pytest
import sqlalchemy as sa

from databases import call
from lungsql.client import cnns, ingest
from lungsql.dicom import synth
from lungsql.ml import cnn_export
from lungsql.server import pipeline
from lungsql.dicom.series import read_volume
from lungsql.ml.featurize import Featurizer
from lungsql.ml.features import GroupFeatures
from lungsql.ml.preprocess import Preprocessing

pytest.importorskip("torch", reason="the built-in CNN is exported with the export extra (make bootstrap)")

PATIENTS = 10


@pytest.fixture(scope="session")
def small_cohort(tmp_path_factory):
    out = tmp_path_factory.mktemp("pipeline-cohort")
    synth.write_cohort(out, patients=PATIENTS, slices=(4, 7), seed=11)
    return out


@pytest.fixture(scope="session")
def exported_cnn():
    return cnn_export.export_builtin("efficientnet-lite0", cache_dir=cnn_export.default_cache_dir())


@pytest.fixture
def loaded(engine, small_cohort, exported_cnn):
    """A database with the cohort uploaded and the built-in CNN imported."""
    ingest.ingest(engine, small_cohort)
    cnns.import_builtin(engine)
    return engine


def scalar(engine, sql: str, **params):
    with engine.connect() as conn:
        return conn.execute(sa.text(sql), params).scalar()


def test_generate_features_stores_every_patient_once_and_reports_progress(loaded):
    notices = []
    call(loaded, "CALL lungsql.generate_features()", notices=notices)
    assert scalar(loaded, "SELECT count(*) FROM lungsql.features") == PATIENTS
    assert any(n.startswith(f"{PATIENTS}/{PATIENTS} patients") and "slices/s" in n for n in notices)
    with loaded.connect() as conn:
        run = conn.execute(sa.text("SELECT * FROM lungsql.feature_runs")).one()
        slices = conn.execute(sa.text("SELECT count(*) FROM lungsql.scans")).scalar()
    assert (run.patients, run.slices, run.provider) == (PATIENTS, slices, "CPUExecutionProvider")
    assert run.finished_at is not None
    # Where the cores went: CPU seconds of every step, the CNN the largest, and the same in the last NOTICE.
    assert set(run.cpu_seconds) == {"reading", "decoding", "preprocessing", "cnn", "writing"}
    assert all(v >= 0 for v in run.cpu_seconds.values()) and run.cpu_seconds["cnn"] > 0
    assert max(run.cpu_seconds, key=run.cpu_seconds.get) == "cnn"
    assert any(n.startswith("reading ") and n.endswith("ms of CPU per slice") and " cnn " in n for n in notices)
    # A rerun finds nothing missing and adds nothing.
    call(loaded, "CALL lungsql.generate_features()")
    assert scalar(loaded, "SELECT count(*) FROM lungsql.features") == PATIENTS
    assert scalar(loaded, "SELECT patients FROM lungsql.feature_runs ORDER BY run_id DESC LIMIT 1") == 0


def test_features_from_the_procedure_equal_the_core_outside_the_database(loaded, exported_cnn):
    call(loaded, "CALL lungsql.generate_features()")
    with loaded.connect() as conn:
        row = conn.execute(sa.text("SELECT * FROM lungsql.features ORDER BY patient_id LIMIT 1")).one()
        scans = conn.execute(sa.text("SELECT dicom, z_position FROM lungsql.scans WHERE patient_id = :p"),
                             {"p": row.patient_id}).all()
        preprocessing = conn.execute(sa.text("SELECT preprocessing FROM lungsql.cnn_models")).scalar()
    stored = GroupFeatures.from_bytes(row.data, (row.n_groups, row.dim), row.sha256, n_slices=row.n_slices)
    featurizer = Featurizer(exported_cnn.onnx_bytes, "input", "features", Preprocessing.from_json(preprocessing))
    outside = featurizer.featurize_volume(read_volume([(bytes(d), z) for d, z in scans]))
    assert stored.shape == outside.shape == (-(-len(scans) // 3), 1280)
    np.testing.assert_allclose(stored.array, outside.array, rtol=1e-4, atol=1e-5)


def test_shards_split_the_patients_without_overlap(loaded):
    for shard in range(3):
        call(loaded, "CALL lungsql.generate_features(shard => %s, shards => 3)", (shard,))
    with loaded.connect() as conn:
        runs = conn.execute(sa.text("SELECT run_id, patients FROM lungsql.feature_runs ORDER BY run_id")).all()
        per_run = conn.execute(sa.text("SELECT run_id, count(*) FROM lungsql.features GROUP BY run_id")).all()
    assert sum(r.patients for r in runs) == PATIENTS
    assert sum(n for _, n in per_run) == PATIENTS
    ids = [f"p{i}" for i in range(200)]
    owners = [[s for s in range(3) if pipeline.in_shard(p, s, 3)] for p in ids]
    assert all(len(o) == 1 for o in owners)


def test_tampered_cnn_bytes_are_refused_and_nothing_runs(loaded):
    with loaded.begin() as conn:
        conn.execute(sa.text("UPDATE lungsql.cnn_models SET model = overlay(model placing '\\x00'::bytea "
                             "from 1000 for 1)"))
    with pytest.raises(psycopg.Error, match="do not match their SHA-256"):
        call(loaded, "CALL lungsql.generate_features()")
    assert scalar(loaded, "SELECT count(*) FROM lungsql.features") == 0


def test_train_deploy_predict_round_trip(loaded):
    call(loaded, "CALL lungsql.generate_features()")
    assert call(loaded, "SELECT lungsql.warm_up()") == [(None,)]  # nothing deployed yet
    (model_id, metrics), = call(loaded, "SELECT * FROM lungsql.train_model('lgbm')")
    for key in ("auc", "log_loss", "brier", "sensitivity", "specificity", "roc"):
        assert key in metrics
    with loaded.connect() as conn:
        model = conn.execute(sa.text("SELECT * FROM lungsql.models WHERE model_id = :m"), {"m": model_id}).one()
        deployed = conn.execute(sa.text("SELECT model_id, strategy FROM lungsql.deployments")).all()
        patient = conn.execute(sa.text("SELECT patient_id FROM lungsql.patients ORDER BY patient_id")).scalar()
    assert "objective=binary" in model.model_text and model.feature_set == pipeline.FEATURE_SET
    assert deployed == [(model_id, "first model")]
    assert call(loaded, "SELECT lungsql.warm_up()") == [(model_id,)]  # loads it, scores nobody
    first = call(loaded, "SELECT lungsql.predict_lung_cancer(%s)", (patient,))[0][0]
    second = call(loaded, "SELECT lungsql.predict_lung_cancer(%s, 'lgbm')", (patient,))[0][0]
    assert 0.0 <= first <= 1.0 and first == second
    batch = dict(call(loaded, "SELECT * FROM lungsql.predict_lung_cancer_batch("
                              "ARRAY(SELECT patient_id FROM lungsql.patients))"))
    assert len(batch) == PATIENTS and batch[patient] == first
    # The detailed form: the same probability, and the model and deployment that gave it.
    (detail,) = call(loaded, "SELECT probability, model_id, name, version, auc, deployment_name, strategy "
                             "FROM lungsql.predict_lung_cancer_detail(%s)", (patient,))
    assert detail == (first, model_id, "lgbm", 1, metrics["auc"], "lgbm", "first model")
    assert scalar(loaded, "SELECT count(*) FROM lungsql.predictions") == 3 + PATIENTS


def test_tampered_model_text_is_refused(loaded):
    call(loaded, "CALL lungsql.generate_features()")
    call(loaded, "SELECT * FROM lungsql.train_model()")
    with loaded.begin() as conn:
        conn.execute(sa.text("UPDATE lungsql.models SET model_text = replace(model_text, 'objective=binary', "
                             "'objective=regression')"))
    patient = scalar(loaded, "SELECT min(patient_id) FROM lungsql.patients")
    with pytest.raises(psycopg.Error, match="SHA-256"):
        call(loaded, "SELECT lungsql.predict_lung_cancer(%s)", (patient,))


def test_unknown_patient_is_a_clear_error(loaded):
    call(loaded, "CALL lungsql.generate_features()")
    call(loaded, "SELECT * FROM lungsql.train_model()")
    with pytest.raises(psycopg.Error, match="no features for patient 'nobody'"):
        call(loaded, "SELECT lungsql.predict_lung_cancer('nobody')")


def test_registry_deploys_only_better_models_and_follows_strategies(loaded):
    call(loaded, "CALL lungsql.generate_features()")

    def current():
        return scalar(loaded, "SELECT model_id FROM lungsql.deployments WHERE name = 'reg' "
                              "ORDER BY deployment_id DESC LIMIT 1")

    def train():
        return call(loaded, "SELECT * FROM lungsql.train_model('reg')")[0]

    first, _ = train()
    assert current() == first  # the first model of a name is deployed on its own
    second, _ = train()
    assert current() == first  # the same validation log loss is not better
    with loaded.begin() as conn:  # make the deployed model look poor
        conn.execute(sa.text("UPDATE lungsql.models SET metrics = jsonb_set(metrics, '{log_loss}', '9.9') "
                             "WHERE model_id = :m"), {"m": first})
    third, _ = train()
    assert current() == third  # better than the deployed one: replaces it
    assert call(loaded, "SELECT lungsql.deploy('reg', 'rollback')")[0][0] == first and current() == first
    assert call(loaded, "SELECT lungsql.deploy('reg', 'most_recent')")[0][0] == third
    assert call(loaded, "SELECT lungsql.deploy('reg', %s)", (str(second),))[0][0] == second
    assert call(loaded, "SELECT lungsql.deploy('reg')")[0][0] == third  # best_score, ties to the newest
    with pytest.raises(psycopg.Error, match="unknown strategy 'newest'"):
        call(loaded, "SELECT lungsql.deploy('reg', 'newest')")
    with pytest.raises(psycopg.Error, match="no model named 'other'"):
        call(loaded, "SELECT lungsql.deploy('other')")
    patient = scalar(loaded, "SELECT min(patient_id) FROM lungsql.patients")
    call(loaded, "SELECT lungsql.predict_lung_cancer(%s, 'reg')", (patient,))
    assert scalar(loaded, "SELECT model_id FROM lungsql.predictions ORDER BY prediction_id DESC LIMIT 1") == third
