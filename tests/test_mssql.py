"""The Python of the SQL Server procedures, run as sp_execute_external_script
runs it (tests/mssql_harness.py), against what the PostgreSQL procedures give
on the same synthetic cohort: the same features, the same model, the same
probabilities. No SQL Server is involved; see sql/mssql/README.md."""

from __future__ import annotations

import json

import numpy as np
import psycopg
import pytest
import sqlalchemy as sa

from lungsql.client import cnns, ingest, migrations
from lungsql.dicom import synth
from lungsql.server import pipeline
from lungsql.ml.features import GroupFeatures

pytest.importorskip("torch", reason="the built-in CNN is exported with the export extra (make bootstrap)")
pytest.importorskip("pandas", reason="InputDataSet is a pandas DataFrame (pip install pandas)")
import mssql_harness as harness  # noqa: E402  (needs pandas)
from databases import call, create_database, drop_database  # noqa: E402

PATIENTS = 10
MODEL = "lgbm"


@pytest.fixture(scope="module")
def pg_db(cluster, tmp_path_factory):
    """A database where the PostgreSQL procedures have run: the cohort uploaded,
    the built-in CNN imported, every patient featurized, a model trained."""
    cohort = tmp_path_factory.mktemp("mssql-cohort")
    synth.write_cohort(cohort, patients=PATIENTS, slices=(4, 7), seed=11)
    name = create_database(cluster, "t_mssql")
    engine = sa.create_engine(cluster.url(dbname=name))
    try:
        migrations.init(engine)
        ingest.ingest(engine, cohort)
        cnns.import_builtin(engine)
        call(engine, "CALL lungsql.generate_features()")
        call(engine, "SELECT * FROM lungsql.train_model(%s)", (MODEL,))
        yield engine
    finally:
        engine.dispose()
        drop_database(cluster, name)


@pytest.fixture
def pg(pg_db):
    """A psycopg connection to that database, for the harness's input queries."""
    with pg_db.connect() as conn:
        yield conn.connection.driver_connection


def _row(engine, sql, **params):
    with engine.connect() as conn:
        return conn.execute(sa.text(sql), params).mappings().one()


def _cnn(engine) -> dict:
    return dict(_row(engine, "SELECT cnn_id, name AS cnn_name, model AS cnn_model, sha256 AS cnn_sha256, input_name, "
                             "output_name, preprocessing::text AS preprocessing, source::text AS cnn_source "
                             "FROM lungsql.cnn_models ORDER BY cnn_id LIMIT 1"))


def _deployed(engine) -> dict:
    return dict(_row(engine, "SELECT m.model_id, m.sha256 AS model_sha256, m.model_text, m.cnn_id "
                             "FROM lungsql.deployments d JOIN lungsql.models m USING (model_id) "
                             "WHERE d.name = :n ORDER BY d.deployment_id DESC LIMIT 1", n=MODEL))


def _patients(engine) -> list[str]:
    with engine.connect() as conn:
        return list(conn.execute(sa.text("SELECT patient_id FROM lungsql.patients ORDER BY patient_id")).scalars())


# -- dbo.GenerateFeatures ---------------------------------------------------------------------
def test_shards_are_chosen_as_pipeline_in_shard_chooses_them(pg_db, pg):
    cnn_id = _cnn(pg_db)["cnn_id"]
    everyone = _patients(pg_db)
    parts = []
    for shard in range(3):
        result = harness.run_on(pg, "dbo.GenerateFeatures", {"cnn_id": cnn_id, "only_missing": False,
                                                             "retry_failed": False, "shard": shard, "shards": 3},
                                  index=0)
        parts.append(sorted(result.output_data_set.patient_id))  # #todo and its cursor give the order
        assert parts[-1] == [p for p in everyone if pipeline.in_shard(p, shard, 3)]
    assert sorted(sum(parts, [])) == everyone  # disjoint, and together every patient
    # Every patient has features already: with @OnlyMissing = 1 nothing is left to do.
    result = harness.run_on(pg, "dbo.GenerateFeatures", {"cnn_id": cnn_id, "only_missing": True,
                                                         "retry_failed": False, "shard": 0, "shards": 1}, index=0)
    assert len(result.output_data_set) == 0 and list(result.output_data_set.columns) == ["patient_id"]


