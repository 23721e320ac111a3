"""A portable model: the CNN, the patient vector and the LightGBM trees as one ONNX file.

Inside the database a patient is scored in three steps: the CNN turns each image
of three slices into a feature row (lungsql.ml.featurize), the rows become one
patient vector (lungsql.ml.features.patient_vector, then age and sex), and the
LightGBM model turns that vector into a probability (lungsql.ml.scoring).
`portable_model` writes those three steps as one ONNX graph, so a site without
the database, or without Python, scores a patient with ONNX Runtime alone:

=============  =========================  ===================================================
input          type and shape             what it holds
=============  =========================  ===================================================
``volume``     float32 (groups, C, S, S)  ``lungsql.ml.preprocess.prepare_volume`` of the
                                          series' slices, with the recipe stored in the
                                          metadata (``lungsql.preprocessing``)
``n_slices``   int64 (1,)                 how many CT slices the groups hold (the last group
                                          repeats the last slice, so groups cannot tell)
``age``        float32 (1,)               age in years; NaN when unknown
``sex``        float32 (1,)               1 for male, 0 for female, NaN otherwise
=============  =========================  ===================================================

and the output ``probability``, float32 (1,): the probability of cancer, what
``lungsql.predict_lung_cancer`` returns for the same patient.

The graph::

    volume -> CNN -> Flatten -> (groups, D) -> Cast to double
        -> ReduceMean over groups = mean;  ReduceMax over groups - mean = delta
    Concat [mean, delta, log(1 + n_slices), age, sex]   (double, as numpy computes it)
        -> Gather into the model's feature order -> Cast to float
        -> TreeEnsembleClassifier (ai.onnx.ml) -> probability of class 1

The vector is built in double precision and rounded to float32 once, as
``patient_vector`` does, so the trees see the very numbers LightGBM saw.  Two
details of LightGBM are written into the trees explicitly: a split sends a value
left when ``value <= threshold`` with a double threshold, which for float32
inputs is the same as comparing with the largest float32 not above it (the
threshold rounded down, not to nearest), and a missing value (NaN) goes where
LightGBM sends it (the learnt default for features that had missing values, and
where 0 goes for the others).  `portable_model` then checks the trees against
LightGBM on vectors placed on every threshold and the whole graph on a test
volume, and refuses to return a model that disagrees.

`predict_portable` (or `PortableModel`, which keeps the ONNX Runtime session)
scores a patient's slices with ONNX Runtime and this package's preprocessing;
it needs neither LightGBM nor a database.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Sequence

import numpy as np

from lungsql import __version__
from lungsql.errors import ConfigurationError, LungSQLError
from lungsql.ml.features import FEATURE_SET as CNN_FEATURE_SET
from lungsql.ml.features import patient_vector_names
from lungsql.ml.preprocess import Preprocessing, fits_input, prepare_volume

__all__ = [
    "FEATURE_SET",
    "INPUTS",
    "OUTPUT",
    "PRODUCER",
    "PortableModel",
    "encode_age",
    "encode_sex",
    "feature_names",
    "metadata",
    "portable_model",
    "predict_portable",
    "signature",
]

#: The patient vector a portable model computes: the CNN recipe, then age and sex
#: (the feature set lungsql.server.pipeline trains on).
FEATURE_SET = CNN_FEATURE_SET + "+age-sex"
#: The model's features after the CNN summary, each with the graph input that feeds it.
EXTRA_FEATURES = {"age_years": "age", "sex_male": "sex"}
#: The graph inputs, in order.
INPUTS = ("volume", "n_slices", "age", "sex")
#: The graph output.
OUTPUT = "probability"
#: ``producer_name`` of a portable model.
PRODUCER = "lungsql.ml.portable"
#: Largest difference allowed between the graph and LightGBM in the checks `portable_model` runs.
TOLERANCE = 1e-5

_SEX = {"M": 1.0, "F": 0.0}
_RETRAIN = "retrain the model with this lungsql: SELECT * FROM lungsql.train_model()"


def feature_names(dim: int) -> list[str]:
    """The feature names of a model over `FEATURE_SET` with CNN features of `dim` values."""
    return patient_vector_names(dim) + list(EXTRA_FEATURES)


def encode_age(age: float | None) -> np.float32:
    """Age in years as the model takes it: float32, NaN when unknown."""
    return np.float32(np.nan if age is None else float(age))


def encode_sex(sex: str | float | None) -> np.float32:
    """Sex as the model takes it: 1 for 'M', 0 for 'F', NaN otherwise (a number is kept)."""
    if sex is None or isinstance(sex, str):
        return np.float32(_SEX.get(sex, np.nan))
    return np.float32(float(sex))


# ----------------------------------------------------------------------------- building


def portable_model(cnn_onnx: bytes, cnn_input_name: str, cnn_output_name: str, model_text: str,
                   feature_names: Sequence[str], *, preprocessing: Preprocessing | dict[str, Any],
                   cnn_name: str | None = None, model_id: int | None = None, model_name: str | None = None,
                   model_version: int | None = None, verify: bool = True) -> bytes:
    """One ONNX model from volume to probability (see the module docstring); its serialized bytes.

    `cnn_onnx` is the CNN as stored in lungsql.cnn_models, with its image input and
    feature output; `model_text` the LightGBM binary classifier trained on patient
    vectors whose columns are `feature_names` (every name of `feature_names(D)`
    once, in any order); `preprocessing` the recipe the CNN's input was built
    with.  The caller verifies the stored SHA-256 of both before calling, and a
    model text read from a table as lungsql.ml.scoring.load_model does.  The
    other arguments go into the model's metadata.  With `verify`, the trees are
    checked against LightGBM on vectors at every threshold, and the graph on a
    test volume (about a second); a disagreement raises `LungSQLError`.

    Raises `ConfigurationError` for a CNN or a model this function cannot express
    (names that are not those of `FEATURE_SET`, a CNN with a fixed batch or
    another input size, categorical splits, zero-as-missing).
    """
    import onnx

    from lungsql.ml.onnx_inspect import check_self_contained

    if isinstance(preprocessing, dict):
        preprocessing = Preprocessing.from_json(preprocessing)
    if isinstance(model_text, (bytes, bytearray, memoryview)):
        model_text = bytes(model_text).decode("utf-8")
    names = [str(n) for n in feature_names]
    dim, order = _feature_order(names)
    booster, dump = _booster(model_text, names)
    check_self_contained(bytes(cnn_onnx))
    cnn = onnx.load_model_from_string(bytes(cnn_onnx))
    _check_cnn(cnn, cnn_input_name, cnn_output_name, preprocessing, dim)
    opset, ml_opset = _opsets(cnn)
    trees = _trees(booster, dump, len(names))
    if verify:
        _verify_trees(trees, booster, dump, len(names))
    props = metadata(cnn_bytes=bytes(cnn_onnx), cnn_name=cnn_name, model_text=model_text,
                     preprocessing=preprocessing, feature_names=names, model_id=model_id,
                     model_name=model_name, model_version=model_version)
    model = _assemble(cnn, cnn_input_name, cnn_output_name, trees, dim, order, preprocessing, opset, ml_opset,
                      props, extra_outputs=verify)
    if verify:
        _verify_graph(model, booster, dim, order, preprocessing)
        _drop_outputs(model, keep=(OUTPUT,))
    try:
        onnx.checker.check_model(model, full_check=True)
    except onnx.checker.ValidationError as exc:
        raise LungSQLError(f"the portable model is not valid ONNX: {str(exc).strip()[:300]}",
                           "report this with the CNN and the model text it was built from") from None
    return model.SerializeToString()


def metadata(*, cnn_bytes: bytes, cnn_name: str | None, model_text: str, preprocessing: Preprocessing,
             feature_names: Sequence[str], model_id: int | None = None, model_name: str | None = None,
             model_version: int | None = None) -> dict[str, str]:
    """The ``metadata_props`` of a portable model: what it is and how to build its inputs."""
    props = {
        "lungsql.version": __version__,
        "lungsql.feature_set": FEATURE_SET,
        "lungsql.feature_count": str(len(feature_names)),
        "lungsql.cnn_name": cnn_name or "",
        "lungsql.cnn_sha256": hashlib.sha256(cnn_bytes).hexdigest(),
        "lungsql.lightgbm_sha256": hashlib.sha256(model_text.encode("utf-8")).hexdigest(),
        "lungsql.preprocessing": json.dumps(preprocessing.to_json(), sort_keys=True),
        "lungsql.inputs": json.dumps({
            "volume": "float32 (groups, C, S, S): lungsql.ml.preprocess.prepare_volume of the series' slices "
                      "in z order, with lungsql.preprocessing",
            "n_slices": "int64 (1,): the number of CT slices in the volume",
            "age": "float32 (1,): age in years, NaN when unknown",
            "sex": "float32 (1,): 1 for male, 0 for female, NaN otherwise",
        }),
        "lungsql.output": "probability: float32 (1,), the probability of cancer",
    }
    if model_id is not None:
        props["lungsql.model_id"] = str(int(model_id))
    if model_name is not None:
        props["lungsql.model_name"] = str(model_name)
    if model_version is not None:
        props["lungsql.model_version"] = str(int(model_version))
    return props


def _feature_order(names: list[str]) -> tuple[int, list[int]]:
    """(D, for each model column the index of that feature in the graph's own order, which is
    `feature_names(D)`), or ConfigurationError for names outside `FEATURE_SET`."""
    dim = sum(1 for n in names if n.startswith("mean_"))
    if dim < 1:
        raise ConfigurationError(
            f"the model's {len(names)} feature names hold no CNN feature (mean_0, mean_1, ...); a portable "
            f"model computes the feature set {FEATURE_SET!r}", _RETRAIN)
    canonical = feature_names(dim)
    position = {n: i for i, n in enumerate(canonical)}
    given = set(names)
    duplicated = sorted({n for n in names if names.count(n) > 1}) if len(given) != len(names) else []
    unknown = [n for n in names if n not in position]
    missing = [n for n in canonical if n not in given]
    if duplicated or unknown or missing:
        parts = []
        if unknown:
            parts.append(f"features it cannot compute ({', '.join(unknown[:5])}"
                         + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else "") + ")")
        if missing:
            parts.append(f"no column for {', '.join(missing[:5])}" + (
                f" and {len(missing) - 5} more" if len(missing) > 5 else ""))
        if duplicated:
            parts.append(f"columns named twice ({', '.join(duplicated[:5])})")
        raise ConfigurationError(
            f"the model's feature names are not those of the feature set {FEATURE_SET!r} for {dim} CNN "
            f"features: " + "; ".join(parts), _RETRAIN)
    return dim, [position[n] for n in names]


def _booster(model_text: str, names: list[str]) -> tuple[Any, dict[str, Any]]:
    """The parsed model and LightGBM's dump of its trees, checked against the feature names."""
    from lungsql.ml.training import lightgbm_module

    lightgbm = lightgbm_module()
    try:
        booster = lightgbm.Booster(model_str=model_text)
    except lightgbm.basic.LightGBMError as exc:
        raise ConfigurationError(f"LightGBM cannot read the model text: {str(exc).strip()[:200]}", _RETRAIN) from None
    dump = booster.dump_model(num_iteration=-1)
    objective = str(dump.get("objective", "")).split()
    if not objective or objective[0] not in ("binary", "cross_entropy", "xentropy"):
        raise ConfigurationError(
            f"the model is not a LightGBM binary classifier (objective {' '.join(objective) or 'none'})", _RETRAIN)
    if booster.num_feature() != len(names) or list(booster.feature_name()) != names:
        raise ConfigurationError(
            f"the model text has {booster.num_feature()} features named {list(booster.feature_name())[:3]}..., "
            f"but its record lists {len(names)} named {names[:3]}...",
            "export the model from its own row of lungsql.models; the text and the feature names must agree")
    return booster, dump


