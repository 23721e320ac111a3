"""Reading chest radiographs (lungsql.dicom.radiograph): real CR files, DX files built here, PNG files of
every colour type, and hostile files that must each be refused with a one-line reason before decoding."""

from __future__ import annotations

import hashlib
import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.pixels import apply_modality_lut, apply_voi_lut, apply_windowing
from pydicom.sequence import Sequence
from pydicom.uid import (PYDICOM_IMPLEMENTATION_UID, DigitalXRayImageStorageForPresentation, ExplicitVRLittleEndian,
                         SecondaryCaptureImageStorage)

from lungsql.dicom import synth
from lungsql.dicom.radiograph import RadiographRecord, decode_radiograph, read_radiograph
from lungsql.dicom.reader import Limits
from lungsql.errors import InvalidScan

cv2 = pytest.importorskip("cv2")

LIMITS = Limits(rows=8192, columns=8192, frames=4096, decoded_bytes=1 << 30)
RG1_UNCR, RG1_J2KR = "RG1_UNCR.dcm", "RG1_J2KR.dcm"


def pydicom_file(name: str) -> bytes:
    return Path(get_testdata_file(name)).read_bytes()


def refused(data: bytes, name: str = "image.png", limits: Limits = LIMITS) -> str:
    """The reason read_radiograph gives (decode_radiograph must refuse too): one line."""
    with pytest.raises(InvalidScan) as read:
        read_radiograph(data, name, limits)
    with pytest.raises(InvalidScan) as decode:
        decode_radiograph(data, limits)
    assert read.value.message == decode.value.message
    assert "\n" not in read.value.message and read.value.message
    return read.value.message


# ----------------------------------------------------------------------------- DICOM files built here


def ramp(rows: int = 64, columns: int = 80, top: int = 4095) -> np.ndarray:
    """Stored values from 0 to `top` along the rows, different in every pixel."""
    values = np.linspace(0, top, rows * columns).round().astype(np.uint16)
    return values.reshape(rows, columns)


