"""Serving the web app: several processes, each with a few threads, as `lungsql serve` runs it.

One Python process runs Python on one core at a time, and a request spends
most of its CPU in Python (the web framework, the database driver), so one
process caps the app at about one core whatever its threads. gunicorn forks
`workers` processes (one per core by default) that share the listening
socket; each runs `threads` threads and its own database pool. Everything
the processes must agree on lives in the database (sessions are signed
cookies; sign-in throttling reads the audit log). On Windows, which has no
fork, waitress serves in one process.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from typing import Callable, Iterator

from flask import Flask

from lungsql.featurize import default_threads


def default_workers() -> int:
    """One process per core this process may use."""
    return default_threads()


def serve(make_app: Callable[[int], Flask], host: str, port: int, workers: int | None = None,
          threads: int = 4, trusted_proxy: str | None = None) -> None:
    """Serve `make_app(pool_size)` until interrupted. The app is built once here first, so that a bad
    setting stops the server before it forks, and the site's signing key exists before the workers read it.
    Each worker warms its database pool in the background as it starts (`webapp.db.warm_pool`)."""
    from webapp.db import warm_pool
    from webapp.proxy import TrustedProxy

    workers = workers or default_workers()
    make_app(1)

    def build(pool_size: int = threads) -> Callable:
        app = make_app(pool_size)
        warm_pool(app)
        return TrustedProxy(app, trusted_proxy) if trusted_proxy else app

    if sys.platform == "win32":
        import waitress

        waitress.serve(build(threads * workers), host=host, port=port, threads=threads * workers, ident="lungsql")
        return
    _gunicorn(build, {
        "bind": f"[{host}]:{port}" if ":" in host else f"{host}:{port}",
        "workers": workers,
        "worker_class": "gthread",
        "threads": threads,
        "proc_name": "lungsql-web",
        "keepalive": 5,
        "timeout": 120,            # a worker stuck this long is restarted
        "graceful_timeout": 10,
        "errorlog": "-",
        "loglevel": "warning",
        "accesslog": None,         # the audit log says who saw what
        "forwarded_allow_ips": "",  # TrustedProxy decides which forwarded headers to believe
        "control_socket_disable": True,
    }).run()


def _gunicorn(build: Callable[[], Callable], options: dict):
    """A gunicorn application configured from `options` (not from a file or the command line) whose
    workers each call `build` after the fork, for an app with its own engine and pool."""
    from gunicorn.app.base import BaseApplication

    class Application(BaseApplication):
        def load_config(self) -> None:
            for key, value in options.items():
                if key in self.cfg.settings:  # settings this gunicorn version lacks are left out
                    self.cfg.set(key, value)

        def load(self) -> Callable:
            return build()

    os.environ.pop("GUNICORN_CMD_ARGS", None)  # the options are the whole configuration
    return Application()


@dataclass(frozen=True)
class Running:
    url: str  # http://127.0.0.1:PORT
    pid: int  # the server's first process; the workers are its children


@contextlib.contextmanager
def running(web_url: str, workers: int | None = None, threads: int = 4,
            timeout_s: float = 60.0) -> Iterator[Running]:
    """`lungsql serve` in processes of its own on a free loopback port, until the block ends: the app
    as deployed, for the benchmark and the end-to-end tests."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    argv = [sys.executable, "-m", "lungsql", "serve", "--port", str(port), "--threads", str(threads),
            "--web-db", web_url] + (["--workers", str(workers)] if workers else [])
    env = dict(os.environ, LUNGSQL_SECRET_KEY=secrets.token_hex(32))
    log = tempfile.TemporaryFile()  # a file, not a pipe: nobody reads it while the server runs
    server = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=log, start_new_session=True)
    try:
        deadline = time.monotonic() + timeout_s
        while True:  # until a worker answers: gunicorn's master listens before its workers exist
            with contextlib.suppress(OSError), urllib.request.urlopen(f"http://127.0.0.1:{port}/login", timeout=5):
                break
            if server.poll() is not None or time.monotonic() > deadline:
                log.seek(0)
                raise RuntimeError("lungsql serve did not start: " + log.read().decode(errors="replace")[-500:])
            time.sleep(0.1)
        yield Running(f"http://127.0.0.1:{port}", server.pid)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
        log.close()
