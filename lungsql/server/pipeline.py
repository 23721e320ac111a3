"""The pipeline the stored procedures run: featurize, train, deploy, score.

Each step takes a data-access object (`PipelineData`): backed by plpy inside
PostgreSQL (lungsql.server.plpy_data), by InputDataSet and OutputDataSet
inside SQL Server, or by anything else in tests. The science is here once.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Protocol, Sequence

import numpy as np

from lungsql import registry
from lungsql.ml import ensemble
from lungsql.ml import explain as explanation
from lungsql.ml import devices, featurize, heatmap, runtimes, scoring, training
from lungsql.ml import metrics as measures
from lungsql.ml.features import FEATURE_SET as CNN_FEATURE_SET
from lungsql.ml.features import GroupFeatures, patient_vector_names
from lungsql.errors import ConfigurationError, IntegrityError, LungSQLError
from lungsql.ml.preprocess import Preprocessing, prepare_volume, volume_crop
from lungsql.dicom.series import Choice, SeriesInfo, choose_series, read_slices, summarize_series

#: The patient vector: the CNN recipe of lungsql.ml.features, then age and sex.
FEATURE_SET = CNN_FEATURE_SET + "+age-sex"


class PipelineData(Protocol):
    """What the pipeline reads and writes; see lungsql.server.plpy_data for the reference."""

    def cnn_model(self, name: str | None) -> dict[str, Any]: ...
    def patients_to_featurize(self, cnn_id: int, only_missing: bool, retry_failed: bool) -> list[str]: ...
    def failed_patients(self, cnn_id: int) -> list[str]: ...
    def patient_series(self, patient_id: str) -> tuple[list[SeriesInfo], str | None, str | None]: ...
    def series_scans(self, patient_id: str, series_instance_uid: str) -> list[tuple]: ...
    def mark_killed_runs(self) -> list[int]: ...
    def start_feature_run(self, cnn_id: int, provider: str, shard: int, shards: int) -> int: ...
    def write_features(self, patient_id: str, cnn_id: int, features: GroupFeatures, run_id: int,
                       choice: Choice) -> None: ...
    def record_feature_failure(self, patient_id: str, cnn_id: int, run_id: int, reason: str) -> None: ...
    def update_feature_run(self, run_id: int, patients: int, slices: int, seconds: float,
                           cpu_seconds: dict[str, float], finished: bool, failed: int = 0) -> None: ...
    def commit(self) -> None: ...
    def notice(self, text: str) -> None: ...
    def lock_model_name(self, name: str) -> None: ...
    def labelled_features(self, cnn_id: int) -> list[dict[str, Any]]: ...
    def insert_model(self, row: dict[str, Any]) -> int: ...
    def models(self, name: str) -> list[dict[str, Any]]: ...
    def deployed(self, name: str | None) -> dict[str, Any] | None: ...
    def deployment_history(self, name: str) -> list[int]: ...
    def insert_deployment(self, name: str, model_id: int, strategy: str) -> None: ...
    def model_text(self, model_id: int) -> str: ...
    def patient_features(self, patient_ids: Sequence[str], cnn_id: int) -> list[dict[str, Any]]: ...
    def record_predictions(self, model_id: int, rows: Sequence[tuple[str, float]]) -> None: ...
    def featurized_patients(self, cnn_id: int) -> list[str]: ...
    def cnn_preprocessing(self, cnn_id: int) -> dict[str, Any]: ...
    def model_rows(self, model_ids: Sequence[int]) -> list[dict[str, Any]]: ...
    def cnn_by_id(self, cnn_id: int) -> dict[str, Any]: ...
    def labels(self, patient_ids: Sequence[str]) -> dict[str, int]: ...
    def series_slices(self, patient_id: str, series_instance_uid: str) -> list[tuple[int, float, Any]]: ...


# -- featurization -------------------------------------------------------------
@dataclass
class FeatureRun:
    run_id: int
    cnn: str
    provider: str
    patients: int
    slices: int
    seconds: float
    cpu_seconds: dict[str, float] = field(default_factory=dict)  # per step: lungsql.ml.cpu_clock.CpuClock
    failed: list[tuple[str, str]] = field(default_factory=list)  # (patient id, reason) of the skipped
    left_out: int = 0  # patients that failed in an earlier run and were not retried

    @property
    def slices_per_s(self) -> float:
        return self.slices / self.seconds if self.seconds else 0.0

    def describe(self) -> str:
        """The run's last NOTICE: what it did, and the patients it skipped."""
        text = (f"done: {self.patients} patients, {self.slices} slices in {self.seconds:.1f} s "
                f"({self.slices_per_s:.0f} slices/s) on {self.provider}, run {self.run_id}")
        if self.failed:
            named = ", ".join(f"{pid} ({reason})" for pid, reason in self.failed[:SKIPPED_NAMED])
            more = f" and {len(self.failed) - SKIPPED_NAMED} more" if len(self.failed) > SKIPPED_NAMED else ""
            text += (f"; skipped {len(self.failed)} patient(s) that could not be featurized: {named}{more}. "
                     "Their reasons are in lungsql.feature_failures; after fixing their scans, "
                     "CALL lungsql.generate_features(retry_failed => true)")
        if self.left_out:
            text += (f"; {self.left_out} patient(s) that failed in an earlier run were left out "
                     "(retry_failed => true retries them)")
        return text


