"""The DICOM objects lungsql sends back to a PACS: the Structured Report with the probability of lung
cancer and the Key Object Selection of the key slice, written, saved, read back (no database needed)."""

from __future__ import annotations

import copy
import io
import math
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import ComprehensiveSRStorage, KeyObjectSelectionDocumentStorage

import highdicom as hd  # the pacs extra, which bootstrap installs

from lungsql.dicom import report, synth
from lungsql.errors import LungSQLError

MODEL = report.ModelInfo(name="lungsql-lightgbm", model_id=12, version="lungsql 0.1 model 12",
                         cnn_name="efficientnet_lite0", model_sha256="0123456789abcdef" * 4)


@pytest.fixture(scope="module")
def series(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[Path]]:
    """Two synthetic patients of four slices each: patient id -> the files of its one series."""
    out = tmp_path_factory.mktemp("cohort")
    synth.write_cohort(out, patients=2, slices=(4, 4), seed=3)
    return {folder.name: sorted(folder.glob("*.dcm")) for folder in sorted(out.iterdir()) if folder.is_dir()}


@pytest.fixture
def headers(series) -> list[Dataset]:
    """The headers of the first patient's slices, as lungsql keeps them (no pixels)."""
    return [pydicom.dcmread(path, stop_before_pixels=True) for path in next(iter(series.values()))]


@pytest.fixture
def other_patient(series) -> list[Dataset]:
    return [pydicom.dcmread(path, stop_before_pixels=True) for path in list(series.values())[1]]


def saved(ds: Dataset) -> Dataset:
    """`ds` written as a DICOM file and read back, as the PACS would receive it."""
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return pydicom.dcmread(io.BytesIO(buffer.getvalue()))


def items(ds: Dataset):
    """Every content item of an SR content tree, depth first."""
    for item in ds.get("ContentSequence", []):
        yield item
        yield from items(item)


def named(ds: Dataset, code) -> list[Dataset]:
    return [item for item in items(ds) if item.ConceptNameCodeSequence[0].CodeValue == code.value
            and item.ConceptNameCodeSequence[0].CodingSchemeDesignator == code.scheme_designator]


# ----------------------------------------------------------------------------- the Structured Report


def test_report_round_trips_through_a_file(headers):
    sr = saved(report.structured_report(headers, 0.734, MODEL, institution="Hospital General"))
    assert sr.SOPClassUID == ComprehensiveSRStorage
    assert sr.file_meta.MediaStorageSOPClassUID == ComprehensiveSRStorage
    assert sr.Modality == "SR" and sr.SeriesNumber == 9901 and sr.InstitutionName == "Hospital General"
    first = headers[0]
    assert sr.StudyInstanceUID == first.StudyInstanceUID
    for keyword in ("PatientID", "PatientName", "PatientBirthDate", "PatientSex"):
        assert sr[keyword].value == first[keyword].value, keyword
    assert sr.SeriesInstanceUID != first.SeriesInstanceUID
    assert sr.SOPInstanceUID not in {ds.SOPInstanceUID for ds in headers}

    found = report.read_report(sr)
    assert found == {
        "probability": pytest.approx(0.734, abs=1e-12),
        "model_name": "lungsql-lightgbm", "model_version": "lungsql 0.1 model 12", "model_id": 12,
        "model_sha256": MODEL.model_sha256, "cnn_name": "efficientnet_lite0",
        "disclaimer": report.DISCLAIMER_TEXT,
        "study_instance_uid": first.StudyInstanceUID,
        "source_series_instance_uid": first.SeriesInstanceUID,
        "source_instances": [ds.SOPInstanceUID for ds in headers],
        "key_slice": None,
    }
    assert found["disclaimer"].startswith("For research use only. Not for diagnostic use.")


