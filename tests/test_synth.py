"""Tests of the synthetic DSB-2017-style cohort generator (no database needed)."""

from __future__ import annotations

import csv
import dataclasses
import re
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian

from lungsql.dicom import synth

PATIENTS, SLICES, SEED = 3, (5, 8), 2017


@pytest.fixture(scope="module")
def cohort_dir(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, synth.CohortSummary]:
    out = tmp_path_factory.mktemp("cohort")
    return out, synth.write_cohort(out, PATIENTS, SLICES, SEED)


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _series(folder: Path) -> list[pydicom.Dataset]:
    return [pydicom.dcmread(p) for p in sorted(folder.glob("*.dcm"))]


def _hu(ds: pydicom.Dataset) -> np.ndarray:
    return ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)


def test_same_seed_gives_identical_bytes(cohort_dir, tmp_path: Path) -> None:
    out, summary = cohort_dir
    again = synth.write_cohort(tmp_path, PATIENTS, SLICES, SEED)
    first, second = _tree(out), _tree(tmp_path)
    assert first.keys() == second.keys()
    assert all(first[name] == second[name] for name in first)
    assert (again.patients, again.positives, again.files, again.bytes) == (
        summary.patients, summary.positives, summary.files, summary.bytes)


def test_other_seed_gives_other_cohort() -> None:
    a = synth.plan_cohort(2, SLICES, 1)
    b = synth.plan_cohort(2, SLICES, 2)
    assert {p.patient_id for p in a}.isdisjoint(p.patient_id for p in b)


def test_layout_labels_and_summary(cohort_dir) -> None:
    out, summary = cohort_dir
    lines = (out / "stage1_labels.csv").read_text().splitlines()
    assert lines[0] == "id,cancer"
    rows = list(csv.DictReader(lines))
    ids = [r["id"] for r in rows]
    assert ids == sorted(ids) and len(ids) == PATIENTS
    assert all(re.fullmatch(r"[0-9a-f]{32}", i) for i in ids)
    assert {r["cancer"] for r in rows} == {"0", "1"}  # at least one of each class
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ids
    counts = [len(list((out / i).glob("*.dcm"))) for i in ids]
    assert all(SLICES[0] <= n <= SLICES[1] for n in counts)
    assert summary.patients == PATIENTS and summary.files == sum(counts)
    assert summary.positives == sum(r["cancer"] == "1" for r in rows)
    assert summary.bytes == sum(p.stat().st_size for p in out.rglob("*.dcm"))


def test_progress_counts_every_file(tmp_path: Path) -> None:
    calls: list[int] = []
    summary = synth.write_cohort(tmp_path, 1, (3, 3), 5, progress=calls.append)
    assert sum(calls) == summary.files == 3


def test_every_file_is_a_readable_ct_slice(cohort_dir) -> None:
    out, _ = cohort_dir
    for path in out.rglob("*.dcm"):
        assert path.read_bytes()[128:132] == b"DICM"
        ds = pydicom.dcmread(path)
        assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
        assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        assert ds.SOPClassUID == CTImageStorage and ds.Modality == "CT"
        assert ds.Manufacturer == "lungsql synthetic"
        assert ds.pixel_array.shape == (512, 512) and ds.pixel_array.dtype == np.int16
        assert (ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation) == (16, 16, 15, 1)
        assert (float(ds.RescaleSlope), float(ds.RescaleIntercept)) == (1.0, -1024.0)
        assert 0.6 <= float(ds.PixelSpacing[0]) == float(ds.PixelSpacing[1]) <= 0.9
        assert 1.0 <= float(ds.SliceThickness) <= 2.5
        assert [float(v) for v in ds.ImageOrientationPatient] == [1, 0, 0, 0, 1, 0]
        assert ds.PatientSex in ("M", "F") and re.fullmatch(r"\d{3}Y", ds.PatientAge)
        assert ds.PatientID == path.parent.name
        for keyword in ("PatientBirthDate", "StudyDate", "StudyInstanceUID", "SeriesInstanceUID",
                        "FrameOfReferenceUID", "WindowCenter", "WindowWidth", "KVP"):
            assert keyword in ds


def test_series_geometry_and_instance_order(cohort_dir) -> None:
    out, _ = cohort_dir
    sop_uids: set[str] = set()
    for folder in (p for p in out.iterdir() if p.is_dir()):
        series = sorted(_series(folder), key=lambda ds: float(ds.ImagePositionPatient[2]))
        z = np.array([float(ds.ImagePositionPatient[2]) for ds in series])
        assert np.allclose(np.diff(z), float(series[0].SliceThickness))
        numbers = [int(ds.InstanceNumber) for ds in series]
        assert sorted(numbers) == list(range(1, len(series) + 1))
        assert numbers != sorted(numbers)  # readers must sort by position, not InstanceNumber
        assert len({ds.SeriesInstanceUID for ds in series}) == 1
        sop_uids |= {ds.SOPInstanceUID for ds in series}
    assert len(sop_uids) == sum(1 for _ in out.rglob("*.dcm"))


