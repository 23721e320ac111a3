"""Patients and their slices as the web app reads them: search, one patient, one slice.

Shared by the pages and the JSON API. Input from the browser is cleaned here
(control and invisible format characters removed: PostgreSQL refuses NUL in
text) and always bound as a parameter; LIKE metacharacters are escaped.
"""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass

import sqlalchemy as sa

from webapp.db import get_db

# Longest PatientID DICOM allows (LO: 64 characters); anything longer is unknown.
PATIENT_ID_MAX = 64
# Characters removed from search input: controls (NUL...), format marks (RTL, zero width), surrogates.
_DROPPED = {"Cc", "Cf", "Cs"}

_SEARCH = sa.text(r"""
WITH hits AS (
    SELECT p.patient_id, p.name, p.sex, p.age_years, p.label,
           lower(p.patient_id) = lower(:q) AS exact_id,
           count(*) OVER () AS total
    FROM lungsql.patients p
    WHERE lower(p.name) LIKE '%' || lower(:pattern) || '%' ESCAPE '\'
       OR lower(p.patient_id) LIKE lower(:pattern) || '%' ESCAPE '\'
    ORDER BY exact_id DESC, p.name, p.patient_id
    LIMIT :limit
)
SELECT h.*, (SELECT count(*) FROM lungsql.scans s WHERE s.patient_id = h.patient_id) AS slices
FROM hits h
ORDER BY h.exact_id DESC, h.name, h.patient_id
""")

_PATIENT = sa.text("""
SELECT p.patient_id, p.name, p.sex, p.birth_date, p.age_years, p.label,
       s.slices, s.rows, s.columns
FROM lungsql.patients p
CROSS JOIN LATERAL (SELECT count(*) AS slices, max(rows) AS rows, max(columns) AS columns
                    FROM lungsql.scans WHERE patient_id = p.patient_id) s
WHERE p.patient_id = :patient_id
""")

_EXISTS = sa.text("SELECT 1 FROM lungsql.patients WHERE patient_id = :patient_id")

# The viewer's order: series by series, each in z order (the index scans_patient_series_z).
_SLICE = sa.text("""
SELECT scan_id, encode(sha256, 'hex') AS sha256
FROM lungsql.scans WHERE patient_id = :patient_id
ORDER BY series_instance_uid, z_position, sop_instance_uid
OFFSET :index LIMIT 1
""")


@dataclass(frozen=True)
class SearchResult:
    query: str
    patients: list[dict]
    total: int

    @property
    def truncated(self) -> bool:
        return self.total > len(self.patients)


def clean_query(text: str | None, max_chars: int) -> str:
    """Search input as typed, without NUL and invisible characters, spaces collapsed, at most `max_chars`."""
    text = "".join(ch for ch in (text or "") if unicodedata.category(ch) not in _DROPPED)
    text = " ".join(unicodedata.normalize("NFC", text).split())
    return text[:max_chars].strip()


def like_escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def search(query: str, limit: int) -> SearchResult:
    """Patients whose name contains `query` (any case) or whose ID starts with it; exact ID first."""
    if not query:
        return SearchResult(query, [], 0)
    rows = get_db().execute(_SEARCH, {"q": query, "pattern": like_escape(query), "limit": limit}).mappings().all()
    return SearchResult(query, [_patient(r) for r in rows], int(rows[0]["total"]) if rows else 0)


def valid_patient_id(patient_id: str) -> bool:
    return 0 < len(patient_id) <= PATIENT_ID_MAX and not any(
        unicodedata.category(ch) in _DROPPED for ch in patient_id)


def patient(patient_id: str) -> dict | None:
    """One patient with the number of stored slices, or None."""
    if not valid_patient_id(patient_id):
        return None
    row = get_db().execute(_PATIENT, {"patient_id": patient_id}).mappings().first()
    return None if row is None else _patient(row)


def exists(patient_id: str) -> bool:
    """Whether the patient is stored (the cheap check, without counting slices)."""
    return valid_patient_id(patient_id) and get_db().execute(
        _EXISTS, {"patient_id": patient_id}).first() is not None


def slice_ref(patient_id: str, index: int) -> dict | None:
    """(scan_id, sha256 hex) of the patient's slice number `index` (0-based) in viewer order, or None."""
    if not valid_patient_id(patient_id) or index < 0:
        return None
    row = get_db().execute(_SLICE, {"patient_id": patient_id, "index": index}).mappings().first()
    return None if row is None else dict(row)


def slice_dicom(scan_id: int) -> bytes:
    return bytes(get_db().execute(sa.text("SELECT dicom FROM lungsql.scans WHERE scan_id = :id"),
                                  {"id": scan_id}).scalar_one())


def _patient(row) -> dict:
    out = dict(row)
    out.pop("exact_id", None)
    out.pop("total", None)
    if out.get("age_years") is not None:
        out["age_years"] = round(float(out["age_years"]), 1)
    return out
