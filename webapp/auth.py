"""Signing in and out; every page but the sign-in page (and static files) needs a session.

The session is Flask's signed cookie holding the user's id. Each request
reads the user's row again, so a user disabled (or given another role) with
`lungsql user add --replace` is affected at their next click.
"""

from __future__ import annotations

import unicodedata
from urllib.parse import urlsplit

import sqlalchemy as sa
from flask import (Blueprint, abort, current_app, flash, g, redirect, render_template, request, session,
                   url_for)

from lungsql import users
from webapp import audit
from webapp.db import get_db

bp = Blueprint("auth", __name__)

THROTTLE = "lungsql_login_throttle"
PUBLIC_ENDPOINTS = {"auth.login", "static"}


@bp.before_app_request
def load_logged_in_user():
    g.user = None
    if request.endpoint == "static":
        return None
    user_id = session.get("user_id")
    if user_id is not None:
        row = get_db().execute(sa.text("SELECT user_id, username, role, disabled FROM lungsql.users "
                                       "WHERE user_id = :id"), {"id": user_id}).mappings().first()
        if row is None or row["disabled"]:
            session.clear()
        else:
            g.user = {"user_id": row["user_id"], "username": row["username"], "role": row["role"]}
    if g.user is None and request.endpoint not in PUBLIC_ENDPOINTS:
        if request.path.startswith("/api/") or request.method != "GET":
            abort(401)
        return redirect(url_for("auth.login", next=request.full_path.rstrip("?")))
    return None


@bp.route("/login", methods=("GET", "POST"))
def login():
    target = safe_next(request.values.get("next"))
    if request.method == "GET":
        if g.user:
            return redirect(target or url_for("patients.search"))
        return render_template("login.html", next=target, username="")

    username = clean_username(request.form.get("username", ""))
    password = request.form.get("password", "")
    address = request.remote_addr
    throttle = current_app.extensions[THROTTLE]
    wait = throttle.retry_after(get_db(), username, address)
    if wait:
        message = f"Too many failed sign-in attempts: wait {wait} s and try again."
        return (render_template("login.html", next=target, username=username, error=message), 429,
                {"Retry-After": str(wait)})
    # A name that cannot exist is checked as an unknown one: same answer, same time.
    user = users.authenticate(get_db(), username if users.USERNAME.match(username) else "", password)
    if user is None:
        failures, wait = throttle.after_failure(get_db(), username, address)
        audit.record("login_failed", username=username or None,
                     detail={"failures": failures, "wait_s": wait})
        message = "Unknown user name or wrong password."
        if wait:
            message += f" Too many failed attempts: wait {wait} s before the next one."
        return render_template("login.html", next=target, username=username, error=message)

    session.clear()
    session.permanent = True
    session["user_id"] = user["user_id"]
    g.user = user
    audit.record("login")
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
