"""A stored model as one portable ONNX file: `lungsql model export MODEL_ID OUT.onnx`.

`export_model` reads a trained model from lungsql.models and the CNN its
features came from from lungsql.cnn_models, checks both against their stored
SHA-256 (and the model text as the scoring function checks it, before LightGBM
parses it), and writes the portable model of lungsql.ml.portable: the CT
volume in, the probability of cancer out, what lungsql.predict_lung_cancer
gives for the same patient, runnable with ONNX Runtime alone.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from lungsql.errors import ConfigurationError, IntegrityError

_MODELS_HINT = "list the models: SELECT model_id, name, version, trained_at FROM lungsql.models ORDER BY model_id"


def export_model(engine: sa.Engine, model_id: int, out: Path) -> dict[str, Any]:
    """Write model `model_id` as a portable ONNX model at `out` (atomically: a temporary file
    beside it, then a rename); returns what was written: path, bytes, sha256, the model,
    its CNN, the inputs and outputs, and the seconds it took.

    Raises `ConfigurationError` for an unknown model id, a model of a feature set or a CNN
    the portable model cannot compute, and `IntegrityError` when the stored model text or
    CNN bytes do not match their SHA-256.
    """
    from lungsql.ml import portable, runtimes, scoring
    from lungsql.ml.preprocess import Preprocessing

    started = time.perf_counter()
    if isinstance(model_id, bool) or not isinstance(model_id, int) or model_id < 1:
        raise ConfigurationError(f"a model id is a positive whole number, got {model_id!r}", hint=_MODELS_HINT)
    out = Path(out)
    if out.is_dir():
        raise ConfigurationError(f"{out} is a folder", hint="give the file to write, e.g. model.onnx")
    with engine.connect() as conn:
        model = conn.execute(
            sa.text("SELECT model_id, name, version, cnn_id, feature_set, feature_names, model_text, sha256 "
                    "FROM lungsql.models WHERE model_id = :model_id"),
            {"model_id": model_id}).mappings().first()
        if model is None:
            raise ConfigurationError(f"there is no model with id {model_id}", hint=_MODELS_HINT)
        cnn = conn.execute(
            sa.text("SELECT cnn_id, name, model, sha256, input_name, output_name, feature_dim, preprocessing, source "
                    "FROM lungsql.cnn_models WHERE cnn_id = :cnn_id"),
            {"cnn_id": model["cnn_id"]}).mappings().first()
    label = f"model {model_id} ({model['name']!r} version {model['version']})"
    if cnn is None:
        raise ConfigurationError(f"the CNN of {label} (cnn_id {model['cnn_id']}) is no longer stored",
                                 hint="import it again, featurize and retrain; or export another model")
    if model["feature_set"] != portable.FEATURE_SET:
        raise ConfigurationError(
            f"{label} was trained on the feature set {model['feature_set']!r}; a portable model computes "
            f"{portable.FEATURE_SET!r} only",
            hint="retrain it with this lungsql: SELECT * FROM lungsql.train_model(), then export the new model")
    names = _json(model["feature_names"])
    if not isinstance(names, list) or not names:
        raise ConfigurationError(f"{label} records no feature names", hint="retrain it: SELECT * FROM "
                                 "lungsql.train_model()")
    dim = sum(1 for n in names if str(n).startswith("mean_"))
    if dim != int(cnn["feature_dim"]):
        raise ConfigurationError(
            f"{label} was trained on {dim} CNN features per image, but its CNN {cnn['name']!r} gives "
            f"{cnn['feature_dim']}",
            hint=f"the CNN {cnn['name']!r} was replaced after training: retrain the model on its features")

    # The model text is checked as the scoring function checks it (SHA-256, objective, a parse in a
    # child process) before LightGBM reads it here; the CNN's bytes against their SHA-256.
    scoring.load_model(model["model_text"], model["sha256"], model_id=model_id)
    cnn_bytes = bytes(cnn["model"])
    if hashlib.sha256(cnn_bytes).hexdigest() != cnn["sha256"]:
        raise IntegrityError(
            f"the bytes of CNN {cnn['name']!r} do not match their SHA-256: the stored model was altered; "
            "nothing was exported",
            hint=f"import the CNN again: lungsql model import ... --name {cnn['name']}")
    preprocessing = Preprocessing.from_json(_json(cnn["preprocessing"]))
    data = portable.portable_model(
        cnn_bytes, cnn["input_name"], cnn["output_name"], model["model_text"], names,
        preprocessing=preprocessing, cnn_name=cnn["name"], model_id=model_id, model_name=model["name"],
        model_version=model["version"])
    _atomic_write(out, data)
    return {
        "path": str(out),
        "bytes": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
        "model_id": model_id,
        "name": model["name"],
        "version": model["version"],
        "cnn": cnn["name"],
        # The file runs the CNN in ONNX Runtime; the database may run it elsewhere (OpenVINO's variants).
        "cnn_runtime_in_database": runtimes.Runtime.from_source(_json(cnn["source"])).describe(),
        **portable.signature(data),
        "seconds": round(time.perf_counter() - started, 3),
    }


def _atomic_write(path: Path, data: bytes) -> None:
    """`data` at `path`, whole or not at all: written to a temporary file beside it, then renamed."""
    if not path.parent.is_dir():
        raise ConfigurationError(f"the folder {path.parent} does not exist", hint="create it, or write elsewhere")
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; the model is meant to be shared
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _json(value: Any) -> Any:
    return json.loads(value) if isinstance(value, (str, bytes)) else value
