"""Train the patient classifier: LightGBM on one CNN feature vector per patient.

``train`` takes a feature matrix (one row per labelled patient), splits the
patients into a training and a validation part (``stratified_split``), boosts
trees on the training part with early stopping on the validation log loss,
and returns the model as LightGBM's own text format with its SHA-256, the
effective parameters and the validation metrics (`lungsql.ml.metrics.summary`).
Nothing is pickled; the caller stores the text and the hash in a table.

Choices, and why
----------------
* Objective ``binary`` (log loss): the model outputs a probability of cancer.
  The 2017 tutorial fitted a regressor to 0/1 labels, whose outputs are not
  probabilities and can leave [0, 1].
* Class imbalance: ``scale_pos_weight`` = negatives / positives *of the
  training part*, written explicitly into the effective parameters (so it is
  visible in the stored model and in ``TrainResult.params``) rather than
  ``is_unbalance``, which computes the same ratio internally.  Pass
  ``{"scale_pos_weight": 1}`` for unweighted training or
  ``{"is_unbalance": true}`` to let LightGBM weigh.
  Consequences: the training loss counts a cancer as much as all the
  non-cancers it is outnumbered by, which pushes cancers' probabilities up;
  LightGBM still starts from the unweighted prevalence (its
  ``boost_from_average`` ignores ``scale_pos_weight``), so after early
  stopping the probabilities lie between calibrated and balanced.  They are
  not calibrated to the cohort's prevalence, and 0.5 is not a balanced
  threshold either: choose the operating threshold from the stored ROC points.
  On the synthetic cohorts described below, unweighted training ranked about
  as well (mean AUC 0.82 against 0.80, inside the seed-to-seed spread) and
  called almost no cancer positive at 0.5 (mean sensitivity 0.02 against 0.13).
* Early stopping watches the *unweighted* validation log loss.  Weighting the
  validation patients like the training ones is more consistent, but with
  tens of validation cancers each weighing ~3 the criterion became noisier:
  on synthetic cohorts (600 patients, 2561 features, weak signal, 5 seeds)
  training stopped after 24-78 instead of 39-133 rounds and the mean
  validation AUC fell from 0.80 to 0.76.
* Early stopping uses the validation part, and the reported metrics are
  measured on the same part, so they are slightly optimistic (the number of
  trees was chosen on it).  With a few hundred patients a third split would
  leave too few positives to measure anything; this is what the 2017
  tutorial did too.
* Small cohorts (tens to a few thousand patients, 2561 features): few leaves
  (15), at least 5 patients per leaf, half the features per tree, 80 % of the
  patients per tree, L2 regularisation, learning rate 0.05, up to 2000 rounds,
  stopping after 50 rounds without improvement.
* 63 bins per feature instead of LightGBM's 255: a round's cost is mostly
  finding splits over every bin of half the 2561 features, and a cohort of
  a few thousand patients gains nothing from finer bins.  On 1600 synthetic
  patients (bench/training.py) training took 12.7 s instead of 28.7 s, with
  the validation log loss 0.0356 instead of 0.0363.
* Reproducible: ``deterministic`` and ``force_col_wise`` (LightGBM's advice
  for repeatable results), every LightGBM seed derived from ``seed``, rows
  ordered by patient id whatever the input order.  Same inputs and LightGBM
  version give the same model text, byte for byte.
"""

from __future__ import annotations

import difflib
import hashlib
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from lungsql.ml import metrics as _metrics
from lungsql.errors import ConfigurationError

__all__ = [
    "DEFAULT_PARAMS",
    "MIN_PATIENTS_PER_CLASS",
    "PROGRESS_EVERY",
    "TrainResult",
    "effective_params",
    "stratified_split",
    "train",
]

#: Training refuses to run with fewer labelled patients than this in either class.
MIN_PATIENTS_PER_CLASS = 4

#: ``progress`` receives a line every this many boosting rounds.
PROGRESS_EVERY = 50

#: LightGBM parameters used unless the caller overrides them (canonical names).
#: ``seed`` is replaced by ``train``'s ``seed`` argument and ``scale_pos_weight``
#: is added from the training part's class counts (see the module docstring).
DEFAULT_PARAMS: dict[str, Any] = {
    "objective": "binary",
    "metric": "binary_logloss",
    "boosting": "gbdt",
    "learning_rate": 0.05,
    "num_leaves": 15,
    "max_depth": -1,
    "min_data_in_leaf": 5,
    "min_sum_hessian_in_leaf": 1e-3,
    "feature_fraction": 0.5,
    "bagging_fraction": 0.8,
    "bagging_freq": 1,
    "lambda_l2": 1.0,
    "max_bin": 63,
    "num_iterations": 2000,
    "early_stopping_round": 50,
    "seed": 2017,
    "deterministic": True,
    "force_col_wise": True,
    "num_threads": 0,  # LightGBM's default: OpenMP's thread count
    "verbosity": -1,
}

