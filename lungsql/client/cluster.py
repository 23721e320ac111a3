"""A project-local PostgreSQL 15 cluster, managed by `lungsql db`.

The cluster lives under $LUNGSQL_HOME (default `.lungsql/` in the project):

    pgdata/          the data directory (initdb on first start)
    run/             the Unix socket (any OS user may reach it: authentication is the boundary)
    log/server.log   the server log
    cluster.json     the TCP port chosen at first start
    web-db.key       the password of the role lungsql_web (0600, created once)

The server listens on its Unix socket and on 127.0.0.1. No connection is
trusted. lungsql writes pg_hba.conf and pg_ident.conf itself, at initdb and
again at every start (so that a cluster made by an older lungsql is
upgraded): the superuser `postgres` logs in over the socket only by peer
authentication, and only from the OS users of the peer map `lungsql` (root,
the server's OS user and the user who runs lungsql); every other role, over
the socket or over TCP (127.0.0.1, ::1), needs its password (scram-sha-256).
`start` gives the web app's role lungsql_web the password kept in
web-db.key, as a SCRAM verifier computed here, so the clear password never
reaches the server. PostgreSQL refuses to run as root, so when lungsql is
invoked as root the server runs as an unprivileged OS user
(LUNGSQL_DB_OS_USER, the Debian package's `postgres`).
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import config_preprocessing as config
from lungsql.errors import ConfigurationError, DatabaseUnavailable

SUPERUSER = "postgres"


def runuser() -> str | None:
    """util-linux's runuser, which runs a command as another OS user (root only), wherever PATH leaves it."""
    return shutil.which("runuser") or next((p for p in ("/usr/sbin/runuser", "/sbin/runuser") if os.path.exists(p)),
                                           None)
#: The web app's least-privileged role; it logs in with the password in $LUNGSQL_HOME/web-db.key.
WEB_ROLE = "lungsql_web"
#: The pg_ident.conf map of the OS users who may log in as SUPERUSER.
PEER_MAP = "lungsql"

