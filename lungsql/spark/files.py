"""`lungsql featurize --engine spark --source DIR`: featurize a DICOM tree on shared storage, for
sites whose archive is not in the database.

Spark's binaryFile source lists and reads the files (any file system Spark reads: a mounted
share, HDFS, object storage). Each file is checked as `lungsql ingest` checks it
(lungsql.client.ingest.read_instance, with the same limits and, with `deidentify`, the same
de-identification); a file over the size limit is recorded unread. The good slices are shuffled by
patient, with the same hash as the database path's shards, so task i holds every file of the
patients of shard i, sorted by patient; it streams them one patient at a time through the
featurizer core that `generate_features` runs (lungsql.server.pipeline.featurize_patients).

What lands in the database is what the in-database path writes: patients (the rows features refer
to), features under one feature run per task with the series chosen by lungsql.dicom.series, a
patient that cannot be featurized in lungsql.feature_failures, and every file that is not a CT slice
in lungsql.ingest_errors under one ingest run per task. The slices themselves are not stored. A
rerun skips the patients that have features (`only_missing`), so a killed job's rerun finishes
without duplicates.
"""

from __future__ import annotations

import hashlib
import itertools
import time
from dataclasses import asdict, dataclass
from typing import Any, Iterable, Iterator

from lungsql.spark.featurize import (ShardResult, SparkRun, describe_gpus, kept_featurizer, task_data, task_engine,
                                     task_gpu)


@dataclass
class SourceShard(ShardResult):
    ingest_run_id: int = 0
    files_seen: int = 0
    file_errors: int = 0


@dataclass
class SourceRun(SparkRun):
    source: str = ""

    @property
    def files_seen(self) -> int:
        return sum(s.files_seen for s in self.shards)

    @property
    def errors(self) -> int:
        return sum(s.file_errors for s in self.shards)

    def describe(self) -> str:
        failed = sum(s.failed for s in self.shards)
        return (f"{self.files_seen} files under {self.source}: {self.patients} patients, {self.slices} slices "
                f"featurized in {self.seconds:.1f} s ({self.slices_per_s:.0f} slices/s) on {len(self.shards)} "
                "Spark tasks"
                + (f", {failed} patients skipped (lungsql.feature_failures)" if failed else "")
                + (f", {self.errors} files not CT slices (lungsql.ingest_errors)" if self.errors else "")
                + describe_gpus(self.shards))


def run(spark, source: str, partitions: int, cnn_name: str | None = None, only_missing: bool = True,
        retry_failed: bool = False, deidentify: bool = False, url: str | None = None,
        glob: str | None = None, labels: str | None = None) -> SourceRun:
    """Featurize the DICOM files under `source` (a folder, or a URI Spark reads) on `partitions` tasks.

    `url` as in lungsql.spark.featurize.run; `glob` keeps only the file names that match it
    (Spark's pathGlobFilter, e.g. '*.dcm'); with `deidentify`, each executor de-identifies with
    its own site key (LUNGSQL_DEID_KEY, or $LUNGSQL_HOME/deidentify.key), as `lungsql ingest
    --deidentify` does, so no key travels with the job. The labels (`labels`, an `id,cancer` CSV,
    or the tree's stage1_labels.csv as `lungsql ingest` finds it) are loaded first, by the driver.
    As `lungsql ingest`, hidden files and CSV files are not read as DICOM."""
    from pyspark.sql import functions as F

    from lungsql.dicom.reader import Limits

    started = time.perf_counter()
    root = _uri(source)
    _load_labels(root, labels, deidentify, url)
    limit = Limits.from_settings().file_bytes
    reader = spark.read.format("binaryFile").option("recursiveFileLookup", "true")
    if glob:
        reader = reader.option("pathGlobFilter", glob)
    listing = reader.load(root).filter(~F.lower(F.col("path")).endswith(".csv"))
    local = root.startswith("file:")
    if local:  # a mounted share: each executor opens the files itself, so an unreadable one is recorded
        chosen, too_large = listing.select("path"), []
    else:  # binaryFile reads a file's content only for the rows that pass a filter on its length
        chosen = listing.filter(F.col("length") <= limit).select("path", "content")
        too_large = [(_local(r.path), r.length) for r in listing.filter(F.col("length") > limit)
                     .select("path", "length").collect()]
    context = spark.sparkContext
    threads = int(context.getConf().get("spark.task.cpus", "1"))
    args = (partitions, root, cnn_name, bool(only_missing), bool(retry_failed), bool(deidentify), threads, url,
            too_large)
    by_patient = (chosen.rdd.mapPartitions(lambda rows: _read_files(rows, root, deidentify, local))
                  .repartitionAndSortWithinPartitions(partitions, lambda key: _shard_of(key, partitions)))
    results = by_patient.mapPartitionsWithIndex(lambda shard, items: [_task(shard, items, *args)]).collect()
    shards = [SourceShard(**r) for r in sorted(results, key=lambda r: r["shard"])]
    return SourceRun(shards, time.perf_counter() - started, source=root)


