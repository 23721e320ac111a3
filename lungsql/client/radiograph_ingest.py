"""`lungsql ingest --task chest_xray14 DIR`: upload chest radiographs into lungsql.radiographs.

Two layouts: the NIH ChestX-ray14 download (images/*.png, or images_001/images/... as unpacked,
with Data_Entry_2017.csv and the official train_val_list.txt / test_list.txt), or a folder of
DICOM CR/DX files. The labels file is loaded first, every row of it, also for images not uploaded
(yet); each file is then checked (lungsql.dicom.radiograph) and stored unchanged with its SHA-256,
a batch per transaction with the run's counters. A bad file is recorded in lungsql.ingest_errors and
skipped; an image already stored (by its image index: the PNG's name, or the SOPInstanceUID) is
counted and skipped, so a rerun duplicates nothing.
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Callable, Iterable

import sqlalchemy as sa

import config_preprocessing as config
from lungsql.client import dialects
from lungsql.client.ingest import IngestSummary, find_files, prefetch, stored_text
from lungsql.dicom.reader import Limits, PatientInfo
from lungsql.errors import ConfigurationError

#: ChestX-ray14's file names: the patient (8 digits) and the follow-up (3 digits).
_NIH_NAME = re.compile(r"^(\d{8})_(\d{3})\.png$", re.IGNORECASE)


def ingest(engine: sa.Engine, root: Path, batch_size: int | None = None,
           on_file: Callable[[Path], None] | None = None,
           on_error: Callable[[Path, str], None] | None = None) -> IngestSummary:
    """Upload the radiographs under `root` (either layout); returns the run's counts."""
    from lungsql.dicom import chestxray14

    if engine.dialect.name != "postgresql":
        raise ConfigurationError("radiographs are uploaded to PostgreSQL only, for now",
                                 hint="use a postgresql:// database URL")
    root = Path(root)
    started = time.perf_counter()
    try:
        layout = chestxray14.find_layout(root)
    except ConfigurationError:
        layout = None
    labels = {}
    summary = IngestSummary()
    if layout is not None:
        splits = chestxray14.read_split_lists(root)
        labels = {label.image_index: label for label in chestxray14.read_data_entry(layout.csv)}
        summary.labels = _load_labels(engine, labels.values(), splits, layout.csv.name)
        files = sorted(layout.images)
    else:
        files = find_files(root)
    store = dialects.scan_store(engine)
    batch_size = batch_size or config.get("LUNGSQL_INGEST_BATCH")
    limits = Limits.from_settings()
    try:
        stored = _stored_images(engine)
        summary.run_id = store.start_run(stored_text(str(root)), False)
        rows, patients, errors = [], {}, []

        def flush() -> None:
            _write(engine, summary.run_id, list(patients.values()), rows, errors, summary)
            rows.clear(), patients.clear(), errors.clear()

        for path, record, reason in prefetch(_read(files, limits), depth=2 * batch_size):
            summary.files_seen += 1
            if record is not None:
                patient, follow_up, reason = _patient(record, labels, path)
            if reason is not None:
                summary.errors += 1
                errors.append((stored_text(str(path)), stored_text(reason)))
                if on_error:
                    on_error(path, reason)
            elif record.image_index in stored:
                summary.skipped += 1
                if stored[record.image_index] != record.sha256 and on_error:
                    on_error(path, f"another file is stored as {record.image_index} (its bytes differ): kept that one")
            else:
                stored[record.image_index] = record.sha256
                patients.setdefault(patient.patient_id, patient)
                rows.append((record, patient.patient_id, follow_up, labels.get(record.image_index)))
                summary.stored += 1
                summary.bytes += len(record.data)
                summary.patients.add(patient.patient_id)
            if on_file:
                on_file(path)
            if len(rows) + len(errors) >= batch_size:
                flush()
        flush()
        summary.seconds = time.perf_counter() - started
        store.finish_run(summary.run_id, summary.seconds)
    finally:
        store.close()
    return summary


def _read(files: Iterable[Path], limits: Limits):
    """(path, RadiographRecord, None), or (path, None, why not), for each file."""
    from lungsql.dicom.radiograph import read_radiograph
    from lungsql.errors import LungSQLError

    for path in files:
        try:
            if not path.is_file():
                yield path, None, "not a regular file: not read"
                continue
            if path.stat().st_size > limits.file_bytes:
                yield path, None, (f"the file holds {path.stat().st_size / 1e6:.0f} MB, more than the largest "
                                   "image allowed (LUNGSQL_MAX_DECODED_BYTES)")
                continue
            data = path.read_bytes()
        except OSError as exc:
            yield path, None, f"cannot read file: {exc.strerror or exc}"
            continue
        try:
            yield path, read_radiograph(data, path.name, limits), None
        except LungSQLError as exc:
            yield path, None, exc.message
        except Exception as exc:  # a malformed file can make any library raise anything
            yield path, None, f"cannot read as a radiograph: {type(exc).__name__}: {str(exc)[:200]}"


