"""The part of PL/Python's `plpy` that lungsql.server.plpy_data uses, over a psycopg connection.

With it, the data access of the stored procedures runs unchanged in a client process (a Spark
executor): the same statements, bound the same way. `$n` parameters become psycopg's named
placeholders, each cast to the type `prepare` declared, so values are typed as plpy types them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable, Sequence

_PARAMETER = re.compile(r"\$(\d+)")


class SPIError(Exception):
    """A statement the database refused (plpy.SPIError's role)."""


@dataclass(frozen=True)
class Plan:
    sql: str


class PlpyClient:
    """`prepare`, `execute`, `cursor`, `commit` and `notice` over one psycopg connection."""

    SPIError = SPIError

    def __init__(self, connection, on_notice: Callable[[str], None] | None = None):
        self.connection = connection
        self.on_notice = on_notice or (lambda text: None)

    def prepare(self, sql: str, types: Sequence[str] = ()) -> Plan:
        def placeholder(match: re.Match) -> str:
            n = int(match.group(1))
            return f"%(p{n})s::{types[n - 1]}" if n <= len(types) else f"%(p{n})s"

        return Plan(_PARAMETER.sub(placeholder, sql.replace("%", "%%")))

    def execute(self, plan: Plan | str, args: Sequence[Any] = ()) -> list[dict[str, Any]]:
        from psycopg.rows import dict_row

        plan = plan if isinstance(plan, Plan) else self.prepare(plan)
        with self.connection.cursor(row_factory=dict_row) as cur:
            cur.execute(plan.sql, {f"p{i}": v for i, v in enumerate(args, start=1)})
            return cur.fetchall() if cur.description else []

    def cursor(self, plan: Plan, args: Sequence[Any] = ()):
        from psycopg.rows import dict_row

        cur = self.connection.cursor(row_factory=dict_row)
        cur.execute(plan.sql, {f"p{i}": v for i, v in enumerate(args, start=1)})
        return _Cursor(cur)

    def commit(self) -> None:
        self.connection.commit()

    def notice(self, text: str) -> None:
        self.on_notice(text)


class _Cursor:
    def __init__(self, cur):
        self._cur = cur

    def fetch(self, n: int) -> list[dict[str, Any]]:
        return self._cur.fetchmany(n)

    def close(self) -> None:
        self._cur.close()
