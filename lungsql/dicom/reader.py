"""Reading one DICOM file into a CT slice record, and its pixels into Hounsfield units.

`read_scan` is the gate every uploaded file passes: it either returns a
`ScanRecord` with the columns of lungsql.scans, or raises `InvalidScan` with
a one-line reason (not DICOM, truncated, no pixel data, undecodable
compression, not CT, missing position tags, too large...).

Files from outside are hostile until checked. The image size is checked
from the header against `Limits` (the settings LUNGSQL_MAX_*) before any
pixel is decoded, a Deflated dataset is inflated with a bound, and
`decode_stored` is the one decoder of stored slices: ingest runs it once on
every file it stores, featurization and the web viewer run it again, so a
stored slice is known to decode.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import math
import warnings
import zlib
from dataclasses import dataclass
from typing import Callable

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileDataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import UID

from lungsql.dicom.codestream import frame_size
from lungsql.dicom.fast import file_meta_syntax, stored_from_bytes
from lungsql.errors import InvalidScan

CODECS_HINT = "install the codecs extra: pip install 'lungsql[codecs]'"
DEFLATED = "1.2.840.10008.1.2.1.99"
#: Room for the header on top of the pixels, in the largest file read.
HEADER_ALLOWANCE = 16 << 20


@dataclass(frozen=True)
class Limits:
    """The largest image lungsql decodes, checked from the header before decoding."""

    rows: int
    columns: int
    frames: int
    decoded_bytes: int

    @classmethod
    def from_settings(cls) -> Limits:
        import config_preprocessing as config

        return cls(config.get("LUNGSQL_MAX_ROWS"), config.get("LUNGSQL_MAX_COLUMNS"),
                   config.get("LUNGSQL_MAX_FRAMES"), config.get("LUNGSQL_MAX_DECODED_BYTES"))

    @property
    def file_bytes(self) -> int:
        """The largest file read at all: the largest pixel data and room for a header."""
        return self.decoded_bytes + HEADER_ALLOWANCE

    def check(self, rows: int, columns: int, frames: int = 1, samples: int = 1, bits: int = 16) -> None:
        """InvalidScan naming the limit unless an image of this size may be decoded."""
        for value, limit, what, setting in ((rows, self.rows, "Rows", "LUNGSQL_MAX_ROWS"),
                                            (columns, self.columns, "Columns", "LUNGSQL_MAX_COLUMNS"),
                                            (frames, self.frames, "NumberOfFrames", "LUNGSQL_MAX_FRAMES")):
            if value > limit:
                raise InvalidScan(f"{what} is {value}, above the limit of {limit} ({setting})",
                                  hint=f"raise {setting} if this is a real image")
        size = rows * columns * frames * samples * max(1, math.ceil(bits / 8))
        if size > self.decoded_bytes:
            raise InvalidScan(
                f"{rows} x {columns} pixels x {frames} frame(s) x {samples} sample(s) decode to "
                f"{size / 1e6:.0f} MB, above the limit of {self.decoded_bytes / 1e6:.0f} MB "
                "(LUNGSQL_MAX_DECODED_BYTES)",
                hint="raise LUNGSQL_MAX_DECODED_BYTES if this is a real image")


@dataclass(frozen=True)
class Geometry:
    """The image attributes that say how large the decoded pixels are."""

    rows: int
    columns: int
    frames: int
    samples: int
    bits: int


@dataclass(frozen=True)
class Decoded:
    """A stored slice's pixels as stored, and HU = slope x stored + intercept."""

    stored: np.ndarray  # (rows, columns); (frames, rows, columns) or (..., samples) for other images
    slope: float
    intercept: float

    def hounsfield(self) -> np.ndarray:
        return to_hounsfield(self.stored, self.slope, self.intercept)


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
    image_type: str | None = None  # ImageType (an Enhanced CT's frames' FrameType too), joined by '\\'
    series_description: str | None = None
    convolution_kernel: str | None = None
    tilt_degrees: float | None = None  # of the slice normal from the patient's z axis; None: no orientation
    frames: int = 1
    frame_z: tuple[float, ...] | None = None  # a multi-frame file's position of each frame, in frame order