def dx_dataset(pixels: np.ndarray, **attributes) -> Dataset:
    """A DX For Presentation dataset, MONOCHROME2, 12 bits stored in 16, windowed; `attributes` override
    (None deletes one)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = DigitalXRayImageStorageForPresentation
    meta.MediaStorageSOPInstanceUID = "1.2.826.0.1.3680043.8.498.11"
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = DigitalXRayImageStorageForPresentation, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = "1.2.826.0.1.3680043.8.498.12", "1.2.826.0.1.3680043.8.498.13"
    ds.Modality, ds.PatientID, ds.PatientSex, ds.PatientAge = "DX", "00042", "M", "058Y"
    ds.ViewPosition, ds.ImagerPixelSpacing, ds.PixelSpacing = "AP", [0.139, 0.139], [0.15, 0.15]
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows, ds.Columns = pixels.shape[-2:]
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.WindowCenter, ds.WindowWidth = 2048, 1024
    for keyword, value in attributes.items():
        if value is None:
            delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    ds.PixelData = pixels.astype("<u2").tobytes()
    return ds


def file_bytes(ds: Dataset) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def displayed(ds: Dataset, function: str = "LINEAR") -> np.ndarray:
    """pydicom's own display pipeline, put on 0..1: the Modality LUT, then apply_windowing, whose output
    runs over the stored range (mapped by the rescale) of the header."""
    ds = pydicom.dcmread(io.BytesIO(file_bytes(ds)))
    values = apply_modality_lut(ds.pixel_array, ds)
    shown = apply_windowing(values, ds)
    low, high = 0, 2 ** int(ds.BitsStored) - 1
    if "RescaleSlope" in ds:
        low, high = sorted((low * ds.RescaleSlope + ds.RescaleIntercept, high * ds.RescaleSlope + ds.RescaleIntercept))
    return (shown - low) / (high - low)


# ----------------------------------------------------------------------------- real computed radiographs


def test_the_pydicom_chest_cr_is_read_from_its_header():
    data = pydicom_file(RG1_UNCR)
    record = read_radiograph(data, "RG1_UNCR.dcm", LIMITS)
    ds = pydicom.dcmread(io.BytesIO(data))
    assert isinstance(record, RadiographRecord)
    assert (record.format, record.modality, record.photometric) == ("dicom", "CR", "MONOCHROME1")
    assert (record.rows, record.columns, record.bits_stored) == (1955, 1841, 15)
    assert record.image_index == ds.SOPInstanceUID and record.patient_id == ds.PatientID
    assert record.data is data or record.data == data
    assert record.sha256 == hashlib.sha256(data).digest() and len(record.sha256) == 32
    assert record.view_position == "PA" and record.sex == "F" and record.age_years is None
    assert record.pixel_spacing_mm is None  # its PixelSpacing is [0.000, 0.000]
    assert record.study_instance_uid == ds.StudyInstanceUID
    assert record.series_instance_uid == ds.SeriesInstanceUID
    assert record.transfer_syntax_uid == "1.2.840.10008.1.2.1"
    assert read_radiograph(data, "RG1_UNCR.dcm") == record  # the limits of the settings by default


def test_the_jpeg2000_copy_decodes_to_the_same_displayed_image():
    uncompressed = decode_radiograph(pydicom_file(RG1_UNCR), LIMITS)
    record = read_radiograph(pydicom_file(RG1_J2KR), "RG1_J2KR.dcm", LIMITS)
    assert record.transfer_syntax_uid == "1.2.840.10008.1.2.4.90"  # JPEG 2000 lossless
    assert (record.rows, record.columns, record.photometric) == (1955, 1841, "MONOCHROME1")
    compressed = decode_radiograph(pydicom_file(RG1_J2KR), LIMITS)
    assert uncompressed.shape == compressed.shape == (1955, 1841)
    assert uncompressed.dtype == compressed.dtype == np.float32
    assert 0 <= uncompressed.min() < uncompressed.max() <= 1
    np.testing.assert_allclose(compressed, uncompressed, atol=1e-6)


def test_the_cr_is_windowed_as_pydicom_windows_it_and_inverted():
    ds = pydicom.dcmread(io.BytesIO(pydicom_file(RG1_UNCR)))
    shown = decode_radiograph(pydicom_file(RG1_UNCR), LIMITS)
    # Its window (15000, 30000) over 15 stored bits, then MONOCHROME1: the lowest value is white.
    expected = 1 - apply_voi_lut(ds.pixel_array, ds) / (2 ** 15 - 1)
    np.testing.assert_allclose(shown, expected, atol=1e-5)


def test_monochrome1_is_the_mirror_of_the_same_pixels_read_as_monochrome2():
    ds = pydicom.dcmread(io.BytesIO(pydicom_file(RG1_UNCR)))
    ds.PhotometricInterpretation = "MONOCHROME2"
    as_monochrome2 = decode_radiograph(file_bytes(ds), LIMITS)
    as_monochrome1 = decode_radiograph(pydicom_file(RG1_UNCR), LIMITS)
    np.testing.assert_allclose(as_monochrome1, 1 - as_monochrome2, atol=1e-6)


def test_the_chest_is_shown_with_dark_lungs_and_a_bright_spine():
    shown = decode_radiograph(pydicom_file(RG1_UNCR), LIMITS)
    rows, columns = shown.shape

    def region(top, bottom, left, right):
        return float(shown[int(top * rows):int(bottom * rows), int(left * columns):int(right * columns)].mean())

    right_lung, left_lung = region(0.2, 0.45, 0.15, 0.35), region(0.2, 0.45, 0.62, 0.82)
    spine = region(0.2, 0.6, 0.46, 0.54)
    assert right_lung < spine - 0.15 and left_lung < spine - 0.15, (right_lung, left_lung, spine)


# ----------------------------------------------------------------------------- DX files built here


def test_a_dx_is_described_from_its_header():
    record = read_radiograph(file_bytes(dx_dataset(ramp())), "ignored.dcm", LIMITS)
    assert (record.format, record.modality, record.photometric) == ("dicom", "DX", "MONOCHROME2")
    assert (record.rows, record.columns, record.bits_stored) == (64, 80, 12)
    assert record.image_index == "1.2.826.0.1.3680043.8.498.11" and record.patient_id == "00042"
    assert record.sex == "M" and record.age_years == 58 and record.view_position == "AP"
    assert record.pixel_spacing_mm == pytest.approx(0.139)  # ImagerPixelSpacing before PixelSpacing
    assert record.study_instance_uid == "1.2.826.0.1.3680043.8.498.12"
    no_imager = read_radiograph(file_bytes(dx_dataset(ramp(), ImagerPixelSpacing=None)), "x.dcm", LIMITS)
    assert no_imager.pixel_spacing_mm == pytest.approx(0.15)


@pytest.mark.parametrize("age, years", [("006M", 0.5), ("010W", 0.19), ("003D", 0.01), ("200Y", None)])
def test_dicom_ages_in_months_weeks_and_days(age, years):
    record = read_radiograph(file_bytes(dx_dataset(ramp(), PatientAge=age)), "x.dcm", LIMITS)
    assert record.age_years == (None if years is None else pytest.approx(years, abs=0.01))


def test_a_dx_is_shown_through_its_window():
    pixels = ramp()
    shown = decode_radiograph(file_bytes(dx_dataset(pixels)), LIMITS)
    assert shown.shape == (64, 80) and shown.dtype == np.float32
    assert np.all(shown[pixels <= 1535] == 0) and np.all(shown[pixels >= 2561] == 1)  # the window 1536..2560
    assert shown[(pixels > 2040) & (pixels < 2056)] == pytest.approx(0.5, abs=0.01)
    np.testing.assert_allclose(shown, displayed(dx_dataset(pixels)), atol=1e-5)


@pytest.mark.parametrize("function, slope, intercept", [("LINEAR", None, None), ("LINEAR_EXACT", None, None),
                                                        ("SIGMOID", None, None), ("LINEAR", 2.0, -1000.0),
                                                        ("SIGMOID", 0.5, 100.0)])
def test_windows_agree_with_pydicoms_apply_windowing(function, slope, intercept):
    extra = {} if slope is None else {"RescaleSlope": slope, "RescaleIntercept": intercept,
                                      "WindowCenter": 2048 * slope + intercept, "WindowWidth": 1024 * slope}
    ds = dx_dataset(ramp(), VOILUTFunction=function, **extra)
    shown = decode_radiograph(file_bytes(ds), LIMITS)
    np.testing.assert_allclose(shown, displayed(ds), atol=1e-5)
    assert shown.min() >= 0 and shown.max() <= 1


def test_the_first_of_several_windows_is_used():
    ds = dx_dataset(ramp(), WindowCenter=[2048, 1000], WindowWidth=[1024, 200])
    np.testing.assert_allclose(decode_radiograph(file_bytes(ds), LIMITS), displayed(dx_dataset(ramp())),
                               atol=1e-5)


def test_a_voi_lut_comes_before_the_window():
    item = Dataset()
    item.LUTDescriptor = [4096, 0, 16]
    item.add_new(0x00283006, "US", [int(round(65535 * (v / 4095) ** 0.5)) for v in range(4096)])  # LUTData: sqrt
    ds = dx_dataset(ramp(), VOILUTSequence=Sequence([item]))
    shown = decode_radiograph(file_bytes(ds), LIMITS)
    parsed = pydicom.dcmread(io.BytesIO(file_bytes(ds)))
    expected = apply_voi_lut(parsed.pixel_array, parsed) / 65535  # prefer_lut: the LUT, not the window
    np.testing.assert_allclose(shown, expected, atol=1e-6)
    assert shown[0, 0] == 0 and shown[-1, -1] == 1 and shown[32, 0] > 0.69  # sqrt(0.5), not windowed to 0.5


def test_without_a_window_the_percentiles_are_the_window():
    pixels = ramp()
    shown = decode_radiograph(file_bytes(dx_dataset(pixels, WindowCenter=None, WindowWidth=None)), LIMITS)
    low, high = np.percentile(pixels, [0.5, 99.5])
    np.testing.assert_allclose(shown, np.clip((pixels - low) / (high - low), 0, 1), atol=1e-5)
    assert (shown == 0).mean() == pytest.approx(0.005, abs=0.001) and (shown == 1).mean() == pytest.approx(0.005,
                                                                                                     abs=0.001)


def test_a_window_that_is_no_window_warns_and_the_percentiles_are_used():
    without = decode_radiograph(file_bytes(dx_dataset(ramp(), WindowCenter=None, WindowWidth=None)), LIMITS)
    with pytest.warns(UserWarning, match="WindowWidth 0"):
        shown = decode_radiograph(file_bytes(dx_dataset(ramp(), WindowWidth=0)), LIMITS)
    np.testing.assert_array_equal(shown, without)


def test_a_constant_image_is_black():
    shown = decode_radiograph(file_bytes(dx_dataset(np.full((8, 8), 700, np.uint16), WindowCenter=None,
                                                    WindowWidth=None)), LIMITS)
    assert shown.shape == (8, 8) and not shown.any()


def test_an_8_bit_monochrome1_rg_radiograph():
    pixels = ramp(16, 16, 255).astype(np.uint8)
    ds = dx_dataset(pixels, Modality="RG", BitsAllocated=8, BitsStored=8, HighBit=7, WindowCenter=None,
                    WindowWidth=None, PhotometricInterpretation="MONOCHROME1")
    ds.PixelData = pixels.tobytes()
    record = read_radiograph(file_bytes(ds), "x.dcm", LIMITS)
    assert (record.modality, record.bits_stored, record.photometric) == ("RG", 8, "MONOCHROME1")
    shown = decode_radiograph(file_bytes(ds), LIMITS)
    assert shown[0, 0] == 1 and shown[-1, -1] == 0  # the darkest stored value is white


def test_a_secondary_capture_is_a_radiograph_only_with_modality_cr_or_dx():
    sc = {"SOPClassUID": SecondaryCaptureImageStorage}
    assert read_radiograph(file_bytes(dx_dataset(ramp(), **sc)), "x.dcm", LIMITS).modality == "DX"
    reason = refused(file_bytes(dx_dataset(ramp(), Modality="OT", **sc)))
    assert "not a radiograph" in reason and "'OT'" in reason and "Secondary Capture" in reason


def test_a_radiograph_sop_class_is_enough_without_a_usual_modality():
    record = read_radiograph(file_bytes(dx_dataset(ramp(), Modality="OT")), "x.dcm", LIMITS)
    assert record.modality == "OT"


# ----------------------------------------------------------------------------- PNG files


def chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


ADAM7 = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2))


def handmade_png(samples: np.ndarray, colour: int, depth: int = 8, palette: bytes | None = None,
                 interlace: bool = False, ihdr_size: tuple[int, int] | None = None) -> bytes:
    """A PNG written here, byte by byte: `samples` (height, width[, channels]) of 8 or 16 bits, filter 0,
    Adam7 when `interlace`; `ihdr_size` (width, height) to claim another size than the pixels'."""
    height, width = samples.shape[:2]
    samples = samples.reshape(height, width, -1).astype(">u2" if depth == 16 else "u1")
    passes = ADAM7 if interlace else ((0, 0, 1, 1),)
    raw = bytearray()
    for x0, y0, dx, dy in passes:
        part = samples[y0::dy, x0::dx]
        if part.size:
            for row in part:
                raw += b"\x00" + row.tobytes()
    width, height = ihdr_size or (width, height)
    ihdr = struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0, int(interlace))
    body = chunk(b"IHDR", ihdr) + (chunk(b"PLTE", palette) if palette else b"")
    return b"\x89PNG\r\n\x1a\n" + body + chunk(b"IDAT", zlib.compress(bytes(raw))) + chunk(b"IEND", b"")