def _load_labels(root: str, labels: str | None, deidentify: bool, url: str | None) -> int:
    """Load the labels file (given, or found beside a local tree) as `lungsql ingest` does."""
    from pathlib import Path

    from lungsql.client import dialects, ingest

    path = Path(labels) if labels else (ingest.default_labels(Path(_local(root))) if root.startswith("file:")
                                        else None)
    if path is None:
        return 0
    found = ingest.read_labels(path)
    source = str(path)
    if deidentify:
        deidentifier = ingest.site_deidentifier()
        found = {deidentifier.pseudonym(pid): label for pid, label in found.items()}
        source = path.name
    with task_engine(url) as engine:
        store = dialects.scan_store(engine)
        try:
            return store.load_labels(found, ingest.stored_text(source))
        finally:
            store.close()


def _uri(source: str) -> str:
    """A local folder as an absolute file: URI; a URI (hdfs://, s3a://, file:) as it is."""
    if "://" in source or source.startswith("file:"):
        return source
    from pathlib import Path

    return Path(source).resolve().as_uri()


def _local(path: str) -> str:
    """A file: URI as the local path `lungsql ingest` records; other URIs unchanged."""
    from urllib.parse import unquote, urlparse

    parsed = urlparse(path)
    return unquote(parsed.path) if parsed.scheme == "file" else path


def _shard_of(key: tuple, shards: int) -> int:
    """A patient's shard, as lungsql.server.pipeline.in_shard assigns it; a bad file's by its path."""
    return int.from_bytes(hashlib.sha256(key[1].encode()).digest()[:8], "big") % shards


def _read_files(rows: Iterable, root: str, deidentify: bool, local: bool) -> Iterator[tuple[tuple, Any]]:
    """(("p", patient id, path), ScanRecord) for each file that is a CT slice, else
    (("e", recorded path), reason): as `lungsql ingest` reads and checks files."""
    from pathlib import Path

    from lungsql.client import ingest
    from lungsql.dicom.reader import Limits

    limits = Limits.from_settings()
    deidentifier = ingest.site_deidentifier() if deidentify else None
    transform = ingest.deidentifying_transform(deidentifier) if deidentifier is not None else None
    recorded = ingest.RecordedPaths(Path(_local(root)), deidentifier)
    if local:
        read = ingest.read_files((Path(_local(row.path)) for row in rows), transform, limits)
    else:
        read = ((Path(_local(row.path)), *ingest.read_instance(bytes(row.content), transform, limits))
                for row in rows)
    for path, record, reason in read:
        if record is None:
            yield ("e", recorded(path)), reason
        else:
            yield ("p", record.patient.patient_id, recorded(path)), record


def _task(shard: int, items: Iterator[tuple[tuple, Any]], shards: int, root: str, cnn_name: str | None,
          only_missing: bool, retry_failed: bool, deidentify: bool, threads: int, url: str | None,
          too_large: list[tuple[str, int]]) -> dict:
    """Shard `shard`: its files' errors recorded, its patients featurized, in a Spark Python worker."""
    from lungsql.dicom.reader import Limits
    from lungsql.server import pipeline

    with task_engine(url) as engine, task_data(engine=engine) as data, _Files(data, engine, root, deidentify) as files:
        cnn = data.cnn_model(cnn_name)
        for run_id in data.mark_killed_runs():
            data.notice(f"featurization run {run_id} ended before it finished (its session is gone): marked killed")
        if shard == 0:  # the files too large to read, recorded once
            allowed = Limits.from_settings().decoded_bytes
            for path, size in too_large:
                files.seen += 1
                files.error(files.recorded(path), f"the file holds {size / 1e6:.0f} MB, more than the largest "
                                                  f"image allowed ({allowed / 1e6:.0f} MB of pixels, "
                                                  "LUNGSQL_MAX_DECODED_BYTES)")
        skip = set(data.featurized_patients(cnn["cnn_id"])) if only_missing else set()
        if not retry_failed:
            skip |= set(data.failed_patients(cnn["cnn_id"]))
        gpu = task_gpu()
        with kept_featurizer(threads, gpu)(cnn) as featurizer:
            result = pipeline.featurize_patients(files, cnn, featurizer, files.patients(items, skip), shard, shards)
        files.finish()
    return asdict(SourceShard(shard, result.run_id, result.patients, result.slices, len(result.failed),
                              result.seconds, result.provider, result.cnn, gpu, files.run_id, files.seen,
                              files.errors))


