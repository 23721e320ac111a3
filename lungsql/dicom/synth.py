"""A deterministic synthetic chest CT cohort, written as DICOM in the Kaggle DSB 2017 layout.

``write_cohort`` writes ``OUT/<patient_id>/<32 hex>.dcm`` (one folder per patient, file
names unrelated to slice order) and ``OUT/stage1_labels.csv`` (``id,cancer``).  Every
slice is a 512x512 int16 CT image (HU = stored + RESCALE_INTERCEPT) showing a body with
fat and muscle, two lungs with moving vessels, heart, ribs, spine and sternum, plus
Gaussian noise.  Positive patients (cancer = 1) carry 1 to 3 spherical soft-tissue nodules
of 5 to 30 mm inside a lung.  The same (patients, slices, seed) always give byte-identical
files: every random draw comes from a ``numpy`` generator keyed on (seed, patient, stream)
and every UID from ``pydicom.uid.generate_uid`` with fixed entropy sources.

The pieces are public so tests can forge inputs: ``plan_cohort`` / ``generate_patient``
describe patients, ``slice_pixels`` renders one slice, ``build_slice_dataset`` wraps any
pixel array into a complete CT Image Storage dataset.
"""

from __future__ import annotations

import hashlib
import io
import math
import time
from dataclasses import dataclass
from datetime import date, timedelta
from functools import lru_cache
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, CTImageStorage, ExplicitVRLittleEndian, generate_uid

#: Bumped whenever the same seed would draw different patients or pixels.
GENERATOR_VERSION = 2
ROWS = COLS = 512
RESCALE_SLOPE = 1.0
RESCALE_INTERCEPT = -1024.0
AIR_HU, PADDING_HU = -1000.0, -2000.0
HU_MIN, HU_MAX = -2048.0, 3071.0
SLICE_THICKNESSES = (1.0, 1.25, 1.5, 2.0, 2.5)
MANUFACTURER = "lungsql synthetic"
LABELS_CSV = "stage1_labels.csv"
RIB_TWIST = 0.002  # radians per mm of z: ribs are oblique, so their sections drift

# "Given Family Sex".  Patient 0 is always the first one (the web demo searches "ana").
NAMES: tuple[tuple[str, str, str], ...] = tuple(tuple(entry.split()) for entry in """
    Ana Fernandez F, Anthony Smith M, Maria Garcia F, Ananya Rao F, James Johnson M, Mary Williams F,
    Robert Brown M, Patricia Jones F, John Miller M, Jennifer Davis F, Michael Wilson M, Linda Moore F,
    David Taylor M, Elizabeth Anderson F, William Thomas M, Wei Zhang M, Mei Chen F, Hiroshi Tanaka M,
    Yuki Sato F, Omar Haddad M, Fatima Khan F, Carlos Lopez M, Lucia Martinez F, Pierre Dubois M,
    Claire Martin F, Hans Muller M, Greta Schmidt F, Olusegun Adeyemi M, Amara Okafor F, Ivan Petrov M,
    Olga Ivanova F, Rajesh Kumar M, Priya Sharma F, Joao Silva M, Beatriz Santos F, Sven Larsson M,
    Ingrid Johansson F, Giovanni Rossi M, Francesca Bianchi F, Kwame Mensah M, Aisha Bello F,
    Daniel Cohen M, Sarah Levi F, Mateo Hernandez M, Sofia Ramirez F""".split(","))

# Independent random streams, so that e.g. adding nodules never changes the anatomy or noise.
_PATIENT, _COHORT = 1, 2
_META, _ANATOMY, _NODULES, _NOISE, _SLICES = range(5)

Ellipse = tuple[float, float, float, float]  # centre x, centre y, half-axis x, half-axis y (mm)


def _rng(*keys: int) -> np.random.Generator:
    return np.random.default_rng([k % 2**64 for k in keys])


