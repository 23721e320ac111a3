"""Reading chest radiographs: a PNG (the NIH ChestX-ray14 download) or a DICOM CR/DX file.

`read_radiograph` is the gate every radiograph passes: it checks the header
only and returns a `RadiographRecord` (the columns of lungsql.radiographs), or
raises `InvalidScan` with a one-line reason saying what is wrong and what to
do. `decode_radiograph` gives the image as displayed: float32, 2-D, 0 black
to 1 white. It runs the same checks first, so no unchecked file is decoded.

Files from outside are hostile until checked. A PNG's IHDR is parsed here
(its CRC checked, its chunks walked to a final IEND) and the decoded size is
checked against `Limits` (the settings LUNGSQL_MAX_*) before OpenCV sees the
file, so a small PNG that claims 100000 x 100000 pixels (a decompression
bomb) is refused unread. A DICOM file is parsed by lungsql.dicom.reader.parse,
which applies the same limits, and must be one monochrome frame of a
radiograph.

How a DICOM image is displayed (PS3.3 C.11): the Modality LUT (or
RescaleSlope and RescaleIntercept), then the first VOI LUT, else the first
window (WindowCenter, WindowWidth, VOILUTFunction: LINEAR, LINEAR_EXACT or
SIGMOID, with pydicom's rules, computed here in float32: pydicom's
apply_windowing works in float64 with masks, 80 ms on a 2k x 2k image, and a
test checks both agree), else the 0.5 and 99.5 percentiles of the pixel
values as the window; MONOCHROME1 is then inverted. A VOI LUT's darkest and
brightest entries become 0 and 1 (rather than 0 and 2**bits - 1 of its
descriptor, which some writers overstate).
"""

from __future__ import annotations

import hashlib
import math
import struct
import warnings
import zlib
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import PureWindowsPath
from typing import Iterator

import numpy as np
from pydicom.dataset import Dataset
from pydicom.uid import UID

from lungsql.dicom.codestream import frame_size
from lungsql.dicom.reader import CODECS_HINT, Limits, geometry, parse, parse_age
from lungsql.errors import ConfigurationError, InvalidScan, LungSQLError

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
#: Modalities of a radiograph: Computed and Digital Radiography, and the older RG and DR codes.
RADIOGRAPH_MODALITIES = ("CR", "DX", "RG", "DR")
#: Computed Radiography Image Storage, Digital X-Ray Image Storage (for presentation, for processing).
RADIOGRAPH_SOP_CLASSES = ("1.2.840.10008.5.1.4.1.1.1", "1.2.840.10008.5.1.4.1.1.1.1",
                          "1.2.840.10008.5.1.4.1.1.1.1.1")
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
#: CT Image Storage, Enhanced CT Image Storage, Legacy Converted Enhanced CT Image Storage.
CT_SOP_CLASSES = ("1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.5.1.4.1.1.2.1", "1.2.840.10008.5.1.4.1.1.2.2")
#: The most chunks a PNG may have: every real writer uses far fewer (libpng writes 8 kB IDAT chunks).
MAX_PNG_CHUNKS = 1 << 18
_PERCENTILES = (0.5, 99.5)

# PNG colour type -> (photometric, samples per pixel in the file).
_PNG_COLOUR = {0: ("GRAY", 1), 2: ("RGB", 3), 3: ("PALETTE", 1), 4: ("GRAY_ALPHA", 2), 6: ("RGBA", 4)}
_PNG_DEPTHS = {0: (1, 2, 4, 8, 16), 2: (8, 16), 3: (1, 2, 4, 8), 4: (8, 16), 6: (8, 16)}


