"""A patient's probability of lung cancer, from the database's scoring function.

The web app never loads a model: it calls ``lungsql.predict_lung_cancer_detail``,
which returns the probability with the deployed model that gave it, so the
model shown is the model used, even while an administrator deploys another
one. The prediction row the function records and the audit row are written
by one statement and commit together. That statement also reads the signed-in
user's row, and scores nobody for a user who is gone or disabled: the prediction
API costs the database one statement per request (auth.checks_user_itself).
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

import sqlalchemy as sa
from flask import g, request

from lungsql.errors import LungSQLError
from lungsql.webapp import audit, auth
from lungsql.webapp.db import fetch_one, refusal

# Colour bands of the probability, in percent: [lower bound, band, colour, wording).
BANDS = (
    (40.0, "high", "red", "40 % or more"),
    (20.0, "intermediate", "orange", "20 % to 40 %"),
    (0.0, "low", "green", "below 20 %"),
)

# The signed-in user's row, the score and its audit row in one statement (one round trip), committed
# together as it ends. The scoring function is called in the target list of the user's row, which the
# database computes only for a row that passed the WHERE clause: no user (gone or disabled), no score and
# no audit row. MATERIALIZED: computed once, whatever the columns taken from it. The audit row is appended
# by lungsql.audit_append, once per row the scoring returned (none when it raised). Run with
# db.fetch_one: psycopg's placeholders.
_SCORE = """
WITH scored AS MATERIALIZED (
    SELECT u.username, u.role, lungsql.predict_lung_cancer_detail(CAST(%(patient_id)s AS text)) AS s
    FROM lungsql.users u
    WHERE u.user_id = CAST(%(user_id)s AS integer) AND NOT u.disabled
)
SELECT sc.username, sc.role, (sc.s).*,
       lungsql.audit_append(sc.username, 'score_patient', CAST(%(patient_id)s AS text), CAST(%(address)s AS text),
                            jsonb_build_object('via', CAST(%(via)s AS text), 'model_id', (sc.s).model_id,
                                               'model_name', (sc.s).name, 'model_version', (sc.s).version,
                                               'probability', (sc.s).probability)) AS audit_id,
       e.params ->> 'method' AS ensemble_method,
       (SELECT string_agg(m.name || ' v' || m.version, ', ' ORDER BY member.position)
        FROM jsonb_array_elements_text(e.params -> 'members') WITH ORDINALITY AS member(model_id, position)
        JOIN lungsql.models m ON m.model_id = member.model_id::integer) AS ensemble_members
FROM scored sc
LEFT JOIN lungsql.models e ON e.model_id = (sc.s).model_id AND e.algorithm = 'ensemble'
"""


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
        # Field by field: dataclasses.asdict deep-copies every value, at four times the CPU.
        return {"model_id": self.model_id, "name": self.name, "version": self.version,
                "trained_at": self.trained_at.isoformat(), "auc": self.auc, "deployment_name": self.deployment_name,
                "strategy": self.strategy, "deployed_at": self.deployed_at.isoformat(),
                "ensemble_method": self.ensemble_method, "ensemble_members": self.ensemble_members}


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
        band, colour, _ = band_of(self.percent)
        return {"patient_id": self.patient_id, "probability": self.probability, "percent": self.percent,
                "band": band, "colour": colour, "model": self.model.as_json()}


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
    """Score one (existing) patient in the database and audit it, for the signed-in user (401 when the
    user is gone or disabled); ScoringUnavailable when it cannot be scored (audited too)."""
    try:
        row = fetch_one(_SCORE, {"patient_id": patient_id, "via": via, "user_id": auth.session_user_id(),
                                 "address": request.remote_addr})
    except sa.exc.DBAPIError as exc:  # a lost database raises on: an error page, not a message
        failure = ScoringUnavailable(*refusal(exc, f"scoring patient {patient_id!r}"))
        auth.current_user()  # 401 for a user gone or disabled: no audit row in their name
        audit.record("score_failed", patient_id=patient_id, detail={"via": via, "error": failure.message})
        raise failure from None
    if row is None:
        auth.signed_out()
    if g.user is None:
        g.user = {"user_id": auth.session_user_id(), "username": row["username"], "role": row["role"]}
    return Score(patient_id, float(row["probability"]), _model(row))
