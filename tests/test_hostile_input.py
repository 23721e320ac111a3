"""Hostile and broken input against the real database: nothing in one file stops an upload, nothing in
one patient stops a featurization run, nothing takes the server down, and races count true.

Every bad file here is written by the test itself; bombs are sized to these machines: a decoded size
above the limit is enough to prove the check.
"""

from __future__ import annotations

import copy
import io
import os
import threading
from pathlib import Path

import psycopg
import pydicom
import pytest
import sqlalchemy as sa
from pydicom.uid import DeflatedExplicitVRLittleEndian, generate_uid

from databases import call
from lungsql import dicom
from lungsql.client import cnns, ingest
from lungsql.dicom import synth
from lungsql.client.dialects import postgres
from lungsql.errors import InvalidScan

pytest.importorskip("torch", reason="the built-in CNN is exported with the export extra (make bootstrap)")

PATIENTS = 6


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("good-cohort")
    synth.write_cohort(out, patients=PATIENTS, slices=(4, 6), seed=23)
    return out


def _template(cohort: Path) -> pydicom.Dataset:
    return pydicom.dcmread(sorted(cohort.rglob("*.dcm"))[0])


def _file(ds: pydicom.Dataset, patient_id: str | None = None) -> bytes:
    """`ds` as a new instance (new UIDs), of another patient when `patient_id` is given."""
    ds = copy.deepcopy(ds)
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    if patient_id:
        ds.PatientID = patient_id
        ds.SeriesInstanceUID = generate_uid()
        ds.StudyInstanceUID = generate_uid()
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _deflated(ds: pydicom.Dataset, rows: int, columns: int, pixels: bytes) -> bytes:
    ds = copy.deepcopy(ds)
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    ds.Rows, ds.Columns = rows, columns
    ds.PixelData = pixels
    return _file(ds)


def frames_x(ds: pydicom.Dataset) -> bytes:
    """`ds` with NumberOfFrames 'x', written byte by byte: pydicom refuses to write such a value."""
    bad = copy.deepcopy(ds)
    bad.NumberOfFrames = 9
    element = b"\x28\x00\x08\x00IS\x02\x009 "
    data = _file(bad)
    assert data.count(element) == 1
    return data.replace(element, element[:-2] + b"x ")