def test_what_a_viewer_reads_in_the_content_tree(headers):
    """The codes, units and references of the saved file itself, not through read_report."""
    sr = saved(report.structured_report(headers, 0.25, MODEL))
    assert sr.ContentTemplateSequence[0].TemplateIdentifier == "1500"
    assert sr.ConceptNameCodeSequence[0].CodeValue == codes.DCM.ImagingMeasurementReport.value
    (number,) = named(sr, report.LUNG_CANCER_PROBABILITY)
    value = number.MeasuredValueSequence[0]
    assert value.MeasurementUnitsCodeSequence[0].CodeValue == "%"
    assert value.MeasurementUnitsCodeSequence[0].CodingSchemeDesignator == "UCUM"
    assert float(value.NumericValue) == value.FloatingPointValue == pytest.approx(25.0)
    assert [item.TextValue for item in named(sr, codes.DCM.AlgorithmName)] == ["lungsql-lightgbm"]
    assert [item.TextValue for item in named(sr, codes.DCM.AlgorithmVersion)] == ["lungsql 0.1 model 12"]
    assert [item.TextValue for item in named(sr, report.MODEL_SHA256)] == [MODEL.model_sha256]
    assert [item.TextValue for item in named(sr, report.CNN_NAME)] == ["efficientnet_lite0"]
    assert [item.TextValue for item in named(sr, report.DISCLAIMER)] == [report.DISCLAIMER_TEXT]
    assert [s.CodingSchemeDesignator for s in sr.CodingSchemeIdentificationSequence] == ["99LUNGSQL"]
    # Every source slice: in the evidence, under its series, and in the image library.
    (study,) = sr.CurrentRequestedProcedureEvidenceSequence
    (evidence,) = study.ReferencedSeriesSequence
    assert evidence.SeriesInstanceUID == headers[0].SeriesInstanceUID
    expected = [ds.SOPInstanceUID for ds in headers]
    assert [ref.ReferencedSOPInstanceUID for ref in evidence.ReferencedSOPSequence] == expected
    (library,) = named(sr, codes.DCM.ImageLibrary)
    images = [item for item in items(library) if item.ValueType == "IMAGE"]
    assert [image.ReferencedSOPSequence[0].ReferencedSOPInstanceUID for image in images] == expected


def test_key_slice_is_referenced_as_an_image(headers):
    key = headers[2]
    sr = saved(report.structured_report(headers, 0.9, MODEL, key_slice=key))
    assert report.read_report(sr)["key_slice"] == key.SOPInstanceUID
    (number,) = named(sr, report.LUNG_CANCER_PROBABILITY)
    (image,) = [item for item in number.ContentSequence if item.ValueType == "IMAGE"]
    assert image.RelationshipType == "INFERRED FROM"
    assert image.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == key.SOPInstanceUID
    assert image.ReferencedSOPSequence[0].ReferencedSOPClassUID == key.SOPClassUID


def test_every_report_is_a_new_series_and_instance(headers):
    one, two = (report.structured_report(headers, 0.5, MODEL) for _ in range(2))
    assert one.SeriesInstanceUID != two.SeriesInstanceUID and one.SOPInstanceUID != two.SOPInstanceUID


@pytest.mark.parametrize("probability", [0.0, 1.0])
def test_the_ends_of_the_range_are_reported(headers, probability):
    sr = saved(report.structured_report(headers, probability, MODEL))
    assert report.read_report(sr)["probability"] == probability


def test_pixels_are_neither_needed_nor_copied_and_the_source_is_left_alone(series):
    full = [pydicom.dcmread(path) for path in next(iter(series.values()))]
    before = copy.deepcopy(full)
    sr = report.structured_report(full, 0.1, MODEL, key_slice=full[0])
    assert "PixelData" not in sr and all("PixelData" in ds for ds in full)
    assert full == before


def test_headers_without_the_optional_patient_and_study_attributes(headers):
    for ds in headers:
        for keyword in ("PatientBirthDate", "PatientSex", "AccessionNumber", "ReferringPhysicianName"):
            delattr(ds, keyword)
    sr = saved(report.structured_report(headers, 0.3, MODEL))
    assert sr.PatientID == headers[0].PatientID and sr.PatientBirthDate == "" and sr.AccessionNumber == ""
    assert report.read_report(sr)["probability"] == pytest.approx(0.3)


def _another_series(headers: list[Dataset]) -> list[Dataset]:
    moved = copy.deepcopy(headers[-1])
    moved.SeriesInstanceUID = hd.UID()
    return [*headers[:-1], moved]


@pytest.mark.parametrize("case, message", [
    ("another patient's slice", "studies"),
    ("another series of the study", "series"),
    ("the same slice twice", "more than once"),
    ("no slices", "no source slices"),
    ("a slice without its UID", "SOPInstanceUID"),
])
def test_source_that_is_not_one_series_is_refused(headers, other_patient, case, message):
    source = {
        "another patient's slice": [*headers, other_patient[0]],
        "another series of the study": _another_series(headers),
        "the same slice twice": [*headers, headers[0]],
        "no slices": [],
        "a slice without its UID": [*headers[:-1], Dataset()],
    }[case]
    with pytest.raises(LungSQLError, match=message) as raised:
        report.structured_report(source, 0.5, MODEL)
    assert raised.value.hint


