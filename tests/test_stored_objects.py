"""Stored objects cannot hurt the server: an ONNX CNN that reads a file or runs a custom operator is
refused, at import and inside the server before ONNX Runtime sees it; a LightGBM text that would make
LightGBM abort is refused before the backend parses it, and the backend goes on."""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys

import numpy as np
import psycopg
import pytest
import sqlalchemy as sa

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
lightgbm = pytest.importorskip("lightgbm")
from onnx import TensorProto, external_data_helper, helper, numpy_helper  # noqa: E402

from databases import call  # noqa: E402
from lungsql.client import cnns, ingest
from lungsql.dicom import synth
from lungsql.ml import model_check, scoring, training  # noqa: E402
from lungsql.errors import ConfigurationError  # noqa: E402
from lungsql.ml.featurize import Featurizer  # noqa: E402
from lungsql.ml.onnx_inspect import check_self_contained  # noqa: E402
from lungsql.ml.preprocess import Preprocessing  # noqa: E402

SMALL = Preprocessing(image_size=32)
SECRET = b"15\n"  # what PG_VERSION holds in a PostgreSQL 15 data directory


# ----------------------------------------------------------------------------- ONNX models built here


def _external(tensor: onnx.TensorProto, location: str) -> onnx.TensorProto:
    """`tensor` with its bytes left out, to be read from `location` (relative: the working directory)."""
    size = len(tensor.raw_data)
    external_data_helper.set_external_data(tensor, location=location, offset=0, length=size)
    tensor.ClearField("raw_data")
    return tensor


def leaky_cnn(location: str = "secret.bin", where: str = "initializer") -> onnx.ModelProto:
    """A CNN whose features are the image's pooled channels plus 3 bytes read from the file `location`:
    the 'leak' tensor (uint8, cast to float) is an initializer, a sparse initializer, a Constant, or a
    Constant inside an If (and a Loop inside that If, for 'nested')."""
    leak = _external(numpy_helper.from_array(np.zeros(3, np.uint8), "leak"), location)
    nodes = [
        helper.make_node("Conv", ["input", "w"], ["conv"], name="conv"),
        helper.make_node("GlobalAveragePool", ["conv"], ["pooled"], name="pool"),
        helper.make_node("Flatten", ["pooled"], ["flat"], axis=1, name="flatten"),
    ]
    initializers = [numpy_helper.from_array(np.full((3, 3, 1, 1), 0.1, np.float32), "w")]
    sparse = []
    if where == "initializer":
        initializers.append(leak)
    elif where == "sparse":
        indices = numpy_helper.from_array(np.arange(3, dtype=np.int64), "")
        sparse.append(helper.make_sparse_tensor(leak, indices, [3]))
    elif where == "constant":
        nodes.append(helper.make_node("Constant", [], ["leak"], value=leak, name="secret"))
    elif where in ("if", "nested"):
        inner = helper.make_node("Constant", [], ["leak_then"], value=leak, name="secret")
        branch_out = [helper.make_tensor_value_info("leak_then", TensorProto.UINT8, [3])]
        then_branch = helper.make_graph([inner], "then", [], branch_out)
        if where == "nested":  # If -> then_branch -> Loop -> body -> Constant
            body = helper.make_graph(
                [inner, helper.make_node("Identity", ["cond_in"], ["cond_out"])], "body",
                [helper.make_tensor_value_info("i", TensorProto.INT64, []),
                 helper.make_tensor_value_info("cond_in", TensorProto.BOOL, [])],
                [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
                 helper.make_tensor_value_info("leak_then", TensorProto.UINT8, [3])])
            then_branch = helper.make_graph(
                [helper.make_node("Loop", ["", "true"], ["scan_out"], body=body, name="loop"),
                 helper.make_node("Squeeze", ["scan_out"], ["leak_then"])], "then", [], branch_out,
                initializer=[numpy_helper.from_array(np.array(True), "true")])
        zeros = helper.make_graph([helper.make_node("Constant", [], ["leak_else"],
                                                    value=numpy_helper.from_array(np.zeros(3, np.uint8)))],
                                  "else", [], [helper.make_tensor_value_info("leak_else", TensorProto.UINT8, [3])])
        initializers.append(numpy_helper.from_array(np.array(True), "yes"))
        nodes.append(helper.make_node("If", ["yes"], ["leak"], then_branch=then_branch, else_branch=zeros,
                                      name="choose"))
    nodes += [helper.make_node("Cast", ["leak"], ["leak_f"], to=TensorProto.FLOAT),
              helper.make_node("Add", ["flat", "leak_f"], ["features"], name="add")]
    graph = helper.make_graph(
        nodes, "leaky", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, "H", "W"])],
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["N", 3])],
        initializer=initializers, sparse_initializer=sparse)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def custom_op_cnn(in_subgraph: bool = False) -> onnx.ModelProto:
    """A CNN with one node of the operator domain 'com.example' (a kernel library would implement it)."""
    custom = helper.make_node("ReadFile", ["flat"], ["features"], domain="com.example", name="custom")
    nodes = [helper.make_node("GlobalAveragePool", ["input"], ["pooled"]),
             helper.make_node("Flatten", ["pooled"], ["flat"], axis=1)]
    if in_subgraph:
        body = helper.make_graph([custom], "then", [], [helper.make_tensor_value_info("features", TensorProto.FLOAT,
                                                                                      ["N", 3])])
        same = helper.make_graph([helper.make_node("Identity", ["flat"], ["same"])], "else", [],
                                 [helper.make_tensor_value_info("same", TensorProto.FLOAT, ["N", 3])])
        nodes.append(helper.make_node("If", ["yes"], ["features"], then_branch=body, else_branch=same, name="choose"))
    else:
        nodes.append(custom)
    graph = helper.make_graph(
        nodes, "custom", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, "H", "W"])],
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["N", 3])],
        initializer=[numpy_helper.from_array(np.array(True), "yes")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.example", 1)],
                             ir_version=8)