def hostile_folder(cohort: Path, folder: Path) -> dict[str, str]:
    """One file per kind of hostile or broken input; name -> words its recorded reason holds."""
    ds = _template(cohort)
    folder.mkdir(parents=True)
    expected = {}

    def write(name: str, data: bytes, reason: str) -> None:
        (folder / name).write_bytes(data)
        expected[name] = reason

    # Claims 32768 x 32768 pixels: 2 GiB decoded, from a file of a few kB.
    write("bomb-header.dcm", _deflated(ds, 32768, 32768, b"\0" * 1024), "above the limit")
    write("frames-x.dcm", frames_x(ds), "NumberOfFrames")
    bad = copy.deepcopy(ds)
    bad.NumberOfFrames = "-1"
    write("frames-minus-one.dcm", _file(bad), "NumberOfFrames")
    bad = copy.deepcopy(ds)
    bad.RescaleSlope = "0"
    write("slope-zero.dcm", _file(bad), "RescaleSlope")
    bad = copy.deepcopy(ds)
    bad.Rows = 0
    write("rows-zero.dcm", _file(bad), "Rows")
    bad = copy.deepcopy(ds)
    bad.BitsAllocated = 200
    write("bits-200.dcm", _file(bad), "BitsAllocated")
    data = _file(ds)
    write("cut.dcm", data[: len(data) * 2 // 3], "truncated")
    write("random.dcm", bytes(range(256)) * 40, "not a DICOM file")
    write("empty.dcm", b"", "not a DICOM file")
    os.mkfifo(folder / "pipe.dcm")  # nobody writes to it: reading it would wait forever
    expected["pipe.dcm"] = "not a regular file"
    (folder / "zeros.dcm").symlink_to("/dev/zero")  # reading it would never end
    expected["zeros.dcm"] = "not a regular file"
    # A name that is not UTF-8 (bytes from another system's encoding): recorded with them escaped.
    (folder / os.fsdecode(b"caf\xe9.dcm")).write_bytes(b"not an image")
    expected[os.fsdecode(b"caf\xe9.dcm")] = "not a DICOM file"
    return expected


def run_in_threads(target, n: int, timeout_s: float) -> list[BaseException]:
    """Run `target` in `n` threads at once; the exceptions they raised."""
    errors: list[BaseException] = []

    def run() -> None:
        try:
            target()
        except Exception as exc:  # handed to the test
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(n)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout_s)
    return errors


def server_log_tail(cluster, since: int) -> str:
    with open(cluster.log_file, "rb") as handle:
        handle.seek(since)
        return handle.read().decode(errors="replace")


def log_size(cluster) -> int:
    return cluster.log_file.stat().st_size


def _dead_server_lines(text: str) -> list[str]:
    words = ("terminated by signal", "was terminated", "server process", "out of memory", "PANIC")
    return [line for line in text.splitlines() if any(w in line for w in words)]


# -- the header is checked before anything is decoded ---------------------------------------
def test_sizes_are_checked_from_the_header_before_decoding(cohort):
    ds = _template(cohort)
    with pytest.raises(InvalidScan, match=r"Rows is 32768, above the limit of 8192 \(LUNGSQL_MAX_ROWS\)"):
        dicom.read_scan(_deflated(ds, 32768, 32768, b"\0" * 1024))
    frames = copy.deepcopy(ds)
    frames.NumberOfFrames = 16
    with pytest.raises(InvalidScan, match=r"8192 x 8192 pixels x 16 frame.* decode to 2147 MB, above the limit "
                                          r"of 1074 MB \(LUNGSQL_MAX_DECODED_BYTES\)"):
        dicom.read_scan(_deflated(frames, 8192, 8192, b"\0" * 1024))
    small = dicom.Limits(rows=256, columns=8192, frames=1, decoded_bytes=1 << 30)
    with pytest.raises(InvalidScan, match=r"Rows is 512, above the limit of 256 \(LUNGSQL_MAX_ROWS\)"):
        dicom.read_scan(_file(ds), limits=small)
    with pytest.raises(InvalidScan, match="LUNGSQL_MAX_ROWS"):
        dicom.decode_stored(_file(ds), small)


def test_a_deflate_bomb_is_inflated_only_up_to_the_limit(cohort, monkeypatch):
    # 4096 x 4096 16-bit zeros: 32 MiB inflated from a file of about 33 kB, against a limit of 4 MiB.
    bomb = _deflated(_template(cohort), 4096, 4096, b"\0" * (4096 * 4096 * 2))
    assert len(bomb) < 100_000
    monkeypatch.setenv("LUNGSQL_MAX_DECODED_BYTES", str(4 << 20))
    with pytest.raises(InvalidScan, match="inflates to more than"):
        dicom.parse(bomb)
    monkeypatch.delenv("LUNGSQL_MAX_DECODED_BYTES")
    record = dicom.read_scan(bomb)  # the default limits admit a 4096 x 4096 image: it is one
    assert (record.rows, record.columns) == (4096, 4096)


def test_a_stored_slice_decodes_with_the_featurizers_decoder(cohort):
    ds = _template(cohort)
    record = dicom.read_scan(_file(ds))
    decoded = dicom.decode_stored(record.data)
    assert decoded.stored.shape == (record.rows, record.columns)
    assert (decoded.slope, decoded.intercept) == (record.rescale_slope, record.rescale_intercept)


# -- ingest: every bad file recorded, every good one stored ---------------------------------------
def test_a_hostile_folder_beside_a_good_cohort(engine, cohort, cluster, tmp_path):
    started_log = log_size(cluster)
    root = tmp_path / "import"
    good = root / "good"
    import shutil

    shutil.copytree(cohort, good)
    expected = hostile_folder(cohort, root / "hostile")
    # One patient whose only slice was stored by an older lungsql and no longer decodes.
    undecodable = (b"\0" * 128) + b"DICM" + b"garbage" * 64
    good_files = sorted(good.rglob("*.dcm"))

    summary = ingest.ingest(engine, root)
    assert summary.stored == len(good_files)
    assert summary.errors == len(expected)
    with engine.connect() as conn:
        errors = dict(conn.execute(sa.text("SELECT source_path, reason FROM lungsql.ingest_errors")).all())
        assert conn.execute(sa.text("SELECT count(*) FROM lungsql.scans")).scalar() == len(good_files)
    for name, words in expected.items():
        path = ingest.RecordedPaths(root)(root / "hostile" / name)  # as stored: undecodable bytes escaped
        assert path in errors, name
        assert words in errors[path], (name, errors[path])
        assert "\n" not in errors[path]
    # A rerun stores nothing twice and records the same reasons again.
    again = ingest.ingest(engine, root)
    assert (again.stored, again.skipped, again.errors) == (0, len(good_files), len(expected))

    with engine.begin() as conn:
        conn.execute(sa.text("INSERT INTO lungsql.patients (patient_id, name) VALUES ('old-0001', 'Old Upload')"))
        for z in range(3):  # a series of three slices (the fewest featurized) that an old upload stored
            conn.execute(sa.text(
                "INSERT INTO lungsql.scans (sop_instance_uid, patient_id, study_instance_uid, series_instance_uid, "
                "z_position, rows, columns, modality, transfer_syntax_uid, dicom, sha256) VALUES "
                "(:uid, 'old-0001', '1.2.3', '1.2.3.1', :z, 512, 512, 'CT', '1.2.840.10008.1.2.1', :d, "
                "sha256(:d))"), {"d": undecodable, "uid": f"1.2.3.4.{z}", "z": z})
    cnns.import_builtin(engine)
    notices: list[str] = []
    call(engine, "CALL lungsql.generate_features()", notices=notices)
    with engine.connect() as conn:
        featurized = conn.execute(sa.text("SELECT count(*) FROM lungsql.features")).scalar()
        failures = conn.execute(sa.text("SELECT patient_id, reason FROM lungsql.feature_failures")).all()
        run = conn.execute(sa.text("SELECT * FROM lungsql.feature_runs")).one()
    assert featurized == PATIENTS
    assert [f.patient_id for f in failures] == ["old-0001"]
    assert "cannot be decoded" in failures[0].reason
    assert (run.patients, run.failed, run.status) == (PATIENTS, 1, "finished")
    assert "skipped 1 patient(s) that could not be featurized: old-0001 (" in notices[-1]
    assert not _dead_server_lines(server_log_tail(cluster, started_log))


def test_nothing_in_one_file_stops_the_upload(engine, cohort, tmp_path):
    # A NumberOfFrames of 'x' used to raise outside the per-file handling; good files after it are stored.
    ds = _template(cohort)
    folder = tmp_path / "mixed"
    folder.mkdir()
    (folder / "a-bad.dcm").write_bytes(frames_x(ds))
    (folder / "b-good.dcm").write_bytes(_file(ds))
    for attempt in range(2):
        summary = ingest.ingest(engine, folder)
        assert (summary.errors, summary.stored + summary.skipped) == (1, 1), attempt


def test_a_value_the_database_refuses_is_recorded_and_the_batch_goes_on(engine, cohort):
    good = dicom.read_scan(_file(_template(cohort)))
    refused = dicom.read_scan(_file(_template(cohort), patient_id="refused-0001"))
    patient = copy.copy(refused.patient)
    object.__setattr__(patient, "age_years", 400.0)  # outside lungsql.patients' CHECK
    object.__setattr__(refused, "patient", patient)
    store = postgres.ScanStore(engine)
    try:
        run_id = store.start_run("/import", False)
        written = store.write_batch(run_id, [good.patient, patient], [good, refused], [],
                                    {"files_seen": 2, "stored": 2, "skipped": 0, "errors": 0, "bytes": 0},
                                    path_of=lambda r: f"/import/{r.patient.patient_id}.dcm")
    finally:
        store.close()
    assert [r.sop_instance_uid for r, _ in written.rejected] == [refused.sop_instance_uid]
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT sop_instance_uid FROM lungsql.scans")).scalars().all() == \
            [good.sop_instance_uid]
        reason = conn.execute(sa.text("SELECT reason FROM lungsql.ingest_errors WHERE source_path = "
                                      "'/import/refused-0001.dcm'")).scalar_one()
    assert "the database refused the slice" in reason and "check constraint" in reason


def test_concurrent_uploads_of_one_folder_each_count_what_they_stored(empty_db, cohort):
    engine = sa.create_engine(empty_db)
    from lungsql.client import migrations

    migrations.init(engine)
    total = len(list(cohort.rglob("*.dcm")))
    summaries = []
    failures = run_in_threads(lambda: summaries.append(ingest.ingest(engine, cohort, batch_size=2)), 2, 120)
    engine.dispose()
    assert not failures
    assert sum(s.stored for s in summaries) == total
    assert all(s.stored + s.skipped == total for s in summaries)
    with sa.create_engine(empty_db).connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM lungsql.scans")).scalar() == total
        runs = conn.execute(sa.text("SELECT stored, skipped FROM lungsql.ingest_runs")).all()
    assert sorted(r.stored for r in runs) == sorted(s.stored for s in summaries)


# -- featurization: a bad patient is recorded and skipped ------------------------------------------
@pytest.fixture
def featurizable(engine, cohort):
    ingest.ingest(engine, cohort)
    cnns.import_builtin(engine)
    with engine.begin() as conn:
        # A slice stored before lungsql decoded every slice at upload: its pixels are cut short.
        victim = conn.execute(sa.text("SELECT min(patient_id) FROM lungsql.patients")).scalar_one()
        scan_id, data = conn.execute(sa.text("SELECT scan_id, dicom FROM lungsql.scans WHERE patient_id = :p "
                                             "ORDER BY scan_id LIMIT 1"), {"p": victim}).one()
        cut = bytes(data)[:-5000]
        conn.execute(sa.text("UPDATE lungsql.scans SET dicom = :d, sha256 = sha256(:d) WHERE scan_id = :s"),
                     {"d": cut, "s": scan_id})
    return engine, victim


def test_a_failed_patient_is_retried_only_when_asked(featurizable):
    engine, victim = featurizable
    call(engine, "CALL lungsql.generate_features()")
    notices: list[str] = []
    call(engine, "CALL lungsql.generate_features()", notices=notices)
    assert "featurizing 0 patients" in notices[0]
    assert "1 patient(s) that failed in an earlier run were left out" in notices[-1]
    notices.clear()
    call(engine, "CALL lungsql.generate_features(retry_failed => true)", notices=notices)
    assert "featurizing 1 patients" in notices[0] and f"skipped patient {victim}: " in " ".join(notices)
    with engine.begin() as conn:  # the scan is fixed: the retry featurizes the patient, and the failure goes
        good = conn.execute(sa.text("SELECT dicom FROM lungsql.scans WHERE patient_id <> :p LIMIT 1"),
                            {"p": victim}).scalar_one()
        conn.execute(sa.text("DELETE FROM lungsql.scans WHERE patient_id = :p AND length(dicom) < :n"),
                     {"p": victim, "n": len(bytes(good))})
    call(engine, "CALL lungsql.generate_features(retry_failed => true)")
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM lungsql.feature_failures")).scalar() == 0
        assert conn.execute(sa.text("SELECT count(*) FROM lungsql.features")).scalar() == PATIENTS


def test_a_killed_run_is_marked_by_the_next_one(featurizable, empty_db):
    engine, _ = featurizable
    pg = psycopg.connect(engine.url.render_as_string(hide_password=False).replace("+psycopg", ""),
                         autocommit=True)
    pid = pg.info.backend_pid
    killed = threading.Event()

    def on_notice(diag) -> None:
        if "/" in (diag.message_primary or "") and not killed.is_set():
            killed.set()
            with psycopg.connect(engine.url.render_as_string(hide_password=False).replace("+psycopg", ""),
                                 autocommit=True) as other:
                other.execute("SELECT pg_terminate_backend(%s)", (pid,))

    pg.add_notice_handler(on_notice)
    with pytest.raises(psycopg.OperationalError):
        pg.execute("CALL lungsql.generate_features()")
    pg.close()
    notices: list[str] = []
    call(engine, "CALL lungsql.generate_features()", notices=notices)
    with engine.connect() as conn:
        runs = conn.execute(sa.text("SELECT run_id, status FROM lungsql.feature_runs ORDER BY run_id")).all()
        assert conn.execute(sa.text("SELECT count(*) FROM lungsql.features")).scalar() == PATIENTS - 1
    assert [r.status for r in runs] == ["killed", "finished"]
    assert f"featurization run {runs[0].run_id} ended before it finished" in notices[0]


# -- the registry: concurrent trainings of one name ---------------------------------------------------
def test_concurrent_trainings_of_one_name_get_consecutive_versions(engine, tmp_path):
    synth.write_cohort(tmp_path, patients=10, slices=(3, 4), seed=31)
    ingest.ingest(engine, tmp_path)
    cnns.import_builtin(engine)
    call(engine, "CALL lungsql.generate_features()")
    with engine.begin() as conn:  # five of each, whatever the cohort drew
        conn.execute(sa.text("UPDATE lungsql.patients p SET label = (n.rank <= 5)::int FROM "
                             "(SELECT patient_id, row_number() OVER (ORDER BY patient_id) AS rank "
                             " FROM lungsql.patients) n WHERE n.patient_id = p.patient_id"))
    errors = run_in_threads(
        lambda: call(engine, "SELECT * FROM lungsql.train_model('race', '{\"min_data_in_leaf\": 1}')"), 3, 300)
    with engine.connect() as conn:
        versions = conn.execute(sa.text("SELECT version FROM lungsql.models WHERE name = 'race' ORDER BY version")
                                ).scalars().all()
        firsts = conn.execute(sa.text("SELECT count(*) FROM lungsql.deployments WHERE name = 'race' "
                                      "AND strategy = 'first model'")).scalar()
    assert not errors
    assert versions == [1, 2, 3]
    assert firsts == 1


def test_an_error_without_a_hint_prints_no_hint_line(engine):
    with pytest.raises(psycopg.Error) as error:
        call(engine, "SELECT lungsql.deploy('nothing-here', 'no such strategy')")
    assert "lungsql: there is no model named" in error.value.diag.message_primary
    assert error.value.diag.message_hint is not None  # this one has a hint...
    with engine.begin() as conn:
        conn.execute(sa.text("INSERT INTO lungsql.cnn_models (name, model, sha256, input_name, input_size, "
                             "output_name, feature_dim, preprocessing, source) VALUES ('x', 'x', repeat('0', 64), "
                             "'i', 1, 'o', 1, '{}', '{}')"))
        cnn_id = conn.execute(sa.text("SELECT cnn_id FROM lungsql.cnn_models")).scalar_one()
        conn.execute(sa.text("INSERT INTO lungsql.models (name, version, cnn_id, feature_set, feature_names, params, "
                             "model_text, sha256, metrics) VALUES ('m', 1, :c, 'f', '[]', '{}', 't', repeat('0', 64), "
                             "'{\"log_loss\": 1}')"), {"c": cnn_id})
    with pytest.raises(psycopg.Error) as error:  # ...rollback without history has none: no 'HINT:  None'
        call(engine, "SELECT lungsql.deploy('m', 'rollback')")
    assert "no earlier deployment" in error.value.diag.message_primary
    assert error.value.diag.message_hint is None


# -- de-identified uploads keep no original path ------------------------------------------------------
def test_deidentified_runs_keep_no_original_path_component(engine, cohort, tmp_path, monkeypatch):
    monkeypatch.setenv("LUNGSQL_DEID_KEY", "test-key-" + "x" * 32)
    root = tmp_path / "Smith_John_12345"
    import shutil

    shutil.copytree(cohort, root / "MRN-998877")
    (root / "MRN-998877" / "Jones_Mary_notes.dcm").write_text("not an image")
    summary = ingest.ingest(engine, root, deidentify=True)
    assert summary.errors == 1 and summary.stored > 0
    with engine.connect() as conn:
        recorded = [conn.execute(sa.text("SELECT source_dir FROM lungsql.ingest_runs")).scalar_one(),
                    *conn.execute(sa.text("SELECT source_path FROM lungsql.ingest_errors")).scalars(),
                    *conn.execute(sa.text("SELECT source FROM lungsql.labels")).scalars()]
    text = " ".join(recorded)
    for original in ("Smith", "John", "12345", "MRN", "998877", "Jones", "Mary", str(tmp_path)):
        assert original not in text, (original, recorded)
    deidentifier = ingest.site_deidentifier()
    error_path = recorded[1]
    assert error_path.startswith(deidentifier.pseudonym("MRN-998877") + "/") and error_path.endswith(".dcm")


# -- a compressed frame that claims more pixels than its header -------------------------------------
@pytest.mark.parametrize("name", ["JPEG2000.dcm", "JPEG-lossy.dcm"])
def test_a_compressed_frame_larger_than_its_header_is_refused_before_decoding(name):
    import struct

    from pydicom.data import get_testdata_file
    from pydicom.encaps import encapsulate, generate_frames

    from lungsql.dicom.codestream import frame_size

    ds = pydicom.dcmread(get_testdata_file(name))
    frame = bytearray(next(generate_frames(ds.PixelData, number_of_frames=1)))
    assert frame_size(bytes(frame)) == (ds.Rows, ds.Columns)
    if frame.startswith(b"\xff\x4f"):  # JPEG 2000: Xsiz and Ysiz of the SIZ segment
        struct.pack_into(">II", frame, 8, 60000, 60000)
    else:  # JPEG: the height and width of the start-of-frame segment
        sof = next(i for i in range(2, len(frame) - 1) if frame[i] == 0xFF and frame[i + 1] in (0xC0, 0xC1))
        struct.pack_into(">HH", frame, sof + 5, 60000, 60000)
    ds.PixelData = encapsulate([bytes(frame)])
    with pytest.raises(InvalidScan, match=r"compressed frame 1 claims 60000 x 60000 pixels, the header "
                                          rf"{ds.Rows} x {ds.Columns}: refused before decoding"):
        dicom.check_pixels(ds)


def test_burned_in_slices_are_recorded_unless_the_operator_opts_in(engine, cohort, tmp_path, monkeypatch):
    monkeypatch.setenv("LUNGSQL_DEID_KEY", "test-key-" + "y" * 32)
    ds = _template(cohort)
    ds.BurnedInAnnotation = "YES"
    folder = tmp_path / "burned"
    folder.mkdir()
    (folder / "burned.dcm").write_bytes(_file(ds))
    refused = ingest.ingest(engine, folder, deidentify=True)
    assert (refused.stored, refused.errors) == (0, 1)
    with engine.connect() as conn:
        assert "BurnedInAnnotation is YES" in conn.execute(sa.text("SELECT reason FROM lungsql.ingest_errors")
                                                           ).scalar_one()
    kept = ingest.ingest(engine, folder, deidentify=True, allow_burned_in=True)
    assert (kept.stored, kept.errors) == (1, 0)
