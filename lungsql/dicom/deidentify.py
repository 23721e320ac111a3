"""De-identification of DICOM CT datasets (DICOM PS3.15 Annex E).

Implements the *Basic Application Level Confidentiality Profile* (DCM 113100)
with the *Retain Patient Characteristics Option* (DCM 113108), so that the
patient's age, sex, size and weight survive for the classifier.

Dates are **not** retained (neither the Retain Longitudinal Temporal
Information Full Dates nor the Modified Dates Option is claimed).  Because the
birth date is removed, the patient's age is derived from Patient's Birth Date
and the study date *before* the dates are cleared whenever Patient's Age is
absent, so the age is kept.

Identifiers are replaced deterministically with a site secret (``key``):

* Patient ID becomes ``'anon-' + HMAC-SHA256(key, PatientID).hexdigest()[:20]``,
  so all slices of one patient stay grouped and re-runs give the same value.
* Every UID (every element of VR UI, at every nesting level, and the File Meta
  ``MediaStorageSOPInstanceUID``) becomes
  ``'2.25.' + int(HMAC-SHA256(key, uid)[:16])``, so references between
  instances stay consistent.  Only UIDs of the DICOM registry
  (``pydicom.uid.UID_dictionary``: SOP classes, transfer syntaxes, well-known
  frames of reference, coding schemes...) and the few coding-scheme UIDs of
  PS3.16 in ``_WELL_KNOWN_CODING_SCHEME_UIDS`` are kept: they name a standard
  thing, never a site or a patient.  The Transfer Syntax UID is always kept, as
  it says how the bytes are encoded.

Actions follow PS3.15 Table E.1-1.  Where the table gives a conditional action
(``X/Z``, ``X/Z/D``, ``Z/D``, ``X/Z/U*`` ...) it is resolved here for the CT
Image IOD: ``X`` for Type 3 attributes, ``Z`` for Type 2.  Attributes the table
marks ``D`` that only belong to SR / Presentation State IODs are removed, as
Note 13 of Annex E permits when they show up in an image.

On top of the table (Notes 1 and 4 of E.1.1: identifying data hides in private,
new and unknown attributes), at every nesting level, inside sequences too:

* every private element and private creator is removed, unless
  ``keep_safe_private=True`` (the *Retain Safe Private Option*, DCM 113111):
  then the attributes of ``SAFE_PRIVATE_ATTRIBUTES`` -- a few acquisition
  parameters from PS3.15 Table E.3.10-1, identified by group, private creator
  and element offset, and kept only with their listed VR -- stay, with their
  private creator element, and nothing else private does;
* every element whose tag pydicom's data dictionary does not know (a public tag
  newer than the dictionary, or invented by a writer) is removed, whatever its
  VR, so implicit-VR files (where such elements read as UN) and explicit-VR
  files are treated alike;
* every element encoded as UN is removed, unless its tag is in the profile
  table: then pydicom decodes it with its dictionary VR and the table's action
  applies (so a UN-encoded Patient ID is still pseudonymised, not lost).  A UN
  element pydicom cannot decode is removed.  A sequence of undefined length
  encoded as UN is read by pydicom as a sequence: under an unknown or private
  tag it is removed, under a known tag it is cleaned item by item like any
  sequence;
* any remaining date/time (DA, DT, TM) or person name (PN) element, curve and
  overlay groups and group lengths are removed.

A slice whose Burned In Annotation is ``YES`` may show identifying text in its
pixels, which this module never touches (the Clean Pixel Data Option is not
claimed): :meth:`Deidentifier.apply` raises :class:`BurnedInAnnotation` (an
``InvalidScan``, so an upload records the file and skips it) unless
``allow_burned_in=True``, which keeps the slice and logs a warning.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import hmac
import logging
from io import BytesIO
from typing import Final

import pydicom
from pydicom.datadict import get_entry
from pydicom.dataelem import DataElement, convert_raw_data_element
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.tag import BaseTag, Tag
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    UID_dictionary,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

from lungsql.errors import InvalidScan

__all__ = [
    "ACTIONS",
    "BASIC_PROFILE",
    "DEIDENTIFICATION_METHOD",
    "DEIDENTIFICATION_METHOD_CODES",
    "SAFE_PRIVATE_ATTRIBUTES",
    "BurnedInAnnotation",
    "Deidentifier",
    "deidentify_bytes",
]

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------
# Action codes (PS3.15 E.1.1)
# --------------------------------------------------------------------------
X: Final = "X"  # remove the element
Z: Final = "Z"  # replace with a zero-length value (empty sequence for SQ)
D: Final = "D"  # replace with a non-zero-length dummy value consistent with the VR
U: Final = "U"  # replace UID(s) with keyed, deterministic, consistent UID(s)
K: Final = "K"  # keep (sequences are still cleaned recursively)
# Local code: Patient ID gets a keyed pseudonym.  The profile says Z, which
# explicitly allows "a non-zero length value that may be a dummy value".
P: Final = "P"

ACTIONS: Final = frozenset({X, Z, D, U, K, P})

# --------------------------------------------------------------------------
# The profile table: (tag, keyword, action applied here).
# A trailing comment gives the code in Table E.1-1 when it differs from the
# action applied (conditional codes resolved for the CT Image IOD, option
# overrides, Note 13).  Keywords are those of pydicom's data dictionary; the
# test suite checks that every tag and keyword agree.
# --------------------------------------------------------------------------
BASIC_PROFILE: Final[tuple[tuple[int, str, str], ...]] = (
    # ---- Patient ---------------------------------------------------------
    (0x00100010, "PatientName", Z),
    (0x00100020, "PatientID", P),  # Z; keyed pseudonym, see Deidentifier.pseudonym
    (0x00100021, "IssuerOfPatientID", X),
    (0x00100024, "IssuerOfPatientIDQualifiersSequence", X),  # not in E.1-1; names the issuer
    (0x00100030, "PatientBirthDate", Z),  # PatientAge is derived from it first
    (0x00100032, "PatientBirthTime", X),
    (0x00100033, "PatientBirthDateInAlternativeCalendar", X),  # not in E.1-1; a date
    (0x00100034, "PatientDeathDateInAlternativeCalendar", X),  # not in E.1-1; a date
    (0x00100040, "PatientSex", K),  # Z; Retain Patient Characteristics: K
    (0x00100050, "PatientInsurancePlanCodeSequence", X),
    (0x00100101, "PatientPrimaryLanguageCodeSequence", X),
    (0x00100102, "PatientPrimaryLanguageModifierCodeSequence", X),
    (0x00101000, "OtherPatientIDs", X),
    (0x00101001, "OtherPatientNames", X),
    (0x00101002, "OtherPatientIDsSequence", X),
    (0x00101005, "PatientBirthName", X),
    (0x00101010, "PatientAge", K),  # X; Retain Patient Characteristics: K
    (0x00101020, "PatientSize", K),  # X; Retain Patient Characteristics: K
    (0x00101030, "PatientWeight", K),  # X; Retain Patient Characteristics: K
    (0x00101040, "PatientAddress", X),
    (0x00101050, "InsurancePlanIdentification", X),
    (0x00101060, "PatientMotherBirthName", X),
    (0x00101080, "MilitaryRank", X),
    (0x00101081, "BranchOfService", X),
    (0x00101090, "MedicalRecordLocator", X),
    (0x00101100, "ReferencedPatientPhotoSequence", X),
    (0x00102000, "MedicalAlerts", X),  # option: C (clean); free text cannot be cleaned -> X
    (0x00102110, "Allergies", X),  # option: C; free text -> X
    (0x00102150, "CountryOfResidence", X),
    (0x00102152, "RegionOfResidence", X),
    (0x00102154, "PatientTelephoneNumbers", X),
    (0x00102155, "PatientTelecomInformation", X),
    (0x00102160, "EthnicGroup", K),  # X; Retain Patient Characteristics: K
    (0x00102180, "Occupation", X),
    (0x001021A0, "SmokingStatus", K),  # X; Retain Patient Characteristics: K
    (0x001021B0, "AdditionalPatientHistory", X),
    (0x001021C0, "PregnancyStatus", K),  # X; Retain Patient Characteristics: K
    (0x001021D0, "LastMenstrualDate", X),
    (0x001021F0, "PatientReligiousPreference", X),
    (0x00102203, "PatientSexNeutered", K),  # X/Z; Retain Patient Characteristics: K
    (0x00102297, "ResponsiblePerson", X),
    (0x00102299, "ResponsibleOrganization", X),
    (0x00104000, "PatientComments", X),
    (0x00380050, "SpecialNeeds", X),  # option: C; free text -> X
    (0x00380500, "PatientState", X),  # option: C; free text -> X
    (0x00400012, "PreMedication", X),  # option: C; free text -> X
    # ---- Clinical trial modules -------------------------------------------
    (0x00120010, "ClinicalTrialSponsorName", D),
    (0x00120020, "ClinicalTrialProtocolID", D),
    (0x00120021, "ClinicalTrialProtocolName", Z),
    (0x00120030, "ClinicalTrialSiteID", Z),
    (0x00120031, "ClinicalTrialSiteName", Z),
    (0x00120040, "ClinicalTrialSubjectID", D),
    (0x00120042, "ClinicalTrialSubjectReadingID", D),
    (0x00120050, "ClinicalTrialTimePointID", Z),
    (0x00120051, "ClinicalTrialTimePointDescription", X),
    (0x00120060, "ClinicalTrialCoordinatingCenterName", Z),
    (0x00120071, "ClinicalTrialSeriesID", X),
    (0x00120072, "ClinicalTrialSeriesDescription", X),
    (0x00120081, "ClinicalTrialProtocolEthicsCommitteeName", D),
    (0x00120082, "ClinicalTrialProtocolEthicsCommitteeApprovalNumber", X),
    # ---- Study, visit, request ----------------------------------------------
    (0x00080020, "StudyDate", Z),
    (0x00080030, "StudyTime", Z),
    (0x00080050, "AccessionNumber", Z),
    (0x00080090, "ReferringPhysicianName", Z),
    (0x00080092, "ReferringPhysicianAddress", X),
    (0x00080094, "ReferringPhysicianTelephoneNumbers", X),
    (0x00080096, "ReferringPhysicianIdentificationSequence", X),
    (0x0008009C, "ConsultingPhysicianName", Z),
    (0x0008009D, "ConsultingPhysicianIdentificationSequence", X),
    (0x00081030, "StudyDescription", X),
    (0x00081048, "PhysiciansOfRecord", X),
    (0x00081049, "PhysiciansOfRecordIdentificationSequence", X),
    (0x00081060, "NameOfPhysiciansReadingStudy", X),
    (0x00081062, "PhysiciansReadingStudyIdentificationSequence", X),
    (0x00081080, "AdmittingDiagnosesDescription", X),
    (0x00081084, "AdmittingDiagnosesCodeSequence", X),
    (0x00081110, "ReferencedStudySequence", X),  # X/Z; Type 3 in CT
    (0x00081120, "ReferencedPatientSequence", X),
    (0x0020000D, "StudyInstanceUID", U),
    (0x00200010, "StudyID", Z),
    (0x00320012, "StudyIDIssuer", X),
    (0x00321020, "ScheduledStudyLocation", X),
    (0x00321021, "ScheduledStudyLocationAETitle", X),
    (0x00321030, "ReasonForStudy", X),
    (0x00321032, "RequestingPhysician", X),
    (0x00321033, "RequestingService", X),
    (0x00321060, "RequestedProcedureDescription", X),  # X/Z; Type 3 in CT
    (0x00321066, "ReasonForVisit", X),
    (0x00321067, "ReasonForVisitCodeSequence", X),
    (0x00321070, "RequestedContrastAgent", X),
    (0x00324000, "StudyComments", X),
    (0x00380004, "ReferencedPatientAliasSequence", X),
    (0x00380010, "AdmissionID", X),
    (0x00380011, "IssuerOfAdmissionID", X),
    (0x00380014, "IssuerOfAdmissionIDSequence", X),
    (0x0038001E, "ScheduledPatientInstitutionResidence", X),
    (0x00380020, "AdmittingDate", X),
    (0x00380021, "AdmittingTime", X),
    (0x00380040, "DischargeDiagnosisDescription", X),
    (0x00380060, "ServiceEpisodeID", X),
    (0x00380061, "IssuerOfServiceEpisodeID", X),
    (0x00380062, "ServiceEpisodeDescription", X),
    (0x00380064, "IssuerOfServiceEpisodeIDSequence", X),
    (0x00380300, "CurrentPatientLocation", X),
    (0x00380400, "PatientInstitutionResidence", X),
    (0x00384000, "VisitComments", X),
    (0x00403001, "ConfidentialityConstraintOnPatientDataDescription", X),
    (0x00400275, "RequestAttributesSequence", X),
    (0x00401001, "RequestedProcedureID", X),
    (0x00401002, "ReasonForTheRequestedProcedure", X),
    (0x00401004, "PatientTransportArrangements", X),
    (0x00401005, "RequestedProcedureLocation", X),
    (0x0040100A, "ReasonForRequestedProcedureCodeSequence", X),
    (0x00401010, "NamesOfIntendedRecipientsOfResults", X),
    (0x00401011, "IntendedRecipientsOfResultsIdentificationSequence", X),
    (0x00401400, "RequestedProcedureComments", X),
    (0x00402001, "ReasonForTheImagingServiceRequest", X),
    (0x00402008, "OrderEnteredBy", X),
    (0x00402009, "OrderEntererLocation", X),
    (0x00402010, "OrderCallbackPhoneNumber", X),
    (0x00402011, "OrderCallbackTelecomInformation", X),
    (0x00402016, "PlacerOrderNumberImagingServiceRequest", Z),
    (0x00402017, "FillerOrderNumberImagingServiceRequest", Z),
    (0x00402400, "ImagingServiceRequestComments", X),
    # ---- Scheduled / performed procedure steps ------------------------------
    (0x00400001, "ScheduledStationAETitle", X),
    (0x00400002, "ScheduledProcedureStepStartDate", X),
    (0x00400003, "ScheduledProcedureStepStartTime", X),
    (0x00400004, "ScheduledProcedureStepEndDate", X),
    (0x00400005, "ScheduledProcedureStepEndTime", X),
    (0x00400006, "ScheduledPerformingPhysicianName", X),
    (0x00400007, "ScheduledProcedureStepDescription", X),
    (0x00400009, "ScheduledProcedureStepID", X),
    (0x0040000B, "ScheduledPerformingPhysicianIdentificationSequence", X),
    (0x00400010, "ScheduledStationName", X),
    (0x00400011, "ScheduledProcedureStepLocation", X),
    (0x00400241, "PerformedStationAETitle", X),
    (0x00400242, "PerformedStationName", X),
    (0x00400243, "PerformedLocation", X),
    (0x00400244, "PerformedProcedureStepStartDate", X),
    (0x00400245, "PerformedProcedureStepStartTime", X),
    (0x00400250, "PerformedProcedureStepEndDate", X),
    (0x00400251, "PerformedProcedureStepEndTime", X),
    (0x00400253, "PerformedProcedureStepID", X),
    (0x00400254, "PerformedProcedureStepDescription", X),
    (0x00400280, "CommentsOnThePerformedProcedureStep", X),
    (0x00400310, "CommentsOnRadiationDose", X),
    (0x00404025, "ScheduledStationNameCodeSequence", X),
    (0x00404027, "ScheduledStationGeographicLocationCodeSequence", X),
    (0x00404028, "PerformedStationNameCodeSequence", X),
    (0x00404030, "PerformedStationGeographicLocationCodeSequence", X),
    (0x00404034, "ScheduledHumanPerformersSequence", X),
    (0x00404035, "ActualHumanPerformersSequence", X),
    (0x00404036, "HumanPerformerOrganization", X),
    (0x00404037, "HumanPerformerName", X),
    # ---- Series, equipment, acquisition --------------------------------------
    (0x00080021, "SeriesDate", X),  # X/D; Type 3 in General Series
    (0x00080031, "SeriesTime", X),  # X/D; Type 3 in General Series
    (0x00080080, "InstitutionName", X),  # X/Z/D; Type 3 in General Equipment
    (0x00080081, "InstitutionAddress", X),
    (0x00080082, "InstitutionCodeSequence", X),  # X/Z/D; Type 3
    (0x00081010, "StationName", X),  # X/Z/D; Type 3 in General Equipment
    (0x0008103E, "SeriesDescription", X),
    (0x00081040, "InstitutionalDepartmentName", X),
    (0x00081041, "InstitutionalDepartmentTypeCodeSequence", X),
    (0x00081050, "PerformingPhysicianName", X),
    (0x00081052, "PerformingPhysicianIdentificationSequence", X),
    (0x00081070, "OperatorsName", X),  # X/Z/D; Type 3 in General Series
    (0x00081072, "OperatorIdentificationSequence", X),  # X/D; Type 3
    (0x00081111, "ReferencedPerformedProcedureStepSequence", X),  # X/Z/D; Type 3
    (0x00180010, "ContrastBolusAgent", Z),  # Z/D; Type 2 in Contrast/Bolus
    (0x00181000, "DeviceSerialNumber", X),  # X/Z/D; Type 3 in General Equipment
    (0x00181002, "DeviceUID", U),
    (0x00181004, "PlateID", X),
    (0x00181005, "GeneratorID", X),
    (0x00181007, "CassetteID", X),
    (0x00181008, "GantryID", X),
    (0x00181009, "UniqueDeviceIdentifier", X),
    (0x0018100A, "UDISequence", X),
    (0x0018100B, "ManufacturerDeviceClassUID", U),
    (0x00181030, "ProtocolName", X),  # X/D; Type 3 in General Series
    (0x00181400, "AcquisitionDeviceProcessingDescription", X),  # X/D; Type 3
    (0x00184000, "AcquisitionComments", X),
    (0x0018700A, "DetectorID", X),  # X/D; Type 3
    (0x00189185, "RespiratoryMotionCompensationTechniqueDescription", X),
    (0x00189424, "AcquisitionProtocolDescription", X),
    (0x00189516, "StartAcquisitionDateTime", X),  # X/D
    (0x00189517, "EndAcquisitionDateTime", X),  # X/D
    (0x0018937B, "MultienergyAcquisitionDescription", X),
    (0x0018937F, "DecompositionDescription", X),
    (0x00189937, "RequestedSeriesDescription", X),
    (0x0018A003, "ContributionDescription", X),
    (0x0020000E, "SeriesInstanceUID", U),
    (0x00200052, "FrameOfReferenceUID", U),
    (0x00200200, "SynchronizationFrameOfReferenceUID", U),
    (0x00203401, "ModifyingDeviceID", X),
    (0x00203406, "ModifiedImageDescription", X),
    (0x00400555, "AcquisitionContextSequence", X),  # X/Z; not in the CT Image IOD
    # ---- Image, instance, references ------------------------------------------
    (0x00080012, "InstanceCreationDate", X),  # not in E.1-1; a date (Note 4)
    (0x00080013, "InstanceCreationTime", X),  # not in E.1-1; a time (Note 4)
    (0x00080014, "InstanceCreatorUID", U),
    (0x00080015, "InstanceCoercionDateTime", X),
    (0x00080018, "SOPInstanceUID", U),
    (0x00080022, "AcquisitionDate", X),  # X/Z; Type 3 in CT
    (0x00080023, "ContentDate", Z),  # Z/D; Type 2C in General Image
    (0x00080024, "OverlayDate", X),
    (0x00080025, "CurveDate", X),
    (0x0008002A, "AcquisitionDateTime", X),  # X/Z/D; Type 3 in CT
    (0x00080032, "AcquisitionTime", X),  # X/Z; Type 3 in CT
    (0x00080033, "ContentTime", Z),  # Z/D; Type 2C in General Image
    (0x00080034, "OverlayTime", X),
    (0x00080035, "CurveTime", X),
    (0x00080058, "FailedSOPInstanceUIDList", U),
    (0x00080201, "TimezoneOffsetFromUTC", X),
    (0x00081140, "ReferencedImageSequence", X),  # X/Z/U*; Type 3 in CT
    (0x00081155, "ReferencedSOPInstanceUID", U),
    (0x00081195, "TransactionUID", U),
    (0x00082111, "DerivationDescription", X),
    (0x00082112, "SourceImageSequence", X),  # X/Z/U*; Type 3 in CT
    (0x00083010, "IrradiationEventUID", U),
    (0x00084000, "IdentifyingComments", X),
    (0x00204000, "ImageComments", X),
    (0x00209158, "FrameComments", X),
    (0x00209161, "ConcatenationUID", U),
    (0x00209164, "DimensionOrganizationUID", U),
    (0x00281199, "PaletteColorLookupTableUID", U),
    (0x00281214, "LargePaletteColorLookupTableUID", U),
    (0x00284000, "ImagePresentationComments", X),
    (0x00041511, "ReferencedSOPInstanceUIDInFile", U),
    (0x00182042, "TargetUID", U),
    (0x00400554, "SpecimenUID", U),
    (0x00404023, "ReferencedGeneralPurposeScheduledProcedureStepTransactionUID", U),
    (0x0040A124, "UID", U),
    (0x0040A171, "ObservationUID", U),
    (0x0040A172, "ReferencedObservationUIDTrial", U),
    (0x0040A402, "ObservationSubjectUIDTrial", U),
    (0x0040DB0C, "TemplateExtensionOrganizationUID", U),
    (0x0040DB0D, "TemplateExtensionCreatorUID", U),
    (0x00620021, "TrackingUID", U),
    (0x0070031A, "FiducialUID", U),
    (0x00701101, "PresentationDisplayCollectionUID", U),
    (0x00701102, "PresentationSequenceCollectionUID", U),
    (0x00880140, "StorageMediaFileSetUID", U),
    (0x00880200, "IconImageSequence", X),
    (0x00880904, "TopicTitle", X),
    (0x00880906, "TopicSubject", X),
    (0x00880910, "TopicAuthor", X),
    (0x00880912, "TopicKeywords", X),
    (0x3006_0024, "ReferencedFrameOfReferenceUID", U),
    (0x3006_00C2, "RelatedFrameOfReferenceUID", U),
    (0x300A_0013, "DoseReferenceUID", U),
    # ---- Structured report / presentation content (not in the CT Image IOD) ---
    (0x00401101, "PersonIdentificationCodeSequence", X),  # D in SR; Note 13
    (0x00401102, "PersonAddress", X),
    (0x00401103, "PersonTelephoneNumbers", X),
    (0x00401104, "PersonTelecomInformation", X),
    (0x0040A027, "VerifyingOrganization", X),  # D in SR; Note 13
    (0x0040A073, "VerifyingObserverSequence", X),  # D in SR; Note 13
    (0x0040A075, "VerifyingObserverName", X),  # D in SR; Note 13
    (0x0040A078, "AuthorObserverSequence", X),
    (0x0040A07A, "ParticipantSequence", X),
    (0x0040A07C, "CustodialOrganizationSequence", X),
    (0x0040A123, "PersonName", X),  # D in SR; Note 13
    (0x0040A730, "ContentSequence", X),  # D in SR; Note 13 (no Clean Structured Content)
    (0x00700001, "GraphicAnnotationSequence", X),  # D in PS; Note 13 (no Clean Graphics)
    (0x00700084, "ContentCreatorName", Z),  # Z/D
    (0x00700086, "ContentCreatorIdentificationCodeSequence", X),
    (0x20300020, "TextString", X),
    (0x40000010, "Arbitrary", X),
    (0x40004000, "TextComments", X),
    (0x40080042, "ResultsIDIssuer", X),
    (0x40080102, "InterpretationRecorder", X),
    (0x4008010A, "InterpretationTranscriber", X),
    (0x4008010B, "InterpretationText", X),
    (0x4008010C, "InterpretationAuthor", X),
    (0x40080111, "InterpretationApproverSequence", X),
    (0x40080114, "PhysicianApprovingInterpretation", X),
    (0x40080115, "InterpretationDiagnosisDescription", X),
    (0x40080118, "ResultsDistributionListSequence", X),
    (0x40080119, "DistributionName", X),
    (0x4008011A, "DistributionAddress", X),
    (0x40080202, "InterpretationIDIssuer", X),
    (0x40080300, "Impressions", X),
    (0x40084000, "ResultsComments", X),
    # ---- Security, provenance, padding ----------------------------------------
    (0x04000100, "DigitalSignatureUID", U),
    (0x04000402, "ReferencedDigitalSignatureSequence", X),
    (0x04000403, "ReferencedSOPInstanceMACSequence", X),
    (0x04000404, "MAC", X),
    (0x04000550, "ModifiedAttributesSequence", X),
    (0x04000561, "OriginalAttributesSequence", X),
    (0x04000600, "InstanceOriginStatus", X),
    (0xFFFAFFFA, "DigitalSignaturesSequence", X),
    (0xFFFCFFFC, "DataSetTrailingPadding", X),
)

# tag -> action, used by the cleaner.
_ACTION_BY_TAG: Final[dict[int, str]] = {tag: action for tag, _, action in BASIC_PROFILE}
assert len(_ACTION_BY_TAG) == len(BASIC_PROFILE), "duplicate tag in BASIC_PROFILE"
assert set(_ACTION_BY_TAG.values()) <= ACTIONS

# Rules applied to elements that are not in the table (stricter than E.1-1).
_DATE_TIME_VRS: Final = frozenset({"DA", "DT", "TM"})  # no dates are retained
_PERSON_NAME_VR: Final = "PN"
_UID_VR: Final = "UI"  # mapped unless registered, see _is_registered_uid
_UNKNOWN_VR: Final = "UN"  # opaque bytes: never kept as they are
_BURNED_IN_ANNOTATION: Final = 0x00280301

# Coding schemes of PS3.16 Table 8-1 whose UIDs are HL7 OIDs, hence not in
# pydicom's UID_dictionary (PS3.6 Table A-1) but just as well known.
_WELL_KNOWN_CODING_SCHEME_UIDS: Final = frozenset({
    "2.16.840.1.113883.6.1",  # LOINC
    "2.16.840.1.113883.6.8",  # UCUM
    "2.16.840.1.113883.6.96",  # SNOMED CT
    "2.16.840.1.113883.6.256",  # RadLex
})

# --------------------------------------------------------------------------
# Retain Safe Private Option (PS3.15 E.3.10): the private attributes kept when
# Deidentifier(keep_safe_private=True).  A few CT acquisition parameters of
# Table E.3.10-1, as (group, private creator, element offset in the creator's
# block, VR, meaning).  An element is kept only where its block's creator is
# the one listed and pydicom reads it with the listed VR; its private creator
# element is kept with it.  Everything else private is removed.
# --------------------------------------------------------------------------
SAFE_PRIVATE_ATTRIBUTES: Final[tuple[tuple[int, str, int, str, str], ...]] = (
    (0x0019, "GEMS_ACQU_01", 0x23, "DS", "Table Speed [mm/rotation]"),
    (0x0019, "GEMS_ACQU_01", 0x24, "DS", "Mid Scan Time [sec]"),
    (0x0019, "GEMS_ACQU_01", 0x27, "DS", "Rotation Speed [msec]"),
    (0x0043, "GEMS_PARM_01", 0x27, "SH", "Scan Pitch Ratio"),
    (0x0045, "GEMS_HELIOS_01", 0x01, "SS", "Number of Macro Rows in Detector"),
    (0x0045, "GEMS_HELIOS_01", 0x02, "FL", "Macro width at ISO Center"),
)
_SAFE_PRIVATE_VR: Final[dict[tuple[int, str, int], str]] = {
    (group, creator, offset): vr for group, creator, offset, vr, _ in SAFE_PRIVATE_ATTRIBUTES
}

# Dummy values for action D, by VR.
_DUMMY_BY_VR: Final[dict[str, object]] = {
    "AE": "ANONYMIZED",
    "AS": "000Y",
    "CS": "ANONYMIZED",
    "DA": "19000101",
    "DS": "0",
    "DT": "19000101000000",
    "IS": "0",
    "LO": "ANONYMIZED",
    "LT": "ANONYMIZED",
    "PN": "ANONYMIZED",
    "SH": "ANONYMIZED",
    "ST": "ANONYMIZED",
    "TM": "000000",
    "UC": "ANONYMIZED",
    "UT": "ANONYMIZED",
    "FL": 0.0,
    "FD": 0.0,
    "SL": 0,
    "SS": 0,
    "UL": 0,
    "US": 0,
}

# What is written into the de-identified instance (PS3.3 C.12.1.1.8 / CID 7050).
DEIDENTIFICATION_METHOD: Final = "PS3.15 E.1 Basic Profile, Retain Patient Characteristics Option"
DEIDENTIFICATION_METHOD_CODES: Final[tuple[tuple[str, str], ...]] = (
    ("113100", "Basic Application Confidentiality Profile"),
    ("113108", "Retain Patient Characteristics Option"),
)
_SAFE_PRIVATE_METHOD: Final = "Retain Safe Private Option"
_SAFE_PRIVATE_METHOD_CODE: Final = ("113111", _SAFE_PRIVATE_METHOD)
_IMPLEMENTATION_VERSION_NAME: Final = "LUNGSQL_DEID_1"

# Dates from which the age is computed, in order of preference.
_REFERENCE_DATE_KEYWORDS: Final = ("StudyDate", "SeriesDate", "AcquisitionDate", "ContentDate")


class BurnedInAnnotation(InvalidScan):
    """A slice says its pixels may show text (Burned In Annotation YES).

    The basic profile cleans the header only, so such a slice could carry the
    patient's name in its pixels; it is refused unless the operator opts in.
    """

    def __init__(self) -> None:
        super().__init__(
            "BurnedInAnnotation is YES: the pixels may show identifying text; the slice was not stored",
            hint="check that the pixels of these slices show no identifying text, then upload them "
            "with Deidentifier(key, allow_burned_in=True) (lungsql ingest --deidentify --allow-burned-in)",
        )


class Deidentifier:
    """Keyed, deterministic de-identifier for CT datasets.

    ``key`` is the site secret.  Keep it out of the database and out of the
    repository: anyone holding it can test guesses of Patient IDs against the
    pseudonyms.  Use at least 32 random bytes.  The same key must be used for
    every run, otherwise the same patient gets a different pseudonym and the
    same study a different Study Instance UID.

    ``keep_safe_private`` (default off) claims the Retain Safe Private Option:
    the private attributes of :data:`SAFE_PRIVATE_ATTRIBUTES` are kept, every
    other private element is still removed.  ``allow_burned_in`` (default off)
    stores slices whose Burned In Annotation is YES instead of raising
    :class:`BurnedInAnnotation`; only an operator who has checked the pixels
    should turn it on.
    """

    def __init__(self, key: bytes, *, keep_safe_private: bool = False,
                 allow_burned_in: bool = False) -> None:
        if not isinstance(key, (bytes, bytearray, memoryview)):
            raise TypeError(f"key must be bytes, not {type(key).__name__}")
        key = bytes(key)
        if not key:
            raise ValueError("key must not be empty")
        self._key = key
        self.keep_safe_private = bool(keep_safe_private)
        self.allow_burned_in = bool(allow_burned_in)

    def __repr__(self) -> str:  # never show the key
        return (f"{type(self).__name__}(key=<{len(self._key)} bytes>, "
                f"keep_safe_private={self.keep_safe_private}, allow_burned_in={self.allow_burned_in})")

    # ------------------------------------------------------------------ ids
    def _hmac(self, text: str) -> bytes:
        return hmac.new(self._key, text.encode("utf-8"), hashlib.sha256).digest()

    def pseudonym(self, patient_id: str) -> str:
        """Stable pseudonymous Patient ID: ``'anon-'`` + 20 hex chars of HMAC-SHA256.

        Leading/trailing spaces and NUL padding are ignored, so the padded and
        unpadded forms of one ID give the same pseudonym.
        """
        return "anon-" + self._hmac(_strip_value(patient_id)).hex()[:20]

    def map_uid(self, uid: str) -> str:
        """Keyed replacement for one UID: ``'2.25.'`` + int of 16 HMAC bytes.

        A 128-bit integer has at most 39 digits, so the result is a valid UID of
        at most 44 characters.  An empty UID stays empty.
        """
        uid = _strip_value(uid)
        if not uid:
            return ""
        return "2.25." + str(int.from_bytes(self._hmac(uid)[:16], "big"))

    def _new_uid(self, uid: str) -> str:
        """``uid`` itself if the DICOM registry defines it, else its keyed replacement.

        A registered UID (a SOP class, a transfer syntax...) is the same in
        every hospital, so it tells nothing about one, and mapping it would
        break what readers look it up for.
        """
        return _strip_value(uid) if _is_registered_uid(uid) else self.map_uid(uid)

    # ---------------------------------------------------------------- apply
    def apply(self, ds: Dataset) -> Dataset:
        """De-identify ``ds`` in place and return it.

        Raises :class:`BurnedInAnnotation`, leaving ``ds`` untouched, for a
        slice whose Burned In Annotation is YES unless ``allow_burned_in``.
        Applying it twice re-maps the already mapped UIDs and Patient ID, so
        run it once per original instance.
        """
        burned_in = self._check_burned_in(ds)
        _set_age_from_birth_date(ds)
        self._clean(ds)
        if burned_in:
            log.warning(  # logged after cleaning, so only the new UID shows
                "BurnedInAnnotation is YES (SOP Instance %s): pixel data is not "
                "cleaned and may show identifying text",
                ds.get("SOPInstanceUID", "?"),
            )
        self._mark(ds)
        self._rebuild_file_meta(ds)
        if getattr(ds, "preamble", None) is not None:
            ds.preamble = b"\x00" * 128  # the original preamble may carry anything
        return ds

    def apply_bytes(self, data: bytes) -> tuple[bytes, Dataset]:
        """Read a DICOM file from ``data``, de-identify it, write it back.

        The transfer syntax is kept and the pixel data is copied untouched (it is
        never decoded, so compressed files need no codec).  Raises
        :class:`pydicom.errors.InvalidDicomError` for data that is not a DICOM
        file with the 128-byte preamble and ``DICM`` prefix, and
        :class:`BurnedInAnnotation` as :meth:`apply` does.
        """
        ds = pydicom.dcmread(BytesIO(data), force=False)
        self.apply(ds)
        buffer = BytesIO()
        ds.save_as(buffer, enforce_file_format=True)
        return buffer.getvalue(), ds

    # -------------------------------------------------------------- helpers
    def _check_burned_in(self, ds: Dataset) -> bool:
        """Whether the slice declares burned-in text; raise unless the operator allowed it.

        The value is read without converting the stored element, so an
        attribute encoded as UN is still seen as UN by :meth:`_clean`.
        """
        if _strip_value(_peek_value(ds, _BURNED_IN_ANNOTATION)).upper() != "YES":
            return False
        if not self.allow_burned_in:
            raise BurnedInAnnotation()
        return True

    def _clean(self, ds: Dataset) -> None:
        """Apply the profile to every element of ``ds`` and, recursively, of its items."""
        kept_private = self._safe_private_tags(ds)
        for tag in [Tag(t) for t in ds.keys()]:
            if _must_remove(ds, tag, kept_private):
                del ds[tag]
                continue
            elem = ds[tag]  # decoded now, with the dictionary VR for a UN in the table
            if elem.VR == _UNKNOWN_VR:  # pydicom could not decode it either
                del ds[tag]
            elif tag not in kept_private:  # safe private elements stay verbatim
                self._apply_action(ds, elem, self._action_for(tag, elem.VR))

    def _apply_action(self, ds: Dataset, elem: DataElement, action: str) -> None:
        """Carry out one action code on ``elem``; K recurses, so nested items get the same rules."""
        if action == X:
            del ds[elem.tag]
        elif action == Z:
            _make_empty(elem)
        elif action == D:
            self._make_dummy(ds, elem)
        elif action == U:
            self._replace_uids(elem)
        elif action == P:
            value = _strip_value(elem.value)
            elem.value = self.pseudonym(value) if value else ""
        elif elem.VR == "SQ":  # K: keep, but clean what is inside
            for item in elem.value or ():
                self._clean(item)

    def _safe_private_tags(self, ds: Dataset) -> frozenset[int]:
        """Tags of this level's private elements the Retain Safe Private Option keeps.

        Empty without the option.  A private element (gggg,xxee) belongs to the
        block whose creator is (gggg,00xx); the creator is kept with the
        elements of its block that are kept, and only then.
        """
        if not self.keep_safe_private:
            return frozenset()
        kept: set[int] = set()
        for tag in [Tag(t) for t in ds.keys()]:
            if not tag.is_private or tag.element < 0x1000:
                continue  # not a private data element (creators are decided below)
            creator_tag = Tag(tag.group, tag.element >> 8)
            creator = _strip_value(_peek_value(ds, creator_tag))
            vr = _SAFE_PRIVATE_VR.get((tag.group, creator, tag.element & 0xFF))
            if vr is not None and ds[tag].VR == vr:
                kept.update((int(tag), int(creator_tag)))
        return frozenset(kept)

    @staticmethod
    def _action_for(tag: BaseTag, vr: str) -> str:
        action = _ACTION_BY_TAG.get(int(tag))
        if action is not None:
            return action
        group = tag.group
        if 0x5000 <= group <= 0x501E and group % 2 == 0:
            return X  # curves: Curve Data is X, the rest is meaningless without it
        if 0x6000 <= group <= 0x601E and group % 2 == 0:
            return X  # overlays: Overlay Data and Comments are X, drop the whole group
        if vr in _DATE_TIME_VRS or vr == _PERSON_NAME_VR:
            return X  # dates are not retained; names are never retained
        if vr == _UID_VR:
            return U  # any UID may point back to the site; registered ones survive U
        return K

    def _make_dummy(self, ds: Dataset, elem: DataElement) -> None:
        if elem.VR == "SQ":
            elem.value = Sequence([Dataset()])
        elif elem.VR == "UI":
            self._replace_uids(elem)
        elif elem.VR in _DUMMY_BY_VR:
            elem.value = _DUMMY_BY_VR[elem.VR]
        else:  # no sensible dummy for binary VRs: remove
            del ds[elem.tag]

    def _replace_uids(self, elem: DataElement) -> None:
        if elem.VR != "UI":  # only UIDs can be mapped; anything else is removed
            _make_empty(elem)
            return
        value = elem.value
        if value is None or value == "":
            return
        if isinstance(value, str):
            elem.value = self._new_uid(value)
        else:  # multi-valued (VM > 1)
            elem.value = [self._new_uid(v) for v in value]

    def _mark(self, ds: Dataset) -> None:
        """Say which profile and options were applied (PS3.15 E.1.1, item 6)."""
        ds.PatientIdentityRemoved = "YES"
        codes = DEIDENTIFICATION_METHOD_CODES
        if self.keep_safe_private:
            ds.DeidentificationMethod = [DEIDENTIFICATION_METHOD, _SAFE_PRIVATE_METHOD]
            codes = codes + (_SAFE_PRIVATE_METHOD_CODE,)
        else:
            ds.DeidentificationMethod = DEIDENTIFICATION_METHOD
        items = []
        for value, meaning in codes:
            item = Dataset()
            item.CodeValue = value
            item.CodingSchemeDesignator = "DCM"
            item.CodeMeaning = meaning
            items.append(item)
        ds.DeidentificationMethodCodeSequence = Sequence(items)
        # Dates were cleared or removed (PS3.3 C.12.1, SOP Common Module).
        ds.LongitudinalTemporalInformationModified = "REMOVED"

    def _rebuild_file_meta(self, ds: Dataset) -> None:
        """Replace the File Meta Information, keeping only what describes the file.

        Source/Sending/Receiving AE titles, private information and the original
        implementation identity are dropped (E.1.1, item 7).  The SOP class and
        instance come from the cleaned dataset, so they match it; a value only
        the old File Meta had is mapped like any other UID.
        """
        old = getattr(ds, "file_meta", None)
        if old is None:
            return
        meta = FileMetaDataset()
        sop_class = ds.get("SOPClassUID") or self._new_uid(old.get("MediaStorageSOPClassUID", ""))
        if sop_class:
            meta.MediaStorageSOPClassUID = sop_class
        sop_instance = ds.get("SOPInstanceUID") or self._new_uid(old.get("MediaStorageSOPInstanceUID", ""))
        if sop_instance:
            meta.MediaStorageSOPInstanceUID = sop_instance
        transfer_syntax = old.get("TransferSyntaxUID") or _transfer_syntax_from_encoding(ds)
        if transfer_syntax:
            meta.TransferSyntaxUID = transfer_syntax
        meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
        meta.ImplementationVersionName = _IMPLEMENTATION_VERSION_NAME
        ds.file_meta = meta


def deidentify_bytes(data: bytes, key: bytes, **options: bool) -> tuple[bytes, Dataset]:
    """De-identify one DICOM file given as bytes; return ``(new_bytes, dataset)``.

    ``options`` are the keyword options of :class:`Deidentifier`.  See
    :meth:`Deidentifier.apply_bytes`.  For many files, build one
    :class:`Deidentifier` and call ``apply_bytes`` on it instead.
    """
    return Deidentifier(key, **options).apply_bytes(data)


# --------------------------------------------------------------------------
# module helpers
# --------------------------------------------------------------------------
def _strip_value(value: object) -> str:
    """Text value without DICOM padding (spaces, NULs)."""
    if value is None:
        return ""
    return str(value).strip(" \x00")


def _is_registered_uid(uid: object) -> bool:
    """Whether ``uid`` is a well-known UID of the DICOM registry (PS3.6 A-1) or PS3.16."""
    uid = _strip_value(uid)
    return uid in UID_dictionary or uid in _WELL_KNOWN_CODING_SCHEME_UIDS


def _peek_value(ds: Dataset, tag: BaseTag | int) -> object:
    """The value of ``tag`` in ``ds`` (None if absent), leaving a raw element raw.

    Reading through ``ds[tag]`` would store the decoded element, and with it
    forget that the file encoded it as UN.  Text is decoded with the default
    character set: this reads coded strings and private creator names, which
    are compared with ASCII constants.
    """
    elem = ds.get_item(tag)
    if elem is None:
        return None
    if elem.is_raw:
        elem = convert_raw_data_element(elem, ds=ds)
    return elem.value


def _encoded_as_un(ds: Dataset, tag: BaseTag) -> bool:
    """Whether the file gave this not yet decoded element the VR UN (explicit VR only)."""
    elem = ds.get_item(tag)
    return elem is not None and elem.is_raw and elem.VR == _UNKNOWN_VR


def _in_dictionary(tag: BaseTag) -> bool:
    """Whether pydicom's data dictionary (repeating groups included) knows ``tag``."""
    try:
        get_entry(tag)
    except KeyError:
        return False
    return True


