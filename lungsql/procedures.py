"""Entry points of the PL/Python stored procedures.

Every PL/Python body in sql/postgres/functions is a thin shell that calls one
function here with `plpy`. These functions turn arguments into calls of the
lungsql modules that hold the science, and errors into `plpy.error` with a
hint, so a DBA reads in psql what is wrong and what to do.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

from lungsql import environment
from lungsql.errors import LungSQLError


def procedure(func: Callable[..., Any]) -> Callable[..., Any]:
    """Render a LungSQLError as a PostgreSQL error with its hint."""

    @functools.wraps(func)
    def wrapper(plpy, *args, **kwargs):
        try:
            return func(plpy, *args, **kwargs)
        except LungSQLError as exc:
            plpy.error(f"lungsql: {exc.message}", hint=exc.hint)

    return wrapper


@procedure
def check_environment(plpy) -> list[tuple[str, str | None, str | None]]:
    components = environment.inspect_components()
    problem = environment.missing_message(components)
    if problem is not None:
        message, hint = problem
        raise LungSQLError(message, hint=hint)
    return [(c.name, c.version, c.location) for c in components]
