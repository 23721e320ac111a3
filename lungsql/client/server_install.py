"""An environment of the database server's own: a venv that its OS user can read but not write, with
lungsql and only its runtime packages, from which `lungsql init` is run (`lungsql server-install`).

The server imports the Python that `init` records (lungsql.client.migrations.server_python_path);
a development checkout or venv that others can write would let them run code as the server's OS
user, and would also hold the development and export extras. Installed here as root, every file
belongs to root and no one else may write: `init` then accepts it (check_server_path).
"""

from __future__ import annotations

import os
import subprocess
import sys
import venv
from pathlib import Path

from lungsql.errors import ConfigurationError

#: The extras Python inside the server needs: the CNN, LightGBM and OpenCV, and the pixel codecs.
RUNTIME_EXTRAS = "ml,codecs"


def server_install(prefix: Path, source: str, no_deps: bool = False) -> Path:
    """Create the venv `prefix` with lungsql from `source` (a wheel, or the project folder) and its
    runtime extras, then take write access from everyone but its owner. Returns its `bin/lungsql`."""
    prefix = Path(prefix).absolute()
    if prefix.exists() and (not prefix.is_dir() or any(prefix.iterdir())):
        raise ConfigurationError(f"{prefix} already exists and is not an empty folder",
                                 hint="choose a new folder for the server's environment, e.g. /opt/lungsql")
    if sys.version_info[:2] != (3, 11):
        raise ConfigurationError(f"the server's environment needs Python 3.11 (PL/Python's), not {sys.version.split()[0]}",
                                 hint="run lungsql server-install with a Python 3.11")
    venv.EnvBuilder(with_pip=True).create(prefix)
    python = prefix / "bin" / "python"
    argv = [str(python), "-m", "pip", "install", "--quiet", "--no-warn-script-location"]
    if no_deps:
        argv.append("--no-deps")
    result = subprocess.run([*argv, f"{source}[{RUNTIME_EXTRAS}]"], capture_output=True, text=True)
    if result.returncode != 0:
        lines = (result.stderr or result.stdout).strip().splitlines()
        raise ConfigurationError(f"pip could not install lungsql into {prefix}: {lines[-1] if lines else 'failed'}",
                                 hint="check that the source is a lungsql wheel or project folder and that the "
                                      "package index (or --no-deps and an offline mirror) is reachable")
    read_only_for_others(prefix)
    return prefix / "bin" / "lungsql"


def read_only_for_others(root: Path) -> None:
    """No one but the owner may write under `root`; as root, every file becomes root's."""
    as_root = os.geteuid() == 0
    for folder, dirs, files in os.walk(root):
        for path in [folder, *(os.path.join(folder, name) for name in dirs + files)]:
            if os.path.islink(path):
                continue
            if as_root:
                os.chown(path, 0, 0)
            mode = os.stat(path).st_mode
            os.chmod(path, (mode & ~0o022) | (0o755 if os.path.isdir(path) else 0o444))
