"""The clinician web app against a real database, as its users see it.

One database for the module (tests/webapp_fixtures.py): a synthetic cohort,
CNN features, two models of one name, a clinician 'clin' and an admin 'boss',
and a synthetic chest radiograph cohort with its findings' model (patients
with an ID and no name, whose pages and radiograph pages are tested too).
The app connects as the least-privileged role lungsql_web, as `lungsql serve`
does; the tests check what they need as the superuser.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import itertools
import json
import re
import time

import cv2
import numpy as np
import pytest
import sqlalchemy as sa

from lungsql import dicom
from lungsql.client import users
from lungsql.ml import preprocess
from lungsql.errors import ConfigurationError
from lungsql.webapp import create_app
from lungsql.webapp import radiographs as radiograph_pages
from lungsql.webapp.db import ENGINE
from lungsql.webapp.scoring import DeployedModel, band_of
from webapp_fixtures import (BROKEN_SCAN, METACHARACTERS, MODEL_NAME, NO_FEATURES, PASSWORDS, RADIOGRAPH_MODEL,
                             RADIOGRAPH_SIZE, add_radiographs, csrf_token, login)

WINDOW = "-1000:400"  # LUNGSQL_HU_WINDOW's default, part of every slice's ETag

SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "same-origin",
}


# -- fixtures ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def web_db(web_db, tmp_path_factory):
    """The web app's database (conftest.py) with the chest radiograph task too."""
    engine = web_db.engine()
    try:
        web_db.radiographs = add_radiographs(engine, tmp_path_factory.mktemp("radiographs"))
    finally:
        engine.dispose()
    return web_db


@pytest.fixture(scope="module")
def app(web_db):
    app = create_app({"DATABASE_URL": web_db.web_url, "SECRET_KEY": "test-only-secret", "TESTING": True})
    yield app
    app.extensions[ENGINE].dispose()


_addresses = (f"10.1.{i // 250}.{i % 250 + 1}" for i in itertools.count())


@pytest.fixture
def client(app):
    """A browser of its own: a fresh cookie jar and its own address (failed sign-ins are counted per address)."""
    client = app.test_client()
    client.environ_base["REMOTE_ADDR"] = next(_addresses)
    return client


@pytest.fixture
def clinician(client):
    assert login(client, "clin").status_code == 302
    return client


@pytest.fixture
def boss(app):
    client = app.test_client()
    client.environ_base["REMOTE_ADDR"] = next(_addresses)
    assert login(client, "boss").status_code == 302
    return client


def audit_rows(su, action: str, **where) -> list:
    clauses = "".join(f" AND {column} = :{column}" for column in where)
    with su.connect() as conn:
        return conn.execute(sa.text(f"SELECT * FROM lungsql.audit_log WHERE action = :action{clauses} "
                                    "ORDER BY audit_id"), {"action": action, **where}).all()


def scalar(su, sql: str, **params):
    with su.connect() as conn:
        return conn.execute(sa.text(sql), params).scalar()


def deployed(su, name: str = MODEL_NAME) -> int:
    return scalar(su, "SELECT model_id FROM lungsql.deployments WHERE name = :n "
                      "ORDER BY deployment_id DESC LIMIT 1", n=name)


def text(response) -> str:
    return response.get_data(as_text=True)


# -- signing in and out -----------------------------------------------------------------
def test_sign_in_opens_a_session_with_a_safe_cookie_and_is_audited(client, su):
    response = login(client, "clin")
    assert response.status_code == 302 and response.headers["Location"] == "/patients"
    cookie = response.headers["Set-Cookie"]
    assert "HttpOnly" in cookie and "SameSite=Lax" in cookie and "lungsql_session=" in cookie
    assert client.get("/patients").status_code == 200
    address = client.environ_base["REMOTE_ADDR"]
    assert [r.username for r in audit_rows(su, "login", address=address)] == ["clin"]


@pytest.mark.parametrize("username, password", [("clin", "wrong-password"), ("nobody", "whatever-123"),
                                                ("", ""), ("bad name\x00<b>", "x")])
def test_failed_sign_in_says_so_opens_no_session_and_is_audited(client, su, username, password):
    response = login(client, username, password)
    assert response.status_code == 200
    assert "Unknown user name or wrong password." in text(response)
    assert "<b>" not in text(response)
    assert client.get("/patients").status_code == 302
    rows = audit_rows(su, "login_failed", address=client.environ_base["REMOTE_ADDR"])
    assert len(rows) == 1 and rows[0].detail["failures"] == 1


def test_next_page_after_sign_in_stays_on_this_site(client):
    token = csrf_token(text(client.get("/login")))
    for target, expected in (("/admin/", "/admin/"), ("//evil.example/x", "/patients"),
                             ("https://evil.example/", "/patients"), ("/\\evil.example", "/patients")):
        response = client.post("/login", data={"username": "clin", "password": PASSWORDS["clin"],
                                               "csrf_token": token, "next": target})
        assert response.headers["Location"] == expected
        token = csrf_token(text(client.get("/patients")))


def test_pages_redirect_to_sign_in_without_a_session(client, web_db):
    for path in ("/", "/patients", "/patients?q=ana", f"/patients/{web_db.ana_id}",
                 f"/patients/{web_db.ana_id}/slices/0.png", "/admin/", "/no-such-page"):
        response = client.get(path)
        assert response.status_code == 302, path
        assert response.headers["Location"].startswith("/login?next="), path
    assert client.get("/login").status_code == 200
    assert client.get("/static/style.css").status_code == 200
    assert client.get("/static/viewer.js").status_code == 200


def test_api_answers_401_json_without_a_session(client, web_db):
    for path in ("/api/patients?q=ana", f"/api/patients/{web_db.ana_id}",
                 f"/api/patients/{web_db.ana_id}/prediction", "/api/nothing-here"):
        response = client.get(path)
        assert response.status_code == 401, path
        assert response.is_json and response.json["status"] == 401, path


def test_posts_without_csrf_token_are_rejected(client, boss, su):
    response = client.post("/login", data={"username": "clin", "password": PASSWORDS["clin"]})
    assert response.status_code == 400 and "CSRF" in text(response)
    assert client.get("/patients").status_code == 302  # not signed in
    before = scalar(su, "SELECT count(*) FROM lungsql.deployments")
    response = boss.post("/admin/deploy", data={"name": MODEL_NAME, "strategy": "most_recent"})
    assert response.status_code == 400
    assert scalar(su, "SELECT count(*) FROM lungsql.deployments") == before
    response = boss.post("/logout", data={"csrf_token": "forged"})
    assert response.status_code == 400
    assert boss.get("/patients").status_code == 200  # still signed in


def test_sign_out_needs_a_post_with_token_ends_the_session_and_is_audited(clinician, su):
    assert clinician.get("/logout").status_code == 405
    token = csrf_token(text(clinician.get("/patients")))
    response = clinician.post("/logout", data={"csrf_token": token})
    assert response.status_code == 302 and response.headers["Location"] == "/login"
    assert "You are signed out." in text(clinician.get("/login"))
    assert clinician.get("/patients").status_code == 302
    assert len(audit_rows(su, "logout", address=clinician.environ_base["REMOTE_ADDR"])) == 1


def _age_sign_ins(su, address: str, seconds: int) -> None:
    """Time passes for the sign-in attempts from `address`: their audit rows move into the past."""
    with su.begin() as conn:
        conn.execute(sa.text("UPDATE lungsql.audit_log SET occurred_at = occurred_at - make_interval(secs => :s) "
                             "WHERE address = :address AND action IN ('login', 'login_failed')"),
                     {"s": seconds, "address": address})


def test_repeated_failed_sign_ins_are_slowed_down(app, client, su):
    address = client.environ_base["REMOTE_ADDR"]
    for attempt in range(1, 6):
        response = login(client, "clin", "not-the-password")
        assert response.status_code == 200
    assert "wait 30 s" in text(response)  # the fifth failure says how long to wait
    assert audit_rows(su, "login_failed", address=address)[-1].detail == {"failures": 5, "wait_s": 30}
    # Locked: even the right password is not checked.
    response = login(client, "clin")
    assert response.status_code == 429
    assert response.headers["Retry-After"] == "30" and "wait 30 s" in text(response)
    assert audit_rows(su, "login_locked", address=address)[-1].detail == {"retry_after_s": 30, "limit": "name_address"}
    _age_sign_ins(su, address, 20)
    assert login(client, "clin").headers["Retry-After"] == "10"
    # Another user from the same address, or the same user elsewhere, is not held up.
    other = app.test_client()
    other.environ_base["REMOTE_ADDR"] = next(_addresses)
    assert login(other, "clin").status_code == 302
    # Once the wait is over one more try is allowed; failing again doubles the wait.
    _age_sign_ins(su, address, 11)
    assert login(client, "clin", "still-wrong").status_code == 200
    assert login(client, "clin").headers["Retry-After"] == "60"
    _age_sign_ins(su, address, 61)
    assert login(client, "clin").status_code == 302  # the right password now works
    # ...and clears this name's failures from this address: a new mistake is the first one.
    fresh = app.test_client()
    fresh.environ_base["REMOTE_ADDR"] = address
    assert login(fresh, "clin", "typo").status_code == 200
    assert audit_rows(su, "login_failed", address=address)[-1].detail == {"failures": 1, "wait_s": 0}


def test_sign_in_throttling_is_shared_by_every_server_process(app, web_db, su):
    """A second app (another `lungsql serve` process) sees the failures the first one audited."""
    address = next(_addresses)
    first = app.test_client()
    first.environ_base["REMOTE_ADDR"] = address
    for _ in range(5):
        login(first, "boss", "wrong")
    second_app = create_app({"DATABASE_URL": app.config["DATABASE_URL"], "SECRET_KEY": "test-only-secret",
                             "TESTING": True})
    try:
        second = second_app.test_client()
        second.environ_base["REMOTE_ADDR"] = address
        assert login(second, "boss").status_code == 429
    finally:
        second_app.extensions[ENGINE].dispose()


def test_many_names_from_one_address_are_slowed_down_too(app, su):
    address = next(_addresses)
    client = app.test_client()
    client.environ_base["REMOTE_ADDR"] = address
    limit = app.config["LOGIN_MAX_FAILURES_PER_ADDRESS"]
    with su.begin() as conn:  # limit - 1 failures with as many names, audited a minute ago
        conn.execute(sa.text("INSERT INTO lungsql.audit_log (occurred_at, username, action, address) "
                             "SELECT now() - interval '60 s', 'guess' || n, 'login_failed', :address "
                             "FROM generate_series(1, :n) AS n"), {"address": address, "n": limit - 1})
    response = login(client, "yet-another-name", "wrong")
    assert "wait 30 s" in text(response)
    assert login(client, "clin").status_code == 429


def _browser(app, address: str | None = None):
    client = app.test_client()
    client.environ_base["REMOTE_ADDR"] = address or next(_addresses)
    return client


def _alert(response) -> str:
    """The sign-in page's error message."""
    match = re.search(r'<p class="flash flash-error" role="alert">(.*?)</p>', text(response), re.S)
    assert match, text(response)
    return match.group(1)