def _check_cnn(cnn: Any, input_name: str, output_name: str, p: Preprocessing, dim: int) -> None:
    """The CNN takes (groups, C, S, S) float32 with any number of groups and gives (groups, D[, 1, 1])."""
    import onnx

    initializers = {t.name for t in cnn.graph.initializer}
    inputs = [i for i in cnn.graph.input if i.name not in initializers]
    by_name = {i.name: i for i in inputs}
    if input_name not in by_name:
        raise ConfigurationError(f"the CNN has no input named {input_name!r}",
                                 f"its inputs are {sorted(by_name)}; store the CNN with its image input's name")
    if len(inputs) != 1:
        raise ConfigurationError(f"the CNN has {len(inputs)} inputs ({sorted(by_name)}); a portable model feeds "
                                 f"it one, the images", "export the CNN with the image input only")
    tensor = by_name[input_name].type.tensor_type
    if tensor.elem_type != onnx.TensorProto.FLOAT:
        raise ConfigurationError(f"the CNN's input {input_name!r} is not float32",
                                 "export the CNN with a float32 NCHW input")
    shape = _shape(tensor)
    if not fits_input(shape, p):
        raise ConfigurationError(
            f"the CNN's input {input_name!r} has shape {shape}; the preprocessing gives "
            f"(groups, {p.slices_per_image}, {p.image_size}, {p.image_size})",
            "store the CNN with the preprocessing of its own input size")
    if isinstance(shape[0], int):
        raise ConfigurationError(
            f"the CNN's input {input_name!r} takes exactly {shape[0]} image(s); a portable model feeds it every "
            "image of a patient at once", "export the CNN with a dynamic batch dimension")
    declared = {v.name: v for v in list(cnn.graph.output) + list(cnn.graph.value_info)}
    produced = {o for n in cnn.graph.node for o in n.output}
    if output_name not in produced:
        raise ConfigurationError(f"the CNN has no tensor named {output_name!r}",
                                 f"its outputs are {[o.name for o in cnn.graph.output]}")
    if output_name in declared and declared[output_name].type.HasField("tensor_type"):
        out = _shape(declared[output_name].type.tensor_type)
        if not (len(out) == 2 or (len(out) == 4 and out[2:] == [1, 1])):
            raise ConfigurationError(
                f"the CNN's output {output_name!r} has shape {out}; a feature output is (N, D) or (N, D, 1, 1)",
                "store the CNN with its pooled feature output")
        if isinstance(out[1], int) and out[1] != dim:
            raise ConfigurationError(
                f"the CNN's output {output_name!r} gives {out[1]} features per image, but the model was "
                f"trained on {dim}", "export the model with the CNN its features came from")


