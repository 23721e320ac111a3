"""CNN features of CT series with ONNX Runtime, and the per-patient vector.

A series becomes images of three consecutive slices (``lungsql.preprocess``),
an ONNX CNN turns each image into a feature row (``Featurizer``), and a
patient is summarised by the mean of those rows, how far their maximum stands
out from that mean, and the log of the number of slices (``patient_vector``).  The same recipe applies to every
patient, so their vectors can be compared and fed to one model (the 2017
original fitted a PCA per patient, which made them incomparable).

Stored features are data: float32 bytes, their shape and their SHA-256
(``GroupFeatures.to_bytes`` / ``from_bytes``), never pickles.
"""

from __future__ import annotations

import hashlib
import math
import os
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Hashable, Iterable, Iterator, Sequence

import numpy as np

from lungsql import dicom
from lungsql.errors import ConfigurationError, IntegrityError, InvalidScan, LungSQLError
from lungsql.preprocess import Preprocessing, order_slices, prepare_volume

#: Name of the per-patient recipe of `patient_vector`; a model records it with
#: its feature names, and a new recipe gets a new name.
FEATURE_SET = "mean-delta-v1"

#: Series decoded, preprocessed or run through the CNN while the next one is read (`featurize_volumes`).
PIPELINE_DEPTH = 2
#: CNN runs at once on a GPU: one runs while the next batch is copied in.
GPU_RUNS = 2

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
TENSORRT = "TensorrtExecutionProvider"


class CpuClock:
    """CPU seconds spent in each step, summed over the threads that ran it.

    Threads share the cores, so wall-clock time per step says little when
    steps overlap; the CPU time of each (``time.thread_time``) says where the
    cores went.  ``with clock.step("cnn"): ...`` adds to "cnn".
    """

    STEPS = ("reading", "decoding", "preprocessing", "cnn", "writing")

    def __init__(self) -> None:
        self._seconds = dict.fromkeys(self.STEPS, 0.0)
        self._lock = threading.Lock()

    @contextmanager
    def step(self, name: str) -> Iterator[None]:
        started = time.thread_time()
        try:
            yield
        finally:
            spent = time.thread_time() - started
            with self._lock:
                self._seconds[name] = self._seconds.get(name, 0.0) + spent

    def seconds(self) -> dict[str, float]:
        with self._lock:
            return dict(self._seconds)

    def describe(self, slices: int) -> str:
        """'reading 0.45, decoding 0.05, ... ms of CPU per slice'."""
        per = ", ".join(f"{name} {1000 * s / max(slices, 1):.2f}" for name, s in self.seconds().items())
        return f"{per} ms of CPU per slice"


# ----------------------------------------------------------------------------- providers


def _gpu_present() -> bool:
    """An NVIDIA GPU is visible to this process (driver loaded, not hidden)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip() in ("", "-1"):
        return False
    try:
        return bool(os.listdir("/proc/driver/nvidia/gpus"))
    except OSError:
        return os.path.exists("/dev/nvidia0")


def choose_providers(available: Sequence[str] | None = None, tensorrt: bool = False) -> list[str]:
    """ONNX Runtime execution providers to ask for, best first, CPU last.

    `available` defaults to what onnxruntime reports, keeping the GPU
    providers only when a GPU is present (onnxruntime-gpu lists CUDA even on
    machines without one); a list given here is taken as it is.  TensorRT is
    used only when `tensorrt` is true: it compiles an engine for every new
    session, which takes minutes and happens again in every database backend.
    """
    if available is None:
        import onnxruntime as ort

        available = ort.get_available_providers()
        if not _gpu_present():
            available = [p for p in available if p not in (CUDA, TENSORRT)]
    chosen = [p for p in ((TENSORRT,) if tensorrt else ()) + (CUDA,) if p in available]
    return chosen + [CPU]


def default_threads() -> int:
    """CPU cores this process may use (its affinity mask, else os.cpu_count())."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


# ----------------------------------------------------------------------------- features


