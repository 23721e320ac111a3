"""A patient's study as a scanner and a PACS leave it, for the tests of the choice of series."""

from __future__ import annotations

import copy
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
from pydicom.uid import generate_uid

from lungsql.dicom import synth

SLICES = 16


def _derived(slices: list[pydicom.Dataset], **changes) -> list[pydicom.Dataset]:
    """Copies of slices as a new series: new UIDs, the given attributes changed."""
    series = generate_uid()
    out = []
    for ds in slices:
        new = copy.deepcopy(ds)
        new.SeriesInstanceUID = series
        new.SOPInstanceUID = new.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        for keyword, value in changes.items():
            setattr(new, keyword, value)
        out.append(new)
    return out


def write_mixed_study(root: Path) -> dict:
    """One patient's study as a scanner and a PACS leave it: an Enhanced CT series of 16 thin
    slices, the same range as classic files at 2x and 4x the thickness, a localizer, a coronal
    and a tilted reconstruction; beside it the classic thin slices alone, and a second patient
    with nothing but a localizer and a coronal series."""
    synth.write_cohort(root / "source", patients=1, slices=(SLICES, SLICES), seed=21)
    classic = sorted((pydicom.dcmread(p) for p in (root / "source").rglob("*.dcm")),
                     key=lambda ds: float(ds.ImagePositionPatient[2]))
    thickness = float(classic[0].SliceThickness)
    enhanced = hd.legacy.LegacyConvertedEnhancedCTImage(classic, series_instance_uid=generate_uid(), series_number=5,
                                                        sop_instance_uid=generate_uid(), instance_number=1)
    tilt = np.radians(15)
    series = {
        "enhanced": [enhanced],
        "thick": _derived(classic[::2], SliceThickness=2 * thickness, SeriesDescription="Thorax 2x"),
        "thicker": _derived(classic[::4], SliceThickness=4 * thickness, SeriesDescription="Thorax LUNG 4x"),
        "localizer": _derived(classic[:1], ImageType=["ORIGINAL", "PRIMARY", "LOCALIZER"]),
        "coronal": _derived(classic[:8], ImageOrientationPatient=[1, 0, 0, 0, 0, -1]),
        "tilted": _derived(classic[::2], ImageOrientationPatient=[1, 0, 0, 0, float(np.cos(tilt)),
                                                                  -float(np.sin(tilt))]),
    }
    elsewhere = {"PatientID": "no-volume", "StudyInstanceUID": generate_uid()}  # another patient's study
    other = {"localizer": _derived(classic[:1], ImageType=["ORIGINAL", "PRIMARY", "LOCALIZER"], **elsewhere),
             "coronal": _derived(classic[:8], ImageOrientationPatient=[1, 0, 0, 0, 0, -1], **elsewhere)}
    for name, datasets in [*series.items(), *((f"other-{n}", d) for n, d in other.items())]:
        (root / "study" / name).mkdir(parents=True)
        for i, ds in enumerate(datasets):
            ds.save_as(root / "study" / name / f"{i:03d}.dcm", enforce_file_format=True)
    return {"root": root / "study", "classic": root / "source", "patient": str(classic[0].PatientID),
            "uids": {name: str(d[0].SeriesInstanceUID) for name, d in series.items()},
            "z": [float(ds.ImagePositionPatient[2]) for ds in classic]}
