"""What an ONNX CNN takes and gives, read with ONNX Runtime alone (no torch),
and whether it is data only.

`describe_onnx` finds a user-supplied model's image input and its pooled
feature output, so `lungsql model import PATH.onnx` can store it with the
names and sizes the featurizer needs, or say which output to name.

`check_self_contained` refuses a model that would make ONNX Runtime read a
file (a tensor kept as *external data*, found by a path relative to the
working directory, which inside a PostgreSQL backend is the data directory)
or run an operator outside the standard ONNX domains (custom kernels,
model-local functions).  It runs when a CNN is stored and again, inside the
server, before ONNX Runtime sees the stored bytes.
"""

from __future__ import annotations

from collections import deque
from typing import Any, Iterator

import numpy as np

from lungsql.errors import ConfigurationError

#: Operator domains whose kernels ONNX Runtime itself implements; a node of any
#: other domain is a custom operator (a kernel library) or a model-local function.
STANDARD_DOMAINS = ("", "ai.onnx", "ai.onnx.ml")

_SELF_CONTAINED_HINT = (
    "re-save the model with its weights inside: onnx.save_model(onnx.load('model.onnx'), "
    "'inside.onnx', save_as_external_data=False), then import inside.onnx"
)
_STANDARD_OPS_HINT = (
    "export the model with standard ONNX operators only: no custom operators, and model-local "
    "functions inlined (onnx.inliner.inline_local_functions)"
)


def _dims(shape: Any) -> list[int | str | None]:
    if shape is None:
        return []
    return [d if isinstance(d, int) or d is None else str(d) for d in shape]


def _fmt(shape: list[int | str | None]) -> str:
    return "(" + ", ".join("?" if d is None else str(d) for d in shape) + ")"


def _feature_shape(shape: list[int | str | None]) -> tuple[bool, bool]:
    """(usable, needs_flatten) for an output shape."""
    if len(shape) == 2:
        return True, False
    if len(shape) == 4 and shape[2] == 1 and shape[3] == 1:
        return True, True
    return False, False


