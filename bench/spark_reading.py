"""How Spark tasks should read the scans: JDBC partitioned reads (Spark's own source, Debian's
PostgreSQL driver) or a database connection per partition (psycopg in the task, as
lungsql.spark.featurize does). Both read the DICOM bytes of every scan of the cohort in N
partitions of the same patients, over TCP to 127.0.0.1 as a login role with a password, with
a local master of N cores; the figure is MB/s of DICOM bytes delivered to the Python tasks.
"""

from __future__ import annotations

import secrets
import time
from pathlib import Path
from urllib.parse import quote

from lungsql.bench.database import DBNAME, BenchDatabase

JDBC_JAR = Path("/usr/share/java/postgresql.jar")
ROLE = "lungsql_bench_reader"
PARTITIONS = 2


def conf() -> dict[str, str]:
    """Spark settings that put the JDBC driver on the classpath; the first session of the process
    must have them (a later one shares its JVM), so the Spark benchmark starts every session so."""
    return {"spark.jars": str(JDBC_JAR)} if JDBC_JAR.exists() else {}


def run(db: BenchDatabase) -> dict:
    if not JDBC_JAR.exists():
        return {"skipped": f"{JDBC_JAR} is missing (Debian's libpostgresql-jdbc-java)"}
    from psycopg import sql

    from lungsql.spark import featurize as on_spark

    password = secrets.token_urlsafe(18)
    port = db.cluster.status().port
    with db.connect() as conn:
        conn.execute(f"DROP ROLE IF EXISTS {ROLE}")
        conn.execute(sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(sql.Identifier(ROLE), sql.Literal(password)))
        conn.execute(f"GRANT USAGE ON SCHEMA lungsql TO {ROLE}")
        conn.execute(f"GRANT SELECT ON lungsql.scans TO {ROLE}")
        total = conn.execute("SELECT sum(length(dicom)) FROM lungsql.scans").fetchone()[0]
    spark = on_spark.session(f"local[{PARTITIONS}]", app_name="lungsql-bench-reading", conf=conf())
    try:
        url = f"postgresql://{ROLE}:{quote(password, safe='')}@127.0.0.1:{port}/{DBNAME}"
        context = spark.sparkContext
        context.parallelize(range(PARTITIONS), PARTITIONS).map(lambda _: 0).collect()  # Python workers up
        started = time.perf_counter()
        read = context.parallelize(range(PARTITIONS), PARTITIONS).map(lambda i: _connection_read(url, i)).sum()
        per_partition = time.perf_counter() - started
        # The same partitions: a hash of patient_id, computed by the server (no value in the SQL text).
        predicates = [f"mod(abs(hashtext(patient_id)), {PARTITIONS}) = {i}" for i in range(PARTITIONS)]
        frame = spark.read.jdbc(f"jdbc:postgresql://127.0.0.1:{port}/{DBNAME}",
                                "(SELECT patient_id, dicom FROM lungsql.scans) AS s", predicates=predicates,
                                properties={"user": ROLE, "password": password, "driver": "org.postgresql.Driver",
                                            "fetchsize": "64"})
        frame.limit(1).collect()  # the JVM's driver loaded
        started = time.perf_counter()
        jdbc_read = frame.rdd.map(lambda row: len(row.dicom)).sum()
        jdbc = time.perf_counter() - started
    finally:
        spark.stop()
        with db.connect() as conn:
            conn.execute(f"REVOKE ALL ON lungsql.scans FROM {ROLE}")
            conn.execute(f"REVOKE ALL ON SCHEMA lungsql FROM {ROLE}")
            conn.execute(f"DROP ROLE IF EXISTS {ROLE}")
    assert read == jdbc_read == total, (read, jdbc_read, total)
    mb = total / 1e6
    return {"partitions": PARTITIONS, "mb": round(mb, 1),
            "connection_per_partition_mb_per_s": round(mb / per_partition, 1),
            "jdbc_mb_per_s": round(mb / jdbc, 1), "jdbc_to_connection": round(per_partition / jdbc, 3)}


def _connection_read(url: str, partition: int) -> int:
    """Bytes of one partition's scans, read on a connection of the task's own, as a Spark task of
    lungsql.spark.featurize reads them (a server-side cursor, a few rows per fetch)."""
    import psycopg

    with psycopg.connect(url) as conn, conn.cursor(name="scans") as cur:
        cur.itersize = 64
        cur.execute("SELECT dicom FROM lungsql.scans WHERE mod(abs(hashtext(patient_id)), %s) = %s",
                    (PARTITIONS, partition))
        return sum(len(row[0]) for row in cur)