def parse(data: bytes, limits: Limits | None = None) -> Dataset:
    """A pydicom Dataset from file bytes, or InvalidScan saying why not.

    A file larger than the limits allow is refused unread, and a Deflated
    dataset is inflated at most to LUNGSQL_MAX_DECODED_BYTES (pydicom would
    inflate it whole, whatever it holds)."""
    limits = limits or Limits.from_settings()
    if len(data) > limits.file_bytes:
        raise InvalidScan(f"the file holds {len(data) / 1e6:.0f} MB, more than the largest image allowed "
                          f"({limits.decoded_bytes / 1e6:.0f} MB of pixels, LUNGSQL_MAX_DECODED_BYTES)",
                          hint="raise LUNGSQL_MAX_DECODED_BYTES if this is a real image")
    meta = file_meta_syntax(data)
    if meta is not None and meta[0] == DEFLATED.encode():
        return _parse_deflated(data, meta[1], limits)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return pydicom.dcmread(io.BytesIO(data))
    except InvalidDicomError:
        pass
    except Exception as exc:  # pydicom raises many kinds on damaged files
        raise InvalidScan(f"truncated or corrupt DICOM file: {_first_line(exc)}") from None
    if DEFLATED.encode() in data[:4096]:
        raise InvalidScan("a Deflated DICOM file without the 'DICM' preamble: refused, since its size "
                          "cannot be checked before it is inflated")
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


def _parse_deflated(data: bytes, offset: int, limits: Limits) -> Dataset:
    """A Deflated Explicit VR file, inflated to at most the decoded-bytes limit, then read as usual."""
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    try:
        body = inflater.decompress(data[offset:], limits.decoded_bytes + HEADER_ALLOWANCE)
    except zlib.error as exc:
        raise InvalidScan(f"corrupt Deflated DICOM file: {_first_line(exc)}") from None
    if inflater.unconsumed_tail:
        raise InvalidScan(
            f"the Deflated dataset inflates to more than {(limits.file_bytes) / 1e6:.0f} MB "
            f"(a {len(data) / 1e3:.0f} kB file): refused before it was inflated whole",
            hint="raise LUNGSQL_MAX_DECODED_BYTES if this is a real image")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            header = io.BytesIO(data[:offset])
            preamble = pydicom.filereader.read_preamble(header, False)
            file_meta = pydicom.filereader._read_file_meta_info(header)
            dataset = pydicom.filereader.read_dataset(io.BytesIO(body), is_implicit_VR=False,
                                                      is_little_endian=True)
    except Exception as exc:  # pydicom raises many kinds on damaged files
        raise InvalidScan(f"truncated or corrupt DICOM file: {_first_line(exc)}") from None
    ds = FileDataset(None, dataset, preamble=preamble, file_meta=file_meta,
                     is_implicit_VR=False, is_little_endian=True)
    return ds


