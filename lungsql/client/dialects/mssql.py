"""SQL Server specifics: the upload's writes, the schema scripts, the procedure calls.

URLs are ``mssql+pyodbc://user:password@host:1433/lungsql?driver=ODBC+Driver+18+for+SQL+Server``
(or ``driver=FreeTDS`` with Debian's tdsodbc). Every statement is an SQLAlchemy
``text()`` with bound parameters; re-runnable writes use ``INSERT ... SELECT
... WHERE NOT EXISTS`` under UPDLOCK, HOLDLOCK, the T-SQL form of PostgreSQL's
``ON CONFLICT``. Batches go through pyodbc's ``executemany`` with
``fast_executemany`` (see ENGINE_OPTIONS). The pipeline itself runs inside the
server: sql/mssql/02_procedures.sql and lungsql.server.mssql.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import sqlalchemy as sa

import config_preprocessing as config
from lungsql.client.dialects import Counts, Written, scan_values
from lungsql.dicom import PatientInfo, ScanRecord
from lungsql.client import database_errors
from lungsql.client.database_errors import server_message
from lungsql.errors import LungSQLError

SQL_DIR = config.sql_dir() / "mssql"
#: Applied by `install`, in this order; 00_instance.sql is run once per instance by a sysadmin.
DATABASE_SCRIPTS = ("01_schema.sql", "02_procedures.sql", "03_security.sql")
#: create_engine() options for mssql+pyodbc: parameter arrays instead of one round trip per row.
ENGINE_OPTIONS = {"fast_executemany": True}

# -- the upload ----------------------------------------------------------------------
STORED_UIDS = sa.text("SELECT sop_instance_uid, sha256 FROM lungsql.scans")
SERIES_SHAPES = sa.text(
    """SELECT series_instance_uid, [rows], [columns]
       FROM (SELECT series_instance_uid, [rows], [columns],
                    ROW_NUMBER() OVER (PARTITION BY series_instance_uid ORDER BY scan_id) AS n
             FROM lungsql.scans) AS first_slices
       WHERE n = 1""")
UPDATE_LABEL = sa.text(
    """UPDATE lungsql.labels WITH (UPDLOCK, SERIALIZABLE)
       SET cancer = :cancer, source = :source, loaded_at = SYSUTCDATETIME()
       WHERE patient_id = :patient_id""")
INSERT_LABEL = sa.text(
    """INSERT INTO lungsql.labels (patient_id, cancer, source)
       SELECT :patient_id, :cancer, :source
       WHERE NOT EXISTS (SELECT 1 FROM lungsql.labels WITH (UPDLOCK, HOLDLOCK) WHERE patient_id = :patient_id)""")
LABEL_PATIENTS = sa.text(
    """UPDATE p SET label = l.cancer
       FROM lungsql.patients AS p JOIN lungsql.labels AS l ON l.patient_id = p.patient_id
       WHERE p.label IS NULL OR p.label <> l.cancer""")
START_RUN = sa.text(
    """INSERT INTO lungsql.ingest_runs (source_dir, deidentify) OUTPUT INSERTED.run_id
       VALUES (:source_dir, :deidentify)""")
INSERT_PATIENT = sa.text(
    """INSERT INTO lungsql.patients (patient_id, name, sex, birth_date, age_years, label)
       SELECT :patient_id, :name, :sex, :birth_date, :age_years,
              (SELECT cancer FROM lungsql.labels WHERE patient_id = :patient_id)
       WHERE NOT EXISTS (SELECT 1 FROM lungsql.patients WITH (UPDLOCK, HOLDLOCK) WHERE patient_id = :patient_id)""")
SCAN_COLUMNS = (
    "sop_instance_uid", "patient_id", "study_instance_uid", "series_instance_uid", "instance_number",
    "z_position", "rows", "columns", "pixel_spacing_row", "pixel_spacing_col", "slice_thickness",
    "rescale_slope", "rescale_intercept", "modality", "transfer_syntax_uid", "dicom", "sha256",
    "image_type", "series_description", "convolution_kernel", "tilt_degrees", "frames", "frame_z",
)
# An instance another upload stored meanwhile is skipped, as PostgreSQL's ON CONFLICT DO NOTHING does.
INSERT_SCAN = sa.text(
    f"""INSERT INTO lungsql.scans ({", ".join(f"[{c}]" for c in SCAN_COLUMNS)})
        SELECT {", ".join(f":{c}" for c in SCAN_COLUMNS)}
        WHERE NOT EXISTS (SELECT 1 FROM lungsql.scans WITH (UPDLOCK, HOLDLOCK)
                          WHERE sop_instance_uid = :sop_instance_uid)""")
# (source_path, reason) is unique through the computed column error_key (01_schema.sql).
_ERROR_KEY = "CAST(HASHBYTES('SHA2_256', CONCAT(:source_path, NCHAR(0), :reason)) AS binary(32))"
UPDATE_ERROR = sa.text(
    f"""UPDATE lungsql.ingest_errors WITH (UPDLOCK, SERIALIZABLE)
        SET run_id = :run_id, occurred_at = SYSUTCDATETIME()
        WHERE error_key = {_ERROR_KEY}""")
INSERT_ERROR = sa.text(
    f"""INSERT INTO lungsql.ingest_errors (source_path, reason, run_id)
        SELECT :source_path, :reason, :run_id
        WHERE NOT EXISTS (SELECT 1 FROM lungsql.ingest_errors WITH (UPDLOCK, HOLDLOCK)
                          WHERE error_key = {_ERROR_KEY})""")
UPDATE_RUN = sa.text(
    """UPDATE lungsql.ingest_runs SET files_seen = :files_seen, stored = :stored, skipped = :skipped,
              errors = :errors, bytes = :bytes
       WHERE run_id = :run_id""")
FINISH_RUN = sa.text(
    "UPDATE lungsql.ingest_runs SET finished_at = SYSUTCDATETIME(), seconds = :seconds WHERE run_id = :run_id")


def _scan_params(scan: ScanRecord) -> dict[str, Any]:
    values = scan_values(scan)
    # SQL Server has no arrays: the frames' positions are a JSON array (01_schema.sql checks ISJSON).
    values["frame_z"] = None if scan.frame_z is None else json.dumps(list(scan.frame_z))
    return {name: values[name] for name in SCAN_COLUMNS}


class ScanStore:
    """The writes of one upload run, each batch in a transaction of its own
    (the same methods as lungsql.client.dialects.postgres.ScanStore)."""

    def __init__(self, engine: sa.Engine):
        self.engine = engine

    def close(self) -> None:
        pass  # connections go back to the engine's pool after each transaction

    def stored_uids(self) -> dict[str, bytes]:
        with self.engine.connect() as conn:
            return {uid: bytes(sha) for uid, sha in conn.execute(STORED_UIDS)}

    def series_shapes(self) -> dict[str, tuple[int, int]]:
        with self.engine.connect() as conn:
            return {uid: (rows, cols) for uid, rows, cols in conn.execute(SERIES_SHAPES)}

    def load_labels(self, labels: dict[str, int], source: str) -> int:
        rows = [{"patient_id": pid, "cancer": label, "source": source} for pid, label in labels.items()]
        with self.engine.begin() as conn:
            if rows:
                conn.execute(UPDATE_LABEL, rows)
                conn.execute(INSERT_LABEL, rows)
            conn.execute(LABEL_PATIENTS)
        return len(labels)

    def start_run(self, source_dir: str, deidentify: bool) -> int:
        with self.engine.begin() as conn:
            return conn.execute(START_RUN, {"source_dir": source_dir, "deidentify": deidentify}).scalar_one()

    def write_batch(self, run_id: int, patients: Iterable[PatientInfo], scans: Sequence[ScanRecord],
                    errors: Sequence[tuple[str, str]], counts: Counts,
                    path_of: Callable[[ScanRecord], str] | None = None) -> Written:
        """Store a batch and the run's counters in one transaction: all of it or none.

        An instance another upload stored meanwhile is skipped by INSERT_SCAN; pyodbc's
        executemany does not say which, so on SQL Server the run counts it as stored."""
        written = Written()
        if callable(counts):
            counts = counts(written)
        patient_rows = [{"patient_id": p.patient_id, "name": p.name, "sex": p.sex, "birth_date": p.birth_date,
                         "age_years": p.age_years} for p in patients]
        error_rows = [{"source_path": path, "reason": reason, "run_id": run_id} for path, reason in errors]
        with self.engine.begin() as conn:
            if patient_rows:
                conn.execute(INSERT_PATIENT, patient_rows)
            if scans:
                conn.execute(INSERT_SCAN, [_scan_params(s) for s in scans])
            if error_rows:
                conn.execute(UPDATE_ERROR, error_rows)
                conn.execute(INSERT_ERROR, error_rows)
            conn.execute(UPDATE_RUN, {**counts, "run_id": run_id})
        return written

    def finish_run(self, run_id: int, seconds: float) -> None:
        with self.engine.begin() as conn:
            conn.execute(FINISH_RUN, {"seconds": seconds, "run_id": run_id})


# -- the schema (`lungsql init`) ----------------------------------------------------------
_GO = re.compile(r"^[ \t]*GO[ \t]*;?[ \t]*$", re.IGNORECASE | re.MULTILINE)


def batches(script: str) -> list[str]:
    """The batches of a T-SQL script, split at its GO lines as SSMS and sqlcmd split them."""
    return [b.strip() for b in _GO.split(script) if b.strip()]


def install(engine: sa.Engine, sql_dir: Path = SQL_DIR) -> list[str]:
    """Create or update the tables, procedures and roles (each script is safe to run again)."""
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        for name in DATABASE_SCRIPTS:
            for batch in batches((sql_dir / name).read_text(encoding="utf-8")):
                conn.exec_driver_sql(batch)
    return list(DATABASE_SCRIPTS)


# -- CNNs (`lungsql model import`) -----------------------------------------------------------
INSERT_CNN = sa.text(
    """INSERT INTO lungsql.cnn_models (name, model, sha256, input_name, input_size, output_name, feature_dim,
                                      preprocessing, source)
       OUTPUT INSERTED.cnn_id
       VALUES (:name, :model, :sha256, :input_name, :input_size, :output_name, :feature_dim, :preprocessing,
               :source)""")
# In this order: feature_runs keep their CNN (one cascade path only, see 01_schema.sql).
DELETE_CNN = (
    sa.text("DELETE FROM lungsql.features WHERE cnn_id = :cnn_id"),
    sa.text("DELETE FROM lungsql.feature_runs WHERE cnn_id = :cnn_id"),
    sa.text("DELETE FROM lungsql.cnn_models WHERE cnn_id = :cnn_id"),
)


def insert_cnn(conn: sa.Connection, row: dict[str, Any]) -> int:
    """Insert a CNN row (preprocessing and source as JSON text); returns its cnn_id."""
    return conn.execute(INSERT_CNN, row).scalar_one()


def delete_cnn(conn: sa.Connection, cnn_id: int) -> None:
    """Delete a CNN with its features and featurization runs."""
    for statement in DELETE_CNN:
        conn.execute(statement, {"cnn_id": cnn_id})


# -- the procedures, as the CLI and the web app call them ---------------------------------------
GENERATE_FEATURES = sa.text(
    "EXEC dbo.GenerateFeatures @CnnName = :cnn_name, @OnlyMissing = :only_missing, @Shard = :shard, "
    "@Shards = :shards, @RetryFailed = :retry_failed")
TRAIN_MODEL = sa.text("EXEC dbo.TrainLungCancerModel @ModelName = :model_name, @Params = :params, @CnnName = :cnn_name")
DEPLOY = sa.text("EXEC dbo.DeployLungCancerModel @ModelName = :model_name, @Strategy = :strategy")
PREDICT = sa.text("EXEC dbo.PredictLungCancerBatch @PatientIds = :patient_ids, @ModelName = :model_name")
CHECK_ENVIRONMENT = sa.text("EXEC dbo.CheckLungSQLEnvironment")



def readable_error(exc: Exception) -> LungSQLError:
    """A procedure's THROW as a LungSQLError with its hint."""
    return database_errors.read(exc).error()