# pg_hba.conf, whole: first match wins, and a failed peer or password check is final.
HBA_CONF = f"""\
# Written by lungsql at initdb and at every `lungsql db start`: edits here are lost.
# No connection is trusted. The superuser logs in over the socket, by peer
# authentication, from the OS users of the map {PEER_MAP!r} (pg_ident.conf);
# every other role needs its password, over the socket and over TCP.
# TYPE  DATABASE  USER          ADDRESS        METHOD
local   all       {SUPERUSER:<13} {"":<14} peer map={PEER_MAP}
local   all       all           {"":<14} scram-sha-256
host    all       all           127.0.0.1/32   scram-sha-256
host    all       all           ::1/128        scram-sha-256
"""

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

    @property
    def web_key_file(self) -> Path:
        """The password of the role lungsql_web (this cluster's, under its own home)."""
        return self.home / "web-db.key"

    @property
    def server_os_user(self) -> str:
        """The OS user the server runs as: LUNGSQL_DB_OS_USER under root, else whoever runs lungsql."""
        return self.os_user or _user_name(os.geteuid())

    def peer_map_users(self) -> list[str]:
        """The OS users allowed to log in as the superuser: root, the server's OS user, the invoking user."""
        users = ["root", self.server_os_user, _user_name(os.getuid())]
        return list(dict.fromkeys(users))

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
        """SQLAlchemy URL over the Unix socket; the server must be running.

        The URL of lungsql_web holds its password: show it only through
        lungsql.client.db.redact_url (or render_as_string(hide_password=True))."""
        state = self.status()
        if not state.running:
            raise DatabaseUnavailable(
                f"the local database is not running ({state.describe()})",
                hint="run `lungsql db start`, or point at another server with --db URL "
                "or LUNGSQL_DATABASE_URL",
            )
        userinfo = quote(user, safe="")
        if user == WEB_ROLE:
            if not self.web_key_file.exists():
                raise DatabaseUnavailable(
                    f"the role {WEB_ROLE} of the local database has no password yet ({self.web_key_file})",
                    hint="run `lungsql db start` (it sets the password of lungsql_web)",
                )
            userinfo += ":" + quote(self.web_password(), safe="")
        socket_dir = quote(str(self.socket_dir), safe="")
        return (
            f"postgresql+psycopg://{userinfo}@/{dbname or self.dbname}"
            f"?host={socket_dir}&port={state.port}"
        )

    def web_password(self) -> str:
        """The password of lungsql_web: $home/web-db.key, created (0600) on first use."""
        from lungsql.client.secrets import secret_file

        return secret_file(self.web_key_file).decode()

    # -- actions ----------------------------------------------------------
    def start(self) -> ClusterStatus:
        """Create the cluster on first use, (re)write its authentication rules, start the server,
        give lungsql_web its password, create the database."""
        self._check_binaries()
        if not (self.data_dir / "PG_VERSION").exists():
            self._initdb()
        try:
            self._prepare_dirs()
            rules_changed = self._write_auth_files()
        except PermissionError as exc:
            raise ConfigurationError(
                f"cannot write the files of the local cluster in {self.home}: {exc.strerror} ({exc.filename})",
                hint="run `lungsql db start` as the user who created the cluster, or as root",
            ) from None
        state = self.status()
        if state.running and rules_changed:
            self._reload()
        if not state.running:
            port = self._port()
            if port is None or not _port_is_free(port):
                port = _free_port()
                self._write_state({"port": port})
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
        self._ensure_web_role()
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
        # The socket folder is open to every OS user (the web server's included): the server
        # authenticates every connection. The log stays private to the server's OS user.
        for folder, mode in ((self.socket_dir, 0o755), (self.log_file.parent, 0o700)):
            folder.mkdir(exist_ok=True)
            folder.chmod(mode)
            self._give_to_server(folder)
        if self.os_user is not None:
            probe = subprocess.run(
                [runuser() or "runuser", "-u", self.os_user, "--", "test", "-x", str(self.home)],
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
                "--auth-local", "peer",  # replaced at once by lungsql's own pg_hba.conf
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
        self._write_auth_files()
        self._write_state({"port": _free_port()})

    def ident_conf(self) -> str:
        """pg_ident.conf, whole: the peer map of the superuser."""
        lines = [
            "# Written by lungsql at initdb and at every `lungsql db start`: edits here are lost.",
            f"# The OS users who may log in as {SUPERUSER} over the socket (pg_hba.conf: peer map={PEER_MAP}).",
            "# MAPNAME  SYSTEM-USERNAME  PG-USERNAME",
        ]
        lines += [f"{PEER_MAP:<10} {user:<16} {SUPERUSER}" for user in self.peer_map_users()]
        return "\n".join(lines) + "\n"

    def _write_auth_files(self) -> bool:
        """Write pg_hba.conf and pg_ident.conf; True when either changed (the server must reload)."""
        changed = False
        for name, text in (("pg_hba.conf", HBA_CONF), ("pg_ident.conf", self.ident_conf())):
            path = self.data_dir / name
            try:
                if path.read_text(encoding="utf-8") == text:
                    continue
            except FileNotFoundError:
                pass
            temporary = path.with_name(f".{name}.lungsql")
            fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                handle.write(text)
            self._give_to_server(temporary)
            os.replace(temporary, path)
            changed = True
        return changed

    def _reload(self) -> None:
        """Make the running server read the rewritten pg_hba.conf and pg_ident.conf, and wait until
        new connections follow them."""
        with self._superuser() as conn:
            errors = conn.execute(
                "SELECT 'pg_hba.conf', line_number, error FROM pg_hba_file_rules WHERE error IS NOT NULL "
                "UNION ALL SELECT 'pg_ident.conf', line_number, error FROM pg_ident_file_mappings "
                "WHERE error IS NOT NULL"
            ).fetchall()
            if errors:
                raise ConfigurationError(
                    "the authentication rules lungsql wrote are not valid: "
                    + "; ".join(f"{name} line {line}: {error}" for name, line, error in errors),
                    hint=f"the server keeps its previous rules; read {self.data_dir / 'pg_hba.conf'}",
                )
            loaded = conn.execute("SELECT pg_conf_load_time()").fetchone()[0]
            conn.execute("SELECT pg_reload_conf()")
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:  # the postmaster reloads asynchronously, on SIGHUP
            with self._superuser() as conn:
                if conn.execute("SELECT pg_conf_load_time()").fetchone()[0] != loaded:
                    return
            time.sleep(0.05)
        raise DatabaseUnavailable(
            "PostgreSQL did not reload its authentication rules within 10 s", hint=f"read {self.log_file}"
        )

    def _superuser(self, dbname: str = "postgres"):
        """A psycopg connection as the superuser over the socket (peer authentication), autocommit."""
        import psycopg

        return psycopg.connect(
            host=str(self.socket_dir), port=self._port(), user=SUPERUSER, dbname=dbname, autocommit=True
        )

    def _ensure_web_role(self) -> None:
        """lungsql_web exists, may log in, and has the password of web-db.key. The server receives a
        SCRAM verifier computed here, never the password itself (nor does its log)."""
        import psycopg
        from psycopg import sql

        password = self.web_password()
        with self._superuser() as conn:
            role = sql.Identifier(WEB_ROLE)
            if not conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (WEB_ROLE,)).fetchone():
                try:  # as sql/postgres/functions/090_privileges.sql does, if `init` ran first
                    conn.execute(sql.SQL("CREATE ROLE {} LOGIN").format(role))
                except psycopg.errors.DuplicateObject:
                    pass  # another lungsql created it meanwhile
            verifier = conn.pgconn.encrypt_password(password.encode(), WEB_ROLE.encode(), b"scram-sha-256")
            # ALTER ROLE takes no bound parameters: the verifier is quoted as a literal by psycopg.
            conn.execute(sql.SQL("ALTER ROLE {} LOGIN PASSWORD {}").format(role, sql.Literal(verifier.decode())))

    def _create_database(self) -> None:
        import psycopg

        with self._superuser() as conn:
            exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (self.dbname,)).fetchone()
            if not exists:
                conn.execute(
                    psycopg.sql.SQL("CREATE DATABASE {}").format(psycopg.sql.Identifier(self.dbname))
                )

    def _run_as_server(self, argv: list[str]) -> subprocess.CompletedProcess:
        if self.os_user is not None:
            argv = [runuser() or "runuser", "-u", self.os_user, "--", *argv]
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


def _user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        raise ConfigurationError(
            f"the OS user with uid {uid} has no name (no entry in /etc/passwd)",
            hint="run lungsql as a user with an entry in /etc/passwd",
        ) from None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _port_is_free(port: int) -> bool:
    """Whether the server could listen on `port`: bound as PostgreSQL binds, with SO_REUSEADDR, so
    that connections the stopped server left in TIME_WAIT do not move it to another port."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
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

