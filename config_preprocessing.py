"""The settings of lungsql, each declared once with its default and its help.

Every setting is read from the environment variable of the same name, so a
site changes lungsql without editing code::

    LUNGSQL_DATABASE_URL=postgresql+psycopg://lungsql@db.example.org/pacs lungsql ingest /data/dsb

`lungsql settings` prints them with their current values; the README's table of
settings is generated from this module, and the test suite checks that every
LUNGSQL_ variable the code names is declared here. A bad value is a
ConfigurationError naming the variable and what it expects.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

PROJECT_ROOT = Path(__file__).resolve().parent
#: A checkout keeps its cluster and data beside the code; an installed lungsql keeps them in the
#: user's home, or under /var/lib for root (whose home the server's OS user cannot enter).
IN_CHECKOUT = (PROJECT_ROOT / "pyproject.toml").is_file()
_STATE = (PROJECT_ROOT if IN_CHECKOUT else
          Path("/var/lib/lungsql") if hasattr(os, "geteuid") and os.geteuid() == 0 else Path.home() / ".lungsql")


def sql_dir() -> Path:
    """The SQL files: packaged with an installed lungsql (lungsql/sql), else the checkout's sql/."""
    import lungsql

    packaged = Path(lungsql.__file__).resolve().parent / "sql"
    return packaged if packaged.is_dir() else PROJECT_ROOT / "sql"


@dataclass(frozen=True)
class Setting:
    name: str
    default: Any
    help: str
    parse: Callable[[str], Any] = str
    secret: bool = False  # `lungsql settings` shows it masked

    def value(self) -> Any:
        raw = os.environ.get(self.name)
        if raw is None or raw == "":
            return self.default
        try:
            return self.parse(raw)
        except ValueError as exc:
            from lungsql.errors import ConfigurationError

            shown = "(hidden)" if self.secret else repr(raw)
            raise ConfigurationError(f"the setting {self.name}={shown} is not valid: {exc}",
                                     hint=f"{self.help} Unset it for the default.") from None


def _hu_window(text: str) -> tuple[float, float]:
    low, _, high = text.partition(":")
    lo, hi = float(low), float(high)
    if not lo < hi:
        raise ValueError("expected LOW:HIGH in Hounsfield units with LOW < HIGH, e.g. -1000:400")
    return lo, hi


def _optional_path(text: str) -> Path:
    return Path(text).expanduser()


def _flag(text: str) -> bool:
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ValueError("expected 1/0, true/false, yes/no or on/off")


def _regex(text: str) -> str:
    import re

    try:
        re.compile(text)
    except re.error as exc:
        raise ValueError(f"not a regular expression: {exc}") from None
    return text


def _degrees(text: str) -> float:
    value = float(text)
    if not 0 <= value <= 90:
        raise ValueError("expected degrees from 0 to 90")
    return value


def _ae_title(text: str) -> str:
    title = text.strip()
    if not 0 < len(title) <= 16 or not title.isascii() or not title.isprintable() or "\\" in title:
        raise ValueError("expected an AE title: 1 to 16 printable ASCII characters, no backslash")
    return title


def _ae_titles(text: str) -> tuple[str, ...]:
    return tuple(_ae_title(part) for part in text.split(",") if part.strip())


def _positive_int(text: str) -> int:
    number = int(text)
    if number <= 0:
        raise ValueError("expected a positive integer")
    return number


