"""`lungsql pacs push-results`: each patient's probability back to the PACS, as a DICOM Structured
Report in the patient's own CT study.

For each patient:

1. the deployed model scores the patient through the scoring procedure
   (lungsql.predict_lung_cancer_batch, which records the prediction), as a DBA would;
2. the report cites the series the features came from: lungsql.features.series_instance_uid,
   or, for features computed before schema version 8 (NULL there), the patient's series with the
   most slices, which is the series featurization read then;
3. the stored headers of that series (lungsql.scans, checked against their SHA-256) become the
   evidence of a TID 1500 report (lungsql.dicom.report.structured_report);
4. the report goes to the PACS with STOW-RS, or with a C-STORE when a DIMSE peer is given.

A patient that cannot be pushed (unknown, no features, no stored scans, a report the PACS
refuses) is reported and the others go on. Nothing is pushed, and an error is raised, when nothing
could be done at all: no deployed model, or a PACS that cannot be reached at the first report.
Each run makes new reports (new SOP Instance UIDs): a second run sends a second report per patient,
which a viewer lists next to the first. The returned `Pushed` rows name each report.

The key slice of a report (its Key Object Selection) needs to know which slice contributed most to
the probability, which lungsql cannot tell yet: `key_image=True` is refused rather than guessed.
"""

from __future__ import annotations

import hashlib
import io
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import sqlalchemy as sa

import config_preprocessing as config
import lungsql
from lungsql.client import calls, migrations
from lungsql.client.pacs.dicomweb import public_url
from lungsql.client.pacs.dimse import Peer
from lungsql.dicom import report
from lungsql.errors import ConfigurationError, DatabaseUnavailable, IntegrityError, LungSQLError

__all__ = ["KEY_IMAGE_UNAVAILABLE", "DeployedModel", "PacsUnreachable", "PushResults", "Pushed", "deployed_model",
           "push_results"]

#: The schema version that records the series each patient's features came from.
SERIES_VERSION = 8
#: C-STORE statuses that mean "stored" (PS3.4 B.2.3): success, and the warnings of a stored instance
#: (coercion of data elements, elements discarded, data set does not match the SOP class).
STORED = (0x0000, 0xB000, 0xB006, 0xB007)
#: Failure Reason values of a STOW-RS answer (PS3.18 Table 10.5.3-2).
STOW_REASONS = {0x0110: "processing failure", 0x0122: "SOP class not supported", 0x0124: "not authorized",
                0xA700: "out of resources", 0xA900: "data set does not match the SOP class",
                0xC000: "cannot understand", 0xC122: "transfer syntax not supported"}
KEY_IMAGE_UNAVAILABLE = (
    "key images are not available yet: lungsql cannot yet tell which slice contributed most to a "
    "probability (the model scores the whole series at once, and per-slice explanations are not "
    "implemented), and a key slice chosen any other way would point readers at the wrong image")
_LO_MAX = 64  # characters of a DICOM Long String (algorithm name and version)


@dataclass(frozen=True)
class Pushed:
    """One report stored in the PACS: the patient, the probability it states, the model that gave
    it (lungsql.models.model_id), the report's SOP Instance UID and the study it joined."""

    patient_id: str
    probability: float
    model_id: int
    sr_sop_instance_uid: str
    study_instance_uid: str


class PushResults(list):
    """The `Pushed` rows of a run, in patient order; `failed` holds (patient id, reason) of each
    patient that was not pushed."""

    def __init__(self) -> None:
        super().__init__()
        self.failed: list[tuple[str, str]] = []


class PacsUnreachable(LungSQLError):
    """The PACS cannot take any report: it does not answer, refuses lungsql's credentials or
    association, or has no such service."""


@dataclass(frozen=True)
class DeployedModel:
    """The deployed model's row: lungsql.models joined to the deployment and the CNN."""

    model_id: int
    name: str
    version: int
    algorithm: str
    sha256: str
    cnn_id: int
    cnn_name: str
    deployment_id: int

    def info(self) -> report.ModelInfo:
        """The model as the report names it, e.g. "lungsql-lightgbm", "lightgbm v3 (lungsql 0.1.0)"."""
        return report.ModelInfo(
            name=_long_string(f"lungsql-{self.algorithm}"), model_id=self.model_id,
            version=_long_string(f"{self.name} v{self.version} (lungsql {lungsql.__version__})"),
            cnn_name=self.cnn_name, model_sha256=self.sha256)