def _shape(tensor: Any) -> list[int | str | None]:
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tensor.shape.dim]


def _opsets(cnn: Any) -> tuple[int, int]:
    """(ai.onnx opset, ai.onnx.ml opset) of the portable model: the CNN's own opset, and the
    ai.onnx.ml release that came with it (at most 3: ai.onnx.ml 5 deprecates TreeEnsembleClassifier)."""
    import onnx

    versions = {("" if o.domain == "ai.onnx" else o.domain): o.version for o in cnn.opset_import}
    opset = versions.get("")
    if opset is None or opset < 11:
        raise ConfigurationError(
            f"the CNN uses ONNX opset {opset}; a portable model needs opset 11 or later",
            "convert the CNN: onnx.version_converter.convert_version(model, 17), then import it again")
    if "ai.onnx.ml" in versions:
        ml = versions["ai.onnx.ml"]
    else:
        paired = [row[3] for row in onnx.helper.VERSION_TABLE if row[2] == opset]
        ml = min(max(paired, default=3), 3)
    schema = onnx.defs.get_schema("TreeEnsembleClassifier", ml, "ai.onnx.ml")
    if schema.deprecated:
        raise ConfigurationError(
            f"the CNN imports ai.onnx.ml opset {ml}, where TreeEnsembleClassifier is deprecated",
            "export the CNN without ai.onnx.ml operators, or at an earlier opset")
    return opset, max(ml, 1)


