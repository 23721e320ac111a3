"""`lungsql pacs pull --dimse HOST:PORT`: CT studies from a PACS without DICOMweb.

C-FIND (Study Root) finds the query's studies, their CT series and each
series' instances; C-GET retrieves what is not stored yet on the same
association, or with `move` C-MOVE sends it to lungsql's own listener, which
this process runs for the pull (the PACS must know lungsql's AE title, host
and port as a DICOM node). Either way the instances go through the Upload of
`lungsql ingest`; a series stored whole is not retrieved again, one stored in
part is retrieved instance by instance.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import sqlalchemy as sa

import config_preprocessing as config
from lungsql.client.ingest import IngestSummary, Upload, site_deidentifier
from lungsql.client.pacs import instance_count, shown, valid_uid
from lungsql.client.pacs.dicomweb import Query, Series
from lungsql.client.pacs.listener import Listener, StoreHandler, storage_classes
from lungsql.errors import ConfigurationError, LungSQLError

PENDING = (0xFF00, 0xFF01)


@dataclass(frozen=True)
class Peer:
    """A PACS's DICOM service: where it listens and the AE title it answers to."""

    host: str
    port: int
    aet: str

    @classmethod
    def parse(cls, address: str, aet: str) -> Peer:
        host, _, port = address.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ConfigurationError(f"not HOST:PORT: {address!r}", hint="e.g. --dimse pacs.example.org:4242")
        return cls(host.strip("[]"), int(port), config.SETTINGS["LUNGSQL_AET"].parse(aet))


class Association:
    """One association with the PACS, for C-FIND and C-GET (storage contexts in the SCP role)."""

    def __init__(self, peer: Peer, handler: StoreHandler | None = None, aet: str | None = None):
        from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, build_role, evt
        from pynetdicom.sop_class import (StudyRootQueryRetrieveInformationModelFind,
                                          StudyRootQueryRetrieveInformationModelGet,
                                          StudyRootQueryRetrieveInformationModelMove)

        ae = AE(ae_title=aet or config.get("LUNGSQL_AET"))
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
        ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
        ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
        ae.add_requested_context(StudyRootQueryRetrieveInformationModelMove)
        roles = []
        for sop_class in storage_classes():
            ae.add_requested_context(sop_class, ALL_TRANSFER_SYNTAXES[:16])
            roles.append(build_role(sop_class, scp_role=True))
        handlers = [(evt.EVT_C_STORE, handler)] if handler else []
        self.peer = peer
        self.assoc = ae.associate(peer.host, peer.port, ae_title=peer.aet, ext_neg=roles, evt_handlers=handlers)
        if not self.assoc.is_established:
            raise LungSQLError(f"the PACS at {peer.host}:{peer.port} (AE title {peer.aet}) refused or did not "
                               "answer an association",
                               hint="check HOST:PORT and --called-aet, and that the PACS knows lungsql's AE "
                                    f"title {ae.ae_title} (LUNGSQL_AET) and this machine's address")

    def find(self, level: str, **keys) -> list:
        from pydicom import Dataset
        from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind

        query = Dataset()
        query.QueryRetrieveLevel = level
        for keyword, value in keys.items():
            setattr(query, keyword, value)
        answers = []
        for status, identifier in self.assoc.send_c_find(query, StudyRootQueryRetrieveInformationModelFind):
            self._check(status, "C-FIND")
            if status.Status in PENDING and identifier is not None:
                answers.append(identifier)
        return answers

    def get(self, level: str, **keys) -> None:
        from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelGet

        for status, _ in self.assoc.send_c_get(_identifier(level, keys), StudyRootQueryRetrieveInformationModelGet):
            self._check(status, "C-GET")

    def move(self, destination: str, level: str, **keys) -> None:
        from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelMove

        for status, _ in self.assoc.send_c_move(_identifier(level, keys), destination,
                                                StudyRootQueryRetrieveInformationModelMove):
            self._check(status, "C-MOVE")

    def _check(self, status, what: str) -> None:
        if not status or "Status" not in status:
            raise LungSQLError(f"the PACS ended the {what} without an answer (the association was aborted)",
                               hint="the PACS may not allow lungsql's AE title to query or retrieve: "
                                    "add it to the PACS's DICOM nodes")
        code = status.Status
        if code in PENDING or code == 0x0000 or code == 0xB000:  # B000: done, some sub-operations failed
            return
        comment = str(status.get("ErrorComment", "")).strip()
        raise LungSQLError(f"the PACS answered the {what} with status 0x{code:04X}" + (f": {comment}" if comment
                                                                                         else ""),
                           hint="see the PACS's log for why it refused")

    def release(self) -> None:
        if self.assoc.is_established:
            self.assoc.release()


