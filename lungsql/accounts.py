"""The web app's accounts as every side needs them: user names and roles, passwords (salted scrypt
hashes, werkzeug; never stored or compared in clear) and the sign-in limits.

The client that adds a user (lungsql.client.users) hashes; the server that signs one in
(lungsql.server.sign_in) checks and throttles; the web app checks its limits at start.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

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
    if "\x00" in password:
        raise ConfigurationError("the password contains a NUL character", hint="choose one without it")
    return generate_password_hash(password)


def check_password(password_hash: str | None, password: str) -> bool:
    """Whether `password` matches `password_hash`. For a user who does not exist (None) a dummy hash
    is checked, so that the answer takes as long."""
    if password_hash is None:
        check_password_hash(_DUMMY_HASH, password)
        return False
    return check_password_hash(password_hash, password)


@dataclass(frozen=True)
class Limits:
    max_failures: int = 5               # per user name and address, since that name signed in from there
    max_failures_per_user: int = 20     # per user name, from every address
    max_failures_per_address: int = 50  # per address, for every name
    window_s: float = 600.0             # failures older than this are forgotten
    base_delay_s: float = 30.0          # the first wait, doubled for each failure beyond a limit

    def check(self) -> None:
        """Refuse limits outside sane bounds (even a caller that picks its own cannot switch throttling off)."""
        for name, value, low, high in (("max_failures", self.max_failures, 1, 100),
                                       ("max_failures_per_user", self.max_failures_per_user, 1, 1000),
                                       ("max_failures_per_address", self.max_failures_per_address, 1, 10_000),
                                       ("window_s", self.window_s, 60, 86_400),
                                       ("base_delay_s", self.base_delay_s, 1, self.window_s)):
            if value is None or not low <= value <= high:
                raise ConfigurationError(f"sign-in limit {name} is {value}, outside {low} to {high:g}",
                                         hint="set LOGIN_MAX_FAILURES, LOGIN_MAX_FAILURES_PER_USER, "
                                              "LOGIN_MAX_FAILURES_PER_ADDRESS, LOGIN_WINDOW_S and "
                                              "LOGIN_BASE_DELAY_S of the web app within these bounds")