# The same choice as the scoring procedure's (lungsql.server.plpy_data.PlpyData.deployed): the newest
# deployment of the name, or of any name when none is given, among the lung cancer models.
_DEPLOYED = sa.text("""
    SELECT m.model_id, m.name, m.version, m.algorithm, m.sha256, m.cnn_id, c.name AS cnn_name, d.deployment_id
    FROM lungsql.deployments d
    JOIN lungsql.models m USING (model_id)
    JOIN lungsql.cnn_models c ON c.cnn_id = m.cnn_id
    WHERE (CAST(:name AS text) IS NULL OR d.name = :name) AND m.task = 'lung_cancer'
    ORDER BY d.deployment_id DESC
    LIMIT 1""")
_ALL_FEATURES = sa.text("""
    SELECT patient_id, series_instance_uid, created_at FROM lungsql.features
    WHERE cnn_id = :cnn_id ORDER BY patient_id""")
_FEATURES = sa.text("""
    SELECT patient_id, series_instance_uid, created_at FROM lungsql.features
    WHERE cnn_id = :cnn_id AND patient_id = ANY(:ids)""")
_KNOWN = sa.text("SELECT patient_id FROM lungsql.patients WHERE patient_id = ANY(:ids)")
_SERIES = sa.text("""
    SELECT series_instance_uid, count(*) AS files, max(ingested_at) AS last_ingested
    FROM lungsql.scans WHERE patient_id = :patient_id
    GROUP BY series_instance_uid""")
_SLICES = sa.text("""
    SELECT sop_instance_uid, sha256, dicom FROM lungsql.scans
    WHERE patient_id = :patient_id AND series_instance_uid = :series
    ORDER BY z_position, instance_number NULLS LAST, sop_instance_uid""")


def deployed_model(engine: sa.Engine, model_name: str | None = None) -> DeployedModel:
    """The model the scoring procedure scores with for `model_name` (None: the most recently
    deployed model of any name); LungSQLError when none is deployed."""
    with engine.connect() as conn:
        row = conn.execute(_DEPLOYED, {"name": model_name}).mappings().first()
    if row is None:
        raise LungSQLError("no model is deployed" + (f" as {model_name!r}" if model_name else "")
                           + ": there is nothing to push", hint="train one: SELECT * FROM lungsql.train_model()")
    return DeployedModel(**row)


def push_results(
    engine: sa.Engine,
    patient_ids: Sequence[str] | None,
    *,
    model_name: str | None = None,
    url: str | None = None,
    dimse: Peer | None = None,
    key_image: bool = False,
    on_patient: Callable[[str, str], None] | None = None,
    on_pushed: Callable[[Pushed], None] | None = None,
    allow_deidentified: bool = False,
) -> PushResults:
    """Score `patient_ids` (None: every patient with features from the deployed model's CNN) and
    store one Structured Report per patient in the PACS: over STOW-RS at `url` (else
    LUNGSQL_PACS_URL), or by C-STORE to `dimse` when it is given.

    `on_patient(patient_id, reason)` is called for each patient that is not pushed (also kept in
    the result's `failed`), `on_pushed(pushed)` for each report stored. Scans stored de-identified
    are refused unless `allow_deidentified`: their report would name a pseudonym and a study the
    hospital's PACS does not hold. Raises LungSQLError when nothing could be done: no deployed
    model, `key_image`, or PacsUnreachable at the first report.
    """
    if key_image:
        raise LungSQLError(KEY_IMAGE_UNAVAILABLE, hint="push without a key image: the report references every "
                                                       "slice of the scored series")
    if url and dimse:
        raise ConfigurationError("give a DICOMweb URL or a DIMSE peer, not both",
                                 hint="--url for STOW-RS, or --dimse HOST:PORT for a C-STORE")
    _check_database(engine)
    destination = _CStore(dimse) if dimse is not None else _Stow(url)
    model = deployed_model(engine, model_name)
    info = model.info()
    results = PushResults()

    def fail(patient_id: str, reason: str) -> None:
        results.failed.append((patient_id, reason))
        if on_patient:
            on_patient(patient_id, reason)

    sources = _sources(engine, model, patient_ids, fail)
    if not sources:
        return results
    destination.open()  # a DIMSE peer that refuses is known before anyone is scored
    try:
        scores = _score(engine, model, list(sources), model_name, fail)
        sent_before = False
        for index, (patient_id, probability) in enumerate(scores):
            try:
                slices = _stored_headers(engine, patient_id, sources[patient_id], allow_deidentified)
                sr = report.structured_report(slices, probability, info)
            except LungSQLError as exc:
                fail(patient_id, exc.message)
                continue
            try:
                destination.send(sr)
            except PacsUnreachable as exc:
                if not sent_before:
                    raise
                for later, _ in scores[index:]:
                    fail(later, f"not sent: {exc.message}")
                break
            except LungSQLError as exc:
                sent_before = True
                fail(patient_id, exc.message)
                continue
            sent_before = True
            pushed = Pushed(patient_id, probability, model.model_id, str(sr.SOPInstanceUID),
                            str(sr.StudyInstanceUID))
            results.append(pushed)
            if on_pushed:
                on_pushed(pushed)
    finally:
        destination.close()
    return results


