"""`lungsql ingest` against a real PostgreSQL: counts, round trip, resume, bad input, de-identification."""

from __future__ import annotations

import csv
import hashlib
import io
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pydicom
import pytest
import sqlalchemy as sa
from pydicom.data import get_testdata_file
from pydicom.uid import JPEG2000Lossless, JPEGLSLossless, RLELossless, generate_uid

from lungsql.client import ingest
from lungsql.dicom import synth
from lungsql.errors import ConfigurationError

PATIENTS = 4
SLICES = (6, 9)


@pytest.fixture(scope="session")
def cohort(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cohort")
    synth.write_cohort(out, patients=PATIENTS, slices=SLICES, seed=7)
    return out


def dicom_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*.dcm"))


def scalar(engine, sql: str, **params):
    with engine.connect() as conn:
        return conn.execute(sa.text(sql), params).scalar()


def test_cohort_lands_with_exact_counts_and_labels(engine, cohort):
    files = dicom_files(cohort)
    summary = ingest.ingest(engine, cohort)
    assert (summary.files_seen, summary.stored, summary.errors) == (len(files), len(files), 0)
    assert scalar(engine, "SELECT count(*) FROM lungsql.scans") == len(files)
    assert scalar(engine, "SELECT count(*) FROM lungsql.patients") == PATIENTS
    with open(cohort / "stage1_labels.csv") as handle:
        expected = {row["id"]: int(row["cancer"]) for row in csv.DictReader(handle)}
    with engine.connect() as conn:
        stored = dict(conn.execute(sa.text("SELECT patient_id, label FROM lungsql.patients")).all())
        run = conn.execute(sa.text("SELECT * FROM lungsql.ingest_runs")).one()
    assert stored == expected
    assert (run.stored, run.files_seen, run.errors) == (len(files), len(files), 0)
    assert run.finished_at is not None


def test_stored_file_is_byte_identical(engine, cohort):
    ingest.ingest(engine, cohort)
    path = dicom_files(cohort)[3]
    original = path.read_bytes()
    uid = pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID
    with engine.connect() as conn:
        row = conn.execute(
            sa.text("SELECT dicom, sha256 FROM lungsql.scans WHERE sop_instance_uid = :uid"), {"uid": uid}
        ).one()
    assert bytes(row.dicom) == original
    assert bytes(row.sha256) == hashlib.sha256(original).digest()


def test_slices_are_stored_out_of_line_uncompressed(engine, cohort):
    # 010_scan_storage.sql: no compression to pay on the way in and on every read.
    ingest.ingest(engine, cohort, jobs=2)
    with engine.connect() as conn:
        storage = conn.execute(sa.text("SELECT attstorage FROM pg_attribute WHERE attrelid = 'lungsql.scans'::regclass "
                                       "AND attname = 'dicom'")).scalar_one()
        compressed = conn.execute(sa.text("SELECT count(*) FROM lungsql.scans "
                                          "WHERE pg_column_compression(dicom) IS NOT NULL")).scalar_one()
    assert (storage, compressed) == ("e", 0)


def test_rerun_skips_everything_already_stored(engine, cohort):
    first = ingest.ingest(engine, cohort)
    second = ingest.ingest(engine, cohort)
    assert second.stored == 0 and second.skipped == first.stored
    assert scalar(engine, "SELECT count(*) FROM lungsql.scans") == first.stored


def test_run_killed_midway_resumes_without_loss_or_duplicates(engine, cohort, db_env):
    # A child process uploads in batches of 3 and is killed with SIGKILL inside
    # its fourth transaction, after COPY and before COMMIT.
    script = textwrap.dedent(
        """
        import os, signal, sys
        from pathlib import Path
        from lungsql.client import db, ingest
        from lungsql.client.dialects import postgres
        original, calls = postgres.ScanStore._copy_scans, []
        def copy_then_die(self, cur, scans):
            already = original(self, cur, scans)
            calls.append(1)
            if len(calls) == 4:
                os.kill(os.getpid(), signal.SIGKILL)
            return already
        postgres.ScanStore._copy_scans = copy_then_die
        ingest.ingest(db.connect(), Path(sys.argv[1]), batch_size=3)
        """
    )
    child = subprocess.run([sys.executable, "-c", script, str(cohort)], env=os.environ.copy(), timeout=120)
    assert child.returncode == -9
    assert scalar(engine, "SELECT count(*) FROM lungsql.scans") == 9  # three committed batches
    summary = ingest.ingest(engine, cohort)
    total = len(dicom_files(cohort))
    assert (summary.skipped, summary.stored) == (9, total - 9)
    assert scalar(engine, "SELECT count(*) FROM lungsql.scans") == total
    assert scalar(engine, "SELECT count(DISTINCT sop_instance_uid) FROM lungsql.scans") == total


# -- bad input -------------------------------------------------------------------
def _slice_dataset(cohort: Path) -> pydicom.Dataset:
    return pydicom.dcmread(dicom_files(cohort)[0])


def _save(ds: pydicom.Dataset, path: Path) -> None:
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)


