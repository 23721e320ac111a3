"""SQL Server support, checked without a SQL Server: every T-SQL file parses
(sqlfluff, dialect tsql), every sp_execute_external_script call is well formed,
and lungsql.client.dialects.mssql emits T-SQL that SQLAlchemy's mssql dialect compiles
and sqlfluff parses, binding every value it uses and naming only columns
of 01_schema.sql and arguments its procedures declare."""

from __future__ import annotations

import contextlib
import re
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.dialects.mssql import pyodbc as mssql_pyodbc

from lungsql.client import db, dialects
from lungsql.server import mssql
from lungsql.client.dialects import mssql as tsql
from lungsql.errors import ConfigurationError

sqlfluff = pytest.importorskip("sqlfluff", reason="sqlfluff parses the T-SQL (pip install sqlfluff)")
pytest.importorskip("pandas", reason="the harness builds InputDataSet with pandas (pip install pandas)")
import mssql_harness as harness  # noqa: E402  (needs pandas)

SQL_FILES = sorted(tsql.SQL_DIR.glob("*.sql"))
DIALECT = mssql_pyodbc.dialect(paramstyle="qmark")  # as create_engine sets it up with pyodbc


def unparsable(sql: str) -> list[str]:
    """The parts of a T-SQL text sqlfluff's tsql dialect cannot parse (parse only, no lint rules)."""
    from sqlfluff.core import Linter

    tree = Linter(dialect="tsql").parse_string(sql).tree
    if tree is None:
        return ["(nothing parsed)"]
    return [f"line {s.pos_marker.line_no}: {s.raw[:120]!r}" for s in tree.recursive_crawl("unparsable")]


# -- the T-SQL files ---------------------------------------------------------------------
def test_the_tsql_files_are_all_there():
    names = {p.name for p in SQL_FILES}
    assert {"00_instance.sql", "01_schema.sql", "02_procedures.sql", "03_security.sql", "run_pipeline.sql"} <= names


@pytest.mark.parametrize("path", SQL_FILES, ids=lambda p: p.name)
def test_every_tsql_file_parses_with_sqlfluff(path: Path):
    assert unparsable(path.read_text(encoding="utf-8")) == []


def test_the_schema_has_every_table_of_the_postgresql_schema():
    pg = set()
    for path in (tsql.SQL_DIR.parent / "postgres" / "migrations").glob("00*.sql"):
        pg |= set(re.findall(r"CREATE TABLE lungsql\.(\w+)", path.read_text()))
    pg -= {"settings"}  # where PL/Python finds lungsql; SQL Server's runtime has it installed
    tables = {table for table, _ in harness.column_types()}
    assert pg == tables
    for table in tables:  # the same columns, so the upload and the web app name the same ones
        pg_columns = _postgres_columns(table)
        assert pg_columns - {c for t, c in harness.column_types() if t == table} == set(), table


def _postgres_columns(table: str) -> set[str]:
    for path in (tsql.SQL_DIR.parent / "postgres" / "migrations").glob("00*.sql"):
        match = re.search(rf"CREATE TABLE lungsql\.{table} \((.*?)\n\);", path.read_text(), re.DOTALL)
        if match:
            return {m.group(1) for line in match.group(1).splitlines()
                    if (m := re.match(r"\s+(\w+)\s", line)) and m.group(1) not in ("PRIMARY", "UNIQUE")}
    raise AssertionError(table)


def test_batches_split_at_go_lines_and_each_batch_parses():
    script = (tsql.SQL_DIR / "01_schema.sql").read_text()
    parts = tsql.batches(script)
    assert len(parts) == len(re.findall(r"^GO$", script, re.MULTILINE))
    assert all(not re.search(r"^\s*GO\s*$", b, re.MULTILINE) for b in parts)
    for batch in tsql.batches((tsql.SQL_DIR / "02_procedures.sql").read_text()):
        assert unparsable(batch) == []