def describe_onnx(onnx_bytes: bytes, output: str | None = None) -> dict[str, Any]:
    """Inspect an ONNX CNN with onnxruntime (no torch needed).

    Finds the image input (name, shape, layout, size) and the feature output:
    the one named by ``output``, or the model's only output (or, with several
    outputs, the only one shaped like features).  Accepted output shapes are
    ``(N, D)`` and ``(N, C, 1, 1)``; the latter is reported with
    ``"flatten": True`` (take ``reshape(N, C)``).  Raises ``ValueError`` with
    the names to choose from when the output is missing, ambiguous or not a
    feature vector.
    """
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.log_severity_level = 3
    try:
        sess = ort.InferenceSession(bytes(onnx_bytes), so, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own exception types
        raise ValueError(f"not a loadable ONNX model: {e}") from e

    inputs = sess.get_inputs()
    if len(inputs) != 1:
        listing = ", ".join(f"{i.name} {_fmt(_dims(i.shape))}" for i in inputs)
        raise ValueError(
            f"expected a CNN with exactly one image input, found {len(inputs)}: {listing}"
        )
    inp = inputs[0]
    in_shape = _dims(inp.shape)
    if len(in_shape) != 4:
        raise ValueError(
            f"input {inp.name!r} has shape {_fmt(in_shape)}; expected a 4-D image "
            "batch (N, C, H, W) or (N, H, W, C)"
        )
    notes: list[str] = []
    if in_shape[1] in (1, 3):
        layout, channels, hw = "NCHW", in_shape[1], in_shape[2:4]
    elif in_shape[3] in (1, 3):
        layout, channels, hw = "NHWC", in_shape[3], in_shape[1:3]
    else:
        layout, channels, hw = "NCHW", in_shape[1], in_shape[2:4]
        notes.append(f"could not tell the channel axis from {_fmt(in_shape)}; assuming NCHW")
    static_hw = all(isinstance(d, int) for d in hw)
    if static_hw and hw[0] == hw[1]:
        input_size: int | list[int] | None = hw[0]
    elif static_hw:
        input_size = list(hw)  # type: ignore[arg-type]
    else:
        input_size = None
        notes.append("input height/width are dynamic; choose the size the model was trained at")

    outputs = sess.get_outputs()
    by_name = {o.name: o for o in outputs}
    listing = ", ".join(f"{o.name!r} {_fmt(_dims(o.shape))}" for o in outputs)
    if output is not None:
        if output not in by_name:
            raise ValueError(
                f"model has no output {output!r}; its outputs are {listing}. "
                "An intermediate tensor must first be made a graph output "
                "(e.g. with onnx.utils.extract_model)"
            )
        chosen = by_name[output]
    elif len(outputs) == 1:
        chosen = outputs[0]
    else:
        candidates = [o for o in outputs if _feature_shape(_dims(o.shape))[0]]
        if len(candidates) != 1:
            raise ValueError(
                f"model has {len(outputs)} outputs ({listing}) and "
                f"{len(candidates)} of them look like (N, D) features; pass "
                "output=<name> to say which one holds the image features"
            )
        chosen = candidates[0]
        notes.append(f"picked {chosen.name!r}, the only feature-shaped of {len(outputs)} outputs")

    out_shape = _dims(chosen.shape)
    usable, flatten = _feature_shape(out_shape)
    if not usable:
        others = [o.name for o in outputs if o.name != chosen.name]
        raise ValueError(
            f"output {chosen.name!r} has shape {_fmt(out_shape)}; a feature output must be "
            "2-D (N, D) or (N, C, 1, 1). Pass output=<name> naming a pooled feature "
            "tensor" + (f" (other outputs: {', '.join(others)})" if others else "")
            + ", or add global average pooling to the model"
        )

    feat = out_shape[1]
    if not isinstance(feat, int):
        feat = _probe_feature_dim(sess, inp, layout, channels, hw, chosen.name)
        notes.append("feature dimension found by running one blank image")
    if flatten:
        notes.append(f"output is (N, {feat}, 1, 1); reshape to (N, {feat})")
    if feat == 1000:
        notes.append(
            "1000 values per image look like ImageNet class logits, not pooled features; "
            "prefer the tensor before the classifier if the model exposes it"
        )

    return {
        "input_name": inp.name,
        "input_shape": in_shape,
        "input_type": inp.type,
        "input_layout": layout,
        "input_channels": channels,
        "input_size": input_size,
        "dynamic_batch": not isinstance(in_shape[0], int),
        "output_name": chosen.name,
        "output_shape": out_shape,
        "feature_dim": int(feat),
        "flatten": flatten,
        "outputs": [o.name for o in outputs],
        "metadata": dict(sess.get_modelmeta().custom_metadata_map),
        "notes": notes,
    }


def _probe_feature_dim(sess, inp, layout, channels, hw, out_name) -> int:
    h, w = (d if isinstance(d, int) else 224 for d in hw)
    c = channels if isinstance(channels, int) else 3
    shape = (1, c, h, w) if layout == "NCHW" else (1, h, w, c)
    dtype = np.float16 if "float16" in inp.type else np.float32
    (res,) = sess.run([out_name], {inp.name: np.zeros(shape, dtype)})
    return int(np.prod(res.shape[1:]))


# ----------------------------------------------------------------------------- data only


def check_self_contained(onnx_bytes: bytes, source: str | None = None) -> None:
    """Raise `ConfigurationError` unless the ONNX model is data only.

    Refused: a tensor stored as external data (an initializer, a sparse
    initializer, a tensor attribute such as a Constant's value, in the main
    graph, in the subgraphs of If/Loop/Scan at any depth, in model-local
    functions or in training graphs), and a node whose operator domain is not
    one of `STANDARD_DOMAINS`.  The bytes are parsed with the ``onnx`` package,
    which never reads external data from bytes.  ``source`` (a file name)
    prefixes the message.
    """
    try:
        import onnx
    except ImportError:  # pragma: no cover - depends on the installation
        raise ConfigurationError(
            "checking an ONNX model needs the onnx package, which the Python that runs lungsql lacks",
            hint="install the ml extra: pip install 'lungsql[ml]'",
        ) from None
    prefix = f"{source}: " if source else ""
    try:
        model = onnx.load_model_from_string(bytes(onnx_bytes))
    except Exception as exc:  # protobuf's DecodeError, or a RuntimeWarning turned error
        raise ConfigurationError(
            f"{prefix}lungsql cannot load the CNN: its bytes are not an ONNX model "
            f"({str(exc).strip()[:200]})",
            hint="store the .onnx file as it was exported (lungsql model import PATH.onnx)",
        ) from None
    problem = next(_not_data_only(model, onnx.TensorProto.EXTERNAL), None)
    if problem is not None:
        message, hint = problem
        raise ConfigurationError(prefix + message, hint=hint)


def _not_data_only(model: Any, external: int) -> Iterator[tuple[str, str]]:
    """(message, hint) for each way `model` reaches beyond its own bytes: the main graph first, then
    its subgraphs, training graphs and model-local functions."""
    pending: deque[tuple[Any, str]] = deque([(model.graph, "")])
    for info in model.training_info:
        pending += [(info.initialization, " in the training initialization graph"),
                    (info.algorithm, " in the training algorithm graph")]
    yield from _graphs(pending, external)
    for function in model.functions:
        where = f" in the model-local function {function.domain}.{function.name}"
        for attribute in function.attribute_proto:
            yield from _attribute(attribute, f"the default of attribute {attribute.name!r}{where}", where,
                                  external, pending)
        for node in function.node:
            yield from _node(node, where, external, pending)
        yield from _graphs(pending, external)


def _graphs(pending: deque, external: int) -> Iterator[tuple[str, str]]:
    """Problems of each queued (graph, where) and of the subgraphs its nodes queue."""
    while pending:
        graph, where = pending.popleft()
        for tensor in graph.initializer:
            yield from _external(tensor, f"initializer {tensor.name!r}{where}", external)
        for sparse in graph.sparse_initializer:
            name = sparse.values.name
            yield from _external(sparse.values, f"sparse initializer {name!r}{where}", external)
            yield from _external(sparse.indices, f"the indices of sparse initializer {name!r}{where}", external)
        for node in graph.node:
            yield from _node(node, where, external, pending)


def _node(node: Any, where: str, external: int, pending: deque) -> Iterator[tuple[str, str]]:
    label = f"node {node.name or '(unnamed)'!r} ({node.op_type})"
    if node.domain not in STANDARD_DOMAINS:
        yield (f"the ONNX model uses the operator {node.op_type!r} of domain {node.domain!r} "
               f"({label}{where}); lungsql runs the standard ONNX operators only "
               f"(domains {', '.join(repr(d) for d in STANDARD_DOMAINS)})", _STANDARD_OPS_HINT)
    for attribute in node.attribute:
        yield from _attribute(attribute, f"attribute {attribute.name!r} of {label}{where}",
                              f" in the subgraph {attribute.name!r} of {label}{where}", external, pending)


def _attribute(attribute: Any, what: str, subgraph_where: str, external: int, pending: deque
               ) -> Iterator[tuple[str, str]]:
    """Problems of the tensors of one attribute; its subgraphs are queued on `pending`.

    Every field is looked at whatever the attribute's declared type says."""
    tensors = [attribute.t] if attribute.HasField("t") else []
    tensors += list(attribute.tensors)
    for sparse in ([attribute.sparse_tensor] if attribute.HasField("sparse_tensor") else []) + list(
            attribute.sparse_tensors):
        tensors += [sparse.values, sparse.indices]
    for tensor in tensors:
        yield from _external(tensor, f"tensor {tensor.name!r} of {what}" if tensor.name else what, external)
    if attribute.HasField("g"):
        pending.append((attribute.g, subgraph_where))
    pending += [(graph, subgraph_where) for graph in attribute.graphs]


def _external(tensor: Any, what: str, external: int) -> Iterator[tuple[str, str]]:
    if tensor.data_location == external or len(tensor.external_data):
        location = next((entry.value for entry in tensor.external_data if entry.key == "location"), "")
        source = f"from {location[:200]!r}" if location else "from a file"
        yield (f"the ONNX model reads external data {source} ({what}); "
               "lungsql stores self-contained models only", _SELF_CONTAINED_HINT)
