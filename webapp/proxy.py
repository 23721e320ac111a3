"""Believing X-Forwarded-For and X-Forwarded-Proto from one reverse proxy only.

Behind an https proxy the client's address (for the audit log and sign-in
throttling) and the scheme (for Secure cookies and redirects) arrive in
headers. Anyone can send those headers, so they are believed only on
connections from the proxy's own address and removed from every other one.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

from werkzeug.middleware.proxy_fix import ProxyFix

FORWARDED = ("HTTP_X_FORWARDED_FOR", "HTTP_X_FORWARDED_PROTO", "HTTP_X_FORWARDED_HOST", "HTTP_X_FORWARDED_PORT",
             "HTTP_X_FORWARDED_PREFIX", "HTTP_FORWARDED")


class TrustedProxy:
    """WSGI middleware: `app` sees the forwarded client address and scheme on requests whose peer is
    `proxy_address` (one proxy hop), and no forwarded headers on any other request."""

    def __init__(self, app: Callable, proxy_address: str) -> None:
        self.app = app
        self.proxy_address = proxy_address
        self._fixed = ProxyFix(app, x_for=1, x_proto=1, x_host=0, x_port=0, x_prefix=0)

    def __call__(self, environ: dict[str, Any], start_response: Callable) -> Iterable[bytes]:
        if environ.get("REMOTE_ADDR") == self.proxy_address:
            return self._fixed(environ, start_response)
        for header in FORWARDED:
            environ.pop(header, None)
        return self.app(environ, start_response)
