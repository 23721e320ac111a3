"""Scans from a real PACS: the session's Orthanc (tests/pacs_fixtures.py) on loopback, pulled over
DICOMweb and DIMSE and pushed to lungsql's listener, into a real PostgreSQL."""

from __future__ import annotations

import datetime as dt
import io
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pydicom
import pytest
import sqlalchemy as sa

from databases import create_database, drop_database
from lungsql.client import ingest, migrations
from lungsql.client.pacs import dicomweb
from lungsql.dicom import synth
from lungsql.errors import ConfigurationError, LungSQLError

PATIENTS = 3
SLICES = (5, 7)
ROW = ("sop_instance_uid, patient_id, study_instance_uid, series_instance_uid, instance_number, z_position, "
       "rows, columns, transfer_syntax_uid, sha256")


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("pacs-cohort")
    synth.write_cohort(out, patients=PATIENTS, slices=SLICES, seed=11)
    return out


@pytest.fixture
def folder_engine(cluster, cohort):
    """A second database holding the cohort as `lungsql ingest` stores it, to compare with."""
    name = create_database(cluster, "folder")
    eng = sa.create_engine(cluster.url(dbname=name))
    migrations.init(eng)
    ingest.ingest(eng, cohort)
    yield eng
    eng.dispose()
    drop_database(cluster, name)


@pytest.fixture
def pacs(orthanc_clean, cohort):
    """The session's Orthanc holding exactly the cohort."""
    for path in sorted(cohort.rglob("*.dcm")):
        orthanc_clean.upload(path.read_bytes())
    return orthanc_clean


def rows(engine) -> set[tuple]:
    with engine.connect() as conn:
        return set(conn.execute(sa.text(f"SELECT {ROW} FROM lungsql.scans")).all())


def scalar(engine, sql: str, **params):
    with engine.connect() as conn:
        return conn.execute(sa.text(sql), params).scalar()


def patient_ids(cohort: Path) -> list[str]:
    return sorted({pydicom.dcmread(p, stop_before_pixels=True).PatientID for p in cohort.rglob("*.dcm")})


# -- DICOMweb ----------------------------------------------------------------------------------------
def test_a_dicomweb_pull_stores_the_rows_and_bytes_a_folder_ingest_stores(engine, folder_engine, pacs, cohort):
    files = sorted(cohort.rglob("*.dcm"))
    web = dicomweb.client(pacs.dicomweb_url)
    summary = dicomweb.pull(engine, web, dicomweb.Query(since=dt.date(1900, 1, 1)))
    assert (summary.files_seen, summary.stored, summary.errors) == (len(files), len(files), 0)
    assert rows(engine) == rows(folder_engine)
    with engine.connect() as conn, folder_engine.connect() as other:
        pulled = dict(conn.execute(sa.text("SELECT sop_instance_uid, dicom FROM lungsql.scans")).all())
        stored = dict(other.execute(sa.text("SELECT sop_instance_uid, dicom FROM lungsql.scans")).all())
        run = conn.execute(sa.text("SELECT source_dir, stored, errors FROM lungsql.ingest_runs")).one()
    assert pulled == stored  # byte for byte
    assert run == (f"dicomweb:{pacs.dicomweb_url}", len(files), 0)


def test_a_rerun_fetches_only_what_is_missing(engine, pacs, cohort):
    web = dicomweb.client(pacs.dicomweb_url)
    first, *others = patient_ids(cohort)
    dicomweb.pull(engine, web, dicomweb.Query(patient=first))
    one = scalar(engine, "SELECT count(*) FROM lungsql.scans")
    assert one and scalar(engine, "SELECT count(DISTINCT patient_id) FROM lungsql.scans") == 1
    # A pull killed midway: one instance of that patient is gone, as if its batch never committed.
    with engine.begin() as conn:
        conn.execute(sa.text("DELETE FROM lungsql.scans WHERE scan_id = (SELECT max(scan_id) FROM lungsql.scans)"))
    fetched: list[int] = []
    summary = dicomweb.pull(engine, web, dicomweb.Query(since=dt.date(1900, 1, 1)), on_instance=fetched.append)
    total = len(list(cohort.rglob("*.dcm")))
    assert scalar(engine, "SELECT count(*) FROM lungsql.scans") == total
    assert scalar(engine, "SELECT count(DISTINCT sop_instance_uid) FROM lungsql.scans") == total
    assert summary.stored == total - one + 1 and len(fetched) == total - one + 1  # the rest never fetched again