@pytest.mark.parametrize("probability", [1.5, -0.01, math.nan, math.inf, "0.5", None, True])
def test_probability_outside_zero_to_one_is_refused(headers, probability):
    with pytest.raises(LungSQLError, match="probability") as raised:
        report.structured_report(headers, probability, MODEL)
    assert raised.value.hint


def test_key_slice_must_be_one_of_the_source_slices(headers, other_patient):
    with pytest.raises(LungSQLError, match="key_slice"):
        report.structured_report(headers, 0.5, MODEL, key_slice=other_patient[0])


@pytest.mark.parametrize("field, value", [("model_sha256", "ABC"), ("model_sha256", "0" * 63 + "G"),
                                          ("name", ""), ("version", "v" * 65), ("model_id", "12")])
def test_model_info_is_checked(field, value):
    fields = {"name": "m", "model_id": 1, "version": "1", "cnn_name": "cnn", "model_sha256": "a" * 64}
    with pytest.raises(LungSQLError, match=field):
        report.ModelInfo(**{**fields, field: value})


# ----------------------------------------------------------------------------- reading back


def _foreign_report(headers: list[Dataset]) -> Dataset:
    """A TID 1500 report from some other software: a volume, no lungsql probability."""
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=hd.UID(), identifier="nodule 1"),
        measurements=[hd.sr.Measurement(name=codes.SCT.Volume, value=1.5, unit=codes.UCUM.CubicMillimeter)])
    content = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(),
        procedure_reported=codes.cid100.CTUnspecifiedBodyRegion, imaging_measurements=[group])
    return hd.sr.ComprehensiveSR(evidence=headers, content=content[0], series_instance_uid=hd.UID(),
                                 series_number=7, sop_instance_uid=hd.UID(), instance_number=1)


def _without_sha256(headers: list[Dataset]) -> Dataset:
    sr = saved(report.structured_report(headers, 0.5, MODEL))
    group = named(sr, codes.DCM.MeasurementGroup)[0]
    group.ContentSequence = [item for item in group.ContentSequence
                             if item.ConceptNameCodeSequence[0].CodeValue != report.MODEL_SHA256.value]
    return sr


@pytest.mark.parametrize("case, message", [
    ("a CT slice", "not a Comprehensive SR"),
    ("another program's SR", "measurement groups"),
    ("a lungsql SR without its SHA-256", "Model SHA-256"),
    ("a Key Object Selection", "not a Comprehensive SR"),
    ("not a dataset", "not a pydicom Dataset"),
])
def test_read_report_refuses_what_lungsql_did_not_write(headers, case, message):
    ds = {
        "a CT slice": lambda: headers[0],
        "another program's SR": lambda: saved(_foreign_report(headers)),
        "a lungsql SR without its SHA-256": lambda: _without_sha256(headers),
        "a Key Object Selection": lambda: report.key_object_selection(headers[0], MODEL, 0.5),
        "not a dataset": lambda: b"DICM",
    }[case]()
    with pytest.raises(LungSQLError, match=message) as raised:
        report.read_report(ds)
    assert raised.value.message.startswith("not a lungsql report") and raised.value.hint


# ----------------------------------------------------------------------------- the Key Object Selection


def test_key_object_selection_round_trips_the_slice(headers):
    key = headers[1]
    ko = saved(report.key_object_selection(key, MODEL, 0.734))
    assert ko.SOPClassUID == KeyObjectSelectionDocumentStorage and ko.Modality == "KO"
    assert ko.StudyInstanceUID == key.StudyInstanceUID and ko.PatientID == key.PatientID
    assert ko.SeriesNumber == 9902 and ko.SeriesInstanceUID != key.SeriesInstanceUID
    document = hd.ko.KeyObjectSelectionDocument.from_dataset(ko)
    (reference,) = document.content.get_references()
    assert reference.referenced_sop_instance_uid == key.SOPInstanceUID
    assert reference.referenced_sop_class_uid == key.SOPClassUID
    assert ko.ConceptNameCodeSequence[0].CodeValue == codes.DCM.OfInterest.value
    (description,) = [item.TextValue for item in named(ko, codes.DCM.KeyObjectDescription)]
    assert "73.4 %" in description and "For research use only. Not for diagnostic use." in description
    (study,) = ko.CurrentRequestedProcedureEvidenceSequence
    assert study.ReferencedSeriesSequence[0].SeriesInstanceUID == key.SeriesInstanceUID


def test_key_object_selection_refuses_a_bad_probability(headers):
    with pytest.raises(LungSQLError, match="probability"):
        report.key_object_selection(headers[0], MODEL, 2.0)
