"""The DICOM objects lungsql sends back to a hospital PACS: a Structured Report holding the
probability of lung cancer for one CT series, and a Key Object Selection flagging its key slice.

Why a Comprehensive SR with a TID 1500 "Measurement Report"
------------------------------------------------------------
TID 1500 is the template DICOM gives for measurements derived from images, and the one the IHE AI
Results profile asks AI software to use, so PACS viewers and AI result consumers that know any SR
template know this one. Its Algorithm Identification (TID 4019) names the model and its version in
standard concepts. The SOP class is Comprehensive SR rather than Comprehensive 3D SR or Enhanced
SR: the report needs no 3D coordinates, and Comprehensive SR is the class that PACS archives and
viewers have supported the longest.

The content tree (value types in capitals, concept names in quotes)::

    CONTAINER "Imaging Measurement Report" (TID 1500)
      language, and the device observer: the model (name, version, manufacturer)
      CODE "Procedure reported" = "CT Chest"
      CONTAINER "Image Library"
        CONTAINER "Image Library Group" (Modality CT, Frame of Reference UID)
          IMAGE one per source slice
      CONTAINER "Imaging Measurements"
        CONTAINER "Measurement Group" (TID 1501)
          tracking identifier and UID, Finding Site = "Lung"
          TEXT "Algorithm Name", "Algorithm Version", "Algorithm Manufacturer" (TID 4019)
          NUM "Probability of lung cancer" in percent (0 to 100)
            IMAGE "Source of Measurement" = the key slice, when one is given
          TEXT "Feature extraction CNN", "Model SHA-256", "lungsql model id", "Disclaimer"

The four TEXT items are text qualitative evaluations of the measurement group, the place TID 1501
gives to free-text findings; a viewer shows each as "name: value" next to the probability. The image
library carries one IMAGE item per slice and only the descriptors the slices share, so a series of
500 slices gives a report of under 200 kB, built in about a second. The
Current Requested Procedure Evidence Sequence lists every source slice too, under its study and
series: that is where `read_report` finds the source series.

The key slice, the slice that contributed most to the probability, is the "Source of Measurement"
image of the probability, which a viewer shows as a link that opens the slice. The probability itself
comes from every slice of the series.

Codes
-----
Standard codes where one exists: DCM for the document structure, SCT 39607008 "Lung" for the finding
site, LOINC 24627-2 "CT Chest" for the procedure, UCUM "%" for the unit. The lungsql concepts use the
private coding scheme ``99LUNGSQL`` (designators starting with "99" are private by DICOM PS3.16 8.2),
declared in the Coding Scheme Identification Sequence of every report:

* ``LCPROB`` "Probability of lung cancer": the output of a lungsql LightGBM model for one CT
  series, in percent. The standard (111047, DCM, "Probability of cancer") is defined for
  computer-aided detection reports; lungsql's number is the score of a research model trained on
  the labels of the Kaggle Data Science Bowl 2017 and is not a calibrated clinical probability, so it
  gets a concept of its own that nothing downstream can take for a CAD result.
* ``CNN`` "Feature extraction CNN": the name of the CNN (``lungsql.cnn_models.name``) whose
  features the model scored.
* ``MODELSHA256`` "Model SHA-256": the SHA-256 of the model's LightGBM text
  (``lungsql.models.sha256``).
* ``MODELID`` "lungsql model id": ``lungsql.models.model_id``.
* ``DISCLAIMER`` "Disclaimer": that the result is for research use only.

Everything here is a pure function of its arguments apart from the new UIDs and the content date
and time; nothing is sent anywhere.
"""

from __future__ import annotations

import math
import numbers
import re
from collections.abc import Sequence
from dataclasses import dataclass

import highdicom as hd
from highdicom.coding_schemes import CodingSchemeIdentificationItem
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.uid import UID, ComprehensiveSRStorage, generate_uid

from lungsql.errors import LungSQLError

