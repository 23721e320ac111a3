"""The pipeline's data access inside PostgreSQL, through plpy.

Statements are prepared once per server process and every value is bound:
nothing is formatted into SQL. Reads go through plpy in the backend itself:
no connection back to the database and no credentials in the server.
"""

from __future__ import annotations

import json
from typing import Any, Sequence

from lungsql.errors import ConfigurationError, LungSQLError
from lungsql.dicom.series import SUMMARY_COLUMNS, SeriesInfo, summarize_series
from lungsql.ml.features import GroupFeatures

_PLANS: dict[str, Any] = {}
SCANS_PER_FETCH = 4
#: What the malloc of a backend that featurizes keeps (`keep_freed_memory`): allocations up to this
#: size come from its heap, and up to `HEAP_KEPT` of free heap is not given back to the kernel.
HEAP_ALLOCATION_MAX, HEAP_KEPT = 32 << 20, 256 << 20
_heap_kept = False


class PlpyData:
    def __init__(self, plpy):
        self.plpy = plpy

    def _run(self, sql: str, types: Sequence[str] = (), args: Sequence[Any] = ()):
        plan = _PLANS.get(sql)
        if plan is None:
            plan = _PLANS[sql] = self.plpy.prepare(sql, list(types))
        return self.plpy.execute(plan, list(args))

    def commit(self) -> None:
        try:
            self.plpy.commit()
        except self.plpy.SPIError as exc:
            if "invalid transaction termination" in str(exc):
                raise LungSQLError(
                    "generate_features commits each patient, so it cannot run inside a transaction block",
                    hint="run CALL lungsql.generate_features(...) on its own, outside BEGIN ... COMMIT",
                ) from None
            raise

    def notice(self, text: str) -> None:
        self.plpy.notice(text)

    # -- CNNs and features ---------------------------------------------------
    def cnn_model(self, name: str | None) -> dict[str, Any]:
        if name is None:
            rows = self._run("SELECT * FROM lungsql.cnn_models ORDER BY created_at DESC, cnn_id DESC LIMIT 1")
        else:
            rows = self._run("SELECT * FROM lungsql.cnn_models WHERE name = $1", ["text"], [name])
        if not rows:
            raise ConfigurationError(
                "no CNN is stored" if name is None else f"no CNN named {name!r}",
                hint="import one: lungsql model import --builtin efficientnet-lite0",
            )
        return dict(rows[0])

    def patients_to_featurize(self, cnn_id: int, only_missing: bool, retry_failed: bool = False) -> list[str]:
        # A patient that failed is left out unless retry_failed, or unless a scan arrived after it failed.
        rows = self._run(
            """SELECT p.patient_id FROM lungsql.patients p
               WHERE EXISTS (SELECT 1 FROM lungsql.scans s WHERE s.patient_id = p.patient_id)
                 AND NOT ($2 AND EXISTS (SELECT 1 FROM lungsql.features f
                                          WHERE f.patient_id = p.patient_id AND f.cnn_id = $1))
                 AND NOT (NOT $3 AND EXISTS (
                         SELECT 1 FROM lungsql.feature_failures ff
                         WHERE ff.patient_id = p.patient_id AND ff.cnn_id = $1
                           AND ff.failed_at >= (SELECT max(s.ingested_at) FROM lungsql.scans s
                                                WHERE s.patient_id = p.patient_id)))
               ORDER BY p.patient_id""",
            ["integer", "boolean", "boolean"], [cnn_id, only_missing, retry_failed],
        )
        return [r["patient_id"] for r in rows]

    def failed_patients(self, cnn_id: int) -> list[str]:
        rows = self._run("SELECT patient_id FROM lungsql.feature_failures WHERE cnn_id = $1 ORDER BY patient_id",
                         ["integer"], [cnn_id])
        return [r["patient_id"] for r in rows]

    def mark_killed_runs(self) -> list[int]:
        # A run is alive while the backend that started it is: same pid, same start time.
        rows = self._run(
            """UPDATE lungsql.feature_runs r SET status = 'killed'
               WHERE r.status = 'running' AND NOT EXISTS (
                   SELECT 1 FROM pg_stat_activity a
                   WHERE a.pid = r.backend_pid AND a.backend_start = r.backend_start)
               RETURNING r.run_id""")
        return sorted(r["run_id"] for r in rows)

    def record_feature_failure(self, patient_id: str, cnn_id: int, run_id: int, reason: str) -> None:
        self._run(
            """INSERT INTO lungsql.feature_failures (patient_id, cnn_id, run_id, reason) VALUES ($1, $2, $3, $4)
               ON CONFLICT (patient_id, cnn_id) DO UPDATE
               SET run_id = EXCLUDED.run_id, reason = EXCLUDED.reason, failed_at = now()""",
            ["text", "integer", "bigint", "text"], [patient_id, cnn_id, run_id, reason.replace("\x00", "")])

    def scan_dicom(self, scan_id: int) -> bytes | None:
        """One stored DICOM file (for lungsql.slice_image), or None."""
        rows = self._run("SELECT dicom FROM lungsql.scans WHERE scan_id = $1", ["bigint"], [scan_id])
        return bytes(rows[0]["dicom"]) if rows else None

    def patient_series(self, patient_id: str) -> tuple[list[SeriesInfo], str | None, str | None]:
        """The patient's series as the rule sees them (no pixel data read), and a DBA's choice."""
        rows = self._run(f"SELECT {', '.join(SUMMARY_COLUMNS)} FROM lungsql.scans WHERE patient_id = $1",
                         ["text"], [patient_id])
        chosen = self._run("SELECT series_instance_uid, chosen_by FROM lungsql.series_choices WHERE patient_id = $1",
                           ["text"], [patient_id])
        override = (chosen[0]["series_instance_uid"], chosen[0]["chosen_by"]) if chosen else (None, None)
        return summarize_series(rows), *override

    def series_scans(self, patient_id: str, series_instance_uid: str) -> list[tuple]:
        """(DICOM bytes, z, frame_z) of one series of the patient: the files featurization reads."""
        # A few files per fetch: PL/Python holds the GIL while the server reads, and
        # the CNN threads need it for a moment between batches (lungsql.ml.featurize).
        sql = ("SELECT dicom, z_position, frame_z FROM lungsql.scans "
               "WHERE patient_id = $1 AND series_instance_uid = $2 ORDER BY scan_id")
        plan = _PLANS.get(sql)
        if plan is None:
            plan = _PLANS[sql] = self.plpy.prepare(sql, ["text", "text"])
        cursor = self.plpy.cursor(plan, [patient_id, series_instance_uid])
        scans = []
        while True:
            rows = cursor.fetch(SCANS_PER_FETCH)
            if not rows:
                break
            scans.extend((r["dicom"], r["z_position"], r["frame_z"]) for r in rows)
        cursor.close()
        return scans

    def series_slices(self, patient_id: str, series_instance_uid: str) -> list[tuple[int, float, Any]]:
        """(scan_id, z, frame_z) of a series' files, in the order `series_scans` reads them."""
        rows = self._run("SELECT scan_id, z_position, frame_z FROM lungsql.scans "
                         "WHERE patient_id = $1 AND series_instance_uid = $2 ORDER BY scan_id",
                         ["text", "text"], [patient_id, series_instance_uid])
        return [(r["scan_id"], r["z_position"], r["frame_z"]) for r in rows]

    def cnn_by_id(self, cnn_id: int) -> dict[str, Any]:
        rows = self._run("SELECT * FROM lungsql.cnn_models WHERE cnn_id = $1", ["integer"], [cnn_id])
        if not rows:
            raise ConfigurationError(f"no CNN with cnn_id {cnn_id}")
        return dict(rows[0])

    def cnn_preprocessing(self, cnn_id: int) -> dict[str, Any]:
        rows = self._run("SELECT preprocessing FROM lungsql.cnn_models WHERE cnn_id = $1", ["integer"], [cnn_id])
        if not rows:
            raise ConfigurationError(f"no CNN with cnn_id {cnn_id}")
        return rows[0]["preprocessing"]

    def start_feature_run(self, cnn_id: int, provider: str, shard: int, shards: int, task: str = "lung_cancer") -> int:
        keep_freed_memory()  # this backend featurizes: before the run starts its threads
        return self._run(
            "INSERT INTO lungsql.feature_runs (cnn_id, provider, shard, shards, task, backend_pid, backend_start) "
            "SELECT $1, $2, $3, $4, $5, pg_backend_pid(), "
            "       (SELECT backend_start FROM pg_stat_activity WHERE pid = pg_backend_pid()) "
            "RETURNING run_id",
            ["integer", "text", "integer", "integer", "text"], [cnn_id, provider, shard, shards, task],
        )[0]["run_id"]

    def write_features(self, patient_id: str, cnn_id: int, features: GroupFeatures, run_id: int,
                       choice) -> None:
        """The patient's features, with the series they come from (a lungsql.dicom.series.Choice)."""
        n_groups, dim = features.shape
        data = features.to_bytes()
        self._run(
            """INSERT INTO lungsql.features (patient_id, cnn_id, n_slices, n_groups, dim, data, sha256, run_id,
                                             series_instance_uid, series_reason)
               VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)
               ON CONFLICT (patient_id, cnn_id) DO UPDATE SET n_slices = EXCLUDED.n_slices,
                   n_groups = EXCLUDED.n_groups, dim = EXCLUDED.dim, data = EXCLUDED.data,
                   sha256 = EXCLUDED.sha256, run_id = EXCLUDED.run_id, created_at = now(),
                   series_instance_uid = EXCLUDED.series_instance_uid, series_reason = EXCLUDED.series_reason""",
            ["text", "integer", "integer", "integer", "integer", "bytea", "text", "bigint", "text", "text"],
            [patient_id, cnn_id, features.n_slices, n_groups, dim, data, features.sha256, run_id,
             choice.series_instance_uid, choice.reason],
        )
        self._run("DELETE FROM lungsql.feature_failures WHERE patient_id = $1 AND cnn_id = $2",
                  ["text", "integer"], [patient_id, cnn_id])

    def update_feature_run(self, run_id: int, patients: int, slices: int, seconds: float,
                           cpu_seconds: dict[str, float], finished: bool, failed: int = 0) -> None:
        self._run(
            """UPDATE lungsql.feature_runs SET patients = $2, slices = $3, seconds = $4, cpu_seconds = $5,
                      finished_at = CASE WHEN $6 THEN now() END, failed = $7,
                      status = CASE WHEN $6 THEN 'finished' ELSE 'running' END
               WHERE run_id = $1""",
            ["bigint", "integer", "integer", "double precision", "jsonb", "boolean", "integer"],
            [run_id, patients, slices, seconds, json.dumps({k: round(v, 4) for k, v in cpu_seconds.items()}),
             finished, failed],
        )

    # -- models and the registry ------------------------------------------------
    def lock_model_name(self, name: str) -> None:
        # Held until this transaction ends: train_model and deploy of one name take turns.
        self._run("SELECT pg_advisory_xact_lock(hashtextextended('lungsql.models:' || $1, 0))", ["text"], [name])

    def labelled_features(self, cnn_id: int) -> list[dict[str, Any]]:
        rows = self._run(
            """SELECT f.patient_id, p.label, p.age_years, p.sex, f.data, f.n_groups, f.dim, f.n_slices, f.sha256
               FROM lungsql.features f JOIN lungsql.patients p USING (patient_id)
               WHERE f.cnn_id = $1 AND p.label IS NOT NULL ORDER BY f.patient_id""",
            ["integer"], [cnn_id],
        )
        return [dict(r) for r in rows]

    def insert_model(self, row: dict[str, Any]) -> int:
        return self._run(
            """INSERT INTO lungsql.models (name, version, cnn_id, algorithm, feature_set, feature_names, params,
                                          model_text, sha256, metrics, task)
               VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11) RETURNING model_id""",
            ["text", "integer", "integer", "text", "text", "jsonb", "jsonb", "text", "text", "jsonb", "text"],
            [row["name"], row["version"], row["cnn_id"], row.get("algorithm", "lightgbm"), row["feature_set"],
             json.dumps(row["feature_names"]), json.dumps(row["params"]), row["model_text"], row["sha256"],
             json.dumps(row["metrics"]), row.get("task", "lung_cancer")],
        )[0]["model_id"]

    def model_rows(self, model_ids: Sequence[int]) -> list[dict[str, Any]]:
        rows = self._run("SELECT model_id, name, version, algorithm, cnn_id, sha256, metrics::text AS metrics "
                         "FROM lungsql.models WHERE model_id = ANY($1)", ["integer[]"], [list(model_ids)])
        return [dict(r) for r in rows]

    def labels(self, patient_ids: Sequence[str]) -> dict[str, int]:
        rows = self._run("SELECT patient_id, label FROM lungsql.patients WHERE patient_id = ANY($1) "
                         "AND label IS NOT NULL", ["text[]"], [list(patient_ids)])
        return {r["patient_id"]: int(r["label"]) for r in rows}

    def models(self, name: str) -> list[dict[str, Any]]:
        rows = self._run(
            "SELECT model_id, version, task, metrics::text AS metrics FROM lungsql.models WHERE name = $1 "
            "ORDER BY model_id", ["text"], [name])
        return [dict(r) for r in rows]

    def deployed(self, name: str | None, task: str = "lung_cancer") -> dict[str, Any] | None:
        """The model deployed as `name` (None: the latest deployment) for `task`."""
        rows = self._run(
            """SELECT m.model_id, m.sha256, m.cnn_id, m.algorithm, m.metrics::text AS metrics, m.name, m.version,
                      m.trained_at, m.task,
                      d.deployment_id, d.name AS deployment_name, d.strategy, d.deployed_at
               FROM lungsql.deployments d JOIN lungsql.models m USING (model_id)
               WHERE ($1::text IS NULL OR d.name = $1) AND m.task = $2
               ORDER BY d.deployment_id DESC LIMIT 1""",
            ["text", "text"], [name, task],
        )
        return dict(rows[0]) if rows else None

    def deployment_history(self, name: str) -> list[int]:
        rows = self._run(
            "SELECT model_id FROM lungsql.deployments WHERE name = $1 ORDER BY deployment_id DESC",
            ["text"], [name])
        return [r["model_id"] for r in rows]

    def insert_deployment(self, name: str, model_id: int, strategy: str) -> None:
        self._run("INSERT INTO lungsql.deployments (name, model_id, strategy) VALUES ($1, $2, $3)",
                  ["text", "integer", "text"], [name, model_id, strategy])

    def model_text(self, model_id: int) -> str:
        return self._run("SELECT model_text FROM lungsql.models WHERE model_id = $1",
                         ["integer"], [model_id])[0]["model_text"]

    # -- scoring ------------------------------------------------------------------
    def patient_features(self, patient_ids: Sequence[str], cnn_id: int) -> list[dict[str, Any]]:
        rows = self._run(
            """SELECT f.patient_id, p.age_years, p.sex, f.data, f.n_groups, f.dim, f.n_slices, f.sha256,
                      f.series_instance_uid
               FROM lungsql.features f JOIN lungsql.patients p USING (patient_id)
               WHERE f.cnn_id = $2 AND f.patient_id = ANY($1)""",
            ["text[]", "integer"], [list(patient_ids), cnn_id],
        )
        return [dict(r) for r in rows]

    def featurized_patients(self, cnn_id: int) -> list[str]:
        rows = self._run("SELECT patient_id FROM lungsql.features WHERE cnn_id = $1 ORDER BY patient_id",
                         ["integer"], [cnn_id])
        return [r["patient_id"] for r in rows]

    def record_predictions(self, model_id: int, rows: Sequence[tuple[str, float]]) -> None:
        if rows:
            self._run(
                """INSERT INTO lungsql.predictions (patient_id, model_id, probability)
                   SELECT unnest($1::text[]), $2, unnest($3::double precision[])""",
                ["text[]", "integer", "double precision[]"],
                [[p for p, _ in rows], model_id, [prob for _, prob in rows]],
            )


