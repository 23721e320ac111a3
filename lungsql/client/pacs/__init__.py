"""Connections to a hospital's PACS: DICOMweb and DIMSE in, results back."""

import re

#: A DICOM UID (PS3.5 9.1): digits in dot-separated parts, at most 64 characters.
_UID = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")


def valid_uid(value) -> str | None:
    """The UID a PACS answered, when it is one; None for anything else (missing, too long, or text
    that could reach into the URL of a request built from it, such as '../')."""
    text = str(value).strip() if value is not None else ""
    return text if len(text) <= 64 and _UID.match(text) else None


def instance_count(value) -> int | None:
    """NumberOfSeriesRelatedInstances as a PACS answered it: a count, or None when it is not one."""
    try:
        count = int(str(value).strip())
    except (TypeError, ValueError):
        return None
    return count if 0 <= count <= 1_000_000 else None



def shown(value) -> str:
    """A value a PACS answered, as a recorded reason may quote it: short, one line, printable."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
