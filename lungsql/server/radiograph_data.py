"""The radiograph task's data access inside PostgreSQL, through plpy: PlpyData's statements and
those of lungsql.radiographs, lungsql.image_labels, lungsql.image_features and the boosters of a
multi-label model. Every value is bound; nothing is formatted into SQL."""

from __future__ import annotations

import hashlib
from typing import Any, Sequence

import numpy as np

from lungsql.errors import IntegrityError
from lungsql.server.plpy_data import PlpyData


class RadiographData(PlpyData):
    # -- featurization ---------------------------------------------------------
    def radiographs_to_featurize(self, cnn_id: int, only_missing: bool, retry_failed: bool = False) -> list[int]:
        rows = self._run(
            """SELECT r.image_id FROM lungsql.radiographs r
               WHERE NOT ($2 AND EXISTS (SELECT 1 FROM lungsql.image_features f
                                          WHERE f.image_id = r.image_id AND f.cnn_id = $1))
                 AND NOT (NOT $3 AND EXISTS (SELECT 1 FROM lungsql.image_feature_failures ff
                                              WHERE ff.image_id = r.image_id AND ff.cnn_id = $1
                                                AND ff.failed_at >= r.ingested_at))
               ORDER BY r.image_id""",
            ["integer", "boolean", "boolean"], [cnn_id, only_missing, retry_failed])
        return [int(r["image_id"]) for r in rows]

    def failed_radiographs(self, cnn_id: int) -> list[int]:
        rows = self._run("SELECT image_id FROM lungsql.image_feature_failures WHERE cnn_id = $1", ["integer"], [cnn_id])
        return [int(r["image_id"]) for r in rows]

    def radiograph_files(self, image_ids: Sequence[int]) -> list[dict[str, Any]]:
        """(image_id, data, format, sha256) of the radiographs, in the order asked."""
        rows = self._run("SELECT image_id, data, format, sha256 FROM lungsql.radiographs WHERE image_id = ANY($1)",
                         ["bigint[]"], [list(image_ids)])
        by_id = {int(r["image_id"]): dict(r) for r in rows}
        return [by_id[i] for i in image_ids if i in by_id]

    def write_image_features(self, image_id: int, cnn_id: int, vector: np.ndarray, run_id: int) -> None:
        data = np.ascontiguousarray(vector, dtype="<f4").tobytes()
        self._run(
            """INSERT INTO lungsql.image_features (image_id, cnn_id, dim, data, sha256, run_id)
               VALUES ($1, $2, $3, $4, $5, $6)
               ON CONFLICT (image_id, cnn_id) DO UPDATE SET dim = EXCLUDED.dim, data = EXCLUDED.data,
                   sha256 = EXCLUDED.sha256, run_id = EXCLUDED.run_id, created_at = now()""",
            ["bigint", "integer", "integer", "bytea", "text", "bigint"],
            [image_id, cnn_id, int(np.size(vector)), data, hashlib.sha256(data).hexdigest(), run_id])
        self._run("DELETE FROM lungsql.image_feature_failures WHERE image_id = $1 AND cnn_id = $2",
                  ["bigint", "integer"], [image_id, cnn_id])

    def record_image_failure(self, image_id: int, cnn_id: int, run_id: int, reason: str) -> None:
        self._run(
            """INSERT INTO lungsql.image_feature_failures (image_id, cnn_id, run_id, reason) VALUES ($1, $2, $3, $4)
               ON CONFLICT (image_id, cnn_id) DO UPDATE
               SET run_id = EXCLUDED.run_id, reason = EXCLUDED.reason, failed_at = now()""",
            ["bigint", "integer", "bigint", "text"], [image_id, cnn_id, run_id, reason.replace("\x00", "")])

    # -- training ----------------------------------------------------------------
    def labelled_image_features(self, cnn_id: int, task: str) -> list[dict[str, Any]]:
        """The featurized radiographs that have labels: image_id, patient_id, findings, split, and the
        features (data, dim, sha256)."""
        rows = self._run(
            """SELECT r.image_id, r.patient_id, l.findings, l.split, f.data, f.dim, f.sha256
               FROM lungsql.radiographs r
               JOIN lungsql.image_labels l ON l.image_index = r.image_index AND l.task = $2
               JOIN lungsql.image_features f ON f.image_id = r.image_id AND f.cnn_id = $1
               ORDER BY r.image_id""",
            ["integer", "text"], [cnn_id, task])
        return [dict(r) for r in rows]

    def insert_boosters(self, model_id: int, boosters: Sequence[Any]) -> None:
        for b in boosters:
            self._run("INSERT INTO lungsql.model_boosters (model_id, finding, model_text, sha256) "
                      "VALUES ($1, $2, $3, $4)", ["integer", "text", "text", "text"],
                      [model_id, b.finding, b.model_text, b.sha256])

    def model_boosters(self, model_id: int) -> tuple[str, dict[str, tuple[str, str]]]:
        """(the manifest, {finding: (booster text, SHA-256)}) of a multi-label model."""
        manifest = self._run("SELECT model_text FROM lungsql.models WHERE model_id = $1", ["integer"], [model_id])
        rows = self._run("SELECT finding, model_text, sha256 FROM lungsql.model_boosters WHERE model_id = $1",
                         ["integer"], [model_id])
        return (manifest[0]["model_text"] if manifest else "",
                {r["finding"]: (r["model_text"], r["sha256"]) for r in rows})

    # -- scoring -------------------------------------------------------------------
    def image_vectors(self, image_ids: Sequence[int], cnn_id: int) -> dict[int, np.ndarray]:
        """The stored features of the radiographs that have them, each checked against its SHA-256."""
        rows = self._run("SELECT image_id, data, dim, sha256 FROM lungsql.image_features "
                         "WHERE cnn_id = $2 AND image_id = ANY($1)", ["bigint[]", "integer"],
                         [list(image_ids), cnn_id])
        return {int(r["image_id"]): image_vector(r) for r in rows}

    def existing_radiographs(self, image_ids: Sequence[int]) -> set[int]:
        rows = self._run("SELECT image_id FROM lungsql.radiographs WHERE image_id = ANY($1)", ["bigint[]"],
                         [list(image_ids)])
        return {int(r["image_id"]) for r in rows}

    def record_finding_predictions(self, model_id: int, rows: Sequence[tuple[int, str, float]]) -> None:
        if rows:
            self._run(
                """INSERT INTO lungsql.finding_predictions (image_id, model_id, finding, probability)
                   SELECT unnest($1::bigint[]), $2, unnest($3::text[]), unnest($4::double precision[])""",
                ["bigint[]", "integer", "text[]", "double precision[]"],
                [[r[0] for r in rows], model_id, [r[1] for r in rows], [r[2] for r in rows]])


def image_vector(row: dict[str, Any]) -> np.ndarray:
    """A stored image feature vector, once its bytes match their SHA-256."""
    data = bytes(row["data"])
    if hashlib.sha256(data).hexdigest() != row["sha256"] or len(data) != 4 * int(row["dim"]):
        raise IntegrityError(f"the features of radiograph {row.get('image_id')} do not match their SHA-256: "
                             "they were altered; nothing was scored",
                             hint="featurize it again: CALL lungsql.generate_features(task => 'chest_xray14', "
                                  "only_missing => false)")
    return np.frombuffer(data, dtype="<f4").astype(np.float32)
