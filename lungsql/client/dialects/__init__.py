"""What differs between the databases lungsql runs on: one module per dialect.

``postgres`` is PostgreSQL 15 with PL/Python (COPY, ON CONFLICT);
``mssql`` is SQL Server with Machine Learning Services (pyodbc, T-SQL).
Code that writes SQL of one database in particular asks this package for the
module of its engine's dialect, so the rest of lungsql holds no such SQL.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

from lungsql.errors import ConfigurationError

@dataclass
class Written:
    """What a batch of an upload did not store after all (`ScanStore.write_batch`): instances
    another upload stored meanwhile (`already`), and files the database refused, each with the
    reason (`rejected`)."""

    already: list = field(default_factory=list)
    rejected: list = field(default_factory=list)


def scan_values(scan: Any) -> dict[str, Any]:
    """The lungsql.scans columns of a ScanRecord, by column name (the same in every dialect)."""
    values = {name: getattr(scan, name) for name in (
        "sop_instance_uid", "study_instance_uid", "series_instance_uid", "instance_number", "z_position", "rows",
        "columns", "pixel_spacing_row", "pixel_spacing_col", "slice_thickness", "rescale_slope",
        "rescale_intercept", "modality", "transfer_syntax_uid", "sha256", "image_type", "series_description",
        "convolution_kernel", "tilt_degrees", "frames")}
    values.update(patient_id=scan.patient.patient_id, dicom=scan.data,
                  frame_z=None if scan.frame_z is None else list(scan.frame_z))
    return values


#: A run's counters, or a function of what a batch did not store that returns them.
Counts = dict[str, int] | Callable[[Written], dict[str, int]]

#: SQLAlchemy dialect name -> the module holding that database's specifics.
MODULES = {
    "postgresql": "lungsql.client.dialects.postgres",
    "mssql": "lungsql.client.dialects.mssql",
}


def module(dialect_name: str) -> ModuleType:
    """The module for a SQLAlchemy dialect name ('postgresql', 'mssql')."""
    try:
        return importlib.import_module(MODULES[dialect_name])
    except KeyError:
        raise ConfigurationError(
            f"lungsql does not run on {dialect_name!r} databases",
            hint="use PostgreSQL (postgresql+psycopg://...) or SQL Server (mssql+pyodbc://...)",
        ) from None


def of(engine: Any) -> ModuleType:
    """The module for an engine (or connection) by its dialect."""
    return module(engine.dialect.name)


def scan_store(engine: Any):
    """The ScanStore that writes an upload into this engine's database."""
    return of(engine).ScanStore(engine)


def engine_options(dialect_name: str) -> dict[str, Any]:
    """Extra create_engine() options for a dialect (e.g. pyodbc's fast_executemany)."""
    if dialect_name not in MODULES:
        return {}
    return dict(getattr(module(dialect_name), "ENGINE_OPTIONS", {}))
