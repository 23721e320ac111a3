"""Pages for clinicians: patient search, the patient page with its scan viewer, probability and radiographs."""

from __future__ import annotations

from flask import Blueprint, Response, abort, current_app, redirect, render_template, request, url_for

from lungsql.webapp import audit, records
from lungsql.webapp.scoring import ScoringUnavailable, score
from lungsql.webapp.slices import encode_heatmap_png, encode_png

bp = Blueprint("patients", __name__)

SLICE_CACHE = "lungsql_slice_cache"


@bp.get("/")
def index():
    return redirect(url_for("patients.search"))


@bp.get("/patients")
def search():
    """Search by name (any part, any case) or by patient ID (whole or first characters)."""
    raw = request.args.get("q", "")
    query = records.clean_query(raw, current_app.config["QUERY_MAX_CHARS"])
    result = records.search(query, current_app.config["SEARCH_LIMIT"])
    if len(result.patients) == 1 and result.total == 1:
        return redirect(url_for("patients.patient", patient_id=result.patients[0]["patient_id"]))
    return render_template("search.html", query=query, searched=bool(raw), result=result,
                           shortened=len(raw) > current_app.config["QUERY_MAX_CHARS"])


@bp.get("/patients/<patient_id>")
def patient(patient_id: str):
    """The patient page; 404 for an unknown patient. A patient with radiographs and no CT slices gets
    the list of radiographs only: no CT viewer and no probability of lung cancer."""
    found = records.patient(patient_id)
    if found is None:
        abort(404, description="There is no patient with this ID.")
    audit.record("view_patient", patient_id=patient_id, detail={"via": "web"})
    radiographs = records.patient_radiographs(patient_id) if found["radiographs"] else []
    ct = bool(found["slices"]) or not radiographs
    result = failure = None
    if ct:
        try:
            result = score(patient_id, via="web")
        except ScoringUnavailable as exc:
            failure = exc
    top = records.top_slices(patient_id) if result is not None else []
    groups: dict[int, list[int]] = {}
    for t in top:
        groups.setdefault(t["rank"], []).append(t["slice_index"])
    ranked = [{"rank": rank, "slices": slices, "contribution": next(t["contribution"] for t in top if t["rank"] == rank)}
              for rank, slices in sorted(groups.items())]
    start = ranked[0]["slices"][len(ranked[0]["slices"]) // 2] if ranked else found["slices"] // 2
    return render_template("patient.html", patient=found, score=result, failure=failure, top=ranked,
                           marked=sorted({t["slice_index"] for t in top}), start=start, ct=ct,
                           radiographs=radiographs)


@bp.get("/patients/<patient_id>/slices/<int:index>.png")
def slice_png(patient_id: str, index: int):
    """Slice number `index` (0-based, series by series in z order) as PNG, rendered by the database
    (lungsql.slice_image); 404 beyond the last one, 500 with the reason for a slice that cannot be decoded."""
    ref = records.slice_ref(patient_id, index)
    if ref is None:
        abort(404, description="There is no such slice.")
    low, high = current_app.config["HU_WINDOW"]

    def render() -> bytes:
        pixels = records.slice_pixels(ref["scan_id"], (low, high))
        if pixels is None:  # deleted since the reference was read
            abort(404, description="There is no such slice.")
        return encode_png(*pixels)

    return cached_png(f"{ref['sha256']}-{low:g}:{high:g}", render)  # a new window is a new image


def cached_png(etag: str, render) -> Response:
    """A PNG keyed by `etag`: 304 when the browser has it, else from the in-process cache, else
    `render()` (then cached)."""
    headers = {"Cache-Control": f"private, max-age={current_app.config['SLICE_MAX_AGE_S']}"}
    if etag in request.if_none_match:
        response = Response(status=304, headers=headers)
    else:
        cache = current_app.extensions[SLICE_CACHE]
        png = cache.get(etag)
        if png is None:
            png = render()
            cache.put(etag, png)
        response = Response(png, mimetype="image/png", headers=headers)
    response.set_etag(etag)
    return response


@bp.get("/patients/<patient_id>/slices/<int:index>/heatmap.png")
def heatmap_png(patient_id: str, index: int):
    """The heat map over slice number `index` (lungsql.slice_heatmap), a transparent PNG; 404 when
    there is none (a slice outside the featurized series, or no model to explain)."""
    found = records.slice_heatmap(patient_id, index)
    if found is None:
        abort(404, description="There is no heat map for this slice.")
    return cached_png(f"heat-{found['sha256']}-{found['model_id']}",
                       lambda: encode_heatmap_png(found["rows"], found["columns"], bytes(found["heat"])))
