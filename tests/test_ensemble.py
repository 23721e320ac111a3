"""Ensembles deployed and scored like one model, in a real database: each method's probability is its
members' probabilities combined, measured on the members' common validation patients."""

from __future__ import annotations

import json

import numpy as np
import pytest
import sqlalchemy as sa

from databases import call, create_database, drop_database
from lungsql.client import cnns, ingest, migrations
from lungsql.dicom import synth
from lungsql.errors import ConfigurationError
from lungsql.ml import cnn_export, ensemble


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    out = tmp_path_factory.mktemp("ensemble-cohort")
    synth.write_cohort(out, patients=16, slices=(4, 6), seed=8)
    return out


@pytest.fixture(scope="module")
def members(cluster, cohort):
    """Three models of one CNN's features, trained once for the module's tests."""
    cnn_export.export_builtin("efficientnet-lite0", cache_dir=cnn_export.default_cache_dir())
    name = create_database(cluster, "ensemble")
    engine = sa.create_engine(cluster.url(dbname=name))
    migrations.init(engine)
    ingest.ingest(engine, cohort)
    cnns.import_builtin(engine)
    call(engine, "CALL lungsql.generate_features()")
    ids = []
    for name, params in (("a", "{}"), ("b", '{"num_leaves": 4, "learning_rate": 0.2}'),
                         ("c", '{"num_leaves": 3, "feature_fraction": 0.5}')):
        ids.append(call(engine, "SELECT model_id FROM lungsql.train_model(%s, %s::jsonb)", (name, params))[0][0])
    yield engine, ids
    engine.dispose()
    drop_database(cluster, name)


def probabilities(engine, name: str) -> dict[str, float]:
    with engine.begin() as conn:  # committed: the scoring procedure records every prediction
        patients = list(conn.execute(sa.text("SELECT patient_id FROM lungsql.features ORDER BY 1")).scalars())
        return {p: conn.execute(sa.text("SELECT lungsql.predict_lung_cancer(:p, :m)"), {"p": p, "m": name}).scalar()
                for p in patients}


@pytest.mark.parametrize("method", ensemble.METHODS)
def test_an_ensemble_scores_as_its_members_combined(members, method):
    engine, ids = members
    ens_id = call(engine, "SELECT lungsql.deploy_ensemble('ens', %s, method => %s)", (ids, method))[0][0]
    mine = probabilities(engine, "ens")
    each = [probabilities(engine, name) for name in ("a", "b", "c")]
    p = np.array([[e[patient] for e in each] for patient in mine])
    expected = {"mean": p.mean(axis=1), "max": p.max(axis=1), "hard_vote": (p >= 0.5).mean(axis=1)}
    if method == "weighted":
        with engine.connect() as conn:
            auc = [json.loads(json.dumps(conn.execute(sa.text("SELECT metrics FROM lungsql.models WHERE model_id = :i"),
                                                      {"i": i}).scalar()))["auc"] for i in ids]
        w = np.maximum(np.array(auc) - 0.5, 0)
        expected["weighted"] = p @ (w / w.sum())
    np.testing.assert_allclose(list(mine.values()), expected[method], atol=1e-12)
    with engine.connect() as conn:
        row = conn.execute(sa.text("SELECT algorithm, metrics, params FROM lungsql.models WHERE model_id = :i"),
                           {"i": ens_id}).one()
        deployed = conn.execute(sa.text("SELECT model_id, strategy FROM lungsql.deployments WHERE name = 'ens' "
                                        "ORDER BY deployment_id DESC LIMIT 1")).one()
        recorded = conn.execute(sa.text("SELECT count(*) FROM lungsql.predictions WHERE model_id = :i"),
                                {"i": ens_id}).scalar()
    assert row.algorithm == "ensemble" and row.params["members"] == ids and row.params["method"] == method
    assert (deployed.model_id, deployed.strategy) == (ens_id, f"ensemble:{method}")
    assert recorded == len(mine)
    # Measured on the members' common validation patients, the members' own figures beside it.
    metrics = row.metrics
    assert metrics["valid_patients"] == len(metrics["validation_ids"]) > 0
    assert [m["model_id"] for m in metrics["members"]] == ids
    assert 0.0 <= metrics["auc"] <= 1.0 and metrics["log_loss"] > 0


