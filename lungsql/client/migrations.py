"""Versioned schema migrations and the stored functions, applied by `lungsql init`.

sql/postgres/migrations/NNN_name.sql are applied once each, in order, and
recorded in lungsql.schema_migrations with their SHA-256; a recorded migration
whose file changed afterwards is an error, not something silently re-run.
sql/postgres/functions/*.sql (CREATE OR REPLACE) are applied on every init.
Everything runs in one transaction under an advisory lock, so two concurrent
inits, or an init killed midway, leave the schema as it was or complete.
"""

from __future__ import annotations

import hashlib
import json
import re
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path

import sqlalchemy as sa

import config_preprocessing as config
from lungsql.client.db import driver_connection
from lungsql.errors import ConfigurationError

SQL_DIR = config.PROJECT_ROOT / "sql" / "postgres"
_LOCK_KEY = 0x6C756E67  # 'lung'
_NAME = re.compile(r"^(\d{3})_[a-z0-9_]+\.sql$")


@dataclass
class InitReport:
    applied: list[str] = field(default_factory=list)
    already: list[str] = field(default_factory=list)
    functions: list[str] = field(default_factory=list)
    python_path: list[str] = field(default_factory=list)


def migration_files(sql_dir: Path = SQL_DIR) -> list[tuple[int, Path]]:
    found = []
    for path in sorted((sql_dir / "migrations").glob("*.sql")):
        match = _NAME.match(path.name)
        if not match:
            raise ConfigurationError(f"migration file {path} is not named NNN_name.sql")
        found.append((int(match.group(1)), path))
    versions = [v for v, _ in found]
    if len(set(versions)) != len(versions):
        raise ConfigurationError(f"two migrations share a version in {sql_dir / 'migrations'}")
    return found


def server_python_path() -> list[str]:
    """Where Python inside the server finds lungsql: this project and this venv's site-packages."""
    return [str(config.PROJECT_ROOT), sysconfig.get_paths()["purelib"]]


def init(engine: sa.Engine, sql_dir: Path = SQL_DIR) -> InitReport:
    report = InitReport()
    if engine.dialect.name == "mssql":  # sql/mssql: tables and procedures, see its README
        from lungsql.client.dialects import mssql

        report.applied = mssql.install(engine)
        return report
    with engine.begin() as conn:
        pg = driver_connection(conn)
        pg.execute("SELECT pg_advisory_xact_lock(%s)", (_LOCK_KEY,))
        pg.execute("CREATE SCHEMA IF NOT EXISTS lungsql")
        pg.execute(
            """CREATE TABLE IF NOT EXISTS lungsql.schema_migrations (
                   version    integer PRIMARY KEY,
                   name       text NOT NULL,
                   sha256     text NOT NULL,
                   applied_at timestamptz NOT NULL DEFAULT now())"""
        )
        done = {v: sha for v, sha in pg.execute("SELECT version, sha256 FROM lungsql.schema_migrations")}
        for version, path in migration_files(sql_dir):
            text = path.read_text(encoding="utf-8")
            sha = hashlib.sha256(text.encode()).hexdigest()
            if version in done:
                if done[version] != sha:
                    raise ConfigurationError(
                        f"migration {path.name} changed after it was applied to this database",
                        hint="never edit an applied migration; add a new NNN_*.sql file instead",
                    )
                report.already.append(path.name)
                continue
            pg.execute(text)
            pg.execute(
                "INSERT INTO lungsql.schema_migrations (version, name, sha256) VALUES (%s, %s, %s)",
                (version, path.name, sha),
            )
            report.applied.append(path.name)
        for path in sorted((sql_dir / "functions").glob("*.sql")):
            pg.execute(path.read_text(encoding="utf-8"))
            report.functions.append(path.name)
        report.python_path = server_python_path()
        pg.execute(
            """INSERT INTO lungsql.settings (name, value) VALUES ('python.path', %s)
               ON CONFLICT (name) DO UPDATE SET value = EXCLUDED.value, updated_at = now()""",
            (json.dumps(report.python_path),),
        )
    return report


def schema_version(engine: sa.Engine) -> int | None:
    with engine.connect() as conn:
        exists = conn.execute(sa.text("SELECT to_regclass('lungsql.schema_migrations')")).scalar()
        if exists is None:
            return None
        return conn.execute(sa.text("SELECT max(version) FROM lungsql.schema_migrations")).scalar()