def test_a_pull_de_identifies_before_anything_is_stored(engine, pacs, cohort):
    web = dicomweb.client(pacs.dicomweb_url)
    summary = dicomweb.pull(engine, web, dicomweb.Query(since=dt.date(1900, 1, 1)), deidentify=True)
    assert summary.stored == len(list(cohort.rglob("*.dcm")))
    originals = set(patient_ids(cohort))
    with engine.connect() as conn:
        stored = {r[0] for r in conn.execute(sa.text("SELECT patient_id FROM lungsql.patients"))}
        blobs = [r[0] for r in conn.execute(sa.text("SELECT dicom FROM lungsql.scans"))]
        names = [r[0] for r in conn.execute(sa.text("SELECT source_path FROM lungsql.ingest_errors"))]
    assert len(stored) == PATIENTS and not stored & originals
    assert not any(pid.encode() in blob for blob in blobs for pid in originals)
    assert names == []


def test_a_bad_instance_in_the_pacs_is_recorded_and_the_pull_goes_on(engine, orthanc_clean, cohort, tmp_path):
    files = sorted(cohort.rglob("*.dcm"))
    for path in files:
        orthanc_clean.upload(path.read_bytes())
    bad = pydicom.dcmread(files[0])
    bad.SOPInstanceUID = pydicom.uid.generate_uid()
    bad.Rows = 0  # a header the PACS keeps and lungsql refuses
    bad.save_as(tmp_path / "bad.dcm", enforce_file_format=True)
    orthanc_clean.upload((tmp_path / "bad.dcm").read_bytes())
    reasons: list[tuple[str, str]] = []
    summary = dicomweb.pull(engine, dicomweb.client(orthanc_clean.dicomweb_url),
                            dicomweb.Query(since=dt.date(1900, 1, 1)), on_error=lambda n, r: reasons.append((n, r)))
    assert (summary.stored, summary.errors) == (len(files), 1)
    assert len(reasons) == 1 and bad.SOPInstanceUID in reasons[0][0]
    assert scalar(engine, "SELECT count(*) FROM lungsql.ingest_errors WHERE source_path LIKE :p",
                  p=f"%{bad.SOPInstanceUID}") == 1


def test_the_query_names_the_studies_and_the_modality(pacs, cohort):
    web = dicomweb.client(pacs.dicomweb_url)
    everything = dicomweb.find_series(web, dicomweb.Query(since=dt.date(1900, 1, 1)))
    assert len(everything) == PATIENTS  # one CT series each
    one = dicomweb.find_series(web, dicomweb.Query(study=everything[0].study))
    assert [s.series for s in one] == [everything[0].series] and one[0].instances in range(SLICES[0], SLICES[1] + 1)
    assert dicomweb.find_series(web, dicomweb.Query(since=dt.date(1900, 1, 1), modality="MR")) == []
    assert dicomweb.find_series(web, dicomweb.Query(patient="nobody-of-that-name")) == []
    with pytest.raises(LungSQLError, match="needs --study, --patient or --since"):
        dicomweb.find_series(web, dicomweb.Query())


def test_credentials_never_come_from_the_url(monkeypatch):
    with pytest.raises(ConfigurationError, match="holds a user name or password"):
        dicomweb.client("http://admin:secret@127.0.0.1:8042/dicom-web")
    with pytest.raises(ConfigurationError, match="not a DICOMweb URL"):
        dicomweb.client("ftp://127.0.0.1/dicom-web")
    monkeypatch.delenv("LUNGSQL_PACS_URL", raising=False)
    with pytest.raises(ConfigurationError, match="no PACS to pull from"):
        dicomweb.client(None)
    monkeypatch.setenv("LUNGSQL_PACS_CA_BUNDLE", "/nonexistent/ca.pem")
    with pytest.raises(ConfigurationError, match="names no file"):
        dicomweb.client("https://pacs.example.org/dicom-web")
    assert dicomweb.public_url("https://u:p@pacs.example.org:443/dicom-web?x=1#f") == (
        "https://pacs.example.org:443/dicom-web")


def test_an_unreachable_pacs_is_a_clear_error(engine):
    web = dicomweb.client("http://127.0.0.1:9/dicom-web", attempts=1)  # the discard port: nothing listens
    with pytest.raises(LungSQLError, match="cannot reach the PACS"):
        dicomweb.pull(engine, web, dicomweb.Query(patient="x"))


