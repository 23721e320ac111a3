"""Reading DICOM slices: the fast path for uncompressed pixels agrees with pydicom."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from pydicom.data import get_testdata_file

from lungsql import dicom, synth


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
    ds = dicom.parse(next(tmp_path.rglob("*.dcm")).read_bytes())
    expected = ds.pixel_array.astype(np.float32) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    np.testing.assert_array_equal(dicom.hounsfield(ds), expected)
