"""One handler per kind of error: a small page, or JSON under /api/.

LungSQLError (lungsql.errors) is rendered with its message and hint; an
unreachable database or a lost connection reads as 'database unavailable'
(503) with one sentence that names no socket, port, host or role (those go to
the server's log).
"""

from __future__ import annotations

import sqlalchemy as sa
from flask import Flask, jsonify, render_template, request
from werkzeug.exceptions import HTTPException, InternalServerError

from lungsql.errors import DatabaseUnavailable, LungSQLError
from lungsql.webapp.db import UNAVAILABLE

TITLES = {
    400: "Bad request",
    401: "Sign-in needed",
    403: "Not allowed",
    404: "Not found",
    405: "Method not allowed",
    413: "Request too large",
    429: "Too many attempts",
    500: "Something went wrong",
    503: "Database unavailable",
}

MESSAGES = {
    400: "The request could not be understood. If you sent a form, reload the page and try again.",
    401: "Sign in to see this page.",
    403: "Your account may not open this page.",
    404: "There is nothing at this address.",
    429: "Too many attempts: wait a little and try again.",
    500: "The server met an error it did not expect. It has been logged.",
}


def render_error(status: int, message: str | None = None, hint: str | None = None, headers=None):
    message = message or MESSAGES.get(status) or TITLES.get(status, "Error")
    title = TITLES.get(status, "Error")
    if request.path.startswith("/api/"):
        body = {"error": title.lower(), "status": status, "message": message}
        if hint:
            body["hint"] = hint
        response = jsonify(body)
    else:
        response = render_template("error.html", status=status, title=title, message=message, hint=hint)
    return response, status, headers or {}


def _http(exc: HTTPException):
    default = type(exc).description
    message = exc.description if exc.description and exc.description != default else None
    headers = {"Retry-After": str(exc.retry_after)} if getattr(exc, "retry_after", None) else None
    if exc.code == 405 and exc.valid_methods:
        headers = {"Allow": ", ".join(exc.valid_methods)}
    return render_error(exc.code or 500, message, headers=headers)


def bad_request(exc: HTTPException):
    return _http(exc)  # also the CSRF error of flask_wtf (a BadRequest) with its reason


def unauthorized(exc: HTTPException):
    return _http(exc)


def forbidden(exc: HTTPException):
    return _http(exc)


def not_found(exc: HTTPException):
    return _http(exc)


def too_many_requests(exc: HTTPException):
    return _http(exc)


def other_http(exc: HTTPException):
    return _http(exc)


def internal_error(exc: InternalServerError):
    return render_error(500)


def lungsql_error(exc: LungSQLError):
    from flask import current_app

    current_app.logger.error("%s: %s", type(exc).__name__, exc)
    if isinstance(exc, DatabaseUnavailable):
        return render_error(503, UNAVAILABLE)
    return render_error(500, _sentence(exc.message), exc.hint)


def database_gone(exc: sa.exc.DBAPIError):
    from flask import current_app

    current_app.logger.error("database error: %s", exc)
    return render_error(503, UNAVAILABLE)


def register(app: Flask) -> None:
    app.register_error_handler(400, bad_request)
    app.register_error_handler(401, unauthorized)
    app.register_error_handler(403, forbidden)
    app.register_error_handler(404, not_found)
    app.register_error_handler(429, too_many_requests)
    app.register_error_handler(500, internal_error)
    app.register_error_handler(HTTPException, other_http)
    app.register_error_handler(LungSQLError, lungsql_error)
    app.register_error_handler(sa.exc.OperationalError, database_gone)
    app.register_error_handler(sa.exc.InterfaceError, database_gone)


def _sentence(text: str) -> str:
    return text[:1].upper() + text[1:] if text else text
