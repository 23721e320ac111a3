"""`lungsql listen`: a DICOM C-STORE SCP that stores what a PACS or a modality pushes.

Each instance goes through the same Upload as `lungsql ingest` and is
acknowledged only once its transaction has committed: a sender that got
"success" has its instance in lungsql.scans, and a listener killed at any
moment loses nothing a sender thinks was delivered (the sender resends what
was not acknowledged; what is stored already is skipped). An instance lungsql
cannot use is recorded in lungsql.ingest_errors and refused with status
0xC000 and the reason; a database that cannot be reached gives 0xA700 (out of
resources), which senders retry later.

Only the calling AE titles named in LUNGSQL_LISTEN_ALLOWED_AETS (or --allow)
may associate; every association is logged with its peer's title and address.
SIGTERM stops accepting associations, lets those open finish (up to
`drain_seconds`), records the run as finished and exits.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import sqlalchemy as sa

import config_preprocessing as config
from lungsql.client.ingest import Upload, site_deidentifier
from lungsql.errors import ConfigurationError

log = logging.getLogger("lungsql.listener")

#: Status codes of a C-STORE response (PS3.4 GG.4, PS3.7 C.4.2).
SUCCESS, OUT_OF_RESOURCES, CANNOT_UNDERSTAND = 0x0000, 0xA700, 0xC000


def storage_classes() -> list[str]:
    """The SOP classes lungsql stores: CT images, classic and enhanced."""
    from pynetdicom.sop_class import CTImageStorage, EnhancedCTImageStorage, LegacyConvertedEnhancedCTImageStorage

    return [CTImageStorage, EnhancedCTImageStorage, LegacyConvertedEnhancedCTImageStorage]


@dataclass
class Received:
    """What one C-STORE came to: 'stored', 'skipped' or 'rejected', with the reason of a rejection."""

    sop_instance_uid: str
    calling_aet: str
    outcome: str
    reason: str | None = None


class StoreHandler:
    """Stores each C-STORE's dataset through one Upload, one commit per instance unless `batched`.

    Associations run in threads of their own; the lock keeps the Upload to one at a time. With
    `batched` (a C-GET this process asked for, whose rerun fetches again whatever a crash lost),
    instances are committed every batch and at the end instead."""

    def __init__(self, upload: Upload, batched: bool = False,
                 on_received: Callable[[Received], None] | None = None, name: Callable[[str], str] | None = None):
        self.upload = upload
        self.batched = batched
        self.on_received = on_received
        self.name = name or (lambda uid: uid)
        self.lock = threading.Lock()
        self.closed = False  # set by the listener's stop: refuse, the sender will send again

    def __call__(self, event):
        from pydicom import Dataset

        calling = _title(event.assoc.requestor.ae_title)
        uid = str(getattr(event.request, "AffectedSOPInstanceUID", "") or "")
        label = f"dimse:{calling}/{self.name(uid) if uid else '(no SOPInstanceUID)'}"
        try:
            data = event.encoded_dataset(include_meta=True)
            with self.lock:
                if self.closed:
                    raise sa.exc.DisconnectionError("the listener is stopping")
                record, reason = self.upload.read(data)
                outcome = self.upload.offer(label, record, reason)
                if outcome == "stored" and not self.batched:
                    refused = self.upload.commit()
                    if uid in refused or (record is not None and record.sop_instance_uid in refused):
                        outcome, reason = "rejected", refused.get(uid) or refused.get(record.sop_instance_uid)
        except sa.exc.SQLAlchemyError as exc:  # the database, not the instance: the sender may retry
            log.error("cannot store %s from %s: %s", uid, calling, (str(exc).splitlines() or [""])[0])
            status = Dataset()
            status.Status = OUT_OF_RESOURCES
            status.ErrorComment = "lungsql cannot reach its database; send again later"
            return status
        received = Received(uid, calling, outcome, reason)
        if self.on_received:
            self.on_received(received)
        if outcome == "rejected":
            log.warning("refused %s from %s: %s", uid, calling, reason)
            status = Dataset()
            status.Status = CANNOT_UNDERSTAND
            status.ErrorComment = (reason or "refused")[:64]  # LO: at most 64 characters
            return status
        return SUCCESS


class Listener:
    """The C-STORE SCP. `start()` returns once it listens; `stop()` drains and closes the run."""

    def __init__(self, engine: sa.Engine, port: int, *, aet: str | None = None, host: str = "0.0.0.0",
                 allowed: Sequence[str] | None = None, deidentify: bool = False, allow_burned_in: bool = False,
                 on_received: Callable[[Received], None] | None = None, drain_seconds: float = 30.0,
                 upload: Upload | None = None):
        """`upload`: store into that open Upload (a C-MOVE pull's) instead of a run of the listener's own."""
        self.engine = engine
        self.aet = aet or config.get("LUNGSQL_AET")
        self.host, self.port = host, port
        self.allowed = tuple(allowed if allowed is not None else config.get("LUNGSQL_LISTEN_ALLOWED_AETS"))
        if not self.allowed:
            raise ConfigurationError("the listener would accept no sender: no calling AE title is allowed",
                                     hint="name the PACS or modalities that may send, e.g. --allow ORTHANC "
                                          "or LUNGSQL_LISTEN_ALLOWED_AETS=ORTHANC,CT1")
        self.deidentifier = site_deidentifier(allow_burned_in) if deidentify else None
        self.on_received = on_received
        self.drain_seconds = drain_seconds
        self._server = None
        self._own_upload = upload is None
        self._summary = None
        self._upload: Upload | None = upload

    @property
    def summary(self):
        """The run's counters (IngestSummary), also once stopped."""
        return self._upload.summary if self._upload else self._summary

    def start(self) -> Listener:
        from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, evt
        from pynetdicom.sop_class import Verification

        if self._own_upload:
            source = f"dimse-listener:{self.aet}@{self.host}:{self.port}"
            self._upload = Upload(self.engine, source, deidentifier=self.deidentifier).__enter__()
        deidentifier = self._upload.deidentifier
        pseudonym = deidentifier.pseudonym if deidentifier else None
        handler = self._handler = StoreHandler(self._upload, on_received=self.on_received, name=pseudonym)
        ae = AE(ae_title=self.aet)
        ae.require_calling_aet = list(self.allowed)
        ae.add_supported_context(Verification)
        for sop_class in storage_classes():
            ae.add_supported_context(sop_class, ALL_TRANSFER_SYNTAXES)
        handlers = [(evt.EVT_C_STORE, handler), (evt.EVT_ACCEPTED, _logged("accepted")),
                    (evt.EVT_REJECTED, _logged("rejected")), (evt.EVT_RELEASED, _logged("released")),
                    (evt.EVT_ABORTED, _logged("aborted"))]
        try:
            self._server = ae.start_server((self.host, self.port), block=False, evt_handlers=handlers)
        except OSError as exc:
            self._close_upload()
            raise ConfigurationError(f"cannot listen on {self.host}:{self.port}: {exc.strerror or exc}",
                                     hint="choose a free port with --port (ports under 1024 need root)") from None
        self.port = self._server.server_address[1]
        log.info("listening as %s on %s:%d for %s", self.aet, self.host, self.port, ", ".join(self.allowed))
        return self

    def stop(self) -> None:
        """Stop accepting, let open associations finish (at most drain_seconds), close the run."""
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()  # no new associations; the open ones go on in their threads
        deadline = time.monotonic() + self.drain_seconds
        while any(a.is_established for a in server.active_associations) and time.monotonic() < deadline:
            time.sleep(0.05)
        with self._handler.lock:  # an association still open past the deadline stores nothing more
            self._handler.closed = True
            summary = self._close_upload()
        log.info("stopped: %s", summary.describe())

    def _close_upload(self):
        upload = self._upload
        if self._own_upload:
            self._upload, self._summary = None, upload.summary
            upload.__exit__(None, None, None)
        return upload.summary

    def __enter__(self) -> Listener:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()


def _title(value) -> str:
    return (value.decode("ascii", "replace") if isinstance(value, bytes) else str(value)).strip()


def _logged(what: str):
    def handle(event) -> None:
        peer = event.assoc.requestor
        log.info("association %s: %s from %s:%s", what, _title(peer.ae_title), peer.address, peer.port)

    return handle