def plain_cnn() -> bytes:
    model = leaky_cnn()
    del model.graph.initializer[1]
    model.graph.initializer.append(numpy_helper.from_array(np.zeros(3, np.uint8), "leak"))
    return model.SerializeToString()


# ----------------------------------------------------------------------------- ONNX, no database


def test_a_cnn_with_external_data_would_read_the_file_and_is_refused_at_load(tmp_path, monkeypatch):
    (tmp_path / "secret.bin").write_bytes(SECRET)
    monkeypatch.chdir(tmp_path)  # a backend's working directory is its data directory
    data = leaky_cnn().SerializeToString()
    images = np.zeros((1, 3, 32, 32), np.float32)
    # The threat: ONNX Runtime, given only the bytes, reads the file into the features.
    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    assert session.run(None, {"input": images})[0].tolist() == [list(map(float, SECRET))]
    with pytest.raises(ConfigurationError) as info:
        Featurizer(data, "input", "features", SMALL, threads=1)
    assert info.value.message == ("the ONNX model reads external data from 'secret.bin' (initializer 'leak'); "
                                  "lungsql stores self-contained models only")
    assert "save_as_external_data=False" in info.value.hint
    assert Featurizer(plain_cnn(), "input", "features", SMALL, threads=1).run(images).shape == (1, 3)


@pytest.mark.parametrize("where, named", [
    ("sparse", "sparse initializer 'leak'"),
    ("constant", "tensor 'leak' of attribute 'value' of node 'secret' (Constant)"),
    ("if", "tensor 'leak' of attribute 'value' of node 'secret' (Constant) in the subgraph 'then_branch' of "
           "node 'choose' (If)"),
    ("nested", "in the subgraph 'body' of node 'loop' (Loop) in the subgraph 'then_branch' of node 'choose' (If)"),
])
def test_external_data_is_found_wherever_a_tensor_can_be(where, named):
    with pytest.raises(ConfigurationError, match="reads external data from 'secret.bin'") as info:
        check_self_contained(leaky_cnn(where=where).SerializeToString())
    assert named in info.value.message


