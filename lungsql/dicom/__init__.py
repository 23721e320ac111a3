"""DICOM, together: reading a file into a CT slice record and decoding its pixels under limits
(`reader`, re-exported here), the byte-level reader of uncompressed slices (`fast`), the sizes that
compressed frames claim (`codestream`), de-identification (`deidentify`), the synthetic cohort (`synth`) and the
results sent back to a PACS (`report`, with highdicom: the pacs extra).
"""

from lungsql.dicom.reader import (CODECS_HINT, Decoded, Geometry, Limits, PatientInfo, ScanRecord, check_pixels,
                                  decode_stored, display_name, geometry, parse, parse_age, patient_info, read_scan,
                                  slice_hu, stored_pixels, to_hounsfield)

__all__ = ["CODECS_HINT", "Decoded", "Geometry", "Limits", "PatientInfo", "ScanRecord", "check_pixels",
           "decode_stored", "display_name", "geometry", "parse", "parse_age", "patient_info", "read_scan",
           "slice_hu", "stored_pixels", "to_hounsfield"]
