"""A patient's probability of lung cancer, from the database's scoring function.

The web app never loads a model: it calls ``lungsql.predict_lung_cancer_detail``,
which returns the probability with the deployed model that gave it, so the
model shown is the model used, even while an administrator deploys another
one. The prediction row the function records and the audit row are written
by one statement and commit together.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import asdict, dataclass

import sqlalchemy as sa
from flask import g, request

from lungsql.errors import LungSQLError
from lungsql.webapp import audit
from lungsql.webapp.db import get_db, refusal

# Colour bands of the probability, in percent: [lower bound, band, colour, wording).
BANDS = (
    (40.0, "high", "red", "40 % or more"),
    (20.0, "intermediate", "orange", "20 % to 40 %"),
    (0.0, "low", "green", "below 20 %"),
)

# The score and its audit row in one statement (one round trip); they commit together. The audit row is
# appended by lungsql.audit_append, once per row the scoring returned (none when it raised).
_SCORE = sa.text("""
SELECT s.*,
       lungsql.audit_append(CAST(:username AS text), 'score_patient', CAST(:patient_id AS text),
                            CAST(:address AS text),
                            jsonb_build_object('via', CAST(:via AS text), 'model_id', s.model_id,
                                               'model_name', s.name, 'model_version', s.version,
                                               'probability', s.probability)) AS audit_id,
       e.params ->> 'method' AS ensemble_method,
       (SELECT string_agg(m.name || ' v' || m.version, ', ' ORDER BY member.position)
        FROM jsonb_array_elements_text(e.params -> 'members') WITH ORDINALITY AS member(model_id, position)
        JOIN lungsql.models m ON m.model_id = member.model_id::integer) AS ensemble_members
FROM lungsql.predict_lung_cancer_detail(CAST(:patient_id AS text)) s
LEFT JOIN lungsql.models e ON e.model_id = s.model_id AND e.algorithm = 'ensemble'
""")


@dataclass(frozen=True)
class DeployedModel:
    model_id: int
    name: str
    version: int
    trained_at: dt.datetime
    auc: float | None
    deployment_name: str
    strategy: str
    deployed_at: dt.datetime
    ensemble_method: str | None = None  # an ensemble's method, and its members ("a v1, b v2")
    ensemble_members: str | None = None

    def as_json(self) -> dict:
        out = asdict(self)
        out["trained_at"] = self.trained_at.isoformat()
        out["deployed_at"] = self.deployed_at.isoformat()
        return out


@dataclass(frozen=True)
class Score:
    patient_id: str
    probability: float
    model: DeployedModel

    @property
    def percent(self) -> float:
        return round(self.probability * 100.0, 1)

    @property
    def band(self) -> str:
        return band_of(self.percent)[0]

    @property
    def colour(self) -> str:
        return band_of(self.percent)[1]

    @property
    def band_wording(self) -> str:
        return band_of(self.percent)[2]

    def as_json(self) -> dict:
        return {"patient_id": self.patient_id, "probability": self.probability, "percent": self.percent,
                "band": self.band, "colour": self.colour, "model": self.model.as_json()}


class ScoringUnavailable(LungSQLError):
    """No probability for this patient now (no features, no deployed model...); the message says why."""


def band_of(percent: float) -> tuple[str, str, str]:
    """(band, colour, wording) of a percentage as shown (rounded to 0.1)."""
    for lower, band, colour, wording in BANDS:
        if percent >= lower:
            return band, colour, wording
    return BANDS[-1][1:]


def _model(row) -> DeployedModel:
    return DeployedModel(model_id=row["model_id"], name=row["name"], version=row["version"],
                         trained_at=row["trained_at"], auc=row["auc"], deployment_name=row["deployment_name"],
                         strategy=row["strategy"], deployed_at=row["deployed_at"],
                         ensemble_method=row.get("ensemble_method"), ensemble_members=row.get("ensemble_members"))


def score(patient_id: str, via: str) -> Score:
    """Score one (existing) patient in the database and audit it; ScoringUnavailable when it cannot be."""
    conn = get_db()
    try:
        try:
            row = conn.execute(_SCORE, {"patient_id": patient_id, "via": via, "username": g.user["username"],
                                        "address": request.remote_addr}).mappings().one()
        except sa.exc.DBAPIError as exc:  # a lost database raises on: an error page, not a message
            raise ScoringUnavailable(*refusal(exc, f"scoring patient {patient_id!r}")) from None
    except ScoringUnavailable as exc:
        conn.rollback()
        audit.record("score_failed", patient_id=patient_id, detail={"via": via, "error": exc.message})
        raise
    conn.commit()  # the row lungsql.predictions got and its audit row, together
    return Score(patient_id, float(row["probability"]), _model(row))