#: The skipped patients the last NOTICE of a run names; lungsql.feature_failures lists them all.
SKIPPED_NAMED = 10


def in_shard(patient_id: str, shard: int, shards: int) -> bool:
    """Stable assignment of a patient to one of `shards` disjoint sets."""
    return int.from_bytes(hashlib.sha256(patient_id.encode()).digest()[:8], "big") % shards == shard


def load_featurizer(cnn: dict[str, Any], threads: int | None = None,
                    providers: Sequence[Any] | None = None) -> featurize.Featurizer:
    """The CNN's featurizer, once its bytes match their SHA-256, on the runtime its row names
    (lungsql.ml.runtimes); `threads` for the CNN (default: the usable cores), `providers` as ONNX
    Runtime takes them (default: lungsql.ml.devices' choice)."""
    model = bytes(cnn["model"])
    if hashlib.sha256(model).hexdigest() != cnn["sha256"]:
        raise IntegrityError(
            f"the bytes of CNN {cnn['name']!r} do not match their SHA-256: the stored model was altered; "
            "nothing was featurized",
            hint=f"import the CNN again: lungsql model import ... --name {cnn['name']}",
        )
    return featurize.Featurizer(model, cnn["input_name"], cnn["output_name"],
                                Preprocessing.from_json(json_value(cnn["preprocessing"])), providers=providers,
                                threads=threads, runtime=runtimes.Runtime.from_source(cnn.get("source")))


