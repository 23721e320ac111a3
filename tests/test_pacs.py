"""Scans from a real PACS: the session's Orthanc (tests/pacs_fixtures.py) on loopback, pulled over
DICOMweb and DIMSE and pushed to lungsql's listener, into a real PostgreSQL."""

from __future__ import annotations

import datetime as dt
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
