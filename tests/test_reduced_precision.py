"""Reduced-precision CNNs: an INT8 variant quantized on CT slices and run by ONNX Runtime or
OpenVINO, and a bf16 variant on OpenVINO, each a CNN of its own whose features stay close to
fp32's and whose models train on its own features; the runtime a CNN's row names is the one that
runs it, or featurization stops with what to do."""

from __future__ import annotations

import json

import numpy as np
import pytest
import sqlalchemy as sa
from click.testing import CliRunner

from lungsql.client import cnns, ingest
from lungsql.client.cli import main
from lungsql.dicom import synth
from lungsql.errors import ConfigurationError
from lungsql.ml import devices, quantize, runtimes
from lungsql.ml.featurize import Featurizer
from lungsql.ml.preprocess import Preprocessing
from lungsql.server import pipeline

onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

SMALL = Preprocessing(image_size=32)


def conv_cnn(seed: int = 0) -> bytes:
    """Two 3x3 convolutions with ReLU6 (Clip), a residual addition, global pooling: the operators
    an EfficientNet-Lite is made of, small enough to quantize in a second."""
    rng = np.random.default_rng(seed)
    w1 = numpy_helper.from_array(rng.normal(0, 0.3, (8, 3, 3, 3)).astype(np.float32), "w1")
    w2 = numpy_helper.from_array(rng.normal(0, 0.2, (8, 8, 3, 3)).astype(np.float32), "w2")
    low, high = numpy_helper.from_array(np.float32(0), "low"), numpy_helper.from_array(np.float32(6), "high")
    nodes = [
        helper.make_node("Conv", ["input", "w1"], ["c1"], pads=[1, 1, 1, 1], name="/stem/Conv"),
        helper.make_node("Clip", ["c1", "low", "high"], ["a1"], name="/stem/Clip"),
        helper.make_node("Conv", ["a1", "w2"], ["c2"], pads=[1, 1, 1, 1], name="/_blocks.0/Conv"),
        helper.make_node("Add", ["c2", "a1"], ["sum"], name="/_blocks.1/Add"),
        helper.make_node("Clip", ["sum", "low", "high"], ["feature_map"], name="/head/Clip"),
        helper.make_node("GlobalAveragePool", ["feature_map"], ["pooled"], name="/pool"),
        helper.make_node("Flatten", ["pooled"], ["features"], axis=1, name="/flatten"),
    ]
    graph = helper.make_graph(nodes, "conv", [helper.make_tensor_value_info("input", TensorProto.FLOAT,
                                                                             ["N", 3, 32, 32])],
                              [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["N", 8])],
                              initializer=[w1, w2, low, high])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model)
    return model.SerializeToString()


def ct_images(n: int = 24, seed: int = 3) -> np.ndarray:
    """CT slices of the synthetic phantom prepared as featurization prepares them, at 32 px."""
    patient = synth.plan_cohort(1, (n, n), seed=seed)[0]
    from lungsql.ml.preprocess import prepare_volume

    stored = [synth.slice_pixels(patient, i) for i in range(n)]
    rescale = np.tile([synth.RESCALE_SLOPE, synth.RESCALE_INTERCEPT], (n, 1))
    return prepare_volume(stored, SMALL, rescale)


