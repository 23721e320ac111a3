"""A deterministic synthetic cohort of frontal chest radiographs in the NIH ChestX-ray14 layout.

``write_cohort`` writes ``OUT/images/<patient>_<follow-up>.png`` (8-bit grayscale PNG, file
names as in the NIH download: ``00000001_000.png``), ``OUT/Data_Entry_2017.csv`` in the format of
the real file (trailing empty column included) and the patient-wise split ``OUT/train_val_list.txt``
/ ``OUT/test_list.txt``.  Each patient has one or more follow-up films.

Every film is a PA (sometimes AP) chest phantom in display space, air black and bone bright:
body and soft tissue, two lung fields with vascular markings, mediastinum and heart, spine,
clavicles, ribs, diaphragm domes and costophrenic angles, varied per patient (size, heart, rotation,
shift, exposure, noise, L/R marker).  The 14 ChestX-ray14 findings are multi-label and unbalanced as
in the real data (about half the films 'No Finding', Infiltration the most frequent); chronic findings
are carried across a patient's follow-ups.  Minimum counts per finding (films and patients, in the
train_val and the test list) are guaranteed, so that per-finding AUCs can be measured on the default
cohort; the rarest findings always stay below Effusion and Atelectasis, Infiltration first of all.

The same arguments always give byte-identical files: every draw comes from a ``numpy`` generator keyed
on (seed, patient, follow-up, stream), so adding a finding never changes anatomy, pose or noise.
The pieces are public so tests can forge inputs: ``plan_cohort`` describes the films (cheap),
``render`` draws one, ``render_with_regions`` also gives where each of its findings was drawn.
"""

from __future__ import annotations

import csv
import io
import math
import time
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path
from typing import Callable, Sequence

import cv2
import numpy as np

#: Bumped whenever the same seed would draw different films or pixels.
GENERATOR_VERSION = 1

FINDINGS: tuple[str, ...] = (
    "Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Effusion", "Emphysema", "Fibrosis", "Hernia",
    "Infiltration", "Mass", "Nodule", "Pleural_Thickening", "Pneumonia", "Pneumothorax")
NO_FINDING = "No Finding"
#: Findings of the patient rather than of the day: present from their onset to the last follow-up.
CHRONIC = frozenset({"Cardiomegaly", "Emphysema", "Fibrosis", "Hernia", "Mass", "Nodule", "Pleural_Thickening"})
#: The rarest findings of ChestX-ray14: always fewer films than Effusion and Atelectasis.
RARE = ("Edema", "Emphysema", "Fibrosis", "Hernia", "Pneumonia")

IMAGES_DIR = "images"
DATA_ENTRY_CSV = "Data_Entry_2017.csv"
TRAIN_VAL_LIST, TEST_LIST = "train_val_list.txt", "test_list.txt"
CSV_COLUMNS: tuple[str, ...] = (
    "Image Index", "Finding Labels", "Follow-up #", "Patient ID", "Patient Age", "Patient Gender",
    "View Position", "OriginalImage[Width", "Height]", "OriginalImagePixelSpacing[x", "y]", "")
CSV_HEADER = ",".join(CSV_COLUMNS)

#: Share of films showing each finding among patients who are not healthy (chronic ones: share of those
#: patients).  HEALTHY_PATIENTS of the patients are healthy throughout, so that about half of the films
#: read 'No Finding'; the ranking follows ChestX-ray14 (Infiltration first, Hernia last).
SICK_PREVALENCE: dict[str, float] = {
    "Infiltration": 0.3, "Effusion": 0.22, "Atelectasis": 0.19, "Nodule": 0.07, "Mass": 0.06,
    "Pneumothorax": 0.06, "Consolidation": 0.06, "Pleural_Thickening": 0.04, "Cardiomegaly": 0.05,
    "Emphysema": 0.03, "Edema": 0.04, "Fibrosis": 0.03, "Pneumonia": 0.04, "Hernia": 0.02}
HEALTHY_PATIENTS = 0.47
#: Share of Pneumonia films also read as Infiltration (they often are in ChestX-ray14).
PNEUMONIA_WITH_INFILTRATION = 0.4
#: Guaranteed positive films per finding, overall, in the test list and in the train_val list, and the
#: patients they come from in each list, for cohorts of 60 patients with 12 in the test list or more;
#: smaller cohorts get proportionally fewer (`_minimum_counts`).
MIN_POSITIVES, MIN_TEST_POSITIVES, MIN_TRAIN_POSITIVES = 6, 2, 8
MIN_TEST_PATIENTS, MIN_TRAIN_PATIENTS = 2, 5

# Independent random streams; a patient's are keyed on its 1-based Patient ID.
_PATIENT, _IMAGE, _FINDING, _COHORT = 1, 2, 3, 4
_META, _LABELS, _ANATOMY, _POSE, _NOISE, _SPLIT, _FIXUP, _VESSELS, _HEALTHY, _PARENCHYMA = range(10)

_SHIFT = 4  # cv2 drawing with 4 fractional bits: points are given in 1/16 pixel


def _rng(*keys: int) -> np.random.Generator:
    return np.random.default_rng([k % 2**64 for k in keys])


# ----------------------------------------------------------------------------- the cohort


@dataclass(frozen=True)
class Radiograph:
    """One film of the cohort: its row of Data_Entry_2017.csv and what `render` needs."""

    seed: int
    patient_id: int  # 1-based, as in the CSV
    follow_up: int  # 0..n-1
    labels: tuple[str, ...]  # alphabetical, a subset of FINDINGS; () is 'No Finding'
    age: int
    gender: str  # "M" / "F"
    view: str  # "PA" / "AP"
    original_size: tuple[int, int]  # width, height of the pretended original, pixels
    pixel_spacing: float  # mm, of the pretended original
    test: bool  # listed in test_list.txt (else in train_val_list.txt)

    @property
    def name(self) -> str:
        return f"{self.patient_id:08d}_{self.follow_up:03d}.png"

    @property
    def finding_labels(self) -> str:
        return "|".join(self.labels) if self.labels else NO_FINDING

    def csv_row(self) -> list[str]:
        spacing = f"{self.pixel_spacing:.3f}"
        return [self.name, self.finding_labels, str(self.follow_up), str(self.patient_id), str(self.age),
                self.gender, self.view, str(self.original_size[0]), str(self.original_size[1]), spacing,
                spacing, ""]


@dataclass(frozen=True)
class CohortSummary:
    images: int
    patients: int
    test_images: int
    test_patients: int
    no_finding: int  # films labelled 'No Finding'
    positives: dict[str, int]  # films showing each finding, every finding of FINDINGS a key
    test_positives: dict[str, int]  # the same among the films of test_list.txt
    seconds: float


@dataclass(frozen=True)
class _Minimums:
    films: int
    test_films: int
    test_patients: int
    train_films: int
    train_patients: int


def _minimum_counts(patients: int, test_patients: int) -> _Minimums:
    """Guaranteed positives per finding: the MIN_* constants from 60 patients with 12 in the test list,
    proportionally fewer below."""
    train = patients - test_patients
    return _Minimums(films=min(MIN_POSITIVES, math.ceil(patients / 10)),
                     test_films=min(MIN_TEST_POSITIVES, math.ceil(test_patients / 6)),
                     test_patients=min(MIN_TEST_PATIENTS, math.ceil(test_patients / 6)),
                     train_films=min(MIN_TRAIN_POSITIVES, math.ceil(train / 6)),
                     train_patients=min(MIN_TRAIN_PATIENTS, math.ceil(train / 9.6)))