# ----------------------------------------------------------------------------- the trees


def _trees(booster: Any, dump: dict[str, Any], n_features: int) -> Any:
    """The LightGBM trees as an ONNX model (onnxmltools) with LightGBM's own splits (see the
    module docstring): input ``input`` float32 (N, n_features), output ``probabilities`` (N, 2)."""
    try:
        import onnxmltools
        from onnxmltools.convert.common.data_types import FloatTensorType
    except ImportError:  # pragma: no cover - depends on the installation
        raise ConfigurationError("building a portable model needs onnxmltools",
                                 "install the export extra: pip install 'lungsql[export]'") from None
    try:
        trees = onnxmltools.convert_lightgbm(booster, zipmap=False,
                                             initial_types=[("input", FloatTensorType([None, n_features]))])
    except Exception as exc:  # onnxmltools raises RuntimeError, NotImplementedError, ValueError...
        raise ConfigurationError(f"onnxmltools cannot write the model's trees as ONNX: {str(exc).strip()[:200]}",
                                 _RETRAIN) from None
    ensembles = [n for n in trees.graph.node if n.op_type == "TreeEnsembleClassifier"]
    if len(ensembles) != 1 or "probabilities" not in [o.name for o in trees.graph.output]:
        raise LungSQLError("onnxmltools wrote the trees in an unexpected form "
                           f"({[n.op_type for n in trees.graph.node]})",
                           "use the onnxmltools version of the export extra")
    _exact_splits(ensembles[0], dump)
    return trees


