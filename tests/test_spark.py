"""Featurization on a real Apache Spark (local[2], one session for the test run) over the test
database: the same features as the stored procedure, the same run records, reruns without duplicates."""

from __future__ import annotations

import time

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


def _source_tree(cohort, tmp_path):
    """The cohort's files, copied, with a file that is not DICOM and one cut short."""
    import shutil

    tree = tmp_path / "archive"
    shutil.copytree(cohort, tree)
    slices = sorted(tree.rglob("*.dcm"))
    (tree / "notes.txt").write_text("not a DICOM file")
    (tree / "cut.dcm").write_bytes(slices[0].read_bytes()[:300])
    return tree, len(slices)


def test_files_on_shared_storage_give_the_features_of_the_same_scans_in_the_database(spark, engine, cohort,
                                                                                     db_env, tmp_path):
    from lungsql.spark import files

    cnn_export.export_builtin("efficientnet-lite0", cache_dir=cnn_export.default_cache_dir())
    cnns.import_builtin(engine)
    tree, n_slices = _source_tree(cohort, tmp_path)
    result = files.run(spark, str(tree), partitions=3, url=db_env)
    from_files = features(engine)
    with engine.connect() as conn:
        errors = dict(conn.execute(sa.text("SELECT source_path, reason FROM lungsql.ingest_errors")).all())
        scans = conn.execute(sa.text("SELECT count(*) FROM lungsql.scans")).scalar()
        ingest_runs = conn.execute(sa.text("SELECT sum(files_seen), sum(errors), count(*) "
                                           "FROM lungsql.ingest_runs")).one()
        runs = conn.execute(sa.text("SELECT shards, status FROM lungsql.feature_runs")).all()
        labelled = conn.execute(sa.text("SELECT count(*), count(label) FROM lungsql.patients")).one()
    assert result.patients == len(from_files) == 8 and tuple(labelled) == (8, 8)  # stage1_labels.csv loaded
    assert result.files_seen == n_slices + 2 and result.errors == 2
    assert set(errors) == {str(tree / "notes.txt"), str(tree / "cut.dcm")} and all(errors.values())
    assert scans == 0  # the slices stay in their files
    assert tuple(ingest_runs) == (n_slices + 2, 2, 3) and {(r.shards, r.status) for r in runs} == {(3, "finished")}
    again = files.run(spark, str(tree), partitions=2, url=db_env)  # a rerun: nothing twice
    assert again.patients == 0 and again.errors == 2
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM lungsql.ingest_errors")).scalar() == 2
        assert conn.execute(sa.text("SELECT count(*) FROM lungsql.features")).scalar() == 8
    ingest.ingest(engine, cohort)  # the same scans, in the database this time
    call(engine, "CALL lungsql.generate_features(only_missing => false)")
    in_database = features(engine)
    assert set(in_database) == set(from_files)
    for patient, array in from_files.items():
        np.testing.assert_allclose(array, in_database[patient], rtol=1e-4, atol=1e-5)


# -- a standalone cluster: a master and a worker on 127.0.0.1, a job submitted to them ----------------
def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_for_port(port: int, process, log, seconds: float = 60) -> None:
    import socket

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and process.poll() is None:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise AssertionError(f"port {port} never opened: {log.read_text()[-2000:]}")