@dataclass(frozen=True)
class VolumeGeometry:
    """Where the voxels of a series lie in patient coordinates (LPS, mm)."""

    n_slices: int
    pixel_spacing: float
    slice_thickness: float  # also the spacing between slice centres
    origin: tuple[float, float, float]  # centre of the first pixel of slice 0
    rows: int = ROWS
    cols: int = COLS

    def z(self, index: int) -> float:
        return self.origin[2] + index * self.slice_thickness

    def t(self, index: int) -> float:
        """Fraction 0..1 of the way from the first slice to the last."""
        return index / (self.n_slices - 1) if self.n_slices > 1 else 0.5

    def position(self, index: int) -> tuple[float, float, float]:
        return (self.origin[0], self.origin[1], self.z(index))

    def voxel(self, point: Sequence[float]) -> tuple[int, int, int]:
        """Nearest (slice, row, column) of a point given in mm."""
        x, y, z = point
        return (round((z - self.origin[2]) / self.slice_thickness),
                round((y - self.origin[1]) / self.pixel_spacing),
                round((x - self.origin[0]) / self.pixel_spacing))


@dataclass(frozen=True)
class Vessel:
    """A pulmonary vessel: a tube whose section wanders smoothly with z."""

    lung: int  # 0 = right lung (-x), 1 = left lung (+x)
    u: float  # resting position in lung-normalised coordinates
    v: float
    amplitude: tuple[float, float]  # mm
    period: float  # mm of z per oscillation
    phase: float
    radius: float  # mm


@dataclass(frozen=True)
class Anatomy:
    """Per-patient body shape (mm, patient coordinates) and tissue densities (HU)."""

    body_center: tuple[float, float]
    body_radii: tuple[float, float]
    fat: float  # subcutaneous fat thickness
    lung_offset: float  # |x| of each lung centre from the body centre
    lung_shift: float  # y of the lung centres relative to the body centre
    lung_radii: tuple[float, float]
    spine_radius: float
    rib_count: int
    rib_phase: float
    lung_hu: int
    tissue_hu: int
    fat_hu: int
    bone_hu: int
    noise_sd: float
    vessels: tuple[Vessel, ...]

    @property
    def cavity(self) -> tuple[float, float]:
        """Half-axes of the thoracic cavity, inside muscle and ribs."""
        return (self.body_radii[0] - self.fat - 18.0, self.body_radii[1] - self.fat - 18.0)


@dataclass(frozen=True)
class Nodule:
    center: tuple[float, float, float]  # mm, patient coordinates; z is on a slice centre
    diameter_mm: float
    hu: int


@dataclass(frozen=True)
class Patient:
    """Everything needed to render and tag one patient's series."""

    seed: int
    index: int
    patient_id: str
    given_name: str
    family_name: str
    sex: str
    birth_date: date
    study_date: date
    label: int
    kvp: int
    geometry: VolumeGeometry
    anatomy: Anatomy
    nodules: tuple[Nodule, ...]
    instance_numbers: tuple[int, ...]
    study_uid: str
    series_uid: str
    frame_uid: str

    @property
    def name(self) -> str:
        return f"{self.given_name} {self.family_name}"

    @property
    def dicom_name(self) -> str:
        return f"{self.family_name}^{self.given_name}"

    @property
    def age_years(self) -> int:
        b, s = self.birth_date, self.study_date
        return s.year - b.year - ((s.month, s.day) < (b.month, b.day))


@dataclass(frozen=True)
class CohortSummary:
    patients: int
    positives: int
    files: int
    bytes: int  # total size of the DICOM files
    seconds: float


# ----------------------------------------------------------------------------- patients


def _uid(patient_id: str, seed: int, *what: object) -> str:
    return generate_uid(entropy_srcs=["lungsql-synth", str(seed), patient_id, *map(str, what)])


def _draw_vessel(rng: np.random.Generator) -> Vessel:
    r, angle = 0.85 * math.sqrt(rng.random()), rng.uniform(0, 2 * math.pi)  # uniform in a disc
    return Vessel(lung=int(rng.integers(2)), u=r * math.cos(angle), v=r * math.sin(angle),
                  amplitude=(rng.uniform(2, 10), rng.uniform(2, 10)), period=rng.uniform(80, 250),
                  phase=rng.uniform(0, 2 * math.pi), radius=rng.uniform(0.5, 1.5))