def shard_threads(shards: int, cores: int | None = None) -> int:
    """CNN threads for one of `shards` sessions featurizing at once on one server: the usable cores
    shared among them (at least one each), so that N sessions never run more CNN threads than there
    are cores."""
    cores = cores or devices.default_threads()
    return max(1, cores // max(1, shards))


def generate_features(data: PipelineData, cnn_name: str | None = None, only_missing: bool = True,
                      shard: int = 0, shards: int = 1, retry_failed: bool = False,
                      featurizer_for: Callable[[dict[str, Any]], Any] | None = None) -> FeatureRun:
    """Featurize every patient of this shard, each one committed on its own.

    `featurizer_for(cnn)` gives the featurizer, as a context manager (a Spark worker keeps one
    across tasks instead of opening a new one each time); by default `load_featurizer` with the
    server's cores shared among the `shards` sessions (`shard_threads`).

    A patient that cannot be featurized is recorded (`record_feature_failure`)
    and skipped; later runs leave it out unless `retry_failed` (or its scans
    changed since).  Runs whose session died before they finished are marked
    killed first.
    """
    if shards < 1 or not 0 <= shard < shards:
        raise ConfigurationError(f"shard must be in 0..shards-1 and shards >= 1; got shard={shard}, shards={shards}",
                                 hint="e.g. run shard => 0, shards => 2 and shard => 1, shards => 2 in two sessions")
    cnn = data.cnn_model(cnn_name)
    for run_id in data.mark_killed_runs():
        data.notice(f"featurization run {run_id} ended before it finished (its session is gone): marked killed")
    if featurizer_for is None:
        def featurizer_for(cnn: dict[str, Any]) -> featurize.Featurizer:
            return load_featurizer(cnn, threads=shard_threads(shards))
    with featurizer_for(cnn) as featurizer:
        patients = [p for p in data.patients_to_featurize(cnn["cnn_id"], only_missing, retry_failed)
                    if in_shard(p, shard, shards)]
        left_out = 0 if retry_failed else sum(
            1 for p in data.failed_patients(cnn["cnn_id"]) if in_shard(p, shard, shards) and p not in set(patients))
        run = featurize_patients(data, cnn, featurizer, patients, shard, shards)
        run.left_out = left_out
        return run


def featurize_patients(data: PipelineData, cnn: dict[str, Any], featurizer: featurize.Featurizer,
                       patients: Iterable[str], shard: int, shards: int, total: int | None = None) -> FeatureRun:
    """Featurize `patients` (a list, or a stream of `total` or an unknown number), each committed on
    its own, under one feature run: generate_features' loop, for callers that chose the patients
    (a Spark task reading files, lungsql.spark.files)."""
    if total is None and isinstance(patients, Sequence):
        total = len(patients)
    of_total = f"/{total}" if total is not None else ""
    run = FeatureRun(data.start_feature_run(cnn["cnn_id"], featurizer.provider, shard, shards),
                     cnn["name"], featurizer.provider, 0, 0, 0.0)
    data.commit()
    data.notice(f"featurizing {total if total is not None else 'the'} patients with CNN {cnn['name']!r} on "
                f"{featurizer.provider} (shard {shard} of {shards})")
    started = time.perf_counter()
    clock = featurizer.new_clock()  # this run's CPU only, when the featurizer is kept across runs

    choices: dict[str, Choice] = {}

    def read(patient_id: str) -> list[tuple] | LungSQLError:
        """The chosen series' files, and only those; or why the patient has none to featurize."""
        with clock.step("reading"):
            try:
                choice = choices[patient_id] = choose_series(*data.patient_series(patient_id))
            except LungSQLError as exc:
                return exc
            return data.series_scans(patient_id, choice.series_instance_uid)

    volumes = ((pid, read(pid)) for pid in patients)
    for patient_id, features in featurizer.featurize_volumes(volumes, errors=featurize.PATIENT_ERRORS):
        run.seconds = time.perf_counter() - started
        with clock.step("writing"):
            if isinstance(features, BaseException):
                choices.pop(patient_id, None)
                reason = failure_reason(features)
                run.failed.append((patient_id, reason))
                data.record_feature_failure(patient_id, cnn["cnn_id"], run.run_id, reason)
            else:
                run.patients += 1
                run.slices += features.n_slices
                data.write_features(patient_id, cnn["cnn_id"], features, run.run_id, choices.pop(patient_id))
            data.update_feature_run(run.run_id, run.patients, run.slices, run.seconds, clock.seconds(),
                                    finished=False, failed=len(run.failed))
            data.commit()  # this patient is done, whatever happens to the next
        if isinstance(features, BaseException):
            data.notice(f"skipped patient {patient_id}: {run.failed[-1][1]}")
        data.notice(f"{run.patients + len(run.failed)}{of_total} patients, {run.slices} slices, "
                    f"{run.slices_per_s:.0f} slices/s" + (f", {len(run.failed)} skipped" if run.failed else ""))
    run.seconds = time.perf_counter() - started
    run.cpu_seconds = clock.seconds()
    data.update_feature_run(run.run_id, run.patients, run.slices, run.seconds, run.cpu_seconds, finished=True,
                            failed=len(run.failed))
    data.commit()
    if run.slices:
        data.notice(clock.describe(run.slices))
    return run


def failure_reason(exc: BaseException) -> str:
    """One line saying why a patient could not be featurized."""
    if isinstance(exc, LungSQLError):
        return exc.message.splitlines()[0][:500]
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0][:400]}" if text else type(exc).__name__


