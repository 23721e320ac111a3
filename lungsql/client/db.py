"""Which database lungsql talks to, and connections to it.

The URL comes from --db, else LUNGSQL_DATABASE_URL, else the local cluster
managed by `lungsql db`. URLs are SQLAlchemy URLs; PostgreSQL goes through
psycopg 3 (`postgresql+psycopg://`), SQL Server through pyodbc
(`mssql+pyodbc://`, ODBC Driver 18 unless the URL names another driver).
What differs between the two lives in lungsql.client.dialects.

A URL may hold a password: whatever shows one (a message, `lungsql settings`)
shows it through `redact_url`.
"""

from __future__ import annotations

import functools
import re

import sqlalchemy as sa
from sqlalchemy.engine import Engine, make_url

import config_preprocessing as config
from lungsql.client.cluster import WEB_ROLE, LocalCluster
from lungsql.errors import ConfigurationError, DatabaseUnavailable

# The userinfo of anything URL-like, user:password@ with or without a scheme before it, and the password
# of a query string or a libpq connection string (password=...). The password runs to the last '@' before
# a blank: more is masked than may be needed, never less.
_URL_USERINFO = re.compile(r"""(?<![^\s'"(=,])(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)?"""
                           r"""(?P<user>[^:/@\s'"]*):(?(scheme)|(?!//))(?P<password>\S*)@""")
_PASSWORD_PARAM = re.compile(r"(?i)(?P<key>\bpassword\s*=\s*)(?P<password>[^&\s'\"]+)")


def redact_url(text: str) -> str:
    """`text` with the password of every URL-like part in it masked as ***: for messages and listings.

    >>> redact_url("postgresql://web:s3cret@db/lungsql?password=again")
    'postgresql://web:***@db/lungsql?password=***'
    """
    text = _URL_USERINFO.sub(lambda m: f"{m['scheme'] or ''}{m['user']}:***@", str(text))
    return _PASSWORD_PARAM.sub(lambda m: f"{m['key']}***", text)


def resolve_url(explicit: str | None = None) -> str:
    url = explicit or config.get("LUNGSQL_DATABASE_URL")
    if url:
        return normalise_url(url)
    return LocalCluster().url()


def resolve_web_url(explicit: str | None = None) -> str:
    """The URL of the web app: --web-db, else LUNGSQL_WEB_DATABASE_URL, else lungsql_web on the local cluster
    (with its password, from the cluster's web-db.key)."""
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
            f"not a database URL: {redact_url(url)!r}",
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


# Roles from which the web app could reach more than its grants: any of these, and `serve` refuses.
_POWERFUL_ROLES = ("pg_read_all_data", "pg_write_all_data", "pg_read_server_files", "pg_write_server_files",
                   "pg_execute_server_program")


def check_web_role(url: str) -> str:
    """Connect once with the web app's URL and refuse a role with more rights than the web app needs: a
    superuser, or a role that can create roles, replicate, bypass row security or read the server's files
    (code run in a web worker would have them). Returns the role's name."""
    if dialect_name(url) != "postgresql":
        raise ConfigurationError(
            f"the web app runs on PostgreSQL, not {dialect_name(url)}",
            hint="point --web-db or LUNGSQL_WEB_DATABASE_URL at PostgreSQL as the role lungsql_web",
        )
    eng = sa.create_engine(url, poolclass=sa.pool.NullPool)
    try:
        with eng.connect() as conn:
            row = conn.execute(sa.text(
                "SELECT current_user AS name, rolsuper, rolcreaterole, rolreplication, rolbypassrls, "
                "ARRAY(SELECT p FROM unnest(CAST(:powerful AS text[])) AS p "
                "      WHERE to_regrole(p) IS NOT NULL AND pg_has_role(current_user, p, 'MEMBER')) AS member_of "
                "FROM pg_roles WHERE rolname = current_user"), {"powerful": list(_POWERFUL_ROLES)}).one()
    except sa.exc.OperationalError as exc:
        raise DatabaseUnavailable(
            f"the web app cannot connect to {redact_url(eng.url.render_as_string(hide_password=True))}: "
            + redact_url(_first_line(exc)),
            hint="start the local database with `lungsql db start` (it sets the password of lungsql_web), "
                 "or check --web-db / LUNGSQL_WEB_DATABASE_URL",
        ) from None
    finally:
        eng.dispose()
    if row.rolsuper:
        raise ConfigurationError(
            f"lungsql serve connects as a superuser; use the role {WEB_ROLE}",
            hint=f"the URL logs in as {row.name}: leave --web-db and LUNGSQL_WEB_DATABASE_URL unset for "
                 f"{WEB_ROLE} on the local cluster, or give a URL that logs in as {WEB_ROLE}",
        )
    powers = [name for name, has in (("CREATEROLE", row.rolcreaterole), ("REPLICATION", row.rolreplication),
                                     ("BYPASSRLS", row.rolbypassrls)) if has] + list(row.member_of)
    if powers:
        raise ConfigurationError(
            f"lungsql serve connects as the role {row.name}, which has {', '.join(powers)}; "
            f"use the role {WEB_ROLE}",
            hint=f"give the web app a URL that logs in as {WEB_ROLE}, which has none of these",
        )
    return row.name


def _first_line(exc: BaseException) -> str:
    orig = getattr(exc, "orig", None) or exc
    text = str(orig).strip()
    return text.splitlines()[0] if text else type(orig).__name__


def dialect_name(url: str) -> str:
    """'postgresql' or 'mssql': which lungsql.client.dialects module a URL's database needs."""
    return make_url(url).get_backend_name()


@functools.lru_cache(maxsize=8)
def engine(url: str) -> Engine:
    from lungsql.client import dialects

    return sa.create_engine(url, pool_pre_ping=True, future=True, **dialects.engine_options(dialect_name(url)))


def connect(url: str | None = None) -> Engine:
    """An engine for the resolved URL, checked by one round trip."""
    eng = engine(resolve_url(url))
    try:
        with eng.connect() as conn:
            conn.execute(sa.text("SELECT 1"))
    except sa.exc.OperationalError as exc:
        raise DatabaseUnavailable(
            f"cannot connect to {redact_url(eng.url.render_as_string(hide_password=True))}: "
            + redact_url(_first_line(exc)),
            hint="start the local database with `lungsql db start`, or check --db / LUNGSQL_DATABASE_URL",
        ) from None
    return eng


def driver_connection(conn: sa.Connection):
    """The psycopg connection under an SQLAlchemy connection (for COPY)."""
    return conn.connection.driver_connection