@pytest.fixture(scope="module")
def standalone(cluster, cohort, tmp_path_factory):
    """A Spark master and one worker (2 cores) on 127.0.0.1, whose executors connect to a database of
    their own through LUNGSQL_DATABASE_URL in the worker's environment (no credential in the job)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    import pyspark

    from databases import create_database, drop_database
    from lungsql.client import migrations

    name = create_database(cluster, "spark")
    url = cluster.url(dbname=name)
    engine = sa.create_engine(url)
    migrations.init(engine)
    cnn_export.export_builtin("efficientnet-lite0", cache_dir=cnn_export.default_cache_dir())
    ingest.ingest(engine, cohort)
    cnns.import_builtin(engine)
    spark_class = Path(pyspark.__file__).parent / "bin" / "spark-class"
    work = tmp_path_factory.mktemp("spark-standalone")
    port, ui = _free_port(), _free_port()
    env = {**os.environ, "SPARK_LOCAL_IP": "127.0.0.1", "PYSPARK_PYTHON": sys.executable}
    env.pop("LUNGSQL_DATABASE_URL", None)
    master_log, worker_log = work / "master.log", work / "worker.log"
    # The worker offers one GPU (as its discovery script says), so a job can ask for GPUs per task.
    discover = work / "gpus.sh"
    discover.write_text('#!/bin/sh\necho \'{"name": "gpu", "addresses": ["0"]}\'\n')
    discover.chmod(0o755)
    master = subprocess.Popen([str(spark_class), "org.apache.spark.deploy.master.Master", "--host", "127.0.0.1",
                               "--port", str(port), "--webui-port", str(ui)], env=env,
                              stdout=master_log.open("wb"), stderr=subprocess.STDOUT)
    worker = None
    try:
        _wait_for_port(port, master, master_log)
        worker = subprocess.Popen([str(spark_class), "org.apache.spark.deploy.worker.Worker",
                                   f"spark://127.0.0.1:{port}", "--host", "127.0.0.1", "--cores", "2",
                                   "--memory", "2g", "--webui-port", str(_free_port()), "--work-dir", str(work)],
                                  env={**env, "LUNGSQL_DATABASE_URL": url,
                                       "SPARK_WORKER_OPTS": "-Dspark.worker.resource.gpu.amount=1 "
                                                            f"-Dspark.worker.resource.gpu.discoveryScript={discover}"},
                                  stdout=worker_log.open("wb"), stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while "Successfully registered with master" not in worker_log.read_text(errors="replace"):
            assert time.monotonic() < deadline and worker.poll() is None, worker_log.read_text()
            time.sleep(0.2)
        yield {"master": f"spark://127.0.0.1:{port}", "engine": engine, "env": env, "work": work}
    finally:
        for process in (worker, master):
            if process is not None:
                process.terminate()
                process.wait(timeout=30)
        engine.dispose()
        drop_database(cluster, name)


def test_a_job_submitted_to_a_standalone_cluster_featurizes_with_the_executors_own_credentials(standalone):
    import subprocess
    from pathlib import Path

    import pyspark

    import lungsql.spark.featurize as job

    submit = Path(pyspark.__file__).parent / "bin" / "spark-submit"
    result = subprocess.run([str(submit), "--master", standalone["master"], "--conf", "spark.task.cpus=1",
                             "--conf", "spark.executor.cores=2", job.__file__, "--partitions", "2"],
                            env=standalone["env"], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "8 patients" in result.stdout and "on 2 Spark tasks" in result.stdout
    with standalone["engine"].connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM lungsql.features")).scalar() == 8
        runs = conn.execute(sa.text("SELECT shards, status FROM lungsql.feature_runs")).all()
    assert {(r.shards, r.status) for r in runs} == {(2, "finished")}


def test_a_task_given_a_gpu_by_the_cluster_runs_the_cnn_on_that_gpu(standalone):
    """Spark schedules the worker's GPU to the tasks (half each); each task asks ONNX Runtime for CUDA on
    that device, and the job says what ONNX Runtime ran on (CPU here, whose onnxruntime has no CUDA)."""
    import subprocess
    from pathlib import Path

    import onnxruntime
    import pyspark

    import lungsql.spark.featurize as job

    submit = Path(pyspark.__file__).parent / "bin" / "spark-submit"
    result = subprocess.run([str(submit), "--master", standalone["master"], "--conf", "spark.task.cpus=1",
                             "--conf", "spark.executor.cores=2", "--conf", "spark.executor.resource.gpu.amount=1",
                             "--conf", "spark.task.resource.gpu.amount=0.5", job.__file__, "--partitions", "2",
                             "--all"], env=standalone["env"], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    cuda = "CUDAExecutionProvider" in onnxruntime.get_available_providers()
    expected = "CUDAExecutionProvider" if cuda else "CPUExecutionProvider"
    assert f"tasks given GPUs 0, run on {expected}" in result.stdout, result.stdout
    assert cuda or "install onnxruntime-gpu on the executors" in result.stdout
    with standalone["engine"].connect() as conn:
        providers = {r.provider for r in conn.execute(sa.text(
            "SELECT provider FROM lungsql.feature_runs ORDER BY run_id DESC LIMIT 2"))}
    assert providers == {expected}
