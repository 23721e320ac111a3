"""The boundaries the tree shows, enforced: what runs inside the database server holds no connection,
the science imports neither side, and the web app talks to the database only."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import lungsql

PACKAGE = Path(lungsql.__file__).resolve().parent
WEBAPP = PACKAGE.parent / "webapp"


def imports(folder: Path) -> dict[str, set[str]]:
    """Module file -> the modules it imports (absolute names), at any depth of the file."""
    found: dict[str, set[str]] = {}
    for path in sorted(folder.rglob("*.py")):
        names: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                names.add(node.module)
                names |= {f"{node.module}.{alias.name}" for alias in node.names}
        found[str(path.relative_to(PACKAGE.parent))] = names
    return found


def offending(folder: Path, forbidden: tuple[str, ...]) -> list[str]:
    return [f"{path} imports {name}" for path, names in imports(folder).items() for name in sorted(names)
            if name.startswith(forbidden)]


def test_what_runs_inside_the_server_opens_no_connection_and_imports_no_client_code():
    forbidden = ("lungsql.client", "sqlalchemy", "psycopg", "pyodbc", "lungsql.webapp", "lungsql.bench")
    assert offending(PACKAGE / "server", forbidden) == []


def test_the_science_and_the_dicom_code_import_neither_side():
    forbidden = ("lungsql.client", "lungsql.server", "sqlalchemy", "psycopg", "pyodbc", "lungsql.webapp",
                 "lungsql.bench", "flask")
    assert offending(PACKAGE / "ml", forbidden) == []
    assert offending(PACKAGE / "dicom", forbidden) == []


def test_the_web_app_talks_to_the_database_only():
    forbidden = ("lungsql.ml", "lungsql.server", "lungsql.dicom", "onnxruntime", "lightgbm", "pydicom", "torch")
    assert offending(WEBAPP, forbidden) == []
    # And at run time: every module of the web app imported, none of those loaded.
    modules = sorted(f"lungsql.webapp.{p.stem}" for p in WEBAPP.glob("*.py") if p.stem != "__init__")
    script = (f"import sys, lungsql.webapp; import {', '.join(modules)}; "
              "print('\\n'.join(sorted(sys.modules)))")
    loaded = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                            cwd=PACKAGE.parent).stdout.split()
    assert [m for m in loaded if m.startswith(forbidden)] == []
