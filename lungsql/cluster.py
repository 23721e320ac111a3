"""A project-local PostgreSQL 15 cluster, managed by `lungsql db`.

The cluster lives under $LUNGSQL_HOME (default `.lungsql/` in the project):

    pgdata/          the data directory (initdb on first start)
    run/             the Unix socket, reachable only by the server's OS user and root
    log/server.log   the server log
    cluster.json     the TCP port chosen at first start

The server listens on its Unix socket and on 127.0.0.1. Local socket
connections are trusted (the socket folder is private to the server's OS
user); TCP connections need a password (scram-sha-256). PostgreSQL refuses
to run as root, so when lungsql is invoked as root the server runs as an
unprivileged OS user (LUNGSQL_DB_OS_USER, the Debian package's `postgres`).
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import socket
import subprocess
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import config_preprocessing as config
from lungsql.errors import ConfigurationError, DatabaseUnavailable

SUPERUSER = "postgres"

# Server settings written into postgresql.conf at initdb: room for bulk uploads
# of DICOM bytes, and nothing that weakens durability.
SERVER_SETTINGS = {
    "listen_addresses": "'127.0.0.1'",
    "max_wal_size": "'4GB'",
    "shared_buffers": "'512MB'",
    "wal_compression": "'lz4'",
    "default_toast_compression": "'lz4'",
    "log_min_messages": "warning",
    "log_line_prefix": "'%m [%p] %u@%d '",
}


@dataclass(frozen=True)
class ClusterStatus:
    running: bool
    initialised: bool
    pid: int | None
    port: int | None
    home: Path

    def describe(self) -> str:
        if not self.initialised:
            return f"no cluster yet in {self.home} (`lungsql db start` creates it)"
        if not self.running:
            return f"stopped (cluster in {self.home})"
        return f"running, pid {self.pid}, port {self.port}, cluster in {self.home}"


class LocalCluster:
    """Start, stop and locate the local PostgreSQL server."""

    def __init__(
        self,
        home: Path | None = None,
        bindir: Path | None = None,
        os_user: str | None = None,
        dbname: str | None = None,
    ):
        self.home = Path(home or config.get("LUNGSQL_HOME")).resolve()
        self.bindir = Path(bindir or config.get("LUNGSQL_PG_BINDIR"))
        self.dbname = dbname or config.get("LUNGSQL_DB_NAME")
        # As root, the server runs as an unprivileged user; otherwise as ourselves.
        self.os_user = (os_user or config.get("LUNGSQL_DB_OS_USER")) if os.geteuid() == 0 else None

    # -- places -----------------------------------------------------------
    @property
    def data_dir(self) -> Path:
        return self.home / "pgdata"

    @property
    def socket_dir(self) -> Path:
        return self.home / "run"

    @property
    def log_file(self) -> Path:
        return self.home / "log" / "server.log"

    @property
    def state_file(self) -> Path:
        return self.home / "cluster.json"

    # -- queries ----------------------------------------------------------
    def status(self) -> ClusterStatus:
        initialised = (self.data_dir / "PG_VERSION").exists()
        pid = self._postmaster_pid() if initialised else None
        return ClusterStatus(
            running=pid is not None,
            initialised=initialised,
            pid=pid,
            port=self._port() if initialised else None,
            home=self.home,
        )

    def url(self, dbname: str | None = None, user: str = SUPERUSER) -> str:
        """SQLAlchemy URL over the Unix socket; the server must be running."""
        state = self.status()
        if not state.running:
            raise DatabaseUnavailable(
                f"the local database is not running ({state.describe()})",
                hint="run `lungsql db start`, or point at another server with --db URL "
                "or LUNGSQL_DATABASE_URL",
            )
        socket_dir = quote(str(self.socket_dir), safe="")
        return (
            f"postgresql+psycopg://{user}@/{dbname or self.dbname}"
            f"?host={socket_dir}&port={state.port}"
        )

    # -- actions ----------------------------------------------------------
    def start(self) -> ClusterStatus:
        """Create the cluster on first use, start the server, create the database."""
        self._check_binaries()
        if not (self.data_dir / "PG_VERSION").exists():
            self._initdb()
        state = self.status()
        if not state.running:
            port = self._port()
            if port is None or not _port_is_free(port):
                port = _free_port()
                self._write_state({"port": port})
            self._prepare_dirs()
            result = self._run_as_server(
                [
                    str(self.bindir / "pg_ctl"),
                    "start",
                    "--wait",
                    "--timeout=60",
                    "--pgdata", str(self.data_dir),
                    "--log", str(self.log_file),
                    "--options", f"-p {port} -k {self.socket_dir}",
                ]
            )
            if result.returncode != 0:
                raise DatabaseUnavailable(
                    "PostgreSQL did not start: " + _last_lines(self.log_file, result),
                    hint=f"read {self.log_file}",
                )
        self._create_database()
        return self.status()

    def stop(self) -> ClusterStatus:
        if self.status().running:
            result = self._run_as_server(
                [str(self.bindir / "pg_ctl"), "stop", "--wait", "--mode=fast", "--pgdata", str(self.data_dir)]
            )
            if result.returncode != 0:
                raise DatabaseUnavailable("PostgreSQL did not stop: " + result.stderr.strip())
        return self.status()

    def destroy(self) -> None:
        """Stop the server and delete the cluster with all its data."""
        self.stop()
        shutil.rmtree(self.home, ignore_errors=True)

    # -- internals --------------------------------------------------------
    def _check_binaries(self) -> None:
        for tool in ("initdb", "pg_ctl", "postgres"):
            if not (self.bindir / tool).exists():
                raise ConfigurationError(
                    f"PostgreSQL 15 is not installed: {self.bindir / tool} is missing",
                    hint="run `make bootstrap` (installs postgresql-15 and postgresql-plpython3-15), "
                    "or set LUNGSQL_PG_BINDIR",
                )
        if self.os_user is not None:
            try:
                pwd.getpwnam(self.os_user)
            except KeyError:
                raise ConfigurationError(
                    f"lungsql runs as root and the OS user {self.os_user!r} for the server does not exist",
                    hint="install postgresql-15 (it creates `postgres`) or set LUNGSQL_DB_OS_USER",
                ) from None

    def _prepare_dirs(self) -> None:
        self.home.mkdir(parents=True, exist_ok=True)
        self.home.chmod(0o755)
        for folder, mode in ((self.socket_dir, 0o700), (self.log_file.parent, 0o700)):
            folder.mkdir(exist_ok=True)
            folder.chmod(mode)
            self._give_to_server(folder)
        if self.os_user is not None:
            probe = subprocess.run(
                ["runuser", "-u", self.os_user, "--", "test", "-x", str(self.home)],
                capture_output=True,
            )
            if probe.returncode != 0:
                raise ConfigurationError(
                    f"the server's OS user {self.os_user!r} cannot reach {self.home}",
                    hint="put LUNGSQL_HOME (and the project) under a folder every user may traverse, "
                    "e.g. chmod o+x on its parents",
                )

    def _initdb(self) -> None:
        self._prepare_dirs()
        self.data_dir.mkdir(mode=0o700, exist_ok=True)
        self._give_to_server(self.data_dir)
        result = self._run_as_server(
            [
                str(self.bindir / "initdb"),
                "--pgdata", str(self.data_dir),
                "--username", SUPERUSER,
                "--encoding", "UTF8",
                "--locale", "C.UTF-8",
                "--auth-local", "trust",
                "--auth-host", "scram-sha-256",
                "--no-instructions",
            ]
        )
        if result.returncode != 0:
            shutil.rmtree(self.data_dir, ignore_errors=True)
            raise DatabaseUnavailable("initdb failed: " + (result.stderr or result.stdout).strip())
        with open(self.data_dir / "postgresql.conf", "a", encoding="utf-8") as conf:
            conf.write("\n# Settings written by lungsql\n")
            for key, value in SERVER_SETTINGS.items():
                conf.write(f"{key} = {value}\n")
        self._write_state({"port": _free_port()})

    def _create_database(self) -> None:
        import psycopg

        port = self._port()
        with psycopg.connect(
            host=str(self.socket_dir), port=port, user=SUPERUSER, dbname="postgres", autocommit=True
        ) as conn:
            exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (self.dbname,)).fetchone()
            if not exists:
                conn.execute(
                    psycopg.sql.SQL("CREATE DATABASE {}").format(psycopg.sql.Identifier(self.dbname))
                )

    def _run_as_server(self, argv: list[str]) -> subprocess.CompletedProcess:
        if self.os_user is not None:
            argv = ["runuser", "-u", self.os_user, "--", *argv]
        return subprocess.run(argv, capture_output=True, text=True, cwd="/")

    def _give_to_server(self, path: Path) -> None:
        if self.os_user is not None:
            entry = pwd.getpwnam(self.os_user)
            os.chown(path, entry.pw_uid, entry.pw_gid)

    def _postmaster_pid(self) -> int | None:
        pid_file = self.data_dir / "postmaster.pid"
        try:
            pid = int(pid_file.read_text().split("\n", 1)[0])
        except (OSError, ValueError):
            return None
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            pass  # alive, owned by another user
        return pid

    def _port(self) -> int | None:
        try:
            return int(json.loads(self.state_file.read_text())["port"])
        except (OSError, ValueError, KeyError):
            return None

    def _write_state(self, state: dict) -> None:
        self.home.mkdir(parents=True, exist_ok=True)
        self.state_file.write_text(json.dumps(state) + "\n")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _port_is_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def _last_lines(log_file: Path, result: subprocess.CompletedProcess, n: int = 5) -> str:
    try:
        lines = log_file.read_text(errors="replace").strip().splitlines()[-n:]
    except OSError:
        lines = []
    return " | ".join(lines) or (result.stderr or result.stdout).strip()