@dataclass
class GroupFeatures:
    """CNN features of one series: one float32 row per image of slices."""

    array: np.ndarray  # float32 (n_groups, D)
    n_slices: int

    def __post_init__(self) -> None:
        self.array = np.ascontiguousarray(self.array, dtype=np.float32)
        if self.array.ndim != 2:
            raise ValueError(f"features must be (n_groups, D), got shape {self.array.shape}")

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(int(v) for v in self.array.shape)

    def to_bytes(self) -> bytes:
        """Raw little-endian float32 in C order (store with `shape` and `sha256`)."""
        return self.array.astype("<f4", copy=False).tobytes(order="C")

    @property
    def sha256(self) -> str:
        """Hex SHA-256 of `to_bytes()`."""
        return hashlib.sha256(self.to_bytes()).hexdigest()

    @classmethod
    def from_bytes(cls, data: bytes | memoryview, shape: Sequence[int], sha256: str | bytes | None = None,
                   *, n_slices: int) -> GroupFeatures:
        """Features stored by `to_bytes`; with `sha256` (hex or 32 raw bytes),
        IntegrityError unless the bytes match it."""
        data = bytes(data)
        if sha256 is not None:
            expected = sha256.hex() if isinstance(sha256, (bytes, bytearray, memoryview)) else str(sha256)
            actual = hashlib.sha256(data).hexdigest()
            if actual != expected.strip().lower():
                raise IntegrityError(
                    f"stored features do not match their SHA-256 (expected {expected}, got {actual})",
                    "the row was altered or truncated; featurize the patient again")
        shape = tuple(int(v) for v in shape)
        if len(shape) != 2 or min(shape) < 0:
            raise IntegrityError(f"stored feature shape {list(shape)} is not (n_groups, D)")
        if len(data) != 4 * shape[0] * shape[1]:
            raise IntegrityError(
                f"stored features hold {len(data)} bytes, but shape {list(shape)} needs {4 * shape[0] * shape[1]}",
                "the row was altered or truncated; featurize the patient again")
        array = np.frombuffer(data, dtype="<f4").reshape(shape).astype(np.float32)
        return cls(array=array, n_slices=int(n_slices))

    def patient_vector(self) -> np.ndarray:
        return patient_vector(self.array, self.n_slices)


def patient_vector(features: np.ndarray, n_slices: int) -> np.ndarray:
    """[mean over images, max minus mean over images, log1p(n_slices)]: float32 (2D + 1,).

    The same information as the mean and the maximum, written as how far the
    most unusual image of the patient stands out from the patient's own
    average, which a tree can split on directly (on the synthetic cohort this
    raised the cross-validated AUC from about 0.86 to 0.89).
    """
    features = np.asarray(features, dtype=np.float32)
    if features.ndim != 2 or features.shape[0] == 0:
        raise ValueError(f"features must be (n_groups >= 1, D), got shape {features.shape}")
    if n_slices < 1:
        raise ValueError(f"n_slices must be >= 1, got {n_slices}")
    mean = features.mean(axis=0, dtype=np.float64)
    return np.concatenate([mean, features.max(axis=0) - mean, [math.log1p(n_slices)]]).astype(np.float32)


def patient_vector_names(d: int) -> list[str]:
    """Names of the entries of `patient_vector` for D features per image."""
    return [f"mean_{i}" for i in range(d)] + [f"delta_{i}" for i in range(d)] + ["log_slices"]


# ----------------------------------------------------------------------------- DICOM


def read_volume(scans: Iterable[tuple[bytes, float]]) -> list[np.ndarray]:
    """HU slices (float32) of (DICOM bytes, z position) pairs, in z order."""
    slices, rescale = read_slices(scans)
    return [dicom.to_hounsfield(s, a, b) for s, (a, b) in zip(slices, rescale)]