def _must_remove(ds: Dataset, tag: BaseTag, kept_private: frozenset[int]) -> bool:
    """Whether ``tag`` goes whatever the profile table says, decided before decoding it.

    Private elements (but the safe ones kept), stale group lengths, tags the
    dictionary does not know and UN-encoded elements outside the table: their
    meaning is unknown here, so nothing vouches that they identify no one.
    Deciding on the tag alone spares decoding (and pydicom's warnings about)
    values that are thrown away.
    """
    if tag.is_private:
        return int(tag) not in kept_private
    if tag.element == 0 and tag.group != 0x0002:
        return True  # group lengths would be stale
    if not _in_dictionary(tag):
        return True
    return _encoded_as_un(ds, tag) and int(tag) not in _ACTION_BY_TAG


def _make_empty(elem: DataElement) -> None:
    if elem.VR == "SQ":
        elem.value = Sequence()
    elif elem.VR in {"AE", "AS", "CS", "DA", "DS", "DT", "IS", "LO", "LT", "PN", "SH", "ST",
                     "TM", "UC", "UI", "UR", "UT"}:
        elem.value = ""
    else:
        elem.value = None


def _parse_da(value: object) -> _dt.date | None:
    """DA value -> date; also accepts the old ACR-NEMA 'YYYY.MM.DD'. None if invalid."""
    text = _strip_value(value).replace(".", "")
    if len(text) < 8 or not text[:8].isdigit():
        return None
    try:
        return _dt.date(int(text[0:4]), int(text[4:6]), int(text[6:8]))
    except ValueError:
        return None


