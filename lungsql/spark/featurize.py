"""`lungsql featurize --engine spark`: generate_features as a Spark job, one task per shard.

The driver only plans: it starts (or joins) a Spark session and runs `partitions` tasks. Task i
featurizes shard i of `partitions` exactly as `CALL lungsql.generate_features(shard => i,
shards => partitions)` would, with its own connection to the database; the ONNX Runtime session is
kept per Python worker (one per executor core slot), and its threads follow `spark.task.cpus`.

For a real cluster, `spark-submit` this module's file (`--help` lists its options): every worker
needs lungsql installed (the wheel with the ml extra) and LUNGSQL_DATABASE_URL in its own
environment (spark-env.sh, or the cluster manager's), which its executors inherit.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import time
from dataclasses import asdict, dataclass
from typing import Any

import config_preprocessing as config


@dataclass
class ShardResult:
    shard: int
    run_id: int
    patients: int
    slices: int
    failed: int
    seconds: float
    provider: str
    cnn: str
    gpu: int | None = None  # the GPU Spark gave the task, if the cluster schedules GPUs


def describe_gpus(shards) -> str:
    """What a job's tasks were given and what ONNX Runtime made of it, for the job's last line."""
    gpus = sorted({s.gpu for s in shards if s.gpu is not None})
    if not gpus:
        return ""
    providers = sorted({s.provider for s in shards if s.gpu is not None})
    text = f"; tasks given GPUs {', '.join(map(str, gpus))}, run on {', '.join(providers)}"
    if "CUDAExecutionProvider" not in providers:
        text += " (this onnxruntime has no CUDA: install onnxruntime-gpu on the executors)"
    return text


@dataclass
class SparkRun:
    shards: list[ShardResult]
    seconds: float  # from submitting the job to the last task's end (Spark's start-up not included)

    @property
    def patients(self) -> int:
        return sum(s.patients for s in self.shards)

    @property
    def slices(self) -> int:
        return sum(s.slices for s in self.shards)

    @property
    def slices_per_s(self) -> float:
        return self.slices / self.seconds if self.seconds else 0.0

    def describe(self) -> str:
        failed = sum(s.failed for s in self.shards)
        return (f"{self.patients} patients, {self.slices} slices in {self.seconds:.1f} s "
                f"({self.slices_per_s:.0f} slices/s) on {len(self.shards)} Spark tasks"
                + (f", {failed} patients skipped" if failed else "")
                + describe_gpus(self.shards))


def session(master: str | None = None, app_name: str = "lungsql", cores_per_task: int = 1,
            conf: dict[str, str] | None = None):
    """The Spark session (an existing one is reused); `master` such as local[2] or spark://host:7077,
    `conf` more of Spark's settings."""
    import sys

    from pyspark.sql import SparkSession

    # Python workers run this interpreter (lungsql's environment) unless the site says otherwise.
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    builder = SparkSession.builder.appName(app_name).config("spark.task.cpus", str(cores_per_task))
    builder = builder.config("spark.ui.showConsoleProgress", "false")
    for key, value in (conf or {}).items():
        builder = builder.config(key, value)
    if master:
        builder = builder.master(master)
    return builder.getOrCreate()


def run(spark, partitions: int, cnn_name: str | None = None, only_missing: bool = True,
        retry_failed: bool = False, url: str | None = None) -> SparkRun:
    """Featurize on Spark: `partitions` tasks, each one shard of generate_features.

    `url`, when given, travels to the tasks with the job (for a local master, whose executors are
    this machine); otherwise each executor connects to its own LUNGSQL_DATABASE_URL, which is how a
    shared cluster should be set up: the database's credentials then never pass through the driver."""
    started = time.perf_counter()
    context = spark.sparkContext
    threads = int(context.getConf().get("spark.task.cpus", "1"))
    args = (partitions, cnn_name, bool(only_missing), bool(retry_failed), threads, url)
    results = context.parallelize(range(partitions), partitions).map(lambda shard: _task(shard, *args)).collect()
    return SparkRun([ShardResult(**r) for r in sorted(results, key=lambda r: r["shard"])],
                    time.perf_counter() - started)


_featurizers: dict[tuple, Any] = {}


def task_gpu() -> int | None:
    """The GPU Spark gave this task (its resource 'gpu', when the cluster schedules GPUs), or None."""
    from pyspark import TaskContext

    context = TaskContext.get()
    resources = context.resources() if context is not None else {}
    addresses = resources["gpu"].addresses if "gpu" in resources else []
    return int(addresses[0]) if addresses else None


def task_providers(gpu: int | None) -> list | None:
    """ONNX Runtime providers for a task: CUDA on the task's own GPU when Spark gave it one (and this
    onnxruntime has CUDA), else lungsql.ml.devices' choice."""
    if gpu is None:
        return None
    from lungsql.ml import devices

    return [(devices.CUDA, {"device_id": gpu}), devices.CPU]


