"""People who log in to the web app, added by a DBA (`lungsql user add`), and what they did (`lungsql audit`).

Passwords are hashed and checked by lungsql.accounts; signing in happens inside the database
(``lungsql.sign_in``, lungsql/server/sign_in.py).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from lungsql.errors import ConfigurationError
from lungsql.accounts import ROLES, USERNAME, hash_password

if TYPE_CHECKING:
    import sqlalchemy as sa

def add_user(engine: sa.Engine, username: str, password: str, role: str, replace: bool = False) -> int:
    """Create a user (or with `replace`, set an existing user's password and role)."""
    import sqlalchemy as sa

    if not USERNAME.match(username):
        raise ConfigurationError(f"invalid user name {username!r}",
                                 hint="use 1-64 letters, digits, '_', '.', '@' or '-'")
    if role not in ROLES:
        raise ConfigurationError(f"unknown role {role!r}", hint=f"use one of {', '.join(ROLES)}")
    hashed = hash_password(password)
    with engine.begin() as conn:
        existing = conn.execute(sa.text("SELECT user_id FROM lungsql.users WHERE username = :u"),
                                {"u": username}).scalar()
        if existing is not None:
            if not replace:
                raise ConfigurationError(f"user {username!r} already exists",
                                         hint="pass --replace to set a new password and role")
            conn.execute(sa.text("UPDATE lungsql.users SET password_hash = :h, role = :r, disabled = false "
                                 "WHERE user_id = :id"), {"h": hashed, "r": role, "id": existing})
            return existing
        return conn.execute(sa.text("INSERT INTO lungsql.users (username, password_hash, role) "
                                    "VALUES (:u, :h, :r) RETURNING user_id"),
                            {"u": username, "h": hashed, "r": role}).scalar_one()


def audit_trail(engine: sa.Engine, limit: int = 50, patient_id: str | None = None,
                username: str | None = None) -> list[sa.Row]:
    """The latest rows of lungsql.audit_log, newest first: of one patient and/or one user name (any
    case) when given. Read as the DBA (`lungsql audit`): the web app's role cannot read the log."""
    import sqlalchemy as sa

    if limit < 1:
        raise ConfigurationError(f"the number of audit rows must be at least 1, not {limit}")
    with engine.connect() as conn:
        return conn.execute(sa.text(
            "SELECT audit_id, occurred_at, username, action, patient_id, address, detail FROM lungsql.audit_log "
            "WHERE (CAST(:patient_id AS text) IS NULL OR patient_id = :patient_id) "
            "  AND (CAST(:username AS text) IS NULL OR lower(username) = lower(:username)) "
            "ORDER BY occurred_at DESC, audit_id DESC LIMIT :limit"),
            {"patient_id": patient_id, "username": username, "limit": limit}).all()