def choose_among_scans(rows: Sequence[dict[str, Any]], override: str | None = None,
                       override_by: str | None = None) -> tuple[Choice, list[tuple]]:
    """The chosen series and its (bytes, z, frame_z) of a patient's scan rows, each with the
    columns of lungsql.scans the choice reads (where the database cannot summarize the series
    first, as SQL Server's procedure and the benchmarks)."""
    choice = choose_series(summarize_series(rows), override, override_by)
    scans = [(r["dicom"], float(r["z_position"]), r.get("frame_z")) for r in rows
             if r["series_instance_uid"] == choice.series_instance_uid]
    return choice, scans


# -- patient vectors -------------------------------------------------------------
def patient_vector(row: dict[str, Any]) -> np.ndarray:
    """A patient's model input from a features row: the CNN summary, age, sex (NaN when unknown)."""
    features = GroupFeatures.from_bytes(row["data"], (row["n_groups"], row["dim"]), row["sha256"],
                                                  n_slices=row["n_slices"])
    age = row.get("age_years")
    sex = row.get("sex")
    extra = np.array([np.nan if age is None else float(age),
                      {"M": 1.0, "F": 0.0}.get(sex, np.nan)], dtype=np.float32)
    return np.concatenate([features.patient_vector(), extra])


def feature_names(dim: int) -> list[str]:
    return patient_vector_names(dim) + ["age_years", "sex_male"]


# -- training and the registry ---------------------------------------------------------
def parse_params(text: str | None, argument: str = "params") -> dict[str, Any]:
    """LightGBM parameters given to a procedure as JSON text: an object, or nothing."""
    import json

    example = '{"num_leaves": 7}'
    try:
        parsed = json.loads(text) if text else {}
    except ValueError as exc:
        raise ConfigurationError(f"{argument} is not JSON: {exc}", hint=f"e.g. {example}") from None
    if not isinstance(parsed, dict):
        raise ConfigurationError(f"{argument} must be a JSON object", hint=f"e.g. {example}")
    return parsed


def train_model(data: PipelineData, model_name: str = "lightgbm", params: dict | None = None,
                cnn_name: str | None = None) -> tuple[int, dict[str, Any]]:
    """Train a LightGBM classifier on the labelled patients; returns (model id, metrics)."""
    if not model_name or not model_name.strip():
        raise ConfigurationError("model_name must not be empty", hint="e.g. model_name => 'lightgbm'")
    cnn = data.cnn_model(cnn_name)
    rows = data.labelled_features(cnn["cnn_id"])
    if not rows:
        raise ConfigurationError(
            f"no labelled patient has features from CNN {cnn['name']!r}",
            hint="load labels with `lungsql ingest --labels`, then CALL lungsql.generate_features()",
        )
    data.notice(f"training {model_name!r} on {len(rows)} labelled patients (CNN {cnn['name']!r})")
    result = fit(rows, params, data.notice)
    # From here to the end of the transaction, one call per name at a time: concurrent trainings of a
    # name get consecutive versions, and each sees the deployments the previous one made.
    data.lock_model_name(model_name)
    versions = [m["version"] for m in data.models(model_name)]
    model_id = data.insert_model({
        "name": model_name,
        "version": max(versions, default=0) + 1,
        "cnn_id": cnn["cnn_id"],
        "feature_set": FEATURE_SET,
        "feature_names": result.feature_names,
        "params": result.params,
        "model_text": result.model_text,
        "sha256": result.sha256,
        "metrics": result.metrics,
    })
    strategy, notice = registry.after_training(model_name, {"model_id": model_id, "metrics": result.metrics},
                                               data.deployed(model_name))
    if strategy is not None:
        data.insert_deployment(model_name, model_id, strategy)
    data.notice(notice)
    return model_id, result.metrics


