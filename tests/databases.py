"""Helpers the test modules share: databases in the session's cluster, and SQL run as a DBA runs it."""

from __future__ import annotations

import uuid

import psycopg
import sqlalchemy as sa


def _maintenance(cluster) -> psycopg.Connection:
    return psycopg.connect(host=str(cluster.socket_dir), port=cluster.status().port, user="postgres",
                           dbname="postgres", autocommit=True)


def create_database(cluster, prefix: str = "t") -> str:
    """A new empty database in the session's cluster; returns its name."""
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    with _maintenance(cluster) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return name


def drop_database(cluster, name: str) -> None:
    with _maintenance(cluster) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def call(engine: sa.Engine, sql: str, params=(), notices: list | None = None):
    """Run `sql` as a DBA does in psql: autocommit (CALL generate_features commits per patient).
    Returns the rows, if any; NOTICE lines are appended to `notices`."""
    with engine.connect() as conn:
        pg = conn.connection.driver_connection
        conn.commit()
        pg.autocommit = True
        if notices is not None:
            pg.add_notice_handler(lambda diag: notices.append(diag.message_primary))
        try:
            cur = pg.execute(sql, params)
            return cur.fetchall() if cur.description else None
        finally:
            pg.autocommit = False