def _exact_splits(node: Any, dump: dict[str, Any]) -> None:
    """Rewrite the thresholds and missing-value directions of a TreeEnsembleClassifier `node` to
    what LightGBM computes, walking each ONNX tree beside LightGBM's dump of the same tree
    (true branch = LightGBM's left child)."""
    attrs = {a.name: a for a in node.attribute}
    tree_ids = list(attrs["nodes_treeids"].ints)
    node_ids = list(attrs["nodes_nodeids"].ints)
    features = list(attrs["nodes_featureids"].ints)
    modes = [m.decode() for m in attrs["nodes_modes"].strings]
    values = list(attrs["nodes_values"].floats)
    missing = list(attrs["nodes_missing_value_tracks_true"].ints)
    true_ids = list(attrs["nodes_truenodeids"].ints)
    false_ids = list(attrs["nodes_falsenodeids"].ints)
    index = {(t, n): i for i, (t, n) in enumerate(zip(tree_ids, node_ids))}
    lightgbm_trees = {int(t.get("tree_index", i)): t["tree_structure"] for i, t in enumerate(dump["tree_info"])}

    def differs(tree: int, why: str) -> LungSQLError:
        return LungSQLError(f"the ONNX trees do not follow LightGBM's tree {tree} ({why})",
                            "use the onnxmltools version of the export extra")

    if set(tree_ids) != set(lightgbm_trees):
        raise LungSQLError(f"the ONNX trees hold {len(set(tree_ids))} trees, LightGBM's model {len(lightgbm_trees)}",
                           "use the onnxmltools version of the export extra")
    visited = 0
    for tree, structure in lightgbm_trees.items():
        in_tree = [i for i, t in enumerate(tree_ids) if t == tree]
        children = {c for i in in_tree if modes[i] != "LEAF" for c in (true_ids[i], false_ids[i])}
        roots = [i for i in in_tree if node_ids[i] not in children]
        if len(roots) != 1:
            raise differs(tree, f"{len(roots)} roots")
        pending = [(structure, roots[0])]
        while pending:
            split, i = pending.pop()
            visited += 1
            if ("split_index" in split) == (modes[i] == "LEAF"):
                raise differs(tree, f"node {node_ids[i]}")
            if modes[i] == "LEAF":
                continue
            if split.get("decision_type") != "<=" or modes[i] != "BRANCH_LEQ":
                raise ConfigurationError(f"tree {tree} of the model has a categorical split; a portable model "
                                         "holds numerical splits only", _RETRAIN)
            if int(split["split_feature"]) != features[i]:
                raise differs(tree, f"node {node_ids[i]} splits on feature {features[i]}, LightGBM's on "
                                    f"{split['split_feature']}")
            threshold = float(split["threshold"])
            values[i] = float(_float32_at_most(threshold))
            kind = split["missing_type"]
            if kind == "NaN":  # NaN goes where training sent the missing values
                missing[i] = int(bool(split["default_left"]))
            elif kind == "None":  # no missing value in training: LightGBM reads NaN as 0
                missing[i] = int(0.0 <= threshold)
            else:
                raise ConfigurationError(
                    f"tree {tree} of the model treats zero as a missing value (zero_as_missing), which ONNX "
                    "trees cannot express", "retrain without zero_as_missing")
            for child, child_id in ((split["left_child"], true_ids[i]), (split["right_child"], false_ids[i])):
                if (tree, child_id) not in index:
                    raise differs(tree, f"node {node_ids[i]} has no child {child_id}")
                pending.append((child, index[(tree, child_id)]))
    if visited != len(tree_ids):
        raise LungSQLError(f"the ONNX trees hold {len(tree_ids)} nodes, LightGBM's {visited}",
                           "use the onnxmltools version of the export extra")
    attrs["nodes_values"].ClearField("floats")
    attrs["nodes_values"].floats.extend(values)
    attrs["nodes_missing_value_tracks_true"].ClearField("ints")
    attrs["nodes_missing_value_tracks_true"].ints.extend(missing)


def _splits(structure: dict[str, Any]) -> list[dict[str, Any]]:
    """The splits of a tree of LightGBM's dump."""
    out, pending = [], [structure]
    while pending:
        current = pending.pop()
        if "split_index" in current:
            out.append(current)
            pending += [current["left_child"], current["right_child"]]
    return out


def _float32_at_most(value: float) -> np.float32:
    """The largest float32 not above `value`: for a float32 x, x <= value exactly when x <= it."""
    largest = float(np.finfo(np.float32).max)
    if value >= largest:
        return np.float32(largest)
    if value < -largest:
        return np.float32(-np.inf)
    f = np.float32(value)
    if float(f) > value:
        f = np.nextafter(f, np.float32(-np.inf), dtype=np.float32)
    return f


def _verify_trees(trees: Any, booster: Any, dump: dict[str, Any], n_features: int) -> None:
    """The ONNX trees give LightGBM's probabilities on vectors at, just below and just above every
    threshold, and on zeros and missing values."""
    import onnxruntime as ort

    session = ort.InferenceSession(trees.SerializeToString(), _session_options(), providers=["CPUExecutionProvider"])
    points: dict[int, set[float]] = {}
    for tree in dump["tree_info"]:
        for split in _splits(tree["tree_structure"]):
            at = _float32_at_most(float(split["threshold"]))
            with np.errstate(over="ignore"):  # past the largest float32: left out below
                near = (at, np.nextafter(at, np.float32(np.inf)), np.nextafter(at, np.float32(-np.inf)))
            points.setdefault(int(split["split_feature"]), set()).update(float(v) for v in near if np.isfinite(v))
    rng = np.random.default_rng(2017)
    rows = np.zeros((66, n_features), np.float32)
    rows[1] = np.nan
    for feature, candidates in points.items():
        rows[2:, feature] = rng.choice(np.array(sorted(candidates) + [np.nan], np.float32), size=64)
    got = session.run(["probabilities"], {"input": rows})[0][:, 1]
    want = booster.predict(rows.astype(np.float64), num_threads=1)
    worst = float(np.max(np.abs(got - want)))
    if not worst <= TOLERANCE:
        raise LungSQLError(f"the ONNX trees differ from LightGBM by up to {worst:.3g} on test vectors; no model "
                           "was written", "report this with the model text")