def fit(rows: Sequence[dict[str, Any]], params: dict | None, progress=None) -> training.TrainResult:
    """LightGBM on labelled features rows (patient_id, label, age_years, sex, data, n_groups, dim,
    n_slices, sha256): the patient vectors, the labels, the training."""
    X = np.stack([patient_vector(r) for r in rows])
    y = np.array([int(r["label"]) for r in rows])
    return training.train(X, y, [r["patient_id"] for r in rows], feature_names(int(rows[0]["dim"])),
                          params=params, progress=progress)


def deploy(data: PipelineData, model_name: str, strategy: str = "best_score") -> int:
    """Deploy a model of `model_name` by strategy (or by model id, lungsql.registry.choose);
    returns the deployed model id."""
    data.lock_model_name(model_name)  # one train_model or deploy of a name at a time
    strategy = registry.clean_strategy(strategy)
    chosen = registry.choose(model_name, data.models(model_name), data.deployment_history(model_name), strategy)
    data.insert_deployment(model_name, chosen, strategy)
    return chosen


def deploy_ensemble(data: PipelineData, name: str, model_ids: Sequence[int], method: str = "mean",
                    weights: Sequence[float] | None = None) -> tuple[int, dict[str, Any]]:
    """Store an ensemble of trained models (lungsql.ml.ensemble) as a model of `name`, measured on the
    members' common validation patients, and deploy it; returns (its model id, its metrics)."""
    if not name or not name.strip():
        raise ConfigurationError("name must not be empty", hint="e.g. name => 'ensemble'")
    ids = [int(i) for i in (model_ids or []) if i is not None]
    rows = {r["model_id"]: r for r in data.model_rows(ids)}
    unknown = [i for i in ids if i not in rows]
    if unknown:
        raise ConfigurationError(f"no model with model_id {unknown[0]}", hint="SELECT model_id, name FROM lungsql.models")
    members = [rows[i] for i in ids]
    nested = [m["model_id"] for m in members if m["algorithm"] == ensemble.ALGORITHM]
    if nested:
        raise ConfigurationError(f"model {nested[0]} is itself an ensemble", hint="name its members instead")
    spec = ensemble.build(method, members, weights)
    common = None
    for m in members:
        held_out = json_value(m["metrics"]).get("validation_ids")
        if held_out is None:
            raise ConfigurationError(f"model {m['model_id']} does not record its validation patients",
                                     hint="train it again: SELECT * FROM lungsql.train_model(...)")
        common = set(held_out) if common is None else common & set(held_out)
    patients = sorted(common or [])
    member_p = _member_probabilities(data, members, patients)
    patients = [p for p in patients if p in member_p]  # featurized by every member's CNN
    labels = data.labels(patients)
    patients = [p for p in patients if p in labels]
    if not patients:
        raise ConfigurationError("the members share no validation patient with features of every member's CNN",
                                 hint="ensemble models trained on the same labelled patients")
    p_members = np.array([member_p[p] for p in patients])
    y = np.array([labels[p] for p in patients])
    combined = spec.combine(p_members)
    metrics = measures.summary(y, combined)
    metrics.update(valid_patients=len(patients), validation_ids=patients, method=spec.method,
                   members=[{"model_id": m.model_id, "weight": m.weight,
                             **{k: v for k, v in measures.summary(y, p_members[:, i]).items()
                                if k in ("auc", "log_loss", "brier")}}
                            for i, m in enumerate(spec.members)])
    data.lock_model_name(name)
    versions = [m["version"] for m in data.models(name)]
    model_id = data.insert_model({
        "name": name, "version": max(versions, default=0) + 1, "cnn_id": members[0]["cnn_id"],
        "algorithm": ensemble.ALGORITHM, "feature_set": ensemble.ALGORITHM, "feature_names": [],
        "params": {"method": spec.method, "members": [m.model_id for m in spec.members],
                   "weights": [m.weight for m in spec.members]},
        "model_text": spec.to_text(), "sha256": spec.sha256, "metrics": metrics,
    })
    data.insert_deployment(name, model_id, f"ensemble:{spec.method}")
    data.notice(f"ensemble {name!r} (model {model_id}) of models {', '.join(str(i) for i in ids)} by "
                f"{spec.method}: validation AUC {metrics['auc']:.3f}, log loss {metrics['log_loss']:.4f} on "
                f"{len(patients)} common validation patients; deployed")
    return model_id, metrics