def encoded(image: np.ndarray) -> bytes:
    ok, buffer = cv2.imencode(".png", image)
    assert ok
    return buffer.tobytes()


def luminance(bgr: np.ndarray, scale: float) -> np.ndarray:
    b, g, r = (bgr[..., i].astype(np.float64) / scale for i in range(3))
    return 0.299 * r + 0.587 * g + 0.114 * b


@pytest.fixture(scope="module")
def rng():
    return np.random.default_rng(14)


def test_an_8_bit_gray_png_of_the_chestxray14_size(rng):
    gray = rng.integers(0, 256, (1024, 1024), dtype=np.uint8)
    data = encoded(gray)
    record = read_radiograph(data, "/data/images_001/images/00000001_000.png", LIMITS)
    assert (record.image_index, record.format, record.photometric) == ("00000001_000.png", "png", "GRAY")
    assert (record.rows, record.columns, record.bits_stored) == (1024, 1024, 8)
    assert record.patient_id is None and record.modality is None and record.pixel_spacing_mm is None
    assert record.sha256 == hashlib.sha256(data).digest() and record.data == data
    assert read_radiograph(data, "C:\\nih\\00000001_000.png", LIMITS).image_index == "00000001_000.png"
    shown = decode_radiograph(data, LIMITS)
    assert shown.shape == (1024, 1024) and shown.dtype == np.float32
    np.testing.assert_allclose(shown, gray / 255, atol=1e-6)


