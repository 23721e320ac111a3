"""The web app's role, lungsql_web, connected to the database as the web app connects: what it is
refused, and the functions it goes through instead (sql/postgres/functions/020_web.sql).

It may read the models and their deployments and users' names and roles; patients (without outcome
labels), slice references and pixels, sign-ins and audit rows only through SECURITY DEFINER functions.
"""

from __future__ import annotations

import threading

import numpy as np
import psycopg
import pytest
import sqlalchemy as sa

from lungsql import dicom
from lungsql.client import users
from lungsql.ml import preprocess
from webapp_fixtures import BROKEN_SCAN, PASSWORDS

REFUSED = [
    "SELECT dicom FROM lungsql.scans",
    "SELECT patient_id, z_position FROM lungsql.scans",
    "SELECT label FROM lungsql.patients",
    "SELECT name FROM lungsql.patients",
    "SELECT * FROM lungsql.labels",
    "SELECT password_hash FROM lungsql.users",
    "SELECT * FROM lungsql.users",
    "SELECT * FROM lungsql.audit_log",
    "SELECT count(*) FROM lungsql.audit_log",
    "INSERT INTO lungsql.audit_log (username, action) VALUES ('mallory', 'login')",
    "UPDATE lungsql.audit_log SET username = 'x'",
    "DELETE FROM lungsql.audit_log",
    "SELECT * FROM lungsql.features",
    "SELECT * FROM lungsql.predictions",
    "SELECT * FROM lungsql.cnn_models",
    "UPDATE lungsql.models SET name = name",
    "INSERT INTO lungsql.deployments (name, model_id, strategy) VALUES ('x', 1, 'x')",
    "UPDATE lungsql.users SET role = 'admin'",
    "CALL lungsql.generate_features()",
    "SELECT * FROM lungsql.train_model()",
    "SELECT lungsql._load_python()",
    "SELECT data FROM lungsql.radiographs",
    "SELECT * FROM lungsql.image_labels",
    "SELECT * FROM lungsql.image_features",
    "SELECT * FROM lungsql.model_boosters",
    "SELECT * FROM lungsql.finding_predictions",
    "SELECT * FROM lungsql.train_findings()",
    "CALL lungsql.generate_features(task => 'chest_xray14')",
]


@pytest.fixture(scope="module")
def web(web_db):
    """The web app's role, through the URL the web app gets."""
    engine = sa.create_engine(web_db.web_url, pool_size=25, max_overflow=0)
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT current_user")).scalar() == "lungsql_web"
    yield engine
    engine.dispose()


def rows(engine, sql: str, **params) -> list[sa.Row]:
    with engine.begin() as conn:
        return conn.execute(sa.text(sql), params).all()


@pytest.mark.parametrize("statement", REFUSED)
def test_the_web_role_is_refused(web, statement):
    with web.connect() as conn:
        with pytest.raises(sa.exc.ProgrammingError) as refused:
            conn.execute(sa.text(statement))
    assert isinstance(refused.value.orig, psycopg.errors.InsufficientPrivilege), refused.value


def test_the_web_role_executes_only_owner_rights_functions_on_a_fixed_search_path(web):
    functions = rows(web, """
        SELECT p.proname, p.prosecdef, p.proconfig FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
        WHERE n.nspname = 'lungsql' AND has_function_privilege('lungsql_web', p.oid, 'EXECUTE')""")
    assert {f.proname for f in functions} == {
        "web_search_patients", "web_patient", "web_slice_ref", "web_top_slices", "web_slice_heatmap", "slice_image",
        "sign_in", "audit_append", "predict_lung_cancer", "predict_lung_cancer_batch", "predict_lung_cancer_detail",
        "warm_up", "deploy",
        "web_patient_radiographs", "web_radiograph", "radiograph_image", "radiograph_heatmap", "predict_findings",
        "predict_findings_batch"}
    assert all(f.prosecdef and f.proconfig == ["search_path=pg_catalog, pg_temp"] for f in functions), functions


