"""Entry points of the PL/Python stored procedures.

Every PL/Python body in sql/postgres/functions is a thin shell that calls one
function here with `plpy`. These functions turn arguments into calls of the
lungsql modules that hold the science, and errors into `plpy.error` with a
hint, so a DBA reads in psql what is wrong and what to do.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

from lungsql import environment
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
def generate_features(plpy, cnn_name, only_missing, shard, shards) -> None:
    from lungsql import pipeline
    from lungsql.dataaccess.plpy import PlpyData

    run = pipeline.generate_features(PlpyData(plpy), cnn_name, bool(only_missing), int(shard), int(shards))
    plpy.notice(f"done: {run.patients} patients, {run.slices} slices in {run.seconds:.1f} s "
                f"({run.slices_per_s:.0f} slices/s) on {run.provider}, run {run.run_id}")


@procedure
def train_model(plpy, model_name, params, cnn_name) -> list[tuple[int, str]]:
    import json

    from lungsql import pipeline
    from lungsql.dataaccess.plpy import PlpyData

    parsed = pipeline.parse_params(params)
    model_id, metrics = pipeline.train_model(PlpyData(plpy), model_name, parsed, cnn_name)
    return [(model_id, json.dumps(metrics))]


@procedure
def deploy(plpy, model_name, strategy) -> int:
    from lungsql import pipeline
    from lungsql.dataaccess.plpy import PlpyData

    return pipeline.deploy(PlpyData(plpy), model_name, strategy)


@procedure
def predict_one(plpy, patient_id, model_name) -> float | None:
    from lungsql import pipeline
    from lungsql.dataaccess.plpy import PlpyData

    if patient_id is None:
        return None
    return next(pipeline.predict(PlpyData(plpy), [patient_id], model_name))[1]


@procedure
def warm_up(plpy, model_name) -> int | None:
    from lungsql import pipeline
    from lungsql.dataaccess.plpy import PlpyData

    return pipeline.warm_up(PlpyData(plpy), model_name)


@procedure
def predict_detail(plpy, patient_id, model_name) -> list[tuple]:
    import json

    from lungsql import pipeline
    from lungsql.dataaccess.plpy import PlpyData

    if patient_id is None:
        return []
    scores = pipeline.score(PlpyData(plpy), [patient_id], model_name)
    m = scores.model
    auc = json.loads(m["metrics"]).get("auc")
    return [(scores.results[0][1], m["model_id"], m["name"], m["version"], m["trained_at"], auc,
             m["deployment_name"], m["strategy"], m["deployed_at"])]


@procedure
def predict_many(plpy, patient_ids, model_name) -> list[tuple[str, float]]:
    from lungsql import pipeline
    from lungsql.dataaccess.plpy import PlpyData

    ids = list(dict.fromkeys(p for p in (patient_ids or []) if p is not None))
    return list(pipeline.predict(PlpyData(plpy), ids, model_name))