def _sign_in_rows(su, username: str) -> dict[str, int]:
    with su.connect() as conn:
        return dict(conn.execute(sa.text("SELECT action, count(*) FROM lungsql.audit_log WHERE username = :u "
                                         "GROUP BY action"), {"u": username}).all())


def test_a_parallel_burst_of_wrong_passwords_is_stopped_at_the_limit(app, su):
    """20 attempts at once for one name from one address: each waits for the one before it in the
    database (advisory locks), so no more than LOGIN_MAX_FAILURES passwords are ever checked."""
    import threading

    users.add_user(su, "burst", "burst-password-1", "clinician")
    address, attempts = next(_addresses), 20
    clients = [_browser(app, address) for _ in range(attempts)]
    tokens = [csrf_token(text(c.get("/login"))) for c in clients]
    barrier, statuses = threading.Barrier(attempts), []

    def attempt(client, token):
        barrier.wait()
        response = client.post("/login", data={"username": "burst", "password": "guess", "csrf_token": token})
        statuses.append((response.status_code, text(response)))

    threads = [threading.Thread(target=attempt, args=pair) for pair in zip(clients, tokens)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    limit = app.config["LOGIN_MAX_FAILURES"]
    failed = [body for status, body in statuses if status == 200]
    locked = [body for status, body in statuses if status == 429]
    assert len(statuses) == attempts and len(failed) + len(locked) == attempts
    assert len(failed) <= limit and all("Unknown user name or wrong password." in body for body in failed)
    assert all("Too many failed sign-in attempts for this user name or from this address" in b for b in locked)
    assert _sign_in_rows(su, "burst") == {"login_failed": len(failed), "login_locked": len(locked)}
    assert len(failed) == limit  # serialized, not merely bounded
    # The right password is refused too while the wait lasts, without being checked.
    assert login(_browser(app, address), "burst", "burst-password-1").status_code == 429


def test_a_name_attacked_from_many_addresses_is_locked_for_every_address(app, su):
    users.add_user(su, "target", "target-password-1", "clinician")
    limit = app.config["LOGIN_MAX_FAILURES_PER_USER"]
    answers = [login(_browser(app), "target", f"guess-{n}") for n in range(limit + 3)]
    assert [a.status_code for a in answers] == [200] * limit + [429] * 3
    assert "wait 30 s" in text(answers[limit - 1])  # the failure that reached the limit says so
    assert all(a.headers["Retry-After"] == "30" for a in answers[limit:])
    # The right password, from yet another address, is refused until the wait is over.
    response = login(_browser(app), "target", "target-password-1")
    assert response.status_code == 429 and "wait 30 s" in _alert(response)
    with su.begin() as conn:  # 31 s pass for this name's attempts
        conn.execute(sa.text("UPDATE lungsql.audit_log SET occurred_at = occurred_at - interval '31 s' "
                             "WHERE username = 'target'"))
    assert login(_browser(app), "target", "target-password-1").status_code == 302
    assert _sign_in_rows(su, "target") == {"login_failed": limit, "login_locked": 4, "login": 1}


def test_the_locked_answer_is_the_same_for_unknown_and_existing_names(app, su):
    users.add_user(su, "known", "known-password-1", "clinician")
    limit = app.config["LOGIN_MAX_FAILURES"]
    answers = {}
    for name in ("known", "no-such-user"):
        client = _browser(app)
        for _ in range(limit):
            assert "Unknown user name or wrong password." in _alert(login(client, name, "wrong-password"))
        with su.begin() as conn:  # both names' failures as old, so that both wait as long
            conn.execute(sa.text("UPDATE lungsql.audit_log SET occurred_at = clock_timestamp() - interval '5.5 s' "
                                 "WHERE username = :u"), {"u": name})
        answers[name] = login(client, name, "wrong-password")
    known, unknown = answers["known"], answers["no-such-user"]
    assert known.status_code == unknown.status_code == 429
    assert known.headers["Retry-After"] == unknown.headers["Retry-After"] == "25"
    assert _alert(known) == _alert(unknown) == ("Too many failed sign-in attempts for this user name or from "
                                                "this address: wait 25 s and try again.")


def test_a_disabled_user_fails_like_a_wrong_password(app, su):
    users.add_user(su, "gone", "gone-password-1", "clinician")
    with su.begin() as conn:
        conn.execute(sa.text("UPDATE lungsql.users SET disabled = true WHERE username = 'gone'"))
    client = _browser(app)
    response = login(client, "gone", "gone-password-1")
    assert response.status_code == 200 and _alert(response) == "Unknown user name or wrong password."
    assert client.get("/patients").status_code == 302
    assert _sign_in_rows(su, "gone") == {"login_failed": 1}


@pytest.mark.parametrize("url", ["postgresql+psycopg://lungsql_web@127.0.0.1:1/lungsql",
                                 "postgresql+psycopg://lungsql_web@/lungsql?host=/no/such/socket-dir"],
                         ids=["closed-port", "missing-socket"])
def test_an_unreachable_database_says_so_without_naming_where_or_as_whom(url):
    app = create_app({"DATABASE_URL": url, "SECRET_KEY": "test-only-secret", "TESTING": True})
    try:
        client = app.test_client()
        token = csrf_token(text(client.get("/login")))  # the sign-in form needs no database
        page = client.post("/login", data={"username": "clin", "password": "x", "csrf_token": token})
        with client.session_transaction() as session:  # a visitor whose session names a user
            session["user_id"] = 1
        api = client.get("/api/patients?q=ana")
        for response in (page, api):
            body = text(response)
            assert response.status_code == 503
            assert "The database cannot be reached right now. Try again in a moment." in body
            assert "What to do" not in body and "hint" not in body
            for secret in ("lungsql_web", "127.0.0.1", "port 1", "port=", "5432", ".s.PGSQL", "socket", "/no/such",
                           "refused", "No such file", "WEB_DATABASE", "--web-db", "PostgreSQL"):
                assert secret not in body, secret
        assert api.is_json and api.json == {"error": "database unavailable", "status": 503,
                                            "message": "The database cannot be reached right now. Try again in a "
                                                       "moment."}
    finally:
        app.extensions[ENGINE].dispose()


def test_a_disabled_user_loses_the_session_at_the_next_click(app, su):
    users.add_user(su, "temp", "temporary-password", "clinician")
    client = app.test_client()
    client.environ_base["REMOTE_ADDR"] = next(_addresses)
    assert login(client, "temp", "temporary-password").status_code == 302
    assert client.get("/patients").status_code == 200
    with su.begin() as conn:
        conn.execute(sa.text("UPDATE lungsql.users SET disabled = true WHERE username = 'temp'"))
    assert client.get("/patients").status_code == 302
    assert client.get("/api/patients?q=ana").status_code == 401


def test_a_disabled_user_gets_no_prediction_and_nothing_is_recorded_in_their_name(app, web_db, su):
    """The prediction API reads the user's row in its scoring statement (auth.checks_user_itself): a
    user disabled since the last click is refused there, before anyone is scored, and signed out."""
    users.add_user(su, "temp-api", "temporary-password", "clinician")
    client = _browser(app)
    assert login(client, "temp-api", "temporary-password").status_code == 302
    ana = f"/api/patients/{web_db.ana_id}/prediction"
    assert client.get(ana).status_code == 200
    predictions = scalar(su, "SELECT count(*) FROM lungsql.predictions")
    with su.begin() as conn:
        conn.execute(sa.text("UPDATE lungsql.users SET disabled = true WHERE username = 'temp-api'"))
    user_id = scalar(su, "SELECT user_id FROM lungsql.users WHERE username = 'temp-api'")
    for path in (ana, f"/api/patients/{NO_FEATURES[0]}/prediction", f"/api/patients/{'x' * 65}/prediction"):
        with client.session_transaction() as session:  # the session signed while the user was enabled
            session["user_id"] = user_id
        response = client.get(path)
        assert response.status_code == 401 and response.is_json and response.json["status"] == 401, path
        assert client.get("/api/patients?q=ana").status_code == 401, path  # the session was ended
    assert scalar(su, "SELECT count(*) FROM lungsql.predictions") == predictions
    scored = [r.action for r in _audit_of(su, "temp-api") if r.action.startswith("score")]
    assert scored == ["score_patient"]  # the one before the user was disabled


def _audit_of(su, username: str) -> list:
    with su.connect() as conn:
        return conn.execute(sa.text("SELECT * FROM lungsql.audit_log WHERE username = :u ORDER BY audit_id"),
                            {"u": username}).all()


def test_a_prediction_is_one_statement_in_the_database(app, web_db, clinician, monkeypatch):
    """The user's row, the score, the prediction row and the audit row: one statement, committed as it
    ends (the app's connections are in autocommit: no BEGIN, no COMMIT)."""
    import psycopg

    statements = []
    execute = psycopg.Cursor.execute

    def counted(cursor, query, *args, **kwargs):
        statements.append(query)
        return execute(cursor, query, *args, **kwargs)

    monkeypatch.setattr(psycopg.Cursor, "execute", counted)
    response = clinician.get(f"/api/patients/{web_db.ana_id}/prediction")
    monkeypatch.undo()
    assert response.status_code == 200
    assert len(statements) == 1 and "lungsql.predict_lung_cancer_detail" in statements[0], statements
    with app.extensions[ENGINE].connect() as conn:
        assert conn.connection.driver_connection.autocommit


def test_a_session_lasts_its_hours_from_the_sign_in_not_from_the_last_click(web_db):
    """The cookie is signed at sign-in (and when the session changes), not again with every answer:
    clicking does not stretch a sign-in beyond LUNGSQL_WEB_SESSION_HOURS."""
    app = create_app({"DATABASE_URL": web_db.web_url, "SECRET_KEY": "test-only-secret", "TESTING": True,
                      "PERMANENT_SESSION_LIFETIME": dt.timedelta(seconds=3)})
    try:
        client = _browser(app)
        signed_in = time.monotonic()
        assert login(client, "clin").status_code == 302
        prediction = f"/api/patients/{web_db.ana_id}/prediction"
        while time.monotonic() - signed_in < 2.0:
            response = client.get(prediction)
            assert response.status_code == 200 and "Set-Cookie" not in response.headers
            time.sleep(0.2)
        time.sleep(max(0.0, signed_in + 4.5 - time.monotonic()))
        assert client.get(prediction).status_code == 401  # 4.5 s after the sign-in, whatever the clicks
    finally:
        app.extensions[ENGINE].dispose()


def test_a_session_cookie_the_app_did_not_sign_is_refused(app, clinician, web_db, su):
    """Also once the genuine cookie has been seen: the app keeps the cookies it verified
    (webapp.sessions), by their exact text."""
    import base64

    from flask import Flask
    from flask.sessions import SecureCookieSessionInterface

    genuine = clinician.get_cookie("lungsql_session").value
    assert clinician.get("/api/patients?q=ana").status_code == 200  # verified, and kept
    payload, stamp, signature = genuine.split(".")
    boss = {"_permanent": True, "user_id": scalar(su, "SELECT user_id FROM lungsql.users WHERE username = 'boss'")}
    other = Flask("elsewhere")
    other.secret_key = "another-secret"
    forged = {
        "altered payload": base64.urlsafe_b64encode(json.dumps(boss).encode()).decode().rstrip("=")
                           + f".{stamp}.{signature}",
        "altered signature": f"{payload}.{stamp}.{'B' if signature[0] == 'A' else 'A'}{signature[1:]}",
        "another key": SecureCookieSessionInterface().get_signing_serializer(other).dumps(boss),
    }
    for what, cookie in forged.items():
        client = _browser(app)
        client.set_cookie("lungsql_session", cookie)
        for path in ("/api/patients?q=ana", f"/api/patients/{web_db.ana_id}/prediction"):
            assert client.get(path).status_code == 401, (what, path)
        assert client.get("/admin/").status_code == 302, what


def test_sessions_read_from_one_kept_cookie_are_each_their_own(app):
    """A kept cookie gives every request a session of its own: what one request changes in it (a
    flashed message) is not what the next request with that cookie reads."""
    from flask import request

    interface = app.session_interface
    with app.test_request_context():
        cookie = interface.get_signing_serializer(app).dumps({"user_id": 1, "_flashes": [("info", "first")]})

    def opened():
        with app.test_request_context(headers={"Cookie": f"lungsql_session={cookie}"}):
            return interface.open_session(app, request)

    first = opened()
    first["_flashes"].append(("info", "second"))
    first["user_id"] = 2
    again = opened()
    assert again["user_id"] == 1 and again["_flashes"] == [("info", "first")]


def test_a_pooled_connection_the_database_closed_is_replaced_unseen(web_db, su):
    """A connection unused for DATABASE_CHECK_IDLE_S is checked before a request gets it: one the
    database closed meanwhile (a restart, an idle timeout) is replaced, and the request answers."""
    app = create_app({"DATABASE_URL": web_db.web_url, "SECRET_KEY": "test-only-secret", "TESTING": True,
                      "DATABASE_POOL_SIZE": 1, "DATABASE_CHECK_IDLE_S": 0.0})
    engine = app.extensions[ENGINE]
    try:
        client = _browser(app)
        assert login(client, "clin").status_code == 302

        def backend() -> int:
            with engine.connect() as conn:
                return conn.execute(sa.text("SELECT pg_backend_pid()")).scalar()

        first = backend()
        with su.connect() as conn:
            assert conn.execute(sa.text("SELECT pg_terminate_backend(:p)"), {"p": first}).scalar()
        time.sleep(0.2)
        response = client.get(f"/api/patients/{web_db.ana_id}/prediction")
        assert response.status_code == 200 and 0.0 <= response.json["probability"] <= 1.0
        assert backend() != first
    finally:
        engine.dispose()


def test_a_connection_lost_during_a_request_costs_that_request_only(web_db, su):
    """The database closes the connection under a request (checked moments ago, so not checked again):
    that request says the database is unavailable (503), the connection is replaced, the next answers."""
    app = create_app({"DATABASE_URL": web_db.web_url, "SECRET_KEY": "test-only-secret", "TESTING": True,
                      "DATABASE_POOL_SIZE": 1, "DATABASE_CHECK_IDLE_S": 3600.0})
    engine = app.extensions[ENGINE]
    try:
        client = _browser(app)
        assert login(client, "clin").status_code == 302
        with engine.connect() as conn:
            first = conn.execute(sa.text("SELECT pg_backend_pid()")).scalar()
        with su.connect() as conn:
            assert conn.execute(sa.text("SELECT pg_terminate_backend(:p)"), {"p": first}).scalar()
        time.sleep(0.2)
        prediction = f"/api/patients/{web_db.ana_id}/prediction"
        lost = client.get(prediction)
        assert lost.status_code == 503 and lost.json["error"] == "database unavailable"
        assert client.get(prediction).status_code == 200
    finally:
        engine.dispose()


# -- search ---------------------------------------------------------------------------
@pytest.mark.parametrize("query", ["ana", "ANA", "fern", "  Ana   Fernandez ", "ANA FERNANDEZ"])
def test_search_by_part_of_the_name_in_any_case(clinician, web_db, query):
    response = clinician.get("/patients", query_string={"q": query}, follow_redirects=True)
    assert response.status_code == 200
    body = text(response)
    assert "Ana Fernandez" in body
    assert f"/patients/{web_db.ana_id}" in body or response.request.path == f"/patients/{web_db.ana_id}"


def test_search_lists_several_matches_with_their_details(clinician, su):
    with su.connect() as conn:
        expected = conn.execute(sa.text("SELECT name FROM lungsql.patients WHERE name ILIKE '%an%'")).scalars().all()
    assert len(expected) > 1
    response = clinician.get("/patients?q=an")
    body = text(response)
    assert response.status_code == 200 and "<table" in body
    for name in expected:
        assert name in body
    assert f"{len(expected)} patients match" in body
    assert "Known outcome" not in body  # the web app's role cannot read outcome labels


def test_search_results_are_capped(app, clinician):
    app.config["SEARCH_LIMIT"] = 3
    try:
        body = text(clinician.get("/patients?q=e"))
        assert body.count('<td class="mono">') == 3 and "The first 3 of" in body
        data = clinician.get("/api/patients?q=e").json
        assert len(data["patients"]) == 3 and data["truncated"] and data["total"] > 3
    finally:
        app.config["SEARCH_LIMIT"] = 50


def test_search_by_patient_id_prefix_or_whole_id(clinician, web_db):
    ana = web_db.ana_id
    response = clinician.get(f"/patients?q={ana}")
    assert response.status_code == 302 and response.headers["Location"] == f"/patients/{ana}"
    prefix = ana[:6]
    response = clinician.get(f"/patients?q={prefix.upper()}", follow_redirects=True)
    assert ana in text(response)
    data = clinician.get(f"/api/patients?q={prefix}").json
    assert ana in [p["patient_id"] for p in data["patients"]]
    assert all(p["patient_id"].startswith(prefix) or prefix in (p["name"] or "").lower() for p in data["patients"])


def test_search_says_when_no_patient_is_found(clinician):
    response = clinician.get("/patients?q=Zzyzx%20Nobody")
    assert response.status_code == 200 and "No patient found" in text(response)
    assert clinician.get("/api/patients?q=Zzyzx").json["patients"] == []


def test_like_metacharacters_match_themselves(clinician):
    for query in ("%", "_", "\\", "Per%cent_Under"):
        response = clinician.get("/patients", query_string={"q": query})
        assert response.status_code == 302, query  # only Olive's name holds them
        assert response.headers["Location"] == f"/patients/{METACHARACTERS[0]}"
    assert clinician.get("/patients?q=Per_cent").status_code == 200  # '_' is not a wildcard


HOSTILE = [
    "O'Brien", "ana'", '"ana"', "'; DROP TABLE lungsql.patients; --", "' OR '1'='1", "1; SELECT pg_sleep(10)",
    "<script>alert(1)</script>", "\"><script>alert(1)</script>", "<img src=x onerror=alert(1)>",
    "x" * 10_000, "ana" * 4000, "\u200fana\u200e", "\u202eana", "ana\x00", "\x00", "\x00<script>alert(1)</script>",
    "😀", "Ana 😀", "Ｆｅｒｎａｎｄｅｚ", "\ufeff", "%", "%%%%", "\\", "_", "' || pg_sleep(5) || '",
    "\r\n\t", "\u0000\u0001\u001f", "ç⁄€ﬁ", "𝔄𝔫𝔞",
]


@pytest.mark.parametrize("query", HOSTILE, ids=lambda q: repr(q[:20]))
def test_hostile_search_input_gives_an_ordinary_answer(clinician, su, query):
    started = time.monotonic()
    response = clinician.get("/patients", query_string={"q": query}, follow_redirects=True)
    assert response.status_code == 200
    body = text(response)
    assert "<script>alert" not in body and "<img src=x" not in body
    assert "No patient found" in body or "<table" in body or "Predicted probability" in body
    api = clinician.get("/api/patients", query_string={"q": query})
    assert api.status_code == 200 and api.is_json
    assert len(api.json["query"]) <= 200
    assert time.monotonic() - started < 5  # nothing slept
    assert scalar(su, "SELECT count(*) FROM lungsql.patients") > 0


def test_nul_and_invisible_marks_are_dropped_and_long_input_is_cut(clinician, web_db):
    response = clinician.get("/patients", query_string={"q": "ana fern\x00\u200fandez"})
    assert response.headers["Location"] == f"/patients/{web_db.ana_id}"
    body = text(clinician.get("/patients", query_string={"q": "fernandez" + "x" * 500}))
    assert "Only the first 200 characters" in body and "No patient found" in body


# -- the patient page ------------------------------------------------------------------------
def test_patient_page_shows_details_viewer_probability_and_model(clinician, web_db, su):
    ana = web_db.ana_id
    response = clinician.get(f"/patients/{ana}")
    assert response.status_code == 200
    body = text(response)
    with su.connect() as conn:
        patient = conn.execute(sa.text("SELECT * FROM lungsql.patients WHERE patient_id = :p"), {"p": ana}).one()
        slices = conn.execute(sa.text("SELECT count(*) FROM lungsql.scans WHERE patient_id = :p"), {"p": ana}).scalar()
        model = conn.execute(sa.text(
            "SELECT m.* FROM lungsql.deployments d JOIN lungsql.models m USING (model_id) WHERE d.name = :n "
            "ORDER BY d.deployment_id DESC LIMIT 1"), {"n": MODEL_NAME}).one()
    assert "Ana Fernandez" in body and ana in body and "Female" in body
    assert f"{int(patient.age_years)} years" in body
    assert f"<dt>CT slices</dt><dd>{slices}</dd>" in body
    # The probability, from the database, as a percentage in its colour band.
    match = re.search(r'<div class="probability band-(low|intermediate|high)">\s*<p class="percent">'
                      r'<span class="value">(\d+\.\d) %</span>', body)
    assert match, body
    band, percent = match.group(1), float(match.group(2))
    assert band == band_of(percent)[0]
    with su.connect() as conn:
        direct = conn.execute(sa.text("SELECT lungsql.predict_lung_cancer(:p)"), {"p": ana}).scalar()
    assert percent == round(direct * 100, 1)
    # The model that answered.
    assert f"{model.name} version {model.version}" in body and f"(model {model.model_id})" in body
    assert f"{model.metrics['auc']:.3f}" in body and "Validation AUC" in body
    assert model.trained_at.strftime("%Y-%m-%d") in body
    assert "Research tool, not a diagnosis" in body
    # The viewer: a slider over every slice, opening at the middle of the group of slices that weighed most.
    with su.connect() as conn:
        top = [r.slice_index for r in conn.execute(sa.text("SELECT * FROM lungsql.web_top_slices(:p, 3)"),
                                                   {"p": ana}) if r.rank == 1]
    assert f'<img class="slice-image" src="/patients/{ana}/slices/{top[len(top) // 2]}.png"' in body
    assert "Slices that weighed most towards a higher probability" in body and "not a diagnosis" in body
    assert f'type="range" min="0" max="{slices - 1}"' in body
    assert '<script src="/static/viewer.js">' in body
    assert "Known outcome" not in body


def test_nobody_sees_known_outcomes_not_even_admins(boss, web_db, su):
    """Training labels stay in the database: the web app's role cannot read them."""
    assert scalar(su, "SELECT label FROM lungsql.patients WHERE patient_id = :p", p=web_db.ana_id) is not None
    for path in (f"/patients/{web_db.ana_id}", "/patients?q=an"):
        body = text(boss.get(path))
        assert "Known outcome" not in body and "no cancer" not in body, path
    found = boss.get("/api/patients?q=an").json["patients"]
    assert found and all("label" not in p for p in found)
    assert "label" not in boss.get(f"/api/patients/{web_db.ana_id}").json


@pytest.mark.parametrize("percent, band", [(0.0, "low"), (19.9, "low"), (20.0, "intermediate"),
                                           (39.9, "intermediate"), (40.0, "high"), (100.0, "high")])
def test_colour_bands(percent, band):
    assert band_of(percent)[0] == band
    assert band_of(percent)[1] == {"low": "green", "intermediate": "orange", "high": "red"}[band]


def test_slice_images_are_lung_window_pngs_in_z_order_with_http_caching(clinician, web_db, su):
    ana = web_db.ana_id
    with su.connect() as conn:
        scans = conn.execute(sa.text(
            "SELECT dicom, sha256, rows, columns FROM lungsql.scans WHERE patient_id = :p "
            "ORDER BY z_position"), {"p": ana}).all()
    etags = []
    for index, scan in enumerate(scans):
        response = clinician.get(f"/patients/{ana}/slices/{index}.png")
        assert response.status_code == 200 and response.mimetype == "image/png"
        assert response.headers["Cache-Control"].startswith("private, max-age=")
        etags.append(response.headers["ETag"])
        image = cv2.imdecode(np.frombuffer(response.data, np.uint8), cv2.IMREAD_UNCHANGED)
        assert image.dtype == np.uint8 and image.shape == (scan.rows, scan.columns)
        expected = preprocess.window(dicom.slice_hu(bytes(scan.dicom)), -1000, 400, dtype=np.uint8)
        np.testing.assert_array_equal(image, expected)
    assert etags == [f'"{bytes(s.sha256).hex()}-{WINDOW}"' for s in scans]  # content and window
    # The browser asks again with the ETag: 304, no body.
    again = clinician.get(f"/patients/{ana}/slices/0.png", headers={"If-None-Match": etags[0]})
    assert again.status_code == 304 and again.data == b"" and again.headers["ETag"] == etags[0]
    other = clinician.get(f"/patients/{ana}/slices/0.png", headers={"If-None-Match": '"0000"'})
    assert other.status_code == 200 and other.data


def test_slices_out_of_range_and_of_unknown_patients_are_404(clinician, web_db):
    ana = web_db.ana_id
    with_slices = text(clinician.get(f"/patients/{ana}"))
    count = int(re.search(r"<dt>CT slices</dt><dd>(\d+)</dd>", with_slices).group(1))
    assert clinician.get(f"/patients/{ana}/slices/{count - 1}.png").status_code == 200
    for path in (f"/patients/{ana}/slices/{count}.png", f"/patients/{ana}/slices/999999999.png",
                 f"/patients/{ana}/slices/-1.png", f"/patients/{ana}/slices/x.png",
                 "/patients/nobody/slices/0.png", f"/patients/{NO_FEATURES[0]}/slices/0.png"):
        assert clinician.get(path).status_code == 404, path


def test_a_damaged_stored_scan_gives_a_readable_error(clinician):
    response = clinician.get(f"/patients/{BROKEN_SCAN[0]}/slices/0.png")
    assert response.status_code == 500
    body = text(response).lower()
    assert "not a dicom file" in body or "corrupt dicom" in body


@pytest.mark.parametrize("patient_id", ["nobody", "x" * 65, "%00", "a%00b", "%3Cscript%3E", "..", "%E2%80%8F"])
def test_unknown_patients_are_404_page_and_json(clinician, patient_id):
    page = clinician.get(f"/patients/{patient_id}")
    assert page.status_code == 404 and "Not found" in text(page) and "<script>" not in text(page)
    for path in (f"/api/patients/{patient_id}", f"/api/patients/{patient_id}/prediction"):
        api = clinician.get(path)
        assert api.status_code == 404 and api.is_json and api.json["status"] == 404, path


def test_a_patient_without_features_gets_a_message_instead_of_a_probability(clinician, su):
    patient_id = NO_FEATURES[0]
    response = clinician.get(f"/patients/{patient_id}")
    assert response.status_code == 200
    body = text(response)
    assert "No probability" in body and "No features for patient" in body
    assert "No CT slices are stored for this patient." in body
    assert 'class="probability band-' not in body
    api = clinician.get(f"/api/patients/{patient_id}/prediction")
    assert api.status_code == 409 and "no features" in api.json["message"]
    failures = audit_rows(su, "score_failed", patient_id=patient_id)
    assert len(failures) == 2 and {f.detail["via"] for f in failures} == {"web", "api"}


def test_without_a_deployed_model_the_page_says_so(cluster, engine, tmp_path):
    """A fresh database: a patient, a user, no model."""
    with engine.begin() as conn:
        conn.execute(sa.text("INSERT INTO lungsql.patients (patient_id, name) VALUES ('p1', 'Paula Nomodel')"))
    users.add_user(engine, "clin", PASSWORDS["clin"], "clinician")
    app = create_app({"DATABASE_URL": cluster.url(dbname=engine.url.database, user="lungsql_web"),
                      "SECRET_KEY": "test-only-secret"})
    try:
        client = app.test_client()
        login(client, "clin")
        response = client.get("/patients/p1")
        assert response.status_code == 200 and "No model is deployed" in text(response)
        assert client.get("/api/patients/p1/prediction").json["message"] == "no model is deployed"
    finally:
        app.extensions[ENGINE].dispose()


def test_views_and_scores_are_audited(clinician, web_db, su):
    ana = web_db.ana_id
    address = clinician.environ_base["REMOTE_ADDR"]
    clinician.get(f"/patients/{ana}")
    views = audit_rows(su, "view_patient", patient_id=ana, address=address)
    scores = audit_rows(su, "score_patient", patient_id=ana, address=address)
    assert len(views) == 1 and views[0].username == "clin" and views[0].detail == {"via": "web"}
    assert len(scores) == 1
    detail = scores[0].detail
    assert detail["model_id"] == deployed(su, detail["model_name"]) and 0.0 <= detail["probability"] <= 1.0
    assert detail["via"] == "web"
    clinician.get(f"/api/patients/{ana}")
    clinician.get(f"/api/patients/{ana}/prediction")
    assert len(audit_rows(su, "view_patient", patient_id=ana, address=address)) == 2
    assert [r.detail["via"] for r in audit_rows(su, "score_patient", patient_id=ana, address=address)] == ["web", "api"]


# -- chest radiographs ------------------------------------------------------------------------
FINDING_ROW = re.compile(r'<li class="finding band-(low|intermediate|high)" data-finding-name="(\w+)">.*?'
                         r'<span class="finding-percent value">(\d+\.\d) %</span>\s*'
                         r'<span class="finding-band band-label">(\w+) band \(([^)]*)\)</span>', re.S)


@pytest.fixture(scope="module")
def radiograph_app(web_db):
    """An app of its own for the radiograph pages, with one database connection: a database session
    takes seconds to load the findings' model the first time (lungsql.predict_findings checks each of
    its 14 boosters in a child process), so one session serves every test."""
    app = create_app({"DATABASE_URL": web_db.web_url, "SECRET_KEY": "test-only-secret", "TESTING": True,
                      "DATABASE_POOL_SIZE": 1})
    yield app
    app.extensions[ENGINE].dispose()


@pytest.fixture
def rx_clinician(radiograph_app):
    """The clinician signed in to radiograph_app, from an address of its own."""
    client = radiograph_app.test_client()
    client.environ_base["REMOTE_ADDR"] = next(_addresses)
    assert login(client, "clin").status_code == 302
    return client


def radiograph_patient(web_db, films: int = 2) -> tuple[str, list[int]]:
    """A patient of the radiograph cohort with at least `films` radiographs, and their image ids."""
    return next((p, ids) for p, ids in sorted(web_db.radiographs.images.items(), key=lambda i: int(i[0]))
                if len(ids) >= films)


def png(data: bytes) -> np.ndarray:
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    assert image is not None, "not a PNG"
    return image


def test_the_web_app_knows_the_findings_the_database_lists(su):
    with su.connect() as conn:
        listed = conn.execute(sa.text("SELECT finding FROM lungsql.findings WHERE task = 'chest_xray14' "
                                      "ORDER BY position")).scalars().all()
    assert tuple(listed) == radiograph_pages.FINDINGS and len(listed) == 14


def test_search_shows_ct_slices_and_radiographs_of_each_patient(rx_clinician, web_db, su):
    with su.connect() as conn:
        counts = {r.patient_id: (r.name, r.slices, r.radiographs) for r in conn.execute(sa.text(
            "SELECT p.patient_id, p.name, (SELECT count(*) FROM lungsql.scans s WHERE s.patient_id = p.patient_id) "
            "AS slices, (SELECT count(*) FROM lungsql.radiographs r WHERE r.patient_id = p.patient_id) AS radiographs "
            "FROM lungsql.patients p"))}
    rows = re.compile(r'<td><a href="/patients/([^"]+)">([^<]*)</a></td>\s*<td class="mono">[^<]*</td>\s*'
                      r'<td>[^<]*</td>\s*<td>[^<]*</td>\s*<td class="num">(\d+)</td>\s*<td class="num">(\d+)</td>')
    body = text(rx_clinician.get("/patients?q=1"))  # radiograph patients 1, 10 to 19, and CT IDs starting with 1
    for column in ("CT slices", "Radiographs"):
        assert f'<th scope="col" class="num">{column}</th>' in body
    listed = {m.group(1): (m.group(2), int(m.group(3)), int(m.group(4))) for m in rows.finditer(body)}
    assert {"1", "10", "19"} <= set(listed)
    for patient_id, (name, slices, radiographs) in listed.items():
        assert (slices, radiographs) == counts[patient_id][1:], patient_id
        assert name == (counts[patient_id][0] or "(no name)")
    assert listed["10"] == ("(no name)", 0, len(web_db.radiographs.images["10"]))
    named = {m.group(1): m.groups()[1:] for m in rows.finditer(text(rx_clinician.get("/patients?q=an")))}
    assert named and all(int(slices) > 0 and radiographs == "0" for _, slices, radiographs in named.values())
    # An exact ID comes first; a unique one opens the patient's page, as for CT patients.
    patient_id, _ = radiograph_patient(web_db)
    response = rx_clinician.get("/patients", query_string={"q": patient_id}, follow_redirects=True)
    assert response.request.path == f"/patients/{patient_id}" or re.search(
        rf'<tbody>\s*<tr>\s*<td><a href="/patients/{patient_id}">', text(response))


def test_the_patient_page_lists_radiographs_with_thumbnails_and_no_empty_ct_viewer(radiograph_app, rx_clinician,
                                                                                    web_db, su):
    patient_id, image_ids = radiograph_patient(web_db)
    address = rx_clinician.environ_base["REMOTE_ADDR"]
    body = text(rx_clinician.get(f"/patients/{patient_id}"))
    assert "<h1>(no name)</h1>" in body and f"<dt>Radiographs</dt><dd>{len(image_ids)}</dd>" in body
    assert "<dt>CT slices</dt><dd>0</dd>" in body
    with su.connect() as conn:
        films = conn.execute(sa.text("SELECT image_id, image_index, view_position, follow_up FROM lungsql.radiographs "
                                     "WHERE patient_id = :p ORDER BY follow_up, image_id"), {"p": patient_id}).all()
    rows = re.findall(r'<td class="mono"><a href="/radiographs/(\d+)">([^<]+)</a></td>\s*<td>([^<]+)</td>\s*'
                      r'<td class="num">(\d+)</td>', body)
    assert rows == [(str(f.image_id), f.image_index, f.view_position, str(f.follow_up)) for f in films]
    for film in films:
        assert (f'src="/radiographs/{film.image_id}/thumbnail.png" width="{RADIOGRAPH_SIZE}" '
                f'height="{RADIOGRAPH_SIZE}"') in body
    # Radiographs only: no CT viewer, nothing to say about CT, no lung-cancer scoring tried.
    assert "data-viewer" not in body and "CT scan" not in body and "No CT slices" not in body
    assert "Predicted probability of lung cancer" not in body and "viewer.js" not in body
    assert audit_rows(su, "score_failed", patient_id=patient_id, address=address) == []
    assert len(audit_rows(su, "view_patient", patient_id=patient_id, address=address)) == 1
    # A thumbnail is the whole range at most RADIOGRAPH_THUMBNAIL_SIDE pixels on its longer side.
    thumbnail = rx_clinician.get(f"/radiographs/{films[0].image_id}/thumbnail.png")
    assert thumbnail.status_code == 200 and png(thumbnail.data).shape == (RADIOGRAPH_SIZE, RADIOGRAPH_SIZE)
    radiograph_app.config["RADIOGRAPH_THUMBNAIL_SIDE"] = 48
    try:
        smaller = rx_clinician.get(f"/radiographs/{films[0].image_id}/thumbnail.png")
        assert png(smaller.data).shape == (48, 48) and smaller.headers["ETag"] != thumbnail.headers["ETag"]
        assert 'width="48" height="48"' in text(rx_clinician.get(f"/patients/{patient_id}"))
    finally:
        radiograph_app.config["RADIOGRAPH_THUMBNAIL_SIDE"] = 160
    # A CT patient keeps the viewer and shows no radiograph list.
    ana = text(rx_clinician.get(f"/patients/{web_db.ana_id}"))
    assert "data-viewer" in ana and "<dt>Radiographs</dt><dd>0</dd>" in ana and "Chest radiographs" not in ana


def test_the_radiograph_page_shows_the_14_findings_sorted_in_their_bands_and_is_audited(rx_clinician, web_db, su):
    patient_id, (image_id, *_) = radiograph_patient(web_db)
    address = rx_clinician.environ_base["REMOTE_ADDR"]
    before = scalar(su, "SELECT coalesce(max(prediction_id), 0) FROM lungsql.finding_predictions")
    response = rx_clinician.get(f"/radiographs/{image_id}")
    assert response.status_code == 200
    body = text(response)
    with su.connect() as conn:
        image = conn.execute(sa.text("SELECT * FROM lungsql.radiographs WHERE image_id = :i"), {"i": image_id}).one()
        recorded = conn.execute(sa.text("SELECT * FROM lungsql.finding_predictions WHERE prediction_id > :b"),
                                {"b": before}).all()
    # What the page showed is what lungsql.predict_findings recorded (and committed), in its order.
    assert {(r.image_id, r.model_id) for r in recorded} == {(image_id, web_db.radiographs.model_id)}
    expected = sorted(recorded, key=lambda r: (-r.probability, radiograph_pages.FINDINGS.index(r.finding)))
    assert f'Chest radiograph <span class="mono">{image.image_index}</span>' in body
    assert f'<a href="/patients/{patient_id}">← Back to patient' in body
    assert f'src="/radiographs/{image_id}/image.png"' in body and f"<dd>{image.view_position}</dd>" in body
    assert "Research tool, not a diagnosis" in body and '<script src="/static/radiograph.js">' in body
    # The 14 findings, most probable first, each as a percentage in the band of that percentage; a
    # finding the model has no booster for (too few positive training films) last, without one.
    assert len(expected) >= 12, "the radiograph cohort trains a booster for nearly every finding"
    assert body.count('<li class="finding ') == 14
    shown = FINDING_ROW.findall(body)
    assert [name for _, name, *_ in shown] == [r.finding for r in expected]
    percents = [float(percent) for _, _, percent, _, _ in shown]
    assert percents == sorted(percents, reverse=True)
    assert percents == [round(r.probability * 100, 1) for r in expected]
    for band, _, percent, label, wording in shown:
        assert (band, label.lower(), wording) == (band_of(float(percent))[0], band, band_of(float(percent))[2])
    assert body.count('class="link-button finding-name" data-finding=') == len(expected)
    assert body.count("Not estimated: too few training images showed it") == 14 - len(expected)
    model_id = scalar(su, "SELECT model_id FROM lungsql.deployments WHERE name = :n ORDER BY deployment_id DESC "
                          "LIMIT 1", n=RADIOGRAPH_MODEL)
    assert model_id == web_db.radiographs.model_id and f"(model {model_id})" in body and "Mean validation AUC" in body
    # The view is audited with what it showed; the probabilities are recorded, committed with it.
    rows = [r for r in audit_rows(su, radiograph_pages.VIEW_ACTION, patient_id=patient_id, address=address)
            if r.detail.get("image_id") == image_id]
    assert len(rows) == 1 and rows[0].username == "clin"
    detail = rows[0].detail
    assert detail["image_id"] == image_id and detail["image_index"] == image.image_index
    assert detail["model_id"] == model_id and detail["via"] == "web"
    assert detail["probabilities"] == {r.finding: pytest.approx(r.probability) for r in expected}


def test_radiograph_images_are_pngs_through_the_window_with_http_caching(rx_clinician, web_db, su):
    _, (image_id, *_) = radiograph_patient(web_db)
    stored = cv2.imread(str(web_db.radiographs.image_file(su, image_id)), cv2.IMREAD_UNCHANGED)
    sha = scalar(su, "SELECT encode(sha256, 'hex') FROM lungsql.radiographs WHERE image_id = :i", i=image_id)
    whole = rx_clinician.get(f"/radiographs/{image_id}/image.png")
    assert whole.status_code == 200 and whole.mimetype == "image/png"
    assert whole.headers["Cache-Control"].startswith("private, max-age=")
    assert whole.headers["ETag"] == f'"radiograph-{sha}-full-1024"'
    np.testing.assert_array_equal(png(whole.data), stored)  # the whole range is the file's own pixels
    # Another window is another image: what the window maps, clipped to black and white.
    narrow = rx_clinician.get(f"/radiographs/{image_id}/image.png?level=60&width=64")
    assert narrow.headers["ETag"] == f'"radiograph-{sha}-60:64-1024"'
    pixels = png(narrow.data)
    expected = np.clip((stored.astype(np.float64) - (60 - 32)) * 255 / 64, 0, 255)
    assert np.abs(pixels - expected).max() <= 1.0 and not np.array_equal(pixels, png(whole.data))
    assert (pixels == 255).mean() > (stored == 255).mean()
    # The browser asks again with the ETag: 304, no body; the page opens through a window too.
    again = rx_clinician.get(f"/radiographs/{image_id}/image.png?level=60&width=64",
                             headers={"If-None-Match": narrow.headers["ETag"]})
    assert again.status_code == 304 and again.data == b""
    page = text(rx_clinician.get(f"/radiographs/{image_id}?level=60&width=64"))
    assert f'src="/radiographs/{image_id}/image.png?level=60&amp;width=64"' in page and 'value="60"' in page


def test_a_findings_heat_map_is_a_transparent_png_over_the_image(radiograph_app, rx_clinician, web_db, su):
    _, (image_id, *_) = radiograph_patient(web_db)
    model_id = web_db.radiographs.model_id
    # Through the app's own connection, whose database session has the findings' model loaded already.
    with radiograph_app.extensions[ENGINE].connect() as conn:
        top, second = conn.execute(sa.text("SELECT finding FROM lungsql.predict_findings(:i) LIMIT 2"),
                                   {"i": image_id}).scalars().all()
        maps = {f: conn.execute(sa.text("SELECT * FROM lungsql.radiograph_heatmap(:i, :f)"),
                                {"i": image_id, "f": f}).one() for f in (top, second)}
    sha = scalar(su, "SELECT encode(sha256, 'hex') FROM lungsql.radiographs WHERE image_id = :i", i=image_id)
    default = rx_clinician.get(f"/radiographs/{image_id}/heatmap.png")  # the most probable finding's
    assert default.status_code == 200 and default.headers["ETag"] == f'"radiograph-heat-{sha}-{model_id}-{top}"'
    assert png(default.data)[..., 3].max() > 0  # something raised the most probable finding
    for finding, found in maps.items():
        response = rx_clinician.get(f"/radiographs/{image_id}/heatmap.png", query_string={"finding": finding})
        assert response.status_code == 200
        assert response.headers["ETag"] == f'"radiograph-heat-{sha}-{model_id}-{finding}"'
        overlay = png(response.data)
        assert overlay.shape == (RADIOGRAPH_SIZE, RADIOGRAPH_SIZE, 4)  # the image's size, with an alpha channel
        heat = np.frombuffer(bytes(found.heat), np.uint8).reshape(found.rows, found.columns)
        np.testing.assert_array_equal(overlay[..., 3], (heat.astype(np.uint16) * 170 // 255).astype(np.uint8))
    again = rx_clinician.get(f"/radiographs/{image_id}/heatmap.png?finding={second}",
                             headers={"If-None-Match": response.headers["ETag"]})
    assert again.status_code == 304 and again.data == b""


BAD_WINDOWS = ["-1", "256", "abc", "1e3", "nan", "inf", "12.5", "１２", " 12", "+12", "1_2", "0x10", "9" * 30,
               "\x00", "<script>alert(1)</script>", "' OR '1'='1"]
BAD_FINDINGS = ["mass", "MASS", "No Finding", "Pleural Thickening", "Mass'; DROP TABLE lungsql.radiographs; --",
                "<script>alert(1)</script>", "Mass\x00", "Mass ", "😀", "x" * 5000]


def test_bad_windows_and_findings_are_400_with_a_message(rx_clinician, web_db, su):
    _, (image_id, *_) = radiograph_patient(web_db)
    base = f"/radiographs/{image_id}"
    for value in BAD_WINDOWS:
        for query in ({"level": value, "width": "100"}, {"level": "100", "width": value}):
            for path in (base, f"{base}/image.png"):
                response = rx_clinician.get(path, query_string=query)
                assert response.status_code == 400, (path, query)
                body = text(response)
                assert "must be a whole number from" in body and "<script>alert" not in body, (path, query)
    for query in ({"width": "0"}, {"level": "0", "width": "0"}, {"level": "128"}, {"width": "100"}):
        response = rx_clinician.get(f"{base}/image.png", query_string=query)
        assert response.status_code == 400, query
    assert "level and width together" in text(rx_clinician.get(f"{base}/image.png?level=128"))
    for extreme in ({"level": "0", "width": "1"}, {"level": "255", "width": "255"}, {"level": "", "width": ""}):
        assert rx_clinician.get(f"{base}/image.png", query_string=extreme).status_code == 200, extreme
    for finding in BAD_FINDINGS:
        response = rx_clinician.get(f"{base}/heatmap.png", query_string={"finding": finding})
        assert response.status_code == 400, finding
        assert "The finding must be one of Atelectasis," in text(response) and "<script>alert" not in text(response)
    assert scalar(su, "SELECT count(*) FROM lungsql.radiographs") > 0


def test_unknown_radiographs_are_404(rx_clinician):
    for image_id in ("0", "999999999", str(2**63 - 1), str(2**63), "9" * 40, "-1", "abc", "1.0", "%00"):
        for suffix in ("", "/image.png", "/thumbnail.png", "/heatmap.png", "/heatmap.png?finding=Mass"):
            response = rx_clinician.get(f"/radiographs/{image_id}{suffix}")
            assert response.status_code == 404, (image_id, suffix)
    assert "There is no radiograph with this ID." in text(rx_clinician.get("/radiographs/999999999"))


def test_radiograph_pages_need_a_session_and_have_no_inline_code(client, rx_clinician, web_db):
    patient_id, (image_id, *_) = radiograph_patient(web_db)
    paths = (f"/radiographs/{image_id}", f"/radiographs/{image_id}/image.png?level=10&width=20",
             f"/radiographs/{image_id}/thumbnail.png", f"/radiographs/{image_id}/heatmap.png?finding=Mass")
    for path in paths:
        response = client.get(path)
        assert response.status_code == 302 and response.headers["Location"].startswith("/login?next="), path
    assert client.get("/static/radiograph.js").status_code == 200
    for path in (f"/radiographs/{image_id}", f"/patients/{patient_id}", "/patients?q=1"):
        response = rx_clinician.get(path)
        assert response.status_code == 200 and response.headers["Cache-Control"] == "no-store"
        for header, value in SECURITY_HEADERS.items():
            assert response.headers[header] == value
        body = text(response)
        assert " style=" not in body and "<style" not in body
        assert re.findall(r"<script(?![^>]*\bsrc=)", body) == []
        assert not re.search(r"<[^>]+\son[a-z]+\s*=", body)
        assert "http://" not in body and "https://" not in body


def test_without_a_deployed_radiograph_model_the_page_says_so_and_shows_the_image(cluster, engine, tmp_path):
    """A fresh database: two radiograph patients, a user, no model."""
    films = add_radiographs(engine, tmp_path, patients=2, train=False)
    users.add_user(engine, "clin", PASSWORDS["clin"], "clinician")
    app = create_app({"DATABASE_URL": cluster.url(dbname=engine.url.database, user="lungsql_web"),
                      "SECRET_KEY": "test-only-secret"})
    try:
        client = app.test_client()
        login(client, "clin")
        patient_id, (image_id, *_) = sorted(films.images.items())[0]
        response = client.get(f"/radiographs/{image_id}")
        body = text(response)
        assert response.status_code == 200 and "No probabilities" in body
        assert "No radiograph model is deployed as &#39;chest_xray14&#39;." in body
        assert "For the database administrator:" in body and "lungsql.train_findings" in body
        assert "heatmap-switch" not in body and 'class="finding ' not in body
        image = client.get(f"/radiographs/{image_id}/image.png")
        assert image.status_code == 200 and png(image.data).shape == (RADIOGRAPH_SIZE, RADIOGRAPH_SIZE)
        assert client.get(f"/radiographs/{image_id}/heatmap.png").status_code == 404
        assert f"/radiographs/{image_id}" in text(client.get(f"/patients/{patient_id}"))
        rows = [r for r in audit_rows(engine, radiograph_pages.VIEW_ACTION, patient_id=patient_id)
                if r.detail.get("image_id") == image_id]
        assert len(rows) == 1 and rows[0].detail["error"] == "no radiograph model is deployed as 'chest_xray14'"
    finally:
        app.extensions[ENGINE].dispose()


# -- the JSON API ---------------------------------------------------------------------------
def test_api_search_details_and_prediction(clinician, web_db, su):
    ana = web_db.ana_id
    found = clinician.get("/api/patients?q=fernandez").json
    assert found["total"] == 1 and found["patients"][0]["patient_id"] == ana
    assert "label" not in found["patients"][0]
    details = clinician.get(f"/api/patients/{ana}").json
    slices = scalar(su, "SELECT count(*) FROM lungsql.scans WHERE patient_id = :p", p=ana)
    assert details["name"] == "Ana Fernandez" and details["sex"] == "F" and details["slices"] == slices
    prediction = clinician.get(f"/api/patients/{ana}/prediction")
    assert prediction.status_code == 200 and prediction.headers["Cache-Control"] == "no-store"
    data = prediction.json
    assert 0.0 <= data["probability"] <= 1.0 and data["percent"] == round(data["probability"] * 100, 1)
    assert data["band"] == band_of(data["percent"])[0]
    assert data["model"]["name"] == MODEL_NAME and data["model"]["model_id"] == deployed(su)
    assert 0.0 <= data["model"]["auc"] <= 1.0 and data["model"]["version"] >= 1
    assert set(data["model"]) == {f.name for f in dataclasses.fields(DeployedModel)}
    assert data["model"]["trained_at"] == dt.datetime.fromisoformat(data["model"]["trained_at"]).isoformat()


# -- administration -------------------------------------------------------------------------
def test_admin_pages_are_forbidden_to_clinicians(clinician, su):
    token = csrf_token(text(clinician.get("/patients")))
    response = clinician.get("/admin/")
    assert response.status_code == 403 and "Not allowed" in text(response)
    before = scalar(su, "SELECT count(*) FROM lungsql.deployments")
    response = clinician.post("/admin/deploy", data={"csrf_token": token, "name": MODEL_NAME,
                                                     "strategy": "most_recent"})
    assert response.status_code == 403
    assert scalar(su, "SELECT count(*) FROM lungsql.deployments") == before
    assert 'href="/admin/' not in text(clinician.get("/patients"))


def test_models_page_shows_metrics_roc_curves_and_the_deployed_model(boss, web_db, su):
    response = boss.get("/admin/")
    assert response.status_code == 200
    body = text(response)
    with su.connect() as conn:
        splits = conn.execute(sa.text("SELECT split, count(*) FROM lungsql.model_comparison GROUP BY split "
                                      "HAVING count(*) > 1")).all()
    # One curve per model, and one plot per split shared by two or more models (their curves overlaid).
    assert body.count('<svg class="roc"') == len(web_db.models) + len(splits)
    assert re.search(r'<polyline class="roc-curve" points="(\d+\.\d,\d+\.\d ?){2,}"', body)
    assert splits and f"Compared on the same" in body and body.count('class="roc-curve roc-series-') == sum(
        n for _, n in splits)
    assert "ROC curve of lightgbm version 1" in body
    with su.connect() as conn:
        auc = conn.execute(sa.text("SELECT (metrics->>'auc')::float FROM lungsql.models WHERE model_id = :m"),
                           {"m": web_db.models[0]}).scalar()
    assert f"{auc:.3f}" in body
    assert f"<strong>model {deployed(su)}</strong>" in body
    for label in ("Deploy best score", "Deploy most recent", "Roll back"):
        assert label in body


def test_deploy_and_roll_back_through_the_buttons(boss, web_db, su):
    first, second = web_db.models
    address = boss.environ_base["REMOTE_ADDR"]
    token = csrf_token(text(boss.get("/admin/")))

    def press(strategy: str):
        response = boss.post("/admin/deploy", data={"csrf_token": token, "name": MODEL_NAME, "strategy": strategy})
        assert response.status_code == 303 and response.headers["Location"] == "/admin/"
        return text(boss.get("/admin/"))

    body = press("most_recent")
    assert deployed(su) == second and f"Model {second} is now deployed" in body
    patient_page = text(boss.get(f"/patients/{web_db.ana_id}"))
    assert f"(model {second})" in patient_page
    body = press("rollback")
    assert deployed(su) == first and f"Model {first} is now deployed" in body
    body = press(str(second))
    assert deployed(su) == second
    body = press("rollback")
    assert deployed(su) == first
    rows = audit_rows(su, "deploy", address=address)
    assert [(r.detail["strategy"], r.detail["model_id"]) for r in rows] == [
        ("most_recent", second), ("rollback", first), (str(second), second), ("rollback", first)]
    assert all(r.username == "boss" for r in rows)


def test_a_refused_deployment_is_reported_and_audited(boss, su):
    token = csrf_token(text(boss.get("/admin/")))
    before = scalar(su, "SELECT count(*) FROM lungsql.deployments")
    response = boss.post("/admin/deploy", data={"csrf_token": token, "name": "no-such-model",
                                                 "strategy": "best_score"}, follow_redirects=True)
    assert response.status_code == 200 and "Not deployed: there is no model named &#39;no-such-model&#39;" in text(response)
    response = boss.post("/admin/deploy", data={"csrf_token": token, "name": MODEL_NAME, "strategy": "99999"},
                          follow_redirects=True)
    assert "Not deployed: model 99999 is not a model named" in text(response)
    for bad in ("newest", "1; DROP TABLE x", "", "１"):
        response = boss.post("/admin/deploy", data={"csrf_token": token, "name": MODEL_NAME, "strategy": bad})
        assert response.status_code == 400, bad
    assert scalar(su, "SELECT count(*) FROM lungsql.deployments") == before
    failed = audit_rows(su, "deploy_failed", address=boss.environ_base["REMOTE_ADDR"])
    assert [r.detail["strategy"] for r in failed] == ["best_score", "99999"]


def test_the_audit_log_is_read_with_the_cli_not_in_the_web_app(boss, web_db, su):
    """The web app's role cannot read the audit log: no audit page; the DBA runs `lungsql audit`."""
    from click.testing import CliRunner

    from lungsql.client.cli import main

    assert boss.get("/admin/audit").status_code == 404
    assert "Audit log" not in text(boss.get("/admin/"))
    boss.get(f"/patients/{NO_FEATURES[0]}")
    runner = CliRunner()
    result = runner.invoke(main, ["--db", web_db.url, "audit", "--limit", "2", "--patient", NO_FEATURES[0]])
    assert result.exit_code == 0, result.output
    header, *lines = result.output.splitlines()
    assert header.split() == ["when", "user", "action", "patient", "address", "detail"]
    assert [line.split()[3] for line in lines] == ["score_failed", "view_patient"]  # newest first
    assert all(line.split()[2] == "boss" and NO_FEATURES[0] in line for line in lines)
    result = runner.invoke(main, ["--db", web_db.url, "audit", "--user", "BOSS", "--limit", "500"])
    assert result.exit_code == 0 and len(result.output.splitlines()) - 1 == min(500, scalar(
        su, "SELECT count(*) FROM lungsql.audit_log WHERE username = 'boss'"))
    result = runner.invoke(main, ["--db", web_db.url, "audit", "--user", "nobody-at-all"])
    assert result.exit_code == 0 and result.output.strip() == "no audit rows match"


# -- headers, markup and privileges ------------------------------------------------------------
def test_security_headers_and_no_inline_code(client, boss, web_db):
    responses = [client.get("/login"), client.get("/static/style.css"), boss.get("/patients?q=an"),
                 boss.get(f"/patients/{web_db.ana_id}"), boss.get(f"/patients/{web_db.ana_id}/slices/0.png"),
                 boss.get("/admin/"), boss.get("/patients/nobody"),
                 boss.get("/api/patients?q=ana")]
    for response in responses:
        for header, value in SECURITY_HEADERS.items():
            assert response.headers[header] == value
        csp = response.headers["Content-Security-Policy"]
        for directive in ("default-src 'self'", "img-src 'self' data:", "style-src 'self'", "script-src 'self'"):
            assert directive in csp
        if response.mimetype == "text/html":
            body = text(response)
            assert " style=" not in body and "<style" not in body
            assert re.findall(r"<script(?![^>]*\bsrc=)", body) == []
            assert not re.search(r"<[^>]+\son[a-z]+\s*=", body)  # no inline event handlers
            assert response.headers["Cache-Control"] == "no-store"
            assert "http://" not in body and "https://" not in body  # nothing from the internet


def test_the_web_role_cannot_touch_what_it_must_not(app):
    statements = [
        "UPDATE lungsql.models SET name = name",
        "DELETE FROM lungsql.audit_log",
        "UPDATE lungsql.audit_log SET username = 'x'",
        "SELECT * FROM lungsql.features",
        "INSERT INTO lungsql.users (username, password_hash, role) VALUES ('mallory', 'x', 'admin')",
        "UPDATE lungsql.users SET role = 'admin'",
        "INSERT INTO lungsql.deployments (name, model_id, strategy) VALUES ('x', 1, 'x')",
        "SELECT created_at FROM lungsql.users",
        "CALL lungsql.generate_features()",
        "SELECT * FROM lungsql.train_model()",
    ]
    engine = app.extensions[ENGINE]
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT current_user")).scalar() == "lungsql_web"
    for statement in statements:
        with engine.connect() as conn:
            with pytest.raises(sa.exc.ProgrammingError, match="permission denied"):
                conn.execute(sa.text(statement))


def test_the_secret_key_comes_from_the_config_the_environment_or_a_site_file(monkeypatch, tmp_path):
    url = "postgresql+psycopg://lungsql_web@/nowhere"
    monkeypatch.setenv("LUNGSQL_HOME", str(tmp_path))
    monkeypatch.delenv("LUNGSQL_SECRET_KEY", raising=False)
    generated = create_app({"DATABASE_URL": url}).secret_key
    key_file = tmp_path / "flask.key"
    assert key_file.exists() and key_file.stat().st_mode & 0o777 == 0o600
    assert generated == key_file.read_bytes().strip() and len(generated) >= 32
    assert create_app({"DATABASE_URL": url}).secret_key == generated  # the same on every start
    monkeypatch.setenv("LUNGSQL_SECRET_KEY", "from-the-environment")
    assert create_app({"DATABASE_URL": url}).secret_key == b"from-the-environment"
    assert create_app({"DATABASE_URL": url, "SECRET_KEY": "given"}).secret_key == "given"
    app = create_app({"DATABASE_URL": url, "SECRET_KEY": "k", "SESSION_COOKIE_SECURE": True})
    assert app.config["SESSION_COOKIE_SECURE"] and app.config["SESSION_COOKIE_SAMESITE"] == "Lax"
    monkeypatch.setenv("LUNGSQL_SECURE_COOKIES", "1")
    assert create_app({"DATABASE_URL": url, "SECRET_KEY": "k"}).config["SESSION_COOKIE_SECURE"]


def test_sign_in_limits_that_would_switch_throttling_off_stop_the_app():
    url = "postgresql+psycopg://lungsql_web@/nowhere"
    for setting, value in (("LOGIN_MAX_FAILURES", 0), ("LOGIN_MAX_FAILURES_PER_USER", 10**6), ("LOGIN_WINDOW_S", 1)):
        with pytest.raises(ConfigurationError, match=f"{setting[6:].lower()}.* outside"):
            create_app({"DATABASE_URL": url, "SECRET_KEY": "k", setting: value})


def test_error_pages_are_small_templates(clinician):
    response = clinician.get("/no-such-page")
    assert response.status_code == 404 and "<h1>Not found" in text(response)
    response = clinician.post("/patients")
    assert response.status_code in (400, 405)  # no CSRF token: refused before the method is checked
    token = csrf_token(text(clinician.get("/patients")))
    response = clinician.post("/patients", data={"csrf_token": token})
    assert response.status_code == 405 and "Method not allowed" in text(response)
    assert json.loads(clinician.get("/api/patients/nobody").data)["error"] == "not found"


# -- a real browser ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def live_server(web_db):
    """`lungsql serve` on a free port, in processes of its own, as deployed (two processes)."""
    from lungsql.webapp.server import running

    with running(web_db.web_url, workers=2, threads=4) as server:
        yield server.url


@pytest.fixture(scope="module")
def browser():
    import shutil

    webdriver = pytest.importorskip("selenium.webdriver")
    chromium = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    driver_path = shutil.which("chromedriver")
    if not chromium or not driver_path:
        pytest.fail("chromium and chromedriver are needed for the browser test: run `make bootstrap` "
                    "(Debian packages chromium and chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,1000",
                     "--disable-gpu", "--no-first-run", "--disable-quic", "--disable-background-networking",
                     "--disable-component-update", "--disable-sync"):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=webdriver.ChromeService(executable_path=driver_path), options=options)
    driver.implicitly_wait(0)
    yield driver
    driver.quit()


def _sign_in(browser, live_server, username):
    from selenium.webdriver.common.by import By

    browser.delete_all_cookies()
    browser.get(f"{live_server}/login")
    browser.find_element(By.ID, "username").send_keys(username)
    browser.find_element(By.ID, "password").send_keys(PASSWORDS[username])
    browser.find_element(By.CSS_SELECTOR, "form.stacked button[type=submit]").click()


def test_in_a_browser_search_view_slices_and_play(browser, live_server, web_db, output_dir):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(browser, 10)
    _sign_in(browser, live_server, "clin")
    wait.until(lambda d: d.find_elements(By.ID, "q"))
    search = browser.find_element(By.ID, "q")
    search.send_keys("fern")
    search.send_keys(Keys.ENTER)
    wait.until(lambda d: d.find_element(By.TAG_NAME, "h1").text == "Ana Fernandez")
    assert browser.current_url.endswith(f"/patients/{web_db.ana_id}")
    image = browser.find_element(By.CSS_SELECTOR, "img.slice-image")
    wait.until(lambda d: d.execute_script("return arguments[0].complete && arguments[0].naturalWidth", image))
    assert browser.execute_script("return arguments[0].naturalWidth", image) == 512
    slider = browser.find_element(By.CSS_SELECTOR, "input.slice-slider")
    label = browser.find_element(By.CSS_SELECTOR, ".slice-label")
    count = int(slider.get_attribute("max")) + 1
    start = int(slider.get_attribute("value"))
    assert label.text == f"Slice {start + 1} of {count}"
    # It opens at the group of slices that raised the probability most, marked, and lists the top groups.
    engine = web_db.engine()
    with engine.connect() as conn:
        top = conn.execute(sa.text("SELECT * FROM lungsql.web_top_slices(:p, 3)"), {"p": web_db.ana_id}).all()
    engine.dispose()
    first = [t.slice_index for t in top if t.rank == 1]
    assert first and start == first[len(first) // 2]
    badge = browser.find_element(By.CSS_SELECTOR, ".marked-badge")
    assert badge.is_displayed() and "weighed most towards a higher probability" in badge.text
    jumps = browser.find_elements(By.CSS_SELECTOR, ".top-slices [data-slice]")
    assert len(jumps) == len({t.rank for t in top})
    # The heat map over the slice, on demand, and off again.
    overlay = browser.find_element(By.CSS_SELECTOR, "img.heatmap-overlay")
    assert not overlay.is_displayed()
    browser.find_element(By.CSS_SELECTOR, "input.heatmap-switch").click()
    wait.until(lambda d: d.execute_script("return arguments[0].complete && arguments[0].naturalWidth", overlay))
    assert overlay.is_displayed() and overlay.get_attribute("src").endswith(f"/slices/{start}/heatmap.png")
    assert "not a diagnosis" in browser.find_element(By.CSS_SELECTOR, ".heatmap-toggle").text
    browser.set_window_size(1280, 1500)  # the slice, its heat map and the list of top slices in one picture
    browser.save_screenshot(str(output_dir / "webapp-patient-top-slices.png"))
    browser.set_window_size(1280, 1000)
    browser.find_element(By.CSS_SELECTOR, "input.heatmap-switch").click()
    assert not overlay.is_displayed()
    if len(jumps) > 1:
        jumps[1].click()
        second = [t.slice_index for t in top if t.rank == 2]
        wait.until(lambda d: int(slider.get_attribute("value")) == second[len(second) // 2])
        assert badge.is_displayed()

    play = browser.find_element(By.CSS_SELECTOR, "button.play")
    play.click()
    assert play.get_attribute("aria-pressed") == "true" and play.text == "Pause"
    seen = set()
    wait.until(lambda d: seen.add(d.execute_script("return arguments[0].getAttribute('src')", image))
               or len(seen) >= 3)
    play.click()
    assert play.get_attribute("aria-pressed") == "false" and play.text == "Play"
    stopped = slider.get_attribute("value")
    time.sleep(0.4)
    assert slider.get_attribute("value") == stopped  # paused stays paused

    slider.send_keys(Keys.HOME)
    wait.until(lambda d: label.text == f"Slice 1 of {count}")
    slider.send_keys(Keys.ARROW_RIGHT)
    wait.until(lambda d: label.text == f"Slice 2 of {count}")
    assert image.get_attribute("src").endswith("/slices/1.png")
    wait.until(lambda d: d.execute_script("return arguments[0].complete && arguments[0].naturalWidth", image))
    probability = browser.find_element(By.CSS_SELECTOR, ".probability .value").text
    assert re.fullmatch(r"\d+\.\d %", probability)
    browser.save_screenshot(str(output_dir / "webapp-patient.png"))

    problems = [entry["message"] for entry in browser.get_log("browser")
                if entry["level"] == "SEVERE" or "Content Security Policy" in entry["message"]]
    assert problems == []


def test_in_a_browser_the_admin_sees_roc_curves(browser, live_server, output_dir):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    _sign_in(browser, live_server, "boss")
    WebDriverWait(browser, 10).until(lambda d: d.find_elements(By.ID, "q"))
    browser.get(f"{live_server}/admin/")
    charts = browser.find_elements(By.CSS_SELECTOR, "svg.roc")
    assert charts and all(c.is_displayed() and c.size["width"] > 200 for c in charts)
    browser.save_screenshot(str(output_dir / "webapp-models.png"))
    problems = [entry["message"] for entry in browser.get_log("browser")
                if entry["level"] == "SEVERE" or "Content Security Policy" in entry["message"]]
    assert problems == []


_FETCH_PNG = """
var done = arguments[arguments.length - 1];
fetch(arguments[0], {credentials: "same-origin"}).then(function (response) {
  return response.arrayBuffer().then(function (buffer) {
    var bytes = new Uint8Array(buffer), text = "";
    for (var i = 0; i < bytes.length; i += 1) { text += String.fromCharCode(bytes[i]); }
    done([response.status, btoa(text)]);
  });
}).catch(function (error) { done([0, String(error)]); });
"""


def _loaded(image):
    return lambda d: d.execute_script("return arguments[0].complete && arguments[0].naturalWidth", image)


def test_in_a_browser_find_a_radiograph_patient_window_the_image_and_show_heat_maps(browser, live_server, web_db,
                                                                                    output_dir):
    import base64

    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(browser, 30)  # a server process's first radiograph loads the findings' model
    browser.set_script_timeout(30)
    patient_id, image_ids = radiograph_patient(web_db)
    _sign_in(browser, live_server, "clin")
    wait.until(lambda d: d.find_elements(By.ID, "q"))
    # Found by the first character of the ID and listed like any other patient, with the counts.
    search = browser.find_element(By.ID, "q")
    search.send_keys(patient_id[0])
    search.send_keys(Keys.ENTER)
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "table.results"))
    row = browser.find_element(By.XPATH, f"//table[@class='results']//tr[td[2][normalize-space()='{patient_id}']]")
    cells = [c.text for c in row.find_elements(By.TAG_NAME, "td")]
    assert cells[0] == "(no name)" and cells[4:] == ["0", str(len(image_ids))]
    row.find_element(By.TAG_NAME, "a").click()
    wait.until(lambda d: d.current_url.endswith(f"/patients/{patient_id}"))
    # The patient page: the radiographs with their thumbnails, and no CT viewer.
    thumbnails = browser.find_elements(By.CSS_SELECTOR, "img.radiograph-thumbnail")
    assert len(thumbnails) == len(image_ids)
    for thumbnail in thumbnails:
        wait.until(_loaded(thumbnail))
        assert 0 < browser.execute_script("return arguments[0].naturalWidth", thumbnail) <= 160
    assert browser.find_elements(By.CSS_SELECTOR, "[data-viewer], img.slice-image") == []
    browser.save_screenshot(str(output_dir / "webapp-radiograph-patient.png"))
    browser.find_element(By.CSS_SELECTOR, f"a[href='/radiographs/{image_ids[0]}']").click()
    wait.until(lambda d: d.current_url.endswith(f"/radiographs/{image_ids[0]}"))

    # The image, and the 14 findings sorted by probability, each in its band.
    image = browser.find_element(By.CSS_SELECTOR, "img.radiograph-image")
    wait.until(_loaded(image))
    assert browser.execute_script("return arguments[0].naturalWidth", image) == RADIOGRAPH_SIZE
    assert len(browser.find_elements(By.CSS_SELECTOR, "ol.findings li.finding")) == 14
    findings = browser.find_elements(By.CSS_SELECTOR, "ol.findings li.finding:not(.not-modelled)")
    percents = [float(f.find_element(By.CSS_SELECTOR, ".finding-percent").text.rstrip(" %")) for f in findings]
    assert percents == sorted(percents, reverse=True)
    for item, percent in zip(findings, percents):
        band = band_of(percent)[0]
        assert f"band-{band}" in item.get_attribute("class").split()
        assert item.find_element(By.CSS_SELECTOR, ".finding-band").text.startswith(f"{band.capitalize()} band")
    assert browser.find_element(By.LINK_TEXT, f"← Back to patient {patient_id}").get_attribute("href").endswith(
        f"/patients/{patient_id}")

    # Moving the window loads the image through it: another request, other pixels.
    def fetch(url):
        status, data = browser.execute_async_script(_FETCH_PNG, url)
        assert status == 200, (url, status)
        return png(base64.b64decode(data))

    whole_src = image.get_attribute("src")
    assert whole_src.endswith(f"/radiographs/{image_ids[0]}/image.png")
    browser.execute_script("var s = arguments[0]; s.value = '60'; s.dispatchEvent(new Event('input'));",
                           browser.find_element(By.ID, "level"))
    width = browser.find_element(By.ID, "width")
    browser.execute_script("var s = arguments[0]; s.value = '64'; s.dispatchEvent(new Event('change'));", width)
    wait.until(lambda d: image.get_attribute("src").endswith("image.png?level=60&width=64"))
    wait.until(_loaded(image))
    assert browser.find_element(By.CSS_SELECTOR, "output[for=width]").text == "64"
    assert browser.current_url.endswith(f"/radiographs/{image_ids[0]}?level=60&width=64")  # a reload keeps it
    whole, narrow = fetch(whole_src), fetch(image.get_attribute("src"))
    assert whole.shape == narrow.shape == (RADIOGRAPH_SIZE, RADIOGRAPH_SIZE) and not np.array_equal(whole, narrow)
    width.send_keys(Keys.ARROW_RIGHT)  # the keyboard moves a slider too
    wait.until(lambda d: image.get_attribute("src").endswith("image.png?level=60&width=65"))
    # Reset: the whole range again.
    browser.find_element(By.CSS_SELECTOR, "a.window-reset").click()
    wait.until(lambda d: image.get_attribute("src") == whole_src)
    assert browser.find_element(By.ID, "level").get_attribute("value") == "128"
    assert browser.current_url.endswith(f"/radiographs/{image_ids[0]}")

    # The heat map of the most probable finding, then of the finding clicked in the list.
    overlay = browser.find_element(By.CSS_SELECTOR, "img.heatmap-overlay")
    assert not overlay.is_displayed()
    browser.find_element(By.CSS_SELECTOR, "input.heatmap-switch").click()
    wait.until(_loaded(overlay))
    top = findings[0].get_attribute("data-finding-name")
    assert overlay.is_displayed() and overlay.get_attribute("src").endswith(f"heatmap.png?finding={top}")
    assert browser.execute_script("return arguments[0].naturalWidth", overlay) == RADIOGRAPH_SIZE
    other = findings[3]
    name = other.get_attribute("data-finding-name")
    other.find_element(By.CSS_SELECTOR, "button.finding-name").click()
    wait.until(lambda d: overlay.get_attribute("src").endswith(f"heatmap.png?finding={name}"))
    wait.until(_loaded(overlay))
    assert other.find_element(By.CSS_SELECTOR, "button").get_attribute("aria-pressed") == "true"
    assert browser.find_element(By.CSS_SELECTOR, ".heatmap-finding").text == name.replace("_", " ")
    browser.set_window_size(1280, 1400)  # the image, its heat map and every finding in one picture
    browser.execute_script("window.scrollTo(0, 0)")
    browser.save_screenshot(str(output_dir / "webapp-radiograph.png"))
    browser.set_window_size(1280, 1000)
    browser.find_element(By.CSS_SELECTOR, "input.heatmap-switch").click()
    assert not overlay.is_displayed()

    problems = [entry["message"] for entry in browser.get_log("browser")
                if entry["level"] == "SEVERE" or "Content Security Policy" in entry["message"]]
    assert problems == []


# -- load ----------------------------------------------------------------------------------------
def test_lungsql_serve_runs_several_processes_that_share_sessions(web_db):
    """Two worker processes answer on one socket, and a session signed in through either is valid
    in both (one signing key)."""
    import urllib.request

    from lungsql.bench import http_load
    from lungsql.bench.procstat import children
    from lungsql.webapp.server import running

    with running(web_db.web_url, workers=2, threads=2) as server:
        deadline = time.monotonic() + 30  # the second worker may still be starting
        while len(children(server.pid)) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert len(children(server.pid)) == 2
        opener = http_load.signed_in_opener(server.url, "clin", PASSWORDS["clin"])
        for _ in range(20):  # a new connection each time, accepted by either process
            request = urllib.request.Request(f"{server.url}/api/patients?q=ana", headers={"Connection": "close"})
            with opener.open(request, timeout=10) as response:
                assert response.status == 200 and json.loads(response.read())["total"] >= 1


@pytest.mark.parametrize("reuse_port", [False, True], ids=["another-server", "another-lungsql-serve"])
def test_lungsql_serve_refuses_a_port_in_use(reuse_port):
    """Each worker binds the port itself with SO_REUSEPORT, which would let a second server of the same
    OS user share it without a word: lungsql serve checks first and says so."""
    import socket

    from lungsql.webapp.server import refuse_taken_port

    with socket.socket() as taken:
        if reuse_port:
            taken.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        with pytest.raises(ConfigurationError, match="cannot listen on 127.0.0.1:") as refused:
            refuse_taken_port("127.0.0.1", taken.getsockname()[1])
        assert "--port" in refused.value.hint


def test_the_pool_is_warmed_in_the_background(web_db, su):
    """Every connection of a new pool runs lungsql.warm_up (as lungsql_web) before the first request."""
    from lungsql.webapp.db import warm_pool

    app = create_app({"DATABASE_URL": web_db.web_url, "SECRET_KEY": "test-only-secret", "TESTING": True,
                      "DATABASE_POOL_SIZE": 3})
    try:
        warm_pool(app).join(60)
        assert app.extensions[ENGINE].pool.checkedin() == 3  # a failed warm-up stops at the first
    finally:
        app.extensions[ENGINE].dispose()


def test_forwarded_headers_are_believed_from_the_trusted_proxy_only(web_db, su):
    from lungsql.webapp.proxy import TrustedProxy

    app = create_app({"DATABASE_URL": web_db.web_url, "SECRET_KEY": "test-only-secret", "TESTING": True})
    app.wsgi_app = TrustedProxy(app.wsgi_app, "10.200.0.1")
    try:
        for peer, expected in (("10.200.0.1", "203.0.113.7"), ("10.200.0.2", "10.200.0.2")):
            client = app.test_client()
            client.environ_base["REMOTE_ADDR"] = peer
            page = client.get("/login")
            token = csrf_token(page.get_data(as_text=True))
            response = client.post("/login", data={"username": "clin", "password": PASSWORDS["clin"],
                                                   "csrf_token": token},
                                   headers={"X-Forwarded-For": "203.0.113.7", "X-Forwarded-Proto": "https",
                                            "Referer": "https://localhost/login"})  # https: CSRF checks it
            assert response.status_code == 302
            assert audit_rows(su, "login", address=expected), f"no sign-in audited from {expected}"
    finally:
        app.extensions[ENGINE].dispose()


def test_32_concurrent_clients_get_correct_predictions(live_server, su, output_dir):
    from lungsql.bench import http_load

    with su.connect() as conn:
        expected = dict(conn.execute(sa.text(
            "SELECT patient_id, probability FROM lungsql.predict_lung_cancer_batch("
            "ARRAY(SELECT patient_id FROM lungsql.features))")).all())
    assert expected
    paths = [f"/api/patients/{pid}/prediction" for pid in sorted(expected)]

    def check(path: str, answer: dict) -> str | None:
        patient = path.split("/")[3]
        if abs(answer["probability"] - expected[patient]) > 1e-12:
            return f"{patient}: {answer['probability']} instead of {expected[patient]}"
        return None

    result = http_load.run(live_server, "clin", PASSWORDS["clin"], paths, clients=32, requests_per_client=10,
                           seconds=60, check=check)
    (output_dir / "webapp-load.json").write_text(json.dumps(result.summary(), indent=2) + "\n")
    assert result.errors == []
    assert len(result.latencies_ms) == 32 * 10
