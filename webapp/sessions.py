"""The session cookie: Flask's, signed with the app's key, verified once per distinct cookie.

Verifying a cookie (itsdangerous: deriving the key, the HMAC, base64, JSON)
took a sixth of the app's CPU for a request of the prediction API. A browser
sends the same cookie with every request until its session changes, so the app
keeps the cookies it has verified, by their exact text (at most KEPT of them),
with their contents and the second they were signed: a cookie seen before is
read from memory, and is refused as Flask refuses it once older than the
session's lifetime. Any other cookie, a changed byte included, is verified as
Flask verifies it; one that fails is never kept.
"""

from __future__ import annotations

import threading
import time

from flask import Flask, Request
from flask.sessions import SecureCookieSession, SecureCookieSessionInterface
from itsdangerous import BadSignature

#: Cookies kept at most per process; when full, they are all forgotten (and verified again as they come).
KEPT = 4096


class VerifiedCookieSessions(SecureCookieSessionInterface):
    """Flask's signed cookie sessions, each distinct cookie verified once (see the module's docstring)."""

    def __init__(self, kept: int = KEPT) -> None:
        self._kept = kept
        self._known: dict[str, tuple[str, int]] = {}  # cookie -> (its data as JSON, when it was signed)
        self._lock = threading.Lock()

    def open_session(self, app: Flask, request: Request) -> SecureCookieSession | None:
        cookie = request.cookies.get(self.get_cookie_name(app))
        if not cookie:
            return self.session_class() if app.secret_key else None
        max_age = int(app.permanent_session_lifetime.total_seconds())
        known = self._known.get(cookie)
        if known is None:
            signer = self.get_signing_serializer(app)
            if signer is None:
                return None
            try:
                data, signed = signer.loads(cookie, max_age=max_age, return_timestamp=True)
            except BadSignature:
                return self.session_class()
            known = (self.serializer.dumps(data), int(signed.timestamp()))
            with self._lock:
                if len(self._known) >= self._kept:
                    self._known.clear()
                self._known[cookie] = known
        data_json, signed_at = known
        age = int(time.time()) - signed_at
        if age > max_age or age < 0:  # as itsdangerous counts it
            return self.session_class()
        return self.session_class(self.serializer.loads(data_json))  # a copy of its own: sessions change
