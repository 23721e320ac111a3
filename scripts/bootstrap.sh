#!/usr/bin/env bash
# Install what lungsql needs and is missing, then nothing else:
#   1. Debian packages (PostgreSQL 15 with PL/Python), with apt-get;
#   2. .venv, a virtual environment with lungsql and its extras;
#   3. as root, the system user lungsql-web, which `lungsql serve` becomes when started as root.
# Safe to run again: a second run checks and returns in seconds.
set -euo pipefail
cd "$(dirname "$0")/.."

# chromium and chromium-driver: the web app's end-to-end test runs in a real headless browser.
# unixodbc: pyodbc's library, for SQL Server URLs (an ODBC driver such as tdsodbc is the site's choice).
# wrk: the HTTP load generator of `lungsql bench` (the web app under 32 clients).
# orthanc and orthanc-dicomweb: the PACS that `lungsql demo --pacs` and the PACS tests run on loopback.
# openjdk-17-jre-headless: the Java that Apache Spark (the spark extra) runs on.
# libpostgresql-jdbc-java: PostgreSQL's JDBC driver, for the benchmark of Spark's JDBC reads against
#   the connection per task that lungsql.spark uses.
APT_PACKAGES=(postgresql-15 postgresql-plpython3-15 postgresql-contrib chromium chromium-driver fonts-dejavu-core
              unixodbc wrk orthanc orthanc-dicomweb openjdk-17-jre-headless libpostgresql-jdbc-java)
EXTRAS="ml,openvino,codecs,export,mssql,pacs,spark,dev"

say() { printf '==> %s\n' "$*"; }

missing=()
for package in "${APT_PACKAGES[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed"; then
        missing+=("$package")
    fi
done
if [ ${#missing[@]} -gt 0 ]; then
    say "installing Debian packages: ${missing[*]}"
    SUDO=""
    if [ "$(id -u)" -ne 0 ]; then
        command -v sudo >/dev/null || { echo "need root or sudo to install: ${missing[*]}" >&2; exit 1; }
        SUDO=sudo
    fi
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# Python inside PostgreSQL is Debian's 3.11 (plpython3); the venv must have the
# same minor version so the server can import its binary wheels.
server_python=$(ldd /usr/lib/postgresql/15/lib/plpython3.so | sed -n 's/.*libpython\([0-9.]*\)\.so.*/\1/p' | head -n1)
PYTHON=${PYTHON:-}
if [ -z "$PYTHON" ]; then
    for candidate in python3 "python${server_python}" "/usr/bin/python${server_python}"; do
        if command -v "$candidate" >/dev/null &&
           [ "$("$candidate" -c 'import sys; print("%d.%d" % sys.version_info[:2])')" = "$server_python" ] &&
           "$candidate" -c 'import venv, ensurepip' 2>/dev/null; then
            PYTHON=$candidate
            break
        fi
    done
fi
if [ -z "$PYTHON" ]; then
    echo "no Python ${server_python} with venv found (the version of PL/Python); install python${server_python}-venv or set PYTHON" >&2
    exit 1
fi

if [ ! -x .venv/bin/python ]; then
    say "creating .venv with $PYTHON"
    "$PYTHON" -m venv .venv
fi

stamp=.venv/.lungsql-installed
want="$(cat pyproject.toml scripts/bootstrap.sh | sha256sum | cut -d' ' -f1)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    say "installing lungsql into .venv (extras: $EXTRAS)"
    .venv/bin/python -m pip install -q --upgrade pip
    # The CPU build of torch first, so the export extra's range is already met.
    .venv/bin/python -m pip install -q "torch==2.13.0"
    .venv/bin/python -m pip install -q -e ".[$EXTRAS]"
    echo "$want" > "$stamp"
fi

# `lungsql serve` started as root serves as this unprivileged system user (LUNGSQL_WEB_OS_USER), never
# as root. Only root can create it; as anyone else, serve runs as that user and needs none.
WEB_OS_USER=${LUNGSQL_WEB_OS_USER:-lungsql-web}
if [ "$(id -u)" -eq 0 ]; then
    if ! getent passwd "$WEB_OS_USER" >/dev/null; then
        say "creating the system user $WEB_OS_USER (lungsql serve runs as it when started as root)"
        useradd --system --no-create-home --shell /usr/sbin/nologin "$WEB_OS_USER"
    fi
    # That user runs the venv's Python. When the Python it was built from lives in a folder others may
    # not enter (pyenv in /root, say), let that user, and only it, traverse (x, not list) the folders above.
    if ! runuser -u "$WEB_OS_USER" -- .venv/bin/python -c 'import logging.config, lungsql, flask' 2>/dev/null; then
        base=$(.venv/bin/python -c 'import sys; print(sys.base_prefix)')
        if ! command -v setfacl >/dev/null; then
            say "installing the Debian package acl (setfacl)"
            apt-get update -qq
            DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends acl >/dev/null
        fi
        folder=""
        IFS=/ read -r -a parts <<< "${base#/}"
        for part in "${parts[@]}"; do
            folder="$folder/$part"
            if ! runuser -u "$WEB_OS_USER" -- test -x "$folder"; then
                say "letting $WEB_OS_USER traverse $folder (it runs the Python under $base)"
                setfacl -m "u:$WEB_OS_USER:x" "$folder"
            fi
        done
        runuser -u "$WEB_OS_USER" -- .venv/bin/python -c 'import logging.config, lungsql, flask' || {
            echo "the OS user $WEB_OS_USER cannot run .venv/bin/python; make the project and $base readable to it" >&2
            exit 1
        }
    fi
fi
say "bootstrap complete"
