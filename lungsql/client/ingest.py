"""`lungsql ingest`: upload every DICOM file under a folder into lungsql.scans.

Works on the Kaggle Data Science Bowl 2017 layout (one folder per patient,
stage1_labels.csv with `id,cancer`) and on any tree of DICOM series, grouped
by their PatientID tag.

Resumable: files are written in batches, each in one transaction with the
run's counters, so a killed run loses at most its open batch; a rerun skips
every instance already stored (by SOPInstanceUID) and duplicates nothing.
Two uploads of one folder at once store each instance once, and each counts
as stored only what it stored.

With `jobs` above 1 (PostgreSQL), the files are read, checked and hashed by
that many processes, each COPYing its batches on a connection of its own; the
process that started them decides, file by file, what is stored, skipped or
rejected, by the same rules as one stream, so the rows are the same (of two
files that claim one SOPInstanceUID with different contents, the one read
first is kept, which with several streams need not be the first in the
folder). Every batch still writes the run's counters in its own transaction:
a killed run loses at most its open batches, and a rerun duplicates nothing.

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

import collections
import contextlib
import csv
import io
import multiprocessing
import multiprocessing.connection
import os
import queue
import signal
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
from lungsql.errors import ConfigurationError, DatabaseUnavailable, LungSQLError

LABELS_FILE = "stage1_labels.csv"
#: Files a stream is handed at a time; it holds two such chunks, so it never waits for the next.
CHUNK = 4
#: The run's counters, in the order _Tally keeps them.
COUNTERS = ("files_seen", "stored", "skipped", "errors", "bytes")
#: PostgreSQL's SQLSTATE for a transaction it rolled back to break a deadlock, and how often a stream's
#: batch is written again after one.
DEADLOCK_DETECTED = "40P01"
DEADLOCK_RETRIES = 3


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity), the default number of upload streams."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


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
    streams: int = 1

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
        return _less_stored(self.counts, [len(r.data) for r in written.already],
                            [len(r.data) for r, _ in written.rejected])

    def settle(self, written: dialects.Written) -> None:
        self.settle_sizes([len(r.data) for r in written.already], [len(r.data) for r, _ in written.rejected])

    def settle_sizes(self, already: list[int], rejected: list[int]) -> None:
        """Take back from `stored` the slices of these sizes that another upload stored meanwhile
        (`already`) or that the database refused (`rejected`)."""
        counts = _less_stored(self.counts, already, rejected)
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
            + (f" in {self.streams} streams" if self.streams > 1 else "")
        )


def _less_stored(counts: dict[str, int], already: list[int], rejected: list[int]) -> dict[str, int]:
    """`counts` less the stored slices of these sizes, counted instead as skipped (`already` stored by another
    upload) or as errors (`rejected` by the database)."""
    counts = dict(counts)
    for moved, sizes in (("skipped", already), ("errors", rejected)):
        counts["stored"] -= len(sizes)
        counts[moved] += len(sizes)
        counts["bytes"] -= sum(sizes)
    return counts


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


@dataclass(frozen=True)
class Claim:
    """What deciding about a slice needs of it (not its bytes): who it is, its content's hash, the shape of
    its series, its patient and its size. A stream sends this to the process that decides."""

    sop_instance_uid: str
    sha256: bytes
    series_instance_uid: str
    rows: int
    columns: int
    patient: PatientInfo
    size: int

    @classmethod
    def of(cls, record: ScanRecord) -> Claim:
        return cls(record.sop_instance_uid, record.sha256, record.series_instance_uid, record.rows, record.columns,
                   record.patient, len(record.data))


class _Batch:
    def __init__(self) -> None:
        self.patients: dict[str, PatientInfo] = {}
        self.scans: list[ScanRecord] = []
        self.errors: list[tuple[str, str]] = []

    def __len__(self) -> int:
        return len(self.scans) + len(self.errors)

    def in_order(self) -> tuple[list[PatientInfo], list[ScanRecord], list[tuple[str, str]]]:
        """Patients, slices and errors sorted by their keys, as streams write them: two streams that meet on
        a row then wait for each other one way only, never in a deadlock."""
        return (sorted(self.patients.values(), key=lambda p: p.patient_id),
                sorted(self.scans, key=lambda s: s.sop_instance_uid), sorted(self.errors))


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

    def decide(self, claim: Claim | None, reason: str | None, origin: Any) -> tuple[str, str | None]:
        """('stored' | 'skipped' | 'rejected', the reason when rejected) for one instance, counted.

        The one place the rules live, for one stream and for several: an instance already stored (or
        decided to be) is skipped, one whose SOPInstanceUID is stored with other content, or whose shape
        differs from its series', is rejected."""
        summary = self.summary
        summary.files_seen += 1
        if claim is not None:
            reason = _conflict(claim, self._stored, self._shapes)
        if reason is not None:
            summary.errors += 1
            if self.on_error:
                self.on_error(origin, reason)
            return "rejected", reason
        summary.patients.add(claim.patient.patient_id)
        if claim.sop_instance_uid in self._stored:
            summary.skipped += 1
            return "skipped", None
        self._stored[claim.sop_instance_uid] = claim.sha256
        self._shapes.setdefault(claim.series_instance_uid, (claim.rows, claim.columns))
        summary.stored += 1
        summary.bytes += claim.size
        return "stored", None

    def refused(self, sop_instance_uid: str, origin: Any, reason: str) -> None:
        """The database refused a slice decided 'stored': it is not stored (a rerun tries it again)."""
        self._stored.pop(sop_instance_uid, None)
        if self.on_error:
            self.on_error(origin, reason)

    def offer(self, name: str, record: ScanRecord | None, reason: str | None = None, origin: Any = None) -> str:
        """Take one instance (its record, or the reason it has none); 'stored', 'skipped' or 'rejected'.

        'stored' means batched: it is in the database once `commit` (called every batch_size
        instances, and at the end) returns without naming it."""
        origin = name if origin is None else origin
        outcome, reason = self.decide(None if record is None else Claim.of(record), reason, origin)
        if outcome == "rejected":
            self._batch.errors.append((stored_text(name), stored_text(reason)))
        elif outcome == "stored":
            self._batch.patients.setdefault(record.patient.patient_id, record.patient)
            self._batch.scans.append(record)
            self._origins[record.sop_instance_uid] = (stored_text(name), origin)
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
            refused[record.sop_instance_uid] = reason
            self.refused(record.sop_instance_uid, origins[record.sop_instance_uid][1], reason)
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
    jobs: int | None = 1,
) -> IngestSummary:
    """Upload the DICOM files under root. `on_file(path, bytes)` and `on_error(path, reason)` report progress.

    With `deidentify`, slices whose BurnedInAnnotation is YES are rejected unless `allow_burned_in`.
    `jobs` is the number of upload streams (None: one per usable core); on PostgreSQL each reads, checks
    and COPYs its share of the files in a process of its own. SQL Server uploads in one stream.
    """
    if jobs is not None and jobs < 1:
        raise ConfigurationError(f"jobs is {jobs}: an upload needs at least one stream",
                                 hint="give --jobs 1 or more (the default is one per usable core)")
    root = Path(root).resolve()
    files = find_files(root)
    labels_path = labels_csv or default_labels(root)
    labels = read_labels(labels_path) if labels_path else {}
    deidentifier = site_deidentifier(allow_burned_in) if deidentify else None
    recorded = RecordedPaths(root, deidentifier)
    labels_source = "" if labels_path is None else labels_path.name if deidentify else str(labels_path)
    upload = Upload(engine, recorded.source_dir, deidentifier=deidentifier, labels=labels,
                    labels_source=labels_source, batch_size=batch_size, on_error=on_error)
    streams = _streams(engine, usable_cores() if jobs is None else jobs, len(files))
    with upload:
        upload.summary.streams = streams
        if streams > 1:
            _Streams(upload, streams, recorded, on_file).run(files)
            return upload.summary
        # Files are read and parsed in a thread while this one writes to the database.
        for path, record, reason in prefetch(read_files(files, upload.transform, upload.limits),
                                             depth=2 * upload.batch_size):
            upload.offer(recorded(path), record, reason, origin=path)
            if on_file:
                on_file(path, len(record.data) if record is not None else 0)
    return upload.summary