# ----------------------------------------------------------------------------- the database side


def _check_database(engine: sa.Engine) -> None:
    if engine.dialect.name != "postgresql":
        raise ConfigurationError("results go back to a PACS from a PostgreSQL database only",
                                 hint="run lungsql pacs push-results against the PostgreSQL database")
    version = migrations.schema_version(engine)
    if version is None:
        raise DatabaseUnavailable("this database has no lungsql schema", hint="run lungsql init")
    if version < SERIES_VERSION:
        raise ConfigurationError(f"this database's schema is at version {version}; pushing results needs "
                                 f"version {SERIES_VERSION} (the series each patient's features came from)",
                                 hint="run lungsql init, which applies the missing migrations")


def _sources(engine: sa.Engine, model: DeployedModel, patient_ids: Sequence[str] | None,
             fail: Callable[[str, str], None]) -> dict[str, str]:
    """Patient id -> the series its features came from, for the patients that can be scored and
    reported; the others are passed to `fail` with the reason."""
    with engine.connect() as conn:
        if patient_ids is None:
            features = {r.patient_id: r for r in conn.execute(_ALL_FEATURES, {"cnn_id": model.cnn_id})}
            wanted, known = list(features), set(features)
        else:
            if isinstance(patient_ids, str):
                raise ConfigurationError("patient_ids must be a list of patient ids, not one string",
                                         hint=f"pass [{patient_ids!r}]")
            wanted = list(dict.fromkeys(str(p) for p in patient_ids))
            features = {r.patient_id: r for r in conn.execute(_FEATURES, {"cnn_id": model.cnn_id, "ids": wanted})}
            known = {r.patient_id for r in conn.execute(_KNOWN, {"ids": wanted})}
        sources = {}
        for patient_id in wanted:
            if patient_id not in known:
                fail(patient_id, f"no patient {patient_id!r} in lungsql.patients")
                continue
            row = features.get(patient_id)
            if row is None:
                fail(patient_id, f"no features from CNN {model.cnn_name!r} (the CNN of model {model.model_id}): "
                                 "featurize first with CALL lungsql.generate_features()")
                continue
            series = {r.series_instance_uid: r for r in conn.execute(_SERIES, {"patient_id": patient_id})}
            reason = _source_problem(row, series)
            if reason:
                fail(patient_id, reason)
                continue
            sources[patient_id] = _featurized_series(row, series)
    return sources


def _featurized_series(features, series: dict) -> str:
    """The series the features came from: as recorded since schema version 8, else the series with
    the most files (ties: the greatest UID), the one featurization read before then."""
    if features.series_instance_uid:
        return features.series_instance_uid
    return max(series, key=lambda uid: (series[uid].files, uid))


def _source_problem(features, series: dict) -> str | None:
    if not series:
        return "no stored scans: its report would have no images to cite"
    chosen = features.series_instance_uid
    if chosen and chosen not in series:
        return (f"the series its features came from ({chosen}) is no longer stored: upload it again, "
                "or featurize again with CALL lungsql.generate_features(only_missing => false)")
    latest = series[_featurized_series(features, series)].last_ingested
    if latest > features.created_at:
        return ("slices of its series were stored after its features were computed, so the probability "
                "would not cover them: featurize again with CALL lungsql.generate_features(only_missing => false)")
    return None


def _score(engine: sa.Engine, model: DeployedModel, patient_ids: list[str], model_name: str | None,
           fail: Callable[[str, str], None]) -> list[tuple[str, float]]:
    """(patient id, probability) from the scoring procedure, which records each prediction."""
    try:
        scores = calls.predict(engine, patient_ids, model_name)
    except LungSQLError:
        # Features deleted since they were read: report those patients and score the others, once.
        with engine.connect() as conn:
            present = {r.patient_id for r in conn.execute(_FEATURES, {"cnn_id": model.cnn_id, "ids": patient_ids})}
        if set(patient_ids) <= present:
            raise
        for patient_id in patient_ids:
            if patient_id not in present:
                fail(patient_id, "its features were deleted while the results were being pushed")
        patient_ids = [p for p in patient_ids if p in present]
        scores = calls.predict(engine, patient_ids, model_name) if patient_ids else []
    now = deployed_model(engine, model_name)
    if now.model_id != model.model_id:
        raise LungSQLError(f"model {now.model_id} was deployed while model {model.model_id}'s results were "
                           "being scored: nothing was sent, as a report must name the model that scored it",
                           hint="run again")
    return [(str(patient_id), float(probability)) for patient_id, probability in scores]