def test_a_model_local_function_is_looked_into_and_its_domain_refused():
    model = onnx.load_model_from_string(plain_cnn())
    leak = _external(numpy_helper.from_array(np.zeros(3, np.uint8), "leak"), "secret.bin")
    function = helper.make_function("lungsql.test", "Leak", [], ["out"],
                                    [helper.make_node("Constant", [], ["out"], value=leak)],
                                    [helper.make_opsetid("", 17)])
    model.functions.append(function)
    with pytest.raises(ConfigurationError, match="external data .* in the model-local function lungsql.test.Leak"):
        check_self_contained(model.SerializeToString())
    del model.functions[0].node[0].attribute[:]
    model.graph.node.append(helper.make_node("Leak", [], ["unused"], domain="lungsql.test", name="call"))
    with pytest.raises(ConfigurationError, match="operator 'Leak' of domain 'lungsql.test'"):
        check_self_contained(model.SerializeToString())


@pytest.mark.parametrize("in_subgraph", [False, True])
def test_a_custom_operator_is_refused_at_load(in_subgraph):
    with pytest.raises(ConfigurationError) as info:
        Featurizer(custom_op_cnn(in_subgraph).SerializeToString(), "input", "features", SMALL, threads=1)
    assert info.value.message.startswith("the ONNX model uses the operator 'ReadFile' of domain 'com.example' "
                                         "(node 'custom' (ReadFile)")
    assert "lungsql runs the standard ONNX operators only" in info.value.message
    assert "custom operators" in info.value.hint
    assert ("in the subgraph 'then_branch'" in info.value.message) == in_subgraph


def test_bytes_that_are_not_onnx_are_refused():
    with pytest.raises(ConfigurationError, match="cannot load the CNN: its bytes are not an ONNX model"):
        check_self_contained(b"not an onnx model")


# ----------------------------------------------------------------------------- ONNX, in the database


def test_import_refuses_external_data_and_custom_operators(engine, tmp_path):
    (tmp_path / "secret.bin").write_bytes(SECRET)
    leaky = tmp_path / "leaky.onnx"
    onnx.save_model(leaky_cnn(), leaky)  # as users get it: a .onnx file next to the file it reads
    with pytest.raises(ConfigurationError, match=r"leaky\.onnx: the ONNX model reads external data from "
                                                 r"'secret\.bin' \(initializer 'leak'\)"):
        cnns.import_file(engine, leaky, "leaky")
    # The usual way such a file is made: weights saved beside the model.
    beside = tmp_path / "beside.onnx"
    onnx.save_model(onnx.load_model_from_string(plain_cnn()), beside, save_as_external_data=True,
                    location="beside.weights", size_threshold=0)
    with pytest.raises(ConfigurationError, match="reads external data from 'beside.weights'"):
        cnns.import_file(engine, beside, "beside")
    custom = tmp_path / "custom.onnx"
    onnx.save_model(custom_op_cnn(), custom)
    with pytest.raises(ConfigurationError, match="operator 'ReadFile' of domain 'com.example'"):
        cnns.import_file(engine, custom, "custom")
    with pytest.raises(ConfigurationError, match="operator 'ReadFile'"):  # store, which the built-in export uses
        cnns.store(engine, "custom", custom_op_cnn().SerializeToString(), "input", 32, "features", 3, SMALL, {})
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM lungsql.cnn_models")).scalar() == 0


def test_generate_features_refuses_a_stored_cnn_that_reads_a_server_file(engine, tmp_path):
    """Bytes put straight into lungsql.cnn_models, with their SHA-256: the server refuses them before
    ONNX Runtime would read PG_VERSION from its data directory into the features."""
    cohort = tmp_path / "cohort"
    synth.write_cohort(cohort, patients=2, slices=(3, 4), seed=3)
    ingest.ingest(engine, cohort)
    data = leaky_cnn("PG_VERSION").SerializeToString()
    with engine.begin() as conn:
        conn.execute(sa.text(
            """INSERT INTO lungsql.cnn_models (name, model, sha256, input_name, input_size, output_name,
                                               feature_dim, preprocessing, source)
               VALUES ('leaky', :model, :sha, 'input', 32, 'features', 3, :pre, '{}')"""),
            {"model": data, "sha": hashlib.sha256(data).hexdigest(), "pre": json.dumps(SMALL.to_json())})
    with pytest.raises(psycopg.Error) as info:
        call(engine, "CALL lungsql.generate_features()")
    assert ("lungsql: the ONNX model reads external data from 'PG_VERSION' (initializer 'leak'); "
            "lungsql stores self-contained models only") in str(info.value)
    assert "save_as_external_data=False" in (info.value.diag.message_hint or "")
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM lungsql.features")).scalar() == 0


