"""Signing in to the web app, inside the database: throttled, serialized and audited in one transaction.

``lungsql.sign_in(username, password, address, ...)`` (sql/postgres/functions/
020_web.sql) calls `sign_in` here through lungsql.server.procedures. One attempt:

1. takes transaction-level advisory locks on the user name (lowercased) and on
   the address, so that concurrent attempts for either run one after the
   other and each counts the ones before it;
2. counts the recent ``login_failed`` rows of lungsql.audit_log for three keys:
   the name from this address (since the name last signed in from there), the
   name from every address, and the address for every name;
3. when a key has reached its limit and its wait is not over, audits the
   attempt as ``login_locked`` and answers 'locked' with the seconds left,
   without looking the user up or checking the password, so the answer is the
   same for names that exist and names that do not;
4. else audits the attempt as ``login_failed`` first, checks the password
   (werkzeug's scrypt; a dummy hash for unknown names, so both take as long;
   a disabled user fails like a wrong password), and on success turns that
   row into ``login``.

The caller commits right after: the row and the locks go together. Once a key
has `limit` failures, the next attempt must wait `base_delay_s` after the
latest failure, doubled for each failure beyond the limit, at most `window_s`.
The per-(name, address) key means that someone guessing a clinician's password
from one address does not lock the clinician out at their own workstation;
the per-name key bounds the guesses at one name from many addresses; the
per-address key, with a higher limit, slows down guessing many names from one
address.

The Python here takes a small data-access object (`PlpySignIns` inside
PostgreSQL), never imports plpy.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from typing import Any, Protocol

from lungsql import accounts
from lungsql.accounts import Limits
from lungsql.errors import ConfigurationError

# Classes of the two-key advisory locks (pg_advisory_xact_lock(int, int)), apart from every other lock.
LOCK_NAME = 0x6C736E01      # 'lsn' 1: a user name, lowercased
LOCK_ADDRESS = 0x6C736E02   # 'lsn' 2: a client address
MAX_DOUBLINGS = 32          # the wait reaches window_s long before this


@dataclass(frozen=True)
class Failures:
    """The recent failed sign-ins of one key: how many, and how long ago the latest was (s)."""

    count: int = 0
    latest_age_s: float | None = None

    def plus_one(self) -> Failures:
        """With one more failure, now."""
        return Failures(self.count + 1, 0.0)

    def wait_s(self, limit: int, limits: Limits) -> float:
        if self.count < limit:
            return 0.0
        delay = min(limits.base_delay_s * 2.0 ** min(self.count - limit, MAX_DOUBLINGS), limits.window_s)
        return max(0.0, delay - max(0.0, self.latest_age_s or 0.0))


@dataclass(frozen=True)
class Counts:
    name_address: Failures  # this name from this address, since its last sign-in there
    name: Failures          # this name from every address
    address: Failures       # this address, every name

    def plus_one(self) -> Counts:
        return Counts(self.name_address.plus_one(), self.name.plus_one(), self.address.plus_one())

    def wait_s(self, limits: Limits) -> tuple[int, str | None]:
        """(whole seconds to wait, the key that imposes it) — (0, None): no wait."""
        waits = {"name_address": self.name_address.wait_s(limits.max_failures, limits),
                 "name": self.name.wait_s(limits.max_failures_per_user, limits),
                 "address": self.address.wait_s(limits.max_failures_per_address, limits)}
        key = max(waits, key=waits.get)
        return (math.ceil(waits[key]), key) if waits[key] > 0 else (0, None)


@dataclass(frozen=True)
class Outcome:
    outcome: str                # 'ok' | 'failed' | 'locked'
    user_id: int | None = None  # when 'ok'
    role: str | None = None     # when 'ok'
    retry_after: int = 0        # 'failed': the wait this failure imposes; 'locked': the wait left

    def row(self) -> tuple[str, int | None, str | None, int]:
        return (self.outcome, self.user_id, self.role, self.retry_after)


class SignInData(Protocol):
    def lock(self, name_key: int, address_key: int) -> str: ...  # returns the transaction isolation level
    def counts(self, name: str, address: str | None, window_s: float) -> Counts: ...
    def user(self, username: str) -> dict[str, Any] | None: ...  # user_id, password_hash, role, disabled
    def record(self, username: str | None, action: str, address: str | None, detail: dict) -> int: ...
    def signed_in(self, audit_id: int) -> None: ...


def sign_in(data: SignInData, username: str | None, password: str | None, address: str | None,
            limits: Limits = Limits()) -> Outcome:
    """One sign-in attempt, in the caller's transaction (see the module's docstring)."""
    limits.check()
    username, password = username or "", password or ""
    name = username.lower()
    isolation = data.lock(lock_key(name), lock_key(address or ""))
    if isolation != "read committed":  # a later snapshot would not see the attempts it waited for
        raise ConfigurationError(f"lungsql.sign_in needs the isolation level read committed, not {isolation}",
                                 hint="call it in a transaction of the default isolation level")
    before = data.counts(name, address, float(limits.window_s))
    wait, key = before.wait_s(limits)
    if wait:
        data.record(username or None, "login_locked", address, {"retry_after_s": wait, "limit": key})
        return Outcome("locked", retry_after=wait)
    after = before.plus_one()
    wait, _ = after.wait_s(limits)
    audit_id = data.record(username or None, "login_failed", address,
                           {"failures": after.name_address.count, "wait_s": wait})
    user = data.user(username) if accounts.USERNAME.match(username) else None
    matches = accounts.check_password(None if user is None else user["password_hash"], password)
    if user is None or not matches or user["disabled"]:
        return Outcome("failed", retry_after=wait)
    data.signed_in(audit_id)
    return Outcome("ok", int(user["user_id"]), user["role"])


def lock_key(text: str) -> int:
    """A signed 32-bit key of `text` for pg_advisory_xact_lock (two texts may share one: they then wait
    for each other, nothing worse)."""
    return int.from_bytes(hashlib.sha256(text.encode("utf-8", "surrogatepass")).digest()[:4], "big", signed=True)


# -- inside PostgreSQL ---------------------------------------------------------------------------
_PLANS: dict[str, Any] = {}

_LOCK = ("SELECT pg_advisory_xact_lock($1, $2) AS name_lock, pg_advisory_xact_lock($3, $4) AS address_lock, "
         "current_setting('transaction_isolation') AS isolation")

# The failures of the window, per key; the name's failures from the address count since its last sign-in there.
_COUNTS = """
WITH t AS MATERIALIZED (
    SELECT c.now, c.now - make_interval(secs => $3) AS start FROM (SELECT clock_timestamp() AS now) c
),
since AS (
    SELECT coalesce(max(a.occurred_at), '-infinity') AS at FROM lungsql.audit_log a
    WHERE a.action = 'login' AND lower(a.username) = $1 AND a.address = $2
      AND a.occurred_at > (SELECT start FROM t)
),
recent AS (
    SELECT a.occurred_at, lower(a.username) = $1 AS same_name, a.address = $2 AS same_address
    FROM lungsql.audit_log a
    WHERE a.action = 'login_failed' AND a.occurred_at > (SELECT start FROM t)
      AND (lower(a.username) = $1 OR a.address = $2)
)
SELECT count(*) FILTER (WHERE r.same_name AND r.same_address AND r.occurred_at > since.at) AS pair_n,
       extract(epoch FROM t.now - max(r.occurred_at) FILTER (
           WHERE r.same_name AND r.same_address AND r.occurred_at > since.at))::float8 AS pair_age,
       count(*) FILTER (WHERE r.same_name) AS name_n,
       extract(epoch FROM t.now - max(r.occurred_at) FILTER (WHERE r.same_name))::float8 AS name_age,
       count(*) FILTER (WHERE r.same_address) AS address_n,
       extract(epoch FROM t.now - max(r.occurred_at) FILTER (WHERE r.same_address))::float8 AS address_age