def read_scan(data: bytes, transform: Callable[[Dataset], bytes] | None = None,
              limits: Limits | None = None) -> ScanRecord:
    """Validate one file as a CT slice and describe it.

    `transform`, when given, rewrites the dataset before anything is described
    (de-identification) and returns the bytes to store instead of `data`.
    The bytes to store are decoded once with `decode_stored`.
    """
    limits = limits or Limits.from_settings()
    ds = parse(data, limits)
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
    g = geometry(ds, limits)  # the size, from the header, before anything is decoded
    layout = frame_layout(ds, g.frames)
    # The bytes to store, decoded once as featurization will decode them: this is also the check that
    # the pixel data is complete and decodable (check_pixels), so a compressed slice is decoded once.
    decoded = decode_stored(data, limits)
    spacing = layout.spacing
    return ScanRecord(
        sop_instance_uid=str(ds.SOPInstanceUID),
        patient=patient_info(ds),
        study_instance_uid=str(ds.StudyInstanceUID),
        series_instance_uid=str(ds.SeriesInstanceUID),
        instance_number=_int_or_none(ds.get("InstanceNumber")),
        z_position=min(layout.z),
        rows=int(ds.Rows),
        columns=int(ds.Columns),
        pixel_spacing_row=spacing[0] if spacing else None,
        pixel_spacing_col=spacing[1] if spacing else None,
        slice_thickness=layout.thickness,
        rescale_slope=decoded.slope,
        rescale_intercept=decoded.intercept,
        modality=modality,
        transfer_syntax_uid=str(ds.file_meta.TransferSyntaxUID) if _has_syntax(ds) else "1.2.840.10008.1.2",
        data=data,
        sha256=hashlib.sha256(data).digest(),
        image_type=layout.image_type,
        series_description=_text_or_none(ds.get("SeriesDescription")),
        convolution_kernel=layout.kernel,
        tilt_degrees=layout.tilt,
        frames=g.frames,
        frame_z=tuple(layout.z) if g.frames > 1 else None,
    )


@dataclass(frozen=True)
class FrameLayout:
    """Where a file's frames lie: one z per frame (along the slice normal), the tilt of that normal
    from the patient's z axis, and the pixel measures, kernel and image type that apply to all."""

    z: list[float]
    tilt: float | None
    spacing: list[float] | None
    thickness: float | None
    kernel: str | None
    image_type: str | None


def frame_layout(ds: Dataset, frames: int = 1) -> FrameLayout:
    """The frames' positions and geometry of a classic slice (one frame) or of an Enhanced CT
    multi-frame file, whose values are in the per-frame and shared functional groups.

    InvalidScan when a frame has no position, or the frames do not share one orientation (they
    could not be stacked as one volume)."""
    if frames == 1 and "PerFrameFunctionalGroupsSequence" not in ds:
        orientation = _floats(ds.get("ImageOrientationPatient"), 6)
        position = _floats(ds.get("ImagePositionPatient"), 3)
        if position is None:
            raise InvalidScan("missing ImagePositionPatient: the slices cannot be put in order")
        return FrameLayout([_along_normal(position, orientation)], _tilt(orientation),
                           _floats(ds.get("PixelSpacing"), 2), _float_or_none(ds.get("SliceThickness")),
                           _text_or_none(ds.get("ConvolutionKernel")), _joined(ds.get("ImageType")))
    per_frame = ds.get("PerFrameFunctionalGroupsSequence") or []
    if len(per_frame) != frames:
        raise InvalidScan(f"NumberOfFrames is {frames} but the per-frame functional groups describe "
                          f"{len(per_frame)} frames: the frames cannot be placed")
    shared = (ds.get("SharedFunctionalGroupsSequence") or [None])[0]
    z, orientations = [], set()
    for number, item in enumerate(per_frame, start=1):
        position = _floats(_macro(item, shared, "PlanePositionSequence", "ImagePositionPatient"), 3)
        if position is None:
            raise InvalidScan(f"frame {number} has no ImagePositionPatient (PlanePositionSequence): "
                              "the frames cannot be put in order")
        orientation = _floats(_macro(item, shared, "PlaneOrientationSequence", "ImageOrientationPatient"), 6)
        orientations.add(None if orientation is None else tuple(round(v, 4) for v in orientation))
        z.append(_along_normal(position, orientation))
    if len(orientations) > 1:
        raise InvalidScan("the frames lie in different orientations: they are not one volume",
                          hint="lungsql featurizes series whose slices are parallel")
    orientation = next(iter(orientations))
    first = per_frame[0]
    frame_type = _joined(_macro(first, shared, "CTImageFrameTypeSequence", "FrameType"))
    image_type = "\\".join(t for t in (_joined(ds.get("ImageType")), frame_type) if t) or None
    kernel = _text_or_none(_macro(first, shared, "CTReconstructionSequence", "ConvolutionKernel")
                           or ds.get("ConvolutionKernel"))
    return FrameLayout(z, _tilt(list(orientation) if orientation else None),
                       _floats(_macro(first, shared, "PixelMeasuresSequence", "PixelSpacing"), 2),
                       _float_or_none(_macro(first, shared, "PixelMeasuresSequence", "SliceThickness")),
                       kernel, image_type)


