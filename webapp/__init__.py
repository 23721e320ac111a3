"""The clinician web app: patient search, the scan viewer and the probability from the database.

``create_app(test_config)`` builds the Flask app; ``lungsql serve`` serves it
(``webapp.server``), connected as the least-privileged role ``lungsql_web``. The
app never loads a model: probabilities come from ``lungsql.predict_lung_cancer``
(CT) and ``lungsql.predict_findings`` (chest radiographs) in the database. It is
a research tool; its output is not a diagnosis.
"""

from __future__ import annotations

import datetime as dt

import jinja2
from flask import Flask, g, request
from flask_wtf.csrf import CSRFProtect

import config_preprocessing as config

csrf = CSRFProtect()

# Responses may load scripts, styles and images only from this site (no inline code, no CDN).
CONTENT_SECURITY_POLICY = ("default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
                           "object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'")

# Fixed by design, not settings: the cookie's name and protections, the size of a form, how much of a
# search is read.
FIXED = {
    "DATABASE_POOL_SIZE": 4,           # one connection per thread: lungsql serve runs 4 per process
    # A pooled connection unused for this long is checked (a round trip) before a request gets it, so
    # that a database restarted while the app was idle costs nobody an error page; connections in use
    # are not checked on every request (webapp.db).
    "DATABASE_CHECK_IDLE_S": 10.0,
    "SESSION_COOKIE_NAME": "lungsql_session",
    "SESSION_COOKIE_HTTPONLY": True,
    "SESSION_COOKIE_SAMESITE": "Lax",
    # A sign-in lasts LUNGSQL_WEB_SESSION_HOURS from the sign-in, not from the last click: the cookie is
    # signed when the session changes (signing in, a form's first CSRF token), not again on every answer.
    "SESSION_REFRESH_EACH_REQUEST": False,
    "MAX_CONTENT_LENGTH": 64 * 1024,   # forms only: no uploads
    "QUERY_MAX_CHARS": 200,            # longer search input is cut, not refused
    # A radiograph's longest side as its page shows it: lungsql.radiograph_heatmap draws its maps at
    # this size, so the map lies exactly over the image. The patient page's thumbnails are smaller.
    "RADIOGRAPH_MAX_SIDE": 1024,
    "RADIOGRAPH_THUMBNAIL_SIDE": 160,
}


def settings() -> dict:
    """The app's configuration from the settings of config_preprocessing (LUNGSQL_WEB_*, LUNGSQL_LOGIN_*...)."""
    hours = config.get("LUNGSQL_WEB_SESSION_HOURS")
    return {
        **FIXED,
        "PERMANENT_SESSION_LIFETIME": dt.timedelta(hours=hours),
        "WTF_CSRF_TIME_LIMIT": hours * 3600,  # a form stays valid as long as the session
        "SESSION_COOKIE_SECURE": bool(config.get("LUNGSQL_SECURE_COOKIES")),
        "SEARCH_LIMIT": config.get("LUNGSQL_WEB_SEARCH_LIMIT"),
        "SLICE_CACHE_BYTES": config.get("LUNGSQL_WEB_SLICE_CACHE_MB") << 20,
        "SLICE_MAX_AGE_S": config.get("LUNGSQL_WEB_SLICE_MAX_AGE_S"),
        "HU_WINDOW": tuple(config.get("LUNGSQL_HU_WINDOW")),
        # Failed sign-ins counted by lungsql.sign_in within the window (see lungsql.accounts.Limits).
        "LOGIN_MAX_FAILURES": config.get("LUNGSQL_LOGIN_MAX_FAILURES"),
        "LOGIN_MAX_FAILURES_PER_USER": config.get("LUNGSQL_LOGIN_MAX_FAILURES_PER_USER"),
        "LOGIN_MAX_FAILURES_PER_ADDRESS": config.get("LUNGSQL_LOGIN_MAX_FAILURES_PER_ADDRESS"),
        "LOGIN_WINDOW_S": config.get("LUNGSQL_LOGIN_WINDOW_S"),
        "LOGIN_BASE_DELAY_S": config.get("LUNGSQL_LOGIN_BASE_DELAY_S"),
    }


def create_app(test_config: dict | None = None) -> Flask:
    """The app. `test_config` overrides the defaults, e.g. {"DATABASE_URL": ..., "SECRET_KEY": ...}."""
    from lungsql.webapp import admin, api, auth, db, errors, patients, radiographs
    from lungsql.webapp.sessions import VerifiedCookieSessions
    from lungsql.webapp.slices import PngCache

    app = Flask(__name__)
    app.session_interface = VerifiedCookieSessions()
    app.config.from_mapping(settings())
    if test_config:
        app.config.update(test_config)
    if not app.config.get("SECRET_KEY"):
        from lungsql.client.secrets import site_secret

        app.config["SECRET_KEY"] = site_secret("flask", "LUNGSQL_SECRET_KEY")
    if not app.config.get("DATABASE_URL"):
        from lungsql.client.db import resolve_web_url

        app.config["DATABASE_URL"] = resolve_web_url()

    login_limits(app.config).check()  # a bad setting stops the app now, not each sign-in later
    db.init_app(app)
    csrf.init_app(app)
    app.extensions[patients.SLICE_CACHE] = PngCache(app.config["SLICE_CACHE_BYTES"])

    app.register_blueprint(auth.bp)
    app.register_blueprint(patients.bp)
    app.register_blueprint(radiographs.bp)
    app.register_blueprint(admin.bp)
    app.register_blueprint(api.bp)
    errors.register(app)
    app.after_request(_security_headers)
    app.jinja_env.filters.update(sex=_sex, age=_age, when=_when, number=_number)
    app.context_processor(lambda: {"current_user": g.get("user")})
    return app


def login_limits(settings):
    """The sign-in limits of these settings, as lungsql.sign_in takes them."""
    from lungsql.accounts import Limits

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
    # Undefined: a metric this kind of model does not record (a radiograph model has no Brier score).
    if value is None or isinstance(value, (bool, jinja2.Undefined)):
        return "–"
    try:
        return f"{float(value):.{digits}f}"
    except (TypeError, ValueError):
        return "–"