class _Files:
    """The pipeline's data access for one task's files: the series and slices come from the files in
    hand, everything else from the database (PlpyData); patients and file errors are written with
    lungsql ingest's store, under an ingest run of this task."""

    ERRORS_PER_WRITE = 200

    def __init__(self, data, engine, root: str, deidentify: bool):
        self._data = data
        self._engine = engine
        self.root = root
        self.deidentify = deidentify
        self.deidentifier = None
        self.seen = self.errors = 0
        self._pending: list[tuple[str, str]] = []
        self._records: dict[str, list] = {}
        self._started = time.perf_counter()

    def __getattr__(self, name: str) -> Any:  # everything but the series: the database's
        return getattr(self._data, name)

    def __enter__(self) -> _Files:
        from pathlib import Path

        from lungsql.client import dialects, ingest

        if self.deidentify:
            self.deidentifier = ingest.site_deidentifier()
        self._paths = ingest.RecordedPaths(Path(_local(self.root)), self.deidentifier)
        self._store = dialects.scan_store(self._engine)
        self.run_id = self._store.start_run(self._paths.source_dir, self.deidentify)
        return self

    def __exit__(self, *exc) -> None:
        self._store.close()

    def recorded(self, path: str) -> str:
        """A file's path as lungsql.ingest_errors records it (pseudonymous when de-identifying)."""
        from pathlib import Path

        return self._paths(Path(path))

    # -- what the task hands in ------------------------------------------------
    def patients(self, items: Iterator[tuple[tuple, Any]], skip: set[str]) -> Iterator[str]:
        """The task's patients, one at a time, their files held until the featurizer reads them; the
        bad files met on the way recorded."""
        for kind, group in itertools.groupby(items, key=lambda item: item[0][:2] if item[0][0] == "p" else ("e",)):
            if kind[0] == "e":
                for (_, path), reason in group:
                    self.seen += 1
                    self.error(path, reason)
                continue
            patient_id = kind[1]
            records, by_uid = [], {}
            for (_, _, path), record in group:
                self.seen += 1
                known = by_uid.get(record.sop_instance_uid)
                if known is None:
                    by_uid[record.sop_instance_uid] = record.sha256
                    records.append(record)
                elif known != record.sha256:
                    self.error(path, f"another file has SOPInstanceUID {record.sop_instance_uid} with "
                                     "different content: only the first is used")
            if patient_id in skip:
                continue
            self._write(patients=[records[0].patient])  # the row features and failures refer to
            self._records[patient_id] = records
            yield patient_id

    def error(self, path: str, reason: str) -> None:
        self.errors += 1
        self._pending.append((path, reason))
        if len(self._pending) >= self.ERRORS_PER_WRITE:
            self._write()

    def finish(self) -> None:
        self._write()
        self._store.finish_run(self.run_id, time.perf_counter() - self._started)

    def _write(self, patients: list = ()) -> None:
        errors, self._pending = self._pending, []
        counts = {"files_seen": self.seen, "stored": 0, "skipped": 0, "errors": self.errors, "bytes": 0}
        self._store.write_batch(self.run_id, patients, [], errors, counts)

    # -- the series, from the files ----------------------------------------------
    def patient_series(self, patient_id: str):
        from lungsql.dicom.series import summarize_series

        rows = [{"series_instance_uid": r.series_instance_uid, "modality": r.modality,
                 "z_position": r.z_position, "frame_z": list(r.frame_z) if r.frame_z else None,
                 "frames": r.frames, "slice_thickness": r.slice_thickness, "tilt_degrees": r.tilt_degrees,
                 "image_type": r.image_type, "series_description": r.series_description,
                 "convolution_kernel": r.convolution_kernel} for r in self._records[patient_id]]
        chosen = self._data.plpy.execute(
            self._data.plpy.prepare("SELECT series_instance_uid, chosen_by FROM lungsql.series_choices "
                                    "WHERE patient_id = $1", ["text"]), [patient_id])
        override = (chosen[0]["series_instance_uid"], chosen[0]["chosen_by"]) if chosen else (None, None)
        return summarize_series(rows), *override

    def series_scans(self, patient_id: str, series_instance_uid: str) -> list[tuple]:
        records = self._records.pop(patient_id)
        return [(r.data, r.z_position, r.frame_z) for r in records if r.series_instance_uid == series_instance_uid]
