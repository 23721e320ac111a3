"""The chest radiograph task in the database: a ChestX-ray14-layout cohort and real DICOM CR files
ingested, featurized by the stored procedure with a real ONNX CNN, one booster per finding trained,
and the findings scored, on a real PostgreSQL."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import sqlalchemy as sa

from databases import call
from lungsql.client import cnns, radiograph_ingest
from lungsql.ml import cnn_export
from lungsql.ml.tasks import CHEST_XRAY14_FINDINGS


@pytest.fixture(scope="module")
def xray_cohort(tmp_path_factory):
    from lungsql.dicom import synth_xray

    out = tmp_path_factory.mktemp("xray14")
    synth_xray.write_cohort(out, patients=80, size=256, seed=7)
    return out


@pytest.fixture
def with_cnn(engine):
    cnn_export.export_builtin("efficientnet-lite0", cache_dir=cnn_export.default_cache_dir())
    cnns.import_builtin(engine)
    return engine


def _count(engine, sql: str, **params) -> int:
    with engine.connect() as conn:
        return conn.execute(sa.text(sql), params).scalar()


def test_radiographs_are_ingested_featurized_trained_and_scored(with_cnn, xray_cohort, tmp_path):
    engine = with_cnn
    cohort = tmp_path / "cohort"
    shutil.copytree(xray_cohort, cohort)
    images = sorted((cohort / "images").glob("*.png"))
    held_back = images[-3:]  # labelled in the CSV, not uploaded: their labels load all the same
    for path in held_back:
        path.unlink()
    (cohort / "images" / "99999999_000.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    summary = radiograph_ingest.ingest(engine, cohort)
    assert summary.stored == len(images) - 3 and summary.errors == 1
    assert summary.labels == len(images)
    assert _count(engine, "SELECT count(*) FROM lungsql.image_labels") == len(images)
    assert _count(engine, "SELECT count(*) FROM lungsql.image_labels WHERE split = 'test'") > 0
    with engine.connect() as conn:
        error = conn.execute(sa.text("SELECT source_path, reason FROM lungsql.ingest_errors")).one()
        patients = conn.execute(sa.text("SELECT count(*), count(sex) FROM lungsql.patients")).one()
    assert error.source_path.endswith("99999999_000.png") and error.reason
    assert patients[0] == patients[1] > 10  # sex from the CSV
    again = radiograph_ingest.ingest(engine, cohort)  # a rerun stores nothing twice
    assert again.stored == 0 and again.skipped == len(images) - 3
    assert _count(engine, "SELECT count(*) FROM lungsql.radiographs") == len(images) - 3

    notices: list[str] = []
    call(engine, "CALL lungsql.generate_features(task => 'chest_xray14')", notices=notices)
    assert _count(engine, "SELECT count(*) FROM lungsql.image_features") == len(images) - 3
    assert any("radiographs" in n and "images/s" in n for n in notices)
    with engine.connect() as conn:
        run = conn.execute(sa.text("SELECT task, status, patients FROM lungsql.feature_runs")).one()
    assert tuple(run) == ("chest_xray14", "finished", len(images) - 3)

    rows = call(engine, "SELECT * FROM lungsql.train_findings()")
    per_finding = {r[1]: r for r in rows}
    assert set(per_finding) == set(CHEST_XRAY14_FINDINGS) | {"mean"}
    model_id, mean_auc = per_finding["mean"][0], per_finding["mean"][2]
    assert all(r[3] > 0 and r[4] > 0 for f, r in per_finding.items() if f != "mean")  # positives, negatives
    assert mean_auc >= 0.80, rows
    with engine.connect() as conn:
        boosters = conn.execute(sa.text("SELECT count(*) FROM lungsql.model_boosters WHERE model_id = :m"),
                                {"m": model_id}).scalar()
        model = conn.execute(sa.text("SELECT task, metrics->>'split' AS split FROM lungsql.models")).one()
        image_id = conn.execute(sa.text("SELECT min(image_id) FROM lungsql.radiographs")).scalar()
    assert boosters == 14 and tuple(model) == ("chest_xray14", "official")

    found = call(engine, "SELECT finding, probability FROM lungsql.predict_findings(%s)", (image_id,))
    assert {m for (m,) in call(engine, "SELECT model_id FROM lungsql.predict_findings(%s)", (image_id,))} == {model_id}
    assert sorted(f for f, _ in found) == sorted(CHEST_XRAY14_FINDINGS)
    probabilities = [p for _, p in found]
    assert probabilities == sorted(probabilities, reverse=True) and all(0 <= p <= 1 for p in probabilities)
    batch = call(engine, "SELECT * FROM lungsql.predict_findings_batch(ARRAY(SELECT image_id FROM "
                         "lungsql.radiographs ORDER BY image_id LIMIT 5))")
    assert len(batch) == 5 * 14
    first = {f: p for i, f, p, _ in batch if i == image_id}
    for finding, p in found:
        assert first[finding] == pytest.approx(p, abs=1e-12)
    assert _count(engine, "SELECT count(*) FROM lungsql.finding_predictions") == 2 * 14 + 5 * 14


def test_real_dicom_radiographs_ingest_featurize_and_score(with_cnn, xray_cohort, tmp_path):
    """pydicom-data's chest radiograph (CR, MONOCHROME1, 1955 x 1841), uncompressed and JPEG 2000."""
    from pydicom.data import get_testdata_file

    engine = with_cnn
    folder = tmp_path / "cr"
    folder.mkdir()
    for name in ("RG1_UNCR.dcm", "RG1_J2KR.dcm"):
        shutil.copy(get_testdata_file(name), folder / name)
    radiograph_ingest.ingest(engine, xray_cohort)
    summary = radiograph_ingest.ingest(engine, folder)
    assert summary.stored == 2 and summary.errors == 0
    with engine.connect() as conn:
        cr = conn.execute(sa.text("SELECT image_id, modality, photometric, rows, columns, transfer_syntax_uid "
                                  "FROM lungsql.radiographs WHERE format = 'dicom' ORDER BY image_index")).all()
    assert {(r.modality, r.photometric, r.rows, r.columns) for r in cr} == {("CR", "MONOCHROME1", 1955, 1841)}
    assert len({r.transfer_syntax_uid for r in cr}) == 2  # uncompressed, and JPEG 2000 lossless
    call(engine, "CALL lungsql.generate_features(task => 'chest_xray14')")
    call(engine, "SELECT * FROM lungsql.train_findings()")
    scored = [dict(call(engine, "SELECT finding, probability FROM lungsql.predict_findings(%s)", (r.image_id,)))
              for r in cr]
    assert all(len(found) == 14 and all(0 <= p <= 1 for p in found.values()) for found in scored)
    # The same pixels, losslessly compressed or not: the same probabilities.
    assert all(scored[0][f] == pytest.approx(scored[1][f], abs=1e-5) for f in scored[0])


