"""Results back to the PACS: a small cohort uploaded to lungsql and to the session's Orthanc,
featurized with the built-in CNN, a model trained and deployed, then each patient's probability
pushed as a Structured Report (STOW-RS and C-STORE) and read back from Orthanc over DICOMweb."""

from __future__ import annotations

import functools
import socket
from pathlib import Path

import pydicom
import pytest
import sqlalchemy as sa
from pydicom.uid import generate_uid

from databases import call
from lungsql.client import cnns, ingest
from lungsql.client.pacs import dicomweb
from lungsql.client.pacs.dimse import Peer
from lungsql.client.pacs.results import KEY_IMAGE_UNAVAILABLE, PacsUnreachable, Pushed, push_results
from lungsql.dicom import report, synth
from lungsql.errors import ConfigurationError, LungSQLError
from lungsql.ml import cnn_export

pytest.importorskip("torch", reason="the built-in CNN is exported with the export extra (make bootstrap)")

PATIENTS = 10
SLICES = (4, 7)
MODEL = "lgbm"


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("results-cohort")
    synth.write_cohort(out, patients=PATIENTS, slices=SLICES, seed=11)
    return out


@pytest.fixture(scope="module")
def exported_cnn():
    return cnn_export.export_builtin("efficientnet-lite0", cache_dir=cnn_export.default_cache_dir())


def upload(engine, orthanc, folder: Path) -> None:
    """The folder into lungsql (as `lungsql ingest` stores it) and the same files into the PACS."""
    ingest.ingest(engine, folder)
    for path in sorted(folder.rglob("*.dcm")):
        orthanc.upload(path.read_bytes())


def featurize_and_train(engine) -> int:
    """CALL generate_features, then train_model, which deploys the first model of its name."""
    cnns.import_builtin(engine)
    call(engine, "CALL lungsql.generate_features()")
    (model_id, _), = call(engine, "SELECT * FROM lungsql.train_model(%s)", (MODEL,))
    assert rows(engine, "SELECT model_id FROM lungsql.deployments WHERE name = :n", n=MODEL) == [(model_id,)]
    return model_id


def rows(engine, sql: str, **params) -> list[tuple]:
    with engine.connect() as conn:
        return [tuple(r) for r in conn.execute(sa.text(sql), params)]


def deployed(engine) -> dict:
    with engine.connect() as conn:
        return dict(conn.execute(sa.text(
            "SELECT m.model_id, m.sha256, c.name AS cnn_name FROM lungsql.deployments d "
            "JOIN lungsql.models m USING (model_id) JOIN lungsql.cnn_models c ON c.cnn_id = m.cnn_id "
            "ORDER BY d.deployment_id DESC LIMIT 1")).mappings().one())


def recorded(engine, patient_id: str, model_id: int) -> float:
    """The probability lungsql.predictions recorded last for the patient and model."""
    ((probability,),) = rows(engine, "SELECT probability FROM lungsql.predictions WHERE patient_id = :p AND "
                                     "model_id = :m ORDER BY prediction_id DESC LIMIT 1", p=patient_id, m=model_id)
    return probability


def series_of(engine, patient_id: str) -> dict[str, tuple[str, set[str]]]:
    """Series UID -> (study UID, SOP Instance UIDs) of the patient's stored slices."""
    found: dict[str, tuple[str, set[str]]] = {}
    for study, series, sop in rows(engine, "SELECT study_instance_uid, series_instance_uid, sop_instance_uid "
                                           "FROM lungsql.scans WHERE patient_id = :p", p=patient_id):
        found.setdefault(series, (study, set()))[1].add(sop)
    return found


def reports_in(orthanc, study: str) -> list[pydicom.Dataset]:
    """The SR instances of a study, found with QIDO-RS and retrieved with WADO-RS."""
    web = dicomweb.client(orthanc.dicomweb_url)
    found = []
    for series in web.search_for_series(study, search_filters={"Modality": "SR"}):
        series_uid = series[dicomweb.SERIES_UID]["Value"][0]
        for instance in web.search_for_instances(study, series_uid):
            sop = instance[dicomweb.SOP_UID]["Value"][0]
            found.append(web.retrieve_instance(study, series_uid, sop))
    return found