# -- the procedures and their Python -----------------------------------------------------------
def test_the_procedures_dbas_know_are_there_with_their_arguments():
    text = (tsql.SQL_DIR / "02_procedures.sql").read_text()
    headers = dict(re.findall(r"CREATE OR ALTER PROCEDURE (dbo\.\w+)(.*?)\nAS\n", text, re.DOTALL))
    assert {"dbo.GenerateFeatures", "dbo.TrainLungCancerModel", "dbo.PredictLungCancer",
            "dbo.PredictLungCancerBatch", "dbo.DeployLungCancerModel", "dbo.CheckLungSQLEnvironment"} <= set(headers)
    predict = " ".join(headers["dbo.PredictLungCancer"].split())
    assert "@PatientId nvarchar(64)" in predict and "@ModelName nvarchar(100) = NULL" in predict
    assert "@PredictionResult float = NULL OUTPUT" in predict
    assert "SET @PredictionResult = @probability * 100;" in text  # a percentage, as in the 2017 original
    for name in ("@OnlyMissing", "@Shard", "@Shards", "@CnnName"):
        assert name in headers["dbo.GenerateFeatures"]
    for header in headers.values():  # one comment per argument
        assert all("--" in line for line in header.splitlines() if line.strip().startswith("@"))


def test_every_external_script_call_is_well_formed():
    calls = [c for cs in harness.external_scripts().values() for c in cs]
    assert len(calls) == 9  # two of them the registry's (train and deploy), one dbo.PredictFindings
    for call in calls:
        assert harness.problems(call) == [], call.procedure
        compile(call.script, call.procedure, "exec")
        assert "import mssql" in call.script and len(call.script.strip().splitlines()) <= 4
        for function in re.findall(r"mssql\.(\w+)\(", call.script):
            assert callable(getattr(mssql, function)), function
        if call.input_query:
            assert unparsable(call.input_query) == [], call.procedure
            types = harness.column_types()
            for _, qualified in harness.select_columns(call.input_query):
                assert tuple(qualified.split(".")) in types, qualified
    assert not any("pyodbc" in c.script or "connect" in c.script for c in calls)  # no way back into the server


def test_the_harness_refuses_what_sql_server_would():
    call = harness.external_script("dbo.PredictLungCancer")
    with pytest.raises(TypeError, match="OUTPUT @probability float"):
        harness.check_output("probability", "0.5", "float")
    with pytest.raises(TypeError, match="char\\(64\\)"):
        harness.check_output("sha256", "x" * 65, "char(64)")
    broken = harness.ExternalScript(call.procedure, call.script, call.input_query,
                                    call.parameters + [harness.Parameter("params", "int", False)],
                                    {k: v for k, v in call.arguments.items() if k != "cnn_id"}, extra=call.extra)
    found = harness.problems(broken)
    assert any("@params is an argument of sp_execute_external_script" in p for p in found)
    assert any("@cnn_id is declared in @params but not passed" in p for p in found)


def test_the_tsql_shard_and_sha256_helpers_are_python_s():
    # GenerateFeatures leaves the shard to lungsql.server.pipeline.in_shard, through patients_in_shard.
    import pandas as pd

    from lungsql.server import pipeline

    ids = [f"p{i}" for i in range(300)]
    parts = [list(mssql.patients_in_shard(pd.DataFrame({"patient_id": ids}), s, 3).patient_id) for s in range(3)]
    assert sorted(sum(parts, [])) == sorted(ids)
    assert all(pipeline.in_shard(p, s, 3) for s, part in enumerate(parts) for p in part)