# -- the listener (C-STORE SCP) ------------------------------------------------------------------------
def dimse_rows(engine) -> set[tuple]:
    """What a DIMSE transfer must keep: everything but the file's bytes (DIMSE carries no file meta)."""
    with engine.connect() as conn:
        return set(conn.execute(sa.text(
            "SELECT sop_instance_uid, patient_id, series_instance_uid, z_position, rows, columns, "
            "transfer_syntax_uid FROM lungsql.scans")).all())


def same_pixels(engine, other) -> bool:
    query = sa.text("SELECT sop_instance_uid, dicom FROM lungsql.scans")
    with engine.connect() as conn, other.connect() as conn2:
        mine = {uid: pydicom.dcmread(io.BytesIO(data)).PixelData for uid, data in conn.execute(query)}
        theirs = {uid: pydicom.dcmread(io.BytesIO(data)).PixelData for uid, data in conn2.execute(query)}
    return mine == theirs


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def send(port: int, paths, calling: str = "MODALITY", stop_after: int | None = None) -> dict[str, int]:
    """C-STORE each file to the listener on port as a modality would; SOPInstanceUID -> status received."""
    from pynetdicom import AE
    from pynetdicom.sop_class import CTImageStorage

    ae = AE(ae_title=calling)
    ae.add_requested_context(CTImageStorage, [pydicom.uid.ExplicitVRLittleEndian, pydicom.uid.ImplicitVRLittleEndian])
    assoc = ae.associate("127.0.0.1", port, ae_title="LUNGSQL")
    statuses: dict[str, int] = {}
    if not assoc.is_established:
        return statuses
    for path in paths:
        ds = pydicom.dcmread(path)
        status = assoc.send_c_store(ds)
        if not status or "Status" not in status:
            break  # the listener went away
        statuses[str(ds.SOPInstanceUID)] = status.Status
        if stop_after is not None and len(statuses) >= stop_after:
            break
    if assoc.is_established:
        assoc.release()
    return statuses


def test_the_listener_stores_what_the_pacs_pushes(engine, folder_engine, pacs, cohort):
    from lungsql.client.pacs.listener import Listener

    with Listener(engine, 0, host="127.0.0.1", allowed=[pacs.aet]) as listener:
        pacs.add_modality("lungsql", listener.aet, "127.0.0.1", listener.port)
        ids = pacs.request("GET", "/instances")
        pacs.request("POST", "/modalities/lungsql/store", json={"Resources": ids, "Synchronous": True})
    assert dimse_rows(engine) == dimse_rows(folder_engine)
    assert same_pixels(engine, folder_engine)
    assert listener.summary.stored == len(ids) and listener.summary.errors == 0
    with engine.connect() as conn:
        run = conn.execute(sa.text("SELECT source_dir, stored, finished_at FROM lungsql.ingest_runs")).one()
    assert run.source_dir.startswith("dimse-listener:LUNGSQL@127.0.0.1:") and run.stored == len(ids)
    assert run.finished_at is not None


def test_a_listener_killed_midway_loses_nothing_it_acknowledged(db_env, engine, cohort, tmp_path):
    files = sorted(cohort.rglob("*.dcm"))
    port = free_port()
    command = [sys.executable, "-m", "lungsql", "listen", "--host", "127.0.0.1", "--port", str(port),
               "--allow", "MODALITY"]
    env = {**os.environ, "LUNGSQL_DATABASE_URL": db_env}

    def started() -> subprocess.Popen:
        process = subprocess.Popen(command, env=env, stderr=open(tmp_path / "listener.log", "ab"))
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", port)) == 0:
                    return process
            time.sleep(0.1)
        raise AssertionError((tmp_path / "listener.log").read_text())

    listener = started()
    acknowledged = send(port, files, stop_after=5)
    listener.kill()  # SIGKILL: no chance to finish anything
    listener.wait()
    assert len(acknowledged) == 5 and set(acknowledged.values()) == {0}
    with engine.connect() as conn:
        stored = {r[0] for r in conn.execute(sa.text("SELECT sop_instance_uid FROM lungsql.scans"))}
    assert set(acknowledged) <= stored  # every "success" the sender got is committed
    # The sender resends everything; the restarted listener stores the rest once.
    listener = started()
    statuses = send(port, files)
    listener.send_signal(signal.SIGTERM)
    assert listener.wait(timeout=60) == 0
    assert len(statuses) == len(files) and set(statuses.values()) == {0}
    assert scalar(engine, "SELECT count(*) FROM lungsql.scans") == len(files)
    assert scalar(engine, "SELECT count(DISTINCT sop_instance_uid) FROM lungsql.scans") == len(files)
    with engine.connect() as conn:
        runs = conn.execute(sa.text("SELECT stored, skipped, finished_at FROM lungsql.ingest_runs "
                                    "ORDER BY run_id")).all()
    assert runs[-1].finished_at is not None and runs[-1].stored + runs[-1].skipped == len(files)
    log = (tmp_path / "listener.log").read_text()
    assert "association accepted: MODALITY from 127.0.0.1" in log and "stopped:" in log


