"""`lungsql ingest`: upload every DICOM file under a folder into lungsql.scans.

Works on the Kaggle Data Science Bowl 2017 layout (one folder per patient,
stage1_labels.csv with `id,cancer`) and on any tree of DICOM series, grouped
by their PatientID tag.

Resumable: files are written in batches, each in one transaction with the
run's counters, so a killed run loses at most its open batch; a rerun skips
every instance already stored (by SOPInstanceUID) and duplicates nothing.
Two uploads of one folder at once store each instance once, and each counts
as stored only what it stored.

Nothing in one file stops the upload: whatever a file raises (not DICOM, too
large for the limits, a malformed value, a value the database refuses)
becomes a one-line reason in lungsql.ingest_errors and on the console, and
the upload goes on. Only a lost database connection stops it; the rerun
resumes. Under --deidentify the records of the run keep no original path
component: paths are relative to the folder given, each part pseudonymized
with the site key (a patient folder named after its PatientID gets the same
pseudonym as the patient).
"""

from __future__ import annotations

import csv
import io
import os
import queue
import stat
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any
from dataclasses import dataclass, field
from pathlib import Path

import sqlalchemy as sa

import config_preprocessing as config
from lungsql.client import dialects
from lungsql.dicom import Limits, PatientInfo, ScanRecord, read_scan
from lungsql.errors import ConfigurationError, LungSQLError

LABELS_FILE = "stage1_labels.csv"


@dataclass
class IngestSummary:
    run_id: int = 0
    files_seen: int = 0
    stored: int = 0
    skipped: int = 0
    errors: int = 0
    bytes: int = 0
    patients: set[str] = field(default_factory=set)
    labels: int = 0
    seconds: float = 0.0

    @property
    def counts(self) -> dict[str, int]:
        return {
            "files_seen": self.files_seen,
            "stored": self.stored,
            "skipped": self.skipped,
            "errors": self.errors,
            "bytes": self.bytes,
        }

    def settled(self, written: dialects.Written) -> dict[str, int]:
        """The counters once a batch's `written` (what it did not store after all) is taken into account."""
        counts = self.counts
        for record in written.already:
            counts["stored"] -= 1
            counts["skipped"] += 1
            counts["bytes"] -= len(record.data)
        for record, _ in written.rejected:
            counts["stored"] -= 1
            counts["errors"] += 1
            counts["bytes"] -= len(record.data)
        return counts

    def settle(self, written: dialects.Written) -> None:
        counts = self.settled(written)
        self.stored, self.skipped, self.errors, self.bytes = (counts[k] for k in ("stored", "skipped", "errors",
                                                                                  "bytes"))

    @property
    def files_per_s(self) -> float:
        return self.files_seen / self.seconds if self.seconds else 0.0

    @property
    def mb_per_s(self) -> float:
        return self.bytes / 1e6 / self.seconds if self.seconds else 0.0

    def describe(self) -> str:
        return (
            f"{self.files_seen} files in {self.seconds:.1f} s: {self.stored} stored, "
            f"{self.skipped} already there, {self.errors} rejected; {len(self.patients)} patients, "
            f"{self.bytes / 1e6:.1f} MB stored; {self.files_per_s:.0f} files/s, {self.mb_per_s:.1f} MB/s"
        )


def find_files(root: Path) -> list[Path]:
    """Every file under root that could be DICOM, in a stable order.

    Hidden files and CSV files (the labels) are left out; anything else that
    is not DICOM is reported as such.
    """
    if not root.is_dir():
        raise ConfigurationError(f"{root} is not a folder", hint="give the folder that holds the DICOM files")
    found = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            if name.startswith(".") or name.lower().endswith(".csv"):
                continue
            found.append(Path(folder) / name)
    return found


