"""How a stored CNN is run: ONNX Runtime, or OpenVINO at a chosen inference precision.

A CNN's row in lungsql.cnn_models says which in its `source`, as
``{"runtime": {"engine": "openvino", "precision": "bf16"}}``; without it, ONNX
Runtime runs the model in the precision of its own weights (float32, or int8
where the model is quantized: lungsql.ml.quantize).  The runtime belongs to the
CNN, not to the server: features of one CNN always come from one runtime at one
precision, so that a model trained on them is scored on the same kind.

Both are opened as an ONNX Runtime ``InferenceSession`` is used by the
featurizer: ``get_inputs()``, ``get_outputs()``, ``get_providers()`` and
``run([output], {input: batch})``, safe to call from several threads at once.
"""

from __future__ import annotations

import io
import json
import threading
from dataclasses import dataclass
from typing import Any, Sequence

from lungsql.errors import ConfigurationError

ONNXRUNTIME = "onnxruntime"
OPENVINO = "openvino"
ENGINES = (ONNXRUNTIME, OPENVINO)
#: Inference precisions an engine is asked for: what the weights hold (fp32), or bfloat16 arithmetic.
PRECISIONS = {ONNXRUNTIME: ("fp32",), OPENVINO: ("fp32", "bf16")}
#: What `get_providers()` reports for OpenVINO on the CPU (feature_runs.provider).
OPENVINO_CPU = "OpenVINO:CPU"
_OPENVINO_PRECISION = {"fp32": "f32", "bf16": "bf16"}


@dataclass(frozen=True)
class Runtime:
    """An engine and the arithmetic precision it runs the CNN's float layers in."""

    engine: str = ONNXRUNTIME
    precision: str = "fp32"

    def __post_init__(self) -> None:
        if self.engine not in ENGINES:
            raise ConfigurationError(f"unknown CNN runtime {self.engine!r}", hint=f"one of {', '.join(ENGINES)}")
        if self.precision not in PRECISIONS[self.engine]:
            raise ConfigurationError(f"{self.engine} runs a CNN in {', '.join(PRECISIONS[self.engine])}, "
                                     f"not {self.precision!r}",
                                     hint="bf16 runs on OpenVINO: lungsql model import --builtin NAME --precision bf16")

    @classmethod
    def from_source(cls, source: dict[str, Any] | str | bytes | None) -> Runtime:
        """The runtime a CNN row's `source` names (ONNX Runtime when it names none). `source` is the
        column as stored: an object, or its JSON text (SQL Server keeps it as text); anything else,
        or a runtime that is not an object, is refused with what the row should hold."""
        hint = 'source should be a JSON object such as {"runtime": {"engine": "openvino", "precision": "bf16"}}'
        if isinstance(source, (str, bytes)):
            try:
                source = json.loads(source)
            except ValueError as exc:
                raise ConfigurationError(f"the CNN's source is not JSON: {exc}", hint=hint) from None
        if source is None:
            return cls()
        if not isinstance(source, dict):
            raise ConfigurationError(f"the CNN's source must be a JSON object, not {type(source).__name__}", hint=hint)
        given = source.get("runtime")
        if given is None:
            return cls()
        if not isinstance(given, dict):
            raise ConfigurationError(f"the CNN's runtime must be an object, not {str(given)[:80]!r}", hint=hint)
        return cls(str(given.get("engine", ONNXRUNTIME))[:80], str(given.get("precision", "fp32"))[:80])

    def to_json(self) -> dict[str, str]:
        return {"engine": self.engine, "precision": self.precision}

    @property
    def default(self) -> bool:
        return self == Runtime()

    def describe(self) -> str:
        return "ONNX Runtime" if self.default else f"{self.engine} {self.precision}"


def openvino_available() -> bool:
    try:
        import openvino  # noqa: F401
    except ImportError:
        return False
    return True


def cpu_has_bf16() -> bool:
    """OpenVINO can run bfloat16 arithmetic on this CPU (AVX-512 BF16 or AMX)."""
    import openvino as ov

    return "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")


def check_available(runtime: Runtime) -> None:
    """Refuse, with what to do, a runtime this process cannot give as asked."""
    if runtime.engine != OPENVINO:
        return
    if not openvino_available():
        raise ConfigurationError(
            "this CNN runs on OpenVINO, which is not installed where the CNN runs",
            hint="install the openvino extra into the server's Python (make bootstrap, or pip install "
                 "'lungsql[openvino]'), or featurize with another CNN")
    if runtime.precision == "bf16" and not cpu_has_bf16():
        raise ConfigurationError(
            "this CNN runs in bfloat16, which this CPU cannot do (no AVX-512 BF16 or AMX): its features "
            "would not be the ones its models were trained on",
            hint="featurize with the CNN's fp32 or int8 variant on this server")


