"""Featurization: slices/s through `CALL lungsql.generate_features` against the bare ONNX Runtime
session on the same preprocessed batches in memory (the efficiency ratio), where the time goes
(the CPU time of reading, DICOM decoding, preprocessing, CNN and writing inside the run, as
lungsql.feature_runs records it), and parallel `shard` sessions."""

from __future__ import annotations

import json
import statistics
import threading
import time

import numpy as np

import config_preprocessing as config
from lungsql.bench.database import BenchDatabase
from lungsql.bench.sizes import Sizes
from lungsql.client import cnns
from lungsql.ml import devices, featurize
from lungsql.ml.cpu_clock import CpuClock
from lungsql.server import pipeline
from lungsql.dicom.series import SUMMARY_COLUMNS, read_slices
from lungsql.ml.preprocess import Preprocessing, prepare_volume

TARGET_SLICES_PER_S = 500.0
TARGET_EFFICIENCY = 0.85
PASSES = 3  # end-to-end runs and bare passes, in turns; the medians are reported
PROVIDERS = {"cpu": [devices.CPU], "cuda": [devices.CUDA, devices.CPU]}


def run(db: BenchDatabase, sizes: Sizes, provider: str | None = None) -> dict:
    cnns.import_builtin(db.engine)
    with db.connect() as conn:
        cnn = conn.execute("SELECT cnn_id, name, model, input_name, output_name, preprocessing "
                           "FROM lungsql.cnn_models ORDER BY cnn_id DESC LIMIT 1").fetchone()
        patients = [r[0] for r in conn.execute("SELECT patient_id FROM lungsql.patients ORDER BY patient_id")]
    providers = PROVIDERS[provider] if provider else devices.choose_providers()
    featurizer = featurize.Featurizer(bytes(cnn[2]), cnn[3], cnn[4], Preprocessing.from_json(_json(cnn[5])),
                                      providers=providers)
    with featurizer:
        prepared, slices = _prepare(db, featurizer, patients)
        featurizer.run_many(prepared[:2])  # warm-up: the first runs allocate
        # End to end and bare in turns, so that both meet the machine in the same state: on a shared
        # machine the speed of the cores drifts from minute to minute.
        runs, passes = [], []
        for attempt in range(PASSES):
            runs.append(_end_to_end(db, delete_first=attempt > 0))
            started = time.perf_counter()
            featurizer.run_many(prepared)
            passes.append(time.perf_counter() - started)
    ratios = [r[0]["slices_per_s"] / (slices / p) for r, p in zip(runs, passes)]
    end_to_end, split = sorted(runs, key=lambda r: r[0]["slices_per_s"])[len(runs) // 2]
    end_to_end["runs_slices_per_s"] = [r[0]["slices_per_s"] for r in runs]
    seconds = statistics.median(passes)
    images = sum(len(g) for g in prepared)
    bare = {"provider": featurizer.provider, "images": images, "slices": slices, "seconds": round(seconds, 3),
            "images_per_s": round(images / seconds, 1), "slices_per_s": round(slices / seconds, 1),
            "passes_seconds": [round(p, 3) for p in passes]}
    efficiency = statistics.median(ratios)
    return {
        "cnn": cnn[1],
        "batch_size": int(config.get("LUNGSQL_BATCH_SIZE")),
        "threads": featurizer.threads,
        "end_to_end": end_to_end,
        "bare_onnxruntime": bare,
        "efficiency": round(efficiency, 3),
        "efficiency_of_each_turn": [round(r, 3) for r in ratios],
        "time_split": split,
        "shards": _shards(db, sizes.shard_sessions),
        "targets": {
            "end_to_end_slices_per_s": _target(end_to_end["slices_per_s"], TARGET_SLICES_PER_S),
            "efficiency": _target(efficiency, TARGET_EFFICIENCY),
        },
    }


def _target(value: float, at_least: float) -> dict:
    return {"value": round(value, 3), "at_least": at_least, "met": value >= at_least}


def _end_to_end(db: BenchDatabase, delete_first: bool) -> tuple[dict, dict]:
    """`CALL lungsql.generate_features()` in a new session, as a DBA runs it: the figures
    lungsql.feature_runs records, and its CPU time per step (summed over the threads that ran each,
    so the shares say where the cores went although the steps overlap in time)."""
    with db.connect() as conn:
        if delete_first:
            conn.execute("DELETE FROM lungsql.features")
        started = time.perf_counter()
        conn.execute("CALL lungsql.generate_features()")
        wall = time.perf_counter() - started
        provider, patients, slices, seconds, cpu = conn.execute(
            "SELECT provider, patients, slices, seconds, cpu_seconds FROM lungsql.feature_runs "
            "ORDER BY run_id DESC LIMIT 1").fetchone()
    figures = {"provider": provider, "patients": patients, "slices": slices, "seconds": round(seconds, 3),
               "slices_per_s": round(slices / seconds, 1), "call_seconds": round(wall, 3),
               "call_slices_per_s": round(slices / wall, 1)}
    cpu = {step: cpu[step] for step in CpuClock.STEPS if step in cpu}  # jsonb sorts its keys
    total = sum(cpu.values())
    split = {"slices": slices, "cpu_seconds": round(total, 3),
             "cores_busy": round(total / seconds, 2),
             "steps": {step: {"cpu_seconds": round(s, 3), "ms_per_slice": round(1000 * s / slices, 3),
                              "share": round(s / total, 3)} for step, s in cpu.items()},
             "bottleneck": max(cpu, key=cpu.get)}
    return figures, split


def _prepare(db: BenchDatabase, featurizer: featurize.Featurizer, patients: list[str]
             ) -> tuple[list[np.ndarray], int]:
    """The bare CNN's input: the same per-patient batches, read, decoded and preprocessed beforehand
    and held in memory (with the number of slices they hold)."""
    prepared: list[np.ndarray] = []
    slices = 0
    with db.connect() as conn:
        for pid in patients:
            cursor = conn.execute(f"SELECT dicom, {', '.join(SUMMARY_COLUMNS)} FROM lungsql.scans "
                                  "WHERE patient_id = %s", (pid,), binary=True)  # bytea as bytes
            names = [column.name for column in cursor.description]
            rows = [dict(zip(names, row)) for row in cursor.fetchall()]
            _, scans = pipeline.choose_among_scans(rows)  # the series generate_features chooses
            stored, rescale = read_slices(scans)
            prepared.append(prepare_volume(stored, featurizer.preprocessing, rescale))
            slices += len(stored)
    return prepared, slices


def _shards(db: BenchDatabase, sessions: tuple[int, ...]) -> list[dict]:
    """N sessions in parallel, each `CALL lungsql.generate_features(shard => i, shards => N)`."""
    results = []
    for n in sessions:
        with db.connect() as conn:
            conn.execute("DELETE FROM lungsql.features")
            first = conn.execute("SELECT coalesce(max(run_id), 0) FROM lungsql.feature_runs").fetchone()[0]
        errors: list[BaseException] = []
        barrier = threading.Barrier(n + 1)

        def session(shard: int) -> None:
            try:
                with db.connect() as conn:
                    conn.execute("SELECT lungsql._load_python()")  # the import, not the work
                    barrier.wait()
                    conn.execute("CALL lungsql.generate_features(shard => %s, shards => %s)", (shard, n))
            except BaseException as exc:  # reported below, after every thread ends
                errors.append(exc)
                barrier.abort()

        threads = [threading.Thread(target=session, args=(i,)) for i in range(n)]
        for thread in threads:
            thread.start()
        barrier.wait()
        started = time.perf_counter()
        for thread in threads:
            thread.join()
        wall = time.perf_counter() - started
        if errors:
            raise errors[0]
        with db.connect() as conn:
            runs = conn.execute("SELECT patients, slices, seconds FROM lungsql.feature_runs WHERE run_id > %s",
                                (first,)).fetchall()
        slices = sum(r[1] for r in runs)
        busiest = max(r[2] for r in runs)  # from the first patient to the last, without loading the CNN
        results.append({"sessions": n, "slices": slices, "wall_seconds": round(wall, 3),
                        "slices_per_s": round(slices / wall, 1),
                        "in_run_slices_per_s": round(slices / busiest, 1),
                        "patients_per_session": [r[0] for r in runs]})
    base = results[0]["in_run_slices_per_s"]
    for r in results:
        r["speedup"] = round(r["in_run_slices_per_s"] / base, 2)
    return results


def _json(value):
    return json.loads(value) if isinstance(value, str) else value