# -- the INT8 file ---------------------------------------------------------------------------------------
def test_quantization_is_static_qdq_deterministic_and_close_to_fp32():
    model, images = conv_cnn(), ct_images()
    recipe = quantize.Recipe(float_nodes=())
    first = quantize.quantize(model, "input", images, recipe)
    assert first == quantize.quantize(model, "input", images, recipe)  # the same inputs, the same bytes
    parsed = onnx.load_from_string(first)
    ops = {n.op_type for n in parsed.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", "Conv"} <= ops
    assert {o.domain for o in parsed.opset_import} <= {"", "ai.onnx"}  # standard operators only
    weights = {i.name: i for i in parsed.graph.initializer}
    assert any(w.data_type == TensorProto.INT8 and len(w.dims) == 4 for w in weights.values())  # int8 weights
    assert json.loads({p.key: p.value for p in parsed.metadata_props}["recipe"])["format"] == "QDQ"
    with Featurizer(model, preprocessing=SMALL, threads=1) as fp32, \
            Featurizer(first, preprocessing=SMALL, threads=1) as int8:
        agreement = quantize.feature_agreement(fp32.run(images), int8.run(images))
    assert agreement["cosine_mean"] >= 0.99 and agreement["images"] == len(images)


def test_nodes_kept_in_float_have_no_quantized_weights():
    model, images = conv_cnn(), ct_images()
    parsed = onnx.load_from_string(quantize.quantize(model, "input", images, quantize.Recipe(float_nodes=("/_blocks.0/",))))
    kept = next(n for n in parsed.graph.node if n.name == "/_blocks.0/Conv")
    producers = {o: n for n in parsed.graph.node for o in n.output}
    weight = kept.input[1]
    assert weight == "w2" or producers.get(weight) is None  # its weights stay a float32 initializer
    assert {i.name: i.data_type for i in parsed.graph.initializer}["w2"] == TensorProto.FLOAT


def test_feature_agreement_refuses_features_of_different_shapes():
    with pytest.raises(ValueError, match="different shapes"):
        quantize.feature_agreement(np.ones((2, 3)), np.ones((3, 3)))


# -- runtimes ---------------------------------------------------------------------------------------------
def test_a_cnn_row_names_its_runtime_and_a_wrong_one_is_refused_with_the_choices():
    assert runtimes.Runtime.from_source({}) == runtimes.Runtime() and runtimes.Runtime().default
    assert runtimes.Runtime.from_source({"runtime": {"engine": "openvino", "precision": "bf16"}}) == \
        runtimes.Runtime("openvino", "bf16")
    with pytest.raises(ConfigurationError, match="unknown CNN runtime 'tensorflow'"):
        runtimes.Runtime.from_source({"runtime": {"engine": "tensorflow"}})
    with pytest.raises(ConfigurationError, match="bf16 runs on OpenVINO"):
        runtimes.Runtime("onnxruntime", "bf16")
    with pytest.raises(ConfigurationError, match="must be an object"):
        runtimes.Runtime.from_source({"runtime": "openvino"})
    # As SQL Server keeps it: JSON text, which may be anything
    assert runtimes.Runtime.from_source('{"runtime": {"engine": "openvino"}}') == runtimes.Runtime("openvino", "fp32")
    with pytest.raises(ConfigurationError, match="source is not JSON"):
        runtimes.Runtime.from_source('{"runtime": ')
    with pytest.raises(ConfigurationError, match="must be a JSON object, not list"):
        runtimes.Runtime.from_source("[1, 2]")
    with pytest.raises(ConfigurationError, match="unknown CNN runtime") as huge:
        runtimes.Runtime.from_source({"runtime": {"engine": "x" * 100_000}})
    assert len(str(huge.value)) < 500  # a huge value is not echoed whole


def test_openvino_gives_onnxruntimes_features_from_several_threads_at_once():
    model, images = conv_cnn(), np.concatenate([ct_images()] * 4)
    with Featurizer(model, preprocessing=SMALL, threads=1) as reference, \
            Featurizer(model, preprocessing=SMALL, threads=2, batch_size=8,
                       runtime=runtimes.Runtime("openvino", "fp32")) as openvino:
        assert openvino.provider == runtimes.OPENVINO_CPU and openvino.runs == 2  # CPU mode: a run per thread
        expected, got = reference.run(images), openvino.run(images)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


def test_bf16_runs_where_the_cpu_has_it_and_is_refused_where_it_has_not(monkeypatch):
    model, images = conv_cnn(), ct_images()
    bf16 = runtimes.Runtime("openvino", "bf16")
    if runtimes.cpu_has_bf16():
        with Featurizer(model, preprocessing=SMALL, threads=1) as reference, \
                Featurizer(model, preprocessing=SMALL, threads=1, runtime=bf16) as reduced:
            agreement = quantize.feature_agreement(reference.run(images), reduced.run(images))
        assert agreement["cosine_mean"] >= 0.99
    monkeypatch.setattr(runtimes, "cpu_has_bf16", lambda: False)  # a server whose CPU has no BF16
    with pytest.raises(ConfigurationError, match="this CPU cannot do") as refused:
        Featurizer(model, preprocessing=SMALL, threads=1, runtime=bf16)
    assert "fp32 or int8 variant" in refused.value.hint


def test_a_cnn_on_openvino_where_openvino_is_missing_says_what_to_install(monkeypatch):
    monkeypatch.setattr(runtimes, "openvino_available", lambda: False)
    with pytest.raises(ConfigurationError, match="OpenVINO, which is not installed") as refused:
        Featurizer(conv_cnn(), preprocessing=SMALL, runtime=runtimes.Runtime("openvino", "fp32"))
    assert "lungsql[openvino]" in refused.value.hint


def test_shard_sessions_share_the_cores():
    assert pipeline.shard_threads(1, cores=2) == 2
    assert pipeline.shard_threads(2, cores=2) == 1
    assert pipeline.shard_threads(2, cores=16) == 8
    assert pipeline.shard_threads(4, cores=2) == 1  # never fewer than one thread


# -- in the database -----------------------------------------------------------------------------------------
def scalar(engine, sql, **params):
    with engine.connect() as conn:
        return conn.execute(sa.text(sql), params).scalar()


def test_an_int8_variant_is_a_cnn_of_its_own_featurized_in_the_database_and_trained_on(db_env, tmp_path):
    runner = CliRunner()
    assert runner.invoke(main, ["init"]).exit_code == 0
    engine = sa.create_engine(db_env)
    cohort = tmp_path / "cohort"
    synth.write_cohort(cohort, patients=8, slices=(6, 9), seed=11, positive_fraction=0.5)
    ingest.ingest(engine, cohort)
    for args in (["model", "import", "--builtin", "efficientnet-lite0"],
                 ["model", "import", "--builtin", "efficientnet-lite0", "--variant", "int8"]):
        result = runner.invoke(main, args)
        assert result.exit_code == 0, result.output
    assert "cosine similarity to fp32:" in result.output  # the import says how close the variant is
    source = scalar(engine, "SELECT source FROM lungsql.cnn_models WHERE name = 'efficientnet-lite0-int8'")
    assert source["variant"] == "int8" and source["quantization"]["format"] == "QDQ"
    assert source["quantization"]["float_nodes"] == ["/_blocks.0/"] and source["agreement"]["cosine_mean"] >= 0.99
    assert source["float_sha256"] == scalar(engine, "SELECT sha256 FROM lungsql.cnn_models "
                                                    "WHERE name = 'efficientnet-lite0'")
    for cnn in ("efficientnet-lite0", "efficientnet-lite0-int8"):
        result = runner.invoke(main, ["featurize", "--cnn", cnn])
        assert result.exit_code == 0, result.output
    with engine.connect() as conn:
        rows = conn.execute(sa.text(
            "SELECT a.data, b.data, a.n_groups, a.dim FROM lungsql.features a JOIN lungsql.features b USING (patient_id) "
            "JOIN lungsql.cnn_models ca ON ca.cnn_id = a.cnn_id JOIN lungsql.cnn_models cb ON cb.cnn_id = b.cnn_id "
            "WHERE ca.name = 'efficientnet-lite0' AND cb.name = 'efficientnet-lite0-int8'")).all()
    assert len(rows) == 8
    a = np.concatenate([np.frombuffer(r[0], "<f4").reshape(r[2], r[3]) for r in rows])
    b = np.concatenate([np.frombuffer(r[1], "<f4").reshape(r[2], r[3]) for r in rows])
    assert quantize.feature_agreement(a, b)["cosine_mean"] >= 0.99  # on the stored CT, through the database
    result = runner.invoke(main, ["train", "--name", "lite0-int8", "--cnn", "efficientnet-lite0-int8"])
    assert result.exit_code == 0, result.output
    assert scalar(engine, "SELECT c.name FROM lungsql.models m JOIN lungsql.cnn_models c USING (cnn_id) "
                          "WHERE m.name = 'lite0-int8'") == "efficientnet-lite0-int8"


def test_a_variant_on_a_runtime_the_server_cannot_give_stops_featurization_with_the_reason(engine, tmp_path):
    cohort = tmp_path / "cohort"
    synth.write_cohort(cohort, patients=1, slices=(3, 3), seed=2)
    ingest.ingest(engine, cohort)
    cnns.store(engine, "odd-runtime", conv_cnn(), "input", 32, "features", 8, SMALL,
               {"runtime": {"engine": "openvino", "precision": "fp16"}})
    with engine.connect() as conn:
        with pytest.raises(sa.exc.DBAPIError, match="openvino runs a CNN in fp32, bf16, not 'fp16'"):
            conn.execute(sa.text("CALL lungsql.generate_features(cnn_name => 'odd-runtime')"))
    assert scalar(engine, "SELECT count(*) FROM lungsql.features") == 0


def test_the_cli_refuses_a_variant_of_a_file(db_env, tmp_path):
    model = tmp_path / "m.onnx"
    model.write_bytes(conv_cnn())
    result = CliRunner().invoke(main, ["model", "import", str(model), "--name", "m", "--variant", "int8"])
    assert result.exit_code != 0 and "--variant applies to --builtin CNNs" in result.output


def test_the_providers_a_featurizer_reports_on_the_cpu():
    with Featurizer(conv_cnn(), preprocessing=SMALL, threads=1, providers=[devices.CPU]) as featurizer:
        assert featurizer.provider == devices.CPU and featurizer.runtime.describe() == "ONNX Runtime"
