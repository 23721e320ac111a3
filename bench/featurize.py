"""Featurization: slices/s through `CALL lungsql.generate_features` against the bare CNN on the
same preprocessed batches in memory (the efficiency ratio), for each variant of the built-in CNN
(fp32 on ONNX Runtime, int8 on ONNX Runtime and on OpenVINO, bf16 on OpenVINO where the CPU has it);
how close each variant's features are to fp32's on the stored CT; where the time goes (the CPU time
of reading, DICOM decoding, preprocessing, CNN and writing inside the run, as lungsql.feature_runs
records it); and parallel `shard` sessions."""

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
from lungsql.ml import devices, featurize, quantize, runtimes
from lungsql.ml.cpu_clock import CpuClock
from lungsql.server import pipeline
from lungsql.dicom.series import SUMMARY_COLUMNS, read_slices
from lungsql.ml.preprocess import prepare_volume

BUILTIN = "efficientnet-lite0"
TARGET_SLICES_PER_S = 500.0      # fp32, end to end
TARGET_FASTEST_SLICES_PER_S = 1500.0  # the fastest variant, end to end, on 2 cores
TARGET_EFFICIENCY = 0.85
TARGET_COSINE = 0.99
TARGET_SHARDS = 0.95
PASSES = 3  # end-to-end runs and bare passes of each variant, in turns; the medians are reported
PROVIDERS = {"cpu": [devices.CPU], "cuda": [devices.CUDA, devices.CPU]}


def variants(provider: str | None) -> list[str]:
    """The variants this machine can run: fp32 always; int8; OpenVINO's where it is installed, bf16
    where the CPU has it. On a GPU, fp32 only (the reduced-precision variants are CPU recipes)."""
    if provider == "cuda" or devices.CUDA in devices.choose_providers():
        return ["fp32"]
    chosen = ["fp32", "int8"]
    if runtimes.openvino_available():
        chosen.append("int8-openvino")
        if runtimes.cpu_has_bf16():
            chosen.append("bf16")
    return chosen


def run(db: BenchDatabase, sizes: Sizes, provider: str | None = None) -> dict:
    names = variants(provider)
    ids = {v: cnns.import_builtin(db.engine, BUILTIN, variant=v) for v in names}
    cnn_rows = {v: _cnn(db, cnn_id) for v, cnn_id in ids.items()}
    with db.connect() as conn:
        patients = [r[0] for r in conn.execute("SELECT patient_id FROM lungsql.patients ORDER BY patient_id")]
    providers = PROVIDERS[provider] if provider else devices.choose_providers()
    prepared = slices = None
    measured: dict[str, dict] = {}
    for v in names:
        cnn = cnn_rows[v]
        with pipeline.load_featurizer(cnn, providers=providers) as featurizer:
            if prepared is None:  # every variant of one built-in takes the same images
                prepared, slices = _prepare(db, featurizer, patients)
            measured[v] = _variant(db, cnn, featurizer, prepared, slices)
    fp32 = measured["fp32"]
    for v in names[1:]:
        measured[v]["agreement"] = _agreement(db, ids["fp32"], ids[v])
        measured[v]["agreement_at_import"] = cnn_rows[v]["source"].get("agreement")
    fastest = max(names, key=lambda v: measured[v]["end_to_end"]["slices_per_s"])
    shards = {}
    if fastest != "fp32":
        shards[fastest] = _shards(db, sizes.shard_sessions, cnns.variant_name(BUILTIN, fastest))
    # The later sections (Spark, training, scoring, the web app) run on fp32, the newest CNN again;
    # its shard sessions run last and leave its features complete.
    with db.connect() as conn:
        conn.execute("DELETE FROM lungsql.cnn_models WHERE cnn_id = ANY(%s)", ([ids[v] for v in names[1:]],))
    shards["fp32"] = _shards(db, sizes.shard_sessions, BUILTIN)
    targets = {
        "end_to_end_slices_per_s": _target(fp32["end_to_end"]["slices_per_s"], TARGET_SLICES_PER_S),
        "efficiency": _target(fp32["efficiency"], TARGET_EFFICIENCY),
        "fastest_end_to_end_slices_per_s": _target(measured[fastest]["end_to_end"]["slices_per_s"],
                                                   TARGET_FASTEST_SLICES_PER_S),
        "fastest_efficiency": _target(measured[fastest]["efficiency"], TARGET_EFFICIENCY),
        "shards": {v: _target(s[-1]["speedup"], TARGET_SHARDS) for v, s in shards.items() if len(s) > 1},
        "cosine": {v: _target(measured[v]["agreement"]["cosine_mean"], TARGET_COSINE) for v in names[1:]},
    }
    return {
        "cnn": BUILTIN,
        "batch_size": int(config.get("LUNGSQL_BATCH_SIZE")),
        "threads": devices.default_threads(),
        # fp32's figures where earlier runs had them (the Spark benchmark compares with these)
        "end_to_end": fp32["end_to_end"],
        "bare_onnxruntime": fp32["bare"],
        "efficiency": fp32["efficiency"],
        "efficiency_of_each_turn": fp32["efficiency_of_each_turn"],
        "time_split": fp32["time_split"],
        "variants": measured,
        "fastest": fastest,
        "shards": shards["fp32"],
        "shards_of_variant": shards,
        "targets": targets,
    }


