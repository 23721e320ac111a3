"""Signing in and out; every page but the sign-in page (and static files) needs a session.

A sign-in attempt is one call of ``lungsql.sign_in`` in the database
(lungsql/server/sign_in.py), committed as it ends: it throttles failed attempts per
user name and address, per name and per address (serialized by advisory
locks, so a parallel burst is counted attempt by attempt), checks the
password against the stored hash, which the web app's role cannot read, and
audits the attempt. The session is Flask's signed cookie holding the user's
id. Each request reads the user's row again, so a user disabled (or given
another role) with `lungsql user add --replace` is affected at their next click:
here before the view runs, or, for a view marked `@checks_user_itself`, in the
view's own statement (the prediction API: one statement per request).
"""

from __future__ import annotations

import unicodedata
from dataclasses import asdict
from typing import Callable
from urllib.parse import urlsplit

import sqlalchemy as sa
from flask import (Blueprint, abort, current_app, flash, g, redirect, render_template, request, session,
                   url_for)

from lungsql.webapp import audit, login_limits
from lungsql.webapp.db import get_db

bp = Blueprint("auth", __name__)

PUBLIC_ENDPOINTS = {"auth.login", "static"}

# One attempt, throttled and audited in the database (sql/postgres/functions/020_web.sql).
_SIGN_IN = sa.text("""
SELECT outcome, user_id, role, retry_after
FROM lungsql.sign_in(CAST(:username AS text), CAST(:password AS text), CAST(:address AS text),
                     CAST(:max_failures AS integer), CAST(:max_failures_per_user AS integer),
                     CAST(:max_failures_per_address AS integer), CAST(:window_s AS double precision),
                     CAST(:base_delay_s AS double precision))
""")

# The same words whether the name exists or not.
WRONG = "Unknown user name or wrong password."
LOCKED = "Too many failed sign-in attempts for this user name or from this address: wait {wait} s and try again."


_USER = sa.text("SELECT user_id, username, role, disabled FROM lungsql.users WHERE user_id = :id")

# The attribute of a view function marked with checks_user_itself.
_CHECKS_USER = "lungsql_checks_user_itself"


def checks_user_itself(view: Callable) -> Callable:
    """Mark a view whose one statement reads the session's user row itself, joined on
    `session_user_id()` and refusing a disabled user, and that calls `signed_out()` when the row
    does not come back (scoring.score does): its request then costs the database one statement, not
    two. Every other view gets `g.user` checked before it runs."""
    setattr(view, _CHECKS_USER, True)
    return view


@bp.before_app_request
def load_logged_in_user():
    g.user = None
    g.session_user_id = None
    if request.endpoint == "static":
        return None
    user_id = session.get("user_id")
    if user_id is not None:
        if getattr(current_app.view_functions.get(request.endpoint), _CHECKS_USER, False):
            g.session_user_id = user_id  # the view's statement checks the row (see checks_user_itself)
            return None
        g.user = load_user(user_id)
        if g.user is None:
            session.clear()
    if g.user is None and request.endpoint not in PUBLIC_ENDPOINTS:
        if request.path.startswith("/api/") or request.method != "GET":
            abort(401)
        return redirect(url_for("auth.login", next=request.full_path.rstrip("?")))
    return None


def load_user(user_id) -> dict | None:
    """The user's user_id, username and role; None for a user who is gone or disabled."""
    row = get_db().execute(_USER, {"id": user_id}).mappings().first()
    if row is None or row["disabled"]:
        return None
    return {"user_id": row["user_id"], "username": row["username"], "role": row["role"]}


def session_user_id():
    """The signed-in user's id: of `g.user`, or, in a view marked checks_user_itself, the session's."""
    return g.user["user_id"] if g.user else g.session_user_id


def current_user() -> dict:
    """`g.user`, read now in a view marked checks_user_itself that needs it outside its statement."""
    if g.user is None:
        g.user = load_user(session_user_id())
        if g.user is None:
            signed_out()
    return g.user


def signed_out():
    """The session's user is gone or disabled: end the session and answer 401."""
    session.clear()
    abort(401)


@bp.route("/login", methods=("GET", "POST"))
def login():
    target = safe_next(request.values.get("next"))
    if request.method == "GET":
        if g.user:
            return redirect(target or url_for("patients.search"))
        return render_template("login.html", next=target, username="")

    username = clean_username(request.form.get("username", ""))
    # PostgreSQL text cannot hold NUL; no stored password has one (lungsql.accounts.hash_password).
    password = request.form.get("password", "").replace("\x00", "\ufffd")
    conn = get_db()
    # Committed as the statement ends (webapp.db): the attempt's audit row, and the next attempt may go on.
    row = conn.execute(_SIGN_IN, {"username": username, "password": password, "address": request.remote_addr,
                                  **asdict(login_limits(current_app.config))}).one()
    if row.outcome == "locked":
        return (render_template("login.html", next=target, username=username,
                                error=LOCKED.format(wait=row.retry_after)),
                429, {"Retry-After": str(row.retry_after)})
    if row.outcome != "ok":
        message = WRONG
        if row.retry_after:
            message += f" Too many failed attempts: wait {row.retry_after} s before the next one."
        return render_template("login.html", next=target, username=username, error=message)

    session.clear()
    session.permanent = True
    session["user_id"] = row.user_id
    g.user = {"user_id": row.user_id, "username": username, "role": row.role}
    return redirect(target or url_for("patients.search"))


@bp.post("/logout")
def logout():
    audit.record("logout")
    session.clear()
    flash("You are signed out.", "info")
    return redirect(url_for("auth.login"))


def admin_required() -> None:
    """For a blueprint's before_request: admins only (403 for everyone else)."""
    if g.user is None:
        abort(401)
    if g.user["role"] != "admin":
        abort(403, description="This page is for administrators.")


def clean_username(text: str) -> str:
    """The name as typed, without control characters, at most 64 characters (the longest valid name)."""
    text = "".join(ch for ch in text if unicodedata.category(ch) != "Cc")
    return text.strip()[:64]


def safe_next(target: str | None) -> str | None:
    """`target` if it is a path on this site (never another host), else None."""
    if not target or not target.startswith("/") or target.startswith(("//", "/\\")):
        return None
    if any(unicodedata.category(ch) == "Cc" for ch in target) or "\\" in target:
        return None
    parts = urlsplit(target)
    if parts.scheme or parts.netloc:
        return None
    return target