def test_a_member_changed_afterwards_is_refused(members):
    engine, ids = members
    call(engine, "SELECT lungsql.deploy_ensemble('ens', %s)", (ids,))
    with engine.begin() as conn:
        original = conn.execute(sa.text("UPDATE lungsql.models SET sha256 = repeat('0', 64) WHERE model_id = :i "
                                        "RETURNING (SELECT sha256 FROM lungsql.models WHERE model_id = :i)"),
                                {"i": ids[1]}).scalar()
    try:
        with pytest.raises(Exception, match="has changed since the ensemble was made"):
            probabilities(engine, "ens")
    finally:
        with engine.begin() as conn:
            conn.execute(sa.text("UPDATE lungsql.models SET sha256 = :s WHERE model_id = :i"),
                         {"s": original, "i": ids[1]})


def test_bad_ensembles_say_what_is_wrong(members):
    engine, ids = members
    for args, message in (((ids, "median"), "unknown ensemble method"), ((ids[:1], "mean"), "two or more"),
                          ((ids + [999], "mean"), "no model with model_id 999")):
        with pytest.raises(Exception, match=message):
            call(engine, "SELECT lungsql.deploy_ensemble('bad', %s, method => %s)", args)
    with pytest.raises(Exception, match="weights must be 3"):
        call(engine, "SELECT lungsql.deploy_ensemble('bad', %s, 'weighted', ARRAY[1.0, 2.0])", (ids,))


def test_the_stored_ensemble_is_checked_before_it_is_read():
    spec = ensemble.build("mean", [{"model_id": 1, "sha256": "a" * 64}, {"model_id": 2, "sha256": "b" * 64}])
    assert ensemble.load(spec.to_text(), spec.sha256) == spec
    with pytest.raises(Exception, match="does not match its SHA-256"):
        ensemble.load(spec.to_text().replace('"mean"', '"max"'), spec.sha256)
    with pytest.raises(ConfigurationError, match="weights are only for"):
        ensemble.build("mean", [{"model_id": 1, "sha256": "a"}, {"model_id": 2, "sha256": "b"}], weights=[1, 2])


def test_an_ensemble_is_explained_by_its_member_of_the_largest_weight(members):
    engine, ids = members
    call(engine, "SELECT lungsql.deploy_ensemble('ens', %s, 'weighted', ARRAY[1.0, 3.0, 2.0])", (ids,))
    with engine.begin() as conn:
        patient = conn.execute(sa.text("SELECT patient_id FROM lungsql.features ORDER BY 1 LIMIT 1")).scalar()
        rows = conn.execute(sa.text("SELECT model_id, probability FROM lungsql.explain_prediction(:p, 'ens')"),
                            {"p": patient}).all()
        member = conn.execute(sa.text("SELECT lungsql.predict_lung_cancer(:p, 'b')"), {"p": patient}).scalar()
    assert {r.model_id for r in rows} == {ids[1]}
    assert rows[0].probability == pytest.approx(member, abs=1e-12)


def test_the_patient_page_query_names_the_members(members):
    from lungsql.webapp import scoring as web_scoring  # the statement the patient page scores with

    from lungsql.client import users

    engine, ids = members
    call(engine, "SELECT lungsql.deploy_ensemble('ens', %s, 'hard_vote')", (ids,))
    user_id = users.add_user(engine, "tester", "a long enough password 1", "clinician", replace=True)
    with engine.begin() as conn:
        patient = conn.execute(sa.text("SELECT patient_id FROM lungsql.features ORDER BY 1 LIMIT 1")).scalar()
        row = conn.exec_driver_sql(web_scoring._SCORE, {"patient_id": patient, "via": "test", "user_id": user_id,
                                                         "address": "127.0.0.1"}).mappings().one()
    assert row["name"] == "ens" and row["ensemble_method"] == "hard_vote"
    assert row["ensemble_members"] == "a v1, b v1, c v1"
