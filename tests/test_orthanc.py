"""The local Orthanc PACS (lungsql.client.pacs.orthanc), tested against the real Orthanc 1.10 of the Debian
package: what it answers over REST, DICOMweb and DIMSE, and what its configuration allows."""

from __future__ import annotations

import json
import socket

import pytest
import requests
from dicomweb_client.api import DICOMwebClient
from pydicom import dcmread
from pydicom.dataset import Dataset
from pynetdicom import AE, build_role, evt
from pynetdicom.sop_class import CTImageStorage, StudyRootQueryRetrieveInformationModelGet, Verification

from lungsql.client.pacs.orthanc import LocalOrthanc
from lungsql.dicom import synth
from lungsql.errors import ConfigurationError


@pytest.fixture
def ct_files(tmp_path):
    """One synthetic patient of three CT slices, as DICOM files."""
    synth.write_cohort(tmp_path, patients=1, slices=(3, 3), seed=5)
    return sorted(tmp_path.rglob("*.dcm"))


def test_orthanc_answers_on_its_ports_with_its_aet(orthanc):
    system = requests.get(orthanc.url + "/system", timeout=5).json()
    assert system["DicomAet"] == orthanc.aet == "ORTHANC"
    assert system["DicomPort"] == orthanc.dicom_port
    assert system["Version"].startswith("1.")
    assert "dicom-web" in orthanc.request("GET", "/plugins")


def test_http_is_for_loopback_only(orthanc):
    config = json.loads(orthanc.config_file.read_text())
    assert config["RemoteAccessAllowed"] is False
    assert config["AuthenticationEnabled"] is False


def test_an_uploaded_slice_is_found_by_qido_and_retrieved_by_wado(orthanc_clean, ct_files):
    ds = dcmread(ct_files[0])
    assert orthanc_clean.upload(ct_files[0].read_bytes())
    assert orthanc_clean.instance_count() == 1

    client = DICOMwebClient(url=orthanc_clean.dicomweb_url)
    studies = client.search_for_studies(search_filters={"PatientID": ds.PatientID})
    assert [study["0020000D"]["Value"][0] for study in studies] == [ds.StudyInstanceUID]

    got = client.retrieve_instance(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
    assert got.SOPInstanceUID == ds.SOPInstanceUID
    assert got.PixelData == ds.PixelData


def test_the_same_file_uploaded_twice_is_stored_once(orthanc_clean, ct_files):
    data = ct_files[1].read_bytes()
    assert orthanc_clean.upload(data) == orthanc_clean.upload(data)
    assert orthanc_clean.instance_count() == 1


def test_c_echo_to_its_aet_succeeds_and_to_another_aet_is_refused(orthanc):
    ae = AE(ae_title="LUNGSQL")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", orthanc.dicom_port, ae_title=orthanc.aet)
    assert assoc.is_established
    try:
        assert assoc.send_c_echo().Status == 0x0000
    finally:
        assoc.release()
    assert ae.associate("127.0.0.1", orthanc.dicom_port, ae_title="NOT-ORTHANC").is_rejected


def test_c_get_is_refused_to_an_unknown_aet_and_served_once_it_is_registered(orthanc_clean, ct_files):
    for path in ct_files:
        orthanc_clean.upload(path.read_bytes())
    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.StudyInstanceUID = dcmread(ct_files[0], stop_before_pixels=True).StudyInstanceUID
    received = []

    def on_store(event):
        received.append(event.dataset.SOPInstanceUID)
        return 0x0000

    def c_get(calling_aet: str) -> int | None:
        """The final status of a C-GET of the study, None when Orthanc aborts the association."""
        ae = AE(ae_title=calling_aet)
        ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
        ae.add_requested_context(CTImageStorage)
        assoc = ae.associate("127.0.0.1", orthanc_clean.dicom_port, ae_title=orthanc_clean.aet,
                             ext_neg=[build_role(CTImageStorage, scp_role=True)],
                             evt_handlers=[(evt.EVT_C_STORE, on_store)])
        assert assoc.is_established
        try:
            statuses = [status for status, _ in assoc.send_c_get(query, StudyRootQueryRetrieveInformationModelGet)]
        finally:
            assoc.release()
        return statuses[-1].get("Status") if statuses else None

    assert c_get("STRANGER") is None  # Orthanc 1.10 answers an unknown AET with an A-ABORT
    assert received == []

    with socket.socket() as sock:  # C-GET needs no listener, but a modality has a port
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    orthanc_clean.add_modality("lungsql-test", "LUNGSQL_TEST", "127.0.0.1", port)
    assert c_get("LUNGSQL_TEST") == 0x0000
    assert sorted(received) == sorted(dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in ct_files)


def test_a_failed_start_says_why(tmp_path):
    with pytest.raises(ConfigurationError, match="longer than 16 characters") as caught:
        LocalOrthanc(tmp_path / "pacs", aet="AN-AET-FAR-TOO-LONG").start()
    assert "orthanc.log" in caught.value.hint
