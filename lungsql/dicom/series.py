"""A series' slices in z order, decoded as stored: what featurization reads."""

from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np

from lungsql.dicom import reader as dicom
from lungsql.errors import InvalidScan, LungSQLError


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


def read_slices(scans: Iterable[tuple[bytes, float]]) -> tuple[list[np.ndarray], np.ndarray]:
    """The pixels of (DICOM bytes, z position) pairs in z order, as stored, and
    (slope, intercept) of each slice: HU = slope x stored + intercept (what
    `prepare_volume` takes with `rescale`).  Every slice goes through
    `lungsql.dicom.decode_stored`, the decoder ingest checked it with, under
    the same limits; InvalidScan names the slice that fails."""
    scans = list(scans)
    if not scans:
        raise LungSQLError("the series has no slices", "store at least one CT slice of the patient")
    order = order_slices([z for _, z in scans])
    limits = dicom.Limits.from_settings()
    slices, rescale = [], np.empty((len(scans), 2), np.float64)
    for i, index in enumerate(order):
        data, z = scans[index]
        try:
            decoded = dicom.decode_stored(bytes(data), limits)
        except InvalidScan as exc:
            raise InvalidScan(f"the slice at z = {z:g} cannot be decoded: {exc.message}", exc.hint) from None
        if decoded.stored.ndim != 2:
            raise InvalidScan(f"the slice at z = {z:g} holds pixels of shape {list(decoded.stored.shape)}; "
                              "lungsql featurizes single-frame monochrome CT slices",
                              "multi-frame (Enhanced CT) and colour images are not featurized")
        slices.append(decoded.stored)
        rescale[i] = (decoded.slope, decoded.intercept)
    shapes = {s.shape for s in slices}
    if len(shapes) > 1:
        raise InvalidScan(f"the series mixes slice sizes {sorted(shapes)}; its slices cannot be stacked",
                          "store each series with slices of one size")
    return slices, rescale
