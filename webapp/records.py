"""Patients, their slices and radiographs as the web app reads them: search, one patient, one slice,
one radiograph.

Shared by the pages and the JSON API, through the functions the web app's
role may call (lungsql.web_search_patients, web_patient, web_slice_ref,
slice_image; web_patient_radiographs, web_radiograph, radiograph_image,
radiograph_heatmap). Input from the browser is cleaned here (control and
invisible format characters removed: PostgreSQL refuses NUL in text) and
always bound as a parameter.
"""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass

import sqlalchemy as sa

from lungsql.errors import InvalidScan
from lungsql.webapp.db import database_message, get_db, is_lungsql_error, refusal

# Longest PatientID DICOM allows (LO: 64 characters); anything longer is unknown.
PATIENT_ID_MAX = 64
# Characters removed from search input: controls (NUL...), format marks (RTL, zero width), surrogates.
_DROPPED = {"Cc", "Cf", "Cs"}

# The web app's role reads patients and scans only through these functions (020_web.sql): no outcome
# label, no DICOM file. LIKE metacharacters are escaped by web_search_patients itself.
_SEARCH = sa.text("SELECT * FROM lungsql.web_search_patients(:q, CAST(:limit AS integer))")
_PATIENT = sa.text("SELECT * FROM lungsql.web_patient(:patient_id)")
_EXISTS = sa.text("SELECT 1 FROM lungsql.web_patient(:patient_id)")
# The viewer's order: series by series, each in z order.
_HEAT = sa.text("SELECT rows, columns, heat, model_id, sha256 "
                "FROM lungsql.web_slice_heatmap(:patient_id, CAST(:index AS integer))")
_TOP = sa.text("SELECT slice_index, rank, contribution FROM lungsql.web_top_slices(:patient_id, 3)")
_SLICE = sa.text("SELECT scan_id, sha256 FROM lungsql.web_slice_ref(:patient_id, CAST(:index AS integer))")
_PIXELS = sa.text("SELECT rows, columns, pixels FROM lungsql.slice_image(CAST(:scan_id AS bigint), "
                  "CAST(:low AS real), CAST(:high AS real))")
INDEX_MAX = 2**31 - 1  # slice numbers are PostgreSQL integers

# Radiographs (040_radiographs.sql): a patient's, one by its image_id, its pixels through a window in
# display units (0 black .. 255 white; NULL: the whole range) and a finding's heat map.
_RADIOGRAPHS = sa.text("SELECT * FROM lungsql.web_patient_radiographs(:patient_id)")
_RADIOGRAPH = sa.text("SELECT * FROM lungsql.web_radiograph(CAST(:image_id AS bigint))")
_RADIOGRAPH_PIXELS = sa.text(
    "SELECT rows, columns, pixels FROM lungsql.radiograph_image(CAST(:image_id AS bigint), "
    "CAST(:level AS real), CAST(:width AS real), CAST(:max_side AS integer))")
_RADIOGRAPH_HEAT = sa.text(
    "SELECT rows, columns, heat, finding, probability, model_id, method "
    "FROM lungsql.radiograph_heatmap(CAST(:image_id AS bigint), CAST(:finding AS text))")
IMAGE_ID_MAX = 2**63 - 1  # image ids are PostgreSQL bigints


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


def search(query: str, limit: int) -> SearchResult:
    """Patients whose name contains `query` (any case) or whose ID starts with it; exact ID first."""
    if not query:
        return SearchResult(query, [], 0)
    rows = get_db().execute(_SEARCH, {"q": query, "limit": limit}).mappings().all()
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
    """Whether the patient is stored."""
    return valid_patient_id(patient_id) and get_db().execute(
        _EXISTS, {"patient_id": patient_id}).first() is not None


def slice_ref(patient_id: str, index: int) -> dict | None:
    """(scan_id, sha256 hex) of the patient's slice number `index` (0-based) in viewer order, or None."""
    if not valid_patient_id(patient_id) or not 0 <= index <= INDEX_MAX:
        return None
    row = get_db().execute(_SLICE, {"patient_id": patient_id, "index": index}).mappings().first()
    return None if row is None else dict(row)


def top_slices(patient_id: str) -> list[dict]:
    """The slices (viewer indices) of the three groups that weighed most towards a higher probability,
    with their group's rank and contribution; empty when the patient cannot be scored (the page says
    why beside the probability)."""
    if not valid_patient_id(patient_id):
        return []
    rows = _unless_lungsql_error(_TOP, {"patient_id": patient_id}, f"explaining patient {patient_id!r}")
    return [dict(r) for r in rows or []]