def test_a_16_bit_gray_png(rng):
    gray = rng.integers(0, 65536, (50, 70), dtype=np.uint16)
    data = encoded(gray)
    record = read_radiograph(data, "x.png", LIMITS)
    assert (record.photometric, record.bits_stored, record.rows, record.columns) == ("GRAY", 16, 50, 70)
    np.testing.assert_allclose(decode_radiograph(data, LIMITS), gray / 65535, atol=1e-6)


def test_an_rgb_png_is_shown_as_its_luminance(rng):
    bgr = rng.integers(0, 256, (40, 30, 3), dtype=np.uint8)
    data = encoded(bgr)
    assert read_radiograph(data, "x.png", LIMITS).photometric == "RGB"
    np.testing.assert_allclose(decode_radiograph(data, LIMITS), luminance(bgr, 255), atol=1e-5)


def test_an_rgba_png_drops_its_alpha(rng):
    bgra = rng.integers(0, 256, (40, 30, 4), dtype=np.uint8)
    data = encoded(bgra)
    record = read_radiograph(data, "x.png", LIMITS)
    assert (record.photometric, record.bits_stored) == ("RGBA", 8)
    np.testing.assert_allclose(decode_radiograph(data, LIMITS), luminance(bgra, 255), atol=1e-5)


def test_a_16_bit_rgb_png(rng):
    bgr = rng.integers(0, 65536, (20, 10, 3), dtype=np.uint16)
    data = encoded(bgr)
    assert read_radiograph(data, "x.png", LIMITS).bits_stored == 16
    np.testing.assert_allclose(decode_radiograph(data, LIMITS), luminance(bgr, 65535), atol=1e-5)