SETTINGS: dict[str, Setting] = {
    s.name: s
    for s in (
        Setting(
            "LUNGSQL_DATABASE_URL",
            None,
            "SQLAlchemy URL of the database to use (postgresql+psycopg://...); "
            "unset means the local cluster managed by `lungsql db`.",
        ),
        Setting(
            "LUNGSQL_WEB_DATABASE_URL",
            None,
            "SQLAlchemy URL the web app connects with, as the least-privileged role lungsql_web; "
            "unset means that role on the local cluster.",
        ),
        Setting(
            "LUNGSQL_SECRET_KEY",
            None,
            "Key that signs the web app's session cookies; unset means a key generated once into "
            "$LUNGSQL_HOME/flask.key.",
            secret=True,
        ),
        Setting(
            "LUNGSQL_SECURE_COOKIES",
            False,
            "Send the web app's session cookie over https only; set it when the app is served through https.",
            _flag,
        ),
        Setting(
            "LUNGSQL_HOME",
            _STATE / ".lungsql" if IN_CHECKOUT else _STATE,
            "Folder of the local PostgreSQL cluster, its logs and the site's secrets (in a checkout, "
            ".lungsql/ beside the code; installed, ~/.lungsql, or /var/lib/lungsql for root).",
            Path,
        ),
        Setting(
            "LUNGSQL_DB_NAME",
            "lungsql",
            "Name of the database created in the local cluster.",
        ),
        Setting(
            "LUNGSQL_DB_OS_USER",
            "postgres",
            "Unprivileged OS user that runs the local server when lungsql is invoked as root.",
        ),
        Setting(
            "LUNGSQL_WEB_OS_USER",
            "lungsql-web",
            "Unprivileged OS user that `lungsql serve` switches to when it is started as root.",
        ),
        Setting(
            "LUNGSQL_PG_BINDIR",
            Path("/usr/lib/postgresql/15/bin"),
            "Folder holding initdb, pg_ctl and postgres of PostgreSQL 15.",
            Path,
        ),
        Setting(
            "LUNGSQL_DATA_PATH",
            _STATE / "data",
            "Folder where `lungsql demo` writes its synthetic cohort.",
            Path,
        ),
        Setting(
            "LUNGSQL_DEID_KEY",
            None,
            "Site secret for pseudonymous PatientIDs and UIDs under --deidentify; "
            "unset means a key generated once into $LUNGSQL_HOME/deidentify.key.",
            secret=True,
        ),
        Setting(
            "LUNGSQL_SERIES_PREFER",
            "",
            "Regular expression (case-insensitive) that puts series whose SeriesDescription or "
            "ConvolutionKernel matches it first when a patient's series is chosen, e.g. LUNG|B70f; "
            "empty means no preference (lungsql.dicom.series gives the rule).",
            _regex,
        ),
        Setting(
            "LUNGSQL_SERIES_MAX_TILT",
            2.0,
            "Degrees the slice normal of a featurized series may tilt from the patient's z axis; "
            "series tilted more (gantry tilt, coronal and sagittal reformats) are not featurized as a volume.",
            _degrees,
        ),
        Setting(
            "LUNGSQL_SERIES_MIN_SLICES",
            3,
            "The fewest slices a series needs to be featurized as a patient's volume.",
            _positive_int,
        ),
        Setting(
            "LUNGSQL_PACS_URL",
            None,
            "DICOMweb root of the PACS that `lungsql pacs pull` and `push-results` use when --url is not given "
            "(for Orthanc, http://HOST:8042/dicom-web). Put no password in it: see LUNGSQL_PACS_USER.",
        ),
        Setting(
            "LUNGSQL_PACS_USER",
            None,
            "User name for the PACS's DICOMweb service (HTTP basic authentication); unset means none.",
        ),
        Setting(
            "LUNGSQL_PACS_PASSWORD",
            None,
            "Password of LUNGSQL_PACS_USER. Kept out of the command line, where other users could read it.",
            secret=True,
        ),
        Setting(
            "LUNGSQL_PACS_CA_BUNDLE",
            None,
            "CA certificates (a PEM file) that the PACS's https certificate must chain to; unset means the "
            "system's.",
            _optional_path,
        ),
        Setting(
            "LUNGSQL_AET",
            "LUNGSQL",
            "lungsql's own DICOM application entity title: the listener's, and the calling one of DIMSE pulls.",
            _ae_title,
        ),
        Setting(
            "LUNGSQL_LISTEN_ALLOWED_AETS",
            (),
            "Calling AE titles the listener accepts, comma-separated (for example ORTHANC,PACS1); "
            "unset means it accepts none and says so.",
            _ae_titles,
        ),
        Setting(
            "LUNGSQL_INGEST_BATCH",
            64,
            "DICOM files written per transaction by `lungsql ingest`.",
            _positive_int,
        ),
        Setting(
            "LUNGSQL_MAX_ROWS",
            8192,
            "Largest Rows (image height) of a DICOM file that is decoded; checked from the header first.",
            _positive_int,
        ),
        Setting(
            "LUNGSQL_MAX_COLUMNS",
            8192,
            "Largest Columns (image width) of a DICOM file that is decoded; checked from the header first.",
            _positive_int,
        ),
        Setting(
            "LUNGSQL_MAX_FRAMES",
            4096,
            "Largest NumberOfFrames of a DICOM file that is decoded (an Enhanced CT series is one file).",
            _positive_int,
        ),
        Setting(
            "LUNGSQL_MAX_DECODED_BYTES",
            1 << 30,
            "Largest size in bytes of one file's decoded pixels, and of a Deflated file once inflated; "
            "larger files are recorded and skipped before anything is decoded.",
            _positive_int,
        ),
        Setting(
            "LUNGSQL_IMAGE_SIZE",
            224,
            "Side in pixels of the square image given to the CNN.",
            _positive_int,
        ),
        Setting(
            "LUNGSQL_HU_WINDOW",
            (-1000.0, 400.0),
            "Lung window LOW:HIGH in Hounsfield units, mapped to 0-255 before the CNN.",
            _hu_window,
        ),
        Setting(
            "LUNGSQL_BATCH_SIZE",
            32,
            "Images per CNN inference batch.",
            _positive_int,
        ),
        Setting(
            "LUNGSQL_CACHE_DIR",
            None,
            "Folder where the built-in CNN's ONNX export is cached; unset means $XDG_CACHE_HOME/lungsql "
            "or ~/.cache/lungsql.",
            _optional_path,
        ),
        Setting(
            "LUNGSQL_WEB_SESSION_HOURS",
            8,
            "Hours a sign-in to the web app lasts (its session cookie and its forms).",
            _positive_int,
        ),
        Setting(
            "LUNGSQL_WEB_SEARCH_LIMIT",
            50,
            "Patients the web app lists at most for one search.",
            _positive_int,
        ),
        Setting(
            "LUNGSQL_WEB_SLICE_CACHE_MB",
            64,
            "Megabytes of rendered slice images each web server process keeps in memory.",
            _positive_int,
        ),
        Setting(
            "LUNGSQL_WEB_SLICE_MAX_AGE_S",
            600,
            "Seconds a browser may show a cached slice image before it asks again (ETag).",
            _positive_int,
        ),
        Setting(
            "LUNGSQL_LOGIN_MAX_FAILURES",
            5,
            "Failed sign-ins of one user name from one address, within LUNGSQL_LOGIN_WINDOW_S, before the "
            "next attempt must wait (1 to 100).",
            _positive_int,
        ),
        Setting(
            "LUNGSQL_LOGIN_MAX_FAILURES_PER_USER",
            20,
            "Failed sign-ins of one user name from every address before the next must wait (1 to 1000).",
            _positive_int,
        ),
        Setting(
            "LUNGSQL_LOGIN_MAX_FAILURES_PER_ADDRESS",
            50,
            "Failed sign-ins from one address, for every name, before the next must wait (1 to 10000).",
            _positive_int,
        ),
        Setting(
            "LUNGSQL_LOGIN_WINDOW_S",
            600,
            "Seconds after which a failed sign-in is forgotten (60 to 86400).",
            _positive_int,
        ),
        Setting(
            "LUNGSQL_LOGIN_BASE_DELAY_S",
            30,
            "The first wait in seconds once a sign-in limit is reached, doubled with each further failure "
            "(at most the window).",
            _positive_int,
        ),
    )
}


def get(name: str) -> Any:
    """The current value of one setting: its environment variable, else its default."""
    try:
        return SETTINGS[name].value()
    except KeyError:
        raise KeyError(f"unknown setting {name}; known: {', '.join(SETTINGS)}") from None
