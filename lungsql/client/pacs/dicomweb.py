"""`lungsql pacs pull --url`: CT studies from a PACS's DICOMweb service into lungsql.scans.

QIDO-RS finds the studies (by StudyInstanceUID, PatientID or study date) and
their CT series; WADO-RS retrieves each series' instances, which go through
the same Upload as `lungsql ingest`: checked, de-identified when asked,
batched, recorded when bad, skipped when stored. A series whose instances are
all stored is not retrieved again, one partly stored is retrieved instance by
instance, so a killed pull's rerun fetches only what is missing.

dicomweb-client does the protocol; credentials come from the settings
(LUNGSQL_PACS_USER, LUNGSQL_PACS_PASSWORD), never from the command line, and
an https URL is checked against LUNGSQL_PACS_CA_BUNDLE when it is set.
"""

from __future__ import annotations

import datetime as dt
import io
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import sqlalchemy as sa

import config_preprocessing as config
from lungsql.client.ingest import IngestSummary, Upload, prefetch, site_deidentifier
from lungsql.client.pacs import instance_count, shown, valid_uid
from lungsql.errors import ConfigurationError, LungSQLError

# DICOM JSON (PS3.18 F.2) keys of the attributes a pull reads from QIDO-RS answers.
STUDY_UID, SERIES_UID, SOP_UID = "0020000D", "0020000E", "00080018"
MODALITY, INSTANCES_IN_SERIES = "00080060", "00201209"
#: Instances as the PACS stores them ("transfer-syntax=*"): no transcoding, the bytes a folder would hold.
AS_STORED = (("application/dicom", "*"),)


@dataclass(frozen=True)
class Query:
    """Which studies to pull; at least one of study, patient or since."""

    study: str | None = None
    patient: str | None = None
    since: dt.date | None = None
    modality: str = "CT"

    def study_filters(self) -> dict[str, str]:
        filters = {}
        if self.study:
            filters["StudyInstanceUID"] = self.study
        if self.patient:
            filters["PatientID"] = self.patient
        if self.since:
            filters["StudyDate"] = self.since.strftime("%Y%m%d") + "-"
        if not filters:
            raise LungSQLError("a pull needs --study, --patient or --since",
                               hint="name what to pull: lungsql pacs pull --patient ID (or --since 2026-01-01)")
        return filters


@dataclass(frozen=True)
class Series:
    study: str
    series: str
    instances: int | None  # as the PACS counts them, for the progress bar
    problem: str | None = None  # why the PACS's answer for it cannot be used: recorded, not retrieved


def client(url: str | None = None, attempts: int = 5):
    """A DICOMweb client of the PACS at url (else LUNGSQL_PACS_URL), with the settings' credentials.

    A request the PACS cannot serve yet (busy, timed out, unreachable) is tried `attempts` times,
    waiting 1, 2, 4... s in between."""
    import requests
    from dicomweb_client.api import DICOMwebClient

    url = url or config.get("LUNGSQL_PACS_URL")
    if not url:
        raise ConfigurationError("no PACS to pull from", hint="give --url http://HOST:8042/dicom-web "
                                                            "or set LUNGSQL_PACS_URL")
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigurationError(f"not a DICOMweb URL: {public_url(url)}",
                                 hint="give the service's root, such as http://HOST:8042/dicom-web")
    if parts.query or parts.fragment:
        raise ConfigurationError(f"the PACS URL has a query or fragment: {public_url(url)}?...",
                                 hint="give the DICOMweb root alone; put credentials in LUNGSQL_PACS_USER "
                                      "and LUNGSQL_PACS_PASSWORD")
    if parts.username or parts.password:
        raise ConfigurationError("the PACS URL holds a user name or password",
                                 hint="put them in LUNGSQL_PACS_USER and LUNGSQL_PACS_PASSWORD instead, "
                                      "where other users of this machine cannot read them")
    session = requests.Session()
    user, password = config.get("LUNGSQL_PACS_USER"), config.get("LUNGSQL_PACS_PASSWORD")
    if user:
        session.auth = (user, password or "")
    ca_bundle = config.get("LUNGSQL_PACS_CA_BUNDLE")
    if ca_bundle is not None:
        if not ca_bundle.is_file():
            raise ConfigurationError(f"LUNGSQL_PACS_CA_BUNDLE names no file: {ca_bundle}",
                                     hint="give the PEM file of the CA that signed the PACS's certificate")
        session.verify = str(ca_bundle)
    web = DICOMwebClient(url=url.rstrip("/"), session=session)
    web.set_http_retry_params(retry=attempts > 1, max_attempts=attempts)
    return web


def public_url(url: str) -> str:
    """The URL as it may be shown and recorded: no user name, password, query or fragment."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    if parts.port:
        host += f":{parts.port}"
    return urllib.parse.urlunsplit((parts.scheme, host, parts.path, "", ""))


def find_series(web, query: Query) -> list[Series]:
    """The series of the query's modality in the studies the query names (QIDO-RS)."""
    found = []
    for study in _search(web.search_for_studies, search_filters=query.study_filters()):
        study_uid = valid_uid(_value(study, STUDY_UID))
        if study_uid is None:
            found.append(Series("?", "?", None, f"the PACS answered a study whose StudyInstanceUID is not a UID: "
                                                f"{shown(_value(study, STUDY_UID))}"))
            continue
        for series in _search(web.search_for_series, study_uid, search_filters={"Modality": query.modality}):
            if _value(series, MODALITY) not in (None, query.modality):
                continue  # a PACS that ignores the filter
            series_uid = valid_uid(_value(series, SERIES_UID))
            problem = None if series_uid else ("the PACS answered a series whose SeriesInstanceUID is not a UID: "
                                               f"{shown(_value(series, SERIES_UID))}")
            found.append(Series(study_uid, series_uid or "?", instance_count(_value(series, INSTANCES_IN_SERIES)),
                                problem))
    return found