def read_labels(path: Path) -> dict[str, int]:
    """`id,cancer` rows of a DSB-style labels file; a bad row is an error naming its line."""
    try:
        handle = open(path, newline="", encoding="utf-8-sig")
    except OSError as exc:
        raise ConfigurationError(f"cannot read labels file {path}: {exc.strerror}") from None
    with handle:
        reader = csv.DictReader(handle)
        if not reader.fieldnames or not {"id", "cancer"} <= {f.strip() for f in reader.fieldnames}:
            raise ConfigurationError(
                f"labels file {path} needs the columns id,cancer; found {reader.fieldnames}",
                hint="use the DSB 2017 format: a header line `id,cancer`, then one patient per line",
            )
        labels = {}
        for line, row in enumerate(reader, start=2):
            row = {k.strip(): (v or "").strip() for k, v in row.items() if k}
            if row["cancer"] not in ("0", "1") or not row["id"]:
                raise ConfigurationError(
                    f"labels file {path}, line {line}: expected a patient id and cancer 0 or 1, "
                    f"got {row['id']!r},{row['cancer']!r}"
                )
            labels[row["id"]] = int(row["cancer"])
    return labels


def default_labels(root: Path) -> Path | None:
    for candidate in (root / LABELS_FILE, root.parent / LABELS_FILE):
        if candidate.is_file():
            return candidate
    return None


class RecordedPaths:
    """How the run's records name a file: its path, or under --deidentify a pseudonymous one.

    Pseudonymous paths are relative to the ingest root, every part replaced
    by the de-identifier's keyed pseudonym (the file's suffix kept), so
    reruns give the same names and nothing of the original names is stored.
    """

    def __init__(self, root: Path, deidentifier=None):
        self.root = root
        self.deidentifier = deidentifier

    @property
    def source_dir(self) -> str:
        if self.deidentifier is None:
            return stored_text(str(self.root))
        return "deidentified:" + self.deidentifier.pseudonym(str(self.root))

    def __call__(self, path: Path) -> str:
        if self.deidentifier is None:
            return stored_text(str(path))
        try:
            parts = path.relative_to(self.root).parts
        except ValueError:
            parts = (path.name,)
        named = [self.deidentifier.pseudonym(stored_text(part)) for part in parts[:-1]]
        last = Path(stored_text(parts[-1])) if parts else Path("")
        named.append(self.deidentifier.pseudonym(last.stem) + last.suffix.lower()[:8])
        return "/".join(named)


def stored_text(value: str) -> str:
    """A path or message as text PostgreSQL stores: undecodable bytes escaped, no NUL."""
    return value.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace").replace("\x00", "")


def deidentifying_transform(deidentifier) -> Callable:
    """Rewrites a dataset following PS3.15's basic profile and returns its new bytes."""

    def transform(ds) -> bytes:
        deidentifier.apply(ds)
        buffer = io.BytesIO()
        ds.save_as(buffer, enforce_file_format=True)
        return buffer.getvalue()

    return transform


def site_deidentifier(allow_burned_in: bool = False):
    """The de-identifier keyed by this site's secret (LUNGSQL_DEID_KEY or $LUNGSQL_HOME/deidentify.key)."""
    from lungsql.dicom.deidentify import Deidentifier
    from lungsql.client.secrets import site_secret

    key = site_secret("deidentify", "LUNGSQL_DEID_KEY")
    return Deidentifier(key, allow_burned_in=True) if allow_burned_in else Deidentifier(key)


class _Batch:
    def __init__(self) -> None:
        self.patients: dict[str, PatientInfo] = {}
        self.scans: list[ScanRecord] = []
        self.errors: list[tuple[str, str]] = []

    def __len__(self) -> int:
        return len(self.scans) + len(self.errors)