# ----------------------------------------------------------------------------- the graph


def _assemble(cnn: Any, cnn_input: str, cnn_output: str, trees: Any, dim: int, order: list[int],
              p: Preprocessing, opset: int, ml_opset: int, props: dict[str, str], extra_outputs: bool) -> Any:
    """The CNN, the patient vector and the trees as one model (names prefixed cnn/, patient/, trees/)."""
    import onnx
    from onnx import TensorProto, compose, helper, numpy_helper

    cnn_graph = compose.add_prefix_graph(cnn.graph, "cnn/", rename_inputs=False, name_map={cnn_input: "volume"})
    tree_graph = compose.add_prefix_graph(trees.graph, "trees/", rename_inputs=False,
                                          name_map={"input": "patient_vector"})
    features = "cnn/" + cnn_output
    double = TensorProto.DOUBLE
    constants = [
        numpy_helper.from_array(np.array([1.0]), "patient/one"),
        numpy_helper.from_array(np.array([1, 1], np.int64), "patient/one_by_one"),
        numpy_helper.from_array(np.array(1, np.int64), "patient/positive_class"),
    ]

    def reduce(op: str, source: str, out: str) -> onnx.NodeProto:
        if opset >= 18:  # axes became an input
            return helper.make_node(op, [source, "patient/groups_axis"], [out], name=out, keepdims=1)
        return helper.make_node(op, [source], [out], name=out, axes=[0], keepdims=1)

    if opset >= 18:
        constants.append(numpy_helper.from_array(np.array([0], np.int64), "patient/groups_axis"))
    nodes = [
        helper.make_node("Flatten", [features], ["patient/features"], name="patient/features", axis=1),
        helper.make_node("Cast", ["patient/features"], ["patient/features_double"], name="patient/features_double",
                         to=double),
        reduce("ReduceMean", "patient/features_double", "patient/mean"),
        reduce("ReduceMax", "patient/features_double", "patient/max"),
        helper.make_node("Sub", ["patient/max", "patient/mean"], ["patient/delta"], name="patient/delta"),
        helper.make_node("Cast", ["n_slices"], ["patient/n_slices_double"], name="patient/n_slices_double", to=double),
        helper.make_node("Add", ["patient/n_slices_double", "patient/one"], ["patient/one_plus_slices"],
                         name="patient/one_plus_slices"),
        helper.make_node("Log", ["patient/one_plus_slices"], ["patient/log_slices_flat"],
                         name="patient/log_slices_flat"),
    ]
    columns = ["patient/mean", "patient/delta"]
    for source in ("patient/log_slices_flat", "age", "sex"):
        flat = source if source.startswith("patient/") else f"patient/{source}_double"
        if not source.startswith("patient/"):
            nodes.append(helper.make_node("Cast", [source], [flat], name=flat, to=double))
        column = f"patient/{source.rsplit('/', 1)[-1].removesuffix('_flat')}_column"
        nodes.append(helper.make_node("Reshape", [flat, "patient/one_by_one"], [column], name=column))
        columns.append(column)
    nodes.append(helper.make_node("Concat", columns, ["patient/vector_double"], name="patient/vector_double", axis=1))
    vector = "patient/vector_double"
    if order != list(range(len(order))):  # the model's columns in another order than the graph's
        constants.append(numpy_helper.from_array(np.array(order, np.int64), "patient/model_order"))
        nodes.append(helper.make_node("Gather", [vector, "patient/model_order"], ["patient/ordered_double"],
                                      name="patient/ordered_double", axis=1))
        vector = "patient/ordered_double"
    nodes.append(helper.make_node("Cast", [vector], ["patient_vector"], name="patient_vector",
                                  to=TensorProto.FLOAT))
    tail = [helper.make_node("Gather", ["trees/probabilities", "patient/positive_class"], [OUTPUT], name=OUTPUT,
                             axis=1)]

    groups = "groups"
    inputs = [
        helper.make_tensor_value_info("volume", TensorProto.FLOAT,
                                      [groups, p.slices_per_image, p.image_size, p.image_size],
                                      "prepare_volume of the series' slices with lungsql.preprocessing"),
        helper.make_tensor_value_info("n_slices", TensorProto.INT64, [1], "the number of CT slices"),
        helper.make_tensor_value_info("age", TensorProto.FLOAT, [1], "age in years, NaN when unknown"),
        helper.make_tensor_value_info("sex", TensorProto.FLOAT, [1], "1 male, 0 female, NaN otherwise"),
    ]
    outputs = [helper.make_tensor_value_info(OUTPUT, TensorProto.FLOAT, [1], "the probability of cancer")]
    if extra_outputs:  # for the check of the graph, removed afterwards
        outputs += [helper.make_tensor_value_info("patient/features", TensorProto.FLOAT, [groups, dim]),
                    helper.make_tensor_value_info("patient_vector", TensorProto.FLOAT, [1, len(order)])]
    graph = helper.make_graph(
        list(cnn_graph.node) + nodes + list(tree_graph.node) + tail, "lungsql_portable_model", inputs, outputs,
        initializer=list(cnn_graph.initializer) + constants + list(tree_graph.initializer),
        doc_string="CT volume -> CNN features -> patient vector -> LightGBM trees -> probability of cancer",
        value_info=list(cnn_graph.value_info) + list(tree_graph.value_info),
    )
    graph.sparse_initializer.extend(list(cnn_graph.sparse_initializer) + list(tree_graph.sparse_initializer))
    opsets = [helper.make_opsetid("", opset), helper.make_opsetid("ai.onnx.ml", ml_opset)]
    opsets += [o for o in cnn.opset_import if o.domain not in ("", "ai.onnx", "ai.onnx.ml")]
    model = helper.make_model(graph, opset_imports=opsets, producer_name=PRODUCER, producer_version=__version__,
                              doc_string=__doc__.split("\n\n")[0])
    model.ir_version = max(cnn.ir_version, helper.find_min_ir_version_for(opsets, ignore_unknown=True))
    _prune(model.graph)
    helper.set_model_props(model, props)
    return model