FROM t CROSS JOIN since LEFT JOIN recent r ON true
GROUP BY t.now
"""

_USER = "SELECT user_id, password_hash, role, disabled FROM lungsql.users WHERE username = $1"

_RECORD = ("INSERT INTO lungsql.audit_log (occurred_at, username, action, address, detail) "
           "VALUES (clock_timestamp(), $1, $2, $3, CAST($4 AS jsonb)) RETURNING audit_id")

_SIGNED_IN = ("UPDATE lungsql.audit_log SET action = 'login', detail = '{}' "
              "WHERE audit_id = $1 AND action = 'login_failed'")


class PlpySignIns:
    """SignInData through plpy, in the backend that runs lungsql.sign_in; statements prepared once per process."""

    def __init__(self, plpy):
        self.plpy = plpy

    def _run(self, sql: str, types: list[str], args: list[Any]):
        plan = _PLANS.get(sql)
        if plan is None:
            plan = _PLANS[sql] = self.plpy.prepare(sql, types)
        return self.plpy.execute(plan, args)

    def lock(self, name_key: int, address_key: int) -> str:
        rows = self._run(_LOCK, ["integer"] * 4, [LOCK_NAME, name_key, LOCK_ADDRESS, address_key])
        return rows[0]["isolation"]

    def counts(self, name: str, address: str | None, window_s: float) -> Counts:
        row = self._run(_COUNTS, ["text", "text", "float8"], [name, address, window_s])[0]
        return Counts(Failures(int(row["pair_n"]), row["pair_age"]), Failures(int(row["name_n"]), row["name_age"]),
                      Failures(int(row["address_n"]), row["address_age"]))

    def user(self, username: str) -> dict[str, Any] | None:
        rows = self._run(_USER, ["text"], [username])
        return dict(rows[0]) if rows else None

    def record(self, username: str | None, action: str, address: str | None, detail: dict) -> int:
        rows = self._run(_RECORD, ["text", "text", "text", "text"], [username, action, address, json.dumps(detail)])
        return int(rows[0]["audit_id"])

    def signed_in(self, audit_id: int) -> None:
        self._run(_SIGNED_IN, ["bigint"], [audit_id])
