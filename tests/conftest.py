"""Test fixtures: a real PostgreSQL 15 cluster started for the session with
lungsql's own cluster code, and a fresh database with the schema per test
that needs one."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import psycopg
import pytest
import sqlalchemy as sa

from databases import create_database, drop_database
from lungsql.client import db, migrations
from lungsql.client.cluster import LocalCluster
from lungsql.errors import ConfigurationError
from pacs_fixtures import orthanc, orthanc_clean  # noqa: F401


@pytest.fixture(scope="session")
def cluster():
    # Under /tmp with o+x, so the server's OS user (when tests run as root) can reach it.
    home = Path(tempfile.mkdtemp(prefix="lungsql-test-"))
    home.chmod(0o755)
    local = LocalCluster(home=home, dbname="postgres")
    local.start()
    yield local
    local.destroy()


@pytest.fixture
def admin(cluster):
    """A psycopg connection to the maintenance database, autocommit (new per test: a test may restart the server)."""
    with psycopg.connect(host=str(cluster.socket_dir), port=cluster.status().port, user="postgres",
                         dbname="postgres", autocommit=True) as conn:
        yield conn


@pytest.fixture
def empty_db(cluster):
    """The URL of a new, empty database, dropped after the test."""
    name = create_database(cluster)
    yield cluster.url(dbname=name)
    db.engine.cache_clear()  # engines the CLI cached for this URL
    drop_database(cluster, name)


@pytest.fixture
def engine(empty_db):
    """An SQLAlchemy engine on a fresh database that `lungsql init` has prepared."""
    eng = sa.create_engine(empty_db)
    migrations.init(eng)
    yield eng
    eng.dispose()


@pytest.fixture
def db_env(empty_db, monkeypatch):
    """Point the CLI at the fresh database through LUNGSQL_DATABASE_URL."""
    monkeypatch.setenv("LUNGSQL_DATABASE_URL", empty_db)
    return empty_db


@pytest.fixture(scope="session")
def output_dir() -> Path:
    """Where tests leave files for people to look at (screenshots, reports)."""
    path = Path(os.environ.get("LUNGSQL_TEST_OUTPUT", Path(__file__).resolve().parent.parent / "test-output"))
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="module")
def web_db(cluster, tmp_path_factory, request):
    """The web app's database (tests/webapp_fixtures.py), built once for each test module that asks for it."""
    from webapp_fixtures import build

    try:
        built = build(cluster, tmp_path_factory.mktemp(request.module.__name__.rsplit(".", 1)[-1]))
    except ConfigurationError as exc:  # the built-in CNN cannot be exported here
        pytest.skip(f"no CNN for the web app's database: {exc}")
    yield built
    drop_database(cluster, built.name)


@pytest.fixture(scope="module")
def su(web_db):
    """The superuser's engine on the web app's database, for setting up and checking."""
    engine = web_db.engine()
    yield engine
    engine.dispose()