__all__ = ["CNN_NAME", "CODING_SCHEME", "DISCLAIMER", "DISCLAIMER_TEXT", "FINDING_SITE", "KEY_OBJECT_TITLE",
           "LUNG_CANCER_PROBABILITY", "MODEL_ID", "MODEL_SHA256", "ModelInfo", "PROBABILITY_UNIT",
           "PROCEDURE_REPORTED", "REPORT_TITLE", "key_object_selection", "read_report",
           "structured_report"]

#: The private coding scheme of the lungsql concepts (see the module docstring).
CODING_SCHEME = "99LUNGSQL"
LUNG_CANCER_PROBABILITY = Code("LCPROB", CODING_SCHEME, "Probability of lung cancer")
CNN_NAME = Code("CNN", CODING_SCHEME, "Feature extraction CNN")
MODEL_SHA256 = Code("MODELSHA256", CODING_SCHEME, "Model SHA-256")
MODEL_ID = Code("MODELID", CODING_SCHEME, "lungsql model id")
DISCLAIMER = Code("DISCLAIMER", CODING_SCHEME, "Disclaimer")

#: The probability is written in percent, 0 to 100; `read_report` returns it as 0 to 1.
PROBABILITY_UNIT = codes.UCUM.Percent
REPORT_TITLE = codes.DCM.ImagingMeasurementReport
PROCEDURE_REPORTED = Code("24627-2", "LN", "CT Chest")
FINDING_SITE = codes.SCT.Lung
KEY_OBJECT_TITLE = codes.DCM.OfInterest

DISCLAIMER_TEXT = ("For research use only. Not for diagnostic use. This probability was computed by a "
                   "machine-learning model (lungsql) and has not been reviewed by a physician; do not use it "
                   "to diagnose, to rule out disease or to decide treatment.")
TRACKING_IDENTIFIER = "lungsql lung cancer probability"
REPORT_DESCRIPTION = "lungsql lung cancer probability (research use only)"
KEY_OBJECT_DESCRIPTION = "lungsql key slice (research use only)"

_SOURCE = Code("260753009", "SCT", "Source")
_CT = codes.cid29.ComputedTomography
_HEX64 = re.compile(r"[0-9a-f]{64}")
_LO_MAX = 64  # characters of a DICOM Long String (manufacturer, model name, software versions)
_BULK = {0x7FE00010, 0x7FE00008, 0x7FE00009}  # Pixel Data, Float and Double Float Pixel Data
# Type 2 attributes every SR and KO copies from its first source; absent ones are written empty.
_TYPE2 = ("PatientID", "PatientName", "PatientBirthDate", "PatientSex", "AccessionNumber", "StudyID",
          "StudyDate", "StudyTime", "ReferringPhysicianName")
_UIDS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID")
_READ_HINT = "read_report reads the Structured Reports that lungsql.dicom.report.structured_report writes"


@dataclass(frozen=True)
class ModelInfo:
    """The deployed LightGBM model that scored the patient, as the report names it.

    `name` and `version` are the algorithm name and version of the report (e.g. "lungsql-lightgbm"
    and "lungsql 0.1 model 12"), `model_id` and `model_sha256` the row of ``lungsql.models``,
    `cnn_name` the CNN of ``lungsql.cnn_models`` whose features it scored.
    """

    name: str
    model_id: int
    version: str
    cnn_name: str
    model_sha256: str

    def __post_init__(self) -> None:
        for field in ("name", "version", "cnn_name"):
            value = getattr(self, field)
            if not isinstance(value, str) or not value.strip():
                raise LungSQLError(
                    f"ModelInfo.{field} must be a non-empty string, got {value!r}",
                    hint="take it from the deployed model (lungsql.models, lungsql.cnn_models)")
        for field in ("name", "version"):
            if len(getattr(self, field)) > _LO_MAX:
                raise LungSQLError(f"ModelInfo.{field} is longer than {_LO_MAX} characters, the most DICOM "
                                   "allows for a model name or software version", hint="shorten it")
        if isinstance(self.model_id, bool) or not isinstance(self.model_id, int):
            raise LungSQLError(f"ModelInfo.model_id must be an integer, got {self.model_id!r}",
                               hint="use lungsql.models.model_id")
        if not isinstance(self.model_sha256, str) or not _HEX64.fullmatch(self.model_sha256):
            raise LungSQLError(f"ModelInfo.model_sha256 must be 64 lowercase hexadecimal digits, "
                               f"got {self.model_sha256!r}",
                               hint="use lungsql.models.sha256 of the deployed model")


