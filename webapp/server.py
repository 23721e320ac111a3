"""Serving the web app: several processes, each with a few threads, as `lungsql serve` runs it.

One Python process runs Python on one core at a time, and a request spends
most of its CPU in Python (the web framework, the database driver), so one
process caps the app at about one core whatever its threads. gunicorn forks
`workers` processes (one per core by default), each listening on the port
with a socket of its own (the kernel spreads connections over them); each
runs `threads` threads and its own database pool, warmed before it takes
requests. Everything the processes must agree on lives in the database
(sessions are signed cookies; sign-in throttling reads the audit log). On
Windows, which has no fork, waitress serves in one process.

Started as root, `lungsql serve` reads what is secret first (the signing key,
the web role's password) and then becomes, for good, the unprivileged OS user
LUNGSQL_WEB_OS_USER before anything serves a request (`drop_privileges`): code
run in a worker then has that user's rights, not root's, and reaches the
database only as lungsql_web.
"""

from __future__ import annotations

import contextlib
import gc
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

from lungsql.errors import ConfigurationError

#: How long a worker waits for its database pool to be warm before it takes requests (then it takes
#: them anyway; a failed warm-up is logged). Below gunicorn's worker timeout.
WARM_UP_WAIT_S = 60.0

#: How to create the web server's OS user, for the message that says it is missing.
CREATE_WEB_OS_USER = "useradd --system --no-create-home --shell /usr/sbin/nologin lungsql-web"


def default_workers() -> int:
    """One process per core this process may use (its affinity mask, else os.cpu_count())."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def web_os_user(name: str):
    """The passwd entry of the OS user to serve as (LUNGSQL_WEB_OS_USER), which must exist and not be root."""
    import pwd

    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        raise ConfigurationError(
            f"lungsql serve runs as root and will not serve as root, but the OS user {name!r} to serve as "
            "does not exist",
            hint=f"create it: `{CREATE_WEB_OS_USER.replace('lungsql-web', name)}` (`make bootstrap` creates "
                 "lungsql-web), or set LUNGSQL_WEB_OS_USER to an unprivileged user",
        ) from None
    if entry.pw_uid == 0 or entry.pw_gid == 0:
        raise ConfigurationError(
            f"LUNGSQL_WEB_OS_USER={name!r} is root or in the root group: lungsql serve will not serve as root",
            hint=f"use an unprivileged user, e.g. `{CREATE_WEB_OS_USER}`",
        )
    return entry


def unreadable_for(entry, paths: list[str]) -> str | None:
    """The first of `paths` (folders) that the OS user `entry` cannot list and enter, or None."""
    probe = subprocess.run(
        ["/bin/sh", "-c", 'for p; do test -r "$p" && test -x "$p" || { echo "$p"; exit 1; }; done', "sh", *paths],
        user=entry.pw_uid, group=entry.pw_gid, extra_groups=[], cwd="/", capture_output=True, text=True,
    )
    if probe.returncode == 0:
        return None
    return probe.stdout.strip() or ", ".join(paths)


def needed_folders() -> list[str]:
    """The folders the server reads from after giving up root: Python's standard library and its
    extension modules, the installed packages, lungsql and the web app (templates, static files)."""
    import sysconfig

    import flask
    import gunicorn

    import lungsql
    from lungsql import webapp

    folders = [sysconfig.get_paths()["stdlib"], sysconfig.get_paths()["platstdlib"] + "/lib-dynload",
               os.path.dirname(os.path.dirname(flask.__file__)), os.path.dirname(os.path.dirname(gunicorn.__file__)),
               os.path.dirname(lungsql.__file__), os.path.dirname(webapp.__file__)]
    return [folder for folder in dict.fromkeys(folders) if os.path.isdir(folder)]


def drop_privileges(entry, reach: tuple[str, ...] = ()) -> None:
    """Become the OS user `entry` (a passwd entry) for good: no supplementary groups, its group, its uid
    (real, effective and saved), its HOME. First checked: the user can read the Python that runs the
    server (its modules are imported as they are needed) and the folders in `reach` (the database's
    socket); afterwards: root cannot be regained."""
    blocked = unreadable_for(entry, needed_folders() + list(reach))
    if blocked:
        raise ConfigurationError(
            f"lungsql serve would serve as the OS user {entry.pw_name!r}, which cannot enter {blocked} "
            "(the server needs it once it has given up root)",
            hint=f"let {entry.pw_name} traverse the folders above it (`make bootstrap` does for the venv's "
                 f"Python, with setfacl -m u:{entry.pw_name}:x), or build .venv from a Python every user may "
                 "read, e.g. /usr/bin/python3.11",
        )
    os.setgroups([])
    os.setresgid(entry.pw_gid, entry.pw_gid, entry.pw_gid)
    os.setresuid(entry.pw_uid, entry.pw_uid, entry.pw_uid)
    os.environ.update(HOME=entry.pw_dir, USER=entry.pw_name, LOGNAME=entry.pw_name)
    regained = True
    try:
        os.setuid(0)
    except PermissionError:
        regained = False
    if (regained or os.getresuid() != (entry.pw_uid,) * 3 or os.getresgid() != (entry.pw_gid,) * 3
            or set(os.getgroups()) - {entry.pw_gid}):
        raise ConfigurationError(
            f"lungsql serve could not give up root for the OS user {entry.pw_name!r}",
            hint="check that the user exists and that lungsql runs as root or as that user",
        )
    if not os.access(".", os.R_OK | os.X_OK):
        os.chdir("/")  # root's working folder, which the user may not read


def serve(make_app: Callable[[int], Flask], host: str, port: int, workers: int | None = None,
          threads: int = 4, trusted_proxy: str | None = None, run_as=None, reach: tuple[str, ...] = ()) -> None:
    """Serve `make_app(pool_size)` until interrupted. With `run_as` (a passwd entry, see `web_os_user`),
    become that OS user first, checking that it can enter the folders in `reach`: `make_app` must then
    need nothing only root may read (give it the signing key and the database URL). The app is built once
    here first, so that a bad setting stops the server before it forks. Each worker warms its database
    pool as it starts (`webapp.db.warm_pool`) and takes requests once that is done (WARM_UP_WAIT_S at
    most): a request on a cold database session would wait for Python and the model to load in it, and
    a request arriving while the pool's connections are being warmed would get a cold one of its own."""
    from lungsql.webapp.db import warm_pool
    from lungsql.webapp.proxy import TrustedProxy

    if run_as is not None:
        drop_privileges(run_as, reach)
    workers = workers or default_workers()
    make_app(1)

    def build(pool_size: int = threads) -> Callable:
        app = make_app(pool_size)
        warm_pool(app).join(WARM_UP_WAIT_S)
        # What the worker has built so far lives as long as it does: out of the collector's full passes,
        # which would otherwise walk it all (some 30 ms, every request of the process waiting).
        gc.collect()
        gc.freeze()
        return TrustedProxy(app, trusted_proxy) if trusted_proxy else app

    if sys.platform == "win32":
        import waitress

        waitress.serve(build(threads * workers), host=host, port=port, threads=threads * workers, ident="lungsql")
        return
    refuse_taken_port(host, port)
    _gunicorn(build, {
        "bind": f"[{host}]:{port}" if ":" in host else f"{host}:{port}",
        "workers": workers,
        "worker_class": "gthread",
        "threads": threads,
        # Each worker listens on a socket of its own (SO_REUSEPORT) and the kernel spreads new connections
        # over them. On one shared socket, the worker that wakes first takes a burst of connections (a
        # page's, a load test's) and keeps them alive: 28 of 32 in one process of two was common, whose
        # clients then waited twice as long while the other process idled.
        "reuse_port": True,
        "proc_name": "lungsql-web",
        "keepalive": 5,
        "timeout": 120,            # a worker stuck this long is restarted
        "graceful_timeout": 10,
        "errorlog": "-",
        "loglevel": "warning",
        "accesslog": None,         # the audit log says who saw what
        "forwarded_allow_ips": "",  # TrustedProxy decides which forwarded headers to believe
        "control_socket_disable": True,
        # The workers' heartbeat files: a folder every user may write (not $TMPDIR, perhaps root's own).
        "worker_tmp_dir": "/dev/shm" if os.access("/dev/shm", os.W_OK | os.X_OK) else "/tmp",
    }).run()