def _member_probabilities(data: PipelineData, members: Sequence[dict[str, Any]], patients: Sequence[str]
                          ) -> dict[str, list[float]]:
    """Each patient's probability from every member (its own CNN's features); patients a member has
    no features for are left out."""
    columns: list[dict[str, float]] = []
    for m in members:
        model = scoring.cached_model(m["model_id"], m["sha256"], lambda m=m: data.model_text(m["model_id"]))
        rows = data.patient_features(list(patients), m["cnn_id"])
        vectors = [patient_vector(r) for r in rows]
        probs = model.predict(np.stack(vectors)) if vectors else []
        columns.append({r["patient_id"]: float(p) for r, p in zip(rows, probs)})
    return {p: [c[p] for c in columns] for p in patients if all(p in c for c in columns)}


# -- scoring ----------------------------------------------------------------------
@dataclass
class Scores:
    """Probabilities and the deployed model that gave them (as PipelineData.deployed returned it)."""

    model: dict[str, Any]
    results: list[tuple[str, float]]


def predict(data: PipelineData, patient_ids: Sequence[str], model_name: str | None = None
            ) -> Iterator[tuple[str, float]]:
    """(patient id, probability of cancer) from the deployed model, each one recorded."""
    return iter(score(data, patient_ids, model_name).results)


def warm_up(data: PipelineData, model_name: str | None = None) -> int | None:
    """Parse and verify the deployed model into this process's cache, scoring nobody: the next
    score in this process skips the loading.  The deployed model's id, or None."""
    deployed = data.deployed(model_name)
    if deployed is None:
        return None
    if deployed.get("algorithm") == ensemble.ALGORITHM:
        spec = ensemble.load(data.model_text(deployed["model_id"]), deployed["sha256"])
        for member in spec.members:
            scoring.cached_model(member.model_id, member.sha256, lambda m=member: data.model_text(m.model_id))
        return int(deployed["model_id"])
    scoring.cached_model(deployed["model_id"], deployed["sha256"], lambda: data.model_text(deployed["model_id"]))
    return int(deployed["model_id"])


def score(data: PipelineData, patient_ids: Sequence[str], model_name: str | None = None) -> Scores:
    """`predict`, with the model that answered."""
    deployed = data.deployed(model_name)
    if deployed is None:
        raise LungSQLError(
            "no model is deployed" + (f" as {model_name!r}" if model_name else ""),
            hint="train one: SELECT * FROM lungsql.train_model()",
        )
    if deployed.get("algorithm") == ensemble.ALGORITHM:
        return _score_ensemble(data, deployed, patient_ids)
    model = scoring.cached_model(deployed["model_id"], deployed["sha256"],
                                 lambda: data.model_text(deployed["model_id"]))
    rows = {r["patient_id"]: r for r in data.patient_features(patient_ids, deployed["cnn_id"])}
    missing = [p for p in patient_ids if p not in rows]
    if missing:
        raise LungSQLError(
            f"no features for patient {missing[0]!r} from the CNN of model {deployed['model_id']}"
            + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""),
            hint="check the patient id, or featurize: CALL lungsql.generate_features()",
        )
    vectors = np.stack([patient_vector(rows[p]) for p in patient_ids]) if patient_ids else None
    probabilities = model.predict(vectors) if vectors is not None else []
    results = [(p, float(min(1.0, max(0.0, prob)))) for p, prob in zip(patient_ids, probabilities)]
    data.record_predictions(deployed["model_id"], results)
    return Scores(deployed, results)


def _ensemble_members(data: PipelineData, deployed: dict[str, Any]) -> tuple[ensemble.Ensemble, dict[int, dict]]:
    """A deployed ensemble (checked against its SHA-256) and its members' rows, each still the model
    the ensemble was made of (IntegrityError otherwise)."""
    spec = ensemble.load(data.model_text(deployed["model_id"]), deployed["sha256"])
    rows = {r["model_id"]: r for r in data.model_rows([m.model_id for m in spec.members])}
    for member in spec.members:
        row = rows.get(member.model_id)
        if row is None or row["sha256"] != member.sha256:
            raise IntegrityError(f"member model {member.model_id} of ensemble {deployed['model_id']} is gone or "
                                 "has changed since the ensemble was made",
                                 hint="deploy the ensemble again: SELECT lungsql.deploy_ensemble(...)")
    return spec, rows


