"""The JSON API, with the pages' session: 401 JSON without one, 404 JSON for unknown patients.

    GET /api/patients?q=TEXT              patients whose name contains TEXT or whose ID starts with it
    GET /api/patients/<id>                one patient, with the number of stored slices
    GET /api/patients/<id>/prediction     the probability from lungsql.predict_lung_cancer, and its model
"""

from __future__ import annotations

from flask import Blueprint, abort, current_app, jsonify, request

from lungsql.webapp import audit, auth, records
from lungsql.webapp.scoring import ScoringUnavailable, score

bp = Blueprint("api", __name__, url_prefix="/api")


@bp.get("/patients")
def patients():
    limit = current_app.config["SEARCH_LIMIT"]
    query = records.clean_query(request.args.get("q", ""), current_app.config["QUERY_MAX_CHARS"])
    result = records.search(query, limit)
    return jsonify(query=query, total=result.total, truncated=result.truncated, limit=limit,
                   patients=[_public(p) for p in result.patients])


@bp.get("/patients/<patient_id>")
def patient(patient_id: str):
    found = _found(patient_id)
    audit.record("view_patient", patient_id=patient_id, detail={"via": "api"})
    return jsonify(_public(found))


@bp.get("/patients/<patient_id>/prediction")
@auth.checks_user_itself  # one statement reads the user's row, scores and audits (scoring.score)
def prediction(patient_id: str):
    if not records.valid_patient_id(patient_id):
        auth.current_user()  # 401 rather than 404 for a user gone or disabled
        abort(404, description="There is no patient with this ID.")
    try:
        result = score(patient_id, via="api")
    except ScoringUnavailable as exc:
        if not records.exists(patient_id):  # checked only now: scoring is the common case
            abort(404, description="There is no patient with this ID.")
        return jsonify(error="no prediction", message=exc.message, hint=exc.hint, patient_id=patient_id), 409
    return jsonify(result.as_json())


def _found(patient_id: str) -> dict:
    found = records.patient(patient_id)
    if found is None:
        abort(404, description="There is no patient with this ID.")
    return found


def _public(patient: dict) -> dict:
    out = {key: patient.get(key) for key in ("patient_id", "name", "sex", "age_years", "slices")}
    if patient.get("birth_date") is not None:
        out["birth_date"] = patient["birth_date"].isoformat()
    return out  # never an outcome label: the web app's role cannot read them
