"""Reading one DICOM file into a CT slice record, and its pixels into Hounsfield units.

`read_scan` is the gate every uploaded file passes: it either returns a
`ScanRecord` with the columns of lungsql.scans, or raises `InvalidScan` with
a one-line reason (not DICOM, truncated, no pixel data, undecodable
compression, not CT, missing position tags...).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import warnings
from dataclasses import dataclass
from typing import Callable

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import UID

from lungsql.errors import InvalidScan

CODECS_HINT = "install the codecs extra: pip install 'lungsql[codecs]'"


@dataclass(frozen=True)
class PatientInfo:
    patient_id: str
    name: str | None
    sex: str | None
    birth_date: dt.date | None
    age_years: float | None


@dataclass(frozen=True)
class ScanRecord:
    """One CT slice: the columns of lungsql.scans, and its patient."""

    sop_instance_uid: str
    patient: PatientInfo
    study_instance_uid: str
    series_instance_uid: str
    instance_number: int | None
    z_position: float
    rows: int
    columns: int
    pixel_spacing_row: float | None
    pixel_spacing_col: float | None
    slice_thickness: float | None
    rescale_slope: float
    rescale_intercept: float
    modality: str
    transfer_syntax_uid: str
    data: bytes
    sha256: bytes


def parse(data: bytes) -> Dataset:
    """A pydicom Dataset from file bytes, or InvalidScan saying why not."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return pydicom.dcmread(io.BytesIO(data))
    except InvalidDicomError:
        pass
    except Exception as exc:  # pydicom raises many kinds on damaged files
        raise InvalidScan(f"truncated or corrupt DICOM file: {_first_line(exc)}") from None
    # Some writers omit the 128-byte preamble: accept those only if they hold an image.
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(io.BytesIO(data), force=True)
        if "SOPInstanceUID" in ds and "PixelData" in ds:
            return ds
    except Exception:
        pass
    raise InvalidScan("not a DICOM file (no 'DICM' marker and no readable DICOM dataset)")