def _draw_patient_labels(rng: np.random.Generator, n: int, healthy: bool) -> list[set[str]]:
    """Findings of each of the `n` films of one patient, before the cohort's minimum counts."""
    films: list[set[str]] = [set() for _ in range(n)]
    if healthy:
        return films
    for finding in FINDINGS:
        p = SICK_PREVALENCE[finding]
        if finding in CHRONIC:
            if rng.random() < p:
                onset = 0 if rng.random() < 0.7 else int(rng.integers(n))
                for k in range(onset, n):
                    films[k].add(finding)
        else:
            for k in range(n):
                if rng.random() < p:
                    films[k].add(finding)
    for film in films:
        if "Pneumonia" in film and rng.random() < PNEUMONIA_WITH_INFILTRATION:
            film.add("Infiltration")
    return films


def _pick(rng: np.random.Generator, *tiers: list) -> object | None:
    """A random element of the first non-empty list."""
    for tier in tiers:
        if tier:
            return tier[int(rng.integers(len(tier)))]
    return None


def _add_finding(rng: np.random.Generator, finding: str, films: list[list[set[str]]],
                 patients: Sequence[int]) -> bool:
    """Give `finding` to one more film among `patients`; False if every film has it.

    It goes to a patient who does not have it yet if there is one, and to a patient with other findings
    (whose films the draws made abnormal) before one drawn healthy, so that about half of the films stay
    'No Finding'; among those, to a patient with the fewest findings and a film that shows nothing else
    yet, so that findings do not pile up on a few patients.  A chronic finding is given to the last one or
    two follow-ups of a patient."""
    fresh = [p for p in patients if not any(finding in f for f in films[p])]
    load = {p: len(set().union(*films[p])) for p in fresh}
    sick = [p for p in fresh if load[p]]
    least = [p for p in sick if load[p] == min(load[q] for q in sick)]
    if finding in CHRONIC:
        p = _pick(rng, least, fresh)
        if p is None:
            return False
        for f in films[p][-int(rng.integers(1, 3)):]:  # seen on the last one or two follow-ups
            f.add(finding)
        return True
    normal_films = [(p, k) for p in sick for k, f in enumerate(films[p]) if not f]
    fewest = min((load[p] for p, _ in normal_films), default=0)
    chosen = _pick(rng, [(p, k) for p, k in normal_films if load[p] == fewest],
                   [(p, k) for p in least for k in range(len(films[p]))],
                   [(p, k) for p in fresh for k in range(len(films[p]))],
                   [(p, k) for p in patients for k, f in enumerate(films[p]) if finding not in f])
    if chosen is None:
        return False
    p, k = chosen
    films[p][k].add(finding)
    return True


def _count(finding: str, films: list[list[set[str]]], patients: Sequence[int]) -> int:
    return sum(finding in f for p in patients for f in films[p])


def _count_patients(finding: str, films: list[list[set[str]]], patients: Sequence[int]) -> int:
    return sum(any(finding in f for f in films[p]) for p in patients)


def _top_up(rng: np.random.Generator, films: list[list[set[str]]], finding: str, group: Sequence[int],
            n_films: int, n_patients: int = 0) -> None:
    """Add `finding` until `group` has `n_films` films showing it, from `n_patients` patients (or no film is left)."""
    while (_count(finding, films, group) < n_films or _count_patients(finding, films, group) < n_patients) \
            and _add_finding(rng, finding, films, group):
        pass


def _plan_labels(seed: int, counts: Sequence[int], test: set[int]) -> list[list[set[str]]]:
    """The findings of every film (patient index, follow-up), minimum counts and ranking guaranteed."""
    patients = len(counts)
    healthy = set(_rng(_COHORT, seed, _HEALTHY).permutation(patients)[:round(patients * HEALTHY_PATIENTS)].tolist())
    films = [_draw_patient_labels(_rng(_PATIENT, seed, p + 1, _LABELS), counts[p], p in healthy)
             for p in range(patients)]
    # Minimum counts, drawn deterministically from their own stream: test films, train_val films, overall.
    fixup = _rng(_COHORT, seed, _FIXUP)
    need = _minimum_counts(patients, len(test))
    in_test, in_train = sorted(test), [p for p in range(patients) if p not in test]
    everyone = list(range(patients))
    for finding in FINDINGS:
        _top_up(fixup, films, finding, in_test, need.test_films, need.test_patients)
        _top_up(fixup, films, finding, in_train, need.train_films, need.train_patients)
        _top_up(fixup, films, finding, everyone, need.films)
    # The ranking of ChestX-ray14: the rarest findings below Effusion and Atelectasis, Infiltration first.
    for common, below in (("Effusion", RARE), ("Atelectasis", RARE), ("Infiltration", FINDINGS)):
        others = [f for f in below if f != common]
        _top_up(fixup, films, common, everyone, max(_count(f, films, everyone) for f in others) + 1)
    return films


def plan_cohort(patients: int = 60, images_per_patient: tuple[int, int] = (1, 5), seed: int = 0,
                test_fraction: float = 0.2) -> list[Radiograph]:
    """Describe every film of a cohort without rendering anything (cheap), in CSV order."""
    low, high = images_per_patient
    if patients < 1 or not 1 <= low <= high:
        raise ValueError(f"need patients >= 1 and 1 <= A <= B images per patient, got {patients} and "
                         f"{images_per_patient}: pass e.g. patients=60, images_per_patient=(1, 5)")
    if not 0.0 <= test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in [0, 1), got {test_fraction}: pass e.g. 0.2")
    counts = [int(_rng(_PATIENT, seed, p + 1, _META).integers(low, high + 1)) for p in range(patients)]
    n_test = min(patients - 1, max(1, round(patients * test_fraction))) if test_fraction > 0 else 0
    test = set(_rng(_COHORT, seed, _SPLIT).permutation(patients)[:n_test].tolist())
    films = _plan_labels(seed, counts, test)

    cohort = []
    for p in range(patients):
        meta = _rng(_PATIENT, seed, p + 1, _META)
        meta.integers(low, high + 1)  # the film count, drawn above
        gender = "M" if meta.random() < 0.56 else "F"
        age = int(np.clip(round(meta.normal(48, 16)), 12, 90))
        days = 0
        for k in range(counts[p]):
            view = "AP" if meta.random() < (0.12 if k == 0 else 0.2) else "PA"
            size = (int(meta.integers(2500, 3001)), int(meta.integers(2500, 3001)))
            spacing = float(meta.choice((0.139, 0.143, 0.143, 0.143, 0.148, 0.168)))
            cohort.append(Radiograph(seed=seed, patient_id=p + 1, follow_up=k, labels=tuple(sorted(films[p][k])),
                                     age=age + days // 365, gender=gender, view=view, original_size=size,
                                     pixel_spacing=spacing, test=p in test))
            days += int(meta.integers(1, 400))
    return cohort


# ----------------------------------------------------------------------------- anatomy