@dataclass(frozen=True)
class RadiographRecord:
    """One radiograph: the columns of lungsql.radiographs, read from the file's header."""

    image_index: str  # a PNG's base name ('00000001_000.png'); a DICOM file's SOPInstanceUID
    patient_id: str | None  # DICOM PatientID; None for a PNG (its labels file names the patient)
    format: str  # 'png' or 'dicom'
    data: bytes  # the file, unchanged
    sha256: bytes  # of data, 32 bytes
    rows: int
    columns: int
    bits_stored: int  # DICOM BitsStored; a PNG's bit depth (8 for a palette: its colours have 8 bits)
    photometric: str  # MONOCHROME1 / MONOCHROME2; a PNG's GRAY, GRAY_ALPHA, RGB, RGBA or PALETTE
    modality: str | None  # as in the DICOM file (CR, DX, RG, DR); None for a PNG
    view_position: str | None  # DICOM ViewPosition (PA, AP, LL...); None when absent or empty
    pixel_spacing_mm: float | None  # ImagerPixelSpacing, else PixelSpacing (between rows); None if not > 0
    study_instance_uid: str | None
    series_instance_uid: str | None
    sex: str | None  # M, F, O or None
    age_years: float | None  # from PatientAge ('058Y', '006M', '010W', '003D')
    transfer_syntax_uid: str | None


@dataclass(frozen=True)
class _PngHeader:
    width: int
    height: int
    bit_depth: int
    colour_type: int
    transparency: bool  # a tRNS chunk: OpenCV then decodes to four channels

    @property
    def photometric(self) -> str:
        return _PNG_COLOUR[self.colour_type][0]

    @property
    def decoded_channels(self) -> int:
        """The channels OpenCV decodes to with IMREAD_UNCHANGED (gray with alpha becomes BGRA)."""
        if self.transparency or self.colour_type in (4, 6):
            return 4
        return 3 if self.colour_type in (2, 3) else 1


@dataclass(frozen=True)
class _DicomImage:
    ds: Dataset
    rows: int
    columns: int
    bits_stored: int
    photometric: str
    modality: str | None
    syntax: str | None


def read_radiograph(data: bytes, name: str, limits: Limits | None = None) -> RadiographRecord:
    """Check one radiograph file's header and describe it, or raise InvalidScan with a one-line reason.

    `name` is the file's name or path: a PNG's base name is its image index
    (ChestX-ray14 names images so). Nothing is decoded; `decode_radiograph`
    decodes."""
    data = bytes(data)
    limits = limits or Limits.from_settings()
    with _reasons():
        if _is_png(data):
            header = _png_header(data, limits)
            image_index = _base_name(name)
            if not image_index:
                raise InvalidScan("a PNG radiograph needs a file name: its base name is the image index "
                                  "('00000001_000.png')")
            return RadiographRecord(
                image_index=image_index, patient_id=None, format="png", data=data,
                sha256=hashlib.sha256(data).digest(), rows=header.height, columns=header.width,
                bits_stored=8 if header.colour_type == 3 else header.bit_depth, photometric=header.photometric,
                modality=None, view_position=None, pixel_spacing_mm=None, study_instance_uid=None,
                series_instance_uid=None, sex=None, age_years=None, transfer_syntax_uid=None)
        image = _dicom_image(data, limits)
        ds = image.ds
        sop_instance_uid = _text(ds, "SOPInstanceUID")
        if sop_instance_uid is None:
            raise InvalidScan("missing SOPInstanceUID, the image index of a DICOM radiograph: "
                              "export the image again from its PACS or modality")
        sex = (_text(ds, "PatientSex") or "").upper()
        age = parse_age(_text(ds, "PatientAge") or "")
        return RadiographRecord(
            image_index=sop_instance_uid, patient_id=_text(ds, "PatientID"), format="dicom", data=data,
            sha256=hashlib.sha256(data).digest(), rows=image.rows, columns=image.columns,
            bits_stored=image.bits_stored, photometric=image.photometric, modality=image.modality,
            view_position=(_text(ds, "ViewPosition") or "").upper() or None,
            pixel_spacing_mm=_spacing(ds), study_instance_uid=_text(ds, "StudyInstanceUID"),
            series_instance_uid=_text(ds, "SeriesInstanceUID"), sex=sex if sex in ("M", "F", "O") else None,
            age_years=age if age is not None and 0 <= age <= 150 else None, transfer_syntax_uid=image.syntax)