def _format_age(birth: _dt.date, on: _dt.date) -> str | None:
    """Age at ``on`` as an AS value: 'nnnY', or 'nnnM' / 'nnnW' / 'nnnD' under one year."""
    if on < birth:
        return None
    before_birthday = (on.month, on.day) < (birth.month, birth.day)
    years = on.year - birth.year - int(before_birthday)
    if years >= 1:
        return f"{min(years, 999):03d}Y"
    months = (on.year - birth.year) * 12 + on.month - birth.month - int(on.day < birth.day)
    if months >= 1:
        return f"{months:03d}M"
    days = (on - birth).days
    if days >= 7:
        return f"{days // 7:03d}W"
    return f"{days:03d}D"


def _set_age_from_birth_date(ds: Dataset) -> None:
    """Fill Patient's Age from the birth date and study date if it is missing or empty."""
    if _strip_value(ds.get("PatientAge", "")):
        return
    birth = _parse_da(ds.get("PatientBirthDate", ""))
    if birth is None:
        return
    for keyword in _REFERENCE_DATE_KEYWORDS:
        on = _parse_da(ds.get(keyword, ""))
        if on is not None:
            break
    else:
        on = _parse_da(_strip_value(ds.get("AcquisitionDateTime", ""))[:8])
    if on is None:
        return
    age = _format_age(birth, on)
    if age is not None:
        ds.PatientAge = age


def _transfer_syntax_from_encoding(ds: Dataset) -> str | None:
    """Transfer syntax for a dataset read without one in its File Meta."""
    implicit, little = getattr(ds, "original_encoding", (None, None))
    if implicit is None:
        return None
    if implicit:
        return ImplicitVRLittleEndian
    return ExplicitVRLittleEndian if little else ExplicitVRBigEndian