# -- URLs and the choice of dialect ---------------------------------------------------------------
def test_mssql_urls_are_accepted_and_get_an_odbc_driver():
    assert db.normalise_url("mssql://dba:pw@sql01:1433/lungsql") == (
        "mssql+pyodbc://dba:pw@sql01:1433/lungsql?driver=ODBC+Driver+18+for+SQL+Server")
    assert db.normalise_url("mssql+pyodbc://dba:pw@sql01/lungsql?driver=FreeTDS") == (
        "mssql+pyodbc://dba:pw@sql01/lungsql?driver=FreeTDS")
    dsn = "mssql+pyodbc://dba:pw@lungsql_dsn"  # a DSN of odbc.ini names its own driver
    assert db.normalise_url(dsn).startswith("mssql+pyodbc://dba:pw@lungsql_dsn?driver=")
    assert db.normalise_url("mssql+pyodbc:///?odbc_connect=DRIVER%3DFreeTDS") == "mssql+pyodbc:///?odbc_connect=DRIVER%3DFreeTDS"
    assert db.normalise_url("postgresql://u@h/d") == "postgresql+psycopg://u@h/d"
    assert db.dialect_name("mssql+pyodbc://u@h/d") == "mssql"
    with pytest.raises(ConfigurationError, match="unsupported database 'mysql"):
        db.normalise_url("mysql://u@h/d")


def test_the_dialect_module_is_chosen_by_the_engine():
    class Engine:
        class dialect:
            name = "mssql"

    assert dialects.module("mssql") is tsql
    assert isinstance(dialects.scan_store(Engine()), tsql.ScanStore)
    assert dialects.module("postgresql").ScanStore.__module__ == "lungsql.client.dialects.postgres"
    assert dialects.engine_options("mssql") == {"fast_executemany": True}
    assert dialects.engine_options("postgresql") == {}
    with pytest.raises(ConfigurationError, match="does not run on 'oracle'"):
        dialects.module("oracle")


# -- the SQL lungsql.client.dialects.mssql emits ----------------------------------------------------------------
STATEMENTS = {name: value for name, value in vars(tsql).items() if isinstance(value, sa.TextClause)}
STATEMENTS.update({f"DELETE_CNN[{i}]": s for i, s in enumerate(tsql.DELETE_CNN)})


@pytest.mark.parametrize("name", sorted(STATEMENTS))
def test_each_statement_compiles_to_tsql_that_parses(name):
    sql, _ = tsql.positional(STATEMENTS[name], _Everything(), DIALECT)
    assert "?" in sql or not STATEMENTS[name].compile(dialect=DIALECT).positiontup
    numbered = iter(range(1, 1000))
    assert unparsable(re.sub(r"\?", lambda _: f"@p{next(numbered)}", sql)) == [], sql


class _Everything(dict):
    def __missing__(self, key):
        return key


def _schema_columns() -> dict[str, set[str]]:
    """Table -> its columns in 01_schema.sql, computed ones (such as error_key) included."""
    columns: dict[str, set[str]] = {}
    for table, column in harness.column_types():
        columns.setdefault(table, set()).add(column)
    text = (tsql.SQL_DIR / "01_schema.sql").read_text(encoding="utf-8")
    for table in re.finditer(r"CREATE\s+TABLE\s+lungsql\.(\w+)\s*\((.*?)\n\s*\);", text, re.DOTALL):
        columns[table.group(1)] |= set(re.findall(r"^\s*(\w+)\s+AS\s", table.group(2), re.MULTILINE))
    return columns


def _parsed(statement: sa.TextClause):
    from sqlfluff.core import Linter

    sql, _ = tsql.positional(statement, _Everything(), DIALECT)
    numbered = iter(range(1, 1000))
    return Linter(dialect="tsql").parse_string(re.sub(r"\?", lambda _: f"@p{next(numbered)}", sql)).tree


