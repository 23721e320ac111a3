"""Tests for lungsql.dicom.deidentify (PS3.15 Annex E basic profile). Fast, no database."""

from __future__ import annotations

import re
import struct
from io import BytesIO

import numpy as np
import pydicom
import pytest
from pydicom.charset import convert_encodings
from pydicom.data import get_testdata_file
from pydicom.datadict import dictionary_has_tag, get_private_entry, keyword_for_tag
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.filewriter import correct_ambiguous_vr
from pydicom.sequence import Sequence
from pydicom.tag import Tag
from pydicom.uid import (
    UID,
    CTImageStorage,
    EnhancedCTImageStorage,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

from lungsql.dicom.deidentify import (
    ACTIONS,
    BASIC_PROFILE,
    DEIDENTIFICATION_METHOD,
    SAFE_PRIVATE_ATTRIBUTES,
    BurnedInAnnotation,
    Deidentifier,
    deidentify_bytes,
)
from lungsql.dicom import read_scan
from lungsql.errors import InvalidScan
from lungsql.client.ingest import deidentifying_transform

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


def _read(data: bytes) -> Dataset:
    return pydicom.dcmread(BytesIO(data))


# ---------------------------------------------------- hidden identifying data
# A distinctive name and site UIDs hidden where a table-driven cleaner does not look.
HIDDEN = "Hidden^Secretname"
HIDDEN_NEEDLES = (b"Hidden", b"Secretname", b"HIDDEN", b"SECRETNAME")
HIDDEN_UID = "1.2.826.0.1.3680043.2.1125.88.5"  # site UID in an element outside the table
HIDDEN_UN_SQ_UID = "1.2.826.0.1.3680043.2.1125.88.6"  # inside a sequence encoded as UN
PRIVATE_SOP_CLASS = "1.2.826.0.1.3680043.2.1125.88.9"  # a vendor's, not registered
SITE_UID_ROOT = b"1.2.826.0.1.3680043.2.1125"  # every site UID of these tests
UNKNOWN_TAG = 0x00181FF0  # public (even group) but in no dictionary
UNKNOWN_UN_TAG = 0x00181FF2
UNKNOWN_SQ_TAG = 0x00081FF8
SNOMED_UID = "2.16.840.1.113883.6.96"
DCM_CODING_SCHEME_UID = "1.2.840.10008.2.16.4"


def _un_element(tag: int, text: str) -> DataElement:
    """A text element encoded as UN, as a writer that does not know its tag writes it."""
    elem = DataElement(tag, "LO", text)  # pydicom would decode a UN of a known tag at once
    elem.VR = "UN"
    raw = text.encode("ascii")
    elem.value = raw + b" " * (len(raw) % 2)
    return elem


def _keep_raw_when_written(ds: Dataset, implicit: bool) -> None:
    """Make pydicom write ``ds``'s raw elements byte for byte, as a foreign writer made them.

    pydicom re-encodes raw elements (decoding a UN of a known tag on the way)
    when the dataset's original encoding differs from the one it writes; then
    it also settles ambiguous VRs (Pixel Data 'OB or OW'), which is done here.
    """
    correct_ambiguous_vr(ds, is_little_endian=True)
    ds.set_original_encoding(implicit, True, convert_encodings(ds.SpecificCharacterSet))


def _implicit_element(tag: int, value: bytes) -> bytes:
    """One element in Implicit VR Little Endian, the encoding of a UN sequence's content."""
    value += b" " * (len(value) % 2)
    return struct.pack("<HHI", tag >> 16, tag & 0xFFFF, len(value)) + value


def _un_sequence(tag: int, implicit: bool, *elements: bytes) -> RawDataElement:
    """A sequence of undefined length encoded as UN (PS3.5 6.2.2), one item holding ``elements``.

    In an implicit-VR file the same bytes carry no VR at all, as a writer that
    does not know the tag would write them.
    """
    body = b"".join(elements)
    item = struct.pack("<HHI", 0xFFFE, 0xE000, len(body)) + body
    return RawDataElement(Tag(tag), None if implicit else "UN", 0xFFFFFFFF, item, 0, implicit, True)


def _hiding_ct(transfer_syntax: str = ExplicitVRLittleEndian) -> Dataset:
    """The synthetic slice with HIDDEN and HIDDEN_UID where only a thorough cleaner looks."""
    implicit = transfer_syntax == ImplicitVRLittleEndian
    ds = _synthetic_ct()
    ds.file_meta.TransferSyntaxUID = transfer_syntax
    # (a) unknown public tags, one as LO (read back as UN in implicit VR), one as UN
    ds.add_new(UNKNOWN_TAG, "LO", HIDDEN)
    ds.add_new(UNKNOWN_UN_TAG, "UN", HIDDEN.encode() + b" ")
    if not implicit:  # an implicit-VR file has no VR to write UN into: the tag decides
        ds[0x00081090] = _un_element(0x00081090, HIDDEN)  # ManufacturerModelName
    # undefined-length sequences encoded as UN, under an unknown, a private and a known tag
    hidden_pn = _implicit_element(0x00100010, HIDDEN.encode())  # PatientName
    hidden_unknown = _implicit_element(UNKNOWN_TAG, HIDDEN.encode())
    ds[UNKNOWN_SQ_TAG] = _un_sequence(UNKNOWN_SQ_TAG, implicit, hidden_pn, hidden_unknown)
    ds.private_block(0x0013, "ACME UN SEQ", create=True)
    ds[0x00131010] = _un_sequence(0x00131010, implicit, hidden_pn)
    ds[0x00081115] = _un_sequence(  # ReferencedSeriesSequence, a known tag
        0x00081115, implicit, _implicit_element(0x00081155, HIDDEN_UN_SQ_UID.encode()), hidden_pn,
        hidden_unknown)
    # (b) a sequence in a sequence: names, a private element and an unknown tag in the inner item
    inner = ds.ReferencedInstanceSequence[0].PurposeOfReferenceCodeSequence[0]
    inner.EvaluatorName = HIDDEN  # PN outside the table
    inner.InstitutionName = HIDDEN  # LO, X in the table
    inner.private_block(0x0029, "ACME DEEP", create=True).add_new(0x01, "LO", HIDDEN)
    inner.add_new(UNKNOWN_TAG, "LO", HIDDEN)
    # (d) an unregistered UID in an element outside the table, nested; registered ones beside it
    inner.CreatorVersionUID = HIDDEN_UID
    inner.ReferencedSOPClassUID = CTImageStorage
    ds.RelatedGeneralSOPClassUID = [EnhancedCTImageStorage, PRIVATE_SOP_CLASS]
    schemes = []
    for designator, uid in (("SCT", SNOMED_UID), ("DCM", DCM_CODING_SCHEME_UID)):
        scheme = Dataset()
        scheme.CodingSchemeDesignator = designator
        scheme.CodingSchemeUID = uid
        schemes.append(scheme)
    ds.CodingSchemeIdentificationSequence = Sequence(schemes)
    _keep_raw_when_written(ds, implicit)
    # (c) private elements with their creator, one of them a sequence
    block = ds.private_block(0x0011, "ACME HOSP")
    block.add_new(0x03, "PN", HIDDEN)
    nested = Dataset()
    nested.PatientName = HIDDEN
    block.add_new(0x04, "SQ", Sequence([nested]))
    return ds


def _assert_nothing_hidden_survives(out: bytes) -> None:
    for needle in HIDDEN_NEEDLES:
        assert needle not in out, needle
    assert SITE_UID_ROOT not in out  # no original UID, mapped or not in the table
    assert HIDDEN_UID.encode() not in out and HIDDEN_UN_SQ_UID.encode() not in out


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


def test_burned_in_annotation_is_refused_by_default():
    ds = _synthetic_ct(BurnedInAnnotation="YES ")
    with pytest.raises(BurnedInAnnotation) as caught:
        Deidentifier(KEY).apply(ds)
    assert isinstance(caught.value, InvalidScan)  # so an upload records the file and goes on
    assert caught.value.message == (
        "BurnedInAnnotation is YES: the pixels may show identifying text; the slice was not stored")
    assert "allow_burned_in=True" in caught.value.hint
    assert "--allow-burned-in" in caught.value.hint
    assert ds.PatientName == NAME  # refused before anything was changed


def test_burned_in_annotation_is_kept_and_logged_when_allowed(caplog):
    ds = _synthetic_ct(BurnedInAnnotation="YES")
    with caplog.at_level("WARNING", logger="lungsql.dicom.deidentify"):
        Deidentifier(KEY, allow_burned_in=True).apply(ds)
    assert ds.BurnedInAnnotation == "YES"
    assert ds.PatientIdentityRemoved == "YES"
    assert "BurnedInAnnotation" in caplog.text
    assert PATIENT_ID not in caplog.text and NAME not in caplog.text
    assert "1.2.826.0.1.3680043.2.1125.77" not in caplog.text  # original UIDs


def test_burned_in_annotation_no_is_stored():
    _, ds = deidentify_bytes(_to_bytes(_synthetic_ct(BurnedInAnnotation="NO")), KEY)
    assert ds.BurnedInAnnotation == "NO"


def test_burned_in_annotation_encoded_as_un_is_still_refused():
    ds = _synthetic_ct()
    ds[0x00280301] = _un_element(0x00280301, "YES")
    data = _to_bytes(ds)
    assert _read(data).get_item(0x00280301).VR == "UN"  # as the file encodes it
    with pytest.raises(BurnedInAnnotation):
        deidentify_bytes(data, KEY)


def test_burned_in_slice_is_recorded_not_stored_by_the_upload_path():
    data = _to_bytes(_synthetic_ct(BurnedInAnnotation="YES"))
    with pytest.raises(InvalidScan, match="BurnedInAnnotation is YES"):
        read_scan(data, deidentifying_transform(Deidentifier(KEY)))
    record = read_scan(data, deidentifying_transform(Deidentifier(KEY, allow_burned_in=True)))
    assert NAME.encode("latin-1") not in record.data


# --------------------------------------------------- hidden identifying data

ENCODINGS = pytest.mark.parametrize(
    "transfer_syntax", [ExplicitVRLittleEndian, ImplicitVRLittleEndian], ids=["explicit", "implicit"])


def _walk(ds: Dataset) -> list:
    """Every element of ``ds`` at every nesting level."""
    elems = []
    ds.walk(lambda _ds, elem: elems.append(elem))
    return elems


def test_hiding_file_encodes_what_it_claims():
    """The explicit-VR test file really holds UN elements and undefined-length UN sequences."""
    data = _to_bytes(_hiding_ct(ExplicitVRLittleEndian))

    def header(tag: int) -> bytes:  # VR, reserved bytes and length after the element's tag
        at = data.find(struct.pack("<HH", tag >> 16, tag & 0xFFFF))
        return data[at + 4:at + 12]

    for tag in (UNKNOWN_SQ_TAG, 0x00131010, 0x00081115):
        assert header(tag) == b"UN\x00\x00\xff\xff\xff\xff", hex(tag)
    for tag in (UNKNOWN_UN_TAG, 0x00081090):
        assert header(tag)[:4] == b"UN\x00\x00", hex(tag)


@ENCODINGS
def test_hidden_identifiers_are_gone_from_output_bytes(transfer_syntax):
    original = _hiding_ct(transfer_syntax)
    data = _to_bytes(original)
    for needle in (b"Hidden^Secretname", HIDDEN_UID.encode(), HIDDEN_UN_SQ_UID.encode()):
        assert needle in data  # the test file does hide them
    out, _ = deidentify_bytes(data, KEY)
    _assert_nothing_hidden_survives(out)
    result = _read(out)  # still a readable DICOM file, in the same encoding, with its pixels
    assert result.file_meta.TransferSyntaxUID == transfer_syntax
    assert result.PixelData == original.PixelData
    np.testing.assert_array_equal(result.pixel_array, original.pixel_array)


@ENCODINGS
def test_hidden_identifiers_are_gone_on_the_upload_path(transfer_syntax):
    data = _to_bytes(_hiding_ct(transfer_syntax))
    record = read_scan(data, deidentifying_transform(Deidentifier(KEY)))  # what ingest stores
    _assert_nothing_hidden_survives(record.data)
    assert record.patient.patient_id == Deidentifier(KEY).pseudonym(PATIENT_ID)
    assert record.modality == "CT" and (record.rows, record.columns) == (16, 16)


@ENCODINGS
def test_unknown_un_and_private_elements_are_removed_at_every_level(transfer_syntax):
    out, ds = deidentify_bytes(_to_bytes(_hiding_ct(transfer_syntax)), KEY)
    for result in (ds, _read(out)):
        elems = _walk(result)
        assert not [e.tag for e in elems if e.tag.is_private]
        assert not [e.tag for e in elems if e.VR == "UN"]
        assert not [e.tag for e in elems if not dictionary_has_tag(e.tag)]
        for tag in (UNKNOWN_TAG, UNKNOWN_UN_TAG, UNKNOWN_SQ_TAG, 0x00081090):
            assert tag not in result
        inner = result.ReferencedInstanceSequence[0].PurposeOfReferenceCodeSequence[0]
        assert "EvaluatorName" not in inner and "InstitutionName" not in inner
        assert UNKNOWN_TAG not in inner
        assert inner.CodeValue == "121311"  # the coded content is kept


@ENCODINGS
def test_known_sequence_encoded_as_un_is_cleaned_item_by_item(transfer_syntax):
    _, ds = deidentify_bytes(_to_bytes(_hiding_ct(transfer_syntax)), KEY)
    item = ds.ReferencedSeriesSequence[0]
    assert item.ReferencedSOPInstanceUID == Deidentifier(KEY).map_uid(HIDDEN_UN_SQ_UID)
    assert item.PatientName == ""  # Z at any depth
    assert UNKNOWN_TAG not in item


def test_table_attributes_encoded_as_un_still_follow_the_table():
    ds = _synthetic_ct()
    for tag in (0x00100010, 0x00100020, 0x0020000D):  # PatientName, PatientID, StudyInstanceUID
        ds[tag] = _un_element(tag, str(ds[tag].value))
    data = _to_bytes(ds)
    assert _read(data).get_item(0x00100020).VR == "UN"
    out, result = deidentify_bytes(data, KEY)
    assert result.PatientName == ""
    assert result.PatientID == Deidentifier(KEY).pseudonym(PATIENT_ID)
    assert result.StudyInstanceUID == Deidentifier(KEY).map_uid(STUDY_UID)
    assert NAME.encode() not in out and PATIENT_ID.encode() not in out
    assert STUDY_UID.encode() not in out


@ENCODINGS
def test_every_unregistered_uid_is_mapped_and_registered_ones_are_kept(transfer_syntax):
    original = _hiding_ct(transfer_syntax)
    out, _ = deidentify_bytes(_to_bytes(original), KEY)
    result = _read(out)
    deid = Deidentifier(KEY)
    inner = result.ReferencedInstanceSequence[0].PurposeOfReferenceCodeSequence[0]
    assert inner.CreatorVersionUID == deid.map_uid(HIDDEN_UID)
    assert inner.ReferencedSOPClassUID == CTImageStorage
    assert result.RelatedGeneralSOPClassUID == [EnhancedCTImageStorage, deid.map_uid(PRIVATE_SOP_CLASS)]
    schemes = [s.CodingSchemeUID for s in result.CodingSchemeIdentificationSequence]
    assert schemes == [SNOMED_UID, DCM_CODING_SCHEME_UID]
    assert result.SOPClassUID == CTImageStorage
    assert result.file_meta.MediaStorageSOPClassUID == CTImageStorage
    assert result.file_meta.TransferSyntaxUID == transfer_syntax
    assert result.SOPInstanceUID == deid.map_uid(original.SOPInstanceUID)
    assert result.file_meta.MediaStorageSOPInstanceUID == result.SOPInstanceUID
    for elem in _walk(result):
        if elem.VR == "UI":
            for uid in elem.value if elem.VM > 1 else [elem.value]:
                assert uid.startswith("2.25.") or UID(uid).is_private is False or uid == SNOMED_UID, elem


def test_private_sop_class_is_mapped_alike_in_dataset_and_file_meta():
    ds = _synthetic_ct(SOPClassUID=PRIVATE_SOP_CLASS)
    ds.file_meta.MediaStorageSOPClassUID = PRIVATE_SOP_CLASS
    out, result = deidentify_bytes(_to_bytes(ds), KEY)
    assert result.SOPClassUID == Deidentifier(KEY).map_uid(PRIVATE_SOP_CLASS)
    assert result.file_meta.MediaStorageSOPClassUID == result.SOPClassUID
    assert PRIVATE_SOP_CLASS.encode() not in out


# ------------------------------------------------------ Retain Safe Private Option

# What the option keeps of _ge_ct: the listed elements of the GEMS blocks and their creators.
SAFE_KEPT = {
    0x00190011: "GEMS_ACQU_01", 0x00191123: 37.5, 0x00191124: 0.5,
    0x00430010: "GEMS_PARM_01", 0x00431027: "1.375:1",
    0x00450010: "GEMS_HELIOS_01", 0x00451001: 64, 0x00451002: 0.625,
}


def _ge_ct(transfer_syntax: str = ExplicitVRLittleEndian) -> Dataset:
    """The synthetic slice with GE private blocks: safe acquisition parameters and HIDDEN."""
    ds = _synthetic_ct()
    ds.file_meta.TransferSyntaxUID = transfer_syntax
    # A look-alike first, so GEMS_ACQU_01 lands in block 0x11 and offsets must be resolved.
    ds.private_block(0x0019, "ACME LOOKALIKE", create=True).add_new(0x23, "LO", HIDDEN)
    acquisition = ds.private_block(0x0019, "GEMS_ACQU_01", create=True)
    acquisition.add_new(0x23, "DS", "37.5")  # Table Speed: listed
    acquisition.add_new(0x24, "DS", "0.5")  # Mid Scan Time: listed
    acquisition.add_new(0x9E, "LO", HIDDEN)  # not listed here: removed
    ds.private_block(0x0043, "GEMS_PARM_01", create=True).add_new(0x27, "SH", "1.375:1")
    helios = ds.private_block(0x0045, "GEMS_HELIOS_01", create=True)
    helios.add_new(0x01, "SS", 64)
    helios.add_new(0x02, "FL", 0.625)
    ds.private_block(0x0009, "GEMS_IDEN_01", create=True).add_new(0x04, "LO", HIDDEN)
    return ds


def _private_values(ds: Dataset) -> dict:
    return {int(e.tag): e.value for e in _walk(ds) if e.tag.is_private}


@ENCODINGS
def test_safe_private_option_keeps_exactly_the_listed_elements(transfer_syntax):
    out, ds = deidentify_bytes(_to_bytes(_ge_ct(transfer_syntax)), KEY, keep_safe_private=True)
    for result in (ds, _read(out)):
        assert _private_values(result) == SAFE_KEPT
    for needle in (HIDDEN.encode(), b"ACME LOOKALIKE", b"GEMS_IDEN_01"):
        assert needle not in out, needle
    codes = [item.CodeValue for item in ds.DeidentificationMethodCodeSequence]
    assert codes == ["113100", "113108", "113111"]
    assert "Retain Safe Private Option" in ds.DeidentificationMethod


def test_safe_private_option_on_a_real_ge_ct_slice():
    original = pydicom.dcmread(get_testdata_file("CT_small.dcm"))  # GE LightSpeed, many GEMS blocks
    out, ds = deidentify_bytes(_ct_small_bytes(), KEY, keep_safe_private=True)
    kept = {0x00190010, 0x00191023, 0x00191024, 0x00191027, 0x00430010, 0x00431027}
    assert set(_private_values(_read(out))) == kept
    for tag in kept:
        assert ds[tag].value == original[tag].value
    assert b"GEMS_IDEN_01" not in out and b"CompressedSamples" not in out


def test_safe_private_elements_are_removed_by_default():
    out, ds = deidentify_bytes(_to_bytes(_ge_ct()), KEY)
    assert _private_values(ds) == {}
    assert b"GEMS_" not in out
    assert [item.CodeValue for item in ds.DeidentificationMethodCodeSequence] == ["113100", "113108"]


def test_safe_private_option_still_removes_every_other_hidden_element():
    out, _ = deidentify_bytes(_to_bytes(_hiding_ct()), KEY, keep_safe_private=True)
    _assert_nothing_hidden_survives(out)


def test_safe_private_element_with_another_vr_is_removed():
    ds = _synthetic_ct()
    ds.private_block(0x0045, "GEMS_HELIOS_01", create=True).add_new(0x01, "LO", HIDDEN)  # listed SS
    out, result = deidentify_bytes(_to_bytes(ds), KEY, keep_safe_private=True)
    assert _private_values(result) == {}  # the creator goes with its last element
    assert HIDDEN.encode() not in out and b"GEMS_HELIOS" not in out


def test_safe_private_list_agrees_with_the_private_dictionary():
    assert len(SAFE_PRIVATE_ATTRIBUTES) == len({entry[:3] for entry in SAFE_PRIVATE_ATTRIBUTES})
    for group, creator, offset, vr, meaning in SAFE_PRIVATE_ATTRIBUTES:
        assert group % 2 == 1 and 0 <= offset <= 0xFF
        dict_vr, _, dict_name, _ = get_private_entry(Tag(group, 0x1000 | offset), creator)
        assert (dict_vr, dict_name) == (vr, meaning), (hex(group), creator, hex(offset))


def test_options_are_keyword_only_and_shown_without_the_key():
    with pytest.raises(TypeError):
        Deidentifier(KEY, True)  # type: ignore[misc]
    text = repr(Deidentifier(KEY, keep_safe_private=True, allow_burned_in=True))
    assert "keep_safe_private=True" in text and "allow_burned_in=True" in text
    assert "secret" not in text


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


def test_hidden_identifiers_are_gone_from_the_bytes_stored_in_the_database(engine, tmp_path, monkeypatch):
    import sqlalchemy as sa

    from lungsql.client import ingest

    monkeypatch.setenv("LUNGSQL_DEID_KEY", KEY.decode())
    folder = tmp_path / "upload"
    folder.mkdir()
    (folder / "hidden.dcm").write_bytes(_to_bytes(_hiding_ct()))
    summary = ingest.ingest(engine, folder, deidentify=True)
    assert (summary.stored, summary.errors) == (1, 0)
    with engine.connect() as conn:
        for needle in (*HIDDEN_NEEDLES, SITE_UID_ROOT, NAME.split("^")[0].encode(), PATIENT_ID.encode()):
            found = conn.execute(sa.text("SELECT count(*) FROM lungsql.scans WHERE position(:n IN dicom) > 0"),
                                 {"n": needle}).scalar_one()
            assert found == 0, needle
        patient = conn.execute(sa.text("SELECT patient_id, name, birth_date FROM lungsql.patients")).one()
    assert patient.patient_id.startswith("anon-") and patient.name is None and patient.birth_date is None