def _patient(record, labels: dict, path: Path) -> tuple[PatientInfo | None, int | None, str | None]:
    """The image's patient and follow-up number, or why it has none."""
    label = labels.get(record.image_index)
    if record.format == "dicom":
        if not record.patient_id or not record.patient_id.strip():
            return None, None, "the DICOM file has no PatientID: its patient is unknown"
        return PatientInfo(record.patient_id.strip(), None, record.sex, None, record.age_years), None, None
    if label is not None:
        return PatientInfo(label.patient_id, None, label.sex, None, label.age_years), label.follow_up, None
    match = _NIH_NAME.match(path.name)
    if match is None:
        return None, None, ("no row of the labels file names this image, and its name is not ChestX-ray14's "
                            "<patient>_<follow-up>.png: its patient is unknown")
    return PatientInfo(str(int(match.group(1))), None, None, None, None), int(match.group(2)), None


def _stored_images(engine: sa.Engine) -> dict[str, bytes]:
    with engine.connect() as conn:
        return {r.image_index: bytes(r.sha256) for r in conn.execute(
            sa.text("SELECT image_index, sha256 FROM lungsql.radiographs"))}


def _load_labels(engine: sa.Engine, labels: Iterable, splits: dict[str, str], source: str) -> int:
    rows = [{"image_index": l.image_index, "patient_id": l.patient_id, "findings": list(l.findings),
             "split": splits.get(l.image_index), "follow_up": l.follow_up, "age_years": l.age_years,
             "sex": l.sex, "view_position": l.view_position, "source": source} for l in labels]
    if not rows:
        return 0
    with engine.begin() as conn:
        conn.execute(sa.text(
            """INSERT INTO lungsql.image_labels (image_index, patient_id, findings, split, follow_up, age_years, sex,
                                                 view_position, source)
               VALUES (:image_index, :patient_id, :findings, :split, :follow_up, :age_years, :sex, :view_position,
                       :source)
               ON CONFLICT (image_index) DO UPDATE SET patient_id = EXCLUDED.patient_id,
                   findings = EXCLUDED.findings, split = EXCLUDED.split, follow_up = EXCLUDED.follow_up,
                   age_years = EXCLUDED.age_years, sex = EXCLUDED.sex, view_position = EXCLUDED.view_position,
                   source = EXCLUDED.source, loaded_at = now()"""), rows)
    return len(rows)


def _write(engine: sa.Engine, run_id: int, patients: list[PatientInfo], rows: list, errors: list,
           summary: IngestSummary) -> None:
    """One transaction: the patients, the radiographs (COPY), the errors and the run's counters."""
    if not (patients or rows or errors):
        return
    raw = engine.raw_connection()
    try:
        conn = raw.driver_connection
        with conn.transaction(), conn.cursor() as cur:
            if patients:
                cur.executemany(
                    """INSERT INTO lungsql.patients (patient_id, name, sex, birth_date, age_years)
                       VALUES (%s, NULL, %s, NULL, %s) ON CONFLICT (patient_id) DO NOTHING""",
                    [(p.patient_id, p.sex if p.sex in ("M", "F", "O") else None,
                      p.age_years if p.age_years is not None and 0 <= p.age_years < 150 else None) for p in patients])
            if rows:
                columns = ("image_index", "patient_id", "format", "data", "sha256", "rows", "columns", "bits_stored",
                           "photometric", "modality", "view_position", "pixel_spacing_mm", "follow_up",
                           "study_instance_uid", "series_instance_uid", "transfer_syntax_uid", "run_id")
                with cur.copy(f"COPY lungsql.radiographs ({', '.join(columns)}) FROM STDIN") as copy:
                    for record, patient_id, follow_up, label in rows:
                        view = record.view_position or (label.view_position if label is not None else None)
                        copy.write_row((record.image_index, patient_id, record.format, record.data, record.sha256,
                                        record.rows, record.columns, record.bits_stored, record.photometric,
                                        record.modality, view, record.pixel_spacing_mm, follow_up,
                                        record.study_instance_uid, record.series_instance_uid,
                                        record.transfer_syntax_uid, run_id))
            if errors:
                cur.executemany(
                    """INSERT INTO lungsql.ingest_errors (source_path, reason, run_id) VALUES (%s, %s, %s)
                       ON CONFLICT (source_path, reason) DO UPDATE SET run_id = EXCLUDED.run_id, occurred_at = now()""",
                    [(path, reason, run_id) for path, reason in errors])
            cur.execute("UPDATE lungsql.ingest_runs SET files_seen = %s, stored = %s, skipped = %s, errors = %s, "
                        "bytes = %s WHERE run_id = %s",
                        (summary.files_seen, summary.stored, summary.skipped, summary.errors, summary.bytes, run_id))
    finally:
        raw.close()
