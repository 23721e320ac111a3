"""Which slices a probability comes from: TreeSHAP contributions carried back to the groups of slices,
checked against leave-one-group-out rescoring, and lungsql.explain_prediction in a real database."""

from __future__ import annotations

import math

import lightgbm
import numpy as np
import pytest
import sqlalchemy as sa

from databases import call
from lungsql.client import cnns, ingest
from lungsql.dicom import synth
from lungsql.ml import cnn_export
from lungsql.ml.explain import explain, group_slices
from lungsql.ml.features import patient_vector, patient_vector_names

D, GROUPS = 16, 12


def _patients(n: int, rng: np.random.Generator):
    """Features of n patients, half with one group whose first 4 features stand out (a nodule)."""
    features, labels, planted = [], [], []
    for i in range(n):
        f = rng.normal(0.0, 1.0, (GROUPS, D)).astype(np.float32)
        where = int(rng.integers(GROUPS))
        if i % 2:
            f[where, :4] += 4.0
        features.append(f)
        labels.append(i % 2)
        planted.append(where)
    return features, np.array(labels), planted


def _vector(f: np.ndarray, n_slices: int = 3 * GROUPS) -> np.ndarray:
    return np.concatenate([patient_vector(f, n_slices), [60.0, 1.0]]).astype(np.float32)


@pytest.fixture(scope="module")
def model():
    rng = np.random.default_rng(5)
    features, labels, _ = _patients(400, rng)
    names = patient_vector_names(D) + ["age_years", "sex_male"]
    data = lightgbm.Dataset(np.stack([_vector(f) for f in features]), labels, feature_name=names)
    booster = lightgbm.train({"objective": "binary", "verbose": -1, "num_leaves": 8, "min_data_in_leaf": 10,
                              "learning_rate": 0.1, "seed": 1, "deterministic": True}, data, num_boost_round=80)
    return booster, names


def test_the_contributions_add_up_to_the_raw_score(model):
    booster, names = model
    features, _, _ = _patients(20, np.random.default_rng(9))
    for f in features:
        e = explain(booster, f, _vector(f), names)
        raw = booster.predict(_vector(f)[None, :], raw_score=True)[0]
        assert e.raw_score == pytest.approx(raw, abs=1e-6)
        assert e.probability == pytest.approx(booster.predict(_vector(f)[None, :])[0], abs=1e-9)
        assert set(e.patient) == {"log_slices", "age_years", "sex_male"}


def test_the_top_group_is_the_one_leaving_out_changes_most_and_the_one_that_holds_the_nodule(model):
    booster, names = model
    features, labels, planted = _patients(60, np.random.default_rng(11))
    agree = found = 0
    correlations = []
    positives = [i for i in range(len(features)) if labels[i]]
    for i in positives:
        f = features[i]
        e = explain(booster, f, _vector(f), names)
        full = booster.predict(_vector(f)[None, :], raw_score=True)[0]
        # Leave one group out and score again (same number of slices: only the group's features go).
        drop = np.array([full - booster.predict(_vector(np.delete(f, g, axis=0))[None, :], raw_score=True)[0]
                         for g in range(GROUPS)])
        agree += int(e.ranked()[0] == int(np.argmax(drop)))
        found += int(e.ranked()[0] == planted[i])
        correlations.append(np.corrcoef(e.groups, drop)[0, 1])
    assert agree / len(positives) >= 0.9, agree
    assert found / len(positives) >= 0.9, found
    assert np.median(correlations) > 0.8, correlations


def test_groups_hold_the_slices_pack_groups_packs():
    assert [list(r) for r in group_slices(3, 8)] == [[0, 1, 2], [3, 4, 5], [6, 7]]
    assert [list(r) for r in group_slices(1, 1)] == [[0]]


def test_a_model_of_other_features_is_refused(model):
    booster, names = model
    f = np.zeros((2, D), np.float32)
    with pytest.raises(Exception, match="cannot be carried back to groups of slices"):
        explain(booster, f, _vector(f), [f"x{i}" for i in range(len(names))])


# -- in the database ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    out = tmp_path_factory.mktemp("explain-cohort")
    synth.write_cohort(out, patients=8, slices=(7, 10), seed=4)
    return out


@pytest.fixture
def trained(engine, cohort):
    cnn_export.export_builtin("efficientnet-lite0", cache_dir=cnn_export.default_cache_dir())
    ingest.ingest(engine, cohort)
    cnns.import_builtin(engine)
    call(engine, "CALL lungsql.generate_features()")
    call(engine, "SELECT * FROM lungsql.train_model()")
    return engine