# ----------------------------------------------------------------------------- LightGBM texts


@pytest.fixture(scope="module")
def good_text() -> str:
    rng = np.random.default_rng(5)
    X = rng.normal(size=(200, 5))
    y = (X[:, 0] + rng.normal(size=200) > 0).astype(int)
    booster = lightgbm.train({"objective": "binary", "num_leaves": 4, "verbose": -1, "num_threads": 1},
                             lightgbm.Dataset(X, y), num_boost_round=3)
    return booster.model_to_string()


def truncated_in_a_tree(text: str) -> str:
    """Cut inside tree 1, as a partial write leaves it: LightGBM aborts (SIGABRT)."""
    return text[:text.index("Tree=1") + 60]


def truncated_in_the_parameters(text: str) -> str:
    """Cut inside the parameters section, after every tree: LightGBM reads past the text (SIGSEGV)."""
    start = text.index("\nparameters:\n")
    return text[:text.index("[", start + 14) + 1]


def with_tree_sizes(text: str) -> str:
    """`text` with tree_sizes recomputed, so LightGBM parses an edited tree instead of stopping at its size."""
    head, trees = text.split("\nTree=0", 1)
    trees, tail = ("Tree=0" + trees).split("end of trees", 1)
    sizes = [len(("Tree=" + part).encode()) for part in trees.split("Tree=")[1:]]
    head = "\n".join(f"tree_sizes={' '.join(map(str, sizes))}" if line.startswith("tree_sizes=") else line
                     for line in head.split("\n"))
    return head + "\n" + trees + "end of trees" + tail


def _lightgbm_exit(text: str) -> int:
    """Exit status of a fresh Python that parses `text` and scores a row of zeros, as load_model would."""
    code = ("import resource, sys, lightgbm, numpy; resource.setrlimit(resource.RLIMIT_CORE, (0, 0)); "
            "b = lightgbm.Booster(model_str=sys.stdin.read()); "
            "b.predict(numpy.zeros((1, b.num_feature())), num_threads=1)")
    return subprocess.run([sys.executable, "-c", code], input=text.encode(), capture_output=True,
                          timeout=60).returncode  # bytes: LightGBM may print memory past the text


def test_texts_that_kill_lightgbm_are_refused_by_the_check(good_text):
    aborts, segfaults = truncated_in_a_tree(good_text), truncated_in_the_parameters(good_text)
    assert _lightgbm_exit(aborts) < 0 and _lightgbm_exit(segfaults) < 0  # killed by a signal, not an exception
    # The child process takes the signal and says so.
    report, why = model_check.parse_in_child(aborts.encode())
    assert report is None and why.startswith("the check process was killed by SIG")
    # load_model: the layout check finds the cut tree before any process parses it.
    with pytest.raises(ConfigurationError) as info:
        scoring.load_model(aborts, hashlib.sha256(aborts.encode()).hexdigest(), model_id=8)
    assert info.value.message == ("LightGBM cannot read model 8: the model text is malformed (the text has no "
                                  "'end of trees' line: it is truncated); nothing was scored")
    assert info.value.hint.startswith("retrain the model")
    # The cut parameters section passes the layout check; LightGBM, in the child process, does not.
    with pytest.raises(ConfigurationError, match=r"LightGBM cannot read model 9: the model text is malformed \(the "
                                                 r"check process was killed by SIG[A-Z]+\); nothing was scored"):
        scoring.load_model(segfaults, hashlib.sha256(segfaults.encode()).hexdigest(), model_id=9)


