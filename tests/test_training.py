"""Metrics, the patient split and LightGBM training (no database needed).

Training tests pass ``num_threads=1``: the trees do not depend on the thread
count (checked below), and on a busy machine OpenMP threads competing for
cores can make a one-second training take a minute.
"""

from __future__ import annotations

import hashlib
import json
import math

import numpy as np
import pytest

from lungsql.ml import metrics, training
from lungsql.errors import ConfigurationError

ONE_THREAD = {"num_threads": 1}


# --------------------------------------------------------------------------- metrics


def brute_force_auc(y, p):
    pos = [pi for yi, pi in zip(y, p) if yi == 1]
    neg = [pi for yi, pi in zip(y, p) if yi == 0]
    wins = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a in pos for b in neg)
    return wins / (len(pos) * len(neg))


def test_auc_hand_computed():
    assert metrics.roc_auc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == pytest.approx(0.75)
    assert metrics.roc_auc([0, 0, 1, 1], [0.1, 0.2, 0.7, 0.9]) == 1.0  # perfect
    assert metrics.roc_auc([0, 0, 1, 1], [0.9, 0.7, 0.2, 0.1]) == 0.0  # reversed
    assert metrics.roc_auc([0, 1, 0, 1], [0.5, 0.5, 0.5, 0.5]) == 0.5  # all tied
    # Partial ties: positives {0.5, 0.9, 0.5} against negatives {0.1, 0.5} win 5 of 6 pairs.
    assert metrics.roc_auc([0, 0, 1, 1, 1], [0.1, 0.5, 0.5, 0.9, 0.5]) == pytest.approx(5 / 6)


def test_auc_matches_pairwise_count_and_roc_area_with_many_ties():
    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 300)
    p = np.round(rng.random(300) * 0.6 + 0.4 * y, 1)  # one decimal: many ties
    auc = metrics.roc_auc(y, p)
    assert auc == pytest.approx(brute_force_auc(y, p), abs=1e-12)
    fpr, tpr, _ = metrics.roc_curve(y, p)
    trapezoid = float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2))
    assert auc == pytest.approx(trapezoid, abs=1e-12)


def test_roc_curve_points():
    fpr, tpr, thresholds = metrics.roc_curve([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8])
    assert fpr.tolist() == [0.0, 0.0, 0.5, 0.5, 1.0]
    assert tpr.tolist() == [0.0, 0.5, 0.5, 1.0, 1.0]
    assert thresholds.tolist() == [math.inf, 0.8, 0.4, 0.35, 0.1]


def test_log_loss_and_brier_hand_computed():
    assert metrics.log_loss([1, 0], [0.8, 0.3]) == pytest.approx(-(math.log(0.8) + math.log(0.7)) / 2)
    # Clipped: a certain mistake costs -ln(1e-15), not infinity.
    assert metrics.log_loss([1, 1], [0.0, 1.0]) == pytest.approx(-math.log(1e-15) / 2)
    assert metrics.brier([1, 0, 1], [0.9, 0.2, 0.4]) == pytest.approx((0.01 + 0.04 + 0.36) / 3)
    assert metrics.brier([1, 0], [1.0, 0.0]) == 0.0


def test_confusion_at_threshold():
    c = metrics.confusion_at([1, 1, 1, 0, 0], [0.9, 0.5, 0.2, 0.5, 0.1])  # p >= 0.5 is positive
    assert (c.tp, c.fn, c.fp, c.tn) == (2, 1, 1, 1)
    assert c.sensitivity == pytest.approx(2 / 3)
    assert c.specificity == pytest.approx(1 / 2)
    strict = metrics.confusion_at([1, 1, 1, 0, 0], [0.9, 0.5, 0.2, 0.5, 0.1], threshold=0.6)
    assert (strict.tp, strict.fn, strict.fp, strict.tn) == (1, 2, 0, 2)


def test_summary_is_json_and_thins_the_roc_curve():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 1000)
    p = np.clip(rng.normal(0.35 + 0.3 * y, 0.2), 0, 1)
    s = metrics.summary(y, p)
    assert json.loads(json.dumps(s, allow_nan=False)) == s
    assert (s["n"], s["positives"], s["negatives"]) == (1000, int(y.sum()), 1000 - int(y.sum()))
    assert s["auc"] == pytest.approx(metrics.roc_auc(y, p))
    roc = s["roc"]
    assert 2 <= len(roc["fpr"]) <= metrics.ROC_MAX_POINTS
    assert len(roc["fpr"]) == len(roc["tpr"]) == len(roc["threshold"])
    assert (roc["fpr"][0], roc["tpr"][0], roc["threshold"][0]) == (0.0, 0.0, None)
    assert (roc["fpr"][-1], roc["tpr"][-1]) == (1.0, 1.0)
    assert roc["fpr"] == sorted(roc["fpr"]) and roc["tpr"] == sorted(roc["tpr"])


