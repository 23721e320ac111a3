"""Featurization on a real Apache Spark (local[2], one session for the test run) over the test
database: the same features as the stored procedure, the same run records, reruns without duplicates."""

from __future__ import annotations

import numpy as np
import pytest
import sqlalchemy as sa

from databases import call
from lungsql.client import cnns, ingest
from lungsql.dicom import synth
from lungsql.ml import cnn_export
from lungsql.ml.features import GroupFeatures



@pytest.fixture(scope="session")
def spark():
    from lungsql.spark.featurize import session

    spark = session("local[2]", app_name="lungsql-tests")
    yield spark
    spark.stop()


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    out = tmp_path_factory.mktemp("spark-cohort")
    synth.write_cohort(out, patients=8, slices=(4, 6), seed=13)
    return out


@pytest.fixture
def loaded(engine, cohort, db_env):
    cnn_export.export_builtin("efficientnet-lite0", cache_dir=cnn_export.default_cache_dir())
    ingest.ingest(engine, cohort)
    cnns.import_builtin(engine)
    return engine


def features(engine) -> dict[str, np.ndarray]:
    with engine.connect() as conn:
        return {r.patient_id: GroupFeatures.from_bytes(r.data, (r.n_groups, r.dim), r.sha256,
                                                       n_slices=r.n_slices).array
                for r in conn.execute(sa.text("SELECT * FROM lungsql.features"))}


def test_spark_gives_the_features_of_the_stored_procedure(spark, loaded, db_env):
    from lungsql.spark.featurize import run

    result = run(spark, partitions=3, url=db_env)
    on_spark = features(loaded)
    assert result.patients == len(on_spark) == 8 and [s.shard for s in result.shards] == [0, 1, 2]
    with loaded.connect() as conn:
        runs = conn.execute(sa.text("SELECT shard, shards, patients, status, provider FROM lungsql.feature_runs "
                                    "ORDER BY shard")).all()
    assert [(r.shard, r.shards, r.status) for r in runs] == [(0, 3, "finished"), (1, 3, "finished"),
                                                             (2, 3, "finished")]
    assert sum(r.patients for r in runs) == 8 and {r.provider for r in runs} == {"CPUExecutionProvider"}
    call(loaded, "CALL lungsql.generate_features(only_missing => false)")
    in_database = features(loaded)
    assert set(in_database) == set(on_spark)
    for patient, array in on_spark.items():
        np.testing.assert_allclose(array, in_database[patient], rtol=1e-4, atol=1e-5)


def test_a_rerun_after_part_of_a_job_finishes_the_rest_once(spark, loaded, db_env):
    from lungsql.spark.featurize import run

    for shard in range(3):  # as if the job stopped midway: one shard of three done
        call(loaded, f"CALL lungsql.generate_features(shard => {shard}, shards => 3)")
        before = features(loaded)
        if before:
            break
    assert 0 < len(before) < 8
    result = run(spark, partitions=2, url=db_env)
    assert result.patients == 8 - len(before)  # only what was missing
    with loaded.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM lungsql.features")).scalar() == 8
    again = run(spark, partitions=2, url=db_env)
    assert again.patients == 0


def test_an_undecodable_slice_is_recorded_and_the_job_goes_on(spark, loaded, db_env):
    from lungsql.spark.featurize import run

    with loaded.begin() as conn:
        victim = conn.execute(sa.text("SELECT patient_id FROM lungsql.patients ORDER BY 1 LIMIT 1")).scalar()
        conn.execute(sa.text("UPDATE lungsql.scans SET dicom = substring(dicom FROM 1 FOR 600), "
                             "sha256 = sha256(substring(dicom FROM 1 FOR 600)) "
                             "WHERE scan_id = (SELECT min(scan_id) FROM lungsql.scans WHERE patient_id = :p)"),
                     {"p": victim})
    result = run(spark, partitions=2, url=db_env)
    assert result.patients == 7 and sum(s.failed for s in result.shards) == 1
    with loaded.connect() as conn:
        failures = conn.execute(sa.text("SELECT patient_id, reason FROM lungsql.feature_failures")).all()
    assert [f.patient_id for f in failures] == [victim] and failures[0].reason


def test_the_command_featurizes_on_spark(spark, loaded, db_env):
    from click.testing import CliRunner

    from lungsql.client.cli import main

    result = CliRunner().invoke(main, ["featurize", "--engine", "spark", "--master", "local[2]", "--partitions", "2"])
    assert result.exit_code == 0, result.output
    assert "8 patients" in result.output and "on 2 Spark tasks" in result.output
    with loaded.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM lungsql.features")).scalar() == 8


def test_batch_scoring_on_spark_records_what_the_batch_function_gives(spark, loaded, db_env):
    from lungsql.spark.featurize import run, score

    run(spark, partitions=2, url=db_env)
    splitting = ('{"min_data_in_leaf": 1, "min_data_in_bin": 1, "num_iterations": 20, "early_stopping_round": 0, '
                 '"feature_fraction": 0.05}')
    call(loaded, "SELECT * FROM lungsql.train_model('lightgbm', %s::jsonb)", (splitting,))
    on_spark = score(spark, partitions=2, url=db_env)
    with loaded.connect() as conn:
        recorded = conn.execute(sa.text("SELECT count(*) FROM lungsql.predictions")).scalar()
        batch = dict(conn.execute(sa.text("SELECT patient_id, probability FROM lungsql.predict_lung_cancer_batch("
                                          "ARRAY(SELECT patient_id FROM lungsql.features))")).all())
    assert len(on_spark) == 8 and recorded == 8 and len(set(batch.values())) > 1
    for patient, probability in on_spark:
        assert probability == pytest.approx(batch[patient], abs=1e-12)