def decode_radiograph(data: bytes, limits: Limits | None = None) -> np.ndarray:
    """The radiograph as displayed: float32 (rows, columns) in [0, 1], 0 black and 1 white.

    The header is checked as `read_radiograph` checks it before anything is
    decoded; InvalidScan says why a file cannot be decoded (truncated or
    corrupt pixel data, a missing codec). A PNG is decoded by OpenCV (the ml
    extra): ConfigurationError when it is not installed."""
    data = bytes(data)
    limits = limits or Limits.from_settings()
    with _reasons():
        if _is_png(data):
            return _decode_png(data, _png_header(data, limits))
        return _decode_dicom(_dicom_image(data, limits))


# ----------------------------------------------------------------------------- PNG


def _is_png(data: bytes) -> bool:
    return data.startswith(PNG_SIGNATURE) or (0 < len(data) < 8 and PNG_SIGNATURE.startswith(data))


def _png_header(data: bytes, limits: Limits) -> _PngHeader:
    """The IHDR of a PNG file whose chunks run whole to a final IEND, its size within the limits."""
    if len(data) > limits.file_bytes:
        raise InvalidScan(f"the PNG file holds {len(data) / 1e6:.0f} MB, more than the largest image allowed "
                          f"({limits.decoded_bytes / 1e6:.0f} MB of pixels, LUNGSQL_MAX_DECODED_BYTES)")
    if len(data) < 8 + 25:
        raise InvalidScan(f"truncated PNG file: {len(data)} bytes, too short to hold its IHDR chunk; "
                          "copy or download the file again")
    length, kind = struct.unpack_from(">I4s", data, 8)
    if kind != b"IHDR" or length != 13:
        raise InvalidScan("corrupt PNG file: its first chunk is not a 13-byte IHDR; export the image again")
    body = data[16:29]
    (crc,) = struct.unpack_from(">I", data, 29)
    if zlib.crc32(data[12:29]) != crc:
        raise InvalidScan("corrupt PNG file: the IHDR chunk fails its CRC check; copy or export the image again")
    width, height, depth, colour, compression, filtering, interlace = struct.unpack(">IIBBBBB", body)
    if colour not in _PNG_COLOUR or depth not in _PNG_DEPTHS[colour]:
        raise InvalidScan(f"corrupt PNG file: colour type {colour} with bit depth {depth} is not a PNG image")
    if compression != 0 or filtering != 0 or interlace not in (0, 1):
        raise InvalidScan(f"corrupt PNG file: IHDR names compression method {compression}, filter method "
                          f"{filtering} and interlace method {interlace} (PNG knows 0, 0 and 0 or 1)")
    if width == 0 or height == 0 or width > 2**31 - 1 or height > 2**31 - 1:
        raise InvalidScan(f"corrupt PNG file: IHDR claims {width} x {height} pixels")
    transparency = _walk_png_chunks(data, colour)
    header = _PngHeader(width, height, depth, colour, transparency)
    _check_png_size(header, limits)
    return header


def _walk_png_chunks(data: bytes, colour: int) -> bool:
    """Follow the chunk lengths from IHDR to an IEND that ends the file; whether a tRNS chunk is there."""
    offset, count, seen = 8, 0, set()
    while True:
        if offset + 12 > len(data):
            raise InvalidScan(f"truncated PNG file: it ends after {len(data)} bytes without its IEND chunk; "
                              "copy or download the file again")
        length, kind = struct.unpack_from(">I4s", data, offset)
        if length > 2**31 - 1 or not kind.isalpha():
            raise InvalidScan(f"corrupt PNG file: no valid chunk at byte {offset}; copy or export the image again")
        end = offset + 12 + length
        if end > len(data):
            raise InvalidScan(f"truncated PNG file: its {kind.decode('ascii')} chunk at byte {offset} needs "
                              f"{length} bytes, {len(data) - offset - 12} are left; copy or download the file again")
        seen.add(kind)
        count += 1
        if kind == b"IEND":
            if end != len(data):
                raise InvalidScan(f"corrupt PNG file: {len(data) - end} bytes follow its IEND chunk; "
                                  "export the image again")
            break
        if count > MAX_PNG_CHUNKS:
            raise InvalidScan(f"a PNG file of more than {MAX_PNG_CHUNKS} chunks: refused; export the image again")
        offset = end
    if b"IDAT" not in seen:
        raise InvalidScan("corrupt PNG file: no IDAT chunk, so no pixels; export the image again")
    if colour == 3 and b"PLTE" not in seen:
        raise InvalidScan("corrupt PNG file: a palette image without its PLTE chunk; export the image again")
    return b"tRNS" in seen


