"""Tests of CNN featurization with ONNX Runtime on tiny CNNs built here (no database)."""

from __future__ import annotations

import hashlib
import math
import threading
from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from lungsql import dicom
from lungsql.dicom import synth  # noqa: E402
from lungsql.errors import ConfigurationError, IntegrityError, InvalidScan  # noqa: E402
from lungsql.dicom.series import read_volume  # noqa: E402
from lungsql.ml.devices import choose_providers  # noqa: E402
from lungsql.ml.featurize import Featurizer  # noqa: E402
from lungsql.ml.features import FEATURE_SET, GroupFeatures, patient_vector, patient_vector_names  # noqa: E402
from lungsql.ml.preprocess import Preprocessing, prepare_volume  # noqa: E402

D = 5
RNG = np.random.default_rng(2017)
WEIGHT = RNG.normal(0, 1, (D, 3)).astype(np.float32)
BIAS = RNG.normal(0, 0.5, D).astype(np.float32)


def tiny_cnn(input_shape=("N", 3, "H", "W"), pooled_4d: bool = False, input_name: str = "input",
             output_name: str = "features") -> bytes:
    """1x1 convolution (3 -> D channels), ReLU, global average pool, flatten (unless `pooled_4d`)."""
    nodes = [
        helper.make_node("Conv", [input_name, "w", "b"], ["conv"]),
        helper.make_node("Relu", ["conv"], ["relu"]),
        helper.make_node("GlobalAveragePool", ["relu"], ["pooled" if not pooled_4d else output_name]),
    ]
    if not pooled_4d:
        nodes.append(helper.make_node("Flatten", ["pooled"], [output_name], axis=1))
    out_shape = ["N", D, 1, 1] if pooled_4d else ["N", D]
    graph = helper.make_graph(
        nodes, "tiny",
        [helper.make_tensor_value_info(input_name, TensorProto.FLOAT, list(input_shape))],
        [helper.make_tensor_value_info(output_name, TensorProto.FLOAT, out_shape)],
        initializer=[numpy_helper.from_array(WEIGHT.reshape(D, 3, 1, 1), "w"), numpy_helper.from_array(BIAS, "b")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model)
    return model.SerializeToString()


def tiny_cnn_numpy(groups: np.ndarray) -> np.ndarray:
    conv = np.einsum("dc,nchw->ndhw", WEIGHT.astype(np.float64), groups.astype(np.float64))
    conv += BIAS[None, :, None, None]
    return np.maximum(conv, 0.0).mean(axis=(2, 3))


SMALL = Preprocessing(image_size=32)


@pytest.fixture(scope="module")
def featurizer() -> Featurizer:
    return Featurizer(tiny_cnn(), "input", "features", SMALL, threads=1)


def _volume(n: int, rows: int = 64, cols: int = 64, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    r, c = np.ogrid[:rows, :cols]
    disc = (r - rows / 2) ** 2 + (c - cols / 2) ** 2 < (0.4 * min(rows, cols)) ** 2
    return [np.where(disc, rng.normal(-700, 300, (rows, cols)), -1000.0).astype(np.float32) for _ in range(n)]


# ----------------------------------------------------------------------------- the CNN


def test_features_are_those_of_the_model(featurizer: Featurizer) -> None:
    groups = prepare_volume(_volume(7), SMALL)
    features = featurizer.run(groups, batch_size=4)
    assert features.shape == (3, D) and features.dtype == np.float32
    np.testing.assert_allclose(features, tiny_cnn_numpy(groups), rtol=1e-5, atol=1e-5)
    assert featurizer.provider == "CPUExecutionProvider"
    assert (featurizer.input_name, featurizer.output_name, featurizer.feature_dim) == ("input", "features", D)


def test_batch_size_does_not_change_features(featurizer: Featurizer) -> None:
    groups = prepare_volume(_volume(20, seed=1), SMALL)  # 7 images
    reference = featurizer.run(groups, batch_size=32)
    for batch_size in (1, 2, 3, 7):
        np.testing.assert_allclose(featurizer.run(groups, batch_size=batch_size), reference, rtol=1e-6, atol=1e-6)


def test_pooled_4d_output_and_static_batch_are_handled() -> None:
    groups = prepare_volume(_volume(10, seed=2), SMALL)  # 4 images
    expected = tiny_cnn_numpy(groups)
    four_d = Featurizer(tiny_cnn(pooled_4d=True), preprocessing=SMALL, threads=1)
    np.testing.assert_allclose(four_d.run(groups, batch_size=3), expected, rtol=1e-5, atol=1e-5)
    fixed = Featurizer(tiny_cnn(input_shape=(1, 3, 32, 32)), preprocessing=SMALL, threads=1)
    np.testing.assert_allclose(fixed.run(groups, batch_size=32), expected, rtol=1e-5, atol=1e-5)
    fixed3 = Featurizer(tiny_cnn(input_shape=(3, 3, 32, 32)), preprocessing=SMALL, threads=1)
    np.testing.assert_allclose(fixed3.run(groups, batch_size=32), expected, rtol=1e-5, atol=1e-5)


def test_model_and_recipe_that_do_not_fit_are_refused() -> None:
    with pytest.raises(ConfigurationError, match="no input named 'image'.*\n.*'input'"):
        Featurizer(tiny_cnn(), input_name="image", preprocessing=SMALL)
    with pytest.raises(ConfigurationError, match="no output named 'logits'"):
        Featurizer(tiny_cnn(), output_name="logits", preprocessing=SMALL)
    with pytest.raises(ConfigurationError, match="LUNGSQL_IMAGE_SIZE"):
        Featurizer(tiny_cnn(input_shape=("N", 3, 224, 224)), preprocessing=SMALL)
    with pytest.raises(ConfigurationError, match="cannot load"):
        Featurizer(b"not an onnx model", preprocessing=SMALL)


def test_unpooled_output_is_refused() -> None:
    graph = helper.make_graph(
        [helper.make_node("Relu", ["input"], ["maps"])], "maps",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, "H", "W"])],
        [helper.make_tensor_value_info("maps", TensorProto.FLOAT, ["N", 3, "H", "W"])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    f = Featurizer(model.SerializeToString(), preprocessing=SMALL, threads=1)
    with pytest.raises(ConfigurationError, match=r"expected \(N, D\) or \(N, D, 1, 1\)"):
        f.run(prepare_volume(_volume(3), SMALL), batch_size=2)


def test_featurize_volume(featurizer: Featurizer) -> None:
    volume = _volume(4, seed=3)
    result = featurizer.featurize_volume(volume, batch_size=8)
    assert result.n_slices == 4 and result.shape == (2, D)
    np.testing.assert_allclose(result.array, tiny_cnn_numpy(prepare_volume(volume, SMALL)), rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- providers


def test_choose_providers() -> None:
    gpu = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    assert choose_providers(gpu) == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert choose_providers(gpu, tensorrt=True) == gpu
    assert choose_providers(["CPUExecutionProvider"]) == ["CPUExecutionProvider"]
    assert choose_providers(["AzureExecutionProvider", "CPUExecutionProvider"]) == ["CPUExecutionProvider"]
    assert choose_providers()[-1] == "CPUExecutionProvider"


def test_no_gpu_means_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    import onnxruntime

    monkeypatch.setattr(onnxruntime, "get_available_providers",
                        lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert choose_providers() == ["CPUExecutionProvider"]


# ----------------------------------------------------------------------------- stored features


def test_group_features_round_trip_through_bytes() -> None:
    array = RNG.normal(0, 1, (4, D)).astype(np.float32)
    stored = GroupFeatures(array, n_slices=11)
    data = stored.to_bytes()
    assert len(data) == 4 * 4 * D and data == array.astype("<f4").tobytes()
    assert stored.sha256 == hashlib.sha256(data).hexdigest()
    for checksum in (stored.sha256, hashlib.sha256(data).digest(), None):
        back = GroupFeatures.from_bytes(data, stored.shape, checksum, n_slices=11)
        assert back.n_slices == 11 and back.array.dtype == np.float32
        np.testing.assert_array_equal(back.array, array)
    assert GroupFeatures.from_bytes(memoryview(data), [4, D], n_slices=11).shape == (4, D)


def test_altered_features_raise_integrity_error() -> None:
    stored = GroupFeatures(np.ones((2, D), np.float32), n_slices=6)
    data = bytearray(stored.to_bytes())
    data[5] ^= 0x01
    with pytest.raises(IntegrityError, match="SHA-256"):
        GroupFeatures.from_bytes(bytes(data), stored.shape, stored.sha256, n_slices=6)
    with pytest.raises(IntegrityError, match="needs 40"):
        GroupFeatures.from_bytes(stored.to_bytes()[:-4], stored.shape, n_slices=6)


# ----------------------------------------------------------------------------- patient vector


def test_patient_vector_is_mean_max_minus_mean_and_log_slices() -> None:
    features = np.array([[1.0, 2.0, -1.0], [3.0, 0.0, -3.0]], np.float32)
    vector = patient_vector(features, n_slices=5)
    assert vector.shape == (2 * 3 + 1,) and vector.dtype == np.float32
    np.testing.assert_allclose(vector, [2.0, 1.0, -2.0, 1.0, 1.0, 1.0, math.log1p(5)], rtol=1e-6)
    names = patient_vector_names(3)
    assert names == ["mean_0", "mean_1", "mean_2", "delta_0", "delta_1", "delta_2", "log_slices"]
    assert FEATURE_SET == "mean-delta-v1"
    np.testing.assert_array_equal(GroupFeatures(features, 5).patient_vector(), vector)


def test_patient_vector_does_not_depend_on_other_patients() -> None:
    a = RNG.normal(0, 1, (6, D)).astype(np.float32)
    b = RNG.normal(0, 1, (9, D)).astype(np.float32)
    alone = patient_vector(a, 17)
    patient_vector(b, 25)  # featurizing someone else changes nothing (no per-cohort fit)
    np.testing.assert_array_equal(patient_vector(a, 17), alone)


# ----------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[synth.Patient]]:
    out = tmp_path_factory.mktemp("cohort")
    synth.write_cohort(out, patients=2, slices=(4, 5), seed=7)
    return out, synth.plan_cohort(2, (4, 5), seed=7)


def _scans(folder: Path) -> list[tuple[bytes, float]]:
    """(bytes, z) as the database holds them, in file-name order (unrelated to z)."""
    files = [p.read_bytes() for p in sorted(folder.glob("*.dcm"))]
    return [(data, dicom.read_scan(data).z_position) for data in files]


def test_synthetic_patients_end_to_end(cohort, featurizer: Featurizer) -> None:
    out, patients = cohort
    volumes = [(p.patient_id, _scans(out / p.patient_id)) for p in patients]
    for p, (_, scans) in zip(patients, volumes):
        hu = read_volume(scans)
        expected = [synth.slice_pixels(p, i).astype(np.float32) + np.float32(synth.RESCALE_INTERCEPT)
                    for i in range(p.geometry.n_slices)]
        assert len(hu) == len(expected)
        for got, want in zip(hu, expected):  # in z order, whatever the files' order
            np.testing.assert_array_equal(got, want)

    sequential = list(featurizer.featurize_volumes(volumes, batch_size=2, overlap=False))
    overlapped = list(featurizer.featurize_volumes(iter(volumes), batch_size=2, overlap=True))
    assert [k for k, _ in sequential] == [k for k, _ in overlapped] == [p.patient_id for p in patients]
    for p, (_, seq), (_, ovl) in zip(patients, sequential, overlapped):
        n = p.geometry.n_slices
        assert seq.n_slices == n and seq.shape == (math.ceil(n / 3), D)
        np.testing.assert_array_equal(seq.array, ovl.array)
        groups = prepare_volume(read_volume(_scans(out / p.patient_id)), SMALL)
        np.testing.assert_allclose(seq.array, tiny_cnn_numpy(groups), rtol=1e-5, atol=1e-5)
        vector = patient_vector(seq.array, seq.n_slices)
        assert vector.shape == (2 * D + 1,) and np.all(np.isfinite(vector))
    assert not np.allclose(sequential[0][1].array.mean(0), sequential[1][1].array.mean(0))


def test_several_cnn_and_preprocessing_threads_keep_results_in_order(cohort, featurizer: Featurizer) -> None:
    out, patients = cohort
    volumes = [(f"{p.patient_id}-{i}", _scans(out / p.patient_id)) for i in range(3) for p in patients]
    expected = list(featurizer.featurize_volumes(volumes, batch_size=2, overlap=False))
    with Featurizer(tiny_cnn(), "input", "features", SMALL, threads=3, prepare_threads=3) as parallel:
        assert (parallel.runs, parallel.prepare_threads) == (3, 3)
        got = list(parallel.featurize_volumes(iter(volumes), batch_size=2))
        many = parallel.run_many([prepare_volume(read_volume(scans), SMALL) for _, scans in volumes], batch_size=1)
        cpu = parallel.cpu.seconds()
    assert [k for k, _ in got] == [k for k, _ in expected]
    for (_, a), (_, b), c in zip(got, expected, many):
        np.testing.assert_allclose(a.array, b.array, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(c, b.array, rtol=1e-6, atol=1e-6)
    assert cpu["cnn"] > 0 and cpu["preprocessing"] > 0 and cpu["decoding"] > 0


def test_overlap_passes_errors_to_the_caller(featurizer: Featurizer) -> None:
    volumes = ((i, [(b"not DICOM", 0.0)]) for i in range(3))
    with pytest.raises(InvalidScan, match="not a DICOM file"):
        list(featurizer.featurize_volumes(volumes, overlap=True))


def test_overlap_stops_its_thread_when_the_consumer_stops(cohort, featurizer: Featurizer) -> None:
    out, patients = cohort
    volumes = [(p.patient_id, _scans(out / p.patient_id)) for p in patients] * 2
    results = featurizer.featurize_volumes(volumes, batch_size=2, overlap=True)
    assert next(results)[0] == patients[0].patient_id
    results.close()
    assert not [t for t in threading.enumerate() if t.name.startswith("lungsql-prepare")]


def test_pixels_that_cannot_be_decoded_say_what_to_install(cohort) -> None:
    import pydicom
    from pydicom.uid import JPEG2000Lossless

    out, patients = cohort
    data, z = _scans(out / patients[0].patient_id)[0]
    ds = dicom.parse(data)
    ds.file_meta.TransferSyntaxUID = JPEG2000Lossless  # claims a compression the bytes are not
    ds.PixelData = pydicom.encaps.encapsulate([b"\x00" * 64])
    with pytest.raises(InvalidScan, match="cannot be decoded: cannot decode compressed pixel data") as error:
        read_volume([(synth.dataset_bytes(ds), z)])
    assert "codecs" in str(error.value)