def open_session(onnx_bytes: bytes, runtime: Runtime, threads: int, providers: Sequence[Any]) -> Any:
    """A session of the CNN on `runtime` whose runs each take one thread, `threads` runs at a time.

    ONNX Runtime gets `providers`; OpenVINO runs on the CPU.  The bytes must already have passed
    lungsql.ml.onnx_inspect.check_self_contained."""
    check_available(runtime)
    if runtime.engine == OPENVINO:
        return OpenVINOSession(onnx_bytes, runtime.precision, threads)
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # One thread per run, and `threads` runs at a time (the featurizer's pool): batches need no
    # barrier between the threads of each layer, so a core taken for a while by decoding or
    # another backend slows one run, not all.
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.log_severity_level = 3  # errors only: no warnings in psql
    return ort.InferenceSession(bytes(onnx_bytes), options, providers=list(providers))


@dataclass(frozen=True)
class _Node:
    """What the featurizer reads of an input or output, as ONNX Runtime describes it."""

    name: str
    shape: list[Any]
    type: str


_TYPES = {"f32": "tensor(float)", "f16": "tensor(float16)", "bf16": "tensor(bfloat16)", "i64": "tensor(int64)",
          "i32": "tensor(int32)", "u8": "tensor(uint8)", "i8": "tensor(int8)"}


class OpenVINOSession:
    """An ONNX model compiled by OpenVINO for the CPU, with `threads` streams of one thread each:
    each calling thread has an infer request of its own, so `threads` runs go at once."""

    def __init__(self, onnx_bytes: bytes, precision: str, threads: int) -> None:
        import openvino as ov

        core = ov.Core()
        model = core.read_model(io.BytesIO(bytes(onnx_bytes)))
        config = {"INFERENCE_PRECISION_HINT": _OPENVINO_PRECISION[precision],
                  "NUM_STREAMS": str(max(1, threads)), "INFERENCE_NUM_THREADS": str(max(1, threads)),
                  "PERFORMANCE_HINT": "THROUGHPUT", "ENABLE_CPU_PINNING": "NO"}
        self.compiled = core.compile_model(model, "CPU", config)
        self.precision = precision
        self._local = threading.local()
        self._first_runs = threading.Lock()
        self._inputs = [self._node(port) for port in self.compiled.inputs]
        self._outputs = [self._node(port) for port in self.compiled.outputs]
        self._warm_up()

    def _warm_up(self) -> None:
        """One inference on this thread before any other: OpenVINO's Python binding initializes its
        data dispatch on the first call, and two threads calling first at once can deadlock there
        (one holds the initialization and waits for the GIL, the other holds the GIL and waits for
        the initialization)."""
        import numpy as np

        feeds = {}
        for node in self._inputs:
            if node.type != "tensor(float)" or any(d is None for d in node.shape[1:]):
                return  # a dynamic image size: the first real run initializes it, on one thread (run)
            feeds[node.name] = np.zeros([1, *node.shape[1:]], np.float32)
        self.compiled.create_infer_request().infer(feeds)

    @staticmethod
    def _node(port: Any) -> _Node:
        shape = [d.get_length() if d.is_static else None for d in port.get_partial_shape()]
        return _Node(port.get_any_name(), shape, _TYPES.get(port.get_element_type().get_type_name(),
                                                            str(port.get_element_type())))

    def get_inputs(self) -> list[_Node]:
        return list(self._inputs)

    def get_outputs(self) -> list[_Node]:
        return list(self._outputs)

    def get_providers(self) -> list[str]:
        return [OPENVINO_CPU]

    def run(self, output_names: Sequence[str] | None, feeds: dict[str, Any]) -> list[Any]:
        request = getattr(self._local, "request", None)
        if request is None:
            request = self._local.request = self.compiled.create_infer_request()
            with self._first_runs:  # a thread's first run, one at a time (see _warm_up)
                results = request.infer(feeds)
        else:
            results = request.infer(feeds)
        names = output_names or [node.name for node in self._outputs]
        # The request reuses its output buffers on the next run: copies.
        return [results[self.compiled.output(name)].copy() for name in names]