# Names LightGBM also accepts for the parameters above (from LightGBM's
# Parameters documentation).  Used only when LightGBM's own alias table cannot
# be read; that table covers every parameter.
_FALLBACK_ALIASES: dict[str, list[str]] = {
    "objective": ["objective_type", "app", "application", "loss"],
    "metric": ["metrics", "metric_types"],
    "boosting": ["boosting_type", "boost"],
    "learning_rate": ["shrinkage_rate", "eta"],
    "num_leaves": ["num_leaf", "max_leaves", "max_leaf", "max_leaf_nodes"],
    "max_depth": [],
    "min_data_in_leaf": ["min_data_per_leaf", "min_data", "min_child_samples", "min_samples_leaf"],
    "min_sum_hessian_in_leaf": ["min_sum_hessian_per_leaf", "min_sum_hessian", "min_hessian",
                                "min_child_weight"],
    "feature_fraction": ["sub_feature", "colsample_bytree"],
    "bagging_fraction": ["sub_row", "subsample", "bagging"],
    "bagging_freq": ["subsample_freq"],
    "lambda_l2": ["reg_lambda", "lambda", "l2_regularization"],
    "num_iterations": ["num_iteration", "n_iter", "num_tree", "num_trees", "num_round", "num_rounds",
                       "nrounds", "num_boost_round", "n_estimators", "max_iter"],
    "early_stopping_round": ["early_stopping_rounds", "early_stopping", "n_iter_no_change"],
    "seed": ["random_seed", "random_state"],
    "deterministic": [],
    "force_col_wise": [],
    "force_row_wise": [],
    "num_threads": ["num_thread", "nthread", "nthreads", "n_jobs"],
    "max_bin": ["max_bins"],
    "verbosity": ["verbose"],
    "scale_pos_weight": [],
    "is_unbalance": ["unbalance", "unbalanced_sets"],
}

_PARAMETERS_DOC = "https://lightgbm.readthedocs.io/en/latest/Parameters.html"


def lightgbm_module():
    """The lightgbm package, or a ConfigurationError saying how to install it."""
    try:
        import lightgbm
    except ImportError as exc:  # pragma: no cover - depends on the installation
        raise ConfigurationError(
            "LightGBM is not installed in the Python that runs lungsql",
            hint="install the ml extra: pip install 'lungsql[ml]'",
        ) from exc
    return lightgbm


def _param_aliases() -> tuple[dict[str, str], bool]:
    """Map every accepted parameter name to its canonical name.

    The second value says whether the table is LightGBM's complete one (so an
    unknown name is an error) or our fallback for the defaults only.
    """
    try:
        from lightgbm.basic import _ConfigAliases  # private; present in LightGBM 4.x

        table = _ConfigAliases._get_all_param_aliases()
        complete = True
    except Exception:  # noqa: BLE001 - any change in LightGBM's internals: use the fallback
        table = {main: [main, *aliases] for main, aliases in _FALLBACK_ALIASES.items()}
        complete = False
    mapping: dict[str, str] = {}
    for main, aliases in table.items():
        mapping[main] = main
        for alias in aliases:
            mapping.setdefault(alias, main)
    return mapping, complete


def _canonical_user_params(params: dict[str, Any] | None) -> dict[str, Any]:
    """The caller's parameters under LightGBM's canonical names, checked."""
    if params is None:
        return {}
    if not isinstance(params, dict):
        raise ConfigurationError(
            f"training parameters must be a JSON object of LightGBM parameters, not {type(params).__name__}",
            hint=f'for example {{"num_leaves": 7, "learning_rate": 0.1}}; see {_PARAMETERS_DOC}',
        )
    aliases, complete = _param_aliases()
    canonical: dict[str, Any] = {}
    given_as: dict[str, str] = {}
    for name, value in params.items():
        if not isinstance(name, str):
            raise ConfigurationError(f"training parameter names must be text, not {name!r}")
        main = aliases.get(name)
        if main is None:
            if complete:
                close = difflib.get_close_matches(name, list(aliases), n=1)
                suggestion = f" (did you mean {aliases[close[0]]!r}?)" if close else ""
                raise ConfigurationError(
                    f"unknown LightGBM parameter {name!r}{suggestion}",
                    hint=f"remove it or use a parameter listed at {_PARAMETERS_DOC}",
                )
            main = name  # unknown to the fallback table: LightGBM decides
        if main in canonical:
            raise ConfigurationError(
                f"training parameter {main!r} is given twice, as {given_as[main]!r} and as {name!r}",
                hint="keep one of the two names",
            )
        canonical[main] = value
        given_as[main] = name
    objective = canonical.get("objective", "binary")
    if objective != "binary":
        raise ConfigurationError(
            f"objective {objective!r} is not supported: lungsql models output a probability of cancer",
            hint='leave "objective" out (it is "binary")',
        )
    return canonical


