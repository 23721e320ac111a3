"""Tests of the synthetic ChestX-ray14-style radiograph cohort (no database needed)."""

from __future__ import annotations

import csv
import re
import struct
from collections import defaultdict
from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np
import pytest

from lungsql.dicom import synth_xray as sx

SIZE, SEED = 256, 0
HEADER = ("Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,"
          "OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y],")


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, sx.CohortSummary]:
    """The default cohort (60 patients, 1 to 5 films each), as the AUC check of the design uses it."""
    out = tmp_path_factory.mktemp("chestxray")
    return out, sx.write_cohort(out, size=SIZE, seed=SEED)


def _rows(out: Path) -> list[dict[str, str]]:
    with open(out / sx.DATA_ENTRY_CSV, newline="") as f:
        reader = csv.reader(f)
        header = next(reader)
        return [dict(zip(header, row)) for row in reader]


def _labels(row: dict[str, str]) -> set[str]:
    return set() if row["Finding Labels"] == sx.NO_FINDING else set(row["Finding Labels"].split("|"))


def _gray(out: Path, name: str) -> np.ndarray:
    return cv2.imread(str(out / sx.IMAGES_DIR / name), cv2.IMREAD_UNCHANGED)


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# ----------------------------------------------------------------------------- layout


def test_files_and_csv_are_in_the_nih_layout(cohort) -> None:
    out, summary = cohort
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [sx.IMAGES_DIR, sx.DATA_ENTRY_CSV, sx.TRAIN_VAL_LIST, sx.TEST_LIST])
    lines = (out / sx.DATA_ENTRY_CSV).read_text().split("\n")
    assert lines[0] == HEADER and lines[-1] == ""
    assert all(line.endswith(",") for line in lines[1:-1])  # the real file's trailing empty column

    with open(out / sx.DATA_ENTRY_CSV, newline="") as f:
        raw = list(csv.reader(f))
    assert raw[0] == ["Image Index", "Finding Labels", "Follow-up #", "Patient ID", "Patient Age", "Patient Gender",
                      "View Position", "OriginalImage[Width", "Height]", "OriginalImagePixelSpacing[x", "y]", ""]
    assert all(len(row) == 12 and row[-1] == "" for row in raw[1:])

    rows = _rows(out)
    names = [r["Image Index"] for r in rows]
    assert names == sorted(names) and len(set(names)) == len(names) == summary.images
    assert set(names) == {p.name for p in (out / sx.IMAGES_DIR).iterdir()}
    for r in rows:
        match = re.fullmatch(r"(\d{8})_(\d{3})\.png", r["Image Index"])
        assert match, r["Image Index"]
        assert r["Patient ID"] == str(int(match.group(1))) and r["Follow-up #"] == str(int(match.group(2)))
        labels = r["Finding Labels"].split("|")
        assert labels == [sx.NO_FINDING] or (labels == sorted(labels) and set(labels) <= set(sx.FINDINGS))
        assert 1 <= int(r["Patient Age"]) <= 100 and r["Patient Gender"] in ("M", "F")
        assert r["View Position"] in ("PA", "AP")
        assert 2500 <= int(r["OriginalImage[Width"]) <= 3000 and 2500 <= int(r["Height]"]) <= 3000
        assert r["OriginalImagePixelSpacing[x"] == r["y]"] and 0.139 <= float(r["y]"]) <= 0.168
    views = [r["View Position"] for r in rows]
    assert 0 < views.count("AP") < views.count("PA")


def test_every_png_is_8_bit_gray_of_the_requested_size(cohort) -> None:
    out, _ = cohort
    for path in sorted((out / sx.IMAGES_DIR).iterdir()):
        data = path.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
        width, height, bit_depth, colour_type = struct.unpack(">IIBB", data[16:26])
        assert (width, height, bit_depth, colour_type) == (SIZE, SIZE, 8, 0), path.name  # 0: grayscale
        img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
        assert img.dtype == np.uint8 and img.shape == (SIZE, SIZE)
        assert img.min() < 30 and img.max() > 200  # air black, bone and tissue bright: not a blank image


def test_several_films_per_patient_numbered_from_zero(cohort) -> None:
    out, summary = cohort
    follow_ups: dict[str, list[int]] = defaultdict(list)
    for r in _rows(out):
        follow_ups[r["Patient ID"]].append(int(r["Follow-up #"]))
    assert len(follow_ups) == summary.patients == 60
    assert all(sorted(f) == list(range(len(f))) for f in follow_ups.values())
    counts = [len(f) for f in follow_ups.values()]
    assert min(counts) >= 1 and max(counts) == 5 and 2.0 < np.mean(counts) < 4.0