def _rescale(ds: Dataset) -> tuple[float, float]:
    """(slope, intercept) of the header, or of an Enhanced CT's Pixel Value Transformation macro, which
    must then be the same for every frame (one volume, one map to Hounsfield units)."""
    slope, intercept = _float_or_none(ds.get("RescaleSlope")), _float_or_none(ds.get("RescaleIntercept"))
    if slope is None and intercept is None and "PerFrameFunctionalGroupsSequence" in ds:
        shared = (ds.get("SharedFunctionalGroupsSequence") or [None])[0]
        found = {(_float_or_none(_macro(item, shared, "PixelValueTransformationSequence", "RescaleSlope")),
                  _float_or_none(_macro(item, shared, "PixelValueTransformationSequence", "RescaleIntercept")))
                 for item in ds.PerFrameFunctionalGroupsSequence}
        if len(found) > 1:
            raise InvalidScan("the frames map to Hounsfield units with different rescales",
                              hint="lungsql featurizes frames that share one RescaleSlope and RescaleIntercept")
        slope, intercept = found.pop() if found else (None, None)
    return (1.0 if slope is None else slope), (0.0 if intercept is None else intercept)


def _macro(item: Dataset | None, shared: Dataset | None, sequence: str, keyword: str):
    """A value of a functional group macro: the frame's own, else the shared one, else None."""
    for groups in (item, shared):
        if groups is not None and sequence in groups and len(groups[sequence].value):
            value = groups[sequence].value[0].get(keyword)
            if value not in (None, ""):
                return value
    return None


def _along_normal(position: list[float], orientation: list[float] | None) -> float:
    """A slice's position along its normal (right for tilted gantries too), else its z."""
    if orientation is None:
        return position[2]
    normal = np.cross(orientation[:3], orientation[3:])
    if not np.any(normal):
        return position[2]
    return float(np.dot(normal, position))


def _tilt(orientation: list[float] | None) -> float | None:
    """Degrees between the slice normal and the patient's z axis: 0 for axial, 90 for coronal or sagittal."""
    if orientation is None:
        return None
    normal = np.cross(orientation[:3], orientation[3:])
    length = float(np.linalg.norm(normal))
    if not length or not math.isfinite(length):
        return None
    return float(np.degrees(np.arccos(min(1.0, abs(normal[2]) / length))))


def _joined(value) -> str | None:
    if value in (None, ""):
        return None
    values = [value] if isinstance(value, str) else list(value)
    return "\\".join(str(v).strip() for v in values)[:256] or None


def _text_or_none(value) -> str | None:
    if value in (None, ""):
        return None
    text = _joined(value) if not isinstance(value, str) else value.strip()
    return text[:256].replace("\x00", "") or None


def check_pixels(ds: Dataset) -> None:
    """Raise InvalidScan unless the pixel data is complete and decodable."""
    syntax = UID(str(ds.file_meta.TransferSyntaxUID)) if _has_syntax(ds) else UID("1.2.840.10008.1.2")
    if not syntax.is_compressed:
        g = geometry(ds)
        expected = g.rows * g.columns * g.samples * g.frames * g.bits // 8
        actual = len(ds.PixelData)
        if actual < expected:
            raise InvalidScan(f"truncated pixel data: {actual} of {expected} bytes")
        return
    _check_codestreams(ds, geometry(ds))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds.pixel_array
    except Exception as exc:
        raise InvalidScan(
            f"cannot decode compressed pixel data ({syntax.name}, {syntax}): {_first_line(exc)}; "
            f"{CODECS_HINT}"
        ) from None