class Upload:
    """One run of lungsql.ingest_runs: instances offered one at a time are checked and stored in batches.

    Every way in uses it: a folder (`ingest`), a pull from a PACS, a push to the listener. Each
    instance is offered once, read (`read_instance`) or with the reason it could not be; `offer`
    batches it and `commit` writes the batch in one transaction with the run's counters. An
    instance already stored (by SOPInstanceUID) is counted and skipped, so a rerun duplicates
    nothing. `on_error(origin, reason)` hears of every instance that is not stored.

    With a `deidentifier`, `transform` is what `read_instance` must apply, labels follow the
    patients to their pseudonymous PatientIDs, and names given to `offer` must already be
    pseudonymous (see RecordedPaths).
    """

    def __init__(self, engine: sa.Engine, source: str, *, deidentifier=None, labels: dict[str, int] | None = None,
                 labels_source: str = "", batch_size: int | None = None,
                 on_error: Callable[[Any, str], None] | None = None):
        self.engine = engine
        self.source = source
        self.deidentifier = deidentifier
        self.transform = deidentifying_transform(deidentifier) if deidentifier is not None else None
        self.limits = Limits.from_settings()
        self.batch_size = batch_size or config.get("LUNGSQL_INGEST_BATCH")
        self.labels = labels or {}
        if deidentifier is not None:
            self.labels = {deidentifier.pseudonym(pid): label for pid, label in self.labels.items()}
        self.labels_source = labels_source
        self.on_error = on_error
        self.summary = IngestSummary()
        self._batch = _Batch()
        self._origins: dict[str, tuple[str, Any]] = {}  # SOPInstanceUID -> (recorded name, origin) of the batch
        self._started = 0.0

    def __enter__(self) -> Upload:
        self._store = dialects.scan_store(self.engine)
        self._started = time.perf_counter()
        try:
            if self.labels:
                self.summary.labels = self._store.load_labels(self.labels, stored_text(self.labels_source))
            self._stored = self._store.stored_uids()
            self._shapes = self._store.series_shapes()
            self.summary.run_id = self._store.start_run(stored_text(self.source), self.deidentifier is not None)
        except BaseException:
            self._store.close()
            raise
        return self

    def __exit__(self, kind, exc, tb) -> None:
        try:
            if kind is None:
                self.commit()
                self.summary.seconds = time.perf_counter() - self._started
                self._store.finish_run(self.summary.run_id, self.summary.seconds)
        finally:
            self._store.close()

    def read(self, data: bytes) -> tuple[ScanRecord | None, str | None]:
        """`read_instance` with this upload's de-identification and limits."""
        return read_instance(data, self.transform, self.limits)

    def is_stored(self, sop_instance_uid: str) -> bool:
        """Whether the instance is in the database (or in the open batch): a pull need not fetch it."""
        return sop_instance_uid in self._stored

    def offer(self, name: str, record: ScanRecord | None, reason: str | None = None, origin: Any = None) -> str:
        """Take one instance (its record, or the reason it has none); 'stored', 'skipped' or 'rejected'.

        'stored' means batched: it is in the database once `commit` (called every batch_size
        instances, and at the end) returns without naming it."""
        summary, origin = self.summary, name if origin is None else origin
        summary.files_seen += 1
        if record is not None:
            reason = _conflict(record, self._stored, self._shapes)
        if reason is not None:
            summary.errors += 1
            self._batch.errors.append((stored_text(name), stored_text(reason)))
            if self.on_error:
                self.on_error(origin, reason)
            outcome = "rejected"
        elif record.sop_instance_uid in self._stored:
            summary.skipped += 1
            summary.patients.add(record.patient.patient_id)
            outcome = "skipped"
        else:
            self._stored[record.sop_instance_uid] = record.sha256
            self._shapes.setdefault(record.series_instance_uid, (record.rows, record.columns))
            self._batch.patients.setdefault(record.patient.patient_id, record.patient)
            self._batch.scans.append(record)
            self._origins[record.sop_instance_uid] = (stored_text(name), origin)
            summary.stored += 1
            summary.bytes += len(record.data)
            summary.patients.add(record.patient.patient_id)
            outcome = "stored"
        if len(self._batch) >= self.batch_size:
            self.commit()
        return outcome

    def commit(self) -> dict[str, str]:
        """Write the open batch in one transaction; SOPInstanceUID -> reason for each the database refused."""
        batch, origins = self._batch, self._origins
        self._batch, self._origins = _Batch(), {}
        if not len(batch):
            return {}
        written = self._store.write_batch(self.summary.run_id, batch.patients.values(), batch.scans, batch.errors,
                                          self.summary.settled, path_of=lambda r: origins[r.sop_instance_uid][0])
        self.summary.settle(written)
        refused = {}
        for record, reason in written.rejected:
            self._stored.pop(record.sop_instance_uid, None)
            refused[record.sop_instance_uid] = reason
            if self.on_error:
                self.on_error(origins[record.sop_instance_uid][1], reason)
        return refused