def refuse_taken_port(host: str, port: int) -> None:
    """ConfigurationError when something listens on host:port already. The workers bind the port with
    SO_REUSEPORT, which a second server of the same OS user could share without an error."""
    try:
        family, _, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror:
        return  # gunicorn says what is wrong with the address
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gunicorn binds: TIME_WAIT is no obstacle
        try:
            probe.bind(address)
        except OSError as exc:
            raise ConfigurationError(f"lungsql serve cannot listen on {host}:{port}: {exc.strerror or exc}",
                                     hint="another server (perhaps another lungsql serve) uses this port: stop it, "
                                          "or choose another with --port") from None


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
    as deployed, for the benchmark and the end-to-end tests (started as root, it serves as
    LUNGSQL_WEB_OS_USER). `web_url` may hold a password: it goes through the environment, which only
    the server's user may read, not through the command line, which every user may."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    argv = [sys.executable, "-m", "lungsql", "serve", "--port", str(port), "--threads", str(threads)
            ] + (["--workers", str(workers)] if workers else [])
    env = dict(os.environ, LUNGSQL_SECRET_KEY=secrets.token_hex(32), LUNGSQL_WEB_DATABASE_URL=web_url)
    log = tempfile.TemporaryFile()  # a file, not a pipe: nobody reads it while the server runs
    server = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=log, start_new_session=True)
    try:
        deadline = time.monotonic() + timeout_s
        while True:  # until a worker answers: gunicorn's master listens before its workers exist
            with contextlib.suppress(OSError), urllib.request.urlopen(f"http://127.0.0.1:{port}/login", timeout=5):
                break
            if server.poll() is not None or time.monotonic() > deadline:
                from lungsql.client.db import redact_url

                log.seek(0)
                raise RuntimeError("lungsql serve did not start: "
                                   + redact_url(log.read().decode(errors="replace")[-500:]))
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
