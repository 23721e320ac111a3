"""Authentication is the boundary: the local cluster trusts no connection, the web app logs in as
lungsql_web with its password and serves as an unprivileged OS user, and no secret is printed.

Against the session's real cluster (conftest.py). The tests that switch OS users need root (runuser);
as another user they are skipped.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import sys
import time
from pathlib import Path

import psycopg
import pytest
import sqlalchemy as sa
from click.testing import CliRunner
from sqlalchemy.engine import make_url

import config_preprocessing as config
from lungsql.client.cli import main
from lungsql.client.db import check_web_role, redact_url
from lungsql.errors import ConfigurationError
from lungsql.bench.procstat import children

WEB_ROLE = "lungsql_web"
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="switching OS users (runuser) needs root")


def web_os_user() -> pwd.struct_passwd:
    name = config.get("LUNGSQL_WEB_OS_USER")
    try:
        return pwd.getpwnam(name)
    except KeyError:
        pytest.skip(f"the OS user {name} does not exist: run `make bootstrap` (as root) to create it")


def socket_connect(cluster, user: str, password: str | None = None, **kwargs) -> psycopg.Connection:
    """A connection over the cluster's Unix socket; no ~/.pgpass or PGPASSWORD is consulted."""
    kwargs.setdefault("host", str(cluster.socket_dir))
    return psycopg.connect(port=cluster.status().port, user=user, dbname="postgres", password=password,
                           passfile="/dev/null", connect_timeout=10, **kwargs)


def as_os_user(os_user: str, argv: list[str], **env) -> subprocess.CompletedProcess:
    """`argv` run as another OS user, with a clean environment plus `env` (passwords go through it, not argv)."""
    environment = {"PATH": "/usr/bin:/bin", "PGPASSFILE": "/dev/null", **env}
    runuser = shutil.which("runuser") or "/usr/sbin/runuser"
    return subprocess.run([runuser, "-u", os_user, "--", *argv], capture_output=True, text=True, cwd="/",
                          env=environment, timeout=60)


def psql(cluster, user: str) -> list[str]:
    return ["psql", "-X", "-w", "-h", str(cluster.socket_dir), "-p", str(cluster.status().port), "-U", user,
            "-d", "postgres", "-tAc", "SELECT current_user"]


def lungsql(*args: str, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lungsql", *args], capture_output=True, text=True,
                          env=env, timeout=timeout)


