"""Tests for lungsql.deidentify (PS3.15 Annex E basic profile). Fast, no database."""

from __future__ import annotations

import re
from io import BytesIO

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.datadict import keyword_for_tag
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.sequence import Sequence
from pydicom.uid import UID, CTImageStorage, ExplicitVRLittleEndian

from lungsql.deidentify import (
    ACTIONS,
    BASIC_PROFILE,
    DEIDENTIFICATION_METHOD,
    Deidentifier,
    deidentify_bytes,
)

KEY = b"test-site-secret-0123456789abcdef"
OTHER_KEY = b"another-site-secret-fedcba987654"

# Identifying values of the synthetic patient.
NAME = "Fernandez^Ana"
PATIENT_ID = "HOSP-0012345"
BIRTH_DATE = "19630412"
STUDY_DATE = "20240115"
INSTITUTION = "Hospital Universitario Central"
STUDY_UID = "1.2.826.0.1.3680043.2.1125.77.1"
SERIES_UID = "1.2.826.0.1.3680043.2.1125.77.1.2"
FOR_UID = "1.2.826.0.1.3680043.2.1125.77.1.3"


def _ct_small_bytes() -> bytes:
    with open(get_testdata_file("CT_small.dcm"), "rb") as f:
        return f.read()


def _to_bytes(ds: Dataset) -> bytes:
    buffer = BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _synthetic_ct(instance: int = 1, referenced_sop_uid: str | None = None, **overrides) -> Dataset:
    """A small CT slice full of identifying data, private tags and nested sequences."""
    sop_uid = f"1.2.826.0.1.3680043.2.1125.77.1.2.{instance}"
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = sop_uid
    ds.InstanceCreationDate = STUDY_DATE
    ds.StudyDate = STUDY_DATE
    ds.SeriesDate = STUDY_DATE
    ds.AcquisitionDate = STUDY_DATE
    ds.ContentDate = STUDY_DATE
    ds.StudyTime = "101530"
    ds.AccessionNumber = "ACC20240115"
    ds.Modality = "CT"
    ds.Manufacturer = "ACME"
    ds.InstitutionName = INSTITUTION
    ds.InstitutionAddress = "Calle Mayor 1, Madrid"
    ds.ReferringPhysicianName = "Garcia^Luis"
    ds.StationName = "CTSCAN01"
    ds.StudyDescription = "TORAX ANA FERNANDEZ"
    ds.SeriesDescription = "Pulmon 1mm"
    ds.PerformingPhysicianName = "Lopez^Maria"
    ds.OperatorsName = "Ruiz^Pedro"
    ds.PatientName = NAME
    ds.PatientID = PATIENT_ID
    ds.IssuerOfPatientID = "HOSP"
    ds.PatientBirthDate = BIRTH_DATE
    ds.PatientSex = "F"
    ds.PatientSize = "1.62"
    ds.PatientWeight = "58"
    ds.PatientAddress = "Calle Falsa 123"
    ds.PatientTelephoneNumbers = "+34 600 000 000"
    ds.OtherPatientIDsSequence = Sequence([Dataset()])
    ds.OtherPatientIDsSequence[0].PatientID = "NHC-998877"
    ds.AdditionalPatientHistory = "Smoker, 30 pack-years"
    ds.DeviceSerialNumber = "SN-4455"
    ds.ProtocolName = "CHEST LOW DOSE"
    ds.SliceThickness = "1.0"
    ds.StudyInstanceUID = STUDY_UID
    ds.SeriesInstanceUID = SERIES_UID
    ds.StudyID = "S-778"
    ds.SeriesNumber = "3"
    ds.InstanceNumber = str(instance)
    ds.ImagePositionPatient = ["-150.0", "-150.0", str(-10.0 * instance)]
    ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
    ds.FrameOfReferenceUID = FOR_UID
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = 16
    ds.Columns = 16
    ds.PixelSpacing = ["0.7", "0.7"]
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1
    ds.RescaleIntercept = "-1024"
    ds.RescaleSlope = "1"
    ds.PixelData = (np.arange(256, dtype="<i2") * 7 - 900).tobytes()

    # Removed sequence (X) holding request data and a name.
    request = Dataset()
    request.RequestedProcedureID = "RP-1"
    request.ScheduledProcedureStepID = "SPS-1"
    request.ScheduledPerformingPhysicianName = NAME
    ds.RequestAttributesSequence = Sequence([request])

    # Kept sequence (not in the table): cleaned recursively.
    ref = Dataset()
    ref.ReferencedSOPClassUID = CTImageStorage
    ref.ReferencedSOPInstanceUID = referenced_sop_uid or sop_uid
    ref.OperatorsName = NAME  # X in the table, at any depth
    ref.ObservationDateTime = STUDY_DATE + "101530"  # DT, removed by the date rule
    inner = Dataset()
    inner.PatientName = NAME  # Z at any depth
    inner.PatientID = PATIENT_ID  # pseudonymised at any depth
    inner.CodeValue = "121311"
    inner.CodingSchemeDesignator = "DCM"
    inner.CodeMeaning = "Localizer"
    ref.PurposeOfReferenceCodeSequence = Sequence([inner])
    ref.private_block(0x0029, "ACME NESTED", create=True).add_new(0x01, "LO", NAME)
    ds.ReferencedInstanceSequence = Sequence([ref])

    # Private tags at the top level.
    block = ds.private_block(0x0011, "ACME HOSP", create=True)
    block.add_new(0x01, "LO", NAME)
    block.add_new(0x02, "LO", PATIENT_ID)

    for keyword, value in overrides.items():
        if value is None:
            if keyword in ds:
                delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)

    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.SourceApplicationEntityTitle = "HOSPPACS"
    return ds