def test_split_is_by_patient(cohort) -> None:
    out, summary = cohort
    train = (out / sx.TRAIN_VAL_LIST).read_text().splitlines()
    test = (out / sx.TEST_LIST).read_text().splitlines()
    names = {r["Image Index"] for r in _rows(out)}
    assert train == sorted(train) and test == sorted(test)
    assert set(train).isdisjoint(test) and set(train) | set(test) == names
    train_patients, test_patients = {n[:8] for n in train}, {n[:8] for n in test}
    assert train_patients.isdisjoint(test_patients)
    assert len(test_patients) == summary.test_patients == 12  # test_fraction 0.2 of 60
    assert len(test) == summary.test_images


# ----------------------------------------------------------------------------- labels


def test_label_balance_of_the_default_cohort(cohort) -> None:
    out, summary = cohort
    rows = _rows(out)
    test = set((out / sx.TEST_LIST).read_text().split())
    counts = {f: sum(f in _labels(r) for r in rows) for f in sx.FINDINGS}
    in_test = {f: sum(f in _labels(r) for r in rows if r["Image Index"] in test) for f in sx.FINDINGS}
    assert counts == summary.positives and in_test == summary.test_positives
    no_finding = sum(not _labels(r) for r in rows)
    assert no_finding == summary.no_finding and 0.4 <= no_finding / len(rows) <= 0.6
    assert max(counts, key=counts.get) == "Infiltration" and 0.12 <= counts["Infiltration"] / len(rows) <= 0.25
    for common in ("Effusion", "Atelectasis"):
        assert 0.07 <= counts[common] / len(rows) <= 0.16
        assert all(counts[rare] < counts[common] for rare in ("Hernia", "Pneumonia", "Fibrosis", "Edema", "Emphysema"))
    assert min(counts.values()) >= 6 and min(in_test.values()) >= 2
    assert sum(len(_labels(r)) > 1 for r in rows) > 0  # multi-label


@pytest.mark.parametrize("seed", range(12))
def test_minimum_counts_hold_for_any_seed(seed: int) -> None:
    films = sx.plan_cohort(seed=seed)
    summary = sx.summarize(films)
    assert min(summary.positives.values()) >= 6, summary.positives
    assert min(summary.test_positives.values()) >= 2, summary.test_positives
    for finding in sx.FINDINGS:  # from at least two test patients, so one patient does not decide an AUC
        assert len({r.patient_id for r in films if r.test and finding in r.labels}) >= 2
    assert max(summary.positives, key=summary.positives.get) == "Infiltration"
    assert 0.35 <= summary.no_finding / summary.images <= 0.65


def test_chronic_findings_stay_until_the_last_follow_up() -> None:
    by_patient: dict[int, list[sx.Radiograph]] = defaultdict(list)
    for r in sx.plan_cohort(seed=3):
        by_patient[r.patient_id].append(r)
    carried = 0
    for films in by_patient.values():
        for finding in sx.CHRONIC:
            has = [finding in r.labels for r in films]
            if any(has):
                onset = has.index(True)
                assert all(has[onset:]), (films[0].patient_id, finding, has)
                carried += len(films) - onset > 1
    assert carried > 0


def test_small_cohorts_and_bad_arguments() -> None:
    films = sx.plan_cohort(patients=3, images_per_patient=(2, 2), seed=1)
    assert len(films) == 6 and sum(r.test for r in films) == 2 and len({r.patient_id for r in films if r.test}) == 1
    assert len(sx.plan_cohort(patients=1, test_fraction=0.2)) >= 1
    for kwargs in ({"patients": 0}, {"images_per_patient": (3, 2)}, {"images_per_patient": (0, 2)},
                   {"test_fraction": 1.0}, {"test_fraction": -0.1}):
        with pytest.raises(ValueError):
            sx.plan_cohort(**kwargs)
    with pytest.raises(ValueError, match="size"):
        sx.render(films[0], size=32)


# ----------------------------------------------------------------------------- determinism


def test_same_seed_gives_identical_files_and_another_seed_other_ones(tmp_path: Path) -> None:
    calls: list[int] = []
    first = sx.write_cohort(tmp_path / "a", patients=4, size=96, seed=7, progress=calls.append)
    sx.write_cohort(tmp_path / "b", patients=4, size=96, seed=7)
    sx.write_cohort(tmp_path / "c", patients=4, size=96, seed=8)
    a, b, c = _tree(tmp_path / "a"), _tree(tmp_path / "b"), _tree(tmp_path / "c")
    assert a == b
    assert len(calls) == first.images and set(calls) == {1}
    shared = set(a) & set(c) - {sx.DATA_ENTRY_CSV, sx.TRAIN_VAL_LIST, sx.TEST_LIST}
    assert shared and all(a[name] != c[name] for name in shared)
    assert sx.plan_cohort(seed=7) == sx.plan_cohort(seed=7) != sx.plan_cohort(seed=8)