def kept_featurizer(threads: int, gpu: int | None = None):
    """`featurizer_for` for generate_features: one ONNX Runtime session per Python worker, CNN and
    GPU, kept across the tasks that worker runs."""
    from lungsql.server import pipeline

    def kept(cnn: dict) -> Any:
        key = (cnn["sha256"], cnn.get("name"), threads, gpu)  # variants of one ONNX file differ by runtime
        if key not in _featurizers:
            _featurizers[key] = pipeline.load_featurizer(cnn, threads=threads, providers=task_providers(gpu))
        return _Reused(_featurizers[key])

    return kept


def _task(shard: int, shards: int, cnn_name: str | None, only_missing: bool, retry_failed: bool,
          threads: int, url: str | None = None) -> dict:
    """One shard of generate_features, in a Spark Python worker, on its own connection."""
    from lungsql.server import pipeline

    gpu = task_gpu()
    with task_data(url) as data:
        result = pipeline.generate_features(data, cnn_name, only_missing, shard, shards, retry_failed=retry_failed,
                                            featurizer_for=kept_featurizer(threads, gpu))
    return asdict(ShardResult(shard, result.run_id, result.patients, result.slices, len(result.failed),
                              result.seconds, result.provider, result.cnn, gpu))


@contextlib.contextmanager
def task_engine(url: str | None):
    """An engine on the database, in a Spark worker: `url`, or this worker's LUNGSQL_DATABASE_URL."""
    from lungsql.client import db

    url = url or config.get("LUNGSQL_DATABASE_URL")
    if not url:
        from lungsql.errors import ConfigurationError

        raise ConfigurationError("the Spark executor has no LUNGSQL_DATABASE_URL",
                                 hint="set it in each worker's environment (spark-env.sh, or the cluster "
                                      "manager's), which its executors inherit")
    engine = db.connect(url)
    try:
        yield engine
    finally:
        engine.dispose()


@contextlib.contextmanager
def task_data(url: str | None = None, engine=None):
    """The pipeline's data access (lungsql.server.plpy_data) on a connection of this worker's own
    (from `engine`, else from `url` as task_engine finds it)."""
    from lungsql.server.plpy_data import PlpyData
    from lungsql.spark.plpy_client import PlpyClient

    with contextlib.ExitStack() as stack:
        engine = engine if engine is not None else stack.enter_context(task_engine(url))
        raw = engine.raw_connection()
        stack.callback(raw.close)
        yield PlpyData(PlpyClient(raw.driver_connection, on_notice=lambda text: print(text, flush=True)))


class _Reused:
    """A kept featurizer, used as `with load_featurizer(cnn) as featurizer:` uses a new one, left open."""

    def __init__(self, featurizer):
        self.featurizer = featurizer

    def __enter__(self):
        return self.featurizer

    def __exit__(self, *exc) -> None:
        return None


def score(spark, partitions: int, model_name: str | None = None, url: str | None = None) -> list[tuple[str, float]]:
    """Batch scoring on Spark: every featurized patient of the deployed model's CNN, `partitions`
    tasks by the same hash as featurization, each scoring and recording its patients as
    `lungsql.predict_lung_cancer_batch` does. Returns (patient id, probability), sorted by patient."""
    context = spark.sparkContext
    rows = context.parallelize(range(partitions), partitions).flatMap(
        lambda shard: _score_task(shard, partitions, model_name, url)).collect()
    return sorted(rows)


def _score_task(shard: int, shards: int, model_name: str | None, url: str | None) -> list[tuple[str, float]]:
    from lungsql.server import pipeline

    with task_data(url) as data:
        deployed = data.deployed(model_name)
        if deployed is None:
            return []
        patients = [p for p in data.featurized_patients(deployed["cnn_id"]) if pipeline.in_shard(p, shard, shards)]
        scores = pipeline.score(data, patients, model_name).results if patients else []
        data.commit()  # the predictions, recorded
    return scores


def main(argv: list[str] | None = None) -> None:
    """spark-submit entry point: featurize the database in LUNGSQL_DATABASE_URL on the cluster."""
    parser = argparse.ArgumentParser(prog="python -m lungsql.spark.featurize",
                                     description="CNN features of every patient, on a Spark cluster")
    parser.add_argument("--partitions", type=int, default=None, help="tasks (default: the cluster's cores)")
    parser.add_argument("--cnn", dest="cnn_name", help="CNN name (default: the newest)")
    parser.add_argument("--all", dest="redo", action="store_true", help="every patient again, not only missing")
    parser.add_argument("--retry-failed", action="store_true")
    parser.add_argument("--source", metavar="DIR|URI", help="the DICOM files under DIR, not the database's scans")
    parser.add_argument("--glob", metavar="PATTERN", help="with --source: only file names matching PATTERN")
    parser.add_argument("--deidentify", action="store_true", help="with --source: de-identify with the site key")
    args = parser.parse_args(argv)
    spark = session()
    partitions = args.partitions or spark.sparkContext.defaultParallelism
    if args.source:
        from lungsql.spark import files

        result = files.run(spark, args.source, partitions, args.cnn_name, not args.redo, args.retry_failed,
                           args.deidentify, glob=args.glob)
    else:
        result = run(spark, partitions, args.cnn_name, not args.redo, args.retry_failed)
    print(result.describe())


if __name__ == "__main__":
    main()