def _stored_headers(engine: sa.Engine, patient_id: str, series: str, allow_deidentified: bool) -> list:
    """The headers of the series' stored files, in z order, each checked against its SHA-256."""
    headers = []
    with engine.connect() as conn:
        rows = conn.execution_options(stream_results=True, yield_per=8).execute(
            _SLICES, {"patient_id": patient_id, "series": series})
        for row in rows:
            headers.append(_stored_header(row.sop_instance_uid, bytes(row.sha256), bytes(row.dicom)))
    if not headers:
        raise LungSQLError(f"series {series} has no stored slices any more")
    if not allow_deidentified and str(headers[0].get("PatientIdentityRemoved", "")).upper() == "YES":
        raise LungSQLError("its scans were stored de-identified (PatientIdentityRemoved YES): a report would "
                           "name the pseudonym and a study UID the hospital's PACS does not hold",
                           hint="allow it only for a PACS that holds the de-identified copies "
                                "(allow_deidentified, --allow-deidentified)")
    return headers


def _stored_header(sop_instance_uid: str, sha256: bytes, data: bytes):
    """The header (no pixel data) of a file of lungsql.scans, after its bytes are checked against the
    SHA-256 recorded at upload. The file passed the upload's checks (size limits, a bounded inflate of
    a Deflated dataset), so reading its header is bounded too."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    if hashlib.sha256(data).digest() != sha256:
        raise IntegrityError(f"the stored file of instance {sop_instance_uid} does not match its SHA-256: it "
                             "was altered after upload, so no report cites it",
                             hint="upload the series again (lungsql ingest or lungsql pacs pull)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
            except InvalidDicomError:  # stored without the preamble, as the upload allows
                ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True, force=True)
    except Exception as exc:  # pydicom raises many kinds on damaged files
        text = str(exc).strip().splitlines()
        raise LungSQLError(f"the stored file of instance {sop_instance_uid} cannot be read: "
                           f"{type(exc).__name__}" + (f": {text[0][:200]}" if text else "")) from None
    if str(ds.get("SOPInstanceUID", "")) != sop_instance_uid:
        raise IntegrityError(f"the stored file of instance {sop_instance_uid} holds SOP Instance UID "
                             f"{ds.get('SOPInstanceUID')!r}", hint="upload the series again")
    return ds


def _long_string(text: str) -> str:
    return text if len(text) <= _LO_MAX else text[:_LO_MAX - 3] + "..."


# ----------------------------------------------------------------------------- the PACS side


class _Stow:
    """Reports stored over STOW-RS, one request per report (so one refused report is only that)."""

    def __init__(self, url: str | None):
        from lungsql.client.pacs import dicomweb

        url = url or config.get("LUNGSQL_PACS_URL")
        if not url:
            raise ConfigurationError("no PACS to send the results to",
                                     hint="give --url http://HOST:8042/dicom-web (or --dimse HOST:PORT), "
                                          "or set LUNGSQL_PACS_URL")
        self.web = dicomweb.client(url)
        self.where = f"the PACS at {public_url(url)}"

    def open(self) -> None:
        pass

    def close(self) -> None:
        pass

    def send(self, sr) -> None:
        import requests

        uid = str(sr.SOPInstanceUID)
        try:
            answer = self.web.store_instances([sr], study_instance_uid=str(sr.StudyInstanceUID))
        except requests.HTTPError as exc:
            status = exc.response.status_code if exc.response is not None else None
            if status in (401, 403):
                raise PacsUnreachable(f"{self.where} refused lungsql's credentials (HTTP {status})",
                                      hint="check LUNGSQL_PACS_USER and LUNGSQL_PACS_PASSWORD") from None
            if status in (404, 405):
                raise PacsUnreachable(f"{self.where} has no STOW-RS service there (HTTP {status})",
                                      hint="give the DICOMweb root, such as http://HOST:8042/dicom-web") from None
            reason = _stow_failure(_answer_of(exc.response), uid)
            raise LungSQLError(f"{self.where} refused the report (HTTP {status}"
                               + (f", {reason}" if reason else "") + ")",
                               hint="see the PACS's log for why") from None
        except requests.exceptions.SSLError:
            raise PacsUnreachable(f"the certificate of {self.where} is not trusted",
                                  hint="set LUNGSQL_PACS_CA_BUNDLE to the PEM file of its CA") from None
        except (requests.ConnectionError, requests.Timeout) as exc:
            raise PacsUnreachable(f"cannot reach {self.where} ({type(exc).__name__})",
                                  hint="check the URL, and that this machine may connect to it") from None
        except (ValueError, TypeError, AttributeError) as exc:  # an answer or a report pydicom cannot handle
            raise LungSQLError(f"the report could not be sent over STOW-RS: {type(exc).__name__}: {exc}") from None
        reason = _stow_failure(answer, uid)
        if reason:
            raise LungSQLError(f"{self.where} refused the report ({reason})", hint="see the PACS's log for why")
        stored = answer.get("ReferencedSOPSequence")
        if stored is not None and uid not in {str(item.get("ReferencedSOPInstanceUID", "")) for item in stored}:
            raise LungSQLError(f"{self.where} answered without confirming that it stored the report",
                               hint="see the PACS's log for why")


def _answer_of(response):
    """The STOW-RS answer (a Dataset) in an HTTP error's body, or None when it holds none."""
    from pydicom import Dataset

    if response is None or "json" not in response.headers.get("Content-Type", ""):
        return None
    try:
        return Dataset.from_json(response.json())
    except Exception:  # a body that is not DICOM JSON says nothing lungsql can show
        return None


