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


@dataclass
class SparkRun:
    shards: list[ShardResult]
    seconds: float  # from submitting the job to the last task's end (Spark's start-up not included)
    startup_seconds: float

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
                + f"; Spark started in {self.startup_seconds:.1f} s")


def session(master: str | None = None, app_name: str = "lungsql", cores_per_task: int = 1):
    """The Spark session (an existing one is reused); `master` such as local[2] or spark://host:7077."""
    import sys

    from pyspark.sql import SparkSession

    # Python workers run this interpreter (lungsql's environment) unless the site says otherwise.
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    builder = SparkSession.builder.appName(app_name).config("spark.task.cpus", str(cores_per_task))
    builder = builder.config("spark.ui.showConsoleProgress", "false")
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
                    time.perf_counter() - started, 0.0)


_featurizers: dict[tuple, Any] = {}


def _task(shard: int, shards: int, cnn_name: str | None, only_missing: bool, retry_failed: bool,
          threads: int, url: str | None = None) -> dict:
    """One shard of generate_features, in a Spark Python worker, on its own connection."""
    from lungsql.server import pipeline

    with _data(url) as data:

        def kept(cnn: dict) -> Any:  # one ONNX Runtime session per Python worker and CNN, across tasks
            key = (cnn["sha256"], threads)
            if key not in _featurizers:
                _featurizers[key] = pipeline.load_featurizer(cnn, threads=threads)
            return _Reused(_featurizers[key])

        result = pipeline.generate_features(data, cnn_name, only_missing, shard, shards, retry_failed=retry_failed,
                                            featurizer_for=kept)
    return asdict(ShardResult(shard, result.run_id, result.patients, result.slices, len(result.failed),
                              result.seconds, result.provider, result.cnn))


@contextlib.contextmanager
def _data(url: str | None):
    """The pipeline's data access (lungsql.server.plpy_data) on a connection of this worker's own."""
    from lungsql.client import db
    from lungsql.server.plpy_data import PlpyData
    from lungsql.spark.plpy_client import PlpyClient

    url = url or config.get("LUNGSQL_DATABASE_URL")
    if not url:
        from lungsql.errors import ConfigurationError

        raise ConfigurationError("the Spark executor has no LUNGSQL_DATABASE_URL",
                                 hint="set it in each worker's environment (spark-env.sh, or the cluster "
                                      "manager's), which its executors inherit")
    engine = db.connect(url)
    raw = engine.raw_connection()
    try:
        yield PlpyData(PlpyClient(raw.driver_connection, on_notice=lambda text: print(text, flush=True)))
    finally:
        raw.close()
        engine.dispose()


class _Reused:
    """A kept featurizer, used as `with load_featurizer(cnn) as featurizer:` uses a new one, left open."""

    def __init__(self, featurizer):
        self.featurizer = featurizer

    def __enter__(self):
        return self.featurizer

    def __exit__(self, *exc) -> None:
        return None


def main(argv: list[str] | None = None) -> None:
    """spark-submit entry point: featurize the database in LUNGSQL_DATABASE_URL on the cluster."""
    parser = argparse.ArgumentParser(prog="python -m lungsql.spark.featurize",
                                     description="CNN features of every patient, on a Spark cluster")
    parser.add_argument("--partitions", type=int, default=None, help="tasks (default: the cluster's cores)")
    parser.add_argument("--cnn", dest="cnn_name", help="CNN name (default: the newest)")
    parser.add_argument("--all", dest="redo", action="store_true", help="every patient again, not only missing")
    parser.add_argument("--retry-failed", action="store_true")
    args = parser.parse_args(argv)
    spark = session()
    partitions = args.partitions or spark.sparkContext.defaultParallelism
    print(run(spark, partitions, args.cnn_name, not args.redo, args.retry_failed).describe())


if __name__ == "__main__":
    main()


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

    with _data(url) as data:
        deployed = data.deployed(model_name)
        if deployed is None:
            return []
        patients = [p for p in data.featurized_patients(deployed["cnn_id"]) if pipeline.in_shard(p, shard, shards)]
        scores = pipeline.score(data, patients, model_name).results if patients else []
        data.commit()  # the predictions, recorded
    return scores