def test_the_web_role_reads_models_deployments_and_users_names_and_roles(web):
    assert rows(web, "SELECT count(*) FROM lungsql.models")[0][0] == 2
    assert rows(web, "SELECT count(*) FROM lungsql.deployments")[0][0] >= 1
    names = {r.username: r.role for r in rows(web, "SELECT user_id, username, role, disabled FROM lungsql.users")}
    assert {"clin": "clinician", "boss": "admin"}.items() <= names.items()


def test_the_search_function_returns_no_label(web, web_db, su):
    found = rows(web, "SELECT * FROM lungsql.web_search_patients('fern', 50)")
    assert [r.patient_id for r in found] == [web_db.ana_id]
    assert set(found[0]._fields) == {"patient_id", "name", "sex", "age_years", "slices", "exact_id", "total",
                                     "radiographs"}
    slices = rows(su, "SELECT count(*) FROM lungsql.scans WHERE patient_id = :p", p=web_db.ana_id)[0][0]
    assert found[0].slices == slices
    # LIKE metacharacters match themselves; the limit caps the rows, not the total.
    assert [r.name for r in rows(web, r"SELECT * FROM lungsql.web_search_patients('per%cent_under\score')")] == [
        "Olive Per%cent_Under\\score"]
    assert rows(web, "SELECT * FROM lungsql.web_search_patients('_')")[0].patient_id == "meta-0001"
    capped = rows(web, "SELECT * FROM lungsql.web_search_patients('e', 2)")
    assert len(capped) == 2 and capped[0].total > 2
    assert rows(web, "SELECT * FROM lungsql.web_search_patients(:q, 50)", q=web_db.ana_id)[0].exact_id


def test_the_patient_function_returns_no_label(web, web_db, su):
    (patient,) = rows(web, "SELECT * FROM lungsql.web_patient(:p)", p=web_db.ana_id)
    assert set(patient._fields) == {"patient_id", "name", "sex", "birth_date", "age_years", "slices", "rows",
                                    "columns", "radiographs"}
    assert patient.name == "Ana Fernandez" and patient.slices >= 4 and (patient.rows, patient.columns) == (512, 512)
    assert rows(web, "SELECT * FROM lungsql.web_patient('nobody')") == []


def test_slices_are_reached_by_reference_and_pixels_without_their_header(web, web_db, su):
    scans = rows(su, "SELECT scan_id, encode(sha256, 'hex') AS sha256, dicom FROM lungsql.scans "
                     "WHERE patient_id = :p ORDER BY series_instance_uid, z_position", p=web_db.ana_id)
    refs = [rows(web, "SELECT * FROM lungsql.web_slice_ref(:p, :i)", p=web_db.ana_id, i=i)[0]
            for i in range(len(scans))]
    assert [(r.scan_id, r.sha256) for r in refs] == [(s.scan_id, s.sha256) for s in scans]
    assert rows(web, "SELECT * FROM lungsql.web_slice_ref(:p, :i)", p=web_db.ana_id, i=len(scans)) == []
    assert rows(web, "SELECT * FROM lungsql.web_slice_ref(:p, -1)", p=web_db.ana_id) == []
    (image,) = rows(web, "SELECT * FROM lungsql.slice_image(:s, -1000, 400)", s=scans[0].scan_id)
    assert set(image._fields) == {"rows", "columns", "pixels"}
    assert (image.rows, image.columns) == (512, 512) and len(image.pixels) == 512 * 512  # pixels, nothing else
    expected = preprocess.window(dicom.slice_hu(bytes(scans[0].dicom)), -1000, 400, dtype=np.uint8)
    np.testing.assert_array_equal(np.frombuffer(image.pixels, np.uint8).reshape(512, 512), expected)
    assert b"Fernandez" not in bytes(image.pixels) and b"DICM" not in bytes(image.pixels)
    assert rows(web, "SELECT * FROM lungsql.slice_image(-1)") == []


def test_an_undecodable_slice_is_a_clear_error(web, su):
    scan_id = rows(su, "SELECT scan_id FROM lungsql.scans WHERE patient_id = :p", p=BROKEN_SCAN[0])[0][0]
    with pytest.raises(sa.exc.DBAPIError, match="lungsql: not a DICOM file"):
        rows(web, "SELECT * FROM lungsql.slice_image(:s)", s=scan_id)
    with pytest.raises(sa.exc.DBAPIError, match="window_low below window_high"):
        rows(web, "SELECT * FROM lungsql.slice_image(:s, 400, -1000)", s=scan_id)


