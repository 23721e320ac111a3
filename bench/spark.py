"""Spark: featurization of the benchmark cohort on Apache Spark with 1 and 2 executor cores, against
`CALL lungsql.generate_features` on the same cohort and machine, Spark's start-up, and what scaling
out takes for archives of 1,000 to 1,000,000 studies.

Each run deletes the features, starts a Spark session with a local master of N cores (its start-up
timed apart), and runs `lungsql.spark.featurize.run` with N tasks. Slices/s is given for the whole
job (from its submission to its last task: Python workers starting, each loading the CNN) and in the
run (each task's first patient to its last, as `lungsql.feature_runs` times it, which is how
`CALL lungsql.generate_features` is timed too); the ratio compares the latter. The sizing table
divides an archive's slices (300 per study) by the in-run rate per core with every core busy.
"""

from __future__ import annotations

import time

from lungsql.bench.database import BenchDatabase

CORES = (1, 2)
SLICES_PER_STUDY = 300
ARCHIVES = (1_000, 100_000, 1_000_000)


def run(db: BenchDatabase, in_database_slices_per_s: float) -> dict:
    from lungsql.bench import spark_reading
    from lungsql.spark import featurize as on_spark

    runs = []
    for cores in CORES:
        with db.connect() as conn:
            conn.execute("DELETE FROM lungsql.features")
        started = time.perf_counter()
        spark = on_spark.session(f"local[{cores}]", app_name=f"lungsql-bench-{cores}", conf=spark_reading.conf())
        startup = time.perf_counter() - started
        try:
            result = on_spark.run(spark, partitions=cores, url=db.url)
        finally:
            spark.stop()
        # In the run: from each task's first patient to its last, once its CNN is loaded (as
        # lungsql.feature_runs times it), the steady rate a long job approaches.
        in_run = result.slices / max(shard.seconds for shard in result.shards)
        runs.append({"cores": cores, "startup_s": round(startup, 2), "seconds": round(result.seconds, 2),
                     "slices": result.slices, "slices_per_s": round(result.slices_per_s, 1),
                     "in_run_slices_per_s": round(in_run, 1),
                     "ratio_to_database": round(in_run / in_database_slices_per_s, 3)})
    # Per core with every core busy (the run with the most cores): a run of fewer tasks than cores
    # leaves the other cores to its reading and preprocessing threads and would overstate it.
    widest = max(runs, key=lambda r: r["cores"])
    per_core = widest["in_run_slices_per_s"] / widest["cores"]
    sizing = [{"studies": n, "slices": n * SLICES_PER_STUDY,
               "core_hours": round(n * SLICES_PER_STUDY / per_core / 3600, 1),
               "cores_for_a_day": max(1, round(n * SLICES_PER_STUDY / per_core / 86400 + 0.499))}
              for n in ARCHIVES]
    return {"runs": runs, "slices_per_s_per_core": round(per_core, 1), "sizing": sizing,
            "in_database_slices_per_s": in_database_slices_per_s, "reading": spark_reading.run(db)}