def looping(text: str) -> str:
    """Both children of the root of tree 0 made the root itself: predict goes round for ever."""
    for side in ("left_child", "right_child"):
        text = re.sub(rf"^{side}=-?\d+", f"{side}=0", text, count=1, flags=re.M)
    return text


@pytest.mark.parametrize("edit, says", [
    (looping, "node 0 has child 0, which is already in the tree"),
    (lambda t: re.sub(r"^split_feature=\d+", "split_feature=99", t, count=1, flags=re.M),
     "splits on feature 99; the model has 5"),
    (lambda t: t.replace("num_leaves=4", "num_leaves=0", 1), "num_leaves=0"),
    (lambda t: t.replace("num_leaves=4", "num_leaves=40", 1), "4 value(s) of leaf_value, 40 expected"),
    (lambda t: t.replace("num_tree_per_iteration=1", "num_tree_per_iteration=0", 1), "num_tree_per_iteration is 0"),
    (lambda t: t.replace("num_cat=0", "num_cat=2", 1), "has no cat_boundaries"),
])
def test_the_layout_check_finds_what_lightgbm_would_trip_on(good_text, edit, says):
    """Each of these makes LightGBM loop for ever, abort, read out of bounds or divide by zero; tree_sizes
    is made to fit, so that LightGBM reads the edited tree."""
    with pytest.raises(model_check.Malformed) as info:
        model_check.structure(with_tree_sizes(edit(good_text)))
    assert says in str(info.value)


def test_tree_sizes_must_fit_the_trees(good_text):
    """LightGBM cuts the text at these sizes and reads past its end when they are too large."""
    with pytest.raises(model_check.Malformed, match="tree_sizes gives tree 0 9"):
        model_check.structure(good_text.replace("tree_sizes=", "tree_sizes=9", 1))


def test_a_loop_without_end_is_stopped(good_text):
    """Past the layout check (called here without it), the check process is stopped after its time."""
    report, why = model_check.parse_in_child(with_tree_sizes(looping(good_text)).encode(), timeout=2)
    assert report is None and ("ran past 2 s" in why or "SIGXCPU" in why), why


def test_valid_models_pass_once_per_process(good_text, monkeypatch):
    rng = np.random.default_rng(1)
    X = rng.normal(size=(300, 4))
    X[:, 3] = rng.integers(0, 12, 300)
    y = ((X[:, 0] + np.isin(X[:, 3], [1, 4, 7]) + rng.normal(size=300)) > 0.5).astype(int)
    linear = lightgbm.train({"objective": "binary", "linear_tree": True, "verbose": -1, "num_threads": 1,
                             "min_data_per_group": 5, "cat_smooth": 1}, lightgbm.Dataset(X, y, categorical_feature=[3]),
                            num_boost_round=5).model_to_string()
    assert "is_linear=1" in linear and "cat_boundaries=" in linear
    trained = training.train(X, y, [f"P{i}" for i in range(300)], [f"f{j}" for j in range(4)],
                             params={"num_threads": 1, "num_iterations": 20}).model_text
    for text in (good_text, linear, trained):
        assert model_check.structure(text).num_trees == text.count("\nTree=")
    runs = []
    real = model_check.parse_in_child
    monkeypatch.setattr(model_check, "parse_in_child", lambda *a, **k: runs.append(1) or real(*a, **k))
    model_check.checked_clear()
    sha = hashlib.sha256(linear.encode()).hexdigest()
    first = scoring.load_model(linear, sha)
    assert scoring.load_model(linear, sha).num_trees == first.num_trees == 5
    assert len(runs) == 1


def test_the_check_finds_python_inside_a_server_process(monkeypatch):
    """Inside PostgreSQL sys.executable is the server (or empty): the interpreter comes from sys.base_prefix."""
    for executable in ("/usr/lib/postgresql/15/bin/postgres", ""):
        monkeypatch.setattr(sys, "executable", executable)
        found = model_check.python_interpreter()
        version = subprocess.run([found, "-c", "import sys; print(sys.version_info[:2])"], capture_output=True,
                                 text=True, check=True).stdout.strip()
        assert version == str(sys.version_info[:2])