def _check_png_size(header: _PngHeader, limits: Limits) -> None:
    for value, limit, what, setting in ((header.height, limits.rows, "height", "LUNGSQL_MAX_ROWS"),
                                        (header.width, limits.columns, "width", "LUNGSQL_MAX_COLUMNS")):
        if value > limit:
            raise InvalidScan(f"the PNG's {what} is {value} pixels, above the limit of {limit} ({setting}): "
                              f"refused before decoding; raise {setting} if this is a real image")
    size = header.width * header.height * header.decoded_channels * (2 if header.bit_depth == 16 else 1)
    if size > limits.decoded_bytes:
        raise InvalidScan(f"the PNG's {header.width} x {header.height} pixels decode to {size / 1e6:.0f} MB, above "
                          f"the limit of {limits.decoded_bytes / 1e6:.0f} MB (LUNGSQL_MAX_DECODED_BYTES): refused "
                          "before decoding; raise LUNGSQL_MAX_DECODED_BYTES if this is a real image")


def _decode_png(data: bytes, header: _PngHeader) -> np.ndarray:
    try:
        import cv2
    except ImportError:
        raise ConfigurationError("decoding PNG radiographs needs OpenCV, which is not installed",
                                 hint="install the ml extra: pip install 'lungsql[ml]'") from None

    pixels = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if pixels is None:
        raise InvalidScan("cannot decode the PNG's pixels (a corrupt or cut-short image stream); "
                          "copy or export the image again")
    if pixels.shape[:2] != (header.height, header.width):
        raise InvalidScan(f"the PNG decodes to {pixels.shape[1]} x {pixels.shape[0]} pixels, its IHDR says "
                          f"{header.width} x {header.height}: a corrupt file; export the image again")
    if pixels.dtype == np.uint8:
        scale = np.float32(1 / 255)
    elif pixels.dtype == np.uint16:
        scale = np.float32(1 / 65535)
    else:
        raise InvalidScan(f"the PNG decodes to {pixels.dtype} samples, not 8 or 16 bits: export the image again")
    if pixels.ndim == 3 and pixels.shape[2] == 1:
        pixels = pixels[:, :, 0]
    if pixels.ndim == 2:
        return np.multiply(pixels, scale, dtype=np.float32)
    channels = pixels.shape[2]
    if channels == 2:  # gray and alpha
        return np.multiply(pixels[:, :, 0], scale, dtype=np.float32)
    if channels not in (3, 4):
        raise InvalidScan(f"the PNG decodes to {channels} channels: export the image again")
    # OpenCV's order is blue, green, red (alpha): the luminance of ITU-R BT.601, OpenCV's own for gray.
    colour = np.multiply(pixels[:, :, :3], scale, dtype=np.float32)
    return cv2.cvtColor(colour, cv2.COLOR_BGR2GRAY)


def _base_name(name: str) -> str:
    # PureWindowsPath splits at both / and \, so a name sent from any system gives its base name.
    return PureWindowsPath(str(name or "")).name.strip()


# ----------------------------------------------------------------------------- DICOM