def _all_tags(ds: Dataset) -> list:
    tags = []
    ds.walk(lambda _ds, elem: tags.append(elem.tag))
    return tags


# --------------------------------------------------------------------------- table


def test_profile_table_tags_match_keywords_and_actions_are_known():
    tags = [tag for tag, _, _ in BASIC_PROFILE]
    assert len(tags) == len(set(tags))
    assert len(BASIC_PROFILE) >= 60
    for tag, keyword, action in BASIC_PROFILE:
        assert keyword_for_tag(tag) == keyword, hex(tag)
        assert action in ACTIONS


def test_profile_table_uses_standard_actions_for_key_attributes():
    table = {keyword: action for _, keyword, action in BASIC_PROFILE}
    assert table["PatientName"] == "Z"
    assert table["PatientBirthDate"] == "Z"
    assert table["AccessionNumber"] == "Z"
    assert table["StudyDate"] == "Z"
    assert table["ReferringPhysicianName"] == "Z"
    assert table["InstitutionName"] == "X"
    assert table["OtherPatientIDsSequence"] == "X"
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID",
                    "FrameOfReferenceUID", "ReferencedSOPInstanceUID"):
        assert table[keyword] == "U"
    for keyword in ("PatientAge", "PatientSex", "PatientSize", "PatientWeight"):
        assert table[keyword] == "K"  # Retain Patient Characteristics Option


# ---------------------------------------------------------------------- identities


def test_pseudonym_is_stable_formatted_and_key_dependent():
    deid = Deidentifier(KEY)
    p = deid.pseudonym(PATIENT_ID)
    assert re.fullmatch(r"anon-[0-9a-f]{20}", p)
    assert p == Deidentifier(KEY).pseudonym(PATIENT_ID)
    assert p == deid.pseudonym(PATIENT_ID + " ")  # DICOM padding is ignored
    assert p != deid.pseudonym("HOSP-0012346")
    assert p != Deidentifier(OTHER_KEY).pseudonym(PATIENT_ID)


def test_map_uid_is_deterministic_valid_and_key_dependent():
    deid = Deidentifier(KEY)
    new = deid.map_uid(STUDY_UID)
    assert new.startswith("2.25.")
    assert len(new) <= 64
    assert UID(new).is_valid
    assert new == Deidentifier(KEY).map_uid(STUDY_UID)
    assert new != deid.map_uid(SERIES_UID)
    assert new != Deidentifier(OTHER_KEY).map_uid(STUDY_UID)
    assert deid.map_uid("") == ""


@pytest.mark.parametrize("bad_key", [b"", bytearray()])
def test_empty_key_is_rejected(bad_key):
    with pytest.raises(ValueError):
        Deidentifier(bad_key)


def test_text_key_is_rejected():
    with pytest.raises(TypeError):
        Deidentifier("not-bytes")  # type: ignore[arg-type]


def test_repr_does_not_show_key():
    assert "secret" not in repr(Deidentifier(KEY))


# ---------------------------------------------------------------- CT_small.dcm


