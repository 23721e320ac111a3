"""One hierarchy of errors, rendered once per host (CLI, PL/Python, web app).

Each error carries a message saying what is wrong and, where there is one, a
hint saying what to do about it.
"""

from __future__ import annotations


class LungSQLError(Exception):
    """Base of every error lungsql raises on purpose."""

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message}\nHint: {self.hint}"


class ConfigurationError(LungSQLError):
    """A setting, argument or the installation is not what lungsql needs."""


class DatabaseUnavailable(LungSQLError):
    """The database cannot be reached or is not initialised."""


class InvalidScan(LungSQLError):
    """One DICOM file cannot be stored as a CT slice; the reason is one line."""


class IntegrityError(LungSQLError):
    """A stored object does not match its recorded SHA-256."""
