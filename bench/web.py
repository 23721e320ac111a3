"""The web app: requests/s, p50 and p99 of `/api/patients/<id>/prediction` under concurrent signed-in
clients, served by `lungsql serve` (its own processes, as deployed) on loopback, loaded by wrk.

wrk (Debian's, written in C) keeps the load generator's CPU small next to the server's on the same
cores; a Python client sharing the server's cores costs as much CPU per request as the server. Every
answer's probability is checked first against `lungsql.predict_lung_cancer_batch` by a Python client
(`bench.http_load`); wrk then counts any status other than 200 as an error."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import tempfile
import time

from lungsql.bench.database import BenchDatabase
from lungsql.bench.sizes import Sizes
from lungsql.bench import http_load, procstat
from lungsql.client import users
from lungsql.webapp.server import default_workers, running

TARGET_P99_MS = 50.0
THREADS = 4  # lungsql serve's default, per process
USERNAME = "bench-clinician"

# Requests cycle over the paths; done() prints the figures as one JSON line.
_WRK_SCRIPT = """
local paths = {%s}
local n = 0
request = function()
  n = n + 1
  return wrk.format("GET", paths[(n %% #paths) + 1])
end
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format('{"requests": %%d, "duration_us": %%d, "connect": %%d, "read": %%d, "write": %%d, '
    .. '"status": %%d, "timeout": %%d, "p50_us": %%d, "p90_us": %%d, "p99_us": %%d, "max_us": %%d}\\n',
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max))
end
"""


def wrk(base_url: str, cookie: str, paths: list[str], clients: int, seconds: float) -> dict:
    """One wrk run: `clients` connections (keep-alive), each sending its next request when the last
    one is answered, for `seconds`."""
    binary = shutil.which("wrk")
    if binary is None:
        raise RuntimeError("wrk is not installed: run `make bootstrap` (Debian package wrk)")
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
        script.write(_WRK_SCRIPT % ", ".join(json.dumps(p) for p in paths))
    try:
        out = subprocess.run([binary, "-t", str(min(clients, default_workers())), "-c", str(clients),
                              "-d", f"{max(1, round(seconds))}s", "--timeout", "10s", "-s", script.name,
                              "-H", f"Cookie: {cookie}", base_url], capture_output=True, text=True, check=True)
    finally:
        os.unlink(script.name)
    figures = json.loads(out.stdout.strip().splitlines()[-1])
    seconds = figures["duration_us"] / 1e6
    errors = sum(figures[k] for k in ("connect", "read", "write", "status", "timeout"))
    return {"clients": clients, "requests": figures["requests"], "errors": errors, "seconds": round(seconds, 2),
            "requests_per_s": round(figures["requests"] / seconds, 1),
            "p50_ms": round(figures["p50_us"] / 1000, 2), "p90_ms": round(figures["p90_us"] / 1000, 2),
            "p99_ms": round(figures["p99_us"] / 1000, 2), "max_ms": round(figures["max_us"] / 1000, 2)}


def wait_until_warm(db: BenchDatabase, connections: int, timeout_s: float = 120.0) -> float:
    """Seconds until the server holds `connections` database sessions and none is still running
    lungsql.warm_up (read in pg_stat_activity as the superuser); at most `timeout_s`."""
    began = time.monotonic()
    while time.monotonic() - began < timeout_s:
        with db.connect() as conn:
            sessions, warming = conn.execute(
                "SELECT count(*), count(*) FILTER (WHERE state = 'active' AND query LIKE '%lungsql.warm_up%') "
                "FROM pg_stat_activity WHERE application_name = 'lungsql-web' AND usename = 'lungsql_web'").fetchone()
        if sessions >= connections and not warming:
            break
        time.sleep(0.2)
    return round(time.monotonic() - began, 1)


def run(db: BenchDatabase, sizes: Sizes) -> dict:
    password = secrets.token_urlsafe(16)
    users.add_user(db.engine, USERNAME, password, "clinician", replace=True)
    with db.connect() as conn:
        expected = dict(conn.execute(
            "SELECT patient_id, probability FROM lungsql.predict_lung_cancer_batch("
            "ARRAY(SELECT patient_id FROM lungsql.features))").fetchall())
    paths = [f"/api/patients/{pid}/prediction" for pid in sorted(expected)]

    def check(path: str, answer: dict) -> str | None:
        patient = path.split("/")[3]
        if abs(answer.get("probability", -1.0) - expected[patient]) > 1e-12:
            return f"{patient}: {answer.get('probability')} instead of {expected[patient]}"
        return None

    postmaster = db.cluster.status().pid
    with running(db.web_url, threads=THREADS) as server:
        # Each process takes requests once its database sessions have loaded Python and the model; the
        # first one may answer while the others still load.
        warm_s = wait_until_warm(db, default_workers() * THREADS)
        # The warm-up: every answer checked.
        warmup = http_load.run(server.url, USERNAME, password, paths, clients=sizes.web_clients,
                               requests_per_client=10 ** 9, seconds=sizes.web_warmup_seconds, check=check)
        opener = http_load.signed_in_opener(server.url, USERNAME, password)
        cookie = "; ".join(f"{c.name}={c.value}" for c in http_load.cookies(opener))
        before = (procstat.tree_cpu_seconds(server.pid), procstat.tree_cpu_seconds(postmaster),
                  procstat.machine_busy_seconds())
        load = wrk(server.url, cookie, paths, sizes.web_clients, sizes.web_seconds)
        after = (procstat.tree_cpu_seconds(server.pid), procstat.tree_cpu_seconds(postmaster),
                 procstat.machine_busy_seconds())
        fewer = [wrk(server.url, cookie, paths, n, sizes.web_sweep_seconds) for n in sizes.web_sweep_clients]
    web_cpu, db_cpu, busy = (b - a for a, b in zip(before, after))
    requests = max(load["requests"], 1)
    load["cpu_ms_per_request"] = {"web_processes": round(1000 * web_cpu / requests, 2),
                                  "database": round(1000 * db_cpu / requests, 2),
                                  "whole_machine": round(1000 * busy / requests, 2)}
    load["cores_busy"] = round(busy / load["seconds"], 2)
    return {
        "server": f"lungsql serve: {default_workers()} processes x {THREADS} threads",
        "client": "wrk",
        **load,
        "warmup": {**warmup.summary(), "first_errors": warmup.errors[:3], "pools_warm_after_s": warm_s},
        "fewer_clients": fewer,
        "target": {"value": load["p99_ms"], "at_most": TARGET_P99_MS,
                   "met": load["p99_ms"] <= TARGET_P99_MS and not load["errors"] and not warmup.errors},
    }
