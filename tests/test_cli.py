"""The `lungsql` command as a user runs it: help, settings, errors, synth and ingest."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import sqlalchemy as sa
from click.testing import CliRunner

import config_preprocessing as config
from lungsql.client import docs
from lungsql.client.cli import main
from lungsql.errors import ConfigurationError


def lungsql(*args: str, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lungsql", *args], capture_output=True, text=True, env=env,
                          timeout=300)


def test_readme_is_up_to_date_with_the_settings_and_the_cli():
    readme = docs.README.read_text(encoding="utf-8")
    assert docs.render(readme) == readme, "run `python scripts/update_readme.py`"
    for name in config.SETTINGS:
        assert f"`{name}`" in readme


def test_every_setting_has_help_and_is_read_from_its_environment_variable(monkeypatch):
    for setting in config.SETTINGS.values():
        assert setting.name.startswith("LUNGSQL_") and len(setting.help) > 20
    monkeypatch.setenv("LUNGSQL_HU_WINDOW", "-900:300")
    assert config.get("LUNGSQL_HU_WINDOW") == (-900.0, 300.0)
    monkeypatch.setenv("LUNGSQL_BATCH_SIZE", "0")
    with pytest.raises(ConfigurationError, match="the setting LUNGSQL_BATCH_SIZE='0' is not valid: expected a "
                                                 "positive integer"):
        config.get("LUNGSQL_BATCH_SIZE")


#: LUNGSQL_ names in the code that are not settings.
NOT_SETTINGS = {"LUNGSQL_DEID_1", "LUNGSQL_SYNTH"}


def test_every_lungsql_variable_the_code_names_is_a_declared_setting():
    root = Path(config.__file__).parent
    named = set()
    for folder in ("lungsql", "webapp", "bench", "scripts"):
        for path in (root / folder).rglob("*"):
            if path.suffix in (".py", ".sh", ".sql"):
                named |= set(re.findall(r"\b(LUNGSQL_[A-Z0-9_]*[A-Z0-9])\b", path.read_text(encoding="utf-8")))
    undeclared = sorted(named - set(config.SETTINGS) - NOT_SETTINGS)
    assert not undeclared, f"declare these in config_preprocessing.py (or list them in NOT_SETTINGS): {undeclared}"


def test_a_bad_setting_is_a_message_not_a_traceback():
    result = lungsql("settings", env={"PATH": "/usr/bin:/bin", "LUNGSQL_WEB_SEARCH_LIMIT": "lots"})
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "the setting LUNGSQL_WEB_SEARCH_LIMIT='lots' is not valid" in result.stderr
    assert "Unset it for the default" in result.stderr


def test_version_and_help():
    result = lungsql("--version")
    assert result.returncode == 0 and "lungsql, version" in result.stdout
    result = lungsql("--help")
    for command in ("db", "init", "ingest", "synth", "demo", "settings", "check"):
        assert re.search(rf"^\s+{command}\s", result.stdout, re.M), command


def test_unreachable_database_is_a_message_not_a_traceback(tmp_path):
    env = {"PATH": "/usr/bin:/bin", "LUNGSQL_HOME": str(tmp_path / "nowhere")}
    result = lungsql("init", env=env)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert "local database is not running" in result.stderr and "lungsql db start" in result.stderr


def test_synth_then_ingest_from_the_command_line(db_env, tmp_path):
    runner = CliRunner()
    out = tmp_path / "cohort"
    result = runner.invoke(main, ["synth", str(out), "--patients", "2", "--slices", "3:4", "--seed", "3"])
    assert result.exit_code == 0, result.output
    assert "for 2 patients" in result.output
    files = sorted(out.rglob("*.dcm"))
    (out / "junk.dcm").write_text("not an image")
    assert runner.invoke(main, ["init"]).exit_code == 0
    result = runner.invoke(main, ["ingest", str(out)])
    assert result.exit_code == 0, result.output
    assert f"{len(files) + 1} files" in result.output and f"{len(files)} stored" in result.output
    assert "1 rejected" in result.output and "files/s" in result.output
    assert "junk.dcm: not a DICOM file" in result.output
    engine = sa.create_engine(db_env)
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM lungsql.scans")).scalar() == len(files)
    engine.dispose()


def test_bad_slice_range_is_explained(tmp_path):
    result = CliRunner().invoke(main, ["synth", str(tmp_path), "--slices", "9:3"])
    assert result.exit_code == 2 and "need 1 <= A <= B" in result.output