def test_a_palette_png_is_shown_as_the_luminance_of_its_colours(rng):
    colours = rng.integers(0, 256, (16, 3), dtype=np.uint8)  # red, green, blue
    indexes = rng.integers(0, 16, (24, 36), dtype=np.uint8)
    data = handmade_png(indexes, colour=3, palette=colours.tobytes())
    record = read_radiograph(data, "x.png", LIMITS)
    assert (record.photometric, record.bits_stored, record.rows, record.columns) == ("PALETTE", 8, 24, 36)
    np.testing.assert_allclose(decode_radiograph(data, LIMITS), luminance(colours[indexes][..., ::-1], 255),
                               atol=1e-5)


def test_a_gray_png_with_alpha_is_shown_as_its_gray(rng):
    samples = rng.integers(0, 256, (12, 9, 2), dtype=np.uint8)
    data = handmade_png(samples, colour=4)
    assert read_radiograph(data, "x.png", LIMITS).photometric == "GRAY_ALPHA"
    np.testing.assert_allclose(decode_radiograph(data, LIMITS), samples[..., 0] / 255, atol=1e-5)


def packed_gray_png(values: np.ndarray, depth: int) -> bytes:
    """A gray PNG of 1, 2 or 4 bits a pixel, several pixels a byte, each row padded to a whole byte."""
    height, width = values.shape
    per_byte = 8 // depth
    raw = bytearray()
    for row in values:
        raw.append(0)  # filter type None
        padded = np.concatenate([row, np.zeros((-width) % per_byte, row.dtype)])
        for start in range(0, len(padded), per_byte):
            byte = 0
            for value in padded[start:start + per_byte]:
                byte = (byte << depth) | int(value)
            raw.append(byte)
    ihdr = struct.pack(">IIBBBBB", width, height, depth, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(bytes(raw)))
            + chunk(b"IEND", b""))


