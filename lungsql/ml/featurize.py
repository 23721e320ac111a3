"""CNN features of CT series with ONNX Runtime: the Featurizer and its thread pipeline.

A series is read in z order (lungsql.dicom.series), becomes images of three
consecutive slices (lungsql.ml.preprocess), and an ONNX CNN turns each image
into a feature row (``Featurizer``): the rows are a GroupFeatures
(lungsql.ml.features). The CNN runs on the providers lungsql.ml.devices
chooses; lungsql.ml.cpu_clock says where the cores went.
"""

from __future__ import annotations

import math
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, Hashable, Iterable, Iterator, Sequence

import numpy as np

from lungsql.dicom.series import read_slices
from lungsql.errors import ConfigurationError, IntegrityError
from lungsql.ml.cpu_clock import CpuClock
from lungsql.ml.devices import CPU, choose_providers, default_threads
from lungsql.ml.features import GroupFeatures
from lungsql.ml.preprocess import Preprocessing, fits_input, prepare_volume
from lungsql.ml.runtimes import OPENVINO_CPU, Runtime, check_available, open_session

#: Series decoded, preprocessed or run through the CNN while the next one is read (`featurize_volumes`).
PIPELINE_DEPTH = 2
#: CNN runs at once on a GPU: one runs while the next batch is copied in.
GPU_RUNS = 2

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
                 threads: int | None = None, prepare_threads: int | None = None,
                 batch_size: int | None = None, runtime: Runtime | None = None) -> None:
        import config_preprocessing as config

        #: Images per CNN run unless a call says otherwise: the setting LUNGSQL_BATCH_SIZE, read once here.
        self.batch_size = int(batch_size) if batch_size else int(config.get("LUNGSQL_BATCH_SIZE"))

        from lungsql.ml.onnx_inspect import check_self_contained

        self.preprocessing = preprocessing
        self.threads = int(threads) if threads else default_threads()
        #: The engine and precision the CNN runs in (lungsql.ml.runtimes): ONNX Runtime unless told.
        self.runtime = runtime or Runtime()
        check_self_contained(onnx_bytes)  # no external data, no custom operators, before a runtime reads it
        check_available(self.runtime)  # a missing engine is the setup's problem, said as such
        try:
            self.session = open_session(onnx_bytes, self.runtime, self.threads, providers or choose_providers())
        except ConfigurationError:
            raise
        except Exception as exc:
            raise ConfigurationError(f"{self.runtime.describe()} cannot load the CNN: {str(exc).strip()[:300]}",
                                     "check that the stored bytes are an ONNX model (see describe_onnx)") from None
        self.provider = self.session.get_providers()[0]
        on_cpu = self.provider in (CPU, OPENVINO_CPU)
        #: CNN runs at once, and whether a series' images are split among them.
        self.runs, self._split = (self.threads, True) if on_cpu else (GPU_RUNS, False)
        self.prepare_threads = int(prepare_threads) if prepare_threads else (
            1 if on_cpu else max(1, self.threads - 1))
        self.input_name = self._pick("input", self.session.get_inputs(), input_name).name
        self.output_name = self._pick("output", self.session.get_outputs(), output_name).name
        self._check_input()
        self._pool: ThreadPoolExecutor | None = None
        #: CPU seconds of decoding, preprocessing and the CNN (the caller may add reading and writing); OpenVINO
        #: runs the CNN on threads of its own, whose CPU the clock counts as the process's less the other steps.
        self.cpu = self.new_clock()
        shape = self._pick("output", self.session.get_outputs(), self.output_name).shape
        #: D when the model declares it, else None.
        self.feature_dim: int | None = shape[1] if len(shape) >= 2 and isinstance(shape[1], int) else None

    def new_clock(self) -> CpuClock:
        """Start counting where the cores go afresh (a run of a featurizer kept across runs)."""
        self.cpu = CpuClock(elsewhere="cnn" if self.provider == OPENVINO_CPU else None)
        return self.cpu

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
        if not fits_input(shape, p):
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
            batch_size = self.batch_size
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
        """(key, GroupFeatures) for each (key, [(DICOM bytes, z position[, frame z]), ...]), in order.

        A series given as an exception (it could not be read) is that series' error.

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
                    if isinstance(scans, BaseException):  # the series could not even be read
                        raise scans
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
                if isinstance(scans, BaseException):  # the series could not even be read: its error, in turn
                    failed: Future = Future()
                    failed.set_exception(scans)
                    in_flight.append((key, failed))
                else:
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
