"""The audit trail: who signed out, viewed or scored which patient, deployed which model.

Rows go to ``lungsql.audit_log`` through ``lungsql.audit_append`` (the web
app's role may neither read the log nor write to it otherwise). Sign-ins are
audited by ``lungsql.sign_in`` itself. The DBA reads the log with
`lungsql audit`.
"""

from __future__ import annotations

import json
from typing import Any

import sqlalchemy as sa
from flask import g, request

from lungsql.webapp.db import get_db

# What lungsql.audit_append accepts (sign-in rows are lungsql.sign_in's alone).
ACTIONS = ("logout", "view_patient", "view_radiograph", "score_patient", "score_failed", "deploy", "deploy_failed")

_APPEND = sa.text("SELECT lungsql.audit_append(:username, :action, :patient_id, :address, CAST(:detail AS jsonb))")


def record(action: str, patient_id: str | None = None, detail: dict[str, Any] | None = None,
           username: str | None = None) -> None:
    """Append one row for the signed-in user (or `username`) from this request's address. Committed as
    the statement ends, or with the rest of the block inside webapp.db.transaction()."""
    if action not in ACTIONS:
        raise ValueError(f"unknown audit action {action!r}")
    if username is None and g.get("user"):
        username = g.user["username"]
    get_db().execute(_APPEND, {"username": username, "action": action, "patient_id": patient_id,
                               "address": request.remote_addr, "detail": json.dumps(detail or {})})