@pytest.mark.parametrize("depth", [1, 2, 4])
def test_a_gray_png_of_fewer_than_8_bits(rng, depth):
    values = rng.integers(0, 2 ** depth, (5, 7))
    data = packed_gray_png(values, depth)
    assert read_radiograph(data, "x.png", LIMITS).bits_stored == depth
    np.testing.assert_allclose(decode_radiograph(data, LIMITS), values / (2 ** depth - 1), atol=1e-6)


def test_an_interlaced_png_decodes_as_the_same_image(rng):
    gray = rng.integers(0, 65536, (13, 11), dtype=np.uint16)
    interlaced = handmade_png(gray, colour=0, depth=16, interlace=True)
    assert interlaced[28] == 1  # the interlace method of IHDR: Adam7
    assert read_radiograph(interlaced, "x.png", LIMITS).rows == 13
    np.testing.assert_allclose(decode_radiograph(interlaced, LIMITS), gray / 65535, atol=1e-6)
    np.testing.assert_array_equal(decode_radiograph(interlaced, LIMITS),
                                  decode_radiograph(handmade_png(gray, colour=0, depth=16), LIMITS))


# ----------------------------------------------------------------------------- hostile files


def test_empty_and_random_bytes_are_refused():
    assert "empty file" in refused(b"")
    random_bytes = np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes()
    assert "neither a PNG nor a DICOM file" in refused(random_bytes)
    assert "a JPEG image" in refused(b"\xff\xd8\xff\xe0" + bytes(100))