def test_the_listener_accepts_only_the_senders_it_is_told_of(engine, cohort):
    from lungsql.client.pacs.listener import Listener

    with pytest.raises(ConfigurationError, match="would accept no sender"):
        Listener(engine, 0, allowed=[])
    files = sorted(cohort.rglob("*.dcm"))[:2]
    with Listener(engine, 0, host="127.0.0.1", allowed=["MODALITY"]) as listener:
        assert send(listener.port, files, calling="STRANGER") == {}
        assert set(send(listener.port, files).values()) == {0}
    assert scalar(engine, "SELECT count(*) FROM lungsql.scans") == 2


def test_a_bad_instance_pushed_is_refused_with_its_reason_and_recorded(engine, cohort, tmp_path):
    from lungsql.client.pacs.listener import CANNOT_UNDERSTAND, Listener

    good = sorted(cohort.rglob("*.dcm"))[0]
    bad = pydicom.dcmread(good)
    bad.SOPInstanceUID = pydicom.uid.generate_uid()
    bad.BitsAllocated = 200  # a header lungsql refuses
    bad.save_as(tmp_path / "bad.dcm", enforce_file_format=True)
    with Listener(engine, 0, host="127.0.0.1", allowed=["MODALITY"]) as listener:
        statuses = send(listener.port, [tmp_path / "bad.dcm", good])
    assert statuses[str(bad.SOPInstanceUID)] == CANNOT_UNDERSTAND
    assert statuses[str(pydicom.dcmread(good).SOPInstanceUID)] == 0
    with engine.connect() as conn:
        errors = conn.execute(sa.text("SELECT source_path, reason FROM lungsql.ingest_errors")).all()
    assert len(errors) == 1 and errors[0].source_path == f"dimse:MODALITY/{bad.SOPInstanceUID}"


# -- DIMSE pulls (C-FIND, C-GET, C-MOVE) -----------------------------------------------------------------
def test_a_dimse_pull_by_c_get_stores_what_a_folder_ingest_stores_and_reruns_fetch_nothing(
        engine, folder_engine, pacs, cohort):
    from lungsql.client.pacs import dimse

    pacs.add_modality("lungsql", "LUNGSQL", "127.0.0.1", 104)  # C-GET answers on the same association
    peer = dimse.Peer.parse(f"127.0.0.1:{pacs.dicom_port}", pacs.aet)
    summary = dimse.pull(engine, peer, dicomweb.Query(since=dt.date(1900, 1, 1)))
    files = len(list(cohort.rglob("*.dcm")))
    assert (summary.stored, summary.errors) == (files, 0)
    assert dimse_rows(engine) == dimse_rows(folder_engine) and same_pixels(engine, folder_engine)
    again = dimse.pull(engine, peer, dicomweb.Query(since=dt.date(1900, 1, 1)))
    assert (again.files_seen, again.stored) == (0, 0)  # everything stored: nothing retrieved


def test_a_dimse_pull_by_c_move_goes_through_lungsqls_listener(engine, folder_engine, pacs, cohort):
    from lungsql.client.pacs import dimse

    port = free_port()
    pacs.add_modality("lungsql", "LUNGSQL", "127.0.0.1", port)
    peer = dimse.Peer.parse(f"127.0.0.1:{pacs.dicom_port}", pacs.aet)
    first = patient_ids(cohort)[0]
    summary = dimse.pull(engine, peer, dicomweb.Query(patient=first), move_port=port)
    assert summary.stored > 0 and summary.errors == 0
    assert scalar(engine, "SELECT count(DISTINCT patient_id) FROM lungsql.scans") == 1
    assert dimse_rows(engine) <= dimse_rows(folder_engine)