def pull(engine: sa.Engine, web, query: Query, *, deidentify: bool = False, allow_burned_in: bool = False,
         labels: dict[str, int] | None = None, labels_source: str = "",
         on_series: Callable[[Series], None] | None = None, on_instance: Callable[[int], None] | None = None,
         on_error: Callable[[str, str], None] | None = None, series: list[Series] | None = None) -> IngestSummary:
    """Store the query's series; `on_instance(bytes)` for each instance, `on_error(name, reason)` for each refused.

    `labels` (PatientID -> 0/1, as `ingest --labels` reads them) are loaded with the run."""
    series = find_series(web, query) if series is None else series
    deidentifier = site_deidentifier(allow_burned_in) if deidentify else None
    name = _namer(deidentifier)
    source = "dicomweb:" + public_url(web.base_url)
    upload = Upload(engine, source, deidentifier=deidentifier, labels=labels, labels_source=labels_source,
                    on_error=on_error)
    with upload:
        for one in series:
            if on_series:
                on_series(one)
            for label, data, reason in prefetch(_instances(web, one, upload, name), depth=2 * upload.batch_size):
                record, reason = upload.read(data) if reason is None else (None, reason)
                upload.offer(label, record, reason)
                if on_instance:
                    on_instance(len(data or b""))
    return upload.summary


def _instances(web, series: Series, upload: Upload, name: Callable[..., str]
               ) -> Iterator[tuple[str, bytes | None, str | None]]:
    """(recorded name, bytes, None) per instance of the series not yet stored, or (name, None, reason)."""
    if series.problem:
        yield name(series.study, series.series), None, series.problem
        return
    try:
        answers = [_value(i, SOP_UID) for i in _search(web.search_for_instances, series.study, series.series)]
    except LungSQLError as exc:
        yield name(series.study, series.series), None, exc.message
        return
    listed = [uid for uid in map(valid_uid, answers) if uid]
    for bad in (a for a in answers if not valid_uid(a)):
        yield (name(series.study, series.series), None,
               f"the PACS listed an instance whose SOPInstanceUID is not a UID: {shown(bad)}")
    missing = [uid for uid in listed if not upload.is_stored(uid)]
    if not missing:
        return
    seen: set[str] = set()
    if len(missing) == len(listed):  # nothing of it stored yet: one request for the whole series
        try:
            for ds in web.iter_series(series.study, series.series, media_types=AS_STORED):
                uid = str(ds.get("SOPInstanceUID", ""))
                seen.add(uid)
                yield name(series.study, series.series, uid), _encoded(ds), None
        except Exception as exc:  # the stream broke (or one part would not parse): go on one by one
            yield name(series.study, series.series), None, _reason("the series' retrieval stopped", exc)
    for uid in missing:
        if uid in seen:
            continue
        try:
            ds = web.retrieve_instance(series.study, series.series, uid, media_types=AS_STORED)
        except Exception as exc:
            yield name(series.study, series.series, uid), None, _reason("cannot retrieve the instance", exc)
            continue
        yield name(series.study, series.series, uid), _encoded(ds), None


def _encoded(ds) -> bytes:
    """The Part 10 bytes of a retrieved instance, written as they were read (pydicom keeps raw elements)."""
    import pydicom

    buffer = io.BytesIO()
    pydicom.dcmwrite(buffer, ds, enforce_file_format=False)
    return buffer.getvalue()


def _namer(deidentifier) -> Callable[..., str]:
    """How the run's records name an instance: its WADO-RS path, each UID pseudonymized under --deidentify."""
    keys = ("studies", "series", "instances")

    def name(*uids: str) -> str:
        parts = uids if deidentifier is None else [deidentifier.pseudonym(uid) for uid in uids]
        return "/".join(f"{key}/{uid}" for key, uid in zip(keys, parts))

    return name


def _search(method, *args, **kwargs) -> list[dict]:
    import requests

    try:
        return method(*args, **kwargs)
    except requests.HTTPError as exc:
        status = exc.response.status_code if exc.response is not None else "?"
        hint = ("check LUNGSQL_PACS_USER and LUNGSQL_PACS_PASSWORD" if status in (401, 403)
                else "check the URL: it is the DICOMweb root, such as http://HOST:8042/dicom-web")
        raise LungSQLError(f"the PACS answered HTTP {status} to a search", hint=hint) from None
    except requests.exceptions.SSLError as exc:
        raise LungSQLError(f"the PACS's certificate is not trusted: {_first_line(exc)}",
                           hint="set LUNGSQL_PACS_CA_BUNDLE to the PEM file of its CA") from None
    except requests.ConnectionError as exc:
        raise LungSQLError(f"cannot reach the PACS: {_first_line(exc)}",
                           hint="check the URL, and that this machine may connect to it") from None


def _value(item, tag: str):
    """The first value of a DICOM JSON attribute (PS3.18 F.2), or None when the answer holds none."""
    element = item.get(tag) if isinstance(item, dict) else None
    values = element.get("Value") if isinstance(element, dict) else None
    return values[0] if isinstance(values, list) and values else None



def _reason(what: str, exc: Exception) -> str:
    return f"{what}: {type(exc).__name__}: {_first_line(exc)}"[:300]


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else ""
