"""The throwaway PostgreSQL cluster every benchmark runs in (never the user's database)."""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import psycopg
import sqlalchemy as sa

from lungsql.client import migrations
from lungsql.client.cluster import LocalCluster

DBNAME = "lungsql_bench"


@dataclass
class BenchDatabase:
    cluster: LocalCluster
    url: str
    engine: sa.Engine

    def connect(self, user: str = "postgres") -> psycopg.Connection:
        """A new autocommit psycopg session (as a DBA in psql)."""
        return psycopg.connect(host=str(self.cluster.socket_dir), port=self.cluster.status().port, user=user,
                               dbname=DBNAME, autocommit=True)

    @property
    def web_url(self) -> str:
        return self.cluster.url(dbname=DBNAME, user="lungsql_web")


@contextlib.contextmanager
def throwaway(keep: bool = False, say: Callable[[str], None] = print) -> Iterator[BenchDatabase]:
    # Under /tmp with o+x, so the server's OS user (when we run as root) can reach it.
    home = Path(tempfile.mkdtemp(prefix="lungsql-bench-db-"))
    home.chmod(0o755)
    cluster = LocalCluster(home=home, dbname=DBNAME)
    engine = None
    try:
        cluster.start()
        url = cluster.url(dbname=DBNAME)
        engine = sa.create_engine(url)
        migrations.init(engine)
        yield BenchDatabase(cluster, url, engine)
    finally:
        if engine is not None:
            engine.dispose()
        if keep:
            say(f"kept the benchmark cluster in {home} (stop it with pg_ctl -D {home / 'pgdata'} stop)")
        else:
            cluster.destroy()
            shutil.rmtree(home, ignore_errors=True)