def geometry(ds: Dataset, limits: Limits | None = None) -> Geometry:
    """Rows, columns, frames, samples and bits of the header, each checked to be a sensible
    number, and, with `limits`, the decoded size checked against them."""
    found = Geometry(rows=_count(ds, "Rows", None), columns=_count(ds, "Columns", None),
                     frames=_count(ds, "NumberOfFrames", 1), samples=_count(ds, "SamplesPerPixel", 1),
                     bits=_count(ds, "BitsAllocated", 16))
    if found.bits > 64:
        raise InvalidScan(f"BitsAllocated is {found.bits}, not a pixel size (1 to 64)")
    if limits is not None:
        limits.check(found.rows, found.columns, found.frames, found.samples, found.bits)
    return found


def decode_stored(data: bytes, limits: Limits | None = None) -> Decoded:
    """The pixels of one DICOM file as stored, and its rescale: the decoder of every stored slice.

    Uncompressed little-endian slices are viewed straight from their bytes
    (lungsql.dicom.fast); pydicom decodes the others.  The size is checked
    against `limits` (the settings) from the header before decoding, and the
    rescale must be finite with a slope that is not zero.  InvalidScan says
    what is wrong with a file that fails.
    """
    limits = limits or Limits.from_settings()
    fast = stored_from_bytes(data)
    if fast is not None:
        stored, slope, intercept = fast
        limits.check(stored.shape[0], stored.shape[1], bits=8 * stored.itemsize)
    else:
        ds = parse(data, limits)
        if "PixelData" not in ds:
            raise InvalidScan("no pixel data (PixelData is absent; a file cut short ends this way too)")
        geometry(ds, limits)
        check_pixels(ds)
        try:
            stored = stored_pixels(ds)
        except Exception as exc:  # pydicom raises many kinds when a codec is missing or fails
            raise InvalidScan(f"cannot decode the pixels: {_first_line(exc)}", hint=CODECS_HINT) from None
        slope, intercept = _rescale(ds)
    if not (math.isfinite(slope) and math.isfinite(intercept)) or slope == 0:
        raise InvalidScan(f"RescaleSlope {slope:g} and RescaleIntercept {intercept:g} do not give "
                          "Hounsfield units (a finite intercept and a finite slope other than 0)")
    return Decoded(stored, float(slope), float(intercept))


def _check_codestreams(ds: Dataset, g: Geometry) -> None:
    """InvalidScan when a compressed frame claims more pixels than the header: its decoder would
    allocate what the frame claims (lungsql.dicom.codestream)."""
    from pydicom.encaps import generate_frames

    try:
        frames = list(generate_frames(ds.PixelData, number_of_frames=g.frames))
    except Exception:
        return  # pydicom's decoder says what is wrong with the encapsulation
    for number, frame in enumerate(frames, start=1):
        size = frame_size(frame)
        if size is not None and (size[0] > g.rows or size[1] > g.columns):
            raise InvalidScan(f"compressed frame {number} claims {size[0]} x {size[1]} pixels, "
                              f"the header {g.rows} x {g.columns}: refused before decoding")


_NATIVE_LITTLE_ENDIAN = ("1.2.840.10008.1.2", "1.2.840.10008.1.2.1")