def read_slices(scans: Iterable[tuple[bytes, float]]) -> tuple[list[np.ndarray], np.ndarray]:
    """The pixels of (DICOM bytes, z position) pairs in z order, as stored, and
    (slope, intercept) of each slice: HU = slope x stored + intercept (what
    `prepare_volume` takes with `rescale`).  Every slice goes through
    `lungsql.dicom.decode_stored`, the decoder ingest checked it with, under
    the same limits; InvalidScan names the slice that fails."""
    scans = list(scans)
    if not scans:
        raise LungSQLError("the series has no slices", "store at least one CT slice of the patient")
    order = order_slices([z for _, z in scans])
    limits = dicom.Limits.from_settings()
    slices, rescale = [], np.empty((len(scans), 2), np.float64)
    for i, index in enumerate(order):
        data, z = scans[index]
        try:
            decoded = dicom.decode_stored(bytes(data), limits)
        except InvalidScan as exc:
            raise InvalidScan(f"the slice at z = {z:g} cannot be decoded: {exc.message}", exc.hint) from None
        if decoded.stored.ndim != 2:
            raise InvalidScan(f"the slice at z = {z:g} holds pixels of shape {list(decoded.stored.shape)}; "
                              "lungsql featurizes single-frame monochrome CT slices",
                              "multi-frame (Enhanced CT) and colour images are not featurized")
        slices.append(decoded.stored)
        rescale[i] = (decoded.slope, decoded.intercept)
    shapes = {s.shape for s in slices}
    if len(shapes) > 1:
        raise InvalidScan(f"the series mixes slice sizes {sorted(shapes)}; its slices cannot be stacked",
                          "store each series with slices of one size")
    return slices, rescale


# ----------------------------------------------------------------------------- the CNN