@pytest.mark.parametrize("labels, missing", [([0, 0, 0], "positive"), ([1, 1, 1], "negative")])
def test_summary_names_the_missing_class(labels, missing):
    with pytest.raises(ConfigurationError) as info:
        metrics.summary(labels, [0.2, 0.5, 0.7])
    message = str(info.value)
    assert f"no {missing}" in message and "3 labelled patients" in message
    assert info.value.hint


def test_metrics_reject_bad_input():
    with pytest.raises(ConfigurationError, match="labels must be 0"):
        metrics.roc_auc([0, 2], [0.1, 0.2])
    with pytest.raises(ConfigurationError, match="3 labels but 2 probabilities"):
        metrics.brier([0, 1, 1], [0.1, 0.2])


# --------------------------------------------------------------------------- split


def cohort(n_pos, n_neg):
    ids = [f"LIDC-{i:04d}" for i in range(n_pos + n_neg)]
    y = np.array([1] * n_pos + [0] * n_neg)
    return ids, y


def test_split_is_stratified_disjoint_and_covering():
    ids, y = cohort(30, 90)
    train_idx, valid_idx = training.stratified_split(ids, y, valid_fraction=0.25, seed=2017)
    assert set(train_idx).isdisjoint(valid_idx)
    assert sorted([*train_idx, *valid_idx]) == list(range(120))
    assert int(y[valid_idx].sum()) == 8  # round(30 * 0.25) = round(7.5)
    assert int((y[valid_idx] == 0).sum()) == 23  # round(22.5)
    assert [ids[i] for i in train_idx] == sorted(ids[i] for i in train_idx)  # ordered by patient id


def test_split_is_deterministic_and_independent_of_input_order():
    ids, y = cohort(20, 50)
    _, valid = training.stratified_split(ids, y, seed=7)
    _, again = training.stratified_split(ids, y, seed=7)
    assert valid.tolist() == again.tolist()
    order = np.random.default_rng(1).permutation(len(ids))
    shuffled_ids, shuffled_y = [ids[i] for i in order], y[order]
    _, shuffled_valid = training.stratified_split(shuffled_ids, shuffled_y, seed=7)
    assert [shuffled_ids[i] for i in shuffled_valid] == [ids[i] for i in valid]
    _, other_seed = training.stratified_split(ids, y, seed=8)
    assert set(other_seed.tolist()) != set(valid.tolist())


def test_split_keeps_both_classes_on_both_sides_of_a_small_cohort():
    ids, y = cohort(4, 4)
    train_idx, valid_idx = training.stratified_split(ids, y, valid_fraction=0.05)
    assert set(y[train_idx]) == {0, 1} and set(y[valid_idx]) == {0, 1}


def test_split_refuses_too_few_patients_of_a_class():
    ids, y = cohort(3, 40)
    with pytest.raises(ConfigurationError) as info:
        training.stratified_split(ids, y)
    assert "3 with cancer" in str(info.value) and "43 labelled patients" in str(info.value)


def test_split_rejects_duplicate_ids_and_bad_fraction():
    ids, y = cohort(5, 5)
    with pytest.raises(ConfigurationError, match="more than once"):
        training.stratified_split(ids[:-1] + ids[:1], y)
    with pytest.raises(ConfigurationError, match="valid_fraction"):
        training.stratified_split(ids, y, valid_fraction=1.0)


# --------------------------------------------------------------------------- train