def effective_params(params: dict[str, Any] | None = None, *, seed: int = 2017,
                     scale_pos_weight: float | None = None) -> dict[str, Any]:
    """DEFAULT_PARAMS with ``seed`` and ``scale_pos_weight`` filled in, then the caller's overrides.

    Aliases in ``params`` (``eta``, ``n_estimators``...) are mapped to LightGBM's
    canonical names so that they override the defaults instead of being
    silently ignored by LightGBM.
    """
    user = _canonical_user_params(params)
    effective = dict(DEFAULT_PARAMS)
    effective["seed"] = int(seed)
    if scale_pos_weight is not None and not user.get("is_unbalance", False):
        effective["scale_pos_weight"] = float(scale_pos_weight)
    effective.update(user)
    return effective


# --------------------------------------------------------------------------- split


def _split_key(seed: int, patient_id: str) -> bytes:
    return hashlib.sha256(f"{seed}\x00{patient_id}".encode("utf-8")).digest()


def _check_labels_and_ids(patient_ids: Sequence[str], y: Any) -> tuple[list[str], np.ndarray]:
    ids = [str(p) for p in patient_ids]
    y_arr = np.asarray(y)
    if y_arr.ndim != 1 or y_arr.size != len(ids):
        raise ConfigurationError(
            f"{len(ids)} patient ids but labels of shape {y_arr.shape}",
            hint="pass one 0/1 label per patient, in the order of the patient ids",
        )
    bad = ~np.isin(y_arr, (0, 1))
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ConfigurationError(
            f"patient {ids[i]!r} has label {y_arr[i]!r}; labels must be 0 (no cancer) or 1 (cancer)",
            hint="fix that patient's label or leave the patient unlabelled",
        )
    if len(set(ids)) != len(ids):
        seen: set[str] = set()
        dups = sorted({p for p in ids if p in seen or seen.add(p)})
        raise ConfigurationError(
            f"{len(dups)} patient id(s) appear more than once, e.g. {dups[:3]}",
            hint="give each patient one feature vector and one label",
        )
    return ids, y_arr.astype(np.int64)


def stratified_split(patient_ids: Sequence[str], y: Any, valid_fraction: float = 0.25,
                     seed: int = 2017) -> tuple[np.ndarray, np.ndarray]:
    """Split patients into a training and a validation part, stratified by label.

    Each class contributes ``round(n_class * valid_fraction)`` patients to the
    validation part, at least one and at most ``n_class - 1``.  Which patients
    is decided by SHA-256 of ``seed`` and the patient id, so the split depends
    only on the set of (patient, label) pairs and the seed: not on the input
    order, nor on the numpy version.

    Returns ``(train_idx, valid_idx)``: int64 positions into the inputs, each
    ordered by patient id.  Raises `ConfigurationError` when a class has fewer
    than MIN_PATIENTS_PER_CLASS patients.
    """
    ids, labels = _check_labels_and_ids(patient_ids, y)
    if not (isinstance(valid_fraction, (int, float)) and 0.0 < float(valid_fraction) < 1.0):
        raise ConfigurationError(
            f"valid_fraction must be between 0 and 1 (exclusive), not {valid_fraction!r}",
            hint="0.25 keeps a quarter of each class for validation",
        )
    positives = int(labels.sum())
    counts = {1: positives, 0: len(ids) - positives}
    for label, name in ((1, "with cancer (label 1)"), (0, "without cancer (label 0)")):
        if counts[label] < MIN_PATIENTS_PER_CLASS:
            raise ConfigurationError(
                f"training needs at least {MIN_PATIENTS_PER_CLASS} patients of each class, but the "
                f"{len(ids)} labelled patients include {counts[label]} {name} "
                f"({counts[1]} with cancer, {counts[0]} without)",
                hint="label more patients of that class before training",
            )
    valid: list[int] = []
    for label in (0, 1):
        members = [i for i in range(len(ids)) if labels[i] == label]
        members.sort(key=lambda i: _split_key(seed, ids[i]))
        n_valid = int(math.floor(len(members) * float(valid_fraction) + 0.5))
        n_valid = min(max(n_valid, 1), len(members) - 1)
        valid.extend(members[:n_valid])
    valid_set = set(valid)
    by_id = sorted(range(len(ids)), key=lambda i: ids[i])
    train_idx = np.array([i for i in by_id if i not in valid_set], dtype=np.int64)
    valid_idx = np.array([i for i in by_id if i in valid_set], dtype=np.int64)
    return train_idx, valid_idx