@pytest.mark.parametrize("name", sorted(n for n, s in STATEMENTS.items() if not str(s).startswith("EXEC")))
def test_each_statement_names_only_columns_of_the_tables_it_reads(name):
    # A misspelt column is a runtime error on SQL Server: find it here, against 01_schema.sql.
    tree = _parsed(STATEMENTS[name])
    schema = _schema_columns()
    aliases: dict[str, str] = {}  # alias -> the table it names
    for expression in tree.recursive_crawl("from_expression_element"):
        table = next(expression.recursive_crawl("table_reference", no_recursive_seg_type="select_statement"), None)
        alias = expression.get_child("alias_expression")
        if table and alias:  # a subquery's alias is a name the statement gives, not a table
            aliases[alias.raw.split()[-1]] = table.raw
    tables = {aliases.get(t.raw, t.raw).removeprefix("lungsql.") for t in tree.recursive_crawl("table_reference")}
    assert tables <= set(schema), tables - set(schema)
    derived = {a.raw.split()[-1] for a in tree.recursive_crawl("alias_expression")} - set(aliases)
    for reference in tree.recursive_crawl("column_reference"):
        *qualifier, column = reference.raw.replace("[", "").replace("]", "").split(".")
        if column in derived:  # a name the statement itself gives (ROW_NUMBER() ... AS n)
            continue
        candidates = [aliases[qualifier[0]].removeprefix("lungsql.")] if qualifier else sorted(tables)
        assert any(column in schema[t] for t in candidates), f"{column} is in none of {candidates}"


def test_each_procedure_call_passes_only_arguments_the_procedure_declares():
    text = (tsql.SQL_DIR / "02_procedures.sql").read_text(encoding="utf-8")
    headers = dict(re.findall(r"CREATE OR ALTER PROCEDURE (dbo\.\w+)(.*?)\nAS\n", text, re.DOTALL))
    calls = {n: str(s) for n, s in STATEMENTS.items() if str(s).startswith("EXEC")}
    assert len(calls) == 5
    for name, sql in calls.items():
        procedure = sql.split()[1]
        declared = set(re.findall(r"(@\w+)\s+\w+", headers[procedure]))
        assert set(re.findall(r"(@\w+)\s*=", sql)) <= declared, name


def test_reruns_skip_what_is_stored_under_a_lock():
    for statement in (tsql.INSERT_SCAN, tsql.INSERT_PATIENT, tsql.INSERT_LABEL, tsql.INSERT_ERROR):
        sql = str(statement.compile(dialect=DIALECT))
        assert "WHERE NOT EXISTS" in sql and "WITH (UPDLOCK, HOLDLOCK)" in sql
    sql, values = tsql.positional(tsql.INSERT_SCAN, _Everything(), DIALECT)
    assert "[rows]" in sql and "[columns]" in sql
    assert values == list(tsql.SCAN_COLUMNS) + ["sop_instance_uid"]


def test_procedure_calls_bind_their_arguments():
    sql, values = tsql.positional(tsql.GENERATE_FEATURES, {"cnn_name": None, "only_missing": True, "shard": 1,
                                                           "shards": 2, "retry_failed": False}, DIALECT)
    assert sql == ("EXEC dbo.GenerateFeatures @CnnName = ?, @OnlyMissing = ?, @Shard = ?, @Shards = ?, "
                   "@RetryFailed = ?")
    assert values == [None, True, 1, 2, False]
    sql, values = tsql.positional(tsql.PREDICT, {"patient_ids": '["a"]', "model_name": "lgbm"}, DIALECT)
    assert sql == "EXEC dbo.PredictLungCancerBatch @PatientIds = ?, @ModelName = ?" and values == ['["a"]', "lgbm"]


def test_a_procedure_error_reads_as_message_and_hint():
    class DriverError(Exception):
        pass

    exc = DriverError("42000", "[Microsoft][ODBC Driver 18 for SQL Server][SQL Server]lungsql: no CNN is stored\n"
                               "Hint: import one: lungsql model import --builtin efficientnet-lite0 (50002) "
                               "(SQLExecDirectW)")
    error = tsql.readable_error(exc)
    assert error.message == "no CNN is stored"
    assert error.hint == "import one: lungsql model import --builtin efficientnet-lite0"
    assert tsql.server_message("[Microsoft][ODBC Driver 18 for SQL Server][SQL Server]3/10 patients") == "3/10 patients"


