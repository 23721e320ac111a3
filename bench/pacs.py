"""PACS: the upload benchmark's cohort through a real Orthanc on loopback, into databases of its own.

Three ways in, each timed from its first request to its last commit, against the folder upload of
the same files in the same run: a DICOMweb pull (QIDO-RS + WADO-RS), a DIMSE pull (C-FIND + C-GET)
and Orthanc pushing the studies to `lungsql listen` (C-STORE, one commit per instance). Uploading
the files into Orthanc first is Orthanc's work and is reported apart.
"""

from __future__ import annotations

import datetime as dt
import shutil
import tempfile
import time
from pathlib import Path

import sqlalchemy as sa

from lungsql.bench.database import BenchDatabase
from lungsql.client import ingest, migrations
from lungsql.client.pacs import dicomweb, dimse
from lungsql.client.pacs.listener import Listener
from lungsql.client.pacs.orthanc import LocalOrthanc

EVERYTHING = dicomweb.Query(since=dt.date(1900, 1, 1))


def run(db: BenchDatabase, cohort: Path, folder: dict, patients: int | None = None) -> dict:
    """Figures of the three ways in, over the files of the first `patients` patients of the cohort
    (all by default); `folder` is the upload benchmark's figures (files/s of ingest)."""
    chosen = sorted(p.name for p in cohort.iterdir() if p.is_dir())[:patients] if patients else None
    files = [f for f in ingest.find_files(cohort)
             if chosen is None or f.relative_to(cohort).parts[0] in chosen]
    home = Path(tempfile.mkdtemp(prefix="lungsql-bench-orthanc-"))
    try:
        return _run(home, db, files, folder)
    finally:
        shutil.rmtree(home, ignore_errors=True)


def _run(home: Path, db: BenchDatabase, files: list[Path], folder: dict) -> dict:
    with LocalOrthanc(home) as orthanc:
        started = time.perf_counter()
        ids = [orthanc.upload(path.read_bytes()) for path in files]
        into_orthanc = time.perf_counter() - started
        figures: dict = {"instances": len(files), "into_orthanc_files_per_s": round(len(files) / into_orthanc, 1)}
        with _database(db, "dicomweb") as engine:
            summary = dicomweb.pull(engine, dicomweb.client(orthanc.dicomweb_url), EVERYTHING)
            figures["dicomweb"] = _figures(summary, folder)
        orthanc.add_modality("lungsql", "LUNGSQL", "127.0.0.1", 104)  # known to Orthanc: it may query
        with _database(db, "dimse") as engine:
            peer = dimse.Peer("127.0.0.1", orthanc.dicom_port, orthanc.aet)
            figures["dimse_c_get"] = _figures(dimse.pull(engine, peer, EVERYTHING), folder)
        with _database(db, "listener") as engine:
            with Listener(engine, 0, host="127.0.0.1", allowed=[orthanc.aet]) as listener:
                orthanc.add_modality("lungsql", listener.aet, "127.0.0.1", listener.port)
                started = time.perf_counter()
                orthanc.request("POST", "/modalities/lungsql/store", json={"Resources": ids, "Synchronous": True},
                                timeout=3600)
                seconds = time.perf_counter() - started
            summary = listener.summary
            summary.seconds = seconds  # from the first association to the last acknowledged instance
            figures["listener_push"] = _figures(summary, folder)
    for way in ("dicomweb", "dimse_c_get", "listener_push"):
        if figures[way]["stored"] != len(files):
            raise RuntimeError(f"the {way} benchmark stored {figures[way]['stored']} of {len(files)} instances")
    return figures


def _figures(summary: ingest.IngestSummary, folder: dict) -> dict:
    return {"stored": summary.stored, "seconds": round(summary.seconds, 3),
            "files_per_s": round(summary.files_per_s, 1), "mb_per_s": round(summary.mb_per_s, 1),
            "ratio_to_folder": round(summary.files_per_s / folder["files_per_s"], 3)}


class _database:
    """A new database of the benchmark cluster with lungsql's schema, dropped afterwards."""

    def __init__(self, db: BenchDatabase, name: str):
        self.db, self.name = db, f"lungsql_bench_{name}"

    def __enter__(self) -> sa.Engine:
        with self.db.connect() as conn:
            conn.execute(f'CREATE DATABASE "{self.name}"')
        self.engine = sa.create_engine(self.db.cluster.url(dbname=self.name))
        migrations.init(self.engine)
        return self.engine

    def __exit__(self, *exc) -> None:
        self.engine.dispose()
        with self.db.connect() as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)')