def positional(statement: sa.TextClause, params: dict[str, Any], dialect: sa.Dialect) -> tuple[str, list[Any]]:
    """The statement as the driver sees it: SQL with ? markers and the values in order."""
    compiled = statement.compile(dialect=dialect)
    return str(compiled), [params[name] for name in compiled.positiontup]


def call(engine: sa.Engine, statement: sa.TextClause, params: dict[str, Any] | None = None,
         on_message: Callable[[str], None] | None = None) -> list[tuple]:
    """Run one EXEC in autocommit mode (GenerateFeatures commits each patient); its
    PRINT and RAISERROR ... WITH NOWAIT lines go to `on_message` as they arrive.
    Returns the rows of the last result set."""
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        sql, values = positional(statement, params or {}, conn.dialect)
        cursor = conn.connection.driver_connection.cursor()
        rows: list[tuple] = []
        try:
            cursor.execute(sql, values)
            while True:
                for _, text in getattr(cursor, "messages", None) or ():
                    if on_message:
                        on_message(server_message(text))
                if cursor.description:
                    rows = [tuple(r) for r in cursor.fetchall()]
                if not cursor.nextset():
                    break
        except conn.dialect.loaded_dbapi.Error as exc:
            raise readable_error(exc) from None
        finally:
            cursor.close()
    return rows


