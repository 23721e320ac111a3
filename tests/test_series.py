"""Real studies hold more than one series: the series featurized is chosen on purpose (localizers,
reformats and tilted series left out, then the thinnest slices with enough coverage), recorded with
the features and open to a DBA's choice; Enhanced CT (one multi-frame file with per-frame functional
groups) is stored with each frame's position and featurized like the classic slices it holds."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import sqlalchemy as sa
from pydicom.data import get_testdata_file

from databases import call, create_database, drop_database
from lungsql.client import cnns, ingest, migrations
from lungsql.dicom import read_scan
from lungsql.dicom.series import SUMMARY_COLUMNS, SeriesInfo, choose_series, summarize_series
from lungsql.errors import LungSQLError
from lungsql.ml import cnn_export
from lungsql.ml.features import GroupFeatures

from lungsql.client.pacs import dicomweb
from studies import SLICES, write_mixed_study


@pytest.fixture(scope="module")
def exported_cnn():
    return cnn_export.export_builtin("efficientnet-lite0", cache_dir=cnn_export.default_cache_dir())


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> dict:
    return write_mixed_study(tmp_path_factory.mktemp("series"))


@pytest.fixture
def featurized(engine, study, exported_cnn):
    ingest.ingest(engine, study["root"])
    cnns.import_builtin(engine)
    notices: list[str] = []
    call(engine, "CALL lungsql.generate_features()", notices=notices)
    return engine, notices


def rows(engine, sql: str, **params):
    with engine.connect() as conn:
        return conn.execute(sa.text(sql), params).all()


# -- Enhanced CT ---------------------------------------------------------------------------------------------
def test_an_enhanced_ct_file_is_stored_with_each_frames_position(engine, study):
    summary = ingest.ingest(engine, study["root"])
    assert summary.errors == 0
    (row,) = rows(engine, "SELECT frames, frame_z, z_position, image_type FROM lungsql.scans "
                          "WHERE series_instance_uid = :s", s=study["uids"]["enhanced"])
    assert row.frames == SLICES and len(row.frame_z) == SLICES
    assert sorted(abs(z) for z in row.frame_z) == sorted(abs(z) for z in study["z"])  # along the normal
    assert row.z_position == min(row.frame_z)


def test_the_enhanced_ct_test_file_of_pydicom_data_is_read_with_its_frames():
    record = read_scan(Path(get_testdata_file("eCT_Supplemental.dcm")).read_bytes())
    assert (record.frames, record.frame_z) == (2, (159.0, 149.0))
    assert (record.rescale_slope, record.rescale_intercept) == (1.0, -1024.0)  # from the functional groups
    assert (record.slice_thickness, record.pixel_spacing_row, record.tilt_degrees) == (10.0, 0.388672, 0.0)


# -- the rule, in the database -----------------------------------------------------------------------------
def test_the_series_the_rule_names_is_featurized_and_recorded(featurized, study):
    engine, notices = featurized
    (features,) = rows(engine, "SELECT series_instance_uid, series_reason, n_slices FROM lungsql.features "
                               "WHERE patient_id = :p", p=study["patient"])
    assert features.series_instance_uid == study["uids"]["enhanced"]
    assert features.n_slices == SLICES
    assert "thinnest axial series" in features.series_reason
    assert "left out: 1 coronal or sagittal, 1 localizer, 1 tilted" in features.series_reason
    (failure,) = rows(engine, "SELECT patient_id, reason FROM lungsql.feature_failures")
    assert failure.patient_id == "no-volume"
    assert failure.reason.startswith("none of the patient's series is an axial CT volume")
    assert any("skipped patient no-volume" in n for n in notices)


def test_a_mixed_study_pulled_from_the_pacs_featurizes_the_series_the_rule_names(engine, study, orthanc_clean,
                                                                                 exported_cnn):
    for path in sorted(study["root"].rglob("*.dcm")):
        orthanc_clean.upload(path.read_bytes())
    web = dicomweb.client(orthanc_clean.dicomweb_url)
    summary = dicomweb.pull(engine, web, dicomweb.Query(patient=study["patient"]))
    assert summary.errors == 0 and summary.stored == len(list(study["root"].glob("[!o]*/*.dcm")))
    cnns.import_builtin(engine)
    call(engine, "CALL lungsql.generate_features()")
    (features,) = rows(engine, "SELECT series_instance_uid, n_slices FROM lungsql.features")
    assert (features.series_instance_uid, features.n_slices) == (study["uids"]["enhanced"], SLICES)


def test_enhanced_ct_frames_give_the_features_of_the_classic_slices(featurized, study, cluster):
    engine, _ = featurized
    name = create_database(cluster, "classic")
    classic = sa.create_engine(cluster.url(dbname=name))
    try:
        migrations.init(classic)
        ingest.ingest(classic, study["classic"])
        cnns.import_builtin(classic)
        call(classic, "CALL lungsql.generate_features()")
        (mine,) = rows(engine, "SELECT data, n_groups, dim, sha256, n_slices FROM lungsql.features "
                               "WHERE patient_id = :p", p=study["patient"])
        (theirs,) = rows(classic, "SELECT data, n_groups, dim, sha256, n_slices FROM lungsql.features")
    finally:
        classic.dispose()
        drop_database(cluster, name)
    a = GroupFeatures.from_bytes(mine.data, (mine.n_groups, mine.dim), mine.sha256, n_slices=mine.n_slices)
    b = GroupFeatures.from_bytes(theirs.data, (theirs.n_groups, theirs.dim), theirs.sha256, n_slices=theirs.n_slices)
    assert a.shape == b.shape
    np.testing.assert_allclose(a.array, b.array, rtol=1e-4, atol=1e-5)


def test_the_series_view_shows_what_the_rule_reads(engine, study):
    ingest.ingest(engine, study["root"])
    scan_rows = [dict(r._mapping) for r in rows(engine, f"SELECT {', '.join(SUMMARY_COLUMNS)} FROM lungsql.scans "
                                                        "WHERE patient_id = :p", p=study["patient"])]
    expected = {s.series_instance_uid: s for s in summarize_series(scan_rows)}
    view = rows(engine, "SELECT * FROM lungsql.series WHERE patient_id = :p", p=study["patient"])
    assert {v.series_instance_uid for v in view} == set(expected) and len(view) == 6
    for v in view:
        e = expected[v.series_instance_uid]
        assert (v.slices, v.localizer, v.modality) == (e.slices, e.localizer, e.modality)
        assert v.coverage_mm == pytest.approx(e.coverage_mm)
        assert v.slice_thickness == pytest.approx(e.slice_thickness)
        assert (v.tilt_degrees or 0) == pytest.approx(e.tilt_degrees or 0, abs=1e-6)
    tilts = {name: expected[uid].tilt_degrees for name, uid in study["uids"].items()}
    assert tilts["coronal"] == pytest.approx(90) and tilts["tilted"] == pytest.approx(15)
    assert tilts["thick"] == pytest.approx(0) and tilts["enhanced"] == pytest.approx(0)


def test_a_dbas_choice_overrides_the_rule_and_featurizes_that_series_again(featurized, study):
    engine, _ = featurized
    thick = study["uids"]["thick"]
    notices: list[str] = []
    call(engine, "CALL lungsql.choose_series(%s, %s)", (study["patient"], thick), notices=notices)
    assert "1 feature row(s) from another series deleted" in notices[-1]
    call(engine, "CALL lungsql.generate_features()")
    (features,) = rows(engine, "SELECT series_instance_uid, series_reason, n_slices FROM lungsql.features "
                               "WHERE patient_id = :p", p=study["patient"])
    assert (features.series_instance_uid, features.n_slices) == (thick, SLICES // 2)
    assert features.series_reason.startswith("chosen by ")
    call(engine, "CALL lungsql.choose_series(%s, NULL)", (study["patient"],))
    call(engine, "CALL lungsql.generate_features()")
    assert rows(engine, "SELECT series_instance_uid FROM lungsql.features WHERE patient_id = :p",
                p=study["patient"])[0][0] == study["uids"]["enhanced"]
    with pytest.raises(Exception, match="has no series"):
        call(engine, "CALL lungsql.choose_series(%s, %s)", (study["patient"], "1.2.3.4"))


# -- the rule, on its own ------------------------------------------------------------------------------------
def _series(uid: str, **values) -> SeriesInfo:
    return SeriesInfo(uid, **{"slices": 100, "coverage_mm": 300.0, "slice_thickness": 1.0, **values})


def test_the_thinnest_series_with_enough_coverage_is_chosen():
    thin_short = _series("a", slice_thickness=0.5, coverage_mm=200.0)  # thinnest, but 67 % of the coverage
    thin = _series("b", slice_thickness=1.0, coverage_mm=290.0)
    thick = _series("c", slice_thickness=5.0, coverage_mm=300.0)
    assert choose_series([thin_short, thin, thick], prefer="").series_instance_uid == "b"
    same = [_series("z"), _series("y")]  # a tie: the lowest UID, whatever the order
    assert choose_series(same, prefer="").series_instance_uid == choose_series(same[::-1], prefer="").series_instance_uid == "y"


def test_a_preferred_kernel_or_description_comes_first():
    soft = _series("a", slice_thickness=1.0, convolution_kernel="B30f")
    lung = _series("b", slice_thickness=2.0, convolution_kernel="B70f", series_description="Lung 2mm")
    assert choose_series([soft, lung], prefer="").series_instance_uid == "a"
    choice = choose_series([soft, lung], prefer="lung|B70")
    assert choice.series_instance_uid == "b" and "preferred by LUNGSQL_SERIES_PREFER" in choice.reason
    assert choose_series([soft], prefer="lung").series_instance_uid == "a"  # no match: the rule as usual


def test_series_that_are_not_a_volume_are_never_chosen():
    found = [_series("loc", localizer=True), _series("cor", tilt_degrees=90.0), _series("tilt", tilt_degrees=12.0),
             _series("mr", modality="MR"), _series("few", slices=2)]
    with pytest.raises(LungSQLError, match="none of the patient's series is an axial CT volume; left out: "
                                           "1 coronal or sagittal, 1 fewer than 3 slices, 1 localizer, "
                                           "1 not CT \\(MR\\), 1 tilted"):
        choose_series(found, prefer="", max_tilt=2.0, min_slices=3)
    assert choose_series([*found, _series("ok", tilt_degrees=1.0)], prefer="", max_tilt=2.0,
                         min_slices=3).series_instance_uid == "ok"


def test_a_dbas_choice_must_be_a_stored_series():
    assert choose_series([_series("a"), _series("b")], override="b", override_by="dba").reason.startswith(
        "chosen by dba")
    with pytest.raises(LungSQLError, match="is not stored"):
        choose_series([_series("a")], override="gone")


# -- reading the stored pixels ---------------------------------------------------------------------------------
@pytest.mark.parametrize("syntax", ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"])
def test_slices_are_read_past_every_kind_of_element_before_their_pixels(tmp_path, syntax):
    # read_slices walks each file's elements up to its pixels (lungsql.dicom.fast): private groups,
    # group 0028 elements it does not need, values of long VRs and sequences of undefined length,
    # nested, must all be stepped over to the same pixels and rescale as pydicom finds.
    import io

    import pydicom
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    from lungsql.dicom import synth
    from lungsql.dicom.fast import stored_from_bytes
    from lungsql.dicom.series import read_slices

    synth.write_cohort(tmp_path, patients=1, slices=(3, 3), seed=5)
    scans, expected = [], []
    for path in sorted(tmp_path.rglob("*.dcm")):
        ds = pydicom.dcmread(path)
        ds.file_meta.TransferSyntaxUID = syntax
        ds.PixelSpacing, ds.WindowCenter, ds.WindowWidth = [0.7, 0.7], "-600", "1500"  # (0028,xxxx) unread
        ds.add_new(0x00290010, "LO", "LUNGSQL TEST")
        ds.add_new(0x00291010, "OB", bytes(range(11)) + b"\x00")
        code = Dataset()
        code.CodeValue, code.CodeMeaning = "113100", "Basic Application Confidentiality Profile"
        code.is_undefined_length_sequence_item = True
        outer = Dataset()
        outer.DeidentificationMethodCodeSequence = Sequence([code])
        outer["DeidentificationMethodCodeSequence"].is_undefined_length = True  # a sequence inside an item
        outer.is_undefined_length_sequence_item = True
        ds.add_new(0x00400260, "SQ", Sequence([outer]))  # PerformedProtocolCodeSequence, before the pixels
        ds[0x00400260].is_undefined_length = True
        ds.RescaleSlope, ds.RescaleIntercept = "0.5", "-1000"
        out = io.BytesIO()
        ds.save_as(out, enforce_file_format=True)
        scans.append((out.getvalue(), float(ds.ImagePositionPatient[2])))
        expected.append((float(ds.ImagePositionPatient[2]), ds.pixel_array))
    assert all(stored_from_bytes(data) is not None for data, _ in scans)  # read without pydicom
    slices, rescale = read_slices(scans[::-1])
    expected.sort(key=lambda e: e[0])
    assert len(slices) == 3
    for got, (_, pixels) in zip(slices, expected):
        np.testing.assert_array_equal(got, pixels)
    np.testing.assert_array_equal(rescale, [[0.5, -1000.0]] * 3)


# -- hostile Enhanced CT: every way the functional groups can lie is one clear reason -------------------------
def _enhanced_bytes(study, change) -> bytes:
    import io

    import pydicom

    path = next((study["root"] / "enhanced").glob("*.dcm"))
    ds = pydicom.dcmread(path)
    change(ds)
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


@pytest.mark.parametrize("change, reason", [
    (lambda ds: setattr(ds, "NumberOfFrames", ds.NumberOfFrames - 1), "per-frame functional groups describe"),
    (lambda ds: delattr(ds.PerFrameFunctionalGroupsSequence[3], "PlanePositionSequence"),
     "frame 4 has no ImagePositionPatient"),
    (lambda ds: setattr(ds.PerFrameFunctionalGroupsSequence[2].PlanePositionSequence[0], "ImagePositionPatient",
                        [1.0, 2.0]), "frame 3 has no ImagePositionPatient"),  # two values, not three
    (lambda ds: ds.PerFrameFunctionalGroupsSequence[5].__setattr__(
        "PlaneOrientationSequence", _orientation([1, 0, 0, 0, 0, -1])), "different orientations"),
    (lambda ds: ds.PerFrameFunctionalGroupsSequence[1].__setattr__(
        "PixelValueTransformationSequence", _rescale(2.0, -1024.0)), "different rescales"),
])
def test_an_enhanced_ct_whose_functional_groups_do_not_hold_together_is_refused(study, change, reason):
    from lungsql.errors import InvalidScan

    with pytest.raises(InvalidScan, match=reason):
        read_scan(_enhanced_bytes(study, change))


def _orientation(values):
    from pydicom import Dataset
    from pydicom.sequence import Sequence

    item = Dataset()
    item.ImageOrientationPatient = values
    return Sequence([item])


def _rescale(slope: float, intercept: float):
    from pydicom import Dataset
    from pydicom.sequence import Sequence

    item = Dataset()
    item.RescaleSlope, item.RescaleIntercept, item.RescaleType = slope, intercept, "HU"
    return Sequence([item])
