"""The portable model: a trained model exported as one ONNX file gives, with ONNX Runtime alone,
the probability lungsql.predict_lung_cancer gives inside the database."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import lightgbm
import numpy as np
import onnx
import pytest
import sqlalchemy as sa

from databases import call, create_database, drop_database
from lungsql.client import cnns, db, ingest, migrations, model_export
from lungsql.dicom import synth
from lungsql.dicom.series import read_slices
from lungsql.errors import ConfigurationError, IntegrityError
from lungsql.ml import portable
from lungsql.ml.features import GroupFeatures, patient_vector
from lungsql.ml.preprocess import Preprocessing
from lungsql.server import pipeline

pytest.importorskip("torch", reason="the built-in CNN is exported with the export extra (make bootstrap)")
pytest.importorskip("onnxmltools", reason="the trees are converted with the export extra (make bootstrap)")

PATIENTS = 10
#: LightGBM parameters that let trees split a handful of training patients.
SPLITTING = {"min_data_in_leaf": 1, "min_data_in_bin": 1, "min_sum_hessian_in_leaf": 0, "num_iterations": 40,
             "early_stopping_round": 0, "feature_fraction": 0.05, "bagging_fraction": 1.0, "bagging_freq": 0}


@pytest.fixture(scope="module")
def trained(cluster, tmp_path_factory):
    """A database with a small cohort uploaded, the built-in CNN imported, features, and a trained and
    deployed model: (engine, model id)."""
    cohort = tmp_path_factory.mktemp("portable-cohort")
    synth.write_cohort(cohort, patients=PATIENTS, slices=(4, 7), seed=11)
    name = create_database(cluster)
    engine = sa.create_engine(cluster.url(dbname=name))
    migrations.init(engine)
    ingest.ingest(engine, cohort)
    cnns.import_builtin(engine)
    call(engine, "CALL lungsql.generate_features()")
    # Ten patients: without these, LightGBM finds no split worth making and every probability is one number.
    (model_id, _), = call(engine, "SELECT * FROM lungsql.train_model('portable', %s)", (json.dumps(SPLITTING),))
    assert call(engine, "SELECT lungsql.deploy('portable', %s)", (str(model_id),)) == [(model_id,)]
    yield engine, model_id
    engine.dispose()
    db.engine.cache_clear()
    drop_database(cluster, name)


@pytest.fixture(scope="module")
def exported(trained, tmp_path_factory):
    engine, model_id = trained
    out = tmp_path_factory.mktemp("portable") / "model.onnx"
    return model_export.export_model(engine, model_id, out)


@pytest.fixture(scope="module")
def model(exported):
    with open(exported["path"], "rb") as f:
        return portable.PortableModel(f.read())


def patients(engine) -> list[dict]:
    """Each featurized patient: id, age, sex, the series its features came from and its slices as stored."""
    with engine.connect() as conn:
        rows = conn.execute(sa.text(
            "SELECT f.patient_id, f.series_instance_uid, f.n_slices, f.data, f.n_groups, f.dim, f.sha256, "
            "       p.age_years, p.sex "
            "FROM lungsql.features f JOIN lungsql.patients p USING (patient_id) ORDER BY f.patient_id")
        ).mappings().all()
        found = []
        for row in rows:
            scans = conn.execute(sa.text(
                "SELECT dicom, z_position, frame_z FROM lungsql.scans "
                "WHERE patient_id = :patient AND series_instance_uid = :series"),
                {"patient": row["patient_id"], "series": row["series_instance_uid"]}).all()
            found.append({**row, "scans": [tuple(s) for s in scans]})
    return found


def test_every_patient_gets_the_probability_of_the_database(trained, exported, model):
    engine, model_id = trained
    rows = patients(engine)
    assert len(rows) == PATIENTS
    differences = []
    for row in rows:
        slices, rescale = read_slices(row["scans"])  # as featurization reads them
        assert len(slices) == row["n_slices"]
        outside = model.predict(slices, row["age_years"], row["sex"], rescale=rescale)
        inside = call(engine, "SELECT lungsql.predict_lung_cancer(%s, 'portable')", (row["patient_id"],))[0][0]
        differences.append(abs(outside - inside))
    assert max(differences) <= 1e-5, differences
    # The one-call form, from the file's bytes.
    slices, rescale = read_slices(rows[0]["scans"])
    with open(exported["path"], "rb") as f:
        once = portable.predict_portable(f.read(), slices, rows[0]["age_years"], rows[0]["sex"], rescale)
    assert once == model.predict(slices, rows[0]["age_years"], rows[0]["sex"], rescale=rescale)


def test_unknown_age_and_sex_score_as_lightgbm_scores_them(trained, model):
    engine, model_id = trained
    with engine.connect() as conn:
        text = conn.execute(sa.text("SELECT model_text FROM lungsql.models WHERE model_id = :m"),
                            {"m": model_id}).scalar()
    booster = lightgbm.Booster(model_str=text)
    for row in patients(engine)[:3]:
        stored = GroupFeatures.from_bytes(row["data"], (row["n_groups"], row["dim"]), row["sha256"],
                                          n_slices=row["n_slices"])
        vector = np.concatenate([stored.patient_vector(), np.array([np.nan, np.nan], np.float32)])
        want = booster.predict(vector[np.newaxis].astype(np.float64))[0]
        slices, rescale = read_slices(row["scans"])
        for sex in (None, "O"):  # 'O' is encoded as unknown, as the pipeline encodes it
            assert abs(model.predict(slices, None, sex, rescale=rescale) - want) <= 1e-5


def test_the_file_is_valid_onnx_and_says_what_it_holds(trained, exported):
    engine, model_id = trained
    with open(exported["path"], "rb") as f:
        data = f.read()
    onnx.checker.check_model(exported["path"], full_check=True)
    model = onnx.load_from_string(data)
    assert {(o.domain, o.version) for o in model.opset_import} == {("", 17), ("ai.onnx.ml", 3)}
    assert exported["bytes"] == len(data) and exported["sha256"] == hashlib.sha256(data).hexdigest()
    assert [i["name"] for i in exported["inputs"]] == ["volume", "n_slices", "age", "sex"]
    assert exported["inputs"][0]["shape"] == ["groups", 3, 224, 224]
    assert exported["outputs"] == [{"name": "probability", "type": "float32", "shape": [1]}]
    with engine.connect() as conn:
        stored = conn.execute(sa.text(
            "SELECT m.name, m.version, m.sha256, c.name AS cnn, c.sha256 AS cnn_sha256, c.preprocessing "
            "FROM lungsql.models m JOIN lungsql.cnn_models c USING (cnn_id) WHERE m.model_id = :m"),
            {"m": model_id}).one()
    meta = {p.key: p.value for p in model.metadata_props}
    assert meta["lungsql.model_id"] == str(model_id)
    assert (meta["lungsql.model_name"], meta["lungsql.model_version"]) == (stored.name, str(stored.version))
    assert (meta["lungsql.cnn_name"], meta["lungsql.cnn_sha256"]) == (stored.cnn, stored.cnn_sha256)
    assert meta["lungsql.lightgbm_sha256"] == stored.sha256
    assert Preprocessing.from_json(json.loads(meta["lungsql.preprocessing"])) == Preprocessing.from_json(
        stored.preprocessing)
    assert meta["lungsql.version"] and meta["lungsql.feature_set"] == pipeline.FEATURE_SET
    # Written whole: no temporary file is left beside it.
    folder = [p.name for p in Path(exported["path"]).parent.iterdir()]
    assert folder == ["model.onnx"]


def test_scoring_needs_neither_lightgbm_nor_a_database(exported):
    script = ("import sys; sys.modules['lightgbm'] = None; sys.modules['onnxmltools'] = None; "
              "sys.modules['sqlalchemy'] = None; import numpy as np; "
              "from lungsql.ml.portable import PortableModel; "
              "m = PortableModel(open(sys.argv[1], 'rb').read()); "
              "hu = np.full((5, 64, 64), -1000, np.float32); hu[:, 16:48, 16:48] = 40; "
              "print(m.predict(hu, 60, 'F'))")
    done = subprocess.run([sys.executable, "-c", script, exported["path"]], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert 0.0 <= float(done.stdout) <= 1.0


def test_unknown_model_id_is_a_clear_error(trained, tmp_path):
    engine, _ = trained
    with pytest.raises(ConfigurationError, match="there is no model with id 9999") as caught:
        model_export.export_model(engine, 9999, tmp_path / "model.onnx")
    assert "lungsql.models" in caught.value.hint
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("change, error, message", [
    ("model_text = replace(model_text, 'objective=binary', 'objective=regression')", IntegrityError,
     "do not match their SHA-256"),
    ("feature_set = 'mean-v0'", ConfigurationError, "feature set 'mean-v0'"),
    ("feature_names = '[\"mean_0\", \"delta_0\", \"log_slices\", \"age_years\", \"sex_male\"]'::jsonb",
     ConfigurationError, "trained on 1 CNN features per image, but its CNN"),
])
def test_a_model_the_export_cannot_trust_or_compute_is_refused(trained, tmp_path, change, error, message):
    engine, model_id = trained
    with engine.begin() as conn:  # a copy of the trained model, altered
        copy = conn.execute(sa.text(
            "INSERT INTO lungsql.models (name, version, cnn_id, feature_set, feature_names, params, model_text, "
            "                            sha256, metrics) "
            "SELECT 'altered', (SELECT coalesce(max(version), 0) + 1 FROM lungsql.models WHERE name = 'altered'), "
            "       cnn_id, feature_set, feature_names, params, model_text, sha256, metrics "
            "FROM lungsql.models WHERE model_id = :m RETURNING model_id"), {"m": model_id}).scalar()
        conn.execute(sa.text(f"UPDATE lungsql.models SET {change} WHERE model_id = :m"), {"m": copy})
    with pytest.raises(error, match=message):
        model_export.export_model(engine, copy, tmp_path / "model.onnx")
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- without a database


def test_feature_names_are_the_pipelines():
    assert portable.FEATURE_SET == pipeline.FEATURE_SET
    assert portable.feature_names(7) == pipeline.feature_names(7)


def tiny_cnn(size: int) -> bytes:
    """An ONNX 'CNN' whose features are the mean of each channel."""
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("GlobalAveragePool", ["images"], ["pooled"])], "tiny",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["n", 3, size, size])],
        [helper.make_tensor_value_info("pooled", TensorProto.FLOAT, ["n", 3, 1, 1])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


@pytest.mark.parametrize("unknown_in_training", [True, False], ids=["unknown-in-training", "all-known-in-training"])
def test_trees_route_thresholds_and_missing_values_as_lightgbm(unknown_in_training):
    """Age and sex unknown for some patients, whether training saw unknown ones (LightGBM then sends
    them where it learnt to) or not (LightGBM then reads them as 0); the model's columns in an order
    of its own; then every patient scored with age and sex unknown too."""
    size = 8
    rng = np.random.default_rng(5)
    volumes = [rng.normal(size=(int(rng.integers(1, 4)), 3, size, size)).astype(np.float32) for _ in range(240)]
    n_slices = [3 * len(v) - int(rng.integers(0, 3)) for v in volumes]
    ages = [float(rng.integers(30, 90)) for _ in volumes]
    sexes = [str(rng.choice(["M", "F"])) for _ in volumes]
    if unknown_in_training:
        ages = [None if rng.random() < 0.25 else a for a in ages]
        sexes = [None if rng.random() < 0.25 else s for s in sexes]

    def vector(v, n, age, sex):
        return np.concatenate([patient_vector(v.mean(axis=(2, 3)), n), [portable.encode_age(age),
                                                                         portable.encode_sex(sex)]])

    X = np.stack([vector(*patient) for patient in zip(volumes, n_slices, ages, sexes)])
    y = X[:, 0] + 2 * X[:, 3] + np.nan_to_num(X[:, 7], nan=80) / 60 + np.nan_to_num(X[:, 8], nan=0.5) > 1.6
    order = rng.permutation(X.shape[1])
    names = [portable.feature_names(3)[i] for i in order]
    booster = lightgbm.train({"objective": "binary", "num_leaves": 7, "min_data_in_leaf": 5, "verbosity": -1},
                             lightgbm.Dataset(X[:, order], y.astype(int), feature_name=names), 60)
    split_on = {names[s["split_feature"]] for t in booster.dump_model()["tree_info"]
                for s in portable._splits(t["tree_structure"])}
    assert {"age_years", "sex_male"} <= split_on
    data = portable.portable_model(tiny_cnn(size), "images", "pooled", booster.model_to_string(), names,
                                   preprocessing=Preprocessing(image_size=size), model_name="tiny")
    onnx.checker.check_model(onnx.load_from_string(data), full_check=True)
    model = portable.PortableModel(data)
    for scored_ages, scored_sexes in ((ages, sexes), ([None] * len(ages), [None] * len(sexes))):
        got = [model.predict_volume(*patient) for patient in zip(volumes, n_slices, scored_ages, scored_sexes)]
        want = booster.predict(np.stack([vector(*patient) for patient in
                                         zip(volumes, n_slices, scored_ages, scored_sexes)])[:, order])
        assert np.max(np.abs(np.array(got) - want)) <= 1e-5
    assert model.metadata["lungsql.model_name"] == "tiny"


def test_names_outside_the_feature_set_are_refused():
    with pytest.raises(ConfigurationError, match="features it cannot compute \\(height\\)"):
        portable.portable_model(tiny_cnn(8), "images", "pooled", "", portable.feature_names(3) + ["height"],
                                preprocessing=Preprocessing(image_size=8))
    with pytest.raises(ConfigurationError, match="no column for sex_male"):
        portable.portable_model(tiny_cnn(8), "images", "pooled", "", portable.feature_names(3)[:-1],
                                preprocessing=Preprocessing(image_size=8))