# --------------------------------------------------------------------------- train


@dataclass
class TrainResult:
    """A trained model and what is recorded with it.

    ``model_text`` is LightGBM's text format holding ``best_iteration`` trees;
    ``sha256`` is the hex digest of ``model_text.encode("utf-8")``.
    ``metrics`` is `lungsql.ml.metrics.summary` on the validation part plus
    ``train_patients``, ``train_positives``, ``valid_patients``, ``validation_ids`` (the patients),
    ``best_iteration`` and ``seconds``.  All of ``params`` and ``metrics`` is
    JSON-serialisable.
    """

    model_text: str
    sha256: str
    params: dict[str, Any]
    best_iteration: int
    metrics: dict[str, Any]
    feature_names: list[str]
    valid_patient_ids: list[str] = field(default_factory=list)


_BAD_NAME_CHARS = set('",:[]{}') | {" ", "\t", "\n", "\r"}


def _check_features(X: Any, ids: list[str], feature_names: Sequence[str]) -> tuple[np.ndarray, list[str]]:
    X_arr = np.asarray(X)
    if X_arr.ndim != 2 or X_arr.shape[0] != len(ids):
        raise ConfigurationError(
            f"the feature matrix has shape {X_arr.shape}; expected ({len(ids)}, number of features): "
            f"one row per patient",
            hint="pass one feature vector per labelled patient, in the order of the patient ids",
        )
    if not np.issubdtype(X_arr.dtype, np.floating):
        raise ConfigurationError(f"features must be floating point numbers, not {X_arr.dtype}")
    # NaN means "unknown" (an age not recorded, say): LightGBM learns where to send it.
    infinite = np.isinf(X_arr).any(axis=1)
    if infinite.any():
        bad = [ids[i] for i in np.flatnonzero(infinite)[:3]]
        raise ConfigurationError(
            f"{int(infinite.sum())} patient(s) have infinite features, e.g. {bad}",
            hint="re-extract those patients' features, or leave them out of training",
        )
    names = [str(n) for n in feature_names]
    if len(names) != X_arr.shape[1]:
        raise ConfigurationError(
            f"{len(names)} feature names for {X_arr.shape[1]} features",
            hint="pass one name per column of the feature matrix",
        )
    if len(set(names)) != len(names):
        raise ConfigurationError("feature names must be unique", hint="rename the repeated features")
    for n in names:
        if not n or _BAD_NAME_CHARS & set(n):
            raise ConfigurationError(
                f"feature name {n!r} is empty or contains a space or one of \" , : [ ] {{ }}, which "
                f"LightGBM's model format cannot hold",
                hint="use names such as f0000, f0001, ...",
            )
    return X_arr, names


def _lightgbm_error(exc: Exception, user_params: dict[str, Any]) -> ConfigurationError:
    text = str(exc).strip()
    # LightGBM's messages name the parameter ("Check failed: (num_leaves) > (1)") or
    # quote the value ("Unknown token fast"); find which of the caller's it was.
    named = [name for name in user_params if name in text]
    named += [name for name, value in user_params.items()
              if isinstance(value, str) and value and value in text.split()]
    subject = (f"training parameter {named[0]!r} = {user_params[named[0]]!r}" if named
               else "the training parameters")
    return ConfigurationError(
        f"LightGBM rejected {subject}: {text}",
        hint=f"fix or remove the parameter; allowed values are listed at {_PARAMETERS_DOC}",
    )


class _ProgressFailed(Exception):
    """Carries an exception raised by the caller's ``progress`` out of LightGBM, unchanged."""