def test_explain_prediction_covers_every_slice_once_and_adds_up_to_the_probability(trained):
    with trained.connect() as conn:
        patients = list(conn.execute(sa.text("SELECT patient_id FROM lungsql.features ORDER BY 1")).scalars())
        for patient_id in patients[:3]:
            rows = conn.execute(sa.text("SELECT * FROM lungsql.explain_prediction(:p)"), {"p": patient_id}).all()
            probability = conn.execute(sa.text("SELECT lungsql.predict_lung_cancer(:p)"), {"p": patient_id}).scalar()
            n_slices, series = conn.execute(sa.text(
                "SELECT n_slices, series_instance_uid FROM lungsql.features WHERE patient_id = :p"),
                {"p": patient_id}).one()
            scans = set(conn.execute(sa.text(
                "SELECT scan_id FROM lungsql.scans WHERE patient_id = :p AND series_instance_uid = :s"),
                {"p": patient_id, "s": series}).scalars())
            groups = [r for r in rows if r.part == "group"]
            assert [r.part for r in rows[len(groups):]] == ["log_slices", "age_years", "sex_male", "bias"]
            assert [r.rank for r in groups] == list(range(1, len(groups) + 1))
            assert [r.contribution for r in groups] == sorted((r.contribution for r in groups), reverse=True)
            covered = sorted(i for r in groups for i in range(r.first_slice, r.last_slice + 1))
            assert covered == list(range(n_slices))  # every slice in exactly one group
            assert set().union(*(set(r.scan_ids) for r in groups)) == scans
            logit = math.log(probability / (1 - probability))
            assert sum(r.contribution for r in rows) == pytest.approx(logit, abs=1e-6)
            assert all(r.probability == pytest.approx(probability, abs=1e-12) for r in rows)
            assert all(r.series_instance_uid == series for r in rows)


def test_a_heat_map_lies_over_the_slice_and_comes_in_under_a_second(trained):
    import time

    with trained.begin() as conn:
        patient_id = conn.execute(sa.text("SELECT patient_id FROM lungsql.features ORDER BY 1 LIMIT 1")).scalar()
        top = conn.execute(sa.text("SELECT scan_ids, contribution FROM lungsql.explain_prediction(:p) "
                                   "WHERE part = 'group' ORDER BY rank LIMIT 1"), {"p": patient_id}).one()
        size = conn.execute(sa.text("SELECT rows, columns FROM lungsql.scans WHERE scan_id = :s"),
                            {"s": top.scan_ids[0]}).one()
        timings = []
        for scan_id in top.scan_ids:
            started = time.perf_counter()
            h = conn.execute(sa.text("SELECT * FROM lungsql.slice_heatmap(:p, :s)"),
                             {"p": patient_id, "s": scan_id}).one()
            timings.append(time.perf_counter() - started)
            heat = np.frombuffer(h.heat, np.uint8).reshape(h.rows, h.columns)
            assert (h.rows, h.columns) == (size.rows, size.columns)
            assert h.contribution == pytest.approx(top.contribution, abs=1e-9)
            assert heat.max() == 255 or (heat.max() == 0 and top.contribution <= 0)
            assert h.method == "class activation"
        other = conn.execute(sa.text("SELECT scan_id FROM lungsql.scans WHERE patient_id <> :p LIMIT 1"),
                             {"p": patient_id}).scalar()
        with pytest.raises(Exception, match="is not a slice of the series"):
            conn.execute(sa.text("SELECT * FROM lungsql.slice_heatmap(:p, :s)"), {"p": patient_id, "s": other})
    assert min(timings) < 1.0, timings  # the first call in a session also opens the CNN


def test_a_cnn_without_a_feature_map_gets_an_occlusion_map(engine, cohort, tmp_path):
    import onnx

    exported = cnn_export.export_builtin("efficientnet-lite0", cache_dir=cnn_export.default_cache_dir())
    model = onnx.load_model_from_string(exported.onnx_bytes)
    kept = [o for o in model.graph.output if o.name == exported.output_name]
    del model.graph.output[:]
    model.graph.output.extend(kept)  # a user's CNN: pooled features only
    path = tmp_path / "user-cnn.onnx"
    path.write_bytes(model.SerializeToString())
    ingest.ingest(engine, cohort)
    cnns.import_file(engine, path, "user-cnn")
    call(engine, "CALL lungsql.generate_features(cnn_name => 'user-cnn')")
    call(engine, "SELECT * FROM lungsql.train_model('user', '{\"min_data_in_leaf\": 1, \"min_data_in_bin\": 1, "
                 "\"num_iterations\": 20, \"early_stopping_round\": 0, \"feature_fraction\": 0.05}'::jsonb, 'user-cnn')")
    with engine.begin() as conn:
        patient_id = conn.execute(sa.text("SELECT patient_id FROM lungsql.features ORDER BY 1 LIMIT 1")).scalar()
        scan_id = conn.execute(sa.text("SELECT scan_ids[1] FROM lungsql.explain_prediction(:p) WHERE rank = 1"),
                               {"p": patient_id}).scalar()
        h = conn.execute(sa.text("SELECT * FROM lungsql.slice_heatmap(:p, :s)"), {"p": patient_id, "s": scan_id}).one()
    assert h.method == "occlusion"
    heat = np.frombuffer(h.heat, np.uint8)
    assert heat.size == h.rows * h.columns and (heat.max() == 255 or h.contribution <= 0)