def read_scan(data: bytes, transform: Callable[[Dataset], bytes] | None = None) -> ScanRecord:
    """Validate one file as a CT slice and describe it.

    `transform`, when given, rewrites the dataset before anything is described
    (de-identification) and returns the bytes to store instead of `data`.
    """
    ds = parse(data)
    if transform is not None:
        data = transform(ds)
    if "PixelData" not in ds:
        raise InvalidScan("no pixel data (PixelData is absent; a file cut short ends this way too)")
    modality = str(ds.get("Modality", "") or "")
    if modality != "CT":
        raise InvalidScan(f"not CT: Modality is {modality!r}" if modality else "not CT: Modality is missing")
    for keyword in ("SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "PatientID"):
        if not str(ds.get(keyword, "") or "").strip():
            raise InvalidScan(f"missing {keyword}")
    if "Rows" not in ds or "Columns" not in ds:
        raise InvalidScan("missing Rows or Columns")
    z_position = _z_position(ds)
    check_pixels(ds)
    spacing = _floats(ds.get("PixelSpacing"), 2)
    return ScanRecord(
        sop_instance_uid=str(ds.SOPInstanceUID),
        patient=patient_info(ds),
        study_instance_uid=str(ds.StudyInstanceUID),
        series_instance_uid=str(ds.SeriesInstanceUID),
        instance_number=_int_or_none(ds.get("InstanceNumber")),
        z_position=z_position,
        rows=int(ds.Rows),
        columns=int(ds.Columns),
        pixel_spacing_row=spacing[0] if spacing else None,
        pixel_spacing_col=spacing[1] if spacing else None,
        slice_thickness=_float_or_none(ds.get("SliceThickness")),
        rescale_slope=_float_or_none(ds.get("RescaleSlope")) or 1.0,
        rescale_intercept=_float_or_none(ds.get("RescaleIntercept")) or 0.0,
        modality=modality,
        transfer_syntax_uid=str(ds.file_meta.TransferSyntaxUID) if _has_syntax(ds) else "1.2.840.10008.1.2",
        data=data,
        sha256=hashlib.sha256(data).digest(),
    )


def check_pixels(ds: Dataset) -> None:
    """Raise InvalidScan unless the pixel data is complete and decodable."""
    syntax = UID(str(ds.file_meta.TransferSyntaxUID)) if _has_syntax(ds) else UID("1.2.840.10008.1.2")
    if not syntax.is_compressed:
        samples = int(ds.get("SamplesPerPixel", 1) or 1)
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        bits = int(ds.get("BitsAllocated", 16) or 16)
        expected = int(ds.Rows) * int(ds.Columns) * samples * frames * bits // 8
        actual = len(ds.PixelData)
        if actual < expected:
            raise InvalidScan(f"truncated pixel data: {actual} of {expected} bytes")
        return
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds.pixel_array
    except Exception as exc:
        raise InvalidScan(
            f"cannot decode compressed pixel data ({syntax.name}, {syntax}): {_first_line(exc)}; "
            f"{CODECS_HINT}"
        ) from None


_NATIVE_LITTLE_ENDIAN = ("1.2.840.10008.1.2", "1.2.840.10008.1.2.1")


def stored_pixels(ds: Dataset) -> np.ndarray:
    """The stored values of a single-frame slice, as an array of shape (rows, columns).

    Uncompressed little-endian 8- and 16-bit monochrome data (nearly every CT
    slice) is viewed in place, without pydicom's general pixel pipeline, which
    costs a few milliseconds a slice; anything else goes through pixel_array.
    """
    syntax = str(ds.file_meta.TransferSyntaxUID) if _has_syntax(ds) else "1.2.840.10008.1.2"
    bits = ds.get("BitsAllocated")
    if (syntax in _NATIVE_LITTLE_ENDIAN and bits in (8, 16) and int(ds.get("SamplesPerPixel", 1) or 1) == 1
            and int(ds.get("NumberOfFrames", 1) or 1) == 1 and "PixelData" in ds):
        rows, cols = int(ds.Rows), int(ds.Columns)
        signed = int(ds.get("PixelRepresentation", 0) or 0) == 1
        dtype = np.dtype(("<i" if signed else "<u") + str(bits // 8))
        data = ds.PixelData
        if len(data) >= rows * cols * dtype.itemsize:
            return np.frombuffer(data, dtype, count=rows * cols).reshape(rows, cols)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return ds.pixel_array


def hounsfield(ds: Dataset) -> np.ndarray:
    """The slice in Hounsfield units (float32), through RescaleSlope and RescaleIntercept."""
    pixels = stored_pixels(ds).astype(np.float32)
    slope = _float_or_none(ds.get("RescaleSlope")) or 1.0
    intercept = _float_or_none(ds.get("RescaleIntercept")) or 0.0
    if slope != 1.0:
        pixels *= np.float32(slope)
    if intercept != 0.0:
        pixels += np.float32(intercept)
    return pixels


def patient_info(ds: Dataset) -> PatientInfo:
    birth = _date_or_none(ds.get("PatientBirthDate"))
    age = parse_age(str(ds.get("PatientAge", "") or ""))
    if age is None and birth is not None:
        study = _date_or_none(ds.get("StudyDate") or ds.get("SeriesDate") or ds.get("AcquisitionDate"))
        if study is not None and study >= birth:
            age = round((study - birth).days / 365.25, 1)
    sex = str(ds.get("PatientSex", "") or "").upper()
    return PatientInfo(
        patient_id=str(ds.PatientID).strip(),
        name=display_name(ds.get("PatientName")),
        sex=sex if sex in ("M", "F", "O") else None,
        birth_date=birth,
        age_years=age,
    )


def display_name(value) -> str | None:
    """'Fernandez^Ana' as 'Ana Fernandez'; None when empty."""
    if value is None:
        return None
    text = str(value).strip()
    if not text:
        return None
    parts = text.split("=")[0].split("^")
    family = parts[0].strip()
    given = " ".join(p.strip() for p in parts[1:3] if p.strip())
    return " ".join(p for p in (given, family) if p) or None


def parse_age(text: str) -> float | None:
    """DICOM AS value ('063Y', '018M', '030W', '100D') in years."""
    text = text.strip().upper()
    if len(text) < 2 or not text[:-1].isdigit():
        return None
    per_year = {"Y": 1.0, "M": 12.0, "W": 52.1775, "D": 365.25}.get(text[-1])
    return None if per_year is None else round(int(text[:-1]) / per_year, 2)


def _z_position(ds: Dataset) -> float:
    position = _floats(ds.get("ImagePositionPatient"), 3)
    if position is None:
        raise InvalidScan("missing ImagePositionPatient: the slices cannot be put in order")
    orientation = _floats(ds.get("ImageOrientationPatient"), 6)
    if orientation is None:
        return position[2]
    # Distance along the slice normal: right for tilted gantries too.
    normal = np.cross(orientation[:3], orientation[3:])
    if not np.any(normal):
        return position[2]
    return float(np.dot(normal, position))


def _has_syntax(ds: Dataset) -> bool:
    return "TransferSyntaxUID" in getattr(ds, "file_meta", Dataset())


def _floats(value, n: int) -> list[float] | None:
    try:
        numbers = [float(v) for v in value]
    except (TypeError, ValueError):
        return None
    return numbers if len(numbers) == n else None


def _float_or_none(value) -> float | None:
    try:
        return float(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None


def _int_or_none(value) -> int | None:
    try:
        return int(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None


def _date_or_none(value) -> dt.date | None:
    text = str(value or "").strip()
    try:
        return dt.datetime.strptime(text[:8], "%Y%m%d").date() if len(text) >= 8 else None
    except ValueError:
        return None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:200]
