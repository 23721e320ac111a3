"""Upload: DICOM files/s and MB/s through `lungsql ingest` (one stream per usable core, as the command
runs by default), against pydicom reading the same files alone, in one process, just after the upload read
them (the same page cache)."""

from __future__ import annotations

import time
from pathlib import Path

import pydicom
import sqlalchemy as sa

from lungsql.bench.sizes import Sizes
from lungsql.client import ingest
from lungsql.dicom import synth

SEED = 2017


def run(engine: sa.Engine, work: Path, sizes: Sizes) -> tuple[dict, Path]:
    """Write the synthetic cohort, upload it, read it again with pydicom alone. Returns (figures, cohort)."""
    cohort = work / "cohort"
    written = synth.write_cohort(cohort, patients=sizes.patients, slices=sizes.slices, seed=SEED,
                                 positive_fraction=0.5)
    summary = ingest.ingest(engine, cohort, jobs=ingest.usable_cores())
    if summary.errors or summary.stored != written.files:
        raise RuntimeError(f"the benchmark upload went wrong: {summary.describe()}")
    files = ingest.find_files(cohort)
    started = time.perf_counter()
    for path in files:
        ds = pydicom.dcmread(path)
        ds.PixelData  # noqa: B018 - the pixel bytes, as ingest reads them
    pydicom_s = time.perf_counter() - started
    figures = {
        "files": summary.files_seen,
        "jobs": summary.streams,
        "patients": len(summary.patients),
        "mb": round(summary.bytes / 1e6, 1),
        "seconds": round(summary.seconds, 3),
        "files_per_s": round(summary.files_per_s, 1),
        "mb_per_s": round(summary.mb_per_s, 1),
        "pydicom_seconds": round(pydicom_s, 3),
        "pydicom_files_per_s": round(len(files) / pydicom_s, 1),
        "ratio_to_pydicom": round(summary.files_per_s / (len(files) / pydicom_s), 3),
    }
    return figures, cohort
