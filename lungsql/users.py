"""People who log in to the web app: salted password hashes and a role."""

from __future__ import annotations

import re

import sqlalchemy as sa
from werkzeug.security import check_password_hash, generate_password_hash

from lungsql.errors import ConfigurationError

ROLES = ("clinician", "admin")
USERNAME = re.compile(r"^[A-Za-z0-9_.@-]{1,64}$")
MIN_PASSWORD = 8

# Checked against when the user does not exist, so that a wrong name costs as
# long as a wrong password and does not reveal which names exist.
_DUMMY_HASH = generate_password_hash("lungsql-no-such-user")


def hash_password(password: str) -> str:
    if len(password) < MIN_PASSWORD:
        raise ConfigurationError(f"the password is shorter than {MIN_PASSWORD} characters")
    return generate_password_hash(password)


def add_user(engine: sa.Engine, username: str, password: str, role: str, replace: bool = False) -> int:
    """Create a user (or with `replace`, set an existing user's password and role)."""
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


def authenticate(conn: sa.Connection, username: str, password: str) -> dict | None:
    """The user's row (user_id, username, role) when the password matches and the user is enabled."""
    row = conn.execute(sa.text("SELECT user_id, username, password_hash, role, disabled FROM lungsql.users "
                               "WHERE username = :u"), {"u": username}).mappings().first()
    if row is None:
        check_password_hash(_DUMMY_HASH, password)
        return None
    if not check_password_hash(row["password_hash"], password) or row["disabled"]:
        return None
    return {"user_id": row["user_id"], "username": row["username"], "role": row["role"]}