def stored_pixels(ds: Dataset) -> np.ndarray:
    """The stored values of a single-frame slice, as an array of shape (rows, columns).

    Uncompressed little-endian 8- and 16-bit monochrome data (nearly every CT
    slice) is viewed in place, without pydicom's general pixel pipeline, which
    costs a few milliseconds a slice; anything else goes through pixel_array.
    """
    syntax = str(ds.file_meta.TransferSyntaxUID) if _has_syntax(ds) else "1.2.840.10008.1.2"
    g = geometry(ds)
    if (syntax in _NATIVE_LITTLE_ENDIAN and g.bits in (8, 16) and g.samples == 1 and g.frames == 1
            and "PixelData" in ds):
        rows, cols, bits = g.rows, g.columns, g.bits
        signed = int(ds.get("PixelRepresentation", 0) or 0) == 1
        dtype = np.dtype(("<i" if signed else "<u") + str(bits // 8))
        data = ds.PixelData
        if len(data) >= rows * cols * dtype.itemsize:
            return np.frombuffer(data, dtype, count=rows * cols).reshape(rows, cols)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return ds.pixel_array


def to_hounsfield(stored: np.ndarray, slope: float, intercept: float) -> np.ndarray:
    """Hounsfield units (float32) of stored pixel values: slope x stored + intercept, the one place
    lungsql converts (featurization folds the same map into its preprocessing instead)."""
    hu = stored.astype(np.float32)
    if slope != 1.0:
        hu *= np.float32(slope)
    if intercept != 0.0:
        hu += np.float32(intercept)
    return hu


def slice_hu(data: bytes) -> np.ndarray:
    """The first frame of one stored DICOM file in Hounsfield units, float32 (rows, columns).

    Decodes under the limits of the settings LUNGSQL_MAX_*; raises InvalidScan
    with a one-line reason for anything it cannot decode.
    """
    decoded = decode_stored(data)
    stored = decoded.stored
    if stored.ndim == 3 and stored.shape[-1] in (3, 4) and stored.shape[0] > 4:  # one colour frame
        raise InvalidScan("a colour image, not a CT slice")
    if stored.ndim == 3:  # multi-frame: the first frame
        stored = stored[0]
    if stored.ndim != 2:
        raise InvalidScan(f"pixels of shape {list(decoded.stored.shape)} are not a slice")
    return to_hounsfield(stored, decoded.slope, decoded.intercept)


def patient_info(ds: Dataset) -> PatientInfo:
    birth = _date_or_none(ds.get("PatientBirthDate"))
    age = parse_age(str(ds.get("PatientAge", "") or ""))
    if age is None and birth is not None:
        study = _date_or_none(ds.get("StudyDate") or ds.get("SeriesDate") or ds.get("AcquisitionDate"))
        if study is not None and study >= birth:
            age = round((study - birth).days / 365.25, 1)
    if age is not None and not 0 <= age < 150:
        age = None  # a typo in the header, not an age
    if birth is not None and not dt.date(1850, 1, 1) <= birth <= dt.date.today():
        birth = None
    sex = str(ds.get("PatientSex", "") or "").upper()
    return PatientInfo(
        patient_id=str(ds.PatientID).replace("\x00", "").strip(),
        name=display_name(ds.get("PatientName")),
        sex=sex if sex in ("M", "F", "O") else None,
        birth_date=birth,
        age_years=age,
    )


def display_name(value) -> str | None:
    """'Fernandez^Ana' as 'Ana Fernandez'; None when empty."""
    if value is None:
        return None
    text = str(value).replace("\x00", "").strip()
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


def _count(ds: Dataset, keyword: str, default: int | None) -> int:
    """A positive whole number of the header (Rows, NumberOfFrames...), else InvalidScan naming it."""
    try:
        value = ds.get(keyword)
    except Exception as exc:  # pydicom converts values when they are read, and raises on junk
        raise InvalidScan(f"{keyword} is not a number: {_first_line(exc)}") from None
    if value is None or value == "":
        if default is None:
            raise InvalidScan(f"missing {keyword}")
        return default
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise InvalidScan(f"{keyword} is {str(value)[:40]!r}, not a whole number") from None
    if number < 1 or number != float(value):
        raise InvalidScan(f"{keyword} is {str(value)[:40]}, not a positive whole number")
    return number


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