def _streams(engine: sa.Engine, jobs: int, files: int) -> int:
    """How many streams upload `files` files: `jobs`, no more than there are chunks of files to hand out;
    one on SQL Server, and where processes cannot be forked."""
    if engine.dialect.name != "postgresql" or "fork" not in multiprocessing.get_all_start_methods():
        return 1
    return max(1, min(jobs, -(-files // CHUNK)))


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
                # The size stat() gave and one byte more, to see whether the file grew meanwhile (asking for
                # the largest size allowed would have Python set that much memory aside for every file).
                data = handle.read(status.st_size + 1)
                if len(data) > status.st_size:  # it grew: read on, no more than the limit and one byte
                    data += handle.read(limits.file_bytes + 1 - len(data))
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


# -- several streams -------------------------------------------------------------------------------------
class _Tally:
    """The run's counters as committed, shared by its streams (each in a process of its own).

    A batch's transaction writes these plus its own counts. The lock is taken when the batch's counters
    are asked for, just before they are written, and held until that transaction has ended, so no two
    streams write the same total and the row always holds what is committed."""

    def __init__(self, context) -> None:
        self._lock = context.Lock()
        self._values = context.Array("q", len(COUNTERS), lock=False)

    @contextlib.contextmanager
    def batch(self, delta: Callable[[dialects.Written], dict[str, int]]) -> Iterator[Callable]:
        """Yields the `counts` of a write_batch whose own counts are `delta(written)`; they join the total
        once the block ends without an exception (the batch committed)."""
        state: dict[str, Any] = {"held": False, "delta": None}

        def counts(written: dialects.Written) -> dict[str, int]:
            if not state["held"]:
                self._lock.acquire()
                state["held"] = True
            state["delta"] = delta(written)
            return {name: self._values[i] + state["delta"][name] for i, name in enumerate(COUNTERS)}

        try:
            yield counts
            if state["held"]:
                for i, name in enumerate(COUNTERS):
                    self._values[i] += state["delta"][name]
        finally:
            if state["held"]:
                self._lock.release()


class _StreamBatch:
    """What one stream writes in its next transaction: the slices decided 'stored', the errors, and the
    count of those skipped, with the names the run's records give them."""

    def __init__(self) -> None:
        self.batch = _Batch()
        self.names: dict[str, str] = {}  # SOPInstanceUID -> recorded name
        self.skipped = 0

    def __len__(self) -> int:
        return len(self.batch) + self.skipped

    def take(self, outcome: str, record: ScanRecord | None, name: str, reason: str | None) -> None:
        if outcome == "stored":
            self.batch.patients.setdefault(record.patient.patient_id, record.patient)
            self.batch.scans.append(record)
            self.names[record.sop_instance_uid] = name
        elif outcome == "skipped":
            self.skipped += 1
        else:
            self.batch.errors.append((name, reason))

    def delta(self, written: dialects.Written) -> dict[str, int]:
        """This batch's counts, once `written` (what it did not store after all) is taken into account."""
        counts = {"files_seen": len(self), "stored": len(self.batch.scans), "skipped": self.skipped,
                  "errors": len(self.batch.errors), "bytes": sum(len(s.data) for s in self.batch.scans)}
        return _less_stored(counts, [len(r.data) for r in written.already],
                            [len(r.data) for r, _ in written.rejected])


def _stream(conn: multiprocessing.connection.Connection, engine: sa.Engine, run_id: int,
            transform: Callable | None, limits: Limits, batch_size: int, tally: _Tally) -> None:
    """One upload stream, in a process of its own: reads and checks the files it is handed, sends what
    deciding needs to the process that started it, and COPYs the slices it is told to store, a batch per
    transaction, on a connection of its own.

    From the starter: ('go', decisions of the stream's last 'read' or None, paths to read: [] means none
    are left). To it: ('read', [(key, Claim or None, reason)]), ('wrote', uids, already, rejected) after
    each transaction, then ('done',); or ('failed', kind, message, lost connection?) and nothing more."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # an interrupt is for the starter, which stops the streams
    store = None
    try:
        engine.dispose(close=False)  # this process's own connections; the starter's are left alone
        store = dialects.scan_store(engine)
        pending: dict[int, ScanRecord] = {}  # key -> record of a file read, awaiting its decision
        batch, unanswered = _StreamBatch(), 0
        while True:
            _, decisions, paths = conn.recv()
            if decisions is not None:
                unanswered -= 1
                for key, outcome, name, reason in decisions:
                    batch.take(outcome, pending.pop(key, None), name, reason)
                if len(batch) >= batch_size:
                    _write(conn, store, run_id, batch, tally)
                    batch = _StreamBatch()
            if paths:
                keys = [key for key, _ in paths]
                read = []
                for key, (_, record, reason) in zip(keys, read_files([p for _, p in paths], transform, limits)):
                    if record is not None:
                        pending[key] = record
                    read.append((key, None if record is None else Claim.of(record), reason))
                conn.send(("read", read))
                unanswered += 1
            elif not unanswered:
                break
        if len(batch):
            _write(conn, store, run_id, batch, tally)
        conn.send(("done",))
    except BaseException as exc:  # told to the starter, which stops the run
        with contextlib.suppress(Exception):
            conn.send(("failed", type(exc).__name__, _first_line(exc), _lost_connection(exc)))
    finally:
        if store is not None:
            with contextlib.suppress(Exception):
                store.close()


def _write(conn: multiprocessing.connection.Connection, store, run_id: int, batch: _StreamBatch,
           tally: _Tally) -> None:
    for attempt in range(1, DEADLOCK_RETRIES + 1):
        try:
            with tally.batch(batch.delta) as counts:
                written = store.write_batch(run_id, *batch.batch.in_order(), counts,
                                            path_of=lambda r: batch.names[r.sop_instance_uid])
            break
        except Exception as exc:
            # Another upload wrote some of the same rows in another order (an upload in one stream writes
            # them in the order of its files) and the database undid this batch to end the deadlock:
            # written again, it waits for the other's transaction instead.
            if getattr(exc, "sqlstate", None) != DEADLOCK_DETECTED or attempt == DEADLOCK_RETRIES:
                raise
    conn.send(("wrote", [s.sop_instance_uid for s in batch.batch.scans],
               [(r.sop_instance_uid, len(r.data)) for r in written.already],
               [(r.sop_instance_uid, len(r.data), reason) for r, reason in written.rejected]))


def _first_line(exc: BaseException) -> str:
    from lungsql.client.db import redact_url

    text = str(exc).strip()
    return redact_url(text.splitlines()[0][:300]) if text else ""


def _lost_connection(exc: BaseException) -> bool:
    """Whether the database connection failed (not a statement: those carry a SQLSTATE of their own)."""
    import psycopg

    sqlstate = getattr(exc, "sqlstate", None)
    return isinstance(exc, psycopg.OperationalError) and (sqlstate is None or sqlstate[:2] in ("08", "57"))


class _Streams:
    """Several upload streams and the decisions they ask for: files are handed out a few at a time to
    whichever stream asks, and every decision is the upload's (`Upload.decide`), in this process."""

    def __init__(self, upload: Upload, count: int, recorded: RecordedPaths,
                 on_file: Callable[[Path, int], None] | None) -> None:
        self.upload, self.count, self.recorded, self.on_file = upload, count, recorded, on_file
        self._paths: dict[int, Path] = {}
        self._origins: dict[str, Path] = {}  # SOPInstanceUID -> path of a slice decided 'stored', until written

    def run(self, files: list[Path]) -> None:
        context = multiprocessing.get_context("fork")
        tally = _Tally(context)
        todo = collections.deque(enumerate(files))
        upload, workers = self.upload, {}
        try:
            for _ in range(self.count):
                mine, theirs = context.Pipe()
                worker = context.Process(
                    target=_stream, name="lungsql-upload", daemon=True,
                    args=(theirs, upload.engine, upload.summary.run_id, upload.transform, upload.limits,
                          upload.batch_size, tally))
                worker.start()
                theirs.close()
                workers[mine] = worker
            for _ in range(2):  # two chunks each: one to read while the other is decided
                for conn in workers:
                    conn.send(("go", None, self._chunk(todo)))
            running = set(workers)
            while running:
                for conn in multiprocessing.connection.wait(running):
                    message = self._receive(conn, workers[conn])
                    if message[0] == "read":
                        conn.send(("go", [self._decide(*item) for item in message[1]], self._chunk(todo)))
                    elif message[0] == "wrote":
                        self._written(*message[1:])
                    elif message[0] == "done":
                        running.discard(conn)
        except BaseException:
            for worker in workers.values():
                if worker.is_alive():  # stopped early: its open batch is rolled back
                    worker.terminate()
            raise
        finally:
            for conn, worker in workers.items():
                conn.close()
                worker.join()

    def _chunk(self, todo: collections.deque) -> list[tuple[int, Path]]:
        chunk = [todo.popleft() for _ in range(min(CHUNK, len(todo)))]
        self._paths.update(chunk)
        return chunk

    def _receive(self, conn: multiprocessing.connection.Connection, worker) -> tuple:
        try:
            message = conn.recv()
        except EOFError:
            worker.join(timeout=5)
            raise LungSQLError(f"an upload stream stopped (exit code {worker.exitcode}); what it committed "
                               "is stored", hint="run the same upload again: it resumes where it stopped") from None
        if message[0] == "failed":
            _, kind, text, lost = message
            if lost:
                raise DatabaseUnavailable(f"an upload stream lost its database connection: {text}",
                                          hint="run the same upload again once the database is back: it "
                                               "resumes where it stopped")
            raise LungSQLError(f"an upload stream failed: {kind}" + (f": {text}" if text else ""),
                               hint="run the same upload again: it resumes where it stopped")
        return message

    def _decide(self, key: int, claim: Claim | None, reason: str | None) -> tuple[int, str, str, str | None]:
        path = self._paths.pop(key)
        outcome, reason = self.upload.decide(claim, reason, path)
        if outcome == "stored":
            self._origins[claim.sop_instance_uid] = path
        if self.on_file:
            self.on_file(path, claim.size if claim is not None else 0)
        return key, outcome, stored_text(self.recorded(path)), None if reason is None else stored_text(reason)

    def _written(self, uids: list[str], already: list[tuple[str, int]],
                 rejected: list[tuple[str, int, str]]) -> None:
        self.upload.summary.settle_sizes([size for _, size in already], [size for _, size, _ in rejected])
        for uid, _, reason in rejected:
            self.upload.refused(uid, self._origins.get(uid), reason)
        for uid in uids:
            self._origins.pop(uid, None)


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