def test_a_malformed_deployed_model_is_refused_and_the_backend_survives(engine, cluster, good_text):
    log = cluster.log_file
    log_start = log.stat().st_size if log.exists() else 0
    cnn_id = cnns.store(engine, "plain", plain_cnn(), "input", 32, "features", 3, SMALL, {})
    broken = truncated_in_the_parameters(good_text)  # passes the layout check; LightGBM dies on it
    with engine.begin() as conn:
        for name, text in (("good", good_text), ("broken", broken)):
            conn.execute(sa.text(
                """INSERT INTO lungsql.models (name, version, cnn_id, feature_set, feature_names, params,
                                               model_text, sha256, metrics)
                   VALUES (:name, 1, :cnn, 'mean-delta-v1', '[]', '{}', :text, :sha, '{"log_loss": 0.5}')"""),
                {"name": name, "cnn": cnn_id, "text": text, "sha": hashlib.sha256(text.encode()).hexdigest()})
    good_id = call(engine, "SELECT lungsql.deploy('good', 'most_recent')")[0][0]
    broken_id = call(engine, "SELECT lungsql.deploy('broken', 'most_recent')")[0][0]
    with engine.connect() as conn:
        pg = conn.connection.driver_connection
        conn.commit()
        pg.autocommit = True
        pid = pg.execute("SELECT pg_backend_pid()").fetchone()[0]
        # The good model passes its check in this backend (the check process starts from the server).
        assert pg.execute("SELECT lungsql.warm_up('good')").fetchone()[0] == good_id
        with pytest.raises(psycopg.Error) as info:
            pg.execute("SELECT lungsql.predict_lung_cancer('P000', 'broken')")
        assert re.search(rf"lungsql: LightGBM cannot read model {broken_id}: the model text is malformed \(the "
                         r"check process was killed by SIG[A-Z]+\); nothing was scored", str(info.value))
        assert (info.value.diag.message_hint or "").startswith("retrain the model")
        # The same backend answers, and the good model is still there.
        assert pg.execute("SELECT pg_backend_pid()").fetchone()[0] == pid
        assert pg.execute("SELECT lungsql.warm_up('good')").fetchone()[0] == good_id
        with pytest.raises(psycopg.Error, match="the check process was killed by SIG"):  # refused again
            pg.execute("SELECT lungsql.warm_up('broken')")
        pg.autocommit = False
    assert call(engine, "SELECT count(*) FROM pg_stat_activity WHERE pid = %s", (pid,)) == [(1,)]
    if log.exists():
        with log.open("rb") as f:
            f.seek(log_start)
            assert b"terminated by signal" not in f.read()


def test_texts_checked_together_clear_in_one_child_and_a_killing_one_is_still_named(good_text):
    """model_check.check_many (a radiograph model's 14 boosters): good texts clear in one child process;
    with a text that kills LightGBM among them, each is checked alone and the bad one is refused by name."""
    model_check.checked_clear()
    other = good_text.replace("[seed: 0]", "[seed: 1]", 1) if "[seed: 0]" in good_text else good_text + "\n"
    good = [(t.encode(), hashlib.sha256(t.encode()).hexdigest(), f"booster {i}") for i, t in enumerate((good_text, other))]
    model_check.check_many(good)
    assert all(sha in model_check._checked for _, sha, _ in good)
    model_check.checked_clear()
    bad = truncated_in_the_parameters(good_text)
    with pytest.raises(ConfigurationError, match=r"LightGBM cannot read booster B: the model text is malformed "
                                                 r"\(the check process was killed by SIG[A-Z]+\)"):
        model_check.check_many([*good, (bad.encode(), hashlib.sha256(bad.encode()).hexdigest(), "booster B")])
    assert all(sha in model_check._checked for _, sha, _ in good)  # checked alone, and cleared
    model_check.checked_clear()