def test_hounsfield_ranges(cohort_dir) -> None:
    out, _ = cohort_dir
    plan = {p.patient_id: p for p in synth.plan_cohort(PATIENTS, SLICES, SEED)}
    for folder in (p for p in out.iterdir() if p.is_dir()):
        patient = plan[folder.name]
        for ds in _series(folder):
            hu = _hu(ds)
            assert hu.min() >= -2048 and hu.max() <= 3071
            index = patient.geometry.voxel([float(v) for v in ds.ImagePositionPatient])[0]
            lung = synth.lung_mask(patient, index)
            assert -900 < np.median(hu[lung]) < -800  # vessels and nodules raise the mean a little
            assert hu[lung].mean() < -700
            assert ((hu > -150) & (hu < 100)).mean() > 0.1  # fat and soft tissue
            assert (hu > 300).sum() > 100  # bone
            assert (hu < -950).mean() > 0.2  # air around the body


def test_patient_zero_is_ana_fernandez(cohort_dir) -> None:
    out, _ = cohort_dir
    names = {str(_series(f)[0].PatientName) for f in out.iterdir() if f.is_dir()}
    assert "Fernandez^Ana" in names
    assert synth.plan_cohort(1, (1, 1), 99)[0].name == "Ana Fernandez"


def test_positive_fraction_is_respected() -> None:
    plan = synth.plan_cohort(10, (1, 2), 4, positive_fraction=0.3)
    assert sum(p.label for p in plan) == 3
    assert all(bool(p.nodules) == bool(p.label) for p in plan)
    assert sum(p.label for p in synth.plan_cohort(4, (1, 1), 4, positive_fraction=0.0)) == 1
    assert sum(p.label for p in synth.plan_cohort(4, (1, 1), 4, positive_fraction=1.0)) == 3


def test_nodules_are_soft_tissue_spheres_inside_a_lung() -> None:
    positives = [p for p in synth.plan_cohort(8, (40, 120), 31) if p.label]
    assert positives
    for patient in positives:
        assert 1 <= len(patient.nodules) <= 3
        healthy = dataclasses.replace(patient, nodules=(), label=0)
        for nodule in patient.nodules:
            assert 5 <= nodule.diameter_mm <= 30
            k, row, col = patient.geometry.voxel(nodule.center)
            assert synth.lung_mask(patient, k)[row, col]
            with_nodule, without = synth.slice_hu(patient, k), synth.slice_hu(healthy, k)
            assert with_nodule[row, col] > -200
            # Same anatomy and noise otherwise: the nodule disk is the only difference.
            disk = np.abs(with_nodule - without) > 0
            radius_px = nodule.diameter_mm / 2 / patient.geometry.pixel_spacing
            assert disk.sum() == pytest.approx(np.pi * radius_px**2, rel=0.35)
            assert (without[disk] < -500).mean() > 0.7  # mostly lung (a vessel may cross)
            if nodule.diameter_mm / 2 > patient.geometry.slice_thickness + 1:
                for neighbour in (k - 1, k + 1):  # the sphere spans consecutive slices
                    assert synth.slice_hu(patient, neighbour)[row, col] > -200


def test_builder_round_trips_and_can_be_forged(tmp_path: Path) -> None:
    patient = synth.plan_cohort(1, (2, 2), 8)[0]
    pixels = synth.slice_pixels(patient, 1)
    assert pixels.dtype == np.int16 and pixels.shape == (512, 512)
    ds = synth.build_slice_dataset(patient, patient.geometry, 1, pixels)
    ds.Modality = "MR"
    del ds.PixelSpacing
    path = tmp_path / "forged.dcm"
    ds.save_as(path, enforce_file_format=True)
    back = pydicom.dcmread(path)
    assert back.Modality == "MR" and "PixelSpacing" not in back
    assert np.array_equal(back.pixel_array, pixels)


def test_rejects_bad_arguments(tmp_path: Path) -> None:
    bad = ((0, (1, 2), 0.5), (2, (3, 2), 0.5), (2, (0, 2), 0.5), (2, (1, 2), 1.5))
    for patients, slices, fraction in bad:
        with pytest.raises(ValueError):
            synth.write_cohort(tmp_path, patients, slices, 1, positive_fraction=fraction)