def _stow_failure(answer, uid: str) -> str | None:
    """Why a STOW-RS answer says the report `uid` was not stored, or None."""
    if answer is None:
        return None
    for item in answer.get("FailedSOPSequence") or []:
        if str(item.get("ReferencedSOPInstanceUID", uid)) == uid:
            code = item.get("FailureReason")
            if code is None:
                return "no failure reason given"
            return f"failure reason 0x{int(code):04X}" + (f": {STOW_REASONS[int(code)]}"
                                                          if int(code) in STOW_REASONS else "")
    return None


class _CStore:
    """Reports stored by C-STORE on one association (Comprehensive SR Storage)."""

    def __init__(self, peer: Peer):
        self.peer = peer
        self.assoc = None
        self.where = f"the PACS at {peer.host}:{peer.port} (AE title {peer.aet})"

    def open(self) -> None:
        from pydicom.uid import ComprehensiveSRStorage, ExplicitVRLittleEndian, ImplicitVRLittleEndian
        from pynetdicom import AE

        ae = AE(ae_title=config.get("LUNGSQL_AET"))
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
        ae.add_requested_context(ComprehensiveSRStorage, [ImplicitVRLittleEndian, ExplicitVRLittleEndian])
        self.assoc = ae.associate(self.peer.host, self.peer.port, ae_title=self.peer.aet)
        if not self.assoc.is_established:
            raise PacsUnreachable(f"{self.where} refused or did not answer an association",
                                  hint="check HOST:PORT and the called AE title, and that the PACS accepts "
                                       f"C-STORE from lungsql's AE title {ae.ae_title} (LUNGSQL_AET)")
        if not any(cx.abstract_syntax == ComprehensiveSRStorage for cx in self.assoc.accepted_contexts):
            self.close()
            raise PacsUnreachable(f"{self.where} does not accept Comprehensive SR Storage",
                                  hint="allow the SOP class 1.2.840.10008.5.1.4.1.1.88.33 in the PACS")

    def close(self) -> None:
        if self.assoc is not None and self.assoc.is_established:
            self.assoc.release()

    def send(self, sr) -> None:
        if self.assoc is None or not self.assoc.is_established:
            raise PacsUnreachable(f"the association with {self.where} ended", hint="run again")
        try:
            status = self.assoc.send_c_store(sr)
        except (ValueError, TypeError, AttributeError) as exc:  # an answer or a report pydicom cannot handle
            raise LungSQLError(f"the report could not be sent by C-STORE: {type(exc).__name__}: {exc}") \
                from None
        if not status or "Status" not in status:
            raise PacsUnreachable(f"{self.where} gave no answer to the C-STORE (the association was aborted "
                                  "or timed out)", hint="see the PACS's log, then run again")
        code = int(status.Status)
        if code in STORED:
            return
        comment = str(status.get("ErrorComment", "")).strip()
        raise LungSQLError(f"{self.where} refused the report with C-STORE status 0x{code:04X}"
                           + (f": {comment}" if comment else ""), hint="see the PACS's log for why it refused")
