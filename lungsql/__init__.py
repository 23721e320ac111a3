"""lungsql: lung cancer detection on CT scans, run inside the database."""

__version__ = "0.1.0"