def keep_freed_memory() -> None:
    """Let this backend's malloc keep the memory featurization frees, for the next series.

    Featurization holds a series' files as Python bytes (0.5 MB a 512 x 512 slice) until the series
    is preprocessed, then frees them together, and each series' CNN input (12 MB for 60 slices) is
    made in a thread of its own and freed in another. glibc gives such memory back to the kernel (a
    free heap top above M_TRIM_THRESHOLD, a few MB by default; a thread's arena heap once it is
    empty), and the next series faults every page in again, zeroed by the kernel. Measured on a
    2-core machine, reading took 0.37 ms of CPU a slice against 0.31 with the memory kept, and
    preprocessing spent 0.05 to 0.09 ms a slice zeroing pages against 0.02.

    Once per process, as a feature run starts and before it starts its threads (a backend that
    only serves the web app or scoring is left as it is): large allocations stay on the heap
    up to HEAP_ALLOCATION_MAX (M_MMAP_THRESHOLD), up to HEAP_KEPT of free heap is kept
    (M_TRIM_THRESHOLD) until the backend exits, and the threads allocate from the main arena
    (M_ARENA_MAX 1; they allocate little but large blocks). Any other C library is left alone.
    """
    global _heap_kept
    if _heap_kept:
        return
    _heap_kept = True
    import ctypes

    try:
        libc = ctypes.CDLL(None)
        if not hasattr(libc, "gnu_get_libc_version"):
            return
        libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    except (OSError, AttributeError):
        return
    m_trim_threshold, m_mmap_threshold, m_arena_max = -1, -3, -8  # from glibc's malloc.h
    libc.mallopt(m_mmap_threshold, HEAP_ALLOCATION_MAX)
    libc.mallopt(m_trim_threshold, HEAP_KEPT)
    libc.mallopt(m_arena_max, 1)
