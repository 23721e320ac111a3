"""One database for the web app's tests, built with the code users run.

A synthetic cohort uploaded with ``lungsql.client.ingest``, the built-in CNN, CNN
features from ``CALL lungsql.generate_features()``, two LightGBM models of one
name (the first deployed) from ``lungsql.train_model``, and two users. A few
patients are added by hand for the cases the cohort does not have: one
without slices or features, one whose stored DICOM is damaged, one whose name
holds LIKE metacharacters.

``add_radiographs`` gives it the second task too: a synthetic chest radiograph
cohort (lungsql.dicom.synth_xray) uploaded with ``lungsql.client.radiograph_ingest``,
featurized with the same CNN by ``CALL lungsql.generate_features(task =>
'chest_xray14')`` and trained by ``lungsql.train_findings`` (deployed as the
first model of its name). Its patients have an ID and no name.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import sqlalchemy as sa

from databases import call, create_database
from lungsql.client import cnns, ingest, migrations, radiograph_ingest, users
from lungsql.dicom import synth, synth_xray

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
    radiographs: Radiographs | None = None  # after add_radiographs

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


# -- chest radiographs --------------------------------------------------------------
# 40 patients give every one of the 14 findings enough positive films for a booster; 25 trees each
# keep the training to seconds.
RADIOGRAPH_PATIENTS = 40
RADIOGRAPH_SIZE = 128
RADIOGRAPH_MODEL = "chest_xray14"
FINDINGS_PARAMS = {"num_iterations": 25, "early_stopping_round": 0, "min_data_in_leaf": 2, "feature_fraction": 0.2,
                   "num_threads": 1}  # a handful of images: threads cost more than they save


@dataclass
class Radiographs:
    directory: Path                 # the cohort as written: images/<image_index>, Data_Entry_2017.csv
    images: dict[str, list[int]]    # patient_id -> image_ids, oldest follow-up first
    model_id: int | None            # the deployed radiograph model (None: not trained)

    def image_file(self, engine: sa.Engine, image_id: int) -> Path:
        with engine.connect() as conn:
            index = conn.execute(sa.text("SELECT image_index FROM lungsql.radiographs WHERE image_id = :i"),
                                 {"i": image_id}).scalar_one()
        return self.directory / synth_xray.IMAGES_DIR / index


def add_radiographs(engine: sa.Engine, directory: Path, patients: int = RADIOGRAPH_PATIENTS,
                    train: bool = True) -> Radiographs:
    """Write a synthetic radiograph cohort, upload it and (with `train`) featurize it with the newest
    CNN and train the findings' boosters."""
    synth_xray.write_cohort(directory, patients=patients, images_per_patient=(1, 3), size=RADIOGRAPH_SIZE, seed=23)
    radiograph_ingest.ingest(engine, directory)
    model_id = None
    if train:
        call(engine, "CALL lungsql.generate_features(task => 'chest_xray14')")
        model_id = call(engine, "SELECT model_id FROM lungsql.train_findings(%s, %s::jsonb)",
                        (RADIOGRAPH_MODEL, json.dumps(FINDINGS_PARAMS)))[0][0]
    with engine.connect() as conn:
        rows = conn.execute(sa.text("SELECT patient_id, image_id FROM lungsql.radiographs "
                                    "ORDER BY patient_id, follow_up, image_id")).all()
    images: dict[str, list[int]] = {}
    for row in rows:
        images.setdefault(row.patient_id, []).append(row.image_id)
    return Radiographs(directory, images, model_id)


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