@dataclass(frozen=True)
class Anatomy:
    """Per-patient body shape in units of the image width (x right, y down) and densities."""

    cx: float  # midline
    body_half: float  # half-width of the body
    thorax_half: float  # half-width of the rib cage at the costophrenic angles
    apex_y: float  # top of the lungs
    cp_y: float  # costophrenic angles
    dome: tuple[float, float]  # height of the diaphragm domes above cp_y (image left, image right)
    mediastinum_half: float
    ctr: float  # cardiothoracic ratio
    tissue: float  # soft-tissue density at the midline
    lung: float  # how much the lungs lighten the film (density subtracted)
    bone: float
    clavicle_y: float
    rib_gap: float
    breasts: bool
    gastric_bubble: float  # radius, 0 for none


def _draw_anatomy(rng: np.random.Generator, gender: str) -> Anatomy:
    body = rng.uniform(0.40, 0.47)
    thorax = body * rng.uniform(0.74, 0.82)
    apex = rng.uniform(0.09, 0.14)
    cp = rng.uniform(0.70, 0.78)
    dome = rng.uniform(0.05, 0.08)
    return Anatomy(
        cx=0.5 + rng.uniform(-0.015, 0.015), body_half=body, thorax_half=thorax, apex_y=apex, cp_y=cp,
        dome=(dome + rng.uniform(0.008, 0.025), dome), mediastinum_half=rng.uniform(0.045, 0.06),
        ctr=rng.uniform(0.40, 0.49), tissue=rng.uniform(0.52, 0.62), lung=rng.uniform(0.36, 0.44),
        bone=rng.uniform(0.13, 0.2), clavicle_y=apex + rng.uniform(0.03, 0.06),
        rib_gap=(cp - apex) / rng.uniform(8.6, 9.6), breasts=gender == "F" and rng.random() < 0.8,
        gastric_bubble=rng.uniform(0.025, 0.045) if rng.random() < 0.35 else 0.0)


def _effective_anatomy(a: Anatomy, r: Radiograph, rngs: dict[str, np.random.Generator]) -> Anatomy:
    """The patient's anatomy as this film shows it: chronic findings and the AP view change it."""
    if "Emphysema" in r.labels:
        # Hyperinflated: larger, darker lungs over a low, flat diaphragm.
        a = replace(a, cp_y=min(a.cp_y + rngs["Emphysema"].uniform(0.04, 0.06), 0.84),
                    dome=(a.dome[0] * 0.35, a.dome[1] * 0.35), thorax_half=a.thorax_half * 1.04,
                    apex_y=a.apex_y - 0.015, lung=a.lung * 1.12)
    if "Fibrosis" in r.labels:  # volume loss at the bases
        a = replace(a, cp_y=a.cp_y - 0.02)
    if "Cardiomegaly" in r.labels:
        a = replace(a, ctr=rngs["Cardiomegaly"].uniform(0.6, 0.74))
    if r.view == "AP":  # the heart is further from the detector: magnified
        a = replace(a, ctr=a.ctr * 1.08, clavicle_y=a.clavicle_y - 0.025)
    return a


# ----------------------------------------------------------------------------- drawing


@lru_cache(maxsize=4)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """x and y of the pixel centres in units of the width, as a row and a column."""
    u = ((np.arange(size, dtype=np.float32) + 0.5) / size)
    return u[None, :], u[:, None].copy()


@lru_cache(maxsize=2)
def _noise_bank(size: int) -> np.ndarray:
    """Unit Gaussian noise twice the image wide and high; each film adds a shifted window of it."""
    bank = np.random.default_rng(0x5EED).standard_normal((2 * size, 2 * size), np.float32)
    bank.setflags(write=False)
    return bank


def _pts(points: np.ndarray, size: int) -> np.ndarray:
    return np.rint(np.asarray(points, np.float64) * size * (1 << _SHIFT)).astype(np.int32).reshape(-1, 1, 2)


def _fill(img: np.ndarray, points: np.ndarray, value: float) -> None:
    cv2.fillPoly(img, [_pts(points, img.shape[0])], float(value), cv2.LINE_8, _SHIFT)


def _line(img: np.ndarray, points: np.ndarray, value: float, width: float) -> None:
    thickness = max(1, round(width * img.shape[0]))
    cv2.polylines(img, [_pts(points, img.shape[0])], False, float(value), thickness, cv2.LINE_8, _SHIFT)


def _lines(img: np.ndarray, segments: Sequence[np.ndarray] | np.ndarray, value: float, width: float) -> None:
    """Several open polylines of the same width and value, in one call."""
    if len(segments) == 0:
        return
    thickness = max(1, round(width * img.shape[0]))
    if isinstance(segments, np.ndarray):
        pts = list(np.rint(segments * (img.shape[0] * (1 << _SHIFT))).astype(np.int32))
    else:
        pts = [_pts(seg, img.shape[0]) for seg in segments]
    cv2.polylines(img, pts, False, float(value), thickness, cv2.LINE_8, _SHIFT)


def _disc(img: np.ndarray, x: float, y: float, rx: float, ry: float, value: float, angle: float = 0.0) -> None:
    size = img.shape[0]
    centre = (round(x * size * (1 << _SHIFT)), round(y * size * (1 << _SHIFT)))
    axes = (max(1, round(rx * size * (1 << _SHIFT))), max(1, round(ry * size * (1 << _SHIFT))))
    cv2.ellipse(img, centre, axes, angle, 0, 360, float(value), -1, cv2.LINE_8, _SHIFT)


