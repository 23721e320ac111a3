"""The CLI's side of the stored procedures: call them as a DBA would, show their
NOTICE lines as progress, and turn their errors into LungSQLError.

On SQL Server the same calls go to lungsql.client.dialects.mssql (EXEC dbo.GenerateFeatures ...),
whose PRINT lines have the same form as PostgreSQL's NOTICE lines."""

from __future__ import annotations

import contextlib
import json
import re
import sys
from typing import Any, Callable, Iterator

import sqlalchemy as sa

from lungsql.client.db import driver_connection
from lungsql.client import database_errors
from lungsql.errors import ConfigurationError, LungSQLError

_PROGRESS = re.compile(r"^(\d+)/(\d+) (?:patients|radiographs)")


@contextlib.contextmanager
def session(engine: sa.Engine, on_notice: Callable[[str], None] | None = None,
            autocommit: bool = False) -> Iterator[Any]:
    """A psycopg connection whose NOTICE lines go to `on_notice` and whose errors say what to do."""
    with engine.connect() as conn:
        pg = driver_connection(conn)
        if autocommit:
            conn.commit()
            pg.autocommit = True
        handler = (lambda diag: on_notice(diag.message_primary or "")) if on_notice else None
        if handler:
            pg.add_notice_handler(handler)
        try:
            yield pg
            if not autocommit:
                pg.commit()
        except sa.exc.DBAPIError as exc:
            raise _readable(exc.orig) from None
        except Exception as exc:
            if hasattr(exc, "diag"):
                raise _readable(exc) from None
            raise
        finally:
            if handler:
                pg.remove_notice_handler(handler)
            if autocommit:
                pg.autocommit = False


def _readable(exc) -> LungSQLError:
    return database_errors.read(exc).error()


def generate_features(engine: sa.Engine, cnn_name: str | None, only_missing: bool, shard: int,
                      shards: int, retry_failed: bool = False, task: str = "lung_cancer") -> None:
    from tqdm import tqdm

    unit = " patients" if task == "lung_cancer" else " images"
    bar = tqdm(desc="featurizing", unit=unit, file=sys.stderr, dynamic_ncols=True, disable=None)

    def notice(text: str) -> None:
        match = _PROGRESS.match(text)
        if match:
            bar.total = int(match.group(2))
            bar.n = int(match.group(1))
            bar.set_postfix_str(text.split(", ", 1)[1])
            bar.refresh()
        else:
            tqdm.write(text, file=sys.stderr)

    try:
        if _on_sql_server(engine):
            if task != "lung_cancer":
                raise ConfigurationError(f"the task {task!r} runs on PostgreSQL only, for now")
            _mssql().generate_features(engine, cnn_name, only_missing, shard, shards, notice,
                                       retry_failed=retry_failed)
            return
        with session(engine, notice, autocommit=True) as pg:
            pg.execute("CALL lungsql.generate_features(cnn_name => %s, only_missing => %s, shard => %s, "
                       "shards => %s, retry_failed => %s, task => %s)",
                       (cnn_name, only_missing, shard, shards, retry_failed, task))
    finally:
        bar.close()


def train_model(engine: sa.Engine, model_name: str, params: str, cnn_name: str | None) -> tuple[int, dict]:
    if _on_sql_server(engine):
        return _mssql().train_model(engine, model_name, params, cnn_name, lambda text: print(text, file=sys.stderr))
    with session(engine, lambda text: print(text, file=sys.stderr)) as pg:
        model_id, metrics = pg.execute(
            "SELECT * FROM lungsql.train_model(model_name => %s, params => %s::jsonb, cnn_name => %s)",
            (model_name, params, cnn_name)).fetchone()
    return model_id, metrics if isinstance(metrics, dict) else json.loads(metrics)


def train_findings(engine: sa.Engine, model_name: str, params: str, cnn_name: str | None) -> list[tuple]:
    """SELECT * FROM lungsql.train_findings(...): (model_id, finding, auc, positives, negatives) rows."""
    if _on_sql_server(engine):
        raise ConfigurationError("the chest_xray14 task runs on PostgreSQL only, for now")
    with session(engine, lambda text: print(text, file=sys.stderr)) as pg:
        return pg.execute("SELECT * FROM lungsql.train_findings(model_name => %s, params => %s::jsonb, "
                          "cnn_name => %s)", (model_name, params, cnn_name)).fetchall()


def predict_findings(engine: sa.Engine, image_ids: list[int], model_name: str | None) -> list[tuple]:
    if _on_sql_server(engine):
        raise ConfigurationError("the chest_xray14 task runs on PostgreSQL only, for now")
    with session(engine) as pg:
        return pg.execute("SELECT image_id, finding, probability FROM lungsql.predict_findings_batch(%s, %s)",
                          (image_ids, model_name)).fetchall()


def predict(engine: sa.Engine, patient_ids: list[str], model_name: str | None) -> list[tuple[str, float]]:
    if _on_sql_server(engine):
        return _mssql().predict(engine, patient_ids, model_name)
    with session(engine) as pg:
        return pg.execute(
            "SELECT patient_id, probability FROM lungsql.predict_lung_cancer_batch(%s, %s)",
            (patient_ids, model_name)).fetchall()


def deploy(engine: sa.Engine, model_name: str, strategy: str) -> int:
    if _on_sql_server(engine):
        return _mssql().deploy(engine, model_name, strategy)
    with session(engine) as pg:
        return pg.execute("SELECT lungsql.deploy(%s, %s)", (model_name, strategy)).fetchone()[0]


def deploy_ensemble(engine: sa.Engine, name: str, model_ids: list[int], method: str,
                    weights: list[float] | None) -> tuple[int, dict]:
    """SELECT lungsql.deploy_ensemble(...); (the ensemble's model id, its metrics)."""
    if _on_sql_server(engine):
        raise ConfigurationError("ensembles run on PostgreSQL only so far",
                                 hint="deploy single models on SQL Server: EXEC dbo.DeployLungCancerModel")
    with session(engine, lambda text: print(text, file=sys.stderr)) as pg:
        model_id = pg.execute("SELECT lungsql.deploy_ensemble(%s, %s, %s, %s)",
                              (name, model_ids, method, weights)).fetchone()[0]
        metrics = pg.execute("SELECT metrics FROM lungsql.models WHERE model_id = %s", (model_id,)).fetchone()[0]
    return model_id, metrics if isinstance(metrics, dict) else json.loads(metrics)


def model_comparison(engine: sa.Engine) -> list[tuple]:
    """The rows of lungsql.model_comparison, models sharing a split together, the best AUC first."""
    with session(engine) as pg:
        return pg.execute(
            "SELECT model_id, name, version, coalesce(cnn_name, 'ensemble'), valid_patients, auc, log_loss, brier, "
            "coalesce(split, '-'), coalesce(array_to_string(deployed_as, ', '), '') FROM lungsql.model_comparison "
            "ORDER BY split NULLS LAST, auc DESC NULLS LAST, model_id").fetchall()


def _on_sql_server(engine: sa.Engine) -> bool:
    return engine.dialect.name == "mssql"


def _mssql():
    from lungsql.client.dialects import mssql

    return mssql


def metric_rows(metrics: dict) -> list[tuple[str, str]]:
    rows = []
    for key in ("auc", "log_loss", "brier", "sensitivity", "specificity", "best_iteration",
                "train_patients", "valid_patients", "seconds"):
        if key in metrics:
            value = metrics[key]
            rows.append((key, f"{value:.4f}" if isinstance(value, float) else str(value)))
    return rows
