"""Score patients with a stored LightGBM model: verify, parse once, predict.

A model is stored as LightGBM's text format with the SHA-256 of its UTF-8
bytes.  `load_model` checks the hash *before* LightGBM parses anything, so a
model altered in its table is never run, and then, once per model per
process, that LightGBM can parse the text without taking the process down
(`lungsql.ml.model_check`).  `cached_model` keeps the last few
parsed models per process: the scoring function runs in a long-lived
PostgreSQL backend, and parsing a few hundred trees over 2561 features takes
milliseconds while scoring one patient takes a fraction of one.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import threading
from collections import OrderedDict
from typing import Any, Callable

import numpy as np

from lungsql.ml import model_check
from lungsql.errors import ConfigurationError, IntegrityError, LungSQLError
from lungsql.ml.training import lightgbm_module

__all__ = [
    "CACHE_SIZE",
    "Model",
    "cache_clear",
    "cached_model",
    "load_model",
]

#: How many parsed models `cached_model` keeps per process.
CACHE_SIZE = 4

# Objectives whose predictions are probabilities in [0, 1].
_PROBABILITY_OBJECTIVES = ("binary", "cross_entropy", "xentropy")
_OBJECTIVE_LINE = re.compile(r"^objective=(\S+)", re.MULTILINE)


def _name(model_id: int | None) -> str:
    return "the model" if model_id is None else f"model {model_id}"


class Model:
    """A verified, parsed LightGBM model that maps feature vectors to cancer probabilities."""

    def __init__(self, booster: Any, sha256: str, model_id: int | None = None):
        self.booster = booster
        self.sha256 = sha256
        self.model_id = model_id
        self.num_feature = int(booster.num_feature())
        self.num_trees = int(booster.num_trees())
        self.feature_names: list[str] = list(booster.feature_name())

    def __repr__(self) -> str:
        return (f"Model(id={self.model_id}, sha256={self.sha256[:12]}..., "
                f"features={self.num_feature}, trees={self.num_trees})")

    def predict(self, vectors: np.ndarray) -> np.ndarray:
        """Probabilities of cancer, float64 in [0, 1]: shape ``(n,)`` for ``(n, d)`` input,
        shape ``(1,)`` for one ``(d,)`` vector.

        Raises `ConfigurationError` when ``d`` is not the model's feature count
        (the features come from another CNN than the one the model was trained
        on) and `LungSQLError` for infinite features; NaN is a missing value.
        """
        x = np.asarray(vectors)
        if x.ndim == 1:
            x = x[np.newaxis, :]
        if x.ndim != 2 or x.shape[1] != self.num_feature:
            got = x.shape[-1] if x.ndim >= 1 else 0
            raise ConfigurationError(
                f"{_name(self.model_id)} expects feature vectors of {self.num_feature} values, "
                f"got {got} (array of shape {np.shape(vectors)})",
                hint="score with the model trained on features of the same CNN, or retrain the "
                     "classifier on the current CNN's features",
            )
        if x.shape[0] == 0:
            return np.empty(0, dtype=np.float64)
        if not np.issubdtype(x.dtype, np.floating):
            x = x.astype(np.float64)
        # NaN is a missing value, which the trees route as they learnt; infinity is a bug.
        infinite = np.isinf(x).any(axis=1)
        if infinite.any():
            raise LungSQLError(
                f"{int(infinite.sum())} feature vector(s) contain infinite values "
                f"(first at row {int(np.flatnonzero(infinite)[0])}); nothing was scored",
                hint="re-extract the features of those patients",
            )
        # float64 C-contiguous is LightGBM's native layout: no copy inside predict.
        x = np.ascontiguousarray(x, dtype=np.float64)
        # One row: thread start-up would cost more than the trees themselves.
        kwargs = {"num_threads": 1} if x.shape[0] < 64 else {}
        p = self.booster.predict(x, **kwargs)
        return np.asarray(p, dtype=np.float64).reshape(-1)


def load_model(model_text: str, sha256: str, model_id: int | None = None) -> Model:
    """Verify ``model_text`` against its stored SHA-256, then parse it.

    Raises `IntegrityError` when the hash does not match (LightGBM never sees
    the text) and `ConfigurationError` when the text is not a LightGBM binary
    classifier or is malformed.  Before this process first parses a text, the
    text is checked by `lungsql.ml.model_check.check` (its layout in Python, then
    LightGBM in a child process), since LightGBM's parser can abort the
    process that runs it, here a database backend.
    """
    if isinstance(model_text, (bytes, bytearray, memoryview)):
        data = bytes(model_text)
        model_text = data.decode("utf-8", errors="replace")
    elif isinstance(model_text, str):
        data = model_text.encode("utf-8")
    else:
        raise IntegrityError(
            f"{_name(model_id)} has no model text ({type(model_text).__name__}); nothing was scored",
            hint="retrain the model or redeploy its text and SHA-256",
        )
    expected = str(sha256 or "").strip().lower()
    actual = hashlib.sha256(data).hexdigest()
    if not hmac.compare_digest(actual, expected):
        raise IntegrityError(
            f"{_name(model_id)}'s bytes do not match their SHA-256: the stored model was altered "
            f"or corrupted (stored {expected[:16] or 'nothing'}..., computed {actual[:16]}...); "
            f"nothing was scored",
            hint="retrain the model, or redeploy it from a copy whose SHA-256 matches",
        )
    objective = _OBJECTIVE_LINE.search(model_text)
    if objective is None or objective.group(1) not in _PROBABILITY_OBJECTIVES:
        found = objective.group(1) if objective else "none"
        raise ConfigurationError(
            f"{_name(model_id)} is not a LightGBM binary classifier (objective: {found}); "
            f"its outputs would not be probabilities; nothing was scored",
            hint="train the model with lungsql, which uses objective=binary",
        )
    # LightGBM's parser aborts the process on some malformed texts: check the text first (once per
    # process), importing LightGBM here while the check process runs.
    model_check.check(data, actual, _name(model_id), meanwhile=lightgbm_module)
    lightgbm = lightgbm_module()
    try:
        booster = lightgbm.Booster(model_str=model_text)
    except lightgbm.basic.LightGBMError as exc:
        raise ConfigurationError(
            f"LightGBM cannot read {_name(model_id)}: {str(exc).strip()}; nothing was scored",
            hint="retrain the model, or redeploy it with a LightGBM version that can read it",
        ) from exc
    return Model(booster, actual, model_id)


_cache: OrderedDict[tuple[int, str], Model] = OrderedDict()
_cache_lock = threading.Lock()


def cached_model(model_id: int, sha256: str, fetch_text: Callable[[], str]) -> Model:
    """The parsed model ``model_id`` with hash ``sha256``, parsed at most once per process.

    ``fetch_text`` is called only on a miss and returns the stored model text.
    The key includes the hash, so a model redeployed under the same id is
    fetched and verified again.  The CACHE_SIZE most recently used models are kept.
    """
    key = (int(model_id), str(sha256).strip().lower())
    with _cache_lock:
        model = _cache.get(key)
        if model is not None:
            _cache.move_to_end(key)
            return model
    model = load_model(fetch_text(), key[1], model_id=key[0])
    with _cache_lock:
        for old in [k for k in _cache if k[0] == key[0] and k != key]:
            del _cache[old]  # an older version of this model id
        _cache[key] = model
        _cache.move_to_end(key)
        while len(_cache) > CACHE_SIZE:
            _cache.popitem(last=False)
    return model


def cache_clear() -> None:
    """Forget every parsed model (the next `cached_model` call fetches again).

    Which texts were checked (`lungsql.ml.model_check`) is kept: a text with the
    same SHA-256 is the same text."""
    with _cache_lock:
        _cache.clear()