def _dicom_image(data: bytes, limits: Limits) -> _DicomImage:
    """The parsed dataset of one monochrome radiograph frame within the limits, else InvalidScan."""
    if not data:
        raise InvalidScan("empty file (0 bytes): a chest radiograph is a PNG or a DICOM file")
    try:
        ds = parse(data, limits)
    except InvalidScan as exc:
        if exc.message.startswith("not a DICOM file"):
            raise InvalidScan(f"neither a PNG nor a DICOM file ({_looks_like(data)}): a chest radiograph "
                              "is a PNG or a DICOM CR/DX file") from None
        raise
    if not len(ds):
        raise InvalidScan("truncated or corrupt DICOM file: no data element could be read after its file meta "
                          "information; copy or export the file again")
    modality = _text(ds, "Modality")
    sop_class = _text(ds, "SOPClassUID") or ""
    if (modality or "").upper() == "CT" or sop_class in CT_SOP_CLASSES:
        raise InvalidScan("a CT slice, not a chest radiograph: load it with `lungsql ingest` of its CT folder")
    if sop_class == SECONDARY_CAPTURE:
        ok = (modality or "").upper() in ("CR", "DX")
    else:
        ok = (modality or "").upper() in RADIOGRAPH_MODALITIES or sop_class in RADIOGRAPH_SOP_CLASSES
    if not ok:
        kind = f"the SOP class is {UID(sop_class).name}" if sop_class else "there is no SOPClassUID"
        shown = repr(modality) if modality else "missing"
        raise InvalidScan(f"not a radiograph: Modality is {shown} and {kind}; lungsql reads CR and DX images "
                          "(Modality CR, DX, RG or DR) as chest radiographs")
    if "PixelData" not in ds:
        raise InvalidScan("no pixel data (PixelData is absent; a file cut short ends this way too): "
                          "export the image again")
    g = geometry(ds)  # each a positive whole number, else InvalidScan naming it
    if g.frames != 1:
        raise InvalidScan(f"NumberOfFrames is {g.frames}: a radiograph is one frame; export each image "
                          "as its own file")
    photometric = (_text(ds, "PhotometricInterpretation") or "").upper()
    if g.samples != 1:
        raise InvalidScan(f"SamplesPerPixel is {g.samples} ({photometric or 'no PhotometricInterpretation'}): "
                          "a colour image, not a radiograph; lungsql reads MONOCHROME1 and MONOCHROME2 images")
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise InvalidScan(f"PhotometricInterpretation is {photometric!r}: lungsql reads MONOCHROME1 and "
                          "MONOCHROME2 radiographs")
    if "BitsAllocated" not in ds or g.bits not in (8, 16):
        raise InvalidScan(f"BitsAllocated is {ds.get('BitsAllocated')}: lungsql reads radiographs of 8 or "
                          "16 bits a pixel")
    stored = ds.get("BitsStored")
    if stored is None or not isinstance(stored, int) or not 1 <= stored <= g.bits:
        raise InvalidScan(f"BitsStored is {stored}, not 1 to BitsAllocated ({g.bits}): a corrupt header; "
                          "export the image again")
    limits.check(g.rows, g.columns, 1, 1, g.bits)
    syntax = _text(getattr(ds, "file_meta", Dataset()), "TransferSyntaxUID")
    if not UID(syntax or "1.2.840.10008.1.2").is_compressed:
        expected, actual = g.rows * g.columns * g.bits // 8, len(ds.PixelData)
        if actual < expected:
            raise InvalidScan(f"truncated pixel data: {actual} of {expected} bytes; copy or export the file again")
    return _DicomImage(ds, g.rows, g.columns, stored, photometric, modality, syntax)


def _looks_like(data: bytes) -> str:
    """What a file that is not a radiograph seems to be, in a few words."""
    for signature, what in ((b"\xff\xd8\xff", "a JPEG image"), (b"II*\x00", "a TIFF image"),
                            (b"MM\x00*", "a TIFF image"), (b"GIF8", "a GIF image"), (b"%PDF", "a PDF document"),
                            (b"PK\x03\x04", "a ZIP archive"), (b"\x1f\x8b", "a gzip archive")):
        if data.startswith(signature):
            return what
    return f"{len(data)} bytes, no PNG signature and no DICOM header"