# -- (a) the cluster authenticates every connection -------------------------------------------------
def hba_rules(cluster) -> list[list[str]]:
    """The rules of pg_hba.conf, each split into its fields (comments left out)."""
    text = (cluster.data_dir / "pg_hba.conf").read_text()
    return [line.split() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def test_no_connection_is_trusted(cluster, admin):
    rules = hba_rules(cluster)
    assert rules and not any("trust" in rule for rule in rules), rules
    methods = admin.execute("SELECT type, user_name, auth_method, options FROM pg_hba_file_rules").fetchall()
    assert {m for _, _, m, _ in methods} == {"peer", "scram-sha-256"}
    assert ("local", ["postgres"], "peer", ["map=lungsql"]) in methods
    mapped = [row[0] for row in admin.execute("SELECT sys_name FROM pg_ident_file_mappings "
                                              "WHERE map_name = 'lungsql' AND pg_username = 'postgres'")]
    assert "root" in mapped and cluster.server_os_user in mapped
    assert pwd.getpwuid(os.getuid()).pw_name in mapped


def test_the_web_role_logs_in_with_its_password_only(cluster):
    password = cluster.web_password()
    key_file = cluster.web_key_file
    assert key_file.stat().st_mode & 0o777 == 0o600 and key_file.read_text().strip() == password
    for host in (str(cluster.socket_dir), "127.0.0.1"):
        with pytest.raises(psycopg.OperationalError, match="password"):
            socket_connect(cluster, WEB_ROLE, host=host)
        with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
            socket_connect(cluster, WEB_ROLE, "not-the-password", host=host)
        with socket_connect(cluster, WEB_ROLE, password, host=host) as conn:
            assert conn.execute("SELECT current_user, rolsuper FROM pg_roles WHERE rolname = current_user"
                                ).fetchone() == (WEB_ROLE, False)
    # The URL the web app is given holds the password, and works as it is.
    url = cluster.url(user=WEB_ROLE)
    assert make_url(url).password == password and password not in redact_url(url)
    engine = sa.create_engine(url)
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT current_user")).scalar() == WEB_ROLE
    engine.dispose()
    assert check_web_role(url) == WEB_ROLE
    # The server got a SCRAM verifier, never the password: not in its catalog, not in its log.
    with socket_connect(cluster, "postgres") as conn:
        stored = conn.execute("SELECT rolpassword FROM pg_authid WHERE rolname = %s", (WEB_ROLE,)).fetchone()[0]
    assert stored.startswith("SCRAM-SHA-256$") and password not in stored
    assert password not in cluster.log_file.read_text(errors="replace")


def test_a_second_start_keeps_the_web_password(cluster):
    password = cluster.web_password()
    assert cluster.start().running
    assert cluster.web_password() == password
    with socket_connect(cluster, WEB_ROLE, password) as conn:
        assert conn.execute("SELECT current_user").fetchone()[0] == WEB_ROLE


@needs_root
def test_the_superuser_is_refused_to_os_users_outside_the_peer_map(cluster):
    for os_user in ("nobody", web_os_user().pw_name):
        result = as_os_user(os_user, psql(cluster, "postgres"))
        assert result.returncode != 0 and "Peer authentication failed" in result.stderr, result
    # ... but the socket is reachable by them: any role with its password gets in, none without.
    result = as_os_user("nobody", psql(cluster, WEB_ROLE), PGPASSWORD=cluster.web_password())
    assert result.returncode == 0 and result.stdout.strip() == WEB_ROLE, result.stderr
    result = as_os_user("nobody", psql(cluster, WEB_ROLE))
    assert result.returncode != 0 and "password" in result.stderr
    # The server's own OS user is in the map.
    result = as_os_user(cluster.server_os_user, psql(cluster, "postgres"))
    assert result.returncode == 0 and result.stdout.strip() == "postgres", result.stderr


def test_start_upgrades_a_cluster_that_trusted_the_socket(cluster):
    """A cluster made by an older lungsql (initdb --auth-local trust) is rewritten and reloaded by start."""
    hba = cluster.data_dir / "pg_hba.conf"
    stat = hba.stat()
    hba.write_text("local all all trust\nhost all all 127.0.0.1/32 scram-sha-256\n")
    os.chown(hba, stat.st_uid, stat.st_gid)
    try:
        with socket_connect(cluster, "postgres") as conn:
            conn.execute("SELECT pg_reload_conf()")
        deadline = time.monotonic() + 10
        while True:  # the server reloads asynchronously
            try:
                socket_connect(cluster, WEB_ROLE).close()
                break
            except psycopg.OperationalError:
                assert time.monotonic() < deadline, "the server did not reload pg_hba.conf"
                time.sleep(0.05)
    finally:
        cluster.start()
    assert not any("trust" in rule for rule in hba_rules(cluster))
    with pytest.raises(psycopg.OperationalError, match="password"):
        socket_connect(cluster, WEB_ROLE)


# -- (b) lungsql serve gives up root and refuses a superuser ----------------------------------------
@pytest.fixture
def web_url(cluster, engine):
    """lungsql_web's URL for a fresh database that `lungsql init` has prepared."""
    return cluster.url(dbname=engine.url.database, user=WEB_ROLE)


def ids(pid: int) -> dict[str, list[int]]:
    status = Path(f"/proc/{pid}/status").read_text().splitlines()
    return {line.split(":")[0]: [int(n) for n in line.split()[1:]]
            for line in status if line.split(":")[0] in ("Uid", "Gid", "Groups")}


@needs_root
def test_lungsql_serve_started_as_root_serves_as_the_web_os_user(web_url, monkeypatch):
    from lungsql.webapp.server import running

    user = web_os_user()
    # Secrets of the operator's environment that the web processes must not keep, even in the first
    # environment block of the process (/proc/PID/environ), which removing a variable does not clear.
    monkeypatch.setenv("LUNGSQL_DATABASE_URL", "postgresql://postgres:superuser-s3cret@localhost/lungsql")
    monkeypatch.setenv("LUNGSQL_DEID_KEY", "deid-key-s3cret")
    with running(web_url, workers=2, threads=1) as server:
        deadline = time.monotonic() + 30
        while len(children(server.pid)) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        processes = [server.pid, *children(server.pid)]
        assert len(processes) == 3
        for pid in processes:
            found = ids(pid)
            assert found["Uid"] == [user.pw_uid] * 4, f"process {pid}: {found}"  # real, effective, saved, fs
            assert found["Gid"] == [user.pw_gid] * 4 and set(found["Groups"]) <= {user.pw_gid}
            # The web role's password reached the server through its environment, not its command line.
            assert make_url(web_url).password not in Path(f"/proc/{pid}/cmdline").read_text()
            environ = Path(f"/proc/{pid}/environ").read_bytes()
            assert b"superuser-s3cret" not in environ and b"deid-key-s3cret" not in environ


@needs_root
def test_lungsql_serve_refuses_a_superuser_url(cluster, engine):
    web_os_user()  # as root, serve first needs it; the refusal then comes from the database
    superuser_url = cluster.url(dbname=engine.url.database)
    result = lungsql("serve", "--port", "1", "--web-db", superuser_url)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "lungsql serve connects as a superuser; use the role lungsql_web" in result.stderr
    with pytest.raises(ConfigurationError, match="superuser"):
        check_web_role(superuser_url)


@needs_root
def test_serve_first_checks_that_the_web_os_user_can_enter_what_it_needs(tmp_path):
    from lungsql.webapp.server import needed_folders, unreadable_for

    user = web_os_user()
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    assert unreadable_for(user, needed_folders()) is None  # Python, the packages, lungsql, the web app
    assert unreadable_for(user, [*needed_folders(), str(private)]) == str(private)


def test_check_web_role_refuses_a_role_that_can_create_roles(cluster, engine, admin):
    name = "lungsql_test_creator"
    admin.execute(f"DROP ROLE IF EXISTS {name}")
    admin.execute(f"CREATE ROLE {name} LOGIN CREATEROLE PASSWORD 'creator-password-1'")
    try:
        url = (f"postgresql+psycopg://{name}:creator-password-1@127.0.0.1:{cluster.status().port}/"
               f"{engine.url.database}")
        with pytest.raises(ConfigurationError, match="CREATEROLE"):
            check_web_role(url)
    finally:
        admin.execute(f"DROP ROLE {name}")


@needs_root
def test_lungsql_serve_as_root_without_the_web_os_user_says_how_to_create_it(cluster, web_url):
    env = dict(os.environ, LUNGSQL_WEB_OS_USER="lungsql-no-such-user", LUNGSQL_WEB_DATABASE_URL=web_url)
    result = lungsql("serve", "--port", "1", env=env)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "'lungsql-no-such-user'" in result.stderr and "does not exist" in result.stderr
    assert "useradd --system --no-create-home --shell /usr/sbin/nologin" in result.stderr
    assert cluster.web_password() not in result.stderr + result.stdout


# -- (c) secrets stay out of output ------------------------------------------------------------------
def test_settings_show_no_secret_and_no_password(monkeypatch):
    secrets = {"LUNGSQL_SECRET_KEY": "flask-signing-key-0123", "LUNGSQL_DEID_KEY": "deid-key-4567"}
    urls = {"LUNGSQL_DATABASE_URL": "postgresql://dba:hunter2@db.example.org:5432/pacs",
            "LUNGSQL_WEB_DATABASE_URL": "postgresql+psycopg://lungsql_web:w3b-pa55@db.example.org/pacs"}
    for name, value in {**secrets, **urls}.items():
        monkeypatch.setenv(name, value)
    result = CliRunner().invoke(main, ["settings"])
    assert result.exit_code == 0, result.output
    for value in [*secrets.values(), "hunter2", "w3b-pa55"]:
        assert value not in result.output
    lines = result.output.splitlines()
    assert "LUNGSQL_SECRET_KEY=(set, hidden)" in lines and "LUNGSQL_DEID_KEY=(set, hidden)" in lines
    assert "LUNGSQL_DATABASE_URL=postgresql://dba:***@db.example.org:5432/pacs" in lines
    assert "LUNGSQL_WEB_DATABASE_URL=postgresql+psycopg://lungsql_web:***@db.example.org/pacs" in lines
    monkeypatch.delenv("LUNGSQL_DEID_KEY")
    assert "LUNGSQL_DEID_KEY=(unset)" in CliRunner().invoke(main, ["settings"]).output.splitlines()


@pytest.mark.parametrize("url", ["postgresql://u:hunter2@[bad", "postgresql://u:hunter2@h:port/db",
                                 "post gres://u:hunter2@h/db", "u:hunter2@h/db"])
def test_a_bad_url_is_not_echoed_with_its_password(url, tmp_path):
    env = {"PATH": "/usr/bin:/bin", "LUNGSQL_HOME": str(tmp_path)}
    result = lungsql("--db", url, "init", env=env)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "hunter2" not in result.stdout + result.stderr
    assert "u:***@" in result.stderr


@pytest.mark.parametrize(("text", "shown"), [
    ("postgresql://web:s3cret@db/lungsql", "postgresql://web:***@db/lungsql"),
    ("postgresql+psycopg://u:p@ss@h/db?host=%2Ftmp", "postgresql+psycopg://u:***@h/db?host=%2Ftmp"),
    ("cannot connect to 'mssql+pyodbc://sa:Pa:ss@h/db'", "cannot connect to 'mssql+pyodbc://sa:***@h/db'"),
    ("host=/tmp user=web password=s3cret dbname=x", "host=/tmp user=web password=*** dbname=x"),
    ("postgresql://h/db?password=s3cret&port=5", "postgresql://h/db?password=***&port=5"),
    ("postgresql://postgres@/lungsql?host=%2Frun", "postgresql://postgres@/lungsql?host=%2Frun"),
    ("at 12:30 mail me@example.org", "at 12:30 mail me@example.org"),
])
def test_redact_url_masks_passwords_and_nothing_else(text, shown):
    assert redact_url(text) == shown