def _blur(img: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur with `sigma` in units of the width."""
    s = sigma * img.shape[0]
    return cv2.GaussianBlur(img, (0, 0), s) if s > 0.3 else img


def _field(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Smooth random field in 0..1 with about `cells` blobs across the image."""
    small = rng.random((cells + 3, cells + 3)).astype(np.float32)
    big = cv2.resize(small, (size + 3 * size // cells, size + 3 * size // cells), interpolation=cv2.INTER_CUBIC)
    o = size // (2 * cells)
    return np.clip(big[o:o + size, o:o + size], 0, 1)


@dataclass
class _Chest:
    """The geometry of one film before pose: lung outlines and masks, in units of the width."""

    a: Anatomy
    size: int
    lungs: tuple[np.ndarray, np.ndarray]  # polygon of each lung field (image left, image right)
    masks: tuple[np.ndarray, np.ndarray]  # float32 masks of the lung fields (heart cut out)
    heart: np.ndarray  # float32 mask of the heart
    hila: tuple[tuple[float, float], tuple[float, float]]
    airway: np.ndarray  # float32 mask of the trachea and main bronchi
    atelectasis_side: int  # the lung whose dome is raised, 0 for none

    @staticmethod
    def index(s: int) -> int:
        """0 for the lung on the image left (s = -1), 1 for the one on the image right (s = +1)."""
        return 0 if s < 0 else 1

    def lung_box(self, s: int) -> tuple[float, float, float, float]:
        p = self.lungs[self.index(s)]
        return float(p[:, 0].min()), float(p[:, 0].max()), float(p[:, 1].min()), float(p[:, 1].max())

    def point_in_lung(self, rng: np.random.Generator, s: int, margin: float, y_range: tuple[float, float] = (0, 1),
                      lateral: float = 0.0) -> tuple[float, float]:
        """A random point of lung `s` at least `margin` inside it, its height a fraction in `y_range`."""
        x0, x1, y0, y1 = self.lung_box(s)
        mask, n = self.masks[self.index(s)], self.size
        for _ in range(60):
            y = y0 + (y1 - y0) * rng.uniform(*y_range)
            f = rng.uniform(lateral, 1.0)  # 0 medial .. 1 lateral
            x = (x0 + (x1 - x0) * (1 - f)) if s < 0 else (x0 + (x1 - x0) * f)
            probes = ((x, y), (x - margin, y), (x + margin, y), (x, y - margin), (x, y + margin))
            if all(0 <= px < 1 and 0 <= py < 1 and mask[int(py * n), int(px * n)] > 0.95 for px, py in probes):
                return x, y
        x, y = self.hila[self.index(s)]
        return x + s * 0.08, y


def _lung_outline(a: Anatomy, s: int, raise_dome: float = 0.0) -> np.ndarray:
    """Polygon of the lung field on side `s` (-1 image left, +1 image right), clockwise from the apex."""
    m, tw = a.mediastinum_half, a.thorax_half
    dome = a.dome[0 if s < 0 else 1] + raise_dome
    cp = a.cp_y - (0.6 * raise_dome)
    u = np.linspace(0.0, 1.0, 24)
    lateral = m + (tw - m) * (0.3 + 0.7 * np.sin(np.pi / 2 * np.minimum(u / 0.85, 1.0)) ** 0.6)
    side = np.stack([a.cx + s * lateral, a.apex_y + u * (cp - a.apex_y)], 1)
    v = np.linspace(0.0, 1.0, 20)[1:]
    medial_y = cp - 0.55 * dome
    base = np.stack([a.cx + s * (tw - v * (tw - m)), cp + (medial_y - cp) * v - dome * np.sin(np.pi * v ** 0.85)], 1)
    top = np.array([[a.cx + s * m, a.apex_y + 0.045], [a.cx + s * (m + 0.3 * (tw - m) * 0.35), a.apex_y + 0.008]])
    return np.concatenate([side, base, top])


def _chest(a: Anatomy, size: int, atelectasis: np.random.Generator | None) -> _Chest:
    """Lung fields, heart and hila; atelectasis (its stream, if present) raises one dome."""
    raise_side, raised = 0, 0.0
    if atelectasis is not None:
        raise_side, raised = (-1 if atelectasis.random() < 0.5 else 1), atelectasis.uniform(0.045, 0.075)
    lungs = tuple(_lung_outline(a, s, raised if s == raise_side else 0.0) for s in (-1, 1))
    heart = np.zeros((size, size), np.float32)
    width = a.ctr * 2 * a.thorax_half
    hx, hy = a.cx + 0.14 * width, a.cp_y - 0.5 * a.dome[1] - 0.06
    _disc(heart, hx, hy - max(0.0, width - 0.3) * 0.3, width / 2, 0.4 * width + 0.01, 1.0, -12.0)
    _disc(heart, a.cx + 0.01, hy - 0.11, a.mediastinum_half * 1.05, 0.12, 1.0)  # great vessels
    _disc(heart, a.cx + a.mediastinum_half * 0.9, a.apex_y + 0.17, 0.028, 0.025, 1.0)  # aortic knob
    heart = _blur(heart, 0.006)
    airway = np.zeros((size, size), np.float32)  # trachea and main bronchi, pulled towards a collapsed lung
    carina = (a.cx + 0.006 + 0.02 * raise_side, a.apex_y + 0.37 * (a.cp_y - a.apex_y) - 0.05)
    _line(airway, np.array([[a.cx, -0.01], [a.cx + 0.004, a.apex_y], carina]), 1.0, 0.024)
    for s, dy in ((-1, 0.035), (1, 0.055)):
        _line(airway, np.array([carina, (carina[0] + s * 0.055, carina[1] + dy)]), 1.0, 0.016)
    airway = _blur(airway, 0.004)
    masks = []
    for poly in lungs:
        m = np.zeros((size, size), np.float32)
        _fill(m, poly, 1.0)
        masks.append(_blur(m, 0.007) * (1.0 - heart))
    hila = ((a.cx - a.mediastinum_half - 0.035, a.apex_y + 0.42 * (a.cp_y - a.apex_y)),
            (a.cx + a.mediastinum_half + 0.035, a.apex_y + 0.45 * (a.cp_y - a.apex_y)))
    return _Chest(a, size, lungs, (masks[0], masks[1]), heart, hila, airway, raise_side)


def _body(c: _Chest) -> np.ndarray:
    """Soft tissue: brightest at the midline where the body is thickest; neck and shoulders at the top."""
    a, n = c.a, c.size
    xs, ys = _grid(n)
    t = np.clip(1.0 - ((xs - a.cx) / a.body_half) ** 2, 0.0, 1.0)
    tissue = a.tissue * (0.3 + 0.7 * np.sqrt(t)) * np.ones_like(ys)
    outline = np.zeros((n, n), np.float32)
    b, top = a.body_half, a.apex_y
    half = [(0.085, -0.02), (0.09, 0.035), (0.14, 0.06), (0.26, top - 0.035), (b * 0.93, top - 0.01),
            (b * 1.01, top + 0.05), (b, top + 0.25), (b * 0.97, 1.02)]
    _fill(outline, np.array([(a.cx + x, y) for x, y in half] + [(a.cx - x, y) for x, y in reversed(half)]), 1.0)
    if a.breasts:
        for s in (-1, 1):
            _disc(outline, a.cx + s * a.thorax_half * 0.62, a.cp_y - 0.05, 0.14, 0.09, 1.12)
    return tissue * _blur(outline, 0.015)


def _vessels(c: _Chest, rng: np.random.Generator, sparse: bool) -> np.ndarray:
    """Branching vascular markings from each hilum, tapering towards the periphery (7 trees a side)."""
    n, steps = c.size, 4
    img = np.zeros((n, n), np.float32)
    side = np.repeat([-1.0, 1.0], 7)
    x, y = np.repeat([h[0] for h in c.hila], 7), np.repeat([h[1] for h in c.hila], 7)
    angle = np.tile(np.linspace(-1.25, 1.35, 7), 2) + rng.normal(0, 0.12, 14)
    length = 0.1 + rng.uniform(0, 0.04, 14)
    width, value = 0.01, 0.085 * (0.55 if sparse else 1.0)
    for _ in range(4):  # each generation branches in two, thinner, fainter and shorter
        heading = angle[:, None] + np.cumsum(rng.normal(0, 0.12, (len(x), steps)), axis=1)
        step = (length / steps)[:, None]
        px = np.concatenate([x[:, None], x[:, None] + np.cumsum(side[:, None] * np.cos(heading) * step, 1)], 1)
        py = np.concatenate([y[:, None], y[:, None] + np.cumsum(np.sin(heading) * step, 1)], 1)
        _lines(img, np.stack([px, py], -1), value, width)
        x, y, side = np.repeat(px[:, -1], 2), np.repeat(py[:, -1], 2), np.repeat(side, 2)
        angle = np.repeat(heading[:, -1], 2) + np.tile([-0.35, 0.35], len(x) // 2) + rng.normal(0, 0.1, len(x))
        length, width, value = np.repeat(length, 2) * 0.75, width * 0.62, value * 0.85
    return _blur(img, 0.003) * (c.masks[0] + c.masks[1])


def _bones(c: _Chest) -> np.ndarray:
    """Spine, posterior and anterior ribs, clavicles and the humeral heads (drawn on separate layers, added)."""
    a, n = c.a, c.size
    cortex, medulla, anterior, other = (np.zeros((n, n), np.float32) for _ in range(4))
    spine = 0.03
    cv2.rectangle(other, (round((a.cx - spine) * n), 0), (round((a.cx + spine) * n), n), 0.35, -1)
    _lines(other, [np.array([[a.cx - spine, y], [a.cx + spine, y + 0.004]]) for y in np.arange(0.03, 1.0, 0.048)],
           0.15, 0.006)  # disc spaces
    t = np.linspace(0.0, 1.0, 18)
    u = np.linspace(0.0, 1.0, 10)
    posterior, anterior_ribs = [], []
    for s in (-1, 1):
        x_lateral = c.lung_box(s)[1 if s > 0 else 0]
        for k in range(10):
            y0 = a.apex_y - 0.015 + k * a.rib_gap
            if y0 > a.cp_y - 0.01:
                break
            reach = abs(x_lateral - a.cx) - 0.015 - 0.03 * max(0.0, 2 - k) / 2
            x = a.cx + s * (0.03 + t * reach)
            y = y0 - 0.025 * np.sin(np.pi * t * 0.75) + (0.03 + 0.004 * k) * t ** 3
            posterior.append(np.stack([x, y], 1))
            if k < 7:  # the anterior rib comes back down, fainter, towards the sternum
                anterior_ribs.append(np.stack([x[-1] - s * u * reach * 0.55, y[-1] + 0.015 * u + 0.09 * u ** 1.5], 1))
        clav = np.stack([a.cx + s * (0.035 + t * 0.25), a.clavicle_y + 0.025 - 0.06 * t + 0.025 * t ** 2], 1)
        _line(other, clav, 0.85, 0.02)
        _disc(other, a.cx + s * (a.body_half - 0.035), a.apex_y + 0.02, 0.05, 0.055, 0.6)  # humeral head
    _lines(cortex, posterior, 1.0, 0.017)
    _lines(medulla, posterior, 1.0, 0.008)  # the medulla is less dense than the cortex
    _lines(anterior, anterior_ribs, 1.0, 0.014)
    bones = cortex * 0.5 - medulla * 0.1 + anterior * 0.25 + other
    return _blur(bones, 0.002) * a.bone


# ----------------------------------------------------------------------------- findings

# Each painter fills part of the lungs (an opacity), adds density or lucency to the film's layers, and
# returns the region it drew, a float32 mask before pose.  Cardiomegaly, and the hyperinflation of
# emphysema, change the anatomy instead (`_effective_anatomy`); atelectasis also raises a dome (`_chest`).


@dataclass
class _Layers:
    density: np.ndarray  # added to the film
    lung_factor: np.ndarray  # multiplies the lung lucency (1: normal, >1 darker, 0 airless)
    vessel_factor: np.ndarray  # multiplies the vascular markings

    def fill(self, opacity: np.ndarray) -> None:
        """Replace air by fluid or tissue (0..1 of it): overlapping opacities never exceed soft tissue."""
        self.lung_factor *= 1 - np.clip(opacity, 0, 1)


def _region(c: _Chest, s: int) -> np.ndarray:
    return c.masks[c.index(s)]


def _nodule(c: _Chest, rng: np.random.Generator, layers: _Layers) -> np.ndarray:
    """One or a few small, well-defined round opacities (2-4 % of the width), some calcified."""
    mask = np.zeros((c.size, c.size), np.float32)
    for _ in range(int(rng.choice((1, 2, 2, 3, 3, 4, 4, 5)))):
        s = -1 if rng.random() < 0.5 else 1
        d = rng.uniform(0.024, 0.04)
        x, y = c.point_in_lung(rng, s, d, (0.1, 0.85))
        _disc(mask, x, y, d / 2, d / 2 * rng.uniform(0.85, 1.0), 1.0, rng.uniform(0, 180))
    mask = _blur(mask, 0.0015)
    layers.fill(mask * rng.uniform(0.85, 1.0))
    if rng.random() < 0.35:
        layers.density += mask * c.a.bone * 0.8
    return mask


def _mass(c: _Chest, rng: np.random.Generator, layers: _Layers) -> np.ndarray:
    """A large (8-15 % of the width) lobulated opacity, its margin smooth or spiculated."""
    mask = np.zeros((c.size, c.size), np.float32)
    s = -1 if rng.random() < 0.5 else 1
    d = rng.uniform(0.08, 0.15)
    x, y = c.point_in_lung(rng, s, d * 0.4, (0.15, 0.8))
    for _ in range(3):  # lobulated
        dx, dy = rng.normal(0, d * 0.1, 2)
        _disc(mask, x + dx, y + dy, d / 2 * rng.uniform(0.8, 1.0), d / 2 * rng.uniform(0.75, 0.95), 1.0,
              rng.uniform(0, 180))
    if rng.random() < 0.5:  # spicules
        angles = rng.uniform(0, 2 * math.pi, int(rng.integers(8, 15)))
        reach = rng.uniform(0.65, 0.85, (len(angles), 1))
        rays = np.stack([np.cos(angles), np.sin(angles)], 1)
        _lines(mask, np.stack([(x, y) + rays * d * 0.4, (x, y) + rays * d * reach], 1), 0.8, 0.004)
    mask = _blur(mask, 0.003)
    layers.fill(mask * rng.uniform(0.88, 1.0))
    return mask


def _effusion(c: _Chest, rng: np.random.Generator, layers: _Layers) -> np.ndarray:
    """Fluid filling the base of one or both lungs up to a meniscus that climbs the lateral chest wall."""
    a, n = c.a, c.size
    xs, ys = _grid(n)
    sides = (-1, 1) if rng.random() < 0.3 else ((-1,) if rng.random() < 0.5 else (1,))
    total = np.zeros((n, n), np.float32)
    for s in sides:
        lateral_top = a.cp_y - rng.uniform(0.13, 0.28)
        medial_top = lateral_top + rng.uniform(0.07, 0.13)
        f = np.clip((s * (xs - a.cx) - a.mediastinum_half) / (a.thorax_half - a.mediastinum_half), 0, 1)
        meniscus = medial_top - (medial_top - lateral_top) * f ** 2.5
        depth = ys - meniscus
        fluid = np.clip(depth / 0.015, 0, 1) * (0.55 + 0.4 * np.clip(depth / 0.07, 0, 1))
        total += fluid * _blur(_region(c, s), 0.004)
    total = np.clip(total, 0, 1)
    layers.fill(total)
    layers.vessel_factor *= 1 - total
    return total


def _pneumothorax(c: _Chest, rng: np.random.Generator, layers: _Layers) -> np.ndarray:
    a, n = c.a, c.size
    s = -1 if rng.random() < 0.5 else 1
    poly = c.lungs[c.index(s)]
    hx, _ = c.hila[c.index(s)]
    kx, ky = rng.uniform(0.62, 0.85), rng.uniform(0.7, 0.88)
    pivot = np.array([hx, a.cp_y])
    collapsed_poly = pivot + (poly - pivot) * np.array([kx, ky])
    collapsed = np.zeros((n, n), np.float32)
    _fill(collapsed, collapsed_poly, 1.0)
    lung = _region(c, s)
    gas = np.clip(lung - _blur(collapsed, 0.002) * 1.2, 0, 1) * (lung > 0.5)
    gas = _blur(gas.astype(np.float32), 0.002)
    line = np.zeros((n, n), np.float32)
    _line(line, collapsed_poly, 1.0, 1.0 / 256)
    line *= np.clip(_blur(gas, 0.004) * 3, 0, 1)
    layers.lung_factor *= 1 + 0.4 * gas
    layers.vessel_factor *= 1 - gas
    layers.density += _blur(line, 0.001) * a.lung * 0.55
    return gas


def _atelectasis(c: _Chest, rng: np.random.Generator, layers: _Layers) -> np.ndarray:
    """The raised dome is part of the chest (`_chest`); here the band or wedge of collapsed lung."""
    n, side = c.size, c.atelectasis_side
    mask = np.zeros((n, n), np.float32)
    x0, x1, y0, y1 = c.lung_box(side)
    if rng.random() < 0.65:  # a plate-like band in the lower zone
        y = y0 + (y1 - y0) * rng.uniform(0.6, 0.78)
        xa, xb = (x1 - 0.02, x0 + (x1 - x0) * 0.35) if side < 0 else (x0 + 0.02, x1 - (x1 - x0) * 0.35)
        tilt = rng.uniform(-0.03, 0.04)
        _line(mask, np.array([[xa, y + tilt], [(xa + xb) / 2, y + tilt / 2 + 0.005], [xb, y]]), 1.0,
              rng.uniform(0.025, 0.04))
        mask = _blur(mask, 0.006)
    else:  # a wedge from the hilum to the periphery
        hx, hy = c.hila[c.index(side)]
        lat = x0 if side < 0 else x1
        top = y0 + (y1 - y0) * rng.uniform(0.08, 0.3)
        _fill(mask, np.array([[hx, hy], [lat - side * 0.01, top], [lat - side * 0.02, top + rng.uniform(0.15, 0.24)]]),
              1.0)
        mask = _blur(mask, 0.008)
    mask *= _region(c, side)
    layers.fill(mask * rng.uniform(0.75, 0.9))
    return mask


def _lobe(c: _Chest, rng: np.random.Generator, s: int) -> np.ndarray:
    """Upper or lower zone of lung `s`, bounded by a fissure-like straight border."""
    n = c.size
    xs, ys = _grid(n)
    _, _, y0, y1 = c.lung_box(s)
    fissure = y0 + (y1 - y0) * rng.uniform(0.38, 0.5)
    slope = rng.uniform(-0.15, 0.15)
    border = fissure + slope * (xs - c.a.cx)
    upper = rng.random() < 0.45
    zone = np.clip((border - ys) / 0.006, 0, 1) if upper else np.clip((ys - border) / 0.006, 0, 1)
    return zone * _region(c, s)


def _consolidation(c: _Chest, rng: np.random.Generator, layers: _Layers) -> np.ndarray:
    s = -1 if rng.random() < 0.5 else 1
    patch = 0.65 + 0.35 * np.clip((_field(rng, c.size, 6) - 0.2) * 2.5, 0, 1)
    mask = _blur(_lobe(c, rng, s) * patch, 0.004)
    layers.fill(mask * rng.uniform(0.88, 0.98))
    layers.vessel_factor *= 1 - mask
    return mask


def _pneumonia(c: _Chest, rng: np.random.Generator, layers: _Layers) -> np.ndarray:
    """Patchy, multifocal airspace opacities, less dense than a consolidation, with air bronchograms."""
    n = c.size
    sides = (-1, 1) if rng.random() < 0.3 else ((-1,) if rng.random() < 0.5 else (1,))
    blobs = np.zeros((n, n), np.float32)
    bronchi = np.zeros((n, n), np.float32)
    for s in sides:
        hx, hy = c.hila[c.index(s)]
        for _ in range(int(rng.integers(2, 5))):
            x, y = c.point_in_lung(rng, s, 0.03, (0.25, 0.9), lateral=0.2)
            r = rng.uniform(0.055, 0.095)
            _disc(blobs, x, y, r, r * rng.uniform(0.7, 1.0), 1.0, rng.uniform(0, 180))
            ang = math.atan2(y - hy, s * (x - hx))  # away from the hilum
            bx, by = x - s * math.cos(ang) * r * 0.6, y - math.sin(ang) * r * 0.6
            mx, my = bx + s * math.cos(ang) * r * 0.6, by + math.sin(ang) * r * 0.6
            for turn in (-0.35, 0.3):  # air bronchograms: a dark tube that branches towards the periphery
                ex, ey = mx + s * math.cos(ang + turn) * r * 0.7, my + math.sin(ang + turn) * r * 0.7
                _line(bronchi, np.array([[bx, by], [mx, my], [ex, ey]]), 1.0, 0.006)
    texture = np.clip((_field(rng, n, 14) - 0.2) * 2.5, 0, 1)
    mask = _blur(blobs, 0.01) * (0.5 + 0.5 * texture) * (_region(c, -1) + _region(c, 1))
    layers.fill(mask * rng.uniform(0.75, 0.88) * (1 - 0.45 * _blur(bronchi, 0.002)))
    layers.vessel_factor *= 1 - 0.7 * np.clip(mask, 0, 1)
    return mask


def _infiltration(c: _Chest, rng: np.random.Generator, layers: _Layers) -> np.ndarray:
    """Faint, ill-defined mottled haze over large parts of one or both lungs."""
    n = c.size
    zones = np.clip((_field(rng, n, 5) - 0.22) * 2.5, 0, 1)
    texture = _field(rng, n, 32)
    if rng.random() < 0.4:  # one lung only
        lungs = _region(c, -1 if rng.random() < 0.5 else 1)
    else:
        lungs = _region(c, -1) + _region(c, 1)
    mask = zones * lungs
    layers.fill(mask * (0.35 + 1.3 * texture ** 2) * rng.uniform(0.34, 0.42))
    return mask


def _edema(c: _Chest, rng: np.random.Generator, layers: _Layers) -> np.ndarray:
    a, n = c.a, c.size
    xs, ys = _grid(n)
    haze = np.zeros((n, n), np.float32)
    lines: list[np.ndarray] = []
    for s, (hx, hy) in zip((-1, 1), c.hila):
        sx, sy = rng.uniform(0.07, 0.1), rng.uniform(0.09, 0.13)
        haze += np.exp(-(((xs - hx - s * 0.02) / sx) ** 2 + ((ys - hy) / sy) ** 2) / 2)
        x0, x1, y0, y1 = c.lung_box(s)
        lat = x0 if s < 0 else x1
        for _ in range(int(rng.integers(5, 9))):  # Kerley B lines: short horizontal lines at the periphery
            y = y0 + (y1 - y0) * rng.uniform(0.6, 0.92)
            length = rng.uniform(0.02, 0.035)
            start = lat - s * rng.uniform(0.005, 0.02)
            lines.append(np.array([[start, y], [start - s * length, y + rng.uniform(-0.003, 0.003)]]))
    kerley = np.zeros((n, n), np.float32)
    _lines(kerley, lines, 1.0, 1.0 / 256)
    lungs = _region(c, -1) + _region(c, 1)
    mask = np.clip(haze, 0, 1) * lungs
    layers.fill((mask * rng.uniform(0.45, 0.6) + _blur(kerley, 0.0015) * 0.6) * lungs)
    return np.maximum(mask, kerley * lungs)


def _emphysema(c: _Chest, rng: np.random.Generator, layers: _Layers) -> np.ndarray:
    """Large dark lungs and a low flat diaphragm are part of the anatomy (`_effective_anatomy`); bullae here."""
    n = c.size
    lungs = _region(c, -1) + _region(c, 1)
    layers.vessel_factor *= 0.55
    rings = np.zeros((n, n), np.float32)
    inside = np.zeros((n, n), np.float32)
    for _ in range(int(rng.integers(0, 3))):
        s = -1 if rng.random() < 0.5 else 1
        r = rng.uniform(0.025, 0.05)
        x, y = c.point_in_lung(rng, s, r, (0.05, 0.45))
        _disc(inside, x, y, r, r, 1.0)
        cv2.circle(rings, (round(x * n * 16), round(y * n * 16)), round(r * n * 16), 1.0, 1, cv2.LINE_8, _SHIFT)
    layers.lung_factor *= 1 + 0.08 * _blur(inside, 0.003)
    layers.vessel_factor *= 1 - 0.8 * inside
    layers.density += _blur(rings, 0.001) * c.a.lung * 0.35 * lungs
    return lungs


def _fibrosis(c: _Chest, rng: np.random.Generator, layers: _Layers) -> np.ndarray:
    """A reticular net (jittered cells, some walls missing) over the bases and the periphery."""
    n = c.size
    zone = np.zeros((n, n), np.float32)
    for s in (-1, 1):
        x0, x1, y0, y1 = c.lung_box(s)
        lat, reach = (x0, x1 - x0) if s < 0 else (x1, x1 - x0)
        top = y0 + (y1 - y0) * rng.uniform(0.35, 0.55)
        _fill(zone, np.array([[lat, top], [lat - s * reach * 0.45, top + 0.08], [lat - s * reach * 0.8, y1 - 0.04],
                              [lat - s * reach * 0.8, y1 + 0.02], [lat, y1 + 0.02]]), 1.0)
    cell = rng.uniform(0.016, 0.024)
    turn = rng.uniform(0, math.pi / 2)
    gu, gv = np.meshgrid(np.arange(-0.75, 0.75, cell), np.arange(-0.75, 0.75, cell))
    gx, gy = 0.5 + gu * math.cos(turn) - gv * math.sin(turn), 0.5 + gu * math.sin(turn) + gv * math.cos(turn)
    nodes = np.stack([gx, gy], -1) + rng.uniform(-0.4, 0.4, gx.shape + (2,)) * cell
    walls = [np.stack([nodes[:, :-1], nodes[:, 1:]], 2).reshape(-1, 2, 2),
             np.stack([nodes[:-1], nodes[1:]], 2).reshape(-1, 2, 2)]
    segments = np.concatenate(walls)
    start = np.clip((segments[:, 0] * n).astype(int), 0, n - 1)
    inside = zone[start[:, 1], start[:, 0]] > 0
    segments = segments[inside & (rng.random(len(segments)) < 0.75)]
    net = np.zeros((n, n), np.float32)
    _lines(net, segments, 1.0, 1.0 / 256)
    lungs = _region(c, -1) + _region(c, 1)
    zone = _blur(zone, 0.02) * lungs
    net = _blur(net, 0.0015) * zone
    layers.fill(net * 0.5 + zone * 0.12)
    return zone


def _pleural_thickening(c: _Chest, rng: np.random.Generator, layers: _Layers) -> np.ndarray:
    """Lumpy bands of pleura along the lateral chest wall or over the apex, sometimes calcified."""
    n = c.size
    band = np.zeros((n, n), np.float32)
    calcified = np.zeros((n, n), np.float32)
    sides = (-1, 1) if rng.random() < 0.35 else ((-1,) if rng.random() < 0.5 else (1,))
    for s in sides:
        poly = c.lungs[c.index(s)]
        wall = poly[:24]  # the lateral wall, apex first
        if rng.random() < 0.3:  # an apical cap
            part = np.concatenate([poly[-1:], wall[:6]])
        else:
            start = int(rng.integers(3, 11))
            part = wall[start:start + int(rng.integers(9, 14))]
        width = rng.uniform(0.03, 0.045)
        for (x0, y0), (x1, y1) in zip(part[:-1], part[1:]):  # plaques along the wall
            for t in (0.0, 0.5):
                x, y = x0 + t * (x1 - x0), y0 + t * (y1 - y0)
                r = width * rng.uniform(0.45, 0.8)
                _disc(band, x - s * r * 0.5, y, r, r * 1.8, 1.0, math.degrees(math.atan2(x1 - x0, y1 - y0)))
        if rng.random() < 0.3:
            _line(calcified, part - np.array([s * width * 0.4, 0.0]), 1.0, 0.006)
    lungs = np.clip((_region(c, -1) + _region(c, 1)) * 1.5, 0, 1)
    band = _blur(band, 0.004) * lungs
    layers.fill(band * rng.uniform(0.85, 1.0))
    layers.density += _blur(calcified, 0.002) * band * c.a.bone * 1.5
    return band


def _hernia(c: _Chest, rng: np.random.Generator, layers: _Layers) -> np.ndarray:
    """A hiatal hernia: a round soft-tissue sac behind the heart holding gas above a flat fluid level."""
    a, n = c.a, c.size
    r = rng.uniform(0.05, 0.075)
    x, y = a.cx + rng.uniform(0.0, 0.06), a.cp_y - a.dome[1] * 0.5 - rng.uniform(0.04, 0.08)
    sac = np.zeros((n, n), np.float32)
    _disc(sac, x, y, r, r * rng.uniform(0.8, 0.95), 1.0)
    sac = _blur(sac, 0.004)
    gas = np.zeros((n, n), np.float32)
    _disc(gas, x, y - 0.25 * r, r * 0.7, r * 0.55, 1.0)
    level = y - 0.25 * r + rng.uniform(0.0, 0.3) * r
    gas[int(level * n):] = 0  # the air-fluid level: gas above, fluid below a flat line
    gas = _blur(gas, 0.0015)
    layers.density += sac * a.lung * 0.3 - gas * a.lung * 0.75
    return sac


_PAINTERS: dict[str, Callable[[_Chest, np.random.Generator, _Layers], np.ndarray]] = {
    "Atelectasis": _atelectasis, "Nodule": _nodule, "Mass": _mass, "Effusion": _effusion, "Pneumothorax": _pneumothorax,
    "Consolidation": _consolidation, "Pneumonia": _pneumonia, "Infiltration": _infiltration, "Edema": _edema,
    "Emphysema": _emphysema, "Fibrosis": _fibrosis, "Pleural_Thickening": _pleural_thickening, "Hernia": _hernia,
}


# ----------------------------------------------------------------------------- rendering


def _finding_streams(r: Radiograph) -> dict[str, np.random.Generator]:
    """A random stream per finding of `r`: a chronic one is the same on every follow-up, so it looks the same."""
    streams = {}
    for finding in r.labels:
        keys = (_FINDING, r.seed, r.patient_id, FINDINGS.index(finding))
        streams[finding] = _rng(*keys) if finding in CHRONIC else _rng(*keys, 1 + r.follow_up)
    return streams


def _pose(r: Radiograph, size: int) -> tuple[np.ndarray, dict[str, float]]:
    """The affine matrix of the patient's position on the detector, and the film's exposure."""
    rng = _rng(_IMAGE, r.seed, r.patient_id, r.follow_up, _POSE)
    angle, scale = rng.uniform(-3.0, 3.0), rng.uniform(0.96, 1.03)
    dx, dy = rng.uniform(-0.025, 0.025, 2) * size
    m = cv2.getRotationMatrix2D((size / 2, size / 2), angle, scale)
    m[:, 2] += (dx, dy)
    exposure = {"low": rng.uniform(-0.08, 0.0), "high": rng.uniform(0.92, 1.08), "curve": rng.uniform(1.2, 1.8),
                "noise": rng.uniform(2.0, 5.0), "marker": float(rng.random() < 0.12), "left": float(rng.random() < 0.5)}
    return m, exposure


def render_with_regions(r: Radiograph, size: int = 256) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """The film of `r` (uint8, size x size) and, for each of its findings, a bool mask of where it was drawn."""
    if size < 64:
        raise ValueError(f"size must be at least 64 pixels, got {size}")
    rngs = _finding_streams(r)
    anatomy = _draw_anatomy(_rng(_PATIENT, r.seed, r.patient_id, _ANATOMY), r.gender)
    c = _chest(_effective_anatomy(anatomy, r, rngs), size, rngs.get("Atelectasis"))
    a = c.a
    layers = _Layers(density=np.zeros((size, size), np.float32), lung_factor=np.ones((size, size), np.float32),
                     vessel_factor=np.ones((size, size), np.float32))
    regions = {f: c.heart if f == "Cardiomegaly" else _PAINTERS[f](c, rngs[f], layers) for f in r.labels}

    xs, ys = _grid(size)
    lungs = c.masks[0] + c.masks[1]
    depth = 0.8 + 0.2 * np.clip(np.sin(np.pi * (ys - a.apex_y) / (a.cp_y - a.apex_y)), 0, 1)
    texture = 0.94 + 0.12 * _field(_rng(_PATIENT, r.seed, r.patient_id, _PARENCHYMA), size, 12)
    film = _body(c) - a.lung * lungs * depth * texture * layers.lung_factor - a.lung * 0.3 * c.airway * (1 - lungs)
    if a.gastric_bubble > 0:
        bubble = np.zeros((size, size), np.float32)
        _disc(bubble, a.cx + a.thorax_half * 0.45, a.cp_y - a.dome[1] * 0.3 + a.gastric_bubble * 1.1,
              a.gastric_bubble * 1.3, a.gastric_bubble, 1.0)
        film -= _blur(bubble, 0.004) * a.lung * 0.5 * (1 - lungs)
    vessels = _vessels(c, _rng(_PATIENT, r.seed, r.patient_id, _VESSELS), "Emphysema" in r.labels)
    film += vessels * layers.vessel_factor + _bones(c) + layers.density
    m, e = _pose(r, size)
    film = cv2.warpAffine(film, m, (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)

    # The film's characteristic curve: contrast is highest in the dark lungs, bright tissue is compressed.
    k = e["curve"]
    film = np.clip((film - e["low"]) / (e["high"] - e["low"]), 0, 1)
    film = (1 - np.exp(-k * film)) * np.float32(255.0 / (1 - math.exp(-k)))
    noise_rng = _rng(_IMAGE, r.seed, r.patient_id, r.follow_up, _NOISE)
    oy, ox, flip = noise_rng.integers(0, (size, size, 1), endpoint=True)
    noise = _noise_bank(size)[oy:oy + size, ox:ox + size]
    film += (noise[::-1] if flip else noise) * np.float32(e["noise"])
    img = np.clip(np.rint(film), 0, 255).astype(np.uint8)
    if e["marker"]:  # the lead marker of the patient's left (image right) or right side, burned in
        letter, x = ("L", 0.86) if e["left"] else ("R", 0.06)
        cv2.putText(img, letter, (round(size * x), round(size * 0.1)), cv2.FONT_HERSHEY_SIMPLEX, size / 400, 235,
                    max(1, size // 128), cv2.LINE_AA)
    warped = {f: cv2.warpAffine(mask, m, (size, size), flags=cv2.INTER_LINEAR) > 0.5 for f, mask in regions.items()}
    return img, warped


def render(r: Radiograph, size: int = 256) -> np.ndarray:
    """The film of `r`: uint8, size x size, air black and bone bright."""
    return render_with_regions(r, size)[0]


# ----------------------------------------------------------------------------- files


def png_bytes(img: np.ndarray) -> bytes:
    ok, data = cv2.imencode(".png", img)
    if not ok:
        raise ValueError(f"cv2 could not encode an image of shape {img.shape} as PNG")
    return data.tobytes()


def write_data_entry(path: Path, cohort: Sequence[Radiograph]) -> None:
    """Data_Entry_2017.csv: the real file's header and columns, a trailing empty column on every row."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    buffer.write(CSV_HEADER + "\n")
    for r in sorted(cohort, key=lambda r: r.name):
        writer.writerow(r.csv_row())
    path.write_text(buffer.getvalue(), newline="\n")


def write_splits(out: Path, cohort: Sequence[Radiograph]) -> None:
    for name, test in ((TRAIN_VAL_LIST, False), (TEST_LIST, True)):
        names = sorted(r.name for r in cohort if r.test == test)
        (out / name).write_text("".join(f"{n}\n" for n in names), newline="\n")


def summarize(cohort: Sequence[Radiograph], seconds: float = 0.0) -> CohortSummary:
    test = [r for r in cohort if r.test]
    return CohortSummary(
        images=len(cohort), patients=len({r.patient_id for r in cohort}), test_images=len(test),
        test_patients=len({r.patient_id for r in test}), no_finding=sum(not r.labels for r in cohort),
        positives={f: sum(f in r.labels for r in cohort) for f in FINDINGS},
        test_positives={f: sum(f in r.labels for r in test) for f in FINDINGS}, seconds=seconds)


def write_cohort(out: Path, patients: int = 60, images_per_patient: tuple[int, int] = (1, 5), size: int = 256,
                 seed: int = 0, test_fraction: float = 0.2,
                 progress: Callable[[int], None] | None = None) -> CohortSummary:
    """Write a synthetic ChestX-ray14-style cohort under `out` (see the module docstring).

    `images_per_patient` is the inclusive range of follow-up films per patient; `progress(n)` is
    called after every PNG with the number just written (1).  Existing files are overwritten.
    """
    start = time.perf_counter()
    cohort = plan_cohort(patients, images_per_patient, seed, test_fraction)
    out = Path(out)
    (out / IMAGES_DIR).mkdir(parents=True, exist_ok=True)
    for r in cohort:
        (out / IMAGES_DIR / r.name).write_bytes(png_bytes(render(r, size)))
        if progress is not None:
            progress(1)
    write_data_entry(out / DATA_ENTRY_CSV, cohort)
    write_splits(out, cohort)
    return summarize(cohort, time.perf_counter() - start)
