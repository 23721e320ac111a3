"""What a database error says, read in one place for every client (the CLI, the procedure calls, the
web app): the message and hint a lungsql procedure raised, and whether it raised it on purpose.

PostgreSQL hands them over in psycopg's diagnostics (``message_primary``, ``message_hint``), with the
prefixes PL/Python ('plpy.Error: ') and lungsql.server.procedures ('lungsql: ') put in front. SQL
Server hands over one text, behind the ODBC driver's decorations ('[Microsoft][ODBC Driver 18 for
SQL Server][SQL Server]' and '(50000) (SQLExecDirectW)'), written by lungsql.server.mssql.error_text
as 'lungsql: message' and an optional 'Hint: hint' line.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from lungsql.errors import LungSQLError

_PREFIXES = ("plpy.Error: ", "lungsql: ")
_DRIVER_PREFIX = re.compile(r"^(\[[^\]]*\])+")
_DRIVER_SUFFIX = re.compile(r"\s*\(\d+\)\s*\(SQL\w+\)\s*$")


@dataclass(frozen=True)
class DatabaseMessage:
    message: str
    hint: str | None
    ours: bool  # raised on purpose by a lungsql procedure (not a lost connection, not a bug)

    def error(self) -> LungSQLError:
        return LungSQLError(self.message, hint=self.hint)


def server_message(text: str) -> str:
    """A SQL Server PRINT, RAISERROR or error text without the ODBC driver's decorations."""
    return _DRIVER_SUFFIX.sub("", _DRIVER_PREFIX.sub("", str(text).strip()))


def read(exc: BaseException) -> DatabaseMessage:
    """The message of a driver's exception (psycopg's, pyodbc's, or SQLAlchemy's wrapping either)."""
    exc = getattr(exc, "orig", None) or exc
    diag = getattr(exc, "diag", None)
    if diag is not None:  # psycopg
        text = (getattr(diag, "message_primary", None) or _first_line(exc)).strip()
        hint = getattr(diag, "message_hint", None)
    else:  # pyodbc: (sqlstate, text)
        args = getattr(exc, "args", ())
        text = server_message(args[1] if len(args) > 1 and isinstance(args[1], str) else str(exc))
        text, _, hint = text.partition("\nHint: ")
        text, hint = text.strip(), hint.strip() or None
    stripped = text.removeprefix(_PREFIXES[0])
    ours = stripped.startswith(_PREFIXES[1])
    message = stripped.removeprefix(_PREFIXES[1])
    return DatabaseMessage(message.splitlines()[0] if message else type(exc).__name__, hint or None, ours)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
