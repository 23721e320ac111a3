"""Site secrets: from the environment, else generated once into $LUNGSQL_HOME.

Nothing secret is ever kept in the repository.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

import config_preprocessing as config
from lungsql.errors import ConfigurationError


def site_secret(name: str, env_var: str) -> bytes:
    """The secret `name`: $env_var if set, else $LUNGSQL_HOME/<name>.key (created 0600 on first use)."""
    value = config.get(env_var)
    if value:
        return value.encode()
    return secret_file(Path(config.get("LUNGSQL_HOME")) / f"{name}.key")


def secret_file(path: Path) -> bytes:
    """The random secret kept in `path`: 64 hex digits, written once (mode 0600) and read ever after."""
    try:
        return path.read_bytes().strip()
    except FileNotFoundError:
        pass
    except PermissionError:
        raise ConfigurationError(
            f"cannot read the site secret {path}",
            hint="run lungsql as the user who created it (or root)",
        ) from None
    path.parent.mkdir(parents=True, exist_ok=True)
    key = secrets.token_hex(32).encode()
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:  # another process created it first
        return path.read_bytes().strip()
    with os.fdopen(fd, "wb") as handle:
        handle.write(key + b"\n")
    return key
