"""The web app's database: one SQLAlchemy engine per app, one connection per request.

The app connects as the least-privileged role ``lungsql_web``: it reads the
models and deployments and users' names and roles, and reaches patients,
slices, sign-in and the audit log only through functions
(sql/postgres/functions/020_web.sql), besides the scoring and deployment
functions. Every statement binds its parameters.
"""

from __future__ import annotations

import threading

import sqlalchemy as sa
from flask import Flask, current_app, g

from lungsql.client import database_errors
from lungsql.errors import DatabaseUnavailable

# All a visitor learns when the database is away: where it is and as whom go to the server's log only.
UNAVAILABLE = "The database cannot be reached right now. Try again in a moment."

ENGINE = "lungsql_engine"


def init_app(app: Flask) -> None:
    app.extensions[ENGINE] = sa.create_engine(
        app.config["DATABASE_URL"],
        pool_pre_ping=True,
        pool_size=app.config["DATABASE_POOL_SIZE"],
        hide_parameters=True,  # errors and logs never show bound values (a password being checked)
        connect_args={"application_name": "lungsql-web"},
    )
    app.teardown_appcontext(close_db)


def warm_pool(app: Flask) -> threading.Thread:
    """Open the pool's connections in the background and load Python and the deployed model into
    each (``lungsql.warm_up``): a new database session's first score otherwise takes most of a
    second, paid by the first clinicians after every start. Failures are logged and forgotten (the
    requests will connect as usual)."""
    engine, size = app.extensions[ENGINE], int(app.config["DATABASE_POOL_SIZE"])

    def warm() -> None:
        connections = []
        try:
            for _ in range(size):
                conn = engine.connect()
                connections.append(conn)
                conn.execute(sa.text("SELECT lungsql.warm_up()"))
                conn.commit()
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