# ----------------------------------------------------------------------------- writing


def structured_report(
    source: Sequence[Dataset],
    probability: float,
    model: ModelInfo,
    *,
    series_number: int = 9901,
    institution: str | None = None,
    key_slice: Dataset | None = None,
    manufacturer: str = "lungsql",
) -> Dataset:
    """A Comprehensive SR (TID 1500) reporting `probability` for the CT series `source`.

    `source` are the slices of the featurized series (headers are enough); the report joins their
    study, copies their patient, and references each of them. `key_slice`, one of `source`, is
    referenced as the image the viewer opens. Raises LungSQLError for slices of more than one
    series, a probability outside [0, 1], or a key slice that is not in `source`.
    """
    slices = _check_source(source)
    percent = 100.0 * _check_probability(probability)
    _check_model(model)
    _check_lo("manufacturer", manufacturer)
    if institution is not None:
        _check_lo("institution", institution)
    _check_series_number(series_number)
    key = _check_key_slice(key_slice, slices) if key_slice is not None else None

    device = _device_context(model, manufacturer)
    measurement = hd.sr.Measurement(
        name=LUNG_CANCER_PROBABILITY, value=percent, unit=PROBABILITY_UNIT,
        referenced_images=None if key is None else [
            hd.sr.SourceImageForMeasurement(str(key.SOPClassUID), str(key.SOPInstanceUID))])
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=hd.UID(), identifier=TRACKING_IDENTIFIER),
        algorithm_id=hd.sr.AlgorithmIdentification(name=model.name, version=model.version,
                                                   manufacturer=manufacturer),
        finding_sites=[hd.sr.FindingSite(anatomic_location=FINDING_SITE)],
        measurements=[measurement])
    texts = ((CNN_NAME, model.cnn_name), (MODEL_SHA256, model.model_sha256),
             (MODEL_ID, str(model.model_id)), (DISCLAIMER, DISCLAIMER_TEXT))
    group[0].ContentSequence.extend(_text(concept, value) for concept, value in texts)
    content = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=device),
        procedure_reported=PROCEDURE_REPORTED, imaging_measurements=[group], title=REPORT_TITLE)
    root = content[0].ContentSequence
    root.insert(len(root) - 1, _image_library(slices))  # TID 1500: the library precedes the measurements

    try:
        return hd.sr.ComprehensiveSR(
            evidence=[_header(slices[0]), *slices[1:]], content=content[0],
            series_instance_uid=hd.UID(), series_number=series_number, sop_instance_uid=hd.UID(),
            instance_number=1, manufacturer=manufacturer, is_complete=True,
            institution_name=institution, series_description=REPORT_DESCRIPTION,
            manufacturer_model_name=model.name, software_versions=model.version,
            coding_schemes=[_coding_scheme()])
    except (ValueError, TypeError, AttributeError) as exc:  # a header highdicom cannot use
        raise LungSQLError(f"cannot build the Structured Report from these slices: {exc}",
                           hint="pass the CT headers as read by pydicom.dcmread") from exc