def _prune(graph: Any) -> None:
    """Remove the nodes, initializers and value infos no graph output needs (the CNN's other outputs,
    the trees' label)."""
    needed = {o.name for o in graph.output}
    keep = []
    for node in reversed(graph.node):
        if any(o in needed for o in node.output):
            keep.append(node)
            needed.update(i for i in node.input if i)
            for attribute in node.attribute:  # names a subgraph reads from this graph
                for sub in ([attribute.g] if attribute.HasField("g") else []) + list(attribute.graphs):
                    needed.update(i for n in sub.node for i in n.input if i)
    del graph.node[:]
    graph.node.extend(reversed(keep))
    for field in (graph.initializer, graph.value_info):
        kept = [t for t in field if t.name in needed]
        del field[:]
        field.extend(kept)
    sparse = [t for t in graph.sparse_initializer if t.values.name in needed]
    del graph.sparse_initializer[:]
    graph.sparse_initializer.extend(sparse)


def _drop_outputs(model: Any, keep: tuple[str, ...]) -> None:
    kept = [o for o in model.graph.output if o.name in keep]
    del model.graph.output[:]
    model.graph.output.extend(kept)
    _prune(model.graph)


def _verify_graph(model: Any, booster: Any, dim: int, order: list[int], p: Preprocessing) -> None:
    """On a test volume, with age and sex known and unknown: the graph's patient vector is
    `patient_vector` of its own CNN features, and its probability is LightGBM's for that vector."""
    import onnxruntime as ort

    from lungsql.ml.features import patient_vector

    try:
        session = ort.InferenceSession(model.SerializeToString(), _session_options(),
                                       providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own exception types
        raise LungSQLError(f"ONNX Runtime cannot load the portable model: {str(exc).strip()[:300]}",
                           "report this with the CNN and the model text it was built from") from None
    rng = np.random.default_rng(2017)
    volume = rng.normal(0.0, 0.5, (2, p.slices_per_image, p.image_size, p.image_size)).astype(np.float32)
    for age, sex in ((63.5, 1.0), (None, None)):
        probability, features, vector = session.run(
            [OUTPUT, "patient/features", "patient_vector"],
            _feeds(volume, 5, encode_age(age), encode_sex(sex)))
        if features.shape != (2, dim):
            raise ConfigurationError(f"the CNN gives features of shape {list(features.shape)} for 2 images, but "
                                     f"the model was trained on {dim} per image",
                                     "export the model with the CNN its features came from")
        expected = np.concatenate([patient_vector(features, 5), [encode_age(age), encode_sex(sex)]])[order]
        if not np.allclose(vector[0], expected, rtol=1e-6, atol=1e-7, equal_nan=True):
            raise LungSQLError("the portable model's patient vector differs from lungsql.ml.features.patient_vector",
                               "report this with the CNN and the model text it was built from")
        want = booster.predict(vector.astype(np.float64), num_threads=1)[0]
        if not abs(float(probability[0]) - want) <= TOLERANCE:
            raise LungSQLError(f"the portable model gives {float(probability[0]):.6f} where LightGBM gives "
                               f"{want:.6f}; no model was written", "report this with the model text")


def _session_options() -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only
    return options


def _feeds(volume: np.ndarray, n_slices: int, age: np.float32, sex: np.float32) -> dict[str, np.ndarray]:
    return {"volume": np.ascontiguousarray(volume, dtype=np.float32),
            "n_slices": np.array([int(n_slices)], np.int64),
            "age": np.array([age], np.float32), "sex": np.array([sex], np.float32)}


# ----------------------------------------------------------------------------- using it


def signature(model_bytes: bytes) -> dict[str, list[dict[str, Any]]]:
    """The inputs and outputs of an ONNX model: name, element type and shape (a name for a
    dynamic dimension)."""
    import onnx

    model = onnx.load_model_from_string(bytes(model_bytes))
    initializers = {t.name for t in model.graph.initializer}

    def describe(value: Any) -> dict[str, Any]:
        tensor = value.type.tensor_type
        return {"name": value.name, "type": onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type).name,
                "shape": _shape(tensor)}

    return {"inputs": [describe(v) for v in model.graph.input if v.name not in initializers],
            "outputs": [describe(v) for v in model.graph.output]}