def test_the_scan_store_passes_every_value_its_statements_bind(tmp_path):
    from lungsql.dicom import synth
    from lungsql.dicom import read_scan

    synth.write_cohort(tmp_path, patients=1, slices=(3, 3), seed=5)
    scans = [read_scan(p.read_bytes()) for p in sorted(tmp_path.rglob("*.dcm"))]
    executed: list[str] = []

    class Connection:
        def execute(self, statement, params=None):
            rows = params if isinstance(params, list) else [params or {}]
            names = statement.compile(dialect=DIALECT).positiontup
            for row in rows:
                assert set(names) <= set(row), (set(names) - set(row), str(statement))
            executed.append(str(statement).split()[0] + " " + str(len(rows)))
            return Result()

    class Result:
        def scalar_one(self):
            return 7

    class Engine:
        @contextlib.contextmanager
        def begin(self):
            yield Connection()

    store = tsql.ScanStore(Engine())
    store.load_labels({scans[0].patient.patient_id: 1}, "labels.csv")
    assert store.start_run("/data", False) == 7
    store.write_batch(7, [scans[0].patient], scans, [("/data/x.txt", "not DICOM")],
                      {"files_seen": 4, "stored": 3, "skipped": 0, "errors": 1, "bytes": 99})
    store.finish_run(7, 1.5)
    assert executed == ["UPDATE 1", "INSERT 1", "UPDATE 1", "INSERT 1", "INSERT 1", "INSERT 3", "UPDATE 1",
                        "INSERT 1", "UPDATE 1", "UPDATE 1"]


def test_call_reports_progress_lines_as_they_arrive_and_returns_the_last_result():
    # pyodbc's side of a GenerateFeatures run, as the driver hands it over: messages
    # after execute() and after each nextset(), then the procedure's summary row.
    class DriverError(Exception):
        pass

    sets = [([(0, "[Microsoft][ODBC Driver 18 for SQL Server][SQL Server]featurizing 2 patients")], None),
            ([(0, "[Microsoft][ODBC Driver 18 for SQL Server][SQL Server]1/2 patients, 5 slices, 9 slices/s")], None),
            ([(0, "[Microsoft][ODBC Driver 18 for SQL Server][SQL Server]2/2 patients, 9 slices, 9 slices/s")],
             [(3, "efficientnet-lite0", "CPUExecutionProvider", 2, 9, 1.0)])]

    class Cursor:
        executed = None

        def execute(self, sql, values):
            Cursor.executed = (sql, values)
            self.at = 0

        @property
        def messages(self):
            return sets[self.at][0]

        @property
        def description(self):
            return sets[self.at][1] and [("run_id",)]

        def fetchall(self):
            return sets[self.at][1]

        def nextset(self):
            self.at += 1
            return self.at < len(sets)

        def close(self):
            pass

    class Driver:
        def cursor(self):
            return Cursor()

    class Pooled:
        driver_connection = Driver()

    class Connection:
        dialect = mssql_pyodbc.dialect(paramstyle="qmark")
        dialect.loaded_dbapi = type("pyodbc", (), {"Error": DriverError})
        connection = Pooled()

        def execution_options(self, **options):
            assert options == {"isolation_level": "AUTOCOMMIT"}
            return self

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    class Engine:
        def connect(self):
            return Connection()

    lines: list[str] = []
    row = tsql.generate_features(Engine(), None, True, 0, 1, on_message=lines.append)
    assert Cursor.executed == (str(tsql.GENERATE_FEATURES.compile(dialect=DIALECT)), [None, True, 0, 1, False])
    assert lines == ["featurizing 2 patients", "1/2 patients, 5 slices, 9 slices/s", "2/2 patients, 9 slices, 9 slices/s"]
    assert row == (3, "efficientnet-lite0", "CPUExecutionProvider", 2, 9, 1.0)