def _progress_callback(progress: Callable[[str], None] | None, every: int, rounds_run: list[int]):
    """A LightGBM callback counting rounds into ``rounds_run[0]`` and reporting to ``progress``."""

    def report(env) -> None:
        round_ = env.iteration + 1
        rounds_run[0] = round_
        if progress is not None and round_ % every == 0 and env.evaluation_result_list:
            _, metric, value, _ = env.evaluation_result_list[0]
            try:
                progress(f"round {round_}: valid {metric} {value:.4f}")
            except BaseException as exc:  # a cancel request, say: not a LightGBM error
                raise _ProgressFailed() from exc

    report.order = 10  # before early stopping (order 30), which may end training this round
    return report


def train(X: np.ndarray, y: np.ndarray, patient_ids: Sequence[str], feature_names: Sequence[str],
          params: dict[str, Any] | None = None, valid_fraction: float = 0.25, seed: int = 2017,
          progress: Callable[[str], None] | None = None,
          progress_every: int = PROGRESS_EVERY) -> TrainResult:
    """Train a binary LightGBM classifier of patients and measure it on held-out patients.

    ``X`` is float ``(n, d)``, one feature vector per patient, NaN where a
    value is unknown (LightGBM's missing value); ``y`` the 0/1
    labels; ``patient_ids`` and ``feature_names`` name rows and columns.
    ``params`` overrides DEFAULT_PARAMS (LightGBM names or their aliases).
    ``seed`` drives the split and, unless ``params`` sets a seed, LightGBM.
    ``progress`` receives a line of text before training, every
    ``progress_every`` rounds and at the end; an exception it raises (to
    honour a cancel request, say) stops training and propagates unchanged.

    Raises `ConfigurationError` for bad inputs, too few patients of a class,
    unknown parameters or values LightGBM rejects.
    """
    started = time.perf_counter()
    ids, labels = _check_labels_and_ids(patient_ids, y)
    X_arr, names = _check_features(X, ids, feature_names)
    user = _canonical_user_params(params)
    train_idx, valid_idx = stratified_split(ids, labels, valid_fraction=valid_fraction, seed=seed)
    y_train, y_valid = labels[train_idx], labels[valid_idx]
    train_pos = int(y_train.sum())
    spw = (y_train.size - train_pos) / train_pos
    effective = effective_params(params, seed=seed, scale_pos_weight=spw)
    say = progress or (lambda line: None)
    say(f"training on {train_idx.size} patients ({train_pos} with cancer), validating on "
        f"{valid_idx.size} ({int(y_valid.sum())} with cancer), {len(names)} features")

    lgb = lightgbm_module()
    # LightGBM returns a booster cut to its best iteration; count the rounds run ourselves.
    rounds_run = [0]
    callbacks = [_progress_callback(progress, max(1, int(progress_every)), rounds_run)]
    try:
        train_set = lgb.Dataset(X_arr[train_idx], label=y_train, feature_name=names,
                                params=effective, free_raw_data=True)
        valid_set = lgb.Dataset(X_arr[valid_idx], label=y_valid, reference=train_set)
        booster = lgb.train(effective, train_set, valid_sets=[valid_set], valid_names=["valid"],
                            callbacks=callbacks)
    except _ProgressFailed as failed:
        raise failed.__cause__  # noqa: B904 - the caller's own exception, as it was raised
    except (lgb.basic.LightGBMError, ValueError, TypeError) as exc:
        raise _lightgbm_error(exc, user) from exc

    rounds = rounds_run[0]
    best_iteration = int(booster.best_iteration) or booster.current_iteration()
    model_text = booster.model_to_string(num_iteration=best_iteration)
    # Measure the model exactly as it will be scored: parsed back from its text.
    stored = lgb.Booster(model_str=model_text)
    p_valid = stored.predict(X_arr[valid_idx])
    summary = _metrics.summary(y_valid, p_valid)
    seconds = time.perf_counter() - started
    summary.update(
        train_patients=int(train_idx.size),
        train_positives=train_pos,
        valid_patients=int(valid_idx.size),
        validation_ids=sorted(ids[i] for i in valid_idx),  # an ensemble is measured on its members' common ones
        best_iteration=best_iteration,
        seconds=round(seconds, 3),
    )
    say(f"stopped after round {rounds}, kept the best {best_iteration}: validation AUC "
        f"{summary['auc']:.3f}, log loss {summary['log_loss']:.4f}, sensitivity "
        f"{summary['sensitivity']:.2f}, specificity {summary['specificity']:.2f} ({seconds:.1f} s)")
    return TrainResult(
        model_text=model_text,
        sha256=hashlib.sha256(model_text.encode("utf-8")).hexdigest(),
        params=effective,
        best_iteration=best_iteration,
        metrics=summary,
        feature_names=names,
        valid_patient_ids=[ids[i] for i in valid_idx],
    )