def test_audit_rows_are_appended_through_the_function_only(web, su):
    (audit_id,), = rows(web, "SELECT lungsql.audit_append('clin', 'view_patient', 'p1', '10.9.0.1', "
                             "'{\"via\": \"test\"}')")
    row = rows(su, "SELECT * FROM lungsql.audit_log WHERE audit_id = :a", a=audit_id)[0]
    assert (row.username, row.action, row.patient_id, row.address, row.detail) == (
        "clin", "view_patient", "p1", "10.9.0.1", {"via": "test"})
    # Sign-in rows are lungsql.sign_in's: nobody forges the rows the throttling counts.
    for action in ("login", "login_failed", "login_locked", "drop table", None):
        with pytest.raises(sa.exc.DBAPIError, match="is not an audit action lungsql.audit_append records"):
            rows(web, "SELECT lungsql.audit_append('clin', :a, NULL, NULL, '{}')", a=action)
    with pytest.raises(sa.exc.DBAPIError, match="must be a JSON object"):
        rows(web, "SELECT lungsql.audit_append('clin', 'logout', NULL, NULL, '[1]')")


def sign_in(web, username: str, password: str, address: str, **limits) -> sa.Row:
    args = "".join(f", {name} => :{name}" for name in limits)
    return rows(web, f"SELECT * FROM lungsql.sign_in(:u, :p, :a{args})", u=username, p=password, a=address,
                **limits)[0]


def test_sign_in_checks_the_password_in_the_database(web):
    ok = sign_in(web, "clin", PASSWORDS["clin"], "10.9.1.1")
    assert (ok.outcome, ok.role, ok.retry_after) == ("ok", "clinician", 0) and ok.user_id > 0
    for username in ("clin", "nobody", "", "bad name"):
        assert tuple(sign_in(web, username, "wrong-password", "10.9.1.2")) == ("failed", None, None, 0)


def test_parallel_sign_ins_each_count_the_ones_before(web, su):
    """20 connections at once, one name, one address: the advisory locks serialize them."""
    users.add_user(su, "parallel", "parallel-password-1", "clinician")
    attempts, outcomes = 20, []
    barrier = threading.Barrier(attempts)

    def attempt():
        barrier.wait()
        outcomes.append(sign_in(web, "Parallel", "guess", "10.9.2.1").outcome)  # the name in any case

    threads = [threading.Thread(target=attempt) for _ in range(attempts)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert sorted(outcomes) == ["failed"] * 5 + ["locked"] * 15
    counted = dict(rows(su, "SELECT action, count(*) FROM lungsql.audit_log WHERE address = '10.9.2.1' "
                            "GROUP BY action"))
    assert counted == {"login_failed": 5, "login_locked": 15}


def test_a_locked_name_is_answered_alike_whether_it_exists_or_not(web, su):
    for name in ("boss", "nobody-here"):
        for _ in range(3):
            sign_in(web, name, "wrong-password", "10.9.3.1", max_failures=3)
    with su.begin() as conn:  # both names' failures as old, so that both wait as long
        conn.execute(sa.text("UPDATE lungsql.audit_log SET occurred_at = clock_timestamp() - interval '10.5 s' "
                             "WHERE username IN ('boss', 'nobody-here')"))
    answers = [tuple(sign_in(web, name, PASSWORDS["boss"], "10.9.3.1", max_failures=3))
               for name in ("boss", "nobody-here")]
    assert answers == [("locked", None, None, 20)] * 2  # the right password is not even checked


def test_sign_in_limits_cannot_switch_throttling_off(web):
    for limits in ({"max_failures": 0}, {"max_failures": 1_000_000}, {"max_failures_per_user": 10**9},
                   {"max_failures_per_address": 10**9}, {"window_s": 1.0}, {"base_delay_s": 0.0}):
        with pytest.raises(sa.exc.DBAPIError, match="outside"):
            sign_in(web, "clin", "x", "10.9.4.1", **limits)
