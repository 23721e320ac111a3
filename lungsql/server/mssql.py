"""What the T-SQL procedures of sql/mssql run inside SQL Server Machine Learning Services.

Each ``@script`` of sql/mssql/02_procedures.sql is a few lines that call one
function here with ``InputDataSet`` (a pandas DataFrame of the rows its
``@input_data_1`` query selects) and its ``@params`` values, and assign what the
function returns to ``OutputDataSet`` and to the OUTPUT parameters.  T-SQL does
every read and every write: nothing here connects to the database, so the
server's Python holds no credentials.  The science is lungsql.server.pipeline's, the
same code the PostgreSQL procedures run.

An error a DBA can act on (a LungSQLError: a tampered model, a bad argument)
comes back in the ``error`` OUTPUT parameter as "lungsql: message" and its
hint, and the procedure raises it with THROW; anything else is a bug and
surfaces as the external script's traceback.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import threading
from collections import OrderedDict
from typing import Any, Callable, NamedTuple, Sequence

import numpy as np

from lungsql import registry
from lungsql.ml import featurize, scoring
from lungsql.server import environment, pipeline
from lungsql.errors import ConfigurationError, LungSQLError


class Featurized(NamedTuple):
    error: str | None
    provider: str | None = None
    n_slices: int | None = None
    n_groups: int | None = None
    dim: int | None = None
    data: bytes | None = None
    sha256: str | None = None
    skipped: str | None = None  # why this patient cannot be featurized: recorded, and the run goes on
    series_instance_uid: str | None = None  # the series featurized (lungsql.dicom.series.choose_series)
    series_reason: str | None = None


class Trained(NamedTuple):
    error: str | None
    model_text: str | None = None
    model_sha256: str | None = None
    feature_set: str | None = None
    used_params: str | None = None
    metrics: str | None = None
    feature_names: str | None = None


class Predicted(NamedTuple):
    error: str | None
    probability: float | None = None


def error_text(exc: LungSQLError) -> str:
    """The message THROW raises in SSMS: what is wrong, then what to do."""
    return f"lungsql: {exc.message}" + (f"\nHint: {exc.hint}" if exc.hint else "")


def _reports_errors(failed: Callable[[str], Any]):
    """Return `failed(error text)` instead of raising a LungSQLError."""

    def decorate(func):
        @functools.wraps(func)
        def wrapper(*args, **kwargs):
            try:
                return func(*args, **kwargs)
            except LungSQLError as exc:
                return failed(error_text(exc))

        return wrapper

    return decorate


def _records(frame) -> list[dict[str, Any]]:
    """InputDataSet rows as dicts of plain Python values (SQL NULL as None)."""
    rows = frame.to_dict("records") if frame is not None else []
    return [{k: _plain(v) for k, v in row.items()} for row in rows]


def _plain(value: Any) -> Any:
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


def _frame(columns: Sequence[str], rows: Sequence[Sequence[Any]]):
    import pandas as pd

    return pd.DataFrame(list(rows), columns=list(columns))


# -- featurization ----------------------------------------------------------------
def patients_in_shard(candidates, shard: int, shards: int):
    """OutputDataSet: the candidate patient ids of this shard (pipeline.in_shard)."""
    ids = [r["patient_id"] for r in _records(candidates)]
    return _frame(["patient_id"], [(p,) for p in ids if pipeline.in_shard(p, int(shard), int(shards))])


_featurizers: OrderedDict[tuple, featurize.Featurizer] = OrderedDict()
_featurizers_lock = threading.Lock()


def _featurizer(cnn: dict[str, Any]) -> featurize.Featurizer:
    """pipeline.load_featurizer, kept per process while the CNN's bytes stay the same.

    The bytes are hashed on every call, so altered bytes are refused even when
    the process already holds a session of the genuine CNN.
    """
    key = (hashlib.sha256(cnn["model"]).hexdigest(), cnn["input_name"], cnn["output_name"],
           cnn["preprocessing"], str(cnn.get("source")))  # the source names the runtime
    with _featurizers_lock:
        found = _featurizers.get(key) if key[0] == cnn["sha256"] else None
    if found is None:
        found = pipeline.load_featurizer(cnn)  # checks the SHA-256 first
        with _featurizers_lock:
            _featurizers[key] = found
            while len(_featurizers) > 2:
                _featurizers.popitem(last=False)
    return found


@_reports_errors(lambda error: Featurized(error))
def featurize_patient(scans, cnn_name: str, cnn_model: bytes, cnn_sha256: str, input_name: str,
                      output_name: str, preprocessing: str, chosen_series: str | None = None,
                      chosen_by: str | None = None, cnn_source: str | None = None) -> Featurized:
    """CNN features of one patient's chosen series (lungsql.dicom.series), from its scans rows
    (dicom and the columns the choice reads; frame_z as JSON) and a DBA's choice, if any; the CNN's
    `source` (JSON) names the runtime a reduced-precision variant runs in (lungsql.ml.runtimes)."""
    cnn = {"name": cnn_name, "model": bytes(cnn_model), "sha256": str(cnn_sha256).strip(),
           "input_name": input_name, "output_name": output_name, "preprocessing": preprocessing,
           "source": _plain(cnn_source) or None}
    featurizer = _featurizer(cnn)
    rows = _records(scans)
    for row in rows:
        if isinstance(row.get("frame_z"), str):  # SQL Server keeps the frames' positions as a JSON array
            row["frame_z"] = json.loads(row["frame_z"])
    try:
        choice, volume = pipeline.choose_among_scans(rows, _plain(chosen_series) or None, _plain(chosen_by) or None)
    except LungSQLError as exc:
        return Featurized(None, featurizer.provider, skipped=pipeline.failure_reason(exc))
    (_, features), = featurizer.featurize_volumes([(None, volume)], overlap=False,
                                                  errors=featurize.PATIENT_ERRORS)
    if isinstance(features, Exception):
        return Featurized(None, featurizer.provider, skipped=pipeline.failure_reason(features))
    n_groups, dim = features.shape
    return Featurized(None, featurizer.provider, features.n_slices, n_groups, dim, features.to_bytes(),
                      features.sha256, None, choice.series_instance_uid, choice.reason)


# -- training ------------------------------------------------------------------------
@_reports_errors(lambda error: Trained(error))
def train_model(rows, params: str | None) -> Trained:
    """LightGBM on the labelled patients' features rows, as pipeline.train_model trains it.

    Returns the model's text, its SHA-256, the feature set, the effective
    parameters, the validation metrics and the feature names (JSON); T-SQL
    stores them, then asks `after_training` whether to deploy it.
    """
    parsed = pipeline.parse_params(params, "@Params")
    records = _records(rows)
    if not records:
        raise ConfigurationError(
            "no labelled patient has features from this CNN",
            hint="load labels with `lungsql ingest --labels`, then EXEC dbo.GenerateFeatures",
        )
    result = pipeline.fit(records, parsed, print)
    return Trained(None, result.model_text, result.sha256, pipeline.FEATURE_SET, json.dumps(result.params),
                   json.dumps(result.metrics), json.dumps(result.feature_names))


# -- the registry ------------------------------------------------------------------------
#: How to train a model, as the SQL Server hint says it.
TRAIN_HINT = "EXEC dbo.TrainLungCancerModel @ModelName = N'...'"


class Chosen(NamedTuple):
    error: str | None
    model_id: int | None = None
    strategy: str | None = None  # as the deployment row records it


class Decided(NamedTuple):
    error: str | None
    strategy: str | None = None  # None: the deployed model stays
    notice: str | None = None


def _registry(rows) -> tuple[dict[int, dict[str, Any]], list[int]]:
    """The models of a name and its deployment history (model ids, newest first), from the rows
    (model_id, metrics, deployment_id) of the models LEFT JOIN their deployments under the name."""
    models: dict[int, dict[str, Any]] = {}
    deployments = []
    for r in _records(rows):
        model_id = int(r["model_id"])
        models[model_id] = {"model_id": model_id, "metrics": r["metrics"]}
        if r["deployment_id"] is not None:
            deployments.append((int(r["deployment_id"]), model_id))
    return models, [m for _, m in sorted(deployments, reverse=True)]


@_reports_errors(lambda error: Chosen(error))
def choose_deployment(rows, model_name: str, strategy: str) -> Chosen:
    """The model `strategy` deploys as `model_name` (lungsql.registry.choose, as lungsql.deploy
    chooses it), and the strategy to record; T-SQL writes the deployment row."""
    models, history = _registry(rows)
    strategy = registry.clean_strategy(strategy)
    return Chosen(None, registry.choose(model_name, list(models.values()), history, strategy, TRAIN_HINT),
                  strategy)


@_reports_errors(lambda error: Decided(error))
def after_training(rows, model_name: str, model_id: int) -> Decided:
    """Whether model `model_id`, just trained as `model_name`, is deployed
    (lungsql.registry.after_training, as lungsql.train_model decides), with the notice to print."""
    models, history = _registry(rows)
    new_model = models.get(int(model_id))
    if new_model is None:
        raise ConfigurationError(f"model {model_id} is not a model named {model_name!r}",
                                 hint="SELECT model_id, name, version FROM lungsql.models")
    strategy, notice = registry.after_training(model_name, new_model, models.get(history[0]) if history else None)
    return Decided(None, strategy, notice)


# -- scoring ---------------------------------------------------------------------------
class _Deployed:
    """The part of pipeline.PipelineData that pipeline.predict reads: the deployed
    model from @params, the patients' features rows from InputDataSet.  T-SQL
    records the predictions this returns, so `record_predictions` has nothing to do."""

    def __init__(self, rows, model_id: int, model_sha256: str, model_text: str, cnn_id: int):
        self.rows = _records(rows)
        self.model = {"model_id": int(model_id), "sha256": str(model_sha256).strip(), "cnn_id": int(cnn_id)}
        self.text = model_text

    def deployed(self, name: str | None) -> dict[str, Any]:
        return self.model

    def model_text(self, model_id: int) -> str:
        return self.text

    def patient_features(self, patient_ids: Sequence[str], cnn_id: int) -> list[dict[str, Any]]:
        wanted = set(patient_ids)
        return [r for r in self.rows if r["patient_id"] in wanted]

    def record_predictions(self, model_id: int, rows: Sequence[tuple[str, float]]) -> None:
        pass


def _predict(data: _Deployed, patient_ids: list[str]) -> list[tuple[str, float]]:
    # The text arrives with every call: check it even when this process has the model parsed already.
    text = data.text if isinstance(data.text, str) else ""
    if hashlib.sha256(text.encode("utf-8")).hexdigest() != data.model["sha256"]:
        scoring.load_model(data.text, data.model["sha256"], data.model["model_id"])  # raises, with its message
    return list(pipeline.predict(data, patient_ids))


@_reports_errors(lambda error: Predicted(error))
def predict_one(rows, patient_id: str, model_id: int, model_sha256: str, model_text: str,
                cnn_id: int) -> Predicted:
    """The probability (0-1) of cancer for one patient from the deployed model."""
    data = _Deployed(rows, model_id, model_sha256, model_text, cnn_id)
    (_, probability), = _predict(data, [patient_id])
    return Predicted(None, probability)


class Scored(NamedTuple):
    error: str | None
    scores: str | None = None  # JSON array of {"patient_id": ..., "probability": ...}


@_reports_errors(lambda error: Scored(error))
def predict_batch(rows, patient_ids: str | None, model_id: int, model_sha256: str, model_text: str,
                  cnn_id: int) -> Scored:
    """Probabilities (0-1) for a JSON array of patient ids, or for every patient
    in InputDataSet when `patient_ids` is NULL."""
    data = _Deployed(rows, model_id, model_sha256, model_text, cnn_id)
    if patient_ids is None:
        ids = sorted({r["patient_id"] for r in data.rows})
    else:
        parsed = json.loads(patient_ids)
        if not isinstance(parsed, list) or not all(isinstance(p, str) or p is None for p in parsed):
            raise ConfigurationError("@PatientIds must be a JSON array of patient ids (strings)",
                                     hint="e.g. N'[\"0a0c32c9e08cc2ea76a71649de56be6d\"]', or NULL for every patient")
        ids = list(dict.fromkeys(p for p in parsed if p is not None))
    scores = [{"patient_id": p, "probability": prob} for p, prob in _predict(data, ids)]
    return Scored(None, json.dumps(scores))


class Findings(NamedTuple):
    error: str | None
    findings: str | None = None  # JSON array of {"finding": ..., "probability": ...}


@_reports_errors(lambda error: Findings(error))
def predict_findings(rows, features: bytes, features_sha256: str, dim: int, model_id: int, model_sha256: str,
                     manifest: str) -> Findings:
    """dbo.PredictFindings: the probability of each finding from the boosters in InputDataSet
    (finding, model_text, sha256), each checked, on the image's stored features (checked too)."""
    from lungsql.ml import multilabel
    from lungsql.server.radiograph_data import image_vector

    boosters = {r["finding"]: (r["model_text"], str(r["sha256"]).strip()) for r in _records(rows)}
    model = multilabel.FindingsModel(manifest, str(model_sha256).strip(), boosters, int(model_id))
    vector = image_vector({"data": features, "dim": int(dim), "sha256": str(features_sha256).strip(),
                           "image_id": None})
    (probabilities,) = model.predict(vector[np.newaxis, :])
    return Findings(None, json.dumps([{"finding": f, "probability": p} for f, p in probabilities.items()
                                      if p is not None]))


# -- the runtime ------------------------------------------------------------------------
def check_environment():
    """(OutputDataSet of component, version, location; error naming what is missing)."""
    components = environment.inspect_components()
    frame = _frame(["component", "version", "location"], [(c.name, c.version, c.location) for c in components])
    problem = environment.missing_message(components)
    if problem is None:
        return frame, None
    message, _ = problem
    return frame, error_text(LungSQLError(
        message.replace("database server", "SQL Server"),
        hint="install lungsql with its ml extra into the instance's Python runtime; see sql/mssql/README.md",
    ))
