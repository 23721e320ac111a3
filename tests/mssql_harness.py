"""Run the Python of sql/mssql's procedures as sp_execute_external_script would.

No SQL Server runs here. What this harness does instead, for each
``EXEC sp_execute_external_script`` of sql/mssql/02_procedures.sql:

* reads its arguments from the T-SQL text: the ``@script`` literal (with ``''``
  unescaped), the ``@input_data_1`` query, the ``@params`` declarations and
  the values and OUTPUT markers the call passes;
* runs the ``@input_data_1`` query on the PostgreSQL test database (the tables
  have the same names and columns there; ``@name`` parameters are bound as
  psycopg parameters, and ``OPENJSON`` gets a small PostgreSQL stand-in), and
  builds InputDataSet from its rows with exactly the columns the T-SQL selects,
  converted as SQL Server converts the declared column types of
  sql/mssql/01_schema.sql (int -> int32, bigint/real/float -> float64, binary
  -> bytes, text -> str, NULL -> NaN or None);
* executes the script in a namespace holding InputDataSet and one variable per
  ``@params`` declaration (OUTPUT ones start as the value passed, like T-SQL),
  then reads OutputDataSet and the OUTPUT variables back, checking that each
  fits its declared SQL type.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from lungsql.client.dialects.mssql import SQL_DIR, batches

PROCEDURES_SQL = SQL_DIR / "02_procedures.sql"
SCHEMA_SQL = SQL_DIR / "01_schema.sql"
_KNOWN_ARGUMENTS = {"language", "script", "input_data_1", "input_data_1_name", "output_data_1_name", "params"}


# -- reading the T-SQL -----------------------------------------------------------------
_TOKEN = re.compile(r"""
      (?P<space>\s+|--[^\n]*)
    | (?P<string>N?'(?:[^']|'')*')
    | (?P<variable>@@?\w+)
    | (?P<word>[\#\w.\[\]]+)
    | (?P<punct>.)
""", re.VERBOSE | re.DOTALL)


def _tokens(text: str, start: int = 0):
    for match in _TOKEN.finditer(text, start):
        if match.lastgroup != "space":
            yield match.lastgroup, match.group(), match.start()


def _literal(token: str) -> str:
    """The value of a T-SQL string literal: N'it''s' -> it's."""
    return token[token.index("'") + 1:-1].replace("''", "'")


@dataclass
class Parameter:
    name: str        # without the @
    sql_type: str    # as declared, lowercase: 'nvarchar(max)', 'int', 'char(64)'
    output: bool


@dataclass
class ExternalScript:
    procedure: str
    script: str
    input_query: str | None
    parameters: list[Parameter]
    arguments: dict[str, tuple[str, bool]]              # @params name -> (T-SQL value text, passed OUTPUT)
    insert_columns: list[str] | None = None             # INSERT INTO t (cols) EXEC ...: where OutputDataSet goes
    result_columns: list[str] | None = None             # WITH RESULT SETS ((name type, ...))
    extra: dict[str, str] = field(default_factory=dict)  # other named arguments, e.g. @language

    @property
    def outputs(self) -> list[Parameter]:
        return [p for p in self.parameters if p.output]


def _split_top_level(text: str, sep: str = ",") -> list[str]:
    parts, depth, current = [], 0, []
    for char in text:
        depth += char == "("
        depth -= char == ")"
        if char == sep and depth == 0:
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    parts.append("".join(current))
    return [p.strip() for p in parts if p.strip()]


def parse_parameters(declaration: str) -> list[Parameter]:
    """'@a int, @b nvarchar(max) OUTPUT' -> [Parameter('a', 'int', False), Parameter('b', ..., True)]."""
    found = []
    for item in _split_top_level(declaration):
        match = re.fullmatch(r"@(\w+)\s+(.+?)(\s+(?:OUT|OUTPUT))?", " ".join(item.split()), re.IGNORECASE)
        if not match:
            raise ValueError(f"cannot read the @params declaration {item!r}")
        found.append(Parameter(match.group(1), match.group(2).lower().replace(" ", ""), bool(match.group(3))))
    return found


def _statement(text: str, start: int) -> list[tuple[str, str]]:
    """The (kind, text) tokens of the statement at `start`, up to its `;`."""
    found, depth = [], 0
    for kind, value, _ in _tokens(text, start):
        depth += value == "("
        depth -= value == ")"
        if value == ";" and depth == 0:
            return found
        found.append((kind, value))
    raise ValueError(f"no ; ends the statement at {text[start:start + 60]!r}")


def _parse_call(procedure: str, text: str, start: int) -> ExternalScript:
    """The named arguments of the EXEC sp_execute_external_script that starts at `start`."""
    tokens = _statement(text, start)[2:]  # after EXEC sp_execute_external_script
    result_columns = None
    words = [v.upper() for _, v in tokens]
    if "WITH" in words:  # WITH RESULT SETS ((name type, ...))
        at = words.index("WITH")
        inner = " ".join(v for _, v in tokens[at + 5:-2])  # inside WITH RESULT SETS ((...))
        result_columns = [c.split()[0] for c in _split_top_level(inner)]
        tokens = tokens[:at]
    named: dict[str, tuple[str, bool]] = {}
    for group in _split_tokens(tokens):
        if len(group) not in (3, 4) or group[0][0] != "variable" or group[1][1] != "=":
            raise ValueError(f"{procedure}: cannot read the argument {' '.join(v for _, v in group)!r}")
        output = len(group) == 4 and group[3][1].upper() in ("OUT", "OUTPUT")
        if group[0][1][1:] in named:
            raise ValueError(f"{procedure}: {group[0][1]} is passed twice to sp_execute_external_script")
        named[group[0][1][1:]] = (group[2][1], output)
    literal = {k: _literal(v) for k, (v, _) in named.items()
               if k in _KNOWN_ARGUMENTS and v.upper().startswith(("N'", "'"))}
    parameters = parse_parameters(literal.get("params", ""))
    arguments = {k: v for k, v in named.items() if k not in _KNOWN_ARGUMENTS}
    insert = re.search(r"INSERT\s+INTO\s+[#\w.\[\]]+\s*\(([^)]*)\)\s*$", text[:start].rstrip(), re.IGNORECASE)
    return ExternalScript(
        procedure=procedure,
        script=literal["script"],
        input_query=literal.get("input_data_1"),
        parameters=parameters,
        arguments=arguments,
        insert_columns=[c.strip() for c in insert.group(1).split(",")] if insert else None,
        result_columns=result_columns,
        extra={k: v for k, v in literal.items() if k not in ("script", "input_data_1", "params")},
    )


def _split_tokens(tokens: list[tuple[str, str]]) -> list[list[tuple[str, str]]]:
    groups: list[list[tuple[str, str]]] = [[]]
    for token in tokens:
        if token[1] == ",":
            groups.append([])
        else:
            groups[-1].append(token)
    return [g for g in groups if g]


def problems(call: ExternalScript) -> list[str]:
    """What SQL Server would refuse in the call: undeclared, missing or mis-marked parameters."""
    found = []
    declared = {p.name: p for p in call.parameters}
    for p in call.parameters:
        if p.name in _KNOWN_ARGUMENTS:
            found.append(f"@{p.name} is an argument of sp_execute_external_script itself: rename it")
        if p.name not in call.arguments:
            found.append(f"@{p.name} is declared in @params but not passed")
        elif call.arguments[p.name][1] != p.output:
            found.append(f"@{p.name} is declared {'with' if p.output else 'without'} OUTPUT but passed "
                         f"{'without' if p.output else 'with'} it")
    found += [f"@{name} is passed but not declared in @params" for name in call.arguments if name not in declared]
    if call.extra.get("language") != "Python":
        found.append("@language is not N'Python'")
    return found


@lru_cache(maxsize=None)
def external_scripts(path: Path = PROCEDURES_SQL) -> dict[str, list[ExternalScript]]:
    """Every procedure of the file with its sp_execute_external_script calls, in order."""
    found: dict[str, list[ExternalScript]] = {}
    for batch in batches(path.read_text(encoding="utf-8")):
        match = re.search(r"CREATE\s+OR\s+ALTER\s+PROCEDURE\s+([\w.]+)", batch, re.IGNORECASE)
        if not match:
            continue
        name = match.group(1)
        calls = [m.start() for m in re.finditer(r"\bEXEC(?:UTE)?\s+sp_execute_external_script\b", batch, re.IGNORECASE)]
        found[name] = [_parse_call(name, batch, start) for start in calls]
    return found


def external_script(procedure: str, index: int = -1) -> ExternalScript:
    return external_scripts()[procedure][index]


@lru_cache(maxsize=None)
def column_types(path: Path = SCHEMA_SQL) -> dict[tuple[str, str], str]:
    """(table, column) -> declared T-SQL type, lowercase, from the CREATE TABLE statements."""
    types = {}
    text = path.read_text(encoding="utf-8")
    for table in re.finditer(r"CREATE\s+TABLE\s+lungsql\.(\w+)\s*\((.*?)\n\s*\);", text, re.IGNORECASE | re.DOTALL):
        for line in table.group(2).splitlines():
            match = re.match(r"\s*\[?(\w+)\]?\s+(\w+(?:\s*\([\w\s,]+\))?)", line)
            if match and match.group(1).upper() not in ("CONSTRAINT",) and match.group(2).upper() != "AS":
                types[(table.group(1), match.group(1))] = match.group(2).lower().replace(" ", "")
    # Columns later versions add (IF COL_LENGTH(...) IS NULL ALTER TABLE ... ADD a type ..., b type ...;).
    for table in re.finditer(r"ALTER\s+TABLE\s+lungsql\.(\w+)\s+ADD\s+(.*?);", text, re.IGNORECASE | re.DOTALL):
        for column in _split_top_level(table.group(2)):
            match = re.match(r"\s*\[?(\w+)\]?\s+(\w+(?:\s*\([\w\s,]+\))?)", column)
            if match and match.group(1).upper() != "CONSTRAINT":
                types[(table.group(1), match.group(1))] = match.group(2).lower().replace(" ", "")
    return types


def select_columns(query: str) -> list[tuple[str, str]]:
    """(output name, 'table.column') for each item of the outer SELECT of an input query."""
    aliases = {alias: table for table, alias in
               re.findall(r"lungsql\.(\w+)\s+AS\s+(\w+)", query, re.IGNORECASE)}
    match = re.search(r"^\s*SELECT\s+(.*?)\s+FROM\s", query, re.IGNORECASE | re.DOTALL)
    columns = []
    for item in _split_top_level(match.group(1)):
        qualified = re.fullmatch(r"(\w+)\.(\w+)(?:\s+AS\s+(\w+))?", item, re.IGNORECASE)
        if not qualified:
            raise ValueError(f"qualify the input column {item!r} with its table's alias")
        alias, column, name = qualified.groups()
        columns.append((name or column, f"{aliases[alias]}.{column}"))
    return columns


# -- SQL Server's conversions ----------------------------------------------------------------
def _base(sql_type: str) -> str:
    return sql_type.split("(")[0]


def _length(sql_type: str) -> int | None:
    match = re.search(r"\((\d+)\)", sql_type)
    return int(match.group(1)) if match else None


def to_python_column(values: list[Any], sql_type: str) -> pd.Series:
    """A column of InputDataSet as SQL Server's Python integration builds it."""
    base = _base(sql_type)
    if base in ("int", "smallint", "tinyint"):
        if any(v is None for v in values):
            return pd.Series([np.nan if v is None else float(v) for v in values], dtype="float64")
        return pd.Series(values, dtype="int32")
    if base in ("bigint", "real", "float"):
        return pd.Series([np.nan if v is None else float(v) for v in values], dtype="float64")
    if base == "bit":
        return pd.Series(values, dtype="bool")
    if base in ("binary", "varbinary"):
        return pd.Series([None if v is None else bytes(v) for v in values], dtype="object")
    if base in ("char", "nchar", "varchar", "nvarchar"):
        width = _length(sql_type) if base in ("char", "nchar") else None
        # PostgreSQL's jsonb arrives as Python objects; on SQL Server the column holds the JSON text.
        values = [json.dumps(v) if isinstance(v, (dict, list)) else v for v in values]
        return pd.Series([None if v is None else (str(v).ljust(width) if width else str(v)) for v in values],
                         dtype="object")
    raise ValueError(f"the harness does not convert SQL type {sql_type!r}")


def to_python_param(value: Any, sql_type: str) -> Any:
    """An @params value as the script sees it."""
    if value is None:
        return None
    base = _base(sql_type)
    if base in ("int", "smallint", "tinyint", "bigint"):
        return int(value)
    if base in ("float", "real"):
        return float(value)
    if base == "bit":
        return bool(value)
    if base in ("binary", "varbinary"):
        return bytes(value)
    width = _length(sql_type) if base in ("char", "nchar") else None
    return str(value).ljust(width) if width else str(value)


def check_output(name: str, value: Any, sql_type: str) -> None:
    """Refuse what SQL Server could not store in the declared OUTPUT parameter."""
    if value is None:
        return
    base, width = _base(sql_type), _length(sql_type)
    if base in ("int", "smallint", "tinyint", "bigint"):
        ok = isinstance(value, int) and not isinstance(value, bool) and -2**31 <= value < 2**31
    elif base in ("float", "real"):
        ok = isinstance(value, (float, int)) and not isinstance(value, bool)
    elif base in ("binary", "varbinary"):
        ok = isinstance(value, bytes) and (width is None or len(value) <= width)
    else:
        ok = isinstance(value, str) and (width is None or len(value) <= width)
    if not ok:
        raise TypeError(f"OUTPUT @{name} {sql_type} cannot hold {type(value).__name__} {str(value)[:80]!r}")


# -- running a script ---------------------------------------------------------------------
_OPENJSON = """CREATE OR REPLACE FUNCTION pg_temp.openjson(doc text) RETURNS TABLE (value text)
               LANGUAGE sql IMMUTABLE AS $$ SELECT jsonb_array_elements_text(doc::jsonb) $$"""


def input_data_set(pg, call: ExternalScript, values: dict[str, Any]) -> pd.DataFrame:
    """InputDataSet: the T-SQL input query run on the PostgreSQL test database.

    `pg` is a psycopg connection; `values` the @params values by name.
    """
    import psycopg

    columns = select_columns(call.input_query)
    types = column_types()
    declared = {p.name: p.sql_type for p in call.parameters}
    query = re.sub(r"@(\w+)", r"%(\1)s", call.input_query)
    query = re.sub(r"\bOPENJSON\(", "pg_temp.openjson(", query, flags=re.IGNORECASE)
    bound = {name: (int(v) if _base(declared[name]) == "bit" and v is not None else v)
             for name, v in values.items() if name in declared}
    with psycopg.ClientCursor(pg) as cur:
        cur.execute(_OPENJSON)
        cur.execute(query, bound)
        names = [d.name for d in cur.description]
        rows = cur.fetchall()
    assert names == [name for name, _ in columns], (names, columns)
    data = {}
    for i, (name, qualified) in enumerate(columns):
        table, column = qualified.split(".")
        data[name] = to_python_column([r[i] for r in rows], types[(table, column)])
    return pd.DataFrame(data, columns=[name for name, _ in columns])


@dataclass
class Result:
    output_data_set: pd.DataFrame | None
    outputs: dict[str, Any]


def run(call: ExternalScript, input_data: pd.DataFrame | None, values: dict[str, Any]) -> Result:
    """Execute the script as sp_execute_external_script would, and read back what it returns."""
    missing = [p.name for p in call.parameters if p.name not in values and not p.output]
    if missing:
        raise KeyError(f"{call.procedure}: no value for @{', @'.join(missing)}")
    namespace: dict[str, Any] = {"__name__": "__main__"}
    if call.input_query is not None:
        namespace["InputDataSet"] = input_data
    for p in call.parameters:
        namespace[p.name] = to_python_param(values.get(p.name), p.sql_type)
    exec(compile(call.script, f"<{call.procedure} @script>", "exec"), namespace)
    outputs = {p.name: namespace.get(p.name) for p in call.outputs}
    for p in call.outputs:
        check_output(p.name, outputs[p.name], p.sql_type)
    frame = namespace.get("OutputDataSet")
    if frame is not None:
        assert isinstance(frame, pd.DataFrame), f"OutputDataSet is a {type(frame).__name__}, not a DataFrame"
        expected = call.insert_columns or call.result_columns
        if expected is not None:
            assert frame.shape[1] == len(expected), (list(frame.columns), expected)
    return Result(frame, outputs)


def run_on(pg, procedure: str, values: dict[str, Any], index: int = -1) -> Result:
    """InputDataSet from the PostgreSQL test database, then the script."""
    call = external_script(procedure, index)
    frame = input_data_set(pg, call, values) if call.input_query else None
    return run(call, frame, values)