def _identifier(level: str, keys: dict):
    from pydicom import Dataset

    identifier = Dataset()
    identifier.QueryRetrieveLevel = level
    for keyword, value in keys.items():
        setattr(identifier, keyword, value)
    return identifier


def find_series(assoc: Association, query: Query) -> list[Series]:
    """The query's series of its modality (C-FIND at the STUDY, then SERIES level)."""
    filters = query.study_filters()
    keys = {"StudyInstanceUID": filters.get("StudyInstanceUID", ""), "PatientID": filters.get("PatientID", ""),
            "StudyDate": filters.get("StudyDate", "")}
    found = []
    for study in assoc.find("STUDY", **keys):
        uid = valid_uid(study.get("StudyInstanceUID"))
        if uid is None:
            found.append(Series("?", "?", None, "the PACS answered a study whose StudyInstanceUID is not a UID: "
                                                f"{shown(study.get('StudyInstanceUID'))}"))
            continue
        for series in assoc.find("SERIES", StudyInstanceUID=uid, SeriesInstanceUID="", Modality=query.modality,
                                 NumberOfSeriesRelatedInstances=""):
            if str(series.get("Modality", query.modality)) != query.modality:
                continue  # a PACS that ignores the filter
            series_uid = valid_uid(series.get("SeriesInstanceUID"))
            problem = None if series_uid else ("the PACS answered a series whose SeriesInstanceUID is not a UID: "
                                               f"{shown(series.get('SeriesInstanceUID'))}")
            found.append(Series(uid, series_uid or "?", instance_count(series.get("NumberOfSeriesRelatedInstances")),
                                problem))
    return found


def pull(engine: sa.Engine, peer: Peer, query: Query, *, move_port: int | None = None, deidentify: bool = False,
         allow_burned_in: bool = False, labels: dict[str, int] | None = None, labels_source: str = "",
         on_series: Callable[[Series], None] | None = None, on_instance: Callable[[int], None] | None = None,
         on_error: Callable[[str, str], None] | None = None) -> IngestSummary:
    """Store the query's series by C-GET, or by C-MOVE to a listener on `move_port` when it is given."""
    deidentifier = site_deidentifier(allow_burned_in) if deidentify else None
    upload = Upload(engine, f"dimse:{peer.aet}@{peer.host}:{peer.port}", deidentifier=deidentifier,
                    labels=labels, labels_source=labels_source, on_error=on_error)
    name = deidentifier.pseudonym if deidentifier else None

    def counted(received) -> None:
        if on_instance:
            on_instance(1)

    with upload:
        handler = StoreHandler(upload, batched=True, name=name, on_received=counted)
        listener = None
        if move_port is not None:
            listener = Listener(engine, move_port, allowed=[peer.aet], on_received=counted, upload=upload,
                                deidentify=False).start()
            handler = None
        assoc = Association(peer, handler)
        try:
            for series in find_series(assoc, query):
                if series.problem:  # recorded; nothing of it is retrieved
                    upload.offer(f"dimse:{peer.aet}/series/{series.series}", None, series.problem)
                    continue
                if on_series:
                    on_series(series)
                for level, keys in _retrievals(assoc, series, upload):
                    if listener is not None:
                        assoc.move(listener.aet, level, **keys)
                    else:
                        assoc.get(level, **keys)
        finally:
            assoc.release()
            if listener is not None:
                listener.stop()
    return upload.summary


def _retrievals(assoc: Association, series: Series, upload: Upload) -> Iterator[tuple[str, dict]]:
    """What to ask for: the whole series when none of it is stored, else each missing instance."""
    answers = assoc.find("IMAGE", StudyInstanceUID=series.study, SeriesInstanceUID=series.series, SOPInstanceUID="")
    listed = [uid for uid in (valid_uid(i.get("SOPInstanceUID")) for i in answers) if uid]
    missing = [uid for uid in listed if not upload.is_stored(uid)]
    if missing and len(missing) == len(listed):
        yield "SERIES", {"StudyInstanceUID": series.study, "SeriesInstanceUID": series.series}
        return
    for uid in missing:
        yield "IMAGE", {"StudyInstanceUID": series.study, "SeriesInstanceUID": series.series, "SOPInstanceUID": uid}