def check_in_pacs(engine, orthanc, pushed: Pushed, series: str | None = None) -> dict:
    """What a PACS user would check: the report is in the patient's study, states the probability
    lungsql recorded, names the deployed model, cites the featurized series whole, and says it is
    for research only. Returns what read_report read."""
    (sr,) = reports_in(orthanc, pushed.study_instance_uid)
    assert str(sr.SOPInstanceUID) == pushed.sr_sop_instance_uid
    read = report.read_report(sr)
    model = deployed(engine)
    assert abs(read["probability"] - recorded(engine, pushed.patient_id, model["model_id"])) <= 1e-6
    assert abs(read["probability"] - pushed.probability) <= 1e-6
    assert (read["model_id"], read["model_sha256"], read["cnn_name"]) == (
        pushed.model_id, model["sha256"], model["cnn_name"])
    assert pushed.model_id == model["model_id"]
    stored = series_of(engine, pushed.patient_id)
    if series is None:
        (series,) = stored  # the synthetic patients have one CT series each
    study, instances = stored[series]
    assert read["study_instance_uid"] == pushed.study_instance_uid == str(sr.StudyInstanceUID) == study
    assert read["source_series_instance_uid"] == series
    assert sorted(read["source_instances"]) == sorted(instances)
    assert read["disclaimer"] == report.DISCLAIMER_TEXT
    assert read["key_slice"] is None
    assert str(sr.PatientID) == pushed.patient_id
    return read


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_every_featurized_patient_gets_a_report_over_stow_rs(engine, orthanc_clean, cohort, exported_cnn):
    upload(engine, orthanc_clean, cohort)
    model_id = featurize_and_train(engine)
    pushed_now: list[Pushed] = []
    results = push_results(engine, None, url=orthanc_clean.dicomweb_url, on_pushed=pushed_now.append)
    patients = [r[0] for r in rows(engine, "SELECT patient_id FROM lungsql.patients ORDER BY patient_id")]
    assert [p.patient_id for p in results] == patients and results.failed == []
    assert pushed_now == list(results) and {p.model_id for p in results} == {model_id}
    for pushed in results:
        check_in_pacs(engine, orthanc_clean, pushed)
    # Each push is scored by the procedure, which records it: one prediction per patient.
    assert rows(engine, "SELECT count(*) FROM lungsql.predictions") == [(PATIENTS,)]
    assert len({p.sr_sop_instance_uid for p in results}) == PATIENTS


def test_a_report_goes_over_c_store_to_a_dimse_peer(engine, orthanc_clean, cohort, exported_cnn):
    upload(engine, orthanc_clean, cohort)
    featurize_and_train(engine)
    patient = rows(engine, "SELECT min(patient_id) FROM lungsql.patients")[0][0]
    peer = Peer("127.0.0.1", orthanc_clean.dicom_port, orthanc_clean.aet)
    (pushed,) = push_results(engine, [patient], dimse=peer, model_name=MODEL)
    assert pushed.patient_id == patient
    check_in_pacs(engine, orthanc_clean, pushed)
    # Only that patient's study got a report.
    others = rows(engine, "SELECT DISTINCT study_instance_uid FROM lungsql.scans WHERE patient_id <> :p", p=patient)
    assert all(reports_in(orthanc_clean, study) == [] for (study,) in others)


def test_the_report_cites_the_series_the_features_came_from(engine, orthanc_clean, cohort, exported_cnn, tmp_path):
    # A patient with a second, shorter series of the same study, stored before featurization.
    patient = sorted(p.name for p in cohort.iterdir() if p.is_dir())[0]
    files = sorted((cohort / patient).rglob("*.dcm"))
    second = generate_uid()
    (tmp_path / "second").mkdir()
    for path in files[:-1]:
        ds = pydicom.dcmread(path)
        ds.SeriesInstanceUID, ds.SeriesNumber = second, 2
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.save_as(tmp_path / "second" / f"{ds.SOPInstanceUID}.dcm", enforce_file_format=True)
    upload(engine, orthanc_clean, cohort)
    upload(engine, orthanc_clean, tmp_path / "second")
    featurize_and_train(engine)
    (first,) = [uid for uid in series_of(engine, patient) if uid != second]
    url = orthanc_clean.dicomweb_url

    # Features computed before schema version 8 name no series: the one with the most slices, as then.
    with engine.begin() as conn:
        conn.execute(sa.text("UPDATE lungsql.features SET series_instance_uid = NULL WHERE patient_id = :p"),
                     {"p": patient})
    (pushed,) = push_results(engine, [patient], url=url)
    check_in_pacs(engine, orthanc_clean, pushed, series=first)

    # Since version 8 the features name their series (a DBA's choice, say): the report cites that one.
    orthanc_clean.request("DELETE", f"/instances/{orthanc_id(orthanc_clean, pushed.sr_sop_instance_uid)}")
    with engine.begin() as conn:
        conn.execute(sa.text("UPDATE lungsql.features SET series_instance_uid = :s WHERE patient_id = :p"),
                     {"s": second, "p": patient})
    (pushed,) = push_results(engine, [patient], url=url)
    read = check_in_pacs(engine, orthanc_clean, pushed, series=second)
    assert len(read["source_instances"]) == len(files) - 1


def orthanc_id(orthanc, sop_instance_uid: str) -> str:
    (found,) = orthanc.request("POST", "/tools/lookup", data=sop_instance_uid)
    return found["ID"]