def _draw_anatomy(rng: np.random.Generator) -> Anatomy:
    """Body, lungs, bones and densities of one patient; lungs sit inside the rib cage."""
    ax = rng.uniform(130.0, 175.0)
    ay = ax * rng.uniform(0.65, 0.8)
    fat = rng.uniform(6.0, 18.0)
    cav_x, cav_y = ax - fat - 18.0, ay - fat - 18.0
    vessels = tuple(_draw_vessel(rng) for _ in range(int(rng.integers(20, 37))))
    return Anatomy(
        body_center=(rng.uniform(-5, 5), rng.uniform(-10, 10)), body_radii=(ax, ay), fat=fat,
        lung_offset=cav_x * rng.uniform(0.47, 0.53), lung_shift=cav_y * rng.uniform(-0.08, 0.02),
        lung_radii=(cav_x * rng.uniform(0.36, 0.43), cav_y * rng.uniform(0.7, 0.8)),
        spine_radius=rng.uniform(13, 17), rib_count=int(rng.integers(14, 19)),
        rib_phase=rng.uniform(0, 2 * math.pi), lung_hu=int(rng.integers(-870, -829)),
        tissue_hu=int(rng.integers(30, 56)), fat_hu=int(rng.integers(-115, -84)),
        bone_hu=int(rng.integers(600, 1001)), noise_sd=rng.uniform(10, 20), vessels=vessels,
    )


def _draw_geometry(rng: np.random.Generator, anatomy: Anatomy, n_slices: int) -> VolumeGeometry:
    """Field of view sized to the body (so pixel spacing is 0.6..0.9 mm), centred near it."""
    fov = int(np.clip(round(2 * anatomy.body_radii[0] * rng.uniform(1.12, 1.32)), 308, 460))
    spacing = fov / COLS  # a multiple of 1/512: exact in binary and short in decimal
    cx = round(anatomy.body_center[0]) + int(rng.integers(-6, 7))
    cy = round(anatomy.body_center[1]) + int(rng.integers(-6, 7))
    z0 = int(rng.integers(-800, -200)) / 2
    return VolumeGeometry(n_slices=n_slices, pixel_spacing=spacing,
                          slice_thickness=float(rng.choice(SLICE_THICKNESSES)),
                          origin=(cx - fov / 2, cy - fov / 2, z0))


def _profile(t: float) -> float:
    """Relative lung size along the series: small at the apex, largest near the base."""
    return 0.7 + 0.3 * math.sin(math.pi * (0.1 + 0.8 * t))


def _lung_ellipses(a: Anatomy, t: float) -> tuple[Ellipse, Ellipse]:
    cx, cy = a.body_center
    s = _profile(t)
    rx, ry = a.lung_radii[0] * s, a.lung_radii[1] * s
    y = cy + a.lung_shift
    return ((cx - a.lung_offset, y, rx, ry), (cx + a.lung_offset, y, rx, ry))


def _heart_ellipse(a: Anatomy, t: float) -> Ellipse:
    cav_x, cav_y = a.cavity
    h = math.sqrt(min(max((t - 0.3) / 0.7, 0.0), 1.0))  # absent in the upper part of the series
    cx, cy = a.body_center
    return (cx + 0.12 * cav_x, cy - 0.2 * cav_y, 0.33 * cav_x * h, 0.45 * cav_y * h)


def _inside(e: Ellipse, x: float, y: float) -> bool:
    return e[2] > 0 and e[3] > 0 and ((x - e[0]) / e[2]) ** 2 + ((y - e[1]) / e[3]) ** 2 <= 1.0


def _in_lung(a: Anatomy, t: float, x: float, y: float) -> bool:
    in_a_lung = any(_inside(e, x, y) for e in _lung_ellipses(a, t))
    return in_a_lung and not _inside(_heart_ellipse(a, t), x, y)


def _try_nodule(rng: np.random.Generator, a: Anatomy, g: VolumeGeometry, diameter: float,
                placed: Sequence[Nodule]) -> Nodule | None:
    """A random sphere centred on a slice; None unless it lies inside a lung, clear of `placed`."""
    r = diameter / 2
    reach = math.ceil(r / g.slice_thickness)
    k = int(rng.integers(reach, g.n_slices - reach)) if g.n_slices > 2 * reach else g.n_slices // 2
    ex, ey, rx, ry = _lung_ellipses(a, g.t(k))[int(rng.integers(2))]
    x, y = round(ex + rng.uniform(-0.75, 0.75) * rx, 2), round(ey + rng.uniform(-0.75, 0.75) * ry, 2)
    rim = ((0, 0), (r + 2, 0), (-r - 2, 0), (0, r + 2), (0, -r - 2))
    if not all(_in_lung(a, g.t(k), x + dx, y + dy) for dx, dy in rim):
        return None
    if any(math.dist((x, y, g.z(k)), n.center) <= r + n.diameter_mm / 2 + 2 for n in placed):
        return None
    return Nodule((x, y, g.z(k)), round(diameter, 2), int(rng.integers(20, 61)))