def synthetic(n=80, d=2561, seed=0):
    """n patients, 3/8 with cancer; the first 5 of d features carry the label, plus noise.

    With the default seed the validation part is not perfectly separable, so
    the validation log loss stops improving and early stopping ends training.
    """
    rng = np.random.default_rng(seed)
    y = np.array([1] * (n * 3 // 8) + [0] * (n - n * 3 // 8))
    X = rng.normal(size=(n, d)).astype(np.float32)
    X[:, :5] += 2.0 * y[:, None]
    ids = [f"P{i:04d}" for i in range(n)]
    names = [f"f{j:04d}" for j in range(d)]
    return X, y, ids, names


@pytest.fixture(scope="module")
def easy():
    return synthetic()


@pytest.fixture(scope="module")
def trained(easy):
    X, y, ids, names = easy
    lines: list[str] = []
    result = training.train(X, y, ids, names, params=ONE_THREAD, progress=lines.append)
    return result, lines


def test_training_separates_an_easy_problem(trained):
    result, _ = trained
    assert result.metrics["auc"] >= 0.9
    assert "objective=binary" in result.model_text
    assert result.params["objective"] == "binary"
    assert result.params["scale_pos_weight"] == pytest.approx(37 / 22)  # training part: 22 of 59
    assert result.metrics["train_patients"] + result.metrics["valid_patients"] == 80
    assert result.metrics["valid_patients"] == len(result.valid_patient_ids) == 21
    assert result.metrics["best_iteration"] == result.best_iteration
    assert result.model_text.count("Tree=") == result.best_iteration
    assert len(result.feature_names) == 2561
    assert result.sha256 == hashlib.sha256(result.model_text.encode("utf-8")).hexdigest()
    json.dumps({"params": result.params, "metrics": result.metrics}, allow_nan=False)


def test_early_stopping_and_progress_lines(trained):
    result, lines = trained
    assert result.best_iteration < result.params["num_iterations"] == 2000
    assert lines[0].startswith("training on 59 patients (22 with cancer), validating on 21")
    assert lines[1].startswith("round 50: valid binary_logloss ")
    assert lines[-1].startswith(f"stopped after round {result.best_iteration + 50}, "
                                f"kept the best {result.best_iteration}")


def test_an_exception_from_progress_stops_training_unchanged():
    X, y, ids, names = synthetic(n=40, d=10)

    def cancel(line):
        if line.startswith("round "):
            raise KeyboardInterrupt("canceling statement due to user request")

    with pytest.raises(KeyboardInterrupt, match="user request"):
        training.train(X, y, ids, names, params=ONE_THREAD, progress=cancel, progress_every=5)


def test_training_is_deterministic_whatever_the_input_order(easy, trained):
    X, y, ids, names = easy
    first, _ = trained
    order = np.random.default_rng(5).permutation(len(ids))
    again = training.train(X[order], y[order], [ids[i] for i in order], names, params=ONE_THREAD)
    assert again.model_text == first.model_text
    assert again.sha256 == first.sha256
    drop = ("seconds",)
    assert {k: v for k, v in again.metrics.items() if k not in drop} == \
        {k: v for k, v in first.metrics.items() if k not in drop}
    assert again.valid_patient_ids == first.valid_patient_ids


def test_trees_do_not_depend_on_the_thread_count():
    X, y, ids, names = synthetic(n=60, d=200, seed=4)
    short = {"num_iterations": 20, "early_stopping_round": 0}  # 2 threads on a busy machine: slow
    one = training.train(X, y, ids, names, params={"num_threads": 1, **short})
    two = training.train(X, y, ids, names, params={"num_threads": 2, **short})
    assert one.best_iteration == 20
    trees = lambda text: text.split("end of trees")[0]  # noqa: E731 - the parameters differ
    assert trees(one.model_text) == trees(two.model_text)


def test_user_params_override_defaults_and_aliases_are_honoured():
    X, y, ids, names = synthetic(n=60, d=50, seed=1)
    result = training.train(X, y, ids, names, params={"num_leaves": 7, "eta": 0.2, "n_jobs": 1})
    assert result.params["num_leaves"] == 7 and result.params["learning_rate"] == 0.2
    assert "eta" not in result.params and "n_jobs" not in result.params
    assert "[num_leaves: 7]" in result.model_text
    assert "[learning_rate: 0.2]" in result.model_text


def test_is_unbalance_replaces_scale_pos_weight():
    X, y, ids, names = synthetic(n=60, d=50, seed=1)
    result = training.train(X, y, ids, names, params={"is_unbalance": True, **ONE_THREAD})
    assert "scale_pos_weight" not in result.params
    assert "[is_unbalance: 1]" in result.model_text


@pytest.mark.parametrize("params, named", [
    ({"num_leaves": -3}, "'num_leaves'"),
    ({"bagging_fraction": 2.0}, "'bagging_fraction'"),
    ({"learning_rate": "fast"}, "'learning_rate'"),
    ({"num_leafs": 7}, "did you mean 'num_leaves'"),
    ({"eta": 0.1, "learning_rate": 0.2}, "given twice"),
    ({"objective": "regression"}, "objective 'regression' is not supported"),
])
def test_bad_parameters_are_configuration_errors_naming_them(params, named):
    X, y, ids, names = synthetic(n=40, d=10)
    with pytest.raises(ConfigurationError) as info:
        training.train(X, y, ids, names, params={**params, **ONE_THREAD})
    assert named in str(info.value)


def test_train_rejects_bad_inputs():
    X, y, ids, names = synthetic(n=40, d=10)
    with pytest.raises(ConfigurationError, match="10 feature names for 9 features"):
        training.train(X[:, :9], y, ids, names)
    bad = X.copy()
    bad[3, 2] = -np.inf
    with pytest.raises(ConfigurationError, match="infinite features, e.g. \\['P0003'\\]"):
        training.train(bad, y, ids, names)
    with pytest.raises(ConfigurationError, match="feature name 'f 1'"):
        training.train(X, y, ids, ["f 1", *names[1:]])
    with pytest.raises(ConfigurationError, match="at least 4 patients of each class"):
        training.train(X[12:], y[12:], ids[12:], names)  # 3 with cancer left


def test_nan_is_a_missing_value():
    X, y, ids, names = synthetic(n=60, d=20, seed=2)
    X[::3, 0] = np.nan  # a third of the values of a telling feature unknown
    result = training.train(X, y, ids, names, params=ONE_THREAD)
    assert result.metrics["auc"] >= 0.9


def test_fallback_aliases_agree_with_lightgbm():
    try:
        from lightgbm.basic import _ConfigAliases  # private: the fallback exists for its absence
    except ImportError:
        pytest.skip("this LightGBM has no _ConfigAliases")
    table = _ConfigAliases._get_all_param_aliases()
    for main, aliases in training._FALLBACK_ALIASES.items():
        assert set(aliases) <= set(table[main]), main
    assert set(training.DEFAULT_PARAMS) <= set(table)
