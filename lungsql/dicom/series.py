r"""Which of a patient's series is the CT volume, and its slices in z order, decoded as stored.

The rule (`choose_series`), the same wherever lungsql featurizes:

1. A series is a candidate when it is CT, holds no localizer (scout) image,
   its slices are axial (the slice normal within LUNGSQL_SERIES_MAX_TILT
   degrees of the patient's z axis: coronal and sagittal reformats and tilted
   gantries are left out) and it has at least LUNGSQL_SERIES_MIN_SLICES slices.
2. With LUNGSQL_SERIES_PREFER set (a regular expression, such as
   ``LUNG|B6\d|B70``), candidates whose description or reconstruction kernel
   match it come first, if there are any.
3. Among those, the ones that cover at least 90 % of the longest coverage
   along z, and of those the thinnest slices, then the most slices, then the
   lowest SeriesInstanceUID (so the choice never depends on upload order).

A DBA's choice (lungsql.choose_series) overrides the rule. Classic slices and
the frames of Enhanced CT files are read alike: each frame is a slice at the
position its per-frame functional group gives.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np

import config_preprocessing as config
from lungsql.dicom import reader as dicom
from lungsql.errors import InvalidScan, LungSQLError

#: Of the longest coverage among the candidates, what a series must cover to count as enough.
ENOUGH_COVERAGE = 0.9


@dataclass(frozen=True)
class SeriesInfo:
    """One stored series as the rule sees it (a row of the view lungsql.series)."""

    series_instance_uid: str
    slices: int
    coverage_mm: float = 0.0
    slice_thickness: float | None = None
    tilt_degrees: float | None = None
    localizer: bool = False
    modality: str = "CT"
    series_description: str | None = None
    convolution_kernel: str | None = None

    def describe(self) -> str:
        thickness = f"{self.slice_thickness:g} mm slices" if self.slice_thickness else "slices"
        return f"{self.slices} {thickness} over {self.coverage_mm:.0f} mm"


@dataclass(frozen=True)
class Choice:
    series_instance_uid: str
    reason: str


#: The columns of lungsql.scans that `summarize_series` reads (no pixel data).
SUMMARY_COLUMNS = ("series_instance_uid", "modality", "z_position", "frame_z", "frames", "slice_thickness",
                   "tilt_degrees", "image_type", "series_description", "convolution_kernel")


def summarize_series(rows: Iterable[dict]) -> list[SeriesInfo]:
    """One SeriesInfo per series of a patient's scan rows (SUMMARY_COLUMNS): what the view
    lungsql.series shows a DBA, computed the same way."""
    by_series: dict[str, list[dict]] = {}
    for row in rows:
        by_series.setdefault(row["series_instance_uid"], []).append(row)
    found = []
    for uid, files in sorted(by_series.items()):
        zs = [float(z) for r in files for z in (r.get("frame_z") or [r["z_position"]])]
        thickness = [float(r["slice_thickness"]) for r in files if r.get("slice_thickness") is not None]
        tilts = [float(r["tilt_degrees"]) for r in files if r.get("tilt_degrees") is not None]
        found.append(SeriesInfo(
            series_instance_uid=uid,
            slices=sum(int(r.get("frames") or 1) for r in files),
            coverage_mm=max(zs) - min(zs),
            slice_thickness=float(np.median(thickness)) if thickness else None,
            tilt_degrees=max(tilts) if tilts else None,
            localizer=any(_is_localizer(r.get("image_type")) for r in files),
            modality=min(str(r.get("modality") or "") for r in files),
            series_description=min((r["series_description"] for r in files if r.get("series_description")),
                                   default=None),
            convolution_kernel=min((r["convolution_kernel"] for r in files if r.get("convolution_kernel")),
                                   default=None),
        ))
    return found


def _is_localizer(image_type: str | None) -> bool:
    return "LOCALIZER" in (image_type or "").upper().split("\\")


def choose_series(series: Sequence[SeriesInfo], override: str | None = None, override_by: str | None = None,
                  prefer: str | None = None, max_tilt: float | None = None, min_slices: int | None = None) -> Choice:
    """The series to featurize as the patient's volume, and why (see the module's rule)."""
    if not series:
        raise LungSQLError("the patient has no stored series", hint="upload the scans with `lungsql ingest`")
    if override is not None:
        if not any(s.series_instance_uid == override for s in series):
            raise LungSQLError(f"the series chosen for this patient ({override}) is not stored",
                               hint="choose another: CALL lungsql.choose_series(patient_id, series_instance_uid), "
                                    "or NULL to go back to the rule")
        return Choice(override, f"chosen by {override_by or 'a DBA'} (lungsql.choose_series)")
    prefer = config.get("LUNGSQL_SERIES_PREFER") if prefer is None else prefer
    max_tilt = config.get("LUNGSQL_SERIES_MAX_TILT") if max_tilt is None else max_tilt
    min_slices = config.get("LUNGSQL_SERIES_MIN_SLICES") if min_slices is None else min_slices
    out: dict[str, int] = {}

    def why_not(s: SeriesInfo) -> str | None:
        if s.modality != "CT":
            return f"not CT ({s.modality})"
        if s.localizer:
            return "localizer"
        if s.tilt_degrees is not None and s.tilt_degrees > max_tilt:
            return "coronal or sagittal" if s.tilt_degrees > 45 else "tilted"
        if s.slices < min_slices:
            return f"fewer than {min_slices} slices"
        return None

    candidates = []
    for s in series:
        reason = why_not(s)
        if reason is None:
            candidates.append(s)
        else:
            out[reason] = out.get(reason, 0) + 1
    left_out = "; left out: " + ", ".join(f"{n} {r}" for r, n in sorted(out.items())) if out else ""
    if not candidates:
        raise LungSQLError("none of the patient's series is an axial CT volume" + left_out,
                           hint="choose one by hand: CALL lungsql.choose_series(patient_id, series_instance_uid)")
    pool, preferred = candidates, ""
    if prefer:
        pattern = re.compile(prefer, re.IGNORECASE)
        matching = [s for s in candidates
                    if any(pattern.search(t or "") for t in (s.series_description, s.convolution_kernel))]
        if matching:
            pool, preferred = matching, f", preferred by LUNGSQL_SERIES_PREFER={prefer}"
    longest = max(s.coverage_mm for s in pool)
    enough = [s for s in pool if s.coverage_mm >= ENOUGH_COVERAGE * longest]
    best = min(enough, key=lambda s: (s.slice_thickness if s.slice_thickness else float("inf"), -s.slices,
                                      s.series_instance_uid))
    return Choice(best.series_instance_uid,
                  f"thinnest axial series with enough coverage ({best.describe()}) of {len(candidates)} "
                  f"candidate(s){preferred}{left_out}"[:400])


def order_slices(z_positions: Sequence[float] | np.ndarray) -> np.ndarray:
    """Indices that put the slices in order of z position (stable: slices at
    the same position keep their original order)."""
    z = np.asarray(z_positions, dtype=np.float64).reshape(-1)
    if not np.all(np.isfinite(z)):
        bad = np.flatnonzero(~np.isfinite(z))[:5].tolist()
        raise LungSQLError(f"slice positions must be finite numbers; slices {bad} are not",
                           "check ImagePositionPatient of those files")
    return np.argsort(z, kind="stable")


def read_volume(scans: Iterable[tuple[bytes, float]]) -> list[np.ndarray]:
    """HU slices (float32) of (DICOM bytes, z position) pairs, in z order."""
    slices, rescale = read_slices(scans)
    return [dicom.to_hounsfield(s, a, b) for s, (a, b) in zip(slices, rescale)]


def read_slices(scans: Iterable[tuple]) -> tuple[list[np.ndarray], np.ndarray]:
    """The pixels of a series' files in z order, as stored, and (slope, intercept) of each slice:
    HU = slope x stored + intercept (what `prepare_volume` takes with `rescale`).

    `scans` are (DICOM bytes, z position) pairs, or (bytes, z, frame_z) where a multi-frame file
    (Enhanced CT) gives each frame's z; every frame is then a slice. Every file goes through
    `lungsql.dicom.decode_stored`, the decoder ingest checked it with, under the same limits;
    InvalidScan names the slice that fails."""
    scans = list(scans)
    if not scans:
        raise LungSQLError("the series has no slices", "store at least one CT slice of the patient")
    places = []  # (z, file, frame or None): every slice of the series
    for index, scan in enumerate(scans):
        frame_z = scan[2] if len(scan) > 2 else None
        if frame_z:
            places.extend((float(z), index, frame) for frame, z in enumerate(frame_z))
        else:
            places.append((float(scan[1]), index, None))
    order = order_slices([z for z, _, _ in places])
    limits = dicom.Limits.from_settings()
    decoded_files: dict[int, dicom.Decoded] = {}
    slices, rescale = [], np.empty((len(places), 2), np.float64)
    for i, at in enumerate(order):
        z, index, frame = places[at]
        decoded = decoded_files.get(index)
        if decoded is None:
            try:
                decoded = dicom.decode_stored(bytes(scans[index][0]), limits)
            except InvalidScan as exc:
                raise InvalidScan(f"the slice at z = {z:g} cannot be decoded: {exc.message}", exc.hint) from None
            if frame is not None:  # a multi-frame file: decoded once for all its frames
                decoded_files[index] = decoded
        stored = decoded.stored
        if frame is not None and stored.ndim == 3 and frame < stored.shape[0]:
            stored = stored[frame]
        if stored.ndim != 2:
            raise InvalidScan(f"the slice at z = {z:g} holds pixels of shape {list(stored.shape)}; "
                              "lungsql featurizes monochrome CT slices",
                              "colour images, and multi-frame files without per-frame positions, are not "
                              "featurized")
        slices.append(stored)
        rescale[i] = (decoded.slope, decoded.intercept)
    shapes = {s.shape for s in slices}
    if len(shapes) > 1:
        raise InvalidScan(f"the series mixes slice sizes {sorted(shapes)}; its slices cannot be stacked",
                          "store each series with slices of one size")
    return slices, rescale
