"""The audit trail: who signed in, viewed or scored which patient, deployed which model.

Rows go to ``lungsql.audit_log``, which the web app's role may append to and
read, never change or delete.
"""

from __future__ import annotations

import json
from typing import Any

import sqlalchemy as sa
from flask import g, request

from webapp.db import get_db

ACTIONS = ("login", "login_failed", "logout", "view_patient", "score_patient", "score_failed",
           "deploy", "deploy_failed")

_INSERT = sa.text("INSERT INTO lungsql.audit_log (username, action, patient_id, address, detail) "
                  "VALUES (:username, :action, :patient_id, :address, CAST(:detail AS jsonb))")


def record(action: str, patient_id: str | None = None, detail: dict[str, Any] | None = None,
           username: str | None = None, commit: bool = True) -> None:
    """Append one row for the signed-in user (or `username`) from this request's address."""
    if action not in ACTIONS:
        raise ValueError(f"unknown audit action {action!r}")
    if username is None and g.get("user"):
        username = g.user["username"]
    conn = get_db()
    conn.execute(_INSERT, {"username": username, "action": action, "patient_id": patient_id,
                           "address": request.remote_addr, "detail": json.dumps(detail or {})})
    if commit:
        conn.commit()


def latest(limit: int) -> list[sa.Row]:
    return get_db().execute(sa.text(
        "SELECT audit_id, occurred_at, username, action, patient_id, address, detail "
        "FROM lungsql.audit_log ORDER BY occurred_at DESC, audit_id DESC LIMIT :limit"),
        {"limit": limit}).all()
