"""The web app: requests/s, p50 and p99 of `/api/patients/<id>/prediction` under concurrent signed-in
clients, served by waitress on loopback as `lungsql serve` serves it."""

from __future__ import annotations

import contextlib
import logging
import secrets
import threading
from typing import Iterator

from bench.database import BenchDatabase
from bench.sizes import Sizes
from lungsql import http_load, users

TARGET_P99_MS = 50.0
THREADS = 8  # lungsql serve's default
USERNAME = "bench-clinician"


@contextlib.contextmanager
def served(web_url: str) -> Iterator[str]:
    import waitress

    from webapp import create_app
    from webapp.db import ENGINE

    # 32 clients on 8 threads queue by design: waitress's "Task queue depth" warnings are the load itself.
    logging.getLogger("waitress.queue").setLevel(logging.ERROR)
    app = create_app({"DATABASE_URL": web_url, "SECRET_KEY": secrets.token_hex(32)})
    server = waitress.create_server(app, host="127.0.0.1", port=0, threads=THREADS, ident="lungsql")
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.effective_port}"
    finally:
        server.close()
        thread.join(timeout=5)
        app.extensions[ENGINE].dispose()


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

    unbounded = 10 ** 9  # the run stops on time
    with served(db.web_url) as base_url:
        warmup = http_load.run(base_url, USERNAME, password, paths, clients=sizes.web_clients,
                               requests_per_client=unbounded, seconds=sizes.web_warmup_seconds, check=check)
        load = http_load.run(base_url, USERNAME, password, paths, clients=sizes.web_clients,
                             requests_per_client=unbounded, seconds=sizes.web_seconds, check=check)
    summary = load.summary()
    return {
        "clients": sizes.web_clients,
        "server_threads": THREADS,
        **summary,
        "first_errors": load.errors[:3],
        "warmup": warmup.summary(),
        "target": {"value": summary["p99_ms"], "at_most": TARGET_P99_MS,
                   "met": summary["p99_ms"] <= TARGET_P99_MS and not load.errors},
    }
