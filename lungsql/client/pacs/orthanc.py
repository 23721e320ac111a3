"""A local Orthanc PACS, started on loopback for the tests and the demo.

`LocalOrthanc(home)` runs the Debian package's Orthanc with the DICOMweb plugin,
everything it keeps under `home`:

    orthanc.json   the configuration, written at every start
    orthanc.log    what Orthanc prints (its log goes to stderr)
    storage/       the DICOM files and the SQLite index

It answers HTTP (REST API, DICOMweb under /dicom-web/) to 127.0.0.1 only and
DICOM (DIMSE) on a second port, each chosen free at start. Orthanc 1.10 has
no setting for the address its DICOM service binds to, so that port is open on
every interface: it accepts C-ECHO and C-STORE from anyone addressing its AET,
and C-FIND, C-GET and C-MOVE only from the modalities it knows (`modalities=`
or `add_modality`), checked by AET and IP address. Register lungsql's own
DICOM listener as host "127.0.0.1" to query, retrieve or be a C-MOVE
destination from loopback.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import requests

from lungsql.errors import ConfigurationError, LungSQLError

BINARY = Path("/usr/sbin/Orthanc")
PLUGIN_FOLDERS = (Path("/usr/share/orthanc/plugins"), Path("/usr/lib/orthanc"))
INSTALL_HINT = "install Orthanc and its DICOMweb plugin: apt-get install orthanc orthanc-dicomweb"
START_TIMEOUT = 20.0
STOP_TIMEOUT = 10.0


def find_orthanc() -> Path:
    """The Orthanc binary (on PATH, else the Debian package's /usr/sbin/Orthanc)."""
    found = shutil.which("Orthanc")
    if found:
        return Path(found)
    if BINARY.is_file():
        return BINARY
    raise ConfigurationError("Orthanc is not installed (no Orthanc on PATH nor /usr/sbin/Orthanc)",
                             hint=INSTALL_HINT)


def find_dicomweb_plugin() -> Path:
    """The shared library of Orthanc's DICOMweb plugin (package orthanc-dicomweb)."""
    for folder in PLUGIN_FOLDERS:
        found = sorted(folder.glob("libOrthancDicomWeb.so*"))
        if found:
            return found[0]
    raise ConfigurationError(
        f"Orthanc's DICOMweb plugin is not installed (no libOrthancDicomWeb.so in "
        f"{' or '.join(map(str, PLUGIN_FOLDERS))})", hint=INSTALL_HINT)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class LocalOrthanc:
    """One Orthanc process under `home`; `modalities` maps a name to (AET, host, port) of a DICOM
    node it may send to and answer queries from; `credentials` (user, password) turn on HTTP basic
    authentication."""

    def __init__(self, home: Path, aet: str = "ORTHANC",
                 modalities: dict[str, tuple[str, str, int]] | None = None,
                 credentials: tuple[str, str] | None = None):
        self.home = Path(home)
        self._aet = aet
        self.modalities = dict(modalities or {})
        self.credentials = credentials
        self._process: subprocess.Popen | None = None
        self._http_port: int | None = None
        self._dicom_port: int | None = None

    # -- where it answers -------------------------------------------------------------------------

    @property
    def aet(self) -> str:
        """Orthanc's own application entity title, the called AET of DIMSE requests."""
        return self._aet

    @property
    def url(self) -> str:
        """The REST API, e.g. http://127.0.0.1:8042."""
        return f"http://127.0.0.1:{self._ports()[0]}"

    @property
    def dicomweb_url(self) -> str:
        """The DICOMweb root (QIDO-RS, WADO-RS, STOW-RS)."""
        return self.url + "/dicom-web"

    @property
    def dicom_port(self) -> int:
        """The TCP port of Orthanc's DICOM (DIMSE) service on 127.0.0.1."""
        return self._ports()[1]

    @property
    def config_file(self) -> Path:
        """The configuration Orthanc runs with, rewritten at every start."""
        return self.home / "orthanc.json"

    @property
    def log_file(self) -> Path:
        """Orthanc's output, appended to at every start."""
        return self.home / "orthanc.log"

    def _ports(self) -> tuple[int, int]:
        if self._http_port is None or self._dicom_port is None:
            raise ConfigurationError("this Orthanc has not been started", hint="call start() first")
        return self._http_port, self._dicom_port

    # -- life cycle -------------------------------------------------------------------------------

    def config(self) -> dict[str, Any]:
        """Orthanc's configuration for the ports chosen at start."""
        http_port, dicom_port = self._ports()
        storage = self.home / "storage"
        users = {self.credentials[0]: self.credentials[1]} if self.credentials else {}
        return {
            "Name": f"lungsql {self._aet}",
            "HttpPort": http_port,
            "DicomPort": dicom_port,
            "DicomAet": self._aet,
            "RemoteAccessAllowed": False,          # HTTP on loopback only
            "AuthenticationEnabled": bool(users),
            "RegisteredUsers": users,
            "StorageDirectory": str(storage),
            "IndexDirectory": str(storage),
            "Plugins": [str(find_dicomweb_plugin())],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": True, "Ssl": False},
            "DicomModalities": {name: [aet, host, port] for name, (aet, host, port) in self.modalities.items()},
            "DicomModalitiesInDatabase": False,    # add_modality's entries: in memory, and in the next start's file
            "DicomCheckCalledAet": True,           # refuse associations addressed to another AET
            "DicomCheckModalityHost": True,        # known modalities are recognised by AET and address
            "DicomAlwaysAllowEcho": True,
            "DicomAlwaysAllowStore": True,
            "DicomAlwaysAllowFind": False,         # queries and retrieves from known modalities only
            "DicomAlwaysAllowGet": False,
            "DicomAlwaysAllowMove": False,
            "SynchronousCMove": True,              # C-MOVE answers once every sub-operation is done
            "DicomScpTimeout": 30,
            "DicomScuTimeout": 10,
            "StableAge": 2,                        # a study is "stable" 2 s after its last instance
            "SaveJobs": False,                     # no half-done jobs resumed at the next start
            "HttpDescribeErrors": True,            # error answers say why (LungSQLError shows them)
        }

    def start(self) -> LocalOrthanc:
        """Write the configuration, start Orthanc and wait until its REST API answers."""
        if self._process is not None and self._process.poll() is None:
            return self
        binary = find_orthanc()
        self.home.mkdir(parents=True, exist_ok=True)
        self._http_port, self._dicom_port = _free_port(), _free_port()
        while self._dicom_port == self._http_port:
            self._dicom_port = _free_port()
        self.config_file.write_text(json.dumps(self.config(), indent=2) + "\n")
        with self.log_file.open("ab") as log:
            self._process = subprocess.Popen([str(binary), str(self.config_file)], cwd=self.home,
                                             stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline and self._process.poll() is None:
            try:
                if requests.get(self.url + "/system", auth=self.credentials, timeout=2).ok:
                    return self
            except requests.ConnectionError:
                pass
            time.sleep(0.1)
        exited = self._process.poll()
        self.stop()
        state = f"exited with status {exited}" if exited is not None else f"did not answer in {START_TIMEOUT:g} s"
        raise ConfigurationError(f"Orthanc {state}: {self._last_lines()}",
                                 hint=f"see {self.log_file} and {self.config_file}")

    def stop(self) -> None:
        """Stop Orthanc (SIGTERM, then SIGKILL after a timeout); nothing happens if it is not running."""
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def __enter__(self) -> LocalOrthanc:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _last_lines(self, n: int = 8) -> str:
        try:
            lines = self.log_file.read_text(errors="replace").strip().splitlines()[-n:]
        except OSError:
            lines = []
        return " | ".join(lines) or "(empty log)"

    # -- REST API ---------------------------------------------------------------------------------

    def request(self, method: str, path: str, **kwargs: Any) -> Any:
        """Call the REST API (`path` like "/patients") and return its JSON answer (None if empty);
        an answer other than 2xx raises LungSQLError with Orthanc's explanation."""
        kwargs.setdefault("timeout", 30)
        response = requests.request(method, self.url + path, auth=self.credentials, **kwargs)
        if not response.ok:
            raise LungSQLError(f"Orthanc answered {response.status_code} to {method} {path}: "
                               f"{response.text.strip()[:500]}", hint=f"see {self.log_file}")
        return response.json() if response.content else None

    def add_modality(self, name: str, aet: str, host: str, port: int) -> None:
        """Make a DICOM node known to the running Orthanc (e.g. a listener whose port was chosen
        after start): it may then query and retrieve, and be a C-MOVE destination."""
        self.request("PUT", f"/modalities/{name}", json={"AET": aet, "Host": host, "Port": port})
        self.modalities[name] = (aet, host, port)

    def upload(self, data: bytes) -> str:
        """Store one DICOM Part 10 file; return Orthanc's id of the instance (also when already stored)."""
        answer = self.request("POST", "/instances", data=data,
                              headers={"Content-Type": "application/dicom"})
        return answer["ID"]

    def instance_count(self) -> int:
        """How many instances Orthanc holds."""
        return int(self.request("GET", "/statistics")["CountInstances"])
