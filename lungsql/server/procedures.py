"""Entry points of the PL/Python stored procedures.

Every PL/Python body in sql/postgres/functions is a thin shell that calls one
function here with `plpy`. These functions turn arguments into calls of the
lungsql modules that hold the science, and errors into `plpy.error` with a
hint, so a DBA reads in psql what is wrong and what to do.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

from lungsql.server import environment
from lungsql.errors import LungSQLError


def procedure(func: Callable[..., Any]) -> Callable[..., Any]:
    """Render a LungSQLError as a PostgreSQL error with its hint."""

    @functools.wraps(func)
    def wrapper(plpy, *args, **kwargs):
        try:
            return func(plpy, *args, **kwargs)
        except LungSQLError as exc:
            if exc.hint:
                plpy.error(f"lungsql: {exc.message}", hint=exc.hint)
            plpy.error(f"lungsql: {exc.message}")  # no HINT line rather than 'HINT:  None'

    return wrapper


@procedure
def check_environment(plpy) -> list[tuple[str, str | None, str | None]]:
    components = environment.inspect_components()
    problem = environment.missing_message(components)
    if problem is not None:
        message, hint = problem
        raise LungSQLError(message, hint=hint)
    return [(c.name, c.version, c.location) for c in components]


@procedure
def generate_features(plpy, cnn_name, only_missing, shard, shards, retry_failed=False, task=None) -> None:
    from lungsql.ml import tasks
    from lungsql.server import pipeline

    if tasks.get(task).study_shape == "image":
        from lungsql.server import radiographs
        from lungsql.server.radiograph_data import RadiographData

        run = radiographs.generate_features(RadiographData(plpy), cnn_name, bool(only_missing), int(shard),
                                            int(shards), retry_failed=bool(retry_failed))
    else:
        from lungsql.server.plpy_data import PlpyData

        run = pipeline.generate_features(PlpyData(plpy), cnn_name, bool(only_missing), int(shard), int(shards),
                                         retry_failed=bool(retry_failed))
    plpy.notice(run.describe())


@procedure
def train_findings(plpy, model_name, params, cnn_name) -> list[tuple]:
    from lungsql.server import pipeline, radiographs
    from lungsql.server.radiograph_data import RadiographData

    model_id, metrics = radiographs.train(RadiographData(plpy), model_name, pipeline.parse_params(params), cnn_name)
    rows = [(model_id, finding, m.get("auc"), m["positives"], m["negatives"])
            for finding, m in metrics["per_finding"].items()]
    return rows + [(model_id, "mean", metrics["mean_auc"], None, None)]


@procedure
def predict_findings(plpy, image_ids, model_name) -> list[tuple]:
    """lungsql.predict_findings_batch: (image_id, finding, probability, model_id) rows."""
    from lungsql.server import radiographs
    from lungsql.server.radiograph_data import RadiographData

    if image_ids is None:
        return []
    scored = radiographs.predict(RadiographData(plpy), [int(i) for i in image_ids if i is not None], model_name)
    return [(i, f, p, scored.model_id) for i, f, p in scored.rows]


@procedure
def predict_findings_of_one(plpy, image_id, model_name) -> list[tuple]:
    """lungsql.predict_findings: (finding, probability, model_id), the most probable first."""
    rows = predict_findings.__wrapped__(plpy, [image_id] if image_id is not None else None, model_name)
    return sorted(((f, p, m) for _, f, p, m in rows), key=lambda r: -r[1])


@procedure
def train_model(plpy, model_name, params, cnn_name) -> list[tuple[int, str]]:
    import json

    from lungsql.server import pipeline
    from lungsql.server.plpy_data import PlpyData

    parsed = pipeline.parse_params(params)
    model_id, metrics = pipeline.train_model(PlpyData(plpy), model_name, parsed, cnn_name)
    return [(model_id, json.dumps(metrics))]


@procedure
def deploy(plpy, model_name, strategy) -> int:
    from lungsql.server import pipeline
    from lungsql.server.plpy_data import PlpyData

    return pipeline.deploy(PlpyData(plpy), model_name, strategy)


@procedure
def predict_one(plpy, patient_id, model_name) -> float | None:
    from lungsql.server import pipeline
    from lungsql.server.plpy_data import PlpyData

    if patient_id is None:
        return None
    return next(pipeline.predict(PlpyData(plpy), [patient_id], model_name))[1]


@procedure
def warm_up(plpy, model_name) -> int | None:
    from lungsql.server import pipeline
    from lungsql.server.plpy_data import PlpyData

    return pipeline.warm_up(PlpyData(plpy), model_name)


@procedure
def predict_detail(plpy, patient_id, model_name) -> list[tuple]:
    import json

    from lungsql.server import pipeline
    from lungsql.server.plpy_data import PlpyData

    if patient_id is None:
        return []
    scores = pipeline.score(PlpyData(plpy), [patient_id], model_name)
    m = scores.model
    auc = json.loads(m["metrics"]).get("auc")
    return [(scores.results[0][1], m["model_id"], m["name"], m["version"], m["trained_at"], auc,
             m["deployment_name"], m["strategy"], m["deployed_at"])]


@procedure
def explain_prediction(plpy, patient_id, model_name) -> list[tuple]:
    """Rows of lungsql.explain_prediction: each group of slices, then what belongs to the patient."""
    from lungsql.server import pipeline
    from lungsql.server.plpy_data import PlpyData

    if patient_id is None:
        return []
    e = pipeline.explain(PlpyData(plpy), patient_id, model_name)
    rows = [("group", rank, g.group, g.slices.start, g.slices.stop - 1, g.z[0], g.z[1], g.scan_ids, g.contribution,
             e.probability, e.model["model_id"], e.series_instance_uid) for rank, g in enumerate(e.groups, start=1)]
    rows += [(part, None, None, None, None, None, None, None, value, e.probability, e.model["model_id"],
              e.series_instance_uid) for part, value in [*e.patient.items(), ("bias", e.bias)]]
    return rows


@procedure
def slice_heatmap(plpy, patient_id, scan_id, model_name) -> list[tuple]:
    from lungsql.server import pipeline
    from lungsql.server.plpy_data import PlpyData

    if patient_id is None or scan_id is None:
        return []
    h = pipeline.slice_heatmap(PlpyData(plpy), patient_id, int(scan_id), model_name)
    return [(h.rows, h.columns, h.heat, h.group, h.contribution, h.model_id, h.method)]


@procedure
def deploy_ensemble(plpy, name, model_ids, method, weights) -> int:
    from lungsql.server import pipeline
    from lungsql.server.plpy_data import PlpyData

    model_id, _ = pipeline.deploy_ensemble(PlpyData(plpy), name, list(model_ids or []), method,
                                           None if weights is None else list(weights))
    return model_id


@procedure
def predict_many(plpy, patient_ids, model_name) -> list[tuple[str, float]]:
    from lungsql.server import pipeline
    from lungsql.server.plpy_data import PlpyData

    ids = list(dict.fromkeys(p for p in (patient_ids or []) if p is not None))
    return list(pipeline.predict(PlpyData(plpy), ids, model_name))


# -- the web app's boundary (sql/postgres/functions/020_web.sql) ------------------------------------


@procedure
def slice_image(plpy, scan_id, window_low, window_high) -> list[tuple[int, int, bytes]]:
    """lungsql.slice_image: one stored slice's first frame through the window, as rows x columns uint8 bytes.
    The DICOM file is decoded here, in the server (lungsql.dicom.slice_hu, under the decoding limits)."""
    import numpy as np

    from lungsql import dicom
    from lungsql.ml import preprocess
    from lungsql.errors import ConfigurationError, InvalidScan

    if scan_id is None:
        return []
    if window_low is None or window_high is None or not window_low < window_high:
        raise ConfigurationError(f"the window needs window_low below window_high, not {window_low} to {window_high}",
                                 hint="e.g. lungsql.slice_image(scan_id, -1000, 400), the lung window")
    from lungsql.server.plpy_data import PlpyData

    data = PlpyData(plpy).scan_dicom(int(scan_id))
    if data is None:
        return []
    hu = dicom.slice_hu(data)
    if hu.ndim != 2:
        raise InvalidScan(f"not a greyscale slice: its pixels have the shape {hu.shape}")
    image = np.ascontiguousarray(preprocess.window(hu, float(window_low), float(window_high), dtype=np.uint8))
    return [(int(image.shape[0]), int(image.shape[1]), image.tobytes())]


@procedure
def sign_in(plpy, username, password, address, max_failures, max_failures_per_user, max_failures_per_address,
            window_s, base_delay_s) -> list[tuple]:
    """lungsql.sign_in: one throttled, audited sign-in attempt (lungsql.sign_in)."""
    from lungsql.server import sign_in as signing

    limits = signing.Limits(max_failures=max_failures, max_failures_per_user=max_failures_per_user,
                            max_failures_per_address=max_failures_per_address, window_s=window_s,
                            base_delay_s=base_delay_s)
    return [signing.sign_in(signing.PlpySignIns(plpy), username, password, address, limits).row()]


@procedure
def radiograph_image(plpy, image_id, level, width, max_side) -> list[tuple[int, int, bytes]]:
    """lungsql.radiograph_image: one stored radiograph as displayed, through the window, as uint8 bytes."""
    from lungsql.server import radiographs
    from lungsql.server.radiograph_data import RadiographData

    if image_id is None:
        return []
    found = radiographs.render(RadiographData(plpy), int(image_id), level, width, int(max_side or 1024))
    return [found] if found is not None else []


@procedure
def radiograph_heatmap(plpy, image_id, finding, model_name) -> list[tuple]:
    from lungsql.server import radiographs
    from lungsql.server.radiograph_data import RadiographData

    if image_id is None:
        return []
    h = radiographs.heatmap(RadiographData(plpy), int(image_id), finding, model_name)
    return [] if h is None else [(h.rows, h.columns, h.heat, h.finding, h.probability, h.model_id, h.method)]
