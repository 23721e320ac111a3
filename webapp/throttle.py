"""Slowing down repeated failed sign-ins, from the audit log, for every server process at once.

Failures are counted per (user name, address) and per address alone over a
sliding window. Once a key has `max_failures` failures in the window, the next
attempt must wait `base_delay_s` after the last failure, doubling with each
further failure (at most the window). The per-name key means that someone
guessing a clinician's password from one address does not lock the clinician
out at their own workstation; the per-address key, with a higher threshold,
slows down guessing many names from one address. A successful sign-in clears
the failures of its name from its address.

The failures are the ``login_failed`` rows of ``lungsql.audit_log`` (every
failure is audited anyway), timed by the database's clock: every process of
``lungsql serve`` sees the same counts, and a restart forgets nothing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import sqlalchemy as sa

# Failures from `address` in the window, as seconds before now: all of them, and those of `username`
# since its last successful sign-in from there.
_FAILURES = sa.text("""
WITH since AS (
    SELECT coalesce(max(occurred_at), '-infinity') AS at FROM lungsql.audit_log
    WHERE action = 'login' AND address IS NOT DISTINCT FROM :address AND lower(username) = lower(:username)
      AND occurred_at > clock_timestamp() - make_interval(secs => :window)
)
SELECT extract(epoch FROM clock_timestamp() - f.occurred_at)::double precision AS age,
       lower(f.username) = lower(:username) AND f.occurred_at > since.at AS mine
FROM lungsql.audit_log f, since
WHERE f.action = 'login_failed' AND f.address IS NOT DISTINCT FROM :address
  AND f.occurred_at > clock_timestamp() - make_interval(secs => :window)
""")


@dataclass(frozen=True)
class LoginThrottle:
    max_failures: int = 5
    window_s: float = 600.0
    base_delay_s: float = 30.0
    max_failures_per_address: int = 50

    def retry_after(self, conn: sa.Connection, username: str, address: str | None) -> int:
        """Seconds to wait before this name may try again from this address (0: now)."""
        mine, everyone = self._failures(conn, username, address)
        return math.ceil(max(self._wait(mine, self.max_failures), self._wait(everyone, self.max_failures_per_address)))

    def after_failure(self, conn: sa.Connection, username: str, address: str | None) -> tuple[int, int]:
        """For a failure about to be audited: (failures of this name from this address in the window,
        counting it; seconds to wait now)."""
        mine, everyone = self._failures(conn, username, address)
        mine, everyone = [0.0, *mine], [0.0, *everyone]
        wait = max(self._wait(mine, self.max_failures), self._wait(everyone, self.max_failures_per_address))
        return len(mine), math.ceil(wait)

    def _failures(self, conn: sa.Connection, username: str, address: str | None) -> tuple[list[float], list[float]]:
        """Ages in seconds, youngest first: (this name's failures, every failure from this address)."""
        rows = conn.execute(_FAILURES, {"username": username, "address": address,
                                        "window": float(self.window_s)}).all()
        everyone = sorted(max(0.0, r.age) for r in rows)
        return sorted(max(0.0, r.age) for r in rows if r.mine), everyone

    def _wait(self, ages: Sequence[float], threshold: int) -> float:
        if len(ages) < threshold:
            return 0.0
        delay = min(self.base_delay_s * 2 ** (len(ages) - threshold), self.window_s)
        return max(0.0, delay - ages[0])
