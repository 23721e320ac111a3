"""Reading DICOM slices: the fast path for uncompressed pixels agrees with pydicom."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from pydicom.data import get_testdata_file

from lungsql import dicom
from lungsql.dicom import synth


def test_fast_stored_pixels_equal_pydicoms_pixel_array(tmp_path):
    synth.write_cohort(tmp_path, patients=1, slices=(2, 2), seed=3)
    paths = sorted(tmp_path.rglob("*.dcm")) + [
        Path(get_testdata_file(name))
        for name in ("CT_small.dcm", "MR_small.dcm", "MR_small_bigendian.dcm", "MR_small_RLE.dcm",
                     "rtdose_1frame.dcm")
    ]
    for path in paths:
        ds = dicom.parse(path.read_bytes())
        np.testing.assert_array_equal(dicom.stored_pixels(ds), ds.pixel_array, err_msg=str(path))


def test_hounsfield_applies_slope_and_intercept(tmp_path):
    synth.write_cohort(tmp_path, patients=1, slices=(1, 1), seed=3)
    data = next(tmp_path.rglob("*.dcm")).read_bytes()
    ds = dicom.parse(data)
    expected = ds.pixel_array.astype(np.float32) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    np.testing.assert_array_equal(dicom.decode_stored(data).hounsfield(), expected)
    np.testing.assert_array_equal(dicom.slice_hu(data), expected)


def _pydicoms_hounsfield(ds) -> np.ndarray:
    slope, intercept = float(ds.get("RescaleSlope", 1) or 1), float(ds.get("RescaleIntercept", 0) or 0)
    return dicom.to_hounsfield(ds.pixel_array, slope, intercept)


def hounsfield_from_bytes(data: bytes) -> np.ndarray | None:
    from lungsql.dicom.fast import stored_from_bytes

    found = stored_from_bytes(data)
    return None if found is None else dicom.to_hounsfield(*found)


def test_hounsfield_straight_from_bytes_equals_pydicoms_path(tmp_path):
    from pydicom.uid import ImplicitVRLittleEndian

    synth.write_cohort(tmp_path / "c", patients=1, slices=(2, 2), seed=3)
    files = {p.name: p.read_bytes() for p in sorted((tmp_path / "c").rglob("*.dcm"))}
    for name in ("CT_small.dcm", "MR_small.dcm", "MR_small_implicit.dcm", "MR_small_padded.dcm",
                 "MR_small_bigendian.dcm", "MR_small_RLE.dcm", "JPEG2000.dcm", "rtdose_1frame.dcm",
                 "liver_1frame.dcm", "examples_palette.dcm", "SC_rgb_small_odd.dcm", "image_dfl.dcm"):
        files[name] = Path(get_testdata_file(name)).read_bytes()
    # The synthetic slice again in implicit VR, with a nested sequence of undefined length before the pixels.
    ds = dicom.parse(next(iter(files.values())))
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    inner = Dataset()
    inner.CodeValue, inner.CodeMeaning = "113100", "Basic Application Confidentiality Profile"
    ds.DeidentificationMethodCodeSequence = Sequence([inner])
    ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    out = tmp_path / "implicit.dcm"
    ds.save_as(out, enforce_file_format=True)
    files["implicit"] = out.read_bytes()

    fast_ones = 0
    for name, data in files.items():
        ds = dicom.parse(data)
        fast = hounsfield_from_bytes(data)
        syntax = ds.file_meta.TransferSyntaxUID
        if syntax not in (ImplicitVRLittleEndian, "1.2.840.10008.1.2.1") or ds.get("NumberOfFrames", 1) != 1 \
                or ds.get("SamplesPerPixel", 1) != 1 or ds.BitsAllocated not in (8, 16):
            assert fast is None, name  # left to pydicom
            continue
        assert fast is not None, name
        fast_ones += 1
        np.testing.assert_array_equal(fast, _pydicoms_hounsfield(ds), err_msg=name)
    assert fast_ones >= 5
    assert hounsfield_from_bytes(b"not dicom at all" * 20) is None
    assert hounsfield_from_bytes(files["CT_small.dcm"][:2000]) is None  # cut short