def _decode_dicom(image: _DicomImage) -> np.ndarray:
    ds = image.ds
    syntax = UID(image.syntax or "1.2.840.10008.1.2")
    if syntax.is_compressed:
        _check_codestream(ds, image)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            stored = ds.pixel_array
    except Exception as exc:  # pydicom raises many kinds when a codec is missing or the data is damaged
        raise InvalidScan(f"cannot decode the pixels ({syntax.name}): {_first_line(exc)}; {CODECS_HINT}") from None
    if stored.shape != (image.rows, image.columns):
        raise InvalidScan(f"the pixels decode to shape {list(stored.shape)}, the header says "
                          f"{image.rows} x {image.columns}: a corrupt file; export the image again")
    values = _modality_values(ds, stored)
    shown = _voi_lut(ds, values)
    if shown is None:
        shown = _windowed(ds, values)
    if shown is None:
        shown = _percentile_window(values)
    if image.photometric == "MONOCHROME1":  # the lowest value is white
        np.subtract(np.float32(1), shown, out=shown)
    return np.ascontiguousarray(shown, dtype=np.float32)


def _check_codestream(ds: Dataset, image: _DicomImage) -> None:
    """InvalidScan when the compressed frame claims more pixels than the header (its decoder would
    allocate what the frame claims)."""
    from pydicom.encaps import generate_frames

    try:
        frame = next(generate_frames(ds.PixelData, number_of_frames=1))
    except Exception:
        return  # pydicom's decoder says what is wrong with the encapsulation
    size = frame_size(frame)
    if size is not None and (size[0] > image.rows or size[1] > image.columns):
        raise InvalidScan(f"the compressed frame claims {size[0]} x {size[1]} pixels, the header "
                          f"{image.rows} x {image.columns}: refused before decoding")


def _modality_values(ds: Dataset, stored: np.ndarray) -> np.ndarray:
    """The Modality LUT applied: pydicom's for a Modality LUT Sequence, else slope x stored + intercept."""
    if ds.get("ModalityLUTSequence"):
        from pydicom.pixels import apply_modality_lut

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return apply_modality_lut(stored, ds)
    slope = _number(ds, "RescaleSlope", 1.0)
    intercept = _number(ds, "RescaleIntercept", 0.0)
    if not (math.isfinite(slope) and math.isfinite(intercept)) or slope == 0:
        raise InvalidScan(f"RescaleSlope {slope:g} and RescaleIntercept {intercept:g} do not map the pixels "
                          "(a finite intercept and a finite slope other than 0): a corrupt header")
    if slope == 1 and intercept == 0:
        return stored
    values = stored.astype(np.float32)
    values *= np.float32(slope)
    values += np.float32(intercept)
    return values


def _voi_lut(ds: Dataset, values: np.ndarray) -> np.ndarray | None:
    """The first VOI LUT applied (pydicom's apply_voi), 0 to 1 from its darkest to brightest entry;
    None without one, or with a LUT that cannot be applied (a warning says so)."""
    if not ds.get("VOILUTSequence"):
        return None
    from pydicom.pixels import apply_voi

    try:
        item = ds.VOILUTSequence[0]
        entries, first = int(item.LUTDescriptor[0]) or 65536, int(item.LUTDescriptor[1])
        if not np.issubdtype(values.dtype, np.integer):
            values = np.rint(values).astype(np.int64)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            table = apply_voi(np.arange(first, first + entries, dtype=np.int64), ds)
            shown = apply_voi(values, ds)
    except Exception as exc:  # a damaged LUT: the window or the percentiles instead
        warnings.warn(f"the VOI LUT cannot be applied ({_first_line(exc)}): displaying with the window instead",
                      stacklevel=4)
        return None
    low, high = float(table.min()), float(table.max())
    if high <= low:
        return np.zeros(values.shape, np.float32)
    return _scaled(shown, low, high)