def key_object_selection(
    source_slice: Dataset, model: ModelInfo, probability: float, series_number: int = 9902
) -> Dataset:
    """A Key Object Selection document ("Of Interest") flagging `source_slice`, saying why."""
    (slice_,) = _check_source([source_slice])
    percent = 100.0 * _check_probability(probability)
    _check_model(model)
    _check_series_number(series_number)
    description = (f"The slice that contributed most to the lung cancer probability of {percent:.1f} % "
                   f"computed by {model.name} ({model.version}). For research use only. "
                   "Not for diagnostic use.")
    content = hd.ko.KeyObjectSelection(
        document_title=KEY_OBJECT_TITLE, referenced_objects=[slice_],
        observer_device_context=_device_context(model, "lungsql"), description=description)
    try:
        return hd.ko.KeyObjectSelectionDocument(
            evidence=[_header(slice_)], content=content, series_instance_uid=hd.UID(),
            series_number=series_number, sop_instance_uid=hd.UID(), instance_number=1,
            manufacturer="lungsql", series_description=KEY_OBJECT_DESCRIPTION,
            manufacturer_model_name=model.name, software_versions=model.version)
    except (ValueError, TypeError, AttributeError) as exc:
        raise LungSQLError(f"cannot build the Key Object Selection from this slice: {exc}",
                           hint="pass a CT header as read by pydicom.dcmread") from exc


def _check_source(source: Sequence[Dataset]) -> list[Dataset]:
    if isinstance(source, Dataset):
        raise LungSQLError("source must be a sequence of slices, not one dataset",
                           hint="pass a list of the slices' datasets, e.g. [ds]")
    slices = list(source) if source is not None else []
    if not slices:
        raise LungSQLError("no source slices were given; a report needs the CT slices that were scored",
                           hint="pass the headers (pydicom datasets) of every slice of the featurized series")
    for index, ds in enumerate(slices):
        if not isinstance(ds, Dataset):
            raise LungSQLError(f"source slice {index} is a {type(ds).__name__}, not a pydicom Dataset",
                               hint="read each slice with pydicom.dcmread (its header is enough)")
        missing = [keyword for keyword in _UIDS if not ds.get(keyword)]
        if missing:
            raise LungSQLError(f"source slice {index} has no {', '.join(missing)}",
                               hint="pass CT slices as stored by lungsql ingest, with their DICOM UIDs")
    for keyword, what in (("StudyInstanceUID", "studies"), ("SeriesInstanceUID", "series"),
                          ("PatientID", "patients")):
        found = sorted({str(ds.get(keyword, "")) for ds in slices})
        if len(found) > 1:
            raise LungSQLError(f"the source slices come from {len(found)} {what} ({', '.join(found)}); "
                               "a report covers one series of one patient",
                               hint="pass only the slices of the series that was featurized and scored")
    seen: set[str] = set()
    for ds in slices:
        uid = str(ds.SOPInstanceUID)
        if uid in seen:
            raise LungSQLError(f"source slice {uid} is given more than once", hint="pass each slice once")
        seen.add(uid)
    return slices


def _check_probability(probability: object) -> float:
    if isinstance(probability, bool) or not isinstance(probability, numbers.Real):
        raise LungSQLError(f"probability must be a number from 0 to 1, got {probability!r}",
                           hint="pass the model's output, as lungsql.predict_lung_cancer returns it")
    value = float(probability)
    if math.isnan(value) or not 0.0 <= value <= 1.0:
        raise LungSQLError(f"probability must be from 0 to 1, got {value!r}",
                           hint="pass the model's output, as lungsql.predict_lung_cancer returns it")
    return value


def _check_model(model: object) -> None:
    if not isinstance(model, ModelInfo):
        raise LungSQLError(f"model must be a ModelInfo, got {type(model).__name__}",
                           hint="describe the deployed model with lungsql.dicom.report.ModelInfo")


def _check_lo(name: str, value: object) -> None:
    if not isinstance(value, str) or not value.strip() or len(value) > _LO_MAX:
        raise LungSQLError(
            f"{name} must be a non-empty string of at most {_LO_MAX} characters, got {value!r}")