def test_a_truncated_png_is_refused(rng):
    data = encoded(rng.integers(0, 256, (64, 64), dtype=np.uint8))
    assert "truncated PNG" in refused(data[:len(data) // 2])
    assert "truncated PNG" in refused(data[:20])
    assert "truncated PNG" in refused(data[:5])
    assert "4 bytes follow its IEND chunk" in refused(data + b"junk")


def test_a_png_whose_pixel_stream_is_damaged_passes_the_header_check_and_fails_to_decode(rng):
    gray = rng.integers(0, 256, (64, 64), dtype=np.uint8)
    good = handmade_png(gray, colour=0)
    start = good.index(b"IDAT") + 4
    length = struct.unpack(">I", good[start - 8:start - 4])[0]
    for stream in (b"this is no zlib stream", good[start:start + length // 2]):  # junk, then a stream cut short
        data = good[:start - 8] + chunk(b"IDAT", stream) + chunk(b"IEND", b"")
        read_radiograph(data, "x.png", LIMITS)  # the header is whole
        with pytest.raises(InvalidScan, match="cannot decode the PNG"):
            decode_radiograph(data, LIMITS)


def test_a_png_with_a_bad_ihdr_crc_is_refused(rng):
    data = bytearray(encoded(rng.integers(0, 256, (8, 8), dtype=np.uint8)))
    data[29] ^= 0xFF  # the first byte of IHDR's CRC
    assert "IHDR chunk fails its CRC check" in refused(bytes(data))
    data = bytearray(encoded(rng.integers(0, 256, (8, 8), dtype=np.uint8)))
    data[19] ^= 0x01  # the width changed, the CRC not
    assert "CRC" in refused(bytes(data))


def test_a_png_claiming_100000_by_100000_pixels_is_refused_before_decoding():
    bomb = handmade_png(np.zeros((1, 1), np.uint8), colour=0, ihdr_size=(100_000, 100_000))
    assert len(bomb) < 100
    assert "height is 100000 pixels, above the limit of 8192 (LUNGSQL_MAX_ROWS)" in refused(bomb)
    wide = handmade_png(np.zeros((1, 1), np.uint8), colour=0, ihdr_size=(100_000, 1))
    assert "width is 100000 pixels, above the limit of 8192 (LUNGSQL_MAX_COLUMNS)" in refused(wide)
    # Within larger row and column limits, the decoded size still is not: 10 GB.
    roomy = Limits(rows=200_000, columns=200_000, frames=1, decoded_bytes=1 << 30)
    reason = refused(bomb, limits=roomy)
    assert "decode to 10000 MB" in reason and "LUNGSQL_MAX_DECODED_BYTES" in reason


def test_a_png_of_a_colour_type_or_depth_png_does_not_know_is_refused():
    data = handmade_png(np.zeros((2, 2), np.uint8), colour=0)
    bad = bytearray(data)
    bad[24:26] = bytes([8, 5])  # colour type 5
    bad[29:33] = struct.pack(">I", zlib.crc32(bytes(bad[12:29])))
    assert "colour type 5" in refused(bytes(bad))
    assert "PLTE" in refused(handmade_png(np.zeros((2, 2), np.uint8), colour=3))  # a palette image without one


def test_a_png_needs_a_name():
    data = handmade_png(np.zeros((2, 2), np.uint8), colour=0)
    with pytest.raises(InvalidScan, match="needs a file name"):
        read_radiograph(data, "", LIMITS)


def test_a_ct_slice_is_sent_to_lungsql_ingest():
    patient = synth.generate_patient(seed=1, index=0, n_slices=1, label=0)
    ds = synth.build_slice_dataset(patient, patient.geometry, 0, np.zeros((16, 16), np.int16))
    reason = refused(synth.dataset_bytes(ds), "slice.dcm")
    assert "a CT slice" in reason and "`lungsql ingest`" in reason and "CT folder" in reason


def test_other_modalities_are_refused():
    reason = refused(pydicom_file("MR_small.dcm"), "mr.dcm")
    assert "not a radiograph" in reason and "'MR'" in reason


def test_a_dicom_of_three_frames_is_refused():
    pixels = np.stack([ramp(16, 16)] * 3)
    ds = dx_dataset(pixels, NumberOfFrames=3)
    reason = refused(file_bytes(ds), "x.dcm")
    assert "NumberOfFrames is 3" in reason and "one frame" in reason


def test_an_rgb_dicom_is_refused():
    ds = dx_dataset(ramp(16, 16), SamplesPerPixel=3, PhotometricInterpretation="RGB", PlanarConfiguration=0,
                    BitsAllocated=8, BitsStored=8, HighBit=7)
    ds.PixelData = np.zeros((16, 16, 3), np.uint8).tobytes()
    reason = refused(file_bytes(ds), "x.dcm")
    assert "SamplesPerPixel is 3" in reason and "colour image" in reason


@pytest.mark.parametrize("attributes, expected", [
    ({"PhotometricInterpretation": "PALETTE COLOR"}, "PhotometricInterpretation is 'PALETTE COLOR'"),
    ({"BitsAllocated": 32, "BitsStored": 32}, "BitsAllocated is 32"),
    ({"BitsStored": 17}, "BitsStored is 17"),
    ({"Rows": 9000}, "Rows is 9000, above the limit of 8192"),
    ({"SOPInstanceUID": None}, "missing SOPInstanceUID"),
    ({"PixelData": None}, "no pixel data"),
])
def test_a_dicom_header_that_is_not_one_monochrome_radiograph_is_refused(attributes, expected):
    ds = dx_dataset(ramp(16, 16))
    for keyword, value in attributes.items():
        if value is None:
            delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    with pytest.raises(InvalidScan) as read:
        read_radiograph(file_bytes(ds), "x.dcm", LIMITS)
    assert expected in read.value.message and "\n" not in read.value.message


def test_truncated_dicom_pixel_data_is_refused():
    data = file_bytes(dx_dataset(ramp()))
    reason = refused(data[:-1000], "x.dcm")
    assert "truncated pixel data" in reason
    assert "truncated pixel data" in refused(pydicom_file(RG1_UNCR)[:100_000], "x.dcm")
    assert "truncated or corrupt DICOM file" in refused(pydicom_file(RG1_J2KR)[:100_000], "x.dcm")


def test_a_damaged_jpeg2000_stream_is_refused_when_decoded():
    ds = pydicom.dcmread(io.BytesIO(pydicom_file(RG1_J2KR)))
    from pydicom.encaps import encapsulate, generate_frames

    frame = next(generate_frames(ds.PixelData, number_of_frames=1))
    ds.PixelData = encapsulate([frame[:len(frame) // 50]])  # the codestream cut short
    data = file_bytes(ds)
    read_radiograph(data, "x.dcm", LIMITS)  # its header is whole
    with pytest.raises(InvalidScan, match="cannot decode the pixels"):
        decode_radiograph(data, LIMITS)
