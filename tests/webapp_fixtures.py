"""One database for the web app's tests, built with the code users run.

A synthetic cohort uploaded with ``lungsql.client.ingest``, the built-in CNN, CNN
features from ``CALL lungsql.generate_features()``, two LightGBM models of one
name (the first deployed) from ``lungsql.train_model``, and two users. A few
patients are added by hand for the cases the cohort does not have: one
without slices or features, one whose stored DICOM is damaged, one whose name
holds LIKE metacharacters.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import sqlalchemy as sa

from databases import call, create_database
from lungsql.client import cnns, ingest, migrations, users
from lungsql.dicom import synth

PATIENTS = 10
PASSWORDS = {"clin": "clinician-password-1", "boss": "admin-password-12"}
MODEL_NAME = "lightgbm"

NO_FEATURES = ("nofeatures-0001", "Zed Nofeatures")
BROKEN_SCAN = ("broken-0001", "Bruno Brokenscan")
METACHARACTERS = ("meta-0001", "Olive Per%cent_Under\\score")


@dataclass
class WebDatabase:
    name: str
    url: str                  # as the superuser, for setting up and checking
    web_url: str              # as lungsql_web, what the web app uses
    ana_id: str               # 'Ana Fernandez', patient 0 of the cohort
    patient_ids: list[str]
    models: list[int] = field(default_factory=list)

    def engine(self) -> sa.Engine:
        return sa.create_engine(self.url)


SPLITTING = {"min_data_in_leaf": 1, "min_data_in_bin": 1, "min_sum_hessian_in_leaf": 0, "num_iterations": 40,
             "early_stopping_round": 0, "feature_fraction": 0.05, "bagging_fraction": 1.0, "bagging_freq": 0}


def build(cluster, cohort_dir: Path) -> WebDatabase:
    name = create_database(cluster, "web")
    url = cluster.url(dbname=name)
    engine = sa.create_engine(url)
    try:
        migrations.init(engine)
        synth.write_cohort(cohort_dir, patients=PATIENTS, slices=(4, 7), seed=11)
        ingest.ingest(engine, cohort_dir)
        cnns.import_builtin(engine)
        call(engine, "CALL lungsql.generate_features()")
        # Parameters that let trees split a handful of patients, so that probabilities, slice
        # contributions and heat maps differ from patient to patient.
        models = [call(engine, "SELECT model_id FROM lungsql.train_model(%s, %s::jsonb)",
                       (MODEL_NAME, json.dumps(SPLITTING)))[0][0] for _ in range(2)]
        for username, password in PASSWORDS.items():
            users.add_user(engine, username, password, "admin" if username == "boss" else "clinician")
        add_patients_by_hand(engine)
        with engine.connect() as conn:
            ana = conn.execute(sa.text("SELECT patient_id FROM lungsql.patients WHERE name = 'Ana Fernandez'")
                               ).scalar_one()
            ids = conn.execute(sa.text("SELECT patient_id FROM lungsql.patients ORDER BY patient_id")).scalars().all()
    finally:
        engine.dispose()
    return WebDatabase(name=name, url=url, web_url=cluster.url(dbname=name, user="lungsql_web"),
                       ana_id=ana, patient_ids=list(ids), models=models)


def add_patients_by_hand(engine: sa.Engine) -> None:
    garbage = b"this is not a DICOM file" * 8
    with engine.begin() as conn:
        for patient_id, name in (NO_FEATURES, BROKEN_SCAN, METACHARACTERS):
            conn.execute(sa.text("INSERT INTO lungsql.patients (patient_id, name, sex, age_years) "
                                 "VALUES (:p, :n, 'O', 50)"), {"p": patient_id, "n": name})
        conn.execute(sa.text(
            "INSERT INTO lungsql.scans (sop_instance_uid, patient_id, study_instance_uid, series_instance_uid, "
            "z_position, rows, columns, modality, transfer_syntax_uid, dicom, sha256) "
            "VALUES ('1.2.3.999', :p, '1.2.3', '1.2.3.1', 0, 512, 512, 'CT', '1.2.840.10008.1.2.1', :d, :h)"),
            {"p": BROKEN_SCAN[0], "d": garbage, "h": hashlib.sha256(garbage).digest()})


# -- the browser's side ------------------------------------------------------------
CSRF = re.compile(r'name="csrf_token" value="([^"]+)"')


def csrf_token(html: str) -> str:
    match = CSRF.search(html)
    assert match, "no CSRF token in the page"
    return match.group(1)


def login(client, username: str, password: str | None = None, **kwargs):
    """Sign in through the form, as a browser does (GET the form for its CSRF token, then POST)."""
    page = client.get("/login")
    token = csrf_token(page.get_data(as_text=True))
    return client.post("/login", data={"username": username,
                                       "password": PASSWORDS.get(username, "") if password is None else password,
                                       "csrf_token": token}, **kwargs)