def test_a_finding_changes_neither_anatomy_nor_noise_outside_its_region() -> None:
    r = next(r for r in sx.plan_cohort(seed=SEED) if not r.labels)
    base = sx.render(r, 128).astype(int)
    img, regions = sx.render_with_regions(replace(r, labels=("Nodule",)), 128)
    grown = cv2.dilate(regions["Nodule"].astype(np.uint8), np.ones((7, 7), np.uint8)).astype(bool)
    assert np.array_equal(img.astype(int)[~grown], base[~grown])


# ----------------------------------------------------------------------------- findings in the pixels


def _normal_films(n: int) -> list[sx.Radiograph]:
    return [r for r in sx.plan_cohort(seed=SEED) if not r.labels][:n]


#: Findings that darken where they are drawn (air); all others add density.
DARKER = {"Pneumothorax", "Emphysema"}


@pytest.mark.parametrize("finding", sx.FINDINGS)
def test_each_finding_is_drawn_where_it_says(finding: str) -> None:
    """The same film with and without the finding: its region changes, in the expected direction."""
    changes, signed = [], []
    for r in _normal_films(4):
        base = sx.render(r, 128).astype(float)
        img, regions = sx.render_with_regions(replace(r, labels=(finding,)), 128)
        region = regions[finding]
        assert set(regions) == {finding} and region.dtype == bool and 0 < region.mean() < 0.5
        diff = img.astype(float)[region] - base[region]
        changes.append(np.abs(diff).mean())
        signed.append(diff.mean())
    assert min(changes) > 15, changes  # gray levels, averaged over the region
    if finding in DARKER:
        assert max(signed) < -15, signed
    elif finding != "Hernia":  # a hernia is a soft-tissue sac holding dark gas
        assert min(signed) > 15, signed


def _central_shadow_width(img: np.ndarray) -> float:
    """Width (share of the image) of the bright band around the midline at the level of the heart."""
    n = img.shape[0]
    widths = []
    for row in img[int(0.56 * n):int(0.66 * n), int(0.15 * n):int(0.85 * n)].astype(float):
        bright = row > (np.percentile(row, 10) + np.percentile(row, 90)) / 2
        left = right = len(row) // 2
        while left > 0 and bright[left - 1]:
            left -= 1
        while right < len(row) - 1 and bright[right + 1]:
            right += 1
        widths.append((right - left + 1) / n)
    return float(np.mean(widths))


def _lower_zone_excess(img: np.ndarray) -> float:
    """Brightness of the brighter lower lung zone above that of the mid zones."""
    n = img.shape[0]
    lower = img[int(0.58 * n):int(0.72 * n)].astype(float)
    sides = lower[:, int(0.14 * n):int(0.4 * n)].mean(), lower[:, int(0.6 * n):int(0.86 * n)].mean()
    return max(sides) - img[int(0.3 * n):int(0.45 * n), int(0.14 * n):int(0.86 * n)].mean()


def test_findings_show_in_the_cohorts_films(cohort) -> None:
    out, _ = cohort
    rows = _rows(out)
    normal = [_gray(out, r["Image Index"]) for r in rows if not _labels(r)]
    with_finding = {f: [_gray(out, r["Image Index"]) for r in rows if f in _labels(r)]
                    for f in ("Cardiomegaly", "Effusion")}
    heart = np.mean([_central_shadow_width(i) for i in with_finding["Cardiomegaly"]])
    assert heart > np.mean([_central_shadow_width(i) for i in normal]) + 0.08
    base = np.mean([_lower_zone_excess(i) for i in with_finding["Effusion"]])
    assert base > np.mean([_lower_zone_excess(i) for i in normal]) + 8


def test_pneumothorax_gas_is_bounded_by_brighter_pleura_and_lung() -> None:
    for r in _normal_films(4):
        img, regions = sx.render_with_regions(replace(r, labels=("Pneumothorax",)), 128)
        gas = regions["Pneumothorax"].astype(np.uint8)
        inside = cv2.erode(gas, np.ones((3, 3), np.uint8)).astype(bool)
        rim = (cv2.dilate(gas, np.ones((5, 5), np.uint8)) - gas).astype(bool)
        assert inside.sum() > 50 and img[inside].mean() + 20 < img[rim].mean(), r.name