def slice_heatmap(patient_id: str, index: int) -> dict | None:
    """The heat map (rows, columns, heat bytes, model_id, sha256) of the patient's slice number
    `index`, or None: beyond the last slice, outside the featurized series, or when the patient
    cannot be scored or the CNN gives no feature map."""
    if not valid_patient_id(patient_id) or not 0 <= index <= INDEX_MAX:
        return None
    rows = _unless_lungsql_error(_HEAT, {"patient_id": patient_id, "index": index},
                                 f"the heat map of patient {patient_id!r} slice {index}")
    return dict(rows[0]) if rows else None


def _unless_lungsql_error(statement, params: dict, what: str) -> list | None:
    """The statement's rows; None when the database refuses it (lungsql's own errors, such as a patient
    that cannot be scored, quietly; anything else logged), the session rolled back. A lost database
    still raises (503)."""
    try:
        return get_db().execute(statement, params).mappings().all()
    except sa.exc.DBAPIError as exc:
        refusal(exc, what)
        get_db().rollback()
        return None


def slice_pixels(scan_id: int, window: tuple[float, float]) -> tuple[int, int, bytes] | None:
    """(rows, columns, uint8 pixels row by row) of a stored slice through `window`, decoded in the
    database; None for an unknown scan. InvalidScan (a 500 page saying why) when it cannot be decoded."""
    return _pixels(_PIXELS, {"scan_id": scan_id, "low": window[0], "high": window[1]})


def _pixels(statement, params: dict) -> tuple[int, int, bytes] | None:
    try:
        row = get_db().execute(statement, params).first()
    except (sa.exc.OperationalError, sa.exc.InterfaceError):
        raise  # the database is gone: 503
    except sa.exc.DBAPIError as exc:
        if exc.connection_invalidated or not is_lungsql_error(exc):
            raise
        get_db().rollback()
        raise InvalidScan(*database_message(exc)) from None
    return None if row is None else (int(row.rows), int(row.columns), bytes(row.pixels))


def patient_radiographs(patient_id: str) -> list[dict]:
    """The patient's radiographs (image_id, image_index, modality, view_position, follow_up, rows,
    columns, sha256 hex), oldest follow-up first."""
    if not valid_patient_id(patient_id):
        return []
    return [dict(r) for r in get_db().execute(_RADIOGRAPHS, {"patient_id": patient_id}).mappings()]


def radiograph(image_id: int) -> dict | None:
    """One radiograph (image_id, patient_id, image_index, modality, view_position, follow_up, rows,
    columns, sha256 hex), or None."""
    if not 0 <= image_id <= IMAGE_ID_MAX:
        return None
    row = get_db().execute(_RADIOGRAPH, {"image_id": image_id}).mappings().first()
    return None if row is None else dict(row)


def radiograph_pixels(image_id: int, level: float | None, width: float | None,
                      max_side: int) -> tuple[int, int, bytes] | None:
    """(rows, columns, uint8 pixels row by row) of a stored radiograph through the window `level`
    and `width` (None: the whole range), at most `max_side` pixels on its longer side, decoded in the
    database; None for an unknown image. InvalidScan (a 500 page saying why) when it cannot be decoded."""
    return _pixels(_RADIOGRAPH_PIXELS, {"image_id": image_id, "level": level, "width": width,
                                        "max_side": max_side})


def radiograph_heatmap(image_id: int, finding: str | None) -> dict | None:
    """The heat map (rows, columns, heat bytes, finding, probability, model_id, method) of `finding`
    (None: the most probable) on the radiograph, at the size radiograph_pixels gives with max_side
    1024; None for an unknown image or when the database gives none (no radiograph model deployed...)."""
    if not 0 <= image_id <= IMAGE_ID_MAX:
        return None
    rows = _unless_lungsql_error(_RADIOGRAPH_HEAT, {"image_id": image_id, "finding": finding},
                                 f"the heat map of radiograph {image_id} for {finding or 'its most probable finding'}")
    return dict(rows[0]) if rows else None


def _patient(row) -> dict:
    out = dict(row)
    out.pop("exact_id", None)
    out.pop("total", None)
    if out.get("age_years") is not None:
        out["age_years"] = round(float(out["age_years"]), 1)
    return out
