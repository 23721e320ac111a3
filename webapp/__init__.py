"""The clinician web app: patient search, the scan viewer and the probability from the database.

``create_app(test_config)`` builds the Flask app; ``lungsql serve`` serves it
(``webapp.server``), connected as the least-privileged role ``lungsql_web``. The
app never loads a model: probabilities come from ``lungsql.predict_lung_cancer``
in the database. It is a research tool; its output is not a diagnosis.
"""

from __future__ import annotations

import datetime as dt

from flask import Flask, g, request
from flask_wtf.csrf import CSRFProtect

import config_preprocessing as config

csrf = CSRFProtect()

# Responses may load scripts, styles and images only from this site (no inline code, no CDN).
CONTENT_SECURITY_POLICY = ("default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
                           "object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'")

DEFAULTS = {
    "DATABASE_POOL_SIZE": 4,           # one connection per thread: lungsql serve runs 4 per process
    "SESSION_COOKIE_NAME": "lungsql_session",
    "SESSION_COOKIE_HTTPONLY": True,
    "SESSION_COOKIE_SAMESITE": "Lax",
    "PERMANENT_SESSION_LIFETIME": dt.timedelta(hours=8),
    "WTF_CSRF_TIME_LIMIT": 8 * 3600,   # a form stays valid as long as the session
    "MAX_CONTENT_LENGTH": 64 * 1024,   # forms only: no uploads
    "SEARCH_LIMIT": 50,                # patients listed at most per search
    "QUERY_MAX_CHARS": 200,            # longer search input is cut, not refused
    "SLICE_CACHE_BYTES": 64 * 1024 * 1024,
    "SLICE_MAX_AGE_S": 600,            # browsers revalidate slice images after this (ETag)
    # Failed sign-ins counted by lungsql.sign_in within the window: per user name and address...
    "LOGIN_MAX_FAILURES": 5,
    "LOGIN_MAX_FAILURES_PER_USER": 20,      # ...per user name from every address, per address for every name...
    "LOGIN_MAX_FAILURES_PER_ADDRESS": 50,
    "LOGIN_WINDOW_S": 600,
    "LOGIN_BASE_DELAY_S": 30,               # ...then wait 30 s, 60 s, 120 s ... (at most the window)
}


def create_app(test_config: dict | None = None) -> Flask:
    """The app. `test_config` overrides the defaults, e.g. {"DATABASE_URL": ..., "SECRET_KEY": ...}."""
    from webapp import admin, api, auth, db, errors, patients
    from webapp.slices import PngCache

    app = Flask(__name__)
    app.config.from_mapping(DEFAULTS)
    app.config["SESSION_COOKIE_SECURE"] = _secure_cookies()
    if test_config:
        app.config.update(test_config)
    if not app.config.get("SECRET_KEY"):
        from lungsql.secrets import site_secret

        app.config["SECRET_KEY"] = site_secret("flask", "LUNGSQL_SECRET_KEY")
    if not app.config.get("DATABASE_URL"):
        from lungsql.db import resolve_web_url

        app.config["DATABASE_URL"] = resolve_web_url()
    if not app.config.get("HU_WINDOW"):
        app.config["HU_WINDOW"] = tuple(config.get("LUNGSQL_HU_WINDOW"))

    login_limits(app.config).check()  # a bad setting stops the app now, not each sign-in later
    db.init_app(app)
    csrf.init_app(app)
    app.extensions[patients.SLICE_CACHE] = PngCache(app.config["SLICE_CACHE_BYTES"])

    app.register_blueprint(auth.bp)
    app.register_blueprint(patients.bp)
    app.register_blueprint(admin.bp)
    app.register_blueprint(api.bp)
    errors.register(app)
    app.after_request(_security_headers)
    app.jinja_env.filters.update(sex=_sex, age=_age, when=_when, number=_number)
    app.context_processor(lambda: {"current_user": g.get("user")})
    return app


def login_limits(settings):
    """The sign-in limits of these settings, as lungsql.sign_in takes them."""
    from lungsql.sign_in import Limits

    return Limits(max_failures=settings["LOGIN_MAX_FAILURES"],
                  max_failures_per_user=settings["LOGIN_MAX_FAILURES_PER_USER"],
                  max_failures_per_address=settings["LOGIN_MAX_FAILURES_PER_ADDRESS"],
                  window_s=settings["LOGIN_WINDOW_S"], base_delay_s=settings["LOGIN_BASE_DELAY_S"])


def _security_headers(response):
    headers = response.headers
    headers.setdefault("Content-Security-Policy", CONTENT_SECURITY_POLICY)
    headers.setdefault("X-Content-Type-Options", "nosniff")
    headers.setdefault("X-Frame-Options", "DENY")
    headers.setdefault("Referrer-Policy", "same-origin")
    if request.endpoint != "static" and response.mimetype in ("text/html", "application/json"):
        headers.setdefault("Cache-Control", "no-store")  # pages hold patient data
    return response


def _secure_cookies() -> bool:
    """Session cookies only over https: LUNGSQL_SECURE_COOKIES=1 (or SESSION_COOKIE_SECURE in the config)."""
    return bool(config.get("LUNGSQL_SECURE_COOKIES"))


def _sex(value: str | None) -> str:
    return {"M": "Male", "F": "Female", "O": "Other"}.get(value or "", "Unknown")


def _age(value: float | None) -> str:
    return "Unknown" if value is None else f"{int(value)} years"


def _when(value) -> str:
    if value is None:
        return ""
    if isinstance(value, dt.datetime):
        return value.strftime("%Y-%m-%d %H:%M %Z").strip()
    return value.isoformat()


def _number(value, digits: int = 3) -> str:
    if value is None or isinstance(value, bool):
        return "–"
    try:
        return f"{float(value):.{digits}f}"
    except (TypeError, ValueError):
        return "–"