def test_a_radiograph_model_never_answers_for_ct_and_names_stay_with_their_task(with_cnn, xray_cohort, db_env):
    from click.testing import CliRunner

    from lungsql.client.cli import main

    engine = with_cnn
    radiograph_ingest.ingest(engine, xray_cohort)
    call(engine, "CALL lungsql.generate_features(task => 'chest_xray14')")
    call(engine, "SELECT * FROM lungsql.train_findings()")
    image_id = _count(engine, "SELECT min(image_id) FROM lungsql.radiographs")
    result = CliRunner().invoke(main, ["predict", "--task", "chest_xray14", str(image_id)])
    assert result.exit_code == 0, result.output
    assert sum(finding in result.output for finding in CHEST_XRAY14_FINDINGS) == 14
    result = CliRunner().invoke(main, ["predict", "--task", "chest_xray14", "1; DROP TABLE x"])
    assert result.exit_code != 0 and "image_ids (whole numbers)" in result.output
    # CT scoring with no name takes the latest lung-cancer deployment: there is none.
    with pytest.raises(Exception, match="no model is deployed"):
        call(engine, "SELECT lungsql.predict_lung_cancer('nobody')")
    with pytest.raises(Exception, match="no radiograph model is deployed as 'other'"):
        call(engine, "SELECT * FROM lungsql.predict_findings(1, 'other')")
    call(engine, "INSERT INTO lungsql.models (name, version, cnn_id, feature_set, feature_names, params, model_text, "
                 "sha256, metrics) SELECT 'ct_model', 1, cnn_id, 'x', '[]', '{}', '', repeat('0', 64), '{}' "
                 "FROM lungsql.cnn_models LIMIT 1")
    with pytest.raises(Exception, match="belongs to models of the task 'lung_cancer'"):
        call(engine, "SELECT * FROM lungsql.train_findings('ct_model')")


def test_the_features_of_a_radiograph_are_those_of_its_image_through_the_cnn(with_cnn, xray_cohort):
    """What the procedure stores is the CNN's output on the whole image resized (no CT window)."""
    from lungsql.dicom.radiograph import decode_radiograph
    from lungsql.ml.featurize import Featurizer
    from lungsql.ml.preprocess import Preprocessing, prepare_radiographs

    engine = with_cnn
    radiograph_ingest.ingest(engine, xray_cohort)
    images = _count(engine, "SELECT count(*) FROM lungsql.radiographs")
    call(engine, "CALL lungsql.generate_features(task => 'chest_xray14', shard => 0, shards => 2)")  # a part
    part = _count(engine, "SELECT count(*) FROM lungsql.image_features")
    assert 0 < part < images
    notices: list[str] = []
    call(engine, "CALL lungsql.generate_features(task => 'chest_xray14')", notices=notices)  # the rest, once
    assert _count(engine, "SELECT count(*) FROM lungsql.image_features") == images
    assert any(f"featurizing {images - part} radiographs" in n for n in notices), notices
    with engine.connect() as conn:
        row = conn.execute(sa.text("SELECT r.data AS image, f.data AS features, c.model, c.preprocessing "
                                   "FROM lungsql.radiographs r JOIN lungsql.image_features f USING (image_id) "
                                   "JOIN lungsql.cnn_models c USING (cnn_id) ORDER BY image_id LIMIT 1")).one()
    p = Preprocessing.from_json(row.preprocessing)
    with Featurizer(bytes(row.model), preprocessing=p) as featurizer:
        expected = featurizer.run(prepare_radiographs([decode_radiograph(bytes(row.image))], p))[0]
    np.testing.assert_allclose(np.frombuffer(bytes(row.features), "<f4"), expected, rtol=1e-4, atol=1e-5)