def ingest(
    engine: sa.Engine,
    root: Path,
    labels_csv: Path | None = None,
    deidentify: bool = False,
    batch_size: int | None = None,
    on_file: Callable[[Path, int], None] | None = None,
    on_error: Callable[[Path, str], None] | None = None,
    allow_burned_in: bool = False,
) -> IngestSummary:
    """Upload the DICOM files under root. `on_file(path, bytes)` and `on_error(path, reason)` report progress.

    With `deidentify`, slices whose BurnedInAnnotation is YES are rejected unless `allow_burned_in`.
    """
    root = Path(root).resolve()
    files = find_files(root)
    labels_path = labels_csv or default_labels(root)
    labels = read_labels(labels_path) if labels_path else {}
    deidentifier = site_deidentifier(allow_burned_in) if deidentify else None
    recorded = RecordedPaths(root, deidentifier)
    labels_source = "" if labels_path is None else labels_path.name if deidentify else str(labels_path)
    upload = Upload(engine, recorded.source_dir, deidentifier=deidentifier, labels=labels,
                    labels_source=labels_source, batch_size=batch_size, on_error=on_error)
    with upload:
        # Files are read and parsed in a thread while this one writes to the database.
        for path, record, reason in prefetch(read_files(files, upload.transform, upload.limits),
                                             depth=2 * upload.batch_size):
            upload.offer(recorded(path), record, reason, origin=path)
            if on_file:
                on_file(path, len(record.data) if record is not None else 0)
    return upload.summary


def read_instance(data: bytes, transform: Callable | None, limits: Limits) -> tuple[ScanRecord | None, str | None]:
    """(record, None) for the bytes of a CT instance, else (None, a one-line reason).

    Whatever the bytes make a library raise is the reason: nothing in one instance stops an upload."""
    try:
        return read_scan(data, transform, limits), None
    except LungSQLError as exc:
        return None, exc.message
    except MemoryError:
        return None, "not enough memory to read this file"
    except Exception as exc:  # a malformed file can make any library raise anything
        text = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
        return None, f"cannot read as a CT slice: {type(exc).__name__}" + (f": {text}" if text else "")


def read_files(files: list[Path], transform: Callable | None, limits: Limits
              ) -> Iterator[tuple[Path, ScanRecord | None, str | None]]:
    """(path, record, None) for each file that is a CT slice, else (path, None, one-line reason)."""
    for path in files:
        try:
            status = path.stat()
            if not stat.S_ISREG(status.st_mode):  # a device or a pipe would be read forever
                yield path, None, "not a regular file (a device, pipe or socket): not read"
                continue
            if status.st_size > limits.file_bytes:
                yield path, None, (f"the file holds {status.st_size / 1e6:.0f} MB, more than the largest image "
                                   f"allowed ({limits.decoded_bytes / 1e6:.0f} MB of pixels, "
                                   "LUNGSQL_MAX_DECODED_BYTES)")
                continue
            with open(path, "rb") as handle:
                data = handle.read(limits.file_bytes + 1)  # no more, should it grow meanwhile
        except OSError as exc:
            yield path, None, f"cannot read file: {exc.strerror or exc}"
            continue
        yield (path, *read_instance(data, transform, limits))


def prefetch(items: Iterator, depth: int) -> Iterator:
    """Yield what `items` yields, computed ahead by a thread, at most `depth` ahead."""
    done = object()
    ahead: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def produce() -> None:
        try:
            for item in items:
                if stop.is_set():
                    return
                ahead.put(item)
            ahead.put(done)
        except BaseException as exc:  # handed to the consumer, raised there
            ahead.put(exc)

    worker = threading.Thread(target=produce, name="lungsql-reader", daemon=True)
    worker.start()
    try:
        while (item := ahead.get()) is not done:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        while worker.is_alive():  # unblock a producer waiting on a full queue
            try:
                ahead.get_nowait()
            except queue.Empty:
                worker.join(0.05)


def _conflict(record: ScanRecord, stored: dict[str, bytes], shapes: dict[str, tuple[int, int]]) -> str | None:
    """Why a valid slice still cannot join what is stored, or None."""
    known = stored.get(record.sop_instance_uid)
    if known is not None and known != record.sha256:
        return f"SOPInstanceUID {record.sop_instance_uid} is already stored with different content"
    shape = shapes.get(record.series_instance_uid)
    if shape is not None and shape != (record.rows, record.columns):
        return (
            f"{record.rows}x{record.columns} slice in series {record.series_instance_uid}, "
            f"whose slices are {shape[0]}x{shape[1]}"
        )
    return None