def _score_ensemble(data: PipelineData, deployed: dict[str, Any], patient_ids: Sequence[str]) -> Scores:
    """`score` for an ensemble: each member scores with its own CNN's features, then the method
    combines them; a member whose row changed since the ensemble was made is refused."""
    spec, rows = _ensemble_members(data, deployed)
    member_p = _member_probabilities(data, [rows[m.model_id] for m in spec.members], list(patient_ids))
    missing = [p for p in patient_ids if p not in member_p]
    if missing:
        raise LungSQLError(f"no features for patient {missing[0]!r} from the CNNs of every member of ensemble "
                           f"{deployed['model_id']}", hint="featurize with each member's CNN: "
                                                           "CALL lungsql.generate_features(cnn_name => ...)")
    combined = spec.combine(np.array([member_p[p] for p in patient_ids])) if patient_ids else []
    results = [(p, float(min(1.0, max(0.0, prob)))) for p, prob in zip(patient_ids, combined)]
    data.record_predictions(deployed["model_id"], results)
    return Scores(deployed, results)


@dataclass
class GroupContribution:
    """One group of slices' share of a patient's score: which slices (in the featurized series' z
    order, and their scan_ids), and its contribution in log-odds."""

    group: int
    slices: range
    z: tuple[float, float]
    scan_ids: list[int]
    contribution: float


@dataclass
class Explained:
    model: dict[str, Any]
    probability: float
    series_instance_uid: str
    groups: list[GroupContribution]  # the most contributing first
    patient: dict[str, float]  # log_slices, age_years, sex_male
    bias: float


def explain(data: PipelineData, patient_id: str, model_name: str | None = None) -> Explained:
    """Which groups of slices the deployed model's probability for the patient comes from
    (lungsql.ml.explain); the probability is the one `score` gives, not recorded again."""
    deployed, model, row, features, vector = _explained_inputs(data, patient_id, model_name)
    taken = explanation.explain(model.booster, features.array, vector, model.feature_names)
    series = row.get("series_instance_uid") or choose_series(*data.patient_series(patient_id)).series_instance_uid
    places = sorted(((float(z), scan_id) for scan_id, z_position, frame_z in data.series_slices(patient_id, series)
                     for z in (frame_z or [z_position])), key=lambda place: place[0])
    if len(places) != features.n_slices:
        raise LungSQLError(f"patient {patient_id!r}'s series now holds {len(places)} slices, its features "
                           f"{features.n_slices}", hint="featurize the patient again: "
                                                        "CALL lungsql.generate_features(only_missing => false)")
    per_image = Preprocessing.from_json(json_value(data.cnn_preprocessing(deployed["cnn_id"]))).slices_per_image
    groups = []
    for g, held in enumerate(explanation.group_slices(features.shape[0], features.n_slices, per_image)):
        zs = [places[i][0] for i in held]
        groups.append(GroupContribution(g, held, (min(zs), max(zs)), list(dict.fromkeys(places[i][1] for i in held)),
                                        float(taken.groups[g])))
    groups.sort(key=lambda c: -c.contribution)
    probability = float(model.predict(vector)[0])
    return Explained(deployed, probability, series, groups, taken.patient, taken.bias)


@dataclass
class Heatmap:
    rows: int
    columns: int
    heat: bytes  # rows x columns uint8, 255 where the features that raised the probability were strongest
    group: int
    contribution: float
    model_id: int
    method: str  # "class activation" (the CNN's feature map) or "occlusion" (a CNN without one)