def test_patients_that_cannot_be_pushed_are_reported_and_the_others_go_on(engine, orthanc_clean, cohort,
                                                                          exported_cnn, tmp_path, monkeypatch):
    upload(engine, orthanc_clean, cohort)
    url = orthanc_clean.dicomweb_url
    everyone = [r[0] for r in rows(engine, "SELECT patient_id FROM lungsql.patients ORDER BY patient_id")]
    with pytest.raises(LungSQLError, match="no model is deployed"):
        push_results(engine, everyone, url=url)
    featurize_and_train(engine)

    # A patient who arrived after featurization, one whose series grew since, and a typo.
    synth.write_cohort(tmp_path / "late", patients=1, slices=(4, 4), seed=99)
    upload(engine, orthanc_clean, tmp_path / "late")
    (late,) = set(r[0] for r in rows(engine, "SELECT patient_id FROM lungsql.patients")) - set(everyone)
    grown = everyone[1]
    extra = pydicom.dcmread(sorted((cohort / grown).rglob("*.dcm"))[0])
    extra.SOPInstanceUID = extra.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    extra.ImagePositionPatient = [*extra.ImagePositionPatient[:2], float(extra.ImagePositionPatient[2]) - 50]
    (tmp_path / "grown").mkdir()
    extra.save_as(tmp_path / "grown" / "extra.dcm", enforce_file_format=True)
    upload(engine, orthanc_clean, tmp_path / "grown")

    before = rows(engine, "SELECT count(*) FROM lungsql.predictions")
    reported: list[tuple[str, str]] = []
    wanted = [everyone[0], late, "nobody", grown, everyone[2]]
    results = push_results(engine, wanted, url=url, on_patient=lambda p, why: reported.append((p, why)))
    assert [p.patient_id for p in results] == [everyone[0], everyone[2]]
    for pushed in results:
        check_in_pacs(engine, orthanc_clean, pushed)
    assert reported == results.failed and [p for p, _ in reported] == [late, "nobody", grown]
    why = dict(reported)
    assert "no features" in why[late] and "generate_features" in why[late]
    assert "no patient 'nobody'" in why["nobody"]
    assert "after its features were computed" in why[grown]
    # Only the patients that could be reported were scored.
    assert rows(engine, "SELECT count(*) FROM lungsql.predictions") == [(before[0][0] + 2,)]
    assert reports_in(orthanc_clean, series_of(engine, late).popitem()[1][0]) == []

    # The key slice is not known yet: refused, with the reason, before anything is scored or sent.
    scored = rows(engine, "SELECT count(*) FROM lungsql.predictions")
    with pytest.raises(LungSQLError, match="key images are not available yet") as refused:
        push_results(engine, [everyone[3]], url=url, key_image=True)
    assert refused.value.message == KEY_IMAGE_UNAVAILABLE and "contributed most" in refused.value.message
    assert rows(engine, "SELECT count(*) FROM lungsql.predictions") == scored
    # A refused association fails before anyone is scored.
    with pytest.raises(PacsUnreachable, match="refused or did not answer an association"):
        push_results(engine, [everyone[3]], dimse=Peer("127.0.0.1", free_port(), "ORTHANC"))
    assert rows(engine, "SELECT count(*) FROM lungsql.predictions") == scored
    # A DICOMweb PACS that cannot take the first report: an error naming it, without the
    # credentials (from the settings). A URL with a query is refused before anything connects...
    monkeypatch.setenv("LUNGSQL_PACS_USER", "radiology")
    monkeypatch.setenv("LUNGSQL_PACS_PASSWORD", "s3cret-pw")
    with pytest.raises(ConfigurationError, match="has a query or fragment") as refused:
        push_results(engine, [everyone[3]], url=f"{orthanc_clean.url}/dicom-web?token=abc")
    assert "token" not in str(refused.value)
    # ... then a URL with no DICOMweb service...
    with pytest.raises(PacsUnreachable, match="has no STOW-RS service there") as unreachable:
        push_results(engine, [everyone[3]], url=f"{orthanc_clean.url}/no-dicom-web")
    assert str(unreachable.value).startswith(f"the PACS at {orthanc_clean.url}/no-dicom-web has no STOW-RS")
    # ... then nothing listening (one attempt here, where a run tries five times over 30 s).
    monkeypatch.setattr(dicomweb, "client", functools.partial(dicomweb.client, attempts=1))
    port = free_port()
    with pytest.raises(PacsUnreachable) as unreachable:
        push_results(engine, [everyone[3]], url=f"http://127.0.0.1:{port}/dicom-web")
    assert str(unreachable.value).startswith(f"cannot reach the PACS at http://127.0.0.1:{port}/dicom-web ")
    text = str(unreachable.value)
    assert "s3cret-pw" not in text and "radiology" not in text and "token" not in text
    assert unreachable.value.__suppress_context__  # a traceback does not show the request's own error
    assert reports_in(orthanc_clean, series_of(engine, everyone[3]).popitem()[1][0]) == []
