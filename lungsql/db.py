"""Which database lungsql talks to, and connections to it.

The URL comes from --db, else LUNGSQL_DATABASE_URL, else the local cluster
managed by `lungsql db`. URLs are SQLAlchemy URLs; PostgreSQL goes through
psycopg 3 (`postgresql+psycopg://`), SQL Server through pyodbc
(`mssql+pyodbc://`, ODBC Driver 18 unless the URL names another driver).
What differs between the two lives in lungsql.dialects.
"""

from __future__ import annotations

import functools

import sqlalchemy as sa
from sqlalchemy.engine import Engine, make_url

import config_preprocessing as config
from lungsql.cluster import LocalCluster
from lungsql.errors import ConfigurationError, DatabaseUnavailable


def resolve_url(explicit: str | None = None) -> str:
    url = explicit or config.get("LUNGSQL_DATABASE_URL")
    if url:
        return normalise_url(url)
    return LocalCluster().url()


WEB_ROLE = "lungsql_web"


def resolve_web_url(explicit: str | None = None) -> str:
    """The URL of the web app: --db, else LUNGSQL_WEB_DATABASE_URL, else lungsql_web on the local cluster."""
    url = explicit or config.get("LUNGSQL_WEB_DATABASE_URL")
    if url:
        return normalise_url(url)
    return LocalCluster().url(user=WEB_ROLE)


#: The ODBC driver of mssql+pyodbc URLs that name none (Debian's FreeTDS: ?driver=FreeTDS).
MSSQL_ODBC_DRIVER = "ODBC Driver 18 for SQL Server"


def normalise_url(url: str) -> str:
    """Accept plain postgresql:// and mssql:// URLs: psycopg 3 for the one, pyodbc for the other."""
    try:
        parsed = make_url(url)
    except Exception:
        raise ConfigurationError(
            f"not a database URL: {url!r}",
            hint="use a SQLAlchemy URL such as postgresql+psycopg://user@host:5432/dbname",
        ) from None
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    elif parsed.drivername == "mssql":
        parsed = parsed.set(drivername="mssql+pyodbc")
    if parsed.drivername == "mssql+pyodbc":
        if parsed.host and not {"driver", "odbc_connect"} & set(parsed.query):
            parsed = parsed.update_query_dict({"driver": MSSQL_ODBC_DRIVER})
    elif not parsed.drivername.startswith("postgresql"):
        raise ConfigurationError(
            f"unsupported database {parsed.drivername!r}",
            hint="lungsql runs on PostgreSQL 15 with plpython3u (postgresql+psycopg://...) or on SQL Server "
                 "with Machine Learning Services (mssql+pyodbc://...?driver=ODBC+Driver+18+for+SQL+Server)",
        )
    return parsed.render_as_string(hide_password=False)


def dialect_name(url: str) -> str:
    """'postgresql' or 'mssql': which lungsql.dialects module a URL's database needs."""
    return make_url(url).get_backend_name()


@functools.lru_cache(maxsize=8)
def engine(url: str) -> Engine:
    from lungsql import dialects

    return sa.create_engine(url, pool_pre_ping=True, future=True, **dialects.engine_options(dialect_name(url)))


def connect(url: str | None = None) -> Engine:
    """An engine for the resolved URL, checked by one round trip."""
    eng = engine(resolve_url(url))
    try:
        with eng.connect() as conn:
            conn.execute(sa.text("SELECT 1"))
    except sa.exc.OperationalError as exc:
        raise DatabaseUnavailable(
            f"cannot connect to {eng.url.render_as_string(hide_password=True)}: "
            f"{str(exc.orig).strip().splitlines()[0] if exc.orig else exc}",
            hint="start the local database with `lungsql db start`, or check --db / LUNGSQL_DATABASE_URL",
        ) from None
    return eng


def driver_connection(conn: sa.Connection):
    """The psycopg connection under an SQLAlchemy connection (for COPY)."""
    return conn.connection.driver_connection