def slice_heatmap(data: PipelineData, patient_id: str, scan_id: int, model_name: str | None = None) -> Heatmap:
    """The class-activation map (lungsql.ml.heatmap) of the group of slices that holds stored file
    `scan_id`, over that file's pixels, for the deployed model's probability of the patient."""
    deployed, model, row, features, vector = _explained_inputs(data, patient_id, model_name)
    cnn = data.cnn_by_id(deployed["cnn_id"])
    output = ((json_value(cnn["source"]) or {}).get("feature_map") or {}).get("output")
    taken = explanation.explain(model.booster, features.array, vector, model.feature_names)
    series = row.get("series_instance_uid") or choose_series(*data.patient_series(patient_id)).series_instance_uid
    scans = data.series_scans(patient_id, series)
    order = [scan for _, scan in sorted(((float(z), scan_id_) for scan_id_, z_position, frame_z
                                         in data.series_slices(patient_id, series)
                                         for z in (frame_z or [z_position])), key=lambda place: place[0])]
    if scan_id not in order:
        raise LungSQLError(f"scan {scan_id} is not a slice of the series patient {patient_id!r} was featurized from",
                           hint="SELECT scan_ids FROM lungsql.explain_prediction(patient_id)")
    slices, rescale = read_slices(scans)
    p = Preprocessing.from_json(json_value(cnn["preprocessing"]))
    first = order.index(scan_id)
    group = first // p.slices_per_image
    held = explanation.group_slices(features.shape[0], features.n_slices, p.slices_per_image)[group]
    crop = volume_crop(slices, p, rescale)
    image = prepare_volume([slices[i] for i in held], p, rescale[list(held)], crop=crop)
    session = heatmap.feature_map_session(bytes(cnn["model"]), cnn["sha256"])
    if output:  # the CNN's last feature map, weighted
        (maps,) = session.run([output], {cnn["input_name"]: image})
        cam, method = heatmap.activation_map(maps[0], taken.per_feature[group]), "class activation"
    else:  # a CNN without one: occlusion sensitivity through forward passes
        cam = heatmap.occlusion_map(session, cnn["input_name"], cnn["output_name"], image, taken.per_feature[group])
        method = "occlusion"
    rows, cols = slices[first].shape
    heat = heatmap.on_slice(cam, crop, rows, cols)
    return Heatmap(rows, cols, (heat * 255 + 0.5).astype(np.uint8).tobytes(), group,
                   float(taken.groups[group]), int(deployed["model_id"]), method)


def _explaining_member(data: PipelineData, deployed: dict[str, Any]) -> dict[str, Any]:
    """An ensemble is explained by its member of the largest weight (the first of equals): the
    member's own contributions, on its own CNN's features (the rows say which model it is)."""
    spec, rows = _ensemble_members(data, deployed)
    member = max(spec.members, key=lambda m: m.weight)  # max keeps the first of equal weights
    return {**rows[member.model_id], "ensemble_id": deployed["model_id"]}


def _explained_inputs(data: PipelineData, patient_id: str, model_name: str | None):
    """The deployed model (for an ensemble, its explaining member), its parsed booster, the patient's
    features row, its GroupFeatures and its model input vector."""
    deployed = data.deployed(model_name)
    if deployed is None:
        raise LungSQLError("no model is deployed" + (f" as {model_name!r}" if model_name else ""),
                           hint="train one: SELECT * FROM lungsql.train_model()")
    if deployed.get("algorithm") == ensemble.ALGORITHM:
        deployed = _explaining_member(data, deployed)
    model = scoring.cached_model(deployed["model_id"], deployed["sha256"],
                                 lambda: data.model_text(deployed["model_id"]))
    rows = data.patient_features([patient_id], deployed["cnn_id"])
    if not rows:
        raise LungSQLError(f"no features for patient {patient_id!r} from the CNN of model {deployed['model_id']}",
                           hint="check the patient id, or featurize: CALL lungsql.generate_features()")
    row = rows[0]
    features = GroupFeatures.from_bytes(row["data"], (row["n_groups"], row["dim"]), row["sha256"],
                                        n_slices=row["n_slices"])
    return deployed, model, row, features, patient_vector(row)


def json_value(value: Any) -> Any:
    if isinstance(value, (str, bytes)):
        import json

        return json.loads(value)
    return value