def _draw_nodules(rng: np.random.Generator, a: Anatomy, g: VolumeGeometry) -> tuple[Nodule, ...]:
    """1 to 3 non-overlapping spheres of 5..30 mm (uniform), each inside a lung."""
    nodules: list[Nodule] = []
    for _ in range(int(rng.integers(1, 4))):
        diameter = float(rng.uniform(5.0, 30.0))
        for attempt in range(300):  # shrink the sphere a little after every 60 misses
            nodule = _try_nodule(rng, a, g, max(5.0, diameter * 0.8 ** (attempt // 60)), nodules)
            if nodule is not None:
                nodules.append(nodule)
                break
    if not nodules:  # never seen in practice, but a positive patient must have a nodule
        ex, ey, rx, _ = _lung_ellipses(a, g.t(g.n_slices // 2))[0]
        nodules.append(Nodule((round(ex - rx / 2, 2), round(ey, 2), g.z(g.n_slices // 2)), 5.0, 40))
    return tuple(nodules)


def _instance_numbers(rng: np.random.Generator, n: int) -> tuple[int, ...]:
    """1..n shuffled, never in z order (reversed as a fallback), so readers must sort by position."""
    order = rng.permutation(n) + 1
    if n > 1 and np.all(np.diff(order) > 0):
        order = order[::-1]
    return tuple(int(i) for i in order)


def generate_patient(seed: int, index: int, n_slices: int, label: int) -> Patient:
    """Describe patient `index` of the cohort of `seed` (deterministic in all four arguments)."""
    if n_slices < 1:
        raise ValueError("n_slices must be >= 1")
    rng = _rng(_PATIENT, seed, index, _META)
    given, family, sex = NAMES[0] if index == 0 else NAMES[1 + int(rng.integers(len(NAMES) - 1))]
    study_date = date(2011, 1, 1) + timedelta(days=int(rng.integers(0, 5 * 365)))
    birth_date = study_date - timedelta(days=int(rng.integers(45 * 365, 80 * 365)))
    kvp = int(rng.choice((100, 120, 140)))
    anatomy = _draw_anatomy(_rng(_PATIENT, seed, index, _ANATOMY))
    geometry = _draw_geometry(rng, anatomy, n_slices)
    nodules = _draw_nodules(_rng(_PATIENT, seed, index, _NODULES), anatomy, geometry) if label else ()
    pid = hashlib.sha256(f"lungsql-synth:{seed}:{index}".encode()).hexdigest()[:32]
    return Patient(
        seed=seed, index=index, patient_id=pid, given_name=given, family_name=family, sex=sex,
        birth_date=birth_date, study_date=study_date, label=int(bool(label)), kvp=kvp,
        geometry=geometry, anatomy=anatomy, nodules=nodules,
        instance_numbers=_instance_numbers(rng, n_slices), study_uid=_uid(pid, seed, "study"),
        series_uid=_uid(pid, seed, "series"), frame_uid=_uid(pid, seed, "frame"),
    )


def plan_cohort(
    patients: int, slices: tuple[int, int], seed: int, positive_fraction: float = 0.5
) -> list[Patient]:
    """Describe every patient of a cohort without rendering anything (cheap)."""
    low, high = slices
    if patients < 1 or not 1 <= low <= high or not 0.0 <= positive_fraction <= 1.0:
        raise ValueError("need patients >= 1, 1 <= A <= B slices and 0 <= positive_fraction <= 1")
    positives = int(patients * positive_fraction + 0.5)
    if patients >= 2:
        positives = min(max(positives, 1), patients - 1)
    chosen = set(_rng(_COHORT, seed).permutation(patients)[:positives].tolist())
    counts = [int(_rng(_PATIENT, seed, i, _SLICES).integers(low, high + 1)) for i in range(patients)]
    return [generate_patient(seed, i, counts[i], int(i in chosen)) for i in range(patients)]


# ----------------------------------------------------------------------------- pixels


class _Canvas:
    """A float32 image with the patient coordinates of its pixel centres."""

    def __init__(self, g: VolumeGeometry, fill: float) -> None:
        self.img = np.full((g.rows, g.cols), fill, np.float32)
        self.x0, self.y0, self.step = g.origin[0], g.origin[1], g.pixel_spacing
        self.xs = self.x0 + self.step * np.arange(g.cols)
        self.ys = self.y0 + self.step * np.arange(g.rows)

    def _span(self, low: float, high: float, origin: float, size: int) -> tuple[int, int]:
        """Index range of the pixel centres within [low, high] mm (clipped to the image)."""
        first, last = math.ceil((low - origin) / self.step), math.floor((high - origin) / self.step)
        return max(first, 0), min(last + 1, size)

    def ellipse(self, e: Ellipse, value: float, only: float | None = None) -> None:
        """Set the pixels inside ellipse `e` (optionally only those equal to `only`)."""
        cx, cy, ax, ay = e
        if ax <= 0 or ay <= 0:
            return
        c0, c1 = self._span(cx - ax, cx + ax, self.x0, self.img.shape[1])
        r0, r1 = self._span(cy - ay, cy + ay, self.y0, self.img.shape[0])
        if c0 >= c1 or r0 >= r1:
            return
        dx, dy = ((self.xs[c0:c1] - cx) / ax) ** 2, ((self.ys[r0:r1] - cy) / ay) ** 2
        inside = dy[:, None] + dx[None, :] <= 1.0
        window = self.img[r0:r1, c0:c1]
        if only is not None:
            inside &= window == np.float32(only)
        window[inside] = value


@lru_cache(maxsize=2)
def _noise_bank(rows: int, cols: int) -> np.ndarray:
    """Unit Gaussian noise twice a slice wide and high; each slice adds a shifted window of it.

    Drawing 512x512 normals costs ~3 ms, more than the rest of a slice; windows of a bank
    drawn once are as good for a synthetic image and nearly free.
    """
    bank = np.random.default_rng(0x5EED).standard_normal((2 * rows, 2 * cols), np.float32)
    bank.setflags(write=False)
    return bank


@lru_cache(maxsize=8)
def _outside_fov(rows: int, cols: int) -> np.ndarray:
    """Pixels outside the scanner's circular reconstruction field (padding in real CTs)."""
    r, c = np.ogrid[:rows, :cols]
    mask = ((r - (rows - 1) / 2) ** 2 + (c - (cols - 1) / 2) ** 2) > (min(rows, cols) / 2) ** 2
    mask.setflags(write=False)
    return mask


def _paint_body(c: _Canvas, a: Anatomy) -> None:
    (cx, cy), (ax, ay) = a.body_center, a.body_radii
    c.ellipse((cx, cy, ax, ay), a.fat_hu)
    c.ellipse((cx, cy, ax - a.fat, ay - a.fat), a.tissue_hu)


def _paint_bones(c: _Canvas, a: Anatomy, z: float) -> None:
    """Rib sections on a ring inside the muscle, a vertebra behind and a sternum in front."""
    (cx, cy), (ax, ay) = a.body_center, a.body_radii
    rx, ry = ax - a.fat - 9.0, ay - a.fat - 9.0
    for j in range(a.rib_count):
        theta = a.rib_phase + RIB_TWIST * z + 2 * math.pi * j / a.rib_count
        from_spine = abs((theta - math.pi / 2 + math.pi) % (2 * math.pi) - math.pi)
        if 0.5 < from_spine < math.pi - 0.3:  # +y is posterior: spine at pi/2, sternum at -pi/2
            c.ellipse((cx + rx * math.cos(theta), cy + ry * math.sin(theta), 5.0, 3.5), a.bone_hu)
    r, vy = a.spine_radius, cy + ay - a.fat - 40.0
    c.ellipse((cx, vy, r, r), a.bone_hu)
    c.ellipse((cx, vy, r - 3.0, r - 3.0), 250.0)  # cancellous bone
    c.ellipse((cx, vy + r + 8.0, 10.0, 9.0), a.bone_hu)  # posterior arch
    c.ellipse((cx, vy + r + 7.0, 5.5, 5.5), a.tissue_hu)  # spinal canal
    c.ellipse((cx, cy - (ay - a.fat) + 9.0, 11.0, 4.5), 0.8 * a.bone_hu)


def _paint_thorax(c: _Canvas, a: Anatomy, t: float, lung: float, heart: float) -> None:
    for e in _lung_ellipses(a, t):
        c.ellipse(e, lung)
    c.ellipse(_heart_ellipse(a, t), heart)


def _paint_vessels(c: _Canvas, a: Anatomy, t: float, z: float) -> None:
    lungs = _lung_ellipses(a, t)
    for v in a.vessels:
        lx, ly, rx, ry = lungs[v.lung]
        w = 2 * math.pi * z / v.period + v.phase
        x = lx + v.u * rx + v.amplitude[0] * math.sin(w)
        y = ly + v.v * ry + v.amplitude[1] * math.cos(w)
        c.ellipse((x, y, v.radius, v.radius), a.tissue_hu, only=a.lung_hu)


def _paint_nodules(c: _Canvas, nodules: Sequence[Nodule], z: float) -> None:
    for n in nodules:
        r, dz = n.diameter_mm / 2, z - n.center[2]
        if abs(dz) < r:
            section = math.sqrt(r * r - dz * dz)
            c.ellipse((n.center[0], n.center[1], section, section), n.hu)


def slice_hu(patient: Patient, index: int) -> np.ndarray:
    """Slice `index` of `patient` in Hounsfield units (float32, rows x cols)."""
    g, a = patient.geometry, patient.anatomy
    if not 0 <= index < g.n_slices:
        raise IndexError(f"slice {index} outside 0..{g.n_slices - 1}")
    z, t = g.z(index), g.t(index)
    c = _Canvas(g, AIR_HU)
    _paint_body(c, a)
    _paint_bones(c, a, z)
    _paint_thorax(c, a, t, a.lung_hu, a.tissue_hu)
    _paint_vessels(c, a, t, z)
    _paint_nodules(c, patient.nodules, z)
    noise_rng = _rng(_PATIENT, patient.seed, patient.index, _NOISE, index)
    dy, dx, flip = noise_rng.integers(0, (g.rows, g.cols, 1), endpoint=True)
    noise = _noise_bank(g.rows, g.cols)[dy : dy + g.rows, dx : dx + g.cols]
    c.img += (noise[::-1] if flip else noise) * np.float32(a.noise_sd)
    np.copyto(c.img, np.float32(PADDING_HU), where=_outside_fov(g.rows, g.cols))
    return c.img


def slice_pixels(patient: Patient, index: int) -> np.ndarray:
    """Stored int16 values of slice `index`: HU = stored * RESCALE_SLOPE + RESCALE_INTERCEPT."""
    hu = np.clip(slice_hu(patient, index), HU_MIN, HU_MAX)
    hu -= np.float32(RESCALE_INTERCEPT)
    hu /= np.float32(RESCALE_SLOPE)
    return np.rint(hu, out=hu).astype(np.int16)


def lung_mask(patient: Patient, index: int) -> np.ndarray:
    """Boolean mask of the lung pixels of slice `index` (vessels and nodules included)."""
    g = patient.geometry
    c = _Canvas(g, 0.0)
    _paint_thorax(c, patient.anatomy, g.t(index), 1.0, 0.0)
    return c.img > 0.5


# ----------------------------------------------------------------------------- DICOM


def sop_instance_uid(patient: Patient, index: int) -> str:
    return _uid(patient.patient_id, patient.seed, "sop", index)


def slice_file_name(patient: Patient, index: int) -> str:
    """32 hex digits derived from the SOP Instance UID, like the DSB file names."""
    return hashlib.sha256(sop_instance_uid(patient, index).encode()).hexdigest()[:32] + ".dcm"


def _ds(value: float) -> str:
    return format(value, ".10g")


def build_slice_dataset(
    patient: Patient, geometry: VolumeGeometry, index: int, pixels: np.ndarray
) -> Dataset:
    """A complete CT Image Storage dataset (with file meta) for slice `index` holding `pixels`."""
    pixels = np.asarray(pixels)
    if pixels.ndim != 2:
        raise ValueError(f"pixels must be 2-D, got shape {pixels.shape}")
    sop_uid = sop_instance_uid(patient, index)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = "LUNGSQL_SYNTH"

    pid, day = patient.patient_id, patient.study_date.strftime("%Y%m%d")
    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, sop_uid
    ds.StudyDate = ds.SeriesDate = ds.AcquisitionDate = ds.ContentDate = day
    ds.StudyTime = ds.SeriesTime = f"{8 + int(pid[:2], 16) % 10:02d}{int(pid[2:4], 16) % 60:02d}00"
    ds.AccessionNumber, ds.StudyID = pid[:8].upper(), "1"
    ds.Modality, ds.Manufacturer = "CT", MANUFACTURER
    ds.ManufacturerModelName, ds.ReferringPhysicianName = "Synthetic Thorax", ""
    ds.StudyDescription, ds.SeriesDescription = "CT CHEST", "AXIAL LUNG"
    ds.PatientName, ds.PatientID = patient.dicom_name, pid
    ds.PatientBirthDate, ds.PatientSex = patient.birth_date.strftime("%Y%m%d"), patient.sex
    ds.PatientAge = f"{patient.age_years:03d}Y"
    ds.BodyPartExamined, ds.PatientPosition = "CHEST", "HFS"
    ds.SliceThickness, ds.KVP, ds.ConvolutionKernel = _ds(geometry.slice_thickness), patient.kvp, "LUNG"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = patient.study_uid, patient.series_uid
    ds.SeriesNumber, ds.AcquisitionNumber = 2, 1
    numbers = patient.instance_numbers
    ds.InstanceNumber = numbers[index] if index < len(numbers) else index + 1
    ds.ImagePositionPatient = [_ds(v) for v in geometry.position(index)]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.FrameOfReferenceUID, ds.PositionReferenceIndicator = patient.frame_uid, ""
    ds.SliceLocation = _ds(geometry.z(index))
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows, ds.Columns = pixels.shape
    ds.PixelSpacing = [_ds(geometry.pixel_spacing)] * 2
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.WindowCenter, ds.WindowWidth = -600, 1500
    ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = _ds(RESCALE_INTERCEPT), _ds(RESCALE_SLOPE), "HU"
    ds.add_new(0x7FE00010, "OW", pixels.astype("<i2").tobytes())
    return ds


def dataset_bytes(ds: Dataset) -> bytes:
    """The DICOM Part 10 file (preamble, DICM, file meta, data set) of `ds`."""
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def write_patient(patient: Patient, folder: Path, progress: Callable[[int], None] | None = None) -> int:
    """Write every slice of `patient` into `folder`; return the bytes written."""
    folder.mkdir(parents=True, exist_ok=True)
    total = 0
    for index in range(patient.geometry.n_slices):
        ds = build_slice_dataset(patient, patient.geometry, index, slice_pixels(patient, index))
        data = dataset_bytes(ds)
        (folder / slice_file_name(patient, index)).write_bytes(data)
        total += len(data)
        if progress is not None:
            progress(1)
    return total


def write_labels(path: Path, cohort: Sequence[Patient]) -> None:
    """`id,cancer` rows sorted by id, as in the DSB 2017 stage1_labels.csv."""
    rows = sorted((p.patient_id, p.label) for p in cohort)
    path.write_text("id,cancer\n" + "".join(f"{pid},{label}\n" for pid, label in rows), newline="\n")


def write_cohort(
    out_dir: Path,
    patients: int,
    slices: tuple[int, int],
    seed: int,
    positive_fraction: float = 0.5,
    progress: Callable[[int], None] | None = None,
) -> CohortSummary:
    """Write a synthetic DSB-2017-style cohort under `out_dir` (see the module docstring).

    `slices` is the inclusive range of slices per patient; `progress(n)` is called after
    every file with the number of files just written (1).  Existing files are overwritten.
    """
    start = time.perf_counter()
    cohort = plan_cohort(patients, slices, seed, positive_fraction)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    total = sum(write_patient(p, out_dir / p.patient_id, progress) for p in cohort)
    write_labels(out_dir / LABELS_CSV, cohort)
    return CohortSummary(
        patients=len(cohort), positives=sum(p.label for p in cohort),
        files=sum(p.geometry.n_slices for p in cohort), bytes=total, seconds=time.perf_counter() - start,
    )