def test_a_pacs_that_refuses_says_what_to_fix(engine, orthanc):
    from lungsql.client.pacs import dimse

    with pytest.raises(LungSQLError, match="refused or did not answer"):
        dimse.pull(engine, dimse.Peer.parse(f"127.0.0.1:{orthanc.dicom_port}", "NOT-ORTHANC"),
                   dicomweb.Query(patient="x"))
    with pytest.raises(ConfigurationError, match="not HOST:PORT"):
        dimse.Peer.parse("pacs.example.org", "ORTHANC")


def test_the_pull_command_loads_labels_and_reports_like_ingest(db_env, engine, pacs, cohort):
    from click.testing import CliRunner

    from lungsql.client.cli import main

    result = CliRunner().invoke(main, ["pacs", "pull", "--url", pacs.dicomweb_url, "--since", "1900-01-01",
                                       "--labels", str(cohort / "stage1_labels.csv")])
    files = len(list(cohort.rglob("*.dcm")))
    assert result.exit_code == 0, result.output
    assert f"{files} instances in" in result.output and f"{files} stored" in result.output
    assert scalar(engine, "SELECT count(*) FROM lungsql.patients WHERE label IS NOT NULL") == PATIENTS
    empty = CliRunner().invoke(main, ["pacs", "pull", "--url", pacs.dicomweb_url])
    assert empty.exit_code != 0 and "needs --study, --patient or --since" in empty.output


def test_the_demo_runs_from_a_pacs_and_leaves_its_reports_there(db_env, engine, tmp_path, monkeypatch):
    from click.testing import CliRunner

    from lungsql.client.cli import main
    from lungsql.client.pacs.orthanc import LocalOrthanc

    monkeypatch.setenv("LUNGSQL_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("LUNGSQL_DATA_PATH", str(tmp_path / "data"))
    result = CliRunner().invoke(main, ["demo", "--pacs", "--no-serve", "--patients", "8", "--slices", "3:4",
                                       "--xray-patients", "0"])
    assert result.exit_code == 0, result.output[-3000:]
    for step in ("starting a PACS", "lungsql pacs pull --url", "lungsql pacs push-results",
                 "8 reports stored in the PACS, 0 patients not pushed",
                 "lungsql.deploy_ensemble('ensemble', ...)", "lungsql.model_comparison"):
        assert step in result.output, step
    assert scalar(engine, "SELECT count(DISTINCT patient_id) FROM lungsql.predictions") == 8
    with LocalOrthanc(tmp_path / "home" / "orthanc") as orthanc:  # the demo's PACS, started again
        reports = orthanc.request("POST", "/tools/find", json={"Level": "Instance", "Query": {"Modality": "SR"}})
    assert len(reports) == 8


# -- what a PACS answers is input from outside too ------------------------------------------------------------
@pytest.mark.parametrize("value, expected", [
    ("1.2.840.113619.2.55.3", "1.2.840.113619.2.55.3"), (" 1.2.3 ", "1.2.3"),
    ("../../instances", None), ("1.2/../3", None), ("1.02.3", None), ("1..2", None), ("", None), (None, None),
    ("1." + "2" * 70, None), (["1.2"], None), ("1.2.3?x=1", None),
])
def test_only_a_real_uid_goes_into_a_request(value, expected):
    from lungsql.client.pacs import valid_uid

    assert valid_uid(value) == expected


def test_counts_and_json_values_a_pacs_gets_wrong_are_read_as_unknown():
    from lungsql.client.pacs import instance_count, shown

    assert [instance_count(v) for v in (12, "7", " 3 ", "x", None, -1, 10**9, [4])] == [12, 7, 3, None, None,
                                                                                         None, None, None]
    value = dicomweb._value
    assert value({"0020000E": {"vr": "UI", "Value": ["1.2"]}}, "0020000E") == "1.2"
    for junk in ({}, {"0020000E": None}, {"0020000E": "1.2"}, {"0020000E": {"Value": "1.2"}},
                 {"0020000E": {"Value": []}}, [], "text", None):
        assert value(junk, "0020000E") is None
    assert len(shown("x" * 10_000)) == 80 and "\n" not in shown("a\nb")