def setup(db: BenchDatabase) -> None:
    """What the later sections need of this one when it is not measured (`lungsql bench --only`):
    the fp32 CNN and its features."""
    cnns.import_builtin(db.engine, BUILTIN)
    with db.connect() as conn:
        conn.execute("CALL lungsql.generate_features()")


def _cnn(db: BenchDatabase, cnn_id: int) -> dict:
    with db.connect() as conn:
        cursor = conn.execute("SELECT * FROM lungsql.cnn_models WHERE cnn_id = %s", (cnn_id,), binary=True)
        names = [c.name for c in cursor.description]
        row = dict(zip(names, cursor.fetchone()))
    row["source"] = _json(row["source"])
    row["preprocessing"] = _json(row["preprocessing"])
    return row


def _variant(db: BenchDatabase, cnn: dict, featurizer: featurize.Featurizer, prepared: list[np.ndarray],
             slices: int) -> dict:
    """End-to-end runs of one CNN and bare passes of it, in turns, so that both meet the machine in
    the same state: on a shared machine the speed of the cores drifts from minute to minute."""
    featurizer.run_many(prepared[:2])  # warm-up: the first runs allocate
    runs, passes = [], []
    for _ in range(PASSES):
        runs.append(_end_to_end(db, cnn))
        started = time.perf_counter()
        featurizer.run_many(prepared)
        passes.append(time.perf_counter() - started)
    ratios = [r[0]["slices_per_s"] / (slices / p) for r, p in zip(runs, passes)]
    end_to_end, split = sorted(runs, key=lambda r: r[0]["slices_per_s"])[len(runs) // 2]
    rates = [r[0]["slices_per_s"] for r in runs]
    end_to_end.update(runs_slices_per_s=rates, spread=_spread(rates))
    seconds = statistics.median(passes)
    images = sum(len(g) for g in prepared)
    bare_rates = [round(slices / p, 1) for p in passes]
    bare = {"provider": featurizer.provider, "runtime": featurizer.runtime.describe(), "images": images,
            "slices": slices, "seconds": round(seconds, 3), "images_per_s": round(images / seconds, 1),
            "slices_per_s": round(slices / seconds, 1), "passes_seconds": [round(p, 3) for p in passes],
            "passes_slices_per_s": bare_rates, "spread": _spread(bare_rates)}
    return {"cnn": cnn["name"], "runtime": featurizer.runtime.describe(), "end_to_end": end_to_end, "bare": bare,
            "efficiency": round(statistics.median(ratios), 3),
            "efficiency_of_each_turn": [round(r, 3) for r in ratios], "time_split": split}


def _spread(rates: list[float]) -> dict:
    """The runs' lowest and highest rates, and their distance as a share of the median."""
    median = statistics.median(rates)
    return {"min": min(rates), "max": max(rates), "relative": round((max(rates) - min(rates)) / median, 3)}


def _agreement(db: BenchDatabase, fp32_id: int, variant_id: int) -> dict:
    """How close a variant's features are to fp32's on the stored CT: the cosine similarity of
    every group's feature vector (each image of three slices), over the patients both featurized."""
    with db.connect() as conn:
        rows = conn.execute(
            "SELECT a.data, b.data, a.n_groups, a.dim FROM lungsql.features a JOIN lungsql.features b "
            "USING (patient_id) WHERE a.cnn_id = %s AND b.cnn_id = %s", (fp32_id, variant_id), binary=True).fetchall()
    a = np.concatenate([np.frombuffer(r[0], "<f4").reshape(r[2], r[3]) for r in rows])
    b = np.concatenate([np.frombuffer(r[1], "<f4").reshape(r[2], r[3]) for r in rows])
    figures = quantize.feature_agreement(a, b)
    return {**{k: round(v, 5) if isinstance(v, float) else v for k, v in figures.items()}, "patients": len(rows)}


def _target(value: float, at_least: float) -> dict:
    return {"value": round(value, 3), "at_least": at_least, "met": value >= at_least}


def _end_to_end(db: BenchDatabase, cnn: dict) -> tuple[dict, dict]:
    """`CALL lungsql.generate_features(cnn_name => ...)` in a new session, as a DBA runs it, after the
    CNN's features are deleted: the figures lungsql.feature_runs records, and its CPU time per step
    (summed over the threads that ran each, so the shares say where the cores went although the
    steps overlap in time)."""
    with db.connect() as conn:
        conn.execute("DELETE FROM lungsql.features WHERE cnn_id = %s", (cnn["cnn_id"],))
        started = time.perf_counter()
        conn.execute("CALL lungsql.generate_features(cnn_name => %s)", (cnn["name"],))
        wall = time.perf_counter() - started
        provider, patients, slices, seconds, cpu = conn.execute(
            "SELECT provider, patients, slices, seconds, cpu_seconds FROM lungsql.feature_runs "
            "WHERE cnn_id = %s ORDER BY run_id DESC LIMIT 1", (cnn["cnn_id"],)).fetchone()
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


def _shards(db: BenchDatabase, sessions: tuple[int, ...], cnn_name: str) -> list[dict]:
    """N sessions in parallel, each `CALL lungsql.generate_features(cnn_name => ..., shard => i,
    shards => N)` (each session's CNN takes its share of the cores: pipeline.shard_threads)."""
    results = []
    for n in sessions:
        with db.connect() as conn:
            conn.execute("DELETE FROM lungsql.features WHERE cnn_id = "
                         "(SELECT cnn_id FROM lungsql.cnn_models WHERE name = %s)", (cnn_name,))
            first = conn.execute("SELECT coalesce(max(run_id), 0) FROM lungsql.feature_runs").fetchone()[0]
        errors: list[BaseException] = []
        barrier = threading.Barrier(n + 1)

        def session(shard: int) -> None:
            try:
                with db.connect() as conn:
                    conn.execute("SELECT lungsql._load_python()")  # the import, not the work
                    barrier.wait()
                    conn.execute("CALL lungsql.generate_features(cnn_name => %s, shard => %s, shards => %s)",
                                 (cnn_name, shard, n))
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
        results.append({"sessions": n, "cnn": cnn_name, "slices": slices, "wall_seconds": round(wall, 3),
                        "slices_per_s": round(slices / wall, 1),
                        "in_run_slices_per_s": round(slices / busiest, 1),
                        "patients_per_session": [r[0] for r in runs]})
    base = results[0]["in_run_slices_per_s"]
    for r in results:
        r["speedup"] = round(r["in_run_slices_per_s"] / base, 2)
    return results


def _json(value):
    return json.loads(value) if isinstance(value, str) else value
