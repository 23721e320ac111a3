"""PostgreSQL specifics of the upload: COPY in binary format, ON CONFLICT upserts.

Everything an upload writes goes through `ScanStore`, so ingest.py holds no
SQL of one database in particular.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Iterable, Sequence

import psycopg
import sqlalchemy as sa

from lungsql.client.dialects import Counts, Written, scan_values
from lungsql.dicom import PatientInfo, ScanRecord

SCAN_COLUMNS = (
    ("sop_instance_uid", "text"),
    ("patient_id", "text"),
    ("study_instance_uid", "text"),
    ("series_instance_uid", "text"),
    ("instance_number", "int4"),
    ("z_position", "float8"),
    ("rows", "int4"),
    ("columns", "int4"),
    ("pixel_spacing_row", "float8"),
    ("pixel_spacing_col", "float8"),
    ("slice_thickness", "float8"),
    ("rescale_slope", "float8"),
    ("rescale_intercept", "float8"),
    ("modality", "text"),
    ("transfer_syntax_uid", "text"),
    ("dicom", "bytea"),
    ("sha256", "bytea"),
    ("image_type", "text"),
    ("series_description", "text"),
    ("convolution_kernel", "text"),
    ("tilt_degrees", "float8"),
    ("frames", "int4"),
    ("frame_z", "float8[]"),
)
_COLUMN_LIST = ", ".join(name for name, _ in SCAN_COLUMNS)
_COLUMN_TYPES = [kind for _, kind in SCAN_COLUMNS]


def _scan_row(scan: ScanRecord) -> tuple:
    values = scan_values(scan)
    return tuple(values[name] for name, _ in SCAN_COLUMNS)


class ScanStore:
    """The writes of one upload run, each batch in a transaction of its own."""

    def __init__(self, engine: sa.Engine):
        self._raw = engine.raw_connection()
        self.conn: psycopg.Connection = self._raw.driver_connection

    def close(self) -> None:
        self._raw.close()

    # -- what is there already -----------------------------------------
    def stored_uids(self) -> dict[str, bytes]:
        with self.conn.cursor() as cur:
            cur.execute("SELECT sop_instance_uid, sha256 FROM lungsql.scans")
            found = {uid: bytes(sha) for uid, sha in cur}
        self.conn.commit()
        return found

    def series_shapes(self) -> dict[str, tuple[int, int]]:
        with self.conn.cursor() as cur:
            cur.execute(
                "SELECT DISTINCT ON (series_instance_uid) series_instance_uid, rows, columns "
                "FROM lungsql.scans ORDER BY series_instance_uid, scan_id"
            )
            found = {uid: (rows, cols) for uid, rows, cols in cur}
        self.conn.commit()
        return found

    # -- labels ----------------------------------------------------------
    def load_labels(self, labels: dict[str, int], source: str) -> int:
        with self.conn.transaction():
            with self.conn.cursor() as cur:
                cur.executemany(
                    """INSERT INTO lungsql.labels (patient_id, cancer, source) VALUES (%s, %s, %s)
                       ON CONFLICT (patient_id) DO UPDATE
                       SET cancer = EXCLUDED.cancer, source = EXCLUDED.source, loaded_at = now()""",
                    [(pid, label, source) for pid, label in labels.items()],
                )
                cur.execute(
                    """UPDATE lungsql.patients p SET label = l.cancer FROM lungsql.labels l
                       WHERE l.patient_id = p.patient_id AND p.label IS DISTINCT FROM l.cancer"""
                )
        return len(labels)

    # -- runs --------------------------------------------------------------
    def start_run(self, source_dir: str, deidentify: bool) -> int:
        with self.conn.transaction():
            run_id = self.conn.execute(
                "INSERT INTO lungsql.ingest_runs (source_dir, deidentify) VALUES (%s, %s) RETURNING run_id",
                (source_dir, deidentify),
            ).fetchone()[0]
        return run_id

    def write_batch(
        self,
        run_id: int,
        patients: Iterable[PatientInfo],
        scans: Sequence[ScanRecord],
        errors: Sequence[tuple[str, str]],
        counts: Counts,
        path_of: Callable[[ScanRecord], str] | None = None,
    ) -> Written:
        """Store a batch and the run's counters in one transaction: all of it or none.

        `counts` are the run's counters, or a function of what the batch did
        not store that returns them.  A row the database refuses (a value out
        of its range, say) does not stop the upload: the batch is written
        again file by file, and each refused file becomes an ingest error
        under `path_of(record)`.  Only a lost connection raises.
        """
        patients = list(patients)
        try:
            with self.conn.transaction():
                with self.conn.cursor() as cur:
                    written = Written()
                    self._insert_patients(cur, patients)
                    if scans:
                        written.already = self._copy_scans(cur, scans)
                    self._finish_batch(cur, run_id, errors, counts, written)
            return written
        except psycopg.OperationalError:
            raise
        except psycopg.Error:
            pass  # one of the rows: find it below
        written = Written()
        by_id = {p.patient_id: p for p in patients}
        with self.conn.transaction():
            with self.conn.cursor() as cur:
                for scan in scans:
                    try:
                        with self.conn.transaction():  # a savepoint per file
                            self._insert_patients(cur, [by_id.get(scan.patient.patient_id, scan.patient)])
                            written.already += self._copy_scans(cur, [scan])
                    except psycopg.OperationalError:
                        raise
                    except psycopg.Error as exc:
                        reason = (getattr(exc.diag, "message_primary", None) or str(exc)).splitlines()[0]
                        written.rejected.append((scan, f"the database refused the slice: {reason}"))
                rejected = [((path_of or (lambda r: r.sop_instance_uid))(r), why) for r, why in written.rejected]
                self._finish_batch(cur, run_id, [*errors, *rejected], counts, written)
        return written

    @staticmethod
    def _insert_patients(cur: psycopg.Cursor, patients: Sequence[PatientInfo]) -> None:
        if patients:
            cur.executemany(
                """INSERT INTO lungsql.patients (patient_id, name, sex, birth_date, age_years, label)
                   VALUES (%s, %s, %s, %s, %s,
                           (SELECT cancer FROM lungsql.labels WHERE patient_id = %s))
                   ON CONFLICT (patient_id) DO NOTHING""",
                [(p.patient_id, p.name, p.sex, p.birth_date, p.age_years, p.patient_id) for p in patients],
            )

    @staticmethod
    def _finish_batch(cur: psycopg.Cursor, run_id: int, errors: Sequence[tuple[str, str]], counts: Counts,
                      written: Written) -> None:
        if errors:
            cur.executemany(
                """INSERT INTO lungsql.ingest_errors (source_path, reason, run_id) VALUES (%s, %s, %s)
                   ON CONFLICT (source_path, reason)
                   DO UPDATE SET run_id = EXCLUDED.run_id, occurred_at = now()""",
                [(path, reason, run_id) for path, reason in errors],
            )
        cur.execute(
            """UPDATE lungsql.ingest_runs SET files_seen = %(files_seen)s, stored = %(stored)s,
                      skipped = %(skipped)s, errors = %(errors)s, bytes = %(bytes)s
               WHERE run_id = %(run_id)s""",
            {**(counts(written) if callable(counts) else counts), "run_id": run_id},
        )

    def finish_run(self, run_id: int, seconds: float) -> None:
        with self.conn.transaction():
            self.conn.execute(
                "UPDATE lungsql.ingest_runs SET finished_at = %s, seconds = %s WHERE run_id = %s",
                (dt.datetime.now(dt.timezone.utc), seconds, run_id),
            )

    def _copy_scans(self, cur: psycopg.Cursor, scans: Sequence[ScanRecord]) -> list[ScanRecord]:
        """COPY the slices; returns those another upload stored meanwhile (not stored again)."""
        # Straight into lungsql.scans; if another upload stored one of these
        # instances meanwhile, redo the batch through a staging table whose
        # INSERT ... ON CONFLICT DO NOTHING skips them, and say which.
        try:
            with self.conn.transaction():
                self._copy(cur, "lungsql.scans", scans)
            return []
        except psycopg.errors.UniqueViolation:
            pass
        cur.execute(
            "CREATE TEMP TABLE IF NOT EXISTS scan_stage ON COMMIT DELETE ROWS AS "
            f"SELECT {_COLUMN_LIST} FROM lungsql.scans WITH NO DATA"
        )
        self._copy(cur, "scan_stage", scans)
        cur.execute(
            f"INSERT INTO lungsql.scans ({_COLUMN_LIST}) SELECT {_COLUMN_LIST} FROM scan_stage "
            "ON CONFLICT (sop_instance_uid) DO NOTHING RETURNING sop_instance_uid"
        )
        inserted = {uid for (uid,) in cur.fetchall()}
        cur.execute("TRUNCATE scan_stage")
        return [s for s in scans if s.sop_instance_uid not in inserted]

    @staticmethod
    def _copy(cur: psycopg.Cursor, table: str, scans: Sequence[ScanRecord]) -> None:
        with cur.copy(f"COPY {table} ({_COLUMN_LIST}) FROM STDIN (FORMAT BINARY)") as copy:
            copy.set_types(_COLUMN_TYPES)
            for scan in scans:
                copy.write_row(_scan_row(scan))


# -- CNNs ------------------------------------------------------------------------------
def insert_cnn(conn: sa.Connection, row: dict) -> int:
    """Insert a CNN row (preprocessing and source as JSON text); returns its cnn_id."""
    return conn.execute(
        sa.text(
            """INSERT INTO lungsql.cnn_models (name, model, sha256, input_name, input_size, output_name,
                                              feature_dim, preprocessing, source)
               VALUES (:name, :model, :sha256, :input_name, :input_size, :output_name, :feature_dim,
                       CAST(:preprocessing AS jsonb), CAST(:source AS jsonb))
               RETURNING cnn_id"""
        ),
        row,
    ).scalar_one()


def delete_cnn(conn: sa.Connection, cnn_id: int) -> None:
    """Delete a CNN; its features and featurization runs go with it (ON DELETE CASCADE)."""
    conn.execute(sa.text("DELETE FROM lungsql.cnn_models WHERE cnn_id = :id"), {"id": cnn_id})