def test_ct_small_identifiers_are_gone_from_output_bytes():
    original = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    out, ds = deidentify_bytes(_ct_small_bytes(), KEY)

    for needle in (
        str(original.PatientName),  # CompressedSamples^CT1
        "CompressedSamples",
        original.PatientID,  # 1CT1
        "ABCD1234",  # Other Patient IDs Sequence
        original.InstitutionName,
        original.StationName,
        original.StudyDate,
        original.SeriesDate,
        original.StudyInstanceUID,
        original.SOPInstanceUID,
        original.file_meta.SourceApplicationEntityTitle,
        "GEMS_",  # private creators
    ):
        assert needle.encode() not in out, needle

    assert ds.PatientName == ""
    assert ds.PatientID == Deidentifier(KEY).pseudonym(original.PatientID)
    assert ds.PatientBirthDate == ""
    assert ds.StudyDate == ""
    assert "InstitutionName" not in ds
    assert "OtherPatientIDsSequence" not in ds
    assert "DataSetTrailingPadding" not in ds


def test_ct_small_keeps_imaging_data_and_patient_characteristics():
    original = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    out, _ = deidentify_bytes(_ct_small_bytes(), KEY)
    result = pydicom.dcmread(BytesIO(out))

    assert result.PixelData == original.PixelData
    np.testing.assert_array_equal(result.pixel_array, original.pixel_array)
    for keyword in ("Rows", "Columns", "PixelSpacing", "SliceThickness", "ImagePositionPatient",
                    "ImageOrientationPatient", "RescaleSlope", "RescaleIntercept",
                    "InstanceNumber", "Modality", "SOPClassUID", "BitsStored",
                    "PixelRepresentation", "PatientSex", "PatientAge", "PatientWeight"):
        assert result[keyword].value == original[keyword].value, keyword
    assert result.file_meta.TransferSyntaxUID == original.file_meta.TransferSyntaxUID
    assert result.preamble == b"\x00" * 128


def test_ct_small_private_tags_are_removed():
    out, ds = deidentify_bytes(_ct_small_bytes(), KEY)
    assert not [t for t in _all_tags(ds) if t.is_private]
    assert not [t for t in _all_tags(pydicom.dcmread(BytesIO(out))) if t.is_private]


def test_ct_small_uids_are_replaced_consistently():
    original = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    out1, ds1 = deidentify_bytes(_ct_small_bytes(), KEY)
    out2, ds2 = deidentify_bytes(_ct_small_bytes(), KEY)
    _, ds3 = deidentify_bytes(_ct_small_bytes(), OTHER_KEY)

    deid = Deidentifier(KEY)
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID",
                    "FrameOfReferenceUID", "InstanceCreatorUID"):
        new = ds1[keyword].value
        assert new != original[keyword].value
        assert new == deid.map_uid(original[keyword].value)
        assert new.startswith("2.25.") and len(new) <= 64 and UID(new).is_valid
        assert ds2[keyword].value == new
        assert ds3[keyword].value != new
    assert ds1.SOPClassUID == original.SOPClassUID
    assert ds1.file_meta.MediaStorageSOPInstanceUID == ds1.SOPInstanceUID
    assert ds1.file_meta.MediaStorageSOPClassUID == original.SOPClassUID
    assert "SourceApplicationEntityTitle" not in ds1.file_meta
    assert out1 == out2  # fully deterministic


def test_marks_dataset_as_deidentified():
    _, ds = deidentify_bytes(_ct_small_bytes(), KEY)
    assert ds.PatientIdentityRemoved == "YES"
    assert ds.DeidentificationMethod == DEIDENTIFICATION_METHOD
    assert len(DEIDENTIFICATION_METHOD) <= 64  # LO
    codes = [(i.CodeValue, i.CodingSchemeDesignator) for i in ds.DeidentificationMethodCodeSequence]
    assert codes == [("113100", "DCM"), ("113108", "DCM")]
    assert all(i.CodeMeaning for i in ds.DeidentificationMethodCodeSequence)
    assert ds.LongitudinalTemporalInformationModified == "REMOVED"


# ------------------------------------------------------------- synthetic patient


def test_synthetic_identifiers_are_gone_from_output_bytes():
    out, ds = deidentify_bytes(_to_bytes(_synthetic_ct()), KEY)
    for needle in (NAME, "Fernandez", "FERNANDEZ", "Ana", PATIENT_ID, "NHC-998877",
                   BIRTH_DATE, STUDY_DATE, INSTITUTION, "Calle", "Garcia", "Lopez", "Ruiz",
                   "CTSCAN01", "SN-4455", "ACC20240115", "S-778", "HOSPPACS", "ACME HOSP",
                   "ACME NESTED", "RP-1", "SPS-1", "Smoker", STUDY_UID, SERIES_UID, FOR_UID):
        assert needle.encode("latin-1") not in out, needle


