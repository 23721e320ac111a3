"""The local cluster, `lungsql init` and Python inside the server."""

from __future__ import annotations

import os
import pwd
import shutil
import tempfile
from pathlib import Path

import pytest
import sqlalchemy as sa

from lungsql.client import migrations
from lungsql.errors import ConfigurationError

TABLES = {"patients", "scans", "labels", "ingest_errors", "ingest_runs", "settings", "schema_migrations"}


def test_server_runs_unprivileged_on_socket_and_loopback(cluster):
    status = cluster.status()
    assert status.running and status.port
    with open(f"/proc/{status.pid}/status") as handle:
        uid = next(int(line.split()[1]) for line in handle if line.startswith("Uid:"))
    if os.geteuid() == 0:
        assert uid != 0, "PostgreSQL must not run as root"
    assert (cluster.socket_dir / f".s.PGSQL.{status.port}").exists()
    engine = sa.create_engine(cluster.url())
    with engine.connect() as conn:
        assert conn.execute(sa.text("SHOW listen_addresses")).scalar() == "127.0.0.1"
        assert conn.execute(sa.text("SHOW server_version")).scalar().startswith("15.")
    engine.dispose()


def test_stop_and_start_again_keeps_the_port(cluster):
    port = cluster.status().port
    assert not cluster.stop().running
    with pytest.raises(Exception, match="not running"):
        cluster.url()
    assert cluster.start().running
    assert cluster.status().port == port


def test_init_twice_is_harmless(empty_db):
    engine = sa.create_engine(empty_db)
    first = migrations.init(engine)
    second = migrations.init(engine)
    assert first.applied and not second.applied
    assert second.already == first.applied
    with engine.connect() as conn:
        tables = set(conn.execute(sa.text(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = 'lungsql'")).scalars())
        assert TABLES <= tables
        assert conn.execute(sa.text("SELECT count(*) FROM lungsql.schema_migrations")).scalar() == len(first.applied)
    assert migrations.schema_version(engine) == len(first.applied)
    engine.dispose()


def test_an_applied_migration_that_changed_is_refused(empty_db, tmp_path):
    sql_dir = tmp_path / "sql"
    shutil.copytree(migrations.SQL_DIR, sql_dir)
    engine = sa.create_engine(empty_db)
    migrations.init(engine, sql_dir)
    first = sorted((sql_dir / "migrations").glob("*.sql"))[0]
    first.write_text(first.read_text() + "\n-- edited\n")
    with pytest.raises(ConfigurationError, match="changed after it was applied"):
        migrations.init(engine, sql_dir)
    engine.dispose()


def test_check_environment_from_inside_the_server(engine):
    with engine.connect() as conn:
        rows = {r.component: r for r in conn.execute(sa.text("SELECT * FROM lungsql.check_environment()"))}
    assert rows["python"].version.startswith("3.11")
    for component in ("numpy", "pydicom", "onnxruntime", "onnx", "lightgbm", "cv2", "lungsql"):
        assert rows[component].version, component
    assert rows["lungsql"].location.endswith("lungsql")


def test_check_environment_names_the_fix_when_lungsql_is_not_installed(engine):
    with engine.begin() as conn:
        conn.execute(sa.text(
            "UPDATE lungsql.settings SET value = '[\"/nonexistent/site-packages\"]' WHERE name = 'python.path'"))
    engine.dispose()  # a new server process, whose Python has not imported lungsql yet
    with engine.connect() as conn, pytest.raises(sa.exc.DBAPIError) as caught:
        conn.execute(sa.text("SELECT * FROM lungsql.check_environment()"))
    diag = caught.value.orig.diag
    assert "cannot import lungsql" in diag.message_primary
    assert "lungsql init" in diag.message_hint


def test_a_database_error_reads_alike_for_every_client(engine):
    import psycopg

    from databases import call
    from lungsql.client import database_errors

    with pytest.raises(psycopg.Error) as raised:
        call(engine, "SELECT lungsql.deploy('nothing-here')")
    found = database_errors.read(raised.value)
    assert (found.message, found.ours) == ("there is no model named 'nothing-here'", True)
    assert found.hint.startswith("train one first")
    with pytest.raises(psycopg.Error) as raised:
        call(engine, "SELECT 1 / 0")
    found = database_errors.read(raised.value)
    assert (found.message, found.hint, found.ours) == ("division by zero", None, False)

    class OdbcError(Exception):  # what pyodbc raises for a THROW of dbo.DeployLungCancerModel
        pass

    found = database_errors.read(OdbcError("42000", "[Microsoft][ODBC Driver 18 for SQL Server][SQL Server]lungsql: "
                                                    "there is no model named 'x'\nHint: train one first (50000) "
                                                    "(SQLExecDirectW)"))
    assert (found.message, found.hint, found.ours) == ("there is no model named 'x'", "train one first", True)


def test_init_refuses_a_server_python_path_others_may_write_or_the_server_cannot_read(tmp_path):
    import os

    from lungsql.client.migrations import check_server_path
    from lungsql.errors import ConfigurationError

    open_to_all = tmp_path / "open"
    open_to_all.mkdir()
    open_to_all.chmod(0o777)
    with pytest.raises(ConfigurationError, match="every user may write to") as error:
        check_server_path([str(open_to_all / "site-packages")], None)
    assert "/opt" in error.value.hint
    if os.geteuid() != 0:
        pytest.skip("the server runs as another OS user only when lungsql runs as root")
    private = tmp_path / "private"  # pytest's own temporary folders are private to root
    private.mkdir(mode=0o700)
    with pytest.raises(ConfigurationError, match="'postgres' cannot read"):
        check_server_path([str(private)], "postgres")
    owned = Path(tempfile.mkdtemp(prefix="lungsql-owned-"))
    try:
        owned.chmod(0o755)
        os.chown(owned, pwd.getpwnam("postgres").pw_uid, -1)
        with pytest.raises(ConfigurationError, match="'postgres' may write"):
            check_server_path([str(owned)], "postgres")
        os.chown(owned, 0, -1)
        check_server_path([str(owned)], "postgres")  # root's, readable by all: fine
    finally:
        owned.rmdir()