def _check_series_number(number: object) -> None:
    if isinstance(number, bool) or not isinstance(number, int) or not 0 <= number < 2**31:
        raise LungSQLError(f"series_number must be a non-negative integer, got {number!r}")


def _check_key_slice(key_slice: Dataset, slices: list[Dataset]) -> Dataset:
    uid = key_slice.get("SOPInstanceUID") if isinstance(key_slice, Dataset) else None
    for ds in slices:
        if ds.SOPInstanceUID == uid:
            return ds
    raise LungSQLError(f"key_slice (SOP Instance UID {uid}) is not one of the source slices",
                       hint="pass one of the datasets of source as key_slice, or None")


def _header(ds: Dataset) -> Dataset:
    """`ds` without its pixels, with the Type 2 attributes an SR copies present (empty if absent)."""
    header = Dataset()
    for element in ds:
        if element.tag not in _BULK:
            header.add(element)
    for keyword in _TYPE2:
        if keyword not in header:
            setattr(header, keyword, "")
    return header


def _device_context(model: ModelInfo, manufacturer: str) -> hd.sr.ObserverContext:
    """The model as a device observer; the same model (SHA-256) is always the same device UID."""
    return hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=generate_uid(entropy_srcs=["lungsql model", model.model_sha256]), name=model.name,
            manufacturer_name=manufacturer, model_name=model.version))


def _text(concept: Code, value: str) -> hd.sr.TextContentItem:
    return hd.sr.TextContentItem(name=concept, value=value,
                                 relationship_type=hd.sr.RelationshipTypeValues.CONTAINS)


def _image_library(slices: list[Dataset]) -> hd.sr.ContainerContentItem:
    """TID 1600: one group of IMAGE items, with the modality and frame of reference they share."""
    contains = hd.sr.RelationshipTypeValues.CONTAINS
    context = hd.sr.RelationshipTypeValues.HAS_ACQ_CONTEXT
    group = hd.sr.ContainerContentItem(name=codes.DCM.ImageLibraryGroup, relationship_type=contains)
    group.ContentSequence = hd.sr.ContentSequence()
    if all(str(ds.get("Modality", "")) == "CT" for ds in slices):
        group.ContentSequence.append(hd.sr.CodeContentItem(name=codes.DCM.Modality, value=_CT,
                                                           relationship_type=context))
    frames = {str(ds.get("FrameOfReferenceUID", "")) for ds in slices}
    if len(frames) == 1 and "" not in frames:
        group.ContentSequence.append(hd.sr.UIDRefContentItem(name=codes.DCM.FrameOfReferenceUID,
                                                             value=frames.pop(), relationship_type=context))
    group.ContentSequence.extend(
        hd.sr.ImageContentItem(name=_SOURCE, referenced_sop_class_uid=str(ds.SOPClassUID),
                               referenced_sop_instance_uid=str(ds.SOPInstanceUID),
                               relationship_type=contains)
        for ds in slices)
    library = hd.sr.ContainerContentItem(name=codes.DCM.ImageLibrary, relationship_type=contains)
    library.ContentSequence = hd.sr.ContentSequence([group])
    return library


def _coding_scheme() -> CodingSchemeIdentificationItem:
    return CodingSchemeIdentificationItem(
        designator=CODING_SCHEME, name="lungsql concepts", responsible_organization="lungsql project")


# ----------------------------------------------------------------------------- reading