def test_synthetic_patient_age_sex_size_weight_are_kept():
    _, ds = deidentify_bytes(_to_bytes(_synthetic_ct()), KEY)
    assert ds.PatientAge == "060Y"  # 1963-04-12 -> 2024-01-15
    assert ds.PatientSex == "F"
    assert ds.PatientSize == 1.62
    assert ds.PatientWeight == 58
    assert ds.PatientBirthDate == ""


def test_synthetic_private_tags_are_removed_at_every_level():
    out, ds = deidentify_bytes(_to_bytes(_synthetic_ct()), KEY)
    assert not [t for t in _all_tags(ds) if t.is_private]
    assert not [t for t in _all_tags(pydicom.dcmread(BytesIO(out))) if t.is_private]


def test_synthetic_sequences_are_cleaned_recursively():
    _, ds = deidentify_bytes(_to_bytes(_synthetic_ct()), KEY)
    assert "RequestAttributesSequence" not in ds  # X
    assert "OtherPatientIDsSequence" not in ds  # X
    ref = ds.ReferencedInstanceSequence[0]  # kept, cleaned
    assert "OperatorsName" not in ref
    assert "ObservationDateTime" not in ref
    assert ref.ReferencedSOPClassUID == CTImageStorage
    inner = ref.PurposeOfReferenceCodeSequence[0]
    assert inner.PatientName == ""
    assert inner.PatientID == ds.PatientID
    assert inner.CodeValue == "121311"


def test_references_between_slices_stay_consistent():
    first = _synthetic_ct(instance=1)
    second = _synthetic_ct(instance=2, referenced_sop_uid=first.SOPInstanceUID)
    _, ds1 = deidentify_bytes(_to_bytes(first), KEY)
    _, ds2 = deidentify_bytes(_to_bytes(second), KEY)

    assert ds2.ReferencedInstanceSequence[0].ReferencedSOPInstanceUID == ds1.SOPInstanceUID
    assert ds1.SOPInstanceUID != ds2.SOPInstanceUID
    assert ds1.StudyInstanceUID == ds2.StudyInstanceUID
    assert ds1.SeriesInstanceUID == ds2.SeriesInstanceUID
    assert ds1.FrameOfReferenceUID == ds2.FrameOfReferenceUID
    assert ds1.PatientID == ds2.PatientID == Deidentifier(KEY).pseudonym(PATIENT_ID)


def test_synthetic_pixels_and_geometry_survive():
    original = _synthetic_ct()
    out, _ = deidentify_bytes(_to_bytes(original), KEY)
    result = pydicom.dcmread(BytesIO(out))
    assert result.PixelData == original.PixelData
    np.testing.assert_array_equal(result.pixel_array, original.pixel_array)
    assert result.ImagePositionPatient == original.ImagePositionPatient
    assert result.PixelSpacing == original.PixelSpacing
    assert result.SliceThickness == original.SliceThickness
    assert result.RescaleIntercept == original.RescaleIntercept


def test_apply_modifies_in_place_and_returns_same_object():
    ds = _synthetic_ct()
    assert Deidentifier(KEY).apply(ds) is ds
    assert ds.PatientName == ""


def test_apply_without_file_meta():
    ds = _synthetic_ct()
    del ds.file_meta
    Deidentifier(KEY).apply(ds)
    assert ds.PatientIdentityRemoved == "YES"
    assert not hasattr(ds, "file_meta") or "MediaStorageSOPInstanceUID" not in ds.file_meta


def test_other_dates_and_names_not_in_table_are_removed():
    ds = _synthetic_ct()
    ds.DateOfLastCalibration = "20231201"  # DA, not in Table E.1-1
    ds.EvaluatorName = "Perez^Juan"  # PN, not in Table E.1-1
    ds.ConvolutionKernel = "LUNG"  # unrelated, kept
    Deidentifier(KEY).apply(ds)
    assert "DateOfLastCalibration" not in ds
    assert "EvaluatorName" not in ds
    assert ds.ConvolutionKernel == "LUNG"


def test_dummy_action_replaces_value():
    ds = _synthetic_ct()
    ds.ClinicalTrialSubjectID = "SUBJ-ANA-01"  # D
    Deidentifier(KEY).apply(ds)
    assert ds.ClinicalTrialSubjectID
    assert "ANA" not in ds.ClinicalTrialSubjectID