def test_featurize_script_gives_the_features_postgresql_stored(pg_db, pg):
    cnn = _cnn(pg_db)
    with pg_db.connect() as conn:
        stored = {r.patient_id: r for r in conn.execute(sa.text("SELECT * FROM lungsql.features"))}
    assert len(stored) == PATIENTS
    for patient_id, row in stored.items():
        out = harness.run_on(pg, "dbo.GenerateFeatures", {**cnn, "patient_id": patient_id, "chosen_series": None,
                                                          "chosen_by": None}).outputs
        assert out["error"] is None
        assert (out["series_uid"], out["series_reason"]) == (row.series_instance_uid, row.series_reason)
        assert out["provider"] == "CPUExecutionProvider"
        assert (out["n_slices"], out["n_groups"], out["dim"]) == (row.n_slices, row.n_groups, row.dim)
        ours = GroupFeatures.from_bytes(out["data"], (out["n_groups"], out["dim"]), out["sha256"],
                                        n_slices=out["n_slices"])
        theirs = GroupFeatures.from_bytes(row.data, (row.n_groups, row.dim), row.sha256, n_slices=row.n_slices)
        assert ours.shape == theirs.shape == (-(-row.n_slices // 3), 1280)
        np.testing.assert_allclose(ours.array, theirs.array, rtol=1e-4, atol=1e-5)


def test_featurize_script_runs_a_variant_on_the_runtime_its_source_names(pg_db, pg):
    cnn = _cnn(pg_db)
    source = {**json.loads(cnn["cnn_source"]), "runtime": {"engine": "openvino", "precision": "fp32"}}
    out = harness.run_on(pg, "dbo.GenerateFeatures", {**cnn, "cnn_name": "efficientnet-lite0-openvino",
                                                      "cnn_source": json.dumps(source),
                                                      "patient_id": _patients(pg_db)[0], "chosen_series": None,
                                                      "chosen_by": None}).outputs
    assert out["error"] is None and out["provider"] == "OpenVINO:CPU"
    source["runtime"]["precision"] = "fp16"
    out = harness.run_on(pg, "dbo.GenerateFeatures", {**cnn, "cnn_name": "odd", "cnn_source": json.dumps(source),
                                                      "patient_id": _patients(pg_db)[0], "chosen_series": None,
                                                      "chosen_by": None}).outputs
    assert "openvino runs a CNN in fp32, bf16, not 'fp16'" in out["error"] and out["data"] is None


def test_featurize_script_refuses_a_tampered_cnn(pg_db, pg):
    cnn = _cnn(pg_db)
    model = bytearray(cnn["cnn_model"])
    model[1000] ^= 0xFF
    out = harness.run_on(pg, "dbo.GenerateFeatures",
                         {**cnn, "cnn_model": bytes(model), "patient_id": _patients(pg_db)[0], "chosen_series": None,
                          "chosen_by": None}).outputs
    assert "do not match their SHA-256" in out["error"] and out["error"].startswith("lungsql: ")
    assert "Hint: import the CNN again" in out["error"]
    assert out["data"] is None


# -- dbo.TrainLungCancerModel -----------------------------------------------------------------------
def test_training_script_gives_the_model_train_model_gave(pg_db, pg):
    model = _row(pg_db, "SELECT * FROM lungsql.models WHERE name = :n", n=MODEL)
    out = harness.run_on(pg, "dbo.TrainLungCancerModel", {"cnn_id": model.cnn_id, "lightgbm_params": "{}"},
                         index=0).outputs
    assert out["error"] is None
    assert out["feature_set"] == model.feature_set == pipeline.FEATURE_SET
    assert json.loads(out["feature_names"]) == model.feature_names
    assert json.loads(out["used_params"]) == model.params
    metrics = json.loads(out["metrics"])
    assert {k: v for k, v in metrics.items() if k != "seconds"} == \
        {k: v for k, v in model.metrics.items() if k != "seconds"}
    assert out["model_text"] == model.model_text and out["model_sha256"] == model.sha256  # deterministic training


def test_training_script_says_what_is_wrong_with_params(pg_db, pg):
    cnn_id = _cnn(pg_db)["cnn_id"]
    out = harness.run_on(pg, "dbo.TrainLungCancerModel", {"cnn_id": cnn_id, "lightgbm_params": "[7]"},
                         index=0).outputs
    assert out["error"].startswith("lungsql: @Params must be a JSON object") and out["model_text"] is None
    out = harness.run_on(pg, "dbo.TrainLungCancerModel", {"cnn_id": cnn_id,
                                                          "lightgbm_params": '{"num_leaves": 1}'}, index=0).outputs
    assert "LightGBM rejected training parameter 'num_leaves'" in out["error"]


# -- the registry: dbo.TrainLungCancerModel's decision and dbo.DeployLungCancerModel ------------------
def _copy_model(engine, name: str, log_loss: float) -> int:
    """A model of `name`: the trained model's row with another validation log loss."""
    with engine.begin() as conn:
        return conn.execute(sa.text(
            "INSERT INTO lungsql.models (name, version, cnn_id, feature_set, feature_names, params, model_text, "
            "                            sha256, metrics) "
            "SELECT :name, (SELECT coalesce(max(version), 0) + 1 FROM lungsql.models WHERE name = :name), "
            "       cnn_id, feature_set, feature_names, params, model_text, sha256, "
            "       jsonb_set(metrics, '{log_loss}', to_jsonb(CAST(:log_loss AS double precision))) "
            "FROM lungsql.models WHERE name = :model ORDER BY model_id LIMIT 1 RETURNING model_id"),
            {"name": name, "log_loss": log_loss, "model": MODEL}).scalar_one()


def _latest_strategy(engine, name: str) -> str:
    return _row(engine, "SELECT strategy FROM lungsql.deployments WHERE name = :n "
                        "ORDER BY deployment_id DESC LIMIT 1", n=name).strategy


def _pg_deploy(engine, name: str, strategy: str) -> tuple:
    """lungsql.deploy on PostgreSQL: (model id, the strategy its row records, None), or
    (None, None, the error as dbo.DeployLungCancerModel THROWs it)."""
    try:
        (chosen,), = call(engine, "SELECT lungsql.deploy(%s, %s)", (name, strategy))
    except psycopg.Error as exc:
        message, hint = exc.diag.message_primary.removeprefix("plpy.Error: "), exc.diag.message_hint
        return None, None, message + (f"\nHint: {hint}" if hint else "")
    return chosen, _latest_strategy(engine, name), None


def _mssql_deploy(pg, name: str, strategy: str) -> tuple:
    """dbo.DeployLungCancerModel's script: (@chosen, @chosen_strategy, @error)."""
    out = harness.run_on(pg, "dbo.DeployLungCancerModel", {"model_name": name, "deploy_strategy": strategy}).outputs
    return out["chosen"], out["chosen_strategy"], out["error"]


def test_deploy_script_chooses_as_lungsql_deploy_for_every_strategy(pg_db, pg):
    name = "registry-deploy"
    a, b, c = (_copy_model(pg_db, name, loss) for loss in (0.5, 0.3, 0.3))
    trained = _row(pg_db, "SELECT model_id FROM lungsql.models WHERE name = :n ORDER BY model_id LIMIT 1", n=MODEL)
    steps = [  # (strategy, what both choose, or the start of the error both give), each on what the last left
        ("rollback", "lungsql: 'registry-deploy' has no earlier deployment to roll back to"),  # no history
        ("best_score", c),  # 0.3 twice: the newer
        ("rollback", "lungsql: 'registry-deploy' has no earlier deployment to roll back to"),  # one deployment
        ("  most_recent ", c),
        ("rollback", "lungsql: every earlier deployment of 'registry-deploy' is the current model"),
        (str(a), a),
        ("rollback", c),
        ("rollback", a),
        (f" {b}", b),
        ("newest", "lungsql: unknown strategy 'newest'\n"
                   "Hint: use 'best_score', 'most_recent', 'rollback' or a model id"),
        (str(trained.model_id), f"lungsql: model {trained.model_id} is not a model named 'registry-deploy'\n"
                                "Hint: SELECT model_id, name, version FROM lungsql.models"),
        ("99999999999", "lungsql: model 99999999999 is not a model named 'registry-deploy'"),
        ("best_score", c),
    ]
    for strategy, expected in steps:
        ours = _mssql_deploy(pg, name, strategy)  # what T-SQL would write: the same state as PostgreSQL's
        theirs = _pg_deploy(pg_db, name, strategy)
        assert ours == theirs, strategy
        if isinstance(expected, int):
            assert ours == (expected, strategy.strip(), None), strategy
        else:
            assert ours[:2] == (None, None) and ours[2].startswith(expected), strategy
    history = [r[0] for r in call(pg_db, "SELECT model_id FROM lungsql.deployments WHERE name = %s "
                                         "ORDER BY deployment_id", (name,))]
    assert history == [c, c, a, c, a, b, c]


def test_deploy_script_refuses_a_name_without_models(pg_db, pg):
    for strategy in ("best_score", "most_recent", "rollback", "1", "newest"):
        ours, theirs = _mssql_deploy(pg, "nobody", strategy), _pg_deploy(pg_db, "nobody", strategy)
        assert ours[:2] == theirs[:2] == (None, None)
        assert theirs[2] == "lungsql: there is no model named 'nobody'\n" \
                            "Hint: train one first: SELECT * FROM lungsql.train_model('...')"
        assert ours[2] == "lungsql: there is no model named 'nobody'\n" \
                          "Hint: train one first: EXEC dbo.TrainLungCancerModel @ModelName = N'...'"


def test_training_registry_script_decides_as_train_model(pg_db, pg):
    name = "registry-train"

    def train() -> tuple[int, str]:
        """lungsql.train_model on PostgreSQL: the new model and the NOTICE saying whether it is deployed."""
        notices: list[str] = []
        (model_id, _), = call(pg_db, "SELECT * FROM lungsql.train_model(%s)", (name,), notices=notices)
        decision, = [n for n in notices if n.startswith("model ") and " deployed as " in n]
        return model_id, decision

    def decide(model_id: int, deployed_by_pg: bool) -> dict:
        """The script at the end of dbo.TrainLungCancerModel, on what it sees there: the new model
        stored, no deployment row for it yet (the one PostgreSQL wrote is taken out, then put back)."""
        try:
            if deployed_by_pg:
                pg.execute("DELETE FROM lungsql.deployments WHERE deployment_id = (SELECT max(deployment_id) "
                           "FROM lungsql.deployments WHERE name = %s AND model_id = %s)", (name, model_id))
            return harness.run_on(pg, "dbo.TrainLungCancerModel", {"model_name": name, "model_id": model_id}).outputs
        finally:
            pg.rollback()

    first, notice = train()
    assert notice == f"model {first} deployed as {name!r}: the first of its name"
    assert decide(first, True) == {"error": None, "deploy_strategy": "first model", "notice": notice}
    assert _latest_strategy(pg_db, name) == "first model"

    second, notice = train()  # deterministic training: the same validation log loss is not better
    assert notice == f"model {first} stays deployed as {name!r}: it has the better validation log loss"
    assert decide(second, False) == {"error": None, "deploy_strategy": None, "notice": notice}

    with pg_db.begin() as conn:  # make the deployed model look poor
        conn.execute(sa.text("UPDATE lungsql.models SET metrics = jsonb_set(metrics, '{log_loss}', '9.9') "
                             "WHERE model_id = :m"), {"m": first})
    third, notice = train()
    assert notice.startswith(f"model {third} deployed as {name!r}: validation log loss ")
    assert notice.endswith(" beats 9.9000")
    assert decide(third, True) == {"error": None, "deploy_strategy": "best_score", "notice": notice}
    assert _latest_strategy(pg_db, name) == "best_score"

    out = decide(_row(pg_db, "SELECT min(model_id) AS m FROM lungsql.models WHERE name = :n", n=MODEL).m, False)
    assert out["error"].startswith("lungsql: model ") and f"is not a model named {name!r}" in out["error"]
    assert out["deploy_strategy"] is None and out["notice"] is None


# -- dbo.PredictLungCancer and dbo.PredictLungCancerBatch --------------------------------------------
def test_predict_script_gives_the_postgresql_probability(pg_db, pg):
    deployed = _deployed(pg_db)
    for patient_id in _patients(pg_db)[:3]:
        (expected,), = call(pg_db, "SELECT lungsql.predict_lung_cancer(%s, %s)", (patient_id, MODEL))
        out = harness.run_on(pg, "dbo.PredictLungCancer", {**deployed, "patient_id": patient_id}).outputs
        assert out["error"] is None
        assert out["probability"] == pytest.approx(expected, rel=1e-12, abs=1e-15)
        assert 0.0 <= out["probability"] <= 1.0  # @PredictionResult = @probability * 100


def test_batch_script_gives_the_postgresql_batch(pg_db, pg):
    deployed = _deployed(pg_db)
    expected = dict(call(pg_db, "SELECT * FROM lungsql.predict_lung_cancer_batch("
                                 "ARRAY(SELECT patient_id FROM lungsql.patients), %s)", (MODEL,)))
    out = harness.run_on(pg, "dbo.PredictLungCancerBatch", {**deployed, "patient_ids": None}).outputs
    assert out["error"] is None
    scores = {s["patient_id"]: s["probability"] for s in json.loads(out["scores"])}
    assert scores.keys() == expected.keys() and len(scores) == PATIENTS
    assert all(scores[p] == pytest.approx(expected[p], rel=1e-12, abs=1e-15) for p in expected)
    some = _patients(pg_db)[:2]
    out = harness.run_on(pg, "dbo.PredictLungCancerBatch",
                         {**deployed, "patient_ids": json.dumps([some[1], some[0], some[1]])}).outputs
    assert [s["patient_id"] for s in json.loads(out["scores"])] == [some[1], some[0]]


def test_tampered_model_text_is_refused(pg_db, pg):
    deployed = _deployed(pg_db)
    patient_id = _patients(pg_db)[0]
    harness.run_on(pg, "dbo.PredictLungCancer", {**deployed, "patient_id": patient_id})  # parsed and cached
    tampered = {**deployed, "model_text": deployed["model_text"].replace("objective=binary", "objective=regression")}
    for procedure, extra in (("dbo.PredictLungCancer", {"patient_id": patient_id}),
                             ("dbo.PredictLungCancerBatch", {"patient_ids": None})):
        out = harness.run_on(pg, procedure, {**tampered, **extra}).outputs
        assert "do not match their SHA-256" in out["error"] and "nothing was scored" in out["error"]
        assert out.get("probability") is None and out.get("scores") is None


def test_unknown_patient_is_a_clear_error(pg_db, pg):
    out = harness.run_on(pg, "dbo.PredictLungCancer", {**_deployed(pg_db), "patient_id": "nobody"}).outputs
    assert out["error"].startswith("lungsql: no features for patient 'nobody'")
    assert "Hint: check the patient id" in out["error"]
    out = harness.run_on(pg, "dbo.PredictLungCancerBatch",
                         {**_deployed(pg_db), "patient_ids": "[1, 2]"}).outputs
    assert out["error"].startswith("lungsql: @PatientIds must be a JSON array of patient ids")


# -- dbo.CheckLungSQLEnvironment -------------------------------------------------------------------
def test_environment_script_lists_what_python_sees():
    result = harness.run(harness.external_script("dbo.CheckLungSQLEnvironment"), None, {})
    assert result.outputs["error"] is None
    rows = {r.component: r for r in result.output_data_set.itertuples()}
    assert {"python", "numpy", "pydicom", "onnxruntime", "lightgbm", "cv2", "lungsql"} <= rows.keys()
    assert all(r.version for r in rows.values())


# -- dbo.PredictFindings (the chest radiograph task) ---------------------------------------------
@pytest.fixture(scope="module")
def xray_db(cluster, tmp_path_factory):
    """A database with a small synthetic radiograph cohort, featurized and trained on PostgreSQL."""
    from lungsql.client import radiograph_ingest
    from lungsql.dicom import synth_xray

    cohort = tmp_path_factory.mktemp("mssql-xray")
    synth_xray.write_cohort(cohort, patients=24, images_per_patient=(1, 3), size=128, seed=3)
    name = create_database(cluster, "t_mssql_xray")
    engine = sa.create_engine(cluster.url(dbname=name))
    try:
        migrations.init(engine)
        cnns.import_builtin(engine)
        radiograph_ingest.ingest(engine, cohort)
        call(engine, "CALL lungsql.generate_features(task => 'chest_xray14')")
        call(engine, "SELECT * FROM lungsql.train_findings()")
        yield engine
    finally:
        engine.dispose()
        drop_database(cluster, name)


def _findings_inputs(engine, image_id: int) -> dict:
    """What dbo.PredictFindings reads with T-SQL before it calls Python."""
    return dict(_row(engine, """
        SELECT m.model_id, m.sha256 AS model_sha256, m.model_text AS manifest, f.data AS features,
               f.sha256 AS features_sha256, f.dim
        FROM lungsql.deployments d JOIN lungsql.models m USING (model_id)
        JOIN lungsql.image_features f ON f.cnn_id = m.cnn_id AND f.image_id = :image
        WHERE d.name = 'chest_xray14' AND m.task = 'chest_xray14' ORDER BY d.deployment_id DESC LIMIT 1""",
                     image=image_id))


def test_findings_script_gives_the_postgresql_findings(xray_db):
    with xray_db.connect() as conn:
        images = list(conn.execute(sa.text("SELECT image_id FROM lungsql.radiographs ORDER BY image_id LIMIT 3"))
                      .scalars())
        pg = conn.connection.driver_connection
        for image_id in images:
            expected = dict(call(xray_db, "SELECT finding, probability FROM lungsql.predict_findings(%s)", (image_id,)))
            inputs = _findings_inputs(xray_db, image_id)
            out = harness.run_on(pg, "dbo.PredictFindings", {**inputs, "features": bytes(inputs["features"])}).outputs
            assert out["error"] is None
            found = {f["finding"]: f["probability"] for f in json.loads(out["findings"])}
            assert found.keys() == expected.keys() and len(found) >= 10
            assert all(found[f] == pytest.approx(expected[f], rel=1e-12, abs=1e-15) for f in expected)


def test_findings_script_refuses_altered_features_and_boosters(xray_db):
    with xray_db.connect() as conn:
        image_id = conn.execute(sa.text("SELECT min(image_id) FROM lungsql.radiographs")).scalar()
        pg = conn.connection.driver_connection
        inputs = _findings_inputs(xray_db, image_id)
        features = bytearray(inputs["features"])
        features[0] ^= 1
        out = harness.run_on(pg, "dbo.PredictFindings", {**inputs, "features": bytes(features)}).outputs
        assert "do not match their SHA-256" in out["error"] and out.get("findings") is None
        out = harness.run_on(pg, "dbo.PredictFindings", {**inputs, "features": bytes(inputs["features"]),
                                                         "manifest": inputs["manifest"] + " "}).outputs
        assert "manifest does not match" in out["error"]
