"""The web app's database: one SQLAlchemy engine per app, one connection per request.

The app connects as the least-privileged role ``lungsql_web``: it reads the
models and deployments and users' names and roles, and reaches patients,
slices, sign-in and the audit log only through functions
(sql/postgres/functions/020_web.sql), besides the scoring and deployment
functions. Every statement binds its parameters.

Each statement commits as it ends (the connections are in autocommit): a
request that writes does so in one statement (a score and its audit row, a
sign-in attempt and its row), or in `transaction()` when several statements
must commit together. A statement then costs one round trip, not three
(BEGIN, the statement, COMMIT).
"""

from __future__ import annotations

import contextlib
import threading
import time
from typing import Iterator

import psycopg
import sqlalchemy as sa
from flask import Flask, current_app, g
from psycopg.rows import dict_row

from lungsql.client import database_errors
from lungsql.errors import DatabaseUnavailable

# All a visitor learns when the database is away: where it is and as whom go to the server's log only.
UNAVAILABLE = "The database cannot be reached right now. Try again in a moment."

ENGINE = "lungsql_engine"


def init_app(app: Flask) -> None:
    engine = sa.create_engine(
        app.config["DATABASE_URL"],
        isolation_level="AUTOCOMMIT",  # see the module's docstring, and transaction()
        pool_size=app.config["DATABASE_POOL_SIZE"],
        hide_parameters=True,  # errors and logs never show bound values (a password being checked)
        connect_args={"application_name": "lungsql-web"},
    )
    check_idle_connections(engine, float(app.config["DATABASE_CHECK_IDLE_S"]))
    app.extensions[ENGINE] = engine
    app.teardown_appcontext(close_db)


def check_idle_connections(engine: sa.Engine, idle_s: float) -> None:
    """Before a request gets a pooled connection that nobody used for `idle_s` seconds, check it with a
    round trip and replace it if the database has closed it (a restart, an idle timeout): the request
    then runs on a live connection. A connection used moments ago is not checked: under load that check
    was a round trip of every request. A database that goes away while connections are in use fails the
    statements then running (503); the pool then replaces every connection older than the failure."""
    dialect = engine.dialect

    @sa.event.listens_for(engine, "checkin")
    def _returned(dbapi_connection, record) -> None:
        record.info["idle_since"] = time.monotonic()

    @sa.event.listens_for(engine, "checkout")
    def _lent(dbapi_connection, record, proxy) -> None:
        since = record.info.pop("idle_since", None)
        if since is None or time.monotonic() - since < idle_s:
            return
        try:
            dialect.do_ping(dbapi_connection)
        except dialect.loaded_dbapi.Error as exc:
            raise sa.exc.DisconnectionError(_first_line(exc)) from None  # the pool connects afresh


def warm_pool(app: Flask) -> threading.Thread:
    """Open the pool's connections in a thread of their own and load Python and the deployed model into
    each (``lungsql.warm_up``): a new database session's first score otherwise takes most of a
    second, paid by the first clinicians after every start. `lungsql serve` joins the thread before a
    worker takes requests (webapp.server). Failures are logged and forgotten (the requests will
    connect as usual)."""
    engine, size = app.extensions[ENGINE], int(app.config["DATABASE_POOL_SIZE"])

    def warm() -> None:
        connections = []
        try:
            for _ in range(size):
                conn = engine.connect()
                connections.append(conn)
                conn.execute(sa.text("SELECT lungsql.warm_up()"))
        except sa.exc.SQLAlchemyError as exc:
            app.logger.warning("could not warm the database pool: %s", _first_line(exc))
        finally:
            for conn in connections:
                conn.close()  # back to the pool, warm

    thread = threading.Thread(target=warm, name="lungsql-warm-pool", daemon=True)
    thread.start()
    return thread


def get_engine() -> sa.Engine:
    return current_app.extensions[ENGINE]


def get_db() -> sa.Connection:
    """This request's connection, opened on first use and closed (rolled back) at teardown."""
    if "db" not in g:
        try:
            g.db = get_engine().connect()
        except sa.exc.OperationalError as exc:
            current_app.logger.error(
                "the web app cannot reach its database: %s (check that PostgreSQL runs and that "
                "LUNGSQL_WEB_DATABASE_URL or --web-db points at it as the role lungsql_web)", _first_line(exc))
            raise DatabaseUnavailable(UNAVAILABLE) from None
    return g.db


def fetch_one(statement: str, params: dict) -> dict | None:
    """The first row of `statement` (psycopg's placeholders: %(name)s) as a dict, or None, run on this
    request's connection through the driver's own cursor: for the prediction API, whose wide row cost
    SQLAlchemy's result machinery 0.12 ms of CPU per request, a seventh of the app's. An error is raised
    as SQLAlchemy raises it for any statement (a lost connection invalidated, an OperationalError)."""
    conn = get_db()
    driver = conn.connection.driver_connection
    try:
        with driver.cursor(row_factory=dict_row) as cursor:
            cursor.execute(statement, params)
            return cursor.fetchone()
    except psycopg.Error as exc:
        dialect = conn.dialect
        lost = dialect.is_disconnect(exc, driver, None)
        if lost:
            conn.invalidate(exc)
        raise sa.exc.DBAPIError.instance(statement, None, exc, psycopg.Error, hide_parameters=True,
                                         connection_invalidated=lost, dialect=dialect) from exc


@contextlib.contextmanager
def transaction() -> Iterator[sa.Connection]:
    """This request's connection, on which the statements of the block commit together at its end, or
    not at all when it raises (then rolled back). Afterwards each statement commits on its own again."""
    conn = get_db()
    conn.commit()  # ends SQLAlchemy's bookkeeping of the statements before; the database has committed them
    conn.execution_options(isolation_level="READ COMMITTED")
    try:
        with conn.begin():
            yield conn
    finally:
        if not conn.invalidated and not conn.closed:
            conn.execution_options(isolation_level="AUTOCOMMIT")


def close_db(exc: BaseException | None = None) -> None:
    conn = g.pop("db", None)
    if conn is not None:
        conn.close()


def database_message(exc: sa.exc.DBAPIError) -> tuple[str, str | None]:
    """(message, hint) of a database error, e.g. one raised by a lungsql function (lungsql.client.database_errors)."""
    found = database_errors.read(exc)
    return found.message, found.hint


def is_lungsql_error(exc: sa.exc.DBAPIError) -> bool:
    """Whether a database error was raised on purpose by a lungsql function (not a lost connection)."""
    return database_errors.read(exc).ours


def refusal(exc: sa.exc.DBAPIError, what: str) -> tuple[str, str | None]:
    """(message, hint) of a statement the database refused, for the page to show. A lost database is
    raised again (an error page, 503); an error that is not one of lungsql's own is logged, as
    `what` failed."""
    if isinstance(exc, (sa.exc.OperationalError, sa.exc.InterfaceError)) or exc.connection_invalidated:
        raise exc
    if not is_lungsql_error(exc):
        current_app.logger.error("%s failed", what, exc_info=exc)
    return database_message(exc)


def _first_line(exc: BaseException) -> str:
    orig = getattr(exc, "orig", None) or exc
    text = str(orig).strip()
    return text.splitlines()[0] if text else type(orig).__name__