def test_burned_in_annotation_is_logged(caplog):
    ds = _synthetic_ct(BurnedInAnnotation="YES")
    with caplog.at_level("WARNING", logger="lungsql.deidentify"):
        Deidentifier(KEY).apply(ds)
    assert "BurnedInAnnotation" in caplog.text
    assert PATIENT_ID not in caplog.text and NAME not in caplog.text
    assert "1.2.826.0.1.3680043.2.1125.77" not in caplog.text  # original UIDs


# ------------------------------------------------------------------ patient age


@pytest.mark.filterwarnings("ignore:Invalid value for VR DA")
@pytest.mark.parametrize(
    ("birth", "dates", "expected"),
    [
        ("19630412", {"StudyDate": "20240115"}, "060Y"),
        ("19630412", {"StudyDate": "20240412"}, "061Y"),  # birthday
        ("19630412", {"StudyDate": None, "SeriesDate": "20240413"}, "061Y"),
        ("19630412", {"StudyDate": None, "SeriesDate": None, "AcquisitionDate": None,
                      "ContentDate": "20230101"}, "059Y"),
        ("20231120", {"StudyDate": "20240115"}, "001M"),
        ("20240101", {"StudyDate": "20240115"}, "002W"),
        ("20240112", {"StudyDate": "20240115"}, "003D"),
        ("1963.04.12", {"StudyDate": "2024.01.15"}, "060Y"),  # ACR-NEMA style
    ],
)
def test_age_is_computed_from_birth_date_when_absent(birth, dates, expected):
    ds = _synthetic_ct(PatientBirthDate=birth, **dates)
    assert "PatientAge" not in ds
    Deidentifier(KEY).apply(ds)
    assert ds.PatientAge == expected
    assert ds.PatientBirthDate == ""


def test_existing_age_is_kept():
    ds = _synthetic_ct(PatientAge="070Y")
    Deidentifier(KEY).apply(ds)
    assert ds.PatientAge == "070Y"


def test_empty_age_is_filled():
    ds = _synthetic_ct(PatientAge="")
    Deidentifier(KEY).apply(ds)
    assert ds.PatientAge == "060Y"


@pytest.mark.filterwarnings("ignore:Invalid value for VR DA")
@pytest.mark.parametrize("birth", ["", "1963", "19631340", "garbage!"])
def test_no_age_from_unusable_birth_date(birth):
    ds = _synthetic_ct(PatientBirthDate=birth)
    Deidentifier(KEY).apply(ds)
    assert "PatientAge" not in ds


def test_no_age_without_reference_date():
    ds = _synthetic_ct(StudyDate=None, SeriesDate=None, AcquisitionDate=None, ContentDate=None)
    Deidentifier(KEY).apply(ds)
    assert "PatientAge" not in ds


# ------------------------------------------------------- other transfer syntaxes


@pytest.mark.parametrize(
    "name",
    [
        "MR_small_implicit.dcm",  # Implicit VR Little Endian
        "MR_small_bigendian.dcm",  # Explicit VR Big Endian (retired)
        "MR_small_RLE.dcm",  # RLE Lossless (encapsulated)
        "JPEG2000.dcm",  # JPEG 2000 (encapsulated)
    ],
)
def test_transfer_syntax_and_pixel_data_are_preserved(name):
    path = get_testdata_file(name)
    original = pydicom.dcmread(path)
    with open(path, "rb") as f:
        out, _ = deidentify_bytes(f.read(), KEY)
    result = pydicom.dcmread(BytesIO(out))
    assert result.file_meta.TransferSyntaxUID == original.file_meta.TransferSyntaxUID
    assert result.PixelData == original.PixelData
    assert result.PatientIdentityRemoved == "YES"
    assert result.file_meta.MediaStorageSOPInstanceUID == result.SOPInstanceUID
    if str(original.PatientName):
        assert str(original.PatientName).encode() not in out


def test_rle_pixel_array_is_unchanged():
    path = get_testdata_file("MR_small_RLE.dcm")
    original = pydicom.dcmread(path)
    with open(path, "rb") as f:
        out, _ = deidentify_bytes(f.read(), KEY)
    np.testing.assert_array_equal(pydicom.dcmread(BytesIO(out)).pixel_array, original.pixel_array)


def test_non_dicom_bytes_are_rejected():
    with pytest.raises(InvalidDicomError):
        deidentify_bytes(b"not a dicom file" * 20, KEY)
