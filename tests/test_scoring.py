"""Scoring with a stored model: the SHA-256 check, the per-process cache, predictions."""

from __future__ import annotations

import hashlib

import lightgbm
import numpy as np
import pytest

from lungsql.ml import scoring, training
from lungsql.errors import ConfigurationError, IntegrityError, LungSQLError

D = 40


@pytest.fixture(scope="module")
def stored():
    """A model as training stores it: (text, sha256), and the patients' features."""
    rng = np.random.default_rng(11)
    n = 60
    y = np.array([1] * 24 + [0] * 36)
    X = rng.normal(size=(n, D)).astype(np.float32)
    X[:, :3] += 1.5 * y[:, None]
    result = training.train(X, y, [f"P{i:03d}" for i in range(n)], [f"f{j:03d}" for j in range(D)],
                            params={"num_threads": 1})
    return result.model_text, result.sha256, X


@pytest.fixture(autouse=True)
def empty_cache():
    scoring.cache_clear()
    yield
    scoring.cache_clear()


def test_wrong_sha256_is_refused_before_lightgbm_parses(stored, monkeypatch):
    text, sha, _ = stored

    def booster_must_not_be_built(*args, **kwargs):
        raise AssertionError("LightGBM parsed a model whose hash did not match")

    monkeypatch.setattr(lightgbm, "Booster", booster_must_not_be_built)
    with pytest.raises(IntegrityError) as info:
        scoring.load_model(text, "0" * 64, model_id=7)
    message = str(info.value)
    assert "model 7's bytes do not match their SHA-256" in message
    assert "nothing was scored" in message and "retrain" in info.value.hint
    tampered = text.replace("leaf_value=", "leaf_value=1", 1)
    with pytest.raises(IntegrityError):
        scoring.load_model(tampered, sha, model_id=7)


def test_predictions_are_probabilities_equal_to_lightgbm(stored):
    text, sha, X = stored
    model = scoring.load_model(text, sha)
    p = model.predict(X)
    assert p.dtype == np.float64 and p.shape == (len(X),)
    assert ((p >= 0) & (p <= 1)).all()
    np.testing.assert_array_equal(p, lightgbm.Booster(model_str=text).predict(X))
    # One row at a time (one thread) gives the same numbers as the batch.
    singles = np.array([model.predict(x)[0] for x in X])
    np.testing.assert_array_equal(singles, p)


def test_same_vector_twice_gives_the_same_probability(stored):
    text, sha, X = stored
    model = scoring.load_model(text, sha)
    first = model.predict(X[5])
    assert first.shape == (1,)
    assert model.predict(X[5].copy()) == first
    assert model.predict(X[5].astype(np.float64)) == first


def test_wrong_feature_count_is_a_clear_error(stored):
    text, sha, X = stored
    model = scoring.load_model(text, sha, model_id=3)
    assert model.num_feature == D
    with pytest.raises(ConfigurationError) as info:
        model.predict(np.zeros(1280, dtype=np.float32))
    assert f"model 3 expects feature vectors of {D} values, got 1280" in str(info.value)
    with pytest.raises(ConfigurationError):
        model.predict(X[:, :-1])


def test_infinite_features_are_refused_and_nan_is_missing(stored):
    text, sha, X = stored
    model = scoring.load_model(text, sha)
    bad = X[:4].copy()
    bad[2, 0] = np.inf
    with pytest.raises(LungSQLError, match="first at row 2"):
        model.predict(bad)
    missing = X[:4].copy()
    missing[2, 0] = np.nan
    p = model.predict(missing)
    assert np.isfinite(p).all()
    np.testing.assert_array_equal(p, lightgbm.Booster(model_str=text).predict(missing))


def test_a_model_that_is_not_a_binary_classifier_is_refused():
    X = np.random.default_rng(0).normal(size=(50, 4))
    booster = lightgbm.train({"objective": "regression", "verbosity": -1, "num_threads": 1},
                             lightgbm.Dataset(X, X[:, 0]), num_boost_round=3)
    text = booster.model_to_string()
    with pytest.raises(ConfigurationError, match="not a LightGBM binary classifier"):
        scoring.load_model(text, hashlib.sha256(text.encode()).hexdigest())


def test_cache_parses_once_and_refetches_when_the_hash_changes(stored):
    text, sha, X = stored
    fetched: list[int] = []

    def fetch():
        fetched.append(1)
        return text

    first = scoring.cached_model(1, sha, fetch)
    assert scoring.cached_model(1, sha.upper(), fetch) is first
    assert len(fetched) == 1
    # Model 1 redeployed: a new hash means a new fetch and verification.
    other = text.replace("objective=binary", "objective=binary ", 1)
    other_sha = hashlib.sha256(other.encode()).hexdigest()
    second = scoring.cached_model(1, other_sha, lambda: other)
    assert second is not first and second.sha256 == other_sha
    assert scoring.cached_model(1, sha, fetch) is not first  # the old version was dropped
    assert len(fetched) == 2


def test_cache_does_not_keep_a_model_that_fails_its_check(stored):
    text, sha, _ = stored
    with pytest.raises(IntegrityError):
        scoring.cached_model(2, sha, lambda: text + "\n")
    assert scoring.cached_model(2, sha, lambda: text).sha256 == sha


def test_cache_is_bounded(stored):
    text, sha, _ = stored
    models = [scoring.cached_model(i, sha, lambda: text) for i in range(scoring.CACHE_SIZE + 1)]
    assert len(scoring._cache) == scoring.CACHE_SIZE
    refetched: list[int] = []
    again = scoring.cached_model(0, sha, lambda: refetched.append(1) or text)  # evicted first
    assert refetched and again is not models[0]
    assert scoring.cached_model(scoring.CACHE_SIZE, sha, lambda: 1 / 0) is models[-1]