class PortableModel:
    """A portable model in an ONNX Runtime session, with the preprocessing its metadata records."""

    def __init__(self, model_bytes: bytes, providers: Sequence[str] | None = None) -> None:
        import onnxruntime as ort

        try:
            self.session = ort.InferenceSession(bytes(model_bytes), _session_options(),
                                                providers=list(providers or ["CPUExecutionProvider"]))
        except Exception as exc:  # onnxruntime raises its own exception types
            raise ConfigurationError(f"ONNX Runtime cannot load the portable model: {str(exc).strip()[:300]}",
                                     "export it again: lungsql model export MODEL_ID OUT.onnx") from None
        #: The model's metadata_props (see `metadata`).
        self.metadata: dict[str, str] = dict(self.session.get_modelmeta().custom_metadata_map)
        names = [i.name for i in self.session.get_inputs()]
        if names != list(INPUTS) or "lungsql.preprocessing" not in self.metadata:
            raise ConfigurationError(
                f"the ONNX model is not a lungsql portable model (inputs {names})",
                "export one: lungsql model export MODEL_ID OUT.onnx")
        self.preprocessing = Preprocessing.from_json(json.loads(self.metadata["lungsql.preprocessing"]))

    def volume(self, slices: Sequence[np.ndarray] | np.ndarray,
               rescale: Sequence[tuple[float, float]] | np.ndarray | None = None) -> np.ndarray:
        """The ``volume`` input for a series' slices in z order (as `prepare_volume` takes them)."""
        return prepare_volume(slices, self.preprocessing, rescale)

    def predict_volume(self, volume: np.ndarray, n_slices: int, age: float | None = None,
                       sex: str | float | None = None) -> float:
        """The probability of cancer for a prepared volume of `n_slices` slices."""
        k = self.preprocessing.slices_per_image
        if n_slices < 1 or np.ndim(volume) != 4 or len(volume) != -(-int(n_slices) // k):
            raise ConfigurationError(
                f"a volume of {len(volume) if np.ndim(volume) else 0} images of {k} slices cannot hold "
                f"{n_slices} slices", "build the volume with PortableModel.volume from the same slices")
        (probability,) = self.session.run([OUTPUT], _feeds(volume, n_slices, encode_age(age), encode_sex(sex)))
        return float(probability[0])

    def predict(self, slices: Sequence[np.ndarray] | np.ndarray, age: float | None = None,
                sex: str | float | None = None,
                rescale: Sequence[tuple[float, float]] | np.ndarray | None = None) -> float:
        """The probability of cancer for a series' slices in z order: Hounsfield units, or the stored
        values with one (slope, intercept) per slice in `rescale` (lungsql.dicom.series.read_slices
        gives both); `age` in years and `sex` ('M', 'F'), None when unknown."""
        n = len(slices)
        return self.predict_volume(self.volume(slices, rescale), n, age, sex)


def predict_portable(model_bytes: bytes, slices: Sequence[np.ndarray] | np.ndarray, age: float | None = None,
                     sex: str | float | None = None,
                     rescale: Sequence[tuple[float, float]] | np.ndarray | None = None) -> float:
    """The probability of cancer for one patient's slices, from a portable model's bytes
    (`PortableModel.predict`; keep a PortableModel to score many patients)."""
    return PortableModel(model_bytes).predict(slices, age, sex, rescale)