def generate_features(engine: sa.Engine, cnn_name: str | None, only_missing: bool, shard: int, shards: int,
                      on_message: Callable[[str], None] | None = None, retry_failed: bool = False) -> tuple:
    """EXEC dbo.GenerateFeatures; returns (run_id, cnn, provider, patients, slices, seconds)."""
    rows = call(engine, GENERATE_FEATURES, {"cnn_name": cnn_name, "only_missing": bool(only_missing),
                                            "shard": shard, "shards": shards, "retry_failed": bool(retry_failed)},
                on_message)
    return rows[0]


def train_model(engine: sa.Engine, model_name: str, params: str, cnn_name: str | None,
                on_message: Callable[[str], None] | None = None) -> tuple[int, dict]:
    (model_id, metrics), = call(engine, TRAIN_MODEL, {"model_name": model_name, "params": params,
                                                      "cnn_name": cnn_name}, on_message)
    return model_id, json.loads(metrics)


def deploy(engine: sa.Engine, model_name: str, strategy: str) -> int:
    (model_id,), = call(engine, DEPLOY, {"model_name": model_name, "strategy": strategy})
    return model_id


def predict(engine: sa.Engine, patient_ids: list[str], model_name: str | None) -> list[tuple[str, float]]:
    """Probabilities (0-1) from EXEC dbo.PredictLungCancerBatch, recorded in lungsql.predictions."""
    return call(engine, PREDICT, {"patient_ids": json.dumps(list(patient_ids)), "model_name": model_name})
