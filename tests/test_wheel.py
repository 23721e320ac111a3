"""lungsql as a package: the wheel built from this checkout, installed into a throwaway venv outside
the checkout, runs `lungsql init` and `lungsql check` against the test cluster.

The venv gets lungsql from the wheel only (installed without dependencies, from no index); its
dependencies come from the development venv's site-packages, added as a plain path (so that the
development venv's editable lungsql is not activated there).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                    "--wheel-dir", str(out), str(ROOT)], check=True, timeout=600, cwd=out)
    (found,) = out.glob("lungsql-*.whl")
    return found


@pytest.fixture(scope="module")
def installed(wheel):
    """A venv outside the checkout with the wheel installed; returns its folder. Under /tmp with o+x,
    like the test cluster: the server's OS user must read what it imports (pytest's own temporary
    folders are private to root)."""
    home = Path(tempfile.mkdtemp(prefix="lungsql-wheel-"))
    home.chmod(0o755)
    env_dir = home / "venv"
    # As a DBA gives the server its own environment (the dependencies come from the development venv).
    result = subprocess.run([sys.executable, "-m", "lungsql", "server-install", str(env_dir), "--from", str(wheel),
                             "--no-deps"], capture_output=True, text=True, timeout=300, cwd=home)
    assert result.returncode == 0, result.stderr
    assert f"{env_dir}/bin/lungsql init" in result.stdout
    python = env_dir / "bin" / "python"
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    deps = site / "lungsql-test-dependencies.pth"
    deps.write_text(sysconfig.get_paths()["purelib"] + "\n")
    deps.chmod(0o644)
    yield env_dir
    shutil.rmtree(home, ignore_errors=True)


def test_the_wheel_holds_the_sql_and_nothing_generic_at_the_top(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    top = {name.split("/")[0] for name in names}
    assert top == {"lungsql", "config_preprocessing.py", wheel.name.split("-")[0] + "-0.1.0.dist-info"}, top
    for packaged in ("lungsql/sql/postgres/migrations/001_foundation.sql", "lungsql/sql/postgres/functions/010_pipeline.sql",
                     "lungsql/sql/mssql/02_procedures.sql", "lungsql/webapp/templates/base.html",
                     "lungsql/webapp/static/viewer.js", "lungsql/bench/__init__.py"):
        assert packaged in names, packaged


def test_the_servers_environment_is_read_only_for_everyone_but_its_owner(installed):
    for path in [installed, *installed.rglob("*")]:
        if path.is_symlink():
            continue
        status = path.stat()
        assert not status.st_mode & 0o022, path
        if os.geteuid() == 0:
            assert status.st_uid == 0, path


def test_the_installed_package_initialises_and_checks_a_database(installed, empty_db, tmp_path):
    env = {"PATH": f"{installed / 'bin'}:/usr/bin:/bin", "HOME": str(tmp_path), "LUNGSQL_DATABASE_URL": empty_db}
    lungsql = str(installed / "bin" / "lungsql")
    where = subprocess.run([str(installed / "bin" / "python"), "-c", "import lungsql; print(lungsql.__file__)"],
                           capture_output=True, text=True, check=True, env=env, cwd=tmp_path).stdout
    assert where.startswith(str(installed)), where  # the wheel's lungsql, not the checkout's
    init = subprocess.run([lungsql, "init"], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert init.returncode == 0, init.stderr
    assert "applied migration 001_foundation.sql" in init.stdout
    check = subprocess.run([lungsql, "check"], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert check.returncode == 0, check.stderr
    rows = {line.split()[0]: line.split()[-1] for line in check.stdout.splitlines()[2:] if line.strip()}
    assert rows["lungsql"].startswith(str(installed)), rows  # the server imports the installed lungsql too
    assert str(ROOT) not in rows["lungsql"]
    assert os.path.isdir(rows["numpy"])


def test_the_installed_package_runs_the_demo_with_a_cluster_of_its_own(installed):
    state = Path(tempfile.mkdtemp(prefix="lungsql-wheel-state-"))
    state.chmod(0o755)  # the server's OS user enters the cluster's folder
    env = {"PATH": f"{installed / 'bin'}:/usr/bin:/bin", "HOME": os.environ.get("HOME", "/root"),
           "LUNGSQL_HOME": str(state / "home"), "LUNGSQL_DATA_PATH": str(state / "data")}
    lungsql = str(installed / "bin" / "lungsql")
    try:
        demo = subprocess.run([lungsql, "demo", "--no-serve", "--patients", "8", "--slices", "3:4",
                               "--cnn", "efficientnet-lite0", "--xray-patients", "16"],
                              capture_output=True, text=True, env=env, cwd=state, timeout=900)
        assert demo.returncode == 0, demo.stderr[-2000:]
        for step in ("starting the local database", "applied migration 001_foundation.sql",
                     "CALL lungsql.generate_features(cnn_name => 'efficientnet-lite0')",
                     "SELECT lungsql.predict_lung_cancer(...)",
                     "CALL lungsql.generate_features(cnn_name => 'efficientnet-lite0', task => 'chest_xray14')",
                     "SELECT * FROM lungsql.train_findings(", "SELECT * FROM lungsql.predict_findings(", "==> done"):
            assert step in demo.stdout, step
    finally:
        subprocess.run([lungsql, "db", "stop"], capture_output=True, env=env, timeout=120)
        shutil.rmtree(state, ignore_errors=True)