class Featurizer:
    """An ONNX CNN in an ONNX Runtime session, with the recipe that feeds it.

    `input_name` and `output_name` default to the model's first input and
    output.  The output must be (N, D) or (N, D, 1, 1).  `provider` is the
    execution provider the session actually uses.

    On the CPU, `threads` (default: one per core) single-threaded runs go at
    once, each on part of a series, and one thread decodes and preprocesses
    the next series.  On a GPU, `GPU_RUNS` runs of whole batches go at once
    and `threads - 1` threads decode and preprocess, since the cores are free
    for it.  `prepare_threads` overrides the latter.
    """

    def __init__(self, onnx_bytes: bytes, input_name: str | None = None, output_name: str | None = None,
                 preprocessing: Preprocessing = Preprocessing(), providers: Sequence[str] | None = None,
                 threads: int | None = None, prepare_threads: int | None = None) -> None:
        import onnxruntime as ort

        from lungsql.onnx_inspect import check_self_contained

        self.preprocessing = preprocessing
        self.threads = int(threads) if threads else default_threads()
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # One thread per run, and `threads` runs at a time (`_submit`): batches
        # need no barrier between the threads of each layer, so a core taken
        # for a while by decoding or another backend slows one run, not all.
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        options.log_severity_level = 3  # errors only: no warnings in psql
        check_self_contained(onnx_bytes)  # no external data, no custom operators, before ONNX Runtime reads it
        try:
            self.session = ort.InferenceSession(
                bytes(onnx_bytes), options, providers=list(providers or choose_providers()))
        except Exception as exc:
            raise ConfigurationError(f"ONNX Runtime cannot load the CNN: {str(exc).strip()[:300]}",
                                     "check that the stored bytes are an ONNX model (see describe_onnx)") from None
        self.provider = self.session.get_providers()[0]
        on_cpu = self.provider == CPU
        #: CNN runs at once, and whether a series' images are split among them.
        self.runs, self._split = (self.threads, True) if on_cpu else (GPU_RUNS, False)
        self.prepare_threads = int(prepare_threads) if prepare_threads else (
            1 if on_cpu else max(1, self.threads - 1))
        self.input_name = self._pick("input", self.session.get_inputs(), input_name).name
        self.output_name = self._pick("output", self.session.get_outputs(), output_name).name
        self._check_input()
        self._pool: ThreadPoolExecutor | None = None
        #: CPU seconds of decoding, preprocessing and the CNN (the caller may add reading and writing).
        self.cpu = CpuClock()
        shape = self._pick("output", self.session.get_outputs(), self.output_name).shape
        #: D when the model declares it, else None.
        self.feature_dim: int | None = shape[1] if len(shape) >= 2 and isinstance(shape[1], int) else None

    @staticmethod
    def _pick(kind: str, nodes: list[Any], name: str | None) -> Any:
        if name is None:
            return nodes[0]
        for node in nodes:
            if node.name == name:
                return node
        raise ConfigurationError(f"the CNN has no {kind} named {name!r}",
                                 f"its {kind}s are {[n.name for n in nodes]}")

    def _check_input(self) -> None:
        node = self._pick("input", self.session.get_inputs(), self.input_name)
        p, shape = self.preprocessing, list(node.shape)
        if node.type != "tensor(float)":
            raise ConfigurationError(f"CNN input {node.name!r} is {node.type}; lungsql feeds float32 images",
                                     "export the model with a float32 NCHW input")
        want = [None, p.slices_per_image, p.image_size, p.image_size]
        if len(shape) != 4 or any(isinstance(h, int) and w is not None and h != w for h, w in zip(shape, want)):
            raise ConfigurationError(
                f"CNN input {node.name!r} has shape {shape}; the preprocessing gives "
                f"(N, {p.slices_per_image}, {p.image_size}, {p.image_size})",
                "set LUNGSQL_IMAGE_SIZE to the model's input size, or use a model with NCHW input")
        self._static_batch = shape[0] if isinstance(shape[0], int) and shape[0] > 0 else None

    def run(self, groups: np.ndarray, batch_size: int | None = None) -> np.ndarray:
        """CNN features of (n, C, S, S) images: float32 (n, D), at most `batch_size` images per call."""
        return self._gather(self._submit(groups, batch_size), len(groups))

    def run_many(self, volumes: Sequence[np.ndarray], batch_size: int | None = None) -> list[np.ndarray]:
        """`run` over several arrays of images, every batch queued at once."""
        pending = [(self._submit(groups, batch_size), len(groups)) for groups in volumes]
        return [self._gather(futures, n) for futures, n in pending]

    def close(self) -> None:
        """Stop the threads that run the CNN (a new `run` starts them again)."""
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> Featurizer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _submit(self, groups: np.ndarray, batch_size: int | None) -> list[Future]:
        """Queue the batches of `groups` on the CNN threads; futures of (images, D) arrays, in order.

        A batch holds at most `batch_size` images and, on the CPU, at most
        1 / threads of them, so that one series keeps every thread busy."""
        groups = np.ascontiguousarray(groups, dtype=np.float32)
        if groups.ndim != 4:
            raise ValueError(f"expected (n, C, S, S) images, got shape {groups.shape}")
        if batch_size is None:
            import config_preprocessing

            batch_size = int(config_preprocessing.get("LUNGSQL_BATCH_SIZE"))
        if batch_size < 1:
            raise ConfigurationError(f"batch size must be positive, got {batch_size}")
        n = groups.shape[0]
        share = math.ceil(n / self.runs) if self._split else n
        size = self._static_batch or max(1, min(batch_size, share))
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=self.runs, thread_name_prefix="lungsql-cnn")
        return [self._pool.submit(self._run_batch, groups[start:start + size]) for start in range(0, n, size)]

    def _gather(self, futures: list[Future], n: int) -> np.ndarray:
        if not futures:
            return np.empty((0, self.feature_dim or 0), np.float32)
        return np.concatenate([f.result() for f in futures])[:n]

    def _run_batch(self, batch: np.ndarray) -> np.ndarray:
        real = batch.shape[0]
        if self._static_batch and real < self._static_batch:  # fixed-batch model: pad the last batch
            batch = np.concatenate([batch, np.zeros((self._static_batch - real, *batch.shape[1:]), np.float32)])
        with self.cpu.step("cnn"):
            result = self.session.run([self.output_name], {self.input_name: batch})[0]
        return np.ascontiguousarray(self._flat(np.asarray(result))[:real], dtype=np.float32)

    def _flat(self, result: np.ndarray) -> np.ndarray:
        if result.ndim < 2 or any(d != 1 for d in result.shape[2:]):
            raise ConfigurationError(
                f"CNN output {self.output_name!r} has shape {list(result.shape)}; expected (N, D) or (N, D, 1, 1)",
                "export the model with global pooling at the end, or name the pooled output")
        return result.reshape(result.shape[0], result.shape[1])

    def featurize_volume(self, hu_slices: Sequence[np.ndarray] | np.ndarray,
                         batch_size: int | None = None) -> GroupFeatures:
        """Features of one series of HU slices already in z order."""
        groups = prepare_volume(hu_slices, self.preprocessing)
        return GroupFeatures(self.run(groups, batch_size), n_slices=len(hu_slices))

    def _prepare_scans(self, scans: list[tuple[bytes, float]]) -> tuple[np.ndarray, int]:
        with self.cpu.step("decoding"):
            slices, rescale = read_slices(scans)
        with self.cpu.step("preprocessing"):
            return prepare_volume(slices, self.preprocessing, rescale), len(slices)

    def featurize_volumes(self, volumes: Iterable[tuple[Hashable, Iterable[tuple[bytes, float]]]],
                          batch_size: int | None = None, overlap: bool = True,
                          errors: Callable[[BaseException], bool] | None = None
                          ) -> Iterator[tuple[Hashable, GroupFeatures | Exception]]:
        """(key, GroupFeatures) for each (key, [(DICOM bytes, z position), ...]), in order.

        With `errors`, an exception raised by one series for which
        `errors(exc)` is true is yielded in place of its features (see
        `PATIENT_ERRORS`) and the others go on; any other exception is raised.

        With `overlap`, the work is a pipeline: the calling thread reads the
        next series from `volumes` (a database cursor stays in the thread that
        opened it) and takes the results, `prepare_threads` threads decode and
        preprocess, and the CNN threads run the batches as they come (ONNX
        Runtime releases the GIL).  At most `PIPELINE_DEPTH` series (plus one
        per extra preprocessing thread) are held beyond the one being read.
        """
        if not overlap:
            for key, scans in volumes:
                try:
                    groups, n = self._prepare_scans(list(scans))
                    yield key, GroupFeatures(self.run(groups, batch_size), n_slices=n)
                except Exception as exc:
                    if errors is None or not errors(exc):
                        raise
                    yield key, exc
            return
        prepare = ThreadPoolExecutor(max_workers=self.prepare_threads, thread_name_prefix="lungsql-prepare")
        depth = PIPELINE_DEPTH + self.prepare_threads - 1
        in_flight: deque[tuple[Hashable, Future]] = deque()
        try:
            for key, scans in volumes:
                in_flight.append((key, prepare.submit(self._prepare_and_submit, list(scans), batch_size)))
                while in_flight and (len(in_flight) > depth or _finished(in_flight[0][1])):
                    yield self._collect(*in_flight.popleft(), errors)
            while in_flight:
                yield self._collect(*in_flight.popleft(), errors)
        finally:
            prepare.shutdown(wait=True, cancel_futures=True)
            for _, future in in_flight:  # the consumer stopped early: drop what is queued
                if future.done() and not future.cancelled() and future.exception() is None:
                    for batch in future.result()[0]:
                        batch.cancel()

    def _prepare_and_submit(self, scans: list[tuple[bytes, float]], batch_size: int | None
                            ) -> tuple[list[Future], int]:
        groups, n = self._prepare_scans(scans)
        return self._submit(groups, batch_size), n

    def _collect(self, key: Hashable, prepared: Future, errors: Callable[[BaseException], bool] | None = None
                 ) -> tuple[Hashable, GroupFeatures | Exception]:
        try:
            futures, n_slices = prepared.result()
            images = math.ceil(n_slices / self.preprocessing.slices_per_image)
            return key, GroupFeatures(self._gather(futures, images), n_slices=n_slices)
        except Exception as exc:
            if errors is None or not errors(exc):
                raise
            return key, exc


def patient_error(exc: BaseException) -> bool:
    """Whether an exception raised while featurizing one series is that series' own (an undecodable
    slice, slices that cannot be stacked): recorded and skipped.  A problem of the CNN or of the
    setup (ConfigurationError, IntegrityError) stops the run instead."""
    return isinstance(exc, Exception) and not isinstance(exc, (ConfigurationError, IntegrityError))


#: What `generate_features` passes as `errors` to `Featurizer.featurize_volumes`.
PATIENT_ERRORS = patient_error


def _finished(prepared: Future) -> bool:
    """The series is preprocessed and every batch of it has run."""
    return prepared.done() and (prepared.exception() is not None or all(f.done() for f in prepared.result()[0]))