def read_report(ds: Dataset) -> dict:
    """What `structured_report` wrote into `ds`, read back from its content tree.

    Returns {"probability" (0 to 1), "model_name", "model_version", "model_id", "model_sha256",
    "cnn_name", "disclaimer", "study_instance_uid", "source_series_instance_uid", "source_instances"
    (SOP Instance UIDs, in evidence order), "key_slice" (a SOP Instance UID or None)}. Raises
    LungSQLError for any dataset that is not a lungsql report.
    """
    if not isinstance(ds, Dataset):
        raise LungSQLError(f"not a lungsql report: a {type(ds).__name__}, not a pydicom Dataset",
                           hint=_READ_HINT)
    sop_class = UID(str(ds.get("SOPClassUID", "")))
    if sop_class != ComprehensiveSRStorage:
        what = sop_class.name if sop_class else "no SOP Class UID"
        raise LungSQLError(f"not a lungsql report: {what} is not a Comprehensive SR", hint=_READ_HINT)
    try:
        document = hd.sr.ComprehensiveSR.from_dataset(ds)
        report = document.content
        if not isinstance(report, hd.sr.MeasurementReport):
            raise LungSQLError("not a lungsql report: the SR does not follow TID 1500", hint=_READ_HINT)
        groups = [group for group in report.get_image_measurement_groups()
                  if group.get_measurements(name=LUNG_CANCER_PROBABILITY)]
        if len(groups) != 1:
            raise LungSQLError(f"not a lungsql report: {len(groups)} measurement groups hold a "
                               f"{LUNG_CANCER_PROBABILITY.meaning!r} ({CODING_SCHEME}) measurement, not 1",
                               hint=_READ_HINT)
        group = groups[0]
        (measurement,) = group.get_measurements(name=LUNG_CANCER_PROBABILITY)
        texts = _texts(group[0])
        evidence = document.get_evidence(current_procedure_only=True)
    except LungSQLError:
        raise
    except (ValueError, TypeError, AttributeError, KeyError, IndexError) as exc:
        raise LungSQLError(f"not a lungsql report: its content cannot be read ({exc})",
                           hint=_READ_HINT) from exc

    if measurement.unit != PROBABILITY_UNIT:
        raise LungSQLError(f"not a lungsql report: the probability is in {measurement.unit.meaning!r}, "
                           "not percent", hint=_READ_HINT)
    percent = float(measurement.value)
    if math.isnan(percent) or not 0.0 <= percent <= 100.0:
        raise LungSQLError(f"not a lungsql report: the probability is {percent} %, outside 0 to 100",
                           hint=_READ_HINT)
    series = sorted({str(item[1]) for item in evidence})
    if len(series) != 1:
        raise LungSQLError(f"not a lungsql report: its evidence lists {len(series)} series, not 1",
                           hint=_READ_HINT)
    images = measurement.referenced_images
    return {
        "probability": percent / 100.0,
        "model_name": _required(texts, codes.DCM.AlgorithmName),
        "model_version": _required(texts, codes.DCM.AlgorithmVersion),
        "model_id": _model_id(_required(texts, MODEL_ID)),
        "model_sha256": _required(texts, MODEL_SHA256),
        "cnn_name": _required(texts, CNN_NAME),
        "disclaimer": _required(texts, DISCLAIMER),
        "study_instance_uid": str(document.StudyInstanceUID),
        "source_series_instance_uid": series[0],
        "source_instances": [str(item[2]) for item in evidence],
        "key_slice": str(images[0].referenced_sop_instance_uid) if images else None,
    }


def _texts(group: hd.sr.ContainerContentItem) -> dict[tuple[str, str], str]:
    """(code value, scheme) -> text of the TEXT items directly in a measurement group."""
    found = {}
    for item in group.ContentSequence:
        if item.ValueType == "TEXT":
            name = item.ConceptNameCodeSequence[0]
            found[(str(name.CodeValue), str(name.CodingSchemeDesignator))] = str(item.TextValue)
    return found


def _required(texts: dict[tuple[str, str], str], concept: Code) -> str:
    try:
        return texts[(concept.value, concept.scheme_designator)]
    except KeyError:
        raise LungSQLError(f"not a lungsql report: its measurement group has no {concept.meaning!r} item",
                           hint=_READ_HINT) from None


def _model_id(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise LungSQLError(f"not a lungsql report: its model id {text!r} is not an integer",
                           hint=_READ_HINT) from None