def _bad_files(cohort: Path, folder: Path) -> dict[str, str]:
    """Write one file per kind of bad input; returns file name -> expected words of the reason."""
    expected = {}
    folder.mkdir(parents=True)
    (folder / "notes.dcm").write_text("this is a radiology report, not an image\n")
    expected["notes.dcm"] = "not a DICOM file"

    good = dicom_files(cohort)[0].read_bytes()
    (folder / "cut.dcm").write_bytes(good[: len(good) // 2])
    expected["cut.dcm"] = "truncated pixel data"

    ds = _slice_dataset(cohort)
    del ds.PixelData
    _save(ds, folder / "nopixels.dcm")
    expected["nopixels.dcm"] = "no pixel data"

    ds = _slice_dataset(cohort)
    ds.Modality = "MR"
    _save(ds, folder / "mr.dcm")
    expected["mr.dcm"] = "not CT: Modality is 'MR'"

    ds = _slice_dataset(cohort)
    del ds.ImagePositionPatient
    _save(ds, folder / "noposition.dcm")
    expected["noposition.dcm"] = "missing ImagePositionPatient"

    ds = _slice_dataset(cohort)
    small = ds.pixel_array[::2, ::2].copy()
    ds.Rows, ds.Columns = small.shape
    ds.PixelData = small.tobytes()
    _save(ds, folder / "smaller.dcm")
    expected["smaller.dcm"] = "256x256 slice in series"

    ds = _slice_dataset(cohort)
    ds.compress(JPEG2000Lossless, encoding_plugin="pylibjpeg")
    frame = bytearray(ds.PixelData)
    frame[len(frame) // 2 :] = b"\x00" * (len(frame) - len(frame) // 2)  # damage the codestream
    ds.PixelData = bytes(frame)
    _save(ds, folder / "damaged_j2k.dcm")
    expected["damaged_j2k.dcm"] = "cannot decode compressed pixel data"
    return expected


def test_each_bad_file_is_recorded_with_its_reason_and_the_good_ones_land(engine, cohort, tmp_path):
    mixed = tmp_path / "mixed"
    shutil.copytree(cohort, mixed)
    expected = _bad_files(cohort, mixed / "bad")
    rejected = []
    summary = ingest.ingest(engine, mixed, on_error=lambda path, reason: rejected.append(path.name))
    good = len(dicom_files(cohort))
    assert summary.stored == good
    assert summary.errors == len(expected)
    assert sorted(rejected) == sorted(expected)
    with engine.connect() as conn:
        reasons = {Path(p).name: r for p, r in conn.execute(
            sa.text("SELECT source_path, reason FROM lungsql.ingest_errors"))}
    assert set(reasons) == set(expected)
    for name, words in expected.items():
        assert words in reasons[name], (name, reasons[name])
        assert "\n" not in reasons[name]
    # A rerun records the same failures again without adding rows.
    ingest.ingest(engine, mixed)
    assert scalar(engine, "SELECT count(*) FROM lungsql.ingest_errors") == len(expected)


@pytest.mark.parametrize("syntax,plugin", [(RLELossless, None), (JPEG2000Lossless, "pylibjpeg"),
                                           (JPEGLSLossless, "pyjpegls")])
def test_compressed_slices_are_decoded_and_stored(engine, cohort, tmp_path, syntax, plugin):
    ds = _slice_dataset(cohort)
    pixels = ds.pixel_array.copy()
    ds.compress(syntax, **({"encoding_plugin": plugin} if plugin else {}))
    _save(ds, tmp_path / "p" / "compressed.dcm")
    summary = ingest.ingest(engine, tmp_path / "p")
    assert (summary.stored, summary.errors) == (1, 0)
    with engine.connect() as conn:
        row = conn.execute(sa.text("SELECT transfer_syntax_uid, dicom FROM lungsql.scans")).one()
    assert row.transfer_syntax_uid == syntax
    np.testing.assert_array_equal(pydicom.dcmread(io.BytesIO(row.dicom)).pixel_array, pixels)


def test_pydicom_ct_small_ingests(engine, tmp_path):
    shutil.copy(get_testdata_file("CT_small.dcm"), tmp_path / "CT_small.dcm")
    summary = ingest.ingest(engine, tmp_path)
    assert (summary.stored, summary.errors) == (1, 0)
    with engine.connect() as conn:
        scan = conn.execute(sa.text("SELECT * FROM lungsql.scans")).one()
    assert (scan.rows, scan.columns, scan.modality) == (128, 128, "CT")
    assert scan.patient_id == "1CT1"


def test_bad_labels_file_is_refused_before_anything_is_stored(engine, cohort, tmp_path):
    labels = tmp_path / "labels.csv"
    labels.write_text("id,cancer\nabc,1\ndef,maybe\n")
    with pytest.raises(ConfigurationError, match="line 3"):
        ingest.ingest(engine, cohort, labels_csv=labels)
    assert scalar(engine, "SELECT count(*) FROM lungsql.scans") == 0


# -- de-identification ---------------------------------------------------------
def test_deidentified_upload_keeps_no_patient_name(engine, cohort, monkeypatch):
    monkeypatch.setenv("LUNGSQL_DEID_KEY", "test-site-secret")
    names = set()
    for path in dicom_files(cohort):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        names.add(str(ds.PatientName))
    summary = ingest.ingest(engine, cohort, deidentify=True)
    assert summary.stored == len(dicom_files(cohort))
    with engine.connect() as conn:
        patients = conn.execute(sa.text("SELECT patient_id, name, birth_date, label, age_years "
                                        "FROM lungsql.patients")).all()
        blobs = [bytes(b) for b in conn.execute(sa.text("SELECT dicom FROM lungsql.scans")).scalars()]
    assert len(patients) == PATIENTS
    assert all(p.patient_id.startswith("anon-") and p.name is None and p.birth_date is None for p in patients)
    assert all(p.label is not None and p.age_years for p in patients), "labels and age follow the pseudonyms"
    headers = [blob[: blob.rfind(b"\xe0\x7f\x10\x00")] for blob in blobs]  # all but the pixel data
    for name in names:
        for form in (name, name.replace("^", " ")):
            assert not any(form.encode() in blob for blob in blobs), form
        for part in name.split("^"):
            assert not any(part.encode() in header for header in headers), part
    # Stable pseudonyms: a rerun with the same key stores nothing new.
    assert ingest.ingest(engine, cohort, deidentify=True).stored == 0



# -- several upload streams ------------------------------------------------------------------------
def _contents(engine) -> dict:
    """What an upload leaves in the database, in an order that does not depend on how it was written."""
    with engine.connect() as conn:
        return {
            "scans": conn.execute(sa.text(
                "SELECT sop_instance_uid, patient_id, study_instance_uid, series_instance_uid, instance_number, "
                "z_position, rows, columns, pixel_spacing_row, pixel_spacing_col, slice_thickness, rescale_slope, "
                "rescale_intercept, modality, transfer_syntax_uid, sha256, sha256(dicom) AS content, image_type, "
                "series_description, convolution_kernel, tilt_degrees, frames, frame_z "
                "FROM lungsql.scans ORDER BY sop_instance_uid")).all(),
            "patients": conn.execute(sa.text("SELECT patient_id, name, sex, birth_date, age_years, label "
                                             "FROM lungsql.patients ORDER BY patient_id")).all(),
            "errors": conn.execute(sa.text("SELECT source_path, reason FROM lungsql.ingest_errors "
                                           "ORDER BY source_path, reason")).all(),
            "runs": conn.execute(sa.text("SELECT files_seen, stored, skipped, errors, bytes FROM lungsql.ingest_runs "
                                         "ORDER BY run_id")).all(),
        }


def _empty(engine) -> None:
    with engine.begin() as conn:
        conn.execute(sa.text("TRUNCATE lungsql.scans, lungsql.patients, lungsql.ingest_errors, "
                             "lungsql.ingest_runs CASCADE"))


def _counts(summary: ingest.IngestSummary) -> tuple:
    return summary.files_seen, summary.stored, summary.skipped, summary.errors, summary.bytes


def test_streams_store_what_one_stream_stores(engine, cohort, tmp_path):
    mixed = tmp_path / "mixed"
    shutil.copytree(cohort, mixed)
    expected = _bad_files(cohort, mixed / "bad")
    (mixed / "copies").mkdir()
    for path in dicom_files(cohort)[::7]:  # the same instances again, byte for byte: skipped
        shutil.copy(path, mixed / "copies" / path.name)
    one = ingest.ingest(engine, mixed, jobs=1)
    stored = _contents(engine)
    _empty(engine)
    rejected = []
    several = ingest.ingest(engine, mixed, jobs=3, batch_size=5,
                            on_error=lambda path, reason: rejected.append(path.name))
    assert several.streams == 3 and "in 3 streams" in several.describe()
    assert _counts(several) == _counts(one)
    assert (several.stored, several.errors) == (len(dicom_files(cohort)), len(expected))
    assert several.skipped == len(dicom_files(mixed / "copies"))
    assert sorted(rejected) == sorted(expected)
    assert _contents(engine) == stored
    assert stored["runs"] == [_counts(one)]  # the run's row counts what the upload did
    assert {Path(p).name for p, _ in stored["errors"]} == set(expected)


def test_streams_rerun_stores_nothing_twice_and_counts_every_file(engine, cohort):
    total = len(dicom_files(cohort))
    first = ingest.ingest(engine, cohort, jobs=2, batch_size=4)
    again = ingest.ingest(engine, cohort, jobs=2, batch_size=4)
    assert (first.stored, again.stored, again.skipped) == (total, 0, total)
    assert scalar(engine, "SELECT count(*) FROM lungsql.scans") == total
    with engine.connect() as conn:
        runs = conn.execute(sa.text("SELECT files_seen, stored, skipped, errors, bytes, finished_at IS NOT NULL "
                                    "FROM lungsql.ingest_runs ORDER BY run_id")).all()
    assert [tuple(r) for r in runs] == [(*_counts(first), True), (*_counts(again), True)]


def test_two_uploads_with_streams_at_once_store_each_instance_once(engine, cohort):
    import threading

    total, summaries, failures = len(dicom_files(cohort)), [], []

    def upload() -> None:
        try:
            summaries.append(ingest.ingest(engine, cohort, jobs=2, batch_size=2))
        except Exception as exc:  # handed to the test
            failures.append(exc)

    threads = [threading.Thread(target=upload) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(180)
    assert not failures
    assert sum(s.stored for s in summaries) == total
    assert all(s.stored + s.skipped == total and s.errors == 0 for s in summaries)
    assert scalar(engine, "SELECT count(DISTINCT sop_instance_uid) FROM lungsql.scans") == total
    assert scalar(engine, "SELECT count(*) FROM lungsql.scans") == total
    with engine.connect() as conn:
        runs = conn.execute(sa.text("SELECT files_seen, stored, skipped, errors, bytes FROM lungsql.ingest_runs")).all()
    assert sorted(tuple(r) for r in runs) == sorted(_counts(s) for s in summaries)


def test_streams_reject_a_second_content_under_one_uid(engine, cohort, tmp_path):
    folder = tmp_path / "twins"
    shutil.copytree(cohort, folder / "first")
    originals = {}
    for path in dicom_files(cohort)[:6]:
        ds = pydicom.dcmread(path)
        originals[ds.SOPInstanceUID] = hashlib.sha256(path.read_bytes()).digest()
        pixels = ds.pixel_array.copy()
        pixels[0, :8] += 1
        ds.PixelData = pixels.tobytes()
        (folder / "second").mkdir(exist_ok=True)
        ds.save_as(folder / "second" / path.name, enforce_file_format=True)
    summary = ingest.ingest(engine, folder, jobs=3, batch_size=3)
    assert (summary.stored, summary.errors) == (len(dicom_files(cohort)), len(originals))
    with engine.connect() as conn:
        reasons = conn.execute(sa.text("SELECT reason FROM lungsql.ingest_errors")).scalars().all()
        kept = dict(conn.execute(sa.text("SELECT sop_instance_uid, sha256 FROM lungsql.scans "
                                         "WHERE sop_instance_uid = ANY(:uids)"), {"uids": list(originals)}).all())
    assert all("is already stored with different content" in reason for reason in reasons)
    assert set(kept) == set(originals)  # one of the two contents of each, whichever a stream read first


def test_run_with_streams_killed_midway_resumes_without_loss_or_duplicates(engine, cohort, db_env):
    # A stream, in its third transaction, after COPY and before COMMIT, kills the upload and all its
    # streams (SIGKILL to the process group, as a machine's OOM killer or a lost terminal would).
    script = textwrap.dedent(
        """
        import os, signal, sys
        from pathlib import Path
        from lungsql.client import db, ingest
        from lungsql.client.dialects import postgres
        original, calls = postgres.ScanStore._copy_scans, []
        def copy_then_die(self, cur, scans):
            already = original(self, cur, scans)
            calls.append(1)
            if len(calls) == 3:
                os.killpg(0, signal.SIGKILL)
            return already
        postgres.ScanStore._copy_scans = copy_then_die
        ingest.ingest(db.connect(), Path(sys.argv[1]), batch_size=3, jobs=2)
        """
    )
    child = subprocess.run([sys.executable, "-c", script, str(cohort)], env=os.environ.copy(), timeout=120,
                           start_new_session=True)
    assert child.returncode == -9
    total = len(dicom_files(cohort))
    with engine.connect() as conn:
        committed = conn.execute(sa.text("SELECT count(*) FROM lungsql.scans")).scalar()
        run = conn.execute(sa.text("SELECT stored, files_seen, finished_at FROM lungsql.ingest_runs")).one()
    assert 0 < committed < total
    assert (run.stored, run.files_seen, run.finished_at) == (committed, committed, None)  # what was committed
    summary = ingest.ingest(engine, cohort, jobs=2)
    assert (summary.skipped, summary.stored) == (committed, total - committed)
    assert scalar(engine, "SELECT count(*) FROM lungsql.scans") == total
    assert scalar(engine, "SELECT count(DISTINCT sop_instance_uid) FROM lungsql.scans") == total


def test_ingest_command_takes_jobs(db_env, cohort):
    from click.testing import CliRunner

    from lungsql.client.cli import main

    runner = CliRunner()
    assert runner.invoke(main, ["init"]).exit_code == 0
    result = runner.invoke(main, ["ingest", "--jobs", "2", str(cohort)])
    assert result.exit_code == 0, result.output
    total = len(dicom_files(cohort))
    assert f"{total} stored" in result.output and "in 2 streams" in result.output
    result = runner.invoke(main, ["ingest", "--jobs", "0", str(cohort)])
    assert result.exit_code == 2 and "--jobs" in result.output


def test_streams_default_to_the_usable_cores(engine, cohort):
    assert ingest.usable_cores() == len(os.sched_getaffinity(0))
    summary = ingest.ingest(engine, cohort, jobs=None)
    assert summary.streams == min(ingest.usable_cores(), -(-len(dicom_files(cohort)) // ingest.CHUNK))
    with pytest.raises(ConfigurationError, match="at least one stream"):
        ingest.ingest(engine, cohort, jobs=0)


def test_streams_deidentify_as_one_stream_does(engine, cohort, monkeypatch):
    monkeypatch.setenv("LUNGSQL_DEID_KEY", "test-site-secret")
    one = ingest.ingest(engine, cohort, deidentify=True, jobs=1)
    stored = _contents(engine)
    _empty(engine)
    several = ingest.ingest(engine, cohort, deidentify=True, jobs=3, batch_size=4)
    assert _counts(several) == _counts(one) and several.stored == len(dicom_files(cohort))
    assert _contents(engine) == stored  # the same pseudonyms, UIDs and bytes, whichever process wrote them
    assert ingest.ingest(engine, cohort, deidentify=True, jobs=2).stored == 0