def _windowed(ds: Dataset, values: np.ndarray) -> np.ndarray | None:
    """The first window (PS3.3 C.11.2.1.2, pydicom's apply_windowing) as 0 to 1; None without a usable one."""
    centers, widths = _numbers(ds, "WindowCenter"), _numbers(ds, "WindowWidth")
    if not centers or not widths:
        return None
    center, width = centers[0], widths[0]
    function = (_text(ds, "VOILUTFunction") or "LINEAR").upper()
    if function not in ("LINEAR", "LINEAR_EXACT", "SIGMOID"):
        warnings.warn(f"VOILUTFunction {function!r} is not LINEAR, LINEAR_EXACT or SIGMOID: windowing "
                      "linearly", stacklevel=4)
        function = "LINEAR"
    if not (math.isfinite(center) and math.isfinite(width)) or width < (1 if function == "LINEAR" else 1e-12):
        warnings.warn(f"WindowWidth {width:g} is not a window ({function}): displaying from the 0.5 and "
                      "99.5 percentiles instead", stacklevel=4)
        return None
    x = values.astype(np.float32)
    if function == "SIGMOID":
        x -= np.float32(center)
        x *= np.float32(-4 / width)
        with np.errstate(over="ignore"):  # far below the centre: exp is inf, the value 0
            np.exp(x, out=x)
        x += np.float32(1)
        return np.reciprocal(x, out=x)
    if function == "LINEAR":
        center, width = center - 0.5, width - 1
    if width == 0:  # LINEAR with width 1: a threshold at the centre
        return (x > np.float32(center)).astype(np.float32)
    x -= np.float32(center - width / 2)
    x *= np.float32(1 / width)
    return np.clip(x, 0, 1, out=x)


def _percentile_window(values: np.ndarray) -> np.ndarray:
    """0 to 1 between the 0.5 and 99.5 percentiles of the pixel values (the min and max when those agree)."""
    low, high = (float(v) for v in np.percentile(values, _PERCENTILES))
    if high <= low:
        low, high = float(values.min()), float(values.max())
    if high <= low:
        return np.zeros(values.shape, np.float32)
    return _scaled(values, low, high)


def _scaled(values: np.ndarray, low: float, high: float) -> np.ndarray:
    x = values.astype(np.float32)
    x -= np.float32(low)
    x *= np.float32(1 / (high - low))
    return np.clip(x, 0, 1, out=x)


def _spacing(ds: Dataset) -> float | None:
    """ImagerPixelSpacing, else PixelSpacing: the first value (between rows), if positive and finite."""
    for keyword in ("ImagerPixelSpacing", "PixelSpacing"):
        numbers = _numbers(ds, keyword)
        if numbers and math.isfinite(numbers[0]) and numbers[0] > 0:
            return numbers[0]
    return None


def _numbers(ds: Dataset, keyword: str) -> list[float] | None:
    """A numeric value (one or several) as floats, None when absent or not numbers."""
    try:
        value = ds.get(keyword)
        if value is None or value == "":
            return None
        values = [value] if isinstance(value, (int, float, str, bytes)) else list(value)
        return [float(v) for v in values] or None
    except Exception:  # pydicom converts values when they are read, and raises on junk
        return None


def _number(ds: Dataset, keyword: str, default: float) -> float:
    numbers = _numbers(ds, keyword)
    return numbers[0] if numbers else default


def _text(ds: Dataset, keyword: str) -> str | None:
    """A text value, stripped of padding and NULs, at most 256 characters; None when empty."""
    try:
        value = ds.get(keyword)
    except Exception:
        return None
    if value is None:
        return None
    text = "\\".join(str(v) for v in value) if not isinstance(value, (str, bytes)) and hasattr(value, "__iter__") \
        else str(value)
    return text.replace("\x00", "").strip()[:256] or None


@contextmanager
def _reasons() -> Iterator[None]:
    """Turn whatever a malformed file makes a library raise into InvalidScan with a one-line reason."""
    try:
        yield
    except LungSQLError:
        raise
    except MemoryError:
        raise InvalidScan("not enough memory to read this radiograph") from None
    except Exception as exc:  # a malformed file can make any library raise anything
        text = _first_line(exc)
        raise InvalidScan(f"cannot read as a radiograph: {type(exc).__name__}"
                          + (f": {text}" if text != type(exc).__name__ else "")) from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:200]
